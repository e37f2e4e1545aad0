//! Sorted, non-overlapping byte ranges: the used parts of a disk or partition.

/// A set of `[start, end)` byte ranges, kept sorted and merged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extents(Vec<(u64, u64)>);

impl Extents {
    pub fn new() -> Extents {
        Extents(Vec::new())
    }

    /// One range covering `[start, end)`.
    pub fn whole(start: u64, end: u64) -> Extents {
        let mut e = Extents::new();
        e.add(start, end);
        e
    }

    /// Add `[start, end)`. Appending in ascending order is O(1); anything else is merged.
    pub fn add(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        if let Some(last) = self.0.last_mut() {
            if start >= last.0 {
                if start <= last.1 {
                    last.1 = last.1.max(end);
                    return;
                }
                self.0.push((start, end));
                return;
            }
        } else {
            self.0.push((start, end));
            return;
        }
        self.0.push((start, end));
        self.normalize();
    }

    fn normalize(&mut self) {
        self.0.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(self.0.len());
        for &(s, e) in &self.0 {
            match out.last_mut() {
                Some(l) if s <= l.1 => l.1 = l.1.max(e),
                _ => out.push((s, e)),
            }
        }
        self.0 = out;
    }

    /// Remove `[start, end)`.
    pub fn remove(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let mut out = Vec::with_capacity(self.0.len() + 1);
        for &(s, e) in &self.0 {
            if e <= start || s >= end {
                out.push((s, e));
            } else {
                if s < start {
                    out.push((s, start));
                }
                if e > end {
                    out.push((end, e));
                }
            }
        }
        self.0 = out;
    }

    /// Add every range of `other`, shifted by `by`.
    pub fn add_shifted(&mut self, other: &Extents, by: u64) {
        for &(s, e) in &other.0 {
            self.add(s + by, e + by);
        }
    }

    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.0
    }

    /// Total bytes covered.
    pub fn len(&self) -> u64 {
        self.0.iter().map(|(s, e)| e - s).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The ranges that intersect `[start, end)`, clipped to it.
    pub fn within(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let first = self.0.partition_point(|&(_, e)| e <= start);
        self.0[first..]
            .iter()
            .take_while(move |&&(s, _)| s < end)
            .map(move |&(s, e)| (s.max(start), e.min(end)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_remove_within() {
        let mut e = Extents::new();
        e.add(0, 10);
        e.add(10, 20);
        e.add(30, 40);
        e.add(5, 8);
        e.add(25, 31);
        assert_eq!(e.ranges(), &[(0, 20), (25, 40)]);
        e.remove(15, 27);
        assert_eq!(e.ranges(), &[(0, 15), (27, 40)]);
        assert_eq!(e.len(), 28);
        let w: Vec<_> = e.within(10, 30).collect();
        assert_eq!(w, vec![(10, 15), (27, 30)]);
        assert_eq!(e.within(15, 27).count(), 0);
    }
}
