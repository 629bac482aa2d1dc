//! `cowimg measure`: how large a file an image needs, as `qemu-img measure`.
use super::size::parse_size;
use super::source::{self, ImageFormat, Source};
use super::{print_json, OutputArg};
use crate::image::ops::{self, Measure};
use crate::image::{CreateOptions, ExtentKind};
use anyhow::bail;
use clap::Args;
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Debug)]
#[command(
    after_help = "\"required size\" is what the image needs for the data IMAGE holds \
    (with --size: for an empty image); \"fully allocated size\" what it needs when every \
    cluster holds data. For cowimg both are upper bounds for an image written once, as \
    convert writes it. For qcow2 they are qemu-img's figures (metadata for a fully \
    allocated image, plus the clusters that hold data), also upper bounds for what \
    convert -O qcow2 writes; qemu-img's \"bitmaps size\" is not shown, as convert copies \
    no persistent bitmaps."
)]
pub struct MeasureArgs {
    /// Format of IMAGE: cowimg, raw or qcow2 (probed when not given).
    #[arg(short = 'f', value_name = "FMT", value_parser = source::parse_image_format)]
    pub format: Option<ImageFormat>,
    /// The output format to measure for: raw (the default), cowimg or qcow2.
    #[arg(short = 'O', value_name = "OUTPUT_FMT", value_parser = source::parse_image_format, default_value = "raw")]
    pub output_format: ImageFormat,
    /// Options of the output format: cluster_size=SIZE (cowimg and qcow2; default 64K).
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Measure a new, empty image of this size instead of IMAGE.
    #[arg(short = 's', long, value_name = "SIZE", value_parser = parse_size, conflicts_with = "image")]
    pub size: Option<u64>,
    #[command(flatten)]
    pub output: OutputArg,
    /// Do not take the shared lock (measure an image another process is writing).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// The image whose data is measured.
    #[arg(required_unless_present = "size")]
    pub image: Option<PathBuf>,
}

#[derive(Serialize)]
struct MeasureJson {
    required: u64,
    #[serde(rename = "fully-allocated")]
    fully_allocated: u64,
}

pub fn run(args: MeasureArgs) -> anyhow::Result<ExitCode> {
    let cluster_size = super::size::cluster_size_option(&args.options, "measure")?;
    let measure = match args.output_format {
        ImageFormat::Raw if cluster_size.is_some() => {
            bail!("-o cluster_size needs -O cowimg or -O qcow2: a raw file has no clusters")
        }
        ImageFormat::Raw => {
            // A raw file is as long as the disk, whatever it holds.
            let (size, _) = size_and_data(&args, None)?;
            Measure {
                required: size,
                fully_allocated: size,
            }
        }
        ImageFormat::Cowimg => {
            let cluster_size = cluster_size.unwrap_or(CreateOptions::default().cluster_size);
            let (size, allocated) = size_and_data(&args, Some(cluster_size))?;
            ops::measure_cowimg(size, cluster_size, allocated)?
        }
        ImageFormat::Qcow2 => {
            let cluster_size = cluster_size.unwrap_or(CreateOptions::default().cluster_size);
            let (size, allocated) = size_and_data(&args, Some(cluster_size))?;
            ops::measure_qcow2(size, cluster_size, allocated)?
        }
    };
    let mut out = std::io::stdout().lock();
    if args.output.is_json() {
        print_json(
            &mut out,
            &MeasureJson {
                required: measure.required,
                fully_allocated: measure.fully_allocated,
            },
        )?;
    } else {
        writeln!(out, "required size: {}", measure.required)?;
        writeln!(out, "fully allocated size: {}", measure.fully_allocated)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The virtual size to measure (--size, or IMAGE's), and with `cluster_size` the clusters
/// of that size that hold data in IMAGE (none with --size).
fn size_and_data(args: &MeasureArgs, cluster_size: Option<u64>) -> anyhow::Result<(u64, u64)> {
    match (&args.image, args.size) {
        (_, Some(size)) => Ok((size, 0)),
        (Some(image), None) => {
            let source = Source::open(image, args.format, args.force_share)?;
            let size = source.virtual_size();
            let data = match cluster_size {
                Some(cluster_size) => clusters_with_data(&source, cluster_size)?,
                None => 0,
            };
            Ok((size, data))
        }
        (None, None) => bail!("measure needs IMAGE or --size"),
    }
}

/// Clusters of `cluster_size` that hold some data in the merged image: what qemu-img
/// counts (a cluster any byte of data touches, through the whole backing chain; ranges
/// that read as zeros, a zero flag or a hole, are not data).
fn clusters_with_data(source: &Source, cluster_size: u64) -> anyhow::Result<u64> {
    let mut count = 0;
    // Extents come in order, so a cluster shared by two extents is the last one counted.
    let mut last_counted: Option<u64> = None;
    for extent in source.block_status(0, source.virtual_size())? {
        if extent.kind != ExtentKind::Data || extent.length == 0 {
            continue;
        }
        let first = extent.offset / cluster_size;
        let last = (extent.offset + extent.length - 1) / cluster_size;
        let first = match last_counted {
            Some(counted) if counted >= first => counted + 1,
            _ => first,
        };
        if last >= first {
            count += last - first + 1;
            last_counted = Some(last);
        }
    }
    Ok(count)
}
