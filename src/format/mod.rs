//! On-disk format: bytes to structs and back, with validation. No I/O happens here.
//!
//! `format-spec/FORMAT.md` is the contract; every constant below points at the section of
//! that document that defines it. All integers on disk are little-endian.

pub mod header;
pub mod journal;
pub mod map_entry;
pub mod qcow2;
pub mod v2;

pub use header::{BackingFormat, Header, HEADER_SLOT_SIZE};
pub use journal::{JournalRecordHeader, JOURNAL_ITEM_SIZE, JOURNAL_RECORD_HEADER_SIZE};
pub use map_entry::{MapEntry, MapItem, MAP_ENTRY_SIZE};

/// Alignment of journal records and header slots (FORMAT.md, "Blocks"). Writes of this size
/// and alignment are the unit the crash protocol reasons about.
pub const BLOCK_SIZE: u64 = 4096;

/// The magic of a version-2 journal record (FORMAT-v2.md, "Journal").
pub const MAGIC_V2_RECORD: [u8; 4] = *b"CIJ2";

/// Smallest and largest cluster (FORMAT.md, "Geometry").
pub const MIN_CLUSTER_BITS: u32 = 12;
pub const MAX_CLUSTER_BITS: u32 = 21;
pub const DEFAULT_CLUSTER_BITS: u32 = 16;

/// A cluster holds at most 64 sub-cluster units so that each per-cluster bitmap is one u64
/// (FORMAT.md, "Geometry"). Units are never smaller than 4 KiB.
pub const MAX_UNITS_PER_CLUSTER: u32 = 64;
pub const MIN_UNIT_BITS: u32 = 12;

/// Largest virtual size: 2^60 bytes (1 EiB). It keeps every byte offset computed from a
/// cluster index far from u64 overflow.
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 60;

/// Errors found while decoding bytes. They carry the offset within the structure; the image
/// layer adds the file name and the structure's position in the file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("bad magic (not a cowimg image)")]
    BadMagic,
    #[error("unsupported version {0} (this build reads version {1})")]
    UnsupportedVersion(u32, u32),
    #[error("unknown incompatible feature bits {0:#x}")]
    UnknownIncompatibleFeatures(u64),
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    ChecksumMismatch { stored: u32, computed: u32 },
    #[error("field `{field}` at byte {offset:#x} is invalid: {reason}")]
    InvalidField {
        field: &'static str,
        offset: usize,
        reason: String,
    },
    #[error("structure truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
}

pub(crate) fn invalid(
    field: &'static str,
    offset: usize,
    reason: impl Into<String>,
) -> FormatError {
    FormatError::InvalidField {
        field,
        offset,
        reason: reason.into(),
    }
}

/// Cluster and sub-cluster sizes derived from `cluster_bits` (FORMAT.md, "Geometry").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub cluster_bits: u32,
    pub unit_bits: u32,
}

impl Geometry {
    /// Panics never: callers pass validated `cluster_bits` (see [`Geometry::checked`]).
    pub fn new(cluster_bits: u32) -> Self {
        let unit_bits = MIN_UNIT_BITS.max(cluster_bits.saturating_sub(6));
        Geometry {
            cluster_bits,
            unit_bits,
        }
    }

    pub fn checked(cluster_bits: u32) -> Option<Self> {
        (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS)
            .contains(&cluster_bits)
            .then(|| Self::new(cluster_bits))
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    pub fn unit_size(&self) -> u64 {
        1 << self.unit_bits
    }
    pub fn units_per_cluster(&self) -> u32 {
        1 << (self.cluster_bits - self.unit_bits)
    }
    /// Bitmap with one bit for every unit of a cluster.
    pub fn full_mask(&self) -> u64 {
        let n = self.units_per_cluster();
        if n == 64 {
            u64::MAX
        } else {
            (1u64 << n) - 1
        }
    }
    /// Number of virtual clusters that cover `virtual_size` bytes.
    pub fn clusters_for(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.cluster_size())
    }
    /// Host cluster index of the first cluster that may hold data: the two header slots
    /// occupy the first 8 KiB, which is one cluster or, for 4 KiB clusters, two.
    pub fn first_data_cluster(&self) -> u64 {
        (2 * HEADER_SLOT_SIZE as u64).div_ceil(self.cluster_size())
    }
}

pub(crate) fn crc32(parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for p in parts {
        h.update(p);
    }
    h.finalize()
}
