//! The deterministic simulator of repair and rebalance: the real decision rules of
//! `repair.rs` ([`targets`], [`sends`]) over simulated nodes, holdings and a changing map
//! (nodes go down and come back, join, drain and leave), with lost copies, nodes acting
//! on a stale map, and writes that made fewer copies than they should. One thread, one
//! seed: a failing seed replays exactly.
//!
//! Oracle:
//! - **One sender:** whenever a live target lacks a chunk that some node in the bucket's
//!   read order holds, exactly one live holder decides to send it (every holder asks
//!   the same question of the same answers); with only holders outside the read order
//!   (draining), at least one does.
//! - **Never below min_copies:** a chunk written with `min_copies` copies keeps at least
//!   that many holders among the nodes not out (a node leaves only once drained, by the
//!   rule `hive node remove` uses).
//! - **Convergence:** once the map is stable, every node up and no copy lost, one round
//!   of passes (all nodes deciding from the same state) gives every chunk all its targets.
//!
//! Releases (a node dropping a copy it holds beyond its targets) run as in `repair.rs`:
//! each node acts on its own view of the map (views lag the map by random amounts); a
//! pass opens a release window, asks the targets (each answers with its view's epoch) and
//! later, at a random step, releases the chunks every target held under the same epoch,
//! unless its view moved meanwhile or the chunk was put or copied to it since the window
//! opened. The min-copies oracle above covers them.

use crate::repair::{sends, targets};
use hivefs_net::placement::{HiveMap, MapNode, NodeState};
use hivefs_nvme::rng::SplitMix64 as SimRng;
use std::collections::{BTreeMap, BTreeSet};

/// One run.
#[derive(Clone, Debug)]
pub struct RepairSimConfig {
    pub seed: u64,
    /// Events (writes, map changes, passes) to simulate.
    pub steps: u64,
    /// A release guard left out on purpose (the simulator must catch it).
    pub planted: Option<PlantedBug>,
}

/// A guard of releases removed, to show the simulator needs each of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlantedBug {
    /// A release goes ahead though the node's map moved since it decided.
    NoViewCheck,
    /// Targets' answers count whatever map they were given under.
    AnswersUnderAnyMap,
    /// A chunk put or copied here after the window opened is released anyway.
    NoPutCheck,
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RepairSimReport {
    pub writes: u64,
    pub passes: u64,
    pub sent: u64,
    pub lost: u64,
    pub stale_passes: u64,
    pub map_changes: u64,
    pub drained: u64,
    pub sender_checks: u64,
    pub released: u64,
    pub releases_refused: u64,
}

impl RepairSimReport {
    pub fn add(&mut self, o: &RepairSimReport) {
        self.writes += o.writes;
        self.passes += o.passes;
        self.sent += o.sent;
        self.lost += o.lost;
        self.stale_passes += o.stale_passes;
        self.map_changes += o.map_changes;
        self.drained += o.drained;
        self.sender_checks += o.sender_checks;
        self.released += o.released;
        self.releases_refused += o.releases_refused;
    }
}

const BUCKETS: u32 = 64;

struct Sim {
    rng: SimRng,
    map: HiveMap,
    /// The map before the last change (a node may still act on it).
    old_map: HiveMap,
    copies: usize,
    min_copies: usize,
    /// Whether each node's process runs (a down one may still be `Up` in the map).
    alive: BTreeMap<u64, bool>,
    /// Chunk -> its bucket; node -> the chunks it holds.
    chunks: Vec<u32>,
    /// Chunks written with `min_copies` copies (the acknowledged ones).
    acked: BTreeSet<usize>,
    holds: BTreeMap<u64, BTreeSet<usize>>,
    next_id: u64,
    r: RepairSimReport,
    /// Each node's own view of the map (its releases go by it, and so do its answers).
    views: BTreeMap<u64, HiveMap>,
    /// Releases decided and not yet carried out: (node, chunk, view epoch, step decided).
    releases: Vec<(u64, usize, u64, u64)>,
    /// The last step each (node, chunk) was put or copied there.
    put_at: BTreeMap<(u64, usize), u64>,
    step: u64,
    planted: Option<PlantedBug>,
    /// `REPAIR_SIM_TRACE=<chunk>`: print the release decisions about one chunk.
    trace: Option<usize>,
}

fn node(id: u64, state: NodeState) -> MapNode {
    MapNode {
        id,
        name: format!("n{id}"),
        host: "127.0.0.1".into(),
        meta_port: 1000 + id as u16,
        base_port: 2000 + 10 * id as u16,
        shards: 1 + (id % 2) as u16,
        weight: 1 + (id % 3) as u32,
        zone: format!("z{}", id % 3),
        state,
    }
}

impl Sim {
    fn order(map: &HiveMap, b: u32) -> Vec<u64> {
        map.replicas(b, usize::MAX)
    }

    fn holds(&self, n: u64, c: usize) -> bool {
        self.holds.get(&n).is_some_and(|h| h.contains(&c))
    }

    fn is_alive(&self, n: u64) -> bool {
        self.alive.get(&n).copied().unwrap_or(false)
    }

    fn change_map(&mut self, f: impl FnOnce(&mut HiveMap)) {
        self.old_map = self.map.clone();
        f(&mut self.map);
        self.map.epoch += 1;
        self.r.map_changes += 1;
    }

    /// A client write: the primary and some of the other targets get it (the others are
    /// owed); acknowledged when `min_copies` got it.
    fn write(&mut self) {
        let b = self.rng.below(BUCKETS as u64) as u32;
        let c = self.chunks.len();
        self.chunks.push(b);
        let t: Vec<u64> = targets(&self.map, &Self::order(&self.map, b), self.copies)
            .into_iter()
            .filter(|n| self.is_alive(*n))
            .collect();
        let Some(first) = t.first() else { return };
        let mut got = vec![*first];
        for n in &t[1..] {
            if self.rng.below(4) != 0 {
                got.push(*n);
            }
        }
        let eligible = self.map.eligible_count();
        if got.len() >= self.min_copies.min(eligible) {
            self.acked.insert(c);
        }
        for n in got {
            self.holds.entry(n).or_default().insert(c);
            self.put_at.insert((n, c), self.step);
        }
        self.r.writes += 1;
    }

    /// Node `me` runs a pass under `map`: sends what its targets lack and it should send.
    fn pass(&mut self, me: u64, map: &HiveMap, faults: bool) {
        let mine: Vec<usize> = self.holds.get(&me).into_iter().flatten().copied().collect();
        let mut deliveries = Vec::new();
        for c in mine {
            let b = self.chunks[c];
            let order = Self::order(map, b);
            for t in targets(map, &order, self.copies) {
                if t == me || !self.is_alive(t) || self.holds(t, c) {
                    continue;
                }
                if sends(map, &order, me, t, |n| self.is_alive(n) && self.holds(n, c)) {
                    deliveries.push((t, c));
                }
            }
        }
        for (t, c) in deliveries {
            if faults && self.rng.below(10) == 0 {
                self.r.lost += 1;
                continue;
            }
            self.r.sent += 1;
            self.holds.entry(t).or_default().insert(c);
            self.put_at.insert((t, c), self.step);
        }
        self.r.passes += 1;
    }

    /// Node `me` decides which of its copies to release, by its own view: those whose
    /// every target (under that view) holds them and answers under the same epoch.
    fn decide_releases(&mut self, me: u64) {
        let Some(view) = self.views.get(&me).cloned() else {
            return;
        };
        let mine: Vec<usize> = self.holds.get(&me).into_iter().flatten().copied().collect();
        for c in mine {
            let order = Self::order(&view, self.chunks[c]);
            let t = targets(&view, &order, self.copies);
            let any_map = self.planted == Some(PlantedBug::AnswersUnderAnyMap);
            let confirmed = t.iter().all(|n| {
                self.is_alive(*n)
                    && self.holds(*n, c)
                    && (any_map || self.views.get(n).is_some_and(|v| v.epoch == view.epoch))
            });
            if self.trace == Some(c) {
                eprintln!(
                    "step {} node {me} (view {}) targets {t:?} confirmed {confirmed}; views {:?}",
                    self.step,
                    view.epoch,
                    self.views
                        .iter()
                        .map(|(n, v)| (*n, v.epoch))
                        .collect::<Vec<_>>()
                );
            }
            // All the copies the chunk should have must be on targets: with a target down
            // (skipped) there are fewer, and this copy may be one of the few (found by
            // this simulator, seed 6: a draining node released the second copy).
            let full = t.len() >= self.copies.min(view.eligible_count());
            if full && !t.contains(&me) && confirmed {
                self.releases.push((me, c, view.epoch, self.step));
            }
        }
    }

    /// One decided release is carried out, or refused (the node's view moved, or the
    /// chunk was put there since the decision).
    fn release_one_with(&mut self, rng: &mut SimRng) {
        if self.releases.is_empty() {
            return;
        }
        let i = rng.below(self.releases.len() as u64) as usize;
        let (me, c, epoch, decided) = self.releases.swap_remove(i);
        let view_now = match self.planted {
            Some(PlantedBug::NoViewCheck) => Some(epoch),
            _ => self.views.get(&me).map(|v| v.epoch),
        };
        let put_since = self.planted != Some(PlantedBug::NoPutCheck)
            && self.put_at.get(&(me, c)).is_some_and(|s| *s >= decided);
        if view_now != Some(epoch) || put_since || !self.is_alive(me) {
            self.r.releases_refused += 1;
            return;
        }
        if self.trace == Some(c) {
            eprintln!("step {} node {me} releases chunk {c} (decided at {decided}, epoch {epoch}); holds {:?}; map {:?}", self.step,
                self.holds.iter().filter(|(_, h)| h.contains(&c)).map(|(n, _)| *n).collect::<Vec<_>>(),
                self.map.nodes.iter().map(|n| (n.id, n.state)).collect::<Vec<_>>());
        }
        if let Some(h) = self.holds.get_mut(&me) {
            if h.remove(&c) {
                self.r.released += 1;
            }
        }
    }

    /// A random node takes the current map as its view.
    fn adopt_map_with(&mut self, rng: &mut SimRng) {
        let ids: Vec<u64> = self.views.keys().copied().collect();
        let n = ids[rng.below(ids.len() as u64) as usize];
        self.views.insert(n, self.map.clone());
    }

    /// The one-sender rule, for every live target lacking a chunk, under the current map.
    fn check_one_sender(&mut self) -> Result<(), String> {
        for c in 0..self.chunks.len() {
            let b = self.chunks[c];
            let order = Self::order(&self.map, b);
            let read = self.map.read_order(&order);
            let holders: Vec<u64> = self
                .holds
                .iter()
                .filter(|(n, h)| h.contains(&c) && self.is_alive(**n))
                .map(|(n, _)| *n)
                .filter(|n| self.map.node(*n).is_some_and(|m| m.state != NodeState::Out))
                .collect();
            for t in targets(&self.map, &order, self.copies) {
                if !self.is_alive(t) || self.holds(t, c) {
                    continue;
                }
                let senders: Vec<u64> = holders
                    .iter()
                    .copied()
                    .filter(|x| *x != t)
                    .filter(|x| {
                        sends(&self.map, &order, *x, t, |n| {
                            self.is_alive(n) && self.holds(n, c)
                        })
                    })
                    .collect();
                self.r.sender_checks += 1;
                let in_order = holders.iter().any(|h| *h != t && read.contains(h));
                if in_order && senders.len() != 1 {
                    return Err(format!(
                        "chunk {c} (bucket {b}) for node {t}: senders {senders:?}, holders {holders:?}, read order {read:?}"
                    ));
                }
                if !holders.iter().all(|h| *h == t) && senders.is_empty() {
                    return Err(format!(
                        "chunk {c} (bucket {b}) for node {t}: nobody sends; holders {holders:?}"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Acknowledged chunks keep `min_copies` holders among the nodes not out.
    fn check_min_copies(&self) -> Result<(), String> {
        let need = self.min_copies.min(self.map.eligible_count());
        for &c in &self.acked {
            let n = self
                .holds
                .iter()
                .filter(|(n, h)| {
                    h.contains(&c)
                        && self
                            .map
                            .node(**n)
                            .is_some_and(|m| m.state != NodeState::Out)
                })
                .count();
            if n < need {
                return Err(format!(
                    "acknowledged chunk {c} has {n} holders, fewer than {need}"
                ));
            }
        }
        Ok(())
    }

    /// A draining node leaves once every chunk it holds is held by as many of its targets
    /// as the hive keeps copies (`hive node remove`'s rule: a target that is down does not
    /// count, so no node leaves while that would leave a chunk short).
    fn drained(&self, d: u64) -> bool {
        let need = self.copies.min(self.map.eligible_count());
        self.holds.get(&d).into_iter().flatten().all(|&c| {
            let order = Self::order(&self.map, self.chunks[c]);
            targets(&self.map, &order, self.copies)
                .into_iter()
                .filter(|t| self.holds(*t, c))
                .count()
                >= need
        })
    }

    fn map_event(&mut self) {
        let ids: Vec<u64> = self.map.nodes.iter().map(|n| n.id).collect();
        let pick = ids[self.rng.below(ids.len() as u64) as usize];
        let state = self.map.node(pick).map(|n| n.state);
        match (self.rng.below(6), state) {
            // A node's process dies; the map notices (or not yet).
            (0, Some(NodeState::Up)) if self.map.eligible_count() > 2 => {
                self.alive.insert(pick, false);
                if self.rng.coin() {
                    self.change_map(|m| set_state(m, pick, NodeState::Down));
                }
            }
            // It comes back.
            (1, Some(NodeState::Down | NodeState::Up)) if !self.is_alive(pick) => {
                self.alive.insert(pick, true);
                self.change_map(|m| set_state(m, pick, NodeState::Up));
            }
            // A node joins.
            (2, _) if self.map.nodes.len() < 7 => {
                let id = self.next_id;
                self.next_id += 1;
                self.alive.insert(id, true);
                self.change_map(|m| m.nodes.push(node(id, NodeState::Up)));
                self.views.insert(id, self.map.clone());
            }
            // An operator drains one.
            (3, Some(NodeState::Up))
                if self.map.eligible_count() > self.copies && self.is_alive(pick) =>
            {
                self.change_map(|m| set_state(m, pick, NodeState::Draining));
            }
            // A drained node leaves.
            (4, Some(NodeState::Draining)) if self.drained(pick) => {
                self.change_map(|m| set_state(m, pick, NodeState::Out));
                self.r.drained += 1;
            }
            _ => {}
        }
    }
}

fn set_state(m: &mut HiveMap, id: u64, s: NodeState) {
    if let Some(n) = m.nodes.iter_mut().find(|n| n.id == id) {
        n.state = s;
    }
}

/// Run one seed. `Err` describes the first invariant broken.
pub fn run(cfg: &RepairSimConfig) -> Result<RepairSimReport, String> {
    let mut rng = SimRng::new(cfg.seed);
    let n = 3 + rng.below(3);
    let copies = 2 + rng.below(2) as usize;
    let map = HiveMap {
        epoch: 1,
        bucket_count: BUCKETS,
        nodes: (1..=n).map(|id| node(id, NodeState::Up)).collect(),
    };
    let map0 = map.clone();
    let mut release_rng = SimRng::new(cfg.seed ^ 0x5e1e_a5e5);
    let mut sim = Sim {
        rng,
        old_map: map.clone(),
        map,
        copies,
        min_copies: 2,
        alive: (1..=n).map(|id| (id, true)).collect(),
        chunks: Vec::new(),
        acked: BTreeSet::new(),
        holds: BTreeMap::new(),
        next_id: n + 1,
        r: RepairSimReport::default(),
        views: (1..=n).map(|id| (id, map0.clone())).collect(),
        releases: Vec::new(),
        put_at: BTreeMap::new(),
        step: 0,
        planted: cfg.planted,
        trace: std::env::var("REPAIR_SIM_TRACE")
            .ok()
            .and_then(|v| v.parse().ok()),
    };
    for step in 0..cfg.steps {
        sim.step = step;
        // Releases draw from their own stream: the recorded seeds keep their runs.
        match release_rng.below(8) {
            0 => sim.adopt_map_with(&mut release_rng),
            1 => {
                let live: Vec<u64> = sim
                    .views
                    .keys()
                    .copied()
                    .filter(|n| sim.is_alive(*n))
                    .collect();
                if let Some(&me) = live.get(release_rng.below(live.len().max(1) as u64) as usize) {
                    sim.decide_releases(me);
                }
            }
            2 => sim.release_one_with(&mut release_rng),
            _ => {}
        }
        match sim.rng.below(10) {
            0..=3 => sim.write(),
            4 => sim.map_event(),
            _ => {
                let live: Vec<u64> = sim
                    .map
                    .nodes
                    .iter()
                    .filter(|m| m.state != NodeState::Out && sim.is_alive(m.id))
                    .map(|m| m.id)
                    .collect();
                if let Some(&me) = live.get(sim.rng.below(live.len().max(1) as u64) as usize) {
                    let stale = sim.rng.below(5) == 0;
                    let map = if stale {
                        sim.r.stale_passes += 1;
                        sim.old_map.clone()
                    } else {
                        sim.map.clone()
                    };
                    sim.pass(me, &map, true);
                }
            }
        }
        sim.check_min_copies()
            .map_err(|e| format!("seed {} step {step}: {e}", cfg.seed))?;
        if step % 200 == 0 {
            sim.check_one_sender()
                .map_err(|e| format!("seed {} step {step}: {e}", cfg.seed))?;
        }
    }
    // Settle: every node back, the map says so, no loss: one round converges.
    let ids: Vec<u64> = sim.map.nodes.iter().map(|m| m.id).collect();
    for id in ids {
        if sim.map.node(id).is_some_and(|m| m.state != NodeState::Out) {
            sim.alive.insert(id, true);
            if sim.map.node(id).is_some_and(|m| m.state == NodeState::Down) {
                sim.change_map(|m| set_state(m, id, NodeState::Up));
            }
        }
    }
    sim.check_one_sender()
        .map_err(|e| format!("seed {} settled: {e}", cfg.seed))?;
    let before = sim.holds.clone();
    let map = sim.map.clone();
    let live: Vec<u64> = map
        .nodes
        .iter()
        .filter(|m| m.state != NodeState::Out)
        .map(|m| m.id)
        .collect();
    // Every node decides from the same state (as concurrent passes do).
    let mut deliveries = Vec::new();
    for &me in &live {
        let mut one = Sim {
            rng: SimRng::new(0),
            map: map.clone(),
            old_map: map.clone(),
            copies: sim.copies,
            min_copies: sim.min_copies,
            alive: sim.alive.clone(),
            chunks: sim.chunks.clone(),
            acked: BTreeSet::new(),
            holds: before.clone(),
            next_id: 0,
            r: RepairSimReport::default(),
            views: BTreeMap::new(),
            releases: Vec::new(),
            put_at: BTreeMap::new(),
            step: 0,
            planted: None,
            trace: None,
        };
        one.pass(me, &map, false);
        for (n, h) in &one.holds {
            for c in h.difference(before.get(n).unwrap_or(&BTreeSet::new())) {
                deliveries.push((*n, *c));
            }
        }
    }
    for (n, c) in deliveries {
        sim.holds.entry(n).or_default().insert(c);
        sim.r.sent += 1;
    }
    for c in 0..sim.chunks.len() {
        let order = Sim::order(&map, sim.chunks[c]);
        let held_somewhere = live.iter().any(|n| sim.holds(*n, c));
        for t in targets(&map, &order, sim.copies) {
            if held_somewhere && !sim.holds(t, c) {
                return Err(format!(
                    "seed {}: after a settled round chunk {c} is still missing on node {t}",
                    cfg.seed
                ));
            }
        }
    }
    Ok(sim.r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_seeds_keep_every_invariant() {
        let mut total = RepairSimReport::default();
        // REPAIR_SIM_SEED=N replays one seed.
        let seeds = match std::env::var("REPAIR_SIM_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            Some(one) => one..one + 1,
            None => 0..150,
        };
        for seed in seeds {
            let r = run(&RepairSimConfig {
                seed,
                steps: 1500,
                planted: None,
            })
            .unwrap_or_else(|e| panic!("{e}"));
            total.add(&r);
        }
        eprintln!("repair sim, 150 seeds x 1500 steps: {total:?}");
        assert!(total.sent > 0 && total.drained > 0 && total.stale_passes > 0);
        assert!(total.sender_checks > 10_000, "{total:?}");
        assert!(
            total.released > 1000 && total.releases_refused > 0,
            "{total:?}"
        );
    }

    /// Found by this simulator: a drain counted a chunk done when every *live* target
    /// held it, so with another target down a node left and the chunk had one copy.
    #[test]
    fn regression_seed_6_drain_while_a_target_is_down() {
        run(&RepairSimConfig {
            seed: 6,
            steps: 2000,
            planted: None,
        })
        .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Each guard of releases is needed: without it some seed loses a copy below
    /// min_copies. (Also found seed 6's rule: release only where the targets are all the
    /// copies the chunk should have.)
    #[test]
    fn every_release_guard_is_needed() {
        for bug in [
            PlantedBug::NoViewCheck,
            PlantedBug::AnswersUnderAnyMap,
            PlantedBug::NoPutCheck,
        ] {
            let caught = (0..300).find_map(|seed| {
                run(&RepairSimConfig {
                    seed,
                    steps: 1500,
                    planted: Some(bug),
                })
                .err()
            });
            let e = caught.unwrap_or_else(|| panic!("{bug:?} not caught in 300 seeds"));
            eprintln!("{bug:?}: {e}");
            assert!(e.contains("fewer than"), "{e}");
        }
    }
}
