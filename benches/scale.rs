//! Scale check helper (a bench target without criterion, driven by `benches/scale.py`).
//!
//!   scale create PATH SIZE            create an empty image of SIZE bytes, no backing
//!   scale populate PATH SIZE CLUSTERS create an image and write one 4 KiB block into each
//!                                     of CLUSTERS distinct clusters scattered over it
//!   scale open PATH REPS              open the image REPS times (read-only, shared lock)
//!
//! Each prints one JSON object of timings in milliseconds. The library is used directly:
//! a million separate `cowimg io` writes would measure process start-up, not the image.
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

fn create(path: &Path, size: u64) -> f64 {
    let opts = CreateOptions {
        size: Some(size),
        cluster_size: CLUSTER,
        backing: None,
        ..Default::default()
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
            let ms = create(path, num(args.get(2), "SIZE"));
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
            let create_ms = create(path, size);
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
        other => fail(format!("unknown command {other:?}")),
    }
}
