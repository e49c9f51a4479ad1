//! The Raft log and vote of the metadata service, in the segment log of [`super::wal`]
//! (directory `raft-log/`), in openraft's types.
//!
//! Every entry, the vote and the last purged log id are stored as an envelope: a format
//! byte, the CRC32C of the payload, then the payload in postcard (see [`encode`]). A value
//! that fails any check (length, format, checksum, decoding, trailing bytes, index not
//! matching its place) is reported as corrupt, naming the log. Allocation stays bounded:
//! the checksum is verified before decoding, and postcard decodes from the stored bytes,
//! so a bad length prefix fails at their end (serde caps what it pre-allocates for a
//! claimed length at 1 MiB). `LogStore::open` checks the whole log. A log kept by an older
//! build (one redb file, `raft-log.redb`, the same envelopes) is carried over at open.
//!
//! Durability: every write (vote, append, truncate, purge) is on disk when the call
//! returns (one record or state slot written and fdatasynced). The methods are blocking;
//! [`LogStore`] runs them inline on the Raft runtime's worker (see [`LogStore::blocking`]
//! for why) and implements openraft's [`RaftLogStorage`], which calls them one at a time
//! from Raft's core task, so write I/O is serialized as openraft requires.

use super::raft::TypeConfig;
use super::wal::{self, Wal, WalState};
use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    AnyError, Entry, LogId, LogState, RaftLogReader, StorageError, StorageIOError, Vote,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Format byte of every stored value (bump it when the encoding changes).
const FORMAT: u8 = 1;
/// Format byte + CRC32C.
const HEADER: usize = 5;

/// Encodes `value` in the envelope used for everything Raft stores: `[FORMAT][crc32c LE]`
/// then postcard.
///
/// Postcard (serde, compact, no_std-grade and actively maintained) rather than serde_json:
/// log entries carry opaque command bytes, which JSON would spell as arrays of numbers;
/// and decoding postcard from a slice never allocates more than the slice can hold.
pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Cannot fail for Raft's types: no sequence or map of unknown length, no custom errors.
    let payload = postcard::to_allocvec(value).expect("postcard encodes Raft's types");
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.push(FORMAT);
    out.extend_from_slice(&crc_fast::crc32_iscsi(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Decodes an envelope written by [`encode`]; the error says what is wrong, without context.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    if bytes.len() < HEADER {
        return Err(format!("{} bytes, shorter than the header", bytes.len()));
    }
    if bytes[0] != FORMAT {
        return Err(format!("unknown format byte {}", bytes[0]));
    }
    let (crc, payload) = bytes[1..].split_at(4);
    let want = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
    let got = crc_fast::crc32_iscsi(payload);
    if want != got {
        return Err(format!(
            "checksum mismatch (stored {want:#010x}, computed {got:#010x})"
        ));
    }
    match postcard::take_from_bytes::<T>(payload) {
        Ok((value, [])) => Ok(value),
        Ok((_, rest)) => Err(format!("{} trailing bytes", rest.len())),
        Err(e) => Err(format!("undecodable: {e}")),
    }
}

type Sto = StorageError<u64>;

/// A failure of the log file, its message naming the file. Kept small (openraft's
/// `StorageError` is large); it becomes one at the `RaftLogStorage` boundary.
#[derive(Debug)]
pub(crate) struct LogError {
    write: bool,
    msg: String,
}

impl std::fmt::Display for LogError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.msg)
    }
}

impl From<LogError> for Sto {
    fn from(e: LogError) -> Sto {
        let source = AnyError::error(e.msg);
        if e.write {
            StorageIOError::write_logs(source).into()
        } else {
            StorageIOError::read_logs(source).into()
        }
    }
}

/// The log directory ([`Wal`]) and its path (for messages), speaking openraft's types.
pub(crate) struct LogDb {
    wal: Wal,
    path: PathBuf,
}

impl LogDb {
    fn err(&self, write: bool, what: impl std::fmt::Display) -> LogError {
        let msg = format!("raft log {}: {what}", self.path.display());
        LogError { write, msg }
    }

    fn err_read(&self, what: impl std::fmt::Display) -> LogError {
        self.err(false, what)
    }

    fn err_write(&self, what: impl std::fmt::Display) -> LogError {
        self.err(true, what)
    }

    fn corrupt(&self, what: impl std::fmt::Display, e: String) -> LogError {
        self.err_read(format_args!("corrupt {what}: {e}"))
    }

    fn decode_entry(&self, index: u64, bytes: &[u8]) -> Result<Entry<TypeConfig>, LogError> {
        let entry: Entry<TypeConfig> = decode(bytes)
            .map_err(|e| self.corrupt(format_args!("log entry at index {index}"), e))?;
        if entry.log_id.index != index {
            return Err(self.corrupt(
                format_args!("log entry at index {index}"),
                format!("it says index {}", entry.log_id.index),
            ));
        }
        Ok(entry)
    }

    fn read_vote(&self) -> Result<Option<Vote<u64>>, LogError> {
        match self.wal.state().vote {
            Some(b) => decode(&b).map(Some).map_err(|e| self.corrupt("vote", e)),
            None => Ok(None),
        }
    }

    fn save_vote(&self, vote: &Vote<u64>) -> Result<(), LogError> {
        self.wal
            .save_vote(encode(vote))
            .map_err(|e| self.err_write(e))
    }

    fn last_purged(&self) -> Result<Option<LogId<u64>>, LogError> {
        match self.wal.state().purged {
            Some((index, b)) => {
                let id: LogId<u64> = decode(&b).map_err(|e| self.corrupt("purge record", e))?;
                if id.index != index {
                    let e = format!("it says index {}, recorded as {index}", id.index);
                    return Err(self.corrupt("purge record", e));
                }
                Ok(Some(id))
            }
            None => Ok(None),
        }
    }

    pub(crate) fn log_state(&self) -> Result<LogState<TypeConfig>, LogError> {
        let last_purged = self.last_purged()?;
        let last = match self.wal.last_index() {
            Some(i) => self
                .entries((Bound::Included(i), Bound::Included(i)))?
                .pop(),
            None => None,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last.map(|e| e.log_id).or(last_purged),
        })
    }

    /// Decodes every entry (checksums, format, index): the segment records were checked
    /// when the log was opened, this checks that this build reads what they hold. With
    /// log compaction the log holds about [`super::raft::SNAPSHOT_EVERY`] +
    /// [`super::raft::KEEP_LOGS_AFTER_SNAPSHOT`] entries, so this is quick.
    fn verify(&self) -> Result<(), LogError> {
        self.last_purged()?;
        let Some(last) = self.wal.last_index() else {
            return Ok(());
        };
        let mut from = 0;
        while from <= last {
            let to = from.saturating_add(1024).min(last + 1);
            let got = self.wal.read(from, to).map_err(|e| self.err_read(e))?;
            for (index, bytes) in &got {
                self.decode_entry(*index, bytes)?;
            }
            from = got.last().map_or(to, |(i, _)| i + 1).max(to);
        }
        Ok(())
    }

    pub(crate) fn entries(
        &self,
        range: (Bound<u64>, Bound<u64>),
    ) -> Result<Vec<Entry<TypeConfig>>, LogError> {
        let from = match range.0 {
            Bound::Included(i) => i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let to = match range.1 {
            Bound::Included(i) => i.saturating_add(1),
            Bound::Excluded(i) => i,
            Bound::Unbounded => u64::MAX,
        };
        let got = self.wal.read(from, to).map_err(|e| self.err_read(e))?;
        got.iter()
            .map(|(index, bytes)| self.decode_entry(*index, bytes))
            .collect()
    }

    fn append(&self, entries: &[Entry<TypeConfig>]) -> Result<(), LogError> {
        let Some(first) = entries.first().map(|e| e.log_id.index) else {
            return Ok(());
        };
        if let Some((i, e)) = entries
            .iter()
            .enumerate()
            .find(|(i, e)| e.log_id.index != first + *i as u64)
        {
            let what = format!(
                "entry {i} of an append from {first} has index {}",
                e.log_id.index
            );
            return Err(self.err_write(what));
        }
        let encoded: Vec<Vec<u8>> = entries.iter().map(encode).collect();
        let refs: Vec<&[u8]> = encoded.iter().map(|e| &e[..]).collect();
        self.wal.append(first, &refs).map_err(|e| self.err_write(e))
    }

    /// Deletes the entries at `since` and after.
    fn truncate(&self, since: u64) -> Result<(), LogError> {
        self.wal.truncate(since).map_err(|e| self.err_write(e))
    }

    /// Deletes the entries up to `log_id` included and records it as the last purged one.
    fn purge(&self, log_id: &LogId<u64>) -> Result<(), LogError> {
        self.wal
            .purge(log_id.index, encode(log_id))
            .map_err(|e| self.err_write(e))
    }
}

/// Reads a log kept by builds before the segment log (one redb file, `raft-log.redb`) as
/// the state and entries a new log starts from. The stored values are the same envelopes.
fn read_legacy(file: &Path, node_id: u64) -> Result<wal::Seed, String> {
    use redb::{Database, ReadableTable, TableDefinition};
    const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
    const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
    let name = file.display();
    let e = |e: &dyn std::fmt::Display| format!("raft log {name} (before migrating): {e}");
    let db = Database::open(file).map_err(|x| e(&x))?;
    let txn = db.begin_read().map_err(|x| e(&x))?;
    let meta = txn.open_table(META).map_err(|x| e(&x))?;
    let get = |key: &str| -> Result<Option<Vec<u8>>, String> {
        Ok(meta
            .get(key)
            .map_err(|x| e(&x))?
            .map(|v| v.value().to_vec()))
    };
    let owner: u64 = match get("node_id")? {
        Some(b) => decode(&b).map_err(|x| e(&x))?,
        None => return Err(e(&"no node id recorded")),
    };
    if owner != node_id {
        return Err(format!(
            "raft log {name} belongs to node {owner}, not to node {node_id}"
        ));
    }
    let purged = match get("last_purged")? {
        Some(b) => {
            let id: LogId<u64> = decode(&b).map_err(|x| e(&x))?;
            Some((id.index, b))
        }
        None => None,
    };
    let vote = get("vote")?;
    let mut entries = Vec::new();
    for item in txn
        .open_table(LOG)
        .map_err(|x| e(&x))?
        .iter()
        .map_err(|x| e(&x))?
    {
        let (k, v) = item.map_err(|x| e(&x))?;
        entries.push((k.value(), v.value().to_vec()));
    }
    Ok((
        WalState {
            node_id,
            vote,
            purged,
        },
        entries,
    ))
}

/// openraft's log store (and log reader) over one [`LogDb`]; cheap to clone.
#[derive(Clone)]
pub(crate) struct LogStore {
    db: Arc<LogDb>,
}

impl LogStore {
    /// Opens (or creates) the log directory `dir` for node `node_id`. Blocking. A log that
    /// belongs to another node id is refused: a Raft log must never change hands. A log
    /// kept by an older build in `dir` + `.redb` is carried over, then removed.
    pub(crate) fn open(dir: &Path, node_id: u64) -> Result<LogStore, String> {
        Self::open_with(dir, node_id, wal::SEGMENT_BYTES)
    }

    pub(crate) fn open_with(
        dir: &Path,
        node_id: u64,
        segment_bytes: u64,
    ) -> Result<LogStore, String> {
        let legacy = dir.with_extension("redb");
        let migrate = if !dir.exists() && legacy.exists() {
            Some(read_legacy(&legacy, node_id)?)
        } else {
            None
        };
        let migrated = migrate.as_ref().map(|(_, e)| e.len());
        let log = LogDb {
            wal: Wal::open(dir, node_id, segment_bytes, migrate)?,
            path: dir.to_path_buf(),
        };
        // Check everything now, so that a corrupt file fails `open` with a message naming
        // it rather than later inside Raft.
        log.read_vote().map_err(|e| e.to_string())?;
        log.verify().map_err(|e| e.to_string())?;
        if legacy.exists() {
            // The new log is whole (made under another name, renamed into place) and reads
            // back: the old file is no longer needed. (One that did not read back is kept.)
            std::fs::remove_file(&legacy)
                .map_err(|e| format!("raft log {}: cannot remove: {e}", legacy.display()))?;
            if let Some(n) = migrated {
                tracing::info!(from = %legacy.display(), to = %dir.display(), entries = n,
                    "raft log carried over to the segment log");
            }
        }
        Ok(LogStore { db: Arc::new(log) })
    }

    /// Runs `f` right here, on the Raft runtime's own worker thread.
    ///
    /// Not on tokio's blocking pool, deliberately: a metadata commit is a few page writes
    /// and one fdatasync (~0.1-0.3 ms here), and handing it to a pool thread and back cost
    /// more than that: two thread wakeups per call, which on this 2-core VM made context
    /// switching the largest item in the node's profile during creates (22% of its CPU in
    /// `finish_task_switch` alone). The worker is dedicated to Raft (see
    /// [`super::raft::MetaRaft`]), so blocking it only delays Raft's own next step, which
    /// waits for this write anyway; writes that arrive meanwhile queue in openraft's channel
    /// and go out together in the next append (group commit is kept).
    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&LogDb) -> Result<R, LogError> + Send + 'static,
    ) -> Result<R, LogError> {
        f(&self.db)
    }
}

fn owned_range<RB: RangeBounds<u64>>(range: &RB) -> (Bound<u64>, Bound<u64>) {
    (range.start_bound().cloned(), range.end_bound().cloned())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, Sto> {
        let range = owned_range(&range);
        Ok(self.blocking(move |db| db.entries(range)).await?)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, Sto> {
        Ok(self.blocking(|db| db.log_state()).await?)
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), Sto> {
        let vote = *vote;
        Ok(self.blocking(move |db| db.save_vote(&vote)).await?)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, Sto> {
        Ok(self.blocking(|db| db.read_vote()).await?)
    }

    /// Commits the entries durably, then reports them flushed: the callback runs only after
    /// the redb commit returned, and `append` returns after that (so they are readable too).
    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), Sto>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        let res = self.blocking(move |db| db.append(&entries)).await;
        match &res {
            Ok(()) => callback.log_io_completed(Ok(())),
            Err(e) => callback.log_io_completed(Err(std::io::Error::other(e.to_string()))),
        }
        Ok(res?)
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), Sto> {
        Ok(self.blocking(move |db| db.truncate(log_id.index)).await?)
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), Sto> {
        Ok(self.blocking(move |db| db.purge(&log_id)).await?)
    }
}

#[cfg(test)]
impl LogStore {
    /// The blocking view, for tests that look at the file directly.
    pub(crate) fn db(&self) -> &LogDb {
        &self.db
    }
}

#[cfg(test)]
impl LogDb {
    /// Segment file, offset and length of the entry at `index` (tests damage it there).
    pub(crate) fn location(&self, index: u64) -> Option<(PathBuf, u64, u32)> {
        self.wal.location(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};
    use redb::{Database, TableDefinition};

    fn blank(index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(2, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    /// A log as builds before the segment log kept it: one redb file, same envelopes.
    fn legacy_file(path: &Path, node: u64, purged: u64, last: u64) {
        const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
        const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
        let db = Database::create(path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut meta = txn.open_table(META).unwrap();
            meta.insert("node_id", encode(&node).as_slice()).unwrap();
            meta.insert("vote", encode(&Vote::new(2, 1u64)).as_slice())
                .unwrap();
            let id = LogId::new(CommittedLeaderId::new(2, 1u64), purged);
            meta.insert("last_purged", encode(&id).as_slice()).unwrap();
            let mut log = txn.open_table(LOG).unwrap();
            for i in purged + 1..=last {
                log.insert(i, encode(&blank(i)).as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();
    }

    #[test]
    fn a_log_kept_by_an_older_build_is_carried_over() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("raft-log");
        let legacy = tmp.path().join("raft-log.redb");
        legacy_file(&legacy, 1, 10, 2500);
        // Another node's file is refused and left alone.
        let err = LogStore::open_with(&dir, 2, 8 << 10).err().unwrap();
        assert!(err.contains("belongs to node 1, not to node 2"), "{err}");
        assert!(legacy.exists() && !dir.exists());
        // Small segments: the carried-over entries span several.
        let log = LogStore::open_with(&dir, 1, 8 << 10).unwrap();
        assert!(
            !legacy.exists(),
            "the old file is removed once the new log is whole"
        );
        let db = log.db();
        assert_eq!(db.read_vote().unwrap(), Some(Vote::new(2, 1)));
        let state = db.log_state().unwrap();
        assert_eq!(state.last_purged_log_id.unwrap().index, 10);
        assert_eq!(state.last_log_id.unwrap().index, 2500);
        let all = db.entries((Bound::Unbounded, Bound::Unbounded)).unwrap();
        let idx: Vec<u64> = all.iter().map(|e| e.log_id.index).collect();
        assert_eq!(idx, (11..=2500).collect::<Vec<_>>());
        assert!(
            std::fs::read_dir(&dir).unwrap().count() > 2,
            "several segments"
        );
        drop(log);
        // It opens again as a segment log, and goes on.
        let log = LogStore::open_with(&dir, 1, 8 << 10).unwrap();
        log.db().append(&[blank(2501)]).unwrap();
        assert_eq!(
            log.db().log_state().unwrap().last_log_id.unwrap().index,
            2501
        );
        drop(log);

        // An old log with a damaged entry: the new log does not read back, open fails
        // naming it, and the old file is kept.
        let dir = tmp.path().join("raft-log-2");
        let legacy = tmp.path().join("raft-log-2.redb");
        legacy_file(&legacy, 1, 0, 20);
        {
            const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
            let db = Database::open(&legacy).unwrap();
            let txn = db.begin_write().unwrap();
            let mut bytes = encode(&blank(7));
            let at = bytes.len() - 1;
            bytes[at] ^= 0x20;
            txn.open_table(LOG)
                .unwrap()
                .insert(7, bytes.as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        let err = LogStore::open_with(&dir, 1, 8 << 10).err().unwrap();
        assert!(err.contains("corrupt log entry at index 7"), "{err}");
        assert!(
            legacy.exists(),
            "the old file is kept when the new log does not read back"
        );
    }
}
