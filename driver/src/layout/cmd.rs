//! Command queue entry and mailbox block (reference §2.2–2.4).

use super::{BitField, xor8};

/// Size of one command queue entry.
pub const ENTRY_LEN: usize = 64;
/// Bytes of input and output carried inline in the entry.
pub const INLINE_LEN: usize = 16;
/// Size of one mailbox block as the device reads it.
pub const BLOCK_LEN: usize = 576;
/// Data bytes per mailbox block.
pub const BLOCK_DATA: usize = 512;
/// Stride between mailbox blocks in our chains (Linux aligns them to 1 KiB).
pub const BLOCK_STRIDE: usize = 1024;

/// Command queue entry fields (§2.2).
pub mod entry {
    use super::BitField;
    /// Transport type; must be [`super::CMD_TYPE_PCI`].
    pub const TYPE: BitField = BitField::dw(0x00, 31, 24);
    /// Total input length.
    pub const INLEN: BitField = BitField::dw(0x04, 31, 0);
    /// First input mailbox (8 bytes).
    pub const IN_PTR: usize = 0x08;
    /// Inline input bytes.
    pub const IN: usize = 0x10;
    /// Inline output bytes.
    pub const OUT: usize = 0x20;
    /// First output mailbox (8 bytes).
    pub const OUT_PTR: usize = 0x30;
    /// Total output length.
    pub const OUTLEN: BitField = BitField::dw(0x38, 31, 0);
    /// Token byte.
    pub const TOKEN: usize = 0x3C;
    /// Signature byte.
    pub const SIG: usize = 0x3D;
    /// Delivery status (bits 7:1) and ownership (bit 0).
    pub const STATUS_OWN: usize = 0x3F;
}

/// `MLX5_PCI_CMD_XPORT`.
pub const CMD_TYPE_PCI: u32 = 0x07;
/// Ownership bit: 1 = firmware owns the entry.
pub const OWNER_HW: u8 = 0x01;

/// Mailbox block fields (§2.3).
pub mod block {
    /// Data, 512 bytes.
    pub const DATA: usize = 0x000;
    /// Next block pointer (8 bytes, BE).
    pub const NEXT: usize = 0x230;
    /// Block number (4 bytes, BE).
    pub const BLOCK_NUM: usize = 0x238;
    /// Token byte.
    pub const TOKEN: usize = 0x23D;
    /// Control signature byte.
    pub const CTRL_SIG: usize = 0x23E;
    /// Signature byte.
    pub const SIG: usize = 0x23F;
}

/// Entry signature: NOT of the XOR of all 64 bytes computed with `sig` = 0.
pub fn entry_signature(e: &[u8; ENTRY_LEN]) -> u8 {
    let mut c = *e;
    c[entry::SIG] = 0;
    !xor8(&c)
}

/// Sets `ctrl_sig` and `sig` of a 576-byte block.
pub fn sign_block(b: &mut [u8; BLOCK_LEN]) {
    b[block::CTRL_SIG] = 0;
    b[block::SIG] = 0;
    b[block::CTRL_SIG] = !xor8(&b[0x200..block::CTRL_SIG]);
    b[block::SIG] = !xor8(&b[..block::SIG]);
}

/// Number of mailbox blocks a command of `len` bytes needs (§2.3).
pub fn blocks_for(len: usize) -> usize {
    len.saturating_sub(INLINE_LEN).div_ceil(BLOCK_DATA)
}

/// Command status (output byte 0, §2.7).
pub const OUT_STATUS: BitField = BitField::dw(0x00, 31, 24);
/// Command syndrome (§2.7).
pub const OUT_SYNDROME: BitField = BitField::dw(0x04, 31, 0);
/// Command opcode (§2.7).
pub const IN_OPCODE: BitField = BitField::dw(0x00, 31, 16);
/// Opcode modifier (§2.7).
pub const IN_OP_MOD: BitField = BitField::dw(0x04, 15, 0);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_entry_xors_to_ff() {
        let mut e = [0u8; ENTRY_LEN];
        e[0] = 7;
        e[0x13] = 0x04;
        e[0x3F] = 1;
        e[entry::SIG] = entry_signature(&e);
        assert_eq!(xor8(&e), 0xFF);
    }

    #[test]
    fn signed_block_xors_to_ff_both_ways() {
        let mut b = [0u8; BLOCK_LEN];
        b[5] = 0x99;
        b[block::BLOCK_NUM + 3] = 3;
        b[block::TOKEN] = 0x42;
        sign_block(&mut b);
        assert_eq!(xor8(&b[0x200..=0x23E]), 0xFF);
        assert_eq!(xor8(&b), 0xFF);
    }

    #[test]
    fn block_counts() {
        assert_eq!(blocks_for(16), 0);
        assert_eq!(blocks_for(17), 1);
        assert_eq!(blocks_for(0x70), 1);
        assert_eq!(blocks_for(528), 1);
        assert_eq!(blocks_for(529), 2);
        assert_eq!(blocks_for(0x1010), 8);
    }
}
