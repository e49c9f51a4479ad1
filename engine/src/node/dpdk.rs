//! The DPDK transport of a node (`hive run --net dpdk`, cargo feature `dpdk`).
//!
//! Setup ([`NodeNet::start`], on the main thread before the shards start): EAL with the
//! configured arguments, one packet pool, the port with one receive and one transmit
//! queue per shard where the device has them, flow rules steering each shard's
//! listening port and outbound source-port range to its own queue where the device takes
//! them, and the [`Fabric`] through which shards hand each other packets where it does
//! not (see `hivefs_dpdk::stack`). Every shard gets its queues (if any) and a stack
//! configuration; its stack is made on its own thread ([`NetPath::new`]).
//!
//! A shard's loop runs [`NetPath::turn`] every turn: receive and dispatch, run the
//! stack, hand out accepted connections, transmit. Its connections are `Stream::User`
//! and go through exactly the framed connection and TLS code kernel sockets do.
//!
//! Waiting: a shard that polls a queue keeps polling (no sleep) for the configured spin
//! (`[net] spin_us`, default 2 ms) after its last packet, then sleeps at most
//! [`IDLE_POLL`] at a time (nothing can wake it when a packet arrives: virtual devices
//! here have no receive interrupts); a shard without a
//! queue never spins: it sleeps until another shard hands it packets (its waker) or its
//! stack has a timer due.
//!
//! The metadata port: shard 0's stack also accepts connections to the node's metadata
//! port and relays their bytes (still TLS end to end) to the metadata service's kernel
//! listener on loopback. That is the control plane (mounts' namespace calls), not the
//! chunk path; it keeps the node one address for clients whatever the transport.
//!
//! The node's kernel listeners stay open too: its own tools (`hive status`, `gc`,
//! `fsck`) reach it over loopback, and other kernel interfaces keep working.

use crate::config::NodeConfig;
use anyhow::{bail, Context, Result};
use hivefs_dpdk::port::{Flow, PortStatsReader};
use hivefs_dpdk::stack::{Fabric, Router, ShardNet, StackConfig, UserStream};
use hivefs_dpdk::{Eal, Mempool, Port, PortConfig, RxQueue, TxQueue};
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest sleep of a shard that polls a queue.
pub(crate) const IDLE_POLL: Duration = Duration::from_millis(1);
/// Source ports of shard `s`'s outbound connections: `LOCAL_PORT_BASE + s * 1024` and
/// the 1023 after it (a power-of-two block, so one masked flow rule covers it).
const LOCAL_PORT_BASE: u16 = 32768;
const LOCAL_PORTS_PER_SHARD: u16 = 1024;
/// Packet buffers in the node's pool.
const POOL_BUFFERS: u32 = 32767;
/// Socket buffers per connection (the receive buffer sets the TCP window).
const SOCKET_BUFFER: usize = 512 << 10;
/// Bytes a metadata relay holds in each direction before it stops reading.
const RELAY_BUFFER: usize = 256 << 10;

/// The node's DPDK port, flow rules and fabric. Closed after the shards stop.
pub(crate) struct NodeNet {
    port: Option<Port>,
    flows: Vec<Flow>,
    eal: &'static Eal,
    fabric: Arc<Fabric>,
}

/// What one shard takes to its thread.
pub(crate) struct ShardPorts {
    shard: u16,
    fabric: Arc<Fabric>,
    rx: Option<RxQueue>,
    tx: Option<TxQueue>,
    stack: StackConfig,
    eal: &'static Eal,
    listen_port: u16,
    spin: Duration,
    /// Shard 0: the metadata port to relay, and where the service listens.
    meta: Option<(u16, SocketAddr)>,
    /// Shard 0: the port's own counters, for status.
    port_stats: Option<PortStatsReader>,
    driver: String,
}

fn local_ports(shard: u16) -> std::ops::Range<u16> {
    let start = LOCAL_PORT_BASE + shard * LOCAL_PORTS_PER_SHARD;
    start..start + LOCAL_PORTS_PER_SHARD
}

impl NodeNet {
    /// Start EAL and the port; one [`ShardPorts`] per shard (`ports[s]` is shard `s`'s
    /// listening port).
    pub(crate) fn start(cfg: &NodeConfig, ports: &[u16]) -> Result<(NodeNet, Vec<ShardPorts>)> {
        let net = &cfg.net;
        net.check()?;
        if cfg.base_port == 0 {
            bail!(
                "net mode dpdk needs a fixed base_port (the userspace stack serves the same ports)"
            );
        }
        let shards = ports.len() as u16;
        if shards > (u16::MAX - LOCAL_PORT_BASE) / LOCAL_PORTS_PER_SHARD {
            bail!("net mode dpdk: too many shards ({shards}) for the source-port ranges");
        }
        let (addr, prefix_len) = net.dpdk_ipv4()?;
        let gateway = net
            .dpdk_gateway
            .as_deref()
            .map(|g| g.parse())
            .transpose()
            .context("dpdk_gateway")?;
        let eal = Eal::init(&net.eal_args).map_err(|e| anyhow::anyhow!("DPDK: {e}"))?;
        let pool = Arc::new(
            Mempool::new("hive_pkts", POOL_BUFFERS, 256)
                .map_err(|e| anyhow::anyhow!("DPDK packet pool: {e}"))?,
        );
        let pc = PortConfig {
            rx_queues: shards,
            tx_queues: shards,
            ..PortConfig::default()
        };
        let port = Port::open(&net.dpdk_port, &pc, &pool)
            .map_err(|e| anyhow::anyhow!("DPDK port {}: {e}", net.dpdk_port))?;
        let meta_port = cfg.meta_port();
        let mut router = Router::new(shards).port(meta_port, 0);
        for (s, p) in ports.iter().enumerate() {
            router = router
                .port(*p, s as u16)
                .range(local_ports(s as u16), s as u16);
        }
        // Steering: with a queue per shard, ask the device to put each shard's packets
        // on its queue. All or nothing: a partial set would only move work around.
        let mut flows = Vec::new();
        let steer = port.rx_queue_count() >= shards && shards > 1;
        if steer {
            let mut rules: Vec<(u16, u16, u16)> = vec![(meta_port, 0xffff, 0)];
            for (s, p) in ports.iter().enumerate() {
                rules.push((*p, 0xffff, s as u16));
                rules.push((
                    local_ports(s as u16).start,
                    !(LOCAL_PORTS_PER_SHARD - 1),
                    s as u16,
                ));
            }
            for (dport, mask, q) in rules {
                match port.steer_tcp_dst(dport, mask, q) {
                    Ok(f) => flows.push(f),
                    Err(e) => {
                        tracing::info!("DPDK: {e}; dispatching packets to shards in software");
                        flows.clear();
                        break;
                    }
                }
            }
        }
        tracing::info!(
            port = %net.dpdk_port,
            driver = port.driver(),
            rx_queues = port.rx_queue_count(),
            tx_queues = port.tx_queue_count(),
            rss = port.rss(),
            flow_rules = flows.len(),
            address = %net.dpdk_addr,
            "DPDK transport ready ({})",
            if !flows.is_empty() {
                "each shard's packets steered to its own queue"
            } else if port.rx_queue_count() > 1 {
                "queues by hash; packets on another shard's queue are handed over"
            } else {
                "one queue: shard 0 receives and hands packets to their shards"
            }
        );
        let fabric = Fabric::new(router, pool);
        let (rxq, txq) = port.queues();
        let mut rxq: Vec<Option<RxQueue>> = rxq.into_iter().map(Some).collect();
        let mut txq: Vec<Option<TxQueue>> = txq.into_iter().map(Some).collect();
        let meta_at: SocketAddr = format!("{}:{}", cfg.local_host(), meta_port)
            .parse()
            .context("metadata address for the relay")?;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let parts = (0..shards)
            .map(|s| ShardPorts {
                shard: s,
                fabric: fabric.clone(),
                rx: rxq.get_mut(s as usize).and_then(Option::take),
                tx: txq.get_mut(s as usize).and_then(Option::take),
                stack: StackConfig {
                    mac: port.mac(),
                    addr,
                    prefix_len,
                    gateway,
                    rx_buffer: SOCKET_BUFFER,
                    tx_buffer: SOCKET_BUFFER,
                    local_ports: local_ports(s),
                    seed: seed ^ (u64::from(s) << 48),
                },
                eal,
                listen_port: ports[s as usize],
                spin: net.spin(),
                meta: (s == 0).then_some((meta_port, meta_at)),
                port_stats: (s == 0).then(|| port.stats_reader()),
                driver: port.driver().to_string(),
            })
            .collect();
        Ok((
            NodeNet {
                port: Some(port),
                flows,
                eal,
                fabric,
            },
            parts,
        ))
    }

    /// How each shard is woken when another hands it packets.
    pub(crate) fn set_wakers(&self, wakers: &[Arc<mio::Waker>]) {
        self.fabric.set_wakers(
            wakers
                .iter()
                .map(|w| {
                    let w = w.clone();
                    Box::new(move || {
                        let _ = w.wake();
                    }) as Box<dyn Fn() + Send + Sync>
                })
                .collect(),
        );
    }

    /// Stop the port (every shard has stopped polling it).
    pub(crate) fn close(mut self) {
        self.flows.clear();
        for (shard, c) in self.fabric.counters.iter().enumerate() {
            let get =
                |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            tracing::info!(
                shard,
                rx = get(&c.rx_packets),
                tx = get(&c.tx_packets),
                handed_over = get(&c.forwarded),
                dropped = get(&c.dropped),
                multi_segment = get(&c.multi_segment),
                "DPDK shard packets"
            );
        }
        if let Some(p) = self.port.take() {
            let st = p.stats();
            tracing::info!(
                rx = st.rx_packets,
                tx = st.tx_packets,
                missed = st.rx_missed,
                no_mbuf = st.rx_no_mbuf,
                "DPDK port closed"
            );
            p.close();
        }
        self.eal.remove_runtime_dir();
    }
}

/// The poll token of metadata relays' kernel sockets (their readiness only wakes the
/// loop; every turn pumps every relay).
pub(crate) const RELAY: mio::Token = mio::Token(usize::MAX - 1);

/// One shard's network path, on its thread. See the module docs.
pub(crate) struct NetPath {
    net: ShardNet,
    registry: mio::Registry,
    meta: Option<(u16, SocketAddr)>,
    relays: Vec<Relay>,
    last_packet: Instant,
    spin: Duration,
    port_stats: Option<PortStatsReader>,
    driver: String,
}

impl NetPath {
    pub(crate) fn new(p: ShardPorts, registry: mio::Registry) -> Result<NetPath> {
        if let Err(e) = p.eal.register_thread() {
            tracing::warn!(
                shard = p.shard,
                "DPDK: thread not registered ({e}); no buffer cache"
            );
        }
        let net = ShardNet::new(p.shard, p.fabric, p.rx, p.tx, p.stack);
        net.stack()
            .listen(p.listen_port)
            .with_context(|| format!("userspace listen on {}", p.listen_port))?;
        if let Some((mp, _)) = p.meta {
            net.stack()
                .listen(mp)
                .with_context(|| format!("userspace listen on {mp}"))?;
        }
        tracing::info!(
            shard = p.shard,
            port = p.listen_port,
            own_queue = net.polls_queue(),
            "shard serving on the DPDK port"
        );
        Ok(NetPath {
            net,
            registry,
            meta: p.meta,
            relays: Vec::new(),
            last_packet: Instant::now(),
            spin: p.spin,
            port_stats: p.port_stats,
            driver: p.driver,
        })
    }

    /// Receive, run the stack, transmit; new connections on the shard's port go to
    /// `accepted`. Returns whether anything moved.
    pub(crate) fn turn(&mut self, accepted: &mut Vec<(UserStream, SocketAddr)>) -> bool {
        let mut moved = self.net.turn();
        while let Some((s, peer)) = self.net.stack().accept() {
            moved = true;
            match self.meta {
                Some((mp, at)) if s.local_port() == Some(mp) => {
                    match Relay::open(s, at, &self.registry) {
                        Ok(r) => self.relays.push(r),
                        Err(e) => tracing::warn!(%peer, "metadata relay to {at}: {e}"),
                    }
                }
                _ => accepted.push((s, peer)),
            }
        }
        if !self.relays.is_empty() {
            let mut pumped = false;
            self.relays.retain_mut(|r| match r.pump() {
                Ok(m) => {
                    pumped |= m;
                    true
                }
                Err(why) => {
                    tracing::debug!("metadata relay closed: {why}");
                    false
                }
            });
            if pumped {
                moved = true;
                self.net.flush();
            }
        }
        if moved {
            self.last_packet = Instant::now();
        }
        moved
    }

    /// What `hive status` shows of this shard's network path: its packet counters, and
    /// on shard 0 the port's.
    pub(crate) fn stats_json(&self) -> serde_json::Value {
        let c = self.net.counters();
        let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        let mut v = serde_json::json!({
            "transport": "dpdk",
            "driver": self.driver,
            "own_queue": self.net.polls_queue(),
            "sockets": self.net.stack().sockets(),
            "rx_packets": get(&c.rx_packets),
            "tx_packets": get(&c.tx_packets),
            "handed_over": get(&c.forwarded),
            "dropped": get(&c.dropped),
            "multi_segment": get(&c.multi_segment),
        });
        if let Some(r) = &self.port_stats {
            let p = r.read();
            v["port"] = serde_json::json!({
                "rx_packets": p.rx_packets,
                "tx_packets": p.tx_packets,
                "rx_bytes": p.rx_bytes,
                "tx_bytes": p.tx_bytes,
                "rx_missed": p.rx_missed,
                "rx_errors": p.rx_errors,
                "tx_errors": p.tx_errors,
                "rx_no_mbuf": p.rx_no_mbuf,
            });
        }
        v
    }

    /// The shard's userspace TCP stack (for its outbound connections).
    pub(crate) fn stack(&self) -> hivefs_dpdk::stack::UserStack {
        self.net.stack().clone()
    }

    /// Send what the shard wrote to its streams this turn.
    pub(crate) fn flush(&mut self) {
        if self.net.flush() {
            self.last_packet = Instant::now();
        }
    }

    /// The loop's sleep, bounded as the module docs say.
    pub(crate) fn bound_sleep(&self, base: Option<Duration>) -> Option<Duration> {
        // Only a shard that polls a queue spins: one without is woken when packets are
        // handed to it, and spinning would take the core from the one that polls.
        if self.net.pending() || self.spinning() {
            return Some(Duration::ZERO);
        }
        let mut t = base;
        let mut cap = |d: Duration| t = Some(t.map_or(d, |t| t.min(d)));
        if self.net.polls_queue() || !self.relays.is_empty() {
            cap(IDLE_POLL);
        }
        if let Some(d) = self.net.poll_delay() {
            cap(d);
        }
        t
    }

    /// Polling its queue without sleeping (a packet within the spin).
    pub(crate) fn spinning(&self) -> bool {
        self.net.polls_queue() && self.last_packet.elapsed() < self.spin
    }

    /// Around a sleep: announce it (then re-check for packets handed over meanwhile), and
    /// its end.
    pub(crate) fn park(&self) -> bool {
        self.net.set_parked(true);
        self.net.pending()
    }

    pub(crate) fn unpark(&self) {
        self.net.set_parked(false);
    }
}

/// A metadata connection relayed between the userspace stack and the metadata
/// service's kernel listener. Bounded buffers each way; either side's end ends it.
struct Relay {
    user: UserStream,
    kernel: mio::net::TcpStream,
    to_kernel: Vec<u8>,
    to_user: Vec<u8>,
    user_done: bool,
    kernel_done: bool,
}

impl Relay {
    fn open(user: UserStream, at: SocketAddr, registry: &mio::Registry) -> std::io::Result<Relay> {
        let kernel = std::net::TcpStream::connect_timeout(&at, Duration::from_secs(1))?;
        kernel.set_nonblocking(true)?;
        kernel.set_nodelay(true)?;
        let mut kernel = mio::net::TcpStream::from_std(kernel);
        // Its replies wake the shard (else they wait for the next poll of the queue).
        registry.register(&mut kernel, RELAY, mio::Interest::READABLE)?;
        Ok(Relay {
            user,
            kernel,
            to_kernel: Vec::new(),
            to_user: Vec::new(),
            user_done: false,
            kernel_done: false,
        })
    }

    /// Move what can move. `Ok(moved)`, or `Err` when the relay is over.
    fn pump(&mut self) -> Result<bool, String> {
        let mut moved = false;
        let mut buf = [0u8; 16 << 10];
        moved |= copy(
            &mut self.user,
            &mut self.to_kernel,
            &mut self.user_done,
            &mut buf,
        )?;
        moved |= copy(
            &mut self.kernel,
            &mut self.to_user,
            &mut self.kernel_done,
            &mut buf,
        )?;
        moved |= drain(&mut self.kernel, &mut self.to_kernel)?;
        moved |= drain(&mut self.user, &mut self.to_user)?;
        if self.user_done && self.to_kernel.is_empty() {
            let _ = self.kernel.shutdown(std::net::Shutdown::Write);
        }
        if self.kernel_done && self.to_user.is_empty() {
            return Err("metadata service closed".into());
        }
        if self.user_done && self.kernel_done {
            return Err("both sides closed".into());
        }
        Ok(moved)
    }
}

/// Read from `from` into `buf` while it holds less than [`RELAY_BUFFER`].
fn copy(
    from: &mut impl Read,
    to: &mut Vec<u8>,
    done: &mut bool,
    buf: &mut [u8],
) -> Result<bool, String> {
    let mut moved = false;
    while !*done && to.len() < RELAY_BUFFER {
        match from.read(buf) {
            Ok(0) => *done = true,
            Ok(n) => {
                to.extend_from_slice(&buf[..n]);
                moved = true;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(moved)
}

fn drain(to: &mut impl Write, from: &mut Vec<u8>) -> Result<bool, String> {
    let mut sent = 0;
    while sent < from.len() {
        match to.write(&from[sent..]) {
            Ok(0) => return Err("peer stopped taking bytes".into()),
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    from.drain(..sent);
    Ok(sent > 0)
}
