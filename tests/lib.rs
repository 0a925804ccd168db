//! Helpers shared by the whole-stack scenarios.
//!
//! Every scenario runs on the software HCA; when `IPOIB_TEST_DEVICE` names
//! a PCI address the hardware variants run against that card too, and
//! report themselves as skipped otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used)]
#![deny(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use ipoib_sim::{Fault, SimConfig, SimHca};
use mlx5_driver::HcaConfig;

/// The PCI address of a card for hardware runs, if any.
pub fn hardware_device() -> Option<String> {
    std::env::var("IPOIB_TEST_DEVICE")
        .ok()
        .filter(|s| !s.is_empty())
}

/// Prints the standard skip line for a hardware test without a card.
pub fn skip_hardware(test: &str) {
    eprintln!("SKIPPED {test}: set IPOIB_TEST_DEVICE=<PCI address> to run it on a card");
}

/// A simulated HCA with the given faults.
pub fn sim(faults: Vec<Fault>) -> Arc<SimHca> {
    Arc::new(SimHca::new(SimConfig {
        faults,
        ..SimConfig::default()
    }))
}

/// Driver settings with short timeouts, so fault tests finish quickly.
pub fn quick_cfg() -> HcaConfig {
    HcaConfig {
        fw_ready_timeout: Duration::from_secs(2),
        cmd_timeout: Duration::from_millis(300),
        health_interval: Duration::from_millis(20),
        reclaim_timeout: Duration::from_millis(500),
        ..HcaConfig::default()
    }
}

/// One HCA on a fabric with a UD QP, its CQs and a buffer for payloads.
pub mod node {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use ipoib_sim::{Fabric, SimConfig, SimHca};
    use mlx5_driver::Hca;
    use mlx5_driver::layout::cqe::Cqe;
    use mlx5_driver::layout::smp::{PortInfo, PortState, attr};
    use mlx5_driver::transport::DmaBuffer;
    use mlx5_driver::verbs::{Cq, Qp, QpConfig};

    /// Receive buffer size: GRH area + 4 KiB MTU.
    pub const RX_BUF: usize = 40 + 4096;
    /// Receive buffers per node.
    pub const RX_BUFS: usize = 32;

    /// An HCA with one UD QP.
    #[derive(Debug)]
    pub struct Node {
        /// The device.
        pub dev: Arc<SimHca>,
        /// The driver.
        pub hca: Hca<Arc<SimHca>>,
        /// Send CQ.
        pub scq: Cq,
        /// Receive CQ.
        pub rcq: Cq,
        /// The UD QP.
        pub qp: Qp,
        /// Receive buffers (RX_BUFS × RX_BUF), then a 64 KiB send area.
        pub mem: DmaBuffer,
        /// LID the SM assigned.
        pub lid: u16,
        /// Port GID 0.
        pub gid: [u8; 16],
        /// SM LID.
        pub sm_lid: u16,
    }

    /// Offset of the send area in `mem`.
    pub const TX_AREA: usize = RX_BUFS * RX_BUF;

    impl Node {
        /// Brings up an HCA on `fabric` and waits for its port to be Active.
        pub fn new(fabric: &Fabric, guid: u64, qkey: u32) -> Node {
            let dev = Arc::new(SimHca::new(SimConfig {
                node_guid: guid,
                ..SimConfig::default()
            }));
            dev.connect(fabric);
            Node::bring_up(dev, qkey)
        }

        /// Brings up an HCA built from `cfg` on `fabric`.
        pub fn with_config(fabric: &Fabric, cfg: SimConfig, qkey: u32) -> Node {
            let dev = Arc::new(SimHca::new(cfg));
            dev.connect(fabric);
            Node::bring_up(dev, qkey)
        }

        /// Brings up an HCA plugged into the fabric service at `socket`.
        pub fn new_remote(socket: &std::path::Path, guid: u64, qkey: u32) -> Node {
            let dev = Arc::new(SimHca::new(SimConfig {
                node_guid: guid,
                ..SimConfig::default()
            }));
            dev.connect_remote(socket)
                .expect("connect to the fabric service");
            Node::bring_up(dev, qkey)
        }

        fn bring_up(dev: Arc<SimHca>, qkey: u32) -> Node {
            let mut hca = Hca::bring_up(dev.clone(), crate::quick_cfg()).expect("bring-up");
            // The SM may have activated the port before the EQ existed, so
            // look at the port itself, and serve events while waiting.
            let deadline = Instant::now() + Duration::from_secs(5);
            let pi = loop {
                let pi = PortInfo::parse(&hca.smp(1, attr::PORT_INFO, 1).expect("PortInfo"));
                if pi.state == PortState::Active || Instant::now() > deadline {
                    break pi;
                }
                hca.poll_events(Duration::from_millis(10)).expect("events");
            };
            assert_eq!(pi.state, PortState::Active, "port never became Active");
            let scq = Cq::create(&mut hca, 6).expect("send CQ");
            let rcq = Cq::create(&mut hca, 6).expect("recv CQ");
            let mut qp = Qp::create(&mut hca, &QpConfig::ud(1, 0, qkey, 6, scq.cqn(), rcq.cqn()))
                .expect("UD QP");
            qp.activate_datagram(&mut hca).expect("RTS");
            let mem = hca.alloc_dma(TX_AREA + 65536).expect("buffers");
            let guids = hca.smp(1, attr::GUID_INFO, 0).expect("GUIDInfo");
            let mut gid = [0u8; 16];
            gid[..8].copy_from_slice(&pi.gid_prefix.to_be_bytes());
            gid[8..].copy_from_slice(
                &mlx5_driver::layout::smp::guid_info_entry(&guids, 0).to_be_bytes(),
            );
            let mut n = Node {
                dev,
                hca,
                scq,
                rcq,
                qp,
                mem,
                lid: pi.lid,
                gid,
                sm_lid: pi.sm_lid,
            };
            for i in 0..RX_BUFS {
                n.post_rx(i);
            }
            n.qp.ring_rq();
            n
        }

        /// Posts receive buffer `i`.
        pub fn post_rx(&mut self, i: usize) {
            let sge = mlx5_driver::layout::wqe::Sge {
                addr: self.mem.iova_at(i * RX_BUF).0,
                len: RX_BUF as u32,
                lkey: self.hca.lkey(),
            };
            self.qp.post_recv(&[sge]).expect("post_recv");
        }

        /// Waits for up to `n` completions on `which` (true = receive CQ).
        pub fn wait_cqes(&mut self, recv: bool, n: usize, timeout: Duration) -> Vec<Cqe> {
            let deadline = Instant::now() + timeout;
            let mut got = Vec::new();
            let mut buf = [Cqe::parse(&[0xF0u8; 64]); 16];
            while got.len() < n && Instant::now() < deadline {
                let cq = if recv { &mut self.rcq } else { &mut self.scq };
                let k = cq.poll(&mut buf);
                got.extend_from_slice(&buf[..k]);
                if k == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            got
        }

        /// Tears everything down and returns whether it all came back.
        pub fn finish(self) -> (mlx5_driver::hca::TeardownReport, ipoib_sim::SimReport) {
            let Node {
                dev,
                mut hca,
                scq,
                rcq,
                qp,
                mem,
                ..
            } = self;
            qp.destroy(&mut hca).expect("destroy QP");
            scq.destroy(&mut hca).expect("destroy CQ");
            rcq.destroy(&mut hca).expect("destroy CQ");
            hca.free_dma(mem).expect("free");
            let r = hca.shutdown();
            (r, dev.report())
        }
    }
}
