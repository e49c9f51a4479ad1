//! Connections to a hive node: TLS with the pinned hive CA, token authentication, the
//! cluster map, and shard-aware batched `has` / `put` / `get`.
//!
//! A [`HiveClient`] reads the hive's placement map (`HiveMap`: nodes, states, weights;
//! each bucket's replicas by weighted rendezvous hashing) from the node it first
//! contacts, and talks to every node directly, one connection per (node, shard) opened
//! when first needed (shard `i` of a node listens on `base_port + i`; a node keeps bucket
//! `b` on shard `b % shards`). Puts and `has` go to the bucket's *primary* (its first
//! replica not marked down), which stores the chunks and forwards the other copies
//! before answering. A put refused as `NotPrimary` (the client's map is stale), or one
//! whose primary cannot be reached, fetches the map again and retries (idempotent) for up
//! to [`RETRY_FOR`]. Reads ask the bucket's replicas in order and fail over on an error,
//! a refusal or a copy that is missing or corrupt.
//!
//! Work for several connections runs in parallel, one thread per connection, and each
//! connection keeps up to its flow-control credits of requests in flight (pipelining).
//!
//! Every chunk read is decompressed and checked against its id before it is returned;
//! a node can never hand a client bytes that do not hash to what was asked for.

use crate::pipeline::PreparedChunk;
use hivefs_net::chunk::{self, ChunkError, ChunkId};
use hivefs_net::conn::{ConnError, FramedConn};
use hivefs_net::frame::{MAX_BODY_BYTES, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};
use hivefs_net::placement::{HiveMap, Placement};
use hivefs_net::proto::{
    put_frame_heads, put_frame_parts, ClusterMap, ErrorCode, PutChunk, PutResult, Request,
    Response, MAX_BATCH_CHUNKS, MAX_BATCH_IDS, PUT_BODY_HEADER_BYTES, PUT_CHUNK_OVERHEAD_BYTES,
};
use std::collections::HashMap;
use std::net::TcpStream;
use std::time::Duration;

/// Ids per `Has` request.
pub const HAS_BATCH_IDS: usize = 2048;
/// Target body size of one `Put` request.
pub const PUT_BATCH_BYTES: usize = 1 << 20;

/// How to reach and authenticate to a hive node.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub host: String,
    pub base_port: u16,
    pub token: String,
    /// SHA-256 of the hive CA certificate; `None` = plain TCP (`--insecure` nodes only).
    pub ca_fingerprint: Option<String>,
    pub client_name: String,
    pub connect_timeout: Duration,
    /// The copies chunks are asked to have (`Has` and `Put` levels): the volume's
    /// `copies` (a mount sets it from its volume); [`DEFAULT_LEVEL`] until set.
    pub level: u8,
}

/// The level a client asks for until told its volume's: the hive's default `copies`.
pub const DEFAULT_LEVEL: u8 = 3;

impl ClientOptions {
    pub fn new(
        host: &str,
        base_port: u16,
        token: &str,
        ca_fingerprint: Option<&str>,
    ) -> ClientOptions {
        ClientOptions {
            host: host.to_string(),
            base_port,
            token: token.trim().to_string(),
            ca_fingerprint: ca_fingerprint.map(|s| s.trim().to_string()),
            client_name: format!("hivefs-client/{}", std::process::id()),
            connect_timeout: Duration::from_secs(5),
            level: DEFAULT_LEVEL,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("shard {shard}: {source}")]
    Conn { shard: u16, source: ConnError },
    #[error("shard {shard} refused: {code:?}: {message}")]
    Refused {
        shard: u16,
        code: ErrorCode,
        message: String,
    },
    #[error("shard {shard} answered out of protocol: {detail}")]
    Protocol { shard: u16, detail: String },
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("chunk {id} failed verification: {source}")]
    Verify { id: ChunkId, source: ChunkError },
    #[error("chunk {0} rejected by the node (bytes do not match the id)")]
    Rejected(ChunkId),
    /// The shard has no room for new chunks (map to ENOSPC).
    #[error("shard {shard} is out of space: {message}")]
    NoSpace { shard: u16, message: String },
}

/// A request to send: an owned message, or a put of borrowed chunks (encoded in place).
enum Outgoing<'a> {
    Request(Request),
    /// A `Put` at a level.
    Put(u8, Vec<&'a PutChunk>),
}

struct ShardConn {
    shard: u16,
    conn: FramedConn<TcpStream>,
    version: u16,
    credits: usize,
    next_req: u64,
    /// Reused encoding buffer for outgoing frames.
    frame: Vec<u8>,
    /// Where each chunk's data goes between the pieces of a `Put` in `frame`.
    put_ends: Vec<usize>,
}

impl ShardConn {
    fn open(
        o: &ClientOptions,
        host: &str,
        base_port: u16,
        shard: u16,
    ) -> Result<(ShardConn, u16), ClientError> {
        let conn =
            dial_host(o, host, base_port as u32 + shard as u32).map_err(|e| e.for_shard(shard))?;
        let mut sc = ShardConn {
            shard,
            conn,
            version: PROTOCOL_VERSION_MIN,
            credits: 1,
            next_req: 1,
            frame: Vec::new(),
            put_ends: Vec::new(),
        };
        let hello = Request::Hello {
            min_version: PROTOCOL_VERSION_MIN,
            max_version: PROTOCOL_VERSION_MAX,
            token: o.token.clone(),
            client_name: o.client_name.clone(),
        };
        match sc.call(&hello)? {
            Response::HelloOk {
                version,
                credits,
                shard: s,
                shard_count,
                ..
            } => {
                if s != shard {
                    return Err(ClientError::Protocol {
                        shard,
                        detail: format!("port of shard {shard} is served by shard {s}"),
                    });
                }
                sc.version = version;
                sc.credits = (credits as usize).clamp(1, 1024);
                Ok((sc, shard_count))
            }
            other => Err(sc.unexpected(other)),
        }
    }

    fn send(&mut self, req: &Request) -> Result<u64, ClientError> {
        self.send_out(&Outgoing::Request(req.clone()))
    }

    /// Encode one request straight into the reusable frame buffer and write it.
    fn send_out(&mut self, o: &Outgoing) -> Result<u64, ClientError> {
        let id = self.next_req;
        self.next_req += 1;
        self.frame.clear();
        let len = match o {
            Outgoing::Request(req) => {
                let (op, body) = req.encode();
                hivefs_net::frame::encode_frame_into(
                    &mut self.frame,
                    self.version,
                    op as u16,
                    id,
                    &body,
                );
                self.frame.len()
            }
            Outgoing::Put(level, chunks) => {
                // The chunks' bytes are not copied into the frame: TLS encrypts them from
                // where they are (one copy fewer per byte put).
                let (check, v) = (self.conn.body_check(), self.version);
                let ends = &mut self.put_ends;
                put_frame_heads(&mut self.frame, ends, check, v, id, *level, chunks);
                self.frame.len() + chunks.iter().map(|c| c.data.len()).sum::<usize>()
            }
        };
        if len > MAX_BODY_BYTES + hivefs_net::frame::HEADER_BYTES {
            let len = u32::try_from(len).unwrap_or(u32::MAX);
            return Err(ClientError::Conn {
                shard: self.shard,
                source: hivefs_net::frame::FrameError::TooLarge(len).into(),
            });
        }
        match o {
            Outgoing::Put(_, chunks) => {
                let parts = put_frame_parts(&self.frame, &self.put_ends, chunks);
                self.conn.queue_frame_parts(&parts);
            }
            Outgoing::Request(_) => self.conn.queue_frame(&self.frame),
        }
        self.conn.flush().map_err(|source| ClientError::Conn {
            shard: self.shard,
            source,
        })?;
        if self.frame.capacity() > hivefs_net::frame::IDLE_BUFFER_KEEP_BYTES {
            self.frame = Vec::new();
        }
        Ok(id)
    }

    /// The next reply and the request id it answers.
    fn recv_any(&mut self) -> Result<(u64, Response), ClientError> {
        self.conn
            .recv_response()
            .map_err(|source| ClientError::Conn {
                shard: self.shard,
                source,
            })
    }

    fn recv(&mut self, expect_id: u64) -> Result<Response, ClientError> {
        let (id, resp) = self.recv_any()?;
        if id != expect_id {
            return Err(ClientError::Protocol {
                shard: self.shard,
                detail: format!("reply to request {id}, expected {expect_id}"),
            });
        }
        Ok(resp)
    }

    fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        let id = self.send(req)?;
        self.recv(id)
    }

    fn unexpected(&self, r: Response) -> ClientError {
        match r {
            Response::Error {
                code: ErrorCode::NoSpace,
                message,
            } => ClientError::NoSpace {
                shard: self.shard,
                message,
            },
            Response::Error { code, message } => ClientError::Refused {
                shard: self.shard,
                code,
                message,
            },
            other => ClientError::Protocol {
                shard: self.shard,
                detail: format!("unexpected {:?}", other.opcode()),
            },
        }
    }

    /// The shard side of [`HiveClient::put_stream`]: send batches from `feed` keeping up
    /// to `credits` in flight, until the feed closes and every reply is in.
    fn put_stream(
        &mut self,
        level: u8,
        feed: crossbeam_channel::Receiver<Vec<&PutChunk>>,
    ) -> Result<PutStreamStats, ClientError> {
        let mut st = PutStreamStats {
            claim_epoch: u64::MAX,
            ..Default::default()
        };
        let mut in_flight: HashMap<u64, (Vec<ChunkId>, std::time::Instant)> = HashMap::new();
        let mut open = true;
        loop {
            while open && in_flight.len() < self.credits {
                // Wait for work only when nothing is in flight; else answer replies first.
                let next = if in_flight.is_empty() {
                    feed.recv().ok()
                } else {
                    match feed.try_recv() {
                        Ok(b) => Some(b),
                        Err(crossbeam_channel::TryRecvError::Empty) => break,
                        Err(crossbeam_channel::TryRecvError::Disconnected) => None,
                    }
                };
                let Some(batch) = next else {
                    open = false;
                    break;
                };
                let ids = batch.iter().map(|c| c.id).collect();
                let id = self.send_out(&Outgoing::Put(level, batch))?;
                in_flight.insert(id, (ids, std::time::Instant::now()));
            }
            if in_flight.is_empty() {
                return Ok(st);
            }
            let (id, resp) = self.recv_any()?;
            if matches!(resp, Response::Error { .. }) {
                // Read what is still owed (the connection stays in step), then fail.
                let err = sc_err(self.shard, resp);
                in_flight.remove(&id);
                while !in_flight.is_empty() {
                    let (id, _) = self.recv_any()?;
                    in_flight.remove(&id);
                }
                return Err(err);
            }
            let Some((ids, sent)) = in_flight.remove(&id) else {
                return Err(ClientError::Protocol {
                    shard: self.shard,
                    detail: format!("reply to request {id}, which is not in flight"),
                });
            };
            st.request_latency.push(sent.elapsed());
            match resp {
                Response::PutReply {
                    claim_epoch,
                    results,
                } if results.len() == ids.len() => {
                    st.claim_epoch = st.claim_epoch.min(claim_epoch);
                    for (r, id) in results.into_iter().zip(ids) {
                        match r {
                            PutResult::Stored => st.stored += 1,
                            PutResult::Duplicate => st.duplicate += 1,
                            PutResult::Rejected => st.rejected.push(id),
                        }
                    }
                }
                Response::PutReply { .. } => {
                    return Err(ClientError::Protocol {
                        shard: self.shard,
                        detail: "reply does not match its request's batch".into(),
                    })
                }
                other => return Err(sc_err(self.shard, other)),
            }
        }
    }

    /// Send `reqs` keeping up to `credits` in flight; `on_reply(i, response)` for each,
    /// in whatever order the node answers (a shard completes requests out of order).
    fn pipeline(
        &mut self,
        reqs: Vec<Outgoing>,
        mut on_reply: impl FnMut(usize, Response) -> Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        let mut in_flight: HashMap<u64, usize> = HashMap::new();
        let mut next = reqs.into_iter().enumerate();
        // After a refused request nothing more is sent, but the replies still owed are
        // read, so the connection stays in step for the next call (a retry, say).
        let mut first_err: Option<ClientError> = None;
        loop {
            while first_err.is_none() && in_flight.len() < self.credits {
                match next.next() {
                    Some((i, r)) => {
                        let id = self.send_out(&r)?;
                        in_flight.insert(id, i);
                    }
                    None => break,
                }
            }
            if in_flight.is_empty() {
                return first_err.map_or(Ok(()), Err);
            }
            let (id, resp) = self.recv_any()?;
            let Some(i) = in_flight.remove(&id) else {
                return Err(ClientError::Protocol {
                    shard: self.shard,
                    detail: format!("reply to request {id}, which is not in flight"),
                });
            };
            if first_err.is_none() {
                if let Err(e) = on_reply(i, resp) {
                    first_err = Some(e);
                }
            }
        }
    }
}

/// A chunk as the node stores it: codec, plaintext length, stored bytes.
pub type StoredReply = (chunk::Codec, u32, Vec<u8>);

/// What a [`HiveClient::put_stream`] did, over all its chunks.
#[derive(Clone, Debug, Default)]
pub struct PutStreamStats {
    pub stored: u64,
    pub duplicate: u64,
    /// Chunks a shard refused (their bytes do not hash to their id).
    pub rejected: Vec<ChunkId>,
    /// The oldest claim epoch among the answers.
    pub claim_epoch: u64,
    /// Time from sending each `Put` request to its reply.
    pub request_latency: Vec<Duration>,
}

impl PutStreamStats {
    fn add(&mut self, o: PutStreamStats) {
        self.stored += o.stored;
        self.duplicate += o.duplicate;
        self.rejected.extend(o.rejected);
        self.claim_epoch = self.claim_epoch.min(o.claim_epoch);
        self.request_latency.extend(o.request_latency);
    }
}

/// What an upload did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UploadStats {
    pub chunks: u64,
    /// Chunks the hive already had (by `has`, or found duplicate at put).
    pub deduped: u64,
    pub uploaded: u64,
    pub raw_bytes: u64,
    /// Stored (compressed) bytes sent over the network.
    pub sent_bytes: u64,
    /// The oldest claim epoch among the answers (the GC epoch every claim belongs to, at
    /// the least; see `scatter`).
    pub claim_epoch: u64,
}

/// Open a TCP connection to `host:port` and wrap it (TLS with the pinned CA unless
/// `o.ca_fingerprint` is `None`); no Hello yet. Same token and CA for every node.
pub(crate) fn dial_host(
    o: &ClientOptions,
    host: &str,
    port: u32,
) -> Result<FramedConn<TcpStream>, ClientError> {
    let addr = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let sock = std::net::ToSocketAddrs::to_socket_addrs(&addr)
        .map_err(|source| ClientError::Connect {
            addr: addr.clone(),
            source,
        })?
        .next()
        .ok_or_else(|| ClientError::Connect {
            addr: addr.clone(),
            source: std::io::Error::other("no address"),
        })?;
    let stream = TcpStream::connect_timeout(&sock, o.connect_timeout).map_err(|source| {
        ClientError::Connect {
            addr: addr.clone(),
            source,
        }
    })?;
    let _ = stream.set_nodelay(true);
    if let Err(e) = hivefs_net::tcp::detect_dead_peer(&stream) {
        tracing::warn!("{addr}: dead-peer detection not set: {e}");
    }
    let tls = match &o.ca_fingerprint {
        Some(fp) => {
            let cfg = hivefs_net::tls::client_config_pinned(fp)
                .map_err(|e| ClientError::Tls(e.to_string()))?;
            let name =
                hivefs_net::tls::server_name(host.trim_start_matches('[').trim_end_matches(']'))
                    .map_err(|e| ClientError::Tls(e.to_string()))?;
            Some((cfg, name))
        }
        None => None,
    };
    FramedConn::new_client(stream, tls).map_err(|source| ClientError::Conn {
        shard: u16::MAX,
        source,
    })
}

impl ClientError {
    /// Name the shard in a connection error raised before the shard was known.
    fn for_shard(self, shard: u16) -> ClientError {
        match self {
            ClientError::Conn { source, .. } => ClientError::Conn { shard, source },
            e => e,
        }
    }
}

/// How long a put or has keeps retrying after the map changed under it (a primary that
/// moved, a node that went away and is being marked down) before it gives up.
pub const RETRY_FOR: Duration = Duration::from_secs(12);
/// A map older than this is fetched again before the next put or has.
pub const MAP_REFRESH: Duration = Duration::from_secs(5);
/// A chunk no node has makes a read fetch the map again, if it is older than this.
const MAP_RECHECK: Duration = Duration::from_secs(1);
/// How long a read waits for the map of a node that has none yet.
const UNPLACED_WAIT: Duration = Duration::from_secs(5);
/// A node whose connection failed is tried last by reads for this long.
const SUSPECT_FOR: Duration = Duration::from_secs(5);

/// Where one chunk request goes: a node of the map (0 before the hive has a map: the node
/// first contacted) and one of its shards. Two dests are the same connection when they
/// name the same endpoint (`node` is what the map calls it, for bookkeeping).
#[derive(Clone, Debug)]
struct Dest {
    node: u64,
    host: String,
    base_port: u16,
    shard: u16,
}

impl Dest {
    fn endpoint(&self) -> (&str, u16, u16) {
        (&self.host, self.base_port, self.shard)
    }
}

impl PartialEq for Dest {
    fn eq(&self, o: &Dest) -> bool {
        self.endpoint() == o.endpoint()
    }
}

impl Eq for Dest {}

impl std::hash::Hash for Dest {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.endpoint().hash(h)
    }
}

/// A connected client. See the module docs.
pub struct HiveClient {
    opts: ClientOptions,
    /// The first node's map: dedupe key, bucket count, its shards.
    map: ClusterMap,
    /// The hive's placement (no nodes: everything goes to the first node).
    hive: HiveMap,
    /// Every bucket's nodes in rendezvous order, for `hive`.
    order: Placement,
    map_fetched: std::time::Instant,
    /// Open connections, by destination; `None` after one failed.
    conns: Vec<Option<ShardConn>>,
    dests: HashMap<Dest, usize>,
    /// Nodes whose connection failed recently, and when.
    suspect: HashMap<u64, std::time::Instant>,
}

/// Items grouped by connection index.
type Groups<T> = Vec<Option<Vec<(usize, T)>>>;
/// Items that could not be routed or whose node could not be reached.
type Unrouted<T> = Vec<(usize, T, Option<ClientError>)>;

impl HiveClient {
    /// The copies chunks put from now on are asked to have, and that `has` looks for
    /// (a volume's `copies`; at least 1).
    pub fn set_level(&mut self, level: u8) {
        self.opts.level = level.clamp(1, hivefs_net::proto::MAX_LEVEL);
    }

    /// Connect to the node at `o` (every shard), fetch its map and the hive's placement
    /// map; connections to other nodes open when first needed.
    pub fn connect(o: &ClientOptions) -> Result<HiveClient, ClientError> {
        let (mut first, shard_count) = ShardConn::open(o, &o.host, o.base_port, 0)?;
        let map = match first.call(&Request::Map)? {
            Response::MapReply { map } => map,
            other => return Err(first.unexpected(other)),
        };
        if map.shard_count != shard_count {
            return Err(ClientError::Protocol {
                shard: 0,
                detail: "map and hello disagree on the shard count".into(),
            });
        }
        let hive = match first.call(&Request::HiveMap)? {
            Response::HiveMapReply { map: m } if m.bucket_count == map.bucket_count => m,
            Response::HiveMapReply { .. } => {
                return Err(ClientError::Protocol {
                    shard: 0,
                    detail: "the placement map and the node disagree on the bucket count".into(),
                })
            }
            other => return Err(first.unexpected(other)),
        };
        let mut c = HiveClient {
            opts: o.clone(),
            order: hive.placement(usize::MAX),
            hive,
            map,
            map_fetched: std::time::Instant::now(),
            conns: Vec::new(),
            dests: HashMap::new(),
            suspect: HashMap::new(),
        };
        let d = c.home_dest(0);
        c.dests.insert(d, 0);
        c.conns.push(Some(first));
        // A node moments after its start or join may not have the hive's map yet: wait a
        // little for it (puts are refused until then, and reads would see one node).
        let deadline = std::time::Instant::now() + UNPLACED_WAIT;
        while !c.placed() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            c.refresh_map();
        }
        // The first node's shards at once (a node that is not there fails here, not later).
        for s in 1..shard_count {
            c.conn(&c.home_dest(s))?;
        }
        Ok(c)
    }

    /// The first node's map (dedupe key, bucket count, its shards).
    pub fn map(&self) -> &ClusterMap {
        &self.map
    }

    /// The hive's placement map as last fetched.
    pub fn hive_map(&self) -> &HiveMap {
        &self.hive
    }

    /// The first node's id in the placement map (0 if it is not in it).
    fn home_node(&self) -> u64 {
        self.hive
            .nodes
            .iter()
            .find(|n| n.name == self.map.node_id)
            .map_or(0, |n| n.id)
    }

    fn home_dest(&self, shard: u16) -> Dest {
        Dest {
            node: self.home_node(),
            host: self.opts.host.clone(),
            base_port: self.opts.base_port,
            shard,
        }
    }

    /// Destination of `node` for a chunk of `bucket`. The node first contacted is reached
    /// where the caller reached it (its advertised host may be a name only others use).
    fn dest(&self, node: u64, bucket: u32) -> Option<Dest> {
        let n = self.hive.node(node)?;
        let shard = (bucket % n.shards.max(1) as u32) as u16;
        if n.name == self.map.node_id {
            return Some(self.home_dest(shard));
        }
        Some(Dest {
            node,
            host: n.host.clone(),
            base_port: n.base_port,
            shard,
        })
    }

    /// Whether the hive has a placement map with the first node in it (else the first
    /// node takes everything, as a brand-new one-node hive does until it registers).
    fn placed(&self) -> bool {
        self.hive.node(self.home_node()).is_some()
    }

    /// Where puts and has of `id` go: its bucket's primary.
    fn primary_dest(&self, id: &ChunkId) -> Option<Dest> {
        if !self.placed() {
            return Some(self.home_dest(self.map.shard_of(id)));
        }
        let b = self.hive.bucket_of(id);
        let p = self.hive.primary(self.order.replicas(b))?;
        self.dest(p, b)
    }

    /// Where reads of `id` go, best first: the bucket's nodes not down, then down ones,
    /// nodes whose connection failed lately last of all.
    fn read_dests(&self, id: &ChunkId) -> Vec<Dest> {
        if !self.placed() {
            return vec![self.home_dest(self.map.shard_of(id))];
        }
        let b = self.hive.bucket_of(id);
        let mut order = self.hive.read_order(self.order.replicas(b));
        let suspect = |n: &u64| {
            self.suspect
                .get(n)
                .is_some_and(|t| t.elapsed() < SUSPECT_FOR)
        };
        order.sort_by_key(suspect); // stable: keeps the order within each class
        order.into_iter().filter_map(|n| self.dest(n, b)).collect()
    }

    /// The connection index for `d`, opening it if needed.
    fn conn(&mut self, d: &Dest) -> Result<usize, ClientError> {
        if let Some(&i) = self.dests.get(d) {
            if self.conns[i].is_some() {
                return Ok(i);
            }
        }
        match ShardConn::open(&self.opts, &d.host, d.base_port, d.shard) {
            Ok((sc, _)) => {
                let i = match self.dests.get(d) {
                    Some(&i) => i,
                    None => {
                        self.conns.push(None);
                        self.dests.insert(d.clone(), self.conns.len() - 1);
                        self.conns.len() - 1
                    }
                };
                self.conns[i] = Some(sc);
                Ok(i)
            }
            Err(e) => {
                self.suspect.insert(d.node, std::time::Instant::now());
                Err(e)
            }
        }
    }

    /// Drop the connection `i` after it failed (the node is suspect for a while).
    fn drop_conn(&mut self, i: usize) {
        self.conns[i] = None;
        if let Some((d, _)) = self.dests.iter().find(|(_, &j)| j == i) {
            self.suspect.insert(d.node, std::time::Instant::now());
        }
    }

    /// Fetch the placement map again: from the first node, else from any node of the map.
    /// Keeps the one it has if none answers or none is newer.
    pub fn refresh_map(&mut self) {
        self.map_fetched = std::time::Instant::now();
        let mut candidates = vec![self.home_dest(0)];
        for n in &self.hive.nodes {
            if let Some(d) = self.dest(n.id, 0) {
                if !candidates.contains(&d) {
                    candidates.push(d);
                }
            }
        }
        for d in candidates {
            let Ok(i) = self.conn(&d) else { continue };
            let Some(sc) = self.conns[i].as_mut() else {
                continue;
            };
            match sc.call(&Request::HiveMap) {
                Ok(Response::HiveMapReply { map }) if map.bucket_count == self.map.bucket_count => {
                    if map.epoch > self.hive.epoch {
                        tracing::debug!(epoch = map.epoch, "placement map");
                        self.order = map.placement(usize::MAX);
                        self.hive = map;
                    }
                    return;
                }
                Ok(_) => {}
                Err(_) => self.drop_conn(i),
            }
        }
    }

    /// Run `work[i]` on connection `i` for every `Some`, all in parallel; `(i, result)`
    /// for each busy connection, in index order. The first busy connection runs on the
    /// caller's thread, each other one on a scoped thread: a call that touches one
    /// connection (a small get, as a mount's reads make) starts no thread at all.
    /// Starting one per shard for every call was a visible share of `hi`'s CPU on reads.
    fn per_conn<W: Send, R: Send>(
        &mut self,
        work: Vec<Option<W>>,
        f: impl Fn(&mut ShardConn, W) -> Result<R, ClientError> + Sync,
    ) -> Vec<(usize, Result<R, ClientError>)> {
        let f = &f;
        let mut busy = self
            .conns
            .iter_mut()
            .zip(work)
            .enumerate()
            .filter_map(|(i, (sc, w))| Some((i, sc.as_mut()?, w?)));
        let Some((i0, first, w)) = busy.next() else {
            return Vec::new();
        };
        let rest: Vec<_> = busy.collect();
        if rest.is_empty() {
            return vec![(i0, f(first, w))];
        }
        std::thread::scope(|scope| {
            let handles: Vec<_> = rest
                .into_iter()
                .map(|(i, sc, w)| (i, scope.spawn(move || f(sc, w))))
                .collect();
            let mine = f(first, w);
            std::iter::once((i0, mine))
                .chain(
                    handles.into_iter().map(|(i, h)| {
                        (i, h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                    }),
                )
                .collect()
        })
    }

    /// Group `items` by the connection of their destination (opening connections as
    /// needed). An item with no destination, or whose node cannot be reached, is returned
    /// apart with the error.
    fn group<T>(
        &mut self,
        items: impl IntoIterator<Item = (usize, T)>,
        dest: impl Fn(&Self, &T) -> Option<Dest>,
    ) -> (Groups<T>, Unrouted<T>) {
        let mut groups: Groups<T> = Vec::new();
        let mut failed = Vec::new();
        let mut tried: HashMap<Dest, Result<usize, String>> = HashMap::new();
        // A host that could not be reached is not dialled again for its other shards in
        // this call: a silent host costs one connect timeout, not one per shard.
        let mut unreachable: HashMap<String, String> = HashMap::new();
        for (i, t) in items {
            let Some(d) = dest(self, &t) else {
                failed.push((i, t, None));
                continue;
            };
            if !tried.contains_key(&d) {
                let c = match unreachable.get(&d.host) {
                    Some(e) => Err(e.clone()),
                    None => match self.conn(&d) {
                        Ok(c) => Ok(c),
                        Err(e) => {
                            let connect = matches!(e, ClientError::Connect { .. });
                            let e = e.to_string();
                            if connect {
                                unreachable.insert(d.host.clone(), e.clone());
                            }
                            Err(e)
                        }
                    },
                };
                tried.insert(d.clone(), c);
            }
            match &tried[&d] {
                Ok(c) => {
                    if groups.len() <= *c {
                        groups.resize_with(c + 1, || None);
                    }
                    groups[*c].get_or_insert_with(Vec::new).push((i, t));
                }
                Err(e) => {
                    let e = ClientError::Connect {
                        addr: format!("{}:{}", d.host, d.base_port as u32 + d.shard as u32),
                        source: std::io::Error::other(e.clone()),
                    };
                    failed.push((i, t, Some(e)));
                }
            }
        }
        groups.resize_with(self.conns.len(), || None);
        (groups, failed)
    }

    /// Send `items` to their primaries, cut into requests by `batches`, pipelined per
    /// connection and all connections in parallel. `answer` turns the reply to a batch
    /// into one answer per item of the batch and the claim epoch, or hands back a reply of
    /// the wrong kind; a count that does not match the batch is a protocol error. Returns
    /// the answers in the order of `items` and the *oldest* claim epoch among the answers:
    /// a claim is only as good as its oldest part (a shard that had not yet heard of a new
    /// GC epoch stamps the old one, and its claim is not recorded by the new collection; a
    /// commit must then be refused and the chunks claimed again).
    ///
    /// Where the map moved under the call (a primary unreachable, a node answering that it
    /// is not the primary, too few copies while a node is being marked down) the map is
    /// fetched again and the whole call retried, for up to [`RETRY_FOR`]: every request
    /// here is idempotent.
    fn scatter<'a, T: Sync, A: Send + Clone>(
        &mut self,
        items: &'a [T],
        id_of: impl Fn(&T) -> ChunkId + Sync + Copy,
        batches: impl Fn(&[(usize, &'a T)]) -> Vec<Vec<(usize, &'a T)>> + Sync + Copy,
        request: impl Fn(&[(usize, &'a T)]) -> Outgoing<'a> + Sync + Copy,
        answer: impl Fn(Response) -> Result<(Vec<A>, u64), Response> + Sync + Copy,
        unanswered: A,
    ) -> Result<(Vec<A>, u64), ClientError> {
        if self.map_fetched.elapsed() >= MAP_REFRESH {
            self.refresh_map();
        }
        let deadline = std::time::Instant::now() + RETRY_FOR;
        let mut pause = Duration::from_millis(50);
        loop {
            let r = self.scatter_once(items, id_of, batches, request, answer, unanswered.clone());
            match r {
                Err(e) if self.retryable(&e) && std::time::Instant::now() < deadline => {
                    tracing::debug!("chunk call retried after a map change: {e}");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(1));
                    self.refresh_map();
                }
                Err(e) => {
                    tracing::debug!(
                        retryable = self.retryable(&e),
                        map_epoch = self.hive.epoch,
                        "chunk call failed: {e}"
                    );
                    return Err(e);
                }
                r => return r,
            }
        }
    }

    fn scatter_once<'a, T: Sync, A: Send + Clone>(
        &mut self,
        items: &'a [T],
        id_of: impl Fn(&T) -> ChunkId,
        batches: impl Fn(&[(usize, &'a T)]) -> Vec<Vec<(usize, &'a T)>> + Sync,
        request: impl Fn(&[(usize, &'a T)]) -> Outgoing<'a> + Sync,
        answer: impl Fn(Response) -> Result<(Vec<A>, u64), Response> + Sync,
        unanswered: A,
    ) -> Result<(Vec<A>, u64), ClientError> {
        let (groups, failed) =
            self.group(items.iter().enumerate(), |c, t| c.primary_dest(&id_of(t)));
        if let Some((_, t, e)) = failed.into_iter().next() {
            return Err(e.unwrap_or_else(|| ClientError::Refused {
                shard: u16::MAX,
                code: ErrorCode::NotPrimary,
                message: format!("no primary for chunk {} in the map", id_of(t)),
            }));
        }
        let answers = self.per_conn(groups, |sc, group| {
            let batches = batches(&group);
            let reqs = batches.iter().map(|b| request(b)).collect();
            let mut out = Vec::with_capacity(group.len());
            let mut epoch = u64::MAX;
            let shard = sc.shard;
            sc.pipeline(reqs, |i, r| match answer(r) {
                Ok((values, e)) if values.len() == batches[i].len() => {
                    epoch = epoch.min(e);
                    out.extend(batches[i].iter().map(|(idx, _)| *idx).zip(values));
                    Ok(())
                }
                Ok(_) => Err(ClientError::Protocol {
                    shard,
                    detail: "reply does not match its request's batch".into(),
                }),
                Err(other) => Err(sc_err(shard, other)),
            })?;
            Ok((out, epoch))
        });
        let mut results = vec![unanswered; items.len()];
        let mut epoch = u64::MAX;
        let mut first_err = None;
        for (i, r) in answers {
            match r {
                Ok((group, e)) => {
                    epoch = epoch.min(e);
                    for (k, a) in group {
                        results[k] = a;
                    }
                }
                Err(e) => {
                    if matches!(e, ClientError::Conn { .. }) {
                        self.drop_conn(i);
                    }
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok((results, if epoch == u64::MAX { 0 } else { epoch })),
        }
    }

    /// Which ids the hive holds (verified) at this client's level or higher, asked of each
    /// id's primary. Returns `(present, claim_epoch)`.
    pub fn has(&mut self, ids: &[ChunkId]) -> Result<(Vec<bool>, u64), ClientError> {
        let level = self.opts.level;
        self.scatter(
            ids,
            |id| *id,
            |group| {
                group
                    .chunks(HAS_BATCH_IDS.min(MAX_BATCH_IDS))
                    .map(<[_]>::to_vec)
                    .collect()
            },
            |b| {
                Outgoing::Request(Request::Has {
                    level,
                    ids: b.iter().map(|(_, id)| **id).collect(),
                })
            },
            |r| match r {
                Response::HasReply {
                    claim_epoch,
                    present,
                } => Ok((present, claim_epoch)),
                other => Err(other),
            },
            false,
        )
    }

    /// Store chunks, each at its bucket's primary (which makes the other copies before it
    /// answers), batched and pipelined. Returns one result per chunk and the claim epoch.
    pub fn put(&mut self, chunks: &[PutChunk]) -> Result<(Vec<PutResult>, u64), ClientError> {
        let level = self.opts.level;
        self.scatter(
            chunks,
            |c| c.id,
            batch_puts,
            |b| Outgoing::Put(level, b.iter().map(|(_, c)| *c).collect()),
            |r| match r {
                Response::PutReply {
                    claim_epoch,
                    results,
                } => Ok((results, claim_epoch)),
                other => Err(other),
            },
            PutResult::Rejected,
        )
    }

    /// Store a stream of chunk batches, keeping every connection busy across them: one
    /// thread per destination keeps up to its credits of `Put` requests in flight and
    /// takes the next batch as soon as a slot frees, instead of waiting, as
    /// [`HiveClient::put`] does, for the slowest shard before the next call. For bulk
    /// uploads (a stream of calls whose results are wanted only in total). No retries: an
    /// error ends the stream.
    pub fn put_stream<'a>(
        &mut self,
        calls: impl IntoIterator<Item = &'a [PutChunk]>,
    ) -> Result<PutStreamStats, ClientError> {
        // Each bucket's connection (its primary's shard), opened up front.
        let mut route: Vec<usize> = Vec::new();
        if self.placed() {
            for b in 0..self.hive.bucket_count {
                let d = self
                    .hive
                    .primary(self.order.replicas(b))
                    .and_then(|p| self.dest(p, b));
                route.push(match d {
                    Some(d) => self.conn(&d)?,
                    None => usize::MAX,
                });
            }
        } else {
            let home: Vec<usize> = (0..self.map.shard_count)
                .map(|s| self.conn(&self.home_dest(s)))
                .collect::<Result<_, _>>()?;
            for b in 0..self.map.bucket_count {
                route.push(home[self.map.bucket_to_shard[b as usize] as usize]);
            }
        }
        let bucket_count = self.map.bucket_count;
        let level = self.opts.level;
        std::thread::scope(|scope| {
            let mut feeds = HashMap::new();
            let mut workers = Vec::new();
            for (i, sc) in self.conns.iter_mut().enumerate() {
                let Some(sc) = sc.as_mut() else { continue };
                if !route.contains(&i) {
                    continue;
                }
                let (tx, rx) =
                    crossbeam_channel::bounded::<Vec<&'a PutChunk>>(sc.credits.max(1) * 2);
                feeds.insert(i, tx);
                workers.push(scope.spawn(move || sc.put_stream(level, rx)));
            }
            let mut fed = Ok(());
            'calls: for call in calls {
                let mut groups: HashMap<usize, Vec<(usize, &PutChunk)>> = HashMap::new();
                for (k, c) in call.iter().enumerate() {
                    let i = route[c.id.bucket(bucket_count) as usize];
                    groups.entry(i).or_default().push((k, c));
                }
                for (i, group) in groups {
                    let Some(feed) = feeds.get(&i) else {
                        fed = Err(ClientError::Protocol {
                            shard: u16::MAX,
                            detail: "a chunk has no primary in the map".into(),
                        });
                        break 'calls;
                    };
                    for batch in batch_puts(&group) {
                        let batch = batch.into_iter().map(|(_, c)| c).collect();
                        // A worker that stopped on an error has dropped its end.
                        if feed.send(batch).is_err() {
                            break 'calls;
                        }
                    }
                }
            }
            drop(feeds);
            let mut total = PutStreamStats {
                claim_epoch: u64::MAX,
                ..Default::default()
            };
            let mut first_err = fed.err();
            for w in workers {
                match w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)) {
                    Ok(st) => total.add(st),
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            if let Some(e) = first_err {
                return Err(e);
            }
            if total.claim_epoch == u64::MAX {
                total.claim_epoch = 0;
            }
            Ok(total)
        })
    }

    /// Has-then-put: ask which chunks the hive lacks and upload only those. A chunk the
    /// node rejects is an error (it means this client computed a wrong id).
    ///
    /// Copies every chunk; a caller that owns its chunks uses
    /// [`HiveClient::upload_in_place`], which copies none.
    pub fn upload(&mut self, chunks: &[PreparedChunk]) -> Result<UploadStats, ClientError> {
        self.upload_in_place(&mut chunks.to_vec())
    }

    /// [`HiveClient::upload`] without copying chunk bytes: the stored bytes of each missing
    /// chunk are moved into the put request and moved back into `chunks` before this
    /// returns, on success and on error alike (so a caller can retry with the same
    /// chunks). The copy this avoids was 10% of `hi`'s CPU during a sequential write.
    pub fn upload_in_place(
        &mut self,
        chunks: &mut [PreparedChunk],
    ) -> Result<UploadStats, ClientError> {
        let ids: Vec<ChunkId> = chunks.iter().map(|c| c.id).collect();
        let (present, epoch) = self.has(&ids)?;
        let mut missing: Vec<PutChunk> = Vec::new();
        // Where each of `missing` came from, to give its bytes back.
        let mut from: Vec<usize> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut st = UploadStats {
            chunks: chunks.len() as u64,
            claim_epoch: epoch,
            ..Default::default()
        };
        for (i, (c, p)) in chunks.iter_mut().zip(&present).enumerate() {
            st.raw_bytes += c.raw_len as u64;
            if *p || !seen.insert(c.id) {
                st.deduped += 1;
                continue;
            }
            st.sent_bytes += c.stored.len() as u64;
            missing.push(PutChunk {
                id: c.id,
                codec: c.codec,
                raw_len: c.raw_len,
                data: std::mem::take(&mut c.stored),
            });
            from.push(i);
        }
        if missing.is_empty() {
            return Ok(st);
        }
        let put = self.put(&missing);
        let rejected = match &put {
            Ok((results, _)) => missing
                .iter()
                .zip(results)
                .find(|(_, r)| **r == PutResult::Rejected)
                .map(|(c, _)| c.id),
            Err(_) => None,
        };
        for (c, i) in missing.into_iter().zip(from) {
            chunks[i].stored = c.data;
        }
        let (results, epoch) = put?;
        if let Some(id) = rejected {
            return Err(ClientError::Rejected(id));
        }
        // The has answers claimed the rest: the oldest epoch of all counts.
        st.claim_epoch = st.claim_epoch.min(epoch);
        for r in results {
            match r {
                PutResult::Stored => st.uploaded += 1,
                PutResult::Duplicate => st.deduped += 1,
                PutResult::Rejected => unreachable!("checked above"),
            }
        }
        Ok(st)
    }

    /// Fetch chunks and return their verified plaintext, in order. `None` for an id the
    /// hive does not hold. A copy that fails verification counts as missing there: the
    /// next replica is asked; if no copy is intact, that is an error.
    pub fn get(&mut self, ids: &[ChunkId]) -> Result<Vec<Option<Vec<u8>>>, ClientError> {
        let key = self.map.dedupe_key;
        let mut bad: Option<ClientError> = None;
        let out =
            self.get_from_replicas(ids, |id, (codec, raw_len, data)| match chunk::verify_owned(
                &key,
                id,
                codec,
                data,
                raw_len as usize,
            ) {
                Ok(v) => Some(v),
                Err(source) => {
                    tracing::warn!("chunk {id} failed verification: {source}; asking another copy");
                    bad.get_or_insert(ClientError::Verify { id: *id, source });
                    None
                }
            })?;
        match bad {
            Some(e) if out.iter().any(Option::is_none) => Err(e),
            _ => Ok(out),
        }
    }

    /// Fetch chunks as stored (codec, raw length, bytes), unverified: for benchmarks that
    /// measure the node, and for callers that verify later.
    pub fn get_stored(&mut self, ids: &[ChunkId]) -> Result<Vec<Option<StoredReply>>, ClientError> {
        self.get_from_replicas(ids, |_, s| Some(s))
    }

    /// [`get_from_replicas`](Self::get_from_replicas), asked again with a fresh map for the
    /// chunks no node had (this client's map may predate the node holding them).
    fn get_from_replicas<R: Send + Clone>(
        &mut self,
        ids: &[ChunkId],
        mut accept: impl FnMut(&ChunkId, StoredReply) -> Option<R>,
    ) -> Result<Vec<Option<R>>, ClientError> {
        let mut out = self.get_once(ids, &mut accept)?;
        let missing: Vec<usize> = (0..ids.len()).filter(|&i| out[i].is_none()).collect();
        if missing.is_empty() || (self.placed() && self.map_fetched.elapsed() < MAP_RECHECK) {
            return Ok(out);
        }
        let epoch = self.hive.epoch;
        self.refresh_map();
        // A node that has not caught up with the hive's map yet (moments after it joined
        // or restarted) knows no other node: wait a little for its map.
        let deadline = std::time::Instant::now() + UNPLACED_WAIT;
        while !self.placed() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            self.refresh_map();
        }
        if self.hive.epoch != epoch {
            let again: Vec<ChunkId> = missing.iter().map(|&i| ids[i]).collect();
            for (i, r) in missing.into_iter().zip(self.get_once(&again, &mut accept)?) {
                out[i] = r;
            }
        }
        Ok(out)
    }

    /// Ask each id's replicas in read order until one has it and `accept` takes it.
    /// An error from one node (unreachable, a broken connection, a refusal) only moves on
    /// to the next; the call fails when no node could answer for some chunk.
    fn get_once<R: Send + Clone>(
        &mut self,
        ids: &[ChunkId],
        accept: &mut impl FnMut(&ChunkId, StoredReply) -> Option<R>,
    ) -> Result<Vec<Option<R>>, ClientError> {
        let mut out: Vec<Option<R>> = vec![None; ids.len()];
        let routes: Vec<Vec<Dest>> = ids.iter().map(|id| self.read_dests(id)).collect();
        // Per id: whether some node answered it (found or not), and the last error.
        let mut answered = vec![false; ids.len()];
        let mut last_err: Vec<Option<ClientError>> = (0..ids.len()).map(|_| None).collect();
        let mut todo: Vec<usize> = (0..ids.len()).collect();
        let mut rank = 0;
        while !todo.is_empty() {
            let items: Vec<(usize, usize)> = todo
                .iter()
                .filter(|&&i| rank < routes[i].len())
                .map(|&i| (i, i))
                .collect();
            if items.is_empty() {
                break;
            }
            let (groups, failed) = self.group(items, |_, &i| Some(routes[i][rank].clone()));
            for (i, _, e) in failed {
                last_err[i] = e;
            }
            let members: Vec<Option<Vec<usize>>> = groups
                .iter()
                .map(|g| g.as_ref().map(|g| g.iter().map(|(i, _)| *i).collect()))
                .collect();
            let replies = self.per_conn(groups, |sc, group| {
                let mut got = Vec::with_capacity(group.len());
                let reqs = group
                    .iter()
                    .map(|(i, _)| Outgoing::Request(Request::Get { id: ids[*i] }))
                    .collect();
                let shard = sc.shard;
                sc.pipeline(reqs, |k, r| match r {
                    Response::GetReply { chunk } => {
                        got.push((group[k].0, chunk));
                        Ok(())
                    }
                    other => Err(sc_err(shard, other)),
                })?;
                Ok(got)
            });
            for (c, r) in replies {
                match r {
                    Ok(got) => {
                        for (i, chunk) in got {
                            answered[i] = true;
                            if let (Some(s), None) = (chunk, &out[i]) {
                                out[i] = accept(&ids[i], s);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::debug!("reading chunks: {e}");
                        if matches!(e, ClientError::Conn { .. }) {
                            self.drop_conn(c);
                        }
                        let msg = e.to_string();
                        for &i in members[c].iter().flatten() {
                            last_err[i] = Some(ClientError::Protocol {
                                shard: u16::MAX,
                                detail: msg.clone(),
                            });
                        }
                    }
                }
            }
            todo.retain(|&i| out[i].is_none());
            rank += 1;
        }
        if let Some(i) = todo.iter().copied().find(|&i| !answered[i]) {
            return Err(last_err[i].take().unwrap_or_else(|| ClientError::Protocol {
                shard: u16::MAX,
                detail: format!("no node of the map holds a replica of {}", ids[i]),
            }));
        }
        Ok(out)
    }

    /// Errors a retry after fetching the map may cure: a refusal because the map moved,
    /// too few copies while a node is being marked down, or an unreachable node where the
    /// hive has another to take over (a one-node hive's caller sees its failure at once).
    fn retryable(&self, e: &ClientError) -> bool {
        match e {
            ClientError::Refused {
                code: ErrorCode::NotPrimary | ErrorCode::TooFewCopies,
                ..
            } => true,
            ClientError::Connect { .. } | ClientError::Conn { .. } => {
                self.hive.eligible_count() > 1
            }
            _ => false,
        }
    }

    /// The statistics of every shard of the node first contacted (JSON objects as the node
    /// reports them).
    pub fn stats(&mut self) -> Result<Vec<String>, ClientError> {
        let mut work: Vec<Option<()>> = Vec::new();
        for s in 0..self.map.shard_count {
            let i = self.conn(&self.home_dest(s))?;
            if work.len() <= i {
                work.resize(i + 1, None);
            }
            work[i] = Some(());
        }
        let mut out = self
            .per_conn(work, |sc, ()| match sc.call(&Request::Stats)? {
                Response::StatsReply { json } => Ok((sc.shard, json)),
                other => Err(sc.unexpected(other)),
            })
            .into_iter()
            .map(|(_, r)| r)
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by_key(|(shard, _)| *shard);
        Ok(out.into_iter().map(|(_, j)| j).collect())
    }
}

fn sc_err(shard: u16, r: Response) -> ClientError {
    match r {
        Response::Error {
            code: ErrorCode::NoSpace,
            message,
        } => ClientError::NoSpace { shard, message },
        Response::Error { code, message } => ClientError::Refused {
            shard,
            code,
            message,
        },
        other => ClientError::Protocol {
            shard,
            detail: format!("unexpected {:?}", other.opcode()),
        },
    }
}

/// Cut one shard's chunks into `Put` bodies of about [`PUT_BATCH_BYTES`], never above the
/// frame limit or [`MAX_BATCH_CHUNKS`].
fn batch_puts<'a>(group: &[(usize, &'a PutChunk)]) -> Vec<Vec<(usize, &'a PutChunk)>> {
    let mut out = Vec::new();
    let mut cur: Vec<(usize, &PutChunk)> = Vec::new();
    let mut bytes = PUT_BODY_HEADER_BYTES;
    for &(i, c) in group {
        let n = PUT_CHUNK_OVERHEAD_BYTES + c.data.len();
        if !cur.is_empty()
            && (bytes + n > PUT_BATCH_BYTES.min(MAX_BODY_BYTES) || cur.len() == MAX_BATCH_CHUNKS)
        {
            out.push(std::mem::take(&mut cur));
            bytes = PUT_BODY_HEADER_BYTES;
        }
        bytes += n;
        cur.push((i, c));
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod no_space_tests {
    use super::*;

    #[test]
    fn a_full_shard_is_a_distinct_error() {
        let full = Response::Error {
            code: ErrorCode::NoSpace,
            message: "no free segment left on this shard".into(),
        };
        assert!(matches!(
            sc_err(3, full),
            ClientError::NoSpace { shard: 3, .. }
        ));
        let other = Response::Error {
            code: ErrorCode::Internal,
            message: "x".into(),
        };
        assert!(matches!(sc_err(3, other), ClientError::Refused { .. }));
    }
}
