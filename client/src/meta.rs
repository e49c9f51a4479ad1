//! The metadata client: a pool of connections to a hive's metadata port, exactly-once
//! mutations, and linearizable queries.
//!
//! Every mutation gets this client's next sequence number and carries `acked_below`, the
//! lowest sequence still waiting for its answer. If a connection breaks before the answer
//! arrives, the same command (same sequence) is sent again on a new connection: the hive
//! stores each answer with the mutation it applied, so a retry is answered, never applied
//! twice. A client id is random per [`MetaClient`] (one per mount), or a client disk's
//! own (the same across mounts, with mutation numbers that never repeat).
//!
//! The client is `Sync`: FUSE threads share it; each call takes an idle connection from
//! the pool (or dials a new one) and returns it afterwards.
//!
//! [`LockClient`] is a mount's side of the lock service (`engine/src/meta/locks.rs`): one
//! lock session per mount, its lease, and which `(inode, owner)` pairs hold locks here.
//!
//! [`MetaWatch`] is a mount's watch stream (`engine/src/meta/watch.rs`): invalidations of
//! other clients' mutations, on a connection of its own that is re-established when it
//! breaks (or goes silent past [`WATCH_DEAD_MS`]); a gap is reported as [`Watched::Lost`].

use crate::hive::{dial_host, ClientError, ClientOptions};
use hivefs_net::conn::FramedConn;
use hivefs_net::frame::{PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};
pub use hivefs_net::meta::Invalidation;
use hivefs_net::meta::{
    self, Answer, Errno, LockInfo, LockKind, LockOp, LockRequest, LockType, MetaCommand, MetaReply,
    MetaRequest, Mutation, Query, Timespec, WatchEvent, LOCK_KEEPALIVE_MS, LOCK_LEASE_MS,
    WATCH_DEAD_MS,
};
use hivefs_net::proto::{ClusterMap, ErrorCode, Request, Response};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a call keeps retrying over broken connections before it gives up.
pub const RETRY_FOR: Duration = Duration::from_secs(30);
/// How long a call keeps trying other members after a "no quorum" answer: a namespace
/// change without a majority fails within about this long (plus one node's wait).
pub const NO_QUORUM_RETRY_FOR: Duration = Duration::from_secs(5);
/// How long a call waits for an election to name a leader before it fails.
pub const LEADERLESS_RETRY_FOR: Duration = Duration::from_secs(9);
/// Idle connections kept in the pool.
const POOL_KEEP: usize = 16;

struct MetaConn {
    conn: FramedConn<TcpStream>,
    version: u16,
    next_req: u64,
}

impl MetaConn {
    fn open(o: &ClientOptions, at: &Endpoint) -> Result<MetaConn, ClientError> {
        let conn = dial_host(o, &at.host, at.port as u32)?;
        let mut mc = MetaConn {
            conn,
            version: PROTOCOL_VERSION_MIN,
            next_req: 1,
        };
        let hello = Request::Hello {
            min_version: PROTOCOL_VERSION_MIN,
            max_version: PROTOCOL_VERSION_MAX,
            token: o.token.clone(),
            client_name: o.client_name.clone(),
        };
        match mc.call(&hello)? {
            Response::HelloOk { version, .. } => {
                mc.version = version;
                Ok(mc)
            }
            other => Err(unexpected(other)),
        }
    }

    fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        let id = self.next_req;
        self.next_req += 1;
        let conn_err = |source| ClientError::Conn {
            shard: u16::MAX,
            source,
        };
        self.conn
            .send_request(self.version, id, req)
            .map_err(conn_err)?;
        let (rid, resp) = self.conn.recv_response().map_err(conn_err)?;
        if rid != id {
            return Err(ClientError::Protocol {
                shard: u16::MAX,
                detail: format!("metadata reply to request {rid}, expected {id}"),
            });
        }
        Ok(resp)
    }
}

fn unexpected(r: Response) -> ClientError {
    match r {
        Response::Error { code, message } => ClientError::Refused {
            shard: u16::MAX,
            code,
            message,
        },
        other => ClientError::Protocol {
            shard: u16::MAX,
            detail: format!("unexpected metadata reply {:?}", other.opcode()),
        },
    }
}

/// A metadata node's address.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Endpoint {
    host: String,
    port: u16,
}

impl Endpoint {
    /// `host:port` or `[v6]:port`.
    fn parse(addr: &str) -> Option<Endpoint> {
        let (host, port) = addr.rsplit_once(':')?;
        Some(Endpoint {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port: port.parse().ok()?,
        })
    }
}

/// Where the metadata leader is, as far as this client knows: the node it talks to now,
/// and every member it has heard of (to try in turn when that node stops answering).
/// Shared by a client's calls and its watch stream.
#[derive(Debug)]
struct Endpoints {
    current: Endpoint,
    known: Vec<Endpoint>,
}

type SharedEndpoints = Arc<Mutex<Endpoints>>;

impl Endpoints {
    fn new(first: Endpoint) -> SharedEndpoints {
        Arc::new(Mutex::new(Endpoints {
            known: vec![first.clone()],
            current: first,
        }))
    }

    /// Follow a "not the leader" answer: `leader` is `host:port`, or empty while an
    /// election runs (then the same node is asked again after a pause).
    fn follow(&mut self, leader: &str) {
        if let Some(e) = Endpoint::parse(leader) {
            if !self.known.contains(&e) {
                self.known.push(e.clone());
            }
            self.current = e;
        }
    }

    /// The current node does not answer: move on to the next one known.
    fn rotate(&mut self) {
        if let Some(i) = self.known.iter().position(|e| *e == self.current) {
            self.current = self.known[(i + 1) % self.known.len()].clone();
        }
    }

    fn learn(&mut self, members: &[meta::Member]) {
        for m in members {
            if let Some(e) = Endpoint::parse(&m.addr) {
                if !self.known.contains(&e) {
                    self.known.push(e);
                }
            }
        }
    }
}

/// A metadata client. See the module docs.
pub struct MetaClient {
    opts: ClientOptions,
    endpoints: SharedEndpoints,
    map: ClusterMap,
    client_id: u64,
    next_seq: AtomicU64,
    waiting: Mutex<BTreeSet<u64>>,
    pool: Mutex<Vec<MetaConn>>,
    /// See [`MetaClient::changes`].
    changes: Arc<AtomicU64>,
}

impl MetaClient {
    /// Connect to the metadata service at `o.host:port` and fetch the cluster map. Any
    /// member of the metadata cluster will do: calls follow its "not the leader" answers
    /// to the leader, and move to another member when the one asked stops answering.
    pub fn connect(o: &ClientOptions, port: u16) -> Result<MetaClient, ClientError> {
        let mut id = [0u8; 8];
        getrandom(&mut id);
        Self::connect_as(o, port, u64::from_le_bytes(id) | 1, 1)
    }

    /// [`MetaClient::connect`] as client `client_id` (a client disk's, the same across
    /// mounts), numbering mutations from `first_seq`: the caller makes sure no number is
    /// used twice by one client id (a mount numbers from its journal generation << 32).
    pub fn connect_as(
        o: &ClientOptions,
        port: u16,
        client_id: u64,
        first_seq: u64,
    ) -> Result<MetaClient, ClientError> {
        let endpoints = Endpoints::new(Endpoint {
            host: o.host.clone(),
            port,
        });
        let first_at = endpoints.lock().expect("endpoints lock").current.clone();
        let mut first = MetaConn::open(o, &first_at)?;
        let map = match first.call(&Request::Map)? {
            Response::MapReply { map } => map,
            other => return Err(unexpected(other)),
        };
        // Who else is there, for when this node goes away (a one-node hive answers itself).
        let members = MetaRequest::Query {
            volume: 0,
            query: Query::Members,
        };
        if let Ok(Response::MetaReply { body }) = first.call(&Request::Meta {
            body: meta::encode(&members),
        }) {
            if let Ok(Ok(Answer::Members { members, .. })) = meta::decode::<MetaReply>(&body) {
                endpoints.lock().expect("endpoints lock").learn(&members);
            }
        }
        Ok(MetaClient {
            opts: o.clone(),
            endpoints,
            map,
            client_id,
            next_seq: AtomicU64::new(first_seq),
            waiting: Mutex::new(BTreeSet::new()),
            pool: Mutex::new(vec![first]),
            changes: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The cluster map (shard ports, buckets, dedupe key).
    pub fn map(&self) -> &ClusterMap {
        &self.map
    }

    /// Options for reaching the shards of the same hive (for a [`crate::hive::HiveClient`]).
    pub fn chunk_options(&self) -> ClientOptions {
        ClientOptions {
            base_port: self.map.base_port,
            ..self.opts.clone()
        }
    }

    pub fn client_id(&self) -> u64 {
        self.client_id
    }

    /// Apply a mutation to `volume` exactly once.
    pub fn mutate(&self, volume: u32, op: Mutation) -> Result<MetaReply, ClientError> {
        self.mutate_as(volume, op, false)
    }

    /// [`MetaClient::mutate`], answered with the directory's attributes after it where
    /// the mutation adds or removes a name ([`MetaRequest::MutateInDir`]).
    pub fn mutate_in_dir(&self, volume: u32, op: Mutation) -> Result<MetaReply, ClientError> {
        self.mutate_as(volume, op, true)
    }

    fn mutate_as(&self, volume: u32, op: Mutation, in_dir: bool) -> Result<MetaReply, ClientError> {
        let seq = self.reserve_seq();
        self.send(volume, seq, op, in_dir, false, RETRY_FOR)
    }

    /// A count of the namespace changes this client knows of: bumped before each mutation
    /// it sends and whenever one of its watch streams ([`MetaClient::watch`]) reports
    /// other clients' changes (or may have missed some: a broken stream, an overflow). An
    /// answer taken when the count was `n` still describes the hive while it is `n`, as
    /// far as the watch stream can tell (what a mount predicts attributes from).
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::SeqCst)
    }

    /// A sequence number for a mutation sent later ([`MetaClient::mutate_reserved`]): a
    /// journaled namespace change gets its number when it is journaled. Until it is sent
    /// and answered, no call tells the hive it may forget answers from it on (every
    /// `acked_below` stays at or below it).
    pub fn reserve_seq(&self) -> u64 {
        let seq = self.next_seq.fetch_add(1, Ordering::SeqCst);
        self.waiting.lock().expect("waiting lock").insert(seq);
        seq
    }

    /// Send the mutation numbered `seq` (reserved, or found in a journal at replay: the
    /// hive answers a repeat as it answered the first). Applied exactly once. Sent again
    /// after this client told the hive it had the answer (a crash after the answer,
    /// before the journal noted it): `Err(STALE)`, meaning "applied before". Unless the
    /// hive answered, `seq` stays held (the same number is sent again later).
    pub fn mutate_reserved(
        &self,
        volume: u32,
        seq: u64,
        op: Mutation,
        in_dir: bool,
    ) -> Result<MetaReply, ClientError> {
        self.send(volume, seq, op, in_dir, true, RETRY_FOR)
    }

    /// [`MetaClient::mutate_reserved`], retrying over broken connections for `retry_for`
    /// only (a client that can go on without the hive gives up sooner).
    pub fn mutate_reserved_within(
        &self,
        volume: u32,
        seq: u64,
        op: Mutation,
        in_dir: bool,
        retry_for: Duration,
    ) -> Result<MetaReply, ClientError> {
        self.send(volume, seq, op, in_dir, true, retry_for)
    }

    fn send(
        &self,
        volume: u32,
        seq: u64,
        op: Mutation,
        in_dir: bool,
        reserved: bool,
        retry_for: Duration,
    ) -> Result<MetaReply, ClientError> {
        self.changes.fetch_add(1, Ordering::SeqCst);
        let acked_below = {
            let mut w = self.waiting.lock().expect("waiting lock");
            w.insert(seq);
            *w.iter().next().expect("just inserted")
        };
        let cmd = MetaCommand {
            volume,
            client: self.client_id,
            seq,
            acked_below,
            now: Timespec::default(),
            op,
        };
        let req = if in_dir {
            MetaRequest::MutateInDir(cmd)
        } else {
            MetaRequest::Mutate(cmd)
        };
        let r = self.call_for(&req, retry_for);
        if r.is_ok() || !reserved {
            self.waiting.lock().expect("waiting lock").remove(&seq);
        }
        r
    }

    /// Give up reserved number `seq` unsent (or sent without an answer): answers from it on
    /// may be forgotten by the hive.
    pub fn release_seq(&self, seq: u64) {
        self.waiting.lock().expect("waiting lock").remove(&seq);
    }

    /// Keep `seq` (a journaled mutation found at replay, to be sent after others) held
    /// like a reserved one, until it is answered.
    pub fn hold_seq(&self, seq: u64) {
        self.waiting.lock().expect("waiting lock").insert(seq);
    }

    /// A watch stream of `volume` on a connection of its own (see [`MetaWatch`]): what other
    /// clients' mutations make stale (this client's own are left out). Connects lazily, at
    /// the first [`MetaWatch::recv`].
    pub fn watch(&self, volume: u32) -> MetaWatch {
        MetaWatch {
            opts: self.opts.clone(),
            endpoints: self.endpoints.clone(),
            volume,
            client: self.client_id,
            conn: None,
            connected_before: false,
            stop: Arc::new(AtomicBool::new(false)),
            frames: Vec::with_capacity(1),
            changes: self.changes.clone(),
        }
    }

    /// A linearizable read of `volume`.
    pub fn query(&self, volume: u32, query: Query) -> Result<MetaReply, ClientError> {
        self.call(&MetaRequest::Query { volume, query })
    }

    /// [`MetaClient::query`], retrying over broken connections for `retry_for` only (a
    /// client that can go on without the hive gives up sooner).
    pub fn query_within(
        &self,
        volume: u32,
        query: Query,
        retry_for: Duration,
    ) -> Result<MetaReply, ClientError> {
        self.call_for(&MetaRequest::Query { volume, query }, retry_for)
    }

    /// A query that may be answered from a node's own, possibly stale copy when no
    /// linearizable read is possible (see [`MetaRequest::StaleQuery`]). `Ok((answer,
    /// stale_ms))`; `stale_ms` 0 for a linearizable answer.
    pub fn query_stale(
        &self,
        volume: u32,
        query: Query,
        max_stale: Duration,
    ) -> Result<Result<(Answer, u64), Errno>, ClientError> {
        let req = MetaRequest::StaleQuery {
            volume,
            query,
            max_stale_ms: max_stale.as_millis() as u64,
        };
        Ok(match self.call(&req)? {
            Ok(Answer::Stale { stale_ms, answer }) => Ok((*answer, stale_ms)),
            Ok(other) => {
                return Err(ClientError::Protocol {
                    shard: u16::MAX,
                    detail: format!("a stale query answered {other:?}"),
                })
            }
            Err(e) => Err(e),
        })
    }

    /// A lock operation of `session` (see [`LockClient`], which manages sessions),
    /// retrying over broken connections for up to `retry_for`.
    pub fn lock(
        &self,
        volume: u32,
        session: u64,
        op: LockOp,
        retry_for: Duration,
    ) -> Result<MetaReply, ClientError> {
        let req = MetaRequest::Lock(LockRequest {
            volume,
            client: self.client_id,
            session,
            op,
        });
        self.call_for(&req, retry_for)
    }

    /// Send `req` until it is answered (reconnecting over broken connections, for up to
    /// [`RETRY_FOR`]). A refusal by the service is returned at once.
    fn call(&self, req: &MetaRequest) -> Result<MetaReply, ClientError> {
        self.call_for(req, RETRY_FOR)
    }

    fn call_for(&self, req: &MetaRequest, retry_for: Duration) -> Result<MetaReply, ClientError> {
        let body = meta::encode(req);
        let needs = req.needs_version();
        let started = Instant::now();
        let deadline = started + retry_for;
        let mut backoff = Duration::from_millis(20);
        loop {
            let at = self
                .endpoints
                .lock()
                .expect("endpoints lock")
                .current
                .clone();
            let pooled = self.pool.lock().expect("pool lock").pop();
            let conn = match pooled {
                Some(c) => Ok(c),
                None => MetaConn::open(&self.opts, &at),
            };
            let result = conn.and_then(|mut c| {
                if c.version < needs {
                    // That node's build cannot decode the request: answered here, unsent
                    // (the caller sends an older form).
                    let body = meta::encode(&MetaReply::Err(Errno::NOTSUP));
                    return Ok((c, Response::MetaReply { body }));
                }
                let r = c.call(&Request::Meta { body: body.clone() })?;
                Ok((c, r))
            });
            match result {
                Ok((c, Response::MetaReply { body })) => {
                    let mut pool = self.pool.lock().expect("pool lock");
                    if pool.len() < POOL_KEEP {
                        pool.push(c);
                    }
                    return meta::decode::<MetaReply>(&body).map_err(|e| ClientError::Protocol {
                        shard: u16::MAX,
                        detail: e.to_string(),
                    });
                }
                Ok((
                    _,
                    Response::Error {
                        code: ErrorCode::NotLeader,
                        message,
                    },
                )) if Instant::now() < deadline
                    && (!message.is_empty() || started.elapsed() < LEADERLESS_RETRY_FOR) =>
                {
                    // Not the leader: go where it points (or, mid-election, wait and ask
                    // again). Pooled connections go to the old node: drop them.
                    tracing::debug!(leader = %message, "metadata call: not the leader");
                    self.endpoints
                        .lock()
                        .expect("endpoints lock")
                        .follow(&message);
                    self.pool.lock().expect("pool lock").clear();
                    if message.is_empty() {
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                }
                Ok((
                    _,
                    Response::Error {
                        code: ErrorCode::NoQuorum,
                        message,
                    },
                )) if started.elapsed() < NO_QUORUM_RETRY_FOR => {
                    // That node is cut off from the majority (or the majority is gone):
                    // another member may lead a majority.
                    tracing::debug!("metadata call: {message}; trying another member");
                    self.endpoints.lock().expect("endpoints lock").rotate();
                    self.pool.lock().expect("pool lock").clear();
                }
                Ok((_, other)) => return Err(unexpected(other)),
                Err(e @ (ClientError::Conn { .. } | ClientError::Connect { .. }))
                    if Instant::now() < deadline =>
                {
                    tracing::debug!("metadata call: {e}; retrying");
                    if matches!(e, ClientError::Connect { .. }) {
                        // That node is gone: try the next member known.
                        self.endpoints.lock().expect("endpoints lock").rotate();
                        self.pool.lock().expect("pool lock").clear();
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// What a [`MetaWatch`] delivers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Watched {
    /// These names and inodes changed through another client.
    Invalidate(Invalidation),
    /// Invalidations were lost (the hive dropped them for a slow watcher, or the stream
    /// broke and was re-established): anything may have changed; which is unknown.
    Lost,
    /// Another client opened these inodes: commit what was written to them here and give
    /// their write leases back.
    Recall(Vec<u64>),
}

/// How often a blocked [`MetaWatch::recv`] looks at its stop flag.
const WATCH_POLL: Duration = Duration::from_millis(200);
/// Longest wait between reconnection attempts of a watch stream.
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// A watch stream (see [`MetaClient::watch`]). Blocking; one consumer thread.
pub struct MetaWatch {
    opts: ClientOptions,
    endpoints: SharedEndpoints,
    volume: u32,
    client: u64,
    /// The stream and the request id its frames answer.
    conn: Option<(MetaConn, u64)>,
    /// A stream was up before: a new one means a gap.
    connected_before: bool,
    stop: Arc<AtomicBool>,
    frames: Vec<hivefs_net::frame::Frame>,
    /// Its client's [`MetaClient::changes`].
    changes: Arc<AtomicU64>,
}

impl MetaWatch {
    /// Set the returned flag to make [`MetaWatch::recv`] return `None` (within
    /// [`WATCH_POLL`] or one connection attempt).
    pub fn stopper(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Open a stream: Hello, then `Watch`, answered `Done`.
    fn open(&self) -> Result<(MetaConn, u64), ClientError> {
        let at = self
            .endpoints
            .lock()
            .expect("endpoints lock")
            .current
            .clone();
        let mut c = MetaConn::open(&self.opts, &at).inspect_err(|e| {
            if matches!(e, ClientError::Connect { .. }) {
                self.endpoints.lock().expect("endpoints lock").rotate();
            }
        })?;
        let body = meta::encode(&MetaRequest::Watch {
            volume: self.volume,
            client: self.client,
        });
        let id = c.next_req;
        match c.call(&Request::Meta { body })? {
            Response::MetaReply { body } => match meta::decode::<MetaReply>(&body) {
                Ok(Ok(Answer::Done)) => {}
                Ok(other) => {
                    return Err(ClientError::Protocol {
                        shard: u16::MAX,
                        detail: format!("watch answered {other:?}"),
                    })
                }
                Err(e) => {
                    return Err(ClientError::Protocol {
                        shard: u16::MAX,
                        detail: e.to_string(),
                    })
                }
            },
            Response::Error {
                code: ErrorCode::NotLeader,
                message,
            } => {
                // Invalidations come from the leader: go there (the caller reconnects).
                self.endpoints
                    .lock()
                    .expect("endpoints lock")
                    .follow(&message);
                return Err(ClientError::Refused {
                    shard: u16::MAX,
                    code: ErrorCode::NotLeader,
                    message,
                });
            }
            other => return Err(unexpected(other)),
        }
        c.conn
            .get_ref()
            .set_read_timeout(Some(WATCH_POLL))
            .map_err(|source| ClientError::Conn {
                shard: u16::MAX,
                source: source.into(),
            })?;
        Ok((c, id))
    }

    /// The next event of the stream `c`; `Ok(None)` when stopped; an error when the stream
    /// broke or was silent for [`WATCH_DEAD_MS`] (not even a heartbeat).
    fn read_event(&mut self, c: &mut MetaConn, id: u64) -> Result<Option<WatchEvent>, ClientError> {
        let proto = |detail: String| ClientError::Protocol {
            shard: u16::MAX,
            detail,
        };
        let conn_err = |source| ClientError::Conn {
            shard: u16::MAX,
            source,
        };
        let since = Instant::now();
        loop {
            if self.stopped() {
                return Ok(None);
            }
            if since.elapsed() >= Duration::from_millis(WATCH_DEAD_MS) {
                return Err(proto("watch stream silent (no heartbeat)".into()));
            }
            let status = match c.conn.read_frames(&mut self.frames, 1) {
                Ok(s) => s,
                Err(hivefs_net::conn::ConnError::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(conn_err(e)),
            };
            let Some(f) = self.frames.pop() else {
                if status == hivefs_net::conn::ReadStatus::Closed {
                    return Err(conn_err(hivefs_net::conn::ConnError::Closed));
                }
                continue;
            };
            if f.request_id != id {
                return Err(proto(format!("watch frame for request {}", f.request_id)));
            }
            let body = match Response::decode(f.opcode, &f.body).map_err(|e| conn_err(e.into()))? {
                Response::MetaReply { body } => body,
                other => return Err(unexpected(other)),
            };
            let ev = meta::decode_watch_event(&body).map_err(|e| proto(e.to_string()))?;
            return Ok(Some(ev));
        }
    }

    /// Open the stream now if it is not open (once this returns `Ok`, every mutation
    /// answered later is heard).
    pub fn connect(&mut self) -> Result<(), ClientError> {
        if self.conn.is_none() {
            self.conn = Some(self.open()?);
            self.connected_before = true;
        }
        Ok(())
    }

    /// The next invalidation (or [`Watched::Lost`]), blocking; reconnects with backoff
    /// while the hive is unreachable. `None` once stopped.
    pub fn recv(&mut self) -> Option<Watched> {
        let mut backoff = Duration::from_millis(50);
        loop {
            if self.stopped() {
                return None;
            }
            let Some((mut c, id)) = self.conn.take() else {
                match self.open() {
                    Ok(c) => {
                        self.conn = Some(c);
                        if std::mem::replace(&mut self.connected_before, true) {
                            self.changes.fetch_add(1, Ordering::SeqCst);
                            tracing::info!("watch stream re-established");
                            return Some(Watched::Lost);
                        }
                        tracing::debug!("watch stream open");
                    }
                    Err(e) => {
                        tracing::debug!("watch stream: {e}; retrying in {backoff:?}");
                        let until = Instant::now() + backoff;
                        while Instant::now() < until && !self.stopped() {
                            std::thread::sleep(WATCH_POLL.min(backoff));
                        }
                        backoff = (backoff * 2).min(WATCH_BACKOFF_MAX);
                    }
                }
                continue;
            };
            match self.read_event(&mut c, id) {
                Ok(None) => return None,
                Ok(Some(ev)) => {
                    self.conn = Some((c, id));
                    if !matches!(ev, WatchEvent::Heartbeat | WatchEvent::Recall(_)) {
                        self.changes.fetch_add(1, Ordering::SeqCst);
                    }
                    match ev {
                        WatchEvent::Heartbeat => {}
                        WatchEvent::Overflow => return Some(Watched::Lost),
                        WatchEvent::Invalidate(inv) => return Some(Watched::Invalidate(inv)),
                        WatchEvent::Recall(inos) => return Some(Watched::Recall(inos)),
                    }
                }
                Err(e) => {
                    self.changes.fetch_add(1, Ordering::SeqCst);
                    tracing::info!("watch stream broke: {e}; reconnecting");
                    // Dropped: the next turn reconnects.
                }
            }
        }
    }
}

/// How long a lock keepalive keeps retrying over broken connections.
const KEEPALIVE_RETRY: Duration = Duration::from_millis(LOCK_KEEPALIVE_MS);

/// What a [`LockClient`] knows of its session. `held` and `lost` are `(inode, owner)`.
#[derive(Default)]
struct LockState {
    /// The session the leader gave us (0: none).
    session: u64,
    /// When the last answered request of this session was *sent* (our side of the lease).
    renewed: Option<Instant>,
    /// Pairs that hold (or may hold) a lock in this session.
    held: HashSet<(u64, u64)>,
    /// Pairs whose locks a lost session took with it: their next lock operation is EIO.
    lost: HashSet<(u64, u64)>,
    /// Write leases held here: inode -> token (see [`LockClient::lease`]).
    leases: HashMap<u64, u64>,
    /// Leases a [`LockClient::reassert`] found lost: kept in `leases` (the next commit
    /// under one learns the loss and reports it), not asked for again.
    refused: HashSet<(u64, u64)>,
}

/// How long a lock request tries the hive, and what it answers when it could not.
#[derive(Clone, Copy)]
enum Reach {
    /// For [`RETRY_FOR`]; then `IO`.
    Patient,
    /// For this long; `HOSTDOWN` if no member could be reached.
    Within(Duration),
}

impl Reach {
    fn retry_for(self) -> Duration {
        match self {
            Reach::Patient => RETRY_FOR,
            Reach::Within(d) => d,
        }
    }

    fn errno(self, e: &ClientError) -> Errno {
        match (self, e) {
            (Reach::Within(_), ClientError::Connect { .. } | ClientError::Conn { .. }) => {
                Errno::HOSTDOWN
            }
            _ => Errno::IO,
        }
    }
}

/// A mount's lock session with the metadata leader (see `engine/src/meta/locks.rs`).
///
/// - The session is opened lazily by the first lock operation (one opener at a time), and
///   kept alive by [`LockClient::keepalive`] (call it every [`LOCK_KEEPALIVE_MS`]) while
///   this mount holds a lock; an idle session is left to expire.
/// - The lease is also counted here, from the send time of the last answered request: if
///   it runs out (leader unreachable), or the leader answers `ESTALE` (it expired the
///   session, or restarted), every lock this mount held is lost: each `(inode, owner)`
///   that held one gets EIO on its next `set` (once), and a new session is opened.
/// - [`LockClient::release_owner`] is free when the pair holds nothing (no round trip):
///   `hi` calls it on every close.
///
/// Errors are errnos for the kernel: `AGAIN` (conflict), `IO` (lost lock, or the service
/// unreachable), `NOLCK` (the leader's limits).
pub struct LockClient {
    meta: Arc<MetaClient>,
    volume: u32,
    st: Mutex<LockState>,
    /// Held while a session is being opened (one `Open` at a time).
    opening: Mutex<()>,
    /// Held across each lease request and release, so that a release in flight and a
    /// new request cannot cross (the leader would drop the lease this mount just got).
    lease_ops: Mutex<()>,
}

impl LockClient {
    pub fn new(meta: Arc<MetaClient>, volume: u32) -> LockClient {
        LockClient {
            meta,
            volume,
            st: Mutex::new(LockState::default()),
            opening: Mutex::new(()),
            lease_ops: Mutex::new(()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LockState> {
        self.st.lock().expect("lock state")
    }

    /// The current session, opening one if there is none.
    fn session_for(&self, reach: Reach) -> Result<u64, Errno> {
        let s = self.state().session;
        if s != 0 {
            return Ok(s);
        }
        let _one = self.opening.lock().expect("lock opening");
        let s = self.state().session;
        if s != 0 {
            return Ok(s);
        }
        let sent = Instant::now();
        match self
            .meta
            .lock(self.volume, 0, LockOp::Open, reach.retry_for())
        {
            Ok(Ok(Answer::LockSession(id))) => {
                let mut st = self.state();
                st.session = id;
                st.renewed = Some(sent);
                Ok(id)
            }
            Ok(Ok(other)) => {
                tracing::warn!("lock open answered {other:?}");
                Err(Errno::IO)
            }
            Ok(Err(e)) => Err(e),
            Err(e) => {
                tracing::warn!("lock open: {e}");
                Err(reach.errno(&e))
            }
        }
    }

    /// `session` is gone: everything it held is lost.
    fn lose(&self, session: u64, why: &str) {
        let mut st = self.state();
        if st.session != session || session == 0 {
            return;
        }
        if !st.held.is_empty() {
            tracing::warn!(
                session,
                locks = st.held.len(),
                "lock session lost ({why}): its locks are gone; their owners get EIO"
            );
        }
        let held = std::mem::take(&mut st.held);
        st.lost.extend(held);
        st.session = 0;
        st.renewed = None;
    }

    /// Send `op` for the pair `key` in the current session (re-opening a lost one).
    fn op(&self, key: (u64, u64), op: LockOp) -> Result<Answer, Errno> {
        self.op_for(key, op, Reach::Patient)
    }

    fn op_for(&self, key: (u64, u64), op: LockOp, reach: Reach) -> Result<Answer, Errno> {
        for _ in 0..3 {
            let session = self.session_for(reach)?;
            let sent = Instant::now();
            let r = self
                .meta
                .lock(self.volume, session, op.clone(), reach.retry_for());
            let r = match r {
                Err(e) => {
                    tracing::warn!("lock operation: {e}");
                    return Err(reach.errno(&e));
                }
                Ok(Err(Errno::STALE)) => {
                    self.lose(session, "the leader does not know it");
                    if self.state().lost.remove(&key) {
                        return Err(Errno::IO);
                    }
                    continue;
                }
                Ok(r) => r,
            };
            // Answered in this session: our lease is renewed from `sent`.
            let mut st = self.state();
            if st.session == session {
                st.renewed = Some(st.renewed.map_or(sent, |t| t.max(sent)));
            }
            if let Ok(Answer::LockHeld(holds)) = r {
                if st.session == session {
                    if holds {
                        st.held.insert(key);
                    } else {
                        st.held.remove(&key);
                    }
                } else if holds {
                    // The session was declared lost while this was on its way.
                    st.lost.insert(key);
                }
            }
            return r;
        }
        Err(Errno::IO)
    }

    /// Set (`typ: Some`) or remove a lock of `owner` on `ino`; never waits (`AGAIN` on a
    /// conflict). `start..=end` inclusive.
    #[allow(clippy::too_many_arguments)]
    pub fn set(
        &self,
        ino: u64,
        kind: LockKind,
        owner: u64,
        typ: Option<LockType>,
        start: u64,
        end: u64,
        pid: u32,
    ) -> Result<(), Errno> {
        let key = (ino, owner);
        if self.state().lost.remove(&key) {
            return Err(Errno::IO);
        }
        if typ.is_none() && !self.holds(ino, owner) {
            return Ok(()); // nothing held here: nothing to remove
        }
        let op = LockOp::Set {
            ino,
            kind,
            owner,
            typ,
            start,
            end,
            pid,
        };
        match self.op(key, op)? {
            Answer::LockHeld(_) => Ok(()),
            other => {
                tracing::warn!("lock set answered {other:?}");
                Err(Errno::IO)
            }
        }
    }

    /// The first lock of another owner that conflicts with this one (`F_GETLK`). During
    /// the leader's grace after a restart (`AGAIN`), waits for it to end.
    pub fn get(
        &self,
        ino: u64,
        kind: LockKind,
        owner: u64,
        typ: LockType,
        start: u64,
        end: u64,
    ) -> Result<Option<LockInfo>, Errno> {
        let deadline = Instant::now() + Duration::from_millis(3 * LOCK_LEASE_MS);
        let mut backoff = Duration::from_millis(5);
        loop {
            let op = LockOp::Get {
                ino,
                kind,
                owner,
                typ,
                start,
                end,
            };
            match self.op((ino, owner), op) {
                Ok(Answer::LockConflict(c)) => return Ok(c),
                Ok(other) => {
                    tracing::warn!("lock get answered {other:?}");
                    return Err(Errno::IO);
                }
                Err(Errno::AGAIN) if Instant::now() < deadline => {
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Does `owner` hold (or may it hold) a lock on `ino` here?
    pub fn holds(&self, ino: u64, owner: u64) -> bool {
        self.state().held.contains(&(ino, owner))
    }

    /// Remove every lock of `owner` on `ino` (close). Free when it holds none.
    pub fn release_owner(&self, ino: u64, owner: u64) -> Result<(), Errno> {
        let key = (ino, owner);
        {
            let mut st = self.state();
            st.lost.remove(&key);
            if !st.held.contains(&key) {
                return Ok(());
            }
        }
        self.op(key, LockOp::ReleaseOwner { ino, owner })
            .map(|_| ())
    }

    /// Renew the lease while locks are held; notice a lease that ran out. Call every
    /// [`LOCK_KEEPALIVE_MS`].
    ///
    /// Returns the inodes whose write leases the leader recalls (another client opened
    /// them): commit what was written to them and give them back.
    pub fn keepalive(&self) -> Vec<u64> {
        let (session, renewed, holding) = {
            let st = self.state();
            (
                st.session,
                st.renewed,
                !st.held.is_empty() || !st.leases.is_empty(),
            )
        };
        if session == 0 {
            return Vec::new();
        }
        if renewed.is_none_or(|t| t.elapsed() >= Duration::from_millis(LOCK_LEASE_MS)) {
            self.lose(session, "lease ran out here");
            return Vec::new();
        }
        if !holding {
            return Vec::new(); // an idle session may expire; the next operation opens another
        }
        let sent = Instant::now();
        match self
            .meta
            .lock(self.volume, session, LockOp::KeepAlive, KEEPALIVE_RETRY)
        {
            Ok(Ok(answer)) => {
                let mut st = self.state();
                if st.session == session {
                    st.renewed = Some(st.renewed.map_or(sent, |t| t.max(sent)));
                }
                if let Answer::Recalls(inos) = answer {
                    return inos;
                }
            }
            Ok(Err(Errno::STALE)) => self.lose(session, "the leader does not know it"),
            Ok(Err(e)) => tracing::warn!("lock keepalive: {e}"),
            Err(e) => tracing::warn!("lock keepalive: {e}"),
        }
        Vec::new()
    }

    /// The write leases held here while this mount has no lock session (it was lost: the
    /// leader expired it, restarted, or another node leads now): they are to be reclaimed.
    pub fn orphaned_leases(&self) -> Vec<(u64, u64)> {
        let st = self.state();
        if st.session != 0 {
            return Vec::new();
        }
        st.leases
            .iter()
            .map(|(&i, &t)| (i, t))
            .filter(|k| !st.refused.contains(k))
            .collect()
    }

    /// The token of the write lease held here on `ino`, if any.
    pub fn lease_token(&self, ino: u64) -> Option<u64> {
        self.state().leases.get(&ino).copied()
    }

    /// Ask for the write lease on `ino` (`reclaim`: the token of one the leader no longer
    /// knows, 0 for none). `Ok(Some(token))`: held; `Ok(None)`: a reclaim refused (another
    /// client was granted the file since); `AGAIN`: another client holds it and is being
    /// asked to give it back (ask again).
    pub fn lease(&self, ino: u64, reclaim: u64) -> Result<Option<u64>, Errno> {
        self.lease_for(ino, reclaim, Reach::Patient)
    }

    /// [`LockClient::lease`] for a new lease, trying the hive for `within` only:
    /// `HOSTDOWN` when no member could be reached meanwhile (a mount that can go on
    /// without the hive asks so, and goes offline on it).
    pub fn lease_within(&self, ino: u64, within: Duration) -> Result<Option<u64>, Errno> {
        self.lease_for(ino, 0, Reach::Within(within))
    }

    fn lease_for(&self, ino: u64, reclaim: u64, reach: Reach) -> Result<Option<u64>, Errno> {
        let _one = self.lease_ops.lock().expect("lease ops lock");
        match self.op_for((ino, u64::MAX), LockOp::Lease { ino, reclaim }, reach)? {
            Answer::Lease(token) => {
                self.state().leases.insert(ino, token);
                Ok(Some(token))
            }
            Answer::LeaseLost => {
                let mut st = self.state();
                if st.leases.get(&ino) == Some(&reclaim) {
                    st.leases.remove(&ino);
                }
                st.refused.remove(&(ino, reclaim));
                Ok(None)
            }
            other => {
                tracing::warn!("lease answered {other:?}");
                Err(Errno::IO)
            }
        }
    }

    /// Reclaim the lease `token` on `ino` after this mount's session was lost, without
    /// giving it up here when the leader refuses: the next commit under it then finds
    /// out and reports the loss (see [`LockClient::lease`]). Returns whether it is held.
    pub fn reassert(&self, ino: u64, token: u64) -> Result<bool, Errno> {
        let _one = self.lease_ops.lock().expect("lease ops lock");
        match self.op(
            (ino, u64::MAX),
            LockOp::Lease {
                ino,
                reclaim: token,
            },
        )? {
            Answer::Lease(t) => {
                let mut st = self.state();
                if st.leases.get(&ino) == Some(&token) {
                    st.leases.insert(ino, t);
                }
                Ok(true)
            }
            Answer::LeaseLost => {
                self.state().refused.insert((ino, token));
                Ok(false)
            }
            other => {
                tracing::warn!("lease answered {other:?}");
                Err(Errno::IO)
            }
        }
    }

    /// Forget the write lease on `ino` here (the leader refused a commit under `token`).
    pub fn forget_lease(&self, ino: u64, token: u64) {
        let mut st = self.state();
        if st.leases.get(&ino) == Some(&token) {
            st.leases.remove(&ino);
        }
    }

    /// Give the write lease on `ino` back (everything written under it is committed).
    pub fn release_lease(&self, ino: u64) -> Result<(), Errno> {
        let _one = self.lease_ops.lock().expect("lease ops lock");
        let Some(token) = self.state().leases.remove(&ino) else {
            return Ok(());
        };
        if self.state().session == 0 {
            return Ok(()); // the session is gone, and the lease with it
        }
        self.op((ino, u64::MAX), LockOp::ReleaseLease { ino, token })
            .map(|_| ())
    }

    /// End the session, releasing every lock of this mount (unmount).
    pub fn close(&self) {
        let session = {
            let mut st = self.state();
            st.held.clear();
            st.lost.clear();
            st.leases.clear();
            std::mem::take(&mut st.session)
        };
        if session == 0 {
            return;
        }
        let r = self
            .meta
            .lock(self.volume, session, LockOp::Close, Duration::from_secs(2));
        if let Err(e) = r {
            tracing::warn!("closing the lock session: {e} (its lease will run out)");
        }
    }
}

/// Random bytes from the kernel (client ids need not be secret, only distinct).
fn getrandom(buf: &mut [u8]) {
    use std::io::Read;
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        if f.read_exact(buf).is_ok() {
            return;
        }
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
        ^ ((std::process::id() as u64) << 32);
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (t >> ((i % 8) * 8)) as u8;
    }
}
