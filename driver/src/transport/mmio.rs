//! Volatile access to a memory-mapped BAR: the only place registers are
//! touched and byte-swapped.

use std::io;
use std::os::fd::RawFd;

use super::TransportError;

/// One mmap'ed area of a BAR.
#[derive(Debug)]
struct Area {
    /// Offset of the area inside the BAR.
    bar_off: u64,
    len: usize,
    ptr: *mut u8,
}

/// A BAR mapped into this process, possibly as several sparse areas (VFIO
/// keeps the MSI-X table out of the mapping on hosts without
/// `MSIX_MAPPABLE`). Accesses outside the mapped areas are dropped (writes)
/// or read as all-ones, like a master abort on the bus.
#[derive(Debug)]
pub struct Mmio {
    areas: Vec<Area>,
}

// SAFETY: the mapping is plain device memory reached only with volatile
// accesses through &self; sharing the pointer between threads is what MMIO is.
unsafe impl Send for Mmio {}
// SAFETY: see above; no interior state beyond the device registers themselves.
unsafe impl Sync for Mmio {}

impl Mmio {
    /// Maps `(bar_offset, len)` areas of the region that starts at
    /// `region_offset` in the file `fd`.
    pub fn map(
        fd: RawFd,
        region_offset: u64,
        areas: &[(u64, u64)],
    ) -> Result<Mmio, TransportError> {
        let mut mapped = Mmio { areas: Vec::new() };
        for &(bar_off, len) in areas {
            let len = usize::try_from(len).map_err(|_| TransportError::BadMapping {
                iova: super::Iova(bar_off),
                len,
                why: "BAR area larger than the address space",
            })?;
            let file_off =
                libc::off_t::try_from(region_offset + bar_off).unwrap_or(libc::off_t::MAX);
            // SAFETY: a fresh shared mapping of the device fd; the kernel
            // validates offset and length against the region and we check the
            // result before use. The mapping is owned by `mapped` and unmapped in Drop.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd,
                    file_off,
                )
            };
            if ptr == libc::MAP_FAILED {
                return Err(TransportError::Io {
                    op: "mmap of BAR0",
                    source: io::Error::last_os_error(),
                });
            }
            mapped.areas.push(Area {
                bar_off,
                len,
                ptr: ptr.cast(),
            });
        }
        Ok(mapped)
    }

    fn at(&self, off: u32, width: usize) -> Option<*mut u8> {
        let off = u64::from(off);
        if off % width as u64 != 0 {
            return None;
        }
        self.areas.iter().find_map(|a| {
            let rel = off.checked_sub(a.bar_off)?;
            let rel = usize::try_from(rel).ok()?;
            (rel + width <= a.len).then(|| a.ptr.wrapping_add(rel))
        })
    }

    /// Reads a big-endian 32-bit register.
    pub fn read32(&self, off: u32) -> u32 {
        match self.at(off, 4) {
            // SAFETY: `at` returned an aligned address inside a live mapping.
            Some(p) => u32::from_be(unsafe { std::ptr::read_volatile(p.cast::<u32>()) }),
            None => u32::MAX,
        }
    }

    /// Writes a big-endian 32-bit register.
    pub fn write32(&self, off: u32, v: u32) {
        if let Some(p) = self.at(off, 4) {
            // SAFETY: `at` returned an aligned address inside a live mapping.
            unsafe { std::ptr::write_volatile(p.cast::<u32>(), v.to_be()) }
        }
    }

    /// Writes a 64-bit big-endian image in a single access.
    pub fn write64(&self, off: u32, v: u64) {
        if let Some(p) = self.at(off, 8) {
            // SAFETY: `at` returned an aligned address inside a live mapping.
            unsafe { std::ptr::write_volatile(p.cast::<u64>(), v.to_be()) }
        }
    }
}

impl Drop for Mmio {
    fn drop(&mut self) {
        for a in &self.areas {
            // SAFETY: each area was returned by mmap with this length and is
            // no longer reachable once `self` is gone.
            unsafe {
                libc::munmap(a.ptr.cast(), a.len);
            }
        }
    }
}
