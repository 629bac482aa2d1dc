//! The small I/O interface under the image layer: bytes at offsets, a durability barrier,
//! and hole punching. Tests implement it to inject errors and simulate power loss.
use nix::fcntl::PosixFadviseAdvice;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::sync::Mutex;

#[allow(clippy::len_without_is_empty)] // a file's length, not a collection's
pub trait Storage: Send + Sync {
    /// Reads exactly `buf.len()` bytes; reading past the end is an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf`, extending the file when needed. Not durable until `sync`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable (fdatasync).
    fn sync(&self) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    /// Deallocates a range so that it reads as zeros, without changing the length.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// The next offset at or after `offset` that holds data (SEEK_DATA), if any. Storage
    /// that cannot tell reports everything as data.
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        Ok((offset < self.len()?).then_some(offset))
    }
    /// The first offset in `[offset, offset + len)` that lies in a hole (SEEK_HOLE), if any.
    /// Storage that cannot tell has no holes. The range must lie inside the storage.
    fn first_hole_in(&self, _offset: u64, _len: u64) -> io::Result<Option<u64>> {
        Ok(None)
    }
    /// Bytes allocated on the device, for `info`'s actual size.
    fn allocated_bytes(&self) -> io::Result<u64> {
        self.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Reserves the blocks of a range without changing the length or the contents
    /// (`fallocate` with `FALLOC_FL_KEEP_SIZE`), so that later writes there cannot fail
    /// for lack of space. Storage that cannot reserve does nothing.
    fn reserve(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// Hints that a range will be read soon (the kernel starts reading it ahead).
    fn will_need(&self, _offset: u64, _len: u64) {}
    /// Hints that a range will not be read again (the kernel may drop it from its cache).
    fn wont_need(&self, _offset: u64, _len: u64) {}
}

/// A regular file, read and written with pread/pwrite.
pub struct FileStorage {
    file: File,
}

impl FileStorage {
    pub fn new(file: File) -> Self {
        FileStorage { file }
    }
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        file_size(&self.file)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        use nix::fcntl::{fallocate, FallocateFlags};
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match fallocate(self.file.as_raw_fd(), flags, offset as i64, len as i64) {
            Ok(()) => Ok(()),
            // A file system without hole punching keeps the bytes; they are unreferenced
            // either way, so this only costs space.
            Err(nix::errno::Errno::EOPNOTSUPP) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
    fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        use nix::fcntl::{fallocate, FallocateFlags};
        match fallocate(
            self.file.as_raw_fd(),
            FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset as i64,
            len as i64,
        ) {
            Ok(()) | Err(nix::errno::Errno::EOPNOTSUPP) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        next_data_in(&self.file, offset)
    }
    fn first_hole_in(&self, offset: u64, len: u64) -> io::Result<Option<u64>> {
        if len == 0 || is_block_device(&self.file)? {
            return Ok(None);
        }
        let hole = next_hole_in(&self.file, offset)?;
        Ok((hole < offset.saturating_add(len)).then_some(hole))
    }
    fn allocated_bytes(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let metadata = self.file.metadata()?;
        if metadata.file_type().is_block_device() {
            return file_size(&self.file);
        }
        Ok(metadata.blocks() * 512)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
    fn will_need(&self, offset: u64, len: u64) {
        self.advise(offset, len, PosixFadviseAdvice::POSIX_FADV_WILLNEED);
    }
    fn wont_need(&self, offset: u64, len: u64) {
        self.advise(offset, len, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
    }
}

impl FileStorage {
    fn advise(&self, offset: u64, len: u64, advice: PosixFadviseAdvice) {
        // Only a hint: a failure costs speed, never data.
        let _ = nix::fcntl::posix_fadvise(self.file.as_raw_fd(), offset as i64, len as i64, advice);
    }
}

/// Whether `file` is a block device (whose metadata says nothing of its size or holes).
pub fn is_block_device(file: &File) -> io::Result<bool> {
    Ok(file.metadata()?.file_type().is_block_device())
}

/// The size of a regular file or a block device. A block device's metadata gives 0; its
/// size is where SEEK_END puts the offset (reads use pread, so moving it is harmless).
pub fn file_size(file: &File) -> io::Result<u64> {
    let metadata = file.metadata()?;
    if !metadata.file_type().is_block_device() {
        return Ok(metadata.len());
    }
    let end = nix::unistd::lseek(file.as_raw_fd(), 0, nix::unistd::Whence::SeekEnd)?;
    Ok(end as u64)
}

/// SEEK_DATA on a file: `None` when only a hole remains. A block device is all data.
pub fn next_data_in(file: &File, offset: u64) -> io::Result<Option<u64>> {
    use nix::unistd::{lseek, Whence};
    if is_block_device(file)? {
        return Ok((offset < file_size(file)?).then_some(offset));
    }
    match lseek(file.as_raw_fd(), offset as i64, Whence::SeekData) {
        Ok(pos) => Ok(Some(pos as u64)),
        Err(nix::errno::Errno::ENXIO) => Ok(None),
        Err(nix::errno::Errno::EINVAL) => Ok(Some(offset)),
        Err(e) => Err(e.into()),
    }
}

/// SEEK_HOLE on a file: the end of the data run that starts at `offset`. A block device
/// has no holes.
pub fn next_hole_in(file: &File, offset: u64) -> io::Result<u64> {
    use nix::unistd::{lseek, Whence};
    if is_block_device(file)? {
        return Ok(file_size(file)?.max(offset));
    }
    match lseek(file.as_raw_fd(), offset as i64, Whence::SeekHole) {
        Ok(pos) => Ok(pos as u64),
        // Past the end (ENXIO) the rest is the implicit hole at the end.
        Err(nix::errno::Errno::ENXIO) => Ok(offset),
        Err(nix::errno::Errno::EINVAL) => Ok(file.metadata()?.len()),
        Err(e) => Err(e.into()),
    }
}

/// An in-memory file, for tests and fuzzing.
#[derive(Default)]
pub struct MemStorage {
    bytes: Mutex<Vec<u8>>,
}

impl MemStorage {
    pub fn new(bytes: Vec<u8>) -> Self {
        MemStorage {
            bytes: Mutex::new(bytes),
        }
    }
    pub fn contents(&self) -> Vec<u8> {
        self.bytes.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.bytes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Applies a write to a byte vector the way a file would: extending it with zeros.
pub fn apply_write(bytes: &mut Vec<u8>, buf: &[u8], offset: u64) {
    let end = offset as usize + buf.len();
    if bytes.len() < end {
        bytes.resize(end, 0);
    }
    bytes[offset as usize..end].copy_from_slice(buf);
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let b = self.lock();
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= b.len() as u64);
        match end {
            Some(end) => {
                buf.copy_from_slice(&b[offset as usize..end as usize]);
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end",
            )),
        }
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        apply_write(&mut self.lock(), buf, offset);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().len() as u64)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut b = self.lock();
        let start = (offset as usize).min(b.len());
        let end = (offset.saturating_add(len) as usize).min(b.len());
        b[start..end].fill(0);
        Ok(())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.lock().resize(len as usize, 0);
        Ok(())
    }
}
