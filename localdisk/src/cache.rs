//! The chunk cache region of a client disk: verified chunk plaintext by chunk id, so reads
//! of data seen before stay local across remounts. Content-addressed: an id names the same
//! bytes forever, so an entry is never stale; it can only be gone (overwritten) or damaged
//! (caught by its CRC).
//!
//! # Layout
//! A circular log of entries, each starting on a 4 KiB block of the region:
//! ```text
//! magic u32 | raw length u32 | lsn u64 | chunk id [33] | 0 [11] | payload CRC32C u32 |
//! header CRC32C u32 (of the 60 bytes before it)                  = 64 bytes
//! payload (the chunk's plaintext), then zeros to the next block
//! ```
//! `lsn` is the entry's position counted from the first write ever (its block is
//! `lsn % region`), so an entry of an earlier lap is never taken for the one now there.
//!
//! # Eviction
//! New entries go at the tail and overwrite the oldest (CLOCK): a read marks its entry
//! *referenced* (in memory only); when an insert would overwrite a referenced entry, that
//! entry is copied forward to the tail first, unmarked (at most [`SECOND_CHANCES`] per
//! insert). So what is read again stays, and only inserts write: a read never does.
//!
//! # Recovery
//! [`DiskCache::open`] scans the region's block headers and indexes every valid entry
//! (the newest where an id appears twice); the tail goes after the newest entry. Nothing
//! of it needs flushing: a torn or lost entry is a miss.
//!
//! # Invariants
//! - A hit returns exactly the bytes inserted under that id (header id and lsn match the
//!   index, and the payload's CRC holds), else it is a miss and the entry is forgotten.
//! - An entry's bytes are never overwritten while the index points at them: the index
//!   drops every entry a new write covers before the write.
//! - Lengths are bounded ([`MAX_ENTRY`], the region) before anything is allocated.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

pub const ENTRY_MAGIC: u32 = 0x4843_4331; // "HCC1"
pub const ENTRY_HEADER: usize = 64;
/// Largest chunk kept (the chunker's maximum is 256 KiB).
pub const MAX_ENTRY: usize = 1 << 20;
const BLOCK: u64 = 4096;
/// Referenced entries copied forward, at most, before one insert.
pub const SECOND_CHANCES: usize = 4;
/// Bytes the recovery scan reads at once.
const SCAN_WINDOW: u64 = 4 << 20;

/// A chunk id as bytes (version byte + BLAKE3-256).
pub type Key = [u8; 33];

#[derive(Clone, Copy, Debug)]
struct Slot {
    lsn: u64,
    len: u32,
    /// Read since it was written: copied forward instead of overwritten.
    referenced: bool,
}

#[derive(Default)]
struct State {
    index: HashMap<Key, Slot>,
    /// lsn -> id of every indexed entry, for eviction in log order.
    order: BTreeMap<u64, Key>,
    tail: u64,
    bytes: u64,
    hits: u64,
    misses: u64,
    inserts: u64,
    damaged: u64,
}

/// Figures for `hi cache status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub entries: u64,
    /// Plaintext bytes held.
    pub bytes: u64,
    pub capacity: u64,
    pub hits: u64,
    pub misses: u64,
    pub inserts: u64,
    /// Entries found damaged at a read (and dropped).
    pub damaged: u64,
}

/// The cache region of an open client disk. See the module docs.
pub struct DiskCache {
    file: File,
    base: u64,
    len: u64,
    st: Mutex<State>,
}

fn align_up(v: u64) -> u64 {
    v.div_ceil(BLOCK) * BLOCK
}

fn entry_size(len: usize) -> u64 {
    align_up((ENTRY_HEADER + len) as u64)
}

fn header(id: &Key, lsn: u64, data: &[u8]) -> [u8; ENTRY_HEADER] {
    let mut h = [0u8; ENTRY_HEADER];
    h[..4].copy_from_slice(&ENTRY_MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&(data.len() as u32).to_le_bytes());
    h[8..16].copy_from_slice(&lsn.to_le_bytes());
    h[16..49].copy_from_slice(id);
    h[56..60].copy_from_slice(&crc_fast::crc32_iscsi(data).to_le_bytes());
    let hcrc = crc_fast::crc32_iscsi(&h[..60]);
    h[60..64].copy_from_slice(&hcrc.to_le_bytes());
    h
}

/// `(id, raw length, lsn, payload CRC)` of a valid header.
fn parse(h: &[u8]) -> Option<(Key, u32, u64, u32)> {
    let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4"));
    if u32_at(0) != ENTRY_MAGIC || crc_fast::crc32_iscsi(&h[..60]) != u32_at(60) {
        return None;
    }
    let len = u32_at(4);
    if len as usize > MAX_ENTRY {
        return None;
    }
    let lsn = u64::from_le_bytes(h[8..16].try_into().expect("8"));
    Some((h[16..49].try_into().expect("33"), len, lsn, u32_at(56)))
}

impl DiskCache {
    /// The cache in `[base, base + len)` of `file` (opened read-write), indexed by a scan.
    pub fn open(file: File, base: u64, len: u64) -> std::io::Result<DiskCache> {
        let len = len / BLOCK * BLOCK;
        let c = DiskCache {
            file,
            base,
            len,
            st: Mutex::new(State::default()),
        };
        if len >= entry_size(MAX_ENTRY) * 2 {
            c.scan()?;
        }
        Ok(c)
    }

    fn scan(&self) -> std::io::Result<()> {
        let mut found: Vec<(u64, Key, u32)> = Vec::new();
        let mut buf = vec![0u8; SCAN_WINDOW as usize];
        let mut at = 0;
        while at < self.len {
            let n = SCAN_WINDOW.min(self.len - at) as usize;
            self.file.read_exact_at(&mut buf[..n], self.base + at)?;
            for b in (0..n).step_by(BLOCK as usize) {
                let pos = at + b as u64;
                if let Some((id, rlen, lsn, _)) = parse(&buf[b..b + ENTRY_HEADER]) {
                    if lsn % self.len == pos && pos + entry_size(rlen as usize) <= self.len {
                        found.push((lsn, id, rlen));
                    }
                }
            }
            at += n as u64;
        }
        let tail = found
            .iter()
            .map(|(lsn, _, l)| lsn + entry_size(*l as usize))
            .max()
            .unwrap_or(0);
        found.sort_unstable_by_key(|f| f.0);
        let mut st = self.st.lock().expect("cache lock");
        st.tail = tail;
        for (lsn, id, rlen) in found {
            // Only what the last lap left whole (older entries were partly written over).
            if lsn + self.len < tail {
                continue;
            }
            let slot = Slot {
                lsn,
                len: rlen,
                referenced: false,
            };
            if let Some(old) = st.index.insert(id, slot) {
                st.order.remove(&old.lsn);
                st.bytes -= old.len as u64;
            }
            st.order.insert(lsn, id);
            st.bytes += rlen as u64;
        }
        Ok(())
    }

    /// Whether `id` is held (no read, no count).
    pub fn contains(&self, id: &Key) -> bool {
        self.st.lock().expect("cache lock").index.contains_key(id)
    }

    /// The bytes cached under `id`, checked; `None` if not held or damaged.
    pub fn get(&self, id: &Key) -> Option<Vec<u8>> {
        let slot = {
            let mut st = self.st.lock().expect("cache lock");
            match st.index.get(id).copied() {
                Some(s) => s,
                None => {
                    st.misses += 1;
                    return None;
                }
            }
        };
        let read = self.read_entry(id, slot);
        let mut st = self.st.lock().expect("cache lock");
        let Some(data) = read else {
            // Overwritten meanwhile (then the index moved on already), or damaged.
            if st.index.get(id).is_some_and(|s| s.lsn == slot.lsn) {
                st.damaged += 1;
                st.index.remove(id);
                st.order.remove(&slot.lsn);
                st.bytes -= slot.len as u64;
            }
            st.misses += 1;
            return None;
        };
        st.hits += 1;
        if let Some(s) = st.index.get_mut(id).filter(|s| s.lsn == slot.lsn) {
            s.referenced = true;
        }
        Some(data)
    }

    /// The checked bytes of the entry `slot` says `id` is at; `None` if it is not there
    /// (overwritten) or damaged.
    fn read_entry(&self, id: &Key, slot: Slot) -> Option<Vec<u8>> {
        let size = entry_size(slot.len as usize) as usize;
        let mut buf = vec![0u8; size];
        self.file
            .read_exact_at(&mut buf, self.base + slot.lsn % self.len)
            .ok()?;
        let (hid, l, lsn, crc) = parse(&buf[..ENTRY_HEADER])?;
        let end = ENTRY_HEADER + l as usize;
        if hid != *id
            || l != slot.len
            || lsn != slot.lsn
            || crc_fast::crc32_iscsi(&buf[ENTRY_HEADER..end]) != crc
        {
            return None;
        }
        buf.truncate(end);
        Some(buf.split_off(ENTRY_HEADER))
    }

    /// Keep `data` under `id` (its verified plaintext). Errors are the caller's to log: a
    /// cache that cannot write is only slower.
    pub fn insert(&self, id: &Key, data: &[u8]) -> std::io::Result<()> {
        if data.len() > MAX_ENTRY || entry_size(data.len()) * 2 > self.len {
            return Ok(());
        }
        let mut st = self.st.lock().expect("cache lock");
        if st.index.contains_key(id) {
            return Ok(());
        }
        self.put(&mut st, id, data)
    }

    /// Where an entry of `size` bytes goes: the tail, or the next lap's start.
    fn place(&self, tail: u64, size: u64) -> u64 {
        if tail % self.len + size > self.len {
            tail + self.len - tail % self.len
        } else {
            tail
        }
    }

    /// Insert, first copying forward the referenced entries it would overwrite.
    fn put(&self, st: &mut State, id: &Key, data: &[u8]) -> std::io::Result<()> {
        let size = entry_size(data.len());
        for _ in 0..SECOND_CHANCES {
            let lsn = self.place(st.tail, size);
            let Some((&old, &victim)) = st.order.first_key_value() else {
                break;
            };
            let slot = st.index[&victim];
            if old + self.len >= lsn + size || !slot.referenced {
                break;
            }
            match self.read_entry(&victim, slot) {
                Some(bytes) => self.put_at_tail(st, &victim, &bytes)?,
                None => {
                    st.index.remove(&victim);
                    st.order.remove(&old);
                    st.bytes -= slot.len as u64;
                    st.damaged += 1;
                }
            }
        }
        self.put_at_tail(st, id, data)
    }

    fn put_at_tail(&self, st: &mut State, id: &Key, data: &[u8]) -> std::io::Result<()> {
        let size = entry_size(data.len());
        let lsn = self.place(st.tail, size);
        // Forget every entry the write covers, before writing.
        while let Some((&old, _)) = st.order.first_key_value() {
            if old + self.len >= lsn + size {
                break;
            }
            let victim = st.order.remove(&old).expect("first");
            if let Some(s) = st.index.remove(&victim) {
                st.bytes -= s.len as u64;
            }
        }
        if let Some(s) = st.index.remove(id) {
            st.order.remove(&s.lsn);
            st.bytes -= s.len as u64;
        }
        let mut buf = vec![0u8; size as usize];
        buf[..ENTRY_HEADER].copy_from_slice(&header(id, lsn, data));
        buf[ENTRY_HEADER..ENTRY_HEADER + data.len()].copy_from_slice(data);
        st.tail = lsn + size;
        self.file.write_all_at(&buf, self.base + lsn % self.len)?;
        st.index.insert(
            *id,
            Slot {
                lsn,
                len: data.len() as u32,
                referenced: false,
            },
        );
        st.order.insert(lsn, *id);
        st.bytes += data.len() as u64;
        st.inserts += 1;
        Ok(())
    }

    pub fn stats(&self) -> CacheStats {
        let st = self.st.lock().expect("cache lock");
        CacheStats {
            entries: st.index.len() as u64,
            bytes: st.bytes,
            capacity: self.len,
            hits: st.hits,
            misses: st.misses,
            inserts: st.inserts,
            damaged: st.damaged,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hivefs_nvme::rng::SplitMix64;

    fn key(n: u64) -> Key {
        let mut k = [0u8; 33];
        k[1..9].copy_from_slice(&n.to_le_bytes());
        k
    }

    fn data(n: u64, len: usize) -> Vec<u8> {
        (0..len).map(|i| (n as usize * 7 + i * 13) as u8).collect()
    }

    fn temp(size: u64) -> (std::path::PathBuf, File) {
        let p =
            std::env::temp_dir().join(format!("hivefs-cache-test-{}-{size}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(size + 8192).unwrap();
        (p, f)
    }

    /// CLOCK: an entry read since it was written is copied forward, not overwritten; one
    /// never read is overwritten.
    #[test]
    fn a_read_entry_outlives_a_lap_and_an_unread_one_does_not() {
        let len = 4 << 20;
        let (path, f) = temp(len + 1);
        let c = DiskCache::open(f, 8192, len).unwrap();
        c.insert(&key(1), &data(1, 50_000)).unwrap();
        c.insert(&key(2), &data(2, 50_000)).unwrap();
        assert_eq!(c.get(&key(1)).unwrap(), data(1, 50_000));
        // About one lap (4 MiB of 60 KiB entries), so each old entry is met once.
        for n in 10..80 {
            c.insert(&key(n), &data(n, 60_000)).unwrap();
        }
        assert_eq!(
            c.get(&key(1)).unwrap(),
            data(1, 50_000),
            "read entry evicted"
        );
        assert!(c.get(&key(2)).is_none(), "unread entry kept over a lap");
        let _ = std::fs::remove_file(&path);
    }

    /// Random inserts and gets against a model: a hit is always the inserted bytes; what
    /// was read recently is kept; after a reopen the same holds, and damage is a miss.
    #[test]
    fn hits_are_exact_across_wraps_reopens_and_damage() {
        let len = 8 << 20;
        let (path, f) = temp(len);
        let mut c = DiskCache::open(f, 8192, len).unwrap();
        let mut rng = SplitMix64::new(3);
        let mut sizes: HashMap<u64, usize> = HashMap::new();
        let (mut hits, mut gets) = (0u64, 0u64);
        for step in 0..6000u64 {
            let n = rng.below(400);
            if rng.below(3) == 0 {
                let len = sizes
                    .entry(n)
                    .or_insert_with(|| 1 + rng.below(70_000) as usize);
                c.insert(&key(n), &data(n, *len)).unwrap();
            } else if let Some(&len) = sizes.get(&n) {
                gets += 1;
                if let Some(got) = c.get(&key(n)) {
                    assert_eq!(got, data(n, len), "step {step}: wrong bytes for {n}");
                    hits += 1;
                }
            }
            if step % 1500 == 1499 {
                // Remount: the index comes back from the region.
                let before = c.stats();
                drop(c);
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .unwrap();
                c = DiskCache::open(f, 8192, len).unwrap();
                let after = c.stats();
                assert_eq!(after.entries, before.entries, "entries lost by a reopen");
                assert_eq!(after.bytes, before.bytes);
            }
        }
        let st = c.stats();
        assert!(st.bytes <= len, "{st:?}");
        assert!(hits > gets / 4, "{hits} hits of {gets} gets");
        // A flipped byte in an entry's payload: a miss, never wrong bytes.
        let (n, _) = sizes.iter().find(|(n, _)| c.contains(&key(**n))).unwrap();
        let slot = c.st.lock().unwrap().index[&key(*n)];
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let at = 8192 + slot.lsn % len + ENTRY_HEADER as u64 + 1;
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[!b[0]], at).unwrap();
        assert!(c.get(&key(*n)).is_none());
        assert_eq!(c.stats().damaged, 1);
        eprintln!("cache: {gets} gets, {hits} hits, {st:?}");
        let _ = std::fs::remove_file(&path);
    }
}
