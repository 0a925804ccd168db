//! `ipoib-vfio run` end to end: daemons on software HCAs, plugged into a
//! simulated fabric, with their host interfaces in network namespaces
//! this test creates and removes; real ping and iperf3 between them.
//! Root only (CI runs as root).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ipoib_sim::FabricConfig;

mod common;
use common::{Daemon, Netns};

fn ping(ns: &Netns, dst: &str, size: usize) -> bool {
    let v6 = dst.contains(':');
    let size = size.to_string();
    let mut args = vec!["ping", "-c", "1", "-W", "3", "-s", &size];
    if v6 {
        args.insert(1, "-6");
    }
    args.push(dst);
    ns.exec(&args).status.success()
}

/// Pings until one gets through or `limit` passes.
fn ping_within(ns: &Netns, dst: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if ping(ns, dst, 56) {
            return true;
        }
    }
    false
}

fn iperf(server_ns: &Netns, client_ns: &Netns, dst: &str, udp: bool) -> u64 {
    let mut server = Command::new("ip")
        .args(["netns", "exec", &server_ns.0, "iperf3", "-s", "-1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 must be installed (cargo xtask test installs it)");
    std::thread::sleep(Duration::from_millis(500));
    // Rates capped so the capture stays small enough to decode quickly.
    let mut args = vec!["iperf3", "-c", dst, "-t", "2", "-J", "-b", "20M"];
    if udp {
        args.extend(["-u", "-l", "1400"]);
    }
    let out = client_ns.exec(&args);
    let _ = server.kill();
    let _ = server.wait();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let end = &v["end"];
    let bytes = if udp {
        end["sum"]["bytes"].as_u64()
    } else {
        end["sum_received"]["bytes"].as_u64()
    };
    bytes.unwrap_or(0)
}

#[test]
fn two_hosts_then_a_third_through_sm_restart_and_port_bounce() {
    let dir = std::env::temp_dir().join(format!("ipoib-daemon-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("fabric.sock");
    let pcap = dir.join("fabric.pcap");
    let fabric = common::serve_fabric(
        FabricConfig {
            pcap: Some(pcap.clone()),
            ..FabricConfig::default()
        },
        &socket,
    );

    let (na, nb, nc) = (Netns::new("a"), Netns::new("b"), Netns::new("c"));
    let a = Daemon::start(&socket, &na, &["10.20.0.1/24", "fd00:20::1/64"]);
    let b = Daemon::start(&socket, &nb, &["10.20.0.2/24", "fd00:20::2/64"]);

    // ARP and ND resolve; every size up to 60000 bytes (IP fragments over
    // the 2044-byte MTU) gets through, both ways.
    for size in [1, 56, 1000, 2016, 2017, 4000, 60000] {
        assert!(ping(&na, "10.20.0.2", size), "IPv4 ping of {size} bytes");
    }
    assert!(ping(&nb, "10.20.0.1", 1400), "IPv4 ping back");
    for size in [1, 56, 1952, 8000, 60000] {
        assert!(ping(&na, "fd00:20::2", size), "IPv6 ping of {size} bytes");
    }

    // iperf3 TCP and UDP move data.
    let tcp = iperf(&nb, &na, "10.20.0.2", false);
    assert!(tcp > 100_000, "TCP transferred {tcp} bytes");
    let udp = iperf(&nb, &na, "10.20.0.2", true);
    assert!(udp > 100_000, "UDP transferred {udp} bytes");

    // ipoib-tool's view matches the traffic.
    use ipoib_control::{Command as Ask, Reply};
    let Reply::Interfaces { interfaces } = a.ask(Ask::Show { interface: None }) else {
        panic!("show");
    };
    assert_eq!(interfaces.len(), 1);
    let ia = &interfaces[0];
    assert_eq!(
        (ia.name.as_str(), ia.mode.as_str(), ia.state.as_str()),
        ("ib0", "datagram", "up")
    );
    assert_eq!(ia.mtu, 2044);
    assert_eq!(ia.pkey, 0xffff);
    assert!(ia.hw_addr.starts_with("80:"), "{}", ia.hw_addr);
    let Reply::Stats { counters } = a.ask(Ask::Stats {
        interface: "ib0".into(),
    }) else {
        panic!("stats");
    };
    let get = |n: &str| {
        counters
            .iter()
            .find(|c| c.name == n)
            .map(|c| c.value)
            .unwrap()
    };
    assert!(get("tx_packets") > 1000, "iperf3 went out: {counters:?}");
    assert!(get("rx_delivered") > 100);
    assert!(
        get("tx_lso") > 0,
        "TCP went out as TSO segments cut by the HCA"
    );
    assert_eq!(get("tx_bad_offload"), 0);
    assert_eq!(get("tx_errors") + get("rx_errors"), 0);
    let Reply::Neigh { neighbours } = a.ask(Ask::Neigh {
        interface: "ib0".into(),
    }) else {
        panic!("neigh");
    };
    let b_entry = neighbours
        .iter()
        .find(|n| n.ip == "10.20.0.2")
        .expect("b in a's table");
    let Reply::Interfaces { interfaces: ib } = b.ask(Ask::Show {
        interface: Some("ib0".into()),
    }) else {
        panic!("show b");
    };
    assert_eq!(b_entry.hw_addr.as_deref(), Some(ib[0].hw_addr.as_str()));
    assert!(neighbours.iter().any(|n| n.ip == "fd00:20::2"));
    let Reply::Mcg { groups } = a.ask(Ask::Mcg {
        interface: "ib0".into(),
    }) else {
        panic!("mcg");
    };
    assert!(
        groups
            .iter()
            .any(|g| g.mgid == "ff12:401b:ffff:0000:0000:0000:ffff:ffff"
                && g.joined
                && !g.send_only)
    );
    // The host side's MTU raised past the group's: the oversized packet is
    // dropped and counted, and the interface keeps working.
    assert!(
        na.exec(&["ip", "link", "set", "ib0", "mtu", "4000"])
            .status
            .success()
    );
    assert!(
        !na.exec(&[
            "ping",
            "-c",
            "1",
            "-W",
            "2",
            "-M",
            "do",
            "-s",
            "3000",
            "10.20.0.2"
        ])
        .status
        .success()
    );
    assert!(
        na.exec(&["ip", "link", "set", "ib0", "mtu", "2044"])
            .status
            .success()
    );
    let Reply::Stats { counters } = a.ask(Ask::Stats {
        interface: "ib0".into(),
    }) else {
        panic!("stats");
    };
    let too_big = counters
        .iter()
        .find(|c| c.name == "tx_too_big")
        .map(|c| c.value);
    assert_eq!(too_big, Some(1), "{counters:?}");
    assert!(ping(&na, "10.20.0.2", 1400), "still working");

    // A bad request changes nothing and gets a clear error.
    match a.ask(Ask::Stats {
        interface: "ib9".into(),
    }) {
        Reply::Error { message } => assert!(message.contains("ib9"), "{message}"),
        r => panic!("{r:?}"),
    }

    // A third host joining later is reachable.
    // (This one is configured by a file.)
    let c = Daemon::start_from_file(&socket, &nc, &["10.20.0.3/24"]);
    assert!(ping_within(&na, "10.20.0.3", Duration::from_secs(10)));

    // After an SM restart (client reregister: rejoin, flush paths) traffic
    // resumes.
    fabric.restart_sm();
    assert!(
        ping_within(&na, "10.20.0.2", Duration::from_secs(15)),
        "after SM restart"
    );
    // And after b's port goes down and up again.
    fabric.set_link(1, false);
    std::thread::sleep(Duration::from_millis(500));
    fabric.set_link(1, true);
    assert!(
        ping_within(&na, "10.20.0.2", Duration::from_secs(15)),
        "after port bounce"
    );

    // SIGTERM: each daemon leaves its groups and returns every object.
    for d in [a, b, c] {
        assert!(d.stop(), "clean exit after SIGTERM");
    }
    for ns in [&na, &nb, &nc] {
        let out = ns.exec(&["ip", "link", "show", "ib0"]);
        assert!(!out.status.success(), "ib0 left behind in {}", ns.0);
    }
    let members: usize = fabric.groups().iter().map(|g| g.2).sum();
    assert_eq!(
        members,
        0,
        "every membership was left: {:?}",
        fabric.groups()
    );
    fabric.flush();
    check_capture(&pcap);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The scenario's fabric traffic decodes in tshark as IPoIB carrying ARP,
/// IPv4 and IPv6, with no malformed packet and no expert error.
fn check_capture(pcap: &std::path::Path) {
    let tshark = |extra: &[&str]| ipoib_sim::pcap::tshark(pcap, extra).unwrap();
    let protocols = tshark(&["-q", "-z", "io,phs"]);
    for want in ["arp", "ip ", "ipv6", "icmp ", "icmpv6", "tcp", "udp"] {
        assert!(
            protocols.contains(want),
            "{want:?} missing from the capture:\n{protocols}"
        );
    }
    let malformed = tshark(&["-Y", "_ws.malformed", "-T", "fields", "-e", "frame.number"]);
    assert!(malformed.trim().is_empty(), "malformed frames: {malformed}");
    let experts = tshark(&["-q", "-z", "expert,error"]);
    assert!(!experts.contains("Error"), "expert errors:\n{experts}");
}
