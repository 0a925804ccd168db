//! Big-endian field access for the device side.
//!
//! Deliberately separate from the driver's layout code: the model decodes
//! what the driver wrote with its own reading of the reference tables, so a
//! wrong offset on either side shows up as a failing test instead of being
//! mirrored.

/// Bits `hi..=lo` of the big-endian dword at `off`.
pub fn field(buf: &[u8], off: usize, hi: u32, lo: u32) -> u32 {
    let w = dword(buf, off);
    let width = hi - lo + 1;
    let mask = if width == 32 {
        u32::MAX
    } else {
        (1 << width) - 1
    };
    (w >> lo) & mask
}

/// Sets bits `hi..=lo` of the big-endian dword at `off`.
pub fn set_field(buf: &mut [u8], off: usize, hi: u32, lo: u32, v: u32) {
    let width = hi - lo + 1;
    let mask = if width == 32 {
        u32::MAX
    } else {
        (1 << width) - 1
    };
    let w = (dword(buf, off) & !(mask << lo)) | ((v & mask) << lo);
    set_dword(buf, off, w);
}

/// The big-endian dword at `off` (0 past the end).
pub fn dword(buf: &[u8], off: usize) -> u32 {
    match buf.get(off..off + 4) {
        Some(b) => u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        None => 0,
    }
}

/// Stores a big-endian dword (ignored past the end).
pub fn set_dword(buf: &mut [u8], off: usize, v: u32) {
    if let Some(b) = buf.get_mut(off..off + 4) {
        b.copy_from_slice(&v.to_be_bytes());
    }
}

/// The big-endian qword at `off`.
pub fn qword(buf: &[u8], off: usize) -> u64 {
    (u64::from(dword(buf, off)) << 32) | u64::from(dword(buf, off + 4))
}

/// Stores a big-endian qword.
pub fn set_qword(buf: &mut [u8], off: usize, v: u64) {
    set_dword(buf, off, (v >> 32) as u32);
    set_dword(buf, off + 4, v as u32);
}

/// Stores a big-endian u16.
pub fn set_word(buf: &mut [u8], off: usize, v: u16) {
    if let Some(b) = buf.get_mut(off..off + 2) {
        b.copy_from_slice(&v.to_be_bytes());
    }
}

/// The big-endian u16 at `off`.
pub fn word(buf: &[u8], off: usize) -> u16 {
    match buf.get(off..off + 2) {
        Some(b) => u16::from_be_bytes([b[0], b[1]]),
        None => 0,
    }
}

/// XOR of all bytes.
pub fn xor(buf: &[u8]) -> u8 {
    buf.iter().fold(0, |a, b| a ^ b)
}
