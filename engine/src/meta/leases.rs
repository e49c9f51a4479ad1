//! Write leases with fencing tokens: the part of the leader's lock service that keeps
//! close-to-open across hosts while a host holds written bytes it has not committed.
//!
//! # The contract
//! - A client commits writes to a file ([`Mutation::CommitWrite`]) under a **write lease**
//!   ([`LockOp::Lease`]): one client holds it at a time. Its **token** (a fencing token)
//!   grows with every grant, also across leaders and restarts: the high 32 bits are the
//!   table's *lease epoch*, raised through Raft ([`Mutation::NewLeaseEpoch`]) before a
//!   leader's first grant in its term (a restarted single node keeps its Raft term, so
//!   the term alone would not do), a counter the low ones. A fence is a fresh token too,
//!   so every later grant is above every fence, with no read of the store on the grant
//!   path (the simulator checks it).
//! - **Recall.** An open by another client ([`Query::Open`]) or another client asking for
//!   the lease recalls it: the holder hears it on its watch stream (and in its next
//!   keepalive answer), commits what it wrote and gives the lease back
//!   ([`LockOp::ReleaseLease`]); the opener is answered `AGAIN` until then and asks
//!   again. After a release that followed a recall, the old holder is not granted the
//!   file again for [`HANDBACK_MS`], so the opener gets its turn.
//! - **Lapse.** A lease lapses when its holder's session ends without giving it back
//!   (expired: a host killed or cut off), or when its holder has not given it back one
//!   [`LOCK_LEASE_MS`] after a recall (revoked). Before a lapsed lease's file goes to
//!   anyone else (a grant or an open), the leader writes a **fence** through Raft
//!   ([`Mutation::Fence`], a token above the lapsed one) and only then answers. From then
//!   on the old holder cannot commit: the leader refuses (`STALE`) every commit whose
//!   lease is not held live by that client (the first check), and the state machine
//!   refuses every commit whose token is below the file's fence (the second check, for a
//!   commit that passed the first just before the lapse and was still on its way).
//! - **Reclaim.** A lease this leader does not know (a new leader, a restart) may be
//!   reclaimed by its holder ([`LockOp::Lease`] with `reclaim`): granted again (a new
//!   token) if it comes from an earlier term, within the first [`LOCK_LEASE_MS`] of this
//!   table, and nobody else was granted the file meanwhile; a lapsed lease may be
//!   reclaimed by its own holder while nobody else took the file. Otherwise the answer is
//!   [`Answer::LeaseLost`]: what the client wrote under it cannot be committed (its
//!   writes fail with EIO: another host took the file over).
//!
//! # Invariants
//! - At most one live (held) lease per file; a session's `held` set is exactly the files
//!   whose live lease it holds.
//! - A lapsed lease is never handed on unfenced: its entry leaves the table only by
//!   [`LeaseTable::fenced`] (after the fence is durable) or by its holder's reclaim.
//! - Tokens handed out by one table strictly grow; a new table (new term) starts above.
//! - Limits: at most [`MAX_LEASES`] entries (`ENOLCK`).
//!
//! Time is injected (`now_ms`), so the table is a plain state machine.

use hivefs_net::meta::{Answer, Errno, MetaReply, LOCK_LEASE_MS};
use std::collections::{HashMap, HashSet};

/// Most lease entries (live and lapsed) in the table.
pub const MAX_LEASES: usize = 1 << 20;
/// After giving a recalled lease back, its old holder waits this long before it is
/// granted the same file again (the opener that recalled it goes first).
pub const HANDBACK_MS: u64 = 300;

/// `(volume, inode)`.
pub type FileKey = (u32, u64);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Live; `recalled_at`: when another client first asked for it.
    Held { recalled_at: Option<u64> },
    /// Its holder lost it without giving it back: fence before handing the file on.
    Lapsed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Lease {
    client: u64,
    token: u64,
    state: State,
}

/// What the caller must do before it answers an open or a grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// Nothing: answer.
    Clear,
    /// A live lease of another client was recalled: answer `AGAIN`.
    Wait,
    /// The file's lease lapsed: write `Fence { token }` (a fresh token) through Raft, call
    /// [`LeaseTable::fenced`], then ask again.
    Fence(u64),
}

/// The write leases of one leader term. See the module docs.
#[derive(Debug)]
pub struct LeaseTable {
    term: u64,
    /// The last token handed out (0: none yet).
    last: u64,
    leases: HashMap<FileKey, Lease>,
    /// Live leases per client.
    held: HashMap<u64, HashSet<FileKey>>,
    /// Live leases with a recall pending.
    recalled: HashSet<FileKey>,
    /// Recalled leases given back: (old holder, until when it waits).
    handed_back: HashMap<FileKey, (u64, u64)>,
    /// Reclaims of leases from earlier terms are heard until then.
    reclaim_until_ms: u64,
    /// Files granted to anyone while reclaims are heard.
    granted_early: HashSet<FileKey>,
    /// Recalls to push to their holders: (volume, holder, inode).
    pushes: Vec<(u32, u64, u64)>,
}

fn term_of(token: u64) -> u64 {
    token >> 32
}

impl LeaseTable {
    /// An empty table of lease epoch `term` (see the module docs) created at `now_ms`.
    pub fn new(term: u64, now_ms: u64) -> LeaseTable {
        LeaseTable {
            term,
            last: 0,
            leases: HashMap::new(),
            held: HashMap::new(),
            recalled: HashSet::new(),
            handed_back: HashMap::new(),
            reclaim_until_ms: now_ms + LOCK_LEASE_MS,
            granted_early: HashSet::new(),
            pushes: Vec::new(),
        }
    }

    pub fn term(&self) -> u64 {
        self.term
    }

    /// Entries (live and lapsed).
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    /// Recalls to push since the last call: (volume, holder client, inode).
    pub fn take_pushes(&mut self) -> Vec<(u32, u64, u64)> {
        std::mem::take(&mut self.pushes)
    }

    /// The next token (see the module docs: above every earlier table's, and so above
    /// every fence).
    fn next_token(&mut self) -> u64 {
        self.last = (self.last + 1).max((self.term << 32) | 1);
        self.last
    }

    /// Lapse every live lease of `client` (its session ended without giving them back).
    pub fn session_ended(&mut self, client: u64) {
        for key in self.held.remove(&client).unwrap_or_default() {
            if let Some(l) = self.leases.get_mut(&key) {
                l.state = State::Lapsed;
            }
            self.recalled.remove(&key);
        }
    }

    /// Give back every live lease of `client` (it closed its session: an unmount, after
    /// committing what it wrote).
    pub fn release_all(&mut self, client: u64) {
        for key in self.held.remove(&client).unwrap_or_default() {
            self.leases.remove(&key);
            self.recalled.remove(&key);
        }
    }

    /// Revoke recalled leases not given back within a lease; forget old hand-backs.
    pub fn expire(&mut self, now_ms: u64) {
        let late: Vec<FileKey> = self
            .recalled
            .iter()
            .copied()
            .filter(|k| match self.leases.get(k) {
                Some(Lease {
                    state:
                        State::Held {
                            recalled_at: Some(t),
                        },
                    ..
                }) => *t + LOCK_LEASE_MS <= now_ms,
                _ => true,
            })
            .collect();
        for key in late {
            self.recalled.remove(&key);
            if let Some(l) = self.leases.get_mut(&key) {
                if matches!(l.state, State::Held { .. }) {
                    tracing::warn!(
                        volume = key.0,
                        ino = key.1,
                        client = l.client,
                        "write lease not given back within a lease of its recall: revoked"
                    );
                    l.state = State::Lapsed;
                    let client = l.client;
                    self.unhold(client, key);
                }
            }
        }
        if !self.handed_back.is_empty() {
            self.handed_back.retain(|_, (_, until)| *until > now_ms);
        }
        if now_ms >= self.reclaim_until_ms && !self.granted_early.is_empty() {
            self.granted_early = HashSet::new();
        }
    }

    /// Ask another client's live lease back (once per recall; pushed again each call so
    /// a lost push is repeated while the opener waits).
    fn recall(&mut self, key: FileKey, now_ms: u64) {
        if let Some(l) = self.leases.get_mut(&key) {
            if let State::Held { recalled_at } = &mut l.state {
                recalled_at.get_or_insert(now_ms);
                self.recalled.insert(key);
                self.pushes.push((key.0, l.client, key.1));
            }
        }
    }

    /// An open of `key` by `client`: may it read now?
    pub fn open(&mut self, now_ms: u64, client: u64, key: FileKey) -> Gate {
        self.expire(now_ms);
        match self.leases.get(&key) {
            None => Gate::Clear,
            Some(l) => match l.state {
                State::Held { .. } if l.client == client => Gate::Clear,
                State::Held { .. } => {
                    self.recall(key, now_ms);
                    Gate::Wait
                }
                State::Lapsed => Gate::Fence(self.next_token()),
            },
        }
    }

    /// Whether any lease of `key` is known here (held, or lapsed and not yet fenced).
    pub fn known(&self, key: FileKey) -> bool {
        self.leases.contains_key(&key)
    }

    /// The fence above the lapsed lease of `key` is durable: the entry goes.
    pub fn fenced(&mut self, key: FileKey, token: u64) {
        if let Some(l) = self.leases.get(&key) {
            if l.state == State::Lapsed && l.token < token {
                self.leases.remove(&key);
            }
        }
    }

    /// [`LockOp::Lease`] of `client` on `key`.
    /// `Err(gate)`: do what the gate says (fence, or answer `AGAIN`) first.
    pub fn lease(
        &mut self,
        now_ms: u64,
        client: u64,
        key: FileKey,
        reclaim: u64,
    ) -> Result<MetaReply, Gate> {
        self.expire(now_ms);
        let cur = self.leases.get(&key).copied();
        if reclaim != 0 {
            let ok = match cur {
                Some(l) if l.client == client && matches!(l.state, State::Held { .. }) => {
                    return Ok(Ok(Answer::Lease(l.token)));
                }
                // Lapsed, and nobody took the file since: its holder may have it again.
                Some(l) => l.client == client && l.token == reclaim && l.state == State::Lapsed,
                None => {
                    term_of(reclaim) < self.term
                        && now_ms < self.reclaim_until_ms
                        && !self.granted_early.contains(&key)
                }
            };
            if !ok {
                return Ok(Ok(Answer::LeaseLost));
            }
            return Ok(self.grant(now_ms, client, key));
        }
        match cur {
            Some(l) => match l.state {
                State::Held { .. } if l.client == client => Ok(Ok(Answer::Lease(l.token))),
                State::Held { .. } => {
                    self.recall(key, now_ms);
                    Err(Gate::Wait)
                }
                // Its own lapsed lease (a session that ended): nobody else can have
                // committed since, no fence needed.
                State::Lapsed if l.client == client => Ok(self.grant(now_ms, client, key)),
                State::Lapsed => Err(Gate::Fence(self.next_token())),
            },
            None => {
                if self
                    .handed_back
                    .get(&key)
                    .is_some_and(|&(c, until)| c == client && until > now_ms)
                {
                    return Err(Gate::Wait);
                }
                Ok(self.grant(now_ms, client, key))
            }
        }
    }

    fn grant(&mut self, now_ms: u64, client: u64, key: FileKey) -> MetaReply {
        if !self.leases.contains_key(&key) && self.leases.len() >= MAX_LEASES {
            return Err(Errno::NOLCK);
        }
        let token = self.next_token();
        self.leases.insert(
            key,
            Lease {
                client,
                token,
                state: State::Held { recalled_at: None },
            },
        );
        self.held.entry(client).or_default().insert(key);
        if now_ms < self.reclaim_until_ms {
            self.granted_early.insert(key);
        }
        Ok(Answer::Lease(token))
    }

    fn unhold(&mut self, client: u64, key: FileKey) {
        if let Some(h) = self.held.get_mut(&client) {
            h.remove(&key);
            if h.is_empty() {
                self.held.remove(&client);
            }
        }
    }

    /// [`LockOp::ReleaseLease`].
    pub fn release(&mut self, now_ms: u64, client: u64, key: FileKey, token: u64) {
        let Some(l) = self.leases.get(&key).copied() else {
            return;
        };
        let State::Held { recalled_at } = l.state else {
            return;
        };
        if l.client != client || l.token != token {
            return;
        }
        self.leases.remove(&key);
        self.recalled.remove(&key);
        self.unhold(client, key);
        if recalled_at.is_some() {
            self.handed_back.insert(key, (client, now_ms + HANDBACK_MS));
        }
    }

    /// May `client` commit to `key` under `token` now (a live lease of its own)?
    pub fn may_commit(&mut self, now_ms: u64, client: u64, key: FileKey, token: u64) -> bool {
        self.expire(now_ms);
        matches!(
            self.leases.get(&key),
            Some(Lease { client: c, token: t, state: State::Held { .. } }) if *c == client && *t == token
        )
    }

    /// The inodes of `client`'s live leases on `volume` with a recall pending.
    pub fn recalls_of(&self, client: u64, volume: u32) -> Vec<u64> {
        let Some(h) = self.held.get(&client) else {
            return Vec::new();
        };
        self.recalled
            .iter()
            .filter(|k| k.0 == volume && h.contains(k))
            .map(|k| k.1)
            .take(hivefs_net::meta::MAX_WATCH_BATCH)
            .collect()
    }

    /// Check the invariants (tests and the simulator; panics on a breach).
    pub fn check(&self) {
        let mut live = 0;
        for (key, l) in &self.leases {
            if let State::Held { recalled_at } = l.state {
                live += 1;
                assert!(self.held.get(&l.client).is_some_and(|h| h.contains(key)));
                assert_eq!(recalled_at.is_some(), self.recalled.contains(key));
            }
        }
        assert_eq!(live, self.held.values().map(|h| h.len()).sum::<usize>());
        for (c, h) in &self.held {
            assert!(!h.is_empty(), "empty held set of {c}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: FileKey = (1, 7);

    fn token(r: Result<MetaReply, Gate>) -> u64 {
        match r {
            Ok(Ok(Answer::Lease(t))) => t,
            other => panic!("expected a lease, got {other:?}"),
        }
    }

    #[test]
    fn one_holder_recalls_and_handback() {
        let mut t = LeaseTable::new(3, 0);
        let a = token(t.lease(10, 1, K, 0));
        assert_eq!(a >> 32, 3);
        // Asked again by its holder: the same lease.
        assert_eq!(token(t.lease(11, 1, K, 0)), a);
        // Another client: recalled, and the holder is told (pushed and on keepalive).
        assert_eq!(t.lease(12, 2, K, 0), Err(Gate::Wait));
        assert_eq!(t.take_pushes(), vec![(1, 1, 7)]);
        assert_eq!(t.recalls_of(1, 1), vec![7]);
        assert_eq!(t.open(13, 3, K), Gate::Wait);
        // The holder's own open is not held up.
        assert_eq!(t.open(13, 1, K), Gate::Clear);
        assert!(t.may_commit(14, 1, K, a));
        t.check();
        // Given back: the opener may read; the old holder waits its turn for a moment.
        t.release(20, 1, K, a);
        assert_eq!(t.open(21, 3, K), Gate::Clear);
        assert_eq!(t.lease(22, 1, K, 0), Err(Gate::Wait));
        assert!(!t.may_commit(22, 1, K, a));
        let b = token(t.lease(22 + HANDBACK_MS, 2, K, 0));
        assert!(b > a);
        t.check();
    }

    #[test]
    fn a_lapsed_lease_is_fenced_before_the_file_moves_on() {
        let mut t = LeaseTable::new(1, 0);
        let a = token(t.lease(0, 1, K, 0));
        // Client 1's session ends (killed): the lease lapses.
        t.session_ended(1);
        assert!(!t.may_commit(1, 1, K, a));
        // Nobody gets the file until a fence above `a` is durable.
        let Err(Gate::Fence(f)) = t.lease(2, 2, K, 0) else {
            panic!("expected a fence")
        };
        assert!(f > a);
        // An open must wait for a fence too (each ask is a fresh token, above the last).
        assert!(matches!(t.open(2, 3, K), Gate::Fence(g) if g > f));
        t.fenced(K, f);
        let b = token(t.lease(3, 2, K, 0));
        assert!(b > f, "a grant is above the fence");
        // The old holder cannot come back with its token.
        assert_eq!(t.lease(4, 1, K, a), Ok(Ok(Answer::LeaseLost)));
        t.check();
    }

    #[test]
    fn a_recall_not_answered_revokes_after_a_lease() {
        let mut t = LeaseTable::new(1, 0);
        let a = token(t.lease(0, 1, K, 0));
        assert_eq!(t.open(100, 2, K), Gate::Wait);
        assert_eq!(t.open(100 + LOCK_LEASE_MS - 1, 2, K), Gate::Wait);
        assert!(t.may_commit(100 + LOCK_LEASE_MS - 1, 1, K, a));
        // A lease after the recall: revoked, fenced, handed on.
        assert!(matches!(t.open(100 + LOCK_LEASE_MS, 2, K), Gate::Fence(_)));
        assert!(!t.may_commit(100 + LOCK_LEASE_MS, 1, K, a));
        t.check();
    }

    #[test]
    fn own_lapsed_lease_comes_back_without_a_fence() {
        let mut t = LeaseTable::new(1, 0);
        let a = token(t.lease(0, 1, K, 0));
        t.session_ended(1);
        // Reclaimed by token, or asked for plainly: nobody else took the file.
        let b = token(t.lease(5, 1, K, a));
        assert!(b > a);
        t.session_ended(1);
        let c = token(t.lease(6, 1, K, 0));
        assert!(c > b);
        t.check();
    }

    #[test]
    fn reclaims_after_a_new_term() {
        // The old leader (term 1) granted `a`; the new one (term 2) does not know it.
        let mut old = LeaseTable::new(1, 0);
        let a = token(old.lease(0, 1, K, 0));
        let mut t = LeaseTable::new(2, 1000);
        // A commit under `a` is refused here; the holder reclaims within the window.
        assert!(!t.may_commit(1001, 1, K, a));
        let b = token(t.lease(1002, 1, K, a));
        assert!(b > a && b >> 32 == 2);
        // Another file, granted to someone else first: the reclaim is refused.
        let k2 = (1, 8);
        let a2 = token(old.lease(1, 1, k2, 0));
        let c = token(t.lease(1003, 2, k2, 0));
        t.release(1004, 2, k2, c);
        assert_eq!(t.lease(1005, 1, k2, a2), Ok(Ok(Answer::LeaseLost)));
        // After the window, reclaims of unknown leases are refused.
        let k3 = (1, 9);
        let a3 = token(old.lease(2, 1, k3, 0));
        assert_eq!(
            t.lease(1000 + LOCK_LEASE_MS, 1, k3, a3),
            Ok(Ok(Answer::LeaseLost))
        );
        // A token of this very term that the table does not hold: lost too.
        assert_eq!(t.lease(1006, 3, (1, 10), b), Ok(Ok(Answer::LeaseLost)));
        t.check();
    }

    #[test]
    fn tokens_grow_and_stay_above_earlier_tables() {
        // The previous table (epoch 3) went far up its counter, and fenced a file.
        let mut old = LeaseTable::new(3, 0);
        old.last = (3 << 32) | 0xffff_fff0;
        let a = token(old.lease(0, 9, K, 0));
        old.session_ended(9);
        let Err(Gate::Fence(fence)) = old.lease(1, 8, K, 0) else {
            panic!("expected a fence")
        };
        assert!(fence > a);
        let mut t = LeaseTable::new(4, 0);
        let mut last = 0;
        for i in 0..100u64 {
            let key = (1, i % 7);
            let tok = token(t.lease(i, i % 3 + 1, key, 0));
            assert!(tok > last && tok > fence);
            last = tok;
            t.release(i, i % 3 + 1, key, tok);
        }
        t.check();
    }
}
