//! A userspace TCP/IP stack per shard (smoltcp over [`MbufDevice`]), and the dispatch of
//! packets from the queue that received them to the shard that owns them.
//!
//! **Ownership of packets.** Every shard runs its own stack with the node's one MAC and
//! IPv4 address. A TCP packet belongs to the shard whose listening port (`base_port +
//! shard`) or outbound source-port range is its destination port ([`Router`]); ARP goes
//! to every shard (each keeps its own neighbour cache); anything else to shard 0. Where
//! the NIC steers (flow rules, see `Port::steer_tcp_dst`), packets arrive on the owner's
//! own receive queue; where it cannot (veth with af_xdp or af_packet: one queue, no
//! rules; or a hash that knows nothing of shards), the shard that polled the packet hands
//! it to the owner's inbox ([`Fabric`]), a bounded lock-free queue, and wakes the owner if
//! it sleeps. Both paths run the same code: a packet already on its owner's queue is
//! simply not forwarded.
//!
//! **Transmission.** A shard with its own transmit queue sends its packets itself; where
//! the port has fewer transmit queues than shards, the others pass their packets to
//! shard 0's transmit inbox.
//!
//! **Sockets.** [`UserStream`] is a TCP connection of the stack with `Read + Write`
//! (non-blocking: `WouldBlock` when there is nothing to read or no room to write), so
//! the project's framed connection and rustls run over it unchanged. A stream and its
//! stack belong to one thread (`Rc`): the shard's.
//!
//! Invariant: nothing here waits, and nothing grows without bound: inboxes are bounded
//! (a full inbox drops the packet, counted; TCP resends it), socket buffers are fixed.

use crate::device::MbufDevice;
use crate::mbuf::{Mbuf, Mempool};
use crate::port::{RxQueue, TxQueue};
use crossbeam_queue::ArrayQueue;
use smoltcp::iface::{Config, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration as SmolDuration, Instant as SmolInstant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, IpEndpoint, Ipv4Address};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::ops::Range;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// Packets one shard's inbox holds; beyond, dispatched packets are dropped (counted).
pub const INBOX_PACKETS: usize = 8192;
/// Listening sockets kept per port (connections being set up at once).
pub const BACKLOG: usize = 8;
/// A closed socket is removed once its close completes, or after this long.
/// Keep-alive probes on idle connections, and the silence after which one is aborted.
const KEEPALIVE_SECS: u64 = 3;
const TIMEOUT_SECS: u64 = 8;
const CLOSE_LINGER: std::time::Duration = std::time::Duration::from_secs(10);

/// How a shard's stack is set up.
#[derive(Clone, Debug)]
pub struct StackConfig {
    pub mac: [u8; 6],
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    /// Socket receive and transmit buffer sizes (the receive buffer sets the window).
    pub rx_buffer: usize,
    pub tx_buffer: usize,
    /// Source ports of this shard's outbound connections.
    pub local_ports: Range<u16>,
    /// Seeds the stack's initial sequence numbers.
    pub seed: u64,
}

/// Counters of one shard's network path.
#[derive(Debug, Default)]
pub struct NetCounters {
    pub rx_packets: AtomicU64,
    pub tx_packets: AtomicU64,
    /// Packets this shard received for another shard and handed over.
    pub forwarded: AtomicU64,
    /// Packets dropped: an inbox or transmit ring full, or no buffer to copy into.
    pub dropped: AtomicU64,
    /// Received packets in more than one segment (refused: the MTU fits one buffer).
    pub multi_segment: AtomicU64,
}

/// Where a packet goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    Shard(u16),
    All,
}

/// Maps a received frame to the shard that owns it. See the module docs.
#[derive(Debug, Clone)]
pub struct Router {
    shards: u16,
    ports: HashMap<u16, u16>,
    ranges: Vec<(Range<u16>, u16)>,
}

impl Router {
    pub fn new(shards: u16) -> Router {
        Router {
            shards: shards.max(1),
            ports: HashMap::new(),
            ranges: Vec::new(),
        }
    }

    /// TCP packets to `port` belong to `shard`.
    pub fn port(mut self, port: u16, shard: u16) -> Router {
        self.ports.insert(port, shard);
        self
    }

    /// TCP packets to a port in `range` belong to `shard` (its outbound source ports).
    pub fn range(mut self, range: Range<u16>, shard: u16) -> Router {
        self.ranges.push((range, shard));
        self
    }

    pub fn shards(&self) -> u16 {
        self.shards
    }

    /// The owner of an Ethernet frame.
    pub fn route(&self, frame: &[u8]) -> Dest {
        const ETH: usize = 14;
        if frame.len() < ETH {
            return Dest::Shard(0);
        }
        match u16::from_be_bytes([frame[12], frame[13]]) {
            0x0806 => Dest::All,
            0x0800 => {
                let ip = &frame[ETH..];
                if ip.len() < 20 || ip[9] != 6 {
                    return Dest::Shard(0);
                }
                let ihl = usize::from(ip[0] & 0x0f) * 4;
                // A fragment other than the first has no TCP header.
                let frag_off = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
                if ihl < 20 || ip.len() < ihl + 4 || frag_off != 0 {
                    return Dest::Shard(0);
                }
                let dport = u16::from_be_bytes([ip[ihl + 2], ip[ihl + 3]]);
                if let Some(s) = self.ports.get(&dport) {
                    return Dest::Shard(*s);
                }
                for (r, s) in &self.ranges {
                    if r.contains(&dport) {
                        return Dest::Shard(*s);
                    }
                }
                Dest::Shard(0)
            }
            _ => Dest::Shard(0),
        }
    }
}

/// What the shards of a node share: inboxes, wake-ups, the router, counters.
pub struct Fabric {
    router: Router,
    pool: Arc<Mempool>,
    inboxes: Vec<ArrayQueue<Mbuf>>,
    /// Packets for shard 0 to transmit for shards without a transmit queue.
    tx_inbox: ArrayQueue<Mbuf>,
    parked: Vec<AtomicBool>,
    wakers: OnceLock<Vec<Box<dyn Fn() + Send + Sync>>>,
    pub counters: Vec<NetCounters>,
}

impl Fabric {
    pub fn new(router: Router, pool: Arc<Mempool>) -> Arc<Fabric> {
        let n = router.shards() as usize;
        Arc::new(Fabric {
            router,
            pool,
            inboxes: (0..n).map(|_| ArrayQueue::new(INBOX_PACKETS)).collect(),
            tx_inbox: ArrayQueue::new(INBOX_PACKETS),
            parked: (0..n).map(|_| AtomicBool::new(false)).collect(),
            wakers: OnceLock::new(),
            counters: (0..n).map(|_| NetCounters::default()).collect(),
        })
    }

    /// How to wake each shard from its sleep (set once, before packets flow).
    pub fn set_wakers(&self, wakers: Vec<Box<dyn Fn() + Send + Sync>>) {
        let _ = self.wakers.set(wakers);
    }

    pub fn pool(&self) -> &Arc<Mempool> {
        &self.pool
    }

    fn wake(&self, shard: usize) {
        // Pairs with the fence in `set_parked`: either the sleeper sees the packet just
        // queued, or this sees it parked (a store-then-load on each side needs SeqCst).
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.parked[shard].load(Ordering::SeqCst) {
            if let Some(w) = self.wakers.get().and_then(|w| w.get(shard)) {
                w();
            }
        }
    }

    fn hand_over(&self, from: usize, to: usize, m: Mbuf) {
        if self.inboxes[to].push(m).is_err() {
            self.counters[from].dropped.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counters[from]
                .forwarded
                .fetch_add(1, Ordering::Relaxed);
            self.wake(to);
        }
    }
}

/// One shard's side of the network: its queues (if it has any), its stack, its inbox.
/// Lives on the shard's thread. See the module docs.
pub struct ShardNet {
    shard: usize,
    fabric: Arc<Fabric>,
    rx: Option<RxQueue>,
    tx: Option<TxQueue>,
    stack: UserStack,
    burst: Vec<Mbuf>,
    /// Packets waiting for room in the transmit ring.
    tx_wait: VecDeque<Mbuf>,
}

impl ShardNet {
    pub fn new(
        shard: u16,
        fabric: Arc<Fabric>,
        rx: Option<RxQueue>,
        tx: Option<TxQueue>,
        cfg: StackConfig,
    ) -> ShardNet {
        let stack = UserStack::new(cfg, fabric.pool.clone());
        ShardNet {
            shard: shard as usize,
            fabric,
            rx,
            tx,
            stack,
            burst: Vec::new(),
            tx_wait: VecDeque::new(),
        }
    }

    /// This shard's packet counters.
    pub fn counters(&self) -> &NetCounters {
        &self.fabric.counters[self.shard]
    }

    pub fn stack(&self) -> &UserStack {
        &self.stack
    }

    /// One turn of the network path: receive a burst from this shard's queue and
    /// dispatch it, take what other shards handed over, run the stack, transmit.
    /// Returns whether anything moved (a packet in or out, a socket changed).
    pub fn turn(&mut self) -> bool {
        let me = self.shard;
        let c = &self.fabric.counters[me];
        let mut moved = false;
        if let Some(rx) = &mut self.rx {
            self.burst.clear();
            let n = rx.burst(&mut self.burst);
            if n > 0 {
                moved = true;
                c.rx_packets.fetch_add(n as u64, Ordering::Relaxed);
            }
            for m in self.burst.drain(..) {
                if m.segments() != 1 {
                    c.multi_segment.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                match self.fabric.router.route(m.data()) {
                    Dest::Shard(s) if s as usize == me => self.stack.deliver(m),
                    Dest::Shard(s) if (s as usize) < self.fabric.inboxes.len() => {
                        self.fabric.hand_over(me, s as usize, m)
                    }
                    Dest::Shard(_) => self.stack.deliver(m),
                    Dest::All => {
                        for s in 0..self.fabric.inboxes.len() {
                            if s == me {
                                continue;
                            }
                            match self.fabric.pool.copy_of(m.data()) {
                                Some(copy) => self.fabric.hand_over(me, s, copy),
                                None => {
                                    c.dropped.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        self.stack.deliver(m);
                    }
                }
            }
        }
        while let Some(m) = self.fabric.inboxes[me].pop() {
            moved = true;
            self.stack.deliver(m);
        }
        moved |= self.stack.poll();
        moved |= self.transmit();
        moved
    }

    /// Run the stack's egress (after the shard wrote to its streams) and transmit.
    pub fn flush(&mut self) -> bool {
        let changed = self.stack.poll();
        self.transmit() || changed
    }

    fn transmit(&mut self) -> bool {
        let me = self.shard;
        let c = &self.fabric.counters[me];
        let mut out = self.stack.take_tx();
        let made = out.len();
        match &mut self.tx {
            Some(tx) => {
                // Packets other shards passed to the transmit-queue owner go first.
                if me == 0 {
                    while let Some(m) = self.fabric.tx_inbox.pop() {
                        self.tx_wait.push_back(m);
                    }
                }
                self.tx_wait.append(&mut out);
                let before = self.tx_wait.len();
                let sent = tx.burst(&mut self.tx_wait);
                c.tx_packets.fetch_add(sent as u64, Ordering::Relaxed);
                // A ring that stays full: drop the oldest beyond a bound (TCP resends).
                while self.tx_wait.len() > INBOX_PACKETS {
                    self.tx_wait.pop_front();
                    c.dropped.fetch_add(1, Ordering::Relaxed);
                }
                made > 0 || before > 0
            }
            None => {
                for m in out.drain(..) {
                    if self.fabric.tx_inbox.push(m).is_err() {
                        c.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if made > 0 {
                    c.tx_packets.fetch_add(made as u64, Ordering::Relaxed);
                    self.fabric.wake(0);
                }
                made > 0
            }
        }
    }

    /// Work is waiting that a sleep would delay: packets in the inbox or ring, or (shard
    /// 0) packets to transmit for others.
    pub fn pending(&self) -> bool {
        !self.fabric.inboxes[self.shard].is_empty()
            || !self.tx_wait.is_empty()
            || (self.shard == 0 && self.tx.is_some() && !self.fabric.tx_inbox.is_empty())
    }

    /// Say this shard is about to sleep (it must then check [`ShardNet::pending`] once
    /// more before sleeping), or has woken.
    pub fn set_parked(&self, parked: bool) {
        self.fabric.parked[self.shard].store(parked, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
    }

    /// Whether this shard polls a receive queue itself (then it must not sleep long:
    /// nothing wakes it when packets arrive).
    pub fn polls_queue(&self) -> bool {
        self.rx.is_some()
    }

    /// How long until the stack has timers to run (retransmits, delayed ACKs).
    pub fn poll_delay(&self) -> Option<std::time::Duration> {
        self.stack.poll_delay()
    }
}

struct Inner {
    iface: Interface,
    dev: MbufDevice,
    sockets: SocketSet<'static>,
    /// Listening sockets: (port, socket).
    listeners: Vec<(u16, SocketHandle)>,
    accepted: VecDeque<SocketHandle>,
    closing: Vec<(SocketHandle, std::time::Instant)>,
    ports_in_use: HashSet<u16>,
    next_port: u16,
    cfg: StackConfig,
    epoch: std::time::Instant,
}

impl Inner {
    fn now(&self) -> SmolInstant {
        SmolInstant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    fn new_socket(&mut self) -> SocketHandle {
        let rx = tcp::SocketBuffer::new(vec![0u8; self.cfg.rx_buffer]);
        let tx = tcp::SocketBuffer::new(vec![0u8; self.cfg.tx_buffer]);
        let mut s = tcp::Socket::new(rx, tx);
        s.set_nagle_enabled(false);
        // Without congestion control smoltcp sends a whole window at once; a burst
        // larger than the path's queues (a veth's backlog, a switch port) is dropped and
        // recovered only by timeouts. CUBIC, as the kernel's TCP.
        s.set_congestion_control(tcp::CongestionControl::Cubic);
        // ACK at once: request/response traffic (a small request, then a wait) would
        // otherwise hold each ACK for smoltcp's 10 ms, stalling a peer that waits for it.
        s.set_ack_delay(None);
        // A peer whose host died sends no reset: probe idle connections and give up on
        // one silent for TIMEOUT (as hivefs_net::tcp does for kernel sockets).
        s.set_keep_alive(Some(SmolDuration::from_secs(KEEPALIVE_SECS)));
        s.set_timeout(Some(SmolDuration::from_secs(TIMEOUT_SECS)));
        self.sockets.add(s)
    }

    fn listen_on(&mut self, port: u16) -> io::Result<SocketHandle> {
        let h = self.new_socket();
        self.sockets
            .get_mut::<tcp::Socket>(h)
            .listen(port)
            .map_err(|e| io::Error::other(format!("listen on {port}: {e}")))?;
        self.listeners.push((port, h));
        Ok(h)
    }
}

/// A shard's TCP/IP stack. See the module docs.
#[derive(Clone)]
pub struct UserStack {
    inner: Rc<RefCell<Inner>>,
}

impl UserStack {
    pub fn new(cfg: StackConfig, pool: Arc<Mempool>) -> UserStack {
        let mut dev = MbufDevice::new(pool);
        let mut icfg = Config::new(HardwareAddress::Ethernet(EthernetAddress(cfg.mac)));
        icfg.random_seed = cfg.seed;
        let epoch = std::time::Instant::now();
        let mut iface = Interface::new(icfg, &mut dev, SmolInstant::from_micros(0));
        let a = cfg.addr.octets();
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(
                IpAddress::v4(a[0], a[1], a[2], a[3]),
                cfg.prefix_len,
            ));
        });
        if let Some(g) = cfg.gateway {
            let g = g.octets();
            let _ = iface
                .routes_mut()
                .add_default_ipv4_route(Ipv4Address::new(g[0], g[1], g[2], g[3]));
        }
        let next_port = cfg.local_ports.start;
        UserStack {
            inner: Rc::new(RefCell::new(Inner {
                iface,
                dev,
                sockets: SocketSet::new(Vec::new()),
                listeners: Vec::new(),
                accepted: VecDeque::new(),
                closing: Vec::new(),
                ports_in_use: HashSet::new(),
                next_port,
                cfg,
                epoch,
            })),
        }
    }

    /// Accept connections on `port` ([`BACKLOG`] at a time being set up).
    pub fn listen(&self, port: u16) -> io::Result<()> {
        let mut g = self.inner.borrow_mut();
        for _ in 0..BACKLOG {
            g.listen_on(port)?;
        }
        Ok(())
    }

    /// A received packet for this stack.
    pub fn deliver(&self, m: Mbuf) {
        self.inner.borrow_mut().dev.rx.push_back(m);
    }

    /// Process received packets and timers, and produce packets to send. Returns
    /// whether a socket may have changed (readable, writable, connected, closed).
    pub fn poll(&self) -> bool {
        let mut g = self.inner.borrow_mut();
        let inner = &mut *g;
        let now = inner.now();
        let changed = inner.iface.poll(now, &mut inner.dev, &mut inner.sockets)
            == PollResult::SocketStateChanged;
        if changed {
            // A listening socket whose handshake completed is a connection: hand it out
            // and put a fresh listener in its place. One still in `SynReceived` stays: a
            // reset sends it back to `Listen` (RFC 793), and a stream handed out then would
            // pick up the next, unrelated connection.
            let mut i = 0;
            while i < inner.listeners.len() {
                let (port, h) = inner.listeners[i];
                let state = inner.sockets.get::<tcp::Socket>(h).state();
                if !matches!(state, tcp::State::Listen | tcp::State::SynReceived) {
                    inner.listeners.swap_remove(i);
                    inner.accepted.push_back(h);
                    if let Err(e) = inner.listen_on(port) {
                        tracing::warn!("{e}");
                    }
                } else {
                    i += 1;
                }
            }
        }
        // Closed sockets are removed once their close is done (or has taken too long).
        if !inner.closing.is_empty() {
            let mut keep = Vec::with_capacity(inner.closing.len());
            for (h, since) in std::mem::take(&mut inner.closing) {
                let s = inner.sockets.get_mut::<tcp::Socket>(h);
                let done = matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait);
                if done || since.elapsed() > CLOSE_LINGER {
                    s.abort();
                    let port = s.local_endpoint().map(|e| e.port);
                    inner.sockets.remove(h);
                    if let Some(p) = port {
                        inner.ports_in_use.remove(&p);
                    }
                } else {
                    keep.push((h, since));
                }
            }
            inner.closing = keep;
        }
        changed
    }

    fn take_tx(&self) -> VecDeque<Mbuf> {
        std::mem::take(&mut self.inner.borrow_mut().dev.tx)
    }

    /// A connection accepted on a listening port, with its peer's address.
    pub fn accept(&self) -> Option<(UserStream, SocketAddr)> {
        let mut g = self.inner.borrow_mut();
        let h = g.accepted.pop_front()?;
        let s = g.sockets.get::<tcp::Socket>(h);
        let peer = s
            .remote_endpoint()
            .map(endpoint_addr)
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        drop(g);
        Some((
            UserStream {
                inner: self.inner.clone(),
                handle: h,
            },
            peer,
        ))
    }

    /// Open a connection to `remote` from a free port of this shard's range. The stream
    /// is writable once connected (writes before that get `WouldBlock`).
    pub fn connect(&self, remote: SocketAddrV4) -> io::Result<UserStream> {
        let mut g = self.inner.borrow_mut();
        let range = g.cfg.local_ports.clone();
        let span = range.len() as u32;
        let mut port = None;
        for _ in 0..span {
            let p = g.next_port;
            g.next_port = if p + 1 >= range.end {
                range.start
            } else {
                p + 1
            };
            if !g.ports_in_use.contains(&p) {
                port = Some(p);
                break;
            }
        }
        let port =
            port.ok_or_else(|| io::Error::new(io::ErrorKind::AddrInUse, "no free source port"))?;
        let h = g.new_socket();
        let inner = &mut *g;
        let o = remote.ip().octets();
        let r = IpEndpoint::new(IpAddress::v4(o[0], o[1], o[2], o[3]), remote.port());
        if let Err(e) =
            inner
                .sockets
                .get_mut::<tcp::Socket>(h)
                .connect(inner.iface.context(), r, port)
        {
            inner.sockets.remove(h);
            return Err(io::Error::other(format!("connect to {remote}: {e}")));
        }
        inner.ports_in_use.insert(port);
        drop(g);
        Ok(UserStream {
            inner: self.inner.clone(),
            handle: h,
        })
    }

    /// How long until the stack has timers due.
    pub fn poll_delay(&self) -> Option<std::time::Duration> {
        let mut g = self.inner.borrow_mut();
        let inner = &mut *g;
        let now = inner.now();
        inner
            .iface
            .poll_delay(now, &inner.sockets)
            .map(|d| std::time::Duration::from_micros(d.total_micros()))
    }

    /// Open sockets (connections, listeners, closing ones).
    pub fn sockets(&self) -> usize {
        self.inner.borrow().sockets.iter().count()
    }
}

fn endpoint_addr(e: IpEndpoint) -> SocketAddr {
    match e.addr {
        IpAddress::Ipv4(a) => SocketAddr::V4(SocketAddrV4::new(a, e.port)),
    }
}

/// One TCP connection of a [`UserStack`]: non-blocking `Read + Write`. Dropping it closes
/// the connection (FIN) and frees the socket once the close completes.
pub struct UserStream {
    inner: Rc<RefCell<Inner>>,
    handle: SocketHandle,
}

impl UserStream {
    fn with<R>(&self, f: impl FnOnce(&mut tcp::Socket<'static>) -> R) -> R {
        let mut g = self.inner.borrow_mut();
        f(g.sockets.get_mut::<tcp::Socket>(self.handle))
    }

    /// Data (or the end of the stream) is waiting to be read.
    pub fn readable(&self) -> bool {
        self.with(|s| {
            s.can_recv()
                || (!s.may_recv()
                    && !matches!(
                        s.state(),
                        tcp::State::SynSent | tcp::State::SynReceived | tcp::State::Listen
                    ))
        })
    }

    /// Room to write.
    pub fn writable(&self) -> bool {
        self.with(|s| s.can_send())
    }

    /// Whether the owner of this stream has something to do now: read (data or the end),
    /// or write when it has output waiting (`wants_write`). What a poll's readiness says
    /// of a kernel socket.
    pub fn ready(&self, wants_write: bool) -> bool {
        self.readable() || (wants_write && self.writable())
    }

    /// Still connecting.
    pub fn connecting(&self) -> bool {
        self.with(|s| matches!(s.state(), tcp::State::SynSent | tcp::State::SynReceived))
    }

    /// The connection is (or was) up: not connecting, and not refused or reset.
    pub fn established(&self) -> bool {
        self.with(|s| s.may_send() || s.may_recv())
    }

    /// Bytes written but not yet acknowledged by the peer.
    pub fn unacked(&self) -> usize {
        self.with(|s| s.send_queue())
    }

    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.with(|s| s.remote_endpoint().map(endpoint_addr))
    }

    pub fn local_port(&self) -> Option<u16> {
        self.with(|s| s.local_endpoint().map(|e| e.port))
    }
}

impl Read for UserStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.with(|s| {
            if s.can_recv() {
                return s
                    .recv_slice(buf)
                    .map_err(|e| io::Error::new(io::ErrorKind::ConnectionReset, e.to_string()));
            }
            match s.state() {
                tcp::State::SynSent | tcp::State::SynReceived => {
                    Err(io::ErrorKind::WouldBlock.into())
                }
                // Never for a stream handed out established; kept as a reset, not a wait.
                tcp::State::Listen => Err(io::ErrorKind::ConnectionReset.into()),
                _ if s.may_recv() => Err(io::ErrorKind::WouldBlock.into()),
                // The peer closed (FIN) or the connection is gone.
                _ => Ok(0),
            }
        })
    }
}

impl Write for UserStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.with(|s| {
            if !s.may_send() {
                return match s.state() {
                    tcp::State::SynSent | tcp::State::SynReceived => {
                        Err(io::ErrorKind::WouldBlock.into())
                    }
                    _ => Err(io::ErrorKind::BrokenPipe.into()),
                };
            }
            match s.send_slice(buf) {
                Ok(0) if !buf.is_empty() => Err(io::ErrorKind::WouldBlock.into()),
                Ok(n) => Ok(n),
                Err(e) => Err(io::Error::new(io::ErrorKind::BrokenPipe, e.to_string())),
            }
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for UserStream {
    fn drop(&mut self) {
        let mut g = self.inner.borrow_mut();
        g.sockets.get_mut::<tcp::Socket>(self.handle).close();
        g.closing.push((self.handle, std::time::Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp_frame(dport: u16) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20];
        f[12] = 0x08;
        f[13] = 0x00;
        f[14] = 0x45;
        f[14 + 9] = 6;
        f[14 + 20 + 2..14 + 20 + 4].copy_from_slice(&dport.to_be_bytes());
        f
    }

    #[test]
    fn router_sends_each_packet_to_its_owner() {
        let r = Router::new(3)
            .port(7400, 0)
            .port(7401, 1)
            .port(7402, 2)
            .range(41_024..42_048, 1);
        assert_eq!(r.route(&tcp_frame(7401)), Dest::Shard(1));
        assert_eq!(r.route(&tcp_frame(7402)), Dest::Shard(2));
        assert_eq!(r.route(&tcp_frame(41_500)), Dest::Shard(1));
        // Unknown ports, non-TCP and runts go to shard 0 (it answers with a reset).
        assert_eq!(r.route(&tcp_frame(9)), Dest::Shard(0));
        let mut udp = tcp_frame(7401);
        udp[14 + 9] = 17;
        assert_eq!(r.route(&udp), Dest::Shard(0));
        assert_eq!(r.route(&[0u8; 5]), Dest::Shard(0));
        // A later fragment carries no port: shard 0.
        let mut frag = tcp_frame(7401);
        frag[14 + 7] = 8;
        assert_eq!(r.route(&frag), Dest::Shard(0));
        // IP options move the TCP header.
        let mut opt = vec![0u8; 14 + 24 + 20];
        opt[12] = 0x08;
        opt[14] = 0x46;
        opt[14 + 9] = 6;
        opt[14 + 24 + 2..14 + 24 + 4].copy_from_slice(&7402u16.to_be_bytes());
        assert_eq!(r.route(&opt), Dest::Shard(2));
        let mut arp = tcp_frame(0);
        arp[12] = 0x08;
        arp[13] = 0x06;
        assert_eq!(r.route(&arp), Dest::All);
    }
}
