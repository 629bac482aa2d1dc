//! The `cowimg` command line: clap definitions and glue over the library.
use clap::{Parser, Subcommand};
use std::process::ExitCode;

pub mod serve;

#[derive(Parser, Debug)]
#[command(
    name = "cowimg",
    version,
    about = "Block-level copy-on-write disk images",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve an image over NBD.
    Serve(serve::ServeArgs),
}

/// Runs the command line; errors print as one line on stderr.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cowimg: {e:#}");
            ExitCode::from(1)
        }
    }
}
