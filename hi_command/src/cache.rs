//! The chunk cache: verified chunk plaintext by id, bounded in bytes, least recently used
//! out first, in memory; behind it, with a client disk, the disk's cache region
//! (`localdisk/src/cache.rs`: survives remounts; a disk hit comes back into memory).
//! Content-addressed, so an entry is never stale: a chunk id names the same bytes forever.

use hivefs_net::chunk::ChunkId;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

struct Inner {
    map: HashMap<ChunkId, (Arc<Vec<u8>>, u64)>,
    /// Use tick -> id: the smallest tick is the least recently used.
    order: BTreeMap<u64, ChunkId>,
    bytes: usize,
    tick: u64,
    hits: u64,
    misses: u64,
}

pub struct ChunkCache {
    cap: usize,
    inner: Mutex<Inner>,
    disk: Option<hivefs_localdisk::DiskCache>,
}

impl ChunkCache {
    pub fn new(cap_bytes: usize) -> ChunkCache {
        Self::with_disk(cap_bytes, None)
    }

    /// A cache of `cap_bytes` in memory over the cache region of a client disk.
    pub fn with_disk(cap_bytes: usize, disk: Option<hivefs_localdisk::DiskCache>) -> ChunkCache {
        ChunkCache {
            disk,
            cap: cap_bytes,
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                order: BTreeMap::new(),
                bytes: 0,
                tick: 0,
                hits: 0,
                misses: 0,
            }),
        }
    }

    pub fn get(&self, id: &ChunkId) -> Option<Arc<Vec<u8>>> {
        let mut g = self.inner.lock().expect("cache lock");
        g.tick += 1;
        let tick = g.tick;
        let Some((data, old)) = g
            .map
            .get_mut(id)
            .map(|(d, t)| (d.clone(), std::mem::replace(t, tick)))
        else {
            drop(g);
            // The disk's copy (checked there), back into memory for the next read.
            if let Some(d) = self.disk.as_ref().and_then(|d| d.get(&id.0)) {
                let d = Arc::new(d);
                self.insert_memory(*id, d.clone());
                self.inner.lock().expect("cache lock").hits += 1;
                return Some(d);
            }
            self.inner.lock().expect("cache lock").misses += 1;
            return None;
        };
        g.order.remove(&old);
        g.order.insert(tick, *id);
        g.hits += 1;
        Some(data)
    }

    /// Whether `id` is in memory (a disk-cached chunk is worth reading ahead into it).
    pub fn in_memory(&self, id: &ChunkId) -> bool {
        self.inner.lock().expect("cache lock").map.contains_key(id)
    }

    /// Whether `id` is cached, without counting a hit or a miss or refreshing it.
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.inner.lock().expect("cache lock").map.contains_key(id)
            || self.disk.as_ref().is_some_and(|d| d.contains(&id.0))
    }

    /// Keep `data` (verified plaintext of `id`) in memory and on the client disk.
    pub fn insert(&self, id: ChunkId, data: Arc<Vec<u8>>) {
        if let Some(d) = &self.disk {
            if let Err(e) = d.insert(&id.0, &data) {
                tracing::warn!("client disk cache: {e}");
            }
        }
        self.insert_memory(id, data);
    }

    fn insert_memory(&self, id: ChunkId, data: Arc<Vec<u8>>) {
        if data.len() > self.cap {
            return;
        }
        let mut g = self.inner.lock().expect("cache lock");
        g.tick += 1;
        let tick = g.tick;
        let len = data.len();
        if let Some((old, t)) = g.map.insert(id, (data, tick)) {
            g.order.remove(&t);
            g.bytes -= old.len();
        }
        g.order.insert(tick, id);
        g.bytes += len;
        while g.bytes > self.cap {
            let Some((_, victim)) = g.order.pop_first() else {
                break;
            };
            if let Some((d, _)) = g.map.remove(&victim) {
                g.bytes -= d.len();
            }
        }
    }

    /// (entries, bytes, hits, misses)
    pub fn stats(&self) -> (usize, usize, u64, u64) {
        let g = self.inner.lock().expect("cache lock");
        (g.map.len(), g.bytes, g.hits, g.misses)
    }

    /// The client disk's cache figures, if the mount has one.
    pub fn disk_stats(&self) -> Option<hivefs_localdisk::CacheStats> {
        self.disk.as_ref().map(|d| d.stats())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hivefs_net::chunk::CHUNK_ID_BYTES;

    #[test]
    fn evicts_least_recently_used_within_the_byte_bound() {
        let c = ChunkCache::new(300);
        let id = |b: u8| ChunkId([b; CHUNK_ID_BYTES]);
        for b in 0..3 {
            c.insert(id(b), Arc::new(vec![b; 100]));
        }
        assert!(c.get(&id(0)).is_some()); // 0 is now the most recent
        c.insert(id(3), Arc::new(vec![3; 100]));
        assert!(c.get(&id(1)).is_none(), "1 was least recently used");
        assert!(c.get(&id(0)).is_some() && c.get(&id(2)).is_some() && c.get(&id(3)).is_some());
        assert_eq!(c.stats().1, 300);
        c.insert(id(9), Arc::new(vec![0; 301]));
        assert!(c.get(&id(9)).is_none(), "larger than the cache: not kept");
    }
}
