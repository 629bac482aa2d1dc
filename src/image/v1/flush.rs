//! The flush protocol (FORMAT.md, "Crash safety"): a snapshot of what changed, taken while
//! I/O is paused; persisting it, as a journal record (`journal.rs`) or a checkpoint
//! (`checkpoint.rs`); and publishing it, which unpins and frees what it replaced. A failed
//! flush goes back to the durable state (`recover.rs`).

use super::checkpoint::PlannedCheckpoint;
use super::{bits, coalesce, exclusive, lock, ImageV1};
use crate::error::{Error, Result};
use crate::format::{JournalRecordHeader, MapItem, MAP_ENTRY_SIZE};
use std::sync::atomic::Ordering;

/// What a flush took from the map while I/O was paused.
struct Snapshot {
    clusters: Vec<u64>,
    /// Encoded items of the journal record, their written bitmaps, and the host offsets of
    /// the written units in record order (what the data digest covers). All empty when a
    /// checkpoint replaces the record.
    items: Vec<u8>,
    written: Vec<u64>,
    written_units: Vec<u64>,
    epoch: u64,
    sequence: u64,
    checkpoint: Option<PlannedCheckpoint>,
}

impl ImageV1 {
    /// Makes every write completed before the call durable. See FORMAT.md, "Crash safety",
    /// for the crash points.
    pub fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        if self.failed.load(Ordering::Acquire) {
            return Err(Error::Failed {
                path: self.path.clone(),
            });
        }
        // Group commit: the first snapshot taken after this call covers every write that
        // completed before it. Flushes that queue behind a running one all return once the
        // next one completes, so N concurrent flushes cost two barriers, not N.
        let covering_snapshot = lock(&self.state).snapshots_taken + 1;
        let _one_at_a_time = lock(&self.flush_serial);
        if lock(&self.state).snapshots_published >= covering_snapshot {
            return Ok(());
        }
        // The flush this one waited for may have failed.
        if self.failed.load(Ordering::Acquire) {
            return Err(Error::Failed {
                path: self.path.clone(),
            });
        }
        let Some(snapshot) = self.take_snapshot() else {
            return Ok(());
        };
        if let Err(e) = self.persist(&snapshot) {
            // After a failed fdatasync nothing since the last barrier can be trusted to be
            // on the disk, and retrying would only report success for data already lost.
            return Err(self.revert_to_durable(e));
        }
        self.publish(snapshot);
        Ok(())
    }

    fn take_snapshot(&self) -> Option<Snapshot> {
        let _pause = exclusive(&self.gate);
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        st.snapshots_taken += 1;
        if st.dirty.is_empty() && st.dirty_runs.is_empty() && st.pending_resize.is_none() {
            // Every completed write is in a published snapshot already.
            st.snapshots_published = st.snapshots_taken;
            return None;
        }
        let mut clusters = std::mem::take(&mut st.dirty);
        clusters.sort_unstable();
        let runs = std::mem::take(&mut st.dirty_runs);
        let count = runs.len() + clusters.len();
        // A record that does not fit in the journal is never written: the checkpoint that
        // replaces the journal carries the whole map, so the record is not even encoded.
        // A resize changes the header, so it always publishes through a checkpoint: the
        // header that carries the new size also carries the map that matches it.
        let into_checkpoint = st.pending_resize.is_some()
            || st.journal_tail + JournalRecordHeader::padded_len(count as u64)
                > st.header.journal_capacity;
        let record_items = if into_checkpoint { 0 } else { count };
        // Runs first: an entry recorded after a run overrides it for its cluster.
        let mut items = vec![0u8; record_items * MAP_ENTRY_SIZE];
        let mut written = vec![0u64; record_items];
        let mut written_units = Vec::new();
        if !into_checkpoint {
            for (i, item) in runs.iter().enumerate() {
                item.write_to(&mut items[i * MAP_ENTRY_SIZE..]);
            }
        }
        for (i, vc) in clusters.iter().enumerate() {
            let e = st.map.get_mut(vc).expect("dirty clusters are mapped");
            let units = e.units;
            let f = e.in_flight_mut();
            f.dirty = false;
            f.inflight = units;
            let stored = f.written & (units[0] | units[1]);
            f.written = 0;
            if into_checkpoint {
                continue;
            }
            for u in bits(stored) {
                let slot = usize::from(e.units[0] & (1 << u) == 0);
                written_units.push(self.host_offset(e.host[slot], u));
            }
            written[runs.len() + i] = stored;
            let item = match e.to_disk(*vc) {
                d if d.is_empty() => MapItem::Removal(*vc),
                d => MapItem::Cluster(d),
            };
            item.write_to(&mut items[(runs.len() + i) * MAP_ENTRY_SIZE..]);
        }
        let checkpoint = into_checkpoint.then(|| self.plan_checkpoint(st));
        Some(Snapshot {
            clusters,
            items,
            written,
            written_units,
            epoch: st.header.journal_epoch,
            sequence: st.journal_next_seq,
            checkpoint,
        })
    }

    fn persist(&self, snap: &Snapshot) -> Result<()> {
        match &snap.checkpoint {
            None => {
                // One barrier for data and record together: the record carries a digest of
                // the data it publishes, and recovery checks the last record against it
                // (FORMAT.md, "Crash safety").
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
                self.append_record(&record, at)?;
            }
            Some(c) => {
                // Refused before anything is written: the image stays as it was.
                self.check_generation(&c.header)?;
                // The checkpoint replaces the journal, so it must be durable, data included,
                // before the header that points at it. The new journal's clusters were free
                // and may hold anything, guest data included: they are punched under the same
                // barrier, so that no stale block can pass for a record.
                let (j_at, j_len) = (c.header.journal_offset, c.header.journal_capacity);
                self.storage
                    .punch_hole(j_at, j_len)
                    .map_err(|e| self.io_err("clearing the journal", j_at, e))?;
                // The file always covers the whole journal region, so that a file cut short
                // inside the journal is told apart from a journal that simply ends there.
                let journal_end = c.header.journal_offset + c.header.journal_capacity;
                let length = self
                    .storage
                    .len()
                    .map_err(|e| self.io_err("reading length", 0, e))?;
                if length < journal_end {
                    self.storage
                        .set_len(journal_end)
                        .map_err(|e| self.io_err("extending over the journal", journal_end, e))?;
                }
                if !c.blob.is_empty() {
                    let at = c.header.checkpoint_offset;
                    self.storage
                        .write_at(&c.blob, at)
                        .map_err(|e| self.io_err("writing checkpoint", at, e))?;
                }
                self.storage.sync().map_err(|e| {
                    self.io_err("syncing checkpoint", c.header.checkpoint_offset, e)
                })?;
                self.write_header_slot(&c.header, c.slot)?;
            }
        }
        Ok(())
    }

    /// The snapshot is durable: unpin what it replaced, free clusters nothing references.
    /// Punching and truncating only give space back: when they fail, the clusters are free
    /// all the same (they are rewritten before anything references them again).
    fn publish(&self, snap: Snapshot) {
        let _pause = exclusive(&self.gate);
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        let cs = self.geometry.cluster_size();
        let us = self.geometry.unit_size();
        let mut punches = Vec::new();
        let mut freed = Vec::new();
        for vc in &snap.clusters {
            let Some(e) = st.map.get_mut(vc) else {
                continue;
            };
            let units = e.units;
            let f = e.in_flight_mut();
            f.durable = f.inflight;
            f.inflight = [0, 0];
            let durable = f.durable;
            // An entry keeps both clusters while it holds data: a unit that moves to the other
            // slot and back overwrites blocks the file system has already allocated, which is
            // what keeps flushes cheap. The clusters go when the entry holds no data at all.
            let holds_data = units[0] | units[1] | durable[0] | durable[1] != 0;
            for s in 0..2 {
                if e.host[s] == 0 {
                    continue;
                }
                if !holds_data {
                    punches.push((e.host[s] * cs, cs));
                    freed.push((e.host[s], 1));
                    e.host[s] = 0;
                    e.in_flight_mut().discarded[s] = 0;
                } else {
                    let f = e.in_flight_mut();
                    let now = f.discarded[s] & !(units[s] | durable[s]);
                    f.discarded[s] &= !now;
                    for u in bits(now) {
                        punches.push((self.host_offset(e.host[s], u), us));
                    }
                }
            }
            e.settle();
            if e.is_unused() {
                st.map.remove(vc);
            }
        }
        match snap.checkpoint {
            Some(c) => {
                for &(start, n) in &c.old_regions {
                    punches.push((start * cs, n * cs));
                    freed.push((start, n));
                }
                st.header = c.header;
                st.active_slot = c.slot;
                st.journal_tail = 0;
                st.journal_next_seq = 1;
                st.last_record_has_data = false;
                // The new journal was punched clear: the next record reserves it again.
                st.journal_reserved = false;
            }
            None => {
                st.journal_tail += JournalRecordHeader::padded_len(snap.written.len() as u64);
                st.journal_next_seq += 1;
                st.last_record_has_data = !snap.written_units.is_empty();
            }
        }
        // Nothing can allocate while I/O is paused, so freeing first and punching after is
        // safe. Freed clusters that reach the end of the file are cut off instead of
        // punched: truncating is cheaper, and the file keeps covering everything in use.
        for (start, n) in freed {
            st.free.free_run(start, n);
        }
        let end = st.free.end() << self.geometry.cluster_bits;
        for (off, l) in coalesce(punches) {
            let l = l.min(end.saturating_sub(off));
            if l > 0 {
                let _ = self.storage.punch_hole(off, l);
            }
        }
        if self.storage.len().is_ok_and(|len| len > end) {
            let _ = self.storage.set_len(end);
        }
        st.commits += 1;
        st.snapshots_published = st.snapshots_taken;
        self.committed.notify_all();
    }
}
