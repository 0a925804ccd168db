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

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::hca::DeviceInbox;
use crate::pcap::PcapWriter;
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
}

impl Default for FabricConfig {
    fn default() -> Self {
        FabricConfig {
            mtu: 4096,
            pcap: None,
            seed: 1,
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
    /// Duplicated.
    pub duplicated: u64,
    /// Reordered.
    pub reordered: u64,
    /// Corrupted.
    pub corrupted: u64,
    /// Written to the capture.
    pub captured: u64,
}

#[derive(Debug)]
struct Port {
    inbox: DeviceInbox,
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
}

/// A fabric shared by the HCAs attached to it.
#[derive(Clone, Debug)]
pub struct Fabric {
    inner: Arc<Mutex<State>>,
}

/// An HCA's end of a link.
#[derive(Clone, Debug)]
pub struct FabricLink {
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
        Ok(Fabric {
            inner: Arc::new(Mutex::new(State {
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

    pub(crate) fn attach(&self, inbox: DeviceInbox) -> FabricLink {
        let mut st = self.state();
        st.ports.push(Port {
            inbox,
            lid: 0,
            up: false,
            admin_up: true,
            pkeys: vec![0xFFFF],
        });
        FabricLink {
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
        let mtu = mtu_code(st.cfg.mtu);
        let Some(p) = st.ports.get_mut(port) else {
            return;
        };
        p.admin_up = up;
        if up {
            if p.up {
                return;
            }
            p.up = true;
            p.inbox
                .port_config(p.lid, SM_LID, crate::port::state::ACTIVE, mtu);
        } else {
            p.up = false;
            p.inbox
                .port_config(p.lid, SM_LID, crate::port::state::DOWN, mtu);
        }
    }

    /// Flushes the capture file.
    pub fn flush(&self) {
        if let Some(p) = self.state().pcap.as_mut() {
            let _ = p.flush();
        }
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
        let multicast = dlid >= wire::MCAST_LID_BASE && dlid != wire::PERMISSIVE_LID;
        let pkey_ok = |tbl: &[u16]| {
            tbl.iter()
                .any(|&p| p & 0x7FFF == pkey & 0x7FFF && (p | pkey) & 0x8000 != 0)
        };
        let mut delivered = 0;
        let mut pkey_drop = false;
        for p in st
            .ports
            .iter()
            .filter(|p| p.up && (multicast || p.lid == dlid))
        {
            if !pkey_ok(&p.pkeys) {
                pkey_drop = true;
                continue;
            }
            p.inbox.packet(pkt.clone());
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

impl FabricLink {
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
        let mtu = mtu_code(st.cfg.mtu);
        let lid = match st.ports.get(self.port) {
            Some(p) if p.lid != 0 => p.lid,
            Some(_) => {
                let l = st.next_lid;
                st.next_lid += 1;
                l
            }
            None => return,
        };
        let Some(p) = st.ports.get_mut(self.port) else {
            return;
        };
        p.lid = lid;
        if !p.admin_up {
            return;
        }
        p.up = true;
        p.inbox
            .port_config(lid, SM_LID, crate::port::state::ACTIVE, mtu);
    }

    /// The HCA's link went down (TEARDOWN_HCA, reset).
    pub(crate) fn link_down(&self) {
        let mut st = self.fabric.state();
        if let Some(p) = st.ports.get_mut(self.port) {
            p.up = false;
        }
    }
}
