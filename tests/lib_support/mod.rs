//! Helpers shared by the library's correctness suites (model, crash, damaged). Named
//! `lib_support` so as not to clash with the CLI and NBD suites' helpers.
#![allow(dead_code)]

pub mod crash_log;
pub mod fixtures;
pub mod fuzz_body;

use cowimg::format::BackingFormat;
use cowimg::image::{CreateOptions, Image, Layer, RawFile};
use cowimg::storage::{MemStorage, Storage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Deterministic, incompressible-looking bytes for `seed`; never all zeros, so a write of
/// it is always told apart from a hole.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    if let Some(b) = v.first_mut() {
        *b |= 1;
    }
    v
}

/// A raw backing file's content: random data with zero runs, so that writes over it and
/// zero markers are both visible.
pub fn backing_content(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut v = pattern(seed, len);
    let mut pos = 0;
    while pos < len {
        let run = rng.gen_range(1..=64 * 1024).min(len - pos);
        if rng.gen_bool(0.3) {
            v[pos..pos + run].fill(0);
        }
        pos += run;
    }
    v
}

/// Creates an image file with `Image::create` and returns its path.
pub fn create_image(
    dir: &Path,
    name: &str,
    size: u64,
    cluster_size: u64,
    backing: Option<(String, BackingFormat)>,
) -> PathBuf {
    let path = dir.join(name);
    Image::create(
        &path,
        &CreateOptions {
            size: Some(size),
            cluster_size,
            backing,
            version: format_version(),
        },
    )
    .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    path
}

/// The format version the tests create images in: 1, or what `COWIMG_TEST_FORMAT_VERSION`
/// says, so that the same tests run over both versions (scripts/test.sh runs the model and
/// crash tests a second time with version 2).
pub fn format_version() -> u32 {
    match std::env::var("COWIMG_TEST_FORMAT_VERSION").as_deref() {
        Ok("2") => 2,
        _ => 1,
    }
}

/// The bytes of a freshly created image without a backing file, for in-memory storage.
pub fn fresh_image_bytes(size: u64, cluster_size: u64) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = create_image(dir.path(), "fresh.cow", size, cluster_size, None);
    std::fs::read(path).expect("reading the new image")
}

/// Opens a raw file as a read-only backing layer.
pub fn raw_layer(path: &Path) -> Layer {
    Layer::Raw(
        RawFile::open(path, false, true)
            .unwrap_or_else(|e| panic!("opening backing {}: {e}", path.display())),
    )
}

/// Opens in-memory image bytes read-write, with an optional backing layer.
pub fn open_mem(
    storage: &Arc<MemStorage>,
    name: &str,
    backing: Option<Layer>,
) -> cowimg::Result<Image> {
    let s: Arc<dyn Storage> = storage.clone();
    let mut image = Image::open_storage(s, Path::new(name), false)?;
    if let Some(b) = backing {
        image.attach_backing(b);
    }
    Ok(image)
}

/// Reads the whole virtual size.
pub fn read_all(image: &Image) -> Vec<u8> {
    let mut buf = vec![0u8; image.virtual_size() as usize];
    image
        .read_at(&mut buf, 0)
        .unwrap_or_else(|e| panic!("reading {}: {e}", image.path().display()));
    buf
}

/// `content` as the file would read it through a layer of `size` bytes: cut or zero-extended.
pub fn fit(content: &[u8], size: usize) -> Vec<u8> {
    let mut v = content[..content.len().min(size)].to_vec();
    v.resize(size, 0);
    v
}

/// Panics with the first differing offset instead of dumping megabytes.
#[track_caller]
pub fn assert_same_bytes(actual: &[u8], expected: &[u8], context: &str) {
    assert_eq!(actual.len(), expected.len(), "{context}: length differs");
    if let Some(i) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        let end = (i + 16).min(actual.len());
        panic!(
            "{context}: first difference at byte {i:#x}: read {:02x?}, expected {:02x?}",
            &actual[i..end],
            &expected[i..end]
        );
    }
}

/// A cheap content fingerprint (FNV-1a over 64-bit words), to remember many states.
pub fn fingerprint(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for chunk in bytes.chunks(8) {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        h ^= u64::from_le_bytes(w);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^ bytes.len() as u64
}

/// One change to a virtual disk, applied the same way to an image and to the byte model.
#[derive(Debug, Clone)]
pub enum Change {
    Write { offset: u64, seed: u64, len: usize },
    Zeroes { offset: u64, len: u64 },
    Discard { offset: u64, len: u64 },
}

impl Change {
    pub fn apply_to_image(&self, image: &Image) -> cowimg::Result<()> {
        match *self {
            Change::Write { offset, seed, len } => image.write_at(&pattern(seed, len), offset),
            Change::Zeroes { offset, len } => image.write_zeroes(offset, len),
            Change::Discard { offset, len } => image.discard(offset, len),
        }
    }

    pub fn apply_to_model(&self, model: &mut [u8]) {
        match *self {
            Change::Write { offset, seed, len } => {
                model[offset as usize..offset as usize + len].copy_from_slice(&pattern(seed, len));
            }
            Change::Zeroes { offset, len } | Change::Discard { offset, len } => {
                model[offset as usize..(offset + len) as usize].fill(0);
            }
        }
    }

    /// A random change within `size` bytes: unaligned and unit-sized writes, zeroes and
    /// discards, from a few bytes to a few clusters.
    pub fn random(rng: &mut StdRng, size: u64, cluster_size: u64) -> Change {
        let len = match rng.gen_range(0..4) {
            0 => rng.gen_range(1..=600u64),
            1 => 4096 * rng.gen_range(1..=4u64),
            2 => rng.gen_range(1..=3 * cluster_size.min(256 * 1024)),
            _ => rng.gen_range(1..=32 * 1024u64),
        }
        .min(size);
        let mut offset = rng.gen_range(0..=size - len);
        if rng.gen_bool(0.3) {
            offset &= !4095;
        }
        match rng.gen_range(0..10) {
            0..=5 => Change::Write {
                offset,
                seed: rng.gen(),
                len: len as usize,
            },
            6 | 7 => Change::Zeroes { offset, len },
            _ => Change::Discard { offset, len },
        }
    }
}

/// Writes `bytes` to a new file at `path` the way a file system holds an image: every
/// 4 KiB block of zeros is left a hole (punched and never-written space reads as zeros but
/// holds nothing), so that `check` sees what a real file would show.
pub fn write_sparse(path: &Path, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let file =
        std::fs::File::create(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    for (i, block) in bytes.chunks(4096).enumerate() {
        if block.iter().any(|&b| b != 0) {
            file.write_all_at(block, i as u64 * 4096)
                .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        }
    }
    file.set_len(bytes.len() as u64)
        .unwrap_or_else(|e| panic!("setting the length of {}: {e}", path.display()));
}

/// A temporary directory for the many short-lived image files a suite writes to run
/// `check` on: in memory (/dev/shm) where there is one, since a file system mounted with
/// `discard` pays for every truncated or deleted file; else the usual temporary directory.
/// Both report holes (SEEK_HOLE) as `check` needs.
pub fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::Builder::new().prefix("cowimg-").tempdir_in(shm) {
            return dir;
        }
    }
    tempfile::tempdir().expect("tempdir")
}
