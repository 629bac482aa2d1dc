//! Space reuse in version 2 (FORMAT-v2.md, "Allocation"): once a file is a quarter longer
//! than what it holds (plus 64 MiB), new blocks go into its holes. A tree flush's new
//! journal region is all holes until the flush publishes it; a write that runs meanwhile
//! must not be given blocks inside it, or the next journal record overwrites that data.
mod lib_support;

use cowimg::image::{ops, CreateOptions, Image};
use cowimg::storage::{FileStorage, Storage};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// What the hooks have seen, in order.
#[derive(Default, Debug)]
struct Seen {
    /// The flush reached its first sync (T2): its pages are written, its journal allocated.
    flush_in_tree_path: bool,
    /// The writer is inside its write, reading the block it completes.
    writer_reading: bool,
    /// The flush reached its second sync (T4), after which it publishes.
    header_sync: bool,
}

/// A file whose syncs are free (nothing here crashes), with hooks that hold a tree flush at
/// its first sync until a writer is inside the image, and that writer's first read until
/// the flush has written its header.
struct Hooked {
    file: FileStorage,
    armed: AtomicBool,
    syncs: AtomicUsize,
    reads: AtomicUsize,
    seen: Mutex<Seen>,
    changed: Condvar,
}

impl Hooked {
    fn wait_for(&self, what: &str, until: impl Fn(&Seen) -> bool) {
        let g = self.seen.lock().unwrap();
        let (g, timeout) = self
            .changed
            .wait_timeout_while(g, Duration::from_secs(20), |s| !until(s))
            .unwrap();
        assert!(!timeout.timed_out(), "waited in vain for {what}: {:?}", *g);
    }
    fn note(&self, f: impl FnOnce(&mut Seen)) {
        f(&mut self.seen.lock().unwrap());
        self.changed.notify_all();
    }
}

impl Storage for Hooked {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.armed.load(Ordering::SeqCst) && self.reads.fetch_add(1, Ordering::SeqCst) == 0 {
            self.note(|s| s.writer_reading = true);
            self.wait_for("the flush's header sync", |s| s.header_sync);
            // The flush returns from its sync, lets its journal go and waits to publish.
            std::thread::sleep(Duration::from_millis(300));
        }
        self.file.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        if self.armed.load(Ordering::SeqCst) {
            match self.syncs.fetch_add(1, Ordering::SeqCst) {
                0 => {
                    self.note(|s| s.flush_in_tree_path = true);
                    self.wait_for("the writer", |s| s.writer_reading);
                }
                1 => self.note(|s| s.header_sync = true),
                _ => {}
            }
        }
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.file.len()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.file.punch_hole(offset, len)
    }
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        self.file.next_data(offset)
    }
    fn first_hole_in(&self, offset: u64, len: u64) -> io::Result<Option<u64>> {
        self.file.first_hole_in(offset, len)
    }
    fn allocated_bytes(&self) -> io::Result<u64> {
        self.file.allocated_bytes()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
    fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        self.file.reserve(offset, len)
    }
}

/// Cheap bytes that are never zero.
fn filled(len: u64, salt: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ salt | 1).collect()
}

fn open(path: &Path, storage: &Arc<Hooked>) -> Image {
    let dynamic: Arc<dyn Storage> = storage.clone();
    Image::open_storage(dynamic, path, false).expect("opening the image")
}

fn hooked(path: &Path) -> Arc<Hooked> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("opening the file");
    Arc::new(Hooked {
        file: FileStorage::new(file),
        armed: AtomicBool::new(false),
        syncs: AtomicUsize::new(0),
        reads: AtomicUsize::new(0),
        seen: Mutex::new(Seen::default()),
        changed: Condvar::new(),
    })
}

#[test]
fn a_write_during_a_tree_flush_is_not_placed_in_the_new_journal_region() {
    let dir = lib_support::scratch_dir();
    let path = dir.path().join("reuse.cow");
    let size = 256 * MIB;
    Image::create(
        &path,
        &CreateOptions {
            size: Some(size),
            version: 2,
            ..Default::default()
        },
    )
    .expect("create");
    // 72 MiB of data given back: the file is long and mostly holes, so blocks are reused.
    // Then a block the writer will complete, and a journal filled to the brim with records
    // of discards, so that the next flush writes the tree.
    let storage = hooked(&path);
    let image = open(&path, &storage);
    image.write_at(&filled(72 * MIB, 1), 0).expect("write");
    image.flush().expect("flush");
    let completed_block = 100 * MIB;
    image
        .write_at(&filled(4096, 2), completed_block)
        .expect("write");
    image.flush().expect("flush");
    image.discard(0, 72 * MIB).expect("discard");
    image.flush().expect("flush");
    let mut i = 0;
    while image.stats().journal_used < image.stats().journal_capacity {
        image.discard(200 * MIB + i * 8192, 4096).expect("discard");
        image.flush().expect("flush");
        i += 1;
        assert!(i < 1000, "the journal does not fill");
    }
    drop(image);

    // A fresh open, so that the allocator looks at the file at its first allocation.
    let storage = hooked(&path);
    let image = open(&path, &storage);
    image.write_at(&filled(4096, 3), 190 * MIB).expect("write");
    let journal_before = image.header().journal_offset;
    // More than the file's holes hold: the allocation walks past all of them.
    let big_at = completed_block + 1;
    let big = filled(76 * MIB, 4);
    storage.armed.store(true, Ordering::SeqCst);
    std::thread::scope(|s| {
        let flusher = s.spawn(|| image.flush());
        storage.wait_for("the tree flush", |s| s.flush_in_tree_path);
        let writer = s.spawn(|| image.write_at(&big, big_at));
        writer.join().expect("writer").expect("the big write");
        flusher.join().expect("flusher").expect("the tree flush");
    });
    storage.armed.store(false, Ordering::SeqCst);
    let journal = image.header();
    assert_ne!(
        journal.journal_offset, journal_before,
        "the flush did not write the tree"
    );
    // The write went into the file's holes (so space was being reused), none of it into
    // the new journal region.
    let region = journal.journal_offset..journal.journal_offset + journal.journal_capacity;
    let mut in_holes = 0;
    for e in image
        .block_status(big_at, big.len() as u64)
        .expect("block status")
    {
        let Some(host) = e.host_offset.filter(|_| e.depth == 0) else {
            continue;
        };
        assert!(
            host + e.length <= region.start || host >= region.end,
            "virtual {:#x}.. ({} bytes) was placed at {host:#x}, inside the new journal region {region:x?}",
            e.offset,
            e.length
        );
        if host < 72 * MIB {
            in_holes += e.length;
        }
    }
    assert!(
        in_holes > 64 * MIB,
        "only {in_holes} bytes of the write went into holes: space was not being reused"
    );
    // The next flush writes its record at the start of the new journal region.
    image.write_at(b"a record", 195 * MIB).expect("write");
    image.flush().expect("flush");
    let mut back = vec![0u8; big.len()];
    image.read_at(&mut back, big_at).expect("read");
    if let Some(at) = back.iter().zip(&big).position(|(a, b)| a != b) {
        panic!(
            "the write made during the tree flush lost its bytes at virtual offset {:#x}: \
             its blocks were given out inside the new journal region ({:#x}.. {} bytes)",
            big_at + at as u64,
            journal.journal_offset,
            journal.journal_capacity
        );
    }
    drop(image);
    let report = ops::check(&path, false).expect("check");
    assert!(
        report.corruptions.is_empty(),
        "check: {:?}",
        report.corruptions
    );
}
