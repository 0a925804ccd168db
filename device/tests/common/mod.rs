//! Helpers shared by the privileged test suites of this crate.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Output};

/// A network namespace this test created; deleted when dropped.
pub struct Netns(pub String);

impl Netns {
    /// Creates `ipoib-TAG-PID` (needs root and iproute2).
    pub fn new(tag: &str) -> Netns {
        let name = format!("ipoib-{tag}-{}", std::process::id());
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip (iproute2) must be installed; cargo xtask test installs it");
        assert!(st.success(), "ip netns add {name} (this test needs root)");
        Netns(name)
    }

    /// Its file, for `setns`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.0)
    }

    /// Runs `cmd` inside it.
    pub fn exec(&self, cmd: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(cmd)
            .output()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e} (cargo xtask test installs the tools)"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}
