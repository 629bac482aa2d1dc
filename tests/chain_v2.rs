//! Deep chains read through the merged index of their read-only layers (FORMAT-v2.md,
//! "Reading through a chain"): random chains of version-1 and version-2 layers of unequal,
//! unaligned sizes over a raw base, each with its own random changes, read byte for byte
//! against a plain `Vec<u8>`, with a page cache large enough to keep every region and one
//! small enough that regions are evicted and resolved again. `PROPTEST_CASES` raises the
//! case count.
mod lib_support;

use cowimg::format::BackingFormat;
use cowimg::image::{CreateOptions, Image, OpenOptions};
use lib_support::{assert_same_bytes, backing_content, fit, read_all, Change};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;

/// One layer of the chain: its format version, size and changes.
#[derive(Debug, Clone)]
struct LayerSpec {
    version: u32,
    size: u64,
    changes: usize,
    seed: u64,
}

fn layer_spec() -> impl Strategy<Value = LayerSpec> {
    (
        prop_oneof![3 => Just(2u32), 1 => Just(1u32)],
        1u64..=600 * 1024,
        any::<bool>(),
        0usize..24,
        any::<u64>(),
    )
        .prop_map(|(version, size, aligned, changes, seed)| LayerSpec {
            version,
            size: if aligned {
                size.next_multiple_of(4096)
            } else {
                size
            },
            changes,
            seed,
        })
}

fn read_only(cache_size: Option<u64>) -> OpenOptions {
    OpenOptions {
        read_only: true,
        cache_size,
        ..Default::default()
    }
}

/// Builds base.raw <- l0 <- l1 <- ...; returns the top's name and what it reads as.
fn build_chain(
    dir: &Path,
    base_len: usize,
    base_seed: u64,
    layers: &[LayerSpec],
) -> (String, Vec<u8>) {
    let base = backing_content(base_seed, base_len);
    std::fs::write(dir.join("base.raw"), &base).expect("writing base.raw");
    let mut below = ("base.raw".to_string(), BackingFormat::Raw);
    let mut model = base;
    for (i, spec) in layers.iter().enumerate() {
        let name = format!("l{i}.cow");
        let path = dir.join(&name);
        Image::create(
            &path,
            &CreateOptions {
                size: Some(spec.size),
                cluster_size: 64 * 1024,
                backing: Some(below.clone()),
                version: spec.version,
            },
        )
        .unwrap_or_else(|e| panic!("creating {name}: {e}"));
        model = fit(&model, spec.size as usize);
        let image = Image::open(&path, &OpenOptions::default())
            .unwrap_or_else(|e| panic!("opening {name}: {e}"));
        let mut rng = StdRng::seed_from_u64(spec.seed);
        for _ in 0..spec.changes {
            let change = Change::random(&mut rng, spec.size, 64 * 1024);
            change
                .apply_to_image(&image)
                .unwrap_or_else(|e| panic!("{name}: {change:?}: {e}"));
            change.apply_to_model(&mut model);
        }
        image
            .flush()
            .unwrap_or_else(|e| panic!("flushing {name}: {e}"));
        assert_same_bytes(&read_all(&image), &model, &format!("{name} as written"));
        below = (name, BackingFormat::Cowimg);
    }
    (below.0, model)
}

/// Reads `image` in random pieces, a few bytes to several regions long, and whole.
fn check_reads(image: &Image, model: &[u8], seed: u64, context: &str) {
    let mut rng = StdRng::seed_from_u64(seed);
    let size = model.len() as u64;
    for i in 0..64 {
        let len = match rng.gen_range(0..3) {
            0 => rng.gen_range(1..=700u64),
            1 => 4096,
            _ => rng.gen_range(1..=600 * 1024u64),
        }
        .min(size);
        let mut offset = rng.gen_range(0..=size - len);
        if rng.gen_bool(0.5) {
            offset &= !4095;
        }
        let mut buf = vec![0u8; len as usize];
        image
            .read_at(&mut buf, offset)
            .unwrap_or_else(|e| panic!("{context}: read {i} at {offset:#x}+{len}: {e}"));
        assert_same_bytes(
            &buf,
            &model[offset as usize..(offset + len) as usize],
            &format!("{context}: read {i} at {offset:#x}+{len}"),
        );
    }
    assert_same_bytes(&read_all(image), model, &format!("{context}: whole"));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn a_deep_chain_read_through_its_merged_index_reads_like_a_plain_file(
        base_len in 0usize..=700 * 1024,
        base_seed in any::<u64>(),
        layers in prop::collection::vec(layer_spec(), 1..7),
        read_seed in any::<u64>(),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (top, model) = build_chain(dir.path(), base_len, base_seed, &layers);
        // A read-only top reads through its own merged index; a writable overlay over it
        // reads through the index of the layer below.
        for (context, cache) in [("32 MiB cache", None), ("16 KiB cache", Some(16 << 10))] {
            let image = Image::open(&dir.path().join(&top), &read_only(cache))
                .unwrap_or_else(|e| panic!("opening {top} read-only: {e}"));
            check_reads(&image, &model, read_seed, &format!("{top}, {context}"));
        }
    }
}

#[test]
fn a_chain_of_sixteen_version_2_layers_reads_each_layers_blocks_and_zeros_between() {
    // The layout of benches/v2.py's depth section, small: layer i writes every other 4 KiB
    // block of the i-th sixteenth; the rest falls through all of them to zeros.
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 16 * 64 * 4096u64;
    let layers: Vec<LayerSpec> = (0..16)
        .map(|i| LayerSpec {
            version: 2,
            size,
            changes: 0,
            seed: i,
        })
        .collect();
    let (_, mut model) = build_chain(dir.path(), 0, 0, &layers);
    for i in 0..16u64 {
        let path = dir.path().join(format!("l{i}.cow"));
        let opts = OpenOptions::default();
        let image = Image::open(&path, &opts).expect("reopening a layer to write it");
        for b in (0..32).map(|k| i * 64 + 2 * k) {
            let block = vec![(i + 1) as u8; 4096];
            image.write_at(&block, b * 4096).expect("writing a block");
            model[(b * 4096) as usize..((b + 1) * 4096) as usize].copy_from_slice(&block);
        }
        image.flush().expect("flushing a layer");
    }
    let top = Image::open(&dir.path().join("l15.cow"), &read_only(None)).expect("opening the top");
    check_reads(&top, &model, 7, "l15.cow");
}
