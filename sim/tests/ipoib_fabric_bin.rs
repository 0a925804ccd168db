//! The `ipoib-fabric` program: serves a fabric, its SM activates a remote
//! HCA's port, its SA answers, its capture records the traffic, and a
//! second instance on the same socket is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipoib_sim::{SimConfig, SimHca};
use mlx5_driver::layout::smp::{PortInfo, PortState, attr, guid_info_entry};
use mlx5_driver::sa::{Gsi, MadDest, PathRecord, SA_DATA, path_query};
use mlx5_driver::{Hca, HcaConfig};

struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serves_activates_answers_and_captures() {
    let dir = std::env::temp_dir().join(format!("ipoib-fabric-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("f.sock");
    let pcap = dir.join("f.pcap");
    let child = Command::new(env!("CARGO_BIN_EXE_ipoib-fabric"))
        .arg("--socket")
        .arg(&sock)
        .arg("--pcap")
        .arg(&pcap)
        .args(["--mtu", "2048"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let _guard = Guard(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "fabric never listened");
        std::thread::sleep(Duration::from_millis(20));
    }

    // A second fabric on the same socket is refused.
    let second = Command::new(env!("CARGO_BIN_EXE_ipoib-fabric"))
        .arg("--socket")
        .arg(&sock)
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("in use"));

    let dev = Arc::new(SimHca::new(SimConfig::default()));
    dev.connect_remote(&sock).unwrap();
    let mut hca = Hca::bring_up(dev, HcaConfig::default()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let pi = loop {
        let pi = PortInfo::parse(&hca.smp(1, attr::PORT_INFO, 1).unwrap());
        if pi.state == PortState::Active || Instant::now() > deadline {
            break pi;
        }
        hca.poll_events(Duration::from_millis(10)).unwrap();
    };
    assert_eq!(pi.state, PortState::Active);
    assert_eq!(pi.sm_lid, 1);
    assert_eq!(pi.lid, 2);
    assert_eq!(pi.active_mtu, 4, "the fabric's 2048-byte MTU");

    // The SA answers a PathRecord query to ourselves.
    let mut gid = [0u8; 16];
    gid[..8].copy_from_slice(&pi.gid_prefix.to_be_bytes());
    gid[8..].copy_from_slice(
        &guid_info_entry(&hca.smp(1, attr::GUID_INFO, 0).unwrap(), 0).to_be_bytes(),
    );
    let mut gsi = Gsi::new(&mut hca, 1).unwrap();
    let resp = gsi
        .transact(
            &mut hca,
            path_query(gid, gid, 0xFFFF, 0),
            MadDest {
                dlid: 1,
                dqpn: 1,
                sl: 0,
            },
            Duration::from_millis(500),
            3,
        )
        .unwrap();
    assert_eq!(PathRecord::parse(&resp[SA_DATA..]).dlid, 2);
    gsi.destroy(&mut hca).unwrap();
    assert!(hca.shutdown().clean());

    // The capture holds the request and the answer (flushed every 100 ms).
    std::thread::sleep(Duration::from_millis(300));
    let len = std::fs::metadata(&pcap).unwrap().len();
    assert!(len >= 24 + 2 * (16 + 290), "capture of {len} bytes");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_partitions_file_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("ipoib-fabric-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let parts = dir.join("partitions.conf");
    std::fs::write(
        &parts,
        "Default=0x7fff, ipoib : ALL=full ;\nbroken=0x8001 ALL ;\n",
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_ipoib-fabric"))
        .arg("--socket")
        .arg(dir.join("s"))
        .arg("--partitions")
        .arg(&parts)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("partitions line 2"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
