//! `ipoib-fabric`: a simulated InfiniBand fabric with a subnet manager,
//! served to HCAs in other processes over a UNIX socket.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use ipoib_sim::sm::parse_partitions;
use ipoib_sim::{Fabric, FabricConfig};

/// A simulated InfiniBand fabric: one switch, a subnet manager with its SA,
/// and a packet capture, for HCAs simulated by `ipoib-vfio --device sim`.
#[derive(Debug, Parser)]
#[command(name = "ipoib-fabric", version, about)]
struct Cli {
    /// Socket to serve on.
    #[arg(long)]
    socket: PathBuf,
    /// Write every packet to this pcap (link type DLT_USER0 = raw InfiniBand).
    #[arg(long)]
    pcap: Option<PathBuf>,
    /// Partitions file (a subset of OpenSM's partitions.conf).
    #[arg(long)]
    partitions: Option<PathBuf>,
    /// Link MTU in bytes.
    #[arg(long, default_value_t = 4096, value_parser = parse_mtu)]
    mtu: u32,
    /// One-way link latency in microseconds.
    #[arg(long, default_value_t = 0)]
    latency_us: u64,
    /// Link rate in Gb/s (0: unlimited).
    #[arg(long, default_value_t = 0)]
    rate_gbps: u32,
    /// Log filter (also IPOIB_LOG); quiet by default.
    #[arg(long)]
    log: Option<String>,
}

fn parse_mtu(s: &str) -> Result<u32, String> {
    match s {
        "2048" => Ok(2048),
        "4096" => Ok(4096),
        _ => Err("the fabric MTU is 2048 or 4096".into()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = cli
        .log
        .clone()
        .or_else(|| std::env::var("IPOIB_LOG").ok())
        .unwrap_or_else(|| "off".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ipoib-fabric: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<(), String> {
    let partitions = match &cli.partitions {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).map_err(|e| format!("reading {}: {e}", p.display()))?;
            parse_partitions(&text).map_err(|e| format!("{}: {e}", p.display()))?
        }
        None => Vec::new(),
    };
    if cli.socket.exists() {
        if UnixStream::connect(&cli.socket).is_ok() {
            return Err(format!(
                "{} is in use by another fabric",
                cli.socket.display()
            ));
        }
        std::fs::remove_file(&cli.socket)
            .map_err(|e| format!("removing stale {}: {e}", cli.socket.display()))?;
    }
    let fabric = Fabric::new(FabricConfig {
        mtu: cli.mtu,
        pcap: cli.pcap.clone(),
        partitions,
        latency: Duration::from_micros(cli.latency_us),
        rate_gbps: cli.rate_gbps,
        ..FabricConfig::default()
    })
    .map_err(|e| format!("creating the capture: {e}"))?;
    let listener = UnixListener::bind(&cli.socket)
        .map_err(|e| format!("binding {}: {e}", cli.socket.display()))?;
    let flusher = fabric.clone();
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(Duration::from_millis(100));
            flusher.flush();
        }
    });
    println!(
        "ipoib-fabric: serving on {} (MTU {})",
        cli.socket.display(),
        cli.mtu
    );
    ipoib_sim::remote::serve(&fabric, &listener).map_err(|e| format!("serving: {e}"))
}
