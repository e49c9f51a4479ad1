//! [`PortableDevice`]: positioned reads and writes through the page cache.
//!
//! Every request is executed synchronously inside [`BlockDevice::submit`], in batch order;
//! the completions wait in a queue for [`BlockDevice::poll`]. `Flush` is `fdatasync`, and
//! since execution is in order it trivially waits for everything before it.

use crate::{
    check_batch, os, AlignedBuf, BlockDevice, IoCompletion, IoError, IoOp, IoRequest, MAX_IN_FLIGHT,
};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// pread/pwrite block device over a regular file or block device (buffered I/O).
pub struct PortableDevice {
    file: File,
    name: String,
    capacity: u64,
    done: VecDeque<IoCompletion>,
    failed: bool,
    fallback_reason: Option<String>,
}

impl PortableDevice {
    /// Open an existing file or block device read-write (no `O_DIRECT`).
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Self::from_file(file, &path.display().to_string())
    }

    /// Wrap an already open file; `name` is used in [`BlockDevice::describe`].
    pub fn from_file(file: File, name: &str) -> io::Result<Self> {
        let capacity = os::capacity_of(&file)?;
        Ok(PortableDevice {
            file,
            name: name.to_string(),
            capacity,
            done: VecDeque::new(),
            failed: false,
            fallback_reason: None,
        })
    }

    /// Record why this device is used instead of io_uring (shown by `describe`).
    pub fn with_fallback_reason(mut self, reason: String) -> Self {
        self.fallback_reason = Some(reason);
        self
    }

    /// Why io_uring was not used, if this device is a fallback.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback_reason.as_deref()
    }

    /// Whether a write or flush has failed (every later request is refused with `Failed`).
    pub fn is_failed(&self) -> bool {
        self.failed
    }

    fn execute(&mut self, op: IoOp) -> (Result<(), IoError>, Option<AlignedBuf>) {
        match op {
            IoOp::Read { offset, mut buf } => {
                let r = self.file.read_exact_at(&mut buf, offset).map_err(|e| {
                    IoError::Device(format!("read {} bytes at {offset}: {e}", buf.len()))
                });
                (r, Some(buf))
            }
            IoOp::Write { offset, buf } => {
                if self.failed {
                    return (Err(IoError::Failed), Some(buf));
                }
                let r = self.file.write_all_at(&buf, offset).map_err(|e| {
                    self.failed = true;
                    IoError::Device(format!("write {} bytes at {offset}: {e}", buf.len()))
                });
                (r, Some(buf))
            }
            IoOp::Flush => {
                if self.failed {
                    return (Err(IoError::Failed), None);
                }
                let r = self.file.sync_data().map_err(|e| {
                    self.failed = true;
                    IoError::Device(format!("fdatasync: {e}"))
                });
                (r, None)
            }
        }
    }
}

impl BlockDevice for PortableDevice {
    fn describe(&self) -> String {
        let mut s = format!("portable (pread/pwrite, page cache) {}", self.name);
        if let Some(r) = &self.fallback_reason {
            s.push_str(" - fallback: ");
            s.push_str(r);
        }
        if self.failed {
            s.push_str(" [FAILED]");
        }
        s
    }

    fn capacity_bytes(&self) -> u64 {
        self.capacity
    }

    fn submit(&mut self, reqs: &mut Vec<IoRequest>) -> Result<(), IoError> {
        check_batch(
            reqs,
            self.capacity,
            self.failed,
            self.done.len(),
            MAX_IN_FLIGHT,
        )?;
        for req in reqs.drain(..) {
            // A write error inside the batch fails every later request of the batch too
            // (execute checks `failed`), except reads, which stay meaningful.
            let (result, buf) = self.execute(req.op);
            self.done.push_back(IoCompletion {
                tag: req.tag,
                result,
                buf,
            });
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<IoCompletion>, _wait: bool) -> usize {
        let n = self.done.len();
        out.extend(self.done.drain(..));
        n
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{self, temp_path, TempFile};
    use crate::BLOCK_SIZE;

    fn dev(tag: &str, size: u64) -> (TempFile, PortableDevice) {
        let t = TempFile(temp_path("/var/tmp", tag));
        let f = File::create(&t.0).unwrap();
        f.set_len(size).unwrap();
        let d = PortableDevice::open(&t.0).unwrap();
        (t, d)
    }

    #[test]
    fn roundtrip_random_batches() {
        let (_t, mut d) = dev("portable-rt", 4 << 20);
        assert_eq!(d.capacity_bytes(), 4 << 20);
        testkit::roundtrip_random(&mut d, 1, 40);
    }

    #[test]
    fn capacity_rounds_down() {
        let (_t, d) = dev("portable-cap", 3 * BLOCK_SIZE as u64 + 100);
        assert_eq!(d.capacity_bytes(), 3 * BLOCK_SIZE as u64);
    }

    #[test]
    fn refuses_bad_requests() {
        let (_t, mut d) = dev("portable-bad", 1 << 20);
        testkit::refuses_bad_requests(&mut d);
    }

    #[test]
    fn queue_full() {
        let (_t, mut d) = dev("portable-qf", 1 << 20);
        testkit::queue_full(&mut d, MAX_IN_FLIGHT);
    }

    #[test]
    fn flush_barrier() {
        let (_t, mut d) = dev("portable-flush", 1 << 20);
        testkit::flush_barrier(&mut d, 5, 20);
    }

    #[test]
    fn write_error_fails_the_device() {
        let t = TempFile(temp_path("/var/tmp", "portable-ro"));
        std::fs::write(&t.0, vec![7u8; 1 << 16]).unwrap();
        // Read-only file: reads work, the write fails with EBADF.
        let f = File::open(&t.0).unwrap();
        let mut d = PortableDevice::from_file(f, "ro").unwrap();
        testkit::write_error_fails_device(&mut d);
        assert!(d.is_failed());
        assert!(d.describe().contains("FAILED"));
    }
}
