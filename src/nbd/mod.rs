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
//! 4096 bytes; the handshake must finish within [`ServeConfig::handshake_timeout`].
//!
//! # Resources a client can hold
//!
//! Request data (WRITE payloads, READ replies) of all connections together stays under
//! 256 MiB: every connection has a floor of its own (256 MiB / 2 / max-connections, at most
//! 8 MiB) that no other client can take, and borrows from the shared rest above it, up to
//! 64 MiB per connection. A WRITE payload must arrive, and a reply be read, within
//! [`ServeConfig::io_timeout`] for the whole of it, or the client is disconnected and its
//! reservations freed. A client that has gone does not have its queued read-only requests
//! run. Buffers are kept while a connection is busy and freed after one second of quiet.
//! Connection slots: [`ServeConfig::max_connections`] in all and
//! [`ServeConfig::max_connections_per_client`] per IP address over TCP; idle clients may
//! stay unless [`ServeConfig::idle_timeout`] is set. Refusals are logged at most once a
//! second, with a count.
pub mod client;
mod connection;
mod handshake;
pub mod protocol;
mod server;
mod socket;
pub mod tls;

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
    /// Sent to clients that ask (NBD_INFO_DESCRIPTION, NBD_OPT_LIST); none by default, so
    /// nothing about the server's files is revealed unless the operator chooses to.
    pub description: Option<String>,
    pub read_only: bool,
    /// Clients connected at once; more are refused (accepted and closed at once).
    pub max_connections: usize,
    /// Connections one TCP client (an IP address) may hold at once; 0 for no limit besides
    /// `max_connections`. Unix socket clients are let in by the socket's file mode and are
    /// not counted per user.
    pub max_connections_per_client: usize,
    /// Time a client has to finish the handshake.
    pub handshake_timeout: Duration,
    /// Requests served at once on each connection (worker threads).
    pub workers_per_connection: usize,
    /// A client must send a whole WRITE payload, and read a whole reply, within this, or it
    /// is disconnected (and the memory its requests held is freed); `None` waits forever.
    pub io_timeout: Option<Duration>,
    /// A client that has no request in flight and sends nothing for this long is
    /// disconnected; `None` (the default) lets idle clients stay, as a kernel client with a
    /// mounted but unused file system does.
    pub idle_timeout: Option<Duration>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            listen: Listen::Tcp("127.0.0.1:10809".into()),
            export_name: String::new(),
            description: None,
            read_only: false,
            max_connections: 16,
            max_connections_per_client: 8,
            handshake_timeout: Duration::from_secs(10),
            workers_per_connection: 16,
            io_timeout: Some(Duration::from_secs(60)),
            idle_timeout: None,
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
