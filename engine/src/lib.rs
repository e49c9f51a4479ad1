//! The hive node.
//!
//! - [`format`]: on-device layout (superblock, control blocks, segments, records).
//! - [`index`]: the per-shard dedupe index.
//! - [`shard`]: one shard's storage state machine (put/has/get/delete, group commit, replay);
//!   no I/O of its own beyond the block device it is handed, no clock, no randomness.
//! - [`sim`]: the deterministic simulator that runs shards over simulated devices with
//!   crashes, torn and lost writes and bit flips, checking the safety invariants.
//! - [`gc_sim`]: the deterministic simulator of garbage collection: a real metadata store
//!   (crashed and replayed), several shards, writer clients racing collections.
//! - [`repair`]: repair and rebalance: each node pushes the chunks it holds to their
//!   buckets' live replicas that lack them (throttled, resumable); [`repair_sim`] runs
//!   its decision rules over simulated nodes and map changes.
//! - [`replicate`]: the primary's state machine for replicated puts (targets, hinted
//!   copies, acknowledging at `min_copies`, owed copies); [`repl_sim`] runs it over
//!   simulated nodes, network and stores with crashes and partitions.
//! - [`hive_map`]: this node's copy of the placement map, shared with its shards;
//!   [`links`]: the replication transport (a shard's links to other nodes' shards).
//! - [`meta`]: the metadata service: the namespace store (redb), its Raft log (openraft)
//!   and the metadata port; [`lease_sim`] runs its write-lease table against a simulated
//!   Raft log, clients, silences and leader changes.
//!
//! Architecture invariants: the engine does device I/O only through `hivefs-nvme` and
//! speaks the wire only through `hivefs-net`; a shard's state is touched only by its own
//! thread.

pub mod admin;
pub mod config;
pub mod format;
pub mod gc_sim;
pub mod hive_map;
pub mod index;
pub mod lease_sim;
pub mod links;
pub mod meta;
pub mod node;
pub mod repair;
pub mod repair_sim;
pub mod repl_sim;
pub mod replicate;
pub mod shard;
pub mod sim;
mod stream;
pub mod tokens;
