//! Management datagrams and the subnet administration (SA) client.
//!
//! IPoIB needs two SA records: PathRecord (how to reach a unicast GID) and
//! MCMemberRecord (join and leave multicast groups, including the broadcast
//! group that carries the interface's Q_Key, MTU, rate and SL). Requests
//! travel as 256-byte MADs on QP1. [`MadAgent`] is the pure transaction
//! layer (transaction IDs, timeouts, retries, with time passed in);
//! [`Gsi`] moves MADs through a GSI QP.
//!
//! Layouts: common MAD header and SA header per the mlx5 reference §8.4,
//! record layouts per the IPoIB reference §6.2 and §7.2.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::cmd::qp::ServiceType;
use crate::hca::{Hca, HcaError};
use crate::layout::cqe::{Cqe, opcode};
use crate::layout::wqe::{AddressVector, Sge};
use crate::layout::{be16, be32, be64, put_be16, put_be32, put_be64};
use crate::transport::{DmaBuffer, Transport};
use crate::verbs::{Cq, PostError, Qp, QpConfig};

/// A MAD is 256 bytes.
pub const MAD_LEN: usize = 256;
/// The well-known QP1 Q_Key.
pub const GSI_QKEY: u32 = 0x8001_0000;
/// Offset of SA attribute data in a MAD.
pub const SA_DATA: usize = 56;
/// Offset of the SA component mask.
pub const SA_COMP_MASK: usize = 48;

/// Management classes.
pub mod class {
    /// Subnet administration.
    pub const SA: u8 = 0x03;
    /// Communication management.
    pub const CM: u8 = 0x07;
}

/// MAD methods.
#[allow(missing_docs)]
pub mod method {
    pub const GET: u8 = 0x01;
    pub const SET: u8 = 0x02;
    pub const SEND: u8 = 0x03;
    pub const GET_TABLE: u8 = 0x12;
    pub const DELETE: u8 = 0x15;
    /// Response bit.
    pub const RESPONSE: u8 = 0x80;
}

/// SA attributes.
#[allow(missing_docs)]
pub mod attr {
    pub const PATH_RECORD: u16 = 0x0035;
    pub const MC_MEMBER_RECORD: u16 = 0x0038;
}

/// The common MAD header (24 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MadHeader {
    /// Base version (1).
    pub base_version: u8,
    /// Management class.
    pub class: u8,
    /// Class version (SA 2).
    pub class_version: u8,
    /// Method.
    pub method: u8,
    /// Status.
    pub status: u16,
    /// Transaction ID.
    pub tid: u64,
    /// Attribute ID.
    pub attr_id: u16,
    /// Attribute modifier.
    pub attr_mod: u32,
}

impl MadHeader {
    /// Decodes the header.
    pub fn parse(m: &[u8]) -> MadHeader {
        MadHeader {
            base_version: m.first().copied().unwrap_or(0),
            class: m.get(1).copied().unwrap_or(0),
            class_version: m.get(2).copied().unwrap_or(0),
            method: m.get(3).copied().unwrap_or(0),
            status: be16(m, 4),
            tid: be64(m, 8),
            attr_id: be16(m, 16),
            attr_mod: be32(m, 20),
        }
    }

    /// Encodes the header.
    pub fn emit(&self, m: &mut [u8]) {
        m[0] = self.base_version;
        m[1] = self.class;
        m[2] = self.class_version;
        m[3] = self.method;
        put_be16(m, 4, self.status);
        put_be64(m, 8, self.tid);
        put_be16(m, 16, self.attr_id);
        put_be32(m, 20, self.attr_mod);
    }

    /// Whether this is a response.
    pub fn is_response(&self) -> bool {
        self.method & method::RESPONSE != 0
    }
}

/// Builds an SA request.
pub fn sa_request(meth: u8, attr_id: u16, comp_mask: u64, data: &[u8]) -> [u8; MAD_LEN] {
    let mut m = [0u8; MAD_LEN];
    MadHeader {
        base_version: 1,
        class: class::SA,
        class_version: 2,
        method: meth,
        attr_id,
        ..MadHeader::default()
    }
    .emit(&mut m);
    put_be64(&mut m, SA_COMP_MASK, comp_mask);
    let n = data.len().min(MAD_LEN - SA_DATA);
    m[SA_DATA..SA_DATA + n].copy_from_slice(&data[..n]);
    m
}

/// PathRecord component mask bits.
#[allow(missing_docs)]
pub mod pr {
    pub const DGID: u64 = 1 << 2;
    pub const SGID: u64 = 1 << 3;
    pub const DLID: u64 = 1 << 4;
    pub const SLID: u64 = 1 << 5;
    pub const TCLASS: u64 = 1 << 10;
    pub const NUMB_PATH: u64 = 1 << 12;
    pub const PKEY: u64 = 1 << 13;
    pub const SL: u64 = 1 << 15;
}

/// A PathRecord (64 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize)]
pub struct PathRecord {
    /// Service ID.
    pub service_id: u64,
    /// Destination GID.
    pub dgid: [u8; 16],
    /// Source GID.
    pub sgid: [u8; 16],
    /// Destination LID.
    pub dlid: u16,
    /// Source LID.
    pub slid: u16,
    /// Raw traffic.
    pub raw_traffic: bool,
    /// Flow label.
    pub flow_label: u32,
    /// Hop limit.
    pub hop_limit: u8,
    /// Traffic class.
    pub tclass: u8,
    /// Reversible.
    pub reversible: bool,
    /// Number of paths requested.
    pub numb_path: u8,
    /// P_Key.
    pub pkey: u16,
    /// QoS class.
    pub qos_class: u16,
    /// Service level.
    pub sl: u8,
    /// MTU selector.
    pub mtu_selector: u8,
    /// MTU code.
    pub mtu: u8,
    /// Rate selector.
    pub rate_selector: u8,
    /// Rate code.
    pub rate: u8,
    /// Packet lifetime selector.
    pub pkt_life_selector: u8,
    /// Packet lifetime.
    pub pkt_life: u8,
    /// Preference.
    pub preference: u8,
}

/// Length of a PathRecord.
pub const PATH_RECORD_LEN: usize = 64;

impl PathRecord {
    /// Decodes from attribute data.
    pub fn parse(d: &[u8]) -> PathRecord {
        let mut dgid = [0u8; 16];
        let mut sgid = [0u8; 16];
        if d.len() >= 40 {
            dgid.copy_from_slice(&d[8..24]);
            sgid.copy_from_slice(&d[24..40]);
        }
        let w44 = be32(d, 44);
        let b = |i: usize| d.get(i).copied().unwrap_or(0);
        PathRecord {
            service_id: be64(d, 0),
            dgid,
            sgid,
            dlid: be16(d, 40),
            slid: be16(d, 42),
            raw_traffic: w44 >> 31 != 0,
            flow_label: (w44 >> 8) & 0xF_FFFF,
            hop_limit: w44 as u8,
            tclass: b(48),
            reversible: b(49) & 0x80 != 0,
            numb_path: b(49) & 0x7F,
            pkey: be16(d, 50),
            qos_class: be16(d, 52) >> 4,
            sl: (be16(d, 52) & 0xF) as u8,
            mtu_selector: b(54) >> 6,
            mtu: b(54) & 0x3F,
            rate_selector: b(55) >> 6,
            rate: b(55) & 0x3F,
            pkt_life_selector: b(56) >> 6,
            pkt_life: b(56) & 0x3F,
            preference: b(57),
        }
    }

    /// Encodes into attribute data (64 bytes).
    pub fn emit(&self, d: &mut [u8]) {
        put_be64(d, 0, self.service_id);
        d[8..24].copy_from_slice(&self.dgid);
        d[24..40].copy_from_slice(&self.sgid);
        put_be16(d, 40, self.dlid);
        put_be16(d, 42, self.slid);
        put_be32(
            d,
            44,
            (u32::from(self.raw_traffic) << 31)
                | ((self.flow_label & 0xF_FFFF) << 8)
                | u32::from(self.hop_limit),
        );
        d[48] = self.tclass;
        d[49] = (u8::from(self.reversible) << 7) | (self.numb_path & 0x7F);
        put_be16(d, 50, self.pkey);
        put_be16(d, 52, (self.qos_class << 4) | u16::from(self.sl & 0xF));
        d[54] = (self.mtu_selector << 6) | (self.mtu & 0x3F);
        d[55] = (self.rate_selector << 6) | (self.rate & 0x3F);
        d[56] = (self.pkt_life_selector << 6) | (self.pkt_life & 0x3F);
        d[57] = self.preference;
    }
}

/// MCMemberRecord component mask bits.
#[allow(missing_docs)]
pub mod mc {
    pub const MGID: u64 = 1 << 0;
    pub const PORT_GID: u64 = 1 << 1;
    pub const QKEY: u64 = 1 << 2;
    pub const MLID: u64 = 1 << 3;
    pub const MTU_SELECTOR: u64 = 1 << 4;
    pub const MTU: u64 = 1 << 5;
    pub const TCLASS: u64 = 1 << 6;
    pub const PKEY: u64 = 1 << 7;
    pub const RATE_SELECTOR: u64 = 1 << 8;
    pub const RATE: u64 = 1 << 9;
    pub const SL: u64 = 1 << 12;
    pub const FLOW_LABEL: u64 = 1 << 13;
    pub const HOP_LIMIT: u64 = 1 << 14;
    pub const SCOPE: u64 = 1 << 15;
    pub const JOIN_STATE: u64 = 1 << 16;
}

/// JoinState bits.
#[allow(missing_docs)]
pub mod join {
    pub const FULL: u8 = 1 << 0;
    pub const NON: u8 = 1 << 1;
    pub const SEND_ONLY_NON: u8 = 1 << 2;
    pub const SEND_ONLY_FULL: u8 = 1 << 3;
}

/// An MCMemberRecord (52 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize)]
pub struct McMemberRecord {
    /// Multicast GID.
    pub mgid: [u8; 16],
    /// Member port GID.
    pub port_gid: [u8; 16],
    /// Q_Key.
    pub qkey: u32,
    /// Multicast LID.
    pub mlid: u16,
    /// MTU selector.
    pub mtu_selector: u8,
    /// MTU code.
    pub mtu: u8,
    /// Traffic class.
    pub tclass: u8,
    /// P_Key.
    pub pkey: u16,
    /// Rate selector.
    pub rate_selector: u8,
    /// Rate code.
    pub rate: u8,
    /// Packet lifetime selector.
    pub pkt_life_selector: u8,
    /// Packet lifetime.
    pub pkt_life: u8,
    /// Service level.
    pub sl: u8,
    /// Flow label.
    pub flow_label: u32,
    /// Hop limit.
    pub hop_limit: u8,
    /// Scope.
    pub scope: u8,
    /// JoinState.
    pub join_state: u8,
    /// ProxyJoin.
    pub proxy_join: bool,
}

/// Length of an MCMemberRecord.
pub const MC_MEMBER_RECORD_LEN: usize = 52;

impl McMemberRecord {
    /// Decodes from attribute data.
    pub fn parse(d: &[u8]) -> McMemberRecord {
        let mut mgid = [0u8; 16];
        let mut port_gid = [0u8; 16];
        if d.len() >= 32 {
            mgid.copy_from_slice(&d[0..16]);
            port_gid.copy_from_slice(&d[16..32]);
        }
        let b = |i: usize| d.get(i).copied().unwrap_or(0);
        let w44 = be32(d, 44);
        McMemberRecord {
            mgid,
            port_gid,
            qkey: be32(d, 32),
            mlid: be16(d, 36),
            mtu_selector: b(38) >> 6,
            mtu: b(38) & 0x3F,
            tclass: b(39),
            pkey: be16(d, 40),
            rate_selector: b(42) >> 6,
            rate: b(42) & 0x3F,
            pkt_life_selector: b(43) >> 6,
            pkt_life: b(43) & 0x3F,
            sl: (w44 >> 28) as u8,
            flow_label: (w44 >> 8) & 0xF_FFFF,
            hop_limit: w44 as u8,
            scope: b(48) >> 4,
            join_state: b(48) & 0x0F,
            proxy_join: b(49) & 0x80 != 0,
        }
    }

    /// Encodes into attribute data (52 bytes).
    pub fn emit(&self, d: &mut [u8]) {
        d[0..16].copy_from_slice(&self.mgid);
        d[16..32].copy_from_slice(&self.port_gid);
        put_be32(d, 32, self.qkey);
        put_be16(d, 36, self.mlid);
        d[38] = (self.mtu_selector << 6) | (self.mtu & 0x3F);
        d[39] = self.tclass;
        put_be16(d, 40, self.pkey);
        d[42] = (self.rate_selector << 6) | (self.rate & 0x3F);
        d[43] = (self.pkt_life_selector << 6) | (self.pkt_life & 0x3F);
        put_be32(
            d,
            44,
            (u32::from(self.sl & 0xF) << 28)
                | ((self.flow_label & 0xF_FFFF) << 8)
                | u32::from(self.hop_limit),
        );
        d[48] = (self.scope << 4) | (self.join_state & 0x0F);
        d[49] = u8::from(self.proxy_join) << 7;
    }
}

/// The PathRecord query IPoIB makes (§7.2): DGID | SGID | NumbPath | TClass | P_Key.
pub fn path_query(sgid: [u8; 16], dgid: [u8; 16], pkey: u16, tclass: u8) -> [u8; MAD_LEN] {
    let r = PathRecord {
        dgid,
        sgid,
        pkey,
        tclass,
        numb_path: 1,
        ..PathRecord::default()
    };
    let mut d = [0u8; PATH_RECORD_LEN];
    r.emit(&mut d);
    sa_request(
        method::GET,
        attr::PATH_RECORD,
        pr::DGID | pr::SGID | pr::NUMB_PATH | pr::TCLASS | pr::PKEY,
        &d,
    )
}

/// A join (`SubnAdmSet`) of `port_gid` to `mgid`. With `params` (taken from
/// the broadcast group) the SA may create the group; without, only MGID,
/// PortGID, P_Key and JoinState are given (how IPoIB joins the broadcast
/// group, which it must never create).
pub fn mc_join(
    mgid: [u8; 16],
    port_gid: [u8; 16],
    pkey: u16,
    join_state: u8,
    params: Option<&McMemberRecord>,
) -> [u8; MAD_LEN] {
    let mut r = McMemberRecord {
        mgid,
        port_gid,
        pkey,
        join_state,
        ..McMemberRecord::default()
    };
    let mut mask = mc::MGID | mc::PORT_GID | mc::PKEY | mc::JOIN_STATE;
    if let Some(p) = params {
        r.qkey = p.qkey;
        r.mtu_selector = 2;
        r.mtu = p.mtu;
        r.tclass = p.tclass;
        r.rate_selector = 2;
        r.rate = p.rate;
        r.sl = p.sl;
        r.flow_label = p.flow_label;
        r.hop_limit = p.hop_limit;
        mask |= mc::QKEY
            | mc::MTU_SELECTOR
            | mc::MTU
            | mc::TCLASS
            | mc::RATE_SELECTOR
            | mc::RATE
            | mc::SL
            | mc::FLOW_LABEL
            | mc::HOP_LIMIT;
    }
    let mut d = [0u8; MC_MEMBER_RECORD_LEN];
    r.emit(&mut d);
    sa_request(method::SET, attr::MC_MEMBER_RECORD, mask, &d)
}

/// A leave (`SubnAdmDelete`): MGID, PortGID, JoinState.
pub fn mc_leave(mgid: [u8; 16], port_gid: [u8; 16], join_state: u8) -> [u8; MAD_LEN] {
    let r = McMemberRecord {
        mgid,
        port_gid,
        join_state,
        ..McMemberRecord::default()
    };
    let mut d = [0u8; MC_MEMBER_RECORD_LEN];
    r.emit(&mut d);
    sa_request(
        method::DELETE,
        attr::MC_MEMBER_RECORD,
        mc::MGID | mc::PORT_GID | mc::JOIN_STATE,
        &d,
    )
}

/// Where a MAD goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MadDest {
    /// Destination LID.
    pub dlid: u16,
    /// Destination QPN (1 for SA and CM).
    pub dqpn: u32,
    /// Service level.
    pub sl: u8,
}

#[derive(Clone, Debug)]
struct Pending {
    mad: [u8; MAD_LEN],
    dest: MadDest,
    deadline: Instant,
    timeout: Duration,
    retries_left: u8,
}

/// What the agent wants done.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // MADs are 256 bytes by definition; no boxing per MAD
pub enum MadAction {
    /// Send (again) this MAD.
    Send([u8; MAD_LEN], MadDest),
    /// The transaction ran out of retries.
    TimedOut(u64),
}

/// Transactions of one MAD client: TIDs, timeouts, retries. Pure.
#[derive(Debug, Default)]
pub struct MadAgent {
    next_tid: u64,
    pending: BTreeMap<u64, Pending>,
    /// Responses with no matching transaction (late, duplicate or forged).
    pub unmatched: u64,
    /// Retransmissions.
    pub retries: u64,
}

impl MadAgent {
    /// A fresh agent; `tid_base` keeps TIDs of different agents apart.
    pub fn new(tid_base: u64) -> MadAgent {
        MadAgent {
            next_tid: tid_base,
            ..MadAgent::default()
        }
    }

    /// Starts a transaction: assigns a TID and returns it with the MAD to send.
    pub fn start(
        &mut self,
        now: Instant,
        mut mad: [u8; MAD_LEN],
        dest: MadDest,
        timeout: Duration,
        retries: u8,
    ) -> (u64, MadAction) {
        self.next_tid = self.next_tid.wrapping_add(1);
        let tid = self.next_tid;
        put_be64(&mut mad, 8, tid);
        self.pending.insert(
            tid,
            Pending {
                mad,
                dest,
                deadline: now + timeout,
                timeout,
                retries_left: retries,
            },
        );
        (tid, MadAction::Send(mad, dest))
    }

    /// Matches a received response to its transaction and ends it.
    pub fn response(&mut self, mad: &[u8]) -> Option<u64> {
        let h = MadHeader::parse(mad);
        if !h.is_response() {
            return None;
        }
        match self.pending.get(&h.tid) {
            Some(p) if MadHeader::parse(&p.mad).class == h.class => {
                self.pending.remove(&h.tid);
                Some(h.tid)
            }
            _ => {
                self.unmatched += 1;
                None
            }
        }
    }

    /// Abandons a transaction.
    pub fn cancel(&mut self, tid: u64) {
        self.pending.remove(&tid);
    }

    /// Transactions in flight.
    pub fn outstanding(&self) -> usize {
        self.pending.len()
    }

    /// Retransmits or expires what is due at `now`.
    pub fn poll(&mut self, now: Instant) -> Vec<MadAction> {
        let mut out = Vec::new();
        let mut dead = Vec::new();
        for (tid, p) in self.pending.iter_mut() {
            if now < p.deadline {
                continue;
            }
            if p.retries_left == 0 {
                dead.push(*tid);
                out.push(MadAction::TimedOut(*tid));
            } else {
                p.retries_left -= 1;
                p.deadline = now + p.timeout;
                self.retries += 1;
                out.push(MadAction::Send(p.mad, p.dest));
            }
        }
        for t in dead {
            self.pending.remove(&t);
        }
        out
    }

    /// When the next deadline falls, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.deadline).min()
    }
}

/// Errors of SA transactions.
#[derive(Debug, thiserror::Error)]
pub enum SaError {
    /// The HCA failed.
    #[error(transparent)]
    Hca(#[from] HcaError),
    /// No answer after all retries.
    #[error("SA request (attribute {attr:#06x}) timed out")]
    Timeout {
        /// Attribute.
        attr: u16,
    },
    /// The SA answered with an error status.
    #[error("SA answered attribute {attr:#06x} with status {status:#06x}")]
    Status {
        /// Attribute.
        attr: u16,
        /// MAD status.
        status: u16,
    },
    /// The GSI send queue is full.
    #[error("GSI send failed")]
    Post(#[from] PostError),
}

const RX_SLOT: usize = 40 + MAD_LEN;
const RX_BUFS: usize = 64;
const TX_BUFS: usize = 32;

/// An incoming MAD that answered nothing of ours (e.g. a CM request).
#[derive(Clone, Debug)]
pub struct IncomingMad {
    /// The MAD.
    pub mad: [u8; MAD_LEN],
    /// Sender LID.
    pub slid: u16,
    /// Sender QPN.
    pub src_qpn: u32,
    /// P_Key it arrived with.
    pub pkey: u16,
}

/// What [`Gsi::process`] found.
#[derive(Debug, Default)]
pub struct GsiEvents {
    /// Responses to our transactions: (TID, MAD).
    pub responses: Vec<(u64, [u8; MAD_LEN])>,
    /// Transactions that ran out of retries.
    pub timeouts: Vec<u64>,
    /// Requests from others.
    pub incoming: Vec<IncomingMad>,
}

/// The GSI (QP1) of one port with its CQs and buffers.
#[derive(Debug)]
pub struct Gsi {
    qp: Qp,
    scq: Cq,
    rcq: Cq,
    mem: DmaBuffer,
    tx_free: Vec<usize>,
    tx_of_wqe: BTreeMap<u16, usize>,
    lkey: u32,
    /// Transactions.
    pub agent: MadAgent,
    /// MADs dropped: malformed or too short.
    pub rx_dropped: u64,
}

impl Gsi {
    /// Creates and activates the GSI QP of `port` (P_Key index 0).
    pub fn new<T: Transport>(hca: &mut Hca<T>, port: u8) -> Result<Gsi, HcaError> {
        let scq = Cq::create(hca, 6)?;
        let rcq = Cq::create(hca, 7)?;
        let mut qp = Qp::create(
            hca,
            &QpConfig {
                st: ServiceType::Gsi,
                log_sq: 7,
                block_mc_loopback: false,
                ..QpConfig::ud(port, 0, GSI_QKEY, 6, scq.cqn(), rcq.cqn())
            },
        )?;
        qp.activate_datagram(hca)?;
        let mem = hca.alloc_dma(RX_BUFS * RX_SLOT + TX_BUFS * MAD_LEN)?;
        let lkey = hca.lkey();
        let mut g = Gsi {
            qp,
            scq,
            rcq,
            mem,
            tx_free: (0..TX_BUFS).collect(),
            tx_of_wqe: BTreeMap::new(),
            lkey,
            agent: MadAgent::new(u64::from(port) << 56),
            rx_dropped: 0,
        };
        for i in 0..RX_BUFS {
            g.post_rx(i)?;
        }
        g.qp.ring_rq();
        Ok(g)
    }

    /// The hardware QPN of the GSI QP.
    pub fn qpn(&self) -> u32 {
        self.qp.qpn()
    }

    fn post_rx(&mut self, i: usize) -> Result<(), PostError> {
        self.qp.post_recv(&[Sge {
            addr: self.mem.iova_at(i * RX_SLOT).0,
            len: RX_SLOT as u32,
            lkey: self.lkey,
        }])
    }

    /// Sends one MAD now.
    pub fn send_mad(
        &mut self,
        t: &dyn Transport,
        mad: &[u8; MAD_LEN],
        dest: MadDest,
    ) -> Result<(), PostError> {
        let slot = self.tx_free.pop().ok_or(PostError::Full)?;
        let off = RX_BUFS * RX_SLOT + slot * MAD_LEN;
        self.mem.write(off, mad);
        let av = AddressVector {
            dqpn: dest.dqpn,
            qkey: GSI_QKEY,
            dlid: dest.dlid,
            sl: dest.sl,
            ..AddressVector::default()
        };
        let sge = Sge {
            addr: self.mem.iova_at(off).0,
            len: MAD_LEN as u32,
            lkey: self.lkey,
        };
        match self.qp.post_send_ud(&av, &[sge], true) {
            Ok(idx) => {
                self.tx_of_wqe.insert(idx, slot);
                self.qp.ring_sq(t);
                Ok(())
            }
            Err(e) => {
                self.tx_free.push(slot);
                Err(e)
            }
        }
    }

    /// Starts an SA transaction; returns its TID.
    pub fn start(
        &mut self,
        t: &dyn Transport,
        now: Instant,
        mad: [u8; MAD_LEN],
        dest: MadDest,
        timeout: Duration,
        retries: u8,
    ) -> Result<u64, PostError> {
        let (tid, action) = self.agent.start(now, mad, dest, timeout, retries);
        if let MadAction::Send(m, d) = action
            && let Err(e) = self.send_mad(t, &m, d)
        {
            self.agent.cancel(tid);
            return Err(e);
        }
        Ok(tid)
    }

    /// Reaps completions, matches responses, retransmits and expires.
    pub fn process(&mut self, t: &dyn Transport, now: Instant) -> GsiEvents {
        let mut ev = GsiEvents::default();
        let mut cqes = [Cqe::parse(&[0xF0; 64]); 32];
        let n = self.scq.poll(&mut cqes);
        for c in &cqes[..n] {
            if let Some(slot) = self.tx_of_wqe.remove(&c.wqe_counter) {
                self.tx_free.push(slot);
            }
            self.qp.send_done(c.wqe_counter);
        }
        let n = self.rcq.poll(&mut cqes);
        let mut reposted = 0;
        for c in &cqes[..n] {
            let slot = usize::from(c.wqe_counter) % RX_BUFS;
            self.qp.recv_done();
            if c.opcode == opcode::RESP_SEND && c.byte_cnt as usize >= 40 + 24 {
                let mut mad = [0u8; MAD_LEN];
                let len = (c.byte_cnt as usize - 40).min(MAD_LEN);
                self.mem.read(slot * RX_SLOT + 40, &mut mad[..len]);
                if let Some(tid) = self.agent.response(&mad) {
                    ev.responses.push((tid, mad));
                } else if !MadHeader::parse(&mad).is_response() {
                    ev.incoming.push(IncomingMad {
                        mad,
                        slid: c.slid,
                        src_qpn: c.src_qpn(),
                        pkey: c.imm_or_pkey as u16,
                    });
                }
            } else {
                self.rx_dropped += 1;
            }
            if self.post_rx(slot).is_ok() {
                reposted += 1;
            }
        }
        if reposted > 0 {
            self.qp.ring_rq();
        }
        for a in self.agent.poll(now) {
            match a {
                MadAction::Send(m, d) => {
                    let _ = self.send_mad(t, &m, d);
                }
                MadAction::TimedOut(tid) => ev.timeouts.push(tid),
            }
        }
        ev
    }

    /// One SA transaction, waiting for its answer while serving the HCA's
    /// events. Returns the response MAD; a non-zero MAD status is an error.
    pub fn transact<T: Transport>(
        &mut self,
        hca: &mut Hca<T>,
        mad: [u8; MAD_LEN],
        dest: MadDest,
        timeout: Duration,
        retries: u8,
    ) -> Result<[u8; MAD_LEN], SaError> {
        let attr = MadHeader::parse(&mad).attr_id;
        let tid = self.start(hca.transport(), Instant::now(), mad, dest, timeout, retries)?;
        loop {
            let ev = self.process(hca.transport(), Instant::now());
            if let Some((_, m)) = ev.responses.into_iter().find(|(t, _)| *t == tid) {
                let status = MadHeader::parse(&m).status;
                if status != 0 {
                    return Err(SaError::Status { attr, status });
                }
                return Ok(m);
            }
            if ev.timeouts.contains(&tid) {
                return Err(SaError::Timeout { attr });
            }
            hca.poll_events(Duration::from_millis(1))?;
        }
    }

    /// Destroys the QP, CQs and buffers.
    pub fn destroy<T: Transport>(self, hca: &mut Hca<T>) -> Result<(), HcaError> {
        self.qp.destroy(hca)?;
        self.scq.destroy(hca)?;
        self.rcq.destroy(hca)?;
        hca.free_dma(self.mem)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_query_golden() {
        let mut sgid = [0u8; 16];
        sgid[0] = 0xfe;
        sgid[1] = 0x80;
        sgid[15] = 0x01;
        let mut dgid = sgid;
        dgid[15] = 0x02;
        let m = path_query(sgid, dgid, 0xFFFF, 0);
        // Common header: version 1, class SA 0x03, class version 2, Get.
        assert_eq!(&m[..4], &[0x01, 0x03, 0x02, 0x01]);
        assert_eq!(&m[16..18], &[0x00, 0x35]);
        // Component mask DGID|SGID|NumbPath|TClass|P_Key = 0x340C at 48.
        assert_eq!(&m[48..56], &[0, 0, 0, 0, 0, 0, 0x34, 0x0C]);
        // PathRecord at 56: DGID at +8, SGID at +24, NumbPath at +49, P_Key at +50.
        assert_eq!(&m[56 + 8..56 + 24], &dgid);
        assert_eq!(&m[56 + 24..56 + 40], &sgid);
        assert_eq!(m[56 + 49], 0x01);
        assert_eq!(&m[56 + 50..56 + 52], &[0xFF, 0xFF]);
    }

    #[test]
    fn mc_join_golden() {
        let mut mgid = [0u8; 16];
        mgid[..6].copy_from_slice(&[0xff, 0x12, 0x40, 0x1b, 0xff, 0xff]);
        mgid[12..].copy_from_slice(&[0xff; 4]);
        let gid = [0x11u8; 16];
        let m = mc_join(mgid, gid, 0xFFFF, join::FULL, None);
        assert_eq!(&m[..4], &[0x01, 0x03, 0x02, 0x02], "SubnAdmSet");
        assert_eq!(&m[16..18], &[0x00, 0x38]);
        // MGID | PortGID | P_Key | JoinState = 0x10083.
        assert_eq!(&m[48..56], &[0, 0, 0, 0, 0, 0x01, 0x00, 0x83]);
        assert_eq!(&m[56..72], &mgid);
        assert_eq!(&m[72..88], &gid);
        assert_eq!(&m[56 + 40..56 + 42], &[0xFF, 0xFF]);
        assert_eq!(m[56 + 48], 0x01, "scope 0, JoinState FullMember");
        let l = mc_leave(mgid, gid, join::FULL);
        assert_eq!(l[3], 0x15, "SubnAdmDelete");
        assert_eq!(&l[48..56], &[0, 0, 0, 0, 0, 0x01, 0x00, 0x03]);
    }

    #[test]
    fn mc_record_parse_golden() {
        // A broadcast group record as OpenSM returns it: Q_Key 0xB1B, MLID
        // 0xC000, MTU exactly 2048 (0x84), rate exactly 10 Gb/s (0x83), SL 0,
        // hop limit 0, scope 2, FullMember.
        let mut d = [0u8; 52];
        d[32..36].copy_from_slice(&[0, 0, 0x0B, 0x1B]);
        d[36..38].copy_from_slice(&[0xC0, 0x00]);
        d[38] = 0x84;
        d[40..42].copy_from_slice(&[0xFF, 0xFF]);
        d[42] = 0x83;
        d[48] = 0x21;
        let r = McMemberRecord::parse(&d);
        assert_eq!(r.qkey, 0xB1B);
        assert_eq!(r.mlid, 0xC000);
        assert_eq!((r.mtu_selector, r.mtu), (2, 4));
        assert_eq!((r.rate_selector, r.rate), (2, 3));
        assert_eq!((r.scope, r.join_state), (2, 1));
        let mut back = [0u8; 52];
        r.emit(&mut back);
        assert_eq!(back, d);
    }

    #[test]
    fn path_record_round_trip() {
        let mut d = [0u8; 64];
        d[40..42].copy_from_slice(&[0x00, 0x07]);
        d[44..48].copy_from_slice(&[0x00, 0x00, 0x01, 0x40]); // flow label 1, hop limit 0x40
        d[49] = 0x81;
        d[52..54].copy_from_slice(&[0x00, 0x03]); // SL 3
        d[54] = 0x85;
        d[55] = 0x87;
        let r = PathRecord::parse(&d);
        assert_eq!(r.dlid, 7);
        assert_eq!(r.flow_label, 1);
        assert_eq!(r.hop_limit, 0x40);
        assert!(r.reversible);
        assert_eq!(r.sl, 3);
        assert_eq!((r.mtu_selector, r.mtu), (2, 5));
        let mut back = [0u8; 64];
        r.emit(&mut back);
        assert_eq!(back, d);
    }

    #[test]
    fn agent_retries_then_times_out() {
        let t0 = Instant::now();
        let mut a = MadAgent::new(0x100);
        let dest = MadDest {
            dlid: 1,
            dqpn: 1,
            sl: 0,
        };
        let (tid, first) = a.start(
            t0,
            sa_request(method::GET, attr::PATH_RECORD, 0, &[]),
            dest,
            Duration::from_millis(100),
            2,
        );
        let MadAction::Send(m, _) = first else {
            panic!()
        };
        assert_eq!(be64(&m, 8), tid);
        assert!(a.poll(t0 + Duration::from_millis(50)).is_empty());
        assert!(matches!(
            a.poll(t0 + Duration::from_millis(100))[..],
            [MadAction::Send(..)]
        ));
        assert!(matches!(
            a.poll(t0 + Duration::from_millis(200))[..],
            [MadAction::Send(..)]
        ));
        assert_eq!(
            a.poll(t0 + Duration::from_millis(300)),
            vec![MadAction::TimedOut(tid)]
        );
        assert_eq!(a.outstanding(), 0);
        assert_eq!(a.retries, 2);
    }

    #[test]
    fn agent_matches_responses_only_once() {
        let t0 = Instant::now();
        let mut a = MadAgent::new(0);
        let dest = MadDest {
            dlid: 1,
            dqpn: 1,
            sl: 0,
        };
        let (tid, MadAction::Send(mut m, _)) = a.start(
            t0,
            sa_request(method::GET, attr::PATH_RECORD, 0, &[]),
            dest,
            Duration::from_secs(1),
            0,
        ) else {
            panic!()
        };
        m[3] |= method::RESPONSE;
        assert_eq!(a.response(&m), Some(tid));
        assert_eq!(a.response(&m), None, "duplicate");
        assert_eq!(a.unmatched, 1);
        let mut req = m;
        req[3] = method::GET;
        assert_eq!(a.response(&req), None, "not a response");
    }
}
