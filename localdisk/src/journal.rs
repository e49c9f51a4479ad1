//! The journal: the client's NVRAM. One ordered, circular log of records (data writes,
//! namespace operations) that are durable here before the hive has them.
//!
//! # Positions
//! A record's *LSN* is its byte position counted from the journal's format, never reused;
//! it lies at `journal_offset + lsn % journal_len` on the disk. The *head* is the LSN of
//! the oldest record still needed (everything before it is committed to the hive); the
//! *tail* is where the next group goes. Live records are `[head, tail)`, never more than
//! the region.
//!
//! # Record
//! ```text
//! magic u32 | kind u8 | 0 u8 | 0 u16 | generation u32 | payload length u32 | lsn u64 |
//! payload CRC32C u32 | header CRC32C u32 (of the 28 bytes before it)   = 32 bytes
//! payload, padded to 8 bytes
//! ```
//! A header never starts in the last 31 bytes of a block (those are skipped), and a
//! record never wraps the region's end (a pad record fills up to it).
//!
//! # Group commit
//! [`Journal::append`] writes a group of records from the tail (block-aligned) and ends
//! it with a pad to the next block boundary, then flushes; a record is durable, and may
//! be acknowledged, only once that flush is done. One group at a time.
//!
//! # Control slots
//! Blocks 1 and 2 hold `(counter, generation, head)`, written alternately, each with a
//! CRC; the valid slot with the higher counter wins, so a torn control write leaves the
//! other one in force. [`Journal::set_head`] moves the head durably.
//!
//! # Recovery ([`Journal::open`])
//! Scan from the head while records are valid: right magic and CRCs, `lsn` equal to the
//! position (a record of an earlier lap is not), and a *generation* no lower than the
//! record before it. Every open writes a new generation to the control slots (durably)
//! before its first append; so a record left beyond the end by a torn group of an earlier
//! mount can never be taken for a continuation of the log after new records were written
//! before it.
//!
//! # Invariants
//! - A record whose group's flush completed is returned by every later recovery until
//!   the head passes it, in LSN order, exactly once per recovery.
//! - Records are never written over before the durable head has passed them.
//! - Lengths are bounded ([`MAX_PAYLOAD`], the region) before anything is allocated.

use crate::superblock::Layout;
use hivefs_nvme::{run_sync, AlignedBuf, BlockDevice, IoError, IoOp, IoRequest, BLOCK_SIZE};

pub const RECORD_MAGIC: u32 = 0x4a52_4e31; // "JRN1"
pub const CONTROL_MAGIC: &[u8; 8] = b"HIVEJCTL";
pub const HEADER: usize = 32;
/// Largest payload of one record.
pub const MAX_PAYLOAD: usize = 4 << 20;
/// Bytes a recovery scan reads at once.
const SCAN_WINDOW: usize = 1 << 20;

/// What a record holds (the payload's format is the caller's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// File data written on this host.
    Data,
    /// A namespace operation.
    Op,
    /// Records done out of order: committed (or dropped) while an older record still held
    /// the head back; a replay skips them (`book.rs`).
    Done,
}

const KIND_PAD: u8 = 0xff;

impl RecordKind {
    fn code(self) -> u8 {
        match self {
            RecordKind::Data => 1,
            RecordKind::Op => 2,
            RecordKind::Done => 3,
        }
    }
    fn from_code(c: u8) -> Option<RecordKind> {
        match c {
            1 => Some(RecordKind::Data),
            2 => Some(RecordKind::Op),
            3 => Some(RecordKind::Done),
            _ => None,
        }
    }
}

/// A record read back by recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub kind: RecordKind,
    pub lsn: u64,
    pub generation: u32,
    pub payload: Vec<u8>,
}

/// What recovery found: the records from the head on, in order.
#[derive(Debug, Default)]
pub struct Recovered {
    pub records: Vec<Record>,
    /// The durable head it started from.
    pub head: u64,
    /// Where the valid log ended.
    pub end: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal device: {0}")]
    Io(#[from] IoError),
    #[error("journal control blocks are both damaged: the journal cannot be trusted")]
    NoControl,
    #[error("journal full: {need} bytes needed, {free} free until committed records are trimmed")]
    Full { need: u64, free: u64 },
    #[error("record of {0} bytes is over the limit {1}")]
    TooLarge(usize, usize),
    #[error("journal failed earlier (device error); reopen it")]
    Failed,
}

/// The control slot contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Control {
    counter: u64,
    generation: u32,
    head: u64,
}

impl Control {
    fn encode(&self) -> AlignedBuf {
        let mut b = AlignedBuf::new(BLOCK_SIZE);
        b[..8].copy_from_slice(CONTROL_MAGIC);
        b[8..16].copy_from_slice(&self.counter.to_le_bytes());
        b[16..20].copy_from_slice(&self.generation.to_le_bytes());
        b[20..28].copy_from_slice(&self.head.to_le_bytes());
        let crc = crc_fast::crc32_iscsi(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }
    fn decode(b: &[u8]) -> Option<Control> {
        if &b[..8] != CONTROL_MAGIC
            || crc_fast::crc32_iscsi(&b[..28]) != u32::from_le_bytes(b[28..32].try_into().ok()?)
        {
            return None;
        }
        Some(Control {
            counter: u64::from_le_bytes(b[8..16].try_into().ok()?),
            generation: u32::from_le_bytes(b[16..20].try_into().ok()?),
            head: u64::from_le_bytes(b[20..28].try_into().ok()?),
        })
    }
}

fn align_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

fn record_size(payload: usize) -> u64 {
    align_up((HEADER + payload) as u64, 8)
}

fn header(kind: u8, generation: u32, lsn: u64, payload: &[u8]) -> [u8; HEADER] {
    finish_header(
        kind,
        generation,
        lsn,
        payload.len(),
        crc_fast::crc32_iscsi(payload),
    )
}

/// A pad's header: its body (`body_len` bytes, skipped unread by a scan) is not checked.
fn pad_header(generation: u32, lsn: u64, body_len: usize) -> [u8; HEADER] {
    finish_header(KIND_PAD, generation, lsn, body_len, 0)
}

fn finish_header(kind: u8, generation: u32, lsn: u64, len: usize, pcrc: u32) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    h[4] = kind;
    h[8..12].copy_from_slice(&generation.to_le_bytes());
    h[12..16].copy_from_slice(&(len as u32).to_le_bytes());
    h[16..24].copy_from_slice(&lsn.to_le_bytes());
    h[24..28].copy_from_slice(&pcrc.to_le_bytes());
    let hcrc = crc_fast::crc32_iscsi(&h[..28]);
    h[28..32].copy_from_slice(&hcrc.to_le_bytes());
    h
}

/// A journal on a client disk. See the module docs.
pub struct Journal {
    dev: Box<dyn BlockDevice>,
    layout: Layout,
    control: Control,
    tail: u64,
    failed: bool,
}

impl Journal {
    /// Write an empty journal (both control slots: generation 0, head 0). The region's
    /// old contents need no clearing: nothing in it has a matching LSN and generation.
    pub fn format(dev: &mut dyn BlockDevice, layout: &Layout) -> Result<(), JournalError> {
        let c = Control {
            counter: 1,
            generation: 0,
            head: 0,
        };
        let [a, b] = layout.control_slots();
        // Slot `counter % 2`, as every later control write.
        let reqs = vec![
            write_req(0, a, Control { counter: 0, ..c }.encode()),
            write_req(1, b, c.encode()),
            IoRequest {
                tag: 2,
                op: IoOp::Flush,
            },
        ];
        check(run_sync(dev, reqs)?)?;
        Ok(())
    }

    /// Recover the journal: the records from the durable head on; then a new generation is
    /// made durable, and appends go on after the last valid record.
    pub fn open(
        dev: Box<dyn BlockDevice>,
        layout: &Layout,
    ) -> Result<(Journal, Recovered), JournalError> {
        let (mut j, rec) = Journal::read(dev, layout)?;
        let top = rec.records.iter().map(|r| r.generation).max().unwrap_or(0);
        j.write_control(Control {
            counter: j.control.counter + 1,
            generation: j.control.generation.max(top) + 1,
            head: j.control.head,
        })?;
        j.seal(rec.end)?;
        Ok((j, rec))
    }

    /// What a recovery would return, without writing anything (`hi format` asks whether
    /// a disk holds records not yet committed).
    pub fn inspect(dev: Box<dyn BlockDevice>, layout: &Layout) -> Result<Recovered, JournalError> {
        Ok(Journal::read(dev, layout)?.1)
    }

    fn read(
        mut dev: Box<dyn BlockDevice>,
        layout: &Layout,
    ) -> Result<(Journal, Recovered), JournalError> {
        let [a, b] = layout.control_slots();
        let got = check(run_sync(
            dev.as_mut(),
            vec![read_req(0, a, BLOCK_SIZE), read_req(1, b, BLOCK_SIZE)],
        )?)?;
        let control = got
            .iter()
            .filter_map(|c| c.buf.as_ref().and_then(|b| Control::decode(b)))
            .max_by_key(|c| c.counter)
            .ok_or(JournalError::NoControl)?;
        let mut j = Journal {
            dev,
            layout: *layout,
            control,
            tail: control.head,
            failed: false,
        };
        let rec = j.scan()?;
        j.tail = align_up(rec.end, BLOCK_SIZE as u64);
        Ok((j, rec))
    }

    fn len(&self) -> u64 {
        self.layout.journal_len
    }

    /// The largest payload one record may carry here.
    pub fn max_payload(&self) -> usize {
        MAX_PAYLOAD.min((self.len() / 4) as usize - HEADER)
    }

    pub fn generation(&self) -> u32 {
        self.control.generation
    }

    /// The durable head.
    pub fn head(&self) -> u64 {
        self.control.head
    }

    pub fn tail(&self) -> u64 {
        self.tail
    }

    /// Bytes free for new groups (the worst-case overhead of a group is the caller's
    /// margin: see [`Journal::group_overhead`]).
    pub fn free(&self) -> u64 {
        self.len() - (self.tail - self.control.head)
    }

    /// Most bytes a group adds beyond its records' sizes: a pad to the region's end (when
    /// a record does not fit before it) and one to a block boundary.
    pub fn group_overhead(&self) -> u64 {
        record_size(self.max_payload()) + BLOCK_SIZE as u64
    }

    /// Bytes a record with this payload takes in the log.
    pub fn record_size(payload: usize) -> u64 {
        record_size(payload)
    }

    /// Write `records` as one group and make them durable. Returns each record's LSN.
    pub fn append(&mut self, records: &[(RecordKind, &[u8])]) -> Result<Vec<u64>, JournalError> {
        if self.failed {
            return Err(JournalError::Failed);
        }
        let max = self.max_payload();
        if let Some((_, p)) = records.iter().find(|(_, p)| p.len() > max) {
            return Err(JournalError::TooLarge(p.len(), max));
        }
        // Lay the group out.
        let (len, b) = (self.len(), BLOCK_SIZE as u64);
        let mut pos = self.tail;
        let mut placed: Vec<(u64, u8, &[u8])> = Vec::with_capacity(records.len() + 2);
        for (kind, payload) in records {
            let size = record_size(payload.len());
            if b - pos % b < HEADER as u64 {
                pos = align_up(pos, b);
            }
            let region_left = len - pos % len;
            if region_left < size {
                placed.push((pos, KIND_PAD, &[]));
                pos += region_left;
            }
            placed.push((pos, kind.code(), payload));
            pos += size;
        }
        if !pos.is_multiple_of(b) {
            if b - pos % b >= HEADER as u64 {
                placed.push((pos, KIND_PAD, &[]));
            }
            pos = align_up(pos, b);
        }
        let need = pos - self.tail;
        if need > self.free() {
            return Err(JournalError::Full {
                need,
                free: self.free(),
            });
        }
        // One buffer for the group, split where it wraps.
        let mut buf = AlignedBuf::new(need as usize);
        let gen = self.control.generation;
        for (i, &(at, kind, payload)) in placed.iter().enumerate() {
            let off = (at - self.tail) as usize;
            let h = if kind == KIND_PAD {
                let end = placed.get(i + 1).map_or(pos, |n| n.0);
                pad_header(gen, at, (end - at) as usize - HEADER)
            } else {
                header(kind, gen, at, payload)
            };
            buf[off..off + HEADER].copy_from_slice(&h);
            buf[off + HEADER..off + HEADER + payload.len()].copy_from_slice(payload);
        }
        let first = ((len - self.tail % len).min(need)) as usize;
        let mut reqs = Vec::with_capacity(3);
        let at = self.layout.journal_offset + self.tail % len;
        if first == need as usize {
            reqs.push(write_req(0, at, buf));
        } else {
            let mut a = AlignedBuf::new(first);
            a.copy_from_slice(&buf[..first]);
            let mut c = AlignedBuf::new(need as usize - first);
            c.copy_from_slice(&buf[first..]);
            reqs.push(write_req(0, at, a));
            reqs.push(write_req(1, self.layout.journal_offset, c));
        }
        reqs.push(IoRequest {
            tag: 9,
            op: IoOp::Flush,
        });
        let r = run_sync(self.dev.as_mut(), reqs).map_err(JournalError::from);
        if let Err(e) = r.and_then(check) {
            self.failed = true;
            return Err(e);
        }
        self.tail = pos;
        Ok(placed
            .iter()
            .filter(|p| p.1 != KIND_PAD)
            .map(|p| p.0)
            .collect())
    }

    /// Move the head to `lsn` (a record's LSN, or the tail) durably: records before it are
    /// not returned by later recoveries, and their space is free.
    pub fn set_head(&mut self, lsn: u64) -> Result<(), JournalError> {
        if self.failed {
            return Err(JournalError::Failed);
        }
        assert!(
            lsn >= self.control.head && lsn <= self.tail,
            "head {lsn} outside [{}, {}]",
            self.control.head,
            self.tail
        );
        if lsn == self.control.head {
            return Ok(());
        }
        let c = Control {
            counter: self.control.counter + 1,
            head: lsn,
            ..self.control
        };
        self.write_control(c)
    }

    fn write_control(&mut self, c: Control) -> Result<(), JournalError> {
        let slot = self.layout.control_slots()[(c.counter % 2) as usize];
        self.write_durably(slot, c.encode())?;
        self.control = c;
        Ok(())
    }

    /// Write one buffer and flush; an error fails the journal.
    fn write_durably(&mut self, at: u64, buf: AlignedBuf) -> Result<(), JournalError> {
        let r = run_sync(
            self.dev.as_mut(),
            vec![
                write_req(0, at, buf),
                IoRequest {
                    tag: 1,
                    op: IoOp::Flush,
                },
            ],
        )
        .map_err(JournalError::from)
        .and_then(check);
        if r.is_err() {
            self.failed = true;
        }
        r.map(|_| ())
    }

    /// End the recovered log at `end` for good: a pad of the new generation from `end` to
    /// its block's end (the block's bytes before `end` written again as they are). Without
    /// it, a record torn at `end` in an earlier mount would stop every later scan there,
    /// before the groups this mount writes from the next block on.
    fn seal(&mut self, end: u64) -> Result<(), JournalError> {
        let b = BLOCK_SIZE as u64;
        let rem = b - end % b;
        if rem == b || rem < HEADER as u64 {
            return Ok(());
        }
        let start = end / b * b;
        let at = self.layout.journal_offset + start % self.len();
        let got = check(run_sync(
            self.dev.as_mut(),
            vec![read_req(0, at, BLOCK_SIZE)],
        )?)?;
        let mut block = got
            .into_iter()
            .next()
            .and_then(|c| c.buf)
            .expect("read buffer");
        let off = (end - start) as usize;
        block[off..].fill(0);
        let h = pad_header(self.control.generation, end, rem as usize - HEADER);
        block[off..off + HEADER].copy_from_slice(&h);
        self.write_durably(at, block)
    }

    /// Read the valid records from the head on (see the module docs).
    fn scan(&mut self) -> Result<Recovered, JournalError> {
        let (len, b) = (self.len(), BLOCK_SIZE as u64);
        let head = self.control.head;
        let mut out = Recovered {
            head,
            end: head,
            records: Vec::new(),
        };
        let mut win = Window::default();
        let mut pos = head;
        let mut last_gen = 0u32;
        let max = self.max_payload();
        loop {
            if b - pos % b < HEADER as u64 {
                pos = align_up(pos, b);
            }
            if pos - head + HEADER as u64 > len {
                break;
            }
            let h = win.read(self, pos, HEADER)?;
            let h: [u8; HEADER] = h.try_into().expect("header");
            if u32::from_le_bytes(h[..4].try_into().expect("4")) != RECORD_MAGIC
                || crc_fast::crc32_iscsi(&h[..28])
                    != u32::from_le_bytes(h[28..].try_into().expect("4"))
            {
                break;
            }
            let kind = h[4];
            let gen = u32::from_le_bytes(h[8..12].try_into().expect("4"));
            let plen = u32::from_le_bytes(h[12..16].try_into().expect("4")) as usize;
            let lsn = u64::from_le_bytes(h[16..24].try_into().expect("8"));
            let pcrc = u32::from_le_bytes(h[24..28].try_into().expect("4"));
            let size = record_size(plen);
            if lsn != pos
                || gen < last_gen
                || gen > self.control.generation
                || size > len - pos % len
                || pos - head + size > len
            {
                break;
            }
            if kind == KIND_PAD {
                pos += HEADER as u64 + plen as u64;
                last_gen = gen;
                continue;
            }
            let Some(kind) = RecordKind::from_code(kind) else {
                break;
            };
            if plen > max {
                break;
            }
            let payload = win.read(self, pos + HEADER as u64, plen)?;
            if crc_fast::crc32_iscsi(&payload) != pcrc {
                break;
            }
            out.records.push(Record {
                kind,
                lsn: pos,
                generation: gen,
                payload,
            });
            last_gen = gen;
            pos += size;
            out.end = pos;
        }
        Ok(out)
    }
}

/// A read window over the journal region for the recovery scan.
#[derive(Default)]
struct Window {
    /// LSN of the window's first byte (block-aligned) and its bytes.
    start: u64,
    bytes: Vec<u8>,
}

impl Window {
    /// `n` bytes at `lsn` (never across the region's end: records do not wrap).
    fn read(&mut self, j: &mut Journal, lsn: u64, n: usize) -> Result<Vec<u8>, JournalError> {
        let end = lsn + n as u64;
        if lsn < self.start || end > self.start + self.bytes.len() as u64 {
            let (len, b) = (j.len(), BLOCK_SIZE as u64);
            let start = lsn / b * b;
            let region_left = len - start % len;
            let want = align_up(end - start, b)
                .max(SCAN_WINDOW as u64)
                .min(region_left);
            let got = check(run_sync(
                j.dev.as_mut(),
                vec![read_req(
                    0,
                    j.layout.journal_offset + start % len,
                    want as usize,
                )],
            )?)?;
            self.start = start;
            self.bytes = got
                .into_iter()
                .next()
                .and_then(|c| c.buf)
                .map(|b| b.to_vec())
                .unwrap_or_default();
        }
        let at = (lsn - self.start) as usize;
        Ok(self.bytes[at..at + n].to_vec())
    }
}

fn write_req(tag: u64, offset: u64, buf: AlignedBuf) -> IoRequest {
    IoRequest {
        tag,
        op: IoOp::Write { offset, buf },
    }
}

fn read_req(tag: u64, offset: u64, len: usize) -> IoRequest {
    IoRequest {
        tag,
        op: IoOp::Read {
            offset,
            buf: AlignedBuf::new(len),
        },
    }
}

fn check(
    c: Vec<hivefs_nvme::IoCompletion>,
) -> Result<Vec<hivefs_nvme::IoCompletion>, JournalError> {
    for x in &c {
        if let Err(e) = &x.result {
            return Err(JournalError::Io(e.clone()));
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests;
