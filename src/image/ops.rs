//! Whole-image operations built on the image API: commit, rebase, convert, check.
use super::resolve_backing_path;
use super::v1::load;
use super::{ExtentKind, Image, Layer, OpenOptions, Source};
use crate::error::{Error, Result};
use crate::format::{header::MAGIC, BackingFormat};
use crate::storage::{FileStorage, Storage};
use std::fs::{File, OpenOptions as FsOpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Progress callback: (bytes done, bytes total).
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// Data is copied in chunks of this size: large enough that per-call costs vanish, small
/// enough to stay far from the memory budget.
const COPY_CHUNK: usize = 4 << 20;
/// Granularity at which copies look for zeros (to leave holes) and for differences.
const SCAN_BLOCK: usize = 4096;

#[derive(Debug, Clone, Default)]
pub struct CommitStats {
    pub bytes_written: u64,
    pub bytes_zeroed: u64,
}

/// Writes the overlay's data and zero markers into its backing file (opened writable, see
/// [`OpenOptions::writable_backing`]), flushes the backing file, then empties the overlay
/// unless `keep_overlay`. The overlay keeps reading the same throughout, so running it again
/// after an interruption completes it.
pub fn commit(image: &Image, keep_overlay: bool, progress: Progress) -> Result<CommitStats> {
    let backing = image.backing().ok_or_else(|| Error::Invalid {
        path: image.path().into(),
        reason: "has no backing file to commit into".into(),
    })?;
    // Refused before anything is written: cowimg never writes into a qcow2 file.
    if let Layer::Qcow2(q) = backing {
        return Err(Error::Invalid {
            path: q.path().into(),
            reason: super::layer::QCOW2_WRITE_REFUSED.into(),
        });
    }
    if backing.size() < image.virtual_size() {
        return Err(Error::Invalid {
            path: backing.path().into(),
            reason: format!(
                "backing file ({} bytes) is smaller than the overlay ({} bytes)",
                backing.size(),
                image.virtual_size()
            ),
        });
    }
    let mut runs = image.own_runs()?;
    // Data is copied in the order it lies in the image file, so that reading it streams
    // (the kernel reads ahead) however scattered the guest wrote it; the backing file takes
    // the writes in its page cache in any order. Zero runs go first, in virtual order.
    runs.sort_by_key(|&(start, _, src)| match src {
        Source::Host(h) => (1, h),
        _ => (0, start),
    });
    let total: u64 = runs.iter().map(|r| r.1).sum();
    let mut stats = CommitStats::default();
    let mut done = 0;
    progress(0, total);
    let mut chunks = Vec::new();
    for &(start, length, src) in &runs {
        match src {
            Source::Zero => {
                backing.write_zeroes(start, length)?;
                stats.bytes_zeroed += length;
                done += length;
                progress(done, total);
            }
            Source::Host(host) => {
                chunks.extend(split_copy(host, start, length));
                stats.bytes_written += length;
            }
            Source::Backing => unreachable!("own_runs leaves out what falls through"),
        }
    }
    let mut read_ahead = ReadAhead::new(&runs);
    copy_overlapped(
        backing.path(),
        chunks,
        |buf, at| {
            read_ahead.advance(image, at);
            image
                .storage()
                .read_at(buf, at)
                .map_err(|e| image.io_err("reading", at, e))?;
            if !keep_overlay {
                // The overlay lets go of this data at the end; dropping its cached pages
                // now, while the other thread writes, spares the final truncate that work.
                image.storage().wont_need(at, buf.len() as u64);
            }
            Ok(())
        },
        |buf, pos| {
            backing.write_at(buf, pos)?;
            backing.start_writeback(pos, buf.len() as u64);
            Ok(())
        },
        |n| {
            done += n;
            progress(done, total);
        },
    )?;
    // The backing file must hold everything before the overlay lets go of it.
    backing.flush()?;
    if !keep_overlay {
        image.clear()?;
    }
    Ok(stats)
}

/// One piece of a copy: `len` bytes read at `from` are written at `to`.
#[derive(Debug, Clone, Copy)]
struct CopyChunk {
    from: u64,
    to: u64,
    len: usize,
}

/// The `COPY_CHUNK`-sized pieces of a run of `length` bytes read at `from`, written at `to`.
fn split_copy(from: u64, to: u64, length: u64) -> impl Iterator<Item = CopyChunk> {
    (0..length.div_ceil(COPY_CHUNK as u64)).map(move |i| {
        let skip = i * COPY_CHUNK as u64;
        CopyChunk {
            from: from + skip,
            to: to + skip,
            len: (length - skip).min(COPY_CHUNK as u64) as usize,
        }
    })
}

/// Copies `chunks` with reading (on this thread) and writing (on a second one) overlapped:
/// two buffers circulate between them, so the disk always has a read and a write to do.
/// `copied` hears the length of each chunk once it has been read. The first error stops
/// both sides and is returned (a read error before a write error).
fn copy_overlapped(
    dst: &Path,
    chunks: impl IntoIterator<Item = CopyChunk>,
    mut read: impl FnMut(&mut [u8], u64) -> Result<()>,
    write: impl Fn(&[u8], u64) -> Result<()> + Sync,
    mut copied: impl FnMut(u64),
) -> Result<()> {
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<(u64, Vec<u8>)>(1);
    let (empty_tx, empty_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(2);
    for _ in 0..2 {
        empty_tx
            .send(Vec::with_capacity(COPY_CHUNK))
            .expect("the channel holds two buffers");
    }
    let write = &write;
    std::thread::scope(|scope| -> Result<()> {
        // The writer owns the sending side of the empty buffers: when it stops on an error,
        // the reader's wait for a buffer ends instead of hanging.
        let writer = scope.spawn(move || -> Result<()> {
            for (to, buf) in full_rx {
                write(&buf, to)?;
                // The reader may have stopped on an error; then nobody takes the buffer back.
                let _ = empty_tx.send(buf);
            }
            Ok(())
        });
        let read = (|| -> Result<()> {
            for chunk in chunks {
                let Ok(mut buf) = empty_rx.recv() else {
                    return Ok(()); // the writer failed; its error is reported below
                };
                buf.resize(chunk.len, 0);
                read(&mut buf, chunk.from)?;
                if full_tx.send((chunk.to, buf)).is_err() {
                    return Ok(());
                }
                copied(chunk.len as u64);
            }
            Ok(())
        })();
        drop(full_tx);
        let written = writer.join().unwrap_or_else(|_| {
            Err(Error::Io {
                path: dst.into(),
                op: "writing",
                offset: 0,
                source: std::io::Error::other("the writer thread panicked"),
            })
        });
        read.and(written)
    })
}

/// Asks the kernel to read the image's data runs ahead of a copy that walks them in host
/// order, so that the disk has many reads in flight instead of one.
struct ReadAhead {
    runs: Vec<(u64, u64)>,
    next: usize,
    /// Bytes hinted beyond the copy's position.
    hinted_to: u64,
}

impl ReadAhead {
    const WINDOW: u64 = 64 << 20;

    fn new(runs: &[(u64, u64, Source)]) -> Self {
        let runs = runs
            .iter()
            .filter_map(|&(_, len, src)| match src {
                Source::Host(h) => Some((h, len)),
                _ => None,
            })
            .collect();
        ReadAhead {
            runs,
            next: 0,
            hinted_to: 0,
        }
    }

    /// The copy reads at host offset `at`: hint the runs up to a window beyond it.
    fn advance(&mut self, image: &Image, at: u64) {
        while self.next < self.runs.len() && self.hinted_to < at + Self::WINDOW {
            let (h, len) = self.runs[self.next];
            image.storage().will_need(h, len);
            self.hinted_to = h + len;
            self.next += 1;
        }
    }
}

/// Changes the backing file. Safe mode (`pointer_only == false`) first copies into the
/// overlay every fall-through range where the old and new backing files differ, so that the
/// image reads the same afterwards. `None` removes the backing file.
pub fn rebase(
    image: &mut Image,
    new_backing: Option<(String, BackingFormat)>,
    pointer_only: bool,
    progress: Progress,
) -> Result<()> {
    let ro = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let new_layer = match &new_backing {
        // The new chain must not lead back to the image itself.
        Some((recorded, fmt)) => Some(Layer::open_below(
            &resolve_backing_path(image.path(), recorded),
            *fmt,
            &ro,
            &image
                .identity()
                .map(|id| (image.path().to_path_buf(), id))
                .into_iter()
                .collect::<Vec<_>>(),
        )?),
        None => None,
    };
    if !pointer_only {
        let runs = image.fall_through_runs()?;
        let total: u64 = runs.iter().map(|r| r.1).sum();
        let mut done = 0;
        let mut old = vec![0u8; COPY_CHUNK];
        let mut new = vec![0u8; COPY_CHUNK];
        progress(0, total);
        for (start, length) in runs {
            let mut pos = start;
            while pos < start + length {
                let n = (start + length - pos).min(COPY_CHUNK as u64) as usize;
                read_or_zero(image.backing(), &mut old[..n], pos)?;
                read_or_zero(new_layer.as_ref(), &mut new[..n], pos)?;
                for (off, len) in differing_spans(&old[..n], &new[..n]) {
                    image.write_at(&old[off..off + len], pos + off as u64)?;
                }
                pos += n as u64;
                done += n as u64;
                progress(done, total);
            }
        }
        image.flush()?;
    }
    image.set_backing(
        new_backing
            .zip(new_layer)
            .map(|((path, _), layer)| (path, layer)),
    )
}

fn read_or_zero(layer: Option<&Layer>, buf: &mut [u8], offset: u64) -> Result<()> {
    match layer {
        Some(l) => l.read_at(buf, offset),
        None => {
            buf.fill(0);
            Ok(())
        }
    }
}

/// Spans (offset, length) of `SCAN_BLOCK` granularity where `a` and `b` differ, merged.
fn differing_spans(a: &[u8], b: &[u8]) -> Vec<(usize, usize)> {
    let mut spans: Vec<(usize, usize)> = Vec::new();
    for (i, (x, y)) in a.chunks(SCAN_BLOCK).zip(b.chunks(SCAN_BLOCK)).enumerate() {
        if x != y {
            let off = i * SCAN_BLOCK;
            match spans.last_mut() {
                Some((s, l)) if *s + *l == off => *l += x.len(),
                _ => spans.push((off, x.len())),
            }
        }
    }
    spans
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Raw,
    Cowimg,
    Qcow2,
}

#[derive(Debug, Clone)]
pub struct ConvertOptions {
    pub output: OutputFormat,
    /// For cowimg and qcow2 output: the new image's backing file (path as recorded,
    /// format); only what differs from it is stored.
    pub backing: Option<(String, BackingFormat)>,
    pub cluster_size: u64,
    /// Whether the output reaches the disk before convert returns.
    pub cache: CacheMode,
    /// Blocks of this many bytes that read as zeros are left as holes (qemu-img convert
    /// -S); 0 writes every byte, zeros included, so that the output is fully allocated.
    pub sparse_size: u64,
    /// Write into the existing `dst` instead of creating it (qemu-img convert -n): it must
    /// be at least as large as the source, and every range the source reads as zeros is
    /// zeroed in it.
    pub existing_target: bool,
    /// For cowimg output: the format version of the new image.
    pub version: u32,
}

/// qemu-img convert's default `-S`.
pub const DEFAULT_SPARSE_SIZE: u64 = 4096;

/// What convert does to make its output durable (qemu-img's `-t`, for the modes that
/// differ here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// The output is written back as the copy goes and synced (fdatasync) at the end.
    #[default]
    Writeback,
    /// No sync: the output may still be in the page cache when convert returns, so a crash
    /// soon after can lose it. Raw output only. This is qemu-img convert's default.
    Unsafe,
}

/// Opens a file given on the command line as a source: `format` if given, else cowimg or
/// qcow2 when the file starts with that format's magic, else raw (as qemu-img probes its inputs; backing
/// files, by contrast, are never probed).
pub fn open_source(path: &Path, format: Option<BackingFormat>) -> Result<Layer> {
    let format = match format {
        Some(f) => f,
        None => {
            let (file, _) = super::open_checked(path, false)?;
            let mut magic = [0u8; 8];
            let read = file.read_exact_at(&mut magic, 0).is_ok();
            if read && magic == MAGIC {
                BackingFormat::Cowimg
            } else if read && crate::format::qcow2::has_magic(&magic) {
                BackingFormat::Qcow2
            } else {
                BackingFormat::Raw
            }
        }
    };
    Layer::open(
        path,
        format,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
}

/// Copies the merged contents of `src` into a new file `dst` (replacing it if it exists).
pub fn convert(src: &Layer, dst: &Path, opts: &ConvertOptions, progress: Progress) -> Result<()> {
    let size = src.size();
    let mut extents = Vec::new();
    if size > 0 {
        src.status(0, size, 0, &mut extents)?;
    }
    if opts.sparse_size == 0 {
        // Fully allocated: every byte is copied, what reads as zeros included.
        extents = vec![super::Extent {
            offset: 0,
            length: size,
            depth: 0,
            kind: ExtentKind::Data,
            host_offset: Some(0),
            compressed: false,
        }];
        extents.retain(|e| e.length > 0);
    }
    let total = size;
    progress(0, total);
    match opts.output {
        OutputFormat::Raw => convert_to_raw(src, dst, size, &extents, opts, progress),
        OutputFormat::Cowimg => convert_to_cowimg(src, dst, size, &extents, opts, progress),
        OutputFormat::Qcow2 => convert_to_qcow2(src, dst, size, &extents, opts, progress),
    }
}

/// Opens the existing target of `convert -n` and checks that the source fits.
fn open_existing_target(dst: &Path, size: u64) -> Result<File> {
    let out = FsOpenOptions::new()
        .write(true)
        .open(dst)
        .map_err(|source| Error::File {
            path: dst.into(),
            op: "opening the existing target",
            source,
        })?;
    super::lock_file(&out, dst, true, false)?;
    let length = out
        .metadata()
        .map_err(|source| Error::File {
            path: dst.into(),
            op: "reading metadata",
            source,
        })?
        .len();
    if length < size {
        return Err(too_small(dst, length, size));
    }
    Ok(out)
}

/// Makes a range of a file read as zeros: a punched hole, or written zeros where the file
/// system cannot punch (a hole punch that is not supported must not leave old bytes).
fn zero_file_range(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    use std::os::unix::io::AsRawFd;
    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    match fallocate(file.as_raw_fd(), flags, offset as i64, len as i64) {
        Ok(()) => return Ok(()),
        Err(nix::errno::Errno::EOPNOTSUPP) => {}
        Err(e) => return Err(e.into()),
    }
    let zeros = vec![0u8; COPY_CHUNK];
    let mut pos = offset;
    while pos < offset + len {
        let n = (offset + len - pos).min(COPY_CHUNK as u64) as usize;
        file.write_all_at(&zeros[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

fn too_small(dst: &Path, length: u64, size: u64) -> Error {
    Error::Invalid {
        path: dst.into(),
        reason: format!(
            "the existing target is {length} bytes, smaller than the source ({size} bytes)"
        ),
    }
}

fn convert_to_qcow2(
    src: &Layer,
    dst: &Path,
    size: u64,
    extents: &[super::Extent],
    opts: &ConvertOptions,
    progress: Progress,
) -> Result<()> {
    let data_ranges: Vec<(u64, u64)> = extents
        .iter()
        .filter(|e| e.kind == ExtentKind::Data)
        .map(|e| (e.offset, e.length))
        .collect();
    let ro = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let base = match &opts.backing {
        Some((name, format)) => Some(Layer::open(&resolve_backing_path(dst, name), *format, &ro)?),
        None => None,
    };
    let out = super::qcow2_write::Qcow2Output {
        size,
        cluster_size: opts.cluster_size,
        data_ranges: &data_ranges,
        backing: match (&opts.backing, &base) {
            (Some((name, format)), Some(layer)) => Some((name.as_str(), *format, layer)),
            _ => None,
        },
    };
    super::qcow2_write::write_qcow2(src, dst, &out, progress)
}

fn convert_to_raw(
    src: &Layer,
    dst: &Path,
    size: u64,
    extents: &[super::Extent],
    opts: &ConvertOptions,
    progress: Progress,
) -> Result<()> {
    let cache = opts.cache;
    let existing = opts.existing_target;
    let out = if existing {
        open_existing_target(dst, size)?
    } else {
        FsOpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(dst)
            .map_err(|source| Error::File {
                path: dst.into(),
                op: "creating",
                source,
            })?
    };
    let io = |op, offset, source| Error::Io {
        path: dst.into(),
        op,
        offset,
        source,
    };
    // What the target held before must not show through where the source reads zeros.
    let punch = |offset: u64, len: u64| -> Result<()> {
        if len > 0 {
            zero_file_range(&out, offset, len).map_err(|e| io("zeroing", offset, e))?;
        }
        Ok(())
    };
    if existing {
        for e in extents.iter().filter(|e| e.kind != ExtentKind::Data) {
            punch(e.offset, e.length)?;
        }
    } else {
        out.set_len(size).map_err(|e| io("sizing", size, e))?;
    }
    let sparse_size = opts.sparse_size;
    // Data is read in the order it lies in its file (extents of the same layer by host
    // offset), so that reads stream; the output takes writes in any order.
    let mut data: Vec<&super::Extent> = extents
        .iter()
        .filter(|e| e.kind == ExtentKind::Data)
        .collect();
    data.sort_by_key(|e| (e.depth, e.host_offset.unwrap_or(e.offset)));
    let total: u64 = data.iter().map(|e| e.length).sum();
    let chunks = data
        .iter()
        .flat_map(|e| split_copy(e.offset, e.offset, e.length));
    let mut done = 0;
    copy_overlapped(
        dst,
        chunks,
        |buf, pos| src.read_at(buf, pos),
        |buf, pos| {
            // Blocks of zeros stay holes, as qemu-img convert -S leaves them.
            let mut written_to = 0;
            for (off, len) in spans_to_write(buf, sparse_size) {
                let at = pos + off as u64;
                if existing {
                    punch(pos + written_to as u64, (off - written_to) as u64)?;
                }
                out.write_all_at(&buf[off..off + len], at)
                    .map_err(|e| io("writing", at, e))?;
                written_to = off + len;
            }
            if existing {
                punch(pos + written_to as u64, (buf.len() - written_to) as u64)?;
            }
            if cache == CacheMode::Writeback {
                super::layer::start_writeback(&out, pos, buf.len() as u64);
            }
            Ok(())
        },
        |n| {
            done += n;
            progress(done, total);
        },
    )?;
    if cache == CacheMode::Writeback {
        out.sync_data().map_err(|e| io("syncing", 0, e))?;
    }
    progress(size, size);
    Ok(())
}

fn convert_to_cowimg(
    src: &Layer,
    dst: &Path,
    size: u64,
    extents: &[super::Extent],
    opts: &ConvertOptions,
    progress: Progress,
) -> Result<()> {
    if !opts.existing_target {
        if dst.exists() {
            std::fs::remove_file(dst).map_err(|source| Error::File {
                path: dst.into(),
                op: "replacing",
                source,
            })?;
        }
        let create = super::CreateOptions {
            size: Some(size),
            cluster_size: opts.cluster_size,
            backing: opts.backing.clone(),
            version: opts.version,
        };
        Image::create(dst, &create)?;
    }
    let out = Image::open(dst, &OpenOptions::default())?;
    if out.virtual_size() < size {
        return Err(too_small(dst, out.virtual_size(), size));
    }
    // An existing target's own contents must not show through where the source reads
    // zeros: it is zeroed like a backing file is masked.
    let existing = opts.existing_target;
    let base = out.backing();
    let masked = base.is_some() || existing;
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut base_buf = vec![0u8; COPY_CHUNK];
    for e in extents {
        let data = e.kind == ExtentKind::Data;
        if !data && existing {
            out.write_zeroes(e.offset, e.length)?;
            progress(e.offset + e.length, size);
            continue;
        }
        if !data && !masked {
            continue; // reads as zeros already
        }
        let mut pos = e.offset;
        while pos < e.offset + e.length {
            let n = (e.offset + e.length - pos).min(COPY_CHUNK as u64) as usize;
            if data {
                src.read_at(&mut buf[..n], pos)?;
            } else {
                buf[..n].fill(0);
            }
            let spans = match base {
                // Store only what differs from the backing file.
                Some(b) if !existing => {
                    read_or_zero(Some(b), &mut base_buf[..n], pos)?;
                    differing_spans(&buf[..n], &base_buf[..n])
                }
                // Everything, so that the target's old bytes are replaced.
                _ if existing => vec![(0, n)],
                _ => spans_to_write(&buf[..n], opts.sparse_size),
            };
            for (off, len) in spans {
                let chunk = &buf[off..off + len];
                let at = pos + off as u64;
                if chunk.iter().all(|&b| b == 0) && opts.sparse_size != 0 {
                    out.write_zeroes(at, len as u64)?;
                } else {
                    out.write_at(chunk, at)?;
                }
            }
            pos += n as u64;
            progress(pos, size);
        }
    }
    out.flush()?;
    progress(size, size);
    Ok(())
}

/// The spans of `buf` to write: all of it when `sparse_size` is 0, else every block of
/// `sparse_size` bytes that holds a non-zero byte, merged.
fn spans_to_write(buf: &[u8], sparse_size: u64) -> Vec<(usize, usize)> {
    if sparse_size == 0 {
        return vec![(0, buf.len())];
    }
    let block_size = usize::try_from(sparse_size).unwrap_or(usize::MAX);
    let mut spans: Vec<(usize, usize)> = Vec::new();
    for (i, block) in buf.chunks(block_size).enumerate() {
        if block.iter().any(|&b| b != 0) {
            let off = i * block_size;
            match spans.last_mut() {
                Some((s, l)) if *s + *l == off => *l += block.len(),
                _ => spans.push((off, block.len())),
            }
        }
    }
    spans
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CheckReport {
    pub filename: String,
    /// Each problem that makes data unreadable or wrong, with its offset.
    pub corruptions: Vec<String>,
    /// Host clusters that hold bytes on disk but are referenced by nothing.
    pub leaks: u64,
    pub leaks_fixed: u64,
    /// Header slots that fail their checksum: what a torn header write leaves behind. Not
    /// corruption; the next checkpoint rewrites the slot.
    pub stale_header_slots: Vec<usize>,
    pub allocated_clusters: u64,
    pub total_clusters: u64,
    pub image_end_offset: u64,
    /// Version 2: bytes of header slots, map pages and the journal, apart from the data.
    pub metadata_bytes: u64,
    /// The format version checked.
    pub version: u32,
}

/// `check` of a version-2 image: its tree walked, its space split into data, metadata and
/// leaks (FORMAT-v2.md, "Opening").
fn check_v2(storage: FileStorage, path: &Path, repair: bool) -> Result<CheckReport> {
    let mut report = CheckReport {
        filename: path.display().to_string(),
        version: 2,
        ..Default::default()
    };
    let image = match super::v2::ImageV2::open_storage(
        std::sync::Arc::new(storage),
        path,
        !repair,
        std::sync::Arc::new(super::v2::PageCache::new(super::v2::DEFAULT_CACHE_SIZE)),
    ) {
        Ok(image) => image,
        Err(e @ (Error::Corrupt { .. } | Error::Inconsistent { .. })) => {
            report.corruptions.push(e.to_string());
            return Ok(report);
        }
        Err(e) => return Err(e),
    };
    let r = super::v2::check(&image, repair)?;
    report.corruptions = r.corruptions;
    report.leaks = r.leaked_blocks;
    report.leaks_fixed = r.leaks_fixed;
    report.allocated_clusters = r.data_blocks;
    report.total_clusters = r.virtual_blocks;
    report.image_end_offset = r.file_length;
    report.metadata_bytes = r.metadata_blocks * crate::format::v2::BLOCK;
    Ok(report)
}

/// Verifies every checksum and every map entry of the image at `path`. With `repair`,
/// punches leaked clusters. Errors are only for files that cannot be read at all.
pub fn check(path: &Path, repair: bool) -> Result<CheckReport> {
    check_with(path, repair, false, &mut |_, _| {})
}

/// [`check`], optionally without taking the file lock (`qemu-img check -U`), calling
/// `progress(bytes scanned, file length)` as the scan for leaks goes through the file.
pub fn check_with(
    path: &Path,
    repair: bool,
    force_share: bool,
    progress: Progress,
) -> Result<CheckReport> {
    let (file, _) = super::open_locked(path, repair, force_share && !repair)?;
    let storage = FileStorage::new(file);
    if let Ok((_, super::v2::Slot::V2(_))) = super::v2::current_slot(&storage, path) {
        return check_v2(storage, path, repair);
    }
    let mut report = CheckReport {
        filename: path.display().to_string(),
        version: 1,
        ..Default::default()
    };
    let loaded = match load(&storage, path) {
        Ok(l) => l,
        Err(e @ (Error::Corrupt { .. } | Error::Inconsistent { .. })) => {
            report.corruptions.push(e.to_string());
            return Ok(report);
        }
        Err(e) => return Err(e),
    };
    let g = loaded.header.geometry();
    let cs = g.cluster_size();
    report.total_clusters = g.clusters_for(loaded.header.virtual_size);
    report.image_end_offset = loaded.file_length;
    // A slot of all zeros was never written (slot B of a new image); one that fails its
    // checksum is what a torn header write leaves.
    report.stale_header_slots = loaded
        .bad_slots
        .iter()
        .filter(|(_, e)| matches!(e, crate::format::FormatError::ChecksumMismatch { .. }))
        .map(|&(slot, _)| slot)
        .collect();
    // Every referenced unit must lie inside the file: it was written whole before any
    // record pointed at it.
    for (&vc, e) in &loaded.map {
        for s in 0..2 {
            if e.units[s] == 0 {
                continue;
            }
            report.allocated_clusters += 1;
            let last_unit = 63 - e.units[s].leading_zeros() as u64;
            let end = e.host[s] * cs + (last_unit + 1) * g.unit_size();
            if end > loaded.file_length {
                report.corruptions.push(format!(
                    "{}: slot {} of virtual cluster {vc} (host offset {:#x}) extends past the end of the file ({:#x})",
                    path.display(),
                    ["A", "B"][s],
                    e.host[s] * cs,
                    loaded.file_length
                ));
            }
        }
    }
    // Leaks: clusters no one owns that still hold bytes on disk (a crash between writing
    // data and publishing it leaves these; they are reused by later allocations anyway).
    let mut owned = loaded.used.iter().copied().peekable();
    let end_cluster = loaded.file_length.div_ceil(cs);
    let mut pos = g.first_data_cluster() * cs;
    let io = |op, offset, source| Error::Io {
        path: path.into(),
        op,
        offset,
        source,
    };
    // Progress is the scan through the file (holes are skipped at once).
    progress(0, loaded.file_length);
    while pos < loaded.file_length {
        let Some(data) = storage
            .next_data(pos)
            .map_err(|e| io("seeking data", pos, e))?
        else {
            break;
        };
        let cluster = data / cs;
        if cluster >= end_cluster {
            break;
        }
        while owned.peek().is_some_and(|&c| c < cluster) {
            owned.next();
        }
        if owned.peek() != Some(&cluster) {
            report.leaks += 1;
            if repair {
                storage
                    .punch_hole(cluster * cs, cs)
                    .map_err(|e| io("punching a leaked cluster", cluster * cs, e))?;
                report.leaks_fixed += 1;
            }
        }
        pos = (cluster + 1) * cs;
        progress(pos.min(loaded.file_length), loaded.file_length);
    }
    if repair && report.leaks_fixed > 0 {
        storage.sync().map_err(|e| io("syncing", 0, e))?;
    }
    progress(loaded.file_length, loaded.file_length);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measure_qcow2_gives_the_figures_qemu_img_measure_prints() {
        const K: u64 = 1 << 10;
        let m = |size, cluster, data| {
            let m = measure_qcow2(size, cluster, data).expect("measurable");
            (m.required, m.fully_allocated)
        };
        // qemu-img 10.0 measure -O qcow2 --size SIZE -o cluster_size=CLUSTER.
        assert_eq!(m(0, 64 * K, 0), (196_608, 196_608));
        assert_eq!(m(1, 64 * K, 0), (327_680, 393_216));
        assert_eq!(m(1 << 30, 64 * K, 0), (393_216, 1_074_135_040));
        assert_eq!(m(1 << 30, 4 * K, 0), (2_637_824, 1_076_379_648));
        assert_eq!(m(1 << 30, 2048 * K, 0), (10_485_760, 1_084_227_584));
        assert_eq!(m(1 << 40, 64 * K, 0), (168_034_304, 1_099_679_662_080));
        // Data clusters add to the required size, up to the fully allocated one.
        assert_eq!(
            m(1 << 30, 64 * K, 10),
            (393_216 + 10 * 64 * K, 1_074_135_040)
        );
        assert_eq!(m(1 << 30, 64 * K, u64::MAX), (1_074_135_040, 1_074_135_040));
        // 2 PiB is the most an L1 table of 32 MiB maps with 64 KiB clusters.
        assert!(measure_qcow2(1 << 51, 64 * K, 0).is_ok());
        for (size, cluster) in [
            ((1 << 51) + 1, 64 * K),
            (16 << 40, 4 * K),
            (u64::MAX, 64 * K),
        ] {
            let e = measure_qcow2(size, cluster, 0).expect_err("too large");
            assert!(e.to_string().contains("larger cluster size"), "{e}");
        }
        assert!(measure_qcow2(1 << 20, 3 * K, 0).is_err());
    }

    fn chunks(n: u64) -> Vec<CopyChunk> {
        split_copy(0, 1 << 30, n * COPY_CHUNK as u64).collect()
    }

    fn failure(at: u64) -> Error {
        Error::Io {
            path: "test".into(),
            op: "writing",
            offset: at,
            source: std::io::Error::other("injected"),
        }
    }

    #[test]
    fn an_overlapped_copy_moves_every_chunk_to_its_place() {
        let written = std::sync::Mutex::new(Vec::new());
        let mut read_at = Vec::new();
        copy_overlapped(
            Path::new("test"),
            chunks(5),
            |buf, from| {
                read_at.push(from);
                buf.fill((from / COPY_CHUNK as u64) as u8);
                Ok(())
            },
            |buf, to| {
                written.lock().unwrap().push((to, buf[0], buf.len()));
                Ok(())
            },
            |_| {},
        )
        .expect("the copy succeeds");
        let step = COPY_CHUNK as u64;
        assert_eq!(read_at, (0..5).map(|i| i * step).collect::<Vec<_>>());
        let expected: Vec<_> = (0..5u64)
            .map(|i| ((1 << 30) + i * step, i as u8, COPY_CHUNK))
            .collect();
        assert_eq!(*written.lock().unwrap(), expected);
    }

    #[test]
    fn a_write_error_stops_an_overlapped_copy_instead_of_hanging_it() {
        for failing in 0..4u64 {
            let target = (1 << 30) + failing * COPY_CHUNK as u64;
            // The copy runs on its own thread so that a hang fails the test instead of
            // stalling the suite.
            let (done_tx, done_rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let result = copy_overlapped(
                    Path::new("test"),
                    chunks(8),
                    |_, _| Ok(()),
                    |_, to| {
                        if to == target {
                            // Slow enough that the reader has filled both buffers and
                            // waits for an empty one when the write fails.
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            Err(failure(to))
                        } else {
                            Ok(())
                        }
                    },
                    |_| {},
                );
                let _ = done_tx.send(result);
            });
            let result = done_rx
                .recv_timeout(std::time::Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("chunk {failing}: the copy hung after a write error"));
            match result {
                Err(Error::Io { offset, .. }) => assert_eq!(offset, target),
                other => panic!("chunk {failing}: expected the write error, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_read_error_stops_an_overlapped_copy_and_is_reported() {
        let result = copy_overlapped(
            Path::new("test"),
            chunks(6),
            |_, from| {
                if from == 2 * COPY_CHUNK as u64 {
                    Err(failure(from))
                } else {
                    Ok(())
                }
            },
            |_, _| Ok(()),
            |_| {},
        );
        assert!(
            matches!(result, Err(Error::Io { offset, .. }) if offset == 2 * COPY_CHUNK as u64),
            "{result:?}"
        );
    }
}

/// Resizes a raw file: its length is the virtual size. Growing leaves a hole (reads as
/// zeros). The new length is durable when this returns.
pub fn resize_raw(path: &Path, new_size: u64) -> Result<()> {
    let (file, _) = super::open_locked(path, true, false)?;
    let io = |op, offset, source| Error::Io {
        path: path.into(),
        op,
        offset,
        source,
    };
    file.set_len(new_size)
        .map_err(|e| io("changing the length", new_size, e))?;
    // fdatasync covers the file's length (FORMAT.md, "What cowimg assumes of the disk").
    file.sync_data().map_err(|e| io("syncing", 0, e))
}

/// What `qemu-img measure` reports, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measure {
    /// The file needed for an image holding `allocated_clusters` clusters of data.
    pub required: u64,
    /// The file needed when every cluster holds data.
    pub fully_allocated: u64,
}

/// What `qemu-img measure -O qcow2` reports for a qcow2 image of `virtual_size` bytes with
/// `cluster_size` clusters (version 3, 16-bit refcounts, standard L2 entries: what
/// `convert -O qcow2` writes), `data_clusters` of which hold data. qemu's figures, by its
/// own formula (`qcow2_measure` and `qcow2_calc_prealloc_size`): the fully allocated size
/// counts the header cluster, every L2 table, the L1 table (whole clusters), the refcount
/// table and blocks that count all of it, themselves included, and every data cluster;
/// the required size is the same metadata with only the clusters that hold data. Both are
/// upper bounds for what `convert -O qcow2` writes (it writes only the L2 tables in use).
pub fn measure_qcow2(virtual_size: u64, cluster_size: u64, data_clusters: u64) -> Result<Measure> {
    let invalid = |reason: String| Error::Invalid {
        path: std::path::PathBuf::from("measure"),
        reason,
    };
    if !cluster_size.is_power_of_two()
        || !(crate::format::MIN_CLUSTER_BITS..=crate::format::MAX_CLUSTER_BITS)
            .contains(&cluster_size.trailing_zeros())
    {
        return Err(invalid(format!(
            "cluster size {cluster_size} is not a power of two from 4 KiB to 2 MiB"
        )));
    }
    const ENTRY: u64 = 8; // L1, L2 and refcount table entries
    let too_large = || {
        invalid(format!(
            "a virtual size of {virtual_size} bytes is too large for a qcow2 image with \
             {cluster_size}-byte clusters (its L1 table would exceed qemu's 32 MiB); use a \
             larger cluster size"
        ))
    };
    let size = virtual_size
        .checked_next_multiple_of(cluster_size)
        .ok_or_else(too_large)?;
    let clusters = size / cluster_size;
    let per_table = cluster_size / ENTRY;
    if clusters.div_ceil(per_table) * ENTRY > crate::format::qcow2::MAX_L1_BYTES {
        return Err(too_large());
    }
    // The header: one cluster.
    let mut meta = cluster_size;
    // L2 tables: enough entries for every cluster, in whole tables.
    let l2_entries = clusters.next_multiple_of(per_table);
    meta += l2_entries * ENTRY;
    // The L1 table: an entry per L2 table, in whole clusters.
    let l1_entries = (l2_entries * ENTRY / cluster_size).next_multiple_of(per_table);
    meta += l1_entries * ENTRY;
    // Refcount blocks and table, for every cluster so far and for themselves: qemu's fixed
    // point (qcow2_refcount_metadata_size).
    let counted = (meta + size) / cluster_size;
    let per_block = cluster_size * 8 / 16;
    let (mut blocks, mut table) = (0u64, 0u64);
    let mut last = None;
    loop {
        blocks = (counted + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table);
        let n = counted + blocks + table;
        if last == Some(n) {
            break;
        }
        last = Some(n);
    }
    meta += (blocks + table) * cluster_size;
    let fully_allocated = meta + size;
    Ok(Measure {
        required: fully_allocated - size + data_clusters.min(clusters) * cluster_size,
        fully_allocated,
    })
}

/// The file size a cowimg image of `virtual_size` bytes needs. The figures are upper bounds
/// for an image written once, as `convert` writes it: the header slots, the first journal,
/// one host cluster per cluster with data, and, when the first flush's record does not fit
/// in that journal, the checkpoint and the journal that replace it.
pub fn measure_cowimg(
    virtual_size: u64,
    cluster_size: u64,
    allocated_clusters: u64,
) -> Result<Measure> {
    let geometry = crate::format::Geometry::checked(cluster_size.trailing_zeros())
        .filter(|_| cluster_size.is_power_of_two())
        .ok_or_else(|| Error::Invalid {
            path: std::path::PathBuf::from("measure"),
            reason: format!(
                "cluster size {cluster_size} is not a power of two from 4 KiB to 2 MiB"
            ),
        })?;
    if virtual_size > crate::format::MAX_VIRTUAL_SIZE {
        return Err(Error::Invalid {
            path: std::path::PathBuf::from("measure"),
            reason: format!("size {virtual_size} is larger than 2^60 bytes"),
        });
    }
    let cs = geometry.cluster_size();
    let fixed = geometry.first_data_cluster() * cs + super::journal_capacity_for(0, cs);
    let for_clusters = |clusters: u64| {
        let record = crate::format::JournalRecordHeader::padded_len(clusters);
        let mut bytes = fixed + clusters * cs;
        if record > super::journal_capacity_for(0, cs) {
            let checkpoint = clusters * crate::format::MAP_ENTRY_SIZE as u64;
            bytes += checkpoint.next_multiple_of(cs) + super::journal_capacity_for(checkpoint, cs);
        }
        bytes
    };
    let all = geometry.clusters_for(virtual_size);
    Ok(Measure {
        required: for_clusters(allocated_clusters.min(all)),
        fully_allocated: for_clusters(all),
    })
}
