//! Write leases with fencing tokens on real mounts (`engine/src/meta/leases.rs`,
//! `hi_command/src/leases.rs`): two `hi` processes stand for two hosts.
//!
//! - An open on host B recalls host A's lease on a file A has written and not committed:
//!   A commits, gives the lease back, and B reads A's bytes.
//! - Host A frozen (SIGSTOP) with uncommitted bytes: B's open waits one lease for the
//!   recall, then the hive revokes and fences A's lease; B writes; A, thawed, cannot
//!   commit (its close fails with EIO) and B's bytes stand.
//!
//! Where FUSE cannot work, each test prints `SKIP: <reason>` and returns.

use hivefs_harness::mount::TwoMounts;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::io::IntoRawFd;
use std::time::{Duration, Instant};

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn an_open_elsewhere_recalls_unflushed_writes() {
    let Some(t) = TwoMounts::start("lease-recall", "leases") else {
        return;
    };
    let data = pattern(3 << 20, 7);
    // A writes 3 MiB and keeps the file open: nothing is committed yet (A seals at
    // 32 MiB; no close, no fsync).
    let mut fa = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(t.a.join("shared"))
        .unwrap();
    fa.write_all(&data).unwrap();
    // B opens the file and reads A's bytes: its open recalled A's lease.
    let started = Instant::now();
    let seen = std::fs::read(t.b.join("shared")).unwrap();
    let took = started.elapsed();
    assert!(
        seen == data,
        "B read {} bytes, not A's {} uncommitted bytes\n{}",
        seen.len(),
        data.len(),
        t.logs()
    );
    println!("B's open waited {took:?} for A's recall");
    // A goes on writing after the recall (it asks for the lease again), then closes;
    // B sees the whole file at its next open.
    fa.seek(SeekFrom::End(0)).unwrap();
    let more = pattern(1 << 20, 8);
    fa.write_all(&more).unwrap();
    drop(fa);
    let mut all = data.clone();
    all.extend_from_slice(&more);
    let seen = std::fs::read(t.b.join("shared")).unwrap();
    assert!(
        seen == all,
        "after A's close B read {} bytes\n{}",
        seen.len(),
        t.logs()
    );
    // And the other way: B writes without closing, A's open sees it.
    let mut fb = std::fs::OpenOptions::new()
        .write(true)
        .open(t.b.join("shared"))
        .unwrap();
    fb.write_all(b"written on B").unwrap();
    let mut head = [0u8; 12];
    std::fs::File::open(t.a.join("shared"))
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    assert_eq!(&head, b"written on B", "{}", t.logs());
    drop(fb);
    let fsck = t.node.fsck(true);
    assert!(fsck.contains("clean"), "fsck: {fsck}");
}

#[test]
fn an_expired_lease_cannot_commit() {
    let Some(mut t) = TwoMounts::start("lease-fence", "leases") else {
        return;
    };
    let stale = pattern(1 << 20, 11);
    let mut fa = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(t.a.join("contended"))
        .unwrap();
    fa.write_all(&stale).unwrap();
    // Host A stops answering (a hung or cut-off host) with 1 MiB uncommitted.
    let a_pid = t.a.pid().expect("hi A runs") as i32;
    // SAFETY: signalling the hi process this test started.
    assert_eq!(unsafe { libc::kill(a_pid, libc::SIGSTOP) }, 0);
    // B's open waits for the recall, then the hive revokes A's lease (a lease after the
    // recall, or when A's session expires) and fences it.
    let started = Instant::now();
    let seen = std::fs::read(t.b.join("contended"));
    let waited = started.elapsed();
    let seen = match seen {
        Ok(s) => s,
        Err(e) => {
            // SAFETY: as above.
            unsafe { libc::kill(a_pid, libc::SIGCONT) };
            panic!("B's open failed: {e}\n{}", t.logs());
        }
    };
    assert!(seen.is_empty(), "B saw {} uncommitted bytes", seen.len());
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_secs(30),
        "B's open waited {waited:?}"
    );
    println!("B's open waited {waited:?} for A's lease to be revoked");
    let mine = pattern(64 << 10, 12);
    std::fs::write(t.b.join("contended"), &mine).unwrap();
    // A comes back: its lease was handed on, so its bytes cannot be committed.
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(a_pid, libc::SIGCONT) }, 0);
    let fd = fa.into_raw_fd();
    // SAFETY: closing the descriptor taken from `fa` (once).
    let rc = unsafe { libc::close(fd) };
    let err = std::io::Error::last_os_error();
    assert_eq!(
        (rc, err.raw_os_error()),
        (-1, Some(libc::EIO)),
        "A's close after losing its lease\n{}",
        t.logs()
    );
    let seen = std::fs::read(t.b.join("contended")).unwrap();
    assert!(seen == mine, "B's bytes were overwritten\n{}", t.logs());
    // A's own view, reopened, is the hive's.
    let seen_a = std::fs::read(t.a.join("contended")).unwrap();
    assert!(
        seen_a == mine,
        "A reads {} bytes\n{}",
        seen_a.len(),
        t.logs()
    );
    assert!(
        t.node.log().contains("write lease fenced"),
        "no fence in the node log\n{}",
        t.logs()
    );
    assert!(t.a.log().contains("write lease lost"), "{}", t.logs());
    let fsck = t.node.fsck(true);
    assert!(fsck.contains("clean"), "fsck: {fsck}");
    // A still works for new writes.
    std::fs::write(t.a.join("after"), b"fine").unwrap();
    assert_eq!(std::fs::read(t.b.join("after")).unwrap(), b"fine");
    t.a.stop();
}

/// `truncate(2)` by path on host B (no open) of a file host A holds uncommitted bytes of:
/// B's truncation recalls A's lease, A commits first, and the new size applies after A's
/// bytes, as it would on one machine where A's writes came first. (Without the lease, A's
/// later close committed its bytes over B's truncation.)
#[test]
fn a_truncation_elsewhere_applies_after_unflushed_writes() {
    let Some(t) = TwoMounts::start("lease-truncate", "leases") else {
        return;
    };
    let data = pattern(3 << 20, 21);
    let mut fa = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(t.a.join("cut"))
        .unwrap();
    fa.write_all(&data).unwrap();
    let path =
        std::ffi::CString::new(t.b.join("cut").into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path; truncate(2) reads nothing else.
    let rc = unsafe { libc::truncate(path.as_ptr(), 1 << 20) };
    assert_eq!(rc, 0, "truncate: {}", std::io::Error::last_os_error());
    drop(fa);
    let seen = std::fs::read(t.b.join("cut")).unwrap();
    assert!(
        seen == data[..1 << 20],
        "B reads {} bytes after truncating to 1 MiB and A's close\n{}",
        seen.len(),
        t.logs()
    );
    let seen_a = std::fs::read(t.a.join("cut")).unwrap();
    assert!(
        seen_a == seen,
        "A reads {} bytes\n{}",
        seen_a.len(),
        t.logs()
    );
    let fsck = t.node.fsck(true);
    assert!(fsck.contains("clean"), "fsck: {fsck}");
}
