//! The `cowimg` command line: clap definitions and glue over the library. Each subcommand
//! lives in its own file; flags, output and exit codes follow qemu-img and qemu-io.
use crate::format::BackingFormat;
use crate::image::{Image, OpenOptions};
use anyhow::bail;
use clap::{Parser, Subcommand};
use std::path::Path;
use std::process::ExitCode;

pub mod amend;
pub mod attach;
pub mod check;
pub mod commit;
pub mod compare;
pub mod convert;
pub mod create;
pub mod ctl;
pub mod info;
pub mod io;
pub mod map;
pub mod measure;
pub mod progress;
pub mod rebase;
pub mod resize;
pub mod serve;
pub mod size;
pub mod source;

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
    /// Compare the contents of two images (exit 0 identical, 1 different, 2 error).
    Compare(compare::CompareArgs),
    /// How large a file an image needs in a given output format (like qemu-img measure).
    Measure(measure::MeasureArgs),
    /// Grow or shrink an image's virtual size (like qemu-img resize).
    Resize(resize::ResizeArgs),
    /// Change an image's format options in place: --upgrade to format version 2 (like
    /// qemu-img amend).
    Amend(amend::AmendArgs),
    /// Serve images over NBD: one, or many exports in one process.
    Serve(Box<serve::ServeArgs>),
    /// Serve an image (or use an NBD export) and attach it as a block device; prints the
    /// device (like qemu-nbd -c).
    Attach(attach::AttachArgs),
    /// Flush and detach a device made by attach, and stop what attach started.
    Detach(attach::DetachArgs),
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
    let hint = cli.command.force_share_hint();
    let io = matches!(cli.command, Command::Io(_));
    // compare's errors exit 2: 1 means "the images differ" to it, as to qemu-img.
    let error_code = match cli.command {
        Command::Compare(_) => compare::EXIT_ERROR,
        _ => 1,
    };
    match run(cli.command) {
        Ok(code) => code,
        // `cowimg map | head` is not an error.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let mut line = one_line(&e);
            if let (Some(flag), true) = (hint, is_lock_conflict(&e, io)) {
                line += &format!("; use {flag} to read it anyway");
            }
            eprintln!("cowimg: {line}");
            ExitCode::from(error_code)
        }
    }
}

impl Command {
    /// The flag that reads an image another process holds, for the commands that have
    /// one: the "image is in use" error names it, and only where it exists.
    fn force_share_hint(&self) -> Option<&'static str> {
        match self {
            Command::Info(_)
            | Command::Map(_)
            | Command::Convert(_)
            | Command::Compare(_)
            | Command::Measure(_) => Some("-U (--force-share)"),
            Command::Check(args) if !args.repair => Some("-U (--force-share)"),
            Command::Io(_) => Some("-r -U (read-only, --force-share)"),
            _ => None,
        }
    }
}

/// A lock another process holds, where -U would help: a shared lock refused to a reader
/// (a write lock refused to `convert -n`'s target, say, is not), or anything for io, whose
/// hint says to open read-only as well.
fn is_lock_conflict(error: &anyhow::Error, io: bool) -> bool {
    error.chain().any(|cause| {
        matches!(cause.downcast_ref(), Some(crate::Error::Locked { kind, .. }) if io || *kind == "shared")
    })
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
        Command::Compare(args) => compare::run(args),
        Command::Measure(args) => measure::run(args),
        Command::Resize(args) => resize::run(args),
        Command::Amend(args) => amend::run(args),
        Command::Serve(args) => serve::run(*args),
        Command::Attach(args) => attach::attach(args),
        Command::Detach(args) => attach::detach(args),
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
        .ok_or_else(|| format!("unknown format '{text}': expected raw, cowimg or qcow2"))
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
            "backing format must be given with -F raw, -F cowimg or -F qcow2 for backing file '{path}' \
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

/// `--output=human|json` as qemu-img takes it, with the older `--json` kept as an alias.
#[derive(clap::Args, Debug, Clone)]
pub struct OutputArg {
    /// Output format: human or json (qemu-img's field names).
    #[arg(long = "output", value_name = "FMT", value_parser = ["human", "json"], default_value = "human")]
    output: String,
    /// The same as --output=json.
    #[arg(long)]
    json: bool,
}

impl OutputArg {
    pub fn is_json(&self) -> bool {
        self.json || self.output == "json"
    }
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
