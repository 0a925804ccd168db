//! Health buffer (BAR0 0x0200–0x023F, reference §1.3).

use std::fmt;

/// BAR0 offset of the health buffer.
pub const HEALTH_BASE: u32 = 0x0200;
/// Length of the health buffer.
pub const HEALTH_LEN: usize = 64;

/// A decoded health buffer snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct HealthBuffer {
    /// assert_var[0..5].
    pub assert_var: [u32; 6],
    /// assert_exit_ptr.
    pub assert_exit_ptr: u32,
    /// assert_callra.
    pub assert_callra: u32,
    /// Firmware version word (0xFFFFFFFF when the PCI link is gone).
    pub fw_ver: u32,
    /// Hardware id.
    pub hw_id: u32,
    /// Recovery flow required.
    pub rfr: bool,
    /// Severity is valid.
    pub valid: bool,
    /// Syslog-style severity (0 emergency .. 7 debug).
    pub severity: u8,
    /// iRISC index.
    pub irisc_index: u8,
    /// Health syndrome; 0 = healthy.
    pub synd: u8,
    /// Extended syndrome.
    pub ext_synd: u16,
}

impl HealthBuffer {
    /// Decodes the 64 bytes of the buffer (as big-endian bytes).
    pub fn parse(b: &[u8; HEALTH_LEN]) -> HealthBuffer {
        let w = |o: usize| super::be32(b, o);
        let mut assert_var = [0; 6];
        for (i, v) in assert_var.iter_mut().enumerate() {
            *v = w(i * 4);
        }
        let flags = b[0x38];
        HealthBuffer {
            assert_var,
            assert_exit_ptr: w(0x20),
            assert_callra: w(0x24),
            fw_ver: w(0x30),
            hw_id: w(0x34),
            rfr: flags & 0x80 != 0,
            valid: flags & 0x08 != 0,
            severity: flags & 0x07,
            irisc_index: b[0x3C],
            synd: b[0x3D],
            ext_synd: super::be16(b, 0x3E),
        }
    }

    /// Whether the firmware reports a fatal condition (rfr and a syndrome).
    pub fn fatal(&self) -> bool {
        self.rfr && self.synd != 0
    }
}

/// Name of a health syndrome (§1.3).
pub fn syndrome_name(s: u8) -> &'static str {
    match s {
        0x00 => "healthy",
        0x01 => "firmware internal error",
        0x07 => "iRISC not responding",
        0x08 => "unrecoverable hardware error",
        0x09 => "firmware CRC error",
        0x0A => "ICM fetch PCI error",
        0x0B => "ICM page error (HW fatal error)",
        0x0C => "asynchronous EQ buffer overrun",
        0x0D => "EQ in error",
        0x0E => "invalid EQ referenced",
        0x0F => "FFSER error",
        0x10 => "high temperature",
        0x12 => "ICM fetch PCI data poisoned",
        0x13 => "trust lockdown error",
        _ => "unknown syndrome",
    }
}

impl fmt::Display for HealthBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "syndrome {:#04x} ({}), ext_synd {:#06x}, rfr {}, severity {}, irisc {}, exit_ptr {:#010x}, callra {:#010x}",
            self.synd,
            syndrome_name(self.synd),
            self.ext_synd,
            u8::from(self.rfr),
            if self.valid {
                self.severity.to_string()
            } else {
                "n/a".into()
            },
            self.irisc_index,
            self.assert_exit_ptr,
            self.assert_callra
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_fatal_buffer() {
        let mut b = [0u8; HEALTH_LEN];
        b[0x20..0x24].copy_from_slice(&[0x00, 0x12, 0x34, 0x56]);
        b[0x30..0x34].copy_from_slice(&[0x00, 0x10, 0x00, 0x23]);
        b[0x38] = 0x80 | 0x08 | 0x02; // rfr, valid, severity 2
        b[0x3D] = 0x08;
        b[0x3E] = 0x01;
        b[0x3F] = 0x02;
        let h = HealthBuffer::parse(&b);
        assert!(h.fatal());
        assert_eq!(h.synd, 8);
        assert_eq!(h.ext_synd, 0x0102);
        assert_eq!(h.severity, 2);
        assert_eq!(h.assert_exit_ptr, 0x0012_3456);
        assert!(h.to_string().contains("unrecoverable hardware error"));
    }

    #[test]
    fn healthy_is_not_fatal() {
        let h = HealthBuffer::parse(&[0; HEALTH_LEN]);
        assert!(!h.fatal());
    }
}
