//! `cowimg rebase`: change an image's backing file.
use super::progress::Progress;
use super::source::{self, ImageFormat};
use super::{backing_option, open_without_backing, parse_format};
use crate::format::BackingFormat;
use crate::image::{ops, Image, OpenOptions};
use anyhow::bail;
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Debug)]
#[command(
    after_help = "Safe mode (the default) copies into IMAGE every range where the old \
    and the new backing files differ, so that IMAGE reads the same afterwards. -u only \
    rewrites the pointer, e.g. after the backing file was moved."
)]
pub struct RebaseArgs {
    /// Format of IMAGE: only cowimg images can be rebased (probed when not given).
    #[arg(short = 'f', value_name = "FMT", value_parser = source::parse_image_format)]
    pub format: Option<ImageFormat>,
    /// Print nothing but errors (overrides -p).
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// The new backing file, recorded as given (relative to IMAGE's directory); "" removes it.
    #[arg(short = 'b', long = "backing", value_name = "BACKING", required = true)]
    pub backing: String,
    /// Format of the new backing file: raw or cowimg (required unless -b "").
    #[arg(short = 'F', long = "backing-format", value_name = "FMT", value_parser = parse_format)]
    pub backing_format: Option<BackingFormat>,
    /// Unsafe: only change the pointer; the old backing file is not even opened.
    #[arg(short = 'u', long = "unsafe")]
    pub unsafe_pointer_only: bool,
    /// Show a progress bar.
    #[arg(short = 'p', long)]
    pub progress: bool,
    /// The overlay whose backing file changes.
    pub image: PathBuf,
}

pub fn run(args: RebaseArgs) -> anyhow::Result<ExitCode> {
    let detected = source::detect(&args.image, args.format)?;
    source::require_cowimg(
        &args.image,
        detected,
        "rebase",
        "a raw image has no backing file (make a cowimg overlay with create -b)",
    )?;
    let new_backing = if args.backing.is_empty() {
        if args.backing_format.is_some() {
            bail!("-F makes no sense with -b \"\" (removing the backing file)");
        }
        None
    } else {
        backing_option(Some(args.backing), args.backing_format)?
    };
    let mut image = if args.unsafe_pointer_only {
        open_without_backing(&args.image, true, false)?
    } else {
        Image::open(&args.image, &OpenOptions::default())?
    };
    let mut progress = Progress::new(args.progress && !args.quiet);
    ops::rebase(
        &mut image,
        new_backing,
        args.unsafe_pointer_only,
        &mut |done, total| progress.update(done, total),
    )?;
    progress.finish();
    Ok(ExitCode::SUCCESS)
}
