//! `cowimg create`.
use super::size::{parse_cluster_size, parse_size};
use super::{backing_option, open_without_backing, parse_format};
use crate::format::BackingFormat;
use crate::image::{CreateOptions, Image};
use anyhow::bail;
use clap::Args;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  cowimg create -s 10G disk.cow\n  \
    cowimg create disk.cow 10G\n  cowimg create -b base.raw -F raw overlay.cow")]
pub struct CreateArgs {
    /// Image format (only cowimg; accepted for qemu-img habits).
    #[arg(short = 'f', value_name = "FMT", value_parser = ["cowimg"])]
    pub format: Option<String>,
    /// Backing file, recorded as given: a relative path is relative to IMAGE's directory.
    #[arg(short = 'b', long = "backing", value_name = "BACKING")]
    pub backing: Option<String>,
    /// Format of the backing file: raw or cowimg (required with -b; never probed).
    #[arg(short = 'F', long = "backing-format", value_name = "FMT", value_parser = parse_format)]
    pub backing_format: Option<BackingFormat>,
    /// Virtual size (suffixes K, M, G, T, P, E); defaults to the backing file's size.
    #[arg(short = 's', long = "size", value_name = "SIZE", value_parser = parse_size)]
    pub size: Option<u64>,
    /// Cluster size: a power of two from 4K to 2M.
    #[arg(short = 'c', long = "cluster-size", value_name = "CLUSTER_SIZE",
          value_parser = parse_cluster_size, default_value = "64K")]
    pub cluster_size: u64,
    /// The image file to create (an existing file is not overwritten).
    pub image: PathBuf,
    /// Virtual size, as `qemu-img create IMAGE SIZE` takes it.
    #[arg(value_name = "SIZE", value_parser = parse_size, conflicts_with = "size")]
    pub positional_size: Option<u64>,
}

pub fn run(args: CreateArgs) -> anyhow::Result<ExitCode> {
    let backing = backing_option(args.backing, args.backing_format)?;
    let size = args.size.or(args.positional_size);
    if size.is_none() && backing.is_none() {
        bail!(
            "{}: a size is needed (-s SIZE or IMAGE SIZE) when there is no backing file",
            args.image.display()
        );
    }
    let opts = CreateOptions {
        size,
        cluster_size: args.cluster_size,
        backing: backing.clone(),
    };
    Image::create(&args.image, &opts)?;
    // The size may have come from the backing file: report what was recorded.
    let created = open_without_backing(&args.image, false, true)?;
    let mut line = format!(
        "Formatting '{}', fmt=cowimg cluster_size={}",
        args.image.display(),
        created.cluster_size()
    );
    if let Some((path, format)) = &backing {
        line += &format!(" backing_file={path} backing_fmt={}", format.name());
    }
    line += &format!(" size={}", created.virtual_size());
    writeln!(std::io::stdout().lock(), "{line}")?;
    Ok(ExitCode::SUCCESS)
}
