//! Deterministic simulation of garbage collection racing writers, uploads not yet
//! committed, crashes and replays.
//!
//! One thread, one seed. The world:
//! - a real [`MetaStore`] on an in-memory redb disk ([`MemDisk`]) that keeps, besides its
//!   bytes, the image as of its last sync: a *store crash* drops the store, reopens it on
//!   that image (losing every batch committed with `Durability::None` since the last durable
//!   one) and lets the simulated Raft log apply again, in batches of random size, every entry
//!   after the `raft_state` the store kept, as `MetaRaft` does. Commands reach the store only
//!   as encoded [`MetaCommand`]s through [`MetaStore::apply_batch`]; every entry applied again
//!   must answer exactly as it did the first time;
//! - 2 to 4 [`ShardCore`]s, each over its own [`SimDevice`] (crashes lose or tear what was
//!   not flushed; write errors fail the shard, which is then restarted), holding chunks routed
//!   by a [`ClusterMap`] bucket map as the node builds it; compaction is requested and stepped
//!   as in [`crate::sim`];
//! - writer clients, interleaved at random: a *write* cuts data made of blocks from a small
//!   universe (many duplicates) and fresh blocks (never repeated) into chunks with the real
//!   id and codec functions of `hivefs_net::chunk`, asks each owning shard `has` (one shard
//!   per step), puts the missing chunks, and commits the extents with the oldest claim epoch
//!   it got only after a random delay of up to hundreds of steps (an upload not yet
//!   committed, while collections run). A commit refused with `EAGAIN` (stale claim) claims
//!   again and retries, at most three attempts, as `hi_command/src/writeback.rs` does;
//!   a failed upload (shard crash, no space) is claimed again too. Clients also overwrite,
//!   truncate, unlink (the orphan keeps its extents, and may still be committed to, until
//!   `Reclaim`), read back files through real gets, and abandon uploads (never committed:
//!   garbage). Mutations lose their request or their reply now and then: the client retries
//!   the same `(client, seq)` later and must get the first answer (exactly once); stray
//!   duplicates of old log entries are proposed again and must change nothing;
//! - a GC driver doing what `meta::server::run_gc` does, one small step at a time between
//!   the clients' steps: `AdvanceGcEpoch` through the log; `begin_gc` on each shard; the mark
//!   (`referenced_chunks` after a read barrier: the log fully applied) at a random later
//!   step; then per shard `list_ids` in pages and `sweep` of the unmarked ids in pages, each
//!   sweep waited for (durable) as the node answers it; `end_gc`. A shard that restarts
//!   after its `begin_gc` has lost its window and refuses the sweep: the collection fails and
//!   every shard is told the epoch again (`set_gc_epoch`, as `sync_gc_epoch` does). A shard
//!   restart before its `begin_gc`, or a store crash, is a restart of the whole node in
//!   today's one-node hive: the collection in progress dies and the epoch is synced.
//!
//! The oracle:
//! 1. every chunk a live extent references (orphans included) is held `Verified` by its
//!    shard, gets of it return bytes that verify, and every file's content read back (the
//!    store's extents and size, the chunks' plaintext) equals the model of what was
//!    committed; checked every `check_every` steps, after each collection and at the end,
//!    and on every client read;
//! 2. [`MetaStore::check`] finds nothing;
//! 3. garbage does not outlive two collections: after a collection completes, no chunk
//!    held by a shard that has been unreferenced since before the start of the collection
//!    before it, and unclaimed (no `has` hit, no put) since then, remains;
//! 4. [`ShardCore::audit`] holds on every shard;
//! 5. (exactly once) a retried or replayed command answers exactly as its first application,
//!    and a stray duplicate answers its stored reply (or `ESTALE` below the client's floor)
//!    without applying again (the content model would diverge).
//!
//! `plant_sweep_ignores_claims` makes the driver tombstone every unmarked id with
//! [`ShardCore::delete`] instead of [`ShardCore::sweep`] (claims ignored): the oracle must
//! catch it (test `planted_sweep_ignoring_claims_is_caught`).
//!
//! Found so far: a sweep's tombstones wait in the commit queue behind a full batch, and
//! meanwhile `has` answered yes for a chunk the sweep had chosen, handing out a claim of the
//! current epoch; the commit built on it was accepted and referenced a deleted chunk (seed
//! 39939; fixed in `shard.rs`: an id with a queued tombstone does not answer `has`). And
//! `hive fsck`'s stale rule (`ListStale` before epoch E-1, unreferenced) also reported
//! chunks that were live at both marks and became garbage only afterwards (their claim
//! epoch was old); fixed: a collection tells each shard which listed ids its mark found
//! live (`ShardCore::marked_live`), and those count as claimed in that epoch. What the rule
//! still reports early (after a failed collection, whose mark it cannot know completed) is
//! counted in [`SimReport::fsck_stale_fresh`], not an oracle failure; oracle 3 is the
//! exact rule.
//!
//! A failure names its seed; `run(&SimConfig::new(seed, ops))` reproduces it exactly.
//! `HIVE_GC_SIM_SEEDS` / `HIVE_GC_SIM_OPS` run more seeds / operations per seed in the tests,
//! `HIVE_GC_SIM_BASE_SEED` other seeds than CI's (each test adds its offset to it);
//! `HIVE_GC_SIM_SEED=N` runs that one seed; `HIVE_GC_SIM_DEBUG=1` prints collections,
//! crashes and commits.

use crate::format::Superblock;
use crate::index::EntryState;
use crate::meta::sim_store::SimMeta;
use crate::shard::{Completion, PutChunk, PutOutcome, ShardConfig, ShardCore, ShardError};
use crate::sim::{Rng, SimFailure};
use hivefs_net::chunk::{self, ChunkId, Codec, DedupeKey};
use hivefs_net::meta::{
    self, Answer, Errno, Extent, FileKind, MetaCommand, MetaReply, Mutation, Query, SetAttr,
    Timespec, ROOT_INO,
};
use hivefs_net::proto::ClusterMap;
use hivefs_nvme::rng::SplitMix64;
use hivefs_nvme::SharedSim;
use hivefs_nvme::{SimDevice, SimFaults};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    /// Client operations to run (each client step that does something: a `has` to one
    /// shard, a put, a commit, a truncate, an unlink, a create, a reclaim, a read, a retry).
    pub ops: u64,
    pub shards: u16,
    pub clients: u32,
    pub files_per_client: u32,
    /// Distinct universe blocks (fewer means more dedupe, so more `has` hits on garbage).
    pub universe: u32,
    pub max_file_bytes: u64,
    /// Steps an uploaded write may wait before its commit, at most.
    pub commit_delay_max: u64,
    /// Steps between collections, at most.
    pub gc_idle_max: u64,
    /// Per million steps, per shard.
    pub shard_crash_per_million: u64,
    /// Per million steps.
    pub store_crash_per_million: u64,
    /// Per million mutations: the request never reaches the log (the client retries).
    pub lost_request_per_million: u64,
    /// Per million mutations: applied, but the reply is lost (the client retries).
    pub lost_reply_per_million: u64,
    /// Per million steps: an old log entry is proposed again.
    pub stray_duplicate_per_million: u64,
    /// Per million uploads: never committed.
    pub abandon_per_million: u64,
    pub faults: SimFaults,
    pub segment_bytes: u64,
    pub device_bytes: u64,
    pub commit_max_bytes: usize,
    /// Full oracle check every this many steps.
    pub check_every: u64,
    /// Planted bug (the oracle must catch it): the driver's sweep ignores claims.
    #[doc(hidden)]
    pub plant_sweep_ignores_claims: bool,
}

impl SimConfig {
    pub fn new(seed: u64, ops: u64) -> SimConfig {
        SimConfig {
            seed,
            ops,
            shards: 2 + (seed % 3) as u16,
            clients: 3 + (seed / 3 % 2) as u32,
            files_per_client: 3,
            universe: 160,
            max_file_bytes: 24 << 10,
            commit_delay_max: [40, 400][(seed / 6 % 2) as usize],
            gc_idle_max: 300,
            shard_crash_per_million: 400,
            store_crash_per_million: 1_000,
            lost_request_per_million: 20_000,
            lost_reply_per_million: 20_000,
            stray_duplicate_per_million: 10_000,
            abandon_per_million: 100_000,
            faults: SimFaults {
                read_error_per_million: 0,
                write_error_per_million: 30,
                bit_flip_per_million: 0,
                torn_writes: true,
            },
            segment_bytes: 256 << 10,
            device_bytes: crate::format::DATA_START + 40 * (256 << 10),
            commit_max_bytes: 8 << 10,
            check_every: 400,
            plant_sweep_ignores_claims: false,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct SimReport {
    pub ops: u64,
    pub steps: u64,
    pub commits: u64,
    pub commits_refused_stale: u64,
    pub writes_given_up: u64,
    pub uploads_abandoned: u64,
    pub uploads_failed: u64,
    pub has_hits: u64,
    pub puts: u64,
    pub truncates: u64,
    pub unlinks: u64,
    pub reads_checked: u64,
    pub collections_done: u64,
    pub collections_failed: u64,
    pub sweeps_refused: u64,
    pub swept_chunks: u64,
    pub shard_crashes: u64,
    pub store_crashes: u64,
    pub entries_replayed: u64,
    pub retries: u64,
    pub stray_duplicates: u64,
    pub full_checks: u64,
    pub garbage_checks: u64,
    /// Chunks `hive fsck`'s rule (`ListStale` before epoch E-1, unreferenced) would report
    /// at the end of each collection, and how many of those the model knows to have become
    /// unreferenced after the mark of the collection before (not garbage that outlived two
    /// collections).
    pub fsck_stale_reported: u64,
    pub fsck_stale_fresh: u64,
}

impl SimReport {
    pub fn add(&mut self, r: &SimReport) {
        macro_rules! sum {
            ($($f:ident),*) => { $(self.$f += r.$f;)* };
        }
        sum!(
            ops,
            steps,
            commits,
            commits_refused_stale,
            writes_given_up,
            uploads_abandoned,
            uploads_failed,
            has_hits,
            puts,
            truncates,
            unlinks,
            reads_checked,
            collections_done,
            collections_failed,
            sweeps_refused,
            swept_chunks,
            shard_crashes,
            store_crashes,
            entries_replayed,
            retries,
            stray_duplicates,
            full_checks,
            garbage_checks,
            fsck_stale_reported,
            fsck_stale_fresh
        );
    }
}

// ---- the model ------------------------------------------------------------------------

/// Where a chunk's plaintext comes from (regenerated on demand).
#[derive(Clone, Copy, Debug)]
enum Block {
    Universe(u32),
    Fresh(u64),
}

#[derive(Clone)]
struct Prepared {
    codec: Codec,
    raw_len: u32,
    stored: Arc<Vec<u8>>,
}

#[derive(Clone, Debug)]
struct FileModel {
    ino: u64,
    name: Vec<u8>,
    /// Committed content (its length is the size).
    content: Vec<u8>,
    /// A mutation of it has an outcome the client does not know yet.
    in_doubt: bool,
    unlinked: bool,
}

#[derive(Clone, Debug)]
enum UpPhase {
    /// Asking shard `next` (and the following ones) which chunks it holds.
    Has { next: u16 },
    /// Puts outstanding (tickets); `failed` once one failed.
    Put { tickets: HashSet<u64>, failed: bool },
    /// Uploaded: commit at step `at`.
    Uploaded { at: u64 },
}

#[derive(Clone, Debug)]
struct Upload {
    serial: u64,
    offset: u64,
    /// Chunks in file order (the same id may repeat).
    chunks: Vec<ChunkId>,
    extents: Vec<Extent>,
    /// The oldest claim epoch of this attempt's answers.
    claim: u64,
    /// Ids some shard said it lacks.
    missing: Vec<ChunkId>,
    phase: UpPhase,
    /// Commit attempts refused as stale so far.
    stale: u8,
    /// Failed uploads so far.
    failures: u8,
}

#[derive(Clone, Debug)]
enum Slot {
    Empty,
    Idle(FileModel),
    Uploading(FileModel, Upload),
    /// Unlinked, still open: reclaimed at step `at`.
    Orphan(FileModel, u64),
}

/// What a mutation's answer is for.
#[derive(Clone, Debug)]
enum Then {
    Create { slot: usize, name: Vec<u8> },
    Commit { slot: usize },
    Truncate { slot: usize, size: u64 },
    Unlink { slot: usize },
    Reclaim { slot: usize },
}

/// A mutation whose request or reply was lost: the client sends it again at `due`.
struct Retry {
    cmd: MetaCommand,
    /// The answer it got if it was applied.
    first: Option<Vec<u8>>,
    due: u64,
    then: Then,
}

struct Client {
    id: u64,
    seq: u64,
    slots: Vec<Slot>,
    retry: Option<Retry>,
    next_name: u64,
}

/// Who waits for a shard ticket.
#[derive(Clone, Copy, Debug)]
enum Owner {
    Put {
        client: usize,
        slot: usize,
        serial: u64,
    },
    Sweep,
    Get,
}

#[derive(Clone, Debug)]
enum Gc {
    Idle {
        until: u64,
    },
    Begin {
        epoch: u64,
        next: u16,
        mark_at: u64,
    },
    Mark {
        epoch: u64,
        at: u64,
    },
    List {
        epoch: u64,
        shard: u16,
        after: Option<ChunkId>,
        doomed: Vec<ChunkId>,
    },
    Sweep {
        epoch: u64,
        shard: u16,
        doomed: Vec<ChunkId>,
        pos: usize,
        ticket: Option<u64>,
    },
}

/// A get's answer: codec, raw length, stored bytes.
type StoredBytes = (Codec, u32, Vec<u8>);

const ADMIN_CLIENT: u64 = 1;
const GC_CLIENT_BASE: u64 = 1 << 40;
const LIST_PAGE: usize = 64;
const SWEEP_PAGE: usize = 48;

struct World {
    cfg: SimConfig,
    rng: Rng,
    key: DedupeKey,
    map: ClusterMap,
    universe: Vec<Vec<u8>>,
    blocks: HashMap<ChunkId, Block>,
    prepared: HashMap<ChunkId, Prepared>,
    next_fresh: u64,
    meta: SimMeta,
    vol: u32,
    devs: Vec<SharedSim>,
    sb: Superblock,
    shards: Vec<ShardCore>,
    clients: Vec<Client>,
    owners: HashMap<u64, (u16, Owner)>,
    next_ticket: u64,
    gets_done: HashMap<u64, Result<StoredBytes, ShardError>>,
    gc: Gc,
    gc_client: u64,
    gc_started: u64,
    gc_marked: Arc<HashSet<ChunkId>>,
    /// Shards whose collection window this collection opened and no restart closed.
    gc_begun: Vec<bool>,
    /// Start steps of the collections that completed.
    completed: Vec<u64>,
    /// Step of each chunk's latest claim (a `has` hit or a put).
    last_claim: HashMap<ChunkId, u64>,
    /// Step since which each chunk is known unreferenced (absent: referenced, or unknown).
    unref_since: HashMap<ChunkId, u64>,
    next_serial: u64,
    step: u64,
    report: SimReport,
    debug: bool,
    trace_id: Option<String>,
}

fn block_bytes(seed: u64, n: u64) -> Vec<u8> {
    let mut r = SplitMix64::new(seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let len = 64 + (r.next_u64() % 2000) as usize;
    if n.is_multiple_of(2) {
        let word = format!("fresh-{n}-");
        word.as_bytes().iter().copied().cycle().take(len).collect()
    } else {
        (0..len).map(|_| r.next_u64() as u8).collect()
    }
}

fn open_shard(
    dev: &SharedSim,
    sb: &Superblock,
    key: DedupeKey,
    cfg: &SimConfig,
    summaries: bool,
) -> Result<ShardCore, ShardError> {
    ShardCore::open(
        Box::new(dev.clone()),
        sb.shard_layout(0),
        key,
        ShardConfig {
            commit_max_bytes: cfg.commit_max_bytes,
            use_summaries: summaries,
            compact_live_percent: 50,
            compact_reserve_segments: 2,
        },
    )
}

impl World {
    fn fail(&self, message: String) -> SimFailure {
        SimFailure {
            seed: self.cfg.seed,
            op: self.report.ops,
            message: format!("step {}: {message}", self.step),
        }
    }

    fn now(&self) -> Timespec {
        Timespec {
            sec: 1_700_000_000 + (self.step / 1000) as i64,
            nsec: (self.step % 1000) as u32 * 1000,
        }
    }

    fn shard_of(&self, id: &ChunkId) -> u16 {
        self.map.shard_of(id)
    }

    fn plaintext(&self, id: &ChunkId) -> Vec<u8> {
        match self.blocks[id] {
            Block::Universe(i) => self.universe[i as usize].clone(),
            Block::Fresh(n) => block_bytes(self.cfg.seed, n),
        }
    }

    fn prepare(&mut self, plain: &[u8], block: Block) -> ChunkId {
        let id = ChunkId::compute(&self.key, plain);
        if let std::collections::hash_map::Entry::Vacant(slot) = self.prepared.entry(id) {
            let preferred = match id.0[5] % 3 {
                0 => Codec::Zstd,
                1 => Codec::Lz4,
                _ => Codec::Raw,
            };
            let (codec, stored) = chunk::compress(preferred, plain);
            slot.insert(Prepared {
                codec,
                raw_len: plain.len() as u32,
                stored: Arc::new(stored),
            });
            self.blocks.insert(id, block);
        }
        id
    }

    fn ticket(&mut self, shard: u16, owner: Owner) -> u64 {
        self.next_ticket += 1;
        self.owners.insert(self.next_ticket, (shard, owner));
        self.next_ticket
    }

    fn claimed(&mut self, id: ChunkId) {
        self.last_claim.insert(id, self.step);
    }

    /// `HIVE_GC_SIM_TRACE_ID=<hex prefix>`: what happens to one chunk.
    fn trace(&self, id: &ChunkId, what: &str) {
        if let Some(t) = &self.trace_id {
            if id.to_hex().starts_with(t.as_str()) {
                let s = self.shard_of(id);
                eprintln!(
                    "step {} {id:?} (shard {s}, entry {:?}, gc {:?}): {what}",
                    self.step,
                    self.shards[s as usize]
                        .index()
                        .get(id)
                        .map(|e| (e.state, e.claimed_epoch)),
                    self.gc_brief()
                );
            }
        }
    }

    fn gc_brief(&self) -> String {
        match &self.gc {
            Gc::Idle { .. } => "idle".into(),
            Gc::Begin { epoch, next, .. } => format!("begin {epoch} next {next}"),
            Gc::Mark { epoch, .. } => format!("mark {epoch}"),
            Gc::List { epoch, shard, .. } => format!("list {epoch} shard {shard}"),
            Gc::Sweep {
                epoch,
                shard,
                ticket,
                ..
            } => format!("sweep {epoch} shard {shard} waiting {}", ticket.is_some()),
        }
    }

    fn gc_epoch(&mut self) -> Result<u64, SimFailure> {
        self.meta.barrier(&mut self.rng).map_err(|e| self.fail(e))?;
        match self.meta.store().query(0, &Query::GcEpoch) {
            Ok(Ok(Answer::GcEpoch(e))) => Ok(e),
            other => Err(self.fail(format!("gc epoch query: {other:?}"))),
        }
    }

    // ---- shards ---------------------------------------------------------------------

    /// Poll every shard and hand each completion to its owner.
    fn poll_all(&mut self, wait: bool) -> Result<(), SimFailure> {
        for s in 0..self.shards.len() {
            self.poll_shard(s as u16, wait)?;
        }
        Ok(())
    }

    fn poll_shard(&mut self, s: u16, wait: bool) -> Result<(), SimFailure> {
        let mut out = Vec::new();
        self.shards[s as usize].poll(&mut out, wait);
        // Ticket order: a failing shard answers from its maps in no fixed order, and the run
        // must not depend on it.
        out.sort_by_key(|c| match c {
            Completion::Put { ticket, .. }
            | Completion::Get { ticket, .. }
            | Completion::Delete { ticket, .. } => *ticket,
        });
        for c in out {
            self.complete(s, c)?;
        }
        Ok(())
    }

    fn complete(&mut self, s: u16, c: Completion) -> Result<(), SimFailure> {
        let ticket = match &c {
            Completion::Put { ticket, .. }
            | Completion::Get { ticket, .. }
            | Completion::Delete { ticket, .. } => *ticket,
        };
        let Some((_, owner)) = self.owners.remove(&ticket) else {
            return Err(self.fail(format!("shard {s}: completion for unknown ticket {ticket}")));
        };
        match (owner, c) {
            (
                Owner::Put {
                    client,
                    slot,
                    serial,
                },
                Completion::Put {
                    claim_epoch,
                    result,
                    ..
                },
            ) => {
                let ok = match result {
                    Ok(outcomes) => {
                        if let Some(i) = outcomes.iter().position(|o| *o == PutOutcome::Rejected) {
                            return Err(
                                self.fail(format!("shard {s} rejected a genuine chunk (#{i})"))
                            );
                        }
                        true
                    }
                    Err(ShardError::NoSpace)
                    | Err(ShardError::Failed(_))
                    | Err(ShardError::Device(_)) => false,
                    Err(e) => return Err(self.fail(format!("put failed unexpectedly: {e}"))),
                };
                self.put_done(client, slot, serial, ticket, ok.then_some(claim_epoch));
            }
            (Owner::Get, Completion::Get { result, .. }) => {
                let r = result.map(|c| (c.codec, c.raw_len, c.data.to_vec()));
                self.gets_done.insert(ticket, r);
            }
            (Owner::Sweep, Completion::Delete { result, .. }) => {
                self.sweep_done(s, ticket, result)?
            }
            (o, c) => return Err(self.fail(format!("completion {c:?} for {o:?}"))),
        }
        Ok(())
    }

    /// Crash shard `s` (power loss: its memory and unflushed writes gone) and restart it.
    fn crash_shard(&mut self, s: u16) -> Result<(), SimFailure> {
        self.report.shard_crashes += 1;
        if self.debug {
            eprintln!("step {}: shard {s} crashes", self.step);
        }
        {
            let mut d = self.devs[s as usize].0.lock().expect("sim device");
            d.crash();
            d.set_faults(SimFaults {
                write_error_per_million: 0,
                ..self.cfg.faults
            });
        }
        let summaries = self.rng.below(4) != 0;
        let shard = open_shard(
            &self.devs[s as usize],
            &self.sb,
            self.key,
            &self.cfg,
            summaries,
        )
        .map_err(|e| self.fail(format!("reopening shard {s}: {e}")))?;
        self.devs[s as usize]
            .0
            .lock()
            .expect("sim device")
            .set_faults(self.cfg.faults);
        self.shards[s as usize] = shard;
        // Everything in flight on it is lost.
        let lost: Vec<(u64, Owner)> = self
            .owners
            .iter()
            .filter(|(_, (sh, _))| *sh == s)
            .map(|(t, (_, o))| (*t, *o))
            .collect();
        let mut lost = lost;
        lost.sort_by_key(|(t, _)| *t);
        for (t, o) in lost {
            self.owners.remove(&t);
            match o {
                Owner::Put {
                    client,
                    slot,
                    serial,
                } => self.put_done(client, slot, serial, t, None),
                Owner::Sweep => {
                    self.gc_fail(&format!("shard {s} restarted during its sweep"))?;
                }
                Owner::Get => {
                    self.gets_done
                        .insert(t, Err(ShardError::Failed("restarted".into())));
                }
            }
        }
        // A restart of the shard is a restart of the node here: the collection in progress
        // dies unless the shard had begun it (then it refuses the sweep, as run_gc sees it).
        let begun = self.gc_begun[s as usize];
        self.gc_begun[s as usize] = false;
        let running = !matches!(self.gc, Gc::Idle { .. });
        if running && !begun {
            self.gc_fail(&format!("shard {s} restarted before its collection began"))?;
        }
        // The node's start: tell the shard the epoch the store accepts claims from.
        let epoch = self.gc_epoch()?;
        self.shards[s as usize].set_gc_epoch(epoch);
        self.check_audit()
    }

    fn drive_compaction(&mut self) {
        for s in 0..self.shards.len() {
            if self.rng.below(50) == 0 {
                self.shards[s].request_compaction();
            }
            if self.shards[s].compaction_pending() && self.rng.below(2) == 0 {
                for _ in 0..1 + self.rng.below(3) {
                    self.shards[s].compact_step();
                }
            }
        }
    }

    // ---- mutations ------------------------------------------------------------------

    fn command(&mut self, c: usize, op: Mutation) -> MetaCommand {
        let now = self.now();
        let cl = &mut self.clients[c];
        cl.seq += 1;
        MetaCommand {
            volume: self.vol,
            client: cl.id,
            seq: cl.seq,
            acked_below: cl.seq,
            now,
            op,
        }
    }

    fn propose(&mut self, cmd: &MetaCommand) -> Result<MetaReply, SimFailure> {
        let r = self
            .meta
            .propose(Some(meta::encode(cmd)), &mut self.rng)
            .map_err(|e| self.fail(e))?;
        meta::decode::<MetaReply>(&r).map_err(|e| self.fail(format!("reply: {e}")))
    }

    fn doubt(&mut self, c: usize, then: &Then, on: bool) {
        let slot = match then {
            Then::Create { .. } => return,
            Then::Commit { slot }
            | Then::Truncate { slot, .. }
            | Then::Unlink { slot }
            | Then::Reclaim { slot } => *slot,
        };
        if let Slot::Idle(f) | Slot::Uploading(f, _) | Slot::Orphan(f, _) =
            &mut self.clients[c].slots[slot]
        {
            f.in_doubt = on;
        }
    }

    /// Send a mutation; its answer goes to `then` (now, or after a retry).
    fn mutate(&mut self, c: usize, op: Mutation, then: Then) -> Result<(), SimFailure> {
        let cmd = self.command(c, op);
        if self.rng.chance(self.cfg.lost_request_per_million) {
            self.doubt(c, &then, true);
            let due = self.step + 1 + self.rng.below(60);
            self.clients[c].retry = Some(Retry {
                cmd,
                first: None,
                due,
                then,
            });
            return Ok(());
        }
        let reply = self.propose(&cmd)?;
        if self.rng.chance(self.cfg.lost_reply_per_million) {
            self.doubt(c, &then, true);
            let due = self.step + 1 + self.rng.below(60);
            self.clients[c].retry = Some(Retry {
                cmd,
                first: Some(meta::encode(&reply)),
                due,
                then,
            });
            return Ok(());
        }
        self.answered(c, then, reply)
    }

    fn retry(&mut self, c: usize) -> Result<(), SimFailure> {
        let Some(mut r) = self.clients[c].retry.take() else {
            return Ok(());
        };
        self.report.retries += 1;
        // The leader stamps its clock again; the store answers from its session table.
        r.cmd.now = self.now();
        let reply = self.propose(&r.cmd)?;
        if let Some(first) = &r.first {
            if *first != meta::encode(&reply) {
                return Err(self.fail(format!(
                    "retry of (client {}, seq {}) answered {reply:?}, first {:?}: applied twice",
                    r.cmd.client,
                    r.cmd.seq,
                    meta::decode::<MetaReply>(first)
                )));
            }
        }
        self.doubt(c, &r.then, false);
        self.answered(c, r.then, reply)
    }

    fn answered(&mut self, c: usize, then: Then, reply: MetaReply) -> Result<(), SimFailure> {
        match then {
            Then::Create { slot, name } => match reply {
                Ok(Answer::Attr(a)) => {
                    self.clients[c].slots[slot] = Slot::Idle(FileModel {
                        ino: a.ino,
                        name,
                        content: Vec::new(),
                        in_doubt: false,
                        unlinked: false,
                    });
                }
                other => return Err(self.fail(format!("create: {other:?}"))),
            },
            Then::Commit { slot } => self.commit_answered(c, slot, reply)?,
            Then::Truncate { slot, size } => match (reply, &mut self.clients[c].slots[slot]) {
                (Ok(Answer::Attr(a)), Slot::Idle(f)) if a.size == size => {
                    f.content.resize(size as usize, 0);
                }
                (other, _) => return Err(self.fail(format!("truncate to {size}: {other:?}"))),
            },
            Then::Unlink { slot } => match (reply, &mut self.clients[c].slots[slot]) {
                (Ok(Answer::Attr(a)), Slot::Idle(f) | Slot::Uploading(f, _)) if a.nlink == 0 => {
                    f.unlinked = true;
                    let f = f.clone();
                    if matches!(self.clients[c].slots[slot], Slot::Idle(_)) {
                        let at = self.step + self.rng.below(100);
                        self.clients[c].slots[slot] = Slot::Orphan(f, at);
                    }
                }
                (other, _) => return Err(self.fail(format!("unlink: {other:?}"))),
            },
            Then::Reclaim { slot } => match reply {
                Ok(Answer::Done) => self.clients[c].slots[slot] = Slot::Empty,
                other => return Err(self.fail(format!("reclaim: {other:?}"))),
            },
        }
        Ok(())
    }

    // ---- uploads --------------------------------------------------------------------

    fn start_write(&mut self, c: usize, slot: usize, f: FileModel) {
        let max = self.cfg.max_file_bytes;
        let offset = self.rng.below(max - max / 4);
        let mut chunks = Vec::new();
        let mut extents = Vec::new();
        let mut at = offset;
        for _ in 0..1 + self.rng.below(8) {
            let (plain, block) = if self.rng.below(5) == 0 {
                self.next_fresh += 1;
                let n = self.next_fresh;
                (block_bytes(self.cfg.seed, n), Block::Fresh(n))
            } else {
                let i = self.rng.below(self.universe.len() as u64) as u32;
                (self.universe[i as usize].clone(), Block::Universe(i))
            };
            let id = self.prepare(&plain, block);
            chunks.push(id);
            extents.push(Extent {
                offset: at,
                len: plain.len() as u32,
                chunk: id,
                chunk_offset: 0,
            });
            at += plain.len() as u64;
        }
        self.next_serial += 1;
        let up = Upload {
            serial: self.next_serial,
            offset,
            chunks,
            extents,
            claim: u64::MAX,
            missing: Vec::new(),
            phase: UpPhase::Has { next: 0 },
            stale: 0,
            failures: 0,
        };
        self.clients[c].slots[slot] = Slot::Uploading(f, up);
    }

    /// One step of an upload in progress.
    fn step_upload(&mut self, c: usize, slot: usize) -> Result<(), SimFailure> {
        let Slot::Uploading(_, up) = &mut self.clients[c].slots[slot] else {
            return Ok(());
        };
        match up.phase.clone() {
            UpPhase::Has { next } => {
                self.report.ops += 1;
                let ids: Vec<ChunkId> = {
                    let mut v: Vec<ChunkId> = up
                        .chunks
                        .iter()
                        .filter(|id| self.map.shard_of(id) == next)
                        .copied()
                        .collect();
                    v.sort();
                    v.dedup();
                    v
                };
                let mut present = Vec::new();
                let epoch = if ids.is_empty() {
                    u64::MAX
                } else {
                    self.shards[next as usize].has(&ids, 1, &mut present)
                };
                let mut missing = Vec::new();
                for (id, p) in ids.iter().zip(&present) {
                    self.trace(id, &format!("client {c} has -> {p}, epoch {epoch}"));
                    if *p {
                        self.report.has_hits += 1;
                        self.claimed(*id);
                    } else {
                        missing.push(*id);
                    }
                }
                let Slot::Uploading(_, up) = &mut self.clients[c].slots[slot] else {
                    unreachable!()
                };
                up.claim = up.claim.min(epoch);
                up.missing.extend(missing);
                if next + 1 < self.shards.len() as u16 {
                    up.phase = UpPhase::Has { next: next + 1 };
                } else {
                    up.phase = UpPhase::Put {
                        tickets: HashSet::new(),
                        failed: false,
                    };
                    let missing = std::mem::take(&mut up.missing);
                    let serial = up.serial;
                    if missing.is_empty() {
                        return self.uploaded(c, slot);
                    }
                    let mut by_shard: BTreeMap<u16, Vec<PutChunk>> = BTreeMap::new();
                    for id in missing {
                        let p = &self.prepared[&id];
                        by_shard
                            .entry(self.map.shard_of(&id))
                            .or_default()
                            .push(PutChunk {
                                id,
                                codec: p.codec,
                                raw_len: p.raw_len,
                                level: 1,
                                data: crate::shard::ChunkBytes::shared(
                                    p.stored.clone(),
                                    0..p.stored.len(),
                                ),
                            });
                        self.claimed(id);
                        self.trace(&id, &format!("client {c} puts"));
                    }
                    let mut tickets = HashSet::new();
                    for (s, chunks) in by_shard {
                        self.report.puts += chunks.len() as u64;
                        let t = self.ticket(
                            s,
                            Owner::Put {
                                client: c,
                                slot,
                                serial,
                            },
                        );
                        tickets.insert(t);
                        self.shards[s as usize].put(t, chunks);
                    }
                    if let Slot::Uploading(_, up) = &mut self.clients[c].slots[slot] {
                        up.phase = UpPhase::Put {
                            tickets,
                            failed: false,
                        };
                    }
                }
            }
            UpPhase::Put { .. } => {}
            UpPhase::Uploaded { at } => {
                if self.step < at {
                    return Ok(());
                }
                self.report.ops += 1;
                if self.rng.chance(self.cfg.abandon_per_million) {
                    // Never committed: what it uploaded is garbage.
                    self.report.uploads_abandoned += 1;
                    return self.upload_over(c, slot);
                }
                let (ino, extents, claim) = {
                    let Slot::Uploading(f, up) = &self.clients[c].slots[slot] else {
                        unreachable!()
                    };
                    (f.ino, up.extents.clone(), up.claim)
                };
                let end = extents.last().map_or(0, |e| e.end());
                // Odd inodes commit with a setattr in the same entry, as a mount sends a
                // file's bytes with its chmod (chosen without the seed's generator, so the
                // kept seeds still replay as they were found).
                let op = if ino % 2 == 1 {
                    Mutation::CommitWriteThenSet {
                        ino,
                        extents,
                        size_at_least: end,
                        claim_epoch: claim,
                        lease: 0,
                        then: vec![SetAttr {
                            perm: Some(0o600 | (claim % 8) as u16),
                            ..Default::default()
                        }],
                    }
                } else {
                    Mutation::CommitWrite {
                        ino,
                        extents,
                        size_at_least: end,
                        claim_epoch: claim,
                        lease: 0,
                    }
                };
                self.mutate(c, op, Then::Commit { slot })?;
            }
        }
        Ok(())
    }

    fn put_done(&mut self, c: usize, slot: usize, serial: u64, ticket: u64, claim: Option<u64>) {
        let Slot::Uploading(_, up) = &mut self.clients[c].slots[slot] else {
            return;
        };
        if up.serial != serial {
            return;
        }
        let UpPhase::Put { tickets, failed } = &mut up.phase else {
            return;
        };
        tickets.remove(&ticket);
        match claim {
            Some(e) => up.claim = up.claim.min(e),
            None => *failed = true,
        }
        if !tickets.is_empty() {
            return;
        }
        if *failed {
            // The upload failed: claim everything again (a few times), then give up.
            self.report.uploads_failed += 1;
            up.failures += 1;
            if up.failures >= 4 {
                self.report.writes_given_up += 1;
                let _ = self.upload_over(c, slot);
                return;
            }
            up.claim = u64::MAX;
            up.phase = UpPhase::Has { next: 0 };
            return;
        }
        let _ = self.uploaded(c, slot);
    }

    fn uploaded(&mut self, c: usize, slot: usize) -> Result<(), SimFailure> {
        let long = self.rng.below(3) == 0;
        let delay = if long {
            self.rng.below(self.cfg.commit_delay_max)
        } else {
            self.rng.below(5)
        };
        let at = self.step + delay;
        if let Slot::Uploading(_, up) = &mut self.clients[c].slots[slot] {
            up.phase = UpPhase::Uploaded { at };
        }
        Ok(())
    }

    /// The upload is over (committed, given up or abandoned): the file is idle again, or an
    /// orphan to reclaim.
    fn upload_over(&mut self, c: usize, slot: usize) -> Result<(), SimFailure> {
        let Slot::Uploading(f, _) = &self.clients[c].slots[slot] else {
            return Ok(());
        };
        let f = f.clone();
        self.clients[c].slots[slot] = if f.unlinked {
            Slot::Orphan(f, self.step + self.rng.below(100))
        } else {
            Slot::Idle(f)
        };
        Ok(())
    }

    fn commit_answered(
        &mut self,
        c: usize,
        slot: usize,
        reply: MetaReply,
    ) -> Result<(), SimFailure> {
        let Slot::Uploading(f, up) = &mut self.clients[c].slots[slot] else {
            return Err(self.fail("commit answered for a slot not uploading".into()));
        };
        match reply {
            Ok(Answer::Attr(a)) => {
                let mut at = up.offset as usize;
                let end = up.extents.last().map_or(0, |e| e.end()) as usize;
                if f.content.len() < end {
                    f.content.resize(end, 0);
                }
                let ids = up.chunks.clone();
                let perm = 0o600 | (up.claim % 8) as u16;
                let mut f2 = f.clone();
                for id in &ids {
                    let plain = self.plaintext(id);
                    f2.content[at..at + plain.len()].copy_from_slice(&plain);
                    at += plain.len();
                }
                if a.size != f2.content.len() as u64 {
                    return Err(self.fail(format!(
                        "commit to inode {}: size {} answered, model {}",
                        f2.ino,
                        a.size,
                        f2.content.len()
                    )));
                }
                if f2.ino % 2 == 1 && a.perm != perm {
                    return Err(self.fail(format!(
                        "commit with a setattr to inode {}: mode {:o} answered, sent {perm:o}",
                        f2.ino, a.perm
                    )));
                }
                for id in &ids {
                    self.unref_since.remove(id);
                    self.trace(id, &format!("client {c} committed, claim {}", a.size));
                }
                if self.debug {
                    eprintln!(
                        "step {}: client {c} commits {} chunks to inode {}",
                        self.step,
                        ids.len(),
                        f2.ino
                    );
                }
                self.report.commits += 1;
                if let Slot::Uploading(f, _) = &mut self.clients[c].slots[slot] {
                    *f = f2;
                }
                self.upload_over(c, slot)
            }
            Err(e) if e == Errno::AGAIN => {
                // The GC epoch moved on between claim and commit: claim again (writeback.rs:
                // three attempts, then the write fails).
                self.report.commits_refused_stale += 1;
                up.stale += 1;
                if up.stale >= 3 {
                    self.report.writes_given_up += 1;
                    return self.upload_over(c, slot);
                }
                up.claim = u64::MAX;
                up.phase = UpPhase::Has { next: 0 };
                Ok(())
            }
            other => Err(self.fail(format!("commit: {other:?}"))),
        }
    }

    // ---- the clients ----------------------------------------------------------------

    fn client_step(&mut self, c: usize) -> Result<(), SimFailure> {
        if let Some(r) = &self.clients[c].retry {
            if self.step >= r.due {
                self.report.ops += 1;
                self.retry(c)?;
            }
            return Ok(());
        }
        let slot = self.rng.below(self.clients[c].slots.len() as u64) as usize;
        match self.clients[c].slots[slot].clone() {
            Slot::Empty => {
                self.report.ops += 1;
                let cl = &mut self.clients[c];
                cl.next_name += 1;
                let name = format!("c{c}-f{}", cl.next_name).into_bytes();
                self.mutate(
                    c,
                    Mutation::Create {
                        parent: ROOT_INO,
                        name: name.clone(),
                        kind: FileKind::File,
                        perm: 0o644,
                        uid: 1,
                        gid: 1,
                        rdev: 0,
                    },
                    Then::Create { slot, name },
                )?;
            }
            Slot::Idle(f) => match self.rng.below(100) {
                0..=59 => {
                    self.report.ops += 1;
                    self.start_write(c, slot, f);
                    self.step_upload(c, slot)?;
                }
                60..=69 => {
                    self.report.ops += 1;
                    self.report.truncates += 1;
                    let size = self.rng.below(f.content.len() as u64 + 2000);
                    self.mutate(
                        c,
                        Mutation::SetAttr {
                            ino: f.ino,
                            set: SetAttr {
                                size: Some(size),
                                ..Default::default()
                            },
                        },
                        Then::Truncate { slot, size },
                    )?;
                }
                70..=74 => self.unlink(c, slot, &f)?,
                _ => {
                    self.report.ops += 1;
                    self.read_check(&f)?;
                }
            },
            Slot::Uploading(f, _) => {
                if !f.unlinked && self.rng.below(200) == 0 {
                    // Unlinked while its upload runs: the commit goes to the orphan.
                    self.unlink(c, slot, &f)?;
                } else {
                    self.step_upload(c, slot)?;
                }
            }
            Slot::Orphan(f, at) => {
                if self.step >= at {
                    self.report.ops += 1;
                    self.mutate(c, Mutation::Reclaim { ino: f.ino }, Then::Reclaim { slot })?;
                }
            }
        }
        Ok(())
    }

    fn unlink(&mut self, c: usize, slot: usize, f: &FileModel) -> Result<(), SimFailure> {
        self.report.ops += 1;
        self.report.unlinks += 1;
        self.mutate(
            c,
            Mutation::Unlink {
                parent: ROOT_INO,
                name: f.name.clone(),
            },
            Then::Unlink { slot },
        )
    }

    /// Read a file back through the store's extents and real gets; compare with the model.
    fn read_check(&mut self, f: &FileModel) -> Result<(), SimFailure> {
        self.report.reads_checked += 1;
        self.meta.barrier(&mut self.rng).map_err(|e| self.fail(e))?;
        let (extents, size) = self.extents_of(f.ino)?;
        let mut ids: Vec<ChunkId> = extents.iter().map(|e| e.chunk).collect();
        ids.sort();
        ids.dedup();
        for id in ids {
            self.get_verified(&id)?;
        }
        self.compare(f, &extents, size)
    }

    fn extents_of(&self, ino: u64) -> Result<(Vec<Extent>, u64), SimFailure> {
        match self.meta.store().query(
            self.vol,
            &Query::Extents {
                ino,
                from: 0,
                to: u64::MAX,
                max: 1 << 16,
            },
        ) {
            Ok(Ok(Answer::Extents {
                extents,
                size,
                more: false,
            })) => Ok((extents, size)),
            other => Err(self.fail(format!("extents of {ino}: {other:?}"))),
        }
    }

    fn compare(&self, f: &FileModel, extents: &[Extent], size: u64) -> Result<(), SimFailure> {
        if f.in_doubt {
            return Ok(());
        }
        let mut got = vec![0u8; size as usize];
        for e in extents {
            let plain = self.plaintext(&e.chunk);
            let src = &plain[e.chunk_offset as usize..(e.chunk_offset + e.len) as usize];
            let (a, b) = (e.offset as usize, e.end() as usize);
            if b > got.len() {
                return Err(self.fail(format!("inode {}: extent past its size {size}", f.ino)));
            }
            got[a..b].copy_from_slice(src);
        }
        if got != f.content {
            let at = got.iter().zip(&f.content).position(|(a, b)| a != b);
            return Err(self.fail(format!(
                "inode {} reads back differently from what was committed: size {} (model {}), \
                 first difference at {at:?}",
                f.ino,
                got.len(),
                f.content.len()
            )));
        }
        Ok(())
    }

    /// Get `id` from its shard (retrying transient errors) and verify it (oracle 1).
    fn get_verified(&mut self, id: &ChunkId) -> Result<(), SimFailure> {
        let s = self.shard_of(id);
        for _attempt in 0..4 {
            let t = self.ticket(s, Owner::Get);
            self.shards[s as usize].get(t, *id);
            let mut spins = 0;
            while !self.gets_done.contains_key(&t) {
                spins += 1;
                if spins > 100_000 {
                    return Err(self.fail(format!("get of {id:?} never completed")));
                }
                self.poll_shard(s, true)?;
            }
            match self.gets_done.remove(&t).expect("done") {
                Ok((codec, raw_len, data)) => {
                    return chunk::verify(&self.key, id, codec, &data, raw_len as usize)
                        .map(|_| ())
                        .map_err(|e| self.fail(format!("get {id:?} does not verify: {e}")));
                }
                Err(ShardError::NotFound(_)) => {
                    return Err(self.fail(format!(
                        "referenced chunk {id:?} not found on shard {s} (last claim at step {:?})",
                        self.last_claim.get(id)
                    )))
                }
                Err(ShardError::Failed(_)) => {
                    // Restart the failed shard, as an operator would, and read again.
                    self.crash_shard(s)?;
                }
                Err(_) => {}
            }
        }
        Err(self.fail(format!("referenced chunk {id:?} unreadable on shard {s}")))
    }

    // ---- the GC driver --------------------------------------------------------------

    fn gc_fail(&mut self, why: &str) -> Result<(), SimFailure> {
        if matches!(self.gc, Gc::Idle { .. }) {
            return Ok(());
        }
        if self.debug {
            eprintln!("step {}: collection fails: {why}", self.step);
        }
        self.report.collections_failed += 1;
        self.gc = Gc::Idle {
            until: self.step + self.rng.below(self.cfg.gc_idle_max),
        };
        self.gc_begun.iter_mut().for_each(|b| *b = false);
        // sync_gc_epoch: every shard hears the epoch, and windows left open are closed.
        let epoch = self.gc_epoch()?;
        for s in self.shards.iter_mut() {
            s.set_gc_epoch(epoch);
        }
        Ok(())
    }

    fn gc_step(&mut self) -> Result<(), SimFailure> {
        match self.gc.clone() {
            Gc::Idle { until } => {
                if self.step < until {
                    return Ok(());
                }
                self.gc_client += 1;
                let cmd = MetaCommand {
                    volume: 0,
                    client: GC_CLIENT_BASE + self.gc_client,
                    seq: 1,
                    acked_below: 1,
                    now: self.now(),
                    op: Mutation::AdvanceGcEpoch,
                };
                let epoch = match self.propose(&cmd)? {
                    Ok(Answer::GcEpoch(e)) => e,
                    other => return Err(self.fail(format!("advance gc epoch: {other:?}"))),
                };
                if self.debug {
                    eprintln!("step {}: collection of epoch {epoch} begins", self.step);
                }
                self.gc_started = self.step;
                let mark_at = self.step + self.rng.below(60);
                self.gc = Gc::Begin {
                    epoch,
                    next: 0,
                    mark_at,
                };
            }
            Gc::Begin {
                epoch,
                next,
                mark_at,
            } => {
                self.shards[next as usize].begin_gc(epoch);
                self.gc_begun[next as usize] = true;
                self.gc = if next + 1 < self.shards.len() as u16 {
                    Gc::Begin {
                        epoch,
                        next: next + 1,
                        mark_at,
                    }
                } else {
                    Gc::Mark { epoch, at: mark_at }
                };
            }
            Gc::Mark { epoch, at } => {
                if self.step < at {
                    return Ok(());
                }
                // The read barrier, then the mark: every commit applied so far is in it.
                self.meta.barrier(&mut self.rng).map_err(|e| self.fail(e))?;
                let marked = self
                    .meta
                    .store()
                    .referenced_chunks()
                    .map_err(|e| self.fail(format!("mark: {e:#}")))?;
                self.note_unreferenced(&marked);
                for (id, _) in self.last_claim.iter() {
                    self.trace(id, &format!("marked: {}", marked.contains(id)));
                }
                self.gc_marked = Arc::new(marked);
                self.gc = Gc::List {
                    epoch,
                    shard: 0,
                    after: None,
                    doomed: Vec::new(),
                };
            }
            Gc::List {
                epoch,
                shard,
                after,
                mut doomed,
            } => {
                let (ids, more) = self.shards[shard as usize].list_ids(after.as_ref(), LIST_PAGE);
                let after = ids.last().copied();
                let (live, dead): (Vec<ChunkId>, Vec<ChunkId>) =
                    ids.into_iter().partition(|id| self.gc_marked.contains(id));
                // As run_gc: the mark found these live (fsck's stale clock restarts).
                self.shards[shard as usize].marked_live(epoch, &live);
                doomed.extend(dead);
                self.gc = if more {
                    Gc::List {
                        epoch,
                        shard,
                        after,
                        doomed,
                    }
                } else {
                    Gc::Sweep {
                        epoch,
                        shard,
                        doomed,
                        pos: 0,
                        ticket: None,
                    }
                };
            }
            Gc::Sweep {
                epoch,
                shard,
                doomed,
                pos,
                ticket,
            } => {
                if ticket.is_some() {
                    return Ok(()); // waiting for the sweep's tombstones to be durable
                }
                if pos >= doomed.len() {
                    self.shards[shard as usize].end_gc(epoch);
                    if shard + 1 < self.shards.len() as u16 {
                        self.gc = Gc::List {
                            epoch,
                            shard: shard + 1,
                            after: None,
                            doomed: Vec::new(),
                        };
                    } else {
                        self.gc_done(epoch)?;
                    }
                    return Ok(());
                }
                let page: Vec<ChunkId> = doomed[pos..(pos + SWEEP_PAGE).min(doomed.len())].to_vec();
                for id in &page {
                    self.trace(id, "swept");
                }
                let n = page.len();
                let t = self.ticket(shard, Owner::Sweep);
                if self.cfg.plant_sweep_ignores_claims {
                    self.shards[shard as usize].delete(t, page);
                } else if let Err(e) = self.shards[shard as usize].sweep(t, epoch, page) {
                    self.owners.remove(&t);
                    self.report.sweeps_refused += 1;
                    return self.gc_fail(&format!("shard {shard} refused the sweep: {e}"));
                }
                self.gc = Gc::Sweep {
                    epoch,
                    shard,
                    doomed,
                    pos: pos + n,
                    ticket: Some(t),
                };
                self.poll_shard(shard, false)?;
            }
        }
        Ok(())
    }

    fn sweep_done(
        &mut self,
        s: u16,
        ticket: u64,
        result: Result<u32, ShardError>,
    ) -> Result<(), SimFailure> {
        let Gc::Sweep { ticket: t, .. } = &mut self.gc else {
            return Ok(());
        };
        if *t != Some(ticket) {
            return Ok(());
        }
        *t = None;
        match result {
            Ok(removed) => {
                self.report.swept_chunks += removed as u64;
                if removed > 0 {
                    self.shards[s as usize].request_compaction();
                }
                Ok(())
            }
            Err(e) => self.gc_fail(&format!("shard {s}: sweep failed: {e}")),
        }
    }

    fn gc_done(&mut self, epoch: u64) -> Result<(), SimFailure> {
        if self.debug {
            eprintln!("step {}: collection of epoch {epoch} done", self.step);
        }
        self.report.collections_done += 1;
        self.completed.push(self.gc_started);
        self.gc_begun.iter_mut().for_each(|b| *b = false);
        self.gc = Gc::Idle {
            until: self.step + self.rng.below(self.cfg.gc_idle_max),
        };
        self.check_all()?;
        self.check_garbage(epoch)
    }

    // ---- the oracle -----------------------------------------------------------------

    /// Chunks held and not in `refs` are unreferenced since now at the latest.
    fn note_unreferenced(&mut self, refs: &HashSet<ChunkId>) {
        for sh in &self.shards {
            for (id, _) in sh.index().iter() {
                if refs.contains(id) {
                    self.unref_since.remove(id);
                } else {
                    self.unref_since.entry(*id).or_insert(self.step);
                }
            }
        }
    }

    fn check_audit(&self) -> Result<(), SimFailure> {
        for (s, sh) in self.shards.iter().enumerate() {
            sh.audit()
                .map_err(|e| self.fail(format!("shard {s} bookkeeping: {e}")))?;
        }
        Ok(())
    }

    /// Oracles 1, 2 and 4 over everything.
    fn check_all(&mut self) -> Result<(), SimFailure> {
        self.report.full_checks += 1;
        self.meta.check(&mut self.rng).map_err(|e| self.fail(e))?;
        let refs = self
            .meta
            .store()
            .referenced_chunks()
            .map_err(|e| self.fail(format!("referenced chunks: {e:#}")))?;
        for id in &refs {
            let s = self.shard_of(id);
            match self.shards[s as usize].index().get(id).map(|e| e.state) {
                Some(EntryState::Verified) => {}
                state => {
                    return Err(self.fail(format!(
                        "referenced chunk {id:?} is {state:?} on shard {s} (last claim at step \
                         {:?}, unreferenced since {:?})",
                        self.last_claim.get(id),
                        self.unref_since.get(id)
                    )))
                }
            }
        }
        self.note_unreferenced(&refs);
        // A few real gets of referenced chunks.
        let mut sample: Vec<ChunkId> = refs.iter().copied().collect();
        sample.sort();
        for _ in 0..4.min(sample.len()) {
            let id = sample[self.rng.below(sample.len() as u64) as usize];
            self.get_verified(&id)?;
        }
        // Every file's content.
        let files: Vec<FileModel> = self
            .clients
            .iter()
            .flat_map(|c| c.slots.iter())
            .filter_map(|s| match s {
                Slot::Idle(f) | Slot::Uploading(f, _) | Slot::Orphan(f, _) if !f.in_doubt => {
                    Some(f.clone())
                }
                _ => None,
            })
            .collect();
        for f in files {
            let (extents, size) = self.extents_of(f.ino)?;
            self.compare(&f, &extents, size)?;
        }
        self.check_audit()
    }

    /// Oracle 3, after a collection completed: nothing unreferenced and unclaimed since
    /// before the start of the collection before it remains. Also counts what `hive fsck`'s
    /// stale rule would report.
    fn check_garbage(&mut self, epoch: u64) -> Result<(), SimFailure> {
        self.report.garbage_checks += 1;
        let refs = self
            .meta
            .store()
            .referenced_chunks()
            .map_err(|e| self.fail(format!("referenced chunks: {e:#}")))?;
        if self.completed.len() >= 2 {
            let t = self.completed[self.completed.len() - 2];
            for (s, sh) in self.shards.iter().enumerate() {
                for (id, e) in sh.index().iter() {
                    if e.state != EntryState::Verified || refs.contains(id) {
                        continue;
                    }
                    let unref = self.unref_since.get(id).copied();
                    let claim = self.last_claim.get(id).copied().unwrap_or(0);
                    if unref.is_some_and(|u| u <= t) && claim < t {
                        return Err(self.fail(format!(
                            "chunk {id:?} on shard {s} outlived two collections: unreferenced \
                             since step {unref:?}, last claimed at step {claim}, the collection \
                             before the last began at step {t}"
                        )));
                    }
                }
            }
        }
        // fsck's rule: at epoch E, unreferenced chunks last claimed before E-1.
        if epoch >= 2 {
            let t = self
                .completed
                .len()
                .checked_sub(2)
                .map(|i| self.completed[i]);
            for sh in &self.shards {
                let (ids, _) = sh.list_stale(epoch - 1, None, usize::MAX);
                for id in ids.iter().filter(|id| !refs.contains(id)) {
                    self.report.fsck_stale_reported += 1;
                    let unref = self.unref_since.get(id).copied();
                    if t.is_none_or(|t| unref.is_none_or(|u| u > t)) {
                        self.report.fsck_stale_fresh += 1;
                        if self.debug {
                            eprintln!(
                                "step {}: fsck at epoch {epoch} would report {id:?} (claimed \
                                 in epoch {:?}, at step {:?}), unreferenced only since step \
                                 {unref:?}; collections completed since step {t:?}",
                                self.step,
                                sh.claimed_epoch(id),
                                self.last_claim.get(id)
                            );
                        }
                    }
                }
            }
        }
        Ok(())
    }

    // ---- faults ---------------------------------------------------------------------

    fn crash_store(&mut self) -> Result<(), SimFailure> {
        self.report.store_crashes += 1;
        let lost = self.meta.crash().map_err(|e| self.fail(e))?;
        if self.debug {
            eprintln!(
                "step {}: store crashes, {lost} applied entries lost",
                self.step
            );
        }
        // The metadata service restarted with the node: the collection in progress died
        // (its windows stay open until the epoch is synced at start).
        self.gc_fail("the metadata service restarted")?;
        let epoch = self.gc_epoch()?;
        for s in self.shards.iter_mut() {
            s.set_gc_epoch(epoch);
        }
        Ok(())
    }

    fn stray_duplicate(&mut self) -> Result<(), SimFailure> {
        let n = self.meta.log.len();
        if n == 0 {
            return Ok(());
        }
        let i = self.rng.below(n as u64) as usize;
        let Some(bytes) = self.meta.log[i].clone() else {
            return Ok(());
        };
        self.report.stray_duplicates += 1;
        // `apply_upto` checks its answer against the first (or ESTALE below the floor).
        self.meta
            .propose(Some(bytes), &mut self.rng)
            .map_err(|e| self.fail(e))?;
        Ok(())
    }
}

/// Run one seeded simulation.
pub fn run(cfg: &SimConfig) -> Result<SimReport, SimFailure> {
    let setup = |m: String| SimFailure {
        seed: cfg.seed,
        op: 0,
        message: m,
    };
    let mut rng = Rng::new(cfg.seed);
    let mut key = [0u8; 32];
    for b in key.iter_mut() {
        *b = rng.next_u64() as u8;
    }
    let key = DedupeKey(key);
    let universe: Vec<Vec<u8>> = (0..cfg.universe)
        .map(|i| block_bytes(cfg.seed ^ 0xb10c, u64::MAX - i as u64))
        .collect();
    let bucket_count = 16;
    let map = ClusterMap {
        epoch: 1,
        node_id: "sim".into(),
        bucket_count,
        shard_count: cfg.shards,
        base_port: 1,
        dedupe_key: key,
        bucket_to_shard: (0..bucket_count)
            .map(|b| (b % cfg.shards as u32) as u16)
            .collect(),
    };
    let sb = Superblock::plan(cfg.device_bytes, 1, cfg.segment_bytes, 16, key.0)
        .map_err(|e| setup(format!("plan: {e}")))?;
    let no_faults = SimFaults {
        read_error_per_million: 0,
        write_error_per_million: 0,
        bit_flip_per_million: 0,
        torn_writes: true,
    };
    let mut devs = Vec::new();
    let mut shards = Vec::new();
    for _ in 0..cfg.shards {
        let dev = SharedSim(Arc::new(Mutex::new(SimDevice::new(
            cfg.device_bytes,
            rng.next_u64(),
            no_faults,
        ))));
        ShardCore::format(&mut dev.clone(), &sb.shard_layout(0))
            .map_err(|e| setup(format!("format: {e}")))?;
        let mut shard =
            open_shard(&dev, &sb, key, cfg, true).map_err(|e| setup(format!("open: {e}")))?;
        shard.set_gc_epoch(1);
        dev.0.lock().expect("sim").set_faults(cfg.faults);
        devs.push(dev);
        shards.push(shard);
    }
    let mut meta = SimMeta::new().map_err(setup)?;
    let vol = meta
        .create_volume(ADMIN_CLIENT, "sim", &mut rng)
        .map_err(setup)?;
    let clients = (0..cfg.clients)
        .map(|i| Client {
            id: 100 + i as u64,
            seq: 0,
            slots: vec![Slot::Empty; cfg.files_per_client as usize],
            retry: None,
            next_name: 0,
        })
        .collect();
    let mut w = World {
        cfg: cfg.clone(),
        rng,
        key,
        map,
        universe,
        blocks: HashMap::new(),
        prepared: HashMap::new(),
        next_fresh: 0,
        meta,
        vol,
        devs,
        sb,
        shards,
        clients,
        owners: HashMap::new(),
        next_ticket: 0,
        gets_done: HashMap::new(),
        gc: Gc::Idle { until: 50 },
        gc_client: 0,
        gc_started: 0,
        gc_marked: Arc::new(HashSet::new()),
        gc_begun: vec![false; cfg.shards as usize],
        completed: Vec::new(),
        last_claim: HashMap::new(),
        unref_since: HashMap::new(),
        next_serial: 0,
        step: 0,
        report: SimReport::default(),
        debug: std::env::var_os("HIVE_GC_SIM_DEBUG").is_some(),
        trace_id: std::env::var("HIVE_GC_SIM_TRACE_ID").ok(),
    };
    for i in 0..cfg.universe {
        let plain = w.universe[i as usize].clone();
        w.prepare(&plain, Block::Universe(i));
    }

    while w.report.ops < cfg.ops {
        w.step += 1;
        for s in 0..w.shards.len() as u16 {
            let failed = w.shards[s as usize].stats().failed.is_some();
            if failed || w.rng.chance(cfg.shard_crash_per_million) {
                w.crash_shard(s)?;
            }
        }
        if w.rng.chance(cfg.store_crash_per_million) {
            w.crash_store()?;
        }
        // Raft's apply loop catches up after a store crash, a batch at a time.
        if w.meta.applied < w.meta.log.len() && w.rng.below(2) == 0 {
            let upto = (w.meta.applied + 1 + w.rng.below(16) as usize).min(w.meta.log.len());
            w.meta.apply_upto(upto, &mut w.rng).map_err(|e| w.fail(e))?;
        }
        if w.rng.chance(cfg.stray_duplicate_per_million) {
            w.stray_duplicate()?;
        }
        if w.rng.below(500) == 0 {
            // A leader's blank entry: nothing to apply.
            w.meta.propose(None, &mut w.rng).map_err(|e| w.fail(e))?;
        }
        w.drive_compaction();
        w.poll_all(false)?;
        if w.rng.below(3) == 0 {
            w.gc_step()?;
        }
        let c = w.rng.below(w.clients.len() as u64) as usize;
        w.client_step(c)?;
        w.poll_all(false)?;
        if w.step.is_multiple_of(w.cfg.check_every) {
            w.check_all()?;
        }
    }
    // Finish: every upload's puts complete, the log is applied, everything checks out.
    for _ in 0..1000 {
        if w.owners.is_empty() {
            break;
        }
        w.poll_all(true)?;
    }
    w.check_all()?;
    if w.debug {
        let d = w.meta.disk.0.lock().expect("disk");
        eprintln!(
            "store disk: {} bytes, durable {} bytes; log {} entries",
            d.current.len(),
            d.durable.len(),
            w.meta.log.len()
        );
    }
    w.report.steps = w.step;
    w.report.entries_replayed = w.meta.replayed;
    Ok(w.report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_u64(name: &str) -> Option<u64> {
        std::env::var(name).ok().and_then(|v| v.parse().ok())
    }

    /// Seeds `base + offset ..`, where `base` is `HIVE_GC_SIM_BASE_SEED` (fresh seeds for a
    /// long run) or [`CI_BASE_SEED`].
    fn seeds(offset: u64, count: u64, ops: u64) -> SimReport {
        let base = env_u64("HIVE_GC_SIM_BASE_SEED").unwrap_or(CI_BASE_SEED) + offset;
        let ops = env_u64("HIVE_GC_SIM_OPS").unwrap_or(ops);
        let count = env_u64("HIVE_GC_SIM_SEEDS").unwrap_or(count);
        let mut sum = SimReport::default();
        for seed in base..base + count {
            let r = run(&SimConfig::new(seed, ops)).unwrap_or_else(|e| {
                panic!("{e}\nreplay: HIVE_GC_SIM_SEED={seed} cargo nextest run -p hivefs-engine gc_sim::tests::one_seed")
            });
            sum.add(&r);
        }
        eprintln!("{count} seeds from {base}: {sum:?}");
        assert!(sum.ops >= count * ops);
        sum
    }

    /// `HIVE_GC_SIM_SEED=N` (and `HIVE_GC_SIM_OPS`) runs one seed.
    #[test]
    fn one_seed() {
        let Some(seed) = env_u64("HIVE_GC_SIM_SEED") else {
            return;
        };
        let ops = env_u64("HIVE_GC_SIM_OPS").unwrap_or(25_000);
        let r = run(&SimConfig::new(seed, ops)).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("seed {seed}: {r:?}");
    }

    /// The seeds CI runs: the four tests below take `+ 0x000`, `+ 0x100`, ... from it.
    const CI_BASE_SEED: u64 = 0x6c_0000;

    // CI: 4 x 2 seeds x 25,000 client operations = 200,000 (two tests run per core).
    #[test]
    fn seeds_a() {
        let r = seeds(0x000, 2, 25_000);
        assert!(r.collections_done > 20 && r.commits > 5_000, "{r:?}");
    }

    #[test]
    fn seeds_b() {
        let r = seeds(0x100, 2, 25_000);
        assert!(
            r.commits_refused_stale > 0 && r.uploads_abandoned > 0,
            "{r:?}"
        );
    }

    #[test]
    fn seeds_c() {
        let r = seeds(0x200, 2, 25_000);
        assert!(
            r.store_crashes > 0 && r.entries_replayed > 0 && r.retries > 0,
            "{r:?}"
        );
    }

    #[test]
    fn seeds_d() {
        let r = seeds(0x300, 2, 25_000);
        assert!(
            r.shard_crashes > 0 && r.sweeps_refused + r.collections_failed > 0,
            "{r:?}"
        );
    }

    /// Seeds that once failed stay here.
    ///
    /// 39939 (shard.rs, fixed): a sweep chose an unclaimed chunk, its tombstone waited in the
    /// commit queue behind a full batch, a client's `has` hit the chunk meanwhile and got a
    /// claim of the current epoch, the tombstone was appended, and the client's commit was
    /// accepted, referencing a deleted chunk. Ids with a queued tombstone no longer answer
    /// `has`.
    #[test]
    fn regression_seeds() {
        let (seed, ops) = (39939, 11_000);
        run(&SimConfig::new(seed, ops)).unwrap_or_else(|e| panic!("{e}"));
    }

    /// The oracle catches a sweep that ignores claims, within a bounded number of ops.
    #[test]
    fn planted_sweep_ignoring_claims_is_caught() {
        for seed in 1..=5 {
            let cfg = SimConfig {
                plant_sweep_ignores_claims: true,
                ..SimConfig::new(seed, 20_000)
            };
            match run(&cfg) {
                Ok(_) => continue,
                Err(e) => {
                    eprintln!("planted bug caught: {e}");
                    assert!(
                        e.message.contains("referenced chunk"),
                        "caught, but not as a missing referenced chunk: {e}"
                    );
                    return;
                }
            }
        }
        panic!("a sweep ignoring claims went unnoticed on seeds 1..=5");
    }
}
