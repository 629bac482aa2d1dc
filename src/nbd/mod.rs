//! The NBD server (`cowimg serve`).
//!
//! It speaks the fixed newstyle handshake (EXPORT_NAME, ABORT, LIST, INFO, GO,
//! STRUCTURED_REPLY, LIST/SET_META_CONTEXT) and serves READ, WRITE (with FUA), FLUSH,
//! TRIM, WRITE_ZEROES (NO_HOLE, FAST_ZERO), CACHE, BLOCK_STATUS (REQ_ONE) and DISC, many
//! requests at a time on each of many connections. All connections share one [`Image`],
//! and [`Image::flush`] makes every completed write durable whichever connection made it,
//! so the export advertises `NBD_FLAG_CAN_MULTI_CONN`.
//!
//! # Meta contexts
//!
//! - `base:allocation`, as the NBD spec defines it: data ranges have flags 0; ranges that
//!   read as zeros (zero markers, discarded ranges, holes of a raw backing file) and ranges
//!   no layer holds have `NBD_STATE_HOLE | NBD_STATE_ZERO` (3).
//! - `cowimg:layer`: which layer of the backing chain decides the contents of each range,
//!   like qemu's `qemu:allocation-depth`. The value is 0 when no layer holds the range (it
//!   reads as zeros because nothing was ever written there), 1 when the image being served
//!   holds it (data or a zero marker), 2 when its backing file does, 3 for the backing
//!   file's backing file, and so on. A raw backing file holds every byte it has, holes
//!   included. `LIST_META_CONTEXT` with the query `cowimg:` lists it.
//!
//! # Limits
//!
//! Block sizes advertised: minimum 1, preferred 4096, maximum 32 MiB; a WRITE payload
//! above the maximum ends the connection, a READ or CACHE above it gets `EINVAL`, TRIM and
//! WRITE_ZEROES may be any length. Option payloads are capped at 64 KiB and strings at
//! 4096 bytes; the handshake must finish within [`ServeConfig::handshake_timeout`]. Each
//! connection may hold 64 MiB of request data at once and the whole server 256 MiB.
mod connection;
mod handshake;
pub mod protocol;
mod server;
mod socket;

use crate::image::Image;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use handshake::{CONTEXT_ALLOCATION, CONTEXT_LAYER};

/// Where the server listens.
#[derive(Debug, Clone)]
pub enum Listen {
    /// host:port, default 127.0.0.1:10809.
    Tcp(String),
    Unix(PathBuf),
    /// A listening socket passed by systemd (LISTEN_FDS/LISTEN_PID).
    Systemd,
}

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: Listen,
    /// The export's name; when empty, any name a client asks for is accepted.
    pub export_name: String,
    pub read_only: bool,
    /// Clients connected at once; more are refused (accepted and closed at once).
    pub max_connections: usize,
    /// Time a client has to finish the handshake.
    pub handshake_timeout: Duration,
    /// Requests served at once on each connection (worker threads).
    pub workers_per_connection: usize,
    /// A client that leaves a reply unread this long is disconnected; `None` waits forever.
    pub reply_timeout: Option<Duration>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            listen: Listen::Tcp("127.0.0.1:10809".into()),
            export_name: String::new(),
            read_only: false,
            max_connections: 16,
            handshake_timeout: Duration::from_secs(10),
            workers_per_connection: 16,
            reply_timeout: Some(Duration::from_secs(120)),
        }
    }
}

/// Serves `image` until SIGINT/SIGTERM, then flushes it, closes every client and returns.
///
/// It installs SIGINT/SIGTERM handlers for its duration, so only one `serve` may run in a
/// process at a time.
pub fn serve(image: Arc<Image>, mut config: ServeConfig) -> crate::Result<()> {
    // An image opened read-only is exported read-only, so clients know before they write.
    config.read_only |= image.is_read_only();
    server::serve(image, config)
}
