//! Initialization segment registers (BAR0 0x0000, reference §1.2) and UAR
//! doorbell offsets (§1.4).

use crate::layout::health::HEALTH_BASE;

/// A named 32-bit BAR0 register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reg32 {
    /// Name used in errors.
    pub name: &'static str,
    /// BAR0 offset.
    pub off: u32,
}

impl Reg32 {
    const fn new(name: &'static str, off: u32) -> Reg32 {
        Reg32 { name, off }
    }
}

/// fw_rev_minor (31:16) | fw_rev_major (15:0).
pub const FW_REV: Reg32 = Reg32::new("fw_rev", 0x0000);
/// cmd_interface_rev (31:16) | fw_rev_subminor (15:0).
pub const CMDIF_REV_FW_SUB: Reg32 = Reg32::new("cmdif_rev_fw_sub", 0x0004);
/// Command queue address, high 32 bits.
pub const CMDQ_ADDR_H: Reg32 = Reg32::new("cmdq_addr_h", 0x0010);
/// Command queue address bits 31:12 | nic_interface (10:8) | log_cmdq_size (7:4) | log_cmdq_stride (3:0).
pub const CMDQ_ADDR_L_SZ: Reg32 = Reg32::new("cmdq_addr_l_sz", 0x0014);
/// Command doorbell vector.
pub const CMD_DBELL: Reg32 = Reg32::new("cmd_dbell", 0x0018);
/// initializing (bit 31).
pub const INITIALIZING: Reg32 = Reg32::new("initializing", 0x01FC);
/// Health buffer fw_ver word.
pub const HEALTH_FW_VER: Reg32 = Reg32::new("health.fw_ver", HEALTH_BASE + 0x30);
/// Firmware heartbeat.
pub const HEALTH_COUNTER: Reg32 = Reg32::new("health_counter", 0x1010);
/// Command timeout (Linux `lib/tout.c` encoding).
pub const CMD_EXEC_TO: Reg32 = Reg32::new("cmd_exec_to", 0x0FF8);
/// "initializing" timeout after programming the queue.
pub const CMD_Q_INIT_TO: Reg32 = Reg32::new("cmd_q_init_to", 0x0FFC);

/// The only command-interface revision both drivers accept.
pub const CMDIF_REV: u32 = 5;
/// initializing bit.
pub const INITIALIZING_BIT: u32 = 1 << 31;
/// nic_interface field shift (bits 10:8, see §10 item 2).
pub const NIC_IF_SHIFT: u32 = 8;
/// nic_interface field mask (after shift).
pub const NIC_IF_MASK: u32 = 0x7;
/// nic_interface: disabled.
pub const NIC_IF_DISABLED: u32 = 1;
/// nic_interface: software reset.
pub const NIC_IF_SW_RESET: u32 = 7;

/// UAR page size with log_uar_page_sz = 0.
pub const UAR_PAGE: u32 = 4096;
/// UAR: EQ consumer index and arm.
pub const UAR_EQ_ARM: u32 = 0x040;
/// UAR: EQ consumer index, no arm.
pub const UAR_EQ_NOARM: u32 = 0x048;
/// UAR: CQ arm doorbell (64-bit).
pub const UAR_CQ_DB: u32 = 0x020;
/// UAR: first BlueFlame / SQ doorbell register.
pub const UAR_BF: u32 = 0x800;

/// Decodes a `lib/tout.c` timeout register to milliseconds (None if 0).
pub fn decode_timeout_ms(v: u32) -> Option<u64> {
    if v == 0 {
        return None;
    }
    let count = u64::from(v & 0x000F_FFFF);
    let unit = (v >> 29) & 0x3;
    Some(match unit {
        0 => count,
        1 => count * 1000,
        2 => count * 60_000,
        _ => count * 3_600_000,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_encoding() {
        assert_eq!(decode_timeout_ms(0), None);
        assert_eq!(decode_timeout_ms(60_000), Some(60_000));
        assert_eq!(decode_timeout_ms((1 << 29) | 2), Some(2000));
        assert_eq!(decode_timeout_ms((2 << 29) | 2), Some(120_000));
    }
}
