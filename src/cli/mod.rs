//! The `cowimg` command line: clap definitions and glue over the library. Each subcommand
//! lives in its own file; flags, output and exit codes follow qemu-img and qemu-io.
use crate::format::BackingFormat;
use crate::image::{Image, OpenOptions};
use anyhow::bail;
use clap::{Parser, Subcommand};
use std::path::Path;
use std::process::ExitCode;

pub mod check;
pub mod commit;
pub mod convert;
pub mod create;
pub mod ctl;
pub mod info;
pub mod io;
pub mod map;
pub mod progress;
pub mod rebase;
pub mod serve;
pub mod size;

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
    /// Create a new image, empty or as an overlay on a backing file.
    Create(create::CreateArgs),
    /// Run read, write, discard and flush commands against an image (like qemu-io).
    Io(io::IoArgs),
    /// Show an image's size, allocation and backing file (like qemu-img info).
    Info(info::InfoArgs),
    /// Show where each range of the image comes from (like qemu-img map).
    Map(map::MapArgs),
    /// Verify an image's metadata; exit 2 on corruption, 3 on leaks only.
    Check(check::CheckArgs),
    /// Write an overlay's changes into its backing file.
    Commit(commit::CommitArgs),
    /// Change an image's backing file.
    Rebase(rebase::RebaseArgs),
    /// Copy an image (with its backing chain merged) to a new raw or cowimg file.
    Convert(convert::ConvertArgs),
    /// Serve images over NBD: one, or many exports in one process.
    Serve(serve::ServeArgs),
    /// Send a command to a running server's control socket (list, stats, add, remove,
    /// flush, snapshot).
    Ctl(ctl::CtlArgs),
}

/// Runs the command line; errors print as one line on stderr.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Usage errors exit 1 as qemu-img's do: 2 and 3 mean corruption and leaks to
            // `check`, and scripts test for them.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(cli.command) {
        Ok(code) => code,
        // `cowimg map | head` is not an error.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cowimg: {}", one_line(&e));
            ExitCode::from(1)
        }
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Create(args) => create::run(args),
        Command::Io(args) => io::run(args),
        Command::Info(args) => info::run(args),
        Command::Map(args) => map::run(args),
        Command::Check(args) => check::run(args),
        Command::Commit(args) => commit::run(args),
        Command::Rebase(args) => rebase::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Ctl(args) => ctl::run(args),
    }
}

/// The error and its causes on one line. The library's messages already include their
/// source, so a cause is only appended when the line does not say it yet.
pub fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string().replace('\n', " ");
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Only an error of our own output counts: those reach here as a bare io::Error, while a
/// library error (say, a peer closing a socket) is wrapped and must still be reported.
fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error
        .downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

/// Parses `-F`/`-f` values.
pub fn parse_format(text: &str) -> Result<BackingFormat, String> {
    BackingFormat::parse(text)
        .ok_or_else(|| format!("unknown format '{text}': expected raw or cowimg"))
}

/// Pairs `-b` with `-F`. The backing format is recorded in the header and never probed, so
/// it must be given whenever a backing file is (qemu-img refuses the same way).
pub fn backing_option(
    backing: Option<String>,
    format: Option<BackingFormat>,
) -> anyhow::Result<Option<(String, BackingFormat)>> {
    match (backing, format) {
        (None, None) => Ok(None),
        (None, Some(_)) => bail!("-F (backing format) needs -b (backing file)"),
        (Some(path), None) => bail!(
            "backing format must be given with -F raw or -F cowimg for backing file '{path}' \
             (the format is recorded, never probed)"
        ),
        (Some(path), Some(format)) => Ok(Some((path, format))),
    }
}

/// Opens an image for an inspecting command: read-only, with a shared lock unless
/// `force_share` (`-U`), with its backing chain.
pub fn open_read_only(path: &Path, force_share: bool) -> anyhow::Result<Image> {
    let opts = OpenOptions {
        read_only: true,
        force_share,
        ..Default::default()
    };
    Ok(Image::open(path, &opts)?)
}

/// Opens an image without its backing chain, as `qemu-img info` and `rebase -u` do (see
/// [`OpenOptions::without_backing`](crate::image::OpenOptions)).
pub fn open_without_backing(
    path: &Path,
    writable: bool,
    force_share: bool,
) -> anyhow::Result<Image> {
    let opts = crate::image::OpenOptions {
        read_only: !writable,
        force_share,
        without_backing: true,
        ..Default::default()
    };
    Ok(Image::open(path, &opts)?)
}

/// Writes JSON indented by four spaces, as qemu-img prints it, and a final newline.
pub fn print_json(
    out: &mut impl std::io::Write,
    value: &impl serde::Serialize,
) -> anyhow::Result<()> {
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut text = Vec::new();
    value.serialize(&mut serde_json::Serializer::with_formatter(
        &mut text, formatter,
    ))?;
    text.push(b'\n');
    // Written in one piece so that a closed pipe shows up as an io::Error.
    out.write_all(&text)?;
    Ok(())
}
