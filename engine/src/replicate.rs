//! Replication of puts across nodes: the primary's state machine (no I/O, no clock).
//!
//! A client sends the chunks of one bucket to the bucket's *primary*, the first node of
//! its replica list in the map (`hivefs_net::placement::HiveMap::replicas`). The primary
//! stores them itself and forwards them to the other replicas over the replication
//! transport; the put is acknowledged once `min_copies` nodes hold every chunk durably.
//! A [`Replicator`] decides who gets a copy, when the client is answered, and which
//! copies repair owes; the caller (a shard loop, or the simulator `repl_sim`) moves the
//! bytes, keeps them while a job runs, and feeds back what happened.
//!
//! # The rules
//! - **Primary and targets.** The primary of bucket `b` under map `m` is the first node
//!   of `m.replicas(b, ..)` that `m` does not say is `Down` ([`primary`]); its targets are
//!   the other nodes of `m.replicas(b, copies)`. A target the map says is `Down` is not
//!   tried: it is failed at once. A node that is not the bucket's primary in its map
//!   refuses the put ([`ReplError::NotPrimary`]: the client's map is stale).
//! - **Hinted copies.** A failed target (refused, unreachable, or silent past
//!   `attempt_ms`) is replaced by the next node in the bucket's rendezvous order that is
//!   not a target yet and not down, which stores a *hinted* copy on the failed node's
//!   behalf. Each failure is reported as an [`Action::Owe`] (the failed node should hold
//!   the chunks; `held_by` names the hinted node if there is one): repair moves them.
//!   With no candidate left, the copy is owed with nobody holding it for that node.
//! - **Acknowledge only what is durable on `min_copies` nodes.** The reply is `Ok` as
//!   soon as `min_copies` nodes (the primary, targets or hinted) reported durable; a
//!   hive with fewer eligible nodes (up or down) than `min_copies` needs all of them. It is an error when that became impossible (every attempt settled)
//!   or the job's `reply_ms` passed first. Either way the job goes on until every target
//!   settled, then ends with [`Action::Done`] (its bytes may go).
//! - **Late answers.** A durable report from a node whose attempt already timed out still
//!   counts (the copy exists); its `Owe` was emitted already, and repair finding the copy
//!   in place is a no-op (puts are idempotent).
//!
//! The invariant the simulator checks: a job answered `Ok` has its chunks durable on at
//! least `min_copies` distinct nodes at that moment; a copy that a target does not hold
//! when the job is done was owed.

use hivefs_net::placement::{HiveMap, NodeState};
use std::collections::BTreeMap;

pub type NodeId = u64;
pub type JobId = u64;

/// How many copies a put waits for, and how long. (How many it makes is the put's level,
/// given to [`Replicator::start`]: a volume's `copies`.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplConfig {
    /// Durable copies before the put is acknowledged (capped by the put's level).
    pub min_copies: usize,
    /// How long one forward may stay unanswered before it counts as failed.
    pub attempt_ms: u64,
    /// How long the client waits for its answer at most.
    pub reply_ms: u64,
}

impl Default for ReplConfig {
    fn default() -> Self {
        ReplConfig {
            min_copies: 2,
            attempt_ms: 2_000,
            reply_ms: 5_000,
        }
    }
}

/// Why a put was not acknowledged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplError {
    /// This node is not the bucket's primary in its map (the client's map is stale).
    NotPrimary { primary: Option<NodeId> },
    /// Fewer than `min_copies` nodes stored the chunks (in time).
    TooFewCopies { durable: usize, needed: usize },
}

/// What the caller must do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send the job's chunks to `to` to be stored durably; `hint_for`: a hinted copy, held
    /// on behalf of that node. Answer with [`Replicator::remote`].
    Forward {
        job: JobId,
        to: NodeId,
        hint_for: Option<NodeId>,
    },
    /// Answer the client.
    Reply {
        job: JobId,
        result: Result<(), ReplError>,
    },
    /// `node` should hold the job's chunks (bucket `bucket`) and does not: repair owes
    /// them. `held_by`: the node holding a hinted copy for it, if any.
    Owe {
        job: JobId,
        bucket: u32,
        node: NodeId,
        held_by: Option<NodeId>,
    },
    /// Every target settled: the job's bytes may be released.
    Done { job: JobId },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Pending { deadline_ms: u64 },
    Durable,
    Failed,
}

#[derive(Debug)]
struct Attempt {
    node: NodeId,
    hint_for: Option<NodeId>,
    status: Status,
}

#[derive(Debug)]
struct Job {
    bucket: u32,
    /// Durable copies before the reply: `min_copies`, or every eligible node where the
    /// hive has fewer (a one-node hive acknowledges its one copy).
    need: usize,
    reply_deadline_ms: u64,
    replied: bool,
    /// The primary's own store.
    local: Status,
    attempts: Vec<Attempt>,
    /// Nodes not yet tried, in rendezvous order (for hinted copies).
    candidates: Vec<NodeId>,
}

impl Job {
    fn durable(&self) -> usize {
        usize::from(self.local == Status::Durable)
            + self
                .attempts
                .iter()
                .filter(|a| a.status == Status::Durable)
                .count()
    }

    /// Copies that may still become durable.
    fn possible(&self) -> usize {
        let open = |s: Status| !matches!(s, Status::Failed);
        usize::from(open(self.local)) + self.attempts.iter().filter(|a| open(a.status)).count()
    }

    fn settled(&self) -> bool {
        !matches!(self.local, Status::Pending { .. })
            && self
                .attempts
                .iter()
                .all(|a| !matches!(a.status, Status::Pending { .. }))
    }
}

/// The primary of a bucket whose rendezvous order is `order`: its first node the map does
/// not say is down (a down first replica is then a target like any other: failed at once,
/// its copy owed). Clients send puts there; reads too.
pub fn primary(map: &HiveMap, order: &[NodeId]) -> Option<NodeId> {
    map.primary(order)
}

/// The primary side of replicated puts. See the module docs.
#[derive(Debug)]
pub struct Replicator {
    me: NodeId,
    cfg: ReplConfig,
    jobs: BTreeMap<JobId, Job>,
    next_job: JobId,
    out: Vec<Action>,
}

impl Replicator {
    pub fn new(me: NodeId, cfg: ReplConfig) -> Replicator {
        assert!(cfg.min_copies >= 1, "bad replication config {cfg:?}");
        Replicator {
            me,
            cfg,
            jobs: BTreeMap::new(),
            next_job: 1,
            out: Vec::new(),
        }
    }

    pub fn config(&self) -> ReplConfig {
        self.cfg
    }

    /// Jobs not yet done.
    pub fn in_flight(&self) -> usize {
        self.jobs.len()
    }

    /// A client's put of chunks of `bucket` at level `copies` arrived: the caller stores
    /// them locally (and reports with [`local`](Self::local)) unless the answer is already
    /// `NotPrimary`. The chunks go to the first `copies` nodes of the bucket's order.
    /// Returns the job id the actions name.
    pub fn start(&mut self, now_ms: u64, bucket: u32, map: &HiveMap, copies: usize) -> JobId {
        let job = self.next_job;
        self.next_job += 1;
        let order = map.replicas(bucket, usize::MAX);
        let primary = primary(map, &order);
        if primary != Some(self.me) {
            self.out.push(Action::Reply {
                job,
                result: Err(ReplError::NotPrimary { primary }),
            });
            self.out.push(Action::Done { job });
            return job;
        }
        let copies = copies.max(1).min(order.len());
        let down = |n: NodeId| map.node(n).is_none_or(|m| m.state == NodeState::Down);
        let candidates: Vec<NodeId> = order[copies..]
            .iter()
            .copied()
            .filter(|n| !down(*n) && *n != self.me)
            .rev()
            .collect();
        let mut j = Job {
            bucket,
            need: self.cfg.min_copies.min(copies),
            reply_deadline_ms: now_ms + self.cfg.reply_ms,
            replied: false,
            local: Status::Pending {
                deadline_ms: u64::MAX,
            },
            attempts: Vec::new(),
            candidates,
        };
        let me = self.me;
        for &n in order[..copies].iter().filter(|n| **n != me) {
            if down(n) {
                j.attempts.push(Attempt {
                    node: n,
                    hint_for: None,
                    status: Status::Failed,
                });
                self.fail_over(now_ms, job, &mut j, n);
            } else {
                j.attempts.push(Attempt {
                    node: n,
                    hint_for: None,
                    status: Status::Pending {
                        deadline_ms: now_ms + self.cfg.attempt_ms,
                    },
                });
                self.out.push(Action::Forward {
                    job,
                    to: n,
                    hint_for: None,
                });
            }
        }
        self.jobs.insert(job, j);
        self.settle(job);
        job
    }

    /// A copy for `failed` (a target, or a hinted node standing in for one) is not coming:
    /// owe it, and ask the next candidate for a hinted copy.
    fn fail_over(&mut self, now_ms: u64, job: JobId, j: &mut Job, failed: NodeId) {
        let owed_to = j
            .attempts
            .iter()
            .find(|a| a.node == failed)
            .and_then(|a| a.hint_for)
            .unwrap_or(failed);
        match j.candidates.pop() {
            Some(next) => {
                self.out.push(Action::Owe {
                    job,
                    bucket: j.bucket,
                    node: owed_to,
                    held_by: Some(next),
                });
                j.attempts.push(Attempt {
                    node: next,
                    hint_for: Some(owed_to),
                    status: Status::Pending {
                        deadline_ms: now_ms + self.cfg.attempt_ms,
                    },
                });
                self.out.push(Action::Forward {
                    job,
                    to: next,
                    hint_for: Some(owed_to),
                });
            }
            None => self.out.push(Action::Owe {
                job,
                bucket: j.bucket,
                node: owed_to,
                held_by: None,
            }),
        }
    }

    /// The primary's own store finished the job's chunks (`ok`: durable).
    pub fn local(&mut self, job: JobId, ok: bool) {
        if let Some(j) = self.jobs.get_mut(&job) {
            if matches!(j.local, Status::Pending { .. }) {
                j.local = if ok { Status::Durable } else { Status::Failed };
            }
        }
        self.settle(job);
    }

    /// `from` answered a forward of `job` (`ok`: it holds the chunks durably).
    pub fn remote(&mut self, now_ms: u64, job: JobId, from: NodeId, ok: bool) {
        let Some(mut j) = self.jobs.remove(&job) else {
            return; // done already: nothing depends on it any more
        };
        if let Some(i) = j.attempts.iter().position(|a| a.node == from) {
            match (j.attempts[i].status, ok) {
                (_, true) => j.attempts[i].status = Status::Durable,
                (Status::Pending { .. }, false) => {
                    j.attempts[i].status = Status::Failed;
                    self.fail_over(now_ms, job, &mut j, from);
                }
                // A failure after a timeout was handled then.
                (_, false) => {}
            }
        }
        self.jobs.insert(job, j);
        self.settle(job);
    }

    /// Time passed: forwards silent past their deadline count as failed; clients whose
    /// answer is overdue get an error.
    pub fn tick(&mut self, now_ms: u64) {
        let ids: Vec<JobId> = self.jobs.keys().copied().collect();
        for job in ids {
            let Some(mut j) = self.jobs.remove(&job) else {
                continue;
            };
            let overdue: Vec<NodeId> = j
                .attempts
                .iter()
                .filter(|a| matches!(a.status, Status::Pending { deadline_ms } if deadline_ms <= now_ms))
                .map(|a| a.node)
                .collect();
            for n in overdue {
                if let Some(a) = j.attempts.iter_mut().find(|a| a.node == n) {
                    a.status = Status::Failed;
                }
                self.fail_over(now_ms, job, &mut j, n);
            }
            if !j.replied && now_ms >= j.reply_deadline_ms {
                j.replied = true;
                self.out.push(Action::Reply {
                    job,
                    result: Err(ReplError::TooFewCopies {
                        durable: j.durable(),
                        needed: j.need,
                    }),
                });
            }
            self.jobs.insert(job, j);
            self.settle(job);
        }
    }

    /// Reply once the outcome is known; finish once everything settled.
    fn settle(&mut self, job: JobId) {
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        let need = j.need;
        if !j.replied && j.durable() >= need {
            j.replied = true;
            self.out.push(Action::Reply {
                job,
                result: Ok(()),
            });
        } else if !j.replied && (j.possible() < need || j.local == Status::Failed) {
            // The primary's own copy failing fails the put: the client retries (its store
            // refused or broke; the copies made elsewhere stay and are idempotent).
            j.replied = true;
            self.out.push(Action::Reply {
                job,
                result: Err(ReplError::TooFewCopies {
                    durable: j.durable(),
                    needed: need,
                }),
            });
        }
        if j.settled() {
            self.jobs.remove(&job);
            self.out.push(Action::Done { job });
        }
    }

    /// Take the actions decided so far, in order.
    pub fn drain(&mut self, out: &mut Vec<Action>) {
        out.append(&mut self.out);
    }

    /// Forget every job (the node crashed: nothing of it survives but what is durable).
    pub fn crash(&mut self) {
        self.jobs.clear();
        self.out.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hivefs_net::placement::MapNode;

    fn map(n: u64) -> HiveMap {
        HiveMap {
            epoch: 1,
            bucket_count: 16,
            nodes: (1..=n)
                .map(|id| MapNode {
                    id,
                    name: format!("n{id}"),
                    host: "127.0.0.1".into(),
                    meta_port: 1000 + id as u16,
                    base_port: 2000 + 10 * id as u16,
                    shards: 1,
                    weight: 1,
                    zone: format!("z{id}"),
                    state: NodeState::Up,
                })
                .collect(),
        }
    }

    fn actions(r: &mut Replicator) -> Vec<Action> {
        let mut v = Vec::new();
        r.drain(&mut v);
        v
    }

    /// A bucket whose primary is `me` in `m`, and its order.
    fn bucket_led_by(m: &HiveMap, me: NodeId) -> (u32, Vec<NodeId>) {
        (0..m.bucket_count)
            .map(|b| (b, m.replicas(b, usize::MAX)))
            .find(|(_, o)| o[0] == me)
            .expect("a bucket led by me")
    }

    #[test]
    fn acknowledged_after_min_copies_then_done_after_all() {
        let m = map(4);
        let (b, order) = bucket_led_by(&m, 1);
        let mut r = Replicator::new(1, ReplConfig::default());
        let job = r.start(0, b, &m, 3);
        let a = actions(&mut r);
        assert_eq!(
            a,
            vec![
                Action::Forward {
                    job,
                    to: order[1],
                    hint_for: None
                },
                Action::Forward {
                    job,
                    to: order[2],
                    hint_for: None
                },
            ]
        );
        r.local(job, true);
        assert!(actions(&mut r).is_empty(), "one copy is not enough");
        r.remote(1, job, order[2], true);
        assert_eq!(
            actions(&mut r),
            vec![Action::Reply {
                job,
                result: Ok(())
            }]
        );
        r.remote(2, job, order[1], true);
        assert_eq!(actions(&mut r), vec![Action::Done { job }]);
        assert_eq!(r.in_flight(), 0);
    }

    #[test]
    fn a_failed_target_is_owed_and_hinted_to_the_next_node() {
        let m = map(5);
        let (b, order) = bucket_led_by(&m, 1);
        let mut r = Replicator::new(1, ReplConfig::default());
        let job = r.start(0, b, &m, 3);
        actions(&mut r);
        r.local(job, true);
        r.remote(1, job, order[1], false);
        assert_eq!(
            actions(&mut r),
            vec![
                Action::Owe {
                    job,
                    bucket: b,
                    node: order[1],
                    held_by: Some(order[3])
                },
                Action::Forward {
                    job,
                    to: order[3],
                    hint_for: Some(order[1])
                },
            ]
        );
        // The hinted node times out too: still owed to the original target.
        r.tick(2_001);
        assert_eq!(
            actions(&mut r),
            vec![
                Action::Owe {
                    job,
                    bucket: b,
                    node: order[2],
                    held_by: Some(order[4])
                },
                Action::Forward {
                    job,
                    to: order[4],
                    hint_for: Some(order[2])
                },
                Action::Owe {
                    job,
                    bucket: b,
                    node: order[1],
                    held_by: None
                },
            ]
        );
        r.remote(2_002, job, order[4], true);
        assert_eq!(
            actions(&mut r),
            vec![
                Action::Reply {
                    job,
                    result: Ok(())
                },
                Action::Done { job }
            ]
        );
    }

    #[test]
    fn down_targets_are_skipped_and_too_few_copies_is_an_error() {
        let mut m = map(3);
        let (b, order) = bucket_led_by(&m, 1);
        for n in &mut m.nodes {
            if n.id != 1 {
                n.state = NodeState::Down;
            }
        }
        let mut r = Replicator::new(1, ReplConfig::default());
        let job = r.start(0, b, &m, 3);
        let a = actions(&mut r);
        assert!(
            a.iter().all(|x| !matches!(x, Action::Forward { .. })),
            "{a:?}"
        );
        assert!(a.contains(&Action::Owe {
            job,
            bucket: b,
            node: order[1],
            held_by: None
        }));
        assert!(a.contains(&Action::Reply {
            job,
            result: Err(ReplError::TooFewCopies {
                durable: 0,
                needed: 2
            })
        }));
        r.local(job, true);
        assert_eq!(actions(&mut r), vec![Action::Done { job }]);
    }

    #[test]
    fn not_the_primary_refuses_and_names_it() {
        let m = map(3);
        let (b, order) = bucket_led_by(&m, 2);
        let mut r = Replicator::new(1, ReplConfig::default());
        let job = r.start(0, b, &m, 3);
        assert_eq!(
            actions(&mut r),
            vec![
                Action::Reply {
                    job,
                    result: Err(ReplError::NotPrimary {
                        primary: Some(order[0])
                    })
                },
                Action::Done { job }
            ]
        );
    }

    #[test]
    fn the_client_is_answered_by_its_deadline() {
        let m = map(3);
        let (b, _) = bucket_led_by(&m, 1);
        let cfg = ReplConfig {
            attempt_ms: 10_000,
            reply_ms: 1_000,
            ..Default::default()
        };
        let mut r = Replicator::new(1, cfg);
        let job = r.start(0, b, &m, 3);
        actions(&mut r);
        r.local(job, true);
        r.tick(999);
        assert!(actions(&mut r).is_empty());
        r.tick(1_000);
        assert_eq!(
            actions(&mut r),
            vec![Action::Reply {
                job,
                result: Err(ReplError::TooFewCopies {
                    durable: 1,
                    needed: 2
                })
            }]
        );
    }
}
