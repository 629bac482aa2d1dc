//! The committed golden fixtures (tests/fixtures): images made once by a fixed recipe by an
//! earlier build. Each must still open, read as its recipe says, check clean and take
//! writes. Image ids and journal epochs are random, so contents are compared, not bytes.
mod lib_support;

use cowimg::image::v2::{current_slot, Slot};
use cowimg::image::{ops, CreateOptions, Image, OpenOptions};
use cowimg::storage::FileStorage;
use lib_support::fixtures::{
    run_recipe, v1_basic_recipe, v2_basic_steps, V1_BASIC, V2_BASIC, V2_BASIC_SIZE,
};
use lib_support::{assert_same_bytes, read_all};
use std::path::{Path, PathBuf};

fn read_only() -> OpenOptions {
    OpenOptions {
        read_only: true,
        ..Default::default()
    }
}

/// The contents a fixture's recipe gives, for the fixtures that have one.
fn expected_contents(path: &Path) -> Option<Vec<u8>> {
    match path.file_name()?.to_str()? {
        "v1-basic.cow" => Some(v1_basic_recipe(None)),
        "v2-basic.cow" => Some(run_recipe(&v2_basic_steps(), V2_BASIC_SIZE, None)),
        _ => None,
    }
}

/// The fixtures whose names start with `prefix` ("v1-", "v2-").
fn fixtures(prefix: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("tests/fixtures")
        .expect("listing tests/fixtures")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(".cow"))
        })
        .collect();
    found.sort();
    found
}

/// Opens a fixture read-only, as the version its name says, reads all of it (against its
/// recipe when it has one) and checks it; then writes to a copy and reads the write back.
fn check_fixture(path: &Path, version: u32) {
    let what = path.display().to_string();
    let image = Image::open(path, &read_only()).unwrap_or_else(|e| panic!("opening {what}: {e}"));
    assert_eq!(image.version(), version, "{what}: format version");
    let contents = read_all(&image);
    let expected = expected_contents(path);
    if let Some(expected) = &expected {
        assert_same_bytes(&contents, expected, &what);
    }
    drop(image);
    let report = ops::check(path, false).unwrap_or_else(|e| panic!("check on {what}: {e}"));
    assert_eq!(report.version, version, "{what}: the version check saw");
    assert!(
        report.corruptions.is_empty(),
        "check on {what}: {:?}",
        report.corruptions
    );
    // The old image is a working image, not just readable.
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("copy.cow");
    std::fs::copy(path, &copy).expect("copying the fixture");
    let image = Image::open(&copy, &OpenOptions::default())
        .unwrap_or_else(|e| panic!("opening a copy of {what} read-write: {e}"));
    let at = image.virtual_size() / 3;
    image.write_at(b"still writable", at).expect("write");
    drop(image);
    let image = Image::open(&copy, &read_only()).expect("reopening the copy");
    assert_eq!(
        image.version(),
        version,
        "{what}: a write changed the version"
    );
    let mut after = contents;
    after[at as usize..at as usize + 14].copy_from_slice(b"still writable");
    assert_same_bytes(
        &read_all(&image),
        &after,
        &format!("{what} (a copy) after a write"),
    );
}

#[test]
fn every_version_1_fixture_opens_reads_as_its_recipe_and_checks_clean() {
    let found = fixtures("v1-");
    assert!(
        found.iter().any(|p| p == Path::new(V1_BASIC)),
        "{V1_BASIC} is missing: {found:?}"
    );
    for path in found {
        check_fixture(&path, 1);
    }
}

#[test]
fn every_version_2_fixture_opens_reads_as_its_recipe_and_checks_clean() {
    let found = fixtures("v2-");
    assert!(
        found.iter().any(|p| p == Path::new(V2_BASIC)),
        "{V2_BASIC} is missing: {found:?}"
    );
    for path in found {
        check_fixture(&path, 2);
    }
}

#[test]
fn golden_fixture_v2_basic_holds_a_written_tree_and_journal_records_after_it() {
    let file = std::fs::File::open(V2_BASIC).expect("opening the fixture");
    let (_, slot) = current_slot(&FileStorage::new(file), Path::new(V2_BASIC))
        .expect("the fixture's current header slot");
    let Slot::V2(h) = slot else {
        panic!("the fixture's current slot is not a version-2 slot: {slot:?}")
    };
    assert_eq!(h.virtual_size, V2_BASIC_SIZE);
    assert!(
        h.map_root != 0 && h.map_height >= 1 && h.map_extents > 0 && h.generation >= 2,
        "the fixture's tree was never written: {h:?}"
    );
    let bytes = std::fs::read(V2_BASIC).expect("reading the fixture");
    let first = &bytes[h.journal_offset as usize..h.journal_offset as usize + 4];
    assert_eq!(first, b"CIJ2", "no journal record after the tree flush");
    assert!(
        bytes.len() < 1 << 20,
        "the fixture grew to {} bytes",
        bytes.len()
    );
    let image = Image::open(Path::new(V2_BASIC), &read_only()).expect("opening the fixture");
    let stats = image.stats();
    assert!(
        stats.journal_used > 0,
        "the open replayed no journal records: {stats:?}"
    );
}

/// Regenerates the committed version-2 fixture; run by hand (`cargo test --test
/// golden_fixtures -- --ignored`) only when the format changes on purpose.
#[test]
#[ignore]
fn regenerate_golden_fixture_v2_basic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v2-basic.cow");
    Image::create(
        &path,
        &CreateOptions {
            size: Some(V2_BASIC_SIZE),
            version: 2,
            ..Default::default()
        },
    )
    .expect("create");
    let image = Image::open(&path, &OpenOptions::default()).expect("open");
    run_recipe(&v2_basic_steps(), V2_BASIC_SIZE, Some(&image));
    drop(image);
    std::fs::create_dir_all("tests/fixtures").expect("fixtures dir");
    std::fs::copy(&path, V2_BASIC).expect("copying the fixture");
}
