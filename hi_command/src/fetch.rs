//! Chunk fetching for reads: the chunk cache in front of the hive, a chunk fetched once
//! however many readers want it at the same time, and read-ahead in the background.
//!
//! # Invariants
//! - A chunk id is *in flight* from when one caller (a reader or a read-ahead thread)
//!   starts fetching it until its bytes are in the cache or the fetch failed; others
//!   wanting it wait for that instead of fetching it again.
//! - Read-ahead never fails a read: a chunk it could not fetch is fetched again by the
//!   reader that needs it, and a missing chunk only becomes an error there.
//! - No file lock is held here: readers plan under the file's lock, then fetch without it.

use crate::cache::ChunkCache;
use crate::writeback::Hive;
use fuser::Errno;
use hivefs_net::chunk::ChunkId;
use std::collections::{HashMap, HashSet};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Threads fetching ahead of sequential readers.
const READ_AHEAD_THREADS: usize = 2;
/// Chunks per read-ahead fetch (one batched get; about 8 MiB at the default chunk size).
const READ_AHEAD_BATCH: usize = 128;
/// How long a reader waits for someone else's fetch before fetching the chunk itself.
const WAIT_FOR_OTHERS: Duration = Duration::from_secs(10);

/// A chunk's verified plaintext, shared with the cache.
type Plain = Arc<Vec<u8>>;

struct Inflight {
    ids: Mutex<HashSet<ChunkId>>,
    landed: Condvar,
}

pub struct Fetcher {
    hive: Arc<Hive>,
    inflight: Arc<Inflight>,
    ahead: Mutex<Option<mpsc::SyncSender<Vec<ChunkId>>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Fetcher {
    pub fn new(hive: Arc<Hive>) -> std::io::Result<Fetcher> {
        let inflight = Arc::new(Inflight {
            ids: Mutex::new(HashSet::new()),
            landed: Condvar::new(),
        });
        // A few batches queued at most: a reader that outruns read-ahead fetches itself.
        let (tx, rx) = mpsc::sync_channel::<Vec<ChunkId>>(4);
        let rx = Arc::new(Mutex::new(rx));
        let mut threads = Vec::new();
        for i in 0..READ_AHEAD_THREADS {
            let (hive, inflight, rx) = (hive.clone(), inflight.clone(), rx.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("hi-readahead-{i}"))
                    .spawn(move || loop {
                        let next = rx.lock().expect("read-ahead queue").recv();
                        let Ok(ids) = next else { return };
                        let mine = claim(&inflight, &hive.cache, ids);
                        if !mine.is_empty() {
                            if let Err(e) = fetch_into_cache(&hive, &inflight, &mine) {
                                tracing::debug!("read-ahead of {} chunks: {e:?}", mine.len());
                            }
                        }
                    })?,
            );
        }
        Ok(Fetcher {
            hive,
            inflight,
            ahead: Mutex::new(Some(tx)),
            threads: Mutex::new(threads),
        })
    }

    /// The verified plaintext of `ids`: from the cache, from a fetch in flight, or fetched
    /// now in one batch. A chunk the hive does not have is EIO.
    pub fn get(&self, ids: &[ChunkId]) -> Result<HashMap<ChunkId, Arc<Vec<u8>>>, Errno> {
        let mut have = HashMap::with_capacity(ids.len());
        let mut others = Vec::new();
        let mut mine = Vec::new();
        // The cache first (a disk-cache read may take a while: not under the lock).
        let mut missing = Vec::new();
        for id in ids {
            if have.contains_key(id) || missing.contains(id) {
                continue;
            }
            match self.hive.cache.get(id) {
                Some(d) => {
                    have.insert(*id, d);
                }
                None => missing.push(*id),
            }
        }
        {
            let mut inflight = self.inflight.ids.lock().expect("inflight lock");
            for id in &missing {
                // Landed meanwhile (a read-ahead)?
                if let Some(d) = self
                    .hive
                    .cache
                    .in_memory(id)
                    .then(|| self.hive.cache.get(id))
                    .flatten()
                {
                    have.insert(*id, d);
                } else if inflight.contains(id) {
                    others.push(*id);
                } else {
                    inflight.insert(*id);
                    mine.push(*id);
                }
            }
        }
        if !mine.is_empty() {
            for (id, d) in fetch_into_cache(&self.hive, &self.inflight, &mine)? {
                match d {
                    Some(d) => {
                        have.insert(id, d);
                    }
                    None => {
                        tracing::error!("chunk {id} is missing from the hive");
                        return Err(Errno::EIO);
                    }
                }
            }
        }
        if !others.is_empty() {
            // Wait for the other fetches; whatever did not land is fetched here.
            let deadline = std::time::Instant::now() + WAIT_FOR_OTHERS;
            let mut inflight = self.inflight.ids.lock().expect("inflight lock");
            while others.iter().any(|id| inflight.contains(id)) {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                inflight = self
                    .inflight
                    .landed
                    .wait_timeout(inflight, left)
                    .expect("inflight lock")
                    .0;
            }
            drop(inflight);
            let mut again = Vec::new();
            for id in others {
                match self.hive.cache.get(&id) {
                    Some(d) => {
                        have.insert(id, d);
                    }
                    None => again.push(id),
                }
            }
            if !again.is_empty() {
                let got = self.hive.get_chunks(&again)?;
                for (id, d) in again.into_iter().zip(got) {
                    let d = Arc::new(d.ok_or_else(|| {
                        tracing::error!("chunk {id} is missing from the hive");
                        Errno::EIO
                    })?);
                    self.hive.cache.insert(id, d.clone());
                    have.insert(id, d);
                }
            }
        }
        Ok(have)
    }

    /// Fetch `ids` into the cache in the background (those not cached or in flight yet),
    /// in batches. Never waits: when the read-ahead queue is full, the rest is skipped.
    pub fn read_ahead(&self, ids: Vec<ChunkId>) {
        let ids: Vec<ChunkId> = {
            let inflight = self.inflight.ids.lock().expect("inflight lock");
            ids.into_iter()
                .filter(|id| !inflight.contains(id) && !self.hive.cache.in_memory(id))
                .collect()
        };
        let guard = self.ahead.lock().expect("read-ahead queue");
        let Some(tx) = guard.as_ref() else { return };
        for batch in ids.chunks(READ_AHEAD_BATCH) {
            if tx.try_send(batch.to_vec()).is_err() {
                break;
            }
        }
    }

    /// Stop the read-ahead threads.
    pub fn shutdown(&self) {
        drop(self.ahead.lock().expect("read-ahead queue").take());
        for t in self.threads.lock().expect("threads lock").drain(..) {
            let _ = t.join();
        }
    }
}

/// Of `ids`, mark those neither in memory nor in flight as in flight, and return them.
fn claim(inflight: &Inflight, cache: &ChunkCache, ids: Vec<ChunkId>) -> Vec<ChunkId> {
    let mut set = inflight.ids.lock().expect("inflight lock");
    ids.into_iter()
        .filter(|id| !cache.in_memory(id) && set.insert(*id))
        .collect()
}

/// Fetch chunks this caller marked in flight, put them in the cache, and unmark them
/// (also on failure) so waiters go on.
fn fetch_into_cache(
    hive: &Hive,
    inflight: &Inflight,
    ids: &[ChunkId],
) -> Result<Vec<(ChunkId, Option<Plain>)>, Errno> {
    // The client disk's cache first (into memory), the hive for the rest.
    let mut out: Vec<(ChunkId, Option<Plain>)> = Vec::with_capacity(ids.len());
    let mut remote = Vec::new();
    for id in ids {
        match hive
            .cache
            .contains(id)
            .then(|| hive.cache.get(id))
            .flatten()
        {
            Some(d) => out.push((*id, Some(d))),
            None => remote.push(*id),
        }
    }
    let got = if remote.is_empty() {
        Ok(Vec::new())
    } else {
        hive.get_chunks(&remote)
    };
    let out = got.map(|got| {
        out.extend(remote.iter().zip(got).map(|(id, d)| {
            let d = d.map(Arc::new);
            if let Some(d) = &d {
                hive.cache.insert(*id, d.clone());
            }
            (*id, d)
        }));
        out
    });
    let mut set = inflight.ids.lock().expect("inflight lock");
    for id in ids {
        set.remove(id);
    }
    inflight.landed.notify_all();
    out
}
