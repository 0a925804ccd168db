//! Send and receive queue producer state (reference §7.1–7.2, §7.8).

/// Send queue of `1 << log_size` 64-byte basic blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SqRing {
    log_size: u8,
    /// Producer counter in WQEBBs (16 bits on the wire).
    pc: u16,
    /// WQEBBs known complete.
    cc: u16,
}

impl SqRing {
    /// A fresh ring.
    pub fn new(log_size: u8) -> SqRing {
        SqRing {
            log_size,
            pc: 0,
            cc: 0,
        }
    }

    /// Basic blocks in the ring.
    pub fn len(&self) -> u16 {
        1 << self.log_size
    }

    /// Never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Producer counter.
    pub fn pc(&self) -> u16 {
        self.pc
    }

    /// Free basic blocks.
    pub fn free(&self) -> u16 {
        self.len() - self.pc.wrapping_sub(self.cc)
    }

    /// Ring index of WQEBB `n` past the producer.
    pub fn slot(&self, n: u16) -> usize {
        usize::from(self.pc.wrapping_add(n) & (self.len() - 1))
    }

    /// Claims `bbs` basic blocks; returns the wqe_index of the first, or
    /// `None` when they do not fit.
    pub fn claim(&mut self, bbs: u16) -> Option<u16> {
        if bbs == 0 || bbs > self.free() {
            return None;
        }
        let idx = self.pc;
        self.pc = self.pc.wrapping_add(bbs);
        Some(idx)
    }

    /// Everything up to and including the WQE at `wqe_index` of `bbs` blocks
    /// has completed. Indices outside the outstanding window are ignored.
    pub fn complete(&mut self, wqe_index: u16, bbs: u16) -> bool {
        let end = wqe_index.wrapping_add(bbs);
        let outstanding = self.pc.wrapping_sub(self.cc);
        if end.wrapping_sub(self.cc) > outstanding || end == self.cc {
            return false;
        }
        self.cc = end;
        true
    }
}

/// Receive queue of `1 << log_size` WQEs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RqRing {
    log_size: u8,
    head: u16,
    tail: u16,
}

impl RqRing {
    /// A fresh ring.
    pub fn new(log_size: u8) -> RqRing {
        RqRing {
            log_size,
            head: 0,
            tail: 0,
        }
    }

    /// WQEs in the ring.
    pub fn len(&self) -> u16 {
        1 << self.log_size
    }

    /// Never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Posted counter (the doorbell record value).
    pub fn head(&self) -> u16 {
        self.head
    }

    /// WQEs posted and not completed.
    pub fn outstanding(&self) -> u16 {
        self.head.wrapping_sub(self.tail)
    }

    /// Claims the next WQE slot.
    pub fn claim(&mut self) -> Option<usize> {
        if self.outstanding() >= self.len() {
            return None;
        }
        let i = usize::from(self.head & (self.len() - 1));
        self.head = self.head.wrapping_add(1);
        Some(i)
    }

    /// The oldest outstanding WQE completed; returns its slot.
    pub fn complete(&mut self) -> Option<usize> {
        if self.outstanding() == 0 {
            return None;
        }
        let i = usize::from(self.tail & (self.len() - 1));
        self.tail = self.tail.wrapping_add(1);
        Some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sq_wraps_and_refuses_overrun() {
        let mut s = SqRing::new(3);
        assert_eq!(s.claim(2), Some(0));
        assert_eq!(s.claim(5), Some(2));
        assert_eq!(s.claim(2), None, "only one block left");
        assert!(s.complete(0, 2));
        assert_eq!(s.claim(2), Some(7));
        assert_eq!(s.slot(0), 1);
        assert!(!s.complete(100, 1), "stale index ignored");
        assert!(s.complete(7, 2));
        assert_eq!(s.free(), 8);
    }

    #[test]
    fn sq_counter_wraps_past_16_bits() {
        let mut s = SqRing::new(2);
        for _ in 0..40_000 {
            let i = s.claim(3).unwrap();
            assert!(s.complete(i, 3));
        }
        assert_eq!(s.free(), 4);
    }

    #[test]
    fn rq_fills_and_drains_in_order() {
        let mut r = RqRing::new(2);
        let got: Vec<_> = (0..4).map(|_| r.claim().unwrap()).collect();
        assert_eq!(got, vec![0, 1, 2, 3]);
        assert_eq!(r.claim(), None);
        assert_eq!(r.complete(), Some(0));
        assert_eq!(r.claim(), Some(0));
        assert_eq!(r.head(), 5);
    }
}
