//! The upgrade of a version-1 image in place (FORMAT-v2.md, "Upgrade"): an image with data,
//! zero units, whole-cluster zero runs, discards and a raw backing file becomes a version-2
//! image that reads the same, with its data where it was; and a crash at any point of the
//! upgrade leaves an image that opens, as version 1 or 2, with the same contents.
mod lib_support;

use cowimg::format::BackingFormat;
use cowimg::image::{ops, v2, CreateOptions, ExtentKind, Image, OpenOptions};
use cowimg::storage::{FileStorage, MemStorage, Storage};
use lib_support::crash_log::{for_each_crash_image, CrashStorage, LogOp};
use lib_support::{
    assert_same_bytes, backing_content, fit, pattern, raw_layer, read_all, scratch_dir,
    write_sparse, Change,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const NAME: &str = "upgrade.cow";
/// A size that ends inside a cluster and inside a block.
const SIZE: u64 = 1024 * 1024 + 1000;
const BACKING_LEN: usize = 700 * 1024;

/// A version-1 image over `base.raw` in `dir`, written to by a seeded workload: random
/// writes, zeroes and discards (partial and whole units), a run of whole zero clusters,
/// and flushes, the last few changes left in the journal. Returns the image's path.
fn version_1_image(dir: &Path, cluster_size: u64, seed: u64) -> PathBuf {
    let base = dir.join("base.raw");
    std::fs::write(&base, backing_content(seed, BACKING_LEN)).expect("writing base.raw");
    let path = dir.join(NAME);
    Image::create(
        &path,
        &CreateOptions {
            size: Some(SIZE),
            cluster_size,
            backing: Some(("base.raw".into(), BackingFormat::Raw)),
            version: 1,
        },
    )
    .expect("creating the version-1 image");
    let image = Image::open(&path, &OpenOptions::default()).expect("opening it");
    assert_eq!(image.version(), 1);
    let mut rng = StdRng::seed_from_u64(seed);
    for i in 0..40 {
        Change::random(&mut rng, SIZE, cluster_size)
            .apply_to_image(&image)
            .expect("a change");
        if i % 4 == 3 {
            image.flush().expect("a flush");
        }
    }
    // Whole clusters of zeros over the backing file (a zero run) where they fit, and a
    // discard over data.
    let (zeros_at, zeros_len) = if 5 * cluster_size <= SIZE {
        (2 * cluster_size, 3 * cluster_size)
    } else {
        (SIZE / 2, SIZE / 4)
    };
    image
        .write_zeroes(zeros_at, zeros_len)
        .expect("write_zeroes");
    image
        .write_at(&pattern(seed, 20_000), 100_000)
        .expect("a write");
    image.discard(104_096, 8192).expect("discard");
    image.flush().expect("the last flush");
    drop(image);
    path
}

fn read_only() -> OpenOptions {
    OpenOptions {
        read_only: true,
        ..Default::default()
    }
}

/// Each 4 KiB block of this image's own data (not the backing file's): where its bytes
/// lie in the file, or `None` for zeros it stores.
fn own_blocks(image: &Image) -> BTreeMap<u64, Option<u64>> {
    let mut blocks = BTreeMap::new();
    for e in image.map().expect("map") {
        if e.depth != 0 || e.kind == ExtentKind::Unallocated {
            continue;
        }
        let mut at = e.offset;
        while at < e.offset + e.length {
            let host = match e.kind {
                ExtentKind::Data => {
                    Some(e.host_offset.expect("data has a host offset") + at - e.offset)
                }
                _ => None,
            };
            blocks.insert(at, host);
            at = (at / 4096 + 1) * 4096;
        }
    }
    blocks
}

/// Upgrades the image file at `path`; returns the extents and pages of its new tree.
fn upgrade_file(path: &Path) -> (u64, u64) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("opening the image read-write");
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(file));
    let report =
        v2::upgrade(storage, path).unwrap_or_else(|e| panic!("upgrading {}: {e}", path.display()));
    (report.extents, report.pages)
}

#[test]
fn a_version_1_image_with_data_zeroes_and_a_backing_file_upgrades_to_version_2_in_place() {
    for (cluster_size, seed) in [(64 * 1024, 1), (4096, 2), (2 * 1024 * 1024, 3)] {
        let what = format!("{} KiB clusters", cluster_size / 1024);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = version_1_image(dir.path(), cluster_size, seed);
        let before = Image::open(&path, &read_only()).expect("opening the version-1 image");
        assert_eq!(before.version(), 1);
        let contents = read_all(&before);
        // Version 1 stores written zeros as data; version 2 stores them as zeros.
        let file = std::fs::read(&path).expect("reading the image");
        let blocks: BTreeMap<u64, Option<u64>> = own_blocks(&before)
            .into_iter()
            .map(|(at, host)| {
                let zeros = |h: u64| file[h as usize..h as usize + 4096].iter().all(|&b| b == 0);
                (at, host.filter(|&h| !zeros(h)))
            })
            .collect();
        assert!(
            blocks.values().any(|h| h.is_some()) && blocks.values().any(|h| h.is_none()),
            "{what}: the version-1 image should hold both data and zeros"
        );
        drop(before);
        // The backing file shows through somewhere, so that falling through is tested.
        let base = fit(&backing_content(seed, BACKING_LEN), SIZE as usize);
        assert!(
            (0..SIZE as usize)
                .step_by(4096)
                .any(|at| !blocks.contains_key(&(at as u64))
                    && base[at..at + 4096].iter().any(|&b| b != 0)),
            "{what}: nothing falls through to the backing file"
        );

        let (extents, pages) = upgrade_file(&path);
        assert!(extents > 0 && pages > 0, "{what}: an empty tree");

        let after = Image::open(&path, &read_only()).expect("opening the upgraded image");
        assert_eq!(after.version(), 2, "{what}: still version 1");
        assert_eq!(after.virtual_size(), SIZE);
        assert!(
            after.backing().is_some(),
            "{what}: the backing file was dropped"
        );
        assert_same_bytes(&read_all(&after), &contents, &format!("{what}: upgraded"));
        // No data moved: every block of data is where version 1 had it.
        assert_eq!(own_blocks(&after), blocks, "{what}: the map changed");
        drop(after);
        let report = ops::check(&path, false).expect("check");
        assert_eq!(report.version, 2);
        assert!(
            report.corruptions.is_empty(),
            "{what}: check after the upgrade: {:?}",
            report.corruptions
        );

        // It is a working version-2 image, and a second upgrade is refused.
        let image = Image::open(&path, &OpenOptions::default()).expect("opening read-write");
        image.write_at(b"after the upgrade", 5000).expect("a write");
        image.flush().expect("a flush");
        drop(image);
        let image = Image::open(&path, &read_only()).expect("reopening");
        let mut expected = contents;
        expected[5000..5017].copy_from_slice(b"after the upgrade");
        assert_same_bytes(
            &read_all(&image),
            &expected,
            &format!("{what}: written after"),
        );
        drop(image);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("opening");
        let again = v2::upgrade(Arc::new(FileStorage::new(file)), &path);
        assert!(
            again.is_err_and(|e| e.to_string().contains("already a version 2 image")),
            "{what}: a second upgrade was not refused"
        );
    }
}

/// The bytes of a version-1 image over `base` whose last flushes are in its journal and
/// whose close never happened (no seal): what a machine that lost power leaves.
fn unclean_version_1_bytes(dir: &Path, seed: u64) -> Vec<u8> {
    let path = version_1_image(dir, 16 * 1024, seed);
    let bytes = std::fs::read(&path).expect("reading the image");
    std::fs::remove_file(&path).expect("removing it");
    let storage = Arc::new(MemStorage::new(bytes));
    let dynamic: Arc<dyn Storage> = storage.clone();
    let image = Image::open_storage(dynamic, Path::new(NAME), false).expect("opening it");
    let mut rng = StdRng::seed_from_u64(seed ^ 77);
    for _ in 0..6 {
        Change::random(&mut rng, SIZE, 16 * 1024)
            .apply_to_image(&image)
            .expect("a change");
        image.flush().expect("a flush");
    }
    // Not closed: no closing flush, no seal.
    std::mem::forget(image);
    storage.contents()
}

#[test]
fn a_crash_at_any_point_of_an_upgrade_leaves_an_image_that_opens_with_the_same_contents() {
    let dir = scratch_dir();
    let seed = 9;
    let initial = unclean_version_1_bytes(dir.path(), seed);
    let base = dir.path().join("base.raw");
    let open = |bytes: Vec<u8>, read_only: bool| -> cowimg::Result<(Arc<MemStorage>, Image)> {
        let storage = Arc::new(MemStorage::new(bytes));
        let dynamic: Arc<dyn Storage> = storage.clone();
        let mut image = Image::open_storage(dynamic, Path::new(NAME), read_only)?;
        image.attach_backing(raw_layer(&base));
        Ok((storage, image))
    };
    let (_, before) = open(initial.clone(), true).expect("opening the version-1 image");
    let contents = read_all(&before);
    drop(before);

    let storage = Arc::new(CrashStorage::new(initial.clone()));
    let dynamic: Arc<dyn Storage> = storage.clone();
    v2::upgrade(dynamic, Path::new(NAME)).expect("the upgrade");
    let log = storage.log();
    let syncs = log.iter().filter(|op| matches!(op, LogOp::Sync)).count();
    assert!(syncs >= 2, "the upgrade synced {syncs} times");
    let (_, done) = open(storage.contents(), true).expect("opening the upgraded image");
    assert_eq!(done.version(), 2, "the upgrade did not complete");
    drop(done);

    let mut rng = StdRng::seed_from_u64(seed);
    let mut versions = [0usize; 3];
    let check_path = dir.path().join(NAME);
    for_each_crash_image(&initial, &log, &mut rng, 8, 6, |crash, rng| {
        let what = &crash.what;
        let carry_on = rng.gen_bool(0.2);
        let (storage, image) = open(crash.bytes.clone(), !carry_on)
            .unwrap_or_else(|e| panic!("{what}: the image does not open: {e}"));
        versions[image.version() as usize] += 1;
        assert_same_bytes(&read_all(&image), &contents, what);
        write_sparse(&check_path, &crash.bytes);
        let report =
            ops::check(&check_path, false).unwrap_or_else(|e| panic!("{what}: check: {e}"));
        assert!(
            report.corruptions.is_empty(),
            "{what}: check reports corruption: {:?}",
            report.corruptions
        );
        if carry_on {
            // Whichever version it is, it takes a write and a flush that a reopen shows.
            let version = image.version();
            image
                .write_at(b"carried on", 70_000)
                .expect("a write after the crash");
            image.flush().expect("a flush after the crash");
            drop(image);
            let (_, again) = open(storage.contents(), true).expect("reopening");
            assert_eq!(again.version(), version, "{what}: the version changed");
            let mut expected = contents.clone();
            expected[70_000..70_010].copy_from_slice(b"carried on");
            assert_same_bytes(&read_all(&again), &expected, &format!("{what}: carried on"));
        }
    });
    assert!(
        versions[1] > 0 && versions[2] > 0,
        "the crash images opened as version 1 {} times and as version 2 {} times",
        versions[1],
        versions[2]
    );
}

/// Version 1 stores a plain write of zeros as data. Version 2 never references a block of
/// zeros (FORMAT-v2.md, "Allocation": that is what lets holes be its free space), so the
/// upgrade must not map such blocks as data: else a copy of the image that turns blocks of
/// zeros into holes (`cp --sparse=always`) references holes, which `check` calls lost data
/// and the allocator would hand out again while they are still mapped.
#[test]
fn an_upgrade_maps_no_block_of_zeros_as_data_so_a_sparse_copy_still_checks_clean() {
    for backing in [true, false] {
        let what = if backing {
            "over base.raw"
        } else {
            "without a backing file"
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(NAME);
        let base = dir.path().join("base.raw");
        std::fs::write(&base, backing_content(4, BACKING_LEN)).expect("writing base.raw");
        Image::create(
            &path,
            &CreateOptions {
                size: Some(SIZE),
                cluster_size: 64 * 1024,
                backing: backing.then(|| ("base.raw".to_string(), BackingFormat::Raw)),
                version: 1,
            },
        )
        .expect("creating the version-1 image");
        let image = Image::open(&path, &OpenOptions::default()).expect("opening it");
        image.write_at(&pattern(1, 200_000), 0).expect("data");
        // Zeros written as data: whole units, and units of a cluster that also holds data.
        image
            .write_at(&vec![0; 8 * 4096], 64 * 1024)
            .expect("zeros");
        image
            .write_at(&vec![0; 3 * 4096], 256 * 1024)
            .expect("zeros");
        image
            .write_at(&pattern(2, 4096), 256 * 1024 + 3 * 4096)
            .expect("data");
        image.flush().expect("flush");
        let contents = read_all(&image);
        let zero_data = own_blocks(&image)
            .values()
            .flatten()
            .filter(|&&h| {
                let bytes = std::fs::read(&path).expect("reading the image");
                bytes[h as usize..h as usize + 4096].iter().all(|&b| b == 0)
            })
            .count();
        assert!(
            zero_data >= 11,
            "{what}: version 1 stored {zero_data} blocks of zeros"
        );
        drop(image);

        upgrade_file(&path);
        let image = Image::open(&path, &read_only()).expect("opening the upgraded image");
        assert_eq!(image.version(), 2);
        assert_same_bytes(&read_all(&image), &contents, what);
        let bytes = std::fs::read(&path).expect("reading the image");
        for (&at, host) in &own_blocks(&image) {
            if let Some(h) = *host {
                assert!(
                    bytes[h as usize..h as usize + 4096].iter().any(|&b| b != 0),
                    "{what}: virtual offset {at:#x} is mapped to a block of zeros at {h:#x}"
                );
            }
        }
        drop(image);
        let copy = dir.path().join("sparse-copy.cow");
        write_sparse(&copy, &bytes);
        let report = ops::check(&copy, false).expect("check");
        assert!(
            report.corruptions.is_empty(),
            "{what}: check on a sparse copy: {:?}",
            report.corruptions
        );
        let image = Image::open(&copy, &read_only()).expect("opening the sparse copy");
        assert_same_bytes(
            &read_all(&image),
            &contents,
            &format!("{what}: sparse copy"),
        );
    }
}
