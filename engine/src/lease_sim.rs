//! The deterministic simulator of write leases: the real [`LeaseTable`] of the leader, a
//! Raft log applied in order with the state machine's fence check, clients that write,
//! commit, give leases back, open files elsewhere, fall silent (their session ends) and
//! come back, and leader changes (a new table with a new lease epoch; proposals not yet
//! in the log are lost, the log is kept). One thread, one seed: a failing seed replays
//! exactly.
//!
//! A commit is checked by the leader (a live lease of this client) and *later* appended
//! to the log: between the two, other requests run (the metadata server serves each
//! connection on its own thread). That gap is where a lapsed lease's commit could land
//! after the next holder's, and what the fence (written through the log before a lapsed
//! lease's file goes on) closes.
//!
//! Oracle:
//! - the table's own invariants (`LeaseTable::check`) after every step;
//! - **fencing:** per file, the tokens of the applied commits never go down (a commit
//!   under a lease that was handed on never lands after the next holder's);
//! - **growth:** every grant's token is above every earlier grant's, across leaders, and
//!   never below the file's fence (the leader does not read the fence to grant).
//!
//! [`LeaseSimConfig::skip_fence`] plants a bug (the leader hands a lapsed lease's file on
//! without writing the fence); the tests check the oracle catches it.

use crate::meta::leases::{FileKey, Gate, LeaseTable};
use hivefs_net::meta::{Answer, LOCK_LEASE_MS};
use hivefs_nvme::rng::SplitMix64 as SimRng;
use std::collections::{BTreeMap, VecDeque};

/// One run.
#[derive(Clone, Debug)]
pub struct LeaseSimConfig {
    pub seed: u64,
    pub steps: u64,
    pub clients: u64,
    pub files: u64,
    /// The planted bug: no fence before a lapsed lease's file goes on.
    pub skip_fence: bool,
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseSimReport {
    pub grants: u64,
    pub waits: u64,
    pub fences: u64,
    pub commits_applied: u64,
    pub commits_fenced: u64,
    pub commits_refused: u64,
    pub reclaims: u64,
    pub reclaims_lost: u64,
    pub leader_changes: u64,
    pub silences: u64,
    pub opens: u64,
}

impl LeaseSimReport {
    pub fn add(&mut self, o: &LeaseSimReport) {
        self.grants += o.grants;
        self.waits += o.waits;
        self.fences += o.fences;
        self.commits_applied += o.commits_applied;
        self.commits_fenced += o.commits_fenced;
        self.commits_refused += o.commits_refused;
        self.reclaims += o.reclaims;
        self.reclaims_lost += o.reclaims_lost;
        self.leader_changes += o.leader_changes;
        self.silences += o.silences;
        self.opens += o.opens;
    }
}

#[derive(Clone, Copy, Debug)]
enum Entry {
    Commit {
        client: u64,
        key: FileKey,
        token: u64,
    },
    Fence {
        key: FileKey,
        token: u64,
    },
}

struct Sim {
    cfg: LeaseSimConfig,
    rng: SimRng,
    now: u64,
    epoch: u64,
    table: LeaseTable,
    /// Checked by the leader, not yet in the log.
    proposals: Vec<Entry>,
    /// In the log, not yet applied (applied in order).
    log: VecDeque<Entry>,
    /// The state machine: each file's fence, and the token of its last applied commit.
    fence: BTreeMap<FileKey, u64>,
    last_applied: BTreeMap<FileKey, u64>,
    /// Each client's view: its token per file, and whether a commit of it is on its way.
    tokens: BTreeMap<(u64, FileKey), u64>,
    pending: BTreeMap<(u64, FileKey), bool>,
    max_granted: u64,
    report: LeaseSimReport,
}

impl Sim {
    fn key(&mut self) -> FileKey {
        (1, 1 + self.rng.below(self.cfg.files))
    }

    fn client(&mut self) -> u64 {
        1 + self.rng.below(self.cfg.clients)
    }

    fn floor(&self, key: FileKey) -> u64 {
        self.fence.get(&key).copied().unwrap_or(0)
    }

    /// Apply the next log entry (the state machine).
    fn apply_one(&mut self) -> Result<(), String> {
        let Some(e) = self.log.pop_front() else {
            return Ok(());
        };
        match e {
            Entry::Fence { key, token } => {
                let f = self.fence.entry(key).or_insert(0);
                *f = (*f).max(token);
            }
            Entry::Commit { client, key, token } => {
                self.pending.insert((client, key), false);
                if token < self.floor(key) {
                    self.report.commits_fenced += 1;
                    return Ok(());
                }
                let last = self.last_applied.get(&key).copied().unwrap_or(0);
                if token < last {
                    return Err(format!(
                        "fencing broken: client {client}'s commit under token {token:#x} applied \
                         after one under {last:#x} on {key:?}"
                    ));
                }
                self.last_applied.insert(key, token);
                self.report.commits_applied += 1;
            }
        }
        Ok(())
    }

    /// Write a fence through the log and wait for it (the server's `fence`), then tell
    /// the table.
    fn write_fence(&mut self, key: FileKey, token: u64) -> Result<(), String> {
        self.report.fences += 1;
        if !self.cfg.skip_fence {
            self.log.push_back(Entry::Fence { key, token });
            while !self.log.is_empty() {
                self.apply_one()?;
            }
        }
        self.table.fenced(key, token);
        Ok(())
    }

    fn granted(&mut self, c: u64, key: FileKey, token: u64) -> Result<(), String> {
        if token < self.floor(key) {
            return Err(format!(
                "token {token:#x} granted below the fence {:#x} of {key:?}",
                self.floor(key)
            ));
        }
        if self.tokens.get(&(c, key)) != Some(&token) {
            // A new grant (not the lease it already held): above every earlier one.
            if token <= self.max_granted {
                return Err(format!(
                    "token {token:#x} granted after {:#x}",
                    self.max_granted
                ));
            }
            self.max_granted = token;
            self.report.grants += 1;
        }
        self.tokens.insert((c, key), token);
        Ok(())
    }

    /// Client `c` asks for the lease on `key` (reclaiming `reclaim` if not 0), as the
    /// server's `lease` does: fence and ask again when told to.
    fn ask(&mut self, c: u64, key: FileKey, reclaim: u64) -> Result<(), String> {
        for _ in 0..2 {
            match self.table.lease(self.now, c, key, reclaim) {
                Ok(Ok(Answer::Lease(t))) => {
                    if reclaim != 0 {
                        self.report.reclaims += 1;
                    }
                    return self.granted(c, key, t);
                }
                Ok(Ok(Answer::LeaseLost)) => {
                    self.report.reclaims_lost += 1;
                    self.tokens.remove(&(c, key));
                    return Ok(());
                }
                Ok(other) => return Err(format!("lease answered {other:?}")),
                Err(Gate::Wait | Gate::Clear) => {
                    self.report.waits += 1;
                    return Ok(());
                }
                Err(Gate::Fence(t)) => self.write_fence(key, t)?,
            }
        }
        Ok(())
    }

    fn step(&mut self) -> Result<(), String> {
        let c = self.client();
        let key = self.key();
        match self.rng.below(100) {
            // Write (take the lease) or commit under it.
            0..=29 => match self.tokens.get(&(c, key)).copied() {
                None => self.ask(c, key, 0)?,
                Some(t) if !self.pending.get(&(c, key)).copied().unwrap_or(false) => {
                    if self.table.may_commit(self.now, c, key, t) {
                        self.proposals.push(Entry::Commit {
                            client: c,
                            key,
                            token: t,
                        });
                        self.pending.insert((c, key), true);
                    } else {
                        self.report.commits_refused += 1;
                        self.ask(c, key, t)?;
                    }
                }
                Some(_) => {}
            },
            // Give the lease back (nothing of it on its way).
            30..=39 => {
                if let Some(t) = self.tokens.get(&(c, key)).copied() {
                    if !self.pending.get(&(c, key)).copied().unwrap_or(false) {
                        self.table.release(self.now, c, key, t);
                        self.tokens.remove(&(c, key));
                    }
                }
            }
            // An open by `c`.
            40..=49 => {
                self.report.opens += 1;
                if let Gate::Fence(t) = self.table.open(self.now, c, key) {
                    self.write_fence(key, t)?;
                }
            }
            // A checked proposal reaches the log (in any order: server threads race).
            50..=64 => {
                if !self.proposals.is_empty() {
                    let i = self.rng.below(self.proposals.len() as u64) as usize;
                    let e = self.proposals.swap_remove(i);
                    self.log.push_back(e);
                }
            }
            65..=79 => self.apply_one()?,
            // Time passes.
            80..=91 => self.now += self.rng.below(LOCK_LEASE_MS / 2),
            // A client falls silent: its session ends; it does not know.
            92..=96 => {
                self.report.silences += 1;
                self.table.session_ended(c);
            }
            // A leader change: a new table, a new epoch; unappended proposals are lost.
            _ => {
                self.report.leader_changes += 1;
                self.epoch += 1;
                self.table = LeaseTable::new(self.epoch, self.now);
                for e in self.proposals.drain(..) {
                    if let Entry::Commit { client, key, .. } = e {
                        self.pending.insert((client, key), false);
                    }
                }
            }
        }
        self.table.take_pushes();
        self.table.check();
        Ok(())
    }
}

/// Run one seed.
pub fn run(cfg: &LeaseSimConfig) -> Result<LeaseSimReport, String> {
    let mut sim = Sim {
        rng: SimRng::new(cfg.seed),
        cfg: cfg.clone(),
        now: 0,
        epoch: 1,
        table: LeaseTable::new(1, 0),
        proposals: Vec::new(),
        log: VecDeque::new(),
        fence: BTreeMap::new(),
        last_applied: BTreeMap::new(),
        tokens: BTreeMap::new(),
        pending: BTreeMap::new(),
        max_granted: 0,
        report: LeaseSimReport::default(),
    };
    for i in 0..cfg.steps {
        sim.step()
            .map_err(|e| format!("seed {} step {i}: {e}", cfg.seed))?;
    }
    Ok(sim.report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(seed: u64, skip_fence: bool) -> LeaseSimConfig {
        LeaseSimConfig {
            seed,
            steps: 5000,
            clients: 3,
            files: 2,
            skip_fence,
        }
    }

    #[test]
    fn many_seeds_keep_every_invariant() {
        let mut total = LeaseSimReport::default();
        for seed in 0..200 {
            let r = run(&cfg(seed, false)).unwrap_or_else(|e| panic!("{e}"));
            total.add(&r);
        }
        eprintln!("lease sim, 200 seeds x 5000 steps: {total:?}");
        assert!(total.commits_applied > 10_000, "{total:?}");
        assert!(
            total.commits_fenced > 0,
            "no commit raced a fence: {total:?}"
        );
        assert!(total.reclaims > 0 && total.reclaims_lost > 0, "{total:?}");
        assert!(total.fences > 0 && total.leader_changes > 0, "{total:?}");
    }

    #[test]
    fn a_missing_fence_is_caught() {
        let caught = (0..200).find(|&seed| run(&cfg(seed, true)).is_err());
        let seed = caught.expect("no seed caught the planted bug (no fence)");
        eprintln!("planted bug caught: {}", run(&cfg(seed, true)).unwrap_err());
    }
}
