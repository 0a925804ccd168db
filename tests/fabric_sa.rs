//! SA transactions, port events, partitions and captures on the in-process
//! fabric.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use ipoib_sim::fabric::LinkFaults;
use ipoib_sim::sm::{broadcast_mgid, parse_partitions};
use ipoib_sim::{Fabric, FabricConfig};
use ipoib_tests::node::{Node, TX_AREA};
use mlx5_driver::hca::AsyncEvent;
use mlx5_driver::layout::eqe::PortChange;
use mlx5_driver::layout::wqe::{AddressVector, Grh, Sge};
use mlx5_driver::sa::{
    self, Gsi, MadDest, McMemberRecord, PathRecord, SaError, join, mc_join, mc_leave, path_query,
};

const QKEY: u32 = 0x0B1B;

fn sa_dest(n: &Node) -> MadDest {
    MadDest {
        dlid: n.sm_lid,
        dqpn: 1,
        sl: 0,
    }
}

fn transact(n: &mut Node, gsi: &mut Gsi, mad: [u8; 256]) -> Result<[u8; 256], SaError> {
    let d = sa_dest(n);
    gsi.transact(&mut n.hca, mad, d, Duration::from_millis(300), 3)
}

fn wait_event(n: &mut Node, want: PortChange) -> bool {
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        for e in n.hca.poll_events(Duration::from_millis(10)).unwrap() {
            if e == (AsyncEvent::Port {
                port: 1,
                change: want,
            }) {
                return true;
            }
        }
    }
    false
}

#[test]
fn path_record_and_multicast_membership() {
    let fabric = Fabric::new(FabricConfig::default()).unwrap();
    let mut a = Node::new(&fabric, 0x0002_c903_0000_0a00, QKEY);
    let b = Node::new(&fabric, 0x0002_c903_0000_0b00, QKEY);
    let mut gsi = Gsi::new(&mut a.hca, 1).unwrap();
    let agid = a.gid;
    assert_eq!(a.sm_lid, 1);

    // PathRecord to b.
    let resp = transact(&mut a, &mut gsi, path_query(agid, b.gid, 0xFFFF, 0)).unwrap();
    assert_eq!(resp[3], 0x81, "GetResp");
    let p = PathRecord::parse(&resp[sa::SA_DATA..]);
    assert_eq!(p.dlid, b.lid);
    assert_eq!(p.slid, a.lid);
    assert_eq!(p.dgid, b.gid);
    assert_eq!(p.sgid, a.gid);
    assert_eq!((p.mtu_selector, p.mtu), (2, 5), "fabric MTU 4096");
    assert_eq!(p.pkey & 0x7FFF, 0x7FFF);
    assert!(p.reversible);

    // An unknown GID has no path.
    let mut nobody = b.gid;
    nobody[15] ^= 0x55;
    match transact(&mut a, &mut gsi, path_query(agid, nobody, 0xFFFF, 0)) {
        Err(SaError::Status { status: 0x0300, .. }) => {}
        other => panic!("{other:?}"),
    }

    // The broadcast group exists (the SM made it): a plain join works and
    // returns its parameters as OpenSM sets them.
    let bcast = broadcast_mgid(0x7FFF, 2);
    let resp = transact(
        &mut a,
        &mut gsi,
        mc_join(bcast, agid, 0xFFFF, join::FULL, None),
    )
    .unwrap();
    let g = McMemberRecord::parse(&resp[sa::SA_DATA..]);
    assert_eq!(g.qkey, 0x0B1B);
    assert_eq!(g.mlid, 0xC000);
    assert_eq!((g.mtu_selector, g.mtu), (2, 4));
    assert_eq!((g.rate_selector, g.rate), (2, 3));
    assert_eq!(g.sl, 0);
    assert_eq!(g.scope, 2);
    assert_eq!(g.join_state, join::FULL);

    // Another group without parameters cannot be created ...
    let mut other = bcast;
    other[2] = 0x60; // IPv6 signature
    other[15] = 0x01; // ff02::1
    other[12..15].fill(0);
    match transact(
        &mut a,
        &mut gsi,
        mc_join(other, agid, 0xFFFF, join::FULL, None),
    ) {
        Err(SaError::Status { status: 0x0600, .. }) => {}
        r => panic!("{r:?}"),
    }
    // ... but with the broadcast group's parameters it is.
    let resp = transact(
        &mut a,
        &mut gsi,
        mc_join(other, agid, 0xFFFF, join::FULL, Some(&g)),
    )
    .unwrap();
    let o = McMemberRecord::parse(&resp[sa::SA_DATA..]);
    assert_ne!(o.mlid, g.mlid);
    assert_eq!(o.qkey, g.qkey);
    assert_eq!(fabric.groups().len(), 2);
    // Leave removes the client-made group; the broadcast group stays.
    transact(&mut a, &mut gsi, mc_leave(other, agid, join::FULL)).unwrap();
    transact(&mut a, &mut gsi, mc_leave(bcast, agid, join::FULL)).unwrap();
    let groups = fabric.groups();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].2, 0, "no members left");
    // Leaving again is refused.
    assert!(transact(&mut a, &mut gsi, mc_leave(bcast, agid, join::FULL)).is_err());
    // Joining as someone else is refused.
    assert!(
        transact(
            &mut a,
            &mut gsi,
            mc_join(bcast, b.gid, 0xFFFF, join::FULL, None)
        )
        .is_err()
    );

    assert_eq!(gsi.agent.outstanding(), 0);
    gsi.destroy(&mut a.hca).unwrap();
    for n in [a, b] {
        let (r, rep) = n.finish();
        assert!(r.clean(), "{r:?}");
        assert_eq!(rep.mappings, 0);
    }
}

#[test]
fn sa_requests_retry_through_loss() {
    let fabric = Fabric::new(FabricConfig::default()).unwrap();
    let mut a = Node::new(&fabric, 0x0002_c903_0000_0a00, QKEY);
    let b = Node::new(&fabric, 0x0002_c903_0000_0b00, QKEY);
    let mut gsi = Gsi::new(&mut a.hca, 1).unwrap();
    fabric.set_faults(LinkFaults {
        loss_ppm: 400_000,
        ..LinkFaults::default()
    });
    let d = sa_dest(&a);
    let mut ok = 0;
    for _ in 0..10 {
        let r = gsi.transact(
            &mut a.hca,
            path_query(a.gid, b.gid, 0xFFFF, 0),
            d,
            Duration::from_millis(50),
            10,
        );
        if r.is_ok() {
            ok += 1;
        }
    }
    assert_eq!(ok, 10, "every query got through with retries");
    assert!(gsi.agent.retries > 0, "loss forced retransmissions");
    assert!(fabric.stats().dropped_loss > 0);
    fabric.set_faults(LinkFaults::default());
    // With the SM unreachable (link down), a query times out.
    fabric.set_link(0, false);
    assert!(wait_event(&mut a, PortChange::Down));
    match gsi.transact(
        &mut a.hca,
        path_query(a.gid, b.gid, 0xFFFF, 0),
        d,
        Duration::from_millis(20),
        2,
    ) {
        Err(SaError::Timeout { attr: 0x0035 }) => {}
        r => panic!("{r:?}"),
    }
    fabric.set_link(0, true);
    assert!(wait_event(&mut a, PortChange::Active));
    gsi.destroy(&mut a.hca).unwrap();
    for n in [a, b] {
        assert!(n.finish().0.clean());
    }
}

#[test]
fn port_events_reach_the_driver() {
    let fabric = Fabric::new(FabricConfig::default()).unwrap();
    let mut a = Node::new(&fabric, 0x0002_c903_0000_0a00, QKEY);
    // The SM took the port through the IB states in order.
    assert_eq!(
        a.dev.report().port_states,
        vec![1, 2, 3, 4],
        "DOWN, INIT, ARMED, ACTIVE"
    );
    // Link flap.
    fabric.set_link(0, false);
    assert!(wait_event(&mut a, PortChange::Down));
    fabric.set_link(0, true);
    assert!(wait_event(&mut a, PortChange::Active));
    // LID reassignment.
    fabric.set_lid(0, 0x77);
    assert!(wait_event(&mut a, PortChange::LidChange));
    let pi = mlx5_driver::layout::smp::PortInfo::parse(
        &a.hca
            .smp(1, mlx5_driver::layout::smp::attr::PORT_INFO, 1)
            .unwrap(),
    );
    assert_eq!(pi.lid, 0x77);
    // SM restart: client reregister.
    fabric.restart_sm();
    assert!(wait_event(&mut a, PortChange::ClientReregister));
    // New partitions: P_Key table change.
    fabric.set_partitions(
        parse_partitions("Default=0x7fff, ipoib : ALL=full ; p1=0x8001, ipoib : ALL=full ;")
            .unwrap(),
    );
    assert!(wait_event(&mut a, PortChange::PkeyChange));
    let m = a
        .hca
        .smp(1, mlx5_driver::layout::smp::attr::PKEY_TABLE, 0)
        .unwrap();
    let t = mlx5_driver::layout::smp::pkey_block(&m);
    assert_eq!(&t[..3], &[0xFFFF, 0x8001, 0]);
    assert!(a.finish().0.clean());
}

#[test]
fn pkey_violations_are_dropped_and_counted() {
    let parts =
        parse_partitions("Default=0x7fff, ipoib : ALL=full ; lim=0x0002 : ALL=limited ;").unwrap();
    let fabric = Fabric::new(FabricConfig {
        partitions: parts,
        ..FabricConfig::default()
    })
    .unwrap();
    let mut a = Node::new(&fabric, 0x0002_c903_0000_0a00, QKEY);
    let mut b = Node::new(&fabric, 0x0002_c903_0000_0b00, QKEY);
    // Both limited members of 0x0002: the switch drops what a sends on it.
    let mut qp_lim = mlx5_driver::verbs::Qp::create(
        &mut a.hca,
        &mlx5_driver::verbs::QpConfig::ud(1, 1, QKEY, 4, a.scq.cqn(), a.rcq.cqn()),
    )
    .unwrap();
    qp_lim.activate_datagram(&mut a.hca).unwrap();
    a.mem.write(TX_AREA, b"limited");
    let sge = Sge {
        addr: a.mem.iova_at(TX_AREA).0,
        len: 7,
        lkey: a.hca.lkey(),
    };
    let to_b = AddressVector {
        dqpn: b.qp.qpn(),
        qkey: QKEY,
        dlid: b.lid,
        ..AddressVector::default()
    };
    let before = fabric.stats().dropped_pkey;
    qp_lim.post_send_ud(&to_b, &[sge], true).unwrap();
    qp_lim.ring_sq(a.hca.transport());
    let c = a.wait_cqes(false, 1, Duration::from_secs(2));
    qp_lim.send_done(c[0].wqe_counter);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        fabric.stats().dropped_pkey,
        before + 1,
        "limited to limited is refused"
    );

    // Default partition packet to b's QP bound to 0x0002: the switch lets
    // it through (b holds 0xFFFF), b's HCA drops it and counts a violation.
    let mut b_lim = mlx5_driver::verbs::Qp::create(
        &mut b.hca,
        &mlx5_driver::verbs::QpConfig::ud(1, 1, QKEY, 4, b.scq.cqn(), b.rcq.cqn()),
    )
    .unwrap();
    b_lim.activate_datagram(&mut b.hca).unwrap();
    let to_b_lim = AddressVector {
        dqpn: b_lim.qpn(),
        ..to_b
    };
    a.qp.post_send_ud(&to_b_lim, &[sge], true).unwrap();
    a.qp.ring_sq(a.hca.transport());
    let c = a.wait_cqes(false, 1, Duration::from_secs(2));
    a.qp.send_done(c[0].wqe_counter);
    std::thread::sleep(Duration::from_millis(50));
    let rep = b.dev.report();
    assert_eq!(rep.dp.rx_pkey_drops, 1);
    assert_eq!(rep.pkey_violations, 1);
    let pi = mlx5_driver::layout::smp::PortInfo::parse(
        &b.hca
            .smp(1, mlx5_driver::layout::smp::attr::PORT_INFO, 1)
            .unwrap(),
    );
    assert_eq!(pi.pkey_violations, 1, "PortInfo reports the violation");

    qp_lim.destroy(&mut a.hca).unwrap();
    b_lim.destroy(&mut b.hca).unwrap();
    for n in [a, b] {
        assert!(n.finish().0.clean());
    }
}

/// Traffic (UD unicast, multicast, SA MADs) captured to pcap decodes in
/// tshark as InfiniBand without malformed packets or expert errors.
#[test]
fn capture_decodes_in_tshark() {
    let dir = std::env::temp_dir().join(format!("ipoib-pcap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("fabric.pcap");
    let fabric = Fabric::new(FabricConfig {
        pcap: Some(path.clone()),
        ..FabricConfig::default()
    })
    .unwrap();
    let mut a = Node::new(&fabric, 0x0002_c903_0000_0a00, QKEY);
    let mut b = Node::new(&fabric, 0x0002_c903_0000_0b00, QKEY);
    let mut gsi = Gsi::new(&mut a.hca, 1).unwrap();
    let agid = a.gid;
    let bcast = broadcast_mgid(0x7FFF, 2);
    let resp = transact(
        &mut a,
        &mut gsi,
        mc_join(bcast, agid, 0xFFFF, join::FULL, None),
    )
    .unwrap();
    let g = McMemberRecord::parse(&resp[sa::SA_DATA..]);
    transact(&mut a, &mut gsi, path_query(agid, b.gid, 0xFFFF, 0)).unwrap();
    // IPv4 ICMP echo in IPoIB, unicast, then an ARP to the broadcast group.
    let ping: Vec<u8> = {
        let mut p = vec![0x08, 0x00, 0x00, 0x00];
        let mut ip = vec![
            0x45, 0, 0, 28, 0, 1, 0, 0, 64, 1, 0, 0, 192, 0, 2, 1, 192, 0, 2, 2,
        ];
        let mut c = 0u32;
        for w in ip.chunks(2) {
            c += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        while c > 0xFFFF {
            c = (c & 0xFFFF) + (c >> 16);
        }
        let ck = !(c as u16);
        ip[10..12].copy_from_slice(&ck.to_be_bytes());
        p.extend_from_slice(&ip);
        let mut icmp = vec![8, 0, 0, 0, 0, 1, 0, 1];
        let mut c = 0u32;
        for w in icmp.chunks(2) {
            c += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        let ck = !(c as u16);
        icmp[2..4].copy_from_slice(&ck.to_be_bytes());
        p.extend_from_slice(&icmp);
        p
    };
    let arp: Vec<u8> = {
        let mut p = vec![0x08, 0x06, 0x00, 0x00];
        p.extend_from_slice(&[0x00, 0x20, 0x08, 0x00, 20, 4, 0x00, 0x01]);
        p.extend_from_slice(&a.qp.qpn().to_be_bytes());
        p.extend_from_slice(&a.gid);
        p.extend_from_slice(&[192, 0, 2, 1]);
        p.extend_from_slice(&[0; 20]);
        p.extend_from_slice(&[192, 0, 2, 2]);
        p
    };
    for (payload, av) in [
        (
            &ping,
            AddressVector {
                dqpn: b.qp.qpn(),
                qkey: QKEY,
                dlid: b.lid,
                ..AddressVector::default()
            },
        ),
        (
            &arp,
            AddressVector {
                dqpn: 0xFF_FFFF,
                qkey: g.qkey,
                dlid: g.mlid,
                grh: Some(Grh {
                    dgid: bcast,
                    ..Grh::default()
                }),
                ..AddressVector::default()
            },
        ),
    ] {
        a.mem.write(TX_AREA, payload);
        let sge = Sge {
            addr: a.mem.iova_at(TX_AREA).0,
            len: payload.len() as u32,
            lkey: a.hca.lkey(),
        };
        a.qp.post_send_ud(&av, &[sge], true).unwrap();
        a.qp.ring_sq(a.hca.transport());
        let c = a.wait_cqes(false, 1, Duration::from_secs(2));
        a.qp.send_done(c[0].wqe_counter);
    }
    let _ = b.wait_cqes(true, 1, Duration::from_secs(2));
    gsi.destroy(&mut a.hca).unwrap();
    fabric.flush();
    let captured = fabric.stats().captured;
    assert!(captured >= 6, "{captured} packets captured");

    let text = ipoib_sim::pcap::tshark(&path, &["-V"]).unwrap();
    assert!(!text.contains("Malformed"), "malformed packet:\n{text}");
    assert!(text.contains("Local Route Header"));
    assert!(text.contains("Base Transport Header"));
    assert!(text.contains("DETH - Datagram Extended Transport Header"));
    assert!(
        text.contains("Internet Control Message Protocol"),
        "ICMP over IPoIB decoded"
    );
    assert!(
        text.contains("Address Resolution Protocol"),
        "ARP over IPoIB decoded"
    );
    assert!(text.contains("SubnAdm"), "SA MADs decoded:\n{text}");
    assert!(text.contains("MCMemberRecord"), "MCMemberRecord decoded");
    assert!(text.contains("PathRecord"), "PathRecord decoded");
    let e = ipoib_sim::pcap::tshark(&path, &["-q", "-z", "expert,error"]).unwrap();
    assert!(!e.contains("Error"), "expert errors:\n{e}");
    let f = ipoib_sim::pcap::tshark(&path, &["-T", "fields", "-e", "frame.protocols"]).unwrap();
    assert_eq!(f.lines().count() as u64, captured);
    assert!(f.lines().all(|l| l.contains("infiniband")), "{f}");
    for n in [a, b] {
        assert!(n.finish().0.clean());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn send_only_members_send_but_do_not_receive() {
    let fabric = Fabric::new(FabricConfig::default()).unwrap();
    let mut a = Node::new(&fabric, 0x0002_c903_0000_0a00, QKEY);
    let mut b = Node::new(&fabric, 0x0002_c903_0000_0b00, QKEY);
    let mut ga = Gsi::new(&mut a.hca, 1).unwrap();
    let mut gb = Gsi::new(&mut b.hca, 1).unwrap();
    let (agid, bgid) = (a.gid, b.gid);
    let bcast = broadcast_mgid(0x7FFF, 2);
    let resp = transact(
        &mut a,
        &mut ga,
        mc_join(bcast, agid, 0xFFFF, join::FULL, None),
    )
    .unwrap();
    let params = McMemberRecord::parse(&resp[sa::SA_DATA..]);
    // a only sends to 239.1.2.3: a send-only full join creates the group.
    let mut group = bcast;
    group[12..].copy_from_slice(&[0x0f, 0x01, 0x02, 0x03]);
    let r = transact(
        &mut a,
        &mut ga,
        mc_join(group, agid, 0xFFFF, join::SEND_ONLY_FULL, Some(&params)),
    )
    .unwrap();
    let g = McMemberRecord::parse(&r[sa::SA_DATA..]);
    assert_eq!(g.join_state, join::SEND_ONLY_FULL);
    // b listens.
    transact(
        &mut b,
        &mut gb,
        mc_join(group, bgid, 0xFFFF, join::FULL, Some(&params)),
    )
    .unwrap();
    a.qp.attach(&mut a.hca, group).unwrap();
    b.qp.attach(&mut b.hca, group).unwrap();
    let send = |n: &mut Node| {
        let av = AddressVector {
            dqpn: 0xFF_FFFF,
            qkey: g.qkey,
            dlid: g.mlid,
            grh: Some(Grh {
                dgid: group,
                ..Grh::default()
            }),
            ..AddressVector::default()
        };
        n.mem.write(TX_AREA, b"\x08\x00\x00\x00m");
        let sge = Sge {
            addr: n.mem.iova_at(TX_AREA).0,
            len: 5,
            lkey: n.hca.lkey(),
        };
        n.qp.post_send_ud(&av, &[sge], true).unwrap();
        n.qp.ring_sq(n.hca.transport());
        let c = n.wait_cqes(false, 1, Duration::from_secs(2));
        n.qp.send_done(c[0].wqe_counter);
    };
    send(&mut a);
    assert_eq!(
        b.wait_cqes(true, 1, Duration::from_secs(2)).len(),
        1,
        "the listener gets it"
    );
    b.qp.recv_done();
    send(&mut b);
    assert!(
        a.wait_cqes(true, 1, Duration::from_millis(100)).is_empty(),
        "send-only members are not forwarded to"
    );
    a.qp.detach(&mut a.hca, group).unwrap();
    b.qp.detach(&mut b.hca, group).unwrap();
    ga.destroy(&mut a.hca).unwrap();
    gb.destroy(&mut b.hca).unwrap();
    for n in [a, b] {
        assert!(n.finish().0.clean());
    }
}
