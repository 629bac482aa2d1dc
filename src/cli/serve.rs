//! `cowimg serve`.
use crate::image::{Image, OpenOptions};
use crate::nbd::{Listen, ServeConfig};
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
    /// Export name clients ask for (any name is accepted when empty).
    #[arg(long, default_value = "")]
    pub export_name: String,
    /// Refuse writes.
    #[arg(long)]
    pub read_only: bool,
    /// Most clients connected at once; more are refused.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_connections: u32,
    /// Seconds a client has to finish the handshake.
    #[arg(long, value_name = "SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub handshake_timeout: u64,
    /// Requests served at once on each connection.
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub threads: u32,
    /// The image to serve.
    pub image: PathBuf,
}

/// True when systemd passed us a socket: LISTEN_FDS is set and LISTEN_PID names this
/// process (a value meant for another process is ignored, as sd_listen_fds does).
fn socket_activated() -> bool {
    std::env::var_os("LISTEN_FDS").is_some()
        && std::env::var("LISTEN_PID").is_ok_and(|p| p.trim() == std::process::id().to_string())
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let opts = OpenOptions {
        read_only: args.read_only,
        ..Default::default()
    };
    let image = Arc::new(Image::open(&args.image, &opts)?);
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
        read_only: args.read_only,
        max_connections: args.max_connections as usize,
        handshake_timeout: Duration::from_secs(args.handshake_timeout),
        workers_per_connection: args.threads as usize,
        ..ServeConfig::default()
    };
    crate::nbd::serve(image, config)?;
    Ok(ExitCode::SUCCESS)
}
