//! Journal records: appending one with its data digest under one barrier, and the empty
//! record that seals the journal on a clean close (FORMAT.md, "Journal").

use super::flush::Snapshot;
use super::{lock, ImageV1};
use crate::error::Result;
use crate::format::{JournalRecordHeader, BLOCK_SIZE};
use crate::storage::Storage;

impl ImageV1 {
    /// The journal path of a flush: appends the snapshot's record. One barrier covers data
    /// and record together: the record carries a digest of the data it publishes, and
    /// recovery checks the last record against it (FORMAT.md, "Crash safety").
    pub(super) fn write_record(&self, snap: &Snapshot) -> Result<()> {
        let digest = self.digest_units(&snap.written_units)?;
        let record = JournalRecordHeader::encode(
            snap.epoch,
            snap.sequence,
            &snap.items,
            &snap.written,
            digest,
        );
        let (at, reserved, journal) = {
            let st = lock(&self.state);
            let h = &st.header;
            (
                st.journal_position(),
                st.journal_reserved,
                (h.journal_offset, h.journal_capacity),
            )
        };
        // A failure to reserve is not the flush's: the write below reports what matters.
        if !reserved && self.storage.reserve(journal.0, journal.1).is_ok() {
            lock(&self.state).journal_reserved = true;
        }
        self.append_record(&record, at)
    }

    /// The data digest of a record: xxh3-64 over the listed units, in order.
    pub(super) fn digest_units(&self, units: &[u64]) -> Result<u64> {
        digest_units(self.storage.as_ref(), self.geometry.unit_size(), units)
            .map_err(|(at, e)| self.io_err("reading back written data", at, e))
    }

    /// Appends an empty record after one that published data, so that the next open knows
    /// that record's data reached the disk and need not read it back.
    pub(super) fn seal(&self) -> Result<()> {
        let _one_at_a_time = lock(&self.flush_serial);
        let (record, at) = {
            let st = lock(&self.state);
            if !st.last_record_has_data || st.journal_tail + BLOCK_SIZE > st.header.journal_capacity
            {
                return Ok(());
            }
            (
                JournalRecordHeader::encode(
                    st.header.journal_epoch,
                    st.journal_next_seq,
                    &[],
                    &[],
                    digest_units_empty(),
                ),
                st.journal_position(),
            )
        };
        self.append_record(&record, at)?;
        let mut st = lock(&self.state);
        st.journal_tail += record.len() as u64;
        st.journal_next_seq += 1;
        st.last_record_has_data = false;
        Ok(())
    }

    /// Writes a journal record at `at` and syncs: the record, and the data written
    /// before it, are durable when this returns.
    pub(super) fn append_record(&self, record: &[u8], at: u64) -> Result<()> {
        self.storage
            .write_at(record, at)
            .map_err(|e| self.io_err("writing journal record", at, e))?;
        self.storage
            .sync()
            .map_err(|e| self.io_err("syncing journal", at, e))
    }
}

/// xxh3-64 over the units at the given host offsets, in order; reads contiguous units in
/// one call. Shared with recovery, which recomputes it.
pub(crate) fn digest_units(
    storage: &dyn Storage,
    unit_size: u64,
    units: &[u64],
) -> std::result::Result<u64, (u64, std::io::Error)> {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = Vec::new();
    let mut i = 0;
    while i < units.len() {
        let mut n = 1;
        while i + n < units.len() && units[i + n] == units[i] + n as u64 * unit_size && n < 256 {
            n += 1;
        }
        buf.resize(n * unit_size as usize, 0);
        storage
            .read_at(&mut buf, units[i])
            .map_err(|e| (units[i], e))?;
        hasher.update(&buf);
        i += n;
    }
    Ok(hasher.digest())
}

fn digest_units_empty() -> u64 {
    xxhash_rust::xxh3::Xxh3::new().digest()
}
