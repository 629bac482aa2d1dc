//! `cowimg commit`: write an overlay's changes into its backing file.
use super::progress::Progress;
use crate::image::{ops, Image, OpenOptions};
use clap::Args;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct CommitArgs {
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
    let opts = OpenOptions {
        writable_backing: true,
        ..Default::default()
    };
    let image = Image::open(&args.image, &opts)?;
    let mut progress = Progress::new(args.progress);
    ops::commit(&image, args.keep_overlay, &mut |done, total| {
        progress.update(done, total)
    })?;
    progress.finish();
    writeln!(std::io::stdout().lock(), "Image committed.")?;
    Ok(ExitCode::SUCCESS)
}
