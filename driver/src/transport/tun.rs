//! Host-side packet transport: a TUN device, and entering a network
//! namespace.
//!
//! The IPoIB interfaces reach the host kernel through TUN devices
//! switched to `ARPHRD_INFINIBAND`, carrying bare IP packets behind a
//! virtio-net header (checksum and segmentation metadata). The link type
//! can only change while the link is down, so [`Tun::create`] sets it
//! before anyone can bring the interface up. Like the rest of
//! `transport`, this module holds the `unsafe` system calls so that the
//! crates above it need none.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// `ARPHRD_INFINIBAND`.
pub const ARPHRD_INFINIBAND: u16 = 32;
/// Size of the virtio-net header without `num_buffers` (what TUN uses).
pub const VNET_HDR_LEN: usize = 10;
/// The header size we configure: the 12-byte form with `num_buffers`,
/// the same layout vhost-user frontends use.
pub const VNET_HDR_LEN_MRG: usize = 12;

/// Why a TUN device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun: {0} (is the tun module loaded, and are we root?)")]
    Open(#[source] io::Error),
    /// The interface name is empty, too long or has a NUL.
    #[error("bad interface name {0:?} (1 to 15 bytes, no NUL)")]
    Name(String),
    /// One of the set-up ioctls failed.
    #[error("{op} on {name}: {err}")]
    Ioctl {
        /// The ioctl.
        op: &'static str,
        /// The interface.
        name: String,
        /// The error.
        #[source]
        err: io::Error,
    },
}

/// Offloads the kernel may hand us (`TUN_F_*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TunOffloads {
    /// Partial checksums (`TUN_F_CSUM`).
    pub csum: bool,
    /// TCP segmentation for IPv4 (`TUN_F_TSO4`), needs `csum`.
    pub tso4: bool,
    /// TCP segmentation for IPv6 (`TUN_F_TSO6`), needs `csum`.
    pub tso6: bool,
}

/// A TUN device: bare IP packets behind a virtio-net header.
#[derive(Debug)]
pub struct Tun {
    file: File,
    name: String,
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tun {
    /// Creates (or attaches to) TUN interface `name` in the calling
    /// thread's network namespace, non-blocking, with a 12-byte virtio-net
    /// header, the given offloads and link type `ARPHRD_INFINIBAND`.
    pub fn create(name: &str, offloads: TunOffloads) -> Result<Tun, TunError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(TunError::Name(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TunError::Open)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        let fd = file.as_raw_fd();
        let fail = |op, err| TunError::Ioctl {
            op,
            name: name.to_string(),
            err,
        };
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` is a
        // properly sized, initialised `ifreq` (name, flags, union padding)
        // that lives across the call, and `fd` is an open TUN fd.
        let rc = unsafe { libc::ioctl(fd, libc::TUNSETIFF, &mut req as *mut IfReq) };
        check(rc).map_err(|e| fail("TUNSETIFF", e))?;
        let actual_len = req
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(req.name.len());
        let actual = String::from_utf8_lossy(&req.name[..actual_len]).into_owned();

        let hdr = VNET_HDR_LEN_MRG as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which
        // points at `hdr`, alive for the call.
        let rc = unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &hdr as *const libc::c_int) };
        check(rc).map_err(|e| fail("TUNSETVNETHDRSZ", e))?;

        let mut off: libc::c_uint = 0;
        if offloads.csum {
            off |= libc::TUN_F_CSUM;
            if offloads.tso4 {
                off |= libc::TUN_F_TSO4;
            }
            if offloads.tso6 {
                off |= libc::TUN_F_TSO6;
            }
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is
        // passed.
        let rc = unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, libc::c_ulong::from(off)) };
        check(rc).map_err(|e| fail("TUNSETOFFLOAD", e))?;

        // SAFETY: TUNSETLINK takes the link type by value; no memory is
        // passed. The link is down (just created), as the kernel requires.
        let rc =
            unsafe { libc::ioctl(fd, libc::TUNSETLINK, libc::c_ulong::from(ARPHRD_INFINIBAND)) };
        check(rc).map_err(|e| fail("TUNSETLINK", e))?;
        Ok(Tun { file, name: actual })
    }

    /// The interface name the kernel gave it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets the carrier (the kernel's LOWER_UP / operstate), which mirrors
    /// the IPoIB link: port active and broadcast group joined.
    pub fn set_carrier(&self, on: bool) -> io::Result<()> {
        let v: libc::c_int = on.into();
        // SAFETY: TUNSETCARRIER reads one int through the pointer, which
        // points at `v`, alive for the call; the fd is an attached TUN fd.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETCARRIER,
                &v as *const libc::c_int,
            )
        };
        check(rc)
    }

    /// Reads one packet (virtio-net header first). `WouldBlock` when none
    /// is waiting.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        use std::io::Read;
        (&self.file).read(buf)
    }

    /// Writes one packet (virtio-net header first).
    pub fn send(&self, buf: &[u8]) -> io::Result<usize> {
        use std::io::Write;
        (&self.file).write(buf)
    }
}

impl AsRawFd for Tun {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Moves the calling thread into the network namespace at `path` (for
/// example `/run/netns/NAME`). Sockets and TUN devices it creates
/// afterwards belong to that namespace.
pub fn enter_netns(path: &Path) -> io::Result<()> {
    let ns = File::open(path)?;
    // SAFETY: setns takes an fd and a flag; `ns` is an open namespace
    // file for the duration of the call. Only the calling thread moves.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    check(rc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_any_system_call() {
        for bad in ["", "0123456789abcdef", "a\0b"] {
            assert!(matches!(
                Tun::create(bad, TunOffloads::default()),
                Err(TunError::Name(_))
            ));
        }
    }
}
