//! ipoib-control: the request/response protocol of the `ipoib-vfio`
//! control socket, shared by the daemon and `ipoib-tool`.
//!
//! One request per connection: the client writes one JSON object and a
//! newline, the daemon answers with one JSON object and a newline and
//! closes. Every message carries [`VERSION`]; a daemon refuses requests of
//! another version with a clear error rather than guessing. Requests are
//! at most [`MAX_REQUEST`] bytes.

#![warn(missing_docs)]
#![deny(unsafe_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Protocol version.
pub const VERSION: u32 = 1;
/// Longest request accepted.
pub const MAX_REQUEST: usize = 4096;
/// Longest response a client reads (a neighbour table of a few thousand
/// entries fits many times over).
pub const MAX_RESPONSE: u64 = 16 << 20;
/// Where the daemon listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/ipoib-vfio.sock";

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Command {
    /// Interfaces, or one.
    Show {
        /// Only this interface.
        #[serde(default)]
        interface: Option<String>,
    },
    /// Counters of an interface.
    Stats {
        /// The interface.
        interface: String,
    },
    /// Its neighbour and path table.
    Neigh {
        /// The interface.
        interface: String,
    },
    /// Its multicast groups.
    Mcg {
        /// The interface.
        interface: String,
    },
    /// The VMs attached to it through vhost-user.
    Vms {
        /// The interface.
        interface: String,
    },
}

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// [`VERSION`].
    pub version: u32,
    /// What.
    #[serde(flatten)]
    pub command: Command,
}

/// One interface, as `ipoib-tool show` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    /// Host interface name.
    pub name: String,
    /// `datagram` or `connected`.
    pub mode: String,
    /// MTU.
    pub mtu: u32,
    /// P_Key.
    pub pkey: u16,
    /// Parent interface (children only).
    pub parent: Option<String>,
    /// HCA port.
    pub port: u8,
    /// `up` (port active, broadcast group joined) or `down`.
    pub state: String,
    /// Port LID.
    pub lid: u16,
    /// Port GID.
    pub gid: String,
    /// 20-byte hardware address.
    pub hw_addr: String,
    /// UD QPN.
    pub qpn: u32,
}

/// One counter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter {
    /// Name, as ethtool -S spells it where one exists.
    pub name: String,
    /// Value.
    pub value: u64,
}

/// A neighbour (IP → hardware address) entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Neighbour {
    /// IP address.
    pub ip: String,
    /// Hardware address, once resolved.
    pub hw_addr: Option<String>,
    /// Milliseconds since last use (resolved) or since the last query.
    pub age_ms: u64,
    /// Packets waiting for resolution.
    pub queued: usize,
    /// False after a flush until refreshed.
    pub valid: bool,
}

/// A multicast group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// MGID.
    pub mgid: String,
    /// Joined (else: join pending).
    pub joined: bool,
    /// Send-only membership.
    pub send_only: bool,
}

/// A VM's vNIC attached through a vhost-user socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    /// The vhost-user socket.
    pub socket: String,
    /// A frontend is connected.
    pub connected: bool,
    /// Its queues are set up and enabled: frames move.
    pub ready: bool,
    /// The VM's memory is mapped for the HCA: its frames are sent from
    /// guest memory, not copied.
    #[serde(default)]
    pub zero_copy: bool,
    /// The vNIC's own UD QPN.
    pub qpn: u32,
    /// Its 20-byte IPoIB hardware address.
    pub hw_addr: String,
    /// The guest's MAC.
    pub mac: String,
    /// Addresses the guest uses (configured or learned).
    pub addresses: Vec<String>,
    /// virtio features the frontend negotiated.
    pub features: Vec<String>,
    /// Remote addresses shown to the guest as synthetic MACs.
    pub remote_macs: usize,
    /// Counters: queues, endpoint, and drops by reason.
    pub counters: Vec<Counter>,
}

/// What the daemon answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Reply {
    /// For `show`.
    Interfaces {
        /// The interfaces.
        interfaces: Vec<Interface>,
    },
    /// For `stats`.
    Stats {
        /// Counters, in a stable order.
        counters: Vec<Counter>,
    },
    /// For `neigh`.
    Neigh {
        /// Entries.
        neighbours: Vec<Neighbour>,
    },
    /// For `mcg`.
    Mcg {
        /// Groups.
        groups: Vec<Group>,
    },
    /// For `vms`.
    Vms {
        /// Attached vNICs.
        vms: Vec<Vm>,
    },
    /// The request was refused; nothing changed.
    Error {
        /// Why.
        message: String,
    },
}

/// A response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// [`VERSION`].
    pub version: u32,
    /// The answer.
    #[serde(flatten)]
    pub reply: Reply,
}

impl Response {
    /// A refusal.
    pub fn error(message: impl Into<String>) -> Response {
        Response {
            version: VERSION,
            reply: Reply::Error {
                message: message.into(),
            },
        }
    }
}

/// Why a control exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Socket trouble.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Not a valid message.
    #[error("bad message: {0}")]
    Parse(String),
    /// Longer than [`MAX_REQUEST`].
    #[error("request longer than {MAX_REQUEST} bytes")]
    TooLong,
    /// A version we do not speak.
    #[error("protocol version {0} is not supported (this side speaks {VERSION})")]
    Version(u32),
}

/// Reads one request from a connection (at most [`MAX_REQUEST`] bytes,
/// giving up after `timeout`).
pub fn read_request(stream: &UnixStream, timeout: Duration) -> Result<Request, ControlError> {
    stream.set_read_timeout(Some(timeout))?;
    let mut line = Vec::new();
    let mut r = BufReader::new(stream.take(MAX_REQUEST as u64 + 1));
    r.read_until(b'\n', &mut line)?;
    if line.len() > MAX_REQUEST {
        return Err(ControlError::TooLong);
    }
    let v: serde_json::Value =
        serde_json::from_slice(&line).map_err(|e| ControlError::Parse(e.to_string()))?;
    match v.get("version").and_then(serde_json::Value::as_u64) {
        Some(n) if n == u64::from(VERSION) => {}
        Some(n) => return Err(ControlError::Version(u32::try_from(n).unwrap_or(u32::MAX))),
        None => return Err(ControlError::Parse("no version".into())),
    }
    serde_json::from_value(v).map_err(|e| ControlError::Parse(e.to_string()))
}

/// Writes a response and a newline.
pub fn write_response(mut stream: &UnixStream, r: &Response) -> Result<(), ControlError> {
    let mut text = serde_json::to_vec(r).map_err(|e| ControlError::Parse(e.to_string()))?;
    text.push(b'\n');
    stream.write_all(&text)?;
    Ok(())
}

/// The user ID of the process at the other end of `stream`.
pub fn peer_uid(stream: &UnixStream) -> std::io::Result<u32> {
    let cred = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(std::io::Error::from)?;
    Ok(cred.uid())
}

/// Whether `uid` may use the control socket: root, or a member of `gid`
/// when one is configured.
pub fn allowed(uid: u32, gid: Option<u32>) -> bool {
    if uid == 0 {
        return true;
    }
    let Some(gid) = gid else { return false };
    let Ok(Some(user)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) else {
        return false;
    };
    if user.gid.as_raw() == gid {
        return true;
    }
    nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
        .ok()
        .flatten()
        .is_some_and(|g| g.mem.contains(&user.name))
}

/// Sends `command` to the daemon at `socket` and returns its response.
pub fn call(socket: &Path, command: Command) -> Result<Response, ControlError> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut text = serde_json::to_vec(&Request {
        version: VERSION,
        command,
    })
    .map_err(|e| ControlError::Parse(e.to_string()))?;
    text.push(b'\n');
    s.write_all(&text)?;
    let mut line = Vec::new();
    BufReader::new((&s).take(MAX_RESPONSE)).read_until(b'\n', &mut line)?;
    let r: Response =
        serde_json::from_slice(&line).map_err(|e| ControlError::Parse(e.to_string()))?;
    if r.version != VERSION {
        return Err(ControlError::Version(r.version));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_is_stable() {
        // The request as a script would write it by hand.
        let r: Request =
            serde_json::from_str(r#"{"version":1,"cmd":"neigh","interface":"ib0"}"#).unwrap();
        assert_eq!(
            r.command,
            Command::Neigh {
                interface: "ib0".into()
            }
        );
        let show: Request = serde_json::from_str(r#"{"version":1,"cmd":"show"}"#).unwrap();
        assert_eq!(show.command, Command::Show { interface: None });
        let e = serde_json::to_string(&Response::error("no such interface")).unwrap();
        assert_eq!(
            e,
            r#"{"version":1,"kind":"error","message":"no such interface"}"#
        );
    }

    #[test]
    fn bad_requests_are_errors() {
        let (a, b) = UnixStream::pair().unwrap();
        let t = Duration::from_millis(200);
        (&a).write_all(b"{\"version\":2,\"cmd\":\"show\"}\n")
            .unwrap();
        assert!(matches!(read_request(&b, t), Err(ControlError::Version(2))));
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(b"{\"version\":1,\"cmd\":\"reboot\"}\n")
            .unwrap();
        assert!(matches!(read_request(&b, t), Err(ControlError::Parse(_))));
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&[b'x'; MAX_REQUEST + 10]).unwrap();
        assert!(matches!(read_request(&b, t), Err(ControlError::TooLong)));
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(b"not json\n").unwrap();
        assert!(matches!(read_request(&b, t), Err(ControlError::Parse(_))));
        // A client that connects and says nothing times out.
        let (_a, b) = UnixStream::pair().unwrap();
        assert!(matches!(read_request(&b, t), Err(ControlError::Io(_))));
        assert!(allowed(0, None));
        assert!(!allowed(12345, None));
    }
}
