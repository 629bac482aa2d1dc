//! Looking up the in-memory extent map: the runs of a range (where each byte comes from),
//! block status through the chain, and the figures `info` shows.

use super::cluster_runs::ClusterRuns;
use super::entry::Entry;
use super::{lock, ImageV1, State};
use crate::error::Result;
use crate::format::Geometry;
use crate::image::{push_extent, Extent, ExtentKind, ImageStats, Source};
use std::collections::BTreeMap;

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

impl ImageV1 {
    /// Calls `f(virtual_offset, length, source)` for the runs of `[offset, offset+len)` in
    /// this layer, merged where the source continues.
    pub(super) fn for_each_run(
        &self,
        st: &State,
        offset: u64,
        len: u64,
        f: impl FnMut(u64, u64, Source),
    ) {
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
}

/// The entry of `vcluster`, created if needed. A cluster in a zero run leaves the run: its
/// new entry says zero for every unit, so that units the caller does not change keep
/// reading as zeros instead of falling through to the backing file. A record lists the
/// entry after the run, so replay gives the same result.
pub(super) fn entry_leaving_zero_run<'a>(
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
