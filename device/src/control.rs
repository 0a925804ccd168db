//! The daemon's side of the control socket (protocol in `ipoib-control`).

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipoib_control::{self as proto, Command, Reply, Response};
use mlx5_driver::transport::Transport;

use crate::engine::datagram::DropReason;
use crate::engine::mgid::format_gid;
use crate::link::{Link, LinkCounters};
use crate::vhost::{self, Vnic};

/// Clients answered per event-loop turn.
const CLIENTS_PER_TURN: usize = 8;
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);

/// The listening control socket; the file is removed on drop.
#[derive(Debug)]
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    group: Option<u32>,
}

impl ControlServer {
    /// Listens at `path`, mode 0600 (0660 when `group` may use it too). A
    /// socket file nobody answers on is replaced; one a live daemon serves
    /// is an error.
    pub fn bind(path: &Path, group: Option<u32>) -> io::Result<ControlServer> {
        claim_socket_path(path, "another ipoib-vfio serves the control socket")?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let listener = UnixListener::bind(path)?;
        let mode = if group.is_some() { 0o660 } else { 0o600 };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        if let Some(gid) = group {
            std::os::unix::fs::chown(path, None, Some(gid))?;
        }
        listener.set_nonblocking(true)?;
        Ok(ControlServer {
            listener,
            path: path.to_path_buf(),
            group,
        })
    }

    /// The listening socket, for the wait set.
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// Answers waiting clients, at most [`CLIENTS_PER_TURN`] per call so a
    /// flood of connections cannot starve the data path; the rest wait
    /// for the next turn.
    pub fn serve<T: Transport>(&self, ifname: &str, link: &Link<T>, vnics: &[Vnic]) {
        for _ in 0..CLIENTS_PER_TURN {
            let Ok((stream, _)) = self.listener.accept() else {
                break;
            };
            if let Err(e) = self.answer(&stream, ifname, link, vnics) {
                tracing::debug!("control client: {e}");
            }
        }
    }

    fn answer<T: Transport>(
        &self,
        stream: &UnixStream,
        ifname: &str,
        link: &Link<T>,
        vnics: &[Vnic],
    ) -> Result<(), proto::ControlError> {
        stream.set_nonblocking(false)?;
        stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        let uid = proto::peer_uid(stream)?;
        let response = if !proto::allowed(uid, self.group) {
            Response::error(format!("permission denied for uid {uid}"))
        } else {
            match proto::read_request(stream, REQUEST_TIMEOUT) {
                Ok(req) => respond(&req.command, ifname, link, vnics),
                Err(e) => Response::error(e.to_string()),
            }
        };
        proto::write_response(stream, &response)
    }
}

/// Makes `path` free for a new listening socket: a socket file nobody
/// answers on is removed; one a live process serves is an error (`busy`
/// says whose); anything that is not a socket is left alone and refused.
pub(crate) fn claim_socket_path(path: &Path, busy: &str) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{busy} {}", path.display()),
        ));
    }
    std::fs::remove_file(path)
}

impl std::ops::Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The answer to `cmd` for the interface `ifname` served by `link`, with
/// the VMs of `vnics` attached.
pub fn respond<T: Transport>(
    cmd: &Command,
    ifname: &str,
    link: &Link<T>,
    vnics: &[Vnic],
) -> Response {
    let unknown = |name: &str| {
        Response::error(format!(
            "no interface {name:?} (this daemon serves {ifname})"
        ))
    };
    let reply = match cmd {
        Command::Show { interface } => match interface {
            Some(i) if i != ifname => return unknown(i),
            _ => Reply::Interfaces {
                interfaces: vec![interface_info(ifname, link)],
            },
        },
        Command::Stats { interface } if interface == ifname => Reply::Stats {
            counters: counters(link),
        },
        Command::Neigh { interface } if interface == ifname => {
            let now = Instant::now();
            let mut neighbours: Vec<proto::Neighbour> = link
                .engine()
                .neighbours(now)
                .into_iter()
                .map(|e| proto::Neighbour {
                    ip: e.key.to_string(),
                    hw_addr: e.value.map(|h| h.to_string()),
                    age_ms: u64::try_from(e.age.as_millis()).unwrap_or(u64::MAX),
                    queued: e.queued,
                    valid: e.valid,
                })
                .collect();
            neighbours.sort_by(|a, b| a.ip.cmp(&b.ip));
            Reply::Neigh { neighbours }
        }
        Command::Mcg { interface } if interface == ifname => {
            let mut groups: Vec<proto::Group> = link
                .engine()
                .groups()
                .into_iter()
                .map(|(g, joined, send_only)| proto::Group {
                    mgid: format_gid(&g),
                    joined,
                    send_only,
                })
                .collect();
            groups.sort_by(|a, b| a.mgid.cmp(&b.mgid));
            Reply::Mcg { groups }
        }
        Command::Vms { interface } if interface == ifname => Reply::Vms {
            vms: vnics.iter().filter_map(|v| vm_info(link, v)).collect(),
        },
        Command::Stats { interface }
        | Command::Neigh { interface }
        | Command::Mcg { interface }
        | Command::Vms { interface } => {
            return unknown(interface);
        }
    };
    Response {
        version: proto::VERSION,
        reply,
    }
}

fn interface_info<T: Transport>(ifname: &str, link: &Link<T>) -> proto::Interface {
    let hw = link.hw_addr();
    proto::Interface {
        name: ifname.to_string(),
        mode: "datagram".into(),
        mtu: link.mtu(),
        pkey: link.pkey(),
        parent: None,
        port: 1,
        state: if link.carrier() { "up" } else { "down" }.into(),
        lid: link.lid(),
        gid: format_gid(&link.gid()),
        hw_addr: hw.to_string(),
        qpn: hw.qpn(),
    }
}

fn vm_info<T: Transport>(link: &Link<T>, v: &Vnic) -> Option<proto::Vm> {
    let g = link.guest(v.endpoint)?;
    let st = v.status();
    let q = st.counters;
    let mut counters: Vec<proto::Counter> = [
        ("guest_tx_frames", q.tx_frames),
        ("guest_rx_frames", q.rx_frames),
        ("guest_tx_bad_chains", q.tx_bad_chains),
        ("guest_rx_bad_chains", q.rx_bad_chains),
        ("guest_rx_no_buffers", q.rx_no_buffers),
        ("guest_rx_too_big", q.rx_too_big),
        ("guest_tx_lent", q.tx_lent),
        ("guest_rx_lent", q.rx_lent),
        ("connections", q.connections),
    ]
    .into_iter()
    .map(|(n, v)| proto::Counter {
        name: n.into(),
        value: v,
    })
    .collect();
    counters.extend(endpoint_counters(&g.counters));
    counters.extend(
        g.eth_drops
            .iter()
            .chain(&g.drops)
            .map(|(n, v)| proto::Counter {
                name: (*n).into(),
                value: *v,
            }),
    );
    Some(proto::Vm {
        socket: st.socket.display().to_string(),
        connected: st.connected,
        ready: st.ready,
        zero_copy: st.zero_copy,
        qpn: g.hw.qpn(),
        hw_addr: g.hw.to_string(),
        mac: g.mac.to_string(),
        addresses: g.addresses.iter().map(ToString::to_string).collect(),
        features: vhost::feature_names(st.features)
            .into_iter()
            .map(String::from)
            .collect(),
        remote_macs: g.remacs,
        counters,
    })
}

fn endpoint_counters(c: &LinkCounters) -> Vec<proto::Counter> {
    [
        ("tx_packets", c.tx_packets),
        ("tx_bytes", c.tx_bytes),
        ("rx_packets", c.rx_packets),
        ("rx_bytes", c.rx_bytes),
        ("rx_delivered", c.rx_delivered),
        ("tx_no_buffer", c.tx_no_buffer),
        ("rx_no_buffer", c.rx_no_buffer),
        ("tx_too_big", c.tx_too_big),
        ("tx_bad_offload", c.tx_bad_offload),
        ("tx_lso", c.tx_lso),
        ("tx_csum", c.tx_csum),
        ("tx_errors", c.tx_errors),
        ("rx_errors", c.rx_errors),
        ("sa_failures", c.sa_failures),
        ("tx_zero_copy", c.tx_zero_copy),
        ("rx_zero_copy", c.rx_zero_copy),
        ("qp_restarts", c.qp_restarts),
    ]
    .into_iter()
    .map(|(n, v)| proto::Counter {
        name: n.into(),
        value: v,
    })
    .collect()
}

fn counters<T: Transport>(link: &Link<T>) -> Vec<proto::Counter> {
    let mut out = endpoint_counters(&link.counters());
    out.extend(DropReason::ALL.iter().map(|d| proto::Counter {
        name: d.name().into(),
        value: link.engine().drops(*d),
    }));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_paths_are_claimed_carefully() {
        let dir = std::env::temp_dir().join(format!("ipoib-claim-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A file that is not a socket: refused, and still there.
        let file = dir.join("file");
        std::fs::write(&file, b"keep me").unwrap();
        assert!(claim_socket_path(&file, "busy").is_err());
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
        // A live socket: busy. A dead one: removed.
        let sock = dir.join("sock");
        let l = UnixListener::bind(&sock).unwrap();
        let e = claim_socket_path(&sock, "busy").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        drop(l);
        assert!(claim_socket_path(&sock, "busy").is_ok());
        assert!(!sock.exists());
        // Nothing there: nothing to do.
        assert!(claim_socket_path(&sock, "busy").is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
