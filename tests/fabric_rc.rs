//! RC transport between two HCAs: segmentation, loss, reordering and
//! duplication, RNR NAKs, retry-exceeded and RNR-retry-exceeded errors,
//! receiving through an SRQ.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ipoib_sim::fabric::LinkFaults;
use ipoib_sim::{Fabric, FabricConfig};
use ipoib_tests::node::{Node, RX_BUF, TX_AREA};
use mlx5_driver::cmd::qp::ServiceType;
use mlx5_driver::layout::cqe::{CqeError, opcode};
use mlx5_driver::layout::wqe::Sge;
use mlx5_driver::verbs::{Qp, QpConfig, RcPath, Srq};

/// 3 × RX_BUF per receive: messages up to 12 KiB.
const SGES: usize = 3;
const SLOTS: usize = 10;

struct Conn {
    qp: Qp,
    srq: Srq,
    /// SRQ WQE index -> receive slot.
    slots: std::collections::BTreeMap<u16, usize>,
}

impl Conn {
    fn post(&mut self, n: &Node, slot: usize) {
        let idx = post_slot(n, &mut self.srq, slot);
        self.slots.insert(idx, slot);
    }
}

fn rc_qp(n: &mut Node, srq: &Srq) -> Qp {
    let cfg = QpConfig {
        st: ServiceType::Rc,
        log_sq: 7,
        log_rq: 0,
        rq_sge: 0,
        srq: Some(srq.rmpn()),
        ..QpConfig::ud(1, 0, 0, 0, n.scq.cqn(), n.rcq.cqn())
    };
    Qp::create(&mut n.hca, &cfg).unwrap()
}

fn post_slot(n: &Node, srq: &mut Srq, slot: usize) -> u16 {
    let sges: Vec<Sge> = (0..SGES)
        .map(|k| Sge {
            addr: n.mem.iova_at((slot * SGES + k) * RX_BUF).0,
            len: RX_BUF as u32,
            lkey: n.hca.lkey(),
        })
        .collect();
    srq.post_recv(&sges).unwrap()
}

/// a → b and b → a RC QPs, each receiving on its own node's SRQ.
fn connect(
    a: &mut Node,
    b: &mut Node,
    path: impl Fn(u32, u16) -> RcPath,
    post_b: bool,
) -> (Conn, Conn) {
    let sa = Srq::create(&mut a.hca, 5, SGES as u8, 0).unwrap();
    let sb = Srq::create(&mut b.hca, 5, SGES as u8, 0).unwrap();
    let mut qa = rc_qp(a, &sa);
    let mut qb = rc_qp(b, &sb);
    qa.connect_rc(&mut a.hca, &path(qb.qpn(), b.lid)).unwrap();
    qb.connect_rc(&mut b.hca, &path(qa.qpn(), a.lid)).unwrap();
    let ca = Conn {
        qp: qa,
        srq: sa,
        slots: Default::default(),
    };
    let mut cb = Conn {
        qp: qb,
        srq: sb,
        slots: Default::default(),
    };
    if post_b {
        for s in 0..SLOTS {
            cb.post(b, s);
        }
        cb.srq.ring();
    }
    (ca, cb)
}

fn path(mtu: u8, ack_timeout: u8, retry: u8, rnr: u8) -> impl Fn(u32, u16) -> RcPath {
    move |remote_qpn, dlid| RcPath {
        remote_qpn,
        dlid,
        sl: 0,
        mtu,
        rq_psn: 0x00AB_CDEF & 0xFF_FFF0,
        sq_psn: 0x00AB_CDEF & 0xFF_FFF0,
        min_rnr_nak: 12, // 0.64 ms
        ack_timeout,
        retry_count: retry,
        rnr_retry: rnr,
    }
}

fn message(i: usize) -> Vec<u8> {
    let len = 1 + (i * 1237) % 10_000;
    (0..len).map(|k| (k * 31 + i * 7) as u8).collect()
}

fn send(a: &mut Node, c: &mut Conn, data: &[u8], slot: usize) {
    let off = TX_AREA + (slot % 4) * 12_288;
    a.mem.write(off, data);
    let sge = Sge {
        addr: a.mem.iova_at(off).0,
        len: data.len() as u32,
        lkey: a.hca.lkey(),
    };
    c.qp.post_send_rc(&[sge], true, None).unwrap();
    c.qp.ring_sq(a.hca.transport());
}

fn read_slot(n: &Node, slot: usize, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    n.mem.read(slot * SGES * RX_BUF, &mut v);
    v
}

fn run_stream(fabric: &Fabric, faults: LinkFaults, count: usize) -> (Node, Node, Conn, Conn) {
    let mut a = Node::new(fabric, 0x0002_c903_0000_0a00, 0);
    let mut b = Node::new(fabric, 0x0002_c903_0000_0b00, 0);
    // Path MTU 1024: multi-packet messages.
    let (mut ca, mut cb) = connect(&mut a, &mut b, path(3, 12, 7, 7), true);
    fabric.set_faults(faults);
    for i in 0..count {
        // Four messages in flight at most (the send area has four slots).
        send(&mut a, &mut ca, &message(i), i);
        if i % 4 == 3 || i + 1 == count {
            let want = i % 4 + 1;
            let sc = a.wait_cqes(false, want, Duration::from_secs(20));
            assert_eq!(sc.len(), want, "send completions for batch ending at {i}");
            for c in &sc {
                assert_eq!(c.opcode, opcode::REQ, "{c:?}");
                ca.qp.send_done(c.wqe_counter);
            }
            let rc = b.wait_cqes(true, want, Duration::from_secs(20));
            assert_eq!(rc.len(), want);
            for (k, c) in rc.iter().enumerate() {
                let n = i + 1 - want + k;
                let m = message(n);
                assert_eq!(c.opcode, opcode::RESP_SEND);
                assert_eq!(c.byte_cnt as usize, m.len(), "message {n}");
                let slot = cb.slots.remove(&c.wqe_counter).expect("a WQE we posted");
                assert!(
                    read_slot(&b, slot, m.len()) == m,
                    "message {n} arrived intact and in order"
                );
                cb.srq.recv_done(c.wqe_counter);
                cb.post(&b, slot);
            }
            cb.srq.ring();
        }
    }
    fabric.set_faults(LinkFaults::default());
    (a, b, ca, cb)
}

fn finish(a: Node, b: Node, ca: Conn, cb: Conn) {
    let (mut a, mut b) = (a, b);
    ca.qp.destroy(&mut a.hca).unwrap();
    ca.srq.destroy(&mut a.hca).unwrap();
    cb.qp.destroy(&mut b.hca).unwrap();
    cb.srq.destroy(&mut b.hca).unwrap();
    for n in [a, b] {
        let (r, rep) = n.finish();
        assert!(r.clean(), "{r:?}");
        assert_eq!(rep.mappings, 0);
    }
}

#[test]
fn messages_arrive_complete_and_in_order() {
    let fabric = Fabric::new(FabricConfig::default()).unwrap();
    let (a, b, ca, cb) = run_stream(&fabric, LinkFaults::default(), 24);
    assert_eq!(
        a.dev.report().dp.rc_retransmits,
        0,
        "clean link, no retransmission"
    );
    finish(a, b, ca, cb);
}

#[test]
fn lossy_reordering_duplicating_fabric() {
    let fabric = Fabric::new(FabricConfig {
        seed: 7,
        ..FabricConfig::default()
    })
    .unwrap();
    let faults = LinkFaults {
        loss_ppm: 100_000,
        reorder_ppm: 100_000,
        duplicate_ppm: 50_000,
        corrupt_ppm: 20_000,
    };
    let (a, b, ca, cb) = run_stream(&fabric, faults, 40);
    let st = fabric.stats();
    assert!(
        st.dropped_loss > 0 && st.reordered > 0 && st.duplicated > 0,
        "{st:?}"
    );
    assert!(
        a.dev.report().dp.rc_retransmits > 0,
        "losses were repaired by retransmission"
    );
    finish(a, b, ca, cb);
}

#[test]
fn rnr_nak_then_delivery_when_buffers_come() {
    let fabric = Fabric::new(FabricConfig::default()).unwrap();
    let mut a = Node::new(&fabric, 0x0002_c903_0000_0a00, 0);
    let mut b = Node::new(&fabric, 0x0002_c903_0000_0b00, 0);
    let (mut ca, mut cb) = connect(&mut a, &mut b, path(5, 14, 7, 7), false);
    send(&mut a, &mut ca, b"early bird", 0);
    std::thread::sleep(Duration::from_millis(20));
    assert!(b.dev.report().dp.rx_no_wqe > 0, "RNR NAK sent");
    assert!(
        a.wait_cqes(false, 1, Duration::from_millis(1)).is_empty(),
        "not completed yet"
    );
    cb.post(&b, 0);
    cb.srq.ring();
    let rc = b.wait_cqes(true, 1, Duration::from_secs(2));
    assert_eq!(rc.len(), 1);
    assert_eq!(read_slot(&b, 0, 10), b"early bird");
    let sc = a.wait_cqes(false, 1, Duration::from_secs(2));
    assert_eq!(sc[0].opcode, opcode::REQ);
    ca.qp.send_done(sc[0].wqe_counter);
    cb.srq.recv_done(rc[0].wqe_counter);
    finish(a, b, ca, cb);
}

#[test]
fn rnr_retry_exceeded() {
    let fabric = Fabric::new(FabricConfig::default()).unwrap();
    let mut a = Node::new(&fabric, 0x0002_c903_0000_0a00, 0);
    let mut b = Node::new(&fabric, 0x0002_c903_0000_0b00, 0);
    let (mut ca, cb) = connect(&mut a, &mut b, path(5, 14, 7, 2), false);
    send(&mut a, &mut ca, b"nobody listens", 0);
    let sc = a.wait_cqes(false, 1, Duration::from_secs(2));
    assert_eq!(sc.len(), 1);
    assert_eq!(sc[0].opcode, opcode::REQ_ERR);
    assert_eq!(sc[0].error, Some(CqeError::RnrRetryExceeded));
    finish(a, b, ca, cb);
}

#[test]
fn retry_exceeded_when_the_peer_disappears() {
    let fabric = Fabric::new(FabricConfig::default()).unwrap();
    let mut a = Node::new(&fabric, 0x0002_c903_0000_0a00, 0);
    let mut b = Node::new(&fabric, 0x0002_c903_0000_0b00, 0);
    let (mut ca, cb) = connect(&mut a, &mut b, path(5, 10, 3, 7), true);
    // The peer's cable is pulled: nothing is acknowledged any more.
    fabric.set_link(1, false);
    send(&mut a, &mut ca, b"hello?", 0);
    send(&mut a, &mut ca, b"anyone?", 1);
    let sc = a.wait_cqes(false, 2, Duration::from_secs(3));
    assert_eq!(sc.len(), 2);
    assert_eq!(sc[0].error, Some(CqeError::RetryExceeded));
    assert_eq!(
        sc[1].error,
        Some(CqeError::WrFlushed),
        "the rest is flushed"
    );
    assert!(a.dev.report().dp.rc_retransmits >= 3);
    fabric.set_link(1, true);
    finish(a, b, ca, cb);
}

#[test]
fn issi0_firmware_gets_a_create_srq_srq() {
    let fabric = Fabric::new(FabricConfig::default()).unwrap();
    let old = |guid| ipoib_sim::SimConfig {
        node_guid: guid,
        max_issi: 0,
        ..ipoib_sim::SimConfig::default()
    };
    let mut a = Node::with_config(&fabric, old(0x0002_c903_0000_0a00), 0);
    let mut b = Node::with_config(&fabric, old(0x0002_c903_0000_0b00), 0);
    assert_eq!(a.hca.info().issi, 0, "firmware without ISSI 1");
    let (mut ca, mut cb) = connect(&mut a, &mut b, path(5, 14, 7, 7), true);
    let m = message(3);
    send(&mut a, &mut ca, &m, 0);
    let rc = b.wait_cqes(true, 1, Duration::from_secs(2));
    assert_eq!(rc.len(), 1);
    let slot = cb.slots.remove(&rc[0].wqe_counter).unwrap();
    assert!(read_slot(&b, slot, m.len()) == m);
    cb.srq.recv_done(rc[0].wqe_counter);
    let sc = a.wait_cqes(false, 1, Duration::from_secs(2));
    ca.qp.send_done(sc[0].wqe_counter);
    finish(a, b, ca, cb);
}
