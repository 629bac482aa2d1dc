//! `cowimg convert`: copy an image, its backing chain merged, to a new raw, cowimg or qcow2
//! file.
use super::progress::Progress;
use super::size::parse_cluster_size;
use super::{backing_option, parse_format};
use crate::format::BackingFormat;
use crate::image::ops::{self, CacheMode, ConvertOptions, OutputFormat};
use crate::image::{resolve_backing_path, CreateOptions, Layer};
use anyhow::bail;
use clap::Args;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// Format of SRC: raw, cowimg or qcow2 (probed when not given).
    #[arg(short = 'f', value_name = "FMT", value_parser = parse_format)]
    pub source_format: Option<BackingFormat>,
    /// Format of DST.
    #[arg(short = 'O', value_name = "FMT", value_parser = parse_output_format, default_value = "raw")]
    pub output_format: OutputFormat,
    /// For cowimg and qcow2 output: a backing file for DST (recorded as given, relative to DST's
    /// directory); only what differs from it is copied.
    #[arg(short = 'B', value_name = "BACKING")]
    pub backing: Option<String>,
    /// Format of the -B backing file: raw, cowimg or qcow2 (qcow2 output: raw or qcow2).
    #[arg(short = 'F', value_name = "FMT", value_parser = parse_format)]
    pub backing_format: Option<BackingFormat>,
    /// For cowimg and qcow2 output: the cluster size, a power of two from 4K to 2M (default
    /// 64K).
    #[arg(short = 'c', long = "cluster-size", value_name = "CLUSTER_SIZE", value_parser = parse_cluster_size)]
    pub cluster_size: Option<u64>,
    /// Cache mode of DST: writeback (the default: DST is on the disk when convert exits) or
    /// unsafe (DST may still be in the page cache, as with qemu-img convert's default;
    /// -O raw only).
    #[arg(short = 't', value_name = "CACHE", value_parser = parse_cache_mode, default_value = "writeback")]
    pub cache: CacheMode,
    /// Show a progress bar.
    #[arg(short = 'p', long)]
    pub progress: bool,
    /// The image to copy: cowimg (with its backing chain) or raw.
    pub source: PathBuf,
    /// The new file; an existing one is replaced.
    pub destination: PathBuf,
}

fn parse_output_format(text: &str) -> Result<OutputFormat, String> {
    match text {
        "raw" => Ok(OutputFormat::Raw),
        "cowimg" => Ok(OutputFormat::Cowimg),
        "qcow2" => Ok(OutputFormat::Qcow2),
        _ => Err(format!(
            "unknown output format '{text}': expected raw, cowimg or qcow2"
        )),
    }
}

fn parse_cache_mode(text: &str) -> Result<CacheMode, String> {
    match text {
        "writeback" => Ok(CacheMode::Writeback),
        "unsafe" => Ok(CacheMode::Unsafe),
        _ => Err(format!(
            "unknown cache mode '{text}': expected writeback or unsafe"
        )),
    }
}

pub fn run(args: ConvertArgs) -> anyhow::Result<ExitCode> {
    let backing = backing_option(args.backing, args.backing_format)?;
    if args.output_format == OutputFormat::Raw {
        if backing.is_some() {
            bail!("-B needs -O cowimg or -O qcow2: a raw file has no backing file");
        }
        if args.cluster_size.is_some() {
            bail!("-c needs -O cowimg or -O qcow2: a raw file has no clusters");
        }
    } else if args.cache == CacheMode::Unsafe {
        bail!("-t unsafe needs -O raw: a cowimg or qcow2 image orders its writes with flushes");
    }
    let source = ops::open_source(&args.source, args.source_format)?;
    refuse_to_overwrite_an_input(&source, &args.destination, backing.as_ref())?;
    let opts = ConvertOptions {
        output: args.output_format,
        backing,
        cluster_size: args
            .cluster_size
            .unwrap_or(CreateOptions::default().cluster_size),
        cache: args.cache,
    };
    let mut progress = Progress::new(args.progress);
    ops::convert(&source, &args.destination, &opts, &mut |done, total| {
        progress.update(done, total)
    })?;
    progress.finish();
    Ok(ExitCode::SUCCESS)
}

/// DST is truncated or replaced before it is written: if it were the source, a layer of the
/// source's chain, or the new image's own backing file, the data to copy would be
/// destroyed first.
fn refuse_to_overwrite_an_input(
    source: &Layer,
    destination: &Path,
    backing: Option<&(String, BackingFormat)>,
) -> anyhow::Result<()> {
    let Some(target) = file_identity(destination) else {
        return Ok(()); // a new file cannot be an input
    };
    let mut layer = Some(source);
    while let Some(current) = layer {
        if file_identity(current.path()) == Some(target) {
            bail!(
                "{}: is {} of the source; refusing to overwrite it",
                destination.display(),
                if std::ptr::eq(current, source) {
                    "the source itself".to_string()
                } else {
                    format!("a backing file ({})", current.path().display())
                }
            );
        }
        // A qcow2's external data file holds its data: it is an input too.
        if let Layer::Qcow2(q) = current {
            if q.data_file_path().and_then(file_identity) == Some(target) {
                bail!(
                    "{}: is the external data file of {}; refusing to overwrite it",
                    destination.display(),
                    q.path().display()
                );
            }
        }
        layer = current.backing();
    }
    if let Some((recorded, _)) = backing {
        if file_identity(&resolve_backing_path(destination, recorded)) == Some(target) {
            bail!(
                "{}: cannot be its own backing file (-B {recorded})",
                destination.display()
            );
        }
    }
    Ok(())
}

/// Device and inode: the same file under any name.
fn file_identity(path: &Path) -> Option<(u64, u64)> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.dev(), metadata.ino()))
}
