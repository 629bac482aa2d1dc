//! Writes a new qcow2 image (`convert -O qcow2`): version 3, 16-bit refcounts, zlib
//! compression type (nothing is compressed), standard L2 entries.
//!
//! Layout: the header in cluster 0, the L1 table from cluster 1, then data clusters and L2
//! tables in guest order (each L2 table is written when the copy leaves the 512 MiB it maps,
//! for 64 KiB clusters, so one is in memory at a time), then the refcount table and the
//! refcount blocks, which count every cluster of the file, themselves included, once. The
//! header is written last, so that an interrupted convert leaves no valid qcow2 header.
use super::ops::Progress;
use super::Layer;
use crate::error::{Error, Result};
use crate::format::qcow2::{
    encode_header, encode_table_entry, NewHeader, L2_ZERO_ENTRY, MAX_L1_BYTES,
};
use crate::format::BackingFormat;
use std::fs::{File, OpenOptions as FsOpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// What to write: the merged contents of `src`, `size` bytes (rounded up to 512, the unit
/// in which qemu reads a qcow2's size), with `cluster_size` clusters; with `backing` (name
/// as recorded, its format, and the opened layer), only clusters that differ from it.
pub struct Qcow2Output<'a> {
    pub size: u64,
    pub cluster_size: u64,
    /// Guest byte ranges (sorted, disjoint) that may hold non-zero data in `src`; with a
    /// backing file every cluster is compared, so these only matter without one.
    pub data_ranges: &'a [(u64, u64)],
    pub backing: Option<(&'a str, BackingFormat, &'a Layer)>,
}

struct Writer<'a> {
    path: &'a Path,
    file: File,
    cluster_size: u64,
    /// The next cluster index to allocate.
    next_cluster: u64,
}

impl Writer<'_> {
    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|source| Error::Io {
                path: self.path.into(),
                op: "writing",
                offset,
                source,
            })
    }
    fn allocate(&mut self) -> u64 {
        let at = self.next_cluster * self.cluster_size;
        self.next_cluster += 1;
        at
    }
}

fn table_bytes(entries: &[u64], cluster_size: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(entries.len() * 8);
    for e in entries {
        b.extend_from_slice(&e.to_be_bytes());
    }
    b.resize(
        b.len().div_ceil(cluster_size as usize) * cluster_size as usize,
        0,
    );
    b
}

/// Writes `dst` (replacing it). `src` must read as the image to write.
pub fn write_qcow2(src: &Layer, dst: &Path, out: &Qcow2Output, progress: Progress) -> Result<()> {
    let invalid = |reason: String| Error::Invalid {
        path: dst.into(),
        reason,
    };
    let cluster_size = out.cluster_size;
    let cluster_bits = cluster_size.trailing_zeros();
    let size = out.size.div_ceil(512) * 512;
    let l2_entries = cluster_size / 8;
    let clusters = size.div_ceil(cluster_size);
    let l1_size = clusters.div_ceil(l2_entries);
    if l1_size * 8 > MAX_L1_BYTES {
        return Err(invalid(format!(
            "a virtual size of {size} bytes needs an L1 table larger than qemu's 32 MiB with {cluster_size}-byte clusters; use larger clusters (-c)"
        )));
    }
    let backing_names = match out.backing {
        Some((_, BackingFormat::Cowimg, _)) => {
            return Err(invalid(
                "a qcow2 image cannot have a cowimg backing file (qemu cannot read it); \
                 use -F raw or -F qcow2"
                    .into(),
            ))
        }
        Some((name, format, _)) => Some((name, format.name())),
        None => None,
    };
    // The header must fit in cluster 0 (a long backing name may not): checked before the
    // output is created.
    let probe = NewHeader {
        cluster_bits,
        size,
        l1_size: l1_size as u32,
        l1_table_offset: if l1_size == 0 { 0 } else { cluster_size },
        refcount_table_offset: 0,
        refcount_table_clusters: 0,
        backing: backing_names,
    };
    encode_header(&probe).map_err(|e| invalid(e.to_string()))?;

    let file = FsOpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dst)
        .map_err(|source| Error::File {
            path: dst.into(),
            op: "creating",
            source,
        })?;
    // An empty image has no L1 table (qemu writes offset 0 for it, too): a cluster for it
    // would be counted and never referenced, a leak to qemu-img check.
    let l1_clusters = (l1_size * 8).div_ceil(cluster_size);
    let mut w = Writer {
        path: dst,
        file,
        cluster_size,
        next_cluster: 1 + l1_clusters,
    };
    let mut l1 = vec![0u64; l1_size as usize];
    let mut l2 = vec![0u64; l2_entries as usize];
    let mut l2_index: Option<u64> = None;
    let mut buf = vec![0u8; cluster_size as usize];
    let mut base = vec![0u8; cluster_size as usize];

    let flush_l2 = |w: &mut Writer, l1: &mut [u64], l2: &mut [u64], index: u64| -> Result<()> {
        if l2.iter().any(|&e| e != 0) {
            let at = w.allocate();
            w.write(&table_bytes(l2, cluster_size), at)?;
            l1[index as usize] = encode_table_entry(at);
            l2.fill(0);
        }
        Ok(())
    };

    // The clusters to visit, in guest order: all of them over a backing file (each is
    // compared), else those that the source's data ranges touch.
    let visit: Box<dyn Iterator<Item = u64>> = if out.backing.is_some() {
        Box::new(0..clusters)
    } else {
        let mut last = None;
        Box::new(
            out.data_ranges
                .iter()
                .flat_map(move |&(start, len)| {
                    (start / cluster_size)..(start + len).div_ceil(cluster_size)
                })
                .filter(move |&c| {
                    let new = last != Some(c);
                    last = Some(c);
                    new
                }),
        )
    };
    for cluster in visit {
        let index = cluster / l2_entries;
        if l2_index != Some(index) {
            if let Some(previous) = l2_index {
                flush_l2(&mut w, &mut l1, &mut l2, previous)?;
            }
            l2_index = Some(index);
        }
        let guest = cluster * cluster_size;
        src.read_at(&mut buf, guest)?;
        let all_zero = buf.iter().all(|&b| b == 0);
        let entry = match out.backing {
            Some((_, _, layer)) => {
                layer.read_at(&mut base, guest)?;
                if base == buf {
                    0
                } else if all_zero {
                    L2_ZERO_ENTRY
                } else {
                    let at = w.allocate();
                    w.write(&buf, at)?;
                    encode_table_entry(at)
                }
            }
            None if all_zero => 0,
            None => {
                let at = w.allocate();
                w.write(&buf, at)?;
                encode_table_entry(at)
            }
        };
        l2[(cluster % l2_entries) as usize] = entry;
        progress((guest + cluster_size).min(size), size);
    }
    if let Some(previous) = l2_index {
        flush_l2(&mut w, &mut l1, &mut l2, previous)?;
    }

    // Refcounts: R blocks of cluster_size / 2 entries and a table of T clusters must count
    // the clusters used so far plus themselves; grow both until they do.
    let used = w.next_cluster;
    let per_block = cluster_size / 2;
    let (mut blocks, mut table_clusters) = (0u64, 0u64);
    loop {
        let total = used + blocks + table_clusters;
        let need_blocks = total.div_ceil(per_block);
        let need_table = (need_blocks * 8).div_ceil(cluster_size).max(1);
        if (need_blocks, need_table) == (blocks, table_clusters) {
            break;
        }
        (blocks, table_clusters) = (need_blocks, need_table);
    }
    let total = used + blocks + table_clusters;
    let table_at = used * cluster_size;
    let first_block = used + table_clusters;
    let table: Vec<u64> = (0..blocks)
        .map(|i| (first_block + i) * cluster_size)
        .collect();
    let mut table_raw = table_bytes(&table, cluster_size);
    table_raw.resize((table_clusters * cluster_size) as usize, 0);
    w.write(&table_raw, table_at)?;
    let mut block = vec![0u8; cluster_size as usize];
    for i in 0..blocks {
        block.fill(0);
        let first = i * per_block;
        for c in first..total.min(first + per_block) {
            let at = ((c - first) * 2) as usize;
            block[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
        }
        w.write(&block, (first_block + i) * cluster_size)?;
    }
    if l1_clusters > 0 {
        let mut l1_raw = table_bytes(&l1, cluster_size);
        l1_raw.resize((l1_clusters * cluster_size) as usize, 0);
        w.write(&l1_raw, cluster_size)?;
    }
    let header = encode_header(&NewHeader {
        refcount_table_offset: table_at,
        refcount_table_clusters: table_clusters as u32,
        ..probe
    })
    .map_err(|e| invalid(e.to_string()))?;
    let mut first = vec![0u8; cluster_size as usize];
    first[..header.len()].copy_from_slice(&header);
    w.write(&first, 0)?;
    w.file.sync_data().map_err(|source| Error::Io {
        path: dst.into(),
        op: "syncing",
        offset: 0,
        source,
    })?;
    progress(size, size);
    Ok(())
}
