//! `cargo xtask demo`: the main job on the simulated default.
//!
//! A simulated fabric with its subnet manager, two `ipoib-vfio` daemons on
//! software HCAs with their `ib0` interfaces in two network namespaces,
//! then ping (small and 60000 bytes, IPv4 and IPv6) and a short iperf3
//! between them. Everything is removed afterwards, also on Ctrl-C.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Programs the demo runs, with their Debian packages.
pub const DEMO_PACKAGES: &[(&str, &str)] = &[
    ("busybox-static", "busybox"),
    ("iproute2", "ip"),
    ("iputils-ping", "ping"),
    ("iperf3", "iperf3"),
];

/// Everything the demo started; removed on drop, whatever happened.
pub(crate) struct Scene {
    pub(crate) dir: PathBuf,
    fabric: Option<Child>,
    pub(crate) daemons: Vec<Child>,
    netns: Vec<String>,
}

impl Scene {
    /// An empty scene working in `dir` (created).
    pub(crate) fn new(dir: PathBuf) -> Result<Scene, String> {
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(Scene {
            dir,
            fabric: None,
            daemons: Vec::new(),
            netns: Vec::new(),
        })
    }

    /// Creates network namespace `name`, removed with the scene.
    pub(crate) fn netns(&mut self, name: &str) -> Result<String, String> {
        let st = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .map_err(|e| format!("ip netns add: {e}"))?;
        if !st.success() {
            return Err(format!("ip netns add {name} failed (this needs root)"));
        }
        self.netns.push(name.to_string());
        Ok(name.to_string())
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            let _ = Command::new("kill")
                .args(["-TERM", &d.id().to_string()])
                .status();
        }
        for d in &mut self.daemons {
            let deadline = Instant::now() + Duration::from_secs(10);
            while d.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = d.kill();
            let _ = d.wait();
        }
        if let Some(f) = &mut self.fabric {
            let _ = f.kill();
            let _ = f.wait();
        }
        for ns in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn in_ns(ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).args(args);
    c
}

fn show(title: &str, cmd: &mut Command, stop: &AtomicBool) -> Result<String, String> {
    if stop.load(Ordering::Relaxed) {
        return Err("interrupted".into());
    }
    println!("$ {title}");
    let out = cmd.output().map_err(|e| format!("{title}: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    print!("{text}");
    println!();
    if stop.load(Ordering::Relaxed) {
        return Err("interrupted".into());
    }
    if !out.status.success() {
        return Err(format!(
            "{title} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(text)
}

/// Starts `ipoib-vfio run` on a software HCA in `ns` with `addrs` and
/// `extra` flags; returns it and its "up" line once the interface is up.
pub(crate) fn start_daemon(
    bin: &Path,
    socket: &Path,
    ns: &str,
    addrs: &[&str],
    extra: &[&str],
) -> Result<(Child, String), String> {
    let mut cmd = Command::new(bin);
    cmd.args(["run", "--device", "sim", "--fabric"])
        .arg(socket)
        .args(["--netns", ns])
        .arg("--control")
        .arg(socket.with_file_name(format!("{ns}.ctl")));
    for a in addrs {
        cmd.args(["--address", a]);
    }
    cmd.args(extra);
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let Some(stderr) = child.stderr.take() else {
        return Err("no stderr pipe".into());
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(l) if l.contains(" up, hardware address") => return Ok((child, l)),
            Ok(l) => eprintln!("  {l}"),
            Err(_) => {
                let _ = child.kill();
                return Err(format!("the daemon in {ns} did not come up"));
            }
        }
    }
}

/// Starts `ipoib-fabric` in the scene's directory (with a capture if
/// `pcap`); returns its socket once it listens.
pub(crate) fn start_fabric(
    scene: &mut Scene,
    target: &Path,
    pcap: bool,
) -> Result<PathBuf, String> {
    let socket = scene.dir.join("fabric.sock");
    println!("==> a simulated InfiniBand fabric with its subnet manager");
    println!(
        "$ ipoib-fabric --socket {}{}",
        socket.display(),
        if pcap { " --pcap fabric.pcap" } else { "" }
    );
    let mut fabric = Command::new(target.join("ipoib-fabric"));
    fabric.arg("--socket").arg(&socket);
    if pcap {
        fabric.arg("--pcap").arg(scene.dir.join("fabric.pcap"));
    }
    let fabric = fabric
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start ipoib-fabric: {e}"))?;
    scene.fabric = Some(fabric);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if Instant::now() > deadline {
            return Err("the fabric did not start".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(socket)
}

/// Starts the fabric (with a capture if `pcap`) and two daemons whose
/// interfaces live in two new namespaces; returns the namespace names.
fn ipoib_hosts(
    scene: &mut Scene,
    target: &Path,
    pcap: bool,
    tag: &str,
    extra_b: &[&str],
) -> Result<Vec<String>, String> {
    let pid = std::process::id();
    let socket = start_fabric(scene, target, pcap)?;
    let hosts = [
        ("a", "10.55.0.1/24", "fd00:55::1/64"),
        ("b", "10.55.0.2/24", "fd00:55::2/64"),
    ];
    let mut names = Vec::new();
    for (host, v4, v6) in hosts {
        let ns = scene.netns(&format!("ipoib-{tag}-{host}-{pid}"))?;
        println!();
        println!("==> host {host}: an ipoib-vfio daemon on a simulated ConnectX-5, ib0 in {ns}");
        let extra = if host == "b" { extra_b } else { &[] };
        println!(
            "$ ipoib-vfio run --device sim --fabric fabric.sock --netns {ns} --address {v4} --address {v6} {}",
            extra.join(" ")
        );
        let (child, line) =
            start_daemon(&target.join("ipoib-vfio"), &socket, &ns, &[v4, v6], extra)?;
        println!("{line}");
        scene.daemons.push(child);
        names.push(ns);
    }
    Ok(names)
}

/// Runs the demo with the built binaries in `target` and the QEMU guest
/// prepared in `guest`.
pub fn run(target: &Path, guest: &Path) -> Result<(), String> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).map_err(|e| e.to_string())?;
    }
    let pid = std::process::id();
    let dir = std::env::temp_dir().join(format!("ipoib-demo-{pid}"));
    let mut scene = Scene::new(dir.clone())?;
    let vm_sock = dir.join("vm.sock");
    let spec = format!("ib0={}", vm_sock.display());
    let names = ipoib_hosts(&mut scene, target, true, "demo", &["--vhost-user", &spec])?;
    let (a, b) = (&names[0], &names[1]);
    println!();
    show(
        &format!("ip -n {a} -d addr show ib0"),
        Command::new("ip").args(["-n", a, "-d", "addr", "show", "ib0"]),
        &stop,
    )?;

    let tool = target.join("ipoib-tool");
    let ctl_a = dir.join(format!("{a}.ctl"));
    show(
        "ipoib-tool show ib0   (host a)",
        Command::new(&tool)
            .arg("--control")
            .arg(&ctl_a)
            .args(["show", "ib0"]),
        &stop,
    )?;

    println!("==> traffic from a to b");
    let ping4 = show(
        "ping -c 3 10.55.0.2",
        &mut in_ns(a, &["ping", "-c", "3", "-i", "0.3", "10.55.0.2"]),
        &stop,
    )?;
    let big = show(
        "ping -c 2 -s 60000 10.55.0.2   (IP fragments over the 2044-byte IPoIB MTU)",
        &mut in_ns(
            a,
            &["ping", "-c", "2", "-i", "0.3", "-s", "60000", "10.55.0.2"],
        ),
        &stop,
    )?;
    let ping6 = show(
        "ping -6 -c 3 fd00:55::2",
        &mut in_ns(a, &["ping", "-6", "-c", "3", "-i", "0.3", "fd00:55::2"]),
        &stop,
    )?;
    let mut server = in_ns(b, &["iperf3", "-s", "-1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("iperf3: {e}"))?;
    std::thread::sleep(Duration::from_millis(500));
    let iperf = show(
        "iperf3 -c 10.55.0.2 -t 3",
        &mut in_ns(a, &["iperf3", "-c", "10.55.0.2", "-t", "3", "-f", "m"]),
        &stop,
    );
    let _ = server.kill();
    let _ = server.wait();
    let iperf = iperf?;

    let rtt = |s: &str| {
        s.lines()
            .find(|l| l.starts_with("rtt"))
            .unwrap_or("")
            .to_string()
    };
    let rate = iperf
        .lines()
        .rev()
        .find(|l| l.contains("receiver"))
        .unwrap_or("")
        .to_string();
    for (what, note) in [
        ("neigh", "   (host a: its neighbour table)"),
        ("mcg", ""),
        ("stats", ""),
    ] {
        show(
            &format!("ipoib-tool {what} ib0{note}"),
            Command::new(&tool)
                .arg("--control")
                .arg(&ctl_a)
                .args([what, "ib0"]),
            &stop,
        )?;
    }
    println!("==> a VM on host b: QEMU (TCG) with a virtio-net NIC on b's vhost-user socket");
    println!(
        "    it pings host a (IPv4, IPv6, fragmented), downloads 1 MB from it over TCP, and host a"
    );
    println!("    fetches 1 MB from it (sent by the HCA straight from the VM's memory)");
    let www = dir.join("www");
    std::fs::create_dir_all(&www).map_err(|e| e.to_string())?;
    let blob: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(www.join("blob"), blob).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(www.join("cgi-bin")).map_err(|e| e.to_string())?;
    std::fs::copy(guest.join("fetch.cgi"), www.join("cgi-bin/fetch"))
        .map_err(|e| format!("fetch.cgi: {e}"))?;
    let mut httpd = in_ns(a, &["busybox", "httpd", "-f", "-p", "8000", "-h"])
        .arg(&www)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("busybox httpd: {e}"))?;
    println!(
        "$ qemu-system-x86_64 -accel tcg ... -netdev vhost-user,... -device virtio-net-pci,host_mtu=2044,..."
    );
    let vm = crate::qemu::command(
        guest,
        &vm_sock,
        "ipoib.ip4=10.55.0.9/24 ipoib.ip6=fd00:55::9/64 ipoib.peer4=10.55.0.1 \
         ipoib.peer6=fd00:55::1 ipoib.url=http://10.55.0.1:8000/blob \
         ipoib.fetch=http://10.55.0.1:8000/cgi-bin/fetch",
    )
    .stdin(Stdio::null())
    .output();
    let _ = httpd.kill();
    let _ = httpd.wait();
    let console =
        String::from_utf8_lossy(&vm.map_err(|e| format!("qemu: {e}"))?.stdout).into_owned();
    for l in console.lines().filter(|l| l.starts_with("GUEST")) {
        println!("    [guest] {l}");
    }
    println!();
    let ctl_b = dir.join(format!("{b}.ctl"));
    show(
        "ipoib-tool vms ib0   (host b: the VM's vNIC, its own QPN, its counters)",
        Command::new(&tool)
            .arg("--control")
            .arg(&ctl_b)
            .args(["vms", "ib0"]),
        &stop,
    )?;
    let vm_ok = [
        "GUEST-PING4-OK",
        "GUEST-PING6-OK",
        "GUEST-PING-FRAG-OK",
        "GUEST-TCP bytes=1000000",
        "GUEST-UPLOAD fetched=1000000",
    ]
    .iter()
    .all(|w| console.contains(w));

    println!("==> summary");
    println!("  IPv4 ping:          {}", rtt(&ping4));
    println!("  IPv4 60000-byte:    {}", rtt(&big));
    println!("  IPv6 ping:          {}", rtt(&ping6));
    println!("  iperf3 TCP:         {}", rate.trim());
    println!(
        "  VM on host b:       {}",
        if vm_ok {
            "pinged host a over IPv4 and IPv6, fetched 1 MB from it and served it 1 MB over TCP"
        } else {
            "FAILED (see the guest's lines above)"
        }
    );
    println!(
        "  capture:            fabric.pcap (removed with the demo; run ipoib-fabric --pcap to keep one)"
    );
    println!();
    println!("==> stopping: SIGTERM to the daemons (they leave their groups and free the HCA)");
    let mut clean = true;
    for d in &mut scene.daemons {
        let _ = Command::new("kill")
            .args(["-TERM", &d.id().to_string()])
            .status();
        let st = d.wait().map_err(|e| e.to_string())?;
        clean &= st.success();
    }
    scene.daemons.clear();
    drop(scene);
    if !clean {
        return Err("a daemon did not exit cleanly".into());
    }
    if !vm_ok {
        return Err("the VM could not reach host a".into());
    }
    println!("    all daemons exited cleanly; namespaces and the fabric removed");
    Ok(())
}

/// TCP throughput (Mbit/s, iperf3 receiver side) and mean ping round trip
/// (ms) from namespace `a` to `dst` in namespace `b`.
fn measure(a: &str, b: &str, dst: &str, stop: &AtomicBool) -> Result<(f64, f64), String> {
    if stop.load(Ordering::Relaxed) {
        return Err("interrupted".into());
    }
    let ping = in_ns(a, &["ping", "-c", "20", "-i", "0.2", "-q", dst])
        .output()
        .map_err(|e| format!("ping: {e}"))?;
    let text = String::from_utf8_lossy(&ping.stdout);
    let rtt = text
        .lines()
        .find(|l| l.starts_with("rtt"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.trim().split('/').nth(1))
        .and_then(|avg| avg.parse::<f64>().ok())
        .ok_or_else(|| format!("ping to {dst} failed: {text}"))?;
    let mut server = in_ns(b, &["iperf3", "-s", "-1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("iperf3: {e}"))?;
    std::thread::sleep(Duration::from_millis(500));
    let out = in_ns(a, &["iperf3", "-c", dst, "-t", "5", "-J"]).output();
    let _ = server.kill();
    let _ = server.wait();
    let out = out.map_err(|e| format!("iperf3: {e}"))?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("iperf3 output: {e}"))?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| format!("iperf3 to {dst} failed: {}", v["error"]))?;
    Ok((bps / 1e6, rtt))
}

/// The IPoIB-versus-veth benchmark: the same ping and iperf3 between two
/// namespaces over a veth pair and over two daemons on the simulated
/// fabric, in one run. Returns the figures as Markdown table rows.
pub fn bench(target: &Path) -> Result<Vec<String>, String> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).map_err(|e| e.to_string())?;
    }
    let pid = std::process::id();
    let dir = std::env::temp_dir().join(format!("ipoib-bench-{pid}"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;

    let veth = {
        let mut scene = Scene::new(dir.join("veth"))?;
        let va = scene.netns(&format!("ipoib-veth-a-{pid}"))?;
        let vb = scene.netns(&format!("ipoib-veth-b-{pid}"))?;
        let steps: [&[&str]; 5] = [
            &[
                "link", "add", "veth-a", "netns", &va, "type", "veth", "peer", "name", "veth-b",
                "netns", &vb,
            ],
            &["-n", &va, "addr", "add", "10.66.0.1/24", "dev", "veth-a"],
            &["-n", &vb, "addr", "add", "10.66.0.2/24", "dev", "veth-b"],
            &["-n", &va, "link", "set", "veth-a", "up"],
            &["-n", &vb, "link", "set", "veth-b", "up"],
        ];
        for args in steps {
            let ok = Command::new("ip")
                .args(args)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                return Err(format!("ip {}", args.join(" ")));
            }
        }
        println!("==> veth pair");
        measure(&va, &vb, "10.66.0.2", &stop)?
    };
    let ipoib = {
        let mut scene = Scene::new(dir.join("ipoib"))?;
        let names = ipoib_hosts(&mut scene, target, false, "bench", &[])?;
        println!("==> IPoIB over the simulated fabric");
        measure(&names[0], &names[1], "10.55.0.2", &stop)?
    };
    let _ = std::fs::remove_dir_all(&dir);
    Ok(vec![
        format!(
            "| iperf3 TCP throughput, Mbit/s | {:.0} | {:.0} | {:.3} |",
            ipoib.0,
            veth.0,
            ipoib.0 / veth.0
        ),
        format!(
            "| ping round trip (mean of 20), ms | {:.3} | {:.3} | {:.3} |",
            ipoib.1,
            veth.1,
            veth.1 / ipoib.1
        ),
    ])
}
