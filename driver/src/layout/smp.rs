//! Subnet management packets used with MAD_IFC (IBTA; reference §8.4).

use super::{be16, be32, be64, put_be16, put_be32, put_be64};

/// A MAD is 256 bytes.
pub const MAD_LEN: usize = 256;
/// SMP data starts at byte 64 and is 64 bytes long.
pub const SMP_DATA: usize = 64;

/// Management class: subnet management, LID routed.
pub const CLASS_SM_LID_ROUTED: u8 = 0x01;
/// Method Get.
pub const METHOD_GET: u8 = 0x01;
/// Method GetResp.
pub const METHOD_GET_RESP: u8 = 0x81;

/// SMP attribute IDs.
pub mod attr {
    /// NodeDescription.
    pub const NODE_DESC: u16 = 0x0010;
    /// NodeInfo.
    pub const NODE_INFO: u16 = 0x0011;
    /// GUIDInfo.
    pub const GUID_INFO: u16 = 0x0014;
    /// PortInfo.
    pub const PORT_INFO: u16 = 0x0015;
    /// P_KeyTable.
    pub const PKEY_TABLE: u16 = 0x0016;
}

/// Builds an SMP Get for `attr_id` with modifier `attr_mod`.
pub fn smp_get(tid: u64, attr_id: u16, attr_mod: u32) -> [u8; MAD_LEN] {
    let mut m = [0u8; MAD_LEN];
    m[0] = 1; // base_version
    m[1] = CLASS_SM_LID_ROUTED;
    m[2] = 1; // class_version
    m[3] = METHOD_GET;
    put_be64(&mut m, 8, tid);
    put_be16(&mut m, 16, attr_id);
    put_be32(&mut m, 20, attr_mod);
    m
}

/// MAD status word (byte 4).
pub fn mad_status(m: &[u8; MAD_LEN]) -> u16 {
    be16(m, 4)
}

/// Port states (PortInfo PortState).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum PortState {
    /// No change (reads as 0 only in Set).
    Nop,
    /// Down.
    Down,
    /// Initialized: link up, not configured by an SM.
    Init,
    /// Armed.
    Armed,
    /// Active.
    Active,
    /// Active, deferred.
    ActiveDefer,
    /// Anything else.
    Unknown(u8),
}

impl PortState {
    /// Decodes the 4-bit field.
    pub fn from_u8(v: u8) -> PortState {
        match v {
            0 => PortState::Nop,
            1 => PortState::Down,
            2 => PortState::Init,
            3 => PortState::Armed,
            4 => PortState::Active,
            5 => PortState::ActiveDefer,
            o => PortState::Unknown(o),
        }
    }
}

impl std::fmt::Display for PortState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortState::Nop => f.write_str("NOP"),
            PortState::Down => f.write_str("DOWN"),
            PortState::Init => f.write_str("INIT"),
            PortState::Armed => f.write_str("ARMED"),
            PortState::Active => f.write_str("ACTIVE"),
            PortState::ActiveDefer => f.write_str("ACTIVE_DEFER"),
            PortState::Unknown(v) => write!(f, "UNKNOWN({v})"),
        }
    }
}

/// IB MTU code (1 = 256 ... 5 = 4096) to bytes.
pub fn mtu_bytes(code: u8) -> u32 {
    match code {
        1..=5 => 128 << code,
        _ => 0,
    }
}

/// The PortInfo fields the driver uses (data offsets per §8.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PortInfo {
    /// Subnet prefix (GID prefix).
    pub gid_prefix: u64,
    /// Base LID.
    pub lid: u16,
    /// Master SM LID.
    pub sm_lid: u16,
    /// CapabilityMask.
    pub cap_mask: u32,
    /// LinkWidthActive.
    pub link_width_active: u8,
    /// PortState.
    pub state: PortState,
    /// PortPhysicalState (5 = LinkUp).
    pub phys_state: u8,
    /// LMC.
    pub lmc: u8,
    /// LinkSpeedActive.
    pub link_speed_active: u8,
    /// NeighborMTU (active MTU code).
    pub active_mtu: u8,
    /// Master SM SL.
    pub sm_sl: u8,
    /// MTUCap (max MTU code).
    pub max_mtu: u8,
    /// P_Key violations.
    pub pkey_violations: u16,
    /// Q_Key violations.
    pub qkey_violations: u16,
    /// SubnetTimeOut.
    pub subnet_timeout: u8,
}

impl PortInfo {
    /// Decodes PortInfo from a GetResp MAD.
    pub fn parse(m: &[u8; MAD_LEN]) -> PortInfo {
        let d = &m[SMP_DATA..SMP_DATA + 64];
        PortInfo {
            gid_prefix: be64(d, 8),
            lid: be16(d, 16),
            sm_lid: be16(d, 18),
            cap_mask: be32(d, 20),
            link_width_active: d[31] & 0x1f,
            state: PortState::from_u8(d[32] & 0x0f),
            phys_state: d[33] >> 4,
            lmc: d[34] & 0x07,
            link_speed_active: d[35] >> 4,
            active_mtu: d[36] >> 4,
            sm_sl: d[36] & 0x0f,
            max_mtu: d[41] & 0x0f,
            pkey_violations: be16(d, 46),
            qkey_violations: be16(d, 48),
            subnet_timeout: d[51] & 0x1f,
        }
    }
}

/// GUID `index % 8` of a GUIDInfo block.
pub fn guid_info_entry(m: &[u8; MAD_LEN], index: usize) -> u64 {
    be64(&m[SMP_DATA..], (index % 8) * 8)
}

/// The 32 P_Keys of a P_KeyTable block.
pub fn pkey_block(m: &[u8; MAD_LEN]) -> [u16; 32] {
    let mut out = [0u16; 32];
    for (i, p) in out.iter_mut().enumerate() {
        *p = be16(&m[SMP_DATA..], i * 2);
    }
    out
}

/// NodeInfo: node GUID (data 12..20).
pub fn node_guid(m: &[u8; MAD_LEN]) -> u64 {
    be64(&m[SMP_DATA..], 12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smp_get_golden() {
        let m = smp_get(0x0102_0304_0506_0708, attr::PORT_INFO, 1);
        let want: [u8; 24] = [
            0x01, 0x01, 0x01, 0x01, 0, 0, 0, 0, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08,
            0x00, 0x15, 0, 0, 0, 0, 0, 1,
        ];
        assert_eq!(&m[..24], &want);
        assert!(m[24..].iter().all(|&b| b == 0));
    }

    #[test]
    fn port_info_golden() {
        let mut m = [0u8; MAD_LEN];
        let d = SMP_DATA;
        m[d + 8..d + 16].copy_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0]);
        m[d + 16..d + 18].copy_from_slice(&[0x00, 0x05]);
        m[d + 18..d + 20].copy_from_slice(&[0x00, 0x01]);
        m[d + 31] = 0x02; // 4x
        m[d + 32] = 0x04; // ACTIVE
        m[d + 33] = 0x50; // LinkUp
        m[d + 35] = 0x10;
        m[d + 36] = 0x4 << 4; // 2048
        m[d + 41] = 0x05;
        let p = PortInfo::parse(&m);
        assert_eq!(p.gid_prefix, 0xfe80_0000_0000_0000);
        assert_eq!(p.lid, 5);
        assert_eq!(p.sm_lid, 1);
        assert_eq!(p.state, PortState::Active);
        assert_eq!(p.phys_state, 5);
        assert_eq!(mtu_bytes(p.active_mtu), 2048);
        assert_eq!(mtu_bytes(p.max_mtu), 4096);
    }
}
