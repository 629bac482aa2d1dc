//! qcow2 as a backing file and a source, and `convert -O qcow2`, against qemu-img and
//! qemu-io: every qcow2 here is made by qemu in the test, and every result is compared
//! with what qemu reads from the same file.
mod cli_support;

use cli_support::*;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// `cowimg serve` on a Unix socket in `dir`; stopped with SIGTERM (so that it flushes) by
/// [`stop_server`].
fn start_server(dir: &Path, image: &str) -> (Child, String) {
    let socket = dir.join("nbd.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_cowimg"))
        .args(["serve", "--socket", socket.to_str().expect("utf-8"), image])
        .current_dir(dir)
        .spawn()
        .expect("spawning cowimg serve");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "the server did not listen within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, format!("nbd+unix:///?socket={}", socket.display()))
}

fn stop_server(mut child: Child) {
    // SAFETY: kill takes a pid and a signal number; the child is ours and not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("waiting for the server");
    assert!(status.success(), "the server exited with {status}");
}

const MIB: usize = 1 << 20;
const SIZE: &str = "8M";

fn have_qemu() -> bool {
    have_tool("qemu-img") && have_tool("qemu-io")
}

/// Runs qemu-io on a qcow2 file with the given commands; they must succeed.
fn qemu_io(dir: &Path, image: &str, commands: &[&str]) {
    let mut args = vec!["-f", "qcow2", image];
    for c in commands {
        args.extend(["-c", c]);
    }
    qemu_in(dir, "qemu-io", &args).ok();
}

fn qemu_img(dir: &Path, args: &[&str]) -> String {
    qemu_in(dir, "qemu-img", args).ok()
}

/// What qemu reads from `image`: `qemu-img convert -O raw`.
fn qemu_contents(dir: &Path, image: &str) -> Vec<u8> {
    let out = format!("{image}.qemu.raw");
    qemu_img(dir, &["convert", "-O", "raw", image, &out]);
    let bytes = read_file(&dir.join(&out));
    std::fs::remove_file(dir.join(&out)).expect("removing qemu's copy");
    bytes
}

/// Builds, with qemu-img and qemu-io, one qcow2 of each kind that qemu writes, and returns
/// their names:
/// - `base.raw`: 8 MiB of pseudo-random bytes with a 1 MiB hole at 6M;
/// - `mid.qcow2` over it (raw): data, zero clusters (`write -z`), a discarded range;
/// - `top.qcow2` over `mid.qcow2` (qcow2): the chain qcow2 -> qcow2 -> raw;
/// - `zlib.qcow2`, `zstd.qcow2`: `convert -c` of the chain, with each compression type;
/// - `ext-l2.qcow2`: extended L2 entries, sub-cluster writes and zeroes over `base.raw`;
/// - `v2.qcow2`: version 2 (`compat=0.10`) over `base.raw`;
/// - `data-file.qcow2`: an external data file, `data-file.qcow2.data`.
fn make_qcow2_images(dir: &Path) -> Vec<&'static str> {
    let mut base = random_bytes(8 * MIB, 10);
    base[6 * MIB..7 * MIB].fill(0);
    write_file(&dir.join("base.raw"), &base);
    qemu_img(
        dir,
        &["convert", "-f", "raw", "-O", "raw", "base.raw", "base.tmp"],
    );
    std::fs::rename(dir.join("base.tmp"), dir.join("base.raw")).expect("renaming");

    let overlay = |name: &str, backing: &str, format: &str, extra: &[&str]| {
        let mut args = vec!["create", "-f", "qcow2", "-b", backing, "-F", format];
        args.extend(extra);
        args.push(name);
        qemu_img(dir, &args);
    };
    overlay("mid.qcow2", "base.raw", "raw", &[]);
    qemu_io(
        dir,
        "mid.qcow2",
        &[
            "write -P 0x22 1M 1M",
            "write -z 3M 128k",
            "discard 5M 1M",
            "write -P 0x23 7M 4k",
        ],
    );
    overlay("top.qcow2", "mid.qcow2", "qcow2", &[]);
    qemu_io(
        dir,
        "top.qcow2",
        &[
            "write -P 0x33 100k 8k",
            "write -z 1536k 64k",
            "write -P 0x34 5M 64k",
        ],
    );
    for (name, kind) in [("zlib.qcow2", "zlib"), ("zstd.qcow2", "zstd")] {
        let option = format!("compression_type={kind}");
        qemu_img(
            dir,
            &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                &option,
                "top.qcow2",
                name,
            ],
        );
    }
    overlay("ext-l2.qcow2", "base.raw", "raw", &["-o", "extended_l2=on"]);
    qemu_io(
        dir,
        "ext-l2.qcow2",
        &[
            "write -P 0x44 2k 2k",
            "write -z 8k 6k",
            "write -P 0x45 70k 100k",
            "discard 1M 64k",
        ],
    );
    overlay("v2.qcow2", "base.raw", "raw", &["-o", "compat=0.10"]);
    qemu_io(
        dir,
        "v2.qcow2",
        &["write -P 0x55 64k 192k", "write -z 2M 64k"],
    );
    qemu_img(
        dir,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "data_file=data-file.qcow2.data",
            "data-file.qcow2",
            SIZE,
        ],
    );
    qemu_io(
        dir,
        "data-file.qcow2",
        &[
            "write -P 0x66 0 1M",
            "write -z 512k 64k",
            "write -P 0x67 4M 8k",
        ],
    );
    vec![
        "mid.qcow2",
        "top.qcow2",
        "zlib.qcow2",
        "zstd.qcow2",
        "ext-l2.qcow2",
        "v2.qcow2",
        "data-file.qcow2",
    ]
}

#[test]
fn each_kind_of_qcow2_converts_to_the_bytes_that_qemu_img_convert_reads() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    for image in make_qcow2_images(d) {
        let expected = qemu_contents(d, image);
        assert_same_bytes(&contents(d, image), &expected, image);
        // The same with the format given rather than probed.
        cowimg_in(
            d,
            &["convert", "-f", "qcow2", "-O", "raw", image, "given.raw"],
        )
        .ok();
        assert_same_bytes(&read_file(&d.join("given.raw")), &expected, image);
    }
}

/// (depth, present, zero, data, compressed) of every 512-byte sector, from a `map --json`
/// output (cowimg's or qemu-img's), with `depth_offset` added to each depth.
fn sectors(map_json: &str, depth_offset: i64) -> Vec<(i64, bool, bool, bool, bool)> {
    let mut out = Vec::new();
    let extents = json(map_json);
    for e in extents.as_array().expect("a JSON array") {
        let length = e["length"].as_u64().expect("length");
        let depth = e["depth"].as_i64().expect("depth") + depth_offset;
        let flags = (
            e["present"].as_bool().expect("present"),
            e["zero"].as_bool().expect("zero"),
            e["data"].as_bool().expect("data"),
            e["compressed"].as_bool().expect("compressed"),
        );
        for _ in 0..length / 512 {
            out.push((depth, flags.0, flags.1, flags.2, flags.3));
        }
    }
    out
}

#[test]
fn an_overlay_on_each_qcow2_reads_and_maps_like_qemu_with_depth_counting_the_qcow2_layers() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    for image in make_qcow2_images(d) {
        let overlay = format!("over-{image}.cow");
        cowimg_in(d, &["create", "-b", image, "-F", "qcow2", &overlay]).ok();
        assert_same_bytes(&contents(d, &overlay), &qemu_contents(d, image), &overlay);
        // The overlay is layer 0; qemu counts from the qcow2, so its depths are one less.
        let ours = sectors(&cowimg_in(d, &["map", "--json", &overlay]).ok(), 0);
        let qemu = sectors(
            &qemu_img(d, &["map", "--output=json", "-f", "qcow2", image]),
            1,
        );
        assert_eq!(ours.len(), qemu.len(), "{image}: map lengths");
        if let Some(i) = ours.iter().zip(&qemu).position(|(a, b)| a != b) {
            panic!(
                "{image}: map differs at {:#x}: cowimg {:?}, qemu {:?}",
                i * 512,
                ours[i],
                qemu[i]
            );
        }
    }
    // Data in an external data file is shown where it is, as qemu-img map shows it.
    let human = cowimg_in(d, &["map", "over-data-file.qcow2.cow"]).ok();
    let qemu_human = qemu_img(d, &["map", "data-file.qcow2"]);
    let rows = |text: &str| -> Vec<String> {
        text.lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect()
    };
    assert_eq!(rows(&human), rows(&qemu_human));
    assert!(human.contains("data-file.qcow2.data"), "{human}");
    // The chain overlay -> top.qcow2 -> mid.qcow2 -> base.raw has four layers.
    let map = json(&cowimg_in(d, &["map", "--json", "over-top.qcow2.cow"]).ok());
    let deepest = map
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|e| e["depth"].as_u64())
        .max();
    assert_eq!(deepest, Some(3));
}

#[test]
fn info_backing_chain_lists_each_qcow2_layer_with_its_format() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    make_qcow2_images(d);
    cowimg_in(d, &["create", "-b", "top.qcow2", "-F", "qcow2", "over.cow"]).ok();
    let chain = json(&cowimg_in(d, &["info", "--json", "--backing-chain", "over.cow"]).ok());
    let layers: Vec<(String, String)> = chain
        .as_array()
        .expect("array")
        .iter()
        .map(|l| {
            (
                l["filename"].as_str().expect("filename").to_string(),
                l["format"].as_str().expect("format").to_string(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = [
        ("over.cow", "cowimg"),
        ("top.qcow2", "qcow2"),
        ("mid.qcow2", "qcow2"),
        ("base.raw", "raw"),
    ]
    .iter()
    .map(|(f, k)| (f.to_string(), k.to_string()))
    .collect();
    assert_eq!(layers, expected);
    let top = json(&cowimg_in(d, &["info", "--json", "top.qcow2"]).ok());
    assert_eq!(top["format"], "qcow2");
    assert_eq!(top["virtual-size"], 8 * MIB as u64);
    assert_eq!(top["backing-filename-format"], "qcow2");
    // The format-specific fields agree with qemu-img info's.
    for image in [
        "top.qcow2",
        "v2.qcow2",
        "zstd.qcow2",
        "ext-l2.qcow2",
        "data-file.qcow2",
    ] {
        let ours = json(&cowimg_in(d, &["info", "--json", image]).ok());
        let qemu = json(&qemu_img(d, &["info", "--output=json", image]));
        for field in [
            "compat",
            "compression-type",
            "lazy-refcounts",
            "refcount-bits",
            "corrupt",
            "extended-l2",
            "data-file",
        ] {
            assert_eq!(
                ours["format-specific"]["data"][field], qemu["format-specific"]["data"][field],
                "{image}: {field}"
            );
        }
    }
}

#[test]
fn an_overlay_on_a_qcow2_chain_served_over_nbd_agrees_with_qemu_io_on_a_qcow2_overlay() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    make_qcow2_images(d);
    cowimg_in(d, &["create", "-b", "top.qcow2", "-F", "qcow2", "over.cow"]).ok();
    qemu_img(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "top.qcow2",
            "-F",
            "qcow2",
            "qemu-over.qcow2",
        ],
    );
    let writes = [
        "write -P 0x77 0 4k",
        "write -P 0x78 1020k 8k",
        "write -z 5M 32k",
        "write -P 0x79 6M 1M",
        "write -P 0x7a 8188k 4k",
    ];
    qemu_io(d, "qemu-over.qcow2", &writes);
    let (server, uri) = start_server(d, "over.cow");
    let mut args = vec!["-f", "raw", uri.as_str()];
    for w in &writes {
        args.extend(["-c", w]);
    }
    qemu_in(d, "qemu-io", &args).ok();
    let served = d.join("served.raw");
    qemu_img(
        d,
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            served.to_str().expect("utf-8"),
        ],
    );
    stop_server(server);
    let expected = qemu_contents(d, "qemu-over.qcow2");
    assert_same_bytes(&read_file(&served), &expected, "served overlay");
    // And after the server flushed on exit, the overlay file itself.
    assert_same_bytes(&contents(d, "over.cow"), &expected, "over.cow");
}

#[test]
fn commit_into_a_qcow2_backing_file_is_refused_before_anything_is_written() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    make_qcow2_images(d);
    cowimg_in(d, &["create", "-b", "top.qcow2", "-F", "qcow2", "over.cow"]).ok();
    cowimg_io(d, "over.cow", &["write -P 0x88 0 64k", "flush"]).ok();
    let before = read_file(&d.join("top.qcow2"));
    let overlay_before = contents(d, "over.cow");
    let run = cowimg_in(d, &["commit", "over.cow"]);
    assert_fails(
        &run,
        1,
        &[
            "top.qcow2",
            "commit into a qcow2 backing file is not supported",
            "cowimg convert",
        ],
    );
    assert_eq!(read_file(&d.join("top.qcow2")), before, "top.qcow2 changed");
    assert_same_bytes(&contents(d, "over.cow"), &overlay_before, "over.cow");
}

#[test]
fn commit_d_into_a_cowimg_layer_above_a_qcow2_keeps_the_merged_contents() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    make_qcow2_images(d);
    cowimg_in(d, &["create", "-b", "zstd.qcow2", "-F", "qcow2", "mid.cow"]).ok();
    cowimg_in(d, &["create", "-b", "mid.cow", "-F", "cowimg", "top.cow"]).ok();
    cowimg_io(d, "mid.cow", &["write -P 0x91 64k 64k", "flush"]).ok();
    cowimg_io(
        d,
        "top.cow",
        &["write -P 0x92 96k 64k", "write -z 3M 1M", "flush"],
    )
    .ok();
    let merged = contents(d, "top.cow");
    cowimg_in(d, &["commit", "-d", "top.cow"]).ok();
    assert_same_bytes(&contents(d, "mid.cow"), &merged, "mid.cow after commit -d");
    assert_same_bytes(&contents(d, "top.cow"), &merged, "top.cow after commit -d");
}

/// Asserts that qemu-img check finds nothing wrong with `image`.
fn assert_qemu_check_clean(dir: &Path, image: &str) {
    let run = qemu_in(dir, "qemu-img", &["check", "-f", "qcow2", image]);
    assert_eq!(
        run.code,
        Some(0),
        "qemu-img check {image}: {}{}",
        run.stdout,
        run.stderr
    );
    assert!(
        run.stdout.contains("No errors were found"),
        "{}",
        run.stdout
    );
}

#[test]
fn qcow2_to_cowimg_to_qcow2_to_raw_round_trips_are_identical_and_check_clean() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    for image in make_qcow2_images(d) {
        let expected = qemu_contents(d, image);
        let cow = format!("{image}.cow");
        let back = format!("{image}.back.qcow2");
        cowimg_in(d, &["convert", "-O", "cowimg", image, &cow]).ok();
        cowimg_in(d, &["convert", "-O", "qcow2", &cow, &back]).ok();
        assert_qemu_check_clean(d, &back);
        qemu_img(d, &["compare", "-f", "qcow2", "-F", "qcow2", image, &back]);
        assert_same_bytes(&qemu_contents(d, &back), &expected, &back);
        assert_same_bytes(&contents(d, &back), &expected, &back);
    }
}

#[test]
fn convert_o_qcow2_from_raw_cowimg_and_qcow2_sources_with_and_without_a_backing_file() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    make_qcow2_images(d);
    cowimg_in(d, &["create", "-b", "base.raw", "-F", "raw", "over.cow"]).ok();
    cowimg_io(
        d,
        "over.cow",
        &[
            "write -P 0x21 0 100k",
            "write -z 2M 1M",
            "write -P 0x22 8188k 4k",
            "flush",
        ],
    )
    .ok();
    // An odd size: the qcow2 is rounded up to whole sectors, the tail reading as zeros.
    let mut odd = random_bytes(3 * MIB + 1000, 11);
    odd[MIB..2 * MIB].fill(0);
    write_file(&d.join("odd.raw"), &odd);
    write_file(&d.join("empty.raw"), &[]);
    let cases: &[(&str, &[&str])] = &[
        ("base.raw", &[]),
        ("empty.raw", &[]),
        ("odd.raw", &["-o", "cluster_size=4K"]),
        ("over.cow", &[]),
        ("over.cow", &["-B", "base.raw", "-F", "raw"]),
        (
            "top.qcow2",
            &["-B", "mid.qcow2", "-F", "qcow2", "-o", "cluster_size=2M"],
        ),
        ("zstd.qcow2", &["-o", "cluster_size=16K"]),
    ];
    for (i, (source, extra)) in cases.iter().enumerate() {
        let out = format!("out-{i}.qcow2");
        let mut args = vec!["convert", "-O", "qcow2"];
        args.extend(*extra);
        args.extend([*source, out.as_str()]);
        cowimg_in(d, &args).ok();
        assert_qemu_check_clean(d, &out);
        let mut expected = contents(d, source);
        expected.resize(expected.len().div_ceil(512) * 512, 0);
        assert_same_bytes(&qemu_contents(d, &out), &expected, &out);
        if extra.contains(&"-B") {
            let info = json(&qemu_img(d, &["info", "--output=json", &out]));
            assert_eq!(info["backing-filename"], extra[1], "{out}");
            assert_eq!(info["backing-filename-format"], extra[3], "{out}");
            // Only what differs from the backing file is stored: less than a full copy
            // with the same clusters.
            let full_name = format!("full-{i}.qcow2");
            let mut args = vec!["convert", "-O", "qcow2"];
            args.extend(&extra[4..]);
            args.extend([*source, full_name.as_str()]);
            cowimg_in(d, &args).ok();
            let full = json(&qemu_img(d, &["info", "--output=json", &full_name]));
            assert_qemu_check_clean(d, &full_name);
            assert!(
                info["actual-size"].as_u64() < full["actual-size"].as_u64(),
                "{out} stores more than the difference"
            );
        }
    }
    let run = cowimg_in(
        d,
        &[
            "convert", "-O", "qcow2", "-B", "over.cow", "-F", "cowimg", "base.raw", "x.qcow2",
        ],
    );
    assert_fails(&run, 1, &["cannot have a cowimg backing file"]);
}

#[test]
fn a_backing_file_whose_content_contradicts_its_recorded_format_is_named_never_corrupt() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    make_qcow2_images(d);
    cowimg_in(d, &["create", "-s", "8M", "plain.cow"]).ok();
    // Recorded as raw, starts with a magic: a warning, and read as raw.
    for (file, found) in [("top.qcow2", "qcow2"), ("plain.cow", "cowimg")] {
        let overlay = format!("raw-over-{file}.cow");
        let run = cowimg_in(d, &["create", "-b", file, "-F", "raw", &overlay]);
        assert_eq!(run.code, Some(0), "{}", run.stderr);
        let warning = format!("{file} is recorded as raw but starts with a {found} header");
        assert!(run.stderr.contains(&warning), "{}", run.stderr);
        let mut expected = read_file(&d.join(file));
        expected.resize(contents(d, &overlay).len(), 0);
        assert_same_bytes(&contents(d, &overlay), &expected, &overlay);
    }
    // Recorded as qcow2 or cowimg without that header: refused, naming both.
    for (file, format, found) in [
        ("base.raw", "qcow2", "neither a cowimg nor a qcow2 header"),
        ("plain.cow", "qcow2", "starts with a cowimg header"),
        ("base.raw", "cowimg", "neither a cowimg nor a qcow2 header"),
        ("top.qcow2", "cowimg", "starts with a qcow2 header"),
    ] {
        let run = cowimg_in(d, &["create", "-b", file, "-F", format, "bad.cow"]);
        let recorded = format!("is recorded as {format} but has no {format} header");
        assert_fails(&run, 1, &[file, &recorded, found]);
        assert!(!run.stderr.contains("corrupt"), "{}", run.stderr);
        assert!(!d.join("bad.cow").exists());
    }
    // An overlay whose qcow2 backing file was replaced by a raw file since.
    cowimg_in(
        d,
        &[
            "create",
            "-u",
            "-b",
            "swap.qcow2",
            "-F",
            "qcow2",
            "-s",
            "8M",
            "swap.cow",
        ],
    )
    .ok();
    std::fs::copy(d.join("base.raw"), d.join("swap.qcow2")).expect("copying");
    let run = cowimg_in(d, &["map", "swap.cow"]);
    assert_fails(
        &run,
        1,
        &["swap.qcow2", "is recorded as qcow2 but has no qcow2 header"],
    );
    assert!(!run.stderr.contains("corrupt"), "{}", run.stderr);
}

#[test]
fn convert_refuses_to_overwrite_the_external_data_file_of_its_qcow2_source() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    make_qcow2_images(d);
    let before = read_file(&d.join("data-file.qcow2.data"));
    let run = cowimg_in(
        d,
        &[
            "convert",
            "-O",
            "raw",
            "data-file.qcow2",
            "data-file.qcow2.data",
        ],
    );
    assert_fails(&run, 1, &["is the external data file of data-file.qcow2"]);
    assert_eq!(read_file(&d.join("data-file.qcow2.data")), before);
}

#[test]
fn rebase_onto_a_qcow2_and_back_keeps_what_the_overlay_reads() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    make_qcow2_images(d);
    cowimg_in(d, &["create", "-b", "base.raw", "-F", "raw", "over.cow"]).ok();
    cowimg_io(d, "over.cow", &["write -P 0x99 0 64k", "flush"]).ok();
    let before = contents(d, "over.cow");
    cowimg_in(d, &["rebase", "-b", "top.qcow2", "-F", "qcow2", "over.cow"]).ok();
    assert_same_bytes(&contents(d, "over.cow"), &before, "over.cow on top.qcow2");
    let info = json(&cowimg_in(d, &["info", "--json", "over.cow"]).ok());
    assert_eq!(info["backing-filename-format"], "qcow2");
    cowimg_in(d, &["rebase", "-b", "base.raw", "-F", "raw", "over.cow"]).ok();
    assert_same_bytes(
        &contents(d, "over.cow"),
        &before,
        "over.cow back on base.raw",
    );
    // -u only rewrites the pointer: a fresh overlay then reads through the qcow2.
    cowimg_in(d, &["create", "-b", "base.raw", "-F", "raw", "fresh.cow"]).ok();
    cowimg_io(d, "fresh.cow", &["write -P 0x99 0 64k", "flush"]).ok();
    cowimg_in(
        d,
        &[
            "rebase",
            "-u",
            "-b",
            "top.qcow2",
            "-F",
            "qcow2",
            "fresh.cow",
        ],
    )
    .ok();
    let mut expected = qemu_contents(d, "top.qcow2");
    expected[..64 << 10].fill(0x99);
    assert_same_bytes(
        &contents(d, "fresh.cow"),
        &expected,
        "fresh.cow after rebase -u",
    );
}

/// Renames the backing format extension of `image` to an unknown type, which qemu and
/// cowimg skip: the qcow2 then records no backing format.
fn drop_backing_format_extension(dir: &Path, image: &str) {
    let path = dir.join(image);
    let mut bytes = read_file(&path);
    let header_length = u32::from_be_bytes(bytes[0x64..0x68].try_into().expect("4 bytes"));
    let mut at = header_length as usize;
    loop {
        let kind = u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes"));
        assert_ne!(kind, 0, "{image} has no backing format extension");
        if kind == 0xe279_2aca {
            bytes[at..at + 4].copy_from_slice(&0x0bad_f00du32.to_be_bytes());
            break;
        }
        at += 8 + (len as usize).div_ceil(8) * 8;
    }
    write_file(&path, &bytes);
}

#[test]
fn a_qcow2_without_a_backing_format_probes_its_backing_file_as_qemu_does() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    make_qcow2_images(d);
    // top.qcow2's backing file is a qcow2, mid.qcow2's a raw file: both are probed.
    drop_backing_format_extension(d, "top.qcow2");
    drop_backing_format_extension(d, "mid.qcow2");
    let info = json(&qemu_img(d, &["info", "--output=json", "top.qcow2"]));
    assert!(info.get("backing-filename-format").is_none(), "{info}");
    let expected = qemu_contents(d, "top.qcow2");
    assert_same_bytes(&contents(d, "top.qcow2"), &expected, "top.qcow2");
    let chain = json(&cowimg_in(d, &["info", "--json", "--backing-chain", "top.qcow2"]).ok());
    let formats: Vec<&str> = chain
        .as_array()
        .expect("array")
        .iter()
        .map(|l| l["format"].as_str().expect("format"))
        .collect();
    assert_eq!(formats, ["qcow2", "qcow2", "raw"]);
    // Nothing is recorded, so nothing is shown, as qemu-img info shows it.
    let top = json(&cowimg_in(d, &["info", "--json", "top.qcow2"]).ok());
    assert_eq!(top["backing-filename"], "mid.qcow2");
    assert!(top.get("backing-filename-format").is_none(), "{top}");
}

#[test]
fn reads_at_random_offsets_and_lengths_agree_with_qemu_for_each_kind_of_qcow2() {
    use rand::{Rng, SeedableRng};
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    for image in make_qcow2_images(d) {
        let expected = qemu_contents(d, image);
        let layer = cowimg::image::ops::open_source(&d.join(image), None).expect("opens");
        assert_eq!(layer.size(), expected.len() as u64, "{image}");
        for _ in 0..200 {
            let offset = rng.gen_range(0..expected.len());
            let len = rng.gen_range(1..=(expected.len() - offset).min(300_000));
            let mut buf = vec![0u8; len];
            layer.read_at(&mut buf, offset as u64).expect("reads");
            assert_same_bytes(
                &buf,
                &expected[offset..offset + len],
                &format!("{image} at {offset:#x}+{len:#x}"),
            );
        }
    }
}

#[test]
fn opening_a_qcow2_as_a_cowimg_image_names_it_as_qcow2_not_as_corrupt() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    make_qcow2_images(d);
    let opts = cowimg::image::OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let e = cowimg::image::Image::open(&d.join("top.qcow2"), &opts)
        .err()
        .expect("a qcow2 is not a cowimg image");
    let message = e.to_string();
    assert!(
        message.contains("top.qcow2: is a qcow2 image, not a cowimg image"),
        "{message}"
    );
    assert!(message.contains("-F qcow2"), "{message}");
    assert!(!message.contains("corrupt"), "{message}");
}

/// (required, fully allocated) from a `measure --output=json`, cowimg's or qemu-img's.
fn measured(text: &str) -> (u64, u64) {
    let m = json(text);
    let field = |name: &str| {
        m[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    (field("required"), field("fully-allocated"))
}

/// Every figure is qemu-img's exactly, with no tolerance: cowimg counts the clusters that
/// qemu counts (any byte of data through the whole chain; zero flags and holes are not
/// data), and the metadata by qemu's own formula.
#[test]
fn measure_o_qcow2_gives_qemu_img_measures_figures_for_every_kind_of_source() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let mut sources: Vec<(String, String)> = make_qcow2_images(d)
        .into_iter()
        .map(|image| (image.to_string(), image.to_string()))
        .collect();
    sources.push(("base.raw".into(), "base.raw".into()));
    // A cowimg overlay and a qcow2 overlay given the same writes: the same clusters hold
    // data in both, so qemu-img's figure for the qcow2 is the one for the cowimg image.
    cowimg_in(d, &["create", "-b", "base.raw", "-F", "raw", "over.cow"]).ok();
    qemu_img(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "over.qcow2",
        ],
    );
    let writes = [
        "write -P 0x21 0 100k",
        "write -z 2M 1M",
        "write -P 0x22 8188k 4k",
    ];
    cowimg_io(d, "over.cow", &writes).ok();
    qemu_io(d, "over.qcow2", &writes);
    sources.push(("over.cow".into(), "over.qcow2".into()));
    // A file with no backing file and holes: only its data clusters are required. Written
    // in place, so that nothing but the data is allocated (qemu-img convert -O raw would
    // allocate the first block, zeros and all).
    let sparse = std::fs::File::create(d.join("sparse.raw")).expect("creating");
    sparse.set_len(5 * MIB as u64 + 3000).expect("sizing");
    let at = |bytes: &[u8], offset: usize| {
        std::os::unix::fs::FileExt::write_all_at(&sparse, bytes, offset as u64).expect("writing")
    };
    at(&random_bytes(75_000, 12), MIB + 5000);
    at(&[9; 10], 4 * MIB);
    drop(sparse);
    sources.push(("sparse.raw".into(), "sparse.raw".into()));
    cowimg_in(d, &["convert", "-O", "cowimg", "sparse.raw", "sparse.cow"]).ok();
    sources.push(("sparse.cow".into(), "sparse.raw".into()));

    for (ours, theirs) in &sources {
        for options in [
            &[][..],
            &["-o", "cluster_size=4K"],
            &["-o", "cluster_size=2M"],
        ] {
            let mut args = vec!["measure", "--output=json", "-O", "qcow2"];
            args.extend(options);
            let mut qemu_args = args.clone();
            qemu_args.extend(["-f", qemu_format(theirs), theirs.as_str()]);
            args.push(ours);
            let expected = measured(&qemu_img(d, &qemu_args));
            let got = measured(&cowimg_in(d, &args).ok());
            assert_eq!(got, expected, "{args:?}");
        }
    }

    // The human format is qemu-img's, less its "bitmaps size" line (convert copies no
    // bitmaps).
    let human = cowimg_in(d, &["measure", "-O", "qcow2", "top.qcow2"]).ok();
    let qemu_human = qemu_img(d, &["measure", "-O", "qcow2", "top.qcow2"]);
    let without_bitmaps: String = qemu_human
        .lines()
        .filter(|l| !l.starts_with("bitmaps size:"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(human, without_bitmaps);

    // Sizes alone, up to the largest that 64 KiB clusters allow (2 PiB), and past it.
    for (size, cluster) in [
        ("0", "64K"),
        ("1", "64K"),
        ("1G", "64K"),
        ("1G", "4K"),
        ("1G", "2M"),
        ("1T", "64K"),
        ("2P", "64K"),
    ] {
        let option = format!("cluster_size={cluster}");
        let args = [
            "measure",
            "--output=json",
            "-O",
            "qcow2",
            "-o",
            &option,
            "--size",
            size,
        ];
        assert_eq!(
            measured(&cowimg_in(d, &args).ok()),
            measured(&qemu_img(d, &args)),
            "{args:?}"
        );
    }
    for args in [
        &["measure", "-O", "qcow2", "--size", "3P"][..],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4K",
            "--size",
            "16T",
        ],
    ] {
        let qemu = qemu_in(d, "qemu-img", args);
        assert_eq!(qemu.code, Some(1), "{}", qemu.stderr);
        assert_fails(
            &cowimg_in(d, args),
            1,
            &["too large", "larger cluster size"],
        );
    }
}

/// `-f` for qemu-img: the test's files are named by their format.
fn qemu_format(name: &str) -> &'static str {
    if name.ends_with(".raw") {
        "raw"
    } else {
        "qcow2"
    }
}

#[test]
fn measure_o_qcow2_bounds_what_convert_o_qcow2_writes_and_equals_it_when_every_cluster_holds_data()
{
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let mut sources: Vec<String> = make_qcow2_images(d).into_iter().map(String::from).collect();
    // Every cluster holds data, and the size is not a whole number of clusters.
    write_file(&d.join("full.raw"), &random_bytes(8 * MIB + 3000, 13));
    sources.extend(["base.raw".into(), "full.raw".into()]);
    for source in &sources {
        for cluster in ["4K", "64K", "2M"] {
            let option = format!("cluster_size={cluster}");
            let (required, fully) = measured(
                &cowimg_in(
                    d,
                    &[
                        "measure",
                        "--output=json",
                        "-O",
                        "qcow2",
                        "-o",
                        &option,
                        source,
                    ],
                )
                .ok(),
            );
            cowimg_in(
                d,
                &["convert", "-O", "qcow2", "-o", &option, source, "out.qcow2"],
            )
            .ok();
            let written = std::fs::metadata(d.join("out.qcow2")).expect("stat").len();
            assert!(
                written <= required,
                "{source} ({cluster}): convert wrote {written} bytes, measure required {required}"
            );
            assert!(required <= fully, "{source} ({cluster})");
            if source == "full.raw" {
                assert_eq!(written, fully, "{source} ({cluster}): fully allocated");
            }
            if (source.as_str(), cluster) == ("base.raw", "64K") {
                // The 1 MiB hole at 6M: 16 clusters that need no room.
                assert_eq!(fully - required, 16 << 16, "{source} ({cluster})");
            }
            assert_qemu_check_clean(d, "out.qcow2");
        }
    }
}

#[test]
fn map_json_marks_the_compressed_clusters_of_a_qcow2_as_qemu_img_map_does() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    // Clusters that compress (a repeated pattern), clusters that do not (random bytes, which
    // qemu stores uncompressed even with -c), and zeros (not stored at all).
    let mut bytes = vec![0u8; 4 * MIB];
    for (i, b) in bytes[..128 * 1024].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    bytes[128 * 1024..320 * 1024].copy_from_slice(&random_bytes(192 * 1024, 14));
    for (i, b) in bytes[MIB + 4096..2 * MIB].iter_mut().enumerate() {
        *b = b"compressible text "[i % 18];
    }
    bytes[4 * MIB - 64 * 1024..].copy_from_slice(&random_bytes(64 * 1024, 15));
    write_file(&d.join("disk.raw"), &bytes);
    for kind in ["zlib", "zstd"] {
        let name = format!("{kind}.qcow2");
        let option = format!("compression_type={kind}");
        qemu_img(
            d,
            &[
                "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", &option, "disk.raw", &name,
            ],
        );
        let ours = json(&cowimg_in(d, &["map", "--output=json", &name]).ok());
        let theirs = json(&qemu_img(d, &["map", "--output=json", &name]));
        let flags = |map: &serde_json::Value| -> Vec<(u64, u64, bool, bool)> {
            map.as_array()
                .expect("a JSON array")
                .iter()
                .map(|e| {
                    (
                        e["start"].as_u64().expect("start"),
                        e["length"].as_u64().expect("length"),
                        e["data"].as_bool().expect("data"),
                        e["compressed"].as_bool().expect("compressed"),
                    )
                })
                .collect()
        };
        assert_eq!(flags(&ours), flags(&theirs), "{name}: compressed flags");
        // Every field, offsets included (a compressed cluster has none).
        assert_eq!(ours, theirs, "{name}");
        let kinds = flags(&theirs);
        assert!(
            kinds.iter().any(|&(_, _, data, c)| data && c)
                && kinds.iter().any(|&(_, _, data, c)| data && !c),
            "{name}: the image should hold compressed and uncompressed data: {kinds:?}"
        );
        // The human format shows where data lies in the file, and a compressed cluster
        // has no such place: qemu-img refuses, and so does cowimg.
        let run = qemu_in(d, "qemu-img", &["map", &name]);
        assert_eq!(run.code, Some(1), "{}", run.stderr);
        assert!(run.stderr.contains("compressed clusters"), "{}", run.stderr);
        assert_fails(
            &cowimg_in(d, &["map", &name]),
            1,
            &[name.as_str(), "compressed clusters", "--output=json"],
        );
    }
}
