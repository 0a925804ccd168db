//! IPv6 neighbour discovery over IPoIB (RFC 4861 with RFC 4391 §9.1.2).
//!
//! Only the link-layer address option differs from Ethernet: type, length
//! 3 (24 bytes), two zero pad bytes, then the 20-byte IPoIB address.

use std::net::Ipv6Addr;

use super::addr::{HW_ADDR_LEN, HwAddr};

/// ICMPv6 Neighbor Solicitation.
pub const NEIGHBOR_SOLICIT: u8 = 135;
/// ICMPv6 Neighbor Advertisement.
pub const NEIGHBOR_ADVERT: u8 = 136;
/// Source link-layer address option.
pub const OPT_SOURCE_LLA: u8 = 1;
/// Target link-layer address option.
pub const OPT_TARGET_LLA: u8 = 2;
/// Length of the IPoIB link-layer address option.
pub const LLA_OPTION_LEN: usize = 24;
/// NA flags: router, solicited, override.
pub const NA_ROUTER: u8 = 0x80;
/// Solicited flag.
pub const NA_SOLICITED: u8 = 0x40;
/// Override flag.
pub const NA_OVERRIDE: u8 = 0x20;
/// ICMPv6 next-header value.
pub const NEXT_HEADER_ICMPV6: u8 = 58;

/// Length of an NS or NA carrying one link-layer address option.
pub const MESSAGE_LEN: usize = 24 + LLA_OPTION_LEN;

/// Why an ND message was not accepted; each is a counted drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NdError {
    /// Shorter than the fixed part.
    #[error("neighbour discovery message of {0} bytes is too short")]
    Truncated(usize),
    /// An option with length 0 or running past the end (RFC 4861 §4.6:
    /// discard the packet).
    #[error("malformed neighbour discovery option at offset {0}")]
    BadOption(usize),
    /// A link-layer address option whose length is not the IPoIB one.
    #[error("link-layer address option of {0} bytes is not an IPoIB address")]
    NotIpoib(usize),
    /// Not an NS or NA.
    #[error("ICMPv6 type {0} is not neighbour solicitation or advertisement")]
    NotNeighbor(u8),
}

/// An NS or NA, with the link-layer address option it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Neighbor {
    /// [`NEIGHBOR_SOLICIT`] or [`NEIGHBOR_ADVERT`].
    pub kind: u8,
    /// NA flags (R, S, O); zero for NS.
    pub flags: u8,
    /// The target address.
    pub target: Ipv6Addr,
    /// Source LLA of an NS, target LLA of an NA.
    pub lla: Option<HwAddr>,
}

/// Finds the link-layer address option of type `ty` in `options`.
pub fn find_lla(options: &[u8], ty: u8) -> Result<Option<HwAddr>, NdError> {
    let mut at = 0;
    let mut found = None;
    while at < options.len() {
        let len = options
            .get(at + 1)
            .map(|&l| usize::from(l) * 8)
            .ok_or(NdError::BadOption(at))?;
        if len == 0 || at + len > options.len() {
            return Err(NdError::BadOption(at));
        }
        if options[at] == ty && found.is_none() {
            if len != LLA_OPTION_LEN {
                return Err(NdError::NotIpoib(len));
            }
            found = HwAddr::from_slice(&options[at + 4..at + 4 + HW_ADDR_LEN]);
        }
        at += len;
    }
    Ok(found)
}

/// Writes an IPoIB link-layer address option.
pub fn write_lla(out: &mut [u8; LLA_OPTION_LEN], ty: u8, addr: HwAddr) {
    out[0] = ty;
    out[1] = (LLA_OPTION_LEN / 8) as u8;
    out[2] = 0;
    out[3] = 0;
    out[4..].copy_from_slice(&addr.0);
}

impl Neighbor {
    /// Parses an ICMPv6 NS or NA (starting at the ICMPv6 type). The
    /// checksum is the IP layer's business and is not checked here.
    pub fn parse(icmp: &[u8]) -> Result<Self, NdError> {
        if icmp.len() < 24 {
            return Err(NdError::Truncated(icmp.len()));
        }
        let kind = icmp[0];
        let opt = match kind {
            NEIGHBOR_SOLICIT => OPT_SOURCE_LLA,
            NEIGHBOR_ADVERT => OPT_TARGET_LLA,
            other => return Err(NdError::NotNeighbor(other)),
        };
        let mut t = [0u8; 16];
        t.copy_from_slice(&icmp[8..24]);
        Ok(Self {
            kind,
            flags: if kind == NEIGHBOR_ADVERT {
                icmp[4] & 0xe0
            } else {
                0
            },
            target: Ipv6Addr::from(t),
            lla: find_lla(&icmp[24..], opt)?,
        })
    }

    /// Writes the message with its option and the ICMPv6 checksum over the
    /// pseudo-header of (`src`, `dst`).
    pub fn emit(&self, src: Ipv6Addr, dst: Ipv6Addr, lla: HwAddr, out: &mut [u8; MESSAGE_LEN]) {
        out.fill(0);
        out[0] = self.kind;
        if self.kind == NEIGHBOR_ADVERT {
            out[4] = self.flags & 0xe0;
        }
        out[8..24].copy_from_slice(&self.target.octets());
        let ty = if self.kind == NEIGHBOR_ADVERT {
            OPT_TARGET_LLA
        } else {
            OPT_SOURCE_LLA
        };
        let mut opt = [0u8; LLA_OPTION_LEN];
        write_lla(&mut opt, ty, lla);
        out[24..].copy_from_slice(&opt);
        let sum = icmpv6_checksum(src, dst, out);
        out[2..4].copy_from_slice(&sum.to_be_bytes());
    }

    /// The advertisement answering this solicitation when its target is
    /// one of ours: solicited and override set.
    pub fn advert_for(&self, own: &[Ipv6Addr]) -> Option<Self> {
        (self.kind == NEIGHBOR_SOLICIT && own.contains(&self.target)).then_some(Self {
            kind: NEIGHBOR_ADVERT,
            flags: NA_SOLICITED | NA_OVERRIDE,
            target: self.target,
            lla: None,
        })
    }
}

/// The ICMPv6 checksum of `msg` (its checksum field taken as zero) under
/// the IPv6 pseudo-header (RFC 8200 §8.1).
pub fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, msg: &[u8]) -> u16 {
    let len = (msg.len() as u32).to_be_bytes();
    let rest = msg.get(4..).unwrap_or(&[]);
    super::checksum(&[
        &src.octets(),
        &dst.octets(),
        &len,
        &[0, 0, 0, NEXT_HEADER_ICMPV6],
        &msg[..2.min(msg.len())],
        rest,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lla() -> HwAddr {
        "80:00:01:49:fe:80:00:00:00:00:00:00:ec:0d:9a:03:00:12:34:56"
            .parse()
            .unwrap()
    }

    #[test]
    fn option_layout_of_the_reference() {
        // ipoib.md §4.2: type, length 3, two zero bytes, the 20-byte address.
        let mut opt = [0u8; LLA_OPTION_LEN];
        write_lla(&mut opt, OPT_SOURCE_LLA, lla());
        assert_eq!(
            opt,
            [
                0x01, 0x03, 0x00, 0x00, 0x80, 0x00, 0x01, 0x49, 0xfe, 0x80, 0x00, 0x00, 0x00, 0x00,
                0x00, 0x00, 0xec, 0x0d, 0x9a, 0x03, 0x00, 0x12, 0x34, 0x56
            ]
        );
        assert_eq!(find_lla(&opt, OPT_SOURCE_LLA), Ok(Some(lla())));
        assert_eq!(find_lla(&opt, OPT_TARGET_LLA), Ok(None));
    }

    #[test]
    fn solicitation_round_trip_and_checksum() {
        let src: Ipv6Addr = "fe80::ee0d:9a03:12:3456".parse().unwrap();
        let target: Ipv6Addr = "fe80::202:c903:0:2".parse().unwrap();
        let dst = super::super::mgid::solicited_node(target);
        let ns = Neighbor {
            kind: NEIGHBOR_SOLICIT,
            flags: 0,
            target,
            lla: None,
        };
        let mut out = [0u8; MESSAGE_LEN];
        ns.emit(src, dst, lla(), &mut out);
        let back = Neighbor::parse(&out).unwrap();
        assert_eq!(back.target, target);
        assert_eq!(back.lla, Some(lla()));
        // Verifying a correct checksum: the one's-complement sum over the
        // pseudo-header and the whole message, checksum included, is 0xffff.
        let mut sum: u32 = 0;
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&src.octets());
        pseudo.extend_from_slice(&dst.octets());
        pseudo.extend_from_slice(&(MESSAGE_LEN as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 58]);
        pseudo.extend_from_slice(&out);
        for c in pseudo.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff);

        let na = ns.advert_for(&[target]).unwrap();
        assert_eq!(na.flags, NA_SOLICITED | NA_OVERRIDE);
        assert!(ns.advert_for(&[src]).is_none());
    }

    #[test]
    fn malformed_options_are_rejected() {
        let mut msg = [0u8; 32];
        msg[0] = NEIGHBOR_SOLICIT;
        msg[24] = OPT_SOURCE_LLA;
        msg[25] = 0; // zero length
        assert_eq!(Neighbor::parse(&msg), Err(NdError::BadOption(0)));
        msg[25] = 2; // runs past the end
        assert_eq!(Neighbor::parse(&msg), Err(NdError::BadOption(0)));
        msg[25] = 1; // an Ethernet-sized option
        assert_eq!(Neighbor::parse(&msg), Err(NdError::NotIpoib(8)));
        assert_eq!(Neighbor::parse(&msg[..20]), Err(NdError::Truncated(20)));
        msg[0] = 128;
        assert_eq!(Neighbor::parse(&msg), Err(NdError::NotNeighbor(128)));
        // A trailing single byte cannot hold an option header.
        assert_eq!(find_lla(&[1], OPT_SOURCE_LLA), Err(NdError::BadOption(0)));
    }
}
