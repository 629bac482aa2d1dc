//! `cowimg create`.
use super::size::{parse_cluster_size, parse_size};
use super::{backing_option, open_without_backing, parse_format};
use crate::format::BackingFormat;
use crate::image::{resolve_backing_path, CreateOptions, Image, Layer, OpenOptions};
use anyhow::{bail, Context};
use clap::Args;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The `-o` options create takes, with their help lines (`-o help`).
const OPTIONS: &[(&str, &str)] = &[
    ("size", "Virtual disk size (suffixes K, M, G, T, P, E)"),
    (
        "cluster_size",
        "cowimg cluster size: a power of two from 4K to 2M",
    ),
    (
        "backing_file",
        "File name of a base image (relative to the new image's directory)",
    ),
    ("backing_fmt", "Format of the backing file: raw or cowimg"),
    (
        "version",
        "Format version: 1, or 2 (a paged map, data placed in write order; 4 KiB blocks)",
    ),
];

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  cowimg create -s 10G disk.cow\n  \
    cowimg create disk.cow 10G\n  cowimg create -b base.raw -F raw overlay.cow\n  \
    cowimg create -o cluster_size=1M,backing_file=base.raw,backing_fmt=raw top.cow\n  \
    cowimg create -f raw disk.raw 10G")]
pub struct CreateArgs {
    /// Image format: cowimg (the default) or raw (a sparse file of SIZE bytes).
    #[arg(short = 'f', value_name = "FMT", value_parser = ["cowimg", "raw"])]
    pub format: Option<String>,
    /// Backing file, recorded as given: a relative path is relative to IMAGE's directory.
    #[arg(short = 'b', long = "backing", value_name = "BACKING")]
    pub backing: Option<String>,
    /// Format of the backing file: raw or cowimg (required with -b; never probed).
    #[arg(short = 'F', long = "backing-format", value_name = "FMT", value_parser = parse_format)]
    pub backing_format: Option<BackingFormat>,
    /// Do not open the backing file (it may not exist yet); the size must then be given.
    #[arg(short = 'u')]
    pub unsafe_backing: bool,
    /// Format options as KEY=VALUE[,KEY=VALUE...]: size, cluster_size, backing_file,
    /// backing_fmt; `-o help` lists them.
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Virtual size (suffixes K, M, G, T, P, E); defaults to the backing file's size.
    #[arg(short = 's', long = "size", value_name = "SIZE", value_parser = parse_size)]
    pub size: Option<u64>,
    /// Cluster size: a power of two from 4K to 2M (default 64K).
    #[arg(short = 'c', long = "cluster-size", value_name = "CLUSTER_SIZE",
          value_parser = parse_cluster_size)]
    pub cluster_size: Option<u64>,
    /// Format version of the new image: 1 (the default) or 2 (FORMAT-v2.md).
    #[arg(long = "format-version", value_name = "N", value_parser = parse_version)]
    pub format_version: Option<u32>,
    /// Print nothing on success.
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// The image file to create (an existing file is not overwritten).
    #[arg(required_unless_present = "options")]
    pub image: Option<PathBuf>,
    /// Virtual size, as `qemu-img create IMAGE SIZE` takes it.
    #[arg(value_name = "SIZE", value_parser = parse_size, conflicts_with = "size")]
    pub positional_size: Option<u64>,
}

/// What `-o` said.
#[derive(Debug, Default)]
struct FormatOptions {
    size: Option<u64>,
    cluster_size: Option<u64>,
    backing_file: Option<String>,
    backing_fmt: Option<BackingFormat>,
    version: Option<u32>,
}

fn parse_options(list: &[String]) -> anyhow::Result<Option<FormatOptions>> {
    let mut opts = FormatOptions::default();
    for item in list.iter().flat_map(|l| l.split(',')) {
        if item == "help" || item == "?" {
            return Ok(None);
        }
        let (key, value) = item
            .split_once('=')
            .with_context(|| format!("-o {item}: expected KEY=VALUE"))?;
        let bad = |e: String| anyhow::anyhow!("-o {key}={value}: {e}");
        match key {
            "size" => opts.size = Some(parse_size(value).map_err(bad)?),
            "cluster_size" => opts.cluster_size = Some(parse_cluster_size(value).map_err(bad)?),
            "backing_file" => opts.backing_file = Some(value.to_string()),
            "backing_fmt" => opts.backing_fmt = Some(parse_format(value).map_err(bad)?),
            "version" => opts.version = Some(parse_version(value).map_err(bad)?),
            _ => bail!(
                "-o {key}: unknown option; cowimg create takes {} (see -o help)",
                OPTIONS
                    .iter()
                    .map(|(k, _)| *k)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    Ok(Some(opts))
}

/// A value given both as a flag and in `-o` must be given once.
fn one_of<T>(flag: Option<T>, option: Option<T>, names: &str) -> anyhow::Result<Option<T>> {
    match (flag, option) {
        (Some(_), Some(_)) => bail!("{names}: given twice; give one of them"),
        (flag, option) => Ok(flag.or(option)),
    }
}

pub fn run(args: CreateArgs) -> anyhow::Result<ExitCode> {
    let Some(options) = parse_options(&args.options)? else {
        let mut out = std::io::stdout().lock();
        writeln!(out, "Supported options:")?;
        for (key, help) in OPTIONS {
            writeln!(out, "  {key:<16} - {help}")?;
        }
        return Ok(ExitCode::SUCCESS);
    };
    let Some(image) = args.image else {
        bail!("create needs an image file name");
    };
    let backing = backing_option(
        one_of(args.backing, options.backing_file, "-b and -o backing_file")?,
        one_of(
            args.backing_format,
            options.backing_fmt,
            "-F and -o backing_fmt",
        )?,
    )?;
    let size = one_of(
        args.size.or(args.positional_size),
        options.size,
        "the size and -o size",
    )?;
    let cluster_size = one_of(
        args.cluster_size,
        options.cluster_size,
        "-c and -o cluster_size",
    )?;
    if args.format.as_deref() == Some("raw") {
        return create_raw(&image, size, backing.is_some(), cluster_size, args.quiet);
    }
    match (&backing, size) {
        (None, None) => bail!(
            "{}: a size is needed (-s SIZE or IMAGE SIZE) when there is no backing file",
            image.display()
        ),
        (Some(_), None) if args.unsafe_backing => bail!(
            "{}: -u does not open the backing file, so the size must be given (-s SIZE)",
            image.display()
        ),
        (Some((path, format)), _) if !args.unsafe_backing => {
            check_backing_opens(&image, path, *format)?;
        }
        _ => {}
    }
    let version = one_of(
        args.format_version,
        options.version,
        "--format-version and -o version",
    )?
    .unwrap_or(1);
    if version == 2 && cluster_size.is_some_and(|c| c != 4096) {
        bail!("a version 2 image maps 4 KiB blocks: a cluster size does not apply to it");
    }
    let opts = CreateOptions {
        size,
        cluster_size: cluster_size.unwrap_or(CreateOptions::default().cluster_size),
        backing: backing.clone(),
        version,
    };
    Image::create(&image, &opts)?;
    if args.quiet {
        return Ok(ExitCode::SUCCESS);
    }
    // The size may have come from the backing file: report what was recorded.
    let created = open_without_backing(&image, false, true)?;
    let mut line = format!(
        "Formatting '{}', fmt=cowimg cluster_size={}",
        image.display(),
        created.cluster_size()
    );
    if let Some((path, format)) = &backing {
        line += &format!(" backing_file={path} backing_fmt={}", format.name());
    }
    if version != 1 {
        line += &format!(" version={version}");
    }
    line += &format!(" size={}", created.virtual_size());
    writeln!(std::io::stdout().lock(), "{line}")?;
    Ok(ExitCode::SUCCESS)
}

/// A dangling overlay is an error the user finds only at the first read: the backing file
/// must open, in the format given, unless -u says it is not there yet.
fn check_backing_opens(image: &Path, recorded: &str, format: BackingFormat) -> anyhow::Result<()> {
    let resolved = resolve_backing_path(image, recorded);
    let opts = OpenOptions {
        read_only: true,
        force_share: true,
        without_backing: true,
        ..Default::default()
    };
    match Layer::open(&resolved, format, &opts) {
        Ok(_) => Ok(()),
        // A file that is there but holds another format: say so, naming both (the same
        // check the open of an overlay makes), not "could not open".
        Err(_)
            if matches!(
                crate::image::check_recorded_format(&resolved, format),
                Err(crate::Error::Invalid { .. })
            ) =>
        {
            Err(crate::image::check_recorded_format(&resolved, format)
                .expect_err("checked just above")
                .into())
        }
        Err(e) => bail!(
            "{}: could not open backing file '{recorded}' as {} ({e}); use -u to create \
             the image without opening it",
            image.display(),
            format.name()
        ),
    }
}

fn create_raw(
    image: &Path,
    size: Option<u64>,
    has_backing: bool,
    cluster_size: Option<u64>,
    quiet: bool,
) -> anyhow::Result<ExitCode> {
    if has_backing {
        bail!("-f raw: a raw image has no backing file");
    }
    if cluster_size.is_some() {
        bail!("-f raw: a raw image has no clusters");
    }
    let Some(size) = size else {
        bail!(
            "{}: a size is needed (-s SIZE or IMAGE SIZE)",
            image.display()
        );
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(image)
        .map_err(|source| crate::Error::File {
            path: image.into(),
            op: "creating",
            source,
        })?;
    file.set_len(size).map_err(|source| crate::Error::File {
        path: image.into(),
        op: "setting the length",
        source,
    })?;
    if !quiet {
        writeln!(
            std::io::stdout().lock(),
            "Formatting '{}', fmt=raw size={size}",
            image.display()
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// A format version: 1 or 2.
pub fn parse_version(text: &str) -> Result<u32, String> {
    match text {
        "1" => Ok(1),
        "2" => Ok(2),
        _ => Err(format!("'{text}' is not a format version: expected 1 or 2")),
    }
}
