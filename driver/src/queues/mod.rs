//! Ring state of the device queues: indexes and ownership, no I/O.

pub mod eq;
