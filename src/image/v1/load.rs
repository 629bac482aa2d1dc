//! Loading the durable state of a version-1 image, in named steps: choosing the header
//! slot, checking the regions it names against the file, reading the checkpoint, replaying
//! the journal over it (`replay.rs`), and checking that the final map lies inside the file
//! and that no two things claim the same host cluster (FORMAT.md, "Opening"). An open, a
//! revert after a failed flush and `check` all load through [`load`].
use super::cluster_runs::ClusterRuns;
use super::replay::{check_no_later_record, replay_journal};
use super::{journal_capacity_for, Entry, FreeClusters, State};
use crate::error::{Error, Result};
use crate::format::{
    self, FormatError, Geometry, Header, MapItem, HEADER_SLOT_SIZE, MAP_ENTRY_SIZE,
};
use crate::storage::Storage;
use std::collections::BTreeMap;
use std::path::Path;

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

/// Loads the durable state of the image in `storage`: the current header slot, the
/// checkpoint, the journal replayed over it, and the host clusters in use (FORMAT.md,
/// "Opening"). Each step checks what it reads before anything is sized by it.
pub(crate) fn load(storage: &dyn Storage, path: &Path) -> Result<Loaded> {
    let file_length = storage
        .len()
        .map_err(|e| io_error(path, "reading length", 0, e))?;
    let (active_slot, header, bad_slots) = choose_slot(storage, path, file_length)?;
    let journal_end = check_regions(path, &header, active_slot, file_length)?;
    let ctx = Ctx::new(storage, path, file_length, header, journal_end);
    let (mut map, mut zero_runs) = read_checkpoint(&ctx)?;
    let replayed = replay_journal(&ctx, &mut map, &mut zero_runs)?;
    check_map_inside_file(&ctx, &mut map)?;
    check_no_later_record(&ctx, replayed.tail, replayed.next_seq)?;
    let used = check_owners(&ctx, &map)?;
    Ok(Loaded {
        header: ctx.header,
        active_slot,
        map,
        zero_runs,
        journal_tail: replayed.tail,
        journal_next_seq: replayed.next_seq,
        last_record_has_data: replayed.last_record_has_data,
        used,
        file_length,
        bad_slots,
    })
}

/// What the steps of a load share: the file, and the chosen header with what follows from
/// it.
pub(super) struct Ctx<'a> {
    pub storage: &'a dyn Storage,
    pub path: &'a Path,
    pub file_length: u64,
    pub header: Header,
    pub g: Geometry,
    pub virtual_clusters: u64,
    /// Host clusters past the file's end cannot hold written data.
    pub max_host: u64,
    /// Items are decoded against the format's bound; the final map is checked against the
    /// file's length once replay is done (see [`check_map_inside_file`]).
    pub host_limit: u64,
    /// The end of the journal region, inside the file (see [`check_regions`]).
    pub journal_end: u64,
}

impl<'a> Ctx<'a> {
    fn new(
        storage: &'a dyn Storage,
        path: &'a Path,
        file_length: u64,
        header: Header,
        journal_end: u64,
    ) -> Ctx<'a> {
        let g = header.geometry();
        let cs = g.cluster_size();
        let max_host = file_length.div_ceil(cs).max(g.first_data_cluster());
        Ctx {
            storage,
            path,
            file_length,
            virtual_clusters: g.clusters_for(header.virtual_size),
            max_host,
            host_limit: (format::MAX_VIRTUAL_SIZE >> g.cluster_bits).max(max_host),
            journal_end,
            header,
            g,
        }
    }

    pub fn io(&self, op: &'static str, offset: u64, source: std::io::Error) -> Error {
        io_error(self.path, op, offset, source)
    }
}

fn io_error(path: &Path, op: &'static str, offset: u64, source: std::io::Error) -> Error {
    Error::Io {
        path: path.into(),
        op,
        offset,
        source,
    }
}

/// Header slots that are not valid, with the reason.
type BadSlots = Vec<(usize, FormatError)>;

/// The choice of slot: the valid one with the larger generation. Returns it, its header,
/// and the slots that are not valid, with the reason.
fn choose_slot(
    storage: &dyn Storage,
    path: &Path,
    file_length: u64,
) -> Result<(usize, Header, BadSlots)> {
    let mut best: Option<(usize, Header)> = None;
    let mut bad_slots = Vec::new();
    for slot in 0..2 {
        let at = (slot * HEADER_SLOT_SIZE) as u64;
        let mut b = vec![0u8; HEADER_SLOT_SIZE];
        let available = file_length.saturating_sub(at).min(HEADER_SLOT_SIZE as u64) as usize;
        storage
            .read_at(&mut b[..available], at)
            .map_err(|e| io_error(path, "reading header", at, e))?;
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
    Ok((active_slot, header, bad_slots))
}

/// The cheap checks of the header's regions against each other and the file's length,
/// before anything is read in bulk (FORMAT.md, "Opening"). Returns the journal's end.
fn check_regions(
    path: &Path,
    header: &Header,
    active_slot: usize,
    file_length: u64,
) -> Result<u64> {
    let cs = header.geometry().cluster_size();
    // The journal's size follows from the checkpoint's (FORMAT.md, "Journal"); checking it
    // here also bounds everything sized by it by the file's real length.
    let expected = journal_capacity_for(header.checkpoint_entries * MAP_ENTRY_SIZE as u64, cs);
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
    Ok(journal_end)
}

/// The map as the checkpoint has it: its cluster entries and its zero runs.
fn read_checkpoint(ctx: &Ctx) -> Result<(BTreeMap<u64, Entry>, ClusterRuns)> {
    let header = &ctx.header;
    let mut zero_runs = ClusterRuns::default();
    // The map is built from the sorted checkpoint in one go, which packs its nodes full.
    let mut entries: Vec<(u64, Entry)> = Vec::new();
    if header.checkpoint_entries > 0 {
        let len = header.checkpoint_entries * MAP_ENTRY_SIZE as u64;
        let start = header.checkpoint_offset;
        check_inside_file(ctx.path, "checkpoint", start, len, ctx.file_length)?;
        check_checkpoint_bytes(ctx, start, len)?;
        // The count passed the checksum and fits in the file, but a sparse file can still
        // claim more than this machine holds: that is an error, not an abort.
        entries
            .try_reserve_exact(header.checkpoint_entries as usize)
            .map_err(|_| {
                inconsistent(
                    ctx.path,
                    format!(
                        "checkpoint at offset {start:#x} of {} entries does not fit in memory",
                        header.checkpoint_entries
                    ),
                )
            })?;
        decode_checkpoint(ctx, start, len, &mut entries, &mut zero_runs)?;
    }
    Ok((entries.into_iter().collect(), zero_runs))
}

/// Checks that the checkpoint at `[start, start + len)` was written whole and passes its
/// checksum, which must hold before any item is trusted.
fn check_checkpoint_bytes(ctx: &Ctx, start: u64, len: u64) -> Result<()> {
    // A writer writes every byte of a checkpoint, and no item is all zeros, so no block
    // of a file system (4 KiB or more, aligned) that holds a whole item is a hole, not
    // even in a copy made sparse: a hole before the last two items' bytes is damage.
    // Checked before the checksum pass, so that a sparse file claiming a huge
    // checkpoint costs a seek, not a read of the claim.
    let dense = len.saturating_sub(2 * MAP_ENTRY_SIZE as u64);
    if let Some(hole) = ctx
        .storage
        .first_hole_in(start, dense)
        .map_err(|e| ctx.io("seeking a hole", start, e))?
    {
        return Err(inconsistent(
            ctx.path,
            format!("checkpoint at offset {start:#x} ({len} bytes) has a hole at {hole:#x}: it was never written whole"),
        ));
    }
    // Read in pieces, twice: once for the checksum, which must hold before any item is
    // trusted, and once to decode. A large map is never held twice in memory.
    let read_failed = |at, e| ctx.io("reading checkpoint", at, e);
    let mut crc = crc32fast::Hasher::new();
    for_each_piece(ctx.storage, start, len, read_failed, |_, piece| {
        crc.update(piece);
        Ok(())
    })?;
    let computed = crc.finalize();
    if computed != ctx.header.checkpoint_crc {
        return Err(corrupt(
            ctx.path,
            "checkpoint",
            start,
            FormatError::ChecksumMismatch {
                stored: ctx.header.checkpoint_crc,
                computed,
            },
        ));
    }
    Ok(())
}

/// Decodes the checkpoint's items (their checksum passed) into `entries` and `zero_runs`.
fn decode_checkpoint(
    ctx: &Ctx,
    start: u64,
    len: u64,
    entries: &mut Vec<(u64, Entry)>,
    zero_runs: &mut ClusterRuns,
) -> Result<()> {
    let (g, path) = (ctx.g, ctx.path);
    let read_failed = |at, e| ctx.io("reading checkpoint", at, e);
    // Items are sorted and disjoint: each starts at or after the end of the previous one.
    let mut next_free = 0u64;
    for_each_piece(ctx.storage, start, len, read_failed, |at, piece| {
        for (i, chunk) in piece.chunks_exact(MAP_ENTRY_SIZE).enumerate() {
            let at = at + (i * MAP_ENTRY_SIZE) as u64;
            let item = MapItem::from_bytes(chunk, g, ctx.virtual_clusters, ctx.host_limit, false)
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
    })
}

/// Only the final map must lie inside the file: clusters that earlier items used may have
/// been freed and cut off the end of the file since.
fn check_map_inside_file(ctx: &Ctx, map: &mut BTreeMap<u64, Entry>) -> Result<()> {
    let (g, max_host, file_length) = (ctx.g, ctx.max_host, ctx.file_length);
    for (&vc, e) in map.iter_mut() {
        for slot in 0..2 {
            // A reserved cluster (a slot without units) past the end is a reservation whose
            // data write failed, or a crafted one: forgotten, so that the next write to the
            // slot allocates inside the file instead of extending it to there.
            if e.units[slot] == 0 && e.host[slot] >= max_host {
                e.host[slot] = 0;
            }
            if e.host[slot] != 0 && e.host[slot] >= max_host {
                return Err(inconsistent(ctx.path, format!(
                    "slot {} of virtual cluster {vc} is {}host cluster {} (offset {:#x}), past the end of the file ({file_length:#x})",
                    ["A", "B"][slot],
                    if e.units[slot] == 0 { "reserved " } else { "" },
                    e.host[slot], e.host[slot] << g.cluster_bits
                )));
            }
        }
    }
    Ok(())
}

/// Ownership of host clusters: no cluster may have two owners. Returns every host cluster
/// in use, sorted.
fn check_owners(ctx: &Ctx, map: &BTreeMap<u64, Entry>) -> Result<Vec<u64>> {
    let (header, g) = (&ctx.header, ctx.g);
    let cs = g.cluster_size();
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
            ctx.path,
            format!(
                "host cluster {c} (offset {:#x}) is claimed by both {} and {}",
                c * cs,
                owners[0],
                owners[1]
            ),
        ));
    }
    Ok(used)
}

pub(super) fn corrupt(
    path: &Path,
    structure: &'static str,
    offset: u64,
    source: FormatError,
) -> Error {
    Error::Corrupt {
        path: path.into(),
        structure,
        offset,
        source,
    }
}

pub(super) fn inconsistent(path: &Path, reason: String) -> Error {
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
pub(super) fn read_region(
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
