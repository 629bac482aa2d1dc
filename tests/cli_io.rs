//! `cowimg io` and `cowimg convert` against qemu-io on a raw reference: the same commands on
//! both, then the bytes compared.
mod cli_support;
use cli_support::*;

const MIB: usize = 1 << 20;

/// Unaligned writes, zero writes and discards, with reads that verify what they expect;
/// a flush in the middle makes later writes to the same units go elsewhere (redirect on
/// write) instead of in place.
const FIRST_SESSION: &[&str] = &[
    "write -P 0x11 1000 5000",
    "read -P 0x11 1000 5000",
    "write -P 0x22 65530 70000",
    "read -P 0x22 65530 70000",
    "write -z 3000 10000",
    "read -P 0 3000 10000",
    "discard 200000 300000",
    "read -P 0 200000 300000",
    "write -P 0x33 250001 7",
    "flush",
    "write -P 0x44 1000 100",
    "read -P 0x44 1000 100",
    "write -z 1M 1M",
    "read -P 0 1M 1M",
    "discard 2M 64K",
    "write -P 0x55 0x3ff000 0x1000",
    "read -P 0x55 0x3ff000 4k",
    "write 4000000 100",
    "read -P 0xcd 4000000 100",
];

/// Run after reopening: overwrites parts of what the first session wrote and zeroed.
const SECOND_SESSION: &[&str] = &[
    "write -P 0x66 1010 20",
    "read -P 0x66 1010 20",
    "discard 0 4096",
    "read -P 0 0 4096",
    "write -P 0x77 2M 1",
    "read -P 0x77 2M 1",
    "read -P 0 2097153 65535",
    "trim 3M 12345",
    "read -P 0 3M 12345",
    "write -P 0x88 1048575 2",
];

fn make_backing(dir: &std::path::Path) -> Vec<u8> {
    let base = random_bytes(4 * MIB, 1);
    write_file(&dir.join("base.raw"), &base);
    write_file(&dir.join("ref.raw"), &base);
    base
}

#[test]
fn io_on_an_overlay_matches_qemu_io_on_a_raw_copy() {
    if !have_tool("qemu-io") {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    make_backing(d);
    cowimg_in(d, &["create", "-b", "base.raw", "-F", "raw", "top.cow"]).ok();
    for session in [FIRST_SESSION, SECOND_SESSION] {
        cowimg_io(d, "top.cow", session).ok();
        qemu_io_raw(d, "ref.raw", session).ok();
        assert_same_bytes(
            &contents(d, "top.cow"),
            &read_file(&d.join("ref.raw")),
            "overlay",
        );
    }
    assert_same_bytes(
        &read_file(&d.join("base.raw")),
        &random_bytes(4 * MIB, 1),
        "the backing file is never written",
    );
}

#[test]
fn io_through_a_two_level_chain_matches_qemu_io() {
    if !have_tool("qemu-io") {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    make_backing(d);
    // Different cluster sizes on each level: 16K (4K units) and 1M (16K units).
    cowimg_in(
        d,
        &[
            "create", "-c", "16K", "-b", "base.raw", "-F", "raw", "mid.cow",
        ],
    )
    .ok();
    cowimg_io(d, "mid.cow", FIRST_SESSION).ok();
    qemu_io_raw(d, "ref.raw", FIRST_SESSION).ok();
    let after_first = read_file(&d.join("ref.raw"));

    cowimg_in(
        d,
        &[
            "create", "-c", "1M", "-b", "mid.cow", "-F", "cowimg", "top.cow",
        ],
    )
    .ok();
    cowimg_io(d, "top.cow", SECOND_SESSION).ok();
    qemu_io_raw(d, "ref.raw", SECOND_SESSION).ok();

    assert_same_bytes(
        &contents(d, "top.cow"),
        &read_file(&d.join("ref.raw")),
        "top of the chain",
    );
    assert_same_bytes(
        &contents(d, "mid.cow"),
        &after_first,
        "middle layer, untouched by top",
    );
}

#[test]
fn reading_a_wrong_pattern_fails_and_names_the_first_mismatching_offset() {
    let dir = tempdir();
    let d = dir.path();
    cowimg_in(d, &["create", "-s", "1M", "img.cow"]).ok();
    cowimg_io(d, "img.cow", &["write -P 0xab 5000 10"]).ok();
    let run = cowimg_io(
        d,
        "img.cow",
        &["read -P 0 4096 8192", "read -P 0xab 5000 10"],
    );
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr
            .contains("Pattern verification failed at offset 5000"),
        "{}",
        run.stderr
    );
    // The script went on: the second read ran and passed.
    assert!(
        run.stdout.contains("read 10/10 bytes at offset 5000"),
        "{}",
        run.stdout
    );
}

#[test]
fn io_prints_qemu_io_lines_and_fails_on_bad_commands() {
    let dir = tempdir();
    let d = dir.path();
    cowimg_in(d, &["create", "-s", "1M", "img.cow"]).ok();
    let run = cowimg_io(
        d,
        "img.cow",
        &["write 0 4k", "discard 4k 4k", "bogus 1 2", "write 1M 1"],
    );
    assert_eq!(run.code, Some(1));
    assert!(run
        .stdout
        .contains("wrote 4096/4096 bytes at offset 0\n4 KiB, 1 ops; "));
    assert!(run
        .stdout
        .contains("discard 4096/4096 bytes at offset 4096"));
    assert!(
        run.stderr.contains("command \"bogus\" not found"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("write failed: img.cow: request at offset 0x100000"),
        "{}",
        run.stderr
    );
    // The write that succeeded is there (default pattern 0xcd).
    let bytes = contents(d, "img.cow");
    assert!(bytes[..4096].iter().all(|&b| b == 0xcd));
}

#[test]
fn read_only_io_refuses_writes_and_changes_nothing() {
    let dir = tempdir();
    let d = dir.path();
    cowimg_in(d, &["create", "-s", "64K", "img.cow"]).ok();
    let before = read_file(&d.join("img.cow"));
    let run = cowimg_in(
        d,
        &[
            "io",
            "-r",
            "img.cow",
            "-c",
            "write 0 1",
            "-c",
            "read -P 0 0 64K",
        ],
    );
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr.contains("img.cow: image is read-only"),
        "{}",
        run.stderr
    );
    assert!(run.stdout.contains("read 65536/65536 bytes at offset 0"));
    assert_eq!(read_file(&d.join("img.cow")), before);
}

#[test]
fn convert_to_cowimg_over_the_same_backing_stores_only_the_difference() {
    let dir = tempdir();
    let d = dir.path();
    make_backing(d);
    cowimg_in(d, &["create", "-b", "base.raw", "-F", "raw", "top.cow"]).ok();
    cowimg_io(d, "top.cow", &["write -P 1 1M 64K", "write -z 2M 64K"]).ok();
    let expected = contents(d, "top.cow");

    cowimg_in(
        d,
        &[
            "convert", "-O", "cowimg", "-B", "base.raw", "-F", "raw", "top.cow", "copy.cow",
        ],
    )
    .ok();
    assert_same_bytes(&contents(d, "copy.cow"), &expected, "converted overlay");
    // Only the written and the zeroed cluster are the copy's own.
    let map = json(&cowimg_in(d, &["map", "--json", "copy.cow"]).ok());
    let own: Vec<(u64, u64, bool)> = map
        .as_array()
        .expect("an array")
        .iter()
        .filter(|e| e["depth"] == 0)
        .map(|e| {
            let n = |k: &str| e[k].as_u64().expect("a number");
            (n("start"), n("length"), e["data"] == true)
        })
        .collect();
    assert_eq!(
        own,
        [(MIB as u64, 65536, true), (2 * MIB as u64, 65536, false)]
    );

    cowimg_in(
        d,
        &[
            "convert",
            "-O",
            "cowimg",
            "-o",
            "cluster_size=4K",
            "top.cow",
            "flat.cow",
        ],
    )
    .ok();
    assert_same_bytes(&contents(d, "flat.cow"), &expected, "flattened copy");
    let info = json(&cowimg_in(d, &["info", "--json", "flat.cow"]).ok());
    assert_eq!(info["cluster-size"], 4096);
    assert!(info["backing-filename"].is_null(), "{info}");
}

#[test]
fn convert_refuses_a_backing_file_for_raw_output_and_a_backing_without_format() {
    let dir = tempdir();
    let d = dir.path();
    make_backing(d);
    let raw_with_backing = [
        "convert", "-B", "base.raw", "-F", "raw", "base.raw", "out.raw",
    ];
    assert_fails(&cowimg_in(d, &raw_with_backing), 1, &["-B needs -O cowimg"]);
    let no_format = [
        "convert", "-O", "cowimg", "-B", "base.raw", "base.raw", "out.cow",
    ];
    assert_fails(
        &cowimg_in(d, &no_format),
        1,
        &["backing format must be given with -F"],
    );
    assert!(!d.join("out.raw").exists() && !d.join("out.cow").exists());
}

#[test]
fn a_closed_stdout_is_not_an_error() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let dir = tempdir();
    let d = dir.path();
    cowimg_in(d, &["create", "-s", "64M", "img.cow"]).ok();
    // Every other 4K unit written: thousands of map lines, far more than a pipe buffer.
    let commands: Vec<String> = (0..4096)
        .map(|i| format!("write {} 4k", i * 8192))
        .collect();
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    cowimg_io(d, "img.cow", &commands).ok();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cowimg"))
        .args(["map", "--json", "img.cow"])
        .current_dir(d)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning cowimg map");
    let mut first = [0u8; 1];
    child
        .stdout
        .take()
        .expect("stdout")
        .read_exact(&mut first)
        .expect("reading");
    // Dropping the read end closes the pipe.
    let output = child.wait_with_output().expect("waiting for cowimg map");
    assert_eq!(first[0], b'[');
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn convert_refuses_to_overwrite_its_own_input() {
    let dir = tempdir();
    let d = dir.path();
    let base = make_backing(d);
    cowimg_in(d, &["create", "-b", "base.raw", "-F", "raw", "top.cow"]).ok();
    cowimg_io(d, "top.cow", &["write -P 1 0 64K"]).ok();
    let top = read_file(&d.join("top.cow"));
    std::fs::create_dir(d.join("sub")).expect("mkdir");
    write_file(&d.join("other.raw"), b"other");
    for (args, needle) in [
        (&["convert", "top.cow", "top.cow"][..], "the source itself"),
        (
            &["convert", "-O", "cowimg", "top.cow", "./top.cow"],
            "the source itself",
        ),
        (
            &["convert", "top.cow", "base.raw"],
            "a backing file (base.raw)",
        ),
        (
            &[
                "convert",
                "-O",
                "cowimg",
                "-B",
                "other.raw",
                "-F",
                "raw",
                "base.raw",
                "sub/../other.raw",
            ],
            "cannot be its own backing file",
        ),
    ] {
        let run = cowimg_in(d, args);
        assert_eq!(run.code, Some(1), "{}", run.stderr);
        assert!(run.stderr.contains(needle), "{}", run.stderr);
    }
    assert_same_bytes(&read_file(&d.join("base.raw")), &base, "base untouched");
    assert_same_bytes(&read_file(&d.join("top.cow")), &top, "source untouched");
    assert_eq!(read_file(&d.join("other.raw")), b"other");
}

#[test]
fn io_reads_commands_from_stdin_without_c() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let dir = tempdir();
    let d = dir.path();
    cowimg_in(d, &["create", "-s", "1M", "img.cow"]).ok();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cowimg"))
        .args(["io", "img.cow"])
        .current_dir(d)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawning cowimg io");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"write -P 5 4k 4k\n\nread -q -P 5 4k 4k\nread -P 5 0 1\n")
        .expect("writing commands");
    let output = child.wait_with_output().expect("waiting for cowimg io");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.starts_with("wrote 4096/4096 bytes at offset 4096\n"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("read 4096/4096"),
        "-q prints nothing: {stdout}"
    );
    assert!(stdout.contains("read 1/1 bytes at offset 0"), "{stdout}");
}

/// Regression: zeroing a whole cluster of an overlay and then part of it made the rest of
/// the cluster read the backing file's bytes again.
#[test]
fn zeroing_part_of_a_zeroed_cluster_keeps_the_rest_zero() {
    let dir = tempdir();
    let d = dir.path();
    make_backing(d);
    cowimg_in(d, &["create", "-b", "base.raw", "-F", "raw", "top.cow"]).ok();
    for second in ["write -z 512K 4K", "discard 500K 16K", "write -P 1 512K 4K"] {
        cowimg_io(d, "top.cow", &["write -z 512K 64K", second]).ok();
        cowimg_in(d, &["io", "-r", "top.cow", "-c", "read -P 0 516K 60K"]).ok();
    }
}

/// Random scripts (unaligned writes, zero writes, discards, flushes) on random cluster
/// sizes, through one or two cowimg layers, compared with qemu-io on a raw file after
/// every script; then committed and compared again. Seeds are fixed so that a failure
/// reproduces.
#[test]
fn random_scripts_match_qemu_io_and_survive_commit() {
    use rand::{Rng, SeedableRng};
    if !have_tool("qemu-io") {
        return;
    }
    const SIZE: u64 = 8 << 20;
    for seed in 0..4u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let dir = tempdir();
        let d = dir.path();
        let base = random_bytes(SIZE as usize, seed + 100);
        write_file(&d.join("base.raw"), &base);
        write_file(&d.join("ref.raw"), &base);
        let cluster = ["4K", "16K", "64K", "256K", "2M"][rng.gen_range(0..5)];
        let two_levels = seed % 2 == 1;
        if two_levels {
            cowimg_in(
                d,
                &[
                    "create", "-c", "64K", "-b", "base.raw", "-F", "raw", "mid.cow",
                ],
            )
            .ok();
            cowimg_in(
                d,
                &[
                    "create", "-c", cluster, "-b", "mid.cow", "-F", "cowimg", "top.cow",
                ],
            )
            .ok();
        } else {
            cowimg_in(
                d,
                &[
                    "create", "-c", cluster, "-b", "base.raw", "-F", "raw", "top.cow",
                ],
            )
            .ok();
        }
        for round in 0..4 {
            let script: Vec<String> = (0..30)
                .map(|_| {
                    let offset = rng.gen_range(0..SIZE);
                    let longest = [100, 5000, 70000, 1 << 20][rng.gen_range(0..4)];
                    let length = rng.gen_range(1..=longest.min(SIZE - offset));
                    match rng.gen_range(0..20) {
                        0..=9 => format!("write -P {} {offset} {length}", rng.gen_range(0..256)),
                        10..=13 => format!("write -z {offset} {length}"),
                        14..=17 => format!("discard {offset} {length}"),
                        _ => "flush".to_string(),
                    }
                })
                .collect();
            let script: Vec<&str> = script.iter().map(String::as_str).collect();
            // The first script of a chain goes to the middle layer.
            let target = if two_levels && round == 0 {
                "mid.cow"
            } else {
                "top.cow"
            };
            cowimg_io(d, target, &script).ok();
            qemu_io_raw(d, "ref.raw", &script).ok();
            let what = format!("seed {seed}, cluster {cluster}, round {round}");
            assert_same_bytes(
                &contents(d, "top.cow"),
                &read_file(&d.join("ref.raw")),
                &what,
            );
            let check = cowimg_in(d, &["check", "top.cow"]);
            assert_eq!(check.code, Some(0), "{what}: {}", check.stdout);
        }
        cowimg_in(d, &["commit", "top.cow"]).ok();
        let committed = if two_levels {
            contents(d, "mid.cow")
        } else {
            read_file(&d.join("base.raw"))
        };
        let what = format!("seed {seed}, cluster {cluster}, after commit");
        assert_same_bytes(&committed, &read_file(&d.join("ref.raw")), &what);
    }
}

#[test]
fn convert_t_unsafe_writes_the_same_raw_bytes_and_is_refused_for_cowimg_output() {
    let dir = tempdir();
    let d = dir.path();
    make_backing(d);
    cowimg_in(d, &["create", "-b", "base.raw", "-F", "raw", "top.cow"]).ok();
    cowimg_io(d, "top.cow", &["write -P 7 100K 200K", "write -z 1M 64K"]).ok();
    let expected = contents(d, "top.cow");

    cowimg_in(d, &["convert", "-t", "unsafe", "top.cow", "fast.raw"]).ok();
    assert_same_bytes(&read_file(&d.join("fast.raw")), &expected, "-t unsafe copy");

    let unsafe_cowimg = [
        "convert", "-t", "unsafe", "-O", "cowimg", "top.cow", "x.cow",
    ];
    assert_fails(
        &cowimg_in(d, &unsafe_cowimg),
        1,
        &["-t unsafe needs -O raw"],
    );
    let unknown_mode = ["convert", "-t", "none", "top.cow", "y.raw"];
    assert_fails(
        &cowimg_in(d, &unknown_mode),
        1,
        &["unknown cache mode 'none'"],
    );
    assert!(!d.join("x.cow").exists() && !d.join("y.raw").exists());
}
