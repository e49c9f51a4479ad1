//! [`VolatileUntilFlush`]: a fault-injecting wrapper that keeps every write in memory until
//! a `Flush`, so a process killed with SIGKILL loses exactly what a power cut would: every
//! write not followed by a completed flush. (A real file written with `O_DIRECT` keeps a
//! completed write across a SIGKILL; this makes a kill test a power-loss test.)
//!
//! Requests run synchronously inside `submit`, in batch order: a read sees earlier
//! writes (the device's bytes overlaid with the unflushed ones); a flush writes the
//! unflushed blocks to the inner device and flushes it, then forgets them.

use crate::{
    check_batch, run_sync, AlignedBuf, BlockDevice, IoCompletion, IoError, IoOp, IoRequest,
    BLOCK_SIZE, MAX_IN_FLIGHT,
};
use std::collections::{BTreeMap, VecDeque};

/// See the module docs.
pub struct VolatileUntilFlush {
    inner: Box<dyn BlockDevice>,
    /// Unflushed blocks by offset.
    dirty: BTreeMap<u64, Box<[u8]>>,
    done: VecDeque<IoCompletion>,
    failed: bool,
}

impl VolatileUntilFlush {
    pub fn new(inner: Box<dyn BlockDevice>) -> Self {
        VolatileUntilFlush {
            inner,
            dirty: BTreeMap::new(),
            done: VecDeque::new(),
            failed: false,
        }
    }

    /// Bytes written and not yet flushed.
    pub fn unflushed_bytes(&self) -> usize {
        self.dirty.len() * BLOCK_SIZE
    }

    fn execute(&mut self, op: IoOp) -> (Result<(), IoError>, Option<AlignedBuf>) {
        match op {
            IoOp::Write { offset, buf } => {
                for (i, block) in buf.chunks(BLOCK_SIZE).enumerate() {
                    let at = offset + (i * BLOCK_SIZE) as u64;
                    self.dirty.insert(at, block.into());
                }
                (Ok(()), Some(buf))
            }
            IoOp::Read { offset, buf } => {
                let len = buf.len();
                let got = run_sync(
                    self.inner.as_mut(),
                    vec![IoRequest {
                        tag: 0,
                        op: IoOp::Read { offset, buf },
                    }],
                );
                let Some(mut c) = got.ok().and_then(|v| v.into_iter().next()) else {
                    return (
                        Err(IoError::Device("read refused".into())),
                        Some(AlignedBuf::new(len)),
                    );
                };
                let mut buf = c.buf.take().unwrap_or_else(|| AlignedBuf::new(len));
                if c.result.is_ok() {
                    for (&at, block) in self.dirty.range(offset..offset + len as u64) {
                        let o = (at - offset) as usize;
                        buf[o..o + BLOCK_SIZE].copy_from_slice(block);
                    }
                }
                (c.result, Some(buf))
            }
            IoOp::Flush => {
                let r = self.flush_dirty();
                if r.is_err() {
                    self.failed = true;
                }
                (r, None)
            }
        }
    }

    fn flush_dirty(&mut self) -> Result<(), IoError> {
        let blocks = std::mem::take(&mut self.dirty);
        let mut reqs = Vec::new();
        let mut run: Option<(u64, Vec<u8>)> = None;
        for (at, block) in blocks {
            match &mut run {
                Some((start, bytes)) if *start + bytes.len() as u64 == at => {
                    bytes.extend_from_slice(&block)
                }
                _ => {
                    if let Some(r) = run.take() {
                        reqs.push(r);
                    }
                    run = Some((at, block.to_vec()));
                }
            }
        }
        reqs.extend(run);
        let mut batch: Vec<IoRequest> = Vec::new();
        for (i, (offset, bytes)) in reqs.into_iter().enumerate() {
            let mut buf = AlignedBuf::new(bytes.len());
            buf.copy_from_slice(&bytes);
            batch.push(IoRequest {
                tag: i as u64,
                op: IoOp::Write { offset, buf },
            });
            if batch.len() >= MAX_IN_FLIGHT / 2 {
                check(run_sync(self.inner.as_mut(), std::mem::take(&mut batch))?)?;
            }
        }
        batch.push(IoRequest {
            tag: u64::MAX,
            op: IoOp::Flush,
        });
        check(run_sync(self.inner.as_mut(), batch)?)
    }
}

fn check(done: Vec<IoCompletion>) -> Result<(), IoError> {
    done.into_iter().try_for_each(|c| c.result)
}

impl BlockDevice for VolatileUntilFlush {
    fn describe(&self) -> String {
        format!("{} (writes volatile until flushed)", self.inner.describe())
    }
    fn capacity_bytes(&self) -> u64 {
        self.inner.capacity_bytes()
    }
    fn submit(&mut self, reqs: &mut Vec<IoRequest>) -> Result<(), IoError> {
        check_batch(
            reqs,
            self.capacity_bytes(),
            self.failed,
            self.done.len(),
            MAX_IN_FLIGHT,
        )?;
        for req in reqs.drain(..) {
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
    use crate::{SimDevice, SimFaults};

    #[test]
    fn unflushed_writes_are_only_in_memory() {
        let sim = SimDevice::new(1 << 20, 1, SimFaults::default());
        let mut v = VolatileUntilFlush::new(Box::new(sim));
        let w = |off: u64, byte: u8| {
            let mut buf = AlignedBuf::new(2 * BLOCK_SIZE);
            buf.fill(byte);
            IoRequest {
                tag: 1,
                op: IoOp::Write { offset: off, buf },
            }
        };
        run_sync(&mut v, vec![w(0, 7)]).unwrap();
        assert_eq!(v.unflushed_bytes(), 2 * BLOCK_SIZE);
        let got = read4(&mut v);
        assert!(got[..2 * BLOCK_SIZE].iter().all(|&b| b == 7));
        assert!(got[2 * BLOCK_SIZE..].iter().all(|&b| b == 0));
        run_sync(
            &mut v,
            vec![IoRequest {
                tag: 3,
                op: IoOp::Flush,
            }],
        )
        .unwrap();
        assert_eq!(v.unflushed_bytes(), 0);
        run_sync(&mut v, vec![w(8192, 9)]).unwrap();
        // "Power loss": the wrapper goes, the inner device is what is left.
        let mut inner = v.inner;
        let got = read4(inner.as_mut());
        assert!(got[..2 * BLOCK_SIZE].iter().all(|&b| b == 7));
        assert!(
            got[2 * BLOCK_SIZE..].iter().all(|&b| b == 0),
            "unflushed write kept"
        );
    }

    fn read4(d: &mut dyn BlockDevice) -> Vec<u8> {
        let got = run_sync(
            d,
            vec![IoRequest {
                tag: 0,
                op: IoOp::Read {
                    offset: 0,
                    buf: AlignedBuf::new(4 * BLOCK_SIZE),
                },
            }],
        )
        .unwrap();
        got.into_iter().next().unwrap().buf.unwrap().to_vec()
    }
}
