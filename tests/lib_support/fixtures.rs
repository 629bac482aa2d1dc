//! The recipes of the committed golden fixtures (tests/fixtures): each made once by its
//! recipe and checked by its contents, since image ids and journal epochs are random.
//! `regenerate_*` tests (ignored) rebuild them only when a format changes on purpose.
use cowimg::image::Image;

/// A version-1 image with 16 KiB clusters, a checkpoint and journal records after it.
pub const V1_BASIC: &str = "tests/fixtures/v1-basic.cow";
pub const V1_BASIC_SIZE: u64 = 192 * 1024 + 512;
pub const V1_BASIC_CLUSTER: u64 = 16 * 1024;

/// A version-2 image whose size ends inside a block, with a tree written by at least one
/// tree flush and journal records after it.
pub const V2_BASIC: &str = "tests/fixtures/v2-basic.cow";
pub const V2_BASIC_SIZE: u64 = 1024 * 1024 + 1536;

/// Self-contained data for the fixture (not `rand`, whose streams may change between
/// versions): a xorshift stream.
pub fn fixture_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8 | 1
        })
        .collect()
}

/// The fixed recipe of `v1-basic.cow`: writes, zeroes, discards, enough flushes to cross a checkpoint, then a
/// few more journal records. Applies it to the image (if any) and returns the expected bytes.
pub fn v1_basic_recipe(image: Option<&Image>) -> Vec<u8> {
    let mut model = vec![0u8; V1_BASIC_SIZE as usize];
    let mut step = |op: u8, offset: u64, len: u64, seed: u64| {
        let (o, l) = (offset as usize, len as usize);
        match op {
            b'w' => {
                let data = fixture_bytes(seed, l);
                model[o..o + l].copy_from_slice(&data);
                if let Some(img) = image {
                    img.write_at(&data, offset).expect("fixture write");
                }
            }
            b'z' | b'd' => {
                model[o..o + l].fill(0);
                if let Some(img) = image {
                    if op == b'z' {
                        img.write_zeroes(offset, len)
                    } else {
                        img.discard(offset, len)
                    }
                    .expect("fixture zero");
                }
            }
            _ => {
                if let Some(img) = image {
                    img.flush().expect("fixture flush");
                }
            }
        }
    };
    step(b'w', 0, 40_000, 1);
    step(b'w', 100_000, 30_000, 2);
    step(b'f', 0, 0, 0);
    step(b'z', 10_000, 20_000, 0);
    step(b'd', 110_000, 5000, 0);
    step(b'w', V1_BASIC_SIZE - 700, 700, 3);
    step(b'f', 0, 0, 0);
    for i in 0..270u64 {
        step(
            b'w',
            (i * 7919) % (V1_BASIC_SIZE - 600),
            1 + i % 600,
            100 + i,
        );
        step(b'f', 0, 0, 0);
    }
    step(b'd', 32 * 1024, 64 * 1024, 0);
    step(b'w', 50_000, 9000, 4);
    step(b'f', 0, 0, 0);
    model
}

/// One step of a recipe, applied the same way to an image and to the expected bytes.
#[derive(Debug, Clone, Copy)]
pub enum Step {
    Write { offset: u64, len: u64, seed: u64 },
    Zeroes { offset: u64, len: u64 },
    Discard { offset: u64, len: u64 },
    Flush,
}

/// Applies `steps` to `image` (if any) and returns the bytes a disk of `size` then reads.
pub fn run_recipe(steps: &[Step], size: u64, image: Option<&Image>) -> Vec<u8> {
    let mut model = vec![0u8; size as usize];
    for &step in steps {
        match step {
            Step::Write { offset, len, seed } => {
                let data = fixture_bytes(seed, len as usize);
                model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
                if let Some(img) = image {
                    img.write_at(&data, offset).expect("fixture write");
                }
            }
            Step::Zeroes { offset, len } | Step::Discard { offset, len } => {
                model[offset as usize..(offset + len) as usize].fill(0);
                if let Some(img) = image {
                    match step {
                        Step::Zeroes { .. } => img.write_zeroes(offset, len),
                        _ => img.discard(offset, len),
                    }
                    .expect("fixture zeroes");
                }
            }
            Step::Flush => {
                if let Some(img) = image {
                    img.flush().expect("fixture flush");
                }
            }
        }
    }
    model
}

/// The fixed recipe of `v2-basic.cow`: unaligned writes (the first and last blocks of each
/// copied and completed), zeroes and discards over data and over nothing, a write into the
/// partial last block, and enough one-block journal records (64 fill its 256 KiB journal)
/// for a tree flush, then records after it. Most of the records carry only zeroes, so
/// that the file stays small.
pub fn v2_basic_steps() -> Vec<Step> {
    let size = V2_BASIC_SIZE;
    let mut s = vec![
        Step::Write {
            offset: 0,
            len: 40_000,
            seed: 1,
        },
        Step::Write {
            offset: 300_000,
            len: 30_000,
            seed: 2,
        },
        Step::Flush,
        Step::Zeroes {
            offset: 10_000,
            len: 20_000,
        },
        Step::Discard {
            offset: 310_000,
            len: 9000,
        },
        Step::Write {
            offset: size - 700,
            len: 700,
            seed: 3,
        },
        Step::Flush,
    ];
    for i in 0..80u64 {
        let offset = (i * 7919 * 13) % (size - 600);
        s.push(if i % 5 == 0 {
            Step::Write {
                offset,
                len: 1 + i % 600,
                seed: 100 + i,
            }
        } else if i % 2 == 0 {
            Step::Zeroes {
                offset,
                len: (1 + i * 97 % 9000).min(size - offset),
            }
        } else {
            Step::Discard {
                offset,
                len: (4096 * (1 + i % 3)).min(size - offset),
            }
        });
        s.push(Step::Flush);
    }
    s.extend([
        Step::Discard {
            offset: 32 * 1024,
            len: 64 * 1024,
        },
        Step::Write {
            offset: 50_000,
            len: 9000,
            seed: 4,
        },
        Step::Write {
            offset: size - 5000,
            len: 5000,
            seed: 5,
        },
        Step::Flush,
    ]);
    s
}
