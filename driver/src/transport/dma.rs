//! Host memory the device reaches by DMA.

use std::fmt;
use std::sync::Arc;

use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
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

/// A VM's memory region as a vhost-user backend maps it: the HCA can be
/// given the very mapping the backend reads descriptors through.
impl DmaBacking for vm_memory::GuestRegionMmap<()> {
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
/// Reached only through copying and atomic accessors, never references.
/// Offsets past the end are ignored (reads give zeros) and logged: they are
/// driver bugs, never input.
#[derive(Debug)]
pub struct DmaBuffer {
    region: Arc<MmapRegion<()>>,
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
        let region =
            Arc::new(MmapRegion::<()>::new(len).map_err(|e| TransportError::Alloc(len, e))?);
        let backing: Arc<dyn DmaBacking> = region.clone();
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
            region,
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

    fn vs(&self) -> VolatileSlice<'_> {
        self.region.as_volatile_slice()
    }

    /// Copies bytes out of the buffer.
    pub fn read(&self, off: usize, buf: &mut [u8]) {
        if self.vs().read_slice(buf, off).is_err() {
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
        if self.vs().write_slice(buf, off).is_err() {
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

    /// Address of `[off, off + n)` when it lies inside the buffer and is
    /// aligned to `n` (a power of two).
    #[inline]
    fn at(&self, off: usize, n: usize) -> Option<*mut u8> {
        let end = off.checked_add(n)?;
        (end <= self.region.size() && off & (n - 1) == 0)
            .then(|| self.region.as_ptr().wrapping_add(off))
    }

    /// Reads one byte (an ownership byte: acquire ordering).
    #[inline]
    pub fn read_u8(&self, off: usize) -> u8 {
        match self.at(off, 1) {
            // SAFETY: `at` checked that the byte lies inside our live mapping;
            // the device shares this memory, hence an atomic access.
            Some(p) => unsafe { AtomicU8::from_ptr(p) }.load(Ordering::Acquire),
            None => 0,
        }
    }

    /// Writes one byte.
    #[inline]
    pub fn write_u8(&self, off: usize, v: u8) {
        if let Some(p) = self.at(off, 1) {
            // SAFETY: inside our live mapping (checked by `at`).
            unsafe { AtomicU8::from_ptr(p) }.store(v, Ordering::Relaxed);
        }
    }

    /// Reads a big-endian 32-bit word at a 4-byte aligned offset (0 if out
    /// of bounds or misaligned).
    #[inline]
    pub fn read_be32(&self, off: usize) -> u32 {
        let Some(p) = self.at(off, 4) else { return 0 };
        // SAFETY: inside our live mapping and 4-byte aligned (checked by
        // `at`; the mapping itself is page aligned).
        let word = unsafe { AtomicU32::from_ptr(p.cast()) };
        u32::from_be(word.load(Ordering::Relaxed))
    }

    /// Writes a big-endian 32-bit word at a 4-byte aligned offset.
    #[inline]
    pub fn write_be32(&self, off: usize, v: u32) {
        if let Some(p) = self.at(off, 4) {
            // SAFETY: inside our live mapping and aligned (checked by `at`).
            unsafe { AtomicU32::from_ptr(p.cast()) }.store(v.to_be(), Ordering::Relaxed);
        }
    }

    /// Writes a big-endian 64-bit word at an 8-byte aligned offset in one
    /// store.
    #[inline]
    pub fn write_be64(&self, off: usize, v: u64) {
        if let Some(p) = self.at(off, 8) {
            // SAFETY: inside our live mapping and aligned (checked by `at`).
            unsafe { AtomicU64::from_ptr(p.cast()) }.store(v.to_be(), Ordering::Relaxed);
        }
    }

    /// Writes big-endian 64-bit words from an 8-byte aligned offset.
    #[inline]
    pub fn write_be64s(&self, off: usize, words: &[u64]) {
        let Some(p) = self
            .at(off, 8)
            .filter(|_| off + 8 * words.len() <= self.region.size())
        else {
            tracing::error!(off, n = words.len(), "DMA write out of bounds");
            return;
        };
        for (k, w) in words.iter().enumerate() {
            // SAFETY: `at` checked alignment and the filter that all words fit
            // inside our live mapping.
            unsafe { AtomicU64::from_ptr(p.wrapping_add(k * 8).cast()) }
                .store(w.to_be(), Ordering::Relaxed);
        }
    }

    /// A view of the 64-byte block at a 64-byte aligned offset, for several
    /// accesses behind one bounds check.
    #[inline]
    pub fn block(&self, off: usize) -> Option<Block<'_>> {
        self.at(off, 64).map(|p| Block {
            p,
            _buf: std::marker::PhantomData,
        })
    }
}

/// A 64-byte aligned block of a [`DmaBuffer`] (a CQE, an EQE, a WQE basic
/// block): offsets are taken modulo 64, so no access leaves it.
#[derive(Clone, Copy, Debug)]
pub struct Block<'a> {
    p: *mut u8,
    _buf: std::marker::PhantomData<&'a DmaBuffer>,
}

impl Block<'_> {
    /// The big-endian dword at `off & 0x3C`.
    #[inline]
    pub fn be32(&self, off: usize) -> u32 {
        // SAFETY: the block is 64 bytes inside a live mapping, 64-byte
        // aligned, and `off & 0x3C` keeps the dword inside it and aligned.
        u32::from_be(
            unsafe { AtomicU32::from_ptr(self.p.wrapping_add(off & 0x3C).cast()) }
                .load(Ordering::Relaxed),
        )
    }

    /// The big-endian 64-bit word at `off & 0x38`.
    #[inline]
    pub fn be64(&self, off: usize) -> u64 {
        // SAFETY: as for `be32`, with 8-byte words.
        u64::from_be(
            unsafe { AtomicU64::from_ptr(self.p.wrapping_add(off & 0x38).cast()) }
                .load(Ordering::Relaxed),
        )
    }

    /// Stores the big-endian 64-bit word at `off & 0x38`.
    #[inline]
    pub fn set_be64(&self, off: usize, v: u64) {
        // SAFETY: as for `be32`, with 8-byte words.
        unsafe { AtomicU64::from_ptr(self.p.wrapping_add(off & 0x38).cast()) }
            .store(v.to_be(), Ordering::Relaxed);
    }

    /// Stores 8 bytes given as their memory image (already in device byte
    /// order) at `off & 0x38`.
    #[inline]
    pub fn set_image64(&self, off: usize, image: u64) {
        // SAFETY: as for `be32`, with 8-byte words.
        unsafe { AtomicU64::from_ptr(self.p.wrapping_add(off & 0x38).cast()) }
            .store(image, Ordering::Relaxed);
    }

    /// Stores a 64-byte image (a WQE basic block) as eight 64-bit stores.
    #[inline]
    pub fn write_all(&self, b: &[u8; 64]) {
        for (k, q) in b.chunks_exact(8).enumerate() {
            let v = u64::from_ne_bytes([q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7]]);
            // SAFETY: as for `be32`: word k of the block, aligned and inside it.
            unsafe { AtomicU64::from_ptr(self.p.wrapping_add(k * 8).cast()) }
                .store(v, Ordering::Relaxed);
        }
    }
}

fn bytes_fill<B: BitmapSlice>(s: &VolatileSlice<'_, B>, byte: u8) {
    let pattern = [byte; 256];
    let mut off = 0;
    while off < s.len() {
        let n = (s.len() - off).min(pattern.len());
        // Bounds checked by the loop condition; an error is impossible here.
        let _ = s.write_slice(&pattern[..n], off);
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
