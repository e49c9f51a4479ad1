//! [`UringDevice`]: io_uring over a file or block device opened with `O_DIRECT`.
//!
//! Each accepted request occupies a slot; the slot index is the SQE's `user_data` and the
//! slot owns the request's [`AlignedBuf`] until the final CQE, so the kernel never sees a
//! freed buffer. Short transfers are resubmitted for the remainder (an error is reported if
//! the kernel makes no progress); `EAGAIN`/`EINTR` results are retried a bounded number of
//! times.
//!
//! `Flush` is `IORING_OP_FSYNC` with `IORING_FSYNC_DATASYNC` and `IOSQE_IO_DRAIN`, so the
//! kernel starts it only after every SQE submitted before it has completed. Because a short
//! transfer is finished by a *new* SQE (submitted after the flush), the flush's CQE is
//! checked against the slots that are still outstanding: if any request submitted before the
//! flush is still in flight, the fsync is issued again (drained behind the remainder).
//!
//! On an `IOPOLL` ring the kernel refuses fsync, so a flush is done in software there: it
//! waits in a queue until every request before it has completed, then `fdatasync` runs
//! synchronously inside [`BlockDevice::poll`].
//!
//! IOPOLL refusal (`EOPNOTSUPP` from a driver without poll queues, e.g. virtio-blk) often
//! shows only when a bio really reaches the device: a read of a hole in a sparse file does
//! not. So opening probes a data extent, and if a request still bounces with `EOPNOTSUPP`
//! later, the device stops issuing, waits for the ring to drain, replaces it with a ring
//! without IOPOLL and resubmits the bounced requests (nothing was transferred for them).

use crate::{
    check_batch, os, AlignedBuf, BlockDevice, IoCompletion, IoError, IoOp, IoRequest, BLOCK_SIZE,
    MAX_IN_FLIGHT,
};
use io_uring::{opcode, squeue, types, IoUring};
use std::collections::VecDeque;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Largest single read/write SQE (the SQE length is a u32); longer buffers go in pieces.
const MAX_CHUNK: usize = 1 << 30;
/// How often a request that got `EAGAIN`/`EINTR` is retried before the error is reported.
const MAX_RETRIES: u32 = 64;
/// Idle time after which the SQPOLL kernel thread sleeps (and `submit` has to wake it).
const SQPOLL_IDLE_MS: u32 = 20;
/// `user_data` of the probe read issued while opening (never a slot index).
const PROBE_USER_DATA: u64 = u64::MAX;

/// Options of an [`UringDevice`]. Both polling modes fall back (logged, and shown by
/// `describe`) where the kernel or the device refuses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UringOptions {
    /// A kernel thread polls the submission queue (`IORING_SETUP_SQPOLL`).
    pub sqpoll: bool,
    /// Busy-poll for completions (`IORING_SETUP_IOPOLL`); needs a driver with poll queues.
    pub iopoll: bool,
    /// Requests in flight at most; clamped to `1..=MAX_IN_FLIGHT`.
    pub queue_depth: u32,
}

impl Default for UringOptions {
    fn default() -> Self {
        UringOptions {
            sqpoll: false,
            iopoll: false,
            queue_depth: 64,
        }
    }
}

/// Where opening an [`UringDevice`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenStage {
    /// `open(2)` with `O_DIRECT`.
    OpenDirect,
    /// Determining the capacity.
    Capacity,
    /// `io_uring_setup(2)`, even without SQPOLL/IOPOLL.
    RingSetup,
    /// The first read through the ring (where some file systems refuse `O_DIRECT` I/O).
    Probe,
}

/// An error opening an [`UringDevice`], with the stage it happened at.
#[derive(Debug)]
pub struct OpenError {
    pub stage: OpenStage,
    pub err: io::Error,
}

impl OpenError {
    /// If this error means "use the portable backend instead", why (for the log).
    pub fn fallback_reason(&self) -> Option<String> {
        let errno = self.err.raw_os_error()?;
        match (self.stage, errno) {
            (OpenStage::OpenDirect, libc::EINVAL | libc::EOPNOTSUPP) => {
                Some(format!("O_DIRECT refused: {}", self.err))
            }
            (OpenStage::Probe, libc::EINVAL | libc::EOPNOTSUPP) => {
                Some(format!("O_DIRECT I/O refused: {}", self.err))
            }
            (OpenStage::RingSetup, libc::ENOSYS | libc::EPERM) => {
                Some(format!("io_uring unavailable: {}", self.err))
            }
            _ => None,
        }
    }
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.stage {
            OpenStage::OpenDirect => "open with O_DIRECT",
            OpenStage::Capacity => "determine capacity",
            OpenStage::RingSetup => "set up io_uring",
            OpenStage::Probe => "first read through io_uring",
        };
        write!(f, "{what}: {}", self.err)
    }
}

impl std::error::Error for OpenError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.err)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
}

struct Slot {
    tag: u64,
    kind: Kind,
    /// Submission order; a flush covers every slot with a smaller `seq`.
    seq: u64,
    offset: u64,
    /// Owned here while the kernel may touch it; handed back in the completion.
    buf: Option<AlignedBuf>,
    len: usize,
    /// Bytes transferred so far (short transfers are continued from here).
    done: usize,
    retries: u32,
    /// An SQE for this slot is queued or in the kernel.
    in_kernel: bool,
}

/// io_uring block device (`O_DIRECT`). See the module docs.
pub struct UringDevice {
    ring: IoUring,
    file: File,
    name: String,
    capacity: u64,
    depth: usize,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    used: usize,
    in_kernel: usize,
    next_seq: u64,
    /// `seq` of the first failed write or flush: the device is failed from then on.
    failed_seq: Option<u64>,
    sqpoll: bool,
    iopoll: bool,
    notes: Vec<String>,
    /// IOPOLL mode: flushes waiting for the requests before them, in submission order.
    soft_flushes: VecDeque<usize>,
    /// SQEs pushed but maybe not yet handed to the kernel.
    unsubmitted: bool,
    /// IOPOLL was refused at run time: the ring is being drained to be replaced.
    downgrading: bool,
    /// Slots to (re)submit once the replacement ring is up.
    bounced: Vec<usize>,
    cqes: Vec<(u64, i32)>,
    /// Signalled by the kernel for every completion once `completion_fd` was asked for.
    eventfd: Option<std::os::fd::OwnedFd>,
    /// `poll` calls since the eventfd's counter was last reset.
    polls_since_reset: u32,
}

/// The eventfd's counter is reset every this many polls (and before a blocking wait).
/// Readiness does not depend on it (edge-triggered: every signal is an event); it only
/// keeps the counter far from its limit.
const EVENTFD_RESET_EVERY: u32 = 1024;

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
    )
}

fn build_ring(entries: u32, sqpoll: bool, iopoll: bool) -> io::Result<IoUring> {
    let mut b = IoUring::builder();
    if sqpoll {
        b.setup_sqpoll(SQPOLL_IDLE_MS);
    }
    if iopoll {
        b.setup_iopoll();
    }
    b.build(entries)
}

fn mode_name(sqpoll: bool, iopoll: bool) -> &'static str {
    match (sqpoll, iopoll) {
        (true, true) => "sqpoll+iopoll",
        (true, false) => "sqpoll",
        (false, true) => "iopoll",
        (false, false) => "plain",
    }
}

/// Build the ring with the wanted modes, dropping them one by one if setup is refused.
fn setup_ring(
    entries: u32,
    sqpoll: bool,
    iopoll: bool,
    name: &str,
    notes: &mut Vec<String>,
) -> io::Result<(IoUring, bool, bool)> {
    let mut candidates = vec![(sqpoll, iopoll)];
    for c in [(false, iopoll), (sqpoll, false), (false, false)] {
        if !candidates.contains(&c) {
            candidates.push(c);
        }
    }
    let mut last_err = None;
    for (s, i) in candidates {
        match build_ring(entries, s, i) {
            Ok(ring) => return Ok((ring, s, i)),
            Err(e) => {
                if s || i {
                    let note = format!("{} ring refused: {e}", mode_name(s, i));
                    tracing::warn!(device = name, reason = %note, "io_uring mode not available, falling back");
                    notes.push(note);
                }
                last_err = Some(e);
            }
        }
    }
    Err(last_err.expect("at least one candidate"))
}

/// The SQE of a `Flush`: fdatasync, started only after everything submitted before it.
fn flush_sqe(fd: types::Fd) -> squeue::Entry {
    opcode::Fsync::new(fd)
        .flags(types::FsyncFlags::DATASYNC)
        .build()
        .flags(squeue::Flags::IO_DRAIN)
}

/// Where a probe read is most likely to reach the device: the first block holding data
/// (`SEEK_DATA`; a hole is answered by the file system alone), else block 0.
fn probe_offset(file: &File, capacity: u64) -> u64 {
    // SAFETY: lseek on an fd we own; it only moves the (unused) file position.
    let off = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_DATA) };
    if off < 0 {
        return 0;
    }
    let off = off as u64 / BLOCK_SIZE as u64 * BLOCK_SIZE as u64;
    if off + BLOCK_SIZE as u64 <= capacity {
        off
    } else {
        0
    }
}

/// Read one block through the ring and wait for it. `O_DIRECT` refusals and IOPOLL
/// refusals (`EOPNOTSUPP` on devices without poll queues) often show only here.
fn probe(ring: &mut IoUring, file: &File, capacity: u64) -> io::Result<()> {
    if capacity < BLOCK_SIZE as u64 {
        return Ok(());
    }
    let mut buf = AlignedBuf::new(BLOCK_SIZE);
    let entry = opcode::Read::new(
        types::Fd(file.as_raw_fd()),
        buf.as_mut_ptr(),
        BLOCK_SIZE as u32,
    )
    .offset(probe_offset(file, capacity))
    .build()
    .user_data(PROBE_USER_DATA);
    // SAFETY: the SQE points into `buf` (BLOCK_SIZE bytes, aligned) and `file`'s fd; both stay
    // alive until the CQE is reaped below, or `buf` is leaked if we cannot wait for it.
    unsafe { ring.submission().push(&entry) }
        .map_err(|_| io::Error::other("submission queue full"))?;
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if is_transient(&e) => {}
            Err(e) => {
                // The kernel may still own the buffer: never free it.
                std::mem::forget(buf);
                return Err(e);
            }
        }
        if let Some(cqe) = ring.completion().next() {
            debug_assert_eq!(cqe.user_data(), PROBE_USER_DATA);
            let res = cqe.result();
            return if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else {
                Ok(())
            };
        }
    }
}

impl UringDevice {
    /// Open an existing file or block device read-write with `O_DIRECT`.
    pub fn open(path: &Path, opts: UringOptions) -> io::Result<Self> {
        Self::open_staged(path, opts).map_err(|e| io::Error::new(e.err.kind(), e.to_string()))
    }

    /// [`UringDevice::open`], telling at which stage it failed (see [`OpenError::fallback_reason`]).
    pub fn open_staged(path: &Path, opts: UringOptions) -> Result<Self, OpenError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(|err| OpenError {
                stage: OpenStage::OpenDirect,
                err,
            })?;
        Self::from_file_staged(file, &path.display().to_string(), opts)
    }

    /// Wrap an already open file; it should have been opened with `O_DIRECT` (without it,
    /// the device works but through the page cache). `name` is shown by `describe`.
    pub fn from_file(file: File, name: &str, opts: UringOptions) -> io::Result<Self> {
        Self::from_file_staged(file, name, opts)
            .map_err(|e| io::Error::new(e.err.kind(), e.to_string()))
    }

    fn from_file_staged(file: File, name: &str, opts: UringOptions) -> Result<Self, OpenError> {
        let capacity = os::capacity_of(&file).map_err(|err| OpenError {
            stage: OpenStage::Capacity,
            err,
        })?;
        let depth = (opts.queue_depth as usize).clamp(1, MAX_IN_FLIGHT);
        let entries = (depth as u32).next_power_of_two();
        let mut notes = Vec::new();
        let setup_err = |err| OpenError {
            stage: OpenStage::RingSetup,
            err,
        };
        let (mut ring, mut sqpoll, mut iopoll) =
            setup_ring(entries, opts.sqpoll, opts.iopoll, name, &mut notes).map_err(setup_err)?;
        if iopoll {
            if let Err(e) = probe(&mut ring, &file, capacity) {
                let note = format!("iopoll refused at the first I/O: {e}");
                tracing::warn!(device = name, reason = %note, "io_uring IOPOLL not usable, falling back");
                notes.push(note);
                drop(ring);
                (ring, sqpoll, iopoll) =
                    setup_ring(entries, sqpoll, false, name, &mut notes).map_err(setup_err)?;
            }
        }
        if !iopoll {
            probe(&mut ring, &file, capacity).map_err(|err| OpenError {
                stage: OpenStage::Probe,
                err,
            })?;
        }
        Ok(UringDevice {
            ring,
            file,
            name: name.to_string(),
            capacity,
            depth,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            used: 0,
            in_kernel: 0,
            next_seq: 0,
            failed_seq: None,
            sqpoll,
            iopoll,
            notes,
            soft_flushes: VecDeque::new(),
            unsubmitted: false,
            downgrading: false,
            bounced: Vec::new(),
            cqes: Vec::with_capacity(depth),
            eventfd: None,
            polls_since_reset: 0,
        })
    }

    /// Whether the ring actually uses SQPOLL.
    pub fn sqpoll_active(&self) -> bool {
        self.sqpoll
    }

    /// Whether the ring actually uses IOPOLL.
    pub fn iopoll_active(&self) -> bool {
        self.iopoll
    }

    /// Why requested modes are not in use (empty if everything asked for is active).
    pub fn fallback_notes(&self) -> &[String] {
        &self.notes
    }

    /// Whether a write or flush has failed (every later request is refused with `Failed`).
    pub fn is_failed(&self) -> bool {
        self.failed_seq.is_some()
    }

    /// The effective queue depth.
    pub fn queue_depth(&self) -> usize {
        self.depth
    }

    /// Queue the SQE for the (remaining part of the) request in slot `idx`.
    fn push_sqe(&mut self, idx: usize) {
        let fd = types::Fd(self.file.as_raw_fd());
        let slot = self.slots[idx].as_mut().expect("push_sqe on a free slot");
        debug_assert!(!slot.in_kernel);
        let chunk = (slot.len - slot.done).min(MAX_CHUNK) as u32;
        let pos = slot.offset + slot.done as u64;
        let entry = match slot.kind {
            Kind::Read => {
                let buf = slot.buf.as_mut().expect("read buffer");
                // SAFETY: done < len == buf.len(), so the pointer stays inside the allocation.
                let ptr = unsafe { buf.as_mut_ptr().add(slot.done) };
                opcode::Read::new(fd, ptr, chunk).offset(pos).build()
            }
            Kind::Write => {
                let buf = slot.buf.as_ref().expect("write buffer");
                // SAFETY: done < len == buf.len(), so the pointer stays inside the allocation.
                let ptr = unsafe { buf.as_ptr().add(slot.done) };
                opcode::Write::new(fd, ptr, chunk).offset(pos).build()
            }
            Kind::Flush => flush_sqe(fd),
        }
        .user_data(idx as u64);
        slot.in_kernel = true;
        self.in_kernel += 1;
        self.unsubmitted = true;
        for attempt in 0.. {
            // SAFETY: the SQE refers to the slot's buffer, owned by `self.slots[idx]` and not
            // moved out or dropped until this slot's final CQE has been reaped (or leaked in
            // Drop), and to `self.file`, which lives as long as the ring.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            // Cannot happen: each slot has at most one SQE and the SQ holds >= depth entries.
            assert!(attempt < 1000, "io_uring submission queue stays full");
            if let Err(e) = self.ring.submit() {
                tracing::warn!(device = %self.name, error = %e, "io_uring submit failed while the SQ was full");
            }
        }
    }

    /// Hand queued SQEs to the kernel (and reap IOPOLL completions).
    fn submit_ring(&mut self) {
        loop {
            match self.ring.submit() {
                Ok(_) => {
                    self.unsubmitted = false;
                    return;
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // CQ overflow backlog or kernel memory pressure: the SQEs stay queued and go
                // with the next enter (poll always enters while they are pending).
                Err(e) if is_transient(&e) => return,
                Err(e) => {
                    tracing::error!(device = %self.name, error = %e, "io_uring submit failed");
                    return;
                }
            }
        }
    }

    /// Is any request submitted before `seq` (other than slot `me`) still outstanding?
    fn earlier_outstanding(&self, seq: u64, me: usize) -> bool {
        self.slots
            .iter()
            .enumerate()
            .any(|(i, s)| i != me && s.as_ref().is_some_and(|s| s.seq < seq))
    }

    fn complete(&mut self, idx: usize, result: Result<(), IoError>, out: &mut Vec<IoCompletion>) {
        let slot = self.slots[idx].take().expect("complete on a free slot");
        debug_assert!(!slot.in_kernel);
        if result.is_err() && slot.kind != Kind::Read {
            self.failed_seq = Some(self.failed_seq.map_or(slot.seq, |s| s.min(slot.seq)));
            if let Err(e) = &result {
                tracing::error!(device = %self.name, tag = slot.tag, error = %e, "write/flush failed: device is failed until reopened");
            }
        }
        self.free.push(idx);
        self.used -= 1;
        out.push(IoCompletion {
            tag: slot.tag,
            result,
            buf: slot.buf,
        });
    }

    fn on_cqe(&mut self, idx: usize, res: i32, out: &mut Vec<IoCompletion>) {
        let Some(slot) = self.slots.get_mut(idx).and_then(Option::as_mut) else {
            tracing::error!(device = %self.name, user_data = idx, "io_uring CQE for an unknown slot");
            return;
        };
        debug_assert!(slot.in_kernel);
        slot.in_kernel = false;
        self.in_kernel -= 1;
        let (kind, seq) = (slot.kind, slot.seq);
        let what = match kind {
            Kind::Read => "read",
            Kind::Write => "write",
            Kind::Flush => "fdatasync",
        };
        if res < 0 {
            let errno = -res;
            if errno == libc::EOPNOTSUPP && self.iopoll && kind != Kind::Flush {
                self.begin_iopoll_downgrade(idx);
                return;
            }
            if kind != Kind::Flush
                && (errno == libc::EAGAIN || errno == libc::EINTR)
                && slot.retries < MAX_RETRIES
            {
                slot.retries += 1;
                self.push_sqe(idx);
                return;
            }
            let msg = format!(
                "{what} of {} bytes at {}: {}",
                slot.len - slot.done,
                slot.offset + slot.done as u64,
                io::Error::from_raw_os_error(errno)
            );
            self.complete(idx, Err(IoError::Device(msg)), out);
            return;
        }
        match kind {
            Kind::Read | Kind::Write => {
                if res == 0 {
                    let msg = format!(
                        "short {what}: no progress at {} after {} of {} bytes",
                        slot.offset + slot.done as u64,
                        slot.done,
                        slot.len
                    );
                    self.complete(idx, Err(IoError::Device(msg)), out);
                    return;
                }
                slot.done += res as usize;
                if slot.done < slot.len {
                    // Short transfer: continue with the rest (an unaligned remainder will be
                    // refused by O_DIRECT and reported as an error).
                    slot.retries = 0;
                    self.push_sqe(idx);
                } else {
                    self.complete(idx, Ok(()), out);
                }
            }
            Kind::Flush => {
                if self.earlier_outstanding(seq, idx) {
                    // A request before the flush is being finished by a resubmission queued
                    // after the fsync: fsync again, drained behind it.
                    self.push_sqe(idx);
                } else if self.failed_seq.is_some_and(|f| f < seq) {
                    self.complete(idx, Err(IoError::Failed), out);
                } else {
                    self.complete(idx, Ok(()), out);
                }
            }
        }
    }

    fn reap(&mut self, out: &mut Vec<IoCompletion>) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for &(ud, res) in &cqes {
            self.on_cqe(ud as usize, res, out);
        }
        self.cqes = cqes;
    }

    /// A request bounced with `EOPNOTSUPP` on the IOPOLL ring: stop issuing, keep it for the
    /// replacement ring.
    fn begin_iopoll_downgrade(&mut self, idx: usize) {
        if !self.downgrading {
            self.downgrading = true;
            let note =
                "iopoll refused at run time: Operation not supported (os error 95)".to_string();
            tracing::warn!(device = %self.name, reason = %note, "io_uring IOPOLL not usable, switching to a plain ring");
            self.notes.push(note);
        }
        self.bounced.push(idx);
    }

    /// Once the IOPOLL ring has drained, replace it and resubmit what bounced.
    fn finish_iopoll_downgrade(&mut self, out: &mut Vec<IoCompletion>) {
        debug_assert!(self.downgrading && self.in_kernel == 0);
        let entries = (self.depth as u32).next_power_of_two();
        let mut notes = Vec::new();
        let rebuilt = setup_ring(entries, self.sqpoll, false, &self.name, &mut notes);
        self.notes.extend(notes);
        self.downgrading = false;
        let bounced = std::mem::take(&mut self.bounced);
        match rebuilt {
            Ok((ring, sqpoll, _)) => {
                // The old ring has nothing in flight (in_kernel == 0): dropping it is safe.
                self.ring = ring;
                self.sqpoll = sqpoll;
                self.iopoll = false;
                if let Some(fd) = &self.eventfd {
                    use std::os::fd::AsRawFd;
                    if let Err(e) = self.ring.submitter().register_eventfd(fd.as_raw_fd()) {
                        tracing::warn!(device = %self.name, error = %e, "eventfd lost with the IOPOLL ring");
                        self.eventfd = None;
                    }
                }
                for idx in bounced {
                    self.push_sqe(idx);
                }
                self.submit_ring();
            }
            Err(e) => {
                tracing::error!(device = %self.name, error = %e, "cannot replace the IOPOLL ring");
                for idx in bounced {
                    let msg = format!("IOPOLL refused and no replacement ring: {e}");
                    self.complete(idx, Err(IoError::Device(msg)), out);
                }
            }
        }
    }

    /// IOPOLL mode: run the flushes whose predecessors have all completed.
    fn run_soft_flushes(&mut self, out: &mut Vec<IoCompletion>) {
        while let Some(&idx) = self.soft_flushes.front() {
            let seq = self.slots[idx].as_ref().expect("soft flush slot").seq;
            if self.earlier_outstanding(seq, idx) {
                break;
            }
            self.soft_flushes.pop_front();
            let result = if self.failed_seq.is_some_and(|f| f < seq) {
                Err(IoError::Failed)
            } else {
                self.file
                    .sync_data()
                    .map_err(|e| IoError::Device(format!("fdatasync: {e}")))
            };
            self.complete(idx, result, out);
        }
    }
}

impl BlockDevice for UringDevice {
    fn describe(&self) -> String {
        let on = |b: bool| if b { "on" } else { "off" };
        let mut s = format!(
            "io_uring O_DIRECT {} qd={} sqpoll={} iopoll={}",
            self.name,
            self.depth,
            on(self.sqpoll),
            on(self.iopoll)
        );
        for n in &self.notes {
            s.push_str(" - ");
            s.push_str(n);
        }
        if self.is_failed() {
            s.push_str(" [FAILED]");
        }
        s
    }

    fn capacity_bytes(&self) -> u64 {
        self.capacity
    }

    fn submit(&mut self, reqs: &mut Vec<IoRequest>) -> Result<(), IoError> {
        check_batch(reqs, self.capacity, self.is_failed(), self.used, self.depth)?;
        for req in reqs.drain(..) {
            let idx = self.free.pop().expect("check_batch guarantees a free slot");
            let seq = self.next_seq;
            self.next_seq += 1;
            let (kind, offset, buf) = match req.op {
                IoOp::Read { offset, buf } => (Kind::Read, offset, Some(buf)),
                IoOp::Write { offset, buf } => (Kind::Write, offset, Some(buf)),
                IoOp::Flush => (Kind::Flush, 0, None),
            };
            let len = buf.as_ref().map_or(0, |b| b.len());
            self.slots[idx] = Some(Slot {
                tag: req.tag,
                kind,
                seq,
                offset,
                buf,
                len,
                done: 0,
                retries: 0,
                in_kernel: false,
            });
            self.used += 1;
            if kind == Kind::Flush && self.iopoll {
                self.soft_flushes.push_back(idx);
            } else if self.downgrading {
                self.bounced.push(idx);
            } else {
                self.push_sqe(idx);
            }
        }
        if self.unsubmitted {
            self.submit_ring();
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<IoCompletion>, wait: bool) -> usize {
        let start = out.len();
        self.polls_since_reset += 1;
        if let Some(fd) = self
            .eventfd
            .as_ref()
            .filter(|_| wait || self.polls_since_reset >= EVENTFD_RESET_EVERY)
        {
            // Reset before reaping: a completion posted after the reap signals again, so
            // none is missed (nor is one when no reset happens: see `completion_fd`).
            self.polls_since_reset = 0;
            let mut v = [0u8; 8];
            // SAFETY: reading 8 bytes into a local buffer from an eventfd we own.
            let _ = unsafe {
                libc::read(
                    std::os::fd::AsRawFd::as_raw_fd(fd),
                    v.as_mut_ptr().cast(),
                    8,
                )
            };
        }
        loop {
            if self.unsubmitted || (self.iopoll && self.in_kernel > 0) {
                self.submit_ring();
            }
            self.reap(out);
            if self.downgrading && self.in_kernel == 0 {
                self.finish_iopoll_downgrade(out);
            }
            self.run_soft_flushes(out);
            if out.len() > start || !wait || self.in_kernel == 0 {
                break;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => self.unsubmitted = false,
                Err(e) if is_transient(&e) => {}
                Err(e) => {
                    tracing::error!(device = %self.name, error = %e, "io_uring wait failed");
                    break;
                }
            }
        }
        out.len() - start
    }

    fn in_flight(&self) -> usize {
        self.used
    }

    fn queue_depth(&self) -> usize {
        self.depth
    }

    fn completion_fd(&mut self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        if self.iopoll {
            return None; // polled completions post no signal
        }
        if self.eventfd.is_none() {
            // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
            let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            if raw < 0 {
                tracing::warn!(device = %self.name, error = %io::Error::last_os_error(), "no eventfd for completions; the shard will poll");
                return None;
            }
            // SAFETY: raw is a new descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            if let Err(e) = self.ring.submitter().register_eventfd(fd.as_raw_fd()) {
                tracing::warn!(device = %self.name, error = %e, "cannot register an eventfd with io_uring; the shard will poll");
                return None;
            }
            self.eventfd = Some(fd);
        }
        self.eventfd.as_ref().map(|fd| fd.as_raw_fd())
    }
}

impl Drop for UringDevice {
    fn drop(&mut self) {
        // The kernel may still read or write the buffers of requests in flight: wait for them
        // before the slots (and their buffers) are freed.
        while self.in_kernel > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if is_transient(&e) => {}
                Err(e) => {
                    tracing::error!(device = %self.name, error = %e, "cannot wait for io_uring requests; leaking their buffers");
                    for slot in self.slots.iter_mut().flatten().filter(|s| s.in_kernel) {
                        if let Some(buf) = slot.buf.take() {
                            std::mem::forget(buf);
                        }
                    }
                    return;
                }
            }
            for cqe in self.ring.completion() {
                if let Some(slot) = self
                    .slots
                    .get_mut(cqe.user_data() as usize)
                    .and_then(Option::as_mut)
                {
                    if slot.in_kernel {
                        slot.in_kernel = false;
                        self.in_kernel -= 1;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{self, temp_path, TempFile};

    fn assert_send<T: Send>() {}

    fn file(tag: &str, size: u64) -> TempFile {
        let t = TempFile(temp_path("/var/tmp", tag));
        let f = File::create(&t.0).unwrap();
        f.set_len(size).unwrap();
        t
    }

    fn dev(tag: &str, size: u64, opts: UringOptions) -> (TempFile, UringDevice) {
        let t = file(tag, size);
        let d =
            UringDevice::open(&t.0, opts).unwrap_or_else(|e| panic!("open {}: {e}", t.0.display()));
        (t, d)
    }

    #[test]
    fn is_send() {
        assert_send::<UringDevice>();
    }

    #[test]
    fn every_completion_signals_the_edge_triggered_fd() {
        // An event loop waits on the completion descriptor edge-triggered and polls the
        // device every turn; `poll` rarely resets the counter. Each completion must still
        // wake the loop.
        let (_t, mut d) = dev("uring-efd", 1 << 20, UringOptions::default());
        let fd = d.completion_fd().expect("io_uring signals completions");
        // SAFETY: epoll on descriptors this test owns; events go to a local buffer.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(ep >= 0);
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLET) as u32,
            u64: 7,
        };
        assert_eq!(
            unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) },
            0
        );
        let wait = |ms: i32| loop {
            let mut out = [libc::epoll_event { events: 0, u64: 0 }; 4];
            // SAFETY: `out` is valid for 4 events.
            let n = unsafe { libc::epoll_wait(ep, out.as_mut_ptr(), 4, ms) };
            // io_uring's task work interrupts the wait (as it does mio's, which retries).
            if n >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return n;
            }
        };
        let mut done = Vec::new();
        for round in 0..(3 * EVENTFD_RESET_EVERY as u64 / 100) {
            // Many polls with nothing to reap (a busy loop's turns), then one write.
            for _ in 0..100 {
                d.poll(&mut done, false);
            }
            let data = vec![round as u8; BLOCK_SIZE];
            d.submit(&mut vec![testkit::write_req(round, 0, &data)])
                .unwrap();
            let n = wait(5000);
            assert_eq!(
                n,
                1,
                "round {round}: no event for a completion ({})",
                io::Error::last_os_error()
            );
            let before = done.len();
            while done.len() == before {
                d.poll(&mut done, false);
            }
            assert!(done.last().unwrap().result.is_ok());
        }
        // SAFETY: closing the epoll descriptor made above.
        unsafe { libc::close(ep) };
    }

    #[test]
    fn roundtrip_random_batches() {
        let (_t, mut d) = dev("uring-rt", 4 << 20, UringOptions::default());
        assert_eq!(d.capacity_bytes(), 4 << 20);
        assert!(
            d.describe().starts_with("io_uring O_DIRECT"),
            "{}",
            d.describe()
        );
        testkit::roundtrip_random(&mut d, 2, 60);
    }

    #[test]
    fn roundtrip_with_sqpoll_or_its_fallback() {
        let opts = UringOptions {
            sqpoll: true,
            iopoll: false,
            queue_depth: 32,
        };
        let (_t, mut d) = dev("uring-sqpoll", 2 << 20, opts);
        let desc = d.describe();
        eprintln!("{desc}");
        assert_eq!(desc.contains("sqpoll=on"), d.sqpoll_active());
        assert!(
            d.sqpoll_active() || !d.fallback_notes().is_empty(),
            "sqpoll off without a reason: {desc}"
        );
        testkit::roundtrip_random(&mut d, 3, 30);
        testkit::flush_barrier(&mut d, 3, 10);
    }

    #[test]
    fn roundtrip_with_iopoll_or_its_fallback() {
        let opts = UringOptions {
            sqpoll: false,
            iopoll: true,
            queue_depth: 32,
        };
        let (_t, mut d) = dev("uring-iopoll", 2 << 20, opts);
        let desc = d.describe();
        eprintln!("{desc}");
        assert_eq!(desc.contains("iopoll=on"), d.iopoll_active());
        if !d.iopoll_active() {
            assert!(desc.contains("iopoll"), "{desc}");
            assert!(
                !d.fallback_notes().is_empty(),
                "iopoll off without a reason: {desc}"
            );
        }
        testkit::roundtrip_random(&mut d, 4, 30);
        testkit::flush_barrier(&mut d, 4, 10);
        let desc = d.describe();
        eprintln!("after I/O: {desc}");
        assert!(
            d.iopoll_active() || desc.contains("iopoll refused"),
            "{desc}"
        );
    }

    /// With data in the file the probe reaches the device, so a refusal shows at open.
    #[test]
    fn iopoll_probe_reaches_the_device_when_the_file_has_data() {
        let t = TempFile(temp_path("/var/tmp", "uring-iopoll-data"));
        let mut data = vec![0u8; 1 << 20];
        crate::rng::SplitMix64::new(5).fill(&mut data);
        std::fs::write(&t.0, &data).unwrap();
        File::open(&t.0).unwrap().sync_all().unwrap();
        let opts = UringOptions {
            sqpoll: false,
            iopoll: true,
            queue_depth: 16,
        };
        let mut d = UringDevice::open(&t.0, opts).unwrap();
        let desc = d.describe();
        eprintln!("{desc}");
        assert!(
            d.iopoll_active() || desc.contains("iopoll refused at the first I/O"),
            "{desc}"
        );
        assert!(testkit::read_sync(&mut d, 0, data.len()) == data);
        testkit::roundtrip_random(&mut d, 8, 20);
    }

    #[test]
    fn capacity_rounds_down() {
        let (_t, d) = dev(
            "uring-cap",
            5 * BLOCK_SIZE as u64 + 1000,
            UringOptions::default(),
        );
        assert_eq!(d.capacity_bytes(), 5 * BLOCK_SIZE as u64);
    }

    #[test]
    fn refuses_bad_requests() {
        let (_t, mut d) = dev("uring-bad", 1 << 20, UringOptions::default());
        testkit::refuses_bad_requests(&mut d);
    }

    #[test]
    fn queue_full_at_queue_depth() {
        let opts = UringOptions {
            queue_depth: 8,
            ..UringOptions::default()
        };
        let (_t, mut d) = dev("uring-qf", 1 << 20, opts);
        assert_eq!(d.queue_depth(), 8);
        testkit::queue_full(&mut d, 8);
        let opts = UringOptions {
            queue_depth: 10_000,
            ..UringOptions::default()
        };
        let (_t2, mut d) = dev("uring-qf-max", 1 << 20, opts);
        assert_eq!(d.queue_depth(), MAX_IN_FLIGHT);
        testkit::queue_full(&mut d, MAX_IN_FLIGHT);
    }

    #[test]
    fn flush_barrier() {
        let (_t, mut d) = dev("uring-flush", 1 << 20, UringOptions::default());
        testkit::flush_barrier(&mut d, 6, 40);
    }

    #[test]
    fn large_buffer_in_one_request() {
        let (t, mut d) = dev("uring-large", 8 << 20, UringOptions::default());
        let mut rng = crate::rng::SplitMix64::new(9);
        let data = testkit::filled(6 << 20, &mut rng).to_vec();
        testkit::write_sync(&mut d, BLOCK_SIZE as u64, &data);
        assert!(testkit::read_sync(&mut d, BLOCK_SIZE as u64, data.len()) == data);
        // And it really is in the file.
        let on_disk = std::fs::read(&t.0).unwrap();
        assert!(on_disk[BLOCK_SIZE..BLOCK_SIZE + data.len()] == data[..]);
    }

    #[test]
    fn write_error_fails_the_device() {
        let t = file("uring-ro", 1 << 16);
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&t.0)
            .unwrap();
        let mut d = UringDevice::from_file(f, "ro", UringOptions::default()).unwrap();
        testkit::write_error_fails_device(&mut d);
        assert!(d.is_failed());
        assert!(d.describe().contains("FAILED"));
    }

    #[test]
    fn read_past_end_of_shrunk_file_is_an_error_not_a_short_success() {
        let (t, mut d) = dev("uring-short", 1 << 20, UringOptions::default());
        testkit::write_sync(&mut d, 0, &[5u8; 2 * BLOCK_SIZE]);
        // Shrink the file behind the device's back: a read across the new end is short.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&t.0)
            .unwrap()
            .set_len(BLOCK_SIZE as u64)
            .unwrap();
        let c = crate::run_sync(&mut d, vec![testkit::read_req(1, 0, 2 * BLOCK_SIZE)]).unwrap();
        assert!(
            matches!(c[0].result, Err(IoError::Device(ref m)) if m.contains("short read")),
            "{:?}",
            c[0].result
        );
        assert!(!d.is_failed(), "a read error does not fail the device");
    }

    /// The barrier comes from the kernel: check the flush SQE itself, since timing alone
    /// rarely exposes a missing drain.
    #[test]
    fn flush_sqe_is_drained_datasync() {
        let e = flush_sqe(types::Fd(3));
        // SAFETY: squeue::Entry is a #[repr(C)] wrapper of the 64-byte io_uring_sqe, plain
        // integers only, so its bytes can be read as an array.
        let raw: [u8; 64] = unsafe { std::mem::transmute(e) };
        assert_eq!(
            u32::from(raw[0]),
            io_uring::opcode::Fsync::CODE as u32,
            "opcode"
        );
        assert_eq!(
            raw[1] & (1 << 1),
            1 << 1,
            "IOSQE_IO_DRAIN (bit 1) missing from sqe.flags"
        );
        let fsync_flags = u32::from_ne_bytes(raw[28..32].try_into().unwrap());
        assert_eq!(
            fsync_flags,
            types::FsyncFlags::DATASYNC.bits(),
            "IORING_FSYNC_DATASYNC"
        );
    }

    /// Big writes followed by a flush in one batch, on a preallocated file (so fdatasync
    /// has little to do and would overtake the writes without `IOSQE_IO_DRAIN`).
    #[test]
    fn flush_waits_for_big_writes_before_it() {
        let t = TempFile(temp_path("/var/tmp", "uring-drain"));
        std::fs::write(&t.0, vec![1u8; 16 << 20]).unwrap();
        File::open(&t.0).unwrap().sync_all().unwrap();
        let mut d = UringDevice::open(&t.0, UringOptions::default()).unwrap();
        for round in 0..8u64 {
            let mut reqs: Vec<IoRequest> = (0..8u64)
                .map(|i| IoRequest {
                    tag: i,
                    op: IoOp::Write {
                        offset: i * (2 << 20),
                        buf: AlignedBuf::new(2 << 20),
                    },
                })
                .collect();
            reqs.push(IoRequest {
                tag: 100,
                op: IoOp::Flush,
            });
            reqs.push(testkit::read_req(101, 0, BLOCK_SIZE));
            d.submit(&mut reqs).unwrap();
            let order: Vec<u64> = testkit::drain(&mut d).iter().map(|c| c.tag).collect();
            let pos = order.iter().position(|&t| t == 100).unwrap();
            assert!(
                order[..pos].iter().filter(|&&t| t < 100).count() == 8,
                "round {round}: flush overtook a write: {order:?}"
            );
        }
    }

    /// A short read is finished by a new SQE queued after a drained fsync: the flush must
    /// still be reported after the read (the fsync is re-issued if it finished first).
    #[test]
    fn flush_after_a_short_transfer_still_waits_for_it() {
        for _ in 0..20 {
            let (t, mut d) = dev("uring-short-flush", 1 << 20, UringOptions::default());
            testkit::write_sync(&mut d, 0, &[5u8; 2 * BLOCK_SIZE]);
            std::fs::OpenOptions::new()
                .write(true)
                .open(&t.0)
                .unwrap()
                .set_len(BLOCK_SIZE as u64)
                .unwrap();
            let mut reqs = vec![
                testkit::read_req(1, 0, 2 * BLOCK_SIZE),
                IoRequest {
                    tag: 2,
                    op: IoOp::Flush,
                },
            ];
            d.submit(&mut reqs).unwrap();
            let done = testkit::drain(&mut d);
            let order: Vec<u64> = done.iter().map(|c| c.tag).collect();
            assert_eq!(
                order,
                vec![1, 2],
                "flush reported before the read it must wait for"
            );
            assert!(done[0].result.is_err());
            assert!(done[1].result.is_ok(), "{:?}", done[1].result);
        }
    }

    #[test]
    fn drop_with_requests_in_flight_is_safe() {
        let (_t, mut d) = dev("uring-drop", 4 << 20, UringOptions::default());
        let mut reqs: Vec<IoRequest> = (0..32)
            .map(|i| testkit::write_req(i, i * 4 * BLOCK_SIZE as u64, &[i as u8; 4 * BLOCK_SIZE]))
            .collect();
        d.submit(&mut reqs).unwrap();
        assert_eq!(d.in_flight(), 32);
        drop(d);
    }

    #[test]
    fn open_errors_carry_their_stage() {
        let p = temp_path("/var/tmp", "uring-missing");
        let e = UringDevice::open_staged(&p, UringOptions::default())
            .err()
            .unwrap();
        assert_eq!(e.stage, OpenStage::OpenDirect);
        assert!(e.fallback_reason().is_none(), "ENOENT must not fall back");
        let dir = UringDevice::open_staged(Path::new("/dev/null"), UringOptions::default()).err();
        // /dev/null: a character device, neither file nor block device.
        if let Some(e) = dir {
            assert!(
                matches!(e.stage, OpenStage::Capacity | OpenStage::OpenDirect),
                "{e}"
            );
        }
    }
}
