//! Scale check helper (a bench target without criterion, driven by `benches/scale.py`).
//!
//!   scale create PATH SIZE [VERSION]  create an empty image of SIZE bytes, no backing
//!   scale populate PATH SIZE CLUSTERS [VERSION]
//!                                     create an image and write one 4 KiB block into each
//!                                     of CLUSTERS distinct clusters scattered over it
//!   scale open PATH REPS              open the image REPS times (read-only, shared lock)
//!   scale layer PATH SIZE BACKING|- VERSION FIRST:COUNT:STRIDE...
//!                                     create an image (over the cowimg image BACKING, or
//!                                     none for -) and write one 4 KiB block at every block
//!                                     FIRST + k * STRIDE, k < COUNT, of each range given
//!
//! VERSION is the format version, 1 (the default) or 2 (FORMAT-v2.md). Cluster i of
//! `populate` is (i * 0x9e3779b97f4a7c15) mod (SIZE / 64 KiB), its block at the cluster's
//! start: benches/v2.py lays out a qcow2 image the same way.
//!
//! Each prints one JSON object of timings in milliseconds. The library is used directly:
//! a million separate `cowimg io` writes would measure process start-up, not the image.
use cowimg::format::BackingFormat;
use cowimg::image::{CreateOptions, Image, OpenOptions};
use std::path::Path;
use std::time::Instant;

const CLUSTER: u64 = 64 * 1024;
const BLOCK: usize = 4096;

fn fail(msg: String) -> ! {
    eprintln!("scale: {msg}");
    std::process::exit(1)
}

fn num(s: Option<&String>, what: &str) -> u64 {
    s.and_then(|v| v.parse().ok())
        .unwrap_or_else(|| fail(format!("missing or bad {what}")))
}

fn version(s: Option<&String>) -> u32 {
    match s.map(String::as_str) {
        None | Some("1") => 1,
        Some("2") => 2,
        Some(other) => fail(format!("bad VERSION {other:?} (1 or 2)")),
    }
}

fn create(path: &Path, size: u64, version: u32) -> f64 {
    create_over(path, size, version, None)
}

fn create_over(path: &Path, size: u64, version: u32, backing: Option<String>) -> f64 {
    let opts = CreateOptions {
        size: Some(size),
        cluster_size: CLUSTER,
        backing: backing.map(|b| (b, BackingFormat::Cowimg)),
        version,
    };
    let t = Instant::now();
    Image::create(path, &opts).unwrap_or_else(|e| fail(e.to_string()));
    t.elapsed().as_secs_f64() * 1e3
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let cmd = args.first().map(String::as_str).unwrap_or("");
    let path = Path::new(
        args.get(1)
            .unwrap_or_else(|| fail("usage: scale create|populate|open PATH ...".into())),
    );
    match cmd {
        "create" => {
            let ms = create(path, num(args.get(2), "SIZE"), version(args.get(3)));
            println!("{{\"create_ms\": {ms:.3}}}");
        }
        "populate" => {
            let size = num(args.get(2), "SIZE");
            let clusters = num(args.get(3), "CLUSTERS");
            let total = size / CLUSTER;
            if !total.is_power_of_two() || clusters > total {
                fail(format!(
                    "SIZE/64KiB must be a power of two >= CLUSTERS, got {total}"
                ));
            }
            let create_ms = create(path, size, version(args.get(4)));
            let image =
                Image::open(path, &OpenOptions::default()).unwrap_or_else(|e| fail(e.to_string()));
            let block = vec![0xa5u8; BLOCK];
            // i * odd (mod a power of two) is a permutation: distinct clusters, scattered.
            let stride = 0x9e37_79b9_7f4a_7c15u64 | 1;
            let t = Instant::now();
            for i in 0..clusters {
                let cluster = i.wrapping_mul(stride) & (total - 1);
                image
                    .write_at(&block, cluster * CLUSTER)
                    .unwrap_or_else(|e| fail(e.to_string()));
                // Flush now and then, as a guest would, so the journal and checkpoints
                // see realistic traffic.
                if (i + 1) % 65_536 == 0 {
                    image.flush().unwrap_or_else(|e| fail(e.to_string()));
                }
            }
            image.flush().unwrap_or_else(|e| fail(e.to_string()));
            let write_ms = t.elapsed().as_secs_f64() * 1e3;
            let mapped = image.stats().mapped_clusters;
            if mapped != clusters {
                fail(format!(
                    "expected {clusters} mapped clusters, image says {mapped}"
                ));
            }
            println!(
                "{{\"create_ms\": {create_ms:.3}, \"populate_ms\": {write_ms:.3}, \"mapped_clusters\": {mapped}}}"
            );
        }
        "open" => {
            let reps = num(args.get(2), "REPS").max(1);
            let opts = OpenOptions {
                read_only: true,
                force_share: true,
                ..Default::default()
            };
            let mut times = Vec::new();
            let mut mapped = 0;
            for _ in 0..reps {
                let t = Instant::now();
                let image = Image::open(path, &opts).unwrap_or_else(|e| fail(e.to_string()));
                times.push(t.elapsed().as_secs_f64() * 1e3);
                mapped = image.stats().mapped_clusters;
            }
            times.sort_by(f64::total_cmp);
            println!(
                "{{\"open_ms_median\": {:.3}, \"open_ms_min\": {:.3}, \"mapped_clusters\": {mapped}}}",
                times[times.len() / 2],
                times[0]
            );
        }
        "layer" => layer(path, &args[2..]),
        other => fail(format!("unknown command {other:?}")),
    }
}

/// `scale layer`: one layer of a chain (benches/v2.py, "depth"), flushed once at the end.
fn layer(path: &Path, args: &[String]) {
    let size = num(args.first(), "SIZE");
    let backing = match args.get(1).map(String::as_str) {
        None => fail("missing BACKING (or -)".into()),
        Some("-") => None,
        Some(b) => Some(b.to_string()),
    };
    let create_ms = create_over(path, size, version(args.get(2)), backing);
    let image = Image::open(path, &OpenOptions::default()).unwrap_or_else(|e| fail(e.to_string()));
    let block = vec![0x5au8; BLOCK];
    let t = Instant::now();
    let mut blocks = 0u64;
    for range in &args[3..] {
        let f: Vec<u64> = range
            .split(':')
            .map(|v| {
                v.parse()
                    .unwrap_or_else(|_| fail(format!("bad range {range:?}")))
            })
            .collect();
        let [first, count, stride] = f[..] else {
            fail(format!("range {range:?} is not FIRST:COUNT:STRIDE"));
        };
        for k in 0..count {
            let b = first + k * stride;
            if (b + 1) * BLOCK as u64 > size {
                fail(format!("block {b} of range {range:?} is past the end"));
            }
            image
                .write_at(&block, b * BLOCK as u64)
                .unwrap_or_else(|e| fail(e.to_string()));
            blocks += 1;
            if blocks.is_multiple_of(65_536) {
                image.flush().unwrap_or_else(|e| fail(e.to_string()));
            }
        }
    }
    image.flush().unwrap_or_else(|e| fail(e.to_string()));
    let write_ms = t.elapsed().as_secs_f64() * 1e3;
    println!(
        "{{\"create_ms\": {create_ms:.3}, \"write_ms\": {write_ms:.3}, \"blocks\": {blocks}}}"
    );
}
