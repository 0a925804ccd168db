//! Command round-trip latency on the software HCA, polled against
//! event-driven completion: NOP (inline only) and QUERY_HCA_CAP (4 KiB out
//! through eight mailbox blocks).
//!
//! `cargo xtask bench` runs it; figures go to BENCHMARKS.md.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use ipoib_sim::{SimConfig, SimHca};
use mlx5_driver::cmd::hca::{Nop, QueryHcaCap};
use mlx5_driver::layout::caps::CapType;
use mlx5_driver::{Completion, Hca, HcaConfig};

fn round_trip(c: &mut Criterion) {
    let mut g = c.benchmark_group("cmd_round_trip");
    for (mode, name) in [
        (Completion::Polled, "polled"),
        (Completion::Events, "events"),
    ] {
        let dev = Arc::new(SimHca::new(SimConfig::default()));
        let cfg = HcaConfig {
            completion: mode,
            ..HcaConfig::default()
        };
        let mut hca = Hca::bring_up(dev, cfg).expect("bring-up");
        g.bench_function(format!("nop/{name}"), |b| {
            b.iter(|| hca.exec(&Nop).expect("NOP"))
        });
        let q = QueryHcaCap {
            cap: CapType::General,
            current: true,
        };
        g.bench_function(format!("query_hca_cap/{name}"), |b| {
            b.iter(|| hca.exec(&q).expect("QUERY_HCA_CAP"))
        });
        assert!(hca.shutdown().clean());
    }
    g.finish();
}

criterion_group!(benches, round_trip);
criterion_main!(benches);
