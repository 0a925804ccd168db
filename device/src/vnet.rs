//! The virtio-net header in front of every packet on the TUN device
//! (virtio 1.x §5.1.6, little-endian), and what it asks of the HCA.
//!
//! With checksum and TSO enabled on the TUN device the host kernel hands
//! over TCP segments of up to 64 KiB with a partial checksum; the HCA's
//! IPoIB stateless offloads (checksums and LSO on UD QPs) finish the job,
//! as `ib_ipoib` does with `NETIF_F_TSO` on mlx5.

use crate::engine::IPOIB_HEADER_LEN;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`.
pub const F_DATA_VALID: u8 = 2;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_UDP`.
pub const GSO_UDP: u8 = 3;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub const GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_HDR_GSO_ECN`.
pub const GSO_ECN: u8 = 0x80;
/// Longest header copy the send WQE carries inline (IPoIB + IP + TCP).
pub const MAX_LSO_HEADERS: usize = 256;

/// A virtio-net header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    /// Flags.
    pub flags: u8,
    /// GSO type.
    pub gso_type: u8,
    /// Length of the headers (a hint).
    pub hdr_len: u16,
    /// Segment size for GSO.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Reads the first 10 bytes.
    pub fn parse(b: &[u8]) -> Option<VnetHdr> {
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        (b.len() >= 10).then(|| VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
        })
    }

    /// Writes the first 10 bytes (`num_buffers` is left alone).
    pub fn write(&self, b: &mut [u8; 10]) {
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }

    /// The same header for the packet without its first `n` bytes (a
    /// guest's Ethernet header): offsets move back by `n`. `None` if the
    /// checksum would start inside the removed bytes.
    pub fn without_link_header(&self, n: u16) -> Option<VnetHdr> {
        let mut h = *self;
        if h.flags & F_NEEDS_CSUM != 0 {
            h.csum_start = h.csum_start.checked_sub(n)?;
        }
        h.hdr_len = h.hdr_len.saturating_sub(n);
        Some(h)
    }
}

/// How to send one host packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxPlan {
    /// As it is.
    Plain,
    /// Let the HCA fill in the checksums (`l3`: the IPv4 header's too).
    Checksum {
        /// IPv4 header checksum as well.
        l3: bool,
    },
    /// Segment: the first `headers` bytes of the packet (IP + TCP) are
    /// replicated in front of every `mss` bytes of the rest.
    Lso {
        /// Segment payload size.
        mss: u16,
        /// IP + TCP header length.
        headers: usize,
        /// IPv4.
        v4: bool,
    },
}

/// Why a host packet cannot be sent as its header asks; counted drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// A GSO type the interface did not offer (UDP fragmentation offload).
    #[error("GSO type {0:#x} not offered")]
    GsoType(u8),
    /// GSO on a packet that is not TCP over IPv4/IPv6 without extension
    /// headers, or is cut short.
    #[error("GSO packet is not plain TCP")]
    NotTcp,
    /// Headers too long to replicate, or a zero segment size.
    #[error("GSO headers or segment size out of range")]
    Range,
}

/// Decides how to send `packet` (an IP packet) given its header.
pub fn plan(h: &VnetHdr, packet: &[u8]) -> Result<TxPlan, PlanError> {
    let gso = h.gso_type & !GSO_ECN;
    match gso {
        GSO_NONE => {
            if h.flags & F_NEEDS_CSUM != 0 {
                let v4 = packet.first().is_some_and(|b| b >> 4 == 4);
                Ok(TxPlan::Checksum { l3: v4 })
            } else {
                Ok(TxPlan::Plain)
            }
        }
        GSO_TCPV4 | GSO_TCPV6 => {
            let v4 = gso == GSO_TCPV4;
            let (l3, proto) = if v4 {
                let b0 = *packet.first().ok_or(PlanError::NotTcp)?;
                if b0 >> 4 != 4 {
                    return Err(PlanError::NotTcp);
                }
                (usize::from(b0 & 0x0f) * 4, packet.get(9).copied())
            } else {
                if packet.first().map(|b| b >> 4) != Some(6) {
                    return Err(PlanError::NotTcp);
                }
                (40, packet.get(6).copied())
            };
            if proto != Some(6) || l3 < 20 {
                return Err(PlanError::NotTcp);
            }
            let doff = packet.get(l3 + 12).ok_or(PlanError::NotTcp)? >> 4;
            let headers = l3 + usize::from(doff) * 4;
            if doff < 5 || headers > packet.len() {
                return Err(PlanError::NotTcp);
            }
            if h.gso_size == 0 || headers + IPOIB_HEADER_LEN > MAX_LSO_HEADERS {
                return Err(PlanError::Range);
            }
            Ok(TxPlan::Lso {
                mss: h.gso_size,
                headers,
                v4,
            })
        }
        other => Err(PlanError::GsoType(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4/TCP packet with a 20-byte IP and a 32-byte TCP header.
    fn tcp4(payload: usize) -> Vec<u8> {
        let mut p = vec![0u8; 52 + payload];
        p[0] = 0x45;
        p[9] = 6;
        p[20 + 12] = 8 << 4;
        p
    }

    #[test]
    fn header_layout_of_the_spec() {
        // virtio 1.x §5.1.6: flags, gso_type, then little-endian hdr_len,
        // gso_size, csum_start, csum_offset.
        let b = [
            0x01, 0x01, 0x42, 0x00, 0xd0, 0x07, 0x22, 0x00, 0x10, 0x00, 0, 0,
        ];
        assert_eq!(
            VnetHdr::parse(&b),
            Some(VnetHdr {
                flags: F_NEEDS_CSUM,
                gso_type: GSO_TCPV4,
                hdr_len: 0x42,
                gso_size: 2000,
                csum_start: 0x22,
                csum_offset: 0x10,
            })
        );
        assert_eq!(VnetHdr::parse(&b[..9]), None);
    }

    #[test]
    fn plans() {
        let none = VnetHdr::default();
        assert_eq!(plan(&none, &tcp4(10)), Ok(TxPlan::Plain));
        let csum = VnetHdr {
            flags: F_NEEDS_CSUM,
            ..none
        };
        assert_eq!(plan(&csum, &tcp4(10)), Ok(TxPlan::Checksum { l3: true }));
        let tso = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4 | GSO_ECN,
            gso_size: 1992,
            ..none
        };
        assert_eq!(
            plan(&tso, &tcp4(60000)),
            Ok(TxPlan::Lso {
                mss: 1992,
                headers: 52,
                v4: true
            })
        );
        let mut v6 = vec![0u8; 40 + 20 + 100];
        v6[0] = 0x60;
        v6[6] = 6;
        v6[40 + 12] = 5 << 4;
        let tso6 = VnetHdr {
            gso_type: GSO_TCPV6,
            ..tso
        };
        assert_eq!(
            plan(&tso6, &v6),
            Ok(TxPlan::Lso {
                mss: 1992,
                headers: 60,
                v4: false
            })
        );
    }

    #[test]
    fn bad_gso_requests_are_refused() {
        let tso = VnetHdr {
            gso_type: GSO_TCPV4,
            gso_size: 1000,
            ..VnetHdr::default()
        };
        let mut udp = tcp4(100);
        udp[9] = 17;
        assert_eq!(plan(&tso, &udp), Err(PlanError::NotTcp));
        assert_eq!(plan(&tso, &tcp4(100)[..30]), Err(PlanError::NotTcp));
        assert_eq!(plan(&tso, &[]), Err(PlanError::NotTcp));
        let zero = VnetHdr { gso_size: 0, ..tso };
        assert_eq!(plan(&zero, &tcp4(100)), Err(PlanError::Range));
        let uso = VnetHdr {
            gso_type: GSO_UDP,
            ..tso
        };
        assert_eq!(plan(&uso, &tcp4(100)), Err(PlanError::GsoType(GSO_UDP)));
        let mut short_ihl = tcp4(100);
        short_ihl[0] = 0x41;
        assert_eq!(plan(&tso, &short_ihl), Err(PlanError::NotTcp));
    }

    #[test]
    fn guest_headers_lose_the_ethernet_header() {
        // virtio 1.x §5.1.6.2: csum_start counts from the start of the
        // frame, so a guest's includes its 14-byte Ethernet header.
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 66,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        let l3 = h.without_link_header(14).unwrap();
        assert_eq!((l3.csum_start, l3.hdr_len, l3.csum_offset), (20, 52, 16));
        let bad = VnetHdr {
            csum_start: 10,
            ..h
        };
        assert_eq!(bad.without_link_header(14), None);
        let mut b = [0u8; 10];
        l3.write(&mut b);
        assert_eq!(b, [1, 1, 52, 0, 0xa8, 0x05, 20, 0, 16, 0]);
        assert_eq!(VnetHdr::parse(&b), Some(l3));
    }
}
