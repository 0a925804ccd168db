//! Reliable connected transport and shared receive queues on the device
//! side (IBTA ch. 9 as summarised in the references; mlx5 §4.13, §7.7).
//!
//! Requester: a SEND is cut into First/Middle/Last (or Only) packets of the
//! path MTU with consecutive PSNs, the last one asking for an ACK. Packets
//! stay queued until acknowledged; the local ACK timer (4.096 µs × 2^timeout)
//! retransmits from the oldest unacknowledged PSN up to `retry_count` times,
//! then the WQE completes with "transport retry counter exceeded" (0x15)
//! and the QP goes to ERR. An RNR NAK waits the responder's RNR timer and
//! retries up to `rnr_retry` times (7 = forever), then completes with
//! "RNR retry counter exceeded" (0x16).
//!
//! Responder: packets must arrive with the expected PSN. A duplicate is
//! acknowledged again, a gap is answered with one PSN-sequence-error NAK.
//! A message's first packet takes a receive WQE (the QP's RQ or its SRQ);
//! with none posted the responder answers RNR NAK and drops the message.
//! Completion CQEs are written when the last packet is placed.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::bytes::{dword, field, qword, set_dword, set_word};
use crate::fw::{Effects, Fail, Firmware, Reason, fail, status};
use crate::iommu::Iommu;
use crate::port::state as port_state;
use crate::queues::{QpState, Seg, WcError};
use crate::wire::{self, Headers};

/// BTH opcodes of RC.
#[allow(missing_docs)]
pub mod op {
    pub const SEND_FIRST: u8 = 0x00;
    pub const SEND_MIDDLE: u8 = 0x01;
    pub const SEND_LAST: u8 = 0x02;
    pub const SEND_LAST_IMM: u8 = 0x03;
    pub const SEND_ONLY: u8 = 0x04;
    pub const SEND_ONLY_IMM: u8 = 0x05;
    pub const ACK: u8 = 0x11;
}

/// AETH syndromes.
mod aeth {
    /// ACK without credit information.
    pub const ACK: u8 = 0x1F;
    /// RNR NAK (timer in bits 4:0).
    pub const RNR: u8 = 0x20;
    /// NAK: PSN sequence error.
    pub const NAK_SEQ: u8 = 0x60;
    /// NAK: invalid request.
    pub const NAK_INV: u8 = 0x61;
    /// NAK: remote access error.
    pub const NAK_ACCESS: u8 = 0x62;
    /// NAK: remote operational error.
    pub const NAK_OP: u8 = 0x63;
}

/// RNR NAK timer values (IBTA table "RNR NAK timer field"), in µs.
pub fn rnr_timer_us(code: u8) -> u64 {
    const T: [u64; 32] = [
        655_360, 10, 20, 30, 40, 60, 80, 120, 160, 240, 320, 480, 640, 960, 1280, 1920, 2560, 3840,
        5120, 7680, 10_240, 15_360, 20_480, 30_720, 40_960, 61_440, 81_920, 122_880, 163_840,
        245_760, 327_680, 491_520,
    ];
    T[usize::from(code & 0x1F)]
}

const PSN_MASK: u32 = 0xFF_FFFF;

/// `a` is at or before `b` in 24-bit PSN space.
fn psn_le(a: u32, b: u32) -> bool {
    (b.wrapping_sub(a) & PSN_MASK) < 0x80_0000
}

/// A sent WQE waiting for its ACK.
#[derive(Clone, Debug)]
struct Outstanding {
    wqe_index: u16,
    opcode: u8,
    signaled: bool,
    first_psn: u32,
    last_psn: u32,
    packets: Vec<Vec<u8>>,
}

/// A message being received.
#[derive(Clone, Debug)]
struct Incoming {
    wqe_counter: u16,
    segs: Vec<Seg>,
    written: usize,
    imm: Option<u32>,
}

/// RC state of one QP.
#[derive(Clone, Debug, Default)]
pub struct RcState {
    remote_qpn: u32,
    rlid: u16,
    sl: u8,
    mtu: u8,
    epsn: u32,
    min_rnr_nak: u8,
    ack_timeout: u8,
    retry_count: u8,
    rnr_retry: u8,
    sq_psn: u32,
    unacked: VecDeque<Outstanding>,
    retries_left: u8,
    rnr_left: u8,
    timer: Option<Instant>,
    rnr_resume: Option<(Instant, u32)>,
    incoming: Option<Incoming>,
    nak_sent: bool,
    msn: u32,
}

impl RcState {
    /// Applies the RC fields of a transition's qpc (§4.12 table).
    pub(crate) fn apply(&mut self, op: u16, _opt: u32, c: &[u8]) {
        match op {
            0x503 => {
                self.mtu = field(c, 0x08, 31, 29) as u8;
                self.remote_qpn = field(c, 0x14, 23, 0);
                self.rlid = field(c, 0x1C, 15, 0) as u16;
                self.sl = field(c, 0x3C, 27, 24) as u8;
                self.epsn = field(c, 0x94, 23, 0);
                self.min_rnr_nak = field(c, 0x94, 28, 24) as u8;
            }
            0x504 => {
                self.ack_timeout = field(c, 0x20, 31, 27) as u8;
                self.retry_count = field(c, 0x70, 18, 16) as u8;
                self.rnr_retry = field(c, 0x70, 15, 13) as u8;
                self.sq_psn = field(c, 0x78, 23, 0);
                self.retries_left = self.retry_count;
                self.rnr_left = self.rnr_retry;
            }
            _ => {}
        }
    }

    fn ack_timeout(&self) -> Duration {
        // 4.096 µs × 2^n; 0 means "infinite" — use a long timer.
        if self.ack_timeout == 0 {
            Duration::from_secs(3600)
        } else {
            Duration::from_nanos(4096u64 << self.ack_timeout.min(31))
        }
    }
}

/// A shared receive queue (RMP with a linked-list WQ).
#[derive(Clone, Debug)]
pub struct SimSrq {
    pub(crate) pd: u32,
    log_size: u8,
    stride: usize,
    pas: Vec<u64>,
    page_size: u64,
    dbr: u64,
    /// Next WQE the device takes.
    head: u16,
    /// WQEs consumed so far (16 bits, as the posted counter).
    consumed: u16,
    lwm: u16,
}

impl SimSrq {
    fn addr(&self, off: usize) -> Option<u64> {
        let page = usize::try_from(off as u64 / self.page_size).ok()?;
        Some(self.pas.get(page)? + off as u64 % self.page_size)
    }
}

impl Firmware {
    /// CREATE_RMP / MODIFY_RMP / DESTROY_RMP.
    pub(crate) fn srq_command(
        &mut self,
        iommu: &Iommu,
        op: u16,
        i: &[u8],
        o: &mut [u8],
    ) -> Result<(), Fail> {
        use status::*;
        match op {
            0x90C => {
                const WQ: usize = 0x20 + 0x30;
                if field(i, 0x20 + 0x04, 31, 31) != 0 || field(i, WQ, 31, 28) != 0 {
                    // Only linked-list (SRQ-style) RMPs are modelled.
                    return Err(fail(op, BAD_PARAM, Reason::BadQueueSize));
                }
                let pd = field(i, WQ + 0x08, 23, 0);
                if !self.pds.contains(&pd) {
                    return Err(fail(op, BAD_RES, Reason::UnknownObject));
                }
                let log_stride = field(i, WQ + 0x20, 19, 16);
                let log_pg = field(i, WQ + 0x20, 12, 8).min(20);
                let log_size = field(i, WQ + 0x20, 4, 0) as u8;
                if !(4..=11).contains(&log_stride) || log_size == 0 || log_size > 16 {
                    return Err(fail(op, BAD_PARAM, Reason::BadQueueSize));
                }
                let lwm = field(i, WQ + 0x04, 15, 0) as u16;
                let srqn = self.add_srq(
                    iommu,
                    op,
                    i,
                    pd,
                    log_size,
                    1 << log_stride,
                    4096 << log_pg,
                    qword(i, WQ + 0x10),
                    lwm,
                )?;
                crate::bytes::set_field(o, 0x08, 23, 0, srqn);
            }
            0x90D => {
                let srqn = field(i, 0x08, 23, 0);
                let s = self
                    .srqs
                    .get_mut(&srqn)
                    .ok_or(fail(op, BAD_RES, Reason::UnknownObject))?;
                if dword(i, 0x14) & 1 != 0 {
                    s.lwm = field(i, 0x20 + 0x30 + 0x04, 15, 0) as u16;
                }
            }
            0x700 => {
                // CREATE_SRQ: the same queue as an RMP, described by an srqc.
                const SRQC: usize = 0x10;
                let log_size = field(i, SRQC, 27, 24) as u8;
                let stride = 16usize << field(i, SRQC + 0x04, 26, 24);
                let log_pg = field(i, SRQC + 0x10, 29, 24).min(20);
                let pd = field(i, SRQC + 0x18, 23, 0);
                if !self.pds.contains(&pd) {
                    return Err(fail(op, BAD_RES, Reason::UnknownObject));
                }
                if log_size == 0 || stride < 32 {
                    return Err(fail(op, BAD_PARAM, Reason::BadQueueSize));
                }
                let lwm = field(i, SRQC + 0x1C, 31, 16) as u16;
                let srqn = self.add_srq(
                    iommu,
                    op,
                    i,
                    pd,
                    log_size,
                    stride,
                    4096 << log_pg,
                    qword(i, SRQC + 0x28),
                    lwm,
                )?;
                crate::bytes::set_field(o, 0x08, 23, 0, srqn);
            }
            0x703 => {
                let srqn = field(i, 0x08, 23, 0);
                let s = self
                    .srqs
                    .get_mut(&srqn)
                    .ok_or(fail(op, BAD_RES, Reason::UnknownObject))?;
                s.lwm = field(i, 0x0C, 15, 0) as u16;
            }
            0x90E | 0x701 => {
                let srqn = field(i, 0x08, 23, 0);
                if !self.srqs.contains_key(&srqn) {
                    return Err(fail(op, BAD_RES, Reason::UnknownObject));
                }
                if self.qps.values().any(|q| q.srqn == Some(srqn)) {
                    return Err(fail(op, RES_BUSY, Reason::ObjectInUse));
                }
                self.srqs.remove(&srqn);
            }
            _ => return Err(fail(op, BAD_OP, Reason::UnknownOpcode)),
        }
        Ok(())
    }

    /// Validates and records a new SRQ (RMP or SRQ form); returns its number.
    #[allow(clippy::too_many_arguments)]
    fn add_srq(
        &mut self,
        iommu: &Iommu,
        op: u16,
        i: &[u8],
        pd: u32,
        log_size: u8,
        stride: usize,
        page_size: u64,
        dbr: u64,
        lwm: u16,
    ) -> Result<u32, Fail> {
        let bytes = (stride << log_size) as u64;
        let pas = crate::fw::queue_pages(iommu, op, i, page_size, bytes)?;
        crate::fw::record_ok(iommu, op, dbr, 4)?;
        let srqn = self.next_srqn;
        self.next_srqn = (self.next_srqn + 1) & 0xFF_FFFF;
        self.srqs.insert(
            srqn,
            SimSrq {
                pd,
                log_size,
                stride,
                pas,
                page_size,
                dbr,
                head: 0,
                consumed: 0,
                lwm,
            },
        );
        Ok(srqn)
    }

    /// Takes the next receive WQE of a QP (its RQ or its SRQ): the counter
    /// for the CQE and the scatter list.
    pub(crate) fn take_recv_wqe(
        &mut self,
        iommu: &Iommu,
        qpn: u32,
        fx: &mut Effects,
    ) -> Option<(u16, Vec<Seg>)> {
        let q = self.qps.get(&qpn)?.clone();
        let parse = |wqe: &[u8], from: usize| -> Vec<Seg> {
            let mut segs = Vec::new();
            for k in (from..wqe.len() / 16).map(|k| k * 16) {
                let len = dword(wqe, k);
                if len == 0 {
                    break;
                }
                segs.push(Seg {
                    len,
                    lkey: dword(wqe, k + 4),
                    addr: qword(wqe, k + 8),
                });
            }
            segs
        };
        if let Some(srqn) = q.srqn {
            let s = self.srqs.get(&srqn)?.clone();
            let mut b = [0u8; 4];
            iommu.read(s.dbr, &mut b).ok()?;
            let posted = (dword(&b, 0) & 0xFFFF) as u16;
            if posted == s.consumed {
                return None;
            }
            let idx = usize::from(s.head) & ((1 << s.log_size) - 1);
            let mut wqe = vec![0u8; s.stride];
            let mut done = 0;
            while done < s.stride {
                let at = idx * s.stride + done;
                let n =
                    (s.page_size - at as u64 % s.page_size).min((s.stride - done) as u64) as usize;
                iommu.read(s.addr(at)?, &mut wqe[done..done + n]).ok()?;
                done += n;
            }
            let next = u16::from_be_bytes([wqe[2], wqe[3]]);
            let left = posted.wrapping_sub(s.consumed).wrapping_sub(1);
            let srq = self.srqs.get_mut(&srqn)?;
            srq.head = next;
            srq.consumed = srq.consumed.wrapping_add(1);
            if srq.lwm != 0 && left < srq.lwm {
                srq.lwm = 0;
                let mut d = [0u8; 28];
                set_dword(&mut d, 0x18, srqn);
                self.post_event(iommu, 0x14, 0, &d, fx);
            }
            return Some((idx as u16, parse(&wqe, 1)));
        }
        let mut b = [0u8; 4];
        iommu.read(q.dbr, &mut b).ok()?;
        let posted = (dword(&b, 0) & 0xFFFF) as u16;
        if q.rq_ci == posted {
            return None;
        }
        let slot = usize::from(q.rq_ci) & ((1usize << q.log_rq) - 1);
        let mut wqe = vec![0u8; q.rq_stride];
        if !q.read(iommu, slot * q.rq_stride, &mut wqe) {
            return None;
        }
        let counter = q.rq_ci;
        if let Some(qm) = self.qps.get_mut(&qpn) {
            qm.rq_ci = qm.rq_ci.wrapping_add(1);
        }
        Some((counter, parse(&wqe, 0)))
    }

    fn rc_headers(&self, rc: &RcState, opcode: u8, psn: u32, ack_req: bool, pkey: u16) -> Headers {
        Headers {
            sl: rc.sl,
            dlid: rc.rlid,
            slid: self.port.lid,
            opcode,
            pkey,
            dest_qp: rc.remote_qpn,
            ack_req,
            psn,
            ..Headers::default()
        }
    }

    fn qp_pkey(&self, qpn: u32) -> u16 {
        self.qps
            .get(&qpn)
            .and_then(|q| self.port.pkeys.get(usize::from(q.pkey_index)).copied())
            .unwrap_or(0)
    }

    /// Sends one RC SEND message (requester side).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rc_send(
        &mut self,
        qpn: u32,
        wqe_index: u16,
        _bbs: u16,
        opcode: u8,
        signaled: bool,
        se: bool,
        imm: u32,
        payload: Vec<u8>,
    ) {
        let pkey = self.qp_pkey(qpn);
        let Some(q) = self.qps.get(&qpn) else { return };
        let Some(rc) = q.rc.as_deref() else { return };
        let mtu = 128usize << rc.mtu.clamp(1, 5);
        let chunks: Vec<&[u8]> = if payload.is_empty() {
            vec![&[][..]]
        } else {
            payload.chunks(mtu).collect()
        };
        let n = chunks.len();
        let with_imm = opcode == 0x0B;
        let mut packets = Vec::with_capacity(n);
        let first_psn = rc.sq_psn;
        for (k, c) in chunks.iter().enumerate() {
            let op = match (n, k) {
                (1, _) => {
                    if with_imm {
                        op::SEND_ONLY_IMM
                    } else {
                        op::SEND_ONLY
                    }
                }
                (_, 0) => op::SEND_FIRST,
                (_, k) if k + 1 == n => {
                    if with_imm {
                        op::SEND_LAST_IMM
                    } else {
                        op::SEND_LAST
                    }
                }
                _ => op::SEND_MIDDLE,
            };
            let last = k + 1 == n;
            let psn = (first_psn + k as u32) & PSN_MASK;
            let mut h = self.rc_headers(rc, op, psn, last, pkey);
            h.se = se && last;
            let mut body = Vec::with_capacity(c.len() + 4);
            if last && with_imm {
                body.extend_from_slice(&imm.to_be_bytes());
            }
            body.extend_from_slice(c);
            packets.push(wire::build(&h, &body));
        }
        let port_up = self.port.state == port_state::ACTIVE;
        let Some(rc) = self.qps.get_mut(&qpn).and_then(|q| q.rc.as_deref_mut()) else {
            return;
        };
        rc.sq_psn = (first_psn + n as u32) & PSN_MASK;
        if rc.timer.is_none() {
            rc.timer = Some(Instant::now() + rc.ack_timeout());
        }
        let out = packets.clone();
        rc.unacked.push_back(Outstanding {
            wqe_index,
            opcode,
            signaled,
            first_psn,
            last_psn: (first_psn + n as u32 - 1) & PSN_MASK,
            packets,
        });
        if port_up {
            self.dp.tx_packets += out.len() as u64;
            self.outbox.extend(out);
        } else {
            self.dp.tx_port_down += 1;
        }
    }

    fn send_aeth(&mut self, qpn: u32, syndrome: u8, psn: u32) {
        let pkey = self.qp_pkey(qpn);
        let Some(rc) = self.qps.get(&qpn).and_then(|q| q.rc.as_deref()) else {
            return;
        };
        let h = self.rc_headers(rc, op::ACK, psn, false, pkey);
        let mut a = [0u8; 4];
        set_dword(&mut a, 0, (u32::from(syndrome) << 24) | (rc.msn & PSN_MASK));
        self.outbox.push(wire::build(&h, &a));
        self.dp.tx_packets += 1;
    }

    /// An RC packet arrived for one of our QPs.
    pub(crate) fn rc_receive(
        &mut self,
        iommu: &Iommu,
        h: &Headers,
        payload: &[u8],
        fx: &mut Effects,
    ) {
        let qpn = h.dest_qp;
        let Some(q) = self.qps.get(&qpn) else {
            self.dp.rx_no_target += 1;
            return;
        };
        if q.st != 0 || !matches!(q.state, QpState::Rtr | QpState::Rts) || q.rc.is_none() {
            self.dp.rx_no_target += 1;
            return;
        }
        let my_pkey = self
            .port
            .pkeys
            .get(usize::from(q.pkey_index))
            .copied()
            .unwrap_or(0);
        if my_pkey & 0x7FFF != h.pkey & 0x7FFF || (my_pkey | h.pkey) & 0x8000 == 0 {
            self.port.pkey_violations = self.port.pkey_violations.saturating_add(1);
            self.dp.rx_pkey_drops += 1;
            return;
        }
        if h.opcode == op::ACK {
            return self.rc_ack(iommu, qpn, h.psn, payload, fx);
        }
        self.rc_request(iommu, qpn, h, payload, fx);
    }

    fn rc_request(
        &mut self,
        iommu: &Iommu,
        qpn: u32,
        h: &Headers,
        payload: &[u8],
        fx: &mut Effects,
    ) {
        let Some(rc) = self.qps.get(&qpn).and_then(|q| q.rc.as_deref()) else {
            return;
        };
        let epsn = rc.epsn;
        if h.psn != epsn {
            if psn_le(h.psn, epsn.wrapping_sub(1) & PSN_MASK) {
                // Duplicate: acknowledge again what we have.
                self.send_aeth(qpn, aeth::ACK, epsn.wrapping_sub(1) & PSN_MASK);
            } else if !rc.nak_sent {
                if let Some(rc) = self.qps.get_mut(&qpn).and_then(|q| q.rc.as_deref_mut()) {
                    rc.nak_sent = true;
                }
                self.send_aeth(qpn, aeth::NAK_SEQ, epsn);
            }
            return;
        }
        let first = matches!(h.opcode, op::SEND_FIRST | op::SEND_ONLY | op::SEND_ONLY_IMM);
        let last = matches!(
            h.opcode,
            op::SEND_LAST | op::SEND_LAST_IMM | op::SEND_ONLY | op::SEND_ONLY_IMM
        );
        let imm_op = matches!(h.opcode, op::SEND_LAST_IMM | op::SEND_ONLY_IMM);
        if h.opcode > op::SEND_ONLY_IMM {
            self.send_aeth(qpn, aeth::NAK_INV, epsn);
            return;
        }
        let has_msg = rc.incoming.is_some();
        if first == has_msg {
            // A First while a message is open, or a Middle/Last without one.
            self.send_aeth(qpn, aeth::NAK_INV, epsn);
            return;
        }
        let min_rnr = rc.min_rnr_nak;
        if first {
            match self.take_recv_wqe(iommu, qpn, fx) {
                Some((wqe_counter, segs)) => {
                    if let Some(rc) = self.qps.get_mut(&qpn).and_then(|q| q.rc.as_deref_mut()) {
                        rc.incoming = Some(Incoming {
                            wqe_counter,
                            segs,
                            written: 0,
                            imm: None,
                        });
                    }
                }
                None => {
                    self.dp.rx_no_wqe += 1;
                    self.send_aeth(qpn, aeth::RNR | (min_rnr & 0x1F), epsn);
                    return;
                }
            }
        }
        let (data, imm) = if imm_op && payload.len() >= 4 {
            (&payload[4..], Some(dword(payload, 0)))
        } else {
            (payload, None)
        };
        let Some(q) = self.qps.get(&qpn).cloned() else {
            return;
        };
        let Some(mut msg) = q.rc.as_ref().and_then(|r| r.incoming.clone()) else {
            return;
        };
        // Scatter at the message offset.
        let mut skip = msg.written;
        let mut src = data;
        let mut err = None;
        for s in &msg.segs {
            if src.is_empty() {
                break;
            }
            let len = s.len as usize;
            if skip >= len {
                skip -= len;
                continue;
            }
            let n = (len - skip).min(src.len());
            if !self.check_lkey(&q, s.lkey, s.addr + skip as u64, n as u64) {
                err = Some(WcError::LocalProtection);
                break;
            }
            if iommu.write(s.addr + skip as u64, &src[..n]).is_err() {
                err = Some(WcError::LocalAccess);
                break;
            }
            src = &src[n..];
            skip = 0;
        }
        if err.is_none() && !src.is_empty() {
            err = Some(WcError::LocalLength);
        }
        if let Some(e) = err {
            self.error_cqe(iommu, q.cqn_rcv, 0xE, qpn, msg.wqe_counter, 0, e, fx);
            self.send_aeth(qpn, aeth::NAK_INV, epsn);
            self.qp_to_error(iommu, qpn);
            return;
        }
        msg.written += data.len();
        msg.imm = imm.or(msg.imm);
        let Some(rc) = self.qps.get_mut(&qpn).and_then(|q| q.rc.as_deref_mut()) else {
            return;
        };
        rc.epsn = (epsn + 1) & PSN_MASK;
        rc.nak_sent = false;
        if last {
            rc.incoming = None;
            rc.msn = (rc.msn + 1) & PSN_MASK;
            let mut c = [0u8; 64];
            set_dword(&mut c, 0x18, rc.remote_qpn);
            set_word(&mut c, 0x16, h.slid);
            set_dword(&mut c, 0x20, q.srqn.unwrap_or(0xFF_FFFF));
            if let Some(v) = msg.imm {
                set_dword(&mut c, 0x24, v);
            }
            set_dword(&mut c, 0x2C, msg.written as u32);
            set_dword(&mut c, 0x38, qpn);
            set_word(&mut c, 0x3C, msg.wqe_counter);
            self.dp.rx_packets += 1;
            let opcode = if msg.imm.is_some() { 0x3 } else { 0x2 };
            self.write_cqe(iommu, q.cqn_rcv, opcode, &mut c, h.se, fx);
        } else {
            rc.incoming = Some(msg);
        }
        if h.ack_req {
            self.send_aeth(qpn, aeth::ACK, h.psn);
        }
    }

    fn rc_ack(&mut self, iommu: &Iommu, qpn: u32, psn: u32, payload: &[u8], fx: &mut Effects) {
        let syndrome = payload.first().copied().unwrap_or(0);
        let cqn = self.qps.get(&qpn).map_or(0, |q| q.cqn_snd);
        match syndrome & 0xE0 {
            0x00 => {
                // ACK: everything up to `psn` is done.
                let mut done = Vec::new();
                let Some(rc) = self.qps.get_mut(&qpn).and_then(|q| q.rc.as_deref_mut()) else {
                    return;
                };
                while rc.unacked.front().is_some_and(|o| psn_le(o.last_psn, psn)) {
                    if let Some(o) = rc.unacked.pop_front() {
                        done.push(o);
                    }
                }
                if !done.is_empty() {
                    rc.retries_left = rc.retry_count;
                    rc.rnr_left = rc.rnr_retry;
                    rc.timer = (!rc.unacked.is_empty()).then(|| Instant::now() + rc.ack_timeout());
                }
                for o in done.into_iter().filter(|o| o.signaled) {
                    let mut c = [0u8; 64];
                    set_dword(&mut c, 0x38, (u32::from(o.opcode) << 24) | qpn);
                    set_word(&mut c, 0x3C, o.wqe_index);
                    self.write_cqe(iommu, cqn, 0x0, &mut c, false, fx);
                }
            }
            0x20 => {
                let Some(rc) = self.qps.get_mut(&qpn).and_then(|q| q.rc.as_deref_mut()) else {
                    return;
                };
                if rc.rnr_left == 0 {
                    return self.rc_fail(iommu, qpn, WcError::RnrRetryExceeded, fx);
                }
                if rc.rnr_retry != 7 {
                    rc.rnr_left -= 1;
                }
                let wait = Duration::from_micros(rnr_timer_us(syndrome & 0x1F));
                rc.rnr_resume = Some((Instant::now() + wait, psn));
                rc.timer = None;
            }
            0x60 => match syndrome {
                aeth::NAK_SEQ => self.rc_resend_from(qpn, psn),
                aeth::NAK_ACCESS => self.rc_fail(iommu, qpn, WcError::RemoteAccess, fx),
                aeth::NAK_OP => self.rc_fail(iommu, qpn, WcError::RemoteOp, fx),
                _ => self.rc_fail(iommu, qpn, WcError::RemoteInvalidRequest, fx),
            },
            _ => {}
        }
    }

    /// Retransmits every unacknowledged packet from `psn` on.
    fn rc_resend_from(&mut self, qpn: u32, psn: u32) {
        let up = self.port.state == port_state::ACTIVE;
        let Some(rc) = self.qps.get_mut(&qpn).and_then(|q| q.rc.as_deref_mut()) else {
            return;
        };
        let mut out = Vec::new();
        for o in &rc.unacked {
            for (k, p) in o.packets.iter().enumerate() {
                let ppsn = (o.first_psn + k as u32) & PSN_MASK;
                if psn_le(psn, ppsn) {
                    out.push(p.clone());
                }
            }
        }
        rc.timer = (!rc.unacked.is_empty()).then(|| Instant::now() + rc.ack_timeout());
        if up {
            self.dp.tx_packets += out.len() as u64;
            self.dp.rc_retransmits += out.len() as u64;
            self.outbox.extend(out);
        }
    }

    /// Completes the oldest WQE with `e`, moves the QP to ERR (flushing the rest).
    fn rc_fail(&mut self, iommu: &Iommu, qpn: u32, e: WcError, fx: &mut Effects) {
        let Some(q) = self.qps.get_mut(&qpn) else {
            return;
        };
        let cqn = q.cqn_snd;
        let Some(rc) = q.rc.as_deref_mut() else {
            return;
        };
        rc.timer = None;
        rc.rnr_resume = None;
        let failed = rc.unacked.pop_front();
        let rest: Vec<Outstanding> = rc.unacked.drain(..).collect();
        if let Some(o) = failed {
            self.error_cqe(iommu, cqn, 0xD, qpn, o.wqe_index, o.opcode, e, fx);
        }
        for o in rest {
            self.error_cqe(
                iommu,
                cqn,
                0xD,
                qpn,
                o.wqe_index,
                o.opcode,
                WcError::Flushed,
                fx,
            );
        }
        self.qp_to_error(iommu, qpn);
    }

    /// Runs the RC timers that are due.
    pub(crate) fn rc_timers(&mut self, iommu: &Iommu, now: Instant, fx: &mut Effects) {
        let qpns: Vec<u32> = self
            .qps
            .iter()
            .filter(|(_, q)| q.rc.is_some())
            .map(|(&n, _)| n)
            .collect();
        for qpn in qpns {
            let Some(rc) = self.qps.get_mut(&qpn).and_then(|q| q.rc.as_deref_mut()) else {
                continue;
            };
            if let Some((at, psn)) = rc.rnr_resume
                && at <= now
            {
                rc.rnr_resume = None;
                self.rc_resend_from(qpn, psn);
                continue;
            }
            if rc.timer.is_some_and(|t| t <= now) {
                if rc.retries_left == 0 {
                    self.rc_fail(iommu, qpn, WcError::RetryExceeded, fx);
                    continue;
                }
                rc.retries_left -= 1;
                let from = rc.unacked.front().map_or(rc.sq_psn, |o| o.first_psn);
                self.rc_resend_from(qpn, from);
            }
        }
    }

    /// The earliest RC timer.
    pub(crate) fn next_rc_deadline(&self) -> Option<Instant> {
        self.qps
            .values()
            .filter_map(|q| q.rc.as_deref())
            .flat_map(|rc| [rc.timer, rc.rnr_resume.map(|(t, _)| t)])
            .flatten()
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psn_ordering_wraps() {
        assert!(psn_le(5, 5));
        assert!(psn_le(5, 6));
        assert!(!psn_le(6, 5));
        assert!(psn_le(0xFF_FFFF, 0));
        assert!(!psn_le(0, 0xFF_FFFF));
    }

    #[test]
    fn rnr_timer_table_ends() {
        assert_eq!(rnr_timer_us(0), 655_360);
        assert_eq!(rnr_timer_us(1), 10);
        assert_eq!(rnr_timer_us(12), 640);
        assert_eq!(rnr_timer_us(31), 491_520);
    }
}
