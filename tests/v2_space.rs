//! Space of a version-2 image on a real file system (FORMAT-v2.md, "Allocation"): each live
//! block has one host block, what a change stops referencing is punched at the next flush,
//! and holes are reused once the file is a quarter longer than what it holds, so overwrites
//! and trims keep both the allocated bytes and the length bounded.
mod lib_support;

use cowimg::image::{ops, CreateOptions, ExtentKind, Image, OpenOptions};
use rand::{Rng, SeedableRng};
use std::os::unix::fs::MetadataExt;

const BLOCK: u64 = 4096;

fn allocated(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).expect("metadata").blocks() * 512
}

/// Bytes the image maps as data (what a reader sees as stored, not zeros or holes).
fn data_bytes(image: &Image) -> u64 {
    image
        .map()
        .expect("map")
        .iter()
        .filter(|e| e.kind == ExtentKind::Data)
        .map(|e| e.length)
        .sum()
}

#[test]
fn overwriting_a_version_2_disk_five_times_with_trims_keeps_its_space_near_its_live_data() {
    const SIZE: u64 = 64 << 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.cow");
    Image::create(
        &path,
        &CreateOptions {
            size: Some(SIZE),
            version: 2,
            ..Default::default()
        },
    )
    .expect("create");
    let image = Image::open(&path, &OpenOptions::default()).expect("open");
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    let blocks = SIZE / BLOCK;
    let mut model = vec![0u8; SIZE as usize];
    let mut lengths = Vec::new();
    for pass in 0..5u8 {
        for i in 0..blocks {
            let b = rng.gen_range(0..blocks);
            let at = (b * BLOCK) as usize;
            if rng.gen_ratio(1, 8) {
                let n = rng.gen_range(1..=16u64).min(blocks - b);
                image.discard(b * BLOCK, n * BLOCK).expect("discard");
                model[at..at + (n * BLOCK) as usize].fill(0);
            } else {
                let fill = pass.wrapping_mul(31).wrapping_add(i as u8) | 1;
                let data = vec![fill; BLOCK as usize];
                image.write_at(&data, b * BLOCK).expect("write");
                model[at..at + BLOCK as usize].copy_from_slice(&data);
            }
            if i % 32 == 31 {
                image.flush().expect("flush");
            }
        }
        image.flush().expect("flush");
        lengths.push(std::fs::metadata(&path).expect("metadata").len());
    }
    let live = data_bytes(&image);
    let held = allocated(&path);
    let metadata = 4 << 20; // header slots, journal, map pages: a few MiB at most here
    assert!(
        held <= live + live / 10 + metadata,
        "allocated {held} bytes for {live} bytes of live data"
    );
    let length = *lengths.last().expect("five passes");
    assert!(
        length <= live + live / 4 + (SIZE / 16) + 2 * metadata,
        "the file grew to {length} bytes for {live} bytes of live data (lengths per pass: {lengths:?})"
    );
    drop(image);
    let report = ops::check(&path, false).expect("check");
    assert!(report.corruptions.is_empty(), "{:?}", report.corruptions);
    assert!(
        report.allocated_clusters * BLOCK <= SIZE,
        "check counts more data than the disk holds"
    );
    let image = Image::open(&path, &OpenOptions::default()).expect("reopen");
    lib_support::assert_same_bytes(&lib_support::read_all(&image), &model, "after reopening");
}
