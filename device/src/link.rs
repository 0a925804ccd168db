//! One IPoIB interface in datagram mode on an HCA port: the engine of
//! [`crate::engine::datagram`] wired to a UD QP, the SA client and the
//! host side ([`HostPort`]: the TUN device in the daemon).
//!
//! Buffers are allocated once: receive buffers of GRH + IB MTU in DMA
//! memory, send slots in DMA memory, and a pool of host packet buffers
//! that TUN reads land in. Packets are named by pool index while they wait
//! in the engine's queues, so the data path does not allocate.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use mlx5_driver::Hca;
use mlx5_driver::cmd::qp::ServiceType;
use mlx5_driver::hca::{AsyncEvent, HcaError, TeardownReport};
use mlx5_driver::layout::cqe::Cqe;
use mlx5_driver::layout::eqe::PortChange;
use mlx5_driver::layout::smp::PortState;
use mlx5_driver::layout::wqe::{AddressVector, Grh, Sge};
use mlx5_driver::sa::{self, Gsi, MadDest, MadHeader, McMemberRecord, PathRecord, join};
use mlx5_driver::transport::tun::{Tun, VNET_HDR_LEN_MRG};
use mlx5_driver::transport::{DmaBuffer, Transport};
use mlx5_driver::verbs::{Cq, Qp, QpConfig, TxOffload};

use crate::engine::addr::HwAddr;
use crate::engine::datagram::{self, Action, Datagram, Dest, Payload, Source};
use crate::engine::{self, mgid};
use crate::vnet::{self, TxPlan, VnetHdr};

/// GRH area + the largest IB MTU.
const RX_BUF: usize = 40 + 4096;
/// Receive buffers (the RQ holds 2^LOG_RQ WQEs).
const RX_BUFS: usize = 256;
const LOG_RQ: u8 = 8;
/// Send slots: IPoIB header + payload, up to a 64 KiB TSO packet.
const TX_SLOT: usize = 64 * 1024 + 512;
const TX_SLOTS: usize = 128;
const LOG_SQ: u8 = 7;
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

/// The host side of an interface: where packets to transmit come from and
/// received ones go, each behind a 12-byte virtio-net header. The daemon
/// uses a [`Tun`] device; tests can use a queue.
pub trait HostPort {
    /// Reads one packet; `WouldBlock` when none is waiting.
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one packet.
    fn send(&self, buf: &[u8]) -> io::Result<usize>;
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
}

/// An SA transaction in flight.
#[derive(Debug, Clone, Copy)]
enum SaOp {
    Path([u8; 16]),
    Join {
        mgid: [u8; 16],
        send_only: bool,
        state: u8,
    },
}

/// A datagram-mode IPoIB interface; see the module documentation.
#[derive(Debug)]
pub struct Link<T: Transport> {
    hca: Hca<T>,
    gsi: Option<Gsi>,
    scq: Option<Cq>,
    rcq: Option<Cq>,
    qp: Option<Qp>,
    rx: Option<DmaBuffer>,
    tx: Option<DmaBuffer>,
    rx_posted: VecDeque<usize>,
    tx_free: Vec<usize>,
    tx_inflight: VecDeque<usize>,
    pool: Vec<Vec<u8>>,
    pool_len: Vec<usize>,
    pool_free: Vec<usize>,
    engine: Datagram<AddressVector, usize>,
    out: Vec<Action<AddressVector, usize>>,
    spare: Vec<Action<AddressVector, usize>>,
    bcast: Option<McMemberRecord>,
    /// SA transactions in flight, by TID: the event loop never waits for
    /// the SA.
    sa_pending: HashMap<u64, SaOp>,
    attached: Vec<[u8; 16]>,
    joined: Vec<([u8; 16], u8)>,
    lid: u16,
    sm_lid: u16,
    gid: [u8; 16],
    pkey: u16,
    active: bool,
    /// The QP does IPoIB stateless offloads (checksums, LSO).
    offload: bool,
    next_start: Instant,
    next_timers: Instant,
    /// The last turn moved packets: do not sleep in the next one.
    busy: bool,
    /// The completion queues are armed for an event.
    armed: bool,
    counters: LinkCounters,
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

impl<T: Transport> Link<T> {
    /// Creates the interface's QP and buffers on port 1 of `hca`, P_Key
    /// index 0. Call [`Link::poll`] to run it.
    pub fn new(mut hca: Hca<T>) -> Result<Link<T>, (Box<LinkError>, TeardownReport)> {
        match Self::create(&mut hca) {
            Ok(parts) => Ok(Self::assemble(hca, parts)),
            Err(e) => Err((Box::new(e), hca.shutdown())),
        }
    }

    #[allow(clippy::type_complexity)]
    fn create(hca: &mut Hca<T>) -> Result<(Gsi, Cq, Cq, Qp, DmaBuffer, DmaBuffer), LinkError> {
        let gsi = Gsi::new(hca, 1)?;
        let scq = Cq::create(hca, LOG_SQ + 1)?;
        let rcq = Cq::create(hca, LOG_RQ + 1)?;
        let mut qp = Qp::create(
            hca,
            &QpConfig {
                st: ServiceType::Ud,
                port: 1,
                pkey_index: 0,
                qkey: QKEY_DEFAULT,
                log_sq: LOG_SQ,
                log_rq: LOG_RQ,
                rq_sge: 1,
                send_cq: scq.cqn(),
                recv_cq: rcq.cqn(),
                // Siblings on the port must see our multicast; our own
                // copies are filtered in the engine, as Linux does.
                block_mc_loopback: false,
                srq: None,
                offload: hca.info().ipoib_basic_offloads,
            },
        )?;
        qp.activate_datagram(hca)?;
        let rx = hca.alloc_dma(RX_BUFS * RX_BUF)?;
        let tx = hca.alloc_dma(TX_SLOTS * TX_SLOT)?;
        Ok((gsi, scq, rcq, qp, rx, tx))
    }

    fn assemble(hca: Hca<T>, parts: (Gsi, Cq, Cq, Qp, DmaBuffer, DmaBuffer)) -> Link<T> {
        let (gsi, scq, rcq, qp, rx, tx) = parts;
        let offload = hca.info().ipoib_basic_offloads;
        let port = hca.info().ports.first().cloned();
        let gid = port.as_ref().map_or([0; 16], |p| p.gid);
        let hw = HwAddr::new(HwAddr::FLAG_RC, qp.qpn(), gid);
        // The parent interface takes the P_Key at index 0 (the default
        // partition unless the SM says otherwise).
        let pkey = port
            .as_ref()
            .and_then(|p| p.pkeys.iter().find(|(i, _)| *i == 0).map(|(_, k)| *k))
            .unwrap_or(0xFFFF);
        let engine = Datagram::new(datagram::Config {
            hw,
            pkey,
            scope: mgid::SCOPE_LINK,
            ipv4: Vec::new(),
            ipv6: Vec::new(),
            guest: false,
        });
        let mut link = Link {
            hca,
            gsi: Some(gsi),
            scq: Some(scq),
            rcq: Some(rcq),
            qp: Some(qp),
            rx: Some(rx),
            tx: Some(tx),
            rx_posted: VecDeque::with_capacity(RX_BUFS),
            tx_free: (0..TX_SLOTS).rev().collect(),
            tx_inflight: VecDeque::with_capacity(TX_SLOTS),
            pool: vec![vec![0u8; HOST_BUF]; HOST_BUFS],
            pool_len: vec![0; HOST_BUFS],
            pool_free: (0..HOST_BUFS).rev().collect(),
            engine,
            out: Vec::with_capacity(64),
            spare: Vec::with_capacity(64),
            bcast: None,
            sa_pending: HashMap::new(),
            attached: Vec::new(),
            joined: Vec::new(),
            lid: port.as_ref().map_or(0, |p| p.lid),
            sm_lid: port.as_ref().map_or(0, |p| p.sm_lid),
            gid,
            pkey,
            active: false,
            offload,
            next_start: Instant::now(),
            next_timers: Instant::now(),
            busy: false,
            armed: false,
            counters: LinkCounters::default(),
        };
        for i in 0..RX_BUFS {
            link.post_rx(i);
        }
        if let Some(qp) = link.qp.as_mut() {
            qp.ring_rq();
        }
        link
    }

    fn post_rx(&mut self, i: usize) {
        let (Some(qp), Some(rx)) = (self.qp.as_mut(), self.rx.as_ref()) else {
            return;
        };
        let sge = Sge {
            addr: rx.iova_at(i * RX_BUF).0,
            len: RX_BUF as u32,
            lkey: self.hca.lkey(),
        };
        if qp.post_recv(&[sge]).is_ok() {
            self.rx_posted.push_back(i);
        }
    }

    /// The interface's hardware address.
    pub fn hw_addr(&self) -> HwAddr {
        self.engine.config().hw
    }

    /// Whether the port is active and the broadcast group joined.
    pub fn carrier(&self) -> bool {
        self.active && self.engine.carrier()
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

    /// Counters.
    pub fn counters(&self) -> LinkCounters {
        self.counters
    }

    /// The engine (neighbours, groups, drop counters).
    pub fn engine(&self) -> &Datagram<AddressVector, usize> {
        &self.engine
    }

    /// Sets the host side's addresses.
    pub fn set_addresses(&mut self, addrs: &[IpAddr]) {
        let v4: Vec<Ipv4Addr> = addrs
            .iter()
            .filter_map(|a| match a {
                IpAddr::V4(v) => Some(*v),
                IpAddr::V6(_) => None,
            })
            .collect();
        let v6: Vec<Ipv6Addr> = addrs
            .iter()
            .filter_map(|a| match a {
                IpAddr::V6(v) => Some(*v),
                IpAddr::V4(_) => None,
            })
            .collect();
        if v4 != self.engine.config().ipv4 || v6 != self.engine.config().ipv6 {
            self.engine.set_addresses(v4, v6, &mut self.out);
            self.run_actions(None);
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
            self.engine.start(self.lid, &mut self.out);
            self.run_actions(None);
        }
    }

    /// One turn of the event loop: HCA events (waiting up to `wait`),
    /// completions, host packets from `tun`, timers. Returns whether
    /// carrier changed.
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
        self.reap_sends();
        self.serve_sa();
        let moved = self.receive(host) + self.read_host(host);
        self.busy = moved > 0;
        let now = Instant::now();
        if now >= self.next_timers {
            // The engine's timers are in seconds; ten runs a second is plenty.
            self.next_timers = now + Duration::from_millis(100);
            self.engine.poll(now, &mut self.out);
        }
        self.run_actions(Some(host));
        Ok(before != self.carrier())
    }

    fn completion_event(&mut self, cqn: u32) {
        for cq in [self.rcq.as_mut(), self.scq.as_mut()].into_iter().flatten() {
            if cq.cqn() == cqn {
                cq.event();
                self.armed = false;
            }
        }
    }

    /// Whether the last turn moved packets (the caller should not sleep).
    pub fn busy(&self) -> bool {
        self.busy
    }

    /// Arms both completion queues so the next completion raises an event
    /// on [`Hca::event_fd`]; call before sleeping.
    pub fn arm(&mut self) {
        if self.armed {
            return;
        }
        let t = self.hca.transport();
        for cq in [self.rcq.as_mut(), self.scq.as_mut()].into_iter().flatten() {
            cq.arm(t);
        }
        self.armed = true;
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
            // P_Key table changed: Linux re-reads the P_Key (heavy); this
            // interface's P_Key is fixed, so a normal flush is what remains.
            PortChange::LidChange | PortChange::PkeyChange => {
                self.flush(false);
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

    /// Drops memberships and attachments and flushes the engine: `light`
    /// keeps neighbours and rejoins at once, otherwise everything goes and
    /// `start` rejoins.
    fn flush(&mut self, light: bool) {
        // Answers to requests made before the flush no longer apply.
        self.sa_pending.clear();
        let attached = std::mem::take(&mut self.attached);
        if let Some(qp) = self.qp.as_ref() {
            for g in attached {
                let _ = qp.detach(&mut self.hca, g);
            }
        }
        // The SM forgot the memberships (reregister) or the port lost
        // them (down); nothing to leave.
        self.joined.clear();
        self.bcast = None;
        if light {
            self.engine.flush_light(&mut self.out);
        } else {
            self.engine.flush_normal(&mut self.out);
        }
        self.run_actions(None);
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
                if let Some(qp) = self.qp.as_mut() {
                    qp.send_done(c.wqe_counter);
                }
                if let Some(slot) = self.tx_inflight.pop_front() {
                    self.tx_free.push(slot);
                }
            }
            if n < buf.len() {
                break;
            }
        }
    }

    fn receive(&mut self, host: &dyn HostPort) -> usize {
        let mut total = 0;
        for _ in 0..8 {
            let n = self.receive_batch(host);
            total += n;
            if n == 0 {
                break;
            }
        }
        total
    }

    fn receive_batch(&mut self, host: &dyn HostPort) -> usize {
        let Some(rcq) = self.rcq.as_mut() else {
            return 0;
        };
        let mut buf = [Cqe::parse(&[0xF0u8; 64]); 32];
        let n = rcq.poll(&mut buf);
        if n == 0 {
            return 0;
        }
        let now = Instant::now();
        for c in &buf[..n] {
            let Some(i) = self.rx_posted.pop_front() else {
                break;
            };
            if let Some(qp) = self.qp.as_mut() {
                qp.recv_done();
            }
            if c.error.is_some() {
                self.counters.rx_errors += 1;
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
            let mut dgid0 = [0u8; 1];
            let body = len.saturating_sub(engine::IPOIB_HEADER_LEN);
            let mut hdr = [0u8; engine::IPOIB_HEADER_LEN];
            if let Some(rx) = self.rx.as_ref() {
                rx.read(i * RX_BUF + 24, &mut dgid0);
                rx.read(i * RX_BUF + 40, &mut hdr);
                let host = &mut self.pool[slot];
                host[..VNET_HDR_LEN_MRG].fill(0);
                rx.read(
                    i * RX_BUF + 44,
                    &mut host[VNET_HDR_LEN_MRG..VNET_HDR_LEN_MRG + body],
                );
            }
            self.post_rx(i);
            self.pool_len[slot] = VNET_HDR_LEN_MRG + body;
            let src = Source {
                slid: c.slid,
                sqpn: c.src_qpn(),
                multicast: c.grh() && dgid0[0] == 0xFF,
            };
            let ty = u16::from_be_bytes([hdr[0], hdr[1]]);
            let bytes = &self.pool[slot][VNET_HDR_LEN_MRG..VNET_HDR_LEN_MRG + body];
            self.engine
                .receive(src, ty, bytes, slot, now, &mut self.out);
        }
        if let Some(qp) = self.qp.as_mut() {
            qp.ring_rq();
        }
        self.run_actions(Some(host));
        n
    }

    fn read_host(&mut self, host: &dyn HostPort) -> usize {
        let now = Instant::now();
        let mut read = 0;
        for _ in 0..64 {
            // Back-pressure: with the send queue nearly full, leave packets
            // in the TUN queue rather than drop them.
            if self.tx_free.len() < 8 {
                self.reap_sends();
                if self.tx_free.len() < 8 {
                    break;
                }
            }
            let Some(slot) = self.pool_free.pop() else {
                break;
            };
            match host.recv(&mut self.pool[slot]) {
                Ok(n) if n > VNET_HDR_LEN_MRG => {
                    read += 1;
                    self.pool_len[slot] = n;
                    let bytes = &self.pool[slot][VNET_HDR_LEN_MRG..n];
                    self.engine.transmit(bytes, slot, now, &mut self.out);
                }
                Ok(_) => self.pool_free.push(slot),
                Err(e) => {
                    self.pool_free.push(slot);
                    if e.kind() != io::ErrorKind::WouldBlock {
                        tracing::warn!("reading the host interface: {e}");
                    }
                    break;
                }
            }
            if self.out.len() > 32 {
                self.run_actions(Some(host));
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
                self.counters.sa_failures += 1;
                None
            }
        }
    }

    fn run_actions(&mut self, host: Option<&dyn HostPort>) {
        let now = Instant::now();
        // Actions may produce more actions: work on a second buffer so both
        // keep their capacity (no allocation per turn).
        let mut actions = std::mem::take(&mut self.spare);
        while !self.out.is_empty() {
            std::mem::swap(&mut actions, &mut self.out);
            for a in actions.drain(..) {
                match a {
                    Action::Send { dest, payload } => self.send(dest, payload),
                    Action::Deliver(slot) => {
                        if let Some(host) = host {
                            let n = self.pool_len[slot];
                            match host.send(&self.pool[slot][..n]) {
                                Ok(_) => self.counters.rx_delivered += 1,
                                Err(e) => tracing::debug!("writing to the host: {e}"),
                            }
                        }
                        self.pool_free.push(slot);
                    }
                    Action::Release(slot) | Action::Dropped(Some(slot), _) => {
                        self.pool_free.push(slot)
                    }
                    Action::Dropped(None, _) => {}
                    Action::QueryPath(dgid) => self.query_path(dgid, now),
                    Action::Join { mgid, send_only } => self.join(mgid, send_only, now),
                }
            }
        }
        self.spare = actions;
    }

    fn query_path(&mut self, dgid: [u8; 16], _now: Instant) {
        let tclass = self.bcast.map_or(0, |b| b.tclass);
        let req = sa::path_query(self.gid, dgid, self.pkey, tclass);
        if !self.sa_start(req, SaOp::Path(dgid)) {
            self.engine.path_failed(dgid, &mut self.out);
        }
    }

    fn join(&mut self, g: [u8; 16], send_only: bool, now: Instant) {
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
        if !self.sa_start(req, op) {
            self.engine.join_failed(g, now, &mut self.out);
        }
    }

    /// Sends an SA request without waiting; the answer comes through
    /// [`Link::serve_sa`].
    fn sa_start(&mut self, mad: [u8; 256], op: SaOp) -> bool {
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
                self.sa_pending.insert(tid, op);
                true
            }
            Err(e) => {
                tracing::info!("sending an SA request failed: {e:?}");
                self.counters.sa_failures += 1;
                false
            }
        }
    }

    /// Whether SA answers are awaited (the caller should wake up soon: the
    /// GSI completion queues are polled, not armed).
    pub fn sa_pending(&self) -> bool {
        !self.sa_pending.is_empty()
    }

    /// Collects SA answers and time-outs and hands them to the engine.
    fn serve_sa(&mut self) {
        if self.sa_pending.is_empty() {
            return;
        }
        let now = Instant::now();
        let Some(gsi) = self.gsi.as_mut() else { return };
        let ev = gsi.process(self.hca.transport(), now);
        for (tid, mad) in ev.responses {
            let Some(op) = self.sa_pending.remove(&tid) else {
                continue; // flushed since
            };
            if MadHeader::parse(&mad).status == 0 {
                self.sa_succeeded(op, &mad, now);
            } else {
                self.sa_failed(op, now);
            }
        }
        for tid in ev.timeouts {
            if let Some(op) = self.sa_pending.remove(&tid) {
                self.sa_failed(op, now);
            }
        }
    }

    fn sa_failed(&mut self, op: SaOp, now: Instant) {
        self.counters.sa_failures += 1;
        match op {
            SaOp::Path(dgid) => self.engine.path_failed(dgid, &mut self.out),
            SaOp::Join { mgid, .. } => self.engine.join_failed(mgid, now, &mut self.out),
        }
    }

    fn sa_succeeded(&mut self, op: SaOp, mad: &[u8; 256], now: Instant) {
        match op {
            SaOp::Path(dgid) => {
                let p = PathRecord::parse(&mad[sa::SA_DATA..]);
                let av = AddressVector {
                    dqpn: 0,
                    qkey: self.bcast.map_or(QKEY_DEFAULT, |b| b.qkey),
                    dlid: p.dlid,
                    sl: p.sl,
                    ..AddressVector::default()
                };
                self.engine.path_resolved(dgid, av, now, &mut self.out);
            }
            SaOp::Join {
                mgid: g,
                send_only,
                state,
            } => {
                let rec = McMemberRecord::parse(&mad[sa::SA_DATA..]);
                self.joined.push((g, state));
                if g == self.engine.broadcast_mgid() {
                    if let Some(qp) = self.qp.as_mut()
                        && let Err(e) = qp.set_qkey(&mut self.hca, rec.qkey)
                    {
                        tracing::warn!("setting the broadcast Q_Key: {e}");
                    }
                    self.bcast = Some(rec);
                }
                if !send_only && let Some(qp) = self.qp.as_ref() {
                    match qp.attach(&mut self.hca, g) {
                        Ok(()) => self.attached.push(g),
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
                self.engine.joined(g, av, &mut self.out);
            }
        }
    }

    fn send(&mut self, dest: Dest<AddressVector>, payload: Payload<usize>) {
        let ty = payload.ethertype();
        let (plan, len) = match &payload {
            Payload::Host(p, _) => {
                let n = self.pool_len[*p];
                let hdr = VnetHdr::parse(&self.pool[*p][..n]).unwrap_or_default();
                let plan = vnet::plan(&hdr, &self.pool[*p][VNET_HDR_LEN_MRG..n]);
                (plan, n.saturating_sub(VNET_HDR_LEN_MRG))
            }
            Payload::Control(c) => (Ok(TxPlan::Plain), c.bytes().len()),
        };
        let release = |link: &mut Self, payload: Payload<usize>| {
            if let Payload::Host(p, _) = payload {
                link.pool_free.push(p);
            }
        };
        let plan = match plan {
            Ok(TxPlan::Plain) => TxPlan::Plain,
            Ok(p) if self.offload => p,
            // Offloads asked for but not offered to the host: refuse.
            Ok(_) | Err(_) => {
                self.counters.tx_bad_offload += 1;
                release(self, payload);
                return;
            }
        };
        let wire_max = match plan {
            TxPlan::Lso { mss, headers, .. } => headers + usize::from(mss),
            _ => len,
        };
        if wire_max > self.mtu() as usize {
            // A UD send longer than the path MTU would fail on the HCA and
            // take the QP to the error state; Linux drops these too.
            self.counters.tx_too_big += 1;
            release(self, payload);
            return;
        }
        let av = match dest {
            Dest::Unicast { ah, qpn } => AddressVector { dqpn: qpn, ..ah },
            Dest::Multicast { ah, .. } => ah,
        };
        if self.tx_free.is_empty() {
            self.reap_sends();
        }
        let Some(slot) = self.tx_free.pop() else {
            self.counters.tx_no_buffer += 1;
            release(self, payload);
            return;
        };
        let mut hdr = [0u8; engine::IPOIB_HEADER_LEN];
        engine::write_header(&mut hdr, ty);
        let (Some(tx), Some(qp)) = (self.tx.as_ref(), self.qp.as_mut()) else {
            // Only after shutdown began; nothing is lost that was not going.
            self.tx_free.push(slot);
            release(self, payload);
            return;
        };
        let base = slot * TX_SLOT;
        let lkey = self.hca.lkey();
        let mut inline = [0u8; vnet::MAX_LSO_HEADERS];
        let (sge, off) = match (&payload, plan) {
            (Payload::Host(p, _), TxPlan::Lso { mss, headers, v4 }) => {
                // The headers go inline in the WQE; the gather list holds
                // the TCP payload only.
                let pkt = &self.pool[*p][VNET_HDR_LEN_MRG..VNET_HDR_LEN_MRG + len];
                inline[..hdr.len()].copy_from_slice(&hdr);
                inline[hdr.len()..hdr.len() + headers].copy_from_slice(&pkt[..headers]);
                let data = &pkt[headers..len.min(headers + TX_SLOT)];
                tx.write(base, data);
                let off = TxOffload {
                    l3_csum: v4,
                    l4_csum: true,
                    lso: Some((mss, &inline[..hdr.len() + headers])),
                };
                self.counters.tx_lso += 1;
                (
                    Sge {
                        addr: tx.iova_at(base).0,
                        len: data.len() as u32,
                        lkey,
                    },
                    off,
                )
            }
            (payload, plan) => {
                tx.write(base, &hdr);
                let body: &[u8] = match payload {
                    Payload::Host(p, _) => {
                        &self.pool[*p]
                            [VNET_HDR_LEN_MRG..VNET_HDR_LEN_MRG + len.min(TX_SLOT - hdr.len())]
                    }
                    Payload::Control(c) => c.bytes(),
                };
                tx.write(base + hdr.len(), body);
                let off = match plan {
                    TxPlan::Checksum { l3 } => {
                        self.counters.tx_csum += 1;
                        TxOffload {
                            l3_csum: l3,
                            l4_csum: true,
                            lso: None,
                        }
                    }
                    _ => TxOffload::default(),
                };
                (
                    Sge {
                        addr: tx.iova_at(base).0,
                        len: (hdr.len() + body.len()) as u32,
                        lkey,
                    },
                    off,
                )
            }
        };
        let posted = if off == TxOffload::default() {
            qp.post_send_ud(&av, &[sge], true)
        } else {
            qp.post_send_ud_offload(&av, &[sge], true, &off)
        };
        if let Payload::Host(p, _) = payload {
            self.pool_free.push(p);
        }
        match posted {
            Ok(_) => {
                qp.ring_sq(self.hca.transport());
                self.tx_inflight.push_back(slot);
                self.counters.tx_packets += 1;
                self.counters.tx_bytes += len as u64 + hdr.len() as u64;
            }
            Err(_) => {
                self.tx_free.push(slot);
                self.counters.tx_no_buffer += 1;
            }
        }
    }

    /// Leaves every group, destroys every HCA object and shuts the HCA
    /// down.
    pub fn shutdown(mut self) -> TeardownReport {
        let joined = std::mem::take(&mut self.joined);
        for (g, state) in joined {
            let _ = self.sa(sa::mc_leave(g, self.gid, state));
        }
        let mut errors = Vec::new();
        if let Some(qp) = self.qp.take() {
            for g in std::mem::take(&mut self.attached) {
                let _ = qp.detach(&mut self.hca, g);
            }
            if let Err(e) = qp.destroy(&mut self.hca) {
                errors.push(format!("destroying the QP: {e}"));
            }
        }
        for cq in [self.scq.take(), self.rcq.take()].into_iter().flatten() {
            if let Err(e) = cq.destroy(&mut self.hca) {
                errors.push(format!("destroying a CQ: {e}"));
            }
        }
        if let Some(gsi) = self.gsi.take()
            && let Err(e) = gsi.destroy(&mut self.hca)
        {
            errors.push(format!("destroying the GSI QP: {e}"));
        }
        for b in [self.rx.take(), self.tx.take()].into_iter().flatten() {
            if let Err(e) = self.hca.free_dma(b) {
                errors.push(format!("freeing DMA memory: {e}"));
            }
        }
        let mut report = self.hca.shutdown();
        report.errors.extend(errors);
        report
    }
}
