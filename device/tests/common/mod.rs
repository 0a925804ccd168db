//! Helpers shared by the privileged test suites of this crate.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A simulated fabric built from `cfg`, served to daemons on `socket` by
/// a thread of this test.
pub fn serve_fabric(
    cfg: ipoib_sim::FabricConfig,
    socket: &std::path::Path,
) -> std::sync::Arc<ipoib_sim::Fabric> {
    let fabric = std::sync::Arc::new(ipoib_sim::Fabric::new(cfg).unwrap());
    let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
    let f2 = fabric.clone();
    std::thread::spawn(move || ipoib_sim::remote::serve(&f2, &listener));
    fabric
}

/// A network namespace this test created; deleted when dropped.
pub struct Netns(pub String);

impl Netns {
    /// Creates `ipoib-TAG-PID` (needs root and iproute2).
    pub fn new(tag: &str) -> Netns {
        let name = format!("ipoib-{tag}-{}", std::process::id());
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip (iproute2) must be installed; cargo xtask test installs it");
        assert!(st.success(), "ip netns add {name} (this test needs root)");
        Netns(name)
    }

    /// Its file, for `setns`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.0)
    }

    /// Runs `cmd` inside it.
    pub fn exec(&self, cmd: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(cmd)
            .output()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e} (cargo xtask test installs the tools)"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A running daemon; SIGKILLed if the test fails before stopping it.
pub struct Daemon {
    child: Option<Child>,
    control: std::path::PathBuf,
}

impl Daemon {
    pub fn start(socket: &std::path::Path, ns: &Netns, addrs: &[&str]) -> Daemon {
        Daemon::start_with(socket, ns, addrs, &[])
    }

    /// Starts a daemon with `extra` flags besides the usual ones.
    pub fn start_with(
        socket: &std::path::Path,
        ns: &Netns,
        addrs: &[&str],
        extra: &[&str],
    ) -> Daemon {
        let control = socket.with_file_name(format!("{}.ctl", ns.0));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ipoib-vfio"));
        cmd.args(["run", "--device", "sim", "--fabric"])
            .arg(socket)
            .args(["--netns", &ns.0])
            .arg("--control")
            .arg(&control);
        for a in addrs {
            cmd.args(["--address", a]);
        }
        cmd.args(extra);
        Daemon::launch(cmd, control, &ns.0)
    }

    /// Starts a daemon configured by a TOML file only.
    pub fn start_from_file(socket: &std::path::Path, ns: &Netns, addrs: &[&str]) -> Daemon {
        let control = socket.with_file_name(format!("{}.ctl", ns.0));
        let file = socket.with_file_name(format!("{}.toml", ns.0));
        let quoted: Vec<String> = addrs.iter().map(|a| format!("{a:?}")).collect();
        let text = format!(
            "device = \"sim\"\nfabric = {:?}\ncontrol = {:?}\n\n[[interface]]\nname = \"ib0\"\nnetns = {:?}\naddresses = [{}]\n",
            socket.display().to_string(),
            control.display().to_string(),
            ns.0,
            quoted.join(", ")
        );
        std::fs::write(&file, text).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ipoib-vfio"));
        cmd.args(["run", "--config"]).arg(&file);
        Daemon::launch(cmd, control, &ns.0)
    }

    fn launch(mut cmd: Command, control: std::path::PathBuf, ns: &str) -> Daemon {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[daemon] {line}");
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.contains(" up, hardware address") => break,
                Ok(_) => {}
                Err(_) => panic!("daemon in {ns} did not come up"),
            }
        }
        Daemon {
            child: Some(child),
            control,
        }
    }

    pub fn ask(&self, cmd: ipoib_control::Command) -> ipoib_control::Reply {
        ipoib_control::call(&self.control, cmd).unwrap().reply
    }

    /// SIGTERM, then the exit status (success means every HCA object,
    /// page and mapping came back).
    pub fn stop(mut self) -> bool {
        let mut child = self.child.take().unwrap();
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
