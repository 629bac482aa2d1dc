//! Where new blocks go (FORMAT-v2.md, "Allocation"): into blocks freed since the image was
//! opened and not punched yet, else at the end of the file in write order, or into the
//! file's holes once the file is a quarter longer than what it holds.
use crate::format::v2::{BLOCK, FIRST_HOST_BLOCK};
use crate::storage::Storage;
use std::collections::BTreeMap;

/// Holes are reused once the file's length exceeds its allocated bytes by a quarter plus a
/// slack: a sixteenth of the disk, from 1 MiB to 64 MiB.
fn reuse_slack(virtual_size: u64) -> u64 {
    (virtual_size / 16).clamp(1 << 20, 64 << 20)
}
/// How many allocations pass between two looks at the file's allocated bytes.
const RECHECK_EVERY: u32 = 256;

#[derive(Debug, Default)]
pub struct Allocator {
    /// The first block past everything handed out so far.
    end: u64,
    /// Blocks handed out whose writes have not completed: they may still read as holes.
    claims: BTreeMap<u64, u64>,
    /// Regions no hole in which may be handed out: the journal regions in use.
    reserved: Vec<(u64, u64)>,
    scan_from: u64,
    reusing: bool,
    until_recheck: u32,
    slack: u64,
    /// Freed runs (first block → blocks), adjacent ones joined: still allocated in the
    /// file, referenced by no durable state, handed out before anything else.
    freed: BTreeMap<u64, u64>,
    freed_blocks: u64,
}

impl Allocator {
    pub fn new(file_len: u64, virtual_size: u64, reserved: Vec<(u64, u64)>) -> Allocator {
        let end = file_len
            .div_ceil(BLOCK)
            .max(FIRST_HOST_BLOCK)
            .max(reserved.iter().map(|&(s, l)| s + l).max().unwrap_or(0));
        Allocator {
            end,
            reserved,
            scan_from: FIRST_HOST_BLOCK,
            slack: reuse_slack(virtual_size),
            ..Default::default()
        }
    }

    pub fn set_reserved(&mut self, reserved: Vec<(u64, u64)>) {
        for &(s, l) in &reserved {
            self.end = self.end.max(s + l);
        }
        self.reserved = reserved;
    }

    /// Up to `want` contiguous blocks (at least one), claimed until [`Allocator::release`].
    pub fn allocate(&mut self, storage: &dyn Storage, want: u64) -> (u64, u64) {
        let want = want.max(1);
        if let Some(run) = self.take_freed(want) {
            self.claims.insert(run.0, run.1);
            return run;
        }
        if self.until_recheck == 0 {
            self.until_recheck = RECHECK_EVERY;
            self.reusing = match (storage.len(), storage.allocated_bytes()) {
                (Ok(len), Ok(allocated)) => len > allocated + allocated / 4 + self.slack,
                _ => false,
            };
        }
        self.until_recheck -= 1;
        if self.reusing {
            if let Some(run) = self.find_hole(storage, want) {
                self.claims.insert(run.0, run.1);
                return run;
            }

            self.reusing = false;
        }
        let start = self.end;
        self.end += want;
        self.claims.insert(start, want);
        (start, want)
    }

    /// The lowest freed run, or its first `want` blocks. Overwriting blocks the file system
    /// has already allocated changes none of its metadata, so a flush after it commits no
    /// file-system transaction (and no discard runs under the file's lock).
    fn take_freed(&mut self, want: u64) -> Option<(u64, u64)> {
        let (start, len) = self.freed.pop_first()?;
        let taken = want.min(len);
        if taken < len {
            self.freed.insert(start + taken, len - taken);
        }
        self.freed_blocks -= taken;
        Some((start, taken))
    }

    /// Takes blocks that no state references any more, for reuse.
    pub fn give_back(&mut self, runs: impl IntoIterator<Item = (u64, u64)>) {
        for (mut start, mut len) in runs {
            if len == 0 {
                continue;
            }
            self.freed_blocks += len;
            // Join the run to its neighbours, so that reuse and punches take long runs.
            if let Some((&s, &l)) = self.freed.range(..start).next_back() {
                if s + l == start {
                    self.freed.remove(&s);
                    (start, len) = (s, l + len);
                }
            }
            if let Some(l) = self.freed.remove(&(start + len)) {
                len += l;
            }
            self.freed.insert(start, len);
        }
    }

    /// How many freed blocks wait for reuse.
    pub fn freed_blocks(&self) -> u64 {
        self.freed_blocks
    }

    /// Takes the highest freed runs out until at most `keep` blocks are left, or `max_runs`
    /// runs were taken, to be punched.
    pub fn take_freed_above(&mut self, keep: u64, max_runs: usize) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        while self.freed_blocks > keep && out.len() < max_runs {
            let Some((start, len)) = self.freed.pop_last() else {
                break;
            };
            let excess = self.freed_blocks - keep;
            if len > excess {
                self.freed.insert(start, len - excess);
                out.push((start + len - excess, excess));
                self.freed_blocks = keep;
            } else {
                out.push((start, len));
                self.freed_blocks -= len;
            }
        }
        out
    }

    /// A contiguous run of `len` blocks, always at the end of the file (for a journal).
    pub fn allocate_at_end(&mut self, len: u64) -> (u64, u64) {
        let start = self.end;
        self.end += len;
        self.claims.insert(start, len);
        (start, len)
    }

    /// The claim ends: the blocks were written (now data, never holes) or their write failed
    /// (they are holes again, free).
    pub fn release(&mut self, start: u64) {
        self.claims.remove(&start);
    }

    fn busy(&self, start: u64, end: u64) -> Option<u64> {
        // The end of the first claimed or reserved region that overlaps [start, end).
        let claim = self
            .claims
            .range(..end)
            .next_back()
            .filter(|&(&s, &l)| s + l > start)
            .map(|(&s, &l)| s + l);
        let reserved = self
            .reserved
            .iter()
            .filter(|&&(s, l)| s < end && s + l > start)
            .map(|&(s, l)| s + l)
            .max();
        claim.max(reserved)
    }

    fn find_hole(&mut self, storage: &dyn Storage, want: u64) -> Option<(u64, u64)> {
        let file_blocks = storage.len().ok()? / BLOCK;
        let mut pos = self.scan_from.max(FIRST_HOST_BLOCK);
        let mut wrapped = false;
        loop {
            if pos >= file_blocks {
                if wrapped {
                    return None;
                }
                wrapped = true;
                pos = FIRST_HOST_BLOCK;
                continue;
            }
            let Some(hole) = storage
                .first_hole_in(pos * BLOCK, (file_blocks - pos) * BLOCK)
                .ok()?
            else {
                // No hole from here to the end: look again from the start, once.
                pos = file_blocks;
                continue;
            };
            let hole_start = hole.div_ceil(BLOCK);
            let data = storage.next_data(hole).ok()?.unwrap_or(file_blocks * BLOCK);
            let hole_end = (data / BLOCK).min(file_blocks);
            if hole_start >= hole_end {
                pos = hole_end.max(hole_start) + 1;
                continue;
            }
            if let Some(busy_end) = self.busy(hole_start, hole_end) {
                // Skip past what is claimed or reserved, then look again from there.
                pos = busy_end.max(hole_start + 1);
                continue;
            }
            let len = want.min(hole_end - hole_start);
            self.scan_from = hole_start + len;
            return Some((hole_start, len));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    #[test]
    fn freed_runs_join_are_reused_lowest_first_and_the_highest_are_punched_first() {
        let storage = MemStorage::new(Vec::new());
        let mut a = Allocator::new(0, 1 << 30, Vec::new());
        a.give_back([(100, 4), (108, 2), (104, 4), (200, 0)]);
        assert_eq!(a.freed_blocks(), 10);
        // 100..110 joined into one run: the first allocation takes from its start.
        assert_eq!(a.allocate(&storage, 3), (100, 3));
        assert_eq!(a.freed_blocks(), 7);
        a.give_back([(300, 5)]);
        // Down to 4 blocks: all of 300..305, then the top three of 103..110.
        // One run at a time when asked: the highest first.
        assert_eq!(a.take_freed_above(4, 1), vec![(300, 5)]);
        assert_eq!(a.freed_blocks(), 7);
        assert_eq!(a.take_freed_above(4, usize::MAX), vec![(107, 3)]);
        assert_eq!(a.freed_blocks(), 4);
        assert_eq!(a.allocate(&storage, 10), (103, 4));
        assert_eq!(a.take_freed_above(0, usize::MAX), Vec::new());
        // Nothing freed is left: the next block comes from the end of the file.
        let (start, _) = a.allocate(&storage, 1);
        assert!((FIRST_HOST_BLOCK..100).contains(&start), "{start}");
    }
}
