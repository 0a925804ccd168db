//! vhost-user-net backend: a VM's virtio-net NIC as an endpoint of an
//! IPoIB interface.
//!
//! Each socket (`--vhost-user ib0=PATH`) has one [`Backend`]. The
//! vhost-user protocol runs on the library's threads (one for the
//! frontend's messages, one worker for the queue kicks); the packets do
//! not. A kick only wakes the daemon's event loop through
//! [`Backend::wake_fd`], and the loop, which owns the HCA, moves frames
//! between the virtqueues and the interface through [`VnicPort`] (the
//! [`HostPort`] of the guest's endpoint). So the HCA is driven from one
//! thread, as everywhere else in the daemon.
//!
//! Frames are copied between guest memory and the daemon's buffers here;
//! every descriptor is checked against the VM's memory table by the copy
//! itself (an address outside it fails the copy and the chain is returned
//! unused and counted), and chains are bounded in length and count.
//!
//! A frontend that goes away (QEMU or testpmd restarting) ends its
//! connection only: the listener takes the next one, the endpoint (QP,
//! QPN, memberships) stays, and the guest's learned MAC and addresses
//! are forgotten (see [`crate::link::Link::reset_guest`]).

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use vhost::vhost_user::Listener;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use mlx5_driver::transport::Transport;

use crate::engine::eth::Mac;
use crate::link::{EndpointId, GuestConfig, HostPort, Link};

/// virtio-net and virtio feature bits this backend knows (virtio 1.2
/// §5.1.3, §6).
pub mod feature {
    /// The guest may hand partial checksums.
    pub const CSUM: u64 = 1 << 0;
    /// `mtu` in the config space is valid.
    pub const MTU: u64 = 1 << 3;
    /// `mac` in the config space is valid.
    pub const MAC: u64 = 1 << 5;
    /// The guest may send TCPv4 segmentation offload frames.
    pub const HOST_TSO4: u64 = 1 << 11;
    /// The guest may send TCPv6 segmentation offload frames.
    pub const HOST_TSO6: u64 = 1 << 12;
    /// Received frames may span several buffers.
    pub const MRG_RXBUF: u64 = 1 << 15;
    /// Indirect descriptor tables.
    pub const INDIRECT_DESC: u64 = 1 << 28;
    /// used_event / avail_event notification suppression.
    pub const EVENT_IDX: u64 = 1 << 29;
    /// vhost-user: protocol features are negotiated.
    pub const PROTOCOL_FEATURES: u64 = 1 << 30;
    /// A virtio 1.x device.
    pub const VERSION_1: u64 = 1 << 32;
}

/// The receive and transmit queues of the one queue pair.
const RXQ: usize = 0;
const TXQ: usize = 1;
/// Largest queue a frontend may set up.
const MAX_QUEUE_SIZE: usize = 1024;
/// Length of the virtio-net header with VERSION_1 or MRG_RXBUF.
const HDR_LEN: usize = 12;
/// Length of the legacy header without either.
const LEGACY_HDR_LEN: usize = 10;
/// Descriptors one received frame may be spread over.
const MAX_RX_DESCS: usize = 64;
/// `virtio_net_config` up to and including `mtu`.
const CONFIG_LEN: usize = 12;

/// What one vNIC's queues saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct QueueCounters {
    /// Frames taken from the guest's transmit queue.
    pub tx_frames: u64,
    /// Frames written to the guest's receive queue.
    pub rx_frames: u64,
    /// Transmit chains refused: outside the guest's memory, writable,
    /// empty, shorter than a virtio-net and Ethernet header, or longer
    /// than a frame may be.
    pub tx_bad_chains: u64,
    /// Receive chains refused: outside the guest's memory or read-only.
    pub rx_bad_chains: u64,
    /// Frames for the guest dropped: no receive buffer posted.
    pub rx_no_buffers: u64,
    /// Frames for the guest dropped: larger than its buffers.
    pub rx_too_big: u64,
    /// Frontend connections served.
    pub connections: u64,
}

/// What `ipoib-tool vms` shows of a vNIC's frontend side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The socket.
    pub socket: PathBuf,
    /// A frontend is connected.
    pub connected: bool,
    /// Both queues are set up, enabled and ready: frames move.
    pub ready: bool,
    /// Features the frontend acknowledged.
    pub features: u64,
    /// Counters.
    pub counters: QueueCounters,
}

#[derive(Default)]
struct State {
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    vrings: Vec<VringRwLock>,
    acked: u64,
    event_idx: bool,
    connected: bool,
    /// The frontend went away since the event loop last looked.
    disconnected: bool,
    shutdown: Option<ShutdownHandle>,
    mtu: u16,
    counters: QueueCounters,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("connected", &self.connected)
            .field("acked", &self.acked)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

/// One vhost-user-net device; see the module documentation.
#[derive(Debug)]
pub struct Backend {
    socket: PathBuf,
    mac: Mac,
    offloads: bool,
    wake: EventFd,
    stop: AtomicBool,
    state: Mutex<State>,
}

impl Backend {
    /// A device presenting `mac` and `mtu` on `socket`; `offloads` when the
    /// HCA can finish checksums and segment TCP (CSUM and HOST_TSO4/6 are
    /// offered then).
    pub fn new(socket: &Path, mac: Mac, mtu: u32, offloads: bool) -> io::Result<Arc<Backend>> {
        Ok(Arc::new(Backend {
            socket: socket.to_path_buf(),
            mac,
            offloads,
            wake: EventFd::new(EFD_NONBLOCK)?,
            stop: AtomicBool::new(false),
            state: Mutex::new(State {
                mtu: u16::try_from(mtu).unwrap_or(u16::MAX),
                ..State::default()
            }),
        }))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic on another thread while holding the lock leaves plain
        // data behind; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Readable when the event loop has frames to move or a frontend left.
    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Clears the wake-up (the loop moves whatever is there next).
    pub fn consume_wake(&self) {
        let _ = self.wake.read();
    }

    /// True once after a frontend disconnected.
    pub fn take_disconnected(&self) -> bool {
        std::mem::take(&mut self.state().disconnected)
    }

    /// Sets the MTU presented in the config space (the next frontend
    /// reads it).
    pub fn set_mtu(&self, mtu: u32) {
        self.state().mtu = u16::try_from(mtu).unwrap_or(u16::MAX);
    }

    /// The socket, connection state, negotiated features and counters.
    pub fn status(&self) -> Status {
        let st = self.state();
        let ready = st.mem.is_some()
            && st.vrings.len() == 2
            && st.vrings.iter().all(|v| {
                let v = v.get_ref();
                v.is_enabled() && v.get_queue().ready()
            });
        Status {
            socket: self.socket.clone(),
            connected: st.connected,
            ready,
            features: st.acked,
            counters: st.counters,
        }
    }

    fn offered(&self) -> u64 {
        let mut f = feature::VERSION_1
            | feature::MRG_RXBUF
            | feature::EVENT_IDX
            | feature::INDIRECT_DESC
            | feature::MTU
            | feature::MAC
            | feature::PROTOCOL_FEATURES;
        if self.offloads {
            f |= feature::CSUM | feature::HOST_TSO4 | feature::HOST_TSO6;
        }
        f
    }

    fn connected(&self, handle: Option<ShutdownHandle>) {
        let mut st = self.state();
        st.connected = true;
        st.counters.connections += 1;
        st.shutdown = handle;
    }

    fn disconnected(&self) {
        let mut st = self.state();
        st.connected = false;
        st.disconnected = true;
        st.vrings.clear();
        st.mem = None;
        st.acked = 0;
        st.event_idx = false;
        st.shutdown = None;
        drop(st);
        let _ = self.wake.write(1);
    }

    fn header_len(acked: u64) -> usize {
        if acked & (feature::VERSION_1 | feature::MRG_RXBUF) != 0 {
            HDR_LEN
        } else {
            LEGACY_HDR_LEN
        }
    }

    /// Takes one frame from the transmit queue into `buf` behind a 12-byte
    /// virtio-net header.
    fn pop_tx(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut st = self.state();
        let (Some(mem), Some(vring)) = (st.mem.clone(), st.vrings.get(TXQ).cloned()) else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let hdr = Self::header_len(st.acked);
        let guard = mem.memory();
        loop {
            let chain = {
                let mut v = vring.get_mut();
                if !v.is_enabled() || !v.get_queue().ready() {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                v.get_queue_mut().pop_descriptor_chain(&*guard)
            };
            let Some(chain) = chain else {
                // Re-arm; frames that came meanwhile are taken now.
                if st.event_idx && vring.enable_notification().unwrap_or(false) {
                    continue;
                }
                return Err(io::ErrorKind::WouldBlock.into());
            };
            let head = chain.head_index();
            let n = read_chain(chain, &guard, buf, HDR_LEN - hdr);
            let _ = vring.add_used(head, 0);
            if vring.needs_notification().unwrap_or(true) {
                let _ = vring.signal_used_queue();
            }
            match n {
                Some(n) if n >= hdr + crate::engine::eth::ETH_HLEN => {
                    if hdr == LEGACY_HDR_LEN {
                        // The legacy header has no num_buffers: make room.
                        buf.copy_within(HDR_LEN - hdr..HDR_LEN - hdr + LEGACY_HDR_LEN, 0);
                        buf[LEGACY_HDR_LEN..HDR_LEN].fill(0);
                    }
                    st.counters.tx_frames += 1;
                    return Ok(n + HDR_LEN - hdr);
                }
                _ => st.counters.tx_bad_chains += 1,
            }
        }
    }

    /// Writes one frame (`buf`: 12-byte virtio-net header, then the
    /// Ethernet frame) into the receive queue.
    fn push_rx(&self, buf: &[u8]) -> io::Result<usize> {
        let mut st = self.state();
        let (Some(mem), Some(vring)) = (st.mem.clone(), st.vrings.get(RXQ).cloned()) else {
            st.counters.rx_no_buffers += 1;
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let (Some(vhdr), Some(frame)) = (buf.get(..LEGACY_HDR_LEN), buf.get(HDR_LEN..)) else {
            return Err(io::ErrorKind::InvalidInput.into());
        };
        let hdr = Self::header_len(st.acked);
        let mergeable = st.acked & feature::MRG_RXBUF != 0;
        let total = hdr + frame.len();
        let guard = mem.memory();
        let mut v = vring.get_mut();
        if !v.is_enabled() || !v.get_queue().ready() {
            st.counters.rx_no_buffers += 1;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        // Gather writable buffers, chain by chain, until the frame fits.
        let mut descs = [(GuestAddress(0), 0u32); MAX_RX_DESCS];
        let mut nd = 0;
        let mut heads = [(0u16, 0usize, 0usize); MAX_RX_DESCS];
        let mut nh = 0;
        let mut room = 0usize;
        while room < total {
            let Some(chain) = v.get_queue_mut().pop_descriptor_chain(&*guard) else {
                break;
            };
            let first = nd;
            let mut ok = true;
            let mut more = false;
            for d in chain.clone() {
                if !d.is_write_only() || nd == MAX_RX_DESCS {
                    ok = false;
                    break;
                }
                descs[nd] = (d.addr(), d.len());
                nd += 1;
                room += d.len() as usize;
                more = d.has_next();
            }
            // A loop or a chain longer than the queue.
            ok &= !more;
            if !ok || nd == first {
                // A chain we cannot write: give it back used, empty.
                st.counters.rx_bad_chains += 1;
                room -= descs[first..nd].iter().map(|d| d.1 as usize).sum::<usize>();
                nd = first;
                drop(v);
                let _ = vring.add_used(chain.head_index(), 0);
                v = vring.get_mut();
                continue;
            }
            heads[nh] = (chain.head_index(), first, nd);
            nh += 1;
            if !mergeable || nh == MAX_RX_DESCS {
                break;
            }
        }
        if room < total {
            // Not enough buffers: put the chains back for the next frame.
            for _ in 0..nh {
                v.get_queue_mut().go_to_previous_position();
            }
            if nh == 0 {
                st.counters.rx_no_buffers += 1;
            } else {
                st.counters.rx_too_big += 1;
            }
            return Err(io::ErrorKind::WouldBlock.into());
        }
        drop(v);
        // Header (num_buffers = chains used), then the frame.
        let mut h = [0u8; HDR_LEN];
        h[..LEGACY_HDR_LEN].copy_from_slice(vhdr);
        h[LEGACY_HDR_LEN..].copy_from_slice(&(nh as u16).to_le_bytes());
        let pieces: [&[u8]; 2] = [&h[..hdr], frame];
        let mut at = 0usize;
        let mut failed = false;
        let mut used = [0usize; MAX_RX_DESCS];
        for (k, &(_, first, last)) in heads[..nh].iter().enumerate() {
            for &(addr, len) in &descs[first..last] {
                let n = (len as usize).min(total - at);
                if n == 0 {
                    break;
                }
                if !write_pieces(&guard, addr, &pieces, at, n) {
                    failed = true;
                }
                at += n;
                used[k] += n;
            }
        }
        for (k, &(head, _, _)) in heads[..nh].iter().enumerate() {
            let _ = vring.add_used(head, if failed { 0 } else { used[k] as u32 });
        }
        if vring.needs_notification().unwrap_or(true) {
            let _ = vring.signal_used_queue();
        }
        if failed {
            st.counters.rx_bad_chains += 1;
            return Err(io::ErrorKind::InvalidData.into());
        }
        st.counters.rx_frames += 1;
        Ok(buf.len())
    }

    /// Serves frontends on the socket, one after another, until
    /// [`Backend::stop`]. A stale socket file is replaced.
    pub fn serve(self: &Arc<Self>) -> io::Result<JoinHandle<()>> {
        if UnixStream::connect(&self.socket).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another process serves this vhost-user socket",
            ));
        }
        let mut listener = Listener::new(&self.socket, true).map_err(io::Error::other)?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("vhost-user".into())
            .spawn(move || me.accept_loop(&mut listener))
    }

    fn accept_loop(self: &Arc<Self>, listener: &mut Listener) {
        let name = self.socket.display().to_string();
        while !self.stop.load(Ordering::Acquire) {
            let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
            let mut daemon = match VhostUserDaemon::new(name.clone(), self.clone(), mem) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(socket = %name, "vhost-user: {e}");
                    return;
                }
            };
            if let Err(e) = daemon.start(listener) {
                if !self.stop.load(Ordering::Acquire) {
                    tracing::warn!(socket = %name, "vhost-user: accepting a frontend: {e}");
                }
                continue;
            }
            if self.stop.load(Ordering::Acquire) {
                daemon.request_shutdown();
            }
            self.connected(daemon.shutdown_handle());
            tracing::info!(socket = %name, "vhost-user frontend connected");
            match daemon.wait() {
                Ok(()) => tracing::info!(socket = %name, "vhost-user frontend left"),
                Err(e) => tracing::info!(socket = %name, "vhost-user frontend left: {e}"),
            }
            for h in daemon.get_epoll_handlers() {
                h.send_exit_event();
            }
            drop(daemon);
            self.disconnected();
        }
    }

    /// Ends the current connection and the accept loop (the caller joins
    /// the thread [`Backend::serve`] returned), and removes the socket.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.state().shutdown.take() {
            h.shutdown();
        }
        // Wake a blocked accept with a connection of our own.
        let _ = UnixStream::connect(&self.socket);
    }

    /// Removes the socket file.
    pub fn remove_socket(&self) {
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Copies the readable descriptors of `chain` into `buf` from `at` on;
/// `None` if any is writable or outside guest memory (a region's end
/// crossed into a hole included), if the chain loops or is longer than
/// the queue (the walk stops at the queue size with a descriptor that
/// still names a next one), or if the whole is empty or does not fit.
fn read_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    buf: &mut [u8],
    at: usize,
) -> Option<usize> {
    let mut n = 0usize;
    let mut more = false;
    for d in chain {
        if d.is_write_only() {
            return None;
        }
        let len = d.len() as usize;
        let dst = buf.get_mut(at + n..at + n + len)?;
        mem.read_slice(dst, d.addr()).ok()?;
        n += len;
        more = d.has_next();
    }
    (n > 0 && !more).then_some(n)
}

/// Writes bytes `at..at + n` of the concatenation of `pieces` to guest
/// memory at `addr`.
fn write_pieces(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    pieces: &[&[u8]],
    at: usize,
    n: usize,
) -> bool {
    let mut skip = at;
    let mut left = n;
    let mut to = addr;
    for p in pieces {
        if left == 0 {
            break;
        }
        if skip >= p.len() {
            skip -= p.len();
            continue;
        }
        let take = (p.len() - skip).min(left);
        if mem.write_slice(&p[skip..skip + take], to).is_err() {
            return false;
        }
        to = GuestAddress(to.0 + take as u64);
        skip = 0;
        left -= take;
    }
    left == 0
}

impl VhostUserBackend for Backend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.offered()
    }

    fn acked_features(&self, features: u64) {
        self.state().acked = features;
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.state().event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // virtio_net_config: mac @0, status @6 (no STATUS feature: 0),
        // max_virtqueue_pairs @8, mtu @10; zero past it.
        let mut c = [0u8; CONFIG_LEN];
        c[..6].copy_from_slice(&self.mac.0);
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.state().mtu.to_le_bytes());
        let mut out = vec![0u8; size as usize];
        for (k, b) in out.iter_mut().enumerate() {
            if let Some(v) = (offset as usize).checked_add(k).and_then(|i| c.get(i)) {
                *b = *v;
            }
        }
        out
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        self.state().mem = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        _event: u16,
        _set: EventSet,
        vrings: &[VringRwLock],
        _thread: usize,
    ) -> io::Result<()> {
        {
            let mut st = self.state();
            if st.connected && st.vrings.len() != vrings.len() {
                st.vrings = vrings.to_vec();
            }
        }
        self.wake.write(1)
    }
}

/// The guest's side of its endpoint, for the interface.
#[derive(Debug, Clone)]
pub struct VnicPort(pub Arc<Backend>);

impl HostPort for VnicPort {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.pop_tx(buf)
    }

    fn send(&self, buf: &[u8]) -> io::Result<usize> {
        self.0.push_rx(buf)
    }
}

/// One `--vhost-user` socket of an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostSpec {
    /// The interface it belongs to.
    pub interface: String,
    /// Where frontends connect.
    pub socket: PathBuf,
    /// The guest's MAC; learned from its frames when not given.
    pub mac: Option<Mac>,
    /// Source addresses the guest may use; learned when empty.
    pub addresses: Vec<IpAddr>,
}

impl VhostSpec {
    /// Parses `IF=PATH[,mac=MAC][,ip=ADDRESS]...`.
    pub fn parse(s: &str) -> Result<VhostSpec, String> {
        let (interface, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected INTERFACE=SOCKET[,mac=MAC][,ip=ADDRESS]"))?;
        let mut parts = rest.split(',');
        let socket = parts.next().unwrap_or_default();
        if interface.is_empty() || socket.is_empty() {
            return Err(format!(
                "{s:?}: expected INTERFACE=SOCKET[,mac=MAC][,ip=ADDRESS]"
            ));
        }
        let mut spec = VhostSpec {
            interface: interface.to_string(),
            socket: PathBuf::from(socket),
            mac: None,
            addresses: Vec::new(),
        };
        for p in parts {
            match p.split_once('=') {
                Some(("mac", m)) => spec.mac = Some(Self::mac(m)?),
                Some(("ip", a)) => spec.addresses.push(
                    a.parse()
                        .map_err(|_| format!("{a:?} is not an IP address"))?,
                ),
                _ => return Err(format!("{p:?}: expected mac=MAC or ip=ADDRESS")),
            }
        }
        Ok(spec)
    }

    /// Checks a MAC given for a guest: a unicast address.
    pub fn mac(m: &str) -> Result<Mac, String> {
        let mac: Mac = m.parse().map_err(|e| format!("{e}"))?;
        if mac.is_multicast() {
            return Err(format!("{m}: a guest's MAC must be unicast"));
        }
        Ok(mac)
    }

    /// The MAC presented to a guest whose MAC was not given: locally
    /// administered, from the port GID and the socket path, so it is the
    /// same after a restart.
    pub fn default_mac(&self, gid: &[u8; 16]) -> Mac {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let path = self.socket.as_os_str().as_encoded_bytes();
        for &b in gid.iter().chain(path) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let b = h.to_be_bytes();
        Mac([(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]])
    }
}

/// The names of the feature bits set in `features`, for people.
pub fn feature_names(features: u64) -> Vec<&'static str> {
    [
        (feature::CSUM, "csum"),
        (feature::MTU, "mtu"),
        (feature::MAC, "mac"),
        (feature::HOST_TSO4, "host_tso4"),
        (feature::HOST_TSO6, "host_tso6"),
        (feature::MRG_RXBUF, "mrg_rxbuf"),
        (feature::INDIRECT_DESC, "indirect_desc"),
        (feature::EVENT_IDX, "event_idx"),
        (feature::PROTOCOL_FEATURES, "protocol_features"),
        (feature::VERSION_1, "version_1"),
    ]
    .into_iter()
    .filter(|(bit, _)| features & bit != 0)
    .map(|(_, n)| n)
    .collect()
}

/// A served socket: its device, the interface endpoint behind it and the
/// thread accepting its frontends.
#[derive(Debug)]
pub struct Vnic {
    /// The endpoint on the interface.
    pub endpoint: EndpointId,
    /// The vhost-user device.
    pub backend: Arc<Backend>,
    thread: Option<JoinHandle<()>>,
}

impl Vnic {
    /// Creates the endpoint for `spec` on `link` and starts serving its
    /// socket.
    pub fn start<T: Transport>(spec: &VhostSpec, link: &mut Link<T>) -> Result<Vnic, String> {
        let mac = spec.mac.unwrap_or_else(|| spec.default_mac(&link.gid()));
        let socket = spec.socket.display();
        let backend = Backend::new(&spec.socket, mac, link.mtu(), link.offloads())
            .map_err(|e| format!("{socket}: {e}"))?;
        let cfg = GuestConfig {
            mac,
            learn_mac: spec.mac.is_none(),
            allowed: spec.addresses.clone(),
        };
        let endpoint = link
            .add_guest(cfg, Box::new(VnicPort(backend.clone())))
            .map_err(|e| format!("{socket}: creating the vNIC's endpoint: {e}"))?;
        match backend.serve() {
            Ok(thread) => Ok(Vnic {
                endpoint,
                backend,
                thread: Some(thread),
            }),
            Err(e) => {
                for err in link.remove_guest(endpoint) {
                    tracing::warn!("{err}");
                }
                Err(format!("{socket}: {e}"))
            }
        }
    }

    /// Called when its wake-up fd is readable: a frontend that left is
    /// forgotten by the endpoint.
    pub fn wake<T: Transport>(&self, link: &mut Link<T>) {
        self.backend.consume_wake();
        if self.backend.take_disconnected() {
            link.reset_guest(self.endpoint);
        }
    }

    /// Ends the connection and the accept loop, removes the socket, and
    /// removes the endpoint from `link`; returns what failed.
    pub fn stop<T: Transport>(mut self, link: &mut Link<T>) -> Vec<String> {
        self.backend.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.backend.remove_socket();
        link.remove_guest(self.endpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guest memory: two regions with a hole between them.
    const LOW: (u64, usize) = (0, 0x1_0000);
    const HIGH: (u64, usize) = (0x2_0000, 0x1_0000);
    const QSIZE: u16 = 16;
    /// Split ring layout (virtio 1.2 §2.7): descriptor table (16 bytes a
    /// descriptor), available ring (flags, idx, ring), used ring (flags,
    /// idx, ring of id/len pairs); one set per queue.
    const DESC: [u64; 2] = [0x1000, 0x3000];
    const AVAIL: [u64; 2] = [0x1800, 0x3800];
    const USED: [u64; 2] = [0x2000, 0x4000];
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    struct Rig {
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        backend: Arc<Backend>,
        avail_idx: [u16; 2],
    }

    impl Rig {
        fn new(acked: u64) -> Rig {
            let m = GuestMemoryMmap::from_ranges(&[
                (GuestAddress(LOW.0), LOW.1),
                (GuestAddress(HIGH.0), HIGH.1),
            ])
            .unwrap();
            let mem = GuestMemoryAtomic::new(m);
            let backend = Backend::new(
                Path::new("/nonexistent/vm.sock"),
                Mac([0x52, 0x54, 0, 0, 0, 1]),
                2044,
                false,
            )
            .unwrap();
            let mut vrings = Vec::new();
            for q in 0..2 {
                let v = VringRwLock::new(mem.clone(), QSIZE).unwrap();
                v.set_queue_size(QSIZE);
                v.set_queue_info(DESC[q], AVAIL[q], USED[q]).unwrap();
                v.set_queue_ready(true);
                v.set_enabled(true);
                vrings.push(v);
            }
            {
                let mut st = backend.state();
                st.mem = Some(mem.clone());
                st.vrings = vrings;
                st.acked = acked;
                st.connected = true;
            }
            Rig {
                mem,
                backend,
                avail_idx: [0, 0],
            }
        }

        fn desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let at = GuestAddress(DESC[q] + u64::from(i) * 16);
            let m = self.mem.memory();
            m.write_obj(addr.to_le(), at).unwrap();
            m.write_obj(len.to_le(), GuestAddress(at.0 + 8)).unwrap();
            m.write_obj(flags.to_le(), GuestAddress(at.0 + 12)).unwrap();
            m.write_obj(next.to_le(), GuestAddress(at.0 + 14)).unwrap();
        }

        /// Makes the chain at `head` available on queue `q`.
        fn offer(&mut self, q: usize, head: u16) {
            let m = self.mem.memory();
            let slot = u64::from(self.avail_idx[q] % QSIZE);
            m.write_obj(head.to_le(), GuestAddress(AVAIL[q] + 4 + slot * 2))
                .unwrap();
            self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
            m.write_obj(self.avail_idx[q].to_le(), GuestAddress(AVAIL[q] + 2))
                .unwrap();
        }

        fn used_idx(&self, q: usize) -> u16 {
            self.mem
                .memory()
                .read_obj::<u16>(GuestAddress(USED[q] + 2))
                .unwrap()
        }

        /// The (id, len) of used entry `k` of queue `q`.
        fn used(&self, q: usize, k: u16) -> (u32, u32) {
            let m = self.mem.memory();
            let at = USED[q] + 4 + u64::from(k % QSIZE) * 8;
            (
                m.read_obj(GuestAddress(at)).unwrap(),
                m.read_obj(GuestAddress(at + 4)).unwrap(),
            )
        }

        fn counters(&self) -> QueueCounters {
            self.backend.status().counters
        }
    }

    /// A TX frame: zero virtio-net header, then 60 bytes of Ethernet.
    fn frame() -> Vec<u8> {
        let mut f = vec![0u8; HDR_LEN];
        f.extend((0..60u8).map(|b| b ^ 0xA5));
        f
    }

    #[test]
    fn guest_frames_are_read_and_bad_chains_refused() {
        let mut r = Rig::new(feature::VERSION_1);
        let port = VnicPort(r.backend.clone());
        let f = frame();
        // A good chain split over two descriptors in two regions.
        r.mem
            .memory()
            .write_slice(&f[..20], GuestAddress(0x8000))
            .unwrap();
        r.mem
            .memory()
            .write_slice(&f[20..], GuestAddress(0x2_1000))
            .unwrap();
        r.desc(TXQ, 0, 0x8000, 20, NEXT, 1);
        r.desc(TXQ, 1, 0x2_1000, (f.len() - 20) as u32, 0, 0);
        r.offer(TXQ, 0);
        let mut buf = vec![0u8; 4096];
        assert_eq!(port.recv(&mut buf).unwrap(), f.len());
        assert_eq!(&buf[..f.len()], &f[..]);
        assert_eq!(r.used_idx(TXQ), 1);
        assert_eq!(r.used(TXQ, 0), (0, 0), "TX chains are used with length 0");

        // Each of these is refused, returned to the guest and counted.
        // Outside every region.
        r.desc(TXQ, 2, 0x5_0000, 72, 0, 0);
        // Crossing the end of the low region into the hole.
        r.desc(TXQ, 3, LOW.1 as u64 - 16, 72, 0, 0);
        // A loop: 4 -> 5 -> 4 ...
        r.desc(TXQ, 4, 0x8000, 40, NEXT, 5);
        r.desc(TXQ, 5, 0x8000, 40, NEXT, 4);
        // Zero length.
        r.desc(TXQ, 6, 0x8000, 0, 0, 0);
        // Longer than a frame may be (the buffer).
        r.desc(TXQ, 7, 0x2_0000, 0x8000, NEXT, 8);
        r.desc(TXQ, 8, 0x2_0000, 0x8000, 0, 0);
        // Writable: a receive buffer in the transmit queue.
        r.desc(TXQ, 9, 0x8000, 72, WRITE, 0);
        // Shorter than a virtio-net and an Ethernet header.
        r.desc(TXQ, 10, 0x8000, 20, 0, 0);
        for head in [2, 3, 4, 6, 7, 9, 10] {
            r.offer(TXQ, head);
        }
        let err = port.recv(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(r.counters().tx_bad_chains, 7);
        assert_eq!(r.used_idx(TXQ), 8, "every chain went back to the guest");
        assert_eq!(r.counters().tx_frames, 1);

        // And the queue still works.
        r.desc(TXQ, 11, 0x8000, 20, NEXT, 12);
        r.desc(TXQ, 12, 0x2_1000, (f.len() - 20) as u32, 0, 0);
        r.offer(TXQ, 11);
        assert_eq!(port.recv(&mut buf).unwrap(), f.len());
        assert_eq!(&buf[..f.len()], &f[..]);
        assert_eq!(r.counters().tx_frames, 2);
    }

    #[test]
    fn legacy_header_is_widened() {
        let mut r = Rig::new(0);
        let port = VnicPort(r.backend.clone());
        let mut f = vec![1u8, 2, 3, 4, 5, 6, 7, 8, 9, 10];
        f.extend([0xEE; 60]);
        r.mem
            .memory()
            .write_slice(&f, GuestAddress(0x8000))
            .unwrap();
        r.desc(TXQ, 0, 0x8000, f.len() as u32, 0, 0);
        r.offer(TXQ, 0);
        let mut buf = vec![0u8; 4096];
        assert_eq!(port.recv(&mut buf).unwrap(), 72);
        assert_eq!(&buf[..12], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 0]);
        assert_eq!(&buf[12..72], &[0xEE; 60]);
    }

    #[test]
    fn frames_for_the_guest_fill_its_buffers() {
        let mut r = Rig::new(feature::VERSION_1 | feature::MRG_RXBUF);
        let port = VnicPort(r.backend.clone());
        let mut pkt = vec![0u8; HDR_LEN];
        pkt.extend((0..100u8).map(|b| b.wrapping_mul(3)));
        // Nothing posted: dropped and counted.
        assert!(port.send(&pkt).is_err());
        assert_eq!(r.counters().rx_no_buffers, 1);
        // Two small chains: with MRG_RXBUF the frame spans both, and
        // num_buffers says so.
        r.desc(RXQ, 0, 0x9000, 64, WRITE, 0);
        r.desc(RXQ, 1, 0x2_2000, 64, WRITE, 0);
        r.offer(RXQ, 0);
        r.offer(RXQ, 1);
        assert_eq!(port.send(&pkt).unwrap(), pkt.len());
        let mut got = [0u8; 112];
        r.mem
            .memory()
            .read_slice(&mut got[..64], GuestAddress(0x9000))
            .unwrap();
        r.mem
            .memory()
            .read_slice(&mut got[64..], GuestAddress(0x2_2000))
            .unwrap();
        assert_eq!(&got[10..12], &2u16.to_le_bytes(), "num_buffers");
        assert_eq!(&got[12..], &pkt[12..]);
        assert_eq!(r.used(RXQ, 0), (0, 64));
        assert_eq!(r.used(RXQ, 1), (1, 48));

        // A buffer outside guest memory is refused and returned; a
        // read-only one in the receive queue too.
        r.desc(RXQ, 2, 0x7_0000, 256, WRITE, 0);
        r.desc(RXQ, 3, 0x9000, 256, 0, 0);
        r.desc(RXQ, 4, 0x9000, 256, WRITE, 0);
        for h in [2, 3, 4] {
            r.offer(RXQ, h);
        }
        assert!(port.send(&pkt).is_err(), "the write to 0x70000 fails");
        assert!(port.send(&pkt).is_ok(), "the read-only chain is skipped");
        let c = r.counters();
        assert_eq!((c.rx_bad_chains, c.rx_frames), (2, 2));
    }

    #[test]
    fn too_small_buffers_without_mergeable_rx_are_kept_for_later() {
        let mut r = Rig::new(feature::VERSION_1);
        let port = VnicPort(r.backend.clone());
        let mut pkt = vec![0u8; HDR_LEN];
        pkt.extend([7u8; 200]);
        r.desc(RXQ, 0, 0x9000, 64, WRITE, 0);
        r.offer(RXQ, 0);
        assert!(port.send(&pkt).is_err());
        assert_eq!(r.counters().rx_too_big, 1);
        assert_eq!(r.used_idx(RXQ), 0, "the chain was put back, not used");
        // A small frame then uses it.
        assert!(port.send(&pkt[..HDR_LEN + 40]).is_ok());
        assert_eq!(r.used(RXQ, 0), (0, 52));
    }

    #[test]
    fn config_space_is_exact() {
        let r = Rig::new(feature::VERSION_1);
        let c = r.backend.get_config(0, 12);
        assert_eq!(&c[..6], &[0x52, 0x54, 0, 0, 0, 1]);
        assert_eq!(&c[8..10], &1u16.to_le_bytes(), "max_virtqueue_pairs");
        assert_eq!(&c[10..12], &2044u16.to_le_bytes(), "mtu");
        // Any window, exactly as long as asked, zero past the end.
        assert_eq!(
            r.backend.get_config(10, 8),
            vec![0xfc, 0x07, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(r.backend.get_config(u32::MAX, 4), vec![0; 4]);
    }

    #[test]
    fn specs_parse() {
        let s = VhostSpec::parse("ib0=/run/vm1.sock,mac=52:54:00:00:00:09,ip=10.0.0.9").unwrap();
        assert_eq!(s.interface, "ib0");
        assert_eq!(s.socket, PathBuf::from("/run/vm1.sock"));
        assert_eq!(s.mac, Some(Mac([0x52, 0x54, 0, 0, 0, 9])));
        assert_eq!(s.addresses, ["10.0.0.9".parse::<IpAddr>().unwrap()]);
        for bad in [
            "ib0",
            "=/x",
            "ib0=",
            "ib0=/x,mac=01:00:5e:00:00:01",
            "ib0=/x,mac=zz",
            "ib0=/x,ip=nope",
            "ib0=/x,colour=red",
        ] {
            assert!(VhostSpec::parse(bad).is_err(), "{bad}");
        }
        let gid = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 2, 0xc9, 3, 0, 0, 0, 1];
        let m = s.default_mac(&gid);
        assert_eq!(m, s.default_mac(&gid), "stable");
        assert_eq!(m.0[0] & 3, 2, "locally administered unicast");
    }
}
