//! QP commands and the QP context (reference §4.12).

use super::{CmdError, Command, Opcode, object_command};
use crate::layout::{BitField, be64, put_be64};
use crate::transport::Iova;

/// Size of the qpc.
pub const QPC_LEN: usize = 0xE8;
/// Position of the qpc inside CREATE_QP and the transition commands.
const QPC: usize = 0x18;
const PAS: usize = 0x110;
const QPN: BitField = BitField::dw(0x08, 23, 0);

/// qpc fields (offsets relative to the context).
#[allow(missing_docs)]
pub mod qpc {
    use crate::layout::BitField;
    pub const STATE: BitField = BitField::dw(0x00, 31, 28);
    pub const ST: BitField = BitField::dw(0x00, 23, 16);
    pub const PM_STATE: BitField = BitField::dw(0x00, 12, 11);
    pub const BLOCK_LB_MC: BitField = BitField::bit(0x04, 30);
    pub const PD: BitField = BitField::dw(0x04, 23, 0);
    pub const MTU: BitField = BitField::dw(0x08, 31, 29);
    pub const LOG_MSG_MAX: BitField = BitField::dw(0x08, 28, 24);
    pub const LOG_RQ_SIZE: BitField = BitField::dw(0x08, 22, 19);
    pub const LOG_RQ_STRIDE: BitField = BitField::dw(0x08, 18, 16);
    pub const NO_SQ: BitField = BitField::bit(0x08, 15);
    pub const LOG_SQ_SIZE: BitField = BitField::dw(0x08, 14, 11);
    pub const RLKY: BitField = BitField::bit(0x08, 4);
    pub const ULP_OFFLOAD_MODE: BitField = BitField::dw(0x08, 3, 0);
    pub const UAR_PAGE: BitField = BitField::dw(0x0C, 23, 0);
    pub const USER_INDEX: BitField = BitField::dw(0x10, 23, 0);
    pub const LOG_PAGE_SIZE: BitField = BitField::dw(0x14, 28, 24);
    pub const REMOTE_QPN: BitField = BitField::dw(0x14, 23, 0);
    pub const PKEY_INDEX: BitField = BitField::dw(0x18, 15, 0);
    pub const GRH: BitField = BitField::bit(0x1C, 23);
    pub const RLID: BitField = BitField::dw(0x1C, 15, 0);
    pub const ACK_TIMEOUT: BitField = BitField::dw(0x20, 31, 27);
    pub const SL: BitField = BitField::dw(0x3C, 27, 24);
    pub const VHCA_PORT_NUM: BitField = BitField::dw(0x3C, 23, 16);
    pub const LOG_ACK_REQ_FREQ: BitField = BitField::dw(0x70, 31, 28);
    pub const RETRY_COUNT: BitField = BitField::dw(0x70, 18, 16);
    pub const RNR_RETRY: BitField = BitField::dw(0x70, 15, 13);
    pub const FRE: BitField = BitField::bit(0x70, 11);
    pub const NEXT_SEND_PSN: BitField = BitField::dw(0x78, 23, 0);
    pub const CQN_SND: BitField = BitField::dw(0x7C, 23, 0);
    pub const DETH_SQPN: BitField = BitField::dw(0x80, 23, 0);
    pub const MIN_RNR_NAK: BitField = BitField::dw(0x94, 28, 24);
    pub const NEXT_RCV_PSN: BitField = BitField::dw(0x94, 23, 0);
    pub const CQN_RCV: BitField = BitField::dw(0x9C, 23, 0);
    pub const DBR_ADDR: usize = 0xA0;
    pub const Q_KEY: BitField = BitField::dw(0xA8, 31, 0);
    pub const RQ_TYPE: BitField = BitField::dw(0xAC, 26, 24);
    pub const SRQN: BitField = BitField::dw(0xAC, 23, 0);
}

/// Service types (qpc.st).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ServiceType {
    /// Reliable connected.
    Rc = 0x0,
    /// Unreliable datagram.
    Ud = 0x2,
    /// QP1.
    Gsi = 0x8,
}

/// opt_param_mask bits.
#[allow(missing_docs)]
pub mod opt {
    pub const PKEY_INDEX: u32 = 1 << 4;
    pub const Q_KEY: u32 = 1 << 5;
    pub const RNR_TIMEOUT: u32 = 1 << 6;
    pub const PRI_PATH: u32 = 1 << 7;
}

/// A QP context image, kept per QP and resent whole on every transition,
/// as both drivers do.
#[derive(Clone, PartialEq, Eq)]
pub struct QpContext(pub [u8; QPC_LEN]);

impl std::fmt::Debug for QpContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QpContext")
            .field("st", &self.get(qpc::ST))
            .field("pd", &self.get(qpc::PD))
            .finish_non_exhaustive()
    }
}

impl Default for QpContext {
    fn default() -> Self {
        QpContext([0; QPC_LEN])
    }
}

impl QpContext {
    /// Reads a field.
    pub fn get(&self, f: BitField) -> u32 {
        f.get(&self.0)
    }
    /// Sets a field.
    pub fn set(&mut self, f: BitField, v: u32) -> &mut Self {
        f.set(&mut self.0, v);
        self
    }
    /// Sets the doorbell record address.
    pub fn set_dbr(&mut self, a: Iova) -> &mut Self {
        put_be64(&mut self.0, qpc::DBR_ADDR, a.0);
        self
    }
    /// The doorbell record address.
    pub fn dbr(&self) -> Iova {
        Iova(be64(&self.0, qpc::DBR_ADDR))
    }
}

/// CREATE_QP.
#[derive(Clone, Debug)]
pub struct CreateQp {
    /// The context.
    pub qpc: QpContext,
    /// Work queue buffer pages (RQ first, then SQ).
    pub pas: Vec<Iova>,
}

impl Command for CreateQp {
    const OPCODE: Opcode = Opcode::CREATE_QP;
    /// The QPN.
    type Reply = u32;
    fn inlen(&self) -> usize {
        PAS + 8 * self.pas.len()
    }
    fn outlen(&self) -> usize {
        0x10
    }
    fn encode(&self, i: &mut [u8]) {
        i[QPC..QPC + QPC_LEN].copy_from_slice(&self.qpc.0);
        for (n, p) in self.pas.iter().enumerate() {
            put_be64(i, PAS + 8 * n, p.0);
        }
    }
    fn decode(&self, o: &[u8]) -> Result<u32, CmdError> {
        Ok(QPN.get(o))
    }
}

/// State transitions that carry a context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// RESET → INIT.
    Rst2Init,
    /// INIT → RTR.
    Init2Rtr,
    /// RTR → RTS.
    Rtr2Rts,
    /// RTS → RTS (e.g. a new Q_Key).
    Rts2Rts,
}

/// A transition command.
#[derive(Clone, Debug)]
pub struct ModifyQp {
    /// Which one.
    pub transition: Transition,
    /// QP.
    pub qpn: u32,
    /// Optional fields to apply.
    pub opt_mask: u32,
    /// The full context.
    pub qpc: QpContext,
}

impl ModifyQp {
    fn transition_opcode(&self) -> Opcode {
        match self.transition {
            Transition::Rst2Init => Opcode::RST2INIT_QP,
            Transition::Init2Rtr => Opcode::INIT2RTR_QP,
            Transition::Rtr2Rts => Opcode::RTR2RTS_QP,
            Transition::Rts2Rts => Opcode::RTS2RTS_QP,
        }
    }
}

impl Command for ModifyQp {
    /// The first transition; [`Command::opcode`] gives the real one.
    const OPCODE: Opcode = Opcode::RST2INIT_QP;
    type Reply = ();
    fn opcode(&self) -> Opcode {
        self.transition_opcode()
    }
    fn inlen(&self) -> usize {
        0x110
    }
    fn outlen(&self) -> usize {
        0x10
    }
    fn encode(&self, i: &mut [u8]) {
        QPN.set(i, self.qpn);
        BitField::dw(0x10, 31, 0).set(i, self.opt_mask);
        i[QPC..QPC + QPC_LEN].copy_from_slice(&self.qpc.0);
    }
    fn decode(&self, _o: &[u8]) -> Result<(), CmdError> {
        Ok(())
    }
}

object_command!(
    /// DESTROY_QP.
    DestroyQp(u32), Opcode::DESTROY_QP, QPN
);
object_command!(
    /// 2ERR_QP: any state to ERR (flushes outstanding WQEs).
    QpToErr(u32), Opcode::TO_ERR_QP, QPN
);
object_command!(
    /// 2RST_QP: any state to RESET.
    QpToRst(u32), Opcode::TO_RST_QP, QPN
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::encode_input;

    #[test]
    fn create_ud_qp_golden() {
        let mut c = QpContext::default();
        c.set(qpc::ST, ServiceType::Ud as u32)
            .set(qpc::PM_STATE, 3)
            .set(qpc::PD, 5)
            .set(qpc::LOG_RQ_SIZE, 8)
            .set(qpc::LOG_RQ_STRIDE, 2)
            .set(qpc::LOG_SQ_SIZE, 7)
            .set(qpc::RLKY, 1)
            .set(qpc::UAR_PAGE, 3)
            .set(qpc::CQN_SND, 0x10)
            .set(qpc::CQN_RCV, 0x11)
            .set(qpc::USER_INDEX, 0xFF_FFFF)
            .set_dbr(Iova(0x0040_0000));
        let v = encode_input(&CreateQp {
            qpc: c,
            pas: vec![Iova(0x0050_0000)],
        });
        assert_eq!(v.len(), 0x118);
        assert_eq!(&v[0..4], &[0x05, 0x00, 0, 0]);
        let q = 0x18;
        // st 0x2 at 23:16, pm_state 3 at 12:11.
        assert_eq!(&v[q..q + 4], &[0x00, 0x02, 0x18, 0x00]);
        assert_eq!(&v[q + 4..q + 8], &[0, 0, 0, 5]);
        // log_rq_size 8 (22:19), log_rq_stride 2 (18:16), log_sq_size 7 (14:11), rlky (4).
        assert_eq!(&v[q + 8..q + 12], &[0x00, 0x42, 0x38, 0x10]);
        assert_eq!(&v[q + 0x0C..q + 0x10], &[0, 0, 0, 3]);
        assert_eq!(&v[q + 0x10..q + 0x14], &[0, 0xFF, 0xFF, 0xFF]);
        assert_eq!(&v[q + 0x7C..q + 0x80], &[0, 0, 0, 0x10]);
        assert_eq!(&v[q + 0x9C..q + 0xA0], &[0, 0, 0, 0x11]);
        assert_eq!(&v[q + 0xA0..q + 0xA8], &[0, 0, 0, 0, 0, 0x40, 0, 0]);
        assert_eq!(&v[0x110..0x118], &[0, 0, 0, 0, 0, 0x50, 0, 0]);
    }

    #[test]
    fn transitions_golden() {
        let mut c = QpContext::default();
        c.set(qpc::PKEY_INDEX, 0)
            .set(qpc::VHCA_PORT_NUM, 1)
            .set(qpc::Q_KEY, 0x8001_0000);
        let m = ModifyQp {
            transition: Transition::Init2Rtr,
            qpn: 0x48,
            opt_mask: opt::PKEY_INDEX | opt::Q_KEY,
            qpc: c,
        };
        let v = encode_input(&m);
        assert_eq!(
            &v[0..0x18],
            &[
                0x05, 0x03, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x48, 0, 0, 0, 0, 0, 0, 0, 0x30, 0, 0, 0, 0
            ]
        );
        // vhca_port_num at qpc 0x3C bits 23:16; q_key at qpc 0xA8.
        assert_eq!(&v[0x18 + 0x3C..0x18 + 0x40], &[0, 0x01, 0, 0]);
        assert_eq!(&v[0x18 + 0xA8..0x18 + 0xAC], &[0x80, 0x01, 0, 0]);
        for (t, op) in [
            (Transition::Rst2Init, 0x02),
            (Transition::Rtr2Rts, 0x04),
            (Transition::Rts2Rts, 0x05),
        ] {
            let v = encode_input(&ModifyQp {
                transition: t,
                ..m.clone()
            });
            assert_eq!(&v[0..2], &[0x05, op]);
        }
        assert_eq!(
            encode_input(&QpToErr(0x48))[..12],
            [0x05, 0x07, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x48]
        );
        assert_eq!(encode_input(&QpToRst(0x48))[..2], [0x05, 0x0A]);
        assert_eq!(encode_input(&DestroyQp(0x48))[..2], [0x05, 0x01]);
    }
}
