//! The hive map: which nodes a multi-node hive has, and which of them hold each bucket.
//!
//! A [`HiveMap`] lists the hive's nodes (Raft node id, name, address, ports, shard count,
//! weight, failure zone, [`NodeState`]) under a map epoch. Chunk ids fall into
//! `bucket_count` buckets by id prefix ([`ChunkId::bucket`]); this module maps every bucket
//! to its ordered replica nodes by weighted rendezvous hashing (DESIGN §3 "Buckets", §4
//! "Placement, replication and failure"). Which shard of a node holds a bucket is that
//! node's own business and not in this map.
//!
//! # The formula (changing any part of it moves data)
//!
//! For bucket `b` (`u32`) and node id `n` (`u64`):
//!
//! ```text
//! h     = first 8 bytes, read little-endian, of
//!         BLAKE3-256("hivefs-placement-v1\0" ‖ b as u32 LE ‖ n as u64 LE)   (32 bytes hashed)
//! x     = h | 1                      an odd integer in [1, 2^64 - 1]
//! u     = x / 2^64                   uniform in (0, 1), never 0 or 1
//! score = -weight / ln(u)
//! ```
//!
//! Each node's `-ln(u)` is an independent Exp(1) variable, so `score` is largest for node
//! `i` with probability `weight_i / Σ weight`: the first replica of a bucket follows the
//! weights exactly.
//!
//! The score is never computed in floating point: `ln` comes from the platform's libm,
//! which is not required to round identically everywhere, and a one-ulp difference could
//! flip a near tie between two machines. Instead `L = -log2(u) = 64 - log2(x)` is computed
//! in integer fixed point with [`FRAC_BITS`] fraction bits (a 256-entry table built at
//! compile time by the bit-by-bit squaring method, and a 6-term series for the rest; see
//! `log2_fixed` and [`neg_log2_fixed`]), floored at one unit, and nodes are
//! compared by `weight_a · L_b` against `weight_b · L_a` in `u128` (no rounding). That is the
//! order of `-weight / ln(u)` (`ln u = -L · ln 2`, a common factor) up to the error of `L`,
//! a few units of 2^-56. Equal scores are ordered by ascending node id. Every step is
//! integer arithmetic on little-endian encodings, so every platform, compiler and version
//! computes the same placement. The test `pinned_placement_values` pins hashes, replicas
//! and a digest of a whole placement, computed independently from the formula above (in
//! Python, with decimal logarithms).
//!
//! # Replica order: distinct zones first
//!
//! [`HiveMap::replicas`] sorts the eligible nodes by descending score and then
//! 1. walks that order taking each node whose zone is not yet used, until `copies` are
//!    taken or the nodes run out (one copy per zone while there are zones to spare);
//! 2. fills the remaining slots with the best remaining nodes, whatever their zone.
//!
//! The first replica is always the best-scoring eligible node. With at least `copies`
//! zones a bucket's replicas span `copies` zones; with fewer zones every zone holds one of
//! the first copies. A zone is just a string compared byte for byte; nodes with an empty
//! zone share the zone `""`. With `copies > 1`, spreading over zones overrides the weights
//! for the later replicas: a zone with less than `1/copies` of the weight still gets one
//! copy of most buckets, so its nodes hold more than their weight's share.
//!
//! # Eligibility
//!
//! A node is chosen only if its state is [`NodeState::Up`] or [`NodeState::Down`] and its
//! weight is above 0. A down node keeps its place (repair owes its copies, and nothing moves
//! while it may come back); [`NodeState::Draining`] and [`NodeState::Out`] nodes and weight-0
//! nodes are never chosen, so marking a node draining or out moves its buckets. A bucket
//! gets fewer than `copies` replicas when fewer nodes are eligible.
//!
//! # What moves when the map changes
//!
//! - **Adding an eligible node** `N`: every bucket's new replica set is a subset of its old
//!   set plus `N`, so data moves only *to* `N`, never between old nodes. Adding the `k`-th
//!   equal-weight node moves about `copies/k` of the buckets and `1/k` of the replica slots
//!   (measured by the tests: 0.253 of the slots for the 4th node at `copies = 3`, 0.103
//!   for the 10th).
//! - **Removing a node** (out, draining, weight 0, or gone from the map): only buckets that
//!   held it change, and each loses that node and gains one other (if one is left).
//! - The order within a set may change without the set changing; [`moved_buckets`] and
//!   [`Movement`] compare sets.
//!
//! Both hold because a node's score depends only on the bucket, its own id and its own
//! weight, and the zone-first rule keeps them. The first pass takes the best node of each
//! zone, zones in the order of those best nodes, up to `copies`. A new node `N` can (a) take
//! its zone's place from that zone's former best `X`, and `X` then competes with the other
//! leftovers for the remaining slots, (b) bring a new zone into the first pass, pushing out
//! the last zone taken or taking a slot of the second pass, or (c) compete in the second
//! pass: in every case each node of the new set is `N` or was in the old set. A node that
//! held no copy of a bucket was passed over by both passes, so without it both passes
//! choose the same. `adding_a_node_moves_only_to_it` and
//! `removing_a_node_moves_only_its_buckets` check this bucket by bucket.
//!
//! # Cost
//!
//! One bucket costs one 32-byte BLAKE3 hash and one fixed-point logarithm (a table look-up
//! and seven 64×64-bit multiplications) per eligible node, plus a sort of the eligible nodes:
//! `O(B · N · log N)` time for [`HiveMap::placement`] over `B` buckets and `N` nodes, and
//! `B · min(copies, N)` node ids (8 bytes each) of memory: 4096 buckets at 3 copies are
//! 96 KiB. Measured at about 0.1 µs per bucket and node (60 ns of it the hash) in this
//! workspace's test profile, one core: 4096 buckets take about 1.2 ms for 3 nodes, 27 ms for
//! 64 nodes and 0.47 s for 1024 nodes, the most a map may hold (the test `placement_cost`
//! prints the 64-node time). A map change is rare; callers compute the placement once per epoch and keep it, and
//! [`HiveMap::replicas`] answers one bucket at the cost of `N` hashes.
//!
//! # Encoding
//!
//! [`HiveMap::encode`] / [`HiveMap::decode`], little-endian, strings as in [`crate::proto`]
//! (`u32` length + UTF-8):
//!
//! ```text
//! version u16 (= MAP_FORMAT_VERSION), epoch u64, bucket_count u32, count u32,
//! count × (id u64, name str, host str, meta_port u16, base_port u16, shards u16,
//!          weight u32, zone str, state u8)
//! ```
//!
//! Decoding bounds every count and length before allocating (at most [`MAX_MAP_NODES`]
//! nodes, strings at most [`MAX_MAP_STRING_BYTES`]), rejects trailing bytes and finishes with
//! [`HiveMap::validate`]. The serde derives are for storing the map in the metadata store;
//! a map deserialized through serde must be checked with [`HiveMap::validate`] too.

use crate::chunk::ChunkId;
use crate::proto::{DecodeError, Reader, MAX_BUCKETS};
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::collections::BTreeMap;

/// Version of the [`HiveMap`] encoding.
pub const MAP_FORMAT_VERSION: u16 = 1;
/// Most nodes in a [`HiveMap`].
pub const MAX_MAP_NODES: usize = 1024;
/// Longest node name, host or zone, in bytes.
pub const MAX_MAP_STRING_BYTES: usize = 255;
/// Fraction bits of the fixed-point `-log2(u)` that scores are compared with.
pub const FRAC_BITS: u32 = 56;
/// Domain-separation prefix of the placement hash (part of the formula: never change it).
const HASH_DOMAIN: &[u8; 20] = b"hivefs-placement-v1\0";
/// Encoded bytes of a node with empty strings: id, 3 string lengths, 3 ports/shards,
/// weight, state.
const NODE_MIN_BYTES: usize = 8 + 3 * 4 + 3 * 2 + 4 + 1;

/// A node's state in the map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum NodeState {
    /// Serving; holds its buckets.
    Up = 0,
    /// Missed its heartbeats. Keeps its place in the placement; repair owes its copies.
    Down = 1,
    /// Leaving: chosen for nothing, so its buckets move elsewhere while it still serves.
    Draining = 2,
    /// Gone (a longer timeout, or removed by an operator): its buckets have moved.
    Out = 3,
}

impl NodeState {
    pub fn from_u8(v: u8) -> Option<NodeState> {
        match v {
            0 => Some(NodeState::Up),
            1 => Some(NodeState::Down),
            2 => Some(NodeState::Draining),
            3 => Some(NodeState::Out),
            _ => None,
        }
    }
}

/// One node of the hive.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MapNode {
    /// Raft node id: nonzero, unique in the map, never reused.
    pub id: u64,
    /// Operator-facing name, unique in the map, 1..=255 bytes.
    pub name: String,
    /// IP address or host name, 1..=255 bytes.
    pub host: String,
    /// The metadata port.
    pub meta_port: u16,
    /// Shard `i` listens on `base_port + i`.
    pub base_port: u16,
    /// At least 1, and `base_port + shards - 1` is a valid port.
    pub shards: u16,
    /// Relative share of new data; 0 = takes no new data.
    pub weight: u32,
    /// Failure zone (rack, room, site), at most 255 bytes.
    pub zone: String,
    pub state: NodeState,
}

impl MapNode {
    /// Whether placement may choose this node: up or down, with a weight above 0.
    pub fn is_eligible(&self) -> bool {
        matches!(self.state, NodeState::Up | NodeState::Down) && self.weight > 0
    }
}

/// The hive's nodes under one epoch, and (computed from them) every bucket's replicas.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HiveMap {
    /// Raised by every change.
    pub epoch: u64,
    /// A power of two, at most [`MAX_BUCKETS`]; fixed at `hive init`.
    pub bucket_count: u32,
    /// Sorted by ascending id, ids unique; at most [`MAX_MAP_NODES`].
    pub nodes: Vec<MapNode>,
}

/// Every bucket's ordered replicas, as computed by [`HiveMap::placement`]. Flat: `stride`
/// node ids per bucket, padded with 0 (never a node id) where a bucket has fewer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    bucket_count: u32,
    stride: usize,
    slots: Vec<u64>,
}

impl Placement {
    pub fn bucket_count(&self) -> u32 {
        self.bucket_count
    }

    /// Replica slots per bucket: `min(copies, eligible nodes)`.
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// `bucket`'s replica node ids, best first; empty for a bucket out of range.
    pub fn replicas(&self, bucket: u32) -> &[u64] {
        if bucket >= self.bucket_count {
            return &[];
        }
        let start = bucket as usize * self.stride;
        let row = &self.slots[start..start + self.stride];
        let n = row.iter().position(|&id| id == 0).unwrap_or(row.len());
        &row[..n]
    }

    /// `(bucket, replicas)` for every bucket.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &[u64])> + '_ {
        (0..self.bucket_count).map(move |b| (b, self.replicas(b)))
    }

    /// How many of the buckets' replica slots each node holds, by node id (ascending).
    pub fn slots_per_node(&self) -> Vec<(u64, u64)> {
        let mut ids: Vec<u64> = self.slots.iter().copied().filter(|&id| id != 0).collect();
        ids.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for id in ids {
            match out.last_mut() {
                Some((last, n)) if *last == id => *n += 1,
                _ => out.push((id, 1)),
            }
        }
        out
    }
}

/// What changes between two placements.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Movement {
    /// Buckets whose replica *set* differs, ascending.
    pub moved_buckets: Vec<u32>,
    /// Replica slots of the new placement held by a node that did not hold that bucket
    /// before: the copies that have to be made.
    pub new_slots: u64,
    /// Σ over buckets of `max(old replicas, new replicas)`.
    pub total_slots: u64,
}

impl Movement {
    /// `new_slots / total_slots`: the share of replica slots whose data has to move
    /// (0 when there are no slots).
    pub fn fraction(&self) -> f64 {
        if self.total_slots == 0 {
            0.0
        } else {
            self.new_slots as f64 / self.total_slots as f64
        }
    }
}

/// Compare two placements bucket by bucket, as sets. If the bucket counts differ the id
/// space was cut differently and nothing can be assumed to stay: every bucket of `new` is
/// reported moved and all its slots new.
pub fn movement(old: &Placement, new: &Placement) -> Movement {
    let mut m = Movement {
        moved_buckets: Vec::new(),
        new_slots: 0,
        total_slots: 0,
    };
    for (b, n) in new.iter() {
        let o = if old.bucket_count == new.bucket_count {
            old.replicas(b)
        } else {
            &[]
        };
        let added = n.iter().filter(|id| !o.contains(id)).count();
        let removed = o.iter().filter(|id| !n.contains(id)).count();
        if added > 0 || removed > 0 {
            m.moved_buckets.push(b);
        }
        m.new_slots += added as u64;
        m.total_slots += o.len().max(n.len()) as u64;
    }
    m
}

/// Buckets whose replica sets differ between the two maps at `copies` (see [`movement`]).
pub fn moved_buckets(old: &HiveMap, new: &HiveMap, copies: usize) -> Vec<u32> {
    movement(&old.placement(copies), &new.placement(copies)).moved_buckets
}

/// The share of replica slots that change between the two maps at `copies`
/// ([`Movement::fraction`]).
pub fn moved_fraction(old: &HiveMap, new: &HiveMap, copies: usize) -> f64 {
    movement(&old.placement(copies), &new.placement(copies)).fraction()
}

/// The placement hash of `(bucket, node)`: the first 8 bytes, little-endian, of
/// BLAKE3-256(`"hivefs-placement-v1\0"` ‖ bucket LE ‖ node LE).
pub fn placement_hash(bucket: u32, node: u64) -> u64 {
    let mut input = [0u8; 32];
    input[..20].copy_from_slice(HASH_DOMAIN);
    input[20..24].copy_from_slice(&bucket.to_le_bytes());
    input[24..32].copy_from_slice(&node.to_le_bytes());
    let h = blake3::hash(&input);
    let mut first = [0u8; 8];
    first.copy_from_slice(&h.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// `log2(m)` for a mantissa `m` in [1, 2) given as Q1.63 (top bit set), in fixed point with
/// [`FRAC_BITS`] fraction bits, bit by bit: square, and a square of 2 or more is a 1 bit
/// (then halve it). Truncates, so never above the true value. Used at compile time for
/// [`LOG2_TABLE`], and by the tests as the reference for [`log2_fixed`].
const fn log2_mantissa_bitwise(mut y: u64) -> u64 {
    let mut frac = 0u64;
    let mut bit = FRAC_BITS;
    while bit > 0 {
        bit -= 1;
        let sq = (y as u128) * (y as u128); // y² as Q2.126, in [1, 4)
        let top = (sq >> 127) as u32; // y² >= 2
        frac |= (top as u64) << bit;
        y = (sq >> (63 + top)) as u64; // y² or y² / 2, back in [1, 2) as Q1.63
    }
    frac
}

/// Bits of the mantissa (after its leading 1) that index the tables.
const TABLE_BITS: u32 = 8;
/// `LOG2_TABLE[i] = log2(1 + i/256)` with [`FRAC_BITS`] fraction bits, truncated.
static LOG2_TABLE: [u64; 1 << TABLE_BITS] = {
    let mut t = [0u64; 1 << TABLE_BITS];
    let mut i = 0;
    while i < t.len() {
        t[i] = log2_mantissa_bitwise((1 << 63) | ((i as u64) << (63 - TABLE_BITS)));
        i += 1;
    }
    t
};
/// `RECIP_TABLE[i] = floor((2^127 - 1) / c)` for `c = (1 + i/256)` as Q1.63: `1 / (1 + i/256)`
/// as Q0.64 (just under 1 for `i = 0`).
static RECIP_TABLE: [u64; 1 << TABLE_BITS] = {
    let mut t = [0u64; 1 << TABLE_BITS];
    let mut i = 0;
    while i < t.len() {
        let c = (1u128 << 63) | ((i as u128) << (63 - TABLE_BITS));
        t[i] = ((u128::MAX >> 1) / c) as u64;
        i += 1;
    }
    t
};
/// `1 / ln 2` as Q1.63, truncated (1.442695040888963407...).
const LOG2_E_Q63: u64 = 0xb8aa_3b29_5c17_f0bb;

/// `log2(x)` for `x >= 1` in fixed point with [`FRAC_BITS`] fraction bits. Integer
/// arithmetic only, so it is the same function everywhere; it is part of the placement
/// formula and must not change. With `x = 2^k · m`, `m` in [1, 2) and `c = 1 + i/256` the
/// mantissa's first 8 bits: `log2(x) = k + log2(c) + ln(1 + r) / ln 2` with
/// `r = (m - c) / c < 2^-8`, where `log2(c)` comes from [`LOG2_TABLE`] and `ln(1 + r)` is
/// the series `r - r²/2 + r³/3 - r⁴/4 + r⁵/5 - r⁶/6` in Q0.64 (what it leaves out is below
/// 2^-58). Every step rounds toward zero; the result is within a few units of 2^-56 of the
/// true value (the tests find at most 2 units against the bit-by-bit method).
fn log2_fixed(x: u64) -> u64 {
    let x = x.max(1);
    let int = 63 - x.leading_zeros();
    let y = x << (63 - int); // the mantissa m as Q1.63
    let i = ((y >> (63 - TABLE_BITS)) & ((1 << TABLE_BITS) - 1)) as usize;
    let c = (1u64 << 63) | ((i as u64) << (63 - TABLE_BITS));
    let d = y - c; // m - c as Q1.63, below 2^55
    let r = ((d as u128 * RECIP_TABLE[i] as u128) >> 63) as u64; // (m - c) / c as Q0.64
    let mul = |a: u64, b: u64| ((a as u128 * b as u128) >> 64) as u64;
    let r2 = mul(r, r);
    let r3 = mul(r2, r);
    let r4 = mul(r3, r);
    let r5 = mul(r4, r);
    let r6 = mul(r5, r);
    // Each partial sum lies between 0 and r: the terms shrink by at least 2^8 each.
    let ln = r - r2 / 2 + r3 / 3 - r4 / 4 + r5 / 5 - r6 / 6; // ln(1 + r) as Q0.64
    let frac = ((ln as u128 * LOG2_E_Q63 as u128) >> (64 + 63 - FRAC_BITS)) as u64;
    ((int as u64) << FRAC_BITS) + LOG2_TABLE[i] + frac
}

/// `L = -log2(u)` for `u = (h | 1) / 2^64`, in fixed point with [`FRAC_BITS`] fraction bits,
/// at least 1 (so a score is always finite). At most `64 << FRAC_BITS = 2^62`.
pub fn neg_log2_fixed(h: u64) -> u64 {
    (64u64 << FRAC_BITS)
        .saturating_sub(log2_fixed(h | 1))
        .max(1)
}

/// A scored candidate for one bucket.
#[derive(Clone, Copy, Debug)]
struct Scored {
    id: u64,
    weight: u32,
    /// Fixed-point `-log2(u)`; the score is `weight / l`.
    l: u64,
    zone: u32,
}

/// Descending score (`weight / l`), then ascending id: a total order.
fn by_score(a: &Scored, b: &Scored) -> Ordering {
    let sa = a.weight as u128 * b.l as u128;
    let sb = b.weight as u128 * a.l as u128;
    sb.cmp(&sa).then(a.id.cmp(&b.id))
}

/// The eligible nodes of a map with their zones as small integers, and scratch space, so
/// that ranking every bucket allocates nothing.
struct Ranker {
    /// (id, weight, zone index) of each eligible node.
    cands: Vec<(u64, u32, u32)>,
    scored: Vec<Scored>,
    zone_used: Vec<bool>,
    taken: Vec<bool>,
}

impl Ranker {
    fn new(map: &HiveMap) -> Ranker {
        let mut zones: BTreeMap<&str, u32> = BTreeMap::new();
        let mut cands = Vec::new();
        for n in map.nodes.iter().filter(|n| n.is_eligible()) {
            let next = zones.len() as u32;
            let z = *zones.entry(n.zone.as_str()).or_insert(next);
            cands.push((n.id, n.weight, z));
        }
        Ranker {
            scored: Vec::with_capacity(cands.len()),
            taken: vec![false; cands.len()],
            zone_used: vec![false; zones.len()],
            cands,
        }
    }

    /// Append `bucket`'s replicas (at most `copies`) to `out`.
    fn rank(&mut self, bucket: u32, copies: usize, out: &mut Vec<u64>) {
        let copies = copies.min(self.cands.len());
        if copies == 0 {
            return;
        }
        self.scored.clear();
        self.scored
            .extend(self.cands.iter().map(|&(id, weight, zone)| Scored {
                id,
                weight,
                l: neg_log2_fixed(placement_hash(bucket, id)),
                zone,
            }));
        self.scored.sort_unstable_by(by_score);
        self.taken.iter_mut().for_each(|t| *t = false);
        self.zone_used.iter_mut().for_each(|z| *z = false);
        let mut picked = 0;
        // Distinct zones first, in score order.
        for (i, s) in self.scored.iter().enumerate() {
            if picked == copies {
                break;
            }
            if !self.zone_used[s.zone as usize] {
                self.zone_used[s.zone as usize] = true;
                self.taken[i] = true;
                out.push(s.id);
                picked += 1;
            }
        }
        // Then the best of the rest.
        for (i, s) in self.scored.iter().enumerate() {
            if picked == copies {
                break;
            }
            if !self.taken[i] {
                out.push(s.id);
                picked += 1;
            }
        }
    }
}

impl HiveMap {
    /// The node with this id.
    pub fn node(&self, id: u64) -> Option<&MapNode> {
        self.nodes
            .binary_search_by_key(&id, |n| n.id)
            .ok()
            .map(|i| &self.nodes[i])
    }

    /// The bucket of `id`. Never panics: a map that fails [`validate`](Self::validate)
    /// (decoded maps never do) answers bucket 0.
    pub fn bucket_of(&self, id: &ChunkId) -> u32 {
        if !self.bucket_count.is_power_of_two() {
            return 0;
        }
        id.bucket(self.bucket_count)
    }

    /// How many nodes placement may choose ([`MapNode::is_eligible`]).
    pub fn eligible_count(&self) -> usize {
        self.nodes.iter().filter(|n| n.is_eligible()).count()
    }

    /// `bucket`'s replica node ids, best first: at most `copies`, fewer if fewer nodes are
    /// eligible, none if `bucket >= bucket_count`. Costs one hash per eligible node; use
    /// [`placement`](Self::placement) for many buckets.
    pub fn replicas(&self, bucket: u32, copies: usize) -> Vec<u64> {
        let mut out = Vec::new();
        if bucket < self.bucket_count {
            Ranker::new(self).rank(bucket, copies, &mut out);
        }
        out
    }

    /// The replicas of the bucket `id` falls in.
    pub fn replicas_of(&self, id: &ChunkId, copies: usize) -> Vec<u64> {
        self.replicas(self.bucket_of(id), copies)
    }

    /// The primary of a bucket whose rendezvous order is `order`: its first node this map
    /// does not say is down. Puts go there; it forwards the copies.
    pub fn primary(&self, order: &[u64]) -> Option<u64> {
        order
            .iter()
            .copied()
            .find(|n| self.node(*n).is_some_and(|m| m.state != NodeState::Down))
    }

    /// Where to read a bucket whose rendezvous order is `order`: the nodes not down, in
    /// order, then the down ones (a node marked down may still answer).
    pub fn read_order(&self, order: &[u64]) -> Vec<u64> {
        let down = |n: &u64| self.node(*n).is_none_or(|m| m.state == NodeState::Down);
        let mut v: Vec<u64> = order.iter().copied().filter(|n| !down(n)).collect();
        v.extend(order.iter().copied().filter(down));
        v
    }

    /// Every bucket's replicas at `copies`. A map that fails [`validate`](Self::validate)
    /// still gets an answer (callers validate first); at most [`MAX_BUCKETS`] buckets are
    /// computed.
    pub fn placement(&self, copies: usize) -> Placement {
        let mut ranker = Ranker::new(self);
        let bucket_count = self.bucket_count.min(MAX_BUCKETS);
        let stride = copies.min(ranker.cands.len());
        let mut slots = Vec::with_capacity(bucket_count as usize * stride);
        let mut row = Vec::with_capacity(stride);
        for b in 0..bucket_count {
            row.clear();
            ranker.rank(b, stride, &mut row);
            slots.extend_from_slice(&row);
            slots.resize(slots.len() + stride - row.len(), 0);
        }
        Placement {
            bucket_count,
            stride,
            slots,
        }
    }

    /// Check the invariants decoding enforces: bucket count a power of two at most
    /// [`MAX_BUCKETS`]; at most [`MAX_MAP_NODES`] nodes, sorted by id, ids nonzero and
    /// unique, names unique; name and host 1..=255 bytes, zone at most 255; ports nonzero,
    /// at least one shard and every shard port at most 65535.
    pub fn validate(&self) -> Result<(), DecodeError> {
        if !self.bucket_count.is_power_of_two() || self.bucket_count > MAX_BUCKETS {
            return Err(DecodeError::BadValue {
                what: "bucket count",
                value: self.bucket_count as u64,
            });
        }
        if self.nodes.len() > MAX_MAP_NODES {
            return Err(DecodeError::TooLong {
                what: "map nodes",
                len: self.nodes.len(),
                limit: MAX_MAP_NODES,
            });
        }
        for (i, n) in self.nodes.iter().enumerate() {
            if n.id == 0 {
                return Err(DecodeError::BadValue {
                    what: "node id",
                    value: 0,
                });
            }
            if i > 0 && self.nodes[i - 1].id >= n.id {
                return Err(DecodeError::BadValue {
                    what: "node id order (sorted, unique)",
                    value: n.id,
                });
            }
            for (what, s, min) in [
                ("node name", &n.name, 1),
                ("node host", &n.host, 1),
                ("node zone", &n.zone, 0),
            ] {
                if s.len() > MAX_MAP_STRING_BYTES {
                    return Err(DecodeError::TooLong {
                        what,
                        len: s.len(),
                        limit: MAX_MAP_STRING_BYTES,
                    });
                }
                if s.len() < min {
                    return Err(DecodeError::BadValue { what, value: 0 });
                }
            }
            if n.meta_port == 0 || n.base_port == 0 {
                return Err(DecodeError::BadValue {
                    what: "node port",
                    value: n.id,
                });
            }
            if n.shards == 0 || n.base_port as u32 + n.shards as u32 - 1 > u16::MAX as u32 {
                return Err(DecodeError::BadValue {
                    what: "node shard count",
                    value: n.shards as u64,
                });
            }
        }
        let mut names: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return Err(DecodeError::BadValue {
                what: "duplicate node name",
                value: 0,
            });
        }
        Ok(())
    }

    /// Append the encoding (module docs) to `out`. Encoding does not enforce limits: a map
    /// over them is refused by [`decode`](Self::decode).
    pub fn encode(&self, out: &mut Vec<u8>) {
        fn str(out: &mut Vec<u8>, s: &str) {
            out.extend_from_slice(&u32::try_from(s.len()).unwrap_or(u32::MAX).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        out.extend_from_slice(&MAP_FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&self.bucket_count.to_le_bytes());
        let count = u32::try_from(self.nodes.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&count.to_le_bytes());
        for n in &self.nodes {
            out.extend_from_slice(&n.id.to_le_bytes());
            str(out, &n.name);
            str(out, &n.host);
            out.extend_from_slice(&n.meta_port.to_le_bytes());
            out.extend_from_slice(&n.base_port.to_le_bytes());
            out.extend_from_slice(&n.shards.to_le_bytes());
            out.extend_from_slice(&n.weight.to_le_bytes());
            str(out, &n.zone);
            out.push(n.state as u8);
        }
    }

    /// Decode and [`validate`](Self::validate) a map. Every count and length is bounded
    /// before allocation; bytes left over are an error.
    pub fn decode(buf: &[u8]) -> Result<HiveMap, DecodeError> {
        fn str(r: &mut Reader<'_>, what: &'static str) -> Result<String, DecodeError> {
            let b = r.byte_string(what, MAX_MAP_STRING_BYTES)?;
            std::str::from_utf8(b)
                .map(str::to_owned)
                .map_err(|_| DecodeError::BadUtf8(what))
        }
        let mut r = Reader::new(buf);
        let version = r.u16()?;
        if version != MAP_FORMAT_VERSION {
            return Err(DecodeError::BadValue {
                what: "hive map version",
                value: version as u64,
            });
        }
        let epoch = r.u64()?;
        let bucket_count = r.u32()?;
        let count = r.count("map nodes", MAX_MAP_NODES, NODE_MIN_BYTES)?;
        let mut nodes = Vec::with_capacity(count);
        for _ in 0..count {
            let id = r.u64()?;
            let name = str(&mut r, "node name")?;
            let host = str(&mut r, "node host")?;
            let meta_port = r.u16()?;
            let base_port = r.u16()?;
            let shards = r.u16()?;
            let weight = r.u32()?;
            let zone = str(&mut r, "node zone")?;
            let s = r.u8()?;
            let state = NodeState::from_u8(s).ok_or(DecodeError::BadValue {
                what: "node state",
                value: s as u64,
            })?;
            nodes.push(MapNode {
                id,
                name,
                host,
                meta_port,
                base_port,
                shards,
                weight,
                zone,
                state,
            });
        }
        r.finish()?;
        let map = HiveMap {
            epoch,
            bucket_count,
            nodes,
        };
        map.validate()?;
        Ok(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUCKETS: u32 = 4096;

    fn node(id: u64, weight: u32, zone: &str) -> MapNode {
        MapNode {
            id,
            name: format!("node-{id}"),
            host: format!("10.0.0.{id}"),
            meta_port: 7399,
            base_port: 7400,
            shards: 4,
            weight,
            zone: zone.into(),
            state: NodeState::Up,
        }
    }

    fn map(nodes: Vec<MapNode>) -> HiveMap {
        let m = HiveMap {
            epoch: 1,
            bucket_count: BUCKETS,
            nodes,
        };
        m.validate().unwrap();
        m
    }

    fn equal_nodes(ids: std::ops::RangeInclusive<u64>) -> Vec<MapNode> {
        ids.map(|id| node(id, 100, "z")).collect()
    }

    #[test]
    fn fixed_point_log_is_accurate_and_monotone() {
        let one = 1u64 << FRAC_BITS;
        assert_eq!(log2_fixed(1), 0);
        assert_eq!(log2_fixed(2), one);
        assert_eq!(log2_fixed(1 << 40), 40 * one);
        assert_eq!(neg_log2_fixed(u64::MAX), 1); // u just below 1: floored at one unit
        assert_eq!(neg_log2_fixed(0), 64 * one); // h | 1 = 1
        let mut prev = 0;
        for x in [3u64, 5, 1000, 123_456_789, 1 << 63, u64::MAX - 1] {
            let got = log2_fixed(x) as f64 / one as f64;
            assert!((got - (x as f64).log2()).abs() < 1e-9, "{x}: {got}");
            assert!(log2_fixed(x) > prev);
            prev = log2_fixed(x);
        }
        // -log2(1/2) = 1 (h | 1 = 2^63 + 1, a hair above one half).
        let l = neg_log2_fixed(1 << 63) as f64 / one as f64;
        assert!((l - 1.0).abs() < 1e-12, "{l}");
    }

    #[test]
    fn table_logarithm_matches_the_bitwise_method() {
        // The fast log2 against the slow reference, over every table slot and random values.
        let reference = |x: u64| {
            let int = 63 - x.leading_zeros();
            ((int as u64) << FRAC_BITS) | log2_mantissa_bitwise(x << (63 - int))
        };
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut worst = 0i64;
        for k in 0..200_000u64 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let x = match k % 4 {
                0 => s,
                1 => s >> (k % 64),
                2 => (1 << 63) | ((k % 256) << 55) | (s >> 40), // near table entries
                _ => u64::MAX - (s >> (k % 64)),                // u near 1
            }
            .max(1);
            let diff = log2_fixed(x) as i64 - reference(x) as i64;
            worst = worst.max(diff.abs());
        }
        println!("largest difference from the bitwise log2: {worst} units of 2^-{FRAC_BITS}");
        assert!(worst <= 16, "{worst}");
    }

    #[test]
    fn determinism_same_map_same_placement() {
        let m = map(vec![
            node(1, 100, "a"),
            node(2, 100, "a"),
            node(3, 200, "b"),
            node(4, 50, "c"),
            node(9, 100, "c"),
        ]);
        let p = m.placement(3);
        let again = m.clone().placement(3);
        assert_eq!(p, again);
        for b in [0, 1, 77, 4095] {
            assert_eq!(p.replicas(b), m.replicas(b, 3).as_slice());
        }
        // Epoch and names/addresses do not take part in placement.
        let mut renamed = m.clone();
        renamed.epoch = 99;
        renamed.nodes[0].name = "other".into();
        renamed.nodes[0].host = "db.example".into();
        assert_eq!(renamed.placement(3), p);
        // Node order in memory does not either (the candidate list is the map's order, but
        // ties and ranks depend only on scores and ids).
        let mut reversed = m.clone();
        reversed.nodes.reverse();
        assert_eq!(reversed.placement(3), p);
    }

    /// Pinned outputs of the formula: if this fails, placement changed and existing hives
    /// would move their data.
    #[test]
    fn pinned_placement_values() {
        let got: Vec<u64> = [(0u32, 1u64), (1, 1), (0, 2), (4095, 7)]
            .iter()
            .map(|&(b, n)| placement_hash(b, n))
            .collect();
        println!("hashes: {got:#018x?}");
        assert_eq!(got, PINNED_HASHES);
        let m = map(vec![
            node(1, 100, "a"),
            node(2, 100, "a"),
            node(3, 200, "b"),
            node(4, 50, "c"),
            node(9, 100, "c"),
        ]);
        let rows: Vec<Vec<u64>> = [0u32, 1, 2, 3, 100, 4095]
            .iter()
            .map(|&b| m.replicas(b, 3))
            .collect();
        println!("replicas: {rows:?}");
        assert_eq!(rows, PINNED_REPLICAS);
        // All 4096 buckets: BLAKE3 of every replica id (u64 LE) in bucket order, first 8
        // bytes in hex.
        let flat: Vec<u8> = m
            .placement(3)
            .iter()
            .flat_map(|(_, r)| r.iter().flat_map(|id| id.to_le_bytes()).collect::<Vec<_>>())
            .collect();
        let digest = blake3::hash(&flat).to_hex();
        println!("placement digest: {}", &digest[..16]);
        assert_eq!(&digest[..16], PINNED_DIGEST);
    }

    // Computed independently (Python: the `blake3` package for the hash, 40-digit decimal
    // `-weight / ln(u)` for the scores, the zone rule as documented), not copied from this
    // code's output.
    const PINNED_HASHES: [u64; 4] = [
        0xfc38_0cb6_bc6c_44af,
        0x262d_514e_13cc_4769,
        0x97b6_6520_6654_7c15,
        0x0cba_d97d_2d2e_f367,
    ];
    const PINNED_REPLICAS: [[u64; 3]; 6] = [
        [1, 9, 3],
        [9, 3, 2],
        [3, 9, 2],
        [1, 3, 9],
        [3, 4, 1],
        [2, 3, 4],
    ];
    const PINNED_DIGEST: &str = "f7b80dfdfc840aac";

    /// Shares of each node's slots, by id.
    fn shares(p: &Placement) -> Vec<(u64, f64)> {
        let total: u64 = p.slots_per_node().iter().map(|(_, n)| n).sum();
        p.slots_per_node()
            .into_iter()
            .map(|(id, n)| (id, n as f64 / total as f64))
            .collect()
    }

    #[test]
    fn first_replica_follows_the_weights() {
        let m = map(vec![node(1, 1, "z"), node(2, 1, "z"), node(3, 2, "z")]);
        let s = shares(&m.placement(1));
        println!("weights 1,1,2 -> shares {s:?}");
        let want = [0.25, 0.25, 0.5];
        assert_eq!(s.len(), 3);
        for ((_, got), want) in s.iter().zip(want) {
            assert!((got - want).abs() < 0.03, "{s:?}");
        }
        // Scaling every weight changes nothing.
        let scaled = map(vec![
            node(1, 1000, "z"),
            node(2, 1000, "z"),
            node(3, 2000, "z"),
        ]);
        assert_eq!(scaled.placement(1), m.placement(1));
    }

    #[test]
    fn adding_a_node_moves_only_to_it() {
        // At copies 3 every old bucket holds all 3 old nodes, so only the fraction can go
        // wrong there; copies 1 and 2 also show that nothing moves between old nodes.
        let zone_sets = [
            ["z", "z", "z", "z"],
            ["a", "b", "c", "d"],
            ["a", "b", "a", "b"],
        ];
        for (zones, copies) in zone_sets.iter().flat_map(|z| [(z, 3), (z, 2), (z, 1)]) {
            let old = map((1..=3)
                .map(|id| node(id, 100, zones[id as usize - 1]))
                .collect());
            let new = map((1..=4)
                .map(|id| node(id, 100, zones[id as usize - 1]))
                .collect());
            let (po, pn) = (old.placement(copies), new.placement(copies));
            let mv = movement(&po, &pn);
            println!(
                "zones {zones:?}: 3 -> 4 nodes, copies {copies}: {} of {BUCKETS} buckets \
                 moved, slot fraction {:.4}",
                mv.moved_buckets.len(),
                mv.fraction()
            );
            assert!((0.18..=0.32).contains(&mv.fraction()), "{}", mv.fraction());
            assert_eq!(mv.moved_buckets, moved_buckets(&old, &new, copies));
            assert_eq!(mv.fraction(), moved_fraction(&old, &new, copies));
            for b in 0..BUCKETS {
                let (o, n) = (po.replicas(b), pn.replicas(b));
                assert_eq!(n.len(), copies);
                // Every new replica was there before or is the new node.
                assert!(
                    n.iter().all(|id| o.contains(id) || *id == 4),
                    "{b}: {o:?} {n:?}"
                );
                let moved = mv.moved_buckets.binary_search(&b).is_ok();
                assert_eq!(moved, n.contains(&4), "bucket {b}: {o:?} -> {n:?}");
            }
        }
    }

    #[test]
    fn adding_many_nodes_moves_about_one_over_n() {
        // 9 -> 10 equal nodes in 5 zones, copies 3: about 1/10 of the slots.
        let zone = |id: u64| ["a", "b", "c", "d", "e"][(id % 5) as usize];
        let old = map((1..=9).map(|id| node(id, 100, zone(id))).collect());
        let new = map((1..=10).map(|id| node(id, 100, zone(id))).collect());
        let mv = movement(&old.placement(3), &new.placement(3));
        println!(
            "9 -> 10 nodes, copies 3: slot fraction {:.4}",
            mv.fraction()
        );
        assert!((0.07..=0.13).contains(&mv.fraction()), "{}", mv.fraction());
        let (po, pn) = (old.placement(3), new.placement(3));
        for b in 0..BUCKETS {
            let (o, n) = (po.replicas(b), pn.replicas(b));
            assert!(
                n.iter().all(|id| o.contains(id) || *id == 10),
                "{b}: {o:?} {n:?}"
            );
            let moved = mv.moved_buckets.binary_search(&b).is_ok();
            assert_eq!(moved, n.contains(&10), "bucket {b}: {o:?} -> {n:?}");
        }
    }

    #[test]
    fn removing_a_node_moves_only_its_buckets() {
        let zone = |id: u64| ["a", "b", "c"][(id % 3) as usize];
        let old = map((1..=6).map(|id| node(id, 100, zone(id))).collect());
        let po = old.placement(3);
        for how in ["out", "draining", "weight0", "gone"] {
            let mut new = old.clone();
            let i = new.nodes.iter().position(|n| n.id == 4).unwrap();
            match how {
                "out" => new.nodes[i].state = NodeState::Out,
                "draining" => new.nodes[i].state = NodeState::Draining,
                "weight0" => new.nodes[i].weight = 0,
                _ => {
                    new.nodes.remove(i);
                }
            }
            let pn = new.placement(3);
            let mv = movement(&po, &pn);
            println!(
                "node 4 {how}: {} buckets moved, slot fraction {:.4}",
                mv.moved_buckets.len(),
                mv.fraction()
            );
            assert!(!mv.moved_buckets.is_empty());
            for b in 0..BUCKETS {
                let (o, n) = (po.replicas(b), pn.replicas(b));
                assert!(!n.contains(&4));
                let moved = mv.moved_buckets.binary_search(&b).is_ok();
                assert_eq!(moved, o.contains(&4), "bucket {b}: {o:?} -> {n:?}");
                // Exactly one replica replaced: the others stay.
                let kept = n.iter().filter(|id| o.contains(id)).count();
                assert_eq!(kept, if moved { 2 } else { 3 });
            }
        }
    }

    #[test]
    fn six_nodes_in_three_zones_span_three_zones() {
        let zone = |id: u64| ["a", "b", "c"][(id % 3) as usize];
        let m = map((1..=6).map(|id| node(id, 100, zone(id))).collect());
        let p = m.placement(3);
        for (b, r) in p.iter() {
            let mut zs: Vec<&str> = r.iter().map(|&id| zone(id)).collect();
            zs.sort_unstable();
            zs.dedup();
            assert_eq!(zs.len(), 3, "bucket {b}: {r:?}");
        }
        let s = shares(&p);
        println!("6 nodes / 3 zones, copies 3: slot shares {s:?}");
        for (_, share) in s {
            assert!((share - 1.0 / 6.0).abs() < 0.03);
        }
    }

    #[test]
    fn four_nodes_in_two_zones_first_two_differ() {
        let zone = |id: u64| if id <= 2 { "a" } else { "b" };
        let m = map((1..=4).map(|id| node(id, 100, zone(id))).collect());
        let p = m.placement(3);
        let mut primaries_b = 0;
        for (b, r) in p.iter() {
            assert_eq!(r.len(), 3);
            assert_ne!(zone(r[0]), zone(r[1]), "bucket {b}: {r:?}");
            // The third copy is the best remaining node of either zone.
            if zone(r[0]) == "b" {
                primaries_b += 1;
            }
        }
        // The first replica is still the best node overall: about half in each zone.
        let frac = primaries_b as f64 / BUCKETS as f64;
        println!("4 nodes / 2 zones: zone b leads {frac:.4} of buckets");
        assert!((0.45..=0.55).contains(&frac));
    }

    #[test]
    fn zone_first_order_respects_scores() {
        // Brute force against the rule as written: sort by score, distinct zones first.
        let m = map(vec![
            node(1, 100, "a"),
            node(2, 300, "a"),
            node(3, 100, "b"),
            node(5, 100, "c"),
            node(8, 700, "c"),
        ]);
        for b in 0..256 {
            let mut all: Vec<(f64, u64, &str)> = m
                .nodes
                .iter()
                .map(|n| {
                    let u = (placement_hash(b, n.id) | 1) as f64 / 2f64.powi(64);
                    (-(n.weight as f64) / u.ln(), n.id, n.zone.as_str())
                })
                .collect();
            all.sort_by(|x, y| y.0.partial_cmp(&x.0).unwrap());
            for copies in 1..=5 {
                let mut want = Vec::new();
                let mut zones = Vec::new();
                for &(_, id, z) in &all {
                    if want.len() < copies && !zones.contains(&z) {
                        zones.push(z);
                        want.push(id);
                    }
                }
                for &(_, id, _) in &all {
                    if want.len() < copies && !want.contains(&id) {
                        want.push(id);
                    }
                }
                assert_eq!(m.replicas(b, copies), want, "bucket {b} copies {copies}");
            }
        }
    }

    #[test]
    fn ineligible_nodes_are_never_chosen_and_down_nodes_are() {
        let mut nodes = equal_nodes(1..=6);
        nodes[0].state = NodeState::Draining;
        nodes[1].state = NodeState::Out;
        nodes[2].weight = 0;
        nodes[3].state = NodeState::Down;
        let m = map(nodes);
        assert_eq!(m.eligible_count(), 3);
        let p = m.placement(3);
        assert_eq!(p.stride(), 3);
        for (b, r) in p.iter() {
            assert_eq!(r.len(), 3, "bucket {b}");
            assert!(
                r.iter().all(|id| [4, 5, 6].contains(id)),
                "bucket {b}: {r:?}"
            );
        }
        // A down node keeps exactly the place it had while up.
        let mut up = m.clone();
        up.nodes[3].state = NodeState::Up;
        assert_eq!(up.placement(3), p);
        assert_eq!(up.placement(1), m.placement(1));
    }

    #[test]
    fn fewer_eligible_nodes_than_copies() {
        let m = map(vec![node(1, 100, "a"), node(2, 100, "a")]);
        let p = m.placement(3);
        assert_eq!(p.stride(), 2);
        for (_, r) in p.iter() {
            assert_eq!(r.len(), 2);
            assert_ne!(r[0], r[1]);
        }
        assert_eq!(m.replicas(5, 3).len(), 2);
        assert_eq!(m.replicas(5, usize::MAX).len(), 2);
        assert!(m.replicas(BUCKETS, 3).is_empty()); // out of range
        assert!(m.replicas(5, 0).is_empty());
        let mut none = m.clone();
        none.nodes.iter_mut().for_each(|n| n.state = NodeState::Out);
        let p = none.placement(3);
        assert_eq!(p.stride(), 0);
        assert!(p.iter().all(|(_, r)| r.is_empty()));
        assert!(map(vec![]).placement(3).iter().all(|(_, r)| r.is_empty()));
        // Going from 2 to 3 nodes at copies 3 fills the empty slot of every bucket.
        let more = map(vec![
            node(1, 100, "a"),
            node(2, 100, "a"),
            node(3, 100, "b"),
        ]);
        let mv = movement(&m.placement(3), &more.placement(3));
        assert_eq!(mv.moved_buckets.len(), BUCKETS as usize);
        assert_eq!(mv.new_slots, BUCKETS as u64);
        assert!((mv.fraction() - 1.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn movement_between_different_bucket_counts_moves_everything() {
        let a = map(equal_nodes(1..=3));
        let mut b = a.clone();
        b.bucket_count = 1024;
        let mv = movement(&a.placement(2), &b.placement(2));
        assert_eq!(mv.moved_buckets.len(), 1024);
        assert_eq!(mv.fraction(), 1.0);
        assert!(moved_buckets(&a, &a, 2).is_empty());
        assert_eq!(moved_fraction(&a, &a, 2), 0.0);
    }

    #[test]
    fn bucket_of_and_node_lookup() {
        let m = map(equal_nodes(1..=3));
        let id = ChunkId::compute(&crate::chunk::DedupeKey([7; 32]), b"hello");
        assert_eq!(m.bucket_of(&id), id.bucket(BUCKETS));
        assert_eq!(m.replicas_of(&id, 2), m.replicas(id.bucket(BUCKETS), 2));
        assert_eq!(m.node(2).unwrap().name, "node-2");
        assert!(m.node(4).is_none());
        let bad = HiveMap {
            bucket_count: 12,
            ..m
        };
        assert_eq!(bad.bucket_of(&id), 0); // never panics
    }

    #[test]
    fn placement_cost() {
        let m = map((1..=64)
            .map(|id| node(id, 100, ["a", "b", "c"][id as usize % 3]))
            .collect());
        let t = std::time::Instant::now();
        let p = m.placement(3);
        let e = t.elapsed();
        println!(
            "placement of {BUCKETS} buckets x 64 nodes, copies 3: {e:?} \
             ({:.0} ns per bucket and node; this build's opt-level), {} KiB of slots",
            e.as_nanos() as f64 / (BUCKETS as f64 * 64.0),
            p.slots.len() * 8 / 1024
        );
        assert_eq!(p.slots.len(), BUCKETS as usize * 3);
    }

    fn sample() -> HiveMap {
        let mut nodes = vec![
            node(1, 100, "rack-1"),
            node(2, 0, ""),
            node(7, 250, "rack-2"),
            node(u64::MAX, u32::MAX, "rack-é"),
        ];
        nodes[1].state = NodeState::Draining;
        nodes[2].state = NodeState::Down;
        nodes[3].state = NodeState::Out;
        nodes[3].host = "fe80::1".into();
        nodes[3].base_port = u16::MAX;
        nodes[3].shards = 1;
        HiveMap {
            epoch: 0xdead_beef,
            bucket_count: 4096,
            nodes,
        }
    }

    fn encoded(m: &HiveMap) -> Vec<u8> {
        let mut out = Vec::new();
        m.encode(&mut out);
        out
    }

    #[test]
    fn encode_decode_roundtrip() {
        for m in [sample(), map(vec![]), map(equal_nodes(1..=5))] {
            let bytes = encoded(&m);
            assert_eq!(HiveMap::decode(&bytes).unwrap(), m);
            // encode appends.
            let mut out = vec![1, 2, 3];
            m.encode(&mut out);
            assert_eq!(&out[3..], bytes.as_slice());
        }
        let bytes = encoded(&map(vec![]));
        assert_eq!(bytes.len(), 2 + 8 + 4 + 4);
        let one = encoded(&HiveMap {
            nodes: vec![MapNode {
                name: "n".into(),
                host: "h".into(),
                zone: String::new(),
                ..node(1, 1, "")
            }],
            ..map(vec![])
        });
        assert_eq!(one.len(), bytes.len() + NODE_MIN_BYTES + 2);
        // serde agrees too (the metadata store keeps the map with postcard).
        let m = sample();
        let p = postcard::to_allocvec(&m).unwrap();
        assert_eq!(postcard::from_bytes::<HiveMap>(&p).unwrap(), m);
    }

    #[test]
    fn every_truncation_and_trailing_byte_is_an_error() {
        let bytes = encoded(&sample());
        for cut in 0..bytes.len() {
            assert!(HiveMap::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(HiveMap::decode(&long), Err(DecodeError::TrailingBytes(1)));
    }

    #[test]
    fn huge_counts_and_lengths_are_refused_before_allocating() {
        let header = |count: u32| {
            let mut b = MAP_FORMAT_VERSION.to_le_bytes().to_vec();
            b.extend_from_slice(&1u64.to_le_bytes());
            b.extend_from_slice(&4096u32.to_le_bytes());
            b.extend_from_slice(&count.to_le_bytes());
            b
        };
        assert_eq!(
            HiveMap::decode(&header(u32::MAX)),
            Err(DecodeError::TooLong {
                what: "map nodes",
                len: u32::MAX as usize,
                limit: MAX_MAP_NODES
            })
        );
        assert!(matches!(
            HiveMap::decode(&header(MAX_MAP_NODES as u32 + 1)),
            Err(DecodeError::TooLong { .. })
        ));
        // Within the limit, but the bytes are not there.
        assert!(matches!(
            HiveMap::decode(&header(1000)),
            Err(DecodeError::Truncated { .. })
        ));
        // A 4 GiB name.
        let mut b = header(1);
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        b.extend_from_slice(&[0; NODE_MIN_BYTES]);
        assert!(matches!(
            HiveMap::decode(&b),
            Err(DecodeError::TooLong {
                what: "node name",
                ..
            })
        ));
        // 256-byte strings are refused by decode and validate alike.
        let mut m = map(equal_nodes(1..=2));
        m.nodes[1].zone = "z".repeat(MAX_MAP_STRING_BYTES + 1);
        assert!(m.validate().is_err());
        assert!(matches!(
            HiveMap::decode(&encoded(&m)),
            Err(DecodeError::TooLong {
                what: "node zone",
                ..
            })
        ));
        m.nodes[1].zone = "z".repeat(MAX_MAP_STRING_BYTES);
        assert_eq!(HiveMap::decode(&encoded(&m)).unwrap(), m);
        // 1025 nodes.
        let big = HiveMap {
            nodes: equal_nodes(1..=MAX_MAP_NODES as u64 + 1),
            ..map(vec![])
        };
        assert!(big.validate().is_err());
        assert!(matches!(
            HiveMap::decode(&encoded(&big)),
            Err(DecodeError::TooLong { .. })
        ));
        let max = HiveMap {
            nodes: equal_nodes(1..=MAX_MAP_NODES as u64),
            ..map(vec![])
        };
        assert_eq!(HiveMap::decode(&encoded(&max)).unwrap(), max);
    }

    #[test]
    fn invalid_maps_are_refused() {
        let good = sample();
        good.validate().unwrap();
        let mut bads: Vec<(&str, HiveMap)> = Vec::new();
        let mut with = |what, f: &dyn Fn(&mut HiveMap)| {
            let mut m = sample();
            f(&mut m);
            bads.push((what, m));
        };
        with("buckets 0", &|m| m.bucket_count = 0);
        with("buckets 3000", &|m| m.bucket_count = 3000);
        with("buckets 4097", &|m| m.bucket_count = 4097);
        with("buckets too many", &|m| m.bucket_count = MAX_BUCKETS * 2);
        with("duplicate id", &|m| m.nodes[1].id = 1);
        with("unsorted", &|m| m.nodes.swap(0, 2));
        with("id 0", &|m| m.nodes[0].id = 0);
        with("duplicate name", &|m| m.nodes[2].name = "node-1".into());
        with("empty name", &|m| m.nodes[0].name.clear());
        with("empty host", &|m| m.nodes[0].host.clear());
        with("long host", &|m| m.nodes[0].host = "h".repeat(256));
        with("meta port 0", &|m| m.nodes[0].meta_port = 0);
        with("base port 0", &|m| m.nodes[0].base_port = 0);
        with("no shards", &|m| m.nodes[0].shards = 0);
        with("ports overflow", &|m| m.nodes[3].shards = 2);
        for (what, m) in bads {
            assert!(m.validate().is_err(), "{what}");
            assert!(HiveMap::decode(&encoded(&m)).is_err(), "{what}");
            let _ = m.placement(3); // never panics
            let _ = m.replicas(1, 3);
        }
        // Bad version, state, UTF-8.
        let bytes = encoded(&good);
        let mut b = bytes.clone();
        b[0] = 2;
        assert_eq!(
            HiveMap::decode(&b),
            Err(DecodeError::BadValue {
                what: "hive map version",
                value: 2
            })
        );
        let mut b = bytes.clone();
        *b.last_mut().unwrap() = 4; // the last node's state
        assert_eq!(
            HiveMap::decode(&b),
            Err(DecodeError::BadValue {
                what: "node state",
                value: 4
            })
        );
        let mut b = bytes.clone();
        let name_at = 2 + 8 + 4 + 4 + 8 + 4; // first node's name bytes
        b[name_at] = 0xff;
        assert_eq!(HiveMap::decode(&b), Err(DecodeError::BadUtf8("node name")));
    }

    #[test]
    fn random_bytes_never_panic() {
        // A cheap deterministic generator; flips and garbage must give errors, not panics.
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let bytes = encoded(&sample());
        for _ in 0..20_000 {
            let mut b = bytes.clone();
            for _ in 0..1 + next() % 4 {
                let i = (next() as usize) % b.len();
                b[i] = next() as u8;
            }
            if let Ok(m) = HiveMap::decode(&b) {
                m.validate().unwrap();
            }
        }
        for len in 0..200 {
            let b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = HiveMap::decode(&b);
        }
    }
}
