//! InfiniBand wire format: LRH, GRH, BTH, DETH, ICRC and VCRC (IBTA
//! vol. 1 ch. 5–7, as summarised in the references). The software HCA emits
//! and parses these, and the fabric routes and captures them.

/// LRH length.
pub const LRH_LEN: usize = 8;
/// GRH length.
pub const GRH_LEN: usize = 40;
/// BTH length.
pub const BTH_LEN: usize = 12;
/// DETH length.
pub const DETH_LEN: usize = 8;

/// LNH: IBA local (no GRH).
pub const LNH_LOCAL: u8 = 2;
/// LNH: IBA global (GRH follows).
pub const LNH_GLOBAL: u8 = 3;
/// GRH next header for IBA transport.
pub const NXTHDR_IBA: u8 = 0x1B;
/// BTH opcode: UD SEND only.
pub const OP_UD_SEND_ONLY: u8 = 0x64;
/// First multicast LID.
pub const MCAST_LID_BASE: u16 = 0xC000;
/// Permissive LID.
pub const PERMISSIVE_LID: u16 = 0xFFFF;

/// The headers of one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Headers {
    /// Virtual lane.
    pub vl: u8,
    /// Service level.
    pub sl: u8,
    /// Destination LID.
    pub dlid: u16,
    /// Source LID.
    pub slid: u16,
    /// GRH, if present.
    pub grh: Option<GrhFields>,
    /// BTH opcode.
    pub opcode: u8,
    /// Solicited event.
    pub se: bool,
    /// P_Key.
    pub pkey: u16,
    /// Destination QP.
    pub dest_qp: u32,
    /// Ack request.
    pub ack_req: bool,
    /// PSN.
    pub psn: u32,
    /// DETH (UD only): Q_Key and source QP.
    pub deth: Option<(u32, u32)>,
}

/// GRH fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct GrhFields {
    /// Traffic class.
    pub tclass: u8,
    /// Flow label.
    pub flow_label: u32,
    /// Hop limit.
    pub hop_limit: u8,
    /// Source GID.
    pub sgid: [u8; 16],
    /// Destination GID.
    pub dgid: [u8; 16],
}

/// Why a packet is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireError {
    /// Shorter than its headers.
    Truncated,
    /// LRH PktLen disagrees with the length.
    BadLength,
    /// ICRC mismatch.
    BadIcrc,
    /// VCRC mismatch.
    BadVcrc,
    /// Not IBA transport (raw packets are not modelled).
    Unsupported,
}

/// Slicing-by-8 tables for the VCRC (polynomial 0x100B, reflected: 0xD008).
/// `T[0]` is the byte-at-a-time table; `T[k][i]` advances `T[k-1][i]` by
/// one more zero byte.
const fn crc16_tables() -> [[u16; 256]; 8] {
    let mut t = [[0u16; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u16;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xD008 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut k = 1;
    while k < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[k - 1][i];
            t[k][i] = (prev >> 8) ^ t[0][(prev & 0xFF) as usize];
            i += 1;
        }
        k += 1;
    }
    t
}

static CRC16: [[u16; 256]; 8] = crc16_tables();

/// CRC-32 (IEEE 802.3 polynomial, reflected, init and final XOR all ones).
pub fn crc32(data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(data);
    h.finalize()
}

/// The IBA VCRC: CRC-16, polynomial 0x100B, reflected, init 0xFFFF, inverted.
pub fn crc16(data: &[u8]) -> u16 {
    let t = &CRC16;
    let mut c: u16 = 0xFFFF;
    let mut chunks = data.chunks_exact(8);
    for b in &mut chunks {
        let x = c ^ u16::from_le_bytes([b[0], b[1]]);
        c = t[7][usize::from(x & 0xFF)]
            ^ t[6][usize::from(x >> 8)]
            ^ t[5][usize::from(b[2])]
            ^ t[4][usize::from(b[3])]
            ^ t[3][usize::from(b[4])]
            ^ t[2][usize::from(b[5])]
            ^ t[1][usize::from(b[6])]
            ^ t[0][usize::from(b[7])];
    }
    for &b in chunks.remainder() {
        c = t[0][usize::from((c ^ u16::from(b)) & 0xFF)] ^ (c >> 8);
    }
    !c
}

/// The ICRC of a packet without its CRCs: CRC-32 over the packet with the
/// variant fields (LRH VL, GRH TClass/FlowLabel/HopLmt, BTH resv8a) set to
/// all ones.
pub fn icrc(pkt: &[u8], has_grh: bool) -> u32 {
    let mut h = crc32fast::Hasher::new();
    let mut lrh = [0u8; LRH_LEN];
    lrh.copy_from_slice(&pkt[..LRH_LEN]);
    lrh[0] |= 0xF0;
    h.update(&lrh);
    let mut at = LRH_LEN;
    if has_grh {
        let mut g = [0u8; GRH_LEN];
        g.copy_from_slice(&pkt[at..at + GRH_LEN]);
        g[0] |= 0x0F;
        g[1] = 0xFF;
        g[2] = 0xFF;
        g[3] = 0xFF;
        g[7] = 0xFF;
        h.update(&g);
        at += GRH_LEN;
    }
    let mut bth = [0u8; BTH_LEN];
    bth.copy_from_slice(&pkt[at..at + BTH_LEN]);
    bth[4] = 0xFF;
    h.update(&bth);
    at += BTH_LEN;
    h.update(&pkt[at..]);
    h.finalize()
}

/// Builds a packet: headers, payload, pad, ICRC, VCRC.
pub fn build(h: &Headers, payload: &[u8]) -> Vec<u8> {
    let pad = (4 - payload.len() % 4) % 4;
    let hdr = LRH_LEN
        + if h.grh.is_some() { GRH_LEN } else { 0 }
        + BTH_LEN
        + if h.deth.is_some() { DETH_LEN } else { 0 };
    let body = hdr + payload.len() + pad;
    let mut p = Vec::with_capacity(body + 6);
    let lnh = if h.grh.is_some() {
        LNH_GLOBAL
    } else {
        LNH_LOCAL
    };
    p.push((h.vl << 4) & 0xF0);
    p.push((h.sl << 4) | lnh);
    p.extend_from_slice(&h.dlid.to_be_bytes());
    let words = ((body + 4) / 4) as u16 & 0x7FF;
    p.extend_from_slice(&words.to_be_bytes());
    p.extend_from_slice(&h.slid.to_be_bytes());
    if let Some(g) = &h.grh {
        let w0 = (6u32 << 28) | (u32::from(g.tclass) << 20) | (g.flow_label & 0xF_FFFF);
        p.extend_from_slice(&w0.to_be_bytes());
        let paylen = (body - LRH_LEN - GRH_LEN + 4) as u16;
        p.extend_from_slice(&paylen.to_be_bytes());
        p.push(NXTHDR_IBA);
        p.push(g.hop_limit);
        p.extend_from_slice(&g.sgid);
        p.extend_from_slice(&g.dgid);
    }
    p.push(h.opcode);
    p.push((u8::from(h.se) << 7) | ((pad as u8) << 4));
    p.extend_from_slice(&h.pkey.to_be_bytes());
    p.extend_from_slice(&(h.dest_qp & 0xFF_FFFF).to_be_bytes());
    p.extend_from_slice(&((u32::from(h.ack_req) << 31) | (h.psn & 0xFF_FFFF)).to_be_bytes());
    if let Some((qkey, src)) = h.deth {
        p.extend_from_slice(&qkey.to_be_bytes());
        p.extend_from_slice(&(src & 0xFF_FFFF).to_be_bytes());
    }
    p.extend_from_slice(payload);
    p.extend(std::iter::repeat_n(0u8, pad));
    let ic = icrc(&p, h.grh.is_some());
    p.extend_from_slice(&ic.to_le_bytes());
    let vc = crc16(&p);
    p.extend_from_slice(&vc.to_le_bytes());
    p
}

/// What a switch checks on every hop: the packet length against the LRH
/// and the VCRC. The ICRC is end to end: switches forward it untouched and
/// only the receiving channel adapter checks it (`parse`).
pub fn check_link(p: &[u8]) -> Result<(), WireError> {
    if p.len() < LRH_LEN + BTH_LEN + 6 {
        return Err(WireError::Truncated);
    }
    let words = usize::from(u16::from_be_bytes([p[4], p[5]]) & 0x7FF);
    if words * 4 + 2 != p.len() {
        return Err(WireError::BadLength);
    }
    let vc_at = p.len() - 2;
    if crc16(&p[..vc_at]).to_le_bytes() != [p[vc_at], p[vc_at + 1]] {
        return Err(WireError::BadVcrc);
    }
    Ok(())
}

/// Parses and checks a packet; returns the headers and the payload range.
pub fn parse(p: &[u8]) -> Result<(Headers, std::ops::Range<usize>), WireError> {
    check_link(p)?;
    let vc_at = p.len() - 2;
    let lnh = p[1] & 0x3;
    if lnh != LNH_LOCAL && lnh != LNH_GLOBAL {
        return Err(WireError::Unsupported);
    }
    let has_grh = lnh == LNH_GLOBAL;
    let ic_at = vc_at - 4;
    let mut h = Headers {
        vl: p[0] >> 4,
        sl: p[1] >> 4,
        dlid: u16::from_be_bytes([p[2], p[3]]),
        slid: u16::from_be_bytes([p[6], p[7]]),
        ..Headers::default()
    };
    let mut at = LRH_LEN;
    if has_grh {
        if p.len() < LRH_LEN + GRH_LEN + BTH_LEN + 6 {
            return Err(WireError::Truncated);
        }
        let w0 = u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]]);
        if p[at + 6] != NXTHDR_IBA {
            return Err(WireError::Unsupported);
        }
        let mut g = GrhFields {
            tclass: ((w0 >> 20) & 0xFF) as u8,
            flow_label: w0 & 0xF_FFFF,
            hop_limit: p[at + 7],
            ..GrhFields::default()
        };
        g.sgid.copy_from_slice(&p[at + 8..at + 24]);
        g.dgid.copy_from_slice(&p[at + 24..at + 40]);
        h.grh = Some(g);
        at += GRH_LEN;
    }
    if icrc(&p[..ic_at], has_grh).to_le_bytes() != p[ic_at..ic_at + 4] {
        return Err(WireError::BadIcrc);
    }
    h.opcode = p[at];
    h.se = p[at + 1] & 0x80 != 0;
    let pad = usize::from((p[at + 1] >> 4) & 0x3);
    h.pkey = u16::from_be_bytes([p[at + 2], p[at + 3]]);
    h.dest_qp = u32::from_be_bytes([0, p[at + 5], p[at + 6], p[at + 7]]);
    let w = u32::from_be_bytes([p[at + 8], p[at + 9], p[at + 10], p[at + 11]]);
    h.ack_req = w >> 31 != 0;
    h.psn = w & 0xFF_FFFF;
    at += BTH_LEN;
    if h.opcode & 0xE0 == 0x60 {
        if at + DETH_LEN > ic_at {
            return Err(WireError::Truncated);
        }
        let qkey = u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]]);
        let src = u32::from_be_bytes([0, p[at + 5], p[at + 6], p[at + 7]]);
        h.deth = Some((qkey, src));
        at += DETH_LEN;
    }
    if at + pad > ic_at {
        return Err(WireError::Truncated);
    }
    Ok((h, at..ic_at - pad))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_check_value() {
        // The CRC-32/ISO-HDLC check value from the CRC catalogue.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    /// Bit-at-a-time CRC-16 straight from the polynomial definition
    /// (x^16 + x^12 + x^3 + x + 1, LSB first), to cross-check the table.
    fn crc16_bitwise(data: &[u8]) -> u16 {
        let mut c: u16 = 0xFFFF;
        for &b in data {
            for i in 0..8 {
                let bit = ((b >> i) & 1) as u16 ^ (c & 1);
                c >>= 1;
                if bit != 0 {
                    c ^= 0xD008;
                }
            }
        }
        !c
    }

    #[test]
    fn crc16_table_matches_the_polynomial() {
        for msg in [&b""[..], b"1", b"123456789", &[0xFF; 100], &[0x00; 33]] {
            assert_eq!(crc16(msg), crc16_bitwise(msg));
        }
        // Every split between the 8-byte slices and the byte-wise tail.
        let ramp: Vec<u8> = (0..=255u8).map(|b| b.wrapping_mul(37) ^ 0x5A).collect();
        for n in 0..ramp.len() {
            assert_eq!(crc16(&ramp[..n]), crc16_bitwise(&ramp[..n]), "length {n}");
        }
    }

    #[test]
    fn lrh_golden_and_round_trip() {
        // The reference's packet 1: DLID 4, SLID 3, UD SEND to QP 0x48 from
        // QP 0x49, Q_Key 0xB1B, PSN 7; 4-byte IPoIB header + 60 bytes of
        // IPv4: 8+12+8+4+60+4 = 96 bytes = PktLen 24 words, 98 with VCRC.
        let h = Headers {
            dlid: 4,
            slid: 3,
            opcode: OP_UD_SEND_ONLY,
            pkey: 0xFFFF,
            dest_qp: 0x48,
            psn: 7,
            deth: Some((0xB1B, 0x49)),
            ..Headers::default()
        };
        let payload = [0x5Au8; 64];
        let p = build(&h, &payload);
        assert_eq!(p.len(), 98);
        assert_eq!(&p[..8], &[0x00, 0x02, 0x00, 0x04, 0x00, 0x18, 0x00, 0x03]);
        assert_eq!(
            &p[8..20],
            &[0x64, 0x00, 0xFF, 0xFF, 0, 0, 0, 0x48, 0, 0, 0, 7]
        );
        assert_eq!(&p[20..28], &[0, 0, 0x0B, 0x1B, 0, 0, 0, 0x49]);
        let (back, range) = parse(&p).unwrap();
        assert_eq!(back, h);
        assert_eq!(&p[range], &payload);
    }

    #[test]
    fn grh_pad_and_corruption() {
        let g = GrhFields {
            hop_limit: 1,
            sgid: [0xfe; 16],
            dgid: [0xff; 16],
            ..GrhFields::default()
        };
        let h = Headers {
            dlid: 0xC000,
            slid: 2,
            grh: Some(g),
            opcode: OP_UD_SEND_ONLY,
            pkey: 0xFFFF,
            dest_qp: 0xFF_FFFF,
            deth: Some((0x1B, 0x48)),
            ..Headers::default()
        };
        let p = build(&h, &[1, 2, 3, 4, 5]);
        assert_eq!(p[1] & 3, LNH_GLOBAL);
        assert_eq!(p[8] >> 4, 6, "IP version 6");
        assert_eq!(p[8 + 6], NXTHDR_IBA);
        let (back, r) = parse(&p).unwrap();
        assert_eq!(back.grh, Some(g));
        assert_eq!(&p[r], &[1, 2, 3, 4, 5]);
        // Variant fields may change in flight without breaking the ICRC.
        let mut q = p.clone();
        q[0] |= 0x30; // VL
        q[8 + 7] = 7; // hop limit
        let vc = crc16(&q[..q.len() - 2]).to_le_bytes();
        let n = q.len();
        q[n - 2..].copy_from_slice(&vc);
        assert!(parse(&q).is_ok());
        let mut bad = p.clone();
        bad[60] ^= 1;
        assert_eq!(parse(&bad).unwrap_err(), WireError::BadVcrc);
        let mut bad = p.clone();
        bad[60] ^= 1;
        let vc = crc16(&bad[..n - 2]).to_le_bytes();
        bad[n - 2..].copy_from_slice(&vc);
        assert_eq!(parse(&bad).unwrap_err(), WireError::BadIcrc);
        assert_eq!(parse(&p[..40]).unwrap_err(), WireError::BadLength);
    }
}
