//! CREATE_CQ / DESTROY_CQ / MODIFY_CQ (reference §4.11).

use super::{CmdError, Command, Opcode, object_command};
use crate::layout::{BitField, put_be64};
use crate::transport::Iova;

/// cqc fields, relative to the context.
pub mod cqc {
    #![allow(missing_docs)]
    use crate::layout::BitField;
    pub const CQE_SZ: BitField = BitField::dw(0x00, 23, 21);
    pub const OI: BitField = BitField::bit(0x00, 17);
    pub const CQ_PERIOD_MODE: BitField = BitField::dw(0x00, 16, 15);
    pub const LOG_CQ_SIZE: BitField = BitField::dw(0x0C, 28, 24);
    pub const UAR_PAGE: BitField = BitField::dw(0x0C, 23, 0);
    pub const CQ_PERIOD: BitField = BitField::dw(0x10, 27, 16);
    pub const CQ_MAX_COUNT: BitField = BitField::dw(0x10, 15, 0);
    pub const C_EQN: BitField = BitField::dw(0x14, 31, 0);
    pub const LOG_PAGE_SIZE: BitField = BitField::dw(0x18, 28, 24);
    pub const DBR_ADDR: usize = 0x38;
}

const CQC: usize = 0x10;
const PAS: usize = 0x110;
const CQN: BitField = BitField::dw(0x08, 23, 0);

/// CREATE_CQ with 64-byte CQEs.
#[derive(Clone, Debug)]
pub struct CreateCq {
    /// log2 entries.
    pub log_size: u8,
    /// UAR for the arm doorbell.
    pub uar: u32,
    /// EQ receiving completion events.
    pub eqn: u32,
    /// Moderation period (µs).
    pub period: u16,
    /// Moderation count.
    pub max_count: u16,
    /// Doorbell record.
    pub dbr: Iova,
    /// Buffer pages (4 KiB each).
    pub pas: Vec<Iova>,
}

impl Command for CreateCq {
    const OPCODE: Opcode = Opcode::CREATE_CQ;
    /// The CQN.
    type Reply = u32;
    fn inlen(&self) -> usize {
        PAS + 8 * self.pas.len()
    }
    fn outlen(&self) -> usize {
        0x10
    }
    fn encode(&self, i: &mut [u8]) {
        cqc::LOG_CQ_SIZE
            .within(CQC)
            .set(i, u32::from(self.log_size));
        cqc::UAR_PAGE.within(CQC).set(i, self.uar);
        cqc::C_EQN.within(CQC).set(i, self.eqn);
        cqc::CQ_PERIOD.within(CQC).set(i, u32::from(self.period));
        cqc::CQ_MAX_COUNT
            .within(CQC)
            .set(i, u32::from(self.max_count));
        cqc::LOG_PAGE_SIZE.within(CQC).set(i, 0);
        put_be64(i, CQC + cqc::DBR_ADDR, self.dbr.0);
        for (n, p) in self.pas.iter().enumerate() {
            put_be64(i, PAS + 8 * n, p.0);
        }
    }
    fn decode(&self, o: &[u8]) -> Result<u32, CmdError> {
        Ok(CQN.get(o))
    }
}

object_command!(
    /// DESTROY_CQ.
    DestroyCq(u32), Opcode::DESTROY_CQ, CQN
);

/// MODIFY_CQ op_mod 0 with field select cq_period | cq_max_count: interrupt
/// moderation as Linux sets it.
#[derive(Clone, Copy, Debug)]
pub struct ModifyCqModeration {
    /// CQ.
    pub cqn: u32,
    /// Period in µs (max 0xFFF).
    pub period: u16,
    /// Count (max 0xFFFF).
    pub max_count: u16,
}

impl Command for ModifyCqModeration {
    const OPCODE: Opcode = Opcode::MODIFY_CQ;
    type Reply = ();
    fn inlen(&self) -> usize {
        0x110
    }
    fn outlen(&self) -> usize {
        0x10
    }
    fn encode(&self, i: &mut [u8]) {
        CQN.set(i, self.cqn);
        BitField::dw(0x0C, 31, 0).set(i, 0x3);
        cqc::CQ_PERIOD
            .within(CQC)
            .set(i, u32::from(self.period.min(0xFFF)));
        cqc::CQ_MAX_COUNT
            .within(CQC)
            .set(i, u32::from(self.max_count));
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
    fn create_cq_golden() {
        let c = CreateCq {
            log_size: 8,
            uar: 3,
            eqn: 1,
            period: 16,
            max_count: 32,
            dbr: Iova(0x0020_0040),
            pas: vec![
                Iova(0x0030_0000),
                Iova(0x0030_1000),
                Iova(0x0030_2000),
                Iova(0x0030_3000),
            ],
        };
        let v = encode_input(&c);
        assert_eq!(v.len(), 0x130);
        assert_eq!(&v[0..4], &[0x04, 0x00, 0, 0]);
        // cqc at 0x10: dword 0x0C log_cq_size 28:24 | uar_page.
        assert_eq!(&v[0x1C..0x20], &[0x08, 0, 0, 0x03]);
        // dword 0x10: cq_period 27:16 | cq_max_count 15:0.
        assert_eq!(&v[0x20..0x24], &[0x00, 0x10, 0x00, 0x20]);
        // dword 0x14: c_eqn.
        assert_eq!(&v[0x24..0x28], &[0, 0, 0, 1]);
        // dbr_addr at cqc 0x38.
        assert_eq!(&v[0x48..0x50], &[0, 0, 0, 0, 0x00, 0x20, 0x00, 0x40]);
        assert_eq!(&v[0x110..0x118], &[0, 0, 0, 0, 0x00, 0x30, 0, 0]);
        assert_eq!(&v[0x128..0x130], &[0, 0, 0, 0, 0x00, 0x30, 0x30, 0]);
    }

    #[test]
    fn modify_cq_moderation_golden() {
        let v = encode_input(&ModifyCqModeration {
            cqn: 0x85,
            period: 0x2000, // clamped to 0xFFF
            max_count: 64,
        });
        assert_eq!(v.len(), 0x110);
        assert_eq!(
            &v[0..0x10],
            &[0x04, 0x03, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x85, 0, 0, 0, 0x03]
        );
        assert_eq!(&v[0x20..0x24], &[0x0F, 0xFF, 0x00, 0x40]);
    }

    #[test]
    fn destroy_cq_golden() {
        assert_eq!(
            encode_input(&DestroyCq(0x85)),
            [0x04, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x85, 0, 0, 0, 0]
        );
    }
}
