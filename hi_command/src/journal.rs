//! The mount's side of the client disk's journal (`localdisk/src/journal.rs` holds the
//! format and recovery): a group-commit thread in front of it, and the replay at mount.
//!
//! # The life of a data record
//! 1. `write` reserves room ([`JournalService::reserve`]; waits while the journal is full,
//!    up to the mount's journal wait, then EIO), then, under the file's lock, appends the
//!    record ([`JournalService::append`]: inode, write-lease token, offset, bytes) and
//!    puts the bytes into the file's dirty map with the record's number.
//! 2. The journal thread writes everything queued as one group and flushes: the record is
//!    durable ([`JournalService::wait_durable`]: what `fsync` and `close` wait for in
//!    write-back mode).
//! 3. The flusher commits the bytes to the hive; then [`JournalService::done`] drops the
//!    record: the head moves past every record no longer needed, durably, before `done`
//!    returns. So after a commit nothing can bring the committed bytes back at a replay
//!    behind a later change (a truncation, another host's write).
//!
//! # Namespace operations (`Op` records)
//! A change the mount answers before the hive has it is journaled too, under the
//! sequence number it will be sent with (reserved now, held until the hive answers):
//! renames, removals and setattrs made offline (`offline.rs`), and in write-back mode a
//! setattr of a file whose bytes are not committed yet (`writeback.rs`, `Deferred`).
//! Its record is done once the hive has answered it. Room for one is taken without
//! waiting ([`JournalService::try_reserve_op`]): its callers may hold a file lock.
//!
//! # Replay ([`replay`])
//! At mount, the records from the durable head on are applied again in order (an `Op`
//! after every byte journaled before it, under its own sequence number: exactly once,
//! a refusal is logged as a conflict): per file, its bytes in record order (a later
//! write over the same bytes wins), committed under the write lease they were written
//! under, reclaimed by this client (the client disk's id is the same across mounts).
//! When another host was granted the file since, the
//! bytes are dropped with an error in the log (they cannot be committed without
//! overwriting what that host wrote). A file removed meanwhile drops its bytes too.
//! Committing the same bytes twice (a crash after a commit, before its head moved) writes
//! the same extents again: nothing changes.
//!
//! # Invariants
//! - A record is dropped from the journal only after its bytes are committed, or dropped
//!   for a reason logged.
//! - Records of one file are appended in the order its writes applied (under its lock).
//! - The journal thread is the only user of the device; a device error fails the journal:
//!   every later write and sync gets EIO (the bytes in memory stay and are still
//!   committed by the flusher).

use crate::writeback::Hive;
use fuser::Errno;
use hivefs_localdisk::replay::{encode_data, encode_op, plan, Step, DATA_HEADER, OP_HEADER};
use hivefs_localdisk::{Book, Journal, Record, RecordKind};
use hivefs_net::meta::Mutation;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Per record beyond its size: the bytes a group may skip before its header.
const SKIP_MARGIN: u64 = 32;

/// A journal's figures for `hi status`.
#[derive(Debug, Clone)]
pub struct JournalStatus {
    /// Records not yet committed to the hive.
    pub pending: usize,
    /// Groups and records written since the mount.
    pub groups: u64,
    pub records: u64,
    /// Bytes of the journal in use, of its capacity.
    pub used: u64,
    pub capacity: u64,
    pub failed: Option<String>,
}

/// Room reserved for one record (see [`JournalService::reserve`]).
#[must_use]
pub struct Reservation {
    bytes: u64,
}

struct St {
    /// Appended, not yet handed to the device.
    queue: Vec<(u64, RecordKind, Vec<u8>)>,
    /// Every record numbered up to here is durable.
    durable_no: u64,
    /// Which records are still needed (`localdisk/src/book.rs`).
    book: Book,
    /// Bytes reserved or queued and not yet written.
    reserved: u64,
    /// Room for records, as of the thread's last look.
    room: u64,
    /// `done` calls asked the head to move / the thread has served requests up to here.
    head_asked: u64,
    head_served: u64,
    failed: Option<String>,
    stop: bool,
    /// Counters for `hi status`.
    groups: u64,
    records: u64,
    /// Journal bytes between the durable head and the tail.
    used: u64,
    capacity: u64,
}

/// The journal thread and its queue. See the module docs.
pub struct JournalService {
    st: Mutex<St>,
    cv: Condvar,
    /// How long a writer waits for room before it gets EIO.
    wait: Duration,
    max_payload: usize,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl JournalService {
    /// Start the journal thread over a recovered journal (replayed already: its head is at
    /// its tail, or records before it are still to be done by the caller).
    pub fn start(journal: Journal, wait: Duration) -> std::io::Result<Arc<JournalService>> {
        let room = journal.free().saturating_sub(2 * journal.group_overhead());
        let svc = Arc::new(JournalService {
            st: Mutex::new(St {
                queue: Vec::new(),
                durable_no: 0,
                book: Book::new(),
                reserved: 0,
                room,
                head_asked: 0,
                head_served: 0,
                failed: None,
                stop: false,
                groups: 0,
                records: 0,
                used: journal.tail() - journal.head(),
                capacity: journal.free() + (journal.tail() - journal.head()),
            }),
            cv: Condvar::new(),
            wait,
            max_payload: journal.max_payload(),
            thread: Mutex::new(None),
        });
        let s = svc.clone();
        let t = std::thread::Builder::new()
            .name("hi-journal".into())
            .spawn(move || s.run(journal))?;
        *svc.thread.lock().expect("thread lock") = Some(t);
        Ok(svc)
    }

    fn lock(&self) -> MutexGuard<'_, St> {
        self.st.lock().expect("journal lock")
    }

    /// Room for a data record of `len` bytes: waits while the journal is full (its records
    /// are being committed), up to the mount's journal wait; then EIO. Call without any
    /// file lock held (commits free the room, and they take file locks).
    pub fn reserve(&self, len: usize) -> Result<Reservation, Errno> {
        self.reserve_payload(DATA_HEADER + len)
    }

    /// Room for a namespace operation's record whose encoding is `len` bytes, without
    /// waiting: `None` when the journal has no room now (or failed). Its callers may hold
    /// a file lock (commits free the room, and they take file locks).
    pub fn try_reserve_op(&self, len: usize) -> Option<Reservation> {
        self.reserve_within(OP_HEADER + len, Duration::ZERO).ok()
    }

    fn reserve_payload(&self, payload: usize) -> Result<Reservation, Errno> {
        self.reserve_within(payload, self.wait)
    }

    fn reserve_within(&self, payload: usize, wait: Duration) -> Result<Reservation, Errno> {
        if payload > self.max_payload {
            tracing::error!(payload, "larger than a journal record");
            return Err(Errno::EIO);
        }
        let bytes = Journal::record_size(payload) + SKIP_MARGIN;
        let deadline = Instant::now() + wait;
        let mut st = self.lock();
        loop {
            if let Some(f) = &st.failed {
                tracing::warn!("journal failed: {f}");
                return Err(Errno::EIO);
            }
            if st.reserved + bytes <= st.room {
                st.reserved += bytes;
                return Ok(Reservation { bytes });
            }
            let now = Instant::now();
            if wait.is_zero() {
                return Err(Errno::EAGAIN);
            }
            if now >= deadline {
                tracing::error!(
                    waited_s = self.wait.as_secs(),
                    "journal full: no room for a write after waiting; is the hive reachable?"
                );
                return Err(Errno::EIO);
            }
            st = self
                .cv
                .wait_timeout(st, deadline - now)
                .expect("journal lock")
                .0;
        }
    }

    /// Queue a data record under reservation `r`; returns its number. Never waits.
    pub fn append(&self, r: Reservation, ino: u64, lease: u64, off: u64, data: &[u8]) -> u64 {
        self.queue(r, RecordKind::Data, encode_data(ino, lease, off, data))
    }

    /// Give back room reserved and not used.
    pub fn cancel(&self, r: Reservation) {
        let mut st = self.lock();
        st.reserved -= r.bytes;
        self.cv.notify_all();
    }

    /// Queue a namespace operation's record (`op` encoded by the caller, applied under
    /// sequence number `seq`) under reservation `r`; returns its number. Never waits.
    pub fn append_op(&self, r: Reservation, seq: u64, op: &[u8]) -> u64 {
        self.queue(r, RecordKind::Op, encode_op(seq, op))
    }

    fn queue(&self, r: Reservation, kind: RecordKind, payload: Vec<u8>) -> u64 {
        debug_assert!(payload.len() <= self.max_payload);
        let mut st = self.lock();
        let no = st.book.add();
        st.queue.push((no, kind, payload));
        // The reservation becomes the queued record's (freed when it is written).
        let _ = r.bytes;
        self.cv.notify_all();
        no
    }

    /// Wait until record `no` (and every one before it) is durable.
    pub fn wait_durable(&self, no: u64) -> Result<(), Errno> {
        let mut st = self.lock();
        while st.durable_no < no {
            if let Some(f) = &st.failed {
                tracing::warn!("journal failed: {f}");
                return Err(Errno::EIO);
            }
            st = self.cv.wait(st).expect("journal lock");
        }
        Ok(())
    }

    /// The records `nos` are committed (or dropped): move the head past every record no
    /// longer needed, durably, before returning.
    pub fn done(&self, nos: &[u64]) {
        if nos.is_empty() {
            return;
        }
        let mut st = self.lock();
        for no in nos {
            st.book.done(*no);
        }
        st.head_asked += 1;
        let asked = st.head_asked;
        self.cv.notify_all();
        while st.head_served < asked && st.failed.is_none() {
            st = self.cv.wait(st).expect("journal lock");
        }
    }

    /// What `hi status` shows.
    pub fn status(&self) -> JournalStatus {
        let st = self.lock();
        JournalStatus {
            pending: st.book.pending(),
            groups: st.groups,
            records: st.records,
            used: st.used,
            capacity: st.capacity,
            failed: st.failed.clone(),
        }
    }

    /// Stop the thread once it has written what is queued.
    ///
    /// Afterwards the service answers instead of waiting for a thread that is gone: a
    /// commit that finishes later (a recalled file, while the mount ends) gets `done`
    /// back at once (its records stay in the journal: the next mount commits the same
    /// bytes again, the file's latest), a new write EIO.
    pub fn shutdown(&self) {
        self.lock().stop = true;
        self.cv.notify_all();
        if let Some(t) = self.thread.lock().expect("thread lock").take() {
            let _ = t.join();
        }
        let mut st = self.lock();
        st.failed
            .get_or_insert_with(|| "journal stopped (unmounting)".into());
        self.cv.notify_all();
    }

    fn run(&self, mut j: Journal) {
        loop {
            let (batch, asked) = {
                let mut st = self.lock();
                while st.queue.is_empty() && st.head_served == st.head_asked && !st.stop {
                    st = self.cv.wait(st).expect("journal lock");
                }
                if st.queue.is_empty() && st.head_served == st.head_asked {
                    return;
                }
                (std::mem::take(&mut st.queue), st.head_asked)
            };
            let mut written = Vec::with_capacity(batch.len());
            if !batch.is_empty() {
                let recs: Vec<(RecordKind, &[u8])> =
                    batch.iter().map(|(_, k, p)| (*k, &p[..])).collect();
                match j.append(&recs) {
                    Ok(lsns) => written = lsns,
                    Err(e) => return self.fail(format!("{e}")),
                }
            }
            let head = {
                let mut st = self.lock();
                for ((no, _, p), lsn) in batch.iter().zip(&written) {
                    st.book.written(*no, *lsn);
                    st.reserved -= Journal::record_size(p.len()) + SKIP_MARGIN;
                }
                if let Some((no, _, _)) = batch.last() {
                    st.durable_no = *no;
                    st.groups += 1;
                    st.records += batch.len() as u64;
                }
                st.book.head(j.tail())
            };
            // Records done are named in a Done record, durably, before anyone hears they
            // are done and before the head moves (see `localdisk/src/book.rs`).
            loop {
                let rec = self.lock().book.done_record(j.head(), head);
                let Some(rec) = rec else { break };
                if let Err(e) = j.append(&[(RecordKind::Done, &rec)]) {
                    return self.fail(format!("{e}"));
                }
            }
            if head > j.head() {
                if let Err(e) = j.set_head(head) {
                    return self.fail(format!("{e}"));
                }
            }
            let mut st = self.lock();
            st.room = j.free().saturating_sub(2 * j.group_overhead());
            st.used = j.tail() - j.head();
            st.head_served = asked;
            self.cv.notify_all();
        }
    }

    fn fail(&self, why: String) {
        tracing::error!("journal device failed: {why}; writes now fail with EIO");
        let mut st = self.lock();
        st.failed = Some(why);
        self.cv.notify_all();
    }
}

/// What [`replay`] did.
#[derive(Debug, Default)]
pub struct Replayed {
    pub records: usize,
    pub files: usize,
    pub bytes: u64,
    /// Files whose bytes could not be committed (lease lost, file gone).
    pub dropped_files: usize,
    /// Records skipped: committed before the crash (named by a `Done` record).
    pub already_done: usize,
    /// Namespace changes journaled offline and applied now (or before the crash).
    pub ops: usize,
    /// Of them, refused by the hive: the namespace changed meanwhile (logged).
    pub conflicts: usize,
}

/// Apply the records a recovery returned in the order [`plan`] gives (see the module
/// docs). Fails (and leaves the journal as it is, for the next mount) when the hive cannot
/// be reached.
pub fn replay(hive: &Hive, records: &[Record]) -> Result<Replayed, Errno> {
    let p = plan(records);
    let mut out = Replayed {
        already_done: p.already_done,
        ..Replayed::default()
    };
    if p.bad > 0 {
        tracing::error!(
            bad = p.bad,
            "journal replay: records that could not be read, skipped"
        );
    }
    // The hive forgets the answers of numbers below what a mutation says is
    // acknowledged: hold the journaled ones until they are sent (commits go first).
    for step in &p.steps {
        if let Step::Op { seq, .. } = step {
            hive.meta.hold_seq(*seq);
        }
    }
    for step in p.steps {
        match step {
            Step::Commit {
                ino,
                lease,
                ranges,
                records,
            } => {
                out.records += records;
                let bytes: u64 = ranges.iter().map(|r| r.1.len() as u64).sum();
                out.bytes += bytes;
                match hive.replay_commit(ino, lease, &ranges) {
                    Ok(()) => out.files += 1,
                    Err(e) if e == Errno::ESTALE || e == Errno::ENOENT => {
                        tracing::error!(
                            ino,
                            bytes,
                            "journal replay: bytes written before the crash dropped ({e:?}: {})",
                            if e == Errno::ENOENT {
                                "the file is gone"
                            } else {
                                "another host took the file over"
                            }
                        );
                        out.dropped_files += 1;
                    }
                    Err(e) => return Err(e),
                }
            }
            Step::Op { seq, lsn, op } => {
                let Ok(op) = hivefs_net::meta::decode::<Mutation>(&op) else {
                    tracing::error!(
                        seq,
                        lsn,
                        "journal replay: an operation that does not decode"
                    );
                    return Err(Errno::EPROTO);
                };
                match hive.meta.mutate_reserved(hive.vol, seq, op.clone(), false) {
                    Ok(Ok(_)) => out.ops += 1,
                    // Sent before the crash, and its answer acknowledged since.
                    Ok(Err(e)) if e == hivefs_net::meta::Errno::STALE => out.ops += 1,
                    Ok(Err(e)) => {
                        tracing::error!(
                            seq,
                            ?op,
                            "journal replay: a change made offline was refused by the hive \
                             ({e}): the namespace changed meanwhile; the hive's stands"
                        );
                        out.conflicts += 1;
                    }
                    Err(e) => {
                        tracing::warn!("journal replay: {e}");
                        return Err(Errno::EHOSTDOWN);
                    }
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hivefs_localdisk::Layout;
    use hivefs_nvme::{BlockDevice, SimDevice, SimFaults};

    #[test]
    fn a_stopped_journal_answers_instead_of_blocking() {
        let l = Layout::new(8 << 20, 0).unwrap();
        let mut d: Box<dyn BlockDevice> =
            Box::new(SimDevice::new(l.capacity, 1, SimFaults::default()));
        Journal::format(d.as_mut(), &l).unwrap();
        let (j, _) = Journal::open(d, &l).unwrap();
        let svc = JournalService::start(j, Duration::from_secs(1)).unwrap();
        let r = svc.reserve(10).unwrap();
        let no = svc.append(r, 1, 0, 0, b"0123456789");
        svc.wait_durable(no).unwrap();
        svc.shutdown();
        // A commit finishing after the unmount stopped the journal: nothing may block.
        let (tx, rx) = std::sync::mpsc::channel();
        let s = svc.clone();
        std::thread::spawn(move || {
            s.done(&[no]);
            let _ = tx.send(s.wait_durable(no).is_ok());
        });
        let answered = rx.recv_timeout(Duration::from_secs(10));
        assert_eq!(
            answered,
            Ok(true),
            "done/wait_durable blocked after shutdown"
        );
        assert!(
            svc.reserve(10).is_err(),
            "a write after the stop is refused"
        );
    }
}
