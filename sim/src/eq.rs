//! Event queues on the device side (reference §5): producer counter,
//! ownership parity, arming and MSI-X.

use crate::bytes::set_dword;
use crate::iommu::Iommu;

/// One EQ as the device keeps it.
#[derive(Debug, Clone)]
pub struct SimEq {
    /// log2 entries.
    pub log_size: u8,
    /// UAR whose doorbells serve it.
    pub uar: u32,
    /// MSI-X vector.
    pub intr: u16,
    /// Buffer pages.
    pub pas: Vec<u64>,
    /// Page size in bytes.
    pub page_size: u64,
    /// Subscribed event types.
    pub mask: [u64; 4],
    /// Producer counter.
    pub pc: u32,
    /// Consumer counter (24 bits, from the doorbell).
    pub cc: u32,
    /// Armed for one interrupt.
    pub armed: bool,
    /// Overran (entries lost).
    pub overrun: bool,
}

/// What posting an EQE led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Posted {
    /// Written; fire this vector if `Some`.
    Written(Option<u16>),
    /// No room: the consumer is too far behind.
    Overrun,
    /// The buffer is not mapped.
    DmaFault,
}

impl SimEq {
    /// Whether the EQ takes event type `t`.
    pub fn subscribes(&self, t: u8) -> bool {
        let t = usize::from(t);
        t < 256 && self.mask[t / 64] & (1u64 << (t % 64)) != 0
    }

    fn size(&self) -> u32 {
        1 << self.log_size
    }

    /// Entries produced and not yet consumed.
    pub fn pending(&self) -> u32 {
        self.pc.wrapping_sub(self.cc) & 0x00FF_FFFF
    }

    fn entry_iova(&self, index: u32) -> Option<u64> {
        let byte = u64::from(index) * 64;
        let page = usize::try_from(byte / self.page_size).ok()?;
        Some(self.pas.get(page)? + byte % self.page_size)
    }

    /// Writes one EQE: body first, owner byte (producer lap parity) last.
    pub fn post(&mut self, iommu: &Iommu, kind: u8, sub_type: u8, data: &[u8; 28]) -> Posted {
        if self.pending() >= self.size() {
            self.overrun = true;
            return Posted::Overrun;
        }
        let index = self.pc & (self.size() - 1);
        let Some(iova) = self.entry_iova(index) else {
            return Posted::DmaFault;
        };
        let mut e = [0u8; 64];
        e[0x01] = kind;
        e[0x03] = sub_type;
        e[0x20..0x3C].copy_from_slice(data);
        let owner = ((self.pc >> self.log_size) & 1) as u8;
        if iommu.write(iova, &e[..0x3F]).is_err() {
            return Posted::DmaFault;
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        if iommu.write(iova + 0x3F, &[owner]).is_err() {
            return Posted::DmaFault;
        }
        self.pc = self.pc.wrapping_add(1);
        Posted::Written(self.fire_if_armed())
    }

    fn fire_if_armed(&mut self) -> Option<u16> {
        if self.armed && self.pending() > 0 {
            self.armed = false;
            Some(self.intr)
        } else {
            None
        }
    }

    /// Consumer-index doorbell; arming fires at once if entries are pending.
    pub fn doorbell(&mut self, cc: u32, arm: bool) -> Option<u16> {
        self.cc = cc & 0x00FF_FFFF;
        if arm {
            self.armed = true;
            return self.fire_if_armed();
        }
        None
    }
}

/// Event data with one big-endian dword at `off` (relative to EQE 0x20).
pub fn data_with_dword(off: usize, v: u32) -> [u8; 28] {
    let mut d = [0u8; 28];
    set_dword(&mut d, off, v);
    d
}
