//! Free host clusters, kept as runs so that a huge sparse file costs a few entries.
use std::collections::BTreeMap;

#[derive(Debug, Default, Clone)]
pub struct FreeClusters {
    /// start -> length of each free run below `end`; runs never touch each other.
    runs: BTreeMap<u64, u64>,
    /// Every cluster at or past `end` is free.
    end: u64,
}

impl FreeClusters {
    /// Everything from `first` on is free except `used` (sorted, without duplicates).
    pub fn from_used(first: u64, used: &[u64]) -> Self {
        let mut f = FreeClusters {
            runs: BTreeMap::new(),
            end: first,
        };
        for &u in used {
            if u > f.end {
                f.runs.insert(f.end, u - f.end);
            }
            f.end = f.end.max(u + 1);
        }
        f
    }

    /// The first cluster past everything allocated.
    pub fn end(&self) -> u64 {
        self.end
    }

    pub fn allocate(&mut self) -> u64 {
        self.allocate_run(1)
    }

    /// `n` contiguous clusters: the first run that fits, else at the end.
    pub fn allocate_run(&mut self, n: u64) -> u64 {
        let found = self
            .runs
            .iter()
            .find(|(_, &len)| len >= n)
            .map(|(&s, &l)| (s, l));
        if let Some((start, len)) = found {
            self.runs.remove(&start);
            if len > n {
                self.runs.insert(start + n, len - n);
            }
            return start;
        }
        let start = self.end;
        self.end += n;
        start
    }

    pub fn free_run(&mut self, mut start: u64, mut n: u64) {
        debug_assert!(start + n <= self.end);
        if let Some((&s, &l)) = self.runs.range(..start).next_back() {
            if s + l == start {
                self.runs.remove(&s);
                start = s;
                n += l;
            }
        }
        if let Some(&l) = self.runs.get(&(start + n)) {
            self.runs.remove(&(start + n));
            n += l;
        }
        if start + n == self.end {
            self.end = start;
        } else {
            self.runs.insert(start, n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_runs_merge_and_are_reused_before_the_end_grows() {
        let mut f = FreeClusters::from_used(1, &[3, 4, 9]);
        assert_eq!(f.end(), 10);
        assert_eq!(f.allocate_run(3), 5);
        assert_eq!(f.allocate(), 1);
        f.free_run(5, 3);
        f.free_run(3, 2);
        assert_eq!(f.allocate_run(6), 2);
        // Cluster 8 was still free, so freeing 9 pulls the end back to 8.
        f.free_run(9, 1);
        assert_eq!(f.end(), 8);
        assert_eq!(f.allocate_run(2), 8);
    }
}
