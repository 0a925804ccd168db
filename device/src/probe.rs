//! `ipoib-vfio probe`: bring an HCA up, show what it reports, tear it down.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use mlx5_driver::hca::{BringupError, HcaInfo, TeardownReport};
use mlx5_driver::transport::Transport;
use mlx5_driver::{Completion, Hca, HcaConfig, error_chain as chain};

/// Which device to probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    /// A PCI function bound to vfio-pci, as `DDDD:BB:DD.F`.
    Pci(String),
    /// The software HCA with these fault specs, on the fabric served at a
    /// socket or on none.
    #[cfg(feature = "sim")]
    Sim(Vec<ipoib_sim::Fault>, Option<std::path::PathBuf>),
}

/// Errors in what the user asked for.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// Not a PCI address.
    #[error("`{0}` is neither `sim` nor a PCI address like 0000:81:00.0")]
    BadAddress(String),
    /// Faults make sense only on the software HCA.
    #[error("--sim-fault needs --device sim")]
    FaultsOnHardware,
    /// A simulated fabric makes sense only for the software HCA.
    #[error("--fabric needs --device sim")]
    FabricOnHardware,
    /// A fault spec did not parse.
    #[cfg(feature = "sim")]
    #[error(transparent)]
    Fault(#[from] ipoib_sim::fault::FaultParseError),
    /// Built without the software HCA.
    #[error("this build has no software HCA (built without the `sim` feature)")]
    NoSim,
}

/// Normalises a PCI address: `BB:DD.F` gets domain 0000; hex is lowercased.
pub fn parse_bdf(s: &str) -> Option<String> {
    let s = s.trim().to_ascii_lowercase();
    let full = if s.matches(':').count() == 1 {
        format!("0000:{s}")
    } else {
        s
    };
    let (dom, rest) = full.split_once(':')?;
    let (bus, rest) = rest.split_once(':')?;
    let (dev, func) = rest.split_once('.')?;
    let hex = |v: &str, n: usize| v.len() == n && v.chars().all(|c| c.is_ascii_hexdigit());
    let dev_ok = hex(dev, 2) && u8::from_str_radix(dev, 16).is_ok_and(|d| d < 32);
    let func_ok = func.len() == 1 && func.chars().all(|c| ('0'..='7').contains(&c));
    (hex(dom, 4) && hex(bus, 2) && dev_ok && func_ok).then_some(full)
}

impl DeviceSpec {
    /// Parses `--device` and `--sim-fault` values.
    pub fn parse(
        device: &str,
        faults: &[String],
        fabric: Option<&std::path::Path>,
    ) -> Result<DeviceSpec, SpecError> {
        if device == "sim" {
            #[cfg(feature = "sim")]
            {
                let f = faults
                    .iter()
                    .map(|s| s.parse::<ipoib_sim::Fault>())
                    .collect::<Result<Vec<_>, _>>()?;
                return Ok(DeviceSpec::Sim(f, fabric.map(std::path::Path::to_path_buf)));
            }
            #[cfg(not(feature = "sim"))]
            return Err(SpecError::NoSim);
        }
        if !faults.is_empty() {
            return Err(SpecError::FaultsOnHardware);
        }
        if fabric.is_some() {
            return Err(SpecError::FabricOnHardware);
        }
        parse_bdf(device)
            .map(DeviceSpec::Pci)
            .ok_or_else(|| SpecError::BadAddress(device.to_string()))
    }
}

/// Probe settings.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    /// JSON output.
    pub json: bool,
    /// Per-command timeout.
    pub cmd_timeout: Duration,
    /// Firmware-ready deadline.
    pub fw_ready_timeout: Duration,
    /// Completion mode.
    pub completion: Completion,
    /// Wait this long for the ports to become Active before reporting.
    pub wait_active: Duration,
}

/// Runs the probe and returns the process exit status.
pub fn run(spec: &DeviceSpec, opts: &ProbeOptions) -> ExitCode {
    match spec {
        DeviceSpec::Pci(bdf) => match mlx5_driver::transport::vfio::VfioTransport::open(bdf) {
            Ok(t) => probe_with(t, opts),
            Err(e) => fail_line(opts, &format!("opening {bdf} failed: {}", chain(&e)), None),
        },
        #[cfg(feature = "sim")]
        DeviceSpec::Sim(faults, fabric) => match sim_device(faults, fabric.as_deref()) {
            Ok(sim) => probe_with(sim, opts),
            Err(line) => fail_line(opts, &line, None),
        },
    }
}

/// A software HCA with `faults`, plugged into the fabric service at
/// `fabric` if given.
#[cfg(feature = "sim")]
pub fn sim_device(
    faults: &[ipoib_sim::Fault],
    fabric: Option<&std::path::Path>,
) -> Result<std::sync::Arc<ipoib_sim::SimHca>, String> {
    let mut cfg = ipoib_sim::SimConfig {
        faults: faults.to_vec(),
        ..ipoib_sim::SimConfig::default()
    };
    if fabric.is_some() {
        // Distinct GUIDs for HCAs of different processes on one fabric.
        cfg.node_guid ^= u64::from(std::process::id()) << 8;
    }
    let sim = std::sync::Arc::new(ipoib_sim::SimHca::new(cfg));
    if let Some(path) = fabric {
        sim.connect_remote(path)
            .map_err(|e| format!("connecting to the fabric at {}: {e}", path.display()))?;
    }
    Ok(sim)
}

fn fail_line(opts: &ProbeOptions, line: &str, err: Option<&BringupError>) -> ExitCode {
    eprintln!("ipoib-vfio: {line}");
    if opts.json {
        let v = serde_json::json!({
            "ok": false,
            "error": line,
            "step": err.map(|e| e.step.to_string()),
            "teardown": err.map(|e| &e.teardown),
        });
        println!("{v}");
    }
    ExitCode::FAILURE
}

fn probe_with<T: Transport>(t: T, opts: &ProbeOptions) -> ExitCode {
    let cfg = HcaConfig {
        cmd_timeout: opts.cmd_timeout,
        fw_ready_timeout: opts.fw_ready_timeout,
        completion: opts.completion,
        ..HcaConfig::default()
    };
    let hca = match Hca::bring_up(t, cfg) {
        Ok(h) => h,
        Err(e) => {
            let mut line = chain(&*e);
            if !e.teardown.clean() {
                let _ = write!(line, " (teardown: {})", e.teardown.errors.join("; "));
            }
            return fail_line(opts, &line, Some(&e));
        }
    };
    let mut hca = hca;
    if !opts.wait_active.is_zero() {
        wait_for_active(&mut hca, opts.wait_active);
    }
    let info = hca.info();
    let report = hca.shutdown();
    if opts.json {
        let v = serde_json::json!({ "ok": report.clean(), "hca": info, "teardown": report });
        println!("{v:#}");
    } else {
        print!("{}", render_text(&info, &report));
    }
    if report.clean() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "ipoib-vfio: teardown of {} left problems: {}",
            info.device,
            report.errors.join("; ")
        );
        ExitCode::FAILURE
    }
}

/// Serves events until every port is Active (the subnet manager has
/// configured it) or `limit` passes; the report shows whatever it reached.
pub fn wait_for_active<T: Transport>(hca: &mut Hca<T>, limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let all_active = hca
            .info()
            .ports
            .iter()
            .all(|p| p.state == mlx5_driver::layout::smp::PortState::Active);
        if all_active || std::time::Instant::now() >= deadline {
            return;
        }
        if hca.poll_events(Duration::from_millis(20)).is_err() || hca.refresh_ports().is_err() {
            return;
        }
    }
}

/// Marketing name of an mlx5 PCI device id (reference §1.1).
pub fn device_name(id: u16) -> &'static str {
    match id {
        0x1011 => "Connect-IB",
        0x1013 => "ConnectX-4",
        0x1015 => "ConnectX-4 Lx",
        0x1017 => "ConnectX-5",
        0x1019 => "ConnectX-5 Ex",
        0x101B => "ConnectX-6",
        0x101D => "ConnectX-6 Dx",
        0x101F => "ConnectX-6 Lx",
        0x1021 => "ConnectX-7",
        0x1023 => "ConnectX-8",
        0x1012 | 0x1014 | 0x1016 | 0x1018 | 0x101A | 0x101C | 0x101E => "ConnectX virtual function",
        0xA2D2 | 0xA2D3 | 0xA2D6 | 0xA2DC | 0xA2DF => "BlueField",
        _ => "unknown mlx5 device",
    }
}

fn guid(g: u64) -> String {
    let b = g.to_be_bytes();
    format!(
        "{:02x}{:02x}:{:02x}{:02x}:{:02x}{:02x}:{:02x}{:02x}",
        b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]
    )
}

/// A GID in the usual colon-separated form.
pub fn gid(g: &[u8; 16]) -> String {
    g.chunks(2)
        .map(|c| format!("{:02x}{:02x}", c[0], c[1]))
        .collect::<Vec<_>>()
        .join(":")
}

fn phys_name(p: u8) -> &'static str {
    match p {
        1 => "Sleep",
        2 => "Polling",
        3 => "Disabled",
        4 => "PortConfigurationTraining",
        5 => "LinkUp",
        6 => "LinkErrorRecovery",
        7 => "PhyTest",
        _ => "unknown",
    }
}

fn width_name(w: u8) -> &'static str {
    match w {
        1 => "1x",
        2 => "4x",
        4 => "8x",
        8 => "12x",
        16 => "2x",
        _ => "?x",
    }
}

/// The text report.
pub fn render_text(i: &HcaInfo, r: &TeardownReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{} ({})", i.device, device_name(i.pci.device));
    let _ = writeln!(
        s,
        "  PCI          {:04x}:{:04x} rev {:02x}",
        i.pci.vendor, i.pci.device, i.pci.revision
    );
    let _ = writeln!(
        s,
        "  firmware     {} (command interface {}, {} command slots)",
        i.fw_version, i.cmdif_rev, i.cmd_slots
    );
    let _ = writeln!(s, "  ISSI         {}", i.issi);
    let given = i.pages_given;
    let _ = writeln!(
        s,
        "  pages        {} boot + {} init; {} held by firmware ({} KiB)",
        i.boot_pages,
        i.init_pages,
        given,
        given * 4
    );
    let _ = writeln!(s, "  MSI-X        {} vectors", i.msix_vectors);
    for eq in &i.eqs {
        let _ = writeln!(
            s,
            "  EQ {:<9} vector {}, {} entries, events {:#x}",
            eq.eqn, eq.vector, eq.entries, eq.event_mask
        );
    }
    let _ = writeln!(
        s,
        "  objects      UAR {}, PD {}, lkey {:#010x}, reserved lkey {:#010x}",
        i.uar, i.pd, i.lkey, i.resd_lkey
    );
    let _ = writeln!(s, "  node GUID    {}", guid(i.node_guid));
    if i.port_type != 0 {
        let _ = writeln!(
            s,
            "  ports        Ethernet (port_type {}): not an InfiniBand function",
            i.port_type
        );
    }
    for p in &i.ports {
        let _ = writeln!(
            s,
            "  port {}       {} ({}), {}, LID {:#06x}, SM LID {:#06x} (SL {}), LMC {}",
            p.port,
            p.state,
            phys_name(p.phys_state),
            width_name(p.link_width),
            p.lid,
            p.sm_lid,
            p.sm_sl,
            p.lmc
        );
        let _ = writeln!(s, "    MTU        {} (max {})", p.mtu, p.max_mtu);
        let _ = writeln!(s, "    GID 0      {}", gid(&p.gid));
        let _ = writeln!(s, "    port GUID  {}", guid(p.port_guid));
        let pk: Vec<String> = p
            .pkeys
            .iter()
            .map(|(ix, k)| format!("[{ix}] {k:#06x}"))
            .collect();
        let _ = writeln!(
            s,
            "    P_Keys     {}",
            if pk.is_empty() {
                "none".into()
            } else {
                pk.join(", ")
            }
        );
    }
    if r.clean() {
        let _ = writeln!(
            s,
            "teardown: clean ({} pages reclaimed{})",
            r.pages_reclaimed,
            if r.reset { ", function reset" } else { "" }
        );
    } else {
        let _ = writeln!(s, "teardown: {}", r.errors.join("; "));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bdf_forms() {
        assert_eq!(parse_bdf("0000:81:00.0").as_deref(), Some("0000:81:00.0"));
        assert_eq!(parse_bdf("81:00.1").as_deref(), Some("0000:81:00.1"));
        assert_eq!(parse_bdf("0000:AF:1F.7").as_deref(), Some("0000:af:1f.7"));
        for bad in [
            "",
            "sim2",
            "81:00",
            "0000:81:20.0",
            "0000:81:00.8",
            "000:81:00.0",
            "x000:81:00.0",
        ] {
            assert_eq!(parse_bdf(bad), None, "{bad}");
        }
    }

    #[test]
    fn spec_rules() {
        assert!(matches!(
            DeviceSpec::parse("81:00.0", &[], None),
            Ok(DeviceSpec::Pci(_))
        ));
        assert!(matches!(
            DeviceSpec::parse("81:00.0", &["slow-start=1".into()], None),
            Err(SpecError::FaultsOnHardware)
        ));
        assert!(matches!(
            DeviceSpec::parse("81:00.0", &[], Some(std::path::Path::new("/x"))),
            Err(SpecError::FabricOnHardware)
        ));
        #[cfg(feature = "sim")]
        {
            let s = DeviceSpec::parse("sim", &["page-storm=2".into()], None);
            assert!(matches!(s, Ok(DeviceSpec::Sim(f, None)) if f.len() == 1));
            assert!(DeviceSpec::parse("sim", &["nonsense".into()], None).is_err());
        }
    }

    #[test]
    fn gid_format() {
        let mut g = [0u8; 16];
        g[0] = 0xfe;
        g[1] = 0x80;
        g[15] = 0x01;
        assert_eq!(gid(&g), "fe80:0000:0000:0000:0000:0000:0000:0001");
    }
}
