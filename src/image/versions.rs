//! The public [`Image`]: a cowimg image of either format version. Version 1
//! (format-spec/FORMAT.md) keeps its map in memory; version 2 (FORMAT-v2.md) pages it from
//! disk. An open reads the current header slot and picks the engine; everything else is
//! the same interface.
use super::layer::{check_chain, ChainAbove};
use super::v2::ImageV2;
use super::{
    open_locked, refuse_a_qcow2, resolve_backing_path, CreateOptions, Extent, FileId, ImageStats,
    ImageV1, Layer, OpenOptions, Source,
};
use crate::error::{Error, Result};
use crate::format::{Geometry, Header};
use crate::storage::{FileStorage, Storage};
use std::path::Path;
use std::sync::Arc;

pub struct Image(Engine);

enum Engine {
    V1(Box<ImageV1>),
    V2(Box<ImageV2>),
}

/// Calls the same method on whichever engine the image has.
macro_rules! on_engine {
    ($self:expr, $e:ident => $body:expr) => {
        match $self {
            Engine::V1($e) => $body,
            Engine::V2($e) => $body,
        }
    };
}

impl Image {
    /// Creates a new, empty image (version `opts.version`). Refuses to overwrite a file.
    pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
        ImageV1::create(path, opts)
    }

    /// Writes a new, empty image of `opts.size` bytes onto `storage` (tests, fuzzing).
    pub fn create_on(storage: &dyn Storage, name: &Path, opts: &CreateOptions) -> Result<()> {
        ImageV1::create_on(storage, name, opts)
    }

    /// Opens an image file and its backing chain.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Image> {
        Self::open_in_chain(path, opts, &[])
    }

    /// Opens an image below the files `above` (top first): a file that is already in the
    /// chain is refused by its identity before it is opened, so a loop is never loaded.
    pub(crate) fn open_in_chain(
        path: &Path,
        opts: &OpenOptions,
        above: &ChainAbove,
    ) -> Result<Image> {
        check_chain(path, super::stat_openable(path)?, above)?;
        let (file, id) = open_locked(path, !opts.read_only, opts.force_share)?;
        check_chain(path, id, above)?;
        refuse_a_qcow2(path, &file)?;
        let lock_holder = file.try_clone().map_err(|source| Error::File {
            path: path.into(),
            op: "opening",
            source,
        })?;
        let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(file));
        let mut image = Self::open_engine(storage, path, opts)?;
        let backing = match image.header().backing.filter(|_| !opts.without_backing) {
            None => None,
            Some((recorded, fmt)) => {
                let backing_opts = OpenOptions {
                    read_only: !opts.writable_backing,
                    ..opts.clone()
                };
                let resolved = resolve_backing_path(path, &recorded);
                let mut chain = above.to_vec();
                chain.push((path.to_path_buf(), id));
                Some(match &opts.layers {
                    Some(shared) => shared.open(&resolved, fmt, &backing_opts, &chain)?,
                    None => Arc::new(Layer::open_below(&resolved, fmt, &backing_opts, &chain)?),
                })
            }
        };
        match &mut image.0 {
            Engine::V1(v1) => {
                v1._lock_file = Some(lock_holder);
                v1.identity = Some(id);
                v1.backing = backing;
            }
            Engine::V2(v2) => v2.attach_file(lock_holder, id, backing),
        }
        Ok(image)
    }

    fn open_engine(storage: Arc<dyn Storage>, name: &Path, opts: &OpenOptions) -> Result<Image> {
        let read_only = opts.read_only;
        let (_, slot) = super::v2::current_slot(storage.as_ref(), name)?;
        Ok(Image(match slot {
            super::v2::Slot::V1(_) => {
                Engine::V1(Box::new(ImageV1::open_storage(storage, name, read_only)?))
            }
            super::v2::Slot::V2(_) => Engine::V2(Box::new(ImageV2::open_storage(
                storage,
                name,
                read_only,
                opts.page_cache.clone().unwrap_or_else(|| {
                    Arc::new(super::v2::PageCache::new(
                        opts.cache_size.unwrap_or(super::v2::DEFAULT_CACHE_SIZE),
                    ))
                }),
            )?)),
        }))
    }

    /// Opens an image over any storage, without its backing file (tests attach one with
    /// [`Image::attach_backing`]). `name` is used in messages.
    pub fn open_storage(storage: Arc<dyn Storage>, name: &Path, read_only: bool) -> Result<Image> {
        let opts = OpenOptions {
            read_only,
            ..Default::default()
        };
        Self::open_engine(storage, name, &opts)
    }

    /// A read-only image that reads `layer` through an empty overlay kept in memory.
    pub fn read_only_over(layer: Layer, name: &Path) -> Result<Image> {
        Ok(Image(Engine::V1(Box::new(ImageV1::read_only_over(
            layer, name,
        )?))))
    }

    /// The version-2 engine, if the image is one.
    pub(crate) fn as_v2(&self) -> Option<&ImageV2> {
        match &self.0 {
            Engine::V2(img) => Some(img),
            Engine::V1(_) => None,
        }
    }

    /// The format version of the image: 1 or 2.
    pub fn version(&self) -> u32 {
        match &self.0 {
            Engine::V1(_) => 1,
            Engine::V2(_) => 2,
        }
    }

    /// The height of a version-2 image's map tree (0 when empty).
    pub fn map_height(&self) -> Option<u8> {
        match &self.0 {
            Engine::V2(v2) => Some(v2.stats().tree_height),
            Engine::V1(_) => None,
        }
    }

    /// Sets how much work a version-2 image's flush may do at once (a test makes the limits
    /// small, to reach with a small map the paths a large one takes); false for version 1.
    #[doc(hidden)]
    pub fn set_flush_limits(&self, limits: crate::image::v2::FlushLimits) -> bool {
        match &self.0 {
            Engine::V2(v2) => {
                v2.set_flush_limits(limits);
                true
            }
            Engine::V1(_) => false,
        }
    }

    /// Page-cache figures of a version-2 image: `(pages held, hits, misses)`.
    pub fn cache_stats(&self) -> Option<(u64, u64, u64)> {
        match &self.0 {
            Engine::V2(v2) => {
                let s = v2.stats();
                Some((s.cached_pages, s.cache_hits, s.cache_misses))
            }
            Engine::V1(_) => None,
        }
    }

    pub fn attach_backing(&mut self, layer: Layer) {
        self.attach_shared_backing(Arc::new(layer));
    }

    /// Attaches a backing layer that other images may share (see `LayerRegistry`).
    pub fn attach_shared_backing(&mut self, layer: Arc<Layer>) {
        match &mut self.0 {
            Engine::V1(v1) => v1.attach_shared_backing(layer),
            Engine::V2(v2) => v2.set_backing_layer(Some(layer)),
        }
    }

    /// Turns this image's exclusive lock into a shared one (the old top of a snapshot).
    pub fn share_lock(&self) -> Result<()> {
        let file = match &self.0 {
            Engine::V1(v1) => return v1.share_lock(),
            Engine::V2(v2) => v2.lock_file(),
        };
        let Some(file) = file else {
            return Ok(());
        };
        file.try_lock_shared().map_err(|_| Error::Locked {
            path: self.path().into(),
            kind: "shared",
        })
    }

    pub fn path(&self) -> &Path {
        on_engine!(&self.0, e => e.path())
    }
    pub fn virtual_size(&self) -> u64 {
        on_engine!(&self.0, e => e.virtual_size())
    }
    pub fn cluster_size(&self) -> u64 {
        self.geometry().cluster_size()
    }
    /// Version 2 maps 4 KiB blocks: its geometry is that of 4 KiB clusters.
    pub fn geometry(&self) -> Geometry {
        match &self.0 {
            Engine::V1(v1) => v1.geometry(),
            Engine::V2(_) => Geometry::new(12),
        }
    }
    pub fn is_read_only(&self) -> bool {
        on_engine!(&self.0, e => e.is_read_only())
    }
    pub fn backing(&self) -> Option<&Layer> {
        on_engine!(&self.0, e => e.backing())
    }
    /// The current header, as version 1 lays it out; for version 2, the fields both
    /// versions share (generation, size, backing file, journal) with an empty checkpoint.
    pub fn header(&self) -> Header {
        match &self.0 {
            Engine::V1(v1) => v1.header(),
            Engine::V2(v2) => {
                let h = v2.header();
                Header {
                    generation: h.generation,
                    compatible_features: h.compatible_features,
                    cluster_bits: 12,
                    backing: h.backing,
                    virtual_size: h.virtual_size,
                    checkpoint_offset: 0,
                    checkpoint_entries: 0,
                    checkpoint_crc: 0,
                    journal_offset: h.journal_offset,
                    journal_capacity: h.journal_capacity,
                    journal_epoch: h.journal_epoch,
                }
            }
        }
    }
    pub fn identity(&self) -> Option<FileId> {
        on_engine!(&self.0, e => e.identity())
    }
    pub fn storage(&self) -> &Arc<dyn Storage> {
        on_engine!(&self.0, e => e.storage())
    }
    pub(crate) fn io_err(&self, op: &'static str, offset: u64, source: std::io::Error) -> Error {
        on_engine!(&self.0, e => e.io_err(op, offset, source))
    }
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        on_engine!(&self.0, e => e.read_at(buf, offset))
    }
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        on_engine!(&self.0, e => e.write_at(buf, offset))
    }
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        on_engine!(&self.0, e => e.write_zeroes(offset, len))
    }
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        on_engine!(&self.0, e => e.discard(offset, len))
    }
    pub fn flush(&self) -> Result<()> {
        on_engine!(&self.0, e => e.flush())
    }
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        on_engine!(&self.0, e => e.block_status(offset, len))
    }
    /// The status of the whole image, as `qemu-img map` shows it.
    pub fn map(&self) -> Result<Vec<Extent>> {
        self.block_status(0, self.virtual_size())
    }
    pub(crate) fn status_at_depth(
        &self,
        offset: u64,
        len: u64,
        depth: u32,
        out: &mut Vec<Extent>,
    ) -> Result<()> {
        on_engine!(&self.0, e => e.status_at_depth(offset, len, depth, out))
    }
    /// Counts for `info`. A version-2 image does not walk its tree for them: its mapped
    /// clusters are the extents its header and its journal name.
    pub fn stats(&self) -> ImageStats {
        match &self.0 {
            Engine::V1(v1) => v1.stats(),
            Engine::V2(v2) => {
                let s = v2.stats();
                ImageStats {
                    mapped_clusters: s.tree_extents + s.changed_extents,
                    file_length: s.file_length,
                    allocated_bytes: s.allocated_bytes,
                    journal_used: s.journal_used,
                    journal_capacity: s.journal_capacity,
                    generation: s.generation,
                    ..Default::default()
                }
            }
        }
    }
    pub fn clear(&self) -> Result<()> {
        on_engine!(&self.0, e => e.clear())
    }
    pub fn resize(&mut self, new_size: u64) -> Result<()> {
        on_engine!(&mut self.0, e => e.resize(new_size))
    }
    pub fn set_backing(&mut self, backing: Option<(String, Layer)>) -> Result<()> {
        on_engine!(&mut self.0, e => e.set_backing(backing))
    }
    pub fn reverts(&self) -> u64 {
        on_engine!(&self.0, e => e.reverts())
    }
    pub fn continue_reverts_of(&self, earlier: u64) {
        on_engine!(&self.0, e => e.continue_reverts_of(earlier))
    }

    /// This layer's own runs (data or zeros), in order, without the backing file.
    pub(crate) fn own_runs(&self) -> Result<Vec<(u64, u64, Source)>> {
        let runs = match &self.0 {
            Engine::V1(v1) => v1.own_host_runs(),
            Engine::V2(v2) => v2.own_ranges()?,
        };
        Ok(runs
            .into_iter()
            .map(|(s, l, h)| (s, l, h.map_or(Source::Zero, Source::Host)))
            .collect())
    }

    /// The ranges that fall through to the backing file, in order.
    pub(crate) fn fall_through_runs(&self) -> Result<Vec<(u64, u64)>> {
        match &self.0 {
            Engine::V1(v1) => Ok(v1.fall_through_runs()),
            Engine::V2(v2) => v2.fall_through_ranges(),
        }
    }
}
