//! vhost-user-net backend: a VM's virtio-net NIC as an endpoint of an
//! IPoIB interface.
//!
//! Each socket (`--vhost-user ib0=PATH`) is one [`Vnic`]: a device that
//! speaks the vhost-user protocol to one frontend at a time (QEMU,
//! cloud-hypervisor, DPDK's virtio-user) and an endpoint of the interface
//! with its own UD QP. Everything runs on the daemon's event loop, which
//! owns the HCA: the listening socket, the frontend's socket and the
//! queues' kick eventfds are in its wait set, requests are answered there
//! (the `vhost` crate parses them; [`Device`] acts on them) and frames are
//! moved there between the virtqueues and the interface through
//! [`VnicPort`], the endpoint's [`HostPort`].
//!
//! Zero copy: the VM's memory regions are mapped for the HCA at an IOVA
//! window of that VM's own, under a key of the endpoint's own protection
//! domain bounded to the window ([`Link::map_guest_memory`]), so its QP
//! reaches that VM's memory and nothing else. Every descriptor is
//! translated through the memory table first; one outside it, or crossing
//! a region's end, is not lent but left to the copy, which refuses it.
//!
//! - Transmit: a TCP or UDP frame (not DHCP) of [`LEND_MIN`] bytes or more
//!   is *lent*: its first [`LEND_HEAD`] bytes (Ethernet, IP and transport
//!   headers) are copied, checked and sent from the daemon's memory, so
//!   the guest cannot change them after the checks, and the HCA gathers
//!   the rest from the guest's buffer, which goes back on the used ring
//!   when the send completes. While frames are lent the ring asks for no
//!   kicks: their completions bring the next look.
//! - Receive: receive chains are lent ([`HostPort::lend_rx`]) and the
//!   endpoint's receive WQEs scatter the packet into them; the link writes
//!   the virtio-net and Ethernet headers in front ([`HostPort::rx_done`]).
//!   Chains the HCA gave back unused are lent again first, and go to the
//!   guest empty when its ring stops.
//!
//! Before a request of the frontend that may change memory, rings or
//! features is acted on (a memory table or ring change, a stop; the type
//! is peeked first) the endpoint is quiesced ([`Link::quiesce_guest`]):
//! lent frames still waiting are copied in, posted sends complete, the
//! receive queue is flushed and its buffers given back, and only then is
//! an old window removed; afterwards it is resumed. Small frames, control
//! traffic and everything of a vNIC started with `copy` are copied; such
//! copies are checked against the VM's memory table by the copy itself (an
//! address outside it fails the copy and the chain is returned unused and
//! counted), and chains are bounded in length and count.
//!
//! A frontend that goes away (QEMU or testpmd restarting) ends its
//! connection only: the next one is accepted, the endpoint (QP, QPN,
//! memberships) stays, and the guest's learned MAC and addresses are
//! forgotten (see [`crate::link::Link::reset_guest`]).
//!
//! Why not `vhost-user-backend`: QEMU (7.2) sends SET_VRING_ENABLE to a
//! vhost-user-net backend before SET_FEATURES, and that crate (0.24)
//! answers with an error that closes the connection; QEMU also needs
//! VHOST_USER_F_PROTOCOL_FEATURES offered to start the device at all.
//! The `vhost` crate underneath still refuses those early requests (with
//! an error reply, keeping the connection), so rings here start enabled
//! and only a later SET_VRING_ENABLE(0) disables one, as with DPDK's vhost
//! library.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use mlx5_driver::layout::wqe::Sge;
use mlx5_driver::transport::{DmaMem, Iova, Transport};
use vhost::VhostUserMemoryRegionBase;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    BackendReqHandler, Error as VuError, GpuBackend, Listener, Result as VuResult,
    VhostUserBackendReqHandlerMut,
};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::engine::eth::Mac;
use crate::link::{
    EndpointId, GuestConfig, GuestWindow, HostPort, Lend, Lent, Link, MAX_LENT, Received,
};

/// virtio-net and virtio feature bits this backend knows (virtio 1.2
/// §5.1.3, §6).
pub mod feature {
    /// The guest may hand partial checksums.
    pub const CSUM: u64 = 1 << 0;
    /// The device may tell the guest checksums were verified (DATA_VALID).
    pub const GUEST_CSUM: u64 = 1 << 1;
    /// `mtu` in the config space is valid.
    pub const MTU: u64 = 1 << 3;
    /// `mac` in the config space is valid.
    pub const MAC: u64 = 1 << 5;
    /// The guest may send TCPv4 segmentation offload frames.
    pub const HOST_TSO4: u64 = 1 << 11;
    /// The guest may send TCPv6 segmentation offload frames.
    pub const HOST_TSO6: u64 = 1 << 12;
    /// Received frames may span several buffers.
    pub const MRG_RXBUF: u64 = 1 << 15;
    /// Indirect descriptor tables.
    pub const INDIRECT_DESC: u64 = 1 << 28;
    /// used_event / avail_event notification suppression.
    pub const EVENT_IDX: u64 = 1 << 29;
    /// vhost-user: protocol features are negotiated.
    pub const PROTOCOL_FEATURES: u64 = 1 << 30;
    /// A virtio 1.x device.
    pub const VERSION_1: u64 = 1 << 32;
}

/// The receive and transmit queues of the one queue pair.
const RXQ: usize = 0;
const TXQ: usize = 1;
/// Largest queue a frontend may set up.
const MAX_QUEUE_SIZE: usize = 1024;
/// Memory regions a frontend may give.
const MAX_REGIONS: usize = 32;
/// Length of the virtio-net header with VERSION_1 or MRG_RXBUF (the one
/// the rest of the daemon uses).
use mlx5_driver::transport::tun::VNET_HDR_LEN_MRG as HDR_LEN;
/// Length of the legacy header without either.
const LEGACY_HDR_LEN: usize = 10;
/// Descriptors one received frame may be spread over.
const MAX_RX_DESCS: usize = 64;
/// `virtio_net_config` up to and including `mtu`.
const CONFIG_LEN: usize = 12;
/// Largest config window a frontend may ask for (a vhost-user message).
const MAX_CONFIG_WINDOW: u32 = 0x1000;
/// Frames shorter than this are copied: below it a copy costs less than
/// the gather entries and the deferred completion.
pub const LEND_MIN: usize = 512;
/// Bytes of a lent frame copied, checked and sent from daemon memory:
/// Ethernet, IP (with options) and TCP (with options) headers fit.
pub const LEND_HEAD: usize = 256;
/// Descriptors a lent frame may have.
const MAX_LEND_DESCS: usize = 20;
/// Descriptors a receive chain lent to the HCA may have.
const MAX_RX_LEND_DESCS: usize = 4;

/// What one vNIC's queues saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct QueueCounters {
    /// Frames taken from the guest's transmit queue.
    pub tx_frames: u64,
    /// Frames written to the guest's receive queue.
    pub rx_frames: u64,
    /// Transmit chains refused: outside the guest's memory, writable,
    /// looping, empty, shorter than a virtio-net and Ethernet header, or
    /// longer than a frame may be.
    pub tx_bad_chains: u64,
    /// Receive chains refused: outside the guest's memory, read-only or
    /// looping.
    pub rx_bad_chains: u64,
    /// Frames for the guest dropped: no receive buffer posted.
    pub rx_no_buffers: u64,
    /// Frames for the guest dropped: larger than its buffers.
    pub rx_too_big: u64,
    /// Frontend connections served.
    pub connections: u64,
    /// Frontend requests refused (each answered with an error).
    pub bad_requests: u64,
    /// Frames lent to the HCA (sent from guest memory).
    pub tx_lent: u64,
    /// Frames the HCA wrote straight into the guest's buffers.
    pub rx_lent: u64,
}

/// What `ipoib-tool vms` shows of a vNIC's frontend side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The socket.
    pub socket: PathBuf,
    /// A frontend is connected.
    pub connected: bool,
    /// Both queues are set up, started and enabled: frames move.
    pub ready: bool,
    /// Features the frontend acknowledged.
    pub features: u64,
    /// The VM's memory is mapped for the HCA: sends are zero-copy.
    pub zero_copy: bool,
    /// Counters.
    pub counters: QueueCounters,
}

/// One virtqueue as the frontend set it up.
#[derive(Debug)]
struct Vq {
    queue: Queue,
    kick: Option<File>,
    call: Option<File>,
    /// Not disabled by SET_VRING_ENABLE.
    enabled: bool,
    /// A kick eventfd was given: the ring runs.
    started: bool,
    /// Used entries added since the guest was last told.
    unsignalled: bool,
}

impl Vq {
    fn new() -> Result<Vq, virtio_queue::Error> {
        Ok(Vq {
            // The largest the frontend may ask for; it sets its own size.
            queue: Queue::new(MAX_QUEUE_SIZE as u16)?,
            kick: None,
            call: None,
            // Enabled until the frontend says otherwise: the `vhost` crate
            // refuses SET_VRING_ENABLE before SET_FEATURES has acked
            // protocol features, and QEMU sends its enables just then.
            enabled: true,
            started: false,
            unsignalled: false,
        })
    }

    fn runs(&self) -> bool {
        self.enabled && self.started && self.queue.ready()
    }

    /// Tells the guest about used buffers (if it wants to hear).
    fn notify(&mut self, mem: &GuestMemoryMmap) {
        self.unsignalled = false;
        if self.queue.needs_notification(mem).unwrap_or(true)
            && let Some(call) = self.call.as_mut()
        {
            let _ = call.write(&1u64.to_ne_bytes());
        }
    }
}

/// A frontend's memory region: where it is in the guest and in the
/// frontend's address space (vring addresses come in the latter).
#[derive(Debug, Clone, Copy)]
struct Region {
    gpa: u64,
    size: u64,
    frontend_va: u64,
}

/// Where the HCA sees the VM's memory: the window's key and, per region,
/// its guest address, length and IOVA.
#[derive(Debug, Clone)]
struct Window {
    key: u32,
    regions: Vec<(u64, u64, Iova)>,
}

impl Window {
    /// The IOVA of `[gpa, gpa + len)` if it lies inside one region.
    fn iova(&self, gpa: u64, len: u64) -> Option<u64> {
        self.regions.iter().find_map(|&(base, size, iova)| {
            let off = gpa.checked_sub(base)?;
            (off.checked_add(len)? <= size).then(|| iova.0 + off)
        })
    }
}

/// The descriptors (guest address, length) of a chain lent to the HCA,
/// at most `N`.
#[derive(Debug, Clone, Copy)]
struct Descs<const N: usize> {
    descs: [(GuestAddress, u32); N],
    n: usize,
}

/// A receive chain lent to the HCA.
type RxChain = Descs<MAX_RX_LEND_DESCS>;
/// A transmit chain lent to the HCA.
type LentChain = Descs<MAX_LEND_DESCS>;

impl<const N: usize> Descs<N> {
    fn new() -> Self {
        Descs {
            descs: [(GuestAddress(0), 0); N],
            n: 0,
        }
    }

    /// Calls `f(guest address, offset in the range, length)` for each
    /// piece of bytes `off..off + len` of the chain; false if `f` fails or
    /// the range runs past the chain's end.
    fn pieces(
        &self,
        off: usize,
        len: usize,
        mut f: impl FnMut(GuestAddress, usize, usize) -> bool,
    ) -> bool {
        let mut at = 0usize;
        let mut done = 0usize;
        for &(addr, dlen) in &self.descs[..self.n] {
            let dlen = dlen as usize;
            let (lo, hi) = (at.max(off), (at + dlen).min(off + len));
            if lo < hi {
                if !f(GuestAddress(addr.0 + (lo - at) as u64), lo - off, hi - lo) {
                    return false;
                }
                done += hi - lo;
            }
            at += dlen;
        }
        done == len
    }
}

/// The device side of one vhost-user-net socket: what the frontend set
/// up, and the frames moved through it.
#[derive(Debug)]
pub struct Device {
    mac: Mac,
    mtu: u16,
    offloads: bool,
    owned: bool,
    acked: u64,
    acked_protocol: u64,
    mem: Option<GuestMemoryMmap>,
    regions: Vec<Region>,
    /// The memory table's regions as the HCA may map them, and a number
    /// that changes with every table.
    dma: Vec<DmaMem>,
    table: u64,
    window: Option<Window>,
    /// Transmit chains lent to the HCA, by head index, and how many.
    lent: Vec<Option<LentChain>>,
    lent_out: usize,
    /// Receive chains lent to the HCA (or given back unused and kept for
    /// the next lending, `rx_back`), by head index.
    rx_lent: Vec<Option<RxChain>>,
    rx_back: Vec<u16>,
    vqs: [Vq; 2],
    connected: bool,
    counters: QueueCounters,
}

impl Device {
    fn new(mac: Mac, mtu: u32, offloads: bool) -> Result<Device, virtio_queue::Error> {
        Ok(Device {
            mac,
            mtu: u16::try_from(mtu).unwrap_or(u16::MAX),
            offloads,
            owned: false,
            acked: 0,
            acked_protocol: 0,
            mem: None,
            regions: Vec::new(),
            dma: Vec::new(),
            table: 0,
            window: None,
            lent: vec![None; MAX_QUEUE_SIZE],
            lent_out: 0,
            rx_lent: vec![None; MAX_QUEUE_SIZE],
            rx_back: Vec::new(),
            vqs: [Vq::new()?, Vq::new()?],
            connected: false,
            counters: QueueCounters::default(),
        })
    }

    /// The features offered to the frontend.
    fn offered(&self) -> u64 {
        let mut f = feature::VERSION_1
            | feature::MRG_RXBUF
            | feature::EVENT_IDX
            | feature::INDIRECT_DESC
            | feature::MTU
            | feature::MAC
            | feature::PROTOCOL_FEATURES;
        if self.offloads {
            // GUEST_CSUM: the HCA's receive check becomes DATA_VALID.
            f |= feature::CSUM | feature::GUEST_CSUM | feature::HOST_TSO4 | feature::HOST_TSO6;
        }
        f
    }

    /// Forgets the frontend: a new one starts from nothing.
    fn reset(&mut self) {
        self.owned = false;
        self.acked = 0;
        self.acked_protocol = 0;
        self.mem = None;
        self.regions.clear();
        self.dma.clear();
        self.table += 1;
        self.window = None;
        self.lent.fill(None);
        self.lent_out = 0;
        self.rx_lent.fill(None);
        self.rx_back.clear();
        for vq in &mut self.vqs {
            vq.queue.reset();
            vq.kick = None;
            vq.call = None;
            vq.enabled = true;
            vq.started = false;
            vq.unsignalled = false;
        }
    }

    fn header_len(&self) -> usize {
        if self.acked & (feature::VERSION_1 | feature::MRG_RXBUF) != 0 {
            HDR_LEN
        } else {
            LEGACY_HDR_LEN
        }
    }

    fn gpa(&self, frontend_va: u64) -> VuResult<u64> {
        self.regions
            .iter()
            .find(|r| frontend_va >= r.frontend_va && frontend_va - r.frontend_va < r.size)
            .map(|r| frontend_va - r.frontend_va + r.gpa)
            .ok_or(VuError::InvalidParam)
    }

    fn vq(&mut self, index: u32) -> VuResult<&mut Vq> {
        self.vqs
            .get_mut(index as usize)
            .ok_or(VuError::InvalidParam)
    }

    fn ready(&self) -> bool {
        self.mem.is_some() && self.vqs.iter().all(Vq::runs)
    }

    /// Tells the guest about the buffers used since the last call.
    fn flush(&mut self) {
        let Some(mem) = self.mem.as_ref() else {
            return;
        };
        for vq in self.vqs.iter_mut().filter(|v| v.unsignalled) {
            vq.notify(mem);
        }
    }

    /// Takes one frame from the transmit queue into `buf` behind a 12-byte
    /// virtio-net header; with `lend`, a frame that qualifies (see the
    /// module documentation) is lent instead of copied whole.
    fn pop_tx(&mut self, buf: &mut [u8], lend: bool) -> io::Result<Received> {
        let hdr = self.header_len();
        let Some(mem) = self.mem.as_ref() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let window = self.window.as_ref().filter(|_| lend && hdr == HDR_LEN);
        let vq = &mut self.vqs[TXQ];
        if !vq.runs() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut rearmed = false;
        loop {
            let Some(chain) = vq.queue.pop_descriptor_chain(mem) else {
                // While the HCA holds lent frames their completions bring
                // the next look at the ring: no kick per frame is asked
                // for (it would wake the loop for every frame the guest
                // adds as buffers trickle back). Otherwise re-arm; frames
                // that came meanwhile are taken now.
                if self.lent_out > 0 {
                    let _ = vq.queue.disable_notification(mem);
                } else if !rearmed && vq.queue.enable_notification(mem).unwrap_or(false) {
                    // Once: an avail index the ring cannot hold would
                    // say "more" for ever.
                    rearmed = true;
                    continue;
                }
                return Err(io::ErrorKind::WouldBlock.into());
            };
            let head = chain.head_index();
            if let Some(w) = window
                && let Some(slot) = self.lent.get_mut(usize::from(head))
                && slot.is_none()
                && let Some((lent, descs)) = lend_chain(chain.clone(), mem, buf, w)
            {
                *slot = Some(descs);
                self.lent_out += 1;
                self.counters.tx_frames += 1;
                self.counters.tx_lent += 1;
                return Ok(Received::Lent(lent));
            }
            let n = read_chain(chain, mem, buf, HDR_LEN - hdr);
            let _ = vq.queue.add_used(mem, head, 0);
            // The guest hears once per event-loop turn (Vnic::flush).
            vq.unsignalled = true;
            match n {
                Some(n) if n >= hdr + crate::engine::eth::ETH_HLEN => {
                    if hdr == LEGACY_HDR_LEN {
                        // The legacy header has no num_buffers: make room.
                        buf.copy_within(HDR_LEN - hdr..HDR_LEN - hdr + LEGACY_HDR_LEN, 0);
                        buf[LEGACY_HDR_LEN..HDR_LEN].fill(0);
                    }
                    self.counters.tx_frames += 1;
                    return Ok(Received::Copied(n + HDR_LEN - hdr));
                }
                _ => self.counters.tx_bad_chains += 1,
            }
        }
    }

    /// The HCA is done with lent chain `head`: it goes on the used ring.
    fn give_back(&mut self, head: u16) {
        let Some(slot) = self.lent.get_mut(usize::from(head)) else {
            return;
        };
        if slot.take().is_none() {
            return;
        }
        self.lent_out = self.lent_out.saturating_sub(1);
        if let Some(mem) = self.mem.as_ref() {
            let vq = &mut self.vqs[TXQ];
            let _ = vq.queue.add_used(mem, head, 0);
            vq.unsignalled = true;
        }
    }

    /// Copies bytes `from..` of lent chain `head` into `out`, then gives
    /// the chain back.
    fn copy_back(&mut self, head: u16, from: usize, out: &mut [u8]) -> bool {
        let (Some(Some(c)), Some(mem)) = (self.lent.get(usize::from(head)), self.mem.as_ref())
        else {
            return false;
        };
        let ok = c.pieces(from, out.len(), |addr, at, n| {
            mem.read_slice(&mut out[at..at + n], addr).is_ok()
        });
        self.give_back(head);
        ok
    }

    /// Lends a receive chain to the HCA: its descriptors as gather entries
    /// at their IOVAs in the window (into `out`); the chain's head, the
    /// entries used and its capacity. `None` when there is no window, the
    /// receive queue does not run, or the next chain cannot be lent
    /// (read-only, more than `out` or [`MAX_RX_LEND_DESCS`] descriptors,
    /// outside the window): it is left for the copy, which refuses or
    /// fills it.
    fn lend_rx(&mut self, min_cap: u32, out: &mut [Sge]) -> Lend {
        let (Some(w), Some(mem)) = (self.window.as_ref(), self.mem.as_ref()) else {
            return Lend::Refused;
        };
        let vq = &mut self.vqs[RXQ];
        if self.acked & (feature::VERSION_1 | feature::MRG_RXBUF) == 0 || !vq.runs() {
            return Lend::Refused;
        }
        let sges = |c: &RxChain, out: &mut [Sge]| -> Option<(usize, u32)> {
            let mut cap = 0u32;
            if c.n > out.len() {
                return None;
            }
            for (k, &(addr, len)) in c.descs[..c.n].iter().enumerate() {
                out[k] = Sge {
                    addr: w.iova(addr.0, u64::from(len))?,
                    len,
                    lkey: w.key,
                };
                cap = cap.checked_add(len)?;
            }
            Some((c.n, cap))
        };
        // Chains given back unused first; one the window no longer covers
        // goes back to the guest empty.
        while let Some(head) = self.rx_back.pop() {
            let Some(c) = self.rx_lent.get(usize::from(head)).copied().flatten() else {
                continue;
            };
            if let Some((n, cap)) = sges(&c, out) {
                return Lend::Lent(head, n, cap);
            }
            self.rx_lent[usize::from(head)] = None;
            let _ = vq.queue.add_used(mem, head, 0);
            vq.unsignalled = true;
        }
        let Some(chain) = vq.queue.pop_descriptor_chain(mem) else {
            return Lend::Empty;
        };
        let head = chain.head_index();
        let mut c = RxChain::new();
        let mut ok = self
            .rx_lent
            .get(usize::from(head))
            .is_some_and(Option::is_none);
        let mut more = false;
        for d in chain {
            if !ok || !d.is_write_only() || c.n == MAX_RX_LEND_DESCS || d.len() == 0 {
                ok = false;
                break;
            }
            c.descs[c.n] = (d.addr(), d.len());
            c.n += 1;
            more = d.has_next();
        }
        // Every buffer holds at least a virtio-net header (virtio 1.2
        // §5.1.6.3.1); a shorter one is left to the copy.
        let lent = if ok && !more && c.n > 0 {
            sges(&c, out).filter(|&(_, cap)| cap >= min_cap.max(HDR_LEN as u32))
        } else {
            None
        };
        let Some((n, cap)) = lent else {
            vq.queue.go_to_previous_position();
            return Lend::Refused;
        };
        self.rx_lent[usize::from(head)] = Some(c);
        Lend::Lent(head, n, cap)
    }

    /// Copies bytes `off..` of lent receive chain `head` into `out`.
    fn rx_read(&self, head: u16, off: usize, out: &mut [u8]) -> bool {
        let (Some(Some(c)), Some(mem)) = (self.rx_lent.get(usize::from(head)), self.mem.as_ref())
        else {
            return false;
        };
        c.pieces(off, out.len(), |addr, at, n| {
            mem.read_slice(&mut out[at..at + n], addr).is_ok()
        })
    }

    /// Writes `data` at `off` of lent receive chain `head`.
    fn rx_write(&self, head: u16, off: usize, data: &[u8]) -> bool {
        let (Some(Some(c)), Some(mem)) = (self.rx_lent.get(usize::from(head)), self.mem.as_ref())
        else {
            return false;
        };
        c.pieces(off, data.len(), |addr, at, n| {
            mem.write_slice(&data[at..at + n], addr).is_ok()
        })
    }

    /// A frame is in lent chains `used` (head, bytes written, in order):
    /// the virtio-net header `hdr` goes at the start of the first (its
    /// `num_buffers` set, DATA_VALID kept only for a guest that acked
    /// GUEST_CSUM) and the chains go on the used ring.
    fn rx_done(&mut self, mut hdr: [u8; HDR_LEN], used: &[(u16, u32)]) -> bool {
        let Some(&(first, _)) = used.first() else {
            return false;
        };
        if self.acked & feature::GUEST_CSUM == 0 {
            hdr[0] &= !crate::vnet::F_DATA_VALID;
        }
        hdr[LEGACY_HDR_LEN..].copy_from_slice(&(used.len() as u16).to_le_bytes());
        let wrote = self.rx_write(first, 0, &hdr);
        let Some(mem) = self.mem.as_ref() else {
            return false;
        };
        let vq = &mut self.vqs[RXQ];
        for &(head, len) in used {
            if let Some(slot) = self.rx_lent.get_mut(usize::from(head))
                && slot.take().is_some()
            {
                let _ = vq.queue.add_used(mem, head, if wrote { len } else { 0 });
            }
        }
        vq.unsignalled = true;
        if wrote {
            self.counters.rx_frames += 1;
            self.counters.rx_lent += 1;
        } else {
            self.counters.rx_bad_chains += 1;
        }
        wrote
    }

    /// Receive chains kept for lending go back to the guest, empty.
    fn return_rx_back(&mut self) {
        let Some(mem) = self.mem.as_ref() else {
            return;
        };
        let vq = &mut self.vqs[RXQ];
        for head in self.rx_back.drain(..) {
            if let Some(slot) = self.rx_lent.get_mut(usize::from(head))
                && slot.take().is_some()
            {
                let _ = vq.queue.add_used(mem, head, 0);
                vq.unsignalled = true;
            }
        }
    }

    /// A lent receive chain comes back unused: kept for the next lending.
    fn rx_return(&mut self, head: u16) {
        if self
            .rx_lent
            .get(usize::from(head))
            .is_some_and(Option::is_some)
            && !self.rx_back.contains(&head)
        {
            self.rx_back.push(head);
        }
    }

    /// Writes one frame (`buf`: 12-byte virtio-net header, then the
    /// Ethernet frame) into the receive queue.
    fn push_rx(&mut self, buf: &[u8]) -> io::Result<usize> {
        let hdr = self.header_len();
        let mergeable = self.acked & feature::MRG_RXBUF != 0;
        let (Some(vhdr), Some(frame)) = (buf.get(..LEGACY_HDR_LEN), buf.get(HDR_LEN..)) else {
            return Err(io::ErrorKind::InvalidInput.into());
        };
        let (Some(mem), vq) = (self.mem.as_ref(), &mut self.vqs[RXQ]) else {
            self.counters.rx_no_buffers += 1;
            return Err(io::ErrorKind::WouldBlock.into());
        };
        if !vq.runs() {
            self.counters.rx_no_buffers += 1;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let total = hdr + frame.len();
        // Gather writable buffers, chain by chain, until the frame fits.
        let mut descs = [(GuestAddress(0), 0u32); MAX_RX_DESCS];
        let mut nd = 0;
        let mut heads = [(0u16, 0usize, 0usize); MAX_RX_DESCS];
        let mut nh = 0;
        let mut room = 0usize;
        while room < total {
            let Some(chain) = vq.queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let first = nd;
            let mut ok = true;
            let mut more = false;
            for d in chain {
                if !d.is_write_only() || nd == MAX_RX_DESCS {
                    ok = false;
                    break;
                }
                descs[nd] = (d.addr(), d.len());
                nd += 1;
                room += d.len() as usize;
                more = d.has_next();
            }
            // A loop or a chain longer than the queue.
            ok &= !more;
            if !ok || nd == first {
                // A chain we cannot write: give it back used, empty.
                self.counters.rx_bad_chains += 1;
                room -= descs[first..nd].iter().map(|d| d.1 as usize).sum::<usize>();
                nd = first;
                let _ = vq.queue.add_used(mem, head, 0);
                continue;
            }
            heads[nh] = (head, first, nd);
            nh += 1;
            if !mergeable || nh == MAX_RX_DESCS {
                break;
            }
        }
        if room < total {
            // Not enough buffers: put the chains back for the next frame.
            for _ in 0..nh {
                vq.queue.go_to_previous_position();
            }
            if nh == 0 {
                self.counters.rx_no_buffers += 1;
            } else {
                self.counters.rx_too_big += 1;
            }
            vq.unsignalled = true;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        // Header (num_buffers = chains used), then the frame.
        let mut h = [0u8; HDR_LEN];
        h[..LEGACY_HDR_LEN].copy_from_slice(vhdr);
        if self.acked & feature::GUEST_CSUM == 0 {
            // Only a guest that asked may hear "checksum verified".
            h[0] &= !crate::vnet::F_DATA_VALID;
        }
        h[LEGACY_HDR_LEN..].copy_from_slice(&(nh as u16).to_le_bytes());
        let pieces: [&[u8]; 2] = [&h[..hdr], frame];
        let mut at = 0usize;
        let mut failed = false;
        let mut used = [0usize; MAX_RX_DESCS];
        for (k, &(_, first, last)) in heads[..nh].iter().enumerate() {
            for &(addr, len) in &descs[first..last] {
                let n = (len as usize).min(total - at);
                if n == 0 {
                    break;
                }
                if !write_pieces(mem, addr, &pieces, at, n) {
                    failed = true;
                }
                at += n;
                used[k] += n;
            }
        }
        for (k, &(head, _, _)) in heads[..nh].iter().enumerate() {
            let _ = vq
                .queue
                .add_used(mem, head, if failed { 0 } else { used[k] as u32 });
        }
        vq.unsignalled = true;
        if failed {
            self.counters.rx_bad_chains += 1;
            return Err(io::ErrorKind::InvalidData.into());
        }
        self.counters.rx_frames += 1;
        Ok(buf.len())
    }

    /// The config space window the frontend asks for: `virtio_net_config`
    /// with mac @0, status @6 (no STATUS feature: 0), max_virtqueue_pairs
    /// @8, mtu @10, zero past it; exactly `size` bytes.
    fn config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut c = [0u8; CONFIG_LEN];
        c[..6].copy_from_slice(&self.mac.0);
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        (0..size as usize)
            .map(|k| {
                (offset as usize)
                    .checked_add(k)
                    .and_then(|i| c.get(i))
                    .copied()
                    .unwrap_or(0)
            })
            .collect()
    }
}

fn unsupported<T>(what: &'static str) -> VuResult<T> {
    Err(VuError::InvalidOperation(what))
}

impl VhostUserBackendReqHandlerMut for Device {
    fn set_owner(&mut self) -> VuResult<()> {
        if self.owned {
            return Err(VuError::InvalidOperation("already owned"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.reset();
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.reset();
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.offered())
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !self.offered() != 0 {
            return Err(VuError::InvalidParam);
        }
        self.acked = features;
        let event_idx = features & feature::EVENT_IDX != 0;
        for vq in &mut self.vqs {
            vq.queue.set_event_idx(event_idx);
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if ctx.len() > MAX_REGIONS || ctx.len() != files.len() {
            return Err(VuError::InvalidParam);
        }
        let mut regions = Vec::with_capacity(ctx.len());
        let mut table = Vec::with_capacity(ctx.len());
        let mut dma = Vec::with_capacity(ctx.len());
        for (r, file) in ctx.iter().zip(files) {
            let mapped =
                GuestRegionMmap::new(r.mmap_region(file)?, GuestAddress(r.guest_phys_addr))
                    .ok_or(VuError::InvalidParam)?;
            let mapped = Arc::new(mapped);
            // The HCA is given the very mapping descriptors are read
            // through; it lives as long as the HCA's mapping of it.
            if let Some(m) = DmaMem::new(mapped.clone(), 0, r.memory_size as usize) {
                dma.push(m);
            }
            regions.push(mapped);
            table.push(Region {
                gpa: r.guest_phys_addr,
                size: r.memory_size,
                frontend_va: r.user_addr,
            });
        }
        // Overlapping or otherwise unusable tables are refused here.
        let mem = GuestMemoryMmap::from_arc_regions(regions)
            .map_err(|e| VuError::ReqHandlerError(io::Error::other(e)))?;
        self.mem = Some(mem);
        // A region the HCA cannot be given leaves the whole table to copies.
        self.dma = if dma.len() == table.len() {
            dma
        } else {
            Vec::new()
        };
        self.regions = table;
        self.table += 1;
        self.window = None;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let num = u16::try_from(num).map_err(|_| VuError::InvalidParam)?;
        if usize::from(num) > MAX_QUEUE_SIZE {
            return Err(VuError::InvalidParam);
        }
        self.vq(index)?
            .queue
            .try_set_size(num)
            .map_err(|_| VuError::InvalidParam)
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        let (d, u, a) = (self.gpa(descriptor)?, self.gpa(used)?, self.gpa(available)?);
        let vq = self.vq(index)?;
        vq.queue
            .try_set_desc_table_address(GuestAddress(d))
            .and_then(|()| vq.queue.try_set_used_ring_address(GuestAddress(u)))
            .and_then(|()| vq.queue.try_set_avail_ring_address(GuestAddress(a)))
            .map_err(|_| VuError::InvalidParam)?;
        vq.queue.set_ready(true);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let base = u16::try_from(base).map_err(|_| VuError::InvalidParam)?;
        let vq = self.vq(index)?;
        vq.queue.set_next_avail(base);
        vq.queue.set_next_used(base);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        // The ring stops; nothing of ours points into it (frames are
        // copied), so it may go at once.
        tracing::debug!(index, "GET_VRING_BASE");
        if index as usize == RXQ {
            // Receive buffers the HCA gave back unused go to the guest
            // empty: after the stop the ring's state says they were taken.
            self.return_rx_back();
        }
        let vq = self.vq(index)?;
        vq.started = false;
        vq.queue.set_ready(false);
        vq.kick = None;
        vq.call = None;
        Ok(VhostUserVringState::new(
            index,
            u32::from(vq.queue.next_avail()),
        ))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        tracing::debug!(index, fd = fd.is_some(), "SET_VRING_KICK");
        let vq = self.vq(u32::from(index))?;
        vq.started = fd.is_some();
        vq.kick = fd;
        Ok(())
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.vq(u32::from(index))?.call = fd;
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VuResult<()> {
        self.vq(u32::from(index)).map(|_| ())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK)
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        self.acked_protocol = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(2)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        tracing::debug!(index, enable, "SET_VRING_ENABLE");
        self.vq(index)?.enabled = enable;
        Ok(())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _f: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        // A window larger than any config space is a frontend's mistake,
        // not a reason to allocate gigabytes.
        if size > MAX_CONFIG_WINDOW {
            return Err(VuError::InvalidParam);
        }
        Ok(self.config(offset, size))
    }

    fn set_config(&mut self, _offset: u32, _buf: &[u8], _f: VhostUserConfigFlags) -> VuResult<()> {
        unsupported("the config space is read-only")
    }

    fn set_gpu_socket(&mut self, _gpu: GpuBackend) -> VuResult<()> {
        unsupported("not a GPU")
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        unsupported("no shared objects")
    }

    fn get_inflight_fd(&mut self, _i: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        unsupported("no inflight tracking")
    }

    fn set_inflight_fd(&mut self, _i: &VhostUserInflight, _file: File) -> VuResult<()> {
        unsupported("no inflight tracking")
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        unsupported("memory slots are not offered")
    }

    fn add_mem_region(
        &mut self,
        _r: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        unsupported("memory slots are not offered")
    }

    fn remove_mem_region(&mut self, _r: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        unsupported("memory slots are not offered")
    }

    fn set_device_state_fd(
        &mut self,
        _d: VhostTransferStateDirection,
        _p: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        unsupported("no migration")
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        unsupported("no migration")
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        unsupported("no shared memory regions")
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        unsupported("no dirty logging")
    }
}

/// The guest's side of its endpoint, for the interface.
#[derive(Debug, Clone)]
pub struct VnicPort(Arc<Mutex<Device>>);

fn lock(d: &Mutex<Device>) -> MutexGuard<'_, Device> {
    // Only the event loop's thread uses it; a poisoned lock still holds
    // plain data.
    d.lock().unwrap_or_else(|p| p.into_inner())
}

impl HostPort for VnicPort {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        match lock(&self.0).pop_tx(buf, false)? {
            Received::Copied(n) => Ok(n),
            Received::Lent(_) => Err(io::ErrorKind::Unsupported.into()),
        }
    }

    fn send(&self, buf: &[u8]) -> io::Result<usize> {
        lock(&self.0).push_rx(buf)
    }

    fn recv_lent(&self, buf: &mut [u8]) -> io::Result<Received> {
        lock(&self.0).pop_tx(buf, true)
    }

    fn give_back(&self, token: u16) {
        lock(&self.0).give_back(token);
    }

    fn copy_back(&self, token: u16, from: usize, out: &mut [u8]) -> bool {
        lock(&self.0).copy_back(token, from, out)
    }

    fn rx_ready(&self) -> Option<bool> {
        let d = lock(&self.0);
        (d.window.is_some() && d.header_len() == HDR_LEN && d.vqs[RXQ].runs())
            .then_some(d.acked & feature::MRG_RXBUF != 0)
    }

    fn lend_rx(&self, min_cap: u32, out: &mut [Sge]) -> Lend {
        lock(&self.0).lend_rx(min_cap, out)
    }

    fn rx_read(&self, token: u16, off: usize, out: &mut [u8]) -> bool {
        lock(&self.0).rx_read(token, off, out)
    }

    fn rx_write(&self, token: u16, off: usize, data: &[u8]) -> bool {
        lock(&self.0).rx_write(token, off, data)
    }

    fn rx_done(&self, hdr: [u8; HDR_LEN], used: &[(u16, u32)]) -> bool {
        lock(&self.0).rx_done(hdr, used)
    }

    fn rx_return(&self, token: u16) {
        lock(&self.0).rx_return(token);
    }
}

/// Lends a transmit chain if it qualifies: readable descriptors only, at
/// most [`MAX_LEND_DESCS`], a TCP or UDP frame of [`LEND_MIN`] bytes or
/// more, and every byte past the copied head inside one region of the
/// window. The virtio-net header and the frame's first [`LEND_HEAD`]
/// bytes are copied into `buf`; `None` leaves the chain to the copy.
fn lend_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    buf: &mut [u8],
    w: &Window,
) -> Option<(Lent, LentChain)> {
    let token = chain.head_index();
    let mut c = LentChain::new();
    let mut total = 0usize;
    let mut more = false;
    for d in chain {
        if d.is_write_only() || c.n == MAX_LEND_DESCS {
            return None;
        }
        c.descs[c.n] = (d.addr(), d.len());
        c.n += 1;
        total = total.checked_add(d.len() as usize)?;
        more = d.has_next();
    }
    let head = HDR_LEN + LEND_HEAD;
    if more || total < HDR_LEN + LEND_MIN || total > buf.len() {
        return None;
    }
    // The head is copied (and checked by the translation); the rest is
    // the HCA's to gather, each descriptor at its IOVA in the window.
    let copied = c.pieces(0, head, |addr, at, n| {
        mem.read_slice(&mut buf[at..at + n], addr).is_ok()
    });
    if !copied || !crate::engine::eth::lendable(&buf[HDR_LEN..head]) {
        return None;
    }
    let mut lent = Lent {
        head,
        len: total,
        token,
        sges: [Sge {
            lkey: w.key,
            ..Sge::default()
        }; MAX_LENT],
        n: 0,
    };
    let mut at = 0usize;
    for &(addr, len) in &c.descs[..c.n] {
        let len = len as usize;
        let skip = head.saturating_sub(at).min(len);
        if len > skip {
            let gpa = addr.0.checked_add(skip as u64)?;
            let sge = lent.sges.get_mut(lent.n)?;
            sge.addr = w.iova(gpa, (len - skip) as u64)?;
            sge.len = u32::try_from(len - skip).ok()?;
            lent.n += 1;
        }
        at += len;
    }
    Some((lent, c))
}

/// Copies the readable descriptors of `chain` into `buf` from `at` on;
/// `None` if any is writable or outside guest memory (a region's end
/// crossed into a hole included), if the chain loops or is longer than
/// the queue (the walk stops at the queue size with a descriptor that
/// still names a next one), or if the whole is empty or does not fit.
fn read_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    buf: &mut [u8],
    at: usize,
) -> Option<usize> {
    let mut n = 0usize;
    let mut more = false;
    for d in chain {
        if d.is_write_only() {
            return None;
        }
        let len = d.len() as usize;
        let dst = buf.get_mut(at + n..at + n + len)?;
        mem.read_slice(dst, d.addr()).ok()?;
        n += len;
        more = d.has_next();
    }
    (n > 0 && !more).then_some(n)
}

/// Writes bytes `at..at + n` of the concatenation of `pieces` to guest
/// memory at `addr`.
fn write_pieces(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    pieces: &[&[u8]],
    at: usize,
    n: usize,
) -> bool {
    let mut skip = at;
    let mut left = n;
    let mut to = addr;
    for p in pieces {
        if left == 0 {
            break;
        }
        if skip >= p.len() {
            skip -= p.len();
            continue;
        }
        let take = (p.len() - skip).min(left);
        if mem.write_slice(&p[skip..skip + take], to).is_err() {
            return false;
        }
        to = GuestAddress(to.0 + take as u64);
        skip = 0;
        left -= take;
    }
    left == 0
}

/// One `--vhost-user` socket of an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostSpec {
    /// The interface it belongs to.
    pub interface: String,
    /// Where frontends connect.
    pub socket: PathBuf,
    /// The guest's MAC; learned from its frames when not given.
    pub mac: Option<Mac>,
    /// Source addresses the guest may use; learned when empty.
    pub addresses: Vec<IpAddr>,
    /// Copy every frame; never map the VM's memory for the HCA.
    pub copy: bool,
}

impl VhostSpec {
    /// Parses `IF=PATH[,mac=MAC][,ip=ADDRESS]...[,copy]`.
    pub fn parse(s: &str) -> Result<VhostSpec, String> {
        let (interface, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected INTERFACE=SOCKET[,mac=MAC][,ip=ADDRESS]"))?;
        let mut parts = rest.split(',');
        let socket = parts.next().unwrap_or_default();
        if interface.is_empty() || socket.is_empty() {
            return Err(format!(
                "{s:?}: expected INTERFACE=SOCKET[,mac=MAC][,ip=ADDRESS]"
            ));
        }
        let mut spec = VhostSpec {
            interface: interface.to_string(),
            socket: PathBuf::from(socket),
            mac: None,
            addresses: Vec::new(),
            copy: false,
        };
        for p in parts {
            if p == "copy" {
                spec.copy = true;
                continue;
            }
            match p.split_once('=') {
                Some(("mac", m)) => spec.mac = Some(Self::mac(m)?),
                Some(("ip", a)) => spec.addresses.push(
                    a.parse()
                        .map_err(|_| format!("{a:?} is not an IP address"))?,
                ),
                _ => return Err(format!("{p:?}: expected mac=MAC, ip=ADDRESS or copy")),
            }
        }
        Ok(spec)
    }

    /// Checks a MAC given for a guest: a unicast address.
    pub fn mac(m: &str) -> Result<Mac, String> {
        let mac: Mac = m.parse().map_err(|e| format!("{e}"))?;
        if mac.is_multicast() {
            return Err(format!("{m}: a guest's MAC must be unicast"));
        }
        Ok(mac)
    }

    /// The MAC presented to a guest whose MAC was not given: locally
    /// administered, from the port GID and the socket path, so it is the
    /// same after a restart.
    pub fn default_mac(&self, gid: &[u8; 16]) -> Mac {
        let path = self.socket.as_os_str().as_encoded_bytes();
        Mac::local_from(gid.iter().chain(path).copied())
    }
}

/// The names of the feature bits set in `features`, for people.
pub fn feature_names(features: u64) -> Vec<&'static str> {
    [
        (feature::CSUM, "csum"),
        (feature::GUEST_CSUM, "guest_csum"),
        (feature::MTU, "mtu"),
        (feature::MAC, "mac"),
        (feature::HOST_TSO4, "host_tso4"),
        (feature::HOST_TSO6, "host_tso6"),
        (feature::MRG_RXBUF, "mrg_rxbuf"),
        (feature::INDIRECT_DESC, "indirect_desc"),
        (feature::EVENT_IDX, "event_idx"),
        (feature::PROTOCOL_FEATURES, "protocol_features"),
        (feature::VERSION_1, "version_1"),
    ]
    .into_iter()
    .filter(|(bit, _)| features & bit != 0)
    .map(|(_, n)| n)
    .collect()
}

/// Whether a frontend request (its code, vhost-user message header) may
/// change what the data path relies on: memory, rings, features, the
/// owner. Those are acted on only with the endpoint quiesced. Unknown
/// codes count as changing it.
fn changes_data_path(code: u32) -> bool {
    use vhost::vhost_user::message::FrontendReq as R;
    let harmless = [
        R::GET_FEATURES,
        R::SET_VRING_CALL,
        R::SET_VRING_ERR,
        R::GET_PROTOCOL_FEATURES,
        R::SET_PROTOCOL_FEATURES,
        R::GET_QUEUE_NUM,
        R::SEND_RARP,
        R::NET_SET_MTU,
        R::GET_CONFIG,
        R::SET_CONFIG,
        R::GET_MAX_MEM_SLOTS,
        R::GET_STATUS,
    ];
    !harmless.iter().any(|r| u32::from(*r) == code)
}

/// Which of a vNIC's descriptors an event is for (its offset from the
/// vNIC's first event id).
const EV_LISTEN: u64 = 0;
const EV_CONN: u64 = 1;
const EV_KICK: u64 = 2;
/// Event ids a vNIC uses: listener, connection, and one kick per queue.
pub const EVENT_IDS: u64 = 4;
/// Longest a frontend may take to finish a request it started.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// A served socket: the device, the interface endpoint behind it, and
/// its descriptors in the event loop's wait set.
pub struct Vnic {
    /// The endpoint on the interface.
    pub endpoint: EndpointId,
    socket: PathBuf,
    listener: Listener,
    device: Arc<Mutex<Device>>,
    conn: Option<(BackendReqHandler<Mutex<Device>>, UnixStream)>,
    /// Kick descriptors registered, per queue.
    kicks: [Option<RawFd>; 2],
    base: u64,
    /// Map the VM's memory for the HCA (not `copy`).
    zero_copy: bool,
    /// The memory table the HCA's window was made for.
    mapped_table: u64,
}

impl std::fmt::Debug for Vnic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vnic")
            .field("endpoint", &self.endpoint)
            .field("socket", &self.socket)
            .field("connected", &self.conn.is_some())
            .finish_non_exhaustive()
    }
}

impl Vnic {
    /// Creates the endpoint for `spec` on `link` and listens on its
    /// socket, mode 0600, or 0660 and owned by `group` when given (a VMM
    /// feeds the fabric through it: only its user, or its group, may
    /// connect); a socket another process serves is an error, a stale one
    /// is replaced, and a path that is not a socket is refused.
    pub fn start<T: Transport>(
        spec: &VhostSpec,
        link: &mut Link<T>,
        group: Option<u32>,
    ) -> Result<Vnic, String> {
        use std::os::unix::fs::PermissionsExt;
        let socket = spec.socket.display().to_string();
        crate::control::claim_socket_path(
            &spec.socket,
            "another process serves the vhost-user socket",
        )
        .map_err(|e| e.to_string())?;
        let listener = Listener::new(&spec.socket, false).map_err(|e| format!("{socket}: {e}"))?;
        let mode = if group.is_some() { 0o660 } else { 0o600 };
        std::fs::set_permissions(&spec.socket, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("{socket}: {e}"))?;
        if let Some(gid) = group {
            std::os::unix::fs::chown(&spec.socket, None, Some(gid))
                .map_err(|e| format!("{socket}: {e}"))?;
        }
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("{socket}: {e}"))?;
        let mac = spec.mac.unwrap_or_else(|| spec.default_mac(&link.gid()));
        let device = Device::new(mac, link.mtu(), link.offloads())
            .map_err(|e| format!("{socket}: virtqueues: {e}"))?;
        let device = Arc::new(Mutex::new(device));
        let cfg = GuestConfig {
            mac,
            learn_mac: spec.mac.is_none(),
            allowed: spec.addresses.clone(),
            zero_copy: !spec.copy,
        };
        let endpoint = link
            .add_guest(cfg, Box::new(VnicPort(device.clone())))
            .map_err(|e| format!("{socket}: creating the vNIC's endpoint: {e}"))?;
        Ok(Vnic {
            endpoint,
            socket: spec.socket.clone(),
            listener,
            device,
            conn: None,
            kicks: [None; 2],
            base: 0,
            zero_copy: !spec.copy,
            mapped_table: 0,
        })
    }

    /// Puts the listening socket in `epoll` under ids `base..base +
    /// EVENT_IDS`.
    pub fn register(&mut self, epoll: &Epoll, base: u64) -> io::Result<()> {
        self.base = base;
        epoll.ctl(
            ControlOperation::Add,
            self.listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, base + EV_LISTEN),
        )
    }

    /// Whether event `id` is one of ours.
    pub fn owns(&self, id: u64) -> bool {
        (self.base..self.base + EVENT_IDS).contains(&id)
    }

    /// Handles event `id`: a frontend connecting, a request from it, or a
    /// kick (the event loop then moves the frames).
    pub fn event<T: Transport>(&mut self, id: u64, epoll: &Epoll, link: &mut Link<T>) {
        match id - self.base {
            EV_LISTEN => self.accept(epoll),
            EV_CONN => self.request(epoll, link),
            k => {
                let q = (k - EV_KICK) as usize;
                let mut d = lock(&self.device);
                if let Some(kick) = d.vqs.get_mut(q).and_then(|v| v.kick.as_mut()) {
                    let mut b = [0u8; 8];
                    let _ = kick.read(&mut b);
                }
            }
        }
    }

    fn accept(&mut self, epoll: &Epoll) {
        let Ok(Some(stream)) = self.listener.accept() else {
            return;
        };
        if self.conn.is_some() {
            // One frontend at a time; this one is told by the close.
            tracing::info!(socket = %self.socket.display(), "refusing a second frontend");
            return;
        }
        // Requests are read on the event loop: a frontend that stops in
        // the middle of one may hold it for this long, not for ever.
        if stream.set_read_timeout(Some(REQUEST_TIMEOUT)).is_err() {
            return;
        }
        let Ok(watch) = stream.try_clone() else {
            return;
        };
        let handler = BackendReqHandler::from_stream(stream, self.device.clone());
        if epoll
            .ctl(
                ControlOperation::Add,
                watch.as_raw_fd(),
                EpollEvent::new(EventSet::IN, self.base + EV_CONN),
            )
            .is_err()
        {
            return;
        }
        {
            let mut d = lock(&self.device);
            d.reset();
            d.connected = true;
            d.counters.connections += 1;
        }
        tracing::info!(socket = %self.socket.display(), "vhost-user frontend connected");
        self.conn = Some((handler, watch));
    }

    fn request<T: Transport>(&mut self, epoll: &Epoll, link: &mut Link<T>) {
        let Some((handler, watch)) = self.conn.as_mut() else {
            return;
        };
        // Whatever the request changes (memory table, rings), nothing of
        // the HCA's points into guest memory while it does. Requests that
        // change neither (features asked, the call eventfd, the config
        // space) leave the data path alone.
        let mut code = [0u8; 4];
        let peeked = mlx5_driver::transport::peek_socket(watch, &mut code);
        let quiesce = !matches!(peeked, Ok(4)) || changes_data_path(u32::from_le_bytes(code));
        if quiesce {
            link.quiesce_guest(self.endpoint);
        }
        match handler.handle_request() {
            Ok(()) => {
                self.sync_kicks(epoll);
                self.sync_window(link);
                link.resume_guest(self.endpoint);
            }
            Err(VuError::Disconnected | VuError::PartialMessage | VuError::SocketBroken(_)) => {
                tracing::info!(socket = %self.socket.display(), "vhost-user frontend left");
                self.disconnect(epoll, link);
            }
            Err(e) => {
                // The crate has answered the request with an error where
                // the protocol allows; a broken stream ends the connection.
                lock(&self.device).counters.bad_requests += 1;
                tracing::info!(socket = %self.socket.display(), "vhost-user request refused: {e}");
                if matches!(e, VuError::SocketError(_) | VuError::SocketRetry(_)) {
                    self.disconnect(epoll, link);
                } else {
                    link.resume_guest(self.endpoint);
                }
            }
        }
    }

    /// Keeps the wait set's kick descriptors in step with the device's.
    fn sync_kicks(&mut self, epoll: &Epoll) {
        let d = lock(&self.device);
        for q in 0..2 {
            let fd = d.vqs[q].kick.as_ref().map(AsRawFd::as_raw_fd);
            if fd == self.kicks[q] {
                continue;
            }
            if let Some(old) = self.kicks[q] {
                let _ = epoll.ctl(ControlOperation::Delete, old, EpollEvent::default());
            }
            self.kicks[q] = fd.filter(|fd| {
                epoll
                    .ctl(
                        ControlOperation::Add,
                        *fd,
                        EpollEvent::new(EventSet::IN, self.base + EV_KICK + q as u64),
                    )
                    .is_ok()
            });
        }
    }

    /// Maps a new memory table for the HCA (removing the old window).
    /// Maps a new memory table for the HCA (removing the old window). The
    /// device is not locked while the link works: quiescing calls back
    /// into it.
    fn sync_window<T: Transport>(&mut self, link: &mut Link<T>) {
        let (dma, gpas) = {
            let mut d = lock(&self.device);
            if d.table == self.mapped_table {
                return;
            }
            self.mapped_table = d.table;
            d.window = None;
            let gpas: Vec<(u64, u64)> = d.regions.iter().map(|r| (r.gpa, r.size)).collect();
            (d.dma.clone(), gpas)
        };
        if let Err(e) = link.unmap_guest_memory(self.endpoint) {
            tracing::warn!(socket = %self.socket.display(), "{e}");
            return;
        }
        let mapped = if !self.zero_copy || dma.is_empty() {
            None
        } else {
            match link.map_guest_memory(self.endpoint, &dma) {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::warn!(
                        socket = %self.socket.display(),
                        "cannot map the VM's memory for the HCA, copying its frames: {e}"
                    );
                    None
                }
            }
        };
        let mut d = lock(&self.device);
        match mapped {
            Some(GuestWindow { key, regions }) => {
                let regions = gpas
                    .into_iter()
                    .zip(regions)
                    .map(|((gpa, size), (iova, _))| (gpa, size, iova))
                    .collect();
                d.window = Some(Window { key, regions });
            }
            None => d.return_rx_back(),
        }
    }

    fn disconnect<T: Transport>(&mut self, epoll: &Epoll, link: &mut Link<T>) {
        if let Some((_, watch)) = self.conn.take() {
            let _ = epoll.ctl(
                ControlOperation::Delete,
                watch.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        for fd in self.kicks.iter_mut().filter_map(Option::take) {
            let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        // The guest's buffers come back and the HCA lets go of its memory
        // before the device forgets them.
        link.quiesce_guest(self.endpoint);
        let mut d = lock(&self.device);
        d.reset();
        d.connected = false;
        drop(d);
        self.sync_window(link);
        link.resume_guest(self.endpoint);
        link.reset_guest(self.endpoint);
    }

    /// Signals the guest's used rings once for everything this event-loop
    /// turn moved; call after the interface's turn.
    pub fn flush(&self) {
        lock(&self.device).flush();
    }

    /// Sets the MTU presented in the config space.
    pub fn set_mtu(&self, mtu: u32) {
        lock(&self.device).mtu = u16::try_from(mtu).unwrap_or(u16::MAX);
    }

    /// The socket, connection state, negotiated features and counters.
    pub fn status(&self) -> Status {
        let d = lock(&self.device);
        Status {
            socket: self.socket.clone(),
            connected: d.connected,
            ready: d.ready(),
            features: d.acked,
            zero_copy: d.window.is_some(),
            counters: d.counters,
        }
    }

    /// Closes the connection and the socket and removes the endpoint from
    /// `link`; returns what failed.
    pub fn stop<T: Transport>(self, link: &mut Link<T>) -> Vec<String> {
        drop(self.conn);
        let _ = std::fs::remove_file(&self.socket);
        link.remove_guest(self.endpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guest memory: two regions with a hole between them.
    const LOW: (u64, usize) = (0, 0x1_0000);
    const HIGH: (u64, usize) = (0x2_0000, 0x1_0000);
    const QSIZE: u16 = 16;
    /// Split ring layout (virtio 1.2 §2.7): descriptor table (16 bytes a
    /// descriptor), available ring (flags, idx, ring), used ring (flags,
    /// idx, ring of id/len pairs); one set per queue.
    const DESC: [u64; 2] = [0x1000, 0x3000];
    const AVAIL: [u64; 2] = [0x1800, 0x3800];
    const USED: [u64; 2] = [0x2000, 0x4000];
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    struct Rig {
        mem: GuestMemoryMmap,
        device: Arc<Mutex<Device>>,
        avail_idx: [u16; 2],
    }

    impl Rig {
        fn new(acked: u64) -> Rig {
            let mem = GuestMemoryMmap::from_ranges(&[
                (GuestAddress(LOW.0), LOW.1),
                (GuestAddress(HIGH.0), HIGH.1),
            ])
            .unwrap();
            let mut d = Device::new(Mac([0x52, 0x54, 0, 0, 0, 1]), 2044, false).unwrap();
            // As SET_MEM_TABLE, SET_FEATURES and the SET_VRING_* requests
            // would leave it.
            d.mem = Some(mem.clone());
            d.acked = acked;
            d.connected = true;
            for (q, vq) in d.vqs.iter_mut().enumerate() {
                vq.queue.try_set_size(QSIZE).unwrap();
                vq.queue
                    .try_set_desc_table_address(GuestAddress(DESC[q]))
                    .unwrap();
                vq.queue
                    .try_set_avail_ring_address(GuestAddress(AVAIL[q]))
                    .unwrap();
                vq.queue
                    .try_set_used_ring_address(GuestAddress(USED[q]))
                    .unwrap();
                vq.queue.set_ready(true);
                vq.enabled = true;
                vq.started = true;
            }
            Rig {
                mem,
                device: Arc::new(Mutex::new(d)),
                avail_idx: [0, 0],
            }
        }

        fn port(&self) -> VnicPort {
            VnicPort(self.device.clone())
        }

        fn desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let at = GuestAddress(DESC[q] + u64::from(i) * 16);
            let m = &self.mem;
            m.write_obj(addr.to_le(), at).unwrap();
            m.write_obj(len.to_le(), GuestAddress(at.0 + 8)).unwrap();
            m.write_obj(flags.to_le(), GuestAddress(at.0 + 12)).unwrap();
            m.write_obj(next.to_le(), GuestAddress(at.0 + 14)).unwrap();
        }

        /// Makes the chain at `head` available on queue `q`.
        fn offer(&mut self, q: usize, head: u16) {
            let slot = u64::from(self.avail_idx[q] % QSIZE);
            self.mem
                .write_obj(head.to_le(), GuestAddress(AVAIL[q] + 4 + slot * 2))
                .unwrap();
            self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
            self.mem
                .write_obj(self.avail_idx[q].to_le(), GuestAddress(AVAIL[q] + 2))
                .unwrap();
        }

        fn used_idx(&self, q: usize) -> u16 {
            self.mem.read_obj::<u16>(GuestAddress(USED[q] + 2)).unwrap()
        }

        /// The (id, len) of used entry `k` of queue `q`.
        fn used(&self, q: usize, k: u16) -> (u32, u32) {
            let at = USED[q] + 4 + u64::from(k % QSIZE) * 8;
            (
                self.mem.read_obj(GuestAddress(at)).unwrap(),
                self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
            )
        }

        fn counters(&self) -> QueueCounters {
            lock(&self.device).counters
        }
    }

    const HOST_BUF_FOR_TESTS: usize = 64 * 1024 + 512;

    /// A TX frame: zero virtio-net header, then 60 bytes of Ethernet.
    fn frame() -> Vec<u8> {
        let mut f = vec![0u8; HDR_LEN];
        f.extend((0..60u8).map(|b| b ^ 0xA5));
        f
    }

    #[test]
    fn guest_frames_are_read_and_bad_chains_refused() {
        let mut r = Rig::new(feature::VERSION_1);
        let port = r.port();
        let f = frame();
        // A good chain split over two descriptors in two regions.
        r.mem.write_slice(&f[..20], GuestAddress(0x8000)).unwrap();
        r.mem.write_slice(&f[20..], GuestAddress(0x2_1000)).unwrap();
        r.desc(TXQ, 0, 0x8000, 20, NEXT, 1);
        r.desc(TXQ, 1, 0x2_1000, (f.len() - 20) as u32, 0, 0);
        r.offer(TXQ, 0);
        let mut buf = vec![0u8; 4096];
        assert_eq!(port.recv(&mut buf).unwrap(), f.len());
        assert_eq!(&buf[..f.len()], &f[..]);
        assert_eq!(r.used_idx(TXQ), 1);
        assert_eq!(r.used(TXQ, 0), (0, 0), "TX chains are used with length 0");

        // Each of these is refused, returned to the guest and counted.
        // Outside every region.
        r.desc(TXQ, 2, 0x5_0000, 72, 0, 0);
        // Crossing the end of the low region into the hole.
        r.desc(TXQ, 3, LOW.1 as u64 - 16, 72, 0, 0);
        // A loop: 4 -> 5 -> 4 ...
        r.desc(TXQ, 4, 0x8000, 40, NEXT, 5);
        r.desc(TXQ, 5, 0x8000, 40, NEXT, 4);
        // Zero length.
        r.desc(TXQ, 6, 0x8000, 0, 0, 0);
        // Longer than a frame may be (the buffer).
        r.desc(TXQ, 7, 0x2_0000, 0x8000, NEXT, 8);
        r.desc(TXQ, 8, 0x2_0000, 0x8000, 0, 0);
        // Writable: a receive buffer in the transmit queue.
        r.desc(TXQ, 9, 0x8000, 72, WRITE, 0);
        // Shorter than a virtio-net and an Ethernet header.
        r.desc(TXQ, 10, 0x8000, 20, 0, 0);
        for head in [2, 3, 4, 6, 7, 9, 10] {
            r.offer(TXQ, head);
        }
        let err = port.recv(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(r.counters().tx_bad_chains, 7);
        assert_eq!(r.used_idx(TXQ), 8, "every chain went back to the guest");
        assert_eq!(r.counters().tx_frames, 1);

        // And the queue still works.
        r.desc(TXQ, 11, 0x8000, 20, NEXT, 12);
        r.desc(TXQ, 12, 0x2_1000, (f.len() - 20) as u32, 0, 0);
        r.offer(TXQ, 11);
        assert_eq!(port.recv(&mut buf).unwrap(), f.len());
        assert_eq!(&buf[..f.len()], &f[..]);
        assert_eq!(r.counters().tx_frames, 2);
    }

    /// A TX frame of `len` bytes after the virtio-net header: Ethernet,
    /// IPv4 with protocol `proto`, then a byte pattern.
    fn ip_frame(len: usize, proto: u8) -> Vec<u8> {
        let mut f = vec![0u8; HDR_LEN];
        f.extend((0..len).map(|k| (k * 7 + 3) as u8));
        let e = HDR_LEN;
        f[e + 12..e + 14].copy_from_slice(&[0x08, 0x00]);
        f[e + 14] = 0x45;
        f[e + 14 + 9] = proto;
        f
    }

    #[test]
    fn large_tcp_and_udp_frames_are_lent_until_given_back() {
        let mut r = Rig::new(feature::VERSION_1);
        let port = r.port();
        // The window as Link::map_guest_memory would report it.
        lock(&r.device).window = Some(Window {
            key: 0x0012_345A,
            regions: vec![
                (LOW.0, LOW.1 as u64, Iova(0x10_0000)),
                (HIGH.0, HIGH.1 as u64, Iova(0x20_0000)),
            ],
        });
        let mut buf = vec![0u8; HOST_BUF_FOR_TESTS];

        // 1500 bytes of TCP in three descriptors: 100 bytes, then two in the
        // high region.
        let f = ip_frame(1500, 6);
        r.mem.write_slice(&f[..100], GuestAddress(0x8000)).unwrap();
        r.mem
            .write_slice(&f[100..1000], GuestAddress(0x2_1000))
            .unwrap();
        r.mem
            .write_slice(&f[1000..], GuestAddress(0x2_8000))
            .unwrap();
        r.desc(TXQ, 12, 0x8000, 100, NEXT, 13);
        r.desc(TXQ, 13, 0x2_1000, 900, NEXT, 14);
        r.desc(TXQ, 14, 0x2_8000, (f.len() - 1000) as u32, 0, 0);
        r.offer(TXQ, 12);
        let Received::Lent(l) = port.recv_lent(&mut buf).unwrap() else {
            panic!("a large TCP frame is lent");
        };
        let head = HDR_LEN + LEND_HEAD;
        assert_eq!(
            (l.head, l.len, l.token),
            (head, f.len(), 12),
            "named by its head"
        );
        assert_eq!(&buf[..head], &f[..head], "the head is copied");
        // The rest: the second descriptor from where the head ended, then
        // the third, at their IOVAs in the window.
        let past = (head - 100) as u64;
        assert_eq!(l.n, 2);
        assert_eq!(
            (l.sges[0].addr, l.sges[0].len, l.sges[0].lkey),
            (0x20_0000 + 0x1000 + past, 900 - past as u32, 0x0012_345A)
        );
        assert_eq!(
            (l.sges[1].addr, l.sges[1].len),
            (0x20_0000 + 0x8000, (f.len() - 1000) as u32)
        );
        assert_eq!(r.used_idx(TXQ), 0, "the guest's buffer stays lent");

        // A small UDP frame and an ICMP one are copied and used at once.
        let small = ip_frame(LEND_MIN - 1, 17);
        r.mem.write_slice(&small, GuestAddress(0x9000)).unwrap();
        r.desc(TXQ, 3, 0x9000, small.len() as u32, 0, 0);
        r.offer(TXQ, 3);
        assert_eq!(
            port.recv_lent(&mut buf).unwrap(),
            Received::Copied(small.len())
        );
        let icmp = ip_frame(1500, 1);
        r.mem.write_slice(&icmp, GuestAddress(0xA000)).unwrap();
        r.desc(TXQ, 4, 0xA000, icmp.len() as u32, 0, 0);
        r.offer(TXQ, 4);
        assert_eq!(
            port.recv_lent(&mut buf).unwrap(),
            Received::Copied(icmp.len())
        );
        assert_eq!(r.used_idx(TXQ), 2);
        assert_eq!((r.used(TXQ, 0).0, r.used(TXQ, 1).0), (3, 4));

        // A large UDP frame whose tail crosses the low region's end into
        // the hole is not lent, and the copy refuses it.
        let udp = ip_frame(1500, 17);
        let at = LOW.1 as u64 - 1000;
        r.mem.write_slice(&udp[..1000], GuestAddress(at)).unwrap();
        r.desc(TXQ, 5, at, udp.len() as u32, 0, 0);
        r.offer(TXQ, 5);
        assert_eq!(
            port.recv_lent(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert_eq!(r.counters().tx_bad_chains, 1);
        assert_eq!(r.used_idx(TXQ), 3);

        // Taking the lent frame back copies its rest and uses the chain.
        let mut rest = vec![0u8; f.len() - head];
        assert!(port.copy_back(12, head, &mut rest));
        assert_eq!(&rest[..], &f[head..]);
        assert_eq!(r.used_idx(TXQ), 4);
        assert_eq!(r.used(TXQ, 3), (12, 0));
        // Given back twice, or a token never lent: nothing happens.
        port.give_back(12);
        port.give_back(9);
        port.give_back(u16::MAX);
        assert_eq!(r.used_idx(TXQ), 4);
        assert_eq!(r.counters().tx_lent, 1);

        // Lent again, and given back when "the send completes".
        r.offer(TXQ, 12);
        assert!(matches!(
            port.recv_lent(&mut buf).unwrap(),
            Received::Lent(_)
        ));
        assert_eq!(lock(&r.device).lent_out, 1);
        port.give_back(12);
        assert_eq!(r.used_idx(TXQ), 5);
        assert_eq!(r.used(TXQ, 4), (12, 0));
        assert_eq!(lock(&r.device).lent_out, 0);

        // Without a window (copy mode) nothing is lent.
        lock(&r.device).window = None;
        r.offer(TXQ, 12);
        assert_eq!(port.recv_lent(&mut buf).unwrap(), Received::Copied(f.len()));
        assert_eq!(&buf[..f.len()], &f[..]);
    }

    #[test]
    fn legacy_header_is_widened() {
        let mut r = Rig::new(0);
        let port = r.port();
        let mut f = vec![1u8, 2, 3, 4, 5, 6, 7, 8, 9, 10];
        f.extend([0xEE; 60]);
        r.mem.write_slice(&f, GuestAddress(0x8000)).unwrap();
        r.desc(TXQ, 0, 0x8000, f.len() as u32, 0, 0);
        r.offer(TXQ, 0);
        let mut buf = vec![0u8; 4096];
        assert_eq!(port.recv(&mut buf).unwrap(), 72);
        assert_eq!(&buf[..12], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 0]);
        assert_eq!(&buf[12..72], &[0xEE; 60]);
    }

    #[test]
    fn frames_for_the_guest_fill_its_buffers() {
        let mut r = Rig::new(feature::VERSION_1 | feature::MRG_RXBUF);
        let port = r.port();
        let mut pkt = vec![0u8; HDR_LEN];
        pkt.extend((0..100u8).map(|b| b.wrapping_mul(3)));
        // Nothing posted: dropped and counted.
        assert!(port.send(&pkt).is_err());
        assert_eq!(r.counters().rx_no_buffers, 1);
        // Two small chains: with MRG_RXBUF the frame spans both, and
        // num_buffers says so.
        r.desc(RXQ, 0, 0x9000, 64, WRITE, 0);
        r.desc(RXQ, 1, 0x2_2000, 64, WRITE, 0);
        r.offer(RXQ, 0);
        r.offer(RXQ, 1);
        assert_eq!(port.send(&pkt).unwrap(), pkt.len());
        let mut got = [0u8; 112];
        r.mem
            .read_slice(&mut got[..64], GuestAddress(0x9000))
            .unwrap();
        r.mem
            .read_slice(&mut got[64..], GuestAddress(0x2_2000))
            .unwrap();
        assert_eq!(&got[10..12], &2u16.to_le_bytes(), "num_buffers");
        assert_eq!(&got[12..], &pkt[12..]);
        assert_eq!(r.used(RXQ, 0), (0, 64));
        assert_eq!(r.used(RXQ, 1), (1, 48));

        // A buffer outside guest memory is refused and returned; a
        // read-only one in the receive queue too.
        r.desc(RXQ, 2, 0x7_0000, 256, WRITE, 0);
        r.desc(RXQ, 3, 0x9000, 256, 0, 0);
        r.desc(RXQ, 4, 0x9000, 256, WRITE, 0);
        for h in [2, 3, 4] {
            r.offer(RXQ, h);
        }
        assert!(port.send(&pkt).is_err(), "the write to 0x70000 fails");
        assert!(port.send(&pkt).is_ok(), "the read-only chain is skipped");
        let c = r.counters();
        assert_eq!((c.rx_bad_chains, c.rx_frames), (2, 2));
    }

    #[test]
    fn receive_buffers_are_lent_filled_and_given_back() {
        let mut r = Rig::new(feature::VERSION_1 | feature::MRG_RXBUF);
        let port = r.port();
        let mut sges = [Sge::default(); 4];
        // No window: nothing is lent.
        assert_eq!(port.rx_ready(), None);
        assert_eq!(port.lend_rx(12, &mut sges), Lend::Refused);
        lock(&r.device).window = Some(Window {
            key: 0x0012_345A,
            regions: vec![
                (LOW.0, LOW.1 as u64, Iova(0x10_0000)),
                (HIGH.0, HIGH.1 as u64, Iova(0x20_0000)),
            ],
        });
        assert_eq!(port.rx_ready(), Some(true), "mergeable buffers");
        assert_eq!(port.lend_rx(12, &mut sges), Lend::Empty);
        // A two-descriptor chain (100 + 1400 bytes) and a one-descriptor one.
        r.desc(RXQ, 5, 0x9000, 100, WRITE | NEXT, 6);
        r.desc(RXQ, 6, 0x2_2000, 1400, WRITE, 0);
        r.desc(RXQ, 7, 0xA000, 1500, WRITE, 0);
        r.offer(RXQ, 5);
        r.offer(RXQ, 7);
        assert_eq!(port.lend_rx(12, &mut sges), Lend::Lent(5, 2, 1500));
        assert_eq!(
            (sges[0].addr, sges[0].len, sges[0].lkey),
            (0x10_0000 + 0x9000, 100, 0x0012_345A)
        );
        assert_eq!((sges[1].addr, sges[1].len), (0x20_0000 + 0x2000, 1400));
        // Smaller than asked for: left to the copy.
        assert_eq!(port.lend_rx(4096, &mut sges), Lend::Refused);
        assert_eq!(port.lend_rx(12, &mut sges), Lend::Lent(7, 1, 1500));
        assert_eq!(r.used_idx(RXQ), 0, "lent, not used");

        // "The HCA wrote" 1800 bytes across both; the backend adds the
        // virtio-net header (num_buffers 2, DATA_VALID dropped: the guest
        // did not ack GUEST_CSUM) and the chains go on the used ring.
        let frame: Vec<u8> = (0..1800u32).map(|k| (k % 251) as u8).collect();
        assert!(port.rx_write(5, 12, &frame[..1488]));
        assert!(port.rx_write(7, 0, &frame[1488..]));
        let mut back = vec![0u8; 1488];
        assert!(port.rx_read(5, 12, &mut back));
        assert_eq!(&back[..], &frame[..1488]);
        assert!(!port.rx_write(5, 1400, &[0u8; 200]), "past the chain's end");
        let mut hdr = [0u8; HDR_LEN];
        hdr[0] = crate::vnet::F_DATA_VALID;
        assert!(port.rx_done(hdr, &[(5, 1500), (7, 312)]));
        let mut h = [0u8; HDR_LEN];
        r.mem.read_slice(&mut h, GuestAddress(0x9000)).unwrap();
        assert_eq!(h[0], 0, "no DATA_VALID for a guest that did not ask");
        assert_eq!(&h[10..12], &2u16.to_le_bytes(), "num_buffers");
        let mut tail = [0u8; 312];
        r.mem.read_slice(&mut tail, GuestAddress(0xA000)).unwrap();
        assert_eq!(&tail[..], &frame[1488..]);
        assert_eq!((r.used(RXQ, 0), r.used(RXQ, 1)), ((5, 1500), (7, 312)));
        assert_eq!(r.counters().rx_lent, 1);
        // Used chains are the guest's again: writes to them fail.
        assert!(!port.rx_write(5, 0, &[1]));
        assert!(!port.rx_done(hdr, &[(5, 10)]), "not lent any more");
        assert_eq!(r.used_idx(RXQ), 2);

        // A chain given back unused is lent again before the ring's next;
        // at a ring stop it goes to the guest empty.
        r.desc(RXQ, 8, 0xB000, 1500, WRITE, 0);
        r.offer(RXQ, 8);
        assert_eq!(port.lend_rx(12, &mut sges), Lend::Lent(8, 1, 1500));
        port.rx_return(8);
        port.rx_return(8);
        port.rx_return(9);
        assert_eq!(port.lend_rx(12, &mut sges), Lend::Lent(8, 1, 1500));
        port.rx_return(8);
        lock(&r.device).get_vring_base(RXQ as u32).unwrap();
        assert_eq!(r.used_idx(RXQ), 3);
        assert_eq!(r.used(RXQ, 2), (8, 0));
        assert_eq!(port.rx_ready(), None, "the ring stopped");
    }

    #[test]
    fn too_small_buffers_without_mergeable_rx_are_kept_for_later() {
        let mut r = Rig::new(feature::VERSION_1);
        let port = r.port();
        let mut pkt = vec![0u8; HDR_LEN];
        pkt.extend([7u8; 200]);
        r.desc(RXQ, 0, 0x9000, 64, WRITE, 0);
        r.offer(RXQ, 0);
        assert!(port.send(&pkt).is_err());
        assert_eq!(r.counters().rx_too_big, 1);
        assert_eq!(r.used_idx(RXQ), 0, "the chain was put back, not used");
        // A small frame then uses it.
        assert!(port.send(&pkt[..HDR_LEN + 40]).is_ok());
        assert_eq!(r.used(RXQ, 0), (0, 52));
    }

    #[test]
    fn config_space_is_exact() {
        let r = Rig::new(feature::VERSION_1);
        let d = lock(&r.device);
        let c = d.config(0, 12);
        assert_eq!(&c[..6], &[0x52, 0x54, 0, 0, 0, 1]);
        assert_eq!(&c[8..10], &1u16.to_le_bytes(), "max_virtqueue_pairs");
        assert_eq!(&c[10..12], &2044u16.to_le_bytes(), "mtu");
        // Any window, exactly as long as asked, zero past the end.
        assert_eq!(d.config(10, 8), vec![0xfc, 0x07, 0, 0, 0, 0, 0, 0]);
        assert_eq!(d.config(u32::MAX, 4), vec![0; 4]);
    }

    #[test]
    fn early_ring_enable_and_feature_checks() {
        let mut d = Device::new(Mac([0x52, 0x54, 0, 0, 0, 1]), 2044, false).unwrap();
        // Rings start enabled (QEMU's early enables never reach us) and
        // follow the frontend's word after that.
        assert!(d.vqs.iter().all(|v| v.enabled));
        assert!(d.set_vring_enable(0, false).is_ok());
        assert!(!d.vqs[0].enabled);
        assert!(d.set_vring_enable(0, true).is_ok());
        assert!(d.set_vring_enable(2, true).is_err(), "no third queue");
        // Features not offered are refused; offered ones taken.
        assert!(
            d.set_features(feature::HOST_TSO4).is_err(),
            "no offloads here"
        );
        let f = feature::VERSION_1 | feature::MRG_RXBUF | feature::PROTOCOL_FEATURES;
        assert!(d.set_features(f).is_ok());
        assert_eq!(d.acked, f);
        assert!(
            d.get_config(0, 0x10_0000, VhostUserConfigFlags::empty())
                .is_err(),
            "no megabyte config windows"
        );
        assert!(d.set_owner().is_ok());
        assert!(d.set_owner().is_err(), "owned once");
        // Ring sizes: powers of two up to the maximum.
        assert!(d.set_vring_num(0, 256).is_ok());
        assert!(d.set_vring_num(0, 100).is_err());
        assert!(d.set_vring_num(0, 4096).is_err());
        // Ring addresses must be inside a region the frontend gave.
        assert!(
            d.set_vring_addr(
                0,
                VhostUserVringAddrFlags::empty(),
                0x1000,
                0x2000,
                0x3000,
                0
            )
            .is_err()
        );
    }

    #[test]
    fn only_requests_that_touch_the_data_path_quiesce_it() {
        // vhost-user request codes (the spec's message types).
        for code in [2, 3, 4, 5, 8, 9, 10, 11, 12, 18, 34, 37, 38] {
            assert!(changes_data_path(code), "{code}");
        }
        for code in [1, 13, 14, 15, 16, 17, 24, 25] {
            assert!(!changes_data_path(code), "{code}");
        }
        assert!(
            changes_data_path(0) && changes_data_path(999),
            "unknown ones do"
        );
    }

    #[test]
    fn specs_parse() {
        let s = VhostSpec::parse("ib0=/run/vm1.sock,mac=52:54:00:00:00:09,ip=10.0.0.9").unwrap();
        assert_eq!(s.interface, "ib0");
        assert_eq!(s.socket, PathBuf::from("/run/vm1.sock"));
        assert_eq!(s.mac, Some(Mac([0x52, 0x54, 0, 0, 0, 9])));
        assert_eq!(s.addresses, ["10.0.0.9".parse::<IpAddr>().unwrap()]);
        assert!(!s.copy, "zero copy unless asked");
        assert!(VhostSpec::parse("ib0=/x,copy").unwrap().copy);
        for bad in [
            "ib0",
            "=/x",
            "ib0=",
            "ib0=/x,mac=01:00:5e:00:00:01",
            "ib0=/x,mac=zz",
            "ib0=/x,ip=nope",
            "ib0=/x,colour=red",
            "ib0=/x,copy=yes",
        ] {
            assert!(VhostSpec::parse(bad).is_err(), "{bad}");
        }
        let gid = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 2, 0xc9, 3, 0, 0, 0, 1];
        let m = s.default_mac(&gid);
        assert_eq!(m.0[0] & 3, 2, "locally administered unicast");
        let other = VhostSpec::parse("ib0=/run/vm2.sock").unwrap();
        assert_ne!(other.default_mac(&gid), m, "another socket, another MAC");
    }

    #[test]
    fn garbage_rings_are_survived() {
        let mut r = Rig::new(feature::VERSION_1 | feature::MRG_RXBUF | feature::EVENT_IDX);
        let port = r.port();
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut buf = vec![0u8; HOST_BUF_FOR_TESTS];
        let frame = frame();
        for _ in 0..2_000 {
            // A random descriptor: anywhere, any length, any flags, any
            // next; offered on a random queue under a random head.
            let q = (next() % 2) as usize;
            let i = (next() % u64::from(QSIZE)) as u16;
            let addr = match next() % 4 {
                0 => next(),
                1 => next() % 0x4_0000,
                _ => 0x8000 + next() % 0x100,
            };
            let len = (next() % 0x2_0000) as u32;
            let flags = (next() % 8) as u16;
            let nxt = (next() % 32) as u16;
            r.desc(q, i, addr, len, flags, nxt);
            r.offer(q, (next() % 32) as u16);
            let _ = port.recv(&mut buf);
            let _ = port.send(&frame);
        }
        // The device still takes a good chain afterwards (a queue that the
        // garbage did not leave with pending heads).
        let c = r.counters();
        assert!(c.tx_bad_chains + c.rx_bad_chains > 0, "{c:?}");
    }

    #[test]
    fn data_valid_reaches_only_a_guest_that_asked() {
        for (acked, want) in [(0, 0u8), (feature::GUEST_CSUM, crate::vnet::F_DATA_VALID)] {
            let mut r = Rig::new(feature::VERSION_1 | acked);
            let port = r.port();
            r.desc(RXQ, 0, 0x9000, 256, WRITE, 0);
            r.offer(RXQ, 0);
            let mut pkt = vec![0u8; HDR_LEN];
            pkt[0] = crate::vnet::F_DATA_VALID;
            pkt.extend([9u8; 60]);
            assert!(port.send(&pkt).is_ok());
            let mut flags = [0u8; 1];
            r.mem.read_slice(&mut flags, GuestAddress(0x9000)).unwrap();
            assert_eq!(flags[0], want, "acked {acked:#x}");
        }
    }
}
