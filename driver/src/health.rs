//! Health polling (reference §3.5): the fatal sensors in the drivers'
//! order, then the firmware heartbeat.

use std::time::{Duration, Instant};

use crate::layout::health::{HEALTH_BASE, HEALTH_LEN, HealthBuffer};
use crate::regs;
use crate::transport::Transport;

/// Consecutive unchanged heartbeat samples that mean "dead" (`MAX_MISSES`).
pub const MAX_MISSES: u32 = 3;

/// A fatal device condition.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, serde::Serialize)]
pub enum Fatal {
    /// BAR reads return all-ones: the function fell off the bus.
    #[error("PCI communication lost (health fw_ver reads 0xffffffff)")]
    PciGone,
    /// nic_interface reads "disabled".
    #[error("NIC interface disabled by firmware")]
    NicDisabled,
    /// nic_interface reads "SW reset".
    #[error("NIC interface in software reset")]
    SwReset,
    /// Firmware raised a health syndrome with recovery required.
    #[error("firmware health error: {0}")]
    Syndrome(HealthBuffer),
    /// The heartbeat stopped.
    #[error("firmware heartbeat stopped ({MAX_MISSES} polls without change)")]
    HeartbeatLost,
}

/// Reads the health buffer.
pub fn read_health(t: &dyn Transport) -> HealthBuffer {
    let mut b = [0u8; HEALTH_LEN];
    for (i, w) in b.chunks_exact_mut(4).enumerate() {
        w.copy_from_slice(&t.bar_read32(HEALTH_BASE + 4 * i as u32).to_be_bytes());
    }
    HealthBuffer::parse(&b)
}

/// Evaluates the fatal sensors once (no heartbeat).
pub fn sensors(t: &dyn Transport) -> Result<HealthBuffer, Fatal> {
    if t.bar_read32(regs::HEALTH_FW_VER.off) == u32::MAX {
        return Err(Fatal::PciGone);
    }
    let nic = (t.bar_read32(regs::CMDQ_ADDR_L_SZ.off) >> regs::NIC_IF_SHIFT) & regs::NIC_IF_MASK;
    if nic == regs::NIC_IF_DISABLED {
        return Err(Fatal::NicDisabled);
    }
    if nic == regs::NIC_IF_SW_RESET {
        return Err(Fatal::SwReset);
    }
    let h = read_health(t);
    if h.fatal() {
        return Err(Fatal::Syndrome(h));
    }
    Ok(h)
}

/// Periodic health check with heartbeat tracking.
#[derive(Debug)]
pub struct HealthMonitor {
    interval: Duration,
    last: Option<Instant>,
    counter: Option<u32>,
    misses: u32,
    /// Last non-fatal syndrome reported, to log changes once.
    last_synd: u8,
}

impl HealthMonitor {
    /// A monitor sampling at most once per `interval`.
    pub fn new(interval: Duration) -> HealthMonitor {
        HealthMonitor {
            interval,
            last: None,
            counter: None,
            misses: 0,
            last_synd: 0,
        }
    }

    /// Whether a sample is due at `now`.
    pub fn due(&self, now: Instant) -> bool {
        self.last
            .is_none_or(|l| now.duration_since(l) >= self.interval)
    }

    /// Samples the device if due.
    pub fn poll(&mut self, t: &dyn Transport, now: Instant) -> Result<(), Fatal> {
        if !self.due(now) {
            return Ok(());
        }
        self.last = Some(now);
        let h = sensors(t)?;
        if h.synd != self.last_synd {
            if h.synd != 0 {
                tracing::warn!(
                    device = t.name(),
                    "health syndrome without recovery request: {h}"
                );
            }
            self.last_synd = h.synd;
        }
        let c = t.bar_read32(regs::HEALTH_COUNTER.off) & 0x00FF_FFFF;
        if self.counter == Some(c) {
            self.misses += 1;
            if self.misses >= MAX_MISSES {
                return Err(Fatal::HeartbeatLost);
            }
        } else {
            self.misses = 0;
        }
        self.counter = Some(c);
        Ok(())
    }
}
