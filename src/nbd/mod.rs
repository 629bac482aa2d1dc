//! The NBD server (`cowimg serve`).
use crate::image::Image;
use std::path::PathBuf;
use std::sync::Arc;

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
    pub export_name: String,
    pub read_only: bool,
    pub max_connections: usize,
}

/// Serves `image` until SIGINT/SIGTERM, then flushes it, closes every client and returns.
pub fn serve(image: Arc<Image>, config: ServeConfig) -> crate::Result<()> {
    let _ = (image, config);
    todo!("serve")
}
