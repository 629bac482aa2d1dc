//! Crash simulation with concurrent writers (tests/crash.rs does it for one writer): several
//! threads each write their own range of the disk and flush, at the same time, so that
//! flushes take each other's writes along (group commit) and writes land while a flush is
//! in progress. Every write, punch and sync is logged; for every sync point, and random
//! subsets and torn sectors of what followed it, the disk is rebuilt and opened without
//! repair. It must open, `check` must find no corruption, and each thread's range must read
//! as its last flushed write or one of its writes since: never an older one, never another
//! thread's bytes. Run for version 2 and for version 1.
mod lib_support;

use cowimg::image::{ops, CreateOptions, Image};
use cowimg::storage::{MemStorage, Storage};
use lib_support::crash_log::{for_each_crash_image, CrashImage, CrashStorage, LogOp};
use lib_support::{pattern, scratch_dir, write_sparse};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

const NAME: &str = "crash-v2.cow";
const SIZE: u64 = 1 << 20;
/// `(offset, length)` of each thread's range: two pairs of neighbours that share a block
/// (and, in version 1, a cluster), far from each other; none starts or ends on a block.
const RANGES: [(u64, u64); 4] = [
    (1000, 9000),
    (10_000, 9000),
    (300_500, 12_000),
    (312_500, 5000),
];

/// What a thread wrote over its whole range.
#[derive(Debug, Clone, Copy)]
enum Content {
    Data(u64),
    Zeros,
}

impl Content {
    fn bytes(self, len: u64) -> Vec<u8> {
        match self {
            Content::Data(seed) => pattern(seed, len as usize),
            Content::Zeros => vec![0; len as usize],
        }
    }
}

/// One thread's history: its versions in order (version 0 is the empty disk), and for every
/// flush it made that returned, the version it had written and the syncs done by then.
#[derive(Debug, Default)]
struct History {
    versions: Vec<Vec<u8>>,
    flushed: Vec<(usize, usize)>,
}

struct Recorded {
    version: u32,
    initial: Vec<u8>,
    log: Vec<LogOp>,
    histories: Vec<History>,
    most_flushes_at_once: usize,
}

/// Runs the threads over a fresh image of `version` on crash-simulating storage.
fn record(version: u32, rounds: usize, seed: u64) -> Recorded {
    let mem = MemStorage::new(Vec::new());
    let opts = CreateOptions {
        size: Some(SIZE),
        cluster_size: 16 * 1024,
        version,
        ..Default::default()
    };
    Image::create_on(&mem, Path::new(NAME), &opts).expect("creating the image");
    let initial = mem.contents();
    // Syncs that take a while: a flush called while another runs waits for it.
    let storage = Arc::new(CrashStorage::with_sync_delay(
        initial.clone(),
        Duration::from_millis(2),
    ));
    let dynamic: Arc<dyn Storage> = storage.clone();
    let image = Image::open_storage(dynamic, Path::new(NAME), false).expect("opening it");
    assert_eq!(image.version(), version);
    let in_flush = AtomicUsize::new(0);
    let most = AtomicUsize::new(0);
    let together = Barrier::new(RANGES.len());
    let histories: Vec<History> = std::thread::scope(|s| {
        let workers: Vec<_> = RANGES
            .iter()
            .enumerate()
            .map(|(t, &(offset, len))| {
                let (image, storage, in_flush, most) = (&image, &storage, &in_flush, &most);
                let together = &together;
                s.spawn(move || {
                    together.wait();
                    let mut rng = StdRng::seed_from_u64(seed ^ ((t as u64 + 1) * 0x9e37_79b9));
                    let mut h = History {
                        versions: vec![vec![0; len as usize]],
                        flushed: Vec::new(),
                    };
                    for round in 0..rounds {
                        // Some rounds only flush: a flush of other threads' writes, called
                        // while a thread that wrote may be flushing too.
                        for _ in 0..rng.gen_range(0..=2) {
                            let content = if rng.gen_bool(0.15) {
                                Content::Zeros
                            } else {
                                Content::Data(rng.gen())
                            };
                            match content {
                                Content::Data(_) => image.write_at(&content.bytes(len), offset),
                                Content::Zeros => image.write_zeroes(offset, len),
                            }
                            .unwrap_or_else(|e| panic!("thread {t}: writing: {e}"));
                            h.versions.push(content.bytes(len));
                        }
                        if round % 3 == 2 {
                            // Every third round all the threads call flush at once.
                            together.wait();
                        }
                        let now = in_flush.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        image
                            .flush()
                            .unwrap_or_else(|e| panic!("thread {t}: flushing: {e}"));
                        in_flush.fetch_sub(1, Ordering::SeqCst);
                        h.flushed.push((h.versions.len() - 1, storage.syncs()));
                    }
                    h
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a writer thread"))
            .collect()
    });
    // The running image reads every thread's last write.
    let mut all = vec![0u8; SIZE as usize];
    image.read_at(&mut all, 0).expect("reading the image");
    for (t, &(offset, len)) in RANGES.iter().enumerate() {
        let last = histories[t].versions.last().expect("versions");
        assert!(
            all[offset as usize..(offset + len) as usize] == last[..],
            "the running image lost thread {t}'s last write"
        );
    }
    drop(image);
    Recorded {
        version,
        initial,
        log: storage.log(),
        histories,
        most_flushes_at_once: most.load(Ordering::SeqCst),
    }
}

/// Checks one thread's range of a crash image: its last flush that returned before the
/// crash, or a later write of its own.
///
/// Version 2 shows every write whole. Version 1 promises less (FORMAT.md, "The guarantee":
/// "a write that recovery shows is whole at the level of each unit"): its write_zeroes
/// zeroes the partial units at either end before it marks the whole ones, and a flush may
/// take its snapshot in between. So in version 1 each 4 KiB unit of the range is checked on
/// its own (the units of these 16 KiB clusters).
fn check_range(rec: &Recorded, t: usize, content: &[u8], syncs: usize, what: &str, whole: bool) {
    let h = &rec.histories[t];
    let durable = h
        .flushed
        .iter()
        .filter(|&&(_, end_sync)| end_sync <= syncs)
        .map(|&(version, _)| version)
        .max()
        .unwrap_or(0);
    let (offset, len) = RANGES[t];
    let range = &content[offset as usize..(offset + len) as usize];
    if !whole {
        let mut unit = offset / 4096 * 4096;
        while unit < offset + len {
            let from = (unit.max(offset) - offset) as usize;
            let to = ((unit + 4096).min(offset + len) - offset) as usize;
            let matches: Vec<usize> = (0..h.versions.len())
                .filter(|&v| h.versions[v][from..to] == range[from..to])
                .collect();
            assert!(
                matches.iter().any(|&v| v >= durable),
                "{what}: thread {t}'s unit at {unit:#x} reads version(s) {matches:?} of {} \
                 (none of its own writes when empty), but its flush of version {durable} had \
                 returned{}",
                h.versions.len() - 1,
                describe(range, h, offset)
            );
            unit += 4096;
        }
        return;
    }
    let matches: Vec<usize> = (0..h.versions.len())
        .filter(|&v| h.versions[v] == range)
        .collect();
    assert!(
        matches.iter().any(|&v| v >= durable),
        "{what}: thread {t}'s range reads version(s) {matches:?} of {} (none of its own writes \
         when empty), but its flush of version {durable} had returned{}",
        h.versions.len() - 1,
        describe(range, h, offset)
    );
}

/// Where a range that matches no version differs from the closest one, and which versions
/// those bytes come from: a mix of versions, or bytes of no version at all.
fn describe(range: &[u8], h: &History, offset: u64) -> String {
    if h.versions.iter().any(|v| v == range) {
        return String::new();
    }
    let diff = |v: &[u8]| range.iter().zip(v).filter(|(a, b)| a != b).count();
    let closest = (0..h.versions.len())
        .min_by_key(|&v| diff(&h.versions[v]))
        .expect("versions");
    let mut pieces = Vec::new();
    let mut i = 0;
    while i < range.len() {
        if range[i] == h.versions[closest][i] {
            i += 1;
            continue;
        }
        let start = i;
        while i < range.len() && range[i] != h.versions[closest][i] {
            i += 1;
        }
        let from: Vec<usize> = (0..h.versions.len())
            .filter(|&v| h.versions[v][start..i] == range[start..i])
            .collect();
        pieces.push(format!(
            "{:#x}..{:#x} from version(s) {from:?}",
            offset + start as u64,
            offset + i as u64
        ));
    }
    format!(
        "; closest is version {closest}, which differs at {}",
        pieces.join(", ")
    )
}

/// Opens a crash image without repair, checks every range and `check`; for some, carries on
/// writing and flushing and reopens.
fn check_crash_image(rec: &Recorded, image: CrashImage, dir: &Path, carry_on: bool) {
    let CrashImage { syncs, what, bytes } = image;
    let storage = Arc::new(MemStorage::new(bytes.clone()));
    let dynamic: Arc<dyn Storage> = storage.clone();
    let opened = Image::open_storage(dynamic, Path::new(NAME), !carry_on)
        .unwrap_or_else(|e| panic!("{what}: the crashed image does not open: {e}"));
    let mut content = vec![0u8; SIZE as usize];
    opened
        .read_at(&mut content, 0)
        .unwrap_or_else(|e| panic!("{what}: reading the crashed image: {e}"));
    for t in 0..RANGES.len() {
        check_range(rec, t, &content, syncs, &what, rec.version == 2);
    }
    let mut outside = content.clone();
    for &(offset, len) in &RANGES {
        outside[offset as usize..(offset + len) as usize].fill(0);
    }
    assert!(
        outside.iter().all(|&b| b == 0),
        "{what}: bytes outside every thread's range"
    );
    check_finds_no_corruption(dir, &bytes, &what);
    if carry_on {
        // New writes and a flush land on whatever the crash left, and a reopen shows them.
        for (t, &(offset, len)) in RANGES.iter().enumerate() {
            let data = pattern(syncs as u64 * 31 + t as u64, len as usize);
            opened
                .write_at(&data, offset)
                .unwrap_or_else(|e| panic!("{what}: writing after the crash: {e}"));
            content[offset as usize..(offset + len) as usize].copy_from_slice(&data);
        }
        opened
            .flush()
            .unwrap_or_else(|e| panic!("{what}: flushing after the crash: {e}"));
        drop(opened);
        let dynamic: Arc<dyn Storage> = Arc::new(MemStorage::new(storage.contents()));
        let again = Image::open_storage(dynamic, Path::new(NAME), true)
            .unwrap_or_else(|e| panic!("{what}: reopening after the crash and a flush: {e}"));
        let mut after = vec![0u8; SIZE as usize];
        again.read_at(&mut after, 0).expect("reading");
        lib_support::assert_same_bytes(&after, &content, &format!("{what}: carried on"));
    }
}

/// Writes a crash image to a file and runs `check` on it: it must find no corruption.
fn check_finds_no_corruption(dir: &Path, bytes: &[u8], what: &str) {
    let path = dir.join(NAME);
    write_sparse(&path, bytes);
    let report = ops::check(&path, false).unwrap_or_else(|e| panic!("{what}: check: {e}"));
    assert!(
        report.corruptions.is_empty(),
        "{what}: check reports corruption: {:?}",
        report.corruptions
    );
}

fn crash_everywhere_with_concurrent_writers(version: u32, rounds: usize, seed: u64) {
    let rec = record(version, rounds, seed);
    assert!(
        rec.most_flushes_at_once >= 2,
        "the threads never flushed at the same time"
    );
    let syncs = rec
        .log
        .iter()
        .filter(|op| matches!(op, LogOp::Sync))
        .count();
    if version == 2 {
        // The journal filled up at least once: a tree flush wrote a header slot.
        assert!(
            rec.log
                .iter()
                .any(|op| matches!(op, LogOp::Write { offset, .. } if *offset < 8192)),
            "no tree flush happened"
        );
    }
    let dir = scratch_dir();
    let mut rng = StdRng::seed_from_u64(seed ^ 0xc0ffee);
    let mut checked = 0;
    for_each_crash_image(&rec.initial, &rec.log, &mut rng, 3, 2, |image, _| {
        let carry_on = image.syncs % 5 == 0 && image.what.contains("torn sectors 1");
        let what = format!("version {version}: {}", image.what);
        check_crash_image(&rec, CrashImage { what, ..image }, dir.path(), carry_on);
        checked += 1;
    });
    assert!(checked > syncs, "only {checked} crash images were checked");
}

#[test]
fn crash_at_any_point_with_concurrent_writers_and_flushes_keeps_every_returned_flush_v2() {
    crash_everywhere_with_concurrent_writers(2, 40, 1);
}

#[test]
fn crash_at_any_point_with_concurrent_writers_and_flushes_keeps_every_returned_flush_v1() {
    crash_everywhere_with_concurrent_writers(1, 16, 2);
}

/// A new 1 MiB version-2 image opened over logging storage: the bytes it started from,
/// the storage and the image.
fn new_logged_image() -> (Vec<u8>, Arc<CrashStorage>, Image) {
    let mem = MemStorage::new(Vec::new());
    let opts = CreateOptions {
        size: Some(SIZE),
        version: 2,
        ..Default::default()
    };
    Image::create_on(&mem, Path::new(NAME), &opts).expect("creating the image");
    let initial = mem.contents();
    let storage = Arc::new(CrashStorage::new(initial.clone()));
    let dynamic: Arc<dyn Storage> = storage.clone();
    let image = Image::open_storage(dynamic, Path::new(NAME), false).expect("opening it");
    (initial, storage, image)
}

/// Every crash image of `log` opens and reads blocks 0, 8 and 16, each all one byte, as
/// one of `states` (the three bytes after each flush).
fn every_crash_shows_one_of(
    initial: &[u8],
    log: &[LogOp],
    seed: u64,
    subsets: usize,
    states: &[[u8; 3]],
) {
    const B: u64 = 4096;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut images = 0;
    for_each_crash_image(initial, log, &mut rng, subsets, 2, |crashed, _| {
        let CrashImage { what, bytes, .. } = crashed;
        let dynamic: Arc<dyn Storage> = Arc::new(MemStorage::new(bytes));
        let opened = Image::open_storage(dynamic, Path::new(NAME), true)
            .unwrap_or_else(|e| panic!("{what}: the crashed image does not open: {e}"));
        let seen: Vec<Option<u8>> = [0, 8, 16]
            .iter()
            .map(|&block| {
                let mut b = vec![0u8; B as usize];
                opened
                    .read_at(&mut b, block * B)
                    .unwrap_or_else(|e| panic!("{what}: reading block {block}: {e}"));
                b.iter().all(|&x| x == b[0]).then_some(b[0])
            })
            .collect();
        assert!(
            states
                .iter()
                .any(|st| st.iter().map(|&x| Some(x)).eq(seen.iter().copied())),
            "{what}: blocks 0, 8 and 16 read {seen:x?}, the state of no flush"
        );
        images += 1;
    });
    assert!(images > 10, "only {images} crash images");
}

/// Version 2 hands a block freed by an overwrite to the next new write instead of growing
/// the file (FORMAT-v2.md, "Allocation"). The block is freed only once a flush that no
/// longer references it is durable, so a crash at any point shows the state of one flush:
/// never a later write's bytes where the old block was mapped.
#[test]
fn a_block_freed_by_an_overwrite_is_written_again_and_no_crash_shows_it_under_its_old_mapping() {
    const B: u64 = 4096;
    let (initial, storage, image) = new_logged_image();
    let fill = |b: u8| vec![b; B as usize];
    // Blocks 0, 8 and 16 after each flush.
    let states = [
        [0u8, 0, 0],
        [0xa1, 0, 0],
        [0xb2, 0xc3, 0],
        [0xb2, 0xc3, 0xd4],
    ];
    image.write_at(&fill(0xa1), 0).unwrap();
    image.flush().unwrap();
    // The overwrite stops referencing A's block; the write after it, in the same flush,
    // must not get that block, which the durable state still maps.
    image.write_at(&fill(0xb2), 0).unwrap();
    image.write_at(&fill(0xc3), 8 * B).unwrap();
    image.flush().unwrap();
    let grown = storage.len().unwrap();
    image.write_at(&fill(0xd4), 16 * B).unwrap();
    assert_eq!(
        storage.len().unwrap(),
        grown,
        "the write after the flush went to the block the overwrite freed, not to the end"
    );
    image.flush().unwrap();
    drop(image);
    every_crash_shows_one_of(&initial, &storage.log(), 7, 8, &states);
}

/// A kept-journal tree flush writes its header slot without a barrier of its own
/// (FORMAT-v2.md, "The flush protocol"): until the next barrier the old slot may be the
/// durable one, so the page the update replaced must not be reused before it. A flush
/// with nothing to flush makes that barrier; a write after it may then take the page.
#[test]
fn a_tree_page_replaced_under_a_header_not_yet_durable_is_reused_only_after_a_barrier() {
    const B: u64 = 4096;
    let (initial, storage, image) = new_logged_image();
    // Every flush writes the tree, keeping the journal.
    assert!(image.set_flush_limits(cowimg::image::v2::FlushLimits {
        journaled_extents: 0,
        ..Default::default()
    }));
    let fill = |b: u8| vec![b; B as usize];
    // Blocks 0, 8 and 16 after each flush.
    let states = [
        [0u8, 0, 0],
        [0xa1, 0, 0],
        [0xa1, 0xb2, 0],
        [0xa1, 0xb2, 0xc3],
    ];
    image.write_at(&fill(0xa1), 0).unwrap();
    image.flush().unwrap();
    // This tree flush replaces the root leaf.
    image.write_at(&fill(0xb2), 8 * B).unwrap();
    image.flush().unwrap();
    let syncs = storage.syncs();
    image.flush().unwrap();
    assert_eq!(storage.syncs(), syncs + 1, "no barrier for the header slot");
    let grown = storage.len().unwrap();
    image.write_at(&fill(0xc3), 16 * B).unwrap();
    assert_eq!(
        storage.len().unwrap(),
        grown,
        "the write went to the end of the file, not to the old root's block"
    );
    image.flush().unwrap();
    // The log is taken with the image open: its close would make a barrier of its own.
    every_crash_shows_one_of(&initial, &storage.log(), 5, 16, &states);
}

/// A tree flush rewrites at most a budget of leaves and carries the changes it left out into
/// the new journal, with the changes beyond its extent bound (FORMAT-v2.md, "The flush
/// protocol"). The limits are made small here, so that a map of a few leaves takes the paths
/// a map of millions of extents does: scattered writes over a populated map, a flush every
/// few of them. A crash at any point shows the disk as it was after some number of writes,
/// at least as many as the last flush that returned covered: no block older, none mixed.
#[test]
fn a_tree_flush_cut_short_by_its_leaf_budget_keeps_every_returned_flush_at_any_crash_point() {
    const B: u64 = 4096;
    const BLOCKS: u64 = 2048;
    const WRITES_PER_FLUSH: usize = 12;
    let limits = cowimg::image::v2::FlushLimits {
        journaled_extents: 40,
        tree_flush_extents: 24,
        tree_flush_leaves: 2,
        kept_journal_bytes: 64 << 10,
    };
    let mem = Arc::new(MemStorage::new(Vec::new()));
    let opts = CreateOptions {
        size: Some(BLOCKS * B),
        version: 2,
        ..Default::default()
    };
    Image::create_on(mem.as_ref(), Path::new(NAME), &opts).expect("creating the image");
    // Every other block written, so that no two extents join: a map of several leaves.
    let populated = |b: u64| {
        if b.is_multiple_of(2) {
            pattern(b, B as usize)
        } else {
            vec![0; B as usize]
        }
    };
    {
        let dynamic: Arc<dyn Storage> = mem.clone();
        let image = Image::open_storage(dynamic, Path::new(NAME), false).expect("opening it");
        assert!(image.set_flush_limits(limits));
        for b in (0..BLOCKS).step_by(2) {
            image.write_at(&populated(b), b * B).expect("populating");
            if b % 64 == 62 {
                image.flush().expect("flushing");
            }
        }
        image.flush().expect("flushing");
        assert_eq!(image.map_height(), Some(2), "the map is one leaf");
    }
    let initial = mem.contents();
    let storage = Arc::new(CrashStorage::new(initial.clone()));
    let dynamic: Arc<dyn Storage> = storage.clone();
    let image = Image::open_storage(dynamic, Path::new(NAME), false).expect("reopening it");
    assert!(image.set_flush_limits(limits));
    let mut rng = StdRng::seed_from_u64(11);
    // `(block, seed)` of every write in order; `(writes, syncs)` at each returned flush.
    let mut writes: Vec<(u64, u64)> = Vec::new();
    let mut flushed: Vec<(usize, usize)> = Vec::new();
    for round in 0..45 {
        for _ in 0..WRITES_PER_FLUSH {
            let block = rng.gen_range(0..BLOCKS);
            let seed = 1_000_000 + writes.len() as u64;
            image
                .write_at(&pattern(seed, B as usize), block * B)
                .unwrap_or_else(|e| panic!("round {round}: writing: {e}"));
            writes.push((block, seed));
        }
        image.flush().expect("flushing");
        flushed.push((writes.len(), storage.syncs()));
    }
    // The running image reads every block's last write.
    let mut last: Vec<Vec<u8>> = (0..BLOCKS).map(populated).collect();
    for &(block, seed) in &writes {
        last[block as usize] = pattern(seed, B as usize);
    }
    let mut disk = vec![0u8; (BLOCKS * B) as usize];
    image.read_at(&mut disk, 0).expect("reading the image");
    lib_support::assert_same_bytes(&disk, &last.concat(), "the running image");
    drop(image);
    let log = storage.log();
    // Each block's writes, as indexes into `writes`.
    let mut by_block: std::collections::HashMap<u64, Vec<usize>> = Default::default();
    for (i, &(block, _)) in writes.iter().enumerate() {
        by_block.entry(block).or_default().push(i);
    }
    let dir = scratch_dir();
    let mut images = 0;
    for_each_crash_image(&initial, &log, &mut rng, 3, 2, |crashed, _| {
        let CrashImage { syncs, what, bytes } = crashed;
        let dynamic: Arc<dyn Storage> = Arc::new(MemStorage::new(bytes.clone()));
        let opened = Image::open_storage(dynamic, Path::new(NAME), true)
            .unwrap_or_else(|e| panic!("{what}: the crashed image does not open: {e}"));
        let mut disk = vec![0u8; (BLOCKS * B) as usize];
        opened
            .read_at(&mut disk, 0)
            .unwrap_or_else(|e| panic!("{what}: reading: {e}"));
        let durable = flushed
            .iter()
            .filter(|&&(_, at)| at <= syncs)
            .map(|&(n, _)| n)
            .max()
            .unwrap_or(0);
        // The numbers of writes done that every block agrees with: `lo..=hi`.
        let (mut lo, mut hi) = (durable, writes.len());
        for b in 0..BLOCKS {
            let seen = &disk[(b * B) as usize..((b + 1) * B) as usize];
            let mine = by_block.get(&b).map_or(&[][..], |v| &v[..]);
            let shown = if seen == populated(b) {
                None
            } else {
                let hit = mine
                    .iter()
                    .position(|&i| pattern(writes[i].1, B as usize) == seen);
                Some(hit.unwrap_or_else(|| {
                    panic!("{what}: block {b} holds the bytes of none of its writes")
                }))
            };
            // Shown: write k of this block, so at least mine[k] + 1 writes were done and
            // its next one was not.
            let (from, to) = match shown {
                None => (0, mine.first().copied().unwrap_or(writes.len())),
                Some(k) => (
                    mine[k] + 1,
                    mine.get(k + 1).copied().unwrap_or(writes.len()),
                ),
            };
            lo = lo.max(from);
            hi = hi.min(to);
            assert!(
                lo <= hi,
                "{what}: block {b} shows the disk after {from}..={to} writes, which no other \
                 block agrees with (the last flush that returned covered {durable})"
            );
        }
        if images % 9 == 0 {
            check_finds_no_corruption(dir.path(), &bytes, &what);
        }
        images += 1;
    });
    assert!(images > 60, "only {images} crash images");
}
