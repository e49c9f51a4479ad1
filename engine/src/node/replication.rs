//! A shard's side of replicated puts: the glue between its event loop, the
//! [`Replicator`] (who gets a copy, when the client is answered) and the replication
//! transport ([`TcpLinks`]).
//!
//! A client's `Put` reaches the primary of its chunks' buckets (the client routes by the
//! map; a node that is not the primary of every chunk answers `NotPrimary` and stores
//! nothing). The shard stores the batch in its own core as before and, for each group of
//! chunks with the same replica order, starts a replication job that forwards copies to
//! the other replicas' shards as `Replicate` requests. The client is answered once its
//! own store finished *and* every job of the batch replied: `PutReply` (the local
//! per-chunk outcomes) when every job reached `min_copies` durable copies, else
//! `TooFewCopies` (or the local store's error). Copies still missing after a job ends
//! are owed: counted and logged here, moved by repair.
//!
//! Chunk bytes stay in the received frame body (shared, never copied) until their job is
//! done. At most [`MAX_REPL_JOBS`] jobs run at once; beyond that the shard stops reading
//! client requests, as it does when its commit queue is long.

use super::ShardLoop;
use crate::links::{ReplicationTransport, SendId, SendOutcome};
use crate::replicate::{primary, Action, JobId, NodeId, ReplError};
use crate::shard::{ChunkBytes, PutOutcome, ShardError};
use hivefs_net::chunk::{ChunkId, Codec};
use hivefs_net::placement::{HiveMap, Placement};
use hivefs_net::proto::{ChunkRef, ErrorCode, PutResult, Response};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Replication jobs a shard runs at once before it stops reading client requests.
pub(super) const MAX_REPL_JOBS: usize = 512;
/// How often the jobs' deadlines are checked.
const TICK_EVERY_MS: u64 = 5;
/// How often owed copies are logged (a count, not one line per job).
const OWED_LOG_EVERY: Duration = Duration::from_secs(10);

/// One stored chunk of a job: id, codec, plaintext length, bytes.
type JobChunk = (ChunkId, Codec, u32, ChunkBytes);

/// A job's chunks, each with its bucket.
type BucketChunks = Vec<(u32, JobChunk)>;

struct ReplJob {
    /// The client put it belongs to.
    ticket: u64,
    /// The put's level: copies made on the first `level` nodes of the order.
    level: u8,
    chunks: BucketChunks,
}

/// A client put whose answer waits for its replication jobs.
struct ClientPut {
    conn: usize,
    req: u64,
    jobs_left: usize,
    failure: Option<ReplError>,
    local: Option<(u64, Result<Vec<PutOutcome>, ShardError>)>,
    jobs: Vec<JobId>,
}

/// The shard's replication state. See the module docs.
pub(super) struct ReplState {
    repl: crate::replicate::Replicator,
    links: Box<dyn ReplicationTransport>,
    /// This node's id in the map.
    me: NodeId,
    map: Arc<HiveMap>,
    map_version: u64,
    /// Every bucket's replicas in rendezvous order (all eligible nodes).
    order: Placement,
    started: Instant,
    puts: HashMap<u64, ClientPut>,
    jobs: HashMap<JobId, ReplJob>,
    /// A send -> the job and node it carries copies for.
    sends: HashMap<SendId, (JobId, NodeId)>,
    /// Sends outstanding per (job, node) attempt; absent once the attempt is reported.
    attempts: HashMap<(JobId, NodeId), usize>,
    actions: Vec<Action>,
    outcomes: Vec<(SendId, SendOutcome)>,
    /// Copies owed (not made on the node that should hold them), since start.
    pub(super) owed: u64,
    owed_logged: (Instant, u64),
    /// Copies sent to other nodes, and their bytes.
    pub(super) forwarded: u64,
    pub(super) forwarded_bytes: u64,
    /// When the jobs' deadlines are next looked at.
    next_tick_ms: u64,
}

impl ReplState {
    pub(super) fn new(
        me: NodeId,
        cfg: crate::replicate::ReplConfig,
        links: Box<dyn ReplicationTransport>,
        bucket_count: u32,
    ) -> ReplState {
        let map = Arc::new(HiveMap {
            epoch: 0,
            bucket_count,
            nodes: Vec::new(),
        });
        ReplState {
            repl: crate::replicate::Replicator::new(me, cfg),
            links,
            me,
            order: map.placement(usize::MAX),
            map,
            map_version: 0,
            started: Instant::now(),
            puts: HashMap::new(),
            jobs: HashMap::new(),
            sends: HashMap::new(),
            attempts: HashMap::new(),
            actions: Vec::new(),
            outcomes: Vec::new(),
            owed: 0,
            owed_logged: (Instant::now(), 0),
            forwarded: 0,
            forwarded_bytes: 0,
            next_tick_ms: 0,
        }
    }

    /// Whether this node is in its copy of the map: until then it refuses client puts
    /// (`NotPrimary`, retried by clients): it cannot know the other replicas.
    pub(super) fn active(&self) -> bool {
        self.map.node(self.me).is_some()
    }

    pub(super) fn map(&self) -> &HiveMap {
        &self.map
    }

    /// Jobs not yet done.
    pub(super) fn in_flight(&self) -> usize {
        self.repl.in_flight()
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Take a newer map if one was published.
    pub(super) fn refresh_map(&mut self, cell: &crate::hive_map::MapCell) {
        let v = cell.version();
        if v != self.map_version {
            self.map_version = v;
            self.map = cell.get();
            self.order = self.map.placement(usize::MAX);
        }
    }

    /// The primary of `bucket` under the current map.
    fn primary_of(&self, bucket: u32) -> Option<NodeId> {
        primary(&self.map, self.order.replicas(bucket))
    }

    pub(super) fn links_ready(&mut self, token: mio::Token) -> bool {
        self.links.ready(token)
    }

    /// Links whose readiness no poll reports (see `ReplicationTransport::poll_streams`).
    #[cfg(feature = "dpdk")]
    pub(super) fn poll_links(&mut self) {
        self.links.poll_streams();
    }
}

impl ShardLoop {
    /// `Some(error)` when this node is not the primary of every chunk's bucket.
    pub(super) fn not_primary(&self, ids: &[ChunkId]) -> Option<Response> {
        let r = &self.repl;
        let bucket_count = r.map.bucket_count;
        let bad = ids
            .iter()
            .map(|id| id.bucket(bucket_count))
            .find(|b| r.primary_of(*b) != Some(r.me))?;
        let p = r.primary_of(bad);
        Some(Response::error(
            ErrorCode::NotPrimary,
            format!(
                "map epoch {}: bucket {bad} has primary {}, not node {}",
                r.map.epoch,
                p.map_or("none".to_string(), |p| p.to_string()),
                r.me
            ),
        ))
    }

    /// Start replicating a client put at `level` whose chunks went to the core under
    /// `ticket`.
    pub(super) fn replicate_put(
        &mut self,
        ticket: u64,
        conn: usize,
        req: u64,
        level: u8,
        chunks: Vec<JobChunk>,
    ) {
        let now = self.repl.now_ms();
        let bucket_count = self.repl.map.bucket_count;
        // Chunks with the same replica order share a job.
        let mut groups: Vec<(&[u64], BucketChunks)> = Vec::new();
        let order = &self.repl.order;
        for c in chunks {
            let b = c.0.bucket(bucket_count);
            let o = order.replicas(b);
            match groups.iter_mut().find(|(g, _)| *g == o) {
                Some((_, v)) => v.push((b, c)),
                None => groups.push((o, vec![(b, c)])),
            }
        }
        let groups: Vec<BucketChunks> = groups.into_iter().map(|(_, v)| v).collect();
        let mut jobs = Vec::with_capacity(groups.len());
        for chunks in groups {
            let map = self.repl.map.clone();
            let job = self.repl.repl.start(now, chunks[0].0, &map, level as usize);
            self.repl.jobs.insert(
                job,
                ReplJob {
                    ticket,
                    level,
                    chunks,
                },
            );
            jobs.push(job);
        }
        self.repl.puts.insert(
            ticket,
            ClientPut {
                conn,
                req,
                jobs_left: jobs.len(),
                failure: None,
                local: None,
                jobs,
            },
        );
        self.drive_repl();
    }

    /// The core finished a put: if it is replicated, tell its jobs. Returns false for a
    /// put that is not (answered the usual way).
    pub(super) fn local_put_done(
        &mut self,
        ticket: u64,
        claim_epoch: u64,
        result: &Result<Vec<PutOutcome>, ShardError>,
    ) -> bool {
        let Some(p) = self.repl.puts.get_mut(&ticket) else {
            return false;
        };
        p.local = Some((claim_epoch, result.clone()));
        let ok = result.is_ok();
        for job in p.jobs.clone() {
            self.repl.repl.local(job, ok);
        }
        self.drive_repl();
        self.finish_put(ticket);
        true
    }

    /// Time passed (every loop turn while jobs run).
    pub(super) fn tick_repl(&mut self) {
        if self.repl.in_flight() == 0 && self.repl.links.in_flight() == 0 {
            return;
        }
        let now = self.repl.now_ms();
        self.repl.links.tick(Instant::now());
        // Deadlines are seconds long: the jobs are looked at every few milliseconds, not
        // on every loop turn (a busy shard turns thousands of times a second).
        if now >= self.repl.next_tick_ms {
            self.repl.next_tick_ms = now + TICK_EVERY_MS;
            self.repl.repl.tick(now);
        }
        self.drive_repl();
    }

    /// Act on what the replicator decided and what the links reported, until neither has
    /// anything more.
    pub(super) fn drive_repl(&mut self) {
        loop {
            self.repl.links.drain(&mut self.repl.outcomes);
            let outcomes = std::mem::take(&mut self.repl.outcomes);
            for (send, outcome) in outcomes {
                self.send_outcome(send, outcome);
            }
            self.repl.repl.drain(&mut self.repl.actions);
            if self.repl.actions.is_empty() {
                break;
            }
            let actions = std::mem::take(&mut self.repl.actions);
            for a in actions {
                self.act(a);
            }
        }
        self.log_owed();
    }

    fn send_outcome(&mut self, send: SendId, outcome: SendOutcome) {
        let Some((job, node)) = self.repl.sends.remove(&send) else {
            return;
        };
        let now = self.repl.now_ms();
        let Some(left) = self.repl.attempts.get_mut(&(job, node)) else {
            return; // the attempt was reported failed already
        };
        match outcome {
            Ok(results) => {
                // A chunk the other node refused (bytes not matching the id) is refused
                // here too, by the same check: the client learns it from the local
                // outcome. (Under TLS no byte changes in transit.)
                let refused = results
                    .iter()
                    .filter(|r| **r == PutResult::Rejected)
                    .count();
                if refused > 0 {
                    tracing::debug!(shard = self.s.shard, node, job, refused, "copies refused");
                }
                *left -= 1;
                if *left == 0 {
                    self.repl.attempts.remove(&(job, node));
                    self.repl.repl.remote(now, job, node, true);
                }
            }
            Err(why) => {
                tracing::debug!(shard = self.s.shard, node, job, "copy failed: {why}");
                self.repl.attempts.remove(&(job, node));
                self.repl.repl.remote(now, job, node, false);
            }
        }
    }

    fn act(&mut self, a: Action) {
        match a {
            Action::Forward { job, to, hint_for } => self.forward(job, to, hint_for),
            Action::Reply { job, result } => {
                let Some(ticket) = self.repl.jobs.get(&job).map(|j| j.ticket) else {
                    return;
                };
                if let Some(p) = self.repl.puts.get_mut(&ticket) {
                    p.jobs_left -= 1;
                    if let Err(e) = result {
                        p.failure.get_or_insert(e);
                    }
                }
                self.finish_put(ticket);
            }
            Action::Owe {
                job, node, held_by, ..
            } => {
                let n = self.repl.jobs.get(&job).map_or(0, |j| j.chunks.len());
                self.repl.owed += n as u64;
                tracing::debug!(
                    shard = self.s.shard,
                    job,
                    node,
                    ?held_by,
                    chunks = n,
                    "copies owed"
                );
            }
            Action::Done { job } => {
                self.repl.jobs.remove(&job);
                self.repl.attempts.retain(|(j, _), _| *j != job);
            }
        }
    }

    /// Send a job's chunks to node `to`, one `Replicate` per shard of `to` they fall in.
    fn forward(&mut self, job: JobId, to: NodeId, hint_for: Option<NodeId>) {
        let r = &mut self.repl;
        let (Some(node), Some(j)) = (r.map.node(to).cloned(), r.jobs.get(&job)) else {
            let now = r.now_ms();
            r.repl.remote(now, job, to, false);
            return;
        };
        let shards = node.shards.max(1) as u32;
        let mut by_shard: Vec<(u16, Vec<ChunkRef<'_>>)> = Vec::new();
        for (b, (id, codec, raw_len, data)) in &j.chunks {
            let s = (b % shards) as u16;
            let c: ChunkRef<'_> = (*id, *codec, *raw_len, &data[..]);
            match by_shard.iter_mut().find(|(x, _)| *x == s) {
                Some((_, v)) => v.push(c),
                None => by_shard.push((s, vec![c])),
            }
        }
        r.attempts.insert((job, to), by_shard.len());
        for (s, chunks) in &by_shard {
            r.forwarded += chunks.len() as u64;
            r.forwarded_bytes += chunks.iter().map(|c| c.3.len() as u64).sum::<u64>();
            let send = r
                .links
                .send(&node, *s, hint_for.unwrap_or(0), j.level, chunks);
            r.sends.insert(send, (job, to));
        }
    }

    /// Answer a replicated put once its local store and every job have.
    fn finish_put(&mut self, ticket: u64) {
        let ready = self
            .repl
            .puts
            .get(&ticket)
            .is_some_and(|p| p.local.is_some() && p.jobs_left == 0);
        if !ready {
            return;
        }
        let Some(p) = self.repl.puts.remove(&ticket) else {
            return;
        };
        self.tickets.remove(&ticket);
        let (claim_epoch, local) = p.local.expect("checked above");
        let resp = match (local, p.failure) {
            (Err(e), _) => super::shard_error(&e),
            (Ok(_), Some(ReplError::TooFewCopies { durable, needed })) => Response::error(
                ErrorCode::TooFewCopies,
                format!("{durable} of the {needed} copies needed were stored in time"),
            ),
            (Ok(_), Some(ReplError::NotPrimary { primary })) => Response::error(
                ErrorCode::NotPrimary,
                format!(
                    "map epoch {}: the primary is {primary:?}",
                    self.repl.map.epoch
                ),
            ),
            (Ok(outcomes), None) => Response::PutReply {
                claim_epoch,
                results: outcomes.into_iter().map(super::put_result).collect(),
            },
        };
        if let Response::Error { message, .. } = &resp {
            tracing::warn!(
                shard = self.s.shard,
                req = p.req,
                "replicated put failed: {message}"
            );
        }
        if let Some(c) = self.conns.get_mut(&p.conn) {
            c.in_flight = c.in_flight.saturating_sub(1);
        }
        self.reply(p.conn, p.req, &resp);
    }

    fn log_owed(&mut self) {
        let r = &mut self.repl;
        if r.owed != r.owed_logged.1 && r.owed_logged.0.elapsed() >= OWED_LOG_EVERY {
            tracing::warn!(
                shard = self.s.shard,
                owed = r.owed,
                new = r.owed - r.owed_logged.1,
                "chunk copies owed to nodes that did not take them (repair moves them)"
            );
            r.owed_logged = (Instant::now(), r.owed);
        }
    }
}
