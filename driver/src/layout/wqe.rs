//! Work queue entry segments (reference §7.3–7.6, §7.10).

use super::{put_be16, put_be32, put_be64};

/// Send WQE basic block.
pub const WQEBB: usize = 64;
/// One data segment.
pub const DS: usize = 16;

/// Send opcodes (§7.12).
#[allow(missing_docs)]
pub mod op {
    pub const NOP: u8 = 0x00;
    pub const SEND: u8 = 0x0A;
    pub const SEND_IMM: u8 = 0x0B;
    pub const LSO: u8 = 0x0E;
}

/// `fm_ce_se`: always generate a CQE.
pub const CQ_UPDATE: u8 = 0x08;
/// `fm_ce_se`: solicited event.
pub const SOLICITED: u8 = 0x02;
/// Data segment byte_count marking inline data.
pub const INLINE_FLAG: u32 = 0x8000_0000;
/// Receive scatter-list terminator key when the device gives none.
pub const INVALID_LKEY: u32 = 0x100;

/// Writes a control segment at `w[0..16]`.
pub fn ctrl(w: &mut [u8], opcode: u8, wqe_index: u16, qpn: u32, ds: u8, fm_ce_se: u8, imm: u32) {
    put_be32(w, 0x00, (u32::from(wqe_index) << 8) | u32::from(opcode));
    put_be32(w, 0x04, (qpn << 8) | u32::from(ds & 0x3F));
    put_be32(w, 0x08, u32::from(fm_ce_se));
    put_be32(w, 0x0C, imm);
}

/// A UD destination (what a datagram segment carries).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AddressVector {
    /// Destination QPN.
    pub dqpn: u32,
    /// Destination Q_Key (bit 31 set: use the QP's own).
    pub qkey: u32,
    /// Destination LID.
    pub dlid: u16,
    /// Service level.
    pub sl: u8,
    /// Static rate (0 = port rate).
    pub stat_rate: u8,
    /// Source path bits.
    pub mlid: u8,
    /// GRH: destination GID, SGID index, hop limit, traffic class, flow label.
    pub grh: Option<Grh>,
}

/// GRH fields of an address vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Grh {
    /// Destination GID.
    pub dgid: [u8; 16],
    /// Source GID index.
    pub sgid_index: u8,
    /// Hop limit.
    pub hop_limit: u8,
    /// Traffic class.
    pub tclass: u8,
    /// Flow label (20 bits).
    pub flow_label: u32,
}

/// Writes a 48-byte datagram segment at `w[0..48]` (§7.4).
pub fn datagram(w: &mut [u8], av: &AddressVector) {
    w[..48].fill(0);
    put_be32(w, 0x00, av.qkey);
    put_be32(w, 0x08, 0x8000_0000 | (av.dqpn & 0xFF_FFFF));
    w[0x0C] = (av.stat_rate << 4) | (av.sl & 0x0F);
    w[0x0D] = av.mlid & 0x7F;
    put_be16(w, 0x0E, av.dlid);
    if let Some(g) = &av.grh {
        w[0x1A] = g.tclass;
        w[0x1B] = g.hop_limit;
        put_be32(
            w,
            0x1C,
            (1 << 30) | (u32::from(g.sgid_index) << 20) | (g.flow_label & 0xF_FFFF),
        );
        w[0x20..0x30].copy_from_slice(&g.dgid);
    }
}

/// A datagram segment encoded once per destination, as IPoIB caches an
/// address handle per path: posting copies six words instead of encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddressHandle {
    words: [u64; 6],
    /// The same words as memory images (device byte order), for stores
    /// without byte swapping.
    images: [u64; 6],
}

impl AddressHandle {
    /// Encodes `av`.
    pub fn new(av: &AddressVector) -> AddressHandle {
        let mut b = [0u8; 48];
        datagram(&mut b, av);
        let mut words = [0u64; 6];
        let mut images = [0u64; 6];
        for ((w, i), c) in words
            .iter_mut()
            .zip(images.iter_mut())
            .zip(b.chunks_exact(8))
        {
            let bytes = [c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]];
            *w = u64::from_be_bytes(bytes);
            *i = u64::from_ne_bytes(bytes);
        }
        AddressHandle { words, images }
    }

    /// The segment as memory images of its 64-bit words.
    pub fn images(&self) -> &[u64; 6] {
        &self.images
    }

    /// The segment as big-endian 64-bit words.
    pub fn words(&self) -> &[u64; 6] {
        &self.words
    }
}

/// Writes a 16-byte data (pointer) segment.
pub fn data(w: &mut [u8], byte_count: u32, lkey: u32, addr: u64) {
    put_be32(w, 0x00, byte_count & 0x7FFF_FFFF);
    put_be32(w, 0x04, lkey);
    put_be64(w, 0x08, addr);
}

/// Eth segment checksum flags (§7.5).
pub mod cs {
    /// Compute the L4 (TCP/UDP) checksum.
    pub const L4: u8 = 0x80;
    /// Compute the L3 (IPv4 header) checksum.
    pub const L3: u8 = 0x40;
}

/// Writes the pad and eth segments of an IPoIB offload-mode WQE at `w`
/// (§7.5): 16 zero bytes, then the eth segment with `inline` headers (LSO).
/// Returns the bytes used (a multiple of 16).
pub fn pad_and_eth(w: &mut [u8], cs_flags: u8, mss: u16, inline: &[u8]) -> usize {
    let eth_len = (14 + inline.len()).max(16).next_multiple_of(16);
    let used = 16 + eth_len;
    if w.len() < used {
        return 0;
    }
    w[..used].fill(0);
    let e = &mut w[16..used];
    e[4] = cs_flags;
    put_be16(e, 6, mss);
    put_be16(e, 0x0C, inline.len() as u16);
    e[0x0E..0x0E + inline.len()].copy_from_slice(inline);
    used
}

/// Scatter entry for receive WQEs and gather entry for sends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sge {
    /// IOVA.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Memory key.
    pub lkey: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_worked_example() {
        // §7.10: UD SEND, QPN 0x123, pc 5, dest QPN 0x456, Q_Key 0xB, DLID 0x12,
        // lkey 0x00ABCD00, IOVA 0x10_0000_0000, 1500 bytes.
        let mut w = [0u8; 128];
        ctrl(&mut w, op::SEND, 5, 0x123, 5, CQ_UPDATE, 0);
        datagram(
            &mut w[16..],
            &AddressVector {
                dqpn: 0x456,
                qkey: 0xB,
                dlid: 0x12,
                ..AddressVector::default()
            },
        );
        data(&mut w[64..], 1500, 0x00AB_CD00, 0x10_0000_0000);
        let want: [u8; 80] = [
            0x00, 0x00, 0x05, 0x0A, 0x00, 0x01, 0x23, 0x05, 0x00, 0x00, 0x00, 0x08, 0, 0, 0,
            0, //
            0x00, 0x00, 0x00, 0x0B, 0, 0, 0, 0, 0x80, 0x00, 0x04, 0x56, 0x00, 0x00, 0x00,
            0x12, //
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, //
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, //
            0x00, 0x00, 0x05, 0xDC, 0x00, 0xAB, 0xCD, 0x00, 0x00, 0x00, 0x00, 0x10, 0, 0, 0, 0,
        ];
        assert_eq!(&w[..80], &want);
        assert!(w[80..].iter().all(|&b| b == 0));
    }

    #[test]
    fn eth_segment_golden() {
        // Checksum only: pad (16 zero) + eth with cs_flags 0xC0 at byte 4.
        let mut w = [0xAAu8; 64];
        assert_eq!(pad_and_eth(&mut w, cs::L3 | cs::L4, 0, &[]), 32);
        assert_eq!(&w[..16], &[0; 16]);
        assert_eq!(
            &w[16..32],
            &[0, 0, 0, 0, 0xC0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        // LSO: mss at 6, inline_hdr_sz at 0x0C, headers from 0x0E; 58 header
        // bytes (IPoIB 4 + IPv4 20 + TCP 20 + options 14) need align16(14 + 58) = 80.
        let hdr: Vec<u8> = (1..=58).collect();
        let mut w = [0u8; 128];
        assert_eq!(pad_and_eth(&mut w, 0xC0, 1448, &hdr), 96);
        assert_eq!(&w[16 + 6..16 + 8], &[0x05, 0xA8]);
        assert_eq!(&w[16 + 0x0C..16 + 0x0E], &[0x00, 58]);
        assert_eq!(&w[16 + 0x0E..16 + 0x0E + 58], &hdr[..]);
    }

    #[test]
    fn address_handle_is_the_datagram_segment() {
        let av = AddressVector {
            dqpn: 0x456,
            qkey: 0xB,
            dlid: 0x12,
            ..AddressVector::default()
        };
        let ah = AddressHandle::new(&av);
        // §7.10 worked example, bytes 0x10-0x3F of the WQE.
        assert_eq!(ah.words()[0], 0x0000_000B_0000_0000);
        assert_eq!(ah.words()[1], 0x8000_0456_0000_0012);
        assert!(ah.words()[2..].iter().all(|&w| w == 0));
    }

    #[test]
    fn multicast_av_sets_grh() {
        let mut w = [0u8; 48];
        let mut dgid = [0u8; 16];
        dgid[0] = 0xFF;
        datagram(
            &mut w,
            &AddressVector {
                dqpn: 0xFF_FFFF,
                qkey: 0x1B,
                dlid: 0xC001,
                grh: Some(Grh {
                    dgid,
                    hop_limit: 1,
                    ..Grh::default()
                }),
                ..AddressVector::default()
            },
        );
        assert_eq!(&w[0x08..0x0C], &[0x80, 0xFF, 0xFF, 0xFF]);
        assert_eq!(&w[0x0E..0x10], &[0xC0, 0x01]);
        assert_eq!(w[0x1B], 1);
        assert_eq!(&w[0x1C..0x20], &[0x40, 0, 0, 0]);
        assert_eq!(w[0x20], 0xFF);
    }
}
