//! The HiveFS wire layer: everything both a hive node and a client must agree on.
//!
//! - [`chunk`]: chunk ids (version byte + keyed BLAKE3-256), codecs (raw, LZ4, zstd) and
//!   bounded decompression. The engine verifies with exactly the code the client hashes with.
//! - [`frame`]: the 32-byte checksummed frame header, [`frame::encode_frame`] and the
//!   incremental, bounded [`frame::FrameDecoder`].
//! - [`proto`]: opcodes, [`proto::Request`] / [`proto::Response`] and their body encodings,
//!   error codes, the [`proto::ClusterMap`], and the limits every decoder enforces.
//! - [`tls`]: the hive's PKI (CA, node certificates, fingerprints) and rustls configs; clients
//!   pin the hive CA by fingerprint.
//! - [`conn`]: [`conn::FramedConn`], a plain or TLS framed connection over any `Read + Write`
//!   stream, for non-blocking event loops and blocking clients alike.
//! - [`tcp`]: kernel socket settings that fail a connection to a dead host.
//!
//! Architecture invariant: only this crate knows the wire format and TLS. The engine and
//! the client never parse bytes from a socket themselves. Every decoder bounds lengths
//! before allocating, and nothing here panics on bytes from the network.

pub mod chunk;
pub mod conn;
pub mod frame;
pub mod meta;
pub mod placement;
pub mod proto;
pub mod tcp;
pub mod tls;

pub use conn::{ConnError, FramedConn, ReadStatus, Security};
pub use frame::{
    Frame, FrameDecoder, FrameError, FrameHeader, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN,
};
pub use proto::{
    ClusterMap, DecodeError, ErrorCode, Opcode, PutChunk, PutResult, Request, Response,
};

/// Keep large buffers (frames, chunk batches, replies) in the heap instead of mapping and
/// unmapping each one: with glibc's default 128 KiB mmap threshold every 1 MiB frame cost
/// an `mmap`, page faults on first touch and an `munmap` (measured by hive-perf: a TLS
/// receiver spent 1.0-1.2 CPU-s/GiB with the default and 0.37-0.40 without it). Binaries
/// call this first thing in `main`.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads start.
    unsafe {
        // 32 MiB is glibc's ceiling for the threshold on 64-bit; frames are at most 16 MiB.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
