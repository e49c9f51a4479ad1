//! Write leases of `hi mount` (the leader's side, and the whole contract, is in
//! `engine/src/meta/leases.rs`).
//!
//! - A commit needs the mount's write lease on the file (`Hive::write_lease` in
//!   writeback.rs asks for it the first time and keeps it; its token goes with every
//!   commit-write). The mount's lock session carries it, so the keepalive below renews it.
//! - When the last user of a file here is gone and nothing of it is uncommitted, the lease
//!   is given back ([`Leases::release`], on this module's thread: closing a file does not
//!   wait for it).
//! - **Recall**: another host opened (or wants to write) a file whose lease this mount
//!   holds. The hive says so on the watch stream (`invalidate.rs`) and in keepalive
//!   answers; this thread commits what was written to the file here (as `fsync` would)
//!   and gives the lease back, so the other host's open sees those bytes. Writes that go
//!   on here ask for the lease again.
//! - A lease the hive no longer knows is reclaimed at once when the keepalive finds the
//!   session lost, else at the next commit; when another host has been granted the file
//!   since, the bytes written under the lost lease are dropped and the writer gets EIO
//!   (writeback.rs).

use hivefs_client::meta::LockClient;
use hivefs_net::meta::LOCK_KEEPALIVE_MS;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Commits everything written to an inode on this host (the file system's `fsync`).
pub type FlushFn = Box<dyn Fn(u64) -> Result<(), fuser::Errno> + Send + Sync>;
/// Whether an inode is in use on this host again (open, or holding uncommitted bytes).
pub type BusyFn = Box<dyn Fn(u64) -> bool + Send + Sync>;

enum Task {
    Recall(Vec<u64>),
    Release(u64),
}

/// The lease side of a mount: the keepalive of its lock session, recalls and releases.
pub struct Leases {
    tx: Mutex<Option<mpsc::Sender<Task>>>,
    stop: Arc<AtomicBool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Leases {
    /// Start the keepalive thread (it renews the session while locks or leases are held)
    /// and the recall thread, which commits a recalled file with `flush`.
    pub fn start(client: Arc<LockClient>, flush: FlushFn, busy: BusyFn) -> std::io::Result<Leases> {
        let (tx, rx) = mpsc::channel::<Task>();
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s, ktx) = (client.clone(), stop.clone(), tx.clone());
        let keepalive = std::thread::Builder::new()
            .name("hi-lock-lease".into())
            .spawn(move || {
                while !s.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(LOCK_KEEPALIVE_MS));
                    let recalls = c.keepalive();
                    if !recalls.is_empty() {
                        let _ = ktx.send(Task::Recall(recalls));
                    }
                    reclaim_orphans(&c);
                }
            })?;
        let worker = std::thread::Builder::new()
            .name("hi-recall".into())
            .spawn(move || {
                for task in rx {
                    match task {
                        Task::Recall(inos) => {
                            for ino in inos {
                                recall(&client, &flush, ino);
                            }
                        }
                        // Reopened meanwhile: it keeps its lease.
                        Task::Release(ino) if busy(ino) => {}
                        Task::Release(ino) => {
                            if let Err(e) = client.release_lease(ino) {
                                tracing::debug!(ino, "giving a write lease back: {e}");
                            }
                        }
                    }
                }
            })?;
        Ok(Leases {
            tx: Mutex::new(Some(tx)),
            stop,
            threads: Mutex::new(vec![keepalive, worker]),
        })
    }

    fn send(&self, t: Task) {
        if let Some(tx) = self.tx.lock().expect("lease queue lock").as_ref() {
            let _ = tx.send(t);
        }
    }

    /// The hive recalls these inodes' leases (from the watch stream).
    pub fn recalled(&self, inos: Vec<u64>) {
        self.send(Task::Recall(inos));
    }

    /// Nothing of `ino` is uncommitted here and nobody here uses it: give its lease back.
    pub fn release(&self, ino: u64) {
        self.send(Task::Release(ino));
    }

    /// Stop both threads (unmount; the lock session is closed after this).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        drop(self.tx.lock().expect("lease queue lock").take());
        for t in self.threads.lock().expect("lease threads lock").drain(..) {
            let _ = t.join();
        }
    }
}

/// The session was lost (a new leader, a restart, an expiry): reclaim every lease held
/// here at once, so that another host's open is recalled again as soon as possible (a
/// new leader hears reclaims only during its first lease; see
/// `engine/src/meta/leases.rs`). A refused reclaim leaves the lease here: the file's next
/// commit finds the loss and reports it.
fn reclaim_orphans(client: &LockClient) {
    for (ino, token) in client.orphaned_leases() {
        match client.reassert(ino, token) {
            Ok(true) => tracing::info!(ino, "write lease reclaimed after the session was lost"),
            Ok(false) => tracing::warn!(ino, "write lease lost: another host took the file over"),
            Err(e) => {
                tracing::debug!(ino, "reclaiming a write lease: {e}");
                return; // the leader is not reachable yet: next turn
            }
        }
    }
}

/// Commit what this host wrote to `ino`, then give its lease back. A failed commit keeps
/// the lease (and the bytes): the hive revokes it a lease after the recall, and the
/// bytes then fail with EIO here.
fn recall(client: &LockClient, flush: &FlushFn, ino: u64) {
    if client.lease_token(ino).is_none() {
        return;
    }
    match flush(ino) {
        Ok(()) => {
            if let Err(e) = client.release_lease(ino) {
                tracing::warn!(ino, "giving a recalled write lease back: {e}");
            } else {
                tracing::debug!(ino, "recalled write lease given back");
            }
        }
        Err(e) => tracing::warn!(ino, "committing a recalled file: {e:?}; lease kept"),
    }
}
