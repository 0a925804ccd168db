//! HCA bring-up, run time and teardown (reference §3).
//!
//! [`Hca::bring_up`] walks the sequence of §3.1/§3.2 one [`Step`] at a
//! time, recording every object it creates; any failure tears down what
//! exists, in reverse order, and reports the step that failed together with
//! the device's status and syndrome. [`Hca::shutdown`] is the same teardown
//! on the normal path. When firmware may still own memory (a command timed
//! out, or the device went fatal) the teardown resets the function before
//! releasing any DMA memory, so nothing the device could still write is
//! ever freed.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::cmd::eq::{CreateEq, DestroyEq};
use crate::cmd::hca::{
    AccessReg, AllocPd, AllocUar, CreatePaMkey, DeallocPd, DeallocUar, DestroyMkey, DisableHca,
    EnableHca, InitHca, MANAGE_PAGES_BATCH, ManagePages, PageStage, QueryHcaCap, QueryIssi,
    QueryPages, QuerySpecialContexts, SetHcaCap, SetIssi, SpecialContexts, TeardownHca,
    TeardownProfile,
};
use crate::cmd::mad::MadIfc;
use crate::cmd::queue::CmdQueue;
use crate::cmd::{CmdError, CmdStatus, Command, Opcode, check_output, encode_input};
use crate::health::{Fatal, HealthMonitor};
use crate::layout::caps::{CapType, GeneralCaps, field};
use crate::layout::eqe::{ASYNC_EVENT_MASK, EQE_LEN, Eqe, OWNER, PortChange};
use crate::layout::smp::{
    MAD_LEN, PortInfo, PortState, attr, guid_info_entry, mad_status, mtu_bytes, node_guid,
    pkey_block, smp_get,
};
use crate::pages::PagePool;
use crate::queues::eq::{EqRing, SPARE_EQES};
use crate::regs;
use crate::transport::{
    DmaBuffer, DmaMem, Iova, IovaSpace, PciIds, Transport, TransportError, dma_rmb, host_page_size,
    pci, read_pci_ids, wait_eventfd,
};

/// How command completions are detected once the EQ exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Completion {
    /// Sleep on the MSI-X eventfd; wake on the command-completion EQE.
    Events,
    /// Spin on the ownership bit (and poll the EQ without arming it).
    Polled,
}

/// Tunables of bring-up and run time.
#[derive(Clone, Debug)]
pub struct HcaConfig {
    /// How long firmware may keep `initializing` set.
    pub fw_ready_timeout: Duration,
    /// Per-command timeout (60 s in both drivers).
    pub cmd_timeout: Duration,
    /// Health poll period (Linux: 2 s).
    pub health_interval: Duration,
    /// Completion mode after the EQ exists.
    pub completion: Completion,
    /// log2 of async EQ entries (spare entries included).
    pub eq_log_size: u8,
    /// Give up reclaiming pages after this long without progress (Linux: 5 s).
    pub reclaim_timeout: Duration,
}

impl Default for HcaConfig {
    fn default() -> Self {
        HcaConfig {
            fw_ready_timeout: Duration::from_secs(120),
            cmd_timeout: Duration::from_secs(60),
            health_interval: Duration::from_secs(2),
            completion: Completion::Events,
            eq_log_size: 10,
            reclaim_timeout: Duration::from_secs(5),
        }
    }
}

/// A bring-up step, for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[allow(missing_docs)]
pub enum Step {
    OpenDevice,
    InitSegment,
    FirmwareReady,
    CommandQueue,
    EnableHca,
    Issi,
    BootPages,
    HostEndianness,
    QueryCaps,
    SetCaps,
    InitPages,
    InitHca,
    SpecialContexts,
    AllocUar,
    CreateEq,
    AllocPd,
    CreateMkey,
    QueryPort(u8),
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Step::OpenDevice => "opening the device",
            Step::InitSegment => "reading the initialization segment",
            Step::FirmwareReady => "waiting for firmware",
            Step::CommandQueue => "setting up the command queue",
            Step::EnableHca => "ENABLE_HCA",
            Step::Issi => "ISSI negotiation",
            Step::BootPages => "boot pages",
            Step::HostEndianness => "host endianness register",
            Step::QueryCaps => "querying capabilities",
            Step::SetCaps => "setting capabilities",
            Step::InitPages => "init pages",
            Step::InitHca => "INIT_HCA",
            Step::SpecialContexts => "QUERY_SPECIAL_CONTEXTS",
            Step::AllocUar => "ALLOC_UAR",
            Step::CreateEq => "creating the async EQ",
            Step::AllocPd => "ALLOC_PD",
            Step::CreateMkey => "creating the DMA memory key",
            Step::QueryPort(p) => return write!(f, "querying port {p}"),
        };
        f.write_str(s)
    }
}

/// Errors of the HCA layer.
#[derive(Debug, thiserror::Error)]
pub enum HcaError {
    /// A command failed.
    #[error(transparent)]
    Cmd(#[from] CmdError),
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// `initializing` stayed set.
    #[error("firmware not ready after {} ms (initializing = 1)", .0.as_millis())]
    FirmwareNotReady(Duration),
    /// Unsupported command interface.
    #[error("command interface revision {0}, only 5 is supported")]
    CmdifRev(u32),
    /// Command queue geometry out of range.
    #[error("bad command queue geometry: log_cmdq_size {0}, log_cmdq_stride {1}")]
    Geometry(u8, u8),
    /// The device went fatal.
    #[error(transparent)]
    Fatal(#[from] Fatal),
    /// A local MAD was refused.
    #[error("MAD_IFC Get(attribute {attr:#06x}) on port {port}: MAD status {status:#06x}")]
    Mad {
        /// Port.
        port: u8,
        /// Attribute id.
        attr: u16,
        /// MAD status.
        status: u16,
    },
    /// No MSI-X vectors.
    #[error("the function has no MSI-X vectors")]
    NoMsix,
    /// Posting work failed.
    #[error(transparent)]
    Post(#[from] crate::verbs::PostError),
}

/// Bring-up failure: the step, the cause and what teardown found.
#[derive(Debug, thiserror::Error)]
#[error("bring-up of {device} failed at {step}")]
pub struct BringupError {
    /// Device name.
    pub device: String,
    /// The failing step.
    pub step: Step,
    /// The cause.
    #[source]
    pub source: HcaError,
    /// What teardown did afterwards.
    pub teardown: TeardownReport,
}

/// What teardown did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TeardownReport {
    /// Pages firmware returned through MANAGE_PAGES.
    pub pages_reclaimed: usize,
    /// Pages dropped by a function reset instead.
    pub pages_dropped_by_reset: usize,
    /// Whether a function reset was needed.
    pub reset: bool,
    /// Problems met on the way (the teardown continues past them).
    pub errors: Vec<String>,
    /// DMA bytes still mapped at the end (0 unless something leaked).
    pub dma_bytes_left: u64,
}

impl TeardownReport {
    /// Whether everything came back.
    pub fn clean(&self) -> bool {
        self.dma_bytes_left == 0 && self.errors.is_empty()
    }
}

/// One IB port as the probe shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PortAttrs {
    /// 1-based port number.
    pub port: u8,
    /// Logical state.
    pub state: PortState,
    /// Physical state (5 = LinkUp).
    pub phys_state: u8,
    /// Base LID.
    pub lid: u16,
    /// SM LID.
    pub sm_lid: u16,
    /// SM SL.
    pub sm_sl: u8,
    /// LMC.
    pub lmc: u8,
    /// Active MTU in bytes.
    pub mtu: u32,
    /// Max MTU in bytes.
    pub max_mtu: u32,
    /// GID 0: subnet prefix ‖ port GUID.
    pub gid: [u8; 16],
    /// Port GUID.
    pub port_guid: u64,
    /// Non-zero P_Key table entries as (index, P_Key).
    pub pkeys: Vec<(u16, u16)>,
    /// LinkWidthActive (1 = 1x, 2 = 4x, 4 = 8x, 8 = 12x, 16 = 2x).
    pub link_width: u8,
    /// LinkSpeedActive.
    pub link_speed: u8,
}

/// An EQ as the probe shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct EqInfo {
    /// EQ number.
    pub eqn: u8,
    /// MSI-X vector.
    pub vector: u16,
    /// Entries.
    pub entries: usize,
    /// Subscribed event mask (word 0).
    pub event_mask: u64,
}

/// What an administrator wants to know about a brought-up HCA.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HcaInfo {
    /// Device name (PCI address or `sim`).
    pub device: String,
    /// PCI identity.
    pub pci: PciIds,
    /// Firmware version major.minor.subminor.
    pub fw_version: String,
    /// Command interface revision.
    pub cmdif_rev: u32,
    /// Command slots.
    pub cmd_slots: usize,
    /// ISSI in effect.
    pub issi: u16,
    /// Pages given at the boot stage.
    pub boot_pages: usize,
    /// Pages given at the init stage.
    pub init_pages: usize,
    /// Pages held by firmware now.
    pub pages_given: usize,
    /// MSI-X vectors of the function.
    pub msix_vectors: usize,
    /// Event queues.
    pub eqs: Vec<EqInfo>,
    /// UAR index.
    pub uar: u32,
    /// Protection domain.
    pub pd: u32,
    /// DMA memory key.
    pub lkey: u32,
    /// Reserved lkey.
    pub resd_lkey: u32,
    /// Node GUID.
    pub node_guid: u64,
    /// Port type from the caps (0 InfiniBand, 1 Ethernet).
    pub port_type: u8,
    /// log2 max QPs.
    pub log_max_qp: u8,
    /// IPoIB basic offloads (checksum/LSO on UD).
    pub ipoib_basic_offloads: bool,
    /// Ports.
    pub ports: Vec<PortAttrs>,
}

/// An asynchronous event for upper layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AsyncEvent {
    /// Port change.
    Port {
        /// Port.
        port: u8,
        /// What changed.
        change: PortChange,
    },
    /// CQ completion notification.
    Completion {
        /// CQN.
        cqn: u32,
    },
    /// Any other event.
    Other(Eqe),
}

/// Counters of the control path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct HcaStats {
    /// Commands executed.
    pub commands: u64,
    /// EQEs consumed.
    pub eqes: u64,
    /// Interrupts (eventfd wake-ups with a non-zero count).
    pub interrupts: u64,
    /// Page requests received.
    pub page_requests: u64,
    /// Pages given at run time.
    pub pages_given_runtime: u64,
    /// Pages reclaimed at run time.
    pub pages_reclaimed_runtime: u64,
    /// Returned pages we never gave (refused).
    pub bogus_pages: u64,
    /// Page commands firmware failed.
    pub page_cmd_errors: u64,
}

#[derive(Debug)]
struct AsyncEq {
    buf: DmaBuffer,
    ring: EqRing,
    eqn: u8,
    uar: u32,
}

#[derive(Debug)]
enum PageCmd {
    Give(Vec<Iova>),
    Take,
    CannotGive,
}

#[derive(Debug, Default)]
struct PageWork {
    pending: VecDeque<(u16, i32)>,
    in_flight: Option<(PageCmd, ManagePages)>,
}

/// Memory of someone else's (a VM's) mapped for the device by
/// [`Hca::map_foreign`]: the window, and where each piece of it sits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignWindow {
    /// First IOVA of the window.
    pub iova: Iova,
    /// Its length.
    pub len: u64,
    /// Each piece's IOVA and length, in the order given.
    pub pieces: Vec<(Iova, u64)>,
}

/// A brought-up HCA.
#[derive(Debug)]
pub struct Hca<T: Transport> {
    t: T,
    cfg: HcaConfig,
    space: IovaSpace,
    cmdq: Option<CmdQueue>,
    pages: PagePool,
    page_work: PageWork,
    enabled: bool,
    initialized: bool,
    irq: Option<EventFd>,
    msix_on: bool,
    eq: Option<AsyncEq>,
    use_eq: bool,
    uar: Option<u32>,
    pd: Option<u32>,
    mkey: Option<u32>,
    caps: GeneralCaps,
    special: Option<SpecialContexts>,
    health: HealthMonitor,
    fatal: Option<Fatal>,
    events: VecDeque<AsyncEvent>,
    stats: HcaStats,
    info: HcaInfo,
}

impl<T: Transport> Hca<T> {
    /// Brings the HCA behind `t` up. On failure everything created so far
    /// is torn down and the error names the failing step.
    pub fn bring_up(t: T, cfg: HcaConfig) -> Result<Hca<T>, Box<BringupError>> {
        let space = IovaSpace::new(&t.iova_ranges());
        let info = HcaInfo {
            device: t.name().to_string(),
            pci: PciIds {
                vendor: 0,
                device: 0,
                revision: 0,
            },
            fw_version: String::new(),
            cmdif_rev: 0,
            cmd_slots: 0,
            issi: 0,
            boot_pages: 0,
            init_pages: 0,
            pages_given: 0,
            msix_vectors: t.msix_vectors(),
            eqs: Vec::new(),
            uar: 0,
            pd: 0,
            lkey: 0,
            resd_lkey: 0,
            node_guid: 0,
            port_type: 0,
            log_max_qp: 0,
            ipoib_basic_offloads: false,
            ports: Vec::new(),
        };
        let mut hca = Hca {
            health: HealthMonitor::new(cfg.health_interval),
            t,
            cfg,
            space,
            cmdq: None,
            pages: PagePool::new(),
            page_work: PageWork::default(),
            enabled: false,
            initialized: false,
            irq: None,
            msix_on: false,
            eq: None,
            use_eq: false,
            uar: None,
            pd: None,
            mkey: None,
            caps: GeneralCaps::default(),
            special: None,
            fatal: None,
            events: VecDeque::new(),
            stats: HcaStats::default(),
            info,
        };
        match hca.run_bring_up() {
            Ok(()) => Ok(hca),
            Err((step, source)) => {
                let device = hca.info.device.clone();
                let teardown = hca.teardown();
                Err(Box::new(BringupError {
                    device,
                    step,
                    source,
                    teardown,
                }))
            }
        }
    }

    fn run_bring_up(&mut self) -> Result<(), (Step, HcaError)> {
        fn at<R, E: Into<HcaError>>(step: Step, r: Result<R, E>) -> Result<R, (Step, HcaError)> {
            r.map_err(|e| (step, e.into()))
        }
        // PCI: identity, memory decoding on.
        self.info.pci = at(Step::OpenDevice, read_pci_ids(&self.t))?;
        let cmd = at(Step::OpenDevice, self.t.config_read16(pci::COMMAND))?;
        at(
            Step::OpenDevice,
            self.t
                .config_write16(pci::COMMAND, cmd | pci::COMMAND_MEMORY),
        )?;

        // Init segment: firmware ready, revision, geometry (§3.2 order).
        at(Step::FirmwareReady, self.wait_fw_ready())?;
        let w0 = self.t.bar_read32(regs::FW_REV.off);
        let w1 = self.t.bar_read32(regs::CMDIF_REV_FW_SUB.off);
        let rev = w1 >> 16;
        self.info.cmdif_rev = rev;
        self.info.fw_version = format!("{}.{}.{}", w0 & 0xffff, w0 >> 16, w1 & 0xffff);
        if rev != regs::CMDIF_REV {
            return Err((Step::InitSegment, HcaError::CmdifRev(rev)));
        }
        let geo = self.t.bar_read32(regs::CMDQ_ADDR_L_SZ.off);
        let log_size = ((geo >> 4) & 0xf) as u8;
        let log_stride = (geo & 0xf) as u8;
        if (1u32 << log_size) > 32 || log_size + log_stride > 12 || log_stride < 6 || log_size == 0
        {
            return Err((Step::InitSegment, HcaError::Geometry(log_size, log_stride)));
        }
        let q = at(
            Step::CommandQueue,
            CmdQueue::new(&self.t, &mut self.space, log_size, log_stride),
        )?;
        let addr = q.iova().0;
        self.info.cmd_slots = q.slots();
        self.cmdq = Some(q);
        self.t
            .bar_write32(regs::CMDQ_ADDR_H.off, (addr >> 32) as u32);
        // Low half with nic_interface = 0 (full driver).
        self.t
            .bar_write32(regs::CMDQ_ADDR_L_SZ.off, (addr as u32) & 0xFFFF_F000);
        let cmd = at(Step::CommandQueue, self.t.config_read16(pci::COMMAND))?;
        at(
            Step::CommandQueue,
            self.t.config_write16(
                pci::COMMAND,
                cmd | pci::COMMAND_MEMORY | pci::COMMAND_BUS_MASTER,
            ),
        )?;
        at(Step::FirmwareReady, self.wait_fw_ready())?;

        at(Step::EnableHca, self.exec(&EnableHca))?;
        self.enabled = true;

        // ISSI: 1 if offered, else stay at 0 (Linux falls back the same way).
        self.info.issi = match self.exec(&QueryIssi) {
            Ok(i) if i.supported & 0b10 != 0 => {
                at(Step::Issi, self.exec(&SetIssi(1)))?;
                1
            }
            Ok(_) => 0,
            Err(e) if e.status() == Some(CmdStatus::BadOperation) => 0,
            Err(e) => return Err((Step::Issi, e.into())),
        };

        self.info.boot_pages = at(Step::BootPages, self.give_stage_pages(PageStage::Boot))?;
        at(
            Step::HostEndianness,
            self.exec(&AccessReg::host_endianness()),
        )?;

        let max = at(
            Step::QueryCaps,
            self.exec(&QueryHcaCap {
                cap: CapType::General,
                current: false,
            }),
        )?;
        let mut cur = at(
            Step::QueryCaps,
            self.exec(&QueryHcaCap {
                cap: CapType::General,
                current: true,
            }),
        )?;
        cur.set(field::CMDIF_CHECKSUM, 0);
        let log_page = host_page_size().trailing_zeros().saturating_sub(12);
        cur.set(field::LOG_UAR_PAGE_SZ, log_page);
        cur.set(field::PKEY_TABLE_SIZE, 0);
        cur.set(field::LOG_MAX_QP, max.get(field::LOG_MAX_QP).min(18));
        at(
            Step::SetCaps,
            self.exec(&SetHcaCap {
                cap: CapType::General,
                caps: cur,
            }),
        )?;
        self.caps = at(
            Step::QueryCaps,
            self.exec(&QueryHcaCap {
                cap: CapType::General,
                current: true,
            }),
        )?;
        self.info.port_type = self.caps.get(field::PORT_TYPE) as u8;
        self.info.log_max_qp = self.caps.get(field::LOG_MAX_QP) as u8;
        self.info.ipoib_basic_offloads = self.caps.get(field::IPOIB_BASIC_OFFLOADS) == 1;

        self.info.init_pages = at(Step::InitPages, self.give_stage_pages(PageStage::Init))?;
        at(Step::InitHca, self.exec(&InitHca))?;
        self.initialized = true;

        self.special = Some(at(Step::SpecialContexts, self.exec(&QuerySpecialContexts))?);
        self.info.resd_lkey = self.special.map_or(0, |s| s.resd_lkey);

        let uar = at(Step::AllocUar, self.exec(&AllocUar))?;
        self.uar = Some(uar);
        self.info.uar = uar;

        at(Step::CreateEq, self.create_async_eq(uar))?;

        let pd = at(Step::AllocPd, self.exec(&AllocPd))?;
        self.pd = Some(pd);
        self.info.pd = pd;
        let lkey = at(
            Step::CreateMkey,
            self.exec(&CreatePaMkey {
                pd,
                key_low: 0x42,
                range: None,
            }),
        )?;
        self.mkey = Some(lkey);
        self.info.lkey = lkey;

        if self.info.port_type == 0 {
            for port in 1..=self.caps.num_ports() {
                let p = at(Step::QueryPort(port), self.query_port(port))?;
                self.info.ports.push(p);
            }
        }
        self.info.pages_given = self.pages.given();
        Ok(())
    }

    fn wait_fw_ready(&mut self) -> Result<(), HcaError> {
        let start = Instant::now();
        loop {
            if self.t.bar_read32(regs::INITIALIZING.off) & regs::INITIALIZING_BIT == 0 {
                return Ok(());
            }
            if start.elapsed() >= self.cfg.fw_ready_timeout {
                return Err(HcaError::FirmwareNotReady(self.cfg.fw_ready_timeout));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn give_stage_pages(&mut self, stage: PageStage) -> Result<usize, HcaError> {
        let need = self.exec(&QueryPages(stage))?;
        let n = usize::try_from(need.num_pages.max(0)).unwrap_or(0);
        let mut given = 0;
        while given < n {
            let batch = (n - given).min(MANAGE_PAGES_BATCH * 4);
            let pages = self.pages.take(&self.t, &mut self.space, batch)?;
            let cmd = ManagePages::Give {
                function_id: need.function_id,
                pages,
            };
            let slot = self.cmdq_ref()?.page_slot();
            let r = self.exec_on(slot, &cmd);
            let ManagePages::Give { pages, .. } = cmd else {
                unreachable!("constructed as Give above")
            };
            match r {
                Ok(_) => self.pages.mark_given(&pages),
                Err(e) => {
                    self.pages.put_back(pages);
                    return Err(e.into());
                }
            }
            given += batch;
        }
        Ok(given)
    }

    fn create_async_eq(&mut self, uar: u32) -> Result<(), HcaError> {
        if self.t.msix_vectors() == 0 {
            return Err(HcaError::NoMsix);
        }
        let log_size = self.cfg.eq_log_size.clamp(7, 16);
        let len = (1usize << log_size) * EQE_LEN;
        let buf = DmaBuffer::alloc(&self.t, &mut self.space, len)?;
        // Every owner byte 1 before CREATE_EQ (§5.1).
        for i in 0..(1usize << log_size) {
            buf.write_u8(i * EQE_LEN + OWNER, 1);
        }
        let pas: Vec<Iova> = (0..len / 4096).map(|k| buf.iova_at(k * 4096)).collect();
        let fd = EventFd::new(EFD_NONBLOCK).map_err(|source| TransportError::Io {
            op: "eventfd for MSI-X vector 0",
            source,
        });
        let fd = match fd {
            Ok(fd) => fd,
            Err(e) => {
                buf.release(&self.t, &mut self.space)?;
                return Err(e.into());
            }
        };
        if let Err(e) = self.t.enable_msix(&[&fd]) {
            buf.release(&self.t, &mut self.space)?;
            return Err(e.into());
        }
        self.msix_on = true;
        self.irq = Some(fd);
        let cmd = CreateEq {
            log_size,
            uar,
            intr: 0,
            log_page_size: 0,
            event_mask: [ASYNC_EVENT_MASK, 0, 0, 0],
            pas,
        };
        let eqn = match self.exec(&cmd) {
            Ok(n) => n,
            Err(e) => {
                buf.release(&self.t, &mut self.space)?;
                return Err(e.into());
            }
        };
        let eq = AsyncEq {
            buf,
            ring: EqRing::new(log_size),
            eqn,
            uar,
        };
        self.info.eqs.push(EqInfo {
            eqn,
            vector: 0,
            entries: eq.ring.len(),
            event_mask: ASYNC_EVENT_MASK,
        });
        self.eq = Some(eq);
        self.eq_doorbell(true);
        self.use_eq = true;
        Ok(())
    }

    fn query_port(&mut self, port: u8) -> Result<PortAttrs, HcaError> {
        let pi = PortInfo::parse(&self.smp(port, attr::PORT_INFO, u32::from(port))?);
        let guids = self.smp(port, attr::GUID_INFO, 0)?;
        let port_guid = guid_info_entry(&guids, 0);
        if self.info.node_guid == 0 {
            self.info.node_guid = node_guid(&self.smp(port, attr::NODE_INFO, 0)?);
        }
        let mut pkeys = Vec::new();
        for block in 0..(self.caps.pkey_table_len() / 32) {
            let m = self.smp(port, attr::PKEY_TABLE, block as u32)?;
            for (i, pk) in pkey_block(&m).into_iter().enumerate() {
                if pk & 0x7fff != 0 {
                    pkeys.push(((block * 32 + i) as u16, pk));
                }
            }
        }
        let mut gid = [0u8; 16];
        gid[..8].copy_from_slice(&pi.gid_prefix.to_be_bytes());
        gid[8..].copy_from_slice(&port_guid.to_be_bytes());
        Ok(PortAttrs {
            port,
            state: pi.state,
            phys_state: pi.phys_state,
            lid: pi.lid,
            sm_lid: pi.sm_lid,
            sm_sl: pi.sm_sl,
            lmc: pi.lmc,
            mtu: mtu_bytes(pi.active_mtu),
            max_mtu: mtu_bytes(pi.max_mtu),
            gid,
            port_guid,
            pkeys,
            link_width: pi.link_width_active,
            link_speed: pi.link_speed_active,
        })
    }

    /// Queries every port again (after port events).
    pub fn refresh_ports(&mut self) -> Result<(), HcaError> {
        if self.info.port_type != 0 {
            return Ok(());
        }
        let mut ports = Vec::new();
        for port in 1..=self.caps.num_ports() {
            ports.push(self.query_port(port)?);
        }
        self.info.ports = ports;
        Ok(())
    }

    /// A local SMP Get through MAD_IFC.
    pub fn smp(
        &mut self,
        port: u8,
        attr_id: u16,
        attr_mod: u32,
    ) -> Result<[u8; MAD_LEN], HcaError> {
        let tid = self.stats.commands;
        let resp = self.exec(&MadIfc {
            port,
            mad: smp_get(tid, attr_id, attr_mod),
        })?;
        let status = mad_status(&resp);
        if status != 0 {
            return Err(HcaError::Mad {
                port,
                attr: attr_id,
                status,
            });
        }
        Ok(resp)
    }

    fn cmdq_ref(&self) -> Result<&CmdQueue, CmdError> {
        self.cmdq.as_ref().ok_or(CmdError::NoSlot(Opcode(0)))
    }

    /// Executes one command and waits for it.
    pub fn exec<C: Command>(&mut self, cmd: &C) -> Result<C::Reply, CmdError> {
        let slot = self
            .cmdq_ref()?
            .free_slot()
            .ok_or(CmdError::NoSlot(cmd.opcode()))?;
        self.exec_on(slot, cmd)
    }

    fn exec_on<C: Command>(&mut self, slot: usize, cmd: &C) -> Result<C::Reply, CmdError> {
        let opcode = cmd.opcode();
        if let Some(cause) = &self.fatal {
            return Err(CmdError::DeviceFatal {
                opcode,
                cause: cause.clone(),
            });
        }
        let input = encode_input(cmd);
        let q = self.cmdq.as_mut().ok_or(CmdError::NoSlot(opcode))?;
        q.post(
            &self.t,
            &mut self.space,
            slot,
            opcode,
            cmd.op_mod(),
            &input,
            cmd.outlen(),
        )?;
        self.stats.commands += 1;
        self.wait_slot(slot, opcode, cmd.op_mod())?;
        let q = self.cmdq.as_mut().ok_or(CmdError::NoSlot(opcode))?;
        let out = q.collect(slot)?;
        check_output(cmd, &out)
    }

    fn wait_slot(&mut self, slot: usize, opcode: Opcode, op_mod: u16) -> Result<(), CmdError> {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            if self.cmdq.as_ref().is_some_and(|q| q.is_done(slot)) {
                return Ok(());
            }
            let now = Instant::now();
            if let Err(f) = self.health.poll(&self.t, now) {
                tracing::error!(device = self.info.device, "{f}");
                self.fatal = Some(f.clone());
                if let Some(q) = self.cmdq.as_mut() {
                    q.abandon(slot);
                }
                return Err(CmdError::DeviceFatal { opcode, cause: f });
            }
            let waited = now.duration_since(start);
            if waited >= self.cfg.cmd_timeout {
                if let Some(q) = self.cmdq.as_mut() {
                    q.abandon(slot);
                }
                tracing::error!(
                    device = self.info.device,
                    %opcode,
                    "command timed out; slot {slot} abandoned to firmware"
                );
                return Err(CmdError::Timeout {
                    opcode,
                    op_mod,
                    after: self.cfg.cmd_timeout,
                });
            }
            if self.use_eq && self.cfg.completion == Completion::Events {
                let left = self.cfg.cmd_timeout - waited;
                let nap = left
                    .min(self.cfg.health_interval)
                    .max(Duration::from_micros(100));
                if let Some(fd) = &self.irq {
                    match wait_eventfd(fd, nap) {
                        Ok(Some(n)) if n > 0 => self.stats.interrupts += 1,
                        Ok(_) => {}
                        Err(source) => return Err(CmdError::Transport { opcode, source }),
                    }
                }
                self.drain_eq(true);
            } else {
                if self.use_eq {
                    self.drain_eq(false);
                } else {
                    self.service_pages();
                }
                spins += 1;
                if spins < 1000 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }
    }

    fn eq_doorbell(&self, arm: bool) {
        if let Some(eq) = &self.eq {
            let off = eq.uar * regs::UAR_PAGE
                + if arm {
                    regs::UAR_EQ_ARM
                } else {
                    regs::UAR_EQ_NOARM
                };
            self.t.bar_write32(off, eq.ring.doorbell(eq.eqn));
        }
    }

    /// Consumes every valid EQE; returns how many.
    fn drain_eq(&mut self, arm: bool) -> usize {
        let mut n = 0u32;
        while let Some(eq) = self.eq.as_mut() {
            let idx = eq.ring.index();
            if !eq.ring.is_valid(eq.buf.read_u8(idx * EQE_LEN + OWNER)) {
                break;
            }
            dma_rmb();
            let mut raw = [0u8; EQE_LEN];
            eq.buf.read(idx * EQE_LEN, &mut raw);
            eq.ring.advance();
            n += 1;
            self.stats.eqes += 1;
            self.dispatch(Eqe::parse(&raw));
            if n.is_multiple_of(SPARE_EQES) {
                self.eq_doorbell(false);
            }
        }
        if n > 0 || arm {
            self.eq_doorbell(arm);
        }
        self.service_pages();
        n as usize
    }

    fn dispatch(&mut self, e: Eqe) {
        match e {
            // Completion is confirmed through the ownership bit.
            Eqe::Command { .. } => {}
            Eqe::PageRequest {
                function_id,
                num_pages,
                release_all,
            } => {
                self.stats.page_requests += 1;
                if release_all {
                    let n = self.pages.forget_given();
                    tracing::info!(device = self.info.device, "firmware released all {n} pages");
                } else if num_pages != 0 {
                    self.page_work.pending.push_back((function_id, num_pages));
                }
            }
            Eqe::Port { port, change } => {
                tracing::info!(device = self.info.device, port, ?change, "port event");
                self.events.push_back(AsyncEvent::Port { port, change });
            }
            Eqe::Completion { cqn } => self.events.push_back(AsyncEvent::Completion { cqn }),
            other => {
                tracing::warn!(device = self.info.device, ?other, "async event");
                self.events.push_back(AsyncEvent::Other(other));
            }
        }
    }

    /// Finishes the in-flight page command and starts the next one.
    fn service_pages(&mut self) {
        let Some(q) = self.cmdq.as_ref() else { return };
        let slot = q.page_slot();
        if self.page_work.in_flight.is_some() && q.is_done(slot) {
            let (kind, cmd) = self.page_work.in_flight.take().expect("checked above");
            let out = self.cmdq.as_mut().map(|q| q.collect(slot));
            let result = match out {
                Some(Ok(o)) => check_output(&cmd, &o),
                Some(Err(e)) => Err(e),
                None => return,
            };
            match (kind, result) {
                (PageCmd::Give(pages), Ok(_)) => {
                    self.stats.pages_given_runtime += pages.len() as u64;
                    self.pages.mark_given(&pages);
                }
                (PageCmd::Give(pages), Err(e)) => {
                    self.stats.page_cmd_errors += 1;
                    tracing::warn!(device = self.info.device, "page give failed: {e}");
                    self.pages.put_back(pages);
                }
                (PageCmd::Take, Ok(returned)) => {
                    for p in returned {
                        if self.pages.returned(p) {
                            self.stats.pages_reclaimed_runtime += 1;
                        } else {
                            self.stats.bogus_pages += 1;
                            tracing::warn!(device = self.info.device, page = %p, "firmware returned a page it never had");
                        }
                    }
                }
                (PageCmd::Take | PageCmd::CannotGive, Err(e)) => {
                    self.stats.page_cmd_errors += 1;
                    tracing::warn!(device = self.info.device, "page command failed: {e}");
                }
                (PageCmd::CannotGive, Ok(_)) => {}
            }
        }
        if self.page_work.in_flight.is_some() || self.fatal.is_some() {
            return;
        }
        let Some((function_id, n)) = self.page_work.pending.pop_front() else {
            return;
        };
        let batch = n.unsigned_abs().min(MANAGE_PAGES_BATCH as u32);
        let rest = n.unsigned_abs() - batch;
        if rest > 0 {
            let rest = i32::try_from(rest).unwrap_or(i32::MAX);
            self.page_work
                .pending
                .push_front((function_id, if n > 0 { rest } else { -rest }));
        }
        let (kind, cmd) = if n > 0 {
            match self.pages.take(&self.t, &mut self.space, batch as usize) {
                Ok(pages) => (
                    PageCmd::Give(pages.clone()),
                    ManagePages::Give { function_id, pages },
                ),
                Err(e) => {
                    tracing::error!(
                        device = self.info.device,
                        "no memory for firmware pages: {e}"
                    );
                    (PageCmd::CannotGive, ManagePages::CannotGive { function_id })
                }
            }
        } else {
            (
                PageCmd::Take,
                ManagePages::Take {
                    function_id,
                    count: batch,
                },
            )
        };
        let input = encode_input(&cmd);
        let Some(q) = self.cmdq.as_mut() else { return };
        match q.post(
            &self.t,
            &mut self.space,
            slot,
            Opcode::MANAGE_PAGES,
            cmd.op_mod(),
            &input,
            cmd.outlen(),
        ) {
            Ok(()) => {
                self.stats.commands += 1;
                self.page_work.in_flight = Some((kind, cmd));
            }
            Err(e) => {
                tracing::warn!(
                    device = self.info.device,
                    "posting a page command failed: {e}"
                );
                if let PageCmd::Give(p) = kind {
                    self.pages.put_back(p);
                }
            }
        }
    }

    /// Serves events for up to `timeout` (page requests are answered here);
    /// returns the events upper layers care about.
    pub fn poll_events(&mut self, timeout: Duration) -> Result<Vec<AsyncEvent>, HcaError> {
        if let Some(f) = &self.fatal {
            return Err(f.clone().into());
        }
        if let Some(fd) = &self.irq
            && let Some(n) = wait_eventfd(fd, timeout)?
            && n > 0
        {
            self.stats.interrupts += 1;
        }
        self.drain_eq(true);
        self.check_health()?;
        Ok(self.events.drain(..).collect())
    }

    /// Runs the health sensors now if a sample is due.
    pub fn check_health(&mut self) -> Result<(), HcaError> {
        if let Err(f) = self.health.poll(&self.t, Instant::now()) {
            self.fatal = Some(f.clone());
            return Err(f.into());
        }
        Ok(())
    }

    /// The device summary.
    pub fn info(&self) -> HcaInfo {
        let mut i = self.info.clone();
        i.pages_given = self.pages.given();
        i
    }

    /// Control-path counters.
    pub fn stats(&self) -> HcaStats {
        self.stats
    }

    /// Current general capabilities.
    pub fn caps(&self) -> &GeneralCaps {
        &self.caps
    }

    /// The transport.
    pub fn transport(&self) -> &T {
        &self.t
    }

    /// Allocates DMA memory in the HCA's IOVA space.
    pub fn alloc_dma(&mut self, len: usize) -> Result<DmaBuffer, TransportError> {
        DmaBuffer::alloc(&self.t, &mut self.space, len)
    }

    /// Releases DMA memory from [`Hca::alloc_dma`]; only once the device no
    /// longer refers to it.
    pub fn free_dma(&mut self, buf: DmaBuffer) -> Result<(), TransportError> {
        buf.release(&self.t, &mut self.space)
    }

    /// Maps memory the driver does not own (a VM's regions) for the
    /// device: one IOVA window, the pieces laid end to end at page
    /// boundaries. The window is the HCA's view of that memory; keys
    /// bounded to it ([`Hca::create_key`]) reach that and nothing else.
    pub fn map_foreign(&mut self, pieces: &[DmaMem]) -> Result<ForeignWindow, TransportError> {
        let page = host_page_size().max(4096) as u64;
        let mut len = 0u64;
        for p in pieces {
            let n = p.len() as u64;
            if n == 0 || !n.is_multiple_of(page) || !(p.host_ptr() as u64).is_multiple_of(page) {
                return Err(TransportError::BadMapping {
                    iova: Iova(len),
                    len: n,
                    why: "foreign memory must be whole, page-aligned pages",
                });
            }
            len = len
                .checked_add(n)
                .ok_or(TransportError::IovaExhausted(u64::MAX))?;
        }
        let base = self.space.alloc(len.max(page))?;
        let mut w = ForeignWindow {
            iova: base,
            len: len.max(page),
            pieces: Vec::with_capacity(pieces.len()),
        };
        let mut at = base;
        for p in pieces {
            if let Err(e) = self.t.map_dma(at, p.clone()) {
                let _ = self.unmap_foreign(w);
                return Err(e);
            }
            w.pieces.push((at, p.len() as u64));
            at = at.add(p.len() as u64);
        }
        Ok(w)
    }

    /// Removes a window of [`Hca::map_foreign`]; only once no work the
    /// device may still run points into it.
    pub fn unmap_foreign(&mut self, w: ForeignWindow) -> Result<(), TransportError> {
        let mut first = Ok(());
        for (iova, len) in &w.pieces {
            if let Err(e) = self.t.unmap_dma(*iova, *len)
                && first.is_ok()
            {
                first = Err(e);
            }
        }
        self.space.free(w.iova, w.len);
        first
    }

    /// Allocates a protection domain of its own (a VM's).
    pub fn alloc_pd(&mut self) -> Result<u32, HcaError> {
        Ok(self.exec(&AllocPd)?)
    }

    /// Frees a protection domain of [`Hca::alloc_pd`].
    pub fn dealloc_pd(&mut self, pd: u32) -> Result<(), HcaError> {
        Ok(self.exec(&DeallocPd(pd))?)
    }

    /// Creates a physical-address key in `pd` that covers only
    /// `[start, start + len)`: work requests naming it reach that range and
    /// fail with a local protection error anywhere else.
    pub fn create_key(&mut self, pd: u32, start: Iova, len: u64) -> Result<u32, HcaError> {
        Ok(self.exec(&CreatePaMkey {
            pd,
            key_low: 0x5A,
            range: Some((start.0, len)),
        })?)
    }

    /// Destroys a key of [`Hca::create_key`].
    pub fn destroy_key(&mut self, key: u32) -> Result<(), HcaError> {
        Ok(self.exec(&DestroyMkey(key >> 8))?)
    }

    /// The UAR of the driver's doorbells.
    pub fn uar(&self) -> u32 {
        self.info.uar
    }

    /// The protection domain.
    pub fn pd(&self) -> u32 {
        self.info.pd
    }

    /// The physical-address memory key.
    pub fn lkey(&self) -> u32 {
        self.info.lkey
    }

    /// The EQ that takes completion events.
    pub fn eqn(&self) -> u8 {
        self.eq.as_ref().map_or(0, |e| e.eqn)
    }

    /// The eventfd of the MSI-X vector of the event queue, for an event
    /// loop's wait set: readable when the EQ has new entries (completions of
    /// armed CQs, port events, page requests, command completions). Serve
    /// it with [`Hca::poll_events`].
    pub fn event_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.irq.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// The scatter-list terminator key (§7.6).
    pub fn terminator_lkey(&self) -> u32 {
        match self.special {
            Some(s) if self.caps.get(field::TERMINATE_SCATTER_LIST_MKEY) == 1 => {
                s.terminate_scatter_list_mkey
            }
            _ => crate::layout::wqe::INVALID_LKEY,
        }
    }

    /// Switches the completion mode.
    pub fn set_completion(&mut self, c: Completion) {
        self.cfg.completion = c;
    }

    /// Orderly teardown.
    pub fn shutdown(mut self) -> TeardownReport {
        self.teardown()
    }

    fn teardown(&mut self) -> TeardownReport {
        let mut r = TeardownReport::default();
        let mut need_reset =
            self.fatal.is_some() || self.cmdq.as_ref().is_some_and(CmdQueue::has_stuck);
        let note = |r: &mut TeardownReport, what: &str, e: &dyn fmt::Display| {
            r.errors.push(format!("{what}: {e}"));
        };
        if !need_reset && self.cmdq.is_some() {
            let failed = |e: &CmdError| {
                matches!(
                    e,
                    CmdError::Timeout { .. }
                        | CmdError::DeviceFatal { .. }
                        | CmdError::Transport { .. }
                )
            };
            if let Some(k) = self.mkey.take()
                && let Err(e) = self.exec(&DestroyMkey(k >> 8))
            {
                need_reset |= failed(&e);
                note(&mut r, "DESTROY_MKEY", &e);
            }
            if let Some(pd) = self.pd.take()
                && !need_reset
                && let Err(e) = self.exec(&DeallocPd(pd))
            {
                need_reset |= failed(&e);
                note(&mut r, "DEALLOC_PD", &e);
            }
            // Let an in-flight page command finish, then stop using the EQ.
            let t0 = Instant::now();
            while self.page_work.in_flight.is_some()
                && t0.elapsed() < self.cfg.cmd_timeout
                && !need_reset
            {
                self.drain_eq(false);
                std::thread::yield_now();
            }
            if self.page_work.in_flight.is_some() {
                need_reset = true;
                note(&mut r, "page command", &"did not complete");
            }
            self.page_work.pending.clear();
            self.use_eq = false;
            if let Some(eq) = self.eq.as_ref()
                && !need_reset
            {
                let eqn = eq.eqn;
                if let Err(e) = self.exec(&DestroyEq(eqn)) {
                    need_reset |= failed(&e);
                    note(&mut r, "DESTROY_EQ", &e);
                }
            }
            if let Some(uar) = self.uar.take()
                && !need_reset
                && let Err(e) = self.exec(&DeallocUar(uar))
            {
                need_reset |= failed(&e);
                note(&mut r, "DEALLOC_UAR", &e);
            }
            if self.initialized && !need_reset {
                match self.exec(&TeardownHca(TeardownProfile::Graceful)) {
                    Ok(_) => self.initialized = false,
                    Err(e) => {
                        need_reset |= failed(&e);
                        note(&mut r, "TEARDOWN_HCA", &e);
                    }
                }
            }
            if !need_reset {
                r.pages_reclaimed = self.reclaim_all_pages(&mut r);
                if self.pages.given() > 0 {
                    need_reset = true;
                }
            }
            if self.enabled && !need_reset {
                match self.exec(&DisableHca) {
                    Ok(()) => self.enabled = false,
                    Err(e) => {
                        need_reset = true;
                        note(&mut r, "DISABLE_HCA", &e);
                    }
                }
            }
        }
        if need_reset || self.enabled {
            r.reset = true;
            if let Err(e) = self.t.reset() {
                note(&mut r, "function reset", &e);
            } else {
                if let Some(q) = self.cmdq.as_mut() {
                    q.forget_all();
                }
                r.pages_dropped_by_reset = self.pages.forget_given();
                self.page_work = PageWork::default();
                self.enabled = false;
                self.initialized = false;
            }
        }
        if self.msix_on {
            if let Err(e) = self.t.disable_msix() {
                note(&mut r, "MSI-X disable", &e);
            }
            self.msix_on = false;
        }
        // DMA memory goes last, once the device can no longer touch it.
        let device_quiet = !self.enabled;
        if device_quiet {
            if let Some(eq) = self.eq.take()
                && let Err(e) = eq.buf.release(&self.t, &mut self.space)
            {
                note(&mut r, "EQ buffer", &e);
            }
            if let Err(e) = std::mem::take(&mut self.pages).release(&self.t, &mut self.space) {
                note(&mut r, "page pool", &e);
            }
            if let Some(q) = self.cmdq.take()
                && let Err(e) = q.release(&self.t, &mut self.space)
            {
                note(&mut r, "command queue", &e);
            }
        } else {
            note(
                &mut r,
                "DMA",
                &"kept mapped: the device could not be quiesced",
            );
        }
        r.dma_bytes_left = self.space.allocated();
        r
    }

    fn reclaim_all_pages(&mut self, r: &mut TeardownReport) -> usize {
        let mut total = 0;
        let mut last_progress = Instant::now();
        while self.pages.given() > 0 {
            let want = self.pages.given().min(MANAGE_PAGES_BATCH) as u32;
            let slot = match self.cmdq.as_ref() {
                Some(q) => q.page_slot(),
                None => break,
            };
            match self.exec_on(
                slot,
                &ManagePages::Take {
                    function_id: 0,
                    count: want,
                },
            ) {
                Ok(pages) => {
                    for p in &pages {
                        if self.pages.returned(*p) {
                            total += 1;
                        } else {
                            self.stats.bogus_pages += 1;
                        }
                    }
                    if pages.is_empty() {
                        if last_progress.elapsed() >= self.cfg.reclaim_timeout {
                            r.errors.push(format!(
                                "firmware kept {} pages after TEARDOWN_HCA",
                                self.pages.given()
                            ));
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    } else {
                        last_progress = Instant::now();
                    }
                }
                Err(e) => {
                    r.errors.push(format!("MANAGE_PAGES take: {e}"));
                    break;
                }
            }
        }
        total
    }
}

impl<T: Transport> Drop for Hca<T> {
    fn drop(&mut self) {
        if self.cmdq.is_some() {
            tracing::warn!(
                device = self.info.device,
                "HCA dropped without shutdown; tearing down"
            );
            let r = self.teardown();
            if !r.clean() {
                tracing::warn!(device = self.info.device, ?r, "teardown left problems");
            }
        }
    }
}
