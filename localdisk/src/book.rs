//! The flusher's book of journal records: which are still needed, how far the head may
//! move, and which records done out of order must be named in a `Done` record. No I/O: the
//! journal's owner (`hi`'s journal thread, the client simulator) asks and does the writing.
//!
//! # Numbers and LSNs
//! A record is numbered when it is queued ([`Book::add`]) and gets its LSN when the group
//! carrying it is durable ([`Book::written`]). Groups are written in number order, so the
//! oldest record still needed is the lowest open number, and if that one is not written
//! yet, no open record is.
//!
//! # Why `Done` records
//! The head only moves past a prefix of the log. A record committed while an older one is
//! still open (another file's write waiting for the hive) stays in the journal, and so does
//! a record whose commit overtook the group carrying it (a sync commits bytes from memory
//! without waiting for the journal). A crash would then replay it: the same bytes committed
//! again, *after* whatever the client did to the file since (a truncation, a later write
//! already committed) — resurrecting old bytes. So before [`Book::done`]'s caller may go on
//! (before the file's next change reaches the hive), the LSN of every such record is
//! written in a `Done` record ([`Book::done_record`]); a replay skips the records a `Done`
//! record names. A `Done` record lies after every record it names, so the head never passes
//! it before them.
//!
//! What a replay may apply again of a file's committed records must always be their
//! *latest* ones (re-applying bytes already there); an older record applied while a newer
//! one is skipped would put old bytes over newer ones. Three rules keep it so:
//! - write-ahead: a record is durable before its bytes are committed (the owner waits for
//!   it), so no committed change is missing from the journal;
//! - a file's records are done in LSN order (its batches commit in order), and names are
//!   written in LSN order, turn after turn: the unnamed done records of a file are its
//!   latest;
//! - within a turn, either every done record at or past the *durable* head is named, or,
//!   when the head's new position passes them all, none is: if that move is then lost (a
//!   torn control write), they are all replayed. Naming only those the new head does not
//!   pass would let a lost move replay an old record whose newer ones are named
//!   (simulator, seed 2).
//!
//! # Invariants
//! - `head(tail)` is never past an open record.
//! - Every record done at or past the durable head is named by a durable `Done` record
//!   before the owner reports it done (the owner writes [`Book::done_record`]'s payloads
//!   with the durable head, flushes them, then moves the head and answers).

use crate::replay::encode_done;
use std::collections::{BTreeMap, BTreeSet, HashSet};

/// Most LSNs one `Done` record names (more go into the next one).
pub const MAX_DONE_PER_RECORD: usize = 1 << 16;

/// See the module docs.
#[derive(Debug)]
pub struct Book {
    next_no: u64,
    /// Records not yet done: number -> LSN once written.
    open: BTreeMap<u64, Option<u64>>,
    /// Done at an LSN not yet named by a durable `Done` record.
    unnamed: BTreeSet<u64>,
    /// Done before their group was written.
    done_unwritten: HashSet<u64>,
}

impl Default for Book {
    fn default() -> Self {
        Self::new()
    }
}

impl Book {
    pub fn new() -> Book {
        Book {
            next_no: 1,
            open: BTreeMap::new(),
            unnamed: BTreeSet::new(),
            done_unwritten: HashSet::new(),
        }
    }

    /// Number the next record (queued, not yet written).
    pub fn add(&mut self) -> u64 {
        let no = self.next_no;
        self.next_no += 1;
        self.open.insert(no, None);
        no
    }

    /// Record `no` is durable at `lsn`.
    pub fn written(&mut self, no: u64, lsn: u64) {
        if let Some(slot) = self.open.get_mut(&no) {
            *slot = Some(lsn);
        } else if self.done_unwritten.remove(&no) {
            self.unnamed.insert(lsn);
        }
    }

    /// Record `no` is committed (or dropped for a reason logged). Twice is harmless.
    pub fn done(&mut self, no: u64) {
        match self.open.remove(&no) {
            Some(Some(lsn)) => {
                self.unnamed.insert(lsn);
            }
            Some(None) => {
                self.done_unwritten.insert(no);
            }
            None => {}
        }
    }

    /// Records not yet done.
    pub fn pending(&self) -> usize {
        self.open.len()
    }

    /// Whether record `no` is still needed.
    pub fn is_open(&self, no: u64) -> bool {
        self.open.contains_key(&no)
    }

    /// The LSN the head may move to, given the journal's tail: the oldest open record's.
    pub fn head(&self, tail: u64) -> u64 {
        match self.open.values().next() {
            Some(Some(lsn)) => *lsn,
            _ => tail,
        }
    }

    /// The payload of the next `Done` record to write, given the journal's *durable* head
    /// (records behind it are never replayed and need no name) and the head it is about to
    /// move to, or `None` (nothing to name, or the move passes everything done). Lowest
    /// LSNs first. The LSNs it names are taken off the book: the owner must write it
    /// durably (a failed write fails the journal, and with it everything after).
    pub fn done_record(&mut self, durable_head: u64, new_head: u64) -> Option<Vec<u8>> {
        self.unnamed = self.unnamed.split_off(&durable_head);
        if self.unnamed.last().is_none_or(|l| *l < new_head) {
            self.unnamed.clear();
            return None;
        }
        let lsns: Vec<u64> = self
            .unnamed
            .iter()
            .take(MAX_DONE_PER_RECORD)
            .copied()
            .collect();
        for l in &lsns {
            self.unnamed.remove(l);
        }
        Some(encode_done(&lsns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::decode_done;

    #[test]
    fn the_head_stops_at_the_oldest_open_record_and_out_of_order_dones_are_named() {
        let mut b = Book::new();
        let (r1, r2, r3) = (b.add(), b.add(), b.add());
        b.written(r1, 0);
        b.written(r2, 100);
        b.written(r3, 200);
        assert_eq!(b.head(300), 0);
        // r2 done while r1 is open: it must be named.
        b.done(r2);
        assert_eq!(b.head(300), 0);
        let d = b.done_record(0, 0).expect("a Done record");
        assert_eq!(decode_done(&d), Some(vec![100]));
        assert_eq!(b.done_record(0, 0), None);
        // r1 and r3 done: the head passes everything done; no name needed.
        b.done(r1);
        b.done(r3);
        assert_eq!(b.head(300), 300);
        assert_eq!(b.done_record(0, 300), None);
        // A record done past the new head: everything at or past the durable head is named.
        let (r4, r5) = (b.add(), b.add());
        b.written(r4, 300);
        b.written(r5, 400);
        b.done(r5);
        assert_eq!(b.head(500), 300);
        let r6 = b.add();
        b.written(r6, 500);
        b.done(r6);
        let d = b.done_record(250, 300).expect("a Done record");
        assert_eq!(decode_done(&d), Some(vec![400, 500]));
        assert_eq!(b.pending(), 1);
    }

    #[test]
    fn a_record_done_before_it_was_written_is_named_once_written() {
        let mut b = Book::new();
        let (r1, r2) = (b.add(), b.add());
        b.written(r1, 0);
        // r2 was dropped (its bytes truncated away) before its group was written.
        b.done(r2);
        assert_eq!(b.head(64), 0);
        b.written(r2, 64);
        let d = b.done_record(0, 0).expect("a Done record");
        assert_eq!(decode_done(&d), Some(vec![64]));
        // Twice done changes nothing.
        b.done(r2);
        assert_eq!(b.done_record(0, 0), None);
        assert!(b.is_open(r1));
    }
}
