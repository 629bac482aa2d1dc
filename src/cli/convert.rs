//! `cowimg convert`: copy an image, its backing chain merged, to a new raw, cowimg or qcow2
//! file.
use super::progress::Progress;
use super::size::{parse_cluster_size, parse_size};
use super::source::{self, ImageFormat};
use super::{backing_option, parse_format};
use crate::format::BackingFormat;
use crate::image::ops::{self, CacheMode, ConvertOptions, OutputFormat, DEFAULT_SPARSE_SIZE};
use crate::image::{resolve_backing_path, CreateOptions, Layer};
use anyhow::bail;
use clap::Args;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  cowimg convert -O raw disk.cow disk.raw\n  \
    cowimg convert -O cowimg -o cluster_size=1M disk.raw disk.cow\n  \
    cowimg convert -n -O raw disk.cow /dev/sdX   (into an existing target)\n  \
    cowimg convert -S 0 -O raw disk.cow full.raw (fully allocated)"
)]
pub struct ConvertArgs {
    /// Format of SRC: cowimg, raw or qcow2 (probed when not given).
    #[arg(short = 'f', value_name = "FMT", value_parser = source::parse_image_format)]
    pub source_format: Option<ImageFormat>,
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
    /// 64K); also -o cluster_size=SIZE.
    #[arg(long = "cluster-size", value_name = "CLUSTER_SIZE", value_parser = parse_cluster_size)]
    pub cluster_size: Option<u64>,
    /// For cowimg output: the format version of DST, 1 (the default) or 2.
    #[arg(long = "format-version", value_name = "N",
          value_parser = super::create::parse_version)]
    pub format_version: Option<u32>,
    /// Options of the output format: cluster_size=SIZE (cowimg and qcow2).
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Compress (qemu-img's -c): not supported; refused with a message.
    #[arg(short = 'c', long = "compress")]
    pub compress: bool,
    /// Blocks of SIZE bytes that read as zeros are left as holes (default 4K); 0 writes
    /// every byte, for a fully allocated target. A multiple of 512.
    #[arg(short = 'S', long = "sparse-size", value_name = "SIZE", value_parser = parse_sparse_size)]
    pub sparse_size: Option<u64>,
    /// Do not create DST: write into an existing one (at least as large as SRC); ranges
    /// SRC reads as zeros are zeroed in it.
    #[arg(short = 'n', long = "no-create")]
    pub no_create: bool,
    /// Out-of-order writes: accepted for qemu-img habits. cowimg's copy already writes
    /// in any order (reads stream in file order, writes go where they belong).
    #[arg(short = 'W', long = "oob-writes")]
    pub out_of_order_writes: bool,
    /// Do not take the shared lock on SRC (copy an image another process is writing; the
    /// copy may then be inconsistent).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Print nothing but errors (overrides -p).
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// Cache mode of DST: writeback (the default: DST is on the disk when convert exits) or
    /// unsafe (DST may still be in the page cache, as with qemu-img convert's default;
    /// -O raw only).
    #[arg(short = 't', value_name = "CACHE", value_parser = parse_cache_mode, default_value = "writeback")]
    pub cache: CacheMode,
    /// Show progress.
    #[arg(short = 'p', long)]
    pub progress: bool,
    /// The image to copy: cowimg (with its backing chain) or raw.
    pub source: PathBuf,
    /// The new file; an existing one is replaced (unless -n).
    pub destination: PathBuf,
}

fn parse_sparse_size(text: &str) -> Result<u64, String> {
    let size = parse_size(text)?;
    if size % 512 != 0 {
        return Err(format!("{size} is not a multiple of 512"));
    }
    Ok(size)
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
    if args.compress {
        bail!(
            "cowimg convert -c: compression is not supported; use -o cluster_size=… (or \
             --cluster-size) for the cluster size"
        );
    }
    let backing = backing_option(args.backing, args.backing_format)?;
    let cluster_size = match (
        args.cluster_size,
        super::size::cluster_size_option(&args.options, "convert")?,
    ) {
        (Some(_), Some(_)) => bail!("--cluster-size and -o cluster_size: give one of them"),
        (flag, option) => flag.or(option),
    };
    if args.format_version.is_some() && args.output_format != OutputFormat::Cowimg {
        bail!("--format-version needs -O cowimg");
    }
    if args.format_version == Some(2) && cluster_size.is_some_and(|c| c != 4096) {
        bail!("a version 2 image maps 4 KiB blocks: a cluster size does not apply to it");
    }
    if args.output_format == OutputFormat::Raw {
        if backing.is_some() {
            bail!("-B needs -O cowimg or -O qcow2: a raw file has no backing file");
        }
        if cluster_size.is_some() {
            bail!("a cluster size needs -O cowimg or -O qcow2: a raw file has no clusters");
        }
    } else if args.cache == CacheMode::Unsafe {
        bail!("-t unsafe needs -O raw: a cowimg or qcow2 image orders its writes with flushes");
    }
    if args.no_create {
        if backing.is_some() {
            bail!("-B creates the target with a backing file; with -n the target exists already");
        }
        if cluster_size.is_some() {
            bail!("a cluster size is for a new target; with -n the target exists already");
        }
        check_existing_target(&args.destination, args.output_format)?;
    }
    let detected = source::detect(&args.source, args.source_format)?;
    let source = source::open_layer(&args.source, detected, args.force_share)?;
    refuse_to_overwrite_an_input(&source, &args.destination, backing.as_ref())?;
    let opts = ConvertOptions {
        output: args.output_format,
        backing,
        cluster_size: cluster_size.unwrap_or(CreateOptions::default().cluster_size),
        cache: args.cache,
        sparse_size: args.sparse_size.unwrap_or(DEFAULT_SPARSE_SIZE),
        existing_target: args.no_create,
        version: args.format_version.unwrap_or(1),
    };
    let mut progress = Progress::new(args.progress && !args.quiet);
    ops::convert(&source, &args.destination, &opts, &mut |done, total| {
        progress.update(done, total)
    })?;
    progress.finish();
    Ok(ExitCode::SUCCESS)
}

/// With -n, -O says how to write DST: a cowimg header in a target said to be raw (or the
/// reverse) is a mistake that would destroy it.
fn check_existing_target(destination: &Path, output: OutputFormat) -> anyhow::Result<()> {
    let found = source::detect(destination, None)?.format;
    let wanted = match output {
        OutputFormat::Raw => ImageFormat::Raw,
        OutputFormat::Cowimg => ImageFormat::Cowimg,
        OutputFormat::Qcow2 => bail!(
            "-n with -O qcow2 is not supported: cowimg writes qcow2 images whole, as new files"
        ),
    };
    if found != wanted {
        bail!(
            "{}: -n writes into the existing target as {}, but it is a {} image",
            destination.display(),
            wanted.name(),
            found.name()
        );
    }
    Ok(())
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
