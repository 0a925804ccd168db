//! A QEMU guest (TCG; virtio-net-pci with INTx, `vectors=0`) whose NIC is
//! attached to the vhost-user backend: from inside the guest, IPv4 and
//! IPv6 pings to a host on the other side of the simulated fabric (ARP and
//! ND resolved through the Ethernet ⇄ IPoIB translation), a ping that
//! fragments over the 2044-byte MTU, a 1 MB TCP download, and a 1 MB
//! upload (host a fetches it from the guest), all zero-copy: the HCA
//! sends the guest's frames from its memory and writes the frames for it
//! into its buffers. The guest
//! is prepared by `cargo xtask test` (QEMU 7.2, a Debian kernel, a
//! busybox initramfs; see xtask/src/qemu.rs) and found through
//! `IPOIB_QEMU_GUEST`. Root only.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Stdio};

use ipoib_control::{Command as Ask, Reply};
use ipoib_sim::FabricConfig;

mod common;
use common::{Daemon, Netns};

const BLOB: usize = 1_000_000;

fn guest_dir() -> PathBuf {
    let dir = std::env::var_os("IPOIB_QEMU_GUEST")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/qemu-guest"));
    assert!(
        dir.join("ready").is_file() && dir.join("boot").is_file(),
        "no QEMU guest in {} (cargo xtask test prepares it; `cargo xtask guest` alone too)",
        dir.display()
    );
    dir
}

#[test]
fn qemu_guest_pings_and_downloads_across_the_fabric() {
    let g = guest_dir();
    let dir = std::env::temp_dir().join(format!("ipoib-qemu-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("www")).unwrap();
    let blob: Vec<u8> = (0..BLOB).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(dir.join("www/blob"), &blob).unwrap();
    // A CGI on host a fetches the guest's file back and says how much
    // came (written beside the boot script).
    std::fs::create_dir_all(dir.join("www/cgi-bin")).unwrap();
    std::fs::copy(g.join("fetch.cgi"), dir.join("www/cgi-bin/fetch")).unwrap();
    let socket = dir.join("fabric.sock");
    let fabric = common::serve_fabric(FabricConfig::default(), &socket);
    let vm_sock = dir.join("vm.sock");
    let spec = format!("ib0={}", vm_sock.display());

    let (na, nb) = (Netns::new("qa"), Netns::new("qb"));
    let a = Daemon::start(&socket, &na, &["198.19.0.2/24", "fd00:56::2/64"]);
    let b = Daemon::start_with(&socket, &nb, &["198.19.0.3/24"], &["--vhost-user", &spec]);
    // Host a serves the file over HTTP (busybox, as the guest's wget).
    let mut httpd = Command::new("ip")
        .args([
            "netns", "exec", &na.0, "busybox", "httpd", "-f", "-p", "8000", "-h",
        ])
        .arg(dir.join("www"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("busybox (busybox-static) must be installed; cargo xtask test installs it");

    // One VM, then another in its place (a VMM restart): the backend
    // serves both without the daemon restarting.
    let first = boot(&g, &vm_sock, "52:54:00:12:34:56");
    check_console(&first);
    let second = boot(&g, &vm_sock, "52:54:00:12:34:57");
    check_console(&second);
    let _ = httpd.kill();
    let _ = httpd.wait();
    // The backend's view after the guests powered off: the last guest's
    // MAC (QEMU's) was learned (its addresses are forgotten with the
    // connection), and the frames they sent went out on the vNIC's QP.
    let Reply::Vms { vms } = b.ask(Ask::Vms {
        interface: "ib0".into(),
    }) else {
        panic!("vms");
    };
    let v = &vms[0];
    assert_eq!(
        v.mac, "52:54:00:12:34:57",
        "the second VM's MAC, learned anew"
    );
    let conns = v
        .counters
        .iter()
        .find(|c| c.name == "connections")
        .map_or(0, |c| c.value);
    assert_eq!(conns, 2);
    assert!(!v.connected);
    assert!(v.addresses.is_empty(), "forgotten with the connection");
    assert!(v.remote_macs >= 1);
    let get = |n: &str| {
        v.counters
            .iter()
            .find(|c| c.name == n)
            .map_or(0, |c| c.value)
    };
    assert_eq!(
        get("guest_tx_frames"),
        get("tx_packets"),
        "{:?}",
        v.counters
    );
    assert!(get("guest_rx_frames") > 2 * BLOB as u64 / 2044);
    // The uploads' data frames were lent and sent from guest memory.
    assert!(
        get("guest_tx_lent") > BLOB as u64 / 65536,
        "{:?}",
        v.counters
    );
    assert_eq!(get("tx_zero_copy"), get("guest_tx_lent"));
    // The downloads were written by the HCA straight into guest buffers.
    assert!(
        get("guest_rx_lent") > BLOB as u64 / 2044,
        "{:?}",
        v.counters
    );
    assert_eq!(get("rx_zero_copy"), get("guest_rx_lent"));
    assert_eq!(get("tx_errors"), 0);
    assert_eq!(get("guest_tx_bad_chains"), 0);
    assert_eq!(get("drop_spoofed_mac") + get("drop_spoofed_ip"), 0);

    assert!(a.stop(), "host a stopped cleanly");
    assert!(b.stop(), "host b stopped cleanly");
    drop(fabric);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Boots the guest with its NIC (MAC `mac`) on `vm_sock`, through the
/// guest directory's `boot` script; returns what it printed on the serial
/// console.
fn boot(g: &std::path::Path, vm_sock: &std::path::Path, mac: &str) -> String {
    let out = Command::new("timeout")
        .arg("150")
        .arg(g.join("boot"))
        .arg(vm_sock)
        .arg(mac)
        .args([
            "ipoib.ip4=198.19.0.9/24",
            "ipoib.ip6=fd00:56::9/64",
            "ipoib.peer4=198.19.0.2",
            "ipoib.peer6=fd00:56::2",
            "ipoib.url=http://198.19.0.2:8000/blob",
            "ipoib.fetch=http://198.19.0.2:8000/cgi-bin/fetch",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("the guest directory's boot script");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What the guest must have managed.
fn check_console(console: &str) {
    for l in console.lines().filter(|l| l.starts_with("GUEST")) {
        eprintln!("[guest] {l}");
    }
    assert!(
        console.contains("GUEST-DONE"),
        "the guest ran to the end:\n{console}"
    );
    assert!(console.contains("GUEST-ETH0 mtu=2044"), "MTU from host_mtu");
    for step in ["GUEST-PING4-OK", "GUEST-PING6-OK", "GUEST-PING-FRAG-OK"] {
        assert!(console.contains(step), "{step}:\n{console}");
    }
    assert!(
        console.contains(&format!("GUEST-TCP bytes={BLOB}")),
        "the whole file over TCP:\n{console}"
    );
    assert!(
        console.contains("GUEST-UPLOAD fetched=1000000"),
        "the guest's file over TCP:\n{console}"
    );
}
