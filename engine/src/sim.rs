//! Deterministic simulation of a shard under faults.
//!
//! One thread, one seed: a [`ShardCore`] runs over a [`SimDevice`] (reordered completions,
//! I/O errors, bit flips on reads, and at a crash the loss or tearing of everything not
//! flushed). Simulated clients send puts (fresh chunks, duplicates, and poison: garbage
//! under a valid-looking id or wrong bytes under a genuine id), has, get, delete (the
//! tombstones of a GC sweep: ids the model then holds unreferenced) and retries of
//! acknowledged puts (puts are idempotent) through a simulated network that delays and
//! reorders requests; a crash loses every request in flight.
//!
//! Space is tight (a few dozen small segments), so the shard fills up, refuses puts with
//! `NoSpace`, and must compact: the simulator asks for compaction now and then (as a node
//! does after a sweep) and drives [`ShardCore::compact_step`] at random moments between
//! other work, so crashes land in every step of it (copies in a batch, barrier, header
//! invalidation, reuse of the freed segment).
//!
//! The oracle, checked after every completion and after every restart:
//! 1. every acknowledged chunk (put acked, no delete acked since) answers `has` and `get`
//!    returns bytes that verify against its id (also while compaction moves it);
//! 2. nothing that does not verify answers `has` (every `has` hit is fetched and checked);
//!    poison never becomes readable;
//! 3. a chunk whose tombstone was acknowledged never comes back, not after replay either,
//!    unless it was put (and acknowledged) again after the tombstone;
//! 4. the shard's bookkeeping holds ([`ShardCore::audit`]: no entry in a free segment,
//!    per-segment live bytes match the index);
//! 5. levels: puts ask for levels 1 to 3; an acknowledged chunk is held at the highest
//!    level any of its acknowledged puts asked for, or higher (not after replay either),
//!    and never above the highest level it was ever put with.
//!
//! A failure names its seed; `run(&SimConfig { seed, .. })` reproduces it exactly. For a
//! failing seed, `HIVE_SIM_DEBUG=1` prints every restart and dumps the device's records
//! when a check after a restart fails, and `HIVE_SIM_TRACE_ID=<hex prefix>` traces the puts
//! and deletes of one chunk.

use crate::format::Superblock;
use crate::index::EntryState;
use crate::shard::{
    Completion, PutChunk, PutOutcome, ShardConfig, ShardCore, ShardError, StoredChunk,
};
use hivefs_net::chunk::{self, ChunkId, Codec, DedupeKey};
use hivefs_nvme::rng::SplitMix64;
use hivefs_nvme::{SharedSim, SimDevice, SimFaults};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// The simulator's draws: the workspace generator (`hivefs_nvme::rng::SplitMix64`) with
/// the simulator's own reductions. `below` stays a modulo so that recorded failing seeds
/// keep reproducing the same runs.
#[derive(Clone)]
pub struct Rng(SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(SplitMix64::new(seed))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn chance(&mut self, per_million: u64) -> bool {
        self.below(1_000_000) < per_million
    }
}

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    /// Client operations to issue.
    pub ops: u64,
    /// Distinct chunk contents (fewer means more duplicates).
    pub universe: u32,
    pub crash_per_million: u64,
    pub faults: SimFaults,
    pub segment_bytes: u64,
    pub device_bytes: u64,
    pub commit_max_bytes: usize,
    /// Per million operations: ask the shard to compact (as a node does after a sweep).
    pub compact_request_per_million: u64,
    /// Per million operations: drive compaction steps in this turn.
    pub compact_step_per_million: u64,
    pub compact_live_percent: u8,
    pub compact_reserve_segments: u32,
}

impl SimConfig {
    pub fn new(seed: u64, ops: u64) -> SimConfig {
        SimConfig {
            seed,
            ops,
            universe: 400,
            crash_per_million: 3_000,
            faults: SimFaults {
                read_error_per_million: 500,
                write_error_per_million: 100,
                bit_flip_per_million: 2_000,
                torn_writes: true,
            },
            segment_bytes: 256 << 10,
            // 28 segments: the log fills and must be compacted many times per seed.
            device_bytes: crate::format::DATA_START + 28 * (256 << 10),
            commit_max_bytes: 32 << 10,
            compact_request_per_million: 20_000,
            // One seed in four compacts rarely, so the device fills and puts are refused.
            compact_step_per_million: if seed % 4 == 3 { 2_000 } else { 500_000 },
            // Thresholds from the default to nearly everything (more copying).
            compact_live_percent: [50, 60, 70][(seed / 4 % 3) as usize],
            compact_reserve_segments: 2,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct SimReport {
    pub ops: u64,
    pub crashes: u64,
    pub puts_acked: u64,
    pub poison_rejected: u64,
    pub gets_checked: u64,
    pub deletes_acked: u64,
    pub io_errors_seen: u64,
    pub device_full: u64,
    pub summaries_replayed: u64,
    pub continuations_replayed: u64,
    pub segments_compacted: u64,
    pub compaction_chunks_moved: u64,
    pub tombstones_carried: u64,
    pub tombstones_dropped: u64,
    pub puts_no_space: u64,
    /// Puts that raised a chunk's level (stored it again at a higher one).
    pub puts_raised: u64,
}

impl SimReport {
    /// Add what a shard counted in its life (before a crash or at the end).
    fn absorb(&mut self, st: &crate::shard::ShardStats) {
        self.segments_compacted += st.segments_compacted;
        self.compaction_chunks_moved += st.compaction_chunks_moved;
        self.tombstones_carried += st.compaction_tombstones_carried;
        self.tombstones_dropped += st.compaction_tombstones_dropped;
        self.puts_no_space += st.puts_no_space;
        self.puts_raised += st.puts_raised;
    }

    /// Sum of several runs' reports.
    pub fn add(&mut self, r: &SimReport) {
        self.ops += r.ops;
        self.crashes += r.crashes;
        self.puts_acked += r.puts_acked;
        self.poison_rejected += r.poison_rejected;
        self.gets_checked += r.gets_checked;
        self.deletes_acked += r.deletes_acked;
        self.io_errors_seen += r.io_errors_seen;
        self.device_full += r.device_full;
        self.summaries_replayed += r.summaries_replayed;
        self.continuations_replayed += r.continuations_replayed;
        self.segments_compacted += r.segments_compacted;
        self.compaction_chunks_moved += r.compaction_chunks_moved;
        self.tombstones_carried += r.tombstones_carried;
        self.tombstones_dropped += r.tombstones_dropped;
        self.puts_no_space += r.puts_no_space;
        self.puts_raised += r.puts_raised;
    }
}

#[derive(Debug, thiserror::Error)]
#[error("simulation seed {seed} broke an invariant at op {op}: {message}")]
pub struct SimFailure {
    pub seed: u64,
    pub op: u64,
    pub message: String,
}

enum Op {
    Put { ids: Vec<ChunkId>, level: u8 },
    Get { id: ChunkId },
    Delete { ids: Vec<ChunkId> },
}

/// A request on the simulated network, not yet delivered to the shard.
enum Msg {
    Put(u64, Vec<PutChunk>),
    Get(u64, ChunkId),
    Delete(u64, Vec<ChunkId>),
}

/// Operations in flight on one id. Puts and deletes of the same id in flight together
/// make its outcome depend on an order the client cannot see: the id is then `conflicted`
/// and its state is learned afresh once both are done.
#[derive(Default)]
struct Pending {
    puts: u32,
    deletes: u32,
    conflicted: bool,
}

struct World {
    cfg: SimConfig,
    rng: Rng,
    key: DedupeKey,
    contents: Vec<Vec<u8>>,
    ids: Vec<ChunkId>,
    by_id: HashMap<ChunkId, usize>,
    /// Ids whose state the node acknowledged: true = present, false = deleted.
    known: BTreeMap<ChunkId, bool>,
    /// Of the ids known present: the highest level an acknowledged put asked for.
    acked_level: HashMap<ChunkId, u8>,
    /// The highest level each id was ever put with.
    max_level: HashMap<ChunkId, u8>,
    pending: BTreeMap<ChunkId, Pending>,
    ops: HashMap<u64, Op>,
    next_ticket: u64,
    net: Vec<Msg>,
    /// Puts of wrong bytes under a genuine id: must come back Rejected (or Duplicate when
    /// the genuine chunk is already stored, in which case nothing is written).
    poison_tickets: HashSet<u64>,
    report: SimReport,
    op_no: u64,
}

impl World {
    fn fail(&self, message: String) -> SimFailure {
        SimFailure {
            seed: self.cfg.seed,
            op: self.op_no,
            message,
        }
    }

    fn content(rng: &mut Rng, i: u32) -> Vec<u8> {
        let len = 1 + rng.below(6000) as usize;
        // Half compressible, half not.
        if i.is_multiple_of(2) {
            let word = format!("chunk-{i}-");
            word.as_bytes().iter().copied().cycle().take(len).collect()
        } else {
            (0..len).map(|_| rng.next_u64() as u8).collect()
        }
    }

    fn begin(&mut self, id: ChunkId, delete: bool) {
        let p = self.pending.entry(id).or_default();
        if delete {
            p.deletes += 1;
        } else {
            p.puts += 1;
        }
        if p.puts > 0 && p.deletes > 0 {
            p.conflicted = true;
        }
    }

    /// An op on `id` finished; `acked` is the state the node acknowledged, if any, and
    /// `level` the put's level (0 for a delete).
    fn end(&mut self, id: ChunkId, delete: bool, acked: Option<bool>, level: u8) {
        let p = self.pending.get_mut(&id).expect("pending op");
        if delete {
            p.deletes -= 1;
        } else {
            p.puts -= 1;
        }
        let conflicted = p.conflicted;
        if p.puts == 0 && p.deletes == 0 {
            self.pending.remove(&id);
        }
        match (conflicted, acked) {
            (false, Some(state)) => {
                self.known.insert(id, state);
                if state {
                    let l = self.acked_level.entry(id).or_insert(0);
                    *l = (*l).max(level);
                } else {
                    self.acked_level.remove(&id);
                }
            }
            (true, _) => {
                self.known.remove(&id);
                self.acked_level.remove(&id);
            }
            (false, None) => {
                // Failed: may or may not have happened.
                self.known.remove(&id);
                self.acked_level.remove(&id);
            }
        }
    }

    fn ticket(&mut self, op: Op) -> u64 {
        self.next_ticket += 1;
        self.ops.insert(self.next_ticket, op);
        self.next_ticket
    }

    fn check_get(
        &self,
        id: &ChunkId,
        got: &Result<StoredChunk, ShardError>,
    ) -> Result<(), SimFailure> {
        match got {
            Ok(c) => chunk::verify(&self.key, id, c.codec, &c.data, c.raw_len as usize)
                .map(|_| ())
                .map_err(|e| {
                    self.fail(format!("get {id:?} returned bytes that do not verify: {e}"))
                }),
            // Detected corruption or a failed read: reported, never served.
            Err(ShardError::CorruptRecord { .. })
            | Err(ShardError::Device(_))
            | Err(ShardError::Failed(_)) => Ok(()),
            Err(ShardError::NotFound(_)) => {
                if self.known.get(id) == Some(&true) && !self.pending.contains_key(id) {
                    Err(self.fail(format!("acknowledged chunk {id:?} not found")))
                } else {
                    Ok(())
                }
            }
            Err(e) => Err(self.fail(format!("get {id:?} failed unexpectedly: {e}"))),
        }
    }

    /// Apply one completion, in the order the shard produced it, and check it.
    fn complete(&mut self, c: Completion) -> Result<(), SimFailure> {
        match c {
            Completion::Put { ticket, result, .. } => {
                if let Ok(t) = std::env::var("HIVE_SIM_TRACE_ID") {
                    if let Some(Op::Put { ids, level }) = self.ops.get(&ticket) {
                        if let Some(k) = ids.iter().position(|i| i.to_hex().starts_with(&t)) {
                            eprintln!(
                                "op {} put {ticket} (level {level}, item {k}) -> {:?}",
                                self.op_no, result
                            );
                        }
                    }
                }
                let Some(Op::Put { ids, level }) = self.ops.remove(&ticket) else {
                    return Err(self.fail(format!("put completion for unknown ticket {ticket}")));
                };
                if self.poison_tickets.remove(&ticket) {
                    return match result {
                        Ok(o) if o.iter().all(|o| *o != PutOutcome::Stored) => {
                            self.report.poison_rejected += 1;
                            Ok(())
                        }
                        Ok(o) => Err(self.fail(format!(
                            "wrong bytes under genuine id {:?} were stored: {o:?}",
                            ids[0]
                        ))),
                        Err(_) => Ok(()),
                    };
                }
                match result {
                    Ok(outcomes) => {
                        if outcomes.len() != ids.len() {
                            return Err(
                                self.fail("put reply has the wrong number of outcomes".into())
                            );
                        }
                        for (id, o) in ids.iter().zip(outcomes) {
                            let genuine = self.by_id.contains_key(id);
                            match (o, genuine) {
                                (PutOutcome::Rejected, false) => self.report.poison_rejected += 1,
                                (PutOutcome::Rejected, true) => {
                                    return Err(self.fail(format!("genuine chunk {id:?} rejected")))
                                }
                                (_, false) => {
                                    return Err(
                                        self.fail(format!("poison under {id:?} accepted as {o:?}"))
                                    )
                                }
                                (_, true) => {
                                    self.report.puts_acked += 1;
                                    self.end(*id, false, Some(true), level);
                                }
                            }
                        }
                    }
                    Err(e) => {
                        match e {
                            ShardError::NoSpace => self.report.device_full += 1,
                            ShardError::Failed(_) | ShardError::Device(_) => {
                                self.report.io_errors_seen += 1
                            }
                            e => return Err(self.fail(format!("put failed unexpectedly: {e}"))),
                        }
                        let genuine: Vec<ChunkId> = ids
                            .iter()
                            .filter(|id| self.by_id.contains_key(*id))
                            .copied()
                            .collect();
                        for id in genuine {
                            self.end(id, false, None, level);
                        }
                    }
                }
            }
            Completion::Get { ticket, result } => {
                let Some(Op::Get { id }) = self.ops.remove(&ticket) else {
                    return Err(self.fail(format!("get completion for unknown ticket {ticket}")));
                };
                self.report.gets_checked += 1;
                self.check_get(&id, &result)?;
            }
            Completion::Delete { ticket, result } => {
                let Some(Op::Delete { ids }) = self.ops.remove(&ticket) else {
                    return Err(self.fail(format!("delete completion for unknown ticket {ticket}")));
                };
                if let Ok(t) = std::env::var("HIVE_SIM_TRACE_ID") {
                    if ids.iter().any(|i| i.to_hex().starts_with(&t)) {
                        eprintln!(
                            "op {} delete {:?} of {:?} -> {:?} pending {:?} known {:?}",
                            self.op_no,
                            ticket,
                            ids,
                            result,
                            ids.iter()
                                .map(|i| self.pending.get(i).map(|p| (
                                    p.puts,
                                    p.deletes,
                                    p.conflicted
                                )))
                                .collect::<Vec<_>>(),
                            ids.iter().map(|i| self.known.get(i)).collect::<Vec<_>>()
                        );
                    }
                }
                let acked = match result {
                    Ok(_) => {
                        self.report.deletes_acked += 1;
                        Some(false)
                    }
                    Err(ShardError::Failed(_))
                    | Err(ShardError::Device(_))
                    | Err(ShardError::NoSpace) => {
                        self.report.io_errors_seen += 1;
                        None
                    }
                    Err(e) => return Err(self.fail(format!("delete failed unexpectedly: {e}"))),
                };
                for id in ids {
                    self.end(id, true, acked, 0);
                }
            }
        }
        Ok(())
    }

    /// `has` for every id in the universe (and an id never stored) against the model;
    /// ids whose state is unknown and idle are learned from the answer.
    fn check_has(&mut self, shard: &mut ShardCore) -> Result<(), SimFailure> {
        let mut ask: Vec<ChunkId> = self.ids.clone();
        ask.push(ChunkId::compute(&self.key, b"never stored"));
        let mut present = Vec::new();
        shard.has(&ask, 1, &mut present);
        let failed = shard.stats().failed.is_some();
        for (id, hit) in ask.iter().zip(present) {
            if hit {
                // Only verified entries may answer has.
                match shard.index().get(id) {
                    Some(e) if e.state == EntryState::Verified => {}
                    _ => {
                        return Err(
                            self.fail(format!("{id:?} answered has without a verified entry"))
                        )
                    }
                }
                if !self.by_id.contains_key(id) {
                    return Err(self.fail(format!("never-stored id {id:?} answers has")));
                }
            }
            if self.pending.contains_key(id) {
                continue;
            }
            let held = shard.held_level(id);
            if hit && held > self.max_level.get(id).copied().unwrap_or(0) {
                return Err(self.fail(format!(
                    "{id:?} held at level {held}, above any it was put with"
                )));
            }
            let acked = self.acked_level.get(id).copied().unwrap_or(0);
            if self.known.get(id) == Some(&true) && !failed && held < acked {
                return Err(self.fail(format!(
                    "{id:?} held at level {held}, acknowledged at level {acked}"
                )));
            }
            match (self.known.get(id), hit) {
                (Some(true), false) => {
                    return Err(self.fail(format!("acknowledged chunk {id:?} does not answer has")))
                }
                (Some(false), true) => {
                    return Err(self.fail(format!(
                        "deleted chunk {id:?} came back: {:?}",
                        shard.index().get(id)
                    )))
                }
                // Learn only from a healthy shard: a failed one has dropped deletions that
                // never became durable from its memory, and a restart brings them back.
                (None, _) if self.by_id.contains_key(id) && !failed => {
                    // Learned: at which level is not known.
                    self.known.insert(*id, hit);
                    self.acked_level.remove(id);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The shard's own bookkeeping (oracle 4).
    fn check_audit(&self, shard: &ShardCore) -> Result<(), SimFailure> {
        shard
            .audit()
            .map_err(|e| self.fail(format!("shard bookkeeping: {e}")))
    }

    /// Compaction as a node drives it: asked for now and then, and advanced by bounded
    /// steps at random moments between client work (so crashes hit every step of it).
    fn drive_compaction(&mut self, shard: &mut ShardCore) {
        if self.rng.chance(self.cfg.compact_request_per_million) {
            shard.request_compaction();
        }
        if shard.compaction_pending() && self.rng.chance(self.cfg.compact_step_per_million) {
            for _ in 0..1 + self.rng.below(3) {
                shard.compact_step();
            }
        }
    }

    fn put_chunk(&mut self, id: &ChunkId, level: u8) -> PutChunk {
        let m = self.max_level.entry(*id).or_insert(0);
        *m = (*m).max(level);
        let i = self.by_id[id];
        let plain = &self.contents[i];
        let preferred = if i.is_multiple_of(3) {
            Codec::Zstd
        } else {
            Codec::Lz4
        };
        let (codec, data) = chunk::compress(preferred, plain);
        PutChunk {
            id: *id,
            codec,
            raw_len: plain.len() as u32,
            level,
            data: data.into(),
        }
    }

    /// The level of the next put: 1 to 3, from the ticket counter (not drawn: recorded
    /// seeds keep reproducing the runs they were found in).
    fn next_level(&self) -> u8 {
        1 + (self.next_ticket % 3) as u8
    }

    fn random_id(&mut self) -> ChunkId {
        self.ids[self.rng.below(self.ids.len() as u64) as usize]
    }

    /// Issue one random client operation onto the network.
    fn issue(&mut self) {
        match self.rng.below(100) {
            0..=44 => {
                let n = 1 + self.rng.below(8) as usize;
                let level = self.next_level();
                let mut ids = Vec::new();
                let mut chunks = Vec::new();
                for _ in 0..n {
                    if self.rng.chance(30_000) {
                        // Poison: some chunk's bytes under a valid-looking id nobody can
                        // produce, or a real id with the wrong bytes.
                        let mut poison_id = self.random_id();
                        let data = self.contents
                            [self.rng.below(self.contents.len() as u64) as usize]
                            .clone();
                        if self.rng.below(2) == 0 {
                            poison_id.0[32] ^= 0x01;
                        } else if ChunkId::compute(&self.key, &data) == poison_id {
                            continue;
                        } else {
                            // Wrong bytes under a genuine id: must be rejected, and must not
                            // disturb the genuine chunk.
                            let (codec, stored) = chunk::compress(Codec::Lz4, &data);
                            let t = self.ticket(Op::Put {
                                ids: vec![poison_id],
                                level: 1,
                            });
                            self.net.push(Msg::Put(
                                t,
                                vec![PutChunk {
                                    id: poison_id,
                                    codec,
                                    raw_len: data.len() as u32,
                                    level: 1,
                                    data: stored.into(),
                                }],
                            ));
                            self.poison_tickets.insert(t);
                            continue;
                        }
                        ids.push(poison_id);
                        chunks.push(PutChunk {
                            id: poison_id,
                            codec: Codec::Raw,
                            raw_len: data.len() as u32,
                            level: 1,
                            data: data.into(),
                        });
                        continue;
                    }
                    let id = self.random_id();
                    self.begin(id, false);
                    ids.push(id);
                    chunks.push(self.put_chunk(&id, level));
                }
                let t = self.ticket(Op::Put { ids, level });
                self.net.push(Msg::Put(t, chunks));
            }
            45..=69 => {
                let id = self.random_id();
                let t = self.ticket(Op::Get { id });
                self.net.push(Msg::Get(t, id));
            }
            70..=75 => {
                let n = 1 + self.rng.below(3) as usize;
                let mut ids: Vec<ChunkId> = (0..n).map(|_| self.random_id()).collect();
                ids.sort();
                ids.dedup();
                for id in &ids {
                    self.begin(*id, true);
                }
                let t = self.ticket(Op::Delete { ids: ids.clone() });
                self.net.push(Msg::Delete(t, ids));
            }
            76..=79 => {
                // A client retries puts it already had acknowledged (idempotent).
                let ids: Vec<ChunkId> = self
                    .known
                    .iter()
                    .filter(|(_, p)| **p)
                    .map(|(id, _)| *id)
                    .take(4)
                    .collect();
                for id in &ids {
                    self.begin(*id, false);
                }
                let level = self.next_level();
                let chunks = ids.iter().map(|id| self.put_chunk(id, level)).collect();
                let t = self.ticket(Op::Put { ids, level });
                self.net.push(Msg::Put(t, chunks));
            }
            _ => {}
        }
    }
}

fn open_shard(
    dev: &SharedSim,
    sb: &Superblock,
    key: DedupeKey,
    cfg: &SimConfig,
    use_summaries: bool,
) -> Result<ShardCore, ShardError> {
    let scfg = ShardConfig {
        commit_max_bytes: cfg.commit_max_bytes,
        use_summaries,
        compact_live_percent: cfg.compact_live_percent,
        compact_reserve_segments: cfg.compact_reserve_segments,
    };
    ShardCore::open(Box::new(dev.clone()), sb.shard_layout(0), key, scfg)
}

fn debug_dump(dev: &SharedSim, sb: &Superblock) {
    use crate::format::*;
    let d = dev.0.lock().expect("sim");
    let l = sb.shard_layout(0);
    for seg in 0..l.segment_count {
        let img = d.read_durable(l.segment_offset(seg), l.segment_bytes as usize);
        let Ok(h) = SegmentHeader::decode(&img) else {
            continue;
        };
        eprintln!("seg {seg}: gen {} first_seq {}", h.generation, h.first_seq);
        let mut at = 0;
        while at + RECORD_HEADER_BYTES <= img.len() {
            if at % 4096 == 0 {
                if let Ok(c) = ContinuationBlock::decode(&img[at..]) {
                    eprintln!(
                        "  cont @{at}: gen {} prev {} first_seq {}",
                        c.generation, c.prev_generation, c.first_seq
                    );
                }
            }
            if let Ok(r) = RecordHeader::decode(&img[at..]) {
                let end = at + RECORD_HEADER_BYTES + r.stored_len as usize;
                if end <= img.len() && r.check_crc(&img[at..end]).is_ok() {
                    eprintln!(
                        "  rec @{at}: gen {} seq {} {:?} {:?}",
                        r.generation, r.seq, r.kind, r.id
                    );
                }
            }
            at += 8;
        }
    }
}

const NO_FAULTS: SimFaults = SimFaults {
    read_error_per_million: 0,
    write_error_per_million: 0,
    bit_flip_per_million: 0,
    torn_writes: true,
};

/// Run one seeded simulation.
pub fn run(cfg: &SimConfig) -> Result<SimReport, SimFailure> {
    let mut rng = Rng::new(cfg.seed);
    let mut key = [0u8; 32];
    for b in key.iter_mut() {
        *b = rng.next_u64() as u8;
    }
    let key = DedupeKey(key);
    let contents: Vec<Vec<u8>> = (0..cfg.universe)
        .map(|i| World::content(&mut rng, i))
        .collect();
    let ids: Vec<ChunkId> = contents.iter().map(|c| ChunkId::compute(&key, c)).collect();
    let by_id = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let dev = SharedSim(Arc::new(Mutex::new(SimDevice::new(
        cfg.device_bytes,
        rng.next_u64(),
        NO_FAULTS,
    ))));
    let setup_fail = |m: String| SimFailure {
        seed: cfg.seed,
        op: 0,
        message: m,
    };
    let sb = Superblock::plan(cfg.device_bytes, 1, cfg.segment_bytes, 16, key.0)
        .map_err(|e| setup_fail(format!("plan: {e}")))?;
    ShardCore::format(&mut dev.clone(), &sb.shard_layout(0))
        .map_err(|e| setup_fail(format!("format: {e}")))?;
    let mut w = World {
        cfg: cfg.clone(),
        rng,
        key,
        contents,
        ids,
        by_id,
        known: BTreeMap::new(),
        acked_level: HashMap::new(),
        max_level: HashMap::new(),
        pending: BTreeMap::new(),
        ops: HashMap::new(),
        next_ticket: 0,
        net: Vec::new(),
        poison_tickets: HashSet::new(),
        report: SimReport::default(),
        op_no: 0,
    };
    let mut shard =
        open_shard(&dev, &sb, key, cfg, true).map_err(|e| w.fail(format!("open: {e}")))?;
    dev.0.lock().expect("sim").set_faults(cfg.faults);
    let mut out = Vec::new();

    while w.op_no < cfg.ops {
        w.op_no += 1;
        let failed = shard.stats().failed.is_some();
        if failed || w.rng.chance(cfg.crash_per_million) {
            // Crash (or the operator restarts a failed shard): the shard's memory, the
            // requests on the network and whatever the device had not flushed are lost.
            w.report.crashes += 1;
            w.report.absorb(&shard.stats());
            drop(shard);
            {
                let mut d = dev.0.lock().expect("sim");
                d.crash();
                // Replay reads under the same read faults (bit flips, read errors) as the
                // run: a transient misread must never end the log early.
                d.set_faults(SimFaults {
                    write_error_per_million: 0,
                    ..cfg.faults
                });
            }
            w.net.clear();
            w.ops.clear();
            w.poison_tickets.clear();
            for (id, _) in std::mem::take(&mut w.pending) {
                w.known.remove(&id);
                w.acked_level.remove(&id);
            }
            let use_summaries = w.rng.below(4) != 0;
            shard = open_shard(&dev, &sb, key, cfg, use_summaries)
                .map_err(|e| w.fail(format!("reopen after crash: {e}")))?;
            if std::env::var_os("HIVE_SIM_DEBUG").is_some() {
                let st = shard.stats();
                eprintln!("op {} reopen: records {} summaries {} continuations {} beyond {} chunks {} segs {}", w.op_no, st.replayed_records, st.replayed_summaries, st.replayed_continuations, st.segments_with_records_beyond, st.chunks, st.segments_used);
            }
            if let Err(e) = w.check_has(&mut shard).and_then(|()| w.check_audit(&shard)) {
                if std::env::var_os("HIVE_SIM_DEBUG").is_some() {
                    debug_dump(&dev, &sb);
                }
                return Err(e);
            }
            dev.0.lock().expect("sim").set_faults(cfg.faults);
            continue;
        }
        w.issue();
        // The network delivers a random subset of what is in flight, in random order.
        while !w.net.is_empty() && w.rng.below(3) != 0 {
            let i = w.rng.below(w.net.len() as u64) as usize;
            match w.net.swap_remove(i) {
                Msg::Put(t, chunks) => shard.put(t, chunks),
                Msg::Get(t, id) => shard.get(t, id),
                Msg::Delete(t, ids) => shard.delete(t, ids),
            }
        }
        for _ in 0..1 + w.rng.below(3) {
            w.drive_compaction(&mut shard);
            shard.poll(&mut out, false);
            for c in out.drain(..) {
                w.complete(c)?;
            }
        }
        if w.rng.below(50) == 0 {
            w.check_has(&mut shard)?;
            w.check_audit(&shard)?;
        }
    }
    // Deliver everything, drain, then restart without a crash: the log alone must rebuild
    // the same state, and every chunk known present must read back and verify.
    for m in std::mem::take(&mut w.net) {
        match m {
            Msg::Put(t, chunks) => shard.put(t, chunks),
            Msg::Get(t, id) => shard.get(t, id),
            Msg::Delete(t, ids) => shard.delete(t, ids),
        }
    }
    dev.0.lock().expect("sim").set_faults(NO_FAULTS);
    // Then compact whatever qualifies, to the end: the restart below replays the result.
    shard.request_compaction();
    let mut settled = false;
    for _ in 0..200_000 {
        let more = shard.compact_step();
        shard.poll(&mut out, true);
        for c in out.drain(..) {
            w.complete(c)?;
        }
        if !more && !shard.busy() {
            settled = true;
            break;
        }
    }
    if !settled {
        // Compaction must converge: each round frees more than it writes.
        return Err(w.fail(format!("compaction did not settle: {:?}", shard.stats())));
    }
    w.check_has(&mut shard)?;
    w.check_audit(&shard)?;
    w.report.absorb(&shard.stats());
    drop(shard);
    let mut shard =
        open_shard(&dev, &sb, key, cfg, true).map_err(|e| w.fail(format!("final reopen: {e}")))?;
    // Summaries are checkpoints of the log, never more: replaying from them and scanning
    // every record must rebuild the same index.
    {
        let scanned = open_shard(&dev, &sb, key, cfg, false)
            .map_err(|e| w.fail(format!("final reopen (scan): {e}")))?;
        let a: BTreeMap<ChunkId, crate::index::IndexEntry> =
            shard.index().iter().map(|(k, v)| (*k, *v)).collect();
        let b: BTreeMap<ChunkId, crate::index::IndexEntry> =
            scanned.index().iter().map(|(k, v)| (*k, *v)).collect();
        if a != b {
            return Err(w.fail(format!(
                "summary replay ({} entries) differs from a full scan ({} entries)",
                a.len(),
                b.len()
            )));
        }
        w.report.summaries_replayed += shard.stats().replayed_summaries;
        w.report.continuations_replayed += scanned.stats().replayed_continuations;
    }
    w.check_has(&mut shard)?;
    w.check_audit(&shard)?;
    let present: Vec<ChunkId> = w
        .known
        .iter()
        .filter(|(_, p)| **p)
        .map(|(id, _)| *id)
        .collect();
    for id in present {
        let t = w.ticket(Op::Get { id });
        shard.get(t, id);
        while shard.busy() || out.is_empty() {
            shard.poll(&mut out, true);
            if !out.is_empty() {
                break;
            }
        }
        for c in out.drain(..) {
            if let Completion::Get { result: Err(e), .. } = &c {
                return Err(w.fail(format!(
                    "known chunk {id:?} unreadable after a clean restart: {e}"
                )));
            }
            w.complete(c)?;
        }
    }
    w.report.ops = w.op_no;
    Ok(w.report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_few_seeds() {
        for seed in 1..=4 {
            let r = run(&SimConfig::new(seed, 20_000)).unwrap_or_else(|e| panic!("{e}"));
            assert!(r.puts_acked > 1000, "{r:?}");
            assert!(r.crashes > 10, "{r:?}");
            assert!(r.puts_raised > 100, "{r:?}");
        }
    }
}
