//! Journal replay (FORMAT.md, "Replay"): the records of the current journal, in order,
//! until the first that is absent or damaged; the check of the last record's data, which
//! shared its barrier with the record; and the check that no record of the journal lies past
//! the point where replay stopped.
use super::cluster_runs::ClusterRuns;
use super::load::{corrupt, inconsistent, read_region, Ctx, Owner};
use super::Entry;
use crate::error::Result;
use crate::format::{
    self, Geometry, JournalRecordHeader, MapItem, JOURNAL_RECORD_HEADER_SIZE, MAP_ENTRY_SIZE,
};
use crate::storage::Storage;
use std::collections::BTreeMap;
use std::path::Path;

/// A journal record that passed its checksum, kept until replay knows which is the last.
struct ReplayRecord {
    items: Vec<MapItem>,
    written: Vec<u64>,
    digest: u64,
    len: u64,
}

/// Where replay left the journal.
pub(super) struct Replayed {
    /// The offset in the journal of the next record, and its sequence number.
    pub tail: u64,
    pub next_seq: u64,
    /// The last record published data and no record seals it (see `ImageV1::seal`).
    pub last_record_has_data: bool,
}

/// Journal replay: records of this epoch with consecutive sequence numbers, until the
/// first one that is absent or fails its checksum (the flush that did not complete),
/// applied over the checkpoint's map.
pub(super) fn replay_journal(
    ctx: &Ctx,
    map: &mut BTreeMap<u64, Entry>,
    zero_runs: &mut ClusterRuns,
) -> Result<Replayed> {
    let mut tail = 0u64;
    let mut seq = 1u64;
    let mut records: Vec<ReplayRecord> = Vec::new();
    while let Some(rec) = read_record(ctx, tail, seq)? {
        tail += rec.len;
        seq += 1;
        records.push(rec);
    }
    if !check_last_record(ctx, records.last())? {
        let last = records
            .pop()
            .expect("a record that failed the check is there");
        tail -= last.len;
        seq -= 1;
    }
    for rec in &records {
        for &item in &rec.items {
            apply_item(map, zero_runs, item);
        }
    }
    let last_record_has_data = records
        .last()
        .is_some_and(|r| r.written.iter().any(|&w| w != 0));
    Ok(Replayed {
        tail,
        next_seq: seq,
        last_record_has_data,
    })
}

/// The record at `tail` in the journal if it is record `seq` of this journal and passes
/// its checksum; `None` where the journal ends.
fn read_record(ctx: &Ctx, tail: u64, seq: u64) -> Result<Option<ReplayRecord>> {
    let (header, g, path, file_length) = (&ctx.header, ctx.g, ctx.path, ctx.file_length);
    let at = header.journal_offset + tail;
    if at + JOURNAL_RECORD_HEADER_SIZE as u64 > ctx.journal_end.min(file_length) {
        return Ok(None);
    }
    let mut hb = [0u8; JOURNAL_RECORD_HEADER_SIZE];
    ctx.storage
        .read_at(&mut hb, at)
        .map_err(|e| ctx.io("reading journal", at, e))?;
    let Some(rec) = JournalRecordHeader::parse(&hb, header.journal_epoch, seq) else {
        return Ok(None);
    };
    let len = JournalRecordHeader::padded_len(rec.item_count as u64);
    let body_len = JournalRecordHeader::body_len(rec.item_count as u64);
    let body_at = at + JOURNAL_RECORD_HEADER_SIZE as u64;
    if tail + len > header.journal_capacity || body_at + body_len > file_length {
        return Ok(None);
    }
    let body = read_region(
        ctx.storage,
        path,
        "journal record",
        body_at,
        body_len,
        file_length,
    )?;
    if rec.verify(&hb, &body).is_err() {
        return Ok(None);
    }
    let (item_bytes, written) = rec.split_body(&body);
    let mut items = Vec::with_capacity(written.len());
    for (i, chunk) in item_bytes.chunks_exact(MAP_ENTRY_SIZE).enumerate() {
        let eat = body_at + (i * MAP_ENTRY_SIZE) as u64;
        // Host clusters are checked against the file's length once the last record is
        // known: that one may point past the end when its data did not land.
        let item = MapItem::from_bytes(chunk, g, ctx.virtual_clusters, ctx.host_limit, true)
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
    Ok(Some(ReplayRecord {
        items,
        written,
        digest: rec.data_digest,
        len,
    }))
}

/// Every record but the last had a barrier after it. The last one was written together
/// with its data under one barrier: it counts only if its data is all there. False when
/// `last` is there and does not count.
fn check_last_record(ctx: &Ctx, last: Option<&ReplayRecord>) -> Result<bool> {
    let Some(last) = last else {
        return Ok(true);
    };
    last_record_data_is_intact(ctx.storage, ctx.g, ctx.file_length, last)
        .map_err(|(at, e)| ctx.io("reading back the last record's data", at, e))
}

/// A record further on that belongs to this journal means one in the middle is damaged:
/// later flushes would silently be lost, so this is corruption, not a torn tail. `tail`
/// and `seq` are where replay stopped.
pub(super) fn check_no_later_record(ctx: &Ctx, tail: u64, seq: u64) -> Result<()> {
    let header = &ctx.header;
    let mut probe = tail + crate::format::BLOCK_SIZE;
    while header.journal_offset + probe + JOURNAL_RECORD_HEADER_SIZE as u64
        <= ctx.journal_end.min(ctx.file_length)
    {
        let at = header.journal_offset + probe;
        let mut hb = [0u8; JOURNAL_RECORD_HEADER_SIZE];
        ctx.storage
            .read_at(&mut hb, at)
            .map_err(|e| ctx.io("reading journal", at, e))?;
        // The epoch is random (see `random_epoch`), so stale or planted bytes cannot match it.
        if let Some(later) =
            JournalRecordHeader::peek_sequence(&hb, header.journal_epoch).filter(|&s| s >= seq)
        {
            return Err(inconsistent(ctx.path, format!("journal record {seq} at offset {:#x} is damaged but record {later} follows at {at:#x}", header.journal_offset + tail)));
        }
        probe += crate::format::BLOCK_SIZE;
        // Holes hold no record: skip them with a seek instead of reading block by block.
        if hb.iter().all(|&b| b == 0) {
            let next = header.journal_offset + probe;
            match ctx
                .storage
                .next_data(next)
                .map_err(|e| ctx.io("seeking data", next, e))?
            {
                Some(d) if d > next => {
                    probe = (d - header.journal_offset).next_multiple_of(crate::format::BLOCK_SIZE)
                }
                Some(_) => {}
                None => break,
            }
        }
    }
    Ok(())
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
    let Some(runs) = written_unit_runs(g, file_length, rec) else {
        return Ok(false);
    };
    Ok(digest_runs(storage, &runs)? == Some(rec.digest))
}

/// The units `rec` marks written as runs of contiguous bytes, in digest order; `None` when
/// one of them does not lie inside the file.
fn written_unit_runs(g: Geometry, file_length: u64, rec: &ReplayRecord) -> Option<Vec<(u64, u64)>> {
    let us = g.unit_size();
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
                return None;
            }
            match runs.last_mut() {
                Some((start, len)) if *start + *len == at => *len += us,
                _ => runs.push((at, us)),
            }
        }
    }
    Some(runs)
}

/// xxh3-64 over the bytes of `runs`, in order, hashing holes as zeros without reading
/// them; `None` when the holes add up to more than the file has allocated.
fn digest_runs(
    storage: &dyn Storage,
    runs: &[(u64, u64)],
) -> std::result::Result<Option<u64>, (u64, std::io::Error)> {
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
    for &(start, len) in runs {
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
                return Ok(None);
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
    Ok(Some(hasher.digest()))
}
