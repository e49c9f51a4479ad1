//! The HiveFS client library.
//!
//! - [`pipeline`]: cuts files into content-defined chunks (FastCDC 2020), hashes each chunk
//!   with the hive's keyed BLAKE3 ([`hivefs_net::chunk::ChunkId`]) and compresses it
//!   ([`hivefs_net::chunk::compress`]), spreading hashing and compression over worker
//!   threads while delivering chunks in input order. Only chunks the hive lacks are then
//!   uploaded.

//! - [`hive`]: connections to a hive node (TLS with the pinned CA, token), the cluster map,
//!   and shard-aware, pipelined has / put / get with verification of everything read.
//! - [`meta`]: the metadata client: a pooled, thread-safe connection to the metadata port
//!   with exactly-once mutations (retries keep their sequence number).

pub mod hive;
pub mod meta;
pub mod pipeline;
