//! `cowimg commit`: write an overlay's changes into its backing file.
use super::progress::Progress;
use super::source::{self, ImageFormat};
use crate::image::{ops, Image, OpenOptions};
use clap::Args;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct CommitArgs {
    /// Format of IMAGE: only cowimg images can be committed (probed when not given).
    #[arg(short = 'f', value_name = "FMT", value_parser = source::parse_image_format)]
    pub format: Option<ImageFormat>,
    /// Print nothing but errors (overrides -p).
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// Show a progress bar.
    #[arg(short = 'p', long)]
    pub progress: bool,
    /// Keep the overlay's contents after committing (default: empty it).
    #[arg(short = 'd', long = "keep-overlay")]
    pub keep_overlay: bool,
    /// The overlay whose changes go into its backing file.
    pub image: PathBuf,
}

pub fn run(args: CommitArgs) -> anyhow::Result<ExitCode> {
    let detected = source::detect(&args.image, args.format)?;
    source::require_cowimg(
        &args.image,
        detected,
        "commit",
        "a raw image has no backing file to commit into",
    )?;
    let opts = OpenOptions {
        writable_backing: true,
        ..Default::default()
    };
    let image = Image::open(&args.image, &opts)?;
    let mut progress = Progress::new(args.progress && !args.quiet);
    ops::commit(&image, args.keep_overlay, &mut |done, total| {
        progress.update(done, total)
    })?;
    progress.finish();
    if !args.quiet {
        writeln!(std::io::stdout().lock(), "Image committed.")?;
    }
    Ok(ExitCode::SUCCESS)
}
