//! `cowimg resize`: grow or shrink an image's virtual size, as `qemu-img resize`.
use super::size::parse_size;
use super::source::{self, ImageFormat};
use crate::image::{ops, Image, OpenOptions};
use anyhow::bail;
use clap::Args;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Debug)]
#[command(
    after_help = "SIZE is a new size, or +SIZE / -SIZE relative to the current one \
    (suffixes K, M, G, T, P, E). The grown range reads as zeros, also where a backing file \
    is longer than the old size. Shrinking needs --shrink and drops everything past the new \
    end. A crash during a resize leaves the old size with all data, or the new size.\n\
    Examples:\n  cowimg resize disk.cow 20G\n  cowimg resize disk.cow +1G\n  \
    cowimg resize --shrink disk.cow -- -1G\n  cowimg resize -f raw disk.raw 20G"
)]
pub struct ResizeArgs {
    /// Format of IMAGE: cowimg or raw (probed when not given; a probed raw file is not
    /// resized without -f raw).
    #[arg(short = 'f', value_name = "FMT", value_parser = source::parse_image_format)]
    pub format: Option<ImageFormat>,
    /// Allow a smaller size: the data past the new end is dropped.
    #[arg(long)]
    pub shrink: bool,
    /// Print nothing on success.
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// The image to resize.
    pub image: PathBuf,
    /// The new size: SIZE, +SIZE or -SIZE.
    #[arg(value_name = "[+|-]SIZE", allow_hyphen_values = true)]
    pub size: String,
}

/// A size as `qemu-img resize` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NewSize {
    Absolute(u64),
    Grow(u64),
    Shrink(u64),
}

fn parse_new_size(text: &str) -> anyhow::Result<NewSize> {
    let (kind, digits): (fn(u64) -> NewSize, &str) = match text.as_bytes().first() {
        Some(b'+') => (NewSize::Grow, &text[1..]),
        Some(b'-') => (NewSize::Shrink, &text[1..]),
        _ => (NewSize::Absolute, text),
    };
    let value = parse_size(digits).map_err(|e| anyhow::anyhow!("size '{text}': {e}"))?;
    Ok(kind(value))
}

fn apply(current: u64, new: NewSize) -> anyhow::Result<u64> {
    match new {
        NewSize::Absolute(size) => Ok(size),
        NewSize::Grow(delta) => current
            .checked_add(delta)
            .ok_or_else(|| anyhow::anyhow!("+{delta}: the new size overflows")),
        NewSize::Shrink(delta) => current.checked_sub(delta).ok_or_else(|| {
            anyhow::anyhow!(
                "-{delta}: the image is only {current} bytes; the size cannot be negative"
            )
        }),
    }
}

pub fn run(args: ResizeArgs) -> anyhow::Result<ExitCode> {
    let requested = parse_new_size(&args.size)?;
    let detected = source::detect(&args.image, args.format)?;
    source::refuse_probed_raw_writes(&args.image, detected, "resize")?;
    let path = &args.image;
    match detected.format {
        ImageFormat::Qcow2 => {
            source::open_qcow2(path, &OpenOptions::default())?;
            bail!("{}: resizing qcow2 images is not supported", path.display());
        }
        ImageFormat::Raw => {
            let current = std::fs::metadata(path)
                .map_err(|source| crate::Error::File {
                    path: path.clone(),
                    op: "reading metadata",
                    source,
                })?
                .len();
            let new_size = apply(current, requested)?;
            check_shrink(current, new_size, args.shrink, args.quiet)?;
            ops::resize_raw(path, new_size)?;
        }
        ImageFormat::Cowimg => {
            // The backing chain is opened: growing over a longer backing file must hide it.
            let mut image = Image::open(path, &OpenOptions::default())?;
            let current = image.virtual_size();
            let new_size = apply(current, requested)?;
            check_shrink(current, new_size, args.shrink, args.quiet)?;
            if new_size != current {
                image.resize(new_size)?;
            }
        }
    }
    if !args.quiet {
        writeln!(std::io::stdout().lock(), "Image resized.")?;
    }
    Ok(ExitCode::SUCCESS)
}

fn check_shrink(current: u64, new_size: u64, shrink: bool, quiet: bool) -> anyhow::Result<()> {
    if new_size >= current {
        return Ok(());
    }
    if !shrink {
        bail!(
            "the new size {new_size} is smaller than the current {current}: use --shrink to \
             shrink the image (the data past the new end is dropped)"
        );
    }
    if !quiet {
        eprintln!("cowimg: warning: shrinking drops all data past the new end ({new_size} bytes)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_may_be_absolute_or_relative_and_never_go_below_zero() {
        assert_eq!(parse_new_size("1G").unwrap(), NewSize::Absolute(1 << 30));
        assert_eq!(parse_new_size("+64K").unwrap(), NewSize::Grow(65536));
        assert_eq!(parse_new_size("-1M").unwrap(), NewSize::Shrink(1 << 20));
        assert!(parse_new_size("+").is_err());
        assert!(parse_new_size("--1M").is_err());
        assert_eq!(apply(4096, NewSize::Grow(4096)).unwrap(), 8192);
        assert_eq!(apply(4096, NewSize::Shrink(4096)).unwrap(), 0);
        assert!(apply(4096, NewSize::Shrink(4097)).is_err());
        assert!(apply(u64::MAX, NewSize::Grow(1)).is_err());
    }
}
