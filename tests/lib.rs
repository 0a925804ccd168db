//! Helpers shared by the whole-stack scenarios.
//!
//! Every scenario runs on the software HCA; when `IPOIB_TEST_DEVICE` names
//! a PCI address the hardware variants run against that card too, and
//! report themselves as skipped otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used)]
#![deny(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use ipoib_sim::{Fault, SimConfig, SimHca};
use mlx5_driver::HcaConfig;

/// The PCI address of a card for hardware runs, if any.
pub fn hardware_device() -> Option<String> {
    std::env::var("IPOIB_TEST_DEVICE")
        .ok()
        .filter(|s| !s.is_empty())
}

/// Prints the standard skip line for a hardware test without a card.
pub fn skip_hardware(test: &str) {
    eprintln!("SKIPPED {test}: set IPOIB_TEST_DEVICE=<PCI address> to run it on a card");
}

/// A simulated HCA with the given faults.
pub fn sim(faults: Vec<Fault>) -> Arc<SimHca> {
    Arc::new(SimHca::new(SimConfig {
        faults,
        ..SimConfig::default()
    }))
}

/// Driver settings with short timeouts, so fault tests finish quickly.
pub fn quick_cfg() -> HcaConfig {
    HcaConfig {
        fw_ready_timeout: Duration::from_secs(2),
        cmd_timeout: Duration::from_millis(300),
        health_interval: Duration::from_millis(20),
        reclaim_timeout: Duration::from_millis(500),
        ..HcaConfig::default()
    }
}
