//! The header slot (FORMAT.md, "Header slots").
//!
//! ```text
//! offset size field
//! 0x000  8    magic "\x89COWIMG\n"
//! 0x008  4    version (1)
//! 0x00c  4    header_size (4096)
//! 0x010  8    incompatible_features (none defined; any set bit is refused)
//! 0x018  8    compatible_features (none defined; unknown bits are ignored)
//! 0x020  8    generation (<= 2^62): the valid slot with the larger generation is current
//! 0x028  1    cluster_bits (12..=21)
//! 0x029  1    backing_format (0 none, 1 raw, 2 cowimg, 3 qcow2)
//! 0x02a  2    backing_path_len (0..=2048)
//! 0x02c  4    reserved, zero
//! 0x030  8    virtual_size in bytes (<= 2^60)
//! 0x038  8    checkpoint_offset: byte offset of the checkpoint (0: empty map)
//! 0x040  8    checkpoint_entries: number of 48-byte map entries in it
//! 0x048  4    checkpoint_crc: CRC32 of the checkpoint's bytes
//! 0x04c  4    reserved, zero
//! 0x050  8    journal_offset: byte offset of the journal region (cluster aligned)
//! 0x058  8    journal_capacity in bytes (multiple of 4096)
//! 0x060  8    journal_epoch: every record of this journal carries it
//! 0x068  24   reserved, zero
//! 0x080  n    backing_path (UTF-8 bytes, no NUL), n = backing_path_len
//! ...         zero
//! 0xffc  4    crc32 of bytes 0x000..0xffc
//! ```
use super::{crc32, invalid, FormatError, Geometry, MAX_VIRTUAL_SIZE};
use byteorder::{ByteOrder, LittleEndian as LE};

pub const MAGIC: [u8; 8] = *b"\x89COWIMG\n";
pub const VERSION: u32 = 1;
pub const HEADER_SLOT_SIZE: usize = 4096;
/// Incompatible bit 0: the backing file is a qcow2 image (backing_format 3). It is set
/// exactly when backing_format is 3, so that a build that predates qcow2 backing files
/// refuses the image as using a feature it does not know (FORMAT.md, "Feature bits").
pub const INCOMPAT_QCOW2_BACKING: u64 = 1 << 0;
pub const SUPPORTED_INCOMPATIBLE: u64 = INCOMPAT_QCOW2_BACKING;
pub const MAX_BACKING_PATH: usize = 2048;
/// Generations grow by one per checkpoint or header change, so real images never come near
/// this; refusing larger ones keeps `generation + 1` from overflowing (a wrapped generation
/// would make the stale slot win at the next open). Writers refuse a header update that
/// would go past it (FORMAT.md, "Header slots"), so the image stays openable.
pub const MAX_GENERATION: u64 = 1 << 62;

pub(crate) const OFF_MAGIC: usize = 0x000;
pub(crate) const OFF_VERSION: usize = OFF_MAGIC + 8;
pub(crate) const OFF_HEADER_SIZE: usize = OFF_VERSION + 4;
pub(crate) const OFF_INCOMPAT: usize = OFF_HEADER_SIZE + 4;
pub(crate) const OFF_COMPAT: usize = OFF_INCOMPAT + 8;
pub(crate) const OFF_GENERATION: usize = OFF_COMPAT + 8;
pub(crate) const OFF_CLUSTER_BITS: usize = OFF_GENERATION + 8;
pub(crate) const OFF_BACKING_FORMAT: usize = OFF_CLUSTER_BITS + 1;
pub(crate) const OFF_BACKING_LEN: usize = OFF_BACKING_FORMAT + 1;
pub(crate) const OFF_RESERVED0: usize = OFF_BACKING_LEN + 2;
pub(crate) const OFF_VIRTUAL_SIZE: usize = OFF_RESERVED0 + 4;
pub(crate) const OFF_CKPT_OFFSET: usize = OFF_VIRTUAL_SIZE + 8;
pub(crate) const OFF_CKPT_ENTRIES: usize = OFF_CKPT_OFFSET + 8;
pub(crate) const OFF_CKPT_CRC: usize = OFF_CKPT_ENTRIES + 8;
pub(crate) const OFF_RESERVED1: usize = OFF_CKPT_CRC + 4;
pub(crate) const OFF_JOURNAL_OFFSET: usize = OFF_RESERVED1 + 4;
pub(crate) const OFF_JOURNAL_CAPACITY: usize = OFF_JOURNAL_OFFSET + 8;
pub(crate) const OFF_JOURNAL_EPOCH: usize = OFF_JOURNAL_CAPACITY + 8;
pub(crate) const OFF_RESERVED2: usize = OFF_JOURNAL_EPOCH + 8;
pub(crate) const OFF_BACKING_PATH: usize = 0x080;
pub(crate) const OFF_CRC: usize = HEADER_SLOT_SIZE - 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingFormat {
    Raw,
    Cowimg,
    /// Read-only: cowimg reads qcow2 files (and their own backing chains) but never writes
    /// into one.
    Qcow2,
}

impl BackingFormat {
    pub fn name(self) -> &'static str {
        match self {
            BackingFormat::Raw => "raw",
            BackingFormat::Cowimg => "cowimg",
            BackingFormat::Qcow2 => "qcow2",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "raw" => Some(BackingFormat::Raw),
            "cowimg" => Some(BackingFormat::Cowimg),
            "qcow2" => Some(BackingFormat::Qcow2),
            _ => None,
        }
    }
}

/// A decoded, validated header slot. Doc comments name the FORMAT.md section of each field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// "Header slots": the valid slot with the larger generation is the current one.
    pub generation: u64,
    /// "Feature bits".
    pub compatible_features: u64,
    /// "Geometry".
    pub cluster_bits: u32,
    /// "Backing file": path as the user gave it (relative paths resolve against the image's
    /// directory) and its recorded format, never probed.
    pub backing: Option<(String, BackingFormat)>,
    pub virtual_size: u64,
    /// "Checkpoint": where the full extent map was last written.
    pub checkpoint_offset: u64,
    pub checkpoint_entries: u64,
    pub checkpoint_crc: u32,
    /// "Journal".
    pub journal_offset: u64,
    pub journal_capacity: u64,
    pub journal_epoch: u64,
}

impl Header {
    pub fn geometry(&self) -> Geometry {
        Geometry::new(self.cluster_bits)
    }

    pub fn to_bytes(&self) -> [u8; HEADER_SLOT_SIZE] {
        let mut b = [0u8; HEADER_SLOT_SIZE];
        b[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&MAGIC);
        LE::write_u32(&mut b[OFF_VERSION..], VERSION);
        LE::write_u32(&mut b[OFF_HEADER_SIZE..], HEADER_SLOT_SIZE as u32);
        let incompatible = match &self.backing {
            Some((_, BackingFormat::Qcow2)) => INCOMPAT_QCOW2_BACKING,
            _ => 0,
        };
        LE::write_u64(&mut b[OFF_INCOMPAT..], incompatible);
        LE::write_u64(&mut b[OFF_COMPAT..], self.compatible_features);
        LE::write_u64(&mut b[OFF_GENERATION..], self.generation);
        b[OFF_CLUSTER_BITS] = self.cluster_bits as u8;
        let (fmt, path): (u8, &[u8]) = match &self.backing {
            None => (0, &[]),
            Some((p, BackingFormat::Raw)) => (1, p.as_bytes()),
            Some((p, BackingFormat::Cowimg)) => (2, p.as_bytes()),
            Some((p, BackingFormat::Qcow2)) => (3, p.as_bytes()),
        };
        b[OFF_BACKING_FORMAT] = fmt;
        LE::write_u16(&mut b[OFF_BACKING_LEN..], path.len() as u16);
        LE::write_u64(&mut b[OFF_VIRTUAL_SIZE..], self.virtual_size);
        LE::write_u64(&mut b[OFF_CKPT_OFFSET..], self.checkpoint_offset);
        LE::write_u64(&mut b[OFF_CKPT_ENTRIES..], self.checkpoint_entries);
        LE::write_u32(&mut b[OFF_CKPT_CRC..], self.checkpoint_crc);
        LE::write_u64(&mut b[OFF_JOURNAL_OFFSET..], self.journal_offset);
        LE::write_u64(&mut b[OFF_JOURNAL_CAPACITY..], self.journal_capacity);
        LE::write_u64(&mut b[OFF_JOURNAL_EPOCH..], self.journal_epoch);
        b[OFF_BACKING_PATH..OFF_BACKING_PATH + path.len()].copy_from_slice(path);
        let crc = crc32(&[&b[..OFF_CRC]]);
        LE::write_u32(&mut b[OFF_CRC..], crc);
        b
    }

    /// Decodes and validates one slot. Structural limits that need the file length (where the
    /// checkpoint and journal lie) are checked by the image layer.
    pub fn from_bytes(b: &[u8]) -> Result<Header, FormatError> {
        if b.len() < HEADER_SLOT_SIZE {
            return Err(FormatError::Truncated {
                need: HEADER_SLOT_SIZE,
                have: b.len(),
            });
        }
        if b[OFF_MAGIC..OFF_MAGIC + 8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        // The checksum comes before every other field: a torn slot (which recovery skips)
        // must be told apart from an intact slot this build cannot read (which it must not).
        let stored = LE::read_u32(&b[OFF_CRC..]);
        let computed = crc32(&[&b[..OFF_CRC]]);
        if stored != computed {
            return Err(FormatError::ChecksumMismatch { stored, computed });
        }
        let version = LE::read_u32(&b[OFF_VERSION..]);
        if version != VERSION {
            return Err(FormatError::UnsupportedVersion(version, VERSION));
        }
        let Common {
            cluster_bits,
            backing,
            generation,
            virtual_size,
            compatible_features,
        } = decode_common(
            b,
            &[
                (OFF_RESERVED0, 4),
                (OFF_RESERVED1, 4),
                (OFF_RESERVED2, OFF_BACKING_PATH - OFF_RESERVED2),
            ],
            MAX_VIRTUAL_SIZE,
        )?;
        let geometry = Geometry::new(cluster_bits);
        let cs = geometry.cluster_size();
        let checkpoint_offset = LE::read_u64(&b[OFF_CKPT_OFFSET..]);
        let checkpoint_entries = LE::read_u64(&b[OFF_CKPT_ENTRIES..]);
        if checkpoint_offset % cs != 0 || (checkpoint_offset == 0) != (checkpoint_entries == 0) {
            return Err(invalid("checkpoint_offset", OFF_CKPT_OFFSET, format!("{checkpoint_offset:#x} is not cluster aligned or disagrees with checkpoint_entries {checkpoint_entries}")));
        }
        if checkpoint_entries > geometry.clusters_for(virtual_size) {
            return Err(invalid(
                "checkpoint_entries",
                OFF_CKPT_ENTRIES,
                format!("{checkpoint_entries} entries for a {virtual_size}-byte image"),
            ));
        }
        let journal_offset = LE::read_u64(&b[OFF_JOURNAL_OFFSET..]);
        let journal_capacity = LE::read_u64(&b[OFF_JOURNAL_CAPACITY..]);
        if journal_offset == 0 || journal_offset % cs != 0 || journal_offset > MAX_VIRTUAL_SIZE {
            return Err(invalid(
                "journal_offset",
                OFF_JOURNAL_OFFSET,
                format!("{journal_offset:#x} is not a cluster-aligned data offset"),
            ));
        }
        if journal_capacity == 0
            || journal_capacity % super::BLOCK_SIZE != 0
            || journal_capacity > MAX_VIRTUAL_SIZE
        {
            return Err(invalid(
                "journal_capacity",
                OFF_JOURNAL_CAPACITY,
                format!("{journal_capacity} is not a positive multiple of 4096"),
            ));
        }
        Ok(Header {
            generation,
            compatible_features,
            cluster_bits,
            backing,
            virtual_size,
            checkpoint_offset,
            checkpoint_entries,
            checkpoint_crc: LE::read_u32(&b[OFF_CKPT_CRC..]),
            journal_offset,
            journal_capacity,
            journal_epoch: LE::read_u64(&b[OFF_JOURNAL_EPOCH..]),
        })
    }
}

/// The fields every version's slot shares, decoded and checked (FORMAT.md, "Header slots",
/// checks 4 to 10 and 15; FORMAT-v2.md, "Header slot").
pub(crate) struct Common {
    pub cluster_bits: u32,
    pub backing: Option<(String, BackingFormat)>,
    pub generation: u64,
    pub virtual_size: u64,
    pub compatible_features: u64,
}

/// Decodes the shared fields of a slot whose magic, checksum and version were checked.
/// `reserved` lists the version's reserved byte ranges.
pub(crate) fn decode_common(
    b: &[u8],
    reserved: &[(usize, usize)],
    max_virtual_size: u64,
) -> Result<Common, FormatError> {
    let header_size = LE::read_u32(&b[OFF_HEADER_SIZE..]);
    if header_size as usize != HEADER_SLOT_SIZE {
        return Err(invalid(
            "header_size",
            OFF_HEADER_SIZE,
            format!("{header_size} is not 4096"),
        ));
    }
    let incompatible = LE::read_u64(&b[OFF_INCOMPAT..]);
    if incompatible & !SUPPORTED_INCOMPATIBLE != 0 {
        return Err(FormatError::UnknownIncompatibleFeatures(
            incompatible & !SUPPORTED_INCOMPATIBLE,
        ));
    }
    let cluster_bits = b[OFF_CLUSTER_BITS] as u32;
    Geometry::checked(cluster_bits).ok_or_else(|| {
        invalid(
            "cluster_bits",
            OFF_CLUSTER_BITS,
            format!("{cluster_bits} is outside 12..=21"),
        )
    })?;
    let path_len = LE::read_u16(&b[OFF_BACKING_LEN..]) as usize;
    if path_len > MAX_BACKING_PATH {
        return Err(invalid(
            "backing_path_len",
            OFF_BACKING_LEN,
            format!("{path_len} exceeds {MAX_BACKING_PATH}"),
        ));
    }
    let path_bytes = &b[OFF_BACKING_PATH..OFF_BACKING_PATH + path_len];
    let backing = match b[OFF_BACKING_FORMAT] {
        0 if path_len == 0 && incompatible & INCOMPAT_QCOW2_BACKING != 0 => {
            return Err(invalid(
                "incompatible_features",
                OFF_INCOMPAT,
                "bit 0 (qcow2 backing file) is set without a backing file",
            ))
        }
        0 if path_len == 0 => None,
        0 => {
            return Err(invalid(
                "backing_format",
                OFF_BACKING_FORMAT,
                "none, but a backing path is set",
            ))
        }
        f @ (1..=3) => {
            if path_len == 0 {
                return Err(invalid(
                    "backing_path_len",
                    OFF_BACKING_LEN,
                    "a backing format is set but the path is empty",
                ));
            }
            let path = std::str::from_utf8(path_bytes)
                .map_err(|_| invalid("backing_path", OFF_BACKING_PATH, "not UTF-8"))?;
            if path.contains('\0') {
                return Err(invalid("backing_path", OFF_BACKING_PATH, "contains NUL"));
            }
            let fmt = match f {
                1 => BackingFormat::Raw,
                2 => BackingFormat::Cowimg,
                _ => BackingFormat::Qcow2,
            };
            if (fmt == BackingFormat::Qcow2) != (incompatible & INCOMPAT_QCOW2_BACKING != 0) {
                return Err(invalid(
                    "incompatible_features",
                    OFF_INCOMPAT,
                    "bit 0 (qcow2 backing file) is set exactly when backing_format is 3",
                ));
            }
            Some((path.to_string(), fmt))
        }
        f => {
            return Err(invalid(
                "backing_format",
                OFF_BACKING_FORMAT,
                format!("unknown value {f}"),
            ))
        }
    };
    for &(off, len) in reserved {
        if b[off..off + len].iter().any(|&x| x != 0) {
            return Err(invalid("reserved", off, "must be zero"));
        }
    }
    if b[OFF_BACKING_PATH + path_len..OFF_CRC]
        .iter()
        .any(|&x| x != 0)
    {
        return Err(invalid(
            "padding",
            OFF_BACKING_PATH + path_len,
            "must be zero",
        ));
    }
    let generation = LE::read_u64(&b[OFF_GENERATION..]);
    if generation > MAX_GENERATION {
        return Err(invalid(
            "generation",
            OFF_GENERATION,
            format!("{generation} exceeds 2^62"),
        ));
    }
    let virtual_size = LE::read_u64(&b[OFF_VIRTUAL_SIZE..]);
    if virtual_size > max_virtual_size {
        return Err(invalid(
            "virtual_size",
            OFF_VIRTUAL_SIZE,
            format!(
                "{virtual_size} exceeds 2^{}",
                max_virtual_size.trailing_zeros()
            ),
        ));
    }
    Ok(Common {
        cluster_bits,
        backing,
        generation,
        virtual_size,
        compatible_features: LE::read_u64(&b[OFF_COMPAT..]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            generation: 7,
            compatible_features: 0,
            cluster_bits: 16,
            backing: Some(("base.raw".into(), BackingFormat::Raw)),
            virtual_size: 1 << 30,
            checkpoint_offset: 0,
            checkpoint_entries: 0,
            checkpoint_crc: 0,
            journal_offset: 1 << 16,
            journal_capacity: 1 << 20,
            journal_epoch: 7,
        }
    }

    #[test]
    fn header_round_trips_through_bytes() {
        let h = sample();
        assert_eq!(Header::from_bytes(&h.to_bytes()).unwrap(), h);
    }

    #[test]
    fn every_flipped_bit_is_rejected_by_the_checksum_or_validation() {
        let bytes = sample().to_bytes();
        for bit in 0..HEADER_SLOT_SIZE * 8 {
            let mut b = bytes;
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(Header::from_bytes(&b).is_err(), "bit {bit} flip accepted");
        }
    }

    #[test]
    fn a_qcow2_backing_file_sets_incompatible_bit_0_and_decodes_back() {
        let mut h = sample();
        h.backing = Some(("cloud.qcow2".into(), BackingFormat::Qcow2));
        let b = h.to_bytes();
        assert_eq!(b[OFF_BACKING_FORMAT], 3);
        assert_eq!(LE::read_u64(&b[OFF_INCOMPAT..]), INCOMPAT_QCOW2_BACKING);
        assert_eq!(Header::from_bytes(&b), Ok(h));
        // Without the bit, backing_format 3 is refused (and the bit without format 3).
        let mut b = b;
        LE::write_u64(&mut b[OFF_INCOMPAT..], 0);
        let crc = crc32(&[&b[..OFF_CRC]]);
        LE::write_u32(&mut b[OFF_CRC..], crc);
        let e = Header::from_bytes(&b).unwrap_err();
        assert!(e.to_string().contains("incompatible_features"), "{e}");
    }

    #[test]
    fn unknown_incompatible_feature_is_refused_even_with_a_valid_checksum() {
        let mut b = sample().to_bytes();
        LE::write_u64(&mut b[OFF_INCOMPAT..], 1 << 5);
        let crc = crc32(&[&b[..OFF_CRC]]);
        LE::write_u32(&mut b[OFF_CRC..], crc);
        assert_eq!(
            Header::from_bytes(&b),
            Err(FormatError::UnknownIncompatibleFeatures(1 << 5))
        );
    }
}
