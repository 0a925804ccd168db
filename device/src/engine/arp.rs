//! ARP over IPoIB (RFC 826 with RFC 4391's hardware type and length).
//!
//! The body is 56 bytes: hardware type 32, protocol 0x0800, lengths 20 and
//! 4, the operation, then sender and target hardware and protocol
//! addresses.

use std::net::Ipv4Addr;

use super::addr::{HW_ADDR_LEN, HwAddr};

/// ARPHRD_INFINIBAND.
pub const HW_TYPE_INFINIBAND: u16 = 32;
/// Length of the ARP body over IPoIB.
pub const ARP_LEN: usize = 56;

/// ARP operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Request (1).
    Request,
    /// Reply (2).
    Reply,
}

impl Op {
    /// The operation code on the wire.
    pub fn code(self) -> u16 {
        match self {
            Op::Request => 1,
            Op::Reply => 2,
        }
    }
}

/// A parsed IPoIB ARP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arp {
    /// Operation.
    pub op: Op,
    /// Sender hardware address.
    pub sender_hw: HwAddr,
    /// Sender IPv4 address.
    pub sender_ip: Ipv4Addr,
    /// Target hardware address (zero in requests).
    pub target_hw: HwAddr,
    /// Target IPv4 address.
    pub target_ip: Ipv4Addr,
}

/// Why an ARP packet was not accepted; each is a counted drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ArpError {
    /// Shorter than the 56-byte body.
    #[error("ARP packet of {0} bytes is shorter than 56")]
    Truncated(usize),
    /// Hardware type other than 32 or hardware length other than 20; the
    /// host ARP code ignores those.
    #[error("ARP hardware type {hrd} length {hln} is not InfiniBand")]
    NotInfiniband {
        /// ar_hrd.
        hrd: u16,
        /// ar_hln.
        hln: u8,
    },
    /// Protocol other than IPv4 with length 4.
    #[error("ARP protocol {pro:#06x} length {pln} is not IPv4")]
    NotIpv4 {
        /// ar_pro.
        pro: u16,
        /// ar_pln.
        pln: u8,
    },
    /// An operation this engine does not handle (RARP, InARP, …).
    #[error("ARP operation {0} not handled")]
    Op(u16),
}

fn hw_at(b: &[u8], at: usize) -> HwAddr {
    let mut a = [0u8; HW_ADDR_LEN];
    a.copy_from_slice(&b[at..at + HW_ADDR_LEN]);
    HwAddr(a)
}

impl Arp {
    /// Parses an ARP body (the bytes after the IPoIB header). Trailing
    /// bytes are ignored, as the host stack does.
    pub fn parse(b: &[u8]) -> Result<Self, ArpError> {
        if b.len() < ARP_LEN {
            return Err(ArpError::Truncated(b.len()));
        }
        // Long enough (checked above): the reads cannot miss.
        let be16 = |at| super::be16(b, at).unwrap_or(0);
        let (hrd, pro, hln, pln) = (be16(0), be16(2), b[4], b[5]);
        if hrd != HW_TYPE_INFINIBAND || usize::from(hln) != HW_ADDR_LEN {
            return Err(ArpError::NotInfiniband { hrd, hln });
        }
        if pro != super::ethertype::IPV4 || pln != 4 {
            return Err(ArpError::NotIpv4 { pro, pln });
        }
        let op = match be16(6) {
            1 => Op::Request,
            2 => Op::Reply,
            other => return Err(ArpError::Op(other)),
        };
        Ok(Self {
            op,
            sender_hw: hw_at(b, 8),
            sender_ip: super::ipv4_at(b, 28),
            target_hw: hw_at(b, 32),
            target_ip: super::ipv4_at(b, 52),
        })
    }

    /// Writes the 56-byte body.
    pub fn emit(&self, b: &mut [u8; ARP_LEN]) {
        b[0..2].copy_from_slice(&HW_TYPE_INFINIBAND.to_be_bytes());
        b[2..4].copy_from_slice(&super::ethertype::IPV4.to_be_bytes());
        b[4] = HW_ADDR_LEN as u8;
        b[5] = 4;
        b[6..8].copy_from_slice(&self.op.code().to_be_bytes());
        b[8..28].copy_from_slice(&self.sender_hw.0);
        b[28..32].copy_from_slice(&self.sender_ip.octets());
        b[32..52].copy_from_slice(&self.target_hw.0);
        b[52..56].copy_from_slice(&self.target_ip.octets());
    }

    /// A request for `target` from (`own_hw`, `own_ip`); the target
    /// hardware address is zero, as Linux sends it.
    pub fn request(own_hw: HwAddr, own_ip: Ipv4Addr, target: Ipv4Addr) -> Self {
        Self {
            op: Op::Request,
            sender_hw: own_hw,
            sender_ip: own_ip,
            target_hw: HwAddr([0; HW_ADDR_LEN]),
            target_ip: target,
        }
    }

    /// The reply to this request when `own_ip` is the target, else `None`.
    pub fn reply(&self, own_hw: HwAddr, own_ip: Ipv4Addr) -> Option<Self> {
        (self.op == Op::Request && self.target_ip == own_ip).then_some(Self {
            op: Op::Reply,
            sender_hw: own_hw,
            sender_ip: own_ip,
            target_hw: self.sender_hw,
            target_ip: self.sender_ip,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request from 10.0.0.1 (flags 0x80, QPN 0x000149, GID
    /// fe80::ec0d:9a03:12:3456) for 10.0.0.2, laid out by hand from the
    /// offsets of ipoib.md §4.1.
    const REQUEST: [u8; ARP_LEN] = [
        0x00, 0x20, 0x08, 0x00, 0x14, 0x04, 0x00, 0x01, // hrd 32, pro, hln 20, pln 4, op 1
        0x80, 0x00, 0x01, 0x49, 0xfe, 0x80, 0x00, 0x00, // sender hw
        0x00, 0x00, 0x00, 0x00, 0xec, 0x0d, 0x9a, 0x03, //
        0x00, 0x12, 0x34, 0x56, 0x0a, 0x00, 0x00, 0x01, // … sender ip
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // target hw: zero
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
        0x00, 0x00, 0x00, 0x00, 0x0a, 0x00, 0x00, 0x02, // … target ip
    ];

    fn sender() -> HwAddr {
        "80:00:01:49:fe:80:00:00:00:00:00:00:ec:0d:9a:03:00:12:34:56"
            .parse()
            .unwrap()
    }

    #[test]
    fn golden_request() {
        let arp = Arp::parse(&REQUEST).unwrap();
        let want = Arp::request(
            sender(),
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
        );
        assert_eq!(arp, want);
        let mut out = [0u8; ARP_LEN];
        want.emit(&mut out);
        assert_eq!(out, REQUEST);
    }

    #[test]
    fn reply_only_for_our_address() {
        let req = Arp::parse(&REQUEST).unwrap();
        let own: HwAddr = "80:00:00:48:fe:80:00:00:00:00:00:00:00:02:c9:03:00:00:00:02"
            .parse()
            .unwrap();
        assert_eq!(req.reply(own, Ipv4Addr::new(10, 0, 0, 3)), None);
        let rep = req.reply(own, Ipv4Addr::new(10, 0, 0, 2)).unwrap();
        assert_eq!(rep.op, Op::Reply);
        assert_eq!(rep.target_hw, sender());
        assert_eq!(rep.target_ip, Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(
            rep.reply(own, Ipv4Addr::new(10, 0, 0, 1)),
            None,
            "replies are not answered"
        );
    }

    #[test]
    fn foreign_or_short_packets_are_rejected() {
        assert_eq!(Arp::parse(&REQUEST[..55]), Err(ArpError::Truncated(55)));
        let mut eth = REQUEST;
        eth[1] = 1; // Ethernet hardware type
        eth[4] = 6;
        assert_eq!(
            Arp::parse(&eth),
            Err(ArpError::NotInfiniband { hrd: 1, hln: 6 })
        );
        let mut pro = REQUEST;
        pro[2] = 0x86;
        assert!(matches!(Arp::parse(&pro), Err(ArpError::NotIpv4 { .. })));
        let mut rarp = REQUEST;
        rarp[7] = 3;
        assert_eq!(Arp::parse(&rarp), Err(ArpError::Op(3)));
    }
}
