//! Backend-independent checks used by the tests of every backend.

use crate::rng::SplitMix64;
use crate::{
    run_sync, AlignedBuf, BlockDevice, IoCompletion, IoError, IoOp, IoRequest, BLOCK_SIZE,
};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

/// A unique path in `dir` (includes the process id and a counter).
pub(crate) fn temp_path(dir: &str, tag: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    PathBuf::from(dir).join(format!("hivefs-nvme-test-{tag}-{}-{n}", std::process::id()))
}

/// Removes the file when dropped.
pub(crate) struct TempFile(pub(crate) PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub(crate) fn filled(len: usize, rng: &mut SplitMix64) -> AlignedBuf {
    let mut b = AlignedBuf::new(len);
    rng.fill(&mut b);
    b
}

pub(crate) fn read_req(tag: u64, offset: u64, len: usize) -> IoRequest {
    IoRequest {
        tag,
        op: IoOp::Read {
            offset,
            buf: AlignedBuf::new(len),
        },
    }
}

pub(crate) fn write_req(tag: u64, offset: u64, data: &[u8]) -> IoRequest {
    let mut buf = AlignedBuf::new(data.len());
    buf[..data.len()].copy_from_slice(data);
    IoRequest {
        tag,
        op: IoOp::Write { offset, buf },
    }
}

/// Poll (waiting) until nothing is in flight; completions in the order `poll` gave them.
pub(crate) fn drain(dev: &mut dyn BlockDevice) -> Vec<IoCompletion> {
    let mut out = Vec::new();
    let mut idle = 0;
    while dev.in_flight() > 0 {
        if dev.poll(&mut out, true) == 0 {
            idle += 1;
            assert!(idle < 1_000_000, "poll(wait) makes no progress");
        }
    }
    out
}

/// Read `len` bytes at `offset` synchronously.
pub(crate) fn read_sync(dev: &mut dyn BlockDevice, offset: u64, len: usize) -> Vec<u8> {
    let mut c = run_sync(dev, vec![read_req(0, offset, len)]).unwrap();
    assert_eq!(c.len(), 1);
    let c = c.pop().unwrap();
    c.result.unwrap();
    c.buf.unwrap()[..len].to_vec()
}

pub(crate) fn write_sync(dev: &mut dyn BlockDevice, offset: u64, data: &[u8]) {
    let c = run_sync(dev, vec![write_req(0, offset, data)]).unwrap();
    assert_eq!(c.len(), 1);
    c.into_iter().next().unwrap().result.unwrap();
}

enum Planned {
    Read { offset: u64, len: usize },
    Write { offset: u64, data: Vec<u8> },
    Flush,
}

/// A random batch over the first `region` bytes: writes never overlap anything else in the
/// batch, reads may overlap reads, so the expected result does not depend on order.
fn plan_batch(rng: &mut SplitMix64, region: u64, max_reqs: usize) -> Vec<Planned> {
    let blocks = region / BLOCK_SIZE as u64;
    let n = 1 + rng.below(max_reqs as u64) as usize;
    let mut written: Vec<(u64, u64)> = Vec::new();
    let mut read: Vec<(u64, u64)> = Vec::new();
    let overlaps = |v: &[(u64, u64)], a: u64, b: u64| v.iter().any(|&(x, y)| a < y && x < b);
    let mut plan = Vec::new();
    for _ in 0..n {
        if rng.below(10) == 0 {
            plan.push(Planned::Flush);
            continue;
        }
        for _attempt in 0..8 {
            let nb = 1 + rng.below(4.min(blocks));
            let start = rng.below(blocks - nb + 1);
            let (a, b) = (start, start + nb);
            if rng.coin() {
                if overlaps(&written, a, b) || overlaps(&read, a, b) {
                    continue;
                }
                written.push((a, b));
                let mut data = vec![0u8; (nb as usize) * BLOCK_SIZE];
                rng.fill(&mut data);
                plan.push(Planned::Write {
                    offset: a * BLOCK_SIZE as u64,
                    data,
                });
            } else {
                if overlaps(&written, a, b) {
                    continue;
                }
                read.push((a, b));
                plan.push(Planned::Read {
                    offset: a * BLOCK_SIZE as u64,
                    len: nb as usize * BLOCK_SIZE,
                });
            }
            break;
        }
    }
    plan
}

/// Random batches of aligned reads, writes and flushes against a `Vec<u8>` model.
pub(crate) fn roundtrip_random(dev: &mut dyn BlockDevice, seed: u64, rounds: usize) {
    let mut rng = SplitMix64::new(seed);
    let region = dev.capacity_bytes().min(4 << 20);
    assert!(
        region >= 4 * BLOCK_SIZE as u64,
        "device too small for the test"
    );
    // Start from whatever the device holds.
    let mut model = read_sync(dev, 0, region as usize);
    let mut next_tag = 1000u64;
    let mut reads_checked = 0;
    for round in 0..rounds {
        let plan = plan_batch(&mut rng, region, 16);
        let mut reqs = Vec::new();
        let mut expect: HashMap<u64, Planned> = HashMap::new();
        for p in plan {
            let tag = next_tag;
            next_tag += 1;
            let op = match &p {
                Planned::Read { offset, len } => IoOp::Read {
                    offset: *offset,
                    buf: AlignedBuf::new(*len),
                },
                Planned::Write { offset, data } => {
                    let mut buf = AlignedBuf::new(data.len());
                    buf.copy_from_slice(data);
                    IoOp::Write {
                        offset: *offset,
                        buf,
                    }
                }
                Planned::Flush => IoOp::Flush,
            };
            reqs.push(IoRequest { tag, op });
            expect.insert(tag, p);
        }
        let n = reqs.len();
        dev.submit(&mut reqs)
            .unwrap_or_else(|e| panic!("round {round}: submit: {e}"));
        assert!(reqs.is_empty(), "submit must take the requests");
        let done = drain(dev);
        assert_eq!(
            done.len(),
            n,
            "round {round}: every request completes exactly once"
        );
        let mut seen = std::collections::HashSet::new();
        for c in &done {
            assert!(seen.insert(c.tag), "tag {} completed twice", c.tag);
            c.result
                .as_ref()
                .unwrap_or_else(|e| panic!("round {round}: tag {}: {e}", c.tag));
            match &expect[&c.tag] {
                Planned::Read { offset, len } => {
                    let b = c.buf.as_ref().expect("read hands the buffer back");
                    let o = *offset as usize;
                    assert!(
                        b[..*len] == model[o..o + len],
                        "round {round}: read at {offset} differs from the model"
                    );
                    reads_checked += 1;
                }
                Planned::Write { data, .. } => {
                    let b = c.buf.as_ref().expect("write hands the buffer back");
                    assert_eq!(&b[..], &data[..], "write buffer handed back intact");
                }
                Planned::Flush => assert!(c.buf.is_none()),
            }
        }
        for p in expect.values() {
            if let Planned::Write { offset, data } = p {
                let o = *offset as usize;
                model[o..o + data.len()].copy_from_slice(data);
            }
        }
    }
    assert!(
        reads_checked > 0 || rounds < 5,
        "the random batches contained no reads"
    );
    let all = read_sync(dev, 0, region as usize);
    assert!(all == model, "final device content differs from the model");
}

/// Unaligned and out-of-range requests refuse the whole batch, which stays in place.
pub(crate) fn refuses_bad_requests(dev: &mut dyn BlockDevice) {
    let cap = dev.capacity_bytes();
    let b = BLOCK_SIZE as u64;
    write_sync(dev, 0, &[0x11; BLOCK_SIZE]);
    type Expect = fn(&IoError) -> bool;
    let bad: Vec<(IoRequest, Expect)> = vec![
        (read_req(1, 512, BLOCK_SIZE), |e| {
            matches!(e, IoError::Unaligned { offset: 512, .. })
        }),
        (write_req(2, b + 1, &[0; BLOCK_SIZE]), |e| {
            matches!(e, IoError::Unaligned { .. })
        }),
        (read_req(3, cap, BLOCK_SIZE), |e| {
            matches!(e, IoError::OutOfRange { .. })
        }),
        (read_req(4, cap - b, 2 * BLOCK_SIZE), |e| {
            matches!(e, IoError::OutOfRange { .. })
        }),
        (write_req(5, u64::MAX - (b - 1), &[0; BLOCK_SIZE]), |e| {
            matches!(e, IoError::OutOfRange { .. })
        }),
    ];
    for (req, is_expected) in bad {
        // The bad request comes after a valid write: the write must not happen either.
        let mut batch = vec![write_req(9, 0, &[0xAB; BLOCK_SIZE]), req];
        let err = dev.submit(&mut batch).expect_err("bad request accepted");
        assert!(is_expected(&err), "unexpected error {err:?}");
        assert_eq!(batch.len(), 2, "a refused batch stays in place");
        assert_eq!(dev.in_flight(), 0);
    }
    assert_eq!(
        read_sync(dev, 0, BLOCK_SIZE),
        vec![0x11; BLOCK_SIZE],
        "refused write was executed"
    );
    // The last block is still reachable.
    write_sync(dev, cap - b, &[0x22; BLOCK_SIZE]);
    assert_eq!(read_sync(dev, cap - b, BLOCK_SIZE), vec![0x22; BLOCK_SIZE]);
}

/// A batch that does not fit next to what is in flight is refused whole.
pub(crate) fn queue_full(dev: &mut dyn BlockDevice, limit: usize) {
    let mk = |n: usize, base: u64| {
        (0..n)
            .map(|i| read_req(base + i as u64, 0, BLOCK_SIZE))
            .collect::<Vec<_>>()
    };
    let mut too_many = mk(limit + 1, 0);
    assert_eq!(dev.submit(&mut too_many), Err(IoError::QueueFull));
    assert_eq!(too_many.len(), limit + 1);
    assert_eq!(dev.in_flight(), 0);

    let mut first = mk(limit - 1, 100);
    dev.submit(&mut first).unwrap();
    assert_eq!(dev.in_flight(), limit - 1);
    let mut two = mk(2, 10_000);
    assert_eq!(dev.submit(&mut two), Err(IoError::QueueFull));
    assert_eq!(two.len(), 2);
    let mut one = mk(1, 20_000);
    dev.submit(&mut one).unwrap();
    assert_eq!(dev.in_flight(), limit);
    let mut more = mk(1, 30_000);
    assert_eq!(dev.submit(&mut more), Err(IoError::QueueFull));
    let done = drain(dev);
    assert_eq!(done.len(), limit);
    assert!(done.iter().all(|c| c.result.is_ok()));
    dev.submit(&mut more).unwrap();
    assert_eq!(drain(dev).len(), 1);
}

/// A Flush is reported only after every request submitted before it (in the same batch or
/// an earlier `submit`), and the writes before it are readable afterwards. Returns how many
/// times the completion order differed from submission order (reordering seen).
pub(crate) fn flush_barrier(dev: &mut dyn BlockDevice, seed: u64, iterations: usize) -> usize {
    let mut rng = SplitMix64::new(seed);
    let region = dev.capacity_bytes().min(1 << 20);
    let mut reordered = 0;
    let mut tag = 0u64;
    for it in 0..iterations {
        let mut reqs = Vec::new();
        let mut flush_tags = Vec::new();
        let mut writes = Vec::new();
        // Writes to distinct blocks, a flush somewhere in the middle, more after it.
        let nblocks = (region / BLOCK_SIZE as u64) as usize;
        let n = 4 + rng.below(20) as usize;
        let mut blocks: Vec<usize> = (0..nblocks).collect();
        rng.shuffle(&mut blocks);
        for (i, &blk) in blocks.iter().take(n).enumerate() {
            tag += 1;
            if i == n / 2 || rng.below(8) == 0 {
                reqs.push(IoRequest {
                    tag,
                    op: IoOp::Flush,
                });
                flush_tags.push(tag);
                tag += 1;
            }
            let data = filled(BLOCK_SIZE, &mut rng);
            writes.push((blk as u64 * BLOCK_SIZE as u64, data.to_vec()));
            reqs.push(IoRequest {
                tag,
                op: IoOp::Write {
                    offset: blk as u64 * BLOCK_SIZE as u64,
                    buf: data,
                },
            });
        }
        tag += 1;
        reqs.push(IoRequest {
            tag,
            op: IoOp::Flush,
        });
        flush_tags.push(tag);
        // Submit in two parts (without polling in between) so the barrier must also cover
        // requests from an earlier submit.
        let split = 1 + rng.below(reqs.len() as u64 - 1) as usize;
        let mut second = reqs.split_off(split);
        let total = reqs.len() + second.len();
        dev.submit(&mut reqs).unwrap();
        dev.submit(&mut second).unwrap();
        let done = drain(dev);
        assert_eq!(done.len(), total);
        let order: Vec<u64> = done.iter().map(|c| c.tag).collect();
        for c in &done {
            assert!(
                c.result.is_ok(),
                "iteration {it}: tag {} failed: {:?}",
                c.tag,
                c.result
            );
        }
        for &f in &flush_tags {
            let pos = order.iter().position(|&t| t == f).unwrap();
            for &t in &order[pos + 1..] {
                assert!(t > f, "iteration {it}: request {t} submitted before flush {f} completed after it: {order:?}");
            }
        }
        let mut sorted = order.clone();
        sorted.sort_unstable();
        if sorted != order {
            reordered += 1;
        }
        for (off, data) in writes {
            assert_eq!(
                read_sync(dev, off, BLOCK_SIZE),
                data,
                "iteration {it}: write at {off} lost"
            );
        }
    }
    reordered
}

/// On a device whose writes fail: the write reports `Device`, a flush after it does not
/// report success, reads still work, and every later submit is refused with `Failed`.
pub(crate) fn write_error_fails_device(dev: &mut dyn BlockDevice) {
    let before = read_sync(dev, 0, BLOCK_SIZE);
    let mut batch = vec![
        write_req(1, 0, &[0xEE; BLOCK_SIZE]),
        read_req(2, BLOCK_SIZE as u64, BLOCK_SIZE),
        IoRequest {
            tag: 3,
            op: IoOp::Flush,
        },
    ];
    dev.submit(&mut batch).unwrap();
    let mut done = drain(dev);
    done.sort_by_key(|c| c.tag);
    assert_eq!(done.len(), 3);
    assert!(
        matches!(done[0].result, Err(IoError::Device(_))),
        "{:?}",
        done[0].result
    );
    assert!(
        done[0].buf.is_some(),
        "failed write still hands its buffer back"
    );
    assert!(done[1].result.is_ok(), "{:?}", done[1].result);
    assert!(
        done[2].result.is_err(),
        "flush after a failed write reported success"
    );
    let mut later = vec![
        read_req(4, 0, BLOCK_SIZE),
        IoRequest {
            tag: 5,
            op: IoOp::Flush,
        },
    ];
    assert_eq!(dev.submit(&mut later), Err(IoError::Failed));
    assert_eq!(later.len(), 2);
    assert_eq!(dev.in_flight(), 0);
    assert!(before.len() == BLOCK_SIZE);
}
