//! `Image::resize` under the crash simulator: every write and sync of a resize is logged,
//! and for every sync point (and random torn subsets of the writes that followed it) the
//! durable bytes are rebuilt and opened. The image must open in exactly one of two states:
//! the old size with all its data, or the new size with the data that fits and zeros
//! beyond. Also: growing after a shrink, and growing over a longer backing file, read zeros.
mod lib_support;

use cowimg::image::Image;
use cowimg::storage::{MemStorage, Storage};
use lib_support::crash_log::{apply, torn, CrashStorage, LogOp};
use lib_support::{backing_content, fit, fresh_image_bytes, open_mem, raw_layer, read_all, Change};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::sync::Arc;

struct Scenario {
    size: u64,
    new_size: u64,
    cluster_size: u64,
    /// Length of a raw backing file, if the image has one.
    backing_len: Option<usize>,
    seed: u64,
}

/// What a resize left: the log from before it to its end, and the two allowed states.
struct Recorded {
    /// The image bytes when the resize started (everything before it durable).
    start: Vec<u8>,
    log: Vec<LogOp>,
    old: Vec<u8>,
    new: Vec<u8>,
    backing: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

fn record(s: &Scenario) -> Recorded {
    let dir = tempfile::tempdir().expect("tempdir");
    let backing = s.backing_len.map(|len| {
        let path = dir.path().join("backing.raw");
        std::fs::write(&path, backing_content(s.seed, len)).expect("writing the backing file");
        path
    });
    let storage = Arc::new(CrashStorage::new(fresh_image_bytes(s.size, s.cluster_size)));
    let dynamic: Arc<dyn Storage> = storage.clone();
    let mut image =
        Image::open_storage(dynamic, Path::new("resize.cow"), false).expect("opening the image");
    if let Some(b) = &backing {
        image.attach_backing(raw_layer(b));
    }
    let mut rng = StdRng::seed_from_u64(s.seed);
    for _ in 0..24 {
        Change::random(&mut rng, s.size, s.cluster_size)
            .apply_to_image(&image)
            .expect("applying a change");
    }
    // Data right at the old end, so that a shrink has something to drop.
    let tail = s.size.min(6000);
    image
        .write_at(
            &lib_support::pattern(s.seed + 1, tail as usize),
            s.size - tail,
        )
        .expect("writing the tail");
    image.flush().expect("flushing the changes");
    let old = read_all(&image);
    let start = storage.contents();
    let log_start = storage.log().len();
    image.resize(s.new_size).expect("resizing");
    assert_eq!(image.virtual_size(), s.new_size);
    let new = read_all(&image);
    assert_eq!(
        new,
        fit(&old, s.new_size as usize),
        "after the resize, the image reads its old data up to the new size and zeros beyond"
    );
    let log = storage.log();
    Recorded {
        start,
        log: log[log_start..].to_vec(),
        old,
        new,
        backing,
        _dir: dir,
    }
}

/// Opens crash bytes and says which state they show; panics on any other.
fn check_crash_state(bytes: Vec<u8>, rec: &Recorded, s: &Scenario, what: &str) -> bool {
    let check_path = rec._dir.path().join("crashed.cow");
    std::fs::write(&check_path, &bytes).expect("writing the crash image");
    let report = cowimg::image::ops::check(&check_path, false)
        .unwrap_or_else(|e| panic!("{what}: check could not run: {e}"));
    assert!(
        report.corruptions.is_empty(),
        "{what}: corruption after a crash: {:?}",
        report.corruptions
    );
    let storage = Arc::new(MemStorage::new(bytes));
    let backing = rec.backing.as_deref().map(raw_layer);
    let image = open_mem(&storage, "crashed.cow", backing)
        .unwrap_or_else(|e| panic!("{what}: the crashed image does not open: {e}"));
    let content = read_all(&image);
    if image.virtual_size() == s.size {
        lib_support::assert_same_bytes(&content, &rec.old, &format!("{what}: old size"));
        false
    } else {
        assert_eq!(image.virtual_size(), s.new_size, "{what}: a third size");
        lib_support::assert_same_bytes(&content, &rec.new, &format!("{what}: new size"));
        true
    }
}

/// Every sync point of the resize, whole and with torn writes after it.
fn check_every_sync_point(s: Scenario) {
    let rec = record(&s);
    let syncs: Vec<usize> = std::iter::once(0)
        .chain(
            rec.log
                .iter()
                .enumerate()
                .filter(|(_, op)| matches!(op, LogOp::Sync))
                .map(|(i, _)| i + 1),
        )
        .collect();
    let mut rng = StdRng::seed_from_u64(s.seed ^ 0xc0ffee);
    let mut saw_new = false;
    let mut saw_old = false;
    for (n, &durable_end) in syncs.iter().enumerate() {
        let mut durable = rec.start.clone();
        for op in &rec.log[..durable_end] {
            apply(&mut durable, op);
        }
        let pending_end = syncs.get(n + 1).copied().unwrap_or(rec.log.len());
        let pending = &rec.log[durable_end..pending_end];
        for attempt in 0..6 {
            let mut bytes = durable.clone();
            if attempt > 0 {
                for op in pending {
                    if rng.gen_bool(0.5) {
                        for piece in torn(op, &mut rng) {
                            apply(&mut bytes, &piece);
                        }
                    }
                }
            }
            let what = format!("crash after sync {n} of {}, attempt {attempt}", syncs.len());
            if check_crash_state(bytes, &rec, &s, &what) {
                saw_new = true;
            } else {
                saw_old = true;
            }
        }
    }
    assert!(saw_old, "no crash point showed the old size");
    assert!(saw_new, "no crash point showed the new size");
}

#[test]
fn a_crash_during_a_shrink_leaves_the_old_size_with_all_data_or_the_new_size() {
    check_every_sync_point(Scenario {
        size: 4 << 20,
        new_size: (1 << 20) + 12345,
        cluster_size: 64 << 10,
        backing_len: None,
        seed: 1,
    });
}

#[test]
fn a_crash_during_a_shrink_over_a_backing_file_leaves_one_of_the_two_states() {
    check_every_sync_point(Scenario {
        size: 3 << 20,
        new_size: 1 << 20,
        cluster_size: 4 << 10,
        backing_len: Some(3 << 20),
        seed: 2,
    });
}

#[test]
fn a_crash_during_a_grow_leaves_the_old_size_or_the_new_size_with_zeros() {
    check_every_sync_point(Scenario {
        size: (1 << 20) + 5000,
        new_size: 3 << 20,
        cluster_size: 64 << 10,
        backing_len: None,
        seed: 3,
    });
}

#[test]
fn a_crash_during_a_grow_over_a_longer_backing_file_never_shows_the_backing_data() {
    check_every_sync_point(Scenario {
        size: (1 << 20) + 5000,
        new_size: 4 << 20,
        cluster_size: 64 << 10,
        backing_len: Some(3 << 20),
        seed: 4,
    });
}

#[test]
fn growing_after_a_shrink_reads_zeros_where_data_was_dropped() {
    let storage = Arc::new(MemStorage::new(fresh_image_bytes(2 << 20, 64 << 10)));
    let mut image = open_mem(&storage, "regrow.cow", None).expect("opening");
    let data = lib_support::pattern(7, 2 << 20);
    image.write_at(&data, 0).expect("writing");
    image.flush().expect("flushing");
    image.resize(700_001).expect("shrinking");
    image.resize(2 << 20).expect("growing");
    let mut expected = data[..700_001].to_vec();
    expected.resize(2 << 20, 0);
    lib_support::assert_same_bytes(&read_all(&image), &expected, "after shrink and grow");
    drop(image);
    let reopened = open_mem(&storage, "regrow.cow", None).expect("reopening");
    assert_eq!(reopened.virtual_size(), 2 << 20);
    lib_support::assert_same_bytes(&read_all(&reopened), &expected, "after reopening");
}

#[test]
fn a_read_only_image_refuses_to_resize() {
    let storage = Arc::new(MemStorage::new(fresh_image_bytes(1 << 20, 64 << 10)));
    let dynamic: Arc<dyn Storage> = storage.clone();
    let mut image = Image::open_storage(dynamic, Path::new("ro.cow"), true).expect("opening");
    assert!(matches!(
        image.resize(2 << 20),
        Err(cowimg::Error::ReadOnly { .. })
    ));
    assert_eq!(image.virtual_size(), 1 << 20);
}
