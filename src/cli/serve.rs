//! `cowimg serve`.
use super::source::{self, ImageFormat};
use crate::image::{Image, OpenOptions};
use crate::nbd::{Listen, ServeConfig};
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Format of IMAGE: only cowimg images can be served (probed when not given).
    #[arg(short = 'f', value_name = "FMT", value_parser = source::parse_image_format)]
    pub format: Option<ImageFormat>,
    /// Listen on a Unix socket at PATH.
    #[arg(long, value_name = "PATH", conflicts_with = "bind")]
    pub socket: Option<PathBuf>,
    /// Listen on HOST:PORT (port 0 picks a free port, printed at startup).
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:10809")]
    pub bind: String,
    /// Export name clients ask for (any name is accepted when empty).
    #[arg(long, default_value = "")]
    pub export_name: String,
    /// Description sent to clients that ask (NBD_INFO_DESCRIPTION, NBD_OPT_LIST), as
    /// qemu-nbd's --description; none unless given.
    #[arg(short = 'D', long, value_name = "TEXT", value_parser = parse_description)]
    pub description: Option<String>,
    /// Refuse writes.
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
    /// The image to serve.
    pub image: PathBuf,
}

fn parse_description(s: &str) -> Result<String, String> {
    if s.len() > 4096 {
        return Err(format!("{} bytes; at most 4096", s.len()));
    }
    Ok(s.to_string())
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

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let detected = source::detect(&args.image, args.format)?;
    let image = if args.read_only {
        // Any format can be read: a raw or qcow2 file is served through an empty overlay.
        source::open_read_only_image(&args.image, detected, false)?
    } else {
        source::refuse_probed_raw_writes(&args.image, detected, "serve without --read-only")?;
        source::require_cowimg(
            &args.image,
            detected,
            "serve without --read-only",
            "serve it with --read-only, or serve a cowimg overlay on it (create -b FILE -F raw)",
        )?;
        Image::open(&args.image, &OpenOptions::default())?
    };
    let image = Arc::new(image);
    let listen = if socket_activated() {
        Listen::Systemd
    } else if let Some(p) = args.socket {
        Listen::Unix(p)
    } else {
        Listen::Tcp(args.bind)
    };
    let config = ServeConfig {
        listen,
        export_name: args.export_name,
        description: args.description,
        read_only: args.read_only,
        max_connections: args.max_connections as usize,
        max_connections_per_client: args.max_connections_per_client as usize,
        io_timeout: seconds(args.io_timeout),
        idle_timeout: seconds(args.idle_timeout),
        handshake_timeout: Duration::from_secs(args.handshake_timeout),
        workers_per_connection: args.threads as usize,
    };
    crate::nbd::serve(image, config)?;
    Ok(ExitCode::SUCCESS)
}
