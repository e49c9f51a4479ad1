//! Chunk identity and encoding, shared by clients (who cut, hash and compress) and nodes
//! (who verify before a chunk may answer `has`).
//!
//! A [`ChunkId`] is one version byte followed by the 32-byte BLAKE3 hash of the chunk's
//! plaintext, keyed with the hive's [`DedupeKey`]. Version [`ID_VERSION_BLAKE3_KEYED`] is the
//! only one today; the byte lets the algorithm or key change later without ambiguity.

use std::fmt;

/// Id format version: BLAKE3-256 keyed with the hive's dedupe key.
pub const ID_VERSION_BLAKE3_KEYED: u8 = 1;
/// Bytes in an encoded [`ChunkId`].
pub const CHUNK_ID_BYTES: usize = 33;
/// The largest plaintext chunk any node accepts, in bytes (FastCDC max is 256 KiB by
/// default; this leaves room for a larger configured maximum).
pub const MAX_CHUNK_RAW_BYTES: usize = 1 << 20;
/// The largest stored (compressed or raw) chunk, in bytes. LZ4's worst case expansion is
/// bounded well inside this, and a codec that does not pay is replaced by raw.
pub const MAX_CHUNK_STORED_BYTES: usize = MAX_CHUNK_RAW_BYTES;

/// Content address of a chunk.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; CHUNK_ID_BYTES]);

/// The hive-wide key every chunk id is hashed with (created by `hive init`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct DedupeKey(pub [u8; 32]);

impl DedupeKey {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        let v = hex::decode(s.trim()).ok()?;
        Some(DedupeKey(v.try_into().ok()?))
    }
}

impl fmt::Debug for DedupeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DedupeKey(..)")
    }
}

impl ChunkId {
    /// The id of `plaintext` under `key`.
    pub fn compute(key: &DedupeKey, plaintext: &[u8]) -> ChunkId {
        let hash = blake3::keyed_hash(&key.0, plaintext);
        let mut id = [0u8; CHUNK_ID_BYTES];
        id[0] = ID_VERSION_BLAKE3_KEYED;
        id[1..].copy_from_slice(hash.as_bytes());
        ChunkId(id)
    }

    pub fn version(&self) -> u8 {
        self.0[0]
    }

    /// The bucket (placement group) of this id among `bucket_count` buckets, a power of
    /// two: the top bits of the hash.
    pub fn bucket(&self, bucket_count: u32) -> u32 {
        debug_assert!(bucket_count.is_power_of_two());
        let prefix = u32::from_be_bytes([self.0[1], self.0[2], self.0[3], self.0[4]]);
        if bucket_count <= 1 {
            0
        } else {
            prefix >> (32 - bucket_count.trailing_zeros())
        }
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        let v = hex::decode(s.trim()).ok()?;
        Some(ChunkId(v.try_into().ok()?))
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.to_hex()[..18])
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// How a chunk's bytes are stored and sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Codec {
    Raw = 0,
    Lz4 = 1,
    Zstd = 2,
}

impl Codec {
    pub fn from_u8(v: u8) -> Option<Codec> {
        match v {
            0 => Some(Codec::Raw),
            1 => Some(Codec::Lz4),
            2 => Some(Codec::Zstd),
            _ => None,
        }
    }
}

/// Errors decoding a stored chunk.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkError {
    #[error("chunk length {0} exceeds the limit {MAX_CHUNK_RAW_BYTES}")]
    TooLarge(usize),
    #[error("raw chunk has {stored} bytes but claims {raw}")]
    RawLengthMismatch { stored: usize, raw: usize },
    #[error("{codec:?} data does not decompress: {detail}")]
    Corrupt { codec: Codec, detail: String },
    #[error("decompressed {got} bytes, expected {expected}")]
    LengthMismatch { got: usize, expected: usize },
    #[error("chunk bytes do not hash to the id {0}")]
    HashMismatch(ChunkId),
}

/// Compress `plaintext` with `preferred`, falling back to [`Codec::Raw`] when it does not
/// save at least 1/32 of the size (incompressible data is stored and sent raw).
pub fn compress(preferred: Codec, plaintext: &[u8]) -> (Codec, Vec<u8>) {
    if preferred != Codec::Raw && !worth_compressing(plaintext) {
        return (Codec::Raw, plaintext.to_vec());
    }
    let packed = match preferred {
        Codec::Raw => None,
        Codec::Lz4 => Some(lz4_flex::block::compress(plaintext)),
        Codec::Zstd => zstd::bulk::compress(plaintext, 1).ok(),
    };
    match packed {
        Some(p) if p.len() + plaintext.len() / 32 < plaintext.len() => (preferred, p),
        _ => (Codec::Raw, plaintext.to_vec()),
    }
}

/// Bytes of each sample [`worth_compressing`] tries.
const PROBE_BYTES: usize = 4096;

/// Whether a chunk is worth a full compression attempt: three samples (start, middle, end)
/// compressed with LZ4 must save at least 1/32 of their size, as the whole chunk must to be
/// stored compressed. Random-looking data (media, archives, encrypted files) then costs one
/// small probe instead of a full pass (as early-abort heuristics in ZFS and Btrfs do); a
/// chunk whose samples are incompressible but whose rest is not is stored raw, and loses
/// only that.
pub fn worth_compressing(plaintext: &[u8]) -> bool {
    let n = plaintext.len();
    if n <= 4 * PROBE_BYTES {
        return true;
    }
    let mut sample = Vec::with_capacity(3 * PROBE_BYTES);
    for at in [0, n / 2 - PROBE_BYTES / 2, n - PROBE_BYTES] {
        sample.extend_from_slice(&plaintext[at..at + PROBE_BYTES]);
    }
    let packed = lz4_flex::block::compress(&sample);
    packed.len() + sample.len() / 32 < sample.len()
}

/// Decompress a stored chunk, bounding every length before allocating.
pub fn decompress(codec: Codec, stored: &[u8], raw_len: usize) -> Result<Vec<u8>, ChunkError> {
    if raw_len > MAX_CHUNK_RAW_BYTES {
        return Err(ChunkError::TooLarge(raw_len));
    }
    if stored.len() > MAX_CHUNK_STORED_BYTES {
        return Err(ChunkError::TooLarge(stored.len()));
    }
    let out = match codec {
        Codec::Raw => {
            if stored.len() != raw_len {
                return Err(ChunkError::RawLengthMismatch {
                    stored: stored.len(),
                    raw: raw_len,
                });
            }
            stored.to_vec()
        }
        Codec::Lz4 => {
            lz4_flex::block::decompress(stored, raw_len).map_err(|e| ChunkError::Corrupt {
                codec,
                detail: e.to_string(),
            })?
        }
        Codec::Zstd => {
            zstd::bulk::decompress(stored, raw_len).map_err(|e| ChunkError::Corrupt {
                codec,
                detail: e.to_string(),
            })?
        }
    };
    if out.len() != raw_len {
        return Err(ChunkError::LengthMismatch {
            got: out.len(),
            expected: raw_len,
        });
    }
    Ok(out)
}

/// [`verify`] without returning the plaintext: raw chunks are hashed in place, with no
/// copy (the node's put path).
pub fn check(
    key: &DedupeKey,
    id: &ChunkId,
    codec: Codec,
    stored: &[u8],
    raw_len: usize,
) -> Result<(), ChunkError> {
    if codec != Codec::Raw {
        return verify(key, id, codec, stored, raw_len).map(|_| ());
    }
    if raw_len > MAX_CHUNK_RAW_BYTES {
        return Err(ChunkError::TooLarge(raw_len));
    }
    if stored.len() != raw_len {
        return Err(ChunkError::RawLengthMismatch {
            stored: stored.len(),
            raw: raw_len,
        });
    }
    if id.version() != ID_VERSION_BLAKE3_KEYED || ChunkId::compute(key, stored) != *id {
        return Err(ChunkError::HashMismatch(*id));
    }
    Ok(())
}

/// Decompress and check that the plaintext hashes to `id`: the one test a chunk must pass
/// before a node lets it answer `has` and before a client accepts it from `get`.
pub fn verify(
    key: &DedupeKey,
    id: &ChunkId,
    codec: Codec,
    stored: &[u8],
    raw_len: usize,
) -> Result<Vec<u8>, ChunkError> {
    let plain = decompress(codec, stored, raw_len)?;
    if id.version() != ID_VERSION_BLAKE3_KEYED || ChunkId::compute(key, &plain) != *id {
        return Err(ChunkError::HashMismatch(*id));
    }
    Ok(plain)
}

/// [`verify`] of stored bytes the caller owns: a raw chunk's bytes are checked and handed
/// back as they are, without a copy.
pub fn verify_owned(
    key: &DedupeKey,
    id: &ChunkId,
    codec: Codec,
    stored: Vec<u8>,
    raw_len: usize,
) -> Result<Vec<u8>, ChunkError> {
    if codec != Codec::Raw {
        return verify(key, id, codec, &stored, raw_len);
    }
    check(key, id, codec, &stored, raw_len)?;
    Ok(stored)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: DedupeKey = DedupeKey([7u8; 32]);

    #[test]
    fn verify_owned_agrees_with_verify() {
        let text = b"owned bytes ".repeat(3000);
        let id = ChunkId::compute(&KEY, &text);
        for c in [Codec::Raw, Codec::Lz4, Codec::Zstd] {
            let (used, stored) = compress(c, &text);
            assert_eq!(
                verify_owned(&KEY, &id, used, stored.clone(), text.len()).unwrap(),
                text
            );
            let mut bad = stored;
            let last = bad.len() - 1;
            bad[last] ^= 1;
            assert!(verify_owned(&KEY, &id, used, bad.clone(), text.len()).is_err());
            assert_eq!(
                verify_owned(&KEY, &id, used, bad.clone(), text.len()).is_err(),
                verify(&KEY, &id, used, &bad, text.len()).is_err()
            );
        }
        let (_, raw) = compress(Codec::Raw, &text);
        assert!(matches!(
            verify_owned(&KEY, &id, Codec::Raw, raw[..10].to_vec(), text.len()),
            Err(ChunkError::RawLengthMismatch { .. })
        ));
    }

    #[test]
    fn roundtrip_each_codec() {
        let text = b"hive ".repeat(5000);
        for c in [Codec::Raw, Codec::Lz4, Codec::Zstd] {
            let id = ChunkId::compute(&KEY, &text);
            let (used, stored) = compress(c, &text);
            assert_eq!(used, c);
            assert_eq!(verify(&KEY, &id, used, &stored, text.len()).unwrap(), text);
        }
    }

    #[test]
    fn incompressible_is_raw() {
        let mut x = 1u64;
        let data: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert_eq!(compress(Codec::Lz4, &data).0, Codec::Raw);
        assert!(!worth_compressing(&data), "the probe sees random bytes");
        // Text with random bytes only where the probe does not look still compresses;
        // random bytes where it looks make the chunk raw.
        let mut mixed = b"hive ".repeat(13108);
        mixed[20_000..24_000].copy_from_slice(&data[..4000]);
        assert!(worth_compressing(&mixed));
        assert_eq!(compress(Codec::Lz4, &mixed).0, Codec::Lz4);
        mixed[..4096].copy_from_slice(&data[..4096]);
        let mid = mixed.len() / 2 - 2048;
        mixed[mid..mid + 4096].copy_from_slice(&data[4096..8192]);
        let end = mixed.len() - 4096;
        mixed[end..].copy_from_slice(&data[8192..12288]);
        assert_eq!(compress(Codec::Lz4, &mixed).0, Codec::Raw);
    }

    #[test]
    fn garbage_under_a_valid_id_fails() {
        let id = ChunkId::compute(&KEY, b"real");
        assert_eq!(
            verify(&KEY, &id, Codec::Raw, b"fake", 4),
            Err(ChunkError::HashMismatch(id))
        );
        assert_eq!(
            check(&KEY, &id, Codec::Raw, b"fake", 4),
            Err(ChunkError::HashMismatch(id))
        );
        assert_eq!(check(&KEY, &id, Codec::Raw, b"real", 4), Ok(()));
        assert!(check(&KEY, &id, Codec::Raw, b"real", 5).is_err());
        assert!(decompress(Codec::Lz4, &[0xff; 10], 100).is_err());
        assert_eq!(
            decompress(Codec::Raw, b"x", MAX_CHUNK_RAW_BYTES + 1),
            Err(ChunkError::TooLarge(MAX_CHUNK_RAW_BYTES + 1))
        );
    }

    #[test]
    fn buckets_use_the_id_prefix() {
        let mut id = ChunkId([0; CHUNK_ID_BYTES]);
        id.0[1] = 0xff;
        id.0[2] = 0xf0;
        assert_eq!(id.bucket(4096), 4095);
        id.0[1] = 0;
        // The top 12 bits are now 0x00f (byte 2 still contributes its high nibble).
        assert_eq!(id.bucket(4096), 0x00f);
        id.0[2] = 0;
        assert_eq!(id.bucket(4096), 0);
        assert_eq!(id.bucket(1), 0);
    }
}
