//! Opens arbitrary bytes as a qcow2 image (without its backing file); if it opens, maps and
//! reads it. The body is shared with `tests/qcow2_damaged.rs`, which runs it on stable over
//! seeded mutations of images that qemu-img made.
//!
//! Run: `cargo +nightly fuzz run open_qcow2` from the repository root.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/lib_support/qcow2_fuzz_body.rs"]
mod qcow2_fuzz_body;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("cowimg-fuzz-qcow2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("creating the scratch directory");
    qcow2_fuzz_body::exercise_qcow2_bytes(data, &dir);
});
