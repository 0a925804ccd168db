//! Stateless offloads the HCA performs for IPoIB UD QPs in offload mode 1
//! (reference §7.5): IPv4 header and TCP/UDP checksums, and LSO (TCP
//! segmentation with headers replicated from the WQE's inline copy).
//!
//! Packets here start with the 4-byte IPoIB header. Malformed packets are
//! sent unchanged rather than refused: the device does not parse beyond
//! what it needs, and a receiver's checksum check catches the rest.

const IPOIB_HDR: usize = 4;
const ETH_IPV4: u16 = 0x0800;
const ETH_IPV6: u16 = 0x86DD;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

fn sum16(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xFFFF {
        acc = (acc & 0xFFFF) + (acc >> 16);
    }
    !(acc as u16)
}

/// The Internet checksum of `data`.
pub fn inet_checksum(data: &[u8]) -> u16 {
    fold(sum16(data, 0))
}

/// Where the L3 and L4 headers are.
struct Layout {
    v4: bool,
    l3: usize,
    l4: usize,
    proto: u8,
}

fn layout(p: &[u8]) -> Option<Layout> {
    let et = u16::from_be_bytes([*p.first()?, *p.get(1)?]);
    let l3 = IPOIB_HDR;
    match et {
        ETH_IPV4 => {
            let ihl = usize::from(p.get(l3)? & 0x0F) * 4;
            if ihl < 20 || p.len() < l3 + ihl {
                return None;
            }
            Some(Layout {
                v4: true,
                l3,
                l4: l3 + ihl,
                proto: p[l3 + 9],
            })
        }
        ETH_IPV6 => {
            if p.len() < l3 + 40 {
                return None;
            }
            Some(Layout {
                v4: false,
                l3,
                l4: l3 + 40,
                proto: p[l3 + 6],
            })
        }
        _ => None,
    }
}

fn pseudo_header_sum(p: &[u8], l: &Layout, l4_len: usize) -> u32 {
    let mut acc = 0;
    if l.v4 {
        acc = sum16(&p[l.l3 + 12..l.l3 + 20], acc);
    } else {
        acc = sum16(&p[l.l3 + 8..l.l3 + 40], acc);
    }
    acc += l4_len as u32 >> 16;
    acc += l4_len as u32 & 0xFFFF;
    acc + u32::from(l.proto)
}

/// What the receive side of the offload reports in a CQE (reference §6.2):
/// `hds_ip_ext` (bit 1 L3 checksum OK, bit 2 L4 checksum OK) and
/// `l4_l3_hdr_type` (bits 6:4 L4 type: 1 TCP, 2 UDP; bits 3:2 L3 type:
/// 1 IPv6, 2 IPv4), for a packet starting with its IPoIB header. Only
/// whole, unfragmented packets are checked.
pub fn receive_check(p: &[u8]) -> (u8, u8) {
    let Some(l) = layout(p) else {
        return (0, 0);
    };
    let l3_type = if l.v4 { 2 } else { 1 };
    let l3_ok = !l.v4 || inet_checksum(&p[l.l3..l.l4]) == 0;
    let fragment = l.v4 && u16::from_be_bytes([p[l.l3 + 6], p[l.l3 + 7]]) & 0x3FFF != 0;
    let (l4_type, min) = match l.proto {
        PROTO_TCP => (1u8, 20),
        PROTO_UDP => (2u8, 8),
        _ => (0, 0),
    };
    let ip_end = if l.v4 {
        l.l3 + usize::from(u16::from_be_bytes([p[l.l3 + 2], p[l.l3 + 3]]))
    } else {
        l.l4 + usize::from(u16::from_be_bytes([p[l.l3 + 4], p[l.l3 + 5]]))
    };
    let l4_ok = l4_type != 0
        && !fragment
        && ip_end <= p.len()
        && ip_end >= l.l4 + min
        && fold(sum16(
            &p[l.l4..ip_end],
            pseudo_header_sum(p, &l, ip_end - l.l4),
        )) == 0;
    let hds = (u8::from(l3_ok) << 1) | (u8::from(l3_ok && l4_ok) << 2);
    (hds, (l4_type << 4) | (l3_type << 2))
}

/// Fills in the checksums the WQE asked for (`l3`: IPv4 header, `l4`:
/// TCP/UDP).
pub fn checksum(p: &mut [u8], l3: bool, l4: bool) {
    let Some(l) = layout(p) else { return };
    if l3 && l.v4 {
        p[l.l3 + 10..l.l3 + 12].fill(0);
        let c = inet_checksum(&p[l.l3..l.l4]);
        p[l.l3 + 10..l.l3 + 12].copy_from_slice(&c.to_be_bytes());
    }
    if !l4 {
        return;
    }
    let at = match l.proto {
        PROTO_TCP if p.len() >= l.l4 + 20 => l.l4 + 16,
        PROTO_UDP if p.len() >= l.l4 + 8 => l.l4 + 6,
        _ => return,
    };
    p[at..at + 2].fill(0);
    let l4_len = p.len() - l.l4;
    let acc = pseudo_header_sum(p, &l, l4_len);
    let mut c = fold(sum16(&p[l.l4..], acc));
    if l.proto == PROTO_UDP && c == 0 {
        c = 0xFFFF;
    }
    p[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// TCP segmentation: `headers` (IPoIB + IP + TCP, as inlined in the WQE)
/// are replicated for every `mss` bytes of `data`; lengths, IPv4 ID, TCP
/// sequence number and flags are fixed up and checksums computed.
pub fn segment(headers: &[u8], data: &[u8], mss: usize) -> Vec<Vec<u8>> {
    let Some(l) = layout(headers) else {
        let mut p = headers.to_vec();
        p.extend_from_slice(data);
        return vec![p];
    };
    if l.proto != PROTO_TCP || headers.len() < l.l4 + 20 || mss == 0 {
        let mut p = headers.to_vec();
        p.extend_from_slice(data);
        return vec![p];
    }
    let tcp_hdr = usize::from(headers[l.l4 + 12] >> 4) * 4;
    if tcp_hdr < 20 || headers.len() < l.l4 + tcp_hdr {
        let mut p = headers.to_vec();
        p.extend_from_slice(data);
        return vec![p];
    }
    let seq0 = u32::from_be_bytes([
        headers[l.l4 + 4],
        headers[l.l4 + 5],
        headers[l.l4 + 6],
        headers[l.l4 + 7],
    ]);
    let id0 = u16::from_be_bytes([headers[l.l3 + 4], headers[l.l3 + 5]]);
    let flags0 = headers[l.l4 + 13];
    let chunks: Vec<&[u8]> = if data.is_empty() {
        vec![&[][..]]
    } else {
        data.chunks(mss).collect()
    };
    let n = chunks.len();
    let mut out = Vec::with_capacity(n);
    for (k, c) in chunks.into_iter().enumerate() {
        let mut p = headers[..l.l4 + tcp_hdr].to_vec();
        p.extend_from_slice(c);
        let ip_payload = p.len() - l.l3;
        if l.v4 {
            p[l.l3 + 2..l.l3 + 4].copy_from_slice(&(ip_payload as u16).to_be_bytes());
            p[l.l3 + 4..l.l3 + 6].copy_from_slice(&id0.wrapping_add(k as u16).to_be_bytes());
        } else {
            p[l.l3 + 4..l.l3 + 6].copy_from_slice(&((ip_payload - 40) as u16).to_be_bytes());
        }
        let seq = seq0.wrapping_add((k * mss) as u32);
        p[l.l4 + 4..l.l4 + 8].copy_from_slice(&seq.to_be_bytes());
        // FIN and PSH only on the last segment; CWR only on the first.
        let mut flags = flags0;
        if k + 1 != n {
            flags &= !0x09;
        }
        if k != 0 {
            flags &= !0x80;
        }
        p[l.l4 + 13] = flags;
        checksum(&mut p, true, true);
        out.push(p);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_checksum_known_answer() {
        // The classic example header 4500 0073 0000 4000 4011 0000 c0a8 0001 c0a8 00c7 -> b861.
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(inet_checksum(&h), 0xb861);
    }

    fn tcp_packet(payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x08, 0x00, 0, 0];
        let total = 20 + 20 + payload.len();
        p.extend_from_slice(&[
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0x12,
            0x34,
            0x40,
            0,
            64,
            6,
            0,
            0,
        ]);
        p.extend_from_slice(&[192, 0, 2, 1, 192, 0, 2, 2]);
        p.extend_from_slice(&[
            0x30, 0x39, 0x00, 0x50, 0, 0, 0x10, 0, 0, 0, 0, 0, 0x50, 0x18, 0xFF, 0xFF, 0, 0, 0, 0,
        ]);
        p.extend_from_slice(payload);
        p
    }

    fn verify(p: &[u8]) {
        // A correct IPv4 header sums to zero; so does TCP with its pseudo-header.
        assert_eq!(inet_checksum(&p[4..24]), 0);
        let l = layout(p).unwrap();
        let acc = pseudo_header_sum(p, &l, p.len() - l.l4);
        assert_eq!(fold(sum16(&p[l.l4..], acc)), 0);
    }

    #[test]
    fn checksums_verify() {
        let mut p = tcp_packet(b"hello, offloads!!");
        checksum(&mut p, true, true);
        verify(&p);
    }

    #[test]
    fn lso_segments_carry_the_stream() {
        let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let p = tcp_packet(&[]);
        let segs = segment(&p, &data, 1448);
        assert_eq!(segs.len(), 4);
        let mut joined = Vec::new();
        for (k, s) in segs.iter().enumerate() {
            verify(s);
            let seq = u32::from_be_bytes([s[28], s[29], s[30], s[31]]);
            assert_eq!(seq, 0x1000 + (k * 1448) as u32, "sequence numbers");
            assert_eq!(
                u16::from_be_bytes([s[8], s[9]]),
                0x1234 + k as u16,
                "IPv4 IDs"
            );
            let psh = s[37] & 0x08 != 0;
            assert_eq!(psh, k == 3, "PSH only on the last");
            joined.extend_from_slice(&s[44..]);
        }
        assert_eq!(joined, data);
    }

    #[test]
    fn garbage_headers_never_panic() {
        let mut seed = 0xA076_1D64_78BD_642Fu64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..20_000u32 {
            let len = (next() % 120) as usize;
            let mut p: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // A plausible IPoIB header and IP version now and then.
            if len > 5 && round % 2 == 0 {
                p[..4].copy_from_slice(if round % 4 == 0 {
                    &[8, 0, 0, 0]
                } else {
                    &[0x86, 0xdd, 0, 0]
                });
                p[4] = if round % 4 == 0 { 0x45 } else { 0x60 };
            }
            let mut q = p.clone();
            checksum(&mut q, round % 3 == 0, true);
            let data: Vec<u8> = (0..(next() % 3000) as usize)
                .map(|_| next() as u8)
                .collect();
            let mss = (next() % 2100) as usize;
            let segs = segment(&p, &data, mss);
            assert!(!segs.is_empty());
        }
    }

    #[test]
    fn receive_check_reports_what_it_verified() {
        // A UDP/IPv4 packet with both checksums filled in by `checksum`.
        let mut p = vec![0x08, 0x00, 0, 0];
        p.extend_from_slice(&[0x45, 0, 0, 32, 0, 0, 0x40, 0, 64, 17, 0, 0]);
        p.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        p.extend_from_slice(&[0x12, 0x34, 0x56, 0x78, 0, 12, 0, 0, 1, 2, 3, 4]);
        checksum(&mut p, true, true);
        assert_eq!(receive_check(&p), (0b110, (2 << 4) | (2 << 2)));
        // A damaged payload: the IP header is still fine, UDP is not.
        let mut bad = p.clone();
        bad[33] ^= 1;
        assert_eq!(receive_check(&bad).0, 0b010);
        // A damaged IP header: nothing is vouched for.
        bad = p.clone();
        bad[12] ^= 1;
        assert_eq!(receive_check(&bad).0, 0);
        // Not IP.
        assert_eq!(receive_check(&[0x08, 0x06, 0, 0, 1, 2]), (0, 0));
    }
}
