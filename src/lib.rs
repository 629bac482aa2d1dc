//! cowimg: block-level copy-on-write disk images.
//!
//! - [`format`](mod@format): the on-disk structures, bytes to structs and back (no I/O);
//! - [`storage`]: the small I/O trait the image layer runs on;
//! - [`image`]: the extent map, copy-on-write, allocation, the flush protocol, backing
//!   chains, and the whole-image operations (commit, rebase, convert, check);
//! - [`nbd`]: the NBD server;
//! - [`cli`]: the `cowimg` command line.
//!
//! ```no_run
//! use cowimg::image::{CreateOptions, Image, OpenOptions};
//! use std::path::Path;
//! let path = Path::new("disk.cow");
//! Image::create(path, &CreateOptions { size: Some(1 << 30), ..Default::default() })?;
//! let image = Image::open(path, &OpenOptions::default())?;
//! image.write_at(b"hello", 4096)?;
//! image.flush()?;
//! # Ok::<(), cowimg::Error>(())
//! ```
pub mod cli;
pub mod error;
pub mod format;
pub mod image;
pub mod nbd;
pub mod storage;

pub use error::{Error, Result};
