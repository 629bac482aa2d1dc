//! Journal records (FORMAT.md, "Journal").
//!
//! ```text
//! offset     size  field
//! 0x00       4     magic "CIJR"
//! 0x04       4     crc32 of bytes 0x08..end of the written bitmaps
//! 0x08       8     epoch: must equal the header's journal_epoch
//! 0x10       8     sequence: 1 for the first record of an epoch, then +1
//! 0x18       4     item_count n
//! 0x1c       4     reserved, zero
//! 0x20       8     data_digest: xxh3-64 of the units the record marks written, in order
//! 0x28       48*n  map items (map_entry.rs): the new state of each changed cluster or run
//! 0x28+48n   8*n   written bitmaps: per item, the units of its cluster written since the
//!                  previous record (0 for runs and removals)
//! ...              zero padding to the next 4096-byte boundary
//! ```
use super::{FormatError, BLOCK_SIZE, MAP_ENTRY_SIZE};
use byteorder::{ByteOrder, LittleEndian as LE};

pub const JOURNAL_MAGIC: [u8; 4] = *b"CIJR";
pub const JOURNAL_RECORD_HEADER_SIZE: usize = 40;
/// Bytes each item takes in a record: the item and its written bitmap.
pub const JOURNAL_ITEM_SIZE: usize = MAP_ENTRY_SIZE + 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalRecordHeader {
    pub epoch: u64,
    pub sequence: u64,
    pub item_count: u32,
    pub crc: u32,
    pub data_digest: u64,
}

impl JournalRecordHeader {
    /// Bytes the record occupies in the journal, padding included.
    pub fn padded_len(item_count: u64) -> u64 {
        (JOURNAL_RECORD_HEADER_SIZE as u64 + item_count * JOURNAL_ITEM_SIZE as u64)
            .next_multiple_of(BLOCK_SIZE)
    }

    /// Bytes after the fixed header that the checksum covers.
    pub fn body_len(item_count: u64) -> u64 {
        item_count * JOURNAL_ITEM_SIZE as u64
    }

    /// Encodes a whole record (header, items, written bitmaps, padding).
    pub fn encode(
        epoch: u64,
        sequence: u64,
        items: &[u8],
        written: &[u64],
        data_digest: u64,
    ) -> Vec<u8> {
        debug_assert_eq!(items.len(), written.len() * MAP_ENTRY_SIZE);
        let count = written.len() as u64;
        let mut b = vec![0u8; Self::padded_len(count) as usize];
        b[0..4].copy_from_slice(&JOURNAL_MAGIC);
        LE::write_u64(&mut b[0x08..], epoch);
        LE::write_u64(&mut b[0x10..], sequence);
        LE::write_u32(&mut b[0x18..], count as u32);
        LE::write_u64(&mut b[0x20..], data_digest);
        let h = JOURNAL_RECORD_HEADER_SIZE;
        b[h..h + items.len()].copy_from_slice(items);
        for (i, w) in written.iter().enumerate() {
            LE::write_u64(&mut b[h + items.len() + 8 * i..], *w);
        }
        let end = h + Self::body_len(count) as usize;
        let crc = super::crc32(&[&b[0x08..end]]);
        LE::write_u32(&mut b[0x04..], crc);
        b
    }

    /// Parses the fixed part. `None` means "no record here": the end of the journal. A record
    /// only counts once [`JournalRecordHeader::verify`] accepts its body.
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
            item_count: LE::read_u32(&b[0x18..]),
            crc: LE::read_u32(&b[0x04..]),
            data_digest: LE::read_u64(&b[0x20..]),
        })
    }

    /// The sequence number of what looks like a record of `epoch`, without checking it.
    /// Only the probe for damage in the middle of a journal uses it.
    pub fn peek_sequence(b: &[u8; JOURNAL_RECORD_HEADER_SIZE], epoch: u64) -> Option<u64> {
        (b[0..4] == JOURNAL_MAGIC && LE::read_u64(&b[0x08..]) == epoch)
            .then(|| LE::read_u64(&b[0x10..]))
    }

    pub fn verify(
        &self,
        header: &[u8; JOURNAL_RECORD_HEADER_SIZE],
        body: &[u8],
    ) -> Result<(), FormatError> {
        let computed = super::crc32(&[&header[0x08..], body]);
        if computed != self.crc {
            return Err(FormatError::ChecksumMismatch {
                stored: self.crc,
                computed,
            });
        }
        Ok(())
    }

    /// Splits a verified body into its items' bytes and their written bitmaps.
    pub fn split_body(&self, body: &[u8]) -> (Vec<u8>, Vec<u64>) {
        let n = self.item_count as usize;
        let items = body[..n * MAP_ENTRY_SIZE].to_vec();
        let written = body[n * MAP_ENTRY_SIZE..n * JOURNAL_ITEM_SIZE]
            .chunks_exact(8)
            .map(LE::read_u64)
            .collect();
        (items, written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_any_flipped_body_bit_fails_its_checksum() {
        let items = vec![7u8; 2 * MAP_ENTRY_SIZE];
        let rec = JournalRecordHeader::encode(5, 9, &items, &[3, 0], 0xfeed);
        assert_eq!(rec.len(), 4096);
        let hb: [u8; JOURNAL_RECORD_HEADER_SIZE] =
            rec[..JOURNAL_RECORD_HEADER_SIZE].try_into().unwrap();
        let h = JournalRecordHeader::parse(&hb, 5, 9).unwrap();
        assert_eq!((h.item_count, h.data_digest), (2, 0xfeed));
        let body_end = JOURNAL_RECORD_HEADER_SIZE + JournalRecordHeader::body_len(2) as usize;
        let body = &rec[JOURNAL_RECORD_HEADER_SIZE..body_end];
        h.verify(&hb, body).unwrap();
        assert_eq!(h.split_body(body), (items, vec![3, 0]));
        assert!(
            JournalRecordHeader::parse(&hb, 5, 10).is_none(),
            "wrong sequence"
        );
        assert!(
            JournalRecordHeader::parse(&hb, 4, 9).is_none(),
            "wrong epoch"
        );
        for bit in 0..(body_end - 8) * 8 {
            let mut r = rec.clone();
            r[8 + bit / 8] ^= 1 << (bit % 8);
            let hb: [u8; JOURNAL_RECORD_HEADER_SIZE] =
                r[..JOURNAL_RECORD_HEADER_SIZE].try_into().unwrap();
            if let Some(h) = JournalRecordHeader::parse(&hb, 5, 9) {
                assert!(
                    h.verify(&hb, &r[JOURNAL_RECORD_HEADER_SIZE..body_end])
                        .is_err(),
                    "bit {bit}"
                );
            }
        }
    }
}
