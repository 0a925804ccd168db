//! [`SimHca`]: the software HCA behind the driver's `Transport` trait.
//!
//! Register reads are answered from a register file; a write to the
//! command doorbell or to an EQ doorbell is handed to the device thread,
//! which reads the command entry and mailboxes from the memory the driver
//! mapped (through the model IOMMU only), runs the firmware model, writes
//! the output and the ownership bit, then the command-completion EQE, then
//! signals the MSI-X eventfd — the order of §9.2.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mlx5_driver::transport::{DmaMem, Iova, IovaRange, Transport, TransportError};
use vmm_sys_util::eventfd::EventFd;

use crate::bytes::{dword, qword, set_dword, xor};
use crate::eq::data_with_dword;
use crate::fault::Fault;
use crate::fw::{Effects, Firmware, FwParams, FwStats};
use crate::iommu::{Iommu, usable_ranges};
use crate::port::NodeIdentity;

/// Configuration of a simulated HCA.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Injected faults.
    pub faults: Vec<Fault>,
    /// Node GUID (port GUID is this + 1).
    pub node_guid: u64,
    /// Pages firmware asks for at boot.
    pub boot_pages: u32,
    /// Pages firmware asks for at init.
    pub init_pages: u32,
    /// MSI-X vectors.
    pub msix_vectors: usize,
    /// Active MTU code of the port (4 = 2048, 5 = 4096).
    pub port_mtu: u8,
    /// Time firmware keeps `initializing` set after power-up and reset.
    pub start_delay: Duration,
    /// Check signatures even before `cmdif_checksum` is set.
    pub force_signatures: bool,
    /// log2 command slots.
    pub log_cmdq_size: u8,
    /// log2 command stride.
    pub log_cmdq_stride: u8,
    /// Firmware version (major, minor, subminor).
    pub fw_version: (u16, u16, u16),
    /// PCI device id (ConnectX-5: 0x1017).
    pub pci_device: u16,
    /// Highest ISSI firmware offers (1; 0 models old firmware).
    pub max_issi: u16,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            faults: Vec::new(),
            node_guid: 0x0002_c903_00a1_b2c0,
            boot_pages: 128,
            init_pages: 1024,
            msix_vectors: 64,
            port_mtu: 5,
            start_delay: Duration::from_millis(5),
            force_signatures: false,
            log_cmdq_size: 5,
            log_cmdq_stride: 6,
            fw_version: (16, 35, 4030),
            pci_device: 0x1017,
            max_issi: 1,
        }
    }
}

/// The device's own account of what it saw, for tests and leak checks.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SimReport {
    /// Live IOMMU mappings.
    pub mappings: usize,
    /// Bytes mapped.
    pub mapped_bytes: u64,
    /// Pages firmware holds.
    pub pages_held: usize,
    /// Objects firmware holds.
    pub objects_alive: usize,
    /// ENABLE_HCA in effect.
    pub enabled: bool,
    /// INIT_HCA in effect.
    pub initialized: bool,
    /// Firmware counters.
    pub fw: FwStats,
    /// Datapath counters.
    pub dp: crate::queues::DpStats,
    /// Port P_Key / Q_Key violation counters (PortInfo).
    pub pkey_violations: u16,
    /// Q_Key violations.
    pub qkey_violations: u16,
    /// Doorbells for slots whose ownership bit was 0 (ignored).
    pub ignored_doorbells: u64,
    /// Commands rejected at delivery (signature, token, block number ...).
    pub delivery_errors: u64,
    /// Commands firmware never completed (injected stall or dead firmware).
    pub stalled_commands: u64,
    /// Device DMA that hit no mapping.
    pub iommu_faults: u64,
    /// Writes to registers that do nothing.
    pub stray_writes: u64,
    /// MSI-X signals sent.
    pub interrupts: u64,
    /// Interrupts lost: vector not enabled.
    pub lost_interrupts: u64,
    /// Function resets.
    pub resets: u64,
    /// Pages the driver unmapped while firmware still held them.
    pub unmapped_while_held: u64,
    /// Logical states the port went through (first 32), starting DOWN.
    pub port_states: Vec<u8>,
}

/// Work for the device thread.
pub enum Msg {
    CmdDoorbell(u32),
    EqDoorbell { uar: u32, value: u32, arm: bool },
    CqDoorbell { uar: u32, value: u64 },
    SqDoorbell { uar: u32, value: u64 },
    Packet(Vec<u8>),
    PortConfig(PortConfig),
    Connect(crate::fabric::FabricLink),
    Reset(Sender<()>),
    Report(Sender<SimReport>),
    Shutdown,
}

#[derive(Debug)]
struct Regs {
    ready_at: Instant,
    cmdq_h: u32,
    cmdq_l: u32,
    nic_if: u32,
    health: [u8; 64],
    born: Instant,
    heartbeat_stopped: Option<u32>,
}

impl Regs {
    fn new(delay: Duration) -> Regs {
        let now = Instant::now();
        Regs {
            ready_at: now + delay,
            cmdq_h: 0,
            cmdq_l: 0,
            nic_if: 0,
            health: [0; 64],
            born: now,
            heartbeat_stopped: None,
        }
    }

    fn heartbeat(&self) -> u32 {
        self.heartbeat_stopped
            .unwrap_or_else(|| (self.born.elapsed().as_millis() / 10) as u32 & 0x00FF_FFFF)
    }
}

#[derive(Default)]
struct Counters {
    ignored_doorbells: AtomicU64,
    delivery_errors: AtomicU64,
    stalled: AtomicU64,
    iommu_faults: AtomicU64,
    stray_writes: AtomicU64,
    interrupts: AtomicU64,
    lost_interrupts: AtomicU64,
    resets: AtomicU64,
    unmapped_while_held: AtomicU64,
}

struct Shared {
    cfg: SimConfig,
    regs: Mutex<Regs>,
    iommu: Mutex<Iommu>,
    msix: Mutex<Vec<EventFd>>,
    command_reg: Mutex<u16>,
    held_pages: Mutex<std::collections::BTreeSet<u64>>,
    n: Counters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn fire(&self, vector: u16) {
        let msix = lock(&self.msix);
        match msix.get(usize::from(vector)) {
            Some(fd) if fd.write(1).is_ok() => {
                self.n.interrupts.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                self.n.lost_interrupts.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// What the subnet manager sets in a port (the effect of its
/// SubnSet(PortInfo) and SubnSet(P_KeyTable) on the HCA's agent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortConfig {
    /// Base LID.
    pub lid: u16,
    /// SM LID.
    pub sm_lid: u16,
    /// Port state.
    pub state: u8,
    /// Active MTU code.
    pub mtu: u8,
    /// P_Key table.
    pub pkeys: Vec<u16>,
    /// Ask the port's clients to re-register (SM restart).
    pub reregister: bool,
}

/// Where the fabric delivers packets and port configuration for one HCA:
/// the device thread of an HCA in this process, or a connection to one in
/// another process.
#[derive(Clone, Debug)]
pub enum DeviceInbox {
    /// Same process.
    Local(Sender<Msg>),
    /// Through the fabric service socket.
    Remote(crate::remote::SharedStream),
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Msg")
    }
}

impl DeviceInbox {
    pub(crate) fn packet(&self, p: Vec<u8>) {
        match self {
            DeviceInbox::Local(tx) => {
                let _ = tx.send(Msg::Packet(p));
            }
            DeviceInbox::Remote(s) => {
                crate::remote::send(s, crate::remote::kind::PACKET, &p);
            }
        }
    }

    pub(crate) fn port_config(&self, c: PortConfig) {
        match self {
            DeviceInbox::Local(tx) => {
                let _ = tx.send(Msg::PortConfig(c));
            }
            DeviceInbox::Remote(s) => {
                let body = crate::remote::encode_port_config(&c);
                crate::remote::send(s, crate::remote::kind::PORT_CONFIG, &body);
            }
        }
    }
}

/// A simulated ConnectX function.
pub struct SimHca {
    shared: Arc<Shared>,
    tx: Mutex<Sender<Msg>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for SimHca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHca")
            .field("cfg", &self.shared.cfg)
            .finish_non_exhaustive()
    }
}

/// First BAR0 offset of the UAR pages.
const UAR_PAGE: u32 = 4096;
/// Size of the simulated BAR0 (32 MiB, as a ConnectX-5).
const BAR0_LEN: u32 = 32 << 20;

impl SimHca {
    /// Powers up a simulated HCA with its device thread.
    pub fn new(cfg: SimConfig) -> SimHca {
        let delay = cfg.start_delay
            + cfg
                .faults
                .iter()
                .find_map(|f| match f {
                    Fault::SlowStart(d) => Some(*d),
                    _ => None,
                })
                .unwrap_or_default();
        let shared = Arc::new(Shared {
            regs: Mutex::new(Regs::new(delay)),
            iommu: Mutex::new(Iommu::default()),
            msix: Mutex::new(Vec::new()),
            command_reg: Mutex::new(0),
            held_pages: Mutex::new(Default::default()),
            n: Counters::default(),
            cfg,
        });
        let (tx, rx) = mpsc::channel();
        let dev = Device::new(shared.clone(), rx, delay);
        let thread = std::thread::Builder::new()
            .name("sim-hca".into())
            .spawn(move || dev.run())
            .ok();
        SimHca {
            shared,
            tx: Mutex::new(tx),
            thread,
        }
    }

    fn send(&self, m: Msg) {
        let _ = lock(&self.tx).send(m);
    }

    /// Plugs the HCA's port into `fabric`. Its subnet manager activates the
    /// port once INIT_HCA brings the link up.
    pub fn connect(&self, fabric: &crate::fabric::Fabric) {
        let inbox = DeviceInbox::Local(lock(&self.tx).clone());
        let link = fabric.attach(inbox, self.shared.cfg.node_guid.wrapping_add(1));
        self.send(Msg::Connect(crate::fabric::FabricLink::Local(link)));
    }

    /// Plugs the HCA's port into the fabric served by `ipoib-fabric` on the
    /// socket at `path`.
    pub fn connect_remote(&self, path: &std::path::Path) -> std::io::Result<()> {
        use crate::remote::{kind, read_frame, write_frame};
        let mut stream = std::os::unix::net::UnixStream::connect(path)?;
        let guid = self.shared.cfg.node_guid.wrapping_add(1);
        write_frame(&mut stream, kind::HELLO, &guid.to_be_bytes())?;
        let mut reader = std::io::BufReader::with_capacity(1 << 18, stream.try_clone()?);
        let tx = lock(&self.tx).clone();
        std::thread::Builder::new()
            .name("sim-hca-link".into())
            .spawn(move || {
                let mut buf = Vec::new();
                let mut last: Option<PortConfig> = None;
                while let Ok(true) = read_frame(&mut reader, &mut buf) {
                    let msg = match buf[0] {
                        kind::PACKET => Msg::Packet(buf[1..].to_vec()),
                        kind::PORT_CONFIG => match crate::remote::decode_port_config(&buf[1..]) {
                            Some(c) => {
                                last = Some(c.clone());
                                Msg::PortConfig(c)
                            }
                            None => break,
                        },
                        _ => break,
                    };
                    if tx.send(msg).is_err() {
                        return;
                    }
                }
                // The fabric went away: the link is down.
                if let Some(mut c) = last {
                    c.state = crate::port::state::DOWN;
                    c.reregister = false;
                    let _ = tx.send(Msg::PortConfig(c));
                }
            })?;
        let link = crate::fabric::FabricLink::Remote(std::sync::Arc::new(Mutex::new(stream)));
        self.send(Msg::Connect(link));
        Ok(())
    }

    /// What the device saw, as of now.
    pub fn report(&self) -> SimReport {
        let (tx, rx) = mpsc::channel();
        self.send(Msg::Report(tx));
        rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default()
    }
}

impl Drop for SimHca {
    fn drop(&mut self) {
        self.send(Msg::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Transport for SimHca {
    fn name(&self) -> &str {
        "sim"
    }

    fn config_read16(&self, offset: u32) -> Result<u16, TransportError> {
        Ok(match offset {
            0x00 => 0x15B3,
            0x02 => self.shared.cfg.pci_device,
            0x04 => *lock(&self.shared.command_reg),
            0x08 => 0x0000,
            0x0A => 0x0207, // class: network controller, InfiniBand
            _ => 0,
        })
    }

    fn config_write16(&self, offset: u32, value: u16) -> Result<(), TransportError> {
        if offset == 0x04 {
            *lock(&self.shared.command_reg) = value & 0x0007;
        }
        Ok(())
    }

    fn bar_read32(&self, off: u32) -> u32 {
        let cfg = &self.shared.cfg;
        let r = lock(&self.shared.regs);
        match off {
            0x0000 => (u32::from(cfg.fw_version.1) << 16) | u32::from(cfg.fw_version.0),
            0x0004 => (5 << 16) | u32::from(cfg.fw_version.2),
            0x0010 => r.cmdq_h,
            0x0014 => {
                (r.cmdq_l & 0xFFFF_F000)
                    | (r.nic_if << 8)
                    | (u32::from(cfg.log_cmdq_size) << 4)
                    | u32::from(cfg.log_cmdq_stride)
            }
            0x01FC if Instant::now() < r.ready_at => 1 << 31,
            0x0200..=0x023C => dword(&r.health, (off - 0x200) as usize),
            0x1010 => r.heartbeat(),
            _ => 0,
        }
    }

    fn bar_write32(&self, off: u32, value: u32) {
        match off {
            0x0010 => lock(&self.shared.regs).cmdq_h = value,
            0x0014 => {
                let mut r = lock(&self.shared.regs);
                r.cmdq_l = value & 0xFFFF_F000;
                r.nic_if = (value >> 8) & 7;
            }
            0x0018 => self.send(Msg::CmdDoorbell(value)),
            o if (UAR_PAGE..BAR0_LEN).contains(&o) => {
                let uar = o / UAR_PAGE;
                match o % UAR_PAGE {
                    0x040 => self.send(Msg::EqDoorbell {
                        uar,
                        value,
                        arm: true,
                    }),
                    0x048 => self.send(Msg::EqDoorbell {
                        uar,
                        value,
                        arm: false,
                    }),
                    _ => {
                        self.shared.n.stray_writes.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            _ => {
                self.shared.n.stray_writes.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn bar_write64(&self, off: u32, value: u64) {
        if (UAR_PAGE..BAR0_LEN).contains(&off) {
            let uar = off / UAR_PAGE;
            match off % UAR_PAGE {
                0x020 => return self.send(Msg::CqDoorbell { uar, value }),
                0x800..=0xFF8 => return self.send(Msg::SqDoorbell { uar, value }),
                _ => {}
            }
        }
        self.shared.n.stray_writes.fetch_add(1, Ordering::Relaxed);
    }

    fn iova_ranges(&self) -> Vec<IovaRange> {
        usable_ranges()
    }

    fn map_dma(&self, iova: Iova, mem: DmaMem) -> Result<(), TransportError> {
        let len = mem.len() as u64;
        lock(&self.shared.iommu)
            .map(iova, mem)
            .map_err(|why| TransportError::BadMapping { iova, len, why })
    }

    fn unmap_dma(&self, iova: Iova, len: u64) -> Result<(), TransportError> {
        let held = lock(&self.shared.held_pages)
            .range(iova.0..iova.0.saturating_add(len))
            .count();
        if held > 0 {
            self.shared
                .n
                .unmapped_while_held
                .fetch_add(held as u64, Ordering::Relaxed);
        }
        lock(&self.shared.iommu)
            .unmap(iova, len)
            .map_err(|why| TransportError::BadMapping { iova, len, why })
    }

    fn msix_vectors(&self) -> usize {
        self.shared.cfg.msix_vectors
    }

    fn enable_msix(&self, fds: &[&EventFd]) -> Result<(), TransportError> {
        if fds.is_empty() || fds.len() > self.shared.cfg.msix_vectors {
            return Err(TransportError::Msix {
                wanted: fds.len(),
                available: self.shared.cfg.msix_vectors,
            });
        }
        let mut v = Vec::with_capacity(fds.len());
        for fd in fds {
            v.push(fd.try_clone().map_err(|source| TransportError::Io {
                op: "duplicating an MSI-X eventfd",
                source,
            })?);
        }
        *lock(&self.shared.msix) = v;
        Ok(())
    }

    fn disable_msix(&self) -> Result<(), TransportError> {
        lock(&self.shared.msix).clear();
        Ok(())
    }

    fn reset(&self) -> Result<(), TransportError> {
        let (tx, rx) = mpsc::channel();
        self.send(Msg::Reset(tx));
        rx.recv_timeout(Duration::from_secs(5))
            .map_err(|_| TransportError::Io {
                op: "simulated function reset",
                source: std::io::Error::from(std::io::ErrorKind::TimedOut),
            })
    }
}

/// The device thread's state.
struct Device {
    shared: Arc<Shared>,
    rx: Receiver<Msg>,
    fw: Firmware,
    delay: Duration,
    /// Firmware stopped (fatal health): commands stall.
    dead: bool,
    link: Option<crate::fabric::FabricLink>,
}

fn fw_params(cfg: &SimConfig) -> FwParams {
    FwParams {
        boot_pages: cfg.boot_pages,
        init_pages: cfg.init_pages,
        msix_vectors: cfg.msix_vectors,
        node: NodeIdentity {
            node_guid: cfg.node_guid,
            sys_guid: cfg.node_guid,
            device_id: cfg.pci_device,
            vendor_id: 0x0002C9,
            num_ports: 1,
        },
        port_mtu: cfg.port_mtu,
        max_issi: cfg.max_issi,
        tx_sink: cfg.faults.contains(&Fault::TxSink),
        storm: cfg.faults.iter().find_map(|f| match f {
            Fault::PageStorm { rounds, pages } => Some((*rounds, *pages)),
            _ => None,
        }),
    }
}

/// Delivery statuses (§2.6).
mod delivery {
    pub const SIGNATURE: u8 = 0x01;
    pub const TOKEN: u8 = 0x02;
    pub const BLOCK_NUM: u8 = 0x03;
    pub const OUT_ALIGN: u8 = 0x04;
    pub const IN_ALIGN: u8 = 0x05;
    pub const FW_INTERNAL: u8 = 0x06;
    pub const IN_LEN: u8 = 0x07;
    pub const OUT_LEN: u8 = 0x08;
    pub const BAD_TYPE: u8 = 0x10;
}

/// Mailbox blocks must be 1 KiB aligned in this model (what Linux uses).
const BLOCK_ALIGN: u64 = 1024;
/// Longest chain the model follows (covers 1 MiB of mailbox data).
const MAX_BLOCKS: usize = 2048;

impl Device {
    fn new(shared: Arc<Shared>, rx: Receiver<Msg>, delay: Duration) -> Device {
        let fw = Firmware::new(fw_params(&shared.cfg));
        Device {
            shared,
            rx,
            fw,
            delay,
            dead: false,
            link: None,
        }
    }

    fn run(mut self) {
        loop {
            let next = [self.fw.next_cq_deadline(), self.fw.next_rc_deadline()]
                .into_iter()
                .flatten()
                .min();
            let wait = next.map_or(Duration::from_millis(50), |d| {
                d.saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(50))
            });
            let msg = self.rx.recv_timeout(wait);
            if next.is_some_and(|d| d <= Instant::now()) {
                self.datapath(|fw, io, fx| {
                    let now = Instant::now();
                    fw.cq_timers(io, now, fx);
                    fw.rc_timers(io, now, fx);
                });
            }
            match msg {
                Ok(Msg::CmdDoorbell(mask)) => self.doorbell(mask),
                Ok(Msg::EqDoorbell { uar, value, arm }) => self.eq_doorbell(uar, value, arm),
                Ok(Msg::CqDoorbell { uar, value }) => {
                    self.datapath(|fw, io, fx| fw.cq_doorbell(io, uar, value, fx))
                }
                Ok(Msg::SqDoorbell { uar, value }) => {
                    self.datapath(|fw, io, fx| fw.sq_doorbell(io, uar, value, fx))
                }
                Ok(Msg::Packet(p)) => self.datapath(|fw, io, fx| fw.receive(io, &p, fx)),
                Ok(Msg::PortConfig(c)) => self.port_config(c),
                Ok(Msg::Connect(link)) => {
                    if self.fw.initialized() {
                        link.link_up();
                    }
                    self.link = Some(link);
                }
                Ok(Msg::Reset(ack)) => {
                    self.reset();
                    let _ = ack.send(());
                }
                Ok(Msg::Report(tx)) => {
                    let _ = tx.send(self.report());
                }
                Ok(Msg::Shutdown) | Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }

    fn report(&self) -> SimReport {
        let n = &self.shared.n;
        let iommu = lock(&self.shared.iommu);
        SimReport {
            mappings: iommu.len(),
            mapped_bytes: iommu.bytes(),
            pages_held: self.fw.pages_held(),
            objects_alive: self.fw.objects_alive(),
            enabled: self.fw.enabled(),
            initialized: self.fw.initialized(),
            fw: self.fw.stats,
            dp: self.fw.dp,
            pkey_violations: self.fw.port().pkey_violations,
            qkey_violations: self.fw.port().qkey_violations,
            port_states: self.fw.port_history.clone(),
            ignored_doorbells: n.ignored_doorbells.load(Ordering::Relaxed),
            delivery_errors: n.delivery_errors.load(Ordering::Relaxed),
            stalled_commands: n.stalled.load(Ordering::Relaxed),
            iommu_faults: n.iommu_faults.load(Ordering::Relaxed),
            stray_writes: n.stray_writes.load(Ordering::Relaxed),
            interrupts: n.interrupts.load(Ordering::Relaxed),
            lost_interrupts: n.lost_interrupts.load(Ordering::Relaxed),
            resets: n.resets.load(Ordering::Relaxed),
            unmapped_while_held: n.unmapped_while_held.load(Ordering::Relaxed),
        }
    }

    /// Runs datapath work with the IOMMU, then sends what it produced.
    fn datapath(&mut self, f: impl FnOnce(&mut Firmware, &Iommu, &mut Effects)) {
        if self.dead {
            return;
        }
        let mut fx = Effects::default();
        {
            let shared = self.shared.clone();
            let iommu = lock(&shared.iommu);
            f(&mut self.fw, &iommu, &mut fx);
            fx.fire.append(&mut self.fw.pending_fx.fire);
        }
        self.flush_outbox();
        for v in fx.fire {
            self.shared.fire(v);
        }
    }

    fn flush_outbox(&mut self) {
        let out = std::mem::take(&mut self.fw.outbox);
        if let Some(link) = &self.link {
            for p in out {
                link.transmit(p);
            }
        }
    }

    /// The subnet manager configured the port (SubnSet(PortInfo)).
    fn port_config(&mut self, c: PortConfig) {
        use crate::port::{phys, state as ps};
        if !self.fw.initialized() {
            return;
        }
        let PortConfig {
            lid,
            sm_lid,
            state,
            mtu,
            pkeys,
            reregister,
        } = c;
        let old = self.fw.port.clone();
        self.fw.note_port_state(state);
        let port = &mut self.fw.port;
        port.lid = lid;
        port.sm_lid = sm_lid;
        port.state = state;
        port.mtu = mtu;
        port.phys = if state == ps::DOWN {
            phys::POLLING
        } else {
            phys::LINK_UP
        };
        let mut table = vec![0u16; port.pkeys.len()];
        for (slot, k) in table.iter_mut().zip(pkeys) {
            *slot = k;
        }
        let pkeys_changed = table != port.pkeys;
        port.pkeys = table;
        let mut events = Vec::new();
        if state == ps::ACTIVE && old.state != ps::ACTIVE {
            events.push(4u8);
        }
        if state == ps::DOWN && old.state != ps::DOWN {
            events.push(1);
        }
        if old.lid != 0 && old.lid != lid {
            events.push(6);
        }
        if pkeys_changed && old.state == ps::ACTIVE {
            events.push(7);
        }
        if reregister {
            events.push(9);
        }
        let mut fx = Effects::default();
        {
            let shared = self.shared.clone();
            let iommu = lock(&shared.iommu);
            for sub in events {
                let mut d = [0u8; 28];
                d[0x08] = 1 << 4; // port 1 in EQE byte 0x28 bits 7:4
                self.fw.post_event(&iommu, 0x09, sub, &d, &mut fx);
            }
        }
        for v in fx.fire {
            self.shared.fire(v);
        }
    }

    fn reset(&mut self) {
        if let Some(l) = &self.link {
            l.link_down();
        }
        self.shared.n.resets.fetch_add(1, Ordering::Relaxed);
        self.fw = Firmware::new(fw_params(&self.shared.cfg));
        self.dead = false;
        *lock(&self.shared.regs) = Regs::new(self.delay);
        *lock(&self.shared.command_reg) = 0;
        lock(&self.shared.msix).clear();
        lock(&self.shared.held_pages).clear();
    }

    fn eq_doorbell(&mut self, uar: u32, value: u32, arm: bool) {
        match self.fw.eq_doorbell(uar, value, arm) {
            Ok(Some(v)) => self.shared.fire(v),
            Ok(None) => {}
            Err(_eqn) => {
                self.shared.n.stray_writes.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn doorbell(&mut self, mask: u32) {
        let ready = Instant::now() >= lock(&self.shared.regs).ready_at;
        let slots = 1u32 << self.shared.cfg.log_cmdq_size;
        for slot in 0..32u32 {
            if mask & (1 << slot) == 0 {
                continue;
            }
            if !ready || slot >= slots {
                self.shared.n.stray_writes.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.process_slot(slot);
        }
    }

    fn process_slot(&mut self, slot: u32) {
        let base = {
            let r = lock(&self.shared.regs);
            (u64::from(r.cmdq_h) << 32) | u64::from(r.cmdq_l)
        };
        let stride = 1u64 << self.shared.cfg.log_cmdq_stride;
        let at = base + u64::from(slot) * stride;
        let mut e = [0u8; 64];
        let shared = self.shared.clone();
        let iommu_guard = lock(&shared.iommu);
        if base == 0 || iommu_guard.read(at, &mut e).is_err() {
            self.shared.n.iommu_faults.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if e[0x3F] & 1 == 0 {
            // Software owns the entry: the doorbell is ignored (§9.2).
            self.shared
                .n
                .ignored_doorbells
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        let opcode = (dword(&e, 0x10) >> 16) as u16;
        let op_mod = (dword(&e, 0x14) & 0xFFFF) as u16;
        let stall = self.dead
            || self
                .shared
                .cfg
                .faults
                .iter()
                .any(|f| matches!(f, Fault::CmdTimeout { opcode: o } if *o == opcode));
        if stall {
            self.shared.n.stalled.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut fx = Effects::default();
        let delivery = self.deliver(&iommu_guard, &mut e, opcode, op_mod, &mut fx);
        if delivery == 0 && iommu_guard.write(at + 0x20, &e[0x20..0x30]).is_err() {
            self.shared.n.iommu_faults.fetch_add(1, Ordering::Relaxed);
        }
        // Ownership returns last, with the delivery status.
        std::sync::atomic::fence(Ordering::Release);
        let status_own = delivery << 1;
        if iommu_guard.write(at + 0x3F, &[status_own]).is_err() {
            self.shared.n.iommu_faults.fetch_add(1, Ordering::Relaxed);
        }
        if delivery != 0 {
            self.shared
                .n
                .delivery_errors
                .fetch_add(1, Ordering::Relaxed);
        }
        // Then the command-completion EQE.
        if self.fw.has_cmd_eq() {
            self.fw.post_event(
                &iommu_guard,
                0x0A,
                0,
                &data_with_dword(0, 1 << slot),
                &mut fx,
            );
        }
        self.fw.after_command(&iommu_guard, &mut fx);
        // Interrupts the command's side effects raised (the completion
        // events of WQEs a QP's move to ERR flushed) go now too: one of
        // them may have disarmed the EQ before the completion EQE came.
        fx.fire.append(&mut self.fw.pending_fx.fire);
        if matches!(opcode, 0x108 | 0x105 | 0x103) {
            // Mirror for the unmap check made on the driver's thread.
            *lock(&self.shared.held_pages) = self.fw.page_set();
        }
        drop(iommu_guard);
        if delivery == 0
            && let Some(l) = &self.link
        {
            match opcode {
                0x102 if self.fw.initialized() => l.link_up(),
                0x103 if !self.fw.initialized() => l.link_down(),
                _ => {}
            }
        }
        self.flush_outbox();
        self.apply_health_fault(opcode, delivery);
        for v in fx.fire {
            self.shared.fire(v);
        }
    }

    fn apply_health_fault(&mut self, opcode: u16, delivery: u8) {
        if delivery != 0 || self.dead {
            return;
        }
        let synd = self.shared.cfg.faults.iter().find_map(|f| match f {
            Fault::Health { synd, after } if *after == opcode => Some(*synd),
            _ => None,
        });
        if let Some(synd) = synd {
            let mut r = lock(&self.shared.regs);
            let beat = r.heartbeat();
            r.heartbeat_stopped = Some(beat);
            r.health[0x20..0x24].copy_from_slice(&0x0012_3456u32.to_be_bytes());
            r.health[0x24..0x28].copy_from_slice(&0x00AB_CDEFu32.to_be_bytes());
            r.health[0x38] = 0x80 | 0x08 | 0x02; // rfr, valid, severity 2 (critical)
            r.health[0x3D] = synd;
            r.health[0x3E..0x40].copy_from_slice(&0x0001u16.to_be_bytes());
            self.dead = true;
        }
    }

    /// Reads input, validates delivery, executes and writes the output.
    /// Returns the delivery status.
    fn deliver(
        &mut self,
        iommu: &Iommu,
        e: &mut [u8; 64],
        opcode: u16,
        op_mod: u16,
        fx: &mut Effects,
    ) -> u8 {
        if e[0x00] != 0x07 {
            return delivery::BAD_TYPE;
        }
        let check_sig = self.shared.cfg.force_signatures || self.fw.checks_signatures();
        if check_sig && xor(&e[..]) != 0xFF {
            return delivery::SIGNATURE;
        }
        let token = e[0x3C];
        let inlen = dword(e, 0x04) as usize;
        let outlen = dword(e, 0x38) as usize;
        // Lengths come from the driver: refuse absurd ones before allocating.
        if inlen.saturating_sub(16).div_ceil(512) > MAX_BLOCKS {
            return delivery::IN_LEN;
        }
        if outlen.saturating_sub(16).div_ceil(512) > MAX_BLOCKS {
            return delivery::OUT_LEN;
        }
        let mut input = vec![0u8; inlen.max(16)];
        input[..16].copy_from_slice(&e[0x10..0x20]);
        let in_chain = match self.walk_chain(
            iommu,
            qword(e, 0x08),
            inlen,
            token,
            check_sig,
            delivery::IN_ALIGN,
        ) {
            Ok(c) => c,
            Err(d) => return d,
        };
        for (k, blk) in in_chain.iter().enumerate() {
            let start = 16 + k * 512;
            let n = (inlen - start).min(512);
            input[start..start + n].copy_from_slice(&blk.1[..n]);
        }
        input.truncate(inlen);
        let out_chain = match self.walk_chain(
            iommu,
            qword(e, 0x30),
            outlen,
            token,
            false,
            delivery::OUT_ALIGN,
        ) {
            Ok(c) => c,
            Err(d) => return d,
        };
        let injected = self.shared.cfg.faults.iter().find_map(|f| match f {
            Fault::CmdError {
                opcode: o,
                status,
                syndrome,
            } if *o == opcode => Some((*status, *syndrome)),
            _ => None,
        });
        let out = match injected {
            Some((status, syndrome)) => {
                let mut o = vec![0u8; outlen.max(16)];
                o[0] = status;
                set_dword(&mut o, 4, syndrome);
                o
            }
            None => match self.fw.execute(iommu, opcode, op_mod, &input, outlen, fx) {
                Ok(o) => o,
                Err(fail) => {
                    let mut o = vec![0u8; outlen.max(16)];
                    o[0] = fail.status;
                    set_dword(&mut o, 4, fail.syndrome);
                    o
                }
            },
        };
        // Output: 16 bytes inline, the rest into the output blocks' data.
        let mut out = out;
        if out.len() < 16 {
            out.resize(16, 0);
        }
        e[0x20..0x30].copy_from_slice(&out[..16]);
        let mut ok = true;
        for (k, blk) in out_chain.iter().enumerate() {
            let start = 16 + k * 512;
            if start >= out.len() {
                break;
            }
            let n = (out.len() - start).min(512);
            ok &= iommu.write(blk.0, &out[start..start + n]).is_ok();
        }
        if !ok {
            self.shared.n.iommu_faults.fetch_add(1, Ordering::Relaxed);
            return delivery::FW_INTERNAL;
        }
        0
    }

    /// Follows a mailbox chain long enough for `len` bytes, validating
    /// alignment, block numbers, tokens and (optionally) signatures.
    /// Returns (block IOVA, data) per block.
    fn walk_chain(
        &self,
        iommu: &Iommu,
        first: u64,
        len: usize,
        token: u8,
        check_sig: bool,
        align_status: u8,
    ) -> Result<Vec<(u64, Vec<u8>)>, u8> {
        let blocks = len.saturating_sub(16).div_ceil(512);
        if blocks > MAX_BLOCKS {
            return Err(if align_status == delivery::IN_ALIGN {
                0x07
            } else {
                0x08
            });
        }
        let mut out = Vec::with_capacity(blocks);
        let mut at = first;
        for k in 0..blocks {
            if at == 0 || !at.is_multiple_of(BLOCK_ALIGN) {
                return Err(align_status);
            }
            let mut b = vec![0u8; 576];
            if iommu.read(at, &mut b).is_err() {
                self.shared.n.iommu_faults.fetch_add(1, Ordering::Relaxed);
                return Err(delivery::FW_INTERNAL);
            }
            if dword(&b, 0x238) as usize != k {
                return Err(delivery::BLOCK_NUM);
            }
            if b[0x23D] != token {
                return Err(delivery::TOKEN);
            }
            if check_sig && (xor(&b[0x200..0x23F]) != 0xFF || xor(&b) != 0xFF) {
                return Err(delivery::SIGNATURE);
            }
            let next = qword(&b, 0x230);
            b.truncate(512);
            out.push((at, b));
            at = next;
        }
        Ok(out)
    }
}
