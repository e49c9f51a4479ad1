//! The metadata service's front door: a TLS port (`meta_port`) where clients send
//! [`MetaRequest`]s (and fetch the cluster map), answered through Raft.
//!
//! One thread per connection (metadata connections are few: one pool per mount), each a
//! blocking [`FramedConn`] with a read timeout so it notices shutdown. The first frame must
//! be a `Hello` with the hive token, exactly as on the shard ports.
//!
//! - A mutation is validated, stamped with this node's clock (the only clock in the
//!   metadata path: applying stays deterministic), proposed through [`MetaRaft::write`], and
//!   answered with what the store returned when it applied it.
//! - A query waits for [`MetaRaft::read_barrier`] (linearizable: it sees every write
//!   acknowledged before it), then reads the store.
//! - `statfs` adds the device's real figures, published by the shard threads.
//! - A lock request is answered by the [`LockService`] in memory, not through Raft (see
//!   `locks.rs` for why that is sound, and what a restart does).
//! - A `Watch` turns its connection into a stream of invalidations (`watch.rs`): every
//!   mutation answered OK is published to the other clients' watchers of its volume
//!   before its answer is sent, and the connection's thread sends them (or a heartbeat).

use super::leases::Gate;
use super::locks::LockService;
use super::peer::PeerNet;
use super::raft::{Applier, MetaRaft, RaftError};
use super::store::MetaStore;
use super::watch::{self, Watchers};
use crate::admin::Link;
use crate::config::NodeConfig;
use crate::hive_map::MapCell;
use crate::tokens::TokenRegistry;
use anyhow::{Context, Result};
use hivefs_net::chunk::{self, ChunkId};
use hivefs_net::conn::{ConnError, FramedConn, ReadStatus};
use hivefs_net::frame::{PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};
use hivefs_net::meta::{
    self, Answer, Errno, FsckReport, GcReport, JoinGrant, LockOp, LockRequest, MetaCommand,
    MetaReply, MetaRequest, Mutation, NodeEntry, NodeSpec, PeerRequest, Query, ShardAdmin,
    ShardAdminReply, Timespec, TokenScope, VolumeInfo, WatchEvent, WATCH_HEARTBEAT_MS,
};
use hivefs_net::proto::{frame_response, ClusterMap, ErrorCode, Request, Response};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Most metadata connections served at once (each is a thread).
pub const MAX_META_CONNS: usize = 512;
/// How often an idle connection thread looks at the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(250);
/// A watch stream whose client has not taken an event for this long is ended (the
/// client reconnects and treats the gap as an overflow).
const WATCH_SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Device figures the shard threads publish for `statfs`.
#[derive(Debug, Default)]
pub struct DeviceUse {
    pub total_bytes: AtomicU64,
    pub used_bytes: Vec<AtomicU64>,
}

impl DeviceUse {
    pub fn new(shards: usize) -> DeviceUse {
        DeviceUse {
            total_bytes: AtomicU64::new(0),
            used_bytes: (0..shards).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

/// The store as Raft's applier.
struct StoreApplier(Arc<MetaStore>);

impl Applier for StoreApplier {
    fn raft_state(&self) -> anyhow::Result<Option<Vec<u8>>> {
        self.0.raft_state()
    }
    fn apply_batch(
        &self,
        cmds: &[Option<&[u8]>],
        raft_state: &[u8],
    ) -> anyhow::Result<Vec<Vec<u8>>> {
        self.0.apply_batch(cmds, raft_state)
    }
    fn export(&self) -> anyhow::Result<Vec<u8>> {
        self.0.export()
    }
    fn import(&self, data: &[u8], raft_state: &[u8]) -> anyhow::Result<()> {
        self.0.import(data, raft_state)
    }
}

pub(super) struct Shared {
    pub(super) store: Arc<MetaStore>,
    data_dir: std::path::PathBuf,
    shard_ports: Vec<u16>,
    pub(super) raft: MetaRaft,
    pub(super) cfg: NodeConfig,
    map: ClusterMap,
    tls: Option<Arc<rustls::ServerConfig>>,
    /// This node's TLS for dialling other nodes (none on a plain-TCP hive).
    pub(super) peer_tls: Option<Arc<rustls::ClientConfig>>,
    /// Who may connect and do what (shared with the shard threads).
    pub(super) tokens: Arc<TokenRegistry>,
    /// The placement map as this node's store has it (shared with the shard threads).
    pub(super) hive_map: Arc<MapCell>,
    /// Volume ids by name, as found (see [`Shared::volume_id`]).
    volume_ids: Mutex<std::collections::HashMap<String, u32>>,
    device: Arc<DeviceUse>,
    /// flock and POSIX locks (volatile; see `locks.rs`).
    locks: LockService,
    /// Watch streams: where applied mutations' invalidations go (see `watch.rs`).
    watchers: Watchers,
    /// Set while a collection runs (one at a time).
    gc_running: AtomicBool,
    /// Held while a node is admitted or the log version raised (`version.rs`).
    pub(super) membership: tokio::sync::Mutex<()>,
    pub(super) stop: AtomicBool,
    conns: Mutex<Vec<JoinHandle<()>>>,
}

/// A running metadata service.
pub struct MetaServer {
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
    health: Option<JoinHandle<()>>,
    map: Option<JoinHandle<()>>,
    pub port: u16,
}

/// Where the metadata service keeps its files.
pub fn meta_dir(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("meta")
}

impl MetaServer {
    /// Open the store and the Raft log under `data_dir/meta`, replay what the log holds,
    /// bind `cfg`'s metadata port and start serving.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        data_dir: &Path,
        cfg: &NodeConfig,
        tls: Option<Arc<rustls::ServerConfig>>,
        map: ClusterMap,
        device: Arc<DeviceUse>,
        shard_ports: Vec<u16>,
        tokens: Arc<TokenRegistry>,
        hive_map: Arc<MapCell>,
    ) -> Result<MetaServer> {
        let dir = meta_dir(data_dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let store = Arc::new(MetaStore::open(&dir.join("namespace.redb"))?);
        super::version::check_build(&store)?;
        tokens.refresh(&store).context("loading the token table")?;
        publish_map(&store, cfg.bucket_count, &hive_map);
        let addr: SocketAddr = format!("{}:{}", cfg.listen, cfg.meta_port())
            .parse()
            .with_context(|| format!("bad metadata address {}:{}", cfg.listen, cfg.meta_port()))?;
        let listener =
            TcpListener::bind(addr).with_context(|| format!("binding the metadata port {addr}"))?;
        let port = listener.local_addr()?.port();
        let addr = NodeSpec::addr_of(cfg.advertise_host(), port);
        let applier = Arc::new(StoreApplier(store.clone()));
        let peer_tls = match &tls {
            Some(_) => {
                let ca = crate::config::trust_bundle(data_dir)?;
                let identity = hivefs_net::tls::NodeIdentity::load(
                    &data_dir.join("node.pem"),
                    &data_dir.join("node.key"),
                    &ca,
                )
                .map_err(|e| anyhow::anyhow!("node certificate: {e}"))?;
                Some(
                    hivefs_net::tls::peer_client_config_with(identity, &ca)
                        .map_err(|e| anyhow::anyhow!("node TLS for the metadata cluster: {e}"))?,
                )
            }
            None => None,
        };
        let raft = match &peer_tls {
            Some(peer_tls) => {
                let net = PeerNet::new(peer_tls.clone(), cfg.node_id.clone());
                block_on(MetaRaft::open_member(
                    &dir,
                    cfg.raft_id,
                    addr,
                    applier,
                    net,
                    cfg.bootstrap,
                ))
            }
            None if cfg.bootstrap && cfg.raft_id == 1 => {
                block_on(MetaRaft::open(&dir, cfg.raft_id, addr, applier))
            }
            None => anyhow::bail!(
                "node {} belongs to a hive of several nodes, whose members authenticate each \
                 other with TLS: it cannot run --insecure",
                cfg.node_id
            ),
        }
        .map_err(|e| anyhow::anyhow!("starting the metadata log: {e}"))?;
        listener.set_nonblocking(true)?;
        let locks = LockService::start(&dir.join("locks.horizon"))?;
        let shared = Arc::new(Shared {
            store,
            data_dir: data_dir.to_path_buf(),
            shard_ports,
            raft,
            cfg: cfg.clone(),
            map,
            tls,
            peer_tls,
            tokens,
            hive_map,
            volume_ids: Mutex::new(std::collections::HashMap::new()),
            device,
            locks,
            watchers: Watchers::default(),
            gc_running: AtomicBool::new(false),
            membership: tokio::sync::Mutex::new(()),
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
        });
        // Serve first: the other members' Raft traffic must be answered whatever happens
        // next (a restarted member waits for nobody before it answers them).
        let sh = shared.clone();
        let accept = std::thread::Builder::new()
            .name("meta-accept".into())
            .spawn(move || accept_loop(sh, listener))?;
        let sh = shared.clone();
        let health = std::thread::Builder::new()
            .name("meta-health".into())
            .spawn(move || super::health::run(&sh))?;
        // The placement map goes to the shards within moments of a change applying here
        // (its own thread: the detector's loop may wait on Raft).
        let sh = shared.clone();
        let map = std::thread::Builder::new()
            .name("meta-map".into())
            .spawn(move || {
                let mut turn = 0u64;
                while !sh.stop.load(Ordering::SeqCst) {
                    publish_map(&sh.store, sh.cfg.bucket_count, &sh.hive_map);
                    turn += 1;
                    if sh.tls.is_some() && turn.is_multiple_of(5) {
                        follow_ca_rotation(&sh);
                    }
                    std::thread::sleep(MAP_PUBLISH_EVERY);
                }
            })?;
        let server = MetaServer {
            shared,
            accept: Some(accept),
            health: Some(health),
            map: Some(map),
            port,
        };
        // The first node is in the cluster map as node 1 before it answers anyone's join.
        if let Err(e) = block_on(register_self(&server.shared, port)) {
            let _ = server.shutdown();
            return Err(e.context("recording this node in the cluster map"));
        }
        // Shards stamp claims with the epoch commits accept.
        if let Err(e) = block_on(sync_gc_epoch(&server.shared)) {
            tracing::warn!("telling the shards the GC epoch: {e:#}");
        }
        tracing::info!(port, "metadata service serving");
        Ok(server)
    }

    /// The store (for `hive fsck` and tests).
    pub fn store(&self) -> &Arc<MetaStore> {
        &self.shared.store
    }

    /// Create volume `name` unless it exists (through Raft, like any client's request).
    /// Returns the volume and whether it was made now.
    pub fn ensure_volume(&self, name: &str, copies: u8) -> Result<(VolumeInfo, bool)> {
        let q = MetaRequest::Query {
            volume: 0,
            query: Query::Volume { name: name.into() },
        };
        let ask = |req: MetaRequest| {
            block_on(handle(
                &self.shared,
                req,
                &TokenScope::Admin,
                PROTOCOL_VERSION_MAX,
            ))
            .map_err(|e| anyhow::anyhow!("{e}"))
        };
        if let Ok(Answer::Volume(v)) = ask(q)? {
            return Ok((v, false));
        }
        // A one-off client of its own: its one mutation is seq 1.
        let client = u64::from_le_bytes(crate::config::random_bytes::<8>()?) | 1;
        let create = MetaRequest::Mutate(MetaCommand {
            volume: 0,
            client,
            seq: 1,
            acked_below: 1,
            now: Timespec::default(),
            op: Mutation::CreateVolume {
                name: name.into(),
                copies,
            },
        });
        match ask(create)? {
            Ok(Answer::Volume(v)) => Ok((v, true)),
            Ok(other) => anyhow::bail!("creating volume {name}: unexpected {other:?}"),
            Err(e) => anyhow::bail!("creating volume {name}: {e}"),
        }
    }

    /// Stop accepting, end every connection, stop Raft.
    pub fn shutdown(mut self) -> Result<()> {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.accept.take() {
            let _ = a.join();
        }
        if let Some(h) = self.health.take() {
            let _ = h.join();
        }
        if let Some(h) = self.map.take() {
            let _ = h.join();
        }
        let conns = std::mem::take(&mut *self.shared.conns.lock().expect("conns lock"));
        for c in conns {
            let _ = c.join();
        }
        match Arc::try_unwrap(self.shared) {
            Ok(sh) => block_on(sh.raft.shutdown()).map_err(|e| anyhow::anyhow!("{e}")),
            Err(_) => Ok(()), // a connection thread still holds it: dropping is a clean crash
        }
    }
}

/// Drive a future to completion on this thread (Raft runs on its own runtime; this only
/// waits for its answer).
pub(super) fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime")
        .block_on(f)
}

fn accept_loop(sh: Arc<Shared>, listener: TcpListener) {
    while !sh.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let mut conns = sh.conns.lock().expect("conns lock");
                conns.retain(|c| !c.is_finished());
                if conns.len() >= MAX_META_CONNS {
                    tracing::warn!(%peer, "metadata connection limit reached; refusing");
                    continue;
                }
                let s = sh.clone();
                match std::thread::Builder::new()
                    .name("meta-conn".into())
                    .spawn(move || serve(s, stream, peer))
                {
                    Ok(h) => conns.push(h),
                    Err(e) => tracing::warn!(%peer, "cannot start a connection thread: {e}"),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => {
                tracing::warn!("metadata accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn serve(sh: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    if stream.set_nonblocking(false).is_err() || stream.set_read_timeout(Some(STOP_CHECK)).is_err()
    {
        return;
    }
    let _ = stream.set_nodelay(true);
    let mut conn = match FramedConn::new_server(stream, sh.tls.clone()) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%peer, "metadata connection setup: {e}");
            return;
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::warn!(%peer, "metadata connection runtime: {e}");
            return;
        }
    };
    let mut version: Option<u16> = None;
    // A client that presented a node certificate of this hive (verified in the handshake).
    let mut peer_node = false;
    // The client's token (its digest) and what it may do; checked again while it lives.
    let mut auth: Option<([u8; 32], TokenScope)> = None;
    let mut frames = Vec::with_capacity(1);
    loop {
        if sh.stop.load(Ordering::SeqCst) {
            return;
        }
        if let Some((d, _)) = &auth {
            if let Err(why) = sh.tokens.check_digest(d) {
                // Revoked or expired while connected: the connection ends now.
                tracing::info!(%peer, "closing a metadata connection: {}", why.as_str());
                let v = version.unwrap_or(PROTOCOL_VERSION_MIN);
                let resp = Response::error(ErrorCode::BadToken, why.as_str());
                conn.queue_frame(&frame_response(v, 0, &resp));
                let _ = conn.flush();
                return;
            }
        }
        let status = match conn.read_frames(&mut frames, 1) {
            Ok(s) => s,
            Err(ConnError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                ReadStatus::Open
            }
            Err(e) => {
                match e.code() {
                    Some(code) => {
                        tracing::warn!(%peer, "metadata connection: bad input, closing: {e}");
                        let v = version.unwrap_or(PROTOCOL_VERSION_MIN);
                        let resp = Response::error(code, e.to_string());
                        conn.queue_frame(&frame_response(v, 0, &resp));
                        let _ = conn.flush();
                    }
                    None => tracing::info!(%peer, "metadata connection ended: {e}"),
                }
                return;
            }
        };
        let Some(f) = frames.pop() else {
            if status == ReadStatus::Closed {
                return;
            }
            continue;
        };
        let v = version.unwrap_or(PROTOCOL_VERSION_MIN);
        let (resp, close) = match Request::decode(f.opcode, &f.body) {
            Err(e) => (Response::error(e.code(), e.to_string()), true),
            Ok(Request::Hello {
                min_version,
                max_version,
                token,
                client_name,
            }) => {
                let nv = max_version.min(super::version::speaks());
                if version.is_some() {
                    (
                        Response::error(ErrorCode::BadRequest, "second Hello on a connection"),
                        true,
                    )
                } else if min_version > max_version || nv < min_version.max(PROTOCOL_VERSION_MIN) {
                    (
                        Response::error(
                            ErrorCode::UnsupportedVersion,
                            "no common protocol version",
                        ),
                        true,
                    )
                } else if token.is_empty() && conn.tls().is_some_and(hivefs_net::tls::is_peer) {
                    // Another node of this hive: its certificate speaks for it.
                    peer_node = true;
                    version = Some(nv);
                    (hello_ok(&sh, nv), false)
                } else {
                    match sh.tokens.check(&token) {
                        Err(why) => {
                            tracing::warn!(%peer, client = %client_name, "metadata connection: bad token: {}", why.as_str());
                            (Response::error(ErrorCode::BadToken, why.as_str()), true)
                        }
                        Ok((scope, d)) => {
                            auth = Some((d, scope));
                            version = Some(nv);
                            (hello_ok(&sh, nv), false)
                        }
                    }
                }
            }
            Ok(_) if version.is_none() => (
                Response::error(ErrorCode::Unauthenticated, "send Hello first"),
                true,
            ),
            Ok(Request::Map) => (
                Response::MapReply {
                    map: sh.map.clone(),
                },
                false,
            ),
            Ok(Request::Meta { body }) => match meta::decode::<MetaRequest>(&body) {
                Ok(req @ MetaRequest::Watch { .. })
                    if auth
                        .as_ref()
                        .is_some_and(|(_, sc)| allowed(&sh, sc, &req).is_err()) =>
                {
                    let resp = Response::MetaReply {
                        body: meta::encode(&MetaReply::Err(Errno::PERM)),
                    };
                    conn.queue_frame(&frame_response(v, f.request_id, &resp));
                    let _ = conn.flush();
                    continue;
                }
                Ok(MetaRequest::Watch { volume, client }) if !peer_node => {
                    if let Err(RaftError::NotLeader { leader }) = ensure_leader(&sh) {
                        // Invalidations are published where mutations are proposed.
                        let resp =
                            Response::error(ErrorCode::NotLeader, leader.unwrap_or_default());
                        conn.queue_frame(&frame_response(v, f.request_id, &resp));
                        let _ = conn.flush();
                        continue;
                    }
                    let digest = auth.as_ref().map(|(d, _)| *d);
                    watch_stream(
                        &sh,
                        &mut conn,
                        v,
                        f.request_id,
                        (volume, client),
                        peer,
                        digest,
                    );
                    return;
                }
                Ok(MetaRequest::Peer(PeerRequest::Raft { rpc, body })) => {
                    if !peer_node {
                        tracing::warn!(%peer, "Raft traffic from a client without a node certificate");
                        (
                            Response::error(
                                ErrorCode::Unauthenticated,
                                "Raft traffic needs a node certificate of this hive",
                            ),
                            true,
                        )
                    } else {
                        match rt.block_on(sh.raft.serve_rpc(rpc, &body)) {
                            Ok(b) => (
                                Response::MetaReply {
                                    body: meta::encode(&MetaReply::Ok(Answer::Raft(b))),
                                },
                                false,
                            ),
                            Err(e) => (Response::error(ErrorCode::BadRequest, e.to_string()), true),
                        }
                    }
                }
                Ok(MetaRequest::Peer(PeerRequest::Ping)) if peer_node => (
                    Response::MetaReply {
                        body: meta::encode(&MetaReply::Ok(Answer::Done)),
                    },
                    false,
                ),
                Ok(_) if peer_node => (
                    // A member's link carries Raft traffic only: it holds no token.
                    Response::error(ErrorCode::Unauthenticated, "a node link carries Raft only"),
                    true,
                ),
                Ok(req) => match rt.block_on(handle(
                    &sh,
                    req,
                    &auth
                        .as_ref()
                        .map_or(TokenScope::Admin, |(_, sc)| sc.clone()),
                    v,
                )) {
                    Ok(reply) => (
                        Response::MetaReply {
                            body: meta::encode(&reply),
                        },
                        false,
                    ),
                    Err(RaftError::NotLeader { leader }) => (
                        Response::error(ErrorCode::NotLeader, leader.unwrap_or_default()),
                        false,
                    ),
                    Err(e @ RaftError::NoQuorum(_)) => {
                        tracing::warn!(%peer, req = f.request_id, "{e}");
                        (Response::error(ErrorCode::NoQuorum, e.to_string()), false)
                    }
                    Err(e) => {
                        tracing::warn!(%peer, req = f.request_id, "metadata request failed: {e}");
                        (Response::error(ErrorCode::Internal, e.to_string()), false)
                    }
                },
                Err(e) => (Response::error(ErrorCode::BadRequest, e.to_string()), true),
            },
            Ok(_) => (
                Response::error(
                    ErrorCode::BadRequest,
                    "chunk requests go to the shard ports, not the metadata port",
                ),
                false,
            ),
        };
        if close {
            if let Response::Error { message, .. } = &resp {
                tracing::warn!(%peer, req = f.request_id, "metadata connection closed: {message}");
            }
        }
        conn.queue_frame(&frame_response(v, f.request_id, &resp));
        if conn.flush().is_err() || close {
            return;
        }
    }
}

fn hello_ok(sh: &Shared, version: u16) -> Response {
    Response::HelloOk {
        version,
        node_id: sh.cfg.node_id.clone(),
        shard: u16::MAX,
        shard_count: sh.cfg.shards,
        credits: 1,
    }
}

/// Serve a watch stream on this connection until it fails or the service stops: the
/// `Done` answer, then [`WatchEvent`]s in `MetaReply` frames answering `request_id`.
fn watch_stream(
    sh: &Shared,
    conn: &mut FramedConn<TcpStream>,
    version: u16,
    request_id: u64,
    (volume, client): (u32, u64),
    peer: SocketAddr,
    token: Option<[u8; 32]>,
) {
    let send = |conn: &mut FramedConn<TcpStream>, body: Vec<u8>| {
        let resp = Response::MetaReply { body };
        conn.queue_frame(&frame_response(version, request_id, &resp));
        // Ok(false): the write timed out with the client not reading.
        matches!(conn.flush(), Ok(true))
    };
    if conn
        .get_ref()
        .set_write_timeout(Some(WATCH_SEND_TIMEOUT))
        .is_err()
    {
        return;
    }
    let Some(reg) = sh.watchers.register(volume, client) else {
        tracing::warn!(%peer, "watch refused: {} watchers already", watch::MAX_WATCHERS);
        send(conn, meta::encode(&MetaReply::Err(Errno::AGAIN)));
        return;
    };
    if !send(conn, meta::encode(&MetaReply::Ok(Answer::Done))) {
        return;
    }
    tracing::debug!(%peer, volume, "watch stream started");
    let heartbeat = Duration::from_millis(WATCH_HEARTBEAT_MS);
    let mut sent = Instant::now();
    while !sh.stop.load(Ordering::SeqCst) {
        if let Some(Err(why)) = token.map(|d| sh.tokens.check_digest(&d)) {
            tracing::info!(%peer, volume, "ending a watch stream: {}", why.as_str());
            return;
        }
        let wait = heartbeat.saturating_sub(sent.elapsed()).min(STOP_CHECK);
        let ev = match reg.watcher.next(wait) {
            Some(ev) => ev,
            None if sent.elapsed() >= heartbeat => WatchEvent::Heartbeat,
            None => continue,
        };
        if let WatchEvent::Overflow = ev {
            tracing::info!(%peer, volume, "watcher fell behind: events dropped (overflow)");
        }
        if !send(conn, meta::encode(&ev)) {
            tracing::info!(%peer, volume, "watch stream ended");
            return;
        }
        sent = Instant::now();
    }
}

impl Shared {
    /// The id of volume `name`, remembered once found: a volume-scoped token names its
    /// volume, and every request of such a mount is checked against it (a store read per
    /// request otherwise). Sound because a volume is never renamed or removed (no mutation
    /// does either); whichever first does must forget the name here.
    fn volume_id(&self, name: &str) -> Option<u32> {
        if let Some(id) = self.volume_ids.lock().expect("volume ids").get(name) {
            return Some(*id);
        }
        let id = self.store.volume_id(name).ok().flatten()?;
        self.volume_ids
            .lock()
            .expect("volume ids")
            .insert(name.to_string(), id);
        Some(id)
    }

    /// Is a collection running on this node (it tells shards their epochs itself)?
    pub(super) fn gc_running(&self) -> bool {
        self.gc_running.load(Ordering::SeqCst)
    }
}

/// One shard of the hive: a shard of some node of the cluster map.
#[derive(Clone, Debug)]
struct HiveShard {
    node: u64,
    host: String,
    port: u16,
    shard: u16,
    /// Shards of its node: a chunk of bucket `b` lives on shard `b % shards` there.
    shards: u16,
}

impl HiveShard {
    fn name(&self) -> String {
        format!("node {} shard {}", self.node, self.shard)
    }

    fn owns(&self, id: &ChunkId, bucket_count: u32) -> bool {
        (id.bucket(bucket_count) % self.shards as u32) as u16 == self.shard
    }

    fn link(&self, sh: &Shared, who: &str) -> Result<Link> {
        Link::open_at(&sh.data_dir, &self.host, self.port, sh.tls.is_none(), who)
            .with_context(|| format!("{} at {}:{}", self.name(), self.host, self.port))
    }
}

/// Every shard of every node in the cluster map but the out ones (this node's own at the
/// ports it really serves). Chunks are stored where the mount that wrote them sends them,
/// so GC and fsck look at all of them.
fn hive_shards(sh: &Shared) -> Result<Vec<HiveShard>> {
    let nodes = match sh.store.query(0, &Query::Nodes)? {
        Ok(Answer::Nodes { nodes, .. }) => nodes,
        other => anyhow::bail!("cluster map: {other:?}"),
    };
    let mut out: Vec<HiveShard> = (0..sh.shard_ports.len())
        .map(|s| HiveShard {
            node: sh.cfg.raft_id,
            host: sh.cfg.listen.clone(),
            port: sh.shard_ports[s],
            shard: s as u16,
            shards: sh.shard_ports.len() as u16,
        })
        .collect();
    for n in nodes {
        if n.id == sh.cfg.raft_id || n.state == hivefs_net::placement::NodeState::Out {
            continue;
        }
        for s in 0..n.spec.shards {
            out.push(HiveShard {
                node: n.id,
                host: n.spec.host.clone(),
                port: n.spec.base_port + s,
                shard: s,
                shards: n.spec.shards,
            });
        }
    }
    Ok(out)
}

fn shard_link(sh: &Shared, shard: usize, who: &str) -> Result<Link> {
    Link::open(
        &sh.data_dir,
        &sh.cfg,
        sh.shard_ports[shard],
        sh.tls.is_none(),
        who,
    )
}

fn shard_admin(link: &mut Link, op: &ShardAdmin) -> Result<ShardAdminReply> {
    match link.call(&Request::ShardAdmin {
        body: meta::encode(op),
    })? {
        Response::ShardAdminReply { body } => match meta::decode::<ShardAdminReply>(&body)? {
            ShardAdminReply::Refused(why) => anyhow::bail!("shard refused: {why}"),
            r => Ok(r),
        },
        Response::Error { message, .. } => anyhow::bail!("shard: {message}"),
        other => anyhow::bail!("shard answered {:?}", other.opcode()),
    }
}

/// Tell every shard the GC epoch the store accepts claims from (no collection running:
/// called at start, and after a failed collection, whose windows it closes).
pub(super) async fn sync_gc_epoch(sh: &Shared) -> Result<u64> {
    let epoch = match sh.store.query(0, &Query::GcEpoch)? {
        Ok(Answer::GcEpoch(e)) => e,
        other => anyhow::bail!("gc epoch: {other:?}"),
    };
    for shard in 0..sh.shard_ports.len() {
        let mut link = shard_link(sh, shard, "gc epoch")?;
        shard_admin(&mut link, &ShardAdmin::SetGcEpoch { epoch })?;
    }
    Ok(epoch)
}

/// After a failed collection: `EndGc` of the current epoch on every shard of the hive
/// that can be reached (a window left open only records claims; this frees it).
fn end_windows(sh: &Shared) {
    let epoch = match sh.store.query(0, &Query::GcEpoch) {
        Ok(Ok(Answer::GcEpoch(e))) => e,
        _ => return,
    };
    for s in hive_shards(sh).unwrap_or_default() {
        if let Ok(mut link) = s.link(sh, "gc cleanup") {
            let _ = shard_admin(&mut link, &ShardAdmin::EndGc { epoch });
        }
    }
}

/// One collection (DESIGN.md §3, epochs and claims, no clocks):
/// 1. a new GC epoch through Raft: from now on a commit needs a claim from it;
/// 2. every shard stamps claims with it and records each id claimed from now on;
/// 3. the mark: every chunk a live extent references, read after a read barrier (every
///    commit accepted before step 1 is in it; every later one used a claim recorded in 2);
/// 4. the sweep: each shard lists its chunks, hears which of them the mark found live
///    (`MarkedLive`: fsck's stale rule counts from there), and removes the unmarked ones
///    it has not seen claimed since step 2;
/// 5. the shards stop recording.
///
/// A shard that restarts in between has lost its record and refuses the sweep; the
/// collection then fails and nothing is removed there.
async fn run_gc(sh: &Shared) -> Result<GcReport> {
    struct Running<'a>(&'a AtomicBool);
    impl Drop for Running<'_> {
        fn drop(&mut self) {
            self.0.store(false, Ordering::SeqCst);
        }
    }
    if sh.gc_running.swap(true, Ordering::SeqCst) {
        anyhow::bail!("a collection is already running");
    }
    let _running = Running(&sh.gc_running);
    let client = u64::from_le_bytes(crate::config::random_bytes::<8>()?) | 1;
    let cmd = MetaCommand {
        volume: 0,
        client,
        seq: 1,
        acked_below: 1,
        now: Timespec::now(),
        op: Mutation::AdvanceGcEpoch,
    };
    let out = sh.raft.write(meta::encode(&cmd)).await?;
    let epoch = match meta::decode::<MetaReply>(&out)? {
        Ok(Answer::GcEpoch(e)) => e,
        other => anyhow::bail!("advancing the GC epoch: {other:?}"),
    };
    // Every shard of the hive records claims before the mark begins (a node that cannot
    // be reached fails the collection: nothing is swept anywhere).
    let mut links = Vec::new();
    for s in hive_shards(sh)? {
        let mut link = s.link(sh, "gc")?;
        shard_admin(&mut link, &ShardAdmin::BeginGc { epoch }).with_context(|| s.name())?;
        links.push(link);
    }
    sh.raft.read_barrier().await?;
    let marked = sh.store.referenced_levels()?;
    let mut r = GcReport {
        epoch,
        referenced_chunks: marked.len() as u64,
        ..Default::default()
    };
    for link in links.iter_mut() {
        let mut after: Option<Vec<u8>> = None;
        let mut doomed = Vec::new();
        loop {
            let (ids, more) = match shard_admin(
                link,
                &ShardAdmin::ListIds {
                    after: after.clone(),
                    max: meta::MAX_ADMIN_IDS,
                },
            )? {
                ShardAdminReply::Listed { ids, more, .. } => (ids, more),
                other => anyhow::bail!("list ids answered {other:?}"),
            };
            let ids = meta::split_ids(&ids).context("bad id list from a shard")?;
            r.stored_chunks += ids.len() as u64;
            after = ids.last().map(|l| l.0.to_vec());
            let (live, dead): (Vec<ChunkId>, Vec<ChunkId>) =
                ids.into_iter().partition(|id| marked.contains_key(id));
            // fsck's stale clock of a live chunk restarts at this mark.
            for batch in live.chunks(4096) {
                shard_admin(
                    link,
                    &ShardAdmin::MarkedLive {
                        epoch,
                        ids: meta::join_ids(batch),
                    },
                )?;
            }
            doomed.extend(dead);
            if !more {
                break;
            }
        }
        for batch in doomed.chunks(4096) {
            match shard_admin(
                link,
                &ShardAdmin::Sweep {
                    epoch,
                    ids: meta::join_ids(batch),
                },
            )? {
                ShardAdminReply::Swept {
                    removed,
                    spared,
                    bytes,
                } => {
                    r.swept_chunks += removed;
                    r.spared_chunks += spared;
                    r.swept_bytes += bytes;
                }
                other => anyhow::bail!("sweep answered {other:?}"),
            }
        }
        shard_admin(link, &ShardAdmin::EndGc { epoch })?;
    }
    tracing::info!(?r, "garbage collection done");
    Ok(r)
}

/// Check the namespace, then that every referenced chunk is held by its shard (and with
/// `verify`, that it reads back hashing to its id). Asks the shards over their own ports,
/// as any client would.
fn fsck(sh: &Shared, verify: bool) -> Result<FsckReport> {
    let mut r = FsckReport {
        findings: sh.store.check()?,
        ..Default::default()
    };
    (r.volumes, r.inodes) = sh.store.counts()?;
    let refs = sh.store.referenced_levels()?;
    r.referenced_chunks = refs.len() as u64;
    // Garbage must not outlive two collections: after collection E completes, every
    // unreferenced chunk last claimed before E is gone. One epoch of slack more (a
    // collection may fail midway): what was last claimed before E-1 is a finding.
    let epoch = match sh.store.query(0, &Query::GcEpoch)? {
        Ok(Answer::GcEpoch(e)) => e,
        other => anyhow::bail!("gc epoch: {other:?}"),
    };
    // Each referenced chunk must be held (and with `verify`, read back correct) by the
    // owning shard of as many nodes as its level asks, at that level or higher
    // (`Holding`: not a claim).
    let mut held: std::collections::HashMap<ChunkId, u64> = std::collections::HashMap::new();
    let bucket_count = sh.cfg.bucket_count;
    for s in hive_shards(sh)? {
        let shard = s.name();
        let mut link = s.link(sh, "fsck")?;
        if epoch >= 2 {
            let before_epoch = epoch - 1;
            let mut after: Option<Vec<u8>> = None;
            loop {
                let (ids, more) = match shard_admin(
                    &mut link,
                    &ShardAdmin::ListStale {
                        before_epoch,
                        after: after.clone(),
                        max: meta::MAX_ADMIN_IDS,
                    },
                )? {
                    ShardAdminReply::Ids { ids, more } => (ids, more),
                    other => anyhow::bail!("{shard}: list stale answered {other:?}"),
                };
                let ids = meta::split_ids(&ids).context("bad id list from a shard")?;
                after = ids.last().map(|l| l.0.to_vec());
                for id in ids.iter().filter(|id| !refs.contains_key(id)) {
                    r.stale_chunks += 1;
                    r.findings.push(format!(
                        "chunk {id} on {shard} is unreferenced and unclaimed since \
                         before epoch {before_epoch}: it outlived two collections"
                    ));
                }
                if !more {
                    break;
                }
            }
        }
        if let Response::StatsReply { json } = link.call(&Request::Stats)? {
            let v: serde_json::Value = serde_json::from_str(&json)?;
            r.stored_chunks += v["chunks"].as_u64().unwrap_or(0);
        }
        let ids: Vec<ChunkId> = refs
            .keys()
            .filter(|id| s.owns(id, bucket_count))
            .copied()
            .collect();
        for batch in ids.chunks(meta::MAX_ADMIN_IDS as usize) {
            let levels = match shard_admin(
                &mut link,
                &ShardAdmin::Holding {
                    ids: meta::join_ids(batch),
                },
            )? {
                ShardAdminReply::Held { levels, .. } if levels.len() == batch.len() => levels,
                other => anyhow::bail!("{shard}: holding answered {other:?}"),
            };
            for (id, level) in batch.iter().zip(levels) {
                // A copy below the chunk's level does not count (a node that held it
                // before the level was raised and is no longer a replica: harmless).
                if level == 0 || level < refs[id] {
                    continue;
                }
                *held.entry(*id).or_default() += 1;
                if !verify {
                    continue;
                }
                match link.call(&Request::Get { id: *id })? {
                    Response::GetReply {
                        chunk: Some((codec, raw_len, data)),
                    } => {
                        match chunk::verify(&sh.map.dedupe_key, id, codec, &data, raw_len as usize)
                        {
                            Ok(_) => r.verified_chunks += 1,
                            Err(e) => r
                                .findings
                                .push(format!("chunk {id} on {shard} does not verify: {e}")),
                        }
                    }
                    Response::GetReply { chunk: None } => r.findings.push(format!(
                        "chunk {id}: has said yes on {shard}, get found nothing"
                    )),
                    Response::Error { message, .. } => r
                        .findings
                        .push(format!("chunk {id} on {shard} unreadable: {message}")),
                    other => anyhow::bail!("{shard}: get answered {:?}", other.opcode()),
                }
            }
        }
    }
    // The copies each chunk should have: its level (the most copies of the volumes
    // referencing it), or every eligible node where there are fewer.
    let eligible = sh.hive_map.get().eligible_count().max(1) as u64;
    for (id, level) in refs.iter() {
        let wanted = (*level as u64).min(eligible);
        r.copies_wanted = r.copies_wanted.max(wanted);
        match held.get(id).copied().unwrap_or(0) {
            0 => r
                .findings
                .push(format!("chunk {id} is referenced but no node holds it")),
            n if n < wanted => {
                r.under_replicated += 1;
                r.findings
                    .push(format!("chunk {id} is held by {n} node(s), not {wanted}"));
            }
            _ => {}
        }
    }
    Ok(r)
}

/// Propose a mutation through Raft, publish what it invalidates, and answer; with
/// `in_dir`, add the attributes of the directory it changed, read after it applied.
pub(super) async fn mutate(
    sh: &Shared,
    cmd: MetaCommand,
    in_dir: bool,
) -> Result<MetaReply, RaftError> {
    match super::version::admits(sh, &cmd.op) {
        Ok(Ok(())) => {}
        // Newer than what every member can read: the client sends the older form.
        Ok(Err(e)) => return Ok(Err(e)),
        Err(e) => return Err(RaftError::Unavailable(format!("metadata store: {e:#}"))),
    }
    let mut cmd = MetaCommand {
        now: Timespec::now(),
        ..cmd
    };
    if let Mutation::CreateVolume { copies, .. } = &mut cmd.op {
        // 0: the hive's default, decided here so that the log holds the number.
        if *copies == 0 {
            *copies = sh.cfg.copies.max(1);
        }
    }
    if let Mutation::CommitWrite { ino, lease, .. }
    | Mutation::CommitWriteThenSet { ino, lease, .. } = cmd.op
    {
        // The first check of a write lease (`leases.rs`): live, and this client's. (Leases
        // not started in this term hold nothing: refused, and the client reclaims.)
        if lease != 0 {
            ensure_leader(sh)?;
            enter_lock_term(sh)?;
            if !sh.locks.may_commit(cmd.volume, cmd.client, ino, lease) {
                return Ok(Err(Errno::STALE));
            }
        }
    }
    let out = sh.raft.write(meta::encode(&cmd)).await?;
    let reply = meta::decode::<MetaReply>(&out)
        .map_err(|e| RaftError::Unavailable(format!("store answered badly: {e}")))?;
    // Before the answer goes out: a client that hears "done" and tells another mount
    // finds the invalidation already on its way there.
    if let Ok(answer) = &reply {
        if let Some(inv) = watch::invalidations(&cmd.op, answer) {
            sh.watchers.publish(cmd.volume, cmd.client, &inv);
        }
    }
    if matches!(
        cmd.op,
        Mutation::CreateToken { .. } | Mutation::RevokeToken { .. }
    ) {
        // Here at once; the other nodes reload within a second (`health.rs`).
        if let Err(e) = sh.tokens.refresh(&sh.store) {
            tracing::warn!("reloading the token table: {e:#}");
        }
    }
    let (true, Ok(Answer::Attr(attr)), Some(dir)) = (in_dir, &reply, cmd.op.dir()) else {
        return Ok(reply);
    };
    // Read from the store directly: the write above has applied, so this sees it (and
    // perhaps later writes: never an older state).
    match sh.store.query(cmd.volume, &Query::GetAttr { ino: dir }) {
        Ok(Ok(Answer::Attr(d))) => Ok(Ok(Answer::InDir {
            attr: attr.clone(),
            dir: d,
        })),
        // The directory is gone already (removed by a later write): no attributes to give.
        _ => Ok(reply),
    }
}

/// Install the hive's CA rotation here if it is not yet (see `config::install_ca`).
fn follow_ca_rotation(sh: &Shared) {
    let rot = match sh.store.ca_rotation() {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => return tracing::warn!("reading the CA rotation: {e:#}"),
    };
    match crate::config::install_ca(&sh.data_dir, &rot) {
        Ok(true) => tracing::info!(
            ca = %hivefs_net::tls::fingerprint_pem(&rot.ca_cert_pem).unwrap_or_default(),
            "hive CA rotated: new node certificate from the new CA, presented with the cross certificate"
        ),
        Ok(false) => {}
        Err(e) => tracing::warn!("installing the hive's CA rotation: {e:#}"),
    }
}

/// Tell the lock service the term this leader leads (see `LockService::enter_term`);
/// returns it.
fn enter_lock_term(sh: &Shared) -> Result<u64, RaftError> {
    let term = sh.raft.term();
    sh.locks
        .enter_term(term)
        .map_err(|e| RaftError::Unavailable(format!("lock service: {e:#}")))?;
    Ok(term)
}

/// Start the write leases of `term` (entered) if they are not: a new lease epoch through
/// Raft first (see `leases.rs`). Only a grant needs it: an empty table answers opens and
/// refuses commits without one.
async fn ensure_leases(sh: &Shared, term: u64) -> Result<(), RaftError> {
    if sh.locks.leases_started(term) {
        return Ok(());
    }
    let fail = |e: String| RaftError::Unavailable(format!("lease epoch: {e}"));
    let cmd = MetaCommand {
        now: Timespec::now(),
        ..one_off_command(Mutation::NewLeaseEpoch).map_err(|e| fail(format!("{e:#}")))?
    };
    let out = sh.raft.write(meta::encode(&cmd)).await?;
    match meta::decode::<MetaReply>(&out) {
        Ok(Ok(Answer::LeaseEpoch(epoch))) => {
            sh.locks.start_leases(term, epoch);
            Ok(())
        }
        other => Err(fail(format!("answered {other:?}"))),
    }
}

/// Push the lease recalls the lock service asked for to their holders' watch streams.
fn push_recalls(sh: &Shared) {
    for (volume, client, ino) in sh.locks.take_pushes() {
        sh.watchers.recall(volume, client, ino);
    }
}

/// Raise `ino`'s fence to `token` through Raft, then tell the lock service.
async fn fence(sh: &Shared, volume: u32, ino: u64, token: u64) -> Result<MetaReply, RaftError> {
    let cmd = MetaCommand {
        volume,
        ..one_off_command(Mutation::Fence { ino, token })
            .map_err(|e| RaftError::Unavailable(format!("fence: {e:#}")))?
    };
    let r = mutate(sh, cmd, false).await?;
    if r.is_ok() {
        tracing::info!(volume, ino, token, "write lease fenced");
        sh.locks.fenced(volume, ino, token);
    }
    Ok(r)
}

/// [`LockOp::Lease`]: grant, recall (`AGAIN`), or fence a lapsed lease and grant.
async fn lease(sh: &Shared, r: &LockRequest, ino: u64, term: u64) -> Result<MetaReply, RaftError> {
    ensure_leases(sh, term).await?;
    for _ in 0..2 {
        match sh.locks.lease(r) {
            Ok(reply) => return Ok(reply),
            Err(Gate::Wait | Gate::Clear) => return Ok(Err(Errno::AGAIN)),
            Err(Gate::Fence(token)) => {
                if let Err(e) = fence(sh, r.volume, ino, token).await? {
                    return Ok(Err(e));
                }
            }
        }
    }
    Ok(Err(Errno::AGAIN))
}

/// What the cluster map records of this node.
fn self_spec(sh: &Shared, meta_port: u16) -> NodeSpec {
    // Whole GiB rounded up, as `hive join` computes it from --size.
    let device_gib = sh
        .device
        .total_bytes
        .load(Ordering::Relaxed)
        .div_ceil(1 << 30);
    NodeSpec {
        name: sh.cfg.node_id.clone(),
        host: sh.cfg.advertise_host().to_string(),
        meta_port,
        base_port: sh.cfg.base_port,
        shards: sh.cfg.shards,
        zone: sh.cfg.zone.clone(),
        weight: sh
            .cfg
            .weight
            .unwrap_or(device_gib.clamp(1, u32::MAX as u64) as u32),
    }
}

/// The node that leads records itself in the cluster map if it is not there (the first
/// node of a hive, on its first start; nodes that join are recorded by `join`). Its map id
/// must be its Raft id.
async fn register_self(sh: &Shared, meta_port: u16) -> Result<()> {
    // Only a hive's first node records itself, while it is the only voter: then it has
    // applied its whole log (`MetaRaft::open` waited) and is its own quorum.
    if !sh.cfg.bootstrap || !sh.raft.is_sole_voter_leader() {
        return Ok(());
    }
    let nodes = match sh.store.query(0, &Query::Nodes)? {
        Ok(Answer::Nodes { nodes, .. }) => nodes,
        other => anyhow::bail!("cluster map query answered {other:?}"),
    };
    if nodes.iter().any(|n| n.id == sh.cfg.raft_id) {
        return Ok(());
    }
    let spec = self_spec(sh, meta_port);
    if let Err(e) = spec.validate() {
        anyhow::bail!("this node's map entry {spec:?} is not valid ({e}): check node_id, advertise and zone in hive.toml");
    }
    let cmd = one_off_command(Mutation::AddNode(spec))?;
    match mutate(sh, cmd, false).await {
        Ok(Ok(Answer::Node { id, .. })) if id == sh.cfg.raft_id => Ok(()),
        Ok(Ok(Answer::Node { id, .. })) => anyhow::bail!(
            "the cluster map gave this node id {id}, but it is Raft member {}",
            sh.cfg.raft_id
        ),
        other => anyhow::bail!("recording this node answered {other:?}"),
    }
}

/// How often the placement map is read from the store for the shards.
const MAP_PUBLISH_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// Publish the placement map this node's store holds (group 0 `nodes`) to its shards,
/// if it is newer than what they have. Every node does this from its own applied state.
pub(super) fn publish_map(store: &MetaStore, bucket_count: u32, cell: &MapCell) {
    match store.query(0, &Query::Nodes) {
        Ok(Ok(Answer::Nodes { map_epoch, nodes })) => {
            let map = hivefs_net::meta::hive_map(map_epoch, bucket_count, &nodes);
            match map.validate() {
                Ok(()) => {
                    let epoch = map.epoch;
                    if cell.publish(map) {
                        tracing::info!(epoch, nodes = nodes.len(), "placement map");
                    }
                }
                Err(e) => tracing::error!("the cluster map in the store is not valid: {e}"),
            }
        }
        other => tracing::warn!("reading the cluster map: {other:?}"),
    }
}

/// `Ok` while this node leads its metadata cluster, else `NotLeader` naming the leader
/// it knows of.
pub(super) fn ensure_leader(sh: &Shared) -> Result<(), RaftError> {
    let v = sh.raft.view();
    if v.leader == Some(v.id) {
        Ok(())
    } else {
        Err(RaftError::NotLeader {
            leader: v.leader_addr,
        })
    }
}

/// A one-off client id for a mutation the node makes itself (its one mutation is seq 1).
pub(super) fn one_off_command(op: Mutation) -> Result<MetaCommand> {
    Ok(MetaCommand {
        volume: 0,
        client: u64::from_le_bytes(crate::config::random_bytes::<8>()?) | 1,
        seq: 1,
        acked_below: 1,
        now: Timespec::default(),
        op,
    })
}

/// [`PeerRequest::Join`]: record the node in the cluster map and hand it what it needs
/// to serve in this hive (answered by the leader only: the map changes through Raft).
async fn join(sh: &Shared, spec: NodeSpec, version: u16) -> Result<MetaReply, RaftError> {
    if sh.tls.is_none() {
        // Members authenticate each other by certificate: a plain-TCP hive cannot grow.
        return Ok(Err(Errno::NOTSUP));
    }
    ensure_leader(sh)?;
    let fail = |e: anyhow::Error| RaftError::Unavailable(format!("join: {e:#}"));
    if let Err(e) = super::version::may_join(sh, version, &spec.name).map_err(fail)? {
        return Ok(Err(e));
    }
    // Every leader is in the map (the first node records itself as node 1 on its first
    // start, just after it starts serving): until then a joiner could take its id.
    sh.raft.read_barrier().await?;
    match sh.store.query(0, &Query::Nodes) {
        Ok(Ok(Answer::Nodes { nodes, .. })) if nodes.iter().any(|n| n.id == sh.cfg.raft_id) => {}
        Ok(_) => return Ok(Err(Errno::AGAIN)),
        Err(e) => return Err(fail(e)),
    }
    let cmd = one_off_command(Mutation::AddNode(spec.clone())).map_err(fail)?;
    let (id, map_epoch) = match mutate(sh, cmd, false).await? {
        Ok(Answer::Node { id, map_epoch }) => (id, map_epoch),
        Ok(other) => return Err(fail(anyhow::anyhow!("unexpected answer {other:?}"))),
        Err(e) => return Ok(Err(e)),
    };
    let read = |f: &str| {
        std::fs::read_to_string(sh.data_dir.join(f))
            .with_context(|| format!("reading {f}"))
            .map_err(fail)
    };
    let grant = JoinGrant {
        id,
        map_epoch,
        ca_cert_pem: read("ca.pem")?,
        ca_key_pem: read("ca.key")?,
        dedupe_key: sh.cfg.dedupe_key.clone(),
        bucket_count: sh.cfg.bucket_count,
        copies: sh.cfg.copies,
        min_copies: sh.cfg.min_copies,
    };
    tracing::info!(id, name = %spec.name, addr = %spec.meta_addr(), map_epoch, "node joined the cluster map");
    Ok(Ok(Answer::Joined(grant)))
}

/// [`PeerRequest::Admit`]: make a node of the map a Raft member (learner until caught
/// up, then a voter while there are fewer than `MAX_VOTERS`).
async fn admit(sh: &Shared, id: u64, version: u16) -> Result<MetaReply, RaftError> {
    ensure_leader(sh)?;
    // No raise of the log version between the check below and the node's admission.
    let _serial = sh.membership.lock().await;
    sh.raft.read_barrier().await?;
    let nodes = match sh.store.query(0, &Query::Nodes) {
        Ok(Ok(Answer::Nodes { nodes, .. })) => nodes,
        Ok(_) => return Ok(Err(Errno::IO)),
        Err(e) => return Err(RaftError::Unavailable(format!("metadata store: {e:#}"))),
    };
    let Some(NodeEntry { spec, .. }) = nodes.into_iter().find(|n| n.id == id) else {
        return Ok(Err(Errno::NOENT));
    };
    let fail = |e: anyhow::Error| RaftError::Unavailable(format!("admit: {e:#}"));
    if let Err(e) = super::version::may_join(sh, version, &spec.name).map_err(fail)? {
        return Ok(Err(e));
    }
    let voter = sh.raft.add_member(id, spec.meta_addr()).await?;
    tracing::info!(id, name = %spec.name, voter, "node admitted to the metadata cluster");
    Ok(Ok(Answer::Admitted { voter }))
}

/// Answer one metadata request. `Err` is a service failure (no leader, storage); an
/// errno is a normal answer.
/// `version`: the protocol version the request's connection negotiated.
async fn handle(
    sh: &Shared,
    req: MetaRequest,
    scope: &TokenScope,
    version: u16,
) -> Result<MetaReply, RaftError> {
    if let Err(e) = req.validate() {
        return Ok(Err(e));
    }
    if let Err(e) = allowed(sh, scope, &req) {
        return Ok(Err(e));
    }
    match req {
        MetaRequest::Lock(r) => {
            // Lock state lives in the leader's memory (see `locks.rs`): only the leader
            // answers, and with other voters around only after confirming it still leads.
            ensure_leader(sh)?;
            if !sh.raft.is_sole_voter_leader() {
                sh.raft.read_barrier().await?;
            }
            let term = enter_lock_term(sh)?;
            let reply = match r.op {
                LockOp::Lease { ino, .. } => lease(sh, &r, ino, term).await?,
                _ => sh.locks.handle(&r),
            };
            push_recalls(sh);
            Ok(reply)
        }
        MetaRequest::Query {
            volume,
            query: query @ Query::Open { ino, client, .. },
        } => {
            // The leader recalls other clients' write leases before the open reads
            // (`leases.rs`); the read itself is a linearizable query.
            ensure_leader(sh)?;
            sh.raft.read_barrier().await?;
            enter_lock_term(sh)?;
            for _ in 0..2 {
                match sh.locks.open(volume, client, ino) {
                    Gate::Clear => return local_query(sh, volume, &query),
                    Gate::Wait => {
                        push_recalls(sh);
                        return Ok(Err(Errno::AGAIN));
                    }
                    Gate::Fence(token) => {
                        if let Err(e) = fence(sh, volume, ino, token).await? {
                            return Ok(Err(e));
                        }
                    }
                }
            }
            Ok(Err(Errno::AGAIN))
        }
        MetaRequest::Peer(PeerRequest::Join(spec)) => join(sh, spec, version).await,
        MetaRequest::Peer(PeerRequest::Admit { id }) => admit(sh, id, version).await,
        MetaRequest::Peer(PeerRequest::Ping) => Ok(Ok(Answer::Done)),
        // Served by `serve` on node links only.
        MetaRequest::Peer(PeerRequest::Raft { .. }) => Ok(Err(Errno::INVAL)),
        // The leader's own, once every member speaks the version (`version.rs`).
        MetaRequest::Mutate(cmd) | MetaRequest::MutateInDir(cmd)
            if matches!(cmd.op, Mutation::SetLogVersion { .. }) =>
        {
            Ok(Err(Errno::PERM))
        }
        MetaRequest::Mutate(cmd) => mutate(sh, cmd, false).await,
        MetaRequest::MutateInDir(cmd) => mutate(sh, cmd, true).await,
        // A watch is a connection of its own (served by `serve`), never a single answer.
        MetaRequest::Watch { .. } => Ok(Err(Errno::INVAL)),
        MetaRequest::Query {
            query: Query::Gc, ..
        } => {
            // The leader collects (a follower points the caller there).
            ensure_leader(sh)?;
            match run_gc(sh).await {
                Ok(r) => Ok(Ok(Answer::Gc(r))),
                Err(e) => {
                    // Close the failed collection's windows where they opened (best
                    // effort), and make sure this node's shards stamp the current epoch.
                    end_windows(sh);
                    if let Err(e2) = sync_gc_epoch(sh).await {
                        tracing::warn!("after a failed collection, syncing the epoch: {e2:#}");
                    }
                    Err(RaftError::Unavailable(format!("gc: {e:#}")))
                }
            }
        }
        MetaRequest::Query {
            query: Query::Members,
            ..
        } => {
            let v = sh.raft.view();
            Ok(Ok(Answer::Members {
                this: v.id,
                leader: v.leader,
                term: v.term,
                last_applied: v.last_applied,
                members: v
                    .members
                    .into_iter()
                    .map(|(id, addr, voter)| meta::Member { id, addr, voter })
                    .collect(),
            }))
        }
        MetaRequest::Query {
            query: Query::Fsck { verify },
            ..
        } => {
            sh.raft.read_barrier().await?;
            let r = fsck(sh, verify).map_err(|e| RaftError::Unavailable(format!("fsck: {e:#}")))?;
            Ok(Ok(Answer::Fsck(r)))
        }
        MetaRequest::Query { volume, query } => {
            sh.raft.read_barrier().await?;
            local_query(sh, volume, &query)
        }
        MetaRequest::StaleQuery {
            volume,
            query,
            max_stale_ms,
        } => {
            if matches!(query, Query::Fsck { .. } | Query::Gc | Query::Members) {
                return Ok(Err(Errno::INVAL));
            }
            let stale_ms = match sh.raft.staleness_ms() {
                None => {
                    sh.raft.read_barrier().await?;
                    0
                }
                Some(ms) if ms <= max_stale_ms => ms,
                Some(_) => return Ok(Err(Errno::AGAIN)),
            };
            Ok(
                local_query(sh, volume, &query)?.map(|answer| Answer::Stale {
                    stale_ms,
                    answer: Box::new(answer),
                }),
            )
        }
    }
}

/// May a token of `scope` make this request? `PERM` if not.
///
/// - admin: everything;
/// - host: anything on volumes (their namespace, locks, watches; listing and looking up
///   volumes), nothing of the hive's own (collections, fsck, nodes, tokens, joins, new
///   volumes);
/// - volume: that volume only (`read_only`: no changes), and looking it up by name.
fn allowed(sh: &Shared, scope: &TokenScope, req: &MetaRequest) -> Result<(), Errno> {
    let hive_op = |m: &Mutation| {
        matches!(
            m,
            Mutation::CreateVolume { .. }
                | Mutation::AdvanceGcEpoch
                | Mutation::AddNode(_)
                | Mutation::SetNodeState { .. }
                | Mutation::CreateToken { .. }
                | Mutation::RevokeToken { .. }
                | Mutation::Fence { .. }
                | Mutation::NewLeaseEpoch
                | Mutation::RotateCa(_)
                | Mutation::SetLogVersion { .. }
        )
    };
    let hive_query = |q: &Query| matches!(q, Query::Gc | Query::Fsck { .. } | Query::Tokens);
    match scope {
        TokenScope::Admin => Ok(()),
        TokenScope::Host => match req {
            MetaRequest::Mutate(c) | MetaRequest::MutateInDir(c) if hive_op(&c.op) => {
                Err(Errno::PERM)
            }
            MetaRequest::Query { query, .. } | MetaRequest::StaleQuery { query, .. }
                if hive_query(query) =>
            {
                Err(Errno::PERM)
            }
            MetaRequest::Peer(_) => Err(Errno::PERM),
            _ => Ok(()),
        },
        TokenScope::Volume { name, read_only } => {
            let Some(vid) = sh.volume_id(name) else {
                return Err(Errno::PERM);
            };
            let ok = match req {
                MetaRequest::Query { volume, query }
                | MetaRequest::StaleQuery { volume, query, .. } => {
                    !hive_query(query)
                        && (*volume == vid
                            || matches!(query, Query::Volume { name: n } if n == name)
                            || matches!(query, Query::Members | Query::Nodes))
                }
                MetaRequest::Mutate(c) | MetaRequest::MutateInDir(c) => {
                    !read_only && c.volume == vid && !hive_op(&c.op)
                }
                MetaRequest::Lock(r) => r.volume == vid,
                MetaRequest::Watch { volume, .. } => *volume == vid,
                MetaRequest::Peer(_) => false,
            };
            if ok {
                Ok(())
            } else {
                Err(Errno::PERM)
            }
        }
    }
}

/// Answer a query from this node's store (after whatever barrier the caller needed).
fn local_query(sh: &Shared, volume: u32, query: &Query) -> Result<MetaReply, RaftError> {
    let mut reply = sh
        .store
        .query(volume, query)
        .map_err(|e| RaftError::Unavailable(format!("metadata store: {e:#}")))?;
    if let (Query::StatFs, Ok(Answer::StatFs(s))) = (query, &mut reply) {
        let total = sh.device.total_bytes.load(Ordering::Relaxed);
        let used: u64 = sh
            .device
            .used_bytes
            .iter()
            .map(|u| u.load(Ordering::Relaxed))
            .sum();
        s.device_bytes = total;
        s.device_free_bytes = total.saturating_sub(used);
    }
    Ok(reply)
}
