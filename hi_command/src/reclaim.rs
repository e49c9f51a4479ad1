//! Reclaiming inodes that lost their last name, off the FUSE threads.
//!
//! An unlinked inode is reclaimed (`Mutation::Reclaim`: its record and extents go) once
//! the kernel forgets it. Sent inline, that was a second metadata write (a Raft append
//! and fsync) right behind every `unlink(2)`, on the FUSE thread that got the FORGET. Here
//! one thread sends them in order, so a reclaim travels while the next unlink does, and
//! Raft commits the two with one append.
//!
//! Deferring is safe: the store reclaims only an inode whose link count is 0 when the
//! reclaim applies (one linked again meanwhile is left alone), and a reclaim lost to a
//! crash leaves an orphan record, as a crash between unlink and FORGET always could.
//! [`Reclaimer::shutdown`] (at unmount) sends everything queued before it returns.

use crate::writeback::Hive;
use hivefs_net::meta::Mutation;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

pub struct Reclaimer {
    queue: Mutex<Option<mpsc::Sender<u64>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Reclaimer {
    pub fn new(hive: Arc<Hive>) -> std::io::Result<Reclaimer> {
        let (tx, rx) = mpsc::channel::<u64>();
        let thread = std::thread::Builder::new()
            .name("hi-reclaim".into())
            .spawn(move || {
                for ino in rx {
                    if let Err(e) = hive.mutate(Mutation::Reclaim { ino }) {
                        tracing::warn!(ino, "reclaim: {e:?}");
                    }
                }
            })?;
        Ok(Reclaimer {
            queue: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Reclaim `ino` soon (after every reclaim queued before it).
    pub fn reclaim(&self, ino: u64) {
        let queue = self.queue.lock().expect("reclaim queue");
        match queue.as_ref().map(|q| q.send(ino)) {
            Some(Ok(())) => {}
            _ => tracing::warn!(ino, "reclaim after shutdown: left as an orphan"),
        }
    }

    /// Send everything queued, then stop.
    pub fn shutdown(&self) {
        drop(self.queue.lock().expect("reclaim queue").take());
        if let Some(t) = self.thread.lock().expect("reclaim thread").take() {
            let _ = t.join();
        }
    }
}
