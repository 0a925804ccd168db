//! ipoib-tool: what sysfs, ethtool and debugfs give for the kernel IPoIB
//! driver, for ipoib-vfio; and the plumbing to hand a card to vfio-pci.

#![warn(missing_docs)]
#![deny(unsafe_code)]

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
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let paths = SysPaths {
        sys: cli.sysfs.clone(),
        dev: cli.devfs.clone(),
    };
    let r = match &cli.command {
        Command::BindVfio { bdf } => vfio_bind::bind(&paths, bdf),
        Command::UnbindVfio { bdf, driver } => vfio_bind::unbind(&paths, bdf, driver),
        Command::VfioStatus { bdf } => vfio_bind::status(&paths, bdf),
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
