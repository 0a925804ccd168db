//! The fabric service: `ipoib-fabric` serves a fabric on a UNIX stream
//! socket and HCAs in other processes plug into it.
//!
//! Wire protocol: frames of a 4-byte big-endian length and a body whose
//! first byte is the frame type. A peer that sends a frame longer than
//! [`MAX_FRAME`], an unknown type or a short body is disconnected; nothing
//! it sends can crash the fabric.
//!
//! | type | direction | body |
//! |---|---|---|
//! | 1 HELLO | HCA → fabric | port GUID (8, BE) |
//! | 2 PACKET | both | one IB packet, LRH to VCRC |
//! | 3 LINK_UP | HCA → fabric | — |
//! | 4 LINK_DOWN | HCA → fabric | — |
//! | 5 PORT_CONFIG | fabric → HCA | LID (2), SM LID (2), state (1), MTU (1), reregister (1), P_Key count (2), P_Keys (2 each) |

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};

use crate::fabric::Fabric;
use crate::hca::PortConfig;

/// Largest frame accepted.
pub const MAX_FRAME: usize = 16 * 1024;

/// Frame types.
#[allow(missing_docs)]
pub mod kind {
    pub const HELLO: u8 = 1;
    pub const PACKET: u8 = 2;
    pub const LINK_UP: u8 = 3;
    pub const LINK_DOWN: u8 = 4;
    pub const PORT_CONFIG: u8 = 5;
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, kind: u8, body: &[u8]) -> io::Result<()> {
    let len =
        u32::try_from(body.len() + 1).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut f = Vec::with_capacity(body.len() + 5);
    f.extend_from_slice(&len.to_be_bytes());
    f.push(kind);
    f.extend_from_slice(body);
    w.write_all(&f)
}

/// Reads one frame into `buf` (type first); `Ok(false)` at a clean EOF.
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<bool> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(e) => return Err(e),
    }
    let n = u32::from_be_bytes(len) as usize;
    if n == 0 || n > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {n} bytes"),
        ));
    }
    buf.resize(n, 0);
    r.read_exact(buf)?;
    Ok(true)
}

/// Encodes a PORT_CONFIG body.
pub fn encode_port_config(c: &PortConfig) -> Vec<u8> {
    let mut b = Vec::with_capacity(9 + 2 * c.pkeys.len());
    b.extend_from_slice(&c.lid.to_be_bytes());
    b.extend_from_slice(&c.sm_lid.to_be_bytes());
    b.push(c.state);
    b.push(c.mtu);
    b.push(u8::from(c.reregister));
    let n = c.pkeys.len().min(128) as u16;
    b.extend_from_slice(&n.to_be_bytes());
    for k in c.pkeys.iter().take(128) {
        b.extend_from_slice(&k.to_be_bytes());
    }
    b
}

/// Decodes a PORT_CONFIG body.
pub fn decode_port_config(b: &[u8]) -> Option<PortConfig> {
    let be16 = |o: usize| b.get(o..o + 2).map(|s| u16::from_be_bytes([s[0], s[1]]));
    let n = usize::from(be16(7)?);
    if n > 128 || b.len() != 9 + 2 * n {
        return None;
    }
    Some(PortConfig {
        lid: be16(0)?,
        sm_lid: be16(2)?,
        state: *b.get(4)?,
        mtu: *b.get(5)?,
        reregister: *b.get(6)? != 0,
        pkeys: (0..n).filter_map(|i| be16(9 + 2 * i)).collect(),
    })
}

/// The writing half of a connection, shared by the threads that send on it.
pub type SharedStream = Arc<Mutex<UnixStream>>;

/// Sends a frame on a shared stream; errors mean the peer is gone.
pub fn send(s: &SharedStream, kind: u8, body: &[u8]) -> bool {
    let mut g = s.lock().unwrap_or_else(|p| p.into_inner());
    write_frame(&mut *g, kind, body).is_ok()
}

/// Serves `fabric` on `listener` until the listener fails.
pub fn serve(fabric: &Fabric, listener: &UnixListener) -> io::Result<()> {
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("accept on the fabric socket failed: {e}");
                continue;
            }
        };
        let fabric = fabric.clone();
        std::thread::Builder::new()
            .name("fabric-port".into())
            .spawn(move || {
                if let Err(e) = serve_port(&fabric, stream) {
                    tracing::info!("fabric client gone: {e}");
                }
            })?;
    }
    Ok(())
}

fn serve_port(fabric: &Fabric, stream: UnixStream) -> io::Result<()> {
    let mut reader = std::io::BufReader::with_capacity(1 << 18, stream.try_clone()?);
    let writer: SharedStream = Arc::new(Mutex::new(stream));
    let mut buf = Vec::new();
    if !read_frame(&mut reader, &mut buf)? {
        return Ok(());
    }
    if buf.len() != 9 || buf[0] != kind::HELLO {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "expected HELLO"));
    }
    let guid = u64::from_be_bytes(buf[1..9].try_into().unwrap_or([0; 8]));
    let link = fabric.attach(crate::hca::DeviceInbox::Remote(writer), guid);
    tracing::info!(guid = format_args!("{guid:#018x}"), "HCA attached");
    let r = loop {
        match read_frame(&mut reader, &mut buf) {
            Ok(true) => {}
            Ok(false) => break Ok(()),
            Err(e) => break Err(e),
        }
        match buf[0] {
            kind::PACKET => link.transmit(buf[1..].to_vec()),
            kind::LINK_UP => link.link_up(),
            kind::LINK_DOWN => link.link_down(),
            other => {
                break Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("frame type {other}"),
                ));
            }
        }
    };
    link.link_down();
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_refuse_garbage() {
        let mut v = Vec::new();
        write_frame(&mut v, kind::PACKET, &[1, 2, 3]).unwrap();
        assert_eq!(v, [0, 0, 0, 4, 2, 1, 2, 3]);
        let mut buf = Vec::new();
        let mut r = &v[..];
        assert!(read_frame(&mut r, &mut buf).unwrap());
        assert_eq!(buf, [2, 1, 2, 3]);
        assert!(!read_frame(&mut r, &mut buf).unwrap(), "EOF");
        let huge = [0xFF, 0xFF, 0xFF, 0xFF, 0];
        assert!(read_frame(&mut &huge[..], &mut buf).is_err());
        assert!(read_frame(&mut &[0u8, 0, 0, 0][..], &mut buf).is_err());
        assert!(
            read_frame(&mut &[0u8, 0, 0, 9, 1][..], &mut buf).is_err(),
            "truncated"
        );
    }

    #[test]
    fn port_config_round_trip() {
        let c = PortConfig {
            lid: 7,
            sm_lid: 1,
            state: 4,
            mtu: 5,
            pkeys: vec![0xFFFF, 0x8001],
            reregister: true,
        };
        assert_eq!(decode_port_config(&encode_port_config(&c)), Some(c));
        assert_eq!(decode_port_config(&[0; 8]), None);
        assert_eq!(decode_port_config(&[0, 0, 0, 0, 0, 0, 0, 0, 2, 0]), None);
    }
}
