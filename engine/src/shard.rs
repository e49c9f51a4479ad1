//! One shard's storage state machine: dedupe index, chunk log, group commit, replay.
//!
//! Ownership and concurrency: a [`ShardCore`] is owned by exactly one thread (a shard
//! thread in a node, or the simulator). It does no I/O of its own beyond the
//! [`BlockDevice`] it is given, reads no clock (callers pass `now_us`) and uses no
//! randomness, so a seeded simulator reproduces any run exactly.
//!
//! The put path, per chunk:
//! 1. a chunk already `Verified` answers `Duplicate` at once; one `Pending` in a commit
//!    batch waits for that batch to become durable (a duplicate is never acknowledged
//!    before the first copy is on disk);
//! 2. otherwise its bytes are decompressed and hashed against the id *before* anything is
//!    written: a chunk that fails is `Rejected` and counted, and never reaches the log, so
//!    garbage uploaded under a popular id cannot poison the pool;
//! 3. it is appended to the open commit batch (state `Pending`);
//! 4. one batch at a time is written (whole blocks, then a flush barrier); when the flush
//!    completes its entries become `Verified` and their puts are acknowledged.
//!
//! Replay (at [`ShardCore::open`]) reads the control block, reserves a fresh range of
//! segment generations (durably, before any new segment is written), then scans every
//! segment in use in sequence order, stopping each at its first invalid record. A segment
//! that was open at a crash is never appended to again: writing resumes in a new segment,
//! so stale bytes beyond a torn tail can never be mistaken for new records.

use crate::format::{
    record_span, summary_span, ContinuationBlock, ControlBlock, RecordHeader, RecordKind,
    SegmentFooter, SegmentHeader, ShardLayout, SummaryEntry, RECORD_HEADER_BYTES,
    SUMMARY_ENTRY_BYTES,
};
use crate::index::{EntryState, Index, IndexEntry, Location};
use hivefs_net::chunk::{
    self, ChunkId, Codec, DedupeKey, MAX_CHUNK_RAW_BYTES, MAX_CHUNK_STORED_BYTES,
};
use hivefs_nvme::{
    run_sync, AlignedBuf, BlockDevice, IoCompletion, IoError, IoOp, IoRequest, BLOCK_SIZE,
};
use std::collections::{HashMap, HashSet, VecDeque};

/// Generations reserved per control-block write.
pub const GENERATION_RESERVE: u32 = 1 << 16;
/// Upper bound on chunks queued in a shard waiting for room in a commit batch. The node
/// stops reading from connections long before this (flow-control credits).
pub const MAX_QUEUED_CHUNKS: usize = 1 << 16;
/// Bytes read per I/O while replaying a segment.
const REPLAY_READ_BYTES: usize = 4 << 20;
/// Size of a pooled read buffer: a maximal default chunk (256 KiB) with its record header,
/// unaligned at both ends.
const READ_BUF_BYTES: usize = (256 << 10) + 3 * BLOCK_SIZE;
/// Read buffers a shard keeps for reuse (about its connections' credits of gets).
const READ_POOL_MAX: usize = 128;
/// Requests per synchronous batch at format and open (within any queue depth).
const SYNC_BATCH: usize = 32;

/// Tunables of a shard.
#[derive(Clone, Copy, Debug)]
pub struct ShardConfig {
    /// A commit batch is submitted once it holds this many bytes (or the device is idle).
    /// 4 MiB measured best here (hive-perf put-unique, TLS, medians of 3: 1 MiB 0.83 GB/s,
    /// 4 MiB 1.04 GB/s, 8 MiB 0.92 GB/s).
    pub commit_max_bytes: usize,
    /// Copies a stored chunk is recorded as having (one node: 1).
    pub replication_level: u8,
    /// Replay sealed segments from their summaries (false: scan every record; the
    /// simulator compares both).
    pub use_summaries: bool,
}

impl Default for ShardConfig {
    fn default() -> Self {
        ShardConfig {
            commit_max_bytes: 4 << 20,
            replication_level: 1,
            use_summaries: true,
        }
    }
}

/// Operating errors of a shard.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ShardError {
    #[error("device error: {0}")]
    Device(#[from] IoError),
    #[error("the shard's device failed earlier ({0}); restart the node")]
    Failed(String),
    #[error("no free segment left on this shard")]
    NoSpace,
    #[error("corrupt on-device state: {0}")]
    Corrupt(String),
    #[error("chunk {0} not found")]
    NotFound(ChunkId),
    #[error("stored record for {id} is corrupt: {detail}")]
    CorruptRecord { id: ChunkId, detail: String },
    #[error("bad request: {0}")]
    BadRequest(String),
}

/// One chunk of a put.
#[derive(Clone, Debug)]
pub struct PutChunk {
    pub id: ChunkId,
    pub codec: Codec,
    pub raw_len: u32,
    pub data: ChunkBytes,
}

/// A chunk's stored bytes, possibly a range of a received frame's body shared by all the
/// chunks of that put: the node copies put data once, into the commit batch.
#[derive(Clone, Debug)]
pub struct ChunkBytes {
    buf: std::sync::Arc<Vec<u8>>,
    range: std::ops::Range<usize>,
}

impl ChunkBytes {
    /// `range` of `buf` (which must hold it).
    pub fn shared(buf: std::sync::Arc<Vec<u8>>, range: std::ops::Range<usize>) -> ChunkBytes {
        assert!(
            range.start <= range.end && range.end <= buf.len(),
            "chunk range outside its buffer"
        );
        ChunkBytes { buf, range }
    }
}

impl From<Vec<u8>> for ChunkBytes {
    fn from(v: Vec<u8>) -> ChunkBytes {
        let range = 0..v.len();
        ChunkBytes {
            buf: std::sync::Arc::new(v),
            range,
        }
    }
}

impl std::ops::Deref for ChunkBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.range.clone()]
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// Written now (durable and verified).
    Stored,
    /// Already present (durable and verified).
    Duplicate,
    /// The bytes do not decode or do not hash to the id: nothing was stored.
    Rejected,
}

/// A chunk as read back from the log (still compressed).
#[derive(Debug)]
pub struct StoredChunk {
    pub codec: Codec,
    pub raw_len: u32,
    pub data: ReadBytes,
}

/// A chunk's stored bytes as a get returns them: inside the read buffer the device filled
/// (no copy; hand it back with [`ShardCore::recycle_read`] so the next get reuses it), or a copy
/// (a chunk served from a commit batch still in memory).
#[derive(Debug)]
pub enum ReadBytes {
    Owned(Vec<u8>),
    InRead {
        buf: AlignedBuf,
        start: usize,
        len: usize,
    },
}

impl std::ops::Deref for ReadBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ReadBytes::Owned(v) => v,
            ReadBytes::InRead { buf, start, len } => &buf[*start..*start + *len],
        }
    }
}

/// What the shard reports back for a ticket.
#[derive(Debug)]
pub enum Completion {
    Put {
        ticket: u64,
        claim_epoch: u64,
        result: Result<Vec<PutOutcome>, ShardError>,
    },
    Get {
        ticket: u64,
        result: Result<StoredChunk, ShardError>,
    },
    Delete {
        ticket: u64,
        result: Result<u32, ShardError>,
    },
}

/// Counters since the shard opened (chunk totals come from the index).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ShardStats {
    pub shard: u16,
    pub chunks: u64,
    pub logical_bytes: u64,
    pub stored_bytes: u64,
    pub offered_bytes: u64,
    pub puts_stored: u64,
    pub puts_duplicate: u64,
    pub puts_rejected: u64,
    pub has_ids: u64,
    pub has_hits: u64,
    pub gets: u64,
    pub gets_corrupt: u64,
    pub tombstones: u64,
    pub commits: u64,
    pub commit_bytes: u64,
    pub segments_used: u32,
    pub segments_total: u32,
    pub device_bytes_used: u64,
    pub device_bytes_total: u64,
    pub replayed_records: u64,
    pub replayed_summaries: u64,
    /// Continuation blocks followed during replay (segments resumed by earlier boots).
    pub replayed_continuations: u64,
    /// Unsealed segments whose scan stopped with valid records after the stop (a torn
    /// commit batch, or damage): not appended to, so those records are kept.
    pub segments_with_records_beyond: u64,
    pub gc_epoch: u64,
    pub failed: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SegmentState {
    Free,
    /// Holds records; never appended to again unless it is the active segment.
    InUse {
        generation: u32,
        first_seq: u64,
    },
}

/// Where the scan of an unsealed segment ended: appending resumes there after a restart.
struct ScanEnd {
    segment: u32,
    end_off: u64,
    generation: u32,
    summary: Vec<SummaryEntry>,
}

/// The segment being appended to.
struct Active {
    segment: u32,
    generation: u32,
    /// Where the next commit batch starts (block aligned).
    next_off: u64,
    /// Every record appended so far, for the summary written when the segment is sealed.
    summary: Vec<SummaryEntry>,
}

/// A commit batch: blocks of the active segment being filled, or being written.
struct Batch {
    no: u64,
    /// The batch's bytes; `None` while the device holds them for the commit write.
    buf: Option<AlignedBuf>,
    segment: u32,
    /// Segment offset of `buf[0]` (block aligned).
    start_off: u64,
    /// Bytes of `buf` filled.
    len: usize,
    /// (id, seq) of each record, to mark entries verified when durable.
    records: Vec<(ChunkId, u64, RecordKind)>,
    /// (ticket, index in the ticket, outcome to report) resolved when durable.
    waiters: Vec<(u64, usize, PutOutcome)>,
    /// Delete tickets resolved when durable.
    delete_waiters: Vec<u64>,
    /// Gets of entries in this batch that arrived while the device held its buffer.
    deferred_gets: Vec<(u64, ChunkId, Location)>,
}

impl Batch {
    fn empty(no: u64, buf: AlignedBuf) -> Batch {
        Batch {
            no,
            buf: Some(buf),
            segment: 0,
            start_off: 0,
            len: 0,
            records: Vec::new(),
            waiters: Vec::new(),
            delete_waiters: Vec::new(),
            deferred_gets: Vec::new(),
        }
    }

    fn buf_mut(&mut self) -> &mut AlignedBuf {
        self.buf.as_mut().expect("a building batch owns its buffer")
    }
}

struct PutTicket {
    outcomes: Vec<Option<PutOutcome>>,
    outstanding: usize,
    claim_epoch: u64,
}

struct DeleteTicket {
    removed: u32,
    outstanding: usize,
}

enum Queued {
    Put {
        ticket: u64,
        idx: usize,
        chunk: PutChunk,
    },
    Delete {
        ticket: u64,
        id: ChunkId,
    },
}

enum IoPurpose {
    CommitWrite,
    CommitFlush,
    Get {
        ticket: u64,
        id: ChunkId,
        loc: Location,
        skip: usize,
    },
}

/// The state machine of one shard. See the module docs.
pub struct ShardCore {
    dev: Box<dyn BlockDevice>,
    layout: ShardLayout,
    key: DedupeKey,
    cfg: ShardConfig,
    index: Index,
    gc_epoch: u64,
    /// While a collection runs: its epoch and every id claimed since it began (has hits and
    /// puts). The sweep spares them. Claims are recorded only in this process's life: a
    /// restarted shard refuses a sweep for a window it did not open.
    gc_window: Option<(u64, HashSet<ChunkId>)>,
    next_seq: u64,
    segments: Vec<SegmentState>,
    /// Generations this boot may use: [next_generation, generation_limit).
    next_generation: u32,
    generation_limit: u32,
    /// First generation of this boot: every generation on the device is below it.
    generation_first: u32,
    /// The last unsealed segment found by replay, resumed at the first append.
    resumable: Option<ScanEnd>,
    control: ControlBlock,
    /// The segment being appended to and its next free (block-aligned) offset.
    active: Option<Active>,
    building: Batch,
    /// The batch whose write + flush is in flight.
    inflight: Option<Batch>,
    spare: Option<AlignedBuf>,
    read_pool: Vec<AlignedBuf>,
    next_batch_no: u64,
    queue: VecDeque<Queued>,
    puts: HashMap<u64, PutTicket>,
    deletes: HashMap<u64, DeleteTicket>,
    io: HashMap<u64, IoPurpose>,
    next_tag: u64,
    commit_ios_left: u8,
    failed: Option<String>,
    stats: ShardStats,
    done: Vec<Completion>,
}

fn batch_buf_bytes(cfg: &ShardConfig) -> usize {
    // Room for a segment header block, a full batch and one maximal record past the mark.
    (BLOCK_SIZE + cfg.commit_max_bytes + record_span(MAX_CHUNK_STORED_BYTES) + BLOCK_SIZE)
        .next_multiple_of(BLOCK_SIZE)
}

impl ShardCore {
    /// Write a fresh shard's control block (used by `hive init` and tests).
    pub fn format(dev: &mut dyn BlockDevice, layout: &ShardLayout) -> Result<(), ShardError> {
        let cb = ControlBlock {
            shard: layout.shard,
            counter: 1,
            next_generation: 1,
        };
        let mut a = AlignedBuf::new(BLOCK_SIZE);
        a.copy_from_slice(&cb.encode());
        let b = AlignedBuf::new(BLOCK_SIZE); // slot B zeroed: invalid
        let mut reqs = vec![
            IoRequest {
                tag: 0,
                op: IoOp::Write {
                    offset: layout.control_offset(0),
                    buf: a,
                },
            },
            IoRequest {
                tag: 1,
                op: IoOp::Write {
                    offset: layout.control_offset(1),
                    buf: b,
                },
            },
        ];
        // Zero every segment header so no stale segment from an older format is replayed.
        for s in 0..layout.segment_count {
            reqs.push(IoRequest {
                tag: 2 + s as u64,
                op: IoOp::Write {
                    offset: layout.segment_offset(s),
                    buf: AlignedBuf::new(BLOCK_SIZE),
                },
            });
        }
        for chunk in reqs.chunks_mut(SYNC_BATCH) {
            let batch: Vec<IoRequest> = chunk
                .iter_mut()
                .map(|r| IoRequest {
                    tag: r.tag,
                    op: std::mem::replace(&mut r.op, IoOp::Flush),
                })
                .collect();
            check_all(run_sync(dev, batch)?)?;
        }
        check_all(run_sync(
            dev,
            vec![IoRequest {
                tag: 0,
                op: IoOp::Flush,
            }],
        )?)?;
        Ok(())
    }

    /// Open a shard: read its control block, reserve generations, replay its log.
    pub fn open(
        mut dev: Box<dyn BlockDevice>,
        layout: ShardLayout,
        key: DedupeKey,
        cfg: ShardConfig,
    ) -> Result<ShardCore, ShardError> {
        // 1. Control block: the valid slot with the higher counter.
        // A transient misread of the newer slot would make the older one win and reuse
        // generations, so an invalid slot is read again before it is believed.
        let mut slots = Vec::new();
        for slot in 0..2u8 {
            slots.extend(read_decoded(
                dev.as_mut(),
                layout.control_offset(slot),
                ControlBlock::decode,
            )?);
        }
        let control = slots
            .into_iter()
            .filter(|c| c.shard == layout.shard)
            .max_by_key(|c| c.counter)
            .ok_or_else(|| {
                ShardError::Corrupt(format!(
                    "shard {}: no valid control block (not formatted?)",
                    layout.shard
                ))
            })?;

        // 2. Reserve a generation range durably before any segment of it can be written.
        let first_gen = control.next_generation;
        let mut shard = ShardCore {
            building: Batch::empty(1, AlignedBuf::new(batch_buf_bytes(&cfg))),
            spare: Some(AlignedBuf::new(batch_buf_bytes(&cfg))),
            read_pool: Vec::new(),
            dev,
            layout,
            key,
            cfg,
            index: Index::default(),
            gc_epoch: 1,
            gc_window: None,
            next_seq: 1,
            segments: vec![SegmentState::Free; layout.segment_count as usize],
            next_generation: first_gen,
            generation_limit: first_gen,
            generation_first: first_gen,
            resumable: None,
            control,
            active: None,
            inflight: None,
            next_batch_no: 2,
            queue: VecDeque::new(),
            puts: HashMap::new(),
            deletes: HashMap::new(),
            io: HashMap::new(),
            next_tag: 1,
            commit_ios_left: 0,
            failed: None,
            stats: ShardStats {
                shard: layout.shard,
                segments_total: layout.segment_count,
                device_bytes_total: layout.segment_bytes * layout.segment_count as u64,
                ..Default::default()
            },
            done: Vec::new(),
        };
        shard.reserve_generations()?;

        // 3. Segment headers of this shard, generation below the reserved range.
        let mut in_use: Vec<(u32, SegmentHeader)> = Vec::new();
        for first in (0..layout.segment_count).step_by(SYNC_BATCH) {
            let last = (first + SYNC_BATCH as u32).min(layout.segment_count);
            let reads = (first..last)
                .map(|s| IoRequest {
                    tag: s as u64,
                    op: IoOp::Read {
                        offset: layout.segment_offset(s),
                        buf: AlignedBuf::new(BLOCK_SIZE),
                    },
                })
                .collect();
            for c in run_sync(shard.dev.as_mut(), reads)? {
                let seg = c.tag as u32;
                let first = match (&c.result, c.buf.as_ref()) {
                    (Ok(()), Some(b)) => Some(b),
                    _ => None,
                };
                let mut header = first.and_then(|b| SegmentHeader::decode(b).ok());
                // A failed read, or a block that is neither valid nor a free segment's
                // zeroed header, is read again before it is believed.
                let retry = match first {
                    Some(b) => header.is_none() && b.iter().any(|&x| x != 0),
                    None => true,
                };
                if retry {
                    header = read_decoded(
                        shard.dev.as_mut(),
                        layout.segment_offset(seg),
                        SegmentHeader::decode,
                    )?;
                }
                if let Some(h) = header {
                    if h.shard == layout.shard && h.segment == seg && h.generation < first_gen {
                        in_use.push((seg, h));
                    }
                }
            }
        }
        in_use.sort_by_key(|(_, h)| h.first_seq);

        // 4. Replay each in sequence order.
        for (seg, h) in in_use {
            shard.segments[seg as usize] = SegmentState::InUse {
                generation: h.generation,
                first_seq: h.first_seq,
            };
            if h.first_seq >= shard.next_seq {
                if shard.cfg.use_summaries && shard.replay_summary(seg, &h)? {
                    shard.resumable = None;
                } else {
                    // Unsealed: the last one of these is where appending resumes, unless
                    // the scan stopped at damage with valid records after it.
                    let end = shard.replay_segment(seg, &h)?;
                    let beyond =
                        shard.records_beyond(seg, end.end_off, h.generation, shard.next_seq)?;
                    if let Some(at) = beyond {
                        // Valid records past the end of the log: the rest of a commit batch
                        // torn by a crash (never acknowledged), or damage in the middle of
                        // the log (acknowledged records after it are missing from the index
                        // until repair). Either way appending here would overwrite them.
                        tracing::warn!(shard = layout.shard, segment = seg, end = end.end_off, valid_at = at, "valid records after the end of the log (a commit batch torn by a crash, or damage); they stay on disk and writing continues in a new segment");
                        shard.stats.segments_with_records_beyond += 1;
                        shard.resumable = None;
                    } else {
                        shard.resumable = Some(end);
                    }
                }
            } else {
                // A segment overlapping sequence numbers already replayed can only come from
                // a bug; refuse rather than guess which records win.
                return Err(ShardError::Corrupt(format!(
                    "segment {seg} first_seq {} overlaps replayed seq {}",
                    h.first_seq, shard.next_seq
                )));
            }
        }
        shard.stats.segments_used = shard
            .segments
            .iter()
            .filter(|s| **s != SegmentState::Free)
            .count() as u32;
        Ok(shard)
    }

    fn reserve_generations(&mut self) -> Result<(), ShardError> {
        let limit = self
            .next_generation
            .checked_add(GENERATION_RESERVE)
            .ok_or_else(|| ShardError::Corrupt("segment generations exhausted".into()))?;
        let cb = ControlBlock {
            shard: self.layout.shard,
            counter: self.control.counter + 1,
            next_generation: limit,
        };
        let slot = (cb.counter % 2) as u8;
        let mut buf = AlignedBuf::new(BLOCK_SIZE);
        buf.copy_from_slice(&cb.encode());
        let reqs = vec![
            IoRequest {
                tag: 0,
                op: IoOp::Write {
                    offset: self.layout.control_offset(slot),
                    buf,
                },
            },
            IoRequest {
                tag: 1,
                op: IoOp::Flush,
            },
        ];
        check_all(run_sync(self.dev.as_mut(), reqs)?)?;
        self.control = cb;
        self.generation_limit = limit;
        Ok(())
    }

    /// Replay a sealed segment from its summary. `Ok(false)` if it has no valid summary
    /// (not sealed, or the seal was torn): then its records are scanned instead.
    fn replay_summary(&mut self, seg: u32, h: &SegmentHeader) -> Result<bool, ShardError> {
        let base = self.layout.segment_offset(seg);
        let seg_bytes = self.layout.segment_bytes;
        let fb = self.read_retrying(base + seg_bytes - BLOCK_SIZE as u64, BLOCK_SIZE)?;
        let Ok(f) = SegmentFooter::decode(&fb) else {
            return Ok(false);
        };
        let span = summary_span(f.entries as usize);
        if f.generation < h.generation
            || f.first_seq != h.first_seq
            || span > seg_bytes - BLOCK_SIZE as u64
            || f.summary_offset != seg_bytes - span
        {
            return Ok(false);
        }
        let n = f.entries as usize * SUMMARY_ENTRY_BYTES;
        let sb = self.read_retrying(
            base + f.summary_offset,
            (span as usize - BLOCK_SIZE).max(BLOCK_SIZE),
        )?;
        if crc32c::crc32c(&sb[..n]) != f.summary_crc {
            return Ok(false);
        }
        let mut entries = Vec::with_capacity(f.entries as usize);
        for (i, chunk) in sb[..n].chunks_exact(SUMMARY_ENTRY_BYTES).enumerate() {
            let Ok(e) = SummaryEntry::decode(chunk) else {
                return Ok(false);
            };
            if e.seq != h.first_seq + i as u64 || e.offset as u64 >= f.summary_offset {
                return Ok(false);
            }
            entries.push(e);
        }
        for e in entries {
            match e.kind {
                RecordKind::Chunk => {
                    let loc = Location {
                        segment: seg,
                        offset: e.offset,
                        stored_len: e.stored_len,
                        raw_len: e.raw_len,
                        codec: e.codec,
                    };
                    self.index.insert(
                        e.id,
                        IndexEntry {
                            loc,
                            state: EntryState::Verified,
                            seq: e.seq,
                            replication_level: self.cfg.replication_level,
                        },
                    );
                }
                RecordKind::Tombstone => {
                    self.index.remove(&e.id);
                }
            }
            self.stats.replayed_records += 1;
        }
        self.stats.replayed_summaries += 1;
        self.next_seq = h.first_seq + f.entries as u64;
        Ok(true)
    }

    /// Read `len` bytes at device offset `offset`, retrying a failed read twice (startup
    /// reads; a transient error must not keep a node down).
    fn read_retrying(&mut self, offset: u64, len: usize) -> Result<AlignedBuf, ShardError> {
        let mut last = None;
        for _ in 0..3 {
            let req = IoRequest {
                tag: 0,
                op: IoOp::Read {
                    offset,
                    buf: AlignedBuf::new(len),
                },
            };
            match run_sync(self.dev.as_mut(), vec![req]).map(|mut d| d.pop()) {
                Ok(Some(IoCompletion {
                    result: Ok(()),
                    buf: Some(buf),
                    ..
                })) => return Ok(buf),
                Ok(Some(IoCompletion { result: Err(e), .. })) | Err(e) => last = Some(e),
                Ok(_) => last = Some(IoError::Device("read completion without a buffer".into())),
            }
        }
        Err(ShardError::Device(last.expect("three attempts")))
    }

    /// Whether a valid record of this segment (generation at least `min_generation`,
    /// sequence number at least `seq`) lies at or after `from`: then the scan ended at a
    /// damaged record, not at the end of the log, and the segment must not be appended to
    /// (that would overwrite the records after the damage).
    fn records_beyond(
        &mut self,
        seg: u32,
        from: u64,
        min_generation: u32,
        seq: u64,
    ) -> Result<Option<u64>, ShardError> {
        let seg_bytes = self.layout.segment_bytes;
        let base = self.layout.segment_offset(seg);
        let mut start = from / BLOCK_SIZE as u64 * BLOCK_SIZE as u64;
        while start < seg_bytes {
            let len = (REPLAY_READ_BYTES as u64).min(seg_bytes - start) as usize;
            let buf = self.read_retrying(base + start, len)?;
            let mut at = 0;
            while at + RECORD_HEADER_BYTES <= len {
                if buf[at..at + 4] == crate::format::RECORD_MAGIC.to_le_bytes() {
                    if let Ok(h) = RecordHeader::decode(&buf[at..]) {
                        let end = at + RECORD_HEADER_BYTES + h.stored_len as usize;
                        if h.generation >= min_generation
                            && h.generation < self.generation_first
                            && h.seq >= seq
                            && end <= len
                            && h.check_crc(&buf[at..end]).is_ok()
                        {
                            return Ok(Some(start + at as u64));
                        }
                    }
                }
                at += crate::format::RECORD_ALIGN;
            }
            // Overlap windows by a header so a record straddling them is still seen.
            start += (len - RECORD_HEADER_BYTES.min(len)).max(BLOCK_SIZE) as u64
                / BLOCK_SIZE as u64
                * BLOCK_SIZE as u64;
        }
        Ok(None)
    }

    /// Scan a segment's records in order (following continuation blocks), applying them
    /// to the index, until the first one that is not the next valid record.
    fn replay_segment(&mut self, seg: u32, h: &SegmentHeader) -> Result<ScanEnd, ShardError> {
        let seg_bytes = self.layout.segment_bytes;
        let base = self.layout.segment_offset(seg);
        let mut expect_seq = h.first_seq;
        let mut generation = h.generation;
        let mut summary = Vec::new();
        // Window of the segment in memory: [win_off, win_off + win.len()).
        let mut win: Vec<u8> = Vec::new();
        let mut win_off: u64 = 0;
        let mut pos: u64 = BLOCK_SIZE as u64;
        // Where the first invalid bytes after the last valid record were seen, and whether
        // that place was already read a second time (a transient read error or bit flip
        // must not end the log early).
        let mut first_bad: Option<u64> = None;
        let mut reread: Option<u64> = None;
        loop {
            // Make sure [pos, pos + need) is in the window: first a header (or, at a block
            // boundary, a continuation block), then the whole record.
            let at_block = pos.is_multiple_of(BLOCK_SIZE as u64);
            let mut need = if at_block {
                BLOCK_SIZE as u64
            } else {
                RECORD_HEADER_BYTES as u64
            };
            need = need.min(seg_bytes.saturating_sub(pos));
            let mut header: Option<RecordHeader> = None;
            loop {
                if need < RECORD_HEADER_BYTES as u64 || pos + need > seg_bytes {
                    break;
                }
                if pos < win_off || pos + need > win_off + win.len() as u64 {
                    let start = pos / BLOCK_SIZE as u64 * BLOCK_SIZE as u64;
                    let len = ((pos + need - start) as usize)
                        .max(REPLAY_READ_BYTES)
                        .next_multiple_of(BLOCK_SIZE)
                        .min((seg_bytes - start) as usize);
                    let buf = self.read_retrying(base + start, len)?;
                    win.clear();
                    win.extend_from_slice(&buf[..len]);
                    win_off = start;
                    if pos + need > win_off + win.len() as u64 {
                        break;
                    }
                }
                let at = (pos - win_off) as usize;
                match header {
                    None => match RecordHeader::decode(&win[at..]) {
                        Ok(rh) => {
                            need = (RECORD_HEADER_BYTES + rh.stored_len as usize) as u64;
                            header = Some(rh);
                        }
                        Err(_) => break,
                    },
                    Some(_) => break,
                }
            }
            let in_window = |len: u64| pos >= win_off && pos + len <= win_off + win.len() as u64;
            let valid = match header {
                Some(rh) if in_window(need) => {
                    let at = (pos - win_off) as usize;
                    rh.generation == generation
                        && rh.seq == expect_seq
                        && rh.check_crc(&win[at..at + need as usize]).is_ok()
                }
                _ => false,
            };
            if !valid {
                first_bad.get_or_insert(pos);
                if !at_block {
                    // Padding after the last record of a commit batch: next batch starts at
                    // the next block.
                    pos = pos.next_multiple_of(BLOCK_SIZE as u64);
                    continue;
                }
                // A continuation written by a later boot exactly where the records ended.
                if pos + BLOCK_SIZE as u64 <= seg_bytes && in_window(BLOCK_SIZE as u64) {
                    let at = (pos - win_off) as usize;
                    if let Ok(c) = ContinuationBlock::decode(&win[at..at + BLOCK_SIZE]) {
                        if c.prev_generation == generation
                            && c.first_seq == expect_seq
                            && c.generation > generation
                            && c.generation < self.generation_first
                        {
                            generation = c.generation;
                            self.stats.replayed_continuations += 1;
                            pos += BLOCK_SIZE as u64;
                            first_bad = None;
                            continue;
                        }
                    }
                }
                // Before taking this as the end of the log, read it again once.
                let bad = first_bad.expect("set above");
                if reread != Some(bad) {
                    reread = Some(bad);
                    win.clear();
                    pos = bad;
                    continue;
                }
                break;
            }
            first_bad = None;
            let rh = header.expect("valid implies header");
            match rh.kind {
                RecordKind::Chunk => {
                    let loc = Location {
                        segment: seg,
                        offset: pos as u32,
                        stored_len: rh.stored_len,
                        raw_len: rh.raw_len,
                        codec: rh.codec,
                    };
                    self.index.insert(
                        rh.id,
                        IndexEntry {
                            loc,
                            state: EntryState::Verified,
                            seq: rh.seq,
                            replication_level: self.cfg.replication_level,
                        },
                    );
                }
                RecordKind::Tombstone => {
                    self.index.remove(&rh.id);
                }
            }
            summary.push(SummaryEntry {
                kind: rh.kind,
                codec: rh.codec,
                offset: pos as u32,
                stored_len: rh.stored_len,
                raw_len: rh.raw_len,
                seq: rh.seq,
                id: rh.id,
            });
            self.stats.replayed_records += 1;
            expect_seq += 1;
            pos += record_span(rh.stored_len as usize) as u64;
        }
        self.next_seq = expect_seq;
        Ok(ScanEnd {
            segment: seg,
            end_off: pos.next_multiple_of(BLOCK_SIZE as u64).min(seg_bytes),
            generation,
            summary,
        })
    }

    pub fn shard(&self) -> u16 {
        self.layout.shard
    }

    pub fn gc_epoch(&self) -> u64 {
        self.gc_epoch
    }

    /// Stamp claims with `epoch` from now on (the metadata service's current epoch), with
    /// no collection running: a window a failed collection left open is closed, so its
    /// record of claims does not grow without end.
    pub fn set_gc_epoch(&mut self, epoch: u64) {
        self.gc_epoch = epoch;
        self.gc_window = None;
    }

    /// A collection begins: claims are stamped `epoch` and recorded until [`end_gc`].
    ///
    /// [`end_gc`]: Self::end_gc
    pub fn begin_gc(&mut self, epoch: u64) {
        self.gc_epoch = epoch;
        self.gc_window = Some((epoch, HashSet::new()));
    }

    /// The collection of `epoch` is over: stop recording claims.
    pub fn end_gc(&mut self, epoch: u64) {
        if self.gc_window.as_ref().is_some_and(|(e, _)| *e == epoch) {
            self.gc_window = None;
        }
    }

    fn note_claim(&mut self, id: &ChunkId) {
        if let Some((_, claimed)) = &mut self.gc_window {
            claimed.insert(*id);
        }
    }

    /// Verified ids in id order after `after`, at most `max`; and whether more follow.
    pub fn list_ids(&self, after: Option<&ChunkId>, max: usize) -> (Vec<ChunkId>, bool) {
        let mut ids: Vec<ChunkId> = self
            .index
            .iter()
            .filter(|(id, e)| e.state == EntryState::Verified && after.is_none_or(|a| *id > a))
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        let more = ids.len() > max;
        ids.truncate(max);
        (ids, more)
    }

    /// The sweep of collection `epoch`: tombstone those of `ids` that are stored, verified
    /// and not claimed since the collection began. The [`Completion::Delete`] for `ticket`
    /// counts what was removed. Returns (spared, stored bytes of those being removed), or
    /// an error if no collection of `epoch` is open here (a restart lost its claims).
    pub fn sweep(
        &mut self,
        ticket: u64,
        epoch: u64,
        ids: Vec<ChunkId>,
    ) -> Result<(u64, u64), ShardError> {
        let Some((e, claimed)) = &self.gc_window else {
            return Err(ShardError::BadRequest(format!(
                "no collection of epoch {epoch} is open on this shard"
            )));
        };
        if *e != epoch {
            return Err(ShardError::BadRequest(format!(
                "the open collection is of epoch {e}, not {epoch}"
            )));
        }
        let mut doomed = Vec::new();
        let (mut spared, mut bytes) = (0u64, 0u64);
        for id in ids {
            match self.index.get(&id) {
                Some(entry) if entry.state == EntryState::Verified => {
                    if claimed.contains(&id) {
                        spared += 1;
                    } else {
                        bytes += entry.loc.stored_len as u64;
                        doomed.push(id);
                    }
                }
                // Pending (a put in flight) or gone: not ours to remove.
                Some(_) => spared += 1,
                None => {}
            }
        }
        self.delete(ticket, doomed);
        Ok((spared, bytes))
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    pub fn dedupe_key(&self) -> &DedupeKey {
        &self.key
    }

    /// Which of `ids` are stored and verified; the answer is a claim in the current epoch.
    pub fn has(&mut self, ids: &[ChunkId], out: &mut Vec<bool>) -> u64 {
        out.clear();
        for id in ids {
            let hit = match self.index.get(id) {
                Some(e) if e.state == EntryState::Verified => {
                    self.stats.has_hits += 1;
                    self.stats.offered_bytes += e.loc.raw_len as u64;
                    true
                }
                _ => false,
            };
            if hit {
                self.note_claim(id);
            }
            out.push(hit);
        }
        self.stats.has_ids += ids.len() as u64;
        self.gc_epoch
    }

    /// Chunks waiting for room in a commit batch (callers stop feeding when this is high).
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Store a batch of chunks; the [`Completion::Put`] for `ticket` comes from `poll`.
    pub fn put(&mut self, ticket: u64, chunks: Vec<PutChunk>) {
        if let Some(f) = &self.failed {
            self.done.push(Completion::Put {
                ticket,
                claim_epoch: self.gc_epoch,
                result: Err(ShardError::Failed(f.clone())),
            });
            return;
        }
        if self.queue.len() + chunks.len() > MAX_QUEUED_CHUNKS {
            self.done.push(Completion::Put {
                ticket,
                claim_epoch: self.gc_epoch,
                result: Err(ShardError::BadRequest("shard queue full".into())),
            });
            return;
        }
        let n = chunks.len();
        for c in &chunks {
            // Whatever becomes of it, a chunk being put is claimed: the sweep spares it.
            self.note_claim(&c.id);
        }
        self.puts.insert(
            ticket,
            PutTicket {
                outcomes: vec![None; n],
                outstanding: n,
                claim_epoch: self.gc_epoch,
            },
        );
        for (idx, chunk) in chunks.into_iter().enumerate() {
            self.queue.push_back(Queued::Put { ticket, idx, chunk });
        }
        if n == 0 {
            self.finish_put(ticket);
        }
        self.pump();
    }

    /// Log tombstones for `ids` (the sweep of GC); completes when durable with the count of
    /// ids that were present.
    pub fn delete(&mut self, ticket: u64, ids: Vec<ChunkId>) {
        if let Some(f) = &self.failed {
            self.done.push(Completion::Delete {
                ticket,
                result: Err(ShardError::Failed(f.clone())),
            });
            return;
        }
        self.deletes.insert(
            ticket,
            DeleteTicket {
                removed: 0,
                outstanding: ids.len(),
            },
        );
        if ids.is_empty() {
            self.deletes.remove(&ticket);
            self.done.push(Completion::Delete {
                ticket,
                result: Ok(0),
            });
        }
        for id in ids {
            self.queue.push_back(Queued::Delete { ticket, id });
        }
        self.pump();
    }

    /// Read a chunk; the [`Completion::Get`] comes from `poll` (at once for a chunk still in
    /// memory).
    pub fn get(&mut self, ticket: u64, id: ChunkId) {
        self.stats.gets += 1;
        let Some(e) = self.index.get(&id).copied() else {
            self.done.push(Completion::Get {
                ticket,
                result: Err(ShardError::NotFound(id)),
            });
            return;
        };
        if let EntryState::Pending { batch } = e.state {
            // Served from the batch holding it; if the device has that batch's buffer for
            // its commit write, the get waits for the commit.
            let b = if self.building.no == batch {
                Some(&mut self.building)
            } else {
                self.inflight.as_mut().filter(|b| b.no == batch)
            };
            let result = match b {
                Some(b) => match &b.buf {
                    Some(buf) => Ok(batch_chunk(buf, b.start_off, &e.loc)),
                    None => {
                        b.deferred_gets.push((ticket, id, e.loc));
                        return;
                    }
                },
                None => Err(ShardError::Corrupt(format!(
                    "pending entry of {id:?} names batch {batch} which is gone"
                ))),
            };
            self.done.push(Completion::Get { ticket, result });
            return;
        }
        if let Some(f) = &self.failed {
            self.done.push(Completion::Get {
                ticket,
                result: Err(ShardError::Failed(f.clone())),
            });
            return;
        }
        let abs = self.layout.segment_offset(e.loc.segment) + e.loc.offset as u64;
        let start = abs / BLOCK_SIZE as u64 * BLOCK_SIZE as u64;
        let end = (abs + (RECORD_HEADER_BYTES + e.loc.stored_len as usize) as u64)
            .next_multiple_of(BLOCK_SIZE as u64);
        let tag = self.tag(IoPurpose::Get {
            ticket,
            id,
            loc: e.loc,
            skip: (abs - start) as usize,
        });
        let mut reqs = vec![IoRequest {
            tag,
            op: IoOp::Read {
                offset: start,
                buf: self.read_buf((end - start) as usize),
            },
        }];
        if let Err(err) = self.dev.submit(&mut reqs) {
            self.io.remove(&tag);
            if let Some(IoRequest {
                op: IoOp::Read { buf, .. },
                ..
            }) = reqs.pop()
            {
                self.read_pool.push(buf);
            }
            self.done.push(Completion::Get {
                ticket,
                result: Err(err.into()),
            });
        }
    }

    /// A read buffer of `len` bytes from the pool (allocated, zeroed, only when the pool
    /// has none big enough): gets reuse buffers instead of allocating and zeroing each.
    fn read_buf(&mut self, len: usize) -> AlignedBuf {
        match self.read_pool.iter().position(|b| b.capacity() >= len) {
            Some(i) => {
                let mut b = self.read_pool.swap_remove(i);
                b.set_len(len);
                b
            }
            None => {
                let mut b = AlignedBuf::new(len.max(READ_BUF_BYTES));
                b.set_len(len);
                b
            }
        }
    }

    /// Give back the bytes of a finished get, so its read buffer serves the next one.
    pub fn recycle_read(&mut self, bytes: ReadBytes) {
        if let ReadBytes::InRead { buf, .. } = bytes {
            self.return_read_buf(buf);
        }
    }

    fn return_read_buf(&mut self, buf: AlignedBuf) {
        if self.read_pool.len() < READ_POOL_MAX {
            self.read_pool.push(buf);
        }
    }

    fn tag(&mut self, p: IoPurpose) -> u64 {
        let t = self.next_tag;
        self.next_tag += 1;
        self.io.insert(t, p);
        t
    }

    /// Drive the shard: reap device completions, submit a commit batch when the device is
    /// free, and move finished tickets into `out`. `wait` blocks on the device when
    /// something is in flight and nothing else is ready.
    pub fn poll(&mut self, out: &mut Vec<Completion>, wait: bool) {
        let mut comps: Vec<IoCompletion> = Vec::new();
        let block = wait && self.done.is_empty() && self.dev.in_flight() > 0;
        self.dev.poll(&mut comps, block);
        for c in comps {
            self.on_io(c);
        }
        self.maybe_submit();
        self.pump();
        self.maybe_submit();
        out.append(&mut self.done);
    }

    /// The device's completion descriptor (see `BlockDevice::completion_fd`): a node waits
    /// on it together with its sockets.
    pub fn completion_fd(&mut self) -> Option<std::os::fd::RawFd> {
        self.dev.completion_fd()
    }

    /// Whether `poll` can make progress now without waiting for the device: completions to
    /// hand out, or a built batch the idle device can take.
    pub fn ready_now(&self) -> bool {
        !self.done.is_empty()
            || (self.failed.is_none() && self.inflight.is_none() && self.building.len > 0)
    }

    /// Whether device I/O is in flight or work is waiting for it.
    pub fn busy(&self) -> bool {
        self.dev.in_flight() > 0
            || self.building.len > 0
            || !self.queue.is_empty()
            || !self.done.is_empty()
    }

    pub fn stats(&self) -> ShardStats {
        let mut s = self.stats.clone();
        s.chunks = self.index.verified_chunks();
        s.logical_bytes = self.index.verified_raw_bytes();
        s.stored_bytes = self.index.verified_stored_bytes();
        s.segments_used = self
            .segments
            .iter()
            .filter(|s| **s != SegmentState::Free)
            .count() as u32;
        let active_extra = self.active.as_ref().map_or(0, |a| a.next_off);
        let full = s.segments_used.saturating_sub(self.active.is_some() as u32) as u64
            * self.layout.segment_bytes;
        s.device_bytes_used = full + active_extra;
        s.gc_epoch = self.gc_epoch;
        s.failed = self.failed.clone();
        s
    }

    fn fail(&mut self, why: String) {
        if self.failed.is_some() {
            return;
        }
        tracing::error!(shard = self.layout.shard, "shard failed: {why}");
        self.failed = Some(why.clone());
        // Everything not yet acknowledged is answered with the error; nothing is acked.
        let err = ShardError::Failed(why);
        if let Some(mut b) = self.inflight.take() {
            for (ticket, _, _) in std::mem::take(&mut b.deferred_gets) {
                self.done.push(Completion::Get {
                    ticket,
                    result: Err(err.clone()),
                });
            }
            if let Some(buf) = b.buf.take() {
                self.recycle(buf);
            }
        }
        for (ticket, _, _) in std::mem::take(&mut self.building.deferred_gets) {
            self.done.push(Completion::Get {
                ticket,
                result: Err(err.clone()),
            });
        }
        let tickets: Vec<u64> = self.puts.keys().copied().collect();
        for t in tickets {
            let p = self.puts.remove(&t).expect("ticket");
            self.done.push(Completion::Put {
                ticket: t,
                claim_epoch: p.claim_epoch,
                result: Err(err.clone()),
            });
        }
        let dels: Vec<u64> = self.deletes.keys().copied().collect();
        for t in dels {
            self.deletes.remove(&t);
            self.done.push(Completion::Delete {
                ticket: t,
                result: Err(err.clone()),
            });
        }
        self.queue.clear();
        // Pending entries will never become durable in this run.
        let pending: Vec<ChunkId> = self
            .index
            .iter()
            .filter(|(_, e)| matches!(e.state, EntryState::Pending { .. }))
            .map(|(id, _)| *id)
            .collect();
        for id in pending {
            self.index.remove(&id);
        }
        self.building.len = 0;
        self.building.records.clear();
        self.building.waiters.clear();
        self.building.delete_waiters.clear();
    }

    fn on_io(&mut self, c: IoCompletion) {
        let Some(purpose) = self.io.remove(&c.tag) else {
            debug_assert!(false, "completion for unknown tag {}", c.tag);
            return;
        };
        match purpose {
            IoPurpose::CommitWrite | IoPurpose::CommitFlush => {
                if let Some(buf) = c.buf {
                    // The write hands the batch buffer back.
                    match self.inflight.as_mut() {
                        Some(b) => b.buf = Some(buf),
                        None => self.recycle(buf),
                    }
                }
                if self.failed.is_some() {
                    return; // a late completion of a commit that already failed
                }
                if let Err(e) = c.result {
                    self.commit_ios_left = 0;
                    self.fail(format!("commit failed: {e}"));
                    return;
                }
                self.commit_ios_left -= 1;
                if self.commit_ios_left == 0 {
                    self.commit_durable();
                }
            }
            IoPurpose::Get {
                ticket,
                id,
                loc,
                skip,
            } => {
                let result = match (c.result, c.buf) {
                    (Ok(()), Some(buf)) => match self.check_get(&buf[skip..], &id, &loc) {
                        Ok((codec, raw_len)) => Ok(StoredChunk {
                            codec,
                            raw_len,
                            data: ReadBytes::InRead {
                                buf,
                                start: skip + RECORD_HEADER_BYTES,
                                len: loc.stored_len as usize,
                            },
                        }),
                        Err(e) => {
                            self.return_read_buf(buf);
                            Err(e)
                        }
                    },
                    (Err(e), buf) => {
                        if let Some(buf) = buf {
                            self.return_read_buf(buf);
                        }
                        Err(ShardError::Device(e))
                    }
                    (Ok(()), None) => {
                        Err(ShardError::Corrupt("read completion without buffer".into()))
                    }
                };
                if matches!(result, Err(ShardError::CorruptRecord { .. })) {
                    self.stats.gets_corrupt += 1;
                }
                self.done.push(Completion::Get { ticket, result });
            }
        }
    }

    /// Check the record a get read: it is this chunk's, and its CRC holds. Returns its
    /// codec and raw length.
    fn check_get(
        &self,
        rec: &[u8],
        id: &ChunkId,
        loc: &Location,
    ) -> Result<(Codec, u32), ShardError> {
        let bad = |detail: String| ShardError::CorruptRecord { id: *id, detail };
        let h = RecordHeader::decode(rec).map_err(|e| bad(e.to_string()))?;
        if h.id != *id || h.kind != RecordKind::Chunk || h.stored_len != loc.stored_len {
            return Err(bad(format!(
                "record at {}:{} is not this chunk",
                loc.segment, loc.offset
            )));
        }
        h.check_crc(rec).map_err(|e| bad(e.to_string()))?;
        Ok((h.codec, h.raw_len))
    }

    /// Move queued work into the building batch while it has room.
    fn pump(&mut self) {
        while self.failed.is_none() {
            let Some(q) = self.queue.front() else { break };
            let (id, span) = match q {
                Queued::Put { chunk, .. } => (chunk.id, record_span(chunk.data.len())),
                Queued::Delete { id, .. } => (*id, record_span(0)),
            };
            // Resolve what needs no log space first.
            match self.queue.front().expect("front") {
                Queued::Put { ticket, idx, .. } => {
                    let (ticket, idx) = (*ticket, *idx);
                    match self.index.get(&id).map(|e| e.state) {
                        Some(EntryState::Verified) => {
                            self.queue.pop_front();
                            self.stats.puts_duplicate += 1;
                            self.stats.offered_bytes +=
                                self.index.get(&id).map_or(0, |e| e.loc.raw_len as u64);
                            self.resolve_put(ticket, idx, PutOutcome::Duplicate);
                            continue;
                        }
                        Some(EntryState::Pending { batch }) => {
                            self.queue.pop_front();
                            self.stats.puts_duplicate += 1;
                            let b = if self.building.no == batch {
                                &mut self.building
                            } else {
                                self.inflight
                                    .as_mut()
                                    .filter(|b| b.no == batch)
                                    .expect("pending batch exists")
                            };
                            b.waiters.push((ticket, idx, PutOutcome::Duplicate));
                            continue;
                        }
                        None => {
                            let Some(Queued::Put { chunk, .. }) = self.queue.front() else {
                                unreachable!()
                            };
                            if !self.chunk_is_valid(chunk) {
                                self.queue.pop_front();
                                self.stats.puts_rejected += 1;
                                tracing::warn!(shard = self.layout.shard, id = ?id, "put rejected: bytes do not verify against the id");
                                self.resolve_put(ticket, idx, PutOutcome::Rejected);
                                continue;
                            }
                        }
                    }
                }
                Queued::Delete { ticket, .. } => {
                    if self.index.get(&id).is_none() {
                        let ticket = *ticket;
                        self.queue.pop_front();
                        self.resolve_delete(ticket, false);
                        continue;
                    }
                }
            }
            // Needs log space.
            if !self.make_room(span) {
                break;
            }
            let q = self.queue.pop_front().expect("front");
            self.append(q);
        }
    }

    fn chunk_is_valid(&self, c: &PutChunk) -> bool {
        c.raw_len as usize <= MAX_CHUNK_RAW_BYTES
            && c.data.len() <= MAX_CHUNK_STORED_BYTES
            && chunk::check(&self.key, &c.id, c.codec, &c.data, c.raw_len as usize).is_ok()
    }

    /// Make sure the building batch can take a record of `span` bytes. False when it must
    /// wait (batch full, or the segment is full and the in-flight batch must finish first).
    fn make_room(&mut self, span: usize) -> bool {
        let b = &self.building;
        if b.len >= self.cfg.commit_max_bytes {
            return false;
        }
        if let Some(a) = &self.active {
            if b.len == 0 || b.segment == a.segment {
                let start = if b.len == 0 { a.next_off } else { b.start_off };
                // The record, and the summary that will list it, must both fit.
                let need = start + (b.len + span) as u64 + summary_span(a.summary.len() + 1);
                if need <= self.layout.segment_bytes {
                    if b.len == 0 {
                        self.building.segment = a.segment;
                        self.building.start_off = start;
                    }
                    return true;
                }
            }
            if b.len > 0 {
                return false; // submit this batch first, then seal
            }
            // Segment full: its summary and footer become the next batch; it stays in use.
            self.seal_active();
            return false;
        }
        if self.building.len > 0 {
            return false; // the seal of the previous segment goes out first
        }
        if let Some(r) = self.resumable.take() {
            return self.resume_segment(r, span);
        }
        match self.open_segment() {
            Ok(()) => true,
            Err(e) => {
                self.reject_queue(e);
                false
            }
        }
    }

    /// Keep appending to the segment the last boot was writing: a continuation block with a
    /// fresh generation where its records end. If a record no longer fits, seal it instead.
    fn resume_segment(&mut self, r: ScanEnd, span: usize) -> bool {
        let fits = r.end_off + (BLOCK_SIZE + span) as u64 + summary_span(r.summary.len() + 1)
            <= self.layout.segment_bytes;
        if !fits {
            self.active = Some(Active {
                segment: r.segment,
                generation: r.generation,
                next_off: r.end_off,
                summary: r.summary,
            });
            self.seal_active();
            return false;
        }
        if self.next_generation >= self.generation_limit {
            if let Err(e) = self.reserve_generations() {
                self.reject_queue(e);
                return false;
            }
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        let c = ContinuationBlock {
            generation,
            prev_generation: r.generation,
            first_seq: self.next_seq,
        };
        c.encode_into(&mut self.building.buf_mut()[..BLOCK_SIZE]);
        self.building.segment = r.segment;
        self.building.start_off = r.end_off;
        self.building.len = BLOCK_SIZE;
        self.active = Some(Active {
            segment: r.segment,
            generation,
            next_off: r.end_off + BLOCK_SIZE as u64,
            summary: r.summary,
        });
        true
    }

    /// Build the active segment's summary + footer into the (empty) building batch, at the
    /// end of the segment, and stop appending to it.
    fn seal_active(&mut self) {
        let a = self.active.take().expect("seal needs an active segment");
        debug_assert_eq!(self.building.len, 0);
        let span = summary_span(a.summary.len()) as usize;
        let start_off = self.layout.segment_bytes - span as u64;
        debug_assert!(start_off >= a.next_off);
        let b = &mut self.building;
        b.segment = a.segment;
        b.start_off = start_off;
        let summary_bytes = a.summary.len() * SUMMARY_ENTRY_BYTES;
        for (i, e) in a.summary.iter().enumerate() {
            e.encode_into(&mut b.buf_mut()[i * SUMMARY_ENTRY_BYTES..]);
        }
        b.buf_mut()[summary_bytes..span - BLOCK_SIZE].fill(0);
        let first_seq = match self.segments[a.segment as usize] {
            SegmentState::InUse { first_seq, .. } => first_seq,
            SegmentState::Free => unreachable!("active segment is in use"),
        };
        let footer = SegmentFooter {
            generation: a.generation,
            entries: a.summary.len() as u32,
            first_seq,
            summary_offset: start_off,
            summary_crc: crc32c::crc32c(&b.buf_mut()[..summary_bytes]),
        };
        footer.encode_into(&mut b.buf_mut()[span - BLOCK_SIZE..span]);
        b.len = span;
    }

    fn reject_queue(&mut self, e: ShardError) {
        tracing::error!(shard = self.layout.shard, "{e}");
        while let Some(q) = self.queue.pop_front() {
            match q {
                Queued::Put { ticket, .. } => {
                    if let Some(p) = self.puts.remove(&ticket) {
                        self.done.push(Completion::Put {
                            ticket,
                            claim_epoch: p.claim_epoch,
                            result: Err(e.clone()),
                        });
                    }
                }
                Queued::Delete { ticket, .. } => {
                    if self.deletes.remove(&ticket).is_some() {
                        self.done.push(Completion::Delete {
                            ticket,
                            result: Err(e.clone()),
                        });
                    }
                }
            }
        }
    }

    /// Start a new segment: its header is the first block of the building batch.
    fn open_segment(&mut self) -> Result<(), ShardError> {
        let seg = self
            .segments
            .iter()
            .position(|s| *s == SegmentState::Free)
            .ok_or(ShardError::NoSpace)? as u32;
        if self.next_generation >= self.generation_limit {
            self.reserve_generations()?;
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        let h = SegmentHeader {
            shard: self.layout.shard,
            segment: seg,
            generation,
            first_seq: self.next_seq,
        };
        debug_assert_eq!(self.building.len, 0);
        h.encode_into(&mut self.building.buf_mut()[..BLOCK_SIZE]);
        self.building.segment = seg;
        self.building.start_off = 0;
        self.building.len = BLOCK_SIZE;
        self.segments[seg as usize] = SegmentState::InUse {
            generation,
            first_seq: self.next_seq,
        };
        self.active = Some(Active {
            segment: seg,
            generation,
            next_off: BLOCK_SIZE as u64,
            summary: Vec::new(),
        });
        Ok(())
    }

    fn append(&mut self, q: Queued) {
        let active = self
            .active
            .as_mut()
            .expect("append needs an active segment");
        let generation = active.generation;
        let seq = self.next_seq;
        self.next_seq += 1;
        let b = &mut self.building;
        let at = b.len;
        let off = b.start_off + at as u64;
        match q {
            Queued::Put { ticket, idx, chunk } => {
                let span = record_span(chunk.data.len());
                RecordHeader::new(
                    RecordKind::Chunk,
                    chunk.codec,
                    generation,
                    seq,
                    chunk.id,
                    chunk.raw_len,
                )
                .write(&chunk.data, &mut b.buf_mut()[at..at + span]);
                b.len += span;
                b.records.push((chunk.id, seq, RecordKind::Chunk));
                active.summary.push(SummaryEntry {
                    kind: RecordKind::Chunk,
                    codec: chunk.codec,
                    offset: off as u32,
                    stored_len: chunk.data.len() as u32,
                    raw_len: chunk.raw_len,
                    seq,
                    id: chunk.id,
                });
                b.waiters.push((ticket, idx, PutOutcome::Stored));
                let loc = Location {
                    segment: b.segment,
                    offset: off as u32,
                    stored_len: chunk.data.len() as u32,
                    raw_len: chunk.raw_len,
                    codec: chunk.codec,
                };
                let batch = b.no;
                self.index.insert(
                    chunk.id,
                    IndexEntry {
                        loc,
                        state: EntryState::Pending { batch },
                        seq,
                        replication_level: self.cfg.replication_level,
                    },
                );
                self.stats.puts_stored += 1;
                self.stats.offered_bytes += chunk.raw_len as u64;
            }
            Queued::Delete { ticket, id } => {
                let span = record_span(0);
                RecordHeader::new(RecordKind::Tombstone, Codec::Raw, generation, seq, id, 0)
                    .write(&[], &mut b.buf_mut()[at..at + span]);
                b.len += span;
                b.records.push((id, seq, RecordKind::Tombstone));
                active.summary.push(SummaryEntry {
                    kind: RecordKind::Tombstone,
                    codec: Codec::Raw,
                    offset: off as u32,
                    stored_len: 0,
                    raw_len: 0,
                    seq,
                    id,
                });
                b.delete_waiters.push(ticket);
                self.index.remove(&id);
                self.stats.tombstones += 1;
                if let Some(d) = self.deletes.get_mut(&ticket) {
                    d.removed += 1;
                }
            }
        }
    }

    /// Submit the building batch if the device has no commit in flight.
    fn maybe_submit(&mut self) {
        if self.failed.is_some() || self.inflight.is_some() || self.building.len == 0 {
            return;
        }
        let Some(spare) = self.spare.take() else {
            return;
        };
        let mut b = std::mem::replace(&mut self.building, Batch::empty(self.next_batch_no, spare));
        self.next_batch_no += 1;
        let write_len = b.len.next_multiple_of(BLOCK_SIZE);
        let filled = b.len;
        b.buf_mut()[filled..write_len].fill(0);
        // The segment's next batch starts after this one's last block.
        if let Some(a) = self.active.as_mut() {
            if a.segment == b.segment {
                a.next_off = b.start_off + write_len as u64;
            }
        }
        let offset = self.layout.segment_offset(b.segment) + b.start_off;
        // The batch buffer itself goes to the device, shortened to the blocks written (no
        // copy); it comes back with the write's completion.
        let mut buf = b.buf.take().expect("building batch owns its buffer");
        buf.set_len(write_len);
        let wt = self.tag(IoPurpose::CommitWrite);
        let ft = self.tag(IoPurpose::CommitFlush);
        let mut reqs = vec![
            IoRequest {
                tag: wt,
                op: IoOp::Write { offset, buf },
            },
            IoRequest {
                tag: ft,
                op: IoOp::Flush,
            },
        ];
        self.stats.commits += 1;
        self.stats.commit_bytes += write_len as u64;
        self.commit_ios_left = 2;
        self.inflight = Some(b);
        if let Err(e) = self.dev.submit(&mut reqs) {
            // A refused batch is left in place: take the buffer back.
            self.io.remove(&wt);
            self.io.remove(&ft);
            for r in reqs {
                if let IoOp::Write { buf, .. } = r.op {
                    if let Some(b) = self.inflight.as_mut() {
                        b.buf = Some(buf);
                    }
                }
            }
            self.commit_ios_left = 0;
            self.fail(format!("commit submit failed: {e}"));
        }
    }

    /// A commit buffer is free again: restore its full length and keep it as the spare.
    fn recycle(&mut self, mut buf: AlignedBuf) {
        buf.set_len(buf.capacity());
        if self.spare.is_none() {
            self.spare = Some(buf);
        }
    }

    fn commit_durable(&mut self) {
        let mut b = self.inflight.take().expect("durable batch");
        let buf = b.buf.take().expect("the write returned the batch buffer");
        for (ticket, _, loc) in std::mem::take(&mut b.deferred_gets) {
            let chunk = batch_chunk(&buf, b.start_off, &loc);
            self.done.push(Completion::Get {
                ticket,
                result: Ok(chunk),
            });
        }
        self.recycle(buf);
        for (id, seq, kind) in &b.records {
            if *kind == RecordKind::Chunk {
                self.index.mark_verified(id, *seq);
            }
        }
        for (ticket, idx, outcome) in b.waiters {
            self.resolve_put(ticket, idx, outcome);
        }
        for ticket in b.delete_waiters {
            self.resolve_delete(ticket, true);
        }
    }

    fn resolve_put(&mut self, ticket: u64, idx: usize, outcome: PutOutcome) {
        let Some(p) = self.puts.get_mut(&ticket) else {
            return;
        };
        debug_assert!(p.outcomes[idx].is_none());
        p.outcomes[idx] = Some(outcome);
        p.outstanding -= 1;
        if p.outstanding == 0 {
            self.finish_put(ticket);
        }
    }

    fn finish_put(&mut self, ticket: u64) {
        let p = self.puts.remove(&ticket).expect("ticket");
        let outcomes = p
            .outcomes
            .into_iter()
            .map(|o| o.expect("every chunk resolved"))
            .collect();
        self.done.push(Completion::Put {
            ticket,
            claim_epoch: p.claim_epoch,
            result: Ok(outcomes),
        });
    }

    fn resolve_delete(&mut self, ticket: u64, _logged: bool) {
        let Some(d) = self.deletes.get_mut(&ticket) else {
            return;
        };
        d.outstanding -= 1;
        if d.outstanding == 0 {
            let d = self.deletes.remove(&ticket).expect("ticket");
            self.done.push(Completion::Delete {
                ticket,
                result: Ok(d.removed),
            });
        }
    }

    /// Hand the device back (the simulator crashes it and reopens a new core over it).
    pub fn into_device(self) -> Box<dyn BlockDevice> {
        self.dev
    }
}

/// The stored bytes of the record at `loc` in a batch buffer that starts at `start_off`.
fn batch_chunk(buf: &AlignedBuf, start_off: u64, loc: &Location) -> StoredChunk {
    let at = (loc.offset as u64 - start_off) as usize + RECORD_HEADER_BYTES;
    StoredChunk {
        codec: loc.codec,
        raw_len: loc.raw_len,
        data: ReadBytes::Owned(buf[at..at + loc.stored_len as usize].to_vec()),
    }
}

/// Read one block and decode it. An I/O error or an invalid block that is not all zeros is
/// read again (twice): startup must not mistake a transient error for the state on disk.
fn read_decoded<T>(
    dev: &mut dyn BlockDevice,
    offset: u64,
    decode: impl Fn(&[u8]) -> Result<T, crate::format::FormatError>,
) -> Result<Option<T>, ShardError> {
    let mut last_err = None;
    for _ in 0..3 {
        let req = IoRequest {
            tag: 0,
            op: IoOp::Read {
                offset,
                buf: AlignedBuf::new(BLOCK_SIZE),
            },
        };
        match run_sync(dev, vec![req]).map(|mut d| d.pop()) {
            Ok(Some(IoCompletion {
                result: Ok(()),
                buf: Some(b),
                ..
            })) => {
                last_err = None;
                match decode(&b) {
                    Ok(v) => return Ok(Some(v)),
                    Err(_) if b.iter().all(|&x| x == 0) => return Ok(None),
                    Err(_) => continue,
                }
            }
            Ok(Some(IoCompletion { result: Err(e), .. })) | Err(e) => last_err = Some(e),
            Ok(_) => last_err = Some(IoError::Device("read completion without a buffer".into())),
        }
    }
    match last_err {
        Some(e) => Err(ShardError::Device(e)),
        None => Ok(None),
    }
}

fn check_all(done: Vec<IoCompletion>) -> Result<Vec<IoCompletion>, ShardError> {
    for c in &done {
        if let Err(e) = &c.result {
            return Err(ShardError::Device(e.clone()));
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Superblock;
    use hivefs_nvme::{SimDevice, SimFaults};

    const KEY: DedupeKey = DedupeKey([5; 32]);
    const CLEAN: SimFaults = SimFaults {
        read_error_per_million: 0,
        write_error_per_million: 0,
        bit_flip_per_million: 0,
        torn_writes: false,
    };

    fn chunk(i: u32, len: usize) -> PutChunk {
        let data: Vec<u8> = (0..len)
            .map(|j| (j as u32).wrapping_mul(2654435761).wrapping_add(i) as u8)
            .collect();
        PutChunk {
            id: ChunkId::compute(&KEY, &data),
            codec: Codec::Raw,
            raw_len: len as u32,
            data: data.into(),
        }
    }

    fn drain(s: &mut ShardCore) -> Vec<Completion> {
        let mut out = Vec::new();
        for _ in 0..1000 {
            s.poll(&mut out, true);
            if !s.busy() {
                break;
            }
        }
        out
    }

    fn shard(device_bytes: u64, segment_bytes: u64) -> ShardCore {
        let mut dev = SimDevice::new(device_bytes, 1, CLEAN);
        let sb = Superblock::plan(device_bytes, 1, segment_bytes, 16, KEY.0).unwrap();
        ShardCore::format(&mut dev, &sb.shard_layout(0)).unwrap();
        ShardCore::open(
            Box::new(dev),
            sb.shard_layout(0),
            KEY,
            ShardConfig::default(),
        )
        .unwrap()
    }

    #[test]
    fn a_full_device_refuses_puts_and_keeps_serving() {
        // 2 segments of 256 KiB: room for a few 60 KiB chunks only.
        let mut s = shard(crate::format::DATA_START + (512 << 10), 256 << 10);
        let mut stored = Vec::new();
        let mut refused = 0;
        for i in 0..20 {
            let c = chunk(i, 60 << 10);
            s.put(i as u64, vec![c.clone()]);
            for done in drain(&mut s) {
                match done {
                    Completion::Put { result: Ok(o), .. } => {
                        assert_eq!(o, vec![PutOutcome::Stored]);
                        stored.push(c.id);
                    }
                    Completion::Put {
                        result: Err(ShardError::NoSpace),
                        ..
                    } => refused += 1,
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        assert!(
            stored.len() >= 4 && refused > 0,
            "stored {} refused {refused}",
            stored.len()
        );
        for (t, id) in stored.iter().enumerate() {
            s.get(1000 + t as u64, *id);
            match drain(&mut s).pop() {
                Some(Completion::Get { result: Ok(c), .. }) => {
                    chunk::verify(&KEY, id, c.codec, &c.data, c.raw_len as usize)
                        .map(|_| ())
                        .unwrap()
                }
                other => panic!("get after ENOSPC: {other:?}"),
            }
        }
        let mut present = Vec::new();
        s.has(&stored, &mut present);
        assert!(present.iter().all(|p| *p));
    }

    #[test]
    fn duplicates_in_one_batch_are_acknowledged_when_durable() {
        let mut s = shard(64 << 20, 1 << 20);
        let c = chunk(1, 1000);
        s.put(1, vec![c.clone(), c.clone()]);
        s.put(2, vec![c.clone()]);
        // Not durable yet: nothing answers has, but a get is served from the batch.
        let mut present = Vec::new();
        s.has(&[c.id], &mut present);
        assert_eq!(present, vec![false]);
        s.get(3, c.id);
        let mut done = Vec::new();
        let mut out = Vec::new();
        while done.len() < 3 {
            s.poll(&mut out, true);
            done.append(&mut out);
        }
        let mut puts: Vec<(u64, Vec<PutOutcome>)> = done
            .into_iter()
            .filter_map(|done| match done {
                Completion::Put { ticket, result, .. } => Some((ticket, result.unwrap())),
                Completion::Get { result, .. } => {
                    assert_eq!(&result.unwrap().data[..], &c.data[..]);
                    None
                }
                other => panic!("{other:?}"),
            })
            .collect();
        puts.sort_by_key(|p| p.0);
        assert_eq!(
            puts,
            vec![
                (1, vec![PutOutcome::Stored, PutOutcome::Duplicate]),
                (2, vec![PutOutcome::Duplicate])
            ]
        );
        s.has(&[c.id], &mut present);
        assert_eq!(present, vec![true]);
        assert_eq!(s.stats().chunks, 1);
    }
}

#[cfg(test)]
mod deferred_get_tests {
    use super::*;
    use crate::format::Superblock;
    use hivefs_nvme::{SimDevice, SimFaults};

    #[test]
    fn a_get_of_a_chunk_being_written_waits_for_its_commit() {
        let key = DedupeKey([6; 32]);
        let faults = SimFaults {
            read_error_per_million: 0,
            write_error_per_million: 0,
            bit_flip_per_million: 0,
            torn_writes: false,
        };
        let mut dev = SimDevice::new(64 << 20, 3, faults);
        let sb = Superblock::plan(64 << 20, 1, 1 << 20, 16, key.0).unwrap();
        ShardCore::format(&mut dev, &sb.shard_layout(0)).unwrap();
        let mut s = ShardCore::open(
            Box::new(dev),
            sb.shard_layout(0),
            key,
            ShardConfig::default(),
        )
        .unwrap();
        let data = b"written while a get arrives".repeat(100);
        let id = ChunkId::compute(&key, &data);
        s.put(
            1,
            vec![PutChunk {
                id,
                codec: Codec::Raw,
                raw_len: data.len() as u32,
                data: data.clone().into(),
            }],
        );
        let mut out = Vec::new();
        s.poll(&mut out, false); // submits the batch: the device now holds its buffer
        assert!(
            s.inflight.as_ref().is_some_and(|b| b.buf.is_none()),
            "batch should be in flight"
        );
        s.get(2, id);
        assert!(
            out.is_empty(),
            "nothing completes before the commit: {out:?}"
        );
        while out.len() < 2 {
            s.poll(&mut out, true);
        }
        let mut got = false;
        for c in out {
            match c {
                Completion::Get { ticket: 2, result } => {
                    assert_eq!(&result.unwrap().data[..], &data[..]);
                    got = true;
                }
                Completion::Put {
                    ticket: 1, result, ..
                } => assert_eq!(result.unwrap(), vec![PutOutcome::Stored]),
                other => panic!("{other:?}"),
            }
        }
        assert!(got);
        assert_eq!(
            s.spare.as_ref().map(|b| b.len()),
            Some(batch_buf_bytes(&ShardConfig::default())),
            "buffer recycled at full length"
        );
    }
}

#[cfg(test)]
mod damage_tests {
    use super::*;
    use crate::format::Superblock;
    use crate::sim::SharedDevice;
    use hivefs_nvme::{SimDevice, SimFaults};
    use std::sync::{Arc, Mutex};

    const KEY: DedupeKey = DedupeKey([8; 32]);

    /// A formatted one-shard SimDevice (4 MiB segments) the test keeps a handle to.
    fn formatted(seed: u64) -> (SharedDevice, ShardLayout) {
        let faults = SimFaults {
            read_error_per_million: 0,
            write_error_per_million: 0,
            bit_flip_per_million: 0,
            torn_writes: false,
        };
        let dev = SharedDevice(Arc::new(Mutex::new(SimDevice::new(64 << 20, seed, faults))));
        let layout = Superblock::plan(64 << 20, 1, 4 << 20, 16, KEY.0)
            .unwrap()
            .shard_layout(0);
        ShardCore::format(&mut dev.clone(), &layout).unwrap();
        (dev, layout)
    }

    fn reopen(dev: &SharedDevice, layout: ShardLayout) -> ShardCore {
        ShardCore::open(Box::new(dev.clone()), layout, KEY, ShardConfig::default()).unwrap()
    }

    fn put_all(s: &mut ShardCore, from: u32, n: u32) -> Vec<ChunkId> {
        let mut ids = Vec::new();
        for i in from..from + n {
            let data = format!("record {i} ").repeat(50).into_bytes();
            let id = ChunkId::compute(&KEY, &data);
            s.put(
                i as u64,
                vec![PutChunk {
                    id,
                    codec: Codec::Raw,
                    raw_len: data.len() as u32,
                    data: data.into(),
                }],
            );
            let mut out = Vec::new();
            while out.is_empty() {
                s.poll(&mut out, true);
            }
            ids.push(id);
        }
        ids
    }

    #[test]
    fn damage_in_the_middle_of_the_open_segment_is_never_overwritten() {
        let (dev, layout) = formatted(9);
        let open = || reopen(&dev, layout);
        let mut s = open();
        let ids = put_all(&mut s, 0, 40);
        let victim = s.index().get(&ids[5]).unwrap().loc;
        drop(s);
        // Bit rot in record 5's payload: records 6.. are valid but follow the damage.
        let at = layout.segment_offset(victim.segment)
            + victim.offset as u64
            + RECORD_HEADER_BYTES as u64;
        dev.0.lock().unwrap().corrupt_durable(at, 8);
        let mut s = open();
        assert_eq!(s.stats().segments_with_records_beyond, 1);
        let mut present = Vec::new();
        s.has(&ids, &mut present);
        assert!(
            present[..5].iter().all(|p| *p),
            "records before the damage replay"
        );
        // New writes go to a new segment: the records after the damage stay on disk.
        let more = put_all(&mut s, 100, 5);
        assert!(more
            .iter()
            .all(|id| s.index().get(id).unwrap().loc.segment != victim.segment));
        drop(s);
        let img = dev.0.lock().unwrap().read_durable(
            layout.segment_offset(victim.segment),
            layout.segment_bytes as usize,
        );
        let last = ids[39];
        let found = (0..img.len() - RECORD_HEADER_BYTES)
            .step_by(8)
            .any(|o| RecordHeader::decode(&img[o..]).is_ok_and(|h| h.id == last));
        assert!(found, "the records after the damage were overwritten");
    }

    #[test]
    fn a_clean_restart_resumes_the_open_segment() {
        let (dev, layout) = formatted(10);
        let open = || reopen(&dev, layout);
        let mut s = open();
        let a = put_all(&mut s, 0, 10);
        let seg = s.index().get(&a[0]).unwrap().loc.segment;
        drop(s);
        let mut s = open();
        assert_eq!(s.stats().segments_with_records_beyond, 0);
        let b = put_all(&mut s, 50, 10);
        assert_eq!(
            s.index().get(&b[0]).unwrap().loc.segment,
            seg,
            "appending resumes in the same segment"
        );
        drop(s);
        let s = open();
        assert_eq!(s.stats().replayed_continuations, 1);
        let mut present = Vec::new();
        let all: Vec<ChunkId> = a.iter().chain(&b).copied().collect();
        let mut s = s;
        s.has(&all, &mut present);
        assert!(present.iter().all(|p| *p));
    }
}

#[cfg(test)]
mod gc_window_tests {
    use super::*;
    use crate::format::Superblock;
    use hivefs_nvme::{SimDevice, SimFaults};

    fn shard(key: DedupeKey) -> ShardCore {
        let faults = SimFaults {
            read_error_per_million: 0,
            write_error_per_million: 0,
            bit_flip_per_million: 0,
            torn_writes: false,
        };
        let mut dev = SimDevice::new(64 << 20, 5, faults);
        let sb = Superblock::plan(64 << 20, 1, 1 << 20, 16, key.0).unwrap();
        ShardCore::format(&mut dev, &sb.shard_layout(0)).unwrap();
        ShardCore::open(
            Box::new(dev),
            sb.shard_layout(0),
            key,
            ShardConfig::default(),
        )
        .unwrap()
    }

    fn wait(s: &mut ShardCore, ticket: u64) -> Completion {
        let mut out = Vec::new();
        loop {
            s.poll(&mut out, true);
            if let Some(i) = out.iter().position(|c| match c {
                Completion::Put { ticket: t, .. }
                | Completion::Get { ticket: t, .. }
                | Completion::Delete { ticket: t, .. } => *t == ticket,
            }) {
                return out.swap_remove(i);
            }
        }
    }

    #[test]
    fn the_sweep_spares_what_was_claimed_in_its_window_only() {
        let key = DedupeKey([8; 32]);
        let mut s = shard(key);
        let chunks: Vec<PutChunk> = (0..4u8)
            .map(|i| {
                let data = vec![i; 5000];
                PutChunk {
                    id: ChunkId::compute(&key, &data),
                    codec: Codec::Raw,
                    raw_len: data.len() as u32,
                    data: data.into(),
                }
            })
            .collect();
        let ids: Vec<ChunkId> = chunks.iter().map(|c| c.id).collect();
        s.put(1, chunks);
        assert!(matches!(
            wait(&mut s, 1),
            Completion::Put { result: Ok(_), .. }
        ));
        // No window open: a sweep is refused, nothing is removed.
        assert!(s.sweep(2, 2, ids.clone()).is_err());
        s.begin_gc(2);
        let mut present = Vec::new();
        assert_eq!(
            s.has(&ids[..1], &mut present),
            2,
            "claims are stamped with the new epoch"
        );
        // A sweep for another epoch is refused.
        assert!(s.sweep(3, 1, ids.clone()).is_err());
        let (spared, _) = s.sweep(4, 2, ids.clone()).unwrap();
        assert_eq!(spared, 1, "the id claimed by has is spared");
        assert!(matches!(
            wait(&mut s, 4),
            Completion::Delete { result: Ok(3), .. }
        ));
        s.has(&ids, &mut present);
        assert_eq!(present, vec![true, false, false, false]);
        // Closing the window (the end of a collection, or a failed one) ends the record.
        s.set_gc_epoch(2);
        assert!(s.sweep(5, 2, ids[..1].to_vec()).is_err());
        s.begin_gc(3);
        s.end_gc(3);
        assert!(s.sweep(6, 3, ids[..1].to_vec()).is_err());
    }
}
