//! IPoIB datagram mode on the simulated fabric: `ipoib-device`'s
//! interface (engine and link) driving real UD QPs, SA joins and
//! PathRecord queries through the mlx5 driver and the software HCA, with
//! an in-memory host side instead of a TUN device. ARP and IPv6 neighbour
//! discovery resolve, unicast and multicast IP packets arrive intact, and
//! everything is torn down cleanly.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipoib_device::engine::datagram::DropReason;
use ipoib_device::engine::eth::Mac;
use ipoib_device::engine::mgid;
use ipoib_device::link::{GuestConfig, HostPort, Lend, Link};
use ipoib_sim::{Fabric, FabricConfig, SimConfig, SimHca};
use mlx5_driver::Hca;
use mlx5_driver::transport::tun::VNET_HDR_LEN_MRG;

/// IP protocol of the test payloads: 253, for experimentation (RFC 3692),
/// so that the capture's dissectors leave the bytes alone.
const EXPERIMENTAL_PROTOCOL: u8 = 253;
const PKEY: u16 = 0xFFFF;

/// The host side as two queues.
#[derive(Default)]
struct Queues {
    to_link: RefCell<VecDeque<Vec<u8>>>,
    from_link: RefCell<Vec<Vec<u8>>>,
}

impl HostPort for Queues {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let p = self
            .to_link
            .borrow_mut()
            .pop_front()
            .ok_or(io::ErrorKind::WouldBlock)?;
        buf[..p.len()].copy_from_slice(&p);
        Ok(p.len())
    }

    fn send(&self, buf: &[u8]) -> io::Result<usize> {
        self.from_link.borrow_mut().push(buf.to_vec());
        Ok(buf.len())
    }
}

/// A guest's side, shared between the test and the interface.
struct Shared(Rc<Queues>);

impl HostPort for Shared {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.recv(buf)
    }

    fn send(&self, buf: &[u8]) -> io::Result<usize> {
        self.0.send(buf)
    }
}

/// One host: a software HCA, the interface on it, its host side.
struct Host {
    dev: Arc<SimHca>,
    link: Link<Arc<SimHca>>,
    host: Queues,
}

impl Host {
    fn new(fabric: &Fabric, guid: u64, addrs: &[IpAddr]) -> Host {
        let dev = Arc::new(SimHca::new(SimConfig {
            node_guid: guid,
            ..SimConfig::default()
        }));
        dev.connect(fabric);
        let mut hca = Hca::bring_up(dev.clone(), ipoib_tests::quick_cfg()).expect("bring-up");
        ipoib_device::probe::wait_for_active(&mut hca, Duration::from_secs(5));
        let link = Link::new(hca).map_err(|(e, _)| e).expect("interface");
        let mut h = Host {
            dev,
            link,
            host: Queues::default(),
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !h.link.carrier() && Instant::now() < deadline {
            h.link.poll(&h.host, Duration::from_millis(5)).unwrap();
        }
        assert!(h.link.carrier(), "broadcast group joined");
        h.link.set_addresses(addrs);
        h
    }

    /// Hands `packet` to the interface as the host would (behind a zero
    /// virtio-net header).
    fn send_ip(&self, packet: &[u8]) {
        let mut f = vec![0u8; VNET_HDR_LEN_MRG];
        f.extend_from_slice(packet);
        self.host.to_link.borrow_mut().push_back(f);
    }

    /// IP packets delivered to the host, virtio-net header stripped.
    fn delivered(&self) -> Vec<Vec<u8>> {
        self.host
            .from_link
            .borrow()
            .iter()
            .map(|f| f[VNET_HDR_LEN_MRG..].to_vec())
            .collect()
    }

    fn finish(self) {
        let r = self.link.shutdown();
        assert!(r.clean(), "{r:?}");
        assert_eq!(self.dev.report().mappings, 0);
    }
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    p[8] = 64;
    p[9] = EXPERIMENTAL_PROTOCOL;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let mut sum: u32 = p
        .chunks(2)
        .map(|c| u32::from(c[0]) << 8 | u32::from(c[1]))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p.extend_from_slice(payload);
    p
}

fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    p[6] = EXPERIMENTAL_PROTOCOL;
    p[7] = 64;
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// A fabric with hosts a (10.`net`.0.1) and b (10.`net`.0.2) up on it.
fn two_hosts(net: u8) -> (Fabric, Host, Host) {
    let fabric = Fabric::new(FabricConfig::default()).unwrap();
    let guid = 0x0002_c903_0000_0000 | u64::from(net) << 12;
    let a = Host::new(
        &fabric,
        guid | 0xa00,
        &[Ipv4Addr::new(10, net, 0, 1).into()],
    );
    let b = Host::new(
        &fabric,
        guid | 0xb00,
        &[Ipv4Addr::new(10, net, 0, 2).into()],
    );
    (fabric, a, b)
}

/// Runs both interfaces for `time`.
fn run(hosts: &mut [&mut Host], time: Duration) {
    let deadline = Instant::now() + time;
    while Instant::now() < deadline {
        for h in hosts.iter_mut() {
            h.link.poll(&h.host, Duration::from_millis(1)).unwrap();
        }
    }
}

/// Runs both until `b` has received `n` packets (or 5 s pass).
fn until_delivered(a: &mut Host, b: &mut Host, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.host.from_link.borrow().len() < n && Instant::now() < deadline {
        run(&mut [a, b], Duration::from_millis(5));
    }
}

#[test]
fn arp_nd_unicast_and_multicast_between_two_hosts() {
    let dir = std::env::temp_dir().join(format!("ipoib-dgram-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pcap = dir.join("fabric.pcap");
    let fabric = Fabric::new(FabricConfig {
        pcap: Some(pcap.clone()),
        ..FabricConfig::default()
    })
    .unwrap();
    let (a4, b4) = (Ipv4Addr::new(10, 1, 0, 1), Ipv4Addr::new(10, 1, 0, 2));
    let a6: Ipv6Addr = "fe80::a".parse().unwrap();
    let b6: Ipv6Addr = "fe80::b".parse().unwrap();
    let mut a = Host::new(&fabric, 0x0002_c903_0000_0a00, &[a4.into(), a6.into()]);
    let mut b = Host::new(&fabric, 0x0002_c903_0000_0b00, &[b4.into(), b6.into()]);

    // IPv4: the first packet waits for ARP, then for the path.
    let ping = ipv4(a4, b4, b"ping over ipoib");
    a.send_ip(&ping);
    until_delivered(&mut a, &mut b, 1);
    assert_eq!(b.delivered(), [ping], "b got a's packet intact");
    let back = ipv4(b4, a4, b"pong");
    b.send_ip(&back);
    until_delivered(&mut b, &mut a, 1);
    assert_eq!(
        a.delivered(),
        [back],
        "b already knew a from its ARP request"
    );
    let na = a.link.engine().neighbours(Instant::now());
    assert_eq!(na.len(), 1);
    assert_eq!(na[0].key, IpAddr::V4(b4));
    assert_eq!(na[0].value, Some(b.link.hw_addr()));

    // IPv6: neighbour solicitation to the solicited-node group, joined
    // send-only on the way.
    let p6 = ipv6(a6, b6, b"hello v6");
    a.send_ip(&p6);
    until_delivered(&mut a, &mut b, 2);
    assert_eq!(b.delivered().last(), Some(&p6));
    let sn = mgid::ipv6(mgid::solicited_node(b6), PKEY, mgid::SCOPE_LINK);
    let groups = a.link.engine().groups();
    assert!(groups.contains(&(sn, true, true)), "{groups:?}");

    // IP multicast: b listens to all-hosts (every interface does); a
    // sends to it.
    let m = ipv4(a4, Ipv4Addr::new(224, 0, 0, 1), b"to the group");
    a.send_ip(&m);
    until_delivered(&mut a, &mut b, 3);
    assert_eq!(b.delivered().last(), Some(&m));
    assert!(
        fabric.groups().len() >= 3,
        "broadcast, solicited-node, all-hosts"
    );

    // Nothing was dropped on either side.
    for h in [&a, &b] {
        for why in [
            DropReason::QueueFull,
            DropReason::Unreachable,
            DropReason::BadControl,
            DropReason::Malformed,
        ] {
            assert_eq!(h.link.engine().drops(why), 0, "{why:?}");
        }
    }
    a.finish();
    b.finish();
    drop(fabric);
    check_capture(&pcap);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unknown_destination_is_dropped_after_arp_gives_up() {
    let fabric = Fabric::new(FabricConfig::default()).unwrap();
    let a4 = Ipv4Addr::new(10, 2, 0, 1);
    let mut a = Host::new(&fabric, 0x0002_c903_0000_0c00, &[a4.into()]);
    for _ in 0..4 {
        a.send_ip(&ipv4(a4, Ipv4Addr::new(10, 2, 0, 99), b"nobody"));
    }
    run(&mut [&mut a], Duration::from_millis(100));
    assert_eq!(
        a.link.engine().drops(DropReason::QueueFull),
        1,
        "three queued, the fourth dropped"
    );
    // Three ARP requests one second apart, then the queue is dropped.
    run(&mut [&mut a], Duration::from_millis(3300));
    assert_eq!(a.link.engine().drops(DropReason::Unreachable), 3);
    assert!(a.link.engine().neighbours(Instant::now()).is_empty());
    a.finish();
}

/// The capture decodes in tshark as IPoIB carrying ARP, IPv4 and IPv6
/// (neighbour discovery included), with no malformed packets or expert
/// errors.
fn check_capture(pcap: &std::path::Path) {
    let run = |extra: &[&str]| ipoib_sim::pcap::tshark(pcap, extra).unwrap();
    let text = run(&["-V"]);
    assert!(!text.contains("Malformed"), "malformed packet:\n{text}");
    for want in [
        "Address Resolution Protocol (request)",
        "Address Resolution Protocol (reply)",
        "Hardware type: InfiniBand",
        "Internet Protocol Version 4",
        "Internet Protocol Version 6",
        "Neighbor Solicitation",
        "Neighbor Advertisement",
        "MCMemberRecord",
        "PathRecord",
    ] {
        assert!(text.contains(want), "{want:?} not decoded:\n{text}");
    }
    assert!(
        text.contains("[Checksum Status: Good]"),
        "ICMPv6 checksums verified:\n{text}"
    );
    let experts = run(&["-q", "-z", "expert,error"]);
    assert!(!experts.contains("Error"), "expert errors:\n{experts}");
}

const GUEST_MAC: Mac = Mac([0x52, 0x54, 0x00, 0xab, 0xcd, 0xef]);

/// An Ethernet frame behind a zero virtio-net header.
fn eth_frame(dst: Mac, src: Mac, ty: u16, body: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN_MRG];
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ty.to_be_bytes());
    f.extend_from_slice(body);
    f
}

/// An Ethernet ARP body (RFC 826).
fn eth_arp(op: u16, sha: Mac, spa: Ipv4Addr, tha: Mac, tpa: Ipv4Addr) -> Vec<u8> {
    let mut b = vec![0x00, 0x01, 0x08, 0x00, 6, 4];
    b.extend_from_slice(&op.to_be_bytes());
    b.extend_from_slice(&sha.0);
    b.extend_from_slice(&spa.octets());
    b.extend_from_slice(&tha.0);
    b.extend_from_slice(&tpa.octets());
    b
}

/// Runs both hosts until the guest has received `n` frames (or 5 s pass).
fn until_guest_has(a: &mut Host, b: &mut Host, guest: &Queues, n: usize) {
    until_frames(a, b, &guest.from_link, n);
}

/// Runs both hosts until `frames` holds `n` (or 5 s pass).
fn until_frames(a: &mut Host, b: &mut Host, frames: &RefCell<Vec<Vec<u8>>>, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while frames.borrow().len() < n && Instant::now() < deadline {
        run(&mut [a, b], Duration::from_millis(5));
    }
}

#[test]
fn guest_vnic_talks_to_a_remote_host_through_the_translation() {
    let (_fabric, mut a, mut b) = two_hosts(3);
    let (a4, g4) = (Ipv4Addr::new(10, 3, 0, 1), Ipv4Addr::new(10, 3, 0, 9));
    let b4 = Ipv4Addr::new(10, 3, 0, 2);
    let guest = Rc::new(Queues::default());
    let id = b
        .link
        .add_guest(
            GuestConfig {
                mac: GUEST_MAC,
                learn_mac: false,
                allowed: Vec::new(),
                zero_copy: false,
            },
            Box::new(Shared(guest.clone())),
        )
        .unwrap();
    run(&mut [&mut a, &mut b], Duration::from_millis(100));
    let info = b.link.guest(id).unwrap();
    assert_ne!(info.hw.qpn(), b.link.hw_addr().qpn(), "a QP of its own");
    assert_eq!(info.hw.gid(), b.link.hw_addr().gid(), "on the same port");

    // The guest asks for a by ARP; a answers; the answer comes back in
    // Ethernet form from a synthetic MAC.
    let req = eth_arp(1, GUEST_MAC, g4, Mac::default(), a4);
    guest
        .to_link
        .borrow_mut()
        .push_back(eth_frame(Mac::BROADCAST, GUEST_MAC, 0x0806, &req));
    until_guest_has(&mut a, &mut b, &guest, 1);
    let reply = guest.from_link.borrow()[0][VNET_HDR_LEN_MRG..].to_vec();
    assert_eq!(&reply[0..6], &GUEST_MAC.0, "to the guest");
    assert_eq!(&reply[12..14], &[0x08, 0x06]);
    assert_eq!(&reply[20..22], &[0, 2], "an ARP reply");
    let remac = Mac(reply[22..28].try_into().unwrap());
    assert_eq!(&reply[6..12], &remac.0);
    assert_eq!(&reply[28..32], &a4.octets());
    assert_eq!(remac.0[0] & 0x03, 0x02, "locally administered unicast");

    // IPv4 both ways.
    let ping = ipv4(g4, a4, b"from the guest");
    guest
        .to_link
        .borrow_mut()
        .push_back(eth_frame(remac, GUEST_MAC, 0x0800, &ping));
    until_delivered(&mut b, &mut a, 1);
    assert_eq!(
        a.delivered(),
        std::slice::from_ref(&ping),
        "a got the guest's packet"
    );
    // a learned the guest from its ARP request: no resolution needed.
    let pong = ipv4(a4, g4, b"to the guest");
    a.send_ip(&pong);
    until_guest_has(&mut a, &mut b, &guest, 2);
    let f = guest.from_link.borrow()[1][VNET_HDR_LEN_MRG..].to_vec();
    assert_eq!(&f[0..6], &GUEST_MAC.0);
    assert_eq!(&f[6..12], &remac.0);
    assert_eq!(&f[14..14 + pong.len()], &pong[..]);
    assert_eq!(f.len(), 60.max(14 + pong.len()), "padded to the minimum");

    // A packet larger than the MTU is dropped, and the guest told so by
    // ICMP (fragmentation needed, MTU 2044) from the destination.
    let big = ipv4(g4, a4, &[0x77; 3000]);
    guest
        .to_link
        .borrow_mut()
        .push_back(eth_frame(remac, GUEST_MAC, 0x0800, &big));
    until_guest_has(&mut a, &mut b, &guest, 3);
    let icmp = guest.from_link.borrow()[2][VNET_HDR_LEN_MRG..].to_vec();
    assert_eq!(&icmp[0..6], &GUEST_MAC.0);
    assert_eq!(&icmp[6..12], &remac.0);
    assert_eq!(
        &icmp[14 + 12..14 + 20],
        &[a4.octets(), g4.octets()].concat()[..]
    );
    assert_eq!(&icmp[14 + 20..14 + 22], &[3, 4]);
    assert_eq!(&icmp[14 + 26..14 + 28], &2044u16.to_be_bytes());
    assert_eq!(&icmp[14 + 28..14 + 48], &big[..20], "quoting the packet");
    assert_eq!(b.link.guest(id).unwrap().counters.tx_too_big, 1);

    // The guest may not send as someone else; the frame is counted.
    let forged = Mac([0x52, 0x54, 0, 0, 0, 0x66]);
    guest
        .to_link
        .borrow_mut()
        .push_back(eth_frame(remac, forged, 0x0800, &ping));
    run(&mut [&mut a, &mut b], Duration::from_millis(20));
    let info = b.link.guest(id).unwrap();
    let spoofed = info
        .eth_drops
        .iter()
        .find(|(n, _)| *n == "drop_spoofed_mac");
    assert_eq!(spoofed, Some(&("drop_spoofed_mac", 1)));
    assert_eq!(a.delivered().len(), 1);
    assert_eq!(info.counters.tx_packets, 2, "ARP request and ping");
    assert_eq!(info.counters.rx_delivered, 2, "ARP reply and pong");
    assert_eq!(info.addresses, [IpAddr::V4(g4)]);

    // The guest goes; the host endpoint keeps its groups and traffic.
    assert!(b.link.remove_guest(id).is_empty());
    assert!(b.link.guest(id).is_none());
    let after = ipv4(a4, b4, b"still there");
    a.send_ip(&after);
    until_delivered(&mut a, &mut b, 1);
    assert_eq!(b.delivered(), [after]);
    a.finish();
    b.finish();
}

/// The SM makes host b a limited member of the default partition: b
/// re-reads P_Key index 0 (0xFFFF becomes 0x7FFF, the heavy flush),
/// leaves and rejoins its groups, and still reaches a, a full member.
#[test]
fn pkey_change_is_followed() {
    let fabric = Fabric::new(FabricConfig::default()).unwrap();
    let (a4, b4) = (Ipv4Addr::new(10, 4, 0, 1), Ipv4Addr::new(10, 4, 0, 2));
    let (ga, gb) = (0x0002_c903_0000_1a00u64, 0x0002_c903_0000_1b00u64);
    let mut a = Host::new(&fabric, ga, &[a4.into()]);
    let mut b = Host::new(&fabric, gb, &[b4.into()]);
    assert_eq!(b.link.pkey(), 0xFFFF);
    // Port GUIDs are the node GUIDs plus one.
    fabric.set_partitions(vec![ipoib_sim::sm::Partition {
        name: "Default".into(),
        pkey: 0x7FFF,
        ipoib: true,
        mtu: 4,
        rate: 3,
        sl: 0,
        scope: 2,
        members: vec![
            (ipoib_sim::sm::Member::Guid(ga + 1), true),
            (ipoib_sim::sm::Member::Guid(gb + 1), false),
        ],
    }]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(b.link.pkey() == 0x7FFF && a.link.carrier() && b.link.carrier())
        && Instant::now() < deadline
    {
        run(&mut [&mut a, &mut b], Duration::from_millis(5));
    }
    assert_eq!((a.link.pkey(), b.link.pkey()), (0xFFFF, 0x7FFF));
    assert!(
        a.link.carrier() && b.link.carrier(),
        "the broadcast group joined again: a {} b {} {:?} {:?}",
        a.link.carrier(),
        b.link.carrier(),
        b.link.counters(),
        b.link.engine().groups()
    );
    let ping = ipv4(b4, a4, b"as a limited member");
    b.send_ip(&ping);
    until_delivered(&mut b, &mut a, 1);
    assert_eq!(a.delivered(), [ping]);
    a.finish();
    b.finish();
}

fn guest(b: &mut Host, mac: Mac) -> (usize, Rc<Queues>) {
    let q = Rc::new(Queues::default());
    let id = b
        .link
        .add_guest(
            GuestConfig {
                mac,
                learn_mac: false,
                allowed: Vec::new(),
                zero_copy: false,
            },
            Box::new(Shared(q.clone())),
        )
        .unwrap();
    (id, q)
}

/// Ethernet frames the guest got, virtio-net header stripped.
fn frames(q: &Queues) -> Vec<Vec<u8>> {
    q.from_link
        .borrow()
        .iter()
        .map(|f| f[VNET_HDR_LEN_MRG..].to_vec())
        .collect()
}

/// Two VMs on one interface: each has its own QPN; they reach each other
/// through the fabric; one reports (IGMPv2) that it listens to a group
/// and gets what host a sends there, the other does not.
#[test]
fn two_guests_on_one_interface_and_a_multicast_listener() {
    let (_fabric, mut a, mut b) = two_hosts(5);
    let a4 = Ipv4Addr::new(10, 5, 0, 1);
    let (g1, g2) = (Ipv4Addr::new(10, 5, 0, 11), Ipv4Addr::new(10, 5, 0, 12));
    let (m1, m2) = (
        Mac([0x52, 0x54, 0, 0, 0, 0x11]),
        Mac([0x52, 0x54, 0, 0, 0, 0x12]),
    );
    let (id1, q1) = guest(&mut b, m1);
    let (id2, q2) = guest(&mut b, m2);
    run(&mut [&mut a, &mut b], Duration::from_millis(100));
    let (i1, i2) = (b.link.guest(id1).unwrap(), b.link.guest(id2).unwrap());
    assert_ne!(i1.hw.qpn(), i2.hw.qpn());

    // Guest 1 asks for guest 2 by ARP; guest 2 sees the request (from
    // guest 1's synthetic MAC) and answers it.
    let req = eth_arp(1, m1, g1, Mac::default(), g2);
    q1.to_link
        .borrow_mut()
        .push_back(eth_frame(Mac::BROADCAST, m1, 0x0806, &req));
    let deadline = Instant::now() + Duration::from_secs(5);
    while q2.from_link.borrow().is_empty() && Instant::now() < deadline {
        run(&mut [&mut a, &mut b], Duration::from_millis(5));
    }
    let seen = frames(&q2);
    assert_eq!(&seen[0][12..14], &[0x08, 0x06], "an ARP request");
    let remac1 = Mac(seen[0][22..28].try_into().unwrap());
    let reply = eth_arp(2, m2, g2, remac1, g1);
    q2.to_link
        .borrow_mut()
        .push_back(eth_frame(remac1, m2, 0x0806, &reply));
    let deadline = Instant::now() + Duration::from_secs(5);
    while q1.from_link.borrow().is_empty() && Instant::now() < deadline {
        run(&mut [&mut a, &mut b], Duration::from_millis(5));
    }
    let got = frames(&q1);
    assert_eq!(&got[0][20..22], &[0, 2], "guest 1 got the answer");
    let remac2 = Mac(got[0][22..28].try_into().unwrap());
    let hello = ipv4(g1, g2, b"vm to vm");
    q1.to_link
        .borrow_mut()
        .push_back(eth_frame(remac2, m1, 0x0800, &hello));
    let deadline = Instant::now() + Duration::from_secs(5);
    while frames(&q2).len() < 2 && Instant::now() < deadline {
        run(&mut [&mut a, &mut b], Duration::from_millis(5));
    }
    let last = frames(&q2).pop().unwrap();
    assert_eq!(
        &last[14..14 + hello.len()],
        &hello[..],
        "guest 2 got guest 1's packet"
    );

    // Guest 2 reports 239.1.1.1 (IGMPv2, RFC 2236); host a sends there.
    let group = Ipv4Addr::new(239, 1, 1, 1);
    let mut report = vec![0x46, 0, 0, 32, 0, 0, 0x40, 0, 1, 2, 0, 0];
    report.extend_from_slice(&g2.octets());
    report.extend_from_slice(&group.octets());
    report.extend_from_slice(&[0x94, 0x04, 0, 0, 0x16, 0, 0, 0]);
    report.extend_from_slice(&group.octets());
    let gmac = Mac([0x01, 0x00, 0x5e, 0x01, 0x01, 0x01]);
    q2.to_link
        .borrow_mut()
        .push_back(eth_frame(gmac, m2, 0x0800, &report));
    run(&mut [&mut a, &mut b], Duration::from_millis(300));
    let (n1, n2) = (frames(&q1).len(), frames(&q2).len());
    let m = ipv4(a4, group, b"to the listeners");
    a.send_ip(&m);
    let deadline = Instant::now() + Duration::from_secs(5);
    while frames(&q2).len() == n2 && Instant::now() < deadline {
        run(&mut [&mut a, &mut b], Duration::from_millis(5));
    }
    let last = frames(&q2).pop().unwrap();
    assert_eq!(&last[..6], &gmac.0, "to the group's MAC");
    assert_eq!(&last[14..14 + m.len()], &m[..]);
    run(&mut [&mut a, &mut b], Duration::from_millis(50));
    assert_eq!(frames(&q1).len(), n1, "guest 1 did not join the group");

    // Guest 2 leaves (IGMPv2 Leave Group, to all-routers): its QP is
    // detached and host a's next packet to the group no longer reaches it.
    let mut leave = vec![0x46, 0, 0, 32, 0, 0, 0x40, 0, 1, 2, 0, 0];
    leave.extend_from_slice(&g2.octets());
    leave.extend_from_slice(&[224, 0, 0, 2]);
    leave.extend_from_slice(&[0x94, 0x04, 0, 0, 0x17, 0, 0, 0]);
    leave.extend_from_slice(&group.octets());
    let routers = Mac([0x01, 0x00, 0x5e, 0x00, 0x00, 0x02]);
    q2.to_link
        .borrow_mut()
        .push_back(eth_frame(routers, m2, 0x0800, &leave));
    run(&mut [&mut a, &mut b], Duration::from_millis(300));
    let n2 = frames(&q2).len();
    a.send_ip(&m);
    run(&mut [&mut a, &mut b], Duration::from_millis(300));
    assert_eq!(frames(&q2).len(), n2, "guest 2 left the group");
    assert!(b.link.remove_guest(id1).is_empty());
    assert!(b.link.remove_guest(id2).is_empty());
    a.finish();
    b.finish();
}

/// IPv4/UDP with `src`, `dst` and a correct UDP checksum (RFC 768),
/// computed here independently of the model.
fn udp4(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let ulen = 8 + payload.len();
    let mut p = ipv4(src, dst, &[]);
    p[9] = 17;
    p[2..4].copy_from_slice(&((20 + ulen) as u16).to_be_bytes());
    p[10..12].fill(0);
    let mut sum: u32 = p[..20]
        .chunks(2)
        .map(|c| u32::from(c[0]) << 8 | u32::from(c[1]))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let mut u = vec![0x30, 0x39, 0x00, 0x35];
    u.extend_from_slice(&(ulen as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(ulen as u16).to_be_bytes());
    pseudo.extend_from_slice(&u);
    if pseudo.len() % 2 == 1 {
        pseudo.push(0);
    }
    let mut sum: u32 = pseudo
        .chunks(2)
        .map(|c| u32::from(c[0]) << 8 | u32::from(c[1]))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let c = !(sum as u16);
    u[6..8].copy_from_slice(&(if c == 0 { 0xffff } else { c }).to_be_bytes());
    p.extend_from_slice(&u);
    p
}

/// The HCA's receive checksum check reaches the host as DATA_VALID in the
/// virtio-net header; a damaged packet is passed on without it (the
/// kernel then finds the damage itself).
#[test]
fn verified_checksums_are_passed_on_as_data_valid() {
    let (_fabric, mut a, mut b) = two_hosts(6);
    let (a4, b4) = (Ipv4Addr::new(10, 6, 0, 1), Ipv4Addr::new(10, 6, 0, 2));
    let good = udp4(a4, b4, b"checked by the HCA");
    a.send_ip(&good);
    until_delivered(&mut a, &mut b, 1);
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 1] ^= 0x55;
    a.send_ip(&bad);
    until_delivered(&mut a, &mut b, 2);
    let frames = b.host.from_link.borrow().clone();
    assert_eq!(frames[0][0], 2, "VIRTIO_NET_HDR_F_DATA_VALID");
    assert_eq!(&frames[0][VNET_HDR_LEN_MRG..], &good[..]);
    assert_eq!(frames[1][0], 0, "not vouched for");
    a.finish();
    b.finish();
}

/// A guest side that lends its frames as the vhost-user device does: each
/// frame is written to "guest memory" (a region mapped for the HCA with
/// [`Link::map_guest_memory`]), its first `head` bytes are copied into the
/// interface's buffer and the rest is left for the HCA to gather.
struct Lender {
    mem: Arc<vm_memory::MmapRegion<()>>,
    window: RefCell<Option<ipoib_device::link::GuestWindow>>,
    /// Frames to send: what the guest's memory holds, and the copied
    /// head as the device checked it.
    to_link: RefCell<VecDeque<(Vec<u8>, Vec<u8>)>>,
    from_link: RefCell<Vec<Vec<u8>>>,
    given_back: RefCell<Vec<u16>>,
    next: RefCell<u16>,
    /// Receive buffers not lent (indices).
    rx_free: RefCell<Vec<u16>>,
    /// Lend the next receive buffer at an address outside the window (as
    /// a broken device would).
    poison: std::cell::Cell<bool>,
}

/// Where frame `token` sits in the guest's memory.
const LENT_STRIDE: usize = 8192;
/// The guest's receive buffers: 256 of 2 KiB after the frames.
const RX_AREA: usize = 16 * LENT_STRIDE;
const RX_BUF_LEN: usize = 2048;
const RX_TOKEN: u16 = 0x8000;

impl Lender {
    fn new() -> Rc<Lender> {
        Rc::new(Lender {
            mem: Arc::new(vm_memory::MmapRegion::<()>::new(RX_AREA + 256 * RX_BUF_LEN).unwrap()),
            window: RefCell::new(None),
            to_link: RefCell::new(VecDeque::new()),
            from_link: RefCell::new(Vec::new()),
            given_back: RefCell::new(Vec::new()),
            next: RefCell::new(0),
            rx_free: RefCell::new((0..256).rev().collect()),
            poison: std::cell::Cell::new(false),
        })
    }

    /// Where receive buffer `token` is in the guest's memory.
    fn rx_at(token: u16) -> Option<usize> {
        let k = usize::from(token.checked_sub(RX_TOKEN)?);
        (k < 256).then_some(RX_AREA + k * RX_BUF_LEN)
    }

    fn rx_lent(&self) -> usize {
        256 - self.rx_free.borrow().len()
    }
}

/// The interface's handle on a [`Lender`].
struct LenderPort(Rc<Lender>);

impl HostPort for LenderPort {
    fn recv(&self, _buf: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }

    fn send(&self, buf: &[u8]) -> io::Result<usize> {
        self.0.from_link.borrow_mut().push(buf.to_vec());
        Ok(buf.len())
    }

    fn recv_lent(&self, buf: &mut [u8]) -> io::Result<ipoib_device::link::Received> {
        use ipoib_device::link::{Lent, MAX_LENT, Received};
        use mlx5_driver::layout::wqe::Sge;
        use vm_memory::{Bytes, VolatileMemory};
        let (frame, head) = self
            .0
            .to_link
            .borrow_mut()
            .pop_front()
            .ok_or(io::ErrorKind::WouldBlock)?;
        let w = match self.0.window.borrow().clone() {
            Some(w) if !head.is_empty() => w,
            _ => {
                buf[..frame.len()].copy_from_slice(&frame);
                return Ok(Received::Copied(frame.len()));
            }
        };
        let token = {
            let mut n = self.0.next.borrow_mut();
            *n += 1;
            *n
        };
        let at = usize::from(token) * LENT_STRIDE;
        self.0
            .mem
            .as_volatile_slice()
            .write_slice(&frame, at)
            .unwrap();
        buf[..head.len()].copy_from_slice(&head);
        let mut sges = [Sge {
            addr: 0,
            len: 0,
            lkey: w.key,
        }; MAX_LENT];
        // The rest in two pieces, as two descriptors would give it.
        let rest = frame.len() - head.len();
        let base = w.regions[0].0.0 + (at + head.len()) as u64;
        sges[0].addr = base;
        sges[0].len = (rest / 2) as u32;
        sges[1].addr = base + (rest / 2) as u64;
        sges[1].len = (rest - rest / 2) as u32;
        Ok(Received::Lent(Lent {
            head: head.len(),
            len: frame.len(),
            token,
            sges,
            n: 2,
        }))
    }

    fn give_back(&self, token: u16) {
        self.0.given_back.borrow_mut().push(token);
    }

    fn copy_back(&self, token: u16, from: usize, out: &mut [u8]) -> bool {
        use vm_memory::{Bytes, VolatileMemory};
        let at = usize::from(token) * LENT_STRIDE + from;
        let ok = self.0.mem.as_volatile_slice().read_slice(out, at).is_ok();
        self.give_back(token);
        ok
    }

    fn rx_ready(&self) -> Option<bool> {
        self.0.window.borrow().is_some().then_some(true)
    }

    fn lend_rx(&self, min_cap: u32, out: &mut [mlx5_driver::layout::wqe::Sge]) -> Lend {
        let Some(w) = self.0.window.borrow().clone() else {
            return Lend::Refused;
        };
        if min_cap as usize > RX_BUF_LEN {
            return Lend::Refused;
        }
        let Some(k) = self.0.rx_free.borrow_mut().pop() else {
            return Lend::Empty;
        };
        let at = if self.0.poison.replace(false) {
            w.regions[0].1 as usize + 0x10_0000
        } else {
            RX_AREA + usize::from(k) * RX_BUF_LEN
        };
        out[0] = mlx5_driver::layout::wqe::Sge {
            addr: w.regions[0].0.0 + at as u64,
            len: RX_BUF_LEN as u32,
            lkey: w.key,
        };
        Lend::Lent(RX_TOKEN + k, 1, RX_BUF_LEN as u32)
    }

    fn rx_read(&self, token: u16, off: usize, out: &mut [u8]) -> bool {
        use vm_memory::{Bytes, VolatileMemory};
        let Some(at) = Lender::rx_at(token).filter(|_| off + out.len() <= RX_BUF_LEN) else {
            return false;
        };
        self.0
            .mem
            .as_volatile_slice()
            .read_slice(out, at + off)
            .is_ok()
    }

    fn rx_write(&self, token: u16, off: usize, data: &[u8]) -> bool {
        use vm_memory::{Bytes, VolatileMemory};
        let Some(at) = Lender::rx_at(token).filter(|_| off + data.len() <= RX_BUF_LEN) else {
            return false;
        };
        self.0
            .mem
            .as_volatile_slice()
            .write_slice(data, at + off)
            .is_ok()
    }

    /// The guest reads the frame out of its buffers and posts them again.
    fn rx_done(&self, hdr: [u8; VNET_HDR_LEN_MRG], used: &[(u16, u32)]) -> bool {
        if !self.rx_write(used[0].0, 0, &hdr) {
            return false;
        }
        let mut frame = Vec::new();
        for &(token, len) in used {
            let mut b = vec![0u8; len as usize];
            assert!(self.rx_read(token, 0, &mut b));
            frame.extend_from_slice(&b);
            self.0.rx_free.borrow_mut().push(token - RX_TOKEN);
        }
        assert_eq!(
            u16::from_le_bytes([frame[10], frame[11]]) as usize,
            used.len(),
            "num_buffers"
        );
        self.0.from_link.borrow_mut().push(frame);
        true
    }

    fn rx_return(&self, token: u16) {
        self.0.rx_free.borrow_mut().push(token - RX_TOKEN);
    }
}

/// A guest on `b` whose memory is mapped for the HCA (one window), sending
/// from `g4`.
fn lending_guest(b: &mut Host, g4: Ipv4Addr) -> (usize, Rc<Lender>) {
    use mlx5_driver::transport::{DmaBacking, DmaMem};
    let g = Lender::new();
    let id = b
        .link
        .add_guest(
            GuestConfig {
                mac: GUEST_MAC,
                learn_mac: false,
                allowed: vec![g4.into()],
                zero_copy: true,
            },
            Box::new(LenderPort(g.clone())),
        )
        .unwrap();
    let mappings = b.dev.report().mappings;
    let backing: Arc<dyn DmaBacking> = g.mem.clone();
    let w = b
        .link
        .map_guest_memory(id, &[DmaMem::new(backing, 0, g.mem.len()).unwrap()])
        .unwrap();
    assert_eq!(b.dev.report().mappings, mappings + 1, "one window");
    assert_eq!(w.regions.len(), 1);
    *g.window.borrow_mut() = Some(w);
    (id, g)
}

/// A [`lending_guest`] whose endpoint was quiesced and resumed, so that
/// its receive WQEs take the buffers it lends.
fn receiving_guest(b: &mut Host, g4: Ipv4Addr) -> (usize, Rc<Lender>) {
    let (id, g) = lending_guest(b, g4);
    assert!(b.link.quiesce_guest(id));
    b.link.resume_guest(id);
    (id, g)
}

/// The lending guest asks for `ip` by ARP (a copied frame); returns the
/// answer as it reached the guest.
fn lender_arp(a: &mut Host, b: &mut Host, g: &Lender, g4: Ipv4Addr, ip: Ipv4Addr) -> Vec<u8> {
    let seen = g.from_link.borrow().len();
    let req = eth_arp(1, GUEST_MAC, g4, Mac::default(), ip);
    let f = eth_frame(Mac::BROADCAST, GUEST_MAC, 0x0806, &req);
    g.to_link.borrow_mut().push_back((f, Vec::new()));
    until_frames(a, b, &g.from_link, seen + 1);
    g.from_link.borrow()[seen][VNET_HDR_LEN_MRG..].to_vec()
}

/// Zero copy: a guest's large frames are sent by the HCA from the guest's
/// memory, mapped at a window of its own. The headers travel from the
/// copy the interface checked (what the guest's memory holds there does
/// not matter), the rest from the guest's buffer, which comes back when
/// the send completes; a frame waiting for a path when the guest stops is
/// copied in and given back at once; the window goes with the endpoint.
#[test]
fn guest_frames_are_sent_from_guest_memory() {
    let (_fabric, mut a, mut b) = two_hosts(7);
    let (a4, g4) = (Ipv4Addr::new(10, 7, 0, 1), Ipv4Addr::new(10, 7, 0, 9));
    let before = b.dev.report().mappings;
    let (id, g) = lending_guest(&mut b, g4);
    let reply = lender_arp(&mut a, &mut b, &g, g4, a4);
    let remac = Mac(reply[22..28].try_into().unwrap());

    // A 1400-byte UDP packet, lent with a 268-byte head. The guest's
    // memory holds a forged source address where the head was copied
    // from: the HCA sends the checked copy.
    let packet = udp4(g4, a4, &[0x5A; 1372]);
    let frame = eth_frame(remac, GUEST_MAC, 0x0800, &packet);
    let head = frame[..VNET_HDR_LEN_MRG + 256].to_vec();
    let mut in_memory = frame.clone();
    let src = VNET_HDR_LEN_MRG + 14 + 12;
    in_memory[src..src + 4].copy_from_slice(&[10, 7, 0, 66]);
    g.to_link.borrow_mut().push_back((in_memory, head));
    until_delivered(&mut b, &mut a, 1);
    assert_eq!(a.delivered(), [packet], "sent whole, as checked");
    let deadline = Instant::now() + Duration::from_secs(2);
    while g.given_back.borrow().is_empty() && Instant::now() < deadline {
        run(&mut [&mut a, &mut b], Duration::from_millis(5));
    }
    assert_eq!(*g.given_back.borrow(), [1], "given back at completion");
    let info = b.link.guest(id).unwrap();
    assert_eq!(info.counters.tx_zero_copy, 1);

    // A lent packet to a group not yet joined waits in the engine for
    // the send-only join; quiescing (as before any frontend request)
    // copies it in and gives the guest's buffer back at once, and it
    // still goes when the join completes.
    let group = Ipv4Addr::new(239, 7, 0, 1);
    let mpacket = udp4(g4, group, &[0x33; 1000]);
    let mframe = eth_frame(Mac::ipv4_multicast(group), GUEST_MAC, 0x0800, &mpacket);
    let mhead = mframe[..VNET_HDR_LEN_MRG + 256].to_vec();
    g.to_link.borrow_mut().push_back((mframe, mhead));
    b.link.poll(&b.host, Duration::ZERO).unwrap();
    assert_eq!(g.given_back.borrow().len(), 1, "waiting, still lent");
    assert!(b.link.quiesce_guest(id));
    assert_eq!(*g.given_back.borrow(), [1, 2], "taken back by copy");
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.link.guest(id).unwrap().counters.tx_packets < 3 && Instant::now() < deadline {
        run(&mut [&mut a, &mut b], Duration::from_millis(5));
    }
    let info = b.link.guest(id).unwrap();
    assert_eq!(info.counters.tx_packets, 3, "ARP request, two packets");
    assert_eq!(info.counters.tx_zero_copy, 1, "the second one was copied");
    assert_eq!(info.counters.tx_errors, 0);

    // The window goes with its mapping; then with the endpoint.
    b.link.unmap_guest_memory(id).unwrap();
    assert!(b.link.remove_guest(id).is_empty());
    assert_eq!(b.dev.report().mappings, before, "nothing left mapped");
    a.finish();
    b.finish();
}

/// Zero copy on receive: once the guest's memory is mapped and the
/// endpoint resumed, its receive WQEs point into buffers the guest lent;
/// the HCA writes packets there and the backend adds the virtio-net and
/// Ethernet headers (an ARP reply is rewritten in place). Quiescing takes
/// every lent buffer back (the QP's ERR/RESET/RTS cycle), and after
/// resuming packets arrive again, on the same QPN.
#[test]
fn frames_for_a_guest_land_in_its_memory() {
    let (_fabric, mut a, mut b) = two_hosts(8);
    let (a4, g4) = (Ipv4Addr::new(10, 8, 0, 1), Ipv4Addr::new(10, 8, 0, 9));
    let (id, g) = receiving_guest(&mut b, g4);
    let qpn = b.link.guest(id).unwrap().hw.qpn();
    // 64 WQEs of three 2 KiB buffers each (room for a 4 KiB MTU).
    assert_eq!(g.rx_lent(), 64 * 3);

    // ARP: the reply is written into the guest's buffers and rewritten
    // there into Ethernet ARP.
    let reply = lender_arp(&mut a, &mut b, &g, g4, a4);
    assert_eq!(&reply[0..6], &GUEST_MAC.0);
    assert_eq!(&reply[12..14], &[0x08, 0x06]);
    assert_eq!(&reply[20..22], &[0, 2], "an ARP reply");
    assert_eq!(&reply[28..32], &a4.octets());
    assert_eq!(reply.len(), 60, "padded to the minimum");
    let remac = Mac(reply[22..28].try_into().unwrap());

    // 1400 bytes of UDP from a: in the guest's buffers, behind an
    // Ethernet header from a's synthetic MAC.
    let big = udp4(a4, g4, &[0xA5; 1372]);
    a.send_ip(&big);
    until_frames(&mut a, &mut b, &g.from_link, 2);
    let f = g.from_link.borrow()[1].clone();
    assert_eq!(&f[VNET_HDR_LEN_MRG..VNET_HDR_LEN_MRG + 6], &GUEST_MAC.0);
    assert_eq!(&f[VNET_HDR_LEN_MRG + 6..VNET_HDR_LEN_MRG + 12], &remac.0);
    assert_eq!(&f[VNET_HDR_LEN_MRG + 14..], &big[..], "the packet, whole");
    let c = b.link.guest(id).unwrap().counters;
    assert_eq!((c.rx_zero_copy, c.rx_delivered), (2, 2));

    // Quiescing gives every buffer back; resuming lends them again and
    // traffic flows on the same QPN.
    assert!(b.link.quiesce_guest(id));
    assert_eq!(g.rx_lent(), 0, "every lent buffer came back");
    b.link.resume_guest(id);
    assert_eq!(g.rx_lent(), 64 * 3);
    assert_eq!(b.link.guest(id).unwrap().hw.qpn(), qpn);
    let again = udp4(a4, g4, b"after the restart");
    a.send_ip(&again);
    until_frames(&mut a, &mut b, &g.from_link, 3);
    let f = g.from_link.borrow()[2].clone();
    assert_eq!(
        &f[VNET_HDR_LEN_MRG + 14..VNET_HDR_LEN_MRG + 14 + again.len()],
        &again[..]
    );
    assert_eq!(b.link.guest(id).unwrap().counters.rx_zero_copy, 3);

    assert!(b.link.quiesce_guest(id));
    b.link.unmap_guest_memory(id).unwrap();
    b.link.resume_guest(id);
    assert_eq!(
        g.rx_lent(),
        0,
        "without the window the endpoint's own buffers"
    );
    assert!(b.link.remove_guest(id).is_empty());
    a.finish();
    b.finish();
}

/// A DHCP message (RFC 2131 layout: op, htype, hlen, xid, chaddr, the
/// cookie, the message type option, END) from `src` to the limited
/// broadcast address, UDP `ports.0` → `ports.1`.
fn dhcp_msg(
    src: Ipv4Addr,
    ports: (u16, u16),
    op: u8,
    htype: u8,
    xid: u32,
    chaddr: &[u8],
) -> Vec<u8> {
    let mut m = vec![0u8; 236];
    m[0] = op;
    m[1] = htype;
    m[2] = chaddr.len() as u8;
    m[4..8].copy_from_slice(&xid.to_be_bytes());
    m[28..28 + chaddr.len()].copy_from_slice(chaddr);
    m.extend_from_slice(&[99, 130, 83, 99, 53, 1, op, 255]);
    let mut p = ipv4(src, Ipv4Addr::BROADCAST, &[]);
    p[9] = 17;
    p[2..4].copy_from_slice(&((28 + m.len()) as u16).to_be_bytes());
    p[10..12].fill(0);
    let mut sum: u32 = p[..20]
        .chunks(2)
        .map(|c| u32::from(c[0]) << 8 | u32::from(c[1]))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p.extend_from_slice(&ports.0.to_be_bytes());
    p.extend_from_slice(&ports.1.to_be_bytes());
    p.extend_from_slice(&((8 + m.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(&m);
    p
}

/// DHCP across the translation (RFC 4390, ipoib.md §15.5): a guest's
/// DISCOVER reaches host a in the IPoIB form (hardware type 32, no
/// hardware address, broadcast flag, a client identifier from its MAC);
/// the server's broadcast OFFER comes back to that guest in the Ethernet
/// form with its MAC in `chaddr`, and not to the other guest on the
/// interface, which never asked.
#[test]
fn dhcp_is_translated_for_the_guest_that_asked() {
    let (_fabric, mut a, mut b) = two_hosts(9);
    let a4 = Ipv4Addr::new(10, 9, 0, 1);
    let (m1, m2) = (Mac([0x52, 0x54, 0, 0, 0, 1]), Mac([0x52, 0x54, 0, 0, 0, 2]));
    let (id1, q1) = guest(&mut b, m1);
    let (id2, q2) = guest(&mut b, m2);
    run(&mut [&mut a, &mut b], Duration::from_millis(100));

    let discover = dhcp_msg(Ipv4Addr::UNSPECIFIED, (68, 67), 1, 1, 0x0bad_cafe, &m1.0);
    q1.to_link
        .borrow_mut()
        .push_back(eth_frame(Mac::BROADCAST, m1, 0x0800, &discover));
    until_delivered(&mut b, &mut a, 1);
    let got = a.delivered().pop().unwrap();
    let m = &got[28..];
    assert_eq!(
        (m[1], m[2]),
        (32, 0),
        "hardware type InfiniBand, no address"
    );
    assert_eq!(m[10] & 0x80, 0x80, "broadcast flag");
    assert!(m[28..44].iter().all(|b| *b == 0), "chaddr empty");
    assert_eq!(
        &m[243..252],
        &[61, 7, 1, 0x52, 0x54, 0, 0, 0, 1],
        "client id"
    );

    let offer = dhcp_msg(a4, (67, 68), 2, 32, 0x0bad_cafe, &[]);
    let (n1, n2) = (q1.from_link.borrow().len(), q2.from_link.borrow().len());
    a.send_ip(&offer);
    until_guest_has(&mut a, &mut b, &q1, n1 + 1);
    let f = frames(&q1).pop().unwrap();
    assert_eq!(&f[..6], &m1.0, "to the guest that asked");
    let m = &f[14 + 28..];
    assert_eq!((m[1], m[2]), (1, 6));
    assert_eq!(&m[28..34], &m1.0);
    run(&mut [&mut a, &mut b], Duration::from_millis(50));
    assert_eq!(q2.from_link.borrow().len(), n2, "not to the other");
    let drops = b.link.guest(id2).unwrap().eth_drops;
    assert!(drops.contains(&("drop_dhcp_other", 1)), "{drops:?}");
    assert!(b.link.remove_guest(id1).is_empty());
    assert!(b.link.remove_guest(id2).is_empty());
    a.finish();
    b.finish();
}

/// A receive WQE the HCA cannot write (a scatter entry outside the VM's
/// window: the key refuses it with a local protection error, and the QP
/// goes to ERR, as on a card) costs the packet in it, not the endpoint:
/// the QP is restarted with the same QPN and the next packet arrives.
#[test]
fn a_failed_qp_is_restarted() {
    let (_fabric, mut a, mut b) = two_hosts(10);
    let (a4, g4) = (Ipv4Addr::new(10, 10, 0, 1), Ipv4Addr::new(10, 10, 0, 9));
    let (id, g) = receiving_guest(&mut b, g4);
    let qpn = b.link.guest(id).unwrap().hw.qpn();
    let reply = lender_arp(&mut a, &mut b, &g, g4, a4);
    assert_eq!(&reply[20..22], &[0, 2], "an ARP reply: a knows the guest");
    // Now the first WQE's first buffer is outside the window; the next
    // packet meets it.
    g.poison.set(true);
    assert!(b.link.quiesce_guest(id));
    b.link.resume_guest(id);
    a.send_ip(&udp4(a4, g4, b"lost with its WQE"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.link.guest(id).unwrap().counters.qp_restarts == 0 && Instant::now() < deadline {
        run(&mut [&mut a, &mut b], Duration::from_millis(5));
    }
    let c = b.link.guest(id).unwrap().counters;
    assert_eq!(c.qp_restarts, 1, "{c:?}");
    assert_eq!(c.rx_errors, 1);
    assert_eq!(b.link.guest(id).unwrap().hw.qpn(), qpn, "the same QPN");
    let seen = g.from_link.borrow().len();
    let p = udp4(a4, g4, b"after the restart");
    a.send_ip(&p);
    until_frames(&mut a, &mut b, &g.from_link, seen + 1);
    let f = g.from_link.borrow()[seen].clone();
    assert_eq!(
        &f[VNET_HDR_LEN_MRG + 14..VNET_HDR_LEN_MRG + 14 + p.len()],
        &p[..]
    );
    assert_eq!(g.rx_lent(), 64 * 3, "every WQE lent again, none lost");
    assert!(b.link.remove_guest(id).is_empty());
    a.finish();
    b.finish();
}
