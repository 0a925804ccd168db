//! UD traffic between two HCAs on the in-process fabric: unicast,
//! multicast, Q_Key and P_Key violations, a bad lkey, and a clean teardown.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ipoib_sim::{Fabric, FabricConfig};
use ipoib_tests::node::{Node, RX_BUF, TX_AREA};
use mlx5_driver::layout::cqe::{CqeError, opcode};
use mlx5_driver::layout::wqe::{AddressVector, Grh, Sge};

const QKEY: u32 = 0x0000_0B1B;

fn pair() -> (Fabric, Node, Node) {
    let fabric = Fabric::new(FabricConfig::default()).unwrap();
    let a = Node::new(&fabric, 0x0002_c903_0000_0a00, QKEY);
    let b = Node::new(&fabric, 0x0002_c903_0000_0b00, QKEY);
    (fabric, a, b)
}

/// Joins `mgid` as a full member through the SA; returns the MLID.
fn join(n: &mut Node, mgid: [u8; 16]) -> u16 {
    let mut gsi = mlx5_driver::sa::Gsi::new(&mut n.hca, 1).unwrap();
    let dest = mlx5_driver::sa::MadDest {
        dlid: n.sm_lid,
        dqpn: 1,
        sl: 0,
    };
    let req = mlx5_driver::sa::mc_join(mgid, n.gid, 0xFFFF, mlx5_driver::sa::join::FULL, None);
    let resp = gsi
        .transact(&mut n.hca, req, dest, Duration::from_millis(500), 3)
        .unwrap();
    let r = mlx5_driver::sa::McMemberRecord::parse(&resp[56..]);
    assert_eq!(r.qkey, QKEY, "the broadcast group's Q_Key");
    gsi.destroy(&mut n.hca).unwrap();
    r.mlid
}

fn send(n: &mut Node, av: &AddressVector, payload: &[u8], lkey: Option<u32>) {
    n.mem.write(TX_AREA, payload);
    let sge = Sge {
        addr: n.mem.iova_at(TX_AREA).0,
        len: payload.len() as u32,
        lkey: lkey.unwrap_or(n.hca.lkey()),
    };
    n.qp.post_send_ud(av, &[sge], true).unwrap();
    n.qp.ring_sq(n.hca.transport());
}

#[test]
fn unicast_multicast_and_violations() {
    let (fabric, mut a, mut b) = pair();
    assert_ne!(a.lid, 0);
    assert_ne!(a.lid, b.lid);
    assert_eq!(a.lid, 2, "the SM hands out LIDs from 2");

    // Unicast a -> b.
    let to_b = AddressVector {
        dqpn: b.qp.qpn(),
        qkey: QKEY,
        dlid: b.lid,
        ..AddressVector::default()
    };
    let msg = b"\x08\x00\x00\x00hello over InfiniBand";
    send(&mut a, &to_b, msg, None);
    let sc = a.wait_cqes(false, 1, Duration::from_secs(2));
    assert_eq!(sc.len(), 1);
    assert_eq!(sc[0].opcode, opcode::REQ);
    assert_eq!(sc[0].qpn, a.qp.qpn());
    a.qp.send_done(sc[0].wqe_counter);
    let rc = b.wait_cqes(true, 1, Duration::from_secs(2));
    assert_eq!(rc.len(), 1, "b received");
    let c = rc[0];
    assert_eq!(c.opcode, opcode::RESP_SEND);
    assert_eq!(c.byte_cnt as usize, 40 + msg.len());
    assert_eq!(c.src_qpn(), a.qp.qpn());
    assert_eq!(c.slid, a.lid);
    assert!(!c.grh());
    let mut got = vec![0u8; msg.len()];
    b.mem.read(40, &mut got);
    assert_eq!(&got, msg);
    b.qp.recv_done();

    // Multicast: both join the broadcast group through the SA and attach;
    // a sends; b gets it with a GRH, a does not see its own packet
    // (block_lb_mc).
    let mgid = ipoib_sim::sm::broadcast_mgid(0x7FFF, 2);
    let mlid = join(&mut a, mgid);
    assert_eq!(join(&mut b, mgid), mlid);
    a.qp.attach(&mut a.hca, mgid).unwrap();
    b.qp.attach(&mut b.hca, mgid).unwrap();
    let to_group = AddressVector {
        dqpn: 0xFF_FFFF,
        qkey: QKEY,
        dlid: mlid,
        grh: Some(Grh {
            dgid: mgid,
            hop_limit: 1,
            ..Grh::default()
        }),
        ..AddressVector::default()
    };
    send(&mut a, &to_group, b"\x08\x06\x00\x00arp?", None);
    let sc = a.wait_cqes(false, 1, Duration::from_secs(2));
    a.qp.send_done(sc[0].wqe_counter);
    let rc = b.wait_cqes(true, 1, Duration::from_secs(2));
    assert_eq!(rc.len(), 1);
    assert!(rc[0].grh(), "multicast carries a GRH");
    let mut grh = [0u8; 40];
    b.mem.read(RX_BUF, &mut grh);
    assert_eq!(grh[0] >> 4, 6);
    assert_eq!(&grh[24..40], &mgid, "DGID in the GRH area");
    b.qp.recv_done();
    assert!(
        a.wait_cqes(true, 1, Duration::from_millis(100)).is_empty(),
        "no loopback"
    );
    a.qp.detach(&mut a.hca, mgid).unwrap();
    b.qp.detach(&mut b.hca, mgid).unwrap();

    // Wrong Q_Key: dropped at b and counted.
    let before = b.dev.report();
    send(
        &mut a,
        &AddressVector {
            qkey: 0x1234,
            ..to_b
        },
        b"x",
        None,
    );
    let sc = a.wait_cqes(false, 1, Duration::from_secs(2));
    a.qp.send_done(sc[0].wqe_counter);
    assert!(b.wait_cqes(true, 1, Duration::from_millis(100)).is_empty());
    let after = b.dev.report();
    assert_eq!(after.dp.rx_qkey_drops, before.dp.rx_qkey_drops + 1);

    // Bad lkey: the device's local protection error, QP to ERR.
    send(&mut a, &to_b, b"y", Some(0xDEAD_BE00));
    let sc = a.wait_cqes(false, 1, Duration::from_secs(2));
    assert_eq!(sc.len(), 1);
    assert_eq!(sc[0].opcode, opcode::REQ_ERR);
    assert_eq!(sc[0].error, Some(CqeError::LocalProtection));

    assert_eq!(fabric.stats().dropped_no_route, 0);
    for n in [a, b] {
        let (r, rep) = n.finish();
        assert!(r.clean(), "{r:?}");
        assert_eq!(rep.mappings, 0);
        assert_eq!(rep.objects_alive, 0);
        assert_eq!(rep.fw.objects_at_teardown, 0);
    }
}

/// Waits up to `within` for a completion event on `cqn`; returns when it came.
fn completion_event(n: &mut Node, cqn: u32, within: Duration) -> Option<std::time::Instant> {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        for e in n.hca.poll_events(Duration::from_millis(1)).unwrap() {
            if e == (mlx5_driver::hca::AsyncEvent::Completion { cqn }) {
                return Some(std::time::Instant::now());
            }
        }
    }
    None
}

#[test]
fn cq_events_honour_arming_and_moderation() {
    let (_fabric, mut a, mut b) = pair();
    let to_b = AddressVector {
        dqpn: b.qp.qpn(),
        qkey: QKEY,
        dlid: b.lid,
        ..AddressVector::default()
    };
    let rcq = b.rcq.cqn();
    let burst = |a: &mut Node, n: usize| {
        for _ in 0..n {
            send(a, &to_b, b"\x08\x00\x00\x00x", None);
        }
        let c = a.wait_cqes(false, n, Duration::from_secs(2));
        assert_eq!(c.len(), n);
        for x in c {
            a.qp.send_done(x.wqe_counter);
        }
    };
    let drain = |b: &mut Node, n: usize| {
        let c = b.wait_cqes(true, n, Duration::from_secs(2));
        assert_eq!(c.len(), n);
        for _ in 0..n {
            b.qp.recv_done();
        }
    };

    // Not armed: completions but no event.
    burst(&mut a, 1);
    assert!(completion_event(&mut b, rcq, Duration::from_millis(30)).is_none());
    drain(&mut b, 1);
    // Armed: one event, then disarmed.
    b.rcq.arm(b.hca.transport());
    burst(&mut a, 1);
    assert!(completion_event(&mut b, rcq, Duration::from_secs(1)).is_some());
    b.rcq.event();
    burst(&mut a, 1);
    assert!(
        completion_event(&mut b, rcq, Duration::from_millis(30)).is_none(),
        "fires once per arm"
    );
    drain(&mut b, 2);
    // Arming with completions already pending fires at once.
    burst(&mut a, 1);
    std::thread::sleep(Duration::from_millis(20));
    b.rcq.arm(b.hca.transport());
    assert!(completion_event(&mut b, rcq, Duration::from_secs(1)).is_some());
    b.rcq.event();
    drain(&mut b, 1);

    // Moderation by period (cq_period is 12 bits of µs): the event waits.
    b.rcq.moderate(&mut b.hca, 4000, 0).unwrap();
    b.rcq.arm(b.hca.transport());
    let t0 = std::time::Instant::now();
    burst(&mut a, 1);
    let fired = completion_event(&mut b, rcq, Duration::from_secs(1)).expect("period expires");
    assert!(
        fired - t0 >= Duration::from_micros(3500),
        "held for the period: {:?}",
        fired - t0
    );
    b.rcq.event();
    drain(&mut b, 1);
    // Moderation by count: nothing until the fourth completion.
    b.rcq.moderate(&mut b.hca, 0, 4).unwrap();
    b.rcq.arm(b.hca.transport());
    burst(&mut a, 3);
    assert!(completion_event(&mut b, rcq, Duration::from_millis(50)).is_none());
    burst(&mut a, 1);
    assert!(
        completion_event(&mut b, rcq, Duration::from_secs(1)).is_some(),
        "count reached"
    );
    drain(&mut b, 4);
    for n in [a, b] {
        assert!(n.finish().0.clean());
    }
}

#[test]
fn links_have_latency_and_rate() {
    let fabric = Fabric::new(FabricConfig {
        latency: Duration::from_millis(3),
        rate_gbps: 1,
        ..FabricConfig::default()
    })
    .unwrap();
    let mut a = Node::new(&fabric, 0x0002_c903_0000_0a00, QKEY);
    let mut b = Node::new(&fabric, 0x0002_c903_0000_0b00, QKEY);
    let to_b = AddressVector {
        dqpn: b.qp.qpn(),
        qkey: QKEY,
        dlid: b.lid,
        ..AddressVector::default()
    };
    // Latency: one packet takes at least the link latency.
    let t0 = std::time::Instant::now();
    send(&mut a, &to_b, b"\x08\x00\x00\x00ping", None);
    let rc = b.wait_cqes(true, 1, Duration::from_secs(2));
    assert_eq!(rc.len(), 1);
    assert!(
        t0.elapsed() >= Duration::from_millis(3),
        "{:?}",
        t0.elapsed()
    );
    b.qp.recv_done();
    let sc = a.wait_cqes(false, 1, Duration::from_secs(2));
    a.qp.send_done(sc[0].wqe_counter);
    // Rate: 24 packets of 4000 bytes at 1 Gb/s need 24 × 32 µs on the wire.
    let big = vec![0x45u8; 4000];
    a.mem.write(TX_AREA, &big);
    let sge = Sge {
        addr: a.mem.iova_at(TX_AREA).0,
        len: 4000,
        lkey: a.hca.lkey(),
    };
    let t0 = std::time::Instant::now();
    for _ in 0..24 {
        a.qp.post_send_ud(&to_b, &[sge], true).unwrap();
    }
    a.qp.ring_sq(a.hca.transport());
    let sc = a.wait_cqes(false, 24, Duration::from_secs(2));
    for c in sc {
        a.qp.send_done(c.wqe_counter);
    }
    let rc = b.wait_cqes(true, 24, Duration::from_secs(2));
    assert_eq!(rc.len(), 24);
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(3) + Duration::from_micros(24 * 32),
        "{took:?}"
    );
    for _ in 0..24 {
        b.qp.recv_done();
    }
    for n in [a, b] {
        assert!(n.finish().0.clean());
    }
}

fn ones_complement_ok(data: &[u8], mut acc: u32) -> bool {
    for c in data.chunks(2) {
        acc += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while acc > 0xFFFF {
        acc = (acc & 0xFFFF) + (acc >> 16);
    }
    acc == 0xFFFF
}

/// IPv4 header and TCP checksums of an IPoIB packet are correct.
fn tcp_checksums_ok(p: &[u8]) -> bool {
    let ip = &p[4..24];
    let tcp = &p[24..];
    let mut pseudo = 0u32;
    for c in ip[12..20].chunks(2) {
        pseudo += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    pseudo += 6 + tcp.len() as u32;
    ones_complement_ok(ip, 0) && ones_complement_ok(tcp, pseudo)
}

#[test]
fn checksum_and_lso_offloads() {
    let (_fabric, mut a, mut b) = pair();
    let mut cfg = mlx5_driver::verbs::QpConfig::ud(1, 0, QKEY, 6, a.scq.cqn(), a.rcq.cqn());
    cfg.offload = true;
    let mut oqp = mlx5_driver::verbs::Qp::create(&mut a.hca, &cfg).unwrap();
    oqp.activate_datagram(&mut a.hca).unwrap();
    let to_b = AddressVector {
        dqpn: b.qp.qpn(),
        qkey: QKEY,
        dlid: b.lid,
        ..AddressVector::default()
    };
    // IPoIB + IPv4 + TCP headers with zero checksums.
    let headers = |total: usize| -> Vec<u8> {
        let mut h = vec![0x08, 0x00, 0, 0];
        h.extend_from_slice(&[
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0x12,
            0x34,
            0x40,
            0,
            64,
            6,
            0,
            0,
        ]);
        h.extend_from_slice(&[192, 0, 2, 1, 192, 0, 2, 2]);
        h.extend_from_slice(&[
            0x30, 0x39, 0x00, 0x50, 0, 0, 0x10, 0, 0, 0, 0, 0, 0x50, 0x18, 0xFF, 0xFF, 0, 0, 0, 0,
        ]);
        h
    };
    // Checksum offload.
    let mut pkt = headers(40 + 11);
    pkt.extend_from_slice(b"csum please");
    assert!(!tcp_checksums_ok(&pkt));
    a.mem.write(TX_AREA, &pkt);
    let sge = Sge {
        addr: a.mem.iova_at(TX_AREA).0,
        len: pkt.len() as u32,
        lkey: a.hca.lkey(),
    };
    let off = mlx5_driver::verbs::TxOffload {
        l3_csum: true,
        l4_csum: true,
        lso: None,
    };
    oqp.post_send_ud_offload(&to_b, &[sge], true, &off).unwrap();
    oqp.ring_sq(a.hca.transport());
    let sc = a.wait_cqes(false, 1, Duration::from_secs(2));
    assert_eq!(sc[0].opcode, opcode::REQ);
    oqp.send_done(sc[0].wqe_counter);
    let rc = b.wait_cqes(true, 1, Duration::from_secs(2));
    let mut got = vec![0u8; pkt.len()];
    b.mem.read(40, &mut got);
    assert!(tcp_checksums_ok(&got), "the HCA filled in both checksums");
    assert_eq!(&got[44..], b"csum please");
    assert_eq!(rc.len(), 1);
    b.qp.recv_done();

    // LSO: 5000 bytes of payload, MSS 1448: four packets on the wire.
    let data: Vec<u8> = (0..5000u32).map(|i| (i * 13) as u8).collect();
    a.mem.write(TX_AREA, &data);
    let hdr = headers(40);
    let sge = Sge {
        addr: a.mem.iova_at(TX_AREA).0,
        len: data.len() as u32,
        lkey: a.hca.lkey(),
    };
    let off = mlx5_driver::verbs::TxOffload {
        l3_csum: true,
        l4_csum: true,
        lso: Some((1448, &hdr)),
    };
    oqp.post_send_ud_offload(&to_b, &[sge], true, &off).unwrap();
    oqp.ring_sq(a.hca.transport());
    let sc = a.wait_cqes(false, 1, Duration::from_secs(2));
    assert_eq!(sc.len(), 1, "one completion for the whole LSO WQE");
    oqp.send_done(sc[0].wqe_counter);
    let rc = b.wait_cqes(true, 4, Duration::from_secs(2));
    assert_eq!(rc.len(), 4);
    let mut joined = Vec::new();
    for (k, c) in rc.iter().enumerate() {
        let len = c.byte_cnt as usize - 40;
        let mut p = vec![0u8; len];
        b.mem.read((k + 1) * ipoib_tests::node::RX_BUF + 40, &mut p);
        assert!(tcp_checksums_ok(&p), "segment {k}");
        joined.extend_from_slice(&p[44..]);
        b.qp.recv_done();
    }
    assert_eq!(joined, data);
    oqp.destroy(&mut a.hca).unwrap();
    for n in [a, b] {
        assert!(n.finish().0.clean());
    }
}

#[test]
fn inline_sends() {
    let (_fabric, mut a, mut b) = pair();
    let ah = mlx5_driver::layout::wqe::AddressHandle::new(&AddressVector {
        dqpn: b.qp.qpn(),
        qkey: QKEY,
        dlid: b.lid,
        ..AddressVector::default()
    });
    // 1, 12 (fits beside the 4-byte header), 13 (spills into the next
    // segment) and 256 bytes (the limit) travel inside the WQE.
    let sizes = [1usize, 12, 13, 256];
    for (k, n) in sizes.iter().enumerate() {
        let data: Vec<u8> = (0..*n).map(|i| (i * 3 + k) as u8).collect();
        a.qp.post_send_inline(&ah, &data, true).unwrap();
        a.qp.ring_sq(a.hca.transport());
        let sc = a.wait_cqes(false, 1, Duration::from_secs(2));
        assert_eq!(sc.len(), 1);
        a.qp.send_done(sc[0].wqe_counter);
        let rc = b.wait_cqes(true, 1, Duration::from_secs(2));
        assert_eq!(rc[0].byte_cnt as usize, 40 + n);
        let mut got = vec![0u8; *n];
        b.mem.read(k * ipoib_tests::node::RX_BUF + 40, &mut got);
        assert_eq!(got, data, "{n} inline bytes");
        b.qp.recv_done();
    }
    assert!(a.qp.post_send_inline(&ah, &[0; 257], true).is_err());
    for n in [a, b] {
        assert!(n.finish().0.clean());
    }
}

/// `tx-sink=on`: a send completes as usual (the HCA read its data) but
/// never reaches the wire; QP1's MADs still do (the SA answers a join).
#[test]
fn tx_sink_completes_sends_without_carrying_them() {
    let fabric = Fabric::new(FabricConfig::default()).unwrap();
    let mut a = Node::with_config(
        &fabric,
        ipoib_sim::SimConfig {
            node_guid: 0x0002_c903_0000_0c00,
            faults: vec!["tx-sink=on".parse().unwrap()],
            ..ipoib_sim::SimConfig::default()
        },
        QKEY,
    );
    let mut b = Node::new(&fabric, 0x0002_c903_0000_0d00, QKEY);
    let mgid = ipoib_sim::sm::broadcast_mgid(0x7FFF, 2);
    assert_ne!(join(&mut a, mgid), 0, "MADs go through");
    let to_b = AddressVector {
        dqpn: b.qp.qpn(),
        qkey: QKEY,
        dlid: b.lid,
        ..AddressVector::default()
    };
    let before = fabric.stats().delivered;
    for _ in 0..4 {
        send(&mut a, &to_b, b"\x08\x00\x00\x00sunk", None);
        let sc = a.wait_cqes(false, 1, Duration::from_secs(2));
        assert_eq!(sc.len(), 1);
        assert!(sc[0].error.is_none(), "completed as sent");
        a.qp.send_done(sc[0].wqe_counter);
    }
    assert!(b.wait_cqes(true, 1, Duration::from_millis(200)).is_empty());
    assert_eq!(fabric.stats().delivered, before, "nothing reached the wire");
    assert_eq!(
        a.dev.report().dp.tx_packets,
        4 + 1,
        "the join's MAD and the four sends"
    );
    let (r, _) = a.finish();
    assert!(r.clean());
    let (r, _) = b.finish();
    assert!(r.clean());
}

/// A key bounded to one window (`length64` = 0, as a VM's key will be):
/// the HCA reads what lies inside it and refuses, with a local protection
/// error, a gather entry that reaches past its end.
#[test]
fn bounded_keys_guard_their_window() {
    let (_fabric, mut a, b) = pair();
    let base = a.mem.iova_at(TX_AREA).0;
    let key = a
        .hca
        .exec(&mlx5_driver::cmd::hca::CreatePaMkey {
            pd: a.hca.pd(),
            key_low: 0x33,
            range: Some((base, 64)),
        })
        .unwrap();
    let to_b = AddressVector {
        dqpn: b.qp.qpn(),
        qkey: QKEY,
        dlid: b.lid,
        ..AddressVector::default()
    };
    send(&mut a, &to_b, &[0x08, 0, 0, 0, 1, 2, 3, 4], Some(key));
    let sc = a.wait_cqes(false, 1, Duration::from_secs(2));
    assert!(sc[0].error.is_none(), "inside the window");
    a.qp.send_done(sc[0].wqe_counter);
    send(&mut a, &to_b, &[0u8; 65], Some(key));
    let sc = a.wait_cqes(false, 1, Duration::from_secs(2));
    assert_eq!(
        sc[0].error,
        Some(CqeError::LocalProtection),
        "one byte past it"
    );
    a.hca
        .exec(&mlx5_driver::cmd::hca::DestroyMkey(key >> 8))
        .unwrap();
    let (r, _) = a.finish();
    assert!(r.clean(), "{r:?}");
    let (r, _) = b.finish();
    assert!(r.clean(), "{r:?}");
}

/// Moving a QP with posted receives and an armed CQ to ERR flushes the
/// WQEs, and the flush raises the CQ's event; the command's own
/// completion event must still reach the driver (it once found the EQ
/// disarmed by the CQ's event, whose interrupt the device had not sent,
/// and the driver saw the completion only at its next health poll). The
/// health poll here is 30 s: the command completes on its interrupt.
#[test]
fn moving_a_qp_to_error_completes_on_its_interrupt() {
    use mlx5_driver::Hca;
    use mlx5_driver::verbs::{Cq, Qp, QpConfig};
    use std::sync::Arc;
    use std::time::Instant;
    let fabric = Fabric::new(FabricConfig::default()).unwrap();
    let dev = Arc::new(ipoib_sim::SimHca::new(ipoib_sim::SimConfig {
        node_guid: 0x0002_c903_0000_5a00,
        ..ipoib_sim::SimConfig::default()
    }));
    dev.connect(&fabric);
    let cfg = mlx5_driver::HcaConfig {
        health_interval: Duration::from_secs(30),
        cmd_timeout: Duration::from_secs(60),
        ..ipoib_tests::quick_cfg()
    };
    let mut hca = Hca::bring_up(dev, cfg).unwrap();
    let scq = Cq::create(&mut hca, 6).unwrap();
    let mut rcq = Cq::create(&mut hca, 6).unwrap();
    let mut qp = Qp::create(&mut hca, &QpConfig::ud(1, 0, QKEY, 5, scq.cqn(), rcq.cqn())).unwrap();
    qp.activate_datagram(&mut hca).unwrap();
    let mem = hca.alloc_dma(8 * RX_BUF).unwrap();
    for i in 0..8 {
        let sge = Sge {
            addr: mem.iova_at(i * RX_BUF).0,
            len: RX_BUF as u32,
            lkey: hca.lkey(),
        };
        qp.post_recv(&[sge]).unwrap();
    }
    qp.ring_rq();
    rcq.arm(hca.transport());
    let t = Instant::now();
    qp.to_error(&mut hca).unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "2ERR_QP took {:?}",
        t.elapsed()
    );
    let mut buf = [mlx5_driver::layout::cqe::Cqe::parse(&[0xF0u8; 64]); 16];
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut flushed = 0;
    while flushed < 8 && Instant::now() < deadline {
        let n = rcq.poll(&mut buf);
        for c in &buf[..n] {
            assert_eq!(c.error, Some(CqeError::WrFlushed));
            flushed += 1;
        }
    }
    assert_eq!(flushed, 8, "every posted receive flushed");
    qp.destroy(&mut hca).unwrap();
    scq.destroy(&mut hca).unwrap();
    rcq.destroy(&mut hca).unwrap();
    hca.free_dma(mem).unwrap();
    assert!(hca.shutdown().clean());
}
