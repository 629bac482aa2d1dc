//! Library micro-benchmarks: each cowimg operation beside the same operation on a plain
//! file (pread/pwrite on a `std::fs::File`), which is the limit the image layer is measured
//! against.
//!
//! - `mapped_read`: a 4 KiB read of a mapped block in an image with many mapped clusters
//!   (the extent-map lookup plus one pread);
//! - `write_fresh_cluster`: a 4 KiB write into a cluster the image has never seen (map insert,
//!   host cluster allocation, one pwrite);
//! - `write_allocated`: a 4 KiB write into a unit that is already allocated and not yet
//!   flushed (the in-place path);
//! - `backing_read`: a 4 KiB read of an unmapped block, which falls through to the raw
//!   backing file.
//!
//! Runs are kept short (`sample_size` 20, 3 s measurement) so the whole bench stays well under
//! three minutes; `CRITERION_QUICK=1` shortens them further.
use cowimg::format::BackingFormat;
use cowimg::image::{CreateOptions, Image, OpenOptions};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::fs::{File, OpenOptions as FsOpenOptions};
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const BLOCK: usize = 4096;
const CLUSTER: u64 = 64 * 1024;
/// Mapped clusters in the image the reads look up (a 4 GiB virtual disk, one 4 KiB unit
/// written in each of its 64 KiB clusters).
const MAPPED_CLUSTERS: u64 = 65_536;
/// Backing file size for the fall-through reads.
const BACKING_BYTES: u64 = 64 << 20;
/// Fresh-cluster writes before the image is thrown away and made anew (outside the timed
/// region), so the bench does not fill the disk.
const FRESH_WRITES_PER_IMAGE: u64 = 65_536;

/// A small deterministic generator: benchmarks must do the same work every run.
struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = XorShift(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(len);
    out
}

fn create_image(path: &Path, size: u64, backing: Option<&Path>) -> Image {
    let _ = std::fs::remove_file(path);
    let opts = CreateOptions {
        size: Some(size),
        cluster_size: CLUSTER,
        backing: backing.map(|b| (b.display().to_string(), BackingFormat::Raw)),
        ..Default::default()
    };
    Image::create(path, &opts).expect("creating the bench image");
    Image::open(path, &OpenOptions::default()).expect("opening the bench image")
}

fn plain_file(path: &Path) -> File {
    FsOpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .expect("creating the plain bench file")
}

struct Fixture {
    dir: tempfile::TempDir,
    /// Backing file of random bytes.
    base: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        // tmpfs by default: both sides then pay the same page-cache cost and nothing else,
        // which isolates the image layer's overhead. (On a disk filesystem mounted with
        // `discard`, unlinking the scattered sparse files this bench makes takes minutes.)
        // BENCH_DIR picks another filesystem.
        let root = std::env::var_os("BENCH_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let shm = Path::new("/dev/shm");
                if shm.is_dir() {
                    shm.to_path_buf()
                } else {
                    std::env::temp_dir()
                }
            });
        let dir = tempfile::Builder::new()
            .prefix("cowimg-bench-")
            .tempdir_in(&root)
            .expect("making the bench directory");
        let base = dir.path().join("base.raw");
        let f = plain_file(&base);
        for (i, chunk) in (0..BACKING_BYTES).step_by(1 << 20).enumerate() {
            f.write_all_at(&random_bytes(1 << 20, 0x9e37_79b9 + i as u64), chunk)
                .expect("writing the backing file");
        }
        Fixture { dir, base }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn mapped_read(c: &mut Criterion, fx: &Fixture) {
    let mut group = c.benchmark_group("mapped_read_4k");
    let size = MAPPED_CLUSTERS * CLUSTER;
    let image = create_image(&fx.path("mapped.cow"), size, None);
    let file = plain_file(&fx.path("mapped.raw"));
    let data = random_bytes(BLOCK, 1);
    for cl in 0..MAPPED_CLUSTERS {
        image
            .write_at(&data, cl * CLUSTER)
            .expect("filling the image");
        file.write_all_at(&data, cl * CLUSTER)
            .expect("filling the plain file");
    }
    image.flush().expect("flushing the image");
    assert_eq!(image.stats().mapped_clusters, MAPPED_CLUSTERS);

    let mut buf = vec![0u8; BLOCK];
    let mut rng = XorShift(7);
    group.bench_function(BenchmarkId::new("cowimg", MAPPED_CLUSTERS), |b| {
        b.iter(|| {
            let off = rng.below(MAPPED_CLUSTERS) * CLUSTER;
            image.read_at(&mut buf, off).expect("read");
            black_box(&buf);
        })
    });
    let mut rng = XorShift(7);
    group.bench_function(BenchmarkId::new("plain_file", MAPPED_CLUSTERS), |b| {
        b.iter(|| {
            let off = rng.below(MAPPED_CLUSTERS) * CLUSTER;
            file.read_exact_at(&mut buf, off).expect("pread");
            black_box(&buf);
        })
    });
    group.finish();
}

/// Times `iters` writes of 4 KiB, each into a cluster nothing has written before. Every
/// `FRESH_WRITES_PER_IMAGE` writes the target is made anew outside the timed region.
fn write_fresh(c: &mut Criterion, fx: &Fixture) {
    let mut group = c.benchmark_group("write_fresh_cluster_4k");
    let data = random_bytes(BLOCK, 2);
    let size = FRESH_WRITES_PER_IMAGE * CLUSTER;
    let cow_path = fx.path("fresh.cow");
    let raw_path = fx.path("fresh.raw");
    group.bench_function("cowimg", |b| {
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(FRESH_WRITES_PER_IMAGE);
                let image = create_image(&cow_path, size, Some(&fx.base));
                let start = Instant::now();
                for cl in 0..n {
                    image.write_at(&data, cl * CLUSTER).expect("write");
                }
                elapsed += start.elapsed();
                left -= n;
            }
            elapsed
        })
    });
    group.bench_function("plain_file", |b| {
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(FRESH_WRITES_PER_IMAGE);
                let file = plain_file(&raw_path);
                file.set_len(size).expect("sizing");
                let start = Instant::now();
                for cl in 0..n {
                    file.write_all_at(&data, cl * CLUSTER).expect("pwrite");
                }
                elapsed += start.elapsed();
                left -= n;
            }
            elapsed
        })
    });
    group.finish();
}

fn write_allocated(c: &mut Criterion, fx: &Fixture) {
    let mut group = c.benchmark_group("write_allocated_4k");
    let clusters = 4096u64;
    let units = CLUSTER / BLOCK as u64;
    let size = clusters * CLUSTER;
    let image = create_image(&fx.path("alloc.cow"), size, Some(&fx.base));
    let file = plain_file(&fx.path("alloc.raw"));
    let data = random_bytes(CLUSTER as usize, 3);
    for cl in 0..clusters {
        image
            .write_at(&data, cl * CLUSTER)
            .expect("filling the image");
        file.write_all_at(&data, cl * CLUSTER)
            .expect("filling the plain file");
    }
    // Not flushed on purpose: the durable state pins nothing, so writes go in place, the
    // steady state between two flushes.
    let block = &data[..BLOCK];
    let mut rng = XorShift(11);
    group.bench_function("cowimg", |b| {
        b.iter(|| {
            let off = rng.below(clusters * units) * BLOCK as u64;
            image.write_at(block, off).expect("write");
        })
    });
    let mut rng = XorShift(11);
    group.bench_function("plain_file", |b| {
        b.iter(|| {
            let off = rng.below(clusters * units) * BLOCK as u64;
            file.write_all_at(block, off).expect("pwrite");
        })
    });
    group.finish();
}

fn backing_read(c: &mut Criterion, fx: &Fixture) {
    let mut group = c.benchmark_group("backing_read_4k");
    let image = create_image(&fx.path("empty.cow"), BACKING_BYTES, Some(&fx.base));
    let base = File::open(&fx.base).expect("opening the backing file");
    let blocks = BACKING_BYTES / BLOCK as u64;
    let mut buf = vec![0u8; BLOCK];
    let mut rng = XorShift(13);
    group.bench_function("cowimg", |b| {
        b.iter(|| {
            let off = rng.below(blocks) * BLOCK as u64;
            image.read_at(&mut buf, off).expect("read");
            black_box(&buf);
        })
    });
    let mut rng = XorShift(13);
    group.bench_function("plain_file", |b| {
        b.iter(|| {
            let off = rng.below(blocks) * BLOCK as u64;
            base.read_exact_at(&mut buf, off).expect("pread");
            black_box(&buf);
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    let fx = Fixture::new();
    mapped_read(c, &fx);
    write_fresh(c, &fx);
    write_allocated(c, &fx);
    backing_read(c, &fx);
}

fn config() -> Criterion {
    let quick = std::env::var_os("CRITERION_QUICK").is_some_and(|v| v != "0");
    let (warm, measure, samples) = if quick {
        (Duration::from_millis(300), Duration::from_secs(1), 10)
    } else {
        (Duration::from_secs(1), Duration::from_secs(3), 20)
    };
    Criterion::default()
        .warm_up_time(warm)
        .measurement_time(measure)
        .sample_size(samples)
        .configure_from_args()
}

criterion_group! {
    name = image;
    config = config();
    targets = benches
}
criterion_main!(image);
