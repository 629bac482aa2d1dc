//! `cowimg serve`.
use crate::image::{Image, OpenOptions};
use crate::nbd::{Listen, ServeConfig};
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Listen on a Unix socket at PATH.
    #[arg(long, value_name = "PATH", conflicts_with = "bind")]
    pub socket: Option<PathBuf>,
    /// Listen on HOST:PORT.
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:10809")]
    pub bind: String,
    /// Export name clients ask for (any name is accepted when empty).
    #[arg(long, default_value = "")]
    pub export_name: String,
    /// Refuse writes.
    #[arg(long)]
    pub read_only: bool,
    /// Most clients connected at once.
    #[arg(long, default_value_t = 16)]
    pub max_connections: usize,
    pub image: PathBuf,
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let opts = OpenOptions {
        read_only: args.read_only,
        ..Default::default()
    };
    let image = Arc::new(Image::open(&args.image, &opts)?);
    let listen = if std::env::var_os("LISTEN_FDS").is_some() {
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
        max_connections: args.max_connections,
    };
    crate::nbd::serve(image, config)?;
    Ok(ExitCode::SUCCESS)
}
