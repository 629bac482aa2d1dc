//! The flush protocol (FORMAT-v2.md, "The flush protocol"): a snapshot, then a journal
//! record (one barrier) or a copy-on-write tree update and a header slot (two barriers),
//! then the publish that makes the new state current and frees what it no longer needs.
//! A failed flush goes back to the durable state, as an open would find it.
use super::extents::ExtentMap;
use super::tree::Updated;
use super::{exclusive, load, lock, ImageV2, State};
use crate::error::{Error, Result};
use crate::format::header::MAX_GENERATION;
use crate::format::v2::{encode_record, record_len, Extent, HeaderV2, Mapping, BLOCK};
use crate::format::HEADER_SLOT_SIZE;
use std::sync::atomic::Ordering;

mod tree_path;

/// Freed blocks wait for reuse up to this many: a sixteenth of what the file holds, and at
/// least 4 MiB (or a 64th of a smaller disk); past it, the highest are punched down to half
/// of it. The rest are punched at close. Random overwrites free about as many blocks per
/// flush as the writes after it take again, so a pool that scales with the data is reused
/// instead of punched a block at a time; a sixteenth keeps the file within 1.07x its live
/// data when trims free more than writes reuse.
fn freed_pool_blocks(virtual_size: u64, allocated_bytes: u64) -> u64 {
    (virtual_size / 64 / BLOCK)
        .clamp(1, 1024)
        .max(allocated_bytes / BLOCK / 16)
}
/// The in-flight extents a journal flush lays over the journaled ones per hold of the
/// state lock, which every write takes too.
const MERGE_CHUNK: usize = 32;
/// A flush punches at most this many runs of freed blocks; what is left over waits for the
/// next flush (or reuse). Each punch holds the file's lock, so that writes wait for all of
/// them (a synchronous discard each, on a file system mounted with `discard`): before this
/// bound, random overwrites made about 1,700 punches per flush, and one publish held every
/// write for 1.2 s.
const MAX_PUNCHES_PER_FLUSH: usize = 256;
/// The changes journaled since the tree was written are held in memory; past this many
/// extents the next flush writes changes into the tree, so that an image's memory stays
/// small however much was written (a server holds many images).
const JOURNALED_BUDGET: usize = 4096;
/// Past this many times [`JOURNALED_BUDGET`] journaled extents (64k, about 3 MiB), a tree
/// flush applies them all: the most an image holds in memory of changes not in the tree.
/// A client that never flushes makes a flush every 16k extents; each applies a share within
/// the leaf budget until this many gather (applying many at once rewrites each leaf once
/// for all its changes).
const JOURNALED_MOST_TIMES: usize = 16;
/// A tree flush keeps the current journal region while its records take at most this
/// much; past it, the tree flush starts a new region, with the changes it did not apply as
/// its first record. So an open replays at most this much of records kept across tree
/// flushes (a full 2 MiB region took 29-45 ms to replay at open, against 3-5 ms), and the
/// carried record is written once per this much of records, not at every tree flush.
const KEPT_JOURNAL_BYTES: u64 = 256 << 10;
/// A tree flush applies at most this many extents of changes; the rest are carried into
/// the new journal.
const TREE_FLUSH_EXTENTS: usize = 256;
/// ... and rewrites at most this many leaves (and the pages above them, a few for leaves
/// next to each other): on a large map scattered changes fall in a leaf each, and a flush
/// that rewrote 256 leaves took 8 ms, against 2 ms on a small map. This bounds the longest
/// flush whatever the size of the map; a flush that is left more changes than a carried
/// record may hold applies them all instead.
const TREE_FLUSH_LEAVES: usize = 48;

/// The bounds of a flush's work: [`JOURNALED_BUDGET`], [`TREE_FLUSH_EXTENTS`],
/// [`TREE_FLUSH_LEAVES`] and [`KEPT_JOURNAL_BYTES`] unless a test sets smaller ones ([`crate::image::Image::set_flush_limits`]),
/// so that a map of a few pages takes every path a map of millions of extents does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushLimits {
    /// Extents of journaled changes held in memory before a flush writes them to the tree.
    pub journaled_extents: usize,
    /// The most extents one tree flush applies.
    pub tree_flush_extents: usize,
    /// The most existing leaves one tree flush rewrites (unless it applies everything).
    pub tree_flush_leaves: usize,
    /// How far into the journal region a tree flush may append its record and keep the
    /// region.
    pub kept_journal_bytes: u64,
}

impl Default for FlushLimits {
    fn default() -> FlushLimits {
        FlushLimits {
            journaled_extents: JOURNALED_BUDGET,
            tree_flush_extents: TREE_FLUSH_EXTENTS,
            tree_flush_leaves: TREE_FLUSH_LEAVES,
            kept_journal_bytes: KEPT_JOURNAL_BYTES,
        }
    }
}

struct Snapshot {
    number: u64,
    items: Vec<Extent>,
    /// The ranges this snapshot changes that the journaled changes do not: what the tree
    /// maps there, it replaces.
    below: Vec<(u64, u64)>,
    path: Path,
}

/// Where a record goes in the current journal.
#[derive(Clone, Copy)]
struct Append {
    at: u64,
    epoch: u64,
    sequence: u64,
    /// The journal region, when it is not reserved yet.
    reserve: Option<(u64, u64)>,
}

enum Path {
    Journal(Append),
    Tree {
        updates: ExtentMap,
        /// Changes left out of this tree flush: journaled still, in memory and on disk.
        /// `None`: the in-flight changes, less the updates it applies (the kept-journal
        /// path).
        carried: Option<ExtentMap>,
        /// The most leaves the update may rewrite; the updates it leaves out are carried.
        leaf_budget: usize,
        header: HeaderV2,
        active_slot: usize,
        /// `Some`: the flush's changes go into the current journal as a record, which keeps
        /// every record (replayed whole over the new tree). `None`: a new journal region,
        /// which starts with the carried changes as record 1.
        keep_journal: Option<Append>,
    },
}

/// What a completed flush publishes (one per flush: the size of the variants is no cost).
#[allow(clippy::large_enum_variant)]
enum Done {
    Journal(Appended),
    Tree {
        updated: Updated,
        header: HeaderV2,
        carried: Leftover,
        journal: TreeJournal,
    },
}

/// The changes a tree flush left out, which its publish makes the journaled changes.
enum Leftover {
    Apart(ExtentMap),
    /// The in-flight changes less the updates that start at these blocks.
    InFlightLess(Vec<u64>),
}

/// A record written: its length and whether it maps data.
struct Appended {
    len: u64,
    has_data: bool,
}

enum TreeJournal {
    /// The current journal, with this flush's record appended.
    Kept(Appended),
    /// A new region; the old one and where the next record goes in the new one.
    New {
        old_journal: (u64, u64),
        journal_tail: u64,
    },
}

impl ImageV2 {
    /// One barrier (fdatasync) of the image file.
    fn sync(&self) -> Result<()> {
        self.storage
            .sync()
            .map_err(|e| self.io_err("syncing", 0, e))
    }

    /// Makes every write that completed before the call durable.
    pub fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        if self.failed.load(Ordering::Acquire) {
            return Err(Error::Failed {
                path: self.path.clone(),
            });
        }
        // The first snapshot taken from now on covers every write completed before this
        // call; flushes queued behind another that took such a snapshot return once it is
        // published, without a barrier of their own (group commit).
        let needed = lock(&self.state).snapshots_taken + 1;
        let _serial = lock(&self.flush_serial);
        let snapshot = {
            let _pause = exclusive(&self.gate);
            let mut st = lock(&self.state);
            if st.snapshots_published >= needed {
                return Ok(());
            }
            self.snapshot(&mut st)?
        };
        let Some(snapshot) = snapshot else {
            return self
                .sync_unsynced_header()
                .map_err(|e| self.revert_to_durable(e));
        };
        // What the snapshot replaces in the tree is needed only at the publish: the walk
        // runs beside the record, the pages and the barrier instead of before them.
        let write = || match &snapshot.path {
            Path::Journal(append) => self
                .append_record(&snapshot.items, *append)
                .map(Done::Journal),
            Path::Tree { .. } => self.write_tree(&snapshot),
        };
        // The journal path also lays its changes over the journaled ones there.
        let merge = matches!(snapshot.path, Path::Journal(_));
        let beside = || {
            let walked = self.replaced_below(&snapshot);
            if merge {
                self.merge_in_flight_early();
            }
            walked
        };
        let (walked, done) = if snapshot.below.is_empty() && !merge {
            (Ok(()), write())
        } else {
            std::thread::scope(|scope| {
                let walk = scope.spawn(beside);
                let done = write();
                let walked = walk.join().unwrap_or_else(|_| {
                    Err(Error::Invalid {
                        path: self.path.clone(),
                        reason: "finding the blocks a flush replaces panicked".into(),
                    })
                });
                (walked, done)
            })
        };
        match walked.and(done) {
            Ok(done) => {
                self.publish(snapshot.number, done);
                Ok(())
            }
            Err(e) => Err(self.revert_to_durable(e)),
        }
    }

    fn snapshot(&self, st: &mut State) -> Result<Option<Snapshot>> {
        if st.pending.is_empty() && st.pending_resize.is_none() {
            return Ok(None);
        }
        let items: Vec<Extent> = st.pending.iter().flat_map(Extent::split_for_disk).collect();
        let len = record_len(items.len() as u64);
        let fits = st.journal_tail + len <= st.header.journal_capacity;
        let limits = *lock(&self.limits);
        let small = st.journaled.len() + st.pending.len() <= limits.journaled_extents;
        let append = (fits && st.pending_resize.is_none()).then(|| Append {
            at: st.header.journal_offset + st.journal_tail,
            epoch: st.header.journal_epoch,
            sequence: st.journal_next_seq,
            reserve: (!st.journal_reserved)
                .then_some((st.header.journal_offset, st.header.journal_capacity)),
        });
        let keeps =
            st.journal_tail + len <= st.header.journal_capacity.min(limits.kept_journal_bytes);
        let journal_path = append.is_some() && small;
        if !journal_path && st.header.generation >= MAX_GENERATION {
            // Refused before the changes are taken: they stay pending, read as written.
            return Err(self.generation_limit());
        }
        st.snapshots_taken += 1;
        st.in_flight = std::mem::take(&mut st.pending);
        // Before the tree path, which may lay the in-flight changes over the journaled
        // ones in place.
        let below = st.replaced_in_journal();
        let path = match append {
            Some(append) if small => Path::Journal(append),
            Some(append) if keeps => self.tree_path(st, limits, Some(append)),
            _ => self.tree_path(st, limits, None),
        };
        Ok(Some(Snapshot {
            number: st.snapshots_taken,
            items,
            below,
            path,
        }))
    }

    /// The error of a header update the generation cannot count any more.
    pub(super) fn generation_limit(&self) -> Error {
        Error::Invalid {
            path: self.path.clone(),
            reason: "the header generation reached its limit (2^62)".into(),
        }
    }

    /// Queues for freeing at the snapshot's publish the data the tree maps where the
    /// snapshot changes what the journaled changes do not. The tree is walked without the
    /// gate: only this flush (holding `flush_serial`) changes it or frees its pages, and
    /// it does so at its publish (a tree flush writes its new pages beside the walk,
    /// copy-on-write, and the allocator never hands out a page the current tree reaches).
    fn replaced_below(&self, snapshot: &Snapshot) -> Result<()> {
        if snapshot.below.is_empty() {
            return Ok(());
        }
        let tree = self.tree(&lock(&self.state));
        let mut data = Vec::new();
        tree.lookup_ranges(&snapshot.below, &mut |e| {
            if let Mapping::Data(h) = e.mapping {
                data.push((snapshot.number, h, e.len));
            }
        })?;
        lock(&self.state).to_free.extend(data);
        Ok(())
    }

    /// Lays the in-flight changes of a journal flush over the journaled ones, a few at a
    /// time, beside its barrier: a read finds the same either way, since it looks in the
    /// in-flight changes first, and the publish, which pauses every read and write, is
    /// left only to drop the in-flight map. (Laying about 100 extents over 4k journaled
    /// ones was most of a publish's 140 µs under random 4 KiB writes.) A flush that fails
    /// goes back to the durable state, which replaces both maps.
    fn merge_in_flight_early(&self) {
        let mut from = 0;
        loop {
            let mut st = lock(&self.state);
            let chunk: Vec<Extent> = st.in_flight.iter_from(from).take(MERGE_CHUNK).collect();
            for e in &chunk {
                st.journaled.set(e.start, e.len, e.mapping);
            }
            match chunk.last() {
                Some(last) if chunk.len() == MERGE_CHUNK => from = last.end(),
                _ => return,
            }
        }
    }

    /// Steps J1 and J2: the record of `items` (this flush's changes) at `append`. The
    /// caller syncs (J3).
    fn write_record(&self, items: &[Extent], append: Append) -> Result<Appended> {
        if let Some((offset, len)) = append.reserve {
            // Reserving the region once means appending a record never needs new space.
            if self.storage.reserve(offset, len).is_ok() {
                lock(&self.state).journal_reserved = true;
            }
        }
        let digest = super::digest_extents(self.storage.as_ref(), items)
            .map_err(|(at, e)| self.io_err("reading back data to flush", at, e))?;
        let record = encode_record(append.epoch, append.sequence, items, digest);
        self.storage
            .write_at(&record, append.at)
            .map_err(|e| self.io_err("writing a journal record", append.at, e))?;
        Ok(Appended {
            len: record.len() as u64,
            has_data: items.iter().any(|e| matches!(e.mapping, Mapping::Data(_))),
        })
    }

    /// The journal path: a record and its barrier.
    fn append_record(&self, items: &[Extent], append: Append) -> Result<Appended> {
        let appended = self.write_record(items, append)?;
        self.sync()?;
        Ok(appended)
    }

    /// Step T3 (K3): the inactive header slot. The caller syncs (T4), or leaves the slot
    /// to the next barrier (the kept-journal path).
    fn write_header_slot(&self, header: &HeaderV2, active_slot: usize) -> Result<()> {
        let slot_at = ((1 - active_slot) * HEADER_SLOT_SIZE) as u64;
        self.storage
            .write_at(&header.to_bytes(), slot_at)
            .map_err(|e| self.io_err("writing the header", slot_at, e))
    }

    /// With nothing to flush, the barrier a header slot written without one still waits
    /// for (so that a close, or a header change, never leaves it behind), then frees the
    /// pages that waited for it.
    fn sync_unsynced_header(&self) -> Result<()> {
        if !lock(&self.state).header_unsynced {
            return Ok(());
        }
        self.sync()?;
        let freed = {
            let mut st = lock(&self.state);
            st.header_unsynced = false;
            std::mem::take(&mut st.freed_after_barrier)
        };
        lock(&self.state).alloc.give_back(freed);
        Ok(())
    }

    fn publish(&self, number: u64, done: Done) {
        let mut freed: Vec<(u64, u64)> = Vec::new();
        let mut forgotten_pages = Vec::new();
        {
            let _pause = exclusive(&self.gate);
            let mut guard = lock(&self.state);
            let st = &mut *guard;
            // Every flush path syncs before its publish: a header slot written without a
            // barrier before this flush is durable now, and the pages it replaced are free.
            freed.append(&mut st.freed_after_barrier);
            st.header_unsynced = false;
            match done {
                Done::Journal(appended) => {
                    // Laid over the journaled changes already (`merge_in_flight_early`).
                    st.in_flight = ExtentMap::default();
                    st.appended(appended);
                }
                Done::Tree {
                    updated,
                    header,
                    carried,
                    journal,
                } => {
                    // The kept-journal path leaves its slot to the next barrier; until then
                    // the other slot may be the durable one, and it reaches the old pages.
                    let header_synced = matches!(journal, TreeJournal::New { .. });
                    // Where the next tree flush starts, when this one stopped at its budget.
                    if let Some(at) = updated.applied_below {
                        st.tree_cursor = at;
                    }
                    st.journaled = match carried {
                        Leftover::Apart(carried) => {
                            st.in_flight = ExtentMap::default();
                            carried
                        }
                        Leftover::InFlightLess(applied) => {
                            let mut rest = std::mem::take(&mut st.in_flight);
                            for start in applied {
                                rest.forget(start);
                            }
                            rest
                        }
                    };
                    st.tree = updated.root;
                    match journal {
                        TreeJournal::Kept(appended) => st.appended(appended),
                        TreeJournal::New {
                            old_journal,
                            journal_tail,
                        } => st.new_journal(&header, old_journal, journal_tail),
                    }
                    st.header = header;
                    st.active_slot = 1 - st.active_slot;
                    st.pending_resize = None;
                    st.header_unsynced = !header_synced;
                    for page in updated.replaced_pages {
                        if header_synced {
                            freed.push((page / BLOCK, 1));
                        } else {
                            st.freed_after_barrier.push((page / BLOCK, 1));
                        }
                        forgotten_pages.push(page);
                    }
                }
            }
            st.snapshots_published = number;
            st.to_free.retain(|&(at, h, n)| {
                if at <= number {
                    freed.push((h, n));
                    false
                } else {
                    true
                }
            });
        }
        for page in forgotten_pages {
            self.cache.forget(self.cache_key, page);
        }
        // Freed blocks go back to the allocator, which hands them out before growing the
        // file: overwriting them is an overwrite of allocated blocks, with no file-system
        // transaction. What gathers beyond a few MiB (a trim frees more than writes reuse)
        // is punched, the highest blocks first; a punch that fails leaves a leak, never a
        // problem. Punches are batched: each is a file-system transaction (a synchronous
        // discard where the file system is mounted with `discard`).
        // A stat of the file, taken before the lock that every write needs.
        let allocated = self.storage.allocated_bytes().unwrap_or(0);
        let to_punch = {
            let mut st = lock(&self.state);
            st.alloc.give_back(freed);
            let most = freed_pool_blocks(st.header.virtual_size, allocated);
            if st.alloc.freed_blocks() <= most {
                return;
            }
            st.alloc.take_freed_above(most / 2, MAX_PUNCHES_PER_FLUSH)
        };
        self.punch_runs(to_punch);
    }

    /// Punches `freed` (first block, blocks), adjacent runs together.
    pub(super) fn punch_runs(&self, mut freed: Vec<(u64, u64)>) {
        freed.sort_unstable();
        let mut i = 0;
        while i < freed.len() {
            let (start, mut len) = freed[i];
            let mut j = i + 1;
            while j < freed.len() && freed[j].0 == start + len {
                len += freed[j].1;
                j += 1;
            }
            let _ = self.storage.punch_hole(start * BLOCK, len * BLOCK);
            i = j;
        }
    }

    /// Called by a failed flush holding `flush_serial`: loads the durable state from the
    /// disk, as an open does, and returns the error to report (FORMAT.md, "Crash safety").
    fn revert_to_durable(&self, cause: Error) -> Error {
        let _pause = exclusive(&self.gate);
        let mut st = lock(&self.state);
        self.storage.wont_need(0, 0);
        match load::load(self.storage.as_ref(), &self.path) {
            Ok(loaded) => {
                let old = std::mem::replace(&mut *st, State::from_loaded(loaded));
                // The failed snapshot is not published: flushes queued behind it take their
                // own, against the state gone back to.
                st.snapshots_taken = old.snapshots_taken;
                st.snapshots_published = old.snapshots_published;
                // The slot just loaded may not be durable yet: a barrier comes before any
                // other slot is written.
                st.header_unsynced = true;
                self.cache.forget_image(self.cache_key);
                self.reverts.fetch_add(1, Ordering::AcqRel);
                eprintln!(
                    "cowimg: {}: a flush failed ({cause}); went back to the last durable state",
                    self.path.display()
                );
                Error::Reverted {
                    path: self.path.clone(),
                    source: Box::new(cause),
                }
            }
            Err(reload) => {
                self.failed.store(true, Ordering::Release);
                Error::Invalid {
                    path: self.path.clone(),
                    reason: format!(
                        "{cause}; going back to the last durable state failed too ({reload}): the image refuses changes until it is reopened"
                    ),
                }
            }
        }
    }

    /// After the closing flush: an empty record, so that the next open need not read the
    /// last record's data back.
    pub(super) fn seal(&self) -> Result<()> {
        let (at, epoch, sequence) = {
            let st = lock(&self.state);
            if !st.last_record_has_data
                || st.journal_tail + record_len(0) > st.header.journal_capacity
            {
                return Ok(());
            }
            (
                st.header.journal_offset + st.journal_tail,
                st.header.journal_epoch,
                st.journal_next_seq,
            )
        };
        let digest = super::digest_extents(self.storage.as_ref(), &[])
            .map_err(|(at, e)| self.io_err("hashing", at, e))?;
        let record = encode_record(epoch, sequence, &[], digest);
        self.storage
            .write_at(&record, at)
            .map_err(|e| self.io_err("writing a journal record", at, e))?;
        self.sync()?;
        let mut st = lock(&self.state);
        st.journal_tail += record.len() as u64;
        st.journal_next_seq += 1;
        st.last_record_has_data = false;
        Ok(())
    }

    /// Sets the bounds of a flush's work (for tests: see [`FlushLimits`]).
    pub fn set_flush_limits(&self, limits: FlushLimits) {
        *lock(&self.limits) = limits;
    }

    /// Records a new backing file (rebase): a flush, then one header-slot write.
    pub fn set_backing(&mut self, backing: Option<(String, crate::image::Layer)>) -> Result<()> {
        self.check_writable()?;
        self.flush()?;
        let _serial = lock(&self.flush_serial);
        self.sync_unsynced_header()?;
        let mut st = lock(&self.state);
        if st.header.generation >= MAX_GENERATION {
            return Err(self.generation_limit());
        }
        let mut header = st.header.clone();
        header.generation += 1;
        header.backing = backing
            .as_ref()
            .map(|(path, layer)| (path.clone(), layer.format()));
        self.write_header_slot(&header, st.active_slot)?;
        self.sync()?;
        st.header = header;
        st.active_slot = 1 - st.active_slot;
        drop(st);
        self.backing = backing.map(|(_, layer)| std::sync::Arc::new(layer));
        Ok(())
    }
}

impl State {
    /// What the snapshot just taken replaces in the journaled changes: their data is
    /// queued for freeing at its publish. Returns the ranges it changes that they do not
    /// (joined where adjacent), for the tree to answer.
    fn replaced_in_journal(&mut self) -> Vec<(u64, u64)> {
        let mut below: Vec<(u64, u64)> = Vec::new();
        let mut gap = |from: u64, to: u64| match below.last_mut() {
            Some(last) if last.1 == from => last.1 = to,
            _ => below.push((from, to)),
        };
        for e in self.in_flight.iter() {
            let mut p = e.start;
            for j in self.journaled.overlapping(e.start, e.end()) {
                if j.start > p {
                    gap(p, j.start);
                }
                p = j.end();
                if let Mapping::Data(h) = j.mapping {
                    self.to_free.push((self.snapshots_taken, h, j.len));
                }
            }
            if p < e.end() {
                gap(p, e.end());
            }
        }
        below
    }

    /// A record appended to the current journal is published.
    fn appended(&mut self, a: Appended) {
        self.journal_tail += a.len;
        self.journal_next_seq += 1;
        self.last_record_has_data = a.has_data;
    }
}
