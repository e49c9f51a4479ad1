//! Watchers: mounts that asked (`MetaRequest::Watch`) to hear what other clients'
//! mutations make stale in their kernel caches, so those caches can keep names and
//! attributes for long (the TTL) and still see another mount's change at once.
//!
//! - [`invalidations`] maps one applied mutation and its answer to the directory entries
//!   and inodes it changed (a pure function: unit-tested below).
//! - [`Watchers`] is the registry: after a mutation is applied through Raft and answered OK,
//!   the connection thread that served it calls [`Watchers::publish`], which adds the items
//!   to the pending set of every watcher of that volume except the client that made the
//!   change (its kernel cache is updated by the answer). Publishing never blocks on a
//!   watcher: each has a bounded pending set ([`MAX_WATCH_PENDING`] items, deduplicated);
//!   a watcher that falls behind has its set dropped and an overflow flag set, and its
//!   stream says `Overflow` next.
//! - Each watch is served by its own metadata connection thread ([`Watcher::next`] and
//!   `server.rs`), so the connection limit counts watchers too; at most [`MAX_WATCHERS`]
//!   at once. A watcher is removed when its connection fails (its thread ends).
//!
//! The only lock is each registry's and each watcher's mutex, held for a copy; never
//! while sending.

use hivefs_net::meta::{Answer, Invalidation, Mutation, WatchEvent, MAX_WATCH_BATCH};
use std::collections::HashSet;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Watch streams served at once (each is one metadata connection thread).
pub const MAX_WATCHERS: usize = 256;
/// Items (entries plus inodes) pending for one watcher before it counts as overflowed.
pub const MAX_WATCH_PENDING: usize = 4 * MAX_WATCH_BATCH;

/// What `op`, answered `answer`, invalidates for other clients; `None` for mutations no
/// mount caches anything of (volumes, reclaim of an unlinked inode, GC epochs).
pub fn invalidations(op: &Mutation, answer: &Answer) -> Option<Invalidation> {
    let answered_ino = match answer {
        Answer::Attr(a) => Some(a.ino),
        _ => None,
    };
    let mut inv = Invalidation {
        inodes: op.changed_inodes(),
        ..Default::default()
    };
    match op {
        Mutation::Create { parent, name, .. }
        | Mutation::Symlink { parent, name, .. }
        | Mutation::Link { parent, name, .. } => inv.entries.push((*parent, name.clone())),
        Mutation::Unlink { parent, name } | Mutation::Rmdir { parent, name } => {
            inv.entries.push((*parent, name.clone()));
            // The victim: its link count (other names of it may be cached elsewhere).
            inv.inodes.extend(answered_ino);
        }
        Mutation::Rename {
            parent,
            name,
            new_parent,
            new_name,
            ..
        } => {
            inv.entries
                .extend([(*parent, name.clone()), (*new_parent, new_name.clone())]);
            if let Answer::Renamed { moved, replaced } = answer {
                inv.inodes.push(*moved);
                inv.inodes.extend(*replaced);
            }
        }
        Mutation::SetAttr { .. }
        | Mutation::CommitWrite { .. }
        | Mutation::CommitWriteThenSet { .. }
        | Mutation::SetXattr { .. }
        | Mutation::RemoveXattr { .. } => {}
        Mutation::CreateVolume { .. }
        | Mutation::Reclaim { .. }
        | Mutation::Fence { .. }
        | Mutation::AdvanceGcEpoch
        | Mutation::NewLeaseEpoch
        | Mutation::RotateCa(_)
        | Mutation::AddNode(_)
        | Mutation::SetNodeState { .. }
        | Mutation::CreateToken { .. }
        | Mutation::RevokeToken { .. }
        | Mutation::SetLogVersion { .. } => return None,
    }
    Some(inv)
}

#[derive(Default)]
struct Pending {
    entries: HashSet<(u64, Vec<u8>)>,
    inodes: HashSet<u64>,
    overflowed: bool,
    /// Write leases of this client that another client's open recalls (never dropped on
    /// overflow; bounded by the leases the client holds).
    recalls: HashSet<u64>,
}

impl Pending {
    fn len(&self) -> usize {
        self.entries.len() + self.inodes.len()
    }
}

/// One watch stream's pending invalidations.
pub struct Watcher {
    volume: u32,
    client: u64,
    pending: Mutex<Pending>,
    ready: Condvar,
}

impl Watcher {
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().expect("watcher lock")
    }

    fn add(&self, inv: &Invalidation) {
        let mut p = self.pending();
        if p.overflowed {
            return; // everything is stale for it already
        }
        p.entries.extend(inv.entries.iter().cloned());
        p.inodes.extend(inv.inodes.iter().copied());
        if p.len() > MAX_WATCH_PENDING {
            p.entries = HashSet::new();
            p.inodes = HashSet::new();
            p.overflowed = true;
        }
        drop(p);
        self.ready.notify_one();
    }

    /// The next event for the stream: `Overflow` if events were dropped, else up to
    /// [`MAX_WATCH_BATCH`] pending items; `None` if nothing came within `wait`.
    pub fn next(&self, wait: Duration) -> Option<WatchEvent> {
        let deadline = Instant::now() + wait;
        let mut p = self.pending();
        loop {
            if !p.recalls.is_empty() {
                let take: Vec<u64> = p.recalls.iter().copied().take(MAX_WATCH_BATCH).collect();
                for i in &take {
                    p.recalls.remove(i);
                }
                return Some(WatchEvent::Recall(take));
            }
            if p.overflowed {
                p.overflowed = false;
                return Some(WatchEvent::Overflow);
            }
            if p.len() > 0 {
                let mut inv = Invalidation::default();
                while inv.len() < MAX_WATCH_BATCH {
                    let Some(e) = p.entries.iter().next().cloned() else {
                        break;
                    };
                    p.entries.remove(&e);
                    inv.entries.push(e);
                }
                while inv.len() < MAX_WATCH_BATCH {
                    let Some(&i) = p.inodes.iter().next() else {
                        break;
                    };
                    p.inodes.remove(&i);
                    inv.inodes.push(i);
                }
                debug_assert!(inv.len() <= MAX_WATCH_BATCH);
                return Some(WatchEvent::Invalidate(inv));
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            p = self
                .ready
                .wait_timeout(p, deadline - now)
                .expect("watcher lock")
                .0;
        }
    }
}

/// Every watch stream of this metadata service.
#[derive(Default)]
pub struct Watchers {
    all: Mutex<Vec<Arc<Watcher>>>,
}

/// A registered watcher; dropping it unregisters (the connection ended).
pub struct Registration<'a> {
    watchers: &'a Watchers,
    pub watcher: Arc<Watcher>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut all = self.watchers.all.lock().expect("watchers lock");
        all.retain(|w| !Arc::ptr_eq(w, &self.watcher));
    }
}

impl Watchers {
    /// Ask `client`'s watch streams on `volume` to give the write lease of `ino` back.
    pub fn recall(&self, volume: u32, client: u64, ino: u64) {
        let all = self.all.lock().expect("watchers lock");
        for w in all
            .iter()
            .filter(|w| w.volume == volume && w.client == client)
        {
            let mut p = w.pending();
            if p.recalls.len() < MAX_WATCH_PENDING {
                p.recalls.insert(ino);
            }
            drop(p);
            w.ready.notify_one();
        }
    }

    /// Register a watch stream of `client` on `volume`; `None` when [`MAX_WATCHERS`] are
    /// registered already.
    pub fn register(&self, volume: u32, client: u64) -> Option<Registration<'_>> {
        let mut all = self.all.lock().expect("watchers lock");
        if all.len() >= MAX_WATCHERS {
            return None;
        }
        let watcher = Arc::new(Watcher {
            volume,
            client,
            pending: Mutex::new(Pending::default()),
            ready: Condvar::new(),
        });
        all.push(watcher.clone());
        Some(Registration {
            watchers: self,
            watcher,
        })
    }

    /// Queue `inv` for every watcher of `volume` but `origin`'s (never blocks on one).
    pub fn publish(&self, volume: u32, origin: u64, inv: &Invalidation) {
        if inv.is_empty() {
            return;
        }
        let targets: Vec<Arc<Watcher>> = self
            .all
            .lock()
            .expect("watchers lock")
            .iter()
            .filter(|w| w.volume == volume && w.client != origin)
            .cloned()
            .collect();
        for w in targets {
            w.add(inv);
        }
    }

    pub fn len(&self) -> usize {
        self.all.lock().expect("watchers lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hivefs_net::meta::{
        Attr, FileKind, RenameMode, SetAttr, Timespec, MAX_NAME_BYTES, ROOT_INO,
    };

    fn attr(ino: u64) -> Answer {
        Answer::Attr(Attr {
            ino,
            gen: 1,
            kind: FileKind::File,
            perm: 0o644,
            nlink: 1,
            uid: 0,
            gid: 0,
            size: 0,
            atime: Timespec::default(),
            mtime: Timespec::default(),
            ctime: Timespec::default(),
            crtime: Timespec::default(),
            rdev: 0,
        })
    }

    fn sorted(inv: Invalidation) -> (Vec<(u64, Vec<u8>)>, Vec<u64>) {
        let (mut e, mut i) = (inv.entries, inv.inodes);
        e.sort();
        i.sort();
        (e, i)
    }

    fn n(s: &str) -> Vec<u8> {
        s.as_bytes().to_vec()
    }

    #[test]
    fn mutations_map_to_what_they_make_stale() {
        let inv = |op: Mutation, a: Answer| sorted(invalidations(&op, &a).expect("some"));
        let create = Mutation::Create {
            parent: 5,
            name: n("f"),
            kind: FileKind::File,
            perm: 0o644,
            uid: 0,
            gid: 0,
            rdev: 0,
        };
        assert_eq!(inv(create, attr(9)), (vec![(5, n("f"))], vec![5]));
        let sym = Mutation::Symlink {
            parent: 5,
            name: n("s"),
            target: n("t"),
            uid: 0,
            gid: 0,
        };
        assert_eq!(inv(sym, attr(9)), (vec![(5, n("s"))], vec![5]));
        let link = Mutation::Link {
            ino: 9,
            parent: 6,
            name: n("l"),
        };
        assert_eq!(inv(link, attr(9)), (vec![(6, n("l"))], vec![6, 9]));
        let unlink = Mutation::Unlink {
            parent: 5,
            name: n("f"),
        };
        assert_eq!(inv(unlink, attr(9)), (vec![(5, n("f"))], vec![5, 9]));
        let rmdir = Mutation::Rmdir {
            parent: ROOT_INO,
            name: n("d"),
        };
        assert_eq!(inv(rmdir, attr(7)), (vec![(1, n("d"))], vec![1, 7]));
        for mode in [
            RenameMode::Replace,
            RenameMode::NoReplace,
            RenameMode::Exchange,
        ] {
            let ren = Mutation::Rename {
                parent: 5,
                name: n("a"),
                new_parent: 6,
                new_name: n("b"),
                mode,
            };
            let replaced = (mode != RenameMode::NoReplace).then_some(10);
            assert_eq!(
                inv(ren, Answer::Renamed { moved: 9, replaced }),
                (
                    vec![(5, n("a")), (6, n("b"))],
                    [5, 6, 9].into_iter().chain(replaced).collect()
                ),
                "{mode:?}"
            );
        }
        let same_dir = Mutation::Rename {
            parent: 5,
            name: n("a"),
            new_parent: 5,
            new_name: n("b"),
            mode: RenameMode::Replace,
        };
        let moved = Answer::Renamed {
            moved: 9,
            replaced: None,
        };
        assert_eq!(
            inv(same_dir, moved),
            (vec![(5, n("a")), (5, n("b"))], vec![5, 9])
        );
        let setattr = Mutation::SetAttr {
            ino: 9,
            set: SetAttr::default(),
        };
        assert_eq!(inv(setattr, attr(9)), (vec![], vec![9]));
        let commit = Mutation::CommitWrite {
            ino: 9,
            extents: vec![],
            size_at_least: 1,
            claim_epoch: 1,
            lease: 0,
        };
        assert_eq!(inv(commit, attr(9)), (vec![], vec![9]));
        let setx = Mutation::SetXattr {
            ino: 9,
            name: n("user.a"),
            value: n("v"),
            mode: hivefs_net::meta::XattrMode::Any,
        };
        assert_eq!(inv(setx, Answer::Done), (vec![], vec![9]));
        let rmx = Mutation::RemoveXattr {
            ino: 9,
            name: n("user.a"),
        };
        assert_eq!(inv(rmx, Answer::Done), (vec![], vec![9]));
        assert_eq!(
            invalidations(&Mutation::Reclaim { ino: 9 }, &Answer::Done),
            None
        );
        assert_eq!(
            invalidations(&Mutation::AdvanceGcEpoch, &Answer::GcEpoch(2)),
            None
        );
    }

    #[test]
    fn publish_skips_the_origin_and_other_volumes_and_batches() {
        let w = Watchers::default();
        let a = w.register(1, 100).unwrap();
        let b = w.register(1, 200).unwrap();
        let c = w.register(2, 300).unwrap();
        let inv = Invalidation {
            entries: vec![(1, n("x"))],
            inodes: vec![1, 1],
        };
        w.publish(1, 100, &inv);
        w.publish(1, 100, &inv); // deduplicated while pending
        let short = Duration::from_millis(10);
        assert_eq!(a.watcher.next(short), None, "the origin hears nothing");
        assert_eq!(c.watcher.next(short), None, "another volume hears nothing");
        match b.watcher.next(short) {
            Some(WatchEvent::Invalidate(got)) => {
                assert_eq!(sorted(got), (vec![(1, n("x"))], vec![1]))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(b.watcher.next(short), None);
        // More than a batch: split into batches of at most MAX_WATCH_BATCH.
        let many = Invalidation {
            entries: (0..MAX_WATCH_BATCH as u64 + 10)
                .map(|i| (i, vec![b'n'; MAX_NAME_BYTES]))
                .collect(),
            inodes: (0..20).collect(),
        };
        w.publish(1, 100, &many);
        let mut got = 0;
        while let Some(ev) = b.watcher.next(short) {
            let WatchEvent::Invalidate(inv) = ev else {
                panic!("{ev:?}")
            };
            assert!(inv.len() <= MAX_WATCH_BATCH);
            assert!(WatchEvent::Invalidate(inv.clone()).validate().is_ok());
            got += inv.len();
        }
        assert_eq!(got, MAX_WATCH_BATCH + 30);
        drop(c);
        assert_eq!(w.len(), 2, "a dropped registration is gone");
    }

    #[test]
    fn a_slow_watcher_overflows_without_blocking_the_publisher() {
        let w = Watchers::default();
        let slow = w.register(1, 1).unwrap();
        for i in 0..(MAX_WATCH_PENDING as u64 + 1) {
            w.publish(
                1,
                2,
                &Invalidation {
                    entries: vec![],
                    inodes: vec![i],
                },
            );
        }
        let short = Duration::from_millis(10);
        assert_eq!(slow.watcher.next(short), Some(WatchEvent::Overflow));
        assert_eq!(slow.watcher.next(short), None, "the dropped items are gone");
        w.publish(
            1,
            2,
            &Invalidation {
                entries: vec![],
                inodes: vec![7],
            },
        );
        assert!(matches!(
            slow.watcher.next(short),
            Some(WatchEvent::Invalidate(_))
        ));
    }

    #[test]
    fn the_registry_is_bounded() {
        let w = Watchers::default();
        let regs: Vec<_> = (0..MAX_WATCHERS)
            .map(|i| w.register(1, i as u64).unwrap())
            .collect();
        assert!(w.register(1, 9999).is_none());
        drop(regs);
        assert!(w.register(1, 9999).is_some());
    }
}
