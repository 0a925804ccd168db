//! An IPoIB interface in datagram mode, as pure logic.
//!
//! The host hands in IP packets to transmit and the HCA hands in received
//! IPoIB payloads; the interface answers with [`Action`]s: send this to a
//! unicast address handle or a multicast group, deliver that to the host,
//! query a path, join a group. It resolves IP addresses to hardware
//! addresses itself (ARP for IPv4, neighbour solicitation for IPv6: the
//! host side is a point-to-point TUN that never resolves), resolves
//! hardware addresses to paths through the caller's SA queries, and keeps
//! multicast membership with the kernel's retry and queueing rules.
//!
//! `A` is the caller's address-handle type (built from a PathRecord or an
//! MCMemberRecord) and `P` names a host packet buffer.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use super::addr::HwAddr;
use super::arp::{ARP_LEN, Arp, Op};
use super::eth::Target;
use super::nd::{self, MESSAGE_LEN, Neighbor};
use super::resolve::{self, Cache, Lookup};
use super::{Gid, IPV6_HEADER, ethertype, mgid};

/// Packets queued for a multicast group that is being joined
/// (`IPOIB_MAX_MCAST_QUEUE`).
pub const MCAST_QUEUE_LIMIT: usize = 64;
/// First join retry delay; doubles per failure.
pub const JOIN_BACKOFF_START: Duration = Duration::from_secs(1);
/// Longest join retry delay (`IPOIB_MAX_BACKOFF_SECONDS`).
pub const JOIN_BACKOFF_MAX: Duration = Duration::from_secs(16);
/// Most multicast groups one interface holds; past it, sends to new
/// groups are dropped (counted) instead of joining.
pub const MAX_GROUPS: usize = 512;

/// Static settings of one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The interface's own hardware address (flags, its UD QPN, port GID).
    pub hw: HwAddr,
    /// Its P_Key.
    pub pkey: u16,
    /// Multicast scope nibble (2 = link-local).
    pub scope: u8,
    /// IPv4 addresses of the host side.
    pub ipv4: Vec<Ipv4Addr>,
    /// IPv6 addresses of the host side (the link-local one included).
    pub ipv6: Vec<Ipv6Addr>,
    /// The other side is an Ethernet guest that resolves its neighbours
    /// itself (through [`super::eth::Translator`]): received ARP and ND
    /// are delivered to it instead of being answered here, and it sends
    /// with [`Datagram::send_to`].
    pub guest: bool,
}

/// A control message the interface built itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// An ARP body.
    Arp([u8; ARP_LEN]),
    /// An IPv6 packet carrying an NS or NA.
    Nd([u8; IPV6_HEADER + MESSAGE_LEN]),
}

impl Control {
    /// The bytes after the IPoIB header.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Control::Arp(b) => b,
            Control::Nd(b) => b,
        }
    }

    fn ethertype(&self) -> u16 {
        match self {
            Control::Arp(_) => ethertype::ARP,
            Control::Nd(_) => ethertype::IPV6,
        }
    }
}

/// What to transmit: a host packet or a control message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload<P> {
    /// A host packet, with its EtherType.
    Host(P, u16),
    /// A control message.
    Control(Control),
}

impl<P> Payload<P> {
    /// The EtherType for the IPoIB header.
    pub fn ethertype(&self) -> u16 {
        match self {
            Payload::Host(_, ty) => *ty,
            Payload::Control(c) => c.ethertype(),
        }
    }
}

/// Where a send goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest<A> {
    /// Unicast to `qpn` through the path's address handle.
    Unicast {
        /// Address handle of the path.
        ah: A,
        /// Remote UD QPN.
        qpn: u32,
    },
    /// To a joined multicast group (QPN 0xFFFFFF).
    Multicast {
        /// The group's address handle.
        ah: A,
        /// The group.
        mgid: Gid,
    },
}

/// Why a packet was dropped; one counter each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Not IPv4 or IPv6, or too short to read its destination.
    Malformed,
    /// A neighbour or path queue was full.
    QueueFull,
    /// ARP/ND or the path query gave up.
    Unreachable,
    /// The multicast group could not be joined in time, or its queue was
    /// full.
    McastNotJoined,
    /// The broadcast group is not joined (no carrier).
    NoCarrier,
    /// Our own multicast looped back by the HCA.
    OwnLoopback,
    /// Flushed by a port event.
    Flushed,
    /// Received ARP or ND that is not IPoIB-shaped.
    BadControl,
    /// EtherType IPoIB does not carry.
    Ethertype,
}

impl DropReason {
    /// Every reason, in the order `ipoib-tool stats` prints them.
    pub const ALL: [DropReason; 9] = [
        DropReason::Malformed,
        DropReason::QueueFull,
        DropReason::Unreachable,
        DropReason::McastNotJoined,
        DropReason::NoCarrier,
        DropReason::OwnLoopback,
        DropReason::Flushed,
        DropReason::BadControl,
        DropReason::Ethertype,
    ];

    /// The counter name.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "drop_malformed",
            DropReason::QueueFull => "drop_queue_full",
            DropReason::Unreachable => "drop_unreachable",
            DropReason::McastNotJoined => "drop_mcast_not_joined",
            DropReason::NoCarrier => "drop_no_carrier",
            DropReason::OwnLoopback => "drop_own_loopback",
            DropReason::Flushed => "drop_flushed",
            DropReason::BadControl => "drop_bad_arp_nd",
            DropReason::Ethertype => "drop_ethertype",
        }
    }
}

/// What the caller does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Action<A, P> {
    /// Transmit.
    Send {
        /// Destination.
        dest: Dest<A>,
        /// What.
        payload: Payload<P>,
    },
    /// Hand a received packet to the host.
    Deliver(P),
    /// Query the SA for the path to this GID, then call
    /// [`Datagram::path_resolved`] or [`Datagram::path_failed`].
    QueryPath(Gid),
    /// Join this group (send-only or full member), then call
    /// [`Datagram::joined`] or [`Datagram::join_failed`].
    Join {
        /// The group.
        mgid: Gid,
        /// Send-only full member rather than full member.
        send_only: bool,
    },
    /// Leave this group (the endpoint is no longer a member: detach its
    /// QP, and leave at the SA if no one else on the port uses it).
    Leave(Gid),
    /// The host packet or queued work is dropped and counted.
    Dropped(Option<P>, DropReason),
    /// A received packet was consumed by the interface itself (ARP, ND);
    /// its buffer is free again.
    Release(P),
}

/// A packet waiting for a neighbour or a path.
#[derive(Debug)]
struct Waiting<P> {
    hw: HwAddr,
    payload: Payload<P>,
}

#[derive(Debug)]
enum Group<A, P> {
    Joining {
        send_only: bool,
        queue: VecDeque<Payload<P>>,
        /// A join request is outstanding.
        in_flight: bool,
        failures: u32,
        backoff: Duration,
        retry_at: Option<Instant>,
    },
    Joined {
        ah: A,
        send_only: bool,
    },
}

/// The source of a received packet, from its CQE and GRH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    /// Source LID.
    pub slid: u16,
    /// Source QPN.
    pub sqpn: u32,
    /// Whether the packet was multicast (GRH destination GID 0xFF…).
    pub multicast: bool,
}

/// One IPoIB interface in datagram mode; see the module documentation.
#[derive(Debug)]
pub struct Datagram<A, P> {
    cfg: Config,
    lid: u16,
    broadcast: Gid,
    neigh: Cache<IpAddr, HwAddr, Payload<P>>,
    paths: Cache<Gid, A, Waiting<P>>,
    groups: HashMap<Gid, Group<A, P>>,
    /// Counts, indexed by `DropReason as usize`.
    drops: [u64; DropReason::ALL.len()],
    events: Vec<resolve::Event<IpAddr, Payload<P>>>,
    path_events: Vec<resolve::Event<Gid, Waiting<P>>>,
    /// Directed broadcast addresses of the host's IPv4 subnets.
    broadcasts: Vec<Ipv4Addr>,
}

impl<A: Copy, P> Datagram<A, P> {
    /// A new interface; call [`Datagram::start`] when the port is active.
    pub fn new(cfg: Config) -> Self {
        let broadcast = mgid::ipv4(Ipv4Addr::BROADCAST, cfg.pkey, cfg.scope);
        Self {
            cfg,
            lid: 0,
            broadcast,
            neigh: Cache::new(resolve::Config::NEIGHBOURS),
            paths: Cache::new(resolve::Config::PATHS),
            groups: HashMap::new(),
            drops: [0; DropReason::ALL.len()],
            events: Vec::new(),
            path_events: Vec::new(),
            broadcasts: Vec::new(),
        }
    }

    /// The interface settings.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The broadcast MGID of the interface's partition.
    pub fn broadcast_mgid(&self) -> Gid {
        self.broadcast
    }

    /// Whether the broadcast group is joined: the interface has carrier.
    pub fn carrier(&self) -> bool {
        matches!(self.groups.get(&self.broadcast), Some(Group::Joined { .. }))
    }

    /// Drops counted so far, by reason.
    pub fn drops(&self, why: DropReason) -> u64 {
        self.drops[why as usize]
    }

    /// The neighbour table, for `ipoib-tool neigh`.
    pub fn neighbours(&self, now: Instant) -> Vec<resolve::EntryInfo<IpAddr, HwAddr>> {
        self.neigh.entries(now)
    }

    /// Multicast groups: (MGID, joined, send-only).
    pub fn groups(&self) -> Vec<(Gid, bool, bool)> {
        self.groups
            .iter()
            .map(|(g, s)| match s {
                Group::Joining { send_only, .. } => (*g, false, *send_only),
                Group::Joined { send_only, .. } => (*g, true, *send_only),
            })
            .collect()
    }

    /// The port is active with `lid`: join the broadcast group first; the
    /// other groups follow once it is joined (their parameters come from
    /// it).
    ///
    /// The host side (a TUN device) does not pass its multicast list down,
    /// so the interface listens on its own to the groups every IP host is
    /// in: IPv4 all-hosts, IPv6 all-nodes, and the solicited-node group of
    /// each IPv6 address (needed before anyone can resolve it).
    pub fn start(&mut self, lid: u16, out: &mut Vec<Action<A, P>>) {
        self.lid = lid;
        self.want_group(self.broadcast, false, out);
        let mut always = vec![IpAddr::V4(Ipv4Addr::new(224, 0, 0, 1))];
        if !self.cfg.ipv6.is_empty() {
            always.push(IpAddr::V6(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1)));
        }
        always.extend(
            self.cfg
                .ipv6
                .iter()
                .map(|a| IpAddr::V6(mgid::solicited_node(*a))),
        );
        for g in always {
            self.listen(g, out);
        }
    }

    /// Replaces the host side's addresses (they change under the
    /// interface: the kernel generates the link-local one, administrators
    /// add and remove others). New IPv6 addresses get their
    /// solicited-node group joined.
    pub fn set_addresses(
        &mut self,
        ipv4: Vec<Ipv4Addr>,
        ipv6: Vec<Ipv6Addr>,
        out: &mut Vec<Action<A, P>>,
    ) {
        let fresh: Vec<Ipv6Addr> = ipv6
            .iter()
            .filter(|a| !self.cfg.ipv6.contains(a))
            .copied()
            .collect();
        let first_v6 = self.cfg.ipv6.is_empty() && !ipv6.is_empty();
        self.cfg.ipv4 = ipv4;
        self.cfg.ipv6 = ipv6;
        if first_v6 {
            self.listen(IpAddr::V6(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1)), out);
        }
        for a in fresh {
            self.listen(IpAddr::V6(mgid::solicited_node(a)), out);
        }
    }

    /// The interface's P_Key changed (the SM rewrote the port's P_Key
    /// table; the heavy flush of ipoib.md §11.2): the broadcast group and
    /// every MGID follow it. Call after [`Datagram::flush_normal`] and
    /// before [`Datagram::start`].
    pub fn set_pkey(&mut self, pkey: u16) {
        self.cfg.pkey = pkey;
        self.broadcast = mgid::ipv4(Ipv4Addr::BROADCAST, pkey, self.cfg.scope);
    }

    /// Sets the directed broadcast addresses of the host's IPv4 subnets
    /// (from its addresses and prefix lengths).
    pub fn set_broadcasts(&mut self, broadcasts: Vec<Ipv4Addr>) {
        self.broadcasts = broadcasts;
    }

    /// The MTU the broadcast group allows: its IB MTU − 4, or `None`
    /// before the join. `mtu_code` is the MCMemberRecord MTU enum.
    pub fn mtu_for(mtu_code: u8) -> Option<u32> {
        match mtu_code {
            1..=5 => Some((128u32 << mtu_code) - super::IPOIB_HEADER_LEN as u32),
            _ => None,
        }
    }

    /// The host listens to `group` (it was added to the device multicast
    /// list): join it as a full member.
    pub fn listen(&mut self, group: IpAddr, out: &mut Vec<Action<A, P>>) {
        let Some(g) = mgid::for_ip(group, self.cfg.pkey, self.cfg.scope) else {
            return;
        };
        match self.groups.get_mut(&g) {
            None => self.want_group(g, false, out),
            Some(Group::Joined { send_only, .. }) if *send_only => {
                // The send-only membership is replaced by a full one.
                self.groups.insert(g, fresh(false));
                self.issue_join(g, out);
            }
            Some(Group::Joining { send_only, .. }) if *send_only => {
                // Whatever the outstanding join returns, join fully after it.
                *send_only = false;
                self.issue_join(g, out);
            }
            Some(_) => {}
        }
    }

    /// The host (a guest: an IGMP leave, an MLD done) no longer listens
    /// to `group`: the membership goes, unless the interface needs the
    /// group itself (broadcast, all-hosts, all-nodes, the solicited-node
    /// group of one of its addresses). Packets waiting for the join are
    /// dropped.
    pub fn unlisten(&mut self, group: IpAddr, out: &mut Vec<Action<A, P>>) {
        let Some(g) = mgid::for_ip(group, self.cfg.pkey, self.cfg.scope) else {
            return;
        };
        let for_ip = |ip: IpAddr| mgid::for_ip(ip, self.cfg.pkey, self.cfg.scope);
        let needed = g == self.broadcast
            || for_ip(IpAddr::V4(Ipv4Addr::new(224, 0, 0, 1))) == Some(g)
            || for_ip(IpAddr::V6(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1))) == Some(g)
            || self
                .cfg
                .ipv6
                .iter()
                .any(|a| for_ip(IpAddr::V6(mgid::solicited_node(*a))) == Some(g));
        if needed {
            return;
        }
        match self.groups.remove(&g) {
            Some(Group::Joining { queue, .. }) => {
                for p in queue {
                    self.drop_payload(p, DropReason::Flushed, out);
                }
                out.push(Action::Leave(g));
            }
            Some(Group::Joined { .. }) => out.push(Action::Leave(g)),
            None => {}
        }
    }

    fn want_group(&mut self, g: Gid, send_only: bool, out: &mut Vec<Action<A, P>>) {
        if self.groups.contains_key(&g) {
            return;
        }
        self.groups.insert(g, fresh(send_only));
        if g == self.broadcast || self.carrier() {
            self.issue_join(g, out);
        }
    }

    fn issue_join(&mut self, g: Gid, out: &mut Vec<Action<A, P>>) {
        if let Some(Group::Joining {
            send_only,
            in_flight,
            retry_at,
            ..
        }) = self.groups.get_mut(&g)
        {
            *in_flight = true;
            *retry_at = None;
            out.push(Action::Join {
                mgid: g,
                send_only: *send_only,
            });
        }
    }

    /// A join succeeded; `ah` addresses the group. Packets queued for it
    /// are sent; after the broadcast group, waiting groups are joined.
    pub fn joined(&mut self, g: Gid, ah: A, out: &mut Vec<Action<A, P>>) {
        if !matches!(self.groups.get(&g), Some(Group::Joining { .. })) {
            return; // a stale answer (flushed or already joined)
        }
        let Some(Group::Joining {
            send_only, queue, ..
        }) = self.groups.remove(&g)
        else {
            return;
        };
        for payload in queue {
            out.push(Action::Send {
                dest: Dest::Multicast { ah, mgid: g },
                payload,
            });
        }
        self.groups.insert(g, Group::Joined { ah, send_only });
        if g == self.broadcast {
            let waiting: Vec<Gid> = self
                .groups
                .iter()
                .filter(|(_, s)| {
                    matches!(
                        s,
                        Group::Joining {
                            in_flight: false,
                            retry_at: None,
                            ..
                        }
                    )
                })
                .map(|(g, _)| *g)
                .collect();
            for other in waiting {
                self.issue_join(other, out);
            }
        }
    }

    /// A join failed: retry with back-off (1 s doubling to 16 s). A
    /// send-only group's queued packets are dropped; the next packet
    /// triggers a new attempt.
    pub fn join_failed(&mut self, g: Gid, now: Instant, out: &mut Vec<Action<A, P>>) {
        let Some(Group::Joining {
            send_only,
            queue,
            in_flight,
            failures,
            backoff,
            retry_at,
        }) = self.groups.get_mut(&g)
        else {
            return;
        };
        *in_flight = false;
        *failures += 1;
        if *send_only && *failures > 1 {
            let dropped: Vec<_> = queue.drain(..).collect();
            self.groups.remove(&g);
            for p in dropped {
                self.drop_payload(p, DropReason::McastNotJoined, out);
            }
            return;
        }
        *retry_at = Some(now + *backoff);
        *backoff = (*backoff * 2).min(JOIN_BACKOFF_MAX);
    }

    /// The path to `gid` is known: send what waited for it.
    pub fn path_resolved(&mut self, gid: Gid, ah: A, now: Instant, out: &mut Vec<Action<A, P>>) {
        for w in self.paths.resolve(gid, ah, now) {
            out.push(Action::Send {
                dest: Dest::Unicast {
                    ah,
                    qpn: w.hw.qpn(),
                },
                payload: w.payload,
            });
        }
    }

    /// The path query for `gid` failed.
    pub fn path_failed(&mut self, gid: Gid, out: &mut Vec<Action<A, P>>) {
        for w in self.paths.fail(&gid) {
            self.drop_payload(w.payload, DropReason::Unreachable, out);
        }
    }

    /// Transmits a host IP packet (`bytes` is its content, `packet` names
    /// its buffer).
    pub fn transmit(&mut self, bytes: &[u8], packet: P, now: Instant, out: &mut Vec<Action<A, P>>) {
        let Some((mut dst, ty)) = ip_destination(bytes) else {
            self.count(DropReason::Malformed, Some(packet), out);
            return;
        };
        if let IpAddr::V4(a) = dst
            && self.broadcasts.contains(&a)
        {
            // A subnet's broadcast goes to the broadcast group, as
            // 255.255.255.255 does (the kernel gives these the broadcast
            // hardware address).
            dst = IpAddr::V4(Ipv4Addr::BROADCAST);
        }
        if !self.carrier() {
            self.count(DropReason::NoCarrier, Some(packet), out);
            return;
        }
        let payload = Payload::Host(packet, ty);
        match mgid::for_ip(dst, self.cfg.pkey, self.cfg.scope) {
            Some(g) => self.send_multicast(g, payload, out),
            None => self.send_to_ip(dst, payload, now, out),
        }
    }

    /// Sends a packet whose destination the guest side has already
    /// decided: unicast to an IPoIB address (its path resolved first) or
    /// to a multicast group (joined send-only if need be).
    pub fn send_to(
        &mut self,
        to: Target,
        payload: Payload<P>,
        now: Instant,
        out: &mut Vec<Action<A, P>>,
    ) {
        if !self.carrier() {
            self.drop_payload(payload, DropReason::NoCarrier, out);
            return;
        }
        match to {
            Target::Unicast(hw) => self.send_to_hw(hw, payload, now, out),
            Target::Group(g) => self.send_multicast(g, payload, out),
        }
    }

    fn send_multicast(&mut self, g: Gid, payload: Payload<P>, out: &mut Vec<Action<A, P>>) {
        if !self.groups.contains_key(&g) {
            if self.groups.len() >= MAX_GROUPS {
                self.drop_payload(payload, DropReason::McastNotJoined, out);
                return;
            }
            self.want_group(g, true, out);
        }
        match self.groups.get_mut(&g) {
            Some(Group::Joined { ah, .. }) => out.push(Action::Send {
                dest: Dest::Multicast { ah: *ah, mgid: g },
                payload,
            }),
            Some(Group::Joining { queue, .. }) if queue.len() < MCAST_QUEUE_LIMIT => {
                queue.push_back(payload)
            }
            _ => self.drop_payload(payload, DropReason::McastNotJoined, out),
        }
    }

    fn send_to_ip(
        &mut self,
        ip: IpAddr,
        payload: Payload<P>,
        now: Instant,
        out: &mut Vec<Action<A, P>>,
    ) {
        match self.neigh.lookup(ip, payload, now) {
            Lookup::Ready { value, packet, .. } => self.send_to_hw(value, packet, now, out),
            Lookup::Queued { start: true } => self.solicit(ip, out),
            Lookup::Queued { start: false } => {}
            Lookup::QueueFull(p) => self.drop_payload(p, DropReason::QueueFull, out),
        }
    }

    fn send_to_hw(
        &mut self,
        hw: HwAddr,
        payload: Payload<P>,
        now: Instant,
        out: &mut Vec<Action<A, P>>,
    ) {
        let gid = hw.gid();
        match self.paths.lookup(gid, Waiting { hw, payload }, now) {
            Lookup::Ready {
                value,
                packet,
                refresh,
            } => {
                if refresh {
                    out.push(Action::QueryPath(gid));
                }
                out.push(Action::Send {
                    dest: Dest::Unicast {
                        ah: value,
                        qpn: hw.qpn(),
                    },
                    payload: packet.payload,
                });
            }
            Lookup::Queued { start: true } => out.push(Action::QueryPath(gid)),
            Lookup::Queued { start: false } => {}
            Lookup::QueueFull(w) => self.drop_payload(w.payload, DropReason::QueueFull, out),
        }
    }

    /// Sends an ARP request (IPv4) or a neighbour solicitation to the
    /// solicited-node group (IPv6) for `ip`.
    fn solicit(&mut self, ip: IpAddr, out: &mut Vec<Action<A, P>>) {
        match ip {
            IpAddr::V4(target) => {
                let own = self
                    .cfg
                    .ipv4
                    .first()
                    .copied()
                    .unwrap_or(Ipv4Addr::UNSPECIFIED);
                let mut body = [0u8; ARP_LEN];
                Arp::request(self.cfg.hw, own, target).emit(&mut body);
                let g = self.broadcast;
                self.send_multicast(g, Payload::Control(Control::Arp(body)), out);
            }
            IpAddr::V6(target) => {
                let src = self.source_v6(target);
                let dst = mgid::solicited_node(target);
                let ns = Neighbor {
                    kind: nd::NEIGHBOR_SOLICIT,
                    flags: 0,
                    target,
                    lla: None,
                };
                let pkt = self.nd_packet(&ns, src, dst);
                let g = mgid::ipv6(dst, self.cfg.pkey, self.cfg.scope);
                self.send_multicast(g, Payload::Control(pkt), out);
            }
        }
    }

    /// Our address to send ND from: a link-local one for link-local
    /// targets, otherwise the first that is not.
    fn source_v6(&self, target: Ipv6Addr) -> Ipv6Addr {
        let link_local = |a: &Ipv6Addr| a.segments()[0] & 0xffc0 == 0xfe80;
        let want = link_local(&target);
        self.cfg
            .ipv6
            .iter()
            .find(|a| link_local(a) == want)
            .or(self.cfg.ipv6.first())
            .copied()
            .unwrap_or(Ipv6Addr::UNSPECIFIED)
    }

    fn nd_packet(&self, msg: &Neighbor, src: Ipv6Addr, dst: Ipv6Addr) -> Control {
        let mut pkt = [0u8; IPV6_HEADER + MESSAGE_LEN];
        pkt[0] = 0x60;
        pkt[4..6].copy_from_slice(&(MESSAGE_LEN as u16).to_be_bytes());
        pkt[6] = nd::NEXT_HEADER_ICMPV6;
        pkt[7] = 255; // RFC 4861: hop limit 255
        pkt[8..24].copy_from_slice(&src.octets());
        pkt[24..40].copy_from_slice(&dst.octets());
        let mut body = [0u8; MESSAGE_LEN];
        msg.emit(src, dst, self.cfg.hw, &mut body);
        pkt[IPV6_HEADER..].copy_from_slice(&body);
        Control::Nd(pkt)
    }

    /// Handles a received IPoIB payload (after the 4-byte header) of
    /// EtherType `ty`.
    pub fn receive(
        &mut self,
        src: Source,
        ty: u16,
        bytes: &[u8],
        packet: P,
        now: Instant,
        out: &mut Vec<Action<A, P>>,
    ) {
        if src.multicast && src.slid == self.lid && src.sqpn == self.cfg.hw.qpn() {
            self.count(DropReason::OwnLoopback, Some(packet), out);
            return;
        }
        if self.cfg.guest {
            return match ty {
                ethertype::ARP | ethertype::IPV4 | ethertype::IPV6 => {
                    out.push(Action::Deliver(packet))
                }
                _ => self.count(DropReason::Ethertype, Some(packet), out),
            };
        }
        match ty {
            ethertype::ARP => {
                self.receive_arp(bytes, now, out);
                // The host side is NOARP: ARP ends here.
                out.push(Action::Release(packet));
            }
            ethertype::IPV6 if is_nd(bytes) => {
                self.receive_nd(bytes, now, out);
                out.push(Action::Release(packet));
            }
            ethertype::IPV4 | ethertype::IPV6 => out.push(Action::Deliver(packet)),
            _ => self.count(DropReason::Ethertype, Some(packet), out),
        }
    }

    fn receive_arp(&mut self, bytes: &[u8], now: Instant, out: &mut Vec<Action<A, P>>) {
        let Ok(arp) = Arp::parse(bytes) else {
            self.count(DropReason::BadControl, None, out);
            return;
        };
        let Some(&own_ip) = self.cfg.ipv4.iter().find(|a| **a == arp.target_ip) else {
            // Not for us: refresh an entry we already hold.
            self.learn(IpAddr::V4(arp.sender_ip), arp.sender_hw, now, false, out);
            return;
        };
        self.learn(IpAddr::V4(arp.sender_ip), arp.sender_hw, now, true, out);
        if arp.op == Op::Request
            && let Some(reply) = arp.reply(self.cfg.hw, own_ip)
        {
            let mut body = [0u8; ARP_LEN];
            reply.emit(&mut body);
            // Replies are unicast, through a path to the requester (Linux
            // refreshes that path for every unicast ARP).
            self.send_to_hw(
                arp.sender_hw,
                Payload::Control(Control::Arp(body)),
                now,
                out,
            );
        }
    }

    fn receive_nd(&mut self, bytes: &[u8], now: Instant, out: &mut Vec<Action<A, P>>) {
        let (Some(src), Some(icmp)) = (bytes.get(8..24), bytes.get(IPV6_HEADER..)) else {
            self.count(DropReason::BadControl, None, out);
            return;
        };
        let Ok(msg) = Neighbor::parse(icmp) else {
            self.count(DropReason::BadControl, None, out);
            return;
        };
        let mut s = [0u8; 16];
        s.copy_from_slice(src);
        let src = Ipv6Addr::from(s);
        let Some(lla) = msg.lla else {
            return;
        };
        match msg.kind {
            nd::NEIGHBOR_SOLICIT => {
                if src.is_unspecified() {
                    return; // DAD probe: nothing to learn or answer
                }
                let ours = self.cfg.ipv6.contains(&msg.target);
                self.learn(IpAddr::V6(src), lla, now, ours, out);
                if let Some(na) = msg.advert_for(&self.cfg.ipv6) {
                    let pkt = self.nd_packet(&na, msg.target, src);
                    self.send_to_hw(lla, Payload::Control(pkt), now, out);
                }
            }
            _ => self.learn(IpAddr::V6(msg.target), lla, now, false, out),
        }
    }

    fn learn(
        &mut self,
        ip: IpAddr,
        hw: HwAddr,
        now: Instant,
        create: bool,
        out: &mut Vec<Action<A, P>>,
    ) {
        if hw.is_multicast() || hw == self.cfg.hw {
            return;
        }
        for payload in self.neigh.learn(ip, hw, now, create) {
            self.send_to_hw(hw, payload, now, out);
        }
    }

    /// Runs the timers: ARP/ND retries and ageing, path-query give-ups,
    /// join retries.
    pub fn poll(&mut self, now: Instant, out: &mut Vec<Action<A, P>>) {
        let mut events = std::mem::take(&mut self.events);
        self.neigh.poll(now, &mut events);
        for e in events.drain(..) {
            match e {
                resolve::Event::Retry(ip) => self.solicit(ip, out),
                resolve::Event::Unreachable(_, queued) => {
                    for p in queued {
                        self.drop_payload(p, DropReason::Unreachable, out);
                    }
                }
                resolve::Event::Expired(_) => {}
            }
        }
        self.events = events;

        let mut events = std::mem::take(&mut self.path_events);
        self.paths.poll(now, &mut events);
        for e in events.drain(..) {
            match e {
                resolve::Event::Retry(gid) => out.push(Action::QueryPath(gid)),
                resolve::Event::Unreachable(_, queued) => {
                    for w in queued {
                        self.drop_payload(w.payload, DropReason::Unreachable, out);
                    }
                }
                resolve::Event::Expired(_) => {}
            }
        }
        self.path_events = events;

        let carrier = self.carrier();
        let due: Vec<Gid> = self
            .groups
            .iter()
            .filter(|(g, s)| {
                matches!(s, Group::Joining { retry_at: Some(at), .. } if now >= *at)
                    && (carrier || **g == self.broadcast)
            })
            .map(|(g, _)| *g)
            .collect();
        for g in due {
            self.issue_join(g, out);
        }
    }

    /// Light flush (client reregister, SM change, GID change; ipoib.md
    /// §11.2): paths are refreshed on their next use, neighbours stay, and
    /// every multicast group is joined again, the broadcast group first
    /// (the caller has dropped the old memberships and attachments).
    pub fn flush_light(&mut self, out: &mut Vec<Action<A, P>>) {
        self.paths.invalidate_all();
        self.reset_groups(out);
        self.want_group(self.broadcast, false, out);
    }

    /// Normal flush (port down/up, own LID change): neighbours, paths and
    /// memberships go; groups are joined again, broadcast first, once
    /// [`Datagram::start`] is called.
    pub fn flush_normal(&mut self, out: &mut Vec<Action<A, P>>) {
        for p in self.neigh.clear() {
            self.drop_payload(p, DropReason::Flushed, out);
        }
        for w in self.paths.clear() {
            self.drop_payload(w.payload, DropReason::Flushed, out);
        }
        self.reset_groups(out);
    }

    /// Every full-member group back to "to be joined" (send-only ones are
    /// dropped: the next packet recreates them); the broadcast group is
    /// removed so that carrier is off until it is joined again.
    fn reset_groups(&mut self, out: &mut Vec<Action<A, P>>) {
        let groups: Vec<_> = self.groups.drain().collect();
        for (g, state) in groups {
            let send_only = match state {
                Group::Joining {
                    send_only, queue, ..
                } => {
                    for p in queue {
                        self.drop_payload(p, DropReason::Flushed, out);
                    }
                    send_only
                }
                Group::Joined { send_only, .. } => send_only,
            };
            if !send_only && g != self.broadcast {
                self.groups.insert(g, fresh(false));
            }
        }
    }

    fn drop_payload(&mut self, p: Payload<P>, why: DropReason, out: &mut Vec<Action<A, P>>) {
        match p {
            Payload::Host(p, _) => self.count(why, Some(p), out),
            Payload::Control(_) => self.count(why, None, out),
        }
    }

    fn count(&mut self, why: DropReason, p: Option<P>, out: &mut Vec<Action<A, P>>) {
        self.drops[why as usize] += 1;
        out.push(Action::Dropped(p, why));
    }
}

fn fresh<A, P>(send_only: bool) -> Group<A, P> {
    Group::Joining {
        send_only,
        queue: VecDeque::new(),
        in_flight: false,
        failures: 0,
        backoff: JOIN_BACKOFF_START,
        retry_at: None,
    }
}

/// The destination and EtherType of an IP packet.
fn ip_destination(b: &[u8]) -> Option<(IpAddr, u16)> {
    match b.first()? >> 4 {
        4 => {
            let d: [u8; 4] = b.get(16..20)?.try_into().ok()?;
            Some((IpAddr::V4(Ipv4Addr::from(d)), ethertype::IPV4))
        }
        6 => {
            let d: [u8; 16] = b.get(24..40)?.try_into().ok()?;
            Some((IpAddr::V6(Ipv6Addr::from(d)), ethertype::IPV6))
        }
        _ => None,
    }
}

/// Whether an IPv6 packet is an NS or NA (ICMPv6 directly after the
/// fixed header, as RFC 4861 requires, hop limit 255).
fn is_nd(b: &[u8]) -> bool {
    b.get(6) == Some(&nd::NEXT_HEADER_ICMPV6)
        && b.get(7) == Some(&255)
        && matches!(
            b.get(IPV6_HEADER),
            Some(&nd::NEIGHBOR_SOLICIT) | Some(&nd::NEIGHBOR_ADVERT)
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Address handles in these tests are just the remote LID.
    type Iface = Datagram<u16, &'static str>;
    type Out = Vec<Action<u16, &'static str>>;

    const GID_A: Gid = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 2, 0xc9, 3, 0, 0, 0, 0xa];
    const GID_B: Gid = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 2, 0xc9, 3, 0, 0, 0, 0xb];
    const BCAST_AH: u16 = 0xc000;

    fn iface(qpn: u32, gid: Gid, v4: [u8; 4], v6: &str) -> Iface {
        Iface::new(Config {
            hw: HwAddr::new(0x80, qpn, gid),
            pkey: 0xffff,
            scope: mgid::SCOPE_LINK,
            ipv4: vec![Ipv4Addr::from(v4)],
            ipv6: vec![v6.parse().unwrap()],
            guest: false,
        })
    }

    fn up(i: &mut Iface, lid: u16) {
        let mut out = Out::new();
        i.start(lid, &mut out);
        let b = i.broadcast_mgid();
        assert_eq!(
            out,
            [Action::Join {
                mgid: b,
                send_only: false
            }]
        );
        out.clear();
        i.joined(b, BCAST_AH, &mut out);
        assert!(i.carrier());
    }

    /// Interface A (QPN 0x48, 10.0.0.1, fe80::a), up on LID 2.
    fn host_a() -> Iface {
        let mut a = iface(0x48, GID_A, [10, 0, 0, 1], "fe80::a");
        up(&mut a, 2);
        a
    }

    /// Interface B (QPN 0x49, 10.0.0.2, fe80::b), up on LID 3.
    fn host_b() -> Iface {
        let mut b = iface(0x49, GID_B, [10, 0, 0, 2], "fe80::b");
        up(&mut b, 3);
        b
    }

    fn ipv4_packet(dst: [u8; 4]) -> [u8; 20] {
        let mut p = [0u8; 20];
        p[0] = 0x45;
        p[16..20].copy_from_slice(&dst);
        p
    }

    fn ipv6_packet(dst: &str) -> [u8; 40] {
        let mut p = [0u8; 40];
        p[0] = 0x60;
        p[24..40].copy_from_slice(&dst.parse::<Ipv6Addr>().unwrap().octets());
        p
    }

    fn sent_control(out: &Out) -> Vec<(Dest<u16>, Control)> {
        out.iter()
            .filter_map(|a| match a {
                Action::Send {
                    dest,
                    payload: Payload::Control(c),
                } => Some((*dest, *c)),
                _ => None,
            })
            .collect()
    }

    fn from(lid: u16, qpn: u32, multicast: bool) -> Source {
        Source {
            slid: lid,
            sqpn: qpn,
            multicast,
        }
    }

    #[test]
    fn every_drop_reason_has_its_own_counter() {
        for (i, d) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*d as usize, i, "{d:?}");
        }
    }

    #[test]
    fn mtu_is_the_group_mtu_less_the_header() {
        // ipoib.md §8: 2044 with a 2048 fabric MTU, 4092 with 4096.
        assert_eq!(Iface::mtu_for(4), Some(2044));
        assert_eq!(Iface::mtu_for(5), Some(4092));
        assert_eq!(Iface::mtu_for(1), Some(252));
        assert_eq!(Iface::mtu_for(0), None);
        assert_eq!(Iface::mtu_for(6), None);
    }

    #[test]
    fn new_addresses_get_their_solicited_node_group() {
        let mut a = host_a();
        let mut out = Out::new();
        let v6: Ipv6Addr = "fe80::1234:5678".parse().unwrap();
        a.set_addresses(vec![], vec!["fe80::a".parse().unwrap(), v6], &mut out);
        let sn = mgid::ipv6(mgid::solicited_node(v6), 0xffff, 2);
        assert_eq!(
            out,
            [Action::Join {
                mgid: sn,
                send_only: false
            }]
        );
    }

    #[test]
    fn no_carrier_before_the_broadcast_join() {
        let t = Instant::now();
        let mut a = iface(0x48, GID_A, [10, 0, 0, 1], "fe80::a");
        let mut out = Out::new();
        a.transmit(&ipv4_packet([10, 0, 0, 2]), "p", t, &mut out);
        assert_eq!(out, [Action::Dropped(Some("p"), DropReason::NoCarrier)]);
        a.transmit(&[0x45, 0], "short", t, &mut out);
        assert_eq!(a.drops(DropReason::Malformed), 1);
    }

    #[test]
    fn arp_resolution_then_path_then_send() {
        let t = Instant::now();
        let (mut a, mut b) = (host_a(), host_b());
        let mut out = Out::new();

        // A's first packet to 10.0.0.2 waits; an ARP request goes to the
        // broadcast group.
        a.transmit(&ipv4_packet([10, 0, 0, 2]), "ping", t, &mut out);
        let ctl = sent_control(&out);
        assert_eq!(ctl.len(), 1);
        let (dest, Control::Arp(req)) = ctl[0] else {
            panic!("not ARP: {out:?}");
        };
        assert_eq!(
            dest,
            Dest::Multicast {
                ah: BCAST_AH,
                mgid: a.broadcast_mgid()
            }
        );
        out.clear();

        // B answers by unicast, which needs a path to A first.
        b.receive(
            from(2, 0x48, true),
            ethertype::ARP,
            &req,
            "rx1",
            t,
            &mut out,
        );
        assert_eq!(out, [Action::QueryPath(GID_A), Action::Release("rx1")]);
        out.clear();
        b.path_resolved(GID_A, 2, t, &mut out);
        let ctl = sent_control(&out);
        let (dest, Control::Arp(reply)) = ctl[0] else {
            panic!("not ARP: {out:?}");
        };
        assert_eq!(dest, Dest::Unicast { ah: 2, qpn: 0x48 });
        assert_eq!(Arp::parse(&reply).unwrap().op, Op::Reply);
        out.clear();

        // A learns B; the queued packet now waits for B's path.
        a.receive(
            from(3, 0x49, false),
            ethertype::ARP,
            &reply,
            "rx2",
            t,
            &mut out,
        );
        assert_eq!(out, [Action::QueryPath(GID_B), Action::Release("rx2")]);
        out.clear();
        a.path_resolved(GID_B, 3, t, &mut out);
        assert_eq!(
            out,
            [Action::Send {
                dest: Dest::Unicast { ah: 3, qpn: 0x49 },
                payload: Payload::Host("ping", ethertype::IPV4)
            }]
        );
        out.clear();

        // From now on, straight through.
        a.transmit(&ipv4_packet([10, 0, 0, 2]), "p2", t, &mut out);
        assert!(matches!(
            out[..],
            [Action::Send {
                dest: Dest::Unicast { ah: 3, qpn: 0x49 },
                ..
            }]
        ));
        let n = a.neighbours(t);
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].value, Some(HwAddr::new(0x80, 0x49, GID_B)));
    }

    #[test]
    fn own_multicast_loopback_is_dropped_and_data_delivered() {
        let t = Instant::now();
        let mut a = host_a();
        let mut out = Out::new();
        a.receive(
            from(2, 0x48, true),
            ethertype::IPV4,
            &ipv4_packet([224, 0, 0, 1]),
            "own",
            t,
            &mut out,
        );
        assert_eq!(out, [Action::Dropped(Some("own"), DropReason::OwnLoopback)]);
        out.clear();
        a.receive(
            from(2, 0x50, true),
            ethertype::IPV4,
            &ipv4_packet([224, 0, 0, 1]),
            "sib",
            t,
            &mut out,
        );
        assert_eq!(
            out,
            [Action::Deliver("sib")],
            "a sibling QP on the same port"
        );
        out.clear();
        a.receive(from(3, 0x49, false), 0x88cc, &[0; 8], "lldp", t, &mut out);
        assert_eq!(out, [Action::Dropped(Some("lldp"), DropReason::Ethertype)]);
        a.receive(
            from(3, 0x49, false),
            ethertype::ARP,
            &[0; 10],
            "bad",
            t,
            &mut out,
        );
        assert_eq!(a.drops(DropReason::BadControl), 1);
    }

    #[test]
    fn ipv6_neighbour_solicitation_via_a_send_only_group() {
        let t = Instant::now();
        let (mut a, mut b) = (host_a(), host_b());
        let mut out = Out::new();
        a.transmit(&ipv6_packet("fe80::b"), "ping6", t, &mut out);
        // The solicited-node group of fe80::b is joined send-only first.
        let sn = mgid::ipv6(mgid::solicited_node("fe80::b".parse().unwrap()), 0xffff, 2);
        assert_eq!(
            out,
            [Action::Join {
                mgid: sn,
                send_only: true
            }]
        );
        out.clear();
        a.joined(sn, 0xc001, &mut out);
        let ctl = sent_control(&out);
        let (Dest::Multicast { mgid, .. }, Control::Nd(ns)) = ctl[0] else {
            panic!("{out:?}");
        };
        assert_eq!(mgid, sn);
        assert!(is_nd(&ns));
        out.clear();

        b.receive(from(2, 0x48, true), ethertype::IPV6, &ns, "rx", t, &mut out);
        assert_eq!(out, [Action::QueryPath(GID_A), Action::Release("rx")]);
        out.clear();
        b.path_resolved(GID_A, 2, t, &mut out);
        let (_, Control::Nd(na)) = sent_control(&out)[0] else {
            panic!("{out:?}");
        };
        let msg = Neighbor::parse(&na[IPV6_HEADER..]).unwrap();
        assert_eq!(msg.kind, nd::NEIGHBOR_ADVERT);
        assert_eq!(msg.lla, Some(HwAddr::new(0x80, 0x49, GID_B)));
        out.clear();

        a.receive(
            from(3, 0x49, false),
            ethertype::IPV6,
            &na,
            "rx2",
            t,
            &mut out,
        );
        a.path_resolved(GID_B, 3, t, &mut out);
        assert!(out.contains(&Action::Send {
            dest: Dest::Unicast { ah: 3, qpn: 0x49 },
            payload: Payload::Host("ping6", ethertype::IPV6)
        }));
    }

    #[test]
    fn unanswered_arp_retries_then_drops() {
        let t = Instant::now();
        let mut a = host_a();
        let mut out = Out::new();
        for p in ["1", "2", "3", "4"] {
            a.transmit(&ipv4_packet([10, 0, 0, 9]), p, t, &mut out);
        }
        assert_eq!(sent_control(&out).len(), 1);
        assert!(out.contains(&Action::Dropped(Some("4"), DropReason::QueueFull)));
        out.clear();
        for s in 1..=3 {
            a.poll(t + Duration::from_secs(s), &mut out);
        }
        assert_eq!(sent_control(&out).len(), 2, "two more requests");
        assert_eq!(a.drops(DropReason::Unreachable), 3);
    }

    #[test]
    fn join_backoff_doubles_and_send_only_gives_up() {
        let t = Instant::now();
        let mut a = iface(0x48, GID_A, [10, 0, 0, 1], "fe80::a");
        let b = a.broadcast_mgid();
        let mut out = Out::new();
        a.start(2, &mut out);
        out.clear();
        let mut now = t;
        for wait in [1, 2, 4, 8, 16, 16] {
            a.join_failed(b, now, &mut out);
            a.poll(
                now + Duration::from_secs(wait) - Duration::from_millis(1),
                &mut out,
            );
            assert!(out.is_empty(), "no retry before {wait} s");
            now += Duration::from_secs(wait);
            a.poll(now, &mut out);
            assert_eq!(out.len(), 1, "retry after {wait} s");
            out.clear();
        }
        a.joined(b, BCAST_AH, &mut out);
        out.clear(); // the groups every host listens to

        a.transmit(&ipv4_packet([239, 1, 2, 3]), "m", now, &mut out);
        let g = mgid::ipv4(Ipv4Addr::new(239, 1, 2, 3), 0xffff, 2);
        assert_eq!(
            out,
            [Action::Join {
                mgid: g,
                send_only: true
            }]
        );
        out.clear();
        a.join_failed(g, now, &mut out);
        a.poll(now + JOIN_BACKOFF_START, &mut out);
        assert_eq!(
            out,
            [Action::Join {
                mgid: g,
                send_only: true
            }],
            "retried once"
        );
        out.clear();
        a.join_failed(g, now, &mut out);
        assert_eq!(
            out,
            [Action::Dropped(Some("m"), DropReason::McastNotJoined)]
        );
        assert!(a.groups().iter().all(|(m, ..)| *m != g));
    }

    #[test]
    fn send_only_groups_are_bounded() {
        let t = Instant::now();
        let mut a = host_a();
        let mut out = Out::new();
        let mut n = 0u32;
        while a.groups().len() < MAX_GROUPS {
            let g = (0xef00_0000u32 + n).to_be_bytes();
            a.transmit(&ipv4_packet(g), "m", t, &mut out);
            n += 1;
        }
        out.clear();
        a.transmit(&ipv4_packet([239, 255, 255, 254]), "over", t, &mut out);
        assert_eq!(
            out,
            [Action::Dropped(Some("over"), DropReason::McastNotJoined)]
        );
        assert_eq!(a.groups().len(), MAX_GROUPS);
    }

    #[test]
    fn light_flush_keeps_neighbours_and_rejoins() {
        let t = Instant::now();
        let mut a = host_a();
        let mut out = Out::new();
        let mut reply = [0u8; ARP_LEN];
        Arp {
            op: Op::Reply,
            sender_hw: HwAddr::new(0x80, 0x49, GID_B),
            sender_ip: Ipv4Addr::new(10, 0, 0, 2),
            target_hw: a.config().hw,
            target_ip: Ipv4Addr::new(10, 0, 0, 1),
        }
        .emit(&mut reply);
        a.transmit(&ipv4_packet([10, 0, 0, 2]), "p", t, &mut out);
        a.receive(
            from(3, 0x49, false),
            ethertype::ARP,
            &reply,
            "rx",
            t,
            &mut out,
        );
        a.path_resolved(GID_B, 3, t, &mut out);
        out.clear();

        a.flush_light(&mut out);
        let b = a.broadcast_mgid();
        assert_eq!(
            out,
            [Action::Join {
                mgid: b,
                send_only: false
            }],
            "broadcast first"
        );
        assert!(!a.carrier());
        assert_eq!(a.neighbours(t).len(), 1, "neighbours stay");
        out.clear();
        a.joined(b, BCAST_AH, &mut out);
        assert!(out.len() >= 3, "then the other groups: {out:?}");
        out.clear();
        // The path is used but refreshed.
        a.transmit(&ipv4_packet([10, 0, 0, 2]), "q", t, &mut out);
        assert_eq!(out[0], Action::QueryPath(GID_B));
        assert!(matches!(
            out[1],
            Action::Send {
                dest: Dest::Unicast { ah: 3, qpn: 0x49 },
                ..
            }
        ));
    }

    #[test]
    fn a_group_left_is_left_but_the_interface_keeps_its_own() {
        let t = Instant::now();
        let mut a = host_a();
        let mut out = Out::new();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let group = mgid::ipv4(Ipv4Addr::new(239, 1, 1, 1), 0xffff, 2);
        a.listen(ip("239.1.1.1"), &mut out);
        a.joined(group, 0xc003, &mut out);
        out.clear();
        a.unlisten(ip("239.1.1.1"), &mut out);
        assert_eq!(out, [Action::Leave(group)]);
        assert!(!a.groups().iter().any(|(g, ..)| *g == group));
        out.clear();
        // Leaving twice, or a group never joined: nothing to do.
        a.unlisten(ip("239.1.1.1"), &mut out);
        a.unlisten(ip("239.7.7.7"), &mut out);
        assert!(out.is_empty());
        // Sending to it again joins it send-only.
        a.transmit(&ipv4_packet([239, 1, 1, 1]), "p", t, &mut out);
        assert_eq!(
            out,
            [Action::Join {
                mgid: group,
                send_only: true
            }]
        );
        out.clear();
        // A leave while the join is outstanding drops what waits for it.
        a.unlisten(ip("239.1.1.1"), &mut out);
        assert_eq!(
            out,
            [
                Action::Dropped(Some("p"), DropReason::Flushed),
                Action::Leave(group)
            ]
        );
        out.clear();
        // The groups the interface needs stay whatever the host says.
        let before = a.groups().len();
        for g in ["255.255.255.255", "224.0.0.1", "ff02::1", "ff02::1:ff00:a"] {
            a.unlisten(ip(g), &mut out);
        }
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(a.groups().len(), before);
    }

    #[test]
    fn normal_flush_rejoins_broadcast_first() {
        let t = Instant::now();
        let mut a = host_a();
        let mut out = Out::new();
        a.listen("224.0.0.251".parse().unwrap(), &mut out);
        let mdns = mgid::ipv4(Ipv4Addr::new(224, 0, 0, 251), 0xffff, 2);
        a.joined(mdns, 0xc002, &mut out);
        a.transmit(&ipv4_packet([239, 9, 9, 9]), "so", t, &mut out);
        out.clear();

        a.flush_normal(&mut out);
        assert_eq!(out, [Action::Dropped(Some("so"), DropReason::Flushed)]);
        assert!(!a.carrier());
        out.clear();
        a.start(7, &mut out);
        assert_eq!(out.len(), 1, "only the broadcast group until it is joined");
        out.clear();
        a.joined(a.broadcast_mgid(), BCAST_AH, &mut out);
        let so = mgid::ipv4(Ipv4Addr::new(239, 9, 9, 9), 0xffff, 2);
        assert!(out.contains(&Action::Join {
            mgid: mdns,
            send_only: false
        }));
        assert!(
            !out.iter()
                .any(|a| matches!(a, Action::Join { mgid, .. } if *mgid == so)),
            "full-member groups return; send-only ones do not"
        );
        assert_eq!(out.len(), 4, "all-hosts, all-nodes, solicited-node, mDNS");
    }

    #[test]
    fn guest_side_resolves_for_itself() {
        let mut g = Iface::new(Config {
            hw: HwAddr::new(0, 0x50, GID_A),
            pkey: 0xffff,
            scope: mgid::SCOPE_LINK,
            ipv4: Vec::new(),
            ipv6: Vec::new(),
            guest: true,
        });
        let mut out = Out::new();
        let peer = HwAddr::new(0x80, 0x49, GID_B);
        // No carrier yet: dropped and counted.
        g.send_to(
            Target::Unicast(peer),
            Payload::Host("early", 0x0800),
            Instant::now(),
            &mut out,
        );
        assert_eq!(out, [Action::Dropped(Some("early"), DropReason::NoCarrier)]);
        out.clear();
        up(&mut g, 4);
        // ARP from the fabric goes to the guest untouched, unanswered.
        let mut body = [0u8; ARP_LEN];
        Arp::request(peer, Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 9)).emit(&mut body);
        g.receive(
            from(3, 0x49, true),
            ethertype::ARP,
            &body,
            "arp",
            Instant::now(),
            &mut out,
        );
        assert_eq!(out, [Action::Deliver("arp")]);
        out.clear();
        // Unicast: the path is resolved first, then the packet goes.
        let now = Instant::now();
        g.send_to(
            Target::Unicast(peer),
            Payload::Host("ip", 0x0800),
            now,
            &mut out,
        );
        assert_eq!(out, [Action::QueryPath(GID_B)]);
        out.clear();
        g.path_resolved(GID_B, 3, now, &mut out);
        assert_eq!(
            out,
            [Action::Send {
                dest: Dest::Unicast { ah: 3, qpn: 0x49 },
                payload: Payload::Host("ip", 0x0800)
            }]
        );
        out.clear();
        // A group the guest only sends to is joined send-only.
        let m = mgid::ipv4(Ipv4Addr::new(224, 0, 0, 251), 0xffff, 2);
        g.send_to(
            Target::Group(m),
            Payload::Host("mdns", 0x0800),
            now,
            &mut out,
        );
        assert_eq!(
            out,
            [Action::Join {
                mgid: m,
                send_only: true
            }]
        );
    }

    #[test]
    fn subnet_broadcast_goes_to_the_broadcast_group() {
        let mut a = host_a();
        a.set_broadcasts(vec![Ipv4Addr::new(10, 0, 0, 255)]);
        let mut out = Out::new();
        a.transmit(&ipv4_packet([10, 0, 0, 255]), "b", Instant::now(), &mut out);
        assert_eq!(
            out,
            [Action::Send {
                dest: Dest::Multicast {
                    ah: BCAST_AH,
                    mgid: a.broadcast_mgid()
                },
                payload: Payload::Host("b", ethertype::IPV4)
            }]
        );
    }

    #[test]
    fn garbage_from_host_and_fabric_is_refused_never_a_panic() {
        let mut a = host_a();
        let mut out = Out::new();
        let mut seed = 0xD1B5_4A32_D192_ED03u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let now = Instant::now();
        for round in 0..20_000u32 {
            let len = (next() % 200) as usize;
            let mut pkt: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Often a plausible start: IPv4, IPv6, or an ICMPv6 ND header.
            match round % 4 {
                0 if len > 0 => pkt[0] = 0x45,
                1 if len > 41 => {
                    pkt[0] = 0x60;
                    pkt[6] = 58;
                    pkt[7] = 255;
                    pkt[40] = 135 + (round % 2) as u8;
                }
                2 if len > 8 => pkt[..8].copy_from_slice(&[0, 0x20, 8, 0, 20, 4, 0, 1]),
                _ => {}
            }
            let ty = [ethertype::IPV4, ethertype::ARP, ethertype::IPV6, 0x1234][round as usize % 4];
            a.receive(from(3, 0x49, round % 2 == 0), ty, &pkt, "rx", now, &mut out);
            a.transmit(&pkt, "tx", now, &mut out);
            out.clear();
        }
        assert!(a.neighbours(now).len() <= resolve::Config::NEIGHBOURS.max_entries);
        assert!(a.carrier());
    }
}
