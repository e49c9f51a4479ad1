//! Repair and rebalance: every node makes sure that each chunk it holds is also held by
//! its bucket's live replicas, copying what they lack (anti-entropy, pushed by every
//! holder).
//!
//! One thread per node ([`run`]) makes passes over its own shards: it lists each shard's
//! verified chunks in id order with their levels (ids of one bucket are adjacent: the
//! bucket is the id's prefix), computes every chunk's *targets* under the current
//! placement map (the first `level` nodes of its bucket's rendezvous order that the map
//! does not say are down: a chunk's level is the most copies any volume asked for), asks
//! each target at which level it holds them (`ShardAdmin::Holding`, which is not a GC
//! claim), reads those it lacks or holds at a lower level from its own shard and sends
//! them as `Replicate` requests at the chunk's level (mutual TLS with this node's
//! certificate, as replication does). A target holding a chunk at a lower level stores it
//! again at the higher one, so a raised level reaches every copy.
//!
//! This one rule covers every case the issue names:
//! - copies a put could not make (a target failed or was silent: owed) are made on the
//!   next pass by whichever node holds the chunk;
//! - a node marked down: its buckets' targets move to the next node in rendezvous order,
//!   so the survivors restore `copies` live copies; when it is back up it is a target
//!   again and gets what it missed;
//! - a node out, added or draining (a new map epoch): the new replicas get the chunks
//!   from the nodes that hold them; a pass starts at once on every map change;
//! - a primary that crashed before forwarding: the chunk is on at least `min_copies`
//!   nodes, and each of them pushes it to the others.
//!
//! Passes are throttled (`repair_mib_per_sec`), resumable (progress and cursor in
//! `repair.json` in the data directory, read back at start), and reported by `hive status`.
//!
//! Scrub (same thread, every `scrub_every_secs`, or now with `hive scrub`): each shard
//! re-reads its chunks (`ShardAdmin::Scrub`: the record's CRC, then the bytes hashed
//! against the id) and reports the copies that fail; for each, this thread fetches a copy
//! from another node of the bucket and checks it against the id, and only then has the
//! bad copy removed (`DropCopies`) and the good one stored. A bad copy with no good one
//! elsewhere stays (it is refused on read): nothing is ever removed without a replacement.
//! Throttled to `scrub_mib_per_sec`. (While a scrub runs, repair passes wait.)
//!
//! Releases: a copy this node holds beyond its chunk's targets (after a rebalance or a
//! drain, or a hinted copy) is removed once every target holds the chunk at its level.
//! Safety rests on four guards, each shown necessary by `repair_sim` (planted bugs):
//! - the step opens a release window on its own shard (`BeginRelease`) before it asks any
//!   target; the shard spares every id put or copied to it since (a copy a primary just
//!   counted as durable is never removed on older answers);
//! - only answers given under the same map epoch count (`Held` carries the target's
//!   epoch): under one map the targets and the releasing node agree on who is a replica,
//!   and a target never releases its own copy under that map;
//! - the shard refuses the `Release` if its map moved since the window opened;
//! - only where the targets are all the copies the chunk should have: with a target down
//!   (skipped by [`targets`]) the copy here may be one of too few.

use crate::config::NodeConfig;
use crate::hive_map::MapCell;
use crate::meta::peer::PeerLink;
use hivefs_net::chunk::ChunkId;
use hivefs_net::meta::{self, ShardAdmin, ShardAdminReply};
use hivefs_net::placement::{HiveMap, NodeState};
use hivefs_net::proto::{PutChunk, Request, Response, PUT_CHUNK_OVERHEAD_BYTES};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A chunk id with a level: the level it is held at, or should be.
type Held = (ChunkId, u8);

/// Ids listed per step of a pass.
const LIST_BATCH: u32 = 2048;
/// Bytes of chunks per `Replicate` request.
const COPY_BATCH_BYTES: usize = 1 << 20;
/// A pass starts at least this often (sooner on a map change).
pub const PASS_EVERY: Duration = Duration::from_secs(30);
/// A pass that found copies missing is followed by another this soon.
pub const PASS_AGAIN: Duration = Duration::from_secs(2);
/// Deadline of each call to a node.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Where progress is kept.
pub const PROGRESS_FILE: &str = "repair.json";
/// Its presence asks for a scrub now (`hive scrub`); removed when the scrub starts.
pub const SCRUB_REQUEST_FILE: &str = "scrub.request";
/// Its presence asks for a repair pass now (`hive repair`); removed when the pass starts.
pub const REPAIR_REQUEST_FILE: &str = "repair.request";

/// What repair is doing and has done; written to `repair.json` after every step.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RepairProgress {
    /// Passes completed since the node was initialised.
    pub passes: u64,
    /// A pass is under way: it resumes here after a restart.
    pub running: bool,
    /// The map epoch the pass works to.
    pub map_epoch: u64,
    /// The shard the pass is on, and the last id done there (hex).
    pub shard: u16,
    pub cursor: Option<String>,
    /// Buckets of the pass done so far (from the cursor), of `bucket_count` per shard.
    pub bucket: u32,
    pub bucket_count: u32,
    /// This pass: chunk copies checked on targets, copies made, their bytes, chunks whose
    /// bucket had a target missing them, targets that could not be reached.
    pub checked: u64,
    pub copied: u64,
    pub copied_bytes: u64,
    pub degraded_buckets: u64,
    pub unreachable: u64,
    /// The last finished pass, in the same terms, and how long it took.
    pub last: Option<PassSummary>,
    pub last_error: Option<String>,
    /// Scrubs: passes done, when the last one ended (Unix seconds), copies checked and
    /// copies found bad (and removed, for repair to replace) by the last one.
    #[serde(default)]
    pub scrubs: u64,
    #[serde(default)]
    pub last_scrub_unix: u64,
    #[serde(default)]
    pub scrub_checked: u64,
    #[serde(default)]
    pub scrub_bad: u64,
    /// Copies made and their bytes over every pass since the node was initialised.
    #[serde(default)]
    pub total_copied: u64,
    #[serde(default)]
    pub total_copied_bytes: u64,
    /// Copies this node released (held beyond the replicas, every replica holding the
    /// chunk) and their stored bytes: this pass, and since the node was initialised.
    #[serde(default)]
    pub released: u64,
    #[serde(default)]
    pub released_bytes: u64,
    #[serde(default)]
    pub total_released: u64,
    #[serde(default)]
    pub total_released_bytes: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PassSummary {
    pub map_epoch: u64,
    pub checked: u64,
    pub copied: u64,
    pub copied_bytes: u64,
    pub degraded_buckets: u64,
    pub unreachable: u64,
    pub ms: u64,
    #[serde(default)]
    pub released: u64,
    #[serde(default)]
    pub released_bytes: u64,
}

impl RepairProgress {
    pub fn load(dir: &Path) -> RepairProgress {
        std::fs::read(dir.join(PROGRESS_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save(&self, dir: &Path) {
        let tmp = dir.join(format!("{PROGRESS_FILE}.tmp"));
        let ok = serde_json::to_vec_pretty(self)
            .ok()
            .and_then(|b| std::fs::write(&tmp, b).ok())
            .and_then(|_| std::fs::rename(&tmp, dir.join(PROGRESS_FILE)).ok());
        if ok.is_none() {
            tracing::warn!("repair: could not write {PROGRESS_FILE}");
        }
    }

    /// How far the running pass is, 0 to 1, on a node of `shards` shards.
    pub fn fraction(&self, shards: u16) -> f64 {
        if !self.running || shards == 0 {
            return 0.0;
        }
        let bucket = if self.bucket_count == 0 {
            0.0
        } else {
            self.bucket as f64 / self.bucket_count as f64
        };
        ((self.shard as f64 + bucket.min(1.0)) / shards as f64).min(1.0)
    }

    /// One line for `hive status`.
    pub fn describe(&self) -> String {
        let last = match &self.last {
            Some(l) => format!(
                "last pass (map epoch {}): {} copies checked, {} made ({} bytes), {} released ({} bytes), {} degraded bucket(s), {} unreachable, {} ms",
                l.map_epoch, l.checked, l.copied, l.copied_bytes, l.released, l.released_bytes, l.degraded_buckets, l.unreachable, l.ms
            ),
            None => "no pass finished yet".into(),
        };
        let scrub = if self.scrubs == 0 {
            "no scrub yet".to_string()
        } else {
            format!(
                "last scrub: {} copies checked, {} bad (replaced)",
                self.scrub_checked, self.scrub_bad
            )
        };
        let last = format!(
            "{last}; since init {} copies made ({} bytes), {} released ({} bytes); {scrub}",
            self.total_copied,
            self.total_copied_bytes,
            self.total_released,
            self.total_released_bytes
        );
        if self.running {
            let pct = if self.bucket_count == 0 {
                0.0
            } else {
                100.0 * self.bucket as f64 / self.bucket_count as f64
            };
            format!(
                "repair: pass {} running (map epoch {}), shard {} at {pct:.0}%, {} copies made so far; {last}",
                self.passes + 1,
                self.map_epoch,
                self.shard,
                self.copied
            )
        } else {
            format!("repair: idle after {} pass(es); {last}", self.passes)
        }
    }
}

/// What the repair thread needs.
pub struct RepairCtx {
    pub dir: PathBuf,
    pub cfg: NodeConfig,
    pub map: Arc<MapCell>,
    pub tls: Arc<rustls::ClientConfig>,
    /// This node's shard ports (as served).
    pub shard_ports: Vec<u16>,
    pub stop: Arc<AtomicBool>,
}

/// The repair thread: passes until `stop`. See the module docs.
pub fn run(ctx: RepairCtx) {
    let mut p = RepairProgress::load(&ctx.dir);
    let mut last_pass: Option<Instant> = None;
    let mut seen_epoch = 0;
    while !ctx.stop.load(Ordering::SeqCst) {
        if scrub_due(&ctx, &p) {
            let _ = std::fs::remove_file(ctx.dir.join(SCRUB_REQUEST_FILE));
            match scrub(&ctx, &mut p) {
                // Bad copies were removed: the next repair pass brings good ones.
                Ok(bad) if bad > 0 => last_pass = None,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!("scrub: {e}");
                    p.last_error = Some(format!("scrub: {e}"));
                }
            }
            p.save(&ctx.dir);
        }
        let map = ctx.map.get();
        // A pass that found copies missing comes back soon: what it left to another
        // holder (see `mine_to_send`) is checked again within seconds, not at the next
        // periodic pass.
        let unsettled = p.last.as_ref().is_some_and(|l| l.degraded_buckets > 0);
        let every = if unsettled { PASS_AGAIN } else { PASS_EVERY };
        let asked = ctx.dir.join(REPAIR_REQUEST_FILE).exists();
        let due = asked
            || p.running
            || map.epoch != seen_epoch
            || last_pass.is_none_or(|t| t.elapsed() >= every);
        let placed = map.node(ctx.cfg.raft_id).is_some() && map.eligible_count() > 1;
        if !due || !placed {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        if asked {
            let _ = std::fs::remove_file(ctx.dir.join(REPAIR_REQUEST_FILE));
        }
        seen_epoch = map.epoch;
        last_pass = Some(Instant::now());
        let mut pass = Pass::new(&ctx, &map);
        match pass.run(&mut p) {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!("repair: {e}");
                p.last_error = Some(e);
                p.save(&ctx.dir);
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// The nodes that should hold a chunk of a bucket whose rendezvous order is `order`: its
/// first `copies` nodes the map does not say are down. (A down node's share moves to the
/// next node for as long as it is down; back up, it is a target again.)
pub fn targets(map: &HiveMap, order: &[u64], copies: usize) -> Vec<u64> {
    order
        .iter()
        .copied()
        .filter(|n| map.node(*n).is_some_and(|m| m.state != NodeState::Down))
        .take(copies)
        .collect()
}

/// Whether `me`, which holds a chunk that `target` lacks, is the node to send it: no node
/// before `me` in the bucket's read order (other than `target`) holds it (`holds`: what
/// that node answered; a node that did not answer counts as not holding it). A holder
/// outside the read order (draining) defers to any holder in it.
pub fn sends(
    map: &HiveMap,
    order: &[u64],
    me: u64,
    target: u64,
    mut holds: impl FnMut(u64) -> bool,
) -> bool {
    !ask_before(map, order, me, target)
        .into_iter()
        .any(&mut holds)
}

/// The nodes before `me` in the bucket's read order (other than `target`): whose
/// holdings [`sends`] asks about (all of it when `me` is not in it).
pub fn ask_before(map: &HiveMap, order: &[u64], me: u64, target: u64) -> Vec<u64> {
    map.read_order(order)
        .into_iter()
        .take_while(|n| *n != me)
        .filter(|n| *n != target)
        .collect()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A scrub is due when asked for (`hive scrub`) or `scrub_every_secs` after the last.
fn scrub_due(ctx: &RepairCtx, p: &RepairProgress) -> bool {
    ctx.dir.join(SCRUB_REQUEST_FILE).exists()
        || (ctx.cfg.scrub_every_secs > 0
            && unix_now().saturating_sub(p.last_scrub_unix) >= ctx.cfg.scrub_every_secs)
}

/// Re-read every chunk of this node's shards (record CRC, and the bytes against the id);
/// each copy that fails is replaced by a verified one from another node (see
/// [`Pass::restore`]). Returns how many failed. Throttled to `scrub_mib_per_sec`.
fn scrub(ctx: &RepairCtx, p: &mut RepairProgress) -> Result<u64, String> {
    let map = ctx.map.get();
    let mut pass = Pass::new(ctx, &map);
    let (mut checked, mut bad) = (0u64, 0u64);
    let t = Instant::now();
    let rate = ctx.cfg.scrub_mib_per_sec.max(1) << 20;
    let mut read = 0u64;
    for shard in 0..ctx.shard_ports.len() as u16 {
        let mut after: Option<Vec<u8>> = None;
        loop {
            if ctx.stop.load(Ordering::SeqCst) {
                return Ok(bad);
            }
            let (listed, more) = pass.list(shard, after.clone())?;
            after = listed.last().map(|l| l.0 .0.to_vec());
            let port = ctx.shard_ports[shard as usize];
            let host = pass.local_host();
            let levels: HashMap<ChunkId, u8> = listed.iter().copied().collect();
            let ids: Vec<ChunkId> = listed.iter().map(|(id, _)| *id).collect();
            for batch in ids.chunks(meta::MAX_SCRUB_IDS as usize) {
                let op = ShardAdmin::Scrub {
                    ids: meta::join_ids(batch),
                };
                match pass.admin(&host, port, &op)? {
                    ShardAdminReply::Scrubbed {
                        checked: c,
                        bytes,
                        bad: ids,
                    } => {
                        checked += c;
                        read += bytes;
                        let ids = meta::split_ids(&ids).ok_or("bad id list")?;
                        bad += ids.len() as u64;
                        for id in ids {
                            pass.restore(shard, &id, levels.get(&id).copied().unwrap_or(1));
                        }
                    }
                    other => return Err(format!("scrub of shard {shard}: {other:?}")),
                }
                let due = Duration::from_secs_f64(read as f64 / rate as f64);
                if due > t.elapsed() {
                    std::thread::sleep(due - t.elapsed());
                }
            }
            if !more {
                break;
            }
        }
    }
    p.scrubs += 1;
    p.last_scrub_unix = unix_now();
    p.scrub_checked = checked;
    p.scrub_bad = bad;
    let ms = t.elapsed().as_millis() as u64;
    if bad > 0 {
        tracing::warn!(
            checked,
            bad,
            ms,
            "scrub done: bad copies removed; repair replaces them"
        );
    } else {
        tracing::info!(checked, ms, "scrub done");
    }
    Ok(bad)
}

struct Pass<'a> {
    ctx: &'a RepairCtx,
    map: Arc<HiveMap>,
    order: hivefs_net::placement::Placement,
    links: HashMap<String, PeerLink>,
    started: Instant,
    /// Throttle: bytes sent since `window`.
    window: (Instant, u64),
}

impl<'a> Pass<'a> {
    fn new(ctx: &'a RepairCtx, map: &Arc<HiveMap>) -> Pass<'a> {
        Pass {
            ctx,
            map: map.clone(),
            order: map.placement(usize::MAX),
            links: HashMap::new(),
            started: Instant::now(),
            window: (Instant::now(), 0),
        }
    }

    /// A pass from where `p` says (the start, or the cursor of an interrupted pass).
    fn run(&mut self, p: &mut RepairProgress) -> Result<(), String> {
        if !p.running || p.map_epoch != self.map.epoch {
            // A new pass (a map change restarts one that was under way).
            *p = RepairProgress {
                passes: p.passes,
                running: true,
                map_epoch: self.map.epoch,
                bucket_count: self.map.bucket_count,
                last: p.last.take(),
                scrubs: p.scrubs,
                last_scrub_unix: p.last_scrub_unix,
                scrub_checked: p.scrub_checked,
                scrub_bad: p.scrub_bad,
                total_copied: p.total_copied,
                total_copied_bytes: p.total_copied_bytes,
                total_released: p.total_released,
                total_released_bytes: p.total_released_bytes,
                ..Default::default()
            };
        }
        let shards = self.ctx.shard_ports.len() as u16;
        while p.shard < shards {
            let mut cursor = match &p.cursor {
                Some(h) => Some(hex::decode(h).map_err(|e| format!("bad cursor: {e}"))?),
                None => None,
            };
            loop {
                if self.ctx.stop.load(Ordering::SeqCst) {
                    return Ok(());
                }
                if self.ctx.map.get().epoch != self.map.epoch {
                    p.running = false; // restarted under the new map by the caller
                    p.save(&self.ctx.dir);
                    return Ok(());
                }
                let (ids, more) = self.list(p.shard, cursor.clone())?;
                self.step(p.shard, &ids, p)?;
                if let Some((last, _)) = ids.last() {
                    cursor = Some(last.0.to_vec());
                    p.cursor = Some(hex::encode(last.0));
                    p.bucket = last.bucket(self.map.bucket_count) + 1;
                }
                p.save(&self.ctx.dir);
                if !more {
                    break;
                }
            }
            p.shard += 1;
            p.cursor = None;
            p.bucket = 0;
        }
        p.passes += 1;
        p.running = false;
        p.last = Some(PassSummary {
            map_epoch: self.map.epoch,
            checked: p.checked,
            copied: p.copied,
            copied_bytes: p.copied_bytes,
            degraded_buckets: p.degraded_buckets,
            unreachable: p.unreachable,
            ms: self.started.elapsed().as_millis() as u64,
            released: p.released,
            released_bytes: p.released_bytes,
        });
        p.save(&self.ctx.dir);
        if p.copied > 0 || p.unreachable > 0 || p.released > 0 {
            tracing::info!(
                map_epoch = self.map.epoch,
                copied = p.copied,
                bytes = p.copied_bytes,
                released = p.released,
                released_bytes = p.released_bytes,
                degraded_buckets = p.degraded_buckets,
                unreachable = p.unreachable,
                "repair pass done"
            );
        }
        Ok(())
    }

    fn link(&mut self, host: &str, port: u16) -> Result<&mut PeerLink, String> {
        let addr = hivefs_net::meta::NodeSpec::addr_of(host, port);
        if !self.links.contains_key(&addr) {
            let who = format!("{} repair", self.ctx.cfg.node_id);
            let l = PeerLink::dial(&addr, Some(self.ctx.tls.clone()), "", &who, CALL_TIMEOUT)
                .map_err(|e| e.to_string())?;
            self.links.insert(addr.clone(), l);
        }
        Ok(self.links.get_mut(&addr).expect("inserted"))
    }

    /// Send `req` to `host:port`; a failed link is dropped (redialled next time).
    fn call(&mut self, host: &str, port: u16, req: &Request) -> Result<Response, String> {
        let addr = hivefs_net::meta::NodeSpec::addr_of(host, port);
        let r = self.link(host, port)?.request(req);
        if r.is_err() {
            self.links.remove(&addr);
        }
        r.map_err(|e| e.to_string())
    }

    fn admin(&mut self, host: &str, port: u16, op: &ShardAdmin) -> Result<ShardAdminReply, String> {
        let body = meta::encode(op);
        match self.call(host, port, &Request::ShardAdmin { body })? {
            Response::ShardAdminReply { body } => meta::decode(&body).map_err(|e| e.to_string()),
            other => Err(format!("unexpected answer {other:?}")),
        }
    }

    fn local_host(&self) -> String {
        self.ctx.cfg.listen.clone()
    }

    /// The next ids of this node's `shard` after `after`, with their levels.
    fn list(&mut self, shard: u16, after: Option<Vec<u8>>) -> Result<(Vec<Held>, bool), String> {
        let port = self.ctx.shard_ports[shard as usize];
        let host = self.local_host();
        match self.admin(
            &host,
            port,
            &ShardAdmin::ListIds {
                after,
                max: LIST_BATCH,
            },
        )? {
            ShardAdminReply::Listed { ids, levels, more } => {
                let ids = meta::split_ids(&ids).ok_or("bad id list")?;
                if ids.len() != levels.len() {
                    return Err("listing: ids and levels differ in number".into());
                }
                Ok((ids.into_iter().zip(levels).collect(), more))
            }
            other => Err(format!("listing shard {shard}: {other:?}")),
        }
    }

    /// Every chunk of `ids` onto its targets, at its level; then the copies this node holds
    /// beyond the targets released where every target holds them.
    fn step(&mut self, shard: u16, ids: &[Held], p: &mut RepairProgress) -> Result<(), String> {
        let me = self.ctx.cfg.raft_id;
        // Chunks held here beyond their targets: (targets, targets that hold it).
        let mut extra: HashMap<ChunkId, (usize, usize)> = HashMap::new();
        // (target node, its shard) -> ids it should hold, with their levels.
        let mut want: HashMap<(u64, u16), Vec<Held>> = HashMap::new();
        for &(id, level) in ids {
            let b = self.map.bucket_of(&id);
            let targets = targets(&self.map, self.order.replicas(b), level.max(1) as usize);
            // Released only where the targets are all the copies the chunk should have:
            // with a target down (skipped) they are fewer, and this copy may be needed
            // (`repair_sim` seed 6: a draining node released the second copy).
            let full = targets.len() >= (level.max(1) as usize).min(self.map.eligible_count());
            if full && !targets.is_empty() && !targets.contains(&me) {
                extra.insert(id, (targets.len(), 0));
            }
            for t in targets.into_iter().filter(|t| *t != me) {
                let shards = self.map.node(t).map_or(1, |n| n.shards.max(1));
                want.entry((t, (b % shards as u32) as u16))
                    .or_default()
                    .push((id, level));
            }
        }
        // Opened (only when there is something to release) before any target is asked:
        // a copy put here after that is never released on these answers.
        let window = if extra.is_empty() {
            None
        } else {
            self.begin_release(shard)
        };
        let mut degraded: std::collections::HashSet<u32> = std::collections::HashSet::new();
        for ((node, tshard), ids) in want {
            let Some(n) = self.map.node(node).cloned() else {
                continue;
            };
            let port = n.base_port + tshard;
            p.checked += ids.len() as u64;
            let held = match self.holding(&n.host, port, &ids) {
                Ok((levels, epoch)) => {
                    // Only an answer under the same map counts for a release: under one
                    // map a target never releases its own copy.
                    if epoch == self.map.epoch {
                        for ((id, want), has) in ids.iter().zip(&levels) {
                            if let Some(e) = extra.get_mut(id).filter(|_| has >= want) {
                                e.1 += 1;
                            }
                        }
                    }
                    levels
                }
                Err(e) => {
                    tracing::debug!(node = %n.name, "repair: {e}");
                    p.unreachable += 1;
                    continue;
                }
            };
            // Missing there, or held at a lower level (stored again at this one).
            let missing: Vec<Held> = ids
                .into_iter()
                .zip(held)
                .filter(|((_, want), has)| has < want)
                .map(|(w, _)| w)
                .collect();
            for (id, _) in &missing {
                degraded.insert(self.map.bucket_of(id));
            }
            let missing = self.mine_to_send(node, missing);
            if let Err(e) = self.copy(shard, &n.host, port, missing, p) {
                tracing::debug!(node = %n.name, "repair: {e}");
                p.unreachable += 1;
            }
        }
        p.degraded_buckets += degraded.len() as u64;
        if let Some(token) = window {
            let done: Vec<ChunkId> = extra
                .into_iter()
                .filter(|(_, (targets, held))| held == targets)
                .map(|(id, _)| id)
                .collect();
            self.release(shard, token, done, p);
        }
        Ok(())
    }

    /// Open the release window of this node's `shard`: its token, if the shard's map is
    /// this pass's (else nothing is released this step).
    fn begin_release(&mut self, shard: u16) -> Option<u64> {
        let port = self.ctx.shard_ports[shard as usize];
        let host = self.local_host();
        match self.admin(&host, port, &ShardAdmin::BeginRelease) {
            Ok(ShardAdminReply::ReleaseWindow { token, map_epoch }) => {
                (map_epoch == self.map.epoch).then_some(token)
            }
            other => {
                tracing::debug!("repair: release window on shard {shard}: {other:?}");
                None
            }
        }
    }

    /// Remove `ids` (at most one step's, [`LIST_BATCH`]) from this node's `shard`: copies
    /// beyond the replicas that every replica holds (see [`ShardAdmin::Release`]). Sent
    /// even when empty: it closes the window, so the shard stops recording puts.
    fn release(&mut self, shard: u16, token: u64, ids: Vec<ChunkId>, p: &mut RepairProgress) {
        let port = self.ctx.shard_ports[shard as usize];
        let host = self.local_host();
        let op = ShardAdmin::Release {
            token,
            map_epoch: self.map.epoch,
            ids: meta::join_ids(&ids),
        };
        match self.admin(&host, port, &op) {
            Ok(ShardAdminReply::Swept { removed, bytes, .. }) => {
                p.released += removed;
                p.released_bytes += bytes;
                p.total_released += removed;
                p.total_released_bytes += bytes;
            }
            other => tracing::debug!("repair: release on shard {shard}: {other:?}"),
        }
    }

    /// The level at which the shard at `host:port` holds each of `ids` (0: not held), and
    /// the epoch of its map.
    fn holding(&mut self, host: &str, port: u16, ids: &[Held]) -> Result<(Vec<u8>, u64), String> {
        let ids: Vec<ChunkId> = ids.iter().map(|(id, _)| *id).collect();
        let op = ShardAdmin::Holding {
            ids: meta::join_ids(&ids),
        };
        match self.admin(host, port, &op)? {
            ShardAdminReply::Held { levels, map_epoch } if levels.len() == ids.len() => {
                Ok((levels, map_epoch))
            }
            other => Err(format!("holding answered {other:?}")),
        }
    }

    /// Of the chunks `target` lacks, those this node should send: every holder sees the
    /// same gap, and one copy is enough. The sender of a chunk is its first holder (at
    /// the chunk's level or higher) in the bucket's read order (other than the target):
    /// this node sends unless a node before it there holds the chunk so (asked with
    /// `Holding`; a node that does not answer counts as not holding it, so a copy may then
    /// be sent twice, never not at all).
    fn mine_to_send(&mut self, target: u64, missing: Vec<Held>) -> Vec<Held> {
        let me = self.ctx.cfg.raft_id;
        // (earlier node, its shard) -> the missing ids it might hold.
        let mut ask: HashMap<(u64, u16), Vec<Held>> = HashMap::new();
        for &(id, level) in &missing {
            let b = self.map.bucket_of(&id);
            for n in ask_before(&self.map, self.order.replicas(b), me, target) {
                let shards = self.map.node(n).map_or(1, |m| m.shards.max(1));
                ask.entry((n, (b % shards as u32) as u16))
                    .or_default()
                    .push((id, level));
            }
        }
        let mut held_by: HashMap<u64, std::collections::HashSet<ChunkId>> = HashMap::new();
        for ((n, s), ids) in ask {
            let Some(node) = self.map.node(n).cloned() else {
                continue;
            };
            if let Ok((levels, _)) = self.holding(&node.host, node.base_port + s, &ids) {
                let held = ids
                    .iter()
                    .zip(levels)
                    .filter(|((_, want), has)| has >= want);
                held_by
                    .entry(n)
                    .or_default()
                    .extend(held.map(|((id, _), _)| *id));
            }
        }
        missing
            .into_iter()
            .filter(|(id, _)| {
                let b = self.map.bucket_of(id);
                sends(&self.map, self.order.replicas(b), me, target, |n| {
                    held_by.get(&n).is_some_and(|h| h.contains(id))
                })
            })
            .collect()
    }

    /// Read `ids` from this node's `shard` and store them at `host:port`, each at its
    /// level (one `Replicate` carries one level).
    fn copy(
        &mut self,
        shard: u16,
        host: &str,
        port: u16,
        mut ids: Vec<Held>,
        p: &mut RepairProgress,
    ) -> Result<(), String> {
        ids.sort_by_key(|(_, level)| *level);
        let local_port = self.ctx.shard_ports[shard as usize];
        let local = self.local_host();
        let mut batch: Vec<PutChunk> = Vec::new();
        let mut bytes = 0usize;
        for (i, &(id, level)) in ids.iter().enumerate() {
            match self.call(&local, local_port, &Request::Get { id })? {
                Response::GetReply {
                    chunk: Some((codec, raw_len, data)),
                } => {
                    bytes += PUT_CHUNK_OVERHEAD_BYTES + data.len();
                    batch.push(PutChunk {
                        id,
                        codec,
                        raw_len,
                        data,
                    });
                }
                // Swept or compacted away since it was listed: nothing to copy.
                Response::GetReply { chunk: None } => {}
                other => return Err(format!("reading {id}: {other:?}")),
            }
            let last_of_level = ids.get(i + 1).is_none_or(|(_, l)| *l != level);
            if !batch.is_empty() && (bytes >= COPY_BATCH_BYTES || last_of_level) {
                let chunks = std::mem::take(&mut batch);
                let n = chunks.len() as u64;
                match self.call(
                    host,
                    port,
                    &Request::Replicate {
                        hint_for: 0,
                        level: level.max(1),
                        chunks,
                    },
                )? {
                    Response::PutReply { .. } => {
                        p.copied += n;
                        p.copied_bytes += bytes as u64;
                        p.total_copied += n;
                        p.total_copied_bytes += bytes as u64;
                    }
                    other => return Err(format!("copying to {host}:{port}: {other:?}")),
                }
                self.throttle(bytes as u64);
                bytes = 0;
            }
        }
        Ok(())
    }

    /// A copy of `id` on this node's `shard` is bad: fetch a good one from another node of
    /// its bucket (checked against the id here), then remove the bad copy and store the good
    /// one (at `level`, the bad copy's). Without a good copy elsewhere nothing is removed.
    fn restore(&mut self, shard: u16, id: &ChunkId, level: u8) {
        let me = self.ctx.cfg.raft_id;
        let b = self.map.bucket_of(id);
        let others: Vec<u64> = self
            .map
            .read_order(self.order.replicas(b))
            .into_iter()
            .filter(|n| *n != me)
            .collect();
        let key = match self.ctx.cfg.dedupe_key() {
            Ok(k) => k,
            Err(_) => return,
        };
        for n in others {
            let Some(node) = self.map.node(n).cloned() else {
                continue;
            };
            let port = node.base_port + (b % node.shards.max(1) as u32) as u16;
            let Ok(Response::GetReply {
                chunk: Some((codec, raw_len, data)),
            }) = self.call(&node.host, port, &Request::Get { id: *id })
            else {
                continue;
            };
            if hivefs_net::chunk::verify(&key, id, codec, &data, raw_len as usize).is_err() {
                tracing::warn!(node = %node.name, "scrub: the copy of {id} there does not verify either");
                continue;
            }
            // A good copy is in hand: only now the bad one goes, then the good one is
            // stored in its place, at the bad one's level.
            let local = self.local_host();
            let port = self.ctx.shard_ports[shard as usize];
            let drop = ShardAdmin::DropCopies {
                ids: meta::join_ids(std::slice::from_ref(id)),
            };
            if let Err(e) = self.admin(&local, port, &drop) {
                tracing::warn!("scrub: removing the bad copy of {id}: {e}");
                return;
            }
            let chunks = vec![PutChunk {
                id: *id,
                codec,
                raw_len,
                data,
            }];
            match self.call(
                &local,
                port,
                &Request::Replicate {
                    hint_for: 0,
                    level: level.max(1),
                    chunks,
                },
            ) {
                Ok(Response::PutReply { .. }) => {
                    tracing::info!(from = %node.name, "scrub: {id} restored from another copy");
                    return;
                }
                other => tracing::warn!("scrub: storing {id} again: {other:?}"),
            }
        }
        tracing::warn!("scrub: no other node gave a good copy of {id} now: the bad copy stays (it is refused on read); the next scrub tries again");
    }

    /// Keep to `repair_mib_per_sec`.
    fn throttle(&mut self, bytes: u64) {
        let rate = self.ctx.cfg.repair_mib_per_sec.max(1) << 20;
        self.window.1 += bytes;
        let due = Duration::from_secs_f64(self.window.1 as f64 / rate as f64);
        let spent = self.window.0.elapsed();
        if due > spent {
            std::thread::sleep(due - spent);
        }
        if spent > Duration::from_secs(1) {
            self.window = (Instant::now(), 0);
        }
    }
}
