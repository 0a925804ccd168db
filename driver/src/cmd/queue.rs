//! The command queue: one 4 KiB page of 64-byte entries, each with its own
//! input and output mailbox chains (reference §2).
//!
//! The queue only posts and collects; waiting (polled or on the command
//! completion EQE) is up to the caller, which also owns the EQ. Slot
//! `n - 1` is reserved for MANAGE_PAGES, as Linux and rdma-core do, so that
//! a page request can be answered while another command is outstanding.

use std::time::Instant;

use super::{CmdError, DeliveryStatus, Opcode};
use crate::layout::cmd::{
    BLOCK_DATA, BLOCK_LEN, BLOCK_STRIDE, CMD_TYPE_PCI, ENTRY_LEN, INLINE_LEN, OWNER_HW, block,
    blocks_for, entry, entry_signature, sign_block,
};
use crate::layout::{put_be32, put_be64};
use crate::regs;
use crate::transport::{DmaBuffer, Iova, IovaSpace, Transport, TransportError, dma_rmb, dma_wmb};

/// Blocks a chain starts with (4 KiB of payload, as rdma-core).
const INITIAL_BLOCKS: usize = 8;

#[derive(Debug)]
struct Chain {
    buf: DmaBuffer,
    blocks: usize,
}

impl Chain {
    fn block_iova(&self, k: usize) -> Iova {
        self.buf.iova_at(k * BLOCK_STRIDE)
    }
}

/// A command handed to firmware and not yet collected.
#[derive(Clone, Copy, Debug)]
pub struct Posted {
    /// Opcode.
    pub opcode: Opcode,
    /// Opcode modifier.
    pub op_mod: u16,
    /// When it was posted.
    pub started: Instant,
    token: u8,
    outlen: usize,
}

#[derive(Debug, Default)]
enum SlotState {
    #[default]
    Free,
    Busy(Posted),
    /// Timed out: firmware still owns it and may write its mailboxes.
    Stuck(Posted),
}

#[derive(Debug, Default)]
struct Slot {
    inbox: Option<Chain>,
    outbox: Option<Chain>,
    state: SlotState,
}

/// The command queue.
#[derive(Debug)]
pub struct CmdQueue {
    page: DmaBuffer,
    stride: usize,
    slots: Vec<Slot>,
    next_token: u8,
}

impl CmdQueue {
    /// Allocates the queue page for `1 << log_size` slots of
    /// `1 << log_stride` bytes (values read from the init segment).
    pub fn new(
        t: &dyn Transport,
        space: &mut IovaSpace,
        log_size: u8,
        log_stride: u8,
    ) -> Result<CmdQueue, TransportError> {
        let page = DmaBuffer::alloc(t, space, 4096)?;
        let n = 1usize << log_size;
        Ok(CmdQueue {
            page,
            stride: 1 << log_stride,
            slots: (0..n).map(|_| Slot::default()).collect(),
            next_token: 1,
        })
    }

    /// IOVA of the queue page (for the init segment).
    pub fn iova(&self) -> Iova {
        self.page.iova()
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// The slot reserved for page commands.
    pub fn page_slot(&self) -> usize {
        self.slots.len() - 1
    }

    /// A free slot for an ordinary command.
    pub fn free_slot(&self) -> Option<usize> {
        (0..self.page_slot()).find(|&s| matches!(self.slots[s].state, SlotState::Free))
    }

    /// Whether `slot` holds a command not yet collected.
    pub fn is_busy(&self, slot: usize) -> bool {
        matches!(
            self.slots.get(slot).map(|s| &s.state),
            Some(SlotState::Busy(_))
        )
    }

    /// The command in `slot`, if any.
    pub fn posted(&self, slot: usize) -> Option<Posted> {
        match self.slots.get(slot).map(|s| &s.state) {
            Some(SlotState::Busy(p)) | Some(SlotState::Stuck(p)) => Some(*p),
            _ => None,
        }
    }

    /// Whether any slot was abandoned to firmware after a timeout.
    pub fn has_stuck(&self) -> bool {
        self.slots
            .iter()
            .any(|s| matches!(s.state, SlotState::Stuck(_)))
    }

    fn ensure_chain(
        chain: &mut Option<Chain>,
        t: &dyn Transport,
        space: &mut IovaSpace,
        blocks: usize,
    ) -> Result<(), TransportError> {
        if chain.as_ref().is_some_and(|c| c.blocks >= blocks) {
            return Ok(());
        }
        let want = blocks.max(INITIAL_BLOCKS).next_multiple_of(INITIAL_BLOCKS);
        let buf = DmaBuffer::alloc(t, space, want * BLOCK_STRIDE)?;
        if let Some(old) = chain.replace(Chain { buf, blocks: want }) {
            old.buf.release(t, space)?;
        }
        Ok(())
    }

    /// Writes `data` (the bytes past the inline 16) into `chain`, with
    /// `used` linked blocks; `data` empty means zeroed output blocks.
    fn write_chain(chain: &Chain, used: usize, data: &[u8], token: u8) {
        let mut b = [0u8; BLOCK_LEN];
        for k in 0..used {
            b.fill(0);
            let start = k * BLOCK_DATA;
            if start < data.len() {
                let end = (start + BLOCK_DATA).min(data.len());
                b[..end - start].copy_from_slice(&data[start..end]);
            }
            let next = if k + 1 < used {
                chain.block_iova(k + 1).0
            } else {
                0
            };
            put_be64(&mut b, block::NEXT, next);
            put_be32(&mut b, block::BLOCK_NUM, k as u32);
            b[block::TOKEN] = token;
            sign_block(&mut b);
            chain.buf.write(k * BLOCK_STRIDE, &b);
        }
    }

    /// Posts `input` on `slot` and rings the doorbell.
    #[allow(clippy::too_many_arguments)]
    pub fn post(
        &mut self,
        t: &dyn Transport,
        space: &mut IovaSpace,
        slot: usize,
        opcode: Opcode,
        op_mod: u16,
        input: &[u8],
        outlen: usize,
    ) -> Result<(), CmdError> {
        let transport = |source| CmdError::Transport { opcode, source };
        let token = self.next_token;
        self.next_token = if token == u8::MAX { 1 } else { token + 1 };
        let s = self.slots.get_mut(slot).ok_or(CmdError::NoSlot(opcode))?;
        if !matches!(s.state, SlotState::Free) {
            return Err(CmdError::NoSlot(opcode));
        }
        let in_blocks = blocks_for(input.len());
        let out_blocks = blocks_for(outlen);
        Self::ensure_chain(&mut s.inbox, t, space, in_blocks.max(1)).map_err(transport)?;
        Self::ensure_chain(&mut s.outbox, t, space, out_blocks.max(1)).map_err(transport)?;
        let (Some(inbox), Some(outbox)) = (&s.inbox, &s.outbox) else {
            return Err(CmdError::NoSlot(opcode));
        };
        let rest = input.get(INLINE_LEN..).unwrap_or(&[]);
        Self::write_chain(inbox, in_blocks, rest, token);
        Self::write_chain(outbox, out_blocks, &[], token);

        let mut e = [0u8; ENTRY_LEN];
        entry::TYPE.set(&mut e, CMD_TYPE_PCI);
        entry::INLEN.set(&mut e, input.len() as u32);
        let in_ptr = if in_blocks > 0 {
            inbox.block_iova(0).0
        } else {
            0
        };
        let out_ptr = if out_blocks > 0 {
            outbox.block_iova(0).0
        } else {
            0
        };
        put_be64(&mut e, entry::IN_PTR, in_ptr);
        let n = input.len().min(INLINE_LEN);
        e[entry::IN..entry::IN + n].copy_from_slice(&input[..n]);
        put_be64(&mut e, entry::OUT_PTR, out_ptr);
        entry::OUTLEN.set(&mut e, outlen as u32);
        e[entry::TOKEN] = token;
        e[entry::STATUS_OWN] = OWNER_HW;
        e[entry::SIG] = entry_signature(&e);
        self.page.write(slot * self.stride, &e);
        s.state = SlotState::Busy(Posted {
            opcode,
            op_mod,
            started: Instant::now(),
            token,
            outlen,
        });
        // Entry and mailboxes must be visible before the doorbell.
        dma_wmb();
        t.bar_write32(regs::CMD_DBELL.off, 1u32 << slot);
        Ok(())
    }

    /// Whether firmware has handed `slot` back (ownership bit clear).
    pub fn is_done(&self, slot: usize) -> bool {
        self.page.read_u8(slot * self.stride + entry::STATUS_OWN) & OWNER_HW == 0
    }

    /// Collects the output of a completed slot and frees it.
    pub fn collect(&mut self, slot: usize) -> Result<Vec<u8>, CmdError> {
        dma_rmb();
        let stride = self.stride;
        let s = self
            .slots
            .get_mut(slot)
            .ok_or(CmdError::NoSlot(Opcode(0)))?;
        let SlotState::Busy(p) = std::mem::take(&mut s.state) else {
            return Err(CmdError::NoSlot(Opcode(0)));
        };
        let mut e = [0u8; ENTRY_LEN];
        self.page.read(slot * stride, &mut e);
        let delivery = DeliveryStatus::from_u8(e[entry::STATUS_OWN] >> 1);
        if delivery != DeliveryStatus::Ok {
            return Err(CmdError::Delivery {
                opcode: p.opcode,
                op_mod: p.op_mod,
                status: delivery,
            });
        }
        let mut out = vec![0u8; p.outlen.max(INLINE_LEN)];
        out[..INLINE_LEN].copy_from_slice(&e[entry::OUT..entry::OUT + INLINE_LEN]);
        if let Some(chain) = &s.outbox {
            let mut off = INLINE_LEN;
            let mut k = 0;
            while off < p.outlen && k < chain.blocks {
                let n = (p.outlen - off).min(BLOCK_DATA);
                chain.buf.read(k * BLOCK_STRIDE, &mut out[off..off + n]);
                if chain.buf.read_u8(k * BLOCK_STRIDE + block::TOKEN) != p.token {
                    return Err(CmdError::BadOutput {
                        opcode: p.opcode,
                        why: format!("output block {k} carries a foreign token"),
                    });
                }
                off += n;
                k += 1;
            }
        }
        out.truncate(p.outlen.max(INLINE_LEN));
        Ok(out)
    }

    /// Gives up on `slot` after a timeout: it is never reused, and its
    /// mailboxes are kept until the function is reset.
    pub fn abandon(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(slot)
            && let SlotState::Busy(p) = s.state
        {
            s.state = SlotState::Stuck(p);
        }
    }

    /// Forgets every outstanding and stuck command (after a function reset).
    pub fn forget_all(&mut self) {
        for s in &mut self.slots {
            s.state = SlotState::Free;
        }
    }

    /// Releases the queue page and every chain. Only once the device can no
    /// longer write them (after DISABLE_HCA or a function reset).
    pub fn release(self, t: &dyn Transport, space: &mut IovaSpace) -> Result<(), TransportError> {
        let mut first_err = None;
        for s in self.slots {
            for c in [s.inbox, s.outbox].into_iter().flatten() {
                if let Err(e) = c.buf.release(t, space) {
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Err(e) = self.page.release(t, space) {
            first_err.get_or_insert(e);
        }
        first_err.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::encode_input;
    use crate::cmd::hca::{EnableHca, QueryHcaCap};
    use crate::layout::caps::CapType;
    use crate::layout::xor8;
    use crate::transport::mock::{BarWrite, MockTransport};

    fn setup() -> (MockTransport, IovaSpace, CmdQueue) {
        let t = MockTransport::new();
        let mut space = IovaSpace::new(&t.iova_ranges());
        let q = CmdQueue::new(&t, &mut space, 5, 6).unwrap();
        (t, space, q)
    }

    #[test]
    fn enable_hca_entry_matches_reference_example() {
        let (t, mut space, mut q) = setup();
        let input = encode_input(&EnableHca);
        q.post(&t, &mut space, 0, Opcode::ENABLE_HCA, 0, &input, 0x0C)
            .unwrap();
        let e = t.read_iova(q.iova(), 64).unwrap();
        // §2.2 example, with Linux's token and entry signature on top.
        assert_eq!(e[0x00], 0x07);
        assert_eq!(&e[0x04..0x08], &[0, 0, 0, 0x10]);
        assert_eq!(&e[0x08..0x10], &[0; 8], "no input mailbox needed");
        assert_eq!(
            &e[0x10..0x20],
            &[0x01, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(&e[0x20..0x30], &[0; 16]);
        assert_eq!(&e[0x30..0x38], &[0; 8], "no output mailbox needed");
        assert_eq!(&e[0x38..0x3C], &[0, 0, 0, 0x0C]);
        assert_eq!(e[0x3C], 1, "first token");
        assert_eq!(e[0x3F], 0x01);
        assert_eq!(xor8(&e), 0xFF, "entry signature");
        assert_eq!(t.writes().last(), Some(&BarWrite::W32(0x18, 1)));
    }

    #[test]
    fn big_output_gets_a_linked_signed_chain() {
        let (t, mut space, mut q) = setup();
        let c = QueryHcaCap {
            cap: CapType::General,
            current: true,
        };
        let input = encode_input(&c);
        q.post(&t, &mut space, 2, Opcode::QUERY_HCA_CAP, 1, &input, 0x1010)
            .unwrap();
        let e = t.read_iova(q.iova().add(2 * 64), 64).unwrap();
        let out_ptr = u64::from_be_bytes(e[0x30..0x38].try_into().unwrap());
        assert_ne!(out_ptr, 0);
        assert_eq!(out_ptr % 1024, 0);
        // Walk the chain: 8 blocks, numbered, linked, signed, same token.
        let mut p = out_ptr;
        for k in 0..8u32 {
            let b = t.read_iova(Iova(p), BLOCK_LEN).unwrap();
            assert_eq!(&b[0x238..0x23C], &k.to_be_bytes());
            assert_eq!(b[0x23D], e[0x3C]);
            assert_eq!(xor8(&b[0x200..=0x23E]), 0xFF);
            assert_eq!(xor8(&b), 0xFF);
            p = u64::from_be_bytes(b[0x230..0x238].try_into().unwrap());
            if k == 7 {
                assert_eq!(p, 0);
            }
        }
        assert_eq!(t.writes().last(), Some(&BarWrite::W32(0x18, 1 << 2)));
    }

    #[test]
    fn busy_slot_is_refused_and_page_slot_is_last() {
        let (t, mut space, mut q) = setup();
        assert_eq!(q.page_slot(), 31);
        let input = encode_input(&EnableHca);
        q.post(&t, &mut space, 0, Opcode::ENABLE_HCA, 0, &input, 12)
            .unwrap();
        assert!(
            q.post(&t, &mut space, 0, Opcode::ENABLE_HCA, 0, &input, 12)
                .is_err()
        );
        assert_eq!(q.free_slot(), Some(1));
        q.abandon(0);
        assert!(q.has_stuck());
        q.forget_all();
        q.release(&t, &mut space).unwrap();
        assert_eq!(space.allocated(), 0);
        assert_eq!(t.mappings(), 0);
    }
}
