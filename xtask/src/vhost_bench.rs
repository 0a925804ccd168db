//! `cargo xtask bench-vhost`: DPDK's testpmd (virtio-user, txonly) as the
//! VM, sending 64- and 1500-byte frames for a few seconds to
//!
//! (a) DPDK's own vhost-user backend (`net_vhost`, rxonly): the baseline;
//! (b) the ipoib-vfio backend on a software HCA that completes its sends
//!     without carrying them (`--sim-fault tx-sink=on`): the backend's and
//!     the driver's own cost, zero-copy (the default: frames of 512 bytes
//!     and more are sent from the VM's memory) and in copy mode (`,copy`);
//! (c) the ipoib-vfio backend end to end: across the simulated fabric to a
//!     second host, counted where that host's HCA receives them.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::demo::{Scene, start_daemon, start_fabric};

/// How long each measurement sends.
const SEND: Duration = Duration::from_secs(5);

/// A running testpmd and the Rx-pps/Tx-pps samples it printed.
struct Testpmd {
    child: Child,
    out: Arc<Mutex<String>>,
}

impl Testpmd {
    fn start(
        vdev: &str,
        lcores: (&str, &str),
        mode: &str,
        extra: &[&str],
    ) -> Result<Testpmd, String> {
        let mut child = Command::new("dpdk-testpmd")
            .args([
                "-l",
                lcores.0,
                "--main-lcore",
                lcores.1,
                "--no-pci",
                "--no-huge",
            ])
            .args(["-m", "256", "--no-shconf", "--vdev", vdev, "--"])
            .arg(format!("--forward-mode={mode}"))
            .args(["--auto-start", "--stats-period", "1", "--nb-cores=1"])
            .arg("--total-num-mbufs=16384")
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("dpdk-testpmd: {e} (apt-get install dpdk-dev)"))?;
        let stdout = child.stdout.take().ok_or("no testpmd stdout")?;
        let out = Arc::new(Mutex::new(String::new()));
        let o2 = out.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(mut o) = o2.lock() {
                    o.push_str(&line);
                    o.push('\n');
                }
            }
        });
        let t = Testpmd { child, out };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !t.text().contains("Port statistics") {
            if Instant::now() > deadline {
                return Err("testpmd did not start forwarding".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(t)
    }

    fn text(&self) -> String {
        self.out.lock().map(|o| o.clone()).unwrap_or_default()
    }

    /// The median of the `key` (`Rx-pps:` or `Tx-pps:`) samples after the
    /// first two (ramp-up).
    fn median(&self, key: &str) -> f64 {
        let text = self.text();
        let mut v: Vec<f64> = text
            .lines()
            .filter_map(|l| {
                let i = l.find(key)? + key.len();
                l[i..].split_whitespace().next()?.parse().ok()
            })
            .skip(2)
            .collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// (a): DPDK's vhost backend, rxonly, against the txonly frontend.
fn dpdk_baseline(dir: &Path, size: usize) -> Result<f64, String> {
    let sock = dir.join(format!("dpdk-{size}.sock"));
    let backend = Testpmd::start(
        &format!("net_vhost0,iface={},client=0,queues=1", sock.display()),
        ("0,1", "1"),
        "rxonly",
        &[],
    )?;
    let frontend = Testpmd::start(
        &format!("net_virtio_user0,path={},queues=1", sock.display()),
        ("0,1", "0"),
        "txonly",
        &[&format!("--txpkts={size}")],
    );
    let frontend = match frontend {
        Ok(f) => f,
        Err(e) => {
            backend.stop();
            return Err(e);
        }
    };
    std::thread::sleep(SEND);
    let pps = backend.median("Rx-pps:");
    frontend.stop();
    backend.stop();
    Ok(pps)
}

/// The value of counter `name` of the first VM of `ib0`, or of the
/// interface (`vm == false`), through ipoib-tool's JSON.
fn counter(tool: &Path, control: &Path, vm: bool, name: &str) -> Result<u64, String> {
    let what = if vm { "vms" } else { "stats" };
    let out = Command::new(tool)
        .arg("--control")
        .arg(control)
        .args(["--json", what, "ib0"])
        .output()
        .map_err(|e| format!("ipoib-tool: {e}"))?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("ipoib-tool output: {e}"))?;
    let counters = if vm {
        &v["vms"][0]["counters"]
    } else {
        &v["counters"]
    };
    counters
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == name))
        .and_then(|c| c["value"].as_u64())
        .ok_or_else(|| format!("no counter {name}"))
}

/// (b) or (c): testpmd into the ipoib-vfio backend of host b; the rate
/// counted by `count` (host b's sends, or host a's receives) over `SEND`.
fn ours(target: &Path, dir: &Path, size: usize, sink: bool, copy: bool) -> Result<f64, String> {
    let pid = std::process::id();
    let tag = match (sink, copy) {
        (true, false) => "sink",
        (true, true) => "sinkc",
        (false, _) => "e2e",
    };
    let mut scene = Scene::new(dir.join(format!("{tag}-{size}")))?;
    let socket = start_fabric(&mut scene, target, false)?;
    let vm = scene.dir.join("vm.sock");
    let spec = format!("ib0={}{}", vm.display(), if copy { ",copy" } else { "" });
    let mut names = Vec::new();
    for (host, addr) in [("a", "198.18.0.2/24"), ("b", "198.18.0.3/24")] {
        let ns = scene.netns(&format!("ipoib-vb-{tag}-{host}-{pid}"))?;
        let mut extra: Vec<&str> = Vec::new();
        if host == "b" {
            extra.extend(["--vhost-user", &spec]);
            if sink {
                extra.extend(["--sim-fault", "tx-sink=on"]);
            }
        }
        let (child, _) = start_daemon(&target.join("ipoib-vfio"), &socket, &ns, &[addr], &extra)?;
        scene.daemons.push(child);
        names.push(ns);
    }
    let ctl = |ns: &str| socket.with_file_name(format!("{ns}.ctl"));
    let tool = target.join("ipoib-tool");
    let tx = Testpmd::start(
        &format!("net_virtio_user0,path={},queues=1", vm.display()),
        ("0,1", "0"),
        "txonly",
        &[
            &format!("--txpkts={size}"),
            "--eth-peer=0,ff:ff:ff:ff:ff:ff",
            "--tx-ip=198.18.0.1,198.18.0.2",
        ],
    )?;
    std::thread::sleep(Duration::from_secs(1));
    let (control, vm_side, name) = if sink {
        (ctl(&names[1]), true, "tx_packets")
    } else {
        (ctl(&names[0]), false, "rx_packets")
    };
    let before = counter(&tool, &control, vm_side, name)?;
    let t = Instant::now();
    std::thread::sleep(SEND);
    let after = counter(&tool, &control, vm_side, name)?;
    let secs = t.elapsed().as_secs_f64();
    tx.stop();
    Ok((after - before) as f64 / secs)
}

/// Runs the measurements at both sizes; returns Markdown rows.
pub fn run(target: &Path) -> Result<Vec<String>, String> {
    let dir = std::env::temp_dir().join(format!("ipoib-bench-vhost-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    for size in [64usize, 1500] {
        println!("==> {size}-byte frames: DPDK vhost backend (rxonly)");
        let dpdk = dpdk_baseline(&dir, size)?;
        println!("    {dpdk:.0} pps");
        println!(
            "==> {size}-byte frames: ipoib-vfio backend, HCA completing sends without carrying them"
        );
        let zc = ours(target, &dir, size, true, false)?;
        println!("    zero-copy {zc:.0} pps");
        let copy = ours(target, &dir, size, true, true)?;
        println!("    copy      {copy:.0} pps");
        println!("==> {size}-byte frames: ipoib-vfio backend across the simulated fabric");
        let e2e = ours(target, &dir, size, false, false)?;
        println!("    {e2e:.0} pps");
        let r = |x: f64| x / dpdk.max(1.0);
        rows.push(format!(
            "| {size} | {dpdk:.0} | {zc:.0} | {:.3} | {copy:.0} | {:.3} | {e2e:.0} |",
            r(zc),
            r(copy)
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(rows)
}
