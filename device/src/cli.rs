//! Command line of `ipoib-vfio`.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::probe::{self, DeviceSpec, ProbeOptions};

/// IP over InfiniBand for virtual machines and hosts, on ConnectX HCAs owned through VFIO.
#[derive(Debug, Parser)]
#[command(name = "ipoib-vfio", version, about)]
pub struct Cli {
    /// Log filter (tracing EnvFilter syntax, e.g. `info` or `mlx5_driver=debug`);
    /// also read from IPOIB_LOG. Quiet by default.
    #[arg(long, global = true)]
    pub log: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Completion mode on the command interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CompletionArg {
    /// Sleep on the MSI-X interrupt of the command-completion EQE.
    Events,
    /// Spin on the ownership bit.
    Polled,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Bring the HCA up, print what it reports, tear it down.
    #[command(after_long_help = SIM_FAULT_HELP)]
    Probe {
        /// PCI address of a card bound to vfio-pci (e.g. 0000:81:00.0), or `sim`
        /// for the software HCA.
        #[arg(long)]
        device: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Inject a fault into the software HCA (repeatable; `--device sim` only).
        #[arg(long = "sim-fault", value_name = "FAULT")]
        sim_faults: Vec<String>,
        /// Plug the software HCA into the fabric served by `ipoib-fabric` at
        /// this socket (`--device sim` only); without it the port has no
        /// subnet manager and stays INIT.
        #[arg(long, value_name = "SOCKET")]
        fabric: Option<std::path::PathBuf>,
        /// Seconds to wait for the ports to become Active before reporting
        /// (default 10 with --fabric, 0 otherwise).
        #[arg(long)]
        wait_active: Option<u64>,
        /// Per-command timeout in milliseconds.
        #[arg(long, default_value_t = 60_000)]
        cmd_timeout_ms: u64,
        /// How long firmware may stay initializing, in milliseconds.
        #[arg(long, default_value_t = 120_000)]
        fw_ready_timeout_ms: u64,
        /// Command completion mode once the EQ exists.
        #[arg(long, value_enum, default_value_t = CompletionArg::Events)]
        completion: CompletionArg,
    },
    /// Run IPoIB on the HCA: bring it up, create the host interface, serve
    /// datagram mode until SIGTERM or SIGINT, then leave every group and
    /// destroy every HCA object.
    #[command(after_long_help = SIM_FAULT_HELP)]
    Run {
        /// A TOML configuration file; flags given here override it.
        #[arg(long, value_name = "FILE")]
        config: Option<std::path::PathBuf>,
        /// PCI address of a card bound to vfio-pci, or `sim`.
        #[arg(long)]
        device: Option<String>,
        /// Inject a fault into the software HCA (repeatable; `--device sim` only).
        #[arg(long = "sim-fault", value_name = "FAULT")]
        sim_faults: Vec<String>,
        /// Plug the software HCA into the fabric served by `ipoib-fabric` at
        /// this socket (`--device sim` only).
        #[arg(long, value_name = "SOCKET")]
        fabric: Option<std::path::PathBuf>,
        /// Name of the host interface (default ib0).
        #[arg(long)]
        ifname: Option<String>,
        /// Create the host interface in this network namespace (a name as
        /// given to `ip netns add`).
        #[arg(long, value_name = "NAME")]
        netns: Option<String>,
        /// An address for the host interface, ADDRESS/PREFIX (repeatable).
        #[arg(long = "address", value_name = "CIDR")]
        addresses: Vec<String>,
        /// Seconds to wait for the port to become Active at start (default 10).
        #[arg(long)]
        wait_active: Option<u64>,
        /// The control socket `ipoib-tool` talks to, created mode 0600
        /// (default /run/ipoib-vfio.sock).
        #[arg(long, value_name = "PATH")]
        control: Option<std::path::PathBuf>,
        /// Numeric group ID whose members may use the control socket
        /// besides root (the socket becomes 0660).
        #[arg(long, value_name = "GID")]
        control_group: Option<u32>,
        /// Serve VMs on a vhost-user-net socket: IF=SOCKET[,mac=MAC][,ip=ADDRESS]...[,copy]
        /// (repeatable; one vNIC, with a UD QP of its own, per socket). Without
        /// mac= the guest's MAC is learned from its frames; without ip= its
        /// source addresses are learned (at most 16). The VM's memory is
        /// mapped for the HCA, which sends from it directly; `copy` copies
        /// every frame instead.
        #[arg(long = "vhost-user", value_name = "IF=SOCKET")]
        vhost_user: Vec<String>,
    },
}

const SIM_FAULT_HELP: &str = "\
Faults for --device sim (--sim-fault FAULT, repeatable; numbers decimal or 0x-hex):
  cmd-timeout=OPCODE                 firmware never completes OPCODE (e.g. 0x100 QUERY_HCA_CAP)
  cmd-error=OPCODE:STATUS[:SYNDROME] OPCODE fails with STATUS (e.g. cmd-error=0x301:0x3)
  health=SYND[:after=OPCODE]         health syndrome SYND with recovery required once OPCODE
                                     completed (default INIT_HCA 0x102); firmware stops
  slow-start=MS                      `initializing` stays set for MS ms after power-up
  page-storm=ROUNDS[:PAGES]          ROUNDS page requests of PAGES pages (default 64), each
                                     later taken back
  tx-sink=on                         sends are executed and completed but never put on the
                                     wire (for benchmarking what drives the HCA)

Exit status: 0 when bring-up and teardown succeeded, 1 when bring-up failed (one line
on stderr names the step, the command and the device's status and syndrome), 2 on
usage errors.";

fn init_logging(filter: Option<&str>) {
    let spec = filter
        .map(str::to_string)
        .or_else(|| std::env::var("IPOIB_LOG").ok())
        .unwrap_or_else(|| "off".to_string());
    let filter = tracing_subscriber::EnvFilter::try_new(&spec)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log.as_deref());
    match cli.command {
        Command::Probe {
            device,
            json,
            sim_faults,
            fabric,
            wait_active,
            cmd_timeout_ms,
            fw_ready_timeout_ms,
            completion,
        } => {
            let spec = match DeviceSpec::parse(&device, &sim_faults, fabric.as_deref()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("ipoib-vfio: {e}");
                    return ExitCode::from(2);
                }
            };
            let opts = ProbeOptions {
                json,
                cmd_timeout: Duration::from_millis(cmd_timeout_ms),
                fw_ready_timeout: Duration::from_millis(fw_ready_timeout_ms),
                completion: match completion {
                    CompletionArg::Events => mlx5_driver::Completion::Events,
                    CompletionArg::Polled => mlx5_driver::Completion::Polled,
                },
                wait_active: Duration::from_secs(wait_active.unwrap_or(if fabric.is_some() {
                    10
                } else {
                    0
                })),
            };
            probe::run(&spec, &opts)
        }
        Command::Run {
            config,
            device,
            sim_faults,
            fabric,
            ifname,
            netns,
            addresses,
            wait_active,
            control,
            control_group,
            vhost_user,
        } => {
            let file = match config.as_deref().map(crate::config::FileConfig::load) {
                None => crate::config::FileConfig::default(),
                Some(Ok(f)) => f,
                Some(Err(e)) => {
                    eprintln!("ipoib-vfio: {e}");
                    return ExitCode::from(2);
                }
            };
            let iface = file.interface.first().cloned().unwrap_or_default();
            let Some(device) = device.or(file.device) else {
                eprintln!("ipoib-vfio: no device: give --device or `device` in the configuration");
                return ExitCode::from(2);
            };
            let sim_faults = if sim_faults.is_empty() {
                file.sim_faults
            } else {
                sim_faults
            };
            let fabric = fabric.or(file.fabric);
            let addresses = if addresses.is_empty() {
                iface.addresses
            } else {
                addresses
            };
            let ifname = ifname.or(iface.name).unwrap_or_else(|| "ib0".into());
            let netns = netns.or(iface.netns);
            let wait_active = wait_active.or(file.wait_active).unwrap_or(10);
            let control = control
                .or(file.control)
                .unwrap_or_else(|| ipoib_control::DEFAULT_SOCKET.into());
            let control_group = control_group.or(file.control_group);
            let spec = match DeviceSpec::parse(&device, &sim_faults, fabric.as_deref()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("ipoib-vfio: {e}");
                    return ExitCode::from(2);
                }
            };
            let addresses = match addresses
                .iter()
                .map(|a| crate::daemon::parse_cidr(a))
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("ipoib-vfio: --address {e}");
                    return ExitCode::from(2);
                }
            };
            let vhost_user = if vhost_user.is_empty() {
                iface
                    .vhost_user
                    .iter()
                    .map(|v| v.spec(&ifname))
                    .collect::<Result<Vec<_>, _>>()
            } else {
                vhost_user
                    .iter()
                    .map(|v| crate::vhost::VhostSpec::parse(v))
                    .collect::<Result<Vec<_>, _>>()
            };
            let vhost_user = match vhost_user {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("ipoib-vfio: --vhost-user {e}");
                    return ExitCode::from(2);
                }
            };
            if let Some(v) = vhost_user.iter().find(|v| v.interface != ifname) {
                eprintln!(
                    "ipoib-vfio: --vhost-user {}={}: this daemon serves {ifname}",
                    v.interface,
                    v.socket.display()
                );
                return ExitCode::from(2);
            }
            let opts = crate::daemon::RunOptions {
                ifname,
                netns,
                addresses,
                wait_active: Duration::from_secs(wait_active),
                control,
                control_group,
                vhost_user,
            };
            crate::daemon::run(&spec, &opts)
        }
    }
}
