//! General device capabilities (QUERY_HCA_CAP type 0, reference §4.4).
//! Offsets are within the 4096-byte capability block.

use super::BitField;

/// Size of a capability block.
pub const CAP_LEN: usize = 4096;

/// General capability fields used by the driver.
#[allow(missing_docs)]
pub mod field {
    use super::BitField;
    pub const PAGE_REQUEST_DISABLE: BitField = BitField::bit(0x000, 25);
    pub const LOG_MAX_SRQ_SZ: BitField = BitField::dw(0x010, 31, 24);
    pub const LOG_MAX_QP_SZ: BitField = BitField::dw(0x010, 23, 16);
    pub const LOG_MAX_QP: BitField = BitField::dw(0x010, 4, 0);
    pub const LOG_MAX_SRQ: BitField = BitField::dw(0x014, 20, 16);
    pub const LOG_MAX_CQ_SZ: BitField = BitField::dw(0x018, 23, 16);
    pub const LOG_MAX_CQ: BitField = BitField::dw(0x018, 4, 0);
    pub const LOG_MAX_EQ_SZ: BitField = BitField::dw(0x01C, 31, 24);
    pub const LOG_MAX_MKEY: BitField = BitField::dw(0x01C, 21, 16);
    pub const TERMINATE_SCATTER_LIST_MKEY: BitField = BitField::bit(0x01C, 9);
    pub const FAST_TEARDOWN: BitField = BitField::bit(0x01C, 4);
    pub const LOG_MAX_EQ: BitField = BitField::dw(0x01C, 3, 0);
    pub const FORCE_TEARDOWN: BitField = BitField::bit(0x020, 15);
    pub const GID_TABLE_SIZE: BitField = BitField::dw(0x02C, 15, 0);
    pub const PKEY_TABLE_SIZE: BitField = BitField::dw(0x030, 15, 0);
    pub const IB_VIRT: BitField = BitField::bit(0x034, 29);
    pub const DISABLE_LINK_UP: BitField = BitField::bit(0x034, 11);
    pub const PORT_TYPE: BitField = BitField::dw(0x034, 9, 8);
    pub const NUM_PORTS: BitField = BitField::dw(0x034, 7, 0);
    pub const LOG_MAX_MSG: BitField = BitField::dw(0x038, 28, 24);
    pub const CQE_VERSION: BitField = BitField::dw(0x03C, 3, 0);
    pub const IPOIB_ENHANCED_OFFLOADS: BitField = BitField::bit(0x040, 28);
    pub const IPOIB_BASIC_OFFLOADS: BitField = BitField::bit(0x040, 27);
    pub const CMDIF_CHECKSUM: BitField = BitField::dw(0x040, 15, 14);
    pub const CQ_MODERATION: BitField = BitField::bit(0x044, 29);
    pub const SET_DETH_SQPN: BitField = BitField::bit(0x044, 7);
    pub const UD: BitField = BitField::bit(0x044, 2);
    pub const RC: BitField = BitField::bit(0x044, 0);
    pub const UAR_4K: BitField = BitField::bit(0x048, 31);
    pub const MKEY_BY_NAME: BitField = BitField::bit(0x04C, 25);
    pub const LOG_BF_REG_SIZE: BitField = BitField::dw(0x04C, 20, 16);
    pub const MAX_QP_MCG: BitField = BitField::dw(0x05C, 24, 0);
    pub const LOG_MAX_MCG: BitField = BitField::dw(0x060, 7, 0);
    pub const LOG_MAX_PD: BitField = BitField::dw(0x064, 20, 16);
    pub const MAX_NUM_EQS: BitField = BitField::dw(0x08C, 15, 0);
    pub const LOG_UAR_PAGE_SZ: BitField = BitField::dw(0x090, 15, 0);
}

/// Capability types for QUERY/SET_HCA_CAP op_mod (§4.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum CapType {
    /// General device capabilities.
    General = 0x0,
    /// IPoIB enhanced offloads.
    IpoibEnhanced = 0x6,
}

/// A general capability block.
#[derive(Clone, PartialEq, Eq)]
pub struct GeneralCaps(pub Box<[u8; CAP_LEN]>);

impl std::fmt::Debug for GeneralCaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeneralCaps")
            .field("num_ports", &self.get(field::NUM_PORTS))
            .field("port_type", &self.get(field::PORT_TYPE))
            .finish_non_exhaustive()
    }
}

impl Default for GeneralCaps {
    fn default() -> Self {
        GeneralCaps(Box::new([0; CAP_LEN]))
    }
}

impl GeneralCaps {
    /// Reads a field.
    pub fn get(&self, f: BitField) -> u32 {
        f.get(&self.0[..])
    }

    /// Writes a field.
    pub fn set(&mut self, f: BitField, v: u32) {
        f.set(&mut self.0[..], v)
    }

    /// Number of physical ports.
    pub fn num_ports(&self) -> u8 {
        self.get(field::NUM_PORTS) as u8
    }

    /// P_Key table entries per port (128 << pkey_table_size).
    pub fn pkey_table_len(&self) -> usize {
        128usize << self.get(field::PKEY_TABLE_SIZE).min(5)
    }

    /// GID table entries per port (8 << gid_table_size).
    pub fn gid_table_len(&self) -> usize {
        8usize << self.get(field::GID_TABLE_SIZE).min(4)
    }
}
