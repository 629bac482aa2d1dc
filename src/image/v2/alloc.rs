//! Where new blocks go (FORMAT-v2.md, "Allocation"): at the end of the file in write order,
//! or into the file's holes once the file is a quarter longer than what it holds.
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
