//! The qemu-img habits of issue 10: -f and probing, --output, -q, -U, create -u/-o,
//! convert -S/-n/-W/-c, map --start-offset/--max-length, check's exit 63, -p without a
//! terminal, and the resize, measure and compare subcommands.
mod cli_support;

use cli_support::{
    assert_fails, assert_same_bytes, contents, cowimg_in, cowimg_io, have_tool, json, qemu_in,
    random_bytes, read_file, tempdir, write_file,
};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

const MIB: usize = 1 << 20;

/// A 4 MiB raw file with data at 1 MiB and a hole elsewhere, and a cowimg copy of it.
fn raw_and_cowimg(d: &Path) -> Vec<u8> {
    let mut bytes = vec![0u8; 4 * MIB];
    bytes[MIB..MIB + 200_000].copy_from_slice(&random_bytes(200_000, 1));
    write_file(&d.join("disk.raw"), &bytes);
    cowimg_in(d, &["convert", "-O", "cowimg", "disk.raw", "disk.cow"]).ok();
    bytes
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).expect("metadata").blocks() * 512
}

#[test]
fn check_exits_63_on_images_whose_format_has_no_checks() {
    let dir = tempdir();
    let d = dir.path();
    write_file(&d.join("base.raw"), &vec![0u8; 65536]);
    for args in [
        vec!["check", "base.raw"],
        vec!["check", "-f", "raw", "base.raw"],
        vec!["check", "--output=json", "base.raw"],
    ] {
        let run = cowimg_in(d, &args);
        assert_fails(&run, 63, &["base.raw", "does not support checks"]);
        assert!(!run.stderr.contains("corrupt"), "{}", run.stderr);
    }
    // A cowimg image still gets its check.
    cowimg_in(d, &["create", "-s", "1M", "img.cow"]).ok();
    cowimg_in(d, &["check", "-f", "cowimg", "img.cow"]).ok();
}

#[test]
fn create_refuses_a_backing_file_it_cannot_open_unless_u_is_given() {
    let dir = tempdir();
    let d = dir.path();
    let run = cowimg_in(
        d,
        &[
            "create",
            "-b",
            "missing.raw",
            "-F",
            "raw",
            "-s",
            "1G",
            "top.cow",
        ],
    );
    assert_fails(&run, 1, &["missing.raw", "-u"]);
    assert!(
        !d.join("top.cow").exists(),
        "a dangling overlay was created"
    );

    let run = cowimg_in(
        d,
        &["create", "-u", "-b", "missing.raw", "-F", "raw", "top.cow"],
    );
    assert_fails(&run, 1, &["-u", "size"]);

    cowimg_in(
        d,
        &[
            "create",
            "-u",
            "-b",
            "missing.raw",
            "-F",
            "raw",
            "-s",
            "1G",
            "top.cow",
        ],
    )
    .ok();
    let info = json(&cowimg_in(d, &["info", "--output=json", "top.cow"]).ok());
    assert_eq!(info["backing-filename"], "missing.raw");
    assert_eq!(info["virtual-size"], 1u64 << 30);
}

#[test]
fn create_takes_o_options_lists_them_with_help_and_names_an_unknown_key() {
    let dir = tempdir();
    let d = dir.path();
    write_file(&d.join("base.raw"), &vec![7u8; 3 * MIB]);
    cowimg_in(
        d,
        &[
            "create",
            "-o",
            "cluster_size=1M,backing_file=base.raw,backing_fmt=raw",
            "top.cow",
        ],
    )
    .ok();
    let info = json(&cowimg_in(d, &["info", "--output", "json", "top.cow"]).ok());
    assert_eq!(info["cluster-size"], 1 << 20);
    assert_eq!(info["backing-filename-format"], "raw");
    assert_eq!(info["virtual-size"], 3 * MIB);

    cowimg_in(d, &["create", "-o", "size=2M", "sized.cow"]).ok();
    let info = json(&cowimg_in(d, &["info", "--output=json", "sized.cow"]).ok());
    assert_eq!(info["virtual-size"], 2 * MIB);

    let help = cowimg_in(d, &["create", "-o", "help"]).ok();
    for key in ["size", "cluster_size", "backing_file", "backing_fmt"] {
        assert!(help.contains(key), "-o help does not list {key}: {help}");
    }
    let run = cowimg_in(
        d,
        &["create", "-o", "preallocation=full", "-s", "1M", "x.cow"],
    );
    assert_fails(&run, 1, &["preallocation", "unknown option"]);
    assert!(!d.join("x.cow").exists());
    let run = cowimg_in(d, &["create", "-o", "cluster_size=3K", "-s", "1M", "x.cow"]);
    assert_fails(&run, 1, &["cluster_size=3K"]);
}

#[test]
fn output_json_is_accepted_by_info_map_check_and_measure_and_matches_json() {
    let dir = tempdir();
    let d = dir.path();
    raw_and_cowimg(d);
    for command in ["info", "map", "check"] {
        let new = cowimg_in(d, &[command, "--output=json", "disk.cow"]).ok();
        let old = cowimg_in(d, &[command, "--json", "disk.cow"]).ok();
        assert_eq!(json(&new), json(&old), "{command}");
        let human = cowimg_in(d, &[command, "--output=human", "disk.cow"]).ok();
        assert!(serde_json::from_str::<serde_json::Value>(&human).is_err());
    }
    let measure = json(&cowimg_in(d, &["measure", "--output=json", "disk.cow"]).ok());
    assert_eq!(measure["required"], 4 * MIB);
    assert_eq!(measure["fully-allocated"], 4 * MIB);
    let run = cowimg_in(d, &["info", "--output=yaml", "disk.cow"]);
    assert_fails(&run, 1, &["yaml"]);
}

#[test]
fn every_subcommand_accepts_f() {
    let dir = tempdir();
    let d = dir.path();
    let bytes = raw_and_cowimg(d);
    cowimg_in(d, &["create", "-b", "disk.cow", "-F", "cowimg", "top.cow"]).ok();
    cowimg_io(d, "top.cow", &["write -P 9 0 4k"]).ok();
    for args in [
        vec!["info", "-f", "cowimg", "disk.cow"],
        vec!["info", "-f", "raw", "disk.raw"],
        vec!["map", "-f", "cowimg", "disk.cow"],
        vec!["map", "-f", "raw", "disk.raw"],
        vec!["check", "-f", "cowimg", "disk.cow"],
        vec!["measure", "-f", "raw", "disk.raw"],
        vec![
            "compare", "-f", "raw", "-F", "cowimg", "disk.raw", "disk.cow",
        ],
        vec![
            "convert", "-f", "cowimg", "-O", "raw", "disk.cow", "out.raw",
        ],
        vec!["io", "-f", "cowimg", "disk.cow", "-c", "read 0 1"],
        vec!["resize", "-f", "cowimg", "disk.cow", "4M"],
        vec![
            "rebase", "-f", "cowimg", "-u", "-b", "disk.cow", "-F", "cowimg", "top.cow",
        ],
        vec!["commit", "-f", "cowimg", "top.cow"],
    ] {
        cowimg_in(d, &args).ok();
    }
    let mut expected = bytes;
    expected[..4096].fill(9);
    assert_same_bytes(&contents(d, "disk.cow"), &expected, "after the commit");
    // Writable serve and io take only cowimg: a raw file gets a message, not a hang.
    let run = cowimg_in(d, &["serve", "-f", "raw", "--socket", "s.sock", "disk.raw"]);
    assert_fails(&run, 1, &["disk.raw", "cowimg image", "--read-only"]);
    let run = cowimg_in(d, &["io", "disk.raw", "-c", "read 0 1"]);
    assert_fails(&run, 1, &["disk.raw", "probed as raw", "qemu-io -f raw"]);
    let run = cowimg_in(d, &["info", "-f", "vmdk", "disk.raw"]);
    assert_fails(&run, 1, &["vmdk"]);
}

#[test]
fn a_probed_raw_image_is_not_written_without_f_raw() {
    let dir = tempdir();
    let d = dir.path();
    write_file(&d.join("disk.raw"), &vec![5u8; MIB]);
    let run = cowimg_in(d, &["resize", "disk.raw", "2M"]);
    assert_fails(&run, 1, &["disk.raw", "probed as raw", "-f raw"]);
    assert_eq!(read_file(&d.join("disk.raw")).len(), MIB);
    cowimg_in(d, &["resize", "-f", "raw", "disk.raw", "2M"]).ok();
    assert_eq!(read_file(&d.join("disk.raw")).len(), 2 * MIB);
    let run = cowimg_in(d, &["commit", "-f", "raw", "disk.raw"]);
    assert_fails(
        &run,
        1,
        &["disk.raw", "needs a cowimg image", "no backing file"],
    );
}

#[test]
fn a_qcow2_image_is_recognised_by_its_magic() {
    let dir = tempdir();
    let d = dir.path();
    let mut bytes = vec![0u8; 65536];
    bytes[..4].copy_from_slice(b"QFI\xfb");
    write_file(&d.join("disk.qcow2"), &bytes);
    for args in [
        vec!["info", "disk.qcow2"],
        vec!["map", "disk.qcow2"],
        vec!["convert", "-O", "raw", "disk.qcow2", "out.raw"],
        vec!["info", "-f", "qcow2", "disk.qcow2"],
    ] {
        let run = cowimg_in(d, &args);
        assert_fails(&run, 1, &["disk.qcow2", "qcow2"]);
        assert!(!run.stdout.contains("file format: raw"), "{}", run.stdout);
    }
    let run = cowimg_in(d, &["check", "disk.qcow2"]);
    assert_eq!(run.code, Some(63), "{}", run.stderr);
}

#[test]
fn progress_into_a_pipe_prints_qemu_img_lines() {
    let dir = tempdir();
    let d = dir.path();
    raw_and_cowimg(d);
    let out = cowimg_in(d, &["convert", "-p", "-O", "raw", "disk.cow", "out.raw"]).ok();
    assert!(out.starts_with("    (0.00/100%)\r"), "{out:?}");
    assert!(out.ends_with("    (100.00/100%)\r\n"), "{out:?}");
    for line in out.trim_end_matches('\n').split_terminator('\r') {
        let figure = line
            .strip_prefix("    (")
            .and_then(|l| l.strip_suffix("/100%)"))
            .unwrap_or_else(|| panic!("not a progress line: {line:?}"));
        let value: f64 = figure.parse().expect("a percentage");
        assert!((0.0..=100.0).contains(&value), "{line:?}");
    }
    if have_tool("qemu-img") {
        let theirs = qemu_in(
            d,
            "qemu-img",
            &["convert", "-p", "-O", "raw", "disk.raw", "q.raw"],
        )
        .ok();
        assert!(theirs.starts_with("    (0.00/100%)\r"), "{theirs:?}");
        assert!(theirs.ends_with("    (100.00/100%)\r\n"), "{theirs:?}");
    }
    let quiet = cowimg_in(
        d,
        &["convert", "-p", "-q", "-O", "raw", "disk.cow", "out.raw"],
    )
    .ok();
    assert_eq!(quiet, "");
    cowimg_in(d, &["create", "-b", "disk.cow", "-F", "cowimg", "top.cow"]).ok();
    let commit = cowimg_in(d, &["commit", "-p", "top.cow"]).ok();
    assert!(commit.contains("(100.00/100%)\r\n"), "{commit:?}");
    assert!(commit.ends_with("Image committed.\n"), "{commit:?}");
    let compare = cowimg_in(d, &["compare", "-p", "disk.cow", "disk.raw"]).ok();
    assert!(compare.starts_with("    (0.00/100%)\r"), "{compare:?}");
    assert!(
        compare.ends_with("\nImages are identical.\n"),
        "{compare:?}"
    );
}

/// Splits the stdout of a `-p` run into the figures of its qemu-img progress lines and what
/// follows them, asserting qemu-img's form: lines `    (N.NN/100%)` each ended by `\r`,
/// from 0.00, never going down, to 100.00, then a newline.
fn progress_then_rest(out: &str) -> (Vec<f64>, &str) {
    let (progress, rest) = out
        .split_once('\n')
        .unwrap_or_else(|| panic!("no newline after the progress lines: {out:?}"));
    let lines: Vec<&str> = progress
        .strip_suffix('\r')
        .unwrap_or_else(|| panic!("the last progress line is not ended by \\r: {out:?}"))
        .split('\r')
        .collect();
    let figures: Vec<f64> = lines
        .iter()
        .map(|line| {
            line.strip_prefix("    (")
                .and_then(|l| l.strip_suffix("/100%)"))
                .and_then(|f| f.parse().ok())
                .unwrap_or_else(|| panic!("not a progress line: {line:?} in {out:?}"))
        })
        .collect();
    assert_eq!(lines[0], "    (0.00/100%)", "{out:?}");
    assert_eq!(lines[lines.len() - 1], "    (100.00/100%)", "{out:?}");
    assert!(
        figures.windows(2).all(|w| w[0] <= w[1]),
        "progress went down: {out:?}"
    );
    (figures, rest)
}

/// Appends `clusters` blocks of 64 KiB that nothing references past the end of `image`:
/// leaked clusters for check (written in place, so that no hole of the file is filled).
fn leak_clusters(d: &Path, image: &str, clusters: usize) {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join(image))
        .expect("opening");
    let end = file.metadata().expect("stat").len().next_multiple_of(65536);
    std::os::unix::fs::FileExt::write_all_at(&file, &random_bytes(clusters * 65536, 3), end)
        .expect("appending");
}

#[test]
fn check_repair_with_p_prints_progress_lines_up_to_100_percent_then_the_repair_report() {
    let dir = tempdir();
    let d = dir.path();
    cowimg_in(d, &["create", "-s", "64M", "img.cow"]).ok();
    cowimg_io(d, "img.cow", &["write -P 1 0 20M", "flush"]).ok();
    leak_clusters(d, "img.cow", 3);
    let before = contents(d, "img.cow");
    assert_eq!(cowimg_in(d, &["check", "img.cow"]).code, Some(3));

    let run = cowimg_in(d, &["check", "--repair", "-p", "img.cow"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let (figures, report) = progress_then_rest(&run.stdout);
    // 20 MiB of data in 1% steps: the scan is shown as it goes, not only at its end.
    assert!(figures.len() > 20, "{figures:?}");
    assert!(
        report.starts_with(
            "The following inconsistencies were found and repaired:\n\n    3 leaked clusters\n"
        ),
        "{report:?}"
    );
    assert!(
        report.contains("No errors were found on the image.\n"),
        "{report:?}"
    );
    assert_eq!(cowimg_in(d, &["check", "img.cow"]).code, Some(0));
    assert_same_bytes(&contents(d, "img.cow"), &before, "repair changes no data");

    // A check without --repair shows its scan the same way; -q silences it; JSON, which
    // is alone on stdout, is not mixed with it.
    let out = cowimg_in(d, &["check", "-p", "img.cow"]).ok();
    let (_, report) = progress_then_rest(&out);
    assert!(report.starts_with("No errors were found"), "{report:?}");
    leak_clusters(d, "img.cow", 1);
    let run = cowimg_in(d, &["check", "-r", "-p", "-q", "img.cow"]);
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (Some(0), ""),
        "{}",
        run.stderr
    );
    assert_eq!(cowimg_in(d, &["check", "img.cow"]).code, Some(0));
    let run = cowimg_in(d, &["check", "-p", "--output=json", "img.cow"]);
    assert_fails(&run, 1, &["-p", "--output=json"]);
}

#[test]
fn p_shows_progress_on_every_long_operation_and_q_silences_it() {
    let dir = tempdir();
    let d = dir.path();
    cowimg_in(d, &["create", "-s", "4M", "other.cow"]).ok();
    cowimg_io(d, "other.cow", &["write -P 9 0 4M"]).ok();
    // A fresh disk.cow (commit writes into it) and top.cow over it for each run.
    let top = |d: &Path| {
        raw_and_cowimg(d);
        let _ = std::fs::remove_file(d.join("top.cow"));
        cowimg_in(d, &["create", "-b", "disk.cow", "-F", "cowimg", "top.cow"]).ok();
        cowimg_io(d, "top.cow", &["write -P 5 2M 1M"]).ok();
    };
    // Each operation with -p, what it prints after its progress, and with -q added.
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["commit", "-p", "top.cow"], "Image committed.\n"),
        (vec!["convert", "-p", "-O", "raw", "top.cow", "out.raw"], ""),
        (
            vec!["convert", "-p", "-O", "qcow2", "top.cow", "out.qcow2"],
            "",
        ),
        (
            vec!["convert", "-p", "-O", "cowimg", "top.cow", "out.cow"],
            "",
        ),
        (
            vec!["rebase", "-p", "-b", "other.cow", "-F", "cowimg", "top.cow"],
            "",
        ),
        (
            vec!["compare", "-p", "top.cow", "disk.cow"],
            "Content mismatch at offset 2097152!\n",
        ),
        (
            vec!["check", "-r", "-p", "top.cow"],
            "No errors were found on the image.\n",
        ),
    ];
    for (args, after) in &cases {
        top(d);
        let run = cowimg_in(d, args);
        let expected_code = if args[0] == "compare" { 1 } else { 0 };
        assert_eq!(run.code, Some(expected_code), "{args:?}: {}", run.stderr);
        let (_, rest) = progress_then_rest(&run.stdout);
        assert!(rest.starts_with(after), "{args:?}: {rest:?}");

        top(d);
        let mut quiet = args.clone();
        quiet.insert(1, "-q");
        let run = cowimg_in(d, &quiet);
        assert_eq!(
            (run.code, run.stdout.as_str()),
            (Some(expected_code), ""),
            "{quiet:?}: {}",
            run.stderr
        );
    }
    // -q silences the progress, not the work: a rebase with -p -q moves top.cow onto
    // other.cow and it reads what it read before.
    top(d);
    let before = contents(d, "top.cow");
    cowimg_in(
        d,
        &[
            "rebase",
            "-p",
            "-q",
            "-b",
            "other.cow",
            "-F",
            "cowimg",
            "top.cow",
        ],
    )
    .ok();
    assert_same_bytes(&contents(d, "top.cow"), &before, "rebase -p -q");
    let info = json(&cowimg_in(d, &["info", "--output=json", "top.cow"]).ok());
    assert_eq!(info["backing-filename"], "other.cow");
}

/// Runs `cowimg ARGS` in `dir` under a pseudo-terminal (`script`), returning what the
/// terminal showed.
fn on_a_terminal(dir: &Path, args: &[&str]) -> String {
    let line = std::iter::once(env!("CARGO_BIN_EXE_cowimg"))
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let output = std::process::Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running script");
    assert!(output.status.success(), "{line}: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn p_on_a_terminal_draws_a_bar_instead_of_lines_and_q_hides_it() {
    if !have_tool("script") {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    raw_and_cowimg(d);
    cowimg_in(d, &["create", "-b", "disk.cow", "-F", "cowimg", "top.cow"]).ok();
    cowimg_io(d, "top.cow", &["write -P 5 2M 1M"]).ok();
    leak_clusters(d, "disk.cow", 1);
    let full_bar = format!("{} 100%", "\u{2588}".repeat(40));
    for args in [
        &["convert", "-p", "-O", "raw", "top.cow", "out.raw"][..],
        &["compare", "-p", "disk.cow", "disk.raw"],
        &["check", "-r", "-p", "disk.cow"],
        &["rebase", "-p", "-b", "disk.raw", "-F", "raw", "top.cow"],
        &["commit", "-p", "top.cow"],
    ] {
        let screen = on_a_terminal(d, args);
        assert!(screen.contains(&full_bar), "{args:?}: {screen:?}");
        assert!(!screen.contains("/100%)"), "{args:?}: {screen:?}");
        let mut quiet = args.to_vec();
        quiet.insert(1, "-q");
        let screen = on_a_terminal(d, &quiet);
        assert!(!screen.contains('\u{2588}'), "{quiet:?}: {screen:?}");
    }
}

#[test]
fn quiet_leaves_stdout_empty() {
    let dir = tempdir();
    let d = dir.path();
    raw_and_cowimg(d);
    for args in [
        vec!["create", "-q", "-s", "1M", "q.cow"],
        vec!["create", "-q", "-b", "disk.cow", "-F", "cowimg", "top.cow"],
        vec!["commit", "-q", "top.cow"],
        vec!["resize", "-q", "disk.cow", "+1M"],
        vec!["rebase", "-q", "-u", "-b", "", "top.cow"],
        vec!["check", "-q", "disk.cow"],
        vec!["convert", "-q", "-O", "raw", "disk.cow", "out.raw"],
    ] {
        assert_eq!(cowimg_in(d, &args).ok(), "", "{args:?}");
    }
    let run = cowimg_in(d, &["compare", "-q", "disk.cow", "disk.raw"]);
    assert_eq!((run.code, run.stdout.as_str()), (Some(0), ""));
    let run = cowimg_in(d, &["compare", "-q", "-s", "disk.cow", "disk.raw"]);
    assert_eq!((run.code, run.stdout.as_str()), (Some(1), ""));
}

#[test]
fn force_share_is_accepted_where_qemu_img_takes_it() {
    let dir = tempdir();
    let d = dir.path();
    raw_and_cowimg(d);
    for args in [
        vec!["info", "-U", "disk.cow"],
        vec!["map", "-U", "disk.cow"],
        vec!["check", "-U", "disk.cow"],
        vec!["convert", "-U", "-O", "raw", "disk.cow", "out.raw"],
        vec!["compare", "-U", "disk.cow", "disk.raw"],
        vec!["measure", "-U", "-O", "cowimg", "disk.cow"],
    ] {
        cowimg_in(d, &args).ok();
    }
    // Not where the command writes the image.
    let run = cowimg_in(d, &["resize", "-U", "disk.cow", "8M"]);
    assert_fails(&run, 1, &["-U"]);
}

#[test]
fn convert_c_is_refused_as_compression() {
    let dir = tempdir();
    let d = dir.path();
    raw_and_cowimg(d);
    let run = cowimg_in(d, &["convert", "-c", "-O", "cowimg", "disk.raw", "c.cow"]);
    assert_fails(
        &run,
        1,
        &["-c", "compression is not supported", "cluster_size"],
    );
    assert!(!d.join("c.cow").exists());
    cowimg_in(
        d,
        &[
            "convert",
            "--cluster-size",
            "16K",
            "-O",
            "cowimg",
            "disk.raw",
            "c.cow",
        ],
    )
    .ok();
    let info = json(&cowimg_in(d, &["info", "--output=json", "c.cow"]).ok());
    assert_eq!(info["cluster-size"], 16384);
    let run = cowimg_in(
        d,
        &[
            "convert",
            "-o",
            "compression_type=zstd",
            "disk.raw",
            "x.raw",
        ],
    );
    assert_fails(&run, 1, &["compression_type", "unknown option"]);
}

#[test]
fn convert_s_0_allocates_every_byte_and_the_default_leaves_holes() {
    let dir = tempdir();
    let d = dir.path();
    let bytes = raw_and_cowimg(d);
    cowimg_in(d, &["convert", "-O", "raw", "disk.cow", "sparse.raw"]).ok();
    cowimg_in(
        d,
        &["convert", "-S", "0", "-O", "raw", "disk.cow", "full.raw"],
    )
    .ok();
    assert_same_bytes(&read_file(&d.join("full.raw")), &bytes, "-S 0");
    assert_same_bytes(&read_file(&d.join("sparse.raw")), &bytes, "default -S");
    assert!(allocated(&d.join("sparse.raw")) < MIB as u64);
    assert!(allocated(&d.join("full.raw")) >= 4 * MIB as u64);
    // A large -S leaves only long zero runs as holes: still the same bytes.
    cowimg_in(
        d,
        &["convert", "-S", "1M", "-O", "raw", "disk.cow", "coarse.raw"],
    )
    .ok();
    assert_same_bytes(&read_file(&d.join("coarse.raw")), &bytes, "-S 1M");
    cowimg_in(
        d,
        &["convert", "-S", "0", "-O", "cowimg", "disk.raw", "full.cow"],
    )
    .ok();
    assert_same_bytes(&contents(d, "full.cow"), &bytes, "-S 0 to cowimg");
    assert!(allocated(&d.join("full.cow")) >= 4 * MIB as u64);
    let run = cowimg_in(d, &["convert", "-S", "1000", "disk.cow", "x.raw"]);
    assert_fails(&run, 1, &["512"]);
}

#[test]
fn convert_n_writes_into_an_existing_target_and_zeroes_what_the_source_reads_as_zeros() {
    let dir = tempdir();
    let d = dir.path();
    let bytes = raw_and_cowimg(d);
    write_file(&d.join("target.raw"), &vec![0xffu8; 5 * MIB]);
    cowimg_in(
        d,
        &["convert", "-n", "-W", "-O", "raw", "disk.cow", "target.raw"],
    )
    .ok();
    let target = read_file(&d.join("target.raw"));
    assert_eq!(target.len(), 5 * MIB, "-n must not truncate the target");
    assert_same_bytes(&target[..4 * MIB], &bytes, "the copied range");
    assert!(target[4 * MIB..].iter().all(|&b| b == 0xff));

    cowimg_in(d, &["create", "-s", "4M", "target.cow"]).ok();
    cowimg_io(d, "target.cow", &["write -P 0xee 0 4M"]).ok();
    cowimg_in(
        d,
        &["convert", "-n", "-O", "cowimg", "disk.raw", "target.cow"],
    )
    .ok();
    assert_same_bytes(
        &contents(d, "target.cow"),
        &bytes,
        "into an existing cowimg",
    );

    write_file(&d.join("small.raw"), &vec![0u8; MIB]);
    let run = cowimg_in(d, &["convert", "-n", "-O", "raw", "disk.cow", "small.raw"]);
    assert_fails(&run, 1, &["small.raw", "smaller than the source"]);
    let run = cowimg_in(d, &["convert", "-n", "-O", "raw", "disk.raw", "target.cow"]);
    assert_fails(&run, 1, &["target.cow", "cowimg image"]);
    let run = cowimg_in(
        d,
        &["convert", "-n", "-O", "raw", "disk.cow", "missing.raw"],
    );
    assert_fails(&run, 1, &["missing.raw"]);
    assert!(!d.join("missing.raw").exists());
}

#[test]
fn map_start_offset_and_max_length_limit_the_range() {
    let dir = tempdir();
    let d = dir.path();
    raw_and_cowimg(d);
    let map = json(
        &cowimg_in(
            d,
            &[
                "map",
                "--output=json",
                "--start-offset",
                "960K",
                "--max-length",
                "1M",
                "disk.cow",
            ],
        )
        .ok(),
    );
    let extents = map.as_array().expect("an array");
    assert_eq!(extents[0]["start"], 960 * 1024);
    let total: u64 = extents.iter().map(|e| e["length"].as_u64().unwrap()).sum();
    assert_eq!(total, 1 << 20);
    assert!(extents.iter().any(|e| e["data"] == true));
    let tail = json(
        &cowimg_in(
            d,
            &["map", "--output=json", "--start-offset", "3M", "disk.raw"],
        )
        .ok(),
    );
    let total: u64 = tail
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 1 << 20);
    let past = json(
        &cowimg_in(
            d,
            &["map", "--output=json", "--start-offset", "1G", "disk.cow"],
        )
        .ok(),
    );
    assert_eq!(past, serde_json::json!([]));
}

#[test]
fn resize_grows_and_shrinks_cowimg_and_raw_images() {
    let dir = tempdir();
    let d = dir.path();
    let bytes = raw_and_cowimg(d);
    assert_eq!(
        cowimg_in(d, &["resize", "disk.cow", "+1M"]).ok(),
        "Image resized.\n"
    );
    let mut grown = bytes.clone();
    grown.resize(5 * MIB, 0);
    assert_same_bytes(&contents(d, "disk.cow"), &grown, "grown");

    let run = cowimg_in(d, &["resize", "disk.cow", "1M"]);
    assert_fails(&run, 1, &["--shrink"]);
    assert_same_bytes(&contents(d, "disk.cow"), &grown, "after a refused shrink");

    cowimg_in(d, &["resize", "--shrink", "disk.cow", "--", "-3.5M"]).ok();
    let shrunk = &bytes[..MIB + MIB / 2];
    assert_same_bytes(&contents(d, "disk.cow"), shrunk, "shrunk");
    cowimg_in(d, &["check", "disk.cow"]).ok();
    cowimg_in(d, &["resize", "disk.cow", "4M"]).ok();
    let mut regrown = shrunk.to_vec();
    regrown.resize(4 * MIB, 0);
    assert_same_bytes(&contents(d, "disk.cow"), &regrown, "grown after the shrink");

    cowimg_in(d, &["resize", "-f", "raw", "--shrink", "disk.raw", "1M"]).ok();
    assert_same_bytes(&read_file(&d.join("disk.raw")), &bytes[..MIB], "raw shrunk");
    let run = cowimg_in(d, &["resize", "disk.cow", "--", "-5M"]);
    assert_fails(&run, 1, &["negative"]);
}

#[test]
fn resize_over_a_longer_backing_file_reads_zeros_in_the_grown_range() {
    let dir = tempdir();
    let d = dir.path();
    let base = random_bytes(2 * MIB, 3);
    write_file(&d.join("base.raw"), &base);
    cowimg_in(
        d,
        &[
            "create", "-b", "base.raw", "-F", "raw", "-s", "1M", "top.cow",
        ],
    )
    .ok();
    cowimg_in(d, &["resize", "top.cow", "3M"]).ok();
    let mut expected = base[..MIB].to_vec();
    expected.resize(3 * MIB, 0);
    assert_same_bytes(&contents(d, "top.cow"), &expected, "grown overlay");
    if have_tool("qemu-img") {
        // qemu-img does the same for its own overlays.
        qemu_in(
            d,
            "qemu-img",
            &[
                "create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "q.qcow2", "1M",
            ],
        )
        .ok();
        qemu_in(d, "qemu-img", &["resize", "q.qcow2", "3M"]).ok();
        qemu_in(d, "qemu-img", &["convert", "-O", "raw", "q.qcow2", "q.raw"]).ok();
        assert_same_bytes(
            &read_file(&d.join("q.raw")),
            &expected,
            "qemu-img's overlay",
        );
    }
}

/// Runs compare in both tools and asserts the same exit status and stdout.
fn compare_like_qemu_img(d: &Path, args: &[&str]) -> (Option<i32>, String) {
    let mut cowimg_args = vec!["compare"];
    cowimg_args.extend(args);
    let ours = cowimg_in(d, &cowimg_args);
    let theirs = qemu_in(d, "qemu-img", &cowimg_args);
    assert_eq!(
        (ours.code, ours.stdout.as_str()),
        (theirs.code, theirs.stdout.as_str()),
        "compare {args:?}"
    );
    (ours.code, ours.stdout)
}

#[test]
fn compare_agrees_with_qemu_img_compare_on_raw_pairs() {
    if !have_tool("qemu-img") {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let size = 3 * MIB + 4096;
    let base = random_bytes(size, 4);
    write_file(&d.join("a.raw"), &base);
    write_file(&d.join("same.raw"), &base);
    let (code, out) = compare_like_qemu_img(d, &["-f", "raw", "-F", "raw", "a.raw", "same.raw"]);
    assert_eq!((code, out.as_str()), (Some(0), "Images are identical.\n"));
    for (name, offset) in [("first", 0), ("middle", size / 2 + 777), ("last", size - 1)] {
        let mut changed = base.clone();
        changed[offset] ^= 0x5a;
        let file = format!("{name}.raw");
        write_file(&d.join(&file), &changed);
        let (code, out) = compare_like_qemu_img(d, &["-f", "raw", "-F", "raw", "a.raw", &file]);
        assert_eq!(code, Some(1), "{name}");
        assert!(out.starts_with("Content mismatch at offset "), "{out}");
    }
    // Sizes: a longer file that reads zeros past the end is the same unless -s.
    let mut longer = base.clone();
    longer.resize(size + MIB, 0);
    write_file(&d.join("longer.raw"), &longer);
    let (code, _) = compare_like_qemu_img(d, &["-f", "raw", "-F", "raw", "a.raw", "longer.raw"]);
    assert_eq!(code, Some(0));
    let (code, _) =
        compare_like_qemu_img(d, &["-s", "-f", "raw", "-F", "raw", "a.raw", "longer.raw"]);
    assert_eq!(code, Some(1));
    // -s also compares allocation: a hole and written zeros read the same but differ.
    let mut holes = base.clone();
    holes[MIB..2 * MIB].fill(0);
    write_file(&d.join("zeros.raw"), &holes);
    write_file(&d.join("holes.raw"), &holes[..MIB]);
    let file = std::fs::OpenOptions::new()
        .append(true)
        .open(d.join("holes.raw"))
        .unwrap();
    file.set_len(2 * MIB as u64).unwrap();
    use std::io::Write;
    (&file).write_all(&holes[2 * MIB..]).unwrap();
    drop(file);
    assert_eq!(read_file(&d.join("holes.raw")), holes);
    let (code, _) = compare_like_qemu_img(d, &["-f", "raw", "-F", "raw", "zeros.raw", "holes.raw"]);
    assert_eq!(code, Some(0));
    let (code, out) = compare_like_qemu_img(
        d,
        &["-s", "-f", "raw", "-F", "raw", "zeros.raw", "holes.raw"],
    );
    assert_eq!(code, Some(1));
    assert!(out.starts_with("Strict mode: Offset "), "{out}");
    let (code, _) = compare_like_qemu_img(
        d,
        &["-s", "-f", "raw", "-F", "raw", "holes.raw", "holes.raw"],
    );
    assert_eq!(code, Some(0));
    *longer.last_mut().unwrap() = 1;
    write_file(&d.join("longer.raw"), &longer);
    let (code, _) = compare_like_qemu_img(d, &["-f", "raw", "-F", "raw", "longer.raw", "a.raw"]);
    assert_eq!(code, Some(1));
}

#[test]
fn compare_works_across_formats_and_exits_2_on_errors() {
    let dir = tempdir();
    let d = dir.path();
    raw_and_cowimg(d);
    let run = cowimg_in(d, &["compare", "disk.cow", "disk.raw"]);
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (Some(0), "Images are identical.\n")
    );
    cowimg_in(d, &["create", "-b", "disk.raw", "-F", "raw", "top.cow"]).ok();
    cowimg_io(d, "top.cow", &["write -P 1 2M 1"]).ok();
    let run = cowimg_in(d, &["compare", "top.cow", "disk.cow"]);
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (Some(1), "Content mismatch at offset 2097152!\n")
    );
    let run = cowimg_in(d, &["compare", "top.cow", "missing.raw"]);
    assert_fails(&run, 2, &["missing.raw"]);
}

#[test]
fn measure_bounds_what_convert_writes() {
    let dir = tempdir();
    let d = dir.path();
    let mut bytes = vec![0u8; 16 * MIB];
    for (i, at) in [0, 3 * MIB + 5000, 9 * MIB, 16 * MIB - 70_000]
        .into_iter()
        .enumerate()
    {
        bytes[at..at + 65_000].copy_from_slice(&random_bytes(65_000, i as u64));
    }
    write_file(&d.join("disk.raw"), &bytes);
    for cluster_size in ["4K", "64K", "2M"] {
        let option = format!("cluster_size={cluster_size}");
        let measure = json(
            &cowimg_in(
                d,
                &[
                    "measure",
                    "--output=json",
                    "-O",
                    "cowimg",
                    "-o",
                    &option,
                    "disk.raw",
                ],
            )
            .ok(),
        );
        cowimg_in(
            d,
            &[
                "convert", "-O", "cowimg", "-o", &option, "disk.raw", "out.cow",
            ],
        )
        .ok();
        let out = d.join("out.cow");
        let written = allocated(&out);
        let required = measure["required"].as_u64().unwrap();
        let full = measure["fully-allocated"].as_u64().unwrap();
        assert!(
            required >= written,
            "{cluster_size}: required {required} < {written}"
        );
        assert!(full >= required);
        cowimg_in(
            d,
            &[
                "convert", "-S", "0", "-O", "cowimg", "-o", &option, "disk.raw", "full.cow",
            ],
        )
        .ok();
        let full_written = std::fs::metadata(d.join("full.cow")).unwrap().len();
        assert!(
            full >= full_written,
            "{cluster_size}: fully allocated {full} < {full_written}"
        );
        std::fs::remove_file(&out).unwrap();
        std::fs::remove_file(d.join("full.cow")).unwrap();
    }
    let text = cowimg_in(d, &["measure", "--size", "1G", "-O", "raw"]).ok();
    assert_eq!(
        text,
        "required size: 1073741824\nfully allocated size: 1073741824\n"
    );
    if have_tool("qemu-img") {
        let ours = cowimg_in(d, &["measure", "-O", "raw", "disk.raw"]).ok();
        let theirs = qemu_in(
            d,
            "qemu-img",
            &["measure", "-O", "raw", "-f", "raw", "disk.raw"],
        )
        .ok();
        assert_eq!(ours, theirs);
    }
    // qemu-img's figures for an empty 1 GiB qcow2 (tests/qcow2.rs compares many more with
    // qemu-img itself): a header cluster, an L1 cluster, two L2 tables' worth of room and a
    // refcount table and block.
    let text = cowimg_in(d, &["measure", "--size", "1G", "-O", "qcow2"]).ok();
    assert_eq!(
        text,
        "required size: 393216\nfully allocated size: 1074135040\n"
    );
    let run = cowimg_in(
        d,
        &["measure", "-O", "raw", "-o", "cluster_size=4K", "disk.raw"],
    );
    assert_fails(&run, 1, &["-O cowimg or -O qcow2"]);
}
