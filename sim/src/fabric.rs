//! The simulated InfiniBand fabric: one switch, links to HCAs, and a
//! subnet manager.
//!
//! Packets travel in IBA wire format. The switch routes unicast by DLID and
//! multicast by MLID to every active port (the HCA filters by its MGID
//! attachments, and this also stands in for the HCA's own loopback), drops
//! packets above the fabric MTU or whose P_Key the egress port does not
//! hold, and can lose, duplicate, reorder or corrupt packets on request.
//! Everything it carries can be written to a pcap.
//!
//! The subnet manager sits behind switch port 0 with LID 1. When an HCA's
//! link comes up it assigns the next free LID and takes the port to Active,
//! the effect of its SubnSet(PortInfo) on the HCA's management agent.

use std::collections::BinaryHeap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::hca::{DeviceInbox, PortConfig};
use crate::pcap::PcapWriter;
use crate::sm::{self, Partition, SmState, port_gid, sa_status};
use crate::wire;

/// LID of the subnet manager.
pub const SM_LID: u16 = 1;

/// Fabric settings.
#[derive(Clone, Debug)]
pub struct FabricConfig {
    /// Link MTU in bytes (2048 or 4096).
    pub mtu: u32,
    /// Capture every packet here.
    pub pcap: Option<PathBuf>,
    /// Seed for the fault injector.
    pub seed: u64,
    /// Partitions (empty: the default partition only).
    pub partitions: Vec<Partition>,
    /// One-way latency of a link, switch included.
    pub latency: Duration,
    /// Link signalling rate in Gb/s (0: unlimited). Each egress link sends
    /// one packet at a time, so packets queue behind each other.
    pub rate_gbps: u32,
}

impl Default for FabricConfig {
    fn default() -> Self {
        FabricConfig {
            mtu: 4096,
            pcap: None,
            seed: 1,
            partitions: Vec::new(),
            latency: Duration::ZERO,
            rate_gbps: 0,
        }
    }
}

/// Fault probabilities, each in parts per million of packets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkFaults {
    /// Drop.
    pub loss_ppm: u32,
    /// Deliver twice.
    pub duplicate_ppm: u32,
    /// Hold back and deliver after the next packet.
    pub reorder_ppm: u32,
    /// Flip a payload bit (the receiver's CRC check drops it).
    pub corrupt_ppm: u32,
}

/// Fabric counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FabricStats {
    /// Packets delivered to a port.
    pub delivered: u64,
    /// Dropped by injected loss.
    pub dropped_loss: u64,
    /// Dropped: above the MTU.
    pub dropped_mtu: u64,
    /// Dropped: P_Key not in the egress port's table.
    pub dropped_pkey: u64,
    /// Dropped: no port has the DLID, or it is down.
    pub dropped_no_route: u64,
    /// Dropped: malformed (shorter than an LRH).
    pub dropped_malformed: u64,
    /// Dropped: ICRC or VCRC wrong, or lengths inconsistent.
    pub dropped_bad_crc: u64,
    /// Duplicated.
    pub duplicated: u64,
    /// Reordered.
    pub reordered: u64,
    /// Corrupted.
    pub corrupted: u64,
    /// Written to the capture.
    pub captured: u64,
    /// SA requests answered.
    pub sa_requests: u64,
    /// Packets to the SM that were not SA requests.
    pub sa_dropped: u64,
}

#[derive(Debug)]
struct Port {
    inbox: DeviceInbox,
    /// When the egress link to this port is free again.
    busy_until: Instant,
    guid: u64,
    lid: u16,
    up: bool,
    admin_up: bool,
    pkeys: Vec<u16>,
}

#[derive(Debug)]
struct State {
    cfg: FabricConfig,
    ports: Vec<Port>,
    next_lid: u16,
    pcap: Option<PcapWriter>,
    faults: LinkFaults,
    rng: u64,
    held: Option<Vec<u8>>,
    stats: FabricStats,
    sm: SmState,
    delay: Option<Arc<DelayLine>>,
}

/// Packets in flight on timed links, delivered by their own thread.
#[derive(Debug, Default)]
struct DelayLine {
    q: Mutex<(BinaryHeap<InFlight>, bool)>,
    cv: Condvar,
}

#[derive(Debug)]
struct InFlight {
    due: Instant,
    seq: u64,
    inbox: DeviceInbox,
    pkt: Vec<u8>,
}

impl PartialEq for InFlight {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for InFlight {}
impl PartialOrd for InFlight {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for InFlight {
    /// Earliest first in a max-heap.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.due, o.seq).cmp(&(self.due, self.seq))
    }
}

impl DelayLine {
    fn run(self: Arc<Self>) {
        let mut g = self.q.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if g.1 {
                return;
            }
            let now = Instant::now();
            match g.0.peek().map(|f| f.due) {
                Some(due) if due <= now => {
                    if let Some(f) = g.0.pop() {
                        drop(g);
                        f.inbox.packet(f.pkt);
                        g = self.q.lock().unwrap_or_else(|p| p.into_inner());
                    }
                }
                Some(due) => {
                    g = self
                        .cv
                        .wait_timeout(g, due - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                None => {
                    g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
                }
            }
        }
    }

    fn push(&self, f: InFlight) {
        self.q.lock().unwrap_or_else(|p| p.into_inner()).0.push(f);
        self.cv.notify_one();
    }
}

impl Drop for State {
    fn drop(&mut self) {
        if let Some(d) = &self.delay {
            d.q.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
            d.cv.notify_one();
        }
    }
}

/// A fabric shared by the HCAs attached to it.
#[derive(Clone, Debug)]
pub struct Fabric {
    inner: Arc<Mutex<State>>,
}

/// An HCA's end of a link: a port of a fabric in this process, or a
/// connection to the fabric service.
#[derive(Clone, Debug)]
pub enum FabricLink {
    /// Same process.
    Local(LocalLink),
    /// Through the fabric service socket.
    Remote(crate::remote::SharedStream),
}

/// A port of an in-process fabric.
#[derive(Clone, Debug)]
pub struct LocalLink {
    fabric: Fabric,
    port: usize,
}

fn mtu_code(bytes: u32) -> u8 {
    match bytes {
        256 => 1,
        512 => 2,
        1024 => 3,
        2048 => 4,
        _ => 5,
    }
}

impl Fabric {
    /// A fabric with no HCAs yet.
    pub fn new(cfg: FabricConfig) -> std::io::Result<Fabric> {
        let pcap = match &cfg.pcap {
            Some(p) => Some(PcapWriter::create(p)?),
            None => None,
        };
        let delay = (!cfg.latency.is_zero() || cfg.rate_gbps > 0).then(|| {
            let d = Arc::new(DelayLine::default());
            let runner = d.clone();
            std::thread::Builder::new()
                .name("fabric-links".into())
                .spawn(move || runner.run())
                .map(|_| d)
        });
        let delay = match delay {
            Some(Ok(d)) => Some(d),
            Some(Err(e)) => return Err(e),
            None => None,
        };
        Ok(Fabric {
            inner: Arc::new(Mutex::new(State {
                delay,
                sm: SmState::new(cfg.partitions.clone()),
                rng: cfg.seed | 1,
                cfg,
                ports: Vec::new(),
                next_lid: SM_LID + 1,
                pcap,
                faults: LinkFaults::default(),
                held: None,
                stats: FabricStats::default(),
            })),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn attach(&self, inbox: DeviceInbox, guid: u64) -> LocalLink {
        let mut st = self.state();
        st.ports.push(Port {
            inbox,
            busy_until: Instant::now(),
            guid,
            lid: 0,
            up: false,
            admin_up: true,
            pkeys: vec![0xFFFF],
        });
        LocalLink {
            fabric: self.clone(),
            port: st.ports.len() - 1,
        }
    }

    /// Counters.
    pub fn stats(&self) -> FabricStats {
        self.state().stats
    }

    /// Sets the fault probabilities.
    pub fn set_faults(&self, f: LinkFaults) {
        self.state().faults = f;
    }

    /// Takes the link of HCA `port` (attach order, 0-based) down or up, as
    /// pulling and replugging the cable.
    pub fn set_link(&self, port: usize, up: bool) {
        let mut st = self.state();
        let Some(p) = st.ports.get_mut(port) else {
            return;
        };
        p.admin_up = up;
        if p.up == up || p.lid == 0 {
            return;
        }
        p.up = up;
        let state = if up {
            crate::port::state::ACTIVE
        } else {
            crate::port::state::DOWN
        };
        Self::configure(&st, port, state, false);
    }

    /// The SM gives HCA `port` a new LID (as after a subnet re-sweep).
    pub fn set_lid(&self, port: usize, lid: u16) {
        let mut st = self.state();
        if lid == 0 || lid >= wire::MCAST_LID_BASE || st.ports.iter().any(|p| p.lid == lid) {
            return;
        }
        let Some(p) = st.ports.get_mut(port) else {
            return;
        };
        p.lid = lid;
        if p.up {
            Self::configure(&st, port, crate::port::state::ACTIVE, false);
        }
    }

    /// Restarts the subnet manager: client-created groups and all
    /// memberships are lost, every port is asked to re-register.
    pub fn restart_sm(&self) {
        let mut st = self.state();
        st.sm.restart();
        for i in 0..st.ports.len() {
            if st.ports[i].up {
                Self::configure(&st, i, crate::port::state::ACTIVE, true);
            }
        }
    }

    /// Replaces the partitions; ports get their new P_Key tables.
    pub fn set_partitions(&self, partitions: Vec<Partition>) {
        let mut st = self.state();
        let groups = std::mem::take(&mut st.sm.groups);
        st.sm = SmState::new(partitions);
        // A re-sweep keeps the groups and their members (as OpenSM does);
        // groups of a partition that no longer exists go.
        for (k, g) in groups {
            if st.sm.partitions.iter().any(|p| p.pkey == g.pkey & 0x7FFF) {
                st.sm.groups.insert(k, g);
            }
        }
        for i in 0..st.ports.len() {
            st.ports[i].pkeys = st.sm.pkey_table(st.ports[i].guid);
            if st.ports[i].up {
                Self::configure(&st, i, crate::port::state::ACTIVE, false);
            }
        }
    }

    /// Multicast groups the SA knows, as (MGID, MLID, member count).
    pub fn groups(&self) -> Vec<([u8; 16], u16, usize)> {
        self.state()
            .sm
            .groups
            .values()
            .map(|g| (g.mgid, g.mlid, g.members.len()))
            .collect()
    }

    fn configure(st: &State, port: usize, state: u8, reregister: bool) {
        let Some(p) = st.ports.get(port) else { return };
        p.inbox.port_config(PortConfig {
            lid: p.lid,
            sm_lid: SM_LID,
            state,
            mtu: mtu_code(st.cfg.mtu),
            pkeys: p.pkeys.clone(),
            reregister,
        });
    }

    /// Flushes the capture file.
    pub fn flush(&self) {
        if let Some(p) = self.state().pcap.as_mut() {
            let _ = p.flush();
        }
    }

    /// Answers an SA request addressed to the SM.
    fn sa(st: &mut State, pkt: &[u8]) {
        let Ok((h, range)) = wire::parse(pkt) else {
            st.stats.sa_dropped += 1;
            return;
        };
        let payload = &pkt[range];
        let Some((qkey, src_qp)) = h.deth else {
            st.stats.sa_dropped += 1;
            return;
        };
        if h.dest_qp != 1 || qkey != 0x8001_0000 || payload.len() < 256 || payload[1] != 0x03 {
            st.stats.sa_dropped += 1;
            return;
        }
        let Some(requester) = st.ports.iter().position(|p| p.up && p.lid == h.slid) else {
            st.stats.sa_dropped += 1;
            return;
        };
        let mut mad = [0u8; 256];
        mad.copy_from_slice(&payload[..256]);
        let (status, resp_method) = Self::sa_process(st, requester, &mut mad);
        mad[3] = resp_method;
        mad[4..6].copy_from_slice(&status.to_be_bytes());
        st.stats.sa_requests += 1;
        let reply = wire::Headers {
            sl: 0,
            dlid: h.slid,
            slid: SM_LID,
            opcode: wire::OP_UD_SEND_ONLY,
            // The SM's port is a full member of every partition: its
            // packets carry the full P_Key, which a limited member accepts.
            pkey: h.pkey | 0x8000,
            dest_qp: src_qp,
            deth: Some((0x8001_0000, 1)),
            ..wire::Headers::default()
        };
        let out = wire::build(&reply, &mad);
        if let Some(w) = st.pcap.as_mut()
            && w.write(&out).is_ok()
        {
            st.stats.captured += 1;
        }
        Self::route(st, out);
    }

    /// Processes one SA MAD in place; returns (status, response method).
    fn sa_process(st: &mut State, requester: usize, mad: &mut [u8; 256]) -> (u16, u8) {
        let method = mad[3];
        let attr = u16::from_be_bytes([mad[16], mad[17]]);
        let mask = u64::from_be_bytes(mad[48..56].try_into().unwrap_or([0; 8]));
        let resp = if method == 0x15 { 0x95 } else { 0x81 };
        let guid = st.ports[requester].guid;
        let table = st.ports[requester].pkeys.clone();
        let has_pkey = |tbl: &[u16], pk: u16| tbl.iter().any(|&p| p & 0x7FFF == pk & 0x7FFF);
        match (method, attr) {
            (0x01, 0x0035) => {
                let d = &mad[56..120];
                let dgid: [u8; 16] = d[8..24].try_into().unwrap_or([0; 16]);
                let dlid = u16::from_be_bytes([d[40], d[41]]);
                let dst = if mask & (1 << 2) != 0 {
                    let prefix = u64::from_be_bytes(dgid[..8].try_into().unwrap_or([0; 8]));
                    let g = u64::from_be_bytes(dgid[8..].try_into().unwrap_or([0; 8]));
                    if prefix != sm::SUBNET_PREFIX {
                        return (sa_status::NO_RECORDS, resp);
                    }
                    st.ports.iter().find(|p| p.guid == g && p.up)
                } else if mask & (1 << 4) != 0 {
                    st.ports.iter().find(|p| p.lid == dlid && p.up)
                } else {
                    return (sa_status::INSUFFICIENT_COMPONENTS, resp);
                };
                let Some(dst) = dst else {
                    return (sa_status::NO_RECORDS, resp);
                };
                let want = u16::from_be_bytes([d[50], d[51]]);
                let pkey = if mask & (1 << 13) != 0 { want } else { 0xFFFF };
                if !has_pkey(&table, pkey) || !has_pkey(&dst.pkeys, pkey) {
                    return (sa_status::NO_RECORDS, resp);
                }
                let tclass = d[48];
                let mut r = [0u8; 64];
                r[8..24].copy_from_slice(&port_gid(dst.guid));
                r[24..40].copy_from_slice(&port_gid(guid));
                r[40..42].copy_from_slice(&dst.lid.to_be_bytes());
                r[42..44].copy_from_slice(&st.ports[requester].lid.to_be_bytes());
                r[48] = tclass;
                r[49] = 0x80 | 1; // reversible, one path
                r[50..52].copy_from_slice(&(pkey | 0x8000 & pkey).to_be_bytes());
                r[54] = 0x80 | mtu_code(st.cfg.mtu); // exactly
                r[55] = 0x80 | 7; // exactly 40 Gb/s
                r[56] = 0x80 | 18; // packet lifetime
                mad[56..120].copy_from_slice(&r);
                (0, resp)
            }
            (0x02 | 0x15, 0x0038) => {
                let d: [u8; 52] = mad[56..108].try_into().unwrap_or([0; 52]);
                let mgid: [u8; 16] = d[0..16].try_into().unwrap_or([0; 16]);
                let pgid: [u8; 16] = d[16..32].try_into().unwrap_or([0; 16]);
                let join_state = d[48] & 0x0F;
                if mask & 0b11 != 0b11 || mask & (1 << 16) == 0 || join_state == 0 {
                    return (sa_status::INSUFFICIENT_COMPONENTS, resp);
                }
                if pgid != port_gid(guid) || mgid[0] != 0xFF {
                    return (sa_status::INVALID_GID, resp);
                }
                let out = if method == 0x02 {
                    Self::mc_join(st, &table, &d, mask, mgid, pgid, join_state)
                } else {
                    Self::mc_leave(st, mgid, pgid, join_state)
                };
                match out {
                    Ok(r) => {
                        mad[56..108].copy_from_slice(&r);
                        (0, resp)
                    }
                    Err(s) => (s, resp),
                }
            }
            _ => (sa_status::UNSUPPORTED, resp),
        }
    }

    fn group_record(g: &sm::Group, pgid: [u8; 16], js: u8) -> [u8; 52] {
        let mut r = [0u8; 52];
        r[0..16].copy_from_slice(&g.mgid);
        r[16..32].copy_from_slice(&pgid);
        r[32..36].copy_from_slice(&g.qkey.to_be_bytes());
        r[36..38].copy_from_slice(&g.mlid.to_be_bytes());
        r[38] = 0x80 | g.mtu;
        r[39] = g.tclass;
        r[40..42].copy_from_slice(&g.pkey.to_be_bytes());
        r[42] = 0x80 | g.rate;
        r[43] = 0x80 | 18;
        let w = (u32::from(g.sl) << 28) | ((g.flow_label & 0xF_FFFF) << 8) | u32::from(g.hop_limit);
        r[44..48].copy_from_slice(&w.to_be_bytes());
        r[48] = (g.scope << 4) | (js & 0x0F);
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn mc_join(
        st: &mut State,
        table: &[u16],
        d: &[u8; 52],
        mask: u64,
        mgid: [u8; 16],
        pgid: [u8; 16],
        js: u8,
    ) -> Result<[u8; 52], u16> {
        let pkey = u16::from_be_bytes([d[40], d[41]]);
        let qkey = u32::from_be_bytes([d[32], d[33], d[34], d[35]]);
        if let Some(g) = st.sm.groups.get_mut(&mgid) {
            if mask & (1 << 7) != 0 && pkey & 0x7FFF != g.pkey & 0x7FFF {
                return Err(sa_status::REQ_INVALID);
            }
            if mask & (1 << 2) != 0 && qkey != g.qkey {
                return Err(sa_status::REQ_INVALID);
            }
            if mask & (1 << 5) != 0 && d[38] >> 6 == 2 && d[38] & 0x3F != g.mtu {
                return Err(sa_status::REQ_INVALID);
            }
            if !table.iter().any(|&p| p & 0x7FFF == g.pkey & 0x7FFF) {
                return Err(sa_status::REQ_INVALID);
            }
            let e = g.members.entry(pgid).or_insert(0);
            *e |= js;
            let now = *e;
            return Ok(Self::group_record(g, pgid, now));
        }
        // Creating a group needs the parameters (IPoIB supplies them from
        // the broadcast group) and a full or send-only-full member.
        let need = (1 << 2) | (1 << 6) | (1 << 7) | (1 << 12) | (1 << 13);
        if mask & need != need {
            return Err(sa_status::INSUFFICIENT_COMPONENTS);
        }
        if js & (sm_join::FULL | sm_join::SEND_ONLY_FULL) == 0 {
            return Err(sa_status::REQ_INVALID);
        }
        if !table.iter().any(|&p| p & 0x7FFF == pkey & 0x7FFF) {
            return Err(sa_status::REQ_INVALID);
        }
        let w = u32::from_be_bytes([d[44], d[45], d[46], d[47]]);
        let mtu = if mask & (1 << 5) != 0 {
            d[38] & 0x3F
        } else {
            mtu_code(st.cfg.mtu)
        };
        if mtu > mtu_code(st.cfg.mtu) || mtu == 0 {
            return Err(sa_status::REQ_INVALID);
        }
        let mlid = st.sm_alloc_mlid();
        let mut g = sm::Group {
            mgid,
            mlid,
            qkey,
            mtu,
            rate: if mask & (1 << 9) != 0 {
                d[42] & 0x3F
            } else {
                3
            },
            sl: (w >> 28) as u8,
            tclass: d[39],
            flow_label: (w >> 8) & 0xF_FFFF,
            hop_limit: w as u8,
            pkey: pkey | 0x8000,
            scope: mgid[1] & 0x0F,
            members: Default::default(),
            permanent: false,
        };
        g.members.insert(pgid, js);
        let r = Self::group_record(&g, pgid, js);
        st.sm.groups.insert(mgid, g);
        Ok(r)
    }

    fn mc_leave(st: &mut State, mgid: [u8; 16], pgid: [u8; 16], js: u8) -> Result<[u8; 52], u16> {
        let Some(g) = st.sm.groups.get_mut(&mgid) else {
            return Err(sa_status::REQ_INVALID);
        };
        let Some(cur) = g.members.get_mut(&pgid) else {
            return Err(sa_status::REQ_INVALID);
        };
        *cur &= !js;
        let left = *cur;
        if left == 0 {
            g.members.remove(&pgid);
        }
        let r = Self::group_record(g, pgid, left);
        if g.members.is_empty() && !g.permanent {
            st.sm.groups.remove(&mgid);
        }
        Ok(r)
    }

    fn next_rand(st: &mut State) -> u32 {
        // xorshift64*: deterministic for a seed.
        let mut x = st.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        st.rng = x;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as u32 % 1_000_000
    }

    fn route(st: &mut State, pkt: Vec<u8>) {
        if pkt.len() < wire::LRH_LEN + wire::BTH_LEN {
            st.stats.dropped_malformed += 1;
            return;
        }
        // Every hop checks the length and the VCRC; a packet corrupted on
        // the link dies at the switch. The ICRC is the receiver's to check.
        if wire::check_link(&pkt).is_err() {
            st.stats.dropped_bad_crc += 1;
            return;
        }
        let dlid = u16::from_be_bytes([pkt[2], pkt[3]]);
        let grh = pkt[1] & 3 == wire::LNH_GLOBAL;
        let bth = wire::LRH_LEN + if grh { wire::GRH_LEN } else { 0 };
        let pkey = pkt
            .get(bth + 2..bth + 4)
            .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
        // Payload beyond headers and CRCs must fit the MTU.
        let hdrs = bth + wire::BTH_LEN + wire::DETH_LEN + 6;
        if pkt.len().saturating_sub(hdrs) > st.cfg.mtu as usize {
            st.stats.dropped_mtu += 1;
            return;
        }
        if dlid == SM_LID {
            return Self::sa(st, &pkt);
        }
        let multicast = dlid >= wire::MCAST_LID_BASE && dlid != wire::PERMISSIVE_LID;
        let receivers: Vec<u64> = if multicast {
            st.sm
                .receivers(dlid)
                .iter()
                .map(|g| u64::from_be_bytes([g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]]))
                .collect()
        } else {
            Vec::new()
        };
        let pkey_ok = |tbl: &[u16]| {
            tbl.iter()
                .any(|&p| p & 0x7FFF == pkey & 0x7FFF && (p | pkey) & 0x8000 != 0)
        };
        let mut delivered = 0;
        let mut pkey_drop = false;
        let now = Instant::now();
        // Serialization time of this packet on a link (bits / rate).
        let wire_time = if st.cfg.rate_gbps > 0 {
            Duration::from_nanos(pkt.len() as u64 * 8 / u64::from(st.cfg.rate_gbps))
        } else {
            Duration::ZERO
        };
        let latency = st.cfg.latency;
        let delay = st.delay.clone();
        let seq = st.stats.delivered;
        for p in st.ports.iter_mut().filter(|p| {
            p.up && if multicast {
                receivers.contains(&p.guid)
            } else {
                p.lid == dlid
            }
        }) {
            if !pkey_ok(&p.pkeys) {
                pkey_drop = true;
                continue;
            }
            match &delay {
                Some(d) => {
                    let start = p.busy_until.max(now);
                    p.busy_until = start + wire_time;
                    d.push(InFlight {
                        due: p.busy_until + latency,
                        seq: seq + delivered,
                        inbox: p.inbox.clone(),
                        pkt: pkt.clone(),
                    });
                }
                None => p.inbox.packet(pkt.clone()),
            }
            delivered += 1;
        }
        if delivered == 0 {
            if pkey_drop {
                st.stats.dropped_pkey += 1;
            } else {
                st.stats.dropped_no_route += 1;
            }
        }
        st.stats.delivered += delivered;
    }
}

/// JoinState bits the SA checks.
mod sm_join {
    pub const FULL: u8 = 1 << 0;
    pub const SEND_ONLY_FULL: u8 = 1 << 3;
}

impl State {
    fn sm_alloc_mlid(&mut self) -> u16 {
        let used: std::collections::BTreeSet<u16> =
            self.sm.groups.values().map(|g| g.mlid).collect();
        (sm::MLID_BASE..0xFFFF)
            .find(|m| !used.contains(m))
            .unwrap_or(sm::MLID_BASE)
    }
}

impl FabricLink {
    /// The HCA puts a packet on its link.
    pub(crate) fn transmit(&self, pkt: Vec<u8>) {
        match self {
            FabricLink::Local(l) => l.transmit(pkt),
            FabricLink::Remote(s) => {
                crate::remote::send(s, crate::remote::kind::PACKET, &pkt);
            }
        }
    }

    /// The HCA's physical link came up.
    pub(crate) fn link_up(&self) {
        match self {
            FabricLink::Local(l) => l.link_up(),
            FabricLink::Remote(s) => {
                crate::remote::send(s, crate::remote::kind::LINK_UP, &[]);
            }
        }
    }

    /// The HCA's link went down.
    pub(crate) fn link_down(&self) {
        match self {
            FabricLink::Local(l) => l.link_down(),
            FabricLink::Remote(s) => {
                crate::remote::send(s, crate::remote::kind::LINK_DOWN, &[]);
            }
        }
    }
}

impl LocalLink {
    /// The HCA puts a packet on its link.
    pub(crate) fn transmit(&self, mut pkt: Vec<u8>) {
        let mut st = self.fabric.state();
        if !st.ports.get(self.port).is_some_and(|p| p.up) {
            st.stats.dropped_no_route += 1;
            return;
        }
        if let Some(w) = st.pcap.as_mut()
            && w.write(&pkt).is_ok()
        {
            st.stats.captured += 1;
        }
        let f = st.faults;
        if f.loss_ppm > 0 && Fabric::next_rand(&mut st) < f.loss_ppm {
            st.stats.dropped_loss += 1;
            return;
        }
        if f.corrupt_ppm > 0 && Fabric::next_rand(&mut st) < f.corrupt_ppm {
            let at = pkt.len() / 2;
            pkt[at] ^= 0x10;
            st.stats.corrupted += 1;
        }
        if f.reorder_ppm > 0 && st.held.is_none() && Fabric::next_rand(&mut st) < f.reorder_ppm {
            st.held = Some(pkt);
            st.stats.reordered += 1;
            return;
        }
        let dup = f.duplicate_ppm > 0 && Fabric::next_rand(&mut st) < f.duplicate_ppm;
        if dup {
            st.stats.duplicated += 1;
            Fabric::route(&mut st, pkt.clone());
        }
        Fabric::route(&mut st, pkt);
        if let Some(h) = st.held.take() {
            Fabric::route(&mut st, h);
        }
    }

    /// The HCA's physical link came up (INIT_HCA): the SM assigns a LID and
    /// activates the port.
    pub(crate) fn link_up(&self) {
        let mut st = self.fabric.state();
        let Some(p) = st.ports.get(self.port) else {
            return;
        };
        let (lid, guid) = (p.lid, p.guid);
        let lid = if lid != 0 {
            lid
        } else {
            let l = st.next_lid;
            st.next_lid += 1;
            l
        };
        let pkeys = st.sm.pkey_table(guid);
        let Some(p) = st.ports.get_mut(self.port) else {
            return;
        };
        p.lid = lid;
        p.pkeys = pkeys;
        if !p.admin_up {
            return;
        }
        p.up = true;
        // The SM's sweep: the port (INIT once its link trained) gets its
        // LID and P_Keys and goes to ARMED, then to ACTIVE.
        Fabric::configure(&st, self.port, crate::port::state::ARMED, false);
        Fabric::configure(&st, self.port, crate::port::state::ACTIVE, false);
    }

    /// The HCA's link went down (TEARDOWN_HCA, reset).
    pub(crate) fn link_down(&self) {
        let mut st = self.fabric.state();
        if let Some(p) = st.ports.get_mut(self.port) {
            p.up = false;
        }
    }
}
