//! The `ipoib-vfio probe` command as a user runs it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

fn probe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ipoib-vfio"))
        .arg("probe")
        .args(args)
        .output()
        .expect("run ipoib-vfio")
}

#[test]
fn sim_probe_prints_the_hca() {
    let o = probe(&["--device", "sim"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for want in [
        "sim (ConnectX-5)",
        "15b3:1017",
        "firmware     16.35.4030",
        "ISSI         1",
        "128 boot + 1024 init",
        "vector 0",
        "port 1       INIT (LinkUp)",
        "GID 0      fe80:0000:0000:0000:0002:c903:00a1:b2c1",
        "[0] 0xffff",
        "teardown: clean (1152 pages reclaimed)",
    ] {
        assert!(out.contains(want), "missing `{want}` in:\n{out}");
    }
    assert!(
        o.stderr.is_empty(),
        "quiet by default: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn sim_probe_json() {
    let o = probe(&["--device", "sim", "--json", "--completion", "polled"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(v["ok"], true);
    assert_eq!(v["hca"]["pci"]["vendor"], 0x15B3);
    assert_eq!(v["hca"]["ports"][0]["state"], "Init");
    assert_eq!(v["hca"]["pages_given"], 1152);
    assert_eq!(v["teardown"]["dma_bytes_left"], 0);
}

#[test]
fn failure_is_one_line_with_step_command_status_syndrome() {
    let o = probe(&[
        "--device",
        "sim",
        "--sim-fault",
        "cmd-error=0x800:0x0f:0x77",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        err.trim_end(),
        "ipoib-vfio: bring-up of sim failed at ALLOC_PD: ALLOC_PD (0x800) op_mod 0x0 failed: \
         status NO_RES_ERR (0x0f), syndrome 0x00000077"
    );
    assert_eq!(err.lines().count(), 1);
    assert!(o.stdout.is_empty());
}

#[test]
fn timeout_fault_from_the_command_line() {
    let o = probe(&[
        "--device",
        "sim",
        "--sim-fault",
        "cmd-timeout=0x10a",
        "--cmd-timeout-ms",
        "200",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(v["ok"], false);
    assert_eq!(v["step"], "ISSI negotiation");
    assert_eq!(v["teardown"]["reset"], true);
    assert_eq!(v["teardown"]["dma_bytes_left"], 0);
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("QUERY_ISSI (0x10a) op_mod 0x0 timed out after 200 ms")
    );
}

#[test]
fn usage_errors_exit_2() {
    let o = probe(&["--device", "not-a-device"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("neither `sim` nor a PCI address"));
    let o = probe(&["--device", "sim", "--sim-fault", "cmd-error=0x100"]);
    assert_eq!(o.status.code(), Some(2));
    let o = probe(&["--device", "0000:81:00.0", "--sim-fault", "slow-start=1"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn missing_pci_device_is_reported() {
    let o = probe(&["--device", "0000:fe:1f.7"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no PCI device 0000:fe:1f.7"), "{err}");
}

#[test]
fn help_documents_the_faults() {
    let o = probe(&["--help"]);
    let out = String::from_utf8_lossy(&o.stdout);
    for f in [
        "cmd-timeout=",
        "cmd-error=",
        "health=",
        "slow-start=",
        "page-storm=",
    ] {
        assert!(out.contains(f), "{f} missing from --help");
    }
}

#[test]
fn probe_on_a_fabric_shows_the_subnet_managers_assignment() {
    let dir = std::env::temp_dir().join(format!("ipoib-probe-fabric-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("fabric.sock");
    let fabric = ipoib_sim::Fabric::new(ipoib_sim::FabricConfig::default()).unwrap();
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || ipoib_sim::remote::serve(&fabric, &listener));
    let o = probe(&[
        "--device",
        "sim",
        "--fabric",
        sock.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["hca"]["ports"][0]["state"], "Active");
    assert_eq!(v["hca"]["ports"][0]["lid"], 2);
    assert_eq!(v["hca"]["ports"][0]["sm_lid"], 1);
    // The next HCA on the fabric gets the next LID; the text says so.
    let o = probe(&["--device", "sim", "--fabric", sock.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("port 1       ACTIVE (LinkUp), 4x, LID 0x0003, SM LID 0x0001"),
        "{out}"
    );
    // No fabric at that path: a clear error.
    let o = probe(&[
        "--device",
        "sim",
        "--fabric",
        dir.join("nope").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("connecting to the fabric"));
    let _ = std::fs::remove_dir_all(&dir);
}
