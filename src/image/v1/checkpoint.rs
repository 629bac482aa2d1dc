//! The checkpoint path of a flush: the whole map serialized into a new checkpoint with a
//! fresh journal, published by one header-slot write (FORMAT.md, "Checkpoint" and "Crash
//! safety"); and the header slots themselves.

use super::{ImageV1, State};
use crate::error::{Error, Result};
use crate::format::{Header, MapItem, BLOCK_SIZE, HEADER_SLOT_SIZE, MAP_ENTRY_SIZE};
use crate::image::random_epoch;

pub(super) struct PlannedCheckpoint {
    pub(super) blob: Vec<u8>,
    pub(super) header: Header,
    pub(super) slot: usize,
    /// Clusters of the old checkpoint and journal, freed once the new header is durable.
    pub(super) old_regions: Vec<(u64, u64)>,
}

impl ImageV1 {
    /// Serializes the whole map (as of the snapshot) and places it and a fresh journal.
    pub(super) fn plan_checkpoint(&self, st: &mut State) -> PlannedCheckpoint {
        let g = self.geometry;
        let cs = g.cluster_size();
        // Entries and zero runs are each sorted and never overlap: merging them gives the
        // checkpoint's order, written straight into its bytes.
        let entries = st
            .map
            .iter()
            .map(|(&vc, e)| e.to_disk(vc))
            .filter(|d| !d.is_empty())
            .map(MapItem::Cluster);
        let runs = st.zero_runs.iter().map(|(start, end)| MapItem::ZeroRun {
            start,
            count: end - start,
        });
        let mut blob = Vec::with_capacity((st.map.len() + st.zero_runs.len()) * MAP_ENTRY_SIZE);
        let mut item_bytes = [0u8; MAP_ENTRY_SIZE];
        for item in merge_by_start(entries, runs) {
            item.write_to(&mut item_bytes);
            blob.extend_from_slice(&item_bytes);
        }
        let items = (blob.len() / MAP_ENTRY_SIZE) as u64;
        let ckpt_clusters = (blob.len() as u64).div_ceil(cs);
        let ckpt_start = if ckpt_clusters > 0 {
            st.free.allocate_run(ckpt_clusters)
        } else {
            0
        };
        let journal_capacity = journal_capacity_for(blob.len() as u64, cs);
        let journal_clusters = journal_capacity / cs;
        let journal_start = st.free.allocate_run(journal_clusters);
        let old = &st.header;
        let mut old_regions = vec![(old.journal_offset / cs, old.journal_capacity.div_ceil(cs))];
        if old.checkpoint_offset != 0 {
            old_regions.push((
                old.checkpoint_offset / cs,
                (old.checkpoint_entries * MAP_ENTRY_SIZE as u64).div_ceil(cs),
            ));
        }
        let generation = old.generation + 1;
        let virtual_size = st.pending_resize.take().unwrap_or(old.virtual_size);
        let header = Header {
            generation,
            virtual_size,
            checkpoint_offset: ckpt_start * cs,
            checkpoint_entries: items,
            checkpoint_crc: crate::format::crc32(&[&blob]),
            journal_offset: journal_start * cs,
            journal_capacity,
            journal_epoch: random_epoch(),
            ..old.clone()
        };
        PlannedCheckpoint {
            blob,
            header,
            slot: 1 - st.active_slot,
            old_regions,
        }
    }

    /// The checkpoint path of a flush: writes the planned checkpoint and a fresh journal,
    /// makes them durable, then switches to them with one header-slot write.
    pub(super) fn write_checkpoint(&self, c: &PlannedCheckpoint) -> Result<()> {
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
        self.storage
            .sync()
            .map_err(|e| self.io_err("syncing checkpoint", c.header.checkpoint_offset, e))?;
        self.write_header_slot(&c.header, c.slot)
    }

    /// A header update may not write a generation that a reader refuses (FORMAT.md, "Header
    /// slots", check 15): the image would not open again.
    pub(super) fn check_generation(&self, header: &Header) -> Result<()> {
        if header.generation > crate::format::header::MAX_GENERATION {
            return Err(Error::Invalid {
                path: self.path.clone(),
                reason: format!(
                    "header generation {} would exceed 2^62: the header cannot be updated",
                    header.generation
                ),
            });
        }
        Ok(())
    }

    pub(super) fn write_header_slot(&self, header: &Header, slot: usize) -> Result<()> {
        self.check_generation(header)?;
        let at = (slot * HEADER_SLOT_SIZE) as u64;
        // Crash point 3: a torn slot fails its checksum; the other slot is still current.
        self.storage
            .write_at(&header.to_bytes(), at)
            .map_err(|e| self.io_err("writing header", at, e))?;
        self.storage
            .sync()
            .map_err(|e| self.io_err("syncing header", at, e))
    }
}

/// A journal holds at least 1 MiB of records and twice the checkpoint's size, so that the
/// cost of rewriting the checkpoint is spread over at least as many bytes of records.
pub(in crate::image) fn journal_capacity_for(checkpoint_bytes: u64, cluster_size: u64) -> u64 {
    (1u64 << 20)
        .max(2 * checkpoint_bytes)
        .next_multiple_of(cluster_size.max(BLOCK_SIZE))
}

/// Merges two iterators of items, each sorted by start, into one sorted by start.
fn merge_by_start(
    a: impl Iterator<Item = MapItem>,
    b: impl Iterator<Item = MapItem>,
) -> impl Iterator<Item = MapItem> {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    std::iter::from_fn(move || match (a.peek(), b.peek()) {
        (Some(x), Some(y)) if y.start() < x.start() => b.next(),
        (Some(_), _) => a.next(),
        (None, _) => b.next(),
    })
}
