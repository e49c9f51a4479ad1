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

/// CRC-32C (Castagnoli) of `parts` as of their concatenation: the checksum of frames, chunk
/// log records, Raft log records and client journal entries (`crc_fast::crc32_iscsi` of
/// one buffer is the same function). Formats on disk depend on it: pinned by tests here.
pub fn crc32c_parts(parts: &[&[u8]]) -> u32 {
    let mut d = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi);
    for p in parts {
        d.update(p);
    }
    d.finalize() as u32
}

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

#[cfg(test)]
mod tests {
    /// CRC-32C bit by bit, from its definition (reflected polynomial 0x82F63B78, initial
    /// value and final xor all ones): the oracle the fast one must match on every length
    /// and split, since frames and files written before depend on the values.
    fn crc32c_by_bits(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0x82F6_3B78
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn crc32c_is_castagnoli_on_every_length_and_split() {
        assert_eq!(super::crc32c_parts(&[b"123456789"]), 0xE306_9283);
        let data: Vec<u8> = (0..70_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let mut lens: Vec<usize> = (0..=1100).collect();
        lens.extend([4095, 4096, 4097, 65_536, 69_999]);
        for len in lens {
            let b = &data[len % 7..len % 7 + len.min(data.len() - 7)];
            let want = crc32c_by_bits(b);
            assert_eq!(crc_fast::crc32_iscsi(b), want, "length {}", b.len());
            let cut = b.len() * 3 / 7;
            assert_eq!(
                super::crc32c_parts(&[&b[..cut], &[], &b[cut..]]),
                want,
                "length {} cut at {cut}",
                b.len()
            );
        }
    }
}
