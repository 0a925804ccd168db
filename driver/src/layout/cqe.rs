//! Completion queue entries (reference §6.2–6.4).

use super::be64;

/// CQE size used by this driver.
pub const CQE_LEN: usize = 64;
/// Offset of `op_own`.
pub const OP_OWN: usize = 0x3F;
/// `op_own` of an entry no one has written (opcode 0xF, owner 0).
pub const INVALID_OP_OWN: u8 = 0xF0;

/// CQE opcodes.
#[allow(missing_docs)]
pub mod opcode {
    pub const REQ: u8 = 0x0;
    pub const RESP_SEND: u8 = 0x2;
    pub const RESP_SEND_IMM: u8 = 0x3;
    pub const REQ_ERR: u8 = 0xD;
    pub const RESP_ERR: u8 = 0xE;
    pub const INVALID: u8 = 0xF;
}

/// Error CQE syndromes (§6.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[allow(missing_docs)]
pub enum CqeError {
    LocalLength,
    LocalQpOperation,
    LocalProtection,
    WrFlushed,
    MwBind,
    BadResponse,
    LocalAccess,
    RemoteInvalidRequest,
    RemoteAccess,
    RemoteOperation,
    RetryExceeded,
    RnrRetryExceeded,
    RemoteAborted,
    Other(u8),
}

impl CqeError {
    /// Decodes a syndrome byte.
    pub fn from_syndrome(s: u8) -> CqeError {
        use CqeError::*;
        match s {
            0x01 => LocalLength,
            0x02 => LocalQpOperation,
            0x04 => LocalProtection,
            0x05 => WrFlushed,
            0x06 => MwBind,
            0x10 => BadResponse,
            0x11 => LocalAccess,
            0x12 => RemoteInvalidRequest,
            0x13 => RemoteAccess,
            0x14 => RemoteOperation,
            0x15 => RetryExceeded,
            0x16 => RnrRetryExceeded,
            0x22 => RemoteAborted,
            o => Other(o),
        }
    }
}

/// A decoded CQE. The flag-like receive fields stay packed as the device
/// wrote them and are unpacked by the accessors, so polling stores little.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cqe {
    /// CQE opcode (bits 7:4 of op_own).
    pub opcode: u8,
    /// Requester: opcode of the completed WQE.
    pub wqe_opcode: u8,
    /// WQE counter (requester: wqe_index of the WQE).
    pub wqe_counter: u16,
    /// QP the completion belongs to.
    pub qpn: u32,
    /// Receive: bytes written (UD: including the 40-byte GRH area).
    pub byte_cnt: u32,
    /// QP1 receive: P_Key of the packet; with immediate: the immediate.
    pub imm_or_pkey: u32,
    /// Receive: source LID.
    pub slid: u16,
    /// Receive: `flags_rqpn` (source QPN, SL, GRH indication).
    pub flags_rqpn: u32,
    /// Receive: `ml_path` (bits 23:16), `hds_ip_ext` (bits 15:8) and
    /// `l4_l3_hdr_type` (bits 7:0).
    pub path_csum: u32,
    /// Error CQEs: decoded syndrome.
    pub error: Option<CqeError>,
    /// Error CQEs: vendor syndrome.
    pub vendor_syndrome: u8,
}

impl Cqe {
    /// Receive: source QPN.
    pub fn src_qpn(&self) -> u32 {
        self.flags_rqpn & 0xFF_FFFF
    }

    /// Receive: service level.
    pub fn sl(&self) -> u8 {
        ((self.flags_rqpn >> 24) & 0xF) as u8
    }

    /// Receive: a GRH was placed in the first 40 bytes of the buffer.
    pub fn grh(&self) -> bool {
        (self.flags_rqpn >> 28) & 0x3 == 1
    }

    /// Receive: destination LID path bits.
    pub fn path_bits(&self) -> u8 {
        (self.path_csum >> 16) as u8
    }

    /// Receive checksum flags: bit 0 L2 OK, bit 1 L3 OK, bit 2 L4 OK.
    pub fn csum_ok(&self) -> u8 {
        (self.path_csum >> 8) as u8
    }

    /// Receive: L3 header type (0 none, 1 IPv6, 2 IPv4).
    pub fn l3_type(&self) -> u8 {
        ((self.path_csum >> 2) & 3) as u8
    }

    /// Receive: the HCA verified the IPv4 header and the TCP/UDP checksum,
    /// the condition under which Linux's mlx5_ib reports
    /// `IB_WC_IP_CSUM_OK` (IPv4 only).
    pub fn ip_csum_ok(&self) -> bool {
        self.csum_ok() & 0b110 == 0b110 && self.l3_type() == 2
    }

    /// Decodes a CQE. Never panics.
    pub fn parse(e: &[u8; CQE_LEN]) -> Cqe {
        Cqe::decode(|off| be64(e, off))
    }

    /// Decodes a CQE from its big-endian 64-bit words, `q(offset)` giving
    /// the word at an 8-byte aligned offset. Reads only the words it needs
    /// (one for a send completion, five for a receive), so a poller can take
    /// them straight from the CQ buffer.
    #[inline]
    pub fn decode(q: impl Fn(usize) -> u64) -> Cqe {
        let w38 = q(0x38);
        let sop = (w38 >> 32) as u32;
        let w3c = w38 as u32;
        let op = ((w3c & 0xFF) >> 4) as u8;
        let mut c = Cqe {
            opcode: op,
            wqe_opcode: (sop >> 24) as u8,
            wqe_counter: (w3c >> 16) as u16,
            qpn: sop & 0xFF_FFFF,
            byte_cnt: 0,
            imm_or_pkey: 0,
            slid: 0,
            flags_rqpn: 0,
            path_csum: 0,
            error: None,
            vendor_syndrome: 0,
        };
        match op {
            // Requester completions carry nothing more this driver reads.
            opcode::REQ => {}
            opcode::REQ_ERR | opcode::RESP_ERR => {
                let w34 = q(0x30) as u32;
                c.error = Some(CqeError::from_syndrome(w34 as u8));
                c.vendor_syndrome = (w34 >> 8) as u8;
            }
            _ => {
                let w10 = q(0x10);
                let w18 = q(0x18);
                c.byte_cnt = q(0x28) as u32;
                c.imm_or_pkey = q(0x20) as u32;
                c.slid = w10 as u16;
                c.flags_rqpn = (w18 >> 32) as u32;
                c.path_csum = ((((w10 >> 48) & 0xFF) << 16)
                    | ((w18 >> 24) & 0xFF) << 8
                    | ((w18 >> 16) & 0xFF)) as u32;
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ud_receive_golden() {
        let mut e = [0u8; CQE_LEN];
        e[0x16..0x18].copy_from_slice(&[0x00, 0x04]); // slid 4
        e[0x18..0x1C].copy_from_slice(&[0x10, 0x00, 0x00, 0x49]); // g = 1, SL 0, src QPN 0x49
        e[0x2C..0x30].copy_from_slice(&[0x00, 0x00, 0x00, 0x88]); // 40 + 96
        e[0x38..0x3C].copy_from_slice(&[0x00, 0x00, 0x00, 0x48]);
        e[0x3C..0x3E].copy_from_slice(&[0x00, 0x07]);
        e[0x3F] = (0x2 << 4) | 1;
        let c = Cqe::parse(&e);
        assert_eq!(c.opcode, opcode::RESP_SEND);
        assert_eq!(c.qpn, 0x48);
        assert_eq!(c.src_qpn(), 0x49);
        assert_eq!(c.slid, 4);
        assert!(c.grh());
        assert_eq!(c.byte_cnt, 136);
        assert_eq!(c.wqe_counter, 7);
        assert_eq!(c.error, None);
        assert!(!c.ip_csum_ok(), "nothing verified");

        // §6.2: ml_path 0x11, hds_ip_ext 0x1C (L3 OK, L4 OK), and
        // l4_l3_hdr_type 0x1D (UDP 2 << 4 | IPv4 2 << 2).
        e[0x11] = 0x01;
        e[0x1C] = 0b110;
        e[0x1D] = 0x28;
        let c = Cqe::parse(&e);
        assert_eq!(c.path_bits(), 1);
        assert_eq!(c.csum_ok(), 0b110);
        assert_eq!(c.src_qpn(), 0x49, "flags_rqpn unchanged");
        assert!(c.ip_csum_ok());
        // IPv6 (type 1) is not vouched for, as with mlx5_ib.
        e[0x1D] = 0x24;
        assert!(!Cqe::parse(&e).ip_csum_ok());
        e[0x1D] = 0x28;
        e[0x1C] = 0b010;
        assert!(!Cqe::parse(&e).ip_csum_ok(), "L4 not verified");
    }

    #[test]
    fn error_cqe_golden() {
        let mut e = [0u8; CQE_LEN];
        e[0x36] = 0x32;
        e[0x37] = 0x04;
        e[0x38..0x3C].copy_from_slice(&[0x0A, 0x00, 0x01, 0x23]);
        e[0x3C..0x3E].copy_from_slice(&[0x00, 0x05]);
        e[0x3F] = 0xD0;
        let c = Cqe::parse(&e);
        assert_eq!(c.error, Some(CqeError::LocalProtection));
        assert_eq!(c.vendor_syndrome, 0x32);
        assert_eq!(c.wqe_opcode, 0x0A);
        assert_eq!(c.qpn, 0x123);
        assert_eq!(c.wqe_counter, 5);
    }
}
