//! Offline operation of a mount with a client disk: what `hi` does while no member of the
//! hive can be reached.
//!
//! # Going offline and back
//! A query or change that reaches no member within [`REACH_WITHIN`] (instead of the 30 s
//! a call otherwise keeps retrying) puts the mount *offline*: from then on queries are
//! answered here and changes go into the journal or fail at once, instead of each waiting
//! out its own retries. A probe thread asks the hive every [`PROBE_EVERY`]; once it
//! answers, the probe thread sends the changes journaled meanwhile, in order (each after
//! the bytes written to its file before it), and the mount is online when none is left;
//! the write-back retry thread then commits the rest of what the journal holds.
//!
//! # What works offline
//! - Reads of what this mount saw: the answers of lookups, attributes, listings, links,
//!   xattrs and opens it got while online are kept ([`Answers`], about [`MAX_ANSWER_BYTES`])
//!   and answered from; a lookup is also answered from a listing kept whole (a name
//!   missing from it: `ENOENT`). File bytes come from the chunk caches (memory and client
//!   disk: `hi warmup PATH` fills them beforehand). Anything not seen: `EHOSTDOWN`.
//! - Writes to files whose write lease this mount holds (files it was writing): into the
//!   journal, as always. In write-back mode `fsync` and `close` return once the journal
//!   holds them; in default mode they fail (`EHOSTDOWN`: the hive has not got the bytes).
//!   When the journal is full, writers wait up to the mount's journal wait, then EIO.
//! - Renames, unlinks, rmdirs and setattrs (chmod, chown, times, truncate) of what this
//!   mount saw: checked against the answers kept, journaled as `Op` records under the
//!   sequence number they are sent with later (exactly once, `localdisk/src/replay.rs`),
//!   answered once the journal holds them, and shown at once in the answers kept
//!   (`overlay.rs`). A setattr of a file with bytes not yet committed is journaled after
//!   them, and they are held until it is sent ([`Barrier`]). A crash leaves them in the
//!   journal: the next mount's replay sends them, in journal order with the bytes.
//! - Creates (create, mkdir, mknod, symlink), links, xattr changes, writes to files
//!   without a lease here, and changes to what was not seen: refused with `EHOSTDOWN`
//!   ("Host is down"), logged. Decision: a new inode needs a number only the hive hands
//!   out; leasing numbers to clients in advance would make the store accept inode numbers
//!   from clients, a format change for one case; refusing is clear and loses nothing.
//!
//! # Conflicts
//! Another host may change the namespace while this one is offline: a change journaled
//! here may then be refused when it is sent (the file it renames is gone). The hive's
//! namespace stands; the refusal is logged as a conflict and counted in `hi status`.
//! (Bytes are fenced by write leases and never conflict: `writeback.rs`.)
//!
//! # Coherence of the answers kept
//! Each is the last answer this mount got to that question, or what a change made
//! offline made of it. They are dropped when this mount changes the inode online
//! ([`Offline::forget`] from every mutation) or the hive pushes an invalidation of it
//! (`invalidate.rs`), all of them when pushed invalidations were lost; so an answer served
//! offline is one nothing here knows to be stale. Online they are never used.

mod overlay;
pub use overlay::apply_setattr;

use crate::journal::JournalService;
use crate::writeback::OpenFile;
use fuser::Errno;
use hivefs_client::meta::MetaClient;
use hivefs_net::meta::{self as m, Answer, Mutation, Query, Timespec};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

/// How long a query keeps trying to reach the hive before the mount goes offline.
pub const REACH_WITHIN: Duration = Duration::from_secs(3);
/// How often the probe asks whether the hive is back, and how long it waits for an
/// answer.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
pub const PROBE_WITHIN: Duration = Duration::from_millis(800);
/// Most bytes of answers kept, roughly (past it, they start over).
pub const MAX_ANSWER_BYTES: usize = 64 << 20;

/// A kept answer: success or the error (a negative lookup is an answer too).
type Kept = Result<Answer, Errno>;

/// The answers kept, by the inode they are about (a lookup's: its directory), and
/// roughly how many bytes they take.
#[derive(Default)]
struct Answers {
    by_inode: HashMap<u64, HashMap<Vec<u8>, Kept>>,
    bytes: usize,
}

impl Answers {
    /// Keep `r` as the answer to `q` (past [`MAX_ANSWER_BYTES`], start over).
    fn put(&mut self, q: &Query, r: Kept) {
        let Some(ino) = subject(q) else { return };
        let key = m::encode(q);
        let key_len = key.len();
        let w = weight(key_len, &r);
        if self.bytes + w > MAX_ANSWER_BYTES {
            *self = Answers::default();
        }
        self.bytes += w;
        if let Some(old) = self.by_inode.entry(ino).or_default().insert(key, r) {
            self.bytes -= weight(key_len, &old);
        }
    }

    fn get(&self, q: &Query) -> Option<&Kept> {
        self.by_inode.get(&subject(q)?)?.get(&m::encode(q))
    }

    /// Drop what is kept about `ino`.
    fn forget(&mut self, ino: u64) {
        if let Some(gone) = self.by_inode.remove(&ino) {
            let w: usize = gone.iter().map(|(k, r)| weight(k.len(), r)).sum();
            self.bytes -= w;
        }
    }
}

/// Roughly the bytes a kept answer takes (its key of `key_len` bytes included).
fn weight(key_len: usize, r: &Kept) -> usize {
    let answer = match r {
        Ok(Answer::Dir { entries, .. }) => entries.iter().map(|e| 48 + e.name.len()).sum(),
        Ok(Answer::Extents { extents, .. }) => extents.len() * std::mem::size_of::<m::Extent>(),
        Ok(Answer::Link(v)) | Ok(Answer::Xattr(v)) => v.len(),
        Ok(Answer::XattrNames(v)) => v.iter().map(|n| 24 + n.len()).sum(),
        _ => 0,
    };
    128 + key_len + answer
}

/// The inode a query is about, if its answer may be kept.
fn subject(q: &Query) -> Option<u64> {
    match q {
        Query::Lookup { parent, .. } => Some(*parent),
        Query::GetAttr { ino }
        | Query::ReadDir { ino, .. }
        | Query::ReadLink { ino }
        | Query::GetXattr { ino, .. }
        | Query::ListXattr { ino }
        | Query::Extents { ino, .. }
        | Query::Open { ino, .. } => Some(*ino),
        Query::StatFs => Some(0),
        _ => None,
    }
}

/// Errors that are answers about the namespace (kept), not failures of the call.
fn is_answer(e: Errno) -> bool {
    e == Errno::ENOENT || e == Errno::ENODATA || e == Errno::ENOTDIR || e == Errno::EINVAL
}

/// A namespace change journaled offline, waiting for the hive.
#[derive(Clone)]
pub struct PendingOp {
    pub seq: u64,
    /// Its journal record.
    pub lsn: u64,
    pub op: Mutation,
    pub barrier: Option<Barrier>,
}

/// The bytes of a file written before a change to it: its batches up to `through` are
/// committed before the change is sent (a setattr after writes: its times, its size).
#[derive(Clone)]
pub struct Barrier {
    pub ino: u64,
    pub file: Arc<OpenFile>,
    pub through: u64,
}

/// Offline figures for `hi status`.
#[derive(Debug, Clone, Default)]
pub struct OfflineStatus {
    /// How long the hive has been unreachable (`None`: it is not).
    pub unreachable_for: Option<Duration>,
    /// Namespace changes journaled and not yet sent.
    pub pending: usize,
    /// Namespace changes journaled offline since the mount.
    pub journaled: u64,
    /// Of those sent, refused by the hive (another host changed the namespace).
    pub conflicts: u64,
}

/// What makes a journaled change reach the hive: called by the probe thread once the hive
/// answers; `true` when nothing is left (the mount is online again).
pub type DrainFn = Box<dyn Fn(&Offline) -> bool + Send>;

/// See the module docs.
pub struct Offline {
    stop: AtomicBool,
    offline: AtomicBool,
    since: Mutex<Option<Instant>>,
    answers: Mutex<Answers>,
    /// The mount's journal (offline changes go into it).
    journal: Option<Arc<JournalService>>,
    /// Changes journaled and not yet applied by the hive, in journal order. Its lock
    /// orders them: a change is checked, journaled and queued under it, and the mount
    /// goes back online under it, with nothing left.
    pending: Mutex<VecDeque<PendingOp>>,
    /// The thread sending the journaled changes (it alone reaches the hive meanwhile).
    drainer: Mutex<Option<ThreadId>>,
    /// Changes journaled offline since the mount, and those the hive answered otherwise
    /// than this mount did (another host changed the namespace meanwhile).
    journaled: AtomicU64,
    conflicts: AtomicU64,
}

impl Offline {
    pub fn new(journal: Option<Arc<JournalService>>) -> Offline {
        Offline {
            stop: AtomicBool::new(false),
            offline: AtomicBool::new(false),
            since: Mutex::new(None),
            answers: Mutex::new(Answers::default()),
            journal,
            pending: Mutex::new(VecDeque::new()),
            drainer: Mutex::new(None),
            journaled: AtomicU64::new(0),
            conflicts: AtomicU64::new(0),
        }
    }

    /// Start the probe thread: while offline, it asks the hive every [`PROBE_EVERY`]
    /// whether it is back; once it is, it sends what was journaled meanwhile (`drain`,
    /// on this thread), and the mount is online when nothing is left. It ends at
    /// [`Offline::stop`].
    pub fn start_probe(
        self: &Arc<Self>,
        meta: Arc<MetaClient>,
        volume: u32,
        drain: DrainFn,
    ) -> std::io::Result<()> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("hi-probe".into())
            .spawn(move || {
                *me.drainer.lock().expect("drainer lock") = Some(std::thread::current().id());
                while !me.stop.load(Ordering::SeqCst) {
                    std::thread::sleep(PROBE_EVERY);
                    if me.is_offline()
                        && meta
                            .query_within(volume, Query::StatFs, PROBE_WITHIN)
                            .is_ok()
                    {
                        drain(&me);
                    }
                }
            })?;
        Ok(())
    }

    /// Whether this thread must not reach the hive: offline, and not the thread sending
    /// the journaled changes.
    pub fn holds_back(&self) -> bool {
        self.is_offline()
            && *self.drainer.lock().expect("drainer lock") != Some(std::thread::current().id())
    }

    /// Make `op` offline: checked against what this mount knows, journaled, and answered
    /// once the journal holds it (`overlay.rs` says which changes, and how they answer).
    /// `seq`: the number it was sent under when the hive went away (it may have applied:
    /// sent again under the same number, it applies once), or `None` for a new one.
    /// `None`: the mount is online (again); send it to the hive. `Some(Err(EIO))`: queued,
    /// but the journal failed before it was durable (it may still be sent).
    pub fn journal_change(
        &self,
        meta: &MetaClient,
        op: &Mutation,
        in_dir: bool,
        barrier: Option<Barrier>,
        seq: Option<u64>,
    ) -> Option<Result<Answer, Errno>> {
        let Some(j) = &self.journal else {
            return Some(Err(Errno::EHOSTDOWN));
        };
        if !overlay::journalable(op) {
            return Some(Err(Errno::EHOSTDOWN));
        }
        let bytes = m::encode(op);
        // Room now or never: offline nothing frees room, and a caller may hold the lock
        // of the very file whose commit would (a setattr's barrier).
        let Some(room) = j.try_reserve_op(bytes.len()) else {
            tracing::warn!(?op, "offline change refused: the journal is full");
            return Some(Err(Errno::ENOSPC));
        };
        let mut pending = self.pending.lock().expect("pending lock");
        if !self.is_offline() {
            j.cancel(room);
            return None;
        }
        let answer = self
            .answers
            .lock()
            .expect("answers lock")
            .change(op, in_dir, Timespec::now());
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                j.cancel(room);
                if e == Errno::EHOSTDOWN {
                    tracing::info!(?op, "offline: not enough known here to make this change");
                }
                return Some(Err(e));
            }
        };
        let seq = seq.unwrap_or_else(|| meta.reserve_seq());
        let lsn = j.append_op(room, seq, &bytes);
        pending.push_back(PendingOp {
            seq,
            lsn,
            op: op.clone(),
            barrier,
        });
        drop(pending);
        self.journaled.fetch_add(1, Ordering::Relaxed);
        Some(j.wait_durable(lsn).map(|()| answer))
    }

    /// The oldest change still to be sent (`None`: nothing left, and the mount is online
    /// again).
    pub fn next_pending(&self) -> Option<PendingOp> {
        let pending = self.pending.lock().expect("pending lock");
        match pending.front() {
            Some(p) => Some(p.clone()),
            None => {
                self.back_online();
                None
            }
        }
    }

    /// The hive has the oldest change (answered as predicted, or not: `conflict`).
    pub fn sent(&self, seq: u64, conflict: bool) {
        let mut pending = self.pending.lock().expect("pending lock");
        if pending.front().is_some_and(|p| p.seq == seq) {
            pending.pop_front();
        }
        if conflict {
            self.conflicts.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// What `hi status` shows.
    pub fn status(&self) -> OfflineStatus {
        OfflineStatus {
            unreachable_for: self.unreachable_for(),
            pending: self.pending.lock().expect("pending lock").len(),
            journaled: self.journaled.load(Ordering::Relaxed),
            conflicts: self.conflicts.load(Ordering::Relaxed),
        }
    }

    /// End the probe thread (at unmount).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    pub fn is_offline(&self) -> bool {
        self.offline.load(Ordering::SeqCst)
    }

    /// How long the hive has been unreachable (`None`: it is not).
    pub fn unreachable_for(&self) -> Option<Duration> {
        self.since.lock().expect("since lock").map(|t| t.elapsed())
    }

    /// No member answered: go offline (logged once).
    pub fn went_offline(&self, why: &str) {
        if !self.offline.swap(true, Ordering::SeqCst) {
            *self.since.lock().expect("since lock") = Some(Instant::now());
            tracing::warn!(
                "hive unreachable ({why}): offline; reads of what this mount saw, writes \
                 to files it holds leases on, renames, removals and attribute changes go \
                 on (journaled), creates fail (EHOSTDOWN) until it is back"
            );
        }
    }

    /// The hive answered again, and nothing journaled offline is left to send.
    fn back_online(&self) {
        if self.offline.swap(false, Ordering::SeqCst) {
            let was = self.since.lock().expect("since lock").take();
            tracing::info!(
                offline_s = was.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0),
                "hive reachable again: committing what the journal holds"
            );
        }
    }

    /// Keep the answer to `q` (online; used only offline). A lookup's attributes answer a
    /// getattr of the inode found too (the kernel asks one offline once they time out).
    ///
    /// A listing with attributes (`ReadDirPlus`) is kept as what it holds: the listing
    /// page (as `ReadDir` with the same arguments), each entry's attributes (`GetAttr`)
    /// and xattr names (`ListXattr`); [`Offline::answer`] puts it back together.
    pub fn remember(&self, q: &Query, r: &Kept) {
        if let (Query::Lookup { .. }, Ok(Answer::Attr(a))) = (q, r) {
            self.keep(&Query::GetAttr { ino: a.ino }, r);
        }
        if let &Query::ReadDirPlus { ino, after, max } = q {
            let page = Query::ReadDir { ino, after, max };
            match r {
                Ok(Answer::DirPlus { entries, end }) => {
                    for e in entries {
                        let ino = e.entry.ino;
                        self.keep(&Query::GetAttr { ino }, &Ok(Answer::Attr(e.attr.clone())));
                        if let Some(names) = &e.xattr_names {
                            self.keep(
                                &Query::ListXattr { ino },
                                &Ok(Answer::XattrNames(names.clone())),
                            );
                        }
                    }
                    let entries = entries.iter().map(|e| e.entry.clone()).collect();
                    self.keep(&page, &Ok(Answer::Dir { entries, end: *end }));
                }
                Ok(_) => {}
                Err(e) => self.keep(&page, &Err(*e)),
            }
            return;
        }
        self.keep(q, r);
    }

    fn keep(&self, q: &Query, r: &Kept) {
        if let Err(e) = r {
            if !is_answer(*e) {
                return;
            }
        }
        self.answers.lock().expect("answers lock").put(q, r.clone());
    }

    /// The kept answer to `q`, or `EHOSTDOWN` (offline, and never seen).
    pub fn answer(&self, q: &Query) -> Kept {
        let a = self.answers.lock().expect("answers lock");
        let kept = match q {
            // From the lookup kept or the listings kept, with the inode's own attributes
            // (fresher than a lookup's copy: an offline change updates them there).
            Query::Lookup { parent, name } => a.lookup(*parent, name).map(|r| r.map(Answer::Attr)),
            Query::ReadDir { ino, after, max } => a
                .get(q)
                .cloned()
                .or_else(|| a.listing(*ino, *after, *max).map(Ok)),
            // The page as a `ReadDir` answers it, with every entry's attributes kept
            // (one missing: not known here).
            &Query::ReadDirPlus { ino, after, max } => {
                let page = Query::ReadDir { ino, after, max };
                match a
                    .get(&page)
                    .cloned()
                    .or_else(|| a.listing(ino, after, max).map(Ok))
                {
                    Some(Ok(Answer::Dir { entries, end })) => entries
                        .into_iter()
                        .map(|entry| {
                            let attr = a.attr(entry.ino)?;
                            let xattr_names = match a.get(&Query::ListXattr { ino: entry.ino }) {
                                Some(Ok(Answer::XattrNames(n))) => Some(n.clone()),
                                _ => None,
                            };
                            Some(m::DirEntryPlus {
                                entry,
                                attr,
                                xattr_names,
                            })
                        })
                        .collect::<Option<Vec<_>>>()
                        .map(|entries| Ok(Answer::DirPlus { entries, end })),
                    other => other,
                }
            }
            q => a.get(q).cloned(),
        };
        kept.unwrap_or_else(|| {
            tracing::debug!(?q, "offline: no answer kept");
            Err(Errno::EHOSTDOWN)
        })
    }

    /// What a change answered is an answer too: the attributes of the inode it made or
    /// changed (as a getattr would answer), and, for a new name, its lookup.
    pub fn remember_change(&self, name: Option<(u64, Vec<u8>)>, r: &Result<Answer, Errno>) {
        let Ok(Answer::Attr(a)) = r else { return };
        let attr = Ok(Answer::Attr(a.clone()));
        self.remember(&Query::GetAttr { ino: a.ino }, &attr);
        if let Some((parent, name)) = name {
            self.remember(&Query::Lookup { parent, name }, &attr);
        }
    }

    /// Drop what is kept about `ino` (it changed).
    pub fn forget(&self, ino: u64) {
        self.answers.lock().expect("answers lock").forget(ino);
    }

    /// Drop everything (invalidations were lost).
    pub fn forget_all(&self) {
        *self.answers.lock().expect("answers lock") = Answers::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_kept_per_inode_and_forgotten_when_it_changes() {
        let o = Offline::new(None);
        let look = Query::Lookup {
            parent: 1,
            name: b"a".to_vec(),
        };
        let attr = Query::GetAttr { ino: 5 };
        // Never seen: host down.
        assert_eq!(o.answer(&attr), Err(Errno::EHOSTDOWN));
        o.remember(&look, &Err(Errno::ENOENT));
        o.remember(&attr, &Ok(Answer::Done));
        // A failure of the call is not an answer.
        o.remember(&Query::GetAttr { ino: 6 }, &Err(Errno::EIO));
        assert_eq!(o.answer(&look), Err(Errno::ENOENT));
        assert_eq!(o.answer(&attr), Ok(Answer::Done));
        assert_eq!(o.answer(&Query::GetAttr { ino: 6 }), Err(Errno::EHOSTDOWN));
        o.forget(1);
        assert_eq!(o.answer(&look), Err(Errno::EHOSTDOWN));
        assert_eq!(o.answer(&attr), Ok(Answer::Done));
        o.forget_all();
        assert_eq!(o.answer(&attr), Err(Errno::EHOSTDOWN));
        // Offline and back.
        assert!(!o.is_offline());
        o.went_offline("test");
        assert!(o.is_offline() && o.unreachable_for().is_some());
        o.back_online();
        assert!(!o.is_offline() && o.unreachable_for().is_none());
    }
}
