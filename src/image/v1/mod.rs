//! Format version 1 (`format-spec/FORMAT.md`): the extent map, copy-on-write, allocation
//! and the flush protocol.
//!
//! Every virtual cluster that differs from the backing file has an entry (`Entry`) with two
//! host-cluster *slots*, A and B. Each sub-cluster unit lives at its natural offset in one
//! of the two slots, reads as zeros, or falls through to the backing file. A unit whose slot
//! is referenced by the durable state (the last completed flush) is never overwritten: the
//! write goes to the other slot, and the flush that publishes the change frees the old one.
//! That is what lets a power failure fall back to exactly the last flushed state
//! (`format-spec/FORMAT.md`, "Crash safety").
//!
//! Concurrency: `gate` is held shared by every read and write for its whole duration and
//! exclusively by a flush while it takes its snapshot and while it publishes the result, so
//! no I/O straddles either moment. `state` guards the map and the allocator and is held only
//! for bookkeeping, never across data I/O.
//!
//! The files, by responsibility:
//! - `mod.rs`: [`ImageV1`], its state and small accessors;
//! - `entry.rs`, `cluster_runs.rs`: the in-memory map (one entry per mapped cluster, and
//!   runs of whole zero clusters); `map.rs`: looking it up (runs of a range, block status,
//!   stats);
//! - `free_clusters.rs`: the allocator of host clusters;
//! - `read.rs`; `write.rs`: the write path (planning units, redirect-on-write, waiting for
//!   pinned or busy units); `zero.rs`: write zeroes and discard;
//! - `flush.rs`: the flush protocol (snapshot, persist, publish); `journal.rs`: its journal
//!   records and the seal; `checkpoint.rs`: its checkpoint path and the header slots;
//! - `resize.rs`: resize, clear and a new backing file;
//! - `open.rs`: create and open; `load.rs`: loading the durable state, step by step (header
//!   choice, the regions, checkpoint, ownership); `replay.rs`: its journal replay and the
//!   check of the last record;
//! - `recover.rs`: going back to the durable state after a failed flush.

mod checkpoint;
mod cluster_runs;
mod entry;
mod flush;
mod free_clusters;
mod journal;
mod load;
mod map;
mod open;
mod read;
mod recover;
mod replay;
mod resize;
#[cfg(test)]
mod tests;
mod write;
mod zero;

pub(in crate::image) use checkpoint::journal_capacity_for;
pub(crate) use load::load;

use super::{FileId, Layer};
use crate::error::{Error, Result};
use crate::format::{Geometry, Header, MapItem};
use crate::storage::Storage;
use cluster_runs::ClusterRuns;
use entry::Entry;
use free_clusters::FreeClusters;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

struct State {
    header: Header,
    active_slot: usize,
    map: BTreeMap<u64, Entry>,
    dirty: Vec<u64>,
    /// Clusters without an entry that read as zeros entirely: discards of whole clusters
    /// over a backing file cost one run, however large.
    zero_runs: ClusterRuns,
    /// Run changes since the last snapshot, in order; a record lists them before entries.
    dirty_runs: Vec<MapItem>,
    free: FreeClusters,
    journal_tail: u64,
    journal_next_seq: u64,
    /// Completed flushes, for writers waiting on a pinned unit.
    commits: u64,
    /// The last journal record published data that no later barrier has confirmed.
    last_record_has_data: bool,
    /// Snapshots taken and published, numbered from 1; flushes serialize, so a published
    /// number covers every snapshot taken up to it.
    snapshots_taken: u64,
    snapshots_published: u64,
    /// Threads waiting on `committed`.
    waiters: u32,
    /// A resize waiting for its flush: the next snapshot takes the checkpoint path, and
    /// the new header carries this virtual size (see [`ImageV1::resize`]).
    pending_resize: Option<u64>,
    /// The journal's blocks are reserved in the file, so appending a record cannot fail
    /// with ENOSPC (which would send the image back to its durable state and lose the
    /// writes since). Reserved at the first record after an open, a checkpoint or a
    /// revert, while there is space.
    journal_reserved: bool,
}

impl State {
    fn journal_position(&self) -> u64 {
        self.header.journal_offset + self.journal_tail
    }
}

pub struct ImageV1 {
    pub(in crate::image) path: PathBuf,
    storage: Arc<dyn Storage>,
    read_only: bool,
    geometry: Geometry,
    virtual_size: u64,
    /// Shared with other images when opened through a
    /// [`LayerRegistry`](crate::image::LayerRegistry).
    pub(in crate::image) backing: Option<Arc<Layer>>,
    /// Keeps the lock on the file for as long as the image is open.
    pub(in crate::image) _lock_file: Option<std::fs::File>,
    /// The identity of the image's file (None for other storage), to refuse chains that
    /// loop back to it.
    pub(in crate::image) identity: Option<FileId>,
    gate: RwLock<()>,
    state: Mutex<State>,
    committed: Condvar,
    flush_serial: Mutex<()>,
    /// Set only when the image could not go back to its durable state after a failed
    /// flush (see `recover.rs`): nothing is known about it then, so it refuses changes.
    failed: AtomicBool,
    /// Times the image went back to its durable state after a failed flush, so that each
    /// client with writes since its last flush can be told they were lost.
    reverts: AtomicU64,
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

impl ImageV1 {
    /// The image's file, as it was opened.
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }
    pub fn cluster_size(&self) -> u64 {
        self.geometry.cluster_size()
    }
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }
    /// The backing file, if any.
    pub fn backing(&self) -> Option<&Layer> {
        self.backing.as_deref()
    }
    /// The current header (a copy).
    pub fn header(&self) -> Header {
        lock(&self.state).header.clone()
    }
    /// The identity (device and inode) of the image's file, when it is a file.
    pub fn identity(&self) -> Option<FileId> {
        self.identity
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    pub(in crate::image) fn io_err(
        &self,
        op: &'static str,
        offset: u64,
        source: std::io::Error,
    ) -> Error {
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

    fn host_offset(&self, host_cluster: u64, unit: u32) -> u64 {
        (host_cluster << self.geometry.cluster_bits) + ((unit as u64) << self.geometry.unit_bits)
    }
}

impl Drop for ImageV1 {
    /// Closing flushes, as qemu does: a dropped image is not a crash. Errors cannot be
    /// reported here; callers that care call [`ImageV1::flush`] first.
    fn drop(&mut self) {
        if !self.read_only && !self.failed.load(Ordering::Acquire) && self.flush().is_ok() {
            let _ = self.seal();
        }
    }
}

/// The indices of the set bits.
fn bits(mut m: u64) -> impl Iterator<Item = u32> {
    std::iter::from_fn(move || {
        (m != 0).then(|| {
            let b = m.trailing_zeros();
            m &= m - 1;
            b
        })
    })
}

/// Sorts ranges and merges the touching ones.
fn coalesce(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (s, l) in ranges {
        match out.last_mut() {
            Some((ls, ll)) if *ls + *ll == s => *ll += l,
            _ => out.push((s, l)),
        }
    }
    out
}
