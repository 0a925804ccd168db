//! UD send plus receive through the driver on the in-process fabric.
//!
//! Each round posts `batch` sends with one doorbell, reaps the send and
//! receive completions in batches, and re-posts the receive buffers with one
//! record update: the datapath as the IPoIB engine will drive it. Prints
//! packets per second. `cargo xtask bench` also runs it under callgrind to
//! count the driver's own instructions per packet (the software HCA and the
//! fabric excluded).
//!
//! Usage: ud_pps [--packets N] [--batch B] [--size BYTES]

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use ipoib_sim::{Fabric, FabricConfig};
use ipoib_tests::node::{Node, RX_BUFS, TX_AREA};
use mlx5_driver::layout::cqe::Cqe;
use mlx5_driver::layout::wqe::{AddressHandle, AddressVector, Sge};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The measured loop; a separate function so profilers can find it.
#[inline(never)]
fn datapath_round(
    a: &mut Node,
    b: &mut Node,
    ah: &AddressHandle,
    sge: Sge,
    batch: usize,
    cqes: &mut [Cqe],
) -> usize {
    // Only the last send of a batch asks for a CQE: its completion
    // implies the earlier ones (§7.2).
    for k in 0..batch {
        a.qp.post_send_ah(ah, &[sge], k + 1 == batch)
            .expect("SQ room");
    }
    a.qp.ring_sq(a.hca.transport());
    let mut sent = 0usize;
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while (sent == 0 || got < batch) && Instant::now() < deadline {
        let n = a.scq.poll(&mut cqes[..batch]);
        for c in &cqes[..n] {
            a.qp.send_done(c.wqe_counter);
        }
        sent += n;
        let n = b.rcq.poll(&mut cqes[..batch]);
        for _ in 0..n {
            b.qp.recv_done();
        }
        for k in 0..n {
            b.post_rx((got + k) % RX_BUFS);
        }
        if n > 0 {
            b.qp.ring_rq();
        }
        got += n;
        if n == 0 {
            std::thread::sleep(Duration::from_micros(20));
        }
    }
    got
}

fn main() {
    let packets = arg("--packets", 200_000);
    let batch = arg("--batch", 32).clamp(1, 32);
    let size = arg("--size", 2044).clamp(1, 4092);
    let fabric = Fabric::new(FabricConfig::default()).unwrap();
    let mut a = Node::new(&fabric, 0x0002_c903_0000_0a00, 0x0B1B);
    let mut b = Node::new(&fabric, 0x0002_c903_0000_0b00, 0x0B1B);
    let av = AddressVector {
        dqpn: b.qp.qpn(),
        qkey: 0x0B1B,
        dlid: b.lid,
        ..AddressVector::default()
    };
    a.mem.write(TX_AREA, &vec![0x5A; size]);
    let sge = Sge {
        addr: a.mem.iova_at(TX_AREA).0,
        len: size as u32,
        lkey: a.hca.lkey(),
    };
    let ah = AddressHandle::new(&av);
    let mut cqes = [Cqe::parse(&[0xF0; 64]); 32];
    // Warm up.
    let warm = datapath_round(&mut a, &mut b, &ah, sge, batch, &mut cqes);
    let t0 = Instant::now();
    let mut done = 0;
    while done < packets {
        let n = datapath_round(&mut a, &mut b, &ah, sge, batch, &mut cqes);
        assert!(n == batch, "lost packets: {n} of {batch}");
        done += n;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "ud_pps: {done} packets of {size} bytes, batch {batch}: {:.0} packets/s ({:.2} Gb/s of payload)",
        done as f64 / secs,
        done as f64 * size as f64 * 8.0 / secs / 1e9
    );
    // Every packet that went through the profiled function, for callgrind.
    println!("ud_pps: measured_packets={}", done + warm);
    for n in [a, b] {
        assert!(n.finish().0.clean());
    }
}
