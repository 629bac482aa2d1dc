//! What opening an image may cost, and what it may open (FORMAT.md, "Opening"): crafted
//! images that made an open read far more than the file holds, chains that loop, files
//! that are not regular files, and header values that our own next write would make
//! unopenable. Each is refused (or opened) quickly, with an error naming what is wrong.

use cowimg::format::{Header, JournalRecordHeader, MapEntry, MapItem, MAP_ENTRY_SIZE};
use cowimg::image::{ops, CreateOptions, Image, OpenOptions};
use cowimg::storage::{MemStorage, Storage};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Far more than any of these opens needs, far less than the unbounded ones took (minutes).
const BOUND: Duration = Duration::from_secs(5);

fn create(path: &Path, size: u64, cluster_size: u64, backing: Option<(&str, &str)>) {
    let backing = backing.map(|(p, f)| {
        let fmt = match f {
            "raw" => cowimg::format::BackingFormat::Raw,
            _ => cowimg::format::BackingFormat::Cowimg,
        };
        (p.to_string(), fmt)
    });
    Image::create(
        path,
        &CreateOptions {
            size: Some(size),
            cluster_size,
            backing,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
}

fn read_header(path: &Path) -> Header {
    let bytes = std::fs::read(path).expect("reading the image");
    Header::from_bytes(&bytes[..4096]).expect("slot A")
}

fn write_at(path: &Path, bytes: &[u8], offset: u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("opening for writing");
    file.write_all_at(bytes, offset).expect("writing");
}

fn set_len(path: &Path, len: u64) {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("opening for writing");
    file.set_len(len).expect("setting the length");
}

/// Runs `f` on another thread and waits at most `BOUND` (the thread is left behind when it
/// blocks: an open that blocks forever must fail the test, not hang it).
fn within_bound<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let start = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(BOUND) {
        Ok(v) => {
            eprintln!("{what}: {:?}", start.elapsed());
            v
        }
        Err(_) => panic!("{what}: still running after {BOUND:?}"),
    }
}

fn open_error(path: &Path, what: &str) -> String {
    let p = path.to_path_buf();
    match within_bound(what, move || {
        Image::open(
            &p,
            &OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    }) {
        Ok(()) => panic!("{what}: the image opened"),
        Err(message) => {
            assert!(!message.contains("panicked"), "{message}");
            message
        }
    }
}

// ---------------------------------------------------------------------------------------
// Finding 4: the last record's data is read back once, not once per item naming it.

/// An image with 2 MiB clusters whose only journal record holds as many items as fit in the
/// 2 MiB journal (37,448), each naming all 64 units of the same host cluster as written:
/// unchecked, recovery reads 73 GiB to check the digest.
#[test]
fn a_last_record_naming_one_cluster_many_times_is_refused_quickly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("many.cow");
    let cs = 2u64 << 20;
    create(&path, 64 * cs, cs, None);
    let h = read_header(&path);
    let n = ((h.journal_capacity - 40) / 56) as usize;
    assert!(n > 37_000, "{n} items");
    let host = h.journal_offset / cs + h.journal_capacity / cs;
    let entry = MapItem::Cluster(MapEntry {
        virtual_cluster: 0,
        host: [host, 0],
        units: [u64::MAX, 0],
        zero: 0,
    });
    let mut items = vec![0u8; n * MAP_ENTRY_SIZE];
    for i in 0..n {
        entry.write_to(&mut items[i * MAP_ENTRY_SIZE..]);
    }
    let written = vec![u64::MAX; n];
    let record = JournalRecordHeader::encode(h.journal_epoch, 1, &items, &written, 0x1234);
    assert!(record.len() as u64 <= h.journal_capacity);
    write_at(&path, &record, h.journal_offset);
    set_len(&path, (host + 1) * cs);
    let message = open_error(&path, "37,448 items naming one cluster");
    assert!(
        message.contains("many.cow")
            && message.contains("journal record at offset 0x200000")
            && message.contains(&format!("host cluster {host}"))
            && message.contains("claimed by both"),
        "{message}"
    );
}

/// The same record with each item naming its own cluster, in a sparse file long enough to
/// hold them all (73 GiB of holes): the digest reads what the file holds, not its length,
/// and the record (whose data is not there) is dropped.
#[test]
fn a_last_record_over_holes_is_dropped_without_reading_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sparse.cow");
    let cs = 2u64 << 20;
    let n_max = 37_448u64;
    create(&path, n_max * cs, cs, None);
    let h = read_header(&path);
    let n = ((h.journal_capacity - 40) / 56) as usize;
    let first = h.journal_offset / cs + h.journal_capacity / cs;
    let mut items = vec![0u8; n * MAP_ENTRY_SIZE];
    for i in 0..n {
        MapItem::Cluster(MapEntry {
            virtual_cluster: i as u64,
            host: [first + i as u64, 0],
            units: [u64::MAX, 0],
            zero: 0,
        })
        .write_to(&mut items[i * MAP_ENTRY_SIZE..]);
    }
    let written = vec![u64::MAX; n];
    let record = JournalRecordHeader::encode(h.journal_epoch, 1, &items, &written, 0x1234);
    write_at(&path, &record, h.journal_offset);
    set_len(&path, (first + n as u64) * cs);
    let p = path.clone();
    let mapped = within_bound("37,448 clusters of holes", move || {
        let image = Image::open(
            &p,
            &OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("opening: {e}"));
        image.stats().mapped_clusters
    });
    assert_eq!(mapped, 0, "the record whose data is holes was kept");
}

// ---------------------------------------------------------------------------------------
// Finding 5: a checkpoint claimed over a hole costs a seek, not a read of the claim.

#[test]
fn a_checkpoint_claimed_over_a_sparse_hole_is_refused_quickly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("holey.cow");
    let cs = 4096u64;
    create(&path, 1 << 20, cs, None);
    let mut h = read_header(&path);
    // 64 GiB of checkpoint (valid as far as the header goes), then its journal.
    let entries = (64u64 << 30) / MAP_ENTRY_SIZE as u64;
    let ckpt_len = entries * MAP_ENTRY_SIZE as u64;
    h.virtual_size = entries * cs;
    h.checkpoint_offset = 2 * cs;
    h.checkpoint_entries = entries;
    h.checkpoint_crc = 0x1234_5678;
    h.journal_offset = (2 * cs + ckpt_len).next_multiple_of(cs);
    h.journal_capacity = (2 * ckpt_len).next_multiple_of(cs);
    write_at(&path, &h.to_bytes(), 0);
    set_len(&path, h.journal_offset + h.journal_capacity);
    let message = open_error(&path, "a 64 GiB checkpoint of holes");
    assert!(
        message.contains("holey.cow")
            && message.contains("checkpoint at offset 0x2000")
            && message.contains("hole"),
        "{message}"
    );
    // check agrees, as quickly.
    let p = path.clone();
    let report = within_bound("check", move || ops::check(&p, false).expect("check"));
    assert!(
        report.corruptions.iter().any(|c| c.contains("hole")),
        "{:?}",
        report.corruptions
    );
}

// ---------------------------------------------------------------------------------------
// Finding 6: loops are refused by file identity before anything is loaded.

#[test]
fn an_image_that_is_its_own_backing_file_is_refused_naming_the_loop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = dir.path().join("a.cow");
    create(&a, 1 << 20, 65536, Some(("a.cow", "cowimg")));
    let message = open_error(&a, "a -> a");
    let a = a.display().to_string();
    assert!(
        message.contains(&format!("backing chain loops: {a} -> {a}")),
        "{message}"
    );
}

#[test]
fn a_two_image_loop_is_refused_naming_both_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = dir.path().join("a.cow");
    let b = dir.path().join("b.cow");
    create(&a, 1 << 20, 65536, Some(("b.cow", "cowimg")));
    create(&b, 1 << 20, 65536, Some(("a.cow", "cowimg")));
    let message = open_error(&a, "a -> b -> a");
    let (a, b) = (a.display().to_string(), b.display().to_string());
    assert!(
        message.contains(&format!("backing chain loops: {a} -> {b} -> {a}")),
        "{message}"
    );
    // Creating an image over the loop (which opens it for its size) is refused too.
    let c = dir.path().join("c.cow");
    let c2 = c.clone();
    let created = within_bound("create over a loop", move || {
        Image::create(
            &c2,
            &CreateOptions {
                size: None,
                cluster_size: 65536,
                backing: Some(("a.cow".into(), cowimg::format::BackingFormat::Cowimg)),
                ..Default::default()
            },
        )
        .map_err(|e| e.to_string())
    });
    let message = created.expect_err("created over a loop");
    assert!(message.contains("backing chain loops"), "{message}");
    assert!(!c.exists(), "a file was left behind");
}

#[test]
fn a_raw_backing_file_that_is_the_image_itself_is_a_loop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = dir.path().join("self.cow");
    create(&a, 1 << 20, 65536, Some(("self.cow", "raw")));
    let message = open_error(&a, "a -> a as raw");
    assert!(message.contains("backing chain loops"), "{message}");
}

/// A straight chain deeper than the bound is still refused by depth.
#[test]
fn a_chain_deeper_than_the_bound_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let depth = cowimg::image::MAX_CHAIN_DEPTH + 1;
    create(&dir.path().join("0.cow"), 1 << 20, 65536, None);
    for i in 1..depth {
        let below = format!("{}.cow", i - 1);
        create(
            &dir.path().join(format!("{i}.cow")),
            1 << 20,
            65536,
            Some((below.as_str(), "cowimg")),
        );
    }
    let top = dir.path().join(format!("{}.cow", depth - 1));
    let message = open_error(&top, "a deep chain");
    assert!(message.contains("deeper than 64"), "{message}");
    // One layer less opens.
    let ok = dir.path().join(format!("{}.cow", depth - 2));
    Image::open(
        &ok,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("a chain of 64: {e}"));
}

// ---------------------------------------------------------------------------------------
// Finding 8: only regular files and block devices are opened; a FIFO never blocks an open.

fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
}

#[test]
fn a_fifo_as_backing_file_is_refused_without_blocking() {
    let dir = tempfile::tempdir().expect("tempdir");
    mkfifo(&dir.path().join("fifo"));
    for fmt in ["raw", "cowimg"] {
        let top = dir.path().join(format!("top-{fmt}.cow"));
        create(&top, 1 << 20, 65536, Some(("fifo", fmt)));
        let message = open_error(&top, &format!("a FIFO as {fmt} backing file"));
        let fifo = dir.path().join("fifo").display().to_string();
        assert!(
            message.contains(&format!("{fifo}: not a regular file or block device")),
            "{message}"
        );
    }
}

#[test]
fn a_fifo_or_a_directory_as_the_image_is_refused_without_blocking() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("fifo.cow");
    mkfifo(&fifo);
    let message = open_error(&fifo, "a FIFO as the image");
    assert!(
        message.contains(&format!(
            "{}: not a regular file or block device",
            fifo.display()
        )),
        "{message}"
    );
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).expect("mkdir");
    let top = dir.path().join("top.cow");
    create(&top, 1 << 20, 65536, Some(("sub", "raw")));
    let message = open_error(&top, "a directory as the backing file");
    assert!(
        message.contains("sub: not a regular file or block device"),
        "{message}"
    );
    // check takes the same path.
    let f = fifo.clone();
    let checked = within_bound("check of a FIFO", move || {
        ops::check(&f, false).map(|_| ()).map_err(|e| e.to_string())
    });
    assert!(
        checked
            .expect_err("check of a FIFO")
            .contains("not a regular file or block device"),
        "check"
    );
}

// ---------------------------------------------------------------------------------------
// Finding 10: values a reader accepts but our next write would make unopenable.

/// A sealed image with one record mapping unit 0 of virtual cluster 0; returns the path,
/// the header and the record's offset.
fn one_record_image(dir: &Path) -> (PathBuf, Header, u64) {
    let path = dir.join("reserved.cow");
    create(&path, 1 << 20, 65536, None);
    {
        let image = Image::open(&path, &OpenOptions::default()).expect("opening");
        image.write_at(&[7u8; 4096], 0).expect("writing");
        image.flush().expect("flushing");
    }
    let h = read_header(&path);
    (path, h.clone(), h.journal_offset)
}

#[test]
fn a_reserved_slot_far_past_the_end_of_the_file_is_forgotten_and_writes_stay_inside_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, h, at) = one_record_image(dir.path());
    let bytes = std::fs::read(&path).expect("reading");
    let raw: [u8; 40] = bytes[at as usize..at as usize + 40].try_into().expect("40");
    let rec = JournalRecordHeader::parse(&raw, h.journal_epoch, 1).expect("record 1");
    let body_at = at as usize + 40;
    let body =
        &bytes[body_at..body_at + JournalRecordHeader::body_len(rec.item_count as u64) as usize];
    let (items, written) = rec.split_body(body);
    let mut items = items;
    // Slot B of the entry keeps a cluster 8 TiB into the file, holding no unit.
    let far = (8u64 << 40) / 65536;
    items[0x10..0x18].copy_from_slice(&far.to_le_bytes());
    let record = JournalRecordHeader::encode(h.journal_epoch, 1, &items, &written, rec.data_digest);
    write_at(&path, &record, at);
    // Not corruption (a reservation whose data write failed looks the same), but forgotten:
    // the image opens, check is clean, and writes to the cluster land inside the file.
    let report = ops::check(&path, false).expect("check");
    assert!(
        report.corruptions.is_empty(),
        "check: {:?}",
        report.corruptions
    );
    {
        let image = Image::open(&path, &OpenOptions::default()).expect("opening");
        for round in 0..3u8 {
            image.write_at(&[round + 1; 65536], 0).expect("writing");
            image.flush().expect("flushing");
        }
    }
    let length = std::fs::metadata(&path).expect("stat").len();
    assert!(length < 1 << 30, "the file grew to {length}");
}

/// The same for version 2: at the last generation, a header change (rebase) and a flush
/// that would write the tree are refused before anything is written, the refused changes
/// still read as written, a flush that only appends to the journal still works, and the
/// image opens afterwards with what that flush made durable.
#[test]
fn a_version_2_header_at_the_last_generation_refuses_tree_flushes_and_loses_nothing() {
    let mem = MemStorage::new(Vec::new());
    let opts = CreateOptions {
        size: Some(1 << 20),
        version: 2,
        ..Default::default()
    };
    Image::create_on(&mem, Path::new("last.cow"), &opts).expect("creating");
    let mut bytes = mem.contents();
    let slot = cowimg::format::HEADER_SLOT_SIZE;
    let mut h = cowimg::format::v2::HeaderV2::from_bytes(&bytes[..slot]).expect("header");
    h.generation = cowimg::format::header::MAX_GENERATION;
    bytes[..slot].copy_from_slice(&h.to_bytes());
    let storage = Arc::new(MemStorage::new(bytes));
    let reopen = |storage: &Arc<MemStorage>| {
        let s: Arc<dyn Storage> = storage.clone();
        Image::open_storage(s, Path::new("last.cow"), false)
            .expect("opening at the last generation")
    };
    let mut image = reopen(&storage);
    let refused = image
        .set_backing(None)
        .expect_err("a header update past 2^62");
    assert!(refused.to_string().contains("generation"), "{refused}");
    // Every flush with changes would write the tree: refused, and the write still reads.
    assert!(image.set_flush_limits(cowimg::image::v2::FlushLimits {
        journaled_extents: 0,
        ..Default::default()
    }));
    image.write_at(&[7u8; 4096], 8192).expect("writing");
    let refused = image.flush().expect_err("a tree flush past 2^62");
    assert!(refused.to_string().contains("generation"), "{refused}");
    let mut block = vec![0u8; 4096];
    image.read_at(&mut block, 8192).expect("reading");
    assert!(
        block.iter().all(|&b| b == 7),
        "the refused flush lost the write"
    );
    // With room in the journal again, the same changes are flushed by a record.
    assert!(image.set_flush_limits(cowimg::image::v2::FlushLimits::default()));
    image
        .flush()
        .expect("a journal flush at the last generation");
    drop(image);
    let image = reopen(&storage);
    image
        .read_at(&mut block, 8192)
        .expect("reading after reopening");
    assert_eq!(block, vec![7u8; 4096]);
}

/// An image at the last generation a reader accepts: a header update must be refused
/// before it is written, and the image must still open afterwards.
#[test]
fn a_header_at_the_last_generation_refuses_updates_and_still_opens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("old.cow");
    create(&path, 1 << 20, 4096, None);
    let mut h = read_header(&path);
    h.generation = cowimg::format::header::MAX_GENERATION;
    write_at(&path, &h.to_bytes(), 0);
    let bytes = std::fs::read(&path).expect("reading");
    let storage = Arc::new(MemStorage::new(bytes));
    let reopen = |storage: &Arc<MemStorage>| {
        let s: Arc<dyn Storage> = storage.clone();
        Image::open_storage(s, Path::new("old.cow"), false)
    };
    let mut image = reopen(&storage).expect("opening at the last generation");
    let refused = image
        .set_backing(None)
        .expect_err("a header update past 2^62");
    assert!(refused.to_string().contains("generation"), "{refused}");
    drop(image);
    let image = reopen(&storage).expect("reopening after a refused set_backing");
    // Fill the journal: the flush that needs a checkpoint (a header update) fails cleanly.
    let mut last_ok = None;
    for i in 0..400u64 {
        image.write_at(&i.to_le_bytes(), 0).expect("write");
        match image.flush() {
            Ok(()) => last_ok = Some(i),
            Err(e) => {
                assert!(e.to_string().contains("generation"), "{e}");
                break;
            }
        }
    }
    let last_ok = last_ok.expect("some flush succeeded");
    assert!(last_ok < 399, "no flush needed a checkpoint");
    drop(image);
    let image = reopen(&storage).expect("reopening after a refused checkpoint");
    let mut buf = [0u8; 8];
    image.read_at(&mut buf, 0).expect("read");
    assert_eq!(u64::from_le_bytes(buf), last_ok);
}
