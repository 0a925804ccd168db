//! Event queue consumer state (reference §5.3, §5.5).

/// Consumer side of an EQ of `1 << log_size` entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EqRing {
    log_size: u8,
    cc: u32,
}

/// Consumers update the index at least this often while draining, so the
/// device never sees the queue full (`MLX5_NUM_SPARE_EQE`).
pub const SPARE_EQES: u32 = 128;

impl EqRing {
    /// A fresh ring (consumer counter 0).
    pub fn new(log_size: u8) -> EqRing {
        EqRing { log_size, cc: 0 }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        1 << self.log_size
    }

    /// Always false; rings have at least one entry.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The free-running consumer counter.
    pub fn cc(&self) -> u32 {
        self.cc
    }

    /// Index of the next entry to look at.
    pub fn index(&self) -> usize {
        (self.cc as usize) & (self.len() - 1)
    }

    /// Whether an entry whose owner byte reads `owner` at [`EqRing::index`]
    /// was written by hardware in the current lap.
    pub fn is_valid(&self, owner: u8) -> bool {
        (owner & 1) == ((self.cc >> self.log_size) & 1) as u8
    }

    /// Consumes one entry.
    pub fn advance(&mut self) {
        self.cc = self.cc.wrapping_add(1);
    }

    /// Consumer-index doorbell value: EQN in 31:24, counter in 23:0.
    pub fn doorbell(&self, eqn: u8) -> u32 {
        (u32::from(eqn) << 24) | (self.cc & 0x00FF_FFFF)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The device's rule: entry written in producer lap L carries owner L & 1;
    /// entries start at owner 1 (invalid for lap 0).
    fn hw_owner(pc: u32, log: u8) -> u8 {
        ((pc >> log) & 1) as u8
    }

    #[test]
    fn ownership_over_many_laps() {
        let log = 3;
        let n = 1u32 << log;
        let mut owners = vec![1u8; n as usize];
        let mut ring = EqRing::new(log);
        let mut pc = 0u32;
        for round in 0..1000u32 {
            // Hardware writes a burst of up to n entries.
            let burst = round % n + 1;
            for _ in 0..burst {
                owners[(pc & (n - 1)) as usize] = hw_owner(pc, log);
                pc += 1;
            }
            let mut seen = 0;
            while ring.is_valid(owners[ring.index()]) {
                ring.advance();
                seen += 1;
                assert!(seen <= burst, "consumed a stale entry");
            }
            assert_eq!(seen, burst);
            assert_eq!(ring.cc(), pc);
        }
    }

    #[test]
    fn doorbell_layout() {
        let mut r = EqRing::new(8);
        for _ in 0..5 {
            r.advance();
        }
        assert_eq!(r.doorbell(7), 0x0700_0005);
    }
}
