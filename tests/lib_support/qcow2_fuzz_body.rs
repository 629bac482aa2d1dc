//! The body of the `open_qcow2` fuzz target, shared with `tests/qcow2_damaged.rs`, which
//! runs it over seeded mutations of qcow2 files that qemu-img made. It uses nothing but the
//! library, so the fuzz crate includes this file by path.
use cowimg::format::BackingFormat;
use cowimg::image::{Layer, OpenOptions};
use std::path::Path;

/// Largest number of bytes read back from the image the input describes.
const READ_CAP: u64 = 16 << 20;

/// Writes `data` to `dir/fuzz.qcow2` and opens it as a qcow2 (without its backing file,
/// whose name is part of the input). A refusal must be an error naming the file; an image
/// that opens must map and read its first 16 MiB, or fail the same way.
pub fn exercise_qcow2_bytes(data: &[u8], dir: &Path) {
    let path = dir.join("fuzz.qcow2");
    std::fs::write(&path, data).expect("writing the input");
    let opts = OpenOptions {
        read_only: true,
        force_share: true,
        without_backing: true,
        ..Default::default()
    };
    let names_the_file = |e: cowimg::Error| {
        let message = e.to_string();
        assert!(
            message.contains("fuzz.qcow2"),
            "error does not name the file: {message}"
        );
    };
    let layer = match Layer::open(&path, BackingFormat::Qcow2, &opts) {
        Ok(layer) => layer,
        Err(e) => return names_the_file(e),
    };
    let size = layer.size().min(READ_CAP);
    let mut extents = Vec::new();
    if let Err(e) = layer.status(0, size, 0, &mut extents) {
        return names_the_file(e);
    }
    let covered: u64 = extents.iter().map(|e| e.length).sum();
    assert_eq!(covered, size, "the extents do not cover the range");
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(buf.len() as u64) as usize;
        if let Err(e) = layer.read_at(&mut buf[..n], at) {
            return names_the_file(e);
        }
        at += n as u64;
    }
}
