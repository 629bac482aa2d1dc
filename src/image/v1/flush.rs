//! The flush protocol (FORMAT.md, "Crash safety"): a snapshot of what changed, taken while
//! I/O is paused; persisting it, as a journal record (`journal.rs`) or a checkpoint
//! (`checkpoint.rs`); and publishing it, which unpins and frees what it replaced. A failed
//! flush goes back to the durable state (`recover.rs`).

use super::checkpoint::PlannedCheckpoint;
use super::{bits, coalesce, exclusive, lock, ImageV1, State};
use crate::error::{Error, Result};
use crate::format::{JournalRecordHeader, MapItem, MAP_ENTRY_SIZE};
use std::sync::atomic::Ordering;

/// What a flush took from the map while I/O was paused.
pub(super) struct Snapshot {
    pub(super) clusters: Vec<u64>,
    /// Encoded items of the journal record, their written bitmaps, and the host offsets of
    /// the written units in record order (what the data digest covers). All empty when a
    /// checkpoint replaces the record.
    pub(super) items: Vec<u8>,
    pub(super) written: Vec<u64>,
    pub(super) written_units: Vec<u64>,
    pub(super) epoch: u64,
    pub(super) sequence: u64,
    pub(super) checkpoint: Option<PlannedCheckpoint>,
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

    /// Makes the snapshot durable: as a journal record (`journal.rs`), or as a checkpoint
    /// and the header slot that points at it (`checkpoint.rs`).
    fn persist(&self, snap: &Snapshot) -> Result<()> {
        match &snap.checkpoint {
            None => self.write_record(snap),
            Some(c) => self.write_checkpoint(c),
        }
    }

    /// The snapshot is durable: unpin what it replaced, free clusters nothing references.
    /// Punching and truncating only give space back: when they fail, the clusters are free
    /// all the same (they are rewritten before anything references them again).
    fn publish(&self, snap: Snapshot) {
        let _pause = exclusive(&self.gate);
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        let cs = self.geometry.cluster_size();
        let mut punches = Vec::new();
        let mut freed = Vec::new();
        for vc in &snap.clusters {
            self.unpin_published(st, *vc, &mut punches, &mut freed);
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
        self.give_back_space(st, freed, punches);
        st.commits += 1;
        st.snapshots_published = st.snapshots_taken;
        self.committed.notify_all();
    }

    /// The published snapshot references the units cluster `vc` had when it was taken:
    /// those become the durable ones. Units that only the old durable state still pinned,
    /// and discarded since, go to `punches`; the clusters of an entry that holds no data
    /// any more go to `freed` too, and an entry left with nothing leaves the map.
    fn unpin_published(
        &self,
        st: &mut State,
        vc: u64,
        punches: &mut Vec<(u64, u64)>,
        freed: &mut Vec<(u64, u64)>,
    ) {
        let cs = self.geometry.cluster_size();
        let us = self.geometry.unit_size();
        let Some(e) = st.map.get_mut(&vc) else {
            return;
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
            st.map.remove(&vc);
        }
    }

    /// Frees the runs of host clusters `freed`, then punches `punches` (host byte ranges)
    /// and cuts off the end of the file past the last cluster in use.
    fn give_back_space(&self, st: &mut State, freed: Vec<(u64, u64)>, punches: Vec<(u64, u64)>) {
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
    }
}
