//! Journal records (FORMAT.md, "Journal").
//!
//! ```text
//! offset size field
//! 0x00   4    magic "CIJR"
//! 0x04   4    crc32 of bytes 0x08..0x20 followed by the entries
//! 0x08   8    epoch: must equal the header's journal_epoch
//! 0x10   8    sequence: 1 for the first record of an epoch, then +1
//! 0x18   4    entry_count
//! 0x1c   4    reserved, zero
//! 0x20   48*n map entries: the new state of each cluster the flush changed
//! ...         zero padding to the next 4096-byte boundary
//! ```
use super::{FormatError, BLOCK_SIZE, MAP_ENTRY_SIZE};
use byteorder::{ByteOrder, LittleEndian as LE};

pub const JOURNAL_MAGIC: [u8; 4] = *b"CIJR";
pub const JOURNAL_RECORD_HEADER_SIZE: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalRecordHeader {
    pub epoch: u64,
    pub sequence: u64,
    pub entry_count: u32,
    pub crc: u32,
}

impl JournalRecordHeader {
    /// Bytes the record occupies in the journal, padding included.
    pub fn padded_len(entry_count: u64) -> u64 {
        (JOURNAL_RECORD_HEADER_SIZE as u64 + entry_count * MAP_ENTRY_SIZE as u64)
            .next_multiple_of(BLOCK_SIZE)
    }

    /// Encodes a whole record (header, entries, padding) around already encoded entries.
    pub fn encode(epoch: u64, sequence: u64, entries: &[u8]) -> Vec<u8> {
        debug_assert_eq!(entries.len() % MAP_ENTRY_SIZE, 0);
        let count = (entries.len() / MAP_ENTRY_SIZE) as u64;
        let mut b = vec![0u8; Self::padded_len(count) as usize];
        b[0..4].copy_from_slice(&JOURNAL_MAGIC);
        LE::write_u64(&mut b[0x08..], epoch);
        LE::write_u64(&mut b[0x10..], sequence);
        LE::write_u32(&mut b[0x18..], count as u32);
        b[0x20..0x20 + entries.len()].copy_from_slice(entries);
        let crc = super::crc32(&[&b[0x08..0x20 + entries.len()]]);
        LE::write_u32(&mut b[0x04..], crc);
        b
    }

    /// Parses the fixed part. `None` means "no record here": the end of the journal. A record
    /// only counts once [`JournalRecordHeader::verify`] accepts its entries.
    pub fn parse(b: &[u8; JOURNAL_RECORD_HEADER_SIZE], epoch: u64, sequence: u64) -> Option<Self> {
        if b[0..4] != JOURNAL_MAGIC
            || LE::read_u64(&b[0x08..]) != epoch
            || LE::read_u64(&b[0x10..]) != sequence
            || LE::read_u32(&b[0x1c..]) != 0
        {
            return None;
        }
        Some(JournalRecordHeader {
            epoch,
            sequence,
            entry_count: LE::read_u32(&b[0x18..]),
            crc: LE::read_u32(&b[0x04..]),
        })
    }

    pub fn verify(
        &self,
        header: &[u8; JOURNAL_RECORD_HEADER_SIZE],
        entries: &[u8],
    ) -> Result<(), FormatError> {
        let computed = super::crc32(&[&header[0x08..0x20], entries]);
        if computed != self.crc {
            return Err(FormatError::ChecksumMismatch {
                stored: self.crc,
                computed,
            });
        }
        Ok(())
    }
}
