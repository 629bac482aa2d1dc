//! cowimg images: the public [`Image`] and the two format engines under it, with what both
//! share (options, block status extents, opening files safely).
//!
//! - `v1/`: format version 1 (`format-spec/FORMAT.md`), the whole extent map in memory, a
//!   journal and a checkpoint.
//! - `v2/`: format version 2 (`format-spec/FORMAT-v2.md`), a map paged from disk.
//! - `versions.rs`: [`Image`], which opens a file and dispatches to the engine of its
//!   format version.
//! - `layer.rs`, `registry.rs`: backing chains and layers shared between images;
//!   `qcow2.rs`, `qcow2_write.rs`: qcow2 files; `ops.rs`: commit, rebase, convert, check.
//!
//! Both engines do all their I/O through [`Storage`](crate::storage::Storage), so the crash
//! simulator sees every write.

mod layer;
pub mod ops;
pub mod qcow2;
mod qcow2_write;
mod registry;
mod v1;
pub mod v2;
mod versions;

pub use layer::{check_recorded_format, probe_format, Layer, RawFile, MAX_CHAIN_DEPTH};
pub use registry::LayerRegistry;
pub use v1::ImageV1;
pub use versions::Image;
// Version 1's, for `ops` (check, measure).
use v1::journal_capacity_for;

use crate::error::{Error, Result};
use crate::format::{BackingFormat, HEADER_SLOT_SIZE};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Options for [`Image::create`].
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size; `None` takes the backing file's size.
    pub size: Option<u64>,
    pub cluster_size: u64,
    /// Backing path as it is to be recorded (relative paths resolve against the new image's
    /// directory) and its format.
    pub backing: Option<(String, BackingFormat)>,
    /// Format version: 1, or 2 (FORMAT-v2.md).
    pub version: u32,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: None,
            cluster_size: 1 << crate::format::DEFAULT_CLUSTER_BITS,
            backing: None,
            version: 1,
        }
    }
}

/// Options for [`Image::open`].
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    pub read_only: bool,
    /// Skip the file lock, as `qemu-img -U` does (read-only opens only).
    pub force_share: bool,
    /// Open the backing chain writable too (for `commit`).
    pub writable_backing: bool,
    /// Do not open the backing file, as `qemu-img info` and `rebase -u` do, so that an
    /// overlay whose backing file is missing can still be inspected or pointed elsewhere.
    /// Reads of ranges that fall through then read zeros.
    pub without_backing: bool,
    /// Share read-only backing layers with the other images opened through this registry
    /// (a server's exports over one base).
    pub layers: Option<Arc<LayerRegistry>>,
    /// The page cache of a version-2 image, in bytes (default 32 MiB).
    pub cache_size: Option<u64>,
    /// A page cache shared with other version-2 images (a server's exports and their
    /// bases): its budget covers them all, and `cache_size` is not used.
    pub page_cache: Option<Arc<v2::PageCache>>,
}

/// What a range of the merged image is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Stored data (in the layer at `depth`).
    Data,
    /// Reads as zeros because a layer says so (a zero/discard marker, or a hole in a raw file).
    Zero,
    /// No layer has it: reads as zeros.
    Unallocated,
}

/// One run of [`Image::block_status`]: `depth` is the layer that decides it (0 is this
/// image), `host_offset` where its bytes lie in that layer's file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub depth: u32,
    pub kind: ExtentKind,
    pub host_offset: Option<u64>,
    /// Data stored compressed (a qcow2's compressed clusters): it has no host offset, as
    /// its bytes are not in the file as they read.
    pub compressed: bool,
}

pub(crate) fn push_extent(out: &mut Vec<Extent>, e: Extent) {
    if e.length == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        let host_follows = match (last.host_offset, e.host_offset) {
            (Some(a), Some(b)) => a + last.length == b,
            (None, None) => true,
            _ => false,
        };
        if last.offset + last.length == e.offset
            && last.depth == e.depth
            && last.kind == e.kind
            && last.compressed == e.compressed
            && host_follows
        {
            last.length += e.length;
            return;
        }
    }
    out.push(e);
}

/// Where the bytes of a unit, or a run of units, come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Host(u64),
    Zero,
    Backing,
}

/// A file's identity: device and inode, the same under any name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    fn of(metadata: &std::fs::Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        FileId {
            dev: metadata.dev(),
            ino: metadata.ino(),
        }
    }
}

/// Checks, without opening it, that `path` is a regular file or a block device (a FIFO, a
/// socket, a directory or a character device is refused: opening or reading one may block
/// forever or mean nothing), and returns its identity (FORMAT.md, "Opening").
pub fn stat_openable(path: &Path) -> Result<FileId> {
    use std::os::unix::fs::FileTypeExt;
    let metadata = std::fs::metadata(path).map_err(|source| Error::File {
        path: path.into(),
        op: "opening",
        source,
    })?;
    let t = metadata.file_type();
    if !t.is_file() && !t.is_block_device() {
        return Err(Error::Invalid {
            path: path.into(),
            reason: "not a regular file or block device".into(),
        });
    }
    Ok(FileId::of(&metadata))
}

/// Opens a regular file or block device for I/O, refusing any other type of file before
/// it is opened (see [`stat_openable`]). The open itself does not block (`O_NONBLOCK`,
/// cleared afterwards), and the opened file must be the one that was checked.
pub fn open_checked(path: &Path, writable: bool) -> Result<(std::fs::File, FileId)> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let checked = stat_openable(path)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| Error::File {
            path: path.into(),
            op: "opening",
            source,
        })?;
    let file_error = |op, source| Error::File {
        path: path.into(),
        op,
        source,
    };
    let metadata = file
        .metadata()
        .map_err(|e| file_error("reading metadata", e))?;
    let opened = FileId::of(&metadata);
    {
        use std::os::unix::fs::FileTypeExt;
        let t = metadata.file_type();
        if opened != checked || !(t.is_file() || t.is_block_device()) {
            return Err(Error::Invalid {
                path: path.into(),
                reason: "changed while it was being opened".into(),
            });
        }
    }
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor `file` owns, with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0
        // SAFETY: as above.
        || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0
    {
        return Err(file_error("opening", std::io::Error::last_os_error()));
    }
    Ok((file, opened))
}

/// Opens a file with the advisory lock qemu users expect: exclusive for writers, shared for
/// readers, none for force-share readers. Only regular files and block devices are opened
/// (see [`open_checked`]).
pub(crate) fn open_locked(
    path: &Path,
    writable: bool,
    force_share: bool,
) -> Result<(std::fs::File, FileId)> {
    let (file, id) = open_checked(path, writable)?;
    lock_file(&file, path, writable, force_share)?;
    Ok((file, id))
}

fn lock_file(file: &std::fs::File, path: &Path, writable: bool, force_share: bool) -> Result<()> {
    if force_share && !writable {
        return Ok(());
    }
    let r = if writable {
        file.try_lock()
    } else {
        file.try_lock_shared()
    };
    r.map_err(|_| Error::Locked {
        path: path.into(),
        kind: if writable { "write" } else { "shared" },
    })
}

/// Resolves a backing path recorded in `image`'s header: relative paths are relative to the
/// image's directory.
pub fn resolve_backing_path(image: &Path, recorded: &str) -> PathBuf {
    let p = Path::new(recorded);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new(".")).join(p)
    }
}

/// A qcow2 file opened as a cowimg image (a command that needs a cowimg image, given a
/// qcow2) is named for what it is, not reported as a cowimg image with a corrupt header.
/// Only the qcow2 magic at offset 0 with no cowimg magic in the second header slot counts:
/// any other damage to a cowimg header stays corruption.
pub(crate) fn refuse_a_qcow2(path: &Path, file: &std::fs::File) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let mut start = [0u8; 4];
    let mut second = [0u8; 8];
    let is_qcow2 =
        file.read_exact_at(&mut start, 0).is_ok() && crate::format::qcow2::has_magic(&start);
    let has_second_slot = file
        .read_exact_at(&mut second, HEADER_SLOT_SIZE as u64)
        .is_ok()
        && second == crate::format::header::MAGIC;
    if is_qcow2 && !has_second_slot {
        return Err(Error::Invalid {
            path: path.into(),
            reason: format!(
                "is a qcow2 image, not a cowimg image (put an overlay on it with `cowimg create -b {0} -F qcow2`, or convert it with `cowimg convert -O cowimg {0}`)",
                path.display()
            ),
        });
    }
    Ok(())
}

/// Figures `info` shows about the map and the file.
#[derive(Debug, Clone, Default)]
pub struct ImageStats {
    pub mapped_clusters: u64,
    /// Clusters without an entry that read as zeros (whole-cluster discards).
    pub zero_run_clusters: u64,
    pub host_clusters: u64,
    pub data_units: u64,
    pub zero_units: u64,
    pub file_length: u64,
    pub allocated_bytes: u64,
    pub journal_used: u64,
    pub journal_capacity: u64,
    pub generation: u64,
}

/// A journal's epoch: random, so that no block the guest wrote into a cluster that later
/// becomes journal space can pass for a record, even where holes cannot be punched.
pub(crate) fn random_epoch() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    h.write_u128(now.as_nanos());
    h.finish()
}

/// An I/O error on the image file `path`, naming what was done and where.
pub(crate) fn io_error(
    path: &Path,
    op: &'static str,
    offset: u64,
    source: std::io::Error,
) -> Error {
    Error::Io {
        path: path.into(),
        op,
        offset,
        source,
    }
}

/// A request must lie inside the virtual size.
pub(crate) fn check_request(path: &Path, offset: u64, length: u64, size: u64) -> Result<()> {
    match offset.checked_add(length) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange {
            path: path.into(),
            offset,
            length,
            size,
        }),
    }
}

/// Writes go to an image opened writable that has not failed (a failed flush whose
/// recovery failed too leaves it refusing changes until it is reopened).
pub(crate) fn check_may_write(path: &Path, read_only: bool, failed: bool) -> Result<()> {
    if read_only {
        return Err(Error::ReadOnly { path: path.into() });
    }
    if failed {
        return Err(Error::Failed { path: path.into() });
    }
    Ok(())
}
