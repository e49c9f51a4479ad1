//! The on-disk Raft log: append-only segment files and a two-slot state file, in one
//! directory (`raft-log/`). It knows log indexes and opaque entry bytes, nothing of Raft's
//! types ([`super::raft_log`] encodes those).
//!
//! Why not a B-tree (redb, which held the log before): a B-tree commit of one ~300-byte
//! entry rewrote about five 4 KiB pages and its allocator state, and was a third of the
//! Raft thread's CPU during creates. Here an append is one `pwrite` of one record at the
//! tail of a preallocated, zero-filled segment and one `fdatasync` (the file's size and
//! blocks do not change, so no metadata goes with it).
//!
//! # Files
//! - `state`: two 4 KiB slots, each `[magic][seq][len][crc32c][payload]`; the valid slot
//!   with the higher `seq` is current. A write goes to the other slot and is fdatasynced,
//!   so a torn write leaves the previous state. Payload: node id, vote bytes, last purged
//!   index and its log id bytes.
//! - `seg-<seq, 16 hex digits>`: a 64-byte header (magic, format, seq, node id, crc), then
//!   records, then zeros to the segment's preallocated size. A record is a 32-byte header
//!   `[magic][kind][len][count][first index][crc32c of header and payload]` and its
//!   payload: for `ENTRIES`, `count` times `[u32 length][entry bytes]` for indexes
//!   `first..first+count`; for `TRUNCATE`, nothing (`first` is the first index removed).
//!
//! # Invariants
//! - An append, a truncation or a state change is durable when its call returns; nothing is
//!   ever written in place except the zeroed tail past the last record.
//! - Replaying the records in order gives the log: `ENTRIES` must continue the log (index
//!   `last + 1`) or restart it inside the purged prefix; `TRUNCATE` drops indexes at and
//!   after `first`. Indexes at or below the last purged one are not part of the log.
//! - Open tells a torn tail from damage: the first invalid record of the last segment is a
//!   torn (never acknowledged) append only if no valid record follows it anywhere in the
//!   segment; it is then zeroed. Any other invalid byte (an earlier segment, or valid
//!   records after it) refuses to open, naming the file and offset: acknowledged entries
//!   are never silently dropped.
//! - Every length is bounded by what holds it before anything is allocated.
//! - Segments are deleted only as a prefix, and only when every index written in them is
//!   at or below the last purged index, recorded durably first.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Default size of a segment file (zero-filled when made).
pub(crate) const SEGMENT_BYTES: u64 = 16 << 20;
/// Largest record accepted when reading (a record larger than a segment gets its own).
const MAX_RECORD: u64 = 1 << 30;

const STATE_FILE: &str = "state";
const STATE_SLOT: u64 = 4096;
const STATE_MAGIC: u32 = 0x5453_5648; // "HVST"
const STATE_HEADER: usize = 20;

const SEG_MAGIC: u64 = 0x0031_4c41_5745_5648; // "HVEWAL1\0"
const SEG_FORMAT: u32 = 1;
/// Segment header bytes; records start at the next sector.
const SEG_HEADER: u64 = 64;
const FIRST_RECORD: u64 = SECTOR;

const REC_MAGIC: u32 = 0x4c52_5648; // "HVRL"
const REC_HEADER: u64 = 32;
/// Records start on sector boundaries, so a torn append shows as whole zero sectors.
const SECTOR: u64 = 512;
const KIND_ENTRIES: u8 = 1;
const KIND_TRUNCATE: u8 = 2;

/// What the state file holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct WalState {
    pub node_id: u64,
    /// The vote, as the caller encoded it.
    pub vote: Option<Vec<u8>>,
    /// The last purged index and the caller's encoding of its log id.
    pub purged: Option<(u64, Vec<u8>)>,
}

/// What a log made from another one starts with: its state and its entries, in order.
pub(crate) type Seed = (WalState, Vec<(u64, Vec<u8>)>);

/// Where an entry's bytes are.
#[derive(Clone, Copy, Debug)]
struct Loc {
    seg: u64,
    off: u64,
    len: u32,
}

struct Segment {
    file: Arc<File>,
    path: PathBuf,
    /// Highest index any `ENTRIES` record of this segment wrote (live or not).
    max_index: Option<u64>,
}

/// What readers see: the entries' places and the open segments.
struct Index {
    /// `locs[i]` holds index `first + i`.
    first: u64,
    locs: VecDeque<Loc>,
    segs: BTreeMap<u64, Segment>,
}

impl Index {
    fn last(&self) -> Option<u64> {
        (!self.locs.is_empty()).then(|| self.first + self.locs.len() as u64 - 1)
    }

    /// Drops indexes `since..`.
    fn truncate(&mut self, since: u64) {
        let keep = since.saturating_sub(self.first).min(self.locs.len() as u64);
        self.locs.truncate(keep as usize);
    }

    /// Drops indexes `..=upto`.
    fn purge(&mut self, upto: u64) {
        while !self.locs.is_empty() && self.first <= upto {
            self.locs.pop_front();
            self.first += 1;
        }
        if self.locs.is_empty() {
            self.first = self.first.max(upto.saturating_add(1));
        }
    }
}

/// The writer's position: the last segment and where its next record goes.
struct Tail {
    seq: u64,
    file: Arc<File>,
    off: u64,
    size: u64,
    state: WalState,
    state_seq: u64,
    state_file: File,
}

/// The log directory, open. Writes are serialized by `tail`; readers take `index` only
/// briefly and read the segment files without a lock.
pub(crate) struct Wal {
    dir: PathBuf,
    segment_bytes: u64,
    tail: Mutex<Tail>,
    index: Mutex<Index>,
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn seg_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("seg-{seq:016x}"))
}

fn crc_of(parts: &[&[u8]]) -> u32 {
    hivefs_net::crc32c_parts(parts)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn encode_state(s: &WalState) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&s.node_id.to_le_bytes());
    let vote = s.vote.as_deref();
    p.push(vote.is_some() as u8);
    p.extend_from_slice(&(vote.map_or(0, |v| v.len()) as u32).to_le_bytes());
    p.extend_from_slice(vote.unwrap_or_default());
    p.push(s.purged.is_some() as u8);
    let (upto, id) = s
        .purged
        .as_ref()
        .map_or((0, &[][..]), |(i, b)| (*i, &b[..]));
    p.extend_from_slice(&upto.to_le_bytes());
    p.extend_from_slice(&(id.len() as u32).to_le_bytes());
    p.extend_from_slice(id);
    p
}

fn decode_state(p: &[u8]) -> Option<WalState> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let b = p.get(at..at.checked_add(n)?)?;
        at += n;
        Some(b)
    };
    let node_id = u64_at(take(8)?, 0);
    let has_vote = take(1)?[0];
    let vote_len = u32_at(take(4)?, 0) as usize;
    let vote = take(vote_len)?.to_vec();
    let has_purged = take(1)?[0];
    let upto = u64_at(take(8)?, 0);
    let id_len = u32_at(take(4)?, 0) as usize;
    let id = take(id_len)?.to_vec();
    if at != p.len() || has_vote > 1 || has_purged > 1 {
        return None;
    }
    Some(WalState {
        node_id,
        vote: (has_vote == 1).then_some(vote),
        purged: (has_purged == 1).then_some((upto, id)),
    })
}

/// Writes `state` as `seq` into its slot and syncs.
fn write_state(file: &File, seq: u64, state: &WalState) -> io::Result<()> {
    let payload = encode_state(state);
    if payload.len() as u64 > STATE_SLOT - STATE_HEADER as u64 {
        return Err(io::Error::other(format!(
            "raft state of {} bytes does not fit its slot",
            payload.len()
        )));
    }
    let mut b = Vec::with_capacity(STATE_HEADER + payload.len());
    b.extend_from_slice(&STATE_MAGIC.to_le_bytes());
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let crc = crc_of(&[&b[4..16], &payload]);
    b.extend_from_slice(&crc.to_le_bytes());
    b.extend_from_slice(&payload);
    file.write_all_at(&b, (seq % 2) * STATE_SLOT)?;
    file.sync_data()
}

/// The valid slot with the higher sequence number.
fn read_state(bytes: &[u8]) -> Option<(u64, WalState)> {
    let mut best: Option<(u64, WalState)> = None;
    for slot in bytes.chunks(STATE_SLOT as usize).take(2) {
        if slot.len() < STATE_HEADER || u32_at(slot, 0) != STATE_MAGIC {
            continue;
        }
        let (seq, len) = (u64_at(slot, 4), u32_at(slot, 12) as usize);
        let Some(payload) = slot.get(STATE_HEADER..STATE_HEADER + len) else {
            continue;
        };
        if crc_of(&[&slot[4..16], payload]) != u32_at(slot, 16) {
            continue;
        }
        if let Some(s) = decode_state(payload) {
            if best.as_ref().is_none_or(|(b, _)| seq > *b) {
                best = Some((seq, s));
            }
        }
    }
    best
}

fn seg_header(seq: u64, node_id: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(SEG_HEADER as usize);
    h.extend_from_slice(&SEG_MAGIC.to_le_bytes());
    h.extend_from_slice(&SEG_FORMAT.to_le_bytes());
    h.extend_from_slice(&seq.to_le_bytes());
    h.extend_from_slice(&node_id.to_le_bytes());
    let crc = crc_fast::crc32_iscsi(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h.resize(SEG_HEADER as usize, 0);
    h
}

/// Makes segment `seq` of `size` bytes in `dir`: header, zeros, synced, renamed into place,
/// directory synced.
fn make_segment(dir: &Path, seq: u64, node_id: u64, size: u64) -> io::Result<File> {
    let tmp = dir.join(format!(".seg-{seq:016x}.tmp"));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    f.write_all_at(&seg_header(seq, node_id), 0)?;
    // Real zeros, not a sparse file: later appends then change no block allocation, and
    // an fdatasync carries no metadata.
    let zeros = vec![0u8; 1 << 20];
    let mut at = SEG_HEADER;
    while at < size {
        let n = (size - at).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    f.sync_all()?;
    std::fs::rename(&tmp, seg_path(dir, seq))?;
    fsync_dir(dir)?;
    Ok(f)
}

/// A record, padded with zeros to whole sectors.
fn record(kind: u8, first: u64, entries: &[&[u8]]) -> Vec<u8> {
    let len: usize = entries.iter().map(|e| 4 + e.len()).sum();
    let mut r = Vec::with_capacity(sector_up(REC_HEADER + len as u64) as usize);
    r.extend_from_slice(&REC_MAGIC.to_le_bytes());
    r.extend_from_slice(&[kind, 0, 0, 0]);
    r.extend_from_slice(&(len as u32).to_le_bytes());
    r.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    r.extend_from_slice(&first.to_le_bytes());
    r.extend_from_slice(&[0; 8]);
    for e in entries {
        r.extend_from_slice(&(e.len() as u32).to_le_bytes());
        r.extend_from_slice(e);
    }
    let crc = crc_of(&[&r[..24], &r[REC_HEADER as usize..]]);
    r[24..28].copy_from_slice(&crc.to_le_bytes());
    let crc = crc_fast::crc32_iscsi(&r[..28]);
    r[28..32].copy_from_slice(&crc.to_le_bytes());
    r.resize(sector_up(r.len() as u64) as usize, 0);
    r
}

fn sector_up(n: u64) -> u64 {
    n.div_ceil(SECTOR) * SECTOR
}

/// The record header at `at`, if its own checksum holds: (kind, payload length, count,
/// first index, payload checksum).
fn parse_header(img: &[u8], at: u64) -> Option<(u8, u64, u32, u64, u32)> {
    let h = img.get(at as usize..(at + REC_HEADER) as usize)?;
    if u32_at(h, 0) != REC_MAGIC || h[5..8] != [0, 0, 0] {
        return None;
    }
    if crc_fast::crc32_iscsi(&h[..28]) != u32_at(h, 28) {
        return None;
    }
    Some((
        h[4],
        u32_at(h, 8) as u64,
        u32_at(h, 12),
        u64_at(h, 16),
        u32_at(h, 24),
    ))
}

/// Whether the damaged record at `at` (the first invalid one of the last segment) is a
/// torn append rather than damage to an acknowledged one. Sectors are written whole, and
/// a segment starts zeroed: an append cut short leaves its header sector all zeros, or a
/// valid header and some payload sector all zeros. A flipped bit leaves no zero sector
/// (unless the entry itself held 512 aligned zero bytes: then it is taken for torn).
fn looks_torn(img: &[u8], at: u64) -> bool {
    let zero = |from: u64| {
        let end = (from + SECTOR).min(img.len() as u64);
        img[from as usize..end as usize].iter().all(|&b| b == 0)
    };
    if zero(at) {
        return true;
    }
    let Some((_, len, ..)) = parse_header(img, at) else {
        return false;
    };
    let end = (at + sector_up(REC_HEADER + len)).min(img.len() as u64);
    (at..end).step_by(SECTOR as usize).any(zero)
}

/// A record found valid in a segment image.
struct Parsed {
    kind: u8,
    first: u64,
    /// (offset in the segment, length) of each entry.
    entries: Vec<(u64, u32)>,
    end: u64,
}

/// The record at `at` of `img`, if it is whole and valid.
fn parse_record(img: &[u8], at: u64) -> Option<Parsed> {
    let (kind, len, count, first, crc) = parse_header(img, at)?;
    if len > MAX_RECORD || (count as u64) * 4 > len {
        return None;
    }
    let end = at + REC_HEADER + len;
    let payload = img.get((at + REC_HEADER) as usize..end as usize)?;
    let h = &img[at as usize..(at + REC_HEADER) as usize];
    if crc_of(&[&h[..24], payload]) != crc {
        return None;
    }
    let mut entries = Vec::with_capacity(count as usize);
    let mut p = 0usize;
    for _ in 0..count {
        let n = u32_at(payload.get(p..p + 4)?, 0);
        let start = p + 4;
        p = start
            .checked_add(n as usize)
            .filter(|&e| e <= payload.len())?;
        entries.push((at + REC_HEADER + start as u64, n));
    }
    let ok = match kind {
        // Indexes `first..first + count` must exist.
        KIND_ENTRIES => {
            p == payload.len() && count > 0 && first.checked_add(count as u64).is_some()
        }
        KIND_TRUNCATE => len == 0 && count == 0,
        _ => false,
    };
    ok.then_some(Parsed {
        kind,
        first,
        entries,
        end: sector_up(end),
    })
}

/// Whether any valid record starts at a sector of `img[from..]`.
fn any_valid_record(img: &[u8], from: u64) -> bool {
    (sector_up(from)..img.len() as u64)
        .step_by(SECTOR as usize)
        .any(|at| parse_record(img, at).is_some())
}

/// Replay state while opening.
struct Replay {
    purged: Option<u64>,
    index: Index,
}

impl Replay {
    fn apply(&mut self, seg: u64, p: &Parsed, file: &Path) -> Result<(), String> {
        match p.kind {
            KIND_TRUNCATE => self.index.truncate(p.first),
            _ => {
                let first = p.first;
                if let Some(last) = self.index.last() {
                    // A jump is legal only inside the purged prefix (a snapshot installed
                    // past the log's end purged it all, and the log went on after it).
                    let within = |i: u64| self.purged.is_some_and(|pu| i <= pu);
                    if first != last + 1 {
                        if within(last) && first.checked_sub(1).is_none_or(within) {
                            self.index.locs.clear();
                        } else {
                            return Err(format!(
                                "{}: entries from index {first} follow index {last}: a hole",
                                file.display()
                            ));
                        }
                    }
                }
                if self.index.locs.is_empty() {
                    self.index.first = first;
                }
                for &(off, len) in &p.entries {
                    self.index.locs.push_back(Loc { seg, off, len });
                }
                let max = first + p.entries.len() as u64 - 1;
                let s = self.index.segs.get_mut(&seg).expect("segment being read");
                s.max_index = Some(s.max_index.map_or(max, |m| m.max(max)));
            }
        }
        Ok(())
    }
}

impl Wal {
    /// Opens the log in `dir`, made for `node_id` if `dir` does not exist (from
    /// `migrate`'s state and entries when given). Refuses a log of another node, and any
    /// damage other than a torn last append (module doc).
    pub(crate) fn open(
        dir: &Path,
        node_id: u64,
        segment_bytes: u64,
        migrate: Option<Seed>,
    ) -> Result<Wal, String> {
        let name = dir.display();
        if !dir.exists() {
            Self::create(dir, node_id, segment_bytes, migrate)
                .map_err(|e| format!("raft log {name}: cannot create: {e}"))?;
        }
        let io = |what: &str, e: io::Error| format!("raft log {name}: {what}: {e}");
        let state_path = dir.join(STATE_FILE);
        let state_file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&state_path)
            .map_err(|e| io("cannot open the state file", e))?;
        let len = (state_file
            .metadata()
            .map_err(|e| io("reading state", e))?
            .len())
        .min(2 * STATE_SLOT);
        let mut buf = vec![0u8; len as usize];
        (state_file.read_exact_at(&mut buf, 0)).map_err(|e| io("reading state", e))?;
        let Some((state_seq, state)) = read_state(&buf) else {
            return Err(format!(
                "raft log {}: corrupt: no valid state slot",
                state_path.display()
            ));
        };
        if state.node_id != node_id {
            return Err(format!(
                "raft log {name} belongs to node {}, not to node {node_id}",
                state.node_id
            ));
        }
        let mut seqs = Vec::new();
        for ent in std::fs::read_dir(dir).map_err(|e| io("listing", e))? {
            let ent = ent.map_err(|e| io("listing", e))?;
            let fname = ent.file_name();
            let fname = fname.to_string_lossy();
            if let Some(hex) = fname.strip_prefix("seg-") {
                let seq = u64::from_str_radix(hex, 16)
                    .map_err(|_| format!("raft log {name}: unexpected file {fname}"))?;
                seqs.push(seq);
            } else if fname.starts_with(".seg-") {
                // A segment whose making was cut short: never written to.
                let _ = std::fs::remove_file(ent.path());
            }
        }
        seqs.sort_unstable();
        if seqs.is_empty() {
            return Err(format!("raft log {name}: corrupt: no segment"));
        }
        if let Some(w) = seqs.windows(2).find(|w| w[1] != w[0] + 1) {
            return Err(format!(
                "raft log {name}: corrupt: segments {:x} and {:x} with none between",
                w[0], w[1]
            ));
        }
        let mut replay = Replay {
            purged: state.purged.as_ref().map(|p| p.0),
            index: Index {
                first: 0,
                locs: VecDeque::new(),
                segs: BTreeMap::new(),
            },
        };
        let last_seq = *seqs.last().expect("not empty");
        let mut tail = None;
        for &seq in &seqs {
            let path = seg_path(dir, seq);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| format!("raft log {}: cannot open: {e}", path.display()))?;
            let size = file
                .metadata()
                .map_err(|e| format!("raft log {}: {e}", path.display()))?
                .len();
            // Segments are made at most this large (one record larger than a segment gets
            // a segment of its own).
            if size > segment_bytes.max(round_up(FIRST_RECORD + sector_up(REC_HEADER + MAX_RECORD)))
            {
                return Err(format!(
                    "raft log {}: corrupt: {size} bytes, larger than any segment",
                    path.display()
                ));
            }
            let mut img = vec![0u8; size as usize];
            file.read_exact_at(&mut img, 0)
                .map_err(|e| format!("raft log {}: reading: {e}", path.display()))?;
            if img.get(..SEG_HEADER as usize) != Some(&seg_header(seq, node_id)[..]) {
                return Err(format!(
                    "raft log {}: corrupt segment header (or another node's)",
                    path.display()
                ));
            }
            let file = Arc::new(file);
            replay.index.segs.insert(
                seq,
                Segment {
                    file: file.clone(),
                    path: path.clone(),
                    max_index: None,
                },
            );
            let mut at = FIRST_RECORD;
            while let Some(p) = parse_record(&img, at) {
                replay.apply(seq, &p, &path)?;
                at = p.end;
            }
            let rest = &img[at as usize..];
            if let Some(dirty) = rest.iter().rposition(|&b| b != 0) {
                let what = format!("raft log {}: damaged record at offset {at}", path.display());
                if seq != last_seq {
                    return Err(format!("{what}, in a segment followed by others"));
                }
                if any_valid_record(&img, at + 1) {
                    return Err(format!("{what}, with valid records after it"));
                }
                if !looks_torn(&img, at) {
                    return Err(format!("{what} (not a torn append: no unwritten sector)"));
                }
                // A torn append: it was never acknowledged (its fdatasync did not return).
                tracing::warn!(
                    file = %path.display(),
                    offset = at,
                    bytes = dirty + 1,
                    "raft log: dropping a torn append at the tail"
                );
                file.write_all_at(&vec![0u8; dirty + 1], at)
                    .and_then(|()| file.sync_data())
                    .map_err(|e| {
                        format!("raft log {}: zeroing a torn tail: {e}", path.display())
                    })?;
            }
            if seq == last_seq {
                tail = Some((seq, file, at, img.len() as u64));
            }
        }
        let mut index = replay.index;
        if let Some(pu) = replay.purged {
            index.purge(pu);
            if index.first != pu + 1 {
                return Err(format!(
                    "raft log {name}: corrupt: the log starts at index {} after purging up to {pu}",
                    index.first
                ));
            }
        }
        let (seq, file, off, size) = tail.expect("at least one segment");
        let wal = Wal {
            dir: dir.to_path_buf(),
            segment_bytes,
            tail: Mutex::new(Tail {
                seq,
                file,
                off,
                size,
                state,
                state_seq,
                state_file,
            }),
            index: Mutex::new(index),
        };
        wal.drop_purged_segments()
            .map_err(|e| format!("raft log {name}: removing purged segments: {e}"))?;
        Ok(wal)
    }

    /// Makes the directory whole under a temporary name, then renames it into place.
    fn create(
        dir: &Path,
        node_id: u64,
        segment_bytes: u64,
        migrate: Option<Seed>,
    ) -> io::Result<()> {
        let parent = dir.parent().unwrap_or(Path::new("."));
        let mut tmp_name = dir.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(".tmp");
        let tmp = parent.join(tmp_name);
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        let (state, entries) = migrate.unwrap_or((
            WalState {
                node_id,
                ..WalState::default()
            },
            Vec::new(),
        ));
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(tmp.join(STATE_FILE))?;
        f.set_len(2 * STATE_SLOT)?;
        write_state(&f, 1, &state)?;
        f.sync_all()?;
        // Migrated entries go in records of at most a segment each, in as many segments
        // as they need.
        let mut seq = 1;
        let mut seg = make_segment(&tmp, seq, node_id, segment_bytes)?;
        let (mut off, mut size) = (FIRST_RECORD, segment_bytes);
        let mut i = 0;
        while i < entries.len() {
            let mut j = i;
            let mut bytes = REC_HEADER;
            while j < entries.len()
                && (j == i || sector_up(bytes + 4 + entries[j].1.len() as u64) <= size - off)
            {
                if j > i && entries[j].0 != entries[j - 1].0 + 1 {
                    break;
                }
                bytes += 4 + entries[j].1.len() as u64;
                j += 1;
            }
            if off + sector_up(bytes) > size {
                seg.sync_all()?;
                seq += 1;
                size = segment_bytes.max(round_up(FIRST_RECORD + sector_up(bytes)));
                seg = make_segment(&tmp, seq, node_id, size)?;
                off = FIRST_RECORD;
                continue;
            }
            let refs: Vec<&[u8]> = entries[i..j].iter().map(|e| &e.1[..]).collect();
            let r = record(KIND_ENTRIES, entries[i].0, &refs);
            seg.write_all_at(&r, off)?;
            off += r.len() as u64;
            i = j;
        }
        seg.sync_all()?;
        fsync_dir(&tmp)?;
        std::fs::rename(&tmp, dir)?;
        fsync_dir(parent)
    }

    pub(crate) fn state(&self) -> WalState {
        self.tail.lock().expect("raft log tail").state.clone()
    }

    /// Records `vote` durably.
    pub(crate) fn save_vote(&self, vote: Vec<u8>) -> io::Result<()> {
        let mut t = self.tail.lock().expect("raft log tail");
        let mut s = t.state.clone();
        s.vote = Some(vote);
        Self::save_state(&mut t, s)
    }

    fn save_state(t: &mut Tail, s: WalState) -> io::Result<()> {
        write_state(&t.state_file, t.state_seq + 1, &s)?;
        t.state_seq += 1;
        t.state = s;
        Ok(())
    }

    /// Last index held, if any.
    pub(crate) fn last_index(&self) -> Option<u64> {
        self.index.lock().expect("raft log index").last()
    }

    /// Writes `rec` at the tail (in a new segment if it does not fit) and syncs it.
    /// Returns the segment and offset it went to.
    fn write_record(&self, t: &mut Tail, rec: &[u8]) -> io::Result<(u64, u64)> {
        let len = rec.len() as u64;
        if t.off + len > t.size {
            let seq = t.seq + 1;
            let size = self.segment_bytes.max(round_up(FIRST_RECORD + len));
            let node_id = t.state.node_id;
            let file = Arc::new(make_segment(&self.dir, seq, node_id, size)?);
            let path = seg_path(&self.dir, seq);
            self.index.lock().expect("raft log index").segs.insert(
                seq,
                Segment {
                    file: file.clone(),
                    path,
                    max_index: None,
                },
            );
            (t.seq, t.file, t.off, t.size) = (seq, file, FIRST_RECORD, size);
        }
        let at = t.off;
        t.file.write_all_at(rec, at)?;
        t.file.sync_data()?;
        t.off += len;
        Ok((t.seq, at))
    }

    /// Appends `entries` as indexes `first..`; `first` must be one past the last index
    /// (or the log empty). Durable when it returns.
    pub(crate) fn append(&self, first: u64, entries: &[&[u8]]) -> io::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let total: u64 = entries.iter().map(|e| 4 + e.len() as u64).sum();
        if total > MAX_RECORD || entries.len() > u32::MAX as usize {
            return Err(io::Error::other(format!(
                "an append of {} entries and {total} bytes exceeds a record's {MAX_RECORD}",
                entries.len()
            )));
        }
        let mut t = self.tail.lock().expect("raft log tail");
        {
            let ix = self.index.lock().expect("raft log index");
            let want = ix.last().map_or(ix.first, |l| l + 1);
            if first != want && !(ix.locs.is_empty() && first >= ix.first) {
                return Err(io::Error::other(format!(
                    "append at index {first}, the log continues at {want}"
                )));
            }
        }
        let rec = record(KIND_ENTRIES, first, entries);
        let (seq, at) = self.write_record(&mut t, &rec)?;
        let mut ix = self.index.lock().expect("raft log index");
        if ix.locs.is_empty() {
            ix.first = first;
        }
        let mut off = at + REC_HEADER;
        for e in entries {
            ix.locs.push_back(Loc {
                seg: seq,
                off: off + 4,
                len: e.len() as u32,
            });
            off += 4 + e.len() as u64;
        }
        let max = first + entries.len() as u64 - 1;
        let s = ix.segs.get_mut(&seq).expect("tail segment");
        s.max_index = Some(s.max_index.map_or(max, |m| m.max(max)));
        Ok(())
    }

    /// Drops indexes `since..`, durably.
    pub(crate) fn truncate(&self, since: u64) -> io::Result<()> {
        let mut t = self.tail.lock().expect("raft log tail");
        let rec = record(KIND_TRUNCATE, since, &[]);
        self.write_record(&mut t, &rec)?;
        self.index.lock().expect("raft log index").truncate(since);
        Ok(())
    }

    /// Drops indexes `..=upto` and records `id` (the caller's log id of `upto`) as the last
    /// purged, durably; then deletes segments holding nothing newer.
    pub(crate) fn purge(&self, upto: u64, id: Vec<u8>) -> io::Result<()> {
        {
            let mut t = self.tail.lock().expect("raft log tail");
            let mut s = t.state.clone();
            s.purged = Some((upto, id));
            Self::save_state(&mut t, s)?;
            self.index.lock().expect("raft log index").purge(upto);
        }
        self.drop_purged_segments()
    }

    /// Deletes the longest prefix of segments (never the tail one) whose every written
    /// index is at or below the last purged index.
    fn drop_purged_segments(&self) -> io::Result<()> {
        let t = self.tail.lock().expect("raft log tail");
        let Some((upto, _)) = t.state.purged else {
            return Ok(());
        };
        let mut ix = self.index.lock().expect("raft log index");
        let doomed: Vec<u64> = ix
            .segs
            .iter()
            .take_while(|(&seq, s)| seq != t.seq && s.max_index.is_none_or(|m| m <= upto))
            .map(|(&seq, _)| seq)
            .collect();
        for seq in &doomed {
            let s = ix.segs.remove(seq).expect("listed");
            std::fs::remove_file(&s.path)?;
        }
        drop(ix);
        if !doomed.is_empty() {
            fsync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// The entries at indexes `from..to` that the log holds, in order.
    pub(crate) fn read(&self, from: u64, to: u64) -> io::Result<Vec<(u64, Vec<u8>)>> {
        let (first, picks) = {
            let ix = self.index.lock().expect("raft log index");
            let from = from.max(ix.first);
            let to = to.min(ix.last().map_or(ix.first, |l| l + 1));
            let mut picks = Vec::new();
            for i in from..to {
                let loc = ix.locs[(i - ix.first) as usize];
                let file = ix.segs.get(&loc.seg).expect("segment of a live entry");
                picks.push((loc, file.file.clone()));
            }
            (from, picks)
        };
        let mut out = Vec::with_capacity(picks.len());
        let mut k = 0;
        while k < picks.len() {
            // One read for a run of entries of one segment.
            let mut j = k + 1;
            while j < picks.len() && picks[j].0.seg == picks[k].0.seg {
                j += 1;
            }
            let (start, end) = (
                picks[k].0.off,
                picks[j - 1].0.off + picks[j - 1].0.len as u64,
            );
            let mut buf = vec![0u8; (end - start) as usize];
            picks[k].1.read_exact_at(&mut buf, start)?;
            for (n, (loc, _)) in picks[k..j].iter().enumerate() {
                let at = (loc.off - start) as usize;
                out.push((
                    first + (k + n) as u64,
                    buf[at..at + loc.len as usize].to_vec(),
                ));
            }
            k = j;
        }
        Ok(out)
    }

    /// Segment file and offset of index `i` (tests damage it there).
    #[cfg(test)]
    pub(crate) fn location(&self, i: u64) -> Option<(PathBuf, u64, u32)> {
        let ix = self.index.lock().expect("raft log index");
        let loc = ix.locs.get(i.checked_sub(ix.first)? as usize)?;
        Some((ix.segs[&loc.seg].path.clone(), loc.off, loc.len))
    }
}

fn round_up(n: u64) -> u64 {
    n.div_ceil(1 << 20) << 20
}

#[cfg(test)]
impl Wal {
    /// The tail segment and where its next record goes (tests write torn appends there).
    fn tail_at(&self) -> (PathBuf, u64) {
        let t = self.tail.lock().unwrap();
        (seg_path(&self.dir, t.seq), t.off)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::Rng;

    const NODE: u64 = 7;

    fn open(dir: &Path, seg: u64) -> Result<Wal, String> {
        Wal::open(dir, NODE, seg, None)
    }

    fn entry(i: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len.max(8)];
        b[..8].copy_from_slice(&i.to_le_bytes());
        for (k, x) in b.iter_mut().enumerate().skip(8) {
            *x = (i as usize * 31 + k) as u8 | 1;
        }
        b
    }

    fn append(w: &Wal, first: u64, lens: &[usize]) {
        let es: Vec<Vec<u8>> = (0..lens.len())
            .map(|k| entry(first + k as u64, lens[k]))
            .collect();
        let refs: Vec<&[u8]> = es.iter().map(|e| &e[..]).collect();
        w.append(first, &refs).unwrap();
    }

    fn all(w: &Wal) -> Vec<(u64, Vec<u8>)> {
        w.read(0, u64::MAX).unwrap()
    }

    fn flip(path: &Path, at: u64) {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x10], at).unwrap();
    }

    #[test]
    fn appends_truncations_purges_and_votes_survive_reopening() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let w = open(&dir, 64 << 10).unwrap();
        assert_eq!(w.state().node_id, NODE);
        assert_eq!(w.last_index(), None);
        append(&w, 1, &[100, 5000, 20]);
        append(&w, 4, &[70_000]); // larger than a segment: a segment of its own
        append(&w, 5, &[10; 40]);
        w.truncate(30).unwrap();
        append(&w, 30, &[33, 44]);
        w.save_vote(b"vote-3".to_vec()).unwrap();
        w.purge(2, b"id-2".to_vec()).unwrap();
        assert!(w.append(40, &[b"x"]).is_err(), "a hole is refused");
        let want = all(&w);
        assert_eq!(want.first().unwrap().0, 3);
        assert_eq!(want.last().unwrap().0, 31);
        assert_eq!(want.len(), 29);
        for (i, e) in &want {
            assert_eq!(&e[..8], &i.to_le_bytes());
        }
        drop(w);
        let w = open(&dir, 64 << 10).unwrap();
        assert_eq!(all(&w), want);
        assert_eq!(w.state().vote.as_deref(), Some(&b"vote-3"[..]));
        assert_eq!(w.state().purged, Some((2, b"id-2".to_vec())));
        assert_eq!(w.read(10, 12).unwrap(), want[7..9].to_vec());
        // A purge past every segment but the tail deletes them; the log goes on.
        w.purge(31, b"id-31".to_vec()).unwrap();
        assert_eq!(all(&w), vec![]);
        assert_eq!(w.last_index(), None);
        let segs = || std::fs::read_dir(&dir).unwrap().count() - 1;
        assert_eq!(segs(), 1, "only the tail segment is left");
        append(&w, 32, &[9]);
        drop(w);
        let w = open(&dir, 64 << 10).unwrap();
        assert_eq!(all(&w).iter().map(|e| e.0).collect::<Vec<_>>(), vec![32]);
        // Another node's log is refused.
        drop(w);
        let err = Wal::open(&dir, NODE + 1, 64 << 10, None).err().unwrap();
        assert!(err.contains("belongs to node 7, not to node 8"), "{err}");
    }

    #[test]
    fn a_snapshot_past_the_end_purges_everything_and_the_log_restarts_after_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let w = open(&dir, 64 << 10).unwrap();
        append(&w, 1, &[10; 5]);
        w.purge(500, b"id-500".to_vec()).unwrap();
        append(&w, 501, &[10; 2]);
        drop(w);
        let w = open(&dir, 64 << 10).unwrap();
        assert_eq!(
            all(&w).iter().map(|e| e.0).collect::<Vec<_>>(),
            vec![501, 502]
        );
    }

    #[test]
    fn a_torn_append_is_dropped_and_the_log_goes_on() {
        for case in 0..3 {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("log");
            let w = open(&dir, 64 << 10).unwrap();
            append(&w, 1, &[300, 2000]);
            let want = all(&w);
            let (seg, at) = w.tail_at();
            drop(w);
            // The append of entries 3.. (3 sectors) cut short by a crash.
            let e3 = entry(3, 1200);
            let rec = record(KIND_ENTRIES, 3, &[&e3]);
            assert!(rec.len() >= 3 * SECTOR as usize);
            let f = OpenOptions::new().write(true).open(&seg).unwrap();
            match case {
                // Only the header sector made it.
                0 => f.write_all_at(&rec[..SECTOR as usize], at).unwrap(),
                // Everything but the header sector.
                1 => f
                    .write_all_at(&rec[SECTOR as usize..], at + SECTOR)
                    .unwrap(),
                // The first two sectors.
                _ => f.write_all_at(&rec[..2 * SECTOR as usize], at).unwrap(),
            }
            drop(f);
            let w = open(&dir, 64 << 10).unwrap();
            assert_eq!(all(&w), want, "case {case}");
            append(&w, 3, &[10]);
            drop(w);
            let w = open(&dir, 64 << 10).unwrap();
            assert_eq!(all(&w).len(), 3, "case {case}");
        }
    }

    #[test]
    fn damage_to_an_acknowledged_record_refuses_to_open() {
        let setup = || {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("log");
            let w = open(&dir, 64 << 10).unwrap();
            append(&w, 1, &[300]);
            append(&w, 2, &[1500]);
            append(&w, 3, &[700]);
            let (seg, _) = w.tail_at();
            drop(w);
            (tmp, dir, seg)
        };
        // In a middle record: records after it are whole.
        let (_tmp, dir, seg) = setup();
        flip(&seg, FIRST_RECORD + REC_HEADER + 100);
        let err = open(&dir, 64 << 10).err().unwrap();
        assert!(err.contains("damaged record at offset 512"), "{err}");
        assert!(err.contains("valid records after it"), "{err}");
        // In the last record's payload, and in its header: no sector was left unwritten.
        for at in [REC_HEADER + 600, 9] {
            let (_tmp, dir, seg) = setup();
            let last = FIRST_RECORD + SECTOR + sector_up(REC_HEADER + 4 + 1500);
            flip(&seg, last + at);
            let err = open(&dir, 64 << 10).err().unwrap();
            assert!(err.contains("not a torn append"), "{err}");
        }
        // In a segment followed by others.
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let w = open(&dir, 8 << 10).unwrap();
        for i in 1..=8 {
            append(&w, i, &[3000]);
        }
        let (first, ..) = w.location(1).unwrap();
        drop(w);
        flip(&first, FIRST_RECORD + REC_HEADER + 10);
        let err = open(&dir, 8 << 10).err().unwrap();
        assert!(err.contains("followed by others"), "{err}");
        // A damaged state file keeps its other slot; both damaged is an error.
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let w = open(&dir, 64 << 10).unwrap();
        w.save_vote(b"v1".to_vec()).unwrap(); // seq 2, slot 0
        w.save_vote(b"v2".to_vec()).unwrap(); // seq 3, slot 1
        drop(w);
        flip(&dir.join(STATE_FILE), STATE_SLOT + 30);
        let w = open(&dir, 64 << 10).unwrap();
        assert_eq!(
            w.state().vote.as_deref(),
            Some(&b"v1"[..]),
            "the older slot"
        );
        drop(w);
        flip(&dir.join(STATE_FILE), 30);
        let err = open(&dir, 64 << 10).err().unwrap();
        assert!(err.contains("no valid state slot"), "{err}");
    }

    /// A seeded model check: random appends, truncations, purges and votes, with crashes
    /// that cut the next append short at a random sector; after every reopen the log and
    /// the state equal the model's (what was acknowledged, nothing torn).
    #[test]
    fn random_operations_and_torn_crashes_keep_what_was_acknowledged() {
        for seed in 0..40u64 {
            let mut rng = Rng::new(seed);
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("log");
            let seg = [4096u64, 16 << 10, 1 << 20][rng.below(3) as usize];
            let mut w = open(&dir, seg).unwrap();
            let mut model: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
            let (mut next, mut vote, mut purged) = (1u64, None, None);
            for step in 0..300 {
                let ctx = format!("seed {seed} step {step}");
                match rng.below(20) {
                    0..=11 => {
                        let n = 1 + rng.below(4) as usize;
                        let lens: Vec<usize> =
                            (0..n).map(|_| 1 + rng.below(3000) as usize).collect();
                        append(&w, next, &lens);
                        for (k, &l) in lens.iter().enumerate() {
                            model.insert(next + k as u64, entry(next + k as u64, l));
                        }
                        next += n as u64;
                    }
                    12..=13 if !model.is_empty() => {
                        let lo = *model.keys().next().unwrap();
                        let since = lo + rng.below(next - lo);
                        w.truncate(since).unwrap();
                        model.retain(|&i, _| i < since);
                        next = since;
                    }
                    14 if !model.is_empty() => {
                        let lo = *model.keys().next().unwrap();
                        // Sometimes past the end, as a snapshot install does.
                        let upto = lo + rng.below(next - lo + 3);
                        w.purge(upto, upto.to_le_bytes().to_vec()).unwrap();
                        model.retain(|&i, _| i > upto);
                        next = next.max(upto + 1);
                        purged = Some((upto, upto.to_le_bytes().to_vec()));
                    }
                    15 => {
                        let v = rng.next_u64().to_le_bytes().to_vec();
                        w.save_vote(v.clone()).unwrap();
                        vote = Some(v);
                    }
                    16..=17 => {
                        // Crash, maybe in the middle of an append that never returned.
                        if rng.chance(600_000) {
                            let (path, at) = w.tail_at();
                            let e = entry(next, 1 + rng.below(3000) as usize);
                            let rec = record(KIND_ENTRIES, next, &[&e]);
                            let sectors = rec.len() / SECTOR as usize;
                            let f = OpenOptions::new().write(true).open(&path).unwrap();
                            let len = f.metadata().unwrap().len();
                            for s in 0..sectors {
                                let off = at + (s as u64) * SECTOR;
                                // Any sector may or may not have made it, but not all.
                                if off + SECTOR <= len && rng.chance(500_000) && s + 1 < sectors {
                                    let b = &rec[s * SECTOR as usize..(s + 1) * SECTOR as usize];
                                    f.write_all_at(b, off).unwrap();
                                }
                            }
                        }
                        drop(w);
                        w = open(&dir, seg).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                    }
                    _ => {}
                }
                let got: BTreeMap<u64, Vec<u8>> = all(&w).into_iter().collect();
                assert_eq!(got, model, "{ctx}");
                assert_eq!(w.state().vote, vote, "{ctx}");
                assert_eq!(w.state().purged, purged, "{ctx}");
            }
        }
    }
}
