//! Layers shared by several images: a server that exports many overlays of one base opens
//! the base once, so it holds one file descriptor and one copy in the page cache whatever
//! the number of exports.
//!
//! Only read-only layers are shared (a writable backing file, as `commit` opens, belongs to
//! one image). A layer is known by the device and inode of its file, so two paths to one
//! file (a symlink, a relative and an absolute path) give one layer. The registry holds
//! weak references: a layer closes when the last image using it does.
use super::layer::{check_chain, ChainAbove, Layer};
use super::OpenOptions;
use crate::error::{Error, Result};
use crate::format::BackingFormat;
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};

#[derive(Default)]
pub struct LayerRegistry {
    /// Open layers by (device, inode) of their file.
    open: Mutex<HashMap<(u64, u64), Weak<Layer>>>,
}

impl std::fmt::Debug for LayerRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LayerRegistry({} layers)", self.len())
    }
}

impl LayerRegistry {
    pub fn new() -> Arc<LayerRegistry> {
        Arc::new(LayerRegistry::default())
    }

    /// Layers open now.
    pub fn len(&self) -> usize {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.values().filter(|w| w.strong_count() > 0).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The layer at `path`, opened with `opts` unless an image already uses it. `opts`
    /// carries this registry, so the layer's own backing file is shared too.
    pub(crate) fn open(
        &self,
        path: &Path,
        format: BackingFormat,
        opts: &OpenOptions,
        above: &ChainAbove,
    ) -> Result<Arc<Layer>> {
        if !opts.read_only {
            return Ok(Arc::new(Layer::open_below(path, format, opts, above)?));
        }
        let meta = std::fs::metadata(path).map_err(|source| Error::File {
            path: path.into(),
            op: "opening",
            source,
        })?;
        let key = (meta.dev(), meta.ino());
        if let Some(layer) = self.lookup(key) {
            // Its chain was checked for loops when it was opened; this image's chain must
            // not meet it either.
            check_not_above(&layer, above)?;
            return check_format(layer, path, format);
        }
        // Opened without the lock held: a cowimg layer opens its own backing file through
        // this registry. Two images racing for one new layer may both open it; the first
        // to register wins and the other copy is closed at once.
        let layer = Arc::new(Layer::open_below(path, format, opts, above)?);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(first) = open.get(&key).and_then(Weak::upgrade) {
            drop(open);
            return check_format(first, path, format);
        }
        open.retain(|_, w| w.strong_count() > 0);
        open.insert(key, Arc::downgrade(&layer));
        Ok(layer)
    }

    fn lookup(&self, key: (u64, u64)) -> Option<Arc<Layer>> {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(&key).and_then(Weak::upgrade)
    }
}

/// A shared layer, or one below it, that is also above it in this image's chain is a loop.
fn check_not_above(layer: &Layer, above: &ChainAbove) -> Result<()> {
    let mut current = Some(layer);
    while let Some(l) = current {
        if let Some(id) = l.identity() {
            check_chain(l.path(), id, above)?;
        }
        current = l.backing();
    }
    Ok(())
}

/// One file is one layer: an image that records it with another format is refused.
fn check_format(layer: Arc<Layer>, path: &Path, format: BackingFormat) -> Result<Arc<Layer>> {
    if layer.format() != format {
        return Err(Error::Invalid {
            path: path.into(),
            reason: format!(
                "opened as a {} layer elsewhere, recorded as {} here",
                layer.format().name(),
                format.name()
            ),
        });
    }
    Ok(layer)
}

impl super::ImageV1 {
    /// Attaches a backing layer that other images may share (see [`LayerRegistry`]).
    pub fn attach_shared_backing(&mut self, layer: Arc<Layer>) {
        self.backing = Some(layer);
    }

    /// Turns this image's exclusive lock into a shared one, for an image that will only be
    /// read from now on (the old top of a live snapshot): other processes may then read
    /// it, and still none may write it. `flock` converts the lock in place; should it fail,
    /// the image keeps working and only other readers stay locked out.
    pub fn share_lock(&self) -> Result<()> {
        let Some(file) = &self._lock_file else {
            return Ok(());
        };
        file.try_lock_shared().map_err(|_| Error::Locked {
            path: self.path.clone(),
            kind: "shared",
        })
    }
}
