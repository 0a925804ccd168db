//! ipoib-device: the IPoIB device model and the `ipoib-vfio` program.
//!
//! At this stage the program brings an HCA up and reports on it
//! ([`probe`]); the IPoIB interfaces, the vhost-user backend and the host
//! interfaces build on the same bring-up.

#![warn(missing_docs)]
#![deny(unsafe_code)]

pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod engine;
pub mod link;
pub mod probe;
pub mod vhost;
pub mod vnet;
