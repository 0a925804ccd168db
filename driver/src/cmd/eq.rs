//! CREATE_EQ / DESTROY_EQ (reference §4.10).

use super::{CmdError, Command, Opcode, object_command};
use crate::layout::{BitField, put_be64};
use crate::transport::Iova;

/// eqc fields, relative to the context at input 0x10.
mod eqc {
    use crate::layout::BitField;
    pub const LOG_EQ_SIZE: BitField = BitField::dw(0x0C, 28, 24);
    pub const UAR_PAGE: BitField = BitField::dw(0x0C, 23, 0);
    pub const INTR: BitField = BitField::dw(0x14, 11, 0);
    pub const LOG_PAGE_SIZE: BitField = BitField::dw(0x18, 28, 24);
}
const EQC: usize = 0x10;
const EVENT_BITMASK: usize = 0x58;
const PAS: usize = 0x110;
const EQ_NUMBER: BitField = BitField::dw(0x08, 7, 0);

/// CREATE_EQ.
#[derive(Clone, Debug)]
pub struct CreateEq {
    /// log2(number of EQEs).
    pub log_size: u8,
    /// UAR whose doorbells serve this EQ.
    pub uar: u32,
    /// MSI-X vector.
    pub intr: u16,
    /// Buffer page = 4096 << log_page_size.
    pub log_page_size: u8,
    /// Event types (bit t of word t / 64).
    pub event_mask: [u64; 4],
    /// Buffer pages.
    pub pas: Vec<Iova>,
}

impl Command for CreateEq {
    const OPCODE: Opcode = Opcode::CREATE_EQ;
    /// The EQ number.
    type Reply = u8;
    fn inlen(&self) -> usize {
        PAS + 8 * self.pas.len()
    }
    fn outlen(&self) -> usize {
        0x10
    }
    fn encode(&self, i: &mut [u8]) {
        eqc::LOG_EQ_SIZE
            .within(EQC)
            .set(i, u32::from(self.log_size));
        eqc::UAR_PAGE.within(EQC).set(i, self.uar);
        eqc::INTR.within(EQC).set(i, u32::from(self.intr));
        eqc::LOG_PAGE_SIZE
            .within(EQC)
            .set(i, u32::from(self.log_page_size));
        for (n, w) in self.event_mask.iter().enumerate() {
            put_be64(i, EVENT_BITMASK + 8 * n, *w);
        }
        for (n, p) in self.pas.iter().enumerate() {
            put_be64(i, PAS + 8 * n, p.0);
        }
    }
    fn decode(&self, o: &[u8]) -> Result<u8, CmdError> {
        Ok(EQ_NUMBER.get(o) as u8)
    }
}

object_command!(
    /// DESTROY_EQ.
    DestroyEq(u8), Opcode::DESTROY_EQ, EQ_NUMBER
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::{check_output, encode_input};

    #[test]
    fn create_eq_golden() {
        // rdma-core's async EQ (§3.1 step 16): 256 entries, uar 2, vector 0,
        // mask 0x0C00, one 16 KiB page (log_page_size 2).
        let c = CreateEq {
            log_size: 8,
            uar: 2,
            intr: 0,
            log_page_size: 2,
            event_mask: [0x0C00, 0, 0, 0],
            pas: vec![Iova(0x0010_0000)],
        };
        let v = encode_input(&c);
        assert_eq!(v.len(), 0x118);
        assert_eq!(&v[0..4], &[0x03, 0x01, 0x00, 0x00]);
        // eqc at 0x10; log_eq_size at eqc 0x0C bits 28:24, uar_page 23:0.
        assert_eq!(&v[0x1C..0x20], &[0x08, 0x00, 0x00, 0x02]);
        // intr at eqc 0x14.
        assert_eq!(&v[0x24..0x28], &[0, 0, 0, 0]);
        // log_page_size at eqc 0x18 bits 28:24.
        assert_eq!(&v[0x28..0x2C], &[0x02, 0, 0, 0]);
        // event_bitmask[0] at 0x58 (BE64).
        assert_eq!(&v[0x58..0x60], &[0, 0, 0, 0, 0, 0, 0x0C, 0x00]);
        // pas[0] at 0x110.
        assert_eq!(&v[0x110..0x118], &[0, 0, 0, 0, 0, 0x10, 0, 0]);
        let mut out = [0u8; 16];
        out[0x0B] = 0x07;
        assert_eq!(check_output(&c, &out).unwrap(), 7);
    }

    #[test]
    fn destroy_eq_golden() {
        assert_eq!(
            encode_input(&DestroyEq(7)),
            [0x03, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x07, 0, 0, 0, 0]
        );
    }
}
