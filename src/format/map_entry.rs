//! One extent-map entry: the state of one virtual cluster (FORMAT.md, "Map entries").
//!
//! ```text
//! offset size field
//! 0x00   8    virtual_cluster: index of the virtual cluster (offset / cluster_size)
//! 0x08   8    host_a: host cluster index of slot A (0: none)
//! 0x10   8    host_b: host cluster index of slot B (0: none)
//! 0x18   8    units_a: bit u set = unit u is stored in slot A at offset u * unit_size
//! 0x20   8    units_b: the same for slot B
//! 0x28   8    units_zero: bit u set = unit u reads as zeros (masks the backing file)
//! ```
//! A unit in none of the three bitmaps falls through to the backing file.
//!
//! The top byte of the first field is the item's kind (virtual cluster indices stay below
//! 2^48, since sizes stay below 2^60 and clusters are at least 4 KiB):
//!
//! ```text
//! kind 0  cluster entry (above); in a journal record, an entry whose bytes 0x08..0x30
//!         are all zero is a removal: the cluster falls through again
//! kind 1  zero run:         0x00 start cluster | 1 << 56, 0x08 count, 0x10..0x30 zero;
//!         clusters start..start+count read as zeros (whole-cluster discards)
//! kind 2  fall-through run: same layout; journal only; clusters start..start+count drop
//!         their entries and zero runs and fall through
//! ```
use super::{invalid, FormatError, Geometry};
use byteorder::{ByteOrder, LittleEndian as LE};

pub const MAP_ENTRY_SIZE: usize = 48;
const KIND_SHIFT: u32 = 56;
const KIND_CLUSTER: u64 = 0;
const KIND_ZERO_RUN: u64 = 1;
const KIND_FALL_THROUGH_RUN: u64 = 2;

/// One item of a checkpoint or journal record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapItem {
    Cluster(MapEntry),
    Removal(u64),
    ZeroRun { start: u64, count: u64 },
    FallThroughRun { start: u64, count: u64 },
}

impl MapItem {
    pub fn write_to(&self, b: &mut [u8]) {
        match *self {
            MapItem::Cluster(e) => e.write_to(b),
            MapItem::Removal(vc) => {
                b[..MAP_ENTRY_SIZE].fill(0);
                LE::write_u64(&mut b[0x00..], vc);
            }
            MapItem::ZeroRun { start, count } | MapItem::FallThroughRun { start, count } => {
                let kind = if matches!(self, MapItem::ZeroRun { .. }) {
                    KIND_ZERO_RUN
                } else {
                    KIND_FALL_THROUGH_RUN
                };
                b[..MAP_ENTRY_SIZE].fill(0);
                LE::write_u64(&mut b[0x00..], start | kind << KIND_SHIFT);
                LE::write_u64(&mut b[0x08..], count);
            }
        }
    }

    /// The first virtual cluster the item concerns.
    pub fn start(&self) -> u64 {
        match *self {
            MapItem::Cluster(e) => e.virtual_cluster,
            MapItem::Removal(vc) => vc,
            MapItem::ZeroRun { start, .. } | MapItem::FallThroughRun { start, .. } => start,
        }
    }

    /// Decodes and validates one item. `in_journal` admits the kinds only a journal holds.
    pub fn from_bytes(
        b: &[u8],
        geometry: Geometry,
        virtual_clusters: u64,
        max_host_cluster: u64,
        in_journal: bool,
    ) -> Result<MapItem, FormatError> {
        if b.len() < MAP_ENTRY_SIZE {
            return Err(FormatError::Truncated {
                need: MAP_ENTRY_SIZE,
                have: b.len(),
            });
        }
        let first = LE::read_u64(&b[0x00..]);
        let (kind, index) = (first >> KIND_SHIFT, first & ((1 << KIND_SHIFT) - 1));
        let rest_is_zero = |from: usize| b[from..MAP_ENTRY_SIZE].iter().all(|&x| x == 0);
        match kind {
            KIND_CLUSTER if in_journal && rest_is_zero(0x08) => {
                if index >= virtual_clusters {
                    return Err(invalid(
                        "virtual_cluster",
                        0x00,
                        format!("{index} is past the last cluster"),
                    ));
                }
                Ok(MapItem::Removal(index))
            }
            KIND_CLUSTER => Ok(MapItem::Cluster(MapEntry::from_bytes(
                b,
                geometry,
                virtual_clusters,
                max_host_cluster,
            )?)),
            KIND_ZERO_RUN | KIND_FALL_THROUGH_RUN => {
                if kind == KIND_FALL_THROUGH_RUN && !in_journal {
                    return Err(invalid(
                        "kind",
                        0x07,
                        "a fall-through run outside a journal record",
                    ));
                }
                let count = LE::read_u64(&b[0x08..]);
                if count == 0
                    || index
                        .checked_add(count)
                        .is_none_or(|end| end > virtual_clusters)
                {
                    return Err(invalid("count", 0x08, format!("run of {count} clusters from {index} leaves the image ({virtual_clusters} clusters)")));
                }
                if !rest_is_zero(0x10) {
                    return Err(invalid("reserved", 0x10, "must be zero in a run"));
                }
                Ok(if kind == KIND_ZERO_RUN {
                    MapItem::ZeroRun {
                        start: index,
                        count,
                    }
                } else {
                    MapItem::FallThroughRun {
                        start: index,
                        count,
                    }
                })
            }
            k => Err(invalid("kind", 0x07, format!("unknown item kind {k}"))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MapEntry {
    pub virtual_cluster: u64,
    /// Host cluster indices of the two slots; 0 means the slot has no cluster.
    pub host: [u64; 2],
    /// Units stored in each slot.
    pub units: [u64; 2],
    pub zero: u64,
}

impl MapEntry {
    pub fn write_to(&self, b: &mut [u8]) {
        LE::write_u64(&mut b[0x00..], self.virtual_cluster);
        LE::write_u64(&mut b[0x08..], self.host[0]);
        LE::write_u64(&mut b[0x10..], self.host[1]);
        LE::write_u64(&mut b[0x18..], self.units[0]);
        LE::write_u64(&mut b[0x20..], self.units[1]);
        LE::write_u64(&mut b[0x28..], self.zero);
    }

    /// True when the entry says nothing: every unit falls through.
    pub fn is_empty(&self) -> bool {
        self.units == [0, 0] && self.zero == 0
    }

    /// Decodes and validates one entry. `virtual_clusters` bounds the cluster index and
    /// `max_host_cluster` bounds host indices (both exclusive).
    pub fn from_bytes(
        b: &[u8],
        geometry: Geometry,
        virtual_clusters: u64,
        max_host_cluster: u64,
    ) -> Result<MapEntry, FormatError> {
        if b.len() < MAP_ENTRY_SIZE {
            return Err(FormatError::Truncated {
                need: MAP_ENTRY_SIZE,
                have: b.len(),
            });
        }
        let e = MapEntry {
            virtual_cluster: LE::read_u64(&b[0x00..]),
            host: [LE::read_u64(&b[0x08..]), LE::read_u64(&b[0x10..])],
            units: [LE::read_u64(&b[0x18..]), LE::read_u64(&b[0x20..])],
            zero: LE::read_u64(&b[0x28..]),
        };
        if e.virtual_cluster >= virtual_clusters {
            return Err(invalid(
                "virtual_cluster",
                0x00,
                format!(
                    "{} is past the last cluster {}",
                    e.virtual_cluster,
                    virtual_clusters.saturating_sub(1)
                ),
            ));
        }
        let mask = geometry.full_mask();
        for (field, off, bits) in [
            ("units_a", 0x18, e.units[0]),
            ("units_b", 0x20, e.units[1]),
            ("units_zero", 0x28, e.zero),
        ] {
            if bits & !mask != 0 {
                return Err(invalid(
                    field,
                    off,
                    format!(
                        "bits {bits:#x} beyond the {} units of a cluster",
                        geometry.units_per_cluster()
                    ),
                ));
            }
        }
        if e.units[0] & e.units[1] != 0 || (e.units[0] | e.units[1]) & e.zero != 0 {
            return Err(invalid(
                "units_zero",
                0x28,
                "a unit is claimed by more than one bitmap",
            ));
        }
        let first = geometry.first_data_cluster();
        for (slot, field, off) in [(0, "host_a", 0x08), (1, "host_b", 0x10)] {
            let h = e.host[slot];
            if e.units[slot] != 0 && (h < first || h >= max_host_cluster) {
                return Err(invalid(
                    field,
                    off,
                    format!("host cluster {h} is outside {first}..{max_host_cluster}"),
                ));
            }
            // A slot may keep its cluster while the other slot holds the data: units move
            // back and forth between the two without allocating (FORMAT.md, "Map entries").
            // Like a data slot's, it is checked against the file's length once replay is
            // done (`image::v1::load`): the next write to the slot goes there.
            if e.units[slot] == 0
                && h != 0
                && (h < first || h >= max_host_cluster || e.units == [0, 0])
            {
                return Err(invalid(field, off, format!("reserved host cluster {h} is outside {first}..{max_host_cluster} or its entry holds no data")));
            }
        }
        if e.host[0] != 0 && e.host[0] == e.host[1] {
            return Err(invalid("host_b", 0x10, "equals host_a"));
        }
        if e.is_empty() {
            return Err(invalid("units_a", 0x18, "entry maps nothing"));
        }
        Ok(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_round_trips_and_overlapping_bitmaps_are_rejected() {
        let g = Geometry::new(16);
        let e = MapEntry {
            virtual_cluster: 3,
            host: [5, 9],
            units: [0b0011, 0b0100],
            zero: 0b1000,
        };
        let mut b = [0u8; MAP_ENTRY_SIZE];
        e.write_to(&mut b);
        assert_eq!(MapEntry::from_bytes(&b, g, 4, 100).unwrap(), e);
        assert!(
            MapEntry::from_bytes(&b, g, 3, 100).is_err(),
            "cluster past the end"
        );
        assert!(
            MapEntry::from_bytes(&b, g, 4, 9).is_err(),
            "host past the end"
        );
        let bad = MapEntry {
            units: [0b0011, 0b0010],
            ..e
        };
        bad.write_to(&mut b);
        assert!(MapEntry::from_bytes(&b, g, 4, 100).is_err());
        let bad = MapEntry { zero: 1 << 16, ..e };
        bad.write_to(&mut b);
        assert!(
            MapEntry::from_bytes(&b, g, 4, 100).is_err(),
            "unit 16 of a 16-unit cluster"
        );
    }
}
