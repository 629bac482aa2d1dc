//! `cowimg serve`.
use super::source::{self, ImageFormat};
use crate::format::BackingFormat;
use crate::nbd::tls::{Credentials, TlsMode};
use crate::nbd::{Access, ExportSpec, Listen, OverlaySpec, ServeConfig, ServerSpec};
use anyhow::bail;
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Listen on a Unix socket at PATH.
    #[arg(long, value_name = "PATH", conflicts_with = "bind")]
    pub socket: Option<PathBuf>,
    /// Listen on HOST:PORT (port 0 picks a free port, printed at startup).
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:10809")]
    pub bind: String,
    /// Export name clients ask for IMAGE by (any name is accepted when empty and IMAGE is
    /// the only export).
    #[arg(long, default_value = "")]
    pub export_name: String,
    /// Also export IMAGE as NAME; `NAME:ro=IMAGE` exports it read-only. Repeatable.
    #[arg(long = "export", value_name = "NAME=IMAGE", value_parser = parse_export)]
    pub exports: Vec<ExportSpec>,
    /// Export every image in DIR, named after its file (NAME.cow as NAME): cowimg images
    /// writable, raw and qcow2 files read-only. Files added later are opened when a client
    /// first asks for them.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// A client asking for a name nobody exports gets a new overlay DIR/NAME.cow over
    /// --base (created once, kept afterwards).
    #[arg(
        long,
        value_name = "DIR",
        requires = "base",
        conflicts_with = "read_only"
    )]
    pub overlays: Option<PathBuf>,
    /// The backing file of overlays made in --overlays.
    #[arg(long, value_name = "BASE", requires_all = ["overlays", "base_format"])]
    pub base: Option<PathBuf>,
    /// The format of --base: raw or cowimg (never probed).
    #[arg(short = 'F', long, value_name = "FMT", value_parser = super::parse_format, requires = "base")]
    pub base_format: Option<BackingFormat>,
    /// The format version of overlays made in --overlays: 1 (the default) or 2.
    #[arg(long = "format-version", value_name = "N", requires = "overlays",
          value_parser = super::create::parse_version)]
    pub format_version: Option<u32>,
    /// The map page cache of the server's version-2 images, exports and bases together
    /// (default 32M, like qcow2's L2 cache).
    #[arg(long = "cache-size", value_name = "SIZE", value_parser = super::size::parse_size)]
    pub cache_size: Option<u64>,
    /// Create no overlay in --overlays once the server has this many exports.
    #[arg(long, value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_exports: u32,
    /// Listen for control commands (`cowimg ctl`) on a Unix socket at PATH (mode 0600).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Description sent to clients that ask (NBD_INFO_DESCRIPTION, NBD_OPT_LIST), as
    /// qemu-nbd's --description; none unless given.
    #[arg(short = 'D', long, value_name = "TEXT", value_parser = parse_description)]
    pub description: Option<String>,
    /// Refuse writes (to IMAGE and every --export).
    #[arg(long)]
    pub read_only: bool,
    /// Most clients connected at once; more are refused.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_connections: u32,
    /// Most connections one TCP client (one IP address) may hold at once; 0 for no limit
    /// besides --max-connections. Unix socket clients are not counted per user.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u32).range(0..=4096))]
    pub max_connections_per_client: u32,
    /// Seconds a client has to send a whole WRITE payload and to read a whole reply before
    /// it is disconnected (0: wait for ever).
    #[arg(long, value_name = "SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(0..=86400))]
    pub io_timeout: u64,
    /// Disconnect a client that has no request in flight and sends nothing for this many
    /// seconds (0, the default: idle clients may stay, as a mounted kernel client does).
    #[arg(long, value_name = "SECONDS", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=31_536_000))]
    pub idle_timeout: u64,
    /// Seconds a client has to finish the handshake.
    #[arg(long, value_name = "SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub handshake_timeout: u64,
    /// Requests served at once on each connection.
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub threads: u32,
    /// TLS (NBD_OPT_STARTTLS), as nbdkit's --tls: off; on (clients may upgrade); require
    /// (every option but STARTTLS and ABORT is refused until they do). Needs
    /// --tls-certificates.
    #[arg(long, value_name = "off|on|require", default_value = "off", value_parser = parse_tls_mode)]
    pub tls: TlsMode,
    /// A directory with ca-cert.pem, server-cert.pem and server-key.pem (the layout nbdkit
    /// and qemu use). Read at start and again on SIGHUP.
    #[arg(long, value_name = "DIR")]
    pub tls_certificates: Option<PathBuf>,
    /// Require a client certificate signed by the CA in ca-cert.pem.
    #[arg(long)]
    pub tls_verify_peer: bool,
    /// Pre-shared keys (psktool's username:hexkey file): not supported (rustls has no
    /// external PSKs); refused with a message.
    #[arg(long, value_name = "FILE")]
    pub tls_psk: Option<PathBuf>,
    /// Client identities (certificate common names) allowed: `ID[,ID...]` for every export
    /// without a list of its own, `EXPORT=ID[,ID...]` for one export. Anyone else gets
    /// NBD_REP_ERR_POLICY and does not see the export in NBD_OPT_LIST. Repeatable.
    #[arg(long, value_name = "[EXPORT=]ID[,ID...]")]
    pub allow: Vec<String>,
    /// Format of IMAGE: cowimg, raw or qcow2 (probed when not given). Only cowimg images
    /// are served writable; the others need --read-only.
    #[arg(short = 'f', value_name = "FMT", value_parser = source::parse_image_format)]
    pub format: Option<ImageFormat>,
    /// The image to serve.
    pub image: Option<PathBuf>,
}

/// `NAME=IMAGE` or `NAME:ro=IMAGE`; the name is checked here so a typo fails at once.
fn parse_export(s: &str) -> Result<ExportSpec, String> {
    let Some((name, image)) = s.split_once('=') else {
        return Err("expected NAME=IMAGE".into());
    };
    let (name, read_only) = match name.strip_suffix(":ro") {
        Some(n) => (n, true),
        None => (name, false),
    };
    crate::nbd::validate_export_name(name)?;
    if image.is_empty() {
        return Err(format!("no image given for export \"{name}\""));
    }
    Ok(ExportSpec {
        name: name.to_string(),
        image: image.into(),
        format: None,
        read_only,
        description: None,
    })
}

fn parse_tls_mode(s: &str) -> Result<TlsMode, String> {
    TlsMode::parse(s).ok_or_else(|| format!("'{s}': expected off, on or require"))
}

/// `--allow` values: a default list, and lists per export.
fn access(allow: &[String]) -> anyhow::Result<Access> {
    let mut access = Access::default();
    for item in allow {
        let (export, ids) = match item.split_once('=') {
            Some((export, ids)) => (Some(export), ids),
            None => (None, item.as_str()),
        };
        let ids: Vec<String> = ids
            .split(',')
            .filter(|id| !id.is_empty())
            .map(str::to_string)
            .collect();
        if ids.is_empty() {
            bail!("--allow {item}: no identity given");
        }
        match export {
            Some(name) => access
                .per_export
                .entry(name.to_string())
                .or_default()
                .extend(ids),
            None => access.default.get_or_insert_with(Vec::new).extend(ids),
        }
    }
    Ok(access)
}

fn parse_description(s: &str) -> Result<String, String> {
    if s.len() > 4096 {
        return Err(format!("{} bytes; at most 4096", s.len()));
    }
    Ok(s.to_string())
}

/// True for an address on the loopback interface (127.0.0.0/8, ::1, localhost).
fn is_loopback(addr: &str) -> bool {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .map(|mut a| a.all(|a| a.ip().is_loopback()))
        .unwrap_or(false)
}

/// Zero means "no limit".
fn seconds(n: u64) -> Option<Duration> {
    (n > 0).then(|| Duration::from_secs(n))
}

/// True when systemd passed us a socket: LISTEN_FDS is set and LISTEN_PID names this
/// process (a value meant for another process is ignored, as sd_listen_fds does).
fn socket_activated() -> bool {
    std::env::var_os("LISTEN_FDS").is_some()
        && std::env::var("LISTEN_PID").is_ok_and(|p| p.trim() == std::process::id().to_string())
}

/// Raises the soft limit on open files to the hard one, as daemons do: every export holds
/// two descriptors (the image and its lock), and a thousand exports pass the usual soft
/// limit of 1024 long before the hard one.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write only the live local `limit`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Caps glibc's malloc arenas at two unless `MALLOC_ARENA_MAX` says otherwise. By default
/// each of the server's worker threads may get an arena of its own (up to 8 per core), and
/// each arena keeps the memory of the map pages it decoded after the cache evicted them:
/// with 4M clusters, random reads took a version-2 server to 100-106 MiB with the default
/// and 44-57 MiB with two arenas, at about the same read rate (benches/ANALYSIS.md).
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a tunable of the allocator; it is called before the
        // server starts its threads and touches no memory of ours.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    raise_open_file_limit();
    limit_malloc_arenas();
    let mut exports = Vec::new();
    if let Some(image) = args.image {
        if args.export_name.is_empty()
            && (!args.exports.is_empty() || args.dir.is_some() || args.overlays.is_some())
        {
            bail!("IMAGE needs a name (--export-name) when the server has other exports");
        }
        exports.push(ExportSpec {
            name: args.export_name,
            format: args.format.map(|f| match f {
                ImageFormat::Cowimg => BackingFormat::Cowimg,
                ImageFormat::Raw => BackingFormat::Raw,
                ImageFormat::Qcow2 => BackingFormat::Qcow2,
            }),
            image,
            read_only: args.read_only,
            description: args.description,
        });
    } else if args.description.is_some() || !args.export_name.is_empty() {
        bail!("--export-name and --description apply to IMAGE, and none was given");
    }
    for mut e in args.exports {
        e.read_only |= args.read_only;
        exports.push(e);
    }
    if exports.is_empty() && args.dir.is_none() && args.overlays.is_none() {
        bail!("nothing to serve: give IMAGE, --export NAME=IMAGE, --dir or --overlays");
    }
    let overlays = match (args.overlays, args.base, args.base_format) {
        (Some(dir), Some(base), Some(format)) => Some(OverlaySpec {
            dir,
            base,
            format,
            max_exports: args.max_exports as usize,
            version: args.format_version.unwrap_or(1),
        }),
        _ => None,
    };
    let spec = ServerSpec {
        exports,
        dir: args.dir,
        overlays,
        control: args.control,
        cache_size: args.cache_size,
    };
    let listen = if socket_activated() {
        Listen::Systemd
    } else if let Some(p) = args.socket {
        Listen::Unix(p)
    } else {
        Listen::Tcp(args.bind)
    };
    if args.tls_psk.is_some() {
        bail!(
            "--tls-psk: pre-shared keys are not supported (rustls, cowimg's TLS stack, has no \
             external PSKs); use --tls-certificates"
        );
    }
    let credentials = match (args.tls, &args.tls_certificates) {
        (TlsMode::Off, _) => None,
        (_, None) => bail!("--tls={} needs --tls-certificates DIR", args.tls.name()),
        (_, Some(dir)) => Some(Arc::new(
            Credentials::load(dir, args.tls_verify_peer).map_err(|e| anyhow::anyhow!(e))?,
        )),
    };
    if args.tls_verify_peer && args.tls == TlsMode::Off {
        bail!("--tls-verify-peer needs --tls=on or --tls=require");
    }
    let access = access(&args.allow)?;
    if (access.default.is_some() || !access.per_export.is_empty()) && !args.tls_verify_peer {
        bail!("--allow names client certificates: it needs --tls-verify-peer");
    }
    if let Listen::Tcp(addr) = &listen {
        if args.tls != TlsMode::Require && !is_loopback(addr) {
            eprintln!(
                "cowimg: warning: serving on {addr} without --tls=require: anyone who can reach \
                 it reads and writes the disks in plain text"
            );
        }
    }
    let config = ServeConfig {
        tls_mode: args.tls,
        tls: credentials,
        access,
        listen,
        max_connections: args.max_connections as usize,
        max_connections_per_client: args.max_connections_per_client as usize,
        io_timeout: seconds(args.io_timeout),
        idle_timeout: seconds(args.idle_timeout),
        handshake_timeout: Duration::from_secs(args.handshake_timeout),
        workers_per_connection: args.threads as usize,
    };
    crate::nbd::serve(spec, config)?;
    Ok(ExitCode::SUCCESS)
}
