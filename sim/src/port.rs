//! The InfiniBand port of the model and its subnet-management agent, as
//! reached through MAD_IFC (IBTA SMP attributes; reference §8.4).

use crate::bytes::{dword, set_dword, set_qword, set_word, word};

/// IB port states.
#[allow(missing_docs)]
pub mod state {
    pub const DOWN: u8 = 1;
    pub const INIT: u8 = 2;
    pub const ARMED: u8 = 3;
    pub const ACTIVE: u8 = 4;
}

/// IB physical port states.
#[allow(missing_docs)]
pub mod phys {
    pub const POLLING: u8 = 2;
    pub const DISABLED: u8 = 3;
    pub const LINK_UP: u8 = 5;
}

/// One port.
#[derive(Clone, Debug)]
pub struct Port {
    /// Logical state.
    pub state: u8,
    /// Physical state.
    pub phys: u8,
    /// Base LID.
    pub lid: u16,
    /// SM LID.
    pub sm_lid: u16,
    /// SM SL.
    pub sm_sl: u8,
    /// LMC.
    pub lmc: u8,
    /// Subnet prefix.
    pub gid_prefix: u64,
    /// Port GUID.
    pub guid: u64,
    /// Active MTU code.
    pub mtu: u8,
    /// Max MTU code.
    pub mtu_cap: u8,
    /// P_Key table (128 entries).
    pub pkeys: Vec<u16>,
    /// P_Key violations.
    pub pkey_violations: u16,
    /// Q_Key violations.
    pub qkey_violations: u16,
}

impl Port {
    /// A port with the cable in and nobody configuring it yet.
    pub fn new(guid: u64, mtu: u8) -> Port {
        let mut pkeys = vec![0u16; 128];
        pkeys[0] = 0xFFFF;
        Port {
            state: state::DOWN,
            phys: phys::POLLING,
            lid: 0,
            sm_lid: 0,
            sm_sl: 0,
            lmc: 0,
            gid_prefix: 0xFE80_0000_0000_0000,
            guid,
            mtu,
            mtu_cap: 5,
            pkeys,
            pkey_violations: 0,
            qkey_violations: 0,
        }
    }
}

/// MAD status codes (bits 4:2 of the status word).
const MAD_STATUS_BAD_VERSION: u16 = 1 << 2;
const MAD_STATUS_UNSUP_METHOD: u16 = 2 << 2;
const MAD_STATUS_UNSUP_ATTR: u16 = 3 << 2;
const MAD_STATUS_BAD_ATTR_MOD: u16 = 7 << 2;

/// Identity of the node answering NodeInfo.
#[derive(Clone, Copy, Debug)]
pub struct NodeIdentity {
    /// Node GUID.
    pub node_guid: u64,
    /// System image GUID.
    pub sys_guid: u64,
    /// PCI device id, reported as NodeInfo DeviceID.
    pub device_id: u16,
    /// Vendor OUI.
    pub vendor_id: u32,
    /// Number of ports.
    pub num_ports: u8,
}

/// Answers one SMP Get for `port` (1-based) the way the HCA's agent does.
pub fn answer_smp(req: &[u8; 256], port_num: u8, port: &Port, node: &NodeIdentity) -> [u8; 256] {
    let mut r = *req;
    let class = req[1];
    let directed = class == 0x81;
    let mut status: u16 = 0;
    if req[0] != 1 || req[2] != 1 || !(class == 0x01 || directed) {
        status = MAD_STATUS_BAD_VERSION;
    } else if req[3] != 0x01 {
        status = MAD_STATUS_UNSUP_METHOD;
    }
    let attr = word(req, 16);
    let amod = dword(req, 20);
    let mut data = [0u8; 64];
    if status == 0 {
        status = match attr {
            0x0011 => {
                data[0] = 1; // base version
                data[1] = 1; // class version
                data[2] = 1; // node type: channel adapter
                data[3] = node.num_ports;
                set_qword(&mut data, 4, node.sys_guid);
                set_qword(&mut data, 12, node.node_guid);
                set_qword(&mut data, 20, port.guid);
                set_word(&mut data, 28, port.pkeys.len() as u16);
                set_word(&mut data, 30, node.device_id);
                set_dword(
                    &mut data,
                    36,
                    (u32::from(port_num) << 24) | (node.vendor_id & 0xFF_FFFF),
                );
                0
            }
            0x0010 => {
                let d = b"ipoib-vfio simulated HCA";
                data[..d.len()].copy_from_slice(d);
                0
            }
            0x0014 => {
                if amod != 0 {
                    MAD_STATUS_BAD_ATTR_MOD
                } else {
                    set_qword(&mut data, 0, port.guid);
                    0
                }
            }
            0x0015 => {
                if amod != u32::from(port_num) && amod != 0 {
                    MAD_STATUS_BAD_ATTR_MOD
                } else {
                    port_info(&mut data, port);
                    0
                }
            }
            0x0016 => {
                let block = amod as usize;
                if block * 32 >= port.pkeys.len() {
                    MAD_STATUS_BAD_ATTR_MOD
                } else {
                    for i in 0..32 {
                        set_word(&mut data, i * 2, port.pkeys[block * 32 + i]);
                    }
                    0
                }
            }
            _ => MAD_STATUS_UNSUP_ATTR,
        };
    }
    r[3] = 0x81; // GetResp
    let d_bit = if directed { 0x8000 } else { 0 };
    set_word(&mut r, 4, status | d_bit);
    r[64..128].copy_from_slice(&data);
    r
}

fn port_info(d: &mut [u8; 64], p: &Port) {
    set_qword(d, 0, 0); // M_Key
    set_qword(d, 8, p.gid_prefix);
    set_word(d, 16, p.lid);
    set_word(d, 18, p.sm_lid);
    set_dword(d, 20, 0x0251_0868); // CapabilityMask: IsSM-less CA defaults
    d[29] = 0x02; // LinkWidthEnabled 4x
    d[30] = 0x03; // LinkWidthSupported 1x|4x
    d[31] = 0x02; // LinkWidthActive 4x
    d[32] = (0x7 << 4) | (p.state & 0x0f); // LinkSpeedSupported | PortState
    d[33] = (p.phys << 4) | 0x2; // PortPhysicalState | LinkDownDefaultState polling
    d[34] = p.lmc & 0x07;
    d[35] = (0x4 << 4) | 0x7; // LinkSpeedActive QDR | LinkSpeedEnabled
    d[36] = (p.mtu << 4) | (p.sm_sl & 0x0f);
    d[37] = 0x4 << 4; // VLCap VL0-7
    d[41] = p.mtu_cap & 0x0f;
    set_word(d, 46, p.pkey_violations);
    set_word(d, 48, p.qkey_violations);
    d[50] = 1; // GUIDCap
    d[51] = 18; // SubnetTimeOut
    d[62] = 0x2 << 4; // LinkSpeedExtActive EDR
}
