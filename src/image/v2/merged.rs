//! The merged index of a read-only chain (FORMAT-v2.md, "Reading through a chain"): a
//! read-only version-2 image with a backing file resolves each region of its disk through
//! every layer below it once, and keeps the result, one piece per run that comes from one
//! place, in the page cache. A read then costs one lookup however deep the chain is, as
//! overlaybd merges the indexes of its read-only layers, but built a region at a time on
//! first use and bounded by the cache instead of merged whole at open.
//!
//! It is only for read-only images: nothing below one changes while it is open (every layer
//! of its chain is read-only too), so a region, once resolved, stays true until the image
//! gets another backing file, which forgets its regions.

use super::{shared, ImageV2};
use crate::error::{Error, Result};
use crate::format::v2::{Mapping, BLOCK};
use crate::image::Layer;
use std::sync::Arc;

/// Blocks per region: small enough that resolving one on a miss costs about as much as a
/// read through the chain does without the index, large enough that the pieces of a region
/// are worth their entry.
pub(super) const REGION_BLOCKS: u64 = 64;

/// Blocks `[start, end)` of the disk, all read from one place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ChainPiece {
    pub start: u64,
    pub end: u64,
    pub source: ChainSource,
}

/// Where a piece's bytes are, counting layers from the image that holds the index (0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChainSource {
    /// Host block `host_block` onward of the version-2 image `depth` layers down.
    Data {
        depth: u32,
        host_block: u64,
    },
    Zero,
    /// What the layer `depth` down reads by its own read: a raw, qcow2 or version-1 file,
    /// or the last, partial block of a version-2 image.
    Through {
        depth: u32,
    },
}

/// A layer of the chain, found by depth.
enum Below<'a> {
    V2(&'a ImageV2),
    Other(&'a Layer),
}

impl ImageV2 {
    /// Whether reads go through the merged index.
    pub(super) fn reads_merged(&self) -> bool {
        self.read_only && self.backing.is_some()
    }

    /// [`ImageV2::read_at`] through the merged index, with the gate held.
    pub(super) fn read_merged(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset + buf.len() as u64;
        let mut at = offset;
        while at < end {
            let region = at / BLOCK / REGION_BLOCKS;
            let region_end = ((region + 1) * REGION_BLOCKS * BLOCK).min(end);
            let pieces = self.region(region)?;
            let first = pieces.partition_point(|p| p.end * BLOCK <= at);
            for p in pieces[first..]
                .iter()
                .take_while(|p| p.start * BLOCK < region_end)
            {
                let from = (p.start * BLOCK).max(at);
                let to = (p.end * BLOCK).min(region_end);
                let b = &mut buf[(from - offset) as usize..(to - offset) as usize];
                self.read_piece(b, from, p)?;
            }
            at = region_end;
        }
        Ok(())
    }

    fn read_piece(&self, buf: &mut [u8], from: u64, p: &ChainPiece) -> Result<()> {
        match p.source {
            ChainSource::Zero => buf.fill(0),
            ChainSource::Data { depth, host_block } => {
                let Below::V2(img) = self.below(depth)? else {
                    return Err(self.lost_layer(depth));
                };
                let at = host_block * BLOCK + (from - p.start * BLOCK);
                img.storage
                    .read_at(buf, at)
                    .map_err(|e| img.io_err("reading", at, e))?;
            }
            ChainSource::Through { depth } => match self.below(depth)? {
                Below::V2(img) => {
                    // Only its last, partial block: bytes past its end read as zeros.
                    let avail = img.virtual_size.saturating_sub(from).min(buf.len() as u64);
                    let (mine, past) = buf.split_at_mut(avail as usize);
                    if !mine.is_empty() {
                        let _io = shared(&img.gate);
                        img.read_held(mine, from)?;
                    }
                    past.fill(0);
                }
                Below::Other(layer) => layer.read_at(buf, from)?,
            },
        }
        Ok(())
    }

    /// The layer `depth` down from this image (0: itself). Pieces only name layers that
    /// resolving them walked through, and the chain does not change under its index.
    fn below(&self, depth: u32) -> Result<Below<'_>> {
        let mut img = self;
        for _ in 0..depth {
            let layer = img
                .backing
                .as_deref()
                .ok_or_else(|| self.lost_layer(depth))?;
            match layer.as_v2() {
                Some(v2) => img = v2,
                None => return Ok(Below::Other(layer)),
            }
        }
        Ok(Below::V2(img))
    }

    fn lost_layer(&self, depth: u32) -> Error {
        Error::Inconsistent {
            path: self.path.clone(),
            reason: format!("the merged index names layer {depth} of a chain that lacks it"),
        }
    }

    /// A region's pieces: from the cache, or resolved through the chain and cached.
    fn region(&self, region: u64) -> Result<Arc<[ChainPiece]>> {
        if let Some(pieces) = self.cache.get_region(self.cache_key, region) {
            return Ok(pieces);
        }
        let start = region * REGION_BLOCKS;
        let end = (start + REGION_BLOCKS).min(self.virtual_size.div_ceil(BLOCK));
        let mut pieces = Vec::new();
        self.resolve_chain(start, end, 0, &mut pieces)?;
        let pieces: Arc<[ChainPiece]> = pieces.into();
        self.cache
            .insert_region(self.cache_key, region, pieces.clone());
        Ok(pieces)
    }

    /// Appends where blocks `[start, end)` come from, this image being `depth` layers down.
    fn resolve_chain(
        &self,
        start: u64,
        end: u64,
        depth: u32,
        out: &mut Vec<ChainPiece>,
    ) -> Result<()> {
        let whole = self.virtual_size / BLOCK;
        let own_end = end.min(whole);
        if start < own_end {
            let resolved = {
                let _io = shared(&self.gate);
                self.resolve_gated(start, own_end)?
            };
            for p in resolved {
                let (from, to) = (p.start, p.end());
                match (p.mapping, self.backing.as_deref()) {
                    (Mapping::Data(host_block), _) => {
                        push(out, from, to, ChainSource::Data { depth, host_block })
                    }
                    (Mapping::Zero, _) | (Mapping::Unmapped, None) => {
                        push(out, from, to, ChainSource::Zero)
                    }
                    (Mapping::Unmapped, Some(layer)) => match layer.as_v2() {
                        Some(img) => img.resolve_chain(from, to, depth + 1, out)?,
                        None => push(out, from, to, ChainSource::Through { depth: depth + 1 }),
                    },
                }
            }
        }
        // A partial last block is read as the image reads it; past it, zeros.
        let partial_end = end.min(self.virtual_size.div_ceil(BLOCK));
        if start.max(own_end) < partial_end {
            push(
                out,
                start.max(own_end),
                partial_end,
                ChainSource::Through { depth },
            );
        }
        if start.max(partial_end) < end {
            push(out, start.max(partial_end), end, ChainSource::Zero);
        }
        Ok(())
    }
}

/// Appends a piece, joined to the one before when it continues it.
fn push(out: &mut Vec<ChainPiece>, start: u64, end: u64, source: ChainSource) {
    if let Some(last) = out.last_mut() {
        let continues = match (last.source, source) {
            (ChainSource::Zero, ChainSource::Zero) => true,
            (
                ChainSource::Data {
                    depth: a,
                    host_block: h,
                },
                ChainSource::Data {
                    depth: b,
                    host_block: k,
                },
            ) => a == b && h + (last.end - last.start) == k,
            _ => false,
        };
        if continues && last.end == start {
            last.end = end;
            return;
        }
    }
    out.push(ChainPiece { start, end, source });
}
