//! `cowimg check`: qemu-img check's output and exit codes (0 clean, 2 corruption, 3 leaks
//! only, 1 when the check itself could not run, 63 when the format has no checks).
use super::progress::Progress;
use super::source::{self, ImageFormat};
use super::{print_json, OutputArg};
use crate::image::ops::{self, CheckReport};
use anyhow::bail;
use clap::Args;
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

const EXIT_CORRUPT: u8 = 2;
const EXIT_LEAKS: u8 = 3;
/// qemu-img's exit status for "this image format does not support checks".
const EXIT_NO_CHECKS: u8 = 63;

#[derive(Args, Debug)]
#[command(
    after_help = "Exit status: 0 no errors, 1 the check could not run, 2 corruption \
    found, 3 leaked clusters only, 63 the image is not cowimg (raw has nothing to check)."
)]
pub struct CheckArgs {
    /// Format of IMAGE: cowimg, raw or qcow2 (probed when not given). Only cowimg images
    /// have checks.
    #[arg(short = 'f', value_name = "FMT", value_parser = source::parse_image_format)]
    pub format: Option<ImageFormat>,
    /// Print nothing but errors; the exit status tells the result (overrides -p).
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// Show progress through the file (the scan for leaks, and their repair with -r). Not
    /// with --output=json, which is alone on stdout.
    #[arg(short = 'p', long)]
    pub progress: bool,
    /// Free leaked clusters (corruption is reported, never \"repaired\" by guessing).
    #[arg(short = 'r', long)]
    pub repair: bool,
    #[command(flatten)]
    pub output: OutputArg,
    /// Do not take the shared lock (check an image another process has open; the result
    /// may then be inconsistent). Not with --repair.
    #[arg(short = 'U', long = "force-share", conflicts_with = "repair")]
    pub force_share: bool,
    /// The cowimg image (its backing file is not checked).
    pub image: PathBuf,
}

/// qemu-img check's JSON fields, plus the corruption messages themselves.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct CheckJson<'a> {
    filename: &'a str,
    format: &'static str,
    check_errors: u64,
    corruptions: usize,
    leaks: u64,
    leaks_fixed: u64,
    allocated_clusters: u64,
    total_clusters: u64,
    image_end_offset: u64,
    corruption_messages: &'a [String],
    /// Header slots that fail their checksum: a torn header write, not corruption.
    stale_header_slots: &'a [usize],
}

pub fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let detected = source::detect(&args.image, args.format)?;
    if detected.format != ImageFormat::Cowimg {
        eprintln!(
            "cowimg: {}: this image format ({}) does not support checks",
            args.image.display(),
            detected.format.name()
        );
        return Ok(ExitCode::from(EXIT_NO_CHECKS));
    }
    if args.progress && args.output.is_json() && !args.quiet {
        bail!("-p and --output=json both write to stdout: give one of them");
    }
    let mut progress = Progress::new(args.progress && !args.quiet);
    let report = ops::check_with(
        &args.image,
        args.repair,
        args.force_share,
        &mut |done, total| progress.update(done, total),
    )?;
    progress.finish();
    let remaining_leaks = report.leaks.saturating_sub(report.leaks_fixed);
    let mut out = std::io::stdout().lock();
    if args.output.is_json() {
        let json = CheckJson {
            filename: &report.filename,
            format: "cowimg",
            check_errors: 0,
            corruptions: report.corruptions.len(),
            leaks: remaining_leaks,
            leaks_fixed: report.leaks_fixed,
            allocated_clusters: report.allocated_clusters,
            total_clusters: report.total_clusters,
            image_end_offset: report.image_end_offset,
            corruption_messages: &report.corruptions,
            stale_header_slots: &report.stale_header_slots,
        };
        print_json(&mut out, &json)?;
    } else if !args.quiet {
        print_human(&mut out, &report, remaining_leaks)?;
    }
    Ok(if !report.corruptions.is_empty() {
        ExitCode::from(EXIT_CORRUPT)
    } else if remaining_leaks > 0 {
        ExitCode::from(EXIT_LEAKS)
    } else {
        ExitCode::SUCCESS
    })
}

fn print_human(
    out: &mut impl Write,
    report: &CheckReport,
    remaining_leaks: u64,
) -> std::io::Result<()> {
    for corruption in &report.corruptions {
        writeln!(out, "ERROR {corruption}")?;
    }
    if report.leaks_fixed > 0 {
        writeln!(
            out,
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    0 corruptions\n",
            report.leaks_fixed
        )?;
    }
    let corruptions = report.corruptions.len();
    if corruptions == 0 && remaining_leaks == 0 {
        writeln!(out, "No errors were found on the image.")?;
    }
    if corruptions > 0 {
        writeln!(
            out,
            "\n{corruptions} errors were found on the image.\n\
             Data may be corrupted, or further writes to the image may corrupt it."
        )?;
    }
    if remaining_leaks > 0 {
        writeln!(
            out,
            "\n{remaining_leaks} leaked clusters were found on the image.\n\
             This means waste of disk space, but no harm to data."
        )?;
    }
    if report.total_clusters > 0 {
        writeln!(
            out,
            "{}/{} = {:.2}% allocated, 0.00% fragmented, 0.00% compressed clusters",
            report.allocated_clusters,
            report.total_clusters,
            100.0 * report.allocated_clusters as f64 / report.total_clusters as f64
        )?;
    }
    if report.version == 2 {
        // Data alone never exceeds the disk: metadata and leaks are counted apart.
        writeln!(
            out,
            "Metadata: {} bytes (header slots, map pages, journal); leaked: {} bytes",
            report.metadata_bytes,
            report.leaks.saturating_sub(report.leaks_fixed) * crate::format::v2::BLOCK
        )?;
    }
    if report.image_end_offset > 0 {
        writeln!(out, "Image end offset: {}", report.image_end_offset)?;
    }
    Ok(())
}
