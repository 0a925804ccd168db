//! IPoIB datagram mode on the simulated fabric: the engine of
//! `ipoib-device` driving real UD QPs, SA joins and PathRecord queries
//! through the mlx5 driver and the software HCA. ARP and IPv6 neighbour
//! discovery resolve, unicast and multicast IP packets arrive intact, and
//! everything is torn down cleanly.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use ipoib_device::engine::addr::HwAddr;
use ipoib_device::engine::datagram::{Action, Config, Datagram, Dest, Drop, Source};
use ipoib_device::engine::{self, mgid};
use ipoib_sim::{Fabric, FabricConfig};
use ipoib_tests::node::{Node, RX_BUF, RX_BUFS, TX_AREA};
use mlx5_driver::layout::wqe::{AddressVector, Grh, Sge};
use mlx5_driver::sa::{self, Gsi, MadDest, McMemberRecord, PathRecord, join};

/// The Q_Key the QP starts with; the broadcast group's replaces it.
const QKEY_BEFORE_JOIN: u32 = 0x1111;
const PKEY: u16 = 0xFFFF;
/// IP protocol of the test payloads: 253, for experimentation (RFC 3692),
/// so that the capture's dissectors leave the bytes alone.
const EXPERIMENTAL_PROTOCOL: u8 = 253;

/// One host: an HCA node, its SA client and an IPoIB interface.
struct Host {
    n: Node,
    gsi: Gsi,
    ipoib: Datagram<AddressVector, Vec<u8>>,
    bcast: Option<McMemberRecord>,
    posted: VecDeque<usize>,
    delivered: Vec<Vec<u8>>,
    out: Vec<Action<AddressVector, Vec<u8>>>,
}

impl Host {
    fn new(fabric: &Fabric, guid: u64, v4: Ipv4Addr, v6: Ipv6Addr) -> Host {
        let mut n = Node::new(fabric, guid, QKEY_BEFORE_JOIN);
        let gsi = Gsi::new(&mut n.hca, 1).unwrap();
        let hw = HwAddr::new(HwAddr::FLAG_RC, n.qp.qpn(), n.gid);
        let ipoib = Datagram::new(Config {
            hw,
            pkey: PKEY,
            scope: mgid::SCOPE_LINK,
            ipv4: vec![v4],
            ipv6: vec![v6],
        });
        let mut h = Host {
            n,
            gsi,
            ipoib,
            bcast: None,
            posted: (0..RX_BUFS).collect(),
            delivered: Vec::new(),
            out: Vec::new(),
        };
        let lid = h.n.lid;
        h.ipoib.start(lid, &mut h.out);
        h.run();
        assert!(h.ipoib.carrier(), "broadcast group joined");
        h
    }

    fn sa(&mut self, mad: [u8; 256]) -> Result<[u8; 256], sa::SaError> {
        let d = MadDest {
            dlid: self.n.sm_lid,
            dqpn: 1,
            sl: 0,
        };
        self.gsi
            .transact(&mut self.n.hca, mad, d, Duration::from_millis(300), 3)
    }

    /// Carries out the interface's actions until none are left.
    fn run(&mut self) {
        let now = Instant::now();
        while !self.out.is_empty() {
            let actions: Vec<_> = self.out.drain(..).collect();
            for a in actions {
                match a {
                    Action::Send { dest, payload } => {
                        let av = match dest {
                            Dest::Unicast { ah, qpn } => AddressVector { dqpn: qpn, ..ah },
                            Dest::Multicast { ah, .. } => ah,
                        };
                        let ty = payload.ethertype();
                        match payload {
                            engine::datagram::Payload::Host(p, _) => self.transmit(&av, ty, &p),
                            engine::datagram::Payload::Control(c) => {
                                self.transmit(&av, ty, c.bytes())
                            }
                        }
                    }
                    Action::Deliver(p) => self.delivered.push(p),
                    Action::QueryPath(dgid) => {
                        let tclass = self.bcast.map_or(0, |b| b.tclass);
                        let req = sa::path_query(self.n.gid, dgid, PKEY, tclass);
                        match self.sa(req) {
                            Ok(resp) => {
                                let p = PathRecord::parse(&resp[sa::SA_DATA..]);
                                let qkey = self.bcast.map_or(QKEY_BEFORE_JOIN, |b| b.qkey);
                                let av = AddressVector {
                                    dqpn: 0,
                                    qkey,
                                    dlid: p.dlid,
                                    sl: p.sl,
                                    ..AddressVector::default()
                                };
                                self.ipoib.path_resolved(dgid, av, now, &mut self.out);
                            }
                            Err(_) => self.ipoib.path_failed(dgid, &mut self.out),
                        }
                    }
                    Action::Join { mgid, send_only } => {
                        let state = if send_only {
                            join::SEND_ONLY_FULL
                        } else {
                            join::FULL
                        };
                        let params = self.bcast;
                        let req = sa::mc_join(mgid, self.n.gid, PKEY, state, params.as_ref());
                        match self.sa(req) {
                            Ok(resp) => {
                                let g = McMemberRecord::parse(&resp[sa::SA_DATA..]);
                                if mgid == self.ipoib.broadcast_mgid() {
                                    self.n.qp.set_qkey(&mut self.n.hca, g.qkey).unwrap();
                                    self.bcast = Some(g);
                                }
                                if !send_only {
                                    self.n.qp.attach(&mut self.n.hca, mgid).unwrap();
                                }
                                let av = AddressVector {
                                    dqpn: 0xFF_FFFF,
                                    qkey: g.qkey,
                                    dlid: g.mlid,
                                    sl: g.sl,
                                    grh: Some(Grh {
                                        dgid: mgid,
                                        hop_limit: g.hop_limit,
                                        tclass: g.tclass,
                                        flow_label: g.flow_label,
                                        sgid_index: 0,
                                    }),
                                    ..AddressVector::default()
                                };
                                self.ipoib.joined(mgid, av, &mut self.out);
                            }
                            Err(_) => self.ipoib.join_failed(mgid, now, &mut self.out),
                        }
                    }
                    Action::Dropped(..) | Action::Release(_) => {}
                }
            }
        }
    }

    /// Sends one IPoIB packet and waits for its completion.
    fn transmit(&mut self, av: &AddressVector, ty: u16, body: &[u8]) {
        let mut hdr = [0u8; engine::IPOIB_HEADER_LEN];
        engine::write_header(&mut hdr, ty);
        self.n.mem.write(TX_AREA, &hdr);
        self.n.mem.write(TX_AREA + hdr.len(), body);
        let sge = Sge {
            addr: self.n.mem.iova_at(TX_AREA).0,
            len: (hdr.len() + body.len()) as u32,
            lkey: self.n.hca.lkey(),
        };
        self.n.qp.post_send_ud(av, &[sge], true).unwrap();
        self.n.qp.ring_sq(self.n.hca.transport());
        let sc = self.n.wait_cqes(false, 1, Duration::from_secs(2));
        assert_eq!(sc.len(), 1, "send completion");
        assert!(sc[0].error.is_none(), "{:?}", sc[0]);
        self.n.qp.send_done(sc[0].wqe_counter);
    }

    /// Receives for `wait`, feeding every packet to the interface.
    fn receive(&mut self, wait: Duration) -> usize {
        let cqes = self.n.wait_cqes(true, RX_BUFS, wait);
        let now = Instant::now();
        for c in &cqes {
            let buf = self.posted.pop_front().expect("a posted buffer");
            assert!(c.error.is_none(), "{c:?}");
            let len = (c.byte_cnt as usize).saturating_sub(40);
            let mut data = vec![0u8; 40 + len];
            self.n.mem.read(buf * RX_BUF, &mut data);
            let multicast = c.grh() && data[24] == 0xFF;
            let src = Source {
                slid: c.slid,
                sqpn: c.src_qpn(),
                multicast,
            };
            self.n.qp.recv_done();
            self.n.post_rx(buf);
            self.posted.push_back(buf);
            let ipoib = &data[40..];
            let ty = engine::header_type(ipoib).expect("IPoIB header");
            let body = ipoib[engine::IPOIB_HEADER_LEN..].to_vec();
            self.ipoib
                .receive(src, ty, &body.clone(), body, now, &mut self.out);
        }
        self.n.qp.ring_rq();
        self.run();
        cqes.len()
    }

    fn send_ip(&mut self, packet: Vec<u8>) {
        let bytes = packet.clone();
        self.ipoib
            .transmit(&bytes, packet, Instant::now(), &mut self.out);
        self.run();
    }

    fn finish(self) {
        let Host { mut n, gsi, .. } = self;
        gsi.destroy(&mut n.hca).unwrap();
        let (r, rep) = n.finish();
        assert!(r.clean(), "{r:?}");
        assert_eq!(rep.mappings, 0);
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

/// Lets both hosts exchange until neither receives anything more.
fn settle(a: &mut Host, b: &mut Host) {
    loop {
        let k = a.receive(Duration::from_millis(50)) + b.receive(Duration::from_millis(50));
        if k == 0 {
            break;
        }
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
    let mut a = Host::new(&fabric, 0x0002_c903_0000_0a00, a4, a6);
    let mut b = Host::new(&fabric, 0x0002_c903_0000_0b00, b4, b6);

    // IPv4: the first packet waits for ARP, then for the path.
    let ping = ipv4(a4, b4, b"ping over ipoib");
    a.send_ip(ping.clone());
    settle(&mut a, &mut b);
    assert_eq!(b.delivered, [ping], "b got a's packet intact");
    let back = ipv4(b4, a4, b"pong");
    b.send_ip(back.clone());
    settle(&mut a, &mut b);
    assert_eq!(a.delivered, [back], "b already knew a from its ARP request");
    let na = a.ipoib.neighbours(Instant::now());
    assert_eq!(na.len(), 1);
    assert_eq!(na[0].key, IpAddr::V4(b4));
    assert_eq!(na[0].value.map(|h| h.qpn()), Some(b.n.qp.qpn()));

    // IPv6: neighbour solicitation to the solicited-node group, joined
    // send-only on the way.
    let p6 = ipv6(a6, b6, b"hello v6");
    a.send_ip(p6.clone());
    settle(&mut a, &mut b);
    assert_eq!(b.delivered.last(), Some(&p6));
    let sn = mgid::ipv6(mgid::solicited_node(b6), PKEY, mgid::SCOPE_LINK);
    assert!(
        a.ipoib.groups().contains(&(sn, true, true)),
        "{:?}",
        a.ipoib.groups()
    );

    // IP multicast: b listens to 239.1.2.3 (full join + attach), a sends to
    // it with a send-only membership.
    let group = Ipv4Addr::new(239, 1, 2, 3);
    b.ipoib.listen(IpAddr::V4(group), &mut b.out);
    b.run();
    let m = ipv4(a4, group, b"to the group");
    a.send_ip(m.clone());
    settle(&mut a, &mut b);
    assert_eq!(b.delivered.last(), Some(&m));
    assert!(
        fabric.groups().len() >= 3,
        "broadcast, solicited-node, 239.1.2.3"
    );

    // Nothing was dropped on either side.
    for h in [&a, &b] {
        for why in [
            Drop::QueueFull,
            Drop::Unreachable,
            Drop::BadControl,
            Drop::Malformed,
        ] {
            assert_eq!(h.ipoib.drops(why), 0, "{why:?}");
        }
    }
    a.finish();
    b.finish();
    drop(fabric);
    check_capture(&pcap);
    std::fs::remove_dir_all(&dir).unwrap();
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

#[test]
fn unknown_destination_is_dropped_after_arp_gives_up() {
    let fabric = Fabric::new(FabricConfig::default()).unwrap();
    let a4 = Ipv4Addr::new(10, 2, 0, 1);
    let mut a = Host::new(
        &fabric,
        0x0002_c903_0000_0c00,
        a4,
        "fe80::c".parse().unwrap(),
    );
    let t0 = Instant::now();
    for _ in 0..4 {
        let p = ipv4(a4, Ipv4Addr::new(10, 2, 0, 99), b"nobody");
        let bytes = p.clone();
        a.ipoib.transmit(&bytes, p, t0, &mut a.out);
    }
    a.run();
    assert_eq!(
        a.ipoib.drops(Drop::QueueFull),
        1,
        "three queued, the fourth dropped"
    );
    for s in 1..=3 {
        a.ipoib.poll(t0 + Duration::from_secs(s), &mut a.out);
        a.run();
    }
    assert_eq!(a.ipoib.drops(Drop::Unreachable), 3);
    assert!(a.ipoib.neighbours(Instant::now()).is_empty());
    a.finish();
}
