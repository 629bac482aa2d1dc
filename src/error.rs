//! The library's error type. Every variant that concerns a file names it, and the offset
//! within it where there is one, so that a user knows what is damaged and where.
use crate::format::FormatError;
use std::io;
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {op} at offset {offset:#x}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {op}: {source}")]
    File {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{path}: corrupt {structure} at offset {offset:#x}: {source}")]
    Corrupt {
        path: PathBuf,
        structure: &'static str,
        offset: u64,
        #[source]
        source: FormatError,
    },
    #[error("{path}: corrupt image: {reason}")]
    Inconsistent { path: PathBuf, reason: String },
    /// The command line adds the flag that reads it anyway, where the command has one.
    #[error("{path}: image is in use by another process (could not get a {kind} lock)")]
    Locked { path: PathBuf, kind: &'static str },
    #[error("{path}: request at offset {offset:#x} length {length:#x} is beyond the end of the image ({size:#x} bytes)")]
    OutOfRange {
        path: PathBuf,
        offset: u64,
        length: u64,
        size: u64,
    },
    #[error("{path}: image is read-only")]
    ReadOnly { path: PathBuf },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{path}: an earlier flush failed and so did going back to the last durable state; the image refuses further changes until it is reopened")]
    Failed { path: PathBuf },
    /// A flush failed; the image went back to the state of the last completed flush, so the
    /// writes since then are lost (and reported as such to whoever made them).
    #[error("{source}; went back to the last flushed state: writes since the last successful flush are lost")]
    Reverted {
        path: PathBuf,
        #[source]
        source: Box<Error>,
    },
}

impl Error {
    /// The errno an NBD server should answer with.
    pub fn errno(&self) -> i32 {
        match self {
            Error::OutOfRange { .. } => libc::EINVAL,
            Error::ReadOnly { .. } => libc::EPERM,
            Error::Io { source, .. } | Error::File { source, .. } => match source.raw_os_error() {
                Some(libc::ENOSPC) => libc::ENOSPC,
                _ => libc::EIO,
            },
            Error::Reverted { source, .. } => source.errno(),
            _ => libc::EIO,
        }
    }
}
