//! The client disk under real crashes: `hi mount DISK` is killed with SIGKILL while a
//! workload writes, fsyncs and renames; after each remount (which replays the journal)
//! every fsync-acknowledged byte and every acknowledged rename is there, and no file holds
//! a byte it was never given. Both modes: default (fsync waits for the hive) and
//! `--writeback` (fsync waits for the journal only). Then `hive fsck` is clean.
//!
//! Also: what `hi format` refuses, and what `hi mount` says of a disk it cannot use.
//!
//! Power loss: the same rounds with `hi mount --fault-power-loss`, whose client disk keeps
//! writes in memory until flushed, so the kill also loses every unflushed journal write.
//!
//! Knobs: `JOURNAL_KILL_ROUNDS` (rounds per mode, default 5), `JOURNAL_KILL_SEED`.

use hivefs_harness::mount::TestMount;
use hivefs_harness::{env_u64, NodeOptions, Rng, TestNode};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Byte `i` of file `k`: every file's bytes are known from its name.
fn byte_of(k: u64, i: u64) -> u8 {
    let x = i
        .wrapping_mul(0x9e37_79b9)
        .wrapping_add(k.wrapping_mul(0x85eb_ca6b));
    (x ^ (x >> 13) ^ (i >> 7)) as u8
}

fn expected(k: u64, from: u64, len: usize) -> Vec<u8> {
    (from..from + len as u64).map(|i| byte_of(k, i)).collect()
}

/// What the workload was told succeeded, per file.
#[derive(Default, Clone, Debug)]
struct Acked {
    /// Bytes `[0, len)` were fsynced.
    len: u64,
    /// The rename `f{k}.tmp` -> `f{k}` returned.
    renamed: bool,
    /// A rename was started (it may have applied without its answer).
    renaming: bool,
}

/// Write files `f{k}.tmp` in `dir` in random pieces, fsync after each, rename each done
/// file to `f{k}`; until an operation fails (the mount went away).
fn workload(dir: PathBuf, first: u64, seed: u64, acked: Arc<Mutex<Vec<(u64, Acked)>>>) {
    let mut rng = Rng::new(seed);
    let mut k = first;
    loop {
        let tmp = dir.join(format!("f{k}.tmp"));
        let Ok(mut f) = std::fs::File::create(&tmp) else {
            return;
        };
        acked.lock().unwrap().push((k, Acked::default()));
        let total = 64 * 1024 + rng.below(2 << 20);
        let mut off = 0u64;
        while off < total {
            let n = (4096 + rng.below(300 << 10)).min(total - off) as usize;
            if f.seek(SeekFrom::Start(off)).is_err() || f.write_all(&expected(k, off, n)).is_err() {
                return;
            }
            off += n as u64;
            if f.sync_all().is_err() {
                return;
            }
            acked.lock().unwrap().last_mut().unwrap().1.len = off;
        }
        drop(f);
        acked.lock().unwrap().last_mut().unwrap().1.renaming = true;
        if std::fs::rename(&tmp, dir.join(format!("f{k}"))).is_err() {
            return;
        }
        acked.lock().unwrap().last_mut().unwrap().1.renamed = true;
        k += 1;
    }
}

/// Check file `k` against what was acknowledged; returns the bytes found.
fn check_file(dir: &Path, k: u64, a: &Acked) -> Result<u64, String> {
    let done = dir.join(format!("f{k}"));
    let tmp = dir.join(format!("f{k}.tmp"));
    let path = match (done.exists(), tmp.exists()) {
        (true, false) => {
            if !a.renaming {
                return Err(format!("f{k} exists though it was never renamed"));
            }
            done
        }
        (false, true) => {
            if a.renamed {
                return Err(format!("f{k}: the acknowledged rename is gone"));
            }
            tmp
        }
        (true, true) => return Err(format!("f{k} and f{k}.tmp both exist")),
        (false, false) => return Err(format!("f{k}: no file (the create was acknowledged)")),
    };
    let got = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    if (got.len() as u64) < a.len {
        return Err(format!(
            "{}: {} bytes, {} were fsynced",
            path.display(),
            got.len(),
            a.len
        ));
    }
    let want = expected(k, 0, got.len());
    if let Some(i) = got.iter().zip(&want).position(|(g, w)| g != w) {
        return Err(format!(
            "{}: byte {i} of {} is {:#04x}, written {:#04x} (fsynced up to {})",
            path.display(),
            got.len(),
            got[i],
            want[i],
            a.len
        ));
    }
    Ok(got.len() as u64)
}

fn kill_rounds(writeback: bool, power_loss: bool) {
    let mode = match (writeback, power_loss) {
        (false, false) => "default",
        (true, false) => "writeback",
        (false, true) => "default-powerloss",
        (true, true) => "writeback-powerloss",
    };
    // A round writes up to ~30 MB (write-back); the (sparse) device grows with the rounds.
    let rounds = env_u64("JOURNAL_KILL_ROUNDS", 5);
    let size = format!("{}M", (rounds * 64).max(1024));
    let node = TestNode::start(
        NodeOptions::default()
            .name(&format!("journal-{mode}"))
            .size(&size),
    );
    let Some(mut m) = TestMount::start_on_disk(&node, &format!("journal-{mode}"), writeback) else {
        return;
    };
    if power_loss {
        // Every later mount loses, at its kill, what was not flushed.
        m.set_mount_args(&["--fault-power-loss"]);
        m.remount();
    }
    let seed = env_u64("JOURNAL_KILL_SEED", 0x10c4_1d15);
    let mut rng = Rng::new(seed ^ writeback as u64 ^ (power_loss as u64) << 1);
    let mut next_file = 0u64;
    let (mut fsynced, mut found, mut replays) = (0u64, 0u64, 0u64);
    for round in 0..rounds {
        let dir = m.join(format!("r{round}"));
        std::fs::create_dir(&dir).unwrap();
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (a, d, s) = (acked.clone(), dir.clone(), rng.next_u64());
        let first = next_file;
        let writer = std::thread::spawn(move || workload(d, first, s, a));
        let kill_after = Duration::from_millis(150 + rng.below(900));
        std::thread::sleep(kill_after);
        m.kill9();
        writer.join().unwrap();
        let t = Instant::now();
        m.remount();
        let log = m.log();
        let this = log.rsplit("=== harness: hi mount #").next().unwrap_or("");
        if this.contains("journal replayed") {
            replays += 1;
        }
        let acked = acked.lock().unwrap().clone();
        for (k, a) in &acked {
            match check_file(&dir, *k, a) {
                Ok(n) => found += n,
                Err(e) => panic!(
                    "{mode} round {round} (seed {seed:#x}, killed after {kill_after:?}): {e}\n{}",
                    m.log_tail(30)
                ),
            }
            fsynced += a.len;
            next_file = next_file.max(k + 1);
        }
        eprintln!(
            "{mode} round {round}: killed after {kill_after:?}, {} files checked, remount in {:.1?}",
            acked.len(),
            t.elapsed()
        );
    }
    eprintln!(
        "{mode}: {rounds} kill -9 rounds: {fsynced} bytes fsynced, {found} found, every one \
         as written; {replays} remounts replayed journal records"
    );
    m.stop();
    let report = node.fsck(true);
    assert!(report.contains("clean"), "fsck: {report}");
    eprintln!("{mode}: fsck: {}", report.lines().last().unwrap_or(""));
}

#[test]
fn kill9_loses_no_fsynced_write_default_mode() {
    kill_rounds(false, false);
}

#[test]
fn kill9_loses_no_fsynced_write_writeback_mode() {
    kill_rounds(true, false);
}

#[test]
fn power_loss_loses_no_fsynced_write_default_mode() {
    kill_rounds(false, true);
}

#[test]
fn power_loss_loses_no_fsynced_write_writeback_mode() {
    kill_rounds(true, true);
}

#[test]
fn hi_format_refuses_foreign_damaged_and_unflushed_disks() {
    let node = TestNode::start(NodeOptions::default().name("journal-format"));
    let Some(mut m) = TestMount::start_on_disk(&node, "jformat", true) else {
        return;
    };
    // Written, journaled (fsync in write-back mode), then killed: the journal holds it.
    {
        let mut f = std::fs::File::create(m.join("pending")).unwrap();
        f.write_all(&expected(7, 0, 300_000)).unwrap();
        f.sync_all().unwrap();
        // Kill before the background commit can finish, most of the time; either way the
        // checks below hold (a committed journal is empty).
        m.kill9();
    }
    let status = m.disk_status();
    eprintln!("hi status after the kill:\n{status}");
    assert!(status.contains("mounted   no"), "{status}");
    let out = m.format_disk(&[]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let pending = !out.status.success();
    assert_eq!(
        pending,
        !status.contains("pending   0 journal records"),
        "hi status and hi format disagree: {status}"
    );
    if pending {
        assert!(err.contains("not yet committed"), "{err}");
        eprintln!("refused: {}", err.trim());
    } else {
        eprintln!("the journal was committed before the kill: format went ahead");
    }
    // A mount replays it (or finds it committed): the bytes are there.
    if pending {
        m.remount();
        let got = std::fs::read(m.join("pending")).unwrap();
        assert_eq!(got, expected(7, 0, 300_000));
        m.stop();
    }
    // A foreign block 0 (an ext4-looking one) is refused; --force overwrites it.
    let disk = m.disk_path();
    let mut img = std::fs::read(&disk).unwrap();
    img[..8].copy_from_slice(b"\x53\xef\x01\x00ext4");
    std::fs::write(&disk, &img).unwrap();
    let out = m.format_disk(&[]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success() && err.contains("not a HiveFS client disk"),
        "{err}"
    );
    // A damaged superblock: refused by mount and by format.
    img[..8].copy_from_slice(b"HIVECLNT");
    img[40] ^= 0x10;
    std::fs::write(&disk, &img).unwrap();
    let out = std::process::Command::new(hivefs_harness::hi_bin())
        .args(["mount", "--secrets"])
        .arg(m.dir().join("secrets"))
        .arg(&disk)
        .arg(m.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success() && err.contains("damaged superblock"),
        "{err}"
    );
    eprintln!("mount refused: {}", err.trim());
    let out = m.format_disk(&[]);
    assert!(!out.status.success());
    let out = m.format_disk(&["--force"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    m.remount();
    assert!(
        m.join("pending").exists(),
        "the hive keeps what was committed"
    );
}

/// A copy in write-back mode while the hive goes away and comes back: the copy does not
/// fail (writers wait for room in the journal while the hive is away), and once the hive is
/// back everything reaches it: a second mount, without a client disk, reads the file whole
/// (its open recalls the write-back mount's lease, which commits what it holds first).
/// `JOURNAL_OUTAGE_SECS` (default 15; the acceptance: 60).
#[test]
fn a_writeback_copy_survives_the_hive_going_away() {
    let mut node = TestNode::start(NodeOptions::default().name("journal-outage"));
    let Some(m) = TestMount::start_on_disk(&node, "outage", true) else {
        return;
    };
    let outage = Duration::from_secs(env_u64("JOURNAL_OUTAGE_SECS", 15));
    let src = m.dir().join("source.bin");
    let size: usize = 384 << 20;
    {
        let mut f = std::fs::File::create(&src).unwrap();
        let mut rng = Rng::new(5);
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..size >> 20 {
            for w in block.chunks_mut(8) {
                w.copy_from_slice(&rng.next_u64().to_le_bytes());
            }
            f.write_all(&block).unwrap();
        }
    }
    let dst = m.join("copy.bin");
    let (s, d) = (src.clone(), dst.clone());
    let t = Instant::now();
    let copy = std::thread::spawn(move || {
        std::process::Command::new("cp")
            .arg(&s)
            .arg(&d)
            .output()
            .expect("running cp")
    });
    std::thread::sleep(Duration::from_millis(400));
    node.stop();
    eprintln!("hive stopped {:.1?} into the copy", t.elapsed());
    std::thread::sleep(outage / 2);
    let status = m.disk_status();
    eprintln!("hi status during the outage:\n{status}");
    assert!(
        status.contains("pending") && status.contains("(writeback,"),
        "{status}"
    );
    std::thread::sleep(outage - outage / 2);
    node.run();
    eprintln!("hive back after {outage:?}");
    let out = copy.join().unwrap();
    assert!(
        out.status.success(),
        "cp failed across the outage: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        m.log_tail(30)
    );
    eprintln!("cp finished {:.1?} after it started", t.elapsed());
    let other = TestMount::start(&node, "outage");
    let got = std::fs::read(other.join("copy.bin")).unwrap();
    let want = std::fs::read(&src).unwrap();
    assert_eq!(got.len(), want.len(), "{}", m.log_tail(30));
    assert!(got == want, "the copy differs from its source");
    eprintln!("a second mount reads all {} bytes as written", got.len());
    drop(other);
    drop(m);
    let report = node.fsck(true);
    assert!(report.contains("clean"), "fsck: {report}");
}

/// Offline (`hi_command/src/offline.rs`): with the hive stopped, a write-back mount with a
/// client disk goes on reading what it saw (listings, attributes, file bytes from the
/// chunk caches) and writing to the file it holds the lease of (fsync returns once the
/// journal has the bytes); namespace changes and names never seen fail at once with
/// EHOSTDOWN; `hi status` says the hive is unreachable. Once the hive is back, the written
/// bytes reach it (a second mount reads them).
#[test]
fn offline_reads_and_leased_writes_go_on_without_the_hive() {
    let mut node = TestNode::start(NodeOptions::default().name("journal-offline"));
    let Some(mut m) = TestMount::start_on_disk(&node, "offline", true) else {
        return;
    };
    let dir = m.join("docs");
    std::fs::create_dir(&dir).unwrap();
    let mut want = Vec::new();
    for k in 0..3u64 {
        let bytes = expected(200 + k, 0, (1 << 20) + 4096 * k as usize);
        std::fs::write(dir.join(format!("f{k}")), &bytes).unwrap();
        want.push(bytes);
    }
    // A fresh mount reads them once: the answers and the chunks are what it has seen.
    m.remount();
    let listing = |d: &Path| -> Result<Vec<String>, std::io::Error> {
        let mut names: Vec<String> = std::fs::read_dir(d)?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()?;
        names.sort();
        Ok(names)
    };
    let names = listing(&dir).unwrap();
    for (k, w) in want.iter().enumerate() {
        assert_eq!(&std::fs::read(dir.join(format!("f{k}"))).unwrap(), w);
    }
    let log_path = m.join("log.bin");
    let mut log = std::fs::File::create(&log_path).unwrap();
    let first = expected(300, 0, 256 << 10);
    log.write_all(&first).unwrap();
    log.sync_all().unwrap();

    node.stop();
    let t = Instant::now();
    let offline_names = listing(&dir).unwrap();
    eprintln!(
        "listing with the hive stopped: {:.1?} (the first call finds it away)",
        t.elapsed()
    );
    assert_eq!(offline_names, names);
    let t = Instant::now();
    for (k, w) in want.iter().enumerate() {
        let got = std::fs::read(dir.join(format!("f{k}"))).unwrap();
        assert!(&got == w, "f{k} read offline differs");
    }
    eprintln!("read {} files offline in {:.1?}", want.len(), t.elapsed());
    // Writes to the leased file go into the journal; fsync returns.
    let t = Instant::now();
    let second = expected(300, first.len() as u64, 512 << 10);
    log.write_all(&second).unwrap();
    log.sync_all().unwrap();
    eprintln!("wrote and fsynced 512 KiB offline in {:.1?}", t.elapsed());
    // What cannot go on without the hive fails at once, and says why.
    let t = Instant::now();
    let created = std::fs::File::create(dir.join("new"));
    let renamed = std::fs::rename(dir.join("f0"), dir.join("g0"));
    let unseen = std::fs::metadata(dir.join("never-looked-up"));
    let host_down =
        |r: std::io::Result<()>| r.err().and_then(|e| e.raw_os_error()) == Some(libc::EHOSTDOWN);
    assert!(host_down(created.map(|_| ())), "create offline");
    assert!(host_down(renamed), "rename offline");
    assert!(host_down(unseen.map(|_| ())), "lookup of a name never seen");
    let refusals = t.elapsed();
    eprintln!("create, rename, unseen lookup refused (EHOSTDOWN) in {refusals:.1?}");
    assert!(
        refusals < Duration::from_secs(2),
        "offline refusals wait: {refusals:?}"
    );
    std::thread::sleep(Duration::from_millis(1200));
    let status = m.disk_status();
    eprintln!("hi status offline:\n{status}");
    assert!(status.contains("UNREACHABLE"), "{status}");

    node.run();
    let t = Instant::now();
    loop {
        let status = m.disk_status();
        if status.contains("hive      reachable") && status.contains("pending   0 ") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the journal did not drain after the hive came back:\n{status}\n{}",
            m.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "back online and the journal drained {:.1?} after the hive returned",
        t.elapsed()
    );
    drop(log);
    let other = TestMount::start(&node, "offline");
    let got = std::fs::read(other.join("log.bin")).unwrap();
    assert_eq!(got.len(), first.len() + second.len());
    assert!(got[..first.len()] == first[..] && got[first.len()..] == second[..]);
    eprintln!(
        "a second mount reads the {} bytes written around the outage",
        got.len()
    );
    // The namespace is as it was: the refused rename did not happen later.
    assert!(other.join("docs/f0").exists() && !other.join("docs/g0").exists());
    drop(other);
    drop(m);
    let report = node.fsck(true);
    assert!(report.contains("clean"), "fsck: {report}");
}

/// The chunk cache on the client disk: `hi warmup` reads a tree into it; after a remount
/// (memory cache empty) reads of that tree are served from the disk (`hi cache status`
/// counts the hits), byte for byte.
#[test]
fn the_disk_cache_survives_remounts_and_serves_reads() {
    let node = TestNode::start(NodeOptions::default().name("journal-cache"));
    let Some(mut m) = TestMount::start_on_disk(&node, "dcache", false) else {
        return;
    };
    let dir = m.join("tree");
    std::fs::create_dir(&dir).unwrap();
    let mut want = Vec::new();
    for k in 0..4u64 {
        let bytes = expected(100 + k, 0, 3 << 20);
        std::fs::write(dir.join(format!("f{k}")), &bytes).unwrap();
        want.push(bytes);
    }
    m.remount();
    let out = std::process::Command::new(hivefs_harness::hi_bin())
        .arg("warmup")
        .arg(&dir)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && said.contains("warmed 4 files"),
        "{said}"
    );
    eprintln!("{}", said.trim());
    let cache_line = |m: &TestMount| {
        let out = std::process::Command::new(hivefs_harness::hi_bin())
            .args(["cache", "status", "--secrets"])
            .arg(m.dir().join("secrets"))
            .arg(m.disk_path())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    // The figures of the live mount reach its status file within a second.
    std::thread::sleep(Duration::from_millis(1500));
    let warm = cache_line(&m);
    eprintln!("after warmup: {warm}");
    m.stop();
    let idle = cache_line(&m);
    eprintln!("unmounted: {idle}");
    let chunks = |s: &str| -> u64 {
        s.split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    assert!(
        chunks(&idle) > 40 && chunks(&idle) == chunks(&warm),
        "the warmed chunks stay cached when unmounted: {warm} / {idle}"
    );
    m.remount();
    for (k, w) in want.iter().enumerate() {
        assert_eq!(&std::fs::read(dir.join(format!("f{k}"))).unwrap(), w);
    }
    std::thread::sleep(Duration::from_millis(1500));
    let after = cache_line(&m);
    eprintln!("after a remount and a read: {after}");
    let hits: u64 = after
        .split(';')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        hits >= chunks(&idle),
        "reads after the remount missed the disk: {after}"
    );
}
