//! The map tree (FORMAT-v2.md, "Map pages"): lookups through a bounded page cache, and the
//! copy-on-write update that a tree flush writes.
use super::extents::ExtentMap;
use crate::error::{Error, Result};
use crate::format::v2::{
    decode_page, encode_page, Extent, Mapping, PageBody, PageContext, BLOCK, MAX_HEIGHT,
    PAGE_CAPACITY, VIRTUAL_BLOCK_LIMIT,
};
use crate::storage::Storage;
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Where the tree is: what the current header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TreeRoot {
    /// Byte offset of the root page; 0 with height 0 for an empty tree.
    pub root: u64,
    pub height: u8,
    pub extents: u64,
}

struct Cached {
    body: Arc<PageBody>,
    level: u8,
    lo: u64,
    hi: u64,
}

/// Decoded pages by byte offset, at most `budget` bytes of them as they are held in memory
/// (a decoded page costs what its items take, not 4 KiB), evicted in the order they were
/// loaded (a page used again is moved to the back). Pages never change once written, so
/// the cache is never written back; a page is inserted when it is written, so an offset
/// reused for a new page never serves the old one.
pub struct PageCache {
    budget: usize,
    inner: Mutex<CacheInner>,
}

#[derive(Default)]
struct CacheInner {
    pages: HashMap<Key, (Cached, u64)>,
    order: VecDeque<(Key, u64)>,
    bytes: usize,
    clock: u64,
    hits: u64,
    misses: u64,
}

impl std::fmt::Debug for PageCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (pages, hits, misses) = self.stats();
        f.debug_struct("PageCache")
            .field("budget", &self.budget)
            .field("pages", &pages)
            .field("hits", &hits)
            .field("misses", &misses)
            .finish()
    }
}

impl PageCache {
    pub fn new(bytes: u64) -> PageCache {
        PageCache {
            budget: (bytes as usize).max(16 * BLOCK as usize),
            inner: Mutex::new(CacheInner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, key: Key, level: u8, lo: u64, hi: u64) -> Option<Arc<PageBody>> {
        let mut g = self.lock();
        g.clock += 1;
        let clock = g.clock;
        let hit = match g.pages.get_mut(&key) {
            // A page reached with another range than it was checked for is checked again.
            Some((c, stamp)) if c.level == level && c.lo == lo && c.hi == hi => {
                *stamp = clock;
                Some(c.body.clone())
            }
            _ => None,
        };
        if hit.is_some() {
            g.hits += 1;
            g.order.push_back((key, clock));
        } else {
            g.misses += 1;
        }
        // Stamps of pages used again leave stale entries in `order`; keep it bounded.
        if g.order.len() > 4 * g.pages.len().max(16) {
            let pages = std::mem::take(&mut g.pages);
            g.order = pages.iter().map(|(&o, &(_, s))| (o, s)).collect();
            g.order.make_contiguous().sort_by_key(|&(_, s)| s);
            g.pages = pages;
        }
        hit
    }

    fn insert(&self, key: Key, cached: Cached) {
        let mut g = self.lock();
        g.clock += 1;
        let clock = g.clock;
        g.bytes += cost(&cached.body);
        if let Some((old, _)) = g.pages.insert(key, (cached, clock)) {
            g.bytes -= cost(&old.body);
        }
        g.order.push_back((key, clock));
        while g.bytes > self.budget {
            let Some((o, s)) = g.order.pop_front() else {
                break;
            };
            if g.pages.get(&o).is_some_and(|&(_, stamp)| stamp == s) {
                if let Some((old, _)) = g.pages.remove(&o) {
                    g.bytes -= cost(&old.body);
                }
            }
        }
    }

    pub fn forget(&self, image_id: u64, offset: u64) {
        let mut g = self.lock();
        if let Some((old, _)) = g.pages.remove(&(image_id, offset)) {
            g.bytes -= cost(&old.body);
        }
    }

    /// Forgets every page of one image (it went back to its durable state).
    pub fn forget_image(&self, image_id: u64) {
        let mut g = self.lock();
        let mut freed = 0;
        g.pages.retain(|&(id, _), (c, _)| {
            let keep = id != image_id;
            if !keep {
                freed += cost(&c.body);
            }
            keep
        });
        g.bytes -= freed;
    }

    /// `(pages held, hits, misses)`.
    pub fn stats(&self) -> (usize, u64, u64) {
        let g = self.lock();
        (g.pages.len(), g.hits, g.misses)
    }
}

/// Pages are known by the image they belong to (its random `image_id`) and their offset,
/// so that one cache serves every image of a server.
type Key = (u64, u64);

/// What a decoded page holds in memory: its items, the map slot and the bookkeeping.
fn cost(body: &PageBody) -> usize {
    const ENTRY: usize = 96;
    ENTRY
        + match body {
            PageBody::Leaf(e) => e.capacity() * std::mem::size_of::<Extent>(),
            PageBody::Internal(c) => c.capacity() * std::mem::size_of::<Child>(),
        }
}

/// The tree of one image as of one header, and what reading it needs.
pub struct Tree<'a> {
    pub storage: &'a dyn Storage,
    pub cache: &'a PageCache,
    pub path: &'a Path,
    pub root: TreeRoot,
    pub image_id: u64,
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
}

/// A child reference while a page is rebuilt: the first block of its range and its offset.
type Child = (u64, u64);

impl Tree<'_> {
    fn page(&self, offset: u64, level: u8, lo: u64, hi: u64) -> Result<Arc<PageBody>> {
        if let Some(body) = self.cache.get((self.image_id, offset), level, lo, hi) {
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
            (self.image_id, offset),
            Cached {
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
        if self.root.height == 0 || start >= end {
            return Ok(());
        }
        self.lookup_in(
            self.root.root,
            self.root.height - 1,
            0,
            VIRTUAL_BLOCK_LIMIT,
            start,
            end,
            f,
        )
    }

    #[allow(clippy::too_many_arguments)] // one recursion step: the page and the query
    fn lookup_in(
        &self,
        offset: u64,
        level: u8,
        lo: u64,
        hi: u64,
        start: u64,
        end: u64,
        f: &mut dyn FnMut(Extent),
    ) -> Result<()> {
        match &*self.page(offset, level, lo, hi)? {
            PageBody::Leaf(extents) => {
                let first = extents.partition_point(|e| e.end() <= start);
                for e in &extents[first..] {
                    if e.start >= end {
                        break;
                    }
                    let from = e.start.max(start);
                    let to = e.end().min(end);
                    f(Extent {
                        start: from,
                        len: to - from,
                        mapping: e.mapping.advanced(from - e.start),
                    });
                }
                Ok(())
            }
            PageBody::Internal(children) => {
                for (i, (child_lo, child_hi, child)) in child_ranges(children, lo, hi).enumerate() {
                    if child_hi <= start {
                        continue;
                    }
                    if child_lo >= end {
                        break;
                    }
                    let _ = i;
                    self.lookup_in(child, level - 1, child_lo, child_hi, start, end, f)?;
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
        let updates: Vec<Extent> = updates.iter().collect();
        let mut out = Updated {
            root: self.root,
            replaced_pages: Vec::new(),
            written_pages: Vec::new(),
        };
        let mut w = Writer {
            tree: self,
            generation: new_generation,
            alloc,
            out: &mut out,
            extents_delta: 0,
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
fn child_ranges(
    children: &[Child],
    lo: u64,
    hi: u64,
) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
    children.iter().enumerate().map(move |(i, &(key, child))| {
        let clo = if i == 0 { lo } else { key };
        let chi = children.get(i + 1).map_or(hi, |&(k, _)| k);
        (clo, chi, child)
    })
}

struct Writer<'t, 'a> {
    tree: &'t Tree<'a>,
    generation: u64,
    alloc: &'t mut dyn FnMut() -> Result<u64>,
    out: &'t mut Updated,
    extents_delta: i64,
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
            let mine = clip_updates(updates, clo, chi);
            if mine.is_empty() {
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
        let mut map = ExtentMap::default();
        let mut old_count = 0;
        if let Some(offset) = offset {
            let body = self.tree.page(offset, 0, lo, hi)?;
            let PageBody::Leaf(extents) = &*body else {
                unreachable!("decode_page checks the level");
            };
            old_count = extents.len();
            for e in extents {
                map.set(e.start, e.len, e.mapping);
            }
            self.out.replaced_pages.push(offset);
        }
        for u in updates {
            match u.mapping {
                Mapping::Unmapped => {
                    map.remove(u.start, u.end());
                }
                m => {
                    map.set(u.start, u.len, m);
                }
            }
        }
        let extents: Vec<Extent> = map.iter().flat_map(Extent::split_for_disk).collect();
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
    fn write_pages(
        &mut self,
        level: u8,
        hi: u64,
        pages: Vec<(u64, PageBody)>,
    ) -> Result<Vec<Child>> {
        let mut out = Vec::with_capacity(pages.len());
        let keys: Vec<u64> = pages.iter().map(|(k, _)| *k).collect();
        for (i, (lo, body)) in pages.into_iter().enumerate() {
            let page_hi = keys.get(i + 1).copied().unwrap_or(hi);
            let offset = (self.alloc)()?;
            let bytes = encode_page(self.tree.image_id, self.generation, level, &body);
            self.tree
                .storage
                .write_at(&bytes, offset)
                .map_err(|e| Error::Io {
                    path: self.tree.path.into(),
                    op: "writing a map page",
                    offset,
                    source: e,
                })?;
            self.tree.cache.insert(
                (self.tree.image_id, offset),
                Cached {
                    body: Arc::new(body),
                    level,
                    lo,
                    hi: page_hi,
                },
            );
            self.out.written_pages.push(offset);
            out.push((lo, offset));
        }
        Ok(out)
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

    #[test]
    fn the_cache_holds_no_more_than_its_budget_and_keeps_what_is_used_again() {
        let cache = PageCache::new(64 << 10);
        let put = |offset: u64| {
            cache.insert(
                (1, offset),
                Cached {
                    body: Arc::new(leaf(254)),
                    level: 0,
                    lo: 0,
                    hi: 1 << 40,
                },
            )
        };
        put(8192);
        for i in 0..100u64 {
            put(16384 + i * 4096);
            // Page 8192 is used all the time, so it is never the oldest.
            assert!(cache.get((1, 8192), 0, 0, 1 << 40).is_some(), "round {i}");
            let g = cache.lock();
            assert!(g.bytes <= cache.budget, "{} bytes held", g.bytes);
        }
        // A page reached with another range than it was checked for is not served.
        assert!(cache.get((1, 8192), 0, 0, 1 << 20).is_none());
        assert!(cache.get((1, 8192), 1, 0, 1 << 40).is_none());
    }
}
