//! The Raft log and vote of the metadata service, in one redb file (`raft-log.redb`).
//!
//! Layout: table `raft_log` maps a log index to one encoded entry; table `raft_meta` holds
//! the vote, the last purged log id and the id of the node the log belongs to. Every value
//! is an envelope: a format byte, the CRC32C of the payload, then the payload in postcard
//! (see [`encode`]). A value that fails any check (length, format, checksum, decoding,
//! trailing bytes, index not matching its key) is reported as corrupt, naming the file.
//! Allocation stays bounded: the checksum is verified before decoding, and postcard decodes
//! from the stored bytes, so a bad length prefix fails at their end (serde caps what it
//! pre-allocates for a claimed length at 1 MiB). `LogStore::open` checks the whole log.
//!
//! Durability: every write (vote, append, truncate, purge) is one redb write transaction
//! committed with [`Durability::Immediate`], i.e. on disk when the call returns. The methods
//! are blocking; [`LogStore`] runs them inline on the Raft runtime's worker (see
//! [`LogStore::blocking`] for why) and implements openraft's [`RaftLogStorage`], which calls
//! them one at a time from Raft's core task, so write I/O is serialized as openraft requires.

use super::raft::TypeConfig;
use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    AnyError, Entry, LogId, LogState, RaftLogReader, StorageError, StorageIOError, Vote,
};
use redb::{Database, Durability, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Log index -> encoded [`Entry`].
pub(crate) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
/// Raft's own small records: [`KEY_VOTE`], [`KEY_PURGED`], [`KEY_NODE`].
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const KEY_VOTE: &str = "vote";
const KEY_PURGED: &str = "last_purged";
const KEY_NODE: &str = "node_id";

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
    out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
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
    let got = crc32c::crc32c(payload);
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

/// A redb error, boxed (`redb::Error` is large); `?` converts any of redb's error types.
struct RedbError(Box<redb::Error>);

impl<E: Into<redb::Error>> From<E> for RedbError {
    fn from(e: E) -> RedbError {
        RedbError(Box::new(e.into()))
    }
}

/// The open redb file and its path (for messages).
pub(crate) struct LogDb {
    db: Database,
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

    fn get_meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, LogError> {
        let txn = self.db.begin_read().map_err(|e| self.err_read(e))?;
        let table = txn.open_table(META).map_err(|e| self.err_read(e))?;
        let Some(v) = table.get(key).map_err(|e| self.err_read(e))? else {
            return Ok(None);
        };
        decode(v.value())
            .map(Some)
            .map_err(|e| self.corrupt(format_args!("record {key:?}"), e))
    }

    /// Runs `f` in one write transaction committed with immediate durability.
    fn write(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), RedbError>,
    ) -> Result<(), LogError> {
        let mut txn = self.db.begin_write().map_err(|e| self.err_write(e))?;
        txn.set_durability(Durability::Immediate);
        f(&txn).map_err(|e| self.err_write(e.0))?;
        txn.commit().map_err(|e| self.err_write(e))
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

    /// A brand-new file.
    fn has_no_tables(&self) -> Result<bool, LogError> {
        let txn = self.db.begin_read().map_err(|e| self.err_read(e))?;
        let mut tables = txn.list_tables().map_err(|e| self.err_read(e))?;
        Ok(tables.next().is_none())
    }

    fn read_vote(&self) -> Result<Option<Vote<u64>>, LogError> {
        self.get_meta(KEY_VOTE)
    }

    fn save_vote(&self, vote: &Vote<u64>) -> Result<(), LogError> {
        let bytes = encode(vote);
        self.write(|txn| {
            txn.open_table(META)?.insert(KEY_VOTE, bytes.as_slice())?;
            Ok(())
        })
    }

    pub(crate) fn log_state(&self) -> Result<LogState<TypeConfig>, LogError> {
        let last_purged: Option<LogId<u64>> = self.get_meta(KEY_PURGED)?;
        let txn = self.db.begin_read().map_err(|e| self.err_read(e))?;
        let table = txn.open_table(LOG).map_err(|e| self.err_read(e))?;
        let last = match table.last().map_err(|e| self.err_read(e))? {
            Some((k, v)) => Some(self.decode_entry(k.value(), v.value())?.log_id),
            None => None,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last.or(last_purged),
        })
    }

    /// Decodes every entry (checksums, format, index) and checks that they follow each
    /// other without a hole, after the last purged one. One entry in memory at a time; with
    /// log compaction the log holds about [`super::raft::SNAPSHOT_EVERY`] +
    /// [`super::raft::KEEP_LOGS_AFTER_SNAPSHOT`] entries, so this is quick.
    fn verify(&self) -> Result<(), LogError> {
        let purged: Option<LogId<u64>> = self.get_meta(KEY_PURGED)?;
        let txn = self.db.begin_read().map_err(|e| self.err_read(e))?;
        let table = txn.open_table(LOG).map_err(|e| self.err_read(e))?;
        let floor = purged.map(|p| p.index);
        let mut prev: Option<u64> = None;
        for item in table.iter().map_err(|e| self.err_read(e))? {
            let (k, v) = item.map_err(|e| self.err_read(e))?;
            let index = k.value();
            self.decode_entry(index, v.value())?;
            if let Some(floor) = floor.filter(|&f| index <= f) {
                let what = format_args!("log entry at index {index}");
                return Err(self.corrupt(what, format!("at or below the purged index {floor}")));
            }
            if let Some(p) = prev.filter(|&p| index != p + 1) {
                return Err(self.corrupt("log", format!("hole between indexes {p} and {index}")));
            }
            prev = Some(index);
        }
        Ok(())
    }

    pub(crate) fn entries(
        &self,
        range: (Bound<u64>, Bound<u64>),
    ) -> Result<Vec<Entry<TypeConfig>>, LogError> {
        let txn = self.db.begin_read().map_err(|e| self.err_read(e))?;
        let table = txn.open_table(LOG).map_err(|e| self.err_read(e))?;
        let mut out = Vec::new();
        for item in table.range::<u64>(range).map_err(|e| self.err_read(e))? {
            let (k, v) = item.map_err(|e| self.err_read(e))?;
            out.push(self.decode_entry(k.value(), v.value())?);
        }
        Ok(out)
    }

    fn append(&self, entries: &[Entry<TypeConfig>]) -> Result<(), LogError> {
        let encoded: Vec<(u64, Vec<u8>)> = entries
            .iter()
            .map(|e| (e.log_id.index, encode(e)))
            .collect();
        self.write(|txn| {
            let mut table = txn.open_table(LOG)?;
            for (index, bytes) in &encoded {
                table.insert(*index, bytes.as_slice())?;
            }
            Ok(())
        })
    }

    /// Deletes the entries at `since` and after.
    fn truncate(&self, since: u64) -> Result<(), LogError> {
        self.write(|txn| {
            txn.open_table(LOG)?.retain_in(since.., |_, _| false)?;
            Ok(())
        })
    }

    /// Deletes the entries up to `log_id` included and records it as the last purged one.
    fn purge(&self, log_id: &LogId<u64>) -> Result<(), LogError> {
        let bytes = encode(log_id);
        let upto = log_id.index;
        self.write(|txn| {
            txn.open_table(META)?.insert(KEY_PURGED, bytes.as_slice())?;
            txn.open_table(LOG)?.retain_in(..=upto, |_, _| false)?;
            Ok(())
        })
    }
}

/// openraft's log store (and log reader) over one [`LogDb`]; cheap to clone.
#[derive(Clone)]
pub(crate) struct LogStore {
    db: Arc<LogDb>,
}

impl LogStore {
    /// Opens (or creates) the log file at `path` for node `node_id`. Blocking. A file that
    /// belongs to another node id is refused: a Raft log must never change hands.
    pub(crate) fn open(path: &Path, node_id: u64) -> Result<LogStore, String> {
        let name = path.display();
        let db =
            Database::create(path).map_err(|e| format!("raft log {name}: cannot open: {e}"))?;
        let log = LogDb {
            db,
            path: path.to_path_buf(),
        };
        if log.has_no_tables().map_err(|e| e.to_string())? {
            // A brand-new file: create the tables and claim it for `node_id`.
            let bytes = encode(&node_id);
            log.write(|txn| {
                txn.open_table(LOG)?;
                txn.open_table(META)?.insert(KEY_NODE, bytes.as_slice())?;
                Ok(())
            })
            .map_err(|e| e.to_string())?;
        }
        match log.get_meta::<u64>(KEY_NODE).map_err(|e| e.to_string())? {
            Some(owner) if owner == node_id => {}
            Some(owner) => {
                return Err(format!(
                    "raft log {name} belongs to node {owner}, not to node {node_id}"
                ))
            }
            None => return Err(format!("raft log {name}: no node id recorded")),
        }
        // Check everything now, so that a corrupt file fails `open` with a message naming
        // it rather than later inside Raft.
        log.read_vote().map_err(|e| e.to_string())?;
        log.verify().map_err(|e| e.to_string())?;
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
