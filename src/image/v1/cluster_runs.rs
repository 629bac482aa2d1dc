//! Sets of virtual clusters kept as runs: the whole-cluster zero runs of the extent map.
use std::collections::BTreeMap;

#[derive(Debug, Default, Clone)]
pub struct ClusterRuns {
    /// start -> end (exclusive); runs neither overlap nor touch.
    runs: BTreeMap<u64, u64>,
}

impl ClusterRuns {
    pub fn insert(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        if let Some((&s, &e)) = self.runs.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
                self.runs.remove(&s);
            }
        }
        while let Some((&s, &e)) = self.runs.range(start..=end).next() {
            end = end.max(e);
            self.runs.remove(&s);
        }
        self.runs.insert(start, end);
    }

    pub fn remove(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let overlapping: Vec<(u64, u64)> = self.overlapping_raw(start, end).collect();
        for (s, e) in overlapping {
            self.runs.remove(&s);
            if s < start {
                self.runs.insert(s, start);
            }
            if e > end {
                self.runs.insert(end, e);
            }
        }
    }

    pub fn contains(&self, x: u64) -> bool {
        self.runs
            .range(..=x)
            .next_back()
            .is_some_and(|(_, &e)| e > x)
    }

    fn overlapping_raw(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let first = self
            .runs
            .range(..=start)
            .next_back()
            .filter(|(_, &e)| e > start)
            .map(|(&s, &e)| (s, e));
        first
            .into_iter()
            .chain(self.runs.range(start + 1..end).map(|(&s, &e)| (s, e)))
    }

    /// The parts of runs inside `[start, end)`, in order.
    pub fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.overlapping_raw(start, end)
            .map(move |(s, e)| (s.max(start), e.min(end)))
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.runs.iter().map(|(&s, &e)| (s, e))
    }

    /// The number of runs.
    pub fn len(&self) -> usize {
        self.runs.len()
    }

    pub fn clusters(&self) -> u64 {
        self.runs.iter().map(|(s, e)| e - s).sum()
    }

    pub fn clear(&mut self) {
        self.runs.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_split_and_match_a_model() {
        let mut r = ClusterRuns::default();
        let mut model = [false; 64];
        let ops: [(bool, u64, u64); 9] = [
            (true, 3, 9),
            (true, 9, 12),
            (true, 20, 30),
            (false, 5, 6),
            (true, 0, 2),
            (false, 25, 40),
            (true, 11, 21),
            (false, 0, 1),
            (true, 40, 41),
        ];
        for (add, s, e) in ops {
            if add {
                r.insert(s, e)
            } else {
                r.remove(s, e)
            }
            for x in s..e {
                model[x as usize] = add;
            }
            for x in 0..64 {
                assert_eq!(
                    r.contains(x),
                    model[x as usize],
                    "cluster {x} after {add} {s}..{e}"
                );
            }
            let touching = r
                .iter()
                .zip(r.iter().skip(1))
                .any(|((_, e1), (s2, _))| e1 >= s2);
            assert!(
                !touching,
                "runs must be merged: {:?}",
                r.iter().collect::<Vec<_>>()
            );
        }
        assert_eq!(r.overlapping(10, 22).collect::<Vec<_>>(), vec![(10, 22)]);
    }
}
