//! Handing a PCI function to vfio-pci and back, through sysfs.
//!
//! Binding is the kernel's documented sequence: write `vfio-pci` to the
//! function's `driver_override`, unbind it from its current driver, and ask
//! the PCI core to probe it again. A function is usable only when every other
//! function of its IOMMU group is bound to vfio-pci too (or to no driver), the
//! group node `/dev/vfio/N` is accessible and the locked-memory limit allows
//! pinning DMA memory; [`status`] reports each of these.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use mlx5_driver::transport::TransportError;
use mlx5_driver::transport::vfio::{SysPaths, preflight};

/// Errors of the bind commands.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Not a PCI address.
    #[error("`{0}` is not a PCI address like 0000:81:00.0")]
    BadAddress(String),
    /// The function does not exist.
    #[error("no PCI device {0}")]
    NoDevice(String),
    /// A sysfs write failed.
    #[error("writing {path} failed")]
    Write {
        /// File written.
        path: PathBuf,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// vfio-pci is not available.
    #[error("the vfio-pci driver is not loaded and `modprobe vfio-pci` failed")]
    NoVfioPci,
}

/// What a command found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// PCI address.
    pub bdf: String,
    /// Driver bound now.
    pub driver: Option<String>,
    /// IOMMU group, if any.
    pub iommu_group: Option<u32>,
    /// Whether ipoib-vfio can open the function now.
    pub ready: bool,
    /// What to do if not.
    pub problem: Option<String>,
    /// What the command did.
    pub actions: Vec<String>,
}

impl Report {
    /// Text for people.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for a in &self.actions {
            s.push_str(&format!("{a}\n"));
        }
        s.push_str(&format!(
            "{}: driver {}, IOMMU group {}\n",
            self.bdf,
            self.driver.as_deref().unwrap_or("none"),
            self.iommu_group
                .map_or("none".to_string(), |g| g.to_string())
        ));
        match &self.problem {
            None => s.push_str("ready for ipoib-vfio\n"),
            Some(p) => s.push_str(&format!("not ready: {p}\n")),
        }
        s
    }
}

fn normalise(bdf: &str) -> Result<String, BindError> {
    let s = bdf.trim().to_ascii_lowercase();
    let s = if s.matches(':').count() == 1 {
        format!("0000:{s}")
    } else {
        s
    };
    let ok = s.len() == 12
        && s.as_bytes()[4] == b':'
        && s.as_bytes()[7] == b':'
        && s.as_bytes()[10] == b'.'
        && s.chars()
            .enumerate()
            .all(|(i, c)| [4, 7, 10].contains(&i) || c.is_ascii_hexdigit());
    if ok {
        Ok(s)
    } else {
        Err(BindError::BadAddress(bdf.to_string()))
    }
}

fn dev_dir(p: &SysPaths, bdf: &str) -> PathBuf {
    p.sys.join("bus/pci/devices").join(bdf)
}

fn link_name(p: &Path) -> Option<String> {
    fs::read_link(p)
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
}

fn write(path: PathBuf, value: &str) -> Result<(), BindError> {
    fs::write(&path, value).map_err(|source| BindError::Write { path, source })
}

/// The current state of `bdf`.
pub fn status(p: &SysPaths, bdf: &str) -> Result<Report, BindError> {
    let bdf = normalise(bdf)?;
    let dir = dev_dir(p, &bdf);
    if !dir.exists() {
        return Err(BindError::NoDevice(bdf));
    }
    let driver = link_name(&dir.join("driver"));
    let iommu_group = link_name(&dir.join("iommu_group")).and_then(|g| g.parse().ok());
    let (ready, problem) = match preflight(p, &bdf) {
        Ok(_) => (true, None),
        Err(e) => (false, Some(describe(&e))),
    };
    Ok(Report {
        bdf,
        driver,
        iommu_group,
        ready,
        problem,
        actions: Vec::new(),
    })
}

fn describe(e: &TransportError) -> String {
    match e {
        TransportError::NotVfio { bdf, .. } => {
            format!("{e}; `ipoib-tool bind-vfio {bdf}` does that")
        }
        other => other.to_string(),
    }
}

/// Binds `bdf` to vfio-pci.
pub fn bind(p: &SysPaths, bdf: &str) -> Result<Report, BindError> {
    let bdf = normalise(bdf)?;
    let dir = dev_dir(p, &bdf);
    if !dir.exists() {
        return Err(BindError::NoDevice(bdf));
    }
    let mut actions = Vec::new();
    let current = link_name(&dir.join("driver"));
    if current.as_deref() != Some("vfio-pci") {
        if !p.sys.join("bus/pci/drivers/vfio-pci").exists() {
            let loaded = p.sys == Path::new("/sys")
                && Command::new("modprobe")
                    .arg("vfio-pci")
                    .status()
                    .is_ok_and(|s| s.success());
            if !loaded {
                return Err(BindError::NoVfioPci);
            }
            actions.push("loaded vfio-pci".to_string());
        }
        write(dir.join("driver_override"), "vfio-pci")?;
        actions.push(format!("set driver_override of {bdf} to vfio-pci"));
        if let Some(d) = &current {
            write(dir.join("driver/unbind"), &bdf)?;
            actions.push(format!("unbound {bdf} from {d}"));
        }
        write(p.sys.join("bus/pci/drivers_probe"), &bdf)?;
        actions.push(format!("asked the PCI core to probe {bdf}"));
    } else {
        actions.push(format!("{bdf} is already bound to vfio-pci"));
    }
    let mut r = status(p, &bdf)?;
    r.actions = actions;
    Ok(r)
}

/// Gives `bdf` back to `driver`.
pub fn unbind(p: &SysPaths, bdf: &str, driver: &str) -> Result<Report, BindError> {
    let bdf = normalise(bdf)?;
    let dir = dev_dir(p, &bdf);
    if !dir.exists() {
        return Err(BindError::NoDevice(bdf));
    }
    let mut actions = Vec::new();
    write(dir.join("driver_override"), "\n")?;
    actions.push(format!("cleared driver_override of {bdf}"));
    if link_name(&dir.join("driver")).is_some() {
        write(dir.join("driver/unbind"), &bdf)?;
        actions.push(format!("unbound {bdf}"));
    }
    let bind_file = p.sys.join("bus/pci/drivers").join(driver).join("bind");
    if bind_file.parent().is_some_and(Path::exists) {
        write(bind_file, &bdf)?;
        actions.push(format!("bound {bdf} to {driver}"));
    } else {
        write(p.sys.join("bus/pci/drivers_probe"), &bdf)?;
        actions.push(format!(
            "{driver} is not loaded; asked the PCI core to probe {bdf}"
        ));
    }
    let mut r = status(p, &bdf)?;
    r.ready = true; // Handing back succeeded; readiness for VFIO is not the point here.
    r.problem = None;
    r.actions = actions;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tree(tag: &str) -> (PathBuf, SysPaths) {
        let root = std::env::temp_dir().join(format!("ipoib-tool-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let dev = root.join("sys/bus/pci/devices/0000:81:00.0");
        fs::create_dir_all(&dev).unwrap();
        let mlx = root.join("sys/bus/pci/drivers/mlx5_core");
        fs::create_dir_all(&mlx).unwrap();
        fs::create_dir_all(root.join("sys/bus/pci/drivers/vfio-pci")).unwrap();
        fs::create_dir_all(root.join("dev/vfio")).unwrap();
        symlink(&mlx, dev.join("driver")).unwrap();
        let paths = SysPaths {
            sys: root.join("sys"),
            dev: root.join("dev"),
        };
        (root, paths)
    }

    #[test]
    fn bind_writes_the_kernel_sequence() {
        let (root, p) = tree("bind");
        let r = bind(&p, "81:00.0").unwrap();
        let dev = p.sys.join("bus/pci/devices/0000:81:00.0");
        assert_eq!(
            fs::read_to_string(dev.join("driver_override")).unwrap(),
            "vfio-pci"
        );
        assert_eq!(
            fs::read_to_string(p.sys.join("bus/pci/drivers/mlx5_core/unbind")).unwrap(),
            "0000:81:00.0"
        );
        assert_eq!(
            fs::read_to_string(p.sys.join("bus/pci/drivers_probe")).unwrap(),
            "0000:81:00.0"
        );
        assert_eq!(r.actions.len(), 3);
        // The fake kernel did not rebind, so the report says what is wrong.
        assert!(!r.ready);
        assert!(r.problem.unwrap().contains("bound to mlx5_core"));
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn bad_addresses_and_missing_devices() {
        let (root, p) = tree("bad");
        assert!(matches!(bind(&p, "zz"), Err(BindError::BadAddress(_))));
        assert!(matches!(
            status(&p, "0000:82:00.0"),
            Err(BindError::NoDevice(_))
        ));
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn unbind_hands_back_to_the_driver() {
        let (root, p) = tree("unbind");
        let r = unbind(&p, "0000:81:00.0", "mlx5_core").unwrap();
        assert_eq!(
            fs::read_to_string(p.sys.join("bus/pci/drivers/mlx5_core/bind")).unwrap(),
            "0000:81:00.0"
        );
        assert!(
            r.actions
                .iter()
                .any(|a| a.contains("bound 0000:81:00.0 to mlx5_core"))
        );
        fs::remove_dir_all(root).unwrap();
    }
}
