//! `ipoib-vfio run`: bring the HCA up, create the host interface, and
//! serve IPoIB datagram mode until SIGTERM or SIGINT.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ipoib_netlink::{LinkConfig, Netlink};
use mlx5_driver::transport::Transport;
use mlx5_driver::transport::tun::{Tun, TunOffloads, enter_netns};
use mlx5_driver::{Hca, HcaConfig, error_chain};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::control::ControlServer;
use crate::link::Link;
use crate::probe::{DeviceSpec, wait_for_active};
use crate::vhost::Vnic;

/// Settings of `ipoib-vfio run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Host interface name.
    pub ifname: String,
    /// Network namespace (a name under /run/netns) to create it in.
    pub netns: Option<String>,
    /// Addresses with prefix lengths.
    pub addresses: Vec<(IpAddr, u8)>,
    /// How long to wait for the port to become Active at start.
    pub wait_active: Duration,
    /// The control socket.
    pub control: PathBuf,
    /// A group whose members may use the control socket besides root.
    pub control_group: Option<u32>,
    /// vhost-user sockets for VMs.
    pub vhost_user: Vec<crate::vhost::VhostSpec>,
}

/// Parses `ADDR/PREFIX`.
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let (a, p) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: expected ADDRESS/PREFIX"))?;
    let addr: IpAddr = a
        .parse()
        .map_err(|_| format!("{a:?} is not an IP address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix: u8 = p
        .parse()
        .ok()
        .filter(|p| *p <= max)
        .ok_or_else(|| format!("{p:?} is not a prefix length for {addr} (0..={max})"))?;
    Ok((addr, prefix))
}

/// Runs the daemon; returns the exit status.
pub fn run(spec: &DeviceSpec, opts: &RunOptions) -> ExitCode {
    if let Some(ns) = &opts.netns {
        let path = PathBuf::from("/run/netns").join(ns);
        if let Err(e) = enter_netns(&path) {
            eprintln!("ipoib-vfio: entering network namespace {ns}: {e}");
            return ExitCode::FAILURE;
        }
    }
    let control = match ControlServer::bind(&opts.control, opts.control_group) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ipoib-vfio: control socket {}: {e}", opts.control.display());
            return ExitCode::FAILURE;
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
            eprintln!("ipoib-vfio: installing the signal handler: {e}");
            return ExitCode::FAILURE;
        }
    }
    match spec {
        DeviceSpec::Pci(bdf) => match mlx5_driver::transport::vfio::VfioTransport::open(bdf) {
            Ok(t) => serve(t, opts, &control, &stop),
            Err(e) => {
                eprintln!("ipoib-vfio: opening {bdf} failed: {}", error_chain(&e));
                ExitCode::FAILURE
            }
        },
        #[cfg(feature = "sim")]
        DeviceSpec::Sim(faults, fabric) => {
            match crate::probe::sim_device(faults, fabric.as_deref()) {
                Ok(sim) => serve(sim, opts, &control, &stop),
                Err(line) => {
                    eprintln!("ipoib-vfio: {line}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn serve<T: Transport>(
    t: T,
    opts: &RunOptions,
    control: &ControlServer,
    stop: &AtomicBool,
) -> ExitCode {
    let mut hca = match Hca::bring_up(t, HcaConfig::default()) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("ipoib-vfio: {}", error_chain(&*e));
            return ExitCode::FAILURE;
        }
    };
    wait_for_active(&mut hca, opts.wait_active);
    // The host interface comes first: if it cannot be made, nothing on the
    // HCA was created yet beyond bring-up.
    // Offer the host checksum and TSO offloads when the HCA does them on
    // UD QPs (IPoIB basic offloads), as ib_ipoib does on mlx5.
    let hw = hca.info().ipoib_basic_offloads;
    let offloads = TunOffloads {
        csum: hw,
        tso4: hw,
        tso6: hw,
    };
    let tun = match Tun::create(&opts.ifname, offloads) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("ipoib-vfio: {e}");
            return finish(hca.shutdown(), ExitCode::FAILURE);
        }
    };
    let nl = match Netlink::new() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("ipoib-vfio: {e}");
            return finish(hca.shutdown(), ExitCode::FAILURE);
        }
    };
    let mut link = match Link::new(hca) {
        Ok(l) => l,
        Err((e, report)) => {
            eprintln!("ipoib-vfio: creating the IPoIB interface: {e}");
            return finish(report, ExitCode::FAILURE);
        }
    };
    let status = serve_link(&mut link, &tun, &nl, opts, control, stop);
    let name = tun.name().to_string();
    drop(tun);
    tracing::info!(interface = %name, "stopping");
    finish(link.shutdown(), status)
}

fn serve_link<T: Transport>(
    link: &mut Link<T>,
    tun: &Tun,
    nl: &Netlink,
    opts: &RunOptions,
    control: &ControlServer,
    stop: &AtomicBool,
) -> ExitCode {
    let name = tun.name().to_string();
    // Join the broadcast group first: it decides the MTU.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !link.carrier() && Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        if let Err(e) = link.poll(tun, Duration::from_millis(5)) {
            eprintln!("ipoib-vfio: {e}");
            return ExitCode::FAILURE;
        }
    }
    let cfg = LinkConfig {
        mtu: link.mtu(),
        addresses: opts.addresses.clone(),
        up: true,
    };
    if let Err(e) = nl.configure(&name, &cfg) {
        eprintln!("ipoib-vfio: configuring {name}: {e}");
        return ExitCode::FAILURE;
    }
    let _ = tun.set_carrier(link.carrier());
    eprintln!(
        "ipoib-vfio: {name} up, hardware address {}, MTU {}",
        link.hw_addr(),
        link.mtu()
    );
    // One vNIC, with its own endpoint, per vhost-user socket.
    let mut vnics = Vec::new();
    for spec in &opts.vhost_user {
        match Vnic::start(spec, link, opts.control_group) {
            Ok(v) => {
                eprintln!("ipoib-vfio: serving VMs on {}", spec.socket.display());
                vnics.push(v);
            }
            Err(e) => {
                eprintln!("ipoib-vfio: vhost-user {e}");
                stop_vnics(vnics, link);
                return ExitCode::FAILURE;
            }
        }
    }
    let status = event_loop(link, tun, nl, &mut vnics, control, stop);
    if stop_vnics(vnics, link) {
        status
    } else {
        ExitCode::FAILURE
    }
}

/// Stops serving every vNIC and removes its endpoint; false if anything
/// failed.
fn stop_vnics<T: Transport>(vnics: Vec<Vnic>, link: &mut Link<T>) -> bool {
    let mut clean = true;
    for v in vnics {
        for e in v.stop(link) {
            eprintln!("ipoib-vfio: removing a vNIC: {e}");
            clean = false;
        }
    }
    clean
}

fn event_loop<T: Transport>(
    link: &mut Link<T>,
    tun: &Tun,
    nl: &Netlink,
    vnics: &mut [Vnic],
    control: &ControlServer,
    stop: &AtomicBool,
) -> ExitCode {
    let name = tun.name().to_string();
    // One wait set: the host interface, the HCA's event queue (armed
    // completion queues, port events, page requests), the control socket
    // and the vNICs' wake-ups (queue kicks, frontends leaving).
    let epoll = match wait_set(tun, link.event_fd(), control, vnics) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("ipoib-vfio: setting up the event loop: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut ready = [EpollEvent::default(); 16];
    let mut next_addr_check = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        // Busy: look at the wait set without sleeping.
        let ms = if link.busy() {
            0
        } else {
            link.arm();
            // Timers (ARP retries, joins, ageing) are coarse: 20 ms is
            // plenty. EINTR (a signal) just ends the wait.
            if link.sa_pending() { 1 } else { 20 }
        };
        let n = epoll.wait(ms, &mut ready).unwrap_or(0);
        for e in &ready[..n] {
            if let Some(v) = vnics.iter_mut().find(|v| v.owns(e.data())) {
                v.event(e.data(), &epoll, link);
            }
        }
        control.serve(&name, link, vnics);
        let turn = link.poll(tun, Duration::ZERO);
        for v in vnics.iter() {
            v.flush();
        }
        match turn {
            Ok(true) => {
                let _ = tun.set_carrier(link.carrier());
                for v in vnics.iter() {
                    v.set_mtu(link.mtu());
                }
                tracing::info!(carrier = link.carrier(), "carrier changed");
            }
            Ok(false) => {}
            Err(e) => {
                eprintln!("ipoib-vfio: the HCA failed: {e}");
                return ExitCode::FAILURE;
            }
        }
        if Instant::now() >= next_addr_check {
            next_addr_check = Instant::now() + Duration::from_secs(1);
            if let Ok(addrs) = nl.addresses(&name) {
                link.set_subnets(&addrs);
                let ips: Vec<IpAddr> = addrs.into_iter().map(|(a, _)| a).collect();
                link.set_addresses(&ips);
            }
        }
    }
    ExitCode::SUCCESS
}

/// First event id of the vNICs (ids below are the TUN device, the HCA and
/// the control socket).
const VNIC_EVENTS: u64 = 16;

fn wait_set(
    tun: &Tun,
    hca_fd: Option<std::os::fd::RawFd>,
    control: &ControlServer,
    vnics: &mut [Vnic],
) -> std::io::Result<Epoll> {
    use std::os::fd::AsRawFd;
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        tun.as_raw_fd(),
        EpollEvent::new(EventSet::IN, 0),
    )?;
    if let Some(fd) = hca_fd {
        epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 1))?;
    }
    epoll.ctl(
        ControlOperation::Add,
        control.listener().as_raw_fd(),
        EpollEvent::new(EventSet::IN, 2),
    )?;
    for (k, v) in vnics.iter_mut().enumerate() {
        v.register(&epoll, VNIC_EVENTS + k as u64 * crate::vhost::EVENT_IDS)?;
    }
    Ok(epoll)
}

fn finish(report: mlx5_driver::hca::TeardownReport, status: ExitCode) -> ExitCode {
    if report.clean() {
        status
    } else {
        eprintln!(
            "ipoib-vfio: teardown left problems: {}",
            report.errors.join("; ")
        );
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr() {
        assert_eq!(
            parse_cidr("10.0.0.1/24"),
            Ok(("10.0.0.1".parse().unwrap(), 24))
        );
        assert_eq!(
            parse_cidr("fd00::1/64"),
            Ok(("fd00::1".parse().unwrap(), 64))
        );
        for bad in [
            "10.0.0.1",
            "10.0.0.1/33",
            "fd00::1/129",
            "x/1",
            "10.0.0.1/-1",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
    }
}
