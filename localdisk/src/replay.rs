//! What journal records hold, and the order in which a replay applies the records a
//! recovery found ([`plan`]). No I/O: `hi` (and the client simulator) carry out the steps
//! against the hive.
//!
//! # Payloads (little-endian)
//! ```text
//! Data   inode u64 | write-lease token u64 (0: none) | file offset u64 | bytes
//! Op     sequence u64 | the operation, encoded by its writer
//! Done   count u32 | count x LSN u64
//! ```
//!
//! # Order ([`plan`])
//! - Records named by a `Done` record are skipped: they were committed (or dropped) already,
//!   and applying them again could land behind a later change (`book.rs`).
//! - The bytes of one file merge in record order (a later write over the same bytes wins)
//!   while the write lease they were written under stays the same; a change of lease
//!   emits what was gathered first (bytes written under an older lease must be committed,
//!   or refused, under that lease).
//! - An `Op` is a barrier: every byte gathered before it is emitted first, then the op.
//!   Namespace operations apply in journal order, each exactly once (the hive keeps each
//!   `(client, sequence)`'s answer).
//! - Files are emitted in the order they first appear.
//!
//! Bad payloads (too short, a `Done` record longer than it says) are counted and skipped:
//! the record's checksum held, so only a writer bug makes one.

use crate::journal::{Record, RecordKind};
use crate::ranges::insert_range;
use std::collections::{BTreeMap, HashSet};

/// Bytes of a data record before the written bytes.
pub const DATA_HEADER: usize = 24;
/// Bytes of an op record before the operation.
pub const OP_HEADER: usize = 8;

/// A data record's payload.
pub fn encode_data(ino: u64, lease: u64, off: u64, data: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(DATA_HEADER + data.len());
    p.extend_from_slice(&ino.to_le_bytes());
    p.extend_from_slice(&lease.to_le_bytes());
    p.extend_from_slice(&off.to_le_bytes());
    p.extend_from_slice(data);
    p
}

/// A data record's parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataRecord<'a> {
    pub ino: u64,
    pub lease: u64,
    pub off: u64,
    pub bytes: &'a [u8],
}

fn u64_at(p: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(p[i..i + 8].try_into().expect("8 bytes"))
}

pub fn decode_data(p: &[u8]) -> Option<DataRecord<'_>> {
    if p.len() < DATA_HEADER {
        return None;
    }
    Some(DataRecord {
        ino: u64_at(p, 0),
        lease: u64_at(p, 8),
        off: u64_at(p, 16),
        bytes: &p[DATA_HEADER..],
    })
}

/// An op record's payload: the operation's sequence number and its encoding.
pub fn encode_op(seq: u64, op: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(OP_HEADER + op.len());
    p.extend_from_slice(&seq.to_le_bytes());
    p.extend_from_slice(op);
    p
}

pub fn decode_op(p: &[u8]) -> Option<(u64, &[u8])> {
    if p.len() < OP_HEADER {
        return None;
    }
    Some((u64_at(p, 0), &p[OP_HEADER..]))
}

/// A `Done` record's payload.
pub fn encode_done(lsns: &[u64]) -> Vec<u8> {
    let mut p = Vec::with_capacity(4 + 8 * lsns.len());
    p.extend_from_slice(&(lsns.len() as u32).to_le_bytes());
    for l in lsns {
        p.extend_from_slice(&l.to_le_bytes());
    }
    p
}

/// The LSNs a `Done` record names; `None` if its length disagrees with its count.
pub fn decode_done(p: &[u8]) -> Option<Vec<u64>> {
    let n = u32::from_le_bytes(p.get(..4)?.try_into().ok()?) as usize;
    if p.len() != 4 + 8 * n {
        return None;
    }
    Some((0..n).map(|i| u64_at(p, 4 + 8 * i)).collect())
}

/// One thing a replay does, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Commit these bytes of `ino` (offset order, non-overlapping) under write lease
    /// `lease` (0: none was held: take a new one).
    Commit {
        ino: u64,
        lease: u64,
        ranges: Vec<(u64, Vec<u8>)>,
        /// The records merged into it.
        records: usize,
    },
    /// Apply a namespace operation under its sequence number.
    Op { seq: u64, op: Vec<u8>, lsn: u64 },
}

/// A replay's steps and what was left out.
#[derive(Debug, Default)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// Records skipped because a `Done` record named them.
    pub already_done: usize,
    /// Records whose payload could not be read.
    pub bad: usize,
}

/// Gathered bytes of one file: first appearance, lease, ranges, records.
struct Gathered {
    first: usize,
    lease: u64,
    ranges: BTreeMap<u64, Vec<u8>>,
    records: usize,
}

fn emit(g: Gathered, ino: u64, out: &mut Vec<Step>) {
    out.push(Step::Commit {
        ino,
        lease: g.lease,
        ranges: g.ranges.into_iter().collect(),
        records: g.records,
    });
}

fn emit_all(files: &mut BTreeMap<u64, Gathered>, out: &mut Vec<Step>) {
    let mut all: Vec<(u64, Gathered)> = std::mem::take(files).into_iter().collect();
    all.sort_by_key(|(_, g)| g.first);
    for (ino, g) in all {
        emit(g, ino, out);
    }
}

/// The steps that replay `records` (a recovery's, in LSN order). See the module docs.
pub fn plan(records: &[Record]) -> Plan {
    let mut out = Plan::default();
    let mut done: HashSet<u64> = HashSet::new();
    for r in records.iter().filter(|r| r.kind == RecordKind::Done) {
        match decode_done(&r.payload) {
            Some(lsns) => done.extend(lsns),
            None => out.bad += 1,
        }
    }
    let mut files: BTreeMap<u64, Gathered> = BTreeMap::new();
    let mut seen = 0usize;
    for r in records {
        if r.kind == RecordKind::Done {
            continue;
        }
        if done.contains(&r.lsn) {
            out.already_done += 1;
            continue;
        }
        match r.kind {
            RecordKind::Data => {
                let Some(d) = decode_data(&r.payload) else {
                    out.bad += 1;
                    continue;
                };
                if files.get(&d.ino).is_some_and(|g| g.lease != d.lease) {
                    let g = files.remove(&d.ino).expect("present");
                    emit(g, d.ino, &mut out.steps);
                }
                seen += 1;
                let g = files.entry(d.ino).or_insert_with(|| Gathered {
                    first: seen,
                    lease: d.lease,
                    ranges: BTreeMap::new(),
                    records: 0,
                });
                insert_range(&mut g.ranges, d.off, d.bytes);
                g.records += 1;
            }
            RecordKind::Op => {
                let Some((seq, op)) = decode_op(&r.payload) else {
                    out.bad += 1;
                    continue;
                };
                emit_all(&mut files, &mut out.steps);
                out.steps.push(Step::Op {
                    seq,
                    op: op.to_vec(),
                    lsn: r.lsn,
                });
            }
            RecordKind::Done => {}
        }
    }
    emit_all(&mut files, &mut out.steps);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(kind: RecordKind, lsn: u64, payload: Vec<u8>) -> Record {
        Record {
            kind,
            lsn,
            generation: 1,
            payload,
        }
    }

    fn commit(ino: u64, lease: u64, ranges: &[(u64, &[u8])], records: usize) -> Step {
        Step::Commit {
            ino,
            lease,
            ranges: ranges.iter().map(|(o, b)| (*o, b.to_vec())).collect(),
            records,
        }
    }

    #[test]
    fn payloads_round_trip_and_short_ones_are_refused() {
        let d = encode_data(7, 9, 4096, b"abc");
        assert_eq!(
            decode_data(&d),
            Some(DataRecord {
                ino: 7,
                lease: 9,
                off: 4096,
                bytes: b"abc"
            })
        );
        assert_eq!(decode_data(&d[..DATA_HEADER - 1]), None);
        assert_eq!(decode_op(&encode_op(5, b"op")), Some((5, &b"op"[..])));
        assert_eq!(decode_op(&[1, 2, 3]), None);
        let done = encode_done(&[1, 2, 3]);
        assert_eq!(decode_done(&done), Some(vec![1, 2, 3]));
        assert_eq!(decode_done(&done[..done.len() - 1]), None);
        // A count far past the bytes is refused without allocating for it.
        assert_eq!(decode_done(&u32::MAX.to_le_bytes()), None);
    }

    #[test]
    fn files_merge_in_record_order_ops_are_barriers_and_done_records_are_skipped() {
        let recs = vec![
            rec(RecordKind::Data, 0, encode_data(1, 10, 0, b"aaaa")),
            rec(RecordKind::Data, 64, encode_data(2, 20, 0, b"xx")),
            rec(RecordKind::Data, 128, encode_data(1, 10, 2, b"bb")),
            // Committed already (named below): skipped.
            rec(RecordKind::Data, 192, encode_data(2, 20, 0, b"zz")),
            rec(RecordKind::Op, 256, encode_op(77, b"rename")),
            rec(RecordKind::Data, 320, encode_data(1, 10, 8, b"c")),
            // A new lease on file 1: what came before it goes first.
            rec(RecordKind::Data, 384, encode_data(1, 11, 8, b"d")),
            rec(RecordKind::Done, 448, encode_done(&[192])),
        ];
        let p = plan(&recs);
        assert_eq!(p.already_done, 1);
        assert_eq!(p.bad, 0);
        assert_eq!(
            p.steps,
            vec![
                commit(1, 10, &[(0, b"aabb")], 2),
                commit(2, 20, &[(0, b"xx")], 1),
                Step::Op {
                    seq: 77,
                    op: b"rename".to_vec(),
                    lsn: 256
                },
                commit(1, 10, &[(8, b"c")], 1),
                commit(1, 11, &[(8, b"d")], 1),
            ]
        );
    }
}
