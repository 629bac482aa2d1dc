//! `cowimg map`: where each range of the merged image comes from, as `qemu-img map`.
use super::size::parse_size;
use super::source::{self, ImageFormat, Source};
use super::OutputArg;
use crate::image::{Extent, ExtentKind};
use anyhow::bail;
use clap::Args;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct MapArgs {
    /// Format of IMAGE: cowimg, raw or qcow2 (probed when not given).
    #[arg(short = 'f', value_name = "FMT", value_parser = source::parse_image_format)]
    pub format: Option<ImageFormat>,
    /// With json, one object per extent like `qemu-img map --output=json`, covering the
    /// whole range asked for.
    #[command(flatten)]
    pub output: OutputArg,
    /// First byte to show (suffixes K, M, G, ...); past the end shows nothing.
    #[arg(long, value_name = "OFFSET", value_parser = parse_size, default_value = "0")]
    pub start_offset: u64,
    /// Show at most this many bytes from --start-offset (default: to the end).
    #[arg(long, value_name = "LENGTH", value_parser = parse_size)]
    pub max_length: Option<u64>,
    /// Do not take the shared lock (inspect an image another process is writing).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// The image (with its backing chain).
    pub image: PathBuf,
}

pub fn run(args: MapArgs) -> anyhow::Result<ExitCode> {
    let image = Source::open(&args.image, args.format, args.force_share)?;
    let size = image.virtual_size();
    let start = args.start_offset.min(size);
    let length = args
        .max_length
        .map_or(size - start, |max| max.min(size - start));
    let extents = image.block_status(start, length)?;
    let names = image.layer_names();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if args.output.is_json() {
        write_json(&mut out, &extents)?;
    } else {
        // qemu-img refuses too: a compressed cluster has no place in the file to show, and
        // leaving it out would list less data than the image holds.
        if let Some(e) = extents.iter().find(|e| e.compressed) {
            bail!(
                "{}: contains compressed clusters (the first at {:#x}), which have no \
                 offset to show; use --output=json",
                args.image.display(),
                e.offset
            );
        }
        write_human(&mut out, &extents, &names)?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// One object per line, fields in qemu-img's order. `present` says whether some layer
/// decides the range; `compressed` marks a qcow2's compressed clusters, which have no
/// `offset`; `offset` is given wherever the bytes have a place in a file (a hole of a raw
/// backing file has one too, as with qemu-img).
fn write_json(out: &mut impl Write, extents: &[Extent]) -> std::io::Result<()> {
    write!(out, "[")?;
    for (i, e) in extents.iter().enumerate() {
        let (present, zero, data) = match e.kind {
            ExtentKind::Data => (true, false, true),
            ExtentKind::Zero => (true, true, false),
            ExtentKind::Unallocated => (false, true, false),
        };
        if i > 0 {
            writeln!(out, ",")?;
        }
        write!(
            out,
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {present}, \
             \"zero\": {zero}, \"data\": {data}, \"compressed\": {}",
            e.offset, e.length, e.depth, e.compressed
        )?;
        if let Some(offset) = e.host_offset {
            write!(out, ", \"offset\": {offset}")?;
        }
        write!(out, "}}")?;
    }
    writeln!(out, "]")
}

/// qemu-img's human format: only ranges that hold data, with where they are stored.
fn write_human(out: &mut impl Write, extents: &[Extent], names: &[String]) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<16}{:<16}{:<16}File",
        "Offset", "Length", "Mapped to"
    )?;
    for e in extents {
        let (ExtentKind::Data, Some(host)) = (e.kind, e.host_offset) else {
            continue;
        };
        let file = names.get(e.depth as usize).map_or("", String::as_str);
        writeln!(
            out,
            "{:<16}{:<16}{:<16}{file}",
            hex(e.offset),
            hex(e.length),
            hex(host)
        )?;
    }
    Ok(())
}

/// C's `%#x`: `0` for zero, `0x...` otherwise.
fn hex(value: u64) -> String {
    if value == 0 {
        "0".into()
    } else {
        format!("{value:#x}")
    }
}
