//! The device's view of host memory: only what the driver mapped.

use std::collections::BTreeMap;

use mlx5_driver::transport::{DmaMem, Iova, IovaRange};

/// A DMA access that hit no mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaFault {
    /// The first unmapped address of the access.
    pub iova: u64,
}

/// The IOMMU page table of the simulated function.
#[derive(Debug, Default)]
pub struct Iommu {
    maps: BTreeMap<u64, DmaMem>,
}

/// Usable IOVA ranges, as on x86 (MSI window excluded).
pub fn usable_ranges() -> Vec<IovaRange> {
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

impl Iommu {
    /// Adds a mapping; refuses misalignment, overlap and reserved ranges.
    pub fn map(&mut self, iova: Iova, mem: DmaMem) -> Result<(), &'static str> {
        let len = mem.len() as u64;
        if !iova.0.is_multiple_of(4096) || !len.is_multiple_of(4096) || len == 0 {
            return Err("IOVA and length must be 4 KiB aligned and non-zero");
        }
        let end = iova.0.checked_add(len).ok_or("range wraps")?;
        if !usable_ranges()
            .iter()
            .any(|r| iova.0 >= r.start && end <= r.end)
        {
            return Err("outside the usable IOVA ranges");
        }
        if let Some((&s, m)) = self.maps.range(..end).next_back()
            && s + m.len() as u64 > iova.0
        {
            return Err("overlaps an existing mapping");
        }
        self.maps.insert(iova.0, mem);
        Ok(())
    }

    /// Removes a mapping; the range must be exactly one existing mapping.
    pub fn unmap(&mut self, iova: Iova, len: u64) -> Result<(), &'static str> {
        match self.maps.get(&iova.0) {
            Some(m) if m.len() as u64 == len => {
                self.maps.remove(&iova.0);
                Ok(())
            }
            Some(_) => Err("length differs from the mapping"),
            None => Err("no mapping starts there"),
        }
    }

    /// Number of mappings.
    pub fn len(&self) -> usize {
        self.maps.len()
    }

    /// Whether nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// Bytes mapped.
    pub fn bytes(&self) -> u64 {
        self.maps.values().map(|m| m.len() as u64).sum()
    }

    /// Whether `[iova, iova + len)` is entirely mapped.
    pub fn covers(&self, iova: u64, len: usize) -> bool {
        let mut at = iova;
        let end = iova.saturating_add(len as u64);
        while at < end {
            match self.find(at) {
                Some((base, m)) => at = base + m.len() as u64,
                None => return false,
            }
        }
        true
    }

    fn find(&self, iova: u64) -> Option<(u64, &DmaMem)> {
        let (&base, m) = self.maps.range(..=iova).next_back()?;
        (iova < base + m.len() as u64).then_some((base, m))
    }

    /// Splits `[iova, iova + len)` into per-mapping pieces and calls `f`
    /// with (mapping, offset in it, offset in the access, length).
    fn walk(
        &self,
        iova: u64,
        len: usize,
        mut f: impl FnMut(&DmaMem, usize, usize, usize) -> bool,
    ) -> Result<(), DmaFault> {
        let mut done = 0;
        while done < len {
            let at = iova + done as u64;
            let (base, m) = self.find(at).ok_or(DmaFault { iova: at })?;
            let off = (at - base) as usize;
            let n = (m.len() - off).min(len - done);
            if !f(m, off, done, n) {
                return Err(DmaFault { iova: at });
            }
            done += n;
        }
        Ok(())
    }

    /// Device read of `buf.len()` bytes at `iova` (may span mappings).
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
        let len = buf.len();
        self.walk(iova, len, |m, off, at, n| m.read(off, &mut buf[at..at + n]))
    }

    /// Device write of `buf` at `iova` (may span mappings).
    pub fn write(&self, iova: u64, buf: &[u8]) -> Result<(), DmaFault> {
        self.walk(iova, buf.len(), |m, off, at, n| {
            m.write(off, &buf[at..at + n])
        })
    }
}
