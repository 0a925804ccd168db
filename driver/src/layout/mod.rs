//! mlx5 structures as byte views.
//!
//! The PRM and `mlx5_ifc.h` describe every structure as big-endian 32-bit
//! words; the reference tables give each field as (byte offset of its word,
//! `hi:lo` bits inside it). [`BitField`] keeps exactly that form, so a field
//! definition can be checked against the table by eye. Accessors never
//! panic: reads outside the buffer give 0 and writes outside it are ignored
//! (buffers are sized by the command definitions, so that only happens on a
//! driver bug, which the golden-byte tests catch).

pub mod caps;
pub mod cmd;
pub mod cqe;
pub mod eqe;
pub mod health;
pub mod smp;
pub mod wqe;

/// A field of a big-endian dword: byte offset of the dword, bits `hi..=lo`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitField {
    off: usize,
    hi: u8,
    lo: u8,
}

impl BitField {
    /// The field at dword `off`, bits `hi:lo` (31 is the MSB of byte `off`).
    pub const fn dw(off: usize, hi: u8, lo: u8) -> BitField {
        assert!(off.is_multiple_of(4) && hi < 32 && lo <= hi);
        BitField { off, hi, lo }
    }

    /// A one-bit field.
    pub const fn bit(off: usize, bit: u8) -> BitField {
        BitField::dw(off, bit, bit)
    }

    /// The same field `base` bytes further on (a context inside a command).
    pub const fn within(self, base: usize) -> BitField {
        BitField {
            off: self.off + base,
            hi: self.hi,
            lo: self.lo,
        }
    }

    const fn mask(self) -> u32 {
        let w = (self.hi - self.lo + 1) as u32;
        if w == 32 { u32::MAX } else { (1u32 << w) - 1 }
    }

    /// Reads the field.
    pub fn get(self, buf: &[u8]) -> u32 {
        (be32(buf, self.off) >> self.lo) & self.mask()
    }

    /// Writes the field (value truncated to its width), leaving the rest of
    /// the dword as it was.
    pub fn set(self, buf: &mut [u8], v: u32) {
        let m = self.mask() << self.lo;
        let w = (be32(buf, self.off) & !m) | ((v << self.lo) & m);
        put_be32(buf, self.off, w);
    }
}

/// Big-endian u32 at `off` (0 past the end).
pub fn be32(buf: &[u8], off: usize) -> u32 {
    buf.get(off..off + 4)
        .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Stores a big-endian u32 at `off` (ignored past the end).
pub fn put_be32(buf: &mut [u8], off: usize, v: u32) {
    if let Some(b) = buf.get_mut(off..off + 4) {
        b.copy_from_slice(&v.to_be_bytes());
    }
}

/// Big-endian u64 at `off` (0 past the end).
pub fn be64(buf: &[u8], off: usize) -> u64 {
    (u64::from(be32(buf, off)) << 32) | u64::from(be32(buf, off + 4))
}

/// Stores a big-endian u64 at `off`.
pub fn put_be64(buf: &mut [u8], off: usize, v: u64) {
    put_be32(buf, off, (v >> 32) as u32);
    put_be32(buf, off + 4, v as u32);
}

/// Big-endian u16 at `off` (0 past the end).
pub fn be16(buf: &[u8], off: usize) -> u16 {
    buf.get(off..off + 2)
        .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]))
}

/// Stores a big-endian u16 at `off`.
pub fn put_be16(buf: &mut [u8], off: usize, v: u16) {
    if let Some(b) = buf.get_mut(off..off + 2) {
        b.copy_from_slice(&v.to_be_bytes());
    }
}

/// XOR of a byte range, the building block of mlx5 signatures.
pub fn xor8(buf: &[u8]) -> u8 {
    buf.iter().fold(0, |a, b| a ^ b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitfield_matches_reference_decode_rule() {
        // Reference §0.1: v = (be32(buf[off..]) >> lo) & ((1 << (hi-lo+1)) - 1).
        let buf = [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0];
        assert_eq!(BitField::dw(0, 31, 16).get(&buf), 0x1234);
        assert_eq!(BitField::dw(4, 15, 0).get(&buf), 0xdef0);
        assert_eq!(BitField::dw(4, 31, 24).get(&buf), 0x9a);
        assert_eq!(BitField::bit(0, 3).get(&buf), 1);
        assert_eq!(BitField::dw(0, 31, 0).get(&buf), 0x1234_5678);
    }

    #[test]
    fn set_preserves_neighbours() {
        let mut buf = [0xffu8; 4];
        BitField::dw(0, 23, 16).set(&mut buf, 0x5a);
        assert_eq!(buf, [0xff, 0x5a, 0xff, 0xff]);
        BitField::dw(0, 3, 0).set(&mut buf, 0x1f0);
        assert_eq!(buf, [0xff, 0x5a, 0xff, 0xf0]);
    }

    #[test]
    fn out_of_bounds_is_harmless() {
        let mut buf = [0u8; 2];
        assert_eq!(BitField::dw(0, 31, 0).get(&buf), 0);
        BitField::dw(4, 31, 0).set(&mut buf, 7);
        assert_eq!(buf, [0, 0]);
    }
}
