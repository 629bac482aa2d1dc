//! Damaged qcow2 files: each gives one clear error naming the file and the offset of the
//! damage, with no panic, no hang and no allocation sized by the file.
mod cli_support;

use cli_support::*;
#[path = "lib_support/qcow2_fuzz_body.rs"]
mod qcow2_fuzz_body;

use qcow2_fuzz_body::exercise_qcow2_bytes;
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::time::{Duration, Instant};

const COPIED: u64 = 1 << 63;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

fn be64(bytes: &[u8], at: u64) -> u64 {
    u64::from_be_bytes(
        bytes[at as usize..at as usize + 8]
            .try_into()
            .expect("8 bytes"),
    )
}
fn put_be64(bytes: &mut [u8], at: u64, value: u64) {
    bytes[at as usize..at as usize + 8].copy_from_slice(&value.to_be_bytes());
}

/// A 4 MiB qcow2 with 64 KiB clusters made by qemu-img, with data at 0, 1M and 3M; and the
/// offsets of its L1 table, its first L2 table and its refcount table.
struct Sample {
    bytes: Vec<u8>,
    l1: u64,
    l2: u64,
    refcount_table: u64,
}

fn sample(dir: &Path, compressed: bool) -> Sample {
    qemu_in(
        dir,
        "qemu-img",
        &["create", "-f", "qcow2", "plain.qcow2", "4M"],
    )
    .ok();
    qemu_in(
        dir,
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "plain.qcow2",
            "-c",
            "write -P 0x11 0 64k",
            "-c",
            "write -P 0x12 1M 128k",
            "-c",
            "write -P 0x13 3M 4k",
        ],
    )
    .ok();
    let name = if compressed {
        qemu_in(
            dir,
            "qemu-img",
            &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "plain.qcow2",
                "compressed.qcow2",
            ],
        )
        .ok();
        "compressed.qcow2"
    } else {
        "plain.qcow2"
    };
    let bytes = read_file(&dir.join(name));
    let l1 = be64(&bytes, 0x28);
    let l2 = be64(&bytes, l1) & OFFSET_MASK;
    let refcount_table = be64(&bytes, 0x30);
    Sample {
        bytes,
        l1,
        l2,
        refcount_table,
    }
}

/// Converts `name` to raw: it must fail with exit 1 within 10 s, with every needle (the file
/// name among them) in the one-line error.
#[track_caller]
fn assert_refused(dir: &Path, name: &str, needles: &[&str]) {
    let started = Instant::now();
    let run = cowimg_in(dir, &["convert", "-O", "raw", name, "out.raw"]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    let mut all = vec![name];
    all.extend(needles);
    assert_fails(&run, 1, &all);
    assert_eq!(run.stderr.trim_end().lines().count(), 1, "{}", run.stderr);
}

fn have_qemu() -> bool {
    have_tool("qemu-img") && have_tool("qemu-io")
}

#[test]
fn a_truncated_l1_table_is_refused_at_open() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let s = sample(dir.path(), false);
    write_file(&dir.path().join("bad.qcow2"), &s.bytes[..s.l1 as usize + 4]);
    assert_refused(
        dir.path(),
        "bad.qcow2",
        &["l1_table_offset", "past the end of the file"],
    );
}

#[test]
fn a_truncated_l2_table_is_refused_naming_the_l1_entry() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let s = sample(dir.path(), false);
    assert!(
        s.l2 > s.l1 && s.l2 > s.refcount_table,
        "qemu's layout changed"
    );
    write_file(
        &dir.path().join("bad.qcow2"),
        &s.bytes[..s.l2 as usize + 100],
    );
    let entry = format!("L1 entry 0 at offset {:#x}", s.l1);
    assert_refused(
        dir.path(),
        "bad.qcow2",
        &[&entry, "goes past the end of the file"],
    );
}

#[test]
fn an_l1_entry_past_the_end_of_the_file_is_refused() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let mut s = sample(dir.path(), false);
    put_be64(&mut s.bytes, s.l1, COPIED | 0x0000_1000_0000_0000);
    write_file(&dir.path().join("bad.qcow2"), &s.bytes);
    let entry = format!("L1 entry 0 at offset {:#x}", s.l1);
    assert_refused(
        dir.path(),
        "bad.qcow2",
        &[&entry, "L2 table at 0x100000000000"],
    );
}

#[test]
fn an_l2_entry_past_the_end_of_the_file_is_refused() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let mut s = sample(dir.path(), false);
    put_be64(&mut s.bytes, s.l2 + 16 * 8, COPIED | 0x0000_2000_0000_0000);
    write_file(&dir.path().join("bad.qcow2"), &s.bytes);
    let entry = format!("L2 entry at offset {:#x}", s.l2 + 16 * 8);
    assert_refused(
        dir.path(),
        "bad.qcow2",
        &[&entry, "data cluster at 0x200000000000 is past the end"],
    );
}

#[test]
fn l1_and_l2_entries_pointing_into_the_header_are_refused() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let s = sample(dir.path(), false);
    let mut l2_bad = s.bytes.clone();
    put_be64(&mut l2_bad, s.l2, COPIED);
    write_file(&dir.path().join("l2.qcow2"), &l2_bad);
    let entry = format!("L2 entry at offset {:#x}", s.l2);
    assert_refused(dir.path(), "l2.qcow2", &[&entry, "points into the header"]);
    let mut l1_bad = s.bytes.clone();
    put_be64(&mut l1_bad, s.l1, COPIED);
    write_file(&dir.path().join("l1.qcow2"), &l1_bad);
    let entry = format!("L1 entry 0 at offset {:#x}", s.l1);
    assert_refused(dir.path(), "l1.qcow2", &[&entry, "points into the header"]);
}

#[test]
fn a_refcount_table_that_names_itself_as_a_refcount_block_is_refused() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let mut s = sample(dir.path(), false);
    put_be64(&mut s.bytes, s.refcount_table, s.refcount_table);
    write_file(&dir.path().join("bad.qcow2"), &s.bytes);
    let entry = format!("refcount table entry at offset {:#x}", s.refcount_table);
    assert_refused(dir.path(), "bad.qcow2", &[&entry, "refcount loop"]);
}

#[test]
fn a_huge_l1_size_is_refused_before_anything_is_allocated() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let mut s = sample(dir.path(), false);
    s.bytes[0x24..0x28].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
    write_file(&dir.path().join("bad.qcow2"), &s.bytes);
    assert_refused(
        dir.path(),
        "bad.qcow2",
        &["qcow2 header at offset 0x0", "l1_size"],
    );
}

#[test]
fn an_unknown_incompatible_feature_and_bad_compressed_data_are_refused() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let mut s = sample(dir.path(), false);
    s.bytes[0x48..0x50].copy_from_slice(&(1u64 << 40).to_be_bytes());
    write_file(&dir.path().join("feature.qcow2"), &s.bytes);
    assert_refused(
        dir.path(),
        "feature.qcow2",
        &["unknown incompatible feature bits 0x10000000000"],
    );
    let mut c = sample(dir.path(), true);
    let entry = be64(&c.bytes, c.l2);
    assert!(
        entry & (1 << 62) != 0,
        "the first cluster is not compressed"
    );
    let data = (entry & ((1u64 << 54) - 1)) as usize;
    c.bytes[data..data + 64].fill(0xff);
    write_file(&dir.path().join("garbled.qcow2"), &c.bytes);
    let at = format!("compressed cluster at offset {data:#x}");
    assert_refused(dir.path(), "garbled.qcow2", &[&at, "does not decompress"]);
}

#[test]
fn backing_chains_that_loop_are_refused_by_identity() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let qemu = |args: &[&str]| qemu_in(d, "qemu-img", args).ok();
    qemu(&["create", "-f", "qcow2", "a.qcow2", "4M"]);
    qemu(&[
        "create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2",
    ]);
    qemu(&[
        "rebase", "-u", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2",
    ]);
    assert_refused(
        d,
        "b.qcow2",
        &["backing chain loops: b.qcow2 -> a.qcow2 -> b.qcow2"],
    );
    // A qcow2 under a cowimg overlay that points back at the overlay.
    qemu(&["create", "-f", "qcow2", "c.qcow2", "4M"]);
    cowimg_in(d, &["create", "-b", "c.qcow2", "-F", "qcow2", "over.cow"]).ok();
    qemu(&[
        "rebase", "-u", "-f", "qcow2", "-b", "over.cow", "-F", "raw", "c.qcow2",
    ]);
    assert_refused(
        d,
        "over.cow",
        &["backing chain loops", "over.cow -> c.qcow2 -> over.cow"],
    );
}

#[test]
fn random_damage_to_qcow2_metadata_is_refused_or_read_without_panic_or_hang() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let scratch = dir.path().join("scratch");
    std::fs::create_dir(&scratch).expect("creating a directory");
    for compressed in [false, true] {
        let s = sample(dir.path(), compressed);
        let mut rng = rand::rngs::StdRng::seed_from_u64(20 + compressed as u64);
        // The metadata: the header cluster, the L1 table, the first L2 table and the
        // refcount table (each a cluster or less in this sample).
        let regions = [0, s.l1, s.l2, s.refcount_table];
        for round in 0..150 {
            let mut bytes = s.bytes.clone();
            for _ in 0..rng.gen_range(1..4) {
                let region = regions[rng.gen_range(0..regions.len())];
                let span = if region == 0 { 0x80 } else { 256 };
                let at = region as usize + rng.gen_range(0..span);
                bytes[at] ^= 1 << rng.gen_range(0..8);
            }
            let started = Instant::now();
            exercise_qcow2_bytes(&bytes, &scratch);
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "round {round}: took {:?}",
                started.elapsed()
            );
        }
    }
}

#[test]
fn a_qcow2_chain_deeper_than_64_files_is_refused() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    qemu_in(d, "qemu-img", &["create", "-f", "qcow2", "l0.qcow2", "1M"]).ok();
    for i in 1..70 {
        let (below, name) = (format!("l{}.qcow2", i - 1), format!("l{i}.qcow2"));
        qemu_in(
            d,
            "qemu-img",
            &[
                "create", "-f", "qcow2", "-u", "-b", &below, "-F", "qcow2", &name, "1M",
            ],
        )
        .ok();
    }
    // The error names the file that would be the 65th (l69 is the 1st, l5 the 65th).
    let run = cowimg_in(d, &["convert", "-O", "raw", "l69.qcow2", "out.raw"]);
    assert_fails(&run, 1, &["l5.qcow2: backing chain is deeper than 64"]);
    // 64 files in all is the most that opens.
    cowimg_in(d, &["convert", "-O", "raw", "l63.qcow2", "ok.raw"]).ok();
}

#[test]
fn a_qcow2_marked_corrupt_or_dirty_is_read_as_qemu_reads_it_read_only() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let s = sample(d, false);
    for (name, bit) in [("corrupt.qcow2", 1u64 << 1), ("dirty.qcow2", 1 << 0)] {
        let mut bytes = s.bytes.clone();
        bytes[0x48..0x50].copy_from_slice(&bit.to_be_bytes());
        write_file(&d.join(name), &bytes);
        let expected = d.join(format!("{name}.qemu.raw"));
        qemu_in(
            d,
            "qemu-img",
            &[
                "convert",
                "-O",
                "raw",
                name,
                expected.to_str().expect("utf-8"),
            ],
        )
        .ok();
        assert_same_bytes(&contents(d, name), &read_file(&expected), name);
    }
}
