//! Format version 2 from the command line: create, info, check, convert and serve read it;
//! amend --upgrade converts a version-1 image in place with the same contents; the options
//! that do not apply to it are refused with a message.
mod cli_support;

use cli_support::{
    assert_fails, assert_same_bytes, contents, cowimg_in, cowimg_io, have_tool, json, qemu_in,
    random_bytes, tempdir, write_file,
};
use std::path::Path;

const MIB: usize = 1 << 20;

/// An 8 MiB raw base of random bytes.
fn base(d: &Path) -> Vec<u8> {
    let bytes = random_bytes(8 * MIB, 7);
    write_file(&d.join("base.raw"), &bytes);
    bytes
}

/// Writes, zeroes and a discard over `image`, and the same on `expected`.
fn change(d: &Path, image: &str, expected: &mut [u8]) {
    cowimg_io(
        d,
        image,
        &[
            "write -P 0x11 0 64K",
            "write -P 0x22 5000 3000",
            "write -z 1M 128K",
            "discard 2M 64K",
            "write -P 0x33 7340032 8192",
            "flush",
        ],
    )
    .ok();
    expected[..65536].fill(0x11);
    expected[5000..8000].fill(0x22);
    expected[MIB..MIB + 131072].fill(0);
    expected[2 * MIB..2 * MIB + 65536].fill(0);
    expected[7340032..7340032 + 8192].fill(0x33);
}

#[test]
fn a_version_2_overlay_reads_like_the_writes_made_to_it_and_checks_clean() {
    let dir = tempdir();
    let d = dir.path();
    let mut expected = base(d);
    let out = cowimg_in(
        d,
        &[
            "create",
            "--format-version",
            "2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "top.cow",
        ],
    )
    .ok();
    assert!(out.contains("version=2"), "{out}");
    change(d, "top.cow", &mut expected);
    assert_same_bytes(&contents(d, "top.cow"), &expected, "top.cow");
    let info = json(&cowimg_in(d, &["info", "--output=json", "top.cow"]).ok());
    assert_eq!(info["format-specific"]["data"]["format-version"], 2);
    assert_eq!(info["cluster-size"], 4096);
    let human = cowimg_in(d, &["info", "top.cow"]).ok();
    assert!(human.contains("format version: 2"), "{human}");
    let check = cowimg_in(d, &["check", "top.cow"]).ok();
    assert!(check.contains("No errors were found"), "{check}");
    assert!(check.contains("Metadata:"), "{check}");
}

#[test]
fn amend_upgrade_keeps_every_byte_and_makes_the_image_version_2() {
    let dir = tempdir();
    let d = dir.path();
    let mut expected = base(d);
    cowimg_in(d, &["create", "-b", "base.raw", "-F", "raw", "old.cow"]).ok();
    change(d, "old.cow", &mut expected);
    let out = cowimg_in(d, &["amend", "--upgrade", "old.cow"]).ok();
    assert!(out.contains("upgraded to format version 2"), "{out}");
    let info = json(&cowimg_in(d, &["info", "--output=json", "old.cow"]).ok());
    assert_eq!(info["format-specific"]["data"]["format-version"], 2);
    assert_same_bytes(&contents(d, "old.cow"), &expected, "the upgraded image");
    cowimg_in(d, &["check", "old.cow"]).ok();
    // It keeps taking writes as a version-2 image.
    cowimg_io(d, "old.cow", &["write -P 0x44 3M 4K"]).ok();
    expected[3 * MIB..3 * MIB + 4096].fill(0x44);
    assert_same_bytes(&contents(d, "old.cow"), &expected, "after a write");
    let again = cowimg_in(d, &["amend", "-o", "version=2", "old.cow"]).ok();
    assert!(again.contains("already format version 2"), "{again}");
    let back = cowimg_in(d, &["amend", "-o", "version=1", "old.cow"]);
    assert_fails(
        &back,
        1,
        &["old.cow", "cannot be made version 1", "convert"],
    );
}

#[test]
fn options_that_do_not_apply_to_version_2_are_refused() {
    let dir = tempdir();
    let d = dir.path();
    let run = cowimg_in(
        d,
        &[
            "create",
            "--format-version",
            "2",
            "-c",
            "64K",
            "x.cow",
            "1M",
        ],
    );
    assert_fails(&run, 1, &["4 KiB blocks"]);
    let run = cowimg_in(d, &["create", "-o", "version=3", "x.cow", "1M"]);
    assert_fails(&run, 1, &["version=3", "expected 1 or 2"]);
    let run = cowimg_in(d, &["amend", "x.cow"]);
    assert!(run.code != Some(0), "{}", run.stderr);
    write_file(&d.join("plain.raw"), &[0u8; 4096]);
    let run = cowimg_in(d, &["amend", "--upgrade", "-f", "raw", "plain.raw"]);
    assert_fails(&run, 1, &["plain.raw", "cowimg images only"]);
}

#[test]
fn convert_writes_a_version_2_image_that_qemu_img_compare_finds_identical() {
    let dir = tempdir();
    let d = dir.path();
    let expected = base(d);
    cowimg_in(
        d,
        &[
            "convert",
            "-O",
            "cowimg",
            "--format-version",
            "2",
            "base.raw",
            "copy.cow",
        ],
    )
    .ok();
    let info = json(&cowimg_in(d, &["info", "--output=json", "copy.cow"]).ok());
    assert_eq!(info["format-specific"]["data"]["format-version"], 2);
    assert_same_bytes(&contents(d, "copy.cow"), &expected, "copy.cow");
    let run = cowimg_in(d, &["compare", "base.raw", "copy.cow"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    if have_tool("qemu-img") {
        cowimg_in(d, &["convert", "-O", "qcow2", "copy.cow", "copy.qcow2"]).ok();
        let run = qemu_in(d, "qemu-img", &["compare", "base.raw", "copy.qcow2"]);
        assert_eq!(run.code, Some(0), "{}", run.stderr);
    }
}

#[test]
fn commit_of_a_version_2_overlay_into_its_raw_base_writes_what_it_held() {
    let dir = tempdir();
    let d = dir.path();
    let mut expected = base(d);
    cowimg_in(
        d,
        &[
            "create",
            "--format-version",
            "2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "top.cow",
        ],
    )
    .ok();
    change(d, "top.cow", &mut expected);
    cowimg_in(d, &["commit", "top.cow"]).ok();
    assert_same_bytes(
        &std::fs::read(d.join("base.raw")).unwrap(),
        &expected,
        "base.raw after commit",
    );
    assert_same_bytes(&contents(d, "top.cow"), &expected, "the emptied overlay");
    cowimg_in(d, &["check", "top.cow"]).ok();
}
