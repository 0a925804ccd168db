//! One IPoIB interface in datagram mode on an HCA port: the engine of
//! [`crate::engine::datagram`] wired to UD QPs, the SA client and the
//! host side.
//!
//! The interface has endpoints, each an IPoIB address of its own (own UD
//! QP and QPN, the port's GID; ARCHITECTURE decision 1): endpoint 0 is
//! the host's ([`HostPort`]: the TUN device in the daemon); every vNIC a
//! guest attaches adds one whose other side speaks Ethernet through
//! [`crate::engine::eth::Translator`]. The port-wide parts are shared:
//! the SA client, the broadcast group's parameters, and the multicast
//! memberships, which the SA sees once per port and which are left only
//! when the last endpoint using a group lets go of it.
//!
//! Buffers are allocated once per endpoint: receive buffers of GRH + IB
//! MTU in DMA memory, send slots in DMA memory, and a pool of packet
//! buffers that host reads land in. Packets are named by pool index while
//! they wait in the engine's queues, so the data path does not allocate.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use mlx5_driver::Hca;
use mlx5_driver::hca::{AsyncEvent, ForeignWindow, HcaError, TeardownReport};
use mlx5_driver::layout::cqe::{Cqe, CqeError};
use mlx5_driver::layout::eqe::PortChange;
use mlx5_driver::layout::smp::PortState;
use mlx5_driver::layout::wqe::{AddressVector, Grh, Sge};
use mlx5_driver::sa::{self, Gsi, MadDest, MadHeader, McMemberRecord, PathRecord, join};
use mlx5_driver::transport::tun::{Tun, VNET_HDR_LEN_MRG};
use mlx5_driver::transport::{DmaBuffer, DmaMem, Iova, Transport};
use mlx5_driver::verbs::{Cq, Qp, QpConfig, TxOffload};

use crate::engine::addr::HwAddr;
use crate::engine::datagram::{self, Action, Datagram, Dest, Payload, Source};
use crate::engine::eth::{self as eth, GuestRx, GuestTx, Listen, Mac, Sender, Translator};
use crate::engine::{self, mgid};
use crate::vnet::{self, TxPlan, VnetHdr};

/// GRH area + the largest IB MTU.
const RX_BUF: usize = 40 + 4096;
/// log2 of the receive buffers (and RQ WQEs) of an endpoint.
const LOG_RQ: u8 = 8;
/// Send slots: IPoIB header + payload, up to a 64 KiB TSO packet.
const TX_SLOT: usize = 64 * 1024 + 512;
const TX_SLOTS: usize = 128;
/// The SQ in 64-byte basic blocks: a UD send takes two (control,
/// datagram and data segments), an LSO send or one gathering a lent
/// packet up to eleven (inline headers, then 19 gather entries).
const LOG_SQ: u8 = 10;
/// Room kept for a burst: packets are only taken from the host side while
/// this many sends of the largest kind fit.
const TX_HEADROOM: usize = 8;
const MAX_WQE_BBS: u16 = 11;
/// Host packet buffers: virtio-net header + one IP packet (64 KiB with
/// TSO).
const HOST_BUF: usize = VNET_HDR_LEN_MRG + 64 * 1024 + 256;
const HOST_BUFS: usize = 256;
/// SA transactions: per-try timeout and tries (together under the
/// engine's 1 s path-resolution limit).
const SA_TIMEOUT: Duration = Duration::from_millis(200);
const SA_TRIES: u8 = 4;
/// The Q_Key the QP has until the broadcast group's replaces it.
const QKEY_DEFAULT: u32 = 0x0B1B;

/// The host side of an endpoint: where packets to transmit come from and
/// received ones go, each behind a 12-byte virtio-net header. For the
/// host endpoint they are IP packets (the daemon uses a [`Tun`] device;
/// tests can use a queue); for a guest's, Ethernet frames.
pub trait HostPort {
    /// Reads one packet; `WouldBlock` when none is waiting.
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one packet.
    fn send(&self, buf: &[u8]) -> io::Result<usize>;
    /// Reads one packet, or lends it: its first bytes are copied into
    /// `buf` and the HCA gathers the rest where it lies (a guest's
    /// buffer, mapped into the VM's window) until [`HostPort::give_back`].
    fn recv_lent(&self, buf: &mut [u8]) -> io::Result<Received> {
        self.recv(buf).map(Received::Copied)
    }
    /// The HCA is done with a lent packet.
    fn give_back(&self, _token: u16) {}
    /// Copies bytes `from..` of a lent packet into `out` and takes it
    /// back; false if they could not be had.
    fn copy_back(&self, _token: u16, _from: usize, _out: &mut [u8]) -> bool {
        false
    }
    /// Whether receive buffers can be lent now ([`HostPort::lend_rx`]):
    /// `Some(true)` if a packet may span several of them (virtio-net's
    /// mergeable receive buffers), `Some(false)` if it must fit one.
    fn rx_ready(&self) -> Option<bool> {
        None
    }
    /// Lends a receive buffer of at least `min_cap` bytes for the HCA to
    /// write into, its pieces as scatter entries into `out`.
    fn lend_rx(&self, _min_cap: u32, _out: &mut [Sge]) -> Lend {
        Lend::Refused
    }
    /// Copies bytes `off..` of lent receive buffer `token` into `out`.
    fn rx_read(&self, _token: u16, _off: usize, _out: &mut [u8]) -> bool {
        false
    }
    /// Writes `data` at `off` of lent receive buffer `token`.
    fn rx_write(&self, _token: u16, _off: usize, _data: &[u8]) -> bool {
        false
    }
    /// A packet is in lent receive buffers `used` (token and bytes, in
    /// order), its 12-byte virtio-net header `hdr` to go at the start of
    /// the first: they go to the guest.
    fn rx_done(&self, _hdr: [u8; VNET_HDR_LEN_MRG], _used: &[(u16, u32)]) -> bool {
        false
    }
    /// A lent receive buffer comes back unused.
    fn rx_return(&self, _token: u16) {}
}

/// Most gather entries a lent packet may take.
pub const MAX_LENT: usize = 18;

/// Receive WQEs of a guest endpoint that lends guest buffers: each needs
/// room for the largest packet in them, so the guest's ring (256 buffers
/// is usual) can back all of them.
const LOG_RQ_LENT: u8 = 6;
/// Scatter entries of such a WQE: GRH, IPoIB header, then pieces of guest
/// buffers.
const RX_SGES: u8 = 7;
const MAX_RX_PIECES: usize = RX_SGES as usize - 2;
/// Most pieces one lent receive buffer may have.
pub const MAX_RX_BUF_PIECES: usize = 4;
/// What the backend writes before the packet in a guest's first receive
/// buffer: the virtio-net and Ethernet headers.
const GUEST_RX_SKIP: usize = VNET_HDR_LEN_MRG + eth::ETH_HLEN;
/// Guest buffer room a receive WQE needs: those headers and the largest
/// UD payload past the IPoIB header (4096-byte IB MTU); a packet larger
/// than the WQE would take the QP to the error state.
const GUEST_RX_ROOM: usize = GUEST_RX_SKIP + 4096 - engine::IPOIB_HEADER_LEN;
/// Bytes of a packet received into guest buffers copied for the engine
/// and the translation (IP and transport headers); ARP, ICMPv6 (ND, MLD)
/// and DHCP are copied whole, as they may be rewritten.
const RX_PEEK: usize = 128;

/// What posting a receive WQE into guest buffers came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RxPost {
    Posted,
    /// The guest has not lent enough buffers yet.
    Waiting,
    /// It cannot: the WQE takes the endpoint's own buffer.
    Refused,
}

/// A receive buffer a guest lent: its token, pieces and capacity.
#[derive(Debug, Clone, Copy, Default)]
struct GuestBuf {
    token: u16,
    sges: [Sge; MAX_RX_BUF_PIECES],
    n: usize,
    cap: usize,
}

/// Guest receive buffers that one WQE (or one received packet) holds;
/// `n == 0`: none (the WQE points at the endpoint's own buffer).
#[derive(Debug, Clone, Copy, Default)]
struct RxLent {
    bufs: [GuestBuf; MAX_RX_PIECES],
    n: usize,
    /// Of a received packet: the bytes of it copied into its pool slot
    /// for the engine and the translation.
    peek: usize,
}

/// A packet lent by the host side: what was copied, and where the rest is
/// for the HCA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lent {
    /// Bytes copied into the buffer, virtio-net header included.
    pub head: usize,
    /// Length of the whole packet, virtio-net header included.
    pub len: usize,
    /// Names the packet to [`HostPort::give_back`].
    pub token: u16,
    /// Gather entries for bytes `head..len`, in order.
    pub sges: [Sge; MAX_LENT],
    /// Entries used.
    pub n: usize,
}

/// What [`HostPort::lend_rx`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lend {
    /// A buffer is lent: its token, the scatter entries it took, its
    /// capacity.
    Lent(u16, usize, u32),
    /// No buffer is posted now; ask again later.
    Empty,
    /// The next buffer cannot be lent (too small, too many pieces,
    /// outside the window): it is left to the copy.
    Refused,
}

/// What [`HostPort::recv_lent`] read. Passed by value on the data path:
/// boxing the large variant would allocate per packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)]
pub enum Received {
    /// The whole packet, this many bytes, is in the buffer.
    Copied(usize),
    /// The packet is lent.
    Lent(Lent),
}

impl HostPort for Tun {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        Tun::recv(self, buf)
    }

    fn send(&self, buf: &[u8]) -> io::Result<usize> {
        Tun::send(self, buf)
    }
}

/// Counters of one interface (the ethtool -S view).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LinkCounters {
    /// Packets sent on the fabric.
    pub tx_packets: u64,
    /// Bytes sent (IPoIB header included).
    pub tx_bytes: u64,
    /// Packets received from the fabric.
    pub rx_packets: u64,
    /// Bytes received (IPoIB header included).
    pub rx_bytes: u64,
    /// Packets handed to the host.
    pub rx_delivered: u64,
    /// Host packets dropped: no free send slot or host buffer.
    pub tx_no_buffer: u64,
    /// Host packets dropped: larger than the IPoIB MTU (the host side's
    /// MTU was raised past what the broadcast group allows).
    pub tx_too_big: u64,
    /// Host packets dropped: a virtio-net header asking for an offload
    /// the interface does not do, or not matching the packet.
    pub tx_bad_offload: u64,
    /// TSO packets the HCA segmented.
    pub tx_lso: u64,
    /// Packets whose checksums the HCA computed.
    pub tx_csum: u64,
    /// Received packets dropped: no free host buffer.
    pub rx_no_buffer: u64,
    /// Send completions with an error.
    pub tx_errors: u64,
    /// Receive completions with an error, or too short for the IPoIB
    /// header.
    pub rx_errors: u64,
    /// SA transactions that failed.
    pub sa_failures: u64,
    /// Packets sent straight from a guest's memory (lent, not copied).
    pub tx_zero_copy: u64,
    /// Packets the HCA wrote straight into a guest's buffers.
    pub rx_zero_copy: u64,
    /// Times the endpoint's QP failed (an error completion other than a
    /// flush) and was restarted.
    pub qp_restarts: u64,
}

/// An SA transaction in flight, for an endpoint.
#[derive(Debug, Clone, Copy)]
enum SaOp {
    Path([u8; 16]),
    Join {
        mgid: [u8; 16],
        send_only: bool,
        state: u8,
    },
}

/// Names an endpoint of a [`Link`]; 0 is the host's.
pub type EndpointId = usize;

/// The host endpoint.
pub const HOST: EndpointId = 0;

/// Room for a translated ARP or ND packet (ND options grow by 16 bytes
/// each).
const SCRATCH: usize = 4096 + 512;

/// Where a packet sits in its pool buffer.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// Offset of its virtio-net header; the packet follows it.
    start: usize,
    /// End of the packet.
    end: usize,
    /// EtherType (received packets).
    ty: u16,
    /// Who sent it (received packets, for a guest's Ethernet header).
    from: Option<Sender>,
    /// The HCA verified its IPv4 and TCP/UDP checksums (received packets).
    csum_ok: bool,
    /// Bytes from `lent.head` on are still in a guest's buffer.
    lent: Option<Lent>,
}

impl Slot {
    /// End of the bytes in the pool buffer: the packet's, or a lent
    /// packet's copied head.
    fn here(&self) -> usize {
        self.lent.as_ref().map_or(self.end, |l| l.head)
    }
}

/// The Ethernet side of a guest's endpoint.
struct Guest {
    tr: Translator,
    port: Box<dyn HostPort>,
    scratch: Box<[u8]>,
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest")
            .field("tr", &self.tr)
            .finish_non_exhaustive()
    }
}

/// A port-wide multicast membership.
#[derive(Debug, Clone)]
struct Membership {
    /// JoinState the SA holds for the port.
    state: u8,
    /// Endpoints using it.
    users: Vec<EndpointId>,
}

/// One IPoIB address on the port: a UD QP, its queues and buffers, and the
/// engine state behind it.
#[derive(Debug)]
struct Endpoint {
    scq: Option<Cq>,
    rcq: Option<Cq>,
    qp: Option<Qp>,
    rx: Option<DmaBuffer>,
    tx: Option<DmaBuffer>,
    rx_posted: VecDeque<usize>,
    /// Guest receive buffers each posted WQE holds, by receive buffer.
    rx_lent: Vec<RxLent>,
    /// Guest receive buffers held by packets in the pool, by slot.
    slot_rx: Vec<RxLent>,
    /// Lent guest receive buffers not in a WQE.
    rx_spare: Vec<GuestBuf>,
    /// New receive WQEs may take guest buffers.
    rx_lend: bool,
    /// Receive WQEs waiting for the guest to lend buffers.
    rx_unposted: Vec<usize>,
    /// A completion said the QP failed: it is restarted this turn.
    qp_failed: bool,
    tx_free: Vec<usize>,
    /// Posted sends: slot, and the lent packet they gather from.
    tx_inflight: VecDeque<(usize, Option<u16>)>,
    /// A guest's protection domain and keys; `None`: the HCA's own.
    dom: Option<Domain>,
    /// Keys over `rx` and `tx`.
    rx_key: u32,
    tx_key: u32,
    pool: Vec<Vec<u8>>,
    slots: Vec<Slot>,
    pool_free: Vec<usize>,
    engine: Datagram<AddressVector, usize>,
    out: Vec<Action<AddressVector, usize>>,
    spare: Vec<Action<AddressVector, usize>>,
    attached: Vec<[u8; 16]>,
    /// The completion queues are armed for an event.
    armed: bool,
    counters: LinkCounters,
    guest: Option<Guest>,
}

/// How a guest's endpoint presents itself.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// The guest's MAC (presented to it; enforced unless `learn_mac`).
    pub mac: Mac,
    /// Take the MAC from the guest's first frame (its VMM chose it).
    pub learn_mac: bool,
    /// Source addresses the guest may use; empty: learned.
    pub allowed: Vec<IpAddr>,
    /// The guest's memory will be mapped for the HCA
    /// ([`Link::map_guest_memory`]): the receive queue is sized for WQEs
    /// that take guest buffers.
    pub zero_copy: bool,
}

/// What `ipoib-tool vms` shows of a guest's endpoint.
#[derive(Debug, Clone)]
pub struct GuestInfo {
    /// The endpoint's IPoIB address.
    pub hw: HwAddr,
    /// The guest's MAC.
    pub mac: Mac,
    /// Addresses the guest uses (configured or learned).
    pub addresses: Vec<IpAddr>,
    /// Remote addresses shown to it as MACs.
    pub remacs: usize,
    /// Counters.
    pub counters: LinkCounters,
    /// Drops by the translation, by reason.
    pub eth_drops: Vec<(&'static str, u64)>,
    /// Drops by the engine, by reason.
    pub drops: Vec<(&'static str, u64)>,
}

/// A datagram-mode IPoIB interface; see the module documentation.
#[derive(Debug)]
pub struct Link<T: Transport> {
    hca: Hca<T>,
    gsi: Option<Gsi>,
    /// Endpoints by id; a removed guest leaves `None` so ids stay stable.
    eps: Vec<Option<Endpoint>>,
    bcast: Option<McMemberRecord>,
    /// SA transactions in flight, by TID: the event loop never waits for
    /// the SA.
    sa_pending: HashMap<u64, (EndpointId, SaOp)>,
    joined: HashMap<[u8; 16], Membership>,
    lid: u16,
    sm_lid: u16,
    gid: [u8; 16],
    pkey: u16,
    active: bool,
    /// The QPs do IPoIB stateless offloads (checksums, LSO).
    offload: bool,
    next_start: Instant,
    next_timers: Instant,
    /// The last turn moved packets: do not sleep in the next one.
    busy: bool,
}

/// Why the interface could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// An HCA command failed.
    #[error("{0}")]
    Hca(#[from] HcaError),
    /// DMA memory could not be had.
    #[error("DMA memory: {0}")]
    Dma(#[from] mlx5_driver::transport::TransportError),
    /// Posting a receive failed.
    #[error("posting receive buffers: {0:?}")]
    Post(mlx5_driver::verbs::PostError),
}

/// A guest endpoint's protection domain: its QP, keys bounded to the
/// endpoint's own buffers, and the window of the VM's memory with a key
/// bounded to it. The HCA reaches nothing else on that QP's behalf.
#[derive(Debug)]
struct Domain {
    pd: u32,
    rx_key: Option<u32>,
    tx_key: Option<u32>,
    window: Option<(ForeignWindow, u32)>,
}

/// The HCA objects of one endpoint.
#[derive(Debug, Default)]
struct Parts {
    scq: Option<Cq>,
    rcq: Option<Cq>,
    qp: Option<Qp>,
    rx: Option<DmaBuffer>,
    tx: Option<DmaBuffer>,
    dom: Option<Domain>,
    /// log2 of the RQ's WQEs (and of the receive buffers).
    log_rq: u8,
}

/// Where a VM's memory is for the HCA: the key, and each region's IOVA
/// and length in the order given to [`Link::map_guest_memory`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestWindow {
    /// Key bounded to the window.
    pub key: u32,
    /// Each region's IOVA and length.
    pub regions: Vec<(Iova, u64)>,
}

/// How long sends gathering from a guest's memory may take to complete
/// before its mapping is kept instead of removed.
const DRAIN_TIMEOUT: Duration = Duration::from_millis(500);

impl<T: Transport> Link<T> {
    /// Creates the interface's GSI QP and the host endpoint's QP and
    /// buffers on port 1 of `hca`, P_Key index 0. Call [`Link::poll`] to
    /// run it.
    pub fn new(mut hca: Hca<T>) -> Result<Link<T>, (Box<LinkError>, TeardownReport)> {
        let gsi = match Gsi::new(&mut hca, 1) {
            Ok(g) => g,
            Err(e) => return Err((Box::new(e.into()), hca.shutdown())),
        };
        let parts = match Self::create_endpoint(&mut hca, false, false) {
            Ok(p) => p,
            Err(e) => {
                let _ = gsi.destroy(&mut hca);
                return Err((Box::new(e), hca.shutdown()));
            }
        };
        let offload = hca.info().ipoib_basic_offloads;
        let port = hca.info().ports.first().cloned();
        let gid = port.as_ref().map_or([0; 16], |p| p.gid);
        // The parent interface takes the P_Key at index 0 (the default
        // partition unless the SM says otherwise).
        let pkey = port
            .as_ref()
            .and_then(|p| p.pkeys.iter().find(|(i, _)| *i == 0).map(|(_, k)| *k))
            .unwrap_or(0xFFFF);
        let mut link = Link {
            hca,
            gsi: Some(gsi),
            eps: Vec::new(),
            bcast: None,
            sa_pending: HashMap::new(),
            joined: HashMap::new(),
            lid: port.as_ref().map_or(0, |p| p.lid),
            sm_lid: port.as_ref().map_or(0, |p| p.sm_lid),
            gid,
            pkey,
            active: false,
            offload,
            next_start: Instant::now(),
            next_timers: Instant::now(),
            busy: false,
        };
        let ep = link.assemble(parts, None);
        link.eps.push(Some(ep));
        Ok(link)
    }

    /// Creates an endpoint's HCA objects: in a protection domain of its
    /// own for a guest (`own_domain`), in the HCA's for the host.
    fn create_endpoint(hca: &mut Hca<T>, own_domain: bool, lend: bool) -> Result<Parts, LinkError> {
        let mut p = Parts {
            log_rq: if lend { LOG_RQ_LENT } else { LOG_RQ },
            ..Parts::default()
        };
        match Self::build_parts(hca, &mut p, own_domain) {
            Ok(()) => Ok(p),
            Err(e) => {
                let _ = Self::release_parts(hca, p);
                Err(e)
            }
        }
    }

    fn build_parts(hca: &mut Hca<T>, p: &mut Parts, own_domain: bool) -> Result<(), LinkError> {
        if own_domain {
            p.dom = Some(Domain {
                pd: hca.alloc_pd()?,
                rx_key: None,
                tx_key: None,
                window: None,
            });
        }
        let scq = p.scq.insert(Cq::create(hca, LOG_SQ + 1)?).cqn();
        let rcq = p.rcq.insert(Cq::create(hca, p.log_rq + 1)?).cqn();
        let cfg = QpConfig {
            log_sq: LOG_SQ,
            // Siblings on the port must see our multicast; our own
            // copies are filtered in the engine, as Linux does.
            block_mc_loopback: false,
            offload: hca.info().ipoib_basic_offloads,
            pd: p.dom.as_ref().map(|d| d.pd),
            log_rq: p.log_rq,
            rq_sge: if own_domain { RX_SGES } else { 1 },
            ..QpConfig::ud(1, 0, QKEY_DEFAULT, LOG_RQ, scq, rcq)
        };
        p.qp.insert(Qp::create(hca, &cfg)?).activate_datagram(hca)?;
        let rx = p.rx.insert(hca.alloc_dma((1usize << p.log_rq) * RX_BUF)?);
        let (rx_iova, rx_len) = (rx.iova(), rx.len() as u64);
        let tx = p.tx.insert(hca.alloc_dma(TX_SLOTS * TX_SLOT)?);
        let (tx_iova, tx_len) = (tx.iova(), tx.len() as u64);
        if let Some(d) = p.dom.as_mut() {
            d.rx_key = Some(hca.create_key(d.pd, rx_iova, rx_len)?);
            d.tx_key = Some(hca.create_key(d.pd, tx_iova, tx_len)?);
        }
        Ok(())
    }

    /// Destroys what `p` holds, the QP first (which flushes its work, so
    /// nothing points into the buffers or the window afterwards).
    fn release_parts(hca: &mut Hca<T>, mut p: Parts) -> Vec<String> {
        let mut errors = Vec::new();
        let mut note = |what: &str, r: Result<(), String>| {
            if let Err(e) = r {
                errors.push(format!("{what}: {e}"));
            }
        };
        let text = |e: &dyn std::fmt::Display| e.to_string();
        if let Some(qp) = p.qp.take() {
            note("destroying a QP", qp.destroy(hca).map_err(|e| text(&e)));
        }
        for cq in [p.scq.take(), p.rcq.take()].into_iter().flatten() {
            note("destroying a CQ", cq.destroy(hca).map_err(|e| text(&e)));
        }
        let mut keys = Vec::new();
        let (mut window, mut pd) = (None, None);
        if let Some(mut d) = p.dom.take() {
            if let Some((w, key)) = d.window.take() {
                keys.push(key);
                window = Some(w);
            }
            keys.extend([d.rx_key.take(), d.tx_key.take()].into_iter().flatten());
            pd = Some(d.pd);
        }
        // Keys first, then what they covered.
        for key in keys {
            note(
                "destroying a key",
                hca.destroy_key(key).map_err(|e| text(&e)),
            );
        }
        if let Some(w) = window {
            note(
                "unmapping guest memory",
                hca.unmap_foreign(w).map_err(|e| text(&e)),
            );
        }
        // The buffers go before their domain does.
        for b in [p.rx.take(), p.tx.take()].into_iter().flatten() {
            note("freeing DMA memory", hca.free_dma(b).map_err(|e| text(&e)));
        }
        if let Some(pd) = pd {
            note("freeing a PD", hca.dealloc_pd(pd).map_err(|e| text(&e)));
        }
        errors
    }

    fn assemble(
        &mut self,
        parts: Parts,
        guest: Option<(GuestConfig, Box<dyn HostPort>)>,
    ) -> Endpoint {
        let Parts {
            scq,
            rcq,
            qp,
            rx,
            tx,
            dom,
            log_rq,
        } = parts;
        let rx_bufs = 1usize << log_rq;
        let lkey = self.hca.lkey();
        let rx_key = dom.as_ref().and_then(|d| d.rx_key).unwrap_or(lkey);
        let tx_key = dom.as_ref().and_then(|d| d.tx_key).unwrap_or(lkey);
        let is_guest = guest.is_some();
        // A guest's vNIC does not accept connected mode (yet): no RC flag.
        let flags = if is_guest { 0 } else { HwAddr::FLAG_RC };
        let hw = HwAddr::new(flags, qp.as_ref().map_or(0, Qp::qpn), self.gid);
        let engine = Datagram::new(datagram::Config {
            hw,
            pkey: self.pkey,
            scope: mgid::SCOPE_LINK,
            ipv4: Vec::new(),
            ipv6: Vec::new(),
            guest: is_guest,
        });
        let mtu = self.mtu();
        let guest = guest.map(|(cfg, port)| {
            let tr = Translator::new(cfg.mac, hw, self.pkey, mgid::SCOPE_LINK, mtu, cfg.allowed);
            Guest {
                tr: if cfg.learn_mac { tr.learn_mac() } else { tr },
                port,
                scratch: vec![0u8; SCRATCH].into_boxed_slice(),
            }
        });
        let mut ep = Endpoint {
            scq,
            rcq,
            qp,
            rx,
            tx,
            dom,
            rx_key,
            tx_key,
            rx_posted: VecDeque::with_capacity(rx_bufs),
            rx_lent: vec![RxLent::default(); rx_bufs],
            slot_rx: vec![RxLent::default(); HOST_BUFS],
            rx_spare: Vec::new(),
            rx_lend: true,
            rx_unposted: Vec::new(),
            qp_failed: false,
            tx_free: (0..TX_SLOTS).rev().collect(),
            tx_inflight: VecDeque::with_capacity(TX_SLOTS),
            pool: vec![vec![0u8; HOST_BUF]; HOST_BUFS],
            slots: vec![Slot::default(); HOST_BUFS],
            pool_free: (0..HOST_BUFS).rev().collect(),
            engine,
            out: Vec::with_capacity(64),
            spare: Vec::with_capacity(64),
            attached: Vec::new(),
            armed: false,
            counters: LinkCounters::default(),
            guest,
        };
        for i in 0..rx_bufs {
            ep.post_rx(i);
        }
        if let Some(qp) = ep.qp.as_mut() {
            qp.ring_rq();
        }
        ep
    }

    /// Adds an endpoint for a guest whose Ethernet frames come and go
    /// through `port`. It joins the broadcast group at once if the port is
    /// up.
    pub fn add_guest(
        &mut self,
        cfg: GuestConfig,
        port: Box<dyn HostPort>,
    ) -> Result<EndpointId, LinkError> {
        let parts = Self::create_endpoint(&mut self.hca, true, cfg.zero_copy)?;
        let ep = self.assemble(parts, Some((cfg, port)));
        let id = match self.eps.iter().position(Option::is_none) {
            Some(free) => {
                self.eps[free] = Some(ep);
                free
            }
            None => {
                self.eps.push(Some(ep));
                self.eps.len() - 1
            }
        };
        if self.active {
            self.start_endpoint(id);
        }
        Ok(id)
    }

    /// Another guest took over the endpoint (the VM restarted or
    /// reconnected): its learned MAC and addresses are forgotten. The QP,
    /// and so the IPoIB address remote hosts know, stays.
    pub fn reset_guest(&mut self, id: EndpointId) {
        if let Some(g) = self
            .eps
            .get_mut(id)
            .and_then(Option::as_mut)
            .and_then(|e| e.guest.as_mut())
        {
            g.tr.reset();
        }
    }

    /// Removes a guest's endpoint: its groups are let go (left when no
    /// other endpoint uses them), its QP and queues destroyed and its
    /// buffers freed once nothing points into them. Returns what failed.
    pub fn remove_guest(&mut self, id: EndpointId) -> Vec<String> {
        if id == HOST {
            return vec!["the host endpoint is not removed".into()];
        }
        let Some(ep) = self.eps.get_mut(id).and_then(Option::take) else {
            return vec![format!("no endpoint {id}")];
        };
        self.sa_pending.retain(|_, (e, _)| *e != id);
        self.release_memberships(id);
        self.destroy_endpoint(ep)
    }

    /// Maps a guest's memory regions for its endpoint's QP: one window of
    /// the VM's own, under a key of its protection domain bounded to it
    /// (a window mapped before is removed first). The HCA then gathers
    /// sends straight from the guest's buffers ([`HostPort::recv_lent`]).
    pub fn map_guest_memory(
        &mut self,
        id: EndpointId,
        regions: &[DmaMem],
    ) -> Result<GuestWindow, String> {
        self.unmap_guest_memory(id)?;
        let Link { hca, eps, .. } = self;
        let Some(dom) = eps
            .get_mut(id)
            .and_then(Option::as_mut)
            .and_then(|e| e.dom.as_mut())
        else {
            return Err(format!("endpoint {id} is not a guest's"));
        };
        let w = hca.map_foreign(regions).map_err(|e| e.to_string())?;
        let key = match hca.create_key(dom.pd, w.iova, w.len) {
            Ok(k) => k,
            Err(e) => {
                let _ = hca.unmap_foreign(w);
                return Err(e.to_string());
            }
        };
        let regions = w.pieces.clone();
        dom.window = Some((w, key));
        Ok(GuestWindow { key, regions })
    }

    /// Removes a guest's window once no send gathers from it any more;
    /// if one does not complete in time the mapping stays (it goes with
    /// the endpoint, whose QP's destruction flushes the send).
    pub fn unmap_guest_memory(&mut self, id: EndpointId) -> Result<(), String> {
        let mapped = self
            .eps
            .get(id)
            .and_then(Option::as_ref)
            .and_then(|e| e.dom.as_ref())
            .is_some_and(|d| d.window.is_some());
        if !mapped {
            return Ok(());
        }
        if !self.quiesce_guest(id) {
            return Err("sends from guest memory did not complete: its mapping is kept".into());
        }
        let Link { hca, eps, .. } = self;
        let Some((w, key)) = eps
            .get_mut(id)
            .and_then(Option::as_mut)
            .and_then(|e| e.dom.as_mut())
            .and_then(|d| d.window.take())
        else {
            return Ok(());
        };
        let k = hca.destroy_key(key).map_err(|e| e.to_string());
        let u = hca.unmap_foreign(w).map_err(|e| e.to_string());
        k.and(u)
    }

    /// Makes sure nothing of the HCA's points into a guest's memory: the
    /// packets it lent that wait in the engine are copied in, the posted
    /// sends gathering from it complete, and the receive WQEs holding its
    /// buffers are flushed and the buffers given back (false if the HCA
    /// does not finish within half a second). The endpoint's receive
    /// queue then stays empty until [`Link::resume_guest`]. Call before
    /// the guest's rings or memory table change.
    pub fn quiesce_guest(&mut self, id: EndpointId) -> bool {
        self.quiesce_tx(id) && self.take_back_rx(id, false, &NoHost)
    }

    /// Posts the receive WQEs of a quiesced guest endpoint again, into
    /// the guest's buffers if it lends them now. An endpoint whose WQEs
    /// all point at its own buffers while the guest could lend has them
    /// replaced.
    pub fn resume_guest(&mut self, id: EndpointId) {
        let Some(ep) = self.eps.get_mut(id).and_then(Option::as_mut) else {
            return;
        };
        ep.rx_lend = true;
        let lent = ep.rx_lent.iter().any(|w| w.n > 0);
        if !ep.rx_posted.is_empty()
            && !lent
            && ep.lends_rx().is_some()
            && !self.take_back_rx(id, true, &NoHost)
        {
            return;
        }
        let Some(ep) = self.eps.get_mut(id).and_then(Option::as_mut) else {
            return;
        };
        ep.rx_lend = true;
        if ep.rx_posted.is_empty() && ep.rx_unposted.is_empty() {
            for i in 0..ep.rx_lent.len() {
                ep.post_rx(i);
            }
            if let Some(qp) = ep.qp.as_mut() {
                qp.ring_rq();
            }
        }
    }

    /// A failed QP (an error completion that is not a flush: the HCA put
    /// it in ERR) is brought back: flushed, reset and taken to RTS again
    /// with its QPN, Q_Key and groups, its receive queue posted afresh.
    fn restart(&mut self, id: EndpointId, host: &dyn HostPort) {
        tracing::warn!(endpoint = id, "the endpoint's QP failed: restarting it");
        let Some(ep) = self.eps.get_mut(id).and_then(Option::as_mut) else {
            return;
        };
        ep.qp_failed = false;
        ep.counters.qp_restarts += 1;
        // Sends in flight completed (flushed) when the QP failed.
        ep.reap_sends();
        if self.take_back_rx(id, true, host) {
            self.resume_guest(id);
        }
    }

    /// Empties the endpoint's receive queue when it holds guest buffers
    /// (or always, with `force`): what arrived is delivered, the QP goes
    /// to ERR (flushing every WQE) and back through RESET to RTS with its
    /// QPN, Q_Key and groups, and the guest gets its buffers back.
    fn take_back_rx(&mut self, id: EndpointId, force: bool, host: &dyn HostPort) -> bool {
        self.receive(id, host);
        let Link { hca, eps, .. } = self;
        let Some(ep) = eps.get_mut(id).and_then(Option::as_mut) else {
            return true;
        };
        let holds = ep.rx_lent.iter().any(|w| w.n > 0) || !ep.rx_spare.is_empty();
        if !holds && !force {
            return true;
        }
        ep.rx_lend = false;
        tracing::debug!(endpoint = id, force, "taking guest receive buffers back");
        // The reset forgets posted work: sends complete first.
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while !ep.tx_inflight.is_empty() {
            ep.reap_sends();
            if Instant::now() >= deadline {
                tracing::warn!(endpoint = id, "sends did not complete");
                return false;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        let Some(qp) = ep.qp.as_mut() else {
            return false;
        };
        for g in &ep.attached {
            let _ = qp.detach(hca, *g);
        }
        if let Err(e) = qp.to_error(hca) {
            tracing::warn!(endpoint = id, "moving a QP to ERR: {e}");
            return false;
        }
        // Every posted WQE completes, flushed; a packet that came in just
        // before is dropped with its WQE.
        let mut buf = [Cqe::parse(&[0xF0u8; 64]); 32];
        while !ep.rx_posted.is_empty() {
            let n = ep.rcq.as_mut().map_or(0, |c| c.poll(&mut buf));
            for c in &buf[..n] {
                let Some(i) = ep.rx_posted.pop_front() else {
                    break;
                };
                qp.recv_done();
                let w = std::mem::take(&mut ep.rx_lent[i]);
                ep.rx_spare.extend_from_slice(&w.bufs[..w.n]);
                if c.error.is_none() {
                    ep.counters.rx_no_buffer += 1;
                }
            }
            if n == 0 {
                if Instant::now() >= deadline {
                    tracing::warn!(endpoint = id, "receive WQEs were not flushed");
                    return false;
                }
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        // WQEs that waited for buffers are posted afresh by resume_guest.
        ep.rx_unposted.clear();
        if let Some(g) = ep.guest.as_ref() {
            for b in ep.rx_spare.drain(..) {
                g.port.rx_return(b.token);
            }
        }
        let up = qp.reset(hca).and_then(|()| qp.activate_datagram(hca));
        if let Err(e) = up {
            tracing::warn!(endpoint = id, "restarting a QP: {e}");
            return false;
        }
        for g in &ep.attached {
            if let Err(e) = qp.attach(hca, *g) {
                tracing::warn!("attaching to a multicast group: {e}");
            }
        }
        tracing::debug!(endpoint = id, "guest receive buffers taken back");
        true
    }

    fn quiesce_tx(&mut self, id: EndpointId) -> bool {
        let t = self.hca.transport();
        let Some(ep) = self.eps.get_mut(id).and_then(Option::as_mut) else {
            return true;
        };
        ep.take_back_lent();
        if !ep.lends() {
            return true;
        }
        if let Some(qp) = ep.qp.as_mut() {
            qp.ring_sq(t);
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            ep.reap_sends();
            if !ep.lends() {
                return true;
            }
            if Instant::now() >= deadline {
                tracing::warn!(endpoint = id, "sends from guest memory did not complete");
                return false;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    fn release_memberships(&mut self, id: EndpointId) {
        let groups: Vec<[u8; 16]> = self
            .joined
            .iter()
            .filter(|(_, m)| m.users.contains(&id))
            .map(|(g, _)| *g)
            .collect();
        for g in groups {
            self.leave_group(id, g);
        }
    }

    /// Endpoint `id` is no longer in group `g`: its QP is detached, a
    /// join still on its way no longer applies, and the port leaves at
    /// the SA when no other endpoint uses the group.
    fn leave_group(&mut self, id: EndpointId, g: [u8; 16]) {
        let mut pending = None;
        self.sa_pending.retain(|_, (e, op)| match op {
            SaOp::Join { mgid, state, .. } if *e == id && *mgid == g => {
                pending = Some(*state);
                false
            }
            _ => true,
        });
        // The SA takes requests in order: a join answered after we stopped
        // waiting is undone by a leave sent after it.
        if let Some(state) = pending
            && !self.joined.contains_key(&g)
        {
            let _ = self.sa(sa::mc_leave(g, self.gid, state));
        }
        if let Some(ep) = self.eps.get_mut(id).and_then(Option::as_mut)
            && let Some(at) = ep.attached.iter().position(|a| *a == g)
        {
            ep.attached.swap_remove(at);
            if let Some(qp) = ep.qp.as_ref()
                && let Err(e) = qp.detach(&mut self.hca, g)
            {
                tracing::warn!("detaching from a multicast group: {e}");
            }
        }
        let Some(m) = self.joined.get_mut(&g) else {
            return;
        };
        m.users.retain(|u| *u != id);
        if m.users.is_empty() {
            let state = m.state;
            self.joined.remove(&g);
            let _ = self.sa(sa::mc_leave(g, self.gid, state));
        }
    }

    /// Leaves every port-wide membership (the SA still holds them).
    fn leave_all(&mut self) {
        let joined: Vec<_> = self.joined.drain().collect();
        for (g, m) in joined {
            let _ = self.sa(sa::mc_leave(g, self.gid, m.state));
        }
    }

    fn destroy_endpoint(&mut self, mut ep: Endpoint) -> Vec<String> {
        if let Some(qp) = ep.qp.as_ref() {
            for g in std::mem::take(&mut ep.attached) {
                let _ = qp.detach(&mut self.hca, g);
            }
        }
        // Sends still gathering from a guest finish (or are flushed by the
        // QP's destruction) before its memory is let go; packets the
        // guest lent come back to it.
        ep.take_back_lent();
        let parts = Parts {
            scq: ep.scq.take(),
            rcq: ep.rcq.take(),
            qp: ep.qp.take(),
            rx: ep.rx.take(),
            tx: ep.tx.take(),
            dom: ep.dom.take(),
            log_rq: 0,
        };
        let errors = Self::release_parts(&mut self.hca, parts);
        ep.give_back_inflight();
        errors
    }

    fn host(&self) -> Option<&Endpoint> {
        self.eps.first().and_then(Option::as_ref)
    }

    /// The interface's hardware address.
    pub fn hw_addr(&self) -> HwAddr {
        self.host()
            .map_or(HwAddr([0; 20]), |e| e.engine.config().hw)
    }

    /// Whether the port is active and the broadcast group joined.
    pub fn carrier(&self) -> bool {
        self.active && self.host().is_some_and(|e| e.engine.carrier())
    }

    /// The IPoIB MTU the broadcast group allows (2044 before any join).
    pub fn mtu(&self) -> u32 {
        self.bcast
            .and_then(|b| Datagram::<AddressVector, usize>::mtu_for(b.mtu))
            .unwrap_or(2044)
    }

    /// Whether checksums and TSO are offloaded to the HCA (offer them to
    /// the host).
    pub fn offloads(&self) -> bool {
        self.offload
    }

    /// The port's LID.
    pub fn lid(&self) -> u16 {
        self.lid
    }

    /// The port GID.
    pub fn gid(&self) -> [u8; 16] {
        self.gid
    }

    /// The P_Key.
    pub fn pkey(&self) -> u16 {
        self.pkey
    }

    /// Counters of the host endpoint.
    pub fn counters(&self) -> LinkCounters {
        self.host().map(|e| e.counters).unwrap_or_default()
    }

    /// The host endpoint's engine (neighbours, groups, drop counters).
    pub fn engine(&self) -> &Datagram<AddressVector, usize> {
        // The host endpoint lives as long as the link.
        match self.host() {
            Some(e) => &e.engine,
            None => unreachable!("the host endpoint is only removed by shutdown"),
        }
    }

    /// The guests' endpoints.
    pub fn guests(&self) -> Vec<EndpointId> {
        (1..self.eps.len())
            .filter(|i| self.eps[*i].is_some())
            .collect()
    }

    /// What a guest's endpoint shows.
    pub fn guest(&self, id: EndpointId) -> Option<GuestInfo> {
        let ep = self.eps.get(id)?.as_ref()?;
        let g = ep.guest.as_ref()?;
        Some(GuestInfo {
            hw: ep.engine.config().hw,
            mac: g.tr.mac(),
            addresses: g.tr.addresses().to_vec(),
            remacs: g.tr.remacs().len(),
            counters: ep.counters,
            eth_drops: eth::EthDrop::ALL
                .iter()
                .map(|d| (d.name(), g.tr.drops(*d)))
                .collect(),
            drops: datagram::DropReason::ALL
                .iter()
                .map(|d| (d.name(), ep.engine.drops(*d)))
                .collect(),
        })
    }

    /// Sets the host side's addresses.
    pub fn set_addresses(&mut self, addrs: &[IpAddr]) {
        let (v4, v6) = split_families(addrs);
        let Some(ep) = self.eps.first_mut().and_then(Option::as_mut) else {
            return;
        };
        if v4 != ep.engine.config().ipv4 || v6 != ep.engine.config().ipv6 {
            ep.engine.set_addresses(v4, v6, &mut ep.out);
            self.run_actions(HOST, None);
        }
    }

    /// Sets the host side's IPv4 subnets (address, prefix length): their
    /// directed broadcasts go to the broadcast group.
    pub fn set_subnets(&mut self, subnets: &[(IpAddr, u8)]) {
        let broadcasts = subnets
            .iter()
            .filter_map(|(a, p)| match a {
                IpAddr::V4(v) if *p < 31 => Some(Ipv4Addr::from(u32::from(*v) | (u32::MAX >> p))),
                _ => None,
            })
            .collect();
        if let Some(ep) = self.eps.first_mut().and_then(Option::as_mut) {
            ep.engine.set_broadcasts(broadcasts);
        }
    }

    fn start(&mut self) {
        let _ = self.hca.refresh_ports();
        if let Some(p) = self.hca.info().ports.first() {
            self.lid = p.lid;
            self.sm_lid = p.sm_lid;
            self.active = p.state == PortState::Active;
        }
        if self.active {
            for id in 0..self.eps.len() {
                self.start_endpoint(id);
            }
        }
    }

    fn start_endpoint(&mut self, id: EndpointId) {
        let lid = self.lid;
        if let Some(ep) = self.eps.get_mut(id).and_then(Option::as_mut) {
            ep.engine.start(lid, &mut ep.out);
            self.run_actions(id, None);
        }
    }

    /// One turn of the event loop: HCA events (waiting up to `wait`),
    /// completions, host packets from `host` and guests' frames from their
    /// ports, timers. Returns whether carrier changed.
    pub fn poll(&mut self, host: &dyn HostPort, wait: Duration) -> Result<bool, HcaError> {
        let before = self.carrier();
        // While the port is not active, look at it twice a second: the
        // Active event may have come before the EQ existed, or been missed.
        if !self.active && Instant::now() >= self.next_start {
            self.next_start = Instant::now() + Duration::from_millis(500);
            self.start();
        }
        let wait = if self.busy { Duration::ZERO } else { wait };
        for e in self.hca.poll_events(wait)? {
            match e {
                AsyncEvent::Port { change, .. } => self.port_event(change),
                AsyncEvent::Completion { cqn } => self.completion_event(cqn),
                AsyncEvent::Other(_) => {}
            }
        }
        self.serve_sa();
        let now = Instant::now();
        let timers = now >= self.next_timers;
        if timers {
            // The engine's timers are in seconds; ten runs a second is plenty.
            self.next_timers = now + Duration::from_millis(100);
        }
        let mut moved = 0;
        for id in 0..self.eps.len() {
            if self.eps[id].is_none() {
                continue;
            }
            self.reap_sends(id);
            moved += self.receive(id, host) + self.read_host(id, host);
            if let Some(ep) = self.eps[id].as_mut()
                && ep.refill_rx()
                && let Some(qp) = ep.qp.as_mut()
            {
                qp.ring_rq();
            }
            if self.eps[id].as_ref().is_some_and(|e| e.qp_failed) {
                self.restart(id, host);
            }
            if timers && let Some(ep) = self.eps[id].as_mut() {
                ep.engine.poll(now, &mut ep.out);
            }
            self.run_actions(id, Some(host));
        }
        self.busy = moved > 0;
        Ok(before != self.carrier())
    }

    fn completion_event(&mut self, cqn: u32) {
        for ep in self.eps.iter_mut().flatten() {
            for cq in [ep.rcq.as_mut(), ep.scq.as_mut()].into_iter().flatten() {
                if cq.cqn() == cqn {
                    cq.event();
                    ep.armed = false;
                }
            }
        }
    }

    /// Whether the last turn moved packets (the caller should not sleep).
    pub fn busy(&self) -> bool {
        self.busy
    }

    /// Arms every completion queue so the next completion raises an event
    /// on [`Hca::event_fd`]; call before sleeping.
    pub fn arm(&mut self) {
        let t = self.hca.transport();
        for ep in self.eps.iter_mut().flatten() {
            if ep.armed {
                continue;
            }
            for cq in [ep.rcq.as_mut(), ep.scq.as_mut()].into_iter().flatten() {
                cq.arm(t);
            }
            ep.armed = true;
        }
    }

    /// The HCA's event eventfd, for the caller's wait set.
    pub fn event_fd(&self) -> Option<std::os::fd::RawFd> {
        self.hca.event_fd()
    }

    fn port_event(&mut self, change: PortChange) {
        match change {
            // Flush levels as Linux maps the events (ipoib.md §11.1).
            PortChange::Down => {
                self.active = false;
                self.flush(false);
            }
            PortChange::Active if !self.active => {
                self.flush(false);
                self.start();
            }
            // Own LID changed: every address handle and membership is stale.
            PortChange::LidChange => {
                self.flush(false);
                self.start();
            }
            // P_Key table changed: Linux re-reads the P_Key at the
            // interface's index (a heavy flush); if it moved, the old
            // partition's groups are left and everything follows the new.
            PortChange::PkeyChange => {
                let _ = self.hca.refresh_ports();
                let pkey = self
                    .hca
                    .info()
                    .ports
                    .first()
                    .and_then(|p| p.pkeys.iter().find(|(i, _)| *i == 0).map(|(_, k)| *k));
                match pkey {
                    Some(k) if k != self.pkey => {
                        tracing::info!(old = self.pkey, new = k, "P_Key changed");
                        self.leave_all();
                        self.flush(false);
                        self.pkey = k;
                        for ep in self.eps.iter_mut().flatten() {
                            ep.engine.set_pkey(k);
                            if let Some(g) = ep.guest.as_mut() {
                                g.tr.set_pkey(k);
                            }
                        }
                    }
                    _ => self.flush(false),
                }
                self.start();
            }
            // The SM lost or changed its state: rejoin, refresh paths.
            PortChange::ClientReregister | PortChange::GuidChange => {
                let _ = self.hca.refresh_ports();
                if let Some(p) = self.hca.info().ports.first() {
                    self.sm_lid = p.sm_lid;
                }
                self.flush(true);
            }
            _ => {}
        }
    }

    /// Drops memberships and attachments and flushes the engines: `light`
    /// keeps neighbours and rejoins at once, otherwise everything goes and
    /// `start` rejoins.
    fn flush(&mut self, light: bool) {
        // Answers to requests made before the flush no longer apply.
        self.sa_pending.clear();
        // The SM forgot the memberships (reregister) or the port lost
        // them (down); nothing to leave.
        self.joined.clear();
        self.bcast = None;
        for id in 0..self.eps.len() {
            let Some(ep) = self.eps[id].as_mut() else {
                continue;
            };
            let attached = std::mem::take(&mut ep.attached);
            if let Some(qp) = ep.qp.as_ref() {
                for g in attached {
                    let _ = qp.detach(&mut self.hca, g);
                }
            }
            if light {
                ep.engine.flush_light(&mut ep.out);
            } else {
                ep.engine.flush_normal(&mut ep.out);
            }
            self.run_actions(id, None);
        }
    }

    fn reap_sends(&mut self, id: EndpointId) {
        let Some(ep) = self.eps.get_mut(id).and_then(Option::as_mut) else {
            return;
        };
        ep.reap_sends();
    }

    fn receive(&mut self, id: EndpointId, host: &dyn HostPort) -> usize {
        let mut total = 0;
        for _ in 0..8 {
            let n = self.receive_batch(id, host);
            total += n;
            if n == 0 {
                break;
            }
        }
        total
    }

    fn receive_batch(&mut self, id: EndpointId, host: &dyn HostPort) -> usize {
        let Some(ep) = self.eps.get_mut(id).and_then(Option::as_mut) else {
            return 0;
        };
        let n = ep.receive_batch();
        if n > 0 {
            self.run_actions(id, Some(host));
        }
        n
    }

    fn read_host(&mut self, id: EndpointId, host: &dyn HostPort) -> usize {
        let now = Instant::now();
        let mut read = 0;
        for _ in 0..64 {
            let Some(ep) = self.eps.get_mut(id).and_then(Option::as_mut) else {
                return read;
            };
            // Back-pressure: with the send queue nearly full, leave packets
            // where they are rather than drop them.
            if !ep.can_send() {
                ep.reap_sends();
                if !ep.can_send() {
                    if ep.out.is_empty() {
                        break;
                    }
                    // Sends decided but not posted hold the room: post
                    // them, then look again.
                    self.run_actions(id, Some(host));
                    continue;
                }
            }
            let Some(slot) = ep.pool_free.pop() else {
                break;
            };
            let port: &dyn HostPort = match ep.guest.as_ref() {
                Some(g) => &*g.port,
                None => host,
            };
            match port.recv_lent(&mut ep.pool[slot]) {
                Ok(Received::Copied(n)) if n > VNET_HDR_LEN_MRG => {
                    read += 1;
                    ep.accept(slot, n, None, now);
                }
                // A lent packet must make sense before anything slices it.
                Ok(Received::Lent(l))
                    if l.head > VNET_HDR_LEN_MRG
                        && l.head <= l.len
                        && l.len <= HOST_BUF
                        && l.n <= MAX_LENT =>
                {
                    read += 1;
                    ep.accept(slot, l.head, Some(l), now);
                }
                Ok(Received::Lent(l)) => {
                    ep.counters.tx_errors += 1;
                    ep.pool_free.push(slot);
                    if let Some(g) = ep.guest.as_ref() {
                        g.port.give_back(l.token);
                    }
                }
                Ok(Received::Copied(_)) => ep.pool_free.push(slot),
                Err(e) => {
                    ep.pool_free.push(slot);
                    if e.kind() != io::ErrorKind::WouldBlock {
                        tracing::warn!("reading the host side: {e}");
                    }
                    break;
                }
            }
            if ep.out.len() > 32 {
                self.run_actions(id, Some(host));
            }
        }
        read
    }

    fn sa(&mut self, mad: [u8; 256]) -> Option<[u8; 256]> {
        let d = MadDest {
            dlid: self.sm_lid,
            dqpn: 1,
            sl: 0,
        };
        let gsi = self.gsi.as_mut()?;
        match gsi.transact(&mut self.hca, mad, d, SA_TIMEOUT, SA_TRIES) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::info!("SA transaction failed: {e}");
                if let Some(ep) = self.eps.first_mut().and_then(Option::as_mut) {
                    ep.counters.sa_failures += 1;
                }
                None
            }
        }
    }

    fn run_actions(&mut self, id: EndpointId, host: Option<&dyn HostPort>) {
        let now = Instant::now();
        let Some(ep) = self.eps.get_mut(id).and_then(Option::as_mut) else {
            return;
        };
        // Actions may produce more actions: work on a second buffer so both
        // keep their capacity (no allocation per turn).
        let mut actions = std::mem::take(&mut ep.spare);
        while let Some(ep) = self.eps.get_mut(id).and_then(Option::as_mut) {
            if ep.out.is_empty() {
                break;
            }
            std::mem::swap(&mut actions, &mut ep.out);
            for a in actions.drain(..) {
                match a {
                    Action::Send { dest, payload } => self.send(id, dest, payload),
                    Action::Deliver(slot) => {
                        if let Some(ep) = self.eps.get_mut(id).and_then(Option::as_mut) {
                            ep.deliver(slot, host, now);
                        }
                    }
                    Action::Release(slot) | Action::Dropped(Some(slot), _) => {
                        if let Some(ep) = self.eps.get_mut(id).and_then(Option::as_mut) {
                            ep.free_slot(slot);
                        }
                    }
                    Action::Dropped(None, _) => {}
                    Action::QueryPath(dgid) => self.query_path(id, dgid),
                    Action::Join { mgid, send_only } => self.join(id, mgid, send_only, now),
                    Action::Leave(mgid) => self.leave_group(id, mgid),
                }
            }
        }
        if let Some(ep) = self.eps.get_mut(id).and_then(Option::as_mut) {
            ep.spare = actions;
            // One doorbell for every send this batch posted.
            if let Some(qp) = ep.qp.as_mut() {
                qp.ring_sq(self.hca.transport());
            }
            if let Some(g) = ep.guest.as_mut() {
                if g.tr.take_addresses_changed() {
                    let (v4, v6) = split_families(g.tr.addresses());
                    ep.engine.set_addresses(v4, v6, &mut ep.out);
                }
                // Groups the guest reported listening to are joined fully;
                // those it left are left.
                for l in g.tr.take_listens() {
                    match l {
                        Listen::Join(group) => ep.engine.listen(group, &mut ep.out),
                        Listen::Leave(group) => ep.engine.unlisten(group, &mut ep.out),
                    }
                }
                if !ep.out.is_empty() {
                    self.run_actions(id, host);
                }
            }
        }
    }

    fn query_path(&mut self, id: EndpointId, dgid: [u8; 16]) {
        let tclass = self.bcast.map_or(0, |b| b.tclass);
        let req = sa::path_query(self.gid, dgid, self.pkey, tclass);
        if !self.sa_start(req, id, SaOp::Path(dgid))
            && let Some(ep) = self.eps.get_mut(id).and_then(Option::as_mut)
        {
            ep.engine.path_failed(dgid, &mut ep.out);
        }
    }

    fn join(&mut self, id: EndpointId, g: [u8; 16], send_only: bool, now: Instant) {
        let state = if send_only {
            join::SEND_ONLY_FULL
        } else {
            join::FULL
        };
        let params = self.bcast;
        let req = sa::mc_join(g, self.gid, self.pkey, state, params.as_ref());
        let op = SaOp::Join {
            mgid: g,
            send_only,
            state,
        };
        if !self.sa_start(req, id, op)
            && let Some(ep) = self.eps.get_mut(id).and_then(Option::as_mut)
        {
            ep.engine.join_failed(g, now, &mut ep.out);
        }
    }

    /// Sends an SA request without waiting; the answer comes through
    /// [`Link::serve_sa`].
    fn sa_start(&mut self, mad: [u8; 256], id: EndpointId, op: SaOp) -> bool {
        let d = MadDest {
            dlid: self.sm_lid,
            dqpn: 1,
            sl: 0,
        };
        let Some(gsi) = self.gsi.as_mut() else {
            return false;
        };
        match gsi.start(
            self.hca.transport(),
            Instant::now(),
            mad,
            d,
            SA_TIMEOUT,
            SA_TRIES,
        ) {
            Ok(tid) => {
                self.sa_pending.insert(tid, (id, op));
                true
            }
            Err(e) => {
                tracing::info!("sending an SA request failed: {e:?}");
                if let Some(ep) = self.eps.get_mut(id).and_then(Option::as_mut) {
                    ep.counters.sa_failures += 1;
                }
                false
            }
        }
    }

    /// Whether SA answers are awaited (the caller should wake up soon: the
    /// GSI completion queues are polled, not armed).
    pub fn sa_pending(&self) -> bool {
        !self.sa_pending.is_empty()
    }

    /// Collects SA answers and time-outs and hands them to the engines.
    fn serve_sa(&mut self) {
        if self.sa_pending.is_empty() {
            return;
        }
        let now = Instant::now();
        let Some(gsi) = self.gsi.as_mut() else { return };
        let ev = gsi.process(self.hca.transport(), now);
        for (tid, mad) in ev.responses {
            let Some((id, op)) = self.sa_pending.remove(&tid) else {
                continue; // flushed since
            };
            if MadHeader::parse(&mad).status == 0 {
                self.sa_succeeded(id, op, &mad);
            } else {
                self.sa_failed(id, op, now);
            }
            self.run_actions(id, None);
        }
        for tid in ev.timeouts {
            if let Some((id, op)) = self.sa_pending.remove(&tid) {
                self.sa_failed(id, op, now);
                self.run_actions(id, None);
            }
        }
    }

    fn sa_failed(&mut self, id: EndpointId, op: SaOp, now: Instant) {
        let Some(ep) = self.eps.get_mut(id).and_then(Option::as_mut) else {
            return;
        };
        ep.counters.sa_failures += 1;
        match op {
            SaOp::Path(dgid) => ep.engine.path_failed(dgid, &mut ep.out),
            SaOp::Join { mgid, .. } => ep.engine.join_failed(mgid, now, &mut ep.out),
        }
    }

    fn sa_succeeded(&mut self, id: EndpointId, op: SaOp, mad: &[u8; 256]) {
        let qkey = self.bcast.map_or(QKEY_DEFAULT, |b| b.qkey);
        match op {
            SaOp::Path(dgid) => {
                let p = PathRecord::parse(&mad[sa::SA_DATA..]);
                let av = AddressVector {
                    dqpn: 0,
                    qkey,
                    dlid: p.dlid,
                    sl: p.sl,
                    ..AddressVector::default()
                };
                let now = Instant::now();
                if let Some(ep) = self.eps.get_mut(id).and_then(Option::as_mut) {
                    ep.engine.path_resolved(dgid, av, now, &mut ep.out);
                }
            }
            SaOp::Join {
                mgid: g,
                send_only,
                state,
            } => {
                let rec = McMemberRecord::parse(&mad[sa::SA_DATA..]);
                let m = self.joined.entry(g).or_insert(Membership {
                    state: 0,
                    users: Vec::new(),
                });
                m.state |= state;
                if !m.users.contains(&id) {
                    m.users.push(id);
                }
                let Some(ep) = self.eps.get_mut(id).and_then(Option::as_mut) else {
                    return;
                };
                if g == ep.engine.broadcast_mgid() {
                    if let Some(qp) = ep.qp.as_mut()
                        && let Err(e) = qp.set_qkey(&mut self.hca, rec.qkey)
                    {
                        tracing::warn!("setting the broadcast Q_Key: {e}");
                    }
                    self.bcast = Some(rec);
                    let mtu = Datagram::<AddressVector, usize>::mtu_for(rec.mtu).unwrap_or(2044);
                    if let Some(g) = ep.guest.as_mut() {
                        g.tr.set_mtu(mtu);
                    }
                }
                if !send_only
                    && !ep.attached.contains(&g)
                    && let Some(qp) = ep.qp.as_ref()
                {
                    match qp.attach(&mut self.hca, g) {
                        Ok(()) => ep.attached.push(g),
                        Err(e) => tracing::warn!("attaching to a multicast group: {e}"),
                    }
                }
                let av = AddressVector {
                    dqpn: 0xFF_FFFF,
                    qkey: rec.qkey,
                    dlid: rec.mlid,
                    sl: rec.sl,
                    grh: Some(Grh {
                        dgid: g,
                        hop_limit: rec.hop_limit,
                        tclass: rec.tclass,
                        flow_label: rec.flow_label,
                        sgid_index: 0,
                    }),
                    ..AddressVector::default()
                };
                ep.engine.joined(g, av, &mut ep.out);
            }
        }
    }

    fn send(&mut self, id: EndpointId, dest: Dest<AddressVector>, payload: Payload<usize>) {
        let mtu = self.mtu() as usize;
        let offload = self.offload;
        let Some(ep) = self.eps.get_mut(id).and_then(Option::as_mut) else {
            return;
        };
        ep.send(self.hca.transport(), mtu, offload, dest, payload);
    }

    /// Leaves every group, destroys every HCA object and shuts the HCA
    /// down.
    pub fn shutdown(mut self) -> TeardownReport {
        self.leave_all();
        let mut errors = Vec::new();
        let eps = std::mem::take(&mut self.eps);
        for ep in eps.into_iter().flatten() {
            errors.extend(self.destroy_endpoint(ep));
        }
        if let Some(gsi) = self.gsi.take()
            && let Err(e) = gsi.destroy(&mut self.hca)
        {
            errors.push(format!("destroying the GSI QP: {e}"));
        }
        let mut report = self.hca.shutdown();
        report.errors.extend(errors);
        report
    }
}

fn split_families(addrs: &[IpAddr]) -> (Vec<Ipv4Addr>, Vec<Ipv6Addr>) {
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for a in addrs {
        match a {
            IpAddr::V4(a) => v4.push(*a),
            IpAddr::V6(a) => v6.push(*a),
        }
    }
    (v4, v6)
}

impl Endpoint {
    /// Posts receive WQE `i`: into guest buffers when the guest lends
    /// them, into the endpoint's own buffer `i` otherwise.
    fn post_rx(&mut self, i: usize) {
        if let Some(merge) = self.lends_rx() {
            match self.post_rx_lent(i, merge) {
                RxPost::Posted => return,
                // The guest has no buffers now: the WQE waits for them
                // (refill_rx), as a NIC's ring does.
                RxPost::Waiting => {
                    self.rx_unposted.push(i);
                    return;
                }
                RxPost::Refused => {}
            }
        }
        self.post_own_rx(i);
    }

    /// Posts receive WQE `i` into the endpoint's own buffer `i`.
    fn post_own_rx(&mut self, i: usize) {
        let (Some(qp), Some(rx)) = (self.qp.as_mut(), self.rx.as_ref()) else {
            return;
        };
        let sge = Sge {
            addr: rx.iova_at(i * RX_BUF).0,
            len: RX_BUF as u32,
            lkey: self.rx_key,
        };
        if qp.post_recv(&[sge]).is_ok() {
            self.rx_posted.push_back(i);
        }
    }

    /// Whether new receive WQEs take guest buffers (a guest endpoint whose
    /// VM's memory is mapped, sized for it, not being quiesced), and if so
    /// whether a packet may span several of them (mergeable buffers).
    fn lends_rx(&self) -> Option<bool> {
        let sized = self.rx_lent.len() == 1 << LOG_RQ_LENT;
        let mapped = self.dom.as_ref().is_some_and(|d| d.window.is_some());
        if !(self.rx_lend && sized && mapped) {
            return None;
        }
        self.guest.as_ref()?.port.rx_ready()
    }

    /// Posts the WQEs that waited for guest buffers, as far as the guest
    /// has lent them; true if any was posted (the RQ needs a doorbell).
    fn refill_rx(&mut self) -> bool {
        if self.rx_unposted.is_empty() {
            return false;
        }
        let Some(merge) = self.lends_rx() else {
            // Not lending any more: the endpoint's own buffers take them.
            for i in std::mem::take(&mut self.rx_unposted) {
                self.post_own_rx(i);
            }
            return true;
        };
        let mut any = false;
        while let Some(&i) = self.rx_unposted.last() {
            match self.post_rx_lent(i, merge) {
                RxPost::Waiting => break,
                RxPost::Posted => {}
                RxPost::Refused => self.post_own_rx(i),
            }
            self.rx_unposted.pop();
            any = true;
        }
        any
    }

    /// Posts WQE `i` as GRH and IPoIB header into the endpoint's buffer
    /// `i`, then guest buffers (from past the room for the virtio-net and
    /// Ethernet headers) for the largest packet: several with mergeable
    /// buffers (`merge`), else one that holds it all.
    fn post_rx_lent(&mut self, i: usize, merge: bool) -> RxPost {
        let (Some(g), Some(rx)) = (self.guest.as_ref(), self.rx.as_ref()) else {
            return RxPost::Refused;
        };
        let (most, min_cap) = if merge {
            (MAX_RX_PIECES, VNET_HDR_LEN_MRG)
        } else {
            (1, GUEST_RX_ROOM)
        };
        let mut w = RxLent::default();
        let mut pieces = 0;
        let mut cap = 0;
        let mut short = RxPost::Waiting;
        while cap < GUEST_RX_ROOM && w.n < most {
            let b = match self.rx_spare.pop() {
                Some(b) => b,
                None => {
                    let mut b = GuestBuf::default();
                    match g.port.lend_rx(min_cap as u32, &mut b.sges) {
                        Lend::Lent(token, n, c) => {
                            (b.token, b.n, b.cap) = (token, n, c as usize);
                            b
                        }
                        Lend::Empty => break,
                        Lend::Refused => {
                            short = RxPost::Refused;
                            break;
                        }
                    }
                }
            };
            if pieces + b.n > MAX_RX_PIECES {
                // It starts the next WQE.
                self.rx_spare.push(b);
                break;
            }
            w.bufs[w.n] = b;
            w.n += 1;
            pieces += b.n;
            cap += b.cap;
        }
        if cap < GUEST_RX_ROOM {
            self.rx_spare.extend_from_slice(&w.bufs[..w.n]);
            return short;
        }
        let mut sges = [Sge::default(); RX_SGES as usize];
        sges[0] = Sge {
            addr: rx.iova_at(i * RX_BUF).0,
            len: 40,
            lkey: self.rx_key,
        };
        sges[1] = Sge {
            addr: rx.iova_at(i * RX_BUF + 40).0,
            len: engine::IPOIB_HEADER_LEN as u32,
            lkey: self.rx_key,
        };
        let mut n = 2;
        let mut skip = GUEST_RX_SKIP as u32;
        for s in w.bufs[..w.n].iter().flat_map(|b| &b.sges[..b.n]) {
            let cut = skip.min(s.len);
            skip -= cut;
            if cut < s.len {
                sges[n] = Sge {
                    addr: s.addr + u64::from(cut),
                    len: s.len - cut,
                    lkey: s.lkey,
                };
                n += 1;
            }
        }
        let posted = self.qp.as_mut().map(|qp| qp.post_recv(&sges[..n]));
        if !matches!(posted, Some(Ok(()))) {
            self.rx_spare.extend_from_slice(&w.bufs[..w.n]);
            return RxPost::Refused;
        }
        self.rx_lent[i] = w;
        self.rx_posted.push_back(i);
        RxPost::Posted
    }

    /// Send slots and SQ space are left for a burst of the largest sends,
    /// besides the sends the engine decided and that wait in `out`.
    fn can_send(&self) -> bool {
        let want = TX_HEADROOM + self.out.len();
        self.tx_free.len() >= want
            && self
                .qp
                .as_ref()
                .is_some_and(|q| usize::from(q.send_free()) >= want * usize::from(MAX_WQE_BBS))
    }

    fn reap_sends(&mut self) {
        let Some(scq) = self.scq.as_mut() else { return };
        let mut buf = [Cqe::parse(&[0xF0u8; 64]); 32];
        loop {
            let n = scq.poll(&mut buf);
            for c in &buf[..n] {
                if c.error.is_some() {
                    self.counters.tx_errors += 1;
                }
                self.qp_failed |= c.error.is_some_and(|e| e != CqeError::WrFlushed);
                if let Some(qp) = self.qp.as_mut() {
                    qp.send_done(c.wqe_counter);
                }
                if let Some((slot, lent)) = self.tx_inflight.pop_front() {
                    self.tx_free.push(slot);
                    if let (Some(token), Some(g)) = (lent, self.guest.as_ref()) {
                        g.port.give_back(token);
                    }
                }
            }
            if n < buf.len() {
                break;
            }
        }
    }

    /// Reaps up to one batch of receive completions into the engine.
    fn receive_batch(&mut self) -> usize {
        let Some(rcq) = self.rcq.as_mut() else {
            return 0;
        };
        let mut buf = [Cqe::parse(&[0xF0u8; 64]); 32];
        let n = rcq.poll(&mut buf);
        if n == 0 {
            return 0;
        }
        let now = Instant::now();
        // A guest's packets land past room for the Ethernet header.
        let start = if self.guest.is_some() {
            eth::ETH_HLEN
        } else {
            0
        };
        for c in &buf[..n] {
            let Some(i) = self.rx_posted.pop_front() else {
                break;
            };
            if let Some(qp) = self.qp.as_mut() {
                qp.recv_done();
            }
            if self.rx_lent[i].n > 0 {
                self.receive_lent(i, c, now);
                self.post_rx(i);
                continue;
            }
            if c.error.is_some() {
                self.counters.rx_errors += 1;
                self.qp_failed |= c.error.is_some_and(|e| e != CqeError::WrFlushed);
                self.post_rx(i);
                continue;
            }
            let len = (c.byte_cnt as usize).clamp(40, RX_BUF) - 40;
            self.counters.rx_packets += 1;
            self.counters.rx_bytes += len as u64;
            if len < engine::IPOIB_HEADER_LEN {
                self.counters.rx_errors += 1;
                self.post_rx(i);
                continue;
            }
            let Some(slot) = self.pool_free.pop() else {
                self.counters.rx_no_buffer += 1;
                self.post_rx(i);
                continue;
            };
            let mut grh = [0u8; 40];
            let body = len.saturating_sub(engine::IPOIB_HEADER_LEN);
            let mut hdr = [0u8; engine::IPOIB_HEADER_LEN];
            let data = start + VNET_HDR_LEN_MRG;
            if let Some(rx) = self.rx.as_ref() {
                rx.read(i * RX_BUF, &mut grh);
                rx.read(i * RX_BUF + 40, &mut hdr);
                let p = &mut self.pool[slot];
                p[start..data].fill(0);
                rx.read(i * RX_BUF + 44, &mut p[data..data + body]);
            }
            self.post_rx(i);
            let ty = u16::from_be_bytes([hdr[0], hdr[1]]);
            self.take_in(slot, c, &grh, ty, start, body, body, now);
        }
        if let Some(qp) = self.qp.as_mut() {
            qp.ring_rq();
        }
        n
    }

    /// A completion of receive WQE `i`, whose packet the HCA wrote into
    /// guest buffers: its headers are copied for the engine (the whole of
    /// ARP and ICMPv6), the buffers it filled are held with its slot, the
    /// others kept for the next WQE.
    fn receive_lent(&mut self, i: usize, c: &Cqe, now: Instant) {
        let mut held = std::mem::take(&mut self.rx_lent[i]);
        let len = (c.byte_cnt as usize).clamp(40, RX_BUF) - 40;
        let ok = c.error.is_none() && len >= engine::IPOIB_HEADER_LEN;
        let failed = c.error.is_some_and(|e| e != CqeError::WrFlushed);
        self.qp_failed |= failed;
        if failed || (c.error.is_none() && !ok) {
            self.counters.rx_errors += 1;
        }
        let slot = if ok { self.pool_free.pop() } else { None };
        let Some(slot) = slot else {
            if ok {
                self.counters.rx_no_buffer += 1;
            }
            self.rx_spare.extend_from_slice(&held.bufs[..held.n]);
            return;
        };
        self.counters.rx_packets += 1;
        self.counters.rx_bytes += len as u64;
        let body = len - engine::IPOIB_HEADER_LEN;
        // The buffers past those the packet filled go back to the spares.
        let mut room = GUEST_RX_SKIP + body;
        let mut filled = 0;
        for b in &held.bufs[..held.n] {
            if room == 0 {
                self.rx_spare.push(*b);
                continue;
            }
            room = room.saturating_sub(b.cap);
            filled += 1;
        }
        held.n = filled;
        let (mut grh, mut hdr) = ([0u8; 40], [0u8; engine::IPOIB_HEADER_LEN]);
        if let Some(rx) = self.rx.as_ref() {
            rx.read(i * RX_BUF, &mut grh);
            rx.read(i * RX_BUF + 40, &mut hdr);
        }
        let ty = u16::from_be_bytes([hdr[0], hdr[1]]);
        let start = eth::ETH_HLEN;
        let data = start + VNET_HDR_LEN_MRG;
        let port = self.guest.as_ref().map(|g| &*g.port);
        let p = &mut self.pool[slot];
        let mut peek = body.min(RX_PEEK);
        let mut read =
            port.is_some_and(|g| read_lent(g, &held, GUEST_RX_SKIP, &mut p[data..data + peek]));
        let whole = ty == engine::ethertype::ARP
            || (ty == engine::ethertype::IPV6 && peek > 6 && matches!(p[data + 6], 0 | 58))
            || (ty == engine::ethertype::IPV4 && engine::dhcp::bootp_ports(&p[data..data + peek]));
        if read && whole && peek < body {
            peek = body;
            read =
                port.is_some_and(|g| read_lent(g, &held, GUEST_RX_SKIP, &mut p[data..data + peek]));
        }
        if !read {
            self.counters.rx_errors += 1;
            self.rx_spare.extend_from_slice(&held.bufs[..held.n]);
            self.pool_free.push(slot);
            return;
        }
        held.peek = peek;
        self.slot_rx[slot] = held;
        self.take_in(slot, c, &grh, ty, start, body, peek, now);
    }

    /// Hands a received packet in pool buffer `slot` (its IPoIB payload
    /// of `body` bytes from `start` + the virtio-net header on, the first
    /// `peek` of them there) to the engine, noting who sent it.
    #[allow(clippy::too_many_arguments)]
    fn take_in(
        &mut self,
        slot: usize,
        c: &Cqe,
        grh: &[u8; 40],
        ty: u16,
        start: usize,
        body: usize,
        peek: usize,
        now: Instant,
    ) {
        let has_grh = c.grh();
        let multicast = has_grh && grh[24] == 0xFF;
        let mut sgid = [0u8; 16];
        sgid.copy_from_slice(&grh[8..24]);
        let data = start + VNET_HDR_LEN_MRG;
        self.slots[slot] = Slot {
            start,
            end: data + body,
            ty,
            csum_ok: c.ip_csum_ok(),
            lent: None,
            from: Some(Sender {
                slid: c.slid,
                sqpn: c.src_qpn(),
                sgid: has_grh.then_some(sgid),
                multicast,
            }),
        };
        let src = Source {
            slid: c.slid,
            sqpn: c.src_qpn(),
            multicast,
        };
        let bytes = &self.pool[slot][data..data + peek];
        self.engine
            .receive(src, ty, bytes, slot, now, &mut self.out);
    }

    /// Hands a packet the HCA wrote into guest buffers to the guest: the
    /// virtio-net and Ethernet headers are written before it (or the
    /// rewritten ARP or ND message over it), and the buffers it fills go
    /// on the used ring.
    fn deliver_lent(&mut self, slot: usize, now: Instant) {
        let s = self.slots[slot];
        let mut held = std::mem::take(&mut self.slot_rx[slot]);
        let Some(g) = self.guest.as_mut() else {
            self.pool_free.push(slot);
            return;
        };
        let data = s.start + VNET_HDR_LEN_MRG;
        let body = s.end - data;
        let from = s.from.unwrap_or(Sender {
            slid: 0,
            sqpn: 0,
            sgid: None,
            multicast: false,
        });
        let p = &self.pool[slot];
        let port = &*g.port;
        let total = match g
            .tr
            .to_guest(from, s.ty, &p[data..data + held.peek], &mut g.scratch, now)
        {
            Ok(GuestRx::Header(h)) => {
                let frame = eth::ETH_HLEN + body;
                let pad = eth::ETH_MIN_FRAME.saturating_sub(frame);
                let zeros = [0u8; eth::ETH_MIN_FRAME];
                (write_lent(port, &held, VNET_HDR_LEN_MRG, &h)
                    && write_lent(port, &held, GUEST_RX_SKIP + body, &zeros[..pad]))
                .then_some(VNET_HDR_LEN_MRG + frame + pad)
            }
            Ok(GuestRx::Rewritten(n)) => write_lent(port, &held, VNET_HDR_LEN_MRG, &g.scratch[..n])
                .then_some(VNET_HDR_LEN_MRG + n),
            // Counted by the translator.
            Err(_) => None,
        };
        let used = total.map(|total| {
            let mut used = [(0u16, 0u32); MAX_RX_PIECES];
            let mut left = total;
            let mut n = 0;
            for b in &held.bufs[..held.n] {
                let take = left.min(b.cap);
                if take == 0 {
                    self.rx_spare.push(*b);
                    continue;
                }
                used[n] = (b.token, take as u32);
                n += 1;
                left -= take;
            }
            (used, n)
        });
        match used {
            Some((used, n)) => {
                let mut hdr = [0u8; VNET_HDR_LEN_MRG];
                if s.csum_ok {
                    hdr[0] = vnet::F_DATA_VALID;
                }
                // num_buffers: the buffers the frame spans.
                hdr[10..12].copy_from_slice(&(n as u16).to_le_bytes());
                if port.rx_done(hdr, &used[..n]) {
                    self.counters.rx_delivered += 1;
                    self.counters.rx_zero_copy += 1;
                } else {
                    self.counters.rx_errors += 1;
                }
            }
            None => {
                held.n = held.n.min(MAX_RX_PIECES);
                self.rx_spare.extend_from_slice(&held.bufs[..held.n]);
            }
        }
        self.pool_free.push(slot);
    }

    /// Takes a packet of `n` bytes just read into pool buffer `slot` from
    /// the host side into the engine; of a `lent` one, `n` bytes are here
    /// and the rest in the guest's buffer.
    fn accept(&mut self, slot: usize, n: usize, lent: Option<Lent>, now: Instant) {
        let Some(g) = self.guest.as_mut() else {
            self.slots[slot] = Slot {
                start: 0,
                end: n,
                ..Slot::default()
            };
            let bytes = &self.pool[slot][VNET_HDR_LEN_MRG..n];
            self.engine.transmit(bytes, slot, now, &mut self.out);
            return;
        };
        let p = &mut self.pool[slot];
        // The translation sees what was copied: for a lent packet, its
        // Ethernet, IP and transport headers. Those copies are what the
        // HCA sends, so the guest cannot change them after the checks.
        let frame = &p[VNET_HDR_LEN_MRG..n];
        let slot_end = lent.map_or(n, |l| l.len);
        let result = g.tr.from_guest(frame, &mut g.scratch, now);
        // Larger than the MTU (and not for the HCA to segment): the guest
        // hears so by ICMP, as from a router, and lowers its PMTU.
        let gso =
            VnetHdr::parse(&p[..VNET_HDR_LEN_MRG]).is_some_and(|h| h.gso_type != vnet::GSO_NONE);
        if matches!(result, Ok(GuestTx::Forward { .. }))
            && !gso
            && let Some(k) = g.tr.packet_too_big(
                &p[VNET_HDR_LEN_MRG..n],
                slot_end - VNET_HDR_LEN_MRG,
                &mut g.scratch[VNET_HDR_LEN_MRG..],
            )
        {
            self.counters.tx_too_big += 1;
            g.scratch[..VNET_HDR_LEN_MRG].fill(0);
            if let Err(e) = g.port.send(&g.scratch[..VNET_HDR_LEN_MRG + k]) {
                tracing::debug!("writing an ICMP error to a guest: {e}");
            }
            self.slots[slot].lent = lent;
            self.free_slot(slot);
            return;
        }
        match result {
            Ok(GuestTx::Forward { to, ethertype }) => {
                // The virtio-net header moves to just before the IP packet,
                // its offsets without the Ethernet header.
                let hdr = VnetHdr::parse(&p[..VNET_HDR_LEN_MRG])
                    .and_then(|h| h.without_link_header(eth::ETH_HLEN as u16));
                let Some(hdr) = hdr else {
                    self.counters.tx_bad_offload += 1;
                    self.slots[slot].lent = lent;
                    self.free_slot(slot);
                    return;
                };
                let at = eth::ETH_HLEN;
                let mut h = [0u8; 10];
                hdr.write(&mut h);
                p[at..at + 10].copy_from_slice(&h);
                p[at + 10..at + VNET_HDR_LEN_MRG].fill(0);
                self.slots[slot] = Slot {
                    start: at,
                    end: slot_end,
                    lent,
                    ..Slot::default()
                };
                self.engine
                    .send_to(to, Payload::Host(slot, ethertype), now, &mut self.out);
            }
            Ok(GuestTx::Rewritten { to, ethertype, len }) if lent.is_none() => {
                p[..VNET_HDR_LEN_MRG].fill(0);
                p[VNET_HDR_LEN_MRG..VNET_HDR_LEN_MRG + len].copy_from_slice(&g.scratch[..len]);
                self.slots[slot] = Slot {
                    start: 0,
                    end: VNET_HDR_LEN_MRG + len,
                    ..Slot::default()
                };
                self.engine
                    .send_to(to, Payload::Host(slot, ethertype), now, &mut self.out);
            }
            // Only frames eth::lendable says are never rewritten are lent:
            // a rewrite of a lent packet would be of part of it. Refused.
            Ok(GuestTx::Rewritten { .. }) => {
                self.counters.tx_bad_offload += 1;
                self.slots[slot].lent = lent;
                self.free_slot(slot);
            }
            // Counted by the translator.
            Err(_) => {
                self.slots[slot].lent = lent;
                self.free_slot(slot);
            }
        }
    }

    /// Returns a pool buffer; a lent packet in it goes back to the guest.
    fn free_slot(&mut self, slot: usize) {
        if let Some(l) = self.slots[slot].lent.take()
            && let Some(g) = self.guest.as_ref()
        {
            g.port.give_back(l.token);
        }
        let held = std::mem::take(&mut self.slot_rx[slot]);
        self.rx_spare.extend_from_slice(&held.bufs[..held.n]);
        self.pool_free.push(slot);
    }

    /// Packets waiting in the engine (for a path, say) stop borrowing
    /// guest memory: the rest of each is copied in and the guest's buffer
    /// given back. One that cannot be had is sent empty-handed: dropped.
    fn take_back_lent(&mut self) {
        let Some(g) = self.guest.as_ref() else { return };
        for (slot, s) in self.slots.iter_mut().enumerate() {
            let Some(l) = s.lent.take() else { continue };
            let buf = &mut self.pool[slot];
            let ok = l.head <= l.len
                && l.len <= buf.len()
                && g.port.copy_back(l.token, l.head, &mut buf[l.head..l.len]);
            if !ok {
                g.port.give_back(l.token);
                s.end = 0;
            }
        }
    }

    /// Gives back the lent packets of sends that will never complete (the
    /// QP is gone).
    fn give_back_inflight(&mut self) {
        for (slot, lent) in std::mem::take(&mut self.tx_inflight) {
            self.tx_free.push(slot);
            if let (Some(token), Some(g)) = (lent, self.guest.as_ref()) {
                g.port.give_back(token);
            }
        }
    }

    /// Whether a posted send still gathers from a guest's memory.
    fn lends(&self) -> bool {
        self.tx_inflight.iter().any(|(_, l)| l.is_some())
    }

    /// Hands a received packet to the host side (the TUN device, or the
    /// guest after translation) and frees its buffer.
    fn deliver(&mut self, slot: usize, host: Option<&dyn HostPort>, now: Instant) {
        if self.slot_rx[slot].n > 0 {
            return self.deliver_lent(slot, now);
        }
        let s = self.slots[slot];
        let p = &mut self.pool[slot];
        let frame = match self.guest.as_mut() {
            None => {
                let Some(host) = host else {
                    self.pool_free.push(slot);
                    return;
                };
                if s.csum_ok {
                    // The kernel need not check what the HCA verified.
                    p[s.start] = vnet::F_DATA_VALID;
                }
                match host.send(&p[s.start..s.end]) {
                    Ok(_) => self.counters.rx_delivered += 1,
                    Err(e) => tracing::debug!("writing to the host: {e}"),
                }
                self.pool_free.push(slot);
                return;
            }
            Some(g) => {
                let data = s.start + VNET_HDR_LEN_MRG;
                let from = s.from.unwrap_or(Sender {
                    slid: 0,
                    sqpn: 0,
                    sgid: None,
                    multicast: false,
                });
                match g
                    .tr
                    .to_guest(from, s.ty, &p[data..s.end], &mut g.scratch, now)
                {
                    Ok(GuestRx::Header(h)) => {
                        // vnet header, then Ethernet header, then the packet
                        // where the HCA's data was copied.
                        p[..VNET_HDR_LEN_MRG].fill(0);
                        if s.csum_ok {
                            p[0] = vnet::F_DATA_VALID;
                        }
                        p[VNET_HDR_LEN_MRG..data].copy_from_slice(&h);
                        let min = VNET_HDR_LEN_MRG + eth::ETH_MIN_FRAME;
                        if s.end < min {
                            p[s.end..min].fill(0);
                        }
                        Some(s.end.max(min))
                    }
                    Ok(GuestRx::Rewritten(n)) => {
                        p[..VNET_HDR_LEN_MRG].fill(0);
                        p[VNET_HDR_LEN_MRG..VNET_HDR_LEN_MRG + n].copy_from_slice(&g.scratch[..n]);
                        Some(VNET_HDR_LEN_MRG + n)
                    }
                    Err(_) => None,
                }
                .map(|end| (end, &*g.port))
            }
        };
        if let Some((end, port)) = frame {
            match port.send(&p[..end]) {
                Ok(_) => self.counters.rx_delivered += 1,
                Err(e) => {
                    self.counters.rx_no_buffer += 1;
                    tracing::debug!("writing to a guest: {e}");
                }
            }
        }
        self.pool_free.push(slot);
    }

    fn send<T: Transport>(
        &mut self,
        t: &T,
        mtu: usize,
        offload: bool,
        dest: Dest<AddressVector>,
        payload: Payload<usize>,
    ) {
        let ty = payload.ethertype();
        let (plan, len, lent) = match &payload {
            Payload::Host(p, _) => {
                // Slots are read in place: a lent packet's is large.
                let s = &self.slots[*p];
                if s.end < s.start + VNET_HDR_LEN_MRG {
                    // Lost when it was taken back from a guest.
                    self.counters.tx_errors += 1;
                    self.release(payload);
                    return;
                }
                // What is in the pool: all of it, or a lent packet's head.
                let b = &self.pool[*p][s.start..s.here()];
                let hdr = VnetHdr::parse(b).unwrap_or_default();
                let packet = &b[VNET_HDR_LEN_MRG.min(b.len())..];
                let len = s.end - s.start - VNET_HDR_LEN_MRG;
                (
                    vnet::plan(&hdr, packet),
                    len,
                    s.lent.as_ref().map(|l| l.token),
                )
            }
            Payload::Control(c) => (Ok(TxPlan::Plain), c.bytes().len(), None),
        };
        let plan = match plan {
            Ok(TxPlan::Plain) => TxPlan::Plain,
            Ok(p) if offload => p,
            // Offloads asked for but not offered to the host: refuse.
            Ok(_) | Err(_) => {
                self.counters.tx_bad_offload += 1;
                self.release(payload);
                return;
            }
        };
        let wire_max = match plan {
            TxPlan::Lso { mss, headers, .. } => headers + usize::from(mss),
            _ => len,
        };
        if wire_max > mtu {
            // A UD send longer than the path MTU would fail on the HCA and
            // take the QP to the error state; Linux drops these too.
            self.counters.tx_too_big += 1;
            self.release(payload);
            return;
        }
        let av = match dest {
            Dest::Unicast { ah, qpn } => AddressVector { dqpn: qpn, ..ah },
            Dest::Multicast { ah, .. } => ah,
        };
        if self.tx_free.is_empty() {
            // Out of slots mid-batch: what is posted goes now.
            if let Some(qp) = self.qp.as_mut() {
                qp.ring_sq(t);
            }
            self.reap_sends();
        }
        let Some(slot) = self.tx_free.pop() else {
            self.counters.tx_no_buffer += 1;
            self.release(payload);
            return;
        };
        let mut hdr = [0u8; engine::IPOIB_HEADER_LEN];
        engine::write_header(&mut hdr, ty);
        let (Some(tx), Some(qp)) = (self.tx.as_ref(), self.qp.as_mut()) else {
            // Only after shutdown began; nothing is lost that was not going.
            self.tx_free.push(slot);
            self.release(payload);
            return;
        };
        let base = slot * TX_SLOT;
        let tx_key = self.tx_key;
        let mut inline = [0u8; vnet::MAX_LSO_HEADERS];
        // The send slot's bytes first, then what a lent packet has left in
        // the guest's buffer.
        let mut sges = [Sge::default(); 1 + MAX_LENT];
        let mut n = 0;
        let mut put = |sge: Sge| {
            if sge.len > 0 {
                sges[n] = sge;
                n += 1;
            }
        };
        let off = match (&payload, plan) {
            (Payload::Host(p, _), TxPlan::Lso { mss, headers, v4 }) => {
                // The headers go inline in the WQE; the gather list holds
                // the TCP payload only.
                let s = &self.slots[*p];
                let pkt = &self.pool[*p][s.start + VNET_HDR_LEN_MRG..s.here()];
                inline[..hdr.len()].copy_from_slice(&hdr);
                inline[hdr.len()..hdr.len() + headers].copy_from_slice(&pkt[..headers]);
                let data = &pkt[headers..pkt.len().min(headers + TX_SLOT)];
                tx.write(base, data);
                put(Sge {
                    addr: tx.iova_at(base).0,
                    len: data.len() as u32,
                    lkey: tx_key,
                });
                self.counters.tx_lso += 1;
                TxOffload {
                    l3_csum: v4,
                    l4_csum: true,
                    lso: Some((mss, &inline[..hdr.len() + headers])),
                }
            }
            (payload, plan) => {
                tx.write(base, &hdr);
                let body: &[u8] = match payload {
                    Payload::Host(p, _) => {
                        let s = &self.slots[*p];
                        let from = s.start + VNET_HDR_LEN_MRG;
                        &self.pool[*p][from..s.here().min(from + TX_SLOT - hdr.len())]
                    }
                    Payload::Control(c) => c.bytes(),
                };
                tx.write(base + hdr.len(), body);
                put(Sge {
                    addr: tx.iova_at(base).0,
                    len: (hdr.len() + body.len()) as u32,
                    lkey: tx_key,
                });
                match plan {
                    TxPlan::Checksum { l3 } => {
                        self.counters.tx_csum += 1;
                        TxOffload {
                            l3_csum: l3,
                            l4_csum: true,
                            lso: None,
                        }
                    }
                    _ => TxOffload::default(),
                }
            }
        };
        if let Payload::Host(p, _) = &payload
            && let Some(l) = self.slots[*p].lent.as_ref()
        {
            for sge in &l.sges[..l.n.min(MAX_LENT)] {
                put(*sge);
            }
        }
        let sges = &sges[..n];
        let posted = if off == TxOffload::default() {
            qp.post_send_ud(&av, sges, true)
        } else {
            qp.post_send_ud_offload(&av, sges, true, &off)
        };
        match posted {
            Ok(_) => {
                // The doorbell is rung once for the batch (run_actions).
                self.tx_inflight.push_back((slot, lent));
                self.counters.tx_packets += 1;
                self.counters.tx_bytes += len as u64 + hdr.len() as u64;
                if let Payload::Host(p, _) = &payload
                    && self.slots[*p].lent.take().is_some()
                {
                    // The guest's buffer comes back at completion.
                    self.counters.tx_zero_copy += 1;
                }
            }
            Err(_) => {
                self.tx_free.push(slot);
                self.counters.tx_no_buffer += 1;
            }
        }
        self.release(payload);
    }

    fn release(&mut self, payload: Payload<usize>) {
        if let Payload::Host(p, _) = payload {
            self.free_slot(p);
        }
    }
}

/// Reads bytes `off..off + out.len()` of the guest buffers `held` (laid
/// end to end) through `port`.
fn read_lent(port: &dyn HostPort, held: &RxLent, off: usize, out: &mut [u8]) -> bool {
    lent_pieces(held, off, out.len(), |token, at, from, n| {
        port.rx_read(token, at, &mut out[from..from + n])
    })
}

/// Writes `data` at `off` of the guest buffers `held` through `port`.
fn write_lent(port: &dyn HostPort, held: &RxLent, off: usize, data: &[u8]) -> bool {
    lent_pieces(held, off, data.len(), |token, at, from, n| {
        port.rx_write(token, at, &data[from..from + n])
    })
}

/// Splits `off..off + len` of the buffers `held` into per-buffer pieces:
/// `f(token, offset in the buffer, offset in the range, length)`.
fn lent_pieces(
    held: &RxLent,
    off: usize,
    len: usize,
    mut f: impl FnMut(u16, usize, usize, usize) -> bool,
) -> bool {
    let mut at = 0usize;
    let mut done = 0usize;
    for b in &held.bufs[..held.n] {
        let (lo, hi) = (at.max(off), (at + b.cap).min(off + len));
        if lo < hi {
            if !f(b.token, lo - at, lo - off, hi - lo) {
                return false;
            }
            done += hi - lo;
        }
        at += b.cap;
    }
    done == len
}

/// A host side with nothing to give or take (guest endpoints deliver to
/// their own ports).
struct NoHost;

impl HostPort for NoHost {
    fn recv(&self, _buf: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }

    fn send(&self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
}
