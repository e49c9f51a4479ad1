//! The metadata service: the namespace (volumes, inodes, directory entries, extents,
//! xattrs) as a replicated state machine.
//!
//! - [`store`]: the state machine itself, applied to redb: multi-version records keyed by
//!   group and volume, exactly-once mutations, the namespace invariants (`check`).
//! - [`raft`] (with `raft_log`): the replicated log (openraft over a redb log file) whose
//!   committed entries are applied to the store.
//! - [`server`]: the metadata port: Hello/token, then mutations through Raft and
//!   linearizable queries.
//! - [`peer`]: node-to-node links: Raft's transport (mutual TLS) and the joining node's link.
//! - [`health`]: the leader's failure detector: pings, and nodes marked up, down, out.
//! - [`locks`]: flock and POSIX locks, volatile state of the leader (leased, not logged).
//! - [`version`]: the metadata log version: new commands enter the log only once every
//!   member can read them.
//! - [`watch`]: watch streams: which cached names and inodes each mutation makes stale,
//!   pushed to the other mounts of the volume.
pub mod health;
pub mod leases;
pub mod locks;
pub mod peer;
pub mod raft;
mod raft_log;
pub mod server;
pub mod sim_store;
pub mod store;
pub mod version;
mod wal;
pub mod watch;
