//! Version 2 structures (format-spec/FORMAT-v2.md): the header slot's map fields, map pages
//! (leaves of extents, internal pages of children) and journal records of extents.
//!
//! ```text
//! page:    0x00 "CIMP" | 0x04 crc32(0x08..0x1000) | 0x08 image_id | 0x10 generation
//!          0x18 level | 0x19 reserved | 0x1a count | 0x1c reserved | 0x20 items (16 bytes)
//! extent:  start | (length - 1) << 40   ,   host | kind << 56
//! child:   key                          ,   child page offset
//! record:  "CIJ2", crc, epoch, sequence, count, reserved, digest, extents (16 bytes each)
//! ```
use super::header::{self, Common, OFF_CRC, OFF_RESERVED0};
use super::{crc32, invalid, BackingFormat, FormatError, HEADER_SLOT_SIZE, MAGIC_V2_RECORD};
use byteorder::{ByteOrder, LittleEndian as LE};

pub const VERSION_2: u32 = 2;
/// Everything in version 2 is counted in 4096-byte blocks (FORMAT-v2.md, "Geometry").
pub const BLOCK: u64 = 4096;
pub const BLOCK_BITS: u32 = 12;
/// Virtual blocks are 40-bit numbers: at most 2^52 bytes.
pub const MAX_V2_VIRTUAL_SIZE: u64 = 1 << 52;
pub const VIRTUAL_BLOCK_LIMIT: u64 = 1 << 40;
/// Host blocks are 48-bit numbers.
pub const HOST_BLOCK_LIMIT: u64 = 1 << 48;
/// The two header slots.
pub const FIRST_HOST_BLOCK: u64 = 2;
/// An extent item's length is 24 bits, minus one.
pub const MAX_EXTENT_BLOCKS: u64 = 1 << 24;
pub const PAGE_MAGIC: [u8; 4] = *b"CIMP";
pub const PAGE_HEADER: usize = 32;
pub const ITEM_SIZE: usize = 16;
/// Items per page: (4096 - 32) / 16.
pub const PAGE_CAPACITY: usize = 254;
pub const MAX_HEIGHT: u8 = 8;
pub const MIN_JOURNAL: u64 = 64 << 10;
pub const MAX_JOURNAL: u64 = 64 << 20;

const OFF_MAP_ROOT: usize = 0x038;
const OFF_MAP_EXTENTS: usize = 0x040;
const OFF_MAP_HEIGHT: usize = 0x048;
const OFF_JOURNAL_OFFSET: usize = 0x050;
const OFF_JOURNAL_CAPACITY: usize = 0x058;
const OFF_JOURNAL_EPOCH: usize = 0x060;
const OFF_IMAGE_ID: usize = 0x068;
const RESERVED: [(usize, usize); 3] = [(OFF_RESERVED0, 4), (0x049, 7), (0x070, 0x10)];

/// A decoded, validated version-2 header slot (FORMAT-v2.md, "Header slot").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderV2 {
    pub generation: u64,
    pub compatible_features: u64,
    pub backing: Option<(String, BackingFormat)>,
    pub virtual_size: u64,
    /// Byte offset of the root page, 0 for an empty map.
    pub map_root: u64,
    /// 0 for an empty map, 1 when the root is a leaf.
    pub map_height: u8,
    pub map_extents: u64,
    pub journal_offset: u64,
    pub journal_capacity: u64,
    pub journal_epoch: u64,
    /// Every page carries it, so that a page of another image is refused.
    pub image_id: u64,
}

impl HeaderV2 {
    pub fn to_bytes(&self) -> [u8; HEADER_SLOT_SIZE] {
        let common = header::Header {
            generation: self.generation,
            compatible_features: self.compatible_features,
            cluster_bits: BLOCK_BITS,
            backing: self.backing.clone(),
            virtual_size: self.virtual_size,
            checkpoint_offset: 0,
            checkpoint_entries: 0,
            checkpoint_crc: 0,
            journal_offset: 0,
            journal_capacity: 0,
            journal_epoch: 0,
        };
        let mut b = common.to_bytes();
        LE::write_u32(&mut b[header::OFF_VERSION..], VERSION_2);
        b[0x038..0x080].fill(0);
        LE::write_u64(&mut b[OFF_MAP_ROOT..], self.map_root);
        LE::write_u64(&mut b[OFF_MAP_EXTENTS..], self.map_extents);
        b[OFF_MAP_HEIGHT] = self.map_height;
        LE::write_u64(&mut b[OFF_JOURNAL_OFFSET..], self.journal_offset);
        LE::write_u64(&mut b[OFF_JOURNAL_CAPACITY..], self.journal_capacity);
        LE::write_u64(&mut b[OFF_JOURNAL_EPOCH..], self.journal_epoch);
        LE::write_u64(&mut b[OFF_IMAGE_ID..], self.image_id);
        let crc = crc32(&[&b[..OFF_CRC]]);
        LE::write_u32(&mut b[OFF_CRC..], crc);
        b
    }

    /// Decodes a slot whose magic and checksum passed and whose version is 2.
    pub fn from_bytes(b: &[u8]) -> Result<HeaderV2, FormatError> {
        let Common {
            cluster_bits,
            backing,
            generation,
            virtual_size,
            compatible_features,
        } = header::decode_common(b, &RESERVED, MAX_V2_VIRTUAL_SIZE)?;
        if cluster_bits != BLOCK_BITS {
            return Err(invalid(
                "cluster_bits",
                header::OFF_CLUSTER_BITS,
                format!("{cluster_bits} is not 12 (version 2 maps 4 KiB blocks)"),
            ));
        }
        let map_root = LE::read_u64(&b[OFF_MAP_ROOT..]);
        let map_height = b[OFF_MAP_HEIGHT];
        let map_extents = LE::read_u64(&b[OFF_MAP_EXTENTS..]);
        if map_height > MAX_HEIGHT {
            return Err(invalid(
                "map_height",
                OFF_MAP_HEIGHT,
                format!("{map_height} exceeds {MAX_HEIGHT}"),
            ));
        }
        if (map_root == 0) != (map_height == 0) || (map_height == 0 && map_extents != 0) {
            return Err(invalid(
                "map_root",
                OFF_MAP_ROOT,
                format!("{map_root:#x} disagrees with map_height {map_height} and map_extents {map_extents}"),
            ));
        }
        if map_root != 0 && !is_page_offset(map_root) {
            return Err(invalid(
                "map_root",
                OFF_MAP_ROOT,
                format!("{map_root:#x} is not a block past the header slots"),
            ));
        }
        let journal_offset = LE::read_u64(&b[OFF_JOURNAL_OFFSET..]);
        if !is_page_offset(journal_offset) {
            return Err(invalid(
                "journal_offset",
                OFF_JOURNAL_OFFSET,
                format!("{journal_offset:#x} is not a block past the header slots"),
            ));
        }
        let journal_capacity = LE::read_u64(&b[OFF_JOURNAL_CAPACITY..]);
        if !(MIN_JOURNAL..=MAX_JOURNAL).contains(&journal_capacity) || journal_capacity % BLOCK != 0
        {
            return Err(invalid(
                "journal_capacity",
                OFF_JOURNAL_CAPACITY,
                format!("{journal_capacity} is not a multiple of 4096 from 64 KiB to 64 MiB"),
            ));
        }
        let image_id = LE::read_u64(&b[OFF_IMAGE_ID..]);
        if image_id == 0 {
            return Err(invalid("image_id", OFF_IMAGE_ID, "is zero"));
        }
        Ok(HeaderV2 {
            generation,
            compatible_features,
            backing,
            virtual_size,
            map_root,
            map_height,
            map_extents,
            journal_offset,
            journal_capacity,
            journal_epoch: LE::read_u64(&b[OFF_JOURNAL_EPOCH..]),
            image_id,
        })
    }

    pub fn virtual_blocks(&self) -> u64 {
        self.virtual_size.div_ceil(BLOCK)
    }
}

/// A multiple of 4096 past the header slots, with room for a block below 2^60.
fn is_page_offset(offset: u64) -> bool {
    offset.is_multiple_of(BLOCK)
        && (FIRST_HOST_BLOCK * BLOCK..HOST_BLOCK_LIMIT * BLOCK).contains(&offset)
}

/// What a range of virtual blocks reads as (FORMAT-v2.md, "Leaf items").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mapping {
    /// Host blocks `h ..`, one per virtual block.
    Data(u64),
    Zero,
    /// Falls through to the backing file; in journal records and in memory only.
    Unmapped,
}

impl Mapping {
    /// The mapping of the block `n` blocks into a range that starts with this one.
    pub fn advanced(self, n: u64) -> Mapping {
        match self {
            Mapping::Data(h) => Mapping::Data(h + n),
            other => other,
        }
    }
}

/// `len` virtual blocks from `start`, all mapped the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub len: u64,
    pub mapping: Mapping,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }

    /// The extent in pieces of at most 2^24 blocks, the most one item holds on disk.
    pub fn split_for_disk(self) -> impl Iterator<Item = Extent> {
        let pieces = self.len.div_ceil(MAX_EXTENT_BLOCKS);
        (0..pieces).map(move |i| {
            let off = i * MAX_EXTENT_BLOCKS;
            Extent {
                start: self.start + off,
                len: (self.len - off).min(MAX_EXTENT_BLOCKS),
                mapping: self.mapping.advanced(off),
            }
        })
    }

    pub fn encode(&self, out: &mut [u8]) {
        debug_assert!(self.len >= 1 && self.len <= MAX_EXTENT_BLOCKS);
        LE::write_u64(&mut out[0..], self.start | (self.len - 1) << 40);
        let second = match self.mapping {
            Mapping::Data(h) => h | 1 << 56,
            Mapping::Zero => 2 << 56,
            Mapping::Unmapped => 3 << 56,
        };
        LE::write_u64(&mut out[8..], second);
    }

    /// Decodes one item; `unmapped_allowed` for journal records only.
    pub fn decode(b: &[u8], at: usize, unmapped_allowed: bool) -> Result<Extent, FormatError> {
        let first = LE::read_u64(&b[at..]);
        let second = LE::read_u64(&b[at + 8..]);
        let start = first & (VIRTUAL_BLOCK_LIMIT - 1);
        let len = (first >> 40) + 1;
        let host = second & (HOST_BLOCK_LIMIT - 1);
        if (second >> 48) & 0xff != 0 {
            return Err(invalid("extent", at + 8, "reserved bits 48..56 are set"));
        }
        let mapping = match second >> 56 {
            1 if (FIRST_HOST_BLOCK..HOST_BLOCK_LIMIT).contains(&host)
                && host + len <= HOST_BLOCK_LIMIT =>
            {
                Mapping::Data(host)
            }
            1 => {
                return Err(invalid(
                    "extent",
                    at + 8,
                    format!("data at host block {host:#x} is outside the data area"),
                ))
            }
            2 | 3 if host != 0 => {
                return Err(invalid("extent", at + 8, "a host block without data"))
            }
            2 => Mapping::Zero,
            3 if unmapped_allowed => Mapping::Unmapped,
            kind => {
                return Err(invalid(
                    "extent",
                    at + 8,
                    format!("kind {kind} is not valid here"),
                ))
            }
        };
        Ok(Extent {
            start,
            len,
            mapping,
        })
    }
}

/// What a page holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageBody {
    Leaf(Vec<Extent>),
    /// `(first virtual block of the child's range, the child's byte offset)`.
    Internal(Vec<(u64, u64)>),
}

impl PageBody {
    pub fn len(&self) -> usize {
        match self {
            PageBody::Leaf(e) => e.len(),
            PageBody::Internal(c) => c.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub fn encode_page(image_id: u64, generation: u64, level: u8, body: &PageBody) -> Vec<u8> {
    debug_assert!(!body.is_empty() && body.len() <= PAGE_CAPACITY);
    let mut b = vec![0u8; BLOCK as usize];
    b[0..4].copy_from_slice(&PAGE_MAGIC);
    LE::write_u64(&mut b[0x08..], image_id);
    LE::write_u64(&mut b[0x10..], generation);
    b[0x18] = level;
    LE::write_u16(&mut b[0x1a..], body.len() as u16);
    match body {
        PageBody::Leaf(extents) => {
            for (i, e) in extents.iter().enumerate() {
                e.encode(&mut b[PAGE_HEADER + ITEM_SIZE * i..]);
            }
        }
        PageBody::Internal(children) => {
            for (i, &(key, child)) in children.iter().enumerate() {
                let at = PAGE_HEADER + ITEM_SIZE * i;
                LE::write_u64(&mut b[at..], key);
                LE::write_u64(&mut b[at + 8..], child);
            }
        }
    }
    let crc = crc32(&[&b[0x08..]]);
    LE::write_u32(&mut b[0x04..], crc);
    b
}

/// What a page must agree with: where its parent says it is in the tree.
#[derive(Debug, Clone, Copy)]
pub struct PageContext {
    pub image_id: u64,
    pub max_generation: u64,
    pub level: u8,
    /// The virtual blocks `[lo, hi)` the page covers.
    pub lo: u64,
    pub hi: u64,
    pub virtual_blocks: u64,
    /// Child pages lie below this byte offset (the file's length).
    pub file_len: u64,
}

pub fn decode_page(b: &[u8], cx: &PageContext) -> Result<PageBody, FormatError> {
    if b.len() != BLOCK as usize {
        return Err(FormatError::Truncated {
            need: BLOCK as usize,
            have: b.len(),
        });
    }
    if b[0..4] != PAGE_MAGIC {
        return Err(invalid("magic", 0, "not a map page"));
    }
    let stored = LE::read_u32(&b[0x04..]);
    let computed = crc32(&[&b[0x08..]]);
    if stored != computed {
        return Err(FormatError::ChecksumMismatch { stored, computed });
    }
    let image_id = LE::read_u64(&b[0x08..]);
    if image_id != cx.image_id {
        return Err(invalid(
            "image_id",
            0x08,
            format!(
                "{image_id:#x} is another image's (this image is {:#x})",
                cx.image_id
            ),
        ));
    }
    let generation = LE::read_u64(&b[0x10..]);
    if generation > cx.max_generation {
        return Err(invalid(
            "generation",
            0x10,
            format!(
                "{generation} is newer than the header's {}",
                cx.max_generation
            ),
        ));
    }
    if b[0x18] != cx.level {
        return Err(invalid(
            "level",
            0x18,
            format!(
                "{} where its parent expects {} (a loop or a misplaced page)",
                b[0x18], cx.level
            ),
        ));
    }
    if b[0x19] != 0 || LE::read_u32(&b[0x1c..]) != 0 {
        return Err(invalid("reserved", 0x19, "must be zero"));
    }
    let count = LE::read_u16(&b[0x1a..]) as usize;
    if count == 0 || count > PAGE_CAPACITY {
        return Err(invalid(
            "count",
            0x1a,
            format!("{count} is not 1..={PAGE_CAPACITY}"),
        ));
    }
    let items_end = PAGE_HEADER + ITEM_SIZE * count;
    if let Some(p) = b[items_end..].iter().position(|&x| x != 0) {
        return Err(invalid("padding", items_end + p, "must be zero"));
    }
    if cx.level == 0 {
        decode_leaf(b, count, cx).map(PageBody::Leaf)
    } else {
        decode_children(b, count, cx).map(PageBody::Internal)
    }
}

/// A leaf's extents: kinds 1 and 2, sorted, inside the page's range and the disk.
fn decode_leaf(b: &[u8], count: usize, cx: &PageContext) -> Result<Vec<Extent>, FormatError> {
    let hi = cx.hi.min(cx.virtual_blocks.max(cx.lo + 1));
    let mut extents = Vec::with_capacity(count);
    let mut prev_end = cx.lo;
    for i in 0..count {
        let at = PAGE_HEADER + ITEM_SIZE * i;
        let e = Extent::decode(b, at, false)?;
        if e.start < prev_end || e.end() > cx.hi || e.end() > cx.virtual_blocks {
            return Err(invalid(
                "extent",
                at,
                format!(
                    "blocks {:#x}..{:#x} are out of order or outside the page's range {:#x}..{hi:#x}",
                    e.start,
                    e.end(),
                    cx.lo,
                ),
            ));
        }
        prev_end = e.end();
        extents.push(e);
    }
    Ok(extents)
}

/// An internal page's children: keys increasing inside the range, pages inside the file.
fn decode_children(
    b: &[u8],
    count: usize,
    cx: &PageContext,
) -> Result<Vec<(u64, u64)>, FormatError> {
    let mut children: Vec<(u64, u64)> = Vec::with_capacity(count);
    for i in 0..count {
        let at = PAGE_HEADER + ITEM_SIZE * i;
        let key = LE::read_u64(&b[at..]);
        let child = LE::read_u64(&b[at + 8..]);
        let in_order = match children.last() {
            None => key >= cx.lo && key < cx.hi,
            Some(&(k, _)) => key > k && key < cx.hi,
        };
        if !in_order {
            return Err(invalid(
                "key",
                at,
                format!(
                    "{key:#x} is out of order or outside the page's range {:#x}..{:#x}",
                    cx.lo, cx.hi
                ),
            ));
        }
        if !is_page_offset(child) || child + BLOCK > cx.file_len {
            return Err(invalid(
                "child",
                at + 8,
                format!("{child:#x} is not a block inside the file"),
            ));
        }
        children.push((key, child));
    }
    Ok(children)
}

/// A version-2 journal record (FORMAT-v2.md, "Journal"): the framing of version 1's with
/// 16-byte extents and no written bitmaps.
pub fn encode_record(epoch: u64, sequence: u64, items: &[Extent], digest: u64) -> Vec<u8> {
    let body = items.len() * ITEM_SIZE;
    let mut b = vec![0u8; record_len(items.len() as u64) as usize];
    b[0..4].copy_from_slice(&MAGIC_V2_RECORD);
    LE::write_u64(&mut b[0x08..], epoch);
    LE::write_u64(&mut b[0x10..], sequence);
    LE::write_u32(&mut b[0x18..], items.len() as u32);
    LE::write_u64(&mut b[0x20..], digest);
    for (i, e) in items.iter().enumerate() {
        e.encode(&mut b[RECORD_HEADER + ITEM_SIZE * i..]);
    }
    let crc = crc32(&[&b[0x08..RECORD_HEADER + body]]);
    LE::write_u32(&mut b[0x04..], crc);
    b
}

pub const RECORD_HEADER: usize = 40;

/// Bytes a record of `items` extents occupies, padding included.
pub fn record_len(items: u64) -> u64 {
    (RECORD_HEADER as u64 + items * ITEM_SIZE as u64).next_multiple_of(BLOCK)
}

/// The fixed part of a record that may be the next one: `(item count, crc, digest)`.
pub fn parse_record_header(b: &[u8], epoch: u64, sequence: u64) -> Option<RecordHeader> {
    let flags = LE::read_u32(&b[0x1c..]);
    // Only the first record of a journal may be a carried one.
    let flags_ok = flags == 0 || (flags == RECORD_CARRIED && sequence == 1);
    (b[0..4] == MAGIC_V2_RECORD
        && LE::read_u64(&b[0x08..]) == epoch
        && LE::read_u64(&b[0x10..]) == sequence
        && flags_ok)
        .then(|| RecordHeader {
            count: LE::read_u32(&b[0x18..]),
            crc: LE::read_u32(&b[0x04..]),
            digest: LE::read_u64(&b[0x20..]),
            carried: flags == RECORD_CARRIED,
        })
}

/// The fixed part of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub count: u32,
    pub crc: u32,
    pub digest: u64,
    /// The changes a tree flush left out, carried into its new journal: their data was
    /// durable before the record was written, so replay never reads it back.
    pub carried: bool,
}

/// Flag (at 0x1c) of a carried record (FORMAT-v2.md, "Journal").
pub const RECORD_CARRIED: u32 = 1;

/// The first record of a new journal holding the changes its tree flush left out.
pub fn encode_carried_record(epoch: u64, items: &[Extent]) -> Vec<u8> {
    let mut b = encode_record(epoch, 1, items, 0);
    LE::write_u32(&mut b[0x1c..], RECORD_CARRIED);
    let end = RECORD_HEADER + items.len() * ITEM_SIZE;
    let crc = crc32(&[&b[0x08..end]]);
    LE::write_u32(&mut b[0x04..], crc);
    b
}

/// The sequence of what looks like a record of `epoch` (for "damage in the middle").
pub fn peek_record_sequence(b: &[u8], epoch: u64) -> Option<u64> {
    (b[0..4] == MAGIC_V2_RECORD && LE::read_u64(&b[0x08..]) == epoch)
        .then(|| LE::read_u64(&b[0x10..]))
}

/// Checks a record's checksum and decodes its items: sorted, not overlapping, inside the
/// virtual size.
pub fn decode_record_items(
    b: &[u8],
    count: u32,
    crc: u32,
    virtual_blocks: u64,
) -> Result<Vec<Extent>, FormatError> {
    let end = RECORD_HEADER + count as usize * ITEM_SIZE;
    let computed = crc32(&[&b[0x08..end]]);
    if computed != crc {
        return Err(FormatError::ChecksumMismatch {
            stored: crc,
            computed,
        });
    }
    let mut items = Vec::with_capacity(count as usize);
    let mut prev_end = 0;
    for i in 0..count as usize {
        let at = RECORD_HEADER + ITEM_SIZE * i;
        let e = Extent::decode(b, at, true)?;
        if e.start < prev_end || e.end() > virtual_blocks {
            return Err(invalid(
                "extent",
                at,
                format!(
                    "blocks {:#x}..{:#x} are out of order or past the virtual size",
                    e.start,
                    e.end()
                ),
            ));
        }
        prev_end = e.end();
        items.push(e);
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cx(level: u8) -> PageContext {
        PageContext {
            image_id: 7,
            max_generation: 3,
            level,
            lo: 0,
            hi: VIRTUAL_BLOCK_LIMIT,
            virtual_blocks: 1 << 20,
            file_len: 1 << 30,
        }
    }

    #[test]
    fn a_leaf_round_trips_and_every_flipped_bit_is_refused() {
        let body = PageBody::Leaf(vec![
            Extent {
                start: 3,
                len: 2,
                mapping: Mapping::Data(100),
            },
            Extent {
                start: 9,
                len: 1 << 10,
                mapping: Mapping::Zero,
            },
        ]);
        let page = encode_page(7, 2, 0, &body);
        assert_eq!(decode_page(&page, &cx(0)).unwrap(), body);
        for bit in 0..page.len() * 8 {
            let mut p = page.clone();
            p[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_page(&p, &cx(0)).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn a_page_at_the_wrong_level_or_of_another_image_is_refused() {
        let page = encode_page(7, 2, 1, &PageBody::Internal(vec![(0, 8192)]));
        assert!(decode_page(&page, &cx(1)).is_ok());
        assert!(decode_page(&page, &cx(0)).is_err());
        let other = PageContext {
            image_id: 8,
            ..cx(1)
        };
        assert!(decode_page(&page, &other).is_err());
        let older_header = PageContext {
            max_generation: 1,
            ..cx(1)
        };
        assert!(decode_page(&page, &older_header).is_err());
    }

    #[test]
    fn a_record_round_trips_and_refuses_overlapping_items() {
        let items = [
            Extent {
                start: 0,
                len: 4,
                mapping: Mapping::Unmapped,
            },
            Extent {
                start: 4,
                len: 1,
                mapping: Mapping::Data(5),
            },
        ];
        let r = encode_record(11, 1, &items, 99);
        let h = parse_record_header(&r, 11, 1).unwrap();
        assert_eq!((h.digest, h.carried), (99, false));
        assert_eq!(
            decode_record_items(&r, h.count, h.crc, 1 << 20).unwrap(),
            items
        );
        let carried = encode_carried_record(11, &items);
        let h = parse_record_header(&carried, 11, 1).unwrap();
        assert!(h.carried);
        assert_eq!(
            decode_record_items(&carried, h.count, h.crc, 1 << 20).unwrap(),
            items
        );
        assert!(
            parse_record_header(&carried, 11, 2).is_none(),
            "only record 1 is carried"
        );
        let overlapping = [items[1], items[0]];
        let r = encode_record(11, 1, &overlapping, 99);
        let h = parse_record_header(&r, 11, 1).unwrap();
        assert!(decode_record_items(&r, h.count, h.crc, 1 << 20).is_err());
    }

    #[test]
    fn a_version_2_header_round_trips() {
        let h = HeaderV2 {
            generation: 5,
            compatible_features: 0,
            backing: Some(("base.raw".into(), BackingFormat::Raw)),
            virtual_size: 1 << 40,
            map_root: 3 * BLOCK,
            map_height: 2,
            map_extents: 17,
            journal_offset: 8 * BLOCK,
            journal_capacity: 1 << 20,
            journal_epoch: 42,
            image_id: 9,
        };
        let b = h.to_bytes();
        assert_eq!(LE::read_u32(&b[8..]), 2);
        assert_eq!(HeaderV2::from_bytes(&b).unwrap(), h);
    }
}
