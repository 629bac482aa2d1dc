//! Tests of the flush protocol that need to reach into the bytes the image wrote.
use crate::image::{CreateOptions, ExtentKind, Image};
use crate::storage::MemStorage;
use std::path::Path;
use std::sync::Arc;

fn new_image(mem: &Arc<MemStorage>) -> Image {
    let opts = CreateOptions {
        size: Some(1 << 20),
        ..Default::default()
    };
    Image::create_on(mem.as_ref(), Path::new("mem"), &opts).unwrap();
    Image::open_storage(mem.clone(), Path::new("mem"), false).unwrap()
}

fn reopen(bytes: Vec<u8>) -> Image {
    Image::open_storage(Arc::new(MemStorage::new(bytes)), Path::new("crashed"), true).unwrap()
}

fn read(img: &Image, offset: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    img.read_at(&mut b, offset).unwrap();
    b
}

fn host_of(img: &Image, offset: u64) -> u64 {
    let e = img.block_status(offset, 4096).unwrap()[0];
    assert_eq!(e.kind, ExtentKind::Data);
    e.host_offset.unwrap()
}

#[test]
fn the_last_record_is_dropped_when_its_data_did_not_reach_the_disk() {
    let mem = Arc::new(MemStorage::default());
    let img = new_image(&mem);
    img.write_at(&[1; 4096], 0).unwrap();
    img.flush().unwrap();
    img.write_at(&[2; 4096], 65536).unwrap();
    img.flush().unwrap();
    let (first, second) = (host_of(&img, 0), host_of(&img, 65536));
    let on_disk = mem.contents();
    std::mem::forget(img); // a crash: no flush or seal on the way out

    let whole = reopen(on_disk.clone());
    assert_eq!(
        (read(&whole, 0), read(&whole, 65536)),
        (vec![1; 4096], vec![2; 4096])
    );

    // The record reached the disk but one sector of its data did not.
    let mut torn = on_disk.clone();
    torn[second as usize + 512..second as usize + 1024].fill(0);
    let torn = reopen(torn);
    assert_eq!(read(&torn, 0), vec![1; 4096], "the flush before stays");
    assert_eq!(
        read(&torn, 65536),
        vec![0; 4096],
        "the incomplete flush is gone, not torn"
    );
    assert_eq!(
        torn.block_status(65536, 4096).unwrap()[0].kind,
        ExtentKind::Unallocated
    );

    // Records before the last had their barrier: their data is trusted, not re-read.
    let mut earlier = on_disk;
    earlier[first as usize] = 9;
    let earlier = reopen(earlier);
    assert_eq!(read(&earlier, 0)[..2], [9, 1]);
    assert_eq!(read(&earlier, 65536), vec![2; 4096]);
}

#[test]
fn a_clean_close_seals_the_journal_so_the_next_open_reads_no_data_back() {
    let mem = Arc::new(MemStorage::default());
    let img = new_image(&mem);
    img.write_at(&[3; 4096], 0).unwrap();
    let host = host_of(&img, 0);
    drop(img);
    // After the seal the record is no longer the last one, so damaging its data shows up
    // as damaged data rather than as a silently dropped flush.
    let mut bytes = mem.contents();
    bytes[host as usize] = 4;
    let img = reopen(bytes);
    assert_eq!(read(&img, 0)[0], 4);
    assert_eq!(read(&img, 0)[1], 3);
}

#[test]
fn writes_after_a_flush_never_touch_the_bytes_the_flush_published() {
    let mem = Arc::new(MemStorage::default());
    let img = new_image(&mem);
    img.write_at(&[5; 8192], 0).unwrap();
    img.flush().unwrap();
    let published = mem.contents();
    let host = host_of(&img, 0) as usize;
    img.write_at(&[6; 100], 10).unwrap();
    img.write_at(&[7; 4096], 4096).unwrap();
    img.discard(0, 8192).unwrap();
    img.write_at(&[8; 8192], 0).unwrap();
    let now = mem.contents();
    assert_eq!(&now[host..host + 8192], &published[host..host + 8192]);
    img.flush().unwrap();
    assert_eq!(read(&img, 0), vec![8; 4096]);
}
