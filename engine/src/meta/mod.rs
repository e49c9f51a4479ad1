//! The metadata service: the namespace (volumes, inodes, directory entries, extents,
//! xattrs) as a replicated state machine.
//!
//! - [`store`]: the state machine itself, applied to redb: multi-version records keyed by
//!   group and volume, exactly-once mutations, the namespace invariants (`check`).
pub mod store;
