//! Bring-up, page, capability and small object commands (reference §4.1–4.9).

use super::{CmdError, Command, Opcode, object_command, simple_command};
use crate::layout::caps::{CAP_LEN, CapType, GeneralCaps};
use crate::layout::{BitField, be32, be64, put_be64};
use crate::transport::Iova;

const FUNCTION_ID: BitField = BitField::dw(0x08, 15, 0);
const OBJ24: BitField = BitField::dw(0x08, 23, 0);

/// ENABLE_HCA (§4.1) for this function.
#[derive(Clone, Copy, Debug, Default)]
pub struct EnableHca;
impl Command for EnableHca {
    const OPCODE: Opcode = Opcode::ENABLE_HCA;
    type Reply = ();
    fn inlen(&self) -> usize {
        0x10
    }
    fn outlen(&self) -> usize {
        0x0C
    }
    fn encode(&self, _inbox: &mut [u8]) {}
    fn decode(&self, _outbox: &[u8]) -> Result<(), CmdError> {
        Ok(())
    }
}

simple_command!(
    /// DISABLE_HCA (§4.1) for this function.
    DisableHca, Opcode::DISABLE_HCA, 0x10, 0x0C
);
simple_command!(
    /// INIT_HCA (§4.6), full Linux length.
    InitHca, Opcode::INIT_HCA, 0x20, 0x10
);
simple_command!(
    /// NOP: a round trip through firmware that does nothing.
    Nop, Opcode::NOP, 0x10, 0x10
);

/// QUERY_ISSI (§4.2).
#[derive(Clone, Copy, Debug, Default)]
pub struct QueryIssi;

/// QUERY_ISSI output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IssiInfo {
    /// ISSI in effect.
    pub current: u16,
    /// Bit n set: ISSI n supported.
    pub supported: u32,
}

impl Command for QueryIssi {
    const OPCODE: Opcode = Opcode::QUERY_ISSI;
    type Reply = IssiInfo;
    fn inlen(&self) -> usize {
        0x10
    }
    fn outlen(&self) -> usize {
        0x70
    }
    fn encode(&self, _inbox: &mut [u8]) {}
    fn decode(&self, o: &[u8]) -> Result<IssiInfo, CmdError> {
        Ok(IssiInfo {
            current: BitField::dw(0x08, 15, 0).get(o) as u16,
            supported: be32(o, 0x6C),
        })
    }
}

/// SET_ISSI (§4.2).
#[derive(Clone, Copy, Debug)]
pub struct SetIssi(pub u16);
impl Command for SetIssi {
    const OPCODE: Opcode = Opcode::SET_ISSI;
    type Reply = ();
    fn inlen(&self) -> usize {
        0x10
    }
    fn outlen(&self) -> usize {
        0x10
    }
    fn encode(&self, i: &mut [u8]) {
        BitField::dw(0x08, 15, 0).set(i, u32::from(self.0));
    }
    fn decode(&self, _o: &[u8]) -> Result<(), CmdError> {
        Ok(())
    }
}

/// Which page count QUERY_PAGES asks for (§3.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum PageStage {
    /// Before SET_HCA_CAP.
    Boot = 1,
    /// Before INIT_HCA.
    Init = 2,
    /// Regular.
    Regular = 3,
}

/// QUERY_PAGES (§4.3).
#[derive(Clone, Copy, Debug)]
pub struct QueryPages(pub PageStage);

/// QUERY_PAGES output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageNeed {
    /// Function the pages are for.
    pub function_id: u16,
    /// Signed number of 4 KiB pages.
    pub num_pages: i32,
}

impl Command for QueryPages {
    const OPCODE: Opcode = Opcode::QUERY_PAGES;
    type Reply = PageNeed;
    fn op_mod(&self) -> u16 {
        self.0 as u16
    }
    fn inlen(&self) -> usize {
        0x10
    }
    fn outlen(&self) -> usize {
        0x10
    }
    fn encode(&self, _i: &mut [u8]) {}
    fn decode(&self, o: &[u8]) -> Result<PageNeed, CmdError> {
        Ok(PageNeed {
            function_id: FUNCTION_ID.get(o) as u16,
            num_pages: be32(o, 0x0C) as i32,
        })
    }
}

/// MANAGE_PAGES (§4.3): give pages to, or take them back from, firmware.
#[derive(Clone, Debug)]
pub enum ManagePages {
    /// op_mod 0: tell firmware its request cannot be met.
    CannotGive {
        /// Function id from the request.
        function_id: u16,
    },
    /// op_mod 1: give these pages.
    Give {
        /// Function id from QUERY_PAGES or the page request.
        function_id: u16,
        /// 4 KiB-aligned page addresses.
        pages: Vec<Iova>,
    },
    /// op_mod 2: take back up to `count` pages.
    Take {
        /// Function id.
        function_id: u16,
        /// Pages requested.
        count: u32,
    },
}

/// Most entries one MANAGE_PAGES carries here (Linux reclaims 768 at once).
pub const MANAGE_PAGES_BATCH: usize = 768;

impl Command for ManagePages {
    const OPCODE: Opcode = Opcode::MANAGE_PAGES;
    type Reply = Vec<Iova>;
    fn op_mod(&self) -> u16 {
        match self {
            ManagePages::CannotGive { .. } => 0,
            ManagePages::Give { .. } => 1,
            ManagePages::Take { .. } => 2,
        }
    }
    fn inlen(&self) -> usize {
        match self {
            ManagePages::Give { pages, .. } => 0x10 + 8 * pages.len(),
            _ => 0x10,
        }
    }
    fn outlen(&self) -> usize {
        match self {
            ManagePages::Take { count, .. } => 0x10 + 8 * *count as usize,
            _ => 0x10,
        }
    }
    fn encode(&self, i: &mut [u8]) {
        match self {
            ManagePages::CannotGive { function_id } => {
                FUNCTION_ID.set(i, u32::from(*function_id));
            }
            ManagePages::Give { function_id, pages } => {
                FUNCTION_ID.set(i, u32::from(*function_id));
                BitField::dw(0x0C, 31, 0).set(i, pages.len() as u32);
                for (n, p) in pages.iter().enumerate() {
                    put_be64(i, 0x10 + 8 * n, p.0);
                }
            }
            ManagePages::Take { function_id, count } => {
                FUNCTION_ID.set(i, u32::from(*function_id));
                BitField::dw(0x0C, 31, 0).set(i, *count);
            }
        }
    }
    fn decode(&self, o: &[u8]) -> Result<Vec<Iova>, CmdError> {
        let ManagePages::Take { count, .. } = self else {
            return Ok(Vec::new());
        };
        let n = be32(o, 0x08);
        if n > *count {
            return Err(CmdError::BadOutput {
                opcode: Self::OPCODE,
                why: format!("returned {n} pages, {count} were requested"),
            });
        }
        Ok((0..n as usize)
            .map(|k| Iova(be64(o, 0x10 + 8 * k)))
            .collect())
    }
}

/// QUERY_HCA_CAP (§4.4).
#[derive(Clone, Copy, Debug)]
pub struct QueryHcaCap {
    /// Capability group.
    pub cap: CapType,
    /// Current values (true) or maximum supported (false).
    pub current: bool,
}

impl Command for QueryHcaCap {
    const OPCODE: Opcode = Opcode::QUERY_HCA_CAP;
    type Reply = GeneralCaps;
    fn op_mod(&self) -> u16 {
        ((self.cap as u16) << 1) | u16::from(self.current)
    }
    fn inlen(&self) -> usize {
        0x10
    }
    fn outlen(&self) -> usize {
        0x10 + CAP_LEN
    }
    fn encode(&self, _i: &mut [u8]) {}
    fn decode(&self, o: &[u8]) -> Result<GeneralCaps, CmdError> {
        let mut c = GeneralCaps::default();
        let src = o
            .get(0x10..0x10 + CAP_LEN)
            .ok_or_else(|| CmdError::BadOutput {
                opcode: Self::OPCODE,
                why: "short capability block".into(),
            })?;
        c.0.copy_from_slice(src);
        Ok(c)
    }
}

/// SET_HCA_CAP (§4.4): writes a whole capability block.
#[derive(Clone, Debug)]
pub struct SetHcaCap {
    /// Capability group.
    pub cap: CapType,
    /// The block to write.
    pub caps: GeneralCaps,
}

impl Command for SetHcaCap {
    const OPCODE: Opcode = Opcode::SET_HCA_CAP;
    type Reply = ();
    fn op_mod(&self) -> u16 {
        (self.cap as u16) << 1
    }
    fn inlen(&self) -> usize {
        0x10 + CAP_LEN
    }
    fn outlen(&self) -> usize {
        0x10
    }
    fn encode(&self, i: &mut [u8]) {
        if let Some(dst) = i.get_mut(0x10..0x10 + CAP_LEN) {
            dst.copy_from_slice(&self.caps.0[..]);
        }
    }
    fn decode(&self, _o: &[u8]) -> Result<(), CmdError> {
        Ok(())
    }
}

/// TEARDOWN_HCA profiles (§3.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum TeardownProfile {
    /// Graceful close.
    Graceful = 0,
    /// Force close.
    Force = 1,
    /// Prepare fast teardown.
    PrepareFast = 2,
}

/// TEARDOWN_HCA (§4.6). Reply: the output `state` bit (1 = failed).
#[derive(Clone, Copy, Debug)]
pub struct TeardownHca(pub TeardownProfile);
impl Command for TeardownHca {
    const OPCODE: Opcode = Opcode::TEARDOWN_HCA;
    type Reply = bool;
    fn inlen(&self) -> usize {
        0x10
    }
    fn outlen(&self) -> usize {
        0x10
    }
    fn encode(&self, i: &mut [u8]) {
        BitField::dw(0x08, 15, 0).set(i, self.0 as u32);
    }
    fn decode(&self, o: &[u8]) -> Result<bool, CmdError> {
        Ok(BitField::bit(0x0C, 0).get(o) == 1)
    }
}

/// Register ids for ACCESS_REG (§4.5).
pub mod reg {
    /// HOST_ENDIANNESS.
    pub const HOST_ENDIANNESS: u16 = 0x7004;
    /// PMTU.
    pub const PMTU: u16 = 0x5003;
}

/// ACCESS_REG (§4.5).
#[derive(Clone, Debug)]
pub struct AccessReg {
    /// Write (true) or read (false).
    pub write: bool,
    /// Register id.
    pub register_id: u16,
    /// Register-specific argument.
    pub argument: u32,
    /// Register contents (write) or the query template (read).
    pub data: Vec<u8>,
}

impl AccessReg {
    /// The HOST_ENDIANNESS write of bring-up step 9.
    pub fn host_endianness() -> AccessReg {
        let mut data = vec![0u8; 16];
        data[0] = if cfg!(target_endian = "big") {
            0x80
        } else {
            0x00
        };
        AccessReg {
            write: true,
            register_id: reg::HOST_ENDIANNESS,
            argument: 0,
            data,
        }
    }
}

impl Command for AccessReg {
    const OPCODE: Opcode = Opcode::ACCESS_REG;
    type Reply = Vec<u8>;
    fn op_mod(&self) -> u16 {
        u16::from(!self.write)
    }
    fn inlen(&self) -> usize {
        0x10 + self.data.len()
    }
    fn outlen(&self) -> usize {
        0x10 + self.data.len()
    }
    fn encode(&self, i: &mut [u8]) {
        BitField::dw(0x08, 15, 0).set(i, u32::from(self.register_id));
        BitField::dw(0x0C, 31, 0).set(i, self.argument);
        if let Some(dst) = i.get_mut(0x10..0x10 + self.data.len()) {
            dst.copy_from_slice(&self.data);
        }
    }
    fn decode(&self, o: &[u8]) -> Result<Vec<u8>, CmdError> {
        Ok(o.get(0x10..).map(<[u8]>::to_vec).unwrap_or_default())
    }
}

/// ALLOC_UAR (§4.7). Reply: UAR index.
#[derive(Clone, Copy, Debug, Default)]
pub struct AllocUar;

/// ALLOC_PD (§4.7). Reply: PD number.
#[derive(Clone, Copy, Debug, Default)]
pub struct AllocPd;

/// Allocation commands: no input body, a 24-bit object number at 0x08 out.
macro_rules! alloc24_command {
    ($name:ident, $op:expr) => {
        impl Command for $name {
            const OPCODE: Opcode = $op;
            type Reply = u32;
            fn inlen(&self) -> usize {
                0x10
            }
            fn outlen(&self) -> usize {
                0x10
            }
            fn encode(&self, _i: &mut [u8]) {}
            fn decode(&self, o: &[u8]) -> Result<u32, CmdError> {
                Ok(OBJ24.get(o))
            }
        }
    };
}
alloc24_command!(AllocUar, Opcode::ALLOC_UAR);
alloc24_command!(AllocPd, Opcode::ALLOC_PD);

object_command!(
    /// DEALLOC_UAR (§4.7).
    DeallocUar(u32), Opcode::DEALLOC_UAR, OBJ24
);
object_command!(
    /// DEALLOC_PD (§4.7).
    DeallocPd(u32), Opcode::DEALLOC_PD, OBJ24
);
object_command!(
    /// DESTROY_MKEY (§4.9) by mkey index (key >> 8).
    DestroyMkey(u32), Opcode::DESTROY_MKEY, OBJ24
);

/// QUERY_SPECIAL_CONTEXTS (§4.8).
#[derive(Clone, Copy, Debug, Default)]
pub struct QuerySpecialContexts;

/// QUERY_SPECIAL_CONTEXTS output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SpecialContexts {
    /// Reserved lkey (addresses used as IOVAs).
    pub resd_lkey: u32,
    /// Null mkey.
    pub null_mkey: u32,
    /// Scatter-list terminator key.
    pub terminate_scatter_list_mkey: u32,
}

impl Command for QuerySpecialContexts {
    const OPCODE: Opcode = Opcode::QUERY_SPECIAL_CONTEXTS;
    type Reply = SpecialContexts;
    fn inlen(&self) -> usize {
        0x10
    }
    fn outlen(&self) -> usize {
        0x20
    }
    fn encode(&self, _i: &mut [u8]) {}
    fn decode(&self, o: &[u8]) -> Result<SpecialContexts, CmdError> {
        Ok(SpecialContexts {
            resd_lkey: be32(o, 0x0C),
            null_mkey: be32(o, 0x10),
            terminate_scatter_list_mkey: be32(o, 0x14),
        })
    }
}

/// CREATE_MKEY for a physical-address ("all memory") key, as Linux builds
/// it for every kernel PD (§4.9): WQE addresses are then plain IOVAs.
#[derive(Clone, Copy, Debug)]
pub struct CreatePaMkey {
    /// Protection domain.
    pub pd: u32,
    /// Low byte of the key, chosen by software.
    pub key_low: u8,
    /// `Some((start, len))`: the key covers only IOVAs `[start, start +
    /// len)` (`length64` = 0), e.g. one VM's window; `None`: all of them.
    pub range: Option<(u64, u64)>,
}

/// mkc field positions (relative to the context at input 0x10).
mod mkc {
    use crate::layout::BitField;
    pub const LW: BitField = BitField::bit(0x00, 11);
    pub const LR: BitField = BitField::bit(0x00, 10);
    pub const ACCESS_MODE_1_0: BitField = BitField::dw(0x00, 9, 8);
    pub const QPN: BitField = BitField::dw(0x04, 31, 8);
    pub const MKEY_7_0: BitField = BitField::dw(0x04, 7, 0);
    pub const LENGTH64: BitField = BitField::bit(0x0C, 31);
    pub const PD: BitField = BitField::dw(0x0C, 23, 0);
    /// start_addr and len: 64-bit big-endian at 0x10 and 0x18.
    pub const START_ADDR: usize = 0x10;
    pub const LEN: usize = 0x18;
}

impl Command for CreatePaMkey {
    const OPCODE: Opcode = Opcode::CREATE_MKEY;
    /// The lkey: (mkey_index << 8) | key_low.
    type Reply = u32;
    fn inlen(&self) -> usize {
        0x110
    }
    fn outlen(&self) -> usize {
        0x10
    }
    fn encode(&self, i: &mut [u8]) {
        const MKC: usize = 0x10;
        mkc::LW.within(MKC).set(i, 1);
        mkc::LR.within(MKC).set(i, 1);
        mkc::ACCESS_MODE_1_0.within(MKC).set(i, 0);
        mkc::QPN.within(MKC).set(i, 0xFF_FFFF);
        mkc::MKEY_7_0.within(MKC).set(i, u32::from(self.key_low));
        mkc::PD.within(MKC).set(i, self.pd);
        match self.range {
            None => mkc::LENGTH64.within(MKC).set(i, 1),
            Some((start, len)) => {
                let at = MKC + mkc::START_ADDR;
                i[at..at + 8].copy_from_slice(&start.to_be_bytes());
                let at = MKC + mkc::LEN;
                i[at..at + 8].copy_from_slice(&len.to_be_bytes());
            }
        }
    }
    fn decode(&self, o: &[u8]) -> Result<u32, CmdError> {
        Ok((OBJ24.get(o) << 8) | u32::from(self.key_low))
    }
}

#[cfg(test)]
mod tests {
    //! Golden bytes written from the reference tables (§4.1–4.9), not from
    //! the encoders.
    use super::*;
    use crate::cmd::{check_output, encode_input};

    fn hex(v: &[u8]) -> String {
        v.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn enable_hca_matches_reference_example() {
        // §2.2 example: 01 04 00 00 00 00 00 00 00 00 00 00 00 00 00 00, outlen 0x0C.
        assert_eq!(
            hex(&encode_input(&EnableHca)),
            "01040000000000000000000000000000"
        );
        assert_eq!(EnableHca.outlen(), 0x0C);
    }

    #[test]
    fn disable_init_nop() {
        assert_eq!(
            hex(&encode_input(&DisableHca)),
            "01050000000000000000000000000000"
        );
        assert_eq!(
            hex(&encode_input(&InitHca)),
            "0102000000000000000000000000000000000000000000000000000000000000"
        );
        assert_eq!(hex(&encode_input(&Nop)), "080d0000000000000000000000000000");
    }

    #[test]
    fn issi() {
        assert_eq!(
            hex(&encode_input(&QueryIssi)),
            "010a0000000000000000000000000000"
        );
        assert_eq!(QueryIssi.outlen(), 0x70);
        assert_eq!(
            hex(&encode_input(&SetIssi(1))),
            "010b0000000000000000000100000000"
        );
        let mut out = vec![0u8; 0x70];
        out[0x0A] = 0x00;
        out[0x0B] = 0x00;
        out[0x6F] = 0x03; // ISSI 0 and 1
        let r = check_output(&QueryIssi, &out).unwrap();
        assert_eq!(
            r,
            IssiInfo {
                current: 0,
                supported: 3
            }
        );
    }

    #[test]
    fn query_pages() {
        assert_eq!(
            hex(&encode_input(&QueryPages(PageStage::Boot))),
            "01070000000000010000000000000000"
        );
        assert_eq!(
            hex(&encode_input(&QueryPages(PageStage::Init))),
            "01070000000000020000000000000000"
        );
        let out = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x00, 0x01, 0x00];
        assert_eq!(
            check_output(&QueryPages(PageStage::Boot), &out).unwrap(),
            PageNeed {
                function_id: 0,
                num_pages: 256
            }
        );
    }

    #[test]
    fn manage_pages_give_and_take() {
        let give = ManagePages::Give {
            function_id: 0,
            pages: vec![Iova(0x0000_0001_2345_6000), Iova(0x7000)],
        };
        assert_eq!(
            hex(&encode_input(&give)),
            concat!(
                "01080000",
                "00000001",
                "00000000",
                "00000002",
                "0000000123456000",
                "0000000000007000"
            )
        );
        let take = ManagePages::Take {
            function_id: 0,
            count: 2,
        };
        assert_eq!(
            hex(&encode_input(&take)),
            "01080000000000020000000000000002"
        );
        assert_eq!(take.outlen(), 0x20);
        let mut out = vec![0u8; 0x20];
        out[0x0B] = 1;
        out[0x10..0x18].copy_from_slice(&[0, 0, 0, 0, 0, 0, 0x70, 0]);
        assert_eq!(check_output(&take, &out).unwrap(), vec![Iova(0x7000)]);
        // Firmware returning more than asked for is rejected.
        out[0x0B] = 3;
        assert!(check_output(&take, &out).is_err());
    }

    #[test]
    fn hca_cap() {
        let q = QueryHcaCap {
            cap: CapType::General,
            current: true,
        };
        assert_eq!(hex(&encode_input(&q)), "01000000000000010000000000000000");
        let q = QueryHcaCap {
            cap: CapType::General,
            current: false,
        };
        assert_eq!(hex(&encode_input(&q)), "01000000000000000000000000000000");
        assert_eq!(q.outlen(), 0x1010);
        let mut caps = GeneralCaps::default();
        caps.set(crate::layout::caps::field::LOG_UAR_PAGE_SZ, 0);
        caps.0[0x37] = 0x01; // num_ports = 1 (0x34 bits 7:0)
        let s = SetHcaCap {
            cap: CapType::General,
            caps,
        };
        let v = encode_input(&s);
        assert_eq!(v.len(), 0x1010);
        assert_eq!(hex(&v[..16]), "01090000000000000000000000000000");
        assert_eq!(v[0x10 + 0x37], 0x01);
    }

    #[test]
    fn teardown() {
        assert_eq!(
            hex(&encode_input(&TeardownHca(TeardownProfile::Graceful))),
            "01030000000000000000000000000000"
        );
        assert_eq!(
            hex(&encode_input(&TeardownHca(TeardownProfile::PrepareFast))),
            "01030000000000000000000200000000"
        );
        let mut out = [0u8; 16];
        out[0x0F] = 1;
        assert!(check_output(&TeardownHca(TeardownProfile::PrepareFast), &out).unwrap());
    }

    #[test]
    fn access_reg_host_endianness() {
        let v = encode_input(&AccessReg::host_endianness());
        assert_eq!(v.len(), 0x20);
        assert_eq!(hex(&v[..16]), "08050000000000000000700400000000");
        assert!(
            v[16..].iter().all(|&b| b == 0),
            "little-endian host writes byte 0 = 0x00"
        );
    }

    #[test]
    fn uar_pd_mkey_small_objects() {
        let mut out = [0u8; 16];
        out[0x09..0x0C].copy_from_slice(&[0x00, 0x00, 0x03]);
        assert_eq!(check_output(&AllocUar, &out).unwrap(), 3);
        assert_eq!(check_output(&AllocPd, &out).unwrap(), 3);
        assert_eq!(
            hex(&encode_input(&DeallocUar(3))),
            "08030000000000000000000300000000"
        );
        assert_eq!(
            hex(&encode_input(&DeallocPd(0x12345))),
            "08010000000000000001234500000000"
        );
        assert_eq!(
            hex(&encode_input(&DestroyMkey(0x20))),
            "02020000000000000000002000000000"
        );
    }

    #[test]
    fn special_contexts() {
        assert_eq!(
            hex(&encode_input(&QuerySpecialContexts)),
            "02030000000000000000000000000000"
        );
        let mut out = [0u8; 0x20];
        out[0x0C..0x10].copy_from_slice(&[0, 0, 0x01, 0x00]);
        out[0x14..0x18].copy_from_slice(&[0, 0, 0x01, 0x00]);
        let r = check_output(&QuerySpecialContexts, &out).unwrap();
        assert_eq!(r.resd_lkey, 0x100);
        assert_eq!(r.terminate_scatter_list_mkey, 0x100);
    }

    #[test]
    fn pa_mkey_golden() {
        let c = CreatePaMkey {
            pd: 0x000005,
            key_low: 0x42,
            range: None,
        };
        let v = encode_input(&c);
        assert_eq!(v.len(), 0x110);
        assert_eq!(hex(&v[..0x10]), "02000000000000000000000000000000");
        // mkc at 0x10: dword0 lw (bit 11) | lr (bit 10) = 0x00000C00, access mode 0.
        assert_eq!(hex(&v[0x10..0x14]), "00000c00");
        // dword1: qpn 0xFFFFFF << 8 | 0x42.
        assert_eq!(hex(&v[0x14..0x18]), "ffffff42");
        // dword3: length64 (bit 31) | pd.
        assert_eq!(hex(&v[0x1C..0x20]), "80000005");
        assert!(v[0x20..].iter().all(|&b| b == 0));
        let mut out = [0u8; 16];
        out[0x0B] = 0x07;
        assert_eq!(check_output(&c, &out).unwrap(), 0x0742);
    }

    #[test]
    fn bounded_pa_mkey_golden() {
        // §4.9: length64 clear, start_addr at mkc 0x10 and len at mkc 0x18
        // (input 0x20 and 0x28), both 8 bytes big-endian.
        let c = CreatePaMkey {
            pd: 0x000009,
            key_low: 0x17,
            range: Some((0x0001_0000_0000_0000, 0x4000_0000)),
        };
        let v = encode_input(&c);
        assert_eq!(hex(&v[0x10..0x14]), "00000c00");
        assert_eq!(hex(&v[0x14..0x18]), "ffffff17");
        assert_eq!(hex(&v[0x1C..0x20]), "00000009");
        assert_eq!(hex(&v[0x20..0x28]), "0001000000000000");
        assert_eq!(hex(&v[0x28..0x30]), "0000000040000000");
        assert!(v[0x30..].iter().all(|&b| b == 0));
    }

    #[test]
    fn failed_status_is_typed() {
        let mut out = [0u8; 16];
        out[0] = 0x03;
        out[4..8].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        let e = check_output(&EnableHca, &out).unwrap_err();
        assert_eq!(
            e.to_string(),
            "ENABLE_HCA (0x104) op_mod 0x0 failed: status BAD_PARAM_ERR (0x03), syndrome 0xdeadbeef"
        );
    }
}
