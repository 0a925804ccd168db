//! Host memory the device reaches by DMA.

use std::fmt;
use std::sync::Arc;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, VolatileMemory, VolatileSlice};

use super::{Iova, IovaSpace, Transport, TransportError};

/// Memory that can be handed to the device: anything that lives in one
/// host mapping. Implemented for vm-memory's `MmapRegion`, which is also
/// what backs vhost-user guest regions.
pub trait DmaBacking: Send + Sync + fmt::Debug {
    /// Length of the mapping in bytes.
    fn len(&self) -> usize;
    /// Whether the mapping is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Start of the host mapping, for the IOMMU map call.
    fn host_ptr(&self) -> *mut u8;
    /// Volatile view of the whole mapping.
    fn volatile(&self) -> VolatileSlice<'_>;
}

impl DmaBacking for MmapRegion<()> {
    fn len(&self) -> usize {
        self.size()
    }
    fn host_ptr(&self) -> *mut u8 {
        self.as_ptr()
    }
    fn volatile(&self) -> VolatileSlice<'_> {
        self.as_volatile_slice()
    }
}

/// A window `[offset, offset + len)` of a [`DmaBacking`]: what a DMA mapping
/// covers. Cloning shares the backing.
#[derive(Clone, Debug)]
pub struct DmaMem {
    backing: Arc<dyn DmaBacking>,
    offset: usize,
    len: usize,
}

impl DmaMem {
    /// A window over `backing`; `None` if it does not fit.
    pub fn new(backing: Arc<dyn DmaBacking>, offset: usize, len: usize) -> Option<DmaMem> {
        (offset.checked_add(len)? <= backing.len()).then_some(DmaMem {
            backing,
            offset,
            len,
        })
    }

    /// Length of the window.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the window is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Host address of the window's first byte (for IOMMU map calls only).
    pub fn host_ptr(&self) -> *mut u8 {
        self.backing.host_ptr().wrapping_add(self.offset)
    }

    fn slice(&self, off: usize, len: usize) -> Option<VolatileSlice<'_>> {
        let end = off.checked_add(len)?;
        if end > self.len {
            return None;
        }
        self.backing
            .volatile()
            .subslice(self.offset + off, len)
            .ok()
    }

    /// Copies `buf.len()` bytes at `off` into `buf`; false if out of bounds.
    pub fn read(&self, off: usize, buf: &mut [u8]) -> bool {
        match self.slice(off, buf.len()) {
            Some(s) => s.read_slice(buf, 0).is_ok(),
            None => false,
        }
    }

    /// Copies `buf` to `off`; false if out of bounds.
    pub fn write(&self, off: usize, buf: &[u8]) -> bool {
        match self.slice(off, buf.len()) {
            Some(s) => s.write_slice(buf, 0).is_ok(),
            None => false,
        }
    }
}

/// Driver-owned DMA memory: zeroed anonymous memory mapped at an IOVA.
///
/// Reached only through copying accessors. Offsets past the end are
/// ignored (reads give zeros) and logged: they are driver bugs, never input.
#[derive(Debug)]
pub struct DmaBuffer {
    mem: DmaMem,
    iova: Iova,
    released: bool,
}

impl DmaBuffer {
    /// Allocates `len` bytes (rounded up to 4 KiB), takes an IOVA range from
    /// `space` and maps it.
    pub fn alloc(
        t: &dyn Transport,
        space: &mut IovaSpace,
        len: usize,
    ) -> Result<DmaBuffer, TransportError> {
        let len = len.max(1).next_multiple_of(4096);
        let region = MmapRegion::<()>::new(len).map_err(|e| TransportError::Alloc(len, e))?;
        let backing: Arc<dyn DmaBacking> = Arc::new(region);
        let mem = DmaMem::new(backing, 0, len).ok_or(TransportError::BadMapping {
            iova: Iova(0),
            len: len as u64,
            why: "allocation shorter than requested",
        })?;
        let iova = space.alloc(len as u64)?;
        if let Err(e) = t.map_dma(iova, mem.clone()) {
            space.free(iova, len as u64);
            return Err(e);
        }
        Ok(DmaBuffer {
            mem,
            iova,
            released: false,
        })
    }

    /// Unmaps the buffer and returns its IOVA range. Call only once the
    /// device can no longer touch it.
    pub fn release(
        mut self,
        t: &dyn Transport,
        space: &mut IovaSpace,
    ) -> Result<(), TransportError> {
        self.released = true;
        let len = self.mem.len() as u64;
        t.unmap_dma(self.iova, len)?;
        space.free(self.iova, len);
        Ok(())
    }

    /// IOVA of byte 0.
    pub fn iova(&self) -> Iova {
        self.iova
    }

    /// IOVA of byte `off`.
    pub fn iova_at(&self, off: usize) -> Iova {
        self.iova.add(off as u64)
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.mem.len()
    }

    /// Whether the buffer is empty (never, for an allocated one).
    pub fn is_empty(&self) -> bool {
        self.mem.is_empty()
    }

    /// Copies bytes out of the buffer.
    pub fn read(&self, off: usize, buf: &mut [u8]) {
        if !self.mem.read(off, buf) {
            buf.fill(0);
            tracing::error!(
                off,
                len = buf.len(),
                size = self.len(),
                "DMA read out of bounds"
            );
        }
    }

    /// Copies bytes into the buffer.
    pub fn write(&self, off: usize, buf: &[u8]) {
        if !self.mem.write(off, buf) {
            tracing::error!(
                off,
                len = buf.len(),
                size = self.len(),
                "DMA write out of bounds"
            );
        }
    }

    /// Sets `len` bytes at `off` to `byte`.
    pub fn fill(&self, off: usize, len: usize, byte: u8) {
        match self.mem.slice(off, len) {
            Some(s) => bytes_fill(&s, byte),
            None => tracing::error!(off, len, "DMA fill out of bounds"),
        }
    }

    /// Reads one byte.
    pub fn read_u8(&self, off: usize) -> u8 {
        let mut b = [0u8; 1];
        self.read(off, &mut b);
        b[0]
    }

    /// Writes one byte.
    pub fn write_u8(&self, off: usize, v: u8) {
        self.write(off, &[v]);
    }

    /// Reads a big-endian 32-bit word.
    pub fn read_be32(&self, off: usize) -> u32 {
        let mut b = [0u8; 4];
        self.read(off, &mut b);
        u32::from_be_bytes(b)
    }

    /// Writes a big-endian 32-bit word.
    pub fn write_be32(&self, off: usize, v: u32) {
        self.write(off, &v.to_be_bytes());
    }
}

fn bytes_fill<B: BitmapSlice>(s: &VolatileSlice<'_, B>, byte: u8) {
    const CHUNK: [u8; 256] = [0; 256];
    let pattern = [byte; 256];
    let src = if byte == 0 { &CHUNK } else { &pattern };
    let mut off = 0;
    while off < s.len() {
        let n = (s.len() - off).min(src.len());
        // Bounds checked by the loop condition; an error is impossible here.
        let _ = s.write_slice(&src[..n], off);
        off += n;
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        if !self.released {
            // The transport still holds the memory through its mapping, so
            // nothing dangles; the mapping is leaked until the transport goes.
            tracing::warn!(iova = %self.iova, len = self.len(), "leaking a DMA mapping");
        }
    }
}
