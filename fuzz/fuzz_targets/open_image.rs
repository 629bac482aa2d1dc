//! Opens arbitrary bytes as an image (MemStorage + Image::open_storage); if it opens, reads
//! it, maps it, writes a little, flushes, and checks the write survives a reopen. The body is
//! shared with `tests/damaged.rs`, which runs it on stable over seeded mutations.
//!
//! Run: `cargo +nightly fuzz run open_image` from the repository root.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/lib_support/fuzz_body.rs"]
mod fuzz_body;

/// Inputs stay small (libFuzzer's default is 4 KiB), but an image's file covers its journal
/// region: zero-extend the input as far as either header slot's journal reaches (capped), so
/// that small inputs can still describe images that open.
fn extend_over_journal(data: &[u8]) -> Vec<u8> {
    let field = |at: usize| {
        data.get(at..at + 8)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    let reach = [0usize, 4096]
        .iter()
        .map(|&slot| field(slot + 0x50).saturating_add(field(slot + 0x58)))
        .max()
        .unwrap_or(0)
        .min(4 << 20) as usize;
    let mut bytes = data.to_vec();
    if bytes.len() < reach {
        bytes.resize(reach, 0);
    }
    bytes
}

fuzz_target!(|data: &[u8]| {
    fuzz_body::exercise_image_bytes(&extend_over_journal(data));
});
