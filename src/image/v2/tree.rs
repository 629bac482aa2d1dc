//! The map tree (FORMAT-v2.md, "Map pages"): lookups through a bounded page cache, and the
//! copy-on-write update that a tree flush writes.
use super::extents::{overlay_sorted, ExtentMap};
use super::merged::ChainPiece;
use crate::error::{Error, Result};
use crate::format::v2::{
    decode_page, encode_page, Extent, PageBody, PageContext, BLOCK, MAX_HEIGHT, PAGE_CAPACITY,
    VIRTUAL_BLOCK_LIMIT,
};
use crate::storage::Storage;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// Where the tree is: what the current header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TreeRoot {
    /// Byte offset of the root page; 0 with height 0 for an empty tree.
    pub root: u64,
    pub height: u8,
    pub extents: u64,
}

/// What the cache holds under a key.
enum Cached {
    /// A decoded map page, with the place in the tree it was checked for.
    Page {
        body: Arc<PageBody>,
        level: u8,
        lo: u64,
        hi: u64,
    },
    /// A region of a read-only chain as its merged index resolved it (`merged.rs`).
    Region(Arc<[ChainPiece]>),
}

/// Decoded pages by byte offset, at most `budget` bytes of them as they are held in memory
/// (a decoded page costs what its items take, not 4 KiB), and the regions of read-only
/// chains their merged indexes resolved, under the same budget. Pages never change once written,
/// so the cache is never written back; a page is inserted when it is written, so an offset
/// reused for a new page never serves the old one.
///
/// One cache serves every image of a server and every layer of a chain, so a read through
/// 16 layers visits it 16 times or more: it is split into shards by key, each behind its
/// own read-write lock, and a hit only sets the page's `used` flag under the shared lock.
/// Eviction is the second-chance clock: pages leave a shard in the order they came in,
/// except that a page used since it was last passed over goes round once more.
pub struct PageCache {
    shard_budget: usize,
    shards: Box<[RwLock<Shard>]>,
    next_seq: AtomicU64,
}

#[derive(Default)]
struct Shard {
    pages: HashMap<Key, Entry, BuildHasherDefault<KeyHasher>>,
    /// `(key, seq)` in insertion order; a record whose seq is not its key's entry's any
    /// more (the page was forgotten or replaced) is skipped.
    order: VecDeque<(Key, u64)>,
    bytes: usize,
    hits: AtomicU64,
    misses: AtomicU64,
}

struct Entry {
    cached: Cached,
    seq: u64,
    used: AtomicBool,
}

/// Below this a shard holds too few pages to be worth splitting off.
const SHARD_BYTES: usize = 256 << 10;
const MAX_SHARDS: usize = 16;

impl std::fmt::Debug for PageCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (pages, hits, misses) = self.stats();
        f.debug_struct("PageCache")
            .field("budget", &(self.shard_budget * self.shards.len()))
            .field("pages", &pages)
            .field("hits", &hits)
            .field("misses", &misses)
            .finish()
    }
}

impl PageCache {
    pub fn new(bytes: u64) -> PageCache {
        let budget = (bytes as usize).max(16 * BLOCK as usize);
        let shards = (budget / SHARD_BYTES).clamp(1, MAX_SHARDS);
        PageCache {
            shard_budget: budget / shards,
            shards: (0..shards).map(|_| RwLock::default()).collect(),
            next_seq: AtomicU64::new(0),
        }
    }

    fn shard(&self, key: Key) -> &RwLock<Shard> {
        // Middle bits of the key's hash: the shard's map indexes by the low ones and tags
        // by the top seven.
        let h = BuildHasherDefault::<KeyHasher>::default().hash_one(key);
        &self.shards[(h >> 40) as usize % self.shards.len()]
    }

    fn get_page(&self, key: Key, level: u8, lo: u64, hi: u64) -> Option<Arc<PageBody>> {
        self.get(key, |cached| match cached {
            // A page reached with another range than it was checked for is checked again.
            Cached::Page {
                body,
                level: l,
                lo: a,
                hi: b,
            } if (*l, *a, *b) == (level, lo, hi) => Some(body.clone()),
            _ => None,
        })
    }

    /// A region of the read-only image `cache_key`'s chain, if its merged index holds it.
    pub(super) fn get_region(&self, cache_key: u64, region: u64) -> Option<Arc<[ChainPiece]>> {
        self.get(region_key(cache_key, region), |cached| match cached {
            Cached::Region(pieces) => Some(pieces.clone()),
            Cached::Page { .. } => None,
        })
    }

    pub(super) fn insert_region(&self, cache_key: u64, region: u64, pieces: Arc<[ChainPiece]>) {
        self.insert(region_key(cache_key, region), Cached::Region(pieces));
    }

    fn get<T>(&self, key: Key, pick: impl FnOnce(&Cached) -> Option<T>) -> Option<T> {
        let shard = read_lock(self.shard(key));
        let hit = shard.pages.get(&key).and_then(|e| {
            let found = pick(&e.cached)?;
            if !e.used.load(Ordering::Relaxed) {
                e.used.store(true, Ordering::Relaxed);
            }
            Some(found)
        });
        let counter = if hit.is_some() {
            &shard.hits
        } else {
            &shard.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        hit
    }

    fn insert(&self, key: Key, cached: Cached) {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let mut guard = write_lock(self.shard(key));
        let shard = &mut *guard;
        shard.bytes += cost(&cached);
        let entry = Entry {
            cached,
            seq,
            used: AtomicBool::new(false),
        };
        if let Some(old) = shard.pages.insert(key, entry) {
            shard.bytes -= cost(&old.cached);
        }
        shard.order.push_back((key, seq));
        while shard.bytes > self.shard_budget {
            let Some((k, s)) = shard.order.pop_front() else {
                break;
            };
            if s == seq {
                // Everything older is gone: the new page stays, even alone over budget.
                shard.order.push_front((k, s));
                break;
            }
            let Some(e) = shard.pages.get_mut(&k).filter(|e| e.seq == s) else {
                continue;
            };
            if *e.used.get_mut() {
                *e.used.get_mut() = false;
                shard.order.push_back((k, s));
            } else if let Some(old) = shard.pages.remove(&k) {
                shard.bytes -= cost(&old.cached);
            }
        }
        // Forgotten pages leave records behind; keep `order` bounded by what is held.
        if shard.order.len() > 2 * shard.pages.len() + 64 {
            let pages = &shard.pages;
            shard
                .order
                .retain(|(k, s)| pages.get(k).is_some_and(|e| e.seq == *s));
        }
    }

    pub fn forget(&self, cache_key: u64, offset: u64) {
        let key = (cache_key, offset);
        let mut shard = write_lock(self.shard(key));
        if let Some(old) = shard.pages.remove(&key) {
            shard.bytes -= cost(&old.cached);
        }
    }

    /// Forgets every page of one image (it went back to its durable state).
    pub fn forget_image(&self, cache_key: u64) {
        for shard in self.shards.iter() {
            let mut guard = write_lock(shard);
            let shard = &mut *guard;
            let mut freed = 0;
            shard.pages.retain(|&(id, _), e| {
                let keep = id != cache_key;
                if !keep {
                    freed += cost(&e.cached);
                }
                keep
            });
            shard.bytes -= freed;
        }
    }

    /// `(pages held, hits, misses)`.
    pub fn stats(&self) -> (usize, u64, u64) {
        self.shards.iter().fold((0, 0, 0), |(p, h, m), shard| {
            let s = read_lock(shard);
            (
                p + s.pages.len(),
                h + s.hits.load(Ordering::Relaxed),
                m + s.misses.load(Ordering::Relaxed),
            )
        })
    }

    /// The bytes the cache holds, by its own count.
    #[cfg(test)]
    fn held_bytes(&self) -> usize {
        self.shards.iter().map(|s| read_lock(s).bytes).sum()
    }
}

fn read_lock<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write_lock<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

/// Pages are known by the open image they belong to and their offset, so that one cache
/// serves every image of a server. Not by the `image_id` the pages record: a copied file
/// has its original's id and page offsets, and two copies open in one server must not
/// share pages once either writes new ones.
type Key = (u64, u64);

/// A key no other open image has, for [`Tree::cache_key`].
pub fn new_cache_key() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// What an entry holds in memory: a page's items or a region's pieces, the map slot and
/// the bookkeeping.
fn cost(cached: &Cached) -> usize {
    const ENTRY: usize = 96;
    ENTRY
        + match cached {
            Cached::Page { body, .. } => match &**body {
                PageBody::Leaf(e) => e.capacity() * std::mem::size_of::<Extent>(),
                PageBody::Internal(c) => c.capacity() * std::mem::size_of::<Child>(),
            },
            Cached::Region(pieces) => std::mem::size_of_val::<[ChainPiece]>(pieces),
        }
}

/// A region's key: page offsets are multiples of 4 KiB, so an odd second half is never a
/// page's.
fn region_key(cache_key: u64, region: u64) -> Key {
    (cache_key, (region << 12) | 1)
}

/// The hash of a key: both halves are already well spread (a counter and an offset), so a
/// multiply mixes them well enough, at a fraction of SipHash's cost on every lookup.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(23) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 29)
    }
}

/// The tree of one image as of one header, and what reading it needs.
pub struct Tree<'a> {
    pub storage: &'a dyn Storage,
    pub cache: &'a PageCache,
    pub path: &'a Path,
    pub root: TreeRoot,
    /// The image's id as its pages record it (checked on every page read).
    pub image_id: u64,
    /// What the cache knows this open image by (see [`PageCache`]'s key).
    pub cache_key: u64,
    /// The current header's generation: no page may be newer.
    pub generation: u64,
    pub virtual_blocks: u64,
}

/// What a copy-on-write update produced: the new root, and the pages the old tree had that
/// the new one does not (to be freed once the new header is durable).
pub struct Updated {
    pub root: TreeRoot,
    pub replaced_pages: Vec<u64>,
    pub written_pages: Vec<u64>,
    /// Set when the leaf budget ran out: updates were applied below this block only (one
    /// that straddles it in part). What lies at or above it is still to be applied.
    pub applied_below: Option<u64>,
}

/// A child reference while a page is rebuilt: the first block of its range and its offset.
type Child = (u64, u64);

impl Tree<'_> {
    fn page(&self, offset: u64, level: u8, lo: u64, hi: u64) -> Result<Arc<PageBody>> {
        if let Some(body) = self.cache.get_page((self.cache_key, offset), level, lo, hi) {
            return Ok(body);
        }
        let file_len = self.storage.len().map_err(|e| self.io_err(offset, e))?;
        if offset + BLOCK > file_len {
            return Err(Error::Inconsistent {
                path: self.path.into(),
                reason: format!(
                    "map page at offset {offset:#x} lies past the end of the file ({file_len:#x} bytes)"
                ),
            });
        }
        let mut buf = vec![0u8; BLOCK as usize];
        self.storage
            .read_at(&mut buf, offset)
            .map_err(|e| self.io_err(offset, e))?;
        let cx = PageContext {
            image_id: self.image_id,
            max_generation: self.generation,
            level,
            lo,
            hi,
            virtual_blocks: self.virtual_blocks,
            file_len,
        };
        let body = Arc::new(decode_page(&buf, &cx).map_err(|source| Error::Corrupt {
            path: self.path.into(),
            structure: "map page",
            offset,
            source,
        })?);
        self.cache.insert(
            (self.cache_key, offset),
            Cached::Page {
                body: body.clone(),
                level,
                lo,
                hi,
            },
        );
        Ok(body)
    }

    fn io_err(&self, offset: u64, source: std::io::Error) -> Error {
        Error::Io {
            path: self.path.into(),
            op: "reading a map page",
            offset,
            source,
        }
    }

    /// Calls `f` with the tree's extents overlapping `[start, end)`, clipped, in order.
    pub fn lookup(&self, start: u64, end: u64, f: &mut dyn FnMut(Extent)) -> Result<()> {
        self.lookup_ranges(&[(start, end)], f)
    }

    /// Calls `f` with the tree's extents overlapping each of `ranges` (sorted, not
    /// overlapping), clipped to it, in order. Each page is read once for all the ranges
    /// under it: a flush finds what its changes replace in one walk, not a descent each.
    pub fn lookup_ranges(&self, ranges: &[(u64, u64)], f: &mut dyn FnMut(Extent)) -> Result<()> {
        let ranges: std::borrow::Cow<[(u64, u64)]> = if ranges.iter().all(|(s, e)| s < e) {
            ranges.into()
        } else {
            ranges.iter().copied().filter(|(s, e)| s < e).collect()
        };
        if self.root.height == 0 || ranges.is_empty() {
            return Ok(());
        }
        let top = (self.root.root, self.root.height - 1, 0, VIRTUAL_BLOCK_LIMIT);
        self.lookup_in(top, &ranges, f)
    }

    /// One step of [`Tree::lookup_ranges`]: the page `(offset, level, lo, hi)` and the
    /// ranges that overlap it.
    fn lookup_in(
        &self,
        (offset, level, lo, hi): (u64, u8, u64, u64),
        ranges: &[(u64, u64)],
        f: &mut dyn FnMut(Extent),
    ) -> Result<()> {
        match &*self.page(offset, level, lo, hi)? {
            PageBody::Leaf(extents) => {
                for &(start, end) in ranges {
                    let first = extents.partition_point(|e| e.end() <= start);
                    for e in extents[first..].iter().take_while(|e| e.start < end) {
                        let from = e.start.max(start);
                        let to = e.end().min(end);
                        f(Extent {
                            start: from,
                            len: to - from,
                            mapping: e.mapping.advanced(from - e.start),
                        });
                    }
                }
                Ok(())
            }
            PageBody::Internal(children) => {
                // The first child that can overlap: the last whose key is at most the
                // first range's start.
                let first = children
                    .partition_point(|&(key, _)| key <= ranges[0].0)
                    .saturating_sub(1);
                let mut rest = ranges;
                for (child_lo, child_hi, child) in child_ranges(children, lo, hi).skip(first) {
                    // A range that reaches into the next child goes to both; each gets
                    // only its own extents.
                    rest = &rest[rest.partition_point(|&(_, end)| end <= child_lo)..];
                    if rest.is_empty() {
                        break;
                    }
                    let here = rest.partition_point(|&(start, _)| start < child_hi);
                    if here > 0 {
                        let page = (child, level - 1, child_lo, child_hi);
                        self.lookup_in(page, &rest[..here], f)?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Applies `updates` (sorted, not overlapping; unmapped ranges are removed) to the tree,
    /// copy-on-write: every changed page is written to a block `alloc` gives, stamped with
    /// `new_generation`. Pages not changed keep their place.
    pub fn update(
        &self,
        updates: &ExtentMap,
        new_generation: u64,
        alloc: &mut dyn FnMut() -> Result<u64>,
    ) -> Result<Updated> {
        self.update_leaves(updates, usize::MAX, new_generation, alloc)
    }

    /// [`Tree::update`] that rewrites at most `leaf_budget` existing leaves (at least one),
    /// in key order: the updates beyond the last leaf it rewrote are left out, and
    /// [`Updated::applied_below`] says from where.
    pub fn update_leaves(
        &self,
        updates: &ExtentMap,
        leaf_budget: usize,
        new_generation: u64,
        alloc: &mut dyn FnMut() -> Result<u64>,
    ) -> Result<Updated> {
        let updates: Vec<Extent> = updates.iter().collect();
        let mut out = Updated {
            root: self.root,
            replaced_pages: Vec::new(),
            written_pages: Vec::new(),
            applied_below: None,
        };
        let mut w = Writer {
            tree: self,
            generation: new_generation,
            alloc,
            out: &mut out,
            extents_delta: 0,
            leaves_left: leaf_budget.max(1),
        };
        let (mut level, mut children) = if self.root.height == 0 {
            (0, w.rebuild_leaf(None, 0, VIRTUAL_BLOCK_LIMIT, &updates)?)
        } else {
            let level = self.root.height - 1;
            (
                level,
                w.rebuild(self.root.root, level, 0, VIRTUAL_BLOCK_LIMIT, &updates)?,
            )
        };
        let extents_delta = w.extents_delta;
        // Grow the tree while a level has more than one page.
        while children.len() > 1 {
            level += 1;
            if level >= MAX_HEIGHT {
                return Err(Error::Invalid {
                    path: self.path.into(),
                    reason: "the map would need more than 8 levels".into(),
                });
            }
            children = w.write_internal(level, 0, VIRTUAL_BLOCK_LIMIT, children)?;
        }
        let extents = (self.root.extents as i64 + extents_delta).max(0) as u64;
        out.root = match children.first() {
            None => TreeRoot::default(),
            Some(&(_, root)) => TreeRoot {
                root,
                height: level + 1,
                extents,
            },
        };
        Ok(out)
    }

    /// Every page offset of the tree and every extent, for `check` (pages first-visit order).
    pub fn walk(
        &self,
        page: &mut dyn FnMut(u64, u8),
        extent: &mut dyn FnMut(Extent),
    ) -> Result<()> {
        if self.root.height == 0 {
            return Ok(());
        }
        self.walk_in(
            self.root.root,
            self.root.height - 1,
            0,
            VIRTUAL_BLOCK_LIMIT,
            page,
            extent,
        )
    }

    fn walk_in(
        &self,
        offset: u64,
        level: u8,
        lo: u64,
        hi: u64,
        page: &mut dyn FnMut(u64, u8),
        extent: &mut dyn FnMut(Extent),
    ) -> Result<()> {
        page(offset, level);
        match &*self.page(offset, level, lo, hi)? {
            PageBody::Leaf(extents) => extents.iter().for_each(|&e| extent(e)),
            PageBody::Internal(children) => {
                for (clo, chi, child) in child_ranges(children, lo, hi) {
                    self.walk_in(child, level - 1, clo, chi, page, extent)?;
                }
            }
        }
        Ok(())
    }
}

/// `(lo, hi, offset)` of each child of an internal page covering `[lo, hi)`: the first
/// child covers from `lo` whatever its key (FORMAT-v2.md, "Internal items").
fn child_ranges(children: &[Child], lo: u64, hi: u64) -> ChildRanges<'_> {
    ChildRanges {
        children,
        next: 0,
        lo,
        hi,
    }
}

/// The iterator of [`child_ranges`]; its `nth` jumps, so that `skip` costs nothing.
struct ChildRanges<'c> {
    children: &'c [Child],
    next: usize,
    lo: u64,
    hi: u64,
}

impl Iterator for ChildRanges<'_> {
    type Item = (u64, u64, u64);

    fn next(&mut self) -> Option<Self::Item> {
        let i = self.next;
        let &(key, child) = self.children.get(i)?;
        self.next += 1;
        let clo = if i == 0 { self.lo } else { key };
        let chi = self.children.get(i + 1).map_or(self.hi, |&(k, _)| k);
        Some((clo, chi, child))
    }

    fn nth(&mut self, n: usize) -> Option<Self::Item> {
        self.next = self.next.saturating_add(n);
        self.next()
    }
}

struct Writer<'t, 'a> {
    tree: &'t Tree<'a>,
    generation: u64,
    alloc: &'t mut dyn FnMut() -> Result<u64>,
    out: &'t mut Updated,
    extents_delta: i64,
    leaves_left: usize,
}

impl Writer<'_, '_> {
    /// The pages that replace the subtree at `offset` (none when it is left empty).
    fn rebuild(
        &mut self,
        offset: u64,
        level: u8,
        lo: u64,
        hi: u64,
        updates: &[Extent],
    ) -> Result<Vec<Child>> {
        if level == 0 {
            return self.rebuild_leaf(Some(offset), lo, hi, updates);
        }
        let body = self.tree.page(offset, level, lo, hi)?;
        let PageBody::Internal(children) = &*body else {
            unreachable!("decode_page checks the level");
        };
        let mut new_children = Vec::with_capacity(children.len() + 1);
        let mut changed = false;
        for (clo, chi, child) in child_ranges(children, lo, hi) {
            let out_of_budget = self.leaves_left == 0;
            let mine = if out_of_budget {
                Vec::new()
            } else {
                clip_updates(updates, clo, chi)
            };
            if mine.is_empty() {
                if out_of_budget && self.out.applied_below.is_none() {
                    self.out.applied_below = Some(clo);
                }
                new_children.push((clo, child));
                continue;
            }
            changed = true;
            new_children.extend(self.rebuild(child, level - 1, clo, chi, &mine)?);
        }
        if !changed {
            return Ok(vec![(lo, offset)]);
        }
        self.out.replaced_pages.push(offset);
        if new_children.is_empty() {
            return Ok(Vec::new());
        }
        new_children[0].0 = lo;
        self.write_internal(level, lo, hi, new_children)
    }

    fn rebuild_leaf(
        &mut self,
        offset: Option<u64>,
        lo: u64,
        hi: u64,
        updates: &[Extent],
    ) -> Result<Vec<Child>> {
        let body = match offset {
            Some(offset) => Some(self.tree.page(offset, 0, lo, hi)?),
            None => None,
        };
        let old: &[Extent] = match body.as_deref() {
            Some(PageBody::Leaf(extents)) => extents,
            Some(PageBody::Internal(_)) => unreachable!("decode_page checks the level"),
            None => &[],
        };
        self.out.replaced_pages.extend(offset);
        self.leaves_left = self.leaves_left.saturating_sub(1);
        let old_count = old.len();
        let merged = overlay_sorted(old, updates);
        let extents: Vec<Extent> = merged
            .into_iter()
            .flat_map(Extent::split_for_disk)
            .collect();
        self.extents_delta += extents.len() as i64 - old_count as i64;
        if extents.is_empty() {
            return Ok(Vec::new());
        }
        let mut pages = Vec::new();
        for (i, chunk) in chunks(&extents).enumerate() {
            let clo = if i == 0 { lo } else { chunk[0].start };
            pages.push((clo, PageBody::Leaf(chunk.to_vec())));
        }
        self.write_pages(0, hi, pages)
    }

    fn write_internal(
        &mut self,
        level: u8,
        lo: u64,
        hi: u64,
        children: Vec<Child>,
    ) -> Result<Vec<Child>> {
        let mut pages = Vec::new();
        for (i, chunk) in chunks(&children).enumerate() {
            let clo = if i == 0 { lo } else { chunk[0].0 };
            pages.push((clo, PageBody::Internal(chunk.to_vec())));
        }
        self.write_pages(level, hi, pages)
    }

    /// Writes sibling pages, each covering from its key to the next one's (the last to `hi`).
    /// Pages given consecutive blocks go down in one write: a tree flush writes hundreds.
    fn write_pages(
        &mut self,
        level: u8,
        hi: u64,
        pages: Vec<(u64, PageBody)>,
    ) -> Result<Vec<Child>> {
        let mut out = Vec::with_capacity(pages.len());
        let mut run: Vec<u8> = Vec::new();
        let mut run_at = 0;
        let keys: Vec<u64> = pages.iter().map(|(k, _)| *k).collect();
        for (i, (lo, body)) in pages.into_iter().enumerate() {
            let page_hi = keys.get(i + 1).copied().unwrap_or(hi);
            let offset = (self.alloc)()?;
            if !run.is_empty() && run_at + run.len() as u64 != offset {
                self.write_run(&run, run_at)?;
                run.clear();
            }
            if run.is_empty() {
                run_at = offset;
            }
            run.extend_from_slice(&encode_page(
                self.tree.image_id,
                self.generation,
                level,
                &body,
            ));
            self.tree.cache.insert(
                (self.tree.cache_key, offset),
                Cached::Page {
                    body: Arc::new(body),
                    level,
                    lo,
                    hi: page_hi,
                },
            );
            self.out.written_pages.push(offset);
            out.push((lo, offset));
        }
        if !run.is_empty() {
            self.write_run(&run, run_at)?;
        }
        Ok(out)
    }

    fn write_run(&self, bytes: &[u8], offset: u64) -> Result<()> {
        self.tree
            .storage
            .write_at(bytes, offset)
            .map_err(|e| Error::Io {
                path: self.tree.path.into(),
                op: "writing a map page",
                offset,
                source: e,
            })
    }
}

/// Pages are filled to three quarters when a list is split, so that the next few inserts do
/// not split them again.
fn chunks<T>(items: &[T]) -> std::slice::Chunks<'_, T> {
    if items.len() <= PAGE_CAPACITY {
        return items.chunks(PAGE_CAPACITY);
    }
    let pages = items.len().div_ceil(PAGE_CAPACITY * 3 / 4);
    items.chunks(items.len().div_ceil(pages))
}

/// The parts of sorted `updates` inside `[lo, hi)`.
fn clip_updates(updates: &[Extent], lo: u64, hi: u64) -> Vec<Extent> {
    let first = updates.partition_point(|e| e.end() <= lo);
    updates[first..]
        .iter()
        .take_while(|e| e.start < hi)
        .map(|e| {
            let from = e.start.max(lo);
            let to = e.end().min(hi);
            Extent {
                start: from,
                len: to - from,
                mapping: e.mapping.advanced(from - e.start),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::v2::Mapping;

    fn leaf(n: usize) -> PageBody {
        PageBody::Leaf(
            (0..n as u64)
                .map(|i| Extent {
                    start: 2 * i,
                    len: 1,
                    mapping: Mapping::Data(100 + i),
                })
                .collect(),
        )
    }

    /// Every block's mapping in `[0, end)` (unmapped where the tree has nothing).
    fn mappings(tree: &Tree, end: u64) -> Vec<Mapping> {
        let mut out = vec![Mapping::Unmapped; end as usize];
        tree.lookup(0, end, &mut |e| {
            for i in 0..e.len {
                out[(e.start + i) as usize] = e.mapping.advanced(i);
            }
        })
        .expect("lookup");
        out
    }

    /// Pages for a test tree: storage and cache, and an allocator handing out blocks in
    /// order.
    struct TestPages {
        storage: crate::storage::MemStorage,
        cache: PageCache,
        next_page: std::cell::Cell<u64>,
    }

    impl TestPages {
        fn new() -> TestPages {
            TestPages {
                storage: crate::storage::MemStorage::new(vec![0; 2 * BLOCK as usize]),
                cache: PageCache::new(4 << 20),
                next_page: std::cell::Cell::new(2),
            }
        }

        fn alloc(&self) -> impl FnMut() -> Result<u64> + '_ {
            || {
                self.next_page.set(self.next_page.get() + 1);
                Ok(self.next_page.get() * BLOCK)
            }
        }

        /// An empty tree over `blocks` blocks.
        fn tree(&self, name: &'static str, blocks: u64) -> Tree<'_> {
            Tree {
                storage: &self.storage,
                cache: &self.cache,
                path: Path::new(name),
                root: TreeRoot::default(),
                image_id: 7,
                cache_key: new_cache_key(),
                generation: 1,
                virtual_blocks: blocks,
            }
        }
    }

    #[test]
    fn an_update_with_a_leaf_budget_applies_what_lies_below_where_it_stopped_and_nothing_above() {
        let pages = TestPages::new();
        let mut alloc = pages.alloc();
        let blocks = 8000u64;
        let mut tree = pages.tree("budget.cow", blocks);
        // Every other block mapped, so that no two extents join: many leaves.
        let mut base = ExtentMap::default();
        for b in (0..blocks).step_by(2) {
            base.set(b, 1, Mapping::Data(10_000 + b));
        }
        tree.root = tree.update(&base, 1, &mut alloc).expect("building").root;
        let before = mappings(&tree, blocks);
        // A change in every 400 blocks: one per leaf or so, in many leaves.
        let mut changes = ExtentMap::default();
        for b in (1..blocks).step_by(400) {
            changes.set(b, 2, Mapping::Zero);
        }
        let updated = tree
            .update_leaves(&changes, 3, 2, &mut alloc)
            .expect("updating");
        let stop = updated.applied_below.expect("the budget ran out");
        let mut want = before.clone();
        for e in changes.iter().filter(|e| e.start < stop) {
            for i in 0..e.len {
                want[(e.start + i) as usize] = Mapping::Zero;
            }
        }
        let after = Tree {
            root: updated.root,
            generation: 2,
            ..tree
        };
        let got = mappings(&after, blocks);
        let mut leaves_written = 0;
        after
            .walk(
                &mut |page, level| {
                    if level == 0 && updated.written_pages.contains(&page) {
                        leaves_written += 1;
                    }
                },
                &mut |_| {},
            )
            .expect("walking");
        // A rewritten leaf may split in two.
        assert!(leaves_written <= 6, "{leaves_written} leaves written");
        assert!(leaves_written >= 3, "{leaves_written} leaves written");
        // Below the stop, every change; at and above it, the old tree (a change straddling
        // it may be in part applied: it is applied again with what is carried).
        assert_eq!(got[..stop as usize], want[..stop as usize]);
        let straddler_end = changes
            .iter()
            .find(|e| e.start < stop && e.end() > stop)
            .map_or(stop, |e| e.end());
        assert_eq!(
            got[straddler_end as usize..],
            before[straddler_end as usize..]
        );
        assert!(stop > 0 && stop < blocks, "stopped at {stop}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        #[test]
        fn a_walk_for_many_ranges_finds_what_a_lookup_of_each_finds(
            cuts in proptest::collection::btree_set(0u64..6100, 0..80),
            keep in proptest::collection::vec(proptest::bool::ANY, 80),
        ) {
            let pages = TestPages::new();
            let mut alloc = pages.alloc();
            let blocks = 6000u64;
            let mut tree = pages.tree("ranges.cow", blocks);
            // Every third block mapped alone, and a long extent in the middle: many
            // leaves, and an extent that ranges cut.
            let mut base = ExtentMap::default();
            for b in (0..blocks).step_by(3) {
                base.set(b, 1, Mapping::Data(10_000 + b));
            }
            base.set(2500, 700, Mapping::Data(50_000));
            tree.root = tree.update(&base, 1, &mut alloc).expect("building").root;
            proptest::prop_assert!(tree.root.height >= 2);
            // Sorted, disjoint ranges between consecutive cuts, some left out; some reach
            // past the mapped blocks.
            let cuts: Vec<u64> = cuts.into_iter().collect();
            let ranges: Vec<(u64, u64)> = cuts
                .windows(2)
                .zip(&keep)
                .filter(|(_, &k)| k)
                .map(|(w, _)| (w[0], w[1]))
                .collect();
            let mut got = Vec::new();
            tree.lookup_ranges(&ranges, &mut |e| got.push(e)).expect("walking");
            let want: Vec<Extent> = ranges
                .iter()
                .flat_map(|&(s, e)| base.overlapping(s, e))
                .collect();
            proptest::prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn the_cache_holds_no_more_than_its_budget_and_keeps_what_is_used_again() {
        for budget in [64 << 10, 4 << 20] {
            let cache = PageCache::new(budget);
            let put = |offset: u64| {
                cache.insert(
                    (1, offset),
                    Cached::Page {
                        body: Arc::new(leaf(254)),
                        level: 0,
                        lo: 0,
                        hi: 1 << 40,
                    },
                )
            };
            put(8192);
            for i in 0..2000u64 {
                put(16384 + i * 4096);
                // Page 8192 is used all the time, so it always gets its second chance.
                assert!(
                    cache.get_page((1, 8192), 0, 0, 1 << 40).is_some(),
                    "round {i}"
                );
                assert!(cache.held_bytes() <= budget as usize, "{budget}: round {i}");
            }
            let (pages, _, _) = cache.stats();
            assert!(pages > 1 && pages < 2000, "{budget}: {pages} pages held");
            // Consecutive page offsets of one image spread over every shard.
            let empty = cache
                .shards
                .iter()
                .filter(|s| read_lock(s).pages.is_empty());
            assert_eq!(empty.count(), 0, "{budget}: shards left empty");
            // A page reached with another range than it was checked for is not served.
            assert!(cache.get_page((1, 8192), 0, 0, 1 << 20).is_none());
            assert!(cache.get_page((1, 8192), 1, 0, 1 << 40).is_none());
            // A region and a page of one image never stand for each other.
            let piece = ChainPiece {
                start: 0,
                end: 1,
                source: super::super::merged::ChainSource::Zero,
            };
            cache.insert_region(1, 2, Arc::from(vec![piece]));
            assert!(cache.get_region(1, 2).is_some_and(|p| p[0] == piece));
            assert!(cache.get_region(1, 3).is_none());
            assert!(cache.get_page(region_key(1, 2), 0, 0, 1 << 40).is_none());
            // Forgetting a page and the whole image leaves nothing of it.
            cache.forget(1, 8192);
            assert!(cache.get_page((1, 8192), 0, 0, 1 << 40).is_none());
            cache.forget_image(1);
            assert_eq!((cache.stats().0, cache.held_bytes()), (0, 0));
        }
    }
}
