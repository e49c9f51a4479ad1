//! On-device formats of a hive node: the device superblock, the per-shard control blocks,
//! segment headers and log records. Every structure carries a magic, a format version and a
//! CRC32C; every length read from the device is bounded before it is used.
//!
//! Device layout (all offsets multiples of [`BLOCK_SIZE`]):
//!
//! ```text
//! 0                     device superblock (1 block)
//! 4096 * (1 + 2*s)      shard s control block, slot A   } written alternately; the valid
//! 4096 * (2 + 2*s)      shard s control block, slot B   } one with the higher counter wins
//! DATA_START            segment 0, segment 1, ... (segment_bytes each)
//! ```
//!
//! Shard `s` owns segments `[s * segments_per_shard, (s + 1) * segments_per_shard)`.
//!
//! A segment is in use exactly when its first block is a valid [`SegmentHeader`] for its
//! shard and position. A free segment's first block is all zeros (written at format, and
//! by compaction, durably, before the segment is reused with a new generation); whatever
//! records an earlier use left behind it carry an older generation and never replay.
//!
//! A segment starts with a header block and is followed by records, each 8-byte aligned:
//!
//! ```text
//! record header (RECORD_HEADER_BYTES, little-endian)
//!   0  magic u32          "HREC"
//!   4  format u8          RECORD_FORMAT_VERSION
//!   5  kind u8            1 chunk, 2 tombstone
//!   6  codec u8           net::chunk::Codec
//!   7  level u8           a chunk's copies (replication level); 0 in a tombstone (and
//!                         in chunk records of builds before levels: read as 1)
//!   8  generation u32     the segment's generation (stale records of an older use differ)
//!  12  reserved u32       0
//!  16  seq u64            shard-wide sequence number, +1 per record
//!  24  id [33]            chunk id
//!  57  reserved [3]
//!  60  raw_len u32        plaintext bytes
//!  64  stored_len u32     bytes that follow the header
//!  68  crc u32            CRC32C of the header (crc field zeroed) and the stored bytes
//! ```
//!
//! A group commit writes whole blocks; the bytes after its last record up to the block
//! boundary are zero and the next commit starts at the next block. A scan therefore treats
//! a non-record at an unaligned position as padding (skip to the next block) and a
//! non-record at a block boundary as the end of the log.

use hivefs_net::chunk::{ChunkId, Codec, CHUNK_ID_BYTES, MAX_CHUNK_STORED_BYTES};
use hivefs_nvme::BLOCK_SIZE;

pub const SUPERBLOCK_MAGIC: u32 = u32::from_le_bytes(*b"HIVE");
pub const CONTROL_MAGIC: u32 = u32::from_le_bytes(*b"HCTL");
pub const SEGMENT_MAGIC: u32 = u32::from_le_bytes(*b"HSEG");
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"HREC");
pub const DEVICE_FORMAT_VERSION: u16 = 1;
pub const RECORD_FORMAT_VERSION: u8 = 1;
pub const RECORD_HEADER_BYTES: usize = 72;
pub const RECORD_ALIGN: usize = 8;
/// Segments start here, after the superblock and up to 255 shards' control blocks.
pub const DATA_START: u64 = 2 << 20;
/// The most shards a device can be formatted for.
pub const MAX_SHARDS: u32 = 255;
pub const MIN_SEGMENT_BYTES: u64 = 256 << 10;
pub const MAX_SEGMENT_BYTES: u64 = 1 << 30;

const _: () = assert!((1 + 2 * MAX_SHARDS as u64) * (BLOCK_SIZE as u64) <= DATA_START);
const _: () = assert!(RECORD_HEADER_BYTES.is_multiple_of(RECORD_ALIGN));
const _: () = assert!(24 + CHUNK_ID_BYTES <= 60);

/// Errors decoding on-device structures (corrupt input, never a panic).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("bad magic {found:#x} (expected {expected:#x})")]
    BadMagic { found: u32, expected: u32 },
    #[error("unsupported format version {0}")]
    Version(u32),
    #[error("checksum mismatch")]
    Checksum,
    #[error("field out of range: {0}")]
    Range(&'static str),
}

fn rd_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn rd_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn rd_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn check_magic(found: u32, expected: u32) -> Result<(), FormatError> {
    if found == expected {
        Ok(())
    } else {
        Err(FormatError::BadMagic { found, expected })
    }
}

/// Block 0: what the device was formatted as.
///
/// ```text
///  0 magic u32 "HIVE" | 4 version u16 | 6 shards u16 | 8 segment_bytes u64
/// 16 segments_per_shard u32 | 20 bucket_count u32 | 24 dedupe key [32] | 56 crc u32
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub shards: u16,
    pub segment_bytes: u64,
    pub segments_per_shard: u32,
    pub bucket_count: u32,
    pub dedupe_key: [u8; 32],
}

impl Superblock {
    /// The layout that fits `capacity` bytes.
    pub fn plan(
        capacity: u64,
        shards: u16,
        segment_bytes: u64,
        bucket_count: u32,
        dedupe_key: [u8; 32],
    ) -> Result<Superblock, FormatError> {
        if shards == 0 || shards as u32 > MAX_SHARDS {
            return Err(FormatError::Range("shards"));
        }
        if !(MIN_SEGMENT_BYTES..=MAX_SEGMENT_BYTES).contains(&segment_bytes)
            || !segment_bytes.is_multiple_of(BLOCK_SIZE as u64)
        {
            return Err(FormatError::Range("segment_bytes"));
        }
        if !bucket_count.is_power_of_two() || bucket_count > 1 << 20 {
            return Err(FormatError::Range("bucket_count"));
        }
        let segments = capacity.saturating_sub(DATA_START) / segment_bytes;
        let per_shard = segments / shards as u64;
        if per_shard < 2 {
            return Err(FormatError::Range(
                "device too small: fewer than 2 segments per shard",
            ));
        }
        Ok(Superblock {
            shards,
            segment_bytes,
            segments_per_shard: per_shard.min(u32::MAX as u64) as u32,
            bucket_count,
            dedupe_key,
        })
    }

    pub fn encode(&self) -> [u8; BLOCK_SIZE] {
        let mut b = [0u8; BLOCK_SIZE];
        b[0..4].copy_from_slice(&SUPERBLOCK_MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&DEVICE_FORMAT_VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&self.shards.to_le_bytes());
        b[8..16].copy_from_slice(&self.segment_bytes.to_le_bytes());
        b[16..20].copy_from_slice(&self.segments_per_shard.to_le_bytes());
        b[20..24].copy_from_slice(&self.bucket_count.to_le_bytes());
        b[24..56].copy_from_slice(&self.dedupe_key);
        let crc = crc_fast::crc32_iscsi(&b[..56]);
        b[56..60].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Superblock, FormatError> {
        if b.len() < 60 {
            return Err(FormatError::Range("superblock length"));
        }
        check_magic(rd_u32(b, 0), SUPERBLOCK_MAGIC)?;
        if rd_u16(b, 4) != DEVICE_FORMAT_VERSION {
            return Err(FormatError::Version(rd_u16(b, 4) as u32));
        }
        if crc_fast::crc32_iscsi(&b[..56]) != rd_u32(b, 56) {
            return Err(FormatError::Checksum);
        }
        let sb = Superblock {
            shards: rd_u16(b, 6),
            segment_bytes: rd_u64(b, 8),
            segments_per_shard: rd_u32(b, 16),
            bucket_count: rd_u32(b, 20),
            dedupe_key: b[24..56].try_into().expect("32 bytes"),
        };
        // Re-validate as if planning, so a corrupt-but-checksummed field cannot overflow.
        Superblock::plan(
            sb.required_bytes(),
            sb.shards,
            sb.segment_bytes,
            sb.bucket_count,
            sb.dedupe_key,
        )?;
        Ok(sb)
    }

    /// Bytes of device this layout uses.
    pub fn required_bytes(&self) -> u64 {
        DATA_START + self.segment_bytes * self.segments_per_shard as u64 * self.shards as u64
    }

    pub fn shard_layout(&self, shard: u16) -> ShardLayout {
        assert!(shard < self.shards);
        let first = shard as u64 * self.segments_per_shard as u64;
        ShardLayout {
            shard,
            segment_bytes: self.segment_bytes,
            segment_count: self.segments_per_shard,
            first_segment_offset: DATA_START + first * self.segment_bytes,
        }
    }
}

/// Where one shard's control blocks and segments lie on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardLayout {
    pub shard: u16,
    pub segment_bytes: u64,
    pub segment_count: u32,
    pub first_segment_offset: u64,
}

impl ShardLayout {
    pub fn segment_offset(&self, segment: u32) -> u64 {
        debug_assert!(segment < self.segment_count);
        self.first_segment_offset + segment as u64 * self.segment_bytes
    }

    pub fn control_offset(&self, slot: u8) -> u64 {
        (1 + 2 * self.shard as u64 + slot as u64) * BLOCK_SIZE as u64
    }
}

/// A shard's durable counters, written alternately to two slots so a torn write of one
/// leaves the other. `next_generation` is persisted before a segment of that generation is
/// opened, so generations are never reused and stale records are always recognisable.
///
/// ```text
/// 0 magic u32 "HCTL" | 4 shard u16 | 6 reserved u16 | 8 counter u64 | 16 next_generation u32 | 20 crc u32
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlBlock {
    pub shard: u16,
    pub counter: u64,
    pub next_generation: u32,
}

impl ControlBlock {
    pub fn encode(&self) -> [u8; BLOCK_SIZE] {
        let mut b = [0u8; BLOCK_SIZE];
        b[0..4].copy_from_slice(&CONTROL_MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&self.shard.to_le_bytes());
        b[8..16].copy_from_slice(&self.counter.to_le_bytes());
        b[16..20].copy_from_slice(&self.next_generation.to_le_bytes());
        let crc = crc_fast::crc32_iscsi(&b[..20]);
        b[20..24].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<ControlBlock, FormatError> {
        if b.len() < 24 {
            return Err(FormatError::Range("control block length"));
        }
        check_magic(rd_u32(b, 0), CONTROL_MAGIC)?;
        if crc_fast::crc32_iscsi(&b[..20]) != rd_u32(b, 20) {
            return Err(FormatError::Checksum);
        }
        Ok(ControlBlock {
            shard: rd_u16(b, 4),
            counter: rd_u64(b, 8),
            next_generation: rd_u32(b, 16),
        })
    }
}

/// First block of a segment in use.
///
/// ```text
/// 0 magic u32 "HSEG" | 4 format u8 | 5..8 reserved | 8 shard u16 | 10 reserved u16
/// 12 segment u32 | 16 generation u32 | 20 reserved u32 | 24 first_seq u64 | 32 crc u32
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub shard: u16,
    pub segment: u32,
    pub generation: u32,
    pub first_seq: u64,
}

impl SegmentHeader {
    pub fn encode_into(&self, b: &mut [u8]) {
        b[..BLOCK_SIZE].fill(0);
        b[0..4].copy_from_slice(&SEGMENT_MAGIC.to_le_bytes());
        b[4] = RECORD_FORMAT_VERSION;
        b[8..10].copy_from_slice(&self.shard.to_le_bytes());
        b[12..16].copy_from_slice(&self.segment.to_le_bytes());
        b[16..20].copy_from_slice(&self.generation.to_le_bytes());
        b[24..32].copy_from_slice(&self.first_seq.to_le_bytes());
        let crc = crc_fast::crc32_iscsi(&b[..32]);
        b[32..36].copy_from_slice(&crc.to_le_bytes());
    }

    pub fn decode(b: &[u8]) -> Result<SegmentHeader, FormatError> {
        if b.len() < 36 {
            return Err(FormatError::Range("segment header length"));
        }
        check_magic(rd_u32(b, 0), SEGMENT_MAGIC)?;
        if b[4] != RECORD_FORMAT_VERSION {
            return Err(FormatError::Version(b[4] as u32));
        }
        if crc_fast::crc32_iscsi(&b[..32]) != rd_u32(b, 32) {
            return Err(FormatError::Checksum);
        }
        Ok(SegmentHeader {
            shard: rd_u16(b, 8),
            segment: rd_u32(b, 12),
            generation: rd_u32(b, 16),
            first_seq: rd_u64(b, 24),
        })
    }
}

/// What a record says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    Chunk = 1,
    Tombstone = 2,
}

/// A decoded record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub codec: Codec,
    /// A chunk's replication level (at least 1); 0 for a tombstone.
    pub level: u8,
    pub generation: u32,
    pub seq: u64,
    pub id: ChunkId,
    pub raw_len: u32,
    pub stored_len: u32,
    pub crc: u32,
}

/// The level a record of `kind` carries: a chunk's is at least 1 (records written before
/// levels have 0 there), a tombstone's is 0.
fn record_level(kind: RecordKind, level: u8) -> u8 {
    match kind {
        RecordKind::Chunk => level.max(1),
        RecordKind::Tombstone => 0,
    }
}

/// Bytes a record with `stored_len` payload bytes occupies, padding included.
pub fn record_span(stored_len: usize) -> usize {
    (RECORD_HEADER_BYTES + stored_len).next_multiple_of(RECORD_ALIGN)
}

impl RecordHeader {
    /// A header for a new record (`stored_len` and `crc` are filled in by `write`).
    pub fn new(
        kind: RecordKind,
        codec: Codec,
        level: u8,
        generation: u32,
        seq: u64,
        id: ChunkId,
        raw_len: u32,
    ) -> RecordHeader {
        RecordHeader {
            kind,
            codec,
            level: record_level(kind, level),
            generation,
            seq,
            id,
            raw_len,
            stored_len: 0,
            crc: 0,
        }
    }

    /// Write this header + `payload` into `out` (which must hold
    /// `record_span(payload.len())` bytes), setting the stored length and computing the CRC.
    pub fn write(&self, payload: &[u8], out: &mut [u8]) {
        let RecordHeader {
            kind,
            codec,
            level,
            generation,
            seq,
            id,
            raw_len,
            ..
        } = *self;
        let span = record_span(payload.len());
        assert!(out.len() >= span, "record buffer too small");
        let h = &mut out[..RECORD_HEADER_BYTES];
        h.fill(0);
        h[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        h[4] = RECORD_FORMAT_VERSION;
        h[5] = kind as u8;
        h[6] = codec as u8;
        h[7] = level;
        h[8..12].copy_from_slice(&generation.to_le_bytes());
        h[16..24].copy_from_slice(&seq.to_le_bytes());
        h[24..24 + CHUNK_ID_BYTES].copy_from_slice(&id.0);
        h[60..64].copy_from_slice(&raw_len.to_le_bytes());
        h[64..68].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        out[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + payload.len()].copy_from_slice(payload);
        out[RECORD_HEADER_BYTES + payload.len()..span].fill(0);
        // The header (its CRC field still zero) and the payload are contiguous.
        let crc = crc_fast::crc32_iscsi(&out[..RECORD_HEADER_BYTES + payload.len()]);
        out[68..72].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decode a header; the CRC is checked separately with [`RecordHeader::check_crc`] once
    /// the payload is at hand.
    pub fn decode(b: &[u8]) -> Result<RecordHeader, FormatError> {
        if b.len() < RECORD_HEADER_BYTES {
            return Err(FormatError::Range("record header length"));
        }
        check_magic(rd_u32(b, 0), RECORD_MAGIC)?;
        if b[4] != RECORD_FORMAT_VERSION {
            return Err(FormatError::Version(b[4] as u32));
        }
        let kind = match b[5] {
            1 => RecordKind::Chunk,
            2 => RecordKind::Tombstone,
            _ => return Err(FormatError::Range("record kind")),
        };
        let codec = Codec::from_u8(b[6]).ok_or(FormatError::Range("codec"))?;
        let stored_len = rd_u32(b, 64);
        if stored_len as usize > MAX_CHUNK_STORED_BYTES {
            return Err(FormatError::Range("stored_len"));
        }
        let raw_len = rd_u32(b, 60);
        if raw_len as usize > hivefs_net::chunk::MAX_CHUNK_RAW_BYTES {
            return Err(FormatError::Range("raw_len"));
        }
        Ok(RecordHeader {
            kind,
            codec,
            level: record_level(kind, b[7]),
            generation: rd_u32(b, 8),
            seq: rd_u64(b, 16),
            id: ChunkId(b[24..24 + CHUNK_ID_BYTES].try_into().expect("id bytes")),
            raw_len,
            stored_len,
            crc: rd_u32(b, 68),
        })
    }

    /// Check the CRC over `record` = header bytes followed by the payload.
    pub fn check_crc(&self, record: &[u8]) -> Result<(), FormatError> {
        let n = RECORD_HEADER_BYTES + self.stored_len as usize;
        if record.len() < n {
            return Err(FormatError::Range("record truncated"));
        }
        let mut hdr = [0u8; RECORD_HEADER_BYTES];
        hdr.copy_from_slice(&record[..RECORD_HEADER_BYTES]);
        hdr[68..72].fill(0);
        let crc = hivefs_net::crc32c_parts(&[&hdr, &record[RECORD_HEADER_BYTES..n]]);
        if crc == self.crc {
            Ok(())
        } else {
            Err(FormatError::Checksum)
        }
    }
}

pub const CONTINUATION_MAGIC: u32 = u32::from_le_bytes(*b"HCNT");

/// A block that resumes a segment after a restart: records after it carry `generation`.
/// It is valid only where a scan of the records before it ends, naming the generation
/// and next sequence number the scan ended with; since generations are never reused, no
/// stale bytes can satisfy that. This lets a node keep appending to the segment it was
/// writing when it stopped instead of abandoning the rest of it.
///
/// ```text
/// 0 magic u32 "HCNT" | 4 format u8 | 5..8 reserved | 8 generation u32
/// 12 prev_generation u32 | 16 first_seq u64 | 24 crc u32
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContinuationBlock {
    pub generation: u32,
    pub prev_generation: u32,
    pub first_seq: u64,
}

impl ContinuationBlock {
    pub fn encode_into(&self, b: &mut [u8]) {
        b[..BLOCK_SIZE].fill(0);
        b[0..4].copy_from_slice(&CONTINUATION_MAGIC.to_le_bytes());
        b[4] = RECORD_FORMAT_VERSION;
        b[8..12].copy_from_slice(&self.generation.to_le_bytes());
        b[12..16].copy_from_slice(&self.prev_generation.to_le_bytes());
        b[16..24].copy_from_slice(&self.first_seq.to_le_bytes());
        let crc = crc_fast::crc32_iscsi(&b[..24]);
        b[24..28].copy_from_slice(&crc.to_le_bytes());
    }

    pub fn decode(b: &[u8]) -> Result<ContinuationBlock, FormatError> {
        if b.len() < 28 {
            return Err(FormatError::Range("continuation length"));
        }
        check_magic(rd_u32(b, 0), CONTINUATION_MAGIC)?;
        if b[4] != RECORD_FORMAT_VERSION {
            return Err(FormatError::Version(b[4] as u32));
        }
        if crc_fast::crc32_iscsi(&b[..24]) != rd_u32(b, 24) {
            return Err(FormatError::Checksum);
        }
        Ok(ContinuationBlock {
            generation: rd_u32(b, 8),
            prev_generation: rd_u32(b, 12),
            first_seq: rd_u64(b, 16),
        })
    }
}

/// Bytes of one segment-summary entry.
///
/// ```text
///  0 kind u8 | 1 codec u8 | 2 reserved u16 | 4 offset u32 | 8 stored_len u32
/// 12 raw_len u32 | 16 seq u64 | 24 id [33] | 57 level u8 | 58 reserved [6]
/// ```
pub const SUMMARY_ENTRY_BYTES: usize = 64;
pub const FOOTER_MAGIC: u32 = u32::from_le_bytes(*b"HFTR");

/// One record as listed in its segment's summary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SummaryEntry {
    pub kind: RecordKind,
    pub codec: Codec,
    /// As in the record's header.
    pub level: u8,
    /// Offset of the record from the segment start.
    pub offset: u32,
    pub stored_len: u32,
    pub raw_len: u32,
    pub seq: u64,
    pub id: ChunkId,
}

impl SummaryEntry {
    pub fn encode_into(&self, b: &mut [u8]) {
        let b = &mut b[..SUMMARY_ENTRY_BYTES];
        b.fill(0);
        b[0] = self.kind as u8;
        b[1] = self.codec as u8;
        b[4..8].copy_from_slice(&self.offset.to_le_bytes());
        b[8..12].copy_from_slice(&self.stored_len.to_le_bytes());
        b[12..16].copy_from_slice(&self.raw_len.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..24 + CHUNK_ID_BYTES].copy_from_slice(&self.id.0);
        b[57] = self.level;
    }

    pub fn decode(b: &[u8]) -> Result<SummaryEntry, FormatError> {
        if b.len() < SUMMARY_ENTRY_BYTES {
            return Err(FormatError::Range("summary entry length"));
        }
        let kind = match b[0] {
            1 => RecordKind::Chunk,
            2 => RecordKind::Tombstone,
            _ => return Err(FormatError::Range("summary kind")),
        };
        let stored_len = rd_u32(b, 8);
        if stored_len as usize > MAX_CHUNK_STORED_BYTES {
            return Err(FormatError::Range("summary stored_len"));
        }
        Ok(SummaryEntry {
            kind,
            level: record_level(kind, b[57]),
            codec: Codec::from_u8(b[1]).ok_or(FormatError::Range("summary codec"))?,
            offset: rd_u32(b, 4),
            stored_len,
            raw_len: rd_u32(b, 12),
            seq: rd_u64(b, 16),
            id: ChunkId(b[24..24 + CHUNK_ID_BYTES].try_into().expect("id bytes")),
        })
    }
}

/// Bytes at the end of a segment that a summary of `entries` records and its footer take.
pub fn summary_span(entries: usize) -> u64 {
    ((entries * SUMMARY_ENTRY_BYTES).next_multiple_of(BLOCK_SIZE) + BLOCK_SIZE) as u64
}

/// The last block of a sealed segment: where its summary lies and what it covers. A
/// segment's summary is the durable checkpoint of that segment's part of the index, so a
/// restart reads summaries instead of records for every sealed segment.
///
/// ```text
///  0 magic u32 "HFTR" | 4 format u8 | 5..8 reserved | 8 generation u32 | 12 entries u32
/// 16 first_seq u64 | 24 summary_offset u64 | 32 summary_crc u32 | 36 crc u32
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentFooter {
    pub generation: u32,
    pub entries: u32,
    pub first_seq: u64,
    pub summary_offset: u64,
    pub summary_crc: u32,
}

impl SegmentFooter {
    pub fn encode_into(&self, b: &mut [u8]) {
        b[..BLOCK_SIZE].fill(0);
        b[0..4].copy_from_slice(&FOOTER_MAGIC.to_le_bytes());
        b[4] = RECORD_FORMAT_VERSION;
        b[8..12].copy_from_slice(&self.generation.to_le_bytes());
        b[12..16].copy_from_slice(&self.entries.to_le_bytes());
        b[16..24].copy_from_slice(&self.first_seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.summary_offset.to_le_bytes());
        b[32..36].copy_from_slice(&self.summary_crc.to_le_bytes());
        let crc = crc_fast::crc32_iscsi(&b[..36]);
        b[36..40].copy_from_slice(&crc.to_le_bytes());
    }

    pub fn decode(b: &[u8]) -> Result<SegmentFooter, FormatError> {
        if b.len() < 40 {
            return Err(FormatError::Range("footer length"));
        }
        check_magic(rd_u32(b, 0), FOOTER_MAGIC)?;
        if b[4] != RECORD_FORMAT_VERSION {
            return Err(FormatError::Version(b[4] as u32));
        }
        if crc_fast::crc32_iscsi(&b[..36]) != rd_u32(b, 36) {
            return Err(FormatError::Checksum);
        }
        Ok(SegmentFooter {
            generation: rd_u32(b, 8),
            entries: rd_u32(b, 12),
            first_seq: rd_u64(b, 16),
            summary_offset: rd_u64(b, 24),
            summary_crc: rd_u32(b, 32),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_roundtrip_and_rejects_corruption() {
        let sb = Superblock::plan(1 << 30, 2, 4 << 20, 4096, [3; 32]).unwrap();
        let mut b = sb.encode();
        assert_eq!(Superblock::decode(&b).unwrap(), sb);
        b[9] ^= 1;
        assert_eq!(Superblock::decode(&b), Err(FormatError::Checksum));
        assert!(Superblock::plan(1 << 20, 2, 4 << 20, 4096, [0; 32]).is_err());
        assert!(sb.required_bytes() <= 1 << 30);
        let l1 = sb.shard_layout(1);
        assert_eq!(
            l1.first_segment_offset,
            DATA_START + sb.segments_per_shard as u64 * (4 << 20)
        );
    }

    #[test]
    fn record_roundtrip_and_crc() {
        let id = ChunkId([9; CHUNK_ID_BYTES]);
        let payload = b"hello records";
        let mut buf = vec![0u8; record_span(payload.len())];
        RecordHeader::new(RecordKind::Chunk, Codec::Raw, 3, 7, 42, id, 13).write(payload, &mut buf);
        let h = RecordHeader::decode(&buf).unwrap();
        assert_eq!(
            (
                h.kind,
                h.level,
                h.generation,
                h.seq,
                h.id,
                h.raw_len,
                h.stored_len
            ),
            (RecordKind::Chunk, 3, 7, 42, id, 13, 13)
        );
        h.check_crc(&buf).unwrap();
        buf[RECORD_HEADER_BYTES + 2] ^= 0x10;
        assert_eq!(h.check_crc(&buf), Err(FormatError::Checksum));
        let mut big = buf.clone();
        big[64..68].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            RecordHeader::decode(&big),
            Err(FormatError::Range("stored_len"))
        );
    }

    #[test]
    fn continuation_block() {
        let c = ContinuationBlock {
            generation: 9,
            prev_generation: 4,
            first_seq: 123,
        };
        let mut b = [0u8; BLOCK_SIZE];
        c.encode_into(&mut b);
        assert_eq!(ContinuationBlock::decode(&b).unwrap(), c);
        b[9] ^= 1;
        assert_eq!(ContinuationBlock::decode(&b), Err(FormatError::Checksum));
    }

    #[test]
    fn summary_and_footer() {
        let e = SummaryEntry {
            kind: RecordKind::Tombstone,
            level: 0,
            codec: Codec::Lz4,
            offset: 4096,
            stored_len: 9,
            raw_len: 20,
            seq: 77,
            id: ChunkId([4; CHUNK_ID_BYTES]),
        };
        let mut b = [0u8; SUMMARY_ENTRY_BYTES];
        e.encode_into(&mut b);
        assert_eq!(SummaryEntry::decode(&b).unwrap(), e);
        b[0] = 9;
        assert!(SummaryEntry::decode(&b).is_err());
        let f = SegmentFooter {
            generation: 3,
            entries: 2,
            first_seq: 10,
            summary_offset: 8192,
            summary_crc: 5,
        };
        let mut fb = [0u8; BLOCK_SIZE];
        f.encode_into(&mut fb);
        assert_eq!(SegmentFooter::decode(&fb).unwrap(), f);
        fb[13] ^= 1;
        assert_eq!(SegmentFooter::decode(&fb), Err(FormatError::Checksum));
        assert_eq!(summary_span(0), BLOCK_SIZE as u64);
        assert_eq!(summary_span(65), 3 * BLOCK_SIZE as u64);
    }

    #[test]
    fn control_and_segment_headers() {
        let c = ControlBlock {
            shard: 3,
            counter: 9,
            next_generation: 77,
        };
        assert_eq!(ControlBlock::decode(&c.encode()).unwrap(), c);
        let s = SegmentHeader {
            shard: 1,
            segment: 5,
            generation: 6,
            first_seq: 1000,
        };
        let mut b = [0u8; BLOCK_SIZE];
        s.encode_into(&mut b);
        assert_eq!(SegmentHeader::decode(&b).unwrap(), s);
        b[17] ^= 1;
        assert_eq!(SegmentHeader::decode(&b), Err(FormatError::Checksum));
    }
}
