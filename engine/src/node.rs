//! The node runtime: one pinned thread per shard, each running its own event loop.
//!
//! Concurrency model. A shard thread owns outright its [`ShardCore`], its block device
//! (its own io_uring over the shared device file, on a disjoint region), its listening
//! socket (`base_port + shard`) and every connection accepted on it. Nothing on the data
//! path is shared or locked. The control plane (the main thread) talks to shards only
//! through the `stop` flag and each shard's [`mio::Waker`]; stats are read over the wire
//! like any other request.
//!
//! Each loop turn: poll sockets (waiting only when the shard is idle: parks, no busy
//! spin), read frames from connections within their credits, hand requests to the core,
//! drive the core (device completions, group commit), write replies. When device I/O is in
//! flight and no socket is ready, the thread blocks on the device instead.
//!
//! Flow control: a connection gets `credits` requests in flight (told in `HelloOk`); the
//! shard reads no further frames from it until replies free credits, and reads from no
//! connection while its commit queue is long. A slow shard therefore pushes back on TCP
//! instead of buffering without bound.
//!
//! Errors: a bad frame, an unknown opcode, a wrong version or a missing/bad token gets an
//! `Error` frame with its code, a log line naming the peer and request id, and that
//! connection is closed. Nothing else is affected.

use crate::config::NodeConfig;
use crate::format::Superblock;
use crate::hive_map::MapCell;
use crate::meta::server::{DeviceUse, MetaServer};
use crate::shard::{ChunkBytes, Completion, PutOutcome, ShardConfig, ShardCore, ShardError};
use crate::tokens::TokenRegistry;
use anyhow::{bail, Context, Result};
use hivefs_net::chunk::ChunkId;
use hivefs_net::conn::{FramedConn, ReadStatus};
use hivefs_net::frame::{Frame, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};
use hivefs_net::meta::TokenScope;
use hivefs_net::meta::{self, ShardAdmin, ShardAdminReply};
use hivefs_net::proto::{
    decode_put_in_place, decode_replicate_in_place, frame_response, get_reply_head_into,
    ClusterMap, ErrorCode, Opcode, PutResult, Request, Response,
};
use hivefs_nvme::{open_device, run_sync, AlignedBuf, IoOp, IoRequest, BLOCK_SIZE};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "dpdk")]
mod dpdk;
mod replication;

use crate::stream::Stream;

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const IO_DONE: Token = Token(2);
const FIRST_CONN: usize = 3;
/// Connections one shard accepts at most.
pub const MAX_CONNS_PER_SHARD: usize = 4096;
/// Stop reading requests while this many chunks wait for a commit batch.
const QUEUE_HIGH_WATER: usize = 8192;
/// Compaction steps only while fewer chunks than this wait for a commit batch.
const COMPACT_QUEUE_MAX: usize = 1024;
/// How often a shard re-checks the tokens of its connections (revocation, expiry).
const TOKEN_RECHECK: Duration = Duration::from_secs(1);
/// How long an idle shard parks before looking at its stop flag.
const PARK: Duration = Duration::from_millis(200);
/// How long a shard with replication jobs running sleeps at most (their deadlines).
const REPL_RECHECK: Duration = Duration::from_millis(10);
/// How long a shard with I/O in flight sleeps at most before looking at its device anyway.
const IO_RECHECK: Duration = Duration::from_millis(5);
/// Reply bytes a loop turn produces before it goes back to the sockets. Encrypting and
/// sending a reply costs far more than submitting a read, so a turn that answered every
/// completed get at once would leave the device idle while it worked: new requests wait
/// unread until the whole burst is out, and the queue depth collapses into bursts.
const REPLY_QUANTUM_BYTES: usize = 256 * 1024;

/// How often a shard spinning on a DPDK queue polls its kernel sockets.
const EPOLL_EVERY: Duration = Duration::from_micros(50);

/// Per-run settings of `hive run`.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Plain TCP without TLS (measurements only).
    pub insecure: bool,
    /// io_uring SQPOLL (a kernel thread polls the submission queue; burns a core).
    pub sqpoll: bool,
    /// io_uring IOPOLL (polled completions; refused by virtio disks, then falls back).
    pub iopoll: bool,
    /// The transport, replacing `[net]` of hive.toml (`hive run --net ...`).
    pub net: Option<crate::config::NetConfig>,
}

/// A running node: its shard threads and the handles to stop them.
pub struct Node {
    threads: Vec<std::thread::JoinHandle<Result<()>>>,
    wakers: Vec<Arc<Waker>>,
    stop: Arc<AtomicBool>,
    pub ports: Vec<u16>,
    meta: Option<MetaServer>,
    /// The metadata service's port.
    pub meta_port: u16,
    /// The repair thread (nodes of a TLS hive).
    repair: Option<std::thread::JoinHandle<()>>,
    /// The DPDK port (`--net dpdk`), closed after the shards stop.
    #[cfg(feature = "dpdk")]
    net: Option<dpdk::NodeNet>,
}

struct ShardSetup {
    shard: u16,
    core: ShardCore,
    listener: TcpListener,
    poll: Poll,
    tls: Option<Arc<rustls::ServerConfig>>,
    cfg: NodeConfig,
    map: ClusterMap,
    stop: Arc<AtomicBool>,
    device_desc: String,
    device_use: Arc<DeviceUse>,
    tokens: Arc<TokenRegistry>,
    /// The hive's placement map (published by the metadata service).
    hive_map: Arc<MapCell>,
    /// TLS with this node's certificate, for replication links to other nodes.
    peer_tls: Option<Arc<rustls::ClientConfig>>,
    /// This shard's DPDK queues and stack settings (`--net dpdk`).
    #[cfg(feature = "dpdk")]
    net: Option<dpdk::ShardPorts>,
}

impl Node {
    /// Open the device, replay every shard, bind every port and start the shard threads.
    /// Returns once all shards are serving.
    pub fn start(dir: &Path, insecure: bool) -> Result<Node> {
        Node::start_with(
            dir,
            RunOptions {
                insecure,
                ..Default::default()
            },
        )
    }

    /// [`Node::start`] with settings that override `hive.toml` for this run.
    pub fn start_with(dir: &Path, o: RunOptions) -> Result<Node> {
        let insecure = o.insecure;
        let mut cfg = NodeConfig::load(dir)?;
        cfg.sqpoll |= o.sqpoll;
        cfg.iopoll |= o.iopoll;
        if let Some(n) = o.net {
            cfg.net = n;
        }
        cfg.net.check()?;
        if cfg.net.mode == crate::config::NetMode::Dpdk && !cfg!(feature = "dpdk") {
            bail!("net mode dpdk: this hive binary was built without DPDK (cargo build --features hivefs-engine/dpdk)");
        }
        let key = cfg.dedupe_key()?;
        let (tls, peer_tls) = if insecure {
            tracing::warn!("--insecure: serving plain TCP without TLS (for measurements only)");
            (None, None)
        } else {
            // The node certificate is read again when it changes (`hive cert rotate`).
            let ca = crate::config::trust_bundle(dir)?;
            let identity = hivefs_net::tls::NodeIdentity::load(
                &dir.join("node.pem"),
                &dir.join("node.key"),
                &ca,
            )
            .map_err(|e| anyhow::anyhow!("node certificate: {e}"))?;
            (
                Some(
                    hivefs_net::tls::server_config_with(identity.clone(), &ca)
                        .map_err(|e| anyhow::anyhow!("{e}"))?,
                ),
                Some(
                    hivefs_net::tls::peer_client_config_with(identity, &ca)
                        .map_err(|e| anyhow::anyhow!("node TLS for replication: {e}"))?,
                ),
            )
        };
        // The superblock tells the layout; the config must agree with it.
        let mut dev0 = open_device(&cfg.device, None, cfg.uring_options())
            .with_context(|| format!("opening {}", cfg.device.display()))?;
        let c = run_sync(
            dev0.as_mut(),
            vec![IoRequest {
                tag: 0,
                op: IoOp::Read {
                    offset: 0,
                    buf: AlignedBuf::new(BLOCK_SIZE),
                },
            }],
        )?;
        let sb_buf = c
            .into_iter()
            .next()
            .and_then(|c| c.result.ok().and(c.buf))
            .context("reading the superblock")?;
        let sb = Superblock::decode(&sb_buf)
            .map_err(|e| anyhow::anyhow!("{}: not a hive device: {e}", cfg.device.display()))?;
        drop(dev0);
        if sb.shards != cfg.shards || sb.dedupe_key != key.0 || sb.bucket_count != cfg.bucket_count
        {
            bail!("hive.toml does not match the device superblock (shards {} vs {}, buckets {} vs {})", cfg.shards, sb.shards, cfg.bucket_count, sb.bucket_count);
        }
        let map = ClusterMap {
            epoch: 1,
            node_id: cfg.node_id.clone(),
            bucket_count: cfg.bucket_count,
            shard_count: cfg.shards,
            base_port: cfg.base_port,
            dedupe_key: key,
            bucket_to_shard: (0..cfg.bucket_count)
                .map(|b| (b % cfg.shards as u32) as u16)
                .collect(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let device_use = Arc::new(DeviceUse::new(cfg.shards as usize));
        let tokens = Arc::new(TokenRegistry::new(&cfg.admin_token_sha256));
        let hive_map = Arc::new(MapCell::new(cfg.bucket_count));
        let mut setups = Vec::new();
        let mut ports = Vec::new();
        for shard in 0..cfg.shards {
            let dev = open_device(&cfg.device, None, cfg.uring_options())?;
            let device_desc = dev.describe();
            let scfg = ShardConfig {
                commit_max_bytes: cfg.commit_max_bytes,
                use_summaries: true,
                ..ShardConfig::default()
            };
            let t0 = std::time::Instant::now();
            let core = ShardCore::open(dev, sb.shard_layout(shard), key, scfg)
                .with_context(|| format!("opening shard {shard}"))?;
            let st = core.stats();
            device_use
                .total_bytes
                .fetch_add(st.device_bytes_total, Ordering::Relaxed);
            device_use.used_bytes[shard as usize].store(st.device_bytes_used, Ordering::Relaxed);
            tracing::info!(shard, chunks = st.chunks, records = st.replayed_records, summaries = st.replayed_summaries, ms = t0.elapsed().as_millis() as u64, device = %device_desc, "shard replayed");
            let port = if cfg.base_port == 0 {
                0
            } else {
                cfg.base_port + shard
            };
            let addr: SocketAddr = format!("{}:{}", cfg.listen, port)
                .parse()
                .with_context(|| format!("bad listen address {}:{port}", cfg.listen))?;
            let mut listener = TcpListener::bind(addr)
                .with_context(|| format!("binding shard {shard} to {addr}"))?;
            ports.push(listener.local_addr()?.port());
            let poll = Poll::new()?;
            poll.registry()
                .register(&mut listener, LISTENER, Interest::READABLE)?;
            setups.push(ShardSetup {
                shard,
                core,
                listener,
                poll,
                tls: tls.clone(),
                cfg: cfg.clone(),
                map: map.clone(),
                stop: stop.clone(),
                device_desc,
                device_use: device_use.clone(),
                tokens: tokens.clone(),
                hive_map: hive_map.clone(),
                peer_tls: peer_tls.clone(),
                #[cfg(feature = "dpdk")]
                net: None,
            });
        }
        let mut threads = Vec::new();
        let mut wakers = Vec::new();
        for s in &setups {
            wakers.push(Arc::new(Waker::new(s.poll.registry(), WAKER)?));
        }
        #[cfg(feature = "dpdk")]
        let node_net = if cfg.net.mode == crate::config::NetMode::Dpdk {
            let (net, parts) = dpdk::NodeNet::start(&cfg, &ports)?;
            net.set_wakers(&wakers);
            for (s, p) in setups.iter_mut().zip(parts) {
                s.net = Some(p);
            }
            Some(net)
        } else {
            None
        };
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        for s in setups {
            let pin = s.cfg.pin_cores.then_some(s.shard as usize % cores);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("shard-{}", s.shard))
                    .spawn(move || {
                        if let Some(cpu) = pin {
                            pin_to_cpu(cpu);
                        }
                        ShardLoop::new(s)?.run()
                    })?,
            );
        }
        let mut node = Node {
            threads,
            wakers,
            stop,
            ports,
            meta: None,
            meta_port: 0,
            repair: None,
            #[cfg(feature = "dpdk")]
            net: node_net,
        };
        let ports = node.ports.clone();
        let map_cell = hive_map.clone();
        match MetaServer::start(dir, &cfg, tls, map, device_use, ports, tokens, hive_map) {
            Ok(m) => {
                node.meta_port = m.port;
                node.meta = Some(m);
                if let Some(tls) = peer_tls {
                    let ctx = crate::repair::RepairCtx {
                        dir: dir.to_path_buf(),
                        cfg: cfg.clone(),
                        map: map_cell,
                        tls,
                        shard_ports: node.ports.clone(),
                        stop: node.stop.clone(),
                    };
                    node.repair = Some(
                        std::thread::Builder::new()
                            .name("repair".into())
                            .spawn(move || crate::repair::run(ctx))?,
                    );
                }
                Ok(node)
            }
            Err(e) => {
                let _ = node.shutdown();
                Err(e.context("starting the metadata service"))
            }
        }
    }

    /// The metadata service (its store, for fsck and tests).
    pub fn meta(&self) -> Option<&MetaServer> {
        self.meta.as_ref()
    }

    /// Ask every shard to stop and wait for them (in-flight commits finish first).
    pub fn shutdown(mut self) -> Result<()> {
        if let Some(m) = self.meta.take() {
            if let Err(e) = m.shutdown() {
                tracing::warn!("stopping the metadata service: {e:#}");
            }
        }
        self.stop.store(true, Ordering::SeqCst);
        for w in &self.wakers {
            let _ = w.wake();
        }
        if let Some(r) = self.repair.take() {
            let _ = r.join();
        }
        let mut result = Ok(());
        for t in std::mem::take(&mut self.threads) {
            match t.join() {
                Ok(r) => {
                    if let Err(e) = r {
                        result = Err(e);
                    }
                }
                Err(_) => result = Err(anyhow::anyhow!("a shard thread panicked")),
            }
        }
        #[cfg(feature = "dpdk")]
        if let Some(n) = self.net.take() {
            n.close();
        }
        result
    }

    /// Block until a shard thread exits (a failure) or `stop` is set by a signal handler.
    pub fn wait(self, stop_requested: &AtomicBool) -> Result<()> {
        loop {
            if stop_requested.load(Ordering::SeqCst) {
                return self.shutdown();
            }
            if self.threads.iter().any(|t| t.is_finished()) {
                return self.shutdown();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::warn!(
                cpu,
                "could not pin shard thread: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

struct Conn {
    framed: FramedConn<Stream>,
    peer: SocketAddr,
    version: Option<u16>,
    /// The digest of the token it authenticated with, and what that token may do.
    auth: Option<([u8; 32], TokenScope)>,
    in_flight: u32,
    /// Close once the queued output is written (after an error reply).
    closing: bool,
    /// Frames may be waiting unread (a read stopped at the credit limit).
    maybe_more: bool,
    /// Reading was skipped for lack of credits or commit-queue room.
    stalled: bool,
    /// Another node of the hive (authenticated by its certificate): may send `Replicate`.
    from_node: bool,
}

enum Pending {
    Put {
        conn: usize,
        req: u64,
        n: usize,
    },
    Get {
        conn: usize,
        req: u64,
    },
    /// A GC sweep: answered when its tombstones are durable.
    Sweep {
        conn: usize,
        req: u64,
        spared: u64,
        bytes: u64,
    },
    /// The removal of copies a scrub found bad (`DropCopies`): answered when durable.
    ScrubDrop {
        conn: usize,
        req: u64,
        checked: u64,
        bytes: u64,
        bad: Vec<ChunkId>,
    },
    /// One read of a scrub (`scrubs` holds the scrub it belongs to).
    ScrubRead {
        scrub: u64,
        id: ChunkId,
    },
}

/// A scrub under way: its reads, and what they found.
struct Scrub {
    conn: usize,
    req: u64,
    left: usize,
    checked: u64,
    bytes: u64,
    bad: Vec<ChunkId>,
}

struct ShardLoop {
    s: ShardSetup,
    /// Reused buffer for encoding large reply frames.
    scratch: Vec<u8>,
    /// Device completions wake the poll (else the loop polls the device).
    io_fd: bool,
    conns: HashMap<usize, Conn>,
    next_conn: usize,
    tickets: HashMap<u64, Pending>,
    next_ticket: u64,
    frames: Vec<Frame>,
    completions: Vec<Completion>,
    /// Completions not yet answered (a turn answers at most [`REPLY_QUANTUM_BYTES`]).
    backlog: VecDeque<Completion>,
    dirty: HashSet<usize>,
    /// The token registry version last checked against, and when.
    tokens_seen: u64,
    tokens_checked: std::time::Instant,
    /// Replicated puts: jobs, links to other nodes, the placement map.
    repl: replication::ReplState,
    scrubs: HashMap<u64, Scrub>,
    /// The DPDK path (`--net dpdk`): this shard's queues and userspace stack.
    #[cfg(feature = "dpdk")]
    net: Option<dpdk::NetPath>,
}

impl ShardLoop {
    /// The shard's network path for status: kernel TCP, or the DPDK path's counters.
    fn net_stats(&self) -> serde_json::Value {
        #[cfg(feature = "dpdk")]
        if let Some(n) = &self.net {
            return n.stats_json();
        }
        serde_json::json!({ "transport": "kernel" })
    }

    fn new(mut s: ShardSetup) -> Result<ShardLoop> {
        // Completions wake the same poll as the sockets when the device can signal them.
        let io_fd = match s.core.completion_fd() {
            Some(fd) => match s.poll.registry().register(
                &mut mio::unix::SourceFd(&fd),
                IO_DONE,
                Interest::READABLE,
            ) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(
                        shard = s.shard,
                        "cannot wait on device completions ({e}); polling instead"
                    );
                    false
                }
            },
            None => false,
        };
        let registry = s
            .poll
            .registry()
            .try_clone()
            .expect("cloning the shard's poll registry");
        let links = crate::links::TcpLinks::new(
            registry,
            s.peer_tls.clone(),
            format!("{}/shard-{}", s.cfg.node_id, s.shard),
        );
        // DPDK: the shard's queues and stack, made on its own thread; replication links
        // to other nodes go over the stack too.
        #[cfg(feature = "dpdk")]
        let (net, links) = match s.net.take() {
            Some(p) => {
                let n = dpdk::NetPath::new(p, s.poll.registry().try_clone()?)?;
                let links = links.over_user_stack(n.stack());
                (Some(n), links)
            }
            None => (None, links),
        };
        let cfg = crate::replicate::ReplConfig {
            min_copies: s.cfg.min_copies.max(1) as usize,
            ..Default::default()
        };
        let repl =
            replication::ReplState::new(s.cfg.raft_id, cfg, Box::new(links), s.cfg.bucket_count);
        Ok(ShardLoop {
            repl,
            scrubs: HashMap::new(),
            io_fd,
            scratch: Vec::new(),
            s,
            conns: HashMap::new(),
            next_conn: FIRST_CONN,
            tickets: HashMap::new(),
            next_ticket: 1,
            frames: Vec::new(),
            completions: Vec::new(),
            backlog: VecDeque::new(),
            dirty: HashSet::new(),
            tokens_seen: 0,
            tokens_checked: std::time::Instant::now(),
            #[cfg(feature = "dpdk")]
            net,
        })
    }

    fn run(mut self) -> Result<()> {
        let mut events = Events::with_capacity(1024);
        let shard = self.s.shard;
        let mut turns = 0u64;
        let mut last_epoll = std::time::Instant::now();
        tracing::info!(
            shard,
            port = self.s.listener.local_addr()?.port(),
            tls = self.s.tls.is_some(),
            "shard serving"
        );
        loop {
            let stopping = self.s.stop.load(Ordering::SeqCst);
            if stopping && !self.s.core.busy() && self.backlog.is_empty() {
                break;
            }
            // DPDK: receive and dispatch packets, run the stack, take new connections.
            let user_ready = self.net_turn();
            // With a completion descriptor the loop sleeps in one place, woken by sockets or
            // by I/O completions; without one it must not sleep while I/O is in flight.
            let more = !self.backlog.is_empty()
                || self.conns.values().any(|c| c.maybe_more)
                || !user_ready.is_empty();
            let busy = if self.io_fd {
                more || self.s.core.ready_now() || self.s.core.compaction_ready()
            } else {
                self.s.core.busy() || more || self.s.core.compaction_ready()
            };
            let timeout = if busy {
                Some(Duration::ZERO)
            } else if self.repl.in_flight() > 0 {
                // Replication deadlines are kept by the loop's own clock.
                Some(REPL_RECHECK)
            } else if self.s.core.busy() {
                // I/O in flight: its completion wakes the poll; the short bound is a safety
                // net for submissions the kernel deferred (they go with the next poll).
                Some(IO_RECHECK)
            } else {
                Some(PARK)
            };
            let timeout = self.net_sleep(timeout);
            // A shard spinning on its DPDK queue looks at its kernel sockets (and device
            // completions) every EPOLL_EVERY, not every turn: a turn costs ~1 µs, the
            // syscall more (profile in ARCHITECTURE.md).
            let polled = if timeout == Some(Duration::ZERO)
                && self.net_spinning()
                && last_epoll.elapsed() < EPOLL_EVERY
            {
                events.clear();
                Ok(())
            } else {
                last_epoll = std::time::Instant::now();
                self.s.poll.poll(&mut events, timeout)
            };
            self.net_unpark();
            if let Err(e) = polled {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e.into());
                }
            }
            // A map published while this shard slept applies to what woke it.
            self.repl.refresh_map(&self.s.hive_map);
            let mut ready: Vec<usize> = Vec::new();
            for ev in events.iter() {
                match ev.token() {
                    LISTENER if !stopping => self.accept(),
                    LISTENER => {}
                    WAKER | IO_DONE => {}
                    #[cfg(feature = "dpdk")]
                    dpdk::RELAY => {}
                    tok if self.repl.links_ready(tok) => {}
                    Token(t) => ready.push(t),
                }
            }
            ready.extend(user_ready);
            // Connections with unread frames (credit-limited earlier) are read again too.
            ready.extend(
                self.conns
                    .iter()
                    .filter(|(_, c)| c.maybe_more)
                    .map(|(t, _)| *t),
            );
            ready.sort_unstable();
            ready.dedup();
            for t in ready {
                self.service(t);
            }
            // Drive the core; block on the device only if nothing else is ready.
            let wait = !self.io_fd
                && events.is_empty()
                && self.backlog.is_empty()
                && !self.conns.values().any(|c| c.maybe_more);
            self.s.core.poll(&mut self.completions, wait);
            self.backlog.extend(self.completions.drain(..));
            // Compaction (asked for after a sweep, or when free segments run low) gets a
            // bounded step per turn, and only while puts are not queueing up.
            if self.s.core.compaction_pending()
                && self.s.core.queued() < COMPACT_QUEUE_MAX
                && !stopping
            {
                self.s.core.compact_step();
            }
            self.tick_repl();
            let mut budget = REPLY_QUANTUM_BYTES;
            while budget > 0 {
                let Some(c) = self.backlog.pop_front() else {
                    break;
                };
                budget = budget.saturating_sub(reply_cost(&c));
                self.complete(c);
            }
            // Stalled connections are read again once they have room.
            if !self.queue_full() {
                let credits = self.s.cfg.credits;
                for c in self
                    .conns
                    .values_mut()
                    .filter(|c| c.stalled && c.in_flight < credits)
                {
                    c.stalled = false;
                    c.maybe_more = true;
                }
            }
            // Tokens revoked or expired meanwhile end their connections (at least once a
            // second, and whenever the registry was reloaded).
            if self.tokens_seen != self.s.tokens.version()
                || self.tokens_checked.elapsed() >= TOKEN_RECHECK
            {
                self.recheck_tokens();
            }
            for t in std::mem::take(&mut self.dirty) {
                self.flush(t);
            }
            #[cfg(feature = "dpdk")]
            if let Some(n) = &mut self.net {
                n.flush();
            }
            turns = turns.wrapping_add(1);
            if turns.is_multiple_of(1024) || timeout == Some(PARK) {
                let used = self.s.core.stats().device_bytes_used;
                self.s.device_use.used_bytes[shard as usize].store(used, Ordering::Relaxed);
            }
        }
        tracing::info!(shard, "shard stopped");
        Ok(())
    }

    fn accept(&mut self) {
        loop {
            match self.s.listener.accept() {
                Ok((mut stream, peer)) => {
                    if self.conns.len() >= MAX_CONNS_PER_SHARD {
                        tracing::warn!(shard = self.s.shard, %peer, "connection limit reached; refusing");
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let t = self.next_conn;
                    if let Err(e) = self.s.poll.registry().register(
                        &mut stream,
                        Token(t),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        tracing::warn!(%peer, "register: {e}");
                        continue;
                    }
                    self.add_conn(Stream::Kernel(stream), peer);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!(shard = self.s.shard, "accept: {e}");
                    return;
                }
            }
        }
    }

    /// A new connection (kernel or userspace), under the next token.
    fn add_conn(&mut self, stream: Stream, peer: SocketAddr) {
        let t = self.next_conn;
        self.next_conn += 1;
        match FramedConn::new_server(stream, self.s.tls.clone()) {
            Ok(framed) => {
                self.conns.insert(
                    t,
                    Conn {
                        framed,
                        peer,
                        version: None,
                        auth: None,
                        in_flight: 0,
                        closing: false,
                        maybe_more: false,
                        stalled: false,
                        from_node: false,
                    },
                );
            }
            Err(e) => tracing::warn!(%peer, "connection setup: {e}"),
        }
    }

    /// DPDK: one turn of the network path. New userspace connections are added; returns
    /// the userspace connections with something to read, or output waiting and room to
    /// write it (the kernel's poll says this for kernel sockets).
    #[cfg(feature = "dpdk")]
    fn net_turn(&mut self) -> Vec<usize> {
        let Some(n) = &mut self.net else {
            return Vec::new();
        };
        let mut accepted = Vec::new();
        n.turn(&mut accepted);
        self.repl.poll_links();
        let stopping = self.s.stop.load(Ordering::Relaxed);
        for (stream, peer) in accepted {
            if stopping || self.conns.len() >= MAX_CONNS_PER_SHARD {
                tracing::warn!(shard = self.s.shard, %peer, "not accepting (stopping or at the connection limit)");
                continue;
            }
            self.add_conn(Stream::User(stream), peer);
        }
        self.conns
            .iter_mut()
            .filter_map(|(t, c)| {
                let wants_write = c.framed.wants_write();
                match c.framed.get_mut() {
                    Stream::User(u) if u.ready(wants_write) => Some(*t),
                    _ => None,
                }
            })
            .collect()
    }

    #[cfg(not(feature = "dpdk"))]
    fn net_turn(&mut self) -> Vec<usize> {
        Vec::new()
    }

    /// DPDK: bound the loop's sleep (see `node/dpdk.rs`) and announce it.
    #[cfg(feature = "dpdk")]
    fn net_sleep(&mut self, timeout: Option<Duration>) -> Option<Duration> {
        let Some(n) = &self.net else {
            return timeout;
        };
        let t = n.bound_sleep(timeout);
        if t != Some(Duration::ZERO) && n.park() {
            return Some(Duration::ZERO);
        }
        t
    }

    #[cfg(not(feature = "dpdk"))]
    fn net_sleep(&mut self, timeout: Option<Duration>) -> Option<Duration> {
        timeout
    }

    /// A DPDK shard busy on its queue (it polls the kernel side less often).
    fn net_spinning(&self) -> bool {
        #[cfg(feature = "dpdk")]
        if let Some(n) = &self.net {
            return n.spinning();
        }
        false
    }

    fn net_unpark(&self) {
        #[cfg(feature = "dpdk")]
        if let Some(n) = &self.net {
            n.unpark();
        }
    }

    /// Too much work queued to read more requests: chunks waiting for a commit batch, or
    /// replication jobs running.
    fn queue_full(&self) -> bool {
        self.s.core.queued() >= QUEUE_HIGH_WATER
            || self.repl.in_flight() >= replication::MAX_REPL_JOBS
    }

    /// Read and dispatch what a connection has, within its credits; write what it owes.
    fn service(&mut self, t: usize) {
        let credits = self.s.cfg.credits;
        // A stopping shard takes no new requests; it answers those it has, then exits.
        let queue_full = self.queue_full() || self.s.stop.load(Ordering::Relaxed);
        let Some(c) = self.conns.get_mut(&t) else {
            return;
        };
        if !c.closing {
            let room = if queue_full {
                0
            } else {
                credits.saturating_sub(c.in_flight) as usize
            };
            self.frames.clear();
            // With no room, nothing is read: the connection is stalled until a reply frees
            // a credit or the commit queue drains (then `maybe_more` brings it back).
            c.stalled = room == 0;
            let result = if room == 0 {
                Ok(ReadStatus::Open)
            } else {
                c.framed.read_frames(&mut self.frames, room)
            };
            match result {
                Ok(status) => {
                    c.maybe_more = room > 0 && self.frames.len() == room;
                    let frames = std::mem::take(&mut self.frames);
                    for f in frames {
                        self.dispatch(t, f);
                    }
                    if status == ReadStatus::Closed {
                        self.close(t, "peer closed");
                        return;
                    }
                }
                Err(e) => {
                    let peer = c.peer;
                    match e.code() {
                        Some(code) => {
                            tracing::warn!(shard = self.s.shard, %peer, "bad input, closing the connection: {e}");
                            self.fail_conn(t, 0, code, &e.to_string());
                        }
                        None => {
                            tracing::info!(shard = self.s.shard, %peer, "connection ended: {e}");
                            self.close(t, "transport error");
                            return;
                        }
                    }
                }
            }
        }
        self.flush(t);
    }

    fn reply(&mut self, t: usize, req: u64, resp: &Response) {
        let Some(c) = self.conns.get_mut(&t) else {
            return;
        };
        let v = c.version.unwrap_or(PROTOCOL_VERSION_MIN);
        c.framed.queue_frame(&frame_response(v, req, resp));
        self.dirty.insert(t);
    }

    /// Send an error and close the connection once it is written.
    fn fail_conn(&mut self, t: usize, req: u64, code: ErrorCode, message: &str) {
        self.reply(
            t,
            req,
            &Response::Error {
                code,
                message: message.chars().take(1000).collect(),
            },
        );
        if let Some(c) = self.conns.get_mut(&t) {
            c.closing = true;
            c.maybe_more = false;
        }
    }

    fn dispatch(&mut self, t: usize, f: Frame) {
        let req_id = f.request_id;
        let shard = self.s.shard;
        let Some(c) = self.conns.get(&t) else { return };
        if c.closing {
            return;
        }
        let peer = c.peer;
        // Puts (the bulk of the bytes) are decoded in place, never copied into a Request.
        if f.opcode == Opcode::Put as u16 || f.opcode == Opcode::Replicate as u16 {
            if c.version.is_none() {
                self.refuse_unauthenticated(t, peer, req_id);
            } else if f.opcode == Opcode::Replicate as u16 && !c.from_node {
                tracing::warn!(shard, %peer, req = req_id, "Replicate from a connection that is not another node");
                self.fail_conn(
                    t,
                    req_id,
                    ErrorCode::Unauthenticated,
                    "only other nodes of the hive may send Replicate",
                );
            } else {
                self.put_in_place(t, peer, f);
            }
            return;
        }
        let request = match Request::decode(f.opcode, &f.body) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(shard, %peer, req = req_id, "bad request, closing the connection: {e}");
                self.fail_conn(t, req_id, e.code(), &e.to_string());
                return;
            }
        };
        tracing::debug!(shard, %peer, req = req_id, op = ?request.opcode(), "request");
        let authed = c.version.is_some();
        match request {
            Request::Hello {
                min_version,
                max_version,
                token,
                client_name,
            } => {
                if authed {
                    tracing::warn!(shard, %peer, req = req_id, "second Hello on a connection, closing it");
                    self.fail_conn(
                        t,
                        req_id,
                        ErrorCode::BadRequest,
                        "second Hello on a connection",
                    );
                    return;
                }
                let v = max_version.min(PROTOCOL_VERSION_MAX);
                if min_version > max_version || v < min_version.max(PROTOCOL_VERSION_MIN) {
                    tracing::warn!(shard, %peer, req = req_id, min_version, max_version, "no common protocol version");
                    self.fail_conn(t, req_id, ErrorCode::UnsupportedVersion, &format!("node speaks versions {PROTOCOL_VERSION_MIN}..={PROTOCOL_VERSION_MAX}, client {min_version}..={max_version}"));
                    return;
                }
                // Another node authenticates by its certificate (mutual TLS), with no token.
                let is_peer =
                    token.is_empty() && c.framed.tls().is_some_and(hivefs_net::tls::is_peer);
                let auth = match self.s.tokens.check(&token) {
                    _ if is_peer => None,
                    Ok((scope, d)) => Some((d, scope)),
                    Err(why) => {
                        tracing::warn!(shard, %peer, req = req_id, client = %client_name, "bad token: {}", why.as_str());
                        self.fail_conn(t, req_id, ErrorCode::BadToken, why.as_str());
                        return;
                    }
                };
                tracing::debug!(shard, %peer, client = %client_name, "authenticated");
                if let Some(c) = self.conns.get_mut(&t) {
                    c.version = Some(v);
                    c.auth = auth;
                    c.from_node = is_peer;
                }
                let resp = Response::HelloOk {
                    version: v,
                    node_id: self.s.cfg.node_id.clone(),
                    shard,
                    shard_count: self.s.cfg.shards,
                    credits: self.s.cfg.credits,
                };
                self.reply(t, req_id, &resp);
            }
            _ if !authed => self.refuse_unauthenticated(t, peer, req_id),
            Request::Has { level, ids } => {
                if let Some(bad) = self.wrong_shard(&ids) {
                    self.reply(t, req_id, &bad);
                    return;
                }
                let mut present = Vec::with_capacity(ids.len());
                let claim_epoch = self.s.core.has(&ids, level, &mut present);
                self.reply(
                    t,
                    req_id,
                    &Response::HasReply {
                        claim_epoch,
                        present,
                    },
                );
            }
            Request::Put { .. } | Request::Replicate { .. } => {
                unreachable!("puts are routed to put_in_place above")
            }
            Request::HiveMap => {
                let map = self.repl.map().clone();
                self.reply(t, req_id, &Response::HiveMapReply { map });
            }
            Request::Get { id } => {
                if let Some(bad) = self.wrong_shard(&[id]) {
                    self.reply(t, req_id, &bad);
                    return;
                }
                let ticket = self.ticket(Pending::Get {
                    conn: t,
                    req: req_id,
                });
                self.s.core.get(ticket, id);
            }
            Request::Stats => {
                let mut v = serde_json::to_value(self.s.core.stats()).unwrap_or_default();
                v["device"] = serde_json::Value::String(self.s.device_desc.clone());
                v["node_id"] = serde_json::Value::String(self.s.cfg.node_id.clone());
                v["repl_jobs"] = self.repl.in_flight().into();
                v["repl_forwarded"] = self.repl.forwarded.into();
                v["repl_forwarded_bytes"] = self.repl.forwarded_bytes.into();
                v["repl_owed"] = self.repl.owed.into();
                v["map_epoch"] = self.repl.map().epoch.into();
                v["net"] = self.net_stats();
                self.reply(
                    t,
                    req_id,
                    &Response::StatsReply {
                        json: v.to_string(),
                    },
                );
            }
            Request::Map => {
                let map = self.s.map.clone();
                self.reply(t, req_id, &Response::MapReply { map });
            }
            Request::ShardAdmin { .. }
                if !self.conns.get(&t).is_some_and(|c| {
                    c.from_node || matches!(c.auth.as_ref(), Some((_, TokenScope::Admin)))
                }) =>
            {
                self.fail_conn(
                    t,
                    req_id,
                    ErrorCode::Unauthenticated,
                    "shard administration needs an admin token",
                );
            }
            Request::ShardAdmin { body } => self.shard_admin(t, req_id, &body),
            Request::Meta { .. } => {
                let resp = Response::Error {
                    code: ErrorCode::BadRequest,
                    message: "metadata requests go to the metadata port, not a shard".into(),
                };
                self.reply(t, req_id, &resp);
            }
        }
    }

    /// A GC step from the metadata service (see [`ShardAdmin`]).
    fn shard_admin(&mut self, t: usize, req_id: u64, body: &[u8]) {
        let reply = |me: &mut Self, r: ShardAdminReply| me.reply(t, req_id, &admin_reply(&r));
        let op = match meta::decode::<ShardAdmin>(body) {
            Ok(op) => op,
            Err(e) => return reply(self, ShardAdminReply::Refused(e.to_string())),
        };
        // Repair and scrub ask these all the time: not GC steps worth a line each.
        if !matches!(
            op,
            ShardAdmin::Holding { .. }
                | ShardAdmin::Scrub { .. }
                | ShardAdmin::ListIds { .. }
                | ShardAdmin::BeginRelease
                | ShardAdmin::Release { .. }
        ) {
            tracing::info!(shard = self.s.shard, step = op_name(&op), "gc step");
        }
        match op {
            ShardAdmin::SetGcEpoch { epoch } => {
                self.s.core.set_gc_epoch(epoch);
                reply(self, ShardAdminReply::Done)
            }
            ShardAdmin::BeginGc { epoch } => {
                self.s.core.begin_gc(epoch);
                reply(self, ShardAdminReply::Done)
            }
            ShardAdmin::EndGc { epoch } => {
                self.s.core.end_gc(epoch);
                reply(self, ShardAdminReply::Done)
            }
            ShardAdmin::ListIds { after, max } => {
                let after = match after.as_deref().map(meta::split_ids) {
                    None => None,
                    Some(Some(v)) if v.len() == 1 => Some(v[0]),
                    Some(_) => return reply(self, ShardAdminReply::Refused("bad cursor".into())),
                };
                let max = max.min(meta::MAX_ADMIN_IDS) as usize;
                let (ids, more) = self.s.core.list_ids(after.as_ref(), max);
                let levels = ids.iter().map(|id| self.s.core.held_level(id)).collect();
                reply(
                    self,
                    ShardAdminReply::Listed {
                        ids: meta::join_ids(&ids),
                        levels,
                        more,
                    },
                )
            }
            ShardAdmin::ListStale {
                before_epoch,
                after,
                max,
            } => {
                let after = match after.as_deref().map(meta::split_ids) {
                    None => None,
                    Some(Some(v)) if v.len() == 1 => Some(v[0]),
                    Some(_) => return reply(self, ShardAdminReply::Refused("bad cursor".into())),
                };
                let max = max.min(meta::MAX_ADMIN_IDS) as usize;
                let (ids, more) = self.s.core.list_stale(before_epoch, after.as_ref(), max);
                reply(
                    self,
                    ShardAdminReply::Ids {
                        ids: meta::join_ids(&ids),
                        more,
                    },
                )
            }
            ShardAdmin::MarkedLive { epoch, ids } => {
                let Some(ids) = id_list(&ids, meta::MAX_ADMIN_IDS) else {
                    return reply(self, ShardAdminReply::Refused("bad id list".into()));
                };
                self.s.core.marked_live(epoch, &ids);
                reply(self, ShardAdminReply::Done)
            }
            ShardAdmin::Holding { ids } => {
                let Some(ids) = id_list(&ids, meta::MAX_ADMIN_IDS) else {
                    return reply(self, ShardAdminReply::Refused("bad id list".into()));
                };
                let levels = ids.iter().map(|id| self.s.core.held_level(id)).collect();
                let map_epoch = self.repl.map().epoch;
                reply(self, ShardAdminReply::Held { levels, map_epoch })
            }
            ShardAdmin::Scrub { ids } => {
                let Some(ids) = id_list(&ids, meta::MAX_SCRUB_IDS) else {
                    return reply(self, ShardAdminReply::Refused("bad id list".into()));
                };
                let ids: Vec<ChunkId> =
                    ids.into_iter().filter(|id| self.s.core.holds(id)).collect();
                let scrub = self.next_ticket;
                self.next_ticket += 1;
                self.scrubs.insert(
                    scrub,
                    Scrub {
                        conn: t,
                        req: req_id,
                        left: ids.len(),
                        checked: 0,
                        bytes: 0,
                        bad: Vec::new(),
                    },
                );
                if let Some(c) = self.conns.get_mut(&t) {
                    c.in_flight += 1;
                }
                for id in ids {
                    let ticket = self.next_ticket;
                    self.next_ticket += 1;
                    self.tickets
                        .insert(ticket, Pending::ScrubRead { scrub, id });
                    self.s.core.get(ticket, id);
                }
                self.scrub_progress(scrub);
            }
            ShardAdmin::DropCopies { ids } => {
                let Some(ids) = id_list(&ids, meta::MAX_SCRUB_IDS) else {
                    return reply(self, ShardAdminReply::Refused("bad id list".into()));
                };
                tracing::warn!(
                    shard = self.s.shard,
                    copies = ids.len(),
                    "removing bad copies (a good one is stored next)"
                );
                let ticket = self.ticket(Pending::ScrubDrop {
                    conn: t,
                    req: req_id,
                    checked: 0,
                    bytes: 0,
                    bad: ids.clone(),
                });
                self.s.core.delete(ticket, ids);
            }
            ShardAdmin::BeginRelease => {
                let token = self.s.core.begin_release();
                let map_epoch = self.repl.map().epoch;
                reply(self, ShardAdminReply::ReleaseWindow { token, map_epoch })
            }
            ShardAdmin::Release {
                token,
                map_epoch,
                ids,
            } => {
                let now = self.repl.map().epoch;
                if map_epoch != now {
                    let why = format!("the map moved from epoch {map_epoch} to {now}");
                    return reply(self, ShardAdminReply::Refused(why));
                }
                self.remove_copies(t, req_id, &ids, |core, ticket, ids| {
                    core.release(ticket, token, ids)
                });
            }
            ShardAdmin::Sweep { epoch, ids } => {
                self.remove_copies(t, req_id, &ids, |core, ticket, ids| {
                    core.sweep(ticket, epoch, ids)
                });
            }
        }
    }

    /// A sweep or a release: `remove` tombstones what it may of `ids`; answered `Swept`
    /// once that is durable (`Pending::Sweep`), or `Refused` at once.
    fn remove_copies(
        &mut self,
        t: usize,
        req_id: u64,
        ids: &[u8],
        remove: impl FnOnce(&mut ShardCore, u64, Vec<ChunkId>) -> Result<(u64, u64), ShardError>,
    ) {
        let reply = |me: &mut Self, r: ShardAdminReply| me.reply(t, req_id, &admin_reply(&r));
        let Some(ids) = id_list(ids, meta::MAX_ADMIN_IDS) else {
            return reply(self, ShardAdminReply::Refused("bad id list".into()));
        };
        let ticket = self.ticket(Pending::Sweep {
            conn: t,
            req: req_id,
            spared: 0,
            bytes: 0,
        });
        match remove(&mut self.s.core, ticket, ids) {
            Ok((spared, bytes)) => {
                if let Some(Pending::Sweep {
                    spared: s,
                    bytes: b,
                    ..
                }) = self.tickets.get_mut(&ticket)
                {
                    (*s, *b) = (spared, bytes);
                }
            }
            Err(e) => {
                self.tickets.remove(&ticket);
                if let Some(c) = self.conns.get_mut(&t) {
                    c.in_flight = c.in_flight.saturating_sub(1);
                }
                reply(self, ShardAdminReply::Refused(e.to_string()))
            }
        }
    }

    fn refuse_unauthenticated(&mut self, t: usize, peer: SocketAddr, req_id: u64) {
        tracing::warn!(shard = self.s.shard, %peer, req = req_id, "request before Hello");
        self.fail_conn(
            t,
            req_id,
            ErrorCode::Unauthenticated,
            "the first frame must be Hello with a token",
        );
    }

    /// A put whose chunks stay in the frame body they arrived in (no copy until the
    /// commit batch).
    fn put_in_place(&mut self, t: usize, peer: SocketAddr, f: Frame) {
        let req_id = f.request_id;
        // A copy from a primary is stored here and goes no further.
        let copy = f.opcode == Opcode::Replicate as u16;
        let decoded = if copy {
            decode_replicate_in_place(&f.body).map(|(hint_for, level, at)| {
                if hint_for != 0 {
                    tracing::debug!(shard = self.s.shard, hint_for, "hinted copy");
                }
                (level, at)
            })
        } else {
            decode_put_in_place(&f.body)
        };
        let (level, at) = match decoded {
            Ok(at) => at,
            Err(e) => {
                tracing::warn!(shard = self.s.shard, %peer, req = req_id, "bad request, closing the connection: {e}");
                self.fail_conn(t, req_id, e.code(), &e.to_string());
                return;
            }
        };
        tracing::debug!(shard = self.s.shard, req = req_id, chunks = at.len(), "put");
        let ids: Vec<ChunkId> = at.iter().map(|c| c.id).collect();
        if let Some(bad) = self.wrong_shard(&ids) {
            self.reply(t, req_id, &bad);
            return;
        }
        if !copy {
            if !self.repl.active() {
                // Until this node is in its own copy of the map it cannot know the other
                // replicas: storing alone would acknowledge one copy. Moments after start.
                let resp = Response::error(
                    ErrorCode::NotPrimary,
                    "this node has no placement map yet; retry shortly",
                );
                self.reply(t, req_id, &resp);
                return;
            }
            if let Some(bad) = self.not_primary(&ids) {
                self.reply(t, req_id, &bad);
                return;
            }
        }
        let ticket = self.ticket(Pending::Put {
            conn: t,
            req: req_id,
            n: at.len(),
        });
        let body = Arc::new(f.body);
        let chunks: Vec<crate::shard::PutChunk> = at
            .into_iter()
            .map(|c| crate::shard::PutChunk {
                id: c.id,
                codec: c.codec,
                raw_len: c.raw_len,
                level,
                data: ChunkBytes::shared(body.clone(), c.data),
            })
            .collect();
        // A hive of one node has nothing to replicate to: the put is answered as before.
        let copies = (!copy && self.repl.map().eligible_count() > 1).then(|| {
            chunks
                .iter()
                .map(|c| (c.id, c.codec, c.raw_len, c.data.clone()))
                .collect()
        });
        self.s.core.put(ticket, chunks);
        if let Some(copies) = copies {
            self.replicate_put(ticket, t, req_id, level, copies);
        }
    }

    /// One read of a scrub came back: check the chunk against its id.
    fn scrub_read(
        &mut self,
        scrub: u64,
        id: ChunkId,
        result: Result<crate::shard::StoredChunk, ShardError>,
    ) {
        let key = *self.s.core.dedupe_key();
        let Some(sc) = self.scrubs.get_mut(&scrub) else {
            if let Ok(ch) = result {
                self.s.core.recycle_read(ch.data);
            }
            return;
        };
        sc.left -= 1;
        match result {
            Ok(ch) => {
                sc.checked += 1;
                sc.bytes += ch.data.len() as u64;
                // The shard checked the record's CRC and that it names `id`; the bytes
                // must also hash to it.
                if hivefs_net::chunk::verify(&key, &id, ch.codec, &ch.data, ch.raw_len as usize)
                    .is_err()
                {
                    sc.bad.push(id);
                }
                self.s.core.recycle_read(ch.data);
            }
            Err(ShardError::CorruptRecord { .. }) => {
                sc.checked += 1;
                sc.bad.push(id);
            }
            // Gone since (swept, compacted away) or a device error: not judged here.
            Err(e) => tracing::warn!(shard = self.s.shard, "scrub read: {e}"),
        }
        self.scrub_progress(scrub);
    }

    /// Finish a scrub whose reads are all back: remove the bad copies, then answer.
    fn scrub_progress(&mut self, scrub: u64) {
        if self.scrubs.get(&scrub).is_none_or(|s| s.left > 0) {
            return;
        }
        let Some(sc) = self.scrubs.remove(&scrub) else {
            return;
        };
        if let Some(c) = self.conns.get_mut(&sc.conn) {
            c.in_flight = c.in_flight.saturating_sub(1);
        }
        if !sc.bad.is_empty() {
            tracing::warn!(
                shard = self.s.shard,
                bad = sc.bad.len(),
                "scrub found copies that do not verify (kept until a good copy replaces them)"
            );
        }
        let r = admin_reply(&ShardAdminReply::Scrubbed {
            checked: sc.checked,
            bytes: sc.bytes,
            bad: meta::join_ids(&sc.bad),
        });
        self.reply(sc.conn, sc.req, &r);
    }

    /// Close every connection whose token was revoked or expired.
    fn recheck_tokens(&mut self) {
        self.tokens_seen = self.s.tokens.version();
        self.tokens_checked = std::time::Instant::now();
        let bad: Vec<(usize, &'static str)> = self
            .conns
            .iter()
            .filter_map(|(t, c)| {
                let (d, _) = c.auth.as_ref()?;
                self.s
                    .tokens
                    .check_digest(d)
                    .err()
                    .map(|why| (*t, why.as_str()))
            })
            .collect();
        for (t, why) in bad {
            tracing::info!(shard = self.s.shard, "closing a connection: {why}");
            self.fail_conn(t, 0, ErrorCode::BadToken, why);
        }
    }

    fn wrong_shard(&self, ids: &[ChunkId]) -> Option<Response> {
        let me = self.s.shard;
        let bad = ids.iter().find(|id| self.s.map.shard_of(id) != me)?;
        Some(Response::Error {
            code: ErrorCode::WrongShard,
            message: format!(
                "chunk {bad:?} belongs to shard {}, not {me}",
                self.s.map.shard_of(bad)
            ),
        })
    }

    fn ticket(&mut self, p: Pending) -> u64 {
        let t = self.next_ticket;
        self.next_ticket += 1;
        let conn = match &p {
            Pending::Put { conn, .. }
            | Pending::Get { conn, .. }
            | Pending::Sweep { conn, .. }
            | Pending::ScrubDrop { conn, .. } => *conn,
            Pending::ScrubRead { .. } => usize::MAX,
        };
        if let Some(c) = self.conns.get_mut(&conn) {
            c.in_flight += 1;
        }
        self.tickets.insert(t, p);
        t
    }

    fn complete(&mut self, c: Completion) {
        if let Completion::Get { ticket, .. } = &c {
            if let Some(Pending::ScrubRead { scrub, id }) = self.tickets.get(ticket) {
                let (ticket, scrub, id) = (*ticket, *scrub, *id);
                self.tickets.remove(&ticket);
                if let Completion::Get { result, .. } = c {
                    self.scrub_read(scrub, id, result);
                }
                return;
            }
        }
        let (ticket, resp) = match c {
            Completion::Put {
                ticket,
                claim_epoch,
                result,
            } => {
                if self.local_put_done(ticket, claim_epoch, &result) {
                    return;
                }
                let resp = match result {
                    Ok(outcomes) => Response::PutReply {
                        claim_epoch,
                        results: outcomes.into_iter().map(put_result).collect(),
                    },
                    Err(e) => shard_error(&e),
                };
                (ticket, resp)
            }
            Completion::Get {
                ticket,
                result: Ok(ch),
            } => {
                // The common case goes straight from the chunk into the reply frame.
                let Some(Pending::Get { conn, req }) = self.tickets.remove(&ticket) else {
                    return;
                };
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.in_flight = c.in_flight.saturating_sub(1);
                    let v = c.version.unwrap_or(PROTOCOL_VERSION_MIN);
                    self.scratch.clear();
                    let chunk = Some((ch.codec, ch.raw_len, &ch.data[..]));
                    let check = c.framed.body_check();
                    get_reply_head_into(&mut self.scratch, check, v, req, chunk);
                    c.framed.queue_frame_parts(&[&self.scratch, &ch.data]);
                    self.dirty.insert(conn);
                }
                self.s.core.recycle_read(ch.data);
                return;
            }
            Completion::Get { ticket, result } => {
                let resp = match result {
                    Ok(ch) => Response::GetReply {
                        chunk: Some((ch.codec, ch.raw_len, ch.data.to_vec())),
                    },
                    Err(ShardError::NotFound(_)) => Response::GetReply { chunk: None },
                    Err(e) => shard_error(&e),
                };
                (ticket, resp)
            }
            Completion::Delete { ticket, result } => {
                let resp = match (self.tickets.get(&ticket), result) {
                    (Some(Pending::Sweep { spared, bytes, .. }), Ok(removed)) => {
                        // The swept space is reclaimed by compaction.
                        if removed > 0 {
                            self.s.core.request_compaction();
                        }
                        admin_reply(&ShardAdminReply::Swept {
                            removed: removed as u64,
                            spared: *spared,
                            bytes: *bytes,
                        })
                    }
                    (
                        Some(Pending::ScrubDrop {
                            checked,
                            bytes,
                            bad,
                            ..
                        }),
                        Ok(_),
                    ) => admin_reply(&ShardAdminReply::Scrubbed {
                        checked: *checked,
                        bytes: *bytes,
                        bad: meta::join_ids(bad),
                    }),
                    (_, Err(e)) => shard_error(&e),
                    (_, Ok(_)) => Response::error(ErrorCode::Internal, "unexpected delete"),
                };
                (ticket, resp)
            }
        };
        let Some(p) = self.tickets.remove(&ticket) else {
            return;
        };
        let (conn, req) = match p {
            Pending::Put { conn, req, n } => {
                if let Response::PutReply { results, .. } = &resp {
                    debug_assert_eq!(results.len(), n);
                }
                (conn, req)
            }
            Pending::Get { conn, req }
            | Pending::Sweep { conn, req, .. }
            | Pending::ScrubDrop { conn, req, .. } => (conn, req),
            Pending::ScrubRead { .. } => return,
        };
        if let Response::Error { message, .. } = &resp {
            tracing::warn!(shard = self.s.shard, req, "request failed: {message}");
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.in_flight = c.in_flight.saturating_sub(1);
        }
        self.reply(conn, req, &resp);
    }

    fn flush(&mut self, t: usize) {
        let Some(c) = self.conns.get_mut(&t) else {
            return;
        };
        match c.framed.flush() {
            Ok(all) => {
                if all && c.closing {
                    self.close(t, "closed after an error reply");
                }
            }
            Err(e) => {
                tracing::info!(shard = self.s.shard, peer = %c.peer, "write failed: {e}");
                self.close(t, "write failed");
            }
        }
    }

    fn close(&mut self, t: usize, why: &str) {
        if let Some(mut c) = self.conns.remove(&t) {
            tracing::debug!(shard = self.s.shard, peer = %c.peer, "closing: {why}");
            if let Some(k) = c.framed.get_mut().kernel() {
                let _ = self.s.poll.registry().deregister(k);
            }
        }
        // Replies for requests still in the core are dropped when they complete.
        self.tickets.retain(|_, p| !matches!(p, Pending::Put { conn, .. } | Pending::Get { conn, .. } if *conn == t));
    }
}

/// Concatenated ids of a shard administration request, at most `max` of them.
fn id_list(ids: &[u8], max: u32) -> Option<Vec<ChunkId>> {
    meta::split_ids(ids).filter(|v| v.len() <= max as usize)
}

fn admin_reply(r: &ShardAdminReply) -> Response {
    Response::ShardAdminReply {
        body: meta::encode(r),
    }
}

fn op_name(op: &ShardAdmin) -> &'static str {
    match op {
        ShardAdmin::SetGcEpoch { .. } => "set-epoch",
        ShardAdmin::BeginGc { .. } => "begin",
        ShardAdmin::ListIds { .. } => "list",
        ShardAdmin::ListStale { .. } => "list-stale",
        ShardAdmin::MarkedLive { .. } => "marked-live",
        ShardAdmin::Sweep { .. } => "sweep",
        ShardAdmin::EndGc { .. } => "end",
        ShardAdmin::Holding { .. } => "holding",
        ShardAdmin::Scrub { .. } => "scrub",
        ShardAdmin::DropCopies { .. } => "drop-copies",
        ShardAdmin::BeginRelease => "begin-release",
        ShardAdmin::Release { .. } => "release",
    }
}

/// Roughly what answering `c` costs, in reply bytes (a small reply counts as 4 KiB).
fn reply_cost(c: &Completion) -> usize {
    match c {
        Completion::Get { result: Ok(ch), .. } => ch.data.len().max(4096),
        _ => 4096,
    }
}

fn put_result(o: PutOutcome) -> PutResult {
    match o {
        PutOutcome::Stored => PutResult::Stored,
        PutOutcome::Duplicate => PutResult::Duplicate,
        PutOutcome::Rejected => PutResult::Rejected,
    }
}

fn shard_error(e: &ShardError) -> Response {
    let code = match e {
        ShardError::NotFound(_) => ErrorCode::NotFound,
        ShardError::BadRequest(_) => ErrorCode::BadRequest,
        ShardError::NoSpace => ErrorCode::NoSpace,
        _ => ErrorCode::Internal,
    };
    Response::Error {
        code,
        message: e.to_string(),
    }
}
