//! The deterministic simulator of replicated puts: several nodes, each running the real
//! [`Replicator`] as the primary of its buckets, over a simulated network (delays,
//! reordering, loss, partitions) and simulated stores (a write is durable only after a
//! delay; a crash loses what was not; writes fail now and then). Nodes crash and restart;
//! the map marks a crashed node down after a while and up again when it is back. One
//! thread, one seed: a failing seed replays exactly.
//!
//! Oracle:
//! - **A put answered `Ok` is durable on at least `min_copies` distinct nodes** at the
//!   moment the primary answers (ground truth from the stores, not the replicator's view).
//! - **No silent under-replication:** when a job ends (`Done`) on a primary that did not
//!   crash, each of its targets holds the chunks durably or was reported owed.
//! - **Each job is answered exactly once**, unless its primary crashed first.
//! - **Without faults every put succeeds** (runs with faults off).
//!
//! A planted bug (the primary counting its own copy before it is durable) is caught.

use crate::replicate::{Action, JobId, NodeId, ReplConfig, ReplError, Replicator};
use hivefs_net::placement::{HiveMap, MapNode, NodeState};
use hivefs_nvme::rng::SplitMix64 as SimRng;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};

/// One simulation run.
#[derive(Clone, Debug)]
pub struct ReplSimConfig {
    pub seed: u64,
    /// Client puts to issue.
    pub puts: u64,
    /// Crashes, partitions, lost messages and failed writes (off: a fault-free run).
    pub faults: bool,
    /// The primary acknowledges before its own copy is durable (must be caught).
    pub plant_early_ack: bool,
}

impl ReplSimConfig {
    pub fn new(seed: u64, puts: u64) -> ReplSimConfig {
        ReplSimConfig {
            seed,
            puts,
            faults: true,
            plant_early_ack: false,
        }
    }
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplSimReport {
    pub puts: u64,
    pub acked: u64,
    pub failed: u64,
    pub unanswered: u64,
    pub forwards: u64,
    pub hinted: u64,
    pub owed: u64,
    pub late_answers: u64,
    pub crashes: u64,
    pub partitions: u64,
    pub messages_lost: u64,
    pub writes_failed: u64,
}

impl ReplSimReport {
    pub fn add(&mut self, o: &ReplSimReport) {
        self.puts += o.puts;
        self.acked += o.acked;
        self.failed += o.failed;
        self.unanswered += o.unanswered;
        self.forwards += o.forwards;
        self.hinted += o.hinted;
        self.owed += o.owed;
        self.late_answers += o.late_answers;
        self.crashes += o.crashes;
        self.partitions += o.partitions;
        self.messages_lost += o.messages_lost;
        self.writes_failed += o.writes_failed;
    }
}

#[derive(Debug)]
enum Ev {
    /// A client's put reaches `node`.
    Put {
        node: NodeId,
        put: u64,
    },
    /// A forward of `job` from `from` reaches `to`.
    Forward {
        from: NodeId,
        from_life: u64,
        to: NodeId,
        job: JobId,
        ids: Vec<u64>,
    },
    /// A store finished writing (durable unless its node crashed since).
    Stored {
        node: NodeId,
        life: u64,
        ids: Vec<u64>,
        ok: bool,
        then: AfterStore,
    },
    /// An answer to a forward reaches the primary.
    Answer {
        to: NodeId,
        to_life: u64,
        job: JobId,
        from: NodeId,
        ok: bool,
    },
    /// A client issues the next put (and the seed may bring a fault with it).
    Issue,
    Tick,
    Crash {
        node: NodeId,
    },
    Restart {
        node: NodeId,
    },
    MarkDown {
        node: NodeId,
        life: u64,
    },
}

#[derive(Debug)]
enum AfterStore {
    /// The primary's own copy of `job`.
    Local { job: JobId },
    /// A replica's copy: answer `primary`.
    Replica {
        primary: NodeId,
        primary_life: u64,
        job: JobId,
    },
}

struct Node {
    id: NodeId,
    up: bool,
    /// Incarnation: events of an earlier life are void.
    life: u64,
    durable: HashSet<u64>,
    repl: Replicator,
    /// Jobs of this life: (put, ids, targets asked) for the accounting oracle.
    jobs: HashMap<JobId, JobInfo>,
    isolated_until: u64,
}

struct JobInfo {
    put: u64,
    ids: Vec<u64>,
    targets: BTreeSet<NodeId>,
    owed: BTreeSet<NodeId>,
    answered: bool,
}

struct World {
    cfg: ReplSimConfig,
    rcfg: ReplConfig,
    /// The most copies a put asks for; each put asks for 1 to `copies` (its level).
    copies: usize,
    /// Each put's level.
    levels: HashMap<u64, usize>,
    rng: SimRng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: HashMap<u64, Ev>,
    nodes: Vec<Node>,
    map: HiveMap,
    /// put -> (ids, bucket, answered?)
    puts: BTreeMap<u64, (Vec<u64>, u32, Option<bool>)>,
    report: ReplSimReport,
    next_chunk: u64,
    issued: u64,
}

const BUCKETS: u32 = 64;

fn bucket_of(chunk: u64) -> u32 {
    (chunk.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 58) as u32 % BUCKETS
}

impl World {
    fn at(&mut self, delay: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((self.now + delay, self.seq)));
        self.events.insert(self.seq, ev);
    }

    fn node(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[(id - 1) as usize]
    }

    fn reachable(&self, a: NodeId, b: NodeId) -> bool {
        let n = |id: NodeId| &self.nodes[(id - 1) as usize];
        n(a).isolated_until <= self.now && n(b).isolated_until <= self.now
    }

    /// A network hop: 0.1-2 ms, sometimes lost (with faults on).
    fn send(&mut self, from: NodeId, to: NodeId, ev: Ev) {
        if self.cfg.faults && (!self.reachable(from, to) || self.rng.below(200) == 0) {
            self.report.messages_lost += 1;
            return;
        }
        let d = 1 + self.rng.below(20) / 10;
        self.at(d, ev);
    }

    /// A store write on `node`: durable after 1-5 ms, failing now and then.
    fn store(&mut self, node: NodeId, ids: Vec<u64>, then: AfterStore) {
        let ok = !(self.cfg.faults && self.rng.below(100) == 0);
        if !ok {
            self.report.writes_failed += 1;
        }
        let life = self.node(node).life;
        let d = 1 + self.rng.below(5);
        self.at(
            d,
            Ev::Stored {
                node,
                life,
                ids,
                ok,
                then,
            },
        );
    }

    fn holders(&self, ids: &[u64]) -> usize {
        self.nodes
            .iter()
            .filter(|n| ids.iter().all(|c| n.durable.contains(c)))
            .count()
    }

    /// Carry out what `node`'s replicator decided.
    fn act(&mut self, node: NodeId) -> Result<(), String> {
        let mut actions = Vec::new();
        self.node(node).repl.drain(&mut actions);
        for a in actions {
            match a {
                Action::Forward { job, to, hint_for } => {
                    self.report.forwards += 1;
                    if hint_for.is_some() {
                        self.report.hinted += 1;
                    }
                    let n = self.node(node);
                    let Some(info) = n.jobs.get_mut(&job) else {
                        return Err(format!("node {node}: forward of unknown job {job}"));
                    };
                    if hint_for.is_none() {
                        info.targets.insert(to);
                    }
                    let ids = info.ids.clone();
                    let from_life = n.life;
                    self.send(
                        node,
                        to,
                        Ev::Forward {
                            from: node,
                            from_life,
                            to,
                            job,
                            ids,
                        },
                    );
                }
                Action::Owe {
                    job, node: owed, ..
                } => {
                    self.report.owed += 1;
                    if let Some(info) = self.node(node).jobs.get_mut(&job) {
                        info.owed.insert(owed);
                    }
                }
                Action::Reply { job, result } => {
                    let Some(put) = self.node(node).jobs.get(&job).map(|i| i.put) else {
                        return Err(format!("node {node}: reply to unknown job {job}"));
                    };
                    let level = self.levels.get(&put).copied().unwrap_or(1);
                    let min = self.rcfg.min_copies.min(level);
                    let info = self.node(node).jobs.get_mut(&job).expect("found above");
                    if std::mem::replace(&mut info.answered, true) {
                        return Err(format!("node {node}: job {job} answered twice"));
                    }
                    let (put, ids) = (info.put, info.ids.clone());
                    if result.is_ok() {
                        let held = self.holders(&ids);
                        if held < min {
                            return Err(format!(
                                "put {put} (job {job} on node {node}) acknowledged with {held} durable copies, min_copies {min}"
                            ));
                        }
                    }
                    if let Some(p) = self.puts.get_mut(&put) {
                        // A retried put keeps its first success.
                        if p.2 != Some(true) {
                            p.2 = Some(result.is_ok());
                        }
                    }
                    match result {
                        Ok(()) => self.report.acked += 1,
                        Err(ReplError::NotPrimary { .. }) | Err(ReplError::TooFewCopies { .. }) => {
                            self.report.failed += 1
                        }
                    }
                }
                Action::Done { job } => {
                    let Some(info) = self.node(node).jobs.remove(&job) else {
                        continue;
                    };
                    if !info.answered {
                        return Err(format!("node {node}: job {job} done unanswered"));
                    }
                    for t in &info.targets {
                        let has = info
                            .ids
                            .iter()
                            .all(|c| self.nodes[(*t - 1) as usize].durable.contains(c));
                        if !has && !info.owed.contains(t) {
                            return Err(format!(
                                "node {node}: job {job} done, target {t} lacks its chunks and was not owed them"
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn set_state(&mut self, node: NodeId, s: NodeState) {
        if let Some(n) = self.map.nodes.iter_mut().find(|n| n.id == node) {
            if n.state != s {
                n.state = s;
                self.map.epoch += 1;
            }
        }
    }

    fn step(&mut self, ev: Ev) -> Result<(), String> {
        match ev {
            Ev::Put { node, put } => {
                if !self.node(node).up {
                    return Ok(());
                }
                let (ids, bucket) = {
                    let p = &self.puts[&put];
                    (p.0.clone(), p.1)
                };
                let now = self.now;
                let map = self.map.clone();
                let level = self.levels.get(&put).copied().unwrap_or(1);
                let n = self.node(node);
                let job = n.repl.start(now, bucket, &map, level);
                n.jobs.insert(
                    job,
                    JobInfo {
                        put,
                        ids: ids.clone(),
                        targets: BTreeSet::new(),
                        owed: BTreeSet::new(),
                        answered: false,
                    },
                );
                self.act(node)?;
                if self.node(node).jobs.contains_key(&job) {
                    if self.cfg.plant_early_ack {
                        self.node(node).repl.local(job, true);
                        self.act(node)?;
                    }
                    self.store(node, ids, AfterStore::Local { job });
                }
            }
            Ev::Forward {
                from,
                from_life,
                to,
                job,
                ids,
            } => {
                if !self.node(to).up {
                    return Ok(());
                }
                self.store(
                    to,
                    ids,
                    AfterStore::Replica {
                        primary: from,
                        primary_life: from_life,
                        job,
                    },
                );
            }
            Ev::Stored {
                node,
                life,
                ids,
                ok,
                then,
            } => {
                if self.node(node).life != life || !self.node(node).up {
                    return Ok(()); // lost in a crash
                }
                if ok {
                    self.node(node).durable.extend(ids.iter().copied());
                }
                match then {
                    AfterStore::Local { job } => {
                        self.node(node).repl.local(job, ok);
                        self.act(node)?;
                    }
                    AfterStore::Replica {
                        primary,
                        primary_life,
                        job,
                    } => self.send(
                        node,
                        primary,
                        Ev::Answer {
                            to: primary,
                            to_life: primary_life,
                            job,
                            from: node,
                            ok,
                        },
                    ),
                }
            }
            Ev::Answer {
                to,
                to_life,
                job,
                from,
                ok,
            } => {
                let now = self.now;
                let n = self.node(to);
                if !n.up || n.life != to_life {
                    return Ok(());
                }
                let late = !n.jobs.contains_key(&job);
                n.repl.remote(now, job, from, ok);
                if late {
                    self.report.late_answers += 1;
                }
                self.act(to)?;
            }
            Ev::Tick => {
                let now = self.now;
                for i in 0..self.nodes.len() {
                    if self.nodes[i].up {
                        self.nodes[i].repl.tick(now);
                        let id = self.nodes[i].id;
                        self.act(id)?;
                    }
                }
                let busy = self.nodes.iter().any(|n| n.up && n.repl.in_flight() > 0);
                if self.issued < self.cfg.puts || !self.events.is_empty() || busy {
                    self.at(100, Ev::Tick);
                }
            }
            Ev::Crash { node } => {
                if !self.node(node).up {
                    return Ok(());
                }
                self.report.crashes += 1;
                let n = self.node(node);
                n.up = false;
                n.life += 1;
                n.repl.crash();
                n.jobs.clear();
                let life = n.life;
                let d = 500 + self.rng.below(3_000);
                self.at(d, Ev::Restart { node });
                self.at(300, Ev::MarkDown { node, life });
            }
            Ev::MarkDown { node, life } => {
                if !self.node(node).up && self.node(node).life == life {
                    self.set_state(node, NodeState::Down);
                }
            }
            Ev::Restart { node } => {
                let n = self.node(node);
                n.up = true;
                self.set_state(node, NodeState::Up);
            }
            Ev::Issue => self.issue(),
        }
        Ok(())
    }

    /// One client put of 1-4 chunks of one bucket, sent to the bucket's primary (the first
    /// replica the map does not say is down); sometimes with a fault.
    fn issue(&mut self) {
        self.issued += 1;
        self.report.puts += 1;
        let n = 1 + self.rng.below(4);
        // Some puts repeat a chunk stored before (dedupe: idempotent at every node).
        let first = if self.next_chunk > 10 && self.rng.below(8) == 0 {
            1 + self.rng.below(self.next_chunk - 1)
        } else {
            self.next_chunk
        };
        let bucket = bucket_of(first);
        let mut ids = vec![first];
        while (ids.len() as u64) < n {
            self.next_chunk += 1;
            if bucket_of(self.next_chunk) == bucket {
                ids.push(self.next_chunk);
            }
        }
        self.next_chunk += 1;
        ids.sort_unstable();
        ids.dedup();
        let primary = primary_of(&self.map, bucket).unwrap_or(1);
        let put = self.issued;
        self.puts.insert(put, (ids, bucket, None));
        let level = 1 + self.rng.below(self.copies as u64) as usize;
        self.levels.insert(put, level);
        let d = 1 + self.rng.below(2);
        self.at(d, Ev::Put { node: primary, put });
        if self.cfg.faults {
            let roll = self.rng.below(1000);
            let victim = 1 + self.rng.below(self.nodes.len() as u64);
            if roll < 3 {
                self.at(0, Ev::Crash { node: victim });
            } else if roll < 6 {
                self.report.partitions += 1;
                let until = self.now + 50 + self.rng.below(400);
                let v = self.node(victim);
                v.isolated_until = v.isolated_until.max(until);
            }
        }
        if self.issued < self.cfg.puts {
            let d = self.rng.below(4);
            self.at(d, Ev::Issue);
        }
    }
}

/// Where a client sends a put of `bucket`: see [`Replicator::start`].
fn primary_of(map: &HiveMap, bucket: u32) -> Option<NodeId> {
    crate::replicate::primary(map, &map.replicas(bucket, usize::MAX))
}

/// Run one simulation: `cfg.puts` puts from clients against 3-6 nodes (each put at a
/// level of 1 to 2 or 3, min_copies 2), faults by the seed, then quiet until every job ended. Returns the first
/// broken invariant as an error naming the seed.
pub fn run(cfg: &ReplSimConfig) -> Result<ReplSimReport, String> {
    let mut rng = SimRng::new(cfg.seed);
    let n_nodes = 3 + rng.below(4);
    let zones = 1 + rng.below(3);
    let copies = 2 + rng.below(2) as usize;
    let rcfg = ReplConfig {
        min_copies: 2,
        attempt_ms: 50 + rng.below(100),
        reply_ms: 200 + rng.below(300),
    };
    let map = HiveMap {
        epoch: 1,
        bucket_count: BUCKETS,
        nodes: (1..=n_nodes)
            .map(|id| MapNode {
                id,
                name: format!("n{id}"),
                host: "127.0.0.1".into(),
                meta_port: 1000 + id as u16,
                base_port: 2000 + 10 * id as u16,
                shards: 1,
                weight: 1 + (id % 2) as u32,
                zone: format!("z{}", id % zones),
                state: NodeState::Up,
            })
            .collect(),
    };
    let mut w = World {
        cfg: cfg.clone(),
        rcfg,
        copies,
        levels: HashMap::new(),
        now: 0,
        seq: 0,
        queue: BinaryHeap::new(),
        events: HashMap::new(),
        nodes: (1..=n_nodes)
            .map(|id| Node {
                id,
                up: true,
                life: 0,
                durable: HashSet::new(),
                repl: Replicator::new(id, rcfg),
                jobs: HashMap::new(),
                isolated_until: 0,
            })
            .collect(),
        map,
        puts: BTreeMap::new(),
        report: ReplSimReport::default(),
        rng,
        next_chunk: 1,
        issued: 0,
    };
    w.at(100, Ev::Tick);
    w.at(0, Ev::Issue);
    let fail = |w: &World, e: String| {
        format!(
            "replication simulation seed {} broke an invariant at {} ms: {e}",
            cfg.seed, w.now
        )
    };
    while let Some(Reverse((t, seq))) = w.queue.pop() {
        w.now = t;
        let ev = w.events.remove(&seq).expect("queued event");
        w.step(ev).map_err(|e| fail(&w, e))?;
        if w.now > cfg.puts * 4 + 600_000 {
            return Err(fail(&w, "the run did not quiesce".into()));
        }
    }
    // Quiet: every up node's jobs have ended.
    for n in &w.nodes {
        if n.up && n.repl.in_flight() > 0 {
            return Err(fail(
                &w,
                format!("node {} still has {} jobs", n.id, n.repl.in_flight()),
            ));
        }
    }
    w.report.unanswered = w.puts.values().filter(|p| p.2.is_none()).count() as u64;
    if !cfg.faults && (w.report.failed > 0 || w.report.unanswered > 0) {
        return Err(fail(
            &w,
            format!("without faults every put must succeed: {:?}", w.report),
        ));
    }
    Ok(w.report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_free_runs_acknowledge_everything() {
        for seed in 0..5 {
            let mut c = ReplSimConfig::new(seed, 2_000);
            c.faults = false;
            let r = run(&c).unwrap();
            assert_eq!(r.acked, r.puts, "{r:?}");
            assert_eq!(r.owed, 0, "{r:?}");
        }
    }

    #[test]
    fn faulty_runs_keep_the_invariants() {
        let mut sum = ReplSimReport::default();
        for seed in 0..20 {
            sum.add(&run(&ReplSimConfig::new(seed, 3_000)).unwrap_or_else(|e| panic!("{e}")));
        }
        eprintln!("20 seeds: {sum:?}");
        assert!(
            sum.crashes > 0 && sum.partitions > 0 && sum.hinted > 0,
            "{sum:?}"
        );
        assert!(
            sum.owed > 0 && sum.failed > 0 && sum.acked > sum.puts / 2,
            "{sum:?}"
        );
    }

    #[test]
    fn planted_early_ack_is_caught() {
        let caught = (0..50).find_map(|seed| {
            let mut c = ReplSimConfig::new(seed, 3_000);
            c.plant_early_ack = true;
            run(&c).err()
        });
        let e = caught.expect("acknowledging before the primary's copy is durable must be caught");
        eprintln!("planted bug caught: {e}");
        assert!(e.contains("acknowledged with"), "{e}");
    }
}
