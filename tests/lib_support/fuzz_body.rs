//! The body of the `open_image` fuzz target, shared with `tests/damaged.rs` so that the
//! same checks run as a plain test over seeded mutations where `cargo fuzz` cannot run.
//! It uses nothing but the library, so the fuzz crate includes this file by path.
use cowimg::image::Image;
use cowimg::storage::{MemStorage, Storage};
use std::path::Path;
use std::sync::Arc;

/// Largest number of bytes read back from an image the input describes.
const READ_CAP: u64 = 1 << 20;

/// Opens `data` as an image. Refusal must be a clean error that names the file; an image
/// that opens must read, map, take a write and a flush, and then reopen with that write.
pub fn exercise_image_bytes(data: &[u8]) {
    let name = Path::new("fuzz.cow");
    let storage = Arc::new(MemStorage::new(data.to_vec()));
    let dynamic: Arc<dyn Storage> = storage.clone();
    let image = match Image::open_storage(dynamic, name, false) {
        Ok(image) => image,
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.contains("fuzz.cow"),
                "error does not name the file: {message}"
            );
            return;
        }
    };
    let size = image.virtual_size();
    let mut buf = vec![0u8; size.min(READ_CAP) as usize];
    // Reading may fail cleanly (a unit past the end of a truncated file); it must not panic.
    let _ = image.read_at(&mut buf, 0);
    let _ = image.map();
    let _ = image.stats();
    if size == 0 {
        return;
    }
    let len = size.min(5000) as usize;
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
    let at = (size - len as u64) / 2;
    if image.write_at(&data, at).is_err() || image.write_zeroes(0, size.min(512)).is_err() {
        return;
    }
    if image.flush().is_err() {
        return;
    }
    let mut expected = data;
    let zeroed = size.min(512).saturating_sub(at) as usize;
    expected[..zeroed.min(len)].fill(0);
    let mut back = vec![0u8; len];
    if image.read_at(&mut back, at).is_ok() {
        assert!(back == expected, "a flushed write does not read back");
    }
    drop(image);
    let dynamic: Arc<dyn Storage> = storage;
    let again = Image::open_storage(dynamic, name, true)
        .unwrap_or_else(|e| panic!("an image this build wrote and flushed does not reopen: {e}"));
    if again.read_at(&mut back, at).is_ok() {
        assert!(back == expected, "a flushed write is lost after reopening");
    }
}
