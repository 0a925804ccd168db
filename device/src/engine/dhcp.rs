//! DHCPv4 between a guest's Ethernet form and the IPoIB form (RFC 4390;
//! ipoib.md §4.3 and §15.5).
//!
//! On IPoIB a BOOTP message carries hardware type 32 and no hardware
//! address (the 20-byte IPoIB address does not fit `chaddr`); the client
//! asks for broadcast replies and is known by its client identifier
//! (option 61). A guest speaks the Ethernet form, so its requests are
//! rewritten to the IPoIB form, with a client identifier made from its
//! MAC when it sent none (unique per guest, though they share the port
//! GUID), and the replies to them are rewritten back, the inserted
//! identifier removed and `chaddr` the guest's MAC again.
//!
//! Everything here works on IPv4 packets (no Ethernet header) and writes
//! the rewritten packet, lengths and checksums recomputed, into `out`.

use super::eth::Mac;
use super::{checksum, ipv4_at};

/// BOOTP ports (RFC 2131 §4.1).
pub const SERVER_PORT: u16 = 67;
/// The client's.
pub const CLIENT_PORT: u16 = 68;
/// op: a request from a client, a reply from a server.
const BOOTREQUEST: u8 = 1;
const BOOTREPLY: u8 = 2;
/// Hardware types (RFC 1700 ARP hardware types).
const HTYPE_ETHERNET: u8 = 1;
const HTYPE_INFINIBAND: u8 = 32;
/// Offsets in a BOOTP message.
const HTYPE: usize = 1;
const HLEN: usize = 2;
const XID: usize = 4;
const FLAGS: usize = 10;
const CHADDR: usize = 28;
/// The fixed part and the magic cookie (RFC 2131 §3).
const FIXED: usize = 236;
const COOKIE: [u8; 4] = [99, 130, 83, 99];
/// The broadcast bit of `flags`.
const BROADCAST: u8 = 0x80;
/// Options (RFC 2132).
const OPT_PAD: u8 = 0;
const OPT_CLIENT_ID: u8 = 61;
const OPT_END: u8 = 255;
/// The identifier made from a MAC: type 1 (Ethernet) and the address.
const CLIENT_ID_LEN: usize = 7;

/// Where the BOOTP message of a DHCP packet is: the IP header length and
/// the message; `None` if `ip` is not an unfragmented UDP datagram from
/// port `sport` to port `dport` holding at least the fixed part and the
/// cookie.
fn bootp(ip: &[u8], sport: u16, dport: u16) -> Option<(usize, &[u8])> {
    let ihl = usize::from(*ip.first()? & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    let frag = u16::from_be_bytes([*ip.get(6)?, *ip.get(7)?]) & 0x3fff;
    if ip[0] >> 4 != 4 || ihl < 20 || *ip.get(9)? != 17 || frag != 0 || total > ip.len() {
        return None;
    }
    let udp = ip.get(ihl..total)?;
    let (s, d) = (
        u16::from_be_bytes([*udp.first()?, *udp.get(1)?]),
        u16::from_be_bytes([*udp.get(2)?, *udp.get(3)?]),
    );
    let m = udp.get(8..)?;
    (s == sport && d == dport && m.len() >= FIXED + 4 && m[FIXED..FIXED + 4] == COOKIE)
        .then_some((ihl, m))
}

/// Whether the start of IPv4 packet `ip` shows UDP to or from a BOOTP
/// port: such a packet may be rewritten and is needed whole.
pub fn bootp_ports(ip: &[u8]) -> bool {
    let Some(&b) = ip.first() else {
        return false;
    };
    let l4 = usize::from(b & 0x0f) * 4;
    let port = |at: usize| ip.get(at..at + 2).map(|p| u16::from_be_bytes([p[0], p[1]]));
    b >> 4 == 4
        && ip.get(9) == Some(&17)
        && [port(l4), port(l4 + 2)]
            .iter()
            .any(|p| matches!(p, Some(CLIENT_PORT | SERVER_PORT)))
}

/// The transaction id of a server's reply in the IPoIB form.
pub fn reply_xid(ip: &[u8]) -> Option<u32> {
    let (_, m) = bootp(ip, SERVER_PORT, CLIENT_PORT)?;
    (m[0] == BOOTREPLY && m[HTYPE] == HTYPE_INFINIBAND).then(|| xid(m))
}

fn xid(m: &[u8]) -> u32 {
    u32::from_be_bytes([m[XID], m[XID + 1], m[XID + 2], m[XID + 3]])
}

/// What [`to_fabric`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Length of the rewritten packet in `out`.
    pub len: usize,
    /// Its transaction id.
    pub xid: u32,
    /// A client identifier was inserted (the reply's is removed again).
    pub inserted_client_id: bool,
}

/// Rewrites a guest's DHCP request (Ethernet form: hardware type 1,
/// `chaddr` its MAC) to the IPoIB form: type 32, no hardware address,
/// the broadcast flag, and a client identifier from `mac` if the guest
/// sent none. `None` if `ip` is not such a request or `out` is too small.
pub fn to_fabric(ip: &[u8], mac: Mac, out: &mut [u8]) -> Option<Request> {
    let (ihl, m) = bootp(ip, CLIENT_PORT, SERVER_PORT)?;
    if m[0] != BOOTREQUEST || m[HTYPE] != HTYPE_ETHERNET || m[HLEN] != 6 {
        return None;
    }
    let start = ihl + 8;
    out.get_mut(..start + FIXED + 4)?
        .copy_from_slice(&ip[..start + FIXED + 4]);
    let b = &mut out[start..];
    b[HTYPE] = HTYPE_INFINIBAND;
    b[HLEN] = 0;
    b[FLAGS] |= BROADCAST;
    b[CHADDR..CHADDR + 16].fill(0);
    let mut id = [0u8; CLIENT_ID_LEN];
    id[0] = HTYPE_ETHERNET;
    id[1..].copy_from_slice(&mac.0);
    let has_id = options(m).any(|(code, _)| code == OPT_CLIENT_ID);
    let extra: &[u8] = if has_id { &[] } else { &id };
    let len = copy_options(m, out.get_mut(start + FIXED + 4..)?, None, extra)?;
    let n = finish(out, ihl, FIXED + 4 + len)?;
    Some(Request {
        len: n,
        xid: xid(m),
        inserted_client_id: !has_id,
    })
}

/// Rewrites a server's reply in the IPoIB form back to the Ethernet form
/// for the guest with `mac`: hardware type 1, `chaddr` its MAC, and the
/// client identifier removed if it was ours (`strip_client_id`). `None`
/// if `ip` is not such a reply or `out` is too small.
pub fn to_guest(ip: &[u8], mac: Mac, strip_client_id: bool, out: &mut [u8]) -> Option<usize> {
    let (ihl, m) = bootp(ip, SERVER_PORT, CLIENT_PORT)?;
    if m[0] != BOOTREPLY || m[HTYPE] != HTYPE_INFINIBAND {
        return None;
    }
    let start = ihl + 8;
    out.get_mut(..start + FIXED + 4)?
        .copy_from_slice(&ip[..start + FIXED + 4]);
    let b = &mut out[start..];
    b[HTYPE] = HTYPE_ETHERNET;
    b[HLEN] = 6;
    b[CHADDR..CHADDR + 16].fill(0);
    b[CHADDR..CHADDR + 6].copy_from_slice(&mac.0);
    let skip = strip_client_id.then_some(OPT_CLIENT_ID);
    let len = copy_options(m, out.get_mut(start + FIXED + 4..)?, skip, &[])?;
    finish(out, ihl, FIXED + 4 + len)
}

/// The options of BOOTP message `m`: (code, value), up to END or the
/// first one that runs past the message.
fn options(m: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut at = FIXED + 4;
    std::iter::from_fn(move || {
        loop {
            let code = *m.get(at)?;
            match code {
                OPT_PAD => at += 1,
                OPT_END => return None,
                _ => {
                    let len = usize::from(*m.get(at + 1)?);
                    let value = m.get(at + 2..at + 2 + len)?;
                    at += 2 + len;
                    return Some((code, value));
                }
            }
        }
    })
}

/// Copies the options of `m` into `out` without option `skip`, then
/// `client_id` as option 61 if not empty, then END; the bytes written.
fn copy_options(m: &[u8], out: &mut [u8], skip: Option<u8>, client_id: &[u8]) -> Option<usize> {
    let mut at = 0;
    let mut put = |b: &[u8]| -> Option<()> {
        out.get_mut(at..at + b.len())?.copy_from_slice(b);
        at += b.len();
        Some(())
    };
    for (code, value) in options(m) {
        if Some(code) != skip {
            put(&[code, value.len() as u8])?;
            put(value)?;
        }
    }
    if !client_id.is_empty() {
        put(&[OPT_CLIENT_ID, client_id.len() as u8])?;
        put(client_id)?;
    }
    put(&[OPT_END])?;
    Some(at)
}

/// Sets the IP and UDP lengths of the packet in `out` (IP header of
/// `ihl` bytes, UDP payload of `payload` bytes) and both checksums;
/// returns the packet's length.
fn finish(out: &mut [u8], ihl: usize, payload: usize) -> Option<usize> {
    let udp_len = 8 + payload;
    let total = ihl + udp_len;
    let p = out.get_mut(..total)?;
    p[2..4].copy_from_slice(&u16::try_from(total).ok()?.to_be_bytes());
    p[10..12].fill(0);
    let sum = checksum(&[&p[..ihl]]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    let (src, dst) = (ipv4_at(p, 12), ipv4_at(p, 16));
    let udp = &mut p[ihl..];
    udp[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
    udp[6..8].fill(0);
    let mut pseudo = [0u8; 12];
    pseudo[..4].copy_from_slice(&src.octets());
    pseudo[4..8].copy_from_slice(&dst.octets());
    pseudo[9] = 17;
    pseudo[10..12].copy_from_slice(&(udp_len as u16).to_be_bytes());
    let sum = match checksum(&[&pseudo, udp]) {
        // A computed zero is sent as all ones (RFC 768).
        0 => 0xffff,
        s => s,
    };
    udp[6..8].copy_from_slice(&sum.to_be_bytes());
    Some(total)
}

/// A DHCP message laid out by hand for tests from RFC 2131 §2 and §3
/// (written apart from the rewriting above): IPv4 (20 bytes, `src` →
/// `dst`), UDP `ports` (checksum 0), op, htype, hlen, `xid`, chaddr, the
/// cookie, then `opts` and END.
#[cfg(test)]
pub(crate) fn test_message(
    (src, dst): ([u8; 4], [u8; 4]),
    ports: (u16, u16),
    (op, htype, hlen): (u8, u8, u8),
    xid: u32,
    chaddr: &[u8],
    opts: &[u8],
) -> Vec<u8> {
    let mut m = vec![0u8; FIXED];
    m[0] = op;
    m[1] = htype;
    m[2] = hlen;
    m[4..8].copy_from_slice(&xid.to_be_bytes());
    m[28..28 + chaddr.len()].copy_from_slice(chaddr);
    m.extend_from_slice(&[99, 130, 83, 99]);
    m.extend_from_slice(opts);
    m.push(255);
    let udp_len = 8 + m.len();
    let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    p.extend_from_slice(&ports.0.to_be_bytes());
    p.extend_from_slice(&ports.1.to_be_bytes());
    p.extend_from_slice(&(udp_len as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(&m);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: Mac = Mac([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);

    use crate::engine::sum_is_all_ones as ok;

    fn udp_ok(ip: &[u8]) -> bool {
        let udp = &ip[20..];
        let mut pseudo = [0u8; 12];
        pseudo[..8].copy_from_slice(&ip[12..20]);
        pseudo[9] = 17;
        pseudo[10..12].copy_from_slice(&udp[4..6]);
        ok(&[&pseudo, udp])
    }

    /// A message of [`test_message`] with transaction id 0x3903f326.
    fn dhcp(
        addrs: ([u8; 4], [u8; 4]),
        ports: (u16, u16),
        hw: (u8, u8, u8),
        chaddr: &[u8],
        opts: &[u8],
    ) -> Vec<u8> {
        test_message(addrs, ports, hw, 0x3903_f326, chaddr, opts)
    }

    /// Option 53 (message type): DHCPDISCOVER or DHCPOFFER.
    const DISCOVER: [u8; 3] = [53, 1, 1];
    const OFFER: [u8; 3] = [53, 1, 2];

    #[test]
    fn a_guest_request_goes_out_in_the_ipoib_form_and_the_reply_comes_back() {
        let req = dhcp(([0; 4], [255; 4]), (68, 67), (1, 1, 6), &MAC.0, &DISCOVER);
        assert!(bootp_ports(&req));
        let mut out = [0u8; 1024];
        let r = to_fabric(&req, MAC, &mut out).unwrap();
        assert_eq!((r.xid, r.inserted_client_id), (0x3903_f326, true));
        let p = &out[..r.len];
        let m = &p[28..];
        // RFC 4390 §2.1: htype 32, hlen 0, chaddr zero, broadcast bit.
        assert_eq!((m[1], m[2]), (32, 0));
        assert_eq!(m[10] & 0x80, 0x80);
        assert!(m[28..44].iter().all(|b| *b == 0));
        // The message type, then the client identifier (type 1, the MAC),
        // then END.
        assert_eq!(&m[240..243], &DISCOVER);
        assert_eq!(&m[243..252], &[61, 7, 1, 0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert_eq!(m[252], 255);
        assert_eq!(r.len, req.len() + 9);
        assert_eq!(usize::from(u16::from_be_bytes([p[2], p[3]])), r.len);
        assert_eq!(usize::from(u16::from_be_bytes([p[24], p[25]])), r.len - 20);
        assert!(ok(&[&p[..20]]), "IP header checksum");
        assert!(udp_ok(p), "UDP checksum");

        // The server's offer, broadcast in the IPoIB form, echoing the
        // client identifier (RFC 6842).
        let id = [61, 7, 1, 0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let offer = dhcp(
            ([10, 0, 0, 1], [255; 4]),
            (67, 68),
            (2, 32, 0),
            &[],
            &[&OFFER[..], &id[..]].concat(),
        );
        assert_eq!(reply_xid(&offer), Some(0x3903_f326));
        let n = to_guest(&offer, MAC, true, &mut out).unwrap();
        let p = &out[..n];
        let m = &p[28..];
        assert_eq!((m[1], m[2]), (1, 6));
        assert_eq!(&m[28..34], &MAC.0);
        assert!(m[34..44].iter().all(|b| *b == 0));
        assert_eq!(&m[240..244], &[53, 1, 2, 255], "our identifier removed");
        assert_eq!(n, offer.len() - 9);
        assert!(ok(&[&p[..20]]));
        assert!(udp_ok(p));
        // Kept when the guest sent its own.
        let n = to_guest(&offer, MAC, false, &mut out).unwrap();
        assert_eq!(&out[28 + 243..28 + 252], &id);
        assert_eq!(n, offer.len());
    }

    #[test]
    fn only_dhcp_in_the_expected_form_is_rewritten() {
        let mut out = [0u8; 1024];
        // A request with its own identifier keeps it; nothing is added.
        let own = [61, 3, 0, 1, 2];
        let req = dhcp(([0; 4], [255; 4]), (68, 67), (1, 1, 6), &MAC.0, &own);
        let r = to_fabric(&req, MAC, &mut out).unwrap();
        assert!(!r.inserted_client_id);
        assert_eq!(r.len, req.len());
        // Not a request, already IPoIB form, other ports, a reply in the
        // Ethernet form, truncated, fragmented: left alone.
        let reply = dhcp(([0; 4], [255; 4]), (68, 67), (2, 1, 6), &MAC.0, &[]);
        assert!(to_fabric(&reply, MAC, &mut out).is_none());
        let ib = dhcp(([0; 4], [255; 4]), (68, 67), (1, 32, 0), &[], &[]);
        assert!(to_fabric(&ib, MAC, &mut out).is_none());
        let other = dhcp(([0; 4], [255; 4]), (68, 53), (1, 1, 6), &MAC.0, &[]);
        assert!(to_fabric(&other, MAC, &mut out).is_none());
        let eth_reply = dhcp(([10, 0, 0, 1], [255; 4]), (67, 68), (2, 1, 6), &MAC.0, &[]);
        assert!(to_guest(&eth_reply, MAC, true, &mut out).is_none());
        assert_eq!(reply_xid(&eth_reply), None);
        for cut in 0..req.len() {
            assert!(to_fabric(&req[..cut], MAC, &mut out).is_none(), "{cut}");
            let _ = to_guest(&req[..cut], MAC, true, &mut out);
        }
        let mut frag = req.clone();
        frag[6] = 0x20;
        assert!(to_fabric(&frag, MAC, &mut out).is_none());
        // An option running past the message ends the walk (the request
        // then gets an identifier of ours); no room, no rewrite.
        let mut bad = req.clone();
        let at = bad.len() - 5;
        bad[at] = 50;
        let r = to_fabric(&bad, MAC, &mut out).unwrap();
        assert!(r.inserted_client_id);
        assert!(to_fabric(&req, MAC, &mut out[..100]).is_none());
    }
}
