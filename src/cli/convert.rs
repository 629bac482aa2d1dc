//! `cowimg convert`: copy an image, its backing chain merged, to a new raw or cowimg file.
use super::progress::Progress;
use super::size::parse_cluster_size;
use super::{backing_option, parse_format};
use crate::format::BackingFormat;
use crate::image::ops::{self, ConvertOptions, OutputFormat};
use crate::image::CreateOptions;
use anyhow::bail;
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// Format of SRC: raw or cowimg (probed when not given).
    #[arg(short = 'f', value_name = "FMT", value_parser = parse_format)]
    pub source_format: Option<BackingFormat>,
    /// Format of DST.
    #[arg(short = 'O', value_name = "FMT", value_parser = parse_output_format, default_value = "raw")]
    pub output_format: OutputFormat,
    /// For cowimg output: a backing file for DST (recorded as given, relative to DST's
    /// directory); only what differs from it is copied.
    #[arg(short = 'B', value_name = "BACKING")]
    pub backing: Option<String>,
    /// Format of the -B backing file: raw or cowimg.
    #[arg(short = 'F', value_name = "FMT", value_parser = parse_format)]
    pub backing_format: Option<BackingFormat>,
    /// For cowimg output: the cluster size, a power of two from 4K to 2M (default 64K).
    #[arg(short = 'c', long = "cluster-size", value_name = "CLUSTER_SIZE", value_parser = parse_cluster_size)]
    pub cluster_size: Option<u64>,
    /// Show a progress bar.
    #[arg(short = 'p', long)]
    pub progress: bool,
    pub source: PathBuf,
    pub destination: PathBuf,
}

fn parse_output_format(text: &str) -> Result<OutputFormat, String> {
    match text {
        "raw" => Ok(OutputFormat::Raw),
        "cowimg" => Ok(OutputFormat::Cowimg),
        _ => Err(format!(
            "unknown output format '{text}': expected raw or cowimg"
        )),
    }
}

pub fn run(args: ConvertArgs) -> anyhow::Result<ExitCode> {
    let backing = backing_option(args.backing, args.backing_format)?;
    if args.output_format == OutputFormat::Raw {
        if backing.is_some() {
            bail!("-B needs -O cowimg: a raw file has no backing file");
        }
        if args.cluster_size.is_some() {
            bail!("-c needs -O cowimg: a raw file has no clusters");
        }
    }
    let source = ops::open_source(&args.source, args.source_format)?;
    let opts = ConvertOptions {
        output: args.output_format,
        backing,
        cluster_size: args
            .cluster_size
            .unwrap_or(CreateOptions::default().cluster_size),
    };
    let mut progress = Progress::new(args.progress);
    ops::convert(&source, &args.destination, &opts, &mut |done, total| {
        progress.update(done, total)
    })?;
    progress.finish();
    Ok(ExitCode::SUCCESS)
}
