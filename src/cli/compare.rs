//! `cowimg compare`: whether two images read the same, with qemu-img compare's messages
//! and exit codes (0 identical, 1 different, 2 an error).
use super::progress::Progress;
use super::source::{self, ImageFormat, Source};
use crate::image::ExtentKind;
use clap::Args;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

pub const EXIT_DIFFERENT: u8 = 1;
pub const EXIT_ERROR: u8 = 2;

/// Bytes compared per read.
const CHUNK: u64 = 1 << 20;
/// qemu-img names the 512-byte sector that holds the first difference.
const SECTOR: u64 = 512;

#[derive(Args, Debug)]
#[command(
    after_help = "Exit status: 0 the images read the same, 1 they differ, 2 an \
    error. Images of different sizes are the same when the longer one reads zeros past \
    the shorter one's end, unless -s is given. A difference is reported at the start of \
    the 512-byte sector that holds it, as qemu-img reports it."
)]
pub struct CompareArgs {
    /// Format of IMAGE1: cowimg, raw or qcow2 (probed when not given).
    #[arg(short = 'f', value_name = "FMT", value_parser = source::parse_image_format)]
    pub format_a: Option<ImageFormat>,
    /// Format of IMAGE2.
    #[arg(short = 'F', value_name = "FMT", value_parser = source::parse_image_format)]
    pub format_b: Option<ImageFormat>,
    /// Strict: images of different sizes differ, and so do ranges allocated differently
    /// (data in one, a hole, zero marker or nothing in the other), as with qemu-img -s.
    #[arg(short = 's', long)]
    pub strict: bool,
    /// Do not take the shared locks (compare images other processes are writing).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Show progress.
    #[arg(short = 'p', long)]
    pub progress: bool,
    /// Print nothing; the exit status tells the result.
    #[arg(short = 'q', long)]
    pub quiet: bool,
    pub image1: PathBuf,
    pub image2: PathBuf,
}

pub fn run(args: CompareArgs) -> anyhow::Result<ExitCode> {
    let a = Source::open(&args.image1, args.format_a, args.force_share)?;
    let b = Source::open(&args.image2, args.format_b, args.force_share)?;
    let say = |text: String| -> anyhow::Result<()> {
        if !args.quiet {
            writeln!(std::io::stdout().lock(), "{text}")?;
        }
        Ok(())
    };
    let (size_a, size_b) = (a.virtual_size(), b.virtual_size());
    if size_a != size_b {
        if args.strict {
            say("Strict mode: Image size mismatch!".into())?;
            return Ok(ExitCode::from(EXIT_DIFFERENT));
        }
        say("Warning: Image size mismatch!".into())?;
    }
    let common = size_a.min(size_b);
    // -s also compares allocation, as qemu-img does: the first range where one image
    // holds data and the other a zero marker or nothing (or the like) is a difference.
    let status_mismatch = if args.strict {
        first_status_mismatch(&a, &b, common)?
    } else {
        None
    };
    let mut ranges = data_ranges(&a, 0, common)?;
    ranges.extend(data_ranges(&b, 0, common)?);
    let ranges = merged(ranges);
    let longer = if size_a > size_b { &a } else { &b };
    let tail = data_ranges(longer, common, longer.virtual_size() - common)?;
    let total: u64 = ranges.iter().chain(&tail).map(|(_, len)| len).sum();
    let mut progress = Progress::new(args.progress && !args.quiet);
    let mut done = 0;
    progress.update(0, total);
    let mut buf_a = vec![0u8; CHUNK as usize];
    let mut buf_b = vec![0u8; CHUNK as usize];
    let mut mismatch = None;
    'ranges: for &(start, len) in &ranges {
        for (pos, n) in chunks(start, len) {
            let (ca, cb) = (&mut buf_a[..n], &mut buf_b[..n]);
            a.read_at(ca, pos)?;
            b.read_at(cb, pos)?;
            if let Some(i) = ca.iter().zip(cb.iter()).position(|(x, y)| x != y) {
                mismatch = Some(pos + i as u64);
                break 'ranges;
            }
            done += n as u64;
            progress.update(done, total);
        }
    }
    if mismatch.is_none() {
        // Past the shorter image's end, the longer one must read zeros.
        'tail: for &(start, len) in &tail {
            for (pos, n) in chunks(start, len) {
                let chunk = &mut buf_a[..n];
                longer.read_at(chunk, pos)?;
                if let Some(i) = chunk.iter().position(|&x| x != 0) {
                    mismatch = Some(pos + i as u64);
                    break 'tail;
                }
                done += n as u64;
                progress.update(done, total);
            }
        }
    }
    progress.finish();
    if let Some(offset) = status_mismatch.filter(|&s| mismatch.is_none_or(|m| s <= m)) {
        say(format!(
            "Strict mode: Offset {offset} block status mismatch!"
        ))?;
        return Ok(ExitCode::from(EXIT_DIFFERENT));
    }
    Ok(match mismatch {
        Some(offset) => {
            say(format!(
                "Content mismatch at offset {}!",
                offset / SECTOR * SECTOR
            ))?;
            ExitCode::from(EXIT_DIFFERENT)
        }
        None => {
            say("Images are identical.".into())?;
            ExitCode::SUCCESS
        }
    })
}

/// The ranges of `[offset, offset + len)` that hold data; the rest reads as zeros.
fn data_ranges(image: &Source, offset: u64, len: u64) -> anyhow::Result<Vec<(u64, u64)>> {
    Ok(image
        .block_status(offset, len)?
        .into_iter()
        .filter(|e| e.kind == ExtentKind::Data)
        .map(|e| (e.offset, e.length))
        .collect())
}

/// The first offset below `len` (both images' size) where the two images' block status
/// differs. As in qemu-img, the status at an offset is that of the extent holding it,
/// including whether that extent reaches the end of the image: extents of the same kind
/// that end in different places differ where one of them reaches the end.
fn first_status_mismatch(a: &Source, b: &Source, len: u64) -> anyhow::Result<Option<u64>> {
    let (ea, eb) = (a.block_status(0, len)?, b.block_status(0, len)?);
    let status_at = |extents: &[crate::image::Extent], i: usize| {
        extents.get(i).map(|e| (e.kind, e.offset + e.length >= len))
    };
    let (mut i, mut j) = (0, 0);
    let mut pos = 0;
    while pos < len {
        if status_at(&ea, i) != status_at(&eb, j) {
            return Ok(Some(pos));
        }
        let (Some(x), Some(y)) = (ea.get(i), eb.get(j)) else {
            break;
        };
        let next = (x.offset + x.length).min(y.offset + y.length);
        if x.offset + x.length == next {
            i += 1;
        }
        if y.offset + y.length == next {
            j += 1;
        }
        pos = next;
    }
    Ok(None)
}

/// Sorted, with overlapping and touching ranges joined.
fn merged(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (start, len) in ranges {
        match out.last_mut() {
            Some((s, l)) if *s + *l >= start => *l = (*l).max(start + len - *s),
            _ => out.push((start, len)),
        }
    }
    out
}

/// `[start, start + len)` in pieces of at most `CHUNK` bytes.
fn chunks(start: u64, len: u64) -> impl Iterator<Item = (u64, usize)> {
    let end = start + len;
    (start..end)
        .step_by(CHUNK as usize)
        .map(move |pos| (pos, (end - pos).min(CHUNK) as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_and_touching_ranges_are_joined() {
        assert_eq!(
            merged(vec![(10, 5), (0, 4), (4, 2), (12, 10), (30, 1)]),
            vec![(0, 6), (10, 12), (30, 1)]
        );
    }

    #[test]
    fn chunks_cover_the_range_exactly() {
        let pieces: Vec<_> = chunks(5, 2 * CHUNK + 3).collect();
        assert_eq!(
            pieces,
            vec![
                (5, CHUNK as usize),
                (5 + CHUNK, CHUNK as usize),
                (5 + 2 * CHUNK, 3)
            ]
        );
    }
}
