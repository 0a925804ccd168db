//! IP multicast group → IB multicast GID (RFC 4391 §4, Linux
//! `ip_ib_mc_map` / `ipv6_ib_mc_map`).
//!
//! Byte 0 is 0xFF, byte 1 flags (T bit) and scope, bytes 2–3 the IPoIB
//! signature, bytes 4–5 the P_Key with the full-membership bit set, and the
//! rest carries the group: the low 28 bits of an IPv4 group, or the low 80
//! bits of an IPv6 group. The scope comes from the interface, never from
//! the IPv6 group itself.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::Gid;

/// Link-local scope, the default.
pub const SCOPE_LINK: u8 = 0x2;
/// Site-local scope.
pub const SCOPE_SITE: u8 = 0x5;
/// Organisation-local scope.
pub const SCOPE_ORG: u8 = 0x8;
/// Global scope.
pub const SCOPE_GLOBAL: u8 = 0xe;

const SIGNATURE_V4: u16 = 0x401b;
const SIGNATURE_V6: u16 = 0x601b;
const FLAG_TRANSIENT: u8 = 0x10;
const PKEY_FULL: u16 = 0x8000;

fn prefix(signature: u16, pkey: u16, scope: u8) -> Gid {
    let mut g = [0u8; 16];
    g[0] = 0xff;
    g[1] = FLAG_TRANSIENT | (scope & 0x0f);
    g[2..4].copy_from_slice(&signature.to_be_bytes());
    g[4..6].copy_from_slice(&(pkey | PKEY_FULL).to_be_bytes());
    g
}

/// The MGID of an IPv4 group (or of the limited broadcast, which keeps all
/// 32 bits because it is not a class D address).
pub fn ipv4(group: Ipv4Addr, pkey: u16, scope: u8) -> Gid {
    let mut g = prefix(SIGNATURE_V4, pkey, scope);
    let mut a = group.octets();
    if group != Ipv4Addr::BROADCAST {
        a[0] &= 0x0f;
    }
    g[12..].copy_from_slice(&a);
    g
}

/// The MGID of an IPv6 group: its low 80 bits.
pub fn ipv6(group: Ipv6Addr, pkey: u16, scope: u8) -> Gid {
    let mut g = prefix(SIGNATURE_V6, pkey, scope);
    g[6..].copy_from_slice(&group.octets()[6..]);
    g
}

/// The MGID for any IP multicast or broadcast destination, or `None` if
/// `dst` is unicast.
pub fn for_ip(dst: IpAddr, pkey: u16, scope: u8) -> Option<Gid> {
    match dst {
        IpAddr::V4(a) if a.is_multicast() || a == Ipv4Addr::BROADCAST => Some(ipv4(a, pkey, scope)),
        IpAddr::V6(a) if a.is_multicast() => Some(ipv6(a, pkey, scope)),
        _ => None,
    }
}

/// The IPv6 solicited-node multicast address of `addr` (ff02::1:ffXX:XXXX).
pub fn solicited_node(addr: Ipv6Addr) -> Ipv6Addr {
    let o = addr.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    )
}

/// Formats a GID the way the reference and `ipoib-tool` print MGIDs:
/// eight groups of four hex digits.
pub fn format_gid(g: &Gid) -> String {
    g.chunks(2)
        .map(|c| format!("{:02x}{:02x}", c[0], c[1]))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> String {
        format_gid(&ipv4(s.parse().unwrap(), 0xffff, SCOPE_LINK))
    }

    fn v6(s: &str) -> String {
        format_gid(&ipv6(s.parse().unwrap(), 0xffff, SCOPE_LINK))
    }

    #[test]
    fn examples_of_the_reference() {
        // ipoib.md §5.2 (scope 2, P_Key 0xffff).
        assert_eq!(
            v4("255.255.255.255"),
            "ff12:401b:ffff:0000:0000:0000:ffff:ffff"
        );
        assert_eq!(v4("224.0.0.1"), "ff12:401b:ffff:0000:0000:0000:0000:0001");
        assert_eq!(v4("224.0.0.251"), "ff12:401b:ffff:0000:0000:0000:0000:00fb");
        assert_eq!(v4("239.1.2.3"), "ff12:401b:ffff:0000:0000:0000:0f01:0203");
        assert_eq!(v6("ff02::1"), "ff12:601b:ffff:0000:0000:0000:0000:0001");
        assert_eq!(v6("ff02::2"), "ff12:601b:ffff:0000:0000:0000:0000:0002");
        assert_eq!(
            v6("ff02::1:ff12:3456"),
            "ff12:601b:ffff:0000:0000:0001:ff12:3456"
        );
        assert_eq!(v6("ff05::1:3"), "ff12:601b:ffff:0000:0000:0000:0001:0003");
    }

    #[test]
    fn pkey_and_scope() {
        // A child on 0x8001, and a limited member 0x0001 written as 8001.
        let child = format_gid(&ipv4(Ipv4Addr::BROADCAST, 0x8001, SCOPE_LINK));
        assert_eq!(child, "ff12:401b:8001:0000:0000:0000:ffff:ffff");
        assert_eq!(
            ipv4(Ipv4Addr::BROADCAST, 0x0001, SCOPE_LINK)[4..6],
            [0x80, 0x01]
        );
        assert_eq!(
            ipv6("ff02::1".parse().unwrap(), 0xffff, SCOPE_SITE)[1],
            0x15
        );
        // The IPv6 group's own scope is lost: ff02::1:3 and ff05::1:3 collide.
        assert_eq!(v6("ff02::1:3"), v6("ff05::1:3"));
    }

    #[test]
    fn unicast_has_no_mgid() {
        assert_eq!(for_ip("10.0.0.1".parse().unwrap(), 0xffff, 2), None);
        assert_eq!(for_ip("fe80::1".parse().unwrap(), 0xffff, 2), None);
        assert!(for_ip("224.0.0.1".parse().unwrap(), 0xffff, 2).is_some());
    }

    #[test]
    fn solicited_node_address() {
        let a: Ipv6Addr = "fe80::202:c903:12:3456".parse().unwrap();
        assert_eq!(
            solicited_node(a),
            "ff02::1:ff12:3456".parse::<Ipv6Addr>().unwrap()
        );
    }
}
