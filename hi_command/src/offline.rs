//! Offline operation of a mount with a client disk: what `hi` does while no member of the
//! hive can be reached.
//!
//! # Going offline and back
//! A query that reaches no member within [`REACH_WITHIN`] (instead of the 30 s a call
//! otherwise keeps retrying) puts the mount *offline*: from then on queries are answered
//! here and changes fail at once, instead of each waiting out its own retries. A probe
//! thread asks the hive every [`PROBE_EVERY`]; its first answer puts the mount back
//! online, and the write-back retry thread commits what the journal holds, in order.
//!
//! # What works offline
//! - Reads of what this mount saw: the answers of lookups, attributes, listings, links,
//!   xattrs and opens it got while online are kept ([`Answers`], about [`MAX_ANSWER_BYTES`])
//!   and answered from; file bytes come from the chunk caches (memory and client disk:
//!   `hi warmup PATH` fills them beforehand). Anything not seen: `EHOSTDOWN`.
//! - Writes to files whose write lease this mount holds (files it was writing): into the
//!   journal, as always. In write-back mode `fsync` and `close` return once the journal
//!   holds them; in default mode they fail (`EHOSTDOWN`: the hive has not got the bytes).
//!   When the journal is full, writers wait up to the mount's journal wait, then EIO.
//! - Namespace changes (create, mkdir, rename, unlink, chmod, truncate, ...) and writes to
//!   files without a lease here: refused with `EHOSTDOWN` ("Host is down"), logged.
//!   Decision: creating needs an inode number only the hive hands out, and a change
//!   acknowledged here would have to be shown in every later lookup and listing before
//!   the hive has it; until inode numbers are leased to clients in advance and the
//!   journal's `Op` records carry such changes (their replay order and exactly-once
//!   numbering are in `localdisk/src/replay.rs` and proven by the client simulator), a
//!   clear refusal is better than a change that could surface differently later.
//!
//! # Coherence of the answers kept
//! Each is the last answer this mount got to that question. They are dropped when this
//! mount changes the inode ([`Offline::forget`] from every mutation) or the hive pushes
//! an invalidation of it (`invalidate.rs`), all of them when pushed invalidations were
//! lost; so an answer served offline is one nothing here knows to be stale. Online they
//! are never used.

use fuser::Errno;
use hivefs_client::meta::MetaClient;
use hivefs_net::meta::{self as m, Answer, Query};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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

/// See the module docs.
pub struct Offline {
    stop: AtomicBool,
    offline: AtomicBool,
    since: Mutex<Option<Instant>>,
    answers: Mutex<Answers>,
}

impl Default for Offline {
    fn default() -> Self {
        Self::new()
    }
}

impl Offline {
    pub fn new() -> Offline {
        Offline {
            stop: AtomicBool::new(false),
            offline: AtomicBool::new(false),
            since: Mutex::new(None),
            answers: Mutex::new(Answers::default()),
        }
    }

    /// Start the probe thread: while offline, it asks the hive every [`PROBE_EVERY`]
    /// whether it is back. It ends at [`Offline::stop`].
    pub fn start_probe(
        self: &Arc<Self>,
        meta: Arc<MetaClient>,
        volume: u32,
    ) -> std::io::Result<()> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("hi-probe".into())
            .spawn(move || {
                while !me.stop.load(Ordering::SeqCst) {
                    std::thread::sleep(PROBE_EVERY);
                    if me.is_offline()
                        && meta
                            .query_within(volume, Query::StatFs, PROBE_WITHIN)
                            .is_ok()
                    {
                        me.back_online();
                    }
                }
            })?;
        Ok(())
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
                "hive unreachable ({why}): offline; reads of what this mount saw and writes \
                 to files it holds leases on go on, namespace changes fail (EHOSTDOWN) \
                 until it is back"
            );
        }
    }

    /// The hive answered again.
    pub fn back_online(&self) {
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
    pub fn remember(&self, q: &Query, r: &Kept) {
        if let (Query::Lookup { .. }, Ok(Answer::Attr(a))) = (q, r) {
            self.keep(&Query::GetAttr { ino: a.ino }, r);
        }
        self.keep(q, r);
    }

    fn keep(&self, q: &Query, r: &Kept) {
        let Some(ino) = subject(q) else { return };
        if let Err(e) = r {
            if !is_answer(*e) {
                return;
            }
        }
        let key = m::encode(q);
        let key_len = key.len();
        let w = weight(key_len, r);
        let mut a = self.answers.lock().expect("answers lock");
        if a.bytes + w > MAX_ANSWER_BYTES {
            *a = Answers::default();
        }
        a.bytes += w;
        if let Some(old) = a.by_inode.entry(ino).or_default().insert(key, r.clone()) {
            a.bytes -= weight(key_len, &old);
        }
    }

    /// The kept answer to `q`, or `EHOSTDOWN` (offline, and never seen).
    pub fn answer(&self, q: &Query) -> Kept {
        let a = self.answers.lock().expect("answers lock");
        let kept = subject(q)
            .and_then(|ino| a.by_inode.get(&ino))
            .and_then(|kept| kept.get(&m::encode(q)))
            .cloned();
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
        let mut a = self.answers.lock().expect("answers lock");
        if let Some(gone) = a.by_inode.remove(&ino) {
            let w: usize = gone.iter().map(|(k, r)| weight(k.len(), r)).sum();
            a.bytes -= w;
        }
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
        let o = Offline::new();
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
