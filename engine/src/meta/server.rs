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

use super::raft::{Applier, MetaRaft, RaftError};
use super::store::MetaStore;
use crate::admin::Link;
use crate::config::NodeConfig;
use anyhow::{Context, Result};
use hivefs_net::chunk::{self, ChunkId};
use hivefs_net::conn::{ConnError, FramedConn, ReadStatus};
use hivefs_net::frame::{PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};
use hivefs_net::meta::{
    self, Answer, FsckReport, MetaCommand, MetaReply, MetaRequest, Mutation, Query, Timespec,
    VolumeInfo,
};
use hivefs_net::proto::{frame_response, ClusterMap, ErrorCode, Request, Response, MAX_BATCH_IDS};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Most metadata connections served at once (each is a thread).
pub const MAX_META_CONNS: usize = 512;
/// How often an idle connection thread looks at the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(250);

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

struct Shared {
    store: Arc<MetaStore>,
    data_dir: std::path::PathBuf,
    shard_ports: Vec<u16>,
    raft: MetaRaft,
    cfg: NodeConfig,
    map: ClusterMap,
    tls: Option<Arc<rustls::ServerConfig>>,
    device: Arc<DeviceUse>,
    stop: AtomicBool,
    conns: Mutex<Vec<JoinHandle<()>>>,
}

/// A running metadata service.
pub struct MetaServer {
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
    pub port: u16,
}

/// Where the metadata service keeps its files.
pub fn meta_dir(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("meta")
}

impl MetaServer {
    /// Open the store and the Raft log under `data_dir/meta`, replay what the log holds,
    /// bind `cfg`'s metadata port and start serving.
    pub fn start(
        data_dir: &Path,
        cfg: &NodeConfig,
        tls: Option<Arc<rustls::ServerConfig>>,
        map: ClusterMap,
        device: Arc<DeviceUse>,
        shard_ports: Vec<u16>,
    ) -> Result<MetaServer> {
        let dir = meta_dir(data_dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let store = Arc::new(MetaStore::open(&dir.join("namespace.redb"))?);
        let addr: SocketAddr = format!("{}:{}", cfg.listen, cfg.meta_port())
            .parse()
            .with_context(|| format!("bad metadata address {}:{}", cfg.listen, cfg.meta_port()))?;
        let listener =
            TcpListener::bind(addr).with_context(|| format!("binding the metadata port {addr}"))?;
        let port = listener.local_addr()?.port();
        let raft = block_on(MetaRaft::open(
            &dir,
            1,
            format!("{}:{port}", cfg.listen),
            Arc::new(StoreApplier(store.clone())),
        ))
        .map_err(|e| anyhow::anyhow!("starting the metadata log: {e}"))?;
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            store,
            data_dir: data_dir.to_path_buf(),
            shard_ports,
            raft,
            cfg: cfg.clone(),
            map,
            tls,
            device,
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
        });
        let sh = shared.clone();
        let accept = std::thread::Builder::new()
            .name("meta-accept".into())
            .spawn(move || accept_loop(sh, listener))?;
        tracing::info!(port, "metadata service serving");
        Ok(MetaServer {
            shared,
            accept: Some(accept),
            port,
        })
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
            block_on(handle(&self.shared, req)).map_err(|e| anyhow::anyhow!("{e}"))
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
fn block_on<F: std::future::Future>(f: F) -> F::Output {
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
    let mut frames = Vec::with_capacity(1);
    loop {
        if sh.stop.load(Ordering::SeqCst) {
            return;
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
                let nv = max_version.min(PROTOCOL_VERSION_MAX);
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
                } else if !sh.cfg.token_ok(&token) {
                    tracing::warn!(%peer, client = %client_name, "metadata connection: bad token");
                    (
                        Response::error(ErrorCode::BadToken, "token not accepted"),
                        true,
                    )
                } else {
                    version = Some(nv);
                    (
                        Response::HelloOk {
                            version: nv,
                            node_id: sh.cfg.node_id.clone(),
                            shard: u16::MAX,
                            shard_count: sh.cfg.shards,
                            credits: 1,
                        },
                        false,
                    )
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
                Ok(req) => match rt.block_on(handle(&sh, req)) {
                    Ok(reply) => (
                        Response::MetaReply {
                            body: meta::encode(&reply),
                        },
                        false,
                    ),
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

/// Check the namespace, then that every referenced chunk is held by its shard (and with
/// `verify`, that it reads back hashing to its id). Asks the shards over their own ports,
/// as any client would.
fn fsck(sh: &Shared, verify: bool) -> Result<FsckReport> {
    let mut r = FsckReport {
        findings: sh.store.check()?,
        ..Default::default()
    };
    (r.volumes, r.inodes) = sh.store.counts()?;
    let refs = sh.store.referenced_chunks()?;
    r.referenced_chunks = refs.len() as u64;
    let mut by_shard: Vec<Vec<ChunkId>> = vec![Vec::new(); sh.shard_ports.len()];
    for id in refs {
        by_shard[sh.map.shard_of(&id) as usize].push(id);
    }
    let insecure = sh.tls.is_none();
    for (shard, ids) in by_shard.iter().enumerate() {
        let port = sh.shard_ports[shard];
        let mut link = Link::open(&sh.data_dir, &sh.cfg, port, insecure, "fsck")?;
        if let Response::StatsReply { json } = link.call(&Request::Stats)? {
            let v: serde_json::Value = serde_json::from_str(&json)?;
            r.stored_chunks += v["chunks"].as_u64().unwrap_or(0);
        }
        for batch in ids.chunks(MAX_BATCH_IDS) {
            let present = match link.call(&Request::Has {
                ids: batch.to_vec(),
            })? {
                Response::HasReply { present, .. } if present.len() == batch.len() => present,
                other => anyhow::bail!("shard {shard}: has answered {:?}", other.opcode()),
            };
            for (id, p) in batch.iter().zip(present) {
                if !p {
                    r.findings.push(format!(
                        "chunk {id} is referenced but shard {shard} does not hold it"
                    ));
                    continue;
                }
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
                                .push(format!("chunk {id} on shard {shard} does not verify: {e}")),
                        }
                    }
                    Response::GetReply { chunk: None } => r
                        .findings
                        .push(format!("chunk {id}: has said yes, get found nothing")),
                    Response::Error { message, .. } => r
                        .findings
                        .push(format!("chunk {id} on shard {shard} unreadable: {message}")),
                    other => anyhow::bail!("shard {shard}: get answered {:?}", other.opcode()),
                }
            }
        }
    }
    Ok(r)
}

/// Answer one metadata request. `Err` is a service failure (no leader, storage); an
/// errno is a normal answer.
async fn handle(sh: &Shared, req: MetaRequest) -> Result<MetaReply, RaftError> {
    if let Err(e) = req.validate() {
        return Ok(Err(e));
    }
    match req {
        MetaRequest::Mutate(cmd) => {
            let cmd = MetaCommand {
                now: Timespec::now(),
                ..cmd
            };
            let out = sh.raft.write(meta::encode(&cmd)).await?;
            meta::decode::<MetaReply>(&out)
                .map_err(|e| RaftError::Unavailable(format!("store answered badly: {e}")))
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
            let mut reply = sh
                .store
                .query(volume, &query)
                .map_err(|e| RaftError::Unavailable(format!("metadata store: {e:#}")))?;
            if let (Query::StatFs, Ok(Answer::StatFs(s))) = (&query, &mut reply) {
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
    }
}
