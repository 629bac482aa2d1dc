//! The tree paths of a flush (FORMAT-v2.md, "The flush protocol"): which changes a tree
//! flush applies and which stay journaled, the copy-on-write update within its leaf
//! budget, and the header that makes the new tree current, with the current journal kept
//! or a new region that starts with the changes carried.
use super::{
    Append, Done, FlushLimits, Leftover, Path, Snapshot, TreeJournal, JOURNALED_MOST_TIMES,
};
use crate::error::Result;
use crate::format::header::MAX_GENERATION;
use crate::format::v2::{encode_carried_record, record_len, Extent, HeaderV2, BLOCK};
use crate::image::v2::extents::ExtentMap;
use crate::image::v2::tree::{TreeRoot, Updated};
use crate::image::v2::{journal_capacity_for, lock, ImageV2, State};

impl ImageV2 {
    /// The tree path of a snapshot: which changes it applies, which stay journaled (and
    /// are carried into a new journal when `keep_journal` is `None`), the leaf budget, the
    /// new header. A resize, or more journaled changes than memory may hold (sixteen times
    /// the journaled budget), applies them all.
    pub(super) fn tree_path(
        &self,
        st: &mut State,
        limits: FlushLimits,
        keep_journal: Option<Append>,
    ) -> Path {
        if let (Some(append), None) = (keep_journal, st.pending_resize) {
            return self.kept_journal_path(st, limits, append);
        }
        let mut all = st.journaled.clone();
        all.apply(&st.in_flight);
        let too_many = holds_too_many(&all, limits);
        let (updates, carried, leaf_budget) = if st.pending_resize.is_some() || too_many {
            // A resize publishes its whole map with the new size.
            (all, ExtentMap::default(), usize::MAX)
        } else {
            let (updates, carried) =
                split_at_cursor(all, limits.tree_flush_extents, &mut st.tree_cursor);
            // What a new journal carries takes at most half of it: when what the split
            // leaves out does not fit, everything is applied; when what the leaf budget
            // could leave out too would not fit, the budget is lifted.
            let half = journal_capacity_for(st.header.virtual_size) / 2;
            let carried_items = disk_items(&carried);
            if record_len(carried_items) + BLOCK > half {
                let mut all = updates;
                all.apply(&carried);
                (all, ExtentMap::default(), usize::MAX)
            } else if record_len(carried_items + disk_items(&updates)) + BLOCK > half {
                (updates, carried, usize::MAX)
            } else {
                (updates, carried, limits.tree_flush_leaves)
            }
        };
        self.tree_path_with(st, updates, Some(carried), leaf_budget, keep_journal)
    }

    /// The kept-journal tree path: the journaled changes, with the in-flight ones laid
    /// over them, become the in-flight changes (reads find the same there), and the
    /// updates are taken from them without copying the rest: what the flush does not
    /// apply stays in the map, which its publish makes the journaled changes again.
    /// (Copying a map of 4k journaled extents and dropping the old one took about 0.5 ms
    /// with every read and write paused, at every other flush of random 4 KiB writes.)
    fn kept_journal_path(&self, st: &mut State, limits: FlushLimits, append: Append) -> Path {
        let mut all = std::mem::take(&mut st.journaled);
        all.apply(&st.in_flight);
        st.in_flight = all;
        if holds_too_many(&st.in_flight, limits) {
            let updates = st.in_flight.clone();
            return self.tree_path_with(
                st,
                updates,
                Some(ExtentMap::default()),
                usize::MAX,
                Some(append),
            );
        }
        let updates = select_at_cursor(
            &st.in_flight,
            limits.tree_flush_extents,
            &mut st.tree_cursor,
        );
        self.tree_path_with(st, updates, None, limits.tree_flush_leaves, Some(append))
    }

    fn tree_path_with(
        &self,
        st: &State,
        updates: ExtentMap,
        carried: Option<ExtentMap>,
        leaf_budget: usize,
        keep_journal: Option<Append>,
    ) -> Path {
        // `snapshot` refuses a tree path at the limit before it takes the changes.
        debug_assert!(st.header.generation < MAX_GENERATION);
        let mut header = st.header.clone();
        header.generation += 1;
        if let Some(size) = st.pending_resize {
            header.virtual_size = size;
        }
        Path::Tree {
            updates,
            carried,
            leaf_budget,
            header,
            active_slot: st.active_slot,
            keep_journal,
        }
    }

    pub(super) fn write_tree(&self, s: &Snapshot) -> Result<Done> {
        let Path::Tree {
            updates,
            carried,
            leaf_budget,
            header,
            active_slot,
            keep_journal,
        } = &s.path
        else {
            unreachable!("called for the tree path");
        };
        // The record and the pages go down under one barrier, in either order.
        let appended = match keep_journal {
            Some(append) => Some(self.write_record(&s.items, *append)?),
            None => None,
        };
        let mut claimed = Vec::new();
        let updated = {
            let tree = self.tree(&lock(&self.state));
            let mut alloc = || {
                let (h, _) = lock(&self.state).alloc.allocate(self.storage.as_ref(), 1);
                claimed.push(h);
                Ok(h * BLOCK)
            };
            tree.update_leaves(updates, *leaf_budget, header.generation, &mut alloc)
        };
        {
            let mut st = lock(&self.state);
            for h in claimed.drain(..) {
                st.alloc.release(h);
            }
        }
        let updated = updated?;
        let carried = match carried {
            Some(carried) => {
                Leftover::Apart(carried_after(carried, updates, updated.applied_below))
            }
            None => Leftover::InFlightLess(applied_starts(updates, updated.applied_below)),
        };
        let (header, journal) = match appended {
            Some(appended) => {
                // K2 and K3: the record and the pages durable, then the header, whose
                // journal is the same region, epoch and records. It needs no barrier of
                // its own: the other slot, with the old tree and the same records, is the
                // same state. The next barrier makes it durable; until then the pages it
                // replaces are not reused (`publish`).
                self.sync()?;
                let header = with_root(header, &updated);
                self.write_header_slot(&header, *active_slot)?;
                (header, TreeJournal::Kept(appended))
            }
            None => {
                let Leftover::Apart(carried) = &carried else {
                    unreachable!("a new journal's changes are held apart");
                };
                self.write_tree_new_journal(&updated, header, *active_slot, carried)?
            }
        };
        Ok(Done::Tree {
            updated,
            header,
            carried,
            journal,
        })
    }

    /// Steps T1 to T4 once the pages are written: a new journal region that starts with
    /// the carried changes, then the header.
    fn write_tree_new_journal(
        &self,
        updated: &Updated,
        header: &HeaderV2,
        active_slot: usize,
        carried: &ExtentMap,
    ) -> Result<(HeaderV2, TreeJournal)> {
        let (old_header_journal, journal) = {
            let mut st = lock(&self.state);
            // The region of the journal before the current one is kept for this: tree
            // flushes alternate between two regions instead of growing the file by one each.
            let blocks = journal_capacity_for(header.virtual_size) / BLOCK;
            let journal = match st.spare_journal.take() {
                Some(spare) if spare.1 == blocks => spare,
                other => {
                    if let Some((s, n)) = other {
                        let _ = self.storage.punch_hole(s * BLOCK, n * BLOCK);
                    }
                    st.alloc.allocate_at_end(blocks)
                }
            };
            let old = (
                st.header.journal_offset / BLOCK,
                st.header.journal_capacity / BLOCK,
            );
            (old, journal)
        };
        // The new region stays claimed until the publish reserves it: it is all holes, and
        // a write running meanwhile that reuses holes would be given blocks in it, which
        // the next record then overwrites.
        match self.write_tree_header(updated, header, active_slot, journal, carried) {
            Ok((header, journal_tail)) => Ok((
                header,
                TreeJournal::New {
                    old_journal: old_header_journal,
                    journal_tail,
                },
            )),
            Err(e) => {
                lock(&self.state).alloc.release(journal.0);
                Err(e)
            }
        }
    }

    /// Steps T1 (the new journal region, with the carried changes) to T4 once the pages
    /// are written. Returns the new header and where the next record goes.
    fn write_tree_header(
        &self,
        updated: &Updated,
        header: &HeaderV2,
        active_slot: usize,
        journal: (u64, u64),
        carried: &ExtentMap,
    ) -> Result<(HeaderV2, u64)> {
        let (js, jl) = journal;
        let journal_end = (js + jl) * BLOCK;
        let len = self
            .storage
            .len()
            .map_err(|e| self.io_err("reading length", 0, e))?;
        if len < journal_end {
            self.storage
                .set_len(journal_end)
                .map_err(|e| self.io_err("extending the file over a new journal", len, e))?;
        }
        // A new region reads as zeros wherever holes can be punched (it was past the end).
        let _ = self.storage.punch_hole(js * BLOCK, jl * BLOCK);
        let epoch = crate::image::random_epoch();
        let tail = self.write_carried(js * BLOCK, epoch, carried)?;
        self.sync()?;
        let mut new_header = with_root(header, updated);
        new_header.journal_offset = js * BLOCK;
        new_header.journal_capacity = jl * BLOCK;
        new_header.journal_epoch = epoch;
        self.write_header_slot(&new_header, active_slot)?;
        self.sync()?;
        Ok((new_header, tail))
    }

    /// The changes a tree flush left out, as the new journal's first record, marked
    /// carried: their data is durable already, so replay never reads it back. Returns the
    /// journal's tail after it.
    fn write_carried(&self, journal_at: u64, epoch: u64, carried: &ExtentMap) -> Result<u64> {
        if carried.is_empty() {
            return Ok(0);
        }
        let items: Vec<Extent> = carried.iter().flat_map(Extent::split_for_disk).collect();
        let bytes = encode_carried_record(epoch, &items);
        self.storage
            .write_at(&bytes, journal_at)
            .map_err(|e| self.io_err("writing a journal record", journal_at, e))?;
        Ok(bytes.len() as u64)
    }
}

impl State {
    /// A tree flush's new journal region is published: it is reserved, and the old one
    /// is kept for the next such flush (punched at close).
    pub(super) fn new_journal(
        &mut self,
        header: &HeaderV2,
        old_journal: (u64, u64),
        journal_tail: u64,
    ) {
        let region = (
            header.journal_offset / BLOCK,
            header.journal_capacity / BLOCK,
        );
        self.alloc.set_reserved(vec![region, old_journal]);
        self.alloc.release(region.0);
        // The carried record, when there is one, is record 1.
        self.journal_tail = journal_tail;
        self.journal_next_seq = if journal_tail == 0 { 1 } else { 2 };
        self.last_record_has_data = false;
        self.journal_reserved = false;
        self.spare_journal = Some(old_journal);
    }
}

/// The header of a tree flush: `header` with the new tree's root.
fn with_root(header: &HeaderV2, updated: &Updated) -> HeaderV2 {
    let TreeRoot {
        root,
        height,
        extents,
    } = updated.root;
    let mut h = header.clone();
    h.map_root = root;
    h.map_height = height;
    h.map_extents = extents;
    h
}

/// How many items `map` takes in a journal record.
fn disk_items(map: &ExtentMap) -> u64 {
    map.iter()
        .map(|e| e.len.div_ceil(crate::format::v2::MAX_EXTENT_BLOCKS))
        .sum()
}

/// The changes a tree flush carries into the new journal: `carried`, and the updates at and
/// above `applied_below` when the update stopped there (one that straddles it whole:
/// applying its first part again is no change).
fn carried_after(
    carried: &ExtentMap,
    updates: &ExtentMap,
    applied_below: Option<u64>,
) -> ExtentMap {
    let mut carried = carried.clone();
    if let Some(at) = applied_below {
        for e in updates.iter().filter(|e| e.end() > at) {
            carried.set(e.start, e.len, e.mapping);
        }
    }
    carried
}

/// More changes than memory may hold (sixteen times the journaled budget): a tree flush
/// applies them all.
fn holds_too_many(changes: &ExtentMap, limits: FlushLimits) -> bool {
    changes.len()
        > limits
            .journaled_extents
            .saturating_mul(JOURNALED_MOST_TIMES)
}

/// The first blocks of the updates a tree flush applied: all of them, or those that end
/// at or below where it stopped (one that straddles it stays whole, as in
/// [`carried_after`]).
fn applied_starts(updates: &ExtentMap, applied_below: Option<u64>) -> Vec<u64> {
    updates
        .iter()
        .filter(|e| applied_below.is_none_or(|at| e.end() <= at))
        .map(|e| e.start)
        .collect()
}

/// The at most `most` changes a tree flush applies, taken whole in key order from
/// `cursor` on (wrapping around, so that every range gets its turn); moves the cursor past
/// them.
fn select_at_cursor(all: &ExtentMap, most: usize, cursor: &mut u64) -> ExtentMap {
    if all.len() <= most {
        *cursor = 0;
        return all.clone();
    }
    let mut applied = ExtentMap::default();
    let mut end = 0;
    for e in all.iter_from(*cursor).take(most) {
        end = e.end();
        applied.insert_apart(e);
    }
    let short = most - applied.len();
    if short > 0 {
        // Wrap around: the rest of the extents to apply are the first ones (there are
        // more than `short` of them before the cursor, as the map holds more than `most`).
        for e in all.iter().take(short) {
            end = e.end();
            applied.insert_apart(e);
        }
    }
    *cursor = end;
    applied
}

/// Splits the changes of a tree flush into the ones it applies ([`select_at_cursor`]) and
/// the rest, which it carries into the new journal.
fn split_at_cursor(all: ExtentMap, most: usize, cursor: &mut u64) -> (ExtentMap, ExtentMap) {
    if all.len() <= most {
        *cursor = 0;
        return (all, ExtentMap::default());
    }
    let applied = select_at_cursor(&all, most, cursor);
    let mut carried = all;
    for e in applied.iter() {
        carried.forget(e.start);
    }
    (applied, carried)
}

#[cfg(test)]
mod tests {
    use super::super::TREE_FLUSH_EXTENTS;
    use super::*;
    use crate::format::v2::Mapping;

    fn map_of(starts: impl IntoIterator<Item = u64>) -> ExtentMap {
        let mut m = ExtentMap::default();
        for s in starts {
            // Two blocks each, mapped so that no two neighbours join.
            m.set(s * 3, 2, Mapping::Data(1000 + s * 7));
        }
        m
    }

    fn starts(m: &ExtentMap) -> Vec<u64> {
        m.iter().map(|e| e.start / 3).collect()
    }

    #[test]
    fn a_tree_flush_takes_its_extents_from_the_cursor_and_wraps_around() {
        let n = TREE_FLUSH_EXTENTS as u64;
        let mut cursor = 0;
        let (applied, carried) =
            split_at_cursor(map_of(0..n + 10), TREE_FLUSH_EXTENTS, &mut cursor);
        assert_eq!(starts(&applied), (0..n).collect::<Vec<_>>());
        assert_eq!(starts(&carried), (n..n + 10).collect::<Vec<_>>());
        assert_eq!(cursor, (n - 1) * 3 + 2);

        // From the cursor: the last ten, then the first n - 10 again.
        let (applied, carried) =
            split_at_cursor(map_of(0..n + 10), TREE_FLUSH_EXTENTS, &mut cursor);
        let mut want: Vec<u64> = (0..n - 10).collect();
        want.extend(n..n + 10);
        assert_eq!(starts(&applied), want);
        assert_eq!(starts(&carried), (n - 10..n).collect::<Vec<_>>());
        assert_eq!(cursor, (n - 11) * 3 + 2);
    }

    #[test]
    fn a_tree_flush_with_few_changes_applies_them_all() {
        let mut cursor = 77;
        let (applied, carried) = split_at_cursor(map_of(0..5), TREE_FLUSH_EXTENTS, &mut cursor);
        assert_eq!(applied.len(), 5);
        assert!(carried.is_empty());
        assert_eq!(cursor, 0);
    }
}
