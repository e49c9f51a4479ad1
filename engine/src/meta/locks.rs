//! File locks: the lock service of the metadata leader (`flock` and POSIX `fcntl` record
//! locks, exclusive across every mount of a volume).
//!
//! # What is held, and by whom
//! A [`LockTable`] holds, per `(volume, inode)`, two separate lists (the two families never
//! conflict with each other, as on Linux):
//! - POSIX locks: byte ranges `start..=end` (inclusive, as the kernel's `struct
//!   file_lock`), read or write. The owner is `(client, owner)`: the mount's client id and
//!   the kernel's lock owner (one per process). Two locks conflict when they overlap, at
//!   least one is a write lock, and their owners differ. A lock of the same owner replaces
//!   what that owner held on its range: old ranges are split around it, and touching
//!   ranges of one type are merged. Unlocking a range splits too.
//! - flock locks: whole file, shared or exclusive, owner `(client, owner)` (the kernel's
//!   owner is then the open file description). A new lock of the same owner replaces the
//!   old one.
//!
//! Operations never wait: a conflict is answered `EAGAIN`, and a client implements
//! `F_SETLKW` / blocking `flock` by retrying (see `hi_command/src/locks.rs`).
//!
//! # Volatile, leased, leader-only
//! Locks are **not** written through Raft: they are state of the running leader, in memory,
//! like the kernel's own lock lists. What makes that sound:
//! - **Sessions and leases.** A client opens a session ([`LockOp::Open`]) and names it in
//!   every later operation; any operation renews it for [`LOCK_LEASE_MS`]. A session not
//!   renewed in that time expires and all its locks are released (a `hi` killed with
//!   SIGKILL); [`LockOp::Close`] releases them at once (unmount). The client holds the
//!   same lease from its side, counted from when it *sent* its last renewal that was
//!   answered, so it always gives its locks up no later than the leader does.
//! - **A session the leader does not know is answered `ESTALE`** (expired, or the leader
//!   restarted and lost its table: session ids start at a random value each boot). The
//!   client then treats every lock of that session as lost: the owner's next lock
//!   operation on that file fails with EIO (as NFS does), and a new session is opened.
//! - **Grace after a restart.** A client that held locks when the leader died learns it on
//!   its next keepalive (a second) or, if it cannot reach the leader, when its own lease
//!   runs out. Until then nobody else may take a lock. The leader therefore keeps a
//!   *horizon* on disk ([`Horizon`]: a wall-clock time past every lease it granted to a
//!   session; rewritten, with fsync, at most once per lease, before the answer that needs
//!   it) and, after a restart, grants no lock and answers no `F_GETLK` (`EAGAIN`) until
//!   that horizon has passed. A hive that never saw a lock (no horizon file), or whose
//!   horizon is past, starts without grace.
//! - **A new leader** of a hive of several voters starts as after a restart: an empty
//!   table, a new session base, and a full lease ([`LOCK_LEASE_MS`]) of grace counted from
//!   the first lock request it answers in its term ([`LockService::enter_term`]; the old
//!   leader's horizon is not readable here). That covers every lease the old leader gave,
//!   because a leader of several voters confirms its leadership with a quorum (a read
//!   barrier) before each lock answer: a deposed leader cannot renew anything after the
//!   new one was elected. Only the leader answers lock requests.
//! - **Open grace.** Write leases die with the old leader's table too; their holders
//!   reclaim them at their next keepalive. For [`OPEN_GRACE_MS`] after a new term's table
//!   (or a restart with a horizon) starts, an open of a file with no known lease waits
//!   (`AGAIN`), so it recalls a reclaimed lease instead of missing its holder's
//!   uncommitted bytes.
//!
//! # Invariants
//! - The POSIX locks of one owner on one file never overlap, and two of one type never
//!   touch (they are merged).
//! - No two locks of different owners of one family on one file conflict.
//! - A session's `files` is exactly the set of files where that client holds a lock; a
//!   file entry exists only while it holds a lock; `held` counts every lock in the table.
//! - Limits: at most [`MAX_LOCKS`] locks and [`MAX_LOCK_SESSIONS`] sessions (`ENOLCK`).
//!
//! Deliberately absent: deadlock detection (`EDEADLK`) and fairness between waiters
//! (a waiter retries; whoever asks first after a release wins).
//!
//! Time is injected (`now_ms`, a monotonic millisecond count), so the table is a plain
//! state machine and its tests drive the clock.

use super::leases::{FileKey, Gate, LeaseTable};
use hivefs_net::meta::{
    Answer, Errno, LockInfo, LockKind, LockOp, LockRequest, LockType, MetaReply, LOCK_LEASE_MS,
};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Most locks (ranges and flock locks) held in the whole table.
pub const MAX_LOCKS: usize = 1 << 20;
/// Most lock sessions at once (one per mount that uses locks).
pub const MAX_LOCK_SESSIONS: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Owner {
    client: u64,
    owner: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held {
    owner: Owner,
    typ: LockType,
    start: u64,
    end: u64,
    pid: u32,
}

impl Held {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start <= end && start <= self.end
    }

    fn info(&self) -> LockInfo {
        LockInfo {
            typ: self.typ,
            start: self.start,
            end: self.end,
            pid: self.pid,
        }
    }
}

fn conflicts(a: LockType, b: LockType) -> bool {
    a == LockType::Write || b == LockType::Write
}

#[derive(Default, Debug)]
struct FileLocks {
    posix: Vec<Held>,
    /// flock locks: `start..=end` is always the whole file.
    flock: Vec<Held>,
}

impl FileLocks {
    fn len(&self) -> usize {
        self.posix.len() + self.flock.len()
    }

    fn client_holds(&self, client: u64) -> bool {
        self.posix
            .iter()
            .chain(&self.flock)
            .any(|h| h.owner.client == client)
    }

    fn owner_holds(&self, o: Owner) -> bool {
        self.posix.iter().chain(&self.flock).any(|h| h.owner == o)
    }
}

#[derive(Debug)]
struct Session {
    id: u64,
    expires_ms: u64,
    files: HashSet<FileKey>,
}

/// How long an open of a file with no known write lease waits after a new leader's term
/// (or a restart that may have had leases) begins: three keepalives, in which every live
/// holder of a lease of the old term finds its session lost and reclaims (`hi` does at
/// once). Without it an open right after a leader change could miss bytes a lease holder
/// has not committed, which an open otherwise recalls.
pub const OPEN_GRACE_MS: u64 = 3 * hivefs_net::meta::LOCK_KEEPALIVE_MS;

/// The lock table. See the module docs.
#[derive(Debug)]
pub struct LockTable {
    next_session: u64,
    grace_until_ms: u64,
    /// Until then an open of a file with no known write lease waits (`AGAIN`): the
    /// holders of the previous leader's (or boot's) leases reclaim them first, so the open
    /// still recalls their uncommitted bytes. See [`OPEN_GRACE_MS`].
    open_grace_until_ms: u64,
    /// By client id.
    sessions: HashMap<u64, Session>,
    files: HashMap<FileKey, FileLocks>,
    held: usize,
    /// Write leases (`leases.rs`): held by sessions of this table; started (with a
    /// lease epoch from the state machine) by the first lease request of a term.
    pub leases: LeaseTable,
    /// The term `leases` was started for.
    leases_term: Option<u64>,
}

impl LockTable {
    /// An empty table whose session ids start at `session_base` (random per boot, so a
    /// session of an earlier boot is unknown here), granting nothing before
    /// `grace_until_ms`.
    /// An open of `key` by `client` at `now_ms`: [`LeaseTable::open`], and during the
    /// open grace a file with no known lease waits too (its holder may not have reclaimed
    /// it yet).
    pub fn open(&mut self, now_ms: u64, client: u64, key: FileKey) -> Gate {
        match self.leases.open(now_ms, client, key) {
            Gate::Clear if now_ms < self.open_grace_until_ms && !self.leases.known(key) => {
                Gate::Wait
            }
            gate => gate,
        }
    }

    pub fn new(session_base: u64, grace_until_ms: u64) -> LockTable {
        LockTable {
            next_session: session_base,
            grace_until_ms,
            open_grace_until_ms: 0,
            sessions: HashMap::new(),
            files: HashMap::new(),
            held: 0,
            leases: LeaseTable::new(0, 0),
            leases_term: None,
        }
    }

    /// Renew `client`'s session `session` at `now_ms` (after expiring the stale ones);
    /// `false` if the leader does not know it.
    fn renew(&mut self, now_ms: u64, client: u64, session: u64) -> bool {
        self.expire(now_ms);
        match self.sessions.get_mut(&client) {
            Some(s) if s.id == session => {
                s.expires_ms = now_ms + LOCK_LEASE_MS;
                true
            }
            _ => false,
        }
    }

    /// [`LockOp::Lease`] (other operations go to [`LockTable::handle`]). `Err(gate)`:
    /// see [`Gate`].
    pub fn handle_lease(&mut self, now_ms: u64, r: &LockRequest) -> Result<MetaReply, Gate> {
        let LockOp::Lease { ino, reclaim } = r.op else {
            return Ok(Err(Errno::INVAL));
        };
        if !self.renew(now_ms, r.client, r.session) {
            return Ok(Err(Errno::STALE));
        }
        self.leases
            .lease(now_ms, r.client, (r.volume, ino), reclaim)
    }

    /// Locks held in the table.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Live sessions.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Answer one lock request at time `now_ms`.
    pub fn handle(&mut self, now_ms: u64, r: &LockRequest) -> MetaReply {
        self.expire(now_ms);
        let client = r.client;
        if let LockOp::Open = r.op {
            if let Some(old) = self.sessions.remove(&client) {
                self.drop_session(client, old);
            }
            if self.sessions.len() >= MAX_LOCK_SESSIONS {
                return Err(Errno::NOLCK);
            }
            self.next_session = self.next_session.wrapping_add(1).max(1);
            let id = self.next_session;
            self.sessions.insert(
                client,
                Session {
                    id,
                    expires_ms: now_ms + LOCK_LEASE_MS,
                    files: HashSet::new(),
                },
            );
            return Ok(Answer::LockSession(id));
        }
        if !self.renew(now_ms, client, r.session) {
            return Err(Errno::STALE);
        }
        let in_grace = now_ms < self.grace_until_ms;
        let key = (r.volume, 0);
        match r.op {
            LockOp::Open => unreachable!("answered above"),
            LockOp::KeepAlive => Ok(Answer::Recalls(self.leases.recalls_of(client, r.volume))),
            LockOp::Lease { .. } => Err(Errno::INVAL), // served by `handle_lease`
            LockOp::ReleaseLease { ino, token } => {
                self.leases.release(now_ms, client, (r.volume, ino), token);
                Ok(Answer::Done)
            }
            LockOp::Close => {
                self.leases.release_all(client);
                let s = self.sessions.remove(&client).expect("checked above");
                self.drop_session(client, s);
                Ok(Answer::Done)
            }
            LockOp::Set {
                ino,
                kind,
                owner,
                typ,
                start,
                end,
                pid,
            } => {
                if typ.is_some() && in_grace {
                    return Err(Errno::AGAIN);
                }
                let key = (key.0, ino);
                let own = Owner { client, owner };
                let budget = MAX_LOCKS - self.held;
                let fl = self.files.entry(key).or_default();
                let before = fl.len();
                let r = match kind {
                    LockKind::Posix => set_posix(&mut fl.posix, own, typ, start, end, pid, budget),
                    LockKind::Flock => set_flock(&mut fl.flock, own, typ, pid, budget),
                };
                let after = fl.len();
                let holds = fl.owner_holds(own);
                self.held = self.held - before + after;
                self.note_file(client, key);
                r.map(|()| Answer::LockHeld(holds))
            }
            LockOp::Get {
                ino,
                kind,
                owner,
                typ,
                start,
                end,
            } => {
                if in_grace {
                    return Err(Errno::AGAIN);
                }
                let own = Owner { client, owner };
                let first = self.files.get(&(key.0, ino)).and_then(|fl| {
                    let list = match kind {
                        LockKind::Posix => &fl.posix,
                        LockKind::Flock => &fl.flock,
                    };
                    list.iter()
                        .filter(|h| {
                            h.owner != own && h.overlaps(start, end) && conflicts(h.typ, typ)
                        })
                        .min_by_key(|h| h.start)
                        .map(Held::info)
                });
                Ok(Answer::LockConflict(first))
            }
            LockOp::ReleaseOwner { ino, owner } => {
                let key = (key.0, ino);
                let own = Owner { client, owner };
                if let Some(fl) = self.files.get_mut(&key) {
                    let before = fl.len();
                    fl.posix.retain(|h| h.owner != own);
                    fl.flock.retain(|h| h.owner != own);
                    self.held -= before - fl.len();
                    self.note_file(client, key);
                }
                Ok(Answer::LockHeld(false))
            }
        }
    }

    /// After a change of `client`'s locks on `key`: keep its session's `files` and the
    /// file map exact.
    fn note_file(&mut self, client: u64, key: FileKey) {
        let (holds, empty) = match self.files.get(&key) {
            Some(fl) => (fl.client_holds(client), fl.len() == 0),
            None => (false, true),
        };
        if empty {
            self.files.remove(&key);
        }
        if let Some(s) = self.sessions.get_mut(&client) {
            if holds {
                s.files.insert(key);
            } else {
                s.files.remove(&key);
            }
        }
    }

    /// Release every lock of an ended session; its write leases lapse.
    fn drop_session(&mut self, client: u64, s: Session) {
        self.leases.session_ended(client);
        for key in s.files {
            if let Some(fl) = self.files.get_mut(&key) {
                let before = fl.len();
                fl.posix.retain(|h| h.owner.client != client);
                fl.flock.retain(|h| h.owner.client != client);
                self.held -= before - fl.len();
                if fl.len() == 0 {
                    self.files.remove(&key);
                }
            }
        }
    }

    /// End every session whose lease ran out by `now_ms`.
    fn expire(&mut self, now_ms: u64) {
        let dead: Vec<u64> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.expires_ms <= now_ms)
            .map(|(&c, _)| c)
            .collect();
        for c in dead {
            let s = self.sessions.remove(&c).expect("listed");
            tracing::info!(
                client = c,
                files = s.files.len(),
                "lock lease expired: releasing"
            );
            self.drop_session(c, s);
        }
    }

    /// Check the invariants (tests).
    #[cfg(test)]
    fn check(&self) {
        let mut n = 0;
        for (key, fl) in &self.files {
            assert!(fl.len() > 0, "empty file entry {key:?}");
            n += fl.len();
            for (i, a) in fl.posix.iter().enumerate() {
                assert!(a.start <= a.end);
                for b in &fl.posix[i + 1..] {
                    if a.owner == b.owner {
                        assert!(!a.overlaps(b.start, b.end), "own overlap {a:?} {b:?}");
                        if a.typ == b.typ {
                            assert!(
                                a.end.checked_add(1) != Some(b.start)
                                    && b.end.checked_add(1) != Some(a.start),
                                "unmerged {a:?} {b:?}"
                            );
                        }
                    } else {
                        assert!(
                            !(a.overlaps(b.start, b.end) && conflicts(a.typ, b.typ)),
                            "conflict held {a:?} {b:?}"
                        );
                    }
                }
            }
            for (i, a) in fl.flock.iter().enumerate() {
                for b in &fl.flock[i + 1..] {
                    assert!(a.owner != b.owner);
                    assert!(!conflicts(a.typ, b.typ), "flock conflict {a:?} {b:?}");
                }
            }
            for h in fl.posix.iter().chain(&fl.flock) {
                let s = self
                    .sessions
                    .get(&h.owner.client)
                    .expect("lock of no session");
                assert!(s.files.contains(key));
            }
        }
        for (c, s) in &self.sessions {
            for key in &s.files {
                assert!(self.files.get(key).is_some_and(|f| f.client_holds(*c)));
            }
        }
        assert_eq!(n, self.held);
    }
}

/// Set or remove `own`'s POSIX lock on `start..=end` (see the module docs). `budget`:
/// how many more locks the table may hold.
fn set_posix(
    list: &mut Vec<Held>,
    own: Owner,
    typ: Option<LockType>,
    start: u64,
    end: u64,
    pid: u32,
    budget: usize,
) -> Result<(), Errno> {
    debug_assert!(start <= end);
    if let Some(t) = typ {
        if list
            .iter()
            .any(|h| h.owner != own && h.overlaps(start, end) && conflicts(h.typ, t))
        {
            return Err(Errno::AGAIN);
        }
    }
    let mut mine: Vec<Held> = Vec::new();
    let mut before = 0usize;
    for h in list.iter().filter(|h| h.owner == own) {
        before += 1;
        if !h.overlaps(start, end) {
            mine.push(*h);
            continue;
        }
        if h.start < start {
            mine.push(Held {
                end: start - 1,
                ..*h
            });
        }
        if h.end > end {
            mine.push(Held {
                start: end + 1,
                ..*h
            });
        }
    }
    if let Some(t) = typ {
        mine.push(Held {
            owner: own,
            typ: t,
            start,
            end,
            pid,
        });
    }
    mine.sort_by_key(|h| h.start);
    let mut merged: Vec<Held> = Vec::with_capacity(mine.len());
    for h in mine {
        if let Some(last) = merged.last_mut() {
            debug_assert!(last.end < h.start, "own locks overlap");
            if last.typ == h.typ && last.end.checked_add(1) == Some(h.start) {
                last.end = h.end;
                last.pid = h.pid;
                continue;
            }
        }
        merged.push(h);
    }
    if merged.len() > before && merged.len() - before > budget {
        return Err(Errno::NOLCK);
    }
    list.retain(|h| h.owner != own);
    list.extend(merged);
    Ok(())
}

/// Set or remove `own`'s flock lock.
fn set_flock(
    list: &mut Vec<Held>,
    own: Owner,
    typ: Option<LockType>,
    pid: u32,
    budget: usize,
) -> Result<(), Errno> {
    let mine = list.iter().position(|h| h.owner == own);
    match typ {
        None => {
            if let Some(i) = mine {
                list.swap_remove(i);
            }
            Ok(())
        }
        Some(t) => {
            if list.iter().any(|h| h.owner != own && conflicts(h.typ, t)) {
                return Err(Errno::AGAIN);
            }
            let h = Held {
                owner: own,
                typ: t,
                start: 0,
                end: u64::MAX,
                pid,
            };
            match mine {
                Some(i) => list[i] = h,
                None if budget == 0 => return Err(Errno::NOLCK),
                None => list.push(h),
            }
            Ok(())
        }
    }
}

/// The lock service of a running leader: the table, its clock, and the horizon file.
/// One mutex: lock operations are short and few next to namespace operations.
#[derive(Debug)]
pub struct LockService {
    inner: std::sync::Mutex<(LockTable, Horizon)>,
    start: std::time::Instant,
    /// The leadership term the table belongs to (`None` until the first multi-voter
    /// request: the table of a fresh start needs no reset).
    term: std::sync::Mutex<Option<u64>>,
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

impl LockService {
    /// Start with an empty table, after reading the horizon at `horizon_path` (the grace
    /// this boot keeps). Session ids start at a random value.
    pub fn start(horizon_path: &Path) -> anyhow::Result<LockService> {
        let (horizon, grace_ms) = Horizon::open(horizon_path, wall_ms());
        let base = u64::from_le_bytes(crate::config::random_bytes::<8>()?);
        Ok(LockService {
            inner: std::sync::Mutex::new((
                LockTable {
                    open_grace_until_ms: grace_ms.min(OPEN_GRACE_MS),
                    ..LockTable::new(base, grace_ms)
                },
                horizon,
            )),
            start: std::time::Instant::now(),
            term: std::sync::Mutex::new(None),
        })
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Before answering a lock request (or an open, or checking a commit's lease) as the
    /// leader of `term` (leadership confirmed where there are other voters): a term
    /// other than the table's means another node led meanwhile, whose sessions and
    /// leases are unknown here: start afresh, granting no lock for a full lease. See the
    /// module docs.
    pub fn enter_term(&self, term: u64) -> anyhow::Result<()> {
        let mut t = self.term.lock().expect("lock term");
        match *t {
            Some(old) if old == term => return Ok(()),
            None => {}
            Some(old) => {
                let base = u64::from_le_bytes(crate::config::random_bytes::<8>()?);
                let now = self.now_ms();
                let mut g = self.inner.lock().expect("lock table");
                g.0 = LockTable {
                    open_grace_until_ms: now + OPEN_GRACE_MS,
                    ..LockTable::new(base, now + LOCK_LEASE_MS)
                };
                tracing::info!(
                    old_term = old,
                    term,
                    "leading a new term: lock table reset, {LOCK_LEASE_MS} ms of grace"
                );
            }
        }
        *t = Some(term);
        Ok(())
    }

    /// Answer one lock request. Anything that grants or renews a lease first makes the
    /// horizon cover it (an answer needing a horizon that cannot be written is `ENOLCK`).
    pub fn handle(&self, r: &LockRequest) -> MetaReply {
        let mut g = self.inner.lock().expect("lock table");
        let (table, horizon) = &mut *g;
        let releases_only = matches!(
            r.op,
            LockOp::Close
                | LockOp::ReleaseOwner { .. }
                | LockOp::Set { typ: None, .. }
                | LockOp::ReleaseLease { .. }
        );
        if !releases_only {
            if let Err(e) = horizon.cover(wall_ms()) {
                tracing::warn!("writing the lock horizon: {e}");
                return Err(Errno::NOLCK);
            }
        }
        table.handle(self.start.elapsed().as_millis() as u64, r)
    }

    /// Have write leases been started in `term` (see [`LockService::start_leases`])?
    pub fn leases_started(&self, term: u64) -> bool {
        self.inner.lock().expect("lock table").0.leases_term == Some(term)
    }

    /// Start the write leases of leader term `term` with lease epoch `epoch` (raised
    /// through Raft for it, so above every earlier table's: a restarted leader of the same
    /// term included). A second start in the same term changes nothing.
    pub fn start_leases(&self, term: u64, epoch: u64) {
        let now = self.now_ms();
        let mut g = self.inner.lock().expect("lock table");
        if g.0.leases_term != Some(term) {
            g.0.leases = LeaseTable::new(epoch, now);
            g.0.leases_term = Some(term);
            tracing::info!(term, epoch, "write leases started");
        }
    }

    /// [`LockOp::Lease`]. See [`LockTable::handle_lease`].
    pub fn lease(&self, r: &LockRequest) -> Result<MetaReply, Gate> {
        let now = self.now_ms();
        let mut g = self.inner.lock().expect("lock table");
        if let Err(e) = g.1.cover(wall_ms()) {
            tracing::warn!("writing the lock horizon: {e}");
            return Ok(Err(Errno::NOLCK));
        }
        g.0.handle_lease(now, r)
    }

    /// An open of `ino` on `volume` by `client`: see [`LeaseTable::open`]; and during the
    /// open grace of a new term or boot, a file with no known lease waits too.
    pub fn open(&self, volume: u32, client: u64, ino: u64) -> Gate {
        let now = self.now_ms();
        let mut g = self.inner.lock().expect("lock table");
        g.0.open(now, client, (volume, ino))
    }

    /// A fence of `token` on `ino` is durable (see [`LeaseTable::fenced`]).
    pub fn fenced(&self, volume: u32, ino: u64, token: u64) {
        let mut g = self.inner.lock().expect("lock table");
        g.0.leases.fenced((volume, ino), token)
    }

    /// May `client` commit to `ino` under lease `token`?
    pub fn may_commit(&self, volume: u32, client: u64, ino: u64, token: u64) -> bool {
        let now = self.now_ms();
        let mut g = self.inner.lock().expect("lock table");
        g.0.leases.may_commit(now, client, (volume, ino), token)
    }

    /// Recalls to push on watch streams: (volume, holder client, inode).
    pub fn take_pushes(&self) -> Vec<(u32, u64, u64)> {
        self.inner
            .lock()
            .expect("lock table")
            .0
            .leases
            .take_pushes()
    }
}

/// The lease horizon on disk: a wall-clock time (ms since the epoch) after which no
/// session of this or an earlier boot holds a lease. See the module docs ("Grace after a
/// restart"). The file holds one line, `hivefs-lock-horizon 1 <ms>`, replaced atomically
/// (written to a temporary file, fsynced, renamed, directory fsynced).
#[derive(Debug)]
pub struct Horizon {
    path: PathBuf,
    until_ms: u64,
}

impl Horizon {
    /// Read the horizon a previous boot left at `path`; returns it and how long (ms) this
    /// boot must grant nothing: until the old horizon, at most two leases (a clock that
    /// went back), none without a file, two leases for a file that does not parse.
    pub fn open(path: &Path, now_wall_ms: u64) -> (Horizon, u64) {
        let cap = 2 * LOCK_LEASE_MS;
        let (until_ms, grace) = match std::fs::read_to_string(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0, 0),
            Err(e) => {
                tracing::warn!("reading {}: {e}; full lock grace", path.display());
                (0, cap)
            }
            Ok(text) => match parse_horizon(&text) {
                Some(until) => (until, until.saturating_sub(now_wall_ms).min(cap)),
                None => {
                    tracing::warn!("{} does not parse; full lock grace", path.display());
                    (0, cap)
                }
            },
        };
        if grace > 0 {
            tracing::info!(
                grace_ms = grace,
                "locks of the previous boot may be leased: lock grace"
            );
        }
        (
            Horizon {
                path: path.to_path_buf(),
                until_ms,
            },
            grace,
        )
    }

    /// Make the horizon cover a lease granted now (`now + LOCK_LEASE_MS`), writing it
    /// durably first if it does not (then two leases ahead, so this writes at most once per
    /// lease).
    pub fn cover(&mut self, now_wall_ms: u64) -> std::io::Result<()> {
        if self.until_ms >= now_wall_ms + LOCK_LEASE_MS {
            return Ok(());
        }
        let until = now_wall_ms + 2 * LOCK_LEASE_MS;
        let tmp = self.path.with_extension("tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            writeln!(f, "hivefs-lock-horizon 1 {until}")?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        self.until_ms = until;
        Ok(())
    }
}

fn parse_horizon(text: &str) -> Option<u64> {
    let mut w = text.split_whitespace();
    if w.next()? != "hivefs-lock-horizon" || w.next()? != "1" {
        return None;
    }
    let v = w.next()?.parse().ok()?;
    w.next().is_none().then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VOL: u32 = 1;
    const INO: u64 = 7;

    struct T {
        t: LockTable,
        now: u64,
        sessions: HashMap<u64, u64>,
    }

    impl T {
        fn new() -> T {
            T {
                t: LockTable::new(1000, 0),
                now: 0,
                sessions: HashMap::new(),
            }
        }

        fn req(&mut self, client: u64, op: LockOp) -> MetaReply {
            let session = match self.sessions.get(&client) {
                Some(&s) => s,
                None => {
                    let r = self.t.handle(
                        self.now,
                        &LockRequest {
                            volume: VOL,
                            client,
                            session: 0,
                            op: LockOp::Open,
                        },
                    );
                    let Ok(Answer::LockSession(s)) = r else {
                        panic!("open: {r:?}")
                    };
                    self.sessions.insert(client, s);
                    s
                }
            };
            let r = self.t.handle(
                self.now,
                &LockRequest {
                    volume: VOL,
                    client,
                    session,
                    op,
                },
            );
            self.t.check();
            r
        }

        fn posix(
            &mut self,
            client: u64,
            owner: u64,
            typ: Option<LockType>,
            start: u64,
            end: u64,
        ) -> MetaReply {
            self.req(
                client,
                LockOp::Set {
                    ino: INO,
                    kind: LockKind::Posix,
                    owner,
                    typ,
                    start,
                    end,
                    pid: owner as u32,
                },
            )
        }

        fn flock(&mut self, client: u64, owner: u64, typ: Option<LockType>) -> MetaReply {
            self.req(
                client,
                LockOp::Set {
                    ino: INO,
                    kind: LockKind::Flock,
                    owner,
                    typ,
                    start: 0,
                    end: u64::MAX,
                    pid: owner as u32,
                },
            )
        }

        fn get(
            &mut self,
            client: u64,
            owner: u64,
            typ: LockType,
            start: u64,
            end: u64,
        ) -> Option<LockInfo> {
            match self.req(
                client,
                LockOp::Get {
                    ino: INO,
                    kind: LockKind::Posix,
                    owner,
                    typ,
                    start,
                    end,
                },
            ) {
                Ok(Answer::LockConflict(c)) => c,
                other => panic!("get: {other:?}"),
            }
        }

        /// The POSIX ranges of one owner, in order.
        fn ranges(&self, client: u64, owner: u64) -> Vec<(LockType, u64, u64)> {
            let mut v: Vec<_> = self
                .t
                .files
                .get(&(VOL, INO))
                .map(|f| {
                    f.posix
                        .iter()
                        .filter(|h| h.owner == Owner { client, owner })
                        .map(|h| (h.typ, h.start, h.end))
                        .collect()
                })
                .unwrap_or_default();
            v.sort_by_key(|r| r.1);
            v
        }
    }

    use LockType::{Read as R, Write as W};

    #[test]
    fn ranges_split_and_merge() {
        let mut t = T::new();
        assert_eq!(t.posix(1, 1, Some(W), 0, 99), Ok(Answer::LockHeld(true)));
        // Unlock the middle: split in two.
        t.posix(1, 1, None, 40, 59).unwrap();
        assert_eq!(t.ranges(1, 1), vec![(W, 0, 39), (W, 60, 99)]);
        // A read lock across the gap replaces the write bytes it covers.
        t.posix(1, 1, Some(R), 30, 69).unwrap();
        assert_eq!(t.ranges(1, 1), vec![(W, 0, 29), (R, 30, 69), (W, 70, 99)]);
        // Write again over the read: everything merges into one range.
        t.posix(1, 1, Some(W), 30, 69).unwrap();
        assert_eq!(t.ranges(1, 1), vec![(W, 0, 99)]);
        // Touching ranges of one type merge; of another type they stay apart.
        t.posix(1, 1, Some(W), 100, 199).unwrap();
        t.posix(1, 1, Some(R), 200, u64::MAX).unwrap();
        assert_eq!(t.ranges(1, 1), vec![(W, 0, 199), (R, 200, u64::MAX)]);
        // Unlock to the end of the file; unlock the first byte.
        t.posix(1, 1, None, 150, u64::MAX).unwrap();
        assert_eq!(
            t.posix(1, 1, None, 0, 0),
            Ok(Answer::LockHeld(true)),
            "bytes 1..=149 still held"
        );
        assert_eq!(t.ranges(1, 1), vec![(W, 1, 149)]);
        assert_eq!(
            t.posix(1, 1, None, 0, u64::MAX),
            Ok(Answer::LockHeld(false))
        );
        assert_eq!(t.t.held(), 0);
        assert!(t.t.files.is_empty());
    }

    #[test]
    fn conflicts_between_owners() {
        let mut t = T::new();
        t.posix(1, 1, Some(W), 10, 19).unwrap();
        // Another owner: overlapping write or read conflicts, adjacent does not.
        assert_eq!(t.posix(2, 1, Some(W), 19, 30), Err(Errno::AGAIN));
        assert_eq!(t.posix(1, 2, Some(R), 0, 10), Err(Errno::AGAIN));
        t.posix(2, 1, Some(W), 20, 30).unwrap();
        t.posix(1, 2, Some(W), 0, 9).unwrap();
        assert_eq!(
            t.get(2, 2, R, 0, u64::MAX),
            Some(LockInfo {
                typ: W,
                start: 0,
                end: 9,
                pid: 2
            }),
            "the first conflicting lock"
        );
        assert_eq!(t.get(1, 1, W, 10, 19), None, "own locks never conflict");
        // Read locks share.
        t.posix(3, 1, Some(R), 100, 200).unwrap();
        t.posix(4, 1, Some(R), 150, 250).unwrap();
        assert_eq!(t.get(4, 9, R, 0, u64::MAX).map(|l| l.start), Some(0));
        assert_eq!(
            t.get(4, 9, W, 100, 120).map(|l| (l.typ, l.start)),
            Some((R, 100))
        );
        assert_eq!(
            t.posix(4, 1, Some(W), 150, 250),
            Err(Errno::AGAIN),
            "upgrade blocked"
        );
        t.posix(3, 1, None, 0, u64::MAX).unwrap();
        t.posix(4, 1, Some(W), 150, 250).unwrap();
        // flock and POSIX locks are separate families.
        assert_eq!(t.flock(5, 1, Some(W)), Ok(Answer::LockHeld(true)));
        assert_eq!(t.flock(6, 1, Some(R)), Err(Errno::AGAIN));
        assert_eq!(
            t.flock(5, 2, Some(W)),
            Err(Errno::AGAIN),
            "flock owner = open file"
        );
        t.flock(5, 1, Some(R)).unwrap();
        t.flock(6, 1, Some(R)).unwrap();
        assert_eq!(t.flock(6, 1, Some(W)), Err(Errno::AGAIN));
        t.flock(5, 1, None).unwrap();
        t.flock(6, 1, Some(W)).unwrap();
    }

    #[test]
    fn release_owner_and_client() {
        let mut t = T::new();
        t.posix(1, 1, Some(W), 0, 9).unwrap();
        t.posix(1, 1, Some(W), 20, 29).unwrap();
        t.flock(1, 1, Some(W)).unwrap();
        t.posix(1, 2, Some(R), 40, 49).unwrap();
        t.posix(2, 1, Some(R), 40, 49).unwrap();
        assert_eq!(
            t.req(1, LockOp::ReleaseOwner { ino: INO, owner: 1 }),
            Ok(Answer::LockHeld(false))
        );
        assert!(t.ranges(1, 1).is_empty());
        assert_eq!(t.t.held(), 2);
        t.posix(2, 2, Some(W), 0, 9).unwrap();
        t.flock(2, 2, Some(W)).unwrap();
        assert_eq!(t.posix(2, 3, Some(W), 45, 45), Err(Errno::AGAIN));
        assert_eq!(t.req(1, LockOp::Close), Ok(Answer::Done));
        t.posix(2, 3, Some(W), 45, 45).unwrap_err(); // client 2 itself still reads 40..49
        t.posix(2, 1, None, 0, u64::MAX).unwrap();
        t.posix(2, 3, Some(W), 45, 45).unwrap();
        // A closed session is stale.
        let s = t.sessions[&1];
        let r = t.t.handle(
            t.now,
            &LockRequest {
                volume: VOL,
                client: 1,
                session: s,
                op: LockOp::KeepAlive,
            },
        );
        assert_eq!(r, Err(Errno::STALE));
        // Reopening a session releases what the old one held.
        t.sessions.remove(&2);
        t.posix(2, 9, Some(R), 1000, 1000).unwrap();
        assert_eq!(t.t.held(), 1);
    }

    /// After a new term (or a restart that may have had leases), an open of a file with
    /// no known lease waits for the open grace; a holder that reclaims meanwhile is
    /// recalled by the open, as before the leader changed.
    #[test]
    fn an_open_right_after_a_new_term_waits_for_reclaims() {
        let mut t = T::new();
        t.now = 50_000;
        t.t = LockTable {
            open_grace_until_ms: t.now + OPEN_GRACE_MS,
            ..LockTable::new(1000, t.now + LOCK_LEASE_MS)
        };
        t.t.leases = LeaseTable::new(2, t.now);
        let (a, b) = ((VOL, 7), (VOL, 8));
        assert_eq!(t.t.open(t.now, 2, a), Gate::Wait, "within the grace");
        // Client 1 held file 7's lease under the old term (epoch 1) and reclaims it.
        let s1 = match t.req(1, LockOp::KeepAlive) {
            Ok(_) => t.sessions[&1],
            e => panic!("{e:?}"),
        };
        let old = 1u64 << 32 | 5;
        let r = t.t.handle_lease(
            t.now + 800,
            &LockRequest {
                volume: VOL,
                client: 1,
                session: s1,
                op: LockOp::Lease {
                    ino: 7,
                    reclaim: old,
                },
            },
        );
        assert!(matches!(r, Ok(Ok(Answer::Lease(_)))), "{r:?}");
        // The open of file 7 now recalls client 1's lease; file 8 still waits out the grace.
        assert_eq!(t.t.open(t.now + 900, 2, a), Gate::Wait);
        assert_eq!(t.t.open(t.now + 900, 2, b), Gate::Wait);
        assert_eq!(t.t.open(t.now + OPEN_GRACE_MS, 2, b), Gate::Clear);
        // The holder's own open is never held up.
        assert_eq!(t.t.open(t.now + 900, 1, a), Gate::Clear);
    }

    #[test]
    fn leases_expire_and_restarts_lose_sessions() {
        let mut t = T::new();
        t.posix(1, 1, Some(W), 0, u64::MAX).unwrap();
        t.posix(2, 1, Some(R), 0, 0).unwrap_err();
        // Client 1 renews for a while; client 2 keeps asking.
        for _ in 0..30 {
            t.now += 1000;
            assert_eq!(t.req(1, LockOp::KeepAlive), Ok(Answer::Recalls(Vec::new())));
            assert_eq!(t.posix(2, 1, Some(R), 0, 0), Err(Errno::AGAIN));
        }
        // Client 1 falls silent: exactly one lease later its locks are gone.
        t.now += LOCK_LEASE_MS - 1;
        assert_eq!(t.posix(2, 1, Some(R), 0, 0), Err(Errno::AGAIN));
        t.now += 1;
        assert_eq!(t.posix(2, 1, Some(R), 0, 0), Ok(Answer::LockHeld(true)));
        assert_eq!(t.req(1, LockOp::KeepAlive), Err(Errno::STALE));
        assert_eq!(t.t.sessions(), 1);
        // A new boot knows no session and grants nothing during its grace.
        let s2 = t.sessions[&2];
        let mut fresh = LockTable::new(987_654, t.now + 5000);
        let ka = |f: &mut LockTable, now, session, op| {
            f.handle(
                now,
                &LockRequest {
                    volume: VOL,
                    client: 2,
                    session,
                    op,
                },
            )
        };
        assert_eq!(
            ka(&mut fresh, t.now, s2, LockOp::KeepAlive),
            Err(Errno::STALE)
        );
        let Ok(Answer::LockSession(s)) = ka(&mut fresh, t.now, 0, LockOp::Open) else {
            panic!()
        };
        assert_ne!(s, s2);
        let set = LockOp::Set {
            ino: INO,
            kind: LockKind::Flock,
            owner: 1,
            typ: Some(W),
            start: 0,
            end: u64::MAX,
            pid: 1,
        };
        assert_eq!(
            ka(&mut fresh, t.now + 4999, s, set.clone()),
            Err(Errno::AGAIN)
        );
        assert_eq!(
            ka(&mut fresh, t.now + 5000, s, set),
            Ok(Answer::LockHeld(true))
        );
    }

    /// Random operations of three owners on bytes 0..48, against a per-byte model.
    #[test]
    fn posix_locks_match_a_byte_model() {
        const BYTES: u64 = 48;
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..50 {
            let mut t = T::new();
            // model[byte][owner] = type held
            let mut model = vec![[None::<LockType>; 3]; BYTES as usize];
            for _ in 0..200 {
                let o = rnd(3) as usize;
                let a = rnd(BYTES);
                let b = a + rnd(BYTES - a);
                let typ = match rnd(3) {
                    0 => None,
                    1 => Some(R),
                    _ => Some(W),
                };
                let conflict = typ.is_some_and(|t| {
                    (a..=b).any(|x| {
                        (0..3).any(|p| {
                            p != o && model[x as usize][p].is_some_and(|h| conflicts(h, t))
                        })
                    })
                });
                let r = t.posix(o as u64 + 1, 1, typ, a, b);
                if conflict {
                    assert_eq!(r, Err(Errno::AGAIN));
                } else {
                    let Ok(Answer::LockHeld(holds)) = r else {
                        panic!("{r:?}")
                    };
                    for x in a..=b {
                        model[x as usize][o] = typ;
                    }
                    assert_eq!(holds, model.iter().any(|m| m[o].is_some()));
                }
                for (p, _) in [0u64, 1, 2].iter().enumerate() {
                    let mut bytes = vec![None; BYTES as usize];
                    for (typ, s, e) in t.ranges(p as u64 + 1, 1) {
                        for x in s..=e {
                            bytes[x as usize] = Some(typ);
                        }
                    }
                    let want: Vec<_> = model.iter().map(|m| m[p]).collect();
                    assert_eq!(bytes, want, "owner {p}");
                }
            }
        }
    }

    #[test]
    fn horizon_file() {
        let dir = std::env::temp_dir().join(format!("hivefs-horizon-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("locks.horizon");
        let _ = std::fs::remove_file(&p);
        let (mut h, grace) = Horizon::open(&p, 1_000_000);
        assert_eq!(grace, 0, "no file: no grace");
        h.cover(1_000_000).unwrap();
        let written = std::fs::metadata(&p).unwrap().modified().unwrap();
        h.cover(1_000_000 + LOCK_LEASE_MS).unwrap(); // still covered: no write
        assert_eq!(std::fs::metadata(&p).unwrap().modified().unwrap(), written);
        let (_, grace) = Horizon::open(&p, 1_000_000 + 5000);
        assert_eq!(grace, 2 * LOCK_LEASE_MS - 5000);
        let (_, grace) = Horizon::open(&p, 1_000_000 + 3 * LOCK_LEASE_MS);
        assert_eq!(grace, 0, "horizon past");
        let (_, grace) = Horizon::open(&p, 0);
        assert_eq!(grace, 2 * LOCK_LEASE_MS, "clock went back: capped");
        std::fs::write(&p, "garbage").unwrap();
        assert_eq!(Horizon::open(&p, 5).1, 2 * LOCK_LEASE_MS);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_new_term_forgets_sessions_and_grants_nothing_for_a_lease() {
        let dir = std::env::temp_dir().join(format!("hivefs-locks-term-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("locks.horizon");
        let _ = std::fs::remove_file(&p);
        let svc = LockService::start(&p).unwrap();
        let ask = |session: u64, op: LockOp| {
            svc.handle(&LockRequest {
                volume: VOL,
                client: 9,
                session,
                op,
            })
        };
        let set = LockOp::Set {
            ino: INO,
            owner: 1,
            kind: LockKind::Posix,
            typ: Some(LockType::Write),
            start: 0,
            end: 10,
            pid: 1,
        };
        svc.enter_term(3).unwrap();
        let Ok(Answer::LockSession(s)) = ask(0, LockOp::Open) else {
            panic!("open")
        };
        assert!(ask(s, set.clone()).is_ok());
        svc.enter_term(3).unwrap();
        assert!(
            ask(s, LockOp::KeepAlive).is_ok(),
            "same term: the table stays"
        );
        // Another node led in between: its sessions are unknown here, ours are gone, and
        // no lock is granted for a lease.
        svc.enter_term(5).unwrap();
        assert_eq!(ask(s, LockOp::KeepAlive), Err(Errno::STALE));
        let Ok(Answer::LockSession(s2)) = ask(0, LockOp::Open) else {
            panic!("open after the new term")
        };
        assert_eq!(ask(s2, set), Err(Errno::AGAIN), "grace");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
