//! Completion queues, queue pairs and multicast attachments on the device
//! side (reference §4.11–4.14, §6, §7, §9.2): the commands that create
//! them, the send queue executed when its doorbell rings, and the receive
//! path that places incoming packets and writes CQEs.
//!
//! Everything the driver handed over is read through the model IOMMU, and
//! every check the device makes fails the way the reference says it does:
//! a bad lkey or an unmapped address is a local protection (0x04) or local
//! access (0x11) error CQE and moves the QP to ERR; a receive larger than
//! the posted buffers is a local length error (0x01); P_Key and Q_Key
//! mismatches are dropped and counted in the port's violation counters.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::bytes::{dword, field, qword, set_dword, set_word};
use crate::fw::{Effects, Fail, Firmware, Reason, fail, status};
use crate::iommu::Iommu;
use crate::port::state as port_state;
use crate::wire::{self, GrhFields, Headers};

/// qpc position inside CREATE_QP and the transitions.
const QPC: usize = 0x18;
/// The well-known QP1 Q_Key.
pub const GSI_QKEY: u32 = 0x8001_0000;
/// Reserved lkey reported by QUERY_SPECIAL_CONTEXTS.
pub const RESD_LKEY: u32 = 0x0000_0500;

/// Datapath counters of the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DpStats {
    /// Packets sent.
    pub tx_packets: u64,
    /// Packets received and placed.
    pub rx_packets: u64,
    /// Packets dropped for a bad ICRC/VCRC or length.
    pub rx_bad_crc: u64,
    /// Packets dropped: P_Key mismatch.
    pub rx_pkey_drops: u64,
    /// Packets dropped: Q_Key mismatch.
    pub rx_qkey_drops: u64,
    /// Packets dropped: no receive WQE posted (UD).
    pub rx_no_wqe: u64,
    /// Packets dropped: no such QP, wrong DLID, QP not ready.
    pub rx_no_target: u64,
    /// Packets not sent because the port is not Active.
    pub tx_port_down: u64,
    /// Error CQEs written.
    pub error_cqes: u64,
    /// CQEs lost to a full CQ.
    pub cq_overruns: u64,
    /// Doorbells naming no QP or CQ.
    pub stray_doorbells: u64,
    /// RC packets sent again (timeouts, NAKs, RNR).
    pub rc_retransmits: u64,
}

/// A CQ as the device keeps it.
#[derive(Debug, Clone)]
pub struct SimCq {
    pub(crate) log_size: u8,
    pub(crate) uar: u32,
    pub(crate) eqn: u32,
    pas: Vec<u64>,
    page_size: u64,
    pub(crate) dbr: u64,
    pc: u32,
    armed: Option<u32>,
    period: u32,
    max_count: u32,
    /// Eligible CQEs since the CQ was armed (moderation count).
    mod_count: u32,
    /// Moderation timer, started by the first eligible CQE.
    mod_deadline: Option<Instant>,
}

impl SimCq {
    fn moderated(&self) -> bool {
        self.max_count > 1 || self.period > 0
    }

    /// Counts `n` eligible completions; says whether the event is due now.
    fn moderate(&mut self, n: u32, now: Instant) -> bool {
        self.mod_count += n;
        if !self.moderated() || (self.max_count > 0 && self.mod_count >= self.max_count) {
            return true;
        }
        if self.period > 0 && self.mod_deadline.is_none() {
            self.mod_deadline = Some(now + Duration::from_micros(u64::from(self.period)));
        }
        false
    }
}

/// QP states (qpc encoding).
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
    Err,
}

/// A QP as the device keeps it.
#[derive(Debug, Clone)]
pub struct SimQp {
    pub(crate) qpn: u32,
    pub(crate) st: u8,
    pub(crate) state: QpState,
    pub(crate) pd: u32,
    pub(crate) uar: u32,
    pub(crate) rlky: bool,
    pub(crate) cqn_snd: u32,
    pub(crate) cqn_rcv: u32,
    pub(crate) log_rq: u8,
    pub(crate) rq_stride: usize,
    pub(crate) log_sq: u8,
    pub(crate) sq_offset: usize,
    pas: Vec<u64>,
    page_size: u64,
    pub(crate) dbr: u64,
    pub(crate) pkey_index: u16,
    qkey: u32,
    deth_sqpn: u32,
    block_lb_mc: bool,
    pub(crate) mtu: u8,
    pub(crate) sq_ci: u16,
    pub(crate) rq_ci: u16,
    psn: u32,
    /// SRQ/RMP the QP receives from, if any.
    pub(crate) srqn: Option<u32>,
    /// ulp_stateless_offload_mode.
    offload: u8,
    /// RC connection state (st 0 only).
    pub(crate) rc: Option<Box<crate::rc::RcState>>,
}

impl SimQp {
    fn buf_addr(&self, off: usize) -> Option<u64> {
        let page = usize::try_from(off as u64 / self.page_size).ok()?;
        Some(self.pas.get(page)? + off as u64 % self.page_size)
    }

    pub(crate) fn read(&self, iommu: &Iommu, off: usize, out: &mut [u8]) -> bool {
        // Buffers are page lists; read piecewise so page boundaries work.
        let mut done = 0;
        while done < out.len() {
            let at = off + done;
            let in_page = (self.page_size - at as u64 % self.page_size) as usize;
            let n = in_page.min(out.len() - done);
            let Some(a) = self.buf_addr(at) else {
                return false;
            };
            if iommu.read(a, &mut out[done..done + n]).is_err() {
                return false;
            }
            done += n;
        }
        true
    }
}

/// A gather/scatter entry as the device sees it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Seg {
    pub(crate) len: u32,
    pub(crate) lkey: u32,
    pub(crate) addr: u64,
}

/// How a work request failed (error CQE syndrome, §6.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WcError {
    LocalLength = 0x01,
    LocalQpOp = 0x02,
    LocalProtection = 0x04,
    Flushed = 0x05,
    LocalAccess = 0x11,
    RemoteInvalidRequest = 0x12,
    RemoteAccess = 0x13,
    RemoteOp = 0x14,
    RetryExceeded = 0x15,
    RnrRetryExceeded = 0x16,
}

impl Firmware {
    /// CQ, QP and multicast commands.
    pub(crate) fn queue_command(
        &mut self,
        iommu: &Iommu,
        op: u16,
        op_mod: u16,
        i: &[u8],
        o: &mut [u8],
    ) -> Result<(), Fail> {
        use status::*;
        match op {
            0x400 => {
                const CQC: usize = 0x10;
                let log_size = field(i, CQC + 0x0C, 28, 24) as u8;
                let uar = field(i, CQC + 0x0C, 23, 0);
                let eqn = field(i, CQC + 0x14, 31, 0);
                let log_page = field(i, CQC + 0x18, 28, 24).min(20);
                if field(i, CQC, 23, 21) != 0 {
                    // Only 64-byte CQEs are modelled.
                    return Err(fail(op, BAD_PARAM, Reason::BadQueueSize));
                }
                if log_size == 0
                    || u32::from(log_size)
                        > crate::caps::get(&self.caps_cur, crate::caps::f::LOG_MAX_CQ_SZ)
                {
                    return Err(fail(op, BAD_PARAM, Reason::BadQueueSize));
                }
                if !self.uars.contains(&uar) || eqn > 0xFF || !self.eqs.contains_key(&(eqn as u8)) {
                    return Err(fail(op, BAD_RES, Reason::UnknownObject));
                }
                let page_size = 4096u64 << log_page;
                let bytes = 64u64 << log_size;
                let pas = crate::fw::queue_pages(iommu, op, i, page_size, bytes)?;
                let dbr = qword(i, CQC + 0x38);
                crate::fw::record_ok(iommu, op, dbr, 8)?;
                let cqn = self.next_cqn;
                self.next_cqn = (self.next_cqn + 1) & 0xFF_FFFF;
                self.cqs.insert(
                    cqn,
                    SimCq {
                        log_size,
                        uar,
                        eqn,
                        pas,
                        page_size,
                        dbr,
                        pc: 0,
                        armed: None,
                        period: field(i, CQC + 0x10, 27, 16),
                        max_count: field(i, CQC + 0x10, 15, 0),
                        mod_count: 0,
                        mod_deadline: None,
                    },
                );
                crate::bytes::set_field(o, 0x08, 23, 0, cqn);
            }
            0x401 => {
                let cqn = field(i, 0x08, 23, 0);
                if !self.cqs.contains_key(&cqn) {
                    return Err(fail(op, BAD_RES, Reason::UnknownObject));
                }
                if self
                    .qps
                    .values()
                    .any(|q| q.cqn_snd == cqn || q.cqn_rcv == cqn)
                {
                    return Err(fail(op, RES_BUSY, Reason::ObjectInUse));
                }
                self.cqs.remove(&cqn);
            }
            0x403 => {
                if op_mod != 0 {
                    return Err(fail(op, BAD_OP, Reason::BadOpMod));
                }
                let cqn = field(i, 0x08, 23, 0);
                let select = dword(i, 0x0C);
                let cq = self
                    .cqs
                    .get_mut(&cqn)
                    .ok_or(fail(op, BAD_RES, Reason::UnknownObject))?;
                if select & 1 != 0 {
                    cq.period = field(i, 0x10 + 0x10, 27, 16);
                }
                if select & 2 != 0 {
                    cq.max_count = field(i, 0x10 + 0x10, 15, 0);
                }
            }
            0x500 => self.create_qp(iommu, op, i, o)?,
            0x501 => {
                let qpn = field(i, 0x08, 23, 0);
                if self.qps.remove(&qpn).is_none() {
                    return Err(fail(op, BAD_RES, Reason::UnknownObject));
                }
                for members in self.mcgs.values_mut() {
                    members.remove(&qpn);
                }
                self.mcgs.retain(|_, m| !m.is_empty());
            }
            0x502..=0x505 | 0x507 | 0x50A => self.modify_qp(iommu, op, i)?,
            0x806 | 0x807 => {
                let qpn = field(i, 0x08, 23, 0);
                let mut mgid = [0u8; 16];
                mgid.copy_from_slice(&i[0x10..0x20]);
                match self.qps.get(&qpn) {
                    Some(q) if q.st == 0x2 => {}
                    Some(_) => return Err(fail(op, BAD_PARAM, Reason::BadServiceType)),
                    None => return Err(fail(op, BAD_RES, Reason::UnknownObject)),
                }
                if mgid[0] != 0xFF {
                    return Err(fail(op, BAD_PARAM, Reason::BadCapValue));
                }
                if op == 0x806 {
                    self.mcgs.entry(mgid).or_default().insert(qpn);
                } else {
                    let removed = self.mcgs.get_mut(&mgid).is_some_and(|m| m.remove(&qpn));
                    if !removed {
                        return Err(fail(op, BAD_PARAM, Reason::UnknownObject));
                    }
                    self.mcgs.retain(|_, m| !m.is_empty());
                }
            }
            _ => return Err(fail(op, BAD_OP, Reason::UnknownOpcode)),
        }
        Ok(())
    }

    fn create_qp(&mut self, iommu: &Iommu, op: u16, i: &[u8], o: &mut [u8]) -> Result<(), Fail> {
        use status::*;
        let c = &i[QPC..];
        let st = field(c, 0x00, 23, 16) as u8;
        if !matches!(st, 0x0 | 0x2 | 0x8) {
            return Err(fail(op, BAD_PARAM, Reason::BadServiceType));
        }
        if st == 0x8 && self.qps.values().any(|q| q.st == 0x8) {
            return Err(fail(op, BAD_PARAM, Reason::BadServiceType));
        }
        let pd = field(c, 0x04, 23, 0);
        let uar = field(c, 0x0C, 23, 0);
        let offload = field(c, 0x08, 3, 0) as u8;
        let basic = crate::caps::get(&self.caps_cur, crate::caps::f::IPOIB_BASIC_OFFLOADS) == 1;
        if offload > 1 || (offload == 1 && (st != 0x2 || !basic)) {
            // Enhanced IPoIB (mode 2) is not modelled.
            return Err(fail(op, BAD_PARAM, Reason::BadServiceType));
        }
        let cqn_snd = field(c, 0x7C, 23, 0);
        let cqn_rcv = field(c, 0x9C, 23, 0);
        if !self.pds.contains(&pd) || !self.uars.contains(&uar) {
            return Err(fail(op, BAD_RES, Reason::UnknownObject));
        }
        if !self.cqs.contains_key(&cqn_snd) || !self.cqs.contains_key(&cqn_rcv) {
            return Err(fail(op, BAD_RES, Reason::UnknownObject));
        }
        let srqn = match field(c, 0xAC, 26, 24) {
            0 => None,
            1 => {
                let n = field(c, 0xAC, 23, 0);
                if !self.srqs.contains_key(&n) {
                    return Err(fail(op, BAD_RES, Reason::UnknownObject));
                }
                Some(n)
            }
            _ => return Err(fail(op, BAD_PARAM, Reason::BadQueueSize)),
        };
        let (log_rq, rq_stride) = if srqn.is_some() {
            (0, 0)
        } else {
            (
                field(c, 0x08, 22, 19) as u8,
                16usize << field(c, 0x08, 18, 16),
            )
        };
        let no_sq = field(c, 0x08, 15, 15) == 1;
        let log_sq = field(c, 0x08, 14, 11) as u8;
        let max = crate::caps::get(&self.caps_cur, crate::caps::f::LOG_MAX_QP_SZ);
        if u32::from(log_rq) > max || u32::from(log_sq) > max {
            return Err(fail(op, BAD_PARAM, Reason::BadQueueSize));
        }
        let page_size = 4096u64 << field(c, 0x14, 28, 24).min(20);
        let sq_offset = if srqn.is_some() {
            0
        } else {
            (1usize << log_rq) * rq_stride
        };
        let bytes = sq_offset + if no_sq { 0 } else { (1usize << log_sq) * 64 };
        let pas = crate::fw::queue_pages(iommu, op, i, page_size, bytes as u64)?;
        let dbr = qword(c, 0xA0);
        crate::fw::record_ok(iommu, op, dbr, 8)?;
        let qpn = self.next_qpn;
        self.next_qpn = (self.next_qpn + 1) & 0xFF_FFFF;
        self.qps.insert(
            qpn,
            SimQp {
                qpn,
                st,
                state: QpState::Reset,
                pd,
                uar,
                rlky: field(c, 0x08, 4, 4) == 1,
                cqn_snd,
                cqn_rcv,
                log_rq,
                rq_stride,
                log_sq,
                sq_offset,
                pas,
                page_size,
                dbr,
                pkey_index: 0,
                qkey: 0,
                deth_sqpn: field(c, 0x80, 23, 0),
                block_lb_mc: field(c, 0x04, 30, 30) == 1,
                mtu: field(c, 0x08, 31, 29) as u8,
                sq_ci: 0,
                rq_ci: 0,
                psn: 0,
                srqn,
                offload,
                rc: (st == 0).then(Box::default),
            },
        );
        crate::bytes::set_field(o, 0x08, 23, 0, qpn);
        Ok(())
    }

    fn modify_qp(&mut self, iommu: &Iommu, op: u16, i: &[u8]) -> Result<(), Fail> {
        use status::*;
        let qpn = field(i, 0x08, 23, 0);
        let Some(qp) = self.qps.get(&qpn) else {
            return Err(fail(op, BAD_RES, Reason::UnknownObject));
        };
        let from = qp.state;
        let to = match (op, from) {
            (0x502, QpState::Reset) => QpState::Init,
            (0x503, QpState::Init) => QpState::Rtr,
            (0x504, QpState::Rtr) => QpState::Rts,
            (0x505, QpState::Rts) => QpState::Rts,
            (0x507, _) => QpState::Err,
            (0x50A, _) => QpState::Reset,
            _ => return Err(fail(op, BAD_QP_STATE, Reason::BadQpState)),
        };
        if matches!(op, 0x507 | 0x50A) {
            if op == 0x507 {
                self.qp_to_error(iommu, qpn);
            } else if let Some(q) = self.qps.get_mut(&qpn) {
                q.state = QpState::Reset;
                q.sq_ci = 0;
                q.rq_ci = 0;
            }
            return Ok(());
        }
        if i.len() < QPC + 0xE8 {
            return Err(fail(op, BAD_INP_LEN, Reason::InputTooShort));
        }
        let opt = dword(i, 0x10);
        let c = &i[QPC..];
        let pkey_index = field(c, 0x18, 15, 0) as u16;
        let port = field(c, 0x3C, 23, 16);
        let qkey = dword(c, 0xA8);
        if op == 0x502 || opt & (1 << 4) != 0 {
            if usize::from(pkey_index) >= self.port.pkeys.len() {
                return Err(fail(op, BAD_PARAM, Reason::BadCapValue));
            }
            if op == 0x502 && port != 1 {
                return Err(fail(op, BAD_PARAM, Reason::BadPort));
            }
        }
        let Some(q) = self.qps.get_mut(&qpn) else {
            return Err(fail(op, BAD_RES, Reason::UnknownObject));
        };
        if op == 0x502 {
            q.pkey_index = pkey_index;
            q.qkey = qkey;
        }
        if op != 0x502 && opt & (1 << 4) != 0 {
            q.pkey_index = pkey_index;
        }
        if op != 0x502 && opt & (1 << 5) != 0 {
            q.qkey = qkey;
        }
        if op == 0x504 {
            q.psn = field(c, 0x78, 23, 0);
        }
        if let Some(rc) = q.rc.as_mut() {
            rc.apply(op, opt, c);
        }
        q.state = to;
        Ok(())
    }

    /// Moves a QP to ERR and flushes its outstanding work (§9.2).
    pub(crate) fn qp_to_error(&mut self, iommu: &Iommu, qpn: u32) {
        let Some(q) = self.qps.get_mut(&qpn) else {
            return;
        };
        q.state = QpState::Err;
        let mut flush = Vec::new();
        let mut b = [0u8; 8];
        if iommu.read(q.dbr, &mut b).is_ok() {
            let rq_posted = (dword(&b, 0) & 0xFFFF) as u16;
            let sq_pc = (dword(&b, 4) & 0xFFFF) as u16;
            let mut n = 0;
            while q.srqn.is_none() && q.rq_ci != rq_posted && n < (1u32 << q.log_rq) {
                flush.push((q.cqn_rcv, 0xE, q.rq_ci, 0u8));
                q.rq_ci = q.rq_ci.wrapping_add(1);
                n += 1;
            }
            let mut guard = 0;
            while q.sq_ci != sq_pc && guard < (1u32 << q.log_sq) {
                let slot = usize::from(q.sq_ci) & ((1 << q.log_sq) - 1);
                let mut ctrl = [0u8; 8];
                if !q.read(iommu, q.sq_offset + slot * 64, &mut ctrl) {
                    break;
                }
                let bbs = (dword(&ctrl, 4) & 0x3F).div_ceil(4).max(1) as u16;
                flush.push((q.cqn_snd, 0xD, q.sq_ci, ctrl[3]));
                q.sq_ci = q.sq_ci.wrapping_add(bbs);
                guard += u32::from(bbs);
            }
        }
        let mut fx = Effects::default();
        for (cqn, opcode, counter, wqe_op) in flush {
            self.error_cqe(
                iommu,
                cqn,
                opcode,
                qpn,
                counter,
                wqe_op,
                WcError::Flushed,
                &mut fx,
            );
        }
        self.pending_fx.fire.extend(fx.fire);
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn error_cqe(
        &mut self,
        iommu: &Iommu,
        cqn: u32,
        opcode: u8,
        qpn: u32,
        counter: u16,
        wqe_op: u8,
        e: WcError,
        fx: &mut Effects,
    ) {
        let mut c = [0u8; 64];
        c[0x37] = e as u8;
        set_dword(&mut c, 0x38, (u32::from(wqe_op) << 24) | qpn);
        set_word(&mut c, 0x3C, counter);
        self.dp.error_cqes += 1;
        self.write_cqe(iommu, cqn, opcode, &mut c, true, fx);
    }

    /// Writes a CQE (body first, `op_own` last) and raises the completion
    /// event when the CQ is armed for it.
    pub(crate) fn write_cqe(
        &mut self,
        iommu: &Iommu,
        cqn: u32,
        opcode: u8,
        c: &mut [u8; 64],
        urgent: bool,
        fx: &mut Effects,
    ) {
        let Some(cq) = self.cqs.get_mut(&cqn) else {
            return;
        };
        let size = 1u32 << cq.log_size;
        let mut ci = [0u8; 4];
        let ci = if iommu.read(cq.dbr, &mut ci).is_ok() {
            dword(&ci, 0) & 0xFF_FFFF
        } else {
            0
        };
        if cq.pc.wrapping_sub(ci) & 0xFF_FFFF >= size {
            self.dp.cq_overruns += 1;
            let mut d = [0u8; 28];
            set_dword(&mut d, 0, cqn);
            d[0x0B] = 1; // CQ overrun
            self.post_event(iommu, 0x04, 0, &d, fx);
            return;
        }
        let index = u64::from(cq.pc & (size - 1));
        let byte = index * 64;
        let Some(&page) = cq.pas.get((byte / cq.page_size) as usize) else {
            return;
        };
        let at = page + byte % cq.page_size;
        let owner = ((cq.pc >> cq.log_size) & 1) as u8;
        if iommu.write(at, &c[..0x3F]).is_err() {
            return;
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        let _ = iommu.write(at + 0x3F, &[(opcode << 4) | owner]);
        cq.pc = cq.pc.wrapping_add(1);
        let eligible = match cq.armed {
            Some(0) => true,
            Some(1) => urgent,
            _ => false,
        };
        if eligible && cq.moderate(1, Instant::now()) {
            self.fire_cq(iommu, cqn, fx);
        }
    }

    /// Raises the completion event of `cqn` and disarms it.
    fn fire_cq(&mut self, iommu: &Iommu, cqn: u32, fx: &mut Effects) {
        let Some(cq) = self.cqs.get_mut(&cqn) else {
            return;
        };
        cq.armed = None;
        cq.mod_count = 0;
        cq.mod_deadline = None;
        let eqn = cq.eqn as u8;
        let mut d = [0u8; 28];
        set_dword(&mut d, 0x18, cqn);
        self.post_to_eq(iommu, eqn, 0x00, 0, &d, fx);
    }

    /// Fires the CQ events whose moderation period has run out.
    pub(crate) fn cq_timers(&mut self, iommu: &Iommu, now: Instant, fx: &mut Effects) {
        let due: Vec<u32> = self
            .cqs
            .iter()
            .filter(|(_, c)| c.mod_deadline.is_some_and(|d| d <= now))
            .map(|(&n, _)| n)
            .collect();
        for cqn in due {
            self.fire_cq(iommu, cqn, fx);
        }
    }

    /// The earliest moderation deadline.
    pub(crate) fn next_cq_deadline(&self) -> Option<Instant> {
        self.cqs.values().filter_map(|c| c.mod_deadline).min()
    }

    /// The CQ arm doorbell (UAR 0x020): arm word and CQN.
    pub(crate) fn cq_doorbell(&mut self, iommu: &Iommu, uar: u32, value: u64, fx: &mut Effects) {
        let word = (value >> 32) as u32;
        let cqn = (value as u32) & 0xFF_FFFF;
        let Some(cq) = self.cqs.get_mut(&cqn) else {
            self.dp.stray_doorbells += 1;
            return;
        };
        if cq.uar != uar {
            self.dp.stray_doorbells += 1;
            return;
        }
        let cmd = (word >> 24) & 0xF;
        let ci = word & 0xFF_FFFF;
        cq.armed = Some(cmd);
        cq.mod_count = 0;
        cq.mod_deadline = None;
        // Completions newer than the arm's consumer index count at once
        // (the drivers' "poll, then arm" loop relies on it).
        let pending = cq.pc.wrapping_sub(ci) & 0xFF_FFFF;
        if cmd == 0 && pending > 0 && cq.moderate(pending, Instant::now()) {
            self.fire_cq(iommu, cqn, fx);
        }
    }

    /// Whether `lkey` lets `qp` reach `[addr, addr + len)`: the key's PD
    /// is the QP's, its low byte matches, and the range lies inside it.
    pub(crate) fn check_lkey(&self, qp: &SimQp, lkey: u32, addr: u64, len: u64) -> bool {
        if lkey == RESD_LKEY {
            return qp.rlky;
        }
        matches!(self.mkeys.get(&(lkey >> 8)),
            Some(k) if k.pd == qp.pd && k.low == lkey as u8 && k.covers(addr, len))
    }

    /// The SQ doorbell (UAR 0x800 + BlueFlame register): QP `qpn` has new WQEs.
    pub(crate) fn sq_doorbell(&mut self, iommu: &Iommu, uar: u32, value: u64, fx: &mut Effects) {
        let qpn = ((value as u32) >> 8) & 0xFF_FFFF;
        let Some(q) = self.qps.get(&qpn) else {
            self.dp.stray_doorbells += 1;
            return;
        };
        if q.uar != uar || q.state == QpState::Reset || q.state == QpState::Init {
            self.dp.stray_doorbells += 1;
            return;
        }
        if q.state == QpState::Err {
            self.qp_to_error(iommu, qpn);
            return;
        }
        let mut b = [0u8; 4];
        if iommu.read(q.dbr + 4, &mut b).is_err() {
            return;
        }
        let pc = (dword(&b, 0) & 0xFFFF) as u16;
        let mut budget = 1u32 << q.log_sq;
        loop {
            let Some(q) = self.qps.get(&qpn) else { return };
            if q.sq_ci == pc || budget == 0 || q.state != QpState::Rts {
                break;
            }
            let (bbs, result) = self.execute_send(iommu, qpn);
            budget = budget.saturating_sub(u32::from(bbs));
            let Some(q) = self.qps.get_mut(&qpn) else {
                return;
            };
            let wqe_index = q.sq_ci;
            q.sq_ci = q.sq_ci.wrapping_add(bbs);
            let cqn = q.cqn_snd;
            match result {
                Ok((signaled, wqe_op)) => {
                    if signaled {
                        let mut c = [0u8; 64];
                        set_dword(&mut c, 0x38, (u32::from(wqe_op) << 24) | qpn);
                        set_word(&mut c, 0x3C, wqe_index);
                        self.write_cqe(iommu, cqn, 0x0, &mut c, false, fx);
                    }
                }
                Err((e, wqe_op)) => {
                    self.error_cqe(iommu, cqn, 0xD, qpn, wqe_index, wqe_op, e, fx);
                    self.qp_to_error(iommu, qpn);
                    fx.fire.append(&mut self.pending_fx.fire);
                    return;
                }
            }
        }
    }

    /// Executes the WQE at the QP's SQ consumer index. Returns the basic
    /// blocks it spans and whether a CQE is wanted, or the error.
    #[allow(clippy::type_complexity)]
    fn execute_send(
        &mut self,
        iommu: &Iommu,
        qpn: u32,
    ) -> (u16, Result<(bool, u8), (WcError, u8)>) {
        let Some(q) = self.qps.get(&qpn).cloned() else {
            return (1, Err((WcError::LocalQpOp, 0)));
        };
        let ring = 1usize << q.log_sq;
        let first = usize::from(q.sq_ci) & (ring - 1);
        let mut w = [0u8; 1024];
        if !q.read(iommu, q.sq_offset + first * 64, &mut w[..64]) {
            return (1, Err((WcError::LocalAccess, 0)));
        }
        let opcode = w[3];
        let ds = (dword(&w, 4) & 0x3F) as usize;
        let bbs = ds.div_ceil(4).max(1);
        if ds == 0 || (dword(&w, 4) >> 8) != qpn {
            return (bbs as u16, Err((WcError::LocalQpOp, opcode)));
        }
        for b in 1..bbs {
            let slot = (first + b) & (ring - 1);
            if !q.read(iommu, q.sq_offset + slot * 64, &mut w[b * 64..(b + 1) * 64]) {
                return (bbs as u16, Err((WcError::LocalAccess, opcode)));
            }
        }
        let signaled = w[0x0B] & 0x08 != 0;
        let se = w[0x0B] & 0x02 != 0;
        match opcode {
            0x00 => return (bbs as u16, Ok((signaled, opcode))),
            0x0A | 0x0B if q.st == 0x2 || q.st == 0x8 => {}
            0x0E if q.st == 0x2 && q.offload == 1 => {}
            0x0A | 0x0B if q.st == 0x0 => {
                let payload = match self.gather(iommu, &q, &w, 1, ds) {
                    Ok(p) => p,
                    Err(e) => return (bbs as u16, Err((e, opcode))),
                };
                self.rc_send(
                    qpn,
                    q.sq_ci,
                    bbs as u16,
                    opcode,
                    signaled,
                    se,
                    dword(&w, 0x0C),
                    payload,
                );
                // The requester CQE comes with the ACK.
                return (bbs as u16, Ok((false, opcode)));
            }
            _ => return (bbs as u16, Err((WcError::LocalQpOp, opcode))),
        }
        if ds < 4 {
            return (bbs as u16, Err((WcError::LocalQpOp, opcode)));
        }
        let av = &w[16..64];
        // Offload mode 1: pad (unit 4) and the eth segment (unit 5) come first.
        let (first_data, cs_flags, mss, headers) = if q.offload == 1 {
            if ds < 6 {
                return (bbs as u16, Err((WcError::LocalQpOp, opcode)));
            }
            let e = &w[80..96];
            let inline = usize::from(u16::from_be_bytes([e[0x0C], e[0x0D]]));
            let eth_len = (14 + inline).max(16).next_multiple_of(16);
            if 80 + 0x0E + inline > ds * 16 || 80 + eth_len > ds * 16 {
                return (bbs as u16, Err((WcError::LocalLength, opcode)));
            }
            let mss = usize::from(u16::from_be_bytes([e[6], e[7]]));
            (
                5 + eth_len / 16,
                e[4],
                mss,
                w[80 + 0x0E..80 + 0x0E + inline].to_vec(),
            )
        } else {
            (4, 0, 0, Vec::new())
        };
        let data = match self.gather(iommu, &q, &w, first_data, ds) {
            Ok(p) => p,
            Err(e) => return (bbs as u16, Err((e, opcode))),
        };
        let packets = if opcode == 0x0E {
            crate::offload::segment(&headers, &data, mss)
        } else {
            let mut p = data;
            if cs_flags & 0xC0 != 0 {
                crate::offload::checksum(&mut p, cs_flags & 0x40 != 0, cs_flags & 0x80 != 0);
            }
            vec![p]
        };
        let port = &self.port;
        let code = if q.mtu == 0 {
            port.mtu
        } else {
            port.mtu.min(q.mtu)
        };
        let mtu = 128usize << code.clamp(1, 5);
        if packets.iter().any(|p| p.len() > mtu) {
            return (bbs as u16, Err((WcError::LocalLength, opcode)));
        }
        for p in packets {
            self.ud_send(&q, opcode, se, av, &p);
        }
        (bbs as u16, Ok((signaled, opcode)))
    }

    /// Reads the data of gather segments `first..ds` of a WQE.
    fn gather(
        &self,
        iommu: &Iommu,
        q: &SimQp,
        w: &[u8],
        first: usize,
        ds: usize,
    ) -> Result<Vec<u8>, WcError> {
        let mut payload = Vec::with_capacity(4096);
        let mut k = first;
        while k < ds {
            let seg = &w[k * 16..k * 16 + 16];
            let bc = dword(seg, 0);
            if bc & 0x8000_0000 != 0 {
                let len = (bc & 0x3FF) as usize;
                let start = k * 16 + 4;
                if start + len > ds * 16 {
                    return Err(WcError::LocalLength);
                }
                payload.extend_from_slice(&w[start..start + len]);
                k += (4 + len).div_ceil(16);
                continue;
            }
            let s = Seg {
                len: bc,
                lkey: dword(seg, 4),
                addr: qword(seg, 8),
            };
            k += 1;
            if s.len == 0 {
                continue;
            }
            if !self.check_lkey(q, s.lkey, s.addr, u64::from(s.len)) {
                return Err(WcError::LocalProtection);
            }
            if payload.len() + s.len as usize > 1 << 16 {
                return Err(WcError::LocalLength);
            }
            let at = payload.len();
            payload.resize(at + s.len as usize, 0);
            if iommu.read(s.addr, &mut payload[at..]).is_err() {
                return Err(WcError::LocalAccess);
            }
        }
        Ok(payload)
    }

    fn ud_send(&mut self, q: &SimQp, opcode: u8, se: bool, av: &[u8], payload: &[u8]) {
        let qpn = q.qpn;
        let port = &self.port;
        if port.state != port_state::ACTIVE {
            self.dp.tx_port_down += 1;
            return;
        }
        let mut qkey = dword(av, 0);
        if qkey & 0x8000_0000 != 0 {
            qkey = q.qkey;
        }
        let dqpn = dword(av, 8) & 0xFF_FFFF;
        let grh = (dword(av, 0x1C) & (1 << 30) != 0).then(|| {
            let mut sgid = [0u8; 16];
            sgid[..8].copy_from_slice(&port.gid_prefix.to_be_bytes());
            sgid[8..].copy_from_slice(&port.guid.to_be_bytes());
            let mut dgid = [0u8; 16];
            dgid.copy_from_slice(&av[0x20..0x30]);
            GrhFields {
                tclass: av[0x1A],
                flow_label: dword(av, 0x1C) & 0xF_FFFF,
                hop_limit: av[0x1B],
                sgid,
                dgid,
            }
        });
        let pkey = port
            .pkeys
            .get(usize::from(q.pkey_index))
            .copied()
            .unwrap_or(0);
        let src_qp = if q.st == 0x8 {
            1
        } else if q.deth_sqpn != 0 {
            q.deth_sqpn
        } else {
            qpn
        };
        let h = Headers {
            vl: 0,
            sl: av[0x0C] & 0x0F,
            dlid: u16::from_be_bytes([av[0x0E], av[0x0F]]),
            slid: port.lid | u16::from(av[0x0D] & 0x7F),
            grh,
            opcode: if opcode == 0x0B {
                0x65
            } else {
                wire::OP_UD_SEND_ONLY
            },
            se,
            pkey,
            dest_qp: dqpn,
            ack_req: false,
            psn: q.psn,
            deth: Some((qkey, src_qp)),
        };
        if let Some(qm) = self.qps.get_mut(&qpn) {
            qm.psn = (qm.psn + 1) & 0xFF_FFFF;
        }
        // QP1's MADs still go: the port must keep talking to the SM.
        if !self.p.tx_sink || q.st == 0x8 {
            self.outbox.push(wire::build(&h, payload));
        }
        self.dp.tx_packets += 1;
    }

    /// A packet arrived from the fabric.
    pub(crate) fn receive(&mut self, iommu: &Iommu, pkt: &[u8], fx: &mut Effects) {
        let Ok((h, range)) = wire::parse(pkt) else {
            self.dp.rx_bad_crc += 1;
            return;
        };
        if self.port.state != port_state::ACTIVE && self.port.state != port_state::ARMED {
            self.dp.rx_no_target += 1;
            return;
        }
        let payload = &pkt[range];
        let multicast = h.dlid >= wire::MCAST_LID_BASE && h.dlid != wire::PERMISSIVE_LID;
        let targets: Vec<u32> = if multicast {
            match &h.grh {
                Some(g) if g.dgid[0] == 0xFF => self
                    .mcgs
                    .get(&g.dgid)
                    .map(|m| m.iter().copied().collect())
                    .unwrap_or_default(),
                _ => Vec::new(),
            }
        } else {
            let mask = !((1u16 << self.port.lmc) - 1);
            if h.dlid & mask != self.port.lid & mask {
                Vec::new()
            } else if h.dest_qp == 1 {
                self.qps
                    .values()
                    .filter(|q| q.st == 0x8)
                    .map(|q| q.qpn)
                    .collect()
            } else {
                vec![h.dest_qp]
            }
        };
        if targets.is_empty() {
            self.dp.rx_no_target += 1;
            return;
        }
        if h.opcode & 0xE0 == 0x00 && !multicast {
            return self.rc_receive(iommu, &h, payload, fx);
        }
        let Some((qkey, src_qp)) = h.deth else {
            self.dp.rx_no_target += 1;
            return;
        };
        let grh_bytes: Option<&[u8]> = h.grh.map(|_| &pkt[8..48]);
        for qpn in targets {
            self.deliver_ud(
                iommu, qpn, &h, qkey, src_qp, grh_bytes, payload, multicast, fx,
            );
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn deliver_ud(
        &mut self,
        iommu: &Iommu,
        qpn: u32,
        h: &Headers,
        qkey: u32,
        src_qp: u32,
        grh: Option<&[u8]>,
        payload: &[u8],
        multicast: bool,
        fx: &mut Effects,
    ) {
        let Some(q) = self.qps.get(&qpn).cloned() else {
            self.dp.rx_no_target += 1;
            return;
        };
        if !(q.st == 0x2 || q.st == 0x8) || !matches!(q.state, QpState::Rtr | QpState::Rts) {
            self.dp.rx_no_target += 1;
            return;
        }
        if multicast && q.block_lb_mc && h.slid == self.port.lid && src_qp == q.qpn {
            return;
        }
        // P_Key: QP1 accepts any P_Key of the port's table; others their own.
        let pkey_ok =
            |a: u16, b: u16| a & 0x7FFF == b & 0x7FFF && a & 0x7FFF != 0 && (a | b) & 0x8000 != 0;
        let ok = if q.st == 0x8 {
            self.port.pkeys.iter().any(|&p| pkey_ok(p, h.pkey))
        } else {
            self.port
                .pkeys
                .get(usize::from(q.pkey_index))
                .is_some_and(|&p| pkey_ok(p, h.pkey))
        };
        if !ok {
            self.port.pkey_violations = self.port.pkey_violations.saturating_add(1);
            self.dp.rx_pkey_drops += 1;
            return;
        }
        let want_qkey = if q.st == 0x8 { GSI_QKEY } else { q.qkey };
        if qkey != want_qkey {
            self.port.qkey_violations = self.port.qkey_violations.saturating_add(1);
            self.dp.rx_qkey_drops += 1;
            return;
        }
        let mut b = [0u8; 4];
        if iommu.read(q.dbr, &mut b).is_err() {
            return;
        }
        let posted = (dword(&b, 0) & 0xFFFF) as u16;
        if q.rq_ci == posted {
            self.dp.rx_no_wqe += 1;
            return;
        }
        let slot = usize::from(q.rq_ci) & ((1usize << q.log_rq) - 1);
        let mut wqe = vec![0u8; q.rq_stride];
        if !q.read(iommu, slot * q.rq_stride, &mut wqe) {
            return;
        }
        let mut segs = Vec::new();
        for k in 0..q.rq_stride / 16 {
            let s = &wqe[k * 16..k * 16 + 16];
            let len = dword(s, 0);
            if len == 0 {
                break;
            }
            segs.push(Seg {
                len,
                lkey: dword(s, 4),
                addr: qword(s, 8),
            });
        }
        let counter = q.rq_ci;
        if let Some(qm) = self.qps.get_mut(&qpn) {
            qm.rq_ci = qm.rq_ci.wrapping_add(1);
        }
        let total = 40 + payload.len();
        let capacity: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
        if (capacity as usize) < total {
            self.error_cqe(
                iommu,
                q.cqn_rcv,
                0xE,
                qpn,
                counter,
                0,
                WcError::LocalLength,
                fx,
            );
            self.qp_to_error(iommu, qpn);
            return;
        }
        let mut grh_area = [0u8; 40];
        if let Some(g) = grh {
            grh_area.copy_from_slice(g);
        }
        // The GRH area and the payload, scattered over the segments in order.
        let pieces = [&grh_area[..], payload];
        let mut at = 0usize;
        let mut left = total;
        for s in &segs {
            if left == 0 {
                break;
            }
            let n = (s.len as usize).min(left);
            if !self.check_lkey(&q, s.lkey, s.addr, n as u64) {
                self.error_cqe(
                    iommu,
                    q.cqn_rcv,
                    0xE,
                    qpn,
                    counter,
                    0,
                    WcError::LocalProtection,
                    fx,
                );
                self.qp_to_error(iommu, qpn);
                return;
            }
            if !scatter(iommu, s.addr, &pieces, at, n) {
                self.error_cqe(
                    iommu,
                    q.cqn_rcv,
                    0xE,
                    qpn,
                    counter,
                    0,
                    WcError::LocalAccess,
                    fx,
                );
                self.qp_to_error(iommu, qpn);
                return;
            }
            left -= n;
            at += n;
        }
        let mut c = [0u8; 64];
        c[0x11] = (h.dlid & ((1 << self.port.lmc) - 1)) as u8;
        set_word(&mut c, 0x16, h.slid);
        set_dword(
            &mut c,
            0x18,
            (u32::from(grh.is_some()) << 28) | (u32::from(h.sl & 0xF) << 24) | (src_qp & 0xFF_FFFF),
        );
        set_dword(&mut c, 0x20, 0xFF_FFFF);
        if q.st == 0x8 {
            set_dword(&mut c, 0x24, u32::from(h.pkey));
        }
        if q.offload == 1 {
            // Receive checksum offload: what the HCA verified (§6.2).
            let (hds, types) = crate::offload::receive_check(payload);
            c[0x1C] = hds;
            c[0x1D] = types;
        }
        set_dword(&mut c, 0x2C, total as u32);
        set_dword(&mut c, 0x38, qpn);
        set_word(&mut c, 0x3C, counter);
        let opcode = if h.opcode == 0x65 { 0x3 } else { 0x2 };
        self.dp.rx_packets += 1;
        self.write_cqe(iommu, q.cqn_rcv, opcode, &mut c, h.se, fx);
    }

    /// QPs attached to any multicast group, for reports.
    pub fn attached_groups(&self) -> BTreeSet<[u8; 16]> {
        self.mcgs.keys().copied().collect()
    }
}

/// Writes bytes `at..at + n` of the concatenation of `pieces` to device
/// memory at `addr`; false if the IOMMU refuses any part of it.
fn scatter(iommu: &Iommu, addr: u64, pieces: &[&[u8]], at: usize, n: usize) -> bool {
    let mut skip = at;
    let mut left = n;
    let mut to = addr;
    for piece in pieces {
        if left == 0 {
            break;
        }
        if skip >= piece.len() {
            skip -= piece.len();
            continue;
        }
        let take = (piece.len() - skip).min(left);
        if iommu.write(to, &piece[skip..skip + take]).is_err() {
            return false;
        }
        skip = 0;
        left -= take;
        to += take as u64;
    }
    left == 0
}
