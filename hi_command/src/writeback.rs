//! Write-back of file data: the per-inode write state of an open file and the background
//! flusher that turns written bytes into committed extents.
//!
//! # The path of a written byte
//! 1. `write` puts it into the inode's *dirty* map (non-overlapping byte ranges).
//! 2. When the dirty bytes reach [`SEAL_BYTES`], they are *sealed*: moved, as a numbered
//!    [`Batch`], to the back of the inode's `sealed` queue and handed to the flusher. The
//!    writer goes on filling a new dirty map while the batch is prepared and uploaded; it
//!    waits only when the mount's backlog passes [`BACKLOG_BYTES`].
//! 3. The flusher has two stages, each one thread, joined by a one-slot channel, so a
//!    batch is chunked, hashed and compressed (on every core, by the client pipeline) while
//!    the batch before it is uploaded and committed:
//!    - *prepare*: content-defined chunks of exactly the written ranges;
//!    - *commit*: has-then-put of the missing chunks, then one commit-write per range (with
//!      the claim epoch; a stale epoch is claimed again), then the committed extents are
//!      spliced into the inode's extent list and the batch leaves `sealed`.
//! 4. `fsync`, `flush` (close), truncation and unmount call [`Writeback::sync`]: it seals
//!    what is dirty and waits until every batch up to it is committed. A small sync with
//!    nothing in flight commits inline, without a hand-off.
//!
//! # Invariants
//! - Batches of one inode commit in the order they were sealed (one commit thread, FIFO
//!   from seal to commit), so a later write to the same bytes always lands last.
//! - Reads see committed extents, then sealed batches oldest first, then dirty bytes.
//! - After a failed commit the inode is *failed*: the flusher holds (does not commit) its
//!   later batches, and writes stop sealing. The next sync retries the held batches in
//!   order, then the dirty bytes; until one succeeds the bytes stay in memory and every
//!   sync reports the error. Nothing written is dropped.
//! - A batch counts in the backlog from seal until the flusher is done with it.
//! - Write-ahead: with a client disk, bytes are committed only once the journal holds
//!   their records durably.
//! - A setattr of a file is applied after every byte written to it before and before every
//!   byte written after. Online, with bytes not yet committed, it is answered at once
//!   (`Deferred`): in write-back mode journaled (an `Op` record) and sent right after the
//!   batch that holds the last of them ([`send_due`] on every commit path), before any
//!   later batch; by default held in memory and sent in the same log entry as their
//!   commit (`Mutation::CommitWriteThenSet`), a write after it sealing the bytes before
//!   it first. Otherwise (a size change, a failed file) the bytes are committed first.
//!   Offline it waits behind them in the offline queue (`offline.rs`). A change outside
//!   the write path (xattrs) sends the held setattrs first.

use crate::cache::ChunkCache;
use crate::journal::{JournalService, Reservation};
use crate::offline::{Barrier, Offline, REACH_WITHIN};
use fuser::Errno;
use hivefs_client::hive::{ClientError, ClientOptions, HiveClient};
use hivefs_client::meta::{LockClient, MetaClient};
use hivefs_client::pipeline::{Pipeline, PreparedChunk};
use hivefs_localdisk::ranges::{insert_range, truncate_ranges};
use hivefs_net::meta::{self as m, Answer, Extent, Mutation, Query, MAX_COMMIT_EXTENTS};
use hivefs_net::proto::ErrorCode;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// An inode's dirty bytes are sealed into a batch for the flusher at this size.
pub const SEAL_BYTES: usize = 32 << 20;
/// Sealed bytes a mount may have waiting for the flusher before writers wait.
pub const BACKLOG_BYTES: usize = 64 << 20;
/// While an inode is failed, its dirty bytes grow to this before a write retries inline.
pub const DIRTY_LIMIT: usize = 64 << 20;
/// A sync with no more than this dirty, and nothing sealed, commits on the caller's thread.
const INLINE_BYTES: usize = 4 << 20;
/// Write-back mode: dirty bytes go to the flusher this long after they were written.
const SEAL_AFTER: Duration = Duration::from_millis(200);
/// Write-back mode: failed files are committed again every this many [`SEAL_AFTER`].
const RETRY_TICKS: u64 = 5;
/// Written ranges up to this size also go into the chunk cache when committed.
const CACHE_WRITES_UP_TO: usize = 1 << 20;
/// Flushed range buffers kept for new dirty ranges (a streaming writer reuses them instead
/// of faulting in fresh pages).
const SPARE_BUFFERS: usize = 4;

/// A failure turned into what the kernel gets.
pub fn io_err(what: &str, e: impl std::fmt::Display) -> Errno {
    tracing::warn!("{what}: {e}");
    Errno::EIO
}

/// A chunk call's failure as the kernel gets it: a full hive is ENOSPC, the rest EIO.
fn chunk_err(what: &str, e: ClientError) -> Errno {
    match e {
        ClientError::NoSpace { .. } => {
            tracing::warn!("{what}: {e}");
            Errno::ENOSPC
        }
        e => io_err(what, e),
    }
}

fn errno(e: m::Errno) -> Errno {
    Errno::from_i32(e.0)
}

/// Sealed ranges of one inode, committed together.
pub struct Batch {
    /// Seal order within the inode, from 1.
    no: u64,
    pub ranges: Vec<(u64, Vec<u8>)>,
    bytes: usize,
    /// The journal records of these bytes: done once they are committed.
    records: Vec<u64>,
}

impl Batch {
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Per-inode state while it is open here (or holds bytes not yet committed).
#[derive(Default)]
pub struct FileState {
    pub opens: u32,
    /// offset -> bytes, non-overlapping, not yet sealed.
    pub dirty: BTreeMap<u64, Vec<u8>>,
    pub dirty_bytes: usize,
    /// The journal records of the dirty bytes (and of dirty bytes truncated away).
    records: Vec<u64>,
    /// The last journal record of this file: what a write-back `fsync` waits for.
    last_record: u64,
    /// Sealed batches not yet committed, oldest first.
    pub sealed: VecDeque<Arc<Batch>>,
    /// Number of the last batch sealed.
    sealed_no: u64,
    /// Number of the last batch the flusher finished with (committed or held).
    done_no: u64,
    /// Why a background commit failed; later batches are held until a sync retries.
    failed: Option<Errno>,
    /// Bytes were dropped: written under a write lease another host took over. The next
    /// [`Writeback::sync`] reports EIO (once), whoever made the drop happen.
    lost: bool,
    /// Setattrs acknowledged before the bytes written before them were committed: each is
    /// sent once they are, or with them ([`Writeback::change_file`]).
    deferred: VecDeque<Deferred>,
    /// The hive's attributes of the file as this mount's create was answered, with
    /// [`MetaClient::changes`] then: still the hive's while that count stands, so the
    /// first setattr deferred after them needs no query (an untar's futimens).
    pub created: Option<(m::Attr, u64)>,
    /// [`MetaClient::changes`] when the hive's attributes were those the first of
    /// `deferred` started from (`u64::MAX`: not known): while it stands, the last one's
    /// answer is the file's attributes as this mount shows them ([`FileState::predicted`]).
    predicted_at: u64,
    /// Size as this host sees it (committed size, raised by dirty writes).
    pub size: u64,
    /// `size` is not known yet: the state of an open still loading it (fs.rs
    /// `open_state`). Attributes answered meanwhile carry the hive's size.
    pub size_unknown: bool,
    /// The committed extents, in offset order.
    pub extents: Vec<Extent>,
    /// Where the last read ended: a read starting there is sequential, and fetches ahead.
    pub last_read_end: u64,
    /// Read-ahead has been asked for up to here.
    pub ahead_until: u64,
}

impl FileState {
    /// Nothing here that the hive does not have.
    pub fn clean(&self) -> bool {
        self.dirty.is_empty() && self.sealed.is_empty() && self.deferred.is_empty()
    }

    /// The committed extents and size, as the hive answered them.
    pub fn loaded(&mut self, extents: Vec<Extent>, size: u64) {
        self.extents = extents;
        self.size = size;
        self.size_unknown = false;
    }

    /// The attributes the last held setattr answered (with this host's size), while no
    /// change this mount knows of (`changes`: [`MetaClient::changes`]) came since its
    /// first was predicted from the hive's: a getattr needs no query (the kernel asks
    /// before a chown).
    pub fn predicted(&self, changes: u64) -> Option<m::Attr> {
        let d = self.deferred.back()?;
        if self.predicted_at != changes {
            return None;
        }
        let mut a = d.attr.clone();
        if !self.size_unknown {
            a.size = self.size;
        }
        Some(a)
    }

    /// Attributes as this host sees them: its size, and the setattrs not yet sent.
    pub fn local_attr(&self, a: &mut m::Attr) {
        if !self.size_unknown {
            a.size = self.size;
        }
        for d in &self.deferred {
            crate::offline::apply_setattr(a, &d.set, d.at);
        }
    }

    /// `lseek` with SEEK_DATA or SEEK_HOLE from `off`, as this host sees the file: data is
    /// what committed extents, sealed batches and dirty ranges cover; holes are the rest,
    /// and the end of the file.
    pub fn seek(&self, off: i64, whence: i32) -> Result<i64, Errno> {
        let off = u64::try_from(off).map_err(|_| Errno::ENXIO)?;
        if off >= self.size {
            return Err(Errno::ENXIO);
        }
        let first = self.extents.partition_point(|e| e.end() <= off);
        let mut covered: Vec<(u64, u64)> = self.extents[first..]
            .iter()
            .map(|e| (e.offset, e.end()))
            .collect();
        let sealed = self
            .sealed
            .iter()
            .flat_map(|b| b.ranges.iter().map(|(s, v)| (*s, v)));
        for (s, v) in sealed.chain(self.dirty.iter().map(|(s, v)| (*s, v))) {
            let e = s + v.len() as u64;
            if e > off {
                covered.push((s, e));
            }
        }
        covered.sort_unstable();
        match whence {
            libc::SEEK_DATA => covered
                .iter()
                .map(|&(s, _)| s.max(off))
                .filter(|&p| p < self.size)
                .min()
                .map(|p| p as i64)
                .ok_or(Errno::ENXIO),
            libc::SEEK_HOLE => {
                let mut p = off;
                for &(s, e) in &covered {
                    if s > p {
                        break;
                    }
                    p = p.max(e);
                }
                Ok(p.min(self.size) as i64)
            }
            _ => Err(Errno::EINVAL),
        }
    }

    /// The committed `extents` (ends past the current end of the file are the caller's).
    /// The dirty bytes become the next sealed batch (`None`: nothing is dirty).
    fn seal_dirty(&mut self) -> Option<Arc<Batch>> {
        if self.dirty.is_empty() {
            return None;
        }
        self.sealed_no += 1;
        let batch = Arc::new(Batch {
            no: self.sealed_no,
            ranges: std::mem::take(&mut self.dirty).into_iter().collect(),
            bytes: std::mem::take(&mut self.dirty_bytes),
            records: std::mem::take(&mut self.records),
        });
        self.sealed.push_back(batch.clone());
        Some(batch)
    }

    /// Offline truncation to `size` (journaled after the held batches): what this host
    /// reads cuts there, held bytes and committed extents alike. (Held batches are cut
    /// too: the hive gets them before the truncation, which would cut them anyway.)
    fn truncate_held(&mut self, size: u64) {
        for b in self.sealed.iter_mut() {
            let mut ranges: BTreeMap<u64, Vec<u8>> = b.ranges.iter().cloned().collect();
            let freed = truncate_ranges(&mut ranges, size);
            if freed > 0 {
                *b = Arc::new(Batch {
                    no: b.no,
                    ranges: ranges.into_iter().collect(),
                    bytes: b.bytes - freed,
                    records: b.records.clone(),
                });
            }
        }
        self.extents.retain(|e| e.offset < size);
        if let Some(e) = self.extents.last_mut() {
            e.len = e
                .len
                .min(u32::try_from(size - e.offset).unwrap_or(u32::MAX));
        }
        self.size = size;
    }

    fn splice(&mut self, committed: &[Extent]) {
        splice_extents(&mut self.extents, committed);
        if let Some(e) = committed.last() {
            self.size = self.size.max(e.end());
        }
    }
}

/// An open file's state and the condition its syncs wait on.
#[derive(Default)]
pub struct OpenFile {
    pub st: Mutex<FileState>,
    done: Condvar,
    /// Another host changed the file since its extents and size were loaded (the hive
    /// pushed an invalidation of it). While nothing of this host's waits for the hive
    /// (`clean`), attributes carry the hive's size and the next read or write loads the
    /// committed extents again first (`fs.rs` `fresh`): an open file follows other
    /// hosts' commits within an invalidation's round trip (`tail -f`), not only when it
    /// is opened again. Outside the lock, so the invalidation thread never waits on it.
    pub stale: AtomicBool,
}

impl OpenFile {
    pub fn lock(&self) -> MutexGuard<'_, FileState> {
        self.st.lock().expect("file lock")
    }

    /// Replace the committed extents and size in `g` (this file's, locked) with `load`'s,
    /// the hive's. `stale` is cleared before `load` runs, so a change announced meanwhile
    /// marks the file again; a failed load leaves it marked. Whether anything changed.
    pub fn reload(
        &self,
        g: &mut FileState,
        load: impl FnOnce() -> Result<(Vec<Extent>, u64), Errno>,
    ) -> Result<bool, Errno> {
        self.stale.store(false, Ordering::Release);
        match load() {
            Ok((extents, size)) => {
                let changed = g.size_unknown || g.size != size || g.extents != extents;
                g.loaded(extents, size);
                Ok(changed)
            }
            Err(e) => {
                self.stale.store(true, Ordering::Release);
                Err(e)
            }
        }
    }
}

/// Chunk connections, one `HiveClient` per concurrent user.
struct ChunkPool {
    opts: ClientOptions,
    idle: Mutex<Vec<HiveClient>>,
}

impl ChunkPool {
    fn with<R>(
        &self,
        mut f: impl FnMut(&mut HiveClient) -> Result<R, ClientError>,
    ) -> Result<R, ClientError> {
        let mut last = None;
        for _ in 0..3 {
            let pooled = self.idle.lock().expect("pool lock").pop();
            let mut c = match pooled {
                Some(c) => c,
                None => match HiveClient::connect(&self.opts) {
                    Ok(c) => c,
                    Err(e) => {
                        last = Some(e);
                        std::thread::sleep(Duration::from_millis(200));
                        continue;
                    }
                },
            };
            match f(&mut c) {
                Ok(r) => {
                    self.idle.lock().expect("pool lock").push(c);
                    return Ok(r);
                }
                // A broken connection is dropped and the call tried on a fresh one; chunk
                // calls are idempotent (put of the same bytes, get, has).
                Err(e @ (ClientError::Conn { .. } | ClientError::Connect { .. })) => {
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("three attempts"))
    }
}

/// The oldest namespace copy a degraded mount reads from (see [`Hive::query`]).
pub const MAX_STALE: Duration = Duration::from_secs(3600);
/// A stale answer this fresh means its node hears a leader: the hive has a majority again.
const FRESH_ENOUGH_MS: u64 = 1_000;

/// What the mount talks to: the metadata service, the chunk shards, and the chunk cache.
pub struct Hive {
    pub meta: Arc<MetaClient>,
    pub vol: u32,
    /// The metadata service lost its majority: queries are answered from a node's own
    /// copy, with its staleness logged, until an answer shows a leader again.
    degraded: std::sync::atomic::AtomicBool,
    /// When a stale read was last logged (one line per 10 s).
    stale_logged: Mutex<Option<Instant>>,
    chunks: ChunkPool,
    pipeline: Pipeline,
    pub cache: ChunkCache,
    /// The mount's lock session: file locks (locks.rs) and write leases (leases.rs).
    pub locks: Arc<LockClient>,
    /// Offline operation (mounts with a client disk; `offline.rs`).
    pub offline: Option<Arc<Offline>>,
    /// Until when held setattrs go apart from their bytes: the hive refused them in one
    /// entry (a node or member of an older build: `engine/src/meta/version.rs`).
    sets_apart_until: Mutex<Option<Instant>>,
}

/// How long a mount sends setattrs apart from their bytes after the hive refused them
/// together (then it asks again: the hive may have been upgraded meanwhile).
const SETS_APART_FOR: Duration = Duration::from_secs(10);

/// How long a commit waits for a write lease another host holds (it is recalled; one that
/// does not answer loses it a lease after the recall).
const LEASE_WAIT: Duration = Duration::from_millis(3 * m::LOCK_LEASE_MS);

impl Hive {
    /// The hive side of volume `vol`, whose chunks are stored at `copies` (its level).
    pub fn new(
        meta: Arc<MetaClient>,
        vol: u32,
        copies: u8,
        pipeline: Pipeline,
        cache: ChunkCache,
    ) -> Hive {
        let opts = meta.chunk_options();
        Hive {
            locks: Arc::new(LockClient::new(meta.clone(), vol)),
            chunks: ChunkPool {
                opts: ClientOptions {
                    level: copies.clamp(1, hivefs_net::proto::MAX_LEVEL),
                    ..opts
                },
                idle: Mutex::new(Vec::new()),
            },
            meta,
            vol,
            degraded: std::sync::atomic::AtomicBool::new(false),
            stale_logged: Mutex::new(None),
            offline: None,
            sets_apart_until: Mutex::new(None),
            pipeline,
            cache,
        }
    }

    /// May held setattrs ride in their bytes' commit ([`Mutation::CommitWriteThenSet`])?
    fn sets_with_bytes(&self) -> bool {
        let mut until = self.sets_apart_until.lock().expect("sets lock");
        match *until {
            Some(t) if Instant::now() < t => false,
            Some(_) => {
                *until = None;
                true
            }
            None => true,
        }
    }

    pub fn mutate(&self, op: Mutation) -> Result<Answer, Errno> {
        self.mutate_after(op, false, None)
    }

    /// [`Hive::mutate`], answered with the directory's attributes too where `op` changes a
    /// name ([`Answer::InDir`]).
    pub fn mutate_in_dir(&self, op: Mutation) -> Result<Answer, Errno> {
        self.mutate_after(op, true, None)
    }

    /// Offline, `op` goes into the journal if the mount can make it (`offline.rs`),
    /// after the bytes of `barrier`'s file written before it; online, to the hive.
    pub fn mutate_after(
        &self,
        op: Mutation,
        in_dir: bool,
        barrier: Option<Barrier>,
    ) -> Result<Answer, Errno> {
        let (touched, named) = (op.changed_inodes(), new_name(&op));
        if let Some(o) = &self.offline {
            if o.holds_back() {
                if let Some(r) = o.journal_change(&self.meta, &op, in_dir, barrier, None) {
                    return r;
                }
            }
            // The hive is tried for REACH_WITHIN only; if it is away, the change goes
            // into the journal under the number it was sent with.
            let seq = self.meta.reserve_seq();
            // Sent once more under the same number if the mount is back online before
            // the change could be journaled (it may have applied: it applies once).
            for _ in 0..2 {
                let r = self.meta.mutate_reserved_within(
                    self.vol,
                    seq,
                    op.clone(),
                    in_dir,
                    REACH_WITHIN,
                );
                let e = match r {
                    Err(e @ (ClientError::Connect { .. } | ClientError::Conn { .. })) => e,
                    r => {
                        if r.is_err() {
                            self.meta.release_seq(seq);
                        }
                        return self.after_mutation(&touched, named, r);
                    }
                };
                o.went_offline(&e.to_string());
                match o.journal_change(&self.meta, &op, in_dir, None, Some(seq)) {
                    Some(Ok(a)) => return Ok(a),
                    // Journaled, but the journal failed before it was durable: it may
                    // still be sent (under this number, kept held).
                    Some(Err(e)) if e == Errno::EIO => return Err(e),
                    Some(Err(e)) => {
                        self.meta.release_seq(seq);
                        return Err(e);
                    }
                    None => continue,
                }
            }
            self.meta.release_seq(seq);
            return Err(Errno::EHOSTDOWN);
        }
        let r = if in_dir {
            self.meta.mutate_in_dir(self.vol, op)
        } else {
            self.meta.mutate(self.vol, op)
        };
        self.after_mutation(&touched, named, r)
    }

    /// Whether this thread must not reach the hive now (`offline.rs`).
    pub fn holds_back(&self) -> bool {
        self.offline.as_ref().is_some_and(|o| o.holds_back())
    }

    /// Offline, reads and commits of chunks fail at once (`offline.rs`).
    fn offline_refuses(&self) -> Result<(), Errno> {
        match self.holds_back() {
            true => Err(Errno::EHOSTDOWN),
            false => Ok(()),
        }
    }

    /// What every change does after the call: the answers an offline mount keeps about
    /// what it touched are replaced by what it answered; a hive that cannot be reached
    /// puts such a mount offline.
    fn after_mutation(
        &self,
        touched: &[u64],
        named: Option<(u64, Vec<u8>)>,
        r: Result<m::MetaReply, ClientError>,
    ) -> Result<Answer, Errno> {
        if let Some(o) = &self.offline {
            for ino in touched {
                o.forget(*ino);
            }
            if let Err(e @ (ClientError::Connect { .. } | ClientError::Conn { .. })) = &r {
                o.went_offline(&e.to_string());
                return Err(Errno::EHOSTDOWN);
            }
        }
        let r = match r {
            Ok(r) => r.map_err(errno),
            Err(e) => Err(io_err("metadata", e)),
        };
        if let Some(o) = &self.offline {
            match &r {
                Ok(Answer::InDir { attr, dir }) => {
                    o.remember_change(named, &Ok(Answer::Attr(attr.clone())));
                    o.remember_change(None, &Ok(Answer::Attr(dir.clone())));
                }
                r => o.remember_change(named, r),
            }
        }
        r
    }

    /// A namespace query: linearizable while the metadata service has a majority. Without
    /// one (an answer of "no quorum", or no leader elected in time) the mount degrades:
    /// queries are answered from a node's own copy of the namespace, at most
    /// [`MAX_STALE`] old, and the staleness is logged; reads of existing files go on.
    /// Changes still fail (they need the majority). A stale answer from a node that heard
    /// a leader within [`FRESH_ENOUGH_MS`] ends the degraded state.
    ///
    /// A mount that can go offline (`offline.rs`) tries the hive for [`REACH_WITHIN`] only,
    /// then goes offline; offline, queries are answered from what it saw.
    pub fn query(&self, q: Query) -> Result<Answer, Errno> {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some(o) = self.offline.as_ref().filter(|o| o.holds_back()) {
            return o.answer(&q);
        }
        if !self.degraded.load(Relaxed) {
            let r = match &self.offline {
                Some(_) => self.meta.query_within(self.vol, q.clone(), REACH_WITHIN),
                None => self.meta.query(self.vol, q.clone()),
            };
            match r {
                Ok(r) => {
                    let r = r.map_err(errno);
                    if let Some(o) = &self.offline {
                        o.remember(&q, &r);
                    }
                    return r;
                }
                Err(e @ (ClientError::Connect { .. } | ClientError::Conn { .. }))
                    if self.offline.is_some() =>
                {
                    let o = self.offline.as_ref().expect("offline");
                    o.went_offline(&e.to_string());
                    return o.answer(&q);
                }
                Err(ClientError::Refused {
                    code: ErrorCode::NoQuorum | ErrorCode::NotLeader,
                    message,
                    ..
                }) => {
                    tracing::warn!("metadata service has no majority ({message}): reading stale namespace copies until it does");
                    self.degraded.store(true, Relaxed);
                }
                Err(e) => return Err(io_err("metadata", e)),
            }
        }
        match self.meta.query_stale(self.vol, q, MAX_STALE) {
            Ok(Ok((answer, stale_ms))) => {
                if stale_ms < FRESH_ENOUGH_MS {
                    if self.degraded.swap(false, Relaxed) {
                        tracing::info!("metadata service has a majority again");
                    }
                } else {
                    let mut logged = self.stale_logged.lock().expect("stale_logged lock");
                    if logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        *logged = Some(Instant::now());
                        tracing::warn!(
                            stale_ms,
                            "namespace read from a copy {stale_ms} ms stale (no majority)"
                        );
                    }
                }
                Ok(answer)
            }
            Ok(Err(e)) => Err(errno(e)),
            Err(e) => Err(io_err("metadata (stale read)", e)),
        }
    }

    /// Verified plaintext of `ids` (`None` where the hive has no such chunk). The chunk
    /// client reads each from its bucket's replicas, failing over from one node to the
    /// next, and verifies every chunk against its id whichever node served it.
    pub fn get_chunks(
        &self,
        ids: &[hivefs_net::chunk::ChunkId],
    ) -> Result<Vec<Option<Vec<u8>>>, Errno> {
        self.offline_refuses()?;
        self.chunks
            .with(|c| c.get(ids))
            .map_err(|e| io_err("reading chunks", e))
    }

    fn prepare(&self, ranges: &[(u64, Vec<u8>)]) -> Vec<Vec<PreparedChunk>> {
        ranges
            .iter()
            .map(|(_, d)| self.pipeline.prepare(d))
            .collect()
    }

    /// Upload prepared ranges and commit them as extents of `ino`. Returns the committed
    /// extents. All chunks of the batch go up in one upload (one `has` and one `put` per
    /// shard), and the extents of all its ranges (in offset order, not overlapping) go in
    /// as few commit-writes as [`MAX_COMMIT_EXTENTS`] allows: a batch of many small ranges
    /// (random writes) costs a few round trips, not a few per range.
    ///
    /// `then`: setattrs made after these bytes, applied in the same log entry as the last
    /// commit-write ([`Mutation::CommitWriteThenSet`]).
    fn upload_commit(
        &self,
        ino: u64,
        ranges: &[(u64, Vec<u8>)],
        prepared: &mut [Vec<PreparedChunk>],
        then: &[m::SetAttr],
    ) -> Result<Vec<Extent>, Errno> {
        self.offline_refuses()?;
        let extents: Vec<Extent> = ranges
            .iter()
            .zip(prepared.iter())
            .flat_map(|((off, _), chunks)| {
                chunks.iter().map(move |c| Extent {
                    offset: off + c.offset,
                    len: c.raw_len,
                    chunk: c.id,
                    chunk_offset: 0,
                })
            })
            .collect();
        let mut all: Vec<PreparedChunk> = prepared.iter_mut().flat_map(|v| v.drain(..)).collect();
        let mut done = 0;
        for attempt in 0..3 {
            let up = self
                .chunks
                .with(|c| c.upload_in_place(&mut all))
                .map_err(|e| chunk_err("uploading chunks", e))?;
            let mut stale = false;
            for part in extents[done..].chunks(MAX_COMMIT_EXTENTS) {
                let end = part.last().map_or(0, |e| e.end());
                let last = done + part.len() == extents.len();
                let then = if last { then } else { &[] };
                match self.commit_part(ino, part, end, up.claim_epoch, then) {
                    Ok(_) => done += part.len(),
                    // The GC epoch moved on between claim and commit: claim again.
                    Err(e) if e == Errno::EAGAIN && attempt < 2 => {
                        stale = true;
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            if !stale {
                break;
            }
        }
        // The chunks are in the hive: keep the plaintext of small writes for reads that
        // follow (copying a streaming writer's gigabytes would only churn the cache).
        for (off, data) in ranges {
            if data.len() > CACHE_WRITES_UP_TO {
                continue;
            }
            let first = extents.partition_point(|e| e.offset < *off);
            let end = off + data.len() as u64;
            for e in extents[first..].iter().take_while(|e| e.offset < end) {
                let at = (e.offset - off) as usize;
                self.cache
                    .insert(e.chunk, Arc::new(data[at..at + e.len as usize].to_vec()));
            }
        }
        Ok(extents)
    }

    /// One commit-write under this mount's write lease on `ino`. `ESTALE`: the lease was
    /// lost to another host (the bytes cannot be committed; see [`Hive::lease_lost`]).
    fn commit_part(
        &self,
        ino: u64,
        part: &[Extent],
        end: u64,
        claim: u64,
        then: &[m::SetAttr],
    ) -> Result<(), Errno> {
        let mut lease = self.write_lease(ino)?;
        for _ in 0..3 {
            let r = self.mutate(if then.is_empty() {
                Mutation::CommitWrite {
                    ino,
                    extents: part.to_vec(),
                    size_at_least: end,
                    claim_epoch: claim,
                    lease,
                }
            } else {
                Mutation::CommitWriteThenSet {
                    ino,
                    extents: part.to_vec(),
                    size_at_least: end,
                    claim_epoch: claim,
                    lease,
                    then: then.to_vec(),
                }
            });
            match r {
                Err(e) if e == Errno::ESTALE => lease = self.lease_lost(ino, lease)?,
                Err(e) if e == Errno::EOPNOTSUPP && !then.is_empty() => {
                    tracing::info!(
                        "the hive cannot take setattrs in their bytes' commit yet (a node of \
                         an older build): sending them apart for {SETS_APART_FOR:?}"
                    );
                    *self.sets_apart_until.lock().expect("sets lock") =
                        Some(Instant::now() + SETS_APART_FOR);
                    return Err(e);
                }
                r => return r.map(|_| ()),
            }
        }
        Err(Errno::EIO)
    }

    /// The write lease on `ino`: held here, or asked for (another holder is recalled
    /// meanwhile; see `engine/src/meta/leases.rs`).
    pub fn write_lease(&self, ino: u64) -> Result<u64, Errno> {
        if let Some(t) = self.locks.lease_token(ino) {
            return Ok(t);
        }
        self.offline_refuses()?;
        let deadline = Instant::now() + LEASE_WAIT;
        let mut backoff = Duration::from_millis(5);
        loop {
            // A mount that can go on without the hive tries it for REACH_WITHIN only, as
            // its other calls do, and goes offline when it is away (EHOSTDOWN here: a
            // truncation is then journaled, a write without the lease refused).
            let r = match &self.offline {
                Some(_) => self.locks.lease_within(ino, REACH_WITHIN),
                None => self.locks.lease(ino, 0),
            };
            match r {
                Ok(Some(t)) => return Ok(t),
                Ok(None) => return Err(Errno::EIO),
                Err(e) if e == m::Errno::HOSTDOWN => {
                    if let Some(o) = &self.offline {
                        o.went_offline("a write lease could not be asked for");
                    }
                    return Err(Errno::EHOSTDOWN);
                }
                Err(e) if e == m::Errno::AGAIN && Instant::now() < deadline => {
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(100));
                }
                Err(e) => return Err(errno(e)),
            }
        }
    }

    /// Before a truncation made offline is sent (`drain_offline`, `send_due`): take the
    /// write lease, as `fs.rs` does before one made online, so a host holding bytes of the
    /// file not yet committed is recalled and commits them and the size applies after
    /// them. `EHOSTDOWN` when the hive is away again (send nothing yet); without the lease
    /// for another reason (the file is gone, say) the change goes as it is and the hive's
    /// answer stands.
    fn lease_before_truncation(&self, ino: u64) -> Result<(), Errno> {
        match self.write_lease(ino) {
            Err(e) if e == Errno::EHOSTDOWN => Err(e),
            Err(e) => {
                tracing::info!(ino, "truncation sent without the write lease ({e:?})");
                Ok(())
            }
            Ok(_) => Ok(()),
        }
    }

    /// The leader refused a commit under lease `old` on `ino`. If this mount gave that
    /// lease back meanwhile (a recall), the commit is of later writes: a new lease.
    /// Otherwise the leader no longer knows it (a new leader, or the lease lapsed):
    /// reclaim it, which fails when another host was granted the file since; then the
    /// bytes written under it must not be committed: `ESTALE`.
    fn lease_lost(&self, ino: u64, old: u64) -> Result<u64, Errno> {
        if self.locks.lease_token(ino) != Some(old) {
            return self.write_lease(ino);
        }
        match self.locks.lease(ino, old) {
            Ok(Some(t)) => {
                tracing::info!(ino, "write lease reclaimed");
                Ok(t)
            }
            Ok(None) => Err(lease_lost_to_another_host(ino)),
            Err(e) => {
                self.locks.forget_lease(ino, old);
                Err(errno(e))
            }
        }
    }

    fn commit(
        &self,
        ino: u64,
        ranges: &[(u64, Vec<u8>)],
        then: &[m::SetAttr],
    ) -> Result<Vec<Extent>, Errno> {
        self.upload_commit(ino, ranges, &mut self.prepare(ranges), then)
    }

    /// Commit bytes a journal replay found, under the write lease they were written under
    /// (`lease`, reclaimed by this client; 0: written before any lease, so a new one).
    /// `ESTALE`: another host was granted the file since; `ENOENT`: the file is gone.
    /// The lease is given back afterwards.
    pub fn replay_commit(
        &self,
        ino: u64,
        lease: u64,
        ranges: &[(u64, Vec<u8>)],
    ) -> Result<(), Errno> {
        if lease != 0 && self.locks.lease_token(ino).is_none() {
            match self.locks.lease(ino, lease) {
                Ok(Some(_)) => {}
                Ok(None) => return Err(Errno::ESTALE),
                Err(e) if e == m::Errno::NOENT => return Err(Errno::ENOENT),
                Err(e) => return Err(errno(e)),
            }
        }
        let r = self.commit(ino, ranges, &[]).map(|_| ());
        if let Err(e) = self.locks.release_lease(ino) {
            tracing::debug!(ino, "giving a write lease back after replay: {e}");
        }
        r
    }
}

/// The name a change creates: (directory, name).
fn new_name(op: &Mutation) -> Option<(u64, Vec<u8>)> {
    match op {
        Mutation::Create { parent, name, .. }
        | Mutation::Symlink { parent, name, .. }
        | Mutation::Link { parent, name, .. } => Some((*parent, name.clone())),
        _ => None,
    }
}

/// The lease bytes were written under went to another host: they cannot be committed
/// (`ESTALE` here; the writer sees EIO).
fn lease_lost_to_another_host(ino: u64) -> Errno {
    tracing::error!(
        ino,
        "write lease lost: another host took the file over; bytes written here and not \
         committed are dropped (EIO)"
    );
    Errno::ESTALE
}

/// A setattr acknowledged before the bytes written before it were committed, to be sent
/// once the file's batches up to `after` are committed. In write-back mode it is journaled
/// (`Op` record `lsn`, sequence number `seq`); by default (no client disk) it is held in
/// memory as those bytes are (`lsn` 0, `seq` 0 until it is first sent), and `after` may
/// be the number the dirty bytes will get when sealed (`sealed_no + 1`): then it goes in
/// the same log entry as their commit ([`Mutation::CommitWriteThenSet`]).
#[derive(Debug, Clone)]
struct Deferred {
    after: u64,
    seq: u64,
    lsn: u64,
    set: m::SetAttr,
    /// When it was made (its ctime, as this host shows it until the hive has it).
    at: m::Timespec,
    /// The attributes it answered (the next one's starting point).
    attr: m::Attr,
}

/// Send the setattrs of `ino` whose bytes before them are all committed, in order. Not
/// reached: `EHOSTDOWN`, and they stay (the retry path sends them).
fn send_due(
    hive: &Hive,
    journal: Option<&JournalService>,
    ino: u64,
    g: &mut FileState,
) -> Result<(), Errno> {
    // Nothing sealed and nothing dirty: the batch the dirty bytes would have become is
    // "committed" too (they were truncated away, or dropped).
    let committed_through = match g.sealed.front() {
        Some(b) => b.no - 1,
        None if g.dirty.is_empty() => g.sealed_no + 1,
        None => g.sealed_no,
    };
    while let Some(d) = g
        .deferred
        .front_mut()
        .filter(|d| d.after <= committed_through)
    {
        if hive.holds_back() {
            return Err(Errno::EHOSTDOWN);
        }
        if d.seq == 0 {
            // Held in memory until now: numbered once (a retry sends the same number).
            d.seq = hive.meta.reserve_seq();
        }
        if d.set.size.is_some() {
            hive.lease_before_truncation(ino)?;
        }
        let op = Mutation::SetAttr {
            ino,
            set: d.set.clone(),
        };
        match hive
            .meta
            .mutate_reserved_within(hive.vol, d.seq, op, false, REACH_WITHIN)
        {
            Ok(Ok(_)) => {}
            // Removed meanwhile (unlinked, and reclaimed): nothing left to set.
            Ok(Err(e)) if e == m::Errno::NOENT => {}
            Ok(Err(e)) => {
                tracing::error!(
                    ino,
                    "a setattr acknowledged in write-back mode was refused ({e})"
                )
            }
            Err(e) => {
                if let (Some(o), ClientError::Connect { .. } | ClientError::Conn { .. }) =
                    (&hive.offline, &e)
                {
                    o.went_offline(&e.to_string());
                }
                tracing::warn!(ino, "setattr held for a retry: {e}");
                return Err(Errno::EHOSTDOWN);
            }
        }
        if let (Some(j), lsn @ 1..) = (journal, d.lsn) {
            j.done(&[lsn]);
        }
        g.deferred.pop_front();
    }
    Ok(())
}

/// A batch on its way through the flusher.
struct Job {
    ino: u64,
    file: Arc<OpenFile>,
    batch: Arc<Batch>,
}

/// Sealed bytes not yet finished with, across the mount.
#[derive(Default)]
struct Backlog {
    bytes: Mutex<usize>,
    below: Condvar,
}

/// The mount's background flusher (see the module doc).
pub struct Writeback {
    hive: Arc<Hive>,
    queue: Mutex<Option<mpsc::Sender<Job>>>,
    backlog: Arc<Backlog>,
    spares: Arc<Mutex<Vec<Vec<u8>>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// The client disk's journal, when the mount has one.
    journal: Option<Arc<JournalService>>,
    /// Write-back mode: `fsync` and `close` wait for the journal only.
    write_back: bool,
    /// Failed files the retry thread commits again (write-back mode: no `fsync` will).
    retry: Arc<Retry>,
}

/// The write-back thread's work (write-back mode): files written since its last tick (to
/// seal), files whose background commit failed (to commit again); and what to do with a
/// closed file once the flusher committed everything it held.
#[derive(Default)]
struct Retry {
    enabled: bool,
    files: Mutex<HashMap<u64, Arc<OpenFile>>>,
    /// Files written since the last tick: their dirty bytes are sealed at the next one.
    written: Mutex<HashMap<u64, Arc<OpenFile>>>,
    stop: AtomicBool,
    settled: std::sync::OnceLock<SettledFn>,
}

impl Retry {
    fn add(&self, ino: u64, file: &Arc<OpenFile>) {
        if self.enabled {
            let mut f = self.files.lock().expect("retry lock");
            f.insert(ino, file.clone());
        }
    }

    /// `file` holds nothing uncommitted: if nobody here has it open, it may go.
    fn settle(&self, ino: u64, file: &Arc<OpenFile>) {
        if let Some(f) = self.settled.get() {
            f(ino, file);
        }
    }
}

impl Writeback {
    /// The flusher of a mount; with `journal`, every write is journaled first, and in
    /// `write_back` mode `fsync` and `close` return once the journal has it.
    pub fn new(
        hive: Arc<Hive>,
        journal: Option<Arc<JournalService>>,
        write_back: bool,
    ) -> std::io::Result<Writeback> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (ptx, prx) = mpsc::sync_channel::<(Job, Vec<Vec<PreparedChunk>>)>(1);
        let backlog = Arc::new(Backlog::default());
        let spares = Arc::new(Mutex::new(Vec::new()));
        let h = hive.clone();
        let prepare = std::thread::Builder::new()
            .name("hi-prepare".into())
            .spawn(move || {
                for job in rx {
                    // A failed inode's batches are held, not committed: skip the work.
                    let failed = job.file.lock().failed.is_some();
                    let prepared = if failed {
                        Vec::new()
                    } else {
                        h.prepare(&job.batch.ranges)
                    };
                    if ptx.send((job, prepared)).is_err() {
                        return;
                    }
                }
            })?;
        let (h, b, s) = (hive.clone(), backlog.clone(), spares.clone());
        let retry = Arc::new(Retry {
            enabled: write_back,
            ..Retry::default()
        });
        let j = journal.clone();
        let r = retry.clone();
        let commit = std::thread::Builder::new()
            .name("hi-commit".into())
            .spawn(move || {
                for (job, prepared) in prx {
                    finish(&h, &b, &s, j.as_deref(), &r, job, prepared);
                }
            })?;
        Ok(Writeback {
            hive,
            queue: Mutex::new(Some(tx)),
            backlog,
            spares,
            threads: Mutex::new(vec![prepare, commit]),
            journal,
            write_back,
            retry,
        })
    }

    /// The mount's journal, if it has one.
    pub fn journal(&self) -> Option<&Arc<JournalService>> {
        self.journal.as_ref()
    }

    /// Start the write-back thread (write-back mode, where no `fsync` commits): every
    /// [`SEAL_AFTER`] it hands the dirty bytes of the files written since to the flusher
    /// (so many small synced writes commit as one batch), and every second it commits
    /// failed files again, so bytes written while the hive was away reach it when it is
    /// back. `settled(ino, file)` is called once a file holds nothing uncommitted.
    pub fn start_retry(self: &Arc<Self>, settled: SettledFn) -> std::io::Result<()> {
        let _ = self.retry.settled.set(settled);
        if !self.write_back {
            return Ok(());
        }
        let wb = self.clone();
        let t = std::thread::Builder::new()
            .name("hi-retry".into())
            .spawn(move || {
                let mut tick = 0u64;
                while !wb.retry.stop.load(Ordering::SeqCst) {
                    std::thread::sleep(SEAL_AFTER);
                    tick += 1;
                    let written = std::mem::take(&mut *wb.retry.written.lock().expect("lock"));
                    for (ino, file) in written {
                        let mut g = file.lock();
                        if g.failed.is_none() {
                            wb.seal(ino, &file, &mut g);
                        }
                    }
                    if !tick.is_multiple_of(RETRY_TICKS) {
                        continue;
                    }
                    let files: Vec<(u64, Arc<OpenFile>)> = {
                        let f = wb.retry.files.lock().expect("retry lock");
                        f.iter().map(|(i, s)| (*i, s.clone())).collect()
                    };
                    for (ino, file) in files {
                        let (g, r) = wb.commit_all(ino, &file, file.lock());
                        let clean = g.clean();
                        drop(g);
                        if r.is_ok() || clean {
                            wb.retry.files.lock().expect("retry lock").remove(&ino);
                            wb.retry.settle(ino, &file);
                        }
                    }
                }
            })?;
        self.threads.lock().expect("threads lock").push(t);
        Ok(())
    }

    /// `fsync`, `flush` and `close`: by default [`Writeback::sync`]; in write-back mode the
    /// call waits only until the journal holds every write made to the file so far (the
    /// write-back thread hands the bytes to the flusher within [`SEAL_AFTER`]).
    pub fn durable<'a>(
        &self,
        ino: u64,
        file: &'a Arc<OpenFile>,
        g: MutexGuard<'a, FileState>,
    ) -> (MutexGuard<'a, FileState>, Result<(), Errno>) {
        let Some(j) = self.journal.as_ref().filter(|_| self.write_back) else {
            return self.sync(ino, file, g);
        };
        let last = g.last_record;
        drop(g);
        let r = j.wait_durable(last);
        let mut g = file.lock();
        if std::mem::take(&mut g.lost) {
            return (g, Err(Errno::EIO));
        }
        (g, r)
    }

    /// Put `data` at `off` into the inode's dirty bytes; seal them when they are enough.
    /// Returns whether the caller should [`Writeback::throttle`] (after dropping the lock).
    /// With a journal, `journaled` is the room reserved for the write's record and the
    /// write lease it is made under: the record is queued first.
    pub fn write(
        &self,
        ino: u64,
        file: &Arc<OpenFile>,
        g: &mut FileState,
        off: u64,
        data: &[u8],
        journaled: Option<(Reservation, u64)>,
    ) -> Result<bool, Errno> {
        if g.deferred.back().is_some_and(|d| d.after > g.sealed_no) {
            // Setattrs held for the dirty bytes' commit come before these bytes: seal
            // the dirty bytes they follow, so that these go in a later batch.
            if g.dirty.is_empty() {
                for d in g.deferred.iter_mut() {
                    d.after = d.after.min(g.sealed_no);
                }
            } else {
                self.seal(ino, file, g);
            }
        }
        if let (Some(j), Some((r, lease))) = (self.journal.as_ref(), journaled) {
            let no = j.append(r, ino, lease, off, data);
            g.records.push(no);
            g.last_record = no;
            if self.write_back {
                let mut w = self.retry.written.lock().expect("written lock");
                w.entry(ino).or_insert_with(|| file.clone());
            }
        }
        if g.dirty.is_empty() {
            // Start the new range in a spare buffer.
            if let Some(mut buf) = self.spares.lock().expect("spares lock").pop() {
                buf.clear();
                buf.extend_from_slice(data);
                g.dirty.insert(off, buf);
                g.dirty_bytes = data.len();
                g.size = g.size.max(off + data.len() as u64);
                return Ok(false);
            }
        }
        let delta = insert_range(&mut g.dirty, off, data);
        g.dirty_bytes = (g.dirty_bytes as isize + delta) as usize;
        g.size = g.size.max(off + data.len() as u64);
        if g.dirty_bytes < SEAL_BYTES {
            return Ok(false);
        }
        if g.failed.is_none() {
            self.seal(ino, file, g);
            return Ok(true);
        }
        // Failed: nothing goes to the flusher until a sync gets through. Past the limit,
        // in write-back mode the writer waits for the retry thread (the journal holds the
        // bytes; the hive may be away for a while); otherwise it retries here, once the
        // flusher has let go of every batch (it holds them quickly).
        if g.dirty_bytes >= DIRTY_LIMIT && self.write_back {
            return Ok(true);
        }
        if g.dirty_bytes >= DIRTY_LIMIT && g.done_no == g.sealed_no {
            self.retry_failed(ino, g)?;
            self.commit_dirty_inline(ino, g)?;
        }
        Ok(false)
    }

    /// Wait while the mount's backlog is full, and in write-back mode while `file` holds
    /// [`DIRTY_LIMIT`] bytes it failed to commit (the retry thread commits them once the
    /// hive is back), for at most `wait`. Call without any file lock held.
    pub fn throttle_file(&self, file: &OpenFile, wait: Duration) {
        self.throttle();
        let deadline = Instant::now() + wait;
        while self.write_back && Instant::now() < deadline {
            {
                let g = file.lock();
                if g.failed.is_none() || g.dirty_bytes < DIRTY_LIMIT {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait while the mount's backlog is full (call without any file lock held).
    pub fn throttle(&self) {
        let mut b = self.backlog.bytes.lock().expect("backlog lock");
        while *b > BACKLOG_BYTES {
            b = self.backlog.below.wait(b).expect("backlog lock");
        }
    }

    /// Hand the dirty bytes to the flusher as the next batch.
    fn seal(&self, ino: u64, file: &Arc<OpenFile>, g: &mut FileState) {
        let Some(batch) = g.seal_dirty() else {
            return;
        };
        *self.backlog.bytes.lock().expect("backlog lock") += batch.bytes;
        let job = Job {
            ino,
            file: file.clone(),
            batch,
        };
        let sent = match self.queue.lock().expect("queue lock").as_ref() {
            Some(q) => q.send(job).map_err(|e| e.0),
            None => Err(job),
        };
        if let Err(job) = sent {
            // The flusher is gone (unmounting): the batch stays sealed and held.
            tracing::error!(ino, "flusher stopped; batch held for a sync");
            g.failed.get_or_insert(Errno::EIO);
            g.done_no = g.done_no.max(job.batch.no);
            self.release_backlog(job.batch.bytes);
        }
    }

    fn release_backlog(&self, bytes: usize) {
        release_backlog(&self.backlog, bytes)
    }

    /// Commit everything written to `file` so far; the guard comes back locked. Reports
    /// (once) bytes dropped since the last sync (see [`FileState`]'s `lost`).
    pub fn sync<'a>(
        &self,
        ino: u64,
        file: &'a Arc<OpenFile>,
        g: MutexGuard<'a, FileState>,
    ) -> (MutexGuard<'a, FileState>, Result<(), Errno>) {
        let (mut g, r) = self.commit_all(ino, file, g);
        if std::mem::take(&mut g.lost) {
            return (g, Err(Errno::EIO));
        }
        (g, r)
    }

    /// [`Writeback::sync`] without taking the report of dropped bytes: what a recalled
    /// file is committed with (the application hears of a drop at its next sync).
    pub fn commit_all<'a>(
        &self,
        ino: u64,
        file: &'a Arc<OpenFile>,
        mut g: MutexGuard<'a, FileState>,
    ) -> (MutexGuard<'a, FileState>, Result<(), Errno>) {
        loop {
            if g.failed.is_none() {
                if g.sealed.is_empty() && g.dirty_bytes <= INLINE_BYTES {
                    let r = self.commit_dirty_inline(ino, &mut g);
                    return (g, r);
                }
                self.seal(ino, file, &mut g);
                let target = g.sealed_no;
                while g.done_no < target {
                    g = file.done.wait(g).expect("file lock");
                }
                if g.failed.is_none() {
                    return (g, Ok(()));
                }
            }
            // Failed: the flusher holds what it gets; wait until it has seen every batch,
            // then retry them in order here. (Writes do not seal while failed.)
            while g.done_no < g.sealed_no {
                g = file.done.wait(g).expect("file lock");
            }
            if let Err(e) = self.retry_failed(ino, &mut g) {
                return (g, Err(e));
            }
        }
    }

    /// Offline, before a change to `file` is journaled: its bytes written so far become
    /// held batches (the flusher done with every earlier one), to be committed before the
    /// change when the hive is back ([`Writeback::drain_offline`]). Returns the guard and
    /// the last batch's number.
    pub fn hold<'a>(
        &self,
        ino: u64,
        file: &'a Arc<OpenFile>,
        mut g: MutexGuard<'a, FileState>,
    ) -> (MutexGuard<'a, FileState>, u64) {
        while g.done_no < g.sealed_no {
            g = file.done.wait(g).expect("file lock");
        }
        if g.seal_dirty().is_some() {
            // Held, not handed to the flusher.
            g.done_no = g.sealed_no;
            g.failed.get_or_insert(Errno::EHOSTDOWN);
            self.retry.add(ino, file);
        }
        let through = g.sealed_no;
        (g, through)
    }

    /// A setattr of an open `file`, after the bytes written to it so far: online they are
    /// committed first; offline (`offline.rs`) they are held, and the change is journaled
    /// after them. The third value: journaled (the hive has not seen it yet).
    pub fn change_file<'a>(
        &self,
        ino: u64,
        file: &'a Arc<OpenFile>,
        g: MutexGuard<'a, FileState>,
        op: Mutation,
    ) -> (MutexGuard<'a, FileState>, Result<Answer, Errno>, bool) {
        let mut g = g;
        if let Some(r) = self.defer(ino, file, &mut g, &op) {
            return (g, r, true);
        }
        if let Some(o) = self.hive.offline.as_ref().filter(|o| o.holds_back()) {
            let (mut held, through) = self.hold(ino, file, g);
            let barrier = Barrier {
                ino,
                file: file.clone(),
                through,
            };
            if let Some(r) = o.journal_change(&self.hive.meta, &op, false, Some(barrier), None) {
                if let (Ok(_), Mutation::SetAttr { set, .. }) = (&r, &op) {
                    if let Some(size) = set.size {
                        held.truncate_held(size);
                    }
                }
                return (held, r, true);
            }
            g = held;
        }
        let (g, r) = self.sync(ino, file, g);
        if let Err(e) = r {
            return (g, Err(e), false);
        }
        (g, self.hive.mutate(op), false)
    }

    /// Before a change made outside the write path (an xattr, an ACL and the mode it
    /// sets): the setattrs acknowledged for `file` and not yet sent go to the hive first
    /// (with the bytes written before them), so that the change lands after them, in the
    /// order it was made. Offline it does nothing (the offline queue keeps the order).
    pub fn send_held_attrs(&self, ino: u64, file: &Arc<OpenFile>) -> Result<(), Errno> {
        let g = file.lock();
        if g.deferred.is_empty() || self.hive.holds_back() {
            return Ok(());
        }
        self.commit_all(ino, file, g).1
    }

    /// Online, a setattr (no size) of a file holding bytes not yet committed is answered at
    /// once and sent after them: an untar's chown, chmod and utimens of each file it wrote
    /// do not wait for its commit. In write-back mode it is journaled (an `Op` record;
    /// an fsync waits for it: the file's last record is then this one) and sent right
    /// after the batch holding the bytes ([`send_due`]). By default (no client disk) it
    /// is held in memory, as the bytes are, and goes to the hive in the same log entry as
    /// their commit (at close, fsync or truncation: one entry for bytes and attributes,
    /// not one each). `None`: not such a case (or no room in the journal now): the
    /// caller commits first, then sends it.
    fn defer(
        &self,
        ino: u64,
        file: &Arc<OpenFile>,
        g: &mut FileState,
        op: &Mutation,
    ) -> Option<Result<Answer, Errno>> {
        let Mutation::SetAttr { set, .. } = op else {
            return None;
        };
        let journal = match (&self.journal, self.write_back) {
            (Some(j), true) => Some(j),
            (None, _) => None,
            // A client disk without write-back: setattrs commit first, as writes do.
            (Some(_), false) => return None,
        };
        // Something must be on its way to send it after (a batch, or bytes to seal).
        let pending = !g.dirty.is_empty() || !g.sealed.is_empty();
        if set.size.is_some() || !pending || g.failed.is_some() {
            return None;
        }
        if self.hive.holds_back() {
            return None;
        }
        // The attributes before it: the last deferred one's answer, or the hive's (as its
        // create was answered, if nothing changed since; else asked).
        let created = g
            .created
            .take()
            .filter(|(_, at)| *at == self.hive.meta.changes());
        let mut a = match (g.deferred.back(), created) {
            (Some(d), _) => d.attr.clone(),
            (None, Some((a, at))) => {
                g.predicted_at = at;
                a
            }
            (None, None) => {
                let at = self.hive.meta.changes();
                let a = match self.hive.query(Query::GetAttr { ino }) {
                    Ok(Answer::Attr(a)) => a,
                    _ => return None,
                };
                // A change this mount heard of while asking: the answer may predate it.
                let now = self.hive.meta.changes();
                g.predicted_at = if now == at { at } else { u64::MAX };
                a
            }
        };
        // "Now" is when it was made, not when the hive gets it.
        let at = m::Timespec::now();
        let fix = |t: Option<m::SetTime>| {
            t.map(|t| match t {
                m::SetTime::Now => m::SetTime::At(at),
                t => t,
            })
        };
        let set = m::SetAttr {
            atime: fix(set.atime),
            mtime: fix(set.mtime),
            ..set.clone()
        };
        let (after, seq, lsn) = match journal {
            Some(j) => {
                let bytes = m::encode(&Mutation::SetAttr {
                    ino,
                    set: set.clone(),
                });
                let room = j.try_reserve_op(bytes.len())?;
                self.seal(ino, file, g);
                let seq = self.hive.meta.reserve_seq();
                let lsn = j.append_op(room, seq, &bytes);
                // Durable with the file's next fsync (which waits for its last record),
                // as the file's bytes are: not before answering.
                g.last_record = g.last_record.max(lsn);
                (g.sealed_no, seq, lsn)
            }
            // After the dirty bytes' batch-to-be, or the last batch sealed.
            None => (g.sealed_no + u64::from(!g.dirty.is_empty()), 0, 0),
        };
        crate::offline::apply_setattr(&mut a, &set, at);
        a.size = g.size;
        g.deferred.push_back(Deferred {
            after,
            seq,
            lsn,
            set,
            at,
            attr: a.clone(),
        });
        Some(Ok(Answer::Attr(a)))
    }

    /// Send what was journaled offline, in order: each change after the bytes written
    /// before it to its file (its [`Barrier`]). Runs on the probe thread once the hive
    /// answers; `true` once nothing is left (the mount is online). A change the hive
    /// answers otherwise than this mount did (another host changed the namespace
    /// meanwhile) is a conflict: logged, counted, and the hive's namespace stands.
    pub fn drain_offline(&self, o: &Offline) -> bool {
        while let Some(p) = o.next_pending() {
            if let Some(b) = &p.barrier {
                if let Err(e) = self.commit_through(b) {
                    tracing::warn!(ino = b.ino, "offline changes wait: commit failed ({e:?})");
                    return false;
                }
            }
            if let Mutation::SetAttr { ino, set } = &p.op {
                if set.size.is_some() && self.hive.lease_before_truncation(*ino).is_err() {
                    tracing::warn!("offline changes wait: the hive is away again");
                    return false;
                }
            }
            let (seq, lsn) = (p.seq, p.lsn);
            let conflict =
                match self
                    .hive
                    .meta
                    .mutate_reserved(self.hive.vol, seq, p.op.clone(), false)
                {
                    Ok(Ok(_)) => false,
                    Ok(Err(e)) => {
                        tracing::error!(
                            seq,
                            op = ?p.op,
                            "a change made offline was refused by the hive ({e}): the namespace \
                             changed meanwhile (another host); the hive's stands"
                        );
                        true
                    }
                    Err(e) => {
                        tracing::warn!("offline changes wait: {e}");
                        return false;
                    }
                };
            self.done(&[lsn]);
            o.sent(seq, conflict);
        }
        true
    }

    /// Commit `b.file`'s held batches numbered up to `b.through`, in order.
    fn commit_through(&self, b: &Barrier) -> Result<(), Errno> {
        let mut g = b.file.lock();
        while g.done_no < g.sealed_no {
            g = b.file.done.wait(g).expect("file lock");
        }
        let r = match g.failed {
            Some(e) if e == Errno::ESTALE => Err(e),
            _ => self.commit_held(b.ino, &mut g, b.through),
        };
        match r {
            // Bytes written under a lease lost to another host: dropped (EIO at the
            // next sync); the change goes on.
            Err(e) if e == Errno::ESTALE => {
                self.drop_lost(b.ino, &mut g);
                return Ok(());
            }
            r => r?,
        }
        if g.sealed.is_empty() && g.dirty.is_empty() && g.deferred.is_empty() {
            g.failed = None;
        }
        Ok(())
    }

    /// Commit the held batches of a failed inode in order; clears the failure on success.
    /// An inode whose write lease was lost (`ESTALE`) has them dropped instead: EIO.
    fn retry_failed(&self, ino: u64, g: &mut FileState) -> Result<(), Errno> {
        if g.failed == Some(Errno::ESTALE) {
            return Err(self.drop_lost(ino, g));
        }
        self.commit_held(ino, g, u64::MAX)?;
        g.failed = None;
        Ok(())
    }

    /// Commit the held batches numbered up to `through`, in order, each followed by the
    /// setattrs due after it ([`send_due`]).
    fn commit_held(&self, ino: u64, g: &mut FileState, through: u64) -> Result<(), Errno> {
        send_due(&self.hive, self.journal.as_deref(), ino, g)?;
        while let Some(b) = g.sealed.front().filter(|b| b.no <= through).cloned() {
            // Only batches the flusher is done with (callers wait for it to let go of all).
            if b.no > g.done_no {
                return Err(Errno::EIO);
            }
            write_ahead(self.journal.as_deref(), &b.records)?;
            let committed = self.hive.commit(ino, &b.ranges, &[])?;
            self.done(&b.records);
            g.sealed.pop_front();
            g.splice(&committed);
            send_due(&self.hive, self.journal.as_deref(), ino, g)?;
        }
        Ok(())
    }

    /// Commit the dirty bytes on this thread (only when nothing is sealed).
    fn commit_dirty_inline(&self, ino: u64, g: &mut FileState) -> Result<(), Errno> {
        debug_assert!(g.sealed.is_empty());
        // Setattrs made after the bytes committed so far, before these.
        send_due(&self.hive, self.journal.as_deref(), ino, g)?;
        if g.dirty.is_empty() {
            // Records whose bytes were all truncated away are no longer needed.
            self.done(&std::mem::take(&mut g.records));
            return Ok(());
        }
        write_ahead(self.journal.as_deref(), &g.records)?;
        // Setattrs held in memory for after these bytes go in the same log entry (not one
        // numbered already: `send_due` tried it alone, and sends it again alone).
        let next = g.sealed_no + 1;
        let together = self.hive.sets_with_bytes();
        let mut then: Vec<m::SetAttr> = g
            .deferred
            .iter()
            .take_while(|d| together && d.after == next && d.seq == 0)
            .take(m::MAX_COMMIT_SETS)
            .map(|d| d.set.clone())
            .collect();
        let ranges: Vec<(u64, Vec<u8>)> = std::mem::take(&mut g.dirty).into_iter().collect();
        let mut r = self.hive.commit(ino, &ranges, &then);
        if matches!(&r, Err(e) if *e == Errno::EOPNOTSUPP) && !then.is_empty() {
            // Refused together: the bytes alone, then the setattrs (`send_due` below).
            then.clear();
            r = self.hive.commit(ino, &ranges, &then);
        }
        match r {
            Ok(committed) => {
                self.done(&std::mem::take(&mut g.records));
                g.dirty_bytes = 0;
                g.splice(&committed);
                keep_spares(&self.spares, ranges);
                g.deferred.drain(..then.len());
                // More than one entry carries: the rest, now due.
                send_due(&self.hive, self.journal.as_deref(), ino, g)
            }
            Err(e) if e == Errno::ESTALE => {
                g.dirty.extend(ranges);
                Err(self.drop_lost(ino, g))
            }
            Err(e) => {
                // Keep the bytes: a later sync tries again; close reports the error.
                g.dirty.extend(ranges);
                Err(e)
            }
        }
    }

    /// The write lease under which these bytes were written is lost to another host:
    /// they cannot be committed. Drop them (sealed and dirty), take the committed size
    /// back, and answer EIO (once: later writes start afresh under a new lease).
    fn drop_lost(&self, ino: u64, g: &mut FileState) -> Errno {
        let bytes: usize = g.sealed.iter().map(|b| b.bytes).sum::<usize>() + g.dirty_bytes;
        tracing::error!(ino, bytes, "dropping writes made under a lost write lease");
        for b in &g.sealed {
            self.done(&b.records);
        }
        self.done(&std::mem::take(&mut g.records));
        g.sealed.clear();
        g.dirty.clear();
        g.dirty_bytes = 0;
        g.failed = None;
        g.lost = true;
        // The setattrs were acknowledged: they go (or wait for the next sync).
        let _ = send_due(&self.hive, self.journal.as_deref(), ino, g);
        g.size = match self.hive.query(Query::GetAttr { ino }) {
            Ok(Answer::Attr(a)) => a.size,
            _ => g.extents.last().map_or(0, |e| e.end()),
        };
        Errno::EIO
    }

    /// The journal records `nos` are committed (or dropped for good).
    fn done(&self, nos: &[u64]) {
        if let Some(j) = &self.journal {
            j.done(nos);
        }
    }

    /// Stop the flusher threads once they have finished what they were given.
    pub fn shutdown(&self) {
        self.retry.stop.store(true, Ordering::SeqCst);
        drop(self.queue.lock().expect("queue lock").take());
        for t in self.threads.lock().expect("threads lock").drain(..) {
            let _ = t.join();
        }
    }
}

/// Write-ahead: wait until the journal holds `records` durably before their bytes are
/// committed (`localdisk/src/book.rs` says why a replay needs it). A failed journal
/// refuses bytes it does not hold: EIO, and they stay in memory.
fn write_ahead(journal: Option<&JournalService>, records: &[u64]) -> Result<(), Errno> {
    match (journal, records.iter().max()) {
        (Some(j), Some(&last)) => j.wait_durable(last),
        _ => Ok(()),
    }
}

fn release_backlog(backlog: &Backlog, bytes: usize) {
    let mut b = backlog.bytes.lock().expect("backlog lock");
    *b -= bytes;
    if *b <= BACKLOG_BYTES {
        backlog.below.notify_all();
    }
}

/// Called once a file holds nothing uncommitted (see [`Writeback::start_retry`]).
pub type SettledFn = Box<dyn Fn(u64, &Arc<OpenFile>) + Send + Sync>;

/// The commit stage of one batch.
fn finish(
    hive: &Hive,
    backlog: &Backlog,
    spares: &Mutex<Vec<Vec<u8>>>,
    journal: Option<&JournalService>,
    retry: &Retry,
    job: Job,
    mut prepared: Vec<Vec<PreparedChunk>>,
) {
    let Job { ino, file, batch } = job;
    let held = file.lock().failed.is_some();
    let r = if held {
        None
    } else {
        Some(
            write_ahead(journal, &batch.records)
                .and_then(|()| hive.upload_commit(ino, &batch.ranges, &mut prepared, &[])),
        )
    };
    match (&r, journal) {
        // Committed: its records go (the head durably past them) before any sync that
        // waits for this batch returns.
        (Some(Ok(_)), Some(j)) => j.done(&batch.records),
        (Some(Err(_)), _) | (None, _) => retry.add(ino, &file),
        _ => {}
    }
    let settled = {
        let mut g = file.lock();
        match r {
            Some(Ok(committed)) => {
                match g.sealed.iter().position(|b| Arc::ptr_eq(b, &batch)) {
                    Some(0) => {
                        g.sealed.pop_front();
                    }
                    at => {
                        // Batches commit in seal order, and only this thread commits them
                        // while the inode is not failed.
                        tracing::error!(ino, ?at, "committed batch was not the oldest sealed");
                        if let Some(i) = at {
                            g.sealed.remove(i);
                        }
                    }
                }
                g.splice(&committed);
                // The setattrs made after this batch, before the next one.
                if let Err(e) = send_due(hive, journal, ino, &mut g) {
                    g.failed.get_or_insert(e);
                    retry.add(ino, &file);
                }
            }
            Some(Err(e)) => {
                tracing::warn!(
                    ino,
                    "background commit failed ({e:?}); held for the next sync"
                );
                g.failed.get_or_insert(e);
            }
            None => {}
        }
        g.done_no = batch.no;
        file.done.notify_all();
        g.opens == 0 && g.clean()
    };
    if settled {
        retry.settle(ino, &file);
    }
    release_backlog(backlog, batch.bytes);
    // The last reference to a committed batch: keep its buffers for new ranges.
    if let Ok(b) = Arc::try_unwrap(batch) {
        keep_spares(spares, b.ranges);
    }
}

fn keep_spares(spares: &Mutex<Vec<Vec<u8>>>, ranges: Vec<(u64, Vec<u8>)>) {
    let mut s = spares.lock().expect("spares lock");
    for (_, v) in ranges {
        if s.len() < SPARE_BUFFERS && v.capacity() >= (1 << 20) {
            s.push(v);
        }
    }
}

/// Replace what `new` covers in `list` (both in offset order, non-overlapping) with `new`:
/// the extents a commit-write of `new` leaves, as the metadata service computes them.
pub fn splice_extents(list: &mut Vec<Extent>, new: &[Extent]) {
    let mut i = 0;
    while i < new.len() {
        // A run of touching new extents replaces one stretch of the list.
        let mut j = i + 1;
        while j < new.len() && new[j].offset == new[j - 1].end() {
            j += 1;
        }
        let (a, b) = (new[i].offset, new[j - 1].end());
        let first = list.partition_point(|e| e.end() <= a);
        let last = list.partition_point(|e| e.offset < b);
        let mut with: Vec<Extent> = Vec::with_capacity(j - i + 2);
        if first < last {
            let head = &list[first];
            if head.offset < a {
                with.push(Extent {
                    len: (a - head.offset) as u32,
                    ..*head
                });
            }
        }
        with.extend_from_slice(&new[i..j]);
        if first < last {
            let tail = &list[last - 1];
            if tail.end() > b {
                let cut = b - tail.offset;
                with.push(Extent {
                    offset: b,
                    len: (tail.end() - b) as u32,
                    chunk: tail.chunk,
                    chunk_offset: tail.chunk_offset + cut as u32,
                });
            }
        }
        list.splice(first..last, with);
        i = j;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hivefs_net::chunk::ChunkId;

    pub fn splitmix(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed;
        move || {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
    }

    /// What each byte of a file reads as: (chunk tag, offset in that chunk), or a hole.
    fn bytes_of(list: &[Extent], len: usize) -> Vec<Option<(u8, u32)>> {
        let mut out = vec![None; len];
        for e in list {
            for k in 0..e.len {
                out[(e.offset + k as u64) as usize] = Some((e.chunk.0[1], e.chunk_offset + k));
            }
        }
        out
    }

    #[test]
    fn splicing_extents_matches_overwriting_bytes() {
        let mut rng = splitmix(11);
        let mut tag = 0u8;
        for _ in 0..300 {
            let mut list: Vec<Extent> = Vec::new();
            let mut model = vec![None; 600];
            for _ in 0..12 {
                // One commit: a few ranges, each a run of touching extents.
                let mut new = Vec::new();
                let mut at = rng() % 100;
                for _ in 0..1 + rng() % 3 {
                    for _ in 0..1 + rng() % 3 {
                        tag = tag.wrapping_add(1);
                        let mut id = [0u8; 33];
                        id[1] = tag;
                        let len = 1 + (rng() % 40) as u32;
                        let e = Extent {
                            offset: at,
                            len,
                            chunk: ChunkId(id),
                            chunk_offset: (rng() % 5) as u32,
                        };
                        for k in 0..len {
                            model[(at + k as u64) as usize] = Some((tag, e.chunk_offset + k));
                        }
                        at += len as u64;
                        new.push(e);
                    }
                    at += rng() % 60 + 1;
                }
                splice_extents(&mut list, &new);
                assert_eq!(bytes_of(&list, 600), model);
                assert!(list.windows(2).all(|w| w[0].end() <= w[1].offset));
                assert!(list.iter().all(|e| e.len > 0));
            }
        }
    }
}
