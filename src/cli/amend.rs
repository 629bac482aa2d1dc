//! `cowimg amend`: change an image's format options in place, as `qemu-img amend`. The one
//! option is the format version: `--upgrade` (or `-o version=2`) converts a version-1
//! image to version 2 without moving its data (FORMAT-v2.md, "Upgrade").
use super::source::{self, ImageFormat};
use crate::image::{open_locked, v2};
use crate::storage::{FileStorage, Storage};
use anyhow::{bail, Context};
use clap::Args;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  cowimg amend --upgrade disk.cow\n  \
    cowimg amend -o version=2 disk.cow\n\n\
    The upgrade is crash-safe: until its last header write is durable the image is the \
    version-1 image it was; after it, version 2. A build that predates version 2 refuses an \
    upgraded image (unsupported format version 2).")]
pub struct AmendArgs {
    /// Format of IMAGE: only cowimg images are amended.
    #[arg(short = 'f', value_name = "FMT", value_parser = source::parse_image_format)]
    pub format: Option<ImageFormat>,
    /// Convert a version-1 image to version 2 in place.
    #[arg(long)]
    pub upgrade: bool,
    /// Format options as KEY=VALUE: version=2 (the same as --upgrade).
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Print nothing on success.
    #[arg(short = 'q', long)]
    pub quiet: bool,
    pub image: PathBuf,
}

fn wanted_version(args: &AmendArgs) -> anyhow::Result<u32> {
    let mut version = args.upgrade.then_some(2);
    for item in args.options.iter().flat_map(|o| o.split(',')) {
        let (key, value) = item
            .split_once('=')
            .with_context(|| format!("-o {item}: expected KEY=VALUE"))?;
        match key {
            "version" => {
                let v = super::create::parse_version(value)
                    .map_err(|e| anyhow::anyhow!("-o {item}: {e}"))?;
                version = Some(v);
            }
            _ => bail!("-o {key}: unknown option; cowimg amend takes version"),
        }
    }
    version.context("nothing to amend: give --upgrade or -o version=2")
}

pub fn run(args: AmendArgs) -> anyhow::Result<ExitCode> {
    let version = wanted_version(&args)?;
    let path = &args.image;
    let detected = source::detect(path, args.format)?;
    if detected.format != ImageFormat::Cowimg {
        bail!(
            "{}: amend changes cowimg images only, not {}",
            path.display(),
            detected.format.name()
        );
    }
    let (file, _) = open_locked(path, true, false)?;
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(file));
    let current = match v2::current_slot(storage.as_ref(), path)? {
        (_, v2::Slot::V1(_)) => 1,
        (_, v2::Slot::V2(_)) => 2,
    };
    match (current, version) {
        (1, 2) => {
            let report = v2::upgrade(storage, path)?;
            if !args.quiet {
                writeln!(
                    std::io::stdout().lock(),
                    "{}: upgraded to format version 2 ({} extents in {} map pages)",
                    path.display(),
                    report.extents,
                    report.pages
                )?;
            }
        }
        (c, v) if c == v => {
            if !args.quiet {
                writeln!(
                    std::io::stdout().lock(),
                    "{}: already format version {c}",
                    path.display()
                )?;
            }
        }
        _ => bail!(
            "{}: a version 2 image cannot be made version 1 in place; use \
             `cowimg convert -O cowimg` to copy it into a new version-1 image",
            path.display()
        ),
    }
    Ok(ExitCode::SUCCESS)
}
