//! The IPoIB link-layer address (RFC 4391 §9.1.1, RFC 4755 for the flags).
//!
//! Twenty bytes: one flag byte, the 24-bit UD QPN, and the 16-byte port GID.

use std::fmt;

use super::Gid;

/// Length of an IPoIB hardware address.
pub const HW_ADDR_LEN: usize = 20;

/// QPN used by multicast and broadcast hardware addresses.
pub const MULTICAST_QPN: u32 = 0x00ff_ffff;

/// A 20-byte IPoIB hardware address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HwAddr(pub [u8; HW_ADDR_LEN]);

impl HwAddr {
    /// Flag bit: the owner accepts reliable-connected (connected-mode)
    /// connections.
    pub const FLAG_RC: u8 = 0x80;
    /// Flag bit: unreliable-connected mode (unused by Linux).
    pub const FLAG_UC: u8 = 0x40;

    /// Builds an address from its parts. `qpn` is truncated to 24 bits.
    pub fn new(flags: u8, qpn: u32, gid: Gid) -> Self {
        let mut b = [0u8; HW_ADDR_LEN];
        b[0] = flags;
        b[1..4].copy_from_slice(&qpn.to_be_bytes()[1..]);
        b[4..].copy_from_slice(&gid);
        Self(b)
    }

    /// Reads an address from exactly 20 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }

    /// The flag byte.
    pub fn flags(&self) -> u8 {
        self.0[0]
    }

    /// Whether the owner accepts connected-mode connections.
    pub fn accepts_rc(&self) -> bool {
        self.0[0] & Self::FLAG_RC != 0
    }

    /// The 24-bit QPN.
    pub fn qpn(&self) -> u32 {
        u32::from_be_bytes([0, self.0[1], self.0[2], self.0[3]])
    }

    /// The port GID (bytes 4–19), the key of the path table.
    pub fn gid(&self) -> Gid {
        let mut g = [0u8; 16];
        g.copy_from_slice(&self.0[4..]);
        g
    }

    /// Whether this is a multicast (or broadcast) address: QPN 0xFFFFFF
    /// and a GID starting with 0xFF.
    pub fn is_multicast(&self) -> bool {
        self.qpn() == MULTICAST_QPN && self.0[4] == 0xff
    }

    /// The broadcast address of a partition: QPN 0xFFFFFF, then the IPv4
    /// broadcast MGID `ff1S:401b:PPPP::ffff:ffff` with the full-membership
    /// bit forced into the P_Key.
    pub fn broadcast(pkey: u16, scope: u8) -> Self {
        Self::new(
            0,
            MULTICAST_QPN,
            super::mgid::ipv4(std::net::Ipv4Addr::BROADCAST, pkey, scope),
        )
    }

    /// The IPv6 interface identifier Linux derives from this address
    /// (`addrconf_ifid_infiniband`): the GUID with 0x02 ORed into its
    /// first byte. RFC 4391 toggles that bit instead; the two differ only
    /// for GUIDs that already have it set.
    pub fn ipv6_iid(&self) -> [u8; 8] {
        let mut iid = [0u8; 8];
        iid.copy_from_slice(&self.0[12..]);
        iid[0] |= 0x02;
        iid
    }
}

/// Colon-separated hex, the way iproute2 prints it.
impl fmt::Display for HwAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for HwAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Error parsing the printed form of a hardware address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an IPoIB hardware address (20 colon-separated hex bytes): {0:?}")]
pub struct ParseHwAddrError(String);

impl std::str::FromStr for HwAddr {
    type Err = ParseHwAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseHwAddrError(s.chars().take(80).collect());
        let mut b = [0u8; HW_ADDR_LEN];
        let mut parts = s.split(':');
        for byte in &mut b {
            let p = parts.next().ok_or_else(err)?;
            if p.is_empty() || p.len() > 2 {
                return Err(err());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(Self(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printed_example_from_the_reference() {
        // ipoib.md §3.1: flags 0x80, QPN 0x000149, GID fe80::ec0d:9a03:12:3456.
        let text = "80:00:01:49:fe:80:00:00:00:00:00:00:ec:0d:9a:03:00:12:34:56";
        let a: HwAddr = text.parse().unwrap();
        assert!(a.accepts_rc());
        assert_eq!(a.qpn(), 0x149);
        assert_eq!(
            a.gid(),
            [
                0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0xec, 0x0d, 0x9a, 0x03, 0x00, 0x12, 0x34, 0x56
            ]
        );
        assert_eq!(a.to_string(), text);
        assert_eq!(HwAddr::new(0x80, 0x149, a.gid()), a);
        assert!(!a.is_multicast());
    }

    #[test]
    fn broadcast_address_from_the_reference() {
        // ipoib.md §3.2: 00:ff:ff:ff:ff:12:40:1b:PP:PP:00…00:ff:ff:ff:ff.
        let b = HwAddr::broadcast(0x7fff, 2);
        assert_eq!(
            b.to_string(),
            "00:ff:ff:ff:ff:12:40:1b:ff:ff:00:00:00:00:00:00:ff:ff:ff:ff"
        );
        assert!(b.is_multicast());
        assert_eq!(
            HwAddr::broadcast(0x0001, 2).0[8..10],
            [0x80, 0x01],
            "limited P_Key carries the full bit in the MGID"
        );
    }

    #[test]
    fn ipv6_iid_sets_the_universal_local_bit() {
        let a: HwAddr = "00:00:00:48:fe:80:00:00:00:00:00:00:00:02:c9:03:00:00:00:01"
            .parse()
            .unwrap();
        assert_eq!(a.ipv6_iid(), [0x02, 0x02, 0xc9, 0x03, 0, 0, 0, 1]);
        let set: HwAddr = "00:00:00:48:fe:80:00:00:00:00:00:00:02:02:c9:03:00:00:00:01"
            .parse()
            .unwrap();
        assert_eq!(set.ipv6_iid()[0], 0x02, "set, not toggled");
    }

    #[test]
    fn bad_text_is_an_error() {
        for bad in [
            "",
            "80:00",
            "80:00:01:49:fe:80:00:00:00:00:00:00:ec:0d:9a:03:00:12:34:56:00",
            "80:00:01:49:fe:80:00:00:00:00:00:00:ec:0d:9a:03:00:12:34:5g",
            "800:0:01:49:fe:80:00:00:00:00:00:00:ec:0d:9a:03:00:12:34:56",
        ] {
            assert!(bad.parse::<HwAddr>().is_err(), "{bad}");
        }
        assert!(HwAddr::from_slice(&[0; 19]).is_none());
    }
}
