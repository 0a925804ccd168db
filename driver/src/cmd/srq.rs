//! CREATE_RMP / MODIFY_RMP / DESTROY_RMP: the basic SRQ under ISSI 1
//! (reference §4.13).

use super::{CmdError, Command, Opcode, object_command};
use crate::layout::{BitField, put_be64};
use crate::transport::Iova;

const RMPC: usize = 0x20;
const WQ: usize = RMPC + 0x30;
const PAS: usize = 0x110;
const RMPN: BitField = BitField::dw(0x08, 23, 0);

/// wq fields relative to the wq.
mod wq {
    use crate::layout::BitField;
    pub const WQ_TYPE: BitField = BitField::dw(0x00, 31, 28);
    pub const LWM: BitField = BitField::dw(0x04, 15, 0);
    pub const PD: BitField = BitField::dw(0x08, 23, 0);
    pub const DBR_ADDR: usize = 0x10;
    pub const LOG_WQ_STRIDE: BitField = BitField::dw(0x20, 19, 16);
    pub const LOG_WQ_PG_SZ: BitField = BitField::dw(0x20, 12, 8);
    pub const LOG_WQ_SZ: BitField = BitField::dw(0x20, 4, 0);
}

/// CREATE_RMP with a linked-list work queue.
#[derive(Clone, Debug)]
pub struct CreateRmp {
    /// Protection domain.
    pub pd: u32,
    /// log2 WQEs.
    pub log_size: u8,
    /// log2 WQE bytes.
    pub log_stride: u8,
    /// Limit watermark (0 = disarmed).
    pub lwm: u16,
    /// 4-byte doorbell record.
    pub dbr: Iova,
    /// Buffer pages (4 KiB).
    pub pas: Vec<Iova>,
}

impl Command for CreateRmp {
    const OPCODE: Opcode = Opcode::CREATE_RMP;
    /// The RMP number.
    type Reply = u32;
    fn inlen(&self) -> usize {
        PAS + 8 * self.pas.len()
    }
    fn outlen(&self) -> usize {
        0x10
    }
    fn encode(&self, i: &mut [u8]) {
        BitField::dw(RMPC, 23, 20).set(i, 1); // state RDY
        wq::WQ_TYPE.within(WQ).set(i, 0);
        wq::LWM.within(WQ).set(i, u32::from(self.lwm));
        wq::PD.within(WQ).set(i, self.pd);
        put_be64(i, WQ + wq::DBR_ADDR, self.dbr.0);
        wq::LOG_WQ_STRIDE
            .within(WQ)
            .set(i, u32::from(self.log_stride));
        wq::LOG_WQ_PG_SZ.within(WQ).set(i, 0);
        wq::LOG_WQ_SZ.within(WQ).set(i, u32::from(self.log_size));
        for (n, p) in self.pas.iter().enumerate() {
            put_be64(i, PAS + 8 * n, p.0);
        }
    }
    fn decode(&self, o: &[u8]) -> Result<u32, CmdError> {
        Ok(RMPN.get(o))
    }
}

/// MODIFY_RMP re-arming the limit watermark.
#[derive(Clone, Copy, Debug)]
pub struct ModifyRmpLwm {
    /// RMP.
    pub rmpn: u32,
    /// New watermark.
    pub lwm: u16,
}

impl Command for ModifyRmpLwm {
    const OPCODE: Opcode = Opcode::MODIFY_RMP;
    type Reply = ();
    fn inlen(&self) -> usize {
        0x110
    }
    fn outlen(&self) -> usize {
        0x10
    }
    fn encode(&self, i: &mut [u8]) {
        BitField::dw(0x08, 31, 28).set(i, 1);
        RMPN.set(i, self.rmpn);
        BitField::bit(0x14, 0).set(i, 1);
        BitField::dw(RMPC, 23, 20).set(i, 1);
        wq::LWM.within(WQ).set(i, u32::from(self.lwm));
    }
    fn decode(&self, _o: &[u8]) -> Result<(), CmdError> {
        Ok(())
    }
}

/// CREATE_SRQ (§4.13): the basic SRQ for ISSI 0 firmware.
#[derive(Clone, Debug)]
pub struct CreateSrq {
    /// Protection domain.
    pub pd: u32,
    /// log2 WQEs.
    pub log_size: u8,
    /// WQE size = 16 << log_rq_stride bytes.
    pub log_rq_stride: u8,
    /// Limit watermark.
    pub lwm: u16,
    /// 4-byte doorbell record.
    pub dbr: Iova,
    /// Buffer pages (4 KiB).
    pub pas: Vec<Iova>,
}

const SRQC: usize = 0x10;

impl Command for CreateSrq {
    const OPCODE: Opcode = Opcode::CREATE_SRQ;
    /// The SRQ number.
    type Reply = u32;
    fn inlen(&self) -> usize {
        PAS + 8 * self.pas.len()
    }
    fn outlen(&self) -> usize {
        0x10
    }
    fn encode(&self, i: &mut [u8]) {
        BitField::dw(SRQC, 27, 24).set(i, u32::from(self.log_size));
        BitField::bit(SRQC + 0x04, 28).set(i, 1); // rlky
        BitField::dw(SRQC + 0x04, 26, 24).set(i, u32::from(self.log_rq_stride));
        BitField::dw(SRQC + 0x10, 29, 24).set(i, 0);
        BitField::dw(SRQC + 0x18, 23, 0).set(i, self.pd);
        BitField::dw(SRQC + 0x1C, 31, 16).set(i, u32::from(self.lwm));
        put_be64(i, SRQC + 0x28, self.dbr.0);
        for (n, p) in self.pas.iter().enumerate() {
            put_be64(i, PAS + 8 * n, p.0);
        }
    }
    fn decode(&self, o: &[u8]) -> Result<u32, CmdError> {
        Ok(RMPN.get(o))
    }
}

object_command!(
    /// DESTROY_RMP.
    DestroyRmp(u32), Opcode::DESTROY_RMP, RMPN
);
object_command!(
    /// DESTROY_SRQ.
    DestroySrq(u32), Opcode::DESTROY_SRQ, RMPN
);

/// ARM_RQ op_mod 1: re-arm the limit of an SRQ.
#[derive(Clone, Copy, Debug)]
pub struct ArmSrq {
    /// SRQ.
    pub srqn: u32,
    /// Watermark.
    pub lwm: u16,
}

impl Command for ArmSrq {
    const OPCODE: Opcode = Opcode::ARM_RQ;
    type Reply = ();
    fn op_mod(&self) -> u16 {
        1
    }
    fn inlen(&self) -> usize {
        0x10
    }
    fn outlen(&self) -> usize {
        0x10
    }
    fn encode(&self, i: &mut [u8]) {
        RMPN.set(i, self.srqn);
        BitField::dw(0x0C, 15, 0).set(i, u32::from(self.lwm));
    }
    fn decode(&self, _o: &[u8]) -> Result<(), CmdError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::encode_input;

    #[test]
    fn create_rmp_golden() {
        let v = encode_input(&CreateRmp {
            pd: 3,
            log_size: 7,
            log_stride: 6,
            lwm: 16,
            dbr: Iova(0x0060_0008),
            pas: vec![Iova(0x0070_0000), Iova(0x0070_1000)],
        });
        assert_eq!(v.len(), 0x120);
        assert_eq!(&v[0..4], &[0x09, 0x0C, 0, 0]);
        // rmpc at 0x20: state 1 in bits 23:20.
        assert_eq!(&v[0x20..0x24], &[0x00, 0x10, 0, 0]);
        // wq at 0x50: type 0; lwm at +4; pd at +8; dbr at +0x10.
        assert_eq!(&v[0x50..0x54], &[0, 0, 0, 0]);
        assert_eq!(&v[0x54..0x58], &[0, 0, 0, 16]);
        assert_eq!(&v[0x58..0x5C], &[0, 0, 0, 3]);
        assert_eq!(&v[0x60..0x68], &[0, 0, 0, 0, 0x00, 0x60, 0x00, 0x08]);
        // +0x20: log_wq_stride 6 (19:16), log_wq_pg_sz 0, log_wq_sz 7.
        assert_eq!(&v[0x70..0x74], &[0x00, 0x06, 0x00, 0x07]);
        assert_eq!(&v[0x110..0x118], &[0, 0, 0, 0, 0x00, 0x70, 0, 0]);
    }

    #[test]
    fn create_srq_golden() {
        let v = encode_input(&CreateSrq {
            pd: 3,
            log_size: 7,
            log_rq_stride: 2,
            lwm: 16,
            dbr: Iova(0x0060_0008),
            pas: vec![Iova(0x0070_0000)],
        });
        assert_eq!(v.len(), 0x118);
        assert_eq!(&v[0..4], &[0x07, 0x00, 0, 0]);
        // srqc at 0x10: log_srq_size 27:24; rlky (28) | log_rq_stride 26:24.
        assert_eq!(&v[0x10..0x18], &[0x07, 0, 0, 0, 0x12, 0, 0, 0]);
        assert_eq!(&v[0x28..0x2C], &[0, 0, 0, 3]);
        assert_eq!(&v[0x2C..0x30], &[0, 16, 0, 0]);
        assert_eq!(&v[0x38..0x40], &[0, 0, 0, 0, 0x00, 0x60, 0x00, 0x08]);
        assert_eq!(&v[0x110..0x118], &[0, 0, 0, 0, 0x00, 0x70, 0, 0]);
        assert_eq!(
            encode_input(&DestroySrq(0x41))[..12],
            [0x07, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x41]
        );
        assert_eq!(
            encode_input(&ArmSrq { srqn: 0x41, lwm: 8 }),
            [0x07, 0x03, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0x41, 0, 0, 0, 8]
        );
    }

    #[test]
    fn modify_and_destroy_golden() {
        let v = encode_input(&ModifyRmpLwm { rmpn: 0x41, lwm: 8 });
        assert_eq!(
            &v[0..0x18],
            &[
                0x09, 0x0D, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0x41, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1
            ]
        );
        assert_eq!(&v[0x54..0x58], &[0, 0, 0, 8]);
        assert_eq!(
            encode_input(&DestroyRmp(0x41))[..12],
            [0x09, 0x0E, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x41]
        );
    }
}
