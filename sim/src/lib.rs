//! ipoib-sim: a software model of a ConnectX (mlx5) HCA.
//!
//! [`SimHca`] implements the driver's `Transport` trait the way a card does:
//! it has an initialization segment, executes commands when the command
//! doorbell is written (on its own device thread), reaches host memory only
//! through the mappings the driver made, asks for firmware pages and tracks
//! every one of them, produces EQEs with ownership bits and signals MSI-X
//! vectors through eventfds. It is written from the reference documents,
//! not from the driver's encoders, so an encoding mistake in the driver
//! fails a test instead of being mirrored. Faults ([`Fault`]) can be
//! injected from tests and from the command line.

#![warn(missing_docs)]
#![deny(unsafe_code)]

mod bytes;
pub mod caps;
mod eq;
pub mod fabric;
pub mod fault;
pub mod fw;
mod hca;
pub mod iommu;
pub mod offload;
pub mod pcap;
pub mod port;
pub mod queues;
pub mod rc;
pub mod remote;
pub mod sm;
pub mod wire;

pub use fabric::{Fabric, FabricConfig, FabricStats};
pub use fault::Fault;
pub use hca::{PortConfig, SimConfig, SimHca, SimReport};
