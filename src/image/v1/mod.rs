//! Format version 1 (`format-spec/FORMAT.md`): the extent map, copy-on-write, allocation
//! and the flush protocol.
//!
//! Every virtual cluster that differs from the backing file has an entry (`Entry`) with two
//! host-cluster *slots*, A and B. Each sub-cluster unit lives at its natural offset in one
//! of the two slots, reads as zeros, or falls through to the backing file. A unit whose slot
//! is referenced by the durable state (the last completed flush) is never overwritten: the
//! write goes to the other slot, and the flush that publishes the change frees the old one.
//! That is what lets a power failure fall back to exactly the last flushed state
//! (`format-spec/FORMAT.md`, "Crash safety").
//!
//! Concurrency: `gate` is held shared by every read and write for its whole duration and
//! exclusively by a flush while it takes its snapshot and while it publishes the result, so
//! no I/O straddles either moment. `state` guards the map and the allocator and is held only
//! for bookkeeping, never across data I/O.

mod cluster_runs;
mod entry;
mod free_clusters;
mod open;
mod recover;
#[cfg(test)]
mod tests;

pub(crate) use open::load;

use super::{push_extent, random_epoch, Extent, ExtentKind, FileId, ImageStats, Layer, Source};
use crate::error::{Error, Result};
use crate::format::{
    Geometry, Header, JournalRecordHeader, MapItem, BLOCK_SIZE, HEADER_SLOT_SIZE, MAP_ENTRY_SIZE,
};
use crate::storage::Storage;
use cluster_runs::ClusterRuns;
use entry::Entry;
use free_clusters::FreeClusters;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

struct State {
    header: Header,
    active_slot: usize,
    map: BTreeMap<u64, Entry>,
    dirty: Vec<u64>,
    /// Clusters without an entry that read as zeros entirely: discards of whole clusters
    /// over a backing file cost one run, however large.
    zero_runs: ClusterRuns,
    /// Run changes since the last snapshot, in order; a record lists them before entries.
    dirty_runs: Vec<MapItem>,
    free: FreeClusters,
    journal_tail: u64,
    journal_next_seq: u64,
    /// Completed flushes, for writers waiting on a pinned unit.
    commits: u64,
    /// The last journal record published data that no later barrier has confirmed.
    last_record_has_data: bool,
    /// Snapshots taken and published, numbered from 1; flushes serialize, so a published
    /// number covers every snapshot taken up to it.
    snapshots_taken: u64,
    snapshots_published: u64,
    /// Threads waiting on `committed`.
    waiters: u32,
    /// A resize waiting for its flush: the next snapshot takes the checkpoint path, and
    /// the new header carries this virtual size (see [`ImageV1::resize`]).
    pending_resize: Option<u64>,
    /// The journal's blocks are reserved in the file, so appending a record cannot fail
    /// with ENOSPC (which would send the image back to its durable state and lose the
    /// writes since). Reserved at the first record after an open, a checkpoint or a
    /// revert, while there is space.
    journal_reserved: bool,
}

impl State {
    fn journal_position(&self) -> u64 {
        self.header.journal_offset + self.journal_tail
    }
}

pub struct ImageV1 {
    pub(in crate::image) path: PathBuf,
    storage: Arc<dyn Storage>,
    read_only: bool,
    geometry: Geometry,
    virtual_size: u64,
    /// Shared with other images when opened through a [`LayerRegistry`].
    pub(in crate::image) backing: Option<Arc<Layer>>,
    /// Keeps the lock on the file for as long as the image is open.
    pub(in crate::image) _lock_file: Option<std::fs::File>,
    /// The identity of the image's file (None for other storage), to refuse chains that
    /// loop back to it.
    pub(in crate::image) identity: Option<FileId>,
    gate: RwLock<()>,
    state: Mutex<State>,
    committed: Condvar,
    flush_serial: Mutex<()>,
    /// Set only when the image could not go back to its durable state after a failed
    /// flush (see `recover.rs`): nothing is known about it then, so it refuses changes.
    failed: AtomicBool,
    /// Times the image went back to its durable state after a failed flush, so that each
    /// client with writes since its last flush can be told they were lost.
    reverts: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
fn shared(g: &RwLock<()>) -> RwLockReadGuard<'_, ()> {
    g.read().unwrap_or_else(|e| e.into_inner())
}
fn exclusive(g: &RwLock<()>) -> RwLockWriteGuard<'_, ()> {
    g.write().unwrap_or_else(|e| e.into_inner())
}

/// Merges consecutive runs whose source continues, then hands them to `f`.
struct RunMerger<F: FnMut(u64, u64, Source)> {
    run: Option<(u64, u64, Source)>,
    f: F,
}

impl<F: FnMut(u64, u64, Source)> RunMerger<F> {
    fn push(&mut self, start: u64, length: u64, src: Source) {
        if length == 0 {
            return;
        }
        if let Some((rs, rl, rsrc)) = &mut self.run {
            let follows = match (*rsrc, src) {
                (Source::Host(a), Source::Host(b)) => a + *rl == b,
                (a, b) => a == b,
            };
            if *rs + *rl == start && follows {
                *rl += length;
                return;
            }
            (self.f)(*rs, *rl, *rsrc);
        }
        self.run = Some((start, length, src));
    }

    fn finish(mut self) {
        if let Some((s, l, src)) = self.run.take() {
            (self.f)(s, l, src);
        }
    }
}

/// One unit of a planned write.
struct UnitWrite {
    vcluster: u64,
    bit: u64,
    slot: usize,
    /// Byte offset of the unit's slot in the image file.
    host: u64,
    /// Virtual offset of the unit's first byte.
    unit_start: u64,
    /// The write covers the whole unit, or the unit can be updated in place: no
    /// read-modify-write is needed.
    direct: bool,
    /// Current contents, for a partial write that must copy the rest of the unit.
    old: Source,
}

enum Plan {
    Ready(Vec<UnitWrite>),
    /// Both slots of a unit are pinned by the durable state and the flush in flight: wait
    /// for that flush, then plan again.
    WaitForCommit(u64),
    /// Another write is moving this unit (virtual cluster, unit bit): wait for it.
    WaitForUnit(u64, u64),
}

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

struct PlannedCheckpoint {
    blob: Vec<u8>,
    header: Header,
    slot: usize,
    /// Clusters of the old checkpoint and journal, freed once the new header is durable.
    old_regions: Vec<(u64, u64)>,
}

impl ImageV1 {
    /// The image's file, as it was opened.
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }
    pub fn cluster_size(&self) -> u64 {
        self.geometry.cluster_size()
    }
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }
    /// The backing file, if any.
    pub fn backing(&self) -> Option<&Layer> {
        self.backing.as_deref()
    }
    /// The current header (a copy).
    pub fn header(&self) -> Header {
        lock(&self.state).header.clone()
    }
    /// The identity (device and inode) of the image's file, when it is a file.
    pub fn identity(&self) -> Option<FileId> {
        self.identity
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    pub(in crate::image) fn io_err(
        &self,
        op: &'static str,
        offset: u64,
        source: std::io::Error,
    ) -> Error {
        Error::Io {
            path: self.path.clone(),
            op,
            offset,
            source,
        }
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<()> {
        match offset.checked_add(length) {
            Some(end) if end <= self.virtual_size => Ok(()),
            _ => Err(Error::OutOfRange {
                path: self.path.clone(),
                offset,
                length,
                size: self.virtual_size,
            }),
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                path: self.path.clone(),
            });
        }
        if self.failed.load(Ordering::Acquire) {
            return Err(Error::Failed {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    fn host_offset(&self, host_cluster: u64, unit: u32) -> u64 {
        (host_cluster << self.geometry.cluster_bits) + ((unit as u64) << self.geometry.unit_bits)
    }

    /// Calls `f(virtual_offset, length, source)` for the runs of `[offset, offset+len)` in
    /// this layer, merged where the source continues.
    fn for_each_run(&self, st: &State, offset: u64, len: u64, f: impl FnMut(u64, u64, Source)) {
        let g = self.geometry;
        let end = offset + len;
        let mut out = RunMerger { run: None, f };
        // A gap between entries falls through, except where whole-cluster zero runs lie.
        let gap = |out: &mut RunMerger<_>, from: u64, to: u64| {
            let mut p = from;
            for (zs, ze) in st
                .zero_runs
                .overlapping(from >> g.cluster_bits, ((to - 1) >> g.cluster_bits) + 1)
            {
                let (zs, ze) = (
                    (zs << g.cluster_bits).max(from),
                    (ze << g.cluster_bits).min(to),
                );
                out.push(p, zs - p, Source::Backing);
                out.push(zs, ze - zs, Source::Zero);
                p = ze;
            }
            out.push(p, to - p, Source::Backing);
        };
        let mut pos = offset;
        let first_cluster = offset >> g.cluster_bits;
        let last_cluster = (end - 1) >> g.cluster_bits;
        for (&vc, e) in st.map.range(first_cluster..=last_cluster) {
            let cluster_start = vc << g.cluster_bits;
            if cluster_start > pos {
                gap(&mut out, pos, cluster_start);
                pos = cluster_start;
            }
            let cluster_end = (cluster_start + g.cluster_size()).min(end);
            while pos < cluster_end {
                let unit = ((pos - cluster_start) >> g.unit_bits) as u32;
                let unit_end =
                    (cluster_start + ((unit as u64 + 1) << g.unit_bits)).min(cluster_end);
                let bit = 1u64 << unit;
                let within = pos - cluster_start - ((unit as u64) << g.unit_bits);
                let src = match e.slot_of(bit) {
                    Some(s) => Source::Host(self.host_offset(e.host[s], unit) + within),
                    None if e.zero & bit != 0 => Source::Zero,
                    None => Source::Backing,
                };
                out.push(pos, unit_end - pos, src);
                pos = unit_end;
            }
        }
        if pos < end {
            gap(&mut out, pos, end);
        }
        out.finish();
    }

    fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        // Bytes past this image's own size are never visible; the backing file may be larger.
        match &self.backing {
            Some(b) => b.read_at(buf, offset),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    fn read_runs(&self, buf: &mut [u8], offset: u64, runs: &[(u64, u64, Source)]) -> Result<()> {
        for &(start, length, src) in runs {
            let b = &mut buf[(start - offset) as usize..(start - offset + length) as usize];
            match src {
                Source::Host(h) => self
                    .storage
                    .read_at(b, h)
                    .map_err(|e| self.io_err("reading", h, e))?,
                Source::Zero => b.fill(0),
                Source::Backing => self.read_backing(b, start)?,
            }
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` of the merged chain.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let _io = shared(&self.gate);
        let mut runs = Vec::new();
        {
            let st = lock(&self.state);
            self.for_each_run(&st, offset, buf.len() as u64, |s, l, src| {
                runs.push((s, l, src))
            });
        }
        self.read_runs(buf, offset, &runs)
    }

    /// Picks the slot a write of unit `bit` goes to: in place when the unit's current slot is
    /// not pinned, else the other slot when that one is free.
    fn pick_slot(e: &Entry, bit: u64) -> Option<usize> {
        let free = |s: usize| e.pinned(s) & bit == 0;
        match e.slot_of(bit) {
            Some(s) if free(s) => Some(s),
            Some(s) => free(1 - s).then_some(1 - s),
            None => {
                let mut candidates = (0..2).filter(|&s| free(s));
                let first = candidates.next()?;
                // Prefer a slot that already has a cluster, so as not to allocate another.
                Some(match candidates.next() {
                    Some(second) if e.host[first] == 0 && e.host[second] != 0 => second,
                    _ => first,
                })
            }
        }
    }

    fn plan_write(&self, st: &mut State, offset: u64, len: u64) -> Plan {
        let g = self.geometry;
        let us = g.unit_size();
        let end = offset + len;
        let mut plan = Vec::with_capacity((len / us + 2) as usize);
        let mut unit_start = offset & !(us - 1);
        while unit_start < end {
            // One map lookup per cluster: its units of the request are planned together.
            let vcluster = unit_start >> g.cluster_bits;
            let cluster_end = end.min((vcluster + 1) << g.cluster_bits);
            let e = entry_leaving_zero_run(&mut st.map, &mut st.zero_runs, g, vcluster);
            let first = plan.len();
            while unit_start < cluster_end {
                let unit =
                    ((unit_start >> g.unit_bits) & (g.units_per_cluster() as u64 - 1)) as u32;
                let bit = 1u64 << unit;
                let covers = offset <= unit_start && end >= unit_start + us;
                let slot = if e.busy() & bit != 0 {
                    Err(Plan::WaitForUnit(vcluster, bit))
                } else {
                    Self::pick_slot(e, bit).ok_or(Plan::WaitForCommit(st.commits))
                };
                let slot = match slot {
                    Ok(slot) => slot,
                    Err(wait) => {
                        // Nothing of this request runs yet: give back what it holds.
                        Self::release_planned(e, &plan[first..]);
                        self.release_planned_clusters(&mut st.map, &plan[..first]);
                        return wait;
                    }
                };
                if e.host[slot] == 0 {
                    e.host[slot] = st.free.allocate();
                }
                let in_place = e.units[slot] & bit != 0;
                let old = match e.slot_of(bit) {
                    Some(s) => Source::Host(self.host_offset(e.host[s], unit)),
                    None if e.zero & bit != 0 => Source::Zero,
                    None => Source::Backing,
                };
                // Held at once, so that a request spanning the unit twice cannot happen
                // and the units of this cluster are not planned by someone else meanwhile.
                e.in_flight_mut().busy |= bit;
                plan.push(UnitWrite {
                    vcluster,
                    bit,
                    slot,
                    host: self.host_offset(e.host[slot], unit),
                    unit_start,
                    direct: covers || in_place,
                    old,
                });
                unit_start += us;
            }
        }
        Plan::Ready(plan)
    }

    /// Waits until no write is in flight on the units `bits` of `vcluster` (`committed` is
    /// notified when a write ends while someone waits).
    fn wait_for_unit(&self, vcluster: u64, bits: u64) {
        let mut st = lock(&self.state);
        st.waiters += 1;
        while st.map.get(&vcluster).is_some_and(|e| e.busy() & bits != 0) {
            st = self.committed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.waiters -= 1;
    }

    /// Drops the hold of `units` (all of one cluster's entry `e`) on their units.
    fn release_planned(e: &mut Entry, units: &[UnitWrite]) {
        let f = e.in_flight_mut();
        for u in units {
            f.busy &= !u.bit;
        }
        e.settle();
    }

    /// Drops the hold of `units` (in cluster order) on their units: one lookup per cluster.
    fn release_planned_clusters(&self, map: &mut BTreeMap<u64, Entry>, units: &[UnitWrite]) {
        for group in units.chunk_by(|a, b| a.vcluster == b.vcluster) {
            if let Some(e) = map.get_mut(&group[0].vcluster) {
                Self::release_planned(e, group);
            }
        }
    }

    /// Ends a failed write's hold on its units and wakes whoever waits.
    fn end_writes(&self, st: &mut State, units: &[UnitWrite]) {
        self.release_planned_clusters(&mut st.map, units);
        self.wake_unit_waiters(st);
    }

    fn wake_unit_waiters(&self, st: &State) {
        // A wake-up is a system call; writes with nobody waiting skip it.
        if st.waiters > 0 {
            self.committed.notify_all();
        }
    }

    /// Waits for the flush in progress to complete, or to fail (then no commit will come).
    fn wait_for_commit(&self, seen: u64) {
        let mut st = lock(&self.state);
        st.waiters += 1;
        while st.commits == seen && !self.failed.load(Ordering::Acquire) {
            st = self.committed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.waiters -= 1;
    }

    /// Wakes the writers of `wait_for_commit` after a failure. Taking the state lock orders
    /// this after any waiter's check of `failed`, so none misses the wake-up.
    fn wake_waiting_writers(&self) {
        let _st = lock(&self.state);
        self.committed.notify_all();
    }

    /// Writes `buf` at `offset`. The data is durable after the next [`ImageV1::flush`].
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        loop {
            let io = shared(&self.gate);
            let plan = self.plan_write(&mut lock(&self.state), offset, buf.len() as u64);
            let units = match plan {
                Plan::Ready(units) => units,
                Plan::WaitForCommit(seen) => {
                    drop(io);
                    self.wait_for_commit(seen);
                    self.check_writable()?;
                    continue;
                }
                Plan::WaitForUnit(vcluster, bit) => {
                    drop(io);
                    self.wait_for_unit(vcluster, bit);
                    continue;
                }
            };
            if let Err(e) = self.write_units(buf, offset, &units) {
                // The map never saw this write, and it went to units no flushed state
                // references (or, in place, to units written since the last flush and
                // inside its own range): the image stays consistent, the range's contents
                // are unspecified (as NBD and POSIX say of a failed write), and later
                // writes may succeed once the cause (a full disk) is gone.
                self.end_writes(&mut lock(&self.state), &units);
                return Err(e);
            }
            let mut st = lock(&self.state);
            let st = &mut *st;
            for group in units.chunk_by(|a, b| a.vcluster == b.vcluster) {
                let vcluster = group[0].vcluster;
                let e = st
                    .map
                    .get_mut(&vcluster)
                    .expect("planned clusters stay mapped while I/O is shared");
                let bits = group.iter().fold(0, |w, u| w | u.bit);
                // The per-flush state first: it keeps the units the durable state references.
                let f = e.in_flight_mut();
                f.written |= bits;
                f.busy &= !bits;
                for u in group {
                    e.units[u.slot] |= u.bit;
                    e.units[1 - u.slot] &= !u.bit;
                    e.zero &= !u.bit;
                }
                if e.mark_dirty() {
                    st.dirty.push(vcluster);
                }
            }
            self.wake_unit_waiters(st);
            return Ok(());
        }
    }

    fn write_units(&self, buf: &[u8], offset: u64, units: &[UnitWrite]) -> Result<()> {
        let us = self.geometry.unit_size();
        let end = offset + buf.len() as u64;
        // Consecutive direct units whose host bytes follow each other go out in one pwrite.
        let mut pending: Option<(u64, usize, usize)> = None; // host, buf start, buf end
        let flush_pending = |p: &mut Option<(u64, usize, usize)>| -> Result<()> {
            if let Some((host, s, e)) = p.take() {
                self.storage
                    .write_at(&buf[s..e], host)
                    .map_err(|err| self.io_err("writing", host, err))?;
            }
            Ok(())
        };
        for u in units {
            let from = offset.max(u.unit_start);
            let to = end.min(u.unit_start + us);
            let (bs, be) = ((from - offset) as usize, (to - offset) as usize);
            let host = u.host + (from - u.unit_start);
            if u.direct {
                match &mut pending {
                    Some((h, s, e)) if *e == bs && *h + (*e - *s) as u64 == host => {
                        *e = be;
                    }
                    _ => {
                        flush_pending(&mut pending)?;
                        pending = Some((host, bs, be));
                    }
                }
                continue;
            }
            flush_pending(&mut pending)?;
            let mut unit = vec![0u8; us as usize];
            let visible = (self.virtual_size - u.unit_start).min(us) as usize;
            match u.old {
                Source::Host(h) => self
                    .storage
                    .read_at(&mut unit, h)
                    .map_err(|e| self.io_err("reading", h, e))?,
                Source::Zero => {}
                Source::Backing => self.read_backing(&mut unit[..visible], u.unit_start)?,
            }
            unit[(from - u.unit_start) as usize..(to - u.unit_start) as usize]
                .copy_from_slice(&buf[bs..be]);
            self.storage
                .write_at(&unit, u.host)
                .map_err(|e| self.io_err("writing", u.host, e))?;
        }
        flush_pending(&mut pending)
    }

    /// Makes `[offset, offset+len)` read as zeros. Whole units become zero markers that
    /// mask the backing file; the partial units at either end get zeros written.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len, false)
    }

    /// Like [`ImageV1::write_zeroes`], and frees the space the range held.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len, true)
    }

    fn zero_range(&self, offset: u64, len: u64, punch: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let us = self.geometry.unit_size();
        let end = offset + len;
        let first_full = offset.next_multiple_of(us);
        let last_full = end & !(us - 1);
        if first_full >= last_full {
            return self.write_at(&vec![0u8; len as usize], offset);
        }
        if first_full > offset {
            self.write_at(&vec![0u8; (first_full - offset) as usize], offset)?;
        }
        if end > last_full {
            self.write_at(&vec![0u8; (end - last_full) as usize], last_full)?;
        }
        let g = self.geometry;
        let first_cluster = first_full >> g.cluster_bits;
        let last_cluster = (last_full - 1) >> g.cluster_bits;
        let (_io, mut st) = loop {
            let io = shared(&self.gate);
            let st = lock(&self.state);
            let busy = st
                .map
                .range(first_cluster..=last_cluster)
                .find_map(|(&vc, e)| {
                    let b = e.busy() & Self::whole_units_in(g, vc, first_full, last_full);
                    (b != 0).then_some((vc, b))
                });
            match busy {
                None => break (io, st),
                Some((vc, bits)) => {
                    drop((st, io));
                    self.wait_for_unit(vc, bits);
                }
            }
        };
        let has_backing = self.backing.is_some();
        let mask_for = |vc: u64| Self::whole_units_in(g, vc, first_full, last_full);
        let mut punches = Vec::new();
        let touch = |st: &mut State, vc: u64, mask: u64, punches: &mut Vec<(u64, u64)>| {
            let e = entry_leaving_zero_run(&mut st.map, &mut st.zero_runs, g, vc);
            // The per-flush state first: it keeps the units the durable state references.
            if e.mark_dirty() {
                st.dirty.push(vc);
            }
            for s in 0..2 {
                let dropped = e.units[s] & mask;
                if dropped == 0 {
                    continue;
                }
                e.units[s] &= !mask;
                if punch {
                    // Unpinned bytes can go at once (no I/O can target them while the state
                    // lock is held); pinned ones wait for the flush that unpins them.
                    let now = dropped & !e.pinned(s);
                    e.in_flight_mut().discarded[s] |= dropped & !now;
                    let host = e.host[s];
                    for u in bits(now) {
                        punches.push((self.host_offset(host, u), us));
                    }
                }
            }
            if has_backing {
                e.zero |= mask;
            } else {
                e.zero &= !mask;
            }
        };
        if has_backing {
            // Every cluster needs a marker that masks the backing file: clusters with an
            // entry get zero bits, whole clusters without one join a zero run.
            let full = g.full_mask();
            let whole_start = if mask_for(first_cluster) == full {
                first_cluster
            } else {
                first_cluster + 1
            };
            let whole_end = if mask_for(last_cluster) == full {
                last_cluster + 1
            } else {
                last_cluster
            };
            for vc in [first_cluster, last_cluster] {
                if !(whole_start..whole_end).contains(&vc) {
                    touch(&mut st, vc, mask_for(vc), &mut punches);
                }
            }
            if whole_start < whole_end {
                let mapped: Vec<u64> = st
                    .map
                    .range(whole_start..whole_end)
                    .map(|(&k, _)| k)
                    .collect();
                let mut p = whole_start;
                for &vc in mapped.iter().chain(std::iter::once(&whole_end)) {
                    if vc > p {
                        st.zero_runs.insert(p, vc);
                        st.dirty_runs.push(MapItem::ZeroRun {
                            start: p,
                            count: vc - p,
                        });
                    }
                    if vc < whole_end {
                        touch(&mut st, vc, full, &mut punches);
                    }
                    p = vc + 1;
                }
            }
        } else {
            // Without a backing file an unmapped unit already reads as zeros.
            let mapped: Vec<u64> = st
                .map
                .range(first_cluster..=last_cluster)
                .map(|(&k, _)| k)
                .collect();
            for vc in mapped {
                touch(&mut st, vc, mask_for(vc), &mut punches);
            }
        }
        for (off, l) in coalesce(punches) {
            if let Err(e) = self.storage.punch_hole(off, l) {
                // The map already reads zeros there; only the space stays allocated.
                return Err(self.io_err("punching a hole", off, e));
            }
        }
        Ok(())
    }

    /// The units of cluster `vc` inside `[from, to)` (both unit aligned) as a bitmap.
    fn whole_units_in(g: Geometry, vc: u64, from: u64, to: u64) -> u64 {
        let cs = vc << g.cluster_bits;
        let lo = (from.max(cs) - cs) >> g.unit_bits;
        let hi = (to.min(cs + g.cluster_size()) - cs) >> g.unit_bits;
        let ones = |n: u64| if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
        ones(hi) & !ones(lo)
    }

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

    /// Serializes the whole map (as of the snapshot) and places it and a fresh journal.
    fn plan_checkpoint(&self, st: &mut State) -> PlannedCheckpoint {
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

    /// The data digest of a record: xxh3-64 over the listed units, in order.
    fn digest_units(&self, units: &[u64]) -> Result<u64> {
        digest_units(self.storage.as_ref(), self.geometry.unit_size(), units)
            .map_err(|(at, e)| self.io_err("reading back written data", at, e))
    }

    /// Appends an empty record after one that published data, so that the next open knows
    /// that record's data reached the disk and need not read it back.
    fn seal(&self) -> Result<()> {
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
    fn append_record(&self, record: &[u8], at: u64) -> Result<()> {
        self.storage
            .write_at(record, at)
            .map_err(|e| self.io_err("writing journal record", at, e))?;
        self.storage
            .sync()
            .map_err(|e| self.io_err("syncing journal", at, e))
    }

    /// A header update may not write a generation that a reader refuses (FORMAT.md, "Header
    /// slots", check 15): the image would not open again.
    fn check_generation(&self, header: &Header) -> Result<()> {
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

    fn write_header_slot(&self, header: &Header, slot: usize) -> Result<()> {
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

    /// This layer's own runs (data or zero markers), in order, without the backing file.
    fn own_runs(&self) -> Vec<(u64, u64, Source)> {
        let mut runs = Vec::new();
        if self.virtual_size > 0 {
            let st = lock(&self.state);
            self.for_each_run(&st, 0, self.virtual_size, |s, l, src| {
                if src != Source::Backing {
                    runs.push((s, l, src));
                }
            });
        }
        runs
    }

    /// This layer's own ranges as `(offset, length, host offset, or None for zeros)`.
    pub(crate) fn own_host_runs(&self) -> Vec<(u64, u64, Option<u64>)> {
        self.own_runs()
            .into_iter()
            .map(|(s, l, src)| match src {
                Source::Host(h) => (s, l, Some(h)),
                _ => (s, l, None),
            })
            .collect()
    }

    /// The ranges that fall through to the backing file, in order.
    pub(in crate::image) fn fall_through_runs(&self) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        if self.virtual_size > 0 {
            let st = lock(&self.state);
            self.for_each_run(&st, 0, self.virtual_size, |s, l, src| {
                if src == Source::Backing {
                    runs.push((s, l));
                }
            });
        }
        runs
    }

    /// The allocation status of `[offset, offset+len)` through the whole chain.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_range(offset, len)?;
        let mut out = Vec::new();
        if len > 0 {
            self.status_at_depth(offset, len, 0, &mut out)?;
        }
        Ok(out)
    }

    /// The status of the whole image, as `qemu-img map` shows it.
    pub fn map(&self) -> Result<Vec<Extent>> {
        self.block_status(0, self.virtual_size)
    }

    pub(crate) fn status_at_depth(
        &self,
        offset: u64,
        len: u64,
        depth: u32,
        out: &mut Vec<Extent>,
    ) -> Result<()> {
        let mut runs = Vec::new();
        {
            let st = lock(&self.state);
            self.for_each_run(&st, offset, len, |s, l, src| runs.push((s, l, src)));
        }
        for (start, length, src) in runs {
            match src {
                Source::Host(h) => push_extent(
                    out,
                    Extent {
                        offset: start,
                        length,
                        depth,
                        kind: ExtentKind::Data,
                        host_offset: Some(h),
                        compressed: false,
                    },
                ),
                Source::Zero => push_extent(
                    out,
                    Extent {
                        offset: start,
                        length,
                        depth,
                        kind: ExtentKind::Zero,
                        host_offset: None,
                        compressed: false,
                    },
                ),
                Source::Backing => match &self.backing {
                    Some(b) => b.status(start, length, depth + 1, out)?,
                    None => push_extent(
                        out,
                        Extent {
                            offset: start,
                            length,
                            depth,
                            kind: ExtentKind::Unallocated,
                            host_offset: None,
                            compressed: false,
                        },
                    ),
                },
            }
        }
        Ok(())
    }

    /// Counts for `info`: mapped clusters and units, and the file's allocated bytes.
    pub fn stats(&self) -> ImageStats {
        let st = lock(&self.state);
        let mut s = ImageStats {
            mapped_clusters: st.map.len() as u64,
            zero_run_clusters: st.zero_runs.clusters(),
            ..Default::default()
        };
        for e in st.map.values() {
            s.data_units += (e.units[0] | e.units[1]).count_ones() as u64;
            s.zero_units += e.zero.count_ones() as u64;
            s.host_clusters += e.host.iter().filter(|&&h| h != 0).count() as u64;
        }
        s.file_length = self.storage.len().unwrap_or(0);
        s.allocated_bytes = self.storage.allocated_bytes().unwrap_or(0);
        s.journal_used = st.journal_tail;
        s.journal_capacity = st.header.journal_capacity;
        s.generation = st.header.generation;
        s
    }

    /// Empties the map: every unit falls through to the backing file again. Durable after
    /// the flush this ends with.
    pub fn clear(&self) -> Result<()> {
        self.check_writable()?;
        {
            let _io = shared(&self.gate);
            let mut guard = lock(&self.state);
            let st = &mut *guard;
            st.zero_runs.clear();
            let count = self.geometry.clusters_for(self.virtual_size);
            if count > 0 {
                st.dirty_runs
                    .push(MapItem::FallThroughRun { start: 0, count });
            }
            for (&vc, e) in st.map.iter_mut() {
                if e.mark_dirty() {
                    st.dirty.push(vc);
                }
                e.units = [0, 0];
                e.zero = 0;
            }
        }
        self.flush()
    }

    /// Changes the virtual size. Growing makes the new range read as zeros, even where the
    /// backing file is longer than the old size (as qemu-img resize does); shrinking drops
    /// everything past the new end, so that growing again later reads zeros there too.
    ///
    /// Crash safety (FORMAT.md, "Resize"): the map changes stay in memory until one
    /// checkpoint publishes them together with the new size in one header-slot write. A
    /// crash before that write is durable leaves the old size with all its data; after it,
    /// the new size.
    pub fn resize(&mut self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        if new_size > crate::format::MAX_VIRTUAL_SIZE {
            return Err(Error::Invalid {
                path: self.path.clone(),
                reason: format!(
                    "new size {new_size} is larger than the largest virtual size (2^60 bytes)"
                ),
            });
        }
        let old_size = self.virtual_size;
        // Every earlier write goes out in a flush of its own, so that a failure below
        // cannot take it down with the resize.
        self.flush()?;
        let changed = if new_size < old_size {
            self.drop_past(new_size, old_size)
        } else {
            self.zero_grown_range(old_size, new_size)
        };
        let result = changed.and_then(|()| {
            lock(&self.state).pending_resize = Some(new_size);
            self.flush()
        });
        match result {
            Ok(()) => {
                self.virtual_size = new_size;
                Ok(())
            }
            Err(e) => {
                // A failed flush puts the image back to its durable state, whose header
                // says which size won.
                let mut st = lock(&self.state);
                st.pending_resize = None;
                self.virtual_size = st.header.virtual_size;
                drop(st);
                let _ = old_size;
                Err(e)
            }
        }
    }

    /// Shrinking: the tail of the last cluster that stays is zeroed, and every cluster
    /// wholly past `new_size` loses its entry and its zero runs. Bytes past the end are
    /// never visible, but they would be again after a later grow.
    fn drop_past(&self, new_size: u64, old_size: u64) -> Result<()> {
        let g = self.geometry;
        let cluster_end = new_size.next_multiple_of(g.cluster_size()).min(old_size);
        if cluster_end > new_size {
            self.write_zeroes(new_size, cluster_end - new_size)?;
        }
        let first_gone = g.clusters_for(new_size);
        let clusters = g.clusters_for(old_size);
        let _io = shared(&self.gate);
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        if clusters > first_gone {
            st.zero_runs.remove(first_gone, clusters);
            st.dirty_runs.push(MapItem::FallThroughRun {
                start: first_gone,
                count: clusters - first_gone,
            });
        }
        for (&vc, e) in st.map.range_mut(first_gone..) {
            if e.mark_dirty() {
                st.dirty.push(vc);
            }
            e.units = [0, 0];
            e.zero = 0;
        }
        Ok(())
    }

    /// Growing: what the backing file holds past the old end stays hidden, as the grown
    /// range must read as zeros. The size is raised first so that the zeroing is in range.
    fn zero_grown_range(&mut self, old_size: u64, new_size: u64) -> Result<()> {
        let backing_end = self.backing.as_ref().map_or(0, |b| b.size()).min(new_size);
        if backing_end <= old_size {
            return Ok(());
        }
        self.virtual_size = new_size;
        self.write_zeroes(old_size, backing_end - old_size)
    }

    /// Rewrites the header with a new backing file (no data is copied; see
    /// [`ops::rebase`] for the safe form). The new layer must already be open.
    pub fn set_backing(&mut self, backing: Option<(String, Layer)>) -> Result<()> {
        self.check_writable()?;
        self.flush()?;
        let (record, layer) = match backing {
            Some((path, layer)) => (Some((path, layer.format())), Some(layer)),
            None => (None, None),
        };
        let mut st = lock(&self.state);
        let header = Header {
            generation: st.header.generation + 1,
            backing: record,
            ..st.header.clone()
        };
        let slot = 1 - st.active_slot;
        self.write_header_slot(&header, slot)?;
        st.header = header;
        st.active_slot = slot;
        drop(st);
        self.backing = layer.map(Arc::new);
        Ok(())
    }
}

impl Drop for ImageV1 {
    /// Closing flushes, as qemu does: a dropped image is not a crash. Errors cannot be
    /// reported here; callers that care call [`ImageV1::flush`] first.
    fn drop(&mut self) {
        if !self.read_only && !self.failed.load(Ordering::Acquire) && self.flush().is_ok() {
            let _ = self.seal();
        }
    }
}

/// The entry of `vcluster`, created if needed. A cluster in a zero run leaves the run: its
/// new entry says zero for every unit, so that units the caller does not change keep
/// reading as zeros instead of falling through to the backing file. A record lists the
/// entry after the run, so replay gives the same result.
fn entry_leaving_zero_run<'a>(
    map: &'a mut BTreeMap<u64, Entry>,
    zero_runs: &mut ClusterRuns,
    g: Geometry,
    vcluster: u64,
) -> &'a mut Entry {
    // One lookup on the common path; the zero runs are only consulted for a new entry.
    map.entry(vcluster).or_insert_with(|| {
        if zero_runs.contains(vcluster) {
            zero_runs.remove(vcluster, vcluster + 1);
            Entry::at_rest([0, 0], [0, 0], g.full_mask())
        } else {
            Entry::default()
        }
    })
}
/// A journal holds at least 1 MiB of records and twice the checkpoint's size, so that the
/// cost of rewriting the checkpoint is spread over at least as many bytes of records.
pub(in crate::image) fn journal_capacity_for(checkpoint_bytes: u64, cluster_size: u64) -> u64 {
    (1u64 << 20)
        .max(2 * checkpoint_bytes)
        .next_multiple_of(cluster_size.max(BLOCK_SIZE))
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

/// The indices of the set bits.
fn bits(mut m: u64) -> impl Iterator<Item = u32> {
    std::iter::from_fn(move || {
        (m != 0).then(|| {
            let b = m.trailing_zeros();
            m &= m - 1;
            b
        })
    })
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

/// Sorts ranges and merges the touching ones.
fn coalesce(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (s, l) in ranges {
        match out.last_mut() {
            Some((ls, ll)) if *ls + *ll == s => *ll += l,
            _ => out.push((s, l)),
        }
    }
    out
}
