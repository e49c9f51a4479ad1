//! The per-shard dedupe index: chunk id -> where its record lies and what state it is in.
//!
//! Owned by one shard and touched only by its thread. It lives in memory; the interface is
//! batched (`lookup_batch`) so an SSD-resident index can replace it without changing callers.
//!
//! Memory bound: an entry is the 33-byte id plus a 56-byte [`IndexEntry`] in a hashbrown
//! table: a 96-byte slot (the pair is padded to the entry's 8-byte alignment) and 1 control
//! byte, at a load factor between 7/16 (just after growing) and 7/8. That is 111 bytes per
//! chunk at a full table and 222 just after growth (`claimed_epoch` added 8 bytes per slot:
//! about 9 to 18 bytes per chunk). At the default 64 KiB average chunk, one TiB of unique
//! data is 16.8 M chunks: 1.7 to 3.5 GiB of index per TiB stored.
//!
//! Invariants:
//! - only entries in state [`EntryState::Verified`] answer `has` or count as stored;
//! - `Pending` entries belong to a commit batch not yet durable; their `batch` names it;
//! - `live_bytes(s)` is the sum of `record_span(stored_len)` over every entry (pending or
//!   verified) whose location is in segment `s`: the bytes of segment `s` compaction must
//!   copy before the segment can be freed. It is kept by `insert` and `remove` alone, so no
//!   caller can forget it (one table per segment: 8 bytes each).

use crate::format::record_span;
use hivefs_net::chunk::{ChunkId, Codec};
use std::collections::HashMap;

/// Where a chunk's record lies in the shard's log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub segment: u32,
    /// Offset of the record header from the segment start.
    pub offset: u32,
    pub stored_len: u32,
    pub raw_len: u32,
    pub codec: Codec,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryState {
    /// Verified against its id and buffered for commit batch `batch`; not yet durable.
    Pending { batch: u64 },
    /// Durable on the device and verified: may answer `has`.
    Verified,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub loc: Location,
    pub state: EntryState,
    /// Sequence number of the record that created this entry.
    pub seq: u64,
    /// Copies this chunk must have (the highest any referencing volume asks for).
    pub replication_level: u8,
    /// GC epoch of the latest claim of this chunk (its put, a duplicate put, a `has` hit);
    /// 0 = replayed at open and not claimed since (the shard reads it as the first epoch
    /// it heard after opening). Kept by compaction copies.
    pub claimed_epoch: u64,
}

#[derive(Default)]
pub struct Index {
    map: HashMap<ChunkId, IndexEntry>,
    verified_chunks: u64,
    verified_raw_bytes: u64,
    verified_stored_bytes: u64,
    /// Live record bytes per segment (see the module invariants).
    segment_live_bytes: Vec<u64>,
}

impl Index {
    /// An empty index of a shard with `segments` segments.
    pub fn new(segments: u32) -> Index {
        Index {
            segment_live_bytes: vec![0; segments as usize],
            ..Default::default()
        }
    }

    /// Live record bytes in `segment` (0 for a segment this index does not know).
    pub fn live_bytes(&self, segment: u32) -> u64 {
        self.segment_live_bytes
            .get(segment as usize)
            .copied()
            .unwrap_or(0)
    }

    /// Live record bytes in all segments.
    pub fn live_bytes_total(&self) -> u64 {
        self.segment_live_bytes.iter().sum()
    }

    pub fn get(&self, id: &ChunkId) -> Option<&IndexEntry> {
        self.map.get(id)
    }

    /// For each id, whether it is verified (answers `has`).
    pub fn lookup_batch(&self, ids: &[ChunkId], out: &mut Vec<Option<IndexEntry>>) {
        out.clear();
        out.extend(ids.iter().map(|id| self.map.get(id).copied()));
    }

    /// Insert or replace `id`'s entry; returns the entry replaced.
    pub fn insert(&mut self, id: ChunkId, entry: IndexEntry) -> Option<IndexEntry> {
        let old = self.map.insert(id, entry);
        if let Some(old) = &old {
            self.account(old, false);
        }
        self.account(&entry, true);
        old
    }

    pub fn remove(&mut self, id: &ChunkId) -> Option<IndexEntry> {
        let old = self.map.remove(id)?;
        self.account(&old, false);
        Some(old)
    }

    /// A claim of `id` in GC epoch `epoch`: its `claimed_epoch` becomes at least `epoch`
    /// (epochs only advance; a late claim stamped with an older epoch never moves it back).
    /// Returns whether `id` has an entry.
    pub fn claim(&mut self, id: &ChunkId, epoch: u64) -> bool {
        match self.map.get_mut(id) {
            Some(e) => {
                e.claimed_epoch = e.claimed_epoch.max(epoch);
                true
            }
            None => false,
        }
    }

    /// Mark the entry created by record `seq` durable and verified. A later record for the
    /// same id (a tombstone, or a re-put) wins: then nothing changes.
    pub fn mark_verified(&mut self, id: &ChunkId, seq: u64) -> bool {
        let Some(e) = self.map.get_mut(id) else {
            return false;
        };
        if e.seq != seq || e.state == EntryState::Verified {
            return false;
        }
        e.state = EntryState::Verified;
        let e = *e;
        self.account_verified(&e, true);
        true
    }

    fn account(&mut self, e: &IndexEntry, add: bool) {
        if let Some(live) = self.segment_live_bytes.get_mut(e.loc.segment as usize) {
            let span = record_span(e.loc.stored_len as usize) as u64;
            if add {
                *live += span;
            } else {
                debug_assert!(*live >= span, "segment live bytes underflow");
                *live -= span;
            }
        }
        self.account_verified(e, add);
    }

    fn account_verified(&mut self, e: &IndexEntry, add: bool) {
        if e.state != EntryState::Verified {
            return;
        }
        if add {
            self.verified_chunks += 1;
            self.verified_raw_bytes += e.loc.raw_len as u64;
            self.verified_stored_bytes += e.loc.stored_len as u64;
        } else {
            self.verified_chunks -= 1;
            self.verified_raw_bytes -= e.loc.raw_len as u64;
            self.verified_stored_bytes -= e.loc.stored_len as u64;
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn verified_chunks(&self) -> u64 {
        self.verified_chunks
    }

    pub fn verified_raw_bytes(&self) -> u64 {
        self.verified_raw_bytes
    }

    pub fn verified_stored_bytes(&self) -> u64 {
        self.verified_stored_bytes
    }

    pub fn iter(&self) -> impl Iterator<Item = (&ChunkId, &IndexEntry)> {
        self.map.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn loc(n: u32) -> Location {
        Location {
            segment: n,
            offset: n * 8,
            stored_len: n,
            raw_len: 2 * n,
            codec: Codec::Raw,
        }
    }

    /// The per-entry size the module's memory bound states.
    #[test]
    fn entry_size_is_what_the_memory_bound_says() {
        assert_eq!(std::mem::size_of::<IndexEntry>(), 56);
        assert_eq!(std::mem::size_of::<(ChunkId, IndexEntry)>(), 96);
    }

    #[test]
    fn claims_only_move_forward() {
        let mut idx = Index::new(4);
        let id = ChunkId([7; 33]);
        assert!(!idx.claim(&id, 3), "no entry, nothing claimed");
        idx.insert(
            id,
            IndexEntry {
                loc: loc(1),
                state: EntryState::Verified,
                seq: 1,
                replication_level: 1,
                claimed_epoch: 0,
            },
        );
        assert!(idx.claim(&id, 3));
        assert_eq!(idx.get(&id).unwrap().claimed_epoch, 3);
        idx.claim(&id, 2);
        assert_eq!(
            idx.get(&id).unwrap().claimed_epoch,
            3,
            "an older claim never wins"
        );
        idx.claim(&id, 5);
        assert_eq!(idx.get(&id).unwrap().claimed_epoch, 5);
    }

    /// The index against a BTreeMap model under random operations.
    #[test]
    fn matches_a_model() {
        let mut idx = Index::new(1001);
        let mut model: BTreeMap<u8, (u32, bool, u64)> = BTreeMap::new();
        let mut x = 0x9e3779b97f4a7c15u64;
        for seq in 1..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let k = (x % 64) as u8;
            let mut id = ChunkId([0; 33]);
            id.0[1] = k;
            match (x >> 8) % 3 {
                0 => {
                    let n = (x >> 16) as u32 % 1000 + 1;
                    idx.insert(
                        id,
                        IndexEntry {
                            loc: loc(n),
                            state: EntryState::Pending { batch: 1 },
                            seq,
                            replication_level: 1,
                            claimed_epoch: seq,
                        },
                    );
                    model.insert(k, (n, false, seq));
                }
                1 => {
                    let v = model.get(&k).map(|m| m.2);
                    let s = if (x >> 20).is_multiple_of(2) {
                        v.unwrap_or(0)
                    } else {
                        seq
                    };
                    let changed = idx.mark_verified(&id, s);
                    let expect = matches!(model.get(&k), Some((_, false, ms)) if *ms == s);
                    assert_eq!(changed, expect);
                    if expect {
                        model.get_mut(&k).unwrap().1 = true;
                    }
                }
                _ => {
                    assert_eq!(idx.remove(&id).is_some(), model.remove(&k).is_some());
                }
            }
            let vc = model.values().filter(|m| m.1).count() as u64;
            let vr: u64 = model.values().filter(|m| m.1).map(|m| 2 * m.0 as u64).sum();
            assert_eq!(idx.verified_chunks(), vc);
            assert_eq!(idx.verified_raw_bytes(), vr);
            assert_eq!(idx.len(), model.len());
            let live: u64 = model
                .values()
                .filter(|m| m.0 == 7)
                .map(|m| record_span(m.0 as usize) as u64)
                .sum();
            assert_eq!(idx.live_bytes(7), live, "per-segment live bytes");
        }
    }
}
