//! The NBD server runs requests concurrently, including writes to different bytes of the
//! same image unit (512-byte writes from fio or the kernel). The image must keep them all.
use cowimg::image::{CreateOptions, Image, OpenOptions};
use std::sync::Arc;

#[test]
fn concurrent_partial_writes_to_one_unit_are_all_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.cow");
    Image::create(
        &path,
        &CreateOptions {
            size: Some(1 << 20),
            ..Default::default()
        },
    )
    .unwrap();
    let img = Arc::new(Image::open(&path, &OpenOptions::default()).unwrap());
    for round in 0..200u64 {
        let unit = (round % 64) * 16384;
        let writers: Vec<_> = (0..8u64)
            .map(|i| {
                let img = Arc::clone(&img);
                std::thread::spawn(move || {
                    img.write_at(&[i as u8 + 1; 512], unit + i * 512).unwrap()
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let mut b = vec![0u8; 4096];
        img.read_at(&mut b, unit).unwrap();
        for i in 0..8 {
            assert!(
                b[i * 512..(i + 1) * 512].iter().all(|&x| x == i as u8 + 1),
                "round {round}: sector {i} was lost"
            );
        }
        img.discard(unit, 4096).unwrap();
        // Flushes pin the units, so later rounds exercise moves to the other slot.
        if round % 10 == 0 {
            img.flush().unwrap();
        }
    }
}
