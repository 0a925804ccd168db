//! ipoib-tool: what sysfs, ethtool and debugfs give for the kernel IPoIB
//! driver, for ipoib-vfio; and the plumbing to hand a card to vfio-pci.

#![warn(missing_docs)]
#![deny(unsafe_code)]

pub mod control;
pub mod vfio_bind;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mlx5_driver::transport::vfio::SysPaths;

/// Administration of ipoib-vfio.
#[derive(Debug, Parser)]
#[command(name = "ipoib-tool", version, about)]
pub struct Cli {
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Root of sysfs (for testing against a copy).
    #[arg(long, global = true, hide = true, default_value = "/sys")]
    pub sysfs: PathBuf,
    /// The control socket of the ipoib-vfio daemon to ask.
    #[arg(long, global = true, default_value = ipoib_control::DEFAULT_SOCKET)]
    pub control: PathBuf,
    /// Root of devfs (for testing against a copy).
    #[arg(long, global = true, hide = true, default_value = "/dev")]
    pub devfs: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Bind a PCI function to vfio-pci (driver_override, unbind, reprobe) and
    /// check that its IOMMU group is usable.
    BindVfio {
        /// PCI address, e.g. 0000:81:00.0.
        bdf: String,
    },
    /// Give a PCI function back to a host driver (default mlx5_core).
    UnbindVfio {
        /// PCI address.
        bdf: String,
        /// Driver to bind afterwards.
        #[arg(long, default_value = "mlx5_core")]
        driver: String,
    },
    /// Tell whether ipoib-vfio can open a PCI function, and what to fix if not.
    VfioStatus {
        /// PCI address.
        bdf: String,
    },
    /// IPoIB interfaces: mode, MTU, P_Key, port, state, LID, GID, hardware
    /// address, QPN.
    Show {
        /// Only this interface.
        interface: Option<String>,
    },
    /// Counters of an interface (ethtool -S), drops by reason.
    Stats {
        /// The interface.
        interface: String,
    },
    /// The neighbour table of an interface (debugfs ib0_path).
    Neigh {
        /// The interface.
        interface: String,
    },
    /// The multicast groups of an interface (debugfs ib0_mcg).
    Mcg {
        /// The interface.
        interface: String,
    },
    /// The VMs attached to an interface: socket, QPN, MAC, features
    /// negotiated, counters.
    Vms {
        /// The interface.
        interface: String,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let paths = SysPaths {
        sys: cli.sysfs.clone(),
        dev: cli.devfs.clone(),
    };
    let query = match &cli.command {
        Command::Show { interface } => Some(ipoib_control::Command::Show {
            interface: interface.clone(),
        }),
        Command::Stats { interface } => Some(ipoib_control::Command::Stats {
            interface: interface.clone(),
        }),
        Command::Neigh { interface } => Some(ipoib_control::Command::Neigh {
            interface: interface.clone(),
        }),
        Command::Mcg { interface } => Some(ipoib_control::Command::Mcg {
            interface: interface.clone(),
        }),
        Command::Vms { interface } => Some(ipoib_control::Command::Vms {
            interface: interface.clone(),
        }),
        _ => None,
    };
    if let Some(q) = query {
        return match control::run(&cli.control, q, cli.json) {
            Ok(text) => {
                print!("{text}");
                if cli.json {
                    println!();
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ipoib-tool: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let r = match &cli.command {
        Command::BindVfio { bdf } => vfio_bind::bind(&paths, bdf),
        Command::UnbindVfio { bdf, driver } => vfio_bind::unbind(&paths, bdf, driver),
        Command::VfioStatus { bdf } => vfio_bind::status(&paths, bdf),
        Command::Show { .. }
        | Command::Stats { .. }
        | Command::Neigh { .. }
        | Command::Mcg { .. }
        | Command::Vms { .. } => {
            return ExitCode::FAILURE;
        }
    };
    match r {
        Ok(report) => {
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print!("{}", report.render());
            }
            if report.ready {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({ "ok": false, "error": e.to_string() })
                );
            }
            eprintln!("ipoib-tool: {e}");
            ExitCode::FAILURE
        }
    }
}
