//! What a PCI function gives a driver, behind one small trait.
//!
//! A ConnectX function offers four things to the code that drives it: its
//! configuration space, BAR0 (initialization segment, health buffer and UAR
//! doorbell pages, all 32-bit big-endian registers), DMA (host memory the
//! device may read and write at IO virtual addresses the driver chooses) and
//! MSI-X vectors. [`Transport`] is exactly that, so the mlx5 core above it
//! runs unchanged on a card bound to vfio-pci ([`vfio::VfioTransport`]) and
//! on the software HCA of the `ipoib-sim` crate, which reacts to the same
//! register writes and reaches memory only through the mappings made here.
//!
//! This module and its children hold every `unsafe` block of the driver.
//! Memory shared with the device is never reached through Rust references:
//! [`DmaBuffer`] exposes volatile accessors only (see vm-memory's
//! `VolatileSlice`), because the device may write it at any moment.

#![allow(unsafe_code)]

mod dma;
mod iova;
mod mmio;
#[cfg(any(test, feature = "test-utils"))]
pub mod mock;
pub mod tun;
pub mod vfio;

use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

pub use dma::{Block, DmaBacking, DmaBuffer, DmaMem};
pub use iova::{IovaRange, IovaSpace, x86_default_ranges};
pub use mmio::Mmio;
use vmm_sys_util::eventfd::EventFd;

/// An IO virtual address: what the device puts on the bus, translated by the
/// IOMMU. Never a host pointer.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize)]
pub struct Iova(pub u64);

impl Iova {
    /// The address `bytes` further on.
    pub const fn add(self, bytes: u64) -> Iova {
        Iova(self.0 + bytes)
    }
}

impl fmt::Debug for Iova {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Iova({:#x})", self.0)
    }
}

impl fmt::Display for Iova {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// PCI identity read from configuration space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PciIds {
    /// Vendor ID (0x15B3 for Mellanox/NVIDIA).
    pub vendor: u16,
    /// Device ID (0x1017 ConnectX-5, ...).
    pub device: u16,
    /// Revision ID.
    pub revision: u8,
}

/// PCI configuration-space offsets used by the driver (PCI Local Bus spec).
pub mod pci {
    /// Vendor ID register (16 bits).
    pub const VENDOR_ID: u32 = 0x00;
    /// Device ID register (16 bits).
    pub const DEVICE_ID: u32 = 0x02;
    /// Command register (16 bits).
    pub const COMMAND: u32 = 0x04;
    /// Revision ID register (8 bits).
    pub const REVISION_ID: u32 = 0x08;
    /// Command register: Memory Space Enable.
    pub const COMMAND_MEMORY: u16 = 1 << 1;
    /// Command register: Bus Master Enable.
    pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
}

/// Errors of a transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The PCI function does not exist.
    #[error("no PCI device {0} (see /sys/bus/pci/devices)")]
    NoDevice(String),
    /// The function is bound to another driver, or to none.
    #[error(
        "{bdf} is bound to {}, not vfio-pci: run `ipoib-tool bind-vfio {bdf}` \
         (or write vfio-pci to /sys/bus/pci/devices/{bdf}/driver_override and reprobe)",
        bound.as_deref().unwrap_or("no driver")
    )]
    NotVfio {
        /// PCI address.
        bdf: String,
        /// The driver it is bound to, if any.
        bound: Option<String>,
    },
    /// No IOMMU group: the IOMMU is off or absent.
    #[error(
        "{0} has no IOMMU group: enable the IOMMU (intel_iommu=on or amd_iommu=on on the kernel \
         command line, VT-d/AMD-Vi in firmware)"
    )]
    NoIommu(String),
    /// Other functions of the IOMMU group are still bound to host drivers.
    #[error(
        "IOMMU group {group} is not viable: {} must also be bound to vfio-pci (or unbound)",
        others.join(", ")
    )]
    GroupNotViable {
        /// Group number.
        group: u32,
        /// `bdf (driver)` of each offending function.
        others: Vec<String>,
    },
    /// /dev/vfio/N is open in another process: only one may own a VFIO
    /// group, so a second daemon on the same card ends here.
    #[error(
        "IOMMU group {group} is in use by another process (is another ipoib-vfio running on this card?)"
    )]
    GroupBusy {
        /// Group number.
        group: u32,
    },
    /// /dev/vfio/N cannot be opened by this user.
    #[error("no permission to open {0}: run as root or give this user access to the VFIO group")]
    Permission(String),
    /// RLIMIT_MEMLOCK is below what the driver will pin.
    #[error(
        "locked-memory limit is {limit} bytes, below the {needed} bytes the driver pins: \
         raise it (ulimit -l, LimitMEMLOCK=) or grant CAP_IPC_LOCK"
    )]
    MemlockTooLow {
        /// Current soft limit.
        limit: u64,
        /// Bytes needed.
        needed: u64,
    },
    /// A VFIO operation failed.
    #[error("VFIO {op} failed")]
    Vfio {
        /// What was attempted.
        op: &'static str,
        /// The library's error.
        #[source]
        source: vfio_ioctls::VfioError,
    },
    /// A system call failed.
    #[error("{op} failed")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Allocating host memory for DMA failed.
    #[error("allocating {0} bytes of DMA memory failed")]
    Alloc(usize, #[source] vm_memory::mmap::MmapRegionError),
    /// No room left in the usable IOVA ranges.
    #[error("IOVA space exhausted: no free range of {0} bytes")]
    IovaExhausted(u64),
    /// A mapping request overlaps an existing mapping or leaves the usable ranges.
    #[error("IOVA range {iova}+{len:#x} is not mappable: {why}")]
    BadMapping {
        /// Start.
        iova: Iova,
        /// Length.
        len: u64,
        /// Reason.
        why: &'static str,
    },
    /// The function has no MSI-X capability or too few vectors.
    #[error("MSI-X: {wanted} vectors wanted, the function has {available}")]
    Msix {
        /// Requested vectors.
        wanted: usize,
        /// Vectors the function offers.
        available: usize,
    },
    /// The function cannot be reset.
    #[error("the function does not support reset")]
    NoReset,
}

/// A PCI function as seen by the mlx5 core.
///
/// BAR0 accessors take and return register *values*; the big-endian byte
/// order of the mlx5 registers is the transport's business. `bar_write64`
/// stores `val` as one 64-bit big-endian image (the CQ arm and SQ doorbells).
pub trait Transport: Send + Sync + fmt::Debug {
    /// A short name for messages: the PCI address, or `sim`.
    fn name(&self) -> &str;
    /// Reads a 16-bit configuration register.
    fn config_read16(&self, offset: u32) -> Result<u16, TransportError>;
    /// Writes a 16-bit configuration register.
    fn config_write16(&self, offset: u32, value: u16) -> Result<(), TransportError>;
    /// Reads a 32-bit big-endian BAR0 register.
    fn bar_read32(&self, offset: u32) -> u32;
    /// Writes a 32-bit big-endian BAR0 register.
    fn bar_write32(&self, offset: u32, value: u32);
    /// Writes a 64-bit big-endian BAR0 register in one access.
    fn bar_write64(&self, offset: u32, value: u64);
    /// The IOVA ranges the IOMMU lets the device use.
    fn iova_ranges(&self) -> Vec<IovaRange>;
    /// Maps `mem` for device access at `iova` (page aligned). The transport
    /// holds `mem` alive until the mapping is removed.
    fn map_dma(&self, iova: Iova, mem: DmaMem) -> Result<(), TransportError>;
    /// Removes the mapping that starts at `iova` and spans `len` bytes.
    fn unmap_dma(&self, iova: Iova, len: u64) -> Result<(), TransportError>;
    /// Number of MSI-X vectors of the function.
    fn msix_vectors(&self) -> usize;
    /// Routes MSI-X vectors `0..fds.len()` to these eventfds.
    fn enable_msix(&self, fds: &[&EventFd]) -> Result<(), TransportError>;
    /// Disables MSI-X.
    fn disable_msix(&self) -> Result<(), TransportError>;
    /// Function-level reset: the device forgets every command, object and
    /// page; DMA mappings stay (they belong to the IOMMU, not the device).
    fn reset(&self) -> Result<(), TransportError>;
}

impl<T: Transport + ?Sized> Transport for Arc<T> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn config_read16(&self, offset: u32) -> Result<u16, TransportError> {
        (**self).config_read16(offset)
    }
    fn config_write16(&self, offset: u32, value: u16) -> Result<(), TransportError> {
        (**self).config_write16(offset, value)
    }
    fn bar_read32(&self, offset: u32) -> u32 {
        (**self).bar_read32(offset)
    }
    fn bar_write32(&self, offset: u32, value: u32) {
        (**self).bar_write32(offset, value)
    }
    fn bar_write64(&self, offset: u32, value: u64) {
        (**self).bar_write64(offset, value)
    }
    fn iova_ranges(&self) -> Vec<IovaRange> {
        (**self).iova_ranges()
    }
    fn map_dma(&self, iova: Iova, mem: DmaMem) -> Result<(), TransportError> {
        (**self).map_dma(iova, mem)
    }
    fn unmap_dma(&self, iova: Iova, len: u64) -> Result<(), TransportError> {
        (**self).unmap_dma(iova, len)
    }
    fn msix_vectors(&self) -> usize {
        (**self).msix_vectors()
    }
    fn enable_msix(&self, fds: &[&EventFd]) -> Result<(), TransportError> {
        (**self).enable_msix(fds)
    }
    fn disable_msix(&self) -> Result<(), TransportError> {
        (**self).disable_msix()
    }
    fn reset(&self) -> Result<(), TransportError> {
        (**self).reset()
    }
}

/// Reads the PCI identity of a function.
pub fn read_pci_ids(t: &dyn Transport) -> Result<PciIds, TransportError> {
    let vendor = t.config_read16(pci::VENDOR_ID)?;
    let device = t.config_read16(pci::DEVICE_ID)?;
    let revision = (t.config_read16(pci::REVISION_ID)? & 0xff) as u8;
    Ok(PciIds {
        vendor,
        device,
        revision,
    })
}

/// Full memory barrier between descriptor writes in DMA memory and the MMIO
/// doorbell that hands them to the device (`wmb()` in the drivers).
#[inline]
pub fn dma_wmb() {
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

/// Read barrier after seeing an ownership bit flip, before reading the rest
/// of what the device wrote (`dma_rmb()`).
#[inline]
pub fn dma_rmb() {
    std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
}

/// Waits until `fd` is readable or `timeout` passes; drains its counter.
/// Returns the counter value, or `None` on timeout.
pub fn wait_eventfd(fd: &EventFd, timeout: Duration) -> Result<Option<u64>, TransportError> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    loop {
        // SAFETY: `pfd` is a valid pollfd for the duration of the call and we pass nfds = 1.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(TransportError::Io {
                op: "poll on an MSI-X eventfd",
                source: err,
            });
        }
        if rc == 0 {
            return Ok(None);
        }
        return match fd.read() {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Some(0)),
            Err(e) => Err(TransportError::Io {
                op: "read of an MSI-X eventfd",
                source: e,
            }),
        };
    }
}

/// Copies the next bytes waiting on stream socket `fd` into `buf`
/// without taking them (MSG_PEEK), without waiting; how many were copied
/// (0 if none are waiting). A vhost-user backend reads a request's type
/// this way before the library takes the request.
pub fn peek_socket(fd: &impl AsRawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the
    // duration of the call; recv writes at most that many.
    let rc = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::WouldBlock {
            Ok(0)
        } else {
            Err(e)
        };
    }
    Ok(rc as usize)
}

/// The host's page size.
pub fn host_page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(v).unwrap_or(4096)
}
