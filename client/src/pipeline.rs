//! The chunking pipeline: input bytes in, [`PreparedChunk`]s out, in input order.
//!
//! 1. **Cut** (the caller's thread; for a large in-memory input, every thread first, see
//!    `Cutter::cut_parallel`): FastCDC 2020 (normalization level 1, the crate's unseeded
//!    gear table) finds content-defined boundaries, so an insertion or an edit only
//!    changes the chunks around it and everything else still deduplicates. The boundaries
//!    are those of one pass over the input, however many threads cut.
//! 2. **Hash and compress** (`threads` workers): each chunk gets its id from
//!    [`ChunkId::compute`] (keyed BLAKE3) and is compressed with
//!    [`hivefs_net::chunk::compress`], which stores it raw when compression does not pay.
//! 3. **Deliver** (the caller's thread): chunks reach the sink strictly in input order.
//!
//! [`Pipeline::prepare_reader`] streams: it reads into large blocks (8 MiB by default) and
//! carries the unfinished tail of each block over into the next, cutting only once it
//! holds `max_bytes` past the current chunk start (or the input has ended). FastCDC never
//! looks further than `max_bytes` ahead, so the boundaries are exactly those of a single
//! pass over the whole input, whatever the block size and however the reader splits its
//! reads.
//!
//! Workers borrow the input instead of copying it: [`Pipeline::prepare`] hands them slices
//! of the caller's buffer, and the streaming form shares each block between the chunks cut
//! from it and recycles it once the last of them is done. With `threads == 1`, or an input
//! too small to be worth the threads, everything runs inline on the caller's thread without
//! channels.
//!
//! Every client of a hive must cut with the same [`ChunkerConfig`] for their chunks to
//! deduplicate against each other.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io::{self, Read};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::thread;

use crossbeam_channel::{Receiver, Sender};
use fastcdc::v2020;
use hivefs_net::chunk::{self, ChunkId, Codec, DedupeKey, MAX_CHUNK_RAW_BYTES};

/// Default size of the blocks [`Pipeline::prepare_reader`] reads into.
pub const DEFAULT_BLOCK_BYTES: usize = 8 << 20;

/// Inputs shorter than this are prepared inline even when the pipeline has worker threads:
/// starting the threads would cost more than it saves.
const PARALLEL_MIN_BYTES: usize = 1 << 20;

/// Chunk size bounds for FastCDC, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkerConfig {
    /// No chunk is shorter, except the last chunk of an input.
    pub min_bytes: u32,
    /// The size chunks are normalized around.
    pub avg_bytes: u32,
    /// No chunk is longer.
    pub max_bytes: u32,
}

impl Default for ChunkerConfig {
    /// 16 KiB / 64 KiB / 256 KiB.
    fn default() -> Self {
        ChunkerConfig {
            min_bytes: 16 << 10,
            avg_bytes: 64 << 10,
            max_bytes: 256 << 10,
        }
    }
}

/// Why a [`ChunkerConfig`] was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("chunk sizes must satisfy min < avg < max, got min {min}, avg {avg}, max {max}")]
    NotIncreasing { min: u32, avg: u32, max: u32 },
    #[error("{field} = {value} is outside the allowed range {lo}..={hi}")]
    OutOfRange {
        field: &'static str,
        value: u32,
        lo: u32,
        hi: u32,
    },
    #[error("min_bytes = {0} must be even (FastCDC 2020 tests cut points in byte pairs, so an odd minimum would allow chunks one byte shorter)")]
    OddMinimum(u32),
}

impl ChunkerConfig {
    /// Check the bounds: `min < avg < max`, each within FastCDC's own limits, `max` no
    /// larger than the largest chunk a node accepts ([`MAX_CHUNK_RAW_BYTES`]), `min` even.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let max_hi = (MAX_CHUNK_RAW_BYTES as u32).min(v2020::MAXIMUM_MAX);
        let ranges = [
            (
                "min_bytes",
                self.min_bytes,
                v2020::MINIMUM_MIN,
                v2020::MINIMUM_MAX,
            ),
            (
                "avg_bytes",
                self.avg_bytes,
                v2020::AVERAGE_MIN,
                v2020::AVERAGE_MAX,
            ),
            ("max_bytes", self.max_bytes, v2020::MAXIMUM_MIN, max_hi),
        ];
        for (field, value, lo, hi) in ranges {
            if !(lo..=hi).contains(&value) {
                return Err(ConfigError::OutOfRange {
                    field,
                    value,
                    lo,
                    hi,
                });
            }
        }
        if !(self.min_bytes < self.avg_bytes && self.avg_bytes < self.max_bytes) {
            return Err(ConfigError::NotIncreasing {
                min: self.min_bytes,
                avg: self.avg_bytes,
                max: self.max_bytes,
            });
        }
        if self.min_bytes & 1 == 1 {
            return Err(ConfigError::OddMinimum(self.min_bytes));
        }
        Ok(())
    }
}

/// One chunk, cut, hashed and encoded, ready to be offered to the hive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreparedChunk {
    /// Keyed BLAKE3 id of the plaintext.
    pub id: ChunkId,
    /// Where the chunk starts in the input.
    pub offset: u64,
    /// Plaintext length.
    pub raw_len: u32,
    /// How `stored` is encoded ([`Codec::Raw`] when the preferred codec did not pay).
    pub codec: Codec,
    /// The encoded bytes, as stored and sent.
    pub stored: Vec<u8>,
}

/// Why [`Pipeline::prepare_reader`] stopped early.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError<E> {
    #[error("reading the input failed: {0}")]
    Read(#[source] io::Error),
    #[error("the chunk sink failed: {0}")]
    Sink(#[source] E),
}

/// Cuts, hashes and compresses inputs. Cheap to clone; `Send + Sync`, so one pipeline can
/// serve several threads (each call starts its own workers and ends them before returning).
#[derive(Clone, Debug)]
pub struct Pipeline {
    key: DedupeKey,
    cfg: ChunkerConfig,
    codec: Codec,
    threads: usize,
    block_bytes: usize,
    cutter: Cutter,
}

impl Pipeline {
    /// A pipeline hashing with `key`, cutting with `cfg` and compressing with `codec` on
    /// `threads` worker threads (`0`: one per available core; `1`: everything inline on the
    /// caller's thread). With more than one, the caller's thread still reads, cuts and feeds
    /// the sink alongside the workers.
    pub fn new(
        key: DedupeKey,
        cfg: ChunkerConfig,
        codec: Codec,
        threads: usize,
    ) -> Result<Pipeline, ConfigError> {
        cfg.validate()?;
        let threads = match threads {
            0 => thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        Ok(Pipeline {
            key,
            cfg,
            codec,
            threads,
            block_bytes: DEFAULT_BLOCK_BYTES,
            cutter: Cutter::new(&cfg),
        })
    }

    /// Read into blocks of `bytes` (raised to at least `max_bytes`) instead of
    /// [`DEFAULT_BLOCK_BYTES`]. Boundaries never depend on it.
    pub fn with_block_bytes(mut self, bytes: usize) -> Pipeline {
        self.block_bytes = bytes.max(self.cfg.max_bytes as usize);
        self
    }

    pub fn config(&self) -> ChunkerConfig {
        self.cfg
    }

    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// Worker threads used for hashing and compression (after resolving `0`).
    pub fn threads(&self) -> usize {
        self.threads
    }

    pub fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    /// Cut, hash and compress an in-memory input; the chunks come back in input order.
    pub fn prepare(&self, data: &[u8]) -> Vec<PreparedChunk> {
        let mut out = Vec::with_capacity(data.len() / self.cfg.avg_bytes as usize + 1);
        let done = self.prepare_with(data, |c| {
            out.push(c);
            Ok::<(), Infallible>(())
        });
        match done {
            Ok(()) => out,
            Err(never) => match never {},
        }
    }

    /// Cut, hash and compress an in-memory input, handing each chunk to `sink` in input
    /// order instead of collecting them. Stops at the first sink error.
    pub fn prepare_with<E, F>(&self, data: &[u8], sink: F) -> Result<(), E>
    where
        F: FnMut(PreparedChunk) -> Result<(), E>,
    {
        let parallel = data.len() >= PARALLEL_MIN_BYTES;
        let chunks = if self.threads > 1 && data.len() >= self.parallel_cut_min() {
            // Cut on every core first (exactly the one-pass boundaries), then hash and
            // compress: the one-thread cut was half the pipeline's time.
            let ends = self.cutter.cut_parallel(data, self.threads);
            let mut start = 0usize;
            let pieces = ends.into_iter().map(|end| {
                let piece = (start as u64, &data[start..end]);
                start = end;
                Ok(piece)
            });
            self.drive(pieces, parallel, sink)
        } else {
            let pieces = SliceCuts {
                data,
                pos: 0,
                cutter: &self.cutter,
            };
            self.drive(pieces, parallel, sink)
        };
        let chunks = chunks.map_err(|e| match e {
            PipelineError::Sink(e) => e,
            PipelineError::Read(e) => unreachable!("slices do not fail to read: {e}"),
        })?;
        tracing::debug!(bytes = data.len(), chunks, parallel, "prepared buffer");
        Ok(())
    }

    /// Cut, hash and compress everything `reader` yields, without holding it all in memory,
    /// handing each chunk to `sink` in input order. Returns the number of bytes read.
    ///
    /// Stops at the first read error or sink error; chunks already given to the sink stay
    /// given. `sink` runs on the caller's thread, so it may block (e.g. on an upload): the
    /// workers run ahead only by a bounded number of chunks.
    pub fn prepare_reader<R, E, F>(&self, reader: R, sink: F) -> Result<u64, PipelineError<E>>
    where
        R: Read,
        F: FnMut(PreparedChunk) -> Result<(), E>,
    {
        let mut pieces = StreamCuts::new(reader, &self.cutter, self.block_bytes);
        pieces.refill().map_err(PipelineError::Read)?;
        let parallel = !(pieces.eof && pieces.buffered() < PARALLEL_MIN_BYTES);
        let chunks = self.drive(pieces.by_ref(), parallel, sink)?;
        tracing::debug!(bytes = pieces.total, chunks, parallel, "prepared stream");
        Ok(pieces.total)
    }

    /// Inputs at least this long are cut on several threads: each thread's stretch must
    /// be long enough for its boundaries to fall into step with the one-pass cut (a few
    /// chunks) and then save work.
    fn parallel_cut_min(&self) -> usize {
        self.cfg.max_bytes as usize * 16
    }

    /// Hash and compress one chunk.
    fn prepare_one(&self, offset: u64, plain: &[u8]) -> PreparedChunk {
        let id = ChunkId::compute(&self.key, plain);
        let (codec, stored) = chunk::compress(self.codec, plain);
        PreparedChunk {
            id,
            offset,
            raw_len: plain.len() as u32,
            codec,
            stored,
        }
    }

    /// Chunks in flight (handed to workers but not yet to the sink) at most. Enough to keep
    /// the workers busy through a full block read, while bounding memory to a few blocks.
    fn max_in_flight(&self) -> usize {
        self.threads * 4 + self.block_bytes / self.cfg.avg_bytes as usize
    }

    /// Hash and compress every piece, inline or on the workers, and feed the sink in order.
    /// Returns the number of chunks delivered.
    fn drive<P, I, E, F>(
        &self,
        pieces: I,
        parallel: bool,
        mut sink: F,
    ) -> Result<u64, PipelineError<E>>
    where
        P: AsRef<[u8]> + Send,
        I: Iterator<Item = io::Result<(u64, P)>>,
        F: FnMut(PreparedChunk) -> Result<(), E>,
    {
        if self.threads <= 1 || !parallel {
            let mut delivered = 0;
            for piece in pieces {
                let (offset, piece) = piece.map_err(PipelineError::Read)?;
                let prepared = self.prepare_one(offset, piece.as_ref());
                drop(piece);
                sink(prepared).map_err(PipelineError::Sink)?;
                delivered += 1;
            }
            return Ok(delivered);
        }

        let limit = self.max_in_flight();
        thread::scope(|s| {
            let (job_tx, job_rx) = crossbeam_channel::bounded::<(u64, u64, P)>(limit);
            let (done_tx, done_rx) = crossbeam_channel::bounded::<Done>(limit);
            for _ in 0..self.threads {
                let (job_rx, done_tx) = (job_rx.clone(), done_tx.clone());
                s.spawn(move || self.work(job_rx, done_tx));
            }
            drop((job_rx, done_tx));

            let mut order = Reorder {
                next: 0,
                ring: VecDeque::with_capacity(limit),
            };
            let mut sent = 0u64;
            for piece in pieces {
                let (offset, piece) = piece.map_err(PipelineError::Read)?;
                job_tx
                    .send((sent, offset, piece))
                    .expect("pipeline workers outlive the job queue");
                sent += 1;
                while let Ok(done) = done_rx.try_recv() {
                    order.put(done);
                }
                order.deliver(&mut sink)?;
                while sent - order.next >= limit as u64 {
                    order.put(
                        done_rx
                            .recv()
                            .expect("pipeline workers outlive the job queue"),
                    );
                    order.deliver(&mut sink)?;
                }
            }
            drop(job_tx);
            while order.next < sent {
                order.put(
                    done_rx
                        .recv()
                        .expect("pipeline workers outlive the job queue"),
                );
                order.deliver(&mut sink)?;
            }
            Ok(sent)
        })
    }

    /// A worker: prepare jobs until the queue closes or the caller stops listening. A panic
    /// is sent back to the caller (who re-raises it) rather than leaving it waiting.
    fn work<P: AsRef<[u8]>>(&self, jobs: Receiver<(u64, u64, P)>, done: Sender<Done>) {
        for (seq, offset, piece) in jobs {
            let prepared = panic::catch_unwind(AssertUnwindSafe(|| {
                self.prepare_one(offset, piece.as_ref())
            }));
            drop(piece);
            if done.send((seq, prepared)).is_err() {
                break;
            }
        }
    }
}

/// A worker's answer: the job's sequence number and its chunk (or the worker's panic).
type Done = (u64, thread::Result<PreparedChunk>);

/// Puts worker answers back into input order.
struct Reorder {
    /// Sequence number of the next chunk the sink gets (`ring[0]`).
    next: u64,
    ring: VecDeque<Option<PreparedChunk>>,
}

impl Reorder {
    fn put(&mut self, (seq, prepared): Done) {
        let prepared = prepared.unwrap_or_else(|payload| panic::resume_unwind(payload));
        let i = (seq - self.next) as usize;
        if self.ring.len() <= i {
            self.ring.resize_with(i + 1, || None);
        }
        self.ring[i] = Some(prepared);
    }

    fn deliver<E>(
        &mut self,
        sink: &mut impl FnMut(PreparedChunk) -> Result<(), E>,
    ) -> Result<(), PipelineError<E>> {
        while let Some(Some(_)) = self.ring.front() {
            let prepared = self.ring.pop_front().flatten().expect("front was checked");
            self.next += 1;
            sink(prepared).map_err(PipelineError::Sink)?;
        }
        Ok(())
    }
}

/// FastCDC 2020 cut-point search with the configured sizes: exactly what
/// `v2020::FastCDC::new` (normalization level 1, unseeded gear table) does per chunk.
#[derive(Clone, Debug)]
struct Cutter {
    min: usize,
    avg: usize,
    max: usize,
    mask_s: u64,
    mask_l: u64,
}

impl Cutter {
    fn new(cfg: &ChunkerConfig) -> Cutter {
        const NORMALIZATION: u32 = 1;
        let bits = v2020::logarithm2(cfg.avg_bytes);
        Cutter {
            min: cfg.min_bytes as usize,
            avg: cfg.avg_bytes as usize,
            max: cfg.max_bytes as usize,
            mask_s: v2020::MASKS[(bits + NORMALIZATION) as usize],
            mask_l: v2020::MASKS[(bits - NORMALIZATION) as usize],
        }
    }

    /// Length of the chunk starting at `src[0]`, where `src` is the rest of the input or at
    /// least `max` bytes of it (the search never looks further).
    fn cut(&self, src: &[u8]) -> usize {
        let (_, len) = v2020::cut(
            src,
            self.min,
            self.avg,
            self.max,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        len
    }
}

impl Cutter {
    /// Chunk end offsets of `data`, exactly those of one pass ([`SliceCuts`]), found on
    /// `threads` threads.
    ///
    /// The input is split into `threads` stretches and each is cut from its own start, as
    /// if a chunk began there. A chunk depends only on where it starts (FastCDC never looks
    /// back), so every chunk a stretch finds starting at a true boundary *is* the true
    /// chunk. The one-pass chain is then walked from offset 0: from each boundary, the
    /// chunk some stretch found starting there is taken as it is; where none did (the few
    /// chunks after a stretch start before its boundaries fall into step with the true
    /// ones), the chunk is cut here.
    fn cut_parallel(&self, data: &[u8], threads: usize) -> Vec<usize> {
        let n = data.len();
        let stretch = n.div_ceil(threads.max(1));
        let starts: Vec<usize> = (0..n).step_by(stretch.max(1)).collect();
        // Each stretch's chunk ends, cutting from its start until it passes the next start.
        let found: Vec<Vec<usize>> = thread::scope(|s| {
            let handles: Vec<_> = starts
                .iter()
                .map(|&from| {
                    let until = (from + stretch).min(n);
                    s.spawn(move || {
                        let mut ends = Vec::with_capacity((until - from) / self.avg + 2);
                        let mut pos = from;
                        while pos < until {
                            pos += self.cut(&data[pos..]);
                            ends.push(pos);
                        }
                        ends
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| panic::resume_unwind(p)))
                .collect()
        });
        let mut ends = Vec::with_capacity(n / self.avg + found.len());
        let mut pos = 0usize;
        while pos < n {
            // The stretch whose range holds `pos`: did it find a chunk starting there?
            let k = (pos / stretch).min(found.len() - 1);
            let mine = &found[k];
            let from = starts[k];
            let hit = if pos == from {
                mine.first().copied()
            } else {
                mine.binary_search(&pos)
                    .ok()
                    .and_then(|i| mine.get(i + 1).copied())
            };
            pos = match hit {
                Some(end) => end,
                None => pos + self.cut(&data[pos..]),
            };
            ends.push(pos);
        }
        ends
    }
}

/// The chunks of an in-memory input, as borrowed slices.
struct SliceCuts<'a> {
    data: &'a [u8],
    pos: usize,
    cutter: &'a Cutter,
}

impl<'a> Iterator for SliceCuts<'a> {
    type Item = io::Result<(u64, &'a [u8])>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = &self.data[self.pos..];
        if rest.is_empty() {
            return None;
        }
        let len = self.cutter.cut(rest);
        let offset = self.pos as u64;
        self.pos += len;
        Some(Ok((offset, &rest[..len])))
    }
}

/// A read buffer shared by the chunks cut from it; returns itself to the pool when the last
/// of them is done.
struct Block {
    /// Always `block_bytes` long (initialized once, so reads can go straight into it).
    data: Vec<u8>,
    /// How much of `data` holds input.
    filled: usize,
    pool: Sender<Vec<u8>>,
}

impl Drop for Block {
    fn drop(&mut self) {
        let _ = self.pool.try_send(std::mem::take(&mut self.data));
    }
}

/// One chunk of a streamed input: a range of a shared [`Block`].
struct Piece {
    block: Arc<Block>,
    start: usize,
    end: usize,
}

impl AsRef<[u8]> for Piece {
    fn as_ref(&self) -> &[u8] {
        &self.block.data[self.start..self.end]
    }
}

/// The chunks of a streamed input: reads block by block, carrying each block's unfinished
/// tail over into the next.
struct StreamCuts<'a, R> {
    reader: R,
    cutter: &'a Cutter,
    block_bytes: usize,
    pool_tx: Sender<Vec<u8>>,
    pool_rx: Receiver<Vec<u8>>,
    /// The block being cut, `None` before the first read and after a read error.
    cur: Option<Arc<Block>>,
    /// Start of the next chunk in `cur`.
    pos: usize,
    /// Input offset of `cur.data[0]`.
    block_offset: u64,
    /// The reader has reported its end (or failed).
    eof: bool,
    /// Bytes read so far.
    total: u64,
}

impl<'a, R: Read> StreamCuts<'a, R> {
    fn new(reader: R, cutter: &'a Cutter, block_bytes: usize) -> Self {
        let (pool_tx, pool_rx) = crossbeam_channel::bounded(4);
        StreamCuts {
            reader,
            cutter,
            block_bytes: block_bytes.max(cutter.max),
            pool_tx,
            pool_rx,
            cur: None,
            pos: 0,
            block_offset: 0,
            eof: false,
            total: 0,
        }
    }

    /// Input bytes held but not yet cut.
    fn buffered(&self) -> usize {
        self.cur.as_ref().map_or(0, |b| b.filled - self.pos)
    }

    /// Start a new block with the old block's uncut tail, then read until it is full or the
    /// input ends.
    fn refill(&mut self) -> io::Result<()> {
        let mut data = match self.pool_rx.try_recv() {
            Ok(data) if data.len() == self.block_bytes => data,
            _ => vec![0; self.block_bytes],
        };
        let mut filled = 0;
        if let Some(old) = self.cur.take() {
            filled = old.filled - self.pos;
            data[..filled].copy_from_slice(&old.data[self.pos..old.filled]);
            self.block_offset += self.pos as u64;
        }
        self.pos = 0;
        while filled < data.len() {
            match self.reader.read(&mut data[filled..]) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => {
                    filled += n;
                    self.total += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.eof = true;
                    return Err(e);
                }
            }
        }
        self.cur = Some(Arc::new(Block {
            data,
            filled,
            pool: self.pool_tx.clone(),
        }));
        Ok(())
    }
}

impl<R: Read> Iterator for StreamCuts<'_, R> {
    type Item = io::Result<(u64, Piece)>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let avail = self.buffered();
            // Cut only with `max` bytes in hand (FastCDC's whole window) or at the very end,
            // so block edges never move a boundary.
            if avail >= self.cutter.max || (self.eof && avail > 0) {
                let block = self.cur.as_ref().expect("bytes are buffered");
                let start = self.pos;
                let len = self.cutter.cut(&block.data[start..block.filled]);
                self.pos += len;
                let piece = Piece {
                    block: Arc::clone(block),
                    start,
                    end: start + len,
                };
                return Some(Ok((self.block_offset + start as u64, piece)));
            }
            if self.eof {
                return None;
            }
            if let Err(e) = self.refill() {
                return Some(Err(e));
            }
        }
    }
}
