//! Write zeroes and discard: zero markers for whole units and zero runs for whole
//! clusters, zeros written for partial units, and holes punched for discarded space.

use super::map::entry_leaving_zero_run;
use super::{bits, coalesce, lock, shared, ImageV1, State};
use crate::error::Result;
use crate::format::{Geometry, MapItem};
use std::sync::{MutexGuard, RwLockReadGuard};

/// The whole units of a zeroing: `[from, to)`, unit aligned and not empty, and whether the
/// space they held is freed too (a discard).
#[derive(Debug, Clone, Copy)]
struct WholeUnits {
    from: u64,
    to: u64,
    punch: bool,
}

impl WholeUnits {
    fn first_cluster(&self, g: Geometry) -> u64 {
        self.from >> g.cluster_bits
    }

    fn last_cluster(&self, g: Geometry) -> u64 {
        (self.to - 1) >> g.cluster_bits
    }

    /// The units of cluster `vc` inside the range, as a bitmap.
    fn mask(&self, g: Geometry, vc: u64) -> u64 {
        ImageV1::whole_units_in(g, vc, self.from, self.to)
    }
}

impl ImageV1 {
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
        let r = WholeUnits {
            from: first_full,
            to: last_full,
            punch,
        };
        let (_io, mut st) = self.lock_idle_units(r);
        let mut punches = Vec::new();
        if self.backing.is_some() {
            self.zero_over_backing(&mut st, r, &mut punches);
        } else {
            self.zero_mapped(&mut st, r, &mut punches);
        }
        for (off, l) in coalesce(punches) {
            if let Err(e) = self.storage.punch_hole(off, l) {
                // The map already reads zeros there; only the space stays allocated.
                return Err(self.io_err("punching a hole", off, e));
            }
        }
        Ok(())
    }

    /// Holds I/O shared and the state once no write is in flight on the units of `r`.
    fn lock_idle_units(&self, r: WholeUnits) -> (RwLockReadGuard<'_, ()>, MutexGuard<'_, State>) {
        let g = self.geometry;
        let (first_cluster, last_cluster) = (r.first_cluster(g), r.last_cluster(g));
        loop {
            let io = shared(&self.gate);
            let st = lock(&self.state);
            let busy = st
                .map
                .range(first_cluster..=last_cluster)
                .find_map(|(&vc, e)| {
                    let b = e.busy() & r.mask(g, vc);
                    (b != 0).then_some((vc, b))
                });
            match busy {
                None => return (io, st),
                Some((vc, bits)) => {
                    drop((st, io));
                    self.wait_for_unit(vc, bits);
                }
            }
        }
    }

    /// With a backing file, every cluster needs a marker that masks the backing file:
    /// clusters with an entry get zero bits, whole clusters without one join a zero run.
    fn zero_over_backing(&self, st: &mut State, r: WholeUnits, punches: &mut Vec<(u64, u64)>) {
        let g = self.geometry;
        let (first_cluster, last_cluster) = (r.first_cluster(g), r.last_cluster(g));
        let full = g.full_mask();
        let whole_start = if r.mask(g, first_cluster) == full {
            first_cluster
        } else {
            first_cluster + 1
        };
        let whole_end = if r.mask(g, last_cluster) == full {
            last_cluster + 1
        } else {
            last_cluster
        };
        for vc in [first_cluster, last_cluster] {
            if !(whole_start..whole_end).contains(&vc) {
                self.zero_units(st, vc, r.mask(g, vc), r.punch, punches);
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
                    self.zero_units(st, vc, full, r.punch, punches);
                }
                p = vc + 1;
            }
        }
    }

    /// Without a backing file an unmapped unit already reads as zeros: only the clusters
    /// with an entry change.
    fn zero_mapped(&self, st: &mut State, r: WholeUnits, punches: &mut Vec<(u64, u64)>) {
        let g = self.geometry;
        let mapped: Vec<u64> = st
            .map
            .range(r.first_cluster(g)..=r.last_cluster(g))
            .map(|(&k, _)| k)
            .collect();
        for vc in mapped {
            self.zero_units(st, vc, r.mask(g, vc), r.punch, punches);
        }
    }

    /// Makes the units `mask` of cluster `vc` read as zeros. With `punch`, their space is
    /// freed: at once where no durable state pins it (the range goes to `punches`), at the
    /// flush that unpins it otherwise.
    fn zero_units(
        &self,
        st: &mut State,
        vc: u64,
        mask: u64,
        punch: bool,
        punches: &mut Vec<(u64, u64)>,
    ) {
        let us = self.geometry.unit_size();
        let e = entry_leaving_zero_run(&mut st.map, &mut st.zero_runs, self.geometry, vc);
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
        if self.backing.is_some() {
            e.zero |= mask;
        } else {
            e.zero &= !mask;
        }
    }

    /// The units of cluster `vc` inside `[from, to)` (both unit aligned) as a bitmap.
    fn whole_units_in(g: Geometry, vc: u64, from: u64, to: u64) -> u64 {
        let cs = vc << g.cluster_bits;
        let lo = (from.max(cs) - cs) >> g.unit_bits;
        let hi = (to.min(cs + g.cluster_size()) - cs) >> g.unit_bits;
        let ones = |n: u64| if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
        ones(hi) & !ones(lo)
    }
}
