//! The NBD server (`cowimg serve`).
//!
//! It speaks the fixed newstyle handshake (EXPORT_NAME, ABORT, LIST, INFO, GO,
//! STRUCTURED_REPLY, LIST/SET_META_CONTEXT) and serves READ, WRITE (with FUA), FLUSH,
//! TRIM, WRITE_ZEROES (NO_HOLE, FAST_ZERO), CACHE, BLOCK_STATUS (REQ_ONE) and DISC, many
//! requests at a time on each of many connections. All connections to one export share
//! one [`Image`], and [`Image::flush`] makes every completed write durable whichever
//! connection made it, so every export advertises `NBD_FLAG_CAN_MULTI_CONN`.
//!
//! # Exports
//!
//! One process serves any number of exports ([`ServerSpec`]): images named on the command
//! line, the cowimg files of a directory, and overlays created on demand over one base
//! when a client asks for a name that does not exist yet. Backing layers are opened once
//! for all exports (a [`crate::image::LayerRegistry`]). A control socket
//! (`format-spec/CONTROL.md`) lists, adds, removes, flushes and snapshots exports while
//! they are served.
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
//! Every bound below is the server's, over all its exports together: a client of one export
//! cannot take more because there are many. A client that names a new export in
//! `--overlays` makes an overlay, at most [`OverlaySpec::max_exports`] in all.
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
mod control;
mod export;
mod handshake;
pub mod protocol;
mod server;
mod socket;
pub mod tls;

use crate::format::BackingFormat;
use crate::image::LayerRegistry;
use std::path::PathBuf;
use std::time::Duration;

pub use export::{validate_export_name, OverlaySpec, MAX_EXPORT_NAME};
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

/// One export named by the operator.
#[derive(Debug, Clone)]
pub struct ExportSpec {
    /// When empty (only for a server of one export), any name a client asks for is
    /// accepted, as `cowimg serve IMAGE` always did.
    pub name: String,
    pub image: PathBuf,
    /// The image's format (`-f`); `None` recognises cowimg and qcow2 by their magic and
    /// takes anything else as raw. Only cowimg images are served writable.
    pub format: Option<BackingFormat>,
    pub read_only: bool,
    /// Sent to clients that ask (NBD_INFO_DESCRIPTION, NBD_OPT_LIST); none by default, so
    /// nothing about the server's files is revealed unless the operator chooses to.
    pub description: Option<String>,
}

/// What a server exports.
#[derive(Debug, Clone, Default)]
pub struct ServerSpec {
    pub exports: Vec<ExportSpec>,
    /// Every cowimg file in this directory is an export named after its file; files that
    /// appear later are opened when a client asks for them.
    pub dir: Option<PathBuf>,
    /// A name nobody exports yet gets a new overlay over a base.
    pub overlays: Option<OverlaySpec>,
    /// The control socket (`format-spec/CONTROL.md`).
    pub control: Option<PathBuf>,
    /// The page cache of each version-2 image, in bytes (default 32 MiB).
    pub cache_size: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: Listen,
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
    /// `--tls`: off, on (STARTTLS offered) or require.
    pub tls_mode: tls::TlsMode,
    /// The certificates, when TLS is on or required.
    pub tls: Option<std::sync::Arc<tls::Credentials>>,
    /// Who may use which export: certificate common names.
    pub access: Access,
}

/// Client identities allowed per export (`--allow`). An export without a list of its own
/// takes the default list; without either, anyone may use it.
#[derive(Debug, Clone, Default)]
pub struct Access {
    pub default: Option<Vec<String>>,
    pub per_export: std::collections::HashMap<String, Vec<String>>,
}

impl Access {
    pub fn allowed(&self, export: &str) -> Option<Vec<String>> {
        self.per_export
            .get(export)
            .or(self.default.as_ref())
            .cloned()
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            listen: Listen::Tcp("127.0.0.1:10809".into()),
            max_connections: 16,
            max_connections_per_client: 8,
            handshake_timeout: Duration::from_secs(10),
            workers_per_connection: 16,
            io_timeout: Some(Duration::from_secs(60)),
            idle_timeout: None,
            tls_mode: tls::TlsMode::Off,
            tls: None,
            access: Access::default(),
        }
    }
}

/// Opens every export of `spec`, serves them until SIGINT/SIGTERM, then flushes them,
/// closes every client and returns.
///
/// It installs SIGINT/SIGTERM handlers for its duration, so only one `serve` may run in a
/// process at a time.
pub fn serve(spec: ServerSpec, config: ServeConfig) -> crate::Result<()> {
    let layers = LayerRegistry::new();
    let invalid = |path: &std::path::Path, reason: String| crate::error::Error::Invalid {
        path: path.into(),
        reason,
    };
    let exports = match spec.exports.as_slice() {
        [one] if one.name.is_empty() && spec.dir.is_none() && spec.overlays.is_none() => {
            let opts = crate::image::OpenOptions {
                read_only: one.read_only,
                layers: Some(std::sync::Arc::clone(&layers)),
                page_cache: Some(std::sync::Arc::new(crate::image::v2::PageCache::new(
                    spec.cache_size
                        .unwrap_or(crate::image::v2::DEFAULT_CACHE_SIZE),
                ))),
                ..Default::default()
            };
            let image = export::open_export_image(&one.image, one.format, &opts)?;
            let export = export::Export::new(String::new(), one.description.clone(), image);
            export::Exports::single(layers, export)
        }
        named => {
            let mut exports = export::Exports::new(layers, spec.dir.clone(), spec.overlays.clone());
            if let Some(bytes) = spec.cache_size {
                exports.page_cache = std::sync::Arc::new(crate::image::v2::PageCache::new(bytes));
            }
            // A name is a file name only where files are found or made by name; the one
            // export of `serve --export-name NAME IMAGE` may be called anything, as before.
            let names_are_paths = named.len() > 1 || spec.dir.is_some() || spec.overlays.is_some();
            for e in named {
                if names_are_paths {
                    validate_export_name(&e.name).map_err(|why| invalid(&e.image, why))?;
                }
                exports.add(&e.name, &e.image, e.read_only, e.description.clone())?;
            }
            if let Some(dir) = &spec.dir {
                open_directory(&exports, dir)?;
            }
            if let Some(o) = &spec.overlays {
                open_directory(&exports, &o.dir)?;
                check_base(o)?;
            }
            exports
        }
    };
    let mut exports = exports;
    exports.access = config.access.clone();
    server::serve(exports, config, spec.control)
}

/// Adds every cowimg file of `dir` whose name is a valid export name; other files are
/// skipped with a log line, so that a stray file does not stop the server.
fn open_directory(exports: &export::Exports, dir: &std::path::Path) -> crate::Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|source| crate::error::Error::File {
        path: dir.into(),
        op: "listing",
        source,
    })?;
    let mut names: Vec<(String, PathBuf)> = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(file) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        // Overlays made on demand are named NAME.cow and exported as NAME.
        let name = file.strip_suffix(".cow").unwrap_or(file).to_string();
        if file.starts_with('.') {
            continue;
        }
        if !export::is_exportable_file(&path) {
            eprintln!(
                "cowimg: {}: skipped, not a regular file or block device",
                path.display()
            );
            continue;
        }
        if let Err(why) = validate_export_name(&name) {
            eprintln!("cowimg: {}: skipped: {why}", path.display());
            continue;
        }
        names.push((name, path));
    }
    names.sort();
    for (name, path) in names {
        if exports.get(&name).is_some() {
            eprintln!(
                "cowimg: {}: skipped, an export named \"{name}\" exists already",
                path.display()
            );
            continue;
        }
        // cowimg images are exported writable; raw and qcow2 files read-only.
        let read_only = !export::is_cowimg_file(&path);
        exports.add(&name, &path, read_only, None)?;
    }
    Ok(())
}

/// The base of on-demand overlays must open before the first client asks for one.
fn check_base(spec: &OverlaySpec) -> crate::Result<()> {
    let opts = crate::image::OpenOptions {
        read_only: true,
        force_share: false,
        ..Default::default()
    };
    crate::image::Layer::open(&spec.base, spec.format, &opts).map(drop)
}
