//! The metadata store as the simulators run it: a real [`MetaStore`] on an in-memory redb
//! disk ([`MemDisk`]) that keeps, besides its bytes, the image as of its last sync, and a
//! one-member Raft log in front of it ([`SimMeta`]). A *store crash* drops the store,
//! reopens it on that image (losing every batch committed with `Durability::None` since
//! the last durable one) and lets the log apply again, in batches of random size, every
//! entry after the `raft_state` the store kept, as `MetaRaft` does. Commands reach the
//! store only as encoded [`MetaCommand`]s through [`MetaStore::apply_batch`].
//!
//! Checked on every application (exactly once): an entry applied again answers exactly as
//! it did the first time; a repeat of a `(client, seq)` answers its first answer (or
//! `ESTALE` below the client's floor) without applying again.
//!
//! Used by the GC simulator (`gc_sim.rs`) and the client-disk simulator
//! (`localdisk/tests/client_sim.rs`).

use crate::meta::store::MetaStore;
use crate::sim::Rng;
use hivefs_net::meta::{self, Answer, Errno, MetaCommand, MetaReply, Mutation, Timespec};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Debug, Default)]
pub struct DiskState {
    /// The bytes as written.
    pub current: Vec<u8>,
    /// The bytes as of the last sync: what survives a crash.
    pub durable: Vec<u8>,
}

/// An in-memory redb disk that can crash: writes since the last `sync_data` are lost.
#[derive(Debug, Clone, Default)]
pub struct MemDisk(pub Arc<Mutex<DiskState>>);

impl redb::StorageBackend for MemDisk {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.0.lock().expect("disk").current.len() as u64)
    }
    fn read(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let d = self.0.lock().expect("disk");
        let at = offset as usize;
        match d.current.get(at..at + len) {
            Some(b) => Ok(b.to_vec()),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "read past the end of the simulated disk",
            )),
        }
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.lock().expect("disk").current.resize(len as usize, 0);
        Ok(())
    }
    fn sync_data(&self, _eventual: bool) -> std::io::Result<()> {
        let mut d = self.0.lock().expect("disk");
        let DiskState {
            current, durable, ..
        } = &mut *d;
        durable.clone_from(current);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut d = self.0.lock().expect("disk");
        let at = offset as usize;
        if d.current.len() < at + data.len() {
            d.current.resize(at + data.len(), 0);
        }
        d.current[at..at + data.len()].copy_from_slice(data);
        Ok(())
    }
}

/// The store and the Raft log in front of it (one member: an entry is committed when it is
/// appended; the log itself is durable).
pub struct SimMeta {
    pub store: Option<MetaStore>,
    pub disk: MemDisk,
    /// Committed entries (`None`: an entry with nothing to apply, e.g. a leader's blank).
    pub log: Vec<Option<Vec<u8>>>,
    /// The answer each entry got when first applied.
    pub replies: Vec<Option<Vec<u8>>>,
    /// Entries applied in the store's current state (its `raft_state`).
    pub applied: usize,
    /// Entries applied again (after a crash lost them).
    pub replayed: u64,
    /// Per client: the highest `acked_below` applied (the store's session floor).
    pub floors: HashMap<u64, u64>,
    /// First answer of each `(client, seq)`.
    pub first_reply: HashMap<(u64, u64), Vec<u8>>,
}

impl SimMeta {
    /// An empty store with an empty log.
    pub fn new() -> Result<SimMeta, String> {
        let disk = MemDisk::default();
        let store = MetaStore::open_backend(disk.clone()).map_err(|e| format!("{e:#}"))?;
        Ok(SimMeta {
            store: Some(store),
            disk,
            log: Vec::new(),
            replies: Vec::new(),
            applied: 0,
            replayed: 0,
            floors: HashMap::new(),
            first_reply: HashMap::new(),
        })
    }

    /// Create volume `name` (copies 1) as `client`'s first mutation; its id.
    pub fn create_volume(&mut self, client: u64, name: &str, rng: &mut Rng) -> Result<u32, String> {
        let create = MetaCommand {
            volume: 0,
            client,
            seq: 1,
            acked_below: 1,
            now: Timespec { sec: 1, nsec: 0 },
            op: Mutation::CreateVolume {
                name: name.into(),
                copies: 1,
            },
        };
        let r = self.propose(Some(meta::encode(&create)), rng)?;
        match meta::decode::<MetaReply>(&r) {
            Ok(Ok(Answer::Volume(v))) => Ok(v.id),
            other => Err(format!("create volume: {other:?}")),
        }
    }

    /// The read barrier, then [`MetaStore::check`]: `Err` describes what it found.
    pub fn check(&mut self, rng: &mut Rng) -> Result<(), String> {
        self.barrier(rng)?;
        let findings = self.store().check().map_err(|e| format!("check: {e:#}"))?;
        if findings.is_empty() {
            Ok(())
        } else {
            Err(format!("namespace check: {findings:#?}"))
        }
    }

    pub fn store(&self) -> &MetaStore {
        self.store.as_ref().expect("store open")
    }

    /// Apply the log up to `upto` entries, in batches of random size.
    pub fn apply_upto(&mut self, upto: usize, rng: &mut Rng) -> Result<(), String> {
        while self.applied < upto {
            let n = (1 + rng.below(8) as usize).min(upto - self.applied);
            let from = self.applied;
            let cmds: Vec<Option<&[u8]>> = self.log[from..from + n]
                .iter()
                .map(|e| e.as_deref())
                .collect();
            let state = ((from + n) as u64).to_le_bytes();
            let out = self
                .store()
                .apply_batch(&cmds, &state)
                .map_err(|e| format!("apply_batch: {e:#}"))?;
            for (k, reply) in out.into_iter().enumerate() {
                let i = from + k;
                if let Some(first) = &self.replies[i] {
                    self.replayed += 1;
                    if *first != reply {
                        return Err(format!(
                            "log entry {i} answered {:?} when applied again, {:?} the first time",
                            meta::decode::<MetaReply>(&reply),
                            meta::decode::<MetaReply>(first)
                        ));
                    }
                    continue;
                }
                if let Some(bytes) = &self.log[i] {
                    let cmd: MetaCommand = meta::decode(bytes).map_err(|e| e.to_string())?;
                    let floor = self.floors.entry(cmd.client).or_insert(0);
                    let expected = if cmd.seq < *floor {
                        Some(meta::encode(&MetaReply::Err(Errno::STALE)))
                    } else {
                        self.first_reply.get(&(cmd.client, cmd.seq)).cloned()
                    };
                    if let Some(want) = expected {
                        if want != reply {
                            return Err(format!(
                                "a repeat of (client {}, seq {}) (floor {floor}) answered {:?}, \
                                 not {:?}: applied twice",
                                cmd.client,
                                cmd.seq,
                                meta::decode::<MetaReply>(&reply),
                                meta::decode::<MetaReply>(&want)
                            ));
                        }
                    } else {
                        self.first_reply
                            .insert((cmd.client, cmd.seq), reply.clone());
                    }
                    *floor = (*floor).max(cmd.acked_below);
                }
                self.replies[i] = Some(reply);
            }
            self.applied += n;
        }
        Ok(())
    }

    /// Append a command to the log, apply everything up to it, return its answer.
    pub fn propose(&mut self, entry: Option<Vec<u8>>, rng: &mut Rng) -> Result<Vec<u8>, String> {
        self.log.push(entry);
        self.replies.push(None);
        self.apply_upto(self.log.len(), rng)?;
        Ok(self.replies.last().cloned().flatten().unwrap_or_default())
    }

    /// The read barrier: every committed entry applied.
    pub fn barrier(&mut self, rng: &mut Rng) -> Result<(), String> {
        self.apply_upto(self.log.len(), rng)
    }

    /// Crash: lose every commit since the last sync, reopen, learn where the log stands.
    pub fn crash(&mut self) -> Result<u64, String> {
        let image = self.disk.0.lock().expect("disk").durable.clone();
        // Dropping the database writes to the old disk, which is gone with it.
        drop(self.store.take());
        self.disk = MemDisk(Arc::new(Mutex::new(DiskState {
            current: image.clone(),
            durable: image,
        })));
        let store = MetaStore::open_backend(self.disk.clone())
            .map_err(|e| format!("reopening the store after a crash: {e:#}"))?;
        let applied = match store.raft_state().map_err(|e| e.to_string())? {
            Some(b) if b.len() == 8 => u64::from_le_bytes(b.try_into().expect("8")) as usize,
            None => 0,
            Some(b) => return Err(format!("raft state of {} bytes", b.len())),
        };
        if applied > self.applied {
            return Err(format!(
                "the store kept {applied} entries after a crash, but only {} were applied",
                self.applied
            ));
        }
        let lost = self.applied - applied;
        self.applied = applied;
        self.store = Some(store);
        Ok(lost as u64)
    }
}
