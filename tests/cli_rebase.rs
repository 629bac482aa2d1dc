//! `cowimg rebase`: safe mode keeps the image's contents, -u only moves the pointer.
mod cli_support;
use cli_support::*;
use std::path::Path;

const MIB: usize = 1 << 20;

const OVERLAY_WRITES: &[&str] = &[
    "write -P 0x11 1000 5000",
    "write -z 1M 64K",
    "discard 3M 4K",
];

/// base A, and base B equal to A except in a few ranges (one inside an overlay write, so
/// that only the fall-through parts matter).
fn make_bases(d: &Path) -> (Vec<u8>, Vec<u8>) {
    let a = random_bytes(4 * MIB, 11);
    let mut b = a.clone();
    for (start, len, seed) in [
        (0usize, 8192usize, 1u64),
        (2 * MIB + 5, 70000, 2),
        (4 * MIB - 100, 100, 3),
    ] {
        b[start..start + len].copy_from_slice(&random_bytes(len, seed));
    }
    write_file(&d.join("a.raw"), &a);
    write_file(&d.join("b.raw"), &b);
    (a, b)
}

fn backing_of(d: &Path, image: &str) -> serde_json::Value {
    json(&cowimg_in(d, &["info", "--json", image]).ok())["backing-filename"].clone()
}

#[test]
fn safe_rebase_onto_another_base_reads_exactly_as_before() {
    let dir = tempdir();
    let d = dir.path();
    make_bases(d);
    cowimg_in(d, &["create", "-b", "a.raw", "-F", "raw", "top.cow"]).ok();
    cowimg_io(d, "top.cow", OVERLAY_WRITES).ok();
    let before = contents(d, "top.cow");

    cowimg_in(d, &["rebase", "-b", "b.raw", "-F", "raw", "top.cow"]).ok();
    assert_eq!(backing_of(d, "top.cow"), "b.raw");
    assert_same_bytes(&contents(d, "top.cow"), &before, "after a safe rebase");
    // Still the same once base A is gone: nothing depends on it any more.
    std::fs::remove_file(d.join("a.raw")).expect("removing a.raw");
    assert_same_bytes(&contents(d, "top.cow"), &before, "without the old base");
}

#[test]
fn safe_rebase_onto_a_cowimg_base_and_then_to_none_keeps_the_contents() {
    let dir = tempdir();
    let d = dir.path();
    make_bases(d);
    cowimg_in(d, &["create", "-b", "b.raw", "-F", "raw", "mid.cow"]).ok();
    cowimg_io(d, "mid.cow", &["write -P 0x77 512K 12345"]).ok();
    cowimg_in(d, &["create", "-b", "a.raw", "-F", "raw", "top.cow"]).ok();
    cowimg_io(d, "top.cow", OVERLAY_WRITES).ok();
    let before = contents(d, "top.cow");

    cowimg_in(
        d,
        &["rebase", "-p", "-b", "mid.cow", "-F", "cowimg", "top.cow"],
    )
    .ok();
    assert_eq!(backing_of(d, "top.cow"), "mid.cow");
    assert_same_bytes(
        &contents(d, "top.cow"),
        &before,
        "rebased onto a cowimg layer",
    );

    cowimg_in(d, &["rebase", "-b", "", "top.cow"]).ok();
    assert!(backing_of(d, "top.cow").is_null());
    assert_same_bytes(
        &contents(d, "top.cow"),
        &before,
        "with the backing file removed",
    );
}

#[test]
fn unsafe_rebase_only_changes_the_pointer() {
    let dir = tempdir();
    let d = dir.path();
    let (_, b) = make_bases(d);
    cowimg_in(d, &["create", "-b", "a.raw", "-F", "raw", "top.cow"]).ok();
    cowimg_io(d, "top.cow", OVERLAY_WRITES).ok();
    let before = contents(d, "top.cow");
    let map = json(&cowimg_in(d, &["map", "--json", "top.cow"]).ok());
    let file_before = read_file(&d.join("top.cow"));

    cowimg_in(d, &["rebase", "-u", "-b", "b.raw", "-F", "raw", "top.cow"]).ok();
    assert_eq!(backing_of(d, "top.cow"), "b.raw");
    // The overlay's own ranges (depth 0, whole units: a partial write copied the rest of
    // its unit from A) read as before; everything else now comes from B.
    let mut expected = b.clone();
    let mut own = 0;
    for e in map
        .as_array()
        .expect("an array")
        .iter()
        .filter(|e| e["depth"] == 0)
    {
        let start = e["start"].as_u64().expect("start") as usize;
        let end = start + e["length"].as_u64().expect("length") as usize;
        expected[start..end].copy_from_slice(&before[start..end]);
        own += end - start;
    }
    assert!(
        own > 0 && own < b.len(),
        "the overlay owns part of the image: {own}"
    );
    let after = contents(d, "top.cow");
    assert_same_bytes(&after, &expected, "over base B");
    assert_ne!(
        after, before,
        "B differs from A where the overlay falls through"
    );
    // Only the header changed: no data was copied into the overlay.
    let file_after = read_file(&d.join("top.cow"));
    assert_eq!(file_after.len(), file_before.len());
    assert_eq!(file_after[8192..], file_before[8192..]);
}

#[test]
fn unsafe_rebase_repairs_a_pointer_to_a_moved_backing_file() {
    let dir = tempdir();
    let d = dir.path();
    let (a, _) = make_bases(d);
    cowimg_in(d, &["create", "-b", "a.raw", "-F", "raw", "top.cow"]).ok();
    std::fs::create_dir(d.join("moved")).expect("mkdir");
    std::fs::rename(d.join("a.raw"), d.join("moved/a.raw")).expect("moving a.raw");

    let run = cowimg_in(d, &["map", "top.cow"]);
    assert_eq!(run.code, Some(1));
    assert!(run.stderr.contains("a.raw"), "{}", run.stderr);

    cowimg_in(
        d,
        &["rebase", "-u", "-b", "moved/a.raw", "-F", "raw", "top.cow"],
    )
    .ok();
    assert_same_bytes(&contents(d, "top.cow"), &a, "after repointing");
}

#[test]
fn rebase_needs_a_backing_format() {
    let dir = tempdir();
    let d = dir.path();
    make_bases(d);
    cowimg_in(d, &["create", "-b", "a.raw", "-F", "raw", "top.cow"]).ok();
    let run = cowimg_in(d, &["rebase", "-b", "b.raw", "top.cow"]);
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr.contains("backing format must be given with -F"),
        "{}",
        run.stderr
    );
    assert_eq!(backing_of(d, "top.cow"), "a.raw");
    let run = cowimg_in(d, &["rebase", "top.cow"]);
    assert_eq!(run.code, Some(1));
    assert!(run.stderr.contains("-b"), "{}", run.stderr);
}
