//! Chunk benchmarks against a node: unique puts, random gets, `has` batches.
//!
//! Two drivers:
//! - the client library ([`HiveClient`]), the headline figures: work is cut into calls
//!   (`--call-bytes` of chunks, or `--has-call` ids), each pipelined by the client within
//!   the node's credits; the latency histogram is per call;
//! - a lean raw driver ([`RawConn`]) over [`FramedConn`]: frames are encoded before the
//!   clock starts and kept `--depth` requests in flight per shard, so its latency
//!   histogram is per request under load, and the client does as little work as a client
//!   can (no copies beyond the socket write, no per-call threads). The gap between the two
//!   is what the client library costs.

use crate::node::NodeInfo;
use crate::util::{self, Lat, Rng};
use anyhow::{bail, Context, Result};
use hivefs_client::hive::{HiveClient, DEFAULT_LEVEL};
use hivefs_net::chunk::{self, ChunkId, Codec, DedupeKey, CHUNK_ID_BYTES};
use hivefs_net::conn::FramedConn;
use hivefs_net::frame::{
    encode_frame_checked_with, BodyCheck, HEADER_BYTES, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN,
};
use hivefs_net::proto::{
    ClusterMap, Opcode, PutChunk, PutResult, Request, Response, MAX_BATCH_CHUNKS,
    PUT_BODY_HEADER_BYTES, PUT_CHUNK_OVERHEAD_BYTES,
};
use std::collections::BTreeMap;
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// What chunk payloads look like.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DataKind {
    /// Uniformly random: incompressible, stored and sent raw.
    Random,
    /// Half random 1 KiB blocks, half repetitive ones: about 2:1 with LZ4 (the node
    /// decompresses to verify).
    Mixed,
}

/// Unique chunks, hashed and encoded before any clock starts.
pub struct ChunkSet {
    pub chunks: Vec<PutChunk>,
    pub raw_bytes: u64,
    pub wire_bytes: u64,
}

fn fill_payload(rng: &mut Rng, kind: DataKind, buf: &mut [u8]) {
    match kind {
        DataKind::Random => rng.fill(buf),
        DataKind::Mixed => {
            for block in buf.chunks_mut(1024) {
                if rng.next_u64() & 1 == 0 {
                    rng.fill(block);
                } else {
                    let mut pat = [0u8; 64];
                    rng.fill(&mut pat);
                    for (i, b) in block.iter_mut().enumerate() {
                        *b = pat[i % 64];
                    }
                }
            }
        }
    }
}

/// `total` bytes of unique chunks of `chunk_bytes` each, ids under `key`, encoded with
/// LZ4 where it pays. Uses every CPU (this is set-up, not measured).
pub fn make_chunks(
    key: &DedupeKey,
    total: u64,
    chunk_bytes: usize,
    kind: DataKind,
    seed: u64,
) -> ChunkSet {
    let n = (total as usize).div_ceil(chunk_bytes).max(1);
    let threads = util::cpu_count().max(1);
    let all: Vec<usize> = (0..util::cpu_count()).collect();
    let mut parts: Vec<Vec<PutChunk>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let all = all.clone();
                s.spawn(move || {
                    let _ = util::pin_current_thread(&all);
                    let mut rng =
                        Rng::new(seed ^ (t as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
                    let lo = n * t / threads;
                    let hi = n * (t + 1) / threads;
                    let mut out = Vec::with_capacity(hi - lo);
                    let mut buf = vec![0u8; chunk_bytes];
                    for _ in lo..hi {
                        fill_payload(&mut rng, kind, &mut buf);
                        let id = ChunkId::compute(key, &buf);
                        let (codec, data) = match kind {
                            DataKind::Random => (Codec::Raw, buf.clone()),
                            DataKind::Mixed => chunk::compress(Codec::Lz4, &buf),
                        };
                        out.push(PutChunk {
                            id,
                            codec,
                            raw_len: chunk_bytes as u32,
                            data,
                        });
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("chunk generator panicked"))
            .collect()
    });
    let chunks: Vec<PutChunk> = parts.iter_mut().flat_map(std::mem::take).collect();
    let raw_bytes = chunks.iter().map(|c| c.raw_len as u64).sum();
    let wire_bytes = chunks.iter().map(|c| c.data.len() as u64).sum();
    ChunkSet {
        chunks,
        raw_bytes,
        wire_bytes,
    }
}

/// Random ids that no node holds (keyed hash of random bytes under a throwaway key).
pub fn absent_ids(n: usize, seed: u64) -> Vec<ChunkId> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let mut id = [0u8; CHUNK_ID_BYTES];
            rng.fill(&mut id);
            id[0] = chunk::ID_VERSION_BLAKE3_KEYED;
            ChunkId(id)
        })
        .collect()
}

/// One measured phase.
#[derive(Clone)]
pub struct Phase {
    pub name: String,
    pub mode: String,
    pub secs: f64,
    /// Plaintext bytes moved (0 for `has`).
    pub bytes: u64,
    /// Bytes as sent on the wire (stored encoding).
    pub wire_bytes: u64,
    /// Chunks (put/get) or ids (has).
    pub ops: u64,
    pub lat: Lat,
    pub lat_unit: String,
    pub node_cpu: Option<f64>,
    pub node_cpu_note: String,
    pub client_cpu: f64,
    /// Node CPU seconds by thread name (iou-wrk-* grouped), this phase only.
    pub node_threads: Vec<(String, f64)>,
    pub shards: u16,
}

impl Phase {
    pub fn gbps(&self) -> f64 {
        self.bytes as f64 / self.secs / 1e9
    }

    pub fn ops_per_s(&self) -> f64 {
        self.ops as f64 / self.secs
    }

    pub fn node_cpu_per_gib(&self) -> Option<f64> {
        let c = self.node_cpu?;
        (self.bytes > 0).then(|| c / (self.bytes as f64 / util::GIB))
    }

    pub fn client_cpu_per_gib(&self) -> Option<f64> {
        (self.bytes > 0).then(|| self.client_cpu / (self.bytes as f64 / util::GIB))
    }

    /// Node CPU busy fraction of the phase's wall time (1.0 = one core saturated).
    pub fn node_util(&self) -> Option<f64> {
        self.node_cpu.map(|c| c / self.secs)
    }

    pub fn report(&self) -> String {
        let mut s = format!("{:<14} {:<8} {:>7.3}s ", self.name, self.mode, self.secs);
        if self.bytes > 0 {
            s += &format!(
                "{:>7.3} GB/s ({} chunks, wire {:.3} GB/s)",
                self.gbps(),
                self.ops,
                self.wire_bytes as f64 / self.secs / 1e9
            );
        } else {
            s += &format!(
                "{:>12.0} ids/s ({:.0} per shard)",
                self.ops_per_s(),
                self.ops_per_s() / self.shards.max(1) as f64
            );
        }
        s += &format!("\n    latency {}: {}", self.lat_unit, self.lat.describe());
        match (self.node_cpu, self.bytes > 0) {
            (Some(c), true) => {
                s += &format!(
                    "\n    node cpu {:.2}s = {:.3} cpu-s/GiB, {:.0}% of a core; client cpu {:.3} cpu-s/GiB",
                    c,
                    self.node_cpu_per_gib().unwrap_or(f64::NAN),
                    100.0 * self.node_util().unwrap_or(0.0),
                    self.client_cpu_per_gib().unwrap_or(f64::NAN)
                )
            }
            (Some(c), false) => s += &format!("\n    node cpu {:.2}s = {:.0}% of a core, {:.1} ns/id; client cpu {:.2}s", c, 100.0 * c / self.secs, c * 1e9 / self.ops.max(1) as f64, self.client_cpu),
            (None, _) => s += &format!("\n    node cpu not measured: {}", self.node_cpu_note),
        }
        if !self.node_threads.is_empty() {
            let parts: Vec<String> = self
                .node_threads
                .iter()
                .filter(|(_, c)| *c >= 0.005)
                .map(|(n, c)| format!("{n} {c:.2}s"))
                .collect();
            s += &format!("\n    node threads: {}", parts.join(", "));
        }
        s
    }
}

/// CPU and wall clock at the start of a phase.
struct Meter {
    t0: Instant,
    node0: Option<f64>,
    tasks0: Vec<(i32, String, f64)>,
    self0: f64,
}

impl Meter {
    fn start(node: &NodeInfo) -> Meter {
        let tasks0 = node.task_cpu();
        let node0 = node.cpu_secs();
        let self0 = util::self_cpu_secs();
        Meter {
            t0: Instant::now(),
            node0,
            tasks0,
            self0,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        self,
        node: &NodeInfo,
        name: &str,
        bytes: u64,
        wire_bytes: u64,
        ops: u64,
        lat: Lat,
        lat_unit: String,
    ) -> Phase {
        let secs = self.t0.elapsed().as_secs_f64();
        let client_cpu = util::self_cpu_secs() - self.self0;
        let node1 = node.cpu_secs();
        let tasks1 = node.task_cpu();
        let node_cpu = match (self.node0, node1) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        let before: BTreeMap<i32, f64> = self.tasks0.iter().map(|(t, _, c)| (*t, *c)).collect();
        let mut by_name: BTreeMap<String, f64> = BTreeMap::new();
        for (tid, comm, c) in tasks1 {
            let d = c - before.get(&tid).copied().unwrap_or(0.0);
            let name = if comm.starts_with("iou-wrk") {
                "iou-wrk (io_uring workers)".to_string()
            } else if comm.starts_with("iou-sqp") {
                "iou-sqp".to_string()
            } else {
                comm
            };
            *by_name.entry(name).or_default() += d;
        }
        if let Some(total) = node_cpu {
            let seen: f64 = by_name.values().sum();
            if total - seen > 0.01 {
                by_name.insert("(exited threads)".into(), total - seen);
            }
        }
        let mut node_threads: Vec<(String, f64)> = by_name.into_iter().collect();
        node_threads.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal));
        Phase {
            name: name.to_string(),
            mode: node.mode().to_string(),
            secs,
            bytes,
            wire_bytes,
            ops,
            lat,
            lat_unit,
            node_cpu,
            node_cpu_note: node.no_pid_reason.clone(),
            client_cpu,
            node_threads,
            shards: node.shards,
        }
    }
}

/// Cut `chunks` into consecutive calls of at least `call_bytes` wire bytes.
pub fn calls(chunks: &[PutChunk], call_bytes: u64) -> Vec<&[PutChunk]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut acc = 0u64;
    for (i, c) in chunks.iter().enumerate() {
        acc += c.data.len() as u64;
        if acc >= call_bytes {
            out.push(&chunks[start..=i]);
            start = i + 1;
            acc = 0;
        }
    }
    if start < chunks.len() {
        out.push(&chunks[start..]);
    }
    out
}

/// Timed unique puts through the client library. Every chunk must come back `Stored`.
pub fn put_hive(
    client: &mut HiveClient,
    node: &NodeInfo,
    set: &ChunkSet,
    call_bytes: u64,
) -> Result<Phase> {
    // The calls are streamed (`put_stream`): every shard keeps its credits of requests in
    // flight across them, as a bulk uploader does; latency is per `Put` request.
    let calls = calls(&set.chunks, call_bytes);
    let mut lat = Lat::new();
    let m = Meter::start(node);
    let st = client
        .put_stream(calls.iter().copied())
        .context("put stream")?;
    for l in &st.request_latency {
        lat.record(*l);
    }
    if !st.rejected.is_empty() {
        bail!(
            "the node rejected {} chunks (ids do not verify)",
            st.rejected.len()
        );
    }
    let dup = st.duplicate as usize;
    let p = m.finish(
        node,
        "put_unique",
        set.raw_bytes,
        set.wire_bytes,
        set.chunks.len() as u64,
        lat,
        format!(
            "per request of about {}, streamed",
            util::fmt_size(hivefs_client::hive::PUT_BATCH_BYTES as u64)
        ),
    );
    if dup > 0 {
        bail!(
            "{dup} of {} chunks were already stored: not a unique-put measurement",
            set.chunks.len()
        );
    }
    Ok(p)
}

/// `n` ids picked uniformly (with replacement) from `ids`.
pub fn random_picks(ids: &[ChunkId], n: usize, seed: u64) -> Vec<ChunkId> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| ids[rng.below(ids.len() as u64) as usize])
        .collect()
}

/// Timed random gets through the client library: `get_stored` (the node's work; the
/// client does not decompress or hash), or `get` (verified: the client hashes every chunk).
pub fn get_hive(
    client: &mut HiveClient,
    node: &NodeInfo,
    picks: &[ChunkId],
    call_ids: usize,
    verify: bool,
) -> Result<Phase> {
    let mut lat = Lat::new();
    let m = Meter::start(node);
    let (mut bytes, mut wire) = (0u64, 0u64);
    for call in picks.chunks(call_ids.max(1)) {
        let t = Instant::now();
        if verify {
            for (id, r) in call.iter().zip(client.get(call).context("get")?) {
                let data = r.with_context(|| format!("chunk {id} not found"))?;
                bytes += data.len() as u64;
                wire += data.len() as u64;
            }
        } else {
            for (id, r) in call
                .iter()
                .zip(client.get_stored(call).context("get_stored")?)
            {
                let (_, raw_len, data) = r.with_context(|| format!("chunk {id} not found"))?;
                bytes += raw_len as u64;
                wire += data.len() as u64;
            }
        }
        lat.record(t.elapsed());
    }
    let name = if verify { "get_verified" } else { "get" };
    let mut p = m.finish(
        node,
        name,
        bytes,
        wire,
        picks.len() as u64,
        lat,
        format!("per call of {call_ids} gets"),
    );
    if verify {
        // get() returns plaintext; wire bytes were not seen separately.
        p.wire_bytes = p.bytes;
    }
    Ok(p)
}

/// Timed `has` through the client library over `ids`, whose expected answers are `expect`.
pub fn has_hive(
    client: &mut HiveClient,
    node: &NodeInfo,
    ids: &[ChunkId],
    expect: &[bool],
    call_ids: usize,
) -> Result<Phase> {
    let mut lat = Lat::new();
    let m = Meter::start(node);
    for (call, want) in ids
        .chunks(call_ids.max(1))
        .zip(expect.chunks(call_ids.max(1)))
    {
        let t = Instant::now();
        let (present, _) = client.has(call).context("has")?;
        lat.record(t.elapsed());
        if present != want {
            let wrong = present.iter().zip(want).filter(|(a, b)| a != b).count();
            bail!("has answered {wrong} of {} ids wrongly", call.len());
        }
    }
    Ok(m.finish(
        node,
        "has",
        0,
        0,
        ids.len() as u64,
        lat,
        format!("per call of {call_ids} ids"),
    ))
}

/// Ids for a `has` phase: `n` ids cycling over `present`, with a fraction `miss` replaced
/// by ids the node lacks. Returns the ids and the expected answers.
pub fn has_workload(
    present: &[ChunkId],
    n: usize,
    miss: f64,
    seed: u64,
) -> (Vec<ChunkId>, Vec<bool>) {
    let mut rng = Rng::new(seed);
    let absent = absent_ids(((n as f64 * miss) as usize).max(1), seed ^ 0xabcdef);
    let mut ids = Vec::with_capacity(n);
    let mut exp = Vec::with_capacity(n);
    let mut a = 0;
    for i in 0..n {
        let hit = !present.is_empty() && (rng.next_u64() as f64 / u64::MAX as f64) >= miss;
        if hit {
            ids.push(present[(i * 7919) % present.len()]);
            exp.push(true);
        } else {
            ids.push(absent[a % absent.len()]);
            a += 1;
            exp.push(false);
        }
    }
    (ids, exp)
}

// ---------------------------------------------------------------------------------------
// The raw driver.

/// What a request's reply must be.
#[derive(Clone)]
pub enum Expect {
    /// `n` chunks, all `Stored`.
    Put(usize),
    /// A chunk (any).
    Get,
    /// These answers.
    Has(Vec<bool>),
}

/// One connection to one shard, driven without the client library.
pub struct RawConn {
    conn: FramedConn<TcpStream>,
    version: u16,
    pub credits: usize,
    next_id: u64,
}

impl RawConn {
    pub fn open(node: &NodeInfo, shard: u16) -> Result<RawConn> {
        let addr = (node.host.as_str(), node.base_port + shard);
        let stream = TcpStream::connect(addr)
            .with_context(|| format!("connecting to {}:{}", node.host, node.base_port + shard))?;
        stream.set_nodelay(true)?;
        let tls = match &node.fingerprint {
            Some(fp) => Some((
                hivefs_net::tls::client_config_pinned(fp).map_err(|e| anyhow::anyhow!("{e}"))?,
                hivefs_net::tls::server_name(&node.host).map_err(|e| anyhow::anyhow!("{e}"))?,
            )),
            None => None,
        };
        let conn = FramedConn::new_client(stream, tls)?;
        let mut rc = RawConn {
            conn,
            version: PROTOCOL_VERSION_MIN,
            credits: 1,
            next_id: 1,
        };
        let hello = Request::Hello {
            min_version: PROTOCOL_VERSION_MIN,
            max_version: PROTOCOL_VERSION_MAX,
            token: node.token.clone(),
            client_name: format!("hive-perf-raw/{}", std::process::id()),
        };
        match rc.call(&hello)? {
            Response::HelloOk {
                version, credits, ..
            } => {
                rc.version = version;
                rc.credits = credits.max(1) as usize;
            }
            other => bail!("hello: {other:?}"),
        }
        Ok(rc)
    }

    fn call(&mut self, req: &Request) -> Result<Response> {
        let id = self.next_id;
        self.next_id += 1;
        self.conn.send_request(self.version, id, req)?;
        let (rid, resp) = self.conn.recv_response()?;
        if rid != id {
            bail!("reply to {rid}, expected {id}");
        }
        Ok(resp)
    }

    /// Encode requests as frames, numbering them from this connection's next id.
    pub fn encode(&mut self, reqs: Vec<Request>) -> Vec<Vec<u8>> {
        reqs.into_iter()
            .map(|r| {
                let (op, body) = r.encode();
                let id = self.next_id;
                self.next_id += 1;
                // Large bodies as the client library sends them: unchecked inside TLS.
                let check = match op {
                    Opcode::Put => self.conn.body_check(),
                    _ => BodyCheck::Crc32c,
                };
                let mut f = Vec::with_capacity(HEADER_BYTES + body.len());
                encode_frame_checked_with(&mut f, check, self.version, op as u16, id, |b| {
                    b.extend_from_slice(&body)
                });
                f
            })
            .collect()
    }

    /// Send pre-encoded `frames` (from [`encode`](Self::encode), in order) keeping `depth`
    /// in flight; check each reply (a shard may answer out of order: replies are matched by
    /// request id). Returns (plaintext bytes, wire bytes) received in gets.
    pub fn drive(
        &mut self,
        frames: &[Vec<u8>],
        expect: &[Expect],
        depth: usize,
        lat: &mut Lat,
    ) -> Result<(u64, u64)> {
        let depth = depth.clamp(1, self.credits);
        let first = self.next_id - frames.len() as u64;
        let mut in_flight: std::collections::HashMap<u64, Instant> =
            std::collections::HashMap::with_capacity(depth * 2);
        let (mut next, mut done) = (0usize, 0usize);
        let (mut bytes, mut wire) = (0u64, 0u64);
        while done < frames.len() {
            while next < frames.len() && in_flight.len() < depth {
                in_flight.insert(first + next as u64, Instant::now());
                self.conn.queue_frame(&frames[next]);
                self.conn.flush()?;
                next += 1;
            }
            let (rid, resp) = self.conn.recv_response()?;
            let sent = in_flight
                .remove(&rid)
                .with_context(|| format!("reply to request {rid}, which is not in flight"))?;
            lat.record(sent.elapsed());
            let i = (rid - first) as usize;
            match (&expect[i], resp) {
                (Expect::Put(n), Response::PutReply { results, .. }) => {
                    if results.len() != *n || results.iter().any(|r| *r != PutResult::Stored) {
                        bail!("put reply: {} results, not all Stored", results.len());
                    }
                }
                (
                    Expect::Get,
                    Response::GetReply {
                        chunk: Some((_, raw_len, data)),
                    },
                ) => {
                    bytes += raw_len as u64;
                    wire += data.len() as u64;
                }
                (Expect::Has(want), Response::HasReply { present, .. }) => {
                    if present != *want {
                        bail!("has reply differs from the expected answers");
                    }
                }
                (_, other) => bail!("unexpected reply {other:?}"),
            }
            done += 1;
        }
        Ok((bytes, wire))
    }
}

/// Split work items by owning shard.
fn by_shard<T>(map: &ClusterMap, items: Vec<(ChunkId, T)>) -> Vec<Vec<(ChunkId, T)>> {
    let mut out: Vec<Vec<(ChunkId, T)>> = (0..map.shard_count).map(|_| Vec::new()).collect();
    for (id, t) in items {
        out[map.shard_of(&id) as usize].push((id, t));
    }
    out
}

/// Run per-shard request lists through raw connections (one thread per shard), timed.
fn raw_run(
    node: &NodeInfo,
    name: &str,
    per_shard: Vec<(Vec<Request>, Vec<Expect>)>,
    depth: usize,
    lat_unit: String,
    count: (u64, u64, u64),
) -> Result<Phase> {
    let mut conns = Vec::new();
    for (s, (reqs, exp)) in per_shard.into_iter().enumerate() {
        if reqs.is_empty() {
            continue;
        }
        let mut c = RawConn::open(node, s as u16)?;
        let frames = c.encode(reqs);
        conns.push((c, frames, exp));
    }
    let m = Meter::start(node);
    let results: Vec<Result<(Lat, u64, u64)>> = std::thread::scope(|sc| {
        let hs: Vec<_> = conns
            .iter_mut()
            .map(|(c, frames, exp)| {
                sc.spawn(move || {
                    let mut lat = Lat::new();
                    let (b, w) = c.drive(frames, exp, depth, &mut lat)?;
                    Ok((lat, b, w))
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("raw driver thread panicked")))
            })
            .collect()
    });
    let mut lat = Lat::new();
    let (mut b, mut w) = (0, 0);
    for r in results {
        let (l, bb, ww) = r?;
        lat.add(&l);
        b += bb;
        w += ww;
    }
    let (bytes, wire, ops) = if count.0 > 0 { count } else { (b, w, count.2) };
    Ok(m.finish(node, name, bytes, wire, ops, lat, lat_unit))
}

/// Raw unique puts: `Put` requests of about `req_bytes` each.
pub fn put_raw(
    node: &NodeInfo,
    map: &ClusterMap,
    set: &ChunkSet,
    req_bytes: usize,
    depth: usize,
) -> Result<Phase> {
    let groups = by_shard(map, set.chunks.iter().map(|c| (c.id, c)).collect());
    let per_shard = groups
        .into_iter()
        .map(|g| {
            let mut reqs = Vec::new();
            let mut exp = Vec::new();
            let mut cur: Vec<PutChunk> = Vec::new();
            let mut bytes = PUT_BODY_HEADER_BYTES;
            for (_, c) in g {
                let n = PUT_CHUNK_OVERHEAD_BYTES + c.data.len();
                if !cur.is_empty() && (bytes + n > req_bytes || cur.len() == MAX_BATCH_CHUNKS) {
                    exp.push(Expect::Put(cur.len()));
                    reqs.push(Request::Put {
                        level: DEFAULT_LEVEL,
                        chunks: std::mem::take(&mut cur),
                    });
                    bytes = PUT_BODY_HEADER_BYTES;
                }
                bytes += n;
                cur.push(c.clone());
            }
            if !cur.is_empty() {
                exp.push(Expect::Put(cur.len()));
                reqs.push(Request::Put {
                    level: DEFAULT_LEVEL,
                    chunks: cur,
                });
            }
            (reqs, exp)
        })
        .collect();
    raw_run(
        node,
        "raw_put_unique",
        per_shard,
        depth,
        format!(
            "per {} request at depth {depth}",
            util::fmt_size(req_bytes as u64)
        ),
        (set.raw_bytes, set.wire_bytes, set.chunks.len() as u64),
    )
}

/// Raw random gets, one `Get` per chunk.
pub fn get_raw(
    node: &NodeInfo,
    map: &ClusterMap,
    picks: &[ChunkId],
    depth: usize,
) -> Result<Phase> {
    let groups = by_shard(map, picks.iter().map(|id| (*id, ())).collect());
    let per_shard = groups
        .into_iter()
        .map(|g| {
            (
                g.iter().map(|(id, _)| Request::Get { id: *id }).collect(),
                vec![Expect::Get; g.len()],
            )
        })
        .collect();
    raw_run(
        node,
        "raw_get",
        per_shard,
        depth,
        format!("per get at depth {depth}"),
        (0, 0, picks.len() as u64),
    )
}

/// Raw `has`: requests of `batch` ids.
pub fn has_raw(
    node: &NodeInfo,
    map: &ClusterMap,
    ids: &[ChunkId],
    expect: &[bool],
    batch: usize,
    depth: usize,
) -> Result<Phase> {
    let groups = by_shard(
        map,
        ids.iter().copied().zip(expect.iter().copied()).collect(),
    );
    let per_shard = groups
        .into_iter()
        .map(|g| {
            let mut reqs = Vec::new();
            let mut exp = Vec::new();
            for part in g.chunks(batch.max(1)) {
                reqs.push(Request::Has {
                    level: DEFAULT_LEVEL,
                    ids: part.iter().map(|(id, _)| *id).collect(),
                });
                exp.push(Expect::Has(part.iter().map(|(_, e)| *e).collect()));
            }
            (reqs, exp)
        })
        .collect();
    raw_run(
        node,
        "raw_has",
        per_shard,
        depth,
        format!("per batch of {batch} ids at depth {depth}"),
        (0, 0, ids.len() as u64),
    )
}

/// The node's dedupe key and map, from a fresh connection.
pub fn connect(node: &NodeInfo) -> Result<HiveClient> {
    let t0 = Instant::now();
    loop {
        match HiveClient::connect(&node.client_options()) {
            Ok(c) => return Ok(c),
            Err(e) if t0.elapsed() < Duration::from_secs(10) => {
                eprintln!("hive-perf: connect to {}: {e}; retrying", node.label);
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e).with_context(|| format!("connecting to {}", node.label)),
        }
    }
}
