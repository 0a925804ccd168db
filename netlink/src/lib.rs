//! ipoib-netlink: configures the host side of IPoIB interfaces over
//! rtnetlink.
//!
//! The TUN devices that stand for IPoIB interfaces are created with ioctls
//! (`mlx5_driver::transport::tun`); everything else an administrator
//! would do with `ip` happens here: MTU, IPv6 address-generation mode (so
//! a link-local address appears on a link type whose 20-byte address the
//! kernel does not know), addresses, link up and down. It is the only
//! crate that uses tokio, on a current-thread runtime owned by
//! [`Netlink`], so callers stay synchronous.
//!
//! A [`Netlink`] speaks to the network namespace of the thread that
//! created it.

#![warn(missing_docs)]
#![deny(unsafe_code)]

use std::net::IpAddr;

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{
    AfSpecInet6, AfSpecUnspec, In6AddrGenMode, LinkAttribute, LinkFlags, LinkMessage,
};
use rtnetlink::{Handle, LinkUnspec};

/// What went wrong talking to the kernel.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The netlink socket or the runtime could not be set up.
    #[error("cannot open a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    /// No interface of that name.
    #[error("no interface named {0}")]
    NoSuchLink(String),
    /// The kernel refused a request.
    #[error("{what} on {link}: {err}")]
    Request {
        /// What was asked.
        what: &'static str,
        /// The interface.
        link: String,
        /// The kernel's answer.
        #[source]
        err: rtnetlink::Error,
    },
}

/// The host-side settings of one interface.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkConfig {
    /// MTU (the IPoIB MTU: IB MTU − 4 in datagram mode).
    pub mtu: u32,
    /// Addresses with their prefix lengths.
    pub addresses: Vec<(IpAddr, u8)>,
    /// Bring the link up afterwards.
    pub up: bool,
}

/// What the kernel reports about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// Interface index.
    pub index: u32,
    /// MTU.
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
    /// Link type (ARPHRD_*).
    pub link_type: u16,
}

/// An rtnetlink connection with its own runtime.
#[derive(Debug)]
pub struct Netlink {
    rt: tokio::runtime::Runtime,
    handle: Handle,
}

impl Netlink {
    /// Connects in the calling thread's network namespace.
    pub fn new() -> Result<Netlink, NetlinkError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(NetlinkError::Socket)?;
        let handle = rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
            tokio::spawn(conn);
            Ok::<_, NetlinkError>(handle)
        })?;
        Ok(Netlink { rt, handle })
    }

    fn get(&self, name: &str) -> Result<LinkMessage, NetlinkError> {
        self.rt.block_on(async {
            let mut links = self
                .handle
                .link()
                .get()
                .match_name(name.to_string())
                .execute();
            match links.try_next().await {
                Ok(Some(m)) => Ok(m),
                Ok(None) => Err(NetlinkError::NoSuchLink(name.to_string())),
                // ENODEV comes back as an error message.
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
                    Err(NetlinkError::NoSuchLink(name.to_string()))
                }
                Err(err) => Err(NetlinkError::Request {
                    what: "link get",
                    link: name.to_string(),
                    err,
                }),
            }
        })
    }

    /// What the kernel says about `name`.
    pub fn link(&self, name: &str) -> Result<LinkInfo, NetlinkError> {
        let m = self.get(name)?;
        let mtu = m
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            })
            .unwrap_or(0);
        Ok(LinkInfo {
            index: m.header.index,
            mtu,
            up: m.header.flags.contains(LinkFlags::Up),
            link_type: u16::from(m.header.link_layer_type),
        })
    }

    /// Applies `cfg` to `name`: address-generation mode `random` first
    /// (before the link is up, so the link-local address is generated),
    /// then the MTU, the addresses, and the link state.
    pub fn configure(&self, name: &str, cfg: &LinkConfig) -> Result<LinkInfo, NetlinkError> {
        let index = self.get(name)?.header.index;
        let req = |what, link: &str| {
            let link = link.to_string();
            move |err| NetlinkError::Request { what, link, err }
        };
        self.rt.block_on(async {
            let gen_mode = LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(vec![
                AfSpecInet6::AddrGenMode(In6AddrGenMode::Random),
            ])]);
            self.handle
                .link()
                .set(
                    LinkUnspec::new_with_index(index)
                        .append_extra_attribute(gen_mode)
                        .build(),
                )
                .execute()
                .await
                .map_err(req("set addrgenmode", name))?;
            self.handle
                .link()
                .set(LinkUnspec::new_with_index(index).mtu(cfg.mtu).build())
                .execute()
                .await
                .map_err(req("set mtu", name))?;
            for &(addr, prefix) in &cfg.addresses {
                self.handle
                    .address()
                    .add(index, addr, prefix)
                    .replace()
                    .execute()
                    .await
                    .map_err(req("add address", name))?;
            }
            Ok::<_, NetlinkError>(())
        })?;
        self.set_up(name, cfg.up)?;
        self.link(name)
    }

    /// Brings `name` up or down (the host side mirrors the port state).
    pub fn set_up(&self, name: &str, up: bool) -> Result<(), NetlinkError> {
        let index = self.get(name)?.header.index;
        let msg = if up {
            LinkUnspec::new_with_index(index).up().build()
        } else {
            LinkUnspec::new_with_index(index).down().build()
        };
        self.rt
            .block_on(self.handle.link().set(msg).execute())
            .map_err(|err| NetlinkError::Request {
                what: if up { "set up" } else { "set down" },
                link: name.to_string(),
                err,
            })
    }

    /// The addresses the kernel holds on `name`.
    pub fn addresses(&self, name: &str) -> Result<Vec<(IpAddr, u8)>, NetlinkError> {
        use rtnetlink::packet_route::address::AddressAttribute;
        let index = self.get(name)?.header.index;
        self.rt.block_on(async {
            let mut out = Vec::new();
            let mut s = self
                .handle
                .address()
                .get()
                .set_link_index_filter(index)
                .execute();
            while let Some(m) = s.try_next().await.map_err(|err| NetlinkError::Request {
                what: "address get",
                link: name.to_string(),
                err,
            })? {
                for a in &m.attributes {
                    if let AddressAttribute::Address(ip) = a {
                        out.push((*ip, m.header.prefix_len));
                    }
                }
            }
            Ok(out)
        })
    }
}
