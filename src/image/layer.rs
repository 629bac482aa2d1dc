//! A layer of a backing chain: a raw file, another cowimg image, or a qcow2 image (read
//! only). Backing files are opened only here, with the format recorded in the overlay's
//! header; their content is never probed, but content that contradicts the recorded format
//! is reported (see [`check_recorded_format`]).
use super::qcow2::Qcow2;
use super::FileId;
use super::{Extent, ExtentKind, Image, OpenOptions};
use crate::error::{Error, Result};
use crate::format::header::MAGIC;
use crate::format::BackingFormat;
use crate::storage::{file_size, is_block_device, next_data_in, next_hole_in};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Backing chains deeper than this are refused: it bounds recursion. (Loops are found by
/// file identity before this bound is reached; see [`check_chain`].)
pub const MAX_CHAIN_DEPTH: usize = 64;

/// Why a write into a qcow2 layer (a commit into a qcow2 backing file) is refused.
pub const QCOW2_WRITE_REFUSED: &str = "is a qcow2 image, which cowimg reads but never \
    writes (commit into a qcow2 backing file is not supported); use `cowimg convert -O qcow2` \
    or `-O cowimg` to make a new image of the merged chain";

/// The files of a chain above the one being opened, top first, with their identities.
pub(crate) type ChainAbove = [(PathBuf, FileId)];

/// Refuses to open `path` (whose identity is `id`) below `above` when it is one of them (a
/// loop), or when the chain would be deeper than [`MAX_CHAIN_DEPTH`]. Called before the
/// file is opened, and again with the identity of the opened file.
pub(crate) fn check_chain(path: &Path, id: FileId, above: &ChainAbove) -> Result<()> {
    let top = above.first().map_or(path, |(p, _)| p.as_path());
    if let Some(i) = above.iter().position(|(_, a)| *a == id) {
        let names: Vec<String> = above[i..]
            .iter()
            .map(|(p, _)| p.display().to_string())
            .chain(std::iter::once(path.display().to_string()))
            .collect();
        return Err(Error::Invalid {
            path: top.into(),
            reason: format!("backing chain loops: {}", names.join(" -> ")),
        });
    }
    if above.len() >= MAX_CHAIN_DEPTH {
        return Err(Error::Invalid {
            path: path.into(),
            reason: format!("backing chain is deeper than {MAX_CHAIN_DEPTH}"),
        });
    }
    Ok(())
}

pub enum Layer {
    Raw(RawFile),
    Cowimg(Box<Image>),
    /// Read-only: writes into it are refused.
    Qcow2(Box<Qcow2>),
}

/// Names what the first bytes of a file are, for messages about a format that does not
/// match: "starts with a qcow2 header", "starts with a cowimg header", or "has neither".
pub(crate) fn describe_content(start: &[u8]) -> &'static str {
    if crate::format::qcow2::has_magic(start) {
        "it starts with a qcow2 header"
    } else if start.len() >= MAGIC.len() && start[..MAGIC.len()] == MAGIC {
        "it starts with a cowimg header"
    } else {
        "it has neither a cowimg nor a qcow2 header"
    }
}

/// Checks a backing file's content against the format recorded for it, before it is opened
/// in that format. A file recorded as cowimg without the cowimg magic in either header slot
/// is refused with a message naming both formats (not as a corrupt image); a file recorded
/// as raw that starts with a cowimg or qcow2 header is read as raw, as recorded, and the
/// returned warning says so (a raw disk may begin with any bytes). A file recorded as qcow2
/// must start with the qcow2 magic.
pub fn check_recorded_format(path: &Path, format: BackingFormat) -> Result<Option<String>> {
    let (file, _) = super::open_checked(path, false)?;
    let mut start = [0u8; 8];
    let n = read_up_to(&file, &mut start, 0);
    let start = &start[..n];
    match format {
        BackingFormat::Raw => {
            let found = if crate::format::qcow2::has_magic(start) {
                "qcow2"
            } else if start == MAGIC {
                "cowimg"
            } else {
                return Ok(None);
            };
            Ok(Some(format!(
                "{} is recorded as raw but starts with a {found} header; reading it as raw",
                path.display()
            )))
        }
        BackingFormat::Cowimg => {
            let mut second = [0u8; 8];
            let m = read_up_to(&file, &mut second, crate::format::HEADER_SLOT_SIZE as u64);
            if start == MAGIC || second[..m] == MAGIC {
                return Ok(None);
            }
            Err(Error::Invalid {
                path: path.into(),
                reason: format!(
                    "is recorded as cowimg but has no cowimg header ({})",
                    describe_content(start)
                ),
            })
        }
        BackingFormat::Qcow2 if crate::format::qcow2::has_magic(start) => Ok(None),
        BackingFormat::Qcow2 => Err(Error::Invalid {
            path: path.into(),
            reason: format!(
                "is recorded as qcow2 but has no qcow2 header ({})",
                describe_content(start)
            ),
        }),
    }
}

/// The format of a file by its first bytes, as qemu-img probes the image a user names:
/// cowimg or qcow2 by their magic, raw for anything else (a short file included). The file
/// type is checked before the file is opened, so that a FIFO cannot make the probe block;
/// only a read error is an error. Backing files are never probed: their format is recorded.
pub fn probe_format(path: &Path) -> Result<BackingFormat> {
    let (file, _) = super::open_checked(path, false)?;
    let mut start = [0u8; 8];
    let mut read = 0;
    while read < start.len() {
        match file.read_at(&mut start[read..], read as u64) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(Error::Io {
                    path: path.into(),
                    op: "reading the magic",
                    offset: 0,
                    source,
                })
            }
        }
    }
    Ok(if start[..read] == MAGIC {
        BackingFormat::Cowimg
    } else if crate::format::qcow2::has_magic(&start[..read]) {
        BackingFormat::Qcow2
    } else {
        BackingFormat::Raw
    })
}

/// Reads what there is of `buf.len()` bytes at `offset` (a short file gives fewer).
fn read_up_to(file: &File, buf: &mut [u8], offset: u64) -> usize {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) | Err(_) => break,
            Ok(n) => done += n,
        }
    }
    done
}

/// Prints a warning about a backing file on stderr: the library has no other channel to the
/// user, and a warning must not stop the open.
pub(crate) fn warn(text: &str) {
    eprintln!("cowimg: warning: {text}");
}

pub struct RawFile {
    path: PathBuf,
    file: File,
    size: u64,
    writable: bool,
    /// A block device has no holes: it is all data.
    block_device: bool,
    id: FileId,
}

impl RawFile {
    /// Opens a regular file or a block device. A block device's size is the device's, not
    /// its metadata's (which says 0).
    pub fn open(path: &Path, writable: bool, force_share: bool) -> Result<RawFile> {
        let (file, id) = super::open_locked(path, writable, force_share)?;
        let metadata_error = |source| Error::File {
            path: path.into(),
            op: "reading the size",
            source,
        };
        let size = file_size(&file).map_err(metadata_error)?;
        let block_device = is_block_device(&file).map_err(metadata_error)?;
        Ok(RawFile {
            path: path.into(),
            file,
            size,
            writable,
            block_device,
            id,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
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
    /// Opens a file as the top of a chain (and, for a cowimg image, its backing chain).
    pub fn open(path: &Path, format: BackingFormat, opts: &OpenOptions) -> Result<Layer> {
        Self::open_below(path, format, opts, &[])
    }

    /// Opens a backing file below the files `above` (top first). A file that is already in
    /// the chain is refused by its identity before it is opened or loaded.
    pub(crate) fn open_below(
        path: &Path,
        format: BackingFormat,
        opts: &OpenOptions,
        above: &ChainAbove,
    ) -> Result<Layer> {
        // A backing file's content is checked against its recorded format (the top file's
        // format is the caller's choice, made by probing or by -f).
        if !above.is_empty() {
            check_chain(path, super::stat_openable(path)?, above)?;
            if let Some(warning) = check_recorded_format(path, format)? {
                warn(&warning);
            }
        }
        match format {
            BackingFormat::Raw => {
                check_chain(path, super::stat_openable(path)?, above)?;
                let raw = RawFile::open(path, !opts.read_only, opts.force_share)?;
                check_chain(path, raw.id, above)?;
                Ok(Layer::Raw(raw))
            }
            BackingFormat::Cowimg => Ok(Layer::Cowimg(Box::new(Image::open_in_chain(
                path, opts, above,
            )?))),
            BackingFormat::Qcow2 => Ok(Layer::Qcow2(Box::new(Qcow2::open_below(
                path, opts, above,
            )?))),
        }
    }

    /// The version-2 image this layer is, if it is one.
    pub(crate) fn as_v2(&self) -> Option<&super::v2::ImageV2> {
        match self {
            Layer::Cowimg(i) => i.as_v2(),
            _ => None,
        }
    }

    /// The device and inode of the layer's file (none for an image in memory).
    pub(crate) fn identity(&self) -> Option<FileId> {
        match self {
            Layer::Raw(r) => Some(r.id),
            Layer::Cowimg(i) => i.identity(),
            Layer::Qcow2(q) => Some(q.identity()),
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            Layer::Raw(r) => &r.path,
            Layer::Cowimg(i) => i.path(),
            Layer::Qcow2(q) => q.path(),
        }
    }

    pub fn format(&self) -> BackingFormat {
        match self {
            Layer::Raw(_) => BackingFormat::Raw,
            Layer::Cowimg(_) => BackingFormat::Cowimg,
            Layer::Qcow2(_) => BackingFormat::Qcow2,
        }
    }

    pub fn size(&self) -> u64 {
        match self {
            Layer::Raw(r) => r.size,
            Layer::Cowimg(i) => i.virtual_size(),
            Layer::Qcow2(q) => q.virtual_size(),
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
            Layer::Qcow2(q) => {
                let avail = q
                    .virtual_size()
                    .saturating_sub(offset)
                    .min(buf.len() as u64) as usize;
                if avail > 0 {
                    q.read_at(&mut buf[..avail], offset)?;
                }
                buf[avail..].fill(0);
                Ok(())
            }
        }
    }

    /// The layer below this one, if any.
    pub fn backing(&self) -> Option<&Layer> {
        match self {
            Layer::Raw(_) => None,
            Layer::Cowimg(i) => i.backing(),
            Layer::Qcow2(q) => q.backing(),
        }
    }

    /// The error for a write into a qcow2 layer, which cowimg only reads.
    fn qcow2_read_only(q: &Qcow2) -> Error {
        Error::Invalid {
            path: q.path().into(),
            reason: QCOW2_WRITE_REFUSED.into(),
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
            Layer::Qcow2(q) => Err(Self::qcow2_read_only(q)),
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
                // A block device is not punched (it may not zero what it discards, and cannot
                // be extended): the zeros are written.
                if r.block_device {
                    const CHUNK: u64 = 1 << 20;
                    let zeros = vec![0u8; CHUNK.min(end - offset) as usize];
                    let mut at = offset;
                    while at < end {
                        let n = CHUNK.min(end - at) as usize;
                        r.file
                            .write_all_at(&zeros[..n], at)
                            .map_err(|e| r.io_err("writing zeros", at, e))?;
                        at += n as u64;
                    }
                    return Ok(());
                }
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
            Layer::Qcow2(q) => Err(Self::qcow2_read_only(q)),
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
            // Nothing of a qcow2 layer is ever written.
            Layer::Qcow2(_) => Ok(()),
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
            Layer::Qcow2(q) => {
                if inside_end > offset {
                    q.status(offset, inside_end - offset, depth, out)?;
                }
            }
            Layer::Raw(r) if r.block_device => {
                super::push_extent(
                    out,
                    Extent {
                        offset,
                        length: inside_end - offset,
                        depth,
                        kind: ExtentKind::Data,
                        host_offset: Some(offset),
                        compressed: false,
                    },
                );
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
                                compressed: false,
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
                            compressed: false,
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
                    compressed: false,
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
            Layer::Qcow2(q) => 1 + q.backing().map_or(0, |b| b.chain_len()),
        }
    }
}
