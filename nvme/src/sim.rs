//! [`SimDevice`]: an in-memory device for the deterministic simulator.
//!
//! Every random choice comes from one splitmix64 stream seeded at construction, so the same
//! seed and the same sequence of calls give the same completions, data and crash outcome.
//!
//! Model:
//! - Requests do nothing when submitted; each takes effect when [`BlockDevice::poll`] picks
//!   it for completion. `poll` completes a random subset of the requests in flight, in a
//!   random order (with `wait`, at least one; without, sometimes none). A `Flush` can only be
//!   picked once every request submitted before it has completed; requests submitted after
//!   a flush may overtake it (the contract does not order them).
//! - Storage is a sparse *durable image* of 4 KiB blocks (absent = zeros), a *volatile view*
//!   of blocks written since the last flush, and the list of writes completed since the
//!   last flush, in completion order. Reads see the volatile view. A successful flush makes
//!   every completed write durable.
//! - [`SimDevice::crash`] drops everything in flight and decides for each unflushed write:
//!   lost, applied entirely, or (with [`SimFaults::torn_writes`]) torn - a random subset of
//!   its 512-byte sectors applied.
//! - An injected write error leaves nothing, all, or (with `torn_writes`) a random subset of
//!   the write behind (still unflushed), and fails the device: later submits are refused
//!   with [`IoError::Failed`] and writes/flushes still in flight complete with `Failed`,
//!   until [`SimDevice::crash`] (the simulator's "reopen").

use crate::rng::SplitMix64;
use crate::{
    check_batch, BlockDevice, IoCompletion, IoError, IoOp, IoRequest, BLOCK_SIZE, MAX_IN_FLIGHT,
    SECTOR_SIZE,
};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Fault injection knobs of a [`SimDevice`]. `Default` is a perfect device (apart from
/// crashes, which always lose or keep unflushed writes at random).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimFaults {
    /// Chance per read request of failing with [`IoError::Device`].
    pub read_error_per_million: u32,
    /// Chance per write request of failing with [`IoError::Device`] (fails the device).
    pub write_error_per_million: u32,
    /// Chance per successful read of one flipped bit in the returned data (storage intact).
    pub bit_flip_per_million: u32,
    /// Whether a crash (or a failed write) may apply a random subset of a write's sectors.
    pub torn_writes: bool,
}

/// Operation counters of a [`SimDevice`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Requests accepted by `submit`.
    pub submitted: u64,
    /// Batches refused by `submit` (any error).
    pub refused_batches: u64,
    /// Reads, writes and flushes completed (whatever their result).
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    /// Bytes returned by successful reads / accepted by successful writes.
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Injected faults.
    pub read_errors: u64,
    pub write_errors: u64,
    pub bit_flips: u64,
    /// Requests completed with [`IoError::Failed`] because the device had failed.
    pub failed_completions: u64,
    /// Bit flips injected into the durable image with [`SimDevice::corrupt_durable`].
    pub durable_corruptions: u64,
    /// Crashes, and what they did.
    pub crashes: u64,
    pub crash_dropped_in_flight: u64,
    pub crash_lost_writes: u64,
    pub crash_applied_writes: u64,
    pub crash_torn_writes: u64,
}

struct InFlight {
    seq: u64,
    tag: u64,
    op: IoOp,
}

/// A completed but not yet flushed write.
struct PendingWrite {
    offset: u64,
    data: Vec<u8>,
}

/// Deterministic in-memory block device. See the module docs.
pub struct SimDevice {
    capacity: u64,
    seed: u64,
    rng: SplitMix64,
    faults: SimFaults,
    /// Block index -> BLOCK_SIZE bytes; absent blocks are zeros.
    durable: BTreeMap<u64, Box<[u8]>>,
    /// Latest content of the blocks written since the last flush.
    volatile: BTreeMap<u64, Box<[u8]>>,
    /// Writes completed since the last flush, in completion order.
    pending: Vec<PendingWrite>,
    /// Requests in flight, in submission order.
    in_flight: Vec<InFlight>,
    next_seq: u64,
    failed: bool,
    stats: SimStats,
}

const BS: u64 = BLOCK_SIZE as u64;

impl SimDevice {
    /// A zero-filled device of `capacity_bytes` (rounded down to [`BLOCK_SIZE`]).
    pub fn new(capacity_bytes: u64, seed: u64, faults: SimFaults) -> Self {
        SimDevice {
            capacity: capacity_bytes / BS * BS,
            seed,
            rng: SplitMix64::new(seed),
            faults,
            durable: BTreeMap::new(),
            volatile: BTreeMap::new(),
            pending: Vec::new(),
            in_flight: Vec::new(),
            next_seq: 0,
            failed: false,
            stats: SimStats::default(),
        }
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn faults(&self) -> SimFaults {
        self.faults
    }

    pub fn set_faults(&mut self, faults: SimFaults) {
        self.faults = faults;
    }

    pub fn stats(&self) -> SimStats {
        self.stats
    }

    /// Whether an injected write error has failed the device (until [`SimDevice::crash`]).
    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// Writes completed since the last successful flush (what a crash may lose or tear).
    pub fn unflushed_writes(&self) -> usize {
        self.pending.len()
    }

    /// Simulate power loss and reopen: drop everything in flight, lose, apply or tear every
    /// unflushed write (see [`SimFaults::torn_writes`]), clear the failed state.
    pub fn crash(&mut self) {
        self.stats.crashes += 1;
        self.stats.crash_dropped_in_flight += self.in_flight.len() as u64;
        self.in_flight.clear();
        let pending = std::mem::take(&mut self.pending);
        let outcomes = if self.faults.torn_writes { 3 } else { 2 };
        for w in pending {
            match self.rng.below(outcomes) {
                0 => self.stats.crash_lost_writes += 1,
                1 => {
                    self.stats.crash_applied_writes += 1;
                    apply(&mut self.durable, w.offset, &w.data, None);
                }
                _ => {
                    self.stats.crash_torn_writes += 1;
                    let mask = self.sector_mask(w.data.len());
                    apply(&mut self.durable, w.offset, &w.data, Some(&mask));
                }
            }
        }
        self.volatile.clear();
        self.failed = false;
    }

    /// Flip one random bit in `offset..offset + len` of the durable image (bit rot). Reads
    /// see it unless a newer unflushed write covers that block.
    ///
    /// # Panics
    /// If the range is empty or beyond the capacity.
    pub fn corrupt_durable(&mut self, offset: u64, len: usize) {
        assert!(len > 0, "corrupt_durable: empty range");
        assert!(
            offset
                .checked_add(len as u64)
                .is_some_and(|end| end <= self.capacity),
            "corrupt_durable: range beyond the device"
        );
        let bit = self.rng.below(len as u64 * 8);
        let byte = offset + bit / 8;
        let block = self.durable.entry(byte / BS).or_insert_with(zero_block);
        block[(byte % BS) as usize] ^= 1 << (bit % 8);
        self.stats.durable_corruptions += 1;
    }

    /// Bytes of the durable image (what would survive a crash with no unflushed writes).
    pub fn read_durable(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        read_blocks(&self.durable, None, offset, &mut out);
        out
    }

    fn read_view(&self, offset: u64, buf: &mut [u8]) {
        read_blocks(&self.durable, Some(&self.volatile), offset, buf);
    }

    /// Record a completed (or partially completed, after an error) write.
    fn record_write(&mut self, offset: u64, data: Vec<u8>) {
        for (i, chunk) in data.chunks(BLOCK_SIZE).enumerate() {
            self.volatile
                .insert(offset / BS + i as u64, chunk.to_vec().into_boxed_slice());
        }
        self.pending.push(PendingWrite { offset, data });
    }

    fn sector_mask(&mut self, len: usize) -> Vec<bool> {
        (0..len / SECTOR_SIZE).map(|_| self.rng.coin()).collect()
    }

    fn execute(&mut self, r: InFlight) -> IoCompletion {
        let tag = r.tag;
        match r.op {
            IoOp::Read { offset, mut buf } => {
                self.stats.reads += 1;
                if self
                    .rng
                    .chance_per_million(self.faults.read_error_per_million)
                {
                    self.stats.read_errors += 1;
                    let e = IoError::Device(format!("injected read error at {offset}"));
                    return IoCompletion {
                        tag,
                        result: Err(e),
                        buf: Some(buf),
                    };
                }
                self.read_view(offset, &mut buf);
                self.stats.bytes_read += buf.len() as u64;
                if self
                    .rng
                    .chance_per_million(self.faults.bit_flip_per_million)
                {
                    self.stats.bit_flips += 1;
                    let bit = self.rng.below(buf.len() as u64 * 8);
                    buf[(bit / 8) as usize] ^= 1 << (bit % 8);
                }
                IoCompletion {
                    tag,
                    result: Ok(()),
                    buf: Some(buf),
                }
            }
            IoOp::Write { offset, buf } => {
                self.stats.writes += 1;
                if self.failed {
                    self.stats.failed_completions += 1;
                    return IoCompletion {
                        tag,
                        result: Err(IoError::Failed),
                        buf: Some(buf),
                    };
                }
                if self
                    .rng
                    .chance_per_million(self.faults.write_error_per_million)
                {
                    self.stats.write_errors += 1;
                    self.failed = true;
                    self.leave_failed_write_behind(offset, &buf);
                    let e = IoError::Device(format!("injected write error at {offset}"));
                    return IoCompletion {
                        tag,
                        result: Err(e),
                        buf: Some(buf),
                    };
                }
                self.stats.bytes_written += buf.len() as u64;
                self.record_write(offset, buf.to_vec());
                IoCompletion {
                    tag,
                    result: Ok(()),
                    buf: Some(buf),
                }
            }
            IoOp::Flush => {
                self.stats.flushes += 1;
                if self.failed {
                    self.stats.failed_completions += 1;
                    return IoCompletion {
                        tag,
                        result: Err(IoError::Failed),
                        buf: None,
                    };
                }
                for w in std::mem::take(&mut self.pending) {
                    apply(&mut self.durable, w.offset, &w.data, None);
                }
                self.volatile.clear();
                IoCompletion {
                    tag,
                    result: Ok(()),
                    buf: None,
                }
            }
        }
    }

    /// A failed write leaves nothing, everything, or some of its sectors behind.
    fn leave_failed_write_behind(&mut self, offset: u64, data: &[u8]) {
        let outcomes = if self.faults.torn_writes { 3 } else { 2 };
        match self.rng.below(outcomes) {
            0 => {}
            1 => self.record_write(offset, data.to_vec()),
            _ => {
                let mut merged = vec![0u8; data.len()];
                self.read_view(offset, &mut merged);
                let mask = self.sector_mask(data.len());
                for (s, &m) in mask.iter().enumerate() {
                    if m {
                        let r = s * SECTOR_SIZE..(s + 1) * SECTOR_SIZE;
                        merged[r.clone()].copy_from_slice(&data[r]);
                    }
                }
                self.record_write(offset, merged);
            }
        }
    }
}

fn zero_block() -> Box<[u8]> {
    vec![0u8; BLOCK_SIZE].into_boxed_slice()
}

fn read_blocks(
    durable: &BTreeMap<u64, Box<[u8]>>,
    volatile: Option<&BTreeMap<u64, Box<[u8]>>>,
    offset: u64,
    out: &mut [u8],
) {
    let mut pos = 0usize;
    while pos < out.len() {
        let abs = offset + pos as u64;
        let (blk, within) = (abs / BS, (abs % BS) as usize);
        let n = (BLOCK_SIZE - within).min(out.len() - pos);
        let src = volatile
            .and_then(|v| v.get(&blk))
            .or_else(|| durable.get(&blk));
        match src {
            Some(b) => out[pos..pos + n].copy_from_slice(&b[within..within + n]),
            None => out[pos..pos + n].fill(0),
        }
        pos += n;
    }
}

/// Write `data` at block-aligned `offset` into the durable image, all sectors or those in `mask`.
fn apply(durable: &mut BTreeMap<u64, Box<[u8]>>, offset: u64, data: &[u8], mask: Option<&[bool]>) {
    for (i, chunk) in data.chunks(BLOCK_SIZE).enumerate() {
        let blk = offset / BS + i as u64;
        match mask {
            None => {
                durable.insert(blk, chunk.to_vec().into_boxed_slice());
            }
            Some(mask) => {
                let per_block = BLOCK_SIZE / SECTOR_SIZE;
                let m = &mask[i * per_block..(i + 1) * per_block];
                if !m.iter().any(|&x| x) {
                    continue;
                }
                let block = durable.entry(blk).or_insert_with(zero_block);
                for (s, &on) in m.iter().enumerate() {
                    if on {
                        let r = s * SECTOR_SIZE..(s + 1) * SECTOR_SIZE;
                        block[r.clone()].copy_from_slice(&chunk[r]);
                    }
                }
            }
        }
    }
}

impl BlockDevice for SimDevice {
    fn describe(&self) -> String {
        let f = &self.faults;
        format!(
            "sim seed={:#x} capacity={} faults(read_err={}ppm write_err={}ppm bit_flip={}ppm torn={}){}",
            self.seed,
            self.capacity,
            f.read_error_per_million,
            f.write_error_per_million,
            f.bit_flip_per_million,
            f.torn_writes,
            if self.failed { " [FAILED]" } else { "" }
        )
    }

    fn capacity_bytes(&self) -> u64 {
        self.capacity
    }

    fn submit(&mut self, reqs: &mut Vec<IoRequest>) -> Result<(), IoError> {
        if let Err(e) = check_batch(
            reqs,
            self.capacity,
            self.failed,
            self.in_flight.len(),
            MAX_IN_FLIGHT,
        ) {
            self.stats.refused_batches += 1;
            return Err(e);
        }
        for r in reqs.drain(..) {
            self.in_flight.push(InFlight {
                seq: self.next_seq,
                tag: r.tag,
                op: r.op,
            });
            self.next_seq += 1;
            self.stats.submitted += 1;
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<IoCompletion>, wait: bool) -> usize {
        if self.in_flight.is_empty() {
            return 0;
        }
        // Without `wait`, sometimes nothing is ready yet.
        if !wait && self.rng.below(4) == 0 {
            return 0;
        }
        // A flush is ready only when everything before it has completed, i.e. it is first.
        let ready = |i: usize, r: &InFlight| i == 0 || !matches!(r.op, IoOp::Flush);
        let n = self.in_flight.len();
        let mut pick: Vec<bool> = self
            .in_flight
            .iter()
            .enumerate()
            .map(|(i, r)| ready(i, r) && self.rng.coin())
            .collect();
        if !pick.iter().any(|&p| p) {
            let candidates: Vec<usize> = (0..n).filter(|&i| ready(i, &self.in_flight[i])).collect();
            pick[candidates[self.rng.below(candidates.len() as u64) as usize]] = true;
        }
        let mut chosen = Vec::new();
        let mut rest = Vec::with_capacity(n);
        for (r, p) in self.in_flight.drain(..).zip(pick) {
            if p {
                chosen.push(r);
            } else {
                rest.push(r);
            }
        }
        self.in_flight = rest;
        self.rng.shuffle(&mut chosen);
        debug_assert!(chosen.iter().all(|r| !matches!(r.op, IoOp::Flush)
            || self.in_flight.first().is_none_or(|f| f.seq > r.seq)));
        let count = chosen.len();
        for r in chosen {
            let c = self.execute(r);
            out.push(c);
        }
        count
    }

    fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

/// A [`SimDevice`] shared between its user (a shard, a journal: as its device) and the
/// simulator or a test (to crash it, corrupt it, or read what is durable).
#[derive(Clone)]
pub struct SharedSim(pub Arc<Mutex<SimDevice>>);

impl SharedSim {
    pub fn new(dev: SimDevice) -> SharedSim {
        SharedSim(Arc::new(Mutex::new(dev)))
    }
}

impl BlockDevice for SharedSim {
    fn describe(&self) -> String {
        self.0.lock().expect("sim device").describe()
    }
    fn capacity_bytes(&self) -> u64 {
        self.0.lock().expect("sim device").capacity_bytes()
    }
    fn submit(&mut self, reqs: &mut Vec<IoRequest>) -> Result<(), IoError> {
        self.0.lock().expect("sim device").submit(reqs)
    }
    fn poll(&mut self, out: &mut Vec<IoCompletion>, wait: bool) -> usize {
        self.0.lock().expect("sim device").poll(out, wait)
    }
    fn in_flight(&self) -> usize {
        self.0.lock().expect("sim device").in_flight()
    }
    fn queue_depth(&self) -> usize {
        self.0.lock().expect("sim device").queue_depth()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{self, read_req, read_sync, write_req, write_sync};
    use crate::{run_sync, AlignedBuf};

    const CAP: u64 = 1 << 20;

    fn assert_send<T: Send>() {}

    #[test]
    fn is_send() {
        assert_send::<SimDevice>();
    }

    #[test]
    fn roundtrip_random_batches_many_seeds() {
        for seed in 0..20 {
            let mut d = SimDevice::new(4 << 20, seed, SimFaults::default());
            testkit::roundtrip_random(&mut d, seed, 30);
        }
    }

    #[test]
    fn fresh_device_reads_zeros_and_capacity_rounds_down() {
        let mut d = SimDevice::new(10 * BS + 17, 1, SimFaults::default());
        assert_eq!(d.capacity_bytes(), 10 * BS);
        assert_eq!(
            read_sync(&mut d, 0, 10 * BLOCK_SIZE),
            vec![0u8; 10 * BLOCK_SIZE]
        );
    }

    #[test]
    fn refuses_bad_requests() {
        let mut d = SimDevice::new(CAP, 2, SimFaults::default());
        testkit::refuses_bad_requests(&mut d);
        assert_eq!(d.stats().refused_batches, 5);
    }

    #[test]
    fn queue_full() {
        let mut d = SimDevice::new(CAP, 3, SimFaults::default());
        testkit::queue_full(&mut d, MAX_IN_FLIGHT);
    }

    #[test]
    fn flush_barrier_holds_while_completions_are_reordered() {
        let mut reordered = 0;
        for seed in 0..10 {
            let mut d = SimDevice::new(CAP, seed, SimFaults::default());
            reordered += testkit::flush_barrier(&mut d, seed, 20);
        }
        assert!(
            reordered > 50,
            "completion order was (almost) never shuffled: {reordered}"
        );
    }

    #[test]
    fn poll_semantics() {
        let mut d = SimDevice::new(CAP, 4, SimFaults::default());
        let mut out = Vec::new();
        assert_eq!(
            d.poll(&mut out, true),
            0,
            "nothing in flight: returns at once"
        );
        let mut empty_nowait = 0;
        for round in 0..200u64 {
            let mut reqs: Vec<IoRequest> = (0..8)
                .map(|i| read_req(round * 8 + i, i * BS, BLOCK_SIZE))
                .collect();
            d.submit(&mut reqs).unwrap();
            assert_eq!(d.in_flight(), 8);
            let n = d.poll(&mut out, false);
            if n == 0 {
                empty_nowait += 1;
            }
            while d.in_flight() > 0 {
                assert!(
                    d.poll(&mut out, true) >= 1,
                    "poll(wait) with requests in flight returned nothing"
                );
            }
        }
        assert_eq!(out.len(), 1600);
        assert!(
            empty_nowait > 10 && empty_nowait < 190,
            "poll(nowait) returned nothing {empty_nowait}/200 times"
        );
    }

    /// For each seed: flushed data, then unflushed overwrites (some of them still in flight),
    /// then a crash. Every sector must hold the flushed value or one of the unflushed
    /// writes' values for it; sectors no unflushed write touched must hold the flushed value.
    #[test]
    fn crash_loses_or_tears_only_unflushed_writes() {
        const BLOCKS: u64 = 64;
        let per_block = BLOCK_SIZE / SECTOR_SIZE;
        let (mut lost, mut applied, mut torn) = (0, 0, 0);
        for seed in 0..300u64 {
            let faults = SimFaults {
                torn_writes: true,
                ..SimFaults::default()
            };
            let mut d = SimDevice::new(BLOCKS * BS, seed, faults);
            let mut rng = SplitMix64::new(seed ^ 0xABCD);
            // Phase 1: several batches of writes, then a flush (submitted in the same batch
            // as the last writes, so the barrier matters).
            for _ in 0..3 {
                let mut reqs = Vec::new();
                for _ in 0..8 {
                    let nb = 1 + rng.below(3);
                    let blk = rng.below(BLOCKS - nb + 1);
                    reqs.push((blk, nb));
                }
                // Non-overlapping within the batch, so the flushed value is well defined.
                reqs.sort();
                reqs.dedup_by(|b, a| b.0 < a.0 + a.1);
                let mut batch: Vec<IoRequest> = reqs
                    .iter()
                    .enumerate()
                    .map(|(i, &(blk, nb))| IoRequest {
                        tag: i as u64,
                        op: IoOp::Write {
                            offset: blk * BS,
                            buf: testkit::filled(nb as usize * BLOCK_SIZE, &mut rng),
                        },
                    })
                    .collect();
                batch.push(IoRequest {
                    tag: 999,
                    op: IoOp::Flush,
                });
                for c in run_sync(&mut d, batch).unwrap() {
                    c.result.unwrap();
                }
            }
            assert_eq!(d.unflushed_writes(), 0);
            let flushed = read_sync(&mut d, 0, (BLOCKS * BS) as usize);
            assert!(
                d.read_durable(0, (BLOCKS * BS) as usize) == flushed,
                "seed {seed}: flush did not make the data durable"
            );
            // Phase 2: unflushed writes, possibly overlapping each other across batches.
            let mut candidates: Vec<Vec<Vec<u8>>> = (0..BLOCKS as usize * per_block)
                .map(|s| vec![flushed[s * SECTOR_SIZE..(s + 1) * SECTOR_SIZE].to_vec()])
                .collect();
            let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
            for _ in 0..3 {
                let mut batch = Vec::new();
                let mut used: Vec<(u64, u64)> = Vec::new();
                for t in 0..6u64 {
                    let nb = 1 + rng.below(2);
                    let blk = rng.below(BLOCKS - nb + 1);
                    if used.iter().any(|&(a, b)| blk < b && a < blk + nb) {
                        continue;
                    }
                    used.push((blk, blk + nb));
                    let buf = testkit::filled(nb as usize * BLOCK_SIZE, &mut rng);
                    for (i, sec) in buf.chunks(SECTOR_SIZE).enumerate() {
                        candidates[(blk as usize) * per_block + i].push(sec.to_vec());
                    }
                    writes.push((blk * BS, buf.to_vec()));
                    batch.push(IoRequest {
                        tag: t,
                        op: IoOp::Write {
                            offset: blk * BS,
                            buf,
                        },
                    });
                }
                for c in run_sync(&mut d, batch).unwrap() {
                    c.result.unwrap();
                }
            }
            // A write and a flush still in flight at the crash: dropped, so 0xFF must never
            // show up (it is not among the candidates).
            let mut last = vec![
                write_req(50, 0, &[0xFF; BLOCK_SIZE]),
                IoRequest {
                    tag: 51,
                    op: IoOp::Flush,
                },
            ];
            d.submit(&mut last).unwrap();
            assert!(
                d.read_durable(0, flushed.len()) == flushed,
                "seed {seed}: the durable image changed without a flush"
            );

            d.crash();
            assert_eq!(d.in_flight(), 0);
            assert!(!d.is_failed());
            let after = read_sync(&mut d, 0, (BLOCKS * BS) as usize);
            assert!(
                d.read_durable(0, after.len()) == after,
                "seed {seed}: after a crash reads see the durable image"
            );
            for (s, cands) in candidates.iter().enumerate() {
                let got = &after[s * SECTOR_SIZE..(s + 1) * SECTOR_SIZE];
                assert!(
                    cands.iter().any(|c| c == got),
                    "seed {seed}: sector {s} holds data no write put there"
                );
                if cands.len() == 1 {
                    assert_eq!(
                        got,
                        &cands[0][..],
                        "seed {seed}: flushed sector {s} changed"
                    );
                }
            }
            // Classify the unflushed writes nobody else overwrote.
            for (i, (off, data)) in writes.iter().enumerate() {
                let overlapped = writes.iter().enumerate().any(|(j, (o2, d2))| {
                    j != i && *o2 < off + data.len() as u64 && *off < o2 + d2.len() as u64
                });
                if overlapped {
                    continue;
                }
                let o = *off as usize;
                let new_secs = data
                    .chunks(SECTOR_SIZE)
                    .enumerate()
                    .filter(|(k, sec)| {
                        let at = o + k * SECTOR_SIZE;
                        after[at..at + SECTOR_SIZE] == sec[..]
                            && flushed[at..at + SECTOR_SIZE] != sec[..]
                    })
                    .count();
                match new_secs {
                    0 => lost += 1,
                    n if n == data.len() / SECTOR_SIZE => applied += 1,
                    _ => torn += 1,
                }
            }
            let st = d.stats();
            assert_eq!(st.crashes, 1);
            assert_eq!(st.crash_dropped_in_flight, 2);
            assert_eq!(
                st.crash_lost_writes + st.crash_applied_writes + st.crash_torn_writes,
                writes.len() as u64
            );
        }
        assert!(
            lost > 100 && applied > 100 && torn > 100,
            "lost {lost} applied {applied} torn {torn}"
        );
    }

    #[test]
    fn crash_without_torn_writes_never_tears() {
        for seed in 0..50 {
            let mut d = SimDevice::new(CAP, seed, SimFaults::default());
            let blocks: Vec<u64> = (0..20).collect();
            for &b in &blocks {
                write_sync(&mut d, b * BS, &[b as u8 + 1; BLOCK_SIZE]);
            }
            d.crash();
            let st = d.stats();
            assert_eq!(st.crash_torn_writes, 0);
            assert_eq!(st.crash_lost_writes + st.crash_applied_writes, 20);
            for &b in &blocks {
                let got = read_sync(&mut d, b * BS, BLOCK_SIZE);
                assert!(
                    got == vec![0; BLOCK_SIZE] || got == vec![b as u8 + 1; BLOCK_SIZE],
                    "seed {seed} block {b}"
                );
            }
        }
    }

    #[test]
    fn completed_but_unpolled_is_still_in_flight_and_dropped_by_crash() {
        let mut d = SimDevice::new(CAP, 5, SimFaults::default());
        write_sync(&mut d, 0, &[1; BLOCK_SIZE]);
        run_sync(
            &mut d,
            vec![IoRequest {
                tag: 0,
                op: IoOp::Flush,
            }],
        )
        .unwrap();
        let mut reqs = vec![write_req(1, 0, &[2; BLOCK_SIZE])];
        d.submit(&mut reqs).unwrap();
        d.crash();
        assert_eq!(read_sync(&mut d, 0, BLOCK_SIZE), vec![1; BLOCK_SIZE]);
    }

    /// A fixed workload with every fault enabled; returns a transcript of everything visible.
    fn transcript(seed: u64) -> (Vec<(u64, String, u64)>, Vec<u8>, SimStats) {
        let faults = SimFaults {
            read_error_per_million: 50_000,
            write_error_per_million: 10_000,
            bit_flip_per_million: 100_000,
            torn_writes: true,
        };
        let mut d = SimDevice::new(CAP, seed, faults);
        let mut w = SplitMix64::new(77); // the workload is the same for every seed
        let mut log = Vec::new();
        let mut tag = 0;
        for round in 0..60 {
            let mut reqs = Vec::new();
            for _ in 0..1 + w.below(10) {
                tag += 1;
                let blk = w.below(CAP / BS - 2);
                let op = match w.below(5) {
                    0 => IoOp::Flush,
                    1 | 2 => IoOp::Read {
                        offset: blk * BS,
                        buf: AlignedBuf::new(2 * BLOCK_SIZE),
                    },
                    _ => IoOp::Write {
                        offset: blk * BS,
                        buf: testkit::filled(2 * BLOCK_SIZE, &mut w),
                    },
                };
                reqs.push(IoRequest { tag, op });
            }
            if d.submit(&mut reqs).is_err() {
                log.push((tag, "refused".to_string(), 0));
            }
            let mut out = Vec::new();
            while d.in_flight() > 0 {
                d.poll(&mut out, round % 2 == 0);
            }
            for c in out {
                let h = c.buf.as_ref().map_or(0, |b| {
                    b.iter()
                        .fold(0u64, |h, &x| h.wrapping_mul(31).wrapping_add(x as u64))
                });
                log.push((c.tag, format!("{:?}", c.result), h));
            }
            if round % 15 == 14 {
                d.crash();
                log.push((0, "crash".to_string(), 0));
            }
        }
        d.crash();
        (log, d.read_durable(0, CAP as usize), d.stats())
    }

    #[test]
    fn same_seed_same_outcome() {
        let a = transcript(42);
        let b = transcript(42);
        assert!(a == b, "same seed, different outcome");
        let c = transcript(43);
        assert!(a != c, "different seeds gave identical outcomes");
        // The workload really exercised the faults.
        let st = a.2;
        assert!(
            st.read_errors > 0 && st.bit_flips > 0 && st.crashes > 0,
            "{st:?}"
        );
    }

    #[test]
    fn bit_flips_show_on_read_but_not_in_the_durable_image() {
        let mut d = SimDevice::new(CAP, 6, SimFaults::default());
        let pattern: Vec<u8> = (0..BLOCK_SIZE * 2).map(|i| (i * 7) as u8).collect();
        write_sync(&mut d, 8 * BS, &pattern);
        run_sync(
            &mut d,
            vec![IoRequest {
                tag: 0,
                op: IoOp::Flush,
            }],
        )
        .unwrap();
        d.set_faults(SimFaults {
            bit_flip_per_million: 1_000_000,
            ..SimFaults::default()
        });
        for _ in 0..20 {
            let got = read_sync(&mut d, 8 * BS, pattern.len());
            let flipped: u32 = got
                .iter()
                .zip(&pattern)
                .map(|(a, b)| (a ^ b).count_ones())
                .sum();
            assert_eq!(flipped, 1, "exactly one bit flipped per read");
        }
        assert_eq!(d.stats().bit_flips, 20);
        assert!(
            d.read_durable(8 * BS, pattern.len()) == pattern,
            "bit flip reached the durable image"
        );
        d.set_faults(SimFaults::default());
        d.crash();
        assert!(read_sync(&mut d, 8 * BS, pattern.len()) == pattern);
    }

    #[test]
    fn corrupt_durable_flips_one_bit_in_range() {
        for seed in 0..50 {
            let mut d = SimDevice::new(CAP, seed, SimFaults::default());
            let pattern = vec![0x5Au8; 4 * BLOCK_SIZE];
            write_sync(&mut d, 0, &pattern);
            run_sync(
                &mut d,
                vec![IoRequest {
                    tag: 0,
                    op: IoOp::Flush,
                }],
            )
            .unwrap();
            d.corrupt_durable(BS + 100, 1000);
            let dur = d.read_durable(0, pattern.len());
            let diffs: Vec<usize> = (0..pattern.len())
                .filter(|&i| dur[i] != pattern[i])
                .collect();
            assert_eq!(diffs.len(), 1);
            assert!(
                (BLOCK_SIZE + 100..BLOCK_SIZE + 1100).contains(&diffs[0]),
                "flip outside the range"
            );
            assert_eq!((dur[diffs[0]] ^ 0x5A).count_ones(), 1);
            // Reads see the rot, and so does a fresh open.
            assert!(read_sync(&mut d, 0, pattern.len()) == dur);
            d.crash();
            assert!(read_sync(&mut d, 0, pattern.len()) == dur);
        }
        // Never-written (zero) blocks can rot too.
        let mut d = SimDevice::new(CAP, 1, SimFaults::default());
        d.corrupt_durable(CAP - BS, BLOCK_SIZE);
        assert_eq!(
            read_sync(&mut d, CAP - BS, BLOCK_SIZE)
                .iter()
                .map(|b| b.count_ones())
                .sum::<u32>(),
            1
        );
        assert_eq!(d.stats().durable_corruptions, 1);
    }

    #[test]
    fn injected_write_error_fails_the_device_until_crash() {
        let faults = SimFaults {
            write_error_per_million: 1_000_000,
            ..SimFaults::default()
        };
        let mut d = SimDevice::new(CAP, 7, faults);
        testkit::write_error_fails_device(&mut d);
        assert!(d.is_failed());
        assert!(d.describe().contains("FAILED"));
        assert_eq!(d.stats().write_errors, 1);
        d.set_faults(SimFaults::default());
        d.crash();
        assert!(!d.is_failed());
        write_sync(&mut d, 0, &[3; BLOCK_SIZE]);
        assert_eq!(read_sync(&mut d, 0, BLOCK_SIZE), vec![3; BLOCK_SIZE]);
    }

    #[test]
    fn writes_in_flight_when_the_device_fails_complete_with_failed() {
        // Find a seed where, of several writes in one batch, the first to complete fails and
        // others complete after it.
        let faults = SimFaults {
            write_error_per_million: 300_000,
            ..SimFaults::default()
        };
        let mut saw_failed = false;
        for seed in 0..50 {
            let mut d = SimDevice::new(CAP, seed, faults);
            let reqs: Vec<IoRequest> = (0..8)
                .map(|i| write_req(i, i * BS, &[9; BLOCK_SIZE]))
                .collect();
            let done = run_sync(&mut d, reqs).unwrap();
            let device_errs = done
                .iter()
                .filter(|c| matches!(c.result, Err(IoError::Device(_))))
                .count();
            assert!(
                device_errs <= 1,
                "only the first injected error is a Device error"
            );
            if device_errs == 1 {
                saw_failed |= done.iter().any(|c| c.result == Err(IoError::Failed));
                assert!(d.is_failed());
            }
        }
        assert!(saw_failed);
    }

    #[test]
    fn read_errors_do_not_fail_the_device() {
        let faults = SimFaults {
            read_error_per_million: 1_000_000,
            ..SimFaults::default()
        };
        let mut d = SimDevice::new(CAP, 8, faults);
        let c = run_sync(&mut d, vec![read_req(1, 0, BLOCK_SIZE)]).unwrap();
        assert!(matches!(c[0].result, Err(IoError::Device(_))));
        assert!(c[0].buf.is_some());
        assert!(!d.is_failed());
        write_sync(&mut d, 0, &[1; BLOCK_SIZE]);
    }

    #[test]
    fn large_sparse_capacity_is_cheap() {
        let mut d = SimDevice::new(1 << 40, 9, SimFaults::default());
        write_sync(&mut d, (1 << 40) - BS, &[7; BLOCK_SIZE]);
        assert_eq!(
            read_sync(&mut d, (1 << 40) - BS, BLOCK_SIZE),
            vec![7; BLOCK_SIZE]
        );
    }
}
