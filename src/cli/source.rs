//! The format of an image named on the command line: `-f FMT`, or probed by magic as
//! qemu-img does. Backing files are never probed (their format is recorded in the header);
//! only the file the user names is.
//!
//! qemu-img's rule for a probed raw image is to warn and restrict writes to block 0, since a
//! guest could have written a format header into it. cowimg refuses writes through a probed
//! raw image outright and asks for `-f raw`.
//!
//! qcow2 images are recognised here; [`open_qcow2`] is the one place that opens them.
use crate::format::BackingFormat;
use crate::image::{Extent, Image, Layer, OpenOptions};
use anyhow::bail;
use std::path::Path;

/// The format of an image given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Cowimg,
    Raw,
    Qcow2,
}

impl ImageFormat {
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Cowimg => "cowimg",
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

/// Parses `-f FMT`.
pub fn parse_image_format(text: &str) -> Result<ImageFormat, String> {
    match text {
        "cowimg" => Ok(ImageFormat::Cowimg),
        "raw" => Ok(ImageFormat::Raw),
        "qcow2" => Ok(ImageFormat::Qcow2),
        _ => Err(format!(
            "unknown format '{text}': expected cowimg, raw or qcow2"
        )),
    }
}

/// A format and whether it was probed (no `-f`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Detected {
    pub format: ImageFormat,
    pub probed: bool,
}

/// `given` if there is one, else the format the file's first bytes announce: cowimg,
/// qcow2, or raw for anything else (an empty file included).
pub fn detect(path: &Path, given: Option<ImageFormat>) -> anyhow::Result<Detected> {
    if let Some(format) = given {
        return Ok(Detected {
            format,
            probed: false,
        });
    }
    let format = match crate::image::probe_format(path)? {
        BackingFormat::Cowimg => ImageFormat::Cowimg,
        BackingFormat::Qcow2 => ImageFormat::Qcow2,
        BackingFormat::Raw => ImageFormat::Raw,
    };
    Ok(Detected {
        format,
        probed: true,
    })
}

/// The one place a qcow2 image named on the command line is opened (read-only, with its
/// own backing chain).
pub fn open_qcow2(path: &Path, opts: &OpenOptions) -> anyhow::Result<Layer> {
    Ok(Layer::open(path, BackingFormat::Qcow2, opts)?)
}

/// Opens the image named on the command line as a layer, read-only, with its backing
/// chain: what the reading commands (info --backing-chain, map, convert, compare, measure)
/// read.
pub fn open_layer(path: &Path, detected: Detected, force_share: bool) -> anyhow::Result<Layer> {
    let opts = OpenOptions {
        read_only: true,
        force_share,
        ..Default::default()
    };
    let backing_format = match detected.format {
        ImageFormat::Cowimg => BackingFormat::Cowimg,
        ImageFormat::Raw => BackingFormat::Raw,
        ImageFormat::Qcow2 => return open_qcow2(path, &opts),
    };
    Ok(Layer::open(path, backing_format, &opts)?)
}

/// Refuses a write through an image whose raw format was guessed: a guest can write any
/// header into a raw disk, and the next probe would then obey it.
pub fn refuse_probed_raw_writes(
    path: &Path,
    detected: Detected,
    command: &str,
) -> anyhow::Result<()> {
    if detected.format == ImageFormat::Raw && detected.probed {
        bail!(
            "{}: no format was given and the file has no cowimg or qcow2 header, so it was \
             probed as raw; {command} does not write through a probed raw image (a guest \
             could have written a format header into it): give -f raw if it is raw",
            path.display()
        );
    }
    Ok(())
}

/// For the commands that only work on cowimg images (commit, rebase, io, serve): a
/// message that names the format found and what to do instead.
pub fn require_cowimg(
    path: &Path,
    detected: Detected,
    command: &str,
    instead: &str,
) -> anyhow::Result<()> {
    match detected.format {
        ImageFormat::Cowimg => Ok(()),
        ImageFormat::Qcow2 => Err(open_qcow2(path, &OpenOptions::default())
            .err()
            .unwrap_or_else(|| {
                anyhow::anyhow!(
                    "{}: {command} needs a cowimg image, not qcow2",
                    path.display()
                )
            })),
        ImageFormat::Raw => {
            let how = if detected.probed {
                "it has no cowimg header, so it was probed as raw"
            } else {
                "-f raw was given"
            };
            bail!(
                "{}: {command} needs a cowimg image ({how}); {instead}",
                path.display()
            )
        }
    }
}

/// Opens the image named on the command line as a read-only cowimg [`Image`], for the
/// commands built on one (serve --read-only, io -r). A cowimg image is opened as itself;
/// any other format becomes the backing layer of an empty, read-only overlay held in
/// memory, so that every read and block-status query falls through to it unchanged.
pub fn open_read_only_image(
    path: &Path,
    detected: Detected,
    force_share: bool,
) -> anyhow::Result<Image> {
    if detected.format == ImageFormat::Cowimg {
        let opts = OpenOptions {
            read_only: true,
            force_share,
            ..Default::default()
        };
        return Ok(Image::open(path, &opts)?);
    }
    let layer = open_layer(path, detected, force_share)?;
    Ok(Image::read_only_over(layer, path)?)
}

/// An image opened for reading by the commands that take any format: a file (with its
/// backing chain), or an NBD export named by a URI (`nbd://`, `nbd+unix://`), read as raw.
pub struct Source {
    pub name: String,
    inner: Inner,
}

enum Inner {
    Layer(Layer),
    Nbd(crate::nbd::client::Client),
}

impl Source {
    pub fn open(
        path: &Path,
        format: Option<ImageFormat>,
        force_share: bool,
    ) -> anyhow::Result<Source> {
        let name = path.display().to_string();
        if crate::nbd::client::is_uri(&name) {
            if format.is_some_and(|f| f != ImageFormat::Raw) {
                bail!(
                    "{name}: an NBD export is read as raw; -f {} does not apply",
                    format.map_or("", |f| f.name())
                );
            }
            let client = crate::nbd::client::Client::connect(&name)?;
            return Ok(Source {
                name,
                inner: Inner::Nbd(client),
            });
        }
        let detected = detect(path, format)?;
        let layer = open_layer(path, detected, force_share)?;
        Ok(Source {
            name,
            inner: Inner::Layer(layer),
        })
    }

    pub fn virtual_size(&self) -> u64 {
        match &self.inner {
            Inner::Layer(layer) => layer.size(),
            Inner::Nbd(client) => client.size(),
        }
    }

    /// Reads the merged image; past the end reads zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> crate::Result<()> {
        match &self.inner {
            Inner::Layer(layer) => layer.read_at(buf, offset),
            Inner::Nbd(client) => client.read_at(buf, offset),
        }
    }

    /// Where each byte of `[offset, offset + len)` comes from, through the whole chain. An
    /// NBD export is all data: this client does not ask for block status.
    pub fn block_status(&self, offset: u64, len: u64) -> crate::Result<Vec<Extent>> {
        let mut extents = Vec::new();
        if len == 0 {
            return Ok(extents);
        }
        match &self.inner {
            Inner::Layer(layer) => layer.status(offset, len, 0, &mut extents)?,
            Inner::Nbd(client) => {
                let end = offset.saturating_add(len).min(client.size()).max(offset);
                if end > offset {
                    extents.push(Extent {
                        offset,
                        length: end - offset,
                        depth: 0,
                        kind: crate::image::ExtentKind::Data,
                        host_offset: Some(offset),
                        compressed: false,
                    });
                }
            }
        }
        Ok(extents)
    }

    /// The names of the layers from this image down, top first.
    pub fn layer_names(&self) -> Vec<String> {
        match &self.inner {
            // A qcow2 with an external data file keeps its data there, where the offsets
            // point, as `qemu-img map` shows it.
            Inner::Layer(layer) => chain_of(layer)
                .iter()
                .map(|l| match l {
                    Layer::Qcow2(q) => q.data_file_path().unwrap_or(q.path()),
                    _ => l.path(),
                })
                .map(|p| p.display().to_string())
                .collect(),
            Inner::Nbd(client) => vec![client.uri().to_string()],
        }
    }
}

/// The layers from `top` down.
pub fn chain_of(top: &Layer) -> Vec<&Layer> {
    let mut layers = vec![top];
    let mut below = below(top);
    while let Some(layer) = below {
        layers.push(layer);
        below = self::below(layer);
    }
    layers
}

fn below(layer: &Layer) -> Option<&Layer> {
    layer.backing()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::header::MAGIC;

    fn probe(bytes: &[u8]) -> Detected {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("probe");
        std::fs::write(&path, bytes).expect("writing");
        detect(&path, None).expect("probing")
    }

    #[test]
    fn the_magic_decides_and_anything_else_is_probed_raw() {
        let mut cowimg = MAGIC.to_vec();
        cowimg.extend_from_slice(&[0; 100]);
        assert_eq!(probe(&cowimg).format, ImageFormat::Cowimg);
        assert_eq!(probe(b"QFI\xfb\0\0\0\x03").format, ImageFormat::Qcow2);
        assert_eq!(probe(b"QFI\xfb").format, ImageFormat::Qcow2);
        for raw in [&b""[..], b"QF", b"\x89COWIMG", b"hello, world"] {
            assert_eq!(
                probe(raw),
                Detected {
                    format: ImageFormat::Raw,
                    probed: true
                },
                "{raw:?}"
            );
        }
    }

    #[test]
    fn probing_a_fifo_or_a_directory_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        for path in [fifo.as_path(), dir.path()] {
            let error = detect(path, None).expect_err("not a file");
            assert!(
                error
                    .to_string()
                    .contains("not a regular file or block device"),
                "{error}"
            );
        }
    }

    #[test]
    fn a_given_format_is_not_probed() {
        let missing = Path::new("/nonexistent/cowimg-probe");
        assert_eq!(
            detect(missing, Some(ImageFormat::Raw)).expect("no probe"),
            Detected {
                format: ImageFormat::Raw,
                probed: false
            }
        );
        assert!(detect(missing, None).is_err());
    }
}
