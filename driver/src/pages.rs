//! Host pages lent to firmware (reference §3.3).
//!
//! Pages come from 2 MiB DMA chunks so that a grant of thousands of pages
//! costs a handful of IOMMU mappings. Every page handed to firmware is
//! remembered; a page firmware "returns" that we never gave is refused
//! (firmware is not trusted with our free list).

use std::collections::HashSet;

use crate::transport::{DmaBuffer, Iova, IovaSpace, Transport, TransportError};

/// Firmware page size.
pub const FW_PAGE: u64 = 4096;
const CHUNK: usize = 2 << 20;
/// Most pages the driver lends firmware in all (16 GiB). Firmware is not
/// trusted to size host memory; real devices ask for well under 1 GiB.
pub const MAX_FW_PAGES: usize = 1 << 22;

/// The page pool.
#[derive(Debug, Default)]
pub struct PagePool {
    chunks: Vec<DmaBuffer>,
    free: Vec<Iova>,
    given: HashSet<u64>,
}

impl PagePool {
    /// An empty pool.
    pub fn new() -> PagePool {
        PagePool::default()
    }

    /// Pages currently held by firmware.
    pub fn given(&self) -> usize {
        self.given.len()
    }

    /// Bytes of DMA memory in the pool.
    pub fn mapped_bytes(&self) -> usize {
        self.chunks.iter().map(DmaBuffer::len).sum()
    }

    /// Takes `n` free pages, growing the pool as needed.
    pub fn take(
        &mut self,
        t: &dyn Transport,
        space: &mut IovaSpace,
        n: usize,
    ) -> Result<Vec<Iova>, TransportError> {
        if self.given.len() + n > MAX_FW_PAGES {
            return Err(TransportError::BadMapping {
                iova: Iova(0),
                len: n as u64 * FW_PAGE,
                why: "firmware asks for more pages than the driver lends (16 GiB)",
            });
        }
        while self.free.len() < n {
            let chunk = DmaBuffer::alloc(t, space, CHUNK)?;
            let base = chunk.iova();
            self.free.extend(
                (0..(CHUNK as u64 / FW_PAGE))
                    .rev()
                    .map(|k| base.add(k * FW_PAGE)),
            );
            self.chunks.push(chunk);
        }
        let at = self.free.len() - n;
        Ok(self.free.split_off(at))
    }

    /// Puts pages that were not given back on the free list.
    pub fn put_back(&mut self, pages: Vec<Iova>) {
        self.free.extend(pages);
    }

    /// Records pages as held by firmware.
    pub fn mark_given(&mut self, pages: &[Iova]) {
        self.given.extend(pages.iter().map(|p| p.0));
    }

    /// Takes back a page firmware returned; false if we never gave it.
    pub fn returned(&mut self, page: Iova) -> bool {
        if self.given.remove(&page.0) {
            self.free.push(page);
            true
        } else {
            false
        }
    }

    /// After a function reset firmware holds nothing.
    pub fn forget_given(&mut self) -> usize {
        let n = self.given.len();
        self.free.extend(self.given.drain().map(Iova));
        n
    }

    /// Unmaps every chunk. Pages still given are an error: firmware may
    /// still write them.
    pub fn release(self, t: &dyn Transport, space: &mut IovaSpace) -> Result<(), TransportError> {
        if !self.given.is_empty() {
            let held = self.given.len();
            // Keep the mappings: dropping the chunks only warns, nothing dangles.
            drop(self);
            return Err(TransportError::BadMapping {
                iova: Iova(0),
                len: held as u64 * FW_PAGE,
                why: "firmware still holds pages",
            });
        }
        let mut first = None;
        for c in self.chunks {
            if let Err(e) = c.release(t, space) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::mock::MockTransport;

    #[test]
    fn absurd_requests_are_refused() {
        let t = MockTransport::new();
        let mut space = IovaSpace::new(&t.iova_ranges());
        let mut pool = PagePool::new();
        assert!(pool.take(&t, &mut space, MAX_FW_PAGES + 1).is_err());
        assert_eq!(t.mappings(), 0);
    }

    #[test]
    fn give_take_release() {
        let t = MockTransport::new();
        let mut space = IovaSpace::new(&t.iova_ranges());
        let mut pool = PagePool::new();
        let pages = pool.take(&t, &mut space, 600).unwrap();
        assert_eq!(pages.len(), 600);
        assert_eq!(t.mappings(), 2, "600 pages need two 2 MiB chunks");
        assert!(pages.iter().all(|p| p.0 % FW_PAGE == 0));
        let uniq: HashSet<_> = pages.iter().map(|p| p.0).collect();
        assert_eq!(uniq.len(), 600);
        pool.mark_given(&pages);
        assert!(
            !pool.returned(Iova(0xdead_0000)),
            "a page we never gave is refused"
        );
        for p in &pages[..100] {
            assert!(pool.returned(*p));
        }
        assert!(!pool.returned(pages[0]), "returned twice");
        assert_eq!(pool.given(), 500);
        assert_eq!(pool.forget_given(), 500);
        pool.release(&t, &mut space).unwrap();
        assert_eq!(t.mappings(), 0);
        assert_eq!(space.allocated(), 0);
    }
}
