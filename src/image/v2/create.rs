//! New version-2 images, and the upgrade of a version-1 image in place (FORMAT-v2.md,
//! "Upgrade").
use super::extents::ExtentMap;
use super::load::{current_slot, Slot};
use super::tree::{PageCache, Tree, TreeRoot};
use crate::error::{Error, Result};
use crate::format::v2::{HeaderV2, Mapping, BLOCK, FIRST_HOST_BLOCK, MAX_V2_VIRTUAL_SIZE};
use crate::format::{Header, HEADER_SLOT_SIZE};
use crate::storage::Storage;
use std::path::Path;

/// A random identity for pages (never zero).
fn new_image_id() -> u64 {
    loop {
        let id = crate::image::random_epoch();
        if id != 0 {
            return id;
        }
    }
}

/// Writes a new, empty version-2 image with the size and backing file of `fields` (a
/// version-1 header as `create` builds it) onto `storage`.
pub fn create_on(storage: &dyn Storage, path: &Path, fields: &Header) -> Result<()> {
    let mut header = empty_header_like(path, fields)?;
    header.generation = 1;
    header.journal_offset = FIRST_HOST_BLOCK * BLOCK;
    let io = |op, offset, source| Error::Io {
        path: path.into(),
        op,
        offset,
        source,
    };
    let mut slots = vec![0u8; 2 * HEADER_SLOT_SIZE];
    slots[..HEADER_SLOT_SIZE].copy_from_slice(&header.to_bytes());
    storage
        .write_at(&slots, 0)
        .map_err(|e| io("writing the header", 0, e))?;
    let end = header.journal_offset + header.journal_capacity;
    storage
        .set_len(end)
        .map_err(|e| io("extending the file over the journal", end, e))?;
    storage.sync().map_err(|e| io("syncing", 0, e))
}

/// Converts the version-1 image on `storage` (locked by the caller) to version 2 in place:
/// its data stays where it is; a tree of its map and an empty journal are written past the
/// end of the file, then one header-slot write switches versions. A crash before that
/// write leaves the version-1 image as it was.
pub fn upgrade(storage: std::sync::Arc<dyn Storage>, path: &Path) -> Result<UpgradeReport> {
    if let (_, Slot::V2(_)) = current_slot(storage.as_ref(), path)? {
        return Err(Error::Invalid {
            path: path.into(),
            reason: "is already a version 2 image".into(),
        });
    }
    let runs = {
        // Flushing and closing may write a checkpoint or a seal: both happen before the
        // header slots are read again below.
        let v1 = crate::image::ImageV1::open_storage(storage.clone(), path, false)?;
        v1.flush()?;
        v1.own_host_runs()
    };
    let (active_slot, slot) = current_slot(storage.as_ref(), path)?;
    let Slot::V1(old) = slot else {
        return Err(Error::Invalid {
            path: path.into(),
            reason: "changed version while it was upgraded".into(),
        });
    };
    let cs = old.geometry().cluster_size();
    let checkpoint_len =
        (old.checkpoint_entries * crate::format::MAP_ENTRY_SIZE as u64).next_multiple_of(cs);
    let old_regions = [
        (old.checkpoint_offset, checkpoint_len),
        (old.journal_offset, old.journal_capacity),
    ];
    let header = v2_header_for(path, &old)?;
    let file_len = storage.len().map_err(|e| Error::Io {
        path: path.into(),
        op: "reading length",
        offset: 0,
        source: e,
    })?;
    let (updates, zero_blocks) = map_of_runs(
        storage.as_ref(),
        path,
        &runs,
        old.backing.is_some(),
        file_len,
    )?;
    let (updated, next) = write_tree_past_end(storage.as_ref(), path, &header, &updates)?;
    let mut new = header;
    new.map_root = updated.root.root;
    new.map_height = updated.root.height;
    new.map_extents = updated.root.extents;
    new.journal_offset = next * BLOCK;
    switch_to(storage.as_ref(), path, 1 - active_slot, &new)?;
    // Version 1's checkpoint and journal, and its blocks of zeros, are leaks now; give
    // them back.
    for (offset, len) in old_regions {
        if offset != 0 && len != 0 {
            let _ = storage.punch_hole(offset, len);
        }
    }
    for (h, n) in zero_blocks {
        let _ = storage.punch_hole(h * BLOCK, n * BLOCK);
    }
    // So are the parts of version 1's clusters that no unit uses (its second slots, the
    // units that fell through): a check with repair punches everything nothing references.
    let upgraded = super::ImageV2::open_storage(
        storage.clone(),
        path,
        false,
        std::sync::Arc::new(PageCache::new(super::DEFAULT_CACHE_SIZE)),
    )?;
    super::check(&upgraded, true)?;
    Ok(UpgradeReport {
        extents: new.map_extents,
        pages: updated.written_pages.len() as u64,
    })
}

/// Writes a tree of `updates` in blocks past the end of the file, which version 1 does not
/// reference; returns it and the first block after it.
fn write_tree_past_end(
    storage: &dyn Storage,
    path: &Path,
    header: &HeaderV2,
    updates: &ExtentMap,
) -> Result<(super::tree::Updated, u64)> {
    let file_len = storage.len().map_err(|e| Error::Io {
        path: path.into(),
        op: "reading length",
        offset: 0,
        source: e,
    })?;
    let mut next = file_len.div_ceil(BLOCK).max(FIRST_HOST_BLOCK);
    let cache = PageCache::new(1 << 20);
    let tree = Tree {
        storage,
        cache: &cache,
        path,
        root: TreeRoot::default(),
        image_id: header.image_id,
        cache_key: super::tree::new_cache_key(),
        generation: header.generation,
        virtual_blocks: header.virtual_blocks(),
    };
    let mut alloc = || {
        let at = next * BLOCK;
        next += 1;
        Ok(at)
    };
    let updated = tree.update(updates, header.generation, &mut alloc)?;
    Ok((updated, next))
}

/// Extends the file over the new journal, syncs, and writes `header` into `slot`: the
/// moment the image becomes version 2.
fn switch_to(storage: &dyn Storage, path: &Path, slot: usize, header: &HeaderV2) -> Result<()> {
    let io = |op, offset, source| Error::Io {
        path: path.into(),
        op,
        offset,
        source,
    };
    let end = header.journal_offset + header.journal_capacity;
    storage
        .set_len(end)
        .map_err(|e| io("extending the file over the new journal", end, e))?;
    storage.sync().map_err(|e| io("syncing", 0, e))?;
    let slot_at = (slot * HEADER_SLOT_SIZE) as u64;
    storage
        .write_at(&header.to_bytes(), slot_at)
        .map_err(|e| io("writing the header", slot_at, e))?;
    storage.sync().map_err(|e| io("syncing", 0, e))
}

/// The version-2 map of version 1's own runs `(offset, length, host offset or None for
/// zeros)`, and the runs of host blocks `(first, count)` it leaves out.
///
/// Version 1 stores a write of zeros as data; version 2 never references a block of zeros
/// (FORMAT-v2.md, "Allocation": the file's holes are its free space, so a referenced block
/// that a sparse copy turns into a hole would be handed out again). So every data block is
/// read: one of zeros becomes a zero extent over a backing file, or is left unmapped (it
/// reads zeros) without one, and its host block is no longer referenced.
fn map_of_runs(
    storage: &dyn Storage,
    path: &Path,
    runs: &[(u64, u64, Option<u64>)],
    has_backing: bool,
    file_len: u64,
) -> Result<(ExtentMap, Vec<(u64, u64)>)> {
    let mut updates = ExtentMap::default();
    let mut zero_blocks: Vec<(u64, u64)> = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    for &(offset, len, host) in runs {
        let (first, blocks) = (offset / BLOCK, len.div_ceil(BLOCK));
        let Some(host) = host else {
            updates.set(first, blocks, Mapping::Zero);
            continue;
        };
        let host = host / BLOCK;
        // Runs of blocks that are all data or all zeros, as (first index, count, zeros).
        let mut pieces: Vec<(u64, u64, bool)> = Vec::new();
        let mut i = 0;
        while i < blocks {
            let n = (blocks - i).min(buf.len() as u64 / BLOCK);
            let at = (host + i) * BLOCK;
            let chunk = &mut buf[..(n * BLOCK) as usize];
            // A unit that ends past the end of the file reads zeros there.
            let present = file_len.saturating_sub(at).min(chunk.len() as u64) as usize;
            chunk[present..].fill(0);
            storage
                .read_at(&mut chunk[..present], at)
                .map_err(|source| Error::Io {
                    path: path.into(),
                    op: "reading data to upgrade",
                    offset: at,
                    source,
                })?;
            for (j, b) in chunk.chunks(BLOCK as usize).enumerate() {
                let zero = super::write::is_zero(b);
                match pieces.last_mut() {
                    Some(last) if last.2 == zero => last.1 += 1,
                    _ => pieces.push((i + j as u64, 1, zero)),
                }
            }
            i += n;
        }
        for (k, n, zero) in pieces {
            if !zero {
                updates.set(first + k, n, Mapping::Data(host + k));
                continue;
            }
            if has_backing {
                updates.set(first + k, n, Mapping::Zero);
            }
            zero_blocks.push((host + k, n));
        }
    }
    Ok((updates, zero_blocks))
}

/// The version-2 header that replaces `current`, one generation later.
fn v2_header_for(path: &Path, current: &Header) -> Result<HeaderV2> {
    let mut header = empty_header_like(path, current)?;
    header.generation = current.generation + 1;
    Ok(header)
}

/// A version-2 header with the size, backing file and compatible features of `fields`, an
/// empty map, a new identity and epoch; the caller sets its generation and journal offset.
fn empty_header_like(path: &Path, fields: &Header) -> Result<HeaderV2> {
    if fields.virtual_size > MAX_V2_VIRTUAL_SIZE {
        return Err(Error::Invalid {
            path: path.into(),
            reason: format!(
                "its size {} exceeds the maximum of a version 2 image (2^52 bytes)",
                fields.virtual_size
            ),
        });
    }
    Ok(HeaderV2 {
        generation: 0,
        compatible_features: fields.compatible_features,
        backing: fields.backing.clone(),
        virtual_size: fields.virtual_size,
        map_root: 0,
        map_height: 0,
        map_extents: 0,
        journal_offset: 0,
        journal_capacity: super::journal_capacity_for(fields.virtual_size),
        journal_epoch: crate::image::random_epoch(),
        image_id: new_image_id(),
    })
}

#[derive(Debug, Clone, Copy)]
pub struct UpgradeReport {
    pub extents: u64,
    pub pages: u64,
}
