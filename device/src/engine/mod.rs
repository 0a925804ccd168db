//! The IPoIB engine: pure protocol logic, no I/O.
//!
//! Frames and packets go in, frames, packets and actions come out; the
//! clock is passed in by the caller. Everything here is tested without an
//! HCA, a TUN device or a socket (RFC 4391/4392 as Linux `ib_ipoib` behaves).
//!
//! - [`addr`]: the 20-byte IPoIB hardware address.
//! - [`mgid`]: IP multicast group → multicast GID mapping.
//! - [`arp`]: ARP with InfiniBand hardware addresses.
//! - [`nd`]: the IPoIB link-layer address option of IPv6 neighbour discovery.
//! - [`eth`]: Ethernet ⇄ IPoIB translation for guests.
//! - [`resolve`]: resolution caches (neighbours, paths) with packet queueing
//!   and ageing.

pub mod addr;
pub mod arp;
pub mod datagram;
pub mod dhcp;
pub mod eth;
pub mod mgid;
pub mod nd;
pub mod resolve;

/// A 128-bit InfiniBand GID, network byte order.
pub type Gid = [u8; 16];

/// EtherType values carried in the IPoIB header.
pub mod ethertype {
    /// IPv4.
    pub const IPV4: u16 = 0x0800;
    /// ARP.
    pub const ARP: u16 = 0x0806;
    /// RARP.
    pub const RARP: u16 = 0x8035;
    /// IPv6.
    pub const IPV6: u16 = 0x86dd;
    /// TIPC.
    pub const TIPC: u16 = 0x88ca;

    /// Whether Linux `ib_ipoib` transmits this EtherType (others are
    /// dropped at transmit).
    pub fn carried(ty: u16) -> bool {
        matches!(ty, IPV4 | ARP | RARP | IPV6 | TIPC)
    }
}

/// Length of the IPoIB encapsulation header.
pub const IPOIB_HEADER_LEN: usize = 4;

/// Length of the fixed IPv6 header.
pub(crate) const IPV6_HEADER: usize = 40;

/// The big-endian 16 bits at `at`, if `b` is long enough.
pub(crate) fn be16(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at + 2).map(|s| u16::from_be_bytes([s[0], s[1]]))
}

/// The IPv4 address at `at` (unspecified if `b` is too short: callers
/// check lengths first).
pub(crate) fn ipv4_at(b: &[u8], at: usize) -> std::net::Ipv4Addr {
    let mut o = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        o.copy_from_slice(s);
    }
    o.into()
}

/// The IPv6 address at `at` (unspecified if `b` is too short).
pub(crate) fn ipv6_at(b: &[u8], at: usize) -> std::net::Ipv6Addr {
    let mut o = [0u8; 16];
    if let Some(s) = b.get(at..at + 16) {
        o.copy_from_slice(s);
    }
    o.into()
}

/// The Internet checksum (RFC 1071) of the concatenation of `parts`, each
/// of even length but the last (pseudo-headers, headers, payloads).
pub(crate) fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u64 = 0;
    for p in parts {
        for c in p.chunks(2) {
            sum += u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// RFC 1071 verification for tests, written apart from [`checksum`]: the
/// one's-complement sum of `parts`, checksum field included, is all ones.
#[cfg(test)]
pub(crate) fn sum_is_all_ones(parts: &[&[u8]]) -> bool {
    let mut sum: u32 = 0;
    for p in parts {
        for w in p.chunks(2) {
            sum += u32::from(w[0]) << 8 | u32::from(*w.get(1).unwrap_or(&0));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum == 0xffff
}

/// Reads the EtherType of an IPoIB payload, or `None` if the packet is
/// shorter than the header. The reserved half is ignored, as on receive.
pub fn header_type(packet: &[u8]) -> Option<u16> {
    let ty = packet.get(..2)?;
    if packet.len() < IPOIB_HEADER_LEN {
        return None;
    }
    Some(u16::from_be_bytes([ty[0], ty[1]]))
}

/// Writes the IPoIB header for `ty` (reserved bytes zero).
pub fn write_header(buf: &mut [u8; IPOIB_HEADER_LEN], ty: u16) {
    let [hi, lo] = ty.to_be_bytes();
    *buf = [hi, lo, 0, 0];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_reserved_ignored() {
        // RFC 4391 §6: type, then two reserved bytes.
        assert_eq!(header_type(&[0x08, 0x06, 0xab, 0xcd]), Some(ethertype::ARP));
        assert_eq!(header_type(&[0x86, 0xdd, 0]), None);
        let mut h = [0xff; 4];
        write_header(&mut h, ethertype::IPV6);
        assert_eq!(h, [0x86, 0xdd, 0, 0]);
        assert!(ethertype::carried(0x88ca));
        assert!(!ethertype::carried(0x88cc), "LLDP is not carried");
    }
}
