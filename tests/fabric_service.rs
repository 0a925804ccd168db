//! HCAs plugged into the fabric service over its socket: the same scenario
//! as in-process, through the wire protocol of `ipoib_sim::remote`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use ipoib_sim::remote::{kind, write_frame};
use ipoib_sim::{Fabric, FabricConfig};
use ipoib_tests::node::{Node, TX_AREA};
use mlx5_driver::layout::wqe::{AddressVector, Sge};

#[test]
fn ud_between_hcas_through_the_socket() {
    let dir = std::env::temp_dir().join(format!("ipoib-fabsvc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("fabric.sock");
    let fabric = Fabric::new(FabricConfig::default()).unwrap();
    let listener = UnixListener::bind(&sock).unwrap();
    let f2 = fabric.clone();
    std::thread::spawn(move || ipoib_sim::remote::serve(&f2, &listener));

    // A misbehaving client is disconnected; the service carries on.
    let mut bad = UnixStream::connect(&sock).unwrap();
    write_frame(&mut bad, kind::PACKET, &[0xFF; 10]).unwrap();
    let mut worse = UnixStream::connect(&sock).unwrap();
    std::io::Write::write_all(&mut worse, &[0xFF, 0xFF, 0xFF, 0xFF, 1, 2]).unwrap();

    let mut a = Node::new_remote(&sock, 0x0002_c903_0000_0a00, 0x0B1B);
    let mut b = Node::new_remote(&sock, 0x0002_c903_0000_0b00, 0x0B1B);
    assert_eq!(a.sm_lid, 1);
    assert_ne!(a.lid, b.lid);
    let msg = b"\x08\x00\x00\x00across processes";
    a.mem.write(TX_AREA, msg);
    let sge = Sge {
        addr: a.mem.iova_at(TX_AREA).0,
        len: msg.len() as u32,
        lkey: a.hca.lkey(),
    };
    let av = AddressVector {
        dqpn: b.qp.qpn(),
        qkey: 0x0B1B,
        dlid: b.lid,
        ..AddressVector::default()
    };
    a.qp.post_send_ud(&av, &[sge], true).unwrap();
    a.qp.ring_sq(a.hca.transport());
    let sc = a.wait_cqes(false, 1, Duration::from_secs(2));
    assert_eq!(sc.len(), 1);
    a.qp.send_done(sc[0].wqe_counter);
    let rc = b.wait_cqes(true, 1, Duration::from_secs(2));
    assert_eq!(rc.len(), 1);
    let mut got = vec![0u8; msg.len()];
    b.mem.read(40, &mut got);
    assert_eq!(&got, msg);
    b.qp.recv_done();
    for n in [a, b] {
        assert!(n.finish().0.clean());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
