//! The upgrade of a version-1 image in place (FORMAT-v2.md, "Upgrade").
mod lib_support;

use cowimg::format::BackingFormat;
use cowimg::image::{ops, v2, CreateOptions, ExtentKind, Image, OpenOptions};
use cowimg::storage::{FileStorage, Storage};
use lib_support::{assert_same_bytes, backing_content, pattern, read_all, write_sparse};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

const NAME: &str = "upgrade.cow";
/// A size that ends inside a cluster and inside a block.
const SIZE: u64 = 1024 * 1024 + 1000;
const BACKING_LEN: usize = 700 * 1024;

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
