//! A VM's side through the vhost-user-net backend, with DPDK's testpmd as
//! the frontend (`net_virtio_user`, no hugepages): frames cross the
//! backend, the vNIC's own UD QP and the simulated fabric to a host on the
//! other side, in both directions, and every frame is accounted for in
//! the counters of testpmd, the backend and the peer; testpmd restarts and
//! traffic resumes without the daemon restarting. Root only.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipoib_control::{Command as Ask, Reply, Vm};
use ipoib_sim::FabricConfig;

mod common;
use common::{Daemon, Netns};

/// testpmd's own descriptor ring: frames it counted as sent that may
/// still sit in it when it stops.
const RING: u64 = 256;

/// A running testpmd and what it printed so far.
struct Testpmd {
    child: Child,
    out: Arc<Mutex<String>>,
}

/// Starts testpmd as a virtio-user frontend on `socket` in `mode`, and
/// waits until it forwards (its first statistics report).
fn testpmd(socket: &Path, mode: &str, extra: &[&str]) -> Testpmd {
    let vdev = format!("net_virtio_user0,path={},queues=1", socket.display());
    let mut child = Command::new("dpdk-testpmd")
        .args(["-l", "0,1", "--main-lcore", "0", "--no-pci", "--no-huge"])
        .args(["-m", "256", "--no-shconf", "--vdev", &vdev, "--"])
        .arg(format!("--forward-mode={mode}"))
        .args(["--auto-start", "--stats-period", "1", "--nb-cores=1"])
        .arg("--total-num-mbufs=16384")
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("dpdk-testpmd (Debian dpdk-dev) must be installed; cargo xtask test installs it");
    let stdout = child.stdout.take().unwrap();
    let out = Arc::new(Mutex::new(String::new()));
    let o2 = out.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let mut o = o2.lock().unwrap();
            o.push_str(&line);
            o.push('\n');
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !out.lock().unwrap().contains("Port statistics") {
        assert!(
            Instant::now() < deadline,
            "testpmd did not start forwarding"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Testpmd { child, out }
}

/// SIGINT, then testpmd's accumulated RX and TX packet counts.
fn stop_testpmd(mut t: Testpmd) -> (u64, u64) {
    let _ = Command::new("kill")
        .args(["-INT", &t.child.id().to_string()])
        .status();
    let _ = t.child.wait();
    // The reader thread ends with the pipe; give it the last lines.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !t.out.lock().unwrap().contains("Bye") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = t.out.lock().unwrap().clone();
    let at = text
        .find("Accumulated forward statistics")
        .unwrap_or_else(|| panic!("testpmd printed no totals:\n{text}"));
    let total = |key: &str| -> u64 {
        let s = &text[at..];
        let i = s.find(key).unwrap_or_else(|| panic!("no {key} in\n{s}")) + key.len();
        s[i..]
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap()
    };
    (total("RX-packets:"), total("TX-packets:"))
}

fn vm(d: &Daemon) -> Vm {
    let Reply::Vms { mut vms } = d.ask(Ask::Vms {
        interface: "ib0".into(),
    }) else {
        panic!("vms");
    };
    assert_eq!(vms.len(), 1);
    vms.remove(0)
}

fn counter(counters: &[ipoib_control::Counter], name: &str) -> u64 {
    counters
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no counter {name}"))
        .value
}

/// Waits until a frontend is connected with its queues ready (or gone).
fn wait_connected(d: &Daemon, connected: bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while (vm(d).connected && vm(d).ready) != connected {
        assert!(Instant::now() < deadline, "frontend connected: {connected}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// UDP datagrams the kernel of `ns` got for closed ports.
fn udp_no_ports(ns: &Netns) -> u64 {
    let out = ns.exec(&["cat", "/proc/net/snmp"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    let i = names
        .split_whitespace()
        .position(|n| n == "NoPorts")
        .unwrap();
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

#[test]
fn testpmd_frontend_exchanges_frames_with_a_remote_host_and_restarts() {
    let dir = std::env::temp_dir().join(format!("ipoib-vhost-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("fabric.sock");
    let fabric = common::serve_fabric(FabricConfig::default(), &socket);
    let vm_sock = dir.join("vm.sock");
    let spec = format!("ib0={}", vm_sock.display());

    let (na, nb) = (Netns::new("vha"), Netns::new("vhb"));
    let a = Daemon::start(&socket, &na, &["198.18.0.2/24"]);
    let b = Daemon::start_with(&socket, &nb, &["198.18.0.3/24"], &["--vhost-user", &spec]);
    let before = vm(&b);
    assert!(!before.connected);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&vm_sock).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "only the daemon's user may attach a VM"
    );
    assert_ne!(before.qpn, 0);

    // Host a broadcasts to the subnet: the frames reach testpmd through
    // the vNIC's QP (joined to the broadcast group) and the backend.
    let rx = testpmd(&vm_sock, "rxonly", &[]);
    wait_connected(&b, true);
    let v = vm(&b);
    for f in ["version_1", "mrg_rxbuf"] {
        assert!(v.features.iter().any(|x| x == f), "{f} in {:?}", v.features);
    }
    let out = na.exec(&[
        "ping",
        "-b",
        "-I",
        "ib0",
        "-c",
        "20",
        "-i",
        "0.05",
        "-W",
        "1",
        "198.18.0.255",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("20 packets transmitted"),
        "{out:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let (got, _) = stop_testpmd(rx);
    wait_connected(&b, false);
    let v = vm(&b);
    let delivered = counter(&v.counters, "guest_rx_frames");
    let nonzero: Vec<_> = v.counters.iter().filter(|c| c.value > 0).collect();
    // Every broadcast reached the vNIC's QP; each was written to testpmd or
    // counted as dropped (its receive ring still filling just after start).
    let no_buffers = counter(&v.counters, "guest_rx_no_buffers");
    assert_eq!(counter(&v.counters, "rx_packets"), 20, "{nonzero:?}");
    assert_eq!(delivered + no_buffers, 20, "{nonzero:?}");
    assert!(
        got >= 10,
        "testpmd received {got} frames; backend {nonzero:?}"
    );
    assert_eq!(got, delivered, "testpmd counted what the backend wrote");
    // The HCA wrote them straight into testpmd's buffers.
    assert_eq!(
        counter(&v.counters, "guest_rx_lent"),
        delivered,
        "{nonzero:?}"
    );
    assert_eq!(
        counter(&v.counters, "rx_zero_copy"),
        delivered,
        "{nonzero:?}"
    );

    // testpmd again, now sending IPv4/UDP to 198.18.0.2 (Ethernet
    // broadcast: the broadcast group); host a's kernel receives them.
    let udp_before = udp_no_ports(&na);
    let tx = testpmd(
        &vm_sock,
        "txonly",
        &[
            "--txpkts=64",
            "--eth-peer=0,ff:ff:ff:ff:ff:ff",
            "--tx-ip=198.18.0.1,198.18.0.2",
        ],
    );
    wait_connected(&b, true);
    std::thread::sleep(Duration::from_secs(3));
    let (_, sent) = stop_testpmd(tx);
    wait_connected(&b, false);
    std::thread::sleep(Duration::from_millis(500));
    let v = vm(&b);
    assert_eq!(counter(&v.counters, "connections"), 2);
    let taken = counter(&v.counters, "guest_tx_frames");
    assert!(
        taken <= sent && taken + RING >= sent,
        "backend took {taken} of the {sent} frames testpmd sent"
    );
    // Every frame taken went out on the vNIC's QP (none was refused).
    assert_eq!(counter(&v.counters, "tx_packets"), taken);
    assert_eq!(counter(&v.counters, "drop_spoofed_mac"), 0);
    let udp = udp_no_ports(&na) - udp_before;
    let Reply::Stats { counters } = a.ask(Ask::Stats {
        interface: "ib0".into(),
    }) else {
        panic!("stats");
    };
    let a_delivered = counter(&counters, "rx_delivered");
    assert!(udp > 1000, "host a got {udp} of the guest's datagrams");
    assert!(
        udp <= taken,
        "no more arrived ({udp}) than were sent ({taken})"
    );
    assert!(a_delivered >= udp);
    assert_eq!(counter(&v.counters, "guest_tx_lent"), 0, "64 bytes: copied");

    // Zero copy: 1000-byte datagrams are lent, the HCA sending them from
    // testpmd's memory (mapped at the vNIC's window), and still reach
    // host a's kernel.
    let udp_before = udp_no_ports(&na);
    let (taken_before, sent_before) = (taken, counter(&v.counters, "tx_packets"));
    let tx = testpmd(
        &vm_sock,
        "txonly",
        &[
            "--txpkts=1000",
            "--eth-peer=0,ff:ff:ff:ff:ff:ff",
            "--tx-ip=198.18.0.1,198.18.0.2",
        ],
    );
    wait_connected(&b, true);
    assert!(vm(&b).zero_copy, "testpmd's memory is mapped for the HCA");
    std::thread::sleep(Duration::from_secs(3));
    let (_, sent) = stop_testpmd(tx);
    wait_connected(&b, false);
    std::thread::sleep(Duration::from_millis(500));
    let v = vm(&b);
    assert!(!v.zero_copy, "the window went with the frontend");
    let taken = counter(&v.counters, "guest_tx_frames") - taken_before;
    let lent = counter(&v.counters, "guest_tx_lent");
    let nonzero: Vec<_> = v.counters.iter().filter(|c| c.value > 0).collect();
    assert!(
        taken <= sent && taken + RING >= sent,
        "backend took {taken} of the {sent} frames testpmd sent"
    );
    assert_eq!(lent, taken, "every 1000-byte frame was lent: {nonzero:?}");
    assert_eq!(counter(&v.counters, "tx_zero_copy"), lent, "{nonzero:?}");
    assert_eq!(counter(&v.counters, "tx_packets") - sent_before, taken);
    assert_eq!(counter(&v.counters, "tx_errors"), 0, "{nonzero:?}");
    let udp = udp_no_ports(&na) - udp_before;
    assert!(udp > 1000, "host a got {udp} of the guest's datagrams");
    assert!(udp <= taken);

    assert!(a.stop(), "host a stopped cleanly");
    assert!(
        b.stop(),
        "host b stopped cleanly: every HCA object of the vNIC came back"
    );
    assert!(!vm_sock.exists(), "the vhost-user socket is removed");
    drop(fabric);
    std::fs::remove_dir_all(&dir).unwrap();
}
