//! Ring state of the device queues: indexes and ownership, no I/O.

pub mod cq;
pub mod eq;
pub mod wq;
