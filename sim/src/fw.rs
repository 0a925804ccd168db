//! Firmware: what each command does to the device state (reference §3–4,
//! §9.2).
//!
//! Commands are checked the way the status names suggest firmware checks
//! them: lengths (0x50/0x51), opcode and op_mod (0x02), the bring-up order
//! (0x04), parameters (0x03), object numbers (0x05), objects in use (0x06).
//! Real firmware syndromes are not public; this model's syndrome is
//! `opcode << 16 | reason`, with the reason codes of [`Reason`], so a
//! failure names both the command and the check that refused it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::bytes::{dword, field, qword, set_dword, set_field, set_qword};
use crate::caps::{self, CapBlock, f};
use crate::eq::{Posted, SimEq};
use crate::iommu::Iommu;
use crate::port::{NodeIdentity, Port, answer_smp, phys, state};

/// Command status codes (§2.7).
#[allow(missing_docs)]
pub mod status {
    pub const BAD_OP: u8 = 0x02;
    pub const BAD_PARAM: u8 = 0x03;
    pub const BAD_SYS_STATE: u8 = 0x04;
    pub const BAD_RES: u8 = 0x05;
    pub const RES_BUSY: u8 = 0x06;
    pub const BAD_QP_STATE: u8 = 0x10;
    pub const LIM: u8 = 0x08;
    pub const BAD_INP_LEN: u8 = 0x50;
    pub const BAD_OUTP_LEN: u8 = 0x51;
}

/// Why a command was refused (low 16 bits of the model's syndrome).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
#[allow(missing_docs)]
pub enum Reason {
    UnknownOpcode = 0x01,
    BadOpMod = 0x02,
    InputTooShort = 0x03,
    OutputTooShort = 0x04,
    NotEnabled = 0x10,
    AlreadyEnabled = 0x11,
    NotInitialized = 0x12,
    AlreadyInitialized = 0x13,
    BootPagesMissing = 0x14,
    InitPagesMissing = 0x15,
    StillInitialized = 0x16,
    BadFunction = 0x20,
    BadIssi = 0x21,
    PageMisaligned = 0x22,
    PageNotMapped = 0x23,
    PageAlreadyGiven = 0x24,
    TooManyEntries = 0x25,
    BadCapType = 0x26,
    BadCapValue = 0x27,
    BadRegister = 0x28,
    BadProfile = 0x29,
    UnknownObject = 0x30,
    ObjectInUse = 0x31,
    BadAccessMode = 0x32,
    BadEqSize = 0x33,
    BadVector = 0x34,
    BufferNotMapped = 0x35,
    BadPort = 0x36,
    BadQpState = 0x37,
    BadQueueSize = 0x38,
    BadServiceType = 0x39,
    Injected = 0xEE,
}

/// A refused command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fail {
    /// Status byte.
    pub status: u8,
    /// Syndrome.
    pub syndrome: u32,
}

pub(crate) fn fail(opcode: u16, status: u8, why: Reason) -> Fail {
    Fail {
        status,
        syndrome: (u32::from(opcode) << 16) | why as u32,
    }
}

/// The page list of a queue buffer of `bytes` bytes in pages of `page_size`,
/// read from `i` at 0x110: the input must hold it (BAD_INP_LEN) and every
/// page must be aligned and mapped (BAD_PARAM).
pub(crate) fn queue_pages(
    iommu: &Iommu,
    op: u16,
    i: &[u8],
    page_size: u64,
    bytes: u64,
) -> Result<Vec<u64>, Fail> {
    let n = usize::try_from(bytes.div_ceil(page_size)).unwrap_or(usize::MAX);
    if i.len() < 0x110 + 8 * n.min(1 << 20) || n > 1 << 20 {
        return Err(fail(op, status::BAD_INP_LEN, Reason::InputTooShort));
    }
    let pas: Vec<u64> = (0..n).map(|k| qword(i, 0x110 + 8 * k)).collect();
    let span = page_size.min(bytes) as usize;
    if pas
        .iter()
        .any(|&p| !p.is_multiple_of(page_size) || !iommu.covers(p, span))
    {
        return Err(fail(op, status::BAD_PARAM, Reason::BufferNotMapped));
    }
    Ok(pas)
}

/// Checks a doorbell record address: aligned to and mapped for `len` bytes.
pub(crate) fn record_ok(iommu: &Iommu, op: u16, dbr: u64, len: usize) -> Result<(), Fail> {
    if dbr.is_multiple_of(len as u64) && iommu.covers(dbr, len) {
        Ok(())
    } else {
        Err(fail(op, status::BAD_PARAM, Reason::BufferNotMapped))
    }
}

/// Device-side counters and leak evidence.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FwStats {
    /// Commands executed (any outcome).
    pub commands: u64,
    /// Commands refused with a non-zero status.
    pub failed_commands: u64,
    /// Pages firmware still held when DISABLE_HCA came (a driver leak).
    pub pages_leaked_at_disable: u64,
    /// Objects (UARs, PDs, MKeys, EQs) alive at TEARDOWN_HCA (a driver leak).
    pub objects_at_teardown: u64,
    /// Pages whose firmware tag was overwritten while firmware held them.
    pub page_corruptions: u64,
    /// EQEs written.
    pub eqes: u64,
    /// EQEs lost to overrun.
    pub eq_overruns: u64,
    /// Page requests issued.
    pub page_requests: u64,
}

/// Static parameters of the firmware model.
#[derive(Clone, Debug)]
pub struct FwParams {
    /// Pages asked for at boot.
    pub boot_pages: u32,
    /// Pages asked for at init.
    pub init_pages: u32,
    /// MSI-X vectors of the function.
    pub msix_vectors: usize,
    /// Node identity.
    pub node: NodeIdentity,
    /// Active MTU code of the port.
    pub port_mtu: u8,
    /// Page storm: (rounds, pages).
    pub storm: Option<(u32, u32)>,
    /// Highest ISSI the firmware offers.
    pub max_issi: u16,
    /// Sends complete without going on the wire.
    pub tx_sink: bool,
}

/// Tag firmware writes into the first bytes of every page it holds.
const PAGE_TAG: u64 = 0x1C4D_5041_4745_0000; // "ICM PAGE"

/// First UAR index handed out: page 3 lies past the init segment (0x0–0x200F).
const FIRST_UAR: u32 = 3;

/// The firmware state.
#[derive(Debug)]
pub struct Firmware {
    pub(crate) p: FwParams,
    pub(crate) enabled: bool,
    pub(crate) issi: u16,
    pub(crate) boot_given: u32,
    pub(crate) init_given: u32,
    pub(crate) caps_set: bool,
    pub(crate) initialized: bool,
    pub(crate) caps_max: CapBlock,
    pub(crate) caps_cur: CapBlock,
    pub(crate) pages: BTreeSet<u64>,
    pub(crate) uars: BTreeSet<u32>,
    pub(crate) pds: BTreeSet<u32>,
    pub(crate) next_pd: u32,
    pub(crate) mkeys: BTreeMap<u32, Mkey>,
    pub(crate) next_mkey: u32,
    pub(crate) eqs: BTreeMap<u8, SimEq>,
    pub(crate) next_eqn: u8,
    pub(crate) port: Port,
    pub(crate) storm_left: u32,
    pub(crate) reclaims_due: VecDeque<u32>,
    pub(crate) cqs: BTreeMap<u32, crate::queues::SimCq>,
    pub(crate) next_cqn: u32,
    pub(crate) qps: BTreeMap<u32, crate::queues::SimQp>,
    pub(crate) next_qpn: u32,
    pub(crate) mcgs: BTreeMap<[u8; 16], BTreeSet<u32>>,
    pub(crate) srqs: BTreeMap<u32, crate::rc::SimSrq>,
    pub(crate) next_srqn: u32,
    /// Packets to put on the wire once the current work is done.
    pub(crate) outbox: Vec<Vec<u8>>,
    /// Interrupts raised by work done outside a command's effects.
    pub(crate) pending_fx: Effects,
    /// Datapath counters.
    pub dp: crate::queues::DpStats,
    /// Logical port states so far (first 32).
    pub port_history: Vec<u8>,
    /// Counters.
    pub stats: FwStats,
}

/// A memory key: physical-address (IOVA) mode, over all addresses or one
/// range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mkey {
    pub(crate) pd: u32,
    pub(crate) low: u8,
    /// `[start, start + len)`, or `None` for `length64`.
    pub(crate) range: Option<(u64, u64)>,
}

impl Mkey {
    /// Whether `[addr, addr + len)` lies inside the key.
    pub(crate) fn covers(&self, addr: u64, len: u64) -> bool {
        match self.range {
            None => true,
            Some((start, size)) => {
                addr >= start && addr.checked_add(len).is_some_and(|end| end <= start + size)
            }
        }
    }
}

/// Vectors to signal after a command, and similar side effects.
#[derive(Debug, Default)]
pub struct Effects {
    /// MSI-X vectors to fire.
    pub fire: Vec<u16>,
}

impl Firmware {
    /// Firmware right after reset.
    pub fn new(p: FwParams) -> Firmware {
        let port = Port::new(p.node.node_guid.wrapping_add(1), p.port_mtu);
        Firmware {
            storm_left: p.storm.map_or(0, |s| s.0),
            p,
            enabled: false,
            issi: 0,
            boot_given: 0,
            init_given: 0,
            caps_set: false,
            initialized: false,
            caps_max: caps::general_max(),
            caps_cur: caps::general_current(),
            pages: BTreeSet::new(),
            uars: BTreeSet::new(),
            pds: BTreeSet::new(),
            next_pd: 1,
            mkeys: BTreeMap::new(),
            next_mkey: 1,
            eqs: BTreeMap::new(),
            next_eqn: 1,
            port,
            reclaims_due: VecDeque::new(),
            cqs: BTreeMap::new(),
            next_cqn: 0x80,
            qps: BTreeMap::new(),
            next_qpn: 0x100,
            mcgs: BTreeMap::new(),
            srqs: BTreeMap::new(),
            next_srqn: 0x40,
            outbox: Vec::new(),
            pending_fx: Effects::default(),
            dp: crate::queues::DpStats::default(),
            port_history: vec![state::DOWN],
            stats: FwStats::default(),
        }
    }

    /// Whether signatures must be checked (`cmdif_checksum` set).
    pub fn checks_signatures(&self) -> bool {
        caps::get(&self.caps_cur, f::CMDIF_CHECKSUM) != 0
    }

    /// Pages held now.
    pub fn pages_held(&self) -> usize {
        self.pages.len()
    }

    /// Objects alive now.
    pub fn objects_alive(&self) -> usize {
        self.uars.len()
            + self.pds.len()
            + self.mkeys.len()
            + self.eqs.len()
            + self.cqs.len()
            + self.qps.len()
    }

    /// Whether ENABLE_HCA is in effect.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether INIT_HCA is in effect.
    pub fn initialized(&self) -> bool {
        self.initialized
    }

    /// Whether `uar` is allocated.
    pub fn has_uar(&self, uar: u32) -> bool {
        self.uars.contains(&uar)
    }

    /// Records a port state change for the report.
    pub fn note_port_state(&mut self, s: u8) {
        if self.port_history.last() != Some(&s) && self.port_history.len() < 32 {
            self.port_history.push(s);
        }
    }

    /// The port (1-based index 1 only).
    pub fn port(&self) -> &Port {
        &self.port
    }

    /// The set of pages held.
    pub fn page_set(&self) -> BTreeSet<u64> {
        self.pages.clone()
    }

    /// Pages held inside `[iova, iova + len)`.
    pub fn pages_in(&self, iova: u64, len: u64) -> usize {
        self.pages.range(iova..iova.saturating_add(len)).count()
    }

    /// Posts an event of type `kind` to the first EQ subscribed to it.
    pub fn post_event(
        &mut self,
        iommu: &Iommu,
        kind: u8,
        sub: u8,
        data: &[u8; 28],
        fx: &mut Effects,
    ) {
        let Some(eq) = self.eqs.values_mut().find(|e| e.subscribes(kind)) else {
            return;
        };
        match eq.post(iommu, kind, sub, data) {
            Posted::Written(v) => {
                self.stats.eqes += 1;
                fx.fire.extend(v);
            }
            Posted::Overrun | Posted::DmaFault => self.stats.eq_overruns += 1,
        }
    }

    /// Posts an event to EQ `eqn` regardless of its mask (completion
    /// events follow the CQ's `c_eqn`, §5.4).
    pub fn post_to_eq(
        &mut self,
        iommu: &Iommu,
        eqn: u8,
        kind: u8,
        sub: u8,
        data: &[u8; 28],
        fx: &mut Effects,
    ) {
        let Some(eq) = self.eqs.get_mut(&eqn) else {
            self.stats.eq_overruns += 1;
            return;
        };
        match eq.post(iommu, kind, sub, data) {
            Posted::Written(v) => {
                self.stats.eqes += 1;
                fx.fire.extend(v);
            }
            Posted::Overrun | Posted::DmaFault => self.stats.eq_overruns += 1,
        }
    }

    /// EQ consumer doorbell written on UAR `uar`; `Err` names an EQN that
    /// does not exist or is not served by that UAR.
    pub fn eq_doorbell(&mut self, uar: u32, value: u32, arm: bool) -> Result<Option<u16>, u8> {
        let eqn = (value >> 24) as u8;
        match self.eqs.get_mut(&eqn) {
            Some(eq) if eq.uar == uar => Ok(eq.doorbell(value & 0x00FF_FFFF, arm)),
            _ => Err(eqn),
        }
    }

    /// Whether an EQ subscribes to command completions.
    pub fn has_cmd_eq(&self) -> bool {
        self.eqs.values().any(|e| e.subscribes(0x0A))
    }

    fn required_pages(&self) -> usize {
        if self.initialized || self.caps_set {
            (self.p.boot_pages
                + if self.initialized {
                    self.p.init_pages
                } else {
                    0
                }) as usize
        } else {
            0
        }
    }

    /// Sends the next page-storm request, if any is due.
    pub fn storm_step(&mut self, iommu: &Iommu, fx: &mut Effects) {
        let Some((_, pages)) = self.p.storm else {
            return;
        };
        if !self.initialized || !self.eqs.values().any(|e| e.subscribes(0x0B)) {
            return;
        }
        while self.storm_left > 0 {
            self.storm_left -= 1;
            self.page_request(iommu, pages as i32, fx);
        }
        while let Some(n) = self.reclaims_due.pop_front() {
            self.page_request(iommu, -(n as i32), fx);
        }
    }

    fn page_request(&mut self, iommu: &Iommu, n: i32, fx: &mut Effects) {
        let mut d = [0u8; 28];
        // ec_function (0x20), function_id (0x22) = 0, num_pages (0x24).
        set_dword(&mut d, 4, n as u32);
        self.stats.page_requests += 1;
        self.post_event(iommu, 0x0B, 0, &d, fx);
    }

    fn tag_page(iommu: &Iommu, page: u64) -> bool {
        let mut b = [0u8; 8];
        set_qword(&mut b, 0, PAGE_TAG ^ page);
        iommu.write(page, &b).is_ok()
    }

    fn check_tag(iommu: &Iommu, page: u64) -> bool {
        let mut b = [0u8; 8];
        iommu.read(page, &mut b).is_ok() && qword(&b, 0) == PAGE_TAG ^ page
    }

    /// Executes one command. `input` holds `inlen` bytes; the output is
    /// `outlen` bytes long on success.
    pub fn execute(
        &mut self,
        iommu: &Iommu,
        opcode: u16,
        op_mod: u16,
        input: &[u8],
        outlen: usize,
        fx: &mut Effects,
    ) -> Result<Vec<u8>, Fail> {
        self.stats.commands += 1;
        let r = self.run(iommu, opcode, op_mod, input, outlen, fx);
        if r.is_err() {
            self.stats.failed_commands += 1;
        }
        r
    }

    #[allow(clippy::too_many_lines)]
    fn run(
        &mut self,
        iommu: &Iommu,
        op: u16,
        op_mod: u16,
        i: &[u8],
        outlen: usize,
        fx: &mut Effects,
    ) -> Result<Vec<u8>, Fail> {
        use status::*;
        let (min_in, min_out) = match op {
            0x104 | 0x105 => (0x10, 0x0C),
            0x10A => (0x10, 0x70),
            0x100 => (0x10, 0x1010),
            0x109 => (0x1010, 0x10),
            0x203 => (0x10, 0x18),
            0x200 | 0x301 | 0x400 | 0x403 | 0x500 | 0x502..=0x505 => (0x110, 0x10),
            0x401 | 0x501 | 0x507 | 0x50A | 0x90E | 0x701 | 0x703 => (0x10, 0x10),
            0x90C | 0x90D | 0x700 => (0x110, 0x10),
            0x806 | 0x807 => (0x20, 0x10),
            0x50D => (0x110, 0x110),
            0x10B | 0x107 | 0x108 | 0x102 | 0x103 | 0x805 | 0x800 | 0x801 | 0x802 | 0x803
            | 0x202 | 0x302 | 0x80D => (0x10, 0x10),
            _ => return Err(fail(op, BAD_OP, Reason::UnknownOpcode)),
        };
        if i.len() < min_in {
            return Err(fail(op, BAD_INP_LEN, Reason::InputTooShort));
        }
        if outlen < min_out {
            return Err(fail(op, BAD_OUTP_LEN, Reason::OutputTooShort));
        }
        let mut o = vec![0u8; outlen.max(16)];
        let function_id = field(i, 0x08, 15, 0);
        let need_enabled = |s: &Self| {
            if s.enabled {
                Ok(())
            } else {
                Err(fail(op, BAD_SYS_STATE, Reason::NotEnabled))
            }
        };
        let need_init = |s: &Self| {
            if s.initialized {
                Ok(())
            } else {
                Err(fail(op, BAD_SYS_STATE, Reason::NotInitialized))
            }
        };
        match op {
            // ENABLE_HCA / DISABLE_HCA
            0x104 => {
                if op_mod != 0 {
                    return Err(fail(op, BAD_OP, Reason::BadOpMod));
                }
                if function_id != 0 {
                    return Err(fail(op, BAD_PARAM, Reason::BadFunction));
                }
                if self.enabled {
                    return Err(fail(op, BAD_SYS_STATE, Reason::AlreadyEnabled));
                }
                self.enabled = true;
            }
            0x105 => {
                need_enabled(self)?;
                if self.initialized {
                    return Err(fail(op, BAD_SYS_STATE, Reason::StillInitialized));
                }
                self.stats.pages_leaked_at_disable += self.pages.len() as u64;
                self.pages.clear();
                self.enabled = false;
                self.boot_given = 0;
                self.init_given = 0;
                self.caps_set = false;
            }
            // QUERY_ISSI / SET_ISSI
            0x10A => {
                need_enabled(self)?;
                set_field(&mut o, 0x08, 15, 0, u32::from(self.issi));
                set_dword(&mut o, 0x6C, (2u32 << self.p.max_issi.min(30)) - 1);
            }
            0x10B => {
                need_enabled(self)?;
                if self.initialized {
                    return Err(fail(op, BAD_SYS_STATE, Reason::AlreadyInitialized));
                }
                let v = field(i, 0x08, 15, 0);
                if v > u32::from(self.p.max_issi) {
                    return Err(fail(op, BAD_PARAM, Reason::BadIssi));
                }
                self.issi = v as u16;
            }
            // QUERY_PAGES
            0x107 => {
                need_enabled(self)?;
                let n = match op_mod {
                    1 => self.p.boot_pages.saturating_sub(self.boot_given),
                    2 => self.p.init_pages.saturating_sub(self.init_given),
                    3 => 0,
                    _ => return Err(fail(op, BAD_OP, Reason::BadOpMod)),
                };
                set_field(&mut o, 0x08, 15, 0, 0);
                set_dword(&mut o, 0x0C, n);
            }
            // MANAGE_PAGES
            0x108 => {
                need_enabled(self)?;
                if function_id != 0 {
                    return Err(fail(op, BAD_PARAM, Reason::BadFunction));
                }
                let n = dword(i, 0x0C) as usize;
                match op_mod {
                    0 => {}
                    1 => {
                        if i.len() < 0x10 + 8 * n {
                            return Err(fail(op, BAD_INP_LEN, Reason::TooManyEntries));
                        }
                        let list: Vec<u64> = (0..n).map(|k| qword(i, 0x10 + 8 * k)).collect();
                        let mut seen = BTreeSet::new();
                        for &p in &list {
                            if p % 4096 != 0 || p == 0 {
                                return Err(fail(op, BAD_PARAM, Reason::PageMisaligned));
                            }
                            if !iommu.covers(p, 4096) {
                                return Err(fail(op, BAD_PARAM, Reason::PageNotMapped));
                            }
                            if self.pages.contains(&p) || !seen.insert(p) {
                                return Err(fail(op, BAD_PARAM, Reason::PageAlreadyGiven));
                            }
                        }
                        for &p in &list {
                            Self::tag_page(iommu, p);
                            self.pages.insert(p);
                        }
                        // Credit the boot stage, then init, then run-time requests.
                        let mut left = n as u32;
                        let b =
                            left.min(self.p.boot_pages - self.boot_given.min(self.p.boot_pages));
                        self.boot_given += b;
                        left -= b;
                        if self.caps_set || self.boot_given >= self.p.boot_pages {
                            let k = left
                                .min(self.p.init_pages - self.init_given.min(self.p.init_pages));
                            self.init_given += k;
                            left -= k;
                        }
                        if left > 0 && self.initialized {
                            // Run-time pages are handed back later, as after a storm.
                            self.reclaims_due.push_back(left);
                        }
                    }
                    2 => {
                        let spare = self.pages.len().saturating_sub(self.required_pages());
                        let cap = (outlen.saturating_sub(0x10)) / 8;
                        let give_back: Vec<u64> = self
                            .pages
                            .iter()
                            .rev()
                            .take(n.min(spare).min(cap))
                            .copied()
                            .collect();
                        for (k, p) in give_back.iter().enumerate() {
                            if !Self::check_tag(iommu, *p) {
                                self.stats.page_corruptions += 1;
                            }
                            self.pages.remove(p);
                            set_qword(&mut o, 0x10 + 8 * k, *p);
                        }
                        set_dword(&mut o, 0x08, give_back.len() as u32);
                    }
                    _ => return Err(fail(op, BAD_OP, Reason::BadOpMod)),
                }
            }
            // QUERY_HCA_CAP / SET_HCA_CAP
            0x100 => {
                need_enabled(self)?;
                if self.boot_given < self.p.boot_pages {
                    return Err(fail(op, BAD_SYS_STATE, Reason::BootPagesMissing));
                }
                let cap_type = op_mod >> 1;
                let block: CapBlock = match cap_type {
                    0 => {
                        if op_mod & 1 == 1 {
                            self.caps_cur.clone()
                        } else {
                            self.caps_max.clone()
                        }
                    }
                    // IPoIB enhanced offloads: present, all zero in this model.
                    6 => Box::new([0u8; 4096]),
                    _ => return Err(fail(op, BAD_OP, Reason::BadCapType)),
                };
                o[0x10..0x1010].copy_from_slice(&block[..]);
            }
            0x109 => {
                need_enabled(self)?;
                if op_mod >> 1 != 0 {
                    return Err(fail(op, BAD_OP, Reason::BadCapType));
                }
                if self.boot_given < self.p.boot_pages {
                    return Err(fail(op, BAD_SYS_STATE, Reason::BootPagesMissing));
                }
                if self.initialized {
                    return Err(fail(op, BAD_SYS_STATE, Reason::AlreadyInitialized));
                }
                let mut new: CapBlock = Box::new([0u8; 4096]);
                new.copy_from_slice(&i[0x10..0x1010]);
                if caps::get(&new, f::LOG_UAR_PAGE_SZ) != 0 {
                    return Err(fail(op, BAD_PARAM, Reason::BadCapValue));
                }
                for fl in [f::PKEY_TABLE_SIZE, f::LOG_MAX_QP] {
                    if caps::get(&new, fl) > caps::get(&self.caps_max, fl) {
                        return Err(fail(op, BAD_PARAM, Reason::BadCapValue));
                    }
                }
                // Only the writable fields take effect.
                for fl in [
                    f::CMDIF_CHECKSUM,
                    f::LOG_UAR_PAGE_SZ,
                    f::PKEY_TABLE_SIZE,
                    f::LOG_MAX_QP,
                    f::DISABLE_LINK_UP,
                    f::MKEY_BY_NAME,
                ] {
                    caps::set(&mut self.caps_cur, fl, caps::get(&new, fl));
                }
                self.caps_set = true;
            }
            // INIT_HCA / TEARDOWN_HCA
            0x102 => {
                need_enabled(self)?;
                if self.initialized {
                    return Err(fail(op, BAD_SYS_STATE, Reason::AlreadyInitialized));
                }
                if self.init_given < self.p.init_pages {
                    return Err(fail(op, BAD_SYS_STATE, Reason::InitPagesMissing));
                }
                self.initialized = true;
                if caps::get(&self.caps_cur, f::DISABLE_LINK_UP) == 0 {
                    self.port.phys = phys::LINK_UP;
                    self.port.state = state::INIT;
                    self.note_port_state(state::INIT);
                }
            }
            0x103 => {
                need_init(self)?;
                let profile = field(i, 0x08, 15, 0);
                if profile > 2 {
                    return Err(fail(op, BAD_PARAM, Reason::BadProfile));
                }
                self.stats.objects_at_teardown += self.objects_alive() as u64;
                self.uars.clear();
                self.pds.clear();
                self.mkeys.clear();
                self.eqs.clear();
                self.cqs.clear();
                self.qps.clear();
                self.srqs.clear();
                self.mcgs.clear();
                self.initialized = false;
                self.caps_set = false;
                self.reclaims_due.clear();
                self.port.state = state::DOWN;
                self.port.phys = phys::DISABLED;
                self.note_port_state(state::DOWN);
            }
            // ACCESS_REG
            0x805 => {
                need_enabled(self)?;
                let reg = field(i, 0x08, 15, 0);
                match (reg, op_mod) {
                    (0x7004, 0) if i.len() >= 0x20 => {}
                    (0x5003, 1) if i.len() >= 0x20 && outlen >= 0x20 => {
                        if field(i, 0x10, 23, 16) != 1 {
                            return Err(fail(op, BAD_PARAM, Reason::BadPort));
                        }
                        // A read returns the register image the driver sent
                        // with the fields firmware knows filled in.
                        let n = (i.len() - 0x10).min(o.len() - 0x10);
                        o[0x10..0x10 + n].copy_from_slice(&i[0x10..0x10 + n]);
                        set_field(&mut o, 0x10, 23, 16, 1);
                        let mtu = 128u32 << self.port.mtu;
                        set_field(&mut o, 0x14, 31, 16, 4096);
                        set_field(&mut o, 0x18, 31, 16, mtu);
                        set_field(&mut o, 0x1C, 31, 16, mtu);
                    }
                    (_, 0 | 1) => return Err(fail(op, BAD_PARAM, Reason::BadRegister)),
                    _ => return Err(fail(op, BAD_OP, Reason::BadOpMod)),
                }
            }
            // ALLOC_UAR / DEALLOC_UAR
            0x802 => {
                need_init(self)?;
                let u = (FIRST_UAR..)
                    .find(|u| !self.uars.contains(u))
                    .unwrap_or(FIRST_UAR);
                self.uars.insert(u);
                set_field(&mut o, 0x08, 23, 0, u);
            }
            0x803 => {
                need_init(self)?;
                let u = field(i, 0x08, 23, 0);
                if !self.uars.contains(&u) {
                    return Err(fail(op, BAD_RES, Reason::UnknownObject));
                }
                if self.eqs.values().any(|e| e.uar == u)
                    || self.cqs.values().any(|c| c.uar == u)
                    || self.qps.values().any(|q| q.uar == u)
                {
                    return Err(fail(op, RES_BUSY, Reason::ObjectInUse));
                }
                self.uars.remove(&u);
            }
            // ALLOC_PD / DEALLOC_PD
            0x800 => {
                need_init(self)?;
                let pd = self.next_pd;
                self.next_pd = (self.next_pd + 1) & 0xFF_FFFF;
                self.pds.insert(pd);
                set_field(&mut o, 0x08, 23, 0, pd);
            }
            0x801 => {
                need_init(self)?;
                let pd = field(i, 0x08, 23, 0);
                if !self.pds.contains(&pd) {
                    return Err(fail(op, BAD_RES, Reason::UnknownObject));
                }
                if self.mkeys.values().any(|k| k.pd == pd)
                    || self.qps.values().any(|q| q.pd == pd)
                    || self.srqs.values().any(|q| q.pd == pd)
                {
                    return Err(fail(op, RES_BUSY, Reason::ObjectInUse));
                }
                self.pds.remove(&pd);
            }
            // QUERY_SPECIAL_CONTEXTS
            0x203 => {
                need_init(self)?;
                set_dword(&mut o, 0x0C, 0x0000_0500);
                set_dword(&mut o, 0x10, 0x0000_0600);
                set_dword(&mut o, 0x14, 0x0000_0100);
            }
            // CREATE_MKEY / DESTROY_MKEY
            0x200 => {
                need_init(self)?;
                const MKC: usize = 0x10;
                if field(i, MKC, 30, 30) != 0 {
                    return Err(fail(op, BAD_PARAM, Reason::BadAccessMode));
                }
                let mode = field(i, MKC, 9, 8) | (field(i, MKC, 28, 26) << 2);
                if mode != 0 {
                    // This model implements physical-address keys only.
                    return Err(fail(op, BAD_PARAM, Reason::BadAccessMode));
                }
                // length64: all of the address space; else [start, start + len).
                let range = if field(i, MKC + 0x0C, 31, 31) == 1 {
                    None
                } else {
                    let start = crate::bytes::qword(i, MKC + 0x10);
                    let len = crate::bytes::qword(i, MKC + 0x18);
                    if len == 0 || start.checked_add(len).is_none() {
                        return Err(fail(op, BAD_PARAM, Reason::BadAccessMode));
                    }
                    Some((start, len))
                };
                let pd = field(i, MKC + 0x0C, 23, 0);
                if !self.pds.contains(&pd) {
                    return Err(fail(op, BAD_RES, Reason::UnknownObject));
                }
                let idx = self.next_mkey;
                self.next_mkey += 1;
                self.mkeys.insert(
                    idx,
                    Mkey {
                        pd,
                        low: field(i, MKC + 0x04, 7, 0) as u8,
                        range,
                    },
                );
                set_field(&mut o, 0x08, 23, 0, idx);
            }
            0x202 => {
                need_init(self)?;
                let idx = field(i, 0x08, 23, 0);
                if self.mkeys.remove(&idx).is_none() {
                    return Err(fail(op, BAD_RES, Reason::UnknownObject));
                }
            }
            // CREATE_EQ / DESTROY_EQ
            0x301 => {
                need_init(self)?;
                const EQC: usize = 0x10;
                let log_size = field(i, EQC + 0x0C, 28, 24) as u8;
                let uar = field(i, EQC + 0x0C, 23, 0);
                let intr = field(i, EQC + 0x14, 11, 0) as u16;
                let log_page = field(i, EQC + 0x18, 28, 24);
                if log_size == 0
                    || u32::from(log_size) > caps::get(&self.caps_cur, f::LOG_MAX_EQ_SZ)
                {
                    return Err(fail(op, BAD_PARAM, Reason::BadEqSize));
                }
                if !self.uars.contains(&uar) {
                    return Err(fail(op, BAD_RES, Reason::UnknownObject));
                }
                if usize::from(intr) >= self.p.msix_vectors {
                    return Err(fail(op, BAD_PARAM, Reason::BadVector));
                }
                if self.eqs.len() >= caps::get(&self.caps_cur, f::MAX_NUM_EQS) as usize {
                    return Err(fail(op, LIM, Reason::TooManyEntries));
                }
                let page_size = 4096u64 << log_page.min(20);
                let bytes = 64u64 << log_size;
                let pas = queue_pages(iommu, op, i, page_size, bytes)?;
                let mut mask = [0u64; 4];
                for (k, m) in mask.iter_mut().enumerate() {
                    *m = qword(i, 0x58 + 8 * k);
                }
                let eqn = (self.next_eqn..=u8::MAX)
                    .chain(1..self.next_eqn)
                    .find(|n| !self.eqs.contains_key(n))
                    .ok_or(fail(op, status::LIM, Reason::TooManyEntries))?;
                self.next_eqn = eqn.wrapping_add(1).max(1);
                self.eqs.insert(
                    eqn,
                    SimEq {
                        log_size,
                        uar,
                        intr,
                        pas,
                        page_size,
                        mask,
                        pc: 0,
                        cc: 0,
                        armed: false,
                        overrun: false,
                    },
                );
                set_field(&mut o, 0x08, 7, 0, u32::from(eqn));
                self.storm_step(iommu, fx);
            }
            0x302 => {
                need_init(self)?;
                let eqn = field(i, 0x08, 7, 0) as u8;
                if !self.eqs.contains_key(&eqn) {
                    return Err(fail(op, BAD_RES, Reason::UnknownObject));
                }
                if self.cqs.values().any(|c| c.eqn == u32::from(eqn)) {
                    return Err(fail(op, RES_BUSY, Reason::ObjectInUse));
                }
                self.eqs.remove(&eqn);
            }
            // MAD_IFC
            0x50D => {
                need_init(self)?;
                let port = field(i, 0x08, 7, 0) as u8;
                if port == 0 || port > self.p.node.num_ports {
                    return Err(fail(op, BAD_PARAM, Reason::BadPort));
                }
                let mut req = [0u8; 256];
                req.copy_from_slice(&i[0x10..0x110]);
                let resp = answer_smp(&req, port, &self.port, &self.p.node);
                o[0x10..0x110].copy_from_slice(&resp);
            }
            // CQs, QPs, multicast attachments (queues.rs)
            0x400
            | 0x401
            | 0x403
            | 0x500
            | 0x501
            | 0x502..=0x505
            | 0x507
            | 0x50A
            | 0x806
            | 0x807 => {
                need_init(self)?;
                self.queue_command(iommu, op, op_mod, i, &mut o)?;
            }
            // Shared receive queues (rc.rs)
            0x90C..=0x90E | 0x700 | 0x701 | 0x703 => {
                need_init(self)?;
                self.srq_command(iommu, op, i, &mut o)?;
            }
            // NOP
            0x80D => need_enabled(self)?,
            _ => return Err(fail(op, BAD_OP, Reason::UnknownOpcode)),
        }
        Ok(o)
    }

    /// Run-time work after a command completed (page storm pacing).
    pub fn after_command(&mut self, iommu: &Iommu, fx: &mut Effects) {
        self.storm_step(iommu, fx);
    }
}
