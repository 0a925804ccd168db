//! Ethernet ⇄ IPoIB translation for guests (ipoib.md §15).
//!
//! A guest sees an ordinary Ethernet NIC; its vNIC is an IPoIB endpoint of
//! its own (own UD QPN, the port's GID). [`Translator`] sits between the
//! two, the way eIPoIB, WinOF and iPXE did:
//!
//! - Remote IPoIB addresses are shown to the guest as synthetic,
//!   locally administered unicast MACs ("REMACs"), derived from a hash of
//!   the remote GID and QPN so that the same peer gets the same MAC after a
//!   restart and a guest's ARP cache stays valid ([`RemacTable`]).
//! - ARP is rewritten between its Ethernet (hrd 1, hln 6) and IPoIB
//!   (hrd 32, hln 20) forms; IPv6 neighbour discovery has its link-layer
//!   options rewritten (8-byte Ethernet ⇄ 24-byte IPoIB), with the IPv6
//!   payload length and the ICMPv6 checksum recomputed. The guest resolves
//!   its neighbours itself: the translation only changes addresses.
//! - Broadcast and IP multicast frames go to the multicast group of their
//!   IP destination; unicast frames to the IPoIB address behind the REMAC.
//! - What IPoIB cannot carry (other EtherTypes, 802.3 length frames,
//!   VLAN tags, Ethernet multicast not derived from an IP group, unknown
//!   destination MACs) and what a guest may not send (another source MAC,
//!   a source IP that is not its own) is dropped with a reason.
//!
//! Pure logic: frames in, frames and decisions out, the clock passed in.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use super::addr::{HW_ADDR_LEN, HwAddr};
use super::arp::{ARP_LEN, Arp, Op};
use super::dhcp;
use super::nd::{self, LLA_OPTION_LEN, NEXT_HEADER_ICMPV6};
use super::{Gid, IPV6_HEADER, be16, checksum, ethertype, ipv4_at, ipv6_at, mgid};

/// Length of an Ethernet header.
pub const ETH_HLEN: usize = 14;
/// Shortest Ethernet frame (without FCS); shorter ones are padded.
pub const ETH_MIN_FRAME: usize = 60;
/// Length of an Ethernet/IPv4 ARP body.
pub const ETH_ARP_LEN: usize = 28;
/// Length of an Ethernet link-layer address option of ND.
const ETH_LLA_OPTION_LEN: usize = 8;
/// Remote addresses shown to one guest at most; past it the least recently
/// used one is forgotten (it comes back with the same MAC when seen again).
pub const MAX_REMACS: usize = 4096;
/// Addresses one guest may use as sources when none are configured.
pub const MAX_GUEST_ADDRS: usize = 16;
/// (LID, QPN) → IPoIB address entries kept to name the source of unicast
/// packets that arrive without a GRH.
const MAX_SOURCES: usize = 4096;
/// EtherType of an 802.1Q tag.
const ETHERTYPE_VLAN: u16 = 0x8100;
/// EtherType of an 802.1ad tag.
const ETHERTYPE_QINQ: u16 = 0x88a8;
/// ND option: MTU.
const OPT_MTU: u8 = 5;
/// Groups a guest's reports may add before the caller takes them.
const MAX_PENDING_LISTENS: usize = 64;
/// DHCP transactions of a guest remembered, for their replies.
const MAX_DHCP_XIDS: usize = 8;
/// IP protocol numbers.
const PROTO_IGMP: u8 = 2;
const PROTO_ICMP: u8 = 1;
/// Bytes of the original packet an ICMPv4 error quotes: the error stays
/// within 576 bytes (RFC 1812 §4.3.2.3).
const ICMP4_QUOTE: usize = 576 - 20 - 8;
/// The same for ICMPv6: within the IPv6 minimum MTU (RFC 4443 §2.4 (c)).
const ICMP6_QUOTE: usize = 1280 - IPV6_HEADER - 8;
const NEXT_HOP_BY_HOP: u8 = 0;

/// A 48-bit Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: Mac = Mac([0xff; 6]);

    /// Reads a MAC from the first six bytes of `b`.
    fn at(b: &[u8], at: usize) -> Option<Mac> {
        b.get(at..at + 6)
            .and_then(|s| <[u8; 6]>::try_from(s).ok())
            .map(Mac)
    }

    /// The group bit is set (broadcast included).
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 != 0
    }

    /// A locally administered unicast MAC derived from `bytes` (FNV-1a):
    /// the same bytes give the same MAC, run after run.
    pub fn local_from(bytes: impl IntoIterator<Item = u8>) -> Mac {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let b = h.to_be_bytes();
        Mac([(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]])
    }

    /// The multicast MAC of an IPv4 group (RFC 1112 §6.4).
    pub fn ipv4_multicast(group: Ipv4Addr) -> Mac {
        let o = group.octets();
        Mac([0x01, 0x00, 0x5e, o[1] & 0x7f, o[2], o[3]])
    }

    /// The multicast MAC of an IPv6 group (RFC 2464 §7).
    pub fn ipv6_multicast(group: Ipv6Addr) -> Mac {
        let o = group.octets();
        Mac([0x33, 0x33, o[12], o[13], o[14], o[15]])
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Error parsing a MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a MAC address (six hex bytes separated by colons): {0:?}")]
pub struct ParseMacError(String);

impl std::str::FromStr for Mac {
    type Err = ParseMacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut m = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut m {
            let p = parts.next().ok_or_else(|| ParseMacError(s.into()))?;
            if p.len() != 2 {
                return Err(ParseMacError(s.into()));
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| ParseMacError(s.into()))?;
        }
        if parts.next().is_some() {
            return Err(ParseMacError(s.into()));
        }
        Ok(Mac(m))
    }
}

/// Why a frame was dropped; one counter each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EthDrop {
    /// Too short, or headers that do not parse.
    Malformed,
    /// From the guest with a source MAC that is not the vNIC's.
    SpoofedMac,
    /// From the guest with a source IP that is not the guest's.
    SpoofedIp,
    /// Unicast to a MAC that names no IPoIB address.
    UnknownMac,
    /// An EtherType IPoIB does not carry (or an 802.3 length field).
    Ethertype,
    /// An 802.1Q or 802.1ad tagged frame.
    Vlan,
    /// Ethernet multicast that is not the MAC of its IP group.
    NotIpMulticast,
    /// ARP or ND that is not the expected shape.
    BadControl,
    /// A unicast packet from the fabric whose sender is unknown (no GRH
    /// and no earlier ARP/ND from it).
    UnknownSource,
    /// A DHCP reply for a transaction this guest did not start.
    DhcpOther,
}

impl EthDrop {
    /// Every reason, in the order tools print them.
    pub const ALL: [EthDrop; 10] = [
        EthDrop::Malformed,
        EthDrop::SpoofedMac,
        EthDrop::SpoofedIp,
        EthDrop::UnknownMac,
        EthDrop::Ethertype,
        EthDrop::Vlan,
        EthDrop::NotIpMulticast,
        EthDrop::BadControl,
        EthDrop::UnknownSource,
        EthDrop::DhcpOther,
    ];

    /// The counter name.
    pub fn name(self) -> &'static str {
        match self {
            EthDrop::Malformed => "drop_eth_malformed",
            EthDrop::SpoofedMac => "drop_spoofed_mac",
            EthDrop::SpoofedIp => "drop_spoofed_ip",
            EthDrop::UnknownMac => "drop_unknown_mac",
            EthDrop::Ethertype => "drop_eth_ethertype",
            EthDrop::Vlan => "drop_vlan",
            EthDrop::NotIpMulticast => "drop_not_ip_multicast",
            EthDrop::BadControl => "drop_eth_bad_arp_nd",
            EthDrop::UnknownSource => "drop_unknown_source",
            EthDrop::DhcpOther => "drop_dhcp_other",
        }
    }
}

/// Where a guest frame goes on the fabric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Unicast to this IPoIB address (path resolved by its GID).
    Unicast(HwAddr),
    /// To this multicast group (joined send-only if not a member).
    Group(Gid),
}

/// A guest's word on an IP multicast group (IGMP or MLD snooped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// It listens to the group.
    Join(IpAddr),
    /// It left the group.
    Leave(IpAddr),
}

/// What to send for a guest frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestTx {
    /// The bytes after the Ethernet header go out unchanged.
    Forward {
        /// Destination.
        to: Target,
        /// For the IPoIB header.
        ethertype: u16,
    },
    /// The translated packet (`len` bytes) is in the output buffer.
    Rewritten {
        /// Destination.
        to: Target,
        /// For the IPoIB header.
        ethertype: u16,
        /// Length written.
        len: usize,
    },
}

/// The sender of a packet from the fabric, from its CQE and GRH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sender {
    /// Source LID.
    pub slid: u16,
    /// Source QPN.
    pub sqpn: u32,
    /// Source GID, when the packet had a GRH.
    pub sgid: Option<Gid>,
    /// Sent to a multicast group.
    pub multicast: bool,
}

/// What to hand the guest for a packet from the fabric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestRx {
    /// This Ethernet header, followed by the IPoIB payload unchanged.
    Header([u8; ETH_HLEN]),
    /// The whole frame (`len` bytes, padded to the Ethernet minimum) is in
    /// the output buffer.
    Rewritten(usize),
}

#[derive(Debug, Clone, Copy)]
struct Remac {
    hw: HwAddr,
    last_used: Instant,
}

/// Synthetic MACs for remote IPoIB addresses, in both directions.
#[derive(Debug)]
pub struct RemacTable {
    by_mac: HashMap<Mac, Remac>,
    by_id: HashMap<(u32, Gid), Mac>,
    cap: usize,
}

impl RemacTable {
    /// An empty table holding at most `cap` addresses.
    pub fn new(cap: usize) -> Self {
        Self {
            by_mac: HashMap::new(),
            by_id: HashMap::new(),
            cap: cap.max(1),
        }
    }

    /// Number of addresses held.
    pub fn len(&self) -> usize {
        self.by_mac.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.by_mac.is_empty()
    }

    /// The MAC shown for `hw` (created if new). The flags of `hw` replace
    /// those stored: they are the peer's latest word on connected mode.
    pub fn mac_for(&mut self, hw: HwAddr, now: Instant) -> Mac {
        let id = (hw.qpn(), hw.gid());
        if let Some(&mac) = self.by_id.get(&id)
            && let Some(e) = self.by_mac.get_mut(&mac)
        {
            e.hw = hw;
            e.last_used = now;
            return mac;
        }
        if self.by_mac.len() >= self.cap {
            self.evict_oldest();
        }
        // The hash, then the next salts on a collision: reproducible for
        // the same set of peers.
        let mut salt = 0u8;
        let mac = loop {
            let m = synthetic_mac(&hw, salt);
            if !self.by_mac.contains_key(&m) {
                break m;
            }
            salt = salt.wrapping_add(1);
        };
        self.by_mac.insert(mac, Remac { hw, last_used: now });
        self.by_id.insert(id, mac);
        mac
    }

    /// The IPoIB address behind `mac`, if it is one of ours.
    pub fn lookup(&mut self, mac: Mac, now: Instant) -> Option<HwAddr> {
        let e = self.by_mac.get_mut(&mac)?;
        e.last_used = now;
        Some(e.hw)
    }

    /// Every mapping, for reports.
    pub fn entries(&self) -> Vec<(Mac, HwAddr)> {
        let mut v: Vec<_> = self.by_mac.iter().map(|(m, e)| (*m, e.hw)).collect();
        v.sort();
        v
    }

    fn evict_oldest(&mut self) {
        let Some((&mac, e)) = self.by_mac.iter().min_by_key(|(_, e)| e.last_used) else {
            return;
        };
        let id = (e.hw.qpn(), e.hw.gid());
        self.by_mac.remove(&mac);
        self.by_id.remove(&id);
    }
}

/// A locally administered unicast MAC from FNV-1a over the QPN, the GID
/// and a salt.
fn synthetic_mac(hw: &HwAddr, salt: u8) -> Mac {
    Mac::local_from(hw.0[1..].iter().chain(std::iter::once(&salt)).copied())
}

/// The guest's side of one vNIC; see the module documentation.
#[derive(Debug)]
pub struct Translator {
    mac: Mac,
    /// The MAC is not configured: each guest's is taken from its first
    /// frame (a VMM such as QEMU gives the guest its own).
    learns_mac: bool,
    /// The next frame's source MAC is taken as the guest's.
    learn_mac: bool,
    hw: HwAddr,
    pkey: u16,
    scope: u8,
    mtu: u32,
    /// Configured source addresses; empty means "learn".
    allowed: Vec<IpAddr>,
    /// Addresses seen from the guest (or the configured ones).
    addresses: Vec<IpAddr>,
    addresses_changed: bool,
    remacs: RemacTable,
    sources: HashMap<(u16, u32), HwAddr>,
    /// Groups the guest reported it listens to or left (IGMP, MLD), not
    /// yet taken.
    listens: Vec<Listen>,
    /// The guest's recent DHCP transactions, and whether a client
    /// identifier was inserted into them.
    dhcp_xids: std::collections::VecDeque<(u32, bool)>,
    drops: [u64; EthDrop::ALL.len()],
}

impl Translator {
    /// A translator for a guest with MAC `mac` behind the IPoIB address
    /// `hw` on P_Key `pkey`. `allowed` lists the source addresses the guest
    /// may use; empty, the first [`MAX_GUEST_ADDRS`] it uses are learned.
    /// IPv6 link-local sources are always learned.
    pub fn new(mac: Mac, hw: HwAddr, pkey: u16, scope: u8, mtu: u32, allowed: Vec<IpAddr>) -> Self {
        Self {
            mac,
            learns_mac: false,
            learn_mac: false,
            hw,
            pkey,
            scope,
            mtu,
            addresses: allowed.clone(),
            addresses_changed: !allowed.is_empty(),
            allowed,
            remacs: RemacTable::new(MAX_REMACS),
            sources: HashMap::new(),
            listens: Vec::new(),
            dhcp_xids: std::collections::VecDeque::new(),
            drops: [0; EthDrop::ALL.len()],
        }
    }

    /// The guest's MAC.
    pub fn mac(&self) -> Mac {
        self.mac
    }

    /// Takes the guest's MAC from its next frame instead of insisting on
    /// the one given (until the first frame, that one is presented).
    pub fn learn_mac(mut self) -> Self {
        self.learns_mac = true;
        self.learn_mac = true;
        self
    }

    /// A new guest behind the same vNIC (the VM restarted or reconnected):
    /// learned addresses are forgotten and, unless configured, the MAC is
    /// learned again. The REMACs stay: they are the same for every guest.
    pub fn reset(&mut self) {
        self.learn_mac = self.learns_mac;
        self.addresses = self.allowed.clone();
        self.addresses_changed = true;
        self.dhcp_xids.clear();
    }

    /// The vNIC's IPoIB address.
    pub fn hw(&self) -> HwAddr {
        self.hw
    }

    /// Sets the P_Key (the interface's changed): multicast targets follow.
    pub fn set_pkey(&mut self, pkey: u16) {
        self.pkey = pkey;
    }

    /// Sets the IPoIB MTU (clamped into router advertisements).
    pub fn set_mtu(&mut self, mtu: u32) {
        self.mtu = mtu;
    }

    /// The guest's addresses (configured or learned).
    pub fn addresses(&self) -> &[IpAddr] {
        &self.addresses
    }

    /// True once after the address list changed (the caller joins the
    /// groups the guest now listens to).
    pub fn take_addresses_changed(&mut self) -> bool {
        std::mem::take(&mut self.addresses_changed)
    }

    /// What the guest reported (IGMP or MLD) since the last call, in
    /// order: groups it listens to, which the caller joins as a full
    /// member for it, and groups it left (the TUN-side host has no such
    /// reports to give; a guest does).
    pub fn take_listens(&mut self) -> Vec<Listen> {
        std::mem::take(&mut self.listens)
    }

    fn heard(&mut self, l: Listen) {
        let (Listen::Join(group) | Listen::Leave(group)) = l;
        let multicast = match group {
            IpAddr::V4(a) => a.is_multicast(),
            IpAddr::V6(a) => a.is_multicast(),
        };
        // Only the latest word on a group counts.
        self.listens
            .retain(|p| !matches!(p, Listen::Join(g) | Listen::Leave(g) if *g == group));
        if multicast && self.listens.len() < MAX_PENDING_LISTENS {
            self.listens.push(l);
        }
    }

    /// Notes the groups an IGMP message (v1, v2, v3; RFC 1112, 2236,
    /// 3376) says the guest listens to or leaves.
    fn snoop_igmp(&mut self, ip: &[u8]) {
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        if ip[9] != PROTO_IGMP || ip.len() < ihl + 8 {
            return;
        }
        let m = &ip[ihl..];
        match m[0] {
            0x12 | 0x16 => self.heard(Listen::Join(IpAddr::V4(ipv4_at(m, 4)))),
            // IGMPv2 Leave Group.
            0x17 => self.heard(Listen::Leave(IpAddr::V4(ipv4_at(m, 4)))),
            0x22 => self.report_records(m, 4),
            _ => {}
        }
    }

    /// The same for MLD reports (v1, v2; RFC 2710, 3810), which follow a
    /// hop-by-hop options header.
    fn snoop_mld(&mut self, ip: &[u8]) {
        if ip[6] != NEXT_HOP_BY_HOP || ip.len() < IPV6_HEADER + 8 {
            return;
        }
        let hbh = &ip[IPV6_HEADER..];
        let at = (usize::from(hbh[1]) + 1) * 8;
        if hbh[0] != NEXT_HEADER_ICMPV6 || hbh.len() < at + 8 {
            return;
        }
        let m = &hbh[at..];
        match m[0] {
            131 if m.len() >= 24 => self.heard(Listen::Join(IpAddr::V6(ipv6_at(m, 8)))),
            // MLDv1 Done.
            132 if m.len() >= 24 => self.heard(Listen::Leave(IpAddr::V6(ipv6_at(m, 8)))),
            143 => self.report_records(m, 16),
            _ => {}
        }
    }

    /// Walks the group records of an IGMPv3 or MLDv2 report (`m` from
    /// its type on; addresses of `addr_len` bytes): record type, aux data
    /// length, source count, group, sources, aux data. A group with
    /// anything but "include nothing" is listened to; "include nothing"
    /// (MODE_IS_INCLUDE or CHANGE_TO_INCLUDE with no sources) is a leave.
    fn report_records(&mut self, m: &[u8], addr_len: usize) {
        let n = usize::from(be16(m, 6).unwrap_or(0));
        let mut at = 8;
        for _ in 0..n {
            let (Some(&ty), Some(&aux), Some(ns)) = (m.get(at), m.get(at + 1), be16(m, at + 2))
            else {
                return;
            };
            if at + 4 + addr_len > m.len() {
                return;
            }
            let group = if addr_len == 4 {
                IpAddr::V4(ipv4_at(m, at + 4))
            } else {
                IpAddr::V6(ipv6_at(m, at + 4))
            };
            self.heard(if matches!(ty, 1 | 3) && ns == 0 {
                Listen::Leave(group)
            } else {
                Listen::Join(group)
            });
            at += 4 + addr_len * (1 + usize::from(ns)) + usize::from(aux) * 4;
        }
    }

    /// A guest frame whose IP packet is larger than the IPoIB MTU (`len`
    /// bytes of frame in all, `frame` holding at least its headers) gets
    /// the guest an ICMPv4 "fragmentation needed" (type 3 code 4, RFC
    /// 1191) or ICMPv6 "packet too big" (type 2, RFC 8201) with the MTU,
    /// from the packet's destination (ipoib.md §15.8): written into `out`
    /// as an Ethernet frame, its length returned. `None` when the packet
    /// fits, is not IP, goes to a multicast or broadcast destination, or
    /// is itself an ICMP error.
    pub fn packet_too_big(&self, frame: &[u8], len: usize, out: &mut [u8]) -> Option<usize> {
        let (dst_mac, ty) = (Mac::at(frame, 0)?, be16(frame, 12)?);
        let ip = frame.get(ETH_HLEN..)?;
        if len.checked_sub(ETH_HLEN)? <= self.mtu as usize || dst_mac.is_multicast() {
            return None;
        }
        let mut h = [0u8; IPV6_HEADER];
        let (hdr_len, quote, msg) = match ty {
            ethertype::IPV4 if ip.len() >= 20 && ip[0] >> 4 == 4 => {
                let (src, dst) = (ipv4_at(ip, 12), ipv4_at(ip, 16));
                let ihl = usize::from(ip[0] & 0x0f) * 4;
                let error = ip[9] == PROTO_ICMP && matches!(ip.get(ihl), Some(3 | 4 | 5 | 11 | 12));
                if dst.is_multicast() || dst.is_broadcast() || error {
                    return None;
                }
                let quote = ip.len().min(ICMP4_QUOTE);
                h[0] = 0x45;
                h[2..4].copy_from_slice(&((20 + 8 + quote) as u16).to_be_bytes());
                h[8] = 64;
                h[9] = PROTO_ICMP;
                h[12..16].copy_from_slice(&dst.octets());
                h[16..20].copy_from_slice(&src.octets());
                let sum = checksum(&[&h[..20]]);
                h[10..12].copy_from_slice(&sum.to_be_bytes());
                let mut m = [0u8; 8];
                m[0] = 3;
                m[1] = 4;
                m[6..8].copy_from_slice(&(self.mtu.min(0xffff) as u16).to_be_bytes());
                let sum = checksum(&[&m, &ip[..quote]]);
                m[2..4].copy_from_slice(&sum.to_be_bytes());
                (20, quote, m)
            }
            ethertype::IPV6 if ip.len() >= IPV6_HEADER && ip[0] >> 4 == 6 => {
                let (src, dst) = (ipv6_at(ip, 8), ipv6_at(ip, 24));
                let error =
                    ip[6] == NEXT_HEADER_ICMPV6 && ip.get(IPV6_HEADER).is_some_and(|t| *t < 128);
                if dst.is_multicast() || error {
                    return None;
                }
                let quote = ip.len().min(ICMP6_QUOTE);
                h[0] = 0x60;
                h[4..6].copy_from_slice(&((8 + quote) as u16).to_be_bytes());
                h[6] = NEXT_HEADER_ICMPV6;
                h[7] = 64;
                h[8..24].copy_from_slice(&dst.octets());
                h[24..40].copy_from_slice(&src.octets());
                let mut m = [0u8; 8];
                m[0] = 2;
                m[4..8].copy_from_slice(&self.mtu.to_be_bytes());
                // Under the pseudo-header from the destination back to the
                // source (RFC 8200 §8.1).
                let len = ((8 + quote) as u32).to_be_bytes();
                let pseudo = [0, 0, 0, NEXT_HEADER_ICMPV6];
                let sum = checksum(&[
                    &dst.octets(),
                    &src.octets(),
                    &len,
                    &pseudo,
                    &m,
                    &ip[..quote],
                ]);
                m[2..4].copy_from_slice(&sum.to_be_bytes());
                (IPV6_HEADER, quote, m)
            }
            _ => return None,
        };
        let n = ETH_HLEN + hdr_len + 8 + quote;
        let o = out.get_mut(..n)?;
        o[..ETH_HLEN].copy_from_slice(&eth_header(self.mac, dst_mac, ty));
        o[ETH_HLEN..ETH_HLEN + hdr_len].copy_from_slice(&h[..hdr_len]);
        o[ETH_HLEN + hdr_len..ETH_HLEN + hdr_len + 8].copy_from_slice(&msg);
        o[ETH_HLEN + hdr_len + 8..].copy_from_slice(&ip[..quote]);
        Some(n)
    }

    /// The REMAC table.
    pub fn remacs(&self) -> &RemacTable {
        &self.remacs
    }

    /// Frames dropped for `why`.
    pub fn drops(&self, why: EthDrop) -> u64 {
        self.drops[why as usize]
    }

    fn drop_for(&mut self, why: EthDrop) -> EthDrop {
        self.drops[why as usize] += 1;
        why
    }

    /// Translates a frame from the guest (Ethernet header first). ARP and
    /// ND are rewritten into `out`; other packets go out as they are from
    /// byte [`ETH_HLEN`] on.
    pub fn from_guest(
        &mut self,
        frame: &[u8],
        out: &mut [u8],
        now: Instant,
    ) -> Result<GuestTx, EthDrop> {
        let r = self.classify_tx(frame, out, now);
        r.map_err(|why| self.drop_for(why))
    }

    fn classify_tx(
        &mut self,
        frame: &[u8],
        out: &mut [u8],
        now: Instant,
    ) -> Result<GuestTx, EthDrop> {
        let (Some(dst), Some(src), Some(ty)) =
            (Mac::at(frame, 0), Mac::at(frame, 6), be16(frame, 12))
        else {
            return Err(EthDrop::Malformed);
        };
        if ty == ETHERTYPE_VLAN || ty == ETHERTYPE_QINQ {
            return Err(EthDrop::Vlan);
        }
        if !matches!(ty, ethertype::IPV4 | ethertype::IPV6 | ethertype::ARP) {
            return Err(EthDrop::Ethertype);
        }
        if src != self.mac {
            if !self.learn_mac || src.is_multicast() {
                return Err(EthDrop::SpoofedMac);
            }
            self.mac = src;
            self.learn_mac = false;
        }
        let body = &frame[ETH_HLEN..];
        match ty {
            ethertype::ARP => self.arp_from_guest(dst, body, out, now),
            ethertype::IPV4 => {
                if body.len() < 20 || body[0] >> 4 != 4 {
                    return Err(EthDrop::Malformed);
                }
                self.check_source(IpAddr::V4(ipv4_at(body, 12)))?;
                let to = self.target(dst, IpAddr::V4(ipv4_at(body, 16)), now)?;
                self.snoop_igmp(body);
                // DHCP goes in the IPoIB form (RFC 4390).
                if let Some(r) = dhcp::to_fabric(body, self.mac, out) {
                    self.dhcp_xids.retain(|(x, _)| *x != r.xid);
                    if self.dhcp_xids.len() == MAX_DHCP_XIDS {
                        self.dhcp_xids.pop_front();
                    }
                    self.dhcp_xids.push_back((r.xid, r.inserted_client_id));
                    return Ok(GuestTx::Rewritten {
                        to,
                        ethertype: ty,
                        len: r.len,
                    });
                }
                Ok(GuestTx::Forward { to, ethertype: ty })
            }
            _ => {
                if body.len() < IPV6_HEADER || body[0] >> 4 != 6 {
                    return Err(EthDrop::Malformed);
                }
                self.check_source(IpAddr::V6(ipv6_at(body, 8)))?;
                let to = self.target(dst, IpAddr::V6(ipv6_at(body, 24)), now)?;
                self.snoop_mld(body);
                if is_nd(body) {
                    let len = self.nd_rewrite(body, out, Direction::ToFabric, now)?;
                    return Ok(GuestTx::Rewritten {
                        to,
                        ethertype: ty,
                        len,
                    });
                }
                Ok(GuestTx::Forward { to, ethertype: ty })
            }
        }
    }

    /// Where a frame to `dst` (MAC) carrying IP destination `ip` goes.
    fn target(&mut self, dst: Mac, ip: IpAddr, now: Instant) -> Result<Target, EthDrop> {
        if dst == Mac::BROADCAST {
            // IPv4 broadcast (limited or directed) goes to the broadcast
            // group; IPv6 has no broadcast.
            return match ip {
                IpAddr::V4(a) if !a.is_multicast() => Ok(Target::Group(mgid::ipv4(
                    Ipv4Addr::BROADCAST,
                    self.pkey,
                    self.scope,
                ))),
                _ => Err(EthDrop::NotIpMulticast),
            };
        }
        if dst.is_multicast() {
            let expected = match ip {
                IpAddr::V4(a) if a.is_multicast() => Mac::ipv4_multicast(a),
                IpAddr::V6(a) if a.is_multicast() => Mac::ipv6_multicast(a),
                _ => return Err(EthDrop::NotIpMulticast),
            };
            if dst != expected {
                return Err(EthDrop::NotIpMulticast);
            }
            return mgid::for_ip(ip, self.pkey, self.scope)
                .map(Target::Group)
                .ok_or(EthDrop::NotIpMulticast);
        }
        self.remacs
            .lookup(dst, now)
            .map(Target::Unicast)
            .ok_or(EthDrop::UnknownMac)
    }

    /// A guest may send from its own addresses only; the unspecified
    /// address (DHCP, DAD) is always allowed.
    fn check_source(&mut self, ip: IpAddr) -> Result<(), EthDrop> {
        if ip.is_unspecified() || self.addresses.contains(&ip) {
            return Ok(());
        }
        let link_local = matches!(ip, IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80);
        let learn = self.allowed.is_empty() || link_local;
        if !learn || ip.is_multicast() || self.addresses.len() >= MAX_GUEST_ADDRS {
            return Err(EthDrop::SpoofedIp);
        }
        self.addresses.push(ip);
        self.addresses_changed = true;
        Ok(())
    }

    fn arp_from_guest(
        &mut self,
        dst: Mac,
        b: &[u8],
        out: &mut [u8],
        now: Instant,
    ) -> Result<GuestTx, EthDrop> {
        if b.len() < ETH_ARP_LEN
            || be16(b, 0) != Some(1)
            || be16(b, 2) != Some(ethertype::IPV4)
            || b[4] != 6
            || b[5] != 4
        {
            return Err(EthDrop::BadControl);
        }
        let op = match be16(b, 6) {
            Some(1) => Op::Request,
            Some(2) => Op::Reply,
            _ => return Err(EthDrop::BadControl),
        };
        if Mac::at(b, 8) != Some(self.mac) {
            return Err(EthDrop::SpoofedMac);
        }
        let sender_ip = ipv4_at(b, 14);
        self.check_source(IpAddr::V4(sender_ip))?;
        let target_ip = ipv4_at(b, 24);
        let (to, target_hw) = match op {
            Op::Request => {
                // Requests (gratuitous ones and probes too) are broadcast.
                let g = mgid::ipv4(Ipv4Addr::BROADCAST, self.pkey, self.scope);
                (Target::Group(g), HwAddr([0; HW_ADDR_LEN]))
            }
            Op::Reply => {
                let hw = if dst.is_multicast() {
                    // A broadcast reply (some announce that way): its
                    // target is in the body.
                    let tha = Mac::at(b, 18).ok_or(EthDrop::BadControl)?;
                    self.remacs.lookup(tha, now)
                } else {
                    self.remacs.lookup(dst, now)
                };
                let hw = hw.ok_or(EthDrop::UnknownMac)?;
                (Target::Unicast(hw), hw)
            }
        };
        let arp = Arp {
            op,
            sender_hw: self.hw,
            sender_ip,
            target_hw,
            target_ip,
        };
        let dst_buf: &mut [u8; ARP_LEN] = out
            .get_mut(..ARP_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(EthDrop::Malformed)?;
        arp.emit(dst_buf);
        Ok(GuestTx::Rewritten {
            to,
            ethertype: ethertype::ARP,
            len: ARP_LEN,
        })
    }

    /// Translates a packet from the fabric (`payload` is what follows the
    /// IPoIB header) for the guest.
    pub fn to_guest(
        &mut self,
        from: Sender,
        ty: u16,
        payload: &[u8],
        out: &mut [u8],
        now: Instant,
    ) -> Result<GuestRx, EthDrop> {
        let r = self.classify_rx(from, ty, payload, out, now);
        r.map_err(|why| self.drop_for(why))
    }

    fn classify_rx(
        &mut self,
        from: Sender,
        ty: u16,
        payload: &[u8],
        out: &mut [u8],
        now: Instant,
    ) -> Result<GuestRx, EthDrop> {
        match ty {
            ethertype::ARP => self.arp_to_guest(from, payload, out, now),
            ethertype::IPV4 => {
                if payload.len() < 20 || payload[0] >> 4 != 4 {
                    return Err(EthDrop::Malformed);
                }
                let src = self.sender_mac(from, now)?;
                if let Some(xid) = dhcp::reply_xid(payload) {
                    // A DHCP reply: for this guest only if it asked.
                    let &(_, inserted) = self
                        .dhcp_xids
                        .iter()
                        .find(|(x, _)| *x == xid)
                        .ok_or(EthDrop::DhcpOther)?;
                    let body = out.get_mut(ETH_HLEN..).ok_or(EthDrop::Malformed)?;
                    let n = dhcp::to_guest(payload, self.mac, inserted, body)
                        .ok_or(EthDrop::Malformed)?;
                    out[..ETH_HLEN].copy_from_slice(&eth_header(self.mac, src, ty));
                    return Ok(GuestRx::Rewritten(pad(out, ETH_HLEN + n)));
                }
                let dst = self.guest_dst(from, IpAddr::V4(ipv4_at(payload, 16)));
                Ok(GuestRx::Header(eth_header(dst, src, ty)))
            }
            ethertype::IPV6 => {
                if payload.len() < IPV6_HEADER || payload[0] >> 4 != 6 {
                    return Err(EthDrop::Malformed);
                }
                if is_nd(payload) {
                    self.learn_from_nd(from, payload);
                }
                let src = self.sender_mac(from, now)?;
                let dst = self.guest_dst(from, IpAddr::V6(ipv6_at(payload, 24)));
                if !is_nd(payload) {
                    return Ok(GuestRx::Header(eth_header(dst, src, ty)));
                }
                let body = out.get_mut(ETH_HLEN..).ok_or(EthDrop::Malformed)?;
                let n = self.nd_rewrite(payload, body, Direction::ToGuest, now)?;
                out[..ETH_HLEN].copy_from_slice(&eth_header(dst, src, ty));
                Ok(GuestRx::Rewritten(pad(out, ETH_HLEN + n)))
            }
            _ => Err(EthDrop::Ethertype),
        }
    }

    /// The Ethernet destination for a packet to the guest: its MAC for
    /// unicast, the group's MAC for multicast, broadcast for the rest.
    fn guest_dst(&self, from: Sender, ip: IpAddr) -> Mac {
        if !from.multicast {
            return self.mac;
        }
        match ip {
            IpAddr::V4(a) if a.is_multicast() => Mac::ipv4_multicast(a),
            IpAddr::V6(a) if a.is_multicast() => Mac::ipv6_multicast(a),
            _ => Mac::BROADCAST,
        }
    }

    /// The REMAC of the sender: from the GRH when there is one, else from
    /// what an earlier ARP/ND from the same LID and QPN told.
    fn sender_mac(&mut self, from: Sender, now: Instant) -> Result<Mac, EthDrop> {
        let hw = match from.sgid {
            Some(gid) => {
                let flags = self
                    .sources
                    .get(&(from.slid, from.sqpn))
                    .filter(|h| h.gid() == gid)
                    .map_or(0, |h| h.flags());
                HwAddr::new(flags, from.sqpn, gid)
            }
            None => *self
                .sources
                .get(&(from.slid, from.sqpn))
                .ok_or(EthDrop::UnknownSource)?,
        };
        Ok(self.remacs.mac_for(hw, now))
    }

    /// Remembers that `hw` sends from LID `slid` (its QPN must match the
    /// packet's).
    fn learn_source(&mut self, from: Sender, hw: HwAddr) {
        if hw.qpn() != from.sqpn || hw.is_multicast() || hw == self.hw {
            return;
        }
        let key = (from.slid, from.sqpn);
        if !self.sources.contains_key(&key)
            && self.sources.len() >= MAX_SOURCES
            && let Some(&old) = self.sources.keys().next()
        {
            self.sources.remove(&old);
        }
        self.sources.insert(key, hw);
    }

    fn learn_from_nd(&mut self, from: Sender, pkt: &[u8]) {
        let Some(icmp) = pkt.get(IPV6_HEADER..) else {
            return;
        };
        let Some(fixed) = nd_fixed_len(icmp[0]) else {
            return;
        };
        // Only a source link-layer option names the sender.
        if let Some(options) = icmp.get(fixed..)
            && let Ok(Some(hw)) = nd::find_lla(options, nd::OPT_SOURCE_LLA)
        {
            self.learn_source(from, hw);
        }
        if icmp[0] == nd::NEIGHBOR_ADVERT
            && let Some(options) = icmp.get(fixed..)
            && let Ok(Some(hw)) = nd::find_lla(options, nd::OPT_TARGET_LLA)
        {
            self.learn_source(from, hw);
        }
    }

    fn arp_to_guest(
        &mut self,
        from: Sender,
        b: &[u8],
        out: &mut [u8],
        now: Instant,
    ) -> Result<GuestRx, EthDrop> {
        let arp = Arp::parse(b).map_err(|_| EthDrop::BadControl)?;
        if arp.sender_hw.is_multicast() || arp.sender_hw == self.hw {
            return Err(EthDrop::BadControl);
        }
        self.learn_source(from, arp.sender_hw);
        let sha = self.remacs.mac_for(arp.sender_hw, now);
        let (dst, tha) = match arp.op {
            Op::Request => (Mac::BROADCAST, Mac::default()),
            Op::Reply => (self.mac, self.mac),
        };
        if out.len() < ETH_MIN_FRAME {
            return Err(EthDrop::Malformed);
        }
        out[..ETH_HLEN].copy_from_slice(&eth_header(dst, sha, ethertype::ARP));
        let a = &mut out[ETH_HLEN..ETH_HLEN + ETH_ARP_LEN];
        a[0..2].copy_from_slice(&1u16.to_be_bytes());
        a[2..4].copy_from_slice(&ethertype::IPV4.to_be_bytes());
        a[4] = 6;
        a[5] = 4;
        a[6..8].copy_from_slice(&arp.op.code().to_be_bytes());
        a[8..14].copy_from_slice(&sha.0);
        a[14..18].copy_from_slice(&arp.sender_ip.octets());
        a[18..24].copy_from_slice(&tha.0);
        a[24..28].copy_from_slice(&arp.target_ip.octets());
        Ok(GuestRx::Rewritten(pad(out, ETH_HLEN + ETH_ARP_LEN)))
    }

    /// Rewrites the link-layer options of an ND packet (`pkt` starts at
    /// the IPv6 header) into `out`, fixing the IPv6 payload length and the
    /// ICMPv6 checksum. Returns the length written.
    fn nd_rewrite(
        &mut self,
        pkt: &[u8],
        out: &mut [u8],
        dir: Direction,
        now: Instant,
    ) -> Result<usize, EthDrop> {
        let plen = usize::from(be16(pkt, 4).ok_or(EthDrop::Malformed)?);
        let icmp = pkt
            .get(IPV6_HEADER..IPV6_HEADER + plen)
            .ok_or(EthDrop::Malformed)?;
        // The IPv6 payload length, not the frame, bounds the message: it
        // may say there is nothing.
        let ty = *icmp.first().ok_or(EthDrop::BadControl)?;
        let fixed = nd_fixed_len(ty).ok_or(EthDrop::BadControl)?;
        if icmp.len() < fixed || out.len() < IPV6_HEADER + fixed {
            return Err(EthDrop::BadControl);
        }
        out[..IPV6_HEADER].copy_from_slice(&pkt[..IPV6_HEADER]);
        out[IPV6_HEADER..IPV6_HEADER + fixed].copy_from_slice(&icmp[..fixed]);
        let mut w = IPV6_HEADER + fixed;
        let mut at = fixed;
        while at < icmp.len() {
            let ty = icmp[at];
            let len = icmp
                .get(at + 1)
                .map(|&l| usize::from(l) * 8)
                .ok_or(EthDrop::BadControl)?;
            if len == 0 || at + len > icmp.len() {
                return Err(EthDrop::BadControl);
            }
            let opt = &icmp[at..at + len];
            let lla = ty == nd::OPT_SOURCE_LLA || ty == nd::OPT_TARGET_LLA;
            let written = match dir {
                Direction::ToFabric if lla => {
                    if len != ETH_LLA_OPTION_LEN {
                        return Err(EthDrop::BadControl);
                    }
                    let mac = Mac::at(opt, 2).ok_or(EthDrop::BadControl)?;
                    let hw = if mac == self.mac {
                        self.hw
                    } else if ty == nd::OPT_SOURCE_LLA {
                        // Only the guest itself can be the source.
                        return Err(EthDrop::SpoofedMac);
                    } else {
                        // A redirect's target: a remote neighbour.
                        self.remacs.lookup(mac, now).ok_or(EthDrop::UnknownMac)?
                    };
                    let o: &mut [u8; LLA_OPTION_LEN] = out
                        .get_mut(w..w + LLA_OPTION_LEN)
                        .and_then(|s| s.try_into().ok())
                        .ok_or(EthDrop::Malformed)?;
                    nd::write_lla(o, ty, hw);
                    LLA_OPTION_LEN
                }
                Direction::ToGuest if lla => {
                    if len != LLA_OPTION_LEN {
                        return Err(EthDrop::BadControl);
                    }
                    let hw =
                        HwAddr::from_slice(&opt[4..4 + HW_ADDR_LEN]).ok_or(EthDrop::BadControl)?;
                    let mac = if hw == self.hw {
                        self.mac
                    } else {
                        self.remacs.mac_for(hw, now)
                    };
                    let o = out
                        .get_mut(w..w + ETH_LLA_OPTION_LEN)
                        .ok_or(EthDrop::Malformed)?;
                    o[0] = ty;
                    o[1] = 1;
                    o[2..8].copy_from_slice(&mac.0);
                    ETH_LLA_OPTION_LEN
                }
                _ => {
                    let o = out.get_mut(w..w + len).ok_or(EthDrop::Malformed)?;
                    o.copy_from_slice(opt);
                    if dir == Direction::ToGuest && ty == OPT_MTU && len == 8 {
                        // A router may not raise the guest past the IPoIB MTU.
                        let mtu = u32::from_be_bytes([o[4], o[5], o[6], o[7]]);
                        o[4..8].copy_from_slice(&mtu.min(self.mtu).to_be_bytes());
                    }
                    len
                }
            };
            w += written;
            at += len;
        }
        let plen = w - IPV6_HEADER;
        let plen16 = u16::try_from(plen).map_err(|_| EthDrop::Malformed)?;
        out[4..6].copy_from_slice(&plen16.to_be_bytes());
        let (src, dst) = (ipv6_at(out, 8), ipv6_at(out, 24));
        let msg = &mut out[IPV6_HEADER..w];
        msg[2] = 0;
        msg[3] = 0;
        let sum = nd::icmpv6_checksum(src, dst, msg);
        msg[2..4].copy_from_slice(&sum.to_be_bytes());
        Ok(w)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    ToFabric,
    ToGuest,
}

/// The length of the fixed part of an ND message of ICMPv6 type `ty`
/// (RFC 4861 §4), or `None` if it is not ND.
fn nd_fixed_len(ty: u8) -> Option<usize> {
    match ty {
        133 => Some(8),        // Router Solicitation
        134 => Some(16),       // Router Advertisement
        135 | 136 => Some(24), // Neighbor Solicitation / Advertisement
        137 => Some(40),       // Redirect
        _ => None,
    }
}

/// An IPv6 packet carrying ND directly (no extension headers, hop limit
/// 255 as RFC 4861 requires of every ND message).
fn is_nd(pkt: &[u8]) -> bool {
    pkt.len() > IPV6_HEADER
        && pkt[6] == NEXT_HEADER_ICMPV6
        && pkt[7] == 255
        && nd_fixed_len(pkt[IPV6_HEADER]).is_some()
}

/// Whether a guest frame (its headers at least) is one the translation
/// forwards as it is, never rewriting it: TCP or UDP over IPv4 or IPv6 (no
/// IPv6 extension headers), DHCP excepted. Such a frame may be sent from
/// the guest's memory with only its headers copied and checked.
pub fn lendable(frame: &[u8]) -> bool {
    let l3 = ETH_HLEN;
    let proto = match (be16(frame, 12), frame.get(l3).map(|b| b >> 4)) {
        (Some(ethertype::IPV4), Some(4)) => frame.get(l3 + 9),
        (Some(ethertype::IPV6), Some(6)) => frame.get(l3 + 6),
        _ => None,
    };
    let dhcp = frame.get(l3..).is_some_and(dhcp::bootp_ports);
    matches!(proto, Some(6 | 17)) && !dhcp
}

fn eth_header(dst: Mac, src: Mac, ty: u16) -> [u8; ETH_HLEN] {
    let mut h = [0u8; ETH_HLEN];
    h[..6].copy_from_slice(&dst.0);
    h[6..12].copy_from_slice(&src.0);
    h[12..].copy_from_slice(&ty.to_be_bytes());
    h
}

/// Zero-pads a frame of `len` bytes in `out` to the Ethernet minimum (as
/// far as `out` allows) and returns its new length.
fn pad(out: &mut [u8], len: usize) -> usize {
    let padded = len.max(ETH_MIN_FRAME).min(out.len());
    if let Some(tail) = out.get_mut(len..padded) {
        tail.fill(0);
    }
    padded.max(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST_MAC: Mac = Mac([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
    const GID: Gid = [
        0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x00, 0x02, 0xc9, 0x03, 0x00, 0xaa, 0xbb, 0xcc,
    ];
    const PEER_GID: Gid = [
        0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x00, 0x02, 0xc9, 0x03, 0x00, 0x11, 0x22, 0x33,
    ];

    fn vnic() -> HwAddr {
        HwAddr::new(0, 0x48, GID)
    }

    fn peer() -> HwAddr {
        HwAddr::new(0x80, 0x000102, PEER_GID)
    }

    fn translator(allowed: Vec<IpAddr>) -> Translator {
        Translator::new(GUEST_MAC, vnic(), 0xffff, mgid::SCOPE_LINK, 2044, allowed)
    }

    /// The broadcast MGID of ipoib.md §5.2 (P_Key 0xffff, scope 2).
    const BROADCAST_MGID: Gid = [
        0xff, 0x12, 0x40, 0x1b, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff,
    ];

    /// RFC 1071 verification over the IPv6 pseudo-header and the ICMPv6
    /// message of `pkt` (its checksum included).
    fn icmpv6_checksum_ok(pkt: &[u8]) -> bool {
        let plen = usize::from(u16::from_be_bytes([pkt[4], pkt[5]]));
        let len = (plen as u32).to_be_bytes();
        crate::engine::sum_is_all_ones(&[&pkt[8..40], &len, &[0, 0, 0, 58], &pkt[40..40 + plen]])
    }

    fn sum_ok(b: &[u8]) -> bool {
        crate::engine::sum_is_all_ones(&[b])
    }

    #[test]
    fn oversize_packets_get_the_guest_an_icmp_error() {
        let t = translator(Vec::new());
        let remac = Mac([0x02, 0, 0, 0, 0, 0x42]);
        let mut out = [0u8; 2048];
        // 3000 bytes of IPv4/UDP, guest 10.0.0.9 to 10.0.0.2.
        let mut p = vec![0u8; 3000];
        p[..20].copy_from_slice(&[
            0x45, 0, 0x0b, 0xb8, 0, 1, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 9, 10, 0, 0, 2,
        ]);
        let f = frame(remac, GUEST_MAC, 0x0800, &p);
        let n = t.packet_too_big(&f, f.len(), &mut out).unwrap();
        let e = &out[..n];
        // RFC 792/1191: Ethernet to the guest from the MAC it sent to, an IPv4
        // header from 10.0.0.2 to 10.0.0.9 (protocol 1), type 3 code 4, the
        // next-hop MTU in the second half of the unused word, then the
        // packet's first 548 bytes: 576 bytes of IP in all.
        assert_eq!(&e[..6], &GUEST_MAC.0);
        assert_eq!(&e[6..12], &remac.0);
        assert_eq!(&e[12..14], &[0x08, 0x00]);
        let ip = &e[14..];
        assert_eq!(ip.len(), 576);
        assert_eq!((ip[0], ip[9]), (0x45, 1));
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 576);
        assert_eq!(&ip[12..16], &[10, 0, 0, 2]);
        assert_eq!(&ip[16..20], &[10, 0, 0, 9]);
        assert!(sum_ok(&ip[..20]), "IPv4 header checksum");
        assert_eq!(&ip[20..24], &[3, 4, ip[22], ip[23]]);
        assert_eq!(&ip[24..28], &[0, 0, 0x07, 0xfc], "MTU 2044");
        assert!(sum_ok(&ip[20..]), "ICMP checksum");
        assert_eq!(&ip[28..], &p[..548]);

        // IPv6 (RFC 4443 §3.2): type 2, the MTU, as much of the packet as
        // keeps the error within 1280 bytes.
        let (gsrc, gdst): (Ipv6Addr, Ipv6Addr) =
            ("fd00::9".parse().unwrap(), "fd00::2".parse().unwrap());
        let mut p6 = vec![0u8; 3000];
        p6[0] = 0x60;
        p6[4..6].copy_from_slice(&2960u16.to_be_bytes());
        p6[6] = 17;
        p6[7] = 64;
        p6[8..24].copy_from_slice(&gsrc.octets());
        p6[24..40].copy_from_slice(&gdst.octets());
        let f6 = frame(remac, GUEST_MAC, 0x86dd, &p6);
        let n = t.packet_too_big(&f6, f6.len(), &mut out).unwrap();
        let ip = &out[14..n];
        assert_eq!(ip.len(), 1280);
        assert_eq!((ip[0], ip[6]), (0x60, 58));
        assert_eq!(&ip[8..24], &gdst.octets());
        assert_eq!(&ip[24..40], &gsrc.octets());
        assert_eq!((ip[40], ip[41]), (2, 0));
        assert_eq!(&ip[44..48], &2044u32.to_be_bytes());
        assert!(icmpv6_checksum_ok(ip));
        assert_eq!(&ip[48..], &p6[..1232]);

        // No error: the packet fits; its destination is multicast; it is
        // an ICMP error itself; it is not IP.
        assert_eq!(t.packet_too_big(&f[..2058], 2058, &mut out), None);
        let mut m = p.clone();
        m[16..20].copy_from_slice(&[239, 1, 1, 1]);
        let mf = frame(
            Mac::ipv4_multicast(Ipv4Addr::new(239, 1, 1, 1)),
            GUEST_MAC,
            0x0800,
            &m,
        );
        assert_eq!(t.packet_too_big(&mf, mf.len(), &mut out), None);
        let mut err = p.clone();
        err[9] = 1;
        err[20] = 3;
        let ef = frame(remac, GUEST_MAC, 0x0800, &err);
        assert_eq!(t.packet_too_big(&ef, ef.len(), &mut out), None);
        let arp = frame(remac, GUEST_MAC, 0x0806, &p);
        assert_eq!(t.packet_too_big(&arp, arp.len(), &mut out), None);
        // Only what the frame holds is quoted (a lent frame's head).
        let n = t.packet_too_big(&f[..14 + 100], f.len(), &mut out).unwrap();
        assert_eq!(n, 14 + 20 + 8 + 100);
        // Garbage never panics.
        for cut in 0..40 {
            let _ = t.packet_too_big(&f[..cut], 4000, &mut out);
        }
        assert_eq!(t.packet_too_big(&f, f.len(), &mut out[..100]), None);
    }

    #[test]
    fn multicast_macs() {
        // RFC 1112 §6.4 and RFC 2464 §7; mDNS and all-nodes are the
        // well-known examples.
        let v4 = Mac::ipv4_multicast("224.0.0.251".parse().unwrap());
        assert_eq!(v4.to_string(), "01:00:5e:00:00:fb");
        let v4hi = Mac::ipv4_multicast("239.255.1.2".parse().unwrap());
        assert_eq!(v4hi.to_string(), "01:00:5e:7f:01:02");
        let v6 = Mac::ipv6_multicast("ff02::1".parse().unwrap());
        assert_eq!(v6.to_string(), "33:33:00:00:00:01");
        let sn = Mac::ipv6_multicast("ff02::1:ff00:1234".parse().unwrap());
        assert_eq!(sn.to_string(), "33:33:ff:00:12:34");
        assert_eq!("52:54:00:12:34:56".parse::<Mac>().unwrap(), GUEST_MAC);
        assert!("52:54:00:12:34".parse::<Mac>().is_err());
        assert!("52:54:00:12:34:56:78".parse::<Mac>().is_err());
        assert!("52:54:00:12:34:zz".parse::<Mac>().is_err());
    }

    #[test]
    fn remacs_are_stable_local_unicast_and_bounded() {
        let now = Instant::now();
        let mut a = RemacTable::new(2);
        let mut b = RemacTable::new(2);
        let m = a.mac_for(peer(), now);
        // Same peer, same MAC, in another table (another daemon run).
        assert_eq!(b.mac_for(peer(), now), m);
        assert_eq!(m.0[0] & 0x03, 0x02, "locally administered unicast");
        assert_eq!(a.lookup(m, now), Some(peer()));
        // Flags follow the latest word; the MAC does not change.
        let no_rc = HwAddr::new(0, peer().qpn(), PEER_GID);
        assert_eq!(a.mac_for(no_rc, now), m);
        assert_eq!(a.lookup(m, now), Some(no_rc));
        // Another QPN on the same port is another MAC.
        let other = HwAddr::new(0, 0x000103, PEER_GID);
        let m2 = a.mac_for(other, now + std::time::Duration::from_secs(1));
        assert_ne!(m2, m);
        // Full: the least recently used goes, and comes back the same.
        let third = HwAddr::new(0, 0x000104, PEER_GID);
        a.mac_for(third, now + std::time::Duration::from_secs(2));
        assert_eq!(a.len(), 2);
        assert_eq!(a.lookup(m, now), None);
        assert_eq!(
            a.mac_for(peer(), now + std::time::Duration::from_secs(3)),
            m
        );
        // A collision takes the next salt.
        assert_ne!(synthetic_mac(&peer(), 0), synthetic_mac(&peer(), 1));
    }

    #[test]
    fn guest_arp_request_becomes_ipoib_arp_to_broadcast() {
        let mut t = translator(Vec::new());
        // Ethernet ARP request (RFC 826): who has 10.0.0.2, tell 10.0.0.1.
        let frame: [u8; 42] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // dst
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, // src
            0x08, 0x06, // ARP
            0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01, // hrd pro hln pln op
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 10, 0, 0, 1, // sha spa
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 10, 0, 0, 2, // tha tpa
        ];
        let mut out = [0u8; 128];
        let tx = t.from_guest(&frame, &mut out, Instant::now()).unwrap();
        assert_eq!(
            tx,
            GuestTx::Rewritten {
                to: Target::Group(BROADCAST_MGID),
                ethertype: 0x0806,
                len: 56
            }
        );
        // RFC 4391 §5: hrd 32, pro 0x0800, hln 20, pln 4.
        let mut want = vec![0x00, 0x20, 0x08, 0x00, 0x14, 0x04, 0x00, 0x01];
        want.extend_from_slice(&[0x00, 0x00, 0x00, 0x48]);
        want.extend_from_slice(&GID);
        want.extend_from_slice(&[10, 0, 0, 1]);
        want.extend_from_slice(&[0; 20]);
        want.extend_from_slice(&[10, 0, 0, 2]);
        assert_eq!(&out[..56], &want[..]);
        assert!(t.take_addresses_changed());
        assert_eq!(t.addresses(), &["10.0.0.1".parse::<IpAddr>().unwrap()]);
    }

    /// An IPoIB ARP reply from `peer()` (10.0.0.2) to the vNIC (10.0.0.1).
    fn ipoib_arp_reply() -> Vec<u8> {
        let mut b = vec![0x00, 0x20, 0x08, 0x00, 0x14, 0x04, 0x00, 0x02];
        b.extend_from_slice(&[0x80, 0x00, 0x01, 0x02]);
        b.extend_from_slice(&PEER_GID);
        b.extend_from_slice(&[10, 0, 0, 2]);
        b.extend_from_slice(&[0x00, 0x00, 0x00, 0x48]);
        b.extend_from_slice(&GID);
        b.extend_from_slice(&[10, 0, 0, 1]);
        b
    }

    fn unicast_from_peer() -> Sender {
        Sender {
            slid: 7,
            sqpn: 0x000102,
            sgid: None,
            multicast: false,
        }
    }

    /// The peer sending to a group (with a GRH naming it).
    fn multicast_from_peer() -> Sender {
        Sender {
            sgid: Some(PEER_GID),
            multicast: true,
            ..unicast_from_peer()
        }
    }

    #[test]
    fn ipoib_arp_reply_reaches_the_guest_from_a_remac() {
        let now = Instant::now();
        let mut t = translator(Vec::new());
        let mut out = [0u8; 128];
        let rx = t
            .to_guest(
                unicast_from_peer(),
                0x0806,
                &ipoib_arp_reply(),
                &mut out,
                now,
            )
            .unwrap();
        assert_eq!(rx, GuestRx::Rewritten(60));
        let remac = t.remacs.mac_for(peer(), now);
        let mut want = Vec::new();
        want.extend_from_slice(&GUEST_MAC.0);
        want.extend_from_slice(&remac.0);
        want.extend_from_slice(&[0x08, 0x06, 0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x02]);
        want.extend_from_slice(&remac.0);
        want.extend_from_slice(&[10, 0, 0, 2]);
        want.extend_from_slice(&GUEST_MAC.0);
        want.extend_from_slice(&[10, 0, 0, 1]);
        want.resize(60, 0);
        assert_eq!(&out[..60], &want[..]);

        // The guest now sends IPv4 to that MAC: unicast to the peer.
        let mut ip = Vec::new();
        ip.extend_from_slice(&remac.0);
        ip.extend_from_slice(&GUEST_MAC.0);
        ip.extend_from_slice(&[0x08, 0x00]);
        ip.extend_from_slice(&[0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 17, 0, 0]);
        ip.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        ip.extend_from_slice(&[0; 8]);
        let tx = t.from_guest(&ip, &mut out, now).unwrap();
        assert_eq!(
            tx,
            GuestTx::Forward {
                to: Target::Unicast(peer()),
                ethertype: 0x0800
            }
        );

        // The guest's ARP reply to the peer goes unicast with the
        // vNIC's IPoIB address as sender and the peer's as target.
        let mut reply = Vec::new();
        reply.extend_from_slice(&remac.0);
        reply.extend_from_slice(&GUEST_MAC.0);
        reply.extend_from_slice(&[0x08, 0x06, 0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x02]);
        reply.extend_from_slice(&GUEST_MAC.0);
        reply.extend_from_slice(&[10, 0, 0, 1]);
        reply.extend_from_slice(&remac.0);
        reply.extend_from_slice(&[10, 0, 0, 2]);
        let tx = t.from_guest(&reply, &mut out, now).unwrap();
        assert_eq!(
            tx,
            GuestTx::Rewritten {
                to: Target::Unicast(peer()),
                ethertype: 0x0806,
                len: 56
            }
        );
        let arp = Arp::parse(&out[..56]).unwrap();
        assert_eq!(arp.sender_hw, vnic());
        assert_eq!(arp.target_hw, peer());

        // A unicast IPv4 packet from the peer without a GRH is named by
        // what the ARP told about its LID and QPN.
        let mut pkt = vec![0x45, 0, 0, 20, 0, 0, 0x40, 0, 64, 17, 0, 0];
        pkt.extend_from_slice(&[10, 0, 0, 2, 10, 0, 0, 1]);
        let rx = t
            .to_guest(unicast_from_peer(), 0x0800, &pkt, &mut out, now)
            .unwrap();
        let mut hdr = [0u8; 14];
        hdr[..6].copy_from_slice(&GUEST_MAC.0);
        hdr[6..12].copy_from_slice(&remac.0);
        hdr[12..].copy_from_slice(&[0x08, 0x00]);
        assert_eq!(rx, GuestRx::Header(hdr));
    }

    #[test]
    fn unknown_sources_and_destinations_are_dropped() {
        let now = Instant::now();
        let mut t = translator(Vec::new());
        let mut out = [0u8; 128];
        let mut pkt = vec![0x45, 0, 0, 20, 0, 0, 0x40, 0, 64, 17, 0, 0];
        pkt.extend_from_slice(&[10, 0, 0, 2, 10, 0, 0, 1]);
        assert_eq!(
            t.to_guest(unicast_from_peer(), 0x0800, &pkt, &mut out, now),
            Err(EthDrop::UnknownSource)
        );
        // With a GRH the sender is known from the packet itself.
        let with_grh = Sender {
            sgid: Some(PEER_GID),
            ..unicast_from_peer()
        };
        assert!(matches!(
            t.to_guest(with_grh, 0x0800, &pkt, &mut out, now),
            Ok(GuestRx::Header(_))
        ));
        // Unicast to a MAC that is no REMAC.
        let mut ip = Vec::new();
        ip.extend_from_slice(&[0x02, 0, 0, 0, 0, 9]);
        ip.extend_from_slice(&GUEST_MAC.0);
        ip.extend_from_slice(&[0x08, 0x00, 0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0]);
        ip.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        assert_eq!(t.from_guest(&ip, &mut out, now), Err(EthDrop::UnknownMac));
        assert_eq!(t.drops(EthDrop::UnknownSource), 1);
        assert_eq!(t.drops(EthDrop::UnknownMac), 1);
    }

    fn frame(dst: Mac, src: Mac, ty: u16, body: &[u8]) -> Vec<u8> {
        let mut f = eth_header(dst, src, ty).to_vec();
        f.extend_from_slice(body);
        f
    }

    fn ipv4(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 17, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(&[0; 8]);
        p
    }

    #[test]
    fn what_ipoib_cannot_carry_or_a_guest_may_not_send() {
        let now = Instant::now();
        let mut t = translator(vec!["10.0.0.1".parse().unwrap()]);
        let mut out = [0u8; 128];
        let ip = ipv4([10, 0, 0, 1], [224, 0, 0, 251]);
        let mdns = Mac::ipv4_multicast("224.0.0.251".parse().unwrap());
        let cases: Vec<(Vec<u8>, EthDrop)> = vec![
            (vec![0u8; 13], EthDrop::Malformed),
            // LLDP.
            (frame(mdns, GUEST_MAC, 0x88cc, &[0; 46]), EthDrop::Ethertype),
            // An 802.3 length field (an STP BPDU).
            (frame(mdns, GUEST_MAC, 0x0026, &[0; 46]), EthDrop::Ethertype),
            (frame(mdns, GUEST_MAC, 0x8100, &[0; 46]), EthDrop::Vlan),
            (
                frame(mdns, Mac([0x52, 0x54, 0, 0, 0, 1]), 0x0800, &ip),
                EthDrop::SpoofedMac,
            ),
            (
                frame(
                    mdns,
                    GUEST_MAC,
                    0x0800,
                    &ipv4([10, 0, 0, 9], [224, 0, 0, 251]),
                ),
                EthDrop::SpoofedIp,
            ),
            // The MAC of another group than the IP destination's.
            (
                frame(
                    Mac::ipv4_multicast("224.0.0.1".parse().unwrap()),
                    GUEST_MAC,
                    0x0800,
                    &ip,
                ),
                EthDrop::NotIpMulticast,
            ),
            (
                frame(Mac([0x01, 0x80, 0xc2, 0, 0, 0]), GUEST_MAC, 0x0800, &ip),
                EthDrop::NotIpMulticast,
            ),
            (
                frame(mdns, GUEST_MAC, 0x0800, &[0x45, 0, 0]),
                EthDrop::Malformed,
            ),
            (
                frame(mdns, GUEST_MAC, 0x0806, &[0; 10]),
                EthDrop::BadControl,
            ),
        ];
        for (f, why) in &cases {
            assert_eq!(t.from_guest(f, &mut out, now), Err(*why), "{f:02x?}");
        }
        for why in EthDrop::ALL {
            let n = cases.iter().filter(|(_, w)| *w == why).count() as u64;
            assert_eq!(t.drops(why), n, "{}", why.name());
        }
        // The configured address multicasts to the group of its IP
        // destination; a directed broadcast goes to the broadcast group.
        assert_eq!(
            t.from_guest(&frame(mdns, GUEST_MAC, 0x0800, &ip), &mut out, now),
            Ok(GuestTx::Forward {
                to: Target::Group(mgid::ipv4("224.0.0.251".parse().unwrap(), 0xffff, 2)),
                ethertype: 0x0800
            })
        );
        let bcast = frame(
            Mac::BROADCAST,
            GUEST_MAC,
            0x0800,
            &ipv4([10, 0, 0, 1], [10, 0, 0, 255]),
        );
        assert_eq!(
            t.from_guest(&bcast, &mut out, now),
            Ok(GuestTx::Forward {
                to: Target::Group(BROADCAST_MGID),
                ethertype: 0x0800
            })
        );
        // A configured list is not extended by what the guest tries.
        assert_eq!(t.addresses(), &["10.0.0.1".parse::<IpAddr>().unwrap()]);
    }

    /// A neighbour solicitation from the guest's link-local address for
    /// fe80::2, to its solicited-node group, with an Ethernet SLLA.
    fn guest_ns() -> Vec<u8> {
        let src: Ipv6Addr = "fe80::5054:ff:fe12:3456".parse().unwrap();
        let dst: Ipv6Addr = "ff02::1:ff00:2".parse().unwrap();
        let mut p = vec![0x60, 0, 0, 0, 0, 32, 58, 255];
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(&[135, 0, 0, 0, 0, 0, 0, 0]);
        p.extend_from_slice(&"fe80::2".parse::<Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(&[1, 1]);
        p.extend_from_slice(&GUEST_MAC.0);
        let sum = nd::icmpv6_checksum(src, dst, &p[40..]);
        p[42..44].copy_from_slice(&sum.to_be_bytes());
        p
    }

    #[test]
    fn guest_neighbour_solicitation_gets_an_ipoib_option() {
        let mut t = translator(Vec::new());
        let dst = Mac::ipv6_multicast("ff02::1:ff00:2".parse().unwrap());
        assert_eq!(dst.to_string(), "33:33:ff:00:00:02");
        let f = frame(dst, GUEST_MAC, 0x86dd, &guest_ns());
        let mut out = [0u8; 256];
        let tx = t.from_guest(&f, &mut out, Instant::now()).unwrap();
        let g = mgid::ipv6("ff02::1:ff00:2".parse().unwrap(), 0xffff, 2);
        assert_eq!(
            tx,
            GuestTx::Rewritten {
                to: Target::Group(g),
                ethertype: 0x86dd,
                len: 40 + 24 + 24
            }
        );
        let p = &out[..88];
        assert_eq!(&p[4..6], &[0, 48], "payload length grew by 16");
        // The option of RFC 4391 §8: type 1, length 3, two zero bytes, the
        // 20-byte address.
        assert_eq!(&p[64..68], &[1, 3, 0, 0]);
        assert_eq!(&p[68..88], &vnic().0);
        assert!(icmpv6_checksum_ok(p));
        // The guest's link-local address was learned.
        assert_eq!(
            t.addresses(),
            &["fe80::5054:ff:fe12:3456".parse::<IpAddr>().unwrap()]
        );
        // An SLLA naming someone else is spoofing.
        let mut forged = guest_ns();
        forged[66..72].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
        let f = frame(dst, GUEST_MAC, 0x86dd, &forged);
        assert_eq!(
            t.from_guest(&f, &mut out, Instant::now()),
            Err(EthDrop::SpoofedMac)
        );
    }

    /// A router advertisement from the peer with an IPoIB SLLA and an MTU
    /// option of 9000.
    fn peer_ra() -> Vec<u8> {
        let src: Ipv6Addr = "fe80::202:c903:11:2233".parse().unwrap();
        let dst: Ipv6Addr = "ff02::1".parse().unwrap();
        let mut p = vec![0x60, 0, 0, 0, 0, 48, 58, 255];
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(&[134, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0]);
        p.extend_from_slice(&[1, 3, 0, 0]);
        p.extend_from_slice(&peer().0);
        p.extend_from_slice(&[5, 1, 0, 0, 0, 0, 0x23, 0x28]);
        let sum = nd::icmpv6_checksum(src, dst, &p[40..]);
        p[42..44].copy_from_slice(&sum.to_be_bytes());
        p
    }

    #[test]
    fn router_advertisement_reaches_the_guest_in_ethernet_form() {
        let now = Instant::now();
        let mut t = translator(Vec::new());
        let mut out = [0u8; 256];
        let from = multicast_from_peer();
        let rx = t.to_guest(from, 0x86dd, &peer_ra(), &mut out, now).unwrap();
        assert_eq!(rx, GuestRx::Rewritten(14 + 40 + 16 + 8 + 8));
        let remac = t.remacs.mac_for(peer(), now);
        assert_eq!(
            &out[..6],
            &Mac::ipv6_multicast("ff02::1".parse().unwrap()).0
        );
        assert_eq!(&out[6..12], &remac.0);
        let p = &out[14..14 + 72];
        assert_eq!(&p[4..6], &[0, 32], "payload length shrank by 16");
        assert_eq!(
            &p[56..64],
            &[
                1, 1, remac.0[0], remac.0[1], remac.0[2], remac.0[3], remac.0[4], remac.0[5]
            ]
        );
        // MTU clamped to the IPoIB MTU (2044 = 0x7fc).
        assert_eq!(&p[64..72], &[5, 1, 0, 0, 0, 0, 0x07, 0xfc]);
        assert!(icmpv6_checksum_ok(p));
    }

    #[test]
    fn multicast_from_the_fabric_gets_the_group_mac() {
        let now = Instant::now();
        let mut t = translator(Vec::new());
        let mut out = [0u8; 128];
        let from = multicast_from_peer();
        let pkt = ipv4([10, 0, 0, 2], [224, 0, 0, 251]);
        let Ok(GuestRx::Header(h)) = t.to_guest(from, 0x0800, &pkt, &mut out, now) else {
            panic!("not delivered");
        };
        assert_eq!(&h[..6], &[0x01, 0x00, 0x5e, 0x00, 0x00, 0xfb]);
        let pkt = ipv4([10, 0, 0, 2], [10, 0, 0, 255]);
        let Ok(GuestRx::Header(h)) = t.to_guest(from, 0x0800, &pkt, &mut out, now) else {
            panic!("not delivered");
        };
        assert_eq!(&h[..6], &[0xff; 6]);
        // IPoIB ARP requests arrive as Ethernet broadcast.
        let mut req = ipoib_arp_reply();
        req[7] = 1;
        req[32..52].fill(0);
        let Ok(GuestRx::Rewritten(60)) = t.to_guest(from, 0x0806, &req, &mut out, now) else {
            panic!("not delivered");
        };
        assert_eq!(&out[..6], &[0xff; 6]);
        assert_eq!(&out[32..38], &[0; 6], "target hardware address unknown");
        // Non-IPoIB ARP and unknown EtherTypes are dropped.
        assert_eq!(
            t.to_guest(from, 0x0806, &[0u8; 56], &mut out, now),
            Err(EthDrop::BadControl)
        );
        assert_eq!(
            t.to_guest(from, 0x88cc, &pkt, &mut out, now),
            Err(EthDrop::Ethertype)
        );
    }

    #[test]
    fn an_unconfigured_mac_is_learned_once() {
        let now = Instant::now();
        let mut t = translator(Vec::new()).learn_mac();
        let mut out = [0u8; 128];
        let qemu_mac = Mac([0x52, 0x54, 0x00, 0x00, 0x00, 0x01]);
        let mdns = Mac::ipv4_multicast("224.0.0.251".parse().unwrap());
        let ip = ipv4([10, 0, 0, 1], [224, 0, 0, 251]);
        assert!(
            t.from_guest(&frame(mdns, qemu_mac, 0x0800, &ip), &mut out, now)
                .is_ok()
        );
        assert_eq!(t.mac(), qemu_mac);
        // From then on it is the guest's MAC and nothing else.
        assert_eq!(
            t.from_guest(&frame(mdns, GUEST_MAC, 0x0800, &ip), &mut out, now),
            Err(EthDrop::SpoofedMac)
        );
        // A new guest: learned again, addresses forgotten.
        t.reset();
        assert!(t.addresses().is_empty());
        assert!(
            t.from_guest(&frame(mdns, GUEST_MAC, 0x0800, &ip), &mut out, now)
                .is_ok()
        );
        assert_eq!(t.mac(), GUEST_MAC);
    }

    /// A DHCP message from `ports.0` to `ports.1` (from 0.0.0.0 to the
    /// limited broadcast address), of message type `op` (option 53).
    fn bootp(ports: (u16, u16), op: u8, htype: u8, hlen: u8, xid: u32, chaddr: &[u8]) -> Vec<u8> {
        let addrs = ([0; 4], [255; 4]);
        dhcp::test_message(addrs, ports, (op, htype, hlen), xid, chaddr, &[53, 1, op])
    }

    #[test]
    fn dhcp_is_rewritten_both_ways_and_replies_go_to_the_asker() {
        let now = Instant::now();
        let mut t = translator(Vec::new());
        let mut out = [0u8; 1024];
        let discover = bootp((68, 67), 1, 1, 6, 0xdead_beef, &GUEST_MAC.0);
        let f = frame(Mac::BROADCAST, GUEST_MAC, 0x0800, &discover);
        let tx = t.from_guest(&f, &mut out, now).unwrap();
        let GuestTx::Rewritten { to, ethertype, len } = tx else {
            panic!("{tx:?}");
        };
        assert_eq!((ethertype, len), (0x0800, discover.len() + 9));
        assert!(matches!(to, Target::Group(_)), "to the broadcast group");
        assert_eq!((out[28 + 1], out[28 + 2]), (32, 0), "the IPoIB form");

        // The offer, broadcast by a server on the fabric: for this guest.
        let offer = bootp((67, 68), 2, 32, 0, 0xdead_beef, &[]);
        let from = multicast_from_peer();
        let rx = t.to_guest(from, 0x0800, &offer, &mut out, now).unwrap();
        let GuestRx::Rewritten(n) = rx else {
            panic!("{rx:?}");
        };
        assert_eq!(n, 14 + offer.len());
        assert_eq!(&out[..6], &GUEST_MAC.0, "to the guest's MAC");
        let m = &out[14 + 28..];
        assert_eq!((m[1], m[2]), (1, 6));
        assert_eq!(&m[28..34], &GUEST_MAC.0);
        // Another guest's transaction is not this guest's.
        let other = bootp((67, 68), 2, 32, 0, 0x1234_5678, &[]);
        assert_eq!(
            t.to_guest(from, 0x0800, &other, &mut out, now),
            Err(EthDrop::DhcpOther)
        );
        assert_eq!(t.drops(EthDrop::DhcpOther), 1);
        // A new frontend forgets the transactions.
        t.reset();
        assert_eq!(
            t.to_guest(from, 0x0800, &offer, &mut out, now),
            Err(EthDrop::DhcpOther)
        );
    }

    #[test]
    fn igmp_and_mld_reports_become_listens() {
        let now = Instant::now();
        let mut t = translator(Vec::new());
        let mut out = [0u8; 256];
        // IGMPv2 report for 224.0.0.251 (RFC 2236 §2), to the group.
        let mut igmp2 = vec![0x46, 0, 0, 32, 0, 0, 0x40, 0, 1, 2, 0, 0];
        igmp2.extend_from_slice(&[10, 0, 0, 1, 224, 0, 0, 251]);
        igmp2.extend_from_slice(&[0x94, 0x04, 0, 0]); // router alert
        igmp2.extend_from_slice(&[0x16, 0, 0, 0, 224, 0, 0, 251]);
        let mdns = Mac::ipv4_multicast("224.0.0.251".parse().unwrap());
        assert!(
            t.from_guest(&frame(mdns, GUEST_MAC, 0x0800, &igmp2), &mut out, now)
                .is_ok()
        );
        // IGMPv3 report (RFC 3376 §4.2) to 224.0.0.22: two records,
        // EXCLUDE {} for 239.1.2.3 (a join) and INCLUDE {} for 239.9.9.9
        // (a leave).
        let mut igmp3 = vec![0x46, 0, 0, 48, 0, 0, 0x40, 0, 1, 2, 0, 0];
        igmp3.extend_from_slice(&[10, 0, 0, 1, 224, 0, 0, 22]);
        igmp3.extend_from_slice(&[0x94, 0x04, 0, 0]);
        igmp3.extend_from_slice(&[0x22, 0, 0, 0, 0, 0, 0, 2]);
        igmp3.extend_from_slice(&[4, 0, 0, 0, 239, 1, 2, 3]);
        igmp3.extend_from_slice(&[3, 0, 0, 0, 239, 9, 9, 9]);
        let all_v3 = Mac::ipv4_multicast("224.0.0.22".parse().unwrap());
        assert!(
            t.from_guest(&frame(all_v3, GUEST_MAC, 0x0800, &igmp3), &mut out, now)
                .is_ok()
        );
        // MLDv2 report (RFC 3810 §5.2) to ff02::16 behind a hop-by-hop
        // header with router alert: CHANGE_TO_EXCLUDE {} for ff05::1:3.
        let src: Ipv6Addr = "fe80::5054:ff:fe12:3456".parse().unwrap();
        let dst: Ipv6Addr = "ff02::16".parse().unwrap();
        let mut mld = vec![0x60, 0, 0, 0, 0, 36, 0, 1];
        mld.extend_from_slice(&src.octets());
        mld.extend_from_slice(&dst.octets());
        mld.extend_from_slice(&[58, 0, 5, 2, 0, 0, 1, 0]);
        mld.extend_from_slice(&[143, 0, 0, 0, 0, 0, 0, 1]);
        mld.extend_from_slice(&[4, 0, 0, 0]);
        mld.extend_from_slice(&"ff05::1:3".parse::<Ipv6Addr>().unwrap().octets());
        let to = Mac::ipv6_multicast(dst);
        assert!(
            t.from_guest(&frame(to, GUEST_MAC, 0x86dd, &mld), &mut out, now)
                .is_ok()
        );
        let ip = |a: &str| a.parse::<IpAddr>().unwrap();
        assert_eq!(
            t.take_listens(),
            [
                Listen::Join(ip("224.0.0.251")),
                Listen::Join(ip("239.1.2.3")),
                Listen::Leave(ip("239.9.9.9")),
                Listen::Join(ip("ff05::1:3")),
            ]
        );
        assert!(t.take_listens().is_empty());
        // A truncated report is no report.
        let cut = &igmp3[..igmp3.len() - 6];
        let _ = t.from_guest(&frame(all_v3, GUEST_MAC, 0x0800, cut), &mut out, now);
        assert_eq!(t.take_listens().len(), 1, "the whole first record only");

        // IGMPv2 Leave Group (RFC 2236 §2: type 0x17) for 224.0.0.251, to
        // all-routers; after a report in the same batch, the leave wins.
        let mut leave = vec![0x46, 0, 0, 32, 0, 0, 0x40, 0, 1, 2, 0, 0];
        leave.extend_from_slice(&[10, 0, 0, 1, 224, 0, 0, 2]);
        leave.extend_from_slice(&[0x94, 0x04, 0, 0]);
        leave.extend_from_slice(&[0x17, 0, 0, 0, 224, 0, 0, 251]);
        let routers = Mac::ipv4_multicast("224.0.0.2".parse().unwrap());
        assert!(
            t.from_guest(&frame(mdns, GUEST_MAC, 0x0800, &igmp2), &mut out, now)
                .is_ok()
        );
        assert!(
            t.from_guest(&frame(routers, GUEST_MAC, 0x0800, &leave), &mut out, now)
                .is_ok()
        );
        assert_eq!(t.take_listens(), [Listen::Leave(ip("224.0.0.251"))]);
        // MLDv1 Done (RFC 2710 §3: type 132) for ff05::1:3, to ff02::2.
        let dst: Ipv6Addr = "ff02::2".parse().unwrap();
        let mut done = vec![0x60, 0, 0, 0, 0, 32, 0, 1];
        done.extend_from_slice(&src.octets());
        done.extend_from_slice(&dst.octets());
        done.extend_from_slice(&[58, 0, 5, 2, 0, 0, 1, 0]);
        done.extend_from_slice(&[132, 0, 0, 0, 0, 0, 0, 0]);
        done.extend_from_slice(&"ff05::1:3".parse::<Ipv6Addr>().unwrap().octets());
        assert!(
            t.from_guest(
                &frame(Mac::ipv6_multicast(dst), GUEST_MAC, 0x86dd, &done),
                &mut out,
                now
            )
            .is_ok()
        );
        assert_eq!(t.take_listens(), [Listen::Leave(ip("ff05::1:3"))]);
    }

    /// Deterministic xorshift, for the garbage below.
    fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    #[test]
    fn garbage_from_either_side_is_refused_or_translated_never_a_panic() {
        let now = Instant::now();
        let mut t = translator(Vec::new());
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut out = [0u8; 512];
        let templates: [&[u8]; 4] = [
            &guest_ns(),
            &peer_ra(),
            &ipoib_arp_reply(),
            &ipv4([10, 0, 0, 1], [224, 0, 0, 1]),
        ];
        for round in 0..20_000u32 {
            // Start from a valid packet now and then, so that the parsers
            // get past their first checks, then damage it.
            let base = templates[round as usize % templates.len()];
            let len = (rng(&mut seed) % 300) as usize;
            let mut pkt: Vec<u8> = (0..len)
                .map(|i| {
                    let r = rng(&mut seed) as u8;
                    match base.get(i) {
                        Some(&b) if !r.is_multiple_of(8) => b,
                        _ => r,
                    }
                })
                .collect();
            let ty = [0x0800u16, 0x0806, 0x86dd, 0x8100, 0x88cc][round as usize % 5];
            let from = Sender {
                slid: (rng(&mut seed) % 8) as u16,
                sqpn: (rng(&mut seed) % 0x200) as u32,
                sgid: (round % 3 == 0).then_some(PEER_GID),
                multicast: round % 2 == 0,
            };
            let _ = t.to_guest(from, ty, &pkt, &mut out, now);
            let dst = if round % 4 == 0 {
                Mac::BROADCAST
            } else {
                Mac([0x33, 0x33, 0, 0, 0, 1])
            };
            let mut f = eth_header(dst, GUEST_MAC, ty).to_vec();
            f.append(&mut pkt);
            let _ = t.from_guest(&f, &mut out, now);
        }
        // The case it found: an ND message whose IPv6 payload length is 0.
        let mut empty = guest_ns();
        empty[4..6].fill(0);
        let dst = Mac::ipv6_multicast("ff02::1:ff00:2".parse().unwrap());
        let f = frame(dst, GUEST_MAC, 0x86dd, &empty);
        assert_eq!(t.from_guest(&f, &mut out, now), Err(EthDrop::BadControl));
        // Still bounded, still working.
        assert!(t.addresses().len() <= MAX_GUEST_ADDRS);
        assert!(t.remacs().len() <= MAX_REMACS);
        assert!(t.take_listens().len() <= MAX_PENDING_LISTENS);
        let rx = t.to_guest(
            unicast_from_peer(),
            0x0806,
            &ipoib_arp_reply(),
            &mut out,
            now,
        );
        assert_eq!(rx, Ok(GuestRx::Rewritten(60)));
    }
}
