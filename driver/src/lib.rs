//! mlx5-driver: a userspace driver core for ConnectX (mlx5) HCAs.
//!
//! The driver owns a PCI function through a [`transport::Transport`] (VFIO
//! on real hardware, the software HCA of `ipoib-sim` elsewhere) and speaks
//! the mlx5 programming interface itself: the initialization segment, the
//! command queue with its mailboxes, firmware page management, event queues
//! and, on top, HCA bring-up and teardown ([`hca::Hca`]).
//!
//! It knows nothing of virtio or IP; the IPoIB device model sits above it.

#![warn(missing_docs)]
#![deny(unsafe_code)]

pub mod cmd;
pub mod hca;
pub mod health;
pub mod layout;
pub mod pages;
pub mod queues;
pub mod regs;
pub mod sa;
pub mod transport;
pub mod verbs;

pub use hca::{Completion, Hca, HcaConfig, HcaInfo};

/// Formats an error and its chain of causes on one line, joined by `: `.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
