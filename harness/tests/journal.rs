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
//! Offline: namespace changes journaled while the hive is away survive `kill -9` and are
//! sent exactly once by the next mount's replay (`offline_changes_under_kill9_rounds`).
//!
//! Knobs: `JOURNAL_KILL_ROUNDS` (rounds per mode, default 5), `JOURNAL_OFFLINE_KILL_ROUNDS`
//! (default 3), `JOURNAL_KILL_SEED`.

use hivefs_harness::mount::TestMount;
use hivefs_harness::{env_u64, NodeOptions, Rng, TestNode};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
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
/// chunk caches), writing to the file it holds the lease of (fsync returns once the
/// journal has the bytes), and renaming, removing, chmod-ing and truncating what it saw
/// (journaled, shown at once in its listings and attributes); creates and names never
/// seen fail at once with EHOSTDOWN; `hi status` says the hive is unreachable and what
/// waits. Once the hive is back, everything reaches it in order (a second mount sees it).
#[test]
fn offline_reads_writes_and_namespace_changes_go_on_without_the_hive() {
    let mut node = TestNode::start(NodeOptions::default().name("journal-offline"));
    let Some(mut m) = TestMount::start_on_disk(&node, "offline", true) else {
        return;
    };
    let dir = m.join("docs");
    std::fs::create_dir(&dir).unwrap();
    std::fs::create_dir(dir.join("empty")).unwrap();
    let mut want = Vec::new();
    for k in 0..4u64 {
        let bytes = expected(200 + k, 0, (1 << 20) + 4096 * k as usize);
        std::fs::write(dir.join(format!("f{k}")), &bytes).unwrap();
        want.push(bytes);
    }
    // A fresh mount reads them once: the answers and the chunks are what it has seen.
    m.remount();
    let names = listing(&dir).unwrap();
    for (k, w) in want.iter().enumerate() {
        assert_eq!(&std::fs::read(dir.join(format!("f{k}"))).unwrap(), w);
    }
    assert_eq!(listing(&dir.join("empty")).unwrap(), Vec::<String>::new());
    // Seen: the target name of the rename below does not exist.
    assert!(!dir.join("g0").exists());
    let log_path = m.join("log.bin");
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&log_path)
        .unwrap();
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
    // Writes to the leased file go into the journal; fsync returns. A truncation between
    // writes applies after the bytes before it and before the bytes after it.
    let t = Instant::now();
    let second = expected(300, first.len() as u64, 512 << 10);
    log.write_all(&second).unwrap();
    log.set_len(100_000).unwrap();
    let third = expected(301, 0, 50_000);
    log.write_all_at(&third, 150_000).unwrap();
    log.sync_all().unwrap();
    let mut log_want = first.clone();
    log_want.extend_from_slice(&second);
    log_want.truncate(100_000);
    log_want.resize(150_000, 0);
    log_want.extend_from_slice(&third);
    assert!(
        std::fs::read(&log_path).unwrap() == log_want,
        "log read offline"
    );
    eprintln!(
        "wrote, truncated, wrote and fsynced offline in {:.1?}",
        t.elapsed()
    );
    // Namespace changes on what was seen: journaled, shown at once.
    let t = Instant::now();
    std::fs::rename(dir.join("f0"), dir.join("g0")).unwrap();
    std::fs::rename(dir.join("f3"), dir.join("f2")).unwrap();
    std::fs::remove_file(dir.join("f1")).unwrap();
    std::fs::remove_dir(dir.join("empty")).unwrap();
    std::fs::set_permissions(dir.join("g0"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let made = t.elapsed();
    eprintln!("2 renames (one replacing), an unlink, an rmdir and a chmod offline in {made:.1?}");
    let offline_names = listing(&dir).unwrap();
    assert_eq!(offline_names, ["f2", "g0"], "listing after offline changes");
    assert_eq!(std::fs::read(dir.join("g0")).unwrap(), want[0]);
    assert_eq!(std::fs::read(dir.join("f2")).unwrap(), want[3]);
    let mode = std::fs::metadata(dir.join("g0"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o600);
    assert!(!dir.join("f1").exists() && !dir.join("f0").exists());
    // What cannot go on without the hive fails at once, and says why.
    let t = Instant::now();
    let created = std::fs::File::create(dir.join("new"));
    let made_dir = std::fs::create_dir(dir.join("newdir"));
    let unseen = std::fs::metadata(m.join("never-listed-dir"));
    // A name missing from a directory listed whole is known not to exist.
    let missing = std::fs::metadata(dir.join("never-looked-up"));
    assert_eq!(missing.unwrap_err().kind(), std::io::ErrorKind::NotFound);
    let host_down =
        |r: std::io::Result<()>| r.err().and_then(|e| e.raw_os_error()) == Some(libc::EHOSTDOWN);
    assert!(host_down(created.map(|_| ())), "create offline");
    assert!(host_down(made_dir), "mkdir offline");
    assert!(
        host_down(unseen.map(|_| ())),
        "lookup in a directory never listed"
    );
    let refusals = t.elapsed();
    eprintln!("create, mkdir, unseen lookup refused (EHOSTDOWN) in {refusals:.1?}");
    assert!(
        refusals < Duration::from_secs(2),
        "offline refusals wait: {refusals:?}"
    );
    std::thread::sleep(Duration::from_millis(1200));
    let status = m.disk_status();
    eprintln!("hi status offline:\n{status}");
    assert!(status.contains("UNREACHABLE"), "{status}");
    // Two renames, an unlink, an rmdir, a chmod, a truncation (and reclaims of the
    // inodes that lost their last name, once the kernel forgets them).
    let waiting = number_after(&status, "changes");
    assert!(waiting >= 6, "{status}");

    node.run();
    let t = Instant::now();
    loop {
        let status = m.disk_status();
        if status.contains("hive      reachable")
            && status.contains("pending   0 ")
            && status.contains("changes   0 ")
        {
            assert!(status.contains("0 of them refused"), "{status}");
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
    assert_eq!(got.len(), log_want.len());
    assert!(got == log_want, "log.bin as another mount reads it");
    eprintln!(
        "a second mount reads the {} bytes written around the outage",
        got.len()
    );
    let odir = other.join("docs");
    assert_eq!(listing(&odir).unwrap(), ["f2", "g0"]);
    assert_eq!(std::fs::read(odir.join("g0")).unwrap(), want[0]);
    assert_eq!(std::fs::read(odir.join("f2")).unwrap(), want[3]);
    let mode = std::fs::metadata(odir.join("g0"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o600);
    eprintln!("a second mount sees the namespace changes made offline");
    drop(other);
    drop(m);
    let report = node.fsck(true);
    assert!(report.contains("clean"), "fsck: {report}");
}

/// A truncation asks for the file's write lease first (another host's uncommitted bytes
/// are recalled and committed before the new size). With the hive away, that request
/// goes offline like the mount's other calls, within `REACH_WITHIN`, instead of retrying
/// for the lock client's 30 s and failing with EIO (as it did): mount B holds 3 MiB of a
/// file uncommitted when the hive stops, and mount A's truncation of it (the kernel has
/// the attributes: straight to setattr) is journaled within seconds. Once the hive is
/// back the file is 1 MiB of B's bytes. (B's descriptor is inherited by the hive process
/// the harness starts, whose exec closes it: B commits then, before A's truncation is
/// sent, so this does not show that the truncation takes the lease when it is sent:
/// `partition.rs` does, with A cut off on its own.)
#[test]
fn a_truncation_with_the_hive_away_is_journaled_within_seconds() {
    let mut node = TestNode::start(NodeOptions::default().name("journal-offline-trunc"));
    let Some(a) = TestMount::start_on_disk(&node, "offtrunc", true) else {
        return;
    };
    let b = TestMount::start(&node, "offtrunc");
    std::fs::write(a.join("f"), expected(400, 0, 2 << 20)).unwrap();
    assert_eq!(std::fs::metadata(a.join("f")).unwrap().len(), 2 << 20);
    let new = expected(401, 0, 3 << 20);
    let mut fb = std::fs::OpenOptions::new()
        .write(true)
        .open(b.join("f"))
        .unwrap();
    fb.write_all(&new).unwrap();

    node.stop();
    let t = Instant::now();
    let path = std::ffi::CString::new(a.join("f").as_os_str().as_encoded_bytes()).unwrap();
    let rc = unsafe { libc::truncate(path.as_ptr(), 1 << 20) };
    let (took, err) = (t.elapsed(), std::io::Error::last_os_error());
    eprintln!("A's truncation with the hive away: rc {rc} in {took:.1?}");
    assert_eq!(rc, 0, "{err} after {took:.1?}");
    assert!(
        took < Duration::from_secs(10),
        "the truncation waited {took:?}"
    );
    assert_eq!(std::fs::metadata(a.join("f")).unwrap().len(), 1 << 20);

    node.run();
    fb.sync_all().unwrap();
    drop(fb);
    let c = TestMount::start(&node, "offtrunc");
    let t = Instant::now();
    while std::fs::metadata(c.join("f")).unwrap().len() != 1 << 20 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "A's truncation did not apply after B's bytes: {} bytes\n{}",
            std::fs::metadata(c.join("f")).unwrap().len(),
            a.log_tail(20)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let got = std::fs::read(c.join("f")).unwrap();
    assert!(got == new[..1 << 20], "another mount reads other bytes");
    drop((a, b, c));
    let report = node.fsck(true);
    assert!(report.contains("clean"), "fsck: {report}");
}

/// Namespace changes journaled offline survive `kill -9` of `hi`: the hive is stopped,
/// changes are made, `hi` is killed, the hive comes back, and the remount's replay sends
/// them (exactly once: the listing is as the killed mount showed it).
#[test]
fn offline_changes_survive_kill9_and_replay_once() {
    let mut node = TestNode::start(NodeOptions::default().name("journal-offline-kill"));
    let Some(mut m) = TestMount::start_on_disk(&node, "offkill", true) else {
        return;
    };
    let dir = m.join("d");
    std::fs::create_dir(&dir).unwrap();
    for k in 0..6u64 {
        std::fs::write(dir.join(format!("f{k}")), expected(400 + k, 0, 8192)).unwrap();
    }
    m.remount();
    // Seen (as `ls -l` sees them): the names and their attributes. The names the renames
    // below take are missing from the whole listing.
    let names = listing(&dir).unwrap();
    assert_eq!(names.len(), 6);
    for n in &names {
        std::fs::metadata(dir.join(n)).unwrap();
    }
    node.stop();
    for k in 0..3 {
        std::fs::rename(dir.join(format!("f{k}")), dir.join(format!("r{k}"))).unwrap();
    }
    std::fs::remove_file(dir.join("f3")).unwrap();
    std::fs::set_permissions(dir.join("f4"), std::fs::Permissions::from_mode(0o640)).unwrap();
    let shown = listing(&dir).unwrap();
    assert_eq!(shown, ["f4", "f5", "r0", "r1", "r2"]);
    m.kill9();
    node.run();
    m.remount();
    let log = m.log();
    let replayed = log
        .lines()
        .rev()
        .find(|l| l.contains("namespace changes made offline (0 refused"))
        .unwrap_or_else(|| panic!("no replay line:\n{}", m.log_tail(20)));
    // Three renames, an unlink, a chmod (and maybe a reclaim of the unlinked inode).
    let ops = number_before(replayed, " namespace changes made offline");
    assert!(ops >= 5, "{replayed}");
    assert_eq!(listing(&dir).unwrap(), shown, "after kill -9 and replay");
    for k in 0..3u64 {
        assert_eq!(
            std::fs::read(dir.join(format!("r{k}"))).unwrap(),
            expected(400 + k, 0, 8192)
        );
    }
    let mode = std::fs::metadata(dir.join("f4"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o640);
    eprintln!("5 offline changes replayed once after kill -9");
    drop(m);
    let report = node.fsck(true);
    assert!(report.contains("clean"), "fsck: {report}");
}

/// The number after `key` at the start of a line of `text` (`hi status`'s form).
fn number_after(text: &str, key: &str) -> u64 {
    let line = text
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("no {key} line in {text}"));
    line[key.len()..]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number in {line}"))
}

/// The number right before `marker` in `line`.
fn number_before(line: &str, marker: &str) -> u64 {
    let head = &line[..line.find(marker).expect("marker")];
    head.rsplit(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number before {marker} in {line}"))
}

/// Write-back mode defers a setattr of a file whose bytes are not committed yet
/// (`Writeback::change_file`): chmod, chown and utimens answer at once and show at once;
/// the hive gets them after the bytes, so the commit does not overwrite the times set
/// (another mount sees them as set); after `kill -9` the replay applies them after the
/// bytes too.
#[test]
fn writeback_setattrs_after_writes_apply_after_the_bytes() {
    let node = TestNode::start(NodeOptions::default().name("journal-setattr"));
    let Some(mut m) = TestMount::start_on_disk(&node, "wbattr", true) else {
        return;
    };
    let when = |secs: i64| std::time::UNIX_EPOCH + Duration::from_secs(secs as u64);
    let set = |path: &Path, mode: u32, mtime: i64| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        std::os::unix::fs::chown(path, Some(1234), Some(5678)).unwrap();
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_times(std::fs::FileTimes::new().set_modified(when(mtime)))
            .unwrap();
    };
    let check = |path: &Path, mode: u32, mtime: i64, len: usize, k: u64| {
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(path).unwrap();
        assert_eq!(md.mode() & 0o7777, mode, "{}", path.display());
        assert_eq!((md.uid(), md.gid()), (1234, 5678), "{}", path.display());
        assert_eq!(md.mtime(), mtime, "{}", path.display());
        assert_eq!(std::fs::read(path).unwrap(), expected(k, 0, len));
    };
    // Settled: the hive has bytes and attributes (another mount sees them).
    let a = m.join("a");
    std::fs::write(&a, expected(700, 0, 300_000)).unwrap();
    let t = Instant::now();
    set(&a, 0o640, 1_000_000_000);
    eprintln!(
        "chmod + chown + utimens of a file just written: {:.1?}",
        t.elapsed()
    );
    check(&a, 0o640, 1_000_000_000, 300_000, 700);
    let other = TestMount::start(&node, "wbattr");
    let t = Instant::now();
    loop {
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(other.join("a")).unwrap();
        if md.mtime() == 1_000_000_000 && md.len() == 300_000 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "another mount never saw a's bytes and times: {md:?}\n{}",
            m.log_tail(20)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Its open recalls this mount's lease: everything is committed first.
    check(&other.join("a"), 0o640, 1_000_000_000, 300_000, 700);
    drop(other);
    // Killed before the flusher: the replay applies them after the bytes.
    let b = m.join("b");
    std::fs::write(&b, expected(701, 0, 200_000)).unwrap();
    set(&b, 0o600, 1_100_000_000);
    m.kill9();
    m.remount();
    check(&b, 0o600, 1_100_000_000, 200_000, 701);
    check(&a, 0o640, 1_000_000_000, 300_000, 700);
    eprintln!("setattrs made after writes in write-back mode: seen at once, by another mount, and after kill -9");
    drop(m);
    let report = node.fsck(true);
    assert!(report.contains("clean"), "fsck: {report}");
}

/// An offline namespace workload's model: name -> (content id, mode).
type Names = std::collections::BTreeMap<String, (u64, u32)>;

/// One offline change of the workload below, as the model applies it.
#[derive(Clone, Debug)]
enum Change {
    Rename(String, String),
    Unlink(String),
    Chmod(String, u32),
}

fn apply(names: &mut Names, c: &Change) {
    match c {
        Change::Rename(a, b) => {
            let v = names.remove(a).expect("renamed name");
            names.insert(b.clone(), v);
        }
        Change::Unlink(a) => {
            names.remove(a);
        }
        Change::Chmod(a, mode) => names.get_mut(a).expect("chmod name").1 = *mode,
    }
}

/// Offline changes under `kill -9` (`hi_command/src/offline.rs`): each round stops the
/// hive, makes random renames (to new names and over existing ones), unlinks and chmods
/// of what the mount saw, kills `hi` at a random moment, brings the hive back and
/// remounts: the replay sends what the journal holds, and the namespace is the one the
/// acknowledged changes made (the change in flight at the kill: applied or not, once).
/// `JOURNAL_OFFLINE_KILL_ROUNDS` (default 3), `JOURNAL_KILL_SEED`.
#[test]
fn offline_changes_under_kill9_rounds() {
    let mut node = TestNode::start(NodeOptions::default().name("journal-offline-rounds"));
    let Some(mut m) = TestMount::start_on_disk(&node, "offrounds", true) else {
        return;
    };
    let rounds = env_u64("JOURNAL_OFFLINE_KILL_ROUNDS", 3);
    let seed = env_u64("JOURNAL_KILL_SEED", 0x0ff1);
    let mut rng = Rng::new(seed);
    let dir = m.join("o");
    std::fs::create_dir(&dir).unwrap();
    let mut names = Names::new();
    for k in 0..40u64 {
        std::fs::write(dir.join(format!("n{k}")), expected(500 + k, 0, 4096)).unwrap();
        names.insert(format!("n{k}"), (500 + k, 0o644));
    }
    let mut next = 0u64;
    let (mut applied_total, mut in_flight_applied) = (0usize, 0usize);
    for round in 0..rounds {
        m.remount();
        // What a user's `ls -l` would have seen: every name and its attributes.
        let seen = listing(&dir).unwrap();
        assert_eq!(
            seen,
            names.keys().cloned().collect::<Vec<_>>(),
            "round {round}"
        );
        for n in &seen {
            std::fs::metadata(dir.join(n)).unwrap();
        }
        node.stop();
        let acked: Arc<Mutex<(Vec<Change>, Option<Change>)>> = Arc::default();
        let (a, d, mut model) = (acked.clone(), dir.clone(), names.clone());
        let mut wrng = Rng::new(seed ^ ((round + 1) * 0x9e37));
        let first_next = next;
        let worker = std::thread::spawn(move || {
            let mut next = first_next;
            loop {
                let keys: Vec<String> = model.keys().cloned().collect();
                let pick = |r: &mut Rng| keys[r.below(keys.len() as u64) as usize].clone();
                let c = match wrng.below(10) {
                    0..=3 => {
                        next += 1;
                        Change::Rename(pick(&mut wrng), format!("m{next}"))
                    }
                    4..=5 if keys.len() > 10 => {
                        let (x, y) = (pick(&mut wrng), pick(&mut wrng));
                        if x == y {
                            continue;
                        }
                        Change::Rename(x, y)
                    }
                    6..=7 if keys.len() > 10 => Change::Unlink(pick(&mut wrng)),
                    _ => Change::Chmod(pick(&mut wrng), 0o600 + wrng.below(0o100) as u32),
                };
                a.lock().unwrap().1 = Some(c.clone());
                let r = match &c {
                    Change::Rename(x, y) => std::fs::rename(d.join(x), d.join(y)),
                    Change::Unlink(x) => std::fs::remove_file(d.join(x)),
                    Change::Chmod(x, mode) => {
                        std::fs::set_permissions(d.join(x), std::fs::Permissions::from_mode(*mode))
                    }
                };
                if r.is_err() {
                    return;
                }
                apply(&mut model, &c);
                let mut g = a.lock().unwrap();
                g.0.push(c);
                g.1 = None;
            }
        });
        // Past the first change (which finds the hive away), then a random moment.
        let t = Instant::now();
        while acked.lock().unwrap().0.is_empty() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "no offline change went through"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(rng.below(300)));
        m.kill9();
        let _ = worker.join();
        node.run();
        let (done, flying) = acked.lock().unwrap().clone();
        for c in done.iter().chain(&flying) {
            // New names are never used twice, even one a lost change would have taken.
            if let Change::Rename(_, b) = c {
                if let Some(n) = b.strip_prefix('m').and_then(|n| n.parse::<u64>().ok()) {
                    next = next.max(n);
                }
            }
        }
        for c in &done {
            apply(&mut names, c);
        }
        m.remount();
        let got = listing(&dir).unwrap();
        let mut with_flying = names.clone();
        if let Some(c) = &flying {
            apply(&mut with_flying, c);
        }
        let want_keys = |n: &Names| n.keys().cloned().collect::<Vec<_>>();
        let modes = |d: &Path, n: &Names| {
            n.keys()
                .map(|k| std::fs::metadata(d.join(k)).unwrap().permissions().mode() & 0o7777)
                .collect::<Vec<_>>()
        };
        let matches = |n: &Names| {
            got == want_keys(n) && modes(&dir, n) == n.values().map(|v| v.1).collect::<Vec<_>>()
        };
        if matches(&names) {
        } else if flying.is_some() && matches(&with_flying) {
            names = with_flying;
            in_flight_applied += 1;
        } else {
            panic!(
                "round {round}: after kill -9 and replay the namespace is {got:?}, acknowledged \
                 {:?} (in flight: {flying:?})\n{}",
                want_keys(&names),
                m.log_tail(30)
            );
        }
        for (n, (id, _)) in &names {
            let bytes = std::fs::read(dir.join(n)).unwrap();
            assert!(
                bytes == expected(*id, 0, 4096),
                "round {round}: {n} holds another file"
            );
        }
        applied_total += done.len();
        eprintln!(
            "round {round}: {} offline changes acknowledged before the kill, all there after \
             replay ({} names)",
            done.len(),
            names.len()
        );
    }
    eprintln!(
        "{rounds} rounds: {applied_total} acknowledged offline changes survived kill -9; the \
         change in flight applied in {in_flight_applied} rounds"
    );
    drop(m);
    let report = node.fsck(true);
    assert!(report.contains("clean"), "fsck: {report}");
}

/// A directory's names, sorted.
fn listing(d: &Path) -> Result<Vec<String>, std::io::Error> {
    let mut names: Vec<String> = std::fs::read_dir(d)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    names.sort();
    Ok(names)
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
