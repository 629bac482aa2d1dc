//! The write path: planning a write unit by unit (redirect-on-write into the slot the
//! durable state does not pin, allocating host clusters), waiting for pinned or busy units,
//! the data I/O with its read-modify-write of partial units, and the map update.

use super::entry::Entry;
use super::map::entry_leaving_zero_run;
use super::{lock, shared, ImageV1, State};
use crate::error::Result;
use crate::image::Source;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

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

impl ImageV1 {
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
    pub(super) fn wait_for_unit(&self, vcluster: u64, bits: u64) {
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
    pub(super) fn wake_waiting_writers(&self) {
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
}
