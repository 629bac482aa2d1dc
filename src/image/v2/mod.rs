//! A version-2 image (format-spec/FORMAT-v2.md): a copy-on-write B+tree of extents paged
//! from disk through a bounded cache, changes since the tree was written kept in memory and
//! in the journal, and new data placed at the end of the file in write order.
//!
//! Files by responsibility: `extents` (the in-memory change maps), `tree` (pages, the
//! cache, lookups and the copy-on-write update), `alloc` (where blocks go), `load` (the
//! header slots and journal replay at open), `write` (the write path), `flush` (the flush
//! protocol, publishing and going back to the durable state; `flush/tree_path` its tree
//! paths), `merged` (reads of a
//! read-only chain through its merged index), `create` (new images and upgrades), `check`
//! (walking everything).
//!
//! Concurrency, as in version 1: `gate` is held shared by every read and write for its whole
//! duration and exclusively by a flush while it takes its snapshot and while it publishes,
//! which is also the only time the tree's root changes and blocks are freed (or, for the
//! pages a kept-journal tree flush replaced, after the next barrier: once its publish is
//! done no reader reaches them); `state` guards the in-memory maps and the allocator and
//! is held only for bookkeeping, never across I/O.
//! A read takes the in-memory changes under `state`, then looks the rest up in the tree with
//! `state` released: holding `gate` shared is what keeps that tree and its pages alive.

mod alloc;
mod check;
mod create;
mod extents;
mod flush;
mod load;
mod merged;
mod tree;
mod write;

pub use check::{check, CheckV2};
pub use create::{create_on, upgrade, UpgradeReport};
pub use load::{current_slot, Slot};

use super::{push_extent, Extent as StatusExtent, ExtentKind, FileId, Layer};
use crate::error::{Error, Result};
use crate::format::v2::{Extent, HeaderV2, Mapping, BLOCK};
use crate::storage::Storage;
use alloc::Allocator;
use extents::ExtentMap;
pub use flush::FlushLimits;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
pub use tree::PageCache;
use tree::{Tree, TreeRoot};

/// The page cache's size unless a setting says otherwise: qcow2's default L2 cache.
pub const DEFAULT_CACHE_SIZE: u64 = 32 << 20;
/// A journal region's size: a 64th of the disk, from 256 KiB to 2 MiB, so that a small
/// disk writes its tree now and then instead of replaying a journal larger than itself.
pub fn journal_capacity_for(virtual_size: u64) -> u64 {
    (virtual_size / 64)
        .clamp(256 << 10, 2 << 20)
        .next_multiple_of(BLOCK)
}

pub struct ImageV2 {
    path: PathBuf,
    storage: Arc<dyn Storage>,
    read_only: bool,
    virtual_size: u64,
    backing: Option<Arc<Layer>>,
    lock_file: Option<std::fs::File>,
    identity: Option<FileId>,
    gate: RwLock<()>,
    state: Mutex<State>,
    cache: Arc<PageCache>,
    /// What `cache` knows this open image's pages by.
    cache_key: u64,
    flush_serial: Mutex<()>,
    failed: AtomicBool,
    reverts: AtomicU64,
    limits: Mutex<flush::FlushLimits>,
    /// Striped by virtual block: held while a partial block is copied, changed and written.
    partial_blocks: Vec<Mutex<()>>,
}

struct State {
    header: HeaderV2,
    active_slot: usize,
    tree: TreeRoot,
    /// Changes since the last snapshot: every data extent here points at blocks written
    /// since then, which a write may change in place.
    pending: ExtentMap,
    /// The changes of the flush in progress.
    in_flight: ExtentMap,
    /// Changes in journal records since the tree was written.
    journaled: ExtentMap,
    /// `(snapshot, first host block, blocks)`: no longer referenced by the current map;
    /// freed when that snapshot is published.
    to_free: Vec<(u64, u64, u64)>,
    journal_tail: u64,
    journal_next_seq: u64,
    last_record_has_data: bool,
    journal_reserved: bool,
    snapshots_taken: u64,
    snapshots_published: u64,
    /// Where the next tree flush starts applying changes (FORMAT-v2.md, "The flush
    /// protocol"): a tree flush applies a bounded number, in key order from here.
    tree_cursor: u64,
    /// The journal region before the current one, kept (reserved) for the next tree flush.
    spare_journal: Option<(u64, u64)>,
    alloc: Allocator,
    /// A resize waiting for its flush, which then takes the tree path.
    pending_resize: Option<u64>,
    /// The current header slot was written after the last barrier (a kept-journal tree
    /// flush): the next barrier makes it durable, and comes before any other slot write.
    header_unsynced: bool,
    /// Pages the tree replaced under that header: the other slot, still durable, may
    /// reach them until then, so they are freed only after the next barrier.
    freed_after_barrier: Vec<(u64, u64)>,
}

impl State {
    fn from_loaded(l: load::Loaded) -> State {
        let journal = (
            l.header.journal_offset / BLOCK,
            l.header.journal_capacity / BLOCK,
        );
        let alloc = Allocator::new(l.file_length, l.header.virtual_size, vec![journal]);
        State {
            tree: TreeRoot {
                root: l.header.map_root,
                height: l.header.map_height,
                extents: l.header.map_extents,
            },
            header: l.header,
            active_slot: l.active_slot,
            pending: ExtentMap::default(),
            in_flight: ExtentMap::default(),
            journaled: l.journaled,
            to_free: Vec::new(),
            journal_tail: l.journal_tail,
            journal_next_seq: l.journal_next_seq,
            last_record_has_data: l.last_record_has_data,
            journal_reserved: false,
            snapshots_taken: 0,
            snapshots_published: 0,
            tree_cursor: 0,
            spare_journal: None,
            alloc,
            pending_resize: None,
            header_unsynced: false,
            freed_after_barrier: Vec::new(),
        }
    }
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

/// xxh3-64 over the host blocks of the data extents, in order (FORMAT-v2.md, "Journal").
pub(crate) fn digest_extents(
    storage: &dyn Storage,
    items: &[Extent],
) -> std::result::Result<u64, (u64, std::io::Error)> {
    let data: Vec<(u64, u64)> = items
        .iter()
        .filter_map(|e| match e.mapping {
            Mapping::Data(h) => Some((h, e.len)),
            _ => None,
        })
        .collect();
    let blocks: u64 = data.iter().map(|&(_, n)| n).sum();
    if data.len() > 1 && blocks * BLOCK <= DIGEST_GATHER_BYTES {
        return digest_gathered(storage, &data, blocks);
    }
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; (blocks * BLOCK).min(1 << 20) as usize];
    for &(h, n) in &data {
        let mut at = h * BLOCK;
        let end = (h + n) * BLOCK;
        while at < end {
            let n = (end - at).min(buf.len() as u64) as usize;
            storage.read_at(&mut buf[..n], at).map_err(|e| (at, e))?;
            hasher.update(&buf[..n]);
            at += n as u64;
        }
    }
    Ok(hasher.digest())
}

/// Records this small or smaller have their data read in host order, one read per run
/// of adjacent host blocks, and hashed in item order from memory: a flush's blocks were
/// written one after another at the end of the file, so a record of a hundred scattered
/// 4 KiB writes takes one read instead of a hundred.
const DIGEST_GATHER_BYTES: u64 = 4 << 20;

/// [`digest_extents`] for `data` (host block, blocks) in item order, `blocks` in all. A
/// written record's ranges are distinct; a crafted one's may share host blocks, and each
/// range is still read where it lies.
fn digest_gathered(
    storage: &dyn Storage,
    data: &[(u64, u64)],
    blocks: u64,
) -> std::result::Result<u64, (u64, std::io::Error)> {
    let mut by_host: Vec<usize> = (0..data.len()).collect();
    by_host.sort_unstable_by_key(|&i| data[i].0);
    let mut buf = vec![0u8; (blocks * BLOCK) as usize];
    // Where each extent's bytes land in `buf`: in host order, so that adjacent host runs
    // are adjacent in the buffer too.
    let mut at_in_buf = vec![0usize; data.len()];
    let mut filled = 0usize;
    let mut k = 0;
    while k < by_host.len() {
        let (start, _) = data[by_host[k]];
        let run_from = filled;
        let mut next = start;
        while k < by_host.len() && data[by_host[k]].0 == next {
            let (h, n) = data[by_host[k]];
            at_in_buf[by_host[k]] = filled;
            filled += (n * BLOCK) as usize;
            next = h + n;
            k += 1;
        }
        storage
            .read_at(&mut buf[run_from..filled], start * BLOCK)
            .map_err(|e| (start * BLOCK, e))?;
    }
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    for (i, &(_, n)) in data.iter().enumerate() {
        hasher.update(&buf[at_in_buf[i]..at_in_buf[i] + (n * BLOCK) as usize]);
    }
    Ok(hasher.digest())
}

impl ImageV2 {
    /// Opens a version-2 image over any storage, without its backing file.
    pub fn open_storage(
        storage: Arc<dyn Storage>,
        name: &Path,
        read_only: bool,
        cache: Arc<PageCache>,
    ) -> Result<ImageV2> {
        let loaded = load::load(storage.as_ref(), name)?;
        Ok(ImageV2 {
            path: name.into(),
            virtual_size: loaded.header.virtual_size,
            storage,
            read_only,
            backing: None,
            lock_file: None,
            identity: None,
            gate: RwLock::new(()),
            state: Mutex::new(State::from_loaded(loaded)),
            cache,
            cache_key: tree::new_cache_key(),
            flush_serial: Mutex::new(()),
            failed: false.into(),
            reverts: 0.into(),
            limits: Mutex::default(),
            partial_blocks: (0..64).map(|_| Mutex::new(())).collect(),
        })
    }

    /// Attaches what opening a file adds: its lock, identity and backing layer.
    pub(crate) fn attach_file(
        &mut self,
        lock_file: std::fs::File,
        identity: FileId,
        backing: Option<Arc<Layer>>,
    ) {
        self.lock_file = Some(lock_file);
        self.identity = Some(identity);
        self.backing = backing;
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }
    pub fn backing(&self) -> Option<&Layer> {
        self.backing.as_deref()
    }
    pub fn set_backing_layer(&mut self, layer: Option<Arc<Layer>>) {
        // What the merged index resolved was through the old chain.
        self.cache.forget_image(self.cache_key);
        self.backing = layer;
    }
    pub fn header(&self) -> HeaderV2 {
        lock(&self.state).header.clone()
    }
    pub fn identity(&self) -> Option<FileId> {
        self.identity
    }
    pub fn lock_file(&self) -> Option<&std::fs::File> {
        self.lock_file.as_ref()
    }
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }
    pub fn reverts(&self) -> u64 {
        self.reverts.load(Ordering::Acquire)
    }
    pub fn continue_reverts_of(&self, earlier: u64) {
        self.reverts.fetch_max(earlier, Ordering::AcqRel);
    }

    pub(crate) fn io_err(&self, op: &'static str, offset: u64, source: std::io::Error) -> Error {
        super::io_error(&self.path, op, offset, source)
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<()> {
        super::check_request(&self.path, offset, length, self.virtual_size)
    }

    fn check_writable(&self) -> Result<()> {
        super::check_may_write(
            &self.path,
            self.read_only,
            self.failed.load(Ordering::Acquire),
        )
    }

    fn tree<'a>(&'a self, st: &State) -> Tree<'a> {
        Tree {
            storage: self.storage.as_ref(),
            cache: &self.cache,
            path: &self.path,
            root: st.tree,
            image_id: st.header.image_id,
            cache_key: self.cache_key,
            generation: st.header.generation,
            virtual_blocks: st.header.virtual_blocks(),
        }
    }

    /// What virtual blocks `[start, end)` read as, in order and covering the range: the
    /// in-memory changes first, then the tree; what none of them maps is `Unmapped`.
    fn resolve(&self, st: &State, start: u64, end: u64) -> Result<Vec<Extent>> {
        let (found, gaps) = resolve_changes(st, start, end);
        resolve_in_tree(&self.tree(st), found, gaps)
    }

    /// [`ImageV2::resolve`] for a caller holding the gate shared, with the state lock held
    /// only over the in-memory changes: the tree it walks cannot change under it, since a
    /// tree flush publishes its root (and frees the old pages) only with the gate held
    /// exclusively. Readers of one image, and of the layers of a chain, so do not queue on
    /// each other's page lookups.
    fn resolve_gated(&self, start: u64, end: u64) -> Result<Vec<Extent>> {
        let (found, gaps, tree) = {
            let st = lock(&self.state);
            let (found, gaps) = resolve_changes(&st, start, end);
            (found, gaps, self.tree(&st))
        };
        resolve_in_tree(&tree, found, gaps)
    }

    /// Reads `buf.len()` bytes at `offset` of the merged chain.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let _io = shared(&self.gate);
        if self.reads_merged() {
            self.read_merged(buf, offset)
        } else {
            self.read_held(buf, offset)
        }
    }

    /// A read with the gate held.
    fn read_held(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset + buf.len() as u64;
        let pieces = self.resolve_gated(offset / BLOCK, end.div_ceil(BLOCK))?;
        for p in pieces {
            let from = (p.start * BLOCK).max(offset);
            let to = (p.end() * BLOCK).min(end);
            let b = &mut buf[(from - offset) as usize..(to - offset) as usize];
            match p.mapping {
                Mapping::Data(h) => {
                    let at = h * BLOCK + (from - p.start * BLOCK);
                    self.storage
                        .read_at(b, at)
                        .map_err(|e| self.io_err("reading", at, e))?;
                }
                Mapping::Zero => b.fill(0),
                Mapping::Unmapped => match &self.backing {
                    Some(layer) => layer.read_at(b, from)?,
                    None => b.fill(0),
                },
            }
        }
        Ok(())
    }

    /// The allocation status of `[offset, offset+len)` through the whole chain.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<StatusExtent>> {
        self.check_range(offset, len)?;
        let mut out = Vec::new();
        if len > 0 {
            self.status_at_depth(offset, len, 0, &mut out)?;
        }
        Ok(out)
    }

    pub(crate) fn status_at_depth(
        &self,
        offset: u64,
        len: u64,
        depth: u32,
        out: &mut Vec<StatusExtent>,
    ) -> Result<()> {
        let end = offset + len;
        let pieces = {
            let _io = shared(&self.gate);
            self.resolve_gated(offset / BLOCK, end.div_ceil(BLOCK))?
        };
        for p in pieces {
            let from = (p.start * BLOCK).max(offset);
            let to = (p.end() * BLOCK).min(end);
            let (kind, host_offset) = match p.mapping {
                Mapping::Data(h) => (ExtentKind::Data, Some(h * BLOCK + from - p.start * BLOCK)),
                Mapping::Zero => (ExtentKind::Zero, None),
                Mapping::Unmapped => match &self.backing {
                    Some(b) => {
                        b.status(from, to - from, depth + 1, out)?;
                        continue;
                    }
                    None => (ExtentKind::Unallocated, None),
                },
            };
            push_extent(
                out,
                StatusExtent {
                    offset: from,
                    length: to - from,
                    depth,
                    kind,
                    host_offset,
                    compressed: false,
                },
            );
        }
        Ok(())
    }

    /// This layer's own ranges: `(offset, length, host offset or None for zeros)`.
    pub(crate) fn own_ranges(&self) -> Result<Vec<(u64, u64, Option<u64>)>> {
        let vb = self.virtual_size.div_ceil(BLOCK);
        let st = lock(&self.state);
        let mut out = Vec::new();
        for p in self.resolve(&st, 0, vb)? {
            let from = p.start * BLOCK;
            let to = (p.end() * BLOCK).min(self.virtual_size);
            match p.mapping {
                Mapping::Data(h) => out.push((from, to - from, Some(h * BLOCK))),
                Mapping::Zero => out.push((from, to - from, None)),
                Mapping::Unmapped => {}
            }
        }
        Ok(out)
    }

    /// The ranges that fall through to the backing file.
    pub(crate) fn fall_through_ranges(&self) -> Result<Vec<(u64, u64)>> {
        let vb = self.virtual_size.div_ceil(BLOCK);
        let st = lock(&self.state);
        Ok(self
            .resolve(&st, 0, vb)?
            .into_iter()
            .filter(|p| p.mapping == Mapping::Unmapped)
            .map(|p| {
                let from = p.start * BLOCK;
                (from, (p.end() * BLOCK).min(self.virtual_size) - from)
            })
            .collect())
    }

    pub fn stats(&self) -> StatsV2 {
        let st = lock(&self.state);
        let (cached_pages, cache_hits, cache_misses) = self.cache.stats();
        StatsV2 {
            tree_extents: st.tree.extents,
            tree_height: st.tree.height,
            changed_extents: (st.journaled.len() + st.in_flight.len() + st.pending.len()) as u64,
            file_length: self.storage.len().unwrap_or(0),
            allocated_bytes: self.storage.allocated_bytes().unwrap_or(0),
            journal_used: st.journal_tail,
            journal_capacity: st.header.journal_capacity,
            generation: st.header.generation,
            cached_pages: cached_pages as u64,
            cache_hits,
            cache_misses,
        }
    }
}

/// What `info` shows of a version-2 image, without walking the tree.
#[derive(Debug, Clone, Default)]
pub struct StatsV2 {
    pub tree_extents: u64,
    pub tree_height: u8,
    pub changed_extents: u64,
    pub file_length: u64,
    pub allocated_bytes: u64,
    pub journal_used: u64,
    pub journal_capacity: u64,
    pub generation: u64,
    pub cached_pages: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
}

fn unmapped(start: u64, end: u64) -> Extent {
    Extent {
        start,
        len: end - start,
        mapping: Mapping::Unmapped,
    }
}

impl Drop for ImageV2 {
    /// Closing flushes, as qemu does, and seals the journal.
    fn drop(&mut self) {
        if !self.read_only && !self.failed.load(Ordering::Acquire) && self.flush().is_ok() {
            let _ = self.seal();
        }
        // Nothing references the spare journal region once the image is closed, nor the
        // freed blocks not punched yet.
        let runs = {
            let mut st = lock(&self.state);
            let mut runs = st.alloc.take_freed_above(0, usize::MAX);
            runs.extend(st.spare_journal.take());
            runs
        };
        if !self.read_only {
            self.punch_runs(runs);
        }
    }
}

/// The in-memory changes' part of resolving `[start, end)`: what the pending, in-flight and
/// journaled changes map there (newest first), and the gaps they leave for the tree.
fn resolve_changes(st: &State, start: u64, end: u64) -> (Vec<Extent>, Vec<(u64, u64)>) {
    let mut found = Vec::new();
    let mut gaps = vec![(start, end)];
    for level in [&st.pending, &st.in_flight, &st.journaled] {
        if level.is_empty() {
            continue;
        }
        let mut next = Vec::new();
        for (gs, ge) in gaps {
            let mut p = gs;
            for e in level.overlapping(gs, ge) {
                if e.start > p {
                    next.push((p, e.start));
                }
                p = e.end();
                found.push(e);
            }
            if p < ge {
                next.push((p, ge));
            }
        }
        gaps = next;
    }
    (found, gaps)
}

/// The tree's part of resolving: fills `gaps` from `tree` (what it does not map is
/// `Unmapped`) and returns everything in order.
fn resolve_in_tree(
    tree: &Tree<'_>,
    mut found: Vec<Extent>,
    gaps: Vec<(u64, u64)>,
) -> Result<Vec<Extent>> {
    for (gs, ge) in gaps {
        let mut p = gs;
        tree.lookup(gs, ge, &mut |e| {
            if e.start > p {
                found.push(unmapped(p, e.start));
            }
            p = e.end();
            found.push(e);
        })?;
        if p < ge {
            found.push(unmapped(p, ge));
        }
    }
    found.sort_unstable_by_key(|e| e.start);
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    /// The digest as the format defines it: the data blocks of the items, in item order.
    fn digest_one_by_one(storage: &dyn Storage, items: &[Extent]) -> u64 {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        for e in items {
            if let Mapping::Data(h) = e.mapping {
                let mut buf = vec![0u8; (e.len * BLOCK) as usize];
                storage.read_at(&mut buf, h * BLOCK).unwrap();
                hasher.update(&buf);
            }
        }
        hasher.digest()
    }

    #[test]
    fn a_digest_read_in_host_order_equals_one_read_in_item_order() {
        let storage = MemStorage::new((0..64 * BLOCK).map(|i| (i * 7 % 251) as u8).collect());
        let data = |start, len, h| Extent {
            start,
            len,
            mapping: Mapping::Data(h),
        };
        let cases: Vec<Vec<Extent>> = vec![
            // Written in host order, items in virtual order: adjacent host runs, shuffled.
            vec![
                data(0, 1, 9),
                data(1, 2, 3),
                data(5, 1, 5),
                data(9, 3, 6),
                data(20, 1, 12),
            ],
            // Zero extents between, and one host run split across distant items.
            vec![
                data(0, 2, 40),
                Extent {
                    start: 2,
                    len: 3,
                    mapping: Mapping::Zero,
                },
                data(7, 1, 42),
                data(8, 1, 1),
            ],
            // A crafted record may map two ranges to the same or overlapping host blocks.
            vec![data(0, 2, 10), data(4, 1, 10), data(6, 2, 11)],
        ];
        for items in cases {
            assert_eq!(
                digest_extents(&storage, &items).unwrap(),
                digest_one_by_one(&storage, &items),
                "{items:?}"
            );
        }
    }
}
