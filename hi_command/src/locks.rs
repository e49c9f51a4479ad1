//! File locks of `hi mount`: the kernel's `flock(2)` and `fcntl(2)` lock requests, made
//! exclusive across every mount of the volume by the metadata leader's lock service
//! (`engine/src/meta/locks.rs`; sessions, leases and restarts are explained there).
//!
//! # What the kernel sends
//! With `FUSE_POSIX_LOCKS` the kernel sends `F_GETLK`/`F_SETLK`/`F_SETLKW` here instead of
//! keeping locks itself, with the lock owner it derives from the process's file table; with
//! `FUSE_FLOCK_LOCKS` it sends `flock(2)` as the same requests over the whole file (`0 ..=
//! OFFSET_MAX`), with the open file description as the owner. Unlocking on close is ours:
//! every `close(2)` sends FLUSH with the closing process's owner (POSIX: any close of the
//! file drops that process's locks on it), and the last close of an open file description
//! that used `flock` sends RELEASE with `FUSE_RELEASE_FLOCK_UNLOCK` and that owner.
//!
//! **Known difference from Linux:** fuser 0.18 does not pass the request's `FUSE_LK_FLOCK`
//! flag on, so `flock` locks arrive looking exactly like whole-file POSIX write/read locks.
//! They are kept as POSIX locks of their own owner (the open file description), which
//! gives `flock` its owner semantics (two opens of a file conflict; a fork shares) and its
//! release on last close, but `flock` and `fcntl` locks on the same file conflict with each
//! other (as on NFS, which emulates `flock` the same way), and upgrading a shared `flock`
//! to exclusive keeps the shared lock while it waits (two upgraders wait for each other
//! until one is interrupted). The lock service keeps the two families apart
//! ([`LockKind::Flock`]) for when fuser exposes the flag.
//!
//! # Waiting
//! The service never waits. A blocking request (`F_SETLKW`, `flock` without `LOCK_NB`) is
//! retried by a waiter thread of its own (at most [`MAX_WAITERS`]; the FUSE threads stay
//! free, so the unlock that ends the wait can come in through this mount), backing off from
//! [`WAIT_FIRST`] to [`WAIT_MAX`]. fuser 0.18 answers the kernel's INTERRUPT with ENOSYS,
//! so the waiter looks itself: when the waiting thread has a signal pending that it does
//! not block (in `/proc/<tid>/status`; SIGKILL included), the request ends with EINTR, as a
//! local `fcntl` would. Unmounting ends every wait with EINTR.
//!
//! # Data
//! A lock orders data across hosts as NFS does: unlocking first commits what this mount
//! wrote to the file (as `fsync` does; an unlock that cannot commit fails and keeps the
//! lock), and a lock, once granted, reads the file's committed extents again (an open's
//! query: another host's uncommitted bytes are recalled first) and drops the kernel's
//! cached pages and attributes of it (`fs.rs`, `LockedView`). If that read fails, the call
//! fails but the lock stays held (letting the range go could drop a lock the owner held
//! before): held too much, never too little. So a reader that takes the
//! lock after a writer released it reads the writer's bytes without closing the file.
//! (`F_GETLK` moves no data.)
//!
//! # Lease
//! A keepalive thread (leases.rs) renews the mount's lock session every
//! `LOCK_KEEPALIVE_MS` while it holds locks or write leases; dropping [`Locks`] (unmount)
//! closes the session, releasing every lock of the mount at once. A `hi` killed with
//! SIGKILL loses its locks when its lease runs out.

use fuser::{Errno, ReplyEmpty, ReplyLock};
use hivefs_client::meta::LockClient;
use hivefs_net::meta::{self as m, LockKind, LockType};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Most blocking lock requests waiting at once (one thread each); more get ENOLCK.
pub const MAX_WAITERS: usize = 256;
/// First pause between tries of a blocking request; it doubles up to [`WAIT_MAX`].
pub const WAIT_FIRST: Duration = Duration::from_millis(5);
pub const WAIT_MAX: Duration = Duration::from_millis(100);
/// The kernel's largest offset (`OFFSET_MAX`): lock ends are clamped to it.
const OFFSET_MAX: u64 = i64::MAX as u64;

/// Run once a lock is granted: brings the file's view up to date (see the module docs).
pub type GrantedFn = Box<dyn FnOnce() -> Result<(), Errno> + Send>;

/// The lock side of a mount. See the module docs.
pub struct Locks {
    client: Arc<LockClient>,
    /// Set at unmount: waiters and the keepalive thread stop.
    stop: Arc<AtomicBool>,
    waiters: Arc<AtomicUsize>,
}

fn errno(e: m::Errno) -> Errno {
    Errno::from_i32(e.0)
}

/// The kernel's `l_type` as a lock type (`None`: unlock); `Err` for anything else.
fn lock_type(typ: i32) -> Result<Option<LockType>, Errno> {
    match typ {
        libc::F_RDLCK => Ok(Some(LockType::Read)),
        libc::F_WRLCK => Ok(Some(LockType::Write)),
        libc::F_UNLCK => Ok(None),
        _ => Err(Errno::EINVAL),
    }
}

impl Locks {
    /// The lock side of a mount, over its lock session `client`.
    pub fn new(client: Arc<LockClient>) -> Locks {
        Locks {
            client,
            stop: Arc::new(AtomicBool::new(false)),
            waiters: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// `F_GETLK`: answer the first conflicting lock, or `F_UNLCK`.
    pub fn getlk(&self, ino: u64, owner: u64, start: u64, end: u64, typ: i32, reply: ReplyLock) {
        let t = match lock_type(typ) {
            Ok(Some(t)) => t,
            Ok(None) | Err(_) => return reply.error(Errno::EINVAL),
        };
        if start > end {
            return reply.error(Errno::EINVAL);
        }
        match self.client.get(ino, LockKind::Posix, owner, t, start, end) {
            Ok(None) => reply.locked(start, end, libc::F_UNLCK, 0),
            Ok(Some(l)) => {
                let typ = match l.typ {
                    LockType::Read => libc::F_RDLCK,
                    LockType::Write => libc::F_WRLCK,
                };
                reply.locked(l.start.min(OFFSET_MAX), l.end.min(OFFSET_MAX), typ, l.pid)
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    /// `F_SETLK` / `F_SETLKW` (`sleep`), and `flock` (see the module docs). `tid` is the
    /// requesting thread (the request's pid), watched for signals while waiting. Once a
    /// lock (not an unlock) is granted, `granted` runs before the answer; if it fails, the
    /// caller gets its error and the lock stays held (see `finish`).
    #[allow(clippy::too_many_arguments)]
    pub fn setlk(
        &self,
        tid: u32,
        ino: u64,
        owner: u64,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
        granted: GrantedFn,
    ) {
        let t = match lock_type(typ) {
            Ok(t) => t,
            Err(e) => return reply.error(e),
        };
        if start > end {
            return reply.error(Errno::EINVAL);
        }
        let set = {
            let c = self.client.clone();
            move || c.set(ino, LockKind::Posix, owner, t, start, end, pid)
        };
        let finish = move |reply: ReplyEmpty| {
            if t.is_none() {
                return reply.ok();
            }
            match granted() {
                Ok(()) => reply.ok(),
                Err(e) => {
                    // The lock stays: unlocking the range could drop a lock the owner held
                    // there before (an upgrade), and exclusion matters more than a lock
                    // held until the owner unlocks or closes. Asked again, it is granted
                    // at once and the file read again.
                    tracing::warn!(
                        ino,
                        "a lock was granted but the file could not be read again: {e:?}; \
                         the lock stays held"
                    );
                    reply.error(e)
                }
            }
        };
        match set() {
            Ok(()) => return finish(reply),
            Err(m::Errno::AGAIN) if sleep && t.is_some() => {}
            Err(e) => return reply.error(errno(e)),
        }
        if self.waiters.fetch_add(1, Ordering::SeqCst) >= MAX_WAITERS {
            self.waiters.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("{MAX_WAITERS} lock requests already waiting: ENOLCK");
            return reply.error(Errno::ENOLCK);
        }
        let stop = self.stop.clone();
        let waiters = self.waiters.clone();
        let spawned = std::thread::Builder::new()
            .name("hi-lock-wait".into())
            .spawn(move || {
                let r = wait(set, tid, &stop);
                waiters.fetch_sub(1, Ordering::SeqCst);
                match r {
                    Ok(()) => finish(reply),
                    Err(e) => reply.error(e),
                }
            });
        if let Err(e) = spawned {
            self.waiters.fetch_sub(1, Ordering::SeqCst);
            // The reply moved into the closure that failed to start: the kernel gets its
            // answer when the closure (and the reply in it) drops, which fuser makes EIO.
            tracing::warn!("cannot start a lock waiter: {e}");
        }
    }

    /// `owner` closed `ino` (FLUSH: its POSIX locks go; RELEASE with
    /// `FUSE_RELEASE_FLOCK_UNLOCK`: the open file description's flock locks go). Free when
    /// the owner holds no lock here.
    pub fn close_owner(&self, ino: u64, owner: u64) {
        if let Err(e) = self.client.release_owner(ino, owner) {
            tracing::warn!(
                ino,
                "releasing locks at close: {e} (the lease will drop them)"
            );
        }
    }
}

/// Retry `set` until it grants, fails otherwise, the thread `tid` has a signal to take
/// (EINTR), or the mount stops (EINTR).
fn wait(set: impl Fn() -> Result<(), m::Errno>, tid: u32, stop: &AtomicBool) -> Result<(), Errno> {
    let mut pause = WAIT_FIRST;
    loop {
        if stop.load(Ordering::SeqCst) || interrupted(tid) {
            return Err(Errno::EINTR);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(WAIT_MAX);
        match set() {
            Ok(()) => return Ok(()),
            Err(m::Errno::AGAIN) => {}
            Err(e) => return Err(errno(e)),
        }
    }
}

/// Does thread `tid` have a signal pending that it does not block (or is it gone)? Read
/// from `/proc/<tid>/status` (`SigPnd` | `ShdPnd`, less `SigBlk`).
fn interrupted(tid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{tid}/status")) {
        Ok(s) => pending_unblocked(&s),
        Err(_) => true,
    }
}

fn pending_unblocked(status: &str) -> bool {
    let mask = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    (mask("SigPnd:") | mask("ShdPnd:")) & !mask("SigBlk:") != 0
}

impl Drop for Locks {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.client.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_signals() {
        let quiet = "Name:\tx\nSigPnd:\t0000000000000000\nShdPnd:\t0000000000000000\n\
                     SigBlk:\t0000000000000000\n";
        assert!(!pending_unblocked(quiet));
        // SIGKILL (9) pending for the process.
        let killed = quiet.replace("ShdPnd:\t0000000000000000", "ShdPnd:\t0000000000000100");
        assert!(pending_unblocked(&killed));
        // SIGUSR1 (10) pending but blocked.
        let blocked = quiet
            .replace("SigPnd:\t0000000000000000", "SigPnd:\t0000000000000200")
            .replace("SigBlk:\t0000000000000000", "SigBlk:\t0000000000000200");
        assert!(!pending_unblocked(&blocked));
        // Our own thread: nothing pending.
        assert!(!interrupted(std::process::id()));
        assert!(interrupted(u32::MAX), "a thread that does not exist");
        assert_eq!(lock_type(libc::F_UNLCK), Ok(None));
        assert_eq!(lock_type(libc::F_WRLCK), Ok(Some(LockType::Write)));
        assert!(lock_type(77).is_err());
    }
}
