//! A recording [`Transport`] for unit tests: BAR registers are a plain
//! register file, writes are logged, DMA mappings are kept and readable by
//! IOVA, so tests can look at exactly what the driver handed the device.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use vmm_sys_util::eventfd::EventFd;

use super::{DmaMem, Iova, IovaRange, Transport, TransportError};

/// One BAR write seen by the mock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarWrite {
    /// 32-bit write (offset, value).
    W32(u32, u32),
    /// 64-bit write (offset, value).
    W64(u32, u64),
}

#[derive(Debug, Default)]
struct State {
    regs: HashMap<u32, u32>,
    writes: Vec<BarWrite>,
    config: HashMap<u32, u16>,
    maps: BTreeMap<u64, DmaMem>,
}

/// The recording transport.
#[derive(Debug, Default)]
pub struct MockTransport {
    state: Mutex<State>,
}

impl MockTransport {
    /// A mock with an empty register file.
    pub fn new() -> MockTransport {
        MockTransport::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Presets a BAR register.
    pub fn set_reg(&self, off: u32, v: u32) {
        self.state().regs.insert(off, v);
    }

    /// BAR writes so far.
    pub fn writes(&self) -> Vec<BarWrite> {
        self.state().writes.clone()
    }

    /// Number of live DMA mappings.
    pub fn mappings(&self) -> usize {
        self.state().maps.len()
    }

    /// Reads device-visible memory by IOVA; `None` if not mapped.
    pub fn read_iova(&self, iova: Iova, len: usize) -> Option<Vec<u8>> {
        let st = self.state();
        let (&base, mem) = st.maps.range(..=iova.0).next_back()?;
        let off = usize::try_from(iova.0 - base).ok()?;
        let mut v = vec![0; len];
        mem.read(off, &mut v).then_some(v)
    }
}

impl Transport for MockTransport {
    fn name(&self) -> &str {
        "mock"
    }
    fn config_read16(&self, offset: u32) -> Result<u16, TransportError> {
        Ok(*self.state().config.get(&offset).unwrap_or(&0))
    }
    fn config_write16(&self, offset: u32, value: u16) -> Result<(), TransportError> {
        self.state().config.insert(offset, value);
        Ok(())
    }
    fn bar_read32(&self, offset: u32) -> u32 {
        *self.state().regs.get(&offset).unwrap_or(&0)
    }
    fn bar_write32(&self, offset: u32, value: u32) {
        let mut st = self.state();
        st.writes.push(BarWrite::W32(offset, value));
        st.regs.insert(offset, value);
    }
    fn bar_write64(&self, offset: u32, value: u64) {
        self.state().writes.push(BarWrite::W64(offset, value));
    }
    fn iova_ranges(&self) -> Vec<IovaRange> {
        vec![IovaRange {
            start: 0,
            end: 1 << 40,
        }]
    }
    fn map_dma(&self, iova: Iova, mem: DmaMem) -> Result<(), TransportError> {
        self.state().maps.insert(iova.0, mem);
        Ok(())
    }
    fn unmap_dma(&self, iova: Iova, _len: u64) -> Result<(), TransportError> {
        self.state().maps.remove(&iova.0);
        Ok(())
    }
    fn msix_vectors(&self) -> usize {
        8
    }
    fn enable_msix(&self, _fds: &[&EventFd]) -> Result<(), TransportError> {
        Ok(())
    }
    fn disable_msix(&self) -> Result<(), TransportError> {
        Ok(())
    }
    fn reset(&self) -> Result<(), TransportError> {
        Ok(())
    }
}
