//! ENOSPC end to end: a hive whose device fills answers ENOSPC through the mount (at fsync
//! and close, as a write-back filesystem does, or at write once the failed bytes pile
//! up), keeps everything it acknowledged, and after deletes and `hive gc` (whose sweeps
//! let the shards compact) takes writes again. `hive fsck --verify` is the oracle.

use hivefs_harness::mount::{fuse_unavailable, skip, TestMount};
use hivefs_harness::{NodeOptions, Rng, TestNode};
use std::fs::File;
use std::io::Write;
use std::time::{Duration, Instant};

/// One file: 24 MiB of unique bytes.
const FILE_BYTES: usize = 24 << 20;

/// Write `data` to `path` and fsync it; the errno of the first failure.
fn write_synced(path: &std::path::Path, data: &[u8]) -> Result<(), i32> {
    let errno = |e: std::io::Error| e.raw_os_error().unwrap_or(0);
    let mut f = File::create(path).map_err(errno)?;
    f.write_all(data).map_err(errno)?;
    f.sync_all().map_err(errno)?;
    Ok(())
}

#[test]
fn a_full_hive_answers_enospc_and_takes_writes_again_after_gc() {
    if let Some(why) = fuse_unavailable() {
        skip(&format!("fs-enospc: {why}"));
        return;
    }
    // One shard of 6 segments of 64 MiB, 2 of them kept back for compaction: room for
    // about 256 MiB of chunks.
    let node = TestNode::start(
        NodeOptions::default()
            .shards(1)
            .size("400M")
            .name("fs-enospc"),
    );
    let Some(m) = TestMount::start_or_skip(&node, "full") else {
        skip("fs-enospc: see the reason above");
        return;
    };
    let mut rng = Rng::new(0xe05c);
    let mut kept: Vec<(std::path::PathBuf, Vec<u8>)> = Vec::new();
    let mut refused = None;
    for i in 0..30 {
        let p = m.path().join(format!("f{i:02}"));
        let data = rng.bytes(FILE_BYTES);
        match write_synced(&p, &data) {
            Ok(()) => kept.push((p, data)),
            Err(e) => {
                refused = Some((i, e, p));
                break;
            }
        }
    }
    let (at, errno, refused_path) = refused.expect("the device never filled");
    assert_eq!(errno, libc::ENOSPC, "file {at} failed with errno {errno}");
    assert!(at >= 5, "refused too early, at file {at}");
    println!("fs-enospc: file {at} refused with ENOSPC after {at} files of 24 MiB");
    // Everything acknowledged before reads back.
    for (p, data) in &kept {
        assert!(
            std::fs::read(p).unwrap() == *data,
            "{} changed",
            p.display()
        );
    }
    // Free space: the refused file and half of the others go; two collections sweep them
    // and the shard compacts.
    std::fs::remove_file(&refused_path).unwrap();
    let gone: Vec<_> = kept.drain(..kept.len() / 2).collect();
    for (p, _) in &gone {
        std::fs::remove_file(p).unwrap();
    }
    println!("fs-enospc: gc: {}", node.gc().trim());
    println!("fs-enospc: gc: {}", node.gc().trim());
    // Compaction runs in the background after the sweep: new writes succeed within a
    // deadline.
    let deadline = Instant::now() + Duration::from_secs(60);
    let fresh = rng.bytes(FILE_BYTES);
    let p = m.path().join("after-gc");
    loop {
        match write_synced(&p, &fresh) {
            Ok(()) => break,
            Err(e) if e == libc::ENOSPC && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("writing after gc: errno {e}"),
        }
    }
    assert!(std::fs::read(&p).unwrap() == fresh);
    for (p, data) in &kept {
        assert!(
            std::fs::read(p).unwrap() == *data,
            "{} changed",
            p.display()
        );
    }
    drop(m);
    let report = node.fsck(true);
    println!("fs-enospc: fsck: {}", report.trim());
}
