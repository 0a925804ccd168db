//! Completion queues and queue pairs on a brought-up [`Hca`].
//!
//! These are the datapath objects: creation and state transitions go
//! through commands, posting and polling touch only DMA memory and doorbells
//! and allocate nothing. Work is posted in batches: `post_*` writes WQEs,
//! `ring_*` publishes them with one doorbell.

use crate::cmd::cq::{CreateCq, DestroyCq, ModifyCqModeration};
use crate::cmd::mcg::{AttachMcg, DetachMcg};
use crate::cmd::qp::{
    CreateQp, DestroyQp, ModifyQp, QpContext, QpToErr, QpToRst, ServiceType, Transition, opt, qpc,
};
use crate::hca::{Hca, HcaError};
use crate::layout::cqe::{CQE_LEN, Cqe, INVALID_OP_OWN, OP_OWN};
use crate::layout::wqe::{self, AddressVector, DS, Sge, WQEBB};
use crate::queues::cq::{ARM_NEXT, CqRing};
use crate::queues::wq::{RqRing, SqRing};
use crate::regs;
use crate::transport::{DmaBuffer, Transport, dma_rmb, dma_wmb};

/// A completion queue.
#[derive(Debug)]
pub struct Cq {
    cqn: u32,
    buf: DmaBuffer,
    dbr: DmaBuffer,
    ring: CqRing,
    uar: u32,
    arm_sn: u32,
}

impl Cq {
    /// Creates a CQ of `1 << log_size` entries completing on the HCA's EQ.
    pub fn create<T: Transport>(hca: &mut Hca<T>, log_size: u8) -> Result<Cq, HcaError> {
        let log_size = log_size.clamp(1, 22);
        let len = (1usize << log_size) * CQE_LEN;
        let buf = hca.alloc_dma(len)?;
        for i in 0..(1usize << log_size) {
            buf.write_u8(i * CQE_LEN + OP_OWN, INVALID_OP_OWN);
        }
        let dbr = match hca.alloc_dma(4096) {
            Ok(d) => d,
            Err(e) => {
                hca.free_dma(buf)?;
                return Err(e.into());
            }
        };
        let cmd = CreateCq {
            log_size,
            uar: hca.uar(),
            eqn: u32::from(hca.eqn()),
            period: 0,
            max_count: 0,
            dbr: dbr.iova(),
            pas: (0..len.div_ceil(4096))
                .map(|k| buf.iova_at(k * 4096))
                .collect(),
        };
        match hca.exec(&cmd) {
            Ok(cqn) => Ok(Cq {
                cqn,
                buf,
                dbr,
                ring: CqRing::new(log_size),
                uar: hca.uar(),
                arm_sn: 0,
            }),
            Err(e) => {
                hca.free_dma(buf)?;
                hca.free_dma(dbr)?;
                Err(e.into())
            }
        }
    }

    /// The CQ number.
    pub fn cqn(&self) -> u32 {
        self.cqn
    }

    /// Polls up to `out.len()` completions; publishes the consumer index once.
    pub fn poll(&mut self, out: &mut [Cqe]) -> usize {
        let mut n = 0;
        while n < out.len() {
            let off = self.ring.index() * CQE_LEN;
            if !self.ring.is_valid(self.buf.read_u8(off + OP_OWN)) {
                break;
            }
            dma_rmb();
            let Some(b) = self.buf.block(off) else { break };
            out[n] = Cqe::decode(|o| b.be64(o));
            self.ring.advance();
            n += 1;
        }
        if n > 0 {
            self.dbr.write_be32(0, self.ring.set_ci());
        }
        n
    }

    /// Requests an event for the next completion (§6.5).
    pub fn arm(&mut self, t: &dyn Transport) {
        let word = self.ring.arm_word(self.arm_sn, ARM_NEXT);
        self.dbr.write_be32(4, word);
        dma_wmb();
        t.bar_write64(
            self.uar * regs::UAR_PAGE + regs::UAR_CQ_DB,
            (u64::from(word) << 32) | u64::from(self.cqn),
        );
    }

    /// Records a completion event for this CQ (advances `arm_sn`).
    pub fn event(&mut self) {
        self.arm_sn = self.arm_sn.wrapping_add(1);
    }

    /// Sets interrupt moderation.
    pub fn moderate<T: Transport>(
        &mut self,
        hca: &mut Hca<T>,
        period_us: u16,
        count: u16,
    ) -> Result<(), HcaError> {
        hca.exec(&ModifyCqModeration {
            cqn: self.cqn,
            period: period_us,
            max_count: count,
        })?;
        Ok(())
    }

    /// Destroys the CQ and frees its memory.
    pub fn destroy<T: Transport>(self, hca: &mut Hca<T>) -> Result<(), HcaError> {
        hca.exec(&DestroyCq(self.cqn))?;
        hca.free_dma(self.buf)?;
        hca.free_dma(self.dbr)?;
        Ok(())
    }
}

/// How to build a QP.
#[derive(Clone, Copy, Debug)]
pub struct QpConfig {
    /// UD, GSI or RC.
    pub st: ServiceType,
    /// 1-based port.
    pub port: u8,
    /// P_Key table index.
    pub pkey_index: u16,
    /// Q_Key (UD/GSI).
    pub qkey: u32,
    /// log2 send queue basic blocks.
    pub log_sq: u8,
    /// log2 receive WQEs.
    pub log_rq: u8,
    /// Scatter entries per receive WQE.
    pub rq_sge: u8,
    /// Send CQ.
    pub send_cq: u32,
    /// Receive CQ.
    pub recv_cq: u32,
    /// Do not loop back own multicast.
    pub block_mc_loopback: bool,
    /// Receive from this SRQ (RMP number) instead of an own RQ.
    pub srq: Option<u32>,
    /// UD with IPoIB stateless offloads (checksum, LSO): needs cap
    /// `ipoib_basic_offloads`; every send WQE then carries pad + eth segments.
    pub offload: bool,
    /// Protection domain; `None`: the HCA's own ([`Hca::pd`]). Every key
    /// the QP's work requests name must belong to it.
    pub pd: Option<u32>,
}

impl QpConfig {
    /// A UD QP of `1 << log` send blocks and receive WQEs on CQs `scq`/`rcq`.
    pub fn ud(port: u8, pkey_index: u16, qkey: u32, log: u8, scq: u32, rcq: u32) -> QpConfig {
        QpConfig {
            st: ServiceType::Ud,
            port,
            pkey_index,
            qkey,
            log_sq: log,
            log_rq: log,
            rq_sge: 1,
            send_cq: scq,
            recv_cq: rcq,
            block_mc_loopback: true,
            srq: None,
            offload: false,
            pd: None,
        }
    }
}

/// What the HCA should do to a UD payload on the way out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxOffload<'a> {
    /// Compute the IPv4 header checksum.
    pub l3_csum: bool,
    /// Compute the TCP/UDP checksum.
    pub l4_csum: bool,
    /// Segment TCP: MSS and the headers (IPoIB + IP + TCP) to replicate;
    /// the gather list then holds only the TCP payload.
    pub lso: Option<(u16, &'a [u8])>,
}

/// The path and transport parameters of an RC connection (from the CM
/// exchange and the PathRecord).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RcPath {
    /// Peer QPN.
    pub remote_qpn: u32,
    /// Peer LID.
    pub dlid: u16,
    /// Service level.
    pub sl: u8,
    /// Path MTU code.
    pub mtu: u8,
    /// First PSN we expect.
    pub rq_psn: u32,
    /// First PSN we send.
    pub sq_psn: u32,
    /// RNR NAK timer code we ask peers to wait.
    pub min_rnr_nak: u8,
    /// Local ACK timeout exponent (4.096 µs × 2^n).
    pub ack_timeout: u8,
    /// Transport retries.
    pub retry_count: u8,
    /// RNR retries (7 = infinite).
    pub rnr_retry: u8,
}

/// Why a post was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PostError {
    /// No room in the queue.
    #[error("work queue full")]
    Full,
    /// Too many gather/scatter entries for one WQE.
    #[error("too many segments for one WQE")]
    TooManySegments,
}

/// QP states as the driver tracks them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QpState {
    /// RESET.
    Reset,
    /// INIT.
    Init,
    /// RTR.
    Rtr,
    /// RTS.
    Rts,
    /// ERR.
    Error,
}

/// A queue pair.
#[derive(Debug)]
pub struct Qp {
    qpn: u32,
    buf: DmaBuffer,
    dbr: DmaBuffer,
    sq: SqRing,
    rq: RqRing,
    rq_stride: usize,
    sq_offset: usize,
    rq_sge: usize,
    /// Every RQ WQE holds one data segment and a pre-written terminator.
    rq_uniform: bool,
    offload: bool,
    uar: u32,
    bf_offset: u32,
    bf_half: u32,
    last_ctrl: Option<[u8; 8]>,
    /// Basic blocks of the WQE at each SQ slot, for completions.
    wqe_bbs: Vec<u8>,
    terminator: u32,
    qpc: QpContext,
    state: QpState,
}

impl Qp {
    /// Creates a QP in RESET.
    pub fn create<T: Transport>(hca: &mut Hca<T>, cfg: &QpConfig) -> Result<Qp, HcaError> {
        // The SQ starts right after the RQ (§7.1); keep the RQ at least one
        // basic block long so the SQ stays 64-byte aligned, as Linux does.
        let mut rq_stride = ((usize::from(cfg.rq_sge) + 1) * DS).next_power_of_two();
        while (1usize << cfg.log_rq) * rq_stride < WQEBB {
            rq_stride *= 2;
        }
        let log_rq_stride = (rq_stride / DS).trailing_zeros();
        // An SRQ-attached QP has no RQ of its own: the SQ starts at 0.
        let sq_offset = if cfg.srq.is_some() {
            0
        } else {
            (1usize << cfg.log_rq) * rq_stride
        };
        let len = sq_offset + (1usize << cfg.log_sq) * WQEBB;
        let buf = hca.alloc_dma(len)?;
        let dbr = match hca.alloc_dma(4096) {
            Ok(d) => d,
            Err(e) => {
                hca.free_dma(buf)?;
                return Err(e.into());
            }
        };
        let mut c = QpContext::default();
        c.set(qpc::ST, cfg.st as u32)
            .set(qpc::PM_STATE, 3)
            .set(qpc::PD, cfg.pd.unwrap_or(hca.pd()))
            .set(qpc::BLOCK_LB_MC, u32::from(cfg.block_mc_loopback))
            .set(qpc::LOG_RQ_SIZE, u32::from(cfg.log_rq))
            .set(qpc::LOG_RQ_STRIDE, log_rq_stride)
            .set(qpc::LOG_SQ_SIZE, u32::from(cfg.log_sq))
            .set(qpc::RLKY, 1)
            .set(qpc::UAR_PAGE, hca.uar())
            .set(qpc::USER_INDEX, 0xFF_FFFF)
            .set(qpc::LOG_PAGE_SIZE, 0)
            .set(qpc::FRE, 1)
            .set(qpc::CQN_SND, cfg.send_cq)
            .set(qpc::CQN_RCV, cfg.recv_cq)
            .set(qpc::PKEY_INDEX, u32::from(cfg.pkey_index))
            .set(qpc::VHCA_PORT_NUM, u32::from(cfg.port))
            .set(qpc::Q_KEY, cfg.qkey)
            .set(qpc::LOG_ACK_REQ_FREQ, 8)
            .set_dbr(dbr.iova());
        if cfg.offload {
            c.set(qpc::ULP_OFFLOAD_MODE, 1);
        }
        if let Some(srqn) = cfg.srq {
            c.set(qpc::RQ_TYPE, 1)
                .set(qpc::SRQN, srqn)
                .set(qpc::LOG_RQ_SIZE, 0)
                .set(qpc::LOG_RQ_STRIDE, 0);
        }
        let (mtu, log_msg) = match cfg.st {
            ServiceType::Gsi => (1, 8),
            ServiceType::Rc => (5, hca.caps().get(crate::layout::caps::field::LOG_MAX_MSG)),
            ServiceType::Ud => (5, 12),
        };
        c.set(qpc::MTU, mtu).set(qpc::LOG_MSG_MAX, log_msg);
        let pas = (0..len.div_ceil(4096))
            .map(|k| buf.iova_at(k * 4096))
            .collect();
        let qpn = match hca.exec(&CreateQp {
            qpc: c.clone(),
            pas,
        }) {
            Ok(q) => q,
            Err(e) => {
                hca.free_dma(buf)?;
                hca.free_dma(dbr)?;
                return Err(e.into());
            }
        };
        let bf_size = 1u32
            << hca
                .caps()
                .get(crate::layout::caps::field::LOG_BF_REG_SIZE)
                .clamp(6, 11);
        // Single-buffer receives only write their data segment when every
        // WQE's second segment already is the terminator.
        let terminator = hca.terminator_lkey();
        let rq_uniform = cfg.srq.is_none() && rq_stride > DS;
        if rq_uniform {
            for slot in 0..(1usize << cfg.log_rq) {
                buf.write_be64(slot * rq_stride + DS, u64::from(terminator));
            }
        }
        Ok(Qp {
            qpn,
            buf,
            dbr,
            sq: SqRing::new(cfg.log_sq),
            rq: RqRing::new(cfg.log_rq),
            rq_stride,
            sq_offset,
            rq_sge: usize::from(cfg.rq_sge),
            rq_uniform,
            offload: cfg.offload,
            uar: hca.uar(),
            bf_offset: 0,
            bf_half: bf_size / 2,
            last_ctrl: None,
            wqe_bbs: vec![1; 1usize << cfg.log_sq],
            terminator,
            qpc: c,
            state: QpState::Reset,
        })
    }

    /// The QP number.
    pub fn qpn(&self) -> u32 {
        self.qpn
    }

    /// The driver's view of the state.
    pub fn state(&self) -> QpState {
        self.state
    }

    fn modify<T: Transport>(
        &mut self,
        hca: &mut Hca<T>,
        t: Transition,
        opt_mask: u32,
    ) -> Result<(), HcaError> {
        hca.exec(&ModifyQp {
            transition: t,
            qpn: self.qpn,
            opt_mask,
            qpc: self.qpc.clone(),
        })?;
        Ok(())
    }

    /// RESET → INIT → RTR → RTS for a UD or GSI QP (§4.12 table).
    pub fn activate_datagram<T: Transport>(&mut self, hca: &mut Hca<T>) -> Result<(), HcaError> {
        self.modify(hca, Transition::Rst2Init, 0)?;
        self.state = QpState::Init;
        self.modify(hca, Transition::Init2Rtr, opt::PKEY_INDEX | opt::Q_KEY)?;
        self.state = QpState::Rtr;
        self.qpc.set(qpc::NEXT_SEND_PSN, 0);
        self.modify(hca, Transition::Rtr2Rts, opt::Q_KEY)?;
        self.state = QpState::Rts;
        Ok(())
    }

    /// RESET → INIT → RTR → RTS for an RC QP connected along `p`.
    pub fn connect_rc<T: Transport>(
        &mut self,
        hca: &mut Hca<T>,
        p: &RcPath,
    ) -> Result<(), HcaError> {
        self.modify(hca, Transition::Rst2Init, 0)?;
        self.state = QpState::Init;
        self.qpc
            .set(qpc::MTU, u32::from(p.mtu))
            .set(qpc::REMOTE_QPN, p.remote_qpn)
            .set(qpc::NEXT_RCV_PSN, p.rq_psn & 0xFF_FFFF)
            .set(qpc::MIN_RNR_NAK, u32::from(p.min_rnr_nak))
            .set(qpc::RLID, u32::from(p.dlid))
            .set(qpc::SL, u32::from(p.sl));
        self.modify(hca, Transition::Init2Rtr, 0)?;
        self.state = QpState::Rtr;
        self.qpc
            .set(qpc::ACK_TIMEOUT, u32::from(p.ack_timeout))
            .set(qpc::RETRY_COUNT, u32::from(p.retry_count))
            .set(qpc::RNR_RETRY, u32::from(p.rnr_retry))
            .set(qpc::NEXT_SEND_PSN, p.sq_psn & 0xFF_FFFF);
        self.modify(hca, Transition::Rtr2Rts, 0)?;
        self.state = QpState::Rts;
        Ok(())
    }

    /// Writes an RC SEND (SEND with immediate when `imm` is given).
    pub fn post_send_rc(
        &mut self,
        sges: &[Sge],
        signaled: bool,
        imm: Option<u32>,
    ) -> Result<u16, PostError> {
        let ds = 1 + sges.len();
        if ds > 63 {
            return Err(PostError::TooManySegments);
        }
        let bbs = ds.div_ceil(4) as u16;
        let mut w = [0u8; 16 * WQEBB];
        let flags = if signaled { wqe::CQ_UPDATE } else { 0 };
        let (op, imm) = match imm {
            Some(v) => (wqe::op::SEND_IMM, v),
            None => (wqe::op::SEND, 0),
        };
        wqe::ctrl(&mut w, op, self.sq.pc(), self.qpn, ds as u8, flags, imm);
        for (k, s) in sges.iter().enumerate() {
            wqe::data(&mut w[16 + k * DS..], s.len, s.lkey, s.addr);
        }
        self.write_wqe(&w, bbs)
    }

    fn write_wqe(&mut self, w: &[u8], bbs: u16) -> Result<u16, PostError> {
        let idx = self.sq.claim(bbs).ok_or(PostError::Full)?;
        let mask = usize::from(self.sq.len()) - 1;
        self.wqe_bbs[usize::from(idx) & mask] = bbs as u8;
        for b in 0..usize::from(bbs) {
            let slot = usize::from(idx.wrapping_add(b as u16)) & mask;
            let mut image = [0u8; WQEBB];
            image.copy_from_slice(&w[b * WQEBB..(b + 1) * WQEBB]);
            match self.buf.block(self.sq_offset + slot * WQEBB) {
                Some(blk) => blk.write_all(&image),
                None => return Err(PostError::Full),
            }
        }
        let mut c = [0u8; 8];
        c.copy_from_slice(&w[..8]);
        self.last_ctrl = Some(c);
        Ok(idx)
    }

    /// Sets a new Q_Key with RTS2RTS.
    pub fn set_qkey<T: Transport>(&mut self, hca: &mut Hca<T>, qkey: u32) -> Result<(), HcaError> {
        self.qpc.set(qpc::Q_KEY, qkey);
        self.modify(hca, Transition::Rts2Rts, opt::Q_KEY)
    }

    /// Moves the QP to ERR: outstanding WQEs complete as flushed.
    pub fn to_error<T: Transport>(&mut self, hca: &mut Hca<T>) -> Result<(), HcaError> {
        hca.exec(&QpToErr(self.qpn))?;
        self.state = QpState::Error;
        Ok(())
    }

    /// Moves the QP to RESET and forgets all posted work.
    pub fn reset<T: Transport>(&mut self, hca: &mut Hca<T>) -> Result<(), HcaError> {
        hca.exec(&QpToRst(self.qpn))?;
        self.state = QpState::Reset;
        self.sq = SqRing::new(self.sq.len().trailing_zeros() as u8);
        self.rq = RqRing::new(self.rq.len().trailing_zeros() as u8);
        self.dbr.write(0, &[0; 8]);
        Ok(())
    }

    /// Attaches to a multicast group.
    pub fn attach<T: Transport>(&self, hca: &mut Hca<T>, mgid: [u8; 16]) -> Result<(), HcaError> {
        hca.exec(&AttachMcg {
            qpn: self.qpn,
            mgid,
        })?;
        Ok(())
    }

    /// Detaches from a multicast group.
    pub fn detach<T: Transport>(&self, hca: &mut Hca<T>, mgid: [u8; 16]) -> Result<(), HcaError> {
        hca.exec(&DetachMcg {
            qpn: self.qpn,
            mgid,
        })?;
        Ok(())
    }

    /// Writes a UD SEND of `sges` to `av` into the SQ (not yet rung).
    /// Returns the WQE index (for matching the requester CQE).
    pub fn post_send_ud(
        &mut self,
        av: &AddressVector,
        sges: &[Sge],
        signaled: bool,
    ) -> Result<u16, PostError> {
        if self.offload {
            return self.post_send_ud_offload(av, sges, signaled, &TxOffload::default());
        }
        self.post_send_ah(&wqe::AddressHandle::new(av), sges, signaled)
    }

    /// Writes a UD SEND of `sges` to a destination encoded once in `ah`.
    /// The datapath's send: with one buffer it is ten 64-bit stores.
    pub fn post_send_ah(
        &mut self,
        ah: &wqe::AddressHandle,
        sges: &[Sge],
        signaled: bool,
    ) -> Result<u16, PostError> {
        if self.offload {
            return Err(PostError::TooManySegments);
        }
        let ds = 4 + sges.len();
        if ds > 63 {
            return Err(PostError::TooManySegments);
        }
        let bbs = ds.div_ceil(4) as u16;
        let flags = u64::from(if signaled { wqe::CQ_UPDATE } else { 0 });
        let idx = self.sq.claim(bbs).ok_or(PostError::Full)?;
        let mask = usize::from(self.sq.len()) - 1;
        self.wqe_bbs[usize::from(idx) & mask] = bbs as u8;
        let w0 = (u64::from((u32::from(idx) << 8) | u32::from(wqe::op::SEND)) << 32)
            | u64::from((self.qpn << 8) | ds as u32);
        let block = |n: usize| {
            self.buf
                .block(self.sq_offset + (usize::from(idx).wrapping_add(n) & mask) * WQEBB)
        };
        let Some(b0) = block(0) else {
            return Err(PostError::Full);
        };
        b0.set_be64(0, w0);
        b0.set_be64(8, flags << 32);
        for (k, w) in ah.images().iter().enumerate() {
            b0.set_image64(16 + 8 * k, *w);
        }
        // Data segments: four per following basic block.
        for (k, s) in sges.iter().enumerate() {
            let Some(b) = block(1 + k / 4) else {
                return Err(PostError::Full);
            };
            let o = (k % 4) * DS;
            b.set_be64(
                o,
                (u64::from(s.len & 0x7FFF_FFFF) << 32) | u64::from(s.lkey),
            );
            b.set_be64(o + 8, s.addr);
        }
        self.last_ctrl = Some(w0.to_be_bytes());
        Ok(idx)
    }

    /// Most bytes [`Qp::post_send_inline`] carries in the WQE.
    pub const MAX_INLINE: usize = 256;

    /// A UD SEND whose payload travels inside the WQE (§7.6 inline data
    /// segment): for small packets (ARP, MADs) no buffer has to stay alive
    /// until completion.
    pub fn post_send_inline(
        &mut self,
        ah: &wqe::AddressHandle,
        data: &[u8],
        signaled: bool,
    ) -> Result<u16, PostError> {
        if data.len() > Self::MAX_INLINE || self.offload {
            return Err(PostError::TooManySegments);
        }
        let seg = (4 + data.len()).next_multiple_of(DS);
        let ds = 4 + seg / DS;
        let bbs = ds.div_ceil(4) as u16;
        // Room for MAX_INLINE: 64 + align16(4 + 256) = 336 bytes, six blocks.
        let mut w = [0u8; 6 * WQEBB];
        let flags = if signaled { wqe::CQ_UPDATE } else { 0 };
        wqe::ctrl(
            &mut w,
            wqe::op::SEND,
            self.sq.pc(),
            self.qpn,
            ds as u8,
            flags,
            0,
        );
        for (k, word) in ah.words().iter().enumerate() {
            w[16 + 8 * k..24 + 8 * k].copy_from_slice(&word.to_be_bytes());
        }
        w[64..68].copy_from_slice(&(wqe::INLINE_FLAG | data.len() as u32).to_be_bytes());
        w[68..68 + data.len()].copy_from_slice(data);
        self.write_wqe(&w[..usize::from(bbs) * WQEBB], bbs)
    }

    /// A UD send on an offload-mode QP: checksums and LSO done by the HCA.
    pub fn post_send_ud_offload(
        &mut self,
        av: &AddressVector,
        sges: &[Sge],
        signaled: bool,
        off: &TxOffload<'_>,
    ) -> Result<u16, PostError> {
        let mut w = [0u8; 16 * WQEBB];
        let cs_flags = (if off.l3_csum { wqe::cs::L3 } else { 0 })
            | (if off.l4_csum { wqe::cs::L4 } else { 0 });
        let (mss, inline) = off.lso.unwrap_or((0, &[]));
        if inline.len() > 256 {
            return Err(PostError::TooManySegments);
        }
        let eth = wqe::pad_and_eth(&mut w[64..], cs_flags, mss, inline);
        let first_data = 64 + eth;
        let ds = first_data / DS + sges.len();
        if ds > 63 || (!self.offload && off != &TxOffload::default()) {
            return Err(PostError::TooManySegments);
        }
        let op = if off.lso.is_some() {
            wqe::op::LSO
        } else {
            wqe::op::SEND
        };
        let flags = if signaled { wqe::CQ_UPDATE } else { 0 };
        wqe::ctrl(&mut w, op, self.sq.pc(), self.qpn, ds as u8, flags, 0);
        wqe::datagram(&mut w[16..64], av);
        for (k, s) in sges.iter().enumerate() {
            wqe::data(&mut w[first_data + k * DS..], s.len, s.lkey, s.addr);
        }
        self.write_wqe(&w, ds.div_ceil(4) as u16)
    }

    /// Publishes posted sends: doorbell record, then the 64-bit doorbell
    /// with the last WQE's first 8 bytes (§7.9).
    pub fn ring_sq(&mut self, t: &dyn Transport) {
        let Some(c) = self.last_ctrl.take() else {
            return;
        };
        dma_wmb();
        self.dbr.write_be32(4, u32::from(self.sq.pc()));
        dma_wmb();
        let off = self.uar * regs::UAR_PAGE + regs::UAR_BF + self.bf_offset;
        t.bar_write64(off, u64::from_be_bytes(c));
        self.bf_offset ^= self.bf_half;
    }

    /// Writes a receive WQE (not yet published).
    pub fn post_recv(&mut self, sges: &[Sge]) -> Result<(), PostError> {
        if sges.len() > self.rq_sge || sges.len() >= 8 {
            return Err(PostError::TooManySegments);
        }
        let slot = self.rq.claim().ok_or(PostError::Full)?;
        let base = slot * self.rq_stride;
        // Data segments (§7.6) as two 64-bit words each, then the terminator.
        let seg = |s: &Sge| {
            [
                (u64::from(s.len & 0x7FFF_FFFF) << 32) | u64::from(s.lkey),
                s.addr,
            ]
        };
        let term = [u64::from(self.terminator), 0];
        if let [s] = sges
            && self.rq_stride <= WQEBB
            && let Some(blk) = self.buf.block(base & !(WQEBB - 1))
        {
            // The common single-buffer receive: four stores in one block
            // (strides up to 64 bytes never straddle one).
            let [a, b] = seg(s);
            let o = base & (WQEBB - 1);
            blk.set_be64(o, a);
            blk.set_be64(o + 8, b);
            if self.rq_stride > DS && !self.rq_uniform {
                blk.set_be64(o + 16, term[0]);
                blk.set_be64(o + 24, term[1]);
            }
            return Ok(());
        }
        // A WQE with another shape moves terminators: rewrite them from now on.
        self.rq_uniform = false;
        let mut w = [0u64; 2 * 8];
        for (k, s) in sges.iter().enumerate() {
            w[2 * k..2 * k + 2].copy_from_slice(&seg(s));
        }
        let mut n = 2 * sges.len();
        if sges.len() * DS < self.rq_stride {
            w[n..n + 2].copy_from_slice(&term);
            n += 2;
        }
        self.buf.write_be64s(base, &w[..n]);
        Ok(())
    }

    /// Publishes posted receives (record only; no MMIO doorbell for RQs).
    pub fn ring_rq(&mut self) {
        dma_wmb();
        self.dbr.write_be32(0, u32::from(self.rq.head()));
    }

    /// A send completion for the WQE at `wqe_index` arrived: it and every
    /// WQE before it are done.
    pub fn send_done(&mut self, wqe_index: u16) {
        let slot = usize::from(wqe_index) & (usize::from(self.sq.len()) - 1);
        let bbs = u16::from(self.wqe_bbs[slot]);
        self.sq.complete(wqe_index, bbs);
    }

    /// A receive completion arrived (RQ WQEs complete in order).
    pub fn recv_done(&mut self) {
        self.rq.complete();
    }

    /// Receive WQEs posted and not yet completed.
    pub fn recv_outstanding(&self) -> u16 {
        self.rq.outstanding()
    }

    /// Free send basic blocks.
    pub fn send_free(&self) -> u16 {
        self.sq.free()
    }

    /// Destroys the QP and frees its memory.
    pub fn destroy<T: Transport>(self, hca: &mut Hca<T>) -> Result<(), HcaError> {
        hca.exec(&DestroyQp(self.qpn))?;
        hca.free_dma(self.buf)?;
        hca.free_dma(self.dbr)?;
        Ok(())
    }
}

/// A shared receive queue (an RMP with a linked-list WQ, §7.7).
#[derive(Debug)]
pub struct Srq {
    rmpn: u32,
    /// Created with CREATE_RMP (ISSI 1) or CREATE_SRQ (ISSI 0).
    rmp: bool,
    buf: DmaBuffer,
    dbr: DmaBuffer,
    stride: usize,
    size: u16,
    head: u16,
    tail: u16,
    posted: u16,
    max_sge: usize,
    terminator: u32,
}

impl Srq {
    /// Creates an SRQ of `1 << log_size` WQEs with up to `max_sge` entries each.
    pub fn create<T: Transport>(
        hca: &mut Hca<T>,
        log_size: u8,
        max_sge: u8,
        lwm: u16,
    ) -> Result<Srq, HcaError> {
        let log_size = log_size.clamp(1, 16);
        let stride = (DS + (usize::from(max_sge) + 1) * DS)
            .next_power_of_two()
            .max(32);
        let size = 1u16 << log_size.min(15);
        let len = usize::from(size) * stride;
        let buf = hca.alloc_dma(len)?;
        for i in 0..size {
            let next = (i + 1) % size;
            buf.write(usize::from(i) * stride + 2, &next.to_be_bytes());
        }
        let dbr = match hca.alloc_dma(4096) {
            Ok(d) => d,
            Err(e) => {
                hca.free_dma(buf)?;
                return Err(e.into());
            }
        };
        // Under ISSI 1 Linux uses RMPs; ISSI 0 firmware has only SRQs.
        let rmp = hca.info().issi >= 1;
        let pas: Vec<_> = (0..len.div_ceil(4096))
            .map(|k| buf.iova_at(k * 4096))
            .collect();
        let created = if rmp {
            hca.exec(&crate::cmd::srq::CreateRmp {
                pd: hca.pd(),
                log_size,
                log_stride: stride.trailing_zeros() as u8,
                lwm,
                dbr: dbr.iova(),
                pas,
            })
        } else {
            hca.exec(&crate::cmd::srq::CreateSrq {
                pd: hca.pd(),
                log_size,
                log_rq_stride: (stride / DS).trailing_zeros() as u8,
                lwm,
                dbr: dbr.iova(),
                pas,
            })
        };
        match created {
            Ok(rmpn) => Ok(Srq {
                rmpn,
                rmp,
                buf,
                dbr,
                stride,
                size,
                head: 0,
                tail: size - 1,
                posted: 0,
                max_sge: usize::from(max_sge),
                terminator: hca.terminator_lkey(),
            }),
            Err(e) => {
                hca.free_dma(buf)?;
                hca.free_dma(dbr)?;
                Err(e.into())
            }
        }
    }

    /// The RMP number (for `QpConfig::srq`).
    pub fn rmpn(&self) -> u32 {
        self.rmpn
    }

    fn next_of(&self, i: u16) -> u16 {
        let mut b = [0u8; 2];
        self.buf.read(usize::from(i) * self.stride + 2, &mut b);
        u16::from_be_bytes(b) % self.size
    }

    /// Writes a receive WQE; returns its index (the CQE's `wqe_counter`).
    pub fn post_recv(&mut self, sges: &[Sge]) -> Result<u16, PostError> {
        if sges.len() > self.max_sge {
            return Err(PostError::TooManySegments);
        }
        if self.head == self.tail {
            return Err(PostError::Full);
        }
        let idx = self.head;
        let base = usize::from(idx) * self.stride;
        let mut w = [0u8; 2048];
        for (k, s) in sges.iter().enumerate() {
            wqe::data(&mut w[k * DS..], s.len, s.lkey, s.addr);
        }
        wqe::data(&mut w[sges.len() * DS..], 0, self.terminator, 0);
        self.buf.write(base + DS, &w[..self.stride - DS]);
        self.head = self.next_of(idx);
        self.posted = self.posted.wrapping_add(1);
        Ok(idx)
    }

    /// Publishes posted WQEs.
    pub fn ring(&mut self) {
        dma_wmb();
        self.dbr.write_be32(0, u32::from(self.posted));
    }

    /// Returns WQE `idx` (from a receive CQE) to the free list.
    pub fn recv_done(&mut self, idx: u16) {
        let idx = idx % self.size;
        self.buf
            .write(usize::from(self.tail) * self.stride + 2, &idx.to_be_bytes());
        self.tail = idx;
    }

    /// Re-arms the limit event.
    pub fn arm_limit<T: Transport>(&self, hca: &mut Hca<T>, lwm: u16) -> Result<(), HcaError> {
        if self.rmp {
            hca.exec(&crate::cmd::srq::ModifyRmpLwm {
                rmpn: self.rmpn,
                lwm,
            })?;
        } else {
            hca.exec(&crate::cmd::srq::ArmSrq {
                srqn: self.rmpn,
                lwm,
            })?;
        }
        Ok(())
    }

    /// Destroys the SRQ.
    pub fn destroy<T: Transport>(self, hca: &mut Hca<T>) -> Result<(), HcaError> {
        if self.rmp {
            hca.exec(&crate::cmd::srq::DestroyRmp(self.rmpn))?;
        } else {
            hca.exec(&crate::cmd::srq::DestroySrq(self.rmpn))?;
        }
        hca.free_dma(self.buf)?;
        hca.free_dma(self.dbr)?;
        Ok(())
    }
}
