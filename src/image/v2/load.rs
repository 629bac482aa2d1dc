//! Opening a version-2 image (FORMAT-v2.md, "Opening"): the current header slot and the
//! journal's records. The tree is not read here; its pages are read when first needed.
use super::extents::ExtentMap;
use crate::error::{Error, Result};
use crate::format::v2::{
    decode_record_items, parse_record_header, peek_record_sequence, record_len, Extent, HeaderV2,
    Mapping, RecordHeader, BLOCK, RECORD_HEADER, VERSION_2,
};
use crate::format::{FormatError, Header, HEADER_SLOT_SIZE};
use crate::storage::Storage;
use byteorder::{ByteOrder, LittleEndian as LE};
use std::path::Path;

/// A header slot of either version.
#[derive(Debug, Clone)]
pub enum Slot {
    V1(Header),
    V2(HeaderV2),
}

impl Slot {
    fn generation(&self) -> u64 {
        match self {
            Slot::V1(h) => h.generation,
            Slot::V2(h) => h.generation,
        }
    }
}

fn corrupt(path: &Path, structure: &'static str, offset: u64, source: FormatError) -> Error {
    Error::Corrupt {
        path: path.into(),
        structure,
        offset,
        source,
    }
}

fn io(path: &Path, op: &'static str, offset: u64, source: std::io::Error) -> Error {
    Error::Io {
        path: path.into(),
        op,
        offset,
        source,
    }
}

/// The current slot, by the rules of FORMAT.md "Header slots", whatever the versions of the
/// two slots: the valid slot with the larger generation; an intact slot that cannot be used
/// refuses the image.
pub fn current_slot(storage: &dyn Storage, path: &Path) -> Result<(usize, Slot)> {
    let file_length = storage
        .len()
        .map_err(|e| io(path, "reading length", 0, e))?;
    let mut best: Option<(usize, Slot)> = None;
    let mut blank = Vec::new();
    for slot in 0..2 {
        let at = (slot * HEADER_SLOT_SIZE) as u64;
        let mut b = vec![0u8; HEADER_SLOT_SIZE];
        let available = file_length.saturating_sub(at).min(HEADER_SLOT_SIZE as u64) as usize;
        storage
            .read_at(&mut b[..available], at)
            .map_err(|e| io(path, "reading header", at, e))?;
        let decoded = match LE::read_u32(&b[8..]) {
            VERSION_2 if Header::from_bytes(&b).is_err_and(|e| is_version_2(&e)) => {
                HeaderV2::from_bytes(&b).map(Slot::V2)
            }
            _ => Header::from_bytes(&b).map(Slot::V1),
        };
        match decoded {
            Ok(h)
                if best
                    .as_ref()
                    .is_none_or(|(_, c)| h.generation() > c.generation()) =>
            {
                best = Some((slot, h))
            }
            Ok(_) => {}
            Err(e @ (FormatError::ChecksumMismatch { .. } | FormatError::BadMagic)) => {
                blank.push((slot, e))
            }
            Err(FormatError::UnsupportedVersion(v, _)) => {
                return Err(corrupt(
                    path,
                    "header",
                    at,
                    FormatError::UnsupportedVersion(v, VERSION_2),
                ))
            }
            Err(e) => return Err(corrupt(path, "header", at, e)),
        }
    }
    match best {
        Some(b) => Ok(b),
        None => {
            let (slot, e) = blank.swap_remove(0);
            Err(corrupt(path, "header", (slot * HEADER_SLOT_SIZE) as u64, e))
        }
    }
}

/// A slot that passed its magic and checksum and says version 2 (the version-1 decoder
/// refuses it for its version only).
fn is_version_2(e: &FormatError) -> bool {
    matches!(e, FormatError::UnsupportedVersion(VERSION_2, _))
}

/// What an open finds on the disk.
pub struct Loaded {
    pub header: HeaderV2,
    pub active_slot: usize,
    pub journaled: ExtentMap,
    pub journal_tail: u64,
    pub journal_next_seq: u64,
    pub last_record_has_data: bool,
    pub file_length: u64,
}

pub fn load(storage: &dyn Storage, path: &Path) -> Result<Loaded> {
    let (active_slot, slot) = current_slot(storage, path)?;
    let header = match slot {
        Slot::V2(h) => h,
        Slot::V1(_) => {
            return Err(Error::Invalid {
                path: path.into(),
                reason: "is a version 1 image".into(),
            })
        }
    };
    let file_length = storage
        .len()
        .map_err(|e| io(path, "reading length", 0, e))?;
    let journal_end = header.journal_offset + header.journal_capacity;
    if file_length < journal_end {
        return Err(Error::Inconsistent {
            path: path.into(),
            reason: format!(
                "the file ends at {file_length:#x}, inside its journal region {:#x}..{journal_end:#x}: it was cut short",
                header.journal_offset
            ),
        });
    }
    let journal = Replay::new(storage, path, &header, file_length).run()?;
    Ok(Loaded {
        header,
        active_slot,
        journaled: journal.map,
        journal_tail: journal.tail,
        journal_next_seq: journal.seq,
        last_record_has_data: journal.last_has_data,
        file_length,
    })
}

struct Replay<'a> {
    storage: &'a dyn Storage,
    path: &'a Path,
    header: &'a HeaderV2,
    file_length: u64,
    records: Vec<(u64, Record)>,
    tail: u64,
    seq: u64,
}

/// A record accepted by replay: its items, its data digest, and whether it is carried.
struct Record {
    items: Vec<Extent>,
    digest: u64,
    carried: bool,
}

struct Replayed {
    map: ExtentMap,
    tail: u64,
    seq: u64,
    last_has_data: bool,
}

impl Replay<'_> {
    fn new<'a>(
        storage: &'a dyn Storage,
        path: &'a Path,
        header: &'a HeaderV2,
        file_length: u64,
    ) -> Replay<'a> {
        Replay {
            storage,
            path,
            header,
            file_length,
            records: Vec::new(),
            tail: 0,
            seq: 1,
        }
    }

    fn run(mut self) -> Result<Replayed> {
        while let Some(record) = self.next_record()? {
            let len = record_len(record.items.len() as u64);
            self.records.push((self.tail, record));
            self.tail += len;
            self.seq += 1;
        }
        // The last record shared its barrier with its data: keep it only if the data landed.
        // A carried record's data was durable before it was written.
        if let Some((at, record)) = self.records.last() {
            if !record.carried && !self.data_matches(&record.items, record.digest)? {
                self.tail = *at;
                self.seq -= 1;
                self.records.pop();
            }
        }
        self.check_no_later_record()?;
        let mut map = ExtentMap::default();
        let mut last_has_data = false;
        for (_, record) in &self.records {
            last_has_data = !record.carried
                && record
                    .items
                    .iter()
                    .any(|e| matches!(e.mapping, Mapping::Data(_)));
            for e in &record.items {
                self.check_inside_file(e)?;
                map.set(e.start, e.len, e.mapping);
            }
        }
        Ok(Replayed {
            map,
            tail: self.tail,
            seq: self.seq,
            last_has_data,
        })
    }

    fn next_record(&self) -> Result<Option<Record>> {
        let cap = self.header.journal_capacity;
        if self.tail + RECORD_HEADER as u64 > cap {
            return Ok(None);
        }
        let at = self.header.journal_offset + self.tail;
        let mut fixed = [0u8; RECORD_HEADER];
        self.storage
            .read_at(&mut fixed, at)
            .map_err(|e| io(self.path, "reading the journal", at, e))?;
        let Some(RecordHeader {
            count,
            crc,
            digest,
            carried,
        }) = parse_record_header(&fixed, self.header.journal_epoch, self.seq)
        else {
            return Ok(None);
        };
        let len = record_len(count as u64);
        if self.tail + len > cap {
            return Ok(None);
        }
        let mut body = vec![0u8; len as usize];
        self.storage
            .read_at(&mut body, at)
            .map_err(|e| io(self.path, "reading the journal", at, e))?;
        match decode_record_items(&body, count, crc, self.header.virtual_blocks()) {
            Ok(items) => Ok(Some(Record {
                items,
                digest,
                carried,
            })),
            Err(FormatError::ChecksumMismatch { .. }) => Ok(None),
            Err(e) => Err(corrupt(self.path, "journal record", at, e)),
        }
    }

    /// The last record's data blocks, read back, hash to its digest. They are distinct, so
    /// together they are no larger than the file; a record claiming more did not land.
    fn data_matches(&self, items: &[Extent], digest: u64) -> Result<bool> {
        let mut total = 0u64;
        for e in items {
            if let Mapping::Data(h) = e.mapping {
                total = total.saturating_add(e.len);
                if (h + e.len) * BLOCK > self.file_length || total * BLOCK > self.file_length {
                    return Ok(false);
                }
            }
        }
        match super::digest_extents(self.storage, items) {
            Ok(d) => Ok(d == digest),
            Err((at, e)) => Err(io(self.path, "reading back the last record's data", at, e)),
        }
    }

    fn check_inside_file(&self, e: &Extent) -> Result<()> {
        if let Mapping::Data(h) = e.mapping {
            if (h + e.len) * BLOCK > self.file_length {
                return Err(Error::Inconsistent {
                    path: self.path.into(),
                    reason: format!(
                        "a journal record maps virtual blocks {:#x}.. to host offset {:#x}, past the end of the file",
                        e.start,
                        h * BLOCK
                    ),
                });
            }
        }
        Ok(())
    }

    /// A record of this journal with a later sequence past the end of replay means one in
    /// the middle was damaged after later flushes completed (FORMAT.md, "Damage in the
    /// middle").
    fn check_no_later_record(&self) -> Result<()> {
        let start = self.header.journal_offset + self.tail + BLOCK;
        let end = (self.header.journal_offset + self.header.journal_capacity).min(self.file_length);
        let mut pos = start;
        // The region is read in chunks (a fully written journal would otherwise cost a
        // read per block); holes are skipped.
        let mut chunk = vec![0u8; (end.saturating_sub(start)).min(1 << 20) as usize];
        while pos + RECORD_HEADER as u64 <= end {
            match self.storage.next_data(pos) {
                Ok(Some(d)) if d < end => pos = pos.max(d / BLOCK * BLOCK),
                _ => break,
            }
            let n = (end - pos).min(chunk.len() as u64) as usize;
            if n < RECORD_HEADER {
                break;
            }
            self.storage
                .read_at(&mut chunk[..n], pos)
                .map_err(|e| io(self.path, "reading the journal", pos, e))?;
            for (i, block) in chunk[..n].chunks(BLOCK as usize).enumerate() {
                if block.len() < RECORD_HEADER {
                    break;
                }
                let at = pos + i as u64 * BLOCK;
                if let Some(s) = peek_record_sequence(block, self.header.journal_epoch) {
                    if s >= self.seq {
                        return Err(Error::Inconsistent {
                            path: self.path.into(),
                            reason: format!(
                                "journal record {s} at offset {at:#x} follows a damaged or missing record at offset {:#x}",
                                self.header.journal_offset + self.tail
                            ),
                        });
                    }
                }
            }
            pos += (n as u64).next_multiple_of(BLOCK);
        }
        Ok(())
    }
}
