//! Block I/O for hive nodes, behind one submission/completion-shaped trait.
//!
//! A [`BlockDevice`] accepts a batch of [`IoRequest`]s with [`BlockDevice::submit`] and
//! reports their [`IoCompletion`]s from [`BlockDevice::poll`]. This is the shape of an
//! io_uring, an NVMe queue pair or an SPDK qpair, so all of them fit the same slot.
//!
//! Backends:
//! - [`uring::UringDevice`]: io_uring with `O_DIRECT` on a file or block device; SQPOLL and
//!   IOPOLL are options that fall back (with a logged reason) where the kernel refuses them.
//! - [`portable::PortableDevice`]: positioned reads and writes through the page cache, used
//!   automatically (with a logged reason) where `O_DIRECT` is refused, e.g. on tmpfs.
//! - [`sim::SimDevice`]: an in-memory device for the deterministic simulator: torn writes,
//!   loss of everything not flushed at a crash, bit flips and I/O errors, all from a seed.
//! - [`volatile::VolatileUntilFlush`]: a wrapper keeping writes in memory until a flush,
//!   so killing the process is a power cut (fault injection for real-process tests).
//!
//! [`open_device`] opens a file or block device with the best backend available there.
//! Refused batches (invalid request, [`IoError::QueueFull`], or [`IoError::Failed`] once a
//! write or flush has failed) are refused whole by `submit`.
//!
//! Contract every backend keeps (the engine's crash safety rests on it):
//! - Offsets and lengths are multiples of [`BLOCK_SIZE`]; buffers are [`AlignedBuf`]s.
//! - Requests in one batch may complete in any order.
//! - A `Flush` completes only after every request submitted before it has completed, and
//!   when it completes successfully every write submitted before it is durable.
//! - A write that has completed but was not followed by a successful flush may be lost or
//!   torn (any subset of its 512-byte sectors applied) by a crash.
//! - After any write error the caller must treat the device as failed until reopened
//!   (redb's rule: never guess what a failed write left behind).
//! - A device is owned by one shard thread; it is `Send` but not shared.

pub mod buf;
mod os;
pub mod portable;
pub mod rng;
pub mod sim;
#[cfg(test)]
mod testkit;
pub mod uring;
pub mod volatile;

pub use buf::AlignedBuf;
pub use portable::PortableDevice;
pub use sim::{SharedSim, SimDevice, SimFaults, SimStats};
pub use uring::{UringDevice, UringOptions};
pub use volatile::VolatileUntilFlush;

use std::path::Path;

/// Alignment and granularity of every offset and length, in bytes.
pub const BLOCK_SIZE: usize = 4096;
/// Granularity at which a torn write may be split (a sector), in bytes.
pub const SECTOR_SIZE: usize = 512;
/// Upper bound on requests in flight per device (queue depth).
pub const MAX_IN_FLIGHT: usize = 256;

/// One block I/O operation.
#[derive(Debug)]
pub enum IoOp {
    /// Read `buf.len()` bytes at `offset` into `buf`.
    Read { offset: u64, buf: AlignedBuf },
    /// Write all of `buf` at `offset`.
    Write { offset: u64, buf: AlignedBuf },
    /// Barrier + durability point: see the crate docs.
    Flush,
}

/// A request: an operation and a caller-chosen tag echoed in its completion.
#[derive(Debug)]
pub struct IoRequest {
    pub tag: u64,
    pub op: IoOp,
}

/// The completion of one request. The buffer of a read or write is handed back.
#[derive(Debug)]
pub struct IoCompletion {
    pub tag: u64,
    pub result: Result<(), IoError>,
    pub buf: Option<AlignedBuf>,
}

/// Operating errors of a block device.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum IoError {
    #[error("unaligned request: offset {offset} length {len} (block size {BLOCK_SIZE})")]
    Unaligned { offset: u64, len: usize },
    #[error("request beyond the device end: offset {offset} length {len}, capacity {capacity}")]
    OutOfRange {
        offset: u64,
        len: usize,
        capacity: u64,
    },
    #[error("too many requests in flight (beyond the device's queue depth)")]
    QueueFull,
    #[error("device I/O error: {0}")]
    Device(String),
    #[error("device failed earlier and must be reopened")]
    Failed,
}

/// A submission/completion block device. See the crate docs for the contract.
pub trait BlockDevice: Send {
    /// Short name of the backend and its options, for logs and `hive status`.
    fn describe(&self) -> String;
    /// Usable size in bytes (a multiple of [`BLOCK_SIZE`]).
    fn capacity_bytes(&self) -> u64;
    /// Queue a batch of requests. Requests are taken out of `reqs` (it is left empty) or
    /// the whole batch is refused and left in place.
    fn submit(&mut self, reqs: &mut Vec<IoRequest>) -> Result<(), IoError>;
    /// Move finished completions into `out`; with `wait`, block until at least one is ready
    /// (returns at once if nothing is in flight). Returns how many were added.
    fn poll(&mut self, out: &mut Vec<IoCompletion>, wait: bool) -> usize;
    /// Requests submitted and not yet reported by `poll`.
    fn in_flight(&self) -> usize;
    /// Requests that may be in flight at once (a submit beyond it is refused with
    /// [`IoError::QueueFull`]).
    fn queue_depth(&self) -> usize {
        MAX_IN_FLIGHT
    }

    /// A file descriptor that becomes readable when completions may be ready, so an event
    /// loop can wait for sockets and I/O at once (then `poll(.., false)` reaps them).
    /// Register it *edge-triggered* (as mio does): every completion signals it anew, and
    /// `poll` resets its counter only now and then, not on every call (a read syscall per
    /// loop turn cost a busy-polling shard ~7% of its time). `None` where the backend
    /// cannot signal (the caller then polls, or waits in `poll`).
    fn completion_fd(&mut self) -> Option<std::os::fd::RawFd> {
        None
    }
}

/// Check alignment and range of a request against a device of `capacity` bytes.
pub fn check_request(offset: u64, len: usize, capacity: u64) -> Result<(), IoError> {
    if !offset.is_multiple_of(BLOCK_SIZE as u64) || !len.is_multiple_of(BLOCK_SIZE) {
        return Err(IoError::Unaligned { offset, len });
    }
    if offset
        .checked_add(len as u64)
        .is_none_or(|end| end > capacity)
    {
        return Err(IoError::OutOfRange {
            offset,
            len,
            capacity,
        });
    }
    Ok(())
}

/// Run one batch to completion on any device (used at startup and by tools, not on the
/// shard's data path). Returns completions in tag order.
pub fn run_sync(
    dev: &mut dyn BlockDevice,
    mut reqs: Vec<IoRequest>,
) -> Result<Vec<IoCompletion>, IoError> {
    let n = reqs.len();
    dev.submit(&mut reqs)?;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        if dev.poll(&mut out, true) == 0 && dev.in_flight() == 0 {
            break;
        }
    }
    out.sort_by_key(|c| c.tag);
    Ok(out)
}

/// Refuse a whole batch unless every request is valid and it fits: `Failed` if the device has
/// failed, the first request's `Unaligned`/`OutOfRange` error, or `QueueFull` if `in_flight`
/// plus the batch would exceed `limit`.
pub(crate) fn check_batch(
    reqs: &[IoRequest],
    capacity: u64,
    failed: bool,
    in_flight: usize,
    limit: usize,
) -> Result<(), IoError> {
    if failed {
        return Err(IoError::Failed);
    }
    for r in reqs {
        match &r.op {
            IoOp::Read { offset, buf } | IoOp::Write { offset, buf } => {
                check_request(*offset, buf.len(), capacity)?
            }
            IoOp::Flush => {}
        }
    }
    if in_flight.saturating_add(reqs.len()) > limit {
        return Err(IoError::QueueFull);
    }
    Ok(())
}

/// Open a device for a hive node.
///
/// With `create_size_bytes`, a regular file is created if missing and extended (sparsely,
/// with `set_len`) if shorter; a block device is left as it is. Then an [`UringDevice`] with
/// `O_DIRECT` is tried; if `O_DIRECT` is refused (`EINVAL`/`EOPNOTSUPP`, e.g. tmpfs on older
/// kernels) or io_uring is unavailable (`ENOSYS`, `EPERM`), the reason is logged with
/// `tracing::warn!` and a [`PortableDevice`] (page cache) is returned instead; its
/// [`BlockDevice::describe`] carries the reason. Other errors are returned as
/// [`IoError::Device`].
pub fn open_device(
    path: &Path,
    create_size_bytes: Option<u64>,
    opts: UringOptions,
) -> Result<Box<dyn BlockDevice>, IoError> {
    open_device_with(
        path,
        create_size_bytes,
        opts,
        &uring::UringDevice::open_staged,
    )
}

type UringOpener = dyn Fn(&Path, UringOptions) -> Result<UringDevice, uring::OpenError>;

/// [`open_device`] with the io_uring opener injectable, so tests can simulate refusals.
fn open_device_with(
    path: &Path,
    create_size_bytes: Option<u64>,
    opts: UringOptions,
    open_uring: &UringOpener,
) -> Result<Box<dyn BlockDevice>, IoError> {
    let dev_err =
        |what: &str, e: std::io::Error| IoError::Device(format!("{what} {}: {e}", path.display()));
    if let Some(size) = create_size_bytes {
        let is_blockdev = std::fs::metadata(path).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_block_device()
        });
        if !is_blockdev {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| dev_err("create", e))?;
            let len = f.metadata().map_err(|e| dev_err("stat", e))?.len();
            if len < size {
                f.set_len(size).map_err(|e| dev_err("extend", e))?;
            }
        }
    }
    match open_uring(path, opts) {
        Ok(dev) => Ok(Box::new(dev)),
        Err(e) => match e.fallback_reason() {
            Some(reason) => {
                tracing::warn!(path = %path.display(), %reason, "io_uring/O_DIRECT unavailable, using the portable backend");
                let dev = PortableDevice::open(path).map_err(|e| dev_err("open", e))?;
                Ok(Box::new(dev.with_fallback_reason(reason)))
            }
            None => Err(IoError::Device(format!("open {}: {e}", path.display()))),
        },
    }
}

#[cfg(test)]
mod open_tests {
    use super::*;
    use crate::testkit::{temp_path, TempFile};

    #[test]
    fn open_device_creates_sparse_file_and_uses_uring_on_ext4() {
        let t = TempFile(temp_path("/var/tmp", "open-uring"));
        let mut dev = open_device(&t.0, Some(8 << 20), UringOptions::default()).unwrap();
        assert_eq!(dev.capacity_bytes(), 8 << 20);
        assert!(dev.describe().starts_with("io_uring"), "{}", dev.describe());
        crate::testkit::roundtrip_random(dev.as_mut(), 11, 10);
        // An existing larger file is not shrunk.
        drop(dev);
        let dev = open_device(&t.0, Some(4 << 20), UringOptions::default()).unwrap();
        assert_eq!(dev.capacity_bytes(), 8 << 20);
        // Sparse: far fewer blocks allocated than the length.
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&t.0).unwrap();
        assert!(
            m.blocks() * 512 < m.len(),
            "file is not sparse: {} blocks",
            m.blocks()
        );
    }

    #[test]
    fn open_device_errors_for_missing_file_without_size() {
        let p = temp_path("/var/tmp", "missing");
        let err = open_device(&p, None, UringOptions::default())
            .err()
            .unwrap();
        assert!(
            matches!(err, IoError::Device(ref m) if m.contains("No such file")),
            "{err:?}"
        );
    }

    /// On tmpfs, kernels before 6.6 refuse `O_DIRECT` with EINVAL: then open_device must fall
    /// back to the portable device and say why. Newer kernels accept `O_DIRECT` on tmpfs, and
    /// then io_uring must work there.
    #[test]
    fn open_device_on_dev_shm_follows_what_the_kernel_allows() {
        let is_tmpfs = std::fs::read_to_string("/proc/mounts")
            .map(|m| {
                m.lines().any(|l| {
                    l.split_whitespace().nth(1) == Some("/dev/shm")
                        && l.split_whitespace().nth(2) == Some("tmpfs")
                })
            })
            .unwrap_or(false);
        if !is_tmpfs {
            eprintln!("/dev/shm is not tmpfs here; skipped");
            return;
        }
        let t = TempFile(temp_path("/dev/shm", "open-shm"));
        std::fs::write(&t.0, b"").unwrap();
        let direct_refused = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(&t.0)
                .is_err()
        };
        let mut dev = open_device(&t.0, Some(1 << 20), UringOptions::default()).unwrap();
        let d = dev.describe();
        if direct_refused {
            assert!(d.starts_with("portable"), "{d}");
            assert!(d.contains("O_DIRECT refused"), "{d}");
        } else {
            eprintln!("this kernel accepts O_DIRECT on tmpfs: {d}");
            assert!(d.starts_with("io_uring"), "{d}");
        }
        crate::testkit::roundtrip_random(dev.as_mut(), 12, 10);
    }

    /// The fallback path itself, with the refusals injected.
    #[test]
    fn open_device_falls_back_with_reason_on_refusal() {
        use crate::uring::{OpenError, OpenStage};
        let t = TempFile(temp_path("/var/tmp", "open-fallback"));
        let cases = [
            (
                OpenStage::OpenDirect,
                libc::EINVAL,
                true,
                "O_DIRECT refused",
            ),
            (OpenStage::Probe, libc::EINVAL, true, "O_DIRECT I/O refused"),
            (
                OpenStage::RingSetup,
                libc::ENOSYS,
                true,
                "io_uring unavailable",
            ),
            (
                OpenStage::RingSetup,
                libc::EPERM,
                true,
                "io_uring unavailable",
            ),
            (OpenStage::OpenDirect, libc::EACCES, false, ""),
            (OpenStage::RingSetup, libc::ENOMEM, false, ""),
        ];
        for (stage, errno, falls_back, why) in cases {
            let opener = move |_: &Path, _: UringOptions| -> Result<UringDevice, OpenError> {
                Err(OpenError {
                    stage,
                    err: std::io::Error::from_raw_os_error(errno),
                })
            };
            let r = open_device_with(&t.0, Some(1 << 20), UringOptions::default(), &opener);
            if falls_back {
                let mut dev = r.unwrap();
                let d = dev.describe();
                assert!(d.starts_with("portable") && d.contains(why), "{d}");
                crate::testkit::roundtrip_random(dev.as_mut(), errno as u64, 3);
            } else {
                assert!(matches!(r, Err(IoError::Device(_))), "{stage:?} {errno}");
            }
        }
    }
}
