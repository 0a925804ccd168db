//! Developer entry points: `cargo xtask demo | test | bench`.
//!
//! `test` is what CI runs: it installs the system packages the suites need
//! (on a fresh Debian machine, as root), then runs formatting, lints and
//! every test suite, and fails if any step fails.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

mod demo;
mod qemu;
mod vhost_bench;

/// Debian packages the test suites need, with a program each provides.
/// Suites that start real third-party peers add theirs here.
const TEST_PACKAGES: &[(&str, &str)] = &[
    // Decodes the fabric's InfiniBand captures (tests/fabric_sa.rs).
    ("tshark", "tshark"),
    // Network namespaces for the host-side tests (device/tests/host_tun.rs).
    ("iproute2", "ip"),
    // Real peers across the daemons' interfaces (device/tests/daemon.rs).
    ("iputils-ping", "ping"),
    ("iperf3", "iperf3"),
    // The VM side of the vhost-user backend (device/tests/vhost_testpmd.rs).
    ("dpdk-dev", "dpdk-testpmd"),
    ("librte-net-virtio23", "dpdk-testpmd"),
    ("librte-net-vhost23", "dpdk-testpmd"),
    ("librte-mempool-ring23", "dpdk-testpmd"),
    // The host's HTTP server in the QEMU guest test (device/tests/vhost_qemu.rs).
    ("busybox-static", "busybox"),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn cargo() -> Command {
    let mut c = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn run(what: &str, cmd: &mut Command) -> Result<(), String> {
    println!("==> {what}");
    let t = Instant::now();
    let status = cmd
        .status()
        .map_err(|e| format!("{what}: cannot start: {e}"))?;
    if status.success() {
        println!("    {what}: ok ({:.1} s)", t.elapsed().as_secs_f64());
        Ok(())
    } else {
        Err(format!("{what} failed ({status})"))
    }
}

fn have(program: &str) -> bool {
    env::var_os("PATH").is_some_and(|p| env::split_paths(&p).any(|d| d.join(program).is_file()))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Installs the Debian packages whose programs are missing.
fn ensure_packages(pkgs: &[(&str, &str)]) -> Result<(), String> {
    let missing: Vec<&str> = pkgs
        .iter()
        .filter(|(_, bin)| !have(bin))
        .map(|(p, _)| *p)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        return Err(format!(
            "the test suites need these Debian packages: {} (run as root, or install them)",
            missing.join(" ")
        ));
    }
    run(
        "apt-get update",
        Command::new("apt-get").args(["update", "-qq"]),
    )?;
    run(
        &format!("apt-get install {}", missing.join(" ")),
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn ensure_rust_tools() -> Result<(), String> {
    for (tool, component) in [("fmt", "rustfmt"), ("clippy", "clippy")] {
        let ok = cargo()
            .args([tool, "--version"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            run(
                &format!("rustup component add {component}"),
                Command::new("rustup").args(["component", "add", component]),
            )?;
        }
    }
    Ok(())
}

fn test() -> Result<(), String> {
    let t = Instant::now();
    ensure_rust_tools()?;
    ensure_packages(TEST_PACKAGES)?;
    run(
        "cargo fmt --check",
        cargo().args(["fmt", "--all", "--", "--check"]),
    )?;
    run(
        "cargo clippy",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    run(
        "cargo check (hardware-only build, no software HCA)",
        cargo().args(["check", "-p", "ipoib-device", "--no-default-features"]),
    )?;
    // The vhost-user suite boots this guest (device/tests/vhost_qemu.rs).
    let guest = qemu::prepare(&root())?;
    run(
        "cargo test",
        cargo()
            .args(["test", "--workspace"])
            .env("IPOIB_QEMU_GUEST", &guest),
    )?;
    println!(
        "==> all checks passed in {:.0} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Release builds of the daemon, the fabric and ipoib-tool (the software
/// HCA and the fabric do per-byte work, CRCs, that a debug build makes an
/// order of magnitude slower); their directory.
fn release_programs() -> Result<PathBuf, String> {
    run(
        "release build of the daemon, the fabric and ipoib-tool",
        cargo().args([
            "build",
            "-q",
            "--release",
            "-p",
            "ipoib-device",
            "-p",
            "ipoib-sim",
            "-p",
            "ipoib-tool",
        ]),
    )?;
    Ok(root().join("target/release"))
}

fn demo() -> Result<(), String> {
    ensure_packages(demo::DEMO_PACKAGES)?;
    let target = release_programs()?;
    let bin = target.join("ipoib-vfio");
    println!();
    println!("==> bring-up of a simulated ConnectX-5 with one InfiniBand port");
    println!("$ ipoib-vfio probe --device sim");
    let st = Command::new(&bin)
        .args(["probe", "--device", "sim"])
        .status()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    if !st.success() {
        return Err("probe of the simulated HCA failed".into());
    }
    println!();
    // The VM the demo attaches to host b.
    let guest = qemu::prepare(&root())?;
    demo::run(&target, &guest)
}

fn bench() -> Result<(), String> {
    run(
        "command round-trip latency (software HCA)",
        cargo().args([
            "bench",
            "-p",
            "ipoib-tests",
            "--bench",
            "cmd_latency",
            "--",
            "--warm-up-time",
            "1",
            "--measurement-time",
            "5",
        ]),
    )?;
    run(
        "UD send + receive, batch 32, 2044-byte packets",
        cargo().args([
            "bench",
            "-p",
            "ipoib-tests",
            "--bench",
            "ud_pps",
            "--",
            "--packets",
            "200000",
        ]),
    )?;
    driver_instructions_per_packet()?;
    ipoib_versus_veth()?;
    vhost_versus_dpdk()
}

/// The vhost-user backend against DPDK's, with testpmd as the VM.
fn vhost_versus_dpdk() -> Result<(), String> {
    ensure_packages(TEST_PACKAGES)?;
    let rows = vhost_bench::run(&release_programs()?)?;
    println!();
    println!(
        "| frame bytes | DPDK vhost (rxonly), pps | ipoib-vfio zero-copy, sends sunk in the HCA, pps | ratio | same, copy mode, pps | ratio | ipoib-vfio zero-copy across the fabric, pps |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    Ok(())
}

/// The datagram-mode stack end to end (release build) against a veth pair
/// measured in the same run.
fn ipoib_versus_veth() -> Result<(), String> {
    ensure_packages(demo::DEMO_PACKAGES)?;
    let rows = demo::bench(&release_programs()?)?;
    println!();
    println!("| two namespaces | IPoIB (simulated fabric) | veth | ratio |");
    println!("|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    Ok(())
}

/// Runs the UD benchmark under callgrind, collecting only inside its
/// measured loop, and splits the instructions by where the code lives:
/// the driver (its source files, or library code inlined into its
/// functions), the benchmark harness, and the rest (the software HCA, the
/// channel to its thread, sleeping).
fn driver_instructions_per_packet() -> Result<(), String> {
    ensure_packages(&[("valgrind", "valgrind")])?;
    if !have("callgrind_annotate") {
        return Err("callgrind_annotate (valgrind) is needed for the instruction count".into());
    }
    let out = cargo()
        .args([
            "bench",
            "-p",
            "ipoib-tests",
            "--bench",
            "ud_pps",
            "--no-run",
        ])
        .output()
        .map_err(|e| format!("cargo bench --no-run: {e}"))?;
    let text = String::from_utf8_lossy(&out.stderr);
    let exe = text
        .lines()
        .find_map(|l| {
            l.split_once("benches/ud_pps.rs (")
                .map(|(_, r)| r.trim_end_matches(')').to_string())
        })
        .ok_or("cannot find the ud_pps benchmark executable")?;
    let profile = std::env::temp_dir().join(format!("ud_pps.{}.callgrind", std::process::id()));
    let run = Command::new("valgrind")
        .current_dir(root())
        .args(["--tool=callgrind", "--toggle-collect=*datapath_round*"])
        .arg(format!("--callgrind-out-file={}", profile.display()))
        .arg(&exe)
        .args(["--packets", "6400"])
        .output()
        .map_err(|e| format!("valgrind: {e}"))?;
    let stdout = String::from_utf8_lossy(&run.stdout);
    let packets: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("ud_pps: measured_packets="))
        .and_then(|v| v.trim().parse().ok())
        .ok_or("the benchmark did not report its packet count")?;
    let ann = Command::new("callgrind_annotate")
        .arg(&profile)
        .output()
        .map_err(|e| format!("callgrind_annotate: {e}"))?;
    let _ = std::fs::remove_file(&profile);
    let (mut driver, mut harness, mut other) = (0u64, 0u64, 0u64);
    let report = String::from_utf8_lossy(&ann.stdout);
    let rows = report
        .lines()
        .skip_while(|l| !l.contains("file:function"))
        .skip(2);
    for l in rows.take_while(|l| !l.trim().is_empty()) {
        let Some((count, rest)) = l.trim().split_once(' ') else {
            continue;
        };
        let Ok(n) = count.replace(',', "").parse::<u64>() else {
            continue;
        };
        let place = rest.split_once("%)").map_or(rest, |(_, r)| r).trim();
        let (file, func) = place.split_once(':').unwrap_or(("", place));
        if file.contains("driver/src/") || func.contains("mlx5_driver::") {
            driver += n;
        } else if file.contains("tests/") {
            harness += n;
        } else {
            other += n;
        }
    }
    println!("==> driver instructions per UD packet (send + receive, batch 32, callgrind)");
    println!("    driver:  {:.0} per packet", driver as f64 / packets);
    println!(
        "    harness: {:.0} per packet (benchmark loop)",
        harness as f64 / packets
    );
    println!(
        "    other:   {:.0} per packet (software HCA, its channel, sleeping)",
        other as f64 / packets
    );
    Ok(())
}

fn main() -> ExitCode {
    let task = env::args().nth(1).unwrap_or_default();
    let r = match task.as_str() {
        "test" => test(),
        "demo" => demo(),
        "bench" => bench(),
        "bench-ipoib" => ipoib_versus_veth(),
        "bench-vhost" => vhost_versus_dpdk(),
        "guest" => qemu::prepare(&root()).map(|d| println!("QEMU guest in {}", d.display())),
        _ => {
            eprintln!(
                "usage: cargo xtask <demo | test | bench | bench-ipoib | bench-vhost | guest>"
            );
            return ExitCode::from(2);
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}
