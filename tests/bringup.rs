//! Bring-up and teardown on the software HCA: the full sequence, every
//! injected fault, and the device's own rules on signatures and ownership.
//! The same round trip runs on a card when `IPOIB_TEST_DEVICE` is set.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ipoib_sim::{Fault, SimConfig, SimHca};
use ipoib_tests::{hardware_device, quick_cfg, sim, skip_hardware};
use mlx5_driver::cmd::CmdStatus;
use mlx5_driver::hca::{HcaError, Step};
use mlx5_driver::layout::smp::PortState;
use mlx5_driver::{Hca, HcaConfig};

#[test]
fn bring_up_and_teardown_return_everything() {
    let dev = sim(vec![]);
    let hca = Hca::bring_up(dev.clone(), quick_cfg()).expect("bring-up");
    let info = hca.info();
    assert_eq!(info.pci.vendor, 0x15B3);
    assert_eq!(info.pci.device, 0x1017);
    assert_eq!(info.fw_version, "16.35.4030");
    assert_eq!(info.issi, 1);
    assert_eq!(info.boot_pages, 128);
    assert_eq!(info.init_pages, 1024);
    assert_eq!(info.pages_given, 1152);
    assert_eq!(info.eqs.len(), 1);
    assert_eq!(info.eqs[0].vector, 0);
    assert_eq!(info.ports.len(), 1);
    let p = &info.ports[0];
    assert_eq!(p.state, PortState::Init, "link up, no subnet manager yet");
    assert_eq!(p.pkeys, vec![(0, 0xFFFF)]);
    assert_eq!(&p.gid[..8], &[0xfe, 0x80, 0, 0, 0, 0, 0, 0]);
    assert_eq!(p.port_guid, 0x0002_c903_00a1_b2c1);
    let during = dev.report();
    assert_eq!(during.pages_held, 1152);
    assert!(during.mappings > 0);

    let r = hca.shutdown();
    assert!(r.clean(), "{r:?}");
    assert!(!r.reset, "a healthy device needs no reset");
    assert_eq!(r.pages_reclaimed, 1152);
    let after = dev.report();
    assert_eq!(after.mappings, 0, "every DMA mapping came back: {after:?}");
    assert_eq!(after.pages_held, 0);
    assert_eq!(after.objects_alive, 0);
    assert_eq!(
        after.fw.objects_at_teardown, 0,
        "objects destroyed before TEARDOWN_HCA"
    );
    assert_eq!(after.fw.pages_leaked_at_disable, 0);
    assert_eq!(after.fw.page_corruptions, 0);
    assert_eq!(after.unmapped_while_held, 0);
    assert!(!after.enabled);
    assert_eq!(after.delivery_errors, 0);
}

#[test]
fn signatures_checked_by_the_device_pass() {
    let dev = std::sync::Arc::new(SimHca::new(SimConfig {
        force_signatures: true,
        ..SimConfig::default()
    }));
    let hca = Hca::bring_up(dev.clone(), quick_cfg()).expect("bring-up with signature checking");
    assert!(hca.shutdown().clean());
    assert_eq!(dev.report().delivery_errors, 0);
}

#[test]
fn polled_and_event_completion_both_work() {
    for mode in [
        mlx5_driver::Completion::Polled,
        mlx5_driver::Completion::Events,
    ] {
        let dev = sim(vec![]);
        let cfg = HcaConfig {
            completion: mode,
            ..quick_cfg()
        };
        let mut hca = Hca::bring_up(dev.clone(), cfg).expect("bring-up");
        for _ in 0..50 {
            hca.exec(&mlx5_driver::cmd::hca::Nop).expect("NOP");
        }
        // A fast device thread may finish a command before the driver ever
        // sleeps; over many commands, event mode must sleep on the eventfd
        // at least once.
        let mut extra = 0;
        while mode == mlx5_driver::Completion::Events && hca.stats().interrupts == 0 && extra < 2000
        {
            hca.exec(&mlx5_driver::cmd::hca::Nop).expect("NOP");
            extra += 1;
        }
        let interrupts = dev.report().interrupts;
        match mode {
            // Several completions may share one interrupt, but waiting needs them.
            mlx5_driver::Completion::Events => {
                assert!(interrupts >= 1, "{interrupts}");
                assert!(hca.stats().interrupts >= 1);
            }
            mlx5_driver::Completion::Polled => assert!(interrupts <= 1, "{interrupts}"),
        }
        assert!(hca.shutdown().clean());
    }
}

fn expect_failure(
    faults: Vec<Fault>,
) -> (Box<mlx5_driver::hca::BringupError>, ipoib_sim::SimReport) {
    let dev = sim(faults);
    let err = Hca::bring_up(dev.clone(), quick_cfg()).expect_err("bring-up must fail");
    let report = dev.report();
    assert_eq!(report.mappings, 0, "nothing left mapped: {report:?}");
    assert_eq!(err.teardown.dma_bytes_left, 0, "{:?}", err.teardown);
    (err, report)
}

use mlx5_driver::error_chain as one_line;

#[test]
fn command_error_names_step_command_status_and_syndrome() {
    let (err, report) = expect_failure(vec!["cmd-error=0x301:0x3:0xc0ffee".parse().unwrap()]);
    assert_eq!(err.step, Step::CreateEq);
    let line = one_line(&*err);
    assert_eq!(
        line,
        "bring-up of sim failed at creating the async EQ: CREATE_EQ (0x301) op_mod 0x0 failed: \
         status BAD_PARAM_ERR (0x03), syndrome 0x00c0ffee"
    );
    assert!(
        !err.teardown.reset,
        "firmware still answers, no reset needed"
    );
    assert_eq!(report.pages_held, 0);
    assert_eq!(report.fw.objects_at_teardown, 0);
}

#[test]
fn command_timeout_resets_the_function_and_frees_everything() {
    let (err, report) = expect_failure(vec!["cmd-timeout=0x100".parse().unwrap()]);
    assert_eq!(err.step, Step::QueryCaps);
    assert!(matches!(
        err.source,
        HcaError::Cmd(mlx5_driver::cmd::CmdError::Timeout { .. })
    ));
    assert!(one_line(&*err).contains("QUERY_HCA_CAP (0x100) op_mod 0x0 timed out after 300 ms"));
    assert!(
        err.teardown.reset,
        "a stuck slot needs a function reset before DMA is freed"
    );
    assert_eq!(report.resets, 1);
    assert_eq!(report.unmapped_while_held, 0);
}

#[test]
fn health_syndrome_is_decoded_and_teardown_is_clean() {
    let (err, report) = expect_failure(vec!["health=0x8".parse().unwrap()]);
    let line = one_line(&*err);
    assert!(line.contains("unrecoverable hardware error"), "{line}");
    assert!(line.contains("syndrome 0x08"), "{line}");
    assert!(err.teardown.reset);
    assert_eq!(report.unmapped_while_held, 0);
}

#[test]
fn slow_firmware_start_within_the_deadline_succeeds() {
    let dev = sim(vec![Fault::SlowStart(Duration::from_millis(300))]);
    let hca = Hca::bring_up(dev, quick_cfg()).expect("slow start within the deadline");
    assert!(hca.shutdown().clean());
}

#[test]
fn slow_firmware_start_past_the_deadline_fails_cleanly() {
    let dev = sim(vec![Fault::SlowStart(Duration::from_secs(30))]);
    let cfg = HcaConfig {
        fw_ready_timeout: Duration::from_millis(200),
        ..quick_cfg()
    };
    let err = Hca::bring_up(dev.clone(), cfg).expect_err("firmware never ready");
    assert_eq!(err.step, Step::FirmwareReady);
    assert_eq!(
        one_line(&*err),
        "bring-up of sim failed at waiting for firmware: firmware not ready after 200 ms (initializing = 1)"
    );
    assert_eq!(dev.report().mappings, 0);
}

#[test]
fn page_request_storm_is_served() {
    let dev = sim(vec!["page-storm=40:100".parse().unwrap()]);
    let mut hca = Hca::bring_up(dev.clone(), quick_cfg()).expect("bring-up under a storm");
    // Let the storm play out: 40 grants, then 40 reclaims.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        hca.poll_events(Duration::from_millis(10)).expect("events");
        let s = hca.stats();
        if s.pages_given_runtime == 4000 && s.pages_reclaimed_runtime == 4000 {
            break;
        }
    }
    let s = hca.stats();
    assert_eq!(s.page_requests, 80);
    assert_eq!(s.pages_given_runtime, 4000);
    assert_eq!(s.pages_reclaimed_runtime, 4000);
    assert_eq!(s.bogus_pages, 0);
    assert_eq!(dev.report().pages_held, 1152);
    let r = hca.shutdown();
    assert!(r.clean(), "{r:?}");
    let rep = dev.report();
    assert_eq!(rep.mappings, 0);
    assert_eq!(rep.fw.eq_overruns, 0);
    assert_eq!(rep.fw.page_corruptions, 0);
}

#[test]
fn every_command_status_is_reported_typed() {
    for (op, step) in [
        (0x104u16, Step::EnableHca),
        (0x102, Step::InitHca),
        (0x800, Step::AllocPd),
    ] {
        let (err, _) = expect_failure(vec![format!("cmd-error={op:#x}:0x5").parse().unwrap()]);
        assert_eq!(err.step, step);
        match &err.source {
            HcaError::Cmd(e) => assert_eq!(e.status(), Some(CmdStatus::BadResource)),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn hardware_bring_up_round_trip() {
    let Some(bdf) = hardware_device() else {
        skip_hardware("hardware_bring_up_round_trip");
        return;
    };
    let t = mlx5_driver::transport::vfio::VfioTransport::open(&bdf).expect("open the card");
    let hca = Hca::bring_up(t, HcaConfig::default()).expect("bring-up on hardware");
    let info = hca.info();
    assert_eq!(info.pci.vendor, 0x15B3);
    assert!(!info.ports.is_empty());
    let r = hca.shutdown();
    assert!(r.clean(), "{r:?}");
}

#[test]
fn command_with_multi_block_input_and_output() {
    // ACCESS_REG read of PMTU with a 1200-byte register image: input and
    // output each need three mailbox blocks. The tail travels out in input
    // block 2 and must come back in output block 2.
    let dev = sim(vec![]);
    let mut hca = Hca::bring_up(dev.clone(), quick_cfg()).expect("bring-up");
    let mut data = vec![0u8; 1200];
    data[1] = 1; // local_port = 1 (0x00 bits 23:16)
    for (k, b) in data.iter_mut().enumerate().skip(16) {
        *b = (k * 7 % 251) as u8;
    }
    let cmd = mlx5_driver::cmd::hca::AccessReg {
        write: false,
        register_id: mlx5_driver::cmd::hca::reg::PMTU,
        argument: 0,
        data: data.clone(),
    };
    assert_eq!(mlx5_driver::layout::cmd::blocks_for(0x10 + 1200), 3);
    let out = hca.exec(&cmd).expect("ACCESS_REG");
    assert_eq!(out.len(), 1200);
    assert_eq!(u16::from_be_bytes([out[4], out[5]]), 4096, "max_mtu");
    assert_eq!(u16::from_be_bytes([out[12], out[13]]), 4096, "oper_mtu");
    assert_eq!(
        &out[16..],
        &data[16..],
        "tail came back through the output chain"
    );
    assert!(hca.shutdown().clean());
}
