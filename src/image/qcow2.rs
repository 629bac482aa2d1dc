//! A read-only qcow2 image: its header, L1 table, a bounded cache of L2 tables, compressed
//! clusters (zlib and zstd), extended L2 sub-clusters, an external data file, and its own
//! backing chain. cowimg reads qcow2 files as backing files and as sources; it never writes
//! into one (see README, "qcow2").
//!
//! Every table offset is checked against the file before it is followed, and no allocation
//! is sized by a field of the file beyond the bounds that `format::qcow2` checks first (the
//! L1 table: at most 32 MiB, and no larger than the file; a cluster: at most 2 MiB).
use super::layer::{check_chain, ChainAbove, Layer};
use super::{open_locked, push_extent, Extent, ExtentKind, FileId, OpenOptions};
use crate::error::{Error, Result};
use crate::format::qcow2::{
    decode_l1, decode_l2, peek_cluster_bits, ClusterMapping, Compression, Qcow2Header,
    SUBCLUSTERS_PER_CLUSTER, V2_HEADER_LENGTH,
};
use crate::format::BackingFormat;
use crate::storage::file_size;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// L2 tables kept in memory: at most this many, and at most [`L2_CACHE_BYTES`] of them.
const L2_CACHE_TABLES: usize = 32;
const L2_CACHE_BYTES: u64 = 16 << 20;
/// qemu's bound on the refcount table (QCOW_MAX_REFTABLE_SIZE).
const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;
/// A zstd frame may ask for a window up to this size; qemu compresses one cluster (at most
/// 2 MiB) per frame, so a larger window is damage, not data.
const MAX_ZSTD_WINDOW: u64 = 8 << 20;

/// A file that holds guest data: the image itself or its external data file.
struct DataFile {
    path: PathBuf,
    file: File,
    len: u64,
}

pub struct Qcow2 {
    path: PathBuf,
    file: File,
    file_len: u64,
    id: FileId,
    header: Qcow2Header,
    l1: Vec<u64>,
    /// The external data file, when the image has one.
    data_file: Option<DataFile>,
    /// The backing file's name and format as recorded (no format: probed when opened).
    backing_recorded: Option<(String, Option<BackingFormat>)>,
    backing: Option<Layer>,
    l2_cache: Mutex<Vec<(u64, Arc<[u64]>)>>,
    l2_cache_tables: usize,
    /// The last decompressed cluster (by its L2 entry's offset): reads smaller than a
    /// cluster would otherwise decompress it again for each piece.
    last_compressed: Mutex<Option<(u64, Arc<[u8]>)>>,
}

/// Where a range of guest bytes comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece {
    /// At this offset of the data file.
    Data(u64),
    Zero,
    /// Inside the compressed cluster starting at guest offset `cluster`.
    Compressed {
        offset: u64,
        len: u64,
        cluster: u64,
    },
    Backing,
}

impl Qcow2 {
    /// Opens a qcow2 file read-only, below the files `above` (top first), with its backing
    /// chain unless `opts.without_backing`. A file without the qcow2 magic is refused naming
    /// what it is; below another file (`above` not empty), as recorded in that file.
    pub(crate) fn open_below(path: &Path, opts: &OpenOptions, above: &ChainAbove) -> Result<Self> {
        check_chain(path, super::stat_openable(path)?, above)?;
        // Always read-only (and so a shared lock): cowimg never writes into a qcow2 file.
        let (file, id) = open_locked(path, false, opts.force_share)?;
        check_chain(path, id, above)?;
        let file_len = file_size(&file).map_err(|source| Error::File {
            path: path.into(),
            op: "reading the size",
            source,
        })?;
        let read = |buf: &mut [u8], offset: u64, what| {
            file.read_exact_at(buf, offset).map_err(|source| Error::Io {
                path: path.into(),
                op: what,
                offset,
                source,
            })
        };
        let corrupt_header = |source| Error::Corrupt {
            path: path.into(),
            structure: "qcow2 header",
            offset: 0,
            source,
        };
        let mut start = vec![0u8; (V2_HEADER_LENGTH as u64).min(file_len) as usize];
        read(&mut start, 0, "reading the header")?;
        if !crate::format::qcow2::has_magic(&start) {
            let role = if above.is_empty() {
                "is not a qcow2 image"
            } else {
                "is recorded as qcow2 but has no qcow2 header"
            };
            return Err(Error::Invalid {
                path: path.into(),
                reason: format!("{role} ({})", super::layer::describe_content(&start)),
            });
        }
        let cluster_bits = peek_cluster_bits(&start).map_err(corrupt_header)?;
        let mut first = vec![0u8; (1u64 << cluster_bits).min(file_len) as usize];
        read(&mut first, 0, "reading the header")?;
        let header = Qcow2Header::from_first_cluster(&first, file_len).map_err(corrupt_header)?;
        drop(first);

        // The L1 table: bounded by the file's length and 32 MiB (checked in the header).
        let mut raw_l1 = vec![0u8; header.l1_size as usize * 8];
        read(&mut raw_l1, header.l1_table_offset, "reading the L1 table")?;
        let l1: Vec<u64> = raw_l1
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or_default()))
            .collect();
        drop(raw_l1);
        check_refcount_table(path, &file, file_len, &header)?;

        let data_file = match &header.data_file {
            Some(name) => {
                let resolved = super::resolve_backing_path(path, name);
                // Named from the qcow2, whose header names the data file.
                let (file, _) = open_locked(&resolved, false, opts.force_share).map_err(|e| {
                    Error::Invalid {
                        path: path.into(),
                        reason: format!("external data file: {e}"),
                    }
                })?;
                let len = file_size(&file).map_err(|source| Error::File {
                    path: resolved.clone(),
                    op: "reading the size",
                    source,
                })?;
                Some(DataFile {
                    path: resolved,
                    file,
                    len,
                })
            }
            None => None,
        };
        let l2_cache_tables =
            (L2_CACHE_BYTES / header.cluster_size()).clamp(1, L2_CACHE_TABLES as u64) as usize;
        let mut image = Qcow2 {
            path: path.into(),
            file,
            file_len,
            id,
            header,
            l1,
            data_file,
            backing_recorded: None,
            backing: None,
            l2_cache: Mutex::new(Vec::new()),
            l2_cache_tables,
            last_compressed: Mutex::new(None),
        };
        if let Some((name, format)) = image.header.backing.clone() {
            let resolved = super::resolve_backing_path(path, &name);
            let recorded = match format.as_deref() {
                Some(name) => Some(BackingFormat::parse(name).ok_or_else(|| Error::Invalid {
                    path: path.into(),
                    reason: format!(
                        "backing file {} has format '{name}', which cowimg does not read (raw, qcow2, cowimg)",
                        resolved.display()
                    ),
                })?),
                None => None,
            };
            image.backing_recorded = Some((name, recorded));
            if !opts.without_backing {
                let backing_opts = OpenOptions {
                    read_only: true,
                    writable_backing: false,
                    ..opts.clone()
                };
                let mut chain = above.to_vec();
                chain.push((path.to_path_buf(), id));
                // Checked before the probe opens it, as every file of a chain is.
                check_chain(&resolved, super::stat_openable(&resolved)?, &chain)?;
                // Without the backing format extension qemu probes the backing file, and so
                // does this (qcow2 or raw only); the format cowimg records is never probed.
                let format = match recorded {
                    Some(format) => format,
                    None => probe_qcow2_or_raw(&resolved)?,
                };
                image.backing = Some(Layer::open_below(&resolved, format, &backing_opts, &chain)?);
            }
        }
        Ok(image)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The size qemu reads: whole 512-byte sectors of the header's size (qemu keeps a
    /// qcow2's size in sectors and drops a partial last one).
    pub fn virtual_size(&self) -> u64 {
        self.header.size / 512 * 512
    }
    pub fn header(&self) -> &Qcow2Header {
        &self.header
    }
    pub fn identity(&self) -> FileId {
        self.id
    }
    pub fn backing(&self) -> Option<&Layer> {
        self.backing.as_ref()
    }
    /// The backing file's name and format as recorded in the header (a qcow2 without the
    /// backing format extension records none).
    pub fn backing_recorded(&self) -> Option<&(String, Option<BackingFormat>)> {
        self.backing_recorded.as_ref()
    }
    /// The external data file's path, resolved.
    pub fn data_file_path(&self) -> Option<&Path> {
        self.data_file.as_ref().map(|d| d.path.as_path())
    }
    /// Bytes of the file on disk, for `info`.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    fn corrupt(&self, reason: String) -> Error {
        Error::Inconsistent {
            path: self.path.clone(),
            reason,
        }
    }

    /// The L2 table at `offset` (checked by the caller), from the cache or the file.
    fn l2_table(&self, offset: u64) -> Result<Arc<[u64]>> {
        {
            let mut cache = self.l2_cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = cache.iter().position(|(o, _)| *o == offset) {
                let hit = cache.remove(i);
                let table = hit.1.clone();
                cache.push(hit);
                return Ok(table);
            }
        }
        let mut raw = vec![0u8; self.header.cluster_size() as usize];
        self.file
            .read_exact_at(&mut raw, offset)
            .map_err(|source| Error::Io {
                path: self.path.clone(),
                op: "reading an L2 table",
                offset,
                source,
            })?;
        let table: Arc<[u64]> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or_default()))
            .collect();
        let mut cache = self.l2_cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= self.l2_cache_tables {
            cache.remove(0);
        }
        cache.push((offset, table.clone()));
        Ok(table)
    }

    /// The L2 table that maps guest cluster `cluster` and its offset, or `None` when its L1
    /// entry is unallocated.
    fn l2_for(&self, cluster: u64) -> Result<Option<(Arc<[u64]>, u64)>> {
        let l1_index = cluster / self.header.l2_entries();
        let Some(&entry) = self.l1.get(l1_index as usize) else {
            return Ok(None);
        };
        let entry_at = self.header.l1_table_offset + l1_index * 8;
        let l2_offset = decode_l1(entry, self.header.cluster_size()).map_err(|e| {
            self.corrupt(format!("L1 entry {l1_index} at offset {entry_at:#x}: {e}"))
        })?;
        let Some(l2_offset) = l2_offset else {
            return Ok(None);
        };
        if l2_offset
            .checked_add(self.header.cluster_size())
            .is_none_or(|end| end > self.file_len)
        {
            return Err(self.corrupt(format!(
                "L1 entry {l1_index} at offset {entry_at:#x}: L2 table at {l2_offset:#x} goes past the end of the file ({:#x} bytes)",
                self.file_len
            )));
        }
        Ok(Some((self.l2_table(l2_offset)?, l2_offset)))
    }

    /// The mapping of guest cluster `cluster`, whose L2 table is `table` at `l2_offset`.
    fn mapping(&self, cluster: u64, table: &[u64], l2_offset: u64) -> Result<ClusterMapping> {
        let index = (cluster % self.header.l2_entries()) as usize;
        let words = (self.header.l2_entry_size() / 8) as usize;
        let entry = table[index * words];
        let bitmap = (words == 2).then(|| table[index * 2 + 1]);
        let entry_at = l2_offset + index as u64 * self.header.l2_entry_size();
        let at = |e: String| self.corrupt(format!("L2 entry at offset {entry_at:#x}: {e}"));
        let mapping = decode_l2(entry, bitmap, &self.header).map_err(at)?;
        let host = match mapping {
            ClusterMapping::Data(h) => Some(h),
            // A host cluster whose sub-clusters are all zero or unallocated is never read.
            ClusterMapping::Subclusters {
                host, allocated, ..
            } if allocated != 0 => host,
            ClusterMapping::Compressed { offset, .. } => {
                if offset >= self.file_len {
                    return Err(at(format!(
                        "compressed cluster at {offset:#x} is past the end of the file ({:#x} bytes)",
                        self.file_len
                    )));
                }
                None
            }
            _ => None,
        };
        // Data in the image's own file must start inside it; an external data file may be
        // shorter than what it maps (its missing tail reads as zeros, as a raw file's does).
        if let (Some(h), None) = (host, &self.data_file) {
            if h >= self.file_len {
                return Err(at(format!(
                    "data cluster at {h:#x} is past the end of the file ({:#x} bytes)",
                    self.file_len
                )));
            }
        }
        Ok(mapping)
    }

    /// Calls `f(start, len, piece)` for consecutive pieces that cover `[offset, offset+len)`
    /// (inside the virtual size).
    fn for_each_piece(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, u64, Piece) -> Result<()>,
    ) -> Result<()> {
        let cluster_size = self.header.cluster_size();
        let l2_span = cluster_size * self.header.l2_entries();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let cluster = pos / cluster_size;
            let cluster_start = cluster * cluster_size;
            // A whole unallocated L2 range is one piece, however large.
            let Some((table, l2_offset)) = self.l2_for(cluster)? else {
                let span_end = ((pos / l2_span) + 1).saturating_mul(l2_span).min(end);
                f(pos, span_end - pos, Piece::Backing)?;
                pos = span_end;
                continue;
            };
            let cluster_end = (cluster_start + cluster_size).min(end);
            match self.mapping(cluster, &table, l2_offset)? {
                ClusterMapping::Unallocated => f(pos, cluster_end - pos, Piece::Backing)?,
                ClusterMapping::Zero => f(pos, cluster_end - pos, Piece::Zero)?,
                ClusterMapping::Data(h) => f(
                    pos,
                    cluster_end - pos,
                    Piece::Data(h + (pos - cluster_start)),
                )?,
                ClusterMapping::Compressed { offset, len } => f(
                    pos,
                    cluster_end - pos,
                    Piece::Compressed {
                        offset,
                        len,
                        cluster: cluster_start,
                    },
                )?,
                ClusterMapping::Subclusters {
                    host,
                    allocated,
                    zero,
                } => {
                    let sub = cluster_size / SUBCLUSTERS_PER_CLUSTER as u64;
                    while pos < cluster_end {
                        let i = (pos - cluster_start) / sub;
                        let sub_end = (cluster_start + (i + 1) * sub).min(cluster_end);
                        let piece = if allocated & (1 << i) != 0 {
                            // decode_l2 refuses allocated bits without a host cluster.
                            Piece::Data(host.unwrap_or(0) + (pos - cluster_start))
                        } else if zero & (1 << i) != 0 {
                            Piece::Zero
                        } else {
                            Piece::Backing
                        };
                        f(pos, sub_end - pos, piece)?;
                        pos = sub_end;
                    }
                }
            }
            pos = cluster_end;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`, which lie inside the virtual size.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        // Data pieces that follow each other in the data file are read with one pread:
        // (guest start, length, host offset) of the run not read yet.
        let mut run: Option<(u64, u64, u64)> = None;
        self.for_each_piece(offset, buf.len() as u64, |start, len, piece| {
            if let Piece::Data(host) = piece {
                match &mut run {
                    Some((s, l, h)) if *s + *l == start && *h + *l == host => *l += len,
                    _ => {
                        if let Some((s, l, h)) = run.replace((start, len, host)) {
                            let at = (s - offset) as usize;
                            self.read_data(&mut buf[at..at + l as usize], h)?;
                        }
                    }
                }
                return Ok(());
            }
            let out = &mut buf[(start - offset) as usize..(start - offset + len) as usize];
            match piece {
                Piece::Data(_) => {}
                Piece::Zero => out.fill(0),
                Piece::Backing => match &self.backing {
                    Some(b) => b.read_at(out, start)?,
                    None => out.fill(0),
                },
                Piece::Compressed {
                    offset: c_offset,
                    len: c_len,
                    cluster,
                } => {
                    let plain = self.decompressed(c_offset, c_len)?;
                    let from = (start - cluster) as usize;
                    out.copy_from_slice(&plain[from..from + out.len()]);
                }
            }
            Ok(())
        })?;
        if let Some((s, l, h)) = run {
            let at = (s - offset) as usize;
            self.read_data(&mut buf[at..at + l as usize], h)?;
        }
        Ok(())
    }

    /// Reads guest data from the data file; bytes past its end read as zeros.
    fn read_data(&self, out: &mut [u8], host: u64) -> Result<()> {
        let (path, file, len) = match &self.data_file {
            Some(d) => (&d.path, &d.file, d.len),
            None => (&self.path, &self.file, self.file_len),
        };
        let avail = len.saturating_sub(host).min(out.len() as u64) as usize;
        file.read_exact_at(&mut out[..avail], host)
            .map_err(|source| Error::Io {
                path: path.clone(),
                op: "reading data",
                offset: host,
                source,
            })?;
        out[avail..].fill(0);
        Ok(())
    }

    /// The plain bytes of the compressed cluster whose data is `len` bytes at `offset`.
    fn decompressed(&self, offset: u64, len: u64) -> Result<Arc<[u8]>> {
        {
            let last = self
                .last_compressed
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some((o, plain)) = last.as_ref() {
                if *o == offset {
                    return Ok(plain.clone());
                }
            }
        }
        // `len` is at most two clusters (the sector count field has cluster_bits - 8 bits),
        // and is cut at the end of the file: the last compressed cluster may end mid-sector.
        let len = len.min(self.file_len - offset);
        let mut input = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut input, offset)
            .map_err(|source| Error::Io {
                path: self.path.clone(),
                op: "reading a compressed cluster",
                offset,
                source,
            })?;
        let mut plain = vec![0u8; self.header.cluster_size() as usize];
        let result = match self.header.compression {
            Compression::Zlib => inflate_raw(&input, &mut plain),
            Compression::Zstd => unzstd(&input, &mut plain),
        };
        result.map_err(|e| {
            self.corrupt(format!(
                "compressed cluster at offset {offset:#x} ({len} bytes) does not decompress to a cluster: {e}"
            ))
        })?;
        let plain: Arc<[u8]> = plain.into();
        *self
            .last_compressed
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some((offset, plain.clone()));
        Ok(plain)
    }

    /// Appends the status of `[offset, offset + len)` (inside the virtual size), with
    /// `depth` this image's index in the chain; its backing file is `depth + 1`.
    pub fn status(&self, offset: u64, len: u64, depth: u32, out: &mut Vec<Extent>) -> Result<()> {
        self.for_each_piece(offset, len, |start, length, piece| {
            let (kind, host_offset, compressed) = match piece {
                Piece::Data(h) => (ExtentKind::Data, Some(h), false),
                Piece::Compressed { .. } => (ExtentKind::Data, None, true),
                Piece::Zero => (ExtentKind::Zero, None, false),
                Piece::Backing => {
                    if let Some(b) = &self.backing {
                        return b.status(start, length, depth + 1, out);
                    }
                    (ExtentKind::Unallocated, None, false)
                }
            };
            push_extent(
                out,
                Extent {
                    offset: start,
                    length,
                    depth,
                    kind,
                    host_offset,
                    compressed,
                },
            );
            Ok(())
        })
    }
}

/// Inflates a raw deflate stream (qcow2's zlib type has no zlib header) into exactly
/// `out.len()` bytes. As qemu does, the output must be full; what follows the stream in the
/// last sector is ignored.
fn inflate_raw(input: &[u8], out: &mut [u8]) -> std::result::Result<(), String> {
    use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
    use miniz_oxide::inflate::TINFLStatus;
    let mut state = DecompressorOxide::new();
    let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
    let (status, _, written) = decompress(&mut state, input, out, 0, flags);
    match status {
        TINFLStatus::Failed | TINFLStatus::BadParam | TINFLStatus::Adler32Mismatch => {
            Err(format!("invalid deflate data ({status:?})"))
        }
        _ if written == out.len() => Ok(()),
        _ => Err(format!("{written} bytes instead of {}", out.len())),
    }
}

/// Decodes a zstd frame into exactly `out.len()` bytes.
fn unzstd(input: &[u8], out: &mut [u8]) -> std::result::Result<(), String> {
    use std::io::Read;
    let mut decoder =
        ruzstd::decoding::StreamingDecoder::new_with_max_window_size(input, MAX_ZSTD_WINDOW)
            .map_err(|e| format!("invalid zstd frame: {e}"))?;
    decoder
        .read_exact(out)
        .map_err(|e| format!("invalid zstd data: {e}"))
}

/// Checks the refcount table without keeping it: every block it names is aligned, inside
/// the file, outside the header, and not the refcount table itself (a loop). The table is
/// read one cluster at a time; its size is bounded by the file and by qemu's 8 MiB.
fn check_refcount_table(path: &Path, file: &File, file_len: u64, h: &Qcow2Header) -> Result<()> {
    let cluster_size = h.cluster_size();
    let table = h.refcount_table_offset;
    let table_len = (h.refcount_table_clusters as u64) << h.cluster_bits;
    let corrupt = |reason: String| Error::Inconsistent {
        path: path.into(),
        reason,
    };
    if table_len > MAX_REFCOUNT_TABLE_BYTES {
        return Err(corrupt(format!(
            "refcount table at offset {table:#x}: {table_len:#x} bytes exceed qemu's bound of {MAX_REFCOUNT_TABLE_BYTES:#x}"
        )));
    }
    let mut chunk = vec![0u8; cluster_size as usize];
    for c in 0..h.refcount_table_clusters as u64 {
        let at = table + c * cluster_size;
        file.read_exact_at(&mut chunk, at)
            .map_err(|source| Error::Io {
                path: path.into(),
                op: "reading the refcount table",
                offset: at,
                source,
            })?;
        for (i, word) in chunk.chunks_exact(8).enumerate() {
            let entry = u64::from_be_bytes(word.try_into().unwrap_or_default());
            let entry_at = at + i as u64 * 8;
            if entry == 0 {
                continue;
            }
            let problem = if !entry.is_multiple_of(cluster_size) {
                Some("is not aligned to the cluster size".to_string())
            } else if entry < cluster_size {
                Some("points into the header (cluster 0)".to_string())
            } else if entry.checked_add(cluster_size).is_none_or(|e| e > file_len) {
                Some(format!("is past the end of the file ({file_len:#x} bytes)"))
            } else if (table..table + table_len).contains(&entry) {
                Some("points into the refcount table itself (a refcount loop)".to_string())
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(corrupt(format!(
                    "refcount table entry at offset {entry_at:#x}: refcount block {entry:#x} {problem}"
                )));
            }
        }
    }
    Ok(())
}

/// What qemu does for a backing file without a recorded format: qcow2 if it starts with the
/// qcow2 magic, else raw.
fn probe_qcow2_or_raw(path: &Path) -> Result<BackingFormat> {
    let (file, _) = super::open_checked(path, false)?;
    let mut magic = [0u8; 4];
    let is_qcow2 =
        file.read_exact_at(&mut magic, 0).is_ok() && crate::format::qcow2::has_magic(&magic);
    Ok(if is_qcow2 {
        BackingFormat::Qcow2
    } else {
        BackingFormat::Raw
    })
}
