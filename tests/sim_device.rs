//! The software HCA against raw command entries built by hand from the
//! reference's byte layout (§2.2–2.6), not by the driver's encoders: the
//! device's own delivery checks, ownership rule and mailbox handling.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use ipoib_sim::{SimConfig, SimHca};
use mlx5_driver::transport::{DmaBuffer, IovaSpace, Transport};

struct Rig {
    dev: Arc<SimHca>,
    space: IovaSpace,
    q: DmaBuffer,
}

impl Rig {
    fn new(force_signatures: bool) -> Rig {
        let dev = Arc::new(SimHca::new(SimConfig {
            force_signatures,
            ..SimConfig::default()
        }));
        let mut space = IovaSpace::new(&dev.iova_ranges());
        let q = DmaBuffer::alloc(&*dev, &mut space, 4096).unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        while dev.bar_read32(0x1FC) & (1 << 31) != 0 {
            assert!(Instant::now() < deadline, "firmware never ready");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(dev.bar_read32(0x0004) >> 16, 5, "cmdif rev");
        let a = q.iova().0;
        dev.bar_write32(0x10, (a >> 32) as u32);
        dev.bar_write32(0x14, a as u32);
        Rig { dev, space, q }
    }

    /// Rings slot 0 and waits up to `wait` for the owner bit to clear.
    fn ring(&self, wait: Duration) -> Option<u8> {
        self.dev.bar_write32(0x18, 1);
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            let so = self.q.read_u8(0x3F);
            if so & 1 == 0 {
                return Some(so);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    }

    fn done(mut self) {
        self.q.release(&*self.dev, &mut self.space).unwrap();
        assert_eq!(self.dev.report().mappings, 0);
    }
}

/// The ENABLE_HCA entry of the reference's example (§2.2), signed.
fn enable_hca_entry(sign: bool) -> [u8; 64] {
    let mut e = [0u8; 64];
    e[0x00] = 0x07;
    e[0x04..0x08].copy_from_slice(&[0, 0, 0, 0x10]);
    e[0x10..0x14].copy_from_slice(&[0x01, 0x04, 0x00, 0x00]);
    e[0x38..0x3C].copy_from_slice(&[0, 0, 0, 0x0C]);
    e[0x3F] = 0x01;
    if sign {
        e[0x3D] = !e.iter().fold(0u8, |a, b| a ^ b);
    }
    e
}

#[test]
fn reference_example_executes() {
    let rig = Rig::new(false);
    rig.q.write(0, &enable_hca_entry(false));
    let so = rig.ring(Duration::from_secs(2)).expect("completes");
    assert_eq!(so >> 1, 0, "delivery status ok");
    assert_eq!(rig.q.read_u8(0x20), 0x00, "command status OK");
    // Enabling twice is a state error from firmware, not a delivery error.
    rig.q.write(0, &enable_hca_entry(false));
    rig.ring(Duration::from_secs(2)).expect("completes");
    assert_eq!(rig.q.read_u8(0x20), 0x04, "BAD_SYS_STATE_ERR");
    rig.done();
}

#[test]
fn bad_signature_is_a_delivery_error() {
    let rig = Rig::new(true);
    let mut e = enable_hca_entry(true);
    e[0x3D] ^= 0x5A;
    rig.q.write(0, &e);
    let so = rig.ring(Duration::from_secs(2)).expect("completes");
    assert_eq!(so >> 1, 0x01, "signature error");
    assert_eq!(rig.dev.report().delivery_errors, 1);
    // A correctly signed one goes through.
    rig.q.write(0, &enable_hca_entry(true));
    let so = rig.ring(Duration::from_secs(2)).expect("completes");
    assert_eq!(so >> 1, 0);
    assert_eq!(rig.q.read_u8(0x20), 0x00);
    rig.done();
}

#[test]
fn doorbell_on_a_software_owned_entry_is_ignored() {
    let rig = Rig::new(false);
    let mut e = enable_hca_entry(false);
    e[0x3F] = 0x00;
    e[0x20] = 0xAA; // would be overwritten by an output
    rig.q.write(0, &e);
    rig.dev.bar_write32(0x18, 1);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(rig.q.read_u8(0x20), 0xAA, "firmware wrote nothing");
    assert_eq!(rig.dev.report().ignored_doorbells, 1);
    assert!(!rig.dev.report().enabled);
    rig.done();
}

#[test]
fn bad_type_and_bad_chain_are_delivery_errors() {
    let mut rig = Rig::new(false);
    let mut e = enable_hca_entry(false);
    e[0x00] = 0x05;
    rig.q.write(0, &e);
    assert_eq!(rig.ring(Duration::from_secs(2)).unwrap() >> 1, 0x10);

    // QUERY_ISSI needs an output mailbox (outlen 0x70); give it a block whose
    // block_num is wrong.
    let chain = DmaBuffer::alloc(&*rig.dev, &mut rig.space, 4096).unwrap();
    let mut blk = [0u8; 576];
    blk[0x238..0x23C].copy_from_slice(&7u32.to_be_bytes());
    chain.write(0, &blk);
    let mut e = [0u8; 64];
    e[0x00] = 0x07;
    e[0x04..0x08].copy_from_slice(&[0, 0, 0, 0x10]);
    e[0x10..0x14].copy_from_slice(&[0x01, 0x0A, 0, 0]);
    e[0x30..0x38].copy_from_slice(&chain.iova().0.to_be_bytes());
    e[0x38..0x3C].copy_from_slice(&[0, 0, 0, 0x70]);
    e[0x3F] = 1;
    rig.q.write(0, &e);
    assert_eq!(
        rig.ring(Duration::from_secs(2)).unwrap() >> 1,
        0x03,
        "bad block number"
    );

    // Token mismatch between entry and block.
    blk[0x238..0x23C].copy_from_slice(&0u32.to_be_bytes());
    blk[0x23D] = 9;
    chain.write(0, &blk);
    e[0x3C] = 8;
    rig.q.write(0, &e);
    assert_eq!(
        rig.ring(Duration::from_secs(2)).unwrap() >> 1,
        0x02,
        "token error"
    );

    // Misaligned output mailbox pointer.
    e[0x3C] = 9;
    e[0x30..0x38].copy_from_slice(&(chain.iova().0 + 8).to_be_bytes());
    rig.q.write(0, &e);
    assert_eq!(rig.ring(Duration::from_secs(2)).unwrap() >> 1, 0x04);
    chain.release(&*rig.dev, &mut rig.space).unwrap();
    rig.done();
}
