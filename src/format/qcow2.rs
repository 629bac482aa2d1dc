//! qcow2 structures: the header with its extensions, and L1/L2 entries, decoded and
//! validated; and the header that `convert -O qcow2` writes. No I/O happens here.
//!
//! The contract is qemu's `docs/interop/qcow2.rst`. All integers are big-endian.
//!
//! ```text
//! offset size  field (version 2 ends at 0x48; version 3 at header_length, >= 0x68)
//! 0x00   4     magic "QFI\xfb"
//! 0x04   4     version (2 or 3)
//! 0x08   8     backing_file_offset (0: none)
//! 0x10   4     backing_file_size (bytes, at most 1023)
//! 0x14   4     cluster_bits (9..=21)
//! 0x18   8     size (virtual size in bytes)
//! 0x20   4     crypt_method (0: none)
//! 0x24   4     l1_size (entries)
//! 0x28   8     l1_table_offset
//! 0x30   8     refcount_table_offset
//! 0x38   4     refcount_table_clusters
//! 0x3c   4     nb_snapshots
//! 0x40   8     snapshots_offset
//! 0x48   8     incompatible_features  (v3)
//! 0x50   8     compatible_features    (v3)
//! 0x58   8     autoclear_features     (v3)
//! 0x60   4     refcount_order         (v3; version 2 is always 4)
//! 0x64   4     header_length          (v3)
//! 0x68   1     compression_type       (v3, when header_length > 0x68)
//! then header extensions (type u32, length u32, data padded to 8 bytes) up to type 0,
//! all inside the first cluster, and the backing file name.
//! ```
use super::{invalid, FormatError};
use byteorder::{ByteOrder, BE};

pub const MAGIC: [u8; 4] = *b"QFI\xfb";

const OFF_VERSION: usize = 0x04;
const OFF_BACKING_OFFSET: usize = 0x08;
const OFF_BACKING_SIZE: usize = 0x10;
const OFF_CLUSTER_BITS: usize = 0x14;
const OFF_SIZE: usize = 0x18;
const OFF_CRYPT: usize = 0x20;
const OFF_L1_SIZE: usize = 0x24;
const OFF_L1_OFFSET: usize = 0x28;
const OFF_REFCOUNT_OFFSET: usize = 0x30;
const OFF_REFCOUNT_CLUSTERS: usize = 0x38;
const OFF_NB_SNAPSHOTS: usize = 0x3c;
const OFF_SNAPSHOTS_OFFSET: usize = 0x40;
const OFF_INCOMPATIBLE: usize = 0x48;
const OFF_COMPATIBLE: usize = 0x50;
const OFF_AUTOCLEAR: usize = 0x58;
const OFF_REFCOUNT_ORDER: usize = 0x60;
const OFF_HEADER_LENGTH: usize = 0x64;
const OFF_COMPRESSION_TYPE: usize = 0x68;

/// Length of a version 2 header, and of the version 3 header without compression_type.
pub const V2_HEADER_LENGTH: usize = 0x48;
pub const V3_MIN_HEADER_LENGTH: usize = 0x68;
/// The version 3 header this build writes: with compression_type, padded to 8 bytes.
pub const V3_HEADER_LENGTH: usize = 0x70;

/// Incompatible feature bits (qcow2.rst, "Header").
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
/// Everything this reader understands; any other incompatible bit is refused.
const SUPPORTED_INCOMPATIBLE: u64 = INCOMPAT_DIRTY
    | INCOMPAT_CORRUPT
    | INCOMPAT_DATA_FILE
    | INCOMPAT_COMPRESSION
    | INCOMPAT_EXTENDED_L2;
/// Compatible bit 0: refcounts may be stale while the dirty bit is set.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear bit 1: the external data file is a raw image (guest offset = host offset).
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Header extension types (qcow2.rst, "Header extensions").
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_DATA_FILE: u32 = 0x4441_5441;
const EXT_FULL_DISK_ENCRYPTION: u32 = 0x0537_be77;

/// qemu refuses longer backing file names (and so does this reader).
pub const MAX_BACKING_NAME: usize = 1023;
/// qemu's bound on the L1 table (QCOW_MAX_L1_SIZE): 32 MiB of entries, which maps
/// 2^61 bytes with 2 MiB clusters. It caps the one table read whole at open.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Clusters of 512 bytes to 2 MiB, as qemu allows.
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Extended L2 entries need 16 KiB clusters or larger (sub-clusters of at least 512 bytes).
const MIN_EXTENDED_L2_CLUSTER_BITS: u32 = 14;
pub const SUBCLUSTERS_PER_CLUSTER: u32 = 32;
/// Largest virtual size this reader accepts: the one cowimg accepts (2^60, see
/// `MAX_VIRTUAL_SIZE`), which keeps offset arithmetic far from overflow.
pub const MAX_SIZE: u64 = super::MAX_VIRTUAL_SIZE;

/// Bits 9 to 55 of an L1 or standard L2 entry: a host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const ZERO_FLAG: u64 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Zlib,
    Zstd,
}

/// The decoded header and what its extensions say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub compression: Compression,
    /// The backing file name as recorded, and the backing format extension's value.
    pub backing: Option<(String, Option<String>)>,
    /// The external data file's name (header extension).
    pub data_file: Option<String>,
}

impl Qcow2Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTENDED_L2 != 0
    }
    pub fn has_data_file(&self) -> bool {
        self.incompatible & INCOMPAT_DATA_FILE != 0
    }
    /// Bytes of one L2 entry: 8, or 16 with extended L2 (the entry and its bitmaps).
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }
    /// Entries of one L2 table, which fills one cluster.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }
    /// L1 entries needed to map `size` bytes.
    pub fn l1_entries_needed(&self) -> u64 {
        self.size
            .div_ceil(self.cluster_size())
            .div_ceil(self.l2_entries())
    }
}

/// Whether `bytes` (the start of a file) begin with the qcow2 magic.
pub fn has_magic(bytes: &[u8]) -> bool {
    bytes.len() >= MAGIC.len() && bytes[..MAGIC.len()] == MAGIC
}

/// Reads the cluster size from the start of a header, so that the caller knows how much
/// of the file to read for [`Qcow2Header::from_first_cluster`]. Checks magic and version.
pub fn peek_cluster_bits(b: &[u8]) -> Result<u32, FormatError> {
    need(b, V2_HEADER_LENGTH)?;
    if !has_magic(b) {
        return Err(invalid("magic", 0, "not a qcow2 image"));
    }
    let version = BE::read_u32(&b[OFF_VERSION..]);
    if !(2..=3).contains(&version) {
        return Err(invalid(
            "version",
            OFF_VERSION,
            format!("{version} is not 2 or 3"),
        ));
    }
    let cluster_bits = BE::read_u32(&b[OFF_CLUSTER_BITS..]);
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(invalid(
            "cluster_bits",
            OFF_CLUSTER_BITS,
            format!("{cluster_bits} is outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"),
        ));
    }
    Ok(cluster_bits)
}

fn need(b: &[u8], n: usize) -> Result<(), FormatError> {
    if b.len() < n {
        return Err(FormatError::Truncated {
            need: n,
            have: b.len(),
        });
    }
    Ok(())
}

/// Checks that `[offset, offset + len)` is a cluster-aligned range inside a file of
/// `file_len` bytes and not in the header cluster.
fn check_table(
    field: &'static str,
    at: usize,
    offset: u64,
    len: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<(), FormatError> {
    if !offset.is_multiple_of(cluster_size) {
        return Err(invalid(
            field,
            at,
            format!("{offset:#x} is not aligned to the cluster size"),
        ));
    }
    if offset == 0 && len > 0 {
        return Err(invalid(field, at, "points into the header (cluster 0)"));
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(invalid(
            field,
            at,
            format!(
                "{len:#x} bytes at {offset:#x} go past the end of the file ({file_len:#x} bytes)"
            ),
        )),
    }
}

impl Qcow2Header {
    /// Decodes the header from the file's first cluster (or the whole file, when shorter),
    /// with the extensions and the backing file name, and checks every table it names
    /// against `file_len`, so that nothing is allocated or read for a table that the
    /// file cannot hold.
    pub fn from_first_cluster(b: &[u8], file_len: u64) -> Result<Qcow2Header, FormatError> {
        let cluster_bits = peek_cluster_bits(b)?;
        let cluster_size = 1u64 << cluster_bits;
        let version = BE::read_u32(&b[OFF_VERSION..]);
        let crypt = BE::read_u32(&b[OFF_CRYPT..]);
        if crypt != 0 {
            return Err(invalid(
                "crypt_method",
                OFF_CRYPT,
                format!("encrypted images (method {crypt}) are not supported"),
            ));
        }
        let (incompatible, compatible, autoclear, refcount_order, header_length) = if version == 2 {
            (0, 0, 0, 4, V2_HEADER_LENGTH)
        } else {
            need(b, V3_MIN_HEADER_LENGTH)?;
            let header_length = BE::read_u32(&b[OFF_HEADER_LENGTH..]) as usize;
            if header_length < V3_MIN_HEADER_LENGTH
                || !header_length.is_multiple_of(8)
                || header_length as u64 > cluster_size
            {
                return Err(invalid(
                    "header_length",
                    OFF_HEADER_LENGTH,
                    format!(
                        "{header_length} is not a multiple of 8 from {V3_MIN_HEADER_LENGTH} to the cluster size"
                    ),
                ));
            }
            need(b, header_length)?;
            (
                BE::read_u64(&b[OFF_INCOMPATIBLE..]),
                BE::read_u64(&b[OFF_COMPATIBLE..]),
                BE::read_u64(&b[OFF_AUTOCLEAR..]),
                BE::read_u32(&b[OFF_REFCOUNT_ORDER..]),
                header_length,
            )
        };
        let unknown = incompatible & !SUPPORTED_INCOMPATIBLE;
        if unknown != 0 {
            return Err(FormatError::UnknownIncompatibleFeatures(unknown));
        }
        if refcount_order > 6 {
            return Err(invalid(
                "refcount_order",
                OFF_REFCOUNT_ORDER,
                format!("{refcount_order} is above 6"),
            ));
        }
        let compression = if header_length > OFF_COMPRESSION_TYPE {
            match b[OFF_COMPRESSION_TYPE] {
                0 => Compression::Zlib,
                1 => Compression::Zstd,
                t => {
                    return Err(invalid(
                        "compression_type",
                        OFF_COMPRESSION_TYPE,
                        format!("unknown value {t}"),
                    ))
                }
            }
        } else {
            Compression::Zlib
        };
        // qemu keeps the two in step: a non-zlib type needs the bit, and the bit a type.
        if (compression != Compression::Zlib) != (incompatible & INCOMPAT_COMPRESSION != 0) {
            return Err(invalid(
                "compression_type",
                OFF_COMPRESSION_TYPE,
                "does not match the compression type feature bit",
            ));
        }
        let extended_l2 = incompatible & INCOMPAT_EXTENDED_L2 != 0;
        if extended_l2 && cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS {
            return Err(invalid(
                "incompatible_features",
                OFF_INCOMPATIBLE,
                "extended L2 entries need clusters of 16 KiB or more",
            ));
        }
        let size = BE::read_u64(&b[OFF_SIZE..]);
        if size > MAX_SIZE {
            return Err(invalid("size", OFF_SIZE, format!("{size:#x} exceeds 2^60")));
        }
        let l1_size = BE::read_u32(&b[OFF_L1_SIZE..]);
        let l1_table_offset = BE::read_u64(&b[OFF_L1_OFFSET..]);
        let refcount_table_offset = BE::read_u64(&b[OFF_REFCOUNT_OFFSET..]);
        let refcount_table_clusters = BE::read_u32(&b[OFF_REFCOUNT_CLUSTERS..]);
        let nb_snapshots = BE::read_u32(&b[OFF_NB_SNAPSHOTS..]);
        let snapshots_offset = BE::read_u64(&b[OFF_SNAPSHOTS_OFFSET..]);
        let l1_bytes = l1_size as u64 * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(invalid(
                "l1_size",
                OFF_L1_SIZE,
                format!("{l1_size} entries exceed qemu's bound of {MAX_L1_BYTES} bytes"),
            ));
        }
        let mut header = Qcow2Header {
            version,
            cluster_bits,
            size,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            incompatible,
            compatible,
            autoclear,
            refcount_order,
            compression,
            backing: None,
            data_file: None,
        };
        if (l1_size as u64) < header.l1_entries_needed() {
            return Err(invalid(
                "l1_size",
                OFF_L1_SIZE,
                format!(
                    "{l1_size} entries cannot map the virtual size {size:#x} (need {})",
                    header.l1_entries_needed()
                ),
            ));
        }
        check_table(
            "l1_table_offset",
            OFF_L1_OFFSET,
            l1_table_offset,
            l1_bytes,
            cluster_size,
            file_len,
        )?;
        check_table(
            "refcount_table_offset",
            OFF_REFCOUNT_OFFSET,
            refcount_table_offset,
            (refcount_table_clusters as u64) << cluster_bits,
            cluster_size,
            file_len,
        )?;
        if refcount_table_clusters == 0 {
            return Err(invalid(
                "refcount_table_clusters",
                OFF_REFCOUNT_CLUSTERS,
                "is 0",
            ));
        }
        // Snapshots are not read (only the active state is), but their table must lie in
        // the file as qemu requires.
        if nb_snapshots > 0 {
            check_table(
                "snapshots_offset",
                OFF_SNAPSHOTS_OFFSET,
                snapshots_offset,
                1,
                cluster_size,
                file_len,
            )?;
        }

        let first_cluster = &b[..b.len().min(cluster_size as usize)];
        let mut backing_format = None;
        let mut at = header_length;
        loop {
            if at + 8 > first_cluster.len() {
                return Err(invalid(
                    "header extension",
                    at,
                    "the extension list has no end marker inside the first cluster",
                ));
            }
            let kind = BE::read_u32(&first_cluster[at..]);
            let len = BE::read_u32(&first_cluster[at + 4..]) as usize;
            if kind == EXT_END {
                break;
            }
            let data_at = at + 8;
            let padded = len.div_ceil(8) * 8;
            if data_at + padded > first_cluster.len() {
                return Err(invalid(
                    "header extension",
                    at,
                    format!("{len} bytes of type {kind:#010x} go past the first cluster"),
                ));
            }
            let data = &first_cluster[data_at..data_at + len];
            match kind {
                EXT_BACKING_FORMAT => backing_format = Some(utf8_name(data, data_at)?),
                EXT_DATA_FILE => header.data_file = Some(utf8_name(data, data_at)?),
                EXT_FULL_DISK_ENCRYPTION => {
                    return Err(invalid(
                        "header extension",
                        at,
                        "encrypted images are not supported",
                    ))
                }
                // Feature names, bitmaps and unknown extensions do not change what the
                // active state reads.
                _ => {}
            }
            at = data_at + padded;
        }
        if header.has_data_file() && header.data_file.is_none() {
            return Err(invalid(
                "incompatible_features",
                OFF_INCOMPATIBLE,
                "an external data file is used but its name extension is missing",
            ));
        }

        let backing_offset = BE::read_u64(&b[OFF_BACKING_OFFSET..]);
        let backing_size = BE::read_u32(&b[OFF_BACKING_SIZE..]) as usize;
        if backing_offset != 0 {
            if backing_size == 0 || backing_size > MAX_BACKING_NAME {
                return Err(invalid(
                    "backing_file_size",
                    OFF_BACKING_SIZE,
                    format!("{backing_size} is not 1 to {MAX_BACKING_NAME}"),
                ));
            }
            let end = backing_offset.checked_add(backing_size as u64);
            match end {
                Some(end) if end <= first_cluster.len() as u64 => {}
                _ => {
                    return Err(invalid(
                        "backing_file_offset",
                        OFF_BACKING_OFFSET,
                        format!(
                            "the name ({backing_size} bytes at {backing_offset:#x}) is not inside the first cluster"
                        ),
                    ))
                }
            }
            let start = backing_offset as usize;
            let name = utf8_name(&b[start..start + backing_size], start)?;
            header.backing = Some((name, backing_format));
        }
        Ok(header)
    }
}

fn utf8_name(bytes: &[u8], at: usize) -> Result<String, FormatError> {
    let text = std::str::from_utf8(bytes).map_err(|_| invalid("name", at, "not UTF-8"))?;
    if text.is_empty() || text.contains('\0') {
        return Err(invalid("name", at, "empty or contains NUL"));
    }
    Ok(text.to_string())
}

/// Decodes an L1 entry: the offset of an L2 table, or `None` when the range is unallocated.
pub fn decode_l1(entry: u64, cluster_size: u64) -> Result<Option<u64>, String> {
    if entry & !(OFFSET_MASK | COPIED) != 0 {
        return Err(format!("L1 entry {entry:#018x} has reserved bits set"));
    }
    let offset = entry & OFFSET_MASK;
    if offset == 0 {
        if entry & COPIED != 0 {
            return Err("L1 entry points into the header (cluster 0)".into());
        }
        return Ok(None);
    }
    if !offset.is_multiple_of(cluster_size) {
        return Err(format!(
            "L1 entry's L2 table offset {offset:#x} is not aligned to the cluster size"
        ));
    }
    Ok(Some(offset))
}

/// What an L2 entry says about its guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterMapping {
    /// Not allocated: read from the backing file (or zeros without one).
    Unallocated,
    /// Reads as zeros.
    Zero,
    /// The whole cluster at this offset of the data file (the image, or its external data
    /// file).
    Data(u64),
    /// Compressed bytes: `len` bytes at byte offset `offset` (the last sector may be cut
    /// short by the end of the file).
    Compressed { offset: u64, len: u64 },
    /// Extended L2: each of the 32 sub-clusters by its bit in `allocated` (data at
    /// `host + i * subcluster size`) or `zero`, else unallocated.
    Subclusters {
        host: Option<u64>,
        allocated: u32,
        zero: u32,
    },
}

/// Decodes an L2 entry (and, with extended L2, its bitmap word).
pub fn decode_l2(
    entry: u64,
    bitmap: Option<u64>,
    header: &Qcow2Header,
) -> Result<ClusterMapping, String> {
    let cluster_bits = header.cluster_bits;
    if entry & COMPRESSED != 0 {
        if header.has_data_file() {
            return Err("compressed cluster in an image with an external data file".into());
        }
        if bitmap.is_some_and(|b| b != 0) {
            return Err("compressed cluster with a non-zero sub-cluster bitmap".into());
        }
        // Bits 0..x-1: host offset; bits x..61: additional 512-byte sectors.
        let x = 62 - (cluster_bits - 8);
        let offset = entry & ((1u64 << x) - 1);
        let sectors = (entry >> x) & ((1u64 << (cluster_bits - 8)) - 1);
        if offset < header.cluster_size() {
            return Err(format!(
                "compressed cluster at {offset:#x} points into the header (cluster 0)"
            ));
        }
        let end = (offset & !511) + (sectors + 1) * 512;
        return Ok(ClusterMapping::Compressed {
            offset,
            len: end - offset,
        });
    }
    if entry & !(OFFSET_MASK | COPIED | ZERO_FLAG) != 0 {
        return Err(format!("L2 entry {entry:#018x} has reserved bits set"));
    }
    let offset = entry & OFFSET_MASK;
    // Offset 0 means "unallocated" unless the copied bit says it is a real cluster 0,
    // which only an external data file may have.
    let host = if offset == 0 && (entry & COPIED == 0 || !header.has_data_file()) {
        if entry & COPIED != 0 {
            return Err("L2 entry points into the header (cluster 0)".into());
        }
        None
    } else {
        if !offset.is_multiple_of(header.cluster_size()) {
            return Err(format!(
                "L2 entry's data offset {offset:#x} is not aligned to the cluster size"
            ));
        }
        Some(offset)
    };
    if let Some(bitmap) = bitmap {
        if entry & ZERO_FLAG != 0 {
            return Err("extended L2 entry has the reserved bit 0 set".into());
        }
        let allocated = bitmap as u32;
        let zero = (bitmap >> 32) as u32;
        if allocated & zero != 0 {
            return Err(format!(
                "sub-cluster bitmap {bitmap:#018x} marks sub-clusters both allocated and zero"
            ));
        }
        if host.is_none() && allocated != 0 {
            return Err(format!(
                "sub-cluster bitmap {bitmap:#018x} marks sub-clusters allocated in an unallocated cluster"
            ));
        }
        return Ok(match (host, allocated, zero) {
            (Some(h), u32::MAX, 0) => ClusterMapping::Data(h),
            (_, 0, u32::MAX) => ClusterMapping::Zero,
            (_, 0, 0) => ClusterMapping::Unallocated,
            _ => ClusterMapping::Subclusters {
                host,
                allocated,
                zero,
            },
        });
    }
    if entry & ZERO_FLAG != 0 {
        if header.version < 3 {
            return Err("L2 entry has the zero flag, which version 2 reserves".into());
        }
        return Ok(ClusterMapping::Zero);
    }
    Ok(match host {
        Some(h) => ClusterMapping::Data(h),
        None => ClusterMapping::Unallocated,
    })
}

/// L1 and standard L2 entries as the writer stores them: a cluster whose refcount is 1.
pub fn encode_table_entry(offset: u64) -> u64 {
    offset | COPIED
}
/// A standard L2 entry for a cluster that reads as zeros without storage (version 3).
pub const L2_ZERO_ENTRY: u64 = ZERO_FLAG;

/// What the writer records in a new version 3 header.
pub struct NewHeader<'a> {
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    /// Backing file name and format name.
    pub backing: Option<(&'a str, &'a str)>,
}

/// Encodes a version 3 header with refcount order 4 (16-bit refcounts), zlib compression
/// type, a backing format extension when there is a backing file, and the backing file
/// name after the extensions. Fails when the name does not fit in the first cluster.
pub fn encode_header(h: &NewHeader) -> Result<Vec<u8>, FormatError> {
    let mut b = vec![0u8; V3_HEADER_LENGTH];
    b[..4].copy_from_slice(&MAGIC);
    BE::write_u32(&mut b[OFF_VERSION..], 3);
    BE::write_u32(&mut b[OFF_CLUSTER_BITS..], h.cluster_bits);
    BE::write_u64(&mut b[OFF_SIZE..], h.size);
    BE::write_u32(&mut b[OFF_L1_SIZE..], h.l1_size);
    BE::write_u64(&mut b[OFF_L1_OFFSET..], h.l1_table_offset);
    BE::write_u64(&mut b[OFF_REFCOUNT_OFFSET..], h.refcount_table_offset);
    BE::write_u32(&mut b[OFF_REFCOUNT_CLUSTERS..], h.refcount_table_clusters);
    BE::write_u32(&mut b[OFF_REFCOUNT_ORDER..], 4);
    BE::write_u32(&mut b[OFF_HEADER_LENGTH..], V3_HEADER_LENGTH as u32);
    let push_ext = |b: &mut Vec<u8>, kind: u32, data: &[u8]| {
        let mut head = [0u8; 8];
        BE::write_u32(&mut head[..4], kind);
        BE::write_u32(&mut head[4..], data.len() as u32);
        b.extend_from_slice(&head);
        b.extend_from_slice(data);
        b.resize(b.len().div_ceil(8) * 8, 0);
    };
    if let Some((name, format)) = h.backing {
        if name.is_empty() || name.len() > MAX_BACKING_NAME || name.contains('\0') {
            return Err(invalid(
                "backing_file_size",
                OFF_BACKING_SIZE,
                format!("a backing file name must be 1 to {MAX_BACKING_NAME} bytes without NUL"),
            ));
        }
        push_ext(&mut b, EXT_BACKING_FORMAT, format.as_bytes());
        push_ext(&mut b, EXT_END, &[]);
        let at = b.len() as u64;
        BE::write_u64(&mut b[OFF_BACKING_OFFSET..], at);
        BE::write_u32(&mut b[OFF_BACKING_SIZE..], name.len() as u32);
        b.extend_from_slice(name.as_bytes());
    } else {
        push_ext(&mut b, EXT_END, &[]);
    }
    if b.len() as u64 > 1 << h.cluster_bits {
        return Err(invalid(
            "backing_file_offset",
            OFF_BACKING_OFFSET,
            "the header and backing file name do not fit in the first cluster",
        ));
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(backing: Option<(&str, &str)>) -> Vec<u8> {
        let mut b = encode_header(&NewHeader {
            cluster_bits: 16,
            size: 1 << 30,
            l1_size: 2,
            l1_table_offset: 0x10000,
            refcount_table_offset: 0x20000,
            refcount_table_clusters: 1,
            backing,
        })
        .expect("encodes");
        b.resize(0x10000, 0);
        b
    }

    #[test]
    fn a_written_header_decodes_to_what_was_written() {
        let b = written(Some(("base.raw", "raw")));
        let h = Qcow2Header::from_first_cluster(&b, 0x30000).expect("decodes");
        assert_eq!(h.version, 3);
        assert_eq!(h.size, 1 << 30);
        assert_eq!(h.l1_table_offset, 0x10000);
        assert_eq!(
            h.backing,
            Some(("base.raw".to_string(), Some("raw".to_string())))
        );
    }

    #[test]
    fn a_header_whose_l1_table_passes_the_end_of_the_file_is_refused() {
        let b = written(None);
        let e = Qcow2Header::from_first_cluster(&b, 0x10004).unwrap_err();
        assert!(e.to_string().contains("l1_table_offset"), "{e}");
    }

    #[test]
    fn an_unknown_incompatible_feature_is_refused() {
        let mut b = written(None);
        BE::write_u64(&mut b[OFF_INCOMPATIBLE..], 1 << 20);
        let e = Qcow2Header::from_first_cluster(&b, 0x30000).unwrap_err();
        assert_eq!(e, FormatError::UnknownIncompatibleFeatures(1 << 20));
    }

    #[test]
    fn a_huge_l1_size_is_refused_before_anything_is_read() {
        let mut b = written(None);
        BE::write_u32(&mut b[OFF_L1_SIZE..], u32::MAX);
        let e = Qcow2Header::from_first_cluster(&b, 0x30000).unwrap_err();
        assert!(e.to_string().contains("l1_size"), "{e}");
    }

    #[test]
    fn l2_entries_decode_to_their_mapping() {
        let h = Qcow2Header::from_first_cluster(&written(None), 0x30000).expect("decodes");
        assert_eq!(decode_l2(0, None, &h), Ok(ClusterMapping::Unallocated));
        assert_eq!(decode_l2(1, None, &h), Ok(ClusterMapping::Zero));
        assert_eq!(
            decode_l2(COPIED | 0x50000, None, &h),
            Ok(ClusterMapping::Data(0x50000))
        );
        assert!(decode_l2(COPIED, None, &h).unwrap_err().contains("header"));
        assert!(decode_l2(0x50200, None, &h)
            .unwrap_err()
            .contains("not aligned"));
        // Compressed: offset in bits 0..54 (for 64 KiB clusters), 2 extra sectors above.
        let x = 62 - 8;
        let entry = COMPRESSED | (2u64 << x) | 0x30100;
        assert_eq!(
            decode_l2(entry, None, &h),
            Ok(ClusterMapping::Compressed {
                offset: 0x30100,
                len: 0x30000 + 3 * 512 - 0x30100
            })
        );
        let into_header = COMPRESSED | 0x100;
        assert!(decode_l2(into_header, None, &h)
            .unwrap_err()
            .contains("header"));
    }

    #[test]
    fn extended_l2_bitmaps_decode_and_contradictions_are_refused() {
        let mut b = written(None);
        BE::write_u64(&mut b[OFF_INCOMPATIBLE..], INCOMPAT_EXTENDED_L2);
        // 16-byte entries map half as much per L2 table: 1 GiB needs 4 L1 entries.
        BE::write_u32(&mut b[OFF_L1_SIZE..], 4);
        let h = Qcow2Header::from_first_cluster(&b, 0x30000).expect("decodes");
        assert_eq!(h.l2_entry_size(), 16);
        let host = COPIED | 0x50000;
        assert_eq!(
            decode_l2(host, Some(u32::MAX as u64), &h),
            Ok(ClusterMapping::Data(0x50000))
        );
        assert_eq!(
            decode_l2(0, Some((u32::MAX as u64) << 32), &h),
            Ok(ClusterMapping::Zero)
        );
        assert_eq!(
            decode_l2(host, Some(0b01 | (0b10 << 32)), &h),
            Ok(ClusterMapping::Subclusters {
                host: Some(0x50000),
                allocated: 0b01,
                zero: 0b10
            })
        );
        // Allocated and zero at once, allocated without a host cluster, the standard zero
        // flag, and a compressed cluster with a bitmap are all refused.
        assert!(decode_l2(host, Some(1 | (1 << 32)), &h).is_err());
        assert!(decode_l2(0, Some(1), &h).is_err());
        assert!(decode_l2(host | 1, Some(0), &h).is_err());
        assert!(decode_l2(COMPRESSED | 0x30000, Some(1), &h).is_err());
    }

    #[test]
    fn the_zero_flag_is_refused_in_version_2() {
        let mut b = written(None);
        BE::write_u32(&mut b[OFF_VERSION..], 2);
        let h = Qcow2Header::from_first_cluster(&b, 0x30000).expect("decodes");
        assert!(decode_l2(1, None, &h).unwrap_err().contains("version 2"));
    }
}
