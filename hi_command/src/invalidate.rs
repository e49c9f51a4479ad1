//! Pushed invalidations: a thread that follows the hive's watch stream for this mount's
//! volume (`MetaClient::watch`) and tells the kernel to drop what other mounts changed:
//! `inval_entry(parent, name)` for names (a renamed, removed or newly created name, also
//! a negative entry) and `inval_inode(ino, 0, 0)` for inodes (attributes and cached pages).
//!
//! This is what lets `fs.rs` hand the kernel long TTLs: a change made through another
//! mount reaches this kernel within a round trip or so, not after the TTL. The TTL stays
//! the bound where the push cannot help:
//! - events lost (the hive dropped them for a slow watcher, or the stream broke and was
//!   re-established, or the hive restarted): this mount cannot know what changed, so it
//!   logs it and relies on the TTL;
//! - a lookup or getattr already on its way when the invalidation arrives may put the old
//!   answer back in the cache (the kernel guards attributes against this with its
//!   attribute version, not names).
//!
//! Open files: extents are reloaded at open, and the kernel's page cache of a file is
//! dropped at open (no `FOPEN_KEEP_CACHE`) (close-to-open). A file open here that another
//! mount changes is also marked stale (`OpenFile::stale`, through [`StaleFn`]): its next
//! read or write here loads the committed extents again, and its attributes show the
//! hive's size, so a reader keeping it open (`tail -f`) sees other hosts' commits.
//!
//! The kernel answers ENOENT for what it does not hold; fuser drops that, and any other
//! error is only logged (an invalidation that fails leaves the TTL bound).
//! The answers an offline mount serves (`offline.rs`) are forgotten with the same events.
//!
//! `HIVE_HI_NO_WATCH=1` turns the thread off (tests prove with it that they can fail).

use crate::hints::Hints;
use crate::leases::Leases;
use crate::offline::Offline;
use fuser::{INodeNo, Notifier};
use hivefs_client::meta::{MetaClient, Watched};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Marks a file open on this mount as changed by another mount (`None`: every open
/// file, when invalidations were lost). `fs.rs` `HiveFs::stale_marker`.
pub type StaleFn = Box<dyn Fn(Option<u64>) + Send>;

/// The running invalidation thread; [`Invalidator::stop`] ends it (at unmount).
pub struct Invalidator {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Invalidator {
    /// Follow `volume`'s watch stream and invalidate through `notifier`; `None` when
    /// turned off by `HIVE_HI_NO_WATCH=1` (or the thread cannot start).
    ///
    /// `hints` (hints.rs) forget every invalidated inode before the kernel does, so what the
    /// kernel asks after its invalidation reaches the hive.
    pub fn start(
        meta: &MetaClient,
        volume: u32,
        notifier: Notifier,
        hints: Arc<Hints>,
        leases: Arc<Leases>,
        offline: Option<Arc<Offline>>,
        stale: StaleFn,
    ) -> Option<Invalidator> {
        if std::env::var_os("HIVE_HI_NO_WATCH").is_some_and(|v| v == "1") {
            tracing::warn!("HIVE_HI_NO_WATCH=1: no pushed invalidations (other mounts' changes show after the TTL)");
            return None;
        }
        let mut watch = meta.watch(volume);
        // Registered before the mount is announced: every change answered from then on
        // reaches it. (If the hive is unreachable now, the thread keeps trying.)
        if let Err(e) = watch.connect() {
            tracing::warn!("opening the watch stream: {e} (retrying in the background)");
        }
        let stop = watch.stopper();
        let thread = std::thread::Builder::new()
            .name("hi-invalidate".into())
            .spawn(move || {
                while let Some(w) = watch.recv() {
                    match w {
                        Watched::Invalidate(inv) => {
                            for (parent, name) in &inv.entries {
                                hints.drop_entry(*parent);
                                if let Some(o) = &offline {
                                    o.forget(*parent);
                                }
                                let r =
                                    notifier.inval_entry(INodeNo(*parent), OsStr::from_bytes(name));
                                if let Err(e) = r {
                                    tracing::debug!(parent, "invalidating an entry: {e}");
                                }
                            }
                            for &ino in &inv.inodes {
                                hints.drop_inode(ino);
                                stale(Some(ino));
                                if let Some(o) = &offline {
                                    o.forget(ino);
                                }
                                if let Err(e) = notifier.inval_inode(INodeNo(ino), 0, 0) {
                                    tracing::debug!(ino, "invalidating an inode: {e}");
                                }
                            }
                        }
                        // Another host opened files whose write leases this mount
                        // holds: commit them and give the leases back (leases.rs).
                        Watched::Recall(inos) => leases.recalled(inos),
                        Watched::Lost => {
                            // Whatever changed is unknown: forget every remembered answer.
                            hints.drop_all();
                            stale(None);
                            if let Some(o) = &offline {
                                o.forget_all();
                            }
                            tracing::info!(
                                "invalidations from the hive were lost: other mounts' \
                                 changes may show only after the cache TTL"
                            )
                        }
                    }
                }
            });
        match thread {
            Ok(thread) => Some(Invalidator { stop, thread }),
            Err(e) => {
                tracing::warn!("cannot start the invalidation thread: {e}");
                None
            }
        }
    }

    /// End the thread and wait for it.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.thread.join();
    }
}
