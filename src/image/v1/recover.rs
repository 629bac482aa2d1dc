//! Going back to the durable state after a failed flush ("reopen in place").
//!
//! When a flush fails (its fdatasync, or a write of its journal record or checkpoint), the
//! writes since the last completed flush may or may not be on the disk, and the kernel may
//! already have dropped the failed pages' errors: a second fdatasync can succeed without
//! them (the "fsyncgate" behaviour of Linux). Retrying would report success for data that
//! was lost. So the image forgets its cached view of the file, loads its durable state
//! from the disk as an open does, and carries on from there: the failed flush returns the
//! error, and [`ImageV1::reverts`] tells each client whose writes were undone. Nothing a
//! completed flush made durable is touched: the journal and checkpoint it points at are
//! only ever written beside it.
use super::free_clusters::FreeClusters;
use super::{exclusive, load, lock, ImageV1, State};
use crate::error::Error;
use std::sync::atomic::Ordering;

impl ImageV1 {
    /// How many times this image went back to its durable state after a failed flush.
    /// A client that wrote since its last flush, and sees this change before its next
    /// flush, lost those writes and must be told so.
    pub fn reverts(&self) -> u64 {
        self.reverts.load(Ordering::Acquire)
    }

    /// Continues the count of an image this one replaces (a snapshot's new top), so that
    /// writes lost in the old one are still reported.
    pub fn continue_reverts_of(&self, earlier: u64) {
        self.reverts.fetch_max(earlier, Ordering::AcqRel);
    }

    /// Called by a flush that failed with `cause`, holding `flush_serial`; returns the
    /// error to report.
    pub(super) fn revert_to_durable(&self, cause: Error) -> Error {
        // No write may be between its plan and its map update while the state is replaced.
        let _pause = exclusive(&self.gate);
        let mut st = lock(&self.state);
        // Pages whose writeback failed may still be in the page cache, looking written.
        self.storage.wont_need(0, 0);
        let loaded = match load(self.storage.as_ref(), &self.path) {
            Ok(loaded) => loaded,
            Err(reload) => {
                drop(st);
                self.failed.store(true, Ordering::Release);
                self.wake_waiting_writers();
                return Error::Invalid {
                    path: self.path.clone(),
                    reason: format!(
                        "{cause}; going back to the last durable state failed too ({reload}): the image refuses changes until it is reopened"
                    ),
                };
            }
        };
        let free = FreeClusters::from_used(self.geometry.first_data_cluster(), &loaded.used);
        let old = std::mem::replace(&mut *st, State::from_loaded(loaded, free));
        // Threads waiting on `committed` keep waiting correctly: writers waiting for a
        // commit see the count move and plan again against the new map; flushes queued
        // behind this one find their snapshot unpublished and take their own.
        st.commits = old.commits + 1;
        st.snapshots_taken = old.snapshots_taken;
        st.snapshots_published = old.snapshots_published;
        st.waiters = old.waiters;
        self.reverts.fetch_add(1, Ordering::AcqRel);
        self.committed.notify_all();
        Error::Reverted {
            path: self.path.clone(),
            source: Box::new(cause),
        }
    }
}
