//! Creating and opening images: choosing the header slot, loading the checkpoint, replaying
//! the journal, and checking that no two things claim the same host cluster.
use super::cluster_runs::ClusterRuns;
use super::{Entry, FreeClusters, ImageV1, State};
use crate::error::{Error, Result};
use crate::format::{
    self, FormatError, Geometry, Header, JournalRecordHeader, MapItem, HEADER_SLOT_SIZE,
    JOURNAL_RECORD_HEADER_SIZE, MAP_ENTRY_SIZE,
};
use crate::image::{
    check_recorded_format, layer, random_epoch, resolve_backing_path, stat_openable, v2,
    CreateOptions, Layer, OpenOptions,
};
use crate::storage::{FileStorage, Storage};
use std::collections::BTreeMap;
use std::fs::OpenOptions as FsOpenOptions;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, RwLock};

/// What loading found, before the image is assembled; `check` reads it too.
pub(crate) struct Loaded {
    pub header: Header,
    pub active_slot: usize,
    pub map: BTreeMap<u64, Entry>,
    pub zero_runs: ClusterRuns,
    pub journal_tail: u64,
    pub journal_next_seq: u64,
    /// The last record published data and no record seals it (see `ImageV1::seal`).
    pub last_record_has_data: bool,
    /// Every host cluster in use, sorted.
    pub used: Vec<u64>,
    pub file_length: u64,
    /// Header slots that are not valid, with the reason (for `check`).
    pub bad_slots: Vec<(usize, FormatError)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    Header,
    Checkpoint,
    Journal,
    Data { virtual_cluster: u64, slot: usize },
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Header => write!(f, "the header"),
            Owner::Checkpoint => write!(f, "the checkpoint"),
            Owner::Journal => write!(f, "the journal"),
            Owner::Data {
                virtual_cluster,
                slot,
            } => {
                write!(
                    f,
                    "slot {} of virtual cluster {virtual_cluster}",
                    ["A", "B"][*slot]
                )
            }
        }
    }
}

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
    // the journal region (sparsely), so that truncation is detected (see `load`).
    let journal_end = header.journal_offset + header.journal_capacity;
    storage
        .set_len(journal_end.max(2 * HEADER_SLOT_SIZE as u64))
        .map_err(|e| io("sizing", 0, e))?;
    storage.sync().map_err(|e| io("syncing", 0, e))
}

fn corrupt(path: &Path, structure: &'static str, offset: u64, source: FormatError) -> Error {
    Error::Corrupt {
        path: path.into(),
        structure,
        offset,
        source,
    }
}

fn inconsistent(path: &Path, reason: String) -> Error {
    Error::Inconsistent {
        path: path.into(),
        reason,
    }
}

/// Reads `[offset, offset + len)` in pieces of about 1 MiB, each a whole number of map items,
/// and hands each piece and its offset to `f`. The caller has checked the range against the
/// file's length.
fn for_each_piece(
    storage: &dyn Storage,
    offset: u64,
    len: u64,
    read_failed: impl Fn(u64, std::io::Error) -> Error,
    mut f: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    const PIECE: u64 = (1 << 20) / MAP_ENTRY_SIZE as u64 * MAP_ENTRY_SIZE as u64;
    let end = offset + len;
    let mut buf = vec![0u8; PIECE.min(len) as usize];
    let mut at = offset;
    while at < end {
        let piece = &mut buf[..PIECE.min(end - at) as usize];
        storage.read_at(piece, at).map_err(|e| read_failed(at, e))?;
        f(at, piece)?;
        at += piece.len() as u64;
    }
    Ok(())
}

/// Reports a region that does not lie inside the file, before anything is sized by it.
fn check_inside_file(
    path: &Path,
    what: &str,
    offset: u64,
    len: u64,
    file_length: u64,
) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= file_length => Ok(()),
        _ => Err(inconsistent(path, format!("{what} at offset {offset:#x} ({len} bytes) extends past the end of the file ({file_length:#x})"))),
    }
}

/// Reads `len` bytes at `offset`, or reports that they lie past the end of the file. The
/// length comes from the file, so no allocation exceeds what the file really holds.
fn read_region(
    storage: &dyn Storage,
    path: &Path,
    what: &str,
    offset: u64,
    len: u64,
    file_length: u64,
) -> Result<Vec<u8>> {
    check_inside_file(path, what, offset, len, file_length)?;
    let mut buf = vec![0u8; len as usize];
    storage
        .read_at(&mut buf, offset)
        .map_err(|source| Error::Io {
            path: path.into(),
            op: "reading",
            offset,
            source,
        })?;
    Ok(buf)
}

pub(crate) fn load(storage: &dyn Storage, path: &Path) -> Result<Loaded> {
    let io = |op, offset, source| Error::Io {
        path: path.into(),
        op,
        offset,
        source,
    };
    let file_length = storage.len().map_err(|e| io("reading length", 0, e))?;
    // The choice of slot: the valid one with the larger generation.
    let mut best: Option<(usize, Header)> = None;
    let mut bad_slots = Vec::new();
    for slot in 0..2 {
        let at = (slot * HEADER_SLOT_SIZE) as u64;
        let mut b = vec![0u8; HEADER_SLOT_SIZE];
        let available = file_length.saturating_sub(at).min(HEADER_SLOT_SIZE as u64) as usize;
        storage
            .read_at(&mut b[..available], at)
            .map_err(|e| io("reading header", at, e))?;
        match Header::from_bytes(&b) {
            Ok(h)
                if best
                    .as_ref()
                    .is_none_or(|(_, cur)| h.generation > cur.generation) =>
            {
                best = Some((slot, h))
            }
            Ok(_) => {}
            // What a torn or never-written slot looks like: the other slot is current.
            Err(e @ (FormatError::ChecksumMismatch { .. } | FormatError::BadMagic)) => {
                bad_slots.push((slot, e))
            }
            // An intact slot that cannot be used may be newer than the other one: falling back
            // would silently lose data, so refuse.
            Err(e) => return Err(corrupt(path, "header", at, e)),
        }
    }
    let Some((active_slot, header)) = best else {
        let (slot, e) = bad_slots.swap_remove(0);
        return Err(corrupt(path, "header", (slot * HEADER_SLOT_SIZE) as u64, e));
    };
    // An empty slot B of a new image, or a slot that is merely older, is fine; a slot whose
    // checksum fails is what a torn header write leaves and is fine too.
    let g = header.geometry();
    let cs = g.cluster_size();
    let virtual_clusters = g.clusters_for(header.virtual_size);
    // Host clusters past the file's end cannot hold written data.
    let max_host = file_length.div_ceil(cs).max(g.first_data_cluster());
    // Items are decoded against the format's bound; the final map is checked against the
    // file's length once replay is done (see below).
    let host_limit = (format::MAX_VIRTUAL_SIZE >> g.cluster_bits).max(max_host);

    // The journal's size follows from the checkpoint's (FORMAT.md, "Journal"); checking it
    // here also bounds everything sized by it by the file's real length.
    let expected =
        super::journal_capacity_for(header.checkpoint_entries * MAP_ENTRY_SIZE as u64, cs);
    if header.journal_capacity != expected {
        return Err(corrupt(
            path,
            "header",
            (active_slot * HEADER_SLOT_SIZE) as u64,
            format::invalid(
                "journal_capacity",
                0x58,
                format!(
                    "{} but the checkpoint implies {expected}",
                    header.journal_capacity
                ),
            ),
        ));
    }
    if header.checkpoint_entries * MAP_ENTRY_SIZE as u64 > file_length {
        return Err(inconsistent(
            path,
            format!(
                "checkpoint at offset {:#x} of {} entries (header slot at {:#x}) is larger than the file",
                header.checkpoint_offset,
                header.checkpoint_entries,
                active_slot * HEADER_SLOT_SIZE
            ),
        ));
    }

    // The cheap checks come before anything is read in bulk (FORMAT.md, "Opening").
    let journal_end = header
        .journal_offset
        .checked_add(header.journal_capacity)
        .ok_or_else(|| inconsistent(path, "journal region overflows".into()))?;
    // Writers keep the file at least as long as the journal region. A shorter file was cut:
    // replaying what is left would silently go back to an older state (and one whose data
    // clusters may have been reused since).
    if file_length < journal_end {
        return Err(inconsistent(
            path,
            format!(
                "the file ends at {file_length:#x}, inside its journal region {:#x}..{journal_end:#x} (truncated?)",
                header.journal_offset
            ),
        ));
    }

    let mut zero_runs = ClusterRuns::default();
    // The map is built from the sorted checkpoint in one go, which packs its nodes full.
    let mut entries: Vec<(u64, Entry)> = Vec::new();
    if header.checkpoint_entries > 0 {
        let len = header.checkpoint_entries * MAP_ENTRY_SIZE as u64;
        let start = header.checkpoint_offset;
        check_inside_file(path, "checkpoint", start, len, file_length)?;
        // A writer writes every byte of a checkpoint, and no item is all zeros, so no block
        // of a file system (4 KiB or more, aligned) that holds a whole item is a hole, not
        // even in a copy made sparse: a hole before the last two items' bytes is damage.
        // Checked before the checksum pass, so that a sparse file claiming a huge
        // checkpoint costs a seek, not a read of the claim.
        let dense = len.saturating_sub(2 * MAP_ENTRY_SIZE as u64);
        if let Some(hole) = storage
            .first_hole_in(start, dense)
            .map_err(|e| io("seeking a hole", start, e))?
        {
            return Err(inconsistent(
                path,
                format!("checkpoint at offset {start:#x} ({len} bytes) has a hole at {hole:#x}: it was never written whole"),
            ));
        }
        // Read in pieces, twice: once for the checksum, which must hold before any item is
        // trusted, and once to decode. A large map is never held twice in memory.
        let read_failed = |at, e| io("reading checkpoint", at, e);
        let mut crc = crc32fast::Hasher::new();
        for_each_piece(storage, start, len, read_failed, |_, piece| {
            crc.update(piece);
            Ok(())
        })?;
        let computed = crc.finalize();
        if computed != header.checkpoint_crc {
            return Err(corrupt(
                path,
                "checkpoint",
                start,
                FormatError::ChecksumMismatch {
                    stored: header.checkpoint_crc,
                    computed,
                },
            ));
        }
        // The count passed the checksum and fits in the file, but a sparse file can still
        // claim more than this machine holds: that is an error, not an abort.
        entries
            .try_reserve_exact(header.checkpoint_entries as usize)
            .map_err(|_| {
                inconsistent(
                    path,
                    format!(
                        "checkpoint at offset {start:#x} of {} entries does not fit in memory",
                        header.checkpoint_entries
                    ),
                )
            })?;
        // Items are sorted and disjoint: each starts at or after the end of the previous one.
        let mut next_free = 0u64;
        for_each_piece(storage, start, len, read_failed, |at, piece| {
            for (i, chunk) in piece.chunks_exact(MAP_ENTRY_SIZE).enumerate() {
                let at = at + (i * MAP_ENTRY_SIZE) as u64;
                let item = MapItem::from_bytes(chunk, g, virtual_clusters, host_limit, false)
                    .map_err(|e| corrupt(path, "checkpoint entry", at, e))?;
                if item.start() < next_free {
                    return Err(inconsistent(
                        path,
                        format!("checkpoint entry at offset {at:#x} overlaps or is out of order"),
                    ));
                }
                match item {
                    MapItem::Cluster(e) => {
                        next_free = e.virtual_cluster + 1;
                        entries.push((e.virtual_cluster, Entry::at_rest(e.host, e.units, e.zero)));
                    }
                    MapItem::ZeroRun { start, count } => {
                        next_free = start + count;
                        zero_runs.insert(start, start + count);
                    }
                    MapItem::Removal(_) | MapItem::FallThroughRun { .. } => {
                        unreachable!("from_bytes admits these only in journals")
                    }
                }
            }
            Ok(())
        })?;
    }
    let mut map: BTreeMap<u64, Entry> = entries.into_iter().collect();

    // Journal replay: records of this epoch with consecutive sequence numbers, until the
    // first one that is absent or fails its checksum (the flush that did not complete).
    let mut tail = 0u64;
    let mut seq = 1u64;
    let mut records: Vec<ReplayRecord> = Vec::new();
    loop {
        let at = header.journal_offset + tail;
        if at + JOURNAL_RECORD_HEADER_SIZE as u64 > journal_end.min(file_length) {
            break;
        }
        let mut hb = [0u8; JOURNAL_RECORD_HEADER_SIZE];
        storage
            .read_at(&mut hb, at)
            .map_err(|e| io("reading journal", at, e))?;
        let Some(rec) = JournalRecordHeader::parse(&hb, header.journal_epoch, seq) else {
            break;
        };
        let len = JournalRecordHeader::padded_len(rec.item_count as u64);
        let body_len = JournalRecordHeader::body_len(rec.item_count as u64);
        let body_at = at + JOURNAL_RECORD_HEADER_SIZE as u64;
        if tail + len > header.journal_capacity || body_at + body_len > file_length {
            break;
        }
        let body = read_region(
            storage,
            path,
            "journal record",
            body_at,
            body_len,
            file_length,
        )?;
        if rec.verify(&hb, &body).is_err() {
            break;
        }
        let (item_bytes, written) = rec.split_body(&body);
        let mut items = Vec::with_capacity(written.len());
        for (i, chunk) in item_bytes.chunks_exact(MAP_ENTRY_SIZE).enumerate() {
            let eat = body_at + (i * MAP_ENTRY_SIZE) as u64;
            // Host clusters are checked against the file's length once the last record is
            // known: that one may point past the end when its data did not land.
            let item = MapItem::from_bytes(chunk, g, virtual_clusters, host_limit, true)
                .map_err(|e| corrupt(path, "journal entry", eat, e))?;
            let stored = match item {
                MapItem::Cluster(e) => e.units[0] | e.units[1],
                _ => 0,
            };
            if written[i] & !stored != 0 {
                return Err(corrupt(
                    path,
                    "journal entry",
                    eat,
                    format::invalid("written", 0, "marks units the entry does not store"),
                ));
            }
            items.push(item);
        }
        names_each_cluster_once(path, at, g, &items)?;
        records.push(ReplayRecord {
            items,
            written,
            digest: rec.data_digest,
            len,
        });
        tail += len;
        seq += 1;
    }
    // Every record but the last had a barrier after it. The last one was written together
    // with its data under one barrier: it counts only if its data is all there.
    if let Some(last) = records.last() {
        if !last_record_data_is_intact(storage, g, file_length, last)
            .map_err(|(at, e)| io("reading back the last record's data", at, e))?
        {
            tail -= last.len;
            seq -= 1;
            records.pop();
        }
    }
    for rec in &records {
        for &item in &rec.items {
            apply_item(&mut map, &mut zero_runs, item);
        }
    }
    // Only the final map must lie inside the file: clusters that earlier items used may have
    // been freed and cut off the end of the file since.
    for (&vc, e) in map.iter_mut() {
        for slot in 0..2 {
            // A reserved cluster (a slot without units) past the end is a reservation whose
            // data write failed, or a crafted one: forgotten, so that the next write to the
            // slot allocates inside the file instead of extending it to there.
            if e.units[slot] == 0 && e.host[slot] >= max_host {
                e.host[slot] = 0;
            }
            if e.host[slot] != 0 && e.host[slot] >= max_host {
                return Err(inconsistent(path, format!(
                    "slot {} of virtual cluster {vc} is {}host cluster {} (offset {:#x}), past the end of the file ({file_length:#x})",
                    ["A", "B"][slot],
                    if e.units[slot] == 0 { "reserved " } else { "" },
                    e.host[slot], e.host[slot] << g.cluster_bits
                )));
            }
        }
    }
    let last_record_has_data = records
        .last()
        .is_some_and(|r| r.written.iter().any(|&w| w != 0));
    // A record further on that belongs to this journal means one in the middle is damaged:
    // later flushes would silently be lost, so this is corruption, not a torn tail.
    let mut probe = tail + crate::format::BLOCK_SIZE;
    while header.journal_offset + probe + JOURNAL_RECORD_HEADER_SIZE as u64
        <= journal_end.min(file_length)
    {
        let at = header.journal_offset + probe;
        let mut hb = [0u8; JOURNAL_RECORD_HEADER_SIZE];
        storage
            .read_at(&mut hb, at)
            .map_err(|e| io("reading journal", at, e))?;
        // The epoch is random (see `random_epoch`), so stale or planted bytes cannot match it.
        if let Some(later) =
            JournalRecordHeader::peek_sequence(&hb, header.journal_epoch).filter(|&s| s >= seq)
        {
            return Err(inconsistent(path, format!("journal record {seq} at offset {:#x} is damaged but record {later} follows at {at:#x}", header.journal_offset + tail)));
        }
        probe += crate::format::BLOCK_SIZE;
        // Holes hold no record: skip them with a seek instead of reading block by block.
        if hb.iter().all(|&b| b == 0) {
            let next = header.journal_offset + probe;
            match storage
                .next_data(next)
                .map_err(|e| io("seeking data", next, e))?
            {
                Some(d) if d > next => {
                    probe = (d - header.journal_offset).next_multiple_of(crate::format::BLOCK_SIZE)
                }
                Some(_) => {}
                None => break,
            }
        }
    }

    // Ownership of host clusters: no cluster may have two owners.
    let ckpt_clusters = (header.checkpoint_entries * MAP_ENTRY_SIZE as u64).div_ceil(cs);
    let journal_clusters = header.journal_capacity.div_ceil(cs);
    let regions = [
        (0, g.first_data_cluster(), Owner::Header),
        (
            header.checkpoint_offset / cs,
            ckpt_clusters,
            Owner::Checkpoint,
        ),
        (header.journal_offset / cs, journal_clusters, Owner::Journal),
    ];
    let mut used: Vec<u64> = Vec::with_capacity(
        map.len() * 2 + (g.first_data_cluster() + ckpt_clusters + journal_clusters) as usize,
    );
    for &(start, count, _) in &regions {
        used.extend(start..start + count);
    }
    used.extend(map.values().flat_map(|e| e.host).filter(|&h| h != 0));
    used.sort_unstable();
    if let Some(w) = used.windows(2).find(|w| w[0] == w[1]) {
        // Only now, for the message, find who the two claimants are.
        let c = w[0];
        let owners: Vec<Owner> = regions
            .iter()
            .filter(|&&(start, count, _)| (start..start + count).contains(&c))
            .map(|&(_, _, o)| o)
            .chain(map.iter().flat_map(|(&vc, e)| {
                (0..2)
                    .filter(move |&s| e.host[s] == c)
                    .map(move |slot| Owner::Data {
                        virtual_cluster: vc,
                        slot,
                    })
            }))
            .take(2)
            .collect();
        return Err(inconsistent(
            path,
            format!(
                "host cluster {c} (offset {:#x}) is claimed by both {} and {}",
                c * cs,
                owners[0],
                owners[1]
            ),
        ));
    }
    Ok(Loaded {
        header,
        active_slot,
        map,
        zero_runs,
        journal_tail: tail,
        journal_next_seq: seq,
        last_record_has_data,
        used,
        file_length,
        bad_slots,
    })
}

impl State {
    /// The state of a freshly loaded image (at open, and after going back to the durable
    /// state).
    pub(crate) fn from_loaded(loaded: Loaded, free: FreeClusters) -> State {
        State {
            active_slot: loaded.active_slot,
            map: loaded.map,
            dirty: Vec::new(),
            zero_runs: loaded.zero_runs,
            dirty_runs: Vec::new(),
            free,
            journal_tail: loaded.journal_tail,
            journal_next_seq: loaded.journal_next_seq,
            commits: 0,
            last_record_has_data: loaded.last_record_has_data,
            snapshots_taken: 0,
            snapshots_published: 0,
            waiters: 0,
            pending_resize: None,
            journal_reserved: false,
            header: loaded.header,
        }
    }
}

/// Applies one journal item: a cluster item replaces whatever its cluster had, a run replaces
/// whatever its clusters had.
fn apply_item(map: &mut BTreeMap<u64, Entry>, zero_runs: &mut ClusterRuns, item: MapItem) {
    match item {
        MapItem::Cluster(e) => {
            zero_runs.remove(e.virtual_cluster, e.virtual_cluster + 1);
            map.insert(e.virtual_cluster, Entry::at_rest(e.host, e.units, e.zero));
        }
        MapItem::Removal(vc) => {
            zero_runs.remove(vc, vc + 1);
            map.remove(&vc);
        }
        MapItem::ZeroRun { start, count } | MapItem::FallThroughRun { start, count } => {
            let inside: Vec<u64> = map.range(start..start + count).map(|(&k, _)| k).collect();
            for vc in inside {
                map.remove(&vc);
            }
            if matches!(item, MapItem::ZeroRun { .. }) {
                zero_runs.insert(start, start + count);
            } else {
                zero_runs.remove(start, start + count);
            }
        }
    }
}

/// A journal record that passed its checksum, kept until replay knows which is the last.
struct ReplayRecord {
    items: Vec<MapItem>,
    written: Vec<u64>,
    digest: u64,
    len: u64,
}

/// Refuses a record that names one virtual cluster twice, or one host cluster twice (in
/// two entries, or in both slots of one): a writer never does, and recovery reads the last
/// record's units back once each, which this makes a read of distinct bytes.
fn names_each_cluster_once(path: &Path, at: u64, g: Geometry, items: &[MapItem]) -> Result<()> {
    let mut hosts: Vec<(u64, Owner)> = Vec::with_capacity(2 * items.len());
    let mut clusters: Vec<u64> = Vec::with_capacity(items.len());
    for item in items {
        match item {
            MapItem::Cluster(e) => {
                for slot in 0..2 {
                    if e.host[slot] != 0 {
                        let virtual_cluster = e.virtual_cluster;
                        hosts.push((
                            e.host[slot],
                            Owner::Data {
                                virtual_cluster,
                                slot,
                            },
                        ));
                    }
                }
                clusters.push(e.virtual_cluster);
            }
            MapItem::Removal(vc) => clusters.push(*vc),
            MapItem::ZeroRun { .. } | MapItem::FallThroughRun { .. } => {}
        }
    }
    hosts.sort_by_key(|&(h, _)| h);
    if let Some(w) = hosts.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(inconsistent(
            path,
            format!(
                "journal record at offset {at:#x}: host cluster {} (offset {:#x}) is claimed by both {} and {}",
                w[0].0,
                w[0].0 << g.cluster_bits,
                w[0].1,
                w[1].1
            ),
        ));
    }
    clusters.sort_unstable();
    if let Some(w) = clusters.windows(2).find(|w| w[0] == w[1]) {
        return Err(inconsistent(
            path,
            format!(
                "journal record at offset {at:#x} names virtual cluster {} twice",
                w[0]
            ),
        ));
    }
    Ok(())
}

/// Recomputes the data digest of a record from the units it marks written. The units are
/// distinct (see [`names_each_cluster_once`]) and must lie inside the file; parts of them
/// that are holes are hashed as the zeros they read as, without reading them, and at most
/// as many bytes of holes as the file has allocated are hashed: past that, the record's data
/// did not land. So the digest reads at most the file's allocated bytes once, and hashes
/// at most twice that.
fn last_record_data_is_intact(
    storage: &dyn Storage,
    g: Geometry,
    file_length: u64,
    rec: &ReplayRecord,
) -> std::result::Result<bool, (u64, std::io::Error)> {
    let us = g.unit_size();
    // Runs of contiguous units, in digest order.
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (item, &written) in rec.items.iter().zip(&rec.written) {
        let MapItem::Cluster(e) = item else { continue };
        let mut w = written;
        while w != 0 {
            let u = w.trailing_zeros();
            w &= w - 1;
            let slot = usize::from(e.units[0] & (1 << u) == 0);
            let at = (e.host[slot] << g.cluster_bits) + ((u as u64) << g.unit_bits);
            if at + us > file_length {
                return Ok(false);
            }
            match runs.last_mut() {
                Some((start, len)) if *start + *len == at => *len += us,
                _ => runs.push((at, us)),
            }
        }
    }
    let mut hole_budget = storage.allocated_bytes().unwrap_or(u64::MAX);
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    const PIECE: u64 = 1 << 20;
    let mut buf = vec![0u8; PIECE.min(runs.iter().map(|r| r.1).max().unwrap_or(0)) as usize];
    let zeros = vec![0u8; buf.len()];
    let mut read = |hasher: &mut xxhash_rust::xxh3::Xxh3, from: u64, to: u64| {
        let mut at = from;
        while at < to {
            let n = PIECE.min(to - at) as usize;
            storage.read_at(&mut buf[..n], at).map_err(|e| (at, e))?;
            hasher.update(&buf[..n]);
            at += n as u64;
        }
        Ok(())
    };
    for (start, len) in runs {
        let end = start + len;
        let mut pos = start;
        while pos < end {
            let data_end = storage
                .first_hole_in(pos, end - pos)
                .map_err(|e| (pos, e))?
                .unwrap_or(end)
                .clamp(pos, end);
            read(&mut hasher, pos, data_end)?;
            pos = data_end;
            if pos == end {
                break;
            }
            let hole_end = match storage.next_data(pos).map_err(|e| (pos, e))? {
                // The seeks disagree (the file changed?): read the rest.
                Some(d) if d <= pos => {
                    read(&mut hasher, pos, end)?;
                    break;
                }
                Some(d) => d.min(end),
                None => end,
            };
            let hole = hole_end - pos;
            if hole > hole_budget {
                return Ok(false);
            }
            hole_budget -= hole;
            let mut left = hole;
            while left > 0 {
                let n = PIECE.min(left) as usize;
                hasher.update(&zeros[..n]);
                left -= n as u64;
            }
            pos = hole_end;
        }
    }
    Ok(hasher.digest() == rec.digest)
}
