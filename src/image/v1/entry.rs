//! The runtime state of one virtual cluster, kept small: the map holds one per mapped
//! cluster for as long as the image is open.
//!
//! What the map must remember about every cluster is what its journal item says (the two
//! slots, where each unit is, which units are zero): 40 bytes. The rest (which units the last
//! flush and the flush in flight reference, writes in flight, discarded units waiting for a
//! punch) only differs from its resting value for clusters touched since the last completed
//! flush, so it lives in a side allocation that exists only then. At rest, the units the
//! durable state references are exactly the units the entry stores.

use crate::format::MapEntry;

/// Per-cluster state that only clusters touched since the last completed flush carry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(in crate::image) struct InFlight {
    /// Units of each slot that the last completed flush references: those bytes must not
    /// change.
    pub durable: [u64; 2],
    /// Units of each slot that the flush in progress references.
    pub inflight: [u64; 2],
    /// Units dropped by discard whose bytes still occupy disk space; punched once unpinned.
    pub discarded: [u64; 2],
    /// Units written since the last snapshot: the next record's data digest covers them.
    pub written: u64,
    /// Units with a write in flight. A write that moves a unit copies the rest of it from
    /// the old contents, and a discard may punch it: either would lose the other's bytes
    /// or mix them, so writes and discards of one unit take turns.
    pub busy: u64,
    /// The entry is listed in the state's dirty clusters (changed since the last snapshot).
    pub dirty: bool,
}

#[derive(Debug, Clone, Default)]
pub(in crate::image) struct Entry {
    pub host: [u64; 2],
    pub units: [u64; 2],
    pub zero: u64,
    /// `None` is the resting state: the durable state references exactly `units`, and
    /// nothing is in flight, written, discarded or dirty.
    in_flight: Option<Box<InFlight>>,
}

impl Entry {
    /// An entry at rest, as loaded from the map on disk.
    pub fn at_rest(host: [u64; 2], units: [u64; 2], zero: u64) -> Entry {
        Entry {
            host,
            units,
            zero,
            in_flight: None,
        }
    }

    /// The per-flush state, created from the resting state when absent. Call it before
    /// changing `units`: the resting state's durable units are the current `units`.
    pub fn in_flight_mut(&mut self) -> &mut InFlight {
        let units = self.units;
        self.in_flight.get_or_insert_with(|| {
            Box::new(InFlight {
                durable: units,
                ..InFlight::default()
            })
        })
    }

    /// Drops the per-flush state when it says nothing beyond the resting state.
    pub fn settle(&mut self) {
        let at_rest = self.in_flight.as_deref().is_some_and(|f| {
            *f == InFlight {
                durable: self.units,
                ..InFlight::default()
            }
        });
        if at_rest {
            self.in_flight = None;
        }
    }

    pub fn busy(&self) -> u64 {
        self.in_flight.as_ref().map_or(0, |f| f.busy)
    }

    pub fn is_dirty(&self) -> bool {
        self.in_flight.as_ref().is_some_and(|f| f.dirty)
    }

    /// Marks the entry changed since the last snapshot; true when it was not yet, so that
    /// the caller lists it once.
    pub fn mark_dirty(&mut self) -> bool {
        let f = self.in_flight_mut();
        !std::mem::replace(&mut f.dirty, true)
    }

    /// Units of `slot` whose bytes must not change: the durable state's, the flush in
    /// progress's, and discarded ones not yet punched.
    pub fn pinned(&self, slot: usize) -> u64 {
        match &self.in_flight {
            None => self.units[slot],
            Some(f) => f.durable[slot] | f.inflight[slot] | f.discarded[slot],
        }
    }

    pub fn slot_of(&self, bit: u64) -> Option<usize> {
        (0..2).find(|&s| self.units[s] & bit != 0)
    }

    pub fn to_disk(&self, virtual_cluster: u64) -> MapEntry {
        MapEntry {
            virtual_cluster,
            // Both clusters stay reserved while the entry holds data in either slot.
            host: if self.units == [0, 0] {
                [0, 0]
            } else {
                self.host
            },
            units: self.units,
            zero: self.zero,
        }
    }

    pub fn is_unused(&self) -> bool {
        self.host == [0, 0] && self.units == [0, 0] && self.zero == 0 && !self.is_dirty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_at_rest_pins_exactly_the_units_it_stores() {
        let e = Entry::at_rest([5, 6], [0b0011, 0b0100], 0b1000);
        assert_eq!(e.pinned(0), 0b0011);
        assert_eq!(e.pinned(1), 0b0100);
        assert_eq!(e.busy(), 0);
        assert!(!e.is_dirty());
    }

    #[test]
    fn changing_units_after_taking_the_in_flight_state_keeps_the_old_units_durable() {
        let mut e = Entry::at_rest([5, 6], [0b0011, 0], 0);
        e.in_flight_mut().busy |= 0b0001;
        e.units = [0b0010, 0b0001];
        assert_eq!(
            e.pinned(0),
            0b0011,
            "the durable state still references both units"
        );
        assert_eq!(e.pinned(1), 0);
        e.settle();
        assert_eq!(
            e.pinned(0),
            0b0011,
            "a unit being written keeps the state alive"
        );
    }

    #[test]
    fn settling_drops_the_in_flight_state_only_when_it_matches_rest() {
        let mut e = Entry::at_rest([5, 0], [0b0001, 0], 0);
        assert!(e.mark_dirty());
        assert!(!e.mark_dirty(), "a dirty entry is listed once");
        e.settle();
        assert!(e.is_dirty(), "a dirty entry is not at rest");
        e.in_flight_mut().dirty = false;
        e.settle();
        assert!(e.in_flight.is_none());
        assert_eq!(std::mem::size_of::<Entry>(), 48);
    }
}
