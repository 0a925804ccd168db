//! Capabilities of a ConnectX-5-like function with one InfiniBand port
//! (general capability block, reference §4.4 offsets).

use crate::bytes::{field, set_field};

/// A capability block.
pub type CapBlock = Box<[u8; 4096]>;

/// (dword offset, hi, lo) of the general capability fields the model sets.
#[allow(missing_docs)]
pub mod f {
    pub type F = (usize, u32, u32);
    pub const LOG_MAX_SRQ_SZ: F = (0x010, 31, 24);
    pub const LOG_MAX_QP_SZ: F = (0x010, 23, 16);
    pub const LOG_MAX_QP: F = (0x010, 4, 0);
    pub const LOG_MAX_SRQ: F = (0x014, 20, 16);
    pub const LOG_MAX_CQ_SZ: F = (0x018, 23, 16);
    pub const LOG_MAX_CQ: F = (0x018, 4, 0);
    pub const LOG_MAX_EQ_SZ: F = (0x01C, 31, 24);
    pub const LOG_MAX_MKEY: F = (0x01C, 21, 16);
    pub const TERMINATE_SCATTER_LIST_MKEY: F = (0x01C, 9, 9);
    pub const FAST_TEARDOWN: F = (0x01C, 4, 4);
    pub const LOG_MAX_EQ: F = (0x01C, 3, 0);
    pub const FORCE_TEARDOWN: F = (0x020, 15, 15);
    pub const GID_TABLE_SIZE: F = (0x02C, 15, 0);
    pub const PKEY_TABLE_SIZE: F = (0x030, 15, 0);
    pub const VPORT_GROUP_MANAGER: F = (0x034, 31, 31);
    pub const IB_VIRT: F = (0x034, 29, 29);
    pub const LOCAL_CA_ACK_DELAY: F = (0x034, 20, 16);
    pub const DISABLE_LINK_UP: F = (0x034, 11, 11);
    pub const PORT_TYPE: F = (0x034, 9, 8);
    pub const NUM_PORTS: F = (0x034, 7, 0);
    pub const LOG_MAX_MSG: F = (0x038, 28, 24);
    pub const STAT_RATE_SUPPORT: F = (0x03C, 31, 16);
    pub const CQE_VERSION: F = (0x03C, 3, 0);
    pub const IPOIB_ENHANCED_OFFLOADS: F = (0x040, 28, 28);
    pub const IPOIB_BASIC_OFFLOADS: F = (0x040, 27, 27);
    pub const CMDIF_CHECKSUM: F = (0x040, 15, 14);
    pub const CQ_OI: F = (0x044, 31, 31);
    pub const CQ_RESIZE: F = (0x044, 30, 30);
    pub const CQ_MODERATION: F = (0x044, 29, 29);
    pub const CQ_PERIOD_MODE_MODIFY: F = (0x044, 28, 28);
    pub const CQ_PERIOD_START_FROM_CQE: F = (0x044, 20, 20);
    pub const QKV: F = (0x044, 9, 9);
    pub const PKV: F = (0x044, 8, 8);
    pub const SET_DETH_SQPN: F = (0x044, 7, 7);
    pub const UD: F = (0x044, 2, 2);
    pub const UC: F = (0x044, 1, 1);
    pub const RC: F = (0x044, 0, 0);
    pub const BF: F = (0x04C, 31, 31);
    pub const MKEY_BY_NAME: F = (0x04C, 25, 25);
    pub const LOG_BF_REG_SIZE: F = (0x04C, 20, 16);
    pub const MAX_WQE_SZ_SQ: F = (0x050, 15, 0);
    pub const MAX_WQE_SZ_RQ: F = (0x054, 15, 0);
    pub const MAX_QP_MCG: F = (0x05C, 24, 0);
    pub const LOG_MAX_MCG: F = (0x060, 7, 0);
    pub const LOG_MAX_PD: F = (0x064, 20, 16);
    pub const LOG_MAX_RQ: F = (0x06C, 28, 24);
    pub const LOG_MAX_SQ: F = (0x06C, 20, 16);
    pub const LOG_MAX_RMP: F = (0x070, 28, 24);
    pub const LOG_MAX_WQ_SZ: F = (0x078, 4, 0);
    pub const MAX_NUM_EQS: F = (0x08C, 15, 0);
    pub const LOG_UAR_PAGE_SZ: F = (0x090, 15, 0);
}

/// Reads a field of a block.
pub fn get(b: &[u8; 4096], fl: f::F) -> u32 {
    field(&b[..], fl.0, fl.1, fl.2)
}

/// Writes a field of a block.
pub fn set(b: &mut [u8; 4096], fl: f::F, v: u32) {
    set_field(&mut b[..], fl.0, fl.1, fl.2, v)
}

/// The maximum (supported) general capabilities.
pub fn general_max() -> CapBlock {
    let mut b: CapBlock = Box::new([0u8; 4096]);
    let values: &[(f::F, u32)] = &[
        (f::LOG_MAX_SRQ_SZ, 15),
        (f::LOG_MAX_QP_SZ, 15),
        (f::LOG_MAX_QP, 24),
        (f::LOG_MAX_SRQ, 23),
        (f::LOG_MAX_CQ_SZ, 22),
        (f::LOG_MAX_CQ, 24),
        (f::LOG_MAX_EQ_SZ, 22),
        (f::LOG_MAX_MKEY, 24),
        (f::TERMINATE_SCATTER_LIST_MKEY, 1),
        (f::FAST_TEARDOWN, 1),
        (f::LOG_MAX_EQ, 7),
        (f::FORCE_TEARDOWN, 1),
        (f::GID_TABLE_SIZE, 0),
        (f::PKEY_TABLE_SIZE, 0),
        (f::VPORT_GROUP_MANAGER, 1),
        (f::IB_VIRT, 0),
        (f::LOCAL_CA_ACK_DELAY, 16),
        (f::PORT_TYPE, 0),
        (f::NUM_PORTS, 1),
        (f::LOG_MAX_MSG, 30),
        (f::STAT_RATE_SUPPORT, 0x7FFF),
        (f::CQE_VERSION, 1),
        (f::IPOIB_ENHANCED_OFFLOADS, 1),
        (f::IPOIB_BASIC_OFFLOADS, 1),
        (f::CMDIF_CHECKSUM, 3),
        (f::CQ_OI, 1),
        (f::CQ_RESIZE, 1),
        (f::CQ_MODERATION, 1),
        (f::CQ_PERIOD_MODE_MODIFY, 1),
        (f::CQ_PERIOD_START_FROM_CQE, 1),
        (f::QKV, 1),
        (f::PKV, 1),
        (f::SET_DETH_SQPN, 1),
        (f::UD, 1),
        (f::UC, 1),
        (f::RC, 1),
        (f::BF, 1),
        (f::MKEY_BY_NAME, 1),
        (f::LOG_BF_REG_SIZE, 9),
        (f::MAX_WQE_SZ_SQ, 1024),
        (f::MAX_WQE_SZ_RQ, 512),
        (f::MAX_QP_MCG, 240),
        (f::LOG_MAX_MCG, 21),
        (f::LOG_MAX_PD, 24),
        (f::LOG_MAX_RQ, 23),
        (f::LOG_MAX_SQ, 23),
        (f::LOG_MAX_RMP, 23),
        (f::LOG_MAX_WQ_SZ, 16),
        (f::MAX_NUM_EQS, 128),
        (f::LOG_UAR_PAGE_SZ, 0),
    ];
    for &(fl, v) in values {
        set(&mut b, fl, v);
    }
    b
}

/// The current general capabilities after reset: the maximum, except the
/// fields firmware starts with a conservative value for.
pub fn general_current() -> CapBlock {
    let mut b = general_max();
    set(&mut b, f::LOG_MAX_QP, 18);
    set(&mut b, f::CMDIF_CHECKSUM, 0);
    set(&mut b, f::MKEY_BY_NAME, 0);
    b
}
