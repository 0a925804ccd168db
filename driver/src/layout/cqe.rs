//! Completion queue entries (reference §6.2–6.4).

use super::be32;

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

/// A decoded CQE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cqe {
    /// CQE opcode (bits 7:4 of op_own).
    pub opcode: u8,
    /// QP the completion belongs to.
    pub qpn: u32,
    /// WQE counter (requester: wqe_index of the WQE).
    pub wqe_counter: u16,
    /// Receive: bytes written (UD: including the 40-byte GRH area).
    pub byte_cnt: u32,
    /// Receive: source QPN.
    pub src_qpn: u32,
    /// Receive: source LID.
    pub slid: u16,
    /// Receive: service level.
    pub sl: u8,
    /// Receive: GRH present in the buffer.
    pub grh: bool,
    /// Receive: destination LID path bits.
    pub path_bits: u8,
    /// QP1 receive: P_Key of the packet; with immediate: the immediate.
    pub imm_or_pkey: u32,
    /// Receive checksum flags (hds_ip_ext).
    pub csum_ok: u8,
    /// Error CQEs: decoded syndrome.
    pub error: Option<CqeError>,
    /// Error CQEs: vendor syndrome.
    pub vendor_syndrome: u8,
    /// Requester: opcode of the completed WQE.
    pub wqe_opcode: u8,
}

impl Cqe {
    /// Decodes a CQE. Never panics.
    pub fn parse(e: &[u8; CQE_LEN]) -> Cqe {
        Cqe::from_dwords(|off| be32(e, off))
    }

    /// Decodes a CQE from its big-endian dwords, `d(offset)` giving the
    /// dword at a 4-byte aligned offset. Reads only the eight dwords it
    /// needs, so a poller can take them straight from the CQ buffer.
    #[inline]
    pub fn from_dwords(d: impl Fn(usize) -> u32) -> Cqe {
        let sop = d(0x38);
        let w3c = d(0x3C);
        let op = ((w3c & 0xFF) >> 4) as u8;
        let mut c = Cqe {
            opcode: op,
            qpn: sop & 0xFF_FFFF,
            wqe_counter: (w3c >> 16) as u16,
            byte_cnt: 0,
            src_qpn: 0,
            slid: 0,
            sl: 0,
            grh: false,
            path_bits: 0,
            imm_or_pkey: 0,
            csum_ok: 0,
            error: None,
            vendor_syndrome: 0,
            wqe_opcode: (sop >> 24) as u8,
        };
        match op {
            // Requester completions carry nothing more this driver reads.
            opcode::REQ => {}
            opcode::REQ_ERR | opcode::RESP_ERR => {
                let w34 = d(0x34);
                c.error = Some(CqeError::from_syndrome(w34 as u8));
                c.vendor_syndrome = (w34 >> 8) as u8;
            }
            _ => {
                let flags = d(0x18);
                c.byte_cnt = d(0x2C);
                c.src_qpn = flags & 0xFF_FFFF;
                c.slid = d(0x14) as u16;
                c.sl = ((flags >> 24) & 0xF) as u8;
                c.grh = (flags >> 28) & 0x3 == 1;
                c.path_bits = (d(0x10) >> 16) as u8;
                c.imm_or_pkey = d(0x24);
                c.csum_ok = (d(0x1C) >> 24) as u8;
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
        assert_eq!(c.src_qpn, 0x49);
        assert_eq!(c.slid, 4);
        assert!(c.grh);
        assert_eq!(c.byte_cnt, 136);
        assert_eq!(c.wqe_counter, 7);
        assert_eq!(c.error, None);
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
