//! Creating and opening version-1 images: a new image's header and its first bytes, and
//! an image assembled from what [`load`] found.
use super::load::load;
use super::{FreeClusters, ImageV1, State};
use crate::error::{Error, Result};
use crate::format::{self, Geometry, Header, HEADER_SLOT_SIZE};
use crate::image::{
    check_recorded_format, layer, random_epoch, resolve_backing_path, stat_openable, v2,
    CreateOptions, Layer, OpenOptions,
};
use crate::storage::{FileStorage, Storage};
use std::fs::OpenOptions as FsOpenOptions;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, RwLock};

impl ImageV1 {
    /// Creates a new, empty image. Refuses to overwrite an existing file.
    pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
        // The format given is recorded, never probed; content that contradicts it is
        // reported now rather than at the first open. (A backing file that does not exist
        // yet is allowed when a size is given, as before.)
        if let Some((recorded, fmt)) = &opts.backing {
            let resolved = resolve_backing_path(path, recorded);
            if stat_openable(&resolved).is_ok() {
                if let Some(warning) = check_recorded_format(&resolved, *fmt)? {
                    layer::warn(&warning);
                }
            }
        }
        let size = match (opts.size, &opts.backing) {
            (Some(s), _) => s,
            (None, Some((p, fmt))) => {
                let ro = OpenOptions {
                    read_only: true,
                    force_share: true,
                    ..Default::default()
                };
                Layer::open(&resolve_backing_path(path, p), *fmt, &ro)?.size()
            }
            (None, None) => {
                return Err(Error::Invalid {
                    path: path.into(),
                    reason: "a size is needed when there is no backing file".into(),
                });
            }
        };
        let header = new_header(path, opts, size)?;
        let file = FsOpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|source| Error::File {
                path: path.into(),
                op: "creating",
                source,
            })?;
        if opts.version == 2 {
            return v2::create_on(&FileStorage::new(file), path, &header);
        }
        format_storage(&FileStorage::new(file), path, &header)
    }

    /// Writes a new, empty image of `opts.size` bytes (which must be set) onto `storage`,
    /// for images that do not live in a file of their own (tests, fuzzing).
    pub fn create_on(storage: &dyn Storage, name: &Path, opts: &CreateOptions) -> Result<()> {
        let size = opts.size.ok_or_else(|| Error::Invalid {
            path: name.into(),
            reason: "a size is needed".into(),
        })?;
        let header = new_header(name, opts, size)?;
        if opts.version == 2 {
            return v2::create_on(storage, name, &header);
        }
        format_storage(storage, name, &header)
    }

    /// Opens an image over any storage, without its backing file (tests attach one with
    /// [`ImageV1::attach_backing`]). `name` is used in messages.
    pub fn open_storage(
        storage: Arc<dyn Storage>,
        name: &Path,
        read_only: bool,
    ) -> Result<ImageV1> {
        let loaded = load(storage.as_ref(), name)?;
        let geometry = loaded.header.geometry();
        let free = FreeClusters::from_used(geometry.first_data_cluster(), &loaded.used);
        let virtual_size = loaded.header.virtual_size;
        Ok(ImageV1 {
            path: name.into(),
            storage,
            read_only,
            geometry,
            virtual_size,
            backing: None,
            _lock_file: None,
            identity: None,
            gate: RwLock::new(()),
            state: Mutex::new(State::from_loaded(loaded, free)),
            committed: Condvar::new(),
            flush_serial: Mutex::new(()),
            failed: false.into(),
            reverts: 0.into(),
        })
    }

    /// A read-only image that reads `layer` (a raw or qcow2 file, say) through an empty
    /// overlay kept in memory: how a server exports a file of another format, read-only.
    pub fn read_only_over(layer: Layer, name: &Path) -> Result<ImageV1> {
        let storage = Arc::new(crate::storage::MemStorage::new(Vec::new()));
        let create = CreateOptions {
            size: Some(layer.size()),
            ..Default::default()
        };
        ImageV1::create_on(storage.as_ref(), name, &create)?;
        let mut overlay = ImageV1::open_storage(storage, name, true)?;
        overlay.attach_backing(layer);
        Ok(overlay)
    }

    /// Attaches an already open backing layer (for tests and tools that build chains over
    /// in-memory storage).
    pub fn attach_backing(&mut self, layer: Layer) {
        self.backing = Some(Arc::new(layer));
    }
}

/// The header of a new image, after checking the options.
fn new_header(path: &Path, opts: &CreateOptions, size: u64) -> Result<Header> {
    let invalid = |reason: String| Error::Invalid {
        path: path.into(),
        reason,
    };
    let cs = opts.cluster_size;
    let cluster_bits = cs.trailing_zeros();
    if !cs.is_power_of_two() || Geometry::checked(cluster_bits).is_none() {
        return Err(invalid(format!(
            "cluster size {cs} is not a power of two from 4 KiB to 2 MiB"
        )));
    }
    if let Some((p, _)) = &opts.backing {
        if p.is_empty() || p.len() > format::header::MAX_BACKING_PATH || p.contains('\0') {
            return Err(invalid(format!(
                "backing path must be 1..={} bytes without NUL",
                format::header::MAX_BACKING_PATH
            )));
        }
    }
    if size > format::MAX_VIRTUAL_SIZE {
        return Err(invalid(format!(
            "size {size} exceeds the maximum of 2^60 bytes"
        )));
    }
    let geometry = Geometry::new(cluster_bits);
    Ok(Header {
        generation: 1,
        compatible_features: 0,
        cluster_bits,
        backing: opts.backing.clone(),
        virtual_size: size,
        checkpoint_offset: 0,
        checkpoint_entries: 0,
        checkpoint_crc: 0,
        journal_offset: geometry.first_data_cluster() * cs,
        journal_capacity: super::journal_capacity_for(0, cs),
        journal_epoch: random_epoch(),
    })
}

fn format_storage(storage: &dyn Storage, path: &Path, header: &Header) -> Result<()> {
    let io = |op, offset, source| Error::Io {
        path: path.into(),
        op,
        offset,
        source,
    };
    storage
        .write_at(&header.to_bytes(), 0)
        .map_err(|e| io("writing header", 0, e))?;
    // Slot B exists but is empty, so the file is never shorter than both slots; and it covers
    // the journal region (sparsely), so that truncation is detected (see `check_regions` in
    // `load.rs`).
    let journal_end = header.journal_offset + header.journal_capacity;
    storage
        .set_len(journal_end.max(2 * HEADER_SLOT_SIZE as u64))
        .map_err(|e| io("sizing", 0, e))?;
    storage.sync().map_err(|e| io("syncing", 0, e))
}
