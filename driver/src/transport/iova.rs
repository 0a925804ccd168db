//! IOVA allocation inside the ranges the IOMMU allows.

use std::collections::BTreeMap;

use super::{Iova, TransportError};

/// One usable IOVA range, inclusive start, exclusive end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct IovaRange {
    /// First usable address.
    pub start: u64,
    /// One past the last usable address.
    pub end: u64,
}

/// The usable IOVA ranges of a typical x86 IOMMU: everything below 2^48
/// except the interrupt (MSI) window at 0xFEE00000–0xFEEFFFFF.
pub fn x86_default_ranges() -> Vec<IovaRange> {
    vec![
        IovaRange {
            start: 0,
            end: 0xFEE0_0000,
        },
        IovaRange {
            start: 0xFEF0_0000,
            end: 1 << 48,
        },
    ]
}

/// First-fit allocator of page-aligned IOVA ranges with coalescing frees.
#[derive(Debug, Clone)]
pub struct IovaSpace {
    /// Free ranges, start -> end.
    free: BTreeMap<u64, u64>,
    allocated: u64,
}

const PAGE: u64 = 4096;

impl IovaSpace {
    /// A space covering `ranges`, skipping page 0 so that IOVA 0 never
    /// appears in a device structure (0 means "no pointer" there).
    pub fn new(ranges: &[IovaRange]) -> IovaSpace {
        let mut free = BTreeMap::new();
        for r in ranges {
            let start = r.start.max(PAGE).next_multiple_of(PAGE);
            let end = r.end & !(PAGE - 1);
            if end > start {
                free.insert(start, end);
            }
        }
        IovaSpace { free, allocated: 0 }
    }

    /// Bytes currently allocated.
    pub fn allocated(&self) -> u64 {
        self.allocated
    }

    /// Allocates `len` bytes (rounded up to whole pages), aligned to the
    /// largest power of two not above `len`, capped at 2 MiB.
    pub fn alloc(&mut self, len: u64) -> Result<Iova, TransportError> {
        let len = len.max(1).next_multiple_of(PAGE);
        let align = (1u64 << (63 - len.leading_zeros())).clamp(PAGE, 2 << 20);
        let found = self.free.iter().find_map(|(&s, &e)| {
            let a = s.checked_next_multiple_of(align)?;
            (a.checked_add(len)? <= e).then_some((s, e, a))
        });
        let (s, e, a) = found.ok_or(TransportError::IovaExhausted(len))?;
        self.free.remove(&s);
        if a > s {
            self.free.insert(s, a);
        }
        if a + len < e {
            self.free.insert(a + len, e);
        }
        self.allocated += len;
        Ok(Iova(a))
    }

    /// Returns a range given out by [`IovaSpace::alloc`].
    pub fn free(&mut self, iova: Iova, len: u64) {
        let len = len.max(1).next_multiple_of(PAGE);
        let mut start = iova.0;
        let mut end = iova.0 + len;
        if let Some((&ps, &pe)) = self.free.range(..start).next_back()
            && pe == start
        {
            self.free.remove(&ps);
            start = ps;
        }
        if let Some(ne) = self.free.remove(&end) {
            end = ne;
        }
        self.free.insert(start, end);
        self.allocated = self.allocated.saturating_sub(len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_page_zero_and_respects_holes() {
        let mut s = IovaSpace::new(&[
            IovaRange {
                start: 0,
                end: 0x3000,
            },
            IovaRange {
                start: 0x10_0000,
                end: 0x20_0000,
            },
        ]);
        let a = s.alloc(0x1000).unwrap();
        assert_eq!(a, Iova(0x1000));
        let b = s.alloc(0x1000).unwrap();
        assert_eq!(b, Iova(0x2000));
        let c = s.alloc(0x1000).unwrap();
        assert_eq!(c, Iova(0x10_0000));
        assert!(s.alloc(0x20_0000).is_err());
    }

    #[test]
    fn frees_coalesce() {
        let mut s = IovaSpace::new(&[IovaRange {
            start: 0,
            end: 1 << 30,
        }]);
        let v: Vec<_> = (0..64).map(|_| s.alloc(4096).unwrap()).collect();
        for a in v.iter().rev() {
            s.free(*a, 4096);
        }
        assert_eq!(s.allocated(), 0);
        assert_eq!(s.free.len(), 1);
        // A big aligned block fits again.
        let big = s.alloc(1 << 29).unwrap();
        assert_eq!(big.0 % (2 << 20), 0);
    }
}
