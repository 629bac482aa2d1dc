//! `cowimg check` of a version-2 image (FORMAT-v2.md, "Opening"): every page of the tree,
//! every referenced block inside the file and owned once, and the space the file holds
//! split into data, metadata and leaks.
use super::{lock, ImageV2};
use crate::error::Result;
use crate::format::v2::{Mapping, BLOCK, FIRST_HOST_BLOCK};
use std::collections::HashSet;

/// What `check` found, in blocks of 4 KiB.
#[derive(Debug, Clone, Default)]
pub struct CheckV2 {
    pub corruptions: Vec<String>,
    pub virtual_blocks: u64,
    /// Blocks of the disk stored as data.
    pub data_blocks: u64,
    /// Blocks of the disk that read as zeros by a zero extent.
    pub zero_blocks: u64,
    /// Header slots, map pages and the journal region.
    pub metadata_blocks: u64,
    pub pages: u64,
    /// Blocks that hold bytes on disk but that nothing references.
    pub leaked_blocks: u64,
    pub leaks_fixed: u64,
    pub file_length: u64,
    pub allocated_bytes: u64,
}

/// Walks `image` (opened writable when `repair` is set, so that leaks can be punched).
pub fn check(image: &ImageV2, repair: bool) -> Result<CheckV2> {
    let mut r = CheckV2 {
        virtual_blocks: image.virtual_size.div_ceil(BLOCK),
        file_length: image
            .storage
            .len()
            .map_err(|e| image.io_err("reading length", 0, e))?,
        allocated_bytes: image.storage.allocated_bytes().unwrap_or(0),
        ..Default::default()
    };
    let path = image.path.display().to_string();
    // (first host block, blocks, what owns it)
    let mut owned: Vec<(u64, u64, String)> = vec![(0, FIRST_HOST_BLOCK, "the header".into())];
    let (journal_offset, journal_capacity) = {
        let st = lock(&image.state);
        (st.header.journal_offset, st.header.journal_capacity)
    };
    owned.push((
        journal_offset / BLOCK,
        journal_capacity / BLOCK,
        "the journal".into(),
    ));
    {
        let st = lock(&image.state);
        let tree = image.tree(&st);
        let mut seen = HashSet::new();
        let mut twice = Vec::new();
        let walked = tree.walk(
            &mut |page, level| {
                if !seen.insert(page) {
                    twice.push(page);
                }
                owned.push((page / BLOCK, 1, format!("the map page at level {level}")));
            },
            &mut |_| {},
        );
        if let Err(e) = walked {
            r.corruptions.push(e.to_string());
            return Ok(r);
        }
        for page in twice {
            r.corruptions.push(format!(
                "{path}: the map page at offset {page:#x} is reached twice"
            ));
        }
        r.pages = seen.len() as u64;
        let pieces = match image.resolve(&st, 0, r.virtual_blocks) {
            Ok(p) => p,
            Err(e) => {
                r.corruptions.push(e.to_string());
                return Ok(r);
            }
        };
        for p in pieces {
            match p.mapping {
                Mapping::Data(h) => {
                    r.data_blocks += p.len;
                    owned.push((h, p.len, format!("virtual block {:#x}", p.start)));
                }
                Mapping::Zero => r.zero_blocks += p.len,
                Mapping::Unmapped => {}
            }
        }
    }
    r.metadata_blocks = FIRST_HOST_BLOCK + journal_capacity / BLOCK + r.pages;
    owned.sort_by_key(|o| o.0);
    check_owners(image, &path, &owned, &mut r)?;
    find_leaks(image, &owned, repair, &mut r)?;
    Ok(r)
}

/// Every owned range inside the file and holding data, and no block with two owners.
fn check_owners(
    image: &ImageV2,
    path: &str,
    owned: &[(u64, u64, String)],
    r: &mut CheckV2,
) -> Result<()> {
    let mut reach: Option<(u64, &str)> = None;
    for (start, len, owner) in owned {
        if let Some((end, other)) = reach {
            if *start < end {
                r.corruptions.push(format!(
                    "{path}: host offset {:#x} belongs to both {other} and {owner}",
                    start * BLOCK
                ));
            }
        }
        if reach.is_none_or(|(end, _)| start + len > end) {
            reach = Some((start + len, owner));
        }
        let end = (start + len) * BLOCK;
        if owner.starts_with("virtual") || owner.starts_with("the map") {
            if end > r.file_length {
                r.corruptions.push(format!(
                    "{path}: {owner} at host offset {:#x} lies past the end of the file ({:#x})",
                    start * BLOCK,
                    r.file_length
                ));
                continue;
            }
            let hole = image
                .storage
                .first_hole_in(start * BLOCK, len * BLOCK)
                .map_err(|e| image.io_err("seeking holes", start * BLOCK, e))?;
            if let Some(at) = hole {
                r.corruptions.push(format!(
                    "{path}: {owner} references host offset {at:#x}, which is a hole (its data is lost)"
                ));
            }
        }
    }
    Ok(())
}

/// Data regions of the file that nothing owns; punched with `repair`.
fn find_leaks(
    image: &ImageV2,
    owned: &[(u64, u64, String)],
    repair: bool,
    r: &mut CheckV2,
) -> Result<()> {
    let storage = image.storage.as_ref();
    let file_blocks = r.file_length.div_ceil(BLOCK);
    let mut i = 0;
    let mut pos = FIRST_HOST_BLOCK;
    while pos < file_blocks {
        let Some(data) = storage
            .next_data(pos * BLOCK)
            .map_err(|e| image.io_err("seeking data", pos * BLOCK, e))?
        else {
            break;
        };
        let start = data / BLOCK;
        if start >= file_blocks {
            break;
        }
        let hole = storage
            .first_hole_in(start * BLOCK, (file_blocks - start) * BLOCK)
            .map_err(|e| image.io_err("seeking holes", start * BLOCK, e))?;
        let end = hole
            .map_or(file_blocks, |h| h.div_ceil(BLOCK))
            .max(start + 1);
        // The parts of [start, end) no owner covers.
        let mut p = start;
        while i < owned.len() && owned[i].0 + owned[i].1 <= p {
            i += 1;
        }
        let mut k = i;
        while p < end {
            while k < owned.len() && owned[k].0 + owned[k].1 <= p {
                k += 1;
            }
            let next_owned = owned.get(k).map_or(end, |o| o.0.max(p)).min(end);
            if next_owned > p {
                r.leaked_blocks += next_owned - p;
                if repair {
                    storage
                        .punch_hole(p * BLOCK, (next_owned - p) * BLOCK)
                        .map_err(|e| image.io_err("punching a leak", p * BLOCK, e))?;
                    r.leaks_fixed += next_owned - p;
                }
                p = next_owned;
            } else {
                p = owned[k].0 + owned[k].1;
            }
        }
        pos = end;
    }
    if repair && r.leaks_fixed > 0 {
        storage.sync().map_err(|e| image.io_err("syncing", 0, e))?;
    }
    Ok(())
}
