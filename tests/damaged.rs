//! Damaged images: truncations at every metadata boundary, every header field changed one at
//! a time (against a golden header), random bit flips in metadata, huge sizes with valid
//! checksums, seeded mutations through the fuzz target's body, the golden fixture image, and
//! file locking. Each damaged image must be refused with a clean error that names the file
//! (and an offset), or open and read a state the image really had; never panic, never
//! allocate by what the file claims.
mod lib_support;

use cowimg::format::{
    BackingFormat, FormatError, Header, JournalRecordHeader, JOURNAL_RECORD_HEADER_SIZE,
};
use cowimg::image::{ops, CreateOptions, Image, OpenOptions};
use cowimg::storage::{MemStorage, Storage};
use cowimg::Error;
use lib_support::fixtures::{
    v1_basic_recipe as fixture_recipe, V1_BASIC as FIXTURE, V1_BASIC_CLUSTER as FIXTURE_CLUSTER,
    V1_BASIC_SIZE as FIXTURE_SIZE,
};
use lib_support::fuzz_body::exercise_image_bytes;
use lib_support::{assert_same_bytes, fingerprint, fresh_image_bytes, read_all, Change};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, OnceLock};

const NAME: &str = "damaged.cow";

/// A real image with data, a checkpoint and journal records after it, and every state it was
/// ever flushed in.
struct Reference {
    bytes: Vec<u8>,
    states: HashSet<u64>,
    content: Vec<u8>,
    header: Header,
    /// (offset, padded length) of each journal record of the current epoch.
    records: Vec<(u64, u64)>,
}

fn reference() -> &'static Reference {
    static REFERENCE: OnceLock<Reference> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let (size, cluster) = (512 * 1024u64, 16 * 1024u64);
        let storage = Arc::new(MemStorage::new(fresh_image_bytes(size, cluster)));
        let dynamic: Arc<dyn Storage> = storage.clone();
        let image = Image::open_storage(dynamic, Path::new(NAME), false)
            .expect("opening the reference image");
        let mut rng = StdRng::seed_from_u64(77);
        let mut model = vec![0u8; size as usize];
        let mut states = HashSet::from([fingerprint(&model)]);
        // A journal holds 256 one-block records: this crosses one checkpoint and leaves
        // records after it.
        for _ in 0..290 {
            for _ in 0..rng.gen_range(1..=2) {
                let change = Change::random(&mut rng, size, cluster);
                change.apply_to_image(&image).expect("reference change");
                change.apply_to_model(&mut model);
            }
            image.flush().expect("reference flush");
            states.insert(fingerprint(&model));
        }
        let header = image.header();
        assert!(
            header.generation >= 2 && header.checkpoint_entries > 0,
            "the reference image has no checkpoint: {header:?}"
        );
        drop(image);
        let bytes = storage.contents();
        let records = journal_records(&bytes, &header);
        assert!(
            records.len() >= 10,
            "the reference image has only {} journal records",
            records.len()
        );
        Reference {
            bytes,
            states,
            content: model,
            header,
            records,
        }
    })
}

/// Walks the journal the way replay does, without checking bodies.
fn journal_records(bytes: &[u8], h: &Header) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let (mut tail, mut seq) = (0u64, 1u64);
    loop {
        let at = (h.journal_offset + tail) as usize;
        let Some(raw) = bytes.get(at..at + JOURNAL_RECORD_HEADER_SIZE) else {
            break;
        };
        let Some(rec) =
            JournalRecordHeader::parse(raw.try_into().expect("header size"), h.journal_epoch, seq)
        else {
            break;
        };
        let len = JournalRecordHeader::padded_len(rec.item_count as u64);
        out.push((at as u64, len));
        tail += len;
        seq += 1;
    }
    out
}

fn open_bytes(bytes: &[u8]) -> cowimg::Result<Image> {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new(bytes.to_vec()));
    Image::open_storage(storage, Path::new(NAME), true)
}

/// The rule for damaged images: a clean refusal naming the file and an offset, or an image
/// that reads (or cleanly fails to read) a state it was really flushed in. `check` agrees.
#[track_caller]
fn assert_refused_or_a_flushed_state(bytes: &[u8], states: &HashSet<u64>, what: &str) {
    let refused = match open_bytes(bytes) {
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.contains(NAME),
                "{what}: the error does not name the file: {message}"
            );
            assert!(
                message.contains("0x"),
                "{what}: the error gives no offset: {message}"
            );
            true
        }
        Ok(image) => {
            let mut buf = vec![0u8; image.virtual_size() as usize];
            match image.read_at(&mut buf, 0) {
                Err(e) => assert!(
                    e.to_string().contains(NAME),
                    "{what}: the read error does not name the file: {e}"
                ),
                Ok(()) => assert!(
                    states.contains(&fingerprint(&buf)),
                    "{what}: the image opens and reads a state it never had"
                ),
            }
            false
        }
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(NAME);
    std::fs::write(&path, bytes).expect("writing the damaged image");
    match ops::check(&path, false) {
        Ok(report) => {
            if refused {
                assert!(
                    !report.corruptions.is_empty(),
                    "{what}: open refuses the image but check finds nothing wrong"
                );
            }
        }
        Err(e) => assert!(
            e.to_string().contains(NAME),
            "{what}: check's error does not name the file: {e}"
        ),
    }
}

/// Two clusters written and flushed, then the image closed (which seals the journal): the
/// bytes, and the offset of the one record that maps both clusters.
fn two_cluster_image() -> (Vec<u8>, Header, u64) {
    let storage = Arc::new(MemStorage::new(fresh_image_bytes(256 * 1024, 64 * 1024)));
    let dynamic: Arc<dyn Storage> = storage.clone();
    let image = Image::open_storage(dynamic, Path::new(NAME), false).expect("opening");
    image.write_at(&[1u8; 4096], 0).expect("writing cluster 0");
    image
        .write_at(&[2u8; 4096], 64 * 1024)
        .expect("writing cluster 1");
    image.flush().expect("flushing");
    let header = image.header();
    drop(image);
    let bytes = storage.contents();
    let records = journal_records(&bytes, &header);
    assert!(
        records.len() >= 2,
        "expected a record and its seal: {records:?}"
    );
    (bytes, header, records[0].0)
}

#[test]
fn two_entries_claiming_one_host_cluster_are_refused_naming_both() {
    let (mut bytes, h, at) = two_cluster_image();
    let at = at as usize;
    let mut raw = [0u8; JOURNAL_RECORD_HEADER_SIZE];
    raw.copy_from_slice(&bytes[at..at + JOURNAL_RECORD_HEADER_SIZE]);
    let rec = JournalRecordHeader::parse(&raw, h.journal_epoch, 1).expect("the first record");
    assert_eq!(rec.item_count, 2, "one item per written cluster");
    let body_at = at + JOURNAL_RECORD_HEADER_SIZE;
    let body_len = JournalRecordHeader::body_len(2) as usize;
    let (mut items, written) = rec.split_body(&bytes[body_at..body_at + body_len]);
    // Virtual cluster 1's slot A now claims virtual cluster 0's host cluster.
    let host_of_first: [u8; 8] = items[0x08..0x10].try_into().expect("8 bytes");
    items[48 + 0x08..48 + 0x10].copy_from_slice(&host_of_first);
    let record = JournalRecordHeader::encode(h.journal_epoch, 1, &items, &written, rec.data_digest);
    bytes[at..at + record.len()].copy_from_slice(&record);
    let message = match open_bytes(&bytes) {
        Ok(_) => panic!("an image whose clusters share a host cluster opened"),
        Err(e) => e.to_string(),
    };
    assert!(
        message.contains(
            "claimed by both slot A of virtual cluster 0 and slot A of virtual cluster 1"
        ),
        "{message}"
    );
    assert!(message.contains(NAME), "{message}");
}

#[test]
fn truncation_at_every_metadata_boundary_is_refused_or_reads_a_flushed_state() {
    let r = reference();
    let h = &r.header;
    let cs = h.geometry().cluster_size();
    let len = r.bytes.len() as u64;
    let mut points = vec![0, 1, 511, 512, 4095, 4096, 4097, 8191, 8192, 8193];
    let ckpt_end = h.checkpoint_offset + h.checkpoint_entries * 48;
    for p in [h.checkpoint_offset, ckpt_end, h.journal_offset] {
        points.extend([p.saturating_sub(cs), p - 1, p, p + 1, p + 48, p + cs]);
    }
    for &(at, l) in &r.records {
        points.extend([
            at,
            at + 1,
            at + JOURNAL_RECORD_HEADER_SIZE as u64 - 1,
            at + JOURNAL_RECORD_HEADER_SIZE as u64,
            at + 48,
            at + l - 1,
        ]);
    }
    // Every cluster boundary of the file, and a few points inside data.
    points.extend((1..len.div_ceil(cs)).map(|c| c * cs));
    let mut rng = StdRng::seed_from_u64(3);
    points.extend((0..40).map(|_| rng.gen_range(0..len)));
    points.retain(|&p| p < len);
    points.sort_unstable();
    points.dedup();
    for p in points {
        assert_refused_or_a_flushed_state(
            &r.bytes[..p as usize],
            &r.states,
            &format!("truncated to {p:#x} of {len:#x}"),
        );
    }
}

#[test]
fn random_bit_flips_in_metadata_are_refused_or_read_a_flushed_state() {
    let r = reference();
    let h = &r.header;
    let journal_used = r.records.last().map_or(h.journal_offset, |&(at, l)| at + l);
    let regions = [
        (0, 4096),
        (4096, 8192),
        (
            h.checkpoint_offset,
            h.checkpoint_offset + h.checkpoint_entries * 48,
        ),
        (h.journal_offset, journal_used),
    ];
    let mut rng = StdRng::seed_from_u64(11);
    for i in 0..240 {
        let (start, end) = regions[i % regions.len()];
        let mut bytes = r.bytes.clone();
        let flips = if i % 5 == 0 { rng.gen_range(2..8) } else { 1 };
        let mut at = Vec::new();
        for _ in 0..flips {
            let byte = rng.gen_range(start..end) as usize;
            let bit = rng.gen_range(0..8);
            bytes[byte] ^= 1 << bit;
            at.push((byte, bit));
        }
        assert_refused_or_a_flushed_state(&bytes, &r.states, &format!("bits flipped at {at:x?}"));
    }
}

#[test]
fn a_damaged_record_before_the_last_is_corruption_not_a_torn_tail() {
    let r = reference();
    let &(at, _) = r.records.first().expect("records");
    let mut bytes = r.bytes.clone();
    // A byte of the first record's items: its checksum fails while later records are intact.
    bytes[at as usize + JOURNAL_RECORD_HEADER_SIZE + 3] ^= 0x40;
    let err = open_bytes(&bytes)
        .err()
        .expect("a damaged record in the middle of the journal was accepted");
    assert!(
        matches!(err, Error::Inconsistent { .. }),
        "unexpected error: {err}"
    );
    assert!(
        err.to_string().contains(&format!("{at:#x}")),
        "the error does not point at the record: {err}"
    );
}

#[test]
fn two_damaged_records_in_a_row_are_still_corruption_not_a_torn_tail() {
    let r = reference();
    let mut bytes = r.bytes.clone();
    // Records 2 and 3 lose their headers; records 4 onwards are intact and must not be
    // skipped silently (nor revived by the next record written after record 1).
    for &(at, _) in &r.records[1..3] {
        bytes[at as usize..at as usize + JOURNAL_RECORD_HEADER_SIZE].fill(0);
    }
    let err = open_bytes(&bytes)
        .err()
        .expect("a journal with a hole of two records was accepted");
    assert!(err.to_string().contains(NAME), "{err}");
}

#[test]
fn the_intact_reference_image_reads_its_last_state() {
    let r = reference();
    let image = open_bytes(&r.bytes).expect("opening the reference image");
    assert_same_bytes(&read_all(&image), &r.content, "reference image");
}

// ---------------------------------------------------------------------------------------
// The golden header: a version-1 header slot spelled out field by field. Change one field,
// fix up the CRC, expect one specific error.

/// Bytes 0x000..0x088 of the slot `Image::create` writes for a 1 MiB image with 64 KiB
/// clusters over the raw file "base.raw". The rest of the slot is zero up to the CRC.
#[rustfmt::skip]
const GOLDEN_HEADER: [u8; 0x88] = [
    // 0x000 magic "\x89COWIMG\n"
    0x89, b'C', b'O', b'W', b'I', b'M', b'G', b'\n',
    // 0x008 version: 1
    0x01, 0x00, 0x00, 0x00,
    // 0x00c header_size: 4096
    0x00, 0x10, 0x00, 0x00,
    // 0x010 incompatible_features: none
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    // 0x018 compatible_features: none
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    // 0x020 generation: 1 (a new image)
    0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    // 0x028 cluster_bits: 16 (64 KiB clusters, 4 KiB units)
    0x10,
    // 0x029 backing_format: 1 (raw)
    0x01,
    // 0x02a backing_path_len: 8
    0x08, 0x00,
    // 0x02c reserved
    0x00, 0x00, 0x00, 0x00,
    // 0x030 virtual_size: 0x100000 (1 MiB)
    0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00,
    // 0x038 checkpoint_offset: 0 (empty map)
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    // 0x040 checkpoint_entries: 0
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    // 0x048 checkpoint_crc: 0
    0x00, 0x00, 0x00, 0x00,
    // 0x04c reserved
    0x00, 0x00, 0x00, 0x00,
    // 0x050 journal_offset: 0x10000 (host cluster 1, right after the header slots)
    0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00,
    // 0x058 journal_capacity: 0x100000 (1 MiB, the minimum)
    0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00,
    // 0x060 journal_epoch: 1
    0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    // 0x068 reserved (24 bytes)
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    // 0x080 backing_path: "base.raw"
    b'b', b'a', b's', b'e', b'.', b'r', b'a', b'w',
];

/// Fixes up the slot's CRC32 (bytes 0xffc..0x1000, over 0x000..0xffc).
fn fix_crc(slot: &mut [u8]) {
    let crc = crc32fast::hash(&slot[..0xffc]);
    slot[0xffc..0x1000].copy_from_slice(&crc.to_le_bytes());
}

/// A hand-built image: `slot` as slot A, an empty slot B, and the file as long as the
/// slot's journal region (writers keep it at least that long), capped at 8 MiB.
fn image_from_slot(slot: &[u8]) -> Vec<u8> {
    let field = |at: usize| u64::from_le_bytes(slot[at..at + 8].try_into().expect("8 bytes"));
    let journal_end = field(0x50).saturating_add(field(0x58)).min(8 << 20);
    let mut bytes = slot.to_vec();
    bytes.resize((journal_end as usize).max(8192), 0);
    bytes
}

fn golden_slot() -> Vec<u8> {
    let mut slot = vec![0u8; 4096];
    slot[..GOLDEN_HEADER.len()].copy_from_slice(&GOLDEN_HEADER);
    fix_crc(&mut slot);
    slot
}

fn golden_fields() -> Header {
    Header {
        generation: 1,
        compatible_features: 0,
        cluster_bits: 16,
        backing: Some(("base.raw".into(), BackingFormat::Raw)),
        virtual_size: 1 << 20,
        checkpoint_offset: 0,
        checkpoint_entries: 0,
        checkpoint_crc: 0,
        journal_offset: 0x10000,
        journal_capacity: 1 << 20,
        journal_epoch: 1,
    }
}

#[test]
fn golden_header_decodes_field_by_field_and_is_what_create_writes() {
    assert_eq!(Header::from_bytes(&golden_slot()), Ok(golden_fields()));
    assert_eq!(
        golden_fields().to_bytes().to_vec(),
        golden_slot(),
        "encoding changed"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("new.cow");
    let opts = CreateOptions {
        size: Some(1 << 20),
        cluster_size: 1 << 16,
        backing: Some(("base.raw".into(), BackingFormat::Raw)),
        ..Default::default()
    };
    Image::create(&path, &opts).expect("create");
    let written = std::fs::read(&path).expect("reading the new image");
    // The journal epoch is random (no guest can predict it); every other byte is golden.
    let epoch = Header::from_bytes(&written[..4096])
        .expect("slot A decodes")
        .journal_epoch;
    let expected = Header {
        journal_epoch: epoch,
        ..golden_fields()
    }
    .to_bytes();
    assert_same_bytes(&written[..4096], &expected, "slot A of a new image");
    assert!(
        written[4096..8192].iter().all(|&b| b == 0),
        "slot B of a new image is not empty"
    );
    let other = dir.path().join("other.cow");
    Image::create(&other, &opts).expect("create");
    let other_epoch = Header::from_bytes(&std::fs::read(&other).expect("reading")[..4096])
        .expect("decodes")
        .journal_epoch;
    assert_ne!(
        epoch, other_epoch,
        "two new images got the same journal epoch"
    );
}

/// What a changed field must produce.
enum Expect {
    Error(FormatError),
    Field(&'static str, usize),
    Accepted(fn(&Header) -> bool),
}

fn put(slot: &mut [u8], at: usize, bytes: &[u8]) {
    slot[at..at + bytes.len()].copy_from_slice(bytes);
}

/// One change per field, with the error it must give.
/// A change to a header slot's bytes.
type SlotChange = Box<dyn Fn(&mut [u8])>;

fn field_changes() -> Vec<(&'static str, SlotChange, Expect)> {
    vec![
        (
            "magic",
            Box::new(|s| s[1] = b'X'),
            Expect::Error(FormatError::BadMagic),
        ),
        (
            "version 2",
            Box::new(|s| put(s, 0x08, &2u32.to_le_bytes())),
            Expect::Error(FormatError::UnsupportedVersion(2, 1)),
        ),
        (
            "header_size 512",
            Box::new(|s| put(s, 0x0c, &512u32.to_le_bytes())),
            Expect::Field("header_size", 0x0c),
        ),
        (
            "an incompatible feature",
            Box::new(|s| put(s, 0x10, &(1u64 << 9).to_le_bytes())),
            Expect::Error(FormatError::UnknownIncompatibleFeatures(1 << 9)),
        ),
        (
            "a compatible feature",
            Box::new(|s| put(s, 0x18, &(1u64 << 40).to_le_bytes())),
            Expect::Accepted(|h| h.compatible_features == 1 << 40),
        ),
        (
            "generation 7",
            Box::new(|s| put(s, 0x20, &7u64.to_le_bytes())),
            Expect::Accepted(|h| h.generation == 7),
        ),
        (
            "generation u64::MAX",
            Box::new(|s| put(s, 0x20, &u64::MAX.to_le_bytes())),
            Expect::Field("generation", 0x20),
        ),
        (
            "cluster_bits 11",
            Box::new(|s| s[0x28] = 11),
            Expect::Field("cluster_bits", 0x28),
        ),
        (
            "cluster_bits 22",
            Box::new(|s| s[0x28] = 22),
            Expect::Field("cluster_bits", 0x28),
        ),
        (
            "backing_format 3 (qcow2) without incompatible bit 0",
            Box::new(|s| s[0x29] = 3),
            Expect::Field("incompatible_features", 0x10),
        ),
        (
            "backing_format 3 (qcow2) with incompatible bit 0",
            Box::new(|s| {
                s[0x29] = 3;
                put(s, 0x10, &1u64.to_le_bytes());
            }),
            Expect::Accepted(|h| {
                matches!(&h.backing, Some((_, cowimg::format::BackingFormat::Qcow2)))
            }),
        ),
        (
            "incompatible bit 0 with a raw backing file",
            Box::new(|s| put(s, 0x10, &1u64.to_le_bytes())),
            Expect::Field("incompatible_features", 0x10),
        ),
        (
            "backing_format 4",
            Box::new(|s| s[0x29] = 4),
            Expect::Field("backing_format", 0x29),
        ),
        (
            "backing_format none with a path",
            Box::new(|s| s[0x29] = 0),
            Expect::Field("backing_format", 0x29),
        ),
        (
            "backing_format cowimg",
            Box::new(|s| s[0x29] = 2),
            Expect::Accepted(|h| h.backing == Some(("base.raw".into(), BackingFormat::Cowimg))),
        ),
        (
            "backing_path_len 0 with a format",
            Box::new(|s| {
                put(s, 0x2a, &0u16.to_le_bytes());
                s[0x80..0x88].fill(0)
            }),
            Expect::Field("backing_path_len", 0x2a),
        ),
        (
            "backing_path_len 2049",
            Box::new(|s| put(s, 0x2a, &2049u16.to_le_bytes())),
            Expect::Field("backing_path_len", 0x2a),
        ),
        (
            "reserved at 0x2c",
            Box::new(|s| s[0x2d] = 1),
            Expect::Field("reserved", 0x2c),
        ),
        (
            "virtual_size 2^60 + 1",
            Box::new(|s| put(s, 0x30, &((1u64 << 60) + 1).to_le_bytes())),
            Expect::Field("virtual_size", 0x30),
        ),
        (
            "checkpoint_offset unaligned",
            Box::new(|s| {
                put(s, 0x38, &0x20001u64.to_le_bytes());
                put(s, 0x40, &1u64.to_le_bytes())
            }),
            Expect::Field("checkpoint_offset", 0x38),
        ),
        (
            "checkpoint_offset without entries",
            Box::new(|s| put(s, 0x38, &0x20000u64.to_le_bytes())),
            Expect::Field("checkpoint_offset", 0x38),
        ),
        (
            "checkpoint_entries beyond the clusters",
            Box::new(|s| {
                put(s, 0x38, &0x20000u64.to_le_bytes());
                put(s, 0x40, &17u64.to_le_bytes())
            }),
            Expect::Field("checkpoint_entries", 0x40),
        ),
        (
            "reserved at 0x4c",
            Box::new(|s| s[0x4f] = 0x80),
            Expect::Field("reserved", 0x4c),
        ),
        (
            "journal_offset 0",
            Box::new(|s| put(s, 0x50, &0u64.to_le_bytes())),
            Expect::Field("journal_offset", 0x50),
        ),
        (
            "journal_offset unaligned",
            Box::new(|s| put(s, 0x50, &0x18000u64.to_le_bytes())),
            Expect::Field("journal_offset", 0x50),
        ),
        (
            "journal_capacity 0",
            Box::new(|s| put(s, 0x58, &0u64.to_le_bytes())),
            Expect::Field("journal_capacity", 0x58),
        ),
        (
            "journal_capacity unaligned",
            Box::new(|s| put(s, 0x58, &4097u64.to_le_bytes())),
            Expect::Field("journal_capacity", 0x58),
        ),
        (
            "reserved at 0x68",
            Box::new(|s| s[0x7f] = 1),
            Expect::Field("reserved", 0x68),
        ),
        (
            "backing_path not UTF-8",
            Box::new(|s| s[0x80] = 0xff),
            Expect::Field("backing_path", 0x80),
        ),
        (
            "backing_path with NUL",
            Box::new(|s| s[0x83] = 0),
            Expect::Field("backing_path", 0x80),
        ),
        (
            "padding after the path",
            Box::new(|s| s[0x200] = 1),
            Expect::Field("padding", 0x88),
        ),
    ]
}

fn matches_expectation(result: &Result<Header, FormatError>, expect: &Expect) -> bool {
    match (result, expect) {
        (Err(e), Expect::Error(want)) => e == want,
        (Err(FormatError::InvalidField { field, offset, .. }), Expect::Field(want, at)) => {
            field == want && offset == at
        }
        (Ok(h), Expect::Accepted(ok)) => ok(h),
        _ => false,
    }
}

#[test]
fn each_changed_header_field_gives_its_own_error() {
    for (what, change, expect) in field_changes() {
        let mut slot = golden_slot();
        change(&mut slot);
        fix_crc(&mut slot);
        let result = Header::from_bytes(&slot);
        assert!(
            matches_expectation(&result, &expect),
            "{what}: got {result:?}"
        );
    }
    // Without the CRC fix-up every change is a checksum mismatch (magic aside).
    let mut slot = golden_slot();
    slot[0x30] ^= 1;
    assert!(matches!(
        Header::from_bytes(&slot),
        Err(FormatError::ChecksumMismatch { .. })
    ));
}

#[test]
fn opening_an_image_with_a_changed_header_field_names_the_slot_and_the_field() {
    for (what, change, expect) in field_changes() {
        let mut bytes = golden_slot();
        change(&mut bytes);
        fix_crc(&mut bytes);
        let bytes = image_from_slot(&bytes);
        match (open_bytes(&bytes), &expect) {
            (Ok(_), Expect::Accepted(_)) => {}
            (
                Err(Error::Corrupt {
                    structure: "header",
                    offset: 0,
                    source,
                    ..
                }),
                _,
            ) => {
                // A slot that says version 2 is read as a version-2 slot, whose fields
                // these version-1 bytes do not satisfy: still the header at offset 0.
                assert!(
                    what == "version 2" || matches_expectation(&Err(source), &expect),
                    "{what}: wrong error"
                );
            }
            (Err(e), _) => panic!("{what}: unexpected error {e}"),
            (Ok(_), _) => panic!("{what}: the image opened"),
        }
    }
}

/// Header fields that decode but contradict the rest of the file, with valid checksums.
#[test]
fn header_fields_that_contradict_the_file_are_refused_quickly() {
    let cases: Vec<(&str, SlotChange, &str)> = vec![
        (
            "journal_capacity not the one the checkpoint implies",
            Box::new(|s| put(s, 0x58, &(2u64 << 20).to_le_bytes())),
            "journal_capacity",
        ),
        (
            "a checkpoint of 2^20 entries in a 1 MiB file",
            Box::new(|s| {
                put(s, 0x30, &(1u64 << 40).to_le_bytes());
                put(s, 0x38, &0x20000u64.to_le_bytes());
                put(s, 0x40, &(1u64 << 20).to_le_bytes());
                put(s, 0x58, &((2 * 48u64) << 20).to_le_bytes());
            }),
            "larger than the file",
        ),
        (
            "a checkpoint of 2^44 entries",
            Box::new(|s| {
                put(s, 0x30, &(1u64 << 60).to_le_bytes());
                put(s, 0x38, &0x20000u64.to_le_bytes());
                put(s, 0x40, &(1u64 << 44).to_le_bytes());
                put(s, 0x58, &((2 * 48u64) << 44).to_le_bytes());
            }),
            "larger than the file",
        ),
        (
            "a journal over the header slots",
            Box::new(|s| {
                put(s, 0x28, &[12]);
                put(s, 0x50, &0x1000u64.to_le_bytes())
            }),
            "claimed by both",
        ),
        (
            "a checkpoint past the end of the file",
            Box::new(|s| {
                put(s, 0x38, &0x200000u64.to_le_bytes());
                put(s, 0x40, &2u64.to_le_bytes());
            }),
            "past the end",
        ),
    ];
    for (what, change, wanted) in cases {
        let mut bytes = golden_slot();
        change(&mut bytes);
        fix_crc(&mut bytes);
        let bytes = image_from_slot(&bytes);
        let err = open_bytes(&bytes)
            .err()
            .unwrap_or_else(|| panic!("{what}: the image opened"));
        let message = err.to_string();
        assert!(
            message.contains(NAME) && message.contains(wanted),
            "{what}: unexpected error: {message}"
        );
        assert!(
            message.contains("0x"),
            "{what}: the error gives no offset: {message}"
        );
    }
}

/// A generation at the top of its range: the next checkpoint must not overflow it (a wrapped
/// generation would make the stale slot win at the next open).
#[test]
fn a_header_generation_that_cannot_grow_is_refused_or_survives_a_checkpoint() {
    let mut bytes = golden_slot();
    put(&mut bytes, 0x20, &u64::MAX.to_le_bytes());
    put(&mut bytes, 0x29, &[0, 0, 0]);
    bytes[0x80..0x88].fill(0);
    fix_crc(&mut bytes);
    let bytes = image_from_slot(&bytes);
    let storage = Arc::new(MemStorage::new(bytes));
    let dynamic: Arc<dyn Storage> = storage.clone();
    let image = match Image::open_storage(dynamic, Path::new(NAME), false) {
        Err(e) => {
            assert!(
                e.to_string().contains("generation"),
                "refused for another reason: {e}"
            );
            return;
        }
        Ok(image) => image,
    };
    // 300 one-block records fill the 1 MiB journal and force a checkpoint.
    for i in 0..300u64 {
        image.write_at(&i.to_le_bytes(), i * 8).expect("write");
        image.flush().expect("flush");
    }
    drop(image);
    let dynamic: Arc<dyn Storage> = storage;
    let image = Image::open_storage(dynamic, Path::new(NAME), true).expect("reopening");
    let mut buf = vec![0u8; 300 * 8];
    image.read_at(&mut buf, 0).expect("read");
    for i in 0..300usize {
        assert_eq!(
            buf[i * 8..i * 8 + 8],
            (i as u64).to_le_bytes(),
            "write {i} lost"
        );
    }
}

// ---------------------------------------------------------------------------------------
// The fuzz target's body over seeded mutations (cargo fuzz needs a nightly toolchain; this
// runs the same checks on stable).

fn mutate(rng: &mut StdRng, base: &[u8], hot: &[(u64, u64)]) -> Vec<u8> {
    let mut b = base.to_vec();
    for _ in 0..rng.gen_range(1..=4) {
        let (start, end) = hot[rng.gen_range(0..hot.len())];
        let end = end.min(b.len() as u64);
        if start >= end {
            continue;
        }
        let at = rng.gen_range(start..end) as usize;
        match rng.gen_range(0..6) {
            0 => b[at] ^= 1 << rng.gen_range(0..8),
            1 => b[at] = rng.gen(),
            2 => {
                // An 8-byte field set to an extreme value.
                let v: u64 = [0, 1, u64::MAX, 1 << 60, 1 << 32, rng.gen()][rng.gen_range(0..6)];
                let at = at & !7;
                if at + 8 <= b.len() {
                    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
                }
            }
            3 => b.truncate(at),
            4 => {
                // A block copied over another (a misdirected write).
                let from = rng.gen_range(0..=b.len() / 4096) * 4096;
                let to = at & !4095;
                if to + 4096 <= b.len() && from + 4096 <= b.len() {
                    let block = b[from..from + 4096].to_vec();
                    b[to..to + 4096].copy_from_slice(&block);
                }
            }
            _ => {
                let end = (at + 64).min(b.len());
                b[at..end].fill(0)
            }
        }
    }
    // Half the time the header checksums are fixed up, so the damage gets past them.
    if rng.gen_bool(0.5) {
        for slot in [0usize, 4096] {
            if b.len() >= slot + 4096 {
                fix_crc(&mut b[slot..slot + 4096]);
            }
        }
    }
    b
}

#[test]
fn the_fuzz_body_survives_seeded_mutations_of_real_images() {
    let r = reference();
    let h = &r.header;
    let journal_used = r.records.last().map_or(h.journal_offset, |&(at, l)| at + l);
    let hot = [
        (0, 8192),
        (
            h.checkpoint_offset,
            h.checkpoint_offset + h.checkpoint_entries * 48,
        ),
        (h.journal_offset, journal_used),
        (0, r.bytes.len() as u64),
    ];
    let small = {
        let mut b = fresh_image_bytes(300 * 1024, 4096);
        let storage = Arc::new(MemStorage::new(std::mem::take(&mut b)));
        let dynamic: Arc<dyn Storage> = storage.clone();
        let image =
            Image::open_storage(dynamic, Path::new("small.cow"), false).expect("small image");
        image.write_at(&[7u8; 70_000], 5000).expect("write");
        image.flush().expect("flush");
        image.discard(20_000, 40_000).expect("discard");
        drop(image);
        storage.contents()
    };
    let small_hot = [(0, 8192), (8192, small.len() as u64)];
    let mut rng = StdRng::seed_from_u64(2024);
    for i in 0..400 {
        let input = if i % 2 == 0 {
            mutate(&mut rng, &r.bytes, &hot)
        } else {
            mutate(&mut rng, &small, &small_hot)
        };
        exercise_image_bytes(&input);
    }
    // Inputs that are not images at all.
    exercise_image_bytes(&[]);
    exercise_image_bytes(&[0u8; 100]);
    exercise_image_bytes(&golden_slot());
    exercise_image_bytes(&vec![0xffu8; 16384]);
}

// ---------------------------------------------------------------------------------------
// The golden fixture: an image made once by `fixture_recipe` (lib_support/fixtures.rs)
// and committed. If a format change breaks old images, this test says so.

/// Regenerates the committed fixture; run by hand (`cargo test --test damaged -- --ignored`)
/// only when the format version changes on purpose.
#[test]
#[ignore]
fn regenerate_golden_fixture() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v1-basic.cow");
    Image::create(
        &path,
        &CreateOptions {
            size: Some(FIXTURE_SIZE),
            cluster_size: FIXTURE_CLUSTER,
            backing: None,
            ..Default::default()
        },
    )
    .expect("create");
    let image = Image::open(&path, &OpenOptions::default()).expect("open");
    fixture_recipe(Some(&image));
    drop(image);
    std::fs::create_dir_all("tests/fixtures").expect("fixtures dir");
    std::fs::copy(&path, FIXTURE).expect("copying the fixture");
}

#[test]
fn golden_fixture_v1_basic_still_reads_as_its_recipe_says() {
    let expected = fixture_recipe(None);
    let opts = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let image = Image::open(Path::new(FIXTURE), &opts).expect("opening the golden fixture");
    assert_eq!(image.virtual_size(), FIXTURE_SIZE);
    assert_eq!(image.cluster_size(), FIXTURE_CLUSTER);
    let h = image.header();
    assert!(
        h.generation >= 2 && h.checkpoint_entries > 0,
        "the fixture should hold a checkpoint: {h:?}"
    );
    assert_same_bytes(&read_all(&image), &expected, FIXTURE);
    let report = ops::check(Path::new(FIXTURE), false).expect("check on the fixture");
    assert!(
        report.corruptions.is_empty(),
        "check on the fixture: {:?}",
        report.corruptions
    );
    // Writing to a copy works too: the old image is a working image, not just readable.
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("copy.cow");
    std::fs::copy(FIXTURE, &copy).expect("copying the fixture");
    let image = Image::open(&copy, &OpenOptions::default()).expect("opening the copy read-write");
    image.write_at(b"still writable", 1000).expect("write");
    drop(image);
    let image = Image::open(&copy, &opts).expect("reopening the copy");
    let mut expected = expected;
    expected[1000..1014].copy_from_slice(b"still writable");
    assert_same_bytes(
        &read_all(&image),
        &expected,
        "the fixture copy after a write",
    );
}

// ---------------------------------------------------------------------------------------
// Locking.

fn locked_image() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = lib_support::create_image(dir.path(), "locked.cow", 1 << 20, 65536, None);
    (dir, path)
}

#[test]
fn a_second_writer_is_refused_with_locked() {
    let (_dir, path) = locked_image();
    let _first = Image::open(&path, &OpenOptions::default()).expect("first writer");
    match Image::open(&path, &OpenOptions::default()) {
        Err(Error::Locked { path: p, .. }) => assert_eq!(p, path),
        Err(e) => panic!("wrong error for a second writer: {e}"),
        Ok(_) => panic!("a second writer got the image"),
    }
    let ro = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    assert!(
        matches!(Image::open(&path, &ro), Err(Error::Locked { .. })),
        "a reader got an image that is being written"
    );
    let shared = OpenOptions {
        read_only: true,
        force_share: true,
        ..Default::default()
    };
    Image::open(&path, &shared).expect("force_share reads an image that is being written");
}

#[test]
fn readers_share_and_keep_writers_out_until_they_close() {
    let (_dir, path) = locked_image();
    let ro = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let a = Image::open(&path, &ro).expect("first reader");
    let b = Image::open(&path, &ro).expect("second reader");
    assert!(
        matches!(
            Image::open(&path, &OpenOptions::default()),
            Err(Error::Locked { .. })
        ),
        "a writer got an image being read"
    );
    drop((a, b));
    Image::open(&path, &OpenOptions::default()).expect("a writer once the readers are gone");
}
