//! This node's copy of the hive's placement map, shared by its metadata service (which
//! writes it) and its shard threads (which read it on every put).
//!
//! The map lives in metadata group 0 (the `nodes` table, one epoch per change). Every
//! node applies the same Raft log, so every node can build the map from its own store:
//! the metadata service does so once a second (`meta/health.rs`) and publishes it here.
//! A shard reads the version counter each loop turn and takes the new map only when it
//! moved: no lock on the data path.
//!
//! Invariant: the published epoch never goes down (an older map is ignored).

use hivefs_net::placement::HiveMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// See the module docs.
#[derive(Debug)]
pub struct MapCell {
    map: RwLock<Arc<HiveMap>>,
    /// Raised on every publish; 0 = nothing published yet.
    version: AtomicU64,
}

impl MapCell {
    /// An empty map (no nodes) of `bucket_count` buckets, epoch 0.
    pub fn new(bucket_count: u32) -> MapCell {
        MapCell {
            map: RwLock::new(Arc::new(HiveMap {
                epoch: 0,
                bucket_count,
                nodes: Vec::new(),
            })),
            version: AtomicU64::new(0),
        }
    }

    /// The current map.
    pub fn get(&self) -> Arc<HiveMap> {
        self.map.read().expect("map lock").clone()
    }

    /// Bumped by every publish: compare to the last value seen before calling [`get`](Self::get).
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Publish `map` if it is newer than the current one. Returns whether it was.
    pub fn publish(&self, map: HiveMap) -> bool {
        let mut g = self.map.write().expect("map lock");
        if map.epoch <= g.epoch && self.version.load(Ordering::Relaxed) > 0 {
            return false;
        }
        *g = Arc::new(map);
        self.version.fetch_add(1, Ordering::Release);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_newer_maps_are_published() {
        let c = MapCell::new(16);
        assert_eq!(c.version(), 0);
        let m = |epoch| HiveMap {
            epoch,
            bucket_count: 16,
            nodes: Vec::new(),
        };
        assert!(c.publish(m(3)));
        assert_eq!(c.version(), 1);
        assert!(!c.publish(m(3)));
        assert!(!c.publish(m(2)));
        assert!(c.publish(m(4)));
        assert_eq!((c.version(), c.get().epoch), (2, 4));
    }
}
