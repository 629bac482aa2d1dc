//! The write path (FORMAT-v2.md, "Placement"): in place for blocks written since the last
//! snapshot, else to new blocks at the end of the file; whole blocks of zeros become zero
//! extents; what a change stops referencing is freed at the next publish.
use super::{exclusive, lock, shared, ImageV2, State};
use crate::error::{Error, Result};
use crate::format::v2::{Extent, Mapping, BLOCK, MAX_V2_VIRTUAL_SIZE};
use std::borrow::Cow;

/// A write with more pending extents than this flushes after it, so that memory stays
/// bounded for a client that never flushes.
const MAX_PENDING_EXTENTS: usize = 1 << 14;

/// Where a run of a write's blocks goes: `(first virtual block, blocks, host block, new)`.
type Placement = (u64, u64, u64, bool);

/// Whether a block is all zeros (ORs 64 bytes at a time, which the compiler vectorizes).
pub(super) fn is_zero(b: &[u8]) -> bool {
    b.chunks(64).all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

impl ImageV2 {
    /// Writes `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let too_many = {
            let _io = shared(&self.gate);
            self.write_held(buf, offset)?;
            lock(&self.state).pending.len() > MAX_PENDING_EXTENTS
        };
        if too_many {
            self.flush()?;
        }
        Ok(())
    }

    fn write_held(&self, buf: &[u8], offset: u64) -> Result<()> {
        let first = offset / BLOCK;
        let end = (offset + buf.len() as u64).div_ceil(BLOCK);
        let head = (offset - first * BLOCK) as usize;
        let aligned = head == 0 && (buf.len() as u64).is_multiple_of(BLOCK);
        // Two writes to disjoint bytes of one block must both land: the copy-on-write of a
        // partial block is serialized with every other one of the same block.
        let _partial = (!aligned).then(|| self.lock_partial_blocks(first, end - 1));
        let data: Cow<[u8]> = if aligned {
            Cow::Borrowed(buf)
        } else {
            // Copy-on-write of the partial blocks at either end.
            let mut whole = vec![0u8; ((end - first) * BLOCK) as usize];
            self.read_held(&mut whole[..BLOCK as usize], first * BLOCK)?;
            if end - first > 1 {
                let last = whole.len() - BLOCK as usize;
                self.read_held(&mut whole[last..], (end - 1) * BLOCK)?;
            }
            whole[head..head + buf.len()].copy_from_slice(buf);
            Cow::Owned(whole)
        };
        self.store_blocks(first, &data)
    }

    fn lock_partial_blocks(&self, a: u64, b: u64) -> Vec<std::sync::MutexGuard<'_, ()>> {
        let stripes = self.partial_blocks.len() as u64;
        let (x, y) = ((a % stripes) as usize, (b % stripes) as usize);
        let mut order = vec![x.min(y)];
        if x != y {
            order.push(x.max(y));
        }
        order
            .into_iter()
            .map(|i| lock(&self.partial_blocks[i]))
            .collect()
    }

    /// Stores whole blocks from virtual block `first`.
    fn store_blocks(&self, first: u64, data: &[u8]) -> Result<()> {
        let blocks = data.len() as u64 / BLOCK;
        let mut i = 0;
        while i < blocks {
            let zero = is_zero(block(data, i));
            let mut j = i + 1;
            while j < blocks && is_zero(block(data, j)) == zero {
                j += 1;
            }
            if zero {
                self.set_range(first + i, j - i, self.zero_mapping());
            } else {
                let bytes = &data[(i * BLOCK) as usize..(j * BLOCK) as usize];
                self.store_data(first + i, bytes)?;
            }
            i = j;
        }
        Ok(())
    }

    /// Zeros mask a backing file; without one, an unmapped block reads as zeros already.
    fn zero_mapping(&self) -> Mapping {
        if self.backing.is_some() {
            Mapping::Zero
        } else {
            Mapping::Unmapped
        }
    }

    fn store_data(&self, first: u64, data: &[u8]) -> Result<()> {
        let end = first + data.len() as u64 / BLOCK;
        let plan = self.place(first, end);
        let mut result = Ok(());
        for &(v, n, h, _) in &plan {
            let bytes = &data[((v - first) * BLOCK) as usize..((v - first + n) * BLOCK) as usize];
            if let Err(e) = self.storage.write_at(bytes, h * BLOCK) {
                result = Err(self.io_err("writing", h * BLOCK, e));
                break;
            }
        }
        if result.is_err() {
            // A failed write may have stored part of its blocks; nothing references them,
            // so they are given back now rather than left as leaks.
            for &(_, n, h, new) in &plan {
                if new {
                    let _ = self.storage.punch_hole(h * BLOCK, n * BLOCK);
                }
            }
        }
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        for &(_, _, h, new) in &plan {
            if new {
                st.alloc.release(h);
            }
        }
        result?;
        for &(v, n, h, new) in &plan {
            if new {
                self.remap(st, v, n, Mapping::Data(h));
            }
        }
        Ok(())
    }

    /// Plans where blocks `[first, end)` go: in place where pending data holds them, else
    /// in newly claimed blocks.
    fn place(&self, first: u64, end: u64) -> Vec<Placement> {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        let mut plan = Vec::new();
        let mut p = first;
        let fresh: Vec<Extent> = st.pending.overlapping(first, end);
        let claim = |st: &mut State, from: u64, to: u64, plan: &mut Vec<Placement>| {
            let mut v = from;
            while v < to {
                let (h, n) = st.alloc.allocate(self.storage.as_ref(), to - v);
                plan.push((v, n, h, true));
                v += n;
            }
        };
        for e in fresh {
            if let Mapping::Data(h) = e.mapping {
                claim(st, p, e.start, &mut plan);
                plan.push((e.start, e.len, h, false));
                p = e.end();
            }
        }
        claim(st, p, end, &mut plan);
        plan
    }

    /// Makes `[start, start + len)` read as `mapping` in the pending changes. Pending data
    /// it replaces is freed at the next publish; what the levels below held there is found
    /// when the change is flushed, for all of a snapshot's changes in one walk
    /// (`flush::replaced_below`), not here with a descent per write.
    fn remap(&self, st: &mut State, start: u64, len: u64, mapping: Mapping) {
        let release_at = st.snapshots_taken + 1;
        for r in st.pending.set(start, len, mapping) {
            if let Mapping::Data(h) = r.mapping {
                st.to_free.push((release_at, h, r.len));
            }
        }
    }

    fn set_range(&self, start: u64, len: u64, mapping: Mapping) {
        let mut guard = lock(&self.state);
        self.remap(&mut guard, start, len, mapping)
    }

    /// Makes `[offset, offset + len)` read as zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len)
    }

    /// Discards `[offset, offset + len)`: it reads as zeros afterwards (over a backing file
    /// too), and the space it held is given back at the next flush.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len)
    }

    fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let first_full = offset.div_ceil(BLOCK);
        // A range that reaches the end of the disk covers its last, partial block whole.
        let end_full = if end == self.virtual_size {
            end.div_ceil(BLOCK)
        } else {
            end / BLOCK
        };
        let _io = shared(&self.gate);
        if first_full >= end_full {
            return self.write_held(&vec![0u8; len as usize], offset);
        }
        if offset < first_full * BLOCK {
            let n = (first_full * BLOCK - offset) as usize;
            self.write_held(&vec![0u8; n], offset)?;
        }
        if end_full * BLOCK < end {
            let n = (end - end_full * BLOCK) as usize;
            self.write_held(&vec![0u8; n], end_full * BLOCK)?;
        }
        self.set_range(first_full, end_full - first_full, self.zero_mapping());
        Ok(())
    }

    /// Empties the map: everything falls through to the backing file again. Durable after
    /// the flush this ends with.
    pub fn clear(&self) -> Result<()> {
        self.check_writable()?;
        let vb = self.virtual_size.div_ceil(BLOCK);
        if vb > 0 {
            let _io = shared(&self.gate);
            self.set_range(0, vb, Mapping::Unmapped);
        }
        self.flush()
    }

    /// Changes the virtual size (FORMAT-v2.md, "Resize, commit, rebase").
    pub fn resize(&mut self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        if new_size > MAX_V2_VIRTUAL_SIZE {
            return Err(Error::Invalid {
                path: self.path.clone(),
                reason: format!(
                    "new size {new_size} is larger than the largest version-2 size (2^52 bytes)"
                ),
            });
        }
        self.flush()?;
        let old_size = self.virtual_size;
        if new_size < old_size {
            // Zero the rest of the block that holds the new end, and drop every block past it.
            let tail = new_size % BLOCK;
            if tail != 0 {
                let n = (BLOCK - tail).min(old_size - new_size) as usize;
                let _io = shared(&self.gate);
                self.write_held(&vec![0u8; n], new_size)?;
            }
            let keep = new_size.div_ceil(BLOCK);
            let old_blocks = old_size.div_ceil(BLOCK);
            if old_blocks > keep {
                self.set_range(keep, old_blocks - keep, Mapping::Unmapped);
            }
        } else if let Some(backing_size) = self.backing.as_ref().map(|b| b.size()) {
            // Growing over a longer backing file: the new range reads zeros, not the file.
            let zero_end = new_size.min(backing_size);
            if zero_end > old_size {
                let _io = shared(&self.gate);
                let first = old_size.div_ceil(BLOCK);
                if !old_size.is_multiple_of(BLOCK) {
                    let n = ((first * BLOCK).min(zero_end) - old_size) as usize;
                    self.write_held(&vec![0u8; n], old_size)?;
                }
                let last = zero_end.div_ceil(BLOCK);
                if last > first {
                    self.set_range(first, last - first, Mapping::Zero);
                }
            }
        }
        {
            let _pause = exclusive(&self.gate);
            lock(&self.state).pending_resize = Some(new_size);
        }
        if let Err(e) = self.flush() {
            // A flush refused before it took the resize (the header generation at its
            // limit) leaves it waiting; it must not come with a later flush.
            lock(&self.state).pending_resize = None;
            return Err(e);
        }
        self.virtual_size = new_size;
        Ok(())
    }
}

fn block(data: &[u8], i: u64) -> &[u8] {
    &data[(i * BLOCK) as usize..((i + 1) * BLOCK) as usize]
}
