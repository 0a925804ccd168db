//! The host side of an IPoIB interface: a TUN device of link type
//! InfiniBand, configured over rtnetlink inside a network namespace this
//! test creates and removes. Root only (CI runs as root).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use ipoib_netlink::{LinkConfig, Netlink};
mod common;
use common::Netns;
use mlx5_driver::transport::tun::{
    ARPHRD_INFINIBAND, Tun, TunOffloads, VNET_HDR_LEN_MRG, enter_netns,
};

fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b
        .chunks(2)
        .map(|c| u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0)))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP echo request from `src` to `dst`.
fn echo_request(src: Ipv4Addr, dst: Ipv4Addr, id: u16) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&1u16.to_be_bytes());
    icmp.extend_from_slice(b"ipoib-vfio host side");
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 1, 0, 0];
    ip[2..4].copy_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&icmp);
    ip
}

#[test]
fn tun_of_type_infiniband_configured_over_rtnetlink() {
    let ns = Netns::new("tun");
    let path = ns.path();
    // Namespaces are per thread: do the work on a thread that enters it.
    std::thread::spawn(move || {
        enter_netns(&path).unwrap();
        let offloads = TunOffloads {
            csum: true,
            tso4: true,
            tso6: true,
        };
        let tun = Tun::create("ib0", offloads).unwrap();
        assert_eq!(tun.name(), "ib0");
        let nl = Netlink::new().unwrap();
        let before = nl.link("ib0").unwrap();
        assert_eq!(before.link_type, ARPHRD_INFINIBAND);
        assert!(!before.up);

        let addr = Ipv4Addr::new(10, 77, 0, 1);
        let info = nl
            .configure(
                "ib0",
                &LinkConfig {
                    mtu: 2044,
                    addresses: vec![(IpAddr::V4(addr), 24)],
                    up: true,
                },
            )
            .unwrap();
        assert_eq!(info.mtu, 2044, "IPoIB MTU for a 2048-byte IB MTU");
        assert!(info.up);
        assert_eq!(
            info.link_type, ARPHRD_INFINIBAND,
            "type survives configuration"
        );

        // A link-local IPv6 address appears (address generation `random`;
        // with the default `eui64` there would be none).
        let deadline = Instant::now() + Duration::from_secs(5);
        let addrs = loop {
            let a = nl.addresses("ib0").unwrap();
            let ll = a
                .iter()
                .any(|(ip, _)| matches!(ip, IpAddr::V6(v6) if v6.segments()[0] == 0xfe80));
            if ll || Instant::now() > deadline {
                break a;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(addrs.contains(&(IpAddr::V4(addr), 24)), "{addrs:?}");
        assert!(
            addrs.iter().any(|(ip, p)| ip.is_ipv6() && *p == 64),
            "link-local address: {addrs:?}"
        );

        // The data path: the kernel answers a ping written into the TUN
        // device, and the answer comes back out of it, a bare IPv4 packet
        // behind the virtio-net header.
        let peer = Ipv4Addr::new(10, 77, 0, 2);
        let mut frame = vec![0u8; VNET_HDR_LEN_MRG];
        frame.extend_from_slice(&echo_request(peer, addr, 0x4242));
        assert_eq!(tun.send(&frame).unwrap(), frame.len());
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 65536];
        let reply = loop {
            match tun.recv(&mut buf) {
                Ok(n) => {
                    let ip = &buf[VNET_HDR_LEN_MRG..n];
                    // Skip the kernel's own IPv6 chatter (MLD, RS).
                    if ip.first().map(|b| b >> 4) == Some(4) && ip.get(9) == Some(&1) {
                        break ip.to_vec();
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "no echo reply");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("read: {e}"),
            }
        };
        assert_eq!(&reply[12..16], &addr.octets());
        assert_eq!(&reply[16..20], &peer.octets());
        assert_eq!(reply[20], 0, "ICMP echo reply");
        assert_eq!(&reply[24..26], &0x4242u16.to_be_bytes());

        nl.set_up("ib0", false).unwrap();
        assert!(!nl.link("ib0").unwrap().up);
        drop(tun);
        // Closing the last fd of a non-persistent TUN removes it.
        let deadline = Instant::now() + Duration::from_secs(2);
        while nl.link("ib0").is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(matches!(
            nl.link("ib0"),
            Err(ipoib_netlink::NetlinkError::NoSuchLink(_))
        ));
    })
    .join()
    .expect("the namespace thread");
    drop(ns);
}
