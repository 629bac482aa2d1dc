//! `cowimg info`: what `qemu-img info` shows, with qemu-img's JSON field names.
use super::size::human_size;
use super::source::{self, ImageFormat};
use super::{open_read_only, open_without_backing, print_json, OutputArg};
use crate::format::qcow2;
use crate::image::qcow2::Qcow2;
use crate::image::{resolve_backing_path, Image, Layer};
use clap::Args;
use serde::Serialize;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Format of IMAGE: cowimg, raw or qcow2 (probed when not given).
    #[arg(short = 'f', value_name = "FMT", value_parser = source::parse_image_format)]
    pub format: Option<ImageFormat>,
    /// With json, qemu-img's field names; with --backing-chain, an array.
    #[command(flatten)]
    pub output: OutputArg,
    /// Show every layer of the backing chain, top first.
    #[arg(long)]
    pub backing_chain: bool,
    /// Do not take the shared lock (inspect an image another process is writing).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// The image; without -f, a file with neither the cowimg nor the qcow2 magic is shown
    /// as raw.
    pub image: PathBuf,
}

/// One layer, named as `qemu-img info --output=json` names its fields.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LayerInfo {
    pub filename: String,
    pub format: &'static str,
    pub virtual_size: u64,
    /// Bytes the file occupies on disk.
    pub actual_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    /// As recorded in the header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    /// Resolved against the image's directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename_format: Option<&'static str>,
    pub dirty_flag: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format_specific: Option<FormatSpecific>,
}

#[derive(Debug, Serialize)]
pub struct FormatSpecific {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub data: FormatDetails,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum FormatDetails {
    Cowimg(CowimgDetails),
    Qcow2(Qcow2Details),
}

/// What `qemu-img info` shows of a qcow2, with its field names.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Qcow2Details {
    /// "0.10" for version 2, "1.1" for version 3.
    pub compat: &'static str,
    pub compression_type: &'static str,
    /// These three exist in version 3 only; qemu-img leaves them out for version 2.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lazy_refcounts: Option<bool>,
    pub refcount_bits: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrupt: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extended_l2: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_file: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CowimgDetails {
    /// The format version: 1, or 2 (FORMAT-v2.md).
    pub format_version: u32,
    /// Copy-on-write granularity inside a cluster.
    pub sub_cluster_size: u64,
    pub generation: u64,
    pub journal_used: u64,
    pub journal_capacity: u64,
    /// Virtual clusters that differ from the backing file.
    pub mapped_clusters: u64,
    /// Whole clusters that read as zeros without a map entry (discarded or zeroed).
    pub zero_clusters: u64,
    pub file_length: u64,
    /// Version 2: the map's extents (in its tree and its journal) and the tree's height,
    /// from the header, without reading the tree.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub map_extents: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub map_height: Option<u8>,
}

pub fn run(args: InfoArgs) -> anyhow::Result<ExitCode> {
    let name = args.image.display().to_string();
    let layers = if crate::nbd::client::is_uri(&name) {
        // An NBD export is raw to its clients; its size is all the handshake tells.
        let export = source::Source::open(&args.image, args.format, args.force_share)?;
        vec![LayerInfo {
            filename: name,
            format: "raw",
            virtual_size: export.virtual_size(),
            actual_size: 0,
            cluster_size: None,
            backing_filename: None,
            full_backing_filename: None,
            backing_filename_format: None,
            dirty_flag: false,
            format_specific: None,
        }]
    } else {
        file_layers(&args)?
    };
    let mut out = std::io::stdout().lock();
    if args.output.is_json() {
        if args.backing_chain {
            print_json(&mut out, &layers)?;
        } else {
            print_json(&mut out, &layers[0])?;
        }
    } else {
        for (i, layer) in layers.iter().enumerate() {
            if i > 0 {
                writeln!(out)?;
            }
            print_human(&mut out, layer)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Every layer from `image` down.
fn chain_info(image: &Image) -> anyhow::Result<Vec<LayerInfo>> {
    let mut layers = vec![cowimg_info(image)];
    if let Some(below) = image.backing() {
        layers.extend(layers_from(below)?);
    }
    Ok(layers)
}

/// `layer` and every layer below it.
fn layers_from(layer: &Layer) -> anyhow::Result<Vec<LayerInfo>> {
    let mut layers = Vec::new();
    let mut below = Some(layer);
    while let Some(layer) = below {
        layers.push(match layer {
            Layer::Cowimg(image) => cowimg_info(image),
            Layer::Qcow2(q) => qcow2_info(q)?,
            Layer::Raw(_) => raw_info(layer)?,
        });
        below = layer.backing();
    }
    Ok(layers)
}

fn qcow2_info(q: &Qcow2) -> anyhow::Result<LayerInfo> {
    let metadata = std::fs::metadata(q.path()).map_err(|source| crate::Error::File {
        path: q.path().into(),
        op: "reading metadata",
        source,
    })?;
    let backing = q.backing_recorded();
    let h = q.header();
    let v3 = h.version >= 3;
    Ok(LayerInfo {
        filename: display(q.path()),
        format: "qcow2",
        virtual_size: q.virtual_size(),
        actual_size: metadata.blocks() * 512,
        cluster_size: Some(q.header().cluster_size()),
        backing_filename: backing.map(|(path, _)| path.clone()),
        full_backing_filename: backing
            .map(|(path, _)| display(&resolve_backing_path(q.path(), path))),
        backing_filename_format: backing.and_then(|(_, format)| format.map(|f| f.name())),
        dirty_flag: h.incompatible & qcow2::INCOMPAT_DIRTY != 0,
        format_specific: Some(FormatSpecific {
            kind: "qcow2",
            data: FormatDetails::Qcow2(Qcow2Details {
                compat: if h.version == 2 { "0.10" } else { "1.1" },
                compression_type: match h.compression {
                    qcow2::Compression::Zlib => "zlib",
                    qcow2::Compression::Zstd => "zstd",
                },
                lazy_refcounts: v3.then_some(h.compatible & qcow2::COMPAT_LAZY_REFCOUNTS != 0),
                refcount_bits: 1 << h.refcount_order,
                corrupt: v3.then_some(h.incompatible & qcow2::INCOMPAT_CORRUPT != 0),
                extended_l2: v3.then_some(h.extended_l2()),
                data_file: h.data_file.clone(),
            }),
        }),
    })
}

pub fn cowimg_info(image: &Image) -> LayerInfo {
    let header = image.header();
    let stats = image.stats();
    let backing = header.backing.as_ref();
    LayerInfo {
        filename: display(image.path()),
        format: "cowimg",
        virtual_size: image.virtual_size(),
        actual_size: stats.allocated_bytes,
        cluster_size: Some(image.cluster_size()),
        backing_filename: backing.map(|(path, _)| path.clone()),
        full_backing_filename: backing
            .map(|(path, _)| display(&resolve_backing_path(image.path(), path))),
        backing_filename_format: backing.map(|(_, format)| format.name()),
        dirty_flag: false,
        format_specific: Some(FormatSpecific {
            kind: "cowimg",
            data: FormatDetails::Cowimg(CowimgDetails {
                format_version: image.version(),
                map_extents: (image.version() == 2).then_some(stats.mapped_clusters),
                map_height: image.map_height(),
                sub_cluster_size: image.geometry().unit_size(),
                generation: stats.generation,
                journal_used: stats.journal_used,
                journal_capacity: stats.journal_capacity,
                mapped_clusters: stats.mapped_clusters,
                zero_clusters: stats.zero_run_clusters,
                file_length: stats.file_length,
            }),
        }),
    }
}

fn raw_info(layer: &Layer) -> anyhow::Result<LayerInfo> {
    let path = layer.path();
    let metadata = std::fs::metadata(path).map_err(|source| crate::Error::File {
        path: path.into(),
        op: "reading metadata",
        source,
    })?;
    Ok(LayerInfo {
        filename: display(path),
        format: layer.format().name(),
        virtual_size: layer.size(),
        actual_size: metadata.blocks() * 512,
        cluster_size: None,
        backing_filename: None,
        full_backing_filename: None,
        backing_filename_format: None,
        dirty_flag: false,
        format_specific: None,
    })
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

fn print_human(out: &mut impl Write, layer: &LayerInfo) -> std::io::Result<()> {
    writeln!(out, "image: {}", layer.filename)?;
    writeln!(out, "file format: {}", layer.format)?;
    writeln!(
        out,
        "virtual size: {} ({} bytes)",
        human_size(layer.virtual_size),
        layer.virtual_size
    )?;
    writeln!(out, "disk size: {}", human_size(layer.actual_size))?;
    if let Some(cluster_size) = layer.cluster_size {
        writeln!(out, "cluster_size: {cluster_size}")?;
    }
    if let (Some(recorded), Some(full)) = (&layer.backing_filename, &layer.full_backing_filename) {
        if recorded == full {
            writeln!(out, "backing file: {recorded}")?;
        } else {
            writeln!(out, "backing file: {recorded} (actual path: {full})")?;
        }
    }
    if let Some(format) = layer.backing_filename_format {
        writeln!(out, "backing file format: {format}")?;
    }
    if let Some(FormatSpecific {
        data: FormatDetails::Qcow2(d),
        ..
    }) = &layer.format_specific
    {
        writeln!(out, "Format specific information:")?;
        writeln!(out, "    compat: {}", d.compat)?;
        writeln!(out, "    compression type: {}", d.compression_type)?;
        if let Some(lazy) = d.lazy_refcounts {
            writeln!(out, "    lazy refcounts: {lazy}")?;
        }
        writeln!(out, "    refcount bits: {}", d.refcount_bits)?;
        if let Some(corrupt) = d.corrupt {
            writeln!(out, "    corrupt: {corrupt}")?;
        }
        if let Some(extended) = d.extended_l2 {
            writeln!(out, "    extended l2: {extended}")?;
        }
        if let Some(data_file) = &d.data_file {
            writeln!(out, "    data file: {data_file}")?;
        }
    }
    if let Some(FormatSpecific {
        data: FormatDetails::Cowimg(d),
        ..
    }) = &layer.format_specific
    {
        writeln!(out, "Format specific information:")?;
        writeln!(out, "    format version: {}", d.format_version)?;
        if let (Some(extents), Some(height)) = (d.map_extents, d.map_height) {
            writeln!(out, "    map: {extents} extents, a tree of height {height}")?;
        }
        writeln!(out, "    sub-cluster size: {}", d.sub_cluster_size)?;
        writeln!(out, "    generation: {}", d.generation)?;
        writeln!(
            out,
            "    journal usage: {}/{} bytes",
            d.journal_used, d.journal_capacity
        )?;
        if d.map_extents.is_none() {
            writeln!(out, "    mapped clusters: {}", d.mapped_clusters)?;
            writeln!(out, "    zero clusters: {}", d.zero_clusters)?;
        }
        writeln!(out, "    file length: {} bytes", d.file_length)?;
    }
    Ok(())
}

/// The layers `info` shows for a file: the image, or its whole chain.
fn file_layers(args: &InfoArgs) -> anyhow::Result<Vec<LayerInfo>> {
    let detected = source::detect(&args.image, args.format)?;
    Ok(if detected.format == ImageFormat::Qcow2 {
        // As for cowimg, the backing chain is opened only for --backing-chain.
        let opts = crate::image::OpenOptions {
            read_only: true,
            force_share: args.force_share,
            without_backing: !args.backing_chain,
            ..Default::default()
        };
        let top = Layer::open(&args.image, crate::format::BackingFormat::Qcow2, &opts)?;
        layers_from(&top)?
    } else if detected.format != ImageFormat::Cowimg {
        let layer = source::open_layer(&args.image, detected, args.force_share)?;
        vec![raw_info(&layer)?]
    } else if args.backing_chain {
        chain_info(&open_read_only(&args.image, args.force_share)?)?
    } else {
        // Like qemu-img info, the backing file is not opened: an overlay whose backing file
        // is missing can still be inspected.
        vec![cowimg_info(&open_without_backing(
            &args.image,
            false,
            args.force_share,
        )?)]
    })
}
