//! `ipoib-tool show | stats | neigh | mcg | vms`: what sysfs, ethtool -S and
//! debugfs (`ib0_path`, `ib0_mcg`) show for the kernel driver, asked of a
//! running `ipoib-vfio` over its control socket.

use std::fmt::Write as _;
use std::path::Path;

use ipoib_control::{Command, ControlError, Reply};

/// Asks the daemon at `socket` and renders the answer (JSON when `json`).
/// A refusal from the daemon is an error.
pub fn run(socket: &Path, command: Command, json: bool) -> Result<String, String> {
    let r = ipoib_control::call(socket, command).map_err(|e| match e {
        ControlError::Io(io) => format!(
            "cannot reach ipoib-vfio at {} ({io}); is the daemon running, and are we allowed?",
            socket.display()
        ),
        other => other.to_string(),
    })?;
    if let Reply::Error { message } = &r.reply {
        return Err(message.clone());
    }
    if json {
        return serde_json::to_string_pretty(&r.reply).map_err(|e| e.to_string());
    }
    Ok(render(&r.reply))
}

/// Text for people.
pub fn render(reply: &Reply) -> String {
    let mut s = String::new();
    match reply {
        Reply::Interfaces { interfaces } => {
            for i in interfaces {
                let _ = writeln!(
                    s,
                    "{}: mode {} mtu {} pkey 0x{:04x} port {} state {}",
                    i.name,
                    i.mode,
                    i.mtu,
                    i.pkey,
                    i.port,
                    i.state.to_uppercase()
                );
                if let Some(p) = &i.parent {
                    let _ = writeln!(s, "    parent {p}");
                }
                let _ = writeln!(s, "    lid 0x{:x} gid {}", i.lid, i.gid);
                let _ = writeln!(s, "    link/infiniband {} qpn 0x{:06x}", i.hw_addr, i.qpn);
            }
        }
        Reply::Stats { counters } => {
            let w = counters.iter().map(|c| c.name.len()).max().unwrap_or(0);
            for c in counters {
                let _ = writeln!(s, "     {:w$}: {}", c.name, c.value);
            }
        }
        Reply::Neigh { neighbours } => {
            for n in neighbours {
                let _ = writeln!(
                    s,
                    "{:<40} {} age {} ms{}{}",
                    n.ip,
                    n.hw_addr.as_deref().unwrap_or("(resolving)"),
                    n.age_ms,
                    if n.queued > 0 {
                        format!(" queued {}", n.queued)
                    } else {
                        String::new()
                    },
                    if n.valid || n.hw_addr.is_none() {
                        ""
                    } else {
                        " stale"
                    }
                );
            }
        }
        Reply::Mcg { groups } => {
            for g in groups {
                let _ = writeln!(
                    s,
                    "GID: {}\n  joined: {}  send-only: {}",
                    g.mgid,
                    u8::from(g.joined),
                    u8::from(g.send_only)
                );
            }
        }
        Reply::Vms { vms } => {
            for v in vms {
                let _ = writeln!(
                    s,
                    "{}: {}",
                    v.socket,
                    match (v.connected, v.zero_copy) {
                        (false, _) => "waiting for a frontend",
                        (true, true) => "connected, zero-copy",
                        (true, false) => "connected, copying",
                    }
                );
                let _ = writeln!(
                    s,
                    "    qpn 0x{:06x} mac {} remote macs {}",
                    v.qpn, v.mac, v.remote_macs
                );
                let _ = writeln!(s, "    link/infiniband {}", v.hw_addr);
                if !v.addresses.is_empty() {
                    let _ = writeln!(s, "    addresses {}", v.addresses.join(" "));
                }
                if !v.features.is_empty() {
                    let _ = writeln!(s, "    features {}", v.features.join(" "));
                }
                let w = v.counters.iter().map(|c| c.name.len()).max().unwrap_or(0);
                for c in v.counters.iter().filter(|c| c.value != 0) {
                    let _ = writeln!(s, "     {:w$}: {}", c.name, c.value);
                }
            }
        }
        Reply::Error { message } => {
            let _ = writeln!(s, "error: {message}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipoib_control::{Counter, Group, Interface, Neighbour};

    #[test]
    fn show_reads_like_ip_link() {
        let r = Reply::Interfaces {
            interfaces: vec![Interface {
                name: "ib0".into(),
                mode: "datagram".into(),
                mtu: 2044,
                pkey: 0xffff,
                parent: None,
                port: 1,
                state: "up".into(),
                lid: 2,
                gid: "fe80:0000:0000:0000:0002:c903:0000:0a01".into(),
                hw_addr: "80:00:01:01:fe:80:00:00:00:00:00:00:00:02:c9:03:00:00:0a:01".into(),
                qpn: 0x101,
            }],
        };
        assert_eq!(
            render(&r),
            "ib0: mode datagram mtu 2044 pkey 0xffff port 1 state UP\n    \
             lid 0x2 gid fe80:0000:0000:0000:0002:c903:0000:0a01\n    \
             link/infiniband 80:00:01:01:fe:80:00:00:00:00:00:00:00:02:c9:03:00:00:0a:01 qpn 0x000101\n"
        );
    }

    #[test]
    fn tables() {
        let stats = Reply::Stats {
            counters: vec![
                Counter {
                    name: "tx_packets".into(),
                    value: 7,
                },
                Counter {
                    name: "drop_flushed".into(),
                    value: 0,
                },
            ],
        };
        assert_eq!(
            render(&stats),
            "     tx_packets  : 7\n     drop_flushed: 0\n"
        );
        let neigh = Reply::Neigh {
            neighbours: vec![Neighbour {
                ip: "10.0.0.2".into(),
                hw_addr: None,
                age_ms: 5,
                queued: 2,
                valid: false,
            }],
        };
        assert!(render(&neigh).contains("(resolving) age 5 ms queued 2"));
        let mcg = Reply::Mcg {
            groups: vec![Group {
                mgid: "ff12:401b:ffff:0000:0000:0000:ffff:ffff".into(),
                joined: true,
                send_only: false,
            }],
        };
        assert_eq!(
            render(&mcg),
            "GID: ff12:401b:ffff:0000:0000:0000:ffff:ffff\n  joined: 1  send-only: 0\n"
        );
    }
}
