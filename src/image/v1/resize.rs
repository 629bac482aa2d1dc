//! Changes to the whole image: resize, clear, and a new backing file in the header.

use super::{lock, shared, ImageV1};
use crate::error::{Error, Result};
use crate::format::{Header, MapItem};
use crate::image::Layer;
use std::sync::Arc;

impl ImageV1 {
    /// Empties the map: every unit falls through to the backing file again. Durable after
    /// the flush this ends with.
    pub fn clear(&self) -> Result<()> {
        self.check_writable()?;
        {
            let _io = shared(&self.gate);
            let mut guard = lock(&self.state);
            let st = &mut *guard;
            st.zero_runs.clear();
            let count = self.geometry.clusters_for(self.virtual_size);
            if count > 0 {
                st.dirty_runs
                    .push(MapItem::FallThroughRun { start: 0, count });
            }
            for (&vc, e) in st.map.iter_mut() {
                if e.mark_dirty() {
                    st.dirty.push(vc);
                }
                e.units = [0, 0];
                e.zero = 0;
            }
        }
        self.flush()
    }

    /// Changes the virtual size. Growing makes the new range read as zeros, even where the
    /// backing file is longer than the old size (as qemu-img resize does); shrinking drops
    /// everything past the new end, so that growing again later reads zeros there too.
    ///
    /// Crash safety (FORMAT.md, "Resize"): the map changes stay in memory until one
    /// checkpoint publishes them together with the new size in one header-slot write. A
    /// crash before that write is durable leaves the old size with all its data; after it,
    /// the new size.
    pub fn resize(&mut self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        if new_size > crate::format::MAX_VIRTUAL_SIZE {
            return Err(Error::Invalid {
                path: self.path.clone(),
                reason: format!(
                    "new size {new_size} is larger than the largest virtual size (2^60 bytes)"
                ),
            });
        }
        let old_size = self.virtual_size;
        // Every earlier write goes out in a flush of its own, so that a failure below
        // cannot take it down with the resize.
        self.flush()?;
        let changed = if new_size < old_size {
            self.drop_past(new_size, old_size)
        } else {
            self.zero_grown_range(old_size, new_size)
        };
        let result = changed.and_then(|()| {
            lock(&self.state).pending_resize = Some(new_size);
            self.flush()
        });
        match result {
            Ok(()) => {
                self.virtual_size = new_size;
                Ok(())
            }
            Err(e) => {
                // A failed flush puts the image back to its durable state, whose header
                // says which size won.
                let mut st = lock(&self.state);
                st.pending_resize = None;
                self.virtual_size = st.header.virtual_size;
                drop(st);
                let _ = old_size;
                Err(e)
            }
        }
    }

    /// Shrinking: the tail of the last cluster that stays is zeroed, and every cluster
    /// wholly past `new_size` loses its entry and its zero runs. Bytes past the end are
    /// never visible, but they would be again after a later grow.
    fn drop_past(&self, new_size: u64, old_size: u64) -> Result<()> {
        let g = self.geometry;
        let cluster_end = new_size.next_multiple_of(g.cluster_size()).min(old_size);
        if cluster_end > new_size {
            self.write_zeroes(new_size, cluster_end - new_size)?;
        }
        let first_gone = g.clusters_for(new_size);
        let clusters = g.clusters_for(old_size);
        let _io = shared(&self.gate);
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        if clusters > first_gone {
            st.zero_runs.remove(first_gone, clusters);
            st.dirty_runs.push(MapItem::FallThroughRun {
                start: first_gone,
                count: clusters - first_gone,
            });
        }
        for (&vc, e) in st.map.range_mut(first_gone..) {
            if e.mark_dirty() {
                st.dirty.push(vc);
            }
            e.units = [0, 0];
            e.zero = 0;
        }
        Ok(())
    }

    /// Growing: what the backing file holds past the old end stays hidden, as the grown
    /// range must read as zeros. The size is raised first so that the zeroing is in range.
    fn zero_grown_range(&mut self, old_size: u64, new_size: u64) -> Result<()> {
        let backing_end = self.backing.as_ref().map_or(0, |b| b.size()).min(new_size);
        if backing_end <= old_size {
            return Ok(());
        }
        self.virtual_size = new_size;
        self.write_zeroes(old_size, backing_end - old_size)
    }

    /// Rewrites the header with a new backing file (no data is copied; see
    /// [`ops::rebase`](crate::image::ops::rebase) for the safe form). The new layer must
    /// already be open.
    pub fn set_backing(&mut self, backing: Option<(String, Layer)>) -> Result<()> {
        self.check_writable()?;
        self.flush()?;
        let (record, layer) = match backing {
            Some((path, layer)) => (Some((path, layer.format())), Some(layer)),
            None => (None, None),
        };
        let mut st = lock(&self.state);
        let header = Header {
            generation: st.header.generation + 1,
            backing: record,
            ..st.header.clone()
        };
        let slot = 1 - st.active_slot;
        self.write_header_slot(&header, slot)?;
        st.header = header;
        st.active_slot = slot;
        drop(st);
        self.backing = layer.map(Arc::new);
        Ok(())
    }
}
