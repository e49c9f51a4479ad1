//! The FUSE filesystem of `hi mount`: the kernel's requests turned into metadata calls
//! (through [`MetaClient`]) and chunk reads and writes (through [`HiveClient`]s).
//!
//! # Writes
//! Writes collect per inode in a dirty map of non-overlapping byte ranges (with a client
//! disk, each is first a record in its journal: `journal.rs`) and go to the hive through the
//! background flusher of [`crate::writeback`]: sealed into batches as they grow, cut into
//! content-defined chunks, hashed, compressed, offered to the hive (has, then put of the
//! missing ones), and committed as extents for exactly the written ranges. Bytes the
//! application did not write are never rewritten, so two hosts writing different ranges of
//! one file both survive. `close`, `fsync` and truncation wait until every write before
//! them is committed by the metadata service (durable in its Raft log).
//!
//! # Reads
//! A file's extents are loaded when it is opened (close-to-open: an open sees every write
//! closed before it anywhere); this host's own commits are spliced in as they land. A read
//! assembles its range from cached or fetched chunks (each verified against its id by the
//! client library), zeros for holes, and this host's uncommitted bytes on top.
//!
//! # Invariants
//! - Dirty ranges of an inode never overlap; they are applied on top of the extents.
//! - An inode's state is locked only briefly by the flusher (to take a batch and splice
//!   its extents); uploads run unlocked, so reads and writes go on meanwhile.
//! - An inode that lost its last name is reclaimed when the kernel forgets it (it holds
//!   it while open or cached), or at unmount; never while a handle can reach it.
//! - A file's state lives while it has handles, or unflushed bytes (a flush that failed
//!   at close keeps them for the next open or the unmount); opens and closes count it
//!   under the map's lock, so a late release never drops the state a newer open uses.

use crate::cache::ChunkCache;
use crate::fetch::Fetcher;
use crate::hints::{self, Hints};
use crate::leases::Leases;
use crate::reclaim::Reclaimer;
use crate::writeback::{FileState, Hive, OpenFile, Writeback};
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use hivefs_client::meta::MetaClient;
use hivefs_client::pipeline::{ChunkerConfig, Pipeline};
use hivefs_localdisk::ranges::truncate_ranges;
use hivefs_net::chunk::{ChunkId, Codec};
use hivefs_net::meta::{
    self as m, Answer, Attr, Extent, FileKind, MetaReply, Mutation, Query, RenameMode, SetAttr,
    SetTime, Timespec, XattrMode,
};
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long the kernel may cache attributes and names (negative entries too). Long,
/// because other mounts' changes are pushed (`invalidate.rs`: the hive's watch stream
/// drops them from this kernel at once); bounded, because a push can be lost (a slow
/// watcher's overflow, a broken stream, a hive restart, a lookup racing its
/// invalidation): then this is how long another mount's change may stay unseen here.
/// 60 s, as NFS's `acregmax`/`acdirmax` (which have no push at all). At 30 s, a tree
/// made in more than 30 s (20,000 durable creates here) was looked up again name by
/// name when first walked after that: `hive-perf fs meta` stats fell to 0.06-0.08 of
/// ext4's in runs whose creates took 33-37 s, 1.06 in the run that took 28 s.
const TTL: Duration = Duration::from_secs(60);
/// Chunk cache size.
pub const CACHE_BYTES: usize = 256 << 20;
/// Largest write the kernel sends.
const MAX_WRITE: u32 = 1 << 20;
/// Block size reported by stat (what `cp` and friends use as their buffer size).
const BLKSIZE: u32 = 1 << 20;
/// How far ahead of a sequential reader chunks are fetched (in the background).
const READ_AHEAD: u64 = 32 << 20;
/// The kernel's read-ahead window on this mount (announced in INIT, and set on the
/// mount's backing device: see [`raise_kernel_read_ahead`]). One FUSE request's worth
/// (the kernel's `max_pages` limit): sequential reads come as 1 MiB requests, and a page
/// fault of a mapped file reads around it at most this much (a 4 MiB window reads 4 MiB
/// per random fault, for no clear gain: `dd bs=1M` of a cold 3 GiB file, alternated, read
/// 379-409 MB/s at 128 KiB, 396-453 at 1 MiB, 398-480 at 4 MiB).
pub const KERNEL_READ_AHEAD: u32 = 1 << 20;

/// What `hi mount` needs to serve a volume.
pub struct Mounted {
    pub meta: Arc<MetaClient>,
    pub volume: u32,
    /// The volume's copies: the level its chunks are stored at.
    pub copies: u8,
    /// The client disk's journal (`hi mount DISK`); without one, writes wait in memory.
    pub journal: Option<Arc<crate::journal::JournalService>>,
    /// Write-back mode: `fsync` and `close` return once the journal holds the writes.
    pub write_back: bool,
    /// How long a writer waits for room in the journal (and, in write-back mode, for a
    /// file the hive cannot take now).
    pub journal_wait: Duration,
    /// The client disk's chunk cache region.
    pub disk_cache: Option<hivefs_localdisk::DiskCache>,
}

pub struct HiveFs {
    pub hive: Arc<Hive>,
    wb: Arc<Writeback>,
    fetch: Fetcher,
    /// Open files. Lock order: this map, then a file's state.
    files: Arc<Mutex<HashMap<u64, Arc<OpenFile>>>>,
    /// The kernel's lookup count per inode (entries handed out, less forgets).
    lookups: Mutex<HashMap<u64, u64>>,
    /// Inodes this host saw lose their last name: reclaimed when the kernel forgets them
    /// (it holds them while any process has them open or cached).
    orphans: Mutex<HashSet<u64>>,
    next_fh: AtomicU64,
    /// Set when the kernel ends the session (unmounted).
    pub ended: Arc<AtomicBool>,
    /// flock and POSIX locks, exclusive across mounts (see locks.rs).
    locks: crate::locks::Locks,
    /// Answers kept from the hive for what the kernel asks next (hints.rs).
    pub hints: Arc<Hints>,
    /// Unlinked inodes the kernel forgot, reclaimed in the background (reclaim.rs).
    reclaimer: Reclaimer,
    /// Write leases: keepalive, recalls, releases (leases.rs).
    pub leases: Arc<Leases>,
    /// The kernel's cache invalidation channel, once the session runs (set by `main`).
    pub notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
    /// How long a writer waits for a file that cannot be committed (write-back mode).
    journal_wait: Duration,
}

/// How long an open waits for other hosts to give their write leases on the file back
/// (one that does not answer loses its lease a lease after the recall).
const OPEN_WAIT: Duration = Duration::from_millis(2 * m::LOCK_LEASE_MS + 5_000);

fn to_system_time(t: Timespec) -> SystemTime {
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.sec.unsigned_abs()) + Duration::from_nanos(t.nsec as u64)
    }
}

fn to_timespec(t: SystemTime) -> Timespec {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timespec {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let mut sec = -(d.as_secs() as i64);
            let mut nsec = d.subsec_nanos();
            if nsec > 0 {
                sec -= 1;
                nsec = 1_000_000_000 - nsec;
            }
            Timespec { sec, nsec }
        }
    }
}

/// A time the kernel sent. fuser 0.18 turns a pre-epoch (sec < 0, nsec) into
/// `EPOCH - (|sec| s + nsec ns)` (its own TODO says so) instead of `EPOCH - |sec| s + nsec
/// ns`; undo that, so `utimensat` round-trips before 1970 too.
fn from_kernel_time(t: SystemTime) -> Timespec {
    match UNIX_EPOCH.duration_since(t) {
        Ok(before) if !before.is_zero() => Timespec {
            sec: -(before.as_secs() as i64),
            nsec: before.subsec_nanos(),
        },
        _ => to_timespec(t),
    }
}

fn file_type(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::BlockDev => FileType::BlockDevice,
    }
}

fn fuse_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: to_system_time(a.atime),
        mtime: to_system_time(a.mtime),
        ctime: to_system_time(a.ctime),
        crtime: to_system_time(a.crtime),
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: BLKSIZE,
        flags: 0,
    }
}

/// No such name, for the kernel to keep for the TTL (a negative entry: inode 0).
fn reply_absent(reply: ReplyEntry) {
    let none = FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: BLKSIZE,
        flags: 0,
    };
    reply.entry_with_ttls(&Duration::ZERO, &TTL, &none, Generation(0))
}

fn make_hive(
    meta: &Arc<MetaClient>,
    volume: u32,
    copies: u8,
    cache: ChunkCache,
) -> anyhow::Result<Hive> {
    let pipeline = Pipeline::new(
        meta.map().dedupe_key,
        ChunkerConfig::default(),
        Codec::Lz4,
        0,
    )
    .map_err(|e| anyhow::anyhow!("chunker: {e}"))?;
    Ok(Hive::new(meta.clone(), volume, copies, pipeline, cache))
}

/// The hive side a journal replay commits through, before the file system starts.
pub fn replay_hive(meta: &Arc<MetaClient>, vol: &m::VolumeInfo) -> anyhow::Result<Hive> {
    make_hive(meta, vol.id, vol.copies, ChunkCache::new(CACHE_BYTES))
}

/// Forget a file's state when nobody here has it open and it holds nothing uncommitted
/// (bytes a failed flush kept, or write-back bytes on their way, stay with the state: the
/// next open, the flusher or the unmount commits them); its write lease goes with it.
fn drop_if_unused(
    files: &Mutex<HashMap<u64, Arc<OpenFile>>>,
    leases: &Leases,
    hive: &Hive,
    ino: u64,
    st: &Arc<OpenFile>,
) {
    let mut files = files.lock().expect("files lock");
    let g = st.lock();
    if g.opens == 0 && g.clean() {
        drop(g);
        if files.get(&ino).is_some_and(|s| Arc::ptr_eq(s, st)) {
            files.remove(&ino);
            if hive.locks.lease_token(ino).is_some() {
                leases.release(ino);
            }
        }
    }
}

fn name_bytes(n: &OsStr) -> Vec<u8> {
    n.as_bytes().to_vec()
}

impl HiveFs {
    pub fn new(mounted: Mounted) -> anyhow::Result<HiveFs> {
        let cache = ChunkCache::with_disk(CACHE_BYTES, mounted.disk_cache);
        let mut hive = make_hive(&mounted.meta, mounted.volume, mounted.copies, cache)?;
        // With a client disk the mount goes on without the hive (offline.rs).
        let offline = mounted
            .journal
            .as_ref()
            .map(|j| Arc::new(crate::offline::Offline::new(Some(j.clone()))));
        hive.offline = offline.clone();
        let hive = Arc::new(hive);
        let wb = Arc::new(Writeback::new(
            hive.clone(),
            mounted.journal.clone(),
            mounted.write_back,
        )?);
        let hints = Arc::new(Hints::new(TTL));
        if let Some(o) = offline {
            let (w, h) = (wb.clone(), hints.clone());
            // Back from offline: other mounts may have changed anything meanwhile, and a
            // change journaled here may be refused (a conflict): what was learned before
            // is dropped as when pushed invalidations are lost (hints.rs).
            let drain = Box::new(move |o: &crate::offline::Offline| {
                h.drop_all();
                w.drain_offline(o)
            });
            o.start_probe(mounted.meta.clone(), mounted.volume, drain)?;
        }
        let files: Arc<Mutex<HashMap<u64, Arc<OpenFile>>>> = Arc::default();
        let (f, w) = (files.clone(), wb.clone());
        // A recalled file: commit what this host wrote to it (as fsync does).
        let flush: crate::leases::FlushFn = Box::new(move |ino| {
            let st = f.lock().expect("files lock").get(&ino).cloned();
            match st {
                Some(st) => w.commit_all(ino, &st, st.lock()).1,
                None => Ok(()),
            }
        });
        let f = files.clone();
        let busy: crate::leases::BusyFn =
            Box::new(move |ino| f.lock().expect("files lock").contains_key(&ino));
        let leases = Arc::new(Leases::start(hive.locks.clone(), flush, busy)?);
        // A file closed with bytes still going to the hive (write-back mode, or a failed
        // flush) goes once the flusher has committed them.
        let (f, l, h) = (files.clone(), leases.clone(), hive.clone());
        wb.start_retry(Box::new(move |ino, st| drop_if_unused(&f, &l, &h, ino, st)))?;
        Ok(HiveFs {
            leases,
            notifier: Arc::default(),
            locks: crate::locks::Locks::new(hive.locks.clone()),
            wb,
            fetch: Fetcher::new(hive.clone())?,
            reclaimer: Reclaimer::new(hive.clone())?,
            hive,
            files,
            lookups: Mutex::new(HashMap::new()),
            orphans: Mutex::new(HashSet::new()),
            next_fh: AtomicU64::new(1),
            ended: Arc::new(AtomicBool::new(false)),
            hints,
            journal_wait: mounted.journal_wait,
        })
    }

    /// Every change goes through here: a name change asks for its directory's attributes
    /// with the answer and keeps them for the kernel's next getattr (hints.rs).
    ///
    /// Names it adds or removes keep the lists of directories this mount made up to date
    /// (hints.rs, `DirNames`), and a mkdir starts one.
    fn mutate(&self, op: Mutation) -> Result<Answer, Errno> {
        let dir = op.dir();
        let touched = op.changed_inodes();
        let dirs = &self.hints.dir_attrs;
        for &ino in &touched {
            dirs.begin(ino);
        }
        // Name changes only (setattrs, xattrs and the like skip the lists' lock).
        let names = &self.hints.dir_names;
        let changes = name_changes(&op);
        let mkdir = matches!(
            op,
            Mutation::Create {
                kind: FileKind::Dir,
                ..
            }
        );
        let ticket = mkdir.then(|| names.ticket());
        if !changes.is_empty() {
            names.begin(&changes);
        }
        let r = if dir.is_some() {
            self.hive.mutate_in_dir(op)
        } else {
            self.hive.mutate(op)
        };
        if !changes.is_empty() {
            names.end(&changes, change_outcome(&r));
        }
        if let (Ok(Answer::InDir { attr, .. } | Answer::Attr(attr)), Some(t)) = (&r, ticket) {
            names.made(attr.ino, t);
        }
        let (r, dir_attr) = match r {
            Ok(Answer::InDir { attr, dir }) => (Ok(Answer::Attr(attr)), Some(dir)),
            r => (r, None),
        };
        for ino in touched {
            let attr = dir_attr
                .as_ref()
                .filter(|d| d.ino == ino && Some(ino) == dir);
            dirs.end(ino, attr.cloned());
        }
        r
    }

    fn query(&self, q: Query) -> Result<Answer, Errno> {
        self.hive.query(q)
    }

    fn attr_of(r: Result<Answer, Errno>) -> Result<Attr, Errno> {
        match r? {
            Answer::Attr(a) => Ok(a),
            _ => Err(Errno::EIO),
        }
    }

    fn state(&self, ino: u64) -> Option<Arc<OpenFile>> {
        self.files.lock().expect("files lock").get(&ino).cloned()
    }

    /// Attributes as this host sees them: the size raised by unflushed writes. (Every
    /// attribute the kernel gets goes through here: it caches the size it is told.)
    fn local(&self, mut a: Attr) -> Attr {
        if let Some(st) = self.state(a.ino) {
            // While a file is open here, its size is this host's view (committed size
            // raised by unflushed writes, kept up to date by every flush and truncate).
            // Not only when dirty: a late RELEASE may flush between the metadata query
            // above and this point, and the queried size would then be stale. Setattrs
            // made in write-back mode and not yet sent show too. Unless another host
            // changed the file since and nothing here waits for the hive (`stale`): then
            // the hive's answer is newer.
            let g = st.lock();
            if !(st.stale.load(Ordering::Acquire) && g.clean()) {
                g.local_attr(&mut a);
            }
        }
        a
    }

    /// An open file another host changed since it was loaded (`OpenFile::stale`): load
    /// its committed extents and size again, unless this host holds bytes or changes of
    /// it the hive lacks (then its own view stands, as at open). If the hive cannot be
    /// asked now, the view loaded before serves, as it did before the change was known.
    fn fresh(&self, st: &OpenFile, ino: u64) {
        if !st.stale.load(Ordering::Acquire) {
            return;
        }
        let mut g = st.lock();
        if !g.clean() {
            return;
        }
        if let Err(e) = st.reload(&mut g, || {
            load_extents(&self.hive, &self.notifier, ino, false)
        }) {
            tracing::debug!(ino, "reloading a file another host changed: {e:?}");
        }
    }

    /// For the invalidation thread: mark an open file another host changed as stale
    /// (see [`HiveFs::fresh`]); `None`: every open file (invalidations were lost). Takes
    /// only the map's lock, briefly.
    pub fn stale_marker(&self) -> crate::invalidate::StaleFn {
        let files = self.files.clone();
        Box::new(move |ino| {
            let files = files.lock().expect("files lock");
            match ino {
                Some(ino) => {
                    if let Some(st) = files.get(&ino) {
                        st.stale.store(true, Ordering::Release);
                    }
                }
                None => {
                    for st in files.values() {
                        st.stale.store(true, Ordering::Release);
                    }
                }
            }
        })
    }

    fn getattr_local(&self, ino: u64) -> Result<Attr, Errno> {
        Ok(self.local(Self::attr_of(self.query(Query::GetAttr { ino }))?))
    }

    fn load_extents(&self, ino: u64) -> Result<(Vec<Extent>, u64), Errno> {
        load_extents(&self.hive, &self.notifier, ino, true)
    }

    /// Bytes `[off, off + len)` as this host sees them: planned under the file's lock,
    /// fetched and assembled without it (readers of one file run in parallel).
    fn read_range(&self, file: &OpenFile, off: u64, len: usize) -> Result<Vec<u8>, Errno> {
        let plan = plan_read(&mut file.lock(), off, len);
        if !plan.ahead.is_empty() {
            self.fetch.read_ahead(plan.ahead);
        }
        let len = (plan.end - off) as usize;
        // Filled in offset order: only holes are zeroed (zeroing all of it first was 4% of
        // `hi`'s profile in a cold sequential read).
        let mut out = Vec::with_capacity(len);
        let ids: Vec<ChunkId> = plan.extents.iter().map(|e| e.chunk).collect();
        let have = if ids.is_empty() {
            HashMap::new()
        } else {
            self.fetch.get(&ids)?
        };
        for e in &plan.extents {
            let data = &have[&e.chunk];
            let s = e.offset.max(off);
            let t = e.end().min(plan.end);
            let from = e.chunk_offset as usize + (s - e.offset) as usize;
            let n = (t - s) as usize;
            if from + n > data.len() {
                tracing::error!(
                    "extent reaches past its chunk ({} > {})",
                    from + n,
                    data.len()
                );
                return Err(Errno::EIO);
            }
            place(&mut out, (s - off) as usize, &data[from..from + n]);
        }
        out.resize(len, 0);
        for (s, v) in &plan.overlays {
            overlay(&mut out, off, *s, v);
        }
        Ok(out)
    }

    /// An inode that lost its last name is reclaimed once the kernel forgets it; one the
    /// kernel does not hold is reclaimed now.
    fn note_orphan(&self, a: &Attr) {
        if a.nlink != 0 {
            return;
        }
        let held = self
            .lookups
            .lock()
            .expect("lookups lock")
            .contains_key(&a.ino);
        if held {
            self.orphans.lock().expect("orphans lock").insert(a.ino);
        } else {
            self.reclaim(a.ino);
        }
    }

    fn reclaim(&self, ino: u64) {
        self.reclaimer.reclaim(ino);
    }

    /// The kernel now holds one more reference to `ino` (an entry reply).
    fn remember(&self, ino: u64) {
        *self
            .lookups
            .lock()
            .expect("lookups lock")
            .entry(ino)
            .or_default() += 1;
    }

    fn open_state(&self, ino: u64) -> Result<(), Errno> {
        // Counted under the map's lock, so a late release of an earlier handle cannot
        // drop the state this open is about to use. A new state does not know the size
        // until loaded (0 meanwhile): an entry or attribute reply racing this open (the
        // kernel looks the name up for a rename on another thread) must not tell the
        // kernel that size, so it is marked unknown before anyone else can see it.
        let st = {
            let mut files = self.files.lock().expect("files lock");
            let st = files
                .entry(ino)
                .or_insert_with(|| {
                    let st = Arc::new(OpenFile::default());
                    st.lock().size_unknown = true;
                    st
                })
                .clone();
            st.lock().opens += 1;
            st
        };
        let mut g = st.lock();
        if g.clean() {
            // Close-to-open: see what others committed.
            match st.reload(&mut g, || self.load_extents(ino)) {
                Ok(_) => {}
                Err(e) => {
                    drop(g);
                    self.close_state(ino, &st);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// One handle of `ino` is gone; the state goes with the last.
    fn close_state(&self, ino: u64, st: &Arc<OpenFile>) {
        let mut g = st.lock();
        g.opens = g.opens.saturating_sub(1);
        drop(g);
        drop_if_unused(&self.files, &self.leases, &self.hive, ino, st);
    }

    fn entry(&self, reply: ReplyEntry, r: Result<Answer, Errno>) {
        match Self::attr_of(r).map(|a| self.local(a)) {
            Ok(a) => {
                self.remember(a.ino);
                reply.entry(&TTL, &fuse_attr(&a), Generation(a.gen))
            }
            Err(e) => reply.error(e),
        }
    }

    /// Page through directory `dir` from readdir offset `offset` (a cookie; 0 and 1 are
    /// "." and "..") until `add` says the reply is full or the listing ends; with `plus`
    /// each entry carries its attributes (`ReadDirPlus`), else they are left unknown.
    fn dir_pages(
        &self,
        dir: u64,
        offset: u64,
        plus: bool,
        mut add: impl FnMut(&Listed) -> bool,
    ) -> Result<(), Errno> {
        let mut after = offset.max(2);
        loop {
            let (ino, max) = (dir, m::MAX_READDIRPLUS_ENTRIES);
            let ticket = self.hints.xattr_names.ticket();
            let r = if plus {
                self.query(Query::ReadDirPlus { ino, after, max })
            } else {
                self.query(Query::ReadDir { ino, after, max })
            };
            let (entries, end) = match r? {
                Answer::DirPlus { entries, end } if plus => (
                    entries
                        .into_iter()
                        .map(|e| Listed {
                            entry: e.entry,
                            attr: Some(e.attr),
                            xattr_names: e.xattr_names,
                            ticket: Some(ticket),
                        })
                        .collect::<Vec<_>>(),
                    end,
                ),
                Answer::Dir { entries, end } if !plus => (
                    entries
                        .into_iter()
                        .map(|entry| Listed {
                            entry,
                            attr: None,
                            xattr_names: None,
                            ticket: None,
                        })
                        .collect(),
                    end,
                ),
                _ => return Err(Errno::EIO),
            };
            for e in &entries {
                if add(e) {
                    return Ok(());
                }
                after = e.entry.cookie;
            }
            if end {
                return Ok(());
            }
        }
    }

    /// `ino`'s xattr names from the hive, remembered (hints.rs) unless a change of the
    /// inode was seen while the question was on its way.
    fn list_xattr(&self, ino: u64) -> Result<hints::Names, Errno> {
        let ticket = self.hints.xattr_names.ticket();
        match self.query(Query::ListXattr { ino })? {
            Answer::XattrNames(names) => {
                self.hints.xattr_names.remember(ino, &names, ticket);
                Ok(names.into())
            }
            _ => Err(Errno::EIO),
        }
    }

    /// The setattrs held for an open `ino` go first ([`Writeback::send_held_attrs`]).
    fn send_held_attrs(&self, ino: u64) -> Result<(), Errno> {
        match self.state(ino) {
            Some(f) => self.wb.send_held_attrs(ino, &f),
            None => Ok(()),
        }
    }

    /// An access ACL sets the mode's permission bits (the kernel leaves that to us); one
    /// that says no more than the mode is not kept as an xattr (as ext4 does).
    fn set_access_acl(&self, ino: u64, value: &[u8], mode: XattrMode) -> Result<(), Errno> {
        let acl = parse_acl(value).ok_or(Errno::EINVAL)?;
        let cur = Self::attr_of(self.query(Query::GetAttr { ino }))?;
        let perm = (cur.perm & !0o777) | acl.mode_bits;
        if acl.extended {
            self.mutate(Mutation::SetXattr {
                ino,
                name: b"system.posix_acl_access".to_vec(),
                value: value.to_vec(),
                mode,
            })?;
        } else {
            match self.mutate(Mutation::RemoveXattr {
                ino,
                name: b"system.posix_acl_access".to_vec(),
            }) {
                Ok(_) => {}
                Err(e) if e == Errno::ENODATA => {}
                Err(e) => return Err(e),
            }
        }
        if perm != cur.perm {
            self.mutate(Mutation::SetAttr {
                ino,
                set: SetAttr {
                    perm: Some(perm),
                    ..Default::default()
                },
            })?;
        }
        Ok(())
    }

    /// Unlink or rmdir: the inode that lost a name may be an orphan now.
    fn remove_name(&self, op: Mutation, reply: ReplyEmpty) {
        match Self::attr_of(self.mutate(op)) {
            Ok(a) => {
                self.note_orphan(&a);
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }

    fn create_node(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        kind: FileKind,
        perm: u16,
        rdev: u32,
    ) -> Result<Answer, Errno> {
        self.mutate(Mutation::Create {
            parent: parent.0,
            name: name_bytes(name),
            kind,
            perm,
            uid: req.uid(),
            gid: req.gid(),
            rdev,
        })
    }
}

/// A directory entry as [`HiveFs::dir_pages`] hands it out.
struct Listed {
    entry: m::DirEntry,
    /// With `ReadDirPlus`: the inode's attributes as the hive answered them.
    attr: Option<Attr>,
    /// With `ReadDirPlus`: the inode's xattr names, if few (hints.rs).
    xattr_names: Option<Vec<Vec<u8>>>,
    /// Taken before the page was asked for (to remember the names with).
    ticket: Option<hints::Ticket>,
}

/// What a read needs from an open file's state, taken under its lock.
struct ReadPlan {
    /// The read ends here (clipped to the size).
    end: u64,
    /// Committed extents overlapping the read, in offset order.
    extents: Vec<Extent>,
    /// This host's uncommitted bytes in the read, to lay on top in order (sealed batches
    /// oldest first, then dirty ranges).
    overlays: Vec<(u64, Vec<u8>)>,
    /// Chunks a sequential reader will want next, to fetch in the background.
    ahead: Vec<ChunkId>,
}

fn plan_read(st: &mut FileState, off: u64, len: usize) -> ReadPlan {
    let end = (off + len as u64).min(st.size).max(off);
    let mut plan = ReadPlan {
        end,
        extents: Vec::new(),
        overlays: Vec::new(),
        ahead: Vec::new(),
    };
    if off >= end {
        return plan;
    }
    let sequential = off == st.last_read_end && off > 0;
    st.last_read_end = end;
    let first = st.extents.partition_point(|e| e.end() <= off);
    plan.extents = st.extents[first..]
        .iter()
        .take_while(|e| e.offset < end)
        .copied()
        .collect();
    let mut keep = |s: u64, v: &[u8]| {
        let ve = s + v.len() as u64;
        if ve > off && s < end {
            let (a, b) = (s.max(off), ve.min(end));
            plan.overlays
                .push((a, v[(a - s) as usize..(b - s) as usize].to_vec()));
        }
    };
    for b in &st.sealed {
        for (s, v) in &b.ranges {
            keep(*s, v);
        }
    }
    for (&s, v) in st.dirty.range(..end) {
        keep(s, v);
    }
    // A sequential reader gets the next READ_AHEAD fetched in the background, asked for
    // in steps of half of it (not on every read).
    if !sequential {
        st.ahead_until = end;
    } else if st.ahead_until < end + READ_AHEAD / 2 {
        let from = st.ahead_until.max(end);
        let stop = end + READ_AHEAD;
        let at = st.extents.partition_point(|e| e.end() <= from);
        let mut seen = HashSet::new();
        plan.ahead = st.extents[at..]
            .iter()
            .take_while(|e| e.offset < stop)
            .map(|e| e.chunk)
            .filter(|c| seen.insert(*c))
            .collect();
        st.ahead_until = stop;
    }
    plan
}

/// Put `src` at `at` of `out`, which grows to hold it (any gap before `at` zeroed): an
/// append when pieces come in offset order, as read plans give them.
fn place(out: &mut Vec<u8>, at: usize, src: &[u8]) {
    if out.len() <= at {
        out.resize(at, 0);
        out.extend_from_slice(src);
        return;
    }
    let end = at + src.len();
    if out.len() < end {
        out.resize(end, 0);
    }
    out[at..end].copy_from_slice(src);
}

/// Copy the part of `v` (at file offset `s`) that falls in `out` (at file offset `off`).
fn overlay(out: &mut [u8], off: u64, s: u64, v: &[u8]) {
    let end = off + out.len() as u64;
    let ve = s + v.len() as u64;
    if ve <= off || s >= end {
        return;
    }
    let a = s.max(off);
    let b = ve.min(end);
    out[(a - off) as usize..(b - off) as usize]
        .copy_from_slice(&v[(a - s) as usize..(b - s) as usize]);
}

/// How the kernel handles an open file: write-only opens bypass the page cache
/// (`FOPEN_DIRECT_IO`): their writes reach us straight from the writer's pages instead of
/// being copied into page-cache pages first, which on a streaming write costs a fresh
/// page per 4 KiB on a VM that hands freed memory back to its host (measured: 2 GiB
/// written + fsync at 0.37 GB/s against 0.24 GB/s through the page cache, medians of 3). Nothing is lost by it: without a writeback cache every
/// write comes to us anyway, a write-only descriptor cannot be mapped, and the kernel
/// invalidates the written range in the page cache of other opens (Linux 6.6 and later).
fn open_flags(flags: i32) -> FopenFlags {
    if flags & libc::O_ACCMODE == libc::O_WRONLY {
        FopenFlags::FOPEN_DIRECT_IO
    } else {
        FopenFlags::empty()
    }
}

/// Raise the kernel's read-ahead window of the FUSE mount at `mountpoint` to
/// [`KERNEL_READ_AHEAD`]. The kernel takes the smaller of the `max_readahead` a FUSE server
/// announces and its backing device's `read_ahead_kb`, which starts at the block layer's
/// default of 128 KiB, so without this every sequential read reached `hi` as 128 KiB
/// requests (8 per MiB instead of one). Best effort: without root (or sysfs) the
/// kernel's default stays, with a note in the log.
pub fn raise_kernel_read_ahead(mountpoint: &std::path::Path) {
    use std::os::unix::fs::MetadataExt;
    let dev = match std::fs::metadata(mountpoint) {
        Ok(m) => m.dev(),
        Err(e) => {
            tracing::info!("kernel read-ahead left at its default: {e}");
            return;
        }
    };
    let path = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    match std::fs::write(&path, format!("{}\n", KERNEL_READ_AHEAD >> 10)) {
        Ok(()) => tracing::debug!("{path}: {} KiB", KERNEL_READ_AHEAD >> 10),
        Err(e) => tracing::info!("kernel read-ahead left at its default: {path}: {e}"),
    }
}

/// What a granted lock refreshes of a file (locks.rs, "Data"): built on a FUSE thread,
/// run on it or on the lock's waiter thread.
struct LockedView {
    hive: Arc<Hive>,
    files: Arc<Mutex<HashMap<u64, Arc<OpenFile>>>>,
    hints: Arc<Hints>,
    notifier: Arc<OnceLock<fuser::Notifier>>,
}

impl LockedView {
    /// Read the file's committed extents and size again (as an open does: other hosts'
    /// uncommitted bytes are recalled first; kept as they are while this mount holds bytes
    /// of its own not yet committed, as at open). Where they changed, drop what the kernel
    /// and this mount remember of its pages and attributes (unchanged, the kernel's pages
    /// are still the file's: a lock taken again and again on one host rereads nothing).
    fn refresh(&self, ino: u64) -> Result<(), Errno> {
        let st = self.files.lock().expect("files lock").get(&ino).cloned();
        let mut changed = true;
        if let Some(st) = st {
            let mut g = st.lock();
            if g.clean() {
                changed = st.reload(&mut g, || {
                    load_extents(&self.hive, &self.notifier, ino, true)
                })?;
            }
        }
        if !changed {
            return Ok(());
        }
        self.hints.drop_inode(ino);
        if let Some(n) = self.notifier.get() {
            if let Err(e) = n.inval_inode(INodeNo(ino), 0, 0) {
                tracing::debug!(ino, "invalidating after a lock: {e}");
            }
        }
        Ok(())
    }
}

/// What an open reads: the first page of extents through [`Query::Open`], which
/// recalls other hosts' write leases on the file first (`AGAIN` until they gave them
/// back: asked again here, for up to [`OPEN_WAIT`]).
fn open_extents(
    hive: &Hive,
    notifier: &OnceLock<fuser::Notifier>,
    ino: u64,
) -> Result<Answer, Errno> {
    let q = Query::Open {
        ino,
        client: hive.meta.client_id(),
        max: m::MAX_EXTENTS_ANSWER,
    };
    let deadline = std::time::Instant::now() + OPEN_WAIT;
    let mut backoff = Duration::from_millis(2);
    let mut waited = false;
    loop {
        match hive.query(q.clone()) {
            Err(e) if e == Errno::EAGAIN && std::time::Instant::now() < deadline => {
                waited = true;
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(50));
            }
            r => {
                if waited {
                    // Another host committed to it just now: the size the kernel
                    // holds is older (its invalidation may still be on its way).
                    if let Some(n) = notifier.get() {
                        if let Err(e) = n.inval_inode(INodeNo(ino), 0, 0) {
                            tracing::debug!(ino, "invalidating after a recall: {e}");
                        }
                    }
                }
                return r;
            }
        }
    }
}

/// A file's committed extents and size: as an open reads them (`recall`: [`open_extents`]
/// first, so other hosts' uncommitted bytes are committed before), or as they stand.
fn load_extents(
    hive: &Hive,
    notifier: &OnceLock<fuser::Notifier>,
    ino: u64,
    recall: bool,
) -> Result<(Vec<Extent>, u64), Errno> {
    let mut out = Vec::new();
    let mut from = 0u64;
    loop {
        let r = if recall && from == 0 && out.is_empty() {
            open_extents(hive, notifier, ino)?
        } else {
            hive.query(Query::Extents {
                ino,
                from,
                to: u64::MAX,
                max: m::MAX_EXTENTS_ANSWER,
            })?
        };
        match r {
            Answer::Extents {
                extents,
                size,
                more,
            } => {
                if let Some(last) = extents.last() {
                    from = last.end();
                }
                for e in extents {
                    if out_after(&out, &e) {
                        out.push(e);
                    }
                }
                if !more {
                    return Ok((out, size));
                }
            }
            _ => return Err(Errno::EIO),
        }
    }
}

/// Permission bits of a new inode: the mode less the umask.
fn masked(mode: u32, umask: u32) -> u16 {
    (mode & !umask & 0o7777) as u16
}

/// Keep extents in order without repeating the one a page boundary returned twice.
fn out_after(out: &[Extent], e: &Extent) -> bool {
    out.last().is_none_or(|l| e.offset >= l.end())
}

impl Filesystem for HiveFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_readahead(KERNEL_READ_AHEAD);
        // The kernel enforces POSIX ACLs stored in system.posix_acl_* xattrs (and keeps
        // mode bits in step with them); needs default_permissions, which the mount sets.
        if let Err(missing) = config.add_capabilities(fuser::InitFlags::FUSE_POSIX_ACL) {
            tracing::warn!("kernel lacks {missing:?}: POSIX ACLs are stored but not enforced");
        }
        // Every listing carries attributes (readdirplus, not AUTO: the kernel's AUTO asks
        // with attributes only for a listing's first page, so `du` or `find -size` looked
        // up most entries one by one).
        if let Err(missing) = config.add_capabilities(fuser::InitFlags::FUSE_DO_READDIRPLUS) {
            tracing::warn!("kernel lacks {missing:?}: listings carry no attributes");
        }
        // flock and fcntl locks come to us (locks.rs), so they hold across mounts.
        for cap in [
            fuser::InitFlags::FUSE_POSIX_LOCKS,
            fuser::InitFlags::FUSE_FLOCK_LOCKS,
        ] {
            if let Err(missing) = config.add_capabilities(cap) {
                tracing::warn!("kernel lacks {missing:?}: those locks are local to this mount");
            }
        }
        Ok(())
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let gone = {
            let mut l = self.lookups.lock().expect("lookups lock");
            match l.get_mut(&ino.0) {
                Some(n) if *n > nlookup => {
                    *n -= nlookup;
                    false
                }
                Some(_) => {
                    l.remove(&ino.0);
                    true
                }
                None => false,
            }
        };
        if gone {
            self.hints.forgotten(ino.0);
            if self.orphans.lock().expect("orphans lock").remove(&ino.0) {
                self.reclaim(ino.0);
            }
        }
    }

    fn destroy(&mut self) {
        // Unmounting: commit what failed to flush at close (each try is logged)...
        let left: Vec<(u64, Arc<OpenFile>)> = self
            .files
            .lock()
            .expect("files lock")
            .iter()
            .map(|(i, s)| (*i, s.clone()))
            .collect();
        for (ino, st) in left {
            let g = st.lock();
            if !g.clean() {
                let (g, r) = self.wb.sync(ino, &st, g);
                if let Err(e) = r {
                    let held: usize = g.sealed.iter().map(|b| b.bytes()).sum();
                    tracing::error!(
                        ino,
                        "unmounting with {} uncommitted bytes: {e:?}",
                        g.dirty_bytes + held
                    );
                }
            }
        }
        self.wb.shutdown();
        if let Some(j) = self.wb.journal() {
            j.shutdown();
            let st = j.status();
            tracing::info!(
                groups = st.groups,
                records = st.records,
                pending = st.pending,
                "journal at unmount ({} records left for the next mount)",
                st.pending
            );
        }
        self.leases.stop();
        self.fetch.shutdown();
        // ... then the kernel holds nothing any more.
        let orphans: Vec<u64> = self.orphans.lock().expect("orphans lock").drain().collect();
        for ino in orphans {
            self.reclaim(ino);
        }
        self.reclaimer.shutdown();
        let (entries, bytes, hits, misses) = self.hive.cache.stats();
        tracing::info!(entries, bytes, hits, misses, "chunk cache at unmount");
        self.ended.store(true, Ordering::SeqCst);
    }

    /// An absent name is answered as a negative entry the kernel keeps for the TTL (a
    /// shell's `PATH` search, a compiler's include path, Python's imports ask for the
    /// same absent names over and over): another mount creating the name pushes its
    /// invalidation, as for any cached name (invalidate.rs). Not when an invalidation
    /// arrived while the question was on its way (it may be this name's: the answer is
    /// used once), nor while the mount is offline.
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let names = &self.hints.dir_names;
        // A directory this mount made and alone changed: every name in it is known.
        if names.absent(parent.0, name.as_bytes()) {
            return reply_absent(reply);
        }
        let ticket = names.ticket();
        let r = self.query(Query::Lookup {
            parent: parent.0,
            name: name_bytes(name),
        });
        let offline = self.hive.offline.as_ref().is_some_and(|o| o.is_offline());
        match r {
            Err(e) if e == Errno::ENOENT && names.unchanged_since(ticket) && !offline => {
                reply_absent(reply)
            }
            r => self.entry(reply, r),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        // A directory this mount just changed: its attributes came with the answer.
        if let Some(a) = self.hints.dir_attrs.take(ino.0) {
            return reply.attr(&TTL, &fuse_attr(&a));
        }
        // An open file with setattrs held here: their answer stands (writeback.rs).
        let changes = self.hive.meta.changes();
        if let Some(a) = self
            .state(ino.0)
            .and_then(|st| st.lock().predicted(changes))
        {
            return reply.attr(&TTL, &fuse_attr(&a));
        }
        match self.getattr_local(ino.0) {
            Ok(a) => reply.attr(&TTL, &fuse_attr(&a)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // A chown, chmod or truncation may clear file capabilities (the store decides):
        // ask again. (Times alone change no xattr: the kernel's probe of
        // security.capability before a chown that follows is answered from the list.)
        if mode.is_some() || uid.is_some() || gid.is_some() || size.is_some() {
            self.hints.xattr_names.drop_inode(ino.0);
        }
        let t = |x: Option<TimeOrNow>| {
            x.map(|t| match t {
                TimeOrNow::Now => SetTime::Now,
                TimeOrNow::SpecificTime(s) => SetTime::At(from_kernel_time(s)),
            })
        };
        let set = SetAttr {
            perm: mode.map(|m| (m & 0o7777) as u16),
            uid,
            gid,
            size,
            atime: t(atime),
            mtime: t(mtime),
        };
        let op = Mutation::SetAttr { ino: ino.0, set };
        // A truncation takes this mount's write lease on the file, as a write does: a
        // host holding bytes of it not yet committed is recalled first and commits them,
        // so the new size applies after them, as after writes made before it on one
        // machine. (Offline, the truncation is journaled; it takes the lease when it is
        // sent, `drain_offline`. A hive found away here puts the mount offline:
        // EHOSTDOWN, and the truncation is journaled below.)
        if size.is_some() && !self.hive.holds_back() {
            match self.hive.write_lease(ino.0) {
                Err(e) if !(e == Errno::EHOSTDOWN && self.hive.holds_back()) => {
                    return reply.error(e)
                }
                _ => {}
            }
        }
        let Some(f) = self.state(ino.0) else {
            return match Self::attr_of(self.mutate(op)) {
                Ok(a) => reply.attr(&TTL, &fuse_attr(&a)),
                Err(e) => reply.error(e),
            };
        };
        let mut g = f.lock();
        // Unflushed bytes past a new size go; the rest is committed first (offline: held
        // and committed first when the hive is back), so the change applies after every
        // write before it (a commit sets mtime: times set by `touch -r` or `cp -a` on an
        // open file must come after it).
        if let Some(new) = size {
            let freed = truncate_ranges(&mut g.dirty, new);
            g.dirty_bytes -= freed;
        }
        let dirs = &self.hints.dir_attrs;
        dirs.begin(ino.0);
        let (mut g, r, journaled) = self.wb.change_file(ino.0, &f, g, op);
        dirs.end(ino.0, None);
        match Self::attr_of(r) {
            Ok(mut a) => {
                // Unflushed writes of an open file count (the lock is ours already).
                if !g.clean() {
                    a.size = g.size;
                }
                if size.is_some() && !journaled {
                    if let Err(e) = f.reload(&mut g, || self.load_extents(ino.0)) {
                        return reply.error(e);
                    }
                }
                reply.attr(&TTL, &fuse_attr(&a))
            }
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.query(Query::ReadLink { ino: ino.0 }) {
            Ok(Answer::Link(t)) => reply.data(&t),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let kind = match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => FileKind::File,
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFSOCK => FileKind::Socket,
            libc::S_IFCHR => FileKind::CharDev,
            libc::S_IFBLK => FileKind::BlockDev,
            _ => return reply.error(Errno::EINVAL),
        };
        let r = self.create_node(req, parent, name, kind, masked(mode, umask), rdev);
        self.entry(reply, r)
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.create_node(req, parent, name, FileKind::Dir, masked(mode, umask), 0);
        self.entry(reply, r)
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let op = Mutation::Unlink {
            parent: parent.0,
            name: name_bytes(name),
        };
        self.remove_name(op, reply)
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let op = Mutation::Rmdir {
            parent: parent.0,
            name: name_bytes(name),
        };
        self.remove_name(op, reply)
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self.mutate(Mutation::Symlink {
            parent: parent.0,
            name: name_bytes(link_name),
            target: target.as_os_str().as_bytes().to_vec(),
            uid: req.uid(),
            gid: req.gid(),
        });
        self.entry(reply, r)
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mode = if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            RenameMode::Exchange
        } else if flags.contains(RenameFlags::RENAME_NOREPLACE) {
            RenameMode::NoReplace
        } else if flags.is_empty() {
            RenameMode::Replace
        } else {
            return reply.error(Errno::EINVAL);
        };
        match self.mutate(Mutation::Rename {
            parent: parent.0,
            name: name_bytes(name),
            new_parent: newparent.0,
            new_name: name_bytes(newname),
            mode,
        }) {
            Ok(Answer::Renamed {
                replaced: Some(r), ..
            }) if mode == RenameMode::Replace => {
                if let Ok(a) = Self::attr_of(self.query(Query::GetAttr { ino: r })) {
                    self.note_orphan(&a);
                }
                reply.ok()
            }
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = self.mutate(Mutation::Link {
            ino: ino.0,
            parent: newparent.0,
            name: name_bytes(newname),
        });
        self.entry(reply, r)
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.open_state(ino.0) {
            Ok(()) => reply.opened(
                FileHandle(self.next_fh.fetch_add(1, Ordering::Relaxed)),
                open_flags(flags.0),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(st) = self.state(ino.0) else {
            return reply.error(Errno::EBADF);
        };
        self.fresh(&st, ino.0);
        match self.read_range(&st, offset, size as usize) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(st) = self.state(ino.0) else {
            return reply.error(Errno::EBADF);
        };
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|e| e > m::MAX_FILE_BYTES)
        {
            return reply.error(Errno::EFBIG);
        }
        // Bytes not yet committed are held under this mount's write lease on the file
        // (leases.rs): an open on another host recalls it and so sees them.
        if self.hive.locks.lease_token(ino.0).is_none() {
            if let Err(e) = self.hive.write_lease(ino.0) {
                return reply.error(e);
            }
        }
        // Room in the journal first (it may wait for commits, which take file locks).
        let journaled = match self.wb.journal() {
            Some(j) => match j.reserve(data.len()) {
                Ok(r) => Some((r, self.hive.locks.lease_token(ino.0).unwrap_or(0))),
                Err(e) => return reply.error(e),
            },
            None => None,
        };
        self.fresh(&st, ino.0);
        let mut g = st.lock();
        match self.wb.write(ino.0, &st, &mut g, offset, data, journaled) {
            Ok(throttle) => {
                drop(g);
                if throttle {
                    // Before the reply: a writer waits here while the flusher catches up.
                    self.wb.throttle_file(&st, self.journal_wait);
                }
                reply.written(data.len() as u32)
            }
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let flushed = match self.state(ino.0) {
            Some(st) => self.wb.durable(ino.0, &st, st.lock()).1,
            None => Ok(()),
        };
        // POSIX: any close drops the process's locks on the file (after its data).
        self.locks.close_owner(ino.0, lock_owner.0);
        match flushed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // Set with FUSE_RELEASE_FLOCK_UNLOCK: the open file's flock locks go.
        if let Some(o) = lock_owner {
            self.locks.close_owner(ino.0, o.0);
        }
        let Some(st) = self.state(ino.0) else {
            return reply.ok();
        };
        let flushed = self.wb.durable(ino.0, &st, st.lock()).1;
        self.close_state(ino.0, &st);
        match flushed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsync(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.flush(req, ino, fh, LockOwner(0), reply)
    }

    fn getlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        _pid: u32,
        reply: fuser::ReplyLock,
    ) {
        self.locks
            .getlk(ino.0, lock_owner.0, start, end, typ, reply)
    }

    fn setlk(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let (owner, tid) = (lock_owner.0, req.pid());
        if typ == libc::F_UNLCK {
            // Unlocking publishes what this mount wrote to the file (locks.rs, "Data"): the
            // next holder, on any host, reads it.
            if let Some(st) = self.state(ino.0) {
                if let Err(e) = self.wb.durable(ino.0, &st, st.lock()).1 {
                    return reply.error(e);
                }
            }
        }
        let view = LockedView {
            hive: self.hive.clone(),
            files: self.files.clone(),
            hints: self.hints.clone(),
            notifier: self.notifier.clone(),
        };
        let granted = Box::new(move || view.refresh(ino.0));
        self.locks.setlk(
            tid, ino.0, owner, start, end, typ, pid, sleep, reply, granted,
        )
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if offset == 0 && reply.add(ino, 1, FileType::Directory, ".") {
            return reply.ok();
        }
        if offset <= 1 && reply.add(ino, 2, FileType::Directory, "..") {
            return reply.ok();
        }
        let r = self.dir_pages(ino.0, offset, false, |e| {
            let e = &e.entry;
            reply.add(
                INodeNo(e.ino),
                e.cookie,
                file_type(e.kind),
                OsStr::from_bytes(&e.name),
            )
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    /// Entries with their attributes (and xattr names, hints.rs), so that `ls -l`, `find`
    /// or `du` need no lookup per entry: one metadata round trip per
    /// [`m::MAX_READDIRPLUS_ENTRIES`] entries instead of one or more per entry.
    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        // The kernel links no inode for "." and ".." (nothing counted); their attributes
        // are not used.
        let dot = fuse_attr(&Attr {
            ino: ino.0,
            gen: 0,
            kind: FileKind::Dir,
            perm: 0o755,
            nlink: 2,
            uid: 0,
            gid: 0,
            size: 0,
            atime: Timespec::default(),
            mtime: Timespec::default(),
            ctime: Timespec::default(),
            crtime: Timespec::default(),
            rdev: 0,
        });
        let none = Duration::ZERO;
        if offset == 0 && reply.add(ino, 1, ".", &none, &dot, Generation(0)) {
            return reply.ok();
        }
        if offset <= 1 && reply.add(ino, 2, "..", &none, &dot, Generation(0)) {
            return reply.ok();
        }
        let names = &self.hints.xattr_names;
        let r = self.dir_pages(ino.0, offset, true, |e| {
            let Some(a) = e.attr.clone() else {
                unreachable!("a ReadDirPlus entry has its attributes")
            };
            let a = self.local(a);
            let full = reply.add(
                INodeNo(a.ino),
                e.entry.cookie,
                OsStr::from_bytes(&e.entry.name),
                &TTL,
                &fuse_attr(&a),
                Generation(a.gen),
            );
            if !full {
                // The kernel counts a lookup for every entry of the reply (it links the
                // inode, or forgets it at once if it cannot).
                self.remember(a.ino);
                if let (Some(list), Some(ticket)) = (&e.xattr_names, e.ticket) {
                    names.remember(a.ino, list, ticket);
                }
            }
            full
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Namespace changes are durable when they are answered.
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.query(Query::StatFs) {
            Ok(Answer::StatFs(s)) => {
                let bsize = 4096u64;
                reply.statfs(
                    s.device_bytes / bsize,
                    s.device_free_bytes / bsize,
                    s.device_free_bytes / bsize,
                    s.files + (1 << 32),
                    1 << 32,
                    bsize as u32,
                    m::MAX_NAME_BYTES as u32,
                    bsize as u32,
                )
            }
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let mode = match flags {
            0 => XattrMode::Any,
            libc::XATTR_CREATE => XattrMode::Create,
            libc::XATTR_REPLACE => XattrMode::Replace,
            _ => return reply.error(Errno::EINVAL),
        };
        if let Err(e) = self.send_held_attrs(ino.0) {
            return reply.error(e);
        }
        // Dropped before (nothing answers from the old list meanwhile) and after (a list
        // read while the change was on its way is not kept).
        self.hints.xattr_names.drop_inode(ino.0);
        let r = if name.as_bytes() == b"system.posix_acl_access" {
            self.set_access_acl(ino.0, value, mode)
        } else {
            self.mutate(Mutation::SetXattr {
                ino: ino.0,
                name: name_bytes(name),
                value: value.to_vec(),
                mode,
            })
            .map(|_| ())
        };
        self.hints.xattr_names.drop_inode(ino.0);
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let name = name.as_bytes();
        // Names the kernel and tools probe on their own (hints.rs): their list answers
        // this and the next probes of the inode.
        let names = match self.hints.xattr_names.get(ino.0) {
            Some(names) => Some(names),
            None if hints::PROBED.contains(&name) => match self.list_xattr(ino.0) {
                Ok(names) => Some(names),
                Err(e) => return reply.error(e),
            },
            None => None,
        };
        if names.is_some_and(|n| !n.iter().any(|x| x == name)) {
            return reply.error(Errno::ENODATA);
        }
        match self.query(Query::GetXattr {
            ino: ino.0,
            name: name.to_vec(),
        }) {
            Ok(Answer::Xattr(v)) => xattr_reply(reply, size, &v),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let names = match self.hints.xattr_names.get(ino.0) {
            Some(names) => names,
            None => match self.list_xattr(ino.0) {
                Ok(names) => names,
                Err(e) => return reply.error(e),
            },
        };
        let mut buf = Vec::new();
        for n in names.iter() {
            buf.extend_from_slice(n);
            buf.push(0);
        }
        xattr_reply(reply, size, &buf)
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if let Err(e) = self.send_held_attrs(ino.0) {
            return reply.error(e);
        }
        self.hints.xattr_names.drop_inode(ino.0);
        let r = self.mutate(Mutation::RemoveXattr {
            ino: ino.0,
            name: name_bytes(name),
        });
        // Again: a list read while the removal was on its way is not kept.
        self.hints.xattr_names.drop_inode(ino.0);
        done(reply, r)
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        // Only SEEK_DATA and SEEK_HOLE come here; the kernel does the others.
        let Some(st) = self.state(ino.0) else {
            return reply.error(Errno::EBADF);
        };
        let r = st.lock().seek(offset, whence);
        match r {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // The kernel checks permissions (mounted with default_permissions).
        reply.ok()
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let before = self.hive.meta.changes();
        let names = self.hints.xattr_names.ticket();
        let r = self.create_node(req, parent, name, FileKind::File, masked(mode, umask), 0);
        // The answer is the hive's state of the file while nothing else changed meanwhile
        // (the create was the one change counted since `before`).
        let after = self.hive.meta.changes();
        let alone = after == before + 1;
        match Self::attr_of(r) {
            Ok(a) => {
                {
                    let mut files = self.files.lock().expect("files lock");
                    let st = files.entry(a.ino).or_default();
                    let mut g = st.lock();
                    g.opens += 1;
                    g.created = alone.then(|| (a.clone(), after));
                }
                if alone {
                    // A new file has no xattrs (nothing else changed since it was made;
                    // one set later drops the list).
                    self.hints.xattr_names.remember(a.ino, &[], names);
                }
                self.remember(a.ino);
                reply.created(
                    &TTL,
                    &fuse_attr(&a),
                    Generation(a.gen),
                    FileHandle(self.next_fh.fetch_add(1, Ordering::Relaxed)),
                    open_flags(flags),
                )
            }
            // The kernel asks to create only after a lookup found no such name; if the
            // name exists now (another mount made it since, or its invalidation is still
            // on its way: hints.rs), a non-exclusive open must open it. ESTALE makes the
            // kernel walk the path once more asking for every name (`LOOKUP_REVAL`),
            // which finds the file and opens it with the usual checks. (Once: a name
            // removed and made again between those two walks gives the program ESTALE.)
            Err(e) if e == Errno::EEXIST && flags & libc::O_EXCL == 0 => reply.error(Errno::ESTALE),
            Err(e) => reply.error(e),
        }
    }
}

/// How a change was answered, for `DirNames` (hints.rs): the errors the hive answers
/// when it refused a change (nothing applied), or `Unknown` (it may have applied).
fn change_outcome(r: &Result<Answer, Errno>) -> hints::ChangeOutcome {
    use hints::ChangeOutcome::*;
    let Err(e) = r else {
        return Applied;
    };
    let refused = [
        Errno::ENOTEMPTY,
        Errno::ENOTDIR,
        Errno::EISDIR,
        Errno::EINVAL,
        Errno::ENAMETOOLONG,
        Errno::EPERM,
        Errno::EACCES,
        Errno::EXDEV,
        Errno::EMLINK,
        Errno::ENOSPC,
    ];
    match *e {
        e if e == Errno::EEXIST => Exists,
        e if e == Errno::ENOENT => Missing,
        e if refused.contains(&e) => Refused,
        _ => Unknown,
    }
}

/// What `op` does to names in directories, for the lists of `DirNames` (hints.rs).
fn name_changes(op: &Mutation) -> Vec<(u64, Vec<u8>, hints::NameChange)> {
    use hints::NameChange::{Added, Kept, Removed};
    match op {
        Mutation::Create { parent, name, .. }
        | Mutation::Symlink { parent, name, .. }
        | Mutation::Link { parent, name, .. } => vec![(*parent, name.clone(), Added)],
        Mutation::Unlink { parent, name } | Mutation::Rmdir { parent, name } => {
            vec![(*parent, name.clone(), Removed)]
        }
        Mutation::Rename {
            parent,
            name,
            new_parent,
            new_name,
            mode,
        } => {
            let (from, to) = match mode {
                RenameMode::Exchange => (Kept, Kept),
                RenameMode::Replace | RenameMode::NoReplace => (Removed, Added),
            };
            vec![
                (*parent, name.clone(), from),
                (*new_parent, new_name.clone(), to),
            ]
        }
        _ => Vec::new(),
    }
}

/// What a POSIX ACL in its xattr form (`system.posix_acl_access`) says about the mode.
struct AclMode {
    /// rwx bits for owner, group (the mask entry when there is one) and other.
    mode_bits: u16,
    /// Named users or groups, or a mask: more than the mode can say.
    extended: bool,
}

/// Parse the Linux xattr ACL format: version 2, then (tag u16, perm u16, id u32) entries.
fn parse_acl(v: &[u8]) -> Option<AclMode> {
    const USER_OBJ: u16 = 0x01;
    const USER: u16 = 0x02;
    const GROUP_OBJ: u16 = 0x04;
    const GROUP: u16 = 0x08;
    const MASK: u16 = 0x10;
    const OTHER: u16 = 0x20;
    if v.len() < 4
        || !(v.len() - 4).is_multiple_of(8)
        || u32::from_le_bytes(v[..4].try_into().ok()?) != 2
    {
        return None;
    }
    let (mut user, mut group, mut mask, mut other) = (None, None, None, None);
    let mut extended = false;
    for e in v[4..].chunks_exact(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let perm = u16::from_le_bytes([e[2], e[3]]) & 7;
        match tag {
            USER_OBJ => user = Some(perm),
            GROUP_OBJ => group = Some(perm),
            MASK => mask = Some(perm),
            OTHER => other = Some(perm),
            USER | GROUP => extended = true,
            _ => return None,
        }
    }
    let (user, group, other) = (user?, group?, other?);
    let g = mask.unwrap_or(group);
    Some(AclMode {
        mode_bits: (user << 6) | (g << 3) | other,
        extended: extended || mask.is_some(),
    })
}

/// Answer a request whose reply is empty.
fn done(reply: ReplyEmpty, r: Result<Answer, Errno>) {
    match r {
        Ok(_) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn xattr_reply(reply: ReplyXattr, size: u32, v: &[u8]) {
    if size == 0 {
        reply.size(v.len() as u32)
    } else if v.len() > size as usize {
        reply.error(Errno::ERANGE)
    } else {
        reply.data(v)
    }
}

/// The reply of a metadata call as an errno or the answer (for the CLI).
pub fn answer(r: MetaReply) -> anyhow::Result<Answer> {
    r.map_err(|e| anyhow::anyhow!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_placed_in_any_order_leave_holes_zero() {
        // In order with a hole, then one out of order over a hole, then an overlap.
        let mut out = Vec::new();
        place(&mut out, 0, b"ab");
        place(&mut out, 4, b"ef");
        assert_eq!(out, b"ab\0\0ef");
        place(&mut out, 2, b"c");
        assert_eq!(out, b"abc\0ef");
        place(&mut out, 5, b"FGH");
        assert_eq!(out, b"abc\0eFGH");
        out.resize(10, 0);
        assert_eq!(out, b"abc\0eFGH\0\0");
    }

    #[test]
    fn acl_mode_bits() {
        let entry = |tag: u16, perm: u16, id: u32| {
            let mut e = tag.to_le_bytes().to_vec();
            e.extend_from_slice(&perm.to_le_bytes());
            e.extend_from_slice(&id.to_le_bytes());
            e
        };
        let mut minimal = 2u32.to_le_bytes().to_vec();
        for e in [entry(1, 7, !0), entry(4, 5, !0), entry(0x20, 5, !0)] {
            minimal.extend(e);
        }
        let a = parse_acl(&minimal).unwrap();
        assert_eq!((a.mode_bits, a.extended), (0o755, false));
        let mut ext = minimal.clone();
        ext.extend(entry(2, 6, 1000));
        ext.extend(entry(0x10, 4, !0));
        let a = parse_acl(&ext).unwrap();
        assert_eq!((a.mode_bits, a.extended), (0o745, true));
        assert!(parse_acl(&minimal[..7]).is_none());
    }

    #[test]
    fn times_round_trip() {
        for t in [
            Timespec { sec: 0, nsec: 0 },
            Timespec {
                sec: 1_700_000_000,
                nsec: 123_456_789,
            },
            Timespec {
                sec: -5,
                nsec: 250_000_000,
            },
        ] {
            assert_eq!(to_timespec(to_system_time(t)), t);
        }
        // What fuser hands us for the kernel's (-86400 s, 5 ns).
        let from_fuser = UNIX_EPOCH - Duration::new(86400, 5);
        assert_eq!(
            from_kernel_time(from_fuser),
            Timespec {
                sec: -86400,
                nsec: 5
            }
        );
    }
}
