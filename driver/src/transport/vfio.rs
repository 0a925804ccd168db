//! The real thing: a PCI function bound to vfio-pci.
//!
//! VFIO hands a userspace driver a device through three files: the
//! *container* `/dev/vfio/vfio` (one IOMMU address space), the *group*
//! `/dev/vfio/N` (the smallest set of functions the IOMMU can isolate; every
//! function in it must be bound to vfio-pci, or to no driver, before it is
//! "viable") and the *device* fd obtained from the group, which gives config
//! space, BAR regions to mmap, interrupts and reset. DMA mappings are made on
//! the container at IOVAs the driver chooses; each mapping pins its pages.
//!
//! [`preflight`] turns the usual set-up mistakes into actionable errors before
//! any VFIO call does.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use vfio_bindings::bindings::vfio::{
    VFIO_IOMMU_INFO_CAPS, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, VFIO_PCI_BAR0_REGION_INDEX,
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_REGION_INFO_FLAG_MMAP,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps, VfioRegionInfoCap};
use vmm_sys_util::eventfd::EventFd;

use super::{DmaMem, Iova, IovaRange, Mmio, Transport, TransportError, pci};

/// `_IO(VFIO_TYPE, VFIO_BASE + 12)`: VFIO_IOMMU_GET_INFO (linux/vfio.h).
const VFIO_IOMMU_GET_INFO: libc::c_ulong = (0x3B << 8) | (100 + 12);
/// `_IO(VFIO_TYPE, VFIO_BASE + 11)`: VFIO_DEVICE_RESET.
const VFIO_DEVICE_RESET: libc::c_ulong = (0x3B << 8) | (100 + 11);

/// Bytes the driver expects to pin at bring-up: command queue and mailboxes,
/// EQs and the firmware page pool (a ConnectX asks for tens of MiB).
pub const MEMLOCK_NEEDED: u64 = 64 << 20;

/// Where sysfs and devfs live; tests point these at a fake tree.
#[derive(Clone, Debug)]
pub struct SysPaths {
    /// Usually `/sys`.
    pub sys: PathBuf,
    /// Usually `/dev`.
    pub dev: PathBuf,
}

impl Default for SysPaths {
    fn default() -> Self {
        SysPaths {
            sys: PathBuf::from("/sys"),
            dev: PathBuf::from("/dev"),
        }
    }
}

fn link_name(p: &Path) -> Option<String> {
    fs::read_link(p)
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// Checks, without opening anything, that `bdf` can be driven through VFIO.
/// Returns the IOMMU group number.
pub fn preflight(paths: &SysPaths, bdf: &str) -> Result<u32, TransportError> {
    let dev = paths.sys.join("bus/pci/devices").join(bdf);
    if !dev.exists() {
        return Err(TransportError::NoDevice(bdf.to_string()));
    }
    match link_name(&dev.join("driver")) {
        Some(d) if d == "vfio-pci" => {}
        bound => {
            return Err(TransportError::NotVfio {
                bdf: bdf.to_string(),
                bound,
            });
        }
    }
    let group: u32 = link_name(&dev.join("iommu_group"))
        .and_then(|g| g.parse().ok())
        .ok_or_else(|| TransportError::NoIommu(bdf.to_string()))?;
    let members = paths
        .sys
        .join("kernel/iommu_groups")
        .join(group.to_string())
        .join("devices");
    let mut others = Vec::new();
    if let Ok(entries) = fs::read_dir(&members) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == bdf {
                continue;
            }
            let drv = link_name(&paths.sys.join("bus/pci/devices").join(&name).join("driver"));
            // Bridges stay with pcieport; that is allowed by vfio (no DMA).
            match drv.as_deref() {
                None | Some("vfio-pci") | Some("pci-stub") | Some("pcieport") => {}
                Some(d) => others.push(format!("{name} ({d})")),
            }
        }
    }
    if !others.is_empty() {
        others.sort();
        return Err(TransportError::GroupNotViable { group, others });
    }
    let node = paths.dev.join("vfio").join(group.to_string());
    if let Err(e) = fs::OpenOptions::new().read(true).write(true).open(&node)
        && let Some(err) = group_open_error(&e, &node, bdf, group)
    {
        return Err(err);
    }
    check_memlock(MEMLOCK_NEEDED)?;
    Ok(group)
}

/// What a failed open of the group node means for the user; `None` for
/// errors the VFIO open itself reports later with more context.
fn group_open_error(e: &io::Error, node: &Path, bdf: &str, group: u32) -> Option<TransportError> {
    match e.kind() {
        io::ErrorKind::PermissionDenied => {
            Some(TransportError::Permission(node.display().to_string()))
        }
        io::ErrorKind::NotFound => Some(TransportError::NoIommu(bdf.to_string())),
        _ if e.raw_os_error() == Some(libc::EBUSY) => Some(TransportError::GroupBusy { group }),
        _ => None,
    }
}

/// Fails when RLIMIT_MEMLOCK is below `needed` and the process lacks
/// CAP_IPC_LOCK (which lifts the limit for VFIO pinning).
pub fn check_memlock(needed: u64) -> Result<(), TransportError> {
    if has_cap_ipc_lock() {
        return Ok(());
    }
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the valid struct we pass.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut rl) };
    if rc != 0 {
        return Err(TransportError::Io {
            op: "getrlimit(RLIMIT_MEMLOCK)",
            source: io::Error::last_os_error(),
        });
    }
    if rl.rlim_cur != libc::RLIM_INFINITY && rl.rlim_cur < needed {
        return Err(TransportError::MemlockTooLow {
            limit: rl.rlim_cur,
            needed,
        });
    }
    Ok(())
}

fn has_cap_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// A PCI function owned through VFIO.
pub struct VfioTransport {
    name: String,
    container: Arc<VfioContainer>,
    device: VfioDevice,
    bar0: Mmio,
    config_offset: u64,
    iova_ranges: Vec<IovaRange>,
    /// Live DMA mappings; holding the memory keeps it valid while mapped.
    mappings: Mutex<BTreeMap<u64, DmaMem>>,
}

impl VfioTransport {
    /// Opens `bdf` (e.g. `0000:81:00.0`): container, group, device; maps
    /// BAR0 and learns the usable IOVA ranges.
    pub fn open(bdf: &str) -> Result<VfioTransport, TransportError> {
        let paths = SysPaths::default();
        preflight(&paths, bdf)?;
        let container =
            Arc::new(
                VfioContainer::new(None).map_err(|source| TransportError::Vfio {
                    op: "opening the container",
                    source,
                })?,
            );
        let ops: Arc<dyn VfioOps> = container.clone();
        let sysfs = paths.sys.join("bus/pci/devices").join(bdf);
        let device = VfioDevice::new(&sysfs, ops, false).map_err(|source| match source {
            vfio_ioctls::VfioError::GroupViable => TransportError::GroupNotViable {
                group: 0,
                others: vec!["another function of the group".into()],
            },
            source => TransportError::Vfio {
                op: "opening the device",
                source,
            },
        })?;
        let bar0 = map_bar0(&device)?;
        let iova_ranges = query_iova_ranges(container.as_raw_fd())?;
        let config_offset = device.get_region_offset(VFIO_PCI_CONFIG_REGION_INDEX);
        Ok(VfioTransport {
            name: bdf.to_string(),
            container,
            device,
            bar0,
            config_offset,
            iova_ranges,
            mappings: Mutex::new(BTreeMap::new()),
        })
    }

    fn mappings(&self) -> MutexGuard<'_, BTreeMap<u64, DmaMem>> {
        self.mappings.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl std::fmt::Debug for VfioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioTransport")
            .field("name", &self.name)
            .field("iova_ranges", &self.iova_ranges)
            .field("mappings", &self.mappings().len())
            .finish_non_exhaustive()
    }
}

fn map_bar0(device: &VfioDevice) -> Result<Mmio, TransportError> {
    let idx = VFIO_PCI_BAR0_REGION_INDEX;
    if device.get_region_flags(idx) & VFIO_REGION_INFO_FLAG_MMAP == 0 {
        return Err(TransportError::Io {
            op: "mapping BAR0 (region not mmap-able)",
            source: io::Error::from(io::ErrorKind::Unsupported),
        });
    }
    let size = device.get_region_size(idx);
    let caps = device.get_region_caps(idx);
    let msix_mappable = caps
        .iter()
        .any(|c| matches!(c, VfioRegionInfoCap::MsixMappable));
    let sparse = caps.iter().find_map(|c| match c {
        VfioRegionInfoCap::SparseMmap(s) => {
            Some(s.areas.iter().map(|a| (a.offset, a.size)).collect())
        }
        _ => None,
    });
    let areas: Vec<(u64, u64)> = match sparse {
        Some(a) if !msix_mappable => a,
        _ => vec![(0, size)],
    };
    Mmio::map(device.as_raw_fd(), device.get_region_offset(idx), &areas)
}

/// VFIO_IOMMU_GET_INFO with the IOVA-range capability (not wrapped by
/// vfio-ioctls). Falls back to the whole 48-bit space minus the x86 MSI
/// window when the kernel reports no ranges.
fn query_iova_ranges(container_fd: i32) -> Result<Vec<IovaRange>, TransportError> {
    // struct vfio_iommu_type1_info { u32 argsz; u32 flags; u64 iova_pgsizes; u32 cap_offset; u32 pad; }
    const INFO_LEN: usize = 24;
    let mut buf = vec![0u64; INFO_LEN / 8];
    let set_argsz = |buf: &mut [u64], len: usize| {
        let flags = buf[0] >> 32;
        buf[0] = (flags << 32) | len as u64;
    };
    set_argsz(&mut buf, INFO_LEN);
    let call = |buf: &mut [u64]| -> Result<(), TransportError> {
        // SAFETY: `buf` is at least argsz bytes long and 8-byte aligned, as
        // VFIO_IOMMU_GET_INFO requires; the kernel writes at most argsz bytes.
        let rc = unsafe { libc::ioctl(container_fd, VFIO_IOMMU_GET_INFO, buf.as_mut_ptr()) };
        if rc < 0 {
            return Err(TransportError::Io {
                op: "VFIO_IOMMU_GET_INFO",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    };
    call(&mut buf)?;
    let bytes_of = |buf: &[u64]| -> Vec<u8> { buf.iter().flat_map(|w| w.to_ne_bytes()).collect() };
    let mut raw = bytes_of(&buf);
    let u32_at = |b: &[u8], o: usize| {
        b.get(o..o + 4)
            .map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
    };
    let argsz = u32_at(&raw, 0).unwrap_or(0) as usize;
    let flags = u32_at(&raw, 4).unwrap_or(0);
    let default = vec![
        IovaRange {
            start: 0,
            end: 0xFEE0_0000,
        },
        IovaRange {
            start: 0xFEF0_0000,
            end: 1 << 48,
        },
    ];
    if flags & VFIO_IOMMU_INFO_CAPS == 0 || argsz <= INFO_LEN {
        return Ok(default);
    }
    let mut big = vec![0u64; argsz.div_ceil(8)];
    set_argsz(&mut big, argsz);
    call(&mut big)?;
    raw = bytes_of(&big);
    let u64_at = |b: &[u8], o: usize| {
        b.get(o..o + 8)
            .map(|s| u64::from_ne_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]))
    };
    let mut off = u32_at(&raw, 16).unwrap_or(0) as usize;
    let mut ranges = Vec::new();
    // Each capability: struct vfio_info_cap_header { u16 id; u16 version; u32 next; }.
    let mut hops = 0;
    while off != 0 && off + 8 <= raw.len() && hops < 64 {
        hops += 1;
        let id = u32_at(&raw, off).unwrap_or(0) & 0xffff;
        let next = u32_at(&raw, off + 4).unwrap_or(0) as usize;
        if id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE {
            let n = u32_at(&raw, off + 8).unwrap_or(0) as usize;
            for i in 0..n.min(256) {
                let base = off + 16 + i * 16;
                if let (Some(s), Some(e)) = (u64_at(&raw, base), u64_at(&raw, base + 8)) {
                    // The kernel's end is inclusive.
                    ranges.push(IovaRange {
                        start: s,
                        end: e.saturating_add(1),
                    });
                }
            }
        }
        off = next;
    }
    Ok(if ranges.is_empty() { default } else { ranges })
}

impl Transport for VfioTransport {
    fn name(&self) -> &str {
        &self.name
    }

    fn config_read16(&self, offset: u32) -> Result<u16, TransportError> {
        let mut b = [0u8; 2];
        let off = libc::off_t::try_from(self.config_offset + u64::from(offset)).unwrap_or(0);
        // SAFETY: pread writes at most 2 bytes into `b`.
        let rc = unsafe { libc::pread(self.device.as_raw_fd(), b.as_mut_ptr().cast(), 2, off) };
        if rc != 2 {
            return Err(TransportError::Io {
                op: "config space read",
                source: io::Error::last_os_error(),
            });
        }
        Ok(u16::from_le_bytes(b))
    }

    fn config_write16(&self, offset: u32, value: u16) -> Result<(), TransportError> {
        let b = value.to_le_bytes();
        let off = libc::off_t::try_from(self.config_offset + u64::from(offset)).unwrap_or(0);
        // SAFETY: pwrite reads 2 bytes from `b`.
        let rc = unsafe { libc::pwrite(self.device.as_raw_fd(), b.as_ptr().cast(), 2, off) };
        if rc != 2 {
            return Err(TransportError::Io {
                op: "config space write",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn bar_read32(&self, offset: u32) -> u32 {
        self.bar0.read32(offset)
    }

    fn bar_write32(&self, offset: u32, value: u32) {
        self.bar0.write32(offset, value)
    }

    fn bar_write64(&self, offset: u32, value: u64) {
        self.bar0.write64(offset, value)
    }

    fn iova_ranges(&self) -> Vec<IovaRange> {
        self.iova_ranges.clone()
    }

    fn map_dma(&self, iova: Iova, mem: DmaMem) -> Result<(), TransportError> {
        let mut maps = self.mappings();
        if maps.contains_key(&iova.0) {
            return Err(TransportError::BadMapping {
                iova,
                len: mem.len() as u64,
                why: "already mapped",
            });
        }
        // SAFETY: `mem` is a live host mapping of `mem.len()` bytes and we
        // keep a clone of it in `mappings` until the IOVA range is unmapped,
        // so the device never reaches freed memory.
        unsafe {
            self.container
                .vfio_dma_map(iova.0, mem.len(), mem.host_ptr())
        }
        .map_err(|source| TransportError::Vfio {
            op: "DMA map",
            source,
        })?;
        maps.insert(iova.0, mem);
        Ok(())
    }

    fn unmap_dma(&self, iova: Iova, len: u64) -> Result<(), TransportError> {
        let mut maps = self.mappings();
        let size = usize::try_from(len).unwrap_or(usize::MAX);
        self.container
            .vfio_dma_unmap(iova.0, size)
            .map_err(|source| TransportError::Vfio {
                op: "DMA unmap",
                source,
            })?;
        maps.remove(&iova.0);
        Ok(())
    }

    fn msix_vectors(&self) -> usize {
        self.device
            .get_irq_info(VFIO_PCI_MSIX_IRQ_INDEX)
            .map_or(0, |i| i.count as usize)
    }

    fn enable_msix(&self, fds: &[&EventFd]) -> Result<(), TransportError> {
        let available = self.msix_vectors();
        if fds.len() > available || fds.is_empty() {
            return Err(TransportError::Msix {
                wanted: fds.len(),
                available,
            });
        }
        self.device
            .enable_msix(fds.to_vec())
            .map_err(|source| TransportError::Vfio {
                op: "MSI-X enable",
                source,
            })
    }

    fn disable_msix(&self) -> Result<(), TransportError> {
        self.device
            .disable_msix()
            .map_err(|source| TransportError::Vfio {
                op: "MSI-X disable",
                source,
            })
    }

    fn reset(&self) -> Result<(), TransportError> {
        // SAFETY: VFIO_DEVICE_RESET takes no argument.
        let rc = unsafe { libc::ioctl(self.device.as_raw_fd(), VFIO_DEVICE_RESET) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::ENOTTY) {
                TransportError::NoReset
            } else {
                TransportError::Io {
                    op: "VFIO_DEVICE_RESET",
                    source: e,
                }
            });
        }
        // Reset clears the command register; memory decoding is needed for BAR access.
        let cmd = self.config_read16(pci::COMMAND)?;
        self.config_write16(pci::COMMAND, cmd | pci::COMMAND_MEMORY)
    }
}

impl Drop for VfioTransport {
    fn drop(&mut self) {
        let maps = std::mem::take(&mut *self.mappings());
        for (iova, mem) in maps {
            tracing::warn!(iova = %Iova(iova), len = mem.len(), "unmapping a DMA mapping left at close");
            let _ = self.container.vfio_dma_unmap(iova, mem.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn group_open_errors_name_the_cause() {
        let node = Path::new("/dev/vfio/7");
        let busy = io::Error::from_raw_os_error(libc::EBUSY);
        assert!(matches!(
            group_open_error(&busy, node, "0000:81:00.0", 7),
            Some(TransportError::GroupBusy { group: 7 })
        ));
        let denied = io::Error::from_raw_os_error(libc::EACCES);
        assert!(matches!(
            group_open_error(&denied, node, "0000:81:00.0", 7),
            Some(TransportError::Permission(_))
        ));
        let other = io::Error::from_raw_os_error(libc::EIO);
        assert!(group_open_error(&other, node, "0000:81:00.0", 7).is_none());
        let msg = TransportError::GroupBusy { group: 7 }.to_string();
        assert!(msg.contains("another ipoib-vfio"), "{msg}");
    }

    struct Tree {
        root: PathBuf,
    }

    impl Tree {
        fn new(tag: &str) -> Tree {
            let root =
                std::env::temp_dir().join(format!("ipoib-vfio-sysfs-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(root.join("sys/bus/pci/devices")).unwrap();
            fs::create_dir_all(root.join("sys/bus/pci/drivers")).unwrap();
            fs::create_dir_all(root.join("dev/vfio")).unwrap();
            Tree { root }
        }
        fn paths(&self) -> SysPaths {
            SysPaths {
                sys: self.root.join("sys"),
                dev: self.root.join("dev"),
            }
        }
        fn device(&self, bdf: &str, driver: Option<&str>, group: Option<u32>) {
            let d = self.root.join("sys/bus/pci/devices").join(bdf);
            fs::create_dir_all(&d).unwrap();
            if let Some(drv) = driver {
                let p = self.root.join("sys/bus/pci/drivers").join(drv);
                fs::create_dir_all(&p).unwrap();
                symlink(&p, d.join("driver")).unwrap();
            }
            if let Some(g) = group {
                let gd = self
                    .root
                    .join("sys/kernel/iommu_groups")
                    .join(g.to_string());
                fs::create_dir_all(gd.join("devices")).unwrap();
                let _ = symlink(&gd, d.join("iommu_group"));
                let _ = symlink(&d, gd.join("devices").join(bdf));
                let _ = fs::write(self.root.join("dev/vfio").join(g.to_string()), b"");
            }
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }

    #[test]
    fn missing_device() {
        let t = Tree::new("missing");
        assert!(matches!(
            preflight(&t.paths(), "0000:01:00.0"),
            Err(TransportError::NoDevice(_))
        ));
    }

    #[test]
    fn bound_to_mlx5_core() {
        let t = Tree::new("mlx5");
        t.device("0000:01:00.0", Some("mlx5_core"), Some(7));
        let e = preflight(&t.paths(), "0000:01:00.0").unwrap_err();
        assert!(matches!(&e, TransportError::NotVfio { bound: Some(d), .. } if d == "mlx5_core"));
        assert!(e.to_string().contains("driver_override"), "{e}");
    }

    #[test]
    fn no_iommu_group() {
        let t = Tree::new("noiommu");
        t.device("0000:01:00.0", Some("vfio-pci"), None);
        assert!(matches!(
            preflight(&t.paths(), "0000:01:00.0"),
            Err(TransportError::NoIommu(_))
        ));
    }

    #[test]
    fn group_with_a_bound_sibling_is_not_viable() {
        let t = Tree::new("viable");
        t.device("0000:01:00.0", Some("vfio-pci"), Some(9));
        t.device("0000:01:00.1", Some("mlx5_core"), Some(9));
        match preflight(&t.paths(), "0000:01:00.0") {
            Err(TransportError::GroupNotViable { group: 9, others }) => {
                assert_eq!(others, vec!["0000:01:00.1 (mlx5_core)".to_string()]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn viable_group_passes() {
        let t = Tree::new("ok");
        t.device("0000:01:00.0", Some("vfio-pci"), Some(3));
        t.device("0000:01:00.1", Some("vfio-pci"), Some(3));
        // The memlock check depends on the environment; accept only that failure.
        match preflight(&t.paths(), "0000:01:00.0") {
            Ok(g) => assert_eq!(g, 3),
            Err(TransportError::MemlockTooLow { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
}
