//! The set of task positions (`seq`) whose results were written out, stored as ranges so a
//! manifest stays small however large the batch.

use rangemap::RangeInclusiveSet;

/// A set of `seq` numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeqSet(RangeInclusiveSet<u32>);

impl SeqSet {
    /// Builds the set from manifest ranges `[first, last]`, ignoring inverted ones.
    pub fn from_ranges(ranges: &[[u32; 2]]) -> Self {
        let mut set = RangeInclusiveSet::new();
        for [first, last] in ranges {
            if first <= last {
                set.insert(*first..=*last);
            }
        }
        Self(set)
    }

    /// The set as manifest ranges.
    pub fn to_ranges(&self) -> Vec<[u32; 2]> {
        self.0.iter().map(|r| [*r.start(), *r.end()]).collect()
    }

    /// Adds `seq`; false when it was already there.
    pub fn insert(&mut self, seq: u32) -> bool {
        if self.0.contains(&seq) {
            return false;
        }
        self.0.insert(seq..=seq);
        true
    }

    /// Whether `seq` is in the set.
    pub fn contains(&self, seq: u32) -> bool {
        self.0.contains(&seq)
    }

    /// Adds every member of `other`.
    pub fn extend(&mut self, other: &SeqSet) {
        for r in other.0.iter() {
            self.0.insert(r.clone());
        }
    }

    /// Number of members.
    pub fn len(&self) -> u64 {
        self.0
            .iter()
            .map(|r| u64::from(r.end() - r.start()) + 1)
            .sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether every seq of `0..total` is present.
    pub fn covers(&self, total: u32) -> bool {
        total == 0
            || self
                .0
                .iter()
                .next()
                .is_some_and(|r| *r.start() == 0 && *r.end() >= total - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_adjacent_members_into_ranges() {
        let mut s = SeqSet::default();
        for n in [0, 1, 2, 5, 3, 9] {
            assert!(s.insert(n));
        }
        assert!(!s.insert(2));
        assert_eq!(s.to_ranges(), vec![[0, 3], [5, 5], [9, 9]]);
        assert_eq!(s.len(), 6);
        assert!(s.covers(4) && !s.covers(5));
        assert_eq!(SeqSet::from_ranges(&s.to_ranges()), s);
        assert!(SeqSet::default().covers(0));
    }
}
