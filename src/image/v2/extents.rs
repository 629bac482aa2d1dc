//! An in-memory map of virtual block ranges to mappings: the changes not yet in the tree
//! (pending, in flight, journaled; FORMAT-v2.md, "The flush protocol").
use crate::format::v2::{Extent, Mapping};
use std::collections::BTreeMap;

/// Non-overlapping extents keyed by their first block. A range no extent covers is not
/// changed at this level: a lookup goes on to the level below.
#[derive(Debug, Clone, Default)]
pub struct ExtentMap {
    by_start: BTreeMap<u64, (u64, Mapping)>,
}

impl ExtentMap {
    pub fn is_empty(&self) -> bool {
        self.by_start.is_empty()
    }

    pub fn len(&self) -> usize {
        self.by_start.len()
    }

    /// The extents overlapping `[start, end)`, clipped to it, in order.
    pub fn overlapping(&self, start: u64, end: u64) -> Vec<Extent> {
        let mut out = Vec::new();
        self.for_each_overlapping(start, end, |e| out.push(e));
        out
    }

    fn for_each_overlapping(&self, start: u64, end: u64, mut f: impl FnMut(Extent)) {
        if start >= end {
            return;
        }
        // The extent that starts before `start` may reach into the range.
        if let Some((&s, &(len, m))) = self.by_start.range(..start).next_back() {
            if s + len > start {
                f(clip(s, len, m, start, end));
            }
        }
        for (&s, &(len, m)) in self.by_start.range(start..end) {
            f(clip(s, len, m, start, end));
        }
    }

    /// Maps `[start, start + len)` to `mapping` and returns what it replaced here, in order.
    pub fn set(&mut self, start: u64, len: u64, mapping: Mapping) -> Vec<Extent> {
        let end = start + len;
        let before = self
            .by_start
            .range(..start)
            .next_back()
            .map(|(&s, &v)| (s, v));
        let clear = before.is_none_or(|(s, (l, _))| s + l <= start)
            && self.by_start.range(start..end).next().is_none();
        if clear {
            // Nothing to replace (most writes: a block not changed since the snapshot):
            // join the neighbours found on the way instead of searching again.
            self.insert_joined(start, len, mapping, before);
            return Vec::new();
        }
        let replaced = self.remove(start, end);
        self.by_start.insert(start, (len, mapping));
        self.join_neighbours(start);
        replaced
    }

    /// Inserts `[start, start + len)` where nothing is mapped, joined with `before` (the
    /// extent before it, if any) and the extent at its end when they continue it.
    fn insert_joined(
        &mut self,
        start: u64,
        len: u64,
        mapping: Mapping,
        before: Option<(u64, (u64, Mapping))>,
    ) {
        let (mut at, mut total, mut first) = (start, len, mapping);
        if let Some((ps, (plen, pm))) = before {
            if ps + plen == start && pm.advanced(plen) == mapping && plen + len <= MAX_JOINED {
                (at, total, first) = (ps, plen + len, pm);
            }
        }
        let end = start + len;
        if let Some(&(nlen, nm)) = self.by_start.get(&end) {
            if mapping.advanced(len) == nm && total + nlen <= MAX_JOINED {
                self.by_start.remove(&end);
                total += nlen;
            }
        }
        self.by_start.insert(at, (total, first));
    }

    /// Forgets `[start, end)` at this level and returns what it held.
    pub fn remove(&mut self, start: u64, end: u64) -> Vec<Extent> {
        let replaced = self.overlapping(start, end);
        if replaced.is_empty() {
            return replaced;
        }
        // Split the extent that straddles `start`, then the one that straddles `end`.
        if let Some((&s, &(len, m))) = self.by_start.range(..start).next_back() {
            if s + len > start {
                self.by_start.insert(s, (start - s, m));
                self.by_start
                    .insert(start, (s + len - start, m.advanced(start - s)));
            }
        }
        if let Some((&s, &(len, m))) = self.by_start.range(..end).next_back() {
            if s + len > end {
                self.by_start.insert(s, (end - s, m));
                self.by_start
                    .insert(end, (s + len - end, m.advanced(end - s)));
            }
        }
        let inside: Vec<u64> = self.by_start.range(start..end).map(|(&s, _)| s).collect();
        for s in inside {
            self.by_start.remove(&s);
        }
        replaced
    }

    /// Merges the extent at `start` with the ones before and after it when they continue
    /// it, so that sequential writes make one extent.
    fn join_neighbours(&mut self, start: u64) {
        let (mut s, (mut len, m)) = match self.by_start.get(&start) {
            Some(&v) => (start, v),
            None => return,
        };
        if let Some((&ps, &(plen, pm))) = self.by_start.range(..s).next_back() {
            if ps + plen == s && pm.advanced(plen) == m && plen + len <= MAX_JOINED {
                self.by_start.remove(&s);
                s = ps;
                len += plen;
                self.by_start.insert(s, (len, pm));
            }
        }
        let m = self.by_start[&s].1;
        if let Some(&(nlen, nm)) = self.by_start.get(&(s + len)) {
            if m.advanced(len) == nm && len + nlen <= MAX_JOINED {
                self.by_start.remove(&(s + len));
                self.by_start.insert(s, (len + nlen, m));
            }
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = Extent> + '_ {
        self.by_start
            .iter()
            .map(|(&start, &(len, mapping))| Extent {
                start,
                len,
                mapping,
            })
    }

    /// The extents that start at or after `block`, in order.
    pub fn iter_from(&self, block: u64) -> impl Iterator<Item = Extent> + '_ {
        self.by_start
            .range(block..)
            .map(|(&start, &(len, mapping))| Extent {
                start,
                len,
                mapping,
            })
    }

    /// Forgets the extent that starts at `start`, if there is one, whole (as
    /// [`ExtentMap::remove`] of its range would, without collecting what it held).
    pub fn forget(&mut self, start: u64) {
        self.by_start.remove(&start);
    }

    /// Inserts `e`, which overlaps no extent here, as it is (not joined to its neighbours).
    pub fn insert_apart(&mut self, e: Extent) {
        self.by_start.insert(e.start, (e.len, e.mapping));
    }

    /// Applies every extent of `other` over this map, later ones winning.
    pub fn apply(&mut self, other: &ExtentMap) {
        for e in other.iter() {
            self.set(e.start, e.len, e.mapping);
        }
    }
}

/// Extents in memory may grow this long; items on disk are split at 2^24 blocks.
const MAX_JOINED: u64 = 1 << 40;

/// `updates` laid over `base` (both sorted and not overlapping; an unmapped update removes
/// what it covers), neighbours that continue each other joined, as [`ExtentMap::apply`]
/// would leave it. One pass over both: a tree flush rebuilds each leaf it changes with
/// this, and building an [`ExtentMap`] of the leaf instead was most of a flush's CPU.
pub fn overlay_sorted(base: &[Extent], updates: &[Extent]) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::with_capacity(base.len() + updates.len());
    let mut below = base.iter().copied();
    // The part of a base extent not yet emitted or covered.
    let mut rest = below.next();
    for u in updates {
        while let Some(b) = rest {
            if b.start >= u.end() {
                break;
            }
            if b.start < u.start {
                let keep = b.len.min(u.start - b.start);
                push_joined(
                    &mut out,
                    clip(b.start, b.len, b.mapping, b.start, b.start + keep),
                );
            }
            if b.end() > u.end() {
                rest = Some(clip(b.start, b.len, b.mapping, u.end(), b.end()));
                break;
            }
            rest = below.next();
        }
        if u.mapping != Mapping::Unmapped {
            push_joined(&mut out, *u);
        }
    }
    for b in rest.into_iter().chain(below) {
        push_joined(&mut out, b);
    }
    out
}

fn push_joined(out: &mut Vec<Extent>, e: Extent) {
    if let Some(last) = out.last_mut() {
        if last.end() == e.start
            && last.mapping.advanced(last.len) == e.mapping
            && last.len + e.len <= MAX_JOINED
        {
            last.len += e.len;
            return;
        }
    }
    out.push(e);
}

fn clip(s: u64, len: u64, m: Mapping, start: u64, end: u64) -> Extent {
    let from = s.max(start);
    let to = (s + len).min(end);
    Extent {
        start: from,
        len: to - from,
        mapping: m.advanced(from - s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(start: u64, len: u64, mapping: Mapping) -> Extent {
        Extent {
            start,
            len,
            mapping,
        }
    }

    #[test]
    fn setting_a_range_splits_what_it_overlaps_and_returns_it() {
        let mut m = ExtentMap::default();
        m.set(0, 10, Mapping::Data(100));
        let replaced = m.set(3, 2, Mapping::Zero);
        assert_eq!(replaced, vec![e(3, 2, Mapping::Data(103))]);
        assert_eq!(
            m.iter().collect::<Vec<_>>(),
            vec![
                e(0, 3, Mapping::Data(100)),
                e(3, 2, Mapping::Zero),
                e(5, 5, Mapping::Data(105)),
            ]
        );
        assert_eq!(
            m.overlapping(2, 6),
            vec![
                e(2, 1, Mapping::Data(102)),
                e(3, 2, Mapping::Zero),
                e(5, 1, Mapping::Data(105)),
            ]
        );
    }

    #[test]
    fn overlaying_sorted_updates_splits_removes_and_joins() {
        let base = [e(0, 10, Mapping::Data(100)), e(20, 5, Mapping::Zero)];
        let updates = [
            e(2, 3, Mapping::Data(7)),
            e(8, 14, Mapping::Unmapped),
            e(22, 1, Mapping::Zero),
            e(30, 2, Mapping::Data(132)),
        ];
        assert_eq!(
            overlay_sorted(&base, &updates),
            vec![
                e(0, 2, Mapping::Data(100)),
                e(2, 3, Mapping::Data(7)),
                e(5, 3, Mapping::Data(105)),
                e(22, 3, Mapping::Zero),
                e(30, 2, Mapping::Data(132)),
            ]
        );
        // An update that continues its neighbours joins them.
        let joined = overlay_sorted(&base, &[e(3, 2, Mapping::Data(103))]);
        assert_eq!(joined, base.to_vec());
    }

    proptest::proptest! {
        #[test]
        fn overlaying_sorted_updates_matches_applying_them_to_a_map(
            base in extents_strategy(),
            updates in extents_strategy(),
        ) {
            // A leaf holds no unmapped extents.
            let base: Vec<Extent> = base.into_iter().filter(|b| b.mapping != Mapping::Unmapped).collect();
            let mut map = ExtentMap::default();
            for b in &base {
                map.set(b.start, b.len, b.mapping);
            }
            for u in &updates {
                match u.mapping {
                    Mapping::Unmapped => {
                        map.remove(u.start, u.end());
                    }
                    m => {
                        map.set(u.start, u.len, m);
                    }
                }
            }
            let merged = overlay_sorted(&base, &updates);
            // The same blocks, mapped the same way, and as joined as the map leaves them.
            proptest::prop_assert_eq!(per_block(&merged), per_block(&map.iter().collect::<Vec<_>>()));
            proptest::prop_assert!(merged.len() <= map.len());
            for pair in merged.windows(2) {
                proptest::prop_assert!(pair[0].end() <= pair[1].start);
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn setting_ranges_reads_like_a_map_of_blocks_and_leaves_neighbours_joined(
            sets in proptest::collection::vec((0u64..60, 1u64..8, 0u8..3, 0u64..3), 0..40),
        ) {
            let mut map = ExtentMap::default();
            let mut blocks: std::collections::BTreeMap<u64, Mapping> = Default::default();
            for (start, len, kind, host) in sets {
                // Hosts that often continue a neighbour, so that joins happen.
                let mapping = match kind {
                    0 => Mapping::Data(1000 + start + host * 100),
                    1 => Mapping::Zero,
                    _ => Mapping::Unmapped,
                };
                let replaced = map.set(start, len, mapping);
                let want: Vec<(u64, Mapping)> = (start..start + len)
                    .filter_map(|b| blocks.get(&b).map(|&m| (b, m)))
                    .collect();
                proptest::prop_assert_eq!(per_block(&replaced), want);
                for i in 0..len {
                    blocks.insert(start + i, mapping.advanced(i));
                }
                let extents: Vec<Extent> = map.iter().collect();
                proptest::prop_assert_eq!(
                    per_block(&extents),
                    blocks.iter().map(|(&b, &m)| (b, m)).collect::<Vec<_>>()
                );
                for pair in extents.windows(2) {
                    let continues = pair[0].end() == pair[1].start
                        && pair[0].mapping.advanced(pair[0].len) == pair[1].mapping;
                    proptest::prop_assert!(!continues, "{:?} and {:?} not joined", pair[0], pair[1]);
                }
            }
        }
    }

    /// Sorted, non-overlapping extents over the first 64 blocks, with every kind of mapping.
    fn extents_strategy() -> impl proptest::strategy::Strategy<Value = Vec<Extent>> {
        use proptest::prelude::*;
        proptest::collection::vec((0u64..4, 1u64..6, 0u8..3, 0u64..4), 0..12).prop_map(|parts| {
            let mut at = 0;
            let mut out = Vec::new();
            for (gap, len, kind, host) in parts {
                let start = at + gap;
                let mapping = match kind {
                    0 => Mapping::Data(100 + start + host * 3),
                    1 => Mapping::Zero,
                    _ => Mapping::Unmapped,
                };
                out.push(e(start, len, mapping));
                at = start + len;
            }
            out
        })
    }

    fn per_block(extents: &[Extent]) -> Vec<(u64, Mapping)> {
        extents
            .iter()
            .flat_map(|x| (0..x.len).map(move |i| (x.start + i, x.mapping.advanced(i))))
            .collect()
    }

    #[test]
    fn sequential_writes_join_into_one_extent() {
        let mut m = ExtentMap::default();
        for i in 0..8 {
            m.set(i, 1, Mapping::Data(50 + i));
        }
        assert_eq!(
            m.iter().collect::<Vec<_>>(),
            vec![e(0, 8, Mapping::Data(50))]
        );
        m.set(8, 1, Mapping::Data(7));
        assert_eq!(m.len(), 2);
    }
}
