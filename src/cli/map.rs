//! `cowimg map`: where each range of the merged image comes from, as `qemu-img map`.
use super::open_read_only;
use crate::image::{Extent, ExtentKind, Image, Layer};
use clap::Args;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct MapArgs {
    /// Print JSON like `qemu-img map --output=json`, covering the whole virtual size.
    #[arg(long)]
    pub json: bool,
    /// Do not take the shared lock (inspect an image another process is writing).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// The cowimg image (with its backing chain).
    pub image: PathBuf,
}

pub fn run(args: MapArgs) -> anyhow::Result<ExitCode> {
    let image = open_read_only(&args.image, args.force_share)?;
    let extents = image.map()?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if args.json {
        write_json(&mut out, &extents)?;
    } else {
        write_human(&mut out, &extents, &layer_paths(&image))?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// The file of each layer, indexed by depth (0 is the image itself).
fn layer_paths(image: &Image) -> Vec<&Path> {
    let mut paths = vec![image.path()];
    let mut below = image.backing();
    while let Some(layer) = below {
        // A qcow2 with an external data file keeps its data there, where the offsets point.
        paths.push(match layer {
            Layer::Qcow2(q) => q.data_file_path().unwrap_or(q.path()),
            _ => layer.path(),
        });
        below = layer.backing();
    }
    paths
}

/// One object per line, fields in qemu-img's order. `present` says whether some layer
/// decides the range; `offset` is given wherever the bytes have a place in a file (a hole
/// of a raw backing file has one too, as with qemu-img).
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
             \"zero\": {zero}, \"data\": {data}, \"compressed\": false",
            e.offset, e.length, e.depth
        )?;
        if let Some(offset) = e.host_offset {
            write!(out, ", \"offset\": {offset}")?;
        }
        write!(out, "}}")?;
    }
    writeln!(out, "]")
}

/// qemu-img's human format: only ranges that hold data, with where they are stored.
fn write_human(out: &mut impl Write, extents: &[Extent], paths: &[&Path]) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<16}{:<16}{:<16}File",
        "Offset", "Length", "Mapped to"
    )?;
    for e in extents {
        let (ExtentKind::Data, Some(host)) = (e.kind, e.host_offset) else {
            continue;
        };
        let file = paths
            .get(e.depth as usize)
            .map_or_else(String::new, |p| p.display().to_string());
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
