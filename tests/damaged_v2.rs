//! Damaged version-2 images (FORMAT-v2.md): a real image whose tree has two levels, cut at
//! every page and inside its journal, with bits flipped in every page (with and without the
//! page checksum fixed up), with pages that point at themselves or into a cycle, a page of
//! another image, a page newer than its header, and a journal record damaged in the middle.
//! Each must open and read cleanly or be refused with an error that names the file and an
//! offset; never a panic, a hang or an allocation sized by what the file claims. `check`
//! reports every damage that opening or reading does.
//!
//! The pages and records are found and decoded here, from the format document, not with
//! the engine's decoder.
mod lib_support;

use cowimg::format::v2::HeaderV2;
use cowimg::image::v2::{current_slot, Slot};
use cowimg::image::{ops, CreateOptions, Image};
use cowimg::storage::{MemStorage, Storage};
use lib_support::{pattern, write_sparse};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

const NAME: &str = "damaged-v2.cow";
const BLOCK: u64 = 4096;
/// A 64 GiB disk: virtual blocks need 24 bits, far apart.
const SIZE: u64 = 64 << 30;
/// No single allocation while a damaged image is opened, read or checked may exceed this
/// (the largest legitimate one is a copy of the reference image, about 10 MiB).
const ALLOCATION_BOUND: usize = 256 << 20;
/// Nothing here may take long: an open reads two slots and a journal, a read a few pages.
const CASE_BOUND: Duration = Duration::from_secs(10);

/// Remembers the largest allocation this test binary asked for since it was last reset.
struct Largest;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

fn note(size: usize) {
    // A load first: most allocations are small, and a store from every thread would
    // contend for one cache line.
    if size > LARGEST.load(Ordering::Relaxed) {
        LARGEST.fetch_max(size, Ordering::Relaxed);
    }
}

unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Largest = Largest;

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

// ---------------------------------------------------------------------------------------
// An independent reading of the format: pages ("Map pages") and records ("Journal").

/// A map page as FORMAT-v2.md lays it out, with the range its parent gives it.
#[derive(Debug, Clone)]
struct Page {
    offset: u64,
    level: u8,
    generation: u64,
    /// The virtual blocks `[lo, hi)` the page covers.
    lo: u64,
    hi: u64,
    /// The two words of each 16-byte item.
    items: Vec<(u64, u64)>,
}

/// How a leaf or record item maps its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Data(u64),
    Zero,
    Unmapped,
}

/// `(first virtual block, blocks, kind)` of an extent item.
fn extent(item: (u64, u64)) -> (u64, u64, Kind) {
    let (a, b) = item;
    let start = a & ((1 << 40) - 1);
    let len = (a >> 40) + 1;
    assert_eq!((b >> 48) & 0xff, 0, "reserved bits of an extent are set");
    let kind = match b >> 56 {
        1 => Kind::Data(b & ((1 << 48) - 1)),
        2 => Kind::Zero,
        3 => Kind::Unmapped,
        k => panic!("an extent of kind {k}"),
    };
    (start, len, kind)
}

/// The page checksum: crc32 of bytes 0x08..0x1000, at 0x04.
fn fix_page_crc(page: &mut [u8]) {
    let crc = crc32fast::hash(&page[0x08..0x1000]);
    page[0x04..0x08].copy_from_slice(&crc.to_le_bytes());
}

/// The header slot checksum: crc32 of bytes 0x000..0xffc, at 0xffc (FORMAT.md).
fn fix_slot_crc(slot: &mut [u8]) {
    let crc = crc32fast::hash(&slot[..0xffc]);
    slot[0xffc..0x1000].copy_from_slice(&crc.to_le_bytes());
}

/// Every page of the tree, from the root down, checked against the format as it is read.
fn walk_pages(bytes: &[u8], h: &HeaderV2) -> Vec<Page> {
    let mut pages = Vec::new();
    if h.map_height == 0 {
        return pages;
    }
    let mut stack = vec![(h.map_root, h.map_height - 1, 0u64, 1u64 << 40)];
    while let Some((offset, level, lo, hi)) = stack.pop() {
        let p = &bytes[offset as usize..(offset + BLOCK) as usize];
        assert_eq!(&p[0..4], b"CIMP", "page at {offset:#x}: magic");
        assert_eq!(
            le32(p, 0x04),
            crc32fast::hash(&p[0x08..]),
            "page at {offset:#x}: checksum"
        );
        assert_eq!(le64(p, 0x08), h.image_id, "page at {offset:#x}: image_id");
        let generation = le64(p, 0x10);
        assert!(
            generation <= h.generation,
            "page at {offset:#x}: generation"
        );
        assert_eq!(p[0x18], level, "page at {offset:#x}: level");
        assert_eq!(p[0x19], 0, "page at {offset:#x}: reserved");
        assert_eq!(le32(p, 0x1c), 0, "page at {offset:#x}: reserved");
        let count = le16(p, 0x1a) as usize;
        assert!((1..=254).contains(&count), "page at {offset:#x}: count");
        let items: Vec<(u64, u64)> = (0..count)
            .map(|i| (le64(p, 0x20 + 16 * i), le64(p, 0x28 + 16 * i)))
            .collect();
        assert!(
            p[0x20 + 16 * count..].iter().all(|&b| b == 0),
            "page at {offset:#x}: padding"
        );
        if level > 0 {
            for (i, &(key, child)) in items.iter().enumerate() {
                let clo = if i == 0 { lo } else { key };
                let chi = items.get(i + 1).map_or(hi, |&(k, _)| k);
                assert!(clo < chi, "page at {offset:#x}: keys out of order");
                stack.push((child, level - 1, clo, chi));
            }
        } else {
            for &item in &items {
                let (start, len, kind) = extent(item);
                assert!(start >= lo && start + len <= hi, "leaf at {offset:#x}");
                assert_ne!(kind, Kind::Unmapped, "leaf at {offset:#x}");
            }
        }
        pages.push(Page {
            offset,
            level,
            generation,
            lo,
            hi,
            items,
        });
    }
    pages.sort_by_key(|p| p.offset);
    pages
}

/// A journal record of the current region.
#[derive(Debug, Clone)]
struct Record {
    offset: u64,
    /// Padded to the next block.
    len: u64,
    items: Vec<(u64, u64)>,
}

/// The records replay would read: "CIJ2", the header's epoch, sequences from 1, checksums.
fn journal_records(bytes: &[u8], h: &HeaderV2) -> Vec<Record> {
    let mut out = Vec::new();
    let (mut tail, mut seq) = (0u64, 1u64);
    while tail + 40 <= h.journal_capacity {
        let at = (h.journal_offset + tail) as usize;
        let r = &bytes[at..at + 40];
        if &r[0..4] != b"CIJ2" || le64(r, 0x08) != h.journal_epoch || le64(r, 0x10) != seq {
            break;
        }
        let count = le32(r, 0x18) as usize;
        let end = 0x28 + 16 * count;
        assert_eq!(
            le32(r, 0x04),
            crc32fast::hash(&bytes[at + 8..at + end]),
            "record {seq}: checksum"
        );
        let items = (0..count)
            .map(|i| {
                (
                    le64(bytes, at + 0x28 + 16 * i),
                    le64(bytes, at + 0x30 + 16 * i),
                )
            })
            .collect();
        let len = (end as u64).next_multiple_of(BLOCK);
        out.push(Record {
            offset: at as u64,
            len,
            items,
        });
        tail += len;
        seq += 1;
    }
    out
}

fn v2_slot(storage: &dyn Storage) -> (usize, HeaderV2) {
    match current_slot(storage, Path::new(NAME)).expect("the current header slot") {
        (i, Slot::V2(h)) => (i, h),
        (_, other) => panic!("not a version-2 slot: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// The reference image.

/// A real image: thousands of scattered 4 KiB writes (some partial, some zeroed or
/// discarded, some rewritten after the tree was written), flushed until a tree flush wrote
/// a tree of two levels, then journal records over it.
struct Reference {
    bytes: Vec<u8>,
    active_slot: usize,
    header: HeaderV2,
    pages: Vec<Page>,
    records: Vec<Record>,
    /// What every virtual block ever touched reads as.
    blocks: BTreeMap<u64, Vec<u8>>,
    /// Everything below this offset is referenced by the image: header slots, pages, the
    /// journal region, data blocks. A cut below it loses something.
    referenced_end: u64,
}

fn build(seed: u64) -> Reference {
    let storage = Arc::new(MemStorage::new(Vec::new()));
    let opts = CreateOptions {
        size: Some(SIZE),
        version: 2,
        ..Default::default()
    };
    Image::create_on(storage.as_ref(), Path::new(NAME), &opts).expect("creating the reference");
    let dynamic: Arc<dyn Storage> = storage.clone();
    let image = Image::open_storage(dynamic, Path::new(NAME), false).expect("opening it");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut blocks: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut touched: Vec<u64> = Vec::new();
    let mut tree_at = None;
    for interval in 0.. {
        for _ in 0..3 {
            // Mostly new blocks far apart; a fifth of the writes replace an earlier one.
            let b = if touched.is_empty() || rng.gen_bool(0.8) {
                rng.gen_range(0..SIZE / BLOCK)
            } else {
                touched[rng.gen_range(0..touched.len())]
            };
            let data = pattern(rng.gen(), BLOCK as usize);
            image.write_at(&data, b * BLOCK).expect("a reference write");
            blocks.insert(b, data);
            touched.push(b);
        }
        if interval % 8 == 7 {
            // A partial write, and a block zeroed and one discarded.
            let b = touched[rng.gen_range(0..touched.len())];
            let (at, len) = (rng.gen_range(0..3000usize), rng.gen_range(1..1000usize));
            let data = pattern(rng.gen(), len);
            image
                .write_at(&data, b * BLOCK + at as u64)
                .expect("a partial write");
            blocks.entry(b).or_insert_with(|| vec![0; BLOCK as usize])[at..at + len]
                .copy_from_slice(&data);
            let z = touched[rng.gen_range(0..touched.len())];
            image.write_zeroes(z * BLOCK, BLOCK).expect("write_zeroes");
            blocks.insert(z, vec![0; BLOCK as usize]);
            let d = touched[rng.gen_range(0..touched.len())];
            image.discard(d * BLOCK, BLOCK).expect("discard");
            blocks.insert(d, vec![0; BLOCK as usize]);
        }
        image.flush().expect("a reference flush");
        let (_, h) = v2_slot(storage.as_ref());
        // A tree flush applies a bounded number of changes (FORMAT-v2.md, "The flush
        // protocol"): go on until the tree has two levels, then 30 records more.
        if tree_at.is_none() && h.map_height >= 2 && h.map_extents >= 1000 {
            tree_at = Some(interval);
        }
        if tree_at.is_some_and(|t| interval >= t + 30) {
            break;
        }
        assert!(interval < 4000, "no two-level tree in {interval} flushes");
    }
    drop(image);
    let bytes = storage.contents();
    let (active_slot, header) = v2_slot(storage.as_ref());
    let pages = walk_pages(&bytes, &header);
    let records = journal_records(&bytes, &header);
    let mut r = Reference {
        bytes,
        active_slot,
        header,
        pages,
        records,
        blocks,
        referenced_end: 0,
    };
    r.referenced_end = verify_layout(&r);
    r
}

/// Checks that the pages and records, read by the format document, say what was written,
/// and returns the end of everything they reference.
fn verify_layout(r: &Reference) -> u64 {
    let h = &r.header;
    let leaves: Vec<&Page> = r.pages.iter().filter(|p| p.level == 0).collect();
    let extents: usize = leaves.iter().map(|p| p.items.len()).sum();
    assert_eq!(extents as u64, h.map_extents, "map_extents");
    assert!(
        h.map_height >= 2 && leaves.len() >= 4,
        "the reference tree is too small: height {}, {} leaves",
        h.map_height,
        leaves.len()
    );
    // The leaves' ranges tile the whole space of virtual blocks.
    let mut ranges: Vec<(u64, u64)> = leaves.iter().map(|p| (p.lo, p.hi)).collect();
    ranges.sort_unstable();
    assert_eq!(ranges.first().map(|r| r.0), Some(0));
    assert_eq!(ranges.last().map(|r| r.1), Some(1 << 40));
    assert!(ranges.windows(2).all(|w| w[0].1 == w[1].0), "{ranges:x?}");
    assert!(
        r.records.len() >= 10,
        "only {} journal records after the tree",
        r.records.len()
    );
    // The tree, then the records over it in order.
    let mut map: BTreeMap<u64, Kind> = BTreeMap::new();
    let set = |item: (u64, u64), map: &mut BTreeMap<u64, Kind>| {
        let (start, len, kind) = extent(item);
        assert!(
            len <= 64,
            "an extent of {len} blocks in a disk of single blocks"
        );
        for i in 0..len {
            match kind {
                Kind::Data(host) => map.insert(start + i, Kind::Data(host + i)),
                Kind::Zero => map.insert(start + i, Kind::Zero),
                Kind::Unmapped => map.remove(&(start + i)),
            };
        }
    };
    for p in &leaves {
        for &item in &p.items {
            set(item, &mut map);
        }
    }
    for rec in &r.records {
        for &item in &rec.items {
            set(item, &mut map);
        }
    }
    let mut end = (h.journal_offset + h.journal_capacity).max(2 * BLOCK);
    for p in &r.pages {
        end = end.max(p.offset + BLOCK);
    }
    for (&v, kind) in &map {
        let expected = r.blocks.get(&v).unwrap_or_else(|| {
            panic!("the map holds virtual block {v:#x}, which was never written")
        });
        match *kind {
            Kind::Data(host) => {
                let at = (host * BLOCK) as usize;
                assert_eq!(
                    &r.bytes[at..at + BLOCK as usize],
                    &expected[..],
                    "virtual block {v:#x} at host block {host:#x}"
                );
                end = end.max((host + 1) * BLOCK);
            }
            Kind::Zero | Kind::Unmapped => {
                assert!(expected.iter().all(|&b| b == 0), "virtual block {v:#x}")
            }
        }
    }
    for (v, data) in &r.blocks {
        if data.iter().any(|&b| b != 0) {
            assert!(
                matches!(map.get(v), Some(Kind::Data(_))),
                "virtual block {v:#x} was written but the map does not hold it"
            );
        }
    }
    end
}

fn reference() -> &'static Reference {
    static REFERENCE: OnceLock<Reference> = OnceLock::new();
    REFERENCE.get_or_init(|| build(2026))
}

/// The same recipe again: the same layout, another image_id.
fn other_image() -> &'static Reference {
    static OTHER: OnceLock<Reference> = OnceLock::new();
    OTHER.get_or_init(|| build(2026))
}

// ---------------------------------------------------------------------------------------
// The rule for a damaged image.

#[derive(Clone, Copy, PartialEq)]
enum Expect {
    /// Every read that succeeds returns what was written; `check` reports corruption.
    Detected,
    /// Every read that succeeds returns what was written; nothing is damaged.
    Intact,
    /// Damage a checksum cannot see (fixed up): reads may return anything, but cleanly, and
    /// `check` reports corruption whenever an open or a read fails.
    Anything,
}

#[track_caller]
fn assert_names_file_and_offset(message: &str, what: &str) {
    assert!(
        message.contains(NAME),
        "{what}: the error does not name the file: {message}"
    );
    assert!(
        message.contains("offset"),
        "{what}: the error gives no offset: {message}"
    );
}

/// Opens `bytes` read-only and reads everything written; then runs `check` on them as a
/// file. Returns whether the open or a read failed.
fn examine(bytes: &[u8], r: &Reference, dir: &Path, what: &str, expect: Expect) -> bool {
    LARGEST.store(0, Ordering::Relaxed);
    let started = Instant::now();
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let storage: Arc<dyn Storage> = Arc::new(MemStorage::new(bytes.to_vec()));
        let mut failed = false;
        match Image::open_storage(storage, Path::new(NAME), true) {
            Err(e) => {
                let message = e.to_string();
                assert!(
                    message.contains(NAME) && message.contains("0x"),
                    "{what}: the open's error does not name the file and an offset: {message}"
                );
                failed = true;
            }
            Ok(image) => {
                assert_eq!(image.version(), 2, "{what}");
                if let Err(e) = image.map() {
                    assert_names_file_and_offset(&e.to_string(), what);
                    failed = true;
                }
                let mut buf = vec![0u8; BLOCK as usize];
                for (&v, expected) in &r.blocks {
                    match image.read_at(&mut buf, v * BLOCK) {
                        Err(e) => {
                            assert_names_file_and_offset(&e.to_string(), what);
                            failed = true;
                        }
                        Ok(()) if expect != Expect::Anything => assert!(
                            buf == *expected,
                            "{what}: virtual block {v:#x} reads other bytes than were written"
                        ),
                        Ok(()) => {}
                    }
                }
            }
        }
        let path = dir.join(NAME);
        write_sparse(&path, bytes);
        match ops::check(&path, false) {
            Ok(report) => {
                let corrupt = !report.corruptions.is_empty();
                match expect {
                    Expect::Detected => assert!(corrupt, "{what}: check finds nothing wrong"),
                    Expect::Intact => assert!(
                        !corrupt,
                        "{what}: check reports corruption: {:?}",
                        report.corruptions
                    ),
                    Expect::Anything => assert!(
                        corrupt || !failed,
                        "{what}: the image fails to open or read but check finds nothing wrong"
                    ),
                }
                for c in &report.corruptions {
                    assert!(c.contains(NAME), "{what}: check's report {c}");
                }
            }
            Err(e) => assert!(
                e.to_string().contains(NAME),
                "{what}: check's error does not name the file: {e}"
            ),
        }
        failed
    }));
    let failed = match outcome {
        Ok(failed) => failed,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            if message.starts_with(what) {
                // One of the assertions above, which names its case already.
                std::panic::resume_unwind(panic);
            }
            panic!("{what}: panicked: {message}");
        }
    };
    assert!(
        started.elapsed() < CASE_BOUND,
        "{what}: took {:?}",
        started.elapsed()
    );
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest <= ALLOCATION_BOUND,
        "{what}: an allocation of {largest} bytes"
    );
    if expect == Expect::Intact {
        assert!(!failed, "{what}: an intact image failed to open or read");
    }
    failed
}

fn tempdir() -> tempfile::TempDir {
    lib_support::scratch_dir()
}

// ---------------------------------------------------------------------------------------
// The tests.

#[test]
fn the_intact_reference_image_reads_what_was_written_and_checks_clean() {
    let r = reference();
    let dir = tempdir();
    examine(&r.bytes, r, dir.path(), "the intact image", Expect::Intact);
    // Nothing it no longer needs is left behind: every block freed was punched.
    let path = dir.path().join(NAME);
    let report = ops::check(&path, false).expect("check");
    assert_eq!(report.leaks, 0, "leaked blocks in the reference image");
}

#[test]
fn a_cut_at_every_page_and_inside_the_journal_is_refused_or_fails_its_reads_cleanly() {
    let r = reference();
    let h = &r.header;
    let len = r.bytes.len() as u64;
    let mut points = vec![0, 1, 4095, 4096, 4097, 8191, 8192, 8193];
    for p in &r.pages {
        points.extend([
            p.offset,
            p.offset + 1,
            p.offset + 0x20,
            p.offset + BLOCK - 1,
        ]);
    }
    let journal_end = h.journal_offset + h.journal_capacity;
    points.extend([h.journal_offset, h.journal_offset + 1, journal_end - 1]);
    for rec in &r.records {
        points.extend([
            rec.offset,
            rec.offset + 1,
            rec.offset + 40,
            rec.offset + rec.len - 1,
        ]);
    }
    // Some data blocks, and whatever lies past the last referenced byte.
    let mut rng = StdRng::seed_from_u64(5);
    points.extend((0..24).map(|_| rng.gen_range(0..len) / BLOCK * BLOCK));
    points.extend([r.referenced_end - 1, r.referenced_end]);
    points.retain(|&p| p < len);
    points.sort_unstable();
    points.dedup();
    let dir = tempdir();
    let mut refused = 0;
    for p in points {
        let expect = if p < r.referenced_end {
            Expect::Detected
        } else {
            Expect::Intact
        };
        let what = format!("cut at {p:#x} of {len:#x}");
        refused += usize::from(examine(
            &r.bytes[..p as usize],
            r,
            dir.path(),
            &what,
            expect,
        ));
    }
    assert!(
        refused > 2 * r.pages.len(),
        "only {refused} cuts were noticed"
    );
}

/// The byte offsets in a page worth damaging: every header field and the first, a middle
/// and the last item, and the padding after them.
fn page_fields(p: &Page) -> Vec<(usize, &'static str)> {
    let n = p.items.len();
    let mut at = vec![
        (0x00, "magic"),
        (0x05, "crc"),
        (0x08, "image_id"),
        (0x0f, "image_id"),
        (0x10, "generation"),
        (0x17, "generation"),
        (0x18, "level"),
        (0x19, "reserved"),
        (0x1a, "count"),
        (0x1b, "count"),
        (0x1d, "reserved"),
        (0x20, "first item, first word"),
        (0x24, "first item, first word"),
        (0x28, "first item, second word"),
        (0x2e, "first item, second word"),
        (0x2f, "first item, second word"),
        (0x20 + 16 * (n / 2) + 5, "middle item"),
        (0x20 + 16 * (n / 2) + 13, "middle item"),
        (0x20 + 16 * (n - 1) + 1, "last item"),
        (0x20 + 16 * (n - 1) + 8, "last item"),
        (0xfff, "padding"),
    ];
    if 0x20 + 16 * n < 0x1000 {
        at.push((0x20 + 16 * n, "padding after the items"));
    }
    at
}

#[test]
fn a_flipped_bit_anywhere_in_any_page_is_refused_and_the_rest_still_reads() {
    let r = reference();
    let dir = tempdir();
    let mut rng = StdRng::seed_from_u64(9);
    for p in &r.pages {
        for (field_at, field) in page_fields(p) {
            let mut bytes = r.bytes.clone();
            let bit = rng.gen_range(0..8);
            bytes[p.offset as usize + field_at] ^= 1 << bit;
            let what = format!(
                "bit {bit} of byte {field_at:#x} ({field}) flipped in the level-{} page at {:#x}",
                p.level, p.offset
            );
            assert!(
                examine(&bytes, r, dir.path(), &what, Expect::Detected),
                "{what}: nothing noticed"
            );
        }
    }
}

#[test]
fn a_flipped_bit_behind_a_fixed_up_checksum_is_refused_or_read_cleanly() {
    let r = reference();
    let dir = tempdir();
    let mut rng = StdRng::seed_from_u64(10);
    for p in &r.pages {
        for (field_at, field) in page_fields(p) {
            if field_at < 0x08 {
                continue;
            }
            for _ in 0..2 {
                let mut bytes = r.bytes.clone();
                let page = &mut bytes[p.offset as usize..(p.offset + BLOCK) as usize];
                let bit = rng.gen_range(0..8);
                page[field_at] ^= 1 << bit;
                fix_page_crc(page);
                // Header fields are all checked; items may change into other valid items.
                let expect = match field {
                    "image_id"
                    | "level"
                    | "reserved"
                    | "count"
                    | "padding"
                    | "padding after the items" => Expect::Detected,
                    // A generation made larger than the header's.
                    "generation"
                        if p.generation ^ (1 << (8 * (field_at - 0x10) + bit))
                            > r.header.generation =>
                    {
                        Expect::Detected
                    }
                    _ => Expect::Anything,
                };
                let what = format!(
                    "bit {bit} of byte {field_at:#x} ({field}) flipped in the level-{} page at {:#x}, checksum fixed",
                    p.level, p.offset
                );
                let noticed = examine(&bytes, r, dir.path(), &what, expect);
                assert!(
                    noticed || expect != Expect::Detected,
                    "{what}: nothing noticed"
                );
            }
        }
    }
}

/// The reference bytes with `page` rewritten by `change` (its checksum fixed up).
fn with_page(r: &Reference, offset: u64, change: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let mut bytes = r.bytes.clone();
    let page = &mut bytes[offset as usize..(offset + BLOCK) as usize];
    change(page);
    fix_page_crc(page);
    bytes
}

fn root(r: &Reference) -> &Page {
    r.pages
        .iter()
        .find(|p| p.offset == r.header.map_root)
        .expect("the root page")
}

/// Refused: the open fails or some read does, naming the file and an offset; check agrees.
#[track_caller]
fn assert_refused(bytes: &[u8], r: &Reference, what: &str) {
    let dir = tempdir();
    assert!(
        examine(bytes, r, dir.path(), what, Expect::Detected),
        "{what}: accepted"
    );
}

#[test]
fn a_page_that_points_at_itself_is_refused() {
    let r = reference();
    let root = root(r);
    assert!(root.level >= 1 && root.items.len() >= 2, "{root:?}");
    for i in [0, root.items.len() - 1] {
        let bytes = with_page(r, root.offset, |p| put64(p, 0x28 + 16 * i, root.offset));
        assert_refused(&bytes, r, &format!("child {i} of the root is the root"));
    }
    // The first child replaced by the last: a leaf reached twice, once outside its range.
    let (_, last) = root.items[root.items.len() - 1];
    let bytes = with_page(r, root.offset, |p| put64(p, 0x28, last));
    assert_refused(&bytes, r, "the root's first child is its last one");
}

/// The reference with one more level: a new root at the end of the file whose only child
/// is the old root, and the current header slot pointing at it.
fn with_new_root(r: &Reference, change_old_root: impl FnOnce(&mut [u8], u64)) -> Vec<u8> {
    let mut bytes = r.bytes.clone();
    let new_root = (bytes.len() as u64).next_multiple_of(BLOCK);
    let old = r.header.map_root;
    let mut page = vec![0u8; BLOCK as usize];
    page[0..4].copy_from_slice(b"CIMP");
    put64(&mut page, 0x08, r.header.image_id);
    put64(&mut page, 0x10, r.header.generation);
    page[0x18] = r.header.map_height;
    page[0x1a..0x1c].copy_from_slice(&1u16.to_le_bytes());
    put64(&mut page, 0x20, 0);
    put64(&mut page, 0x28, old);
    fix_page_crc(&mut page);
    bytes.resize(new_root as usize, 0);
    bytes.extend_from_slice(&page);
    let slot_at = r.active_slot * BLOCK as usize;
    let slot = &mut bytes[slot_at..slot_at + BLOCK as usize];
    put64(slot, 0x38, new_root);
    slot[0x48] = r.header.map_height + 1;
    fix_slot_crc(slot);
    let old_page = &mut bytes[old as usize..(old + BLOCK) as usize];
    change_old_root(old_page, new_root);
    fix_page_crc(old_page);
    bytes
}

#[test]
fn a_tree_one_level_taller_reads_the_same_and_a_cycle_through_its_root_is_refused() {
    let r = reference();
    // The slot checksum is where FORMAT.md says.
    let slot_at = r.active_slot * BLOCK as usize;
    let mut slot = r.bytes[slot_at..slot_at + BLOCK as usize].to_vec();
    fix_slot_crc(&mut slot);
    assert_eq!(slot, &r.bytes[slot_at..slot_at + BLOCK as usize]);
    // A valid taller tree, built by hand: the format is understood here.
    let taller = with_new_root(r, |_, _| {});
    let dir = tempdir();
    examine(
        &taller,
        r,
        dir.path(),
        "a tree one level taller",
        Expect::Intact,
    );
    // A child of the old root pointing back at the new root: a cycle of two pages.
    let n = root(r).items.len();
    for i in [0, n / 2, n - 1] {
        let cycle = with_new_root(r, |p, new_root| put64(p, 0x28 + 16 * i, new_root));
        assert_refused(
            &cycle,
            r,
            &format!("child {i} of the old root points at the new root"),
        );
    }
    let own = with_new_root(r, |p, _| put64(p, 0x28, r.header.map_root));
    assert_refused(&own, r, "the old root under the new one points at itself");
}

#[test]
fn a_page_copied_from_another_image_is_refused() {
    let r = reference();
    let other = other_image();
    assert_ne!(r.header.image_id, other.header.image_id);
    for p in [
        root(r),
        r.pages.iter().find(|p| p.level == 0).expect("a leaf"),
    ] {
        let theirs = other
            .pages
            .iter()
            .find(|q| q.offset == p.offset && q.level == p.level)
            .expect("the same recipe places the same pages");
        let mut bytes = r.bytes.clone();
        let at = p.offset as usize;
        bytes[at..at + BLOCK as usize].copy_from_slice(&other.bytes[at..at + BLOCK as usize]);
        assert_ne!(theirs.items.len(), 0);
        assert_refused(
            &bytes,
            r,
            &format!(
                "the level-{} page at {:#x} copied from another image",
                p.level, p.offset
            ),
        );
    }
}

#[test]
fn a_page_newer_than_its_header_is_refused() {
    let r = reference();
    for p in [
        root(r),
        r.pages.iter().rfind(|p| p.level == 0).expect("a leaf"),
    ] {
        assert!(p.generation <= r.header.generation);
        let bytes = with_page(r, p.offset, |page| {
            put64(page, 0x10, r.header.generation + 1)
        });
        assert_refused(
            &bytes,
            r,
            &format!(
                "the level-{} page at {:#x} is one generation too new",
                p.level, p.offset
            ),
        );
    }
}

/// A change to a page's bytes.
type PageChange = Box<dyn Fn(&mut [u8])>;

#[test]
fn a_page_whose_items_or_count_break_the_format_is_refused() {
    let r = reference();
    let leaf = r
        .pages
        .iter()
        .find(|p| p.level == 0 && p.items.len() >= 3)
        .expect("a leaf");
    let inner = r
        .pages
        .iter()
        .find(|p| p.level == 1)
        .expect("an internal page");
    let (a0, b0) = leaf.items[0];
    let (a1, _) = leaf.items[1];
    let cases: Vec<(&str, u64, PageChange)> = vec![
        (
            "two extents out of order",
            leaf.offset,
            Box::new(move |p| {
                put64(p, 0x20, a1);
                put64(p, 0x30, a0);
            }),
        ),
        (
            "an extent reaching into the next one",
            leaf.offset,
            Box::new(move |p| {
                let start = a0 & ((1 << 40) - 1);
                let next = a1 & ((1 << 40) - 1);
                put64(p, 0x20, start | (next - start) << 40);
            }),
        ),
        (
            "an extent of kind 3 (unmapped) in a leaf",
            leaf.offset,
            Box::new(move |p| put64(p, 0x28, 3 << 56)),
        ),
        (
            "an extent of kind 0",
            leaf.offset,
            Box::new(move |p| put64(p, 0x28, b0 & ((1 << 48) - 1))),
        ),
        (
            "data in host block 1 (a header slot)",
            leaf.offset,
            Box::new(|p| put64(p, 0x28, 1 | 1 << 56)),
        ),
        (
            "data far past the end of the file",
            leaf.offset,
            Box::new(|p| put64(p, 0x28, (1 << 47) | 1 << 56)),
        ),
        (
            "an extent past the virtual size",
            leaf.offset,
            Box::new(move |p| {
                let last = 0x20 + 16 * (leaf.items.len() - 1);
                put64(p, last, (SIZE / BLOCK - 1) | 5 << 40);
            }),
        ),
        (
            "a second key no later than the first",
            inner.offset,
            Box::new(move |p| put64(p, 0x30, inner.lo)),
        ),
        (
            "a child that is not a block",
            inner.offset,
            Box::new(|p| put64(p, 0x28, 0x2001)),
        ),
        (
            "a child in the header slots",
            inner.offset,
            Box::new(|p| put64(p, 0x28, 0x1000)),
        ),
        (
            "a child past the end of the file",
            inner.offset,
            Box::new(|p| put64(p, 0x28, 1 << 50)),
        ),
        (
            "a count of 255",
            leaf.offset,
            Box::new(|p| p[0x1a..0x1c].copy_from_slice(&255u16.to_le_bytes())),
        ),
        (
            "a count of 0",
            leaf.offset,
            Box::new(|p| p[0x1a..0x1c].copy_from_slice(&0u16.to_le_bytes())),
        ),
        (
            "a count of 65535",
            inner.offset,
            Box::new(|p| p[0x1a..0x1c].copy_from_slice(&u16::MAX.to_le_bytes())),
        ),
    ];
    for (what, offset, change) in cases {
        let bytes = with_page(r, offset, |p| change(p));
        assert_refused(&bytes, r, what);
    }
}

#[test]
fn a_journal_record_damaged_in_the_middle_with_valid_records_after_it_is_refused() {
    let r = reference();
    let n = r.records.len();
    for (i, at_in_record, what) in [
        (n / 2, 0x28 + 3, "an item of a record in the middle"),
        (1, 0x00, "the magic of the second record"),
        (n / 2, 0x10, "the sequence of a record in the middle"),
        // The last record is the seal the close wrote; the one before it holds data.
        (n - 2, 0x05, "the checksum of the last record with data"),
    ] {
        let rec = &r.records[i];
        let mut bytes = r.bytes.clone();
        bytes[rec.offset as usize + at_in_record] ^= 0x10;
        let err = match Image::open_storage(
            Arc::new(MemStorage::new(bytes.clone())),
            Path::new(NAME),
            true,
        ) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{what}: a journal damaged in the middle was accepted"),
        };
        assert!(
            err.contains(NAME)
                && err.contains("follows a damaged or missing record")
                && err.contains(&format!("{:#x}", rec.offset)),
            "{what}: not refused as damage in the middle: {err}"
        );
        let dir = tempdir();
        examine(&bytes, r, dir.path(), what, Expect::Detected);
    }
}

#[test]
fn a_damaged_last_record_is_a_torn_tail_and_the_image_reads_as_before_it() {
    let r = reference();
    let last = r.records.last().expect("records");
    assert!(last.items.is_empty(), "the last record is the close's seal");
    let mut bytes = r.bytes.clone();
    bytes[last.offset as usize + 0x05] ^= 0x01;
    let dir = tempdir();
    examine(&bytes, r, dir.path(), "a torn seal", Expect::Intact);
}
