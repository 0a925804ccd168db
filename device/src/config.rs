//! The daemon's configuration file (TOML). Command-line flags override it.
//!
//! ```toml
//! device = "0000:81:00.0"          # or "sim"
//! fabric = "/run/ipoib-fabric.sock" # software HCA only
//! control = "/run/ipoib-vfio.sock"
//! control_group = 1000
//!
//! [[interface]]
//! name = "ib0"
//! netns = "tenant1"
//! addresses = ["10.0.0.1/24", "fd00::1/64"]
//!
//! [[interface.vhost_user]]             # one vNIC per socket
//! socket = "/run/ipoib-vfio/vm1.sock"
//! mac = "52:54:00:12:34:56"            # optional: learned from the guest
//! addresses = ["10.0.0.21"]            # optional: learned from the guest
//! copy = false                         # true: copy frames, never map guest memory
//! ```
//!
//! The file is input like any other: unknown keys, wrong types and values
//! out of range are errors naming the key, never a crash.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Longest configuration file read.
const MAX_LEN: u64 = 1 << 20;

/// The file's contents.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// PCI address or `sim`.
    pub device: Option<String>,
    /// Fabric socket for the software HCA.
    pub fabric: Option<PathBuf>,
    /// Software HCA faults.
    #[serde(default)]
    pub sim_faults: Vec<String>,
    /// Control socket.
    pub control: Option<PathBuf>,
    /// Group allowed on the control socket.
    pub control_group: Option<u32>,
    /// Seconds to wait for the port at start.
    pub wait_active: Option<u64>,
    /// Interfaces (at this stage: one, on P_Key index 0 of port 1).
    #[serde(default)]
    pub interface: Vec<InterfaceConfig>,
}

/// One interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceConfig {
    /// Host interface name.
    pub name: Option<String>,
    /// Network namespace.
    pub netns: Option<String>,
    /// Addresses, ADDRESS/PREFIX.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// vhost-user sockets for VMs.
    #[serde(default)]
    pub vhost_user: Vec<VhostUserConfig>,
}

/// One vhost-user socket of an interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VhostUserConfig {
    /// Where frontends connect.
    pub socket: PathBuf,
    /// The guest's MAC (learned when absent).
    pub mac: Option<String>,
    /// Source addresses the guest may use (learned when empty).
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Copy frames instead of mapping the VM's memory for the HCA.
    #[serde(default)]
    pub copy: bool,
}

impl VhostUserConfig {
    /// The socket as the daemon serves it on interface `ifname`.
    pub fn spec(&self, ifname: &str) -> Result<crate::vhost::VhostSpec, String> {
        let mac = match &self.mac {
            Some(m) => Some(crate::vhost::VhostSpec::mac(m).map_err(|e| format!("mac: {e}"))?),
            None => None,
        };
        let addresses = self
            .addresses
            .iter()
            .map(|a| {
                a.parse()
                    .map_err(|_| format!("addresses: {a:?} is not an IP address"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(crate::vhost::VhostSpec {
            interface: ifname.to_string(),
            socket: self.socket.clone(),
            mac,
            addresses,
            copy: self.copy,
        })
    }
}

impl FileConfig {
    /// Parses configuration text.
    pub fn parse(text: &str) -> Result<FileConfig, String> {
        let cfg: FileConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        if cfg.interface.len() > 1 {
            return Err(format!(
                "{} [[interface]] tables: this version serves one interface per daemon \
                 (P_Key index 0 of port 1); child interfaces come later",
                cfg.interface.len()
            ));
        }
        for a in cfg.interface.iter().flat_map(|i| &i.addresses) {
            crate::daemon::parse_cidr(a).map_err(|e| format!("interface.addresses: {e}"))?;
        }
        for v in cfg.interface.iter().flat_map(|i| &i.vhost_user) {
            v.spec("")
                .map_err(|e| format!("interface.vhost_user.{e}"))?;
        }
        Ok(cfg)
    }

    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<FileConfig, String> {
        use std::io::Read;
        let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut text = String::new();
        f.take(MAX_LEN + 1)
            .read_to_string(&mut text)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if text.len() as u64 > MAX_LEN {
            return Err(format!("{}: longer than {MAX_LEN} bytes", path.display()));
        }
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_file() {
        let c = FileConfig::parse(
            r#"
device = "sim"
fabric = "/run/f.sock"
control_group = 1000
[[interface]]
name = "ib1"
netns = "t1"
addresses = ["10.0.0.1/24", "fd00::1/64"]
[[interface.vhost_user]]
socket = "/run/vm1.sock"
copy = true
[[interface.vhost_user]]
socket = "/run/vm2.sock"
"#,
        )
        .unwrap();
        let vms = &c.interface[0].vhost_user;
        assert!(vms[0].spec("ib1").unwrap().copy);
        assert!(!vms[1].spec("ib1").unwrap().copy, "zero copy by default");
        assert_eq!(c.device.as_deref(), Some("sim"));
        assert_eq!(c.control_group, Some(1000));
        assert_eq!(c.interface[0].name.as_deref(), Some("ib1"));
        assert_eq!(c.interface[0].addresses.len(), 2);
        assert_eq!(FileConfig::parse("").unwrap(), FileConfig::default());
    }

    #[test]
    fn bad_files_are_errors_naming_the_problem() {
        for (text, says) in [
            ("devcie = \"sim\"", "devcie"),
            ("control_group = -1", "control_group"),
            ("control_group = \"wheel\"", "control_group"),
            (
                "[[interface]]\naddresses = [\"10.0.0.1\"]",
                "ADDRESS/PREFIX",
            ),
            ("[[interface]]\n[[interface]]", "one interface"),
            ("device = ", "device"),
            ("[[interface]]\nmtu = 9000", "mtu"),
        ] {
            let e = FileConfig::parse(text).unwrap_err();
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }
}
