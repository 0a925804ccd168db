//! Completion queue consumer state (reference §6.3, §6.5).

use crate::layout::cqe::opcode;

/// Consumer side of a CQ of `1 << log_size` 64-byte entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CqRing {
    log_size: u8,
    cc: u32,
}

/// Arm command: notify on the next completion.
pub const ARM_NEXT: u32 = 0;
/// Arm command: notify on the next solicited or error completion.
pub const ARM_SOLICITED: u32 = 1;

impl CqRing {
    /// A fresh ring.
    pub fn new(log_size: u8) -> CqRing {
        CqRing { log_size, cc: 0 }
    }

    /// Entries.
    pub fn len(&self) -> usize {
        1 << self.log_size
    }

    /// Never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Consumer counter.
    pub fn cc(&self) -> u32 {
        self.cc
    }

    /// Index of the next entry.
    pub fn index(&self) -> usize {
        (self.cc as usize) & (self.len() - 1)
    }

    /// Whether the entry whose `op_own` reads `op_own` belongs to software.
    pub fn is_valid(&self, op_own: u8) -> bool {
        (op_own >> 4) != opcode::INVALID && (op_own & 1) == ((self.cc >> self.log_size) & 1) as u8
    }

    /// Consumes one entry.
    pub fn advance(&mut self) {
        self.cc = self.cc.wrapping_add(1);
    }

    /// The `set_ci` word of the doorbell record.
    pub fn set_ci(&self) -> u32 {
        self.cc & 0x00FF_FFFF
    }

    /// The arm word (§6.5): `arm_sn & 3` in 29:28, command in 27:24, counter in 23:0.
    pub fn arm_word(&self, arm_sn: u32, cmd: u32) -> u32 {
        ((arm_sn & 3) << 28) | ((cmd & 0xF) << 24) | self.set_ci()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_opcode_is_never_valid() {
        let r = CqRing::new(4);
        assert!(!r.is_valid(0xF0));
        assert!(r.is_valid(0x00));
        assert!(!r.is_valid(0x01));
    }

    #[test]
    fn parity_flips_each_lap() {
        let mut r = CqRing::new(2);
        for _ in 0..4 {
            assert!(r.is_valid(0x20));
            r.advance();
        }
        assert!(!r.is_valid(0x20));
        assert!(r.is_valid(0x21));
    }

    #[test]
    fn arm_word_layout() {
        let mut r = CqRing::new(8);
        for _ in 0..0x123 {
            r.advance();
        }
        assert_eq!(r.arm_word(5, ARM_SOLICITED), 0x1100_0123);
    }
}
