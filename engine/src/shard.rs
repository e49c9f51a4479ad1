//! One shard's storage state machine: dedupe index, chunk log, group commit, replay.
//!
//! Ownership and concurrency: a [`ShardCore`] is owned by exactly one thread (a shard
//! thread in a node, or the simulator). It does no I/O of its own beyond the
//! [`BlockDevice`] it is given, reads no clock (callers pass `now_us`) and uses no
//! randomness, so a seeded simulator reproduces any run exactly.
//!
//! The put path, per chunk:
//! 1. a chunk already `Verified` at the put's level or higher answers `Duplicate` at
//!    once; one `Pending` in a commit batch waits for that batch to become durable (a
//!    duplicate is never acknowledged before the first copy is on disk). A chunk stored
//!    at a lower level goes on as a new one (*raised*): its new record carries the higher
//!    level and replaces the old one in the index, which then is a dead record;
//! 2. otherwise its bytes are decompressed and hashed against the id *before* anything is
//!    written: a chunk that fails is `Rejected` and counted, and never reaches the log, so
//!    garbage uploaded under a popular id cannot poison the pool;
//! 3. it is appended to the open commit batch (state `Pending`);
//! 4. one batch at a time is written (whole blocks, then a flush barrier); when the flush
//!    completes its entries become `Verified` and their puts are acknowledged.
//!
//! Replay (at [`ShardCore::open`]) reads the control block, reserves a fresh range of
//! segment generations (durably, before any new segment is written), then replays every
//! segment whose header is valid, in `first_seq` order: a sealed segment from its summary,
//! an unsealed one by scanning its records up to the first invalid one. Sequence numbers
//! grow across segments, so replay applies every record in sequence order and the last
//! record of an id decides its state (a chunk record: present; a tombstone: absent).
//! Appending resumes behind a continuation block in the last unsealed segment (see
//! `format::ContinuationBlock`), or in a new segment.
//!
//! Compaction and space reuse ([`ShardCore::compact_step`]): a *sealed* segment `S` (not the
//! active one, no valid records beyond a scan's end anywhere in it) whose live bytes
//! ([`Index::live_bytes`]) are below `compact_live_percent` of the segment is emptied and
//! freed, one segment at a time, in bounded steps:
//! 1. its summary is read (footer, then entries);
//! 2. every record of it the index still points at is read, checked (CRC, then decompressed
//!    and hashed against its id) and appended again through the commit queue as a new
//!    chunk record with a new sequence number. The index keeps pointing at `S` until the
//!    batch holding the copy is durable; then it moves to the copy, unless the id changed
//!    meanwhile (swept, so the copy is just one more dead record). Gets read `S` until
//!    then, and `S` is not written while a get's read of it is in flight;
//! 3. each tombstone of `S` is *carried* (appended again, new sequence number) or dropped,
//!    decided when it reaches the head of the commit queue:
//!    - the id is in the index (a put after the sweep, durable or in a batch that becomes
//!      durable no later than this decision's barrier, step 4): dropped. Carrying it would
//!      give it a sequence number above the re-put and delete the chunk at replay;
//!    - the shard holds *dead chunk records* of the id (chunk records on the device that
//!      the index does not point at: `dead_chunk_records`) outside `S`: carried, since
//!      without it replay would bring one of them back. While any segment has valid
//!      records beyond the end of its scan (not in the index, not counted), every
//!      tombstone is carried;
//!    - otherwise every record it shadows is gone: dropped;
//! 4. barrier: every batch up to the one being built when the last item was decided must
//!    be durable (copies, carried tombstones and any re-put a dropped tombstone relied on);
//! 5. once no index entry points into `S` and no get of it is in flight, its header block
//!    is overwritten with zeros and flushed; only when that flush completes is `S` free.
//!    A free segment is reused by [`open`]ing it like a new one, with a fresh generation.
//!
//! Why a crash at any point is safe: until step 5's flush, `S` is still replayed and every
//! copy or carried tombstone has a higher sequence number than the record it repeats, so
//! replay ends in the same state (a copy durable without its move is the same chunk; a
//! carried tombstone only repeats an absence that already holds). After the flush `S` is
//! not replayed, and everything replay needed from it is durable elsewhere (step 4). A torn
//! header write leaves either the old valid header (as if not freed) or an invalid block
//! (freed). Stale records left in a reused segment carry an older generation than its new
//! header and end its scan; its old footer fails the generation check.
//!
//! Dead chunk records are counted per id (`dead_chunk_records`, in memory, rebuilt by
//! replay): +1 when a tombstone or a later chunk record supersedes an id's record, +1 when a
//! copy takes over an id or a copy is made dead by a sweep, -1 for each of `S`'s dead
//! chunk records when `S` is freed. It holds one entry per id with dead records (about 50
//! bytes each), and dead records only exist until compaction frees their segment.
//!
//! ENOSPC: a put that needs a new segment is refused with [`ShardError::NoSpace`] while
//! free segments are at or below the reserve (`compact_reserve_segments`). Tombstones may
//! use the reserve but its last segment (with a reserve of two or more), which only
//! compaction (copies, carried tombstones) takes; a compaction starts only when what it
//! must copy surely fits, so a full shard can always still be swept and compacted.
//! Running low on free segments, or refusing a put for lack of space, requests compaction.
//!
//! [`open`]: ShardCore::open

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
/// Device queue slots gets leave free: a commit (write + flush) and a compaction step's
/// reads must always find room, or a burst of reads would fail the shard.
const RESERVED_IO_SLOTS: usize = 12;
/// Requests per synchronous batch at format and open (within any queue depth).
const SYNC_BATCH: usize = 32;
/// Compaction: record reads in flight at most, and bytes read or waiting in the commit
/// queue at most (puts and gets keep priority: a step adds at most this much work).
const COMPACT_READS_MAX: usize = 8;
const COMPACT_BYTES_MAX: usize = 1 << 20;
/// Summary entries a compaction step examines at most.
const COMPACT_ENTRIES_PER_STEP: usize = 4096;
/// Attempts at reading one record to copy it before the segment's compaction is given up.
const COMPACT_READ_ATTEMPTS: u8 = 3;

/// Tunables of a shard.
#[derive(Clone, Copy, Debug)]
pub struct ShardConfig {
    /// A commit batch is submitted once it holds this many bytes (or the device is idle).
    /// 4 MiB measured best here (hive-perf put-unique, TLS, medians of 3: 1 MiB 0.83 GB/s,
    /// 4 MiB 1.04 GB/s, 8 MiB 0.92 GB/s).
    pub commit_max_bytes: usize,
    /// Replay sealed segments from their summaries (false: scan every record; the
    /// simulator compares both).
    pub use_summaries: bool,
    /// A sealed segment whose live bytes are below this percentage of its size is
    /// compacted (its live records copied forward, the segment freed).
    pub compact_live_percent: u8,
    /// Free segments puts may not take (at most half the shard's segments): kept for
    /// tombstones and compaction, so a full shard can still be swept and compacted.
    pub compact_reserve_segments: u32,
}

impl Default for ShardConfig {
    fn default() -> Self {
        ShardConfig {
            commit_max_bytes: 4 << 20,
            use_summaries: true,
            compact_live_percent: 50,
            compact_reserve_segments: 2,
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

/// Most ids a release window records (a repair step waiting on a slow target while puts
/// stream in): beyond, the window closes and its release is refused (nothing is removed).
pub const MAX_RELEASE_WINDOW_IDS: usize = 1 << 20;

/// Of `ids`, those stored and verified and not in `spare` (what a sweep or a release
/// removes), with the count spared (in `spare`, or pending: a put in flight) and the
/// stored bytes of the rest.
fn doomed(index: &Index, ids: Vec<ChunkId>, spare: &HashSet<ChunkId>) -> (Vec<ChunkId>, u64, u64) {
    let mut doomed = Vec::new();
    let (mut spared, mut bytes) = (0u64, 0u64);
    for id in ids {
        match index.get(&id) {
            Some(entry) if entry.state == EntryState::Verified => {
                if spare.contains(&id) {
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
    (doomed, spared, bytes)
}

/// One chunk of a put.
#[derive(Clone, Debug)]
pub struct PutChunk {
    pub id: ChunkId,
    pub codec: Codec,
    pub raw_len: u32,
    /// The copies the chunk must have (at least 1): a chunk stored at a lower level is
    /// stored again at this one (see the module docs).
    pub level: u8,
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
    /// Puts of a chunk stored at a lower level, stored again at the higher one.
    pub puts_raised: u64,
    pub puts_rejected: u64,
    pub has_ids: u64,
    pub has_hits: u64,
    pub gets: u64,
    pub gets_corrupt: u64,
    pub tombstones: u64,
    pub commits: u64,
    pub commit_bytes: u64,
    pub segments_used: u32,
    pub segments_free: u32,
    pub segments_total: u32,
    pub device_bytes_used: u64,
    pub device_bytes_total: u64,
    /// Bytes of records the index points at (pending or verified).
    pub live_bytes: u64,
    /// Used device bytes that are not live records: dead records, headers, summaries,
    /// padding (what compaction can reclaim, roughly).
    pub dead_bytes: u64,
    /// Puts refused because the shard is full (free segments at the reserve).
    pub puts_no_space: u64,
    pub segments_compacted: u64,
    pub compactions_aborted: u64,
    pub compaction_chunks_moved: u64,
    pub compaction_bytes_moved: u64,
    pub compaction_tombstones_carried: u64,
    pub compaction_tombstones_dropped: u64,
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
        /// The generation of its header.
        generation: u32,
        first_seq: u64,
        /// Its summary and footer are durable: it is never appended to again, and it may
        /// be compacted.
        sealed: bool,
        /// Valid records lie beyond the end of its scan: they are in no index and no
        /// count, so the segment is never compacted and tombstones are always carried.
        opaque: bool,
    },
}

impl SegmentState {
    fn in_use(generation: u32, first_seq: u64) -> SegmentState {
        SegmentState::InUse {
            generation,
            first_seq,
            sealed: false,
            opaque: false,
        }
    }
}

/// What log space is wanted for: each may take free segments down to its own floor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RoomFor {
    Put,
    Tombstone,
    Compaction,
}

/// The compaction of one segment (see the module docs for the steps).
struct Compaction {
    segment: u32,
    phase: CompactPhase,
    /// The segment's records, from its summary.
    entries: Vec<SummaryEntry>,
    /// Chunk records of each tombstoned id in this segment (they go with it).
    chunks_here: HashMap<ChunkId, u32>,
    /// Next entry to examine.
    next: usize,
    /// Entries whose record read failed: (entry, attempts so far).
    retry: Vec<(usize, u8)>,
    /// Record reads in flight.
    reads: usize,
    /// Bytes read or queued for copying and not yet appended.
    bytes_held: usize,
    /// Items of this compaction in the commit queue, not yet appended or dropped.
    queued: usize,
    /// Something could not be copied: the segment is kept (what was copied stays valid).
    aborted: bool,
    /// ... because part of the segment cannot be read: not tried again in this process.
    unreadable: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CompactPhase {
    /// Reading the footer.
    Footer,
    /// Reading the summary.
    Summary,
    /// Reading records and queueing copies and tombstones.
    Copy,
    /// Waiting for batch `n` to be durable.
    Barrier(u64),
    /// Waiting for the segment to have no live entry and no get in flight.
    Quiesce,
    /// The header invalidation (zero block + flush) is in flight.
    Invalidate,
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
    /// Compaction copies: (id, sequence number of the record copied, the entry the index
    /// takes when this batch is durable if the id still names that record).
    copies: Vec<(ChunkId, u64, IndexEntry)>,
    /// The segment this batch seals (its summary and footer).
    seals: Option<u32>,
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
            copies: Vec::new(),
            seals: None,
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
    /// Compaction: the chunk record with sequence number `src_seq`, read back and checked.
    Copy {
        id: ChunkId,
        src_seq: u64,
        codec: Codec,
        raw_len: u32,
        data: Vec<u8>,
    },
    /// Compaction: a tombstone of the segment being freed; `chunks_here` of the id's chunk
    /// records go with that segment.
    Carry {
        id: ChunkId,
        chunks_here: u32,
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
    CompactFooter,
    CompactSummary {
        footer: SegmentFooter,
    },
    CompactRecord {
        entry: usize,
        attempts: u8,
        src_seq: u64,
        loc: Location,
        skip: usize,
    },
    CompactInvalidate,
    CompactInvalidateFlush,
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
    /// Repair's release window: its token and every id put here since it opened (a copy
    /// just made is never released on an answer older than it). See [`Self::release`].
    release_window: Option<(u64, HashSet<ChunkId>)>,
    next_release_token: u64,
    /// The first GC epoch this process heard (`set_gc_epoch` or `begin_gc`): what an entry
    /// replayed at open (`claimed_epoch` 0, claimed before the restart at the latest)
    /// counts as. `None`: none heard yet, and such an entry counts as claimed now.
    first_heard_epoch: Option<u64>,
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
    /// Gets waiting for a free device slot (FIFO): gets never take the last
    /// [`RESERVED_IO_SLOTS`] of the device's queue, which commits and compaction need.
    waiting_gets: VecDeque<(u64, ChunkId)>,
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
    /// Dead chunk records per id (see the module docs); ids with none are absent.
    dead_chunk_records: HashMap<ChunkId, u32>,
    /// Tombstones still waiting in the queue, per id. Such an id no longer answers `has`:
    /// a sweep chose it when it was unclaimed, and a claim handed out before its tombstone
    /// is appended would let a commit reference a chunk about to be deleted.
    deleting: HashMap<ChunkId, u32>,
    /// In-use segments with valid records beyond the end of their scan.
    opaque_segments: u32,
    /// Gets whose read of a segment is in flight, per segment.
    segment_reads: Vec<u32>,
    /// The compaction in progress.
    compaction: Option<Compaction>,
    /// Compaction was asked for (after a sweep, low on space) and not yet found nothing to do.
    compact_requested: bool,
    /// Segments whose compaction failed in this process (a record that cannot be read).
    compact_skip: HashSet<u32>,
    /// The highest batch number made durable.
    durable_batch: u64,
}

fn batch_buf_bytes(cfg: &ShardConfig) -> usize {
    // Room for a segment header block, a full batch and one maximal record past the mark.
    (BLOCK_SIZE + cfg.commit_max_bytes + record_span(MAX_CHUNK_STORED_BYTES) + BLOCK_SIZE)
        .next_multiple_of(BLOCK_SIZE)
}

/// The `max` smallest of `ids`, sorted, and whether any were left out: one selection pass
/// and a sort of the page only (a listing page used to sort the whole index, on the
/// shard's own thread, once per page).
fn first_in_order(mut ids: Vec<ChunkId>, max: usize) -> (Vec<ChunkId>, bool) {
    let more = ids.len() > max;
    if more {
        if max == 0 {
            return (Vec::new(), true);
        }
        ids.select_nth_unstable(max);
        ids.truncate(max);
    }
    ids.sort_unstable();
    (ids, more)
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
            waiting_gets: VecDeque::new(),
            dev,
            layout,
            key,
            cfg,
            index: Index::new(layout.segment_count),
            gc_epoch: 1,
            gc_window: None,
            release_window: None,
            next_release_token: 1,
            first_heard_epoch: None,
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
            dead_chunk_records: HashMap::new(),
            deleting: HashMap::new(),
            opaque_segments: 0,
            segment_reads: vec![0; layout.segment_count as usize],
            compaction: None,
            compact_requested: false,
            compact_skip: HashSet::new(),
            durable_batch: 0,
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
            shard.segments[seg as usize] = SegmentState::in_use(h.generation, h.first_seq);
            if h.first_seq >= shard.next_seq {
                let summary = shard.read_summary(seg, &h)?;
                let sealed = summary.is_some();
                if let SegmentState::InUse { sealed: s, .. } = &mut shard.segments[seg as usize] {
                    *s = sealed;
                }
                if let (true, Some((entries, next_seq))) = (shard.cfg.use_summaries, summary) {
                    for e in entries {
                        let loc = Location {
                            segment: seg,
                            offset: e.offset,
                            stored_len: e.stored_len,
                            raw_len: e.raw_len,
                            codec: e.codec,
                        };
                        shard.apply_replayed(e.kind, e.id, loc, e.seq, e.level);
                    }
                    shard.stats.replayed_summaries += 1;
                    shard.next_seq = next_seq;
                    shard.resumable = None;
                } else if sealed {
                    // Scanned for comparison; sealed, so never resumed.
                    let end = shard.replay_segment(seg, &h)?;
                    if shard
                        .records_beyond(seg, end.end_off, h.generation, shard.next_seq)?
                        .is_some()
                    {
                        shard.mark_opaque(seg);
                    }
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
                        shard.mark_opaque(seg);
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

    fn mark_opaque(&mut self, seg: u32) {
        if let SegmentState::InUse { opaque, .. } = &mut self.segments[seg as usize] {
            if !*opaque {
                *opaque = true;
                self.opaque_segments += 1;
                self.stats.segments_with_records_beyond += 1;
            }
        }
    }

    /// Apply one replayed record to the index, counting the records it supersedes.
    fn apply_replayed(
        &mut self,
        kind: RecordKind,
        id: ChunkId,
        loc: Location,
        seq: u64,
        level: u8,
    ) {
        let superseded = match kind {
            RecordKind::Chunk => self.index.insert(
                id,
                IndexEntry {
                    loc,
                    state: EntryState::Verified,
                    seq,
                    replication_level: level,
                    claimed_epoch: 0,
                },
            ),
            RecordKind::Tombstone => self.index.remove(&id),
        };
        if superseded.is_some() {
            *self.dead_chunk_records.entry(id).or_insert(0) += 1;
        }
        self.stats.replayed_records += 1;
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

    /// A sealed segment's summary: its records and the sequence number after them, or
    /// `None` if it has no valid summary (not sealed, or the seal was torn).
    fn read_summary(
        &mut self,
        seg: u32,
        h: &SegmentHeader,
    ) -> Result<Option<(Vec<SummaryEntry>, u64)>, ShardError> {
        let base = self.layout.segment_offset(seg);
        let seg_bytes = self.layout.segment_bytes;
        let fb = self.read_retrying(base + seg_bytes - BLOCK_SIZE as u64, BLOCK_SIZE)?;
        let Some((f, offset, len)) = check_footer(&fb, h.generation, h.first_seq, seg_bytes) else {
            return Ok(None);
        };
        let sb = self.read_retrying(base + offset, len)?;
        Ok(decode_summary(&f, &sb).map(|e| (e, h.first_seq + f.entries as u64)))
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
            let loc = Location {
                segment: seg,
                offset: pos as u32,
                stored_len: rh.stored_len,
                raw_len: rh.raw_len,
                codec: rh.codec,
            };
            self.apply_replayed(rh.kind, rh.id, loc, rh.seq, rh.level);
            summary.push(SummaryEntry {
                kind: rh.kind,
                codec: rh.codec,
                level: rh.level,
                offset: pos as u32,
                stored_len: rh.stored_len,
                raw_len: rh.raw_len,
                seq: rh.seq,
                id: rh.id,
            });
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
        // A window of an older collection is closed; one of this epoch stays: the node
        // that runs it may still sweep (another node's metadata service tells its shards
        // each new epoch as it applies it, in any order with the collector's `BeginGc`).
        if self.gc_window.as_ref().is_some_and(|(e, _)| *e != epoch) {
            self.gc_window = None;
        }
        self.first_heard_epoch.get_or_insert(epoch);
    }

    /// A collection begins: claims are stamped `epoch` and recorded until [`end_gc`].
    ///
    /// [`end_gc`]: Self::end_gc
    pub fn begin_gc(&mut self, epoch: u64) {
        self.gc_epoch = epoch;
        self.gc_window = Some((epoch, HashSet::new()));
        self.first_heard_epoch.get_or_insert(epoch);
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

    /// The GC epoch of `e`'s latest claim as this process knows it: a replayed entry not
    /// claimed since (`claimed_epoch` 0) counts as claimed in the first epoch heard after
    /// open, or now (`None`: younger than any epoch) if none was heard yet.
    fn effective_claim_epoch(&self, e: &IndexEntry) -> Option<u64> {
        match e.claimed_epoch {
            0 => self.first_heard_epoch,
            c => Some(c),
        }
    }

    /// The GC epoch of `id`'s latest claim (see [`IndexEntry::claimed_epoch`]); `None` if
    /// it is not stored or counts as claimed now.
    pub fn claimed_epoch(&self, id: &ChunkId) -> Option<u64> {
        self.index
            .get(id)
            .and_then(|e| self.effective_claim_epoch(e))
    }

    /// Verified ids in id order after `after`, at most `max`, whose latest claim is of an
    /// epoch before `before_epoch`; and whether more follow. fsck's "outlived two
    /// collections" check.
    pub fn list_stale(
        &self,
        before_epoch: u64,
        after: Option<&ChunkId>,
        max: usize,
    ) -> (Vec<ChunkId>, bool) {
        let ids: Vec<ChunkId> = self
            .index
            .iter()
            .filter(|(id, e)| {
                e.state == EntryState::Verified
                    && after.is_none_or(|a| *id > a)
                    && self
                        .effective_claim_epoch(e)
                        .is_some_and(|c| c < before_epoch)
            })
            .map(|(id, _)| *id)
            .collect();
        first_in_order(ids, max)
    }

    /// `ids` were referenced at the mark of collection `epoch`: for the stale listing
    /// ([`ShardCore::list_stale`]) they count as claimed in `epoch`. Only the listing reads
    /// it; the sweep goes by the claims its window recorded.
    pub fn marked_live(&mut self, epoch: u64, ids: &[ChunkId]) {
        for id in ids {
            self.index.claim(id, epoch);
        }
    }

    /// Verified ids in id order after `after`, at most `max`; and whether more follow.
    pub fn list_ids(&self, after: Option<&ChunkId>, max: usize) -> (Vec<ChunkId>, bool) {
        let ids: Vec<ChunkId> = self
            .index
            .iter()
            .filter(|(id, e)| e.state == EntryState::Verified && after.is_none_or(|a| *id > a))
            .map(|(id, _)| *id)
            .collect();
        first_in_order(ids, max)
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
        let (doomed, spared, bytes) = doomed(&self.index, ids, claimed);
        self.delete(ticket, doomed);
        Ok((spared, bytes))
    }

    /// Open repair's release window (closing any other): from now on every id put here is
    /// recorded (at most [`MAX_RELEASE_WINDOW_IDS`]; beyond that the window closes and its
    /// release is refused). Returns its token.
    pub fn begin_release(&mut self) -> u64 {
        let token = self.next_release_token;
        self.next_release_token += 1;
        self.release_window = Some((token, HashSet::new()));
        token
    }

    /// Remove copies this node holds beyond its buckets' replicas (`ids`, each held by
    /// every replica at its level, as the caller checked after opening window `token`):
    /// tombstone those stored, verified and not put here since the window opened. The
    /// [`Completion::Delete`] for `ticket` counts what was removed. Returns (spared,
    /// stored bytes of those being removed); an error if `token` is not the open window.
    pub fn release(
        &mut self,
        ticket: u64,
        token: u64,
        ids: Vec<ChunkId>,
    ) -> Result<(u64, u64), ShardError> {
        match &self.release_window {
            None => return Err(ShardError::BadRequest("no release window is open".into())),
            Some((open, _)) if *open != token => {
                return Err(ShardError::BadRequest(format!(
                    "release window {token} was replaced by {open}"
                )))
            }
            Some(_) => {}
        }
        // The window closes: puts are recorded only while repair waits on its targets.
        let (_, put) = self.release_window.take().expect("checked above");
        let (doomed, spared, bytes) = doomed(&self.index, ids, &put);
        self.delete(ticket, doomed);
        Ok((spared, bytes))
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    pub fn dedupe_key(&self) -> &DedupeKey {
        &self.key
    }

    /// The level `id` is stored at, verified (and not being deleted); 0 if it is not.
    /// Not a claim.
    pub fn held_level(&self, id: &ChunkId) -> u8 {
        match self.index.get(id) {
            Some(e) if e.state == EntryState::Verified && !self.deleting.contains_key(id) => {
                e.replication_level
            }
            _ => 0,
        }
    }

    /// Whether `id` is stored and verified (and not being deleted). Not a claim.
    pub fn holds(&self, id: &ChunkId) -> bool {
        self.held_level(id) > 0
    }

    /// Which of `ids` are stored and verified at `level` or higher (a chunk stored at a
    /// lower level answers no: its put raises it); a yes is a claim in the current epoch.
    pub fn has(&mut self, ids: &[ChunkId], level: u8, out: &mut Vec<bool>) -> u64 {
        out.clear();
        for id in ids {
            let hit = match self.index.get(id) {
                Some(e)
                    if e.state == EntryState::Verified
                        && e.replication_level >= level
                        && !self.deleting.contains_key(id) =>
                {
                    self.stats.has_hits += 1;
                    self.stats.offered_bytes += e.loc.raw_len as u64;
                    true
                }
                _ => false,
            };
            if hit {
                self.note_claim(id);
                self.index.claim(id, self.gc_epoch);
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
            if let Some((_, put)) = &mut self.release_window {
                put.insert(c.id);
                if put.len() > MAX_RELEASE_WINDOW_IDS {
                    self.release_window = None;
                }
            }
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
            *self.deleting.entry(id).or_insert(0) += 1;
            self.queue.push_back(Queued::Delete { ticket, id });
        }
        self.pump();
    }

    /// A queued tombstone of `id` left the queue (appended, or not needed, or refused).
    fn delete_dequeued(&mut self, id: &ChunkId) {
        if let Some(n) = self.deleting.get_mut(id) {
            *n -= 1;
            if *n == 0 {
                self.deleting.remove(id);
            }
        }
    }

    /// Read a chunk; the [`Completion::Get`] comes from `poll` (at once for a chunk still in
    /// memory).
    pub fn get(&mut self, ticket: u64, id: ChunkId) {
        self.stats.gets += 1;
        if !self.waiting_gets.is_empty() || self.dev.in_flight() >= self.get_slots() {
            self.waiting_gets.push_back((ticket, id));
            return;
        }
        self.get_now(ticket, id);
    }

    /// Device queue slots gets may use.
    fn get_slots(&self) -> usize {
        self.dev
            .queue_depth()
            .saturating_sub(RESERVED_IO_SLOTS)
            .max(1)
    }

    /// Start waiting gets while the device has slots for them.
    fn start_waiting_gets(&mut self) {
        while !self.waiting_gets.is_empty() && self.dev.in_flight() < self.get_slots() {
            let (ticket, id) = self.waiting_gets.pop_front().expect("not empty");
            self.get_now(ticket, id);
        }
    }

    fn get_now(&mut self, ticket: u64, id: ChunkId) {
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
        // The segment is not freed while this read is in flight.
        self.segment_reads[e.loc.segment as usize] += 1;
        let mut reqs = vec![IoRequest {
            tag,
            op: IoOp::Read {
                offset: start,
                buf: self.read_buf((end - start) as usize),
            },
        }];
        if let Err(err) = self.dev.submit(&mut reqs) {
            self.io.remove(&tag);
            self.segment_reads[e.loc.segment as usize] -= 1;
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
        self.start_waiting_gets();
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
            || (!self.waiting_gets.is_empty() && self.dev.in_flight() < self.get_slots())
            || (self.failed.is_none()
                && self.inflight.is_none()
                && self.building.len > 0
                && !self.hold_for_compaction())
    }

    /// Whether device I/O is in flight or work is waiting for it.
    pub fn busy(&self) -> bool {
        self.dev.in_flight() > 0
            || self.building.len > 0
            || !self.queue.is_empty()
            || !self.done.is_empty()
            || !self.waiting_gets.is_empty()
    }

    /// Free segments (not holding records, header durably invalid).
    pub fn free_segments(&self) -> u32 {
        self.segments
            .iter()
            .filter(|s| **s == SegmentState::Free)
            .count() as u32
    }

    /// Free segments kept from puts (see [`ShardConfig::compact_reserve_segments`]).
    fn reserve_segments(&self) -> u32 {
        self.cfg
            .compact_reserve_segments
            .min(self.layout.segment_count / 2)
    }

    /// Ask for compaction (after a sweep): [`compact_step`] then frees every segment below
    /// the live threshold, one at a time.
    ///
    /// [`compact_step`]: Self::compact_step
    pub fn request_compaction(&mut self) {
        self.compact_requested = true;
    }

    /// Whether compaction is running or asked for: the caller should keep calling
    /// [`compact_step`](Self::compact_step).
    pub fn compaction_pending(&self) -> bool {
        self.failed.is_none() && (self.compaction.is_some() || self.compact_requested)
    }

    /// Whether a [`compact_step`](Self::compact_step) could make progress now without
    /// waiting for the device or the commit queue.
    pub fn compaction_ready(&self) -> bool {
        if self.failed.is_some() {
            return false;
        }
        let Some(job) = &self.compaction else {
            return self.compact_requested;
        };
        match job.phase {
            CompactPhase::Footer | CompactPhase::Summary | CompactPhase::Invalidate => false,
            CompactPhase::Copy if job.aborted => job.reads == 0 && job.queued == 0,
            CompactPhase::Copy => {
                let more = (job.next < job.entries.len() || !job.retry.is_empty())
                    && job.reads < COMPACT_READS_MAX
                    && job.bytes_held < COMPACT_BYTES_MAX;
                more || (job.next >= job.entries.len()
                    && job.retry.is_empty()
                    && job.reads == 0
                    && job.queued == 0)
            }
            CompactPhase::Barrier(b) => self.durable_batch >= b,
            CompactPhase::Quiesce => self.segment_reads[job.segment as usize] == 0,
        }
    }

    /// One bounded step of compaction (see the module docs): start on the emptiest sealed
    /// segment below the threshold if asked to and none is running, or advance the running
    /// one by at most [`COMPACT_READS_MAX`] reads and [`COMPACT_ENTRIES_PER_STEP`] entries.
    /// Returns whether compaction work remains (call again after the next `poll`).
    pub fn compact_step(&mut self) -> bool {
        if self.failed.is_some() {
            return false;
        }
        if self.compaction.is_none() {
            if !self.compact_requested {
                return false;
            }
            match self.compaction_candidate() {
                Some(seg) => self.start_compaction(seg),
                None => {
                    self.compact_requested = false;
                    return false;
                }
            }
        }
        self.advance_compaction();
        self.compaction_pending()
    }

    /// The sealed segment with the fewest live bytes below the threshold, if any.
    fn compaction_candidate(&self) -> Option<u32> {
        let limit = self.layout.segment_bytes * self.cfg.compact_live_percent as u64 / 100;
        let active = self.active.as_ref().map(|a| a.segment);
        self.segments
            .iter()
            .enumerate()
            .filter_map(|(i, st)| {
                let seg = i as u32;
                match st {
                    SegmentState::InUse {
                        sealed: true,
                        opaque: false,
                        ..
                    } if Some(seg) != active
                        && (self.building.len == 0 || self.building.segment != seg)
                        && self.inflight.as_ref().is_none_or(|b| b.segment != seg)
                        && !self.compact_skip.contains(&seg) =>
                    {
                        let live = self.index.live_bytes(seg);
                        (live < limit && self.compaction_fits(live)).then_some((live, seg))
                    }
                    _ => None,
                }
            })
            .min()
            .map(|(_, seg)| seg)
    }

    /// Whether copying `live` bytes surely fits in the room compaction may use: the free
    /// segments and the rest of the active one, less headers, summaries and the block
    /// padding of many small commit batches (counted as half again the bytes). A
    /// compaction that runs out of room anyway is given up, and what it copied stays valid.
    fn compaction_fits(&self, live: u64) -> bool {
        let seg = self.layout.segment_bytes;
        let usable = seg.saturating_sub(seg / 8 + 2 * BLOCK_SIZE as u64);
        let active = self.active.as_ref().map_or(0, |a| {
            seg.saturating_sub(a.next_off + self.building.len as u64 + seg / 8)
        });
        let room = self.free_segments() as u64 * usable + active;
        live + live / 2 + 4 * BLOCK_SIZE as u64 <= room
    }

    fn start_compaction(&mut self, seg: u32) {
        tracing::debug!(
            shard = self.layout.shard,
            segment = seg,
            live = self.index.live_bytes(seg),
            "compacting segment"
        );
        self.compaction = Some(Compaction {
            segment: seg,
            phase: CompactPhase::Footer,
            entries: Vec::new(),
            chunks_here: HashMap::new(),
            next: 0,
            retry: Vec::new(),
            reads: 0,
            bytes_held: 0,
            queued: 0,
            aborted: false,
            unreadable: false,
        });
        let off = self.layout.segment_offset(seg) + self.layout.segment_bytes - BLOCK_SIZE as u64;
        self.compact_read(IoPurpose::CompactFooter, off, BLOCK_SIZE);
    }

    /// Submit one compaction read of `len` bytes at `offset` (record reads use the read
    /// pool). A refused submission gives the compaction up for now (nothing of this read is
    /// in flight); the segment stays a candidate.
    fn compact_read(&mut self, purpose: IoPurpose, offset: u64, len: usize) -> bool {
        let is_record = matches!(purpose, IoPurpose::CompactRecord { .. });
        let tag = self.tag(purpose);
        let buf = if is_record {
            self.read_buf(len)
        } else {
            AlignedBuf::new(len)
        };
        let mut reqs = vec![IoRequest {
            tag,
            op: IoOp::Read { offset, buf },
        }];
        let Err(e) = self.dev.submit(&mut reqs) else {
            return true;
        };
        let purpose = self.io.remove(&tag);
        if let Some(IoRequest {
            op: IoOp::Read { buf, .. },
            ..
        }) = reqs.pop()
        {
            if is_record {
                self.return_read_buf(buf);
            }
        }
        tracing::debug!(shard = self.layout.shard, "compaction read refused: {e}");
        if let Some(job) = self.compaction.as_mut() {
            job.aborted = true;
            // Nothing of this read is in flight.
            if matches!(job.phase, CompactPhase::Footer | CompactPhase::Summary) {
                job.phase = CompactPhase::Copy;
            }
            if let Some(IoPurpose::CompactRecord { loc, .. }) = purpose {
                job.reads -= 1;
                job.bytes_held -= loc.stored_len as usize;
            }
        }
        self.finish_aborted_compaction();
        false
    }

    /// Overwrite the compacted segment's header with zeros and flush (step 5).
    fn compact_invalidate(&mut self, seg: u32) {
        let wt = self.tag(IoPurpose::CompactInvalidate);
        let ft = self.tag(IoPurpose::CompactInvalidateFlush);
        let mut reqs = vec![
            IoRequest {
                tag: wt,
                op: IoOp::Write {
                    offset: self.layout.segment_offset(seg),
                    buf: AlignedBuf::new(BLOCK_SIZE),
                },
            },
            IoRequest {
                tag: ft,
                op: IoOp::Flush,
            },
        ];
        if let Err(e) = self.dev.submit(&mut reqs) {
            // Nothing submitted: try again at the next step.
            self.io.remove(&wt);
            self.io.remove(&ft);
            tracing::debug!(
                shard = self.layout.shard,
                "segment invalidation refused: {e}"
            );
            if let Some(job) = self.compaction.as_mut() {
                job.phase = CompactPhase::Quiesce;
            }
        }
    }

    /// End a given-up compaction once nothing of it is in flight or queued. The segment
    /// stays (anything already moved stays valid where it is); it is not tried again in
    /// this process.
    fn finish_aborted_compaction(&mut self) {
        let Some(job) = self.compaction.as_mut() else {
            return;
        };
        if job.aborted {
            job.retry.clear(); // not copied: the segment is kept
        }
        if job.aborted
            && job.reads == 0
            && job.queued == 0
            && !matches!(
                job.phase,
                CompactPhase::Footer | CompactPhase::Summary | CompactPhase::Invalidate
            )
        {
            let seg = job.segment;
            if job.unreadable {
                tracing::warn!(
                    shard = self.layout.shard,
                    segment = seg,
                    "compaction given up: part of the segment cannot be read; it is kept"
                );
                self.compact_skip.insert(seg);
            }
            self.stats.compactions_aborted += 1;
            self.compaction = None;
        }
    }

    fn advance_compaction(&mut self) {
        let Some(job) = self.compaction.as_mut() else {
            return;
        };
        let seg = job.segment;
        match job.phase {
            CompactPhase::Footer | CompactPhase::Summary | CompactPhase::Invalidate => {}
            CompactPhase::Copy => {
                if job.aborted {
                    return self.finish_aborted_compaction();
                }
                let mut examined = 0;
                loop {
                    let Some(job) = self.compaction.as_mut() else {
                        return;
                    };
                    if job.reads >= COMPACT_READS_MAX
                        || job.bytes_held >= COMPACT_BYTES_MAX
                        || examined >= COMPACT_ENTRIES_PER_STEP
                    {
                        break;
                    }
                    let (i, attempts) = match job.retry.pop() {
                        Some(r) => r,
                        None if job.next < job.entries.len() => {
                            job.next += 1;
                            (job.next - 1, 0)
                        }
                        None => break,
                    };
                    examined += 1;
                    let e = job.entries[i];
                    match e.kind {
                        RecordKind::Tombstone => {
                            let chunks_here = job.chunks_here.get(&e.id).copied().unwrap_or(0);
                            job.queued += 1;
                            self.queue.push_back(Queued::Carry {
                                id: e.id,
                                chunks_here,
                            });
                        }
                        RecordKind::Chunk => {
                            // Copied only if the index still points at this record.
                            let Some(cur) = self.index.get(&e.id).copied() else {
                                continue;
                            };
                            if cur.loc.segment != seg
                                || cur.loc.offset != e.offset
                                || cur.state != EntryState::Verified
                            {
                                continue;
                            }
                            let abs = self.layout.segment_offset(seg) + e.offset as u64;
                            let start = abs / BLOCK_SIZE as u64 * BLOCK_SIZE as u64;
                            let end = (abs
                                + (RECORD_HEADER_BYTES + cur.loc.stored_len as usize) as u64)
                                .next_multiple_of(BLOCK_SIZE as u64);
                            job.reads += 1;
                            job.bytes_held += cur.loc.stored_len as usize;
                            let purpose = IoPurpose::CompactRecord {
                                entry: i,
                                attempts,
                                src_seq: cur.seq,
                                loc: cur.loc,
                                skip: (abs - start) as usize,
                            };
                            if !self.compact_read(purpose, start, (end - start) as usize) {
                                return;
                            }
                        }
                    }
                }
                self.pump();
                let Some(job) = self.compaction.as_mut() else {
                    return;
                };
                if job.aborted {
                    return self.finish_aborted_compaction();
                }
                if job.next >= job.entries.len()
                    && job.retry.is_empty()
                    && job.reads == 0
                    && job.queued == 0
                {
                    // Every item is decided: wait for the batch that holds the last of them
                    // (and every batch before it, with any re-put a dropped tombstone
                    // relied on) to be durable.
                    let barrier = if self.building.len > 0 {
                        self.building.no
                    } else if let Some(b) = &self.inflight {
                        b.no
                    } else {
                        self.durable_batch
                    };
                    job.phase = CompactPhase::Barrier(barrier);
                    self.advance_compaction();
                }
            }
            CompactPhase::Barrier(b) => {
                if self.durable_batch >= b {
                    job.phase = CompactPhase::Quiesce;
                    self.advance_compaction();
                }
            }
            CompactPhase::Quiesce => {
                if self.index.live_bytes(seg) > 0 {
                    // Some record was not copied (it cannot be, when every copy was made
                    // and became durable): keep the segment.
                    debug_assert!(false, "segment {seg} still live after its copies");
                    job.aborted = true;
                    return self.finish_aborted_compaction();
                }
                if self.segment_reads[seg as usize] > 0 {
                    return; // a get still reads it
                }
                job.phase = CompactPhase::Invalidate;
                self.compact_invalidate(seg);
            }
        }
    }

    fn on_compact_io(&mut self, purpose: IoPurpose, c: IoCompletion) {
        if self.failed.is_some() {
            return;
        }
        let Some(job) = self.compaction.as_mut() else {
            debug_assert!(false, "compaction I/O without a compaction");
            return;
        };
        let seg = job.segment;
        match purpose {
            IoPurpose::CompactFooter => {
                let (generation, first_seq) = match self.segments[seg as usize] {
                    SegmentState::InUse {
                        generation,
                        first_seq,
                        ..
                    } => (generation, first_seq),
                    SegmentState::Free => unreachable!("compacting a free segment"),
                };
                let footer = match (&c.result, &c.buf) {
                    (Ok(()), Some(b)) => {
                        check_footer(b, generation, first_seq, self.layout.segment_bytes)
                    }
                    _ => None,
                };
                let Some((footer, offset, len)) = footer else {
                    // A failed read is tried again at a later request; a bad footer of a
                    // segment sealed durably is damage.
                    job.phase = CompactPhase::Copy;
                    job.aborted = true;
                    job.unreadable = c.result.is_ok();
                    return self.finish_aborted_compaction();
                };
                job.phase = CompactPhase::Summary;
                let off = self.layout.segment_offset(seg) + offset;
                self.compact_read(IoPurpose::CompactSummary { footer }, off, len);
            }
            IoPurpose::CompactSummary { footer } => {
                job.phase = CompactPhase::Copy;
                let entries = match (&c.result, &c.buf) {
                    (Ok(()), Some(b)) => decode_summary(&footer, b),
                    _ => None,
                };
                let Some(entries) = entries else {
                    job.aborted = true;
                    job.unreadable = c.result.is_ok();
                    return self.finish_aborted_compaction();
                };
                let tombstoned: HashSet<ChunkId> = entries
                    .iter()
                    .filter(|e| e.kind == RecordKind::Tombstone)
                    .map(|e| e.id)
                    .collect();
                for e in &entries {
                    if e.kind == RecordKind::Chunk && tombstoned.contains(&e.id) {
                        *job.chunks_here.entry(e.id).or_insert(0) += 1;
                    }
                }
                job.entries = entries;
            }
            IoPurpose::CompactRecord {
                entry,
                attempts,
                src_seq,
                loc,
                skip,
            } => {
                job.reads -= 1;
                let id = job.entries[entry].id;
                let checked = match (c.result, c.buf) {
                    (Ok(()), Some(buf)) => {
                        let ok = self.check_get(&buf[skip..], &id, &loc).is_ok_and(|_| {
                            let data =
                                &buf[skip + RECORD_HEADER_BYTES..][..loc.stored_len as usize];
                            chunk::check(&self.key, &id, loc.codec, data, loc.raw_len as usize)
                                .is_ok()
                        });
                        let data = ok.then(|| {
                            buf[skip + RECORD_HEADER_BYTES..][..loc.stored_len as usize].to_vec()
                        });
                        self.return_read_buf(buf);
                        data
                    }
                    (_, buf) => {
                        if let Some(buf) = buf {
                            self.return_read_buf(buf);
                        }
                        None
                    }
                };
                let job = self.compaction.as_mut().expect("checked above");
                match checked {
                    Some(data) => {
                        job.queued += 1;
                        self.queue.push_back(Queued::Copy {
                            id,
                            src_seq,
                            codec: loc.codec,
                            raw_len: loc.raw_len,
                            data,
                        });
                    }
                    None if attempts + 1 < COMPACT_READ_ATTEMPTS => {
                        job.bytes_held -= loc.stored_len as usize;
                        job.retry.push((entry, attempts + 1));
                    }
                    None => {
                        job.bytes_held -= loc.stored_len as usize;
                        tracing::warn!(shard = self.layout.shard, segment = seg, id = ?id, "compaction cannot read a live record back");
                        job.aborted = true;
                        job.unreadable = true;
                        self.finish_aborted_compaction();
                    }
                }
            }
            IoPurpose::CompactInvalidate => {
                if let Err(e) = c.result {
                    self.fail(format!("freeing segment {seg} failed: {e}"));
                }
            }
            IoPurpose::CompactInvalidateFlush => {
                if let Err(e) = c.result {
                    self.fail(format!("freeing segment {seg} failed: {e}"));
                    return;
                }
                self.free_segment();
            }
            _ => unreachable!("not a compaction I/O"),
        }
    }

    /// The header invalidation of the compacted segment is durable: it is free.
    fn free_segment(&mut self) {
        let job = self.compaction.take().expect("compaction");
        let seg = job.segment;
        debug_assert_eq!(self.index.live_bytes(seg), 0);
        for e in job.entries.iter().filter(|e| e.kind == RecordKind::Chunk) {
            debug_assert!(self.index.get(&e.id).is_none_or(|i| i.loc.segment != seg));
            match self.dead_chunk_records.get_mut(&e.id) {
                Some(n) if *n > 1 => *n -= 1,
                Some(_) => {
                    self.dead_chunk_records.remove(&e.id);
                }
                None => debug_assert!(false, "dead record of {:?} not counted", e.id),
            }
        }
        self.segments[seg as usize] = SegmentState::Free;
        self.stats.segments_compacted += 1;
        tracing::debug!(shard = self.layout.shard, segment = seg, "segment freed");
    }

    /// Check the shard's bookkeeping against its index (for tests and the simulator): every
    /// entry lies in a segment in use, and each segment's live bytes are the sum of its
    /// entries' records.
    pub fn audit(&self) -> Result<(), String> {
        let mut live = vec![0u64; self.segments.len()];
        for (id, e) in self.index.iter() {
            let seg = e.loc.segment as usize;
            if !matches!(self.segments.get(seg), Some(SegmentState::InUse { .. })) {
                return Err(format!("{id:?} points into free segment {seg}"));
            }
            live[seg] += record_span(e.loc.stored_len as usize) as u64;
        }
        for (seg, l) in live.iter().enumerate() {
            if self.index.live_bytes(seg as u32) != *l {
                return Err(format!(
                    "segment {seg}: live bytes {} but entries hold {l}",
                    self.index.live_bytes(seg as u32)
                ));
            }
        }
        Ok(())
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
        s.segments_free = s.segments_total - s.segments_used;
        s.live_bytes = self.index.live_bytes_total();
        s.dead_bytes = s.device_bytes_used.saturating_sub(s.live_bytes);
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
        self.deleting.clear();
        self.compaction = None;
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
        self.building.copies.clear();
        self.building.seals = None;
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
                self.segment_reads[loc.segment as usize] -= 1;
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
            IoPurpose::CompactFooter
            | IoPurpose::CompactSummary { .. }
            | IoPurpose::CompactRecord { .. }
            | IoPurpose::CompactInvalidate
            | IoPurpose::CompactInvalidateFlush => self.on_compact_io(purpose, c),
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
            let (id, span, room) = match q {
                Queued::Put { chunk, .. } => {
                    (chunk.id, record_span(chunk.data.len()), RoomFor::Put)
                }
                Queued::Delete { id, .. } => (*id, record_span(0), RoomFor::Tombstone),
                Queued::Carry { id, .. } => (*id, record_span(0), RoomFor::Compaction),
                Queued::Copy { id, data, .. } => {
                    (*id, record_span(data.len()), RoomFor::Compaction)
                }
            };
            // Resolve what needs no log space first.
            match self.queue.front().expect("front") {
                Queued::Put { ticket, idx, .. } => {
                    let (ticket, idx) = (*ticket, *idx);
                    if !self.puts.contains_key(&ticket) {
                        // The rest of a put already refused (no space).
                        self.queue.pop_front();
                        continue;
                    }
                    let Some(Queued::Put { chunk, .. }) = self.queue.front() else {
                        unreachable!("a put is at the front")
                    };
                    // A chunk stored at a lower level than this put asks is stored again
                    // (below), with the higher level: never acknowledged at the lower one.
                    let state = self
                        .index
                        .get(&id)
                        .filter(|e| e.replication_level >= chunk.level)
                        .map(|e| e.state);
                    match state {
                        Some(EntryState::Verified) => {
                            self.queue.pop_front();
                            self.stats.puts_duplicate += 1;
                            self.index.claim(&id, self.gc_epoch);
                            self.stats.offered_bytes +=
                                self.index.get(&id).map_or(0, |e| e.loc.raw_len as u64);
                            self.resolve_put(ticket, idx, PutOutcome::Duplicate);
                            continue;
                        }
                        Some(EntryState::Pending { batch }) => {
                            self.queue.pop_front();
                            self.stats.puts_duplicate += 1;
                            self.index.claim(&id, self.gc_epoch);
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
                        self.delete_dequeued(&id);
                        self.resolve_delete(ticket, false);
                        continue;
                    }
                }
                Queued::Copy { src_seq, .. } => {
                    // Copied only while the index still names the record read.
                    let current = self
                        .index
                        .get(&id)
                        .is_some_and(|e| e.seq == *src_seq && e.state == EntryState::Verified);
                    if !current {
                        let q = self.queue.pop_front().expect("front");
                        self.compact_item_done(&q);
                        continue;
                    }
                }
                Queued::Carry { chunks_here, .. } => {
                    if !self.tombstone_needed(&id, *chunks_here) {
                        let q = self.queue.pop_front().expect("front");
                        self.stats.compaction_tombstones_dropped += 1;
                        self.compact_item_done(&q);
                        continue;
                    }
                }
            }
            // Needs log space.
            if !self.make_room(span, room) {
                break;
            }
            let q = self.queue.pop_front().expect("front");
            self.append(q);
        }
    }

    /// Whether a tombstone of `id` in the segment being freed (which also holds
    /// `chunks_here` of `id`'s chunk records) must be carried forward. See the module docs.
    fn tombstone_needed(&self, id: &ChunkId, chunks_here: u32) -> bool {
        if self.index.get(id).is_some() {
            // Put again after the sweep: that record is newer than any the tombstone
            // shadows, and durable no later than the compaction's barrier. Carrying the
            // tombstone would put it after the re-put and delete the chunk at replay.
            return false;
        }
        let dead = self.dead_chunk_records.get(id).copied().unwrap_or(0);
        debug_assert!(dead >= chunks_here, "dead record count of {id:?} too low");
        self.opaque_segments > 0 || dead > chunks_here
    }

    /// A compaction item left the queue (appended, dropped or refused).
    fn compact_item_done(&mut self, q: &Queued) {
        let Some(job) = self.compaction.as_mut() else {
            debug_assert!(false, "compaction item without a compaction");
            return;
        };
        job.queued -= 1;
        if let Queued::Copy { data, .. } = q {
            job.bytes_held -= data.len();
        }
    }

    fn chunk_is_valid(&self, c: &PutChunk) -> bool {
        c.raw_len as usize <= MAX_CHUNK_RAW_BYTES
            && c.data.len() <= MAX_CHUNK_STORED_BYTES
            && chunk::check(&self.key, &c.id, c.codec, &c.data, c.raw_len as usize).is_ok()
    }

    /// Make sure the building batch can take a record of `span` bytes. False when it must
    /// wait (batch full, or the segment is full and the in-flight batch must finish first).
    fn make_room(&mut self, span: usize, room: RoomFor) -> bool {
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
        match self.open_segment(room) {
            Ok(()) => true,
            Err(e) => {
                self.reject_queue(e, room == RoomFor::Put);
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
                self.reject_queue(e, false);
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
        b.seals = Some(a.segment);
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
            summary_crc: crc_fast::crc32_iscsi(&b.buf_mut()[..summary_bytes]),
        };
        footer.encode_into(&mut b.buf_mut()[span - BLOCK_SIZE..span]);
        b.len = span;
    }

    /// Refuse queued work with `e`: only the puts if `puts_only` (the reserve is kept for
    /// tombstones and compaction), else everything.
    fn reject_queue(&mut self, e: ShardError, puts_only: bool) {
        if e == ShardError::NoSpace {
            tracing::warn!(shard = self.layout.shard, "{e}: refusing puts");
            self.compact_requested = true;
        } else {
            tracing::error!(shard = self.layout.shard, "{e}");
        }
        let mut keep = VecDeque::new();
        while let Some(q) = self.queue.pop_front() {
            match q {
                Queued::Put { ticket, .. } => {
                    if let Some(p) = self.puts.remove(&ticket) {
                        if e == ShardError::NoSpace {
                            self.stats.puts_no_space += 1;
                        }
                        self.done.push(Completion::Put {
                            ticket,
                            claim_epoch: p.claim_epoch,
                            result: Err(e.clone()),
                        });
                    }
                }
                q if puts_only => keep.push_back(q),
                Queued::Delete { ticket, id } => {
                    self.delete_dequeued(&id);
                    if self.deletes.remove(&ticket).is_some() {
                        self.done.push(Completion::Delete {
                            ticket,
                            result: Err(e.clone()),
                        });
                    }
                }
                q @ (Queued::Copy { .. } | Queued::Carry { .. }) => {
                    self.compact_item_done(&q);
                    if let Some(job) = self.compaction.as_mut() {
                        job.aborted = true;
                    }
                    // Not again until something frees space or asks anew.
                    self.compact_requested = false;
                }
            }
        }
        self.queue = keep;
    }

    /// Start a new segment: its header is the first block of the building batch.
    fn open_segment(&mut self, room: RoomFor) -> Result<(), ShardError> {
        let free = self.free_segments();
        if free <= self.reserve_segments() + 1 {
            self.compact_requested = true;
        }
        // Puts leave the reserve; tombstones leave its last segment (when the reserve has
        // more than one), which only compaction takes (a compaction needs less than a
        // segment: see `compaction_fits`).
        let keep = match room {
            RoomFor::Put => self.reserve_segments(),
            RoomFor::Tombstone => self.reserve_segments().saturating_sub(1).min(1),
            RoomFor::Compaction => 0,
        };
        if free <= keep {
            return Err(ShardError::NoSpace);
        }
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
        self.segments[seg as usize] = SegmentState::in_use(generation, self.next_seq);
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
        // Every queued item is one record: write it, and its entry in the segment summary.
        type Record<'a> = (RecordKind, Codec, u8, ChunkId, u32, &'a [u8]);
        let (kind, codec, level, id, raw_len, data): Record = match &q {
            Queued::Put { chunk, .. } => (
                RecordKind::Chunk,
                chunk.codec,
                chunk.level,
                chunk.id,
                chunk.raw_len,
                &chunk.data[..],
            ),
            Queued::Copy {
                id,
                codec,
                raw_len,
                data,
                ..
            } => {
                // A copy keeps the level of the entry it copies (checked current in pump).
                let level = self.index.get(id).map_or(1, |e| e.replication_level);
                (RecordKind::Chunk, *codec, level, *id, *raw_len, &data[..])
            }
            Queued::Delete { id, .. } | Queued::Carry { id, .. } => {
                (RecordKind::Tombstone, Codec::Raw, 0, *id, 0, &[])
            }
        };
        let span = record_span(data.len());
        let stored_len = data.len() as u32;
        RecordHeader::new(kind, codec, level, generation, seq, id, raw_len)
            .write(data, &mut b.buf_mut()[at..at + span]);
        b.len += span;
        active.summary.push(SummaryEntry {
            kind,
            codec,
            level,
            offset: off as u32,
            stored_len,
            raw_len,
            seq,
            id,
        });
        let loc = Location {
            segment: b.segment,
            offset: off as u32,
            stored_len,
            raw_len,
            codec,
        };
        match q {
            Queued::Put { ticket, idx, .. } => {
                b.records.push((id, seq, RecordKind::Chunk));
                b.waiters.push((ticket, idx, PutOutcome::Stored));
                let batch = b.no;
                let raised = self.index.insert(
                    id,
                    IndexEntry {
                        loc,
                        state: EntryState::Pending { batch },
                        seq,
                        replication_level: level,
                        claimed_epoch: self.gc_epoch,
                    },
                );
                if raised.is_some() {
                    // Stored again at a higher level: the earlier record is dead.
                    *self.dead_chunk_records.entry(id).or_insert(0) += 1;
                    self.stats.puts_raised += 1;
                }
                self.stats.puts_stored += 1;
                self.stats.offered_bytes += raw_len as u64;
            }
            Queued::Delete { ticket, .. } => {
                self.delete_dequeued(&id);
                let b = &mut self.building;
                b.records.push((id, seq, RecordKind::Tombstone));
                b.delete_waiters.push(ticket);
                if self.index.remove(&id).is_some() {
                    // Its chunk record (on the device or in a batch) is dead now.
                    *self.dead_chunk_records.entry(id).or_insert(0) += 1;
                }
                self.stats.tombstones += 1;
                if let Some(d) = self.deletes.get_mut(&ticket) {
                    d.removed += 1;
                }
            }
            Queued::Copy { src_seq, .. } => {
                let claimed_epoch = self.index.get(&id).map_or(0, |e| e.claimed_epoch);
                b.copies.push((
                    id,
                    src_seq,
                    IndexEntry {
                        loc,
                        state: EntryState::Verified,
                        seq,
                        replication_level: level,
                        claimed_epoch,
                    },
                ));
                self.stats.compaction_chunks_moved += 1;
                self.stats.compaction_bytes_moved += span as u64;
                self.compact_item_done(&q);
            }
            Queued::Carry { .. } => {
                b.records.push((id, seq, RecordKind::Tombstone));
                self.stats.compaction_tombstones_carried += 1;
                self.compact_item_done(&q);
            }
        }
    }

    /// Submit the building batch if the device has no commit in flight.
    fn maybe_submit(&mut self) {
        if self.failed.is_some() || self.inflight.is_some() || self.building.len == 0 {
            return;
        }
        if self.hold_for_compaction() {
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

    /// Whether the building batch waits for compaction reads in flight: a batch of nothing
    /// but copies is not worth a commit of its own per record (each commit pads to a block,
    /// and a segment of padded copies could qualify for compaction again). Never held when
    /// anyone waits for it, when it seals a segment, or when queued work needs it written.
    fn hold_for_compaction(&self) -> bool {
        let b = &self.building;
        self.compaction.as_ref().is_some_and(|job| {
            job.reads > 0 && !job.aborted && matches!(job.phase, CompactPhase::Copy)
        }) && self.queue.is_empty()
            && b.len < self.cfg.commit_max_bytes
            && b.seals.is_none()
            && b.waiters.is_empty()
            && b.delete_waiters.is_empty()
            && b.deferred_gets.is_empty()
            && b.records.iter().all(|r| r.2 == RecordKind::Tombstone)
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
        self.durable_batch = b.no;
        if let Some(seg) = b.seals {
            if let SegmentState::InUse { sealed, .. } = &mut self.segments[seg as usize] {
                *sealed = true;
            }
        }
        for (id, seq, kind) in &b.records {
            if *kind == RecordKind::Chunk {
                self.index.mark_verified(id, *seq);
            }
        }
        // Copies are durable: the index moves to them, unless the id changed meanwhile.
        // Either way one chunk record of the id is now dead (the original or the copy).
        for (id, src_seq, entry) in std::mem::take(&mut b.copies) {
            let current = self
                .index
                .get(&id)
                .filter(|e| e.seq == src_seq && e.state == EntryState::Verified)
                .map(|e| e.claimed_epoch);
            if let Some(claimed) = current {
                // A claim that came while the copy was in flight went to the original.
                let claimed_epoch = claimed.max(entry.claimed_epoch);
                self.index.insert(
                    id,
                    IndexEntry {
                        claimed_epoch,
                        ..entry
                    },
                );
            }
            *self.dead_chunk_records.entry(id).or_insert(0) += 1;
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

/// Validate a segment footer block against the segment's header (`generation`,
/// `first_seq`): `(footer, summary offset, bytes to read for the summary)`.
fn check_footer(
    block: &[u8],
    generation: u32,
    first_seq: u64,
    seg_bytes: u64,
) -> Option<(SegmentFooter, u64, usize)> {
    let f = SegmentFooter::decode(block).ok()?;
    let span = summary_span(f.entries as usize);
    if f.generation < generation
        || f.first_seq != first_seq
        || span > seg_bytes - BLOCK_SIZE as u64
        || f.summary_offset != seg_bytes - span
    {
        return None;
    }
    Some((
        f,
        f.summary_offset,
        (span as usize - BLOCK_SIZE).max(BLOCK_SIZE),
    ))
}

/// Decode the summary `footer` describes from `bytes` (read at its offset): `None` if its
/// CRC, an entry, or the sequence of entries is wrong.
fn decode_summary(f: &SegmentFooter, bytes: &[u8]) -> Option<Vec<SummaryEntry>> {
    let n = f.entries as usize * SUMMARY_ENTRY_BYTES;
    if bytes.len() < n || crc_fast::crc32_iscsi(&bytes[..n]) != f.summary_crc {
        return None;
    }
    let mut entries = Vec::with_capacity(f.entries as usize);
    for (i, chunk) in bytes[..n].chunks_exact(SUMMARY_ENTRY_BYTES).enumerate() {
        let e = SummaryEntry::decode(chunk).ok()?;
        if e.seq != f.first_seq + i as u64 || e.offset as u64 >= f.summary_offset {
            return None;
        }
        entries.push(e);
    }
    Some(entries)
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
            level: 1,
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

    /// More gets at once than the device's queue holds: they wait for slots instead of
    /// failing, and a commit submitted meanwhile still finds room (a burst of reads must
    /// never fail the shard).
    #[test]
    fn a_burst_of_gets_beyond_the_queue_depth_waits_and_commits_go_on() {
        let mut s = shard(64 << 20, 1 << 20);
        let stored: Vec<PutChunk> = (0..40).map(|i| chunk(i, 3000)).collect();
        s.put(1, stored.clone());
        drain(&mut s);
        let depth = s.dev.queue_depth();
        let n = depth * 3;
        for t in 0..n {
            s.get(100 + t as u64, stored[t % stored.len()].id);
        }
        assert!(
            s.dev.in_flight() <= s.get_slots(),
            "gets keep the reserve free"
        );
        let late = chunk(1000, 5000);
        s.put(2, vec![late.clone()]);
        let out = drain(&mut s);
        let mut gets = 0;
        for c in out {
            match c {
                Completion::Get { ticket, result } => {
                    let want = &stored[(ticket - 100) as usize % stored.len()];
                    assert_eq!(&result.expect("get").data[..], &want.data[..]);
                    gets += 1;
                }
                Completion::Put {
                    ticket: 2, result, ..
                } => {
                    assert_eq!(result.expect("put"), vec![PutOutcome::Stored]);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(gets, n);
        assert!(s.failed.is_none());
    }

    #[test]
    fn a_full_device_refuses_puts_and_keeps_serving() {
        // 3 segments of 256 KiB, one kept in reserve for tombstones and compaction: room
        // for a few 60 KiB chunks only.
        let mut s = shard(crate::format::DATA_START + (768 << 10), 256 << 10);
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
        s.has(&stored, 1, &mut present);
        assert!(present.iter().all(|p| *p));
        assert_eq!(s.free_segments(), 1, "the reserve is kept from puts");
        assert_eq!(s.stats().puts_no_space, refused);
        // Tombstones may still use the reserve: a full shard can be swept.
        s.delete(5000, stored.clone());
        match drain(&mut s).pop() {
            Some(Completion::Delete { result: Ok(n), .. }) => assert_eq!(n as usize, stored.len()),
            other => panic!("sweep of a full shard: {other:?}"),
        }
    }

    #[test]
    fn duplicates_in_one_batch_are_acknowledged_when_durable() {
        let mut s = shard(64 << 20, 1 << 20);
        let c = chunk(1, 1000);
        s.put(1, vec![c.clone(), c.clone()]);
        s.put(2, vec![c.clone()]);
        // Not durable yet: nothing answers has, but a get is served from the batch.
        let mut present = Vec::new();
        s.has(&[c.id], 1, &mut present);
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
        s.has(&[c.id], 1, &mut present);
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
                level: 1,
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
    use hivefs_nvme::SharedSim;
    use hivefs_nvme::{SimDevice, SimFaults};
    use std::sync::{Arc, Mutex};

    const KEY: DedupeKey = DedupeKey([8; 32]);

    /// A formatted one-shard SimDevice (4 MiB segments) the test keeps a handle to.
    fn formatted(seed: u64) -> (SharedSim, ShardLayout) {
        let faults = SimFaults {
            read_error_per_million: 0,
            write_error_per_million: 0,
            bit_flip_per_million: 0,
            torn_writes: false,
        };
        let dev = SharedSim(Arc::new(Mutex::new(SimDevice::new(64 << 20, seed, faults))));
        let layout = Superblock::plan(64 << 20, 1, 4 << 20, 16, KEY.0)
            .unwrap()
            .shard_layout(0);
        ShardCore::format(&mut dev.clone(), &layout).unwrap();
        (dev, layout)
    }

    fn reopen(dev: &SharedSim, layout: ShardLayout) -> ShardCore {
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
                    level: 1,
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
        s.has(&ids, 1, &mut present);
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
        s.has(&all, 1, &mut present);
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
                    level: 1,
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
            s.has(&ids[..1], 1, &mut present),
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
        s.has(&ids, 1, &mut present);
        assert_eq!(present, vec![true, false, false, false]);
        // Being told the same epoch again (another node's metadata service applying it)
        // keeps the window: the collector may still sweep.
        s.set_gc_epoch(2);
        assert!(s.sweep(5, 2, ids[..1].to_vec()).is_ok());
        // A newer epoch closes it (a collection that failed before ending its windows).
        s.set_gc_epoch(3);
        assert!(s.sweep(6, 2, ids[..1].to_vec()).is_err());
        // So does the end of a collection.
        s.begin_gc(4);
        s.end_gc(4);
        assert!(s.sweep(7, 4, ids[..1].to_vec()).is_err());
    }

    /// A chunk the sweep chose no longer answers `has` while its tombstone waits in the
    /// queue: a claim handed out then would let a commit reference a deleted chunk (found
    /// by `gc_sim`, seed 39939).
    #[test]
    fn a_chunk_being_swept_does_not_answer_has() {
        let key = DedupeKey([9; 32]);
        let mut s = shard(key);
        // Small commit batches, so that queued work waits behind a full one.
        s.cfg.commit_max_bytes = 64 << 10;
        let chunk = |i: u8| {
            let data = vec![i; 48 << 10];
            PutChunk {
                level: 1,
                id: ChunkId::compute(&key, &data),
                codec: Codec::Raw,
                raw_len: data.len() as u32,
                data: data.into(),
            }
        };
        let old: Vec<PutChunk> = (0..4u8).map(chunk).collect();
        let ids: Vec<ChunkId> = old.iter().map(|c| c.id).collect();
        s.put(1, old);
        assert!(matches!(
            wait(&mut s, 1),
            Completion::Put { result: Ok(_), .. }
        ));
        s.begin_gc(2);
        // Fill the commit pipeline: one batch in flight, the next one full.
        s.put(2, vec![chunk(10)]);
        s.put(3, vec![chunk(11), chunk(12)]);
        s.sweep(4, 2, ids.clone()).unwrap();
        assert!(s.queued() > 0, "the sweep's tombstones wait in the queue");
        let mut present = Vec::new();
        s.has(&ids, 1, &mut present);
        assert_eq!(present, vec![false; 4], "chunks being swept answer has");
        // Put again after the sweep: stored anew behind the tombstones.
        s.put(5, vec![chunk(0)]);
        let (mut swept, mut put) = (None, None);
        let mut out = Vec::new();
        while swept.is_none() || put.is_none() {
            s.poll(&mut out, true);
            for c in out.drain(..) {
                match c {
                    Completion::Delete { ticket: 4, result } => swept = Some(result),
                    Completion::Put {
                        ticket: 5, result, ..
                    } => put = Some(result),
                    _ => {}
                }
            }
        }
        assert_eq!(swept, Some(Ok(4)));
        assert_eq!(put, Some(Ok(vec![PutOutcome::Stored])));
        s.has(&ids, 1, &mut present);
        assert_eq!(present, vec![true, false, false, false]);
        s.audit().unwrap();
    }
}

#[cfg(test)]
mod compaction_tests {
    use super::*;
    use crate::format::Superblock;
    use hivefs_nvme::SharedSim;
    use hivefs_nvme::{SimDevice, SimFaults};
    use std::sync::{Arc, Mutex};

    const KEY: DedupeKey = DedupeKey([11; 32]);
    const SEG: u64 = 256 << 10;

    fn cfg() -> ShardConfig {
        ShardConfig {
            commit_max_bytes: 64 << 10,
            compact_reserve_segments: 1,
            ..ShardConfig::default()
        }
    }

    /// A formatted one-shard device of `segments` segments that the test keeps a handle to.
    fn formatted(segments: u64) -> (SharedSim, ShardLayout) {
        let faults = SimFaults {
            read_error_per_million: 0,
            write_error_per_million: 0,
            bit_flip_per_million: 0,
            torn_writes: false,
        };
        let bytes = crate::format::DATA_START + segments * SEG;
        let dev = SharedSim(Arc::new(Mutex::new(SimDevice::new(bytes, 21, faults))));
        let layout = Superblock::plan(bytes, 1, SEG, 16, KEY.0)
            .unwrap()
            .shard_layout(0);
        ShardCore::format(&mut dev.clone(), &layout).unwrap();
        (dev, layout)
    }

    fn open(dev: &SharedSim, layout: ShardLayout) -> ShardCore {
        ShardCore::open(Box::new(dev.clone()), layout, KEY, cfg()).unwrap()
    }

    /// Incompressible bytes, different for each `i`.
    fn chunk(i: u32, len: usize) -> PutChunk {
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (i as u64) << 20;
        let data: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        PutChunk {
            level: 1,
            id: ChunkId::compute(&KEY, &data),
            codec: Codec::Raw,
            raw_len: len as u32,
            data: data.into(),
        }
    }

    fn wait(s: &mut ShardCore, ticket: u64) -> Completion {
        let mut out = Vec::new();
        for _ in 0..100_000 {
            s.poll(&mut out, true);
            if let Some(i) = out.iter().position(|c| match c {
                Completion::Put { ticket: t, .. }
                | Completion::Get { ticket: t, .. }
                | Completion::Delete { ticket: t, .. } => *t == ticket,
            }) {
                return out.swap_remove(i);
            }
        }
        panic!("ticket {ticket} never completed");
    }

    fn put(s: &mut ShardCore, t: &mut u64, c: &PutChunk) -> Result<Vec<PutOutcome>, ShardError> {
        *t += 1;
        s.put(*t, vec![c.clone()]);
        match wait(s, *t) {
            Completion::Put { result, .. } => result,
            other => panic!("{other:?}"),
        }
    }

    fn delete(s: &mut ShardCore, t: &mut u64, ids: Vec<ChunkId>) -> u32 {
        *t += 1;
        s.delete(*t, ids);
        match wait(s, *t) {
            Completion::Delete { result, .. } => result.unwrap(),
            other => panic!("{other:?}"),
        }
    }

    /// The chunk's bytes as the shard returns them, checked against its id.
    fn read_ok(s: &mut ShardCore, t: &mut u64, c: &PutChunk) {
        *t += 1;
        s.get(*t, c.id);
        match wait(s, *t) {
            Completion::Get {
                result: Ok(got), ..
            } => {
                assert_eq!(&got.data[..], &c.data[..], "bytes of {:?}", c.id);
                chunk::verify(&KEY, &c.id, got.codec, &got.data, got.raw_len as usize).unwrap();
            }
            other => panic!("get {:?}: {other:?}", c.id),
        }
    }

    fn has(s: &mut ShardCore, id: &ChunkId) -> bool {
        let mut out = Vec::new();
        s.has(&[*id], 1, &mut out);
        out[0]
    }

    fn has_at(s: &mut ShardCore, id: &ChunkId, level: u8) -> bool {
        let mut out = Vec::new();
        s.has(&[*id], level, &mut out);
        out[0]
    }

    /// A release removes what every replica holds, spares what was put here since its
    /// window opened, and closes the window (a second release on it is refused).
    #[test]
    fn a_release_spares_puts_since_its_window_and_closes_it() {
        let (dev, layout) = formatted(8);
        let mut s = open(&dev, layout);
        let mut t = 0;
        let (a, b) = (chunk(1, 3000), chunk(2, 3000));
        put(&mut s, &mut t, &a).unwrap();
        put(&mut s, &mut t, &b).unwrap();
        let token = s.begin_release();
        // A copy of `b` arrives while repair asks the targets.
        assert_eq!(
            put(&mut s, &mut t, &b).unwrap(),
            vec![PutOutcome::Duplicate]
        );
        t += 1;
        let (spared, bytes) = s.release(t, token, vec![a.id, b.id]).unwrap();
        assert_eq!((spared, bytes), (1, 3000));
        match wait(&mut s, t) {
            Completion::Delete { result, .. } => assert_eq!(result.unwrap(), 1),
            other => panic!("{other:?}"),
        }
        assert!(!has(&mut s, &a.id) && has(&mut s, &b.id));
        assert!(
            s.release(t + 1, token, vec![b.id]).is_err(),
            "window closed"
        );
        let old = token;
        let token = s.begin_release();
        assert!(
            s.release(t + 2, old, vec![b.id]).is_err(),
            "an older window"
        );
        assert!(s.release(t + 3, token, vec![]).is_ok());
    }

    /// Levels: `has` answers yes only at the stored level or below; a put at a higher level
    /// stores the chunk again (never acknowledged at the lower one); replay (scan and
    /// summaries) and compaction keep the level.
    #[test]
    fn a_higher_level_stores_the_chunk_again_and_the_level_survives_replay_and_compaction() {
        let (dev, layout) = formatted(8);
        let mut s = open(&dev, layout);
        let mut t = 0;
        let c1 = chunk(1, 5000);
        let c3 = PutChunk {
            level: 3,
            ..c1.clone()
        };
        assert_eq!(put(&mut s, &mut t, &c1).unwrap(), vec![PutOutcome::Stored]);
        assert!(has_at(&mut s, &c1.id, 1) && !has_at(&mut s, &c1.id, 2));
        assert_eq!(s.held_level(&c1.id), 1);
        assert_eq!(put(&mut s, &mut t, &c3).unwrap(), vec![PutOutcome::Stored]);
        assert_eq!(s.stats().puts_raised, 1);
        assert_eq!(s.held_level(&c1.id), 3);
        // Equal or lower levels are duplicates; the two in one batch: stored once at 3.
        assert_eq!(
            put(&mut s, &mut t, &c3).unwrap(),
            vec![PutOutcome::Duplicate]
        );
        assert_eq!(
            put(&mut s, &mut t, &c1).unwrap(),
            vec![PutOutcome::Duplicate]
        );
        let c2 = chunk(2, 5000);
        t += 1;
        s.put(
            t,
            vec![
                c2.clone(),
                PutChunk {
                    level: 2,
                    ..c2.clone()
                },
            ],
        );
        match wait(&mut s, t) {
            Completion::Put { result, .. } => {
                assert_eq!(
                    result.unwrap(),
                    vec![PutOutcome::Stored, PutOutcome::Stored]
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.held_level(&c2.id), 2);
        assert!(has_at(&mut s, &c1.id, 3) && !has_at(&mut s, &c1.id, 4));
        read_ok(&mut s, &mut t, &c1);
        s.audit().unwrap();
        // Replay of the unsealed segment (a scan).
        drop(s);
        let mut s = open(&dev, layout);
        assert_eq!((s.held_level(&c1.id), s.held_level(&c2.id)), (3, 2));
        read_ok(&mut s, &mut t, &c1);
        // Fill past the first segment, then remove the fillers: the first segment (c1's
        // two records, c2's two) is compacted and its live records copied forward.
        let fillers: Vec<PutChunk> = (100..130).map(|i| chunk(i, 20_000)).collect();
        for f in &fillers {
            put(&mut s, &mut t, f).unwrap();
        }
        delete(&mut s, &mut t, fillers.iter().map(|f| f.id).collect());
        compact_all(&mut s, &mut t, &[c1.clone(), c2.clone()]);
        assert!(s.stats().compaction_chunks_moved >= 2, "{:?}", s.stats());
        assert_eq!((s.held_level(&c1.id), s.held_level(&c2.id)), (3, 2));
        s.audit().unwrap();
        // Seal the segment holding the copies, then replay it from its summary.
        for i in 200..215 {
            put(&mut s, &mut t, &chunk(i, 20_000)).unwrap();
        }
        drop(s);
        let mut s = open(&dev, layout);
        assert!(s.stats().replayed_summaries > 0);
        assert_eq!((s.held_level(&c1.id), s.held_level(&c2.id)), (3, 2));
        read_ok(&mut s, &mut t, &c1);
        read_ok(&mut s, &mut t, &c2);
    }

    /// Compact until nothing qualifies; after every step, read `live` back (gets racing
    /// the moves).
    fn compact_all(s: &mut ShardCore, t: &mut u64, live: &[PutChunk]) {
        s.request_compaction();
        let mut out = Vec::new();
        for round in 0..100_000 {
            let more = s.compact_step();
            if let Some(c) = live.get(round % live.len().max(1)) {
                read_ok(s, t, c);
            }
            s.poll(&mut out, true);
            assert!(out.is_empty(), "{out:?}");
            s.audit().unwrap();
            if !more && !s.busy() {
                return;
            }
        }
        panic!("compaction never finished");
    }

    #[test]
    fn fill_sweep_compact_and_the_device_has_room_again() {
        let (dev, layout) = formatted(6);
        let mut s = open(&dev, layout);
        let mut t = 0;
        // Fill until puts are refused: the reserve (1 segment) is kept from them.
        let mut stored = Vec::new();
        let mut refused = 0;
        for i in 0..200 {
            let c = chunk(i, 20_000);
            match put(&mut s, &mut t, &c) {
                Ok(o) => {
                    assert_eq!(o, vec![PutOutcome::Stored]);
                    stored.push(c);
                }
                Err(ShardError::NoSpace) => {
                    refused += 1;
                    if refused > 3 {
                        break;
                    }
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(refused > 0 && stored.len() > 40, "stored {}", stored.len());
        assert_eq!(s.free_segments(), 1, "the reserve is left");
        assert!(s.stats().puts_no_space > 0);
        // A full device can still be swept: tombstones may use the reserve.
        let mut keep = Vec::new();
        let mut gone = Vec::new();
        for (i, c) in stored.into_iter().enumerate() {
            if i % 5 == 0 {
                keep.push(c);
            } else {
                gone.push(c);
            }
        }
        assert_eq!(
            delete(&mut s, &mut t, gone.iter().map(|c| c.id).collect()) as usize,
            gone.len()
        );
        let before = s.stats();
        compact_all(&mut s, &mut t, &keep);
        let after = s.stats();
        assert!(
            after.segments_compacted >= 3,
            "compacted {}",
            after.segments_compacted
        );
        assert!(after.segments_free > before.segments_free + 1, "{after:?}");
        assert!(after.compaction_chunks_moved > 0);
        assert!(after.dead_bytes < before.dead_bytes);
        for c in &keep {
            read_ok(&mut s, &mut t, c);
        }
        // Room again: new puts are stored.
        let fresh: Vec<PutChunk> = (1000..1010).map(|i| chunk(i, 20_000)).collect();
        for c in &fresh {
            assert_eq!(put(&mut s, &mut t, c).unwrap(), vec![PutOutcome::Stored]);
        }
        drop(s);
        // The same state after a restart, from the same device.
        let mut s = open(&dev, layout);
        s.audit().unwrap();
        for c in keep.iter().chain(&fresh) {
            assert!(has(&mut s, &c.id));
            read_ok(&mut s, &mut t, c);
        }
        for c in &gone {
            assert!(!has(&mut s, &c.id), "swept chunk came back");
        }
        assert_eq!(s.stats().chunks as usize, keep.len() + fresh.len());
    }

    /// `claimed_epoch`: a put stamps the shard's epoch, a `has` hit and a duplicate put
    /// refresh it, a compaction copy keeps it, replay resets it to the first epoch heard
    /// after open; `list_stale` lists by it, in id order, in pages.
    #[test]
    fn claims_are_stamped_kept_by_copies_and_replayed_as_the_first_epoch_heard() {
        let (dev, layout) = formatted(8);
        let mut s = open(&dev, layout);
        let mut t = 0;
        s.set_gc_epoch(1);
        let (a, b, c) = (chunk(1, 20_000), chunk(2, 20_000), chunk(3, 20_000));
        for x in [&a, &b, &c] {
            assert_eq!(put(&mut s, &mut t, x).unwrap(), vec![PutOutcome::Stored]);
        }
        // Fillers after them in the same segments, swept below so compaction moves a, b, c.
        let fillers: Vec<PutChunk> = (100..130).map(|i| chunk(i, 20_000)).collect();
        for f in &fillers {
            put(&mut s, &mut t, f).unwrap();
        }
        for x in [&a, &b, &c] {
            assert_eq!(s.claimed_epoch(&x.id), Some(1), "a put stamps the epoch");
        }
        s.set_gc_epoch(3);
        assert!(has(&mut s, &b.id));
        assert_eq!(
            put(&mut s, &mut t, &c).unwrap(),
            vec![PutOutcome::Duplicate]
        );
        assert_eq!(s.claimed_epoch(&a.id), Some(1), "not claimed since epoch 1");
        assert_eq!(
            s.claimed_epoch(&b.id),
            Some(3),
            "a has hit refreshes the claim"
        );
        assert_eq!(
            s.claimed_epoch(&c.id),
            Some(3),
            "a duplicate put refreshes it"
        );
        let sorted = |mut v: Vec<ChunkId>| {
            v.sort_unstable();
            v
        };
        let fids: Vec<ChunkId> = fillers.iter().map(|f| f.id).collect();
        let stale = |s: &ShardCore, before: u64| -> Vec<ChunkId> {
            let (ids, more) = s.list_stale(before, None, 1000);
            assert!(!more);
            ids.into_iter().filter(|i| !fids.contains(i)).collect()
        };
        assert_eq!(stale(&s, 1), vec![], "nothing claimed before epoch 1");
        assert_eq!(stale(&s, 2), vec![a.id]);
        assert_eq!(stale(&s, 3), vec![a.id]);
        assert_eq!(stale(&s, 4), sorted(vec![a.id, b.id, c.id]));
        // Pages in id order, like list_ids.
        let (p1, more) = s.list_stale(4, None, 2);
        assert!(more);
        let (p2, _) = s.list_stale(4, p1.last(), 1000);
        let mut all = p1.clone();
        all.extend(p2);
        assert_eq!(all, s.list_stale(4, None, 1000).0);
        assert_eq!(all.len(), 3 + fillers.len());

        // Compaction copies a, b and c and keeps their claims.
        let seqs: Vec<u64> = [&a, &b, &c]
            .iter()
            .map(|x| s.index().get(&x.id).unwrap().seq)
            .collect();
        assert_eq!(delete(&mut s, &mut t, fids.clone()) as usize, fillers.len());
        let live = [a.clone(), b.clone(), c.clone()];
        compact_all(&mut s, &mut t, &live);
        for (x, seq) in live.iter().zip(&seqs) {
            assert_ne!(
                s.index().get(&x.id).unwrap().seq,
                *seq,
                "compaction moved {:?}",
                x.id
            );
        }
        assert_eq!(s.claimed_epoch(&a.id), Some(1), "a copy keeps the claim");
        assert_eq!(s.claimed_epoch(&b.id), Some(3));
        assert_eq!(stale(&s, 2), vec![a.id]);
        drop(s);

        // Replayed entries: claimed "now" until an epoch is heard, then that epoch.
        let mut s = open(&dev, layout);
        assert_eq!(s.claimed_epoch(&a.id), None);
        assert_eq!(
            stale(&s, u64::MAX),
            vec![],
            "no epoch heard: nothing is stale"
        );
        s.set_gc_epoch(5);
        assert_eq!(s.claimed_epoch(&a.id), Some(5), "the first epoch heard");
        s.begin_gc(7);
        assert_eq!(s.claimed_epoch(&a.id), Some(5), "only the first one counts");
        assert!(has(&mut s, &b.id));
        assert_eq!(s.claimed_epoch(&b.id), Some(7));
        assert_eq!(stale(&s, 5), vec![]);
        assert_eq!(stale(&s, 6), sorted(vec![a.id, c.id]));
        assert_eq!(stale(&s, 8), sorted(vec![a.id, b.id, c.id]));
        // A collection's mark found `a` live in epoch 8: it may have become garbage only
        // after that mark, so it is not stale before 8 any more; a mark never lowers a
        // claim.
        s.marked_live(8, &[a.id]);
        assert_eq!(s.claimed_epoch(&a.id), Some(8));
        assert_eq!(stale(&s, 8), sorted(vec![b.id, c.id]));
        s.marked_live(2, &[b.id]);
        assert_eq!(s.claimed_epoch(&b.id), Some(7));
    }

    /// Segment A: `x` and live fillers (above the threshold, never compacted). Segment B:
    /// `x`'s tombstone, then (if `reput`) `x` put again, then fillers that are swept, so B
    /// is mostly dead and is compacted. Returns the shard, x and A's fillers.
    fn tombstone_in_a_dead_segment(
        dev: &SharedSim,
        layout: ShardLayout,
        reput: bool,
    ) -> (ShardCore, PutChunk, Vec<PutChunk>) {
        let mut s = open(dev, layout);
        let mut t = 0;
        let x = chunk(1, 2000);
        put(&mut s, &mut t, &x).unwrap();
        let a_seg = s.index().get(&x.id).unwrap().loc.segment;
        let fillers: Vec<PutChunk> = (10..16).map(|i| chunk(i, 30_000)).collect();
        for c in &fillers {
            put(&mut s, &mut t, c).unwrap();
            assert_eq!(s.index().get(&c.id).unwrap().loc.segment, a_seg);
        }
        // Fill A up so the next records go to B.
        let mut b_fill = Vec::new();
        let mut i = 100;
        loop {
            let c = chunk(i, 30_000);
            i += 1;
            put(&mut s, &mut t, &c).unwrap();
            let seg = s.index().get(&c.id).unwrap().loc.segment;
            b_fill.push(c);
            if seg != a_seg {
                break;
            }
        }
        let in_a: Vec<ChunkId> = b_fill[..b_fill.len() - 1].iter().map(|c| c.id).collect();
        assert_eq!(delete(&mut s, &mut t, vec![x.id]), 1);
        if reput {
            assert_eq!(put(&mut s, &mut t, &x).unwrap(), vec![PutOutcome::Stored]);
        }
        let b_seg = s
            .index()
            .get(&b_fill.last().unwrap().id)
            .unwrap()
            .loc
            .segment;
        // Fill B until it is sealed.
        loop {
            let c = chunk(i, 30_000);
            i += 1;
            put(&mut s, &mut t, &c).unwrap();
            let seg = s.index().get(&c.id).unwrap().loc.segment;
            b_fill.push(c);
            if seg != b_seg {
                break;
            }
        }
        // Sweep B's fillers (and the ones that spilled into A's tail stay: A stays live).
        let doomed: Vec<ChunkId> = b_fill
            .iter()
            .map(|c| c.id)
            .filter(|id| !in_a.contains(id))
            .collect();
        delete(&mut s, &mut t, doomed);
        assert!(
            s.index().live_bytes(a_seg) > SEG / 2,
            "A stays above the threshold"
        );
        let mut a_live = fillers;
        a_live.extend(b_fill.into_iter().filter(|c| in_a.contains(&c.id)));
        (s, x, a_live)
    }

    #[test]
    fn a_tombstone_shadowing_a_record_in_another_segment_is_carried() {
        let (dev, layout) = formatted(8);
        let (mut s, x, a_live) = tombstone_in_a_dead_segment(&dev, layout, false);
        let mut t = 1000;
        compact_all(&mut s, &mut t, &a_live);
        let st = s.stats();
        assert_eq!(st.segments_compacted, 1, "{st:?}");
        assert_eq!(st.compaction_tombstones_carried, 1, "{st:?}");
        assert!(!has(&mut s, &x.id));
        drop(s);
        let mut s = open(&dev, layout);
        assert!(
            !has(&mut s, &x.id),
            "the swept chunk came back after replay"
        );
        for c in &a_live {
            read_ok(&mut s, &mut t, c);
        }
        // Put again after all that: stored, and it survives a restart.
        assert_eq!(put(&mut s, &mut t, &x).unwrap(), vec![PutOutcome::Stored]);
        drop(s);
        let mut s = open(&dev, layout);
        read_ok(&mut s, &mut t, &x);
    }

    #[test]
    fn a_chunk_put_again_after_its_sweep_survives_compaction_and_replay() {
        let (dev, layout) = formatted(8);
        let (mut s, x, a_live) = tombstone_in_a_dead_segment(&dev, layout, true);
        let mut t = 1000;
        compact_all(&mut s, &mut t, &a_live);
        let st = s.stats();
        assert_eq!(st.segments_compacted, 1, "{st:?}");
        assert_eq!(st.compaction_tombstones_carried, 0, "{st:?}");
        assert_eq!(st.compaction_tombstones_dropped, 1, "{st:?}");
        assert!(
            st.compaction_chunks_moved >= 1,
            "the re-put x moved: {st:?}"
        );
        read_ok(&mut s, &mut t, &x);
        drop(s);
        let mut s = open(&dev, layout);
        assert!(has(&mut s, &x.id), "the re-put chunk was lost at replay");
        read_ok(&mut s, &mut t, &x);
        for c in &a_live {
            read_ok(&mut s, &mut t, c);
        }
    }

    #[test]
    fn a_tombstone_whose_records_are_gone_is_dropped() {
        let (dev, layout) = formatted(8);
        let mut s = open(&dev, layout);
        let mut t = 0;
        // Everything in one segment, all swept: nothing to carry.
        let cs: Vec<PutChunk> = (0..6).map(|i| chunk(i, 30_000)).collect();
        for c in &cs {
            put(&mut s, &mut t, c).unwrap();
        }
        delete(&mut s, &mut t, cs.iter().map(|c| c.id).collect());
        // Fill on so that segment is sealed.
        let mut more = Vec::new();
        for i in 50..70 {
            let c = chunk(i, 30_000);
            put(&mut s, &mut t, &c).unwrap();
            more.push(c);
        }
        compact_all(&mut s, &mut t, &more);
        let st = s.stats();
        assert!(st.segments_compacted >= 1, "{st:?}");
        assert_eq!(st.compaction_tombstones_carried, 0, "{st:?}");
        assert_eq!(st.compaction_tombstones_dropped, 6, "{st:?}");
        drop(s);
        let mut s = open(&dev, layout);
        for c in &cs {
            assert!(!has(&mut s, &c.id));
        }
        for c in &more {
            read_ok(&mut s, &mut t, c);
        }
    }
}

#[cfg(test)]
mod listing_tests {
    use super::*;

    #[test]
    fn first_in_order_is_the_sorted_prefix() {
        let mut rng = hivefs_nvme::rng::SplitMix64::new(7);
        for n in [0usize, 1, 2, 5, 100, 1000] {
            let ids: Vec<ChunkId> = (0..n)
                .map(|_| {
                    let mut b = [0u8; hivefs_net::chunk::CHUNK_ID_BYTES];
                    for x in b.iter_mut() {
                        *x = rng.next_u64() as u8;
                    }
                    ChunkId(b)
                })
                .collect();
            let mut sorted = ids.clone();
            sorted.sort_unstable();
            for max in [0usize, 1, 3, n / 2, n, n + 1] {
                let (page, more) = first_in_order(ids.clone(), max);
                assert_eq!(more, n > max, "n {n} max {max}");
                assert_eq!(page, sorted[..max.min(n)].to_vec(), "n {n} max {max}");
            }
        }
    }
}
