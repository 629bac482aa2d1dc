//! A layer of a backing chain: a raw file or another cowimg image. Backing files are opened
//! only here, with the format recorded in the overlay's header; their content is never
//! probed.
use super::{Extent, ExtentKind, Image, OpenOptions};
use crate::error::{Error, Result};
use crate::format::BackingFormat;
use crate::storage::{next_data_in, next_hole_in};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Backing chains deeper than this are refused: it bounds recursion and stops loops.
pub const MAX_CHAIN_DEPTH: usize = 64;

pub enum Layer {
    Raw(RawFile),
    Cowimg(Box<Image>),
}

pub struct RawFile {
    path: PathBuf,
    file: File,
    size: u64,
    writable: bool,
}

impl RawFile {
    pub fn open(path: &Path, writable: bool, force_share: bool) -> Result<RawFile> {
        let file = super::open_locked(path, writable, force_share)?;
        let size = file
            .metadata()
            .map_err(|source| Error::File {
                path: path.into(),
                op: "reading metadata",
                source,
            })?
            .len();
        Ok(RawFile {
            path: path.into(),
            file,
            size,
            writable,
        })
    }

    fn io_err(&self, op: &'static str, offset: u64, source: std::io::Error) -> Error {
        Error::Io {
            path: self.path.clone(),
            op,
            offset,
            source,
        }
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let avail = self.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        self.file
            .read_exact_at(&mut buf[..avail], offset)
            .map_err(|e| self.io_err("reading", offset, e))?;
        buf[avail..].fill(0);
        Ok(())
    }
}

/// Starts writing a range of a file back to the disk without waiting (sync_file_range), so
/// that the fdatasync that ends a long copy has little left to do. A hint: errors are left to
/// that fdatasync, which reports them.
pub(crate) fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::unix::io::AsRawFd;
    // SAFETY: sync_file_range takes plain integers and a descriptor that `file` owns and
    // keeps open for the whole call; it touches no memory of ours.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as i64,
            len as i64,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

impl Layer {
    /// Opens a backing file. `depth` counts the layers above it.
    pub fn open(
        path: &Path,
        format: BackingFormat,
        opts: &OpenOptions,
        depth: usize,
    ) -> Result<Layer> {
        if depth >= MAX_CHAIN_DEPTH {
            return Err(Error::Invalid {
                path: path.into(),
                reason: format!("backing chain is deeper than {MAX_CHAIN_DEPTH} (a loop?)"),
            });
        }
        match format {
            BackingFormat::Raw => Ok(Layer::Raw(RawFile::open(
                path,
                !opts.read_only,
                opts.force_share,
            )?)),
            BackingFormat::Cowimg => Ok(Layer::Cowimg(Box::new(Image::open_at_depth(
                path, opts, depth,
            )?))),
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            Layer::Raw(r) => &r.path,
            Layer::Cowimg(i) => i.path(),
        }
    }

    pub fn format(&self) -> BackingFormat {
        match self {
            Layer::Raw(_) => BackingFormat::Raw,
            Layer::Cowimg(_) => BackingFormat::Cowimg,
        }
    }

    pub fn size(&self) -> u64 {
        match self {
            Layer::Raw(r) => r.size,
            Layer::Cowimg(i) => i.virtual_size(),
        }
    }

    /// Reads; bytes past the layer's end read as zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match self {
            Layer::Raw(r) => r.read_at(buf, offset),
            Layer::Cowimg(i) => {
                let avail = i
                    .virtual_size()
                    .saturating_sub(offset)
                    .min(buf.len() as u64) as usize;
                if avail > 0 {
                    i.read_at(&mut buf[..avail], offset)?;
                }
                buf[avail..].fill(0);
                Ok(())
            }
        }
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        match self {
            Layer::Raw(r) => {
                if !r.writable {
                    return Err(Error::ReadOnly {
                        path: r.path.clone(),
                    });
                }
                r.file
                    .write_all_at(buf, offset)
                    .map_err(|e| r.io_err("writing", offset, e))
            }
            Layer::Cowimg(i) => i.write_at(buf, offset),
        }
    }

    /// Makes a range read as zeros: a punched hole in a raw file.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        match self {
            Layer::Raw(r) => {
                if !r.writable {
                    return Err(Error::ReadOnly {
                        path: r.path.clone(),
                    });
                }
                let end = offset.saturating_add(len).min(r.size.max(offset + len));
                let storage = crate::storage::FileStorage::new(
                    r.file
                        .try_clone()
                        .map_err(|e| r.io_err("duplicating", offset, e))?,
                );
                use crate::storage::Storage;
                storage
                    .punch_hole(offset, end - offset)
                    .map_err(|e| r.io_err("punching a hole", offset, e))?;
                // Punching does not extend a file; a range past the end must still exist.
                if end > r.size {
                    r.file
                        .set_len(end)
                        .map_err(|e| r.io_err("extending", end, e))?;
                }
                Ok(())
            }
            Layer::Cowimg(i) => i.write_zeroes(offset, len),
        }
    }

    /// Starts writing a range of a raw file back to the disk without waiting, so that the
    /// `flush` that ends a long copy has little left to do. A hint: errors are left to the
    /// flush, which reports them.
    pub fn start_writeback(&self, offset: u64, len: u64) {
        if let Layer::Raw(r) = self {
            start_writeback(&r.file, offset, len);
        }
    }

    pub fn flush(&self) -> Result<()> {
        match self {
            Layer::Raw(r) => r.file.sync_data().map_err(|e| r.io_err("syncing", 0, e)),
            Layer::Cowimg(i) => i.flush(),
        }
    }

    /// Appends the allocation status of `[offset, offset + len)` to `out`, with `depth` the
    /// index of this layer in the chain (0 is the top). Past the layer's end reads as zeros.
    pub fn status(&self, offset: u64, len: u64, depth: u32, out: &mut Vec<Extent>) -> Result<()> {
        let end = offset + len;
        let size = self.size();
        let inside_end = end.min(size).max(offset);
        match self {
            Layer::Cowimg(i) => {
                if inside_end > offset {
                    i.status_at_depth(offset, inside_end - offset, depth, out)?;
                }
            }
            Layer::Raw(r) => {
                let mut pos = offset;
                while pos < inside_end {
                    let data =
                        next_data_in(&r.file, pos).map_err(|e| r.io_err("seeking data", pos, e))?;
                    let data = data.unwrap_or(inside_end).min(inside_end);
                    if data > pos {
                        super::push_extent(
                            out,
                            Extent {
                                offset: pos,
                                length: data - pos,
                                depth,
                                kind: ExtentKind::Zero,
                                host_offset: Some(pos),
                            },
                        );
                        pos = data;
                        continue;
                    }
                    let hole = next_hole_in(&r.file, pos)
                        .map_err(|e| r.io_err("seeking a hole", pos, e))?
                        .clamp(pos + 1, inside_end);
                    super::push_extent(
                        out,
                        Extent {
                            offset: pos,
                            length: hole - pos,
                            depth,
                            kind: ExtentKind::Data,
                            host_offset: Some(pos),
                        },
                    );
                    pos = hole;
                }
            }
        }
        if end > inside_end {
            super::push_extent(
                out,
                Extent {
                    offset: inside_end,
                    length: end - inside_end,
                    depth,
                    kind: ExtentKind::Unallocated,
                    host_offset: None,
                },
            );
        }
        Ok(())
    }

    /// Number of layers from this one down.
    pub fn chain_len(&self) -> u32 {
        match self {
            Layer::Raw(_) => 1,
            Layer::Cowimg(i) => 1 + i.backing().map_or(0, |b| b.chain_len()),
        }
    }
}
