//! `cowimg commit`: the backing file ends up equal to a raw reference that qemu-io gave the
//! same writes, into raw and cowimg backing files, kept or emptied, and after a kill -9.
mod cli_support;
use cli_support::*;
use std::path::Path;

const MIB: usize = 1 << 20;

const WRITES: &[&str] = &[
    "write -P 0x11 1000 5000",
    "write -P 0x22 65530 70000",
    "write -z 300000 100000",
    "discard 1M 64K",
    "write -P 0x33 1048577 3",
    "flush",
    "write -P 0x44 2000 100",
    "write -z 3M 1M",
    "write -P 0x55 0x3ff000 0x1000",
];

/// A 4 MiB random raw file as `name`, and the same bytes as `ref.raw`.
fn make_base(d: &Path, name: &str) -> Vec<u8> {
    let base = random_bytes(4 * MIB, 7);
    write_file(&d.join(name), &base);
    write_file(&d.join("ref.raw"), &base);
    base
}

/// The map entries that belong to the image itself (depth 0).
fn own_extents(d: &Path, image: &str) -> Vec<serde_json::Value> {
    let map = json(&cowimg_in(d, &["map", "--json", image]).ok());
    map.as_array()
        .expect("an array")
        .iter()
        .filter(|e| e["depth"] == 0)
        .cloned()
        .collect()
}

#[test]
fn commit_into_a_raw_backing_file_matches_qemu_io_and_empties_the_overlay() {
    if !have_tool("qemu-io") {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    make_base(d, "base.raw");
    cowimg_in(d, &["create", "-b", "base.raw", "-F", "raw", "top.cow"]).ok();
    cowimg_io(d, "top.cow", WRITES).ok();
    qemu_io_raw(d, "ref.raw", WRITES).ok();
    assert!(!own_extents(d, "top.cow").is_empty());

    let out = cowimg_in(d, &["commit", "top.cow"]).ok();
    assert_eq!(out, "Image committed.\n");
    let reference = read_file(&d.join("ref.raw"));
    assert_same_bytes(
        &read_file(&d.join("base.raw")),
        &reference,
        "committed backing file",
    );
    assert_eq!(
        own_extents(d, "top.cow"),
        Vec::<serde_json::Value>::new(),
        "overlay emptied"
    );
    assert_same_bytes(
        &contents(d, "top.cow"),
        &reference,
        "overlay reads the same",
    );
}

#[test]
fn commit_with_keep_leaves_the_overlay_as_it_was() {
    if !have_tool("qemu-io") {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    make_base(d, "base.raw");
    cowimg_in(
        d,
        &[
            "create", "-c", "4K", "-b", "base.raw", "-F", "raw", "top.cow",
        ],
    )
    .ok();
    cowimg_io(d, "top.cow", WRITES).ok();
    qemu_io_raw(d, "ref.raw", WRITES).ok();
    let own_before = own_extents(d, "top.cow");

    cowimg_in(d, &["commit", "-d", "top.cow"]).ok();
    let reference = read_file(&d.join("ref.raw"));
    assert_same_bytes(
        &read_file(&d.join("base.raw")),
        &reference,
        "committed backing file",
    );
    assert_eq!(
        own_extents(d, "top.cow"),
        own_before,
        "-d keeps the overlay's map"
    );
    assert_same_bytes(
        &contents(d, "top.cow"),
        &reference,
        "overlay reads the same",
    );
}

#[test]
fn commit_into_a_cowimg_middle_layer_leaves_the_raw_base_alone() {
    if !have_tool("qemu-io") {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let original = make_base(d, "base.raw");
    let mid_writes = ["write -P 0x99 0 256K", "write -z 2M 8K"];
    cowimg_in(
        d,
        &[
            "create", "-c", "16K", "-b", "base.raw", "-F", "raw", "mid.cow",
        ],
    )
    .ok();
    cowimg_io(d, "mid.cow", &mid_writes).ok();
    qemu_io_raw(d, "ref.raw", &mid_writes).ok();
    cowimg_in(d, &["create", "-b", "mid.cow", "-F", "cowimg", "top.cow"]).ok();
    cowimg_io(d, "top.cow", WRITES).ok();
    qemu_io_raw(d, "ref.raw", WRITES).ok();

    cowimg_in(d, &["commit", "-p", "top.cow"]).ok();
    let reference = read_file(&d.join("ref.raw"));
    assert_same_bytes(
        &contents(d, "mid.cow"),
        &reference,
        "middle layer after commit",
    );
    assert_same_bytes(&contents(d, "top.cow"), &reference, "top reads the same");
    assert_same_bytes(
        &read_file(&d.join("base.raw")),
        &original,
        "raw base untouched",
    );
    assert!(own_extents(d, "top.cow").is_empty(), "overlay emptied");
}

#[test]
fn commit_without_a_backing_file_is_refused() {
    let dir = tempdir();
    let d = dir.path();
    cowimg_in(d, &["create", "-s", "1M", "alone.cow"]).ok();
    let run = cowimg_in(d, &["commit", "alone.cow"]);
    assert_eq!(run.code, Some(1));
    assert!(run.stderr.contains("alone.cow"), "{}", run.stderr);
    assert!(run.stderr.contains("no backing file"), "{}", run.stderr);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
}

/// A commit killed part-way (the backing file half written, the overlay not yet emptied)
/// completes when run again, and a second commit of an already committed image changes
/// nothing.
#[test]
fn a_commit_killed_midway_completes_when_run_again() {
    use std::process::{Command, Stdio};
    let dir = tempdir();
    let d = dir.path();
    let size = 256 * MIB;
    let base = d.join("base.raw");
    std::fs::File::create(&base)
        .and_then(|f| f.set_len(size as u64))
        .expect("creating the base");
    cowimg_in(
        d,
        &[
            "create", "-c", "1M", "-b", "base.raw", "-F", "raw", "top.cow",
        ],
    )
    .ok();
    cowimg_io(
        d,
        "top.cow",
        &["write -P 0x5a 0 256M", "write -P 0xa5 100M 1000"],
    )
    .ok();
    let mut expected = vec![0x5au8; size];
    expected[100 * MIB..100 * MIB + 1000].fill(0xa5);

    let mut child = Command::new(env!("CARGO_BIN_EXE_cowimg"))
        .args(["commit", "top.cow"])
        .current_dir(d)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning cowimg commit");
    // Kill it as soon as the first bytes reached the backing file.
    let killed = loop {
        if child.try_wait().expect("polling commit").is_some() {
            break false;
        }
        let mut first = [0u8; 1];
        std::os::unix::fs::FileExt::read_exact_at(
            &std::fs::File::open(&base).expect("opening base"),
            &mut first,
            0,
        )
        .expect("reading base");
        if first[0] == 0x5a {
            child.kill().expect("killing commit");
            child.wait().expect("reaping commit");
            break true;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    };
    eprintln!("commit was killed mid-way: {killed}");
    if killed {
        // The overlay still holds everything: nothing was emptied before the backing
        // file was complete.
        assert_same_bytes(&contents(d, "top.cow"), &expected, "overlay after the kill");
    }

    cowimg_in(d, &["commit", "-d", "top.cow"]).ok();
    assert_same_bytes(
        &read_file(&base),
        &expected,
        "backing file after the second commit",
    );
    cowimg_in(d, &["commit", "top.cow"]).ok();
    assert_same_bytes(
        &read_file(&base),
        &expected,
        "backing file after the third commit",
    );
    assert_same_bytes(&contents(d, "top.cow"), &expected, "overlay reads the same");
    assert!(own_extents(d, "top.cow").is_empty(), "overlay emptied");
}
