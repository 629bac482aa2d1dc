//! Model-based tests: random sequences of writes, zero writes, discards, flushes and reopens
//! on overlays over raw backing files and on two-level chains, checked byte for byte
//! against a plain `Vec<u8>` after every step. `PROPTEST_CASES` raises the case count.
mod lib_support;

use cowimg::format::BackingFormat;
use cowimg::image::v2::FlushLimits;
use cowimg::image::{CreateOptions, ExtentKind, Image, Layer, OpenOptions};
use cowimg::storage::MemStorage;
use lib_support::{
    assert_same_bytes, backing_content, create_image, fit, open_mem, pattern, raw_layer, read_all,
    Change,
};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const CLUSTER_SIZES: [u64; 4] = [4096, 16 * 1024, 64 * 1024, 2 * 1024 * 1024];

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A change described independently of the image size, scaled once the size is known.
#[derive(Debug, Clone)]
struct ChangeSpec {
    kind: u8,
    offset_fraction: u32,
    len_class: u8,
    len_raw: u32,
    align: bool,
    seed: u64,
}

impl ChangeSpec {
    fn resolve(&self, size: u64, cluster_size: u64) -> Change {
        let len = match self.len_class {
            0 => 1 + self.len_raw as u64 % 600,
            1 => 4096 * (1 + self.len_raw as u64 % 4),
            2 => 1 + self.len_raw as u64 % (3 * cluster_size.min(256 * 1024)),
            _ => 1 + self.len_raw as u64 % (40 * 1024),
        }
        .min(size);
        let mut offset =
            ((size - len) as u128 * self.offset_fraction as u128 / u32::MAX as u128) as u64;
        if self.align {
            offset &= !4095;
        }
        match self.kind {
            0..=5 => Change::Write {
                offset,
                seed: self.seed,
                len: len as usize,
            },
            6 | 7 => Change::Zeroes { offset, len },
            _ => Change::Discard { offset, len },
        }
    }
}

fn change_spec() -> impl Strategy<Value = ChangeSpec> {
    (
        0u8..10,
        any::<u32>(),
        0u8..4,
        any::<u32>(),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |(kind, offset_fraction, len_class, len_raw, align, seed)| ChangeSpec {
                kind,
                offset_fraction,
                len_class,
                len_raw,
                align,
                seed,
            },
        )
}

#[derive(Debug, Clone)]
enum Step {
    Change(ChangeSpec),
    Flush,
    /// Flush, close, open again.
    Reopen,
    /// Read a random range instead of (in addition to) the whole image.
    ReadRange(u32, u32),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => change_spec().prop_map(Step::Change),
        2 => Just(Step::Flush),
        1 => Just(Step::Reopen),
        1 => (any::<u32>(), any::<u32>()).prop_map(|(a, b)| Step::ReadRange(a, b)),
    ]
}

/// How the image under test is built.
#[derive(Debug, Clone)]
struct Setup {
    size: u64,
    cluster_size: u64,
    /// Length of the raw backing file (`None`: no backing file at all).
    backing_len: Option<u64>,
    backing_seed: u64,
    /// The overlay lives in a real file opened by path, or in memory with the backing
    /// attached by hand.
    on_file: bool,
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        1u64..=1024 * 1024,
        any::<bool>(),
        0usize..4,
        prop::option::weighted(0.85, 0u64..=1024 * 1024 + 65536),
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(
            |(size, aligned, cs, backing_len, backing_seed, on_file)| Setup {
                size: if aligned {
                    size.next_multiple_of(4096)
                } else {
                    size
                },
                cluster_size: CLUSTER_SIZES[cs],
                backing_len,
                backing_seed,
                on_file,
            },
        )
}

/// Where the image under test lives, so that it can be reopened.
enum Home {
    File(PathBuf),
    Memory {
        storage: Arc<MemStorage>,
        backing: Box<dyn Fn() -> Option<Layer>>,
    },
}

struct Harness {
    home: Home,
    image: Option<Image>,
    model: Vec<u8>,
    cluster_size: u64,
    steps: usize,
    /// Flush bounds set on every open (version 2 only; see `FlushLimits`).
    limits: Option<FlushLimits>,
}

impl Harness {
    fn new(home: Home, image: Image, model: Vec<u8>, cluster_size: u64) -> Self {
        Harness {
            home,
            image: Some(image),
            model,
            cluster_size,
            steps: 0,
            limits: None,
        }
    }

    /// Sets `limits` on the image now and after every reopen.
    fn with_limits(mut self, limits: FlushLimits) -> Self {
        assert!(
            self.image().set_flush_limits(limits),
            "not a version-2 image"
        );
        self.limits = Some(limits);
        self
    }

    fn image(&self) -> &Image {
        self.image.as_ref().expect("image is open")
    }

    fn reopen(&mut self) {
        let old = self.image.take().expect("image is open");
        old.flush().expect("flush before close");
        drop(old);
        self.image = Some(match &self.home {
            Home::File(path) => {
                Image::open(path, &OpenOptions::default()).expect("reopening the image file")
            }
            Home::Memory { storage, backing } => {
                open_mem(storage, "mem.cow", backing()).expect("reopening the in-memory image")
            }
        });
        if let Some(limits) = self.limits {
            assert!(self.image().set_flush_limits(limits));
        }
    }

    fn check_everything(&self, context: &str) {
        let image = self.image();
        assert_same_bytes(&read_all(image), &self.model, context);
        // The map must tile the image, and what it calls zero or unallocated must read so.
        let map = image
            .map()
            .unwrap_or_else(|e| panic!("{context}: map: {e}"));
        let mut pos = 0;
        for e in &map {
            assert_eq!(
                e.offset, pos,
                "{context}: map has a gap or overlap at {pos:#x}: {map:?}"
            );
            if e.kind != ExtentKind::Data {
                let range = &self.model[e.offset as usize..(e.offset + e.length) as usize];
                assert!(
                    range.iter().all(|&b| b == 0),
                    "{context}: extent {e:?} is not zero in the model"
                );
            }
            pos += e.length;
        }
        assert_eq!(
            pos,
            image.virtual_size(),
            "{context}: map does not cover the image"
        );
    }

    fn run(&mut self, steps: &[Step]) {
        for (i, step) in steps.iter().enumerate() {
            let context = format!("step {i} ({step:?}) after {} steps", self.steps);
            match step {
                Step::Change(spec) => {
                    let change = spec.resolve(self.model.len() as u64, self.cluster_size);
                    change
                        .apply_to_image(self.image())
                        .unwrap_or_else(|e| panic!("{context}: {change:?}: {e}"));
                    change.apply_to_model(&mut self.model);
                }
                Step::Flush => self
                    .image()
                    .flush()
                    .unwrap_or_else(|e| panic!("{context}: flush: {e}")),
                Step::Reopen => self.reopen(),
                Step::ReadRange(a, b) => {
                    let size = self.model.len() as u64;
                    let start = *a as u64 % size;
                    let len = 1 + *b as u64 % (size - start);
                    let mut buf = vec![0u8; len as usize];
                    self.image()
                        .read_at(&mut buf, start)
                        .unwrap_or_else(|e| panic!("{context}: read: {e}"));
                    assert_same_bytes(
                        &buf,
                        &self.model[start as usize..(start + len) as usize],
                        &context,
                    );
                }
            }
            self.check_everything(&context);
        }
        self.steps += steps.len();
        self.reopen();
        self.check_everything("after the final reopen");
    }
}

/// Writes the raw backing file of `setup` (if any) into `dir` and returns its content as the
/// overlay sees it.
fn make_raw_backing(dir: &Path, setup: &Setup, size: u64) -> Option<(PathBuf, Vec<u8>)> {
    let len = setup.backing_len?;
    let content = backing_content(setup.backing_seed, len as usize);
    let path = dir.join("base.raw");
    std::fs::write(&path, &content).expect("writing the backing file");
    Some((path, fit(&content, size as usize)))
}

/// The raw backing file of `setup` (if any), and the model the overlay starts from.
fn backing_and_model(
    dir: &Path,
    setup: &Setup,
    size: u64,
) -> (Option<(PathBuf, Vec<u8>)>, Vec<u8>) {
    let backing = make_raw_backing(dir, setup, size);
    let model = backing
        .as_ref()
        .map_or_else(|| vec![0u8; size as usize], |(_, c)| c.clone());
    (backing, model)
}

fn overlay_harness(dir: &Path, setup: &Setup) -> Harness {
    let size = setup.size;
    let (backing, model) = backing_and_model(dir, setup, size);
    let (home, image) = if setup.on_file {
        let recorded = backing
            .as_ref()
            .map(|_| ("base.raw".to_string(), BackingFormat::Raw));
        let path = create_image(dir, "top.cow", size, setup.cluster_size, recorded);
        let image = Image::open(&path, &OpenOptions::default()).expect("opening the new image");
        (Home::File(path), image)
    } else {
        let backing_path = backing.as_ref().map(|(p, _)| p.clone());
        in_memory(
            size,
            setup.cluster_size,
            Box::new(move || backing_path.as_deref().map(raw_layer)),
        )
    };
    Harness::new(home, image, model, setup.cluster_size)
}

/// A version-2 overlay in memory over the raw backing file of `setup` (if any).
fn v2_harness(dir: &Path, setup: &Setup) -> Harness {
    // Room for a map of several leaves (254 extents each), written below.
    let size = setup.size.max(MAP_OF_LEAVES_BLOCKS * 2 * 4096);
    let (backing, mut model) = backing_and_model(dir, setup, size);
    let storage = Arc::new(MemStorage::new(Vec::new()));
    let opts = CreateOptions {
        size: Some(size),
        version: 2,
        ..Default::default()
    };
    Image::create_on(storage.as_ref(), Path::new("mem.cow"), &opts).expect("creating the image");
    let backing_path = backing.map(|(p, _)| p);
    let attach: Box<dyn Fn() -> Option<Layer>> =
        Box::new(move || backing_path.as_deref().map(raw_layer));
    let image = open_mem(&storage, "mem.cow", attach()).expect("opening the in-memory image");
    // Every other block written, so that no two join: a map of several leaves.
    for i in 0..MAP_OF_LEAVES_BLOCKS {
        let at = i * 2 * 4096;
        let data = pattern(setup.backing_seed ^ i, 4096);
        image.write_at(&data, at).expect("writing the map");
        model[at as usize..at as usize + 4096].copy_from_slice(&data);
    }
    image.flush().expect("flushing the map");
    let home = Home::Memory {
        storage,
        backing: attach,
    };
    Harness::new(home, image, model, setup.cluster_size)
}

/// Blocks written before the steps of [`v2_harness`]: three leaves or so.
const MAP_OF_LEAVES_BLOCKS: u64 = 700;

/// A fresh image of `size` in memory over whatever `attach` opens as its backing file.
fn in_memory(
    size: u64,
    cluster_size: u64,
    attach: Box<dyn Fn() -> Option<Layer>>,
) -> (Home, Image) {
    let storage = Arc::new(MemStorage::new(lib_support::fresh_image_bytes(
        size,
        cluster_size,
    )));
    let image = open_mem(&storage, "mem.cow", attach()).expect("opening the in-memory image");
    (
        Home::Memory {
            storage,
            backing: attach,
        },
        image,
    )
}

/// raw <- mid.cow <- top: the middle image gets its own random changes and a flush first.
fn chain_harness(
    dir: &Path,
    setup: &Setup,
    mid_size: u64,
    mid_cluster: u64,
    mid_changes: &[ChangeSpec],
) -> Harness {
    let backing = make_raw_backing(
        dir,
        &Setup {
            backing_len: Some(setup.backing_len.unwrap_or(0)),
            ..setup.clone()
        },
        mid_size,
    );
    let (_, mut mid_model) = backing.expect("the chain always has a raw base");
    let mid_path = create_image(
        dir,
        "mid.cow",
        mid_size,
        mid_cluster,
        Some(("base.raw".into(), BackingFormat::Raw)),
    );
    {
        let mid = Image::open(&mid_path, &OpenOptions::default()).expect("opening mid.cow");
        for spec in mid_changes {
            let change = spec.resolve(mid_size, mid_cluster);
            change
                .apply_to_image(&mid)
                .unwrap_or_else(|e| panic!("mid.cow: {change:?}: {e}"));
            change.apply_to_model(&mut mid_model);
        }
        mid.flush().expect("flushing mid.cow");
        assert_same_bytes(&read_all(&mid), &mid_model, "mid.cow after its changes");
    }
    let size = setup.size;
    let model = fit(&mid_model, size as usize);
    let (home, image) = if setup.on_file {
        let path = create_image(
            dir,
            "top.cow",
            size,
            setup.cluster_size,
            Some(("mid.cow".into(), BackingFormat::Cowimg)),
        );
        let image =
            Image::open(&path, &OpenOptions::default()).expect("opening top.cow and its chain");
        (Home::File(path), image)
    } else {
        in_memory(
            size,
            setup.cluster_size,
            Box::new(move || {
                let ro = OpenOptions {
                    read_only: true,
                    ..Default::default()
                };
                Some(Layer::Cowimg(Box::new(
                    Image::open(&mid_path, &ro).expect("opening mid.cow read-only"),
                )))
            }),
        )
    };
    Harness::new(home, image, model, setup.cluster_size)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(128), ..ProptestConfig::default() })]

    #[test]
    fn overlay_over_a_raw_file_reads_like_a_plain_file(setup in setup(), steps in prop::collection::vec(step(), 1..40)) {
        let dir = tempfile::tempdir().expect("tempdir");
        overlay_harness(dir.path(), &setup).run(&steps);
    }

    /// Version 2 whatever the suite's version, with its flush bounds made tiny, so that a
    /// map of three leaves takes every path one of millions of extents does: tree flushes cut short
    /// by their leaf budget, the journal kept across them and started anew with what was
    /// left out, everything applied at once past the bound.
    #[test]
    fn version_2_with_tiny_flush_bounds_reads_like_a_plain_file(
        setup in setup(),
        steps in prop::collection::vec(step(), 1..60),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = FlushLimits {
            journaled_extents: 6,
            tree_flush_extents: 4,
            tree_flush_leaves: 1,
            kept_journal_bytes: 16 << 10,
        };
        v2_harness(dir.path(), &setup).with_limits(limits).run(&steps);
    }

    #[test]
    fn two_level_chain_reads_like_a_plain_file(
        setup in setup(),
        mid_size_fraction in 0.5f64..1.3,
        mid_cluster in 0usize..4,
        mid_changes in prop::collection::vec(change_spec(), 0..12),
        steps in prop::collection::vec(step(), 1..30),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mid_size = ((setup.size as f64 * mid_size_fraction) as u64).max(1);
        chain_harness(dir.path(), &setup, mid_size, CLUSTER_SIZES[mid_cluster], &mid_changes).run(&steps);
    }
}

/// Runs writers on disjoint byte ranges (several of which share a sub-cluster unit) from
/// several threads on slow storage while another thread flushes, then compares with the model, before and
/// after a reopen.
fn concurrent_disjoint_writes(cluster_size: u64, seed: u64) {
    const SIZE: u64 = 1024 * 1024;
    const WRITERS: usize = 4;
    let dir = tempfile::tempdir().expect("tempdir");
    let base = backing_content(seed, SIZE as usize);
    let base_path = dir.path().join("base.raw");
    std::fs::write(&base_path, &base).expect("writing base.raw");
    let storage: Arc<dyn cowimg::storage::Storage> = Arc::new(SlowStorage(
        MemStorage::new(lib_support::fresh_image_bytes(SIZE, cluster_size)),
        std::time::Duration::from_micros(50),
    ));
    let mut image = Image::open_storage(storage.clone(), Path::new("slow.cow"), false)
        .expect("opening slow.cow");
    image.attach_backing(raw_layer(&base_path));

    // Cells of uneven sizes, dealt round-robin to the writers: neighbouring cells belong to
    // different threads and often share a unit, so partial-unit writes meet.
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cells = Vec::new();
    let mut pos = 0u64;
    while pos < SIZE {
        let len = if rng.gen_bool(0.8) {
            rng.gen_range(300..5000)
        } else {
            rng.gen_range(5000..80_000)
        };
        let len = len.min(SIZE - pos);
        cells.push((pos, len));
        pos += len;
    }
    let model = Mutex::new(base);
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let flusher = s.spawn(|| {
            let mut flushes = 0;
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                image.flush().expect("concurrent flush");
                flushes += 1;
                std::thread::yield_now();
            }
            flushes
        });
        let writers: Vec<_> = (0..WRITERS)
            .map(|t| {
                let mine: Vec<(u64, u64)> =
                    cells.iter().copied().skip(t).step_by(WRITERS).collect();
                let (image, model) = (&image, &model);
                s.spawn(move || {
                    let mut rng = StdRng::seed_from_u64(seed ^ ((t as u64 + 1) * 7919));
                    for _ in 0..400 {
                        let (cell, cell_len) = mine[rng.gen_range(0..mine.len())];
                        let off = cell + rng.gen_range(0..cell_len);
                        let len = rng.gen_range(1..=cell + cell_len - off);
                        let change = match rng.gen_range(0..10) {
                            0..=6 => Change::Write {
                                offset: off,
                                seed: rng.gen(),
                                len: len as usize,
                            },
                            7 | 8 => Change::Zeroes { offset: off, len },
                            _ => Change::Discard { offset: off, len },
                        };
                        change
                            .apply_to_image(image)
                            .unwrap_or_else(|e| panic!("writer {t}: {change:?}: {e}"));
                        change.apply_to_model(&mut model.lock().unwrap());
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().expect("writer thread");
        }
        done.store(true, std::sync::atomic::Ordering::Release);
        flusher.join().expect("flusher thread");
    });
    let model = model.into_inner().unwrap();
    assert_same_bytes(&read_all(&image), &model, "after the concurrent writes");
    image.flush().expect("final flush");
    drop(image);
    let mut image =
        Image::open_storage(storage, Path::new("slow.cow"), false).expect("reopening slow.cow");
    image.attach_backing(raw_layer(&base_path));
    assert_same_bytes(&read_all(&image), &model, "after reopening");
}

#[test]
fn concurrent_disjoint_writes_with_flushes_match_the_model_with_4k_units() {
    for seed in 0..3 {
        concurrent_disjoint_writes(64 * 1024, seed);
    }
}

#[test]
fn concurrent_disjoint_writes_with_flushes_match_the_model_with_32k_units() {
    for seed in 0..3 {
        concurrent_disjoint_writes(2 * 1024 * 1024, seed);
    }
}

/// A write that is neither unit-aligned nor unit-sized, repeated over every offset class of a
/// unit, against a backing file: checks the read-modify-write edges one by one.
#[test]
fn unaligned_writes_at_every_sector_of_a_unit_keep_the_backing_bytes_around_them() {
    for cluster_size in CLUSTER_SIZES {
        let dir = tempfile::tempdir().expect("tempdir");
        let size = 3 * cluster_size.max(65536);
        let base = backing_content(cluster_size, size as usize);
        std::fs::write(dir.path().join("base.raw"), &base).expect("writing base.raw");
        let path = create_image(
            dir.path(),
            "top.cow",
            size,
            cluster_size,
            Some(("base.raw".into(), BackingFormat::Raw)),
        );
        let image = Image::open(&path, &OpenOptions::default()).expect("opening top.cow");
        let mut model = base;
        let unit = (cluster_size / 64).max(4096);
        for (i, off) in (0..unit).step_by(512).map(|o| o + 3).enumerate() {
            let at = off + i as u64 * unit;
            let data = pattern(at, 700);
            image.write_at(&data, at).expect("write");
            model[at as usize..at as usize + 700].copy_from_slice(&data);
            if i % 3 == 0 {
                image.flush().expect("flush");
            }
        }
        assert_same_bytes(
            &read_all(&image),
            &model,
            &format!("cluster size {cluster_size}"),
        );
    }
}

/// Storage that takes its time on every write, so that concurrent requests overlap the way
/// they do on a slow disk.
struct SlowStorage(MemStorage, std::time::Duration);

impl cowimg::storage::Storage for SlowStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        std::thread::sleep(self.1);
        self.0.write_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.0.sync()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.punch_hole(offset, len)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
}

/// Two threads write the two halves of the same unit at the same time, right after a flush
/// pinned it: each write has to copy the rest of the unit, and neither may undo the other.
#[test]
fn concurrent_writes_to_the_two_halves_of_one_unit_both_land() {
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 256 * 1024u64;
    let base = backing_content(99, size as usize);
    let base_path = dir.path().join("base.raw");
    std::fs::write(&base_path, &base).expect("writing base.raw");
    let storage: Arc<dyn cowimg::storage::Storage> = Arc::new(SlowStorage(
        MemStorage::new(lib_support::fresh_image_bytes(size, 64 * 1024)),
        std::time::Duration::from_millis(2),
    ));
    let mut image =
        Image::open_storage(storage, Path::new("slow.cow"), false).expect("opening slow.cow");
    image.attach_backing(raw_layer(&base_path));
    let mut model = base;
    let barrier = std::sync::Barrier::new(2);
    for round in 0..8u64 {
        let unit = round % 4 * 4096;
        let halves = [
            (unit, pattern(round * 2, 2048)),
            (unit + 2048, pattern(round * 2 + 1, 2048)),
        ];
        std::thread::scope(|s| {
            for (at, data) in &halves {
                let (image, barrier) = (&image, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    image.write_at(data, *at).expect("write");
                });
            }
        });
        for (at, data) in &halves {
            model[*at as usize..*at as usize + data.len()].copy_from_slice(data);
        }
        assert_same_bytes(&read_all(&image), &model, &format!("round {round}"));
        image.flush().expect("flush");
    }
}

/// Whole clusters zeroed over a backing file become a zero run; zeroing or discarding part
/// of one of them afterwards must keep the rest of that cluster zero, not let the backing
/// file show through.
#[test]
fn zeroing_part_of_a_cluster_inside_a_zeroed_run_keeps_the_rest_of_it_zero() {
    for second_discards in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let cluster = 16 * 1024u64;
        let size = 8 * cluster;
        let base = pattern(5, size as usize);
        let base_path = dir.path().join("base.raw");
        std::fs::write(&base_path, &base).expect("writing base.raw");
        let storage = Arc::new(MemStorage::new(lib_support::fresh_image_bytes(
            size, cluster,
        )));
        let image =
            open_mem(&storage, "mem.cow", Some(raw_layer(&base_path))).expect("opening mem.cow");
        let mut model = base;
        image
            .discard(cluster, 4 * cluster)
            .expect("zeroing four whole clusters");
        model[cluster as usize..5 * cluster as usize].fill(0);
        let (at, len) = (2 * cluster + 8192, 4096u64);
        if second_discards {
            image
                .discard(at, len)
                .expect("discarding part of a zeroed cluster");
        } else {
            image
                .write_zeroes(at, len)
                .expect("zeroing part of a zeroed cluster");
        }
        model[at as usize..(at + len) as usize].fill(0);
        assert_same_bytes(&read_all(&image), &model, "before a flush");
        image.flush().expect("flush");
        drop(image);
        let image =
            open_mem(&storage, "mem.cow", Some(raw_layer(&base_path))).expect("reopening mem.cow");
        assert_same_bytes(&read_all(&image), &model, "after reopening");
    }
}
