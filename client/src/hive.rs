//! Connections to a hive node: TLS with the pinned hive CA, token authentication, the
//! cluster map, and shard-aware batched `has` / `put` / `get`.
//!
//! A [`HiveClient`] holds one connection per shard (each shard listens on
//! `base_port + shard`) and sends every chunk straight to the shard that owns its bucket.
//! Work for several shards runs in parallel, one thread per shard, and each connection
//! keeps up to its flow-control credits of requests in flight (pipelining).
//!
//! Every chunk read is decompressed and checked against its id before it is returned;
//! a node can never hand a client bytes that do not hash to what was asked for.

use crate::pipeline::PreparedChunk;
use hivefs_net::chunk::{self, ChunkError, ChunkId};
use hivefs_net::conn::{ConnError, FramedConn};
use hivefs_net::frame::{MAX_BODY_BYTES, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};
use hivefs_net::proto::{
    ClusterMap, ErrorCode, PutChunk, PutResult, Request, Response, MAX_BATCH_CHUNKS, MAX_BATCH_IDS,
    PUT_BODY_HEADER_BYTES, PUT_CHUNK_OVERHEAD_BYTES,
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
}

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
    Put(Vec<&'a PutChunk>),
}

struct ShardConn {
    shard: u16,
    conn: FramedConn<TcpStream>,
    version: u16,
    credits: usize,
    next_req: u64,
    /// Reused encoding buffer for outgoing frames.
    frame: Vec<u8>,
}

impl ShardConn {
    fn open(o: &ClientOptions, shard: u16) -> Result<(ShardConn, u16), ClientError> {
        let conn = dial(o, o.base_port as u32 + shard as u32).map_err(|e| e.for_shard(shard))?;
        let mut sc = ShardConn {
            shard,
            conn,
            version: PROTOCOL_VERSION_MIN,
            credits: 1,
            next_req: 1,
            frame: Vec::new(),
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
        match o {
            Outgoing::Request(req) => {
                let (op, body) = req.encode();
                hivefs_net::frame::encode_frame_into(
                    &mut self.frame,
                    self.version,
                    op as u16,
                    id,
                    &body,
                );
            }
            Outgoing::Put(chunks) => {
                let check = self.conn.body_check();
                hivefs_net::proto::frame_put_into(&mut self.frame, check, self.version, id, chunks)
            }
        }
        if self.frame.len() > MAX_BODY_BYTES + hivefs_net::frame::HEADER_BYTES {
            let len = u32::try_from(self.frame.len()).unwrap_or(u32::MAX);
            return Err(ClientError::Conn {
                shard: self.shard,
                source: hivefs_net::frame::FrameError::TooLarge(len).into(),
            });
        }
        self.conn.queue_frame(&self.frame);
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
                let id = self.send_out(&Outgoing::Put(batch))?;
                in_flight.insert(id, (ids, std::time::Instant::now()));
            }
            if in_flight.is_empty() {
                return Ok(st);
            }
            let (id, resp) = self.recv_any()?;
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
        loop {
            while in_flight.len() < self.credits {
                match next.next() {
                    Some((i, r)) => {
                        let id = self.send_out(&r)?;
                        in_flight.insert(id, i);
                    }
                    None => break,
                }
            }
            if in_flight.is_empty() {
                return Ok(());
            }
            let (id, resp) = self.recv_any()?;
            let Some(i) = in_flight.remove(&id) else {
                return Err(ClientError::Protocol {
                    shard: self.shard,
                    detail: format!("reply to request {id}, which is not in flight"),
                });
            };
            on_reply(i, resp)?;
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

/// Open a TCP connection to `o.host:port` and wrap it (TLS with the pinned CA unless
/// `o.ca_fingerprint` is `None`); no Hello yet.
pub(crate) fn dial(o: &ClientOptions, port: u32) -> Result<FramedConn<TcpStream>, ClientError> {
    dial_host(o, &o.host, port)
}

/// [`dial`] another host of the same hive (same token, same pinned CA).
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

/// A connected client. See the module docs.
pub struct HiveClient {
    map: ClusterMap,
    shards: Vec<ShardConn>,
}

fn split_by_shard<T>(
    map: &ClusterMap,
    items: impl IntoIterator<Item = (usize, T)>,
    id_of: impl Fn(&T) -> ChunkId,
) -> Vec<Vec<(usize, T)>> {
    let mut out: Vec<Vec<(usize, T)>> = (0..map.shard_count).map(|_| Vec::new()).collect();
    for (i, t) in items {
        let s = map.shard_of(&id_of(&t)) as usize;
        out[s].push((i, t));
    }
    out
}

impl HiveClient {
    /// Connect to shard 0, fetch the map, then connect to every other shard.
    pub fn connect(o: &ClientOptions) -> Result<HiveClient, ClientError> {
        let (mut first, shard_count) = ShardConn::open(o, 0)?;
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
        let mut shards = vec![first];
        for s in 1..shard_count {
            shards.push(ShardConn::open(o, s)?.0);
        }
        Ok(HiveClient { map, shards })
    }

    pub fn map(&self) -> &ClusterMap {
        &self.map
    }

    /// Run `work[s]` on shard `s`'s connection for every shard that has work (`Some`), all
    /// in parallel; results in shard order. The first busy shard runs on the caller's
    /// thread, each other one on a scoped thread: a call that touches one shard (a small
    /// get, as a mount's reads make) starts no thread at all. Starting one per shard for
    /// every call was a visible share of `hi`'s CPU on reads.
    fn per_shard<W: Send, R: Send>(
        &mut self,
        work: Vec<Option<W>>,
        f: impl Fn(&mut ShardConn, W) -> Result<R, ClientError> + Sync,
    ) -> Result<Vec<R>, ClientError> {
        let f = &f;
        let mut busy = self
            .shards
            .iter_mut()
            .zip(work)
            .filter_map(|(sc, w)| w.map(|w| (sc, w)));
        let Some((first, w)) = busy.next() else {
            return Ok(Vec::new());
        };
        let rest: Vec<_> = busy.collect();
        if rest.is_empty() {
            return Ok(vec![f(first, w)?]);
        }
        let results: Vec<Result<R, ClientError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = rest
                .into_iter()
                .map(|(sc, w)| scope.spawn(move || f(sc, w)))
                .collect();
            let mine = f(first, w);
            std::iter::once(mine)
                .chain(
                    handles
                        .into_iter()
                        .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))),
                )
                .collect()
        });
        results.into_iter().collect()
    }

    /// Send `items` to the shards that own them, cut into requests by `batches`, pipelined
    /// per shard and all shards in parallel. `answer` turns the reply to a batch into one
    /// answer per item of the batch and the claim epoch, or hands back a reply of the wrong
    /// kind; a count that does not match the batch is a protocol error. Returns the answers in the order of `items` and the *oldest* claim epoch among the
    /// answers: a claim is only as good as its oldest part (a shard that had not yet heard
    /// of a new GC epoch stamps the old one, and its claim is not recorded by the new
    /// collection; a commit must then be refused and the chunks claimed again).
    fn scatter<'a, T: Sync, A: Send + Clone>(
        &mut self,
        items: &'a [T],
        id_of: impl Fn(&T) -> ChunkId,
        batches: impl Fn(&[(usize, &'a T)]) -> Vec<Vec<(usize, &'a T)>> + Sync,
        request: impl Fn(&[(usize, &'a T)]) -> Outgoing<'a> + Sync,
        answer: impl Fn(Response) -> Result<(Vec<A>, u64), Response> + Sync,
        unanswered: A,
    ) -> Result<(Vec<A>, u64), ClientError> {
        let groups = split_by_shard(&self.map, items.iter().enumerate(), |t| id_of(t))
            .into_iter()
            .map(|g| (!g.is_empty()).then_some(g))
            .collect();
        let answers = self.per_shard(groups, |sc, group| {
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
        })?;
        let mut results = vec![unanswered; items.len()];
        let mut epoch = u64::MAX;
        for (group, e) in answers {
            epoch = epoch.min(e);
            for (i, a) in group {
                results[i] = a;
            }
        }
        Ok((results, if epoch == u64::MAX { 0 } else { epoch }))
    }

    /// Which ids the hive holds (verified). Returns `(present, claim_epoch)`.
    pub fn has(&mut self, ids: &[ChunkId]) -> Result<(Vec<bool>, u64), ClientError> {
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

    /// Store chunks (each to its owning shard), batched and pipelined. Returns one result
    /// per chunk and the claim epoch.
    pub fn put(&mut self, chunks: &[PutChunk]) -> Result<(Vec<PutResult>, u64), ClientError> {
        self.scatter(
            chunks,
            |c| c.id,
            batch_puts,
            |b| Outgoing::Put(b.iter().map(|(_, c)| *c).collect()),
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

    /// Store a stream of chunk batches, keeping every shard's connection busy across them:
    /// one thread per shard keeps up to its credits of `Put` requests in flight and takes
    /// the next batch as soon as a slot frees, instead of waiting, as [`HiveClient::put`]
    /// does, for the slowest shard before the next call. For bulk uploads (a stream of
    /// calls whose results are wanted only in total).
    pub fn put_stream<'a>(
        &mut self,
        calls: impl IntoIterator<Item = &'a [PutChunk]>,
    ) -> Result<PutStreamStats, ClientError> {
        let map = self.map.clone();
        let shards = self.shards.len();
        std::thread::scope(|scope| {
            let mut feeds = Vec::with_capacity(shards);
            let mut workers = Vec::with_capacity(shards);
            for sc in self.shards.iter_mut() {
                let (tx, rx) =
                    crossbeam_channel::bounded::<Vec<&'a PutChunk>>(sc.credits.max(1) * 2);
                feeds.push(tx);
                workers.push(scope.spawn(move || sc.put_stream(rx)));
            }
            let mut fed = Ok(());
            'calls: for call in calls {
                let groups = split_by_shard(&map, call.iter().enumerate(), |c| c.id);
                for (s, group) in groups.into_iter().enumerate() {
                    for batch in batch_puts(&group) {
                        let batch = batch.into_iter().map(|(_, c)| c).collect();
                        // A worker that stopped on an error has dropped its end.
                        if feeds[s].send(batch).is_err() {
                            fed = Err(());
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
            let mut first_err = None;
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
            debug_assert!(fed.is_ok(), "a feed closes only when its worker failed");
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
    /// hive does not hold.
    pub fn get(&mut self, ids: &[ChunkId]) -> Result<Vec<Option<Vec<u8>>>, ClientError> {
        let stored = self.get_stored(ids)?;
        ids.iter()
            .zip(stored)
            .map(|(id, s)| match s {
                None => Ok(None),
                Some((codec, raw_len, data)) => {
                    chunk::verify_owned(&self.map.dedupe_key, id, codec, data, raw_len as usize)
                        .map(Some)
                        .map_err(|source| ClientError::Verify { id: *id, source })
                }
            })
            .collect()
    }

    /// Fetch chunks as stored (codec, raw length, bytes), unverified: for benchmarks that
    /// measure the node, and for callers that verify later.
    pub fn get_stored(&mut self, ids: &[ChunkId]) -> Result<Vec<Option<StoredReply>>, ClientError> {
        let (chunks, _) = self.scatter(
            ids,
            |id| *id,
            |group| group.iter().map(|g| vec![*g]).collect(),
            |b| Outgoing::Request(Request::Get { id: *b[0].1 }),
            |r| match r {
                Response::GetReply { chunk } => Ok((vec![chunk], 0)),
                other => Err(other),
            },
            None,
        )?;
        Ok(chunks)
    }

    /// Every shard's statistics (JSON objects as the node reports them).
    pub fn stats(&mut self) -> Result<Vec<String>, ClientError> {
        let work = vec![Some(()); self.shards.len()];
        self.per_shard(work, |sc, ()| match sc.call(&Request::Stats)? {
            Response::StatsReply { json } => Ok(json),
            other => Err(sc.unexpected(other)),
        })
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
