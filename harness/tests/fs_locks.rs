//! flock and fcntl (POSIX record) locks on real mounts: exclusive across two `hi` mounts of
//! one volume (two processes standing for two hosts), and as expected within one mount.
//!
//! Each test starts a node and two mounts, A and B. Lock holders are either this test
//! process (POSIX locks belong to a process: this process's locks through mount A and
//! through mount B are two owners, since the mounts are two clients of the lock service),
//! or helper processes: this test binary run again as [`helper`] (`HIVE_LOCK_HELPER=1`),
//! which reads one command per line on stdin and answers `@@ ...` on stdout. Where FUSE
//! cannot work, each test prints `SKIP: <reason>` and returns.

use hivefs_harness::mount::{TestMount, TwoMounts};
use std::ffi::CString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// The lease of the lock service (net::meta::LOCK_LEASE_MS), and slack for a busy machine.
const LEASE: Duration = Duration::from_secs(10);
const SLACK: Duration = Duration::from_secs(5);
/// How long a blocked request is watched to be sure it really waits.
const STILL_BLOCKED: Duration = Duration::from_millis(700);

macro_rules! two {
    ($name:expr) => {
        match TwoMounts::start($name, "locks") {
            Some(t) => t,
            None => return,
        }
    };
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn open_rw(p: &Path) -> i32 {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: plain syscall with a NUL-terminated path.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CREAT, 0o644) };
    assert!(fd >= 0, "open {}: errno {}", p.display(), errno());
    fd
}

fn close(fd: i32) {
    // SAFETY: closing a descriptor this test opened.
    unsafe { libc::close(fd) };
}

fn flock(fd: i32, op: i32) -> Result<(), i32> {
    // SAFETY: plain syscall on our descriptor.
    if unsafe { libc::flock(fd, op) } == 0 {
        Ok(())
    } else {
        Err(errno())
    }
}

/// `l_type` letter: r, w, u.
fn ltype(t: &str) -> i16 {
    (match t {
        "r" => libc::F_RDLCK,
        "w" => libc::F_WRLCK,
        "u" => libc::F_UNLCK,
        _ => panic!("lock type {t}"),
    }) as i16
}

fn fl(typ: &str, start: i64, len: i64) -> libc::flock {
    // SAFETY: flock is plain old data; zero is a valid value of every field.
    let mut f: libc::flock = unsafe { std::mem::zeroed() };
    f.l_type = ltype(typ);
    f.l_whence = libc::SEEK_SET as i16;
    f.l_start = start;
    f.l_len = len;
    f
}

/// fcntl `F_SETLK` (or `F_SETLKW` with `wait`) of `typ` on `start, len`.
fn setlk(fd: i32, typ: &str, start: i64, len: i64, wait: bool) -> Result<(), i32> {
    let f = fl(typ, start, len);
    let cmd = if wait { libc::F_SETLKW } else { libc::F_SETLK };
    // SAFETY: fcntl with a valid struct flock.
    if unsafe { libc::fcntl(fd, cmd, &f) } == 0 {
        Ok(())
    } else {
        Err(errno())
    }
}

/// fcntl `F_GETLK`: `None` if nothing conflicts, else (type, start, len, pid).
fn getlk(fd: i32, typ: &str, start: i64, len: i64) -> Option<(i16, i64, i64, i32)> {
    let mut f = fl(typ, start, len);
    // SAFETY: fcntl with a valid struct flock it fills in.
    let r = unsafe { libc::fcntl(fd, libc::F_GETLK, &mut f) };
    assert_eq!(r, 0, "F_GETLK: errno {}", errno());
    if f.l_type == libc::F_UNLCK as i16 {
        None
    } else {
        Some((f.l_type, f.l_start, f.l_len, f.l_pid))
    }
}

/// The helper side: run commands from stdin until EOF (see the module docs).
/// `open PATH` | `lock I TYPE START LEN [w]` | `getlk I TYPE START LEN` |
/// `flock I ex|sh|un [nb]` | `close I` | `pid`.
#[test]
fn helper() {
    if std::env::var_os("HIVE_LOCK_HELPER").is_none() {
        return;
    }
    let mut fds: Vec<i32> = Vec::new();
    let out = |s: String| {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "@@ {s}");
        let _ = o.flush();
    };
    let res = |r: Result<(), i32>| match r {
        Ok(()) => "ok".to_string(),
        Err(e) => format!("err {e}"),
    };
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let w: Vec<&str> = line.split_whitespace().collect();
        let n = |i: usize| w[i].parse::<i64>().unwrap();
        match w[0] {
            "open" => {
                fds.push(open_rw(Path::new(w[1])));
                out(format!("ok {}", fds.len() - 1));
            }
            "lock" => {
                let wait = w.get(5) == Some(&"w");
                out(res(setlk(fds[n(1) as usize], w[2], n(3), n(4), wait)));
            }
            "getlk" => match getlk(fds[n(1) as usize], w[2], n(3), n(4)) {
                None => out("unlck".into()),
                Some((t, s, l, p)) => out(format!("lck {t} {s} {l} {p}")),
            },
            "flock" => {
                let mut op = match w[2] {
                    "ex" => libc::LOCK_EX,
                    "sh" => libc::LOCK_SH,
                    _ => libc::LOCK_UN,
                };
                if w.get(3) == Some(&"nb") {
                    op |= libc::LOCK_NB;
                }
                out(res(flock(fds[n(1) as usize], op)));
            }
            "close" => {
                close(fds[n(1) as usize]);
                out("ok".into());
            }
            "pid" => out(std::process::id().to_string()),
            other => out(format!("unknown {other}")),
        }
    }
}

/// A helper process (see [`helper`]), killed and reaped on drop.
struct Helper {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

impl Helper {
    fn start() -> Helper {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["helper", "--exact", "--nocapture", "--test-threads=1"])
            .env("HIVE_LOCK_HELPER", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting the lock helper");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines() {
                let Ok(l) = l else { break };
                // (libtest's "test helper ... " may precede the first answer on its line.)
                if let Some(at) = l.find("@@ ") {
                    if tx.send(l[at + 3..].to_string()).is_err() {
                        break;
                    }
                }
            }
        });
        Helper {
            child,
            stdin,
            lines,
        }
    }

    fn send(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").expect("writing to the helper");
    }

    /// The answer to the last command, waiting at most `t`.
    fn answer(&self, t: Duration) -> Result<String, RecvTimeoutError> {
        self.lines.recv_timeout(t)
    }

    fn ask(&mut self, cmd: &str) -> String {
        self.send(cmd);
        self.answer(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("helper: no answer to {cmd:?}: {e}"))
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: our own child, not yet reaped (so its pid is not reused).
            unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

const EAGAIN: &str = "err 11";

fn file(m: &TestMount, name: &str) -> PathBuf {
    m.join(name)
}

/// Run `f` on a thread; returns a receiver of its result.
fn spawn<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Receiver<T> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx
}

#[test]
fn flock_across_mounts() {
    let t = two!("locks-flock");
    let pa = file(&t.a, "f");
    std::fs::write(&pa, b"x").unwrap();
    let pb = file(&t.b, "f");
    let a = open_rw(&pa);
    let b = open_rw(&pb);
    flock(a, libc::LOCK_EX).unwrap();
    assert_eq!(
        flock(b, libc::LOCK_EX | libc::LOCK_NB),
        Err(libc::EWOULDBLOCK),
        "B locked a file A holds exclusively\n{}",
        t.logs()
    );
    assert_eq!(
        flock(b, libc::LOCK_SH | libc::LOCK_NB),
        Err(libc::EWOULDBLOCK)
    );
    flock(a, libc::LOCK_UN).unwrap();
    flock(b, libc::LOCK_EX | libc::LOCK_NB).expect("B after A unlocked");
    assert_eq!(
        flock(a, libc::LOCK_SH | libc::LOCK_NB),
        Err(libc::EWOULDBLOCK)
    );
    flock(b, libc::LOCK_UN).unwrap();
    // Shared locks share, and keep out an exclusive one.
    flock(a, libc::LOCK_SH).unwrap();
    flock(b, libc::LOCK_SH | libc::LOCK_NB).expect("two shared locks");
    flock(b, libc::LOCK_UN).unwrap();
    // A blocking LOCK_EX on B waits until A closes the file.
    flock(a, libc::LOCK_EX).unwrap();
    let got = spawn(move || {
        let r = flock(b, libc::LOCK_EX);
        (r, Instant::now())
    });
    assert!(
        got.recv_timeout(STILL_BLOCKED).is_err(),
        "B's blocking flock returned while A held the lock"
    );
    let closed_at = Instant::now();
    close(a);
    let (r, at) = got
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("B still waits after A closed\n{}", t.logs()));
    r.unwrap();
    assert!(at >= closed_at);
    // B holds it now: a fresh open on A is kept out; B's close frees it.
    let a2 = open_rw(&pa);
    assert_eq!(
        flock(a2, libc::LOCK_EX | libc::LOCK_NB),
        Err(libc::EWOULDBLOCK)
    );
    close(b);
    // The kernel sends RELEASE after close(2) returns: B's lock goes soon after.
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Err(e) = flock(a2, libc::LOCK_EX | libc::LOCK_NB) {
        assert!(
            e == libc::EWOULDBLOCK && Instant::now() < deadline,
            "A still locked out (errno {e}) after B closed\n{}",
            t.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    close(a2);
}

fn pread(fd: i32, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    // SAFETY: reading into a buffer of `len` bytes we own.
    let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), len, 0) };
    assert!(n >= 0, "pread: errno {}", errno());
    buf.truncate(n as usize);
    buf
}

fn pwrite(fd: i32, data: &[u8]) {
    // SAFETY: writing from a buffer we own.
    let n = unsafe { libc::pwrite(fd, data.as_ptr().cast(), data.len(), 0) };
    assert_eq!(n, data.len() as isize, "pwrite: errno {}", errno());
}

/// A lock orders data across hosts (as on NFS): what one mount wrote under a lock and
/// unlocked without closing, another mount reads once it takes the lock, though it had
/// the file open, and its old bytes and size cached, from before.
#[test]
fn a_lock_hands_the_data_written_under_it_to_the_next_holder() {
    let t = two!("locks-data");
    let (pa, pb) = (file(&t.a, "ledger"), file(&t.b, "ledger"));
    std::fs::write(&pa, b"0000000000000000").unwrap();
    let (a, b) = (open_rw(&pa), open_rw(&pb));
    assert_eq!(pread(b, 64), b"0000000000000000", "{}", t.logs());
    for (round, (w, r)) in [(a, b), (b, a), (a, b)].into_iter().enumerate() {
        let text = format!("round {round}: written under the lock, then unlocked {round:>3}");
        setlk(w, "w", 0, 0, true).expect("writer's lock");
        pwrite(w, text.as_bytes());
        setlk(w, "u", 0, 0, false).expect("writer's unlock");
        setlk(r, "r", 0, 0, true).expect("reader's lock");
        let seen = pread(r, 256);
        assert!(
            seen == text.as_bytes(),
            "round {round}: the reader saw {:?}\n{}",
            String::from_utf8_lossy(&seen),
            t.logs()
        );
        setlk(r, "u", 0, 0, false).expect("reader's unlock");
    }
    close(a);
    close(b);
    let fsck = t.node.fsck(true);
    assert!(fsck.contains("clean"), "fsck: {fsck}");
}

/// An unlock commits what was written under the lock (as `fsync` would): a host that
/// dies right after unlocking loses none of it. (The next holder's lock waits for the dead
/// host's write lease to lapse, then reads the committed bytes.)
#[test]
fn an_unlock_commits_what_was_written_under_the_lock() {
    let Some(mut t) = TwoMounts::start("locks-unlock", "locks") else {
        return;
    };
    let (pa, pb) = (file(&t.a, "journal"), file(&t.b, "journal"));
    std::fs::write(&pa, b"before").unwrap();
    let a = open_rw(&pa);
    setlk(a, "w", 0, 0, true).expect("lock");
    pwrite(a, b"written under the lock, then unlocked");
    setlk(a, "u", 0, 0, false).expect("unlock");
    t.a.kill9();
    close(a);
    let b = open_rw(&pb);
    setlk(b, "r", 0, 0, true).expect("the next holder's lock");
    let seen = pread(b, 256);
    assert!(
        seen == b"written under the lock, then unlocked",
        "after the writer's host died, the next holder read {:?}\n{}",
        String::from_utf8_lossy(&seen),
        t.logs()
    );
    close(b);
    let fsck = t.node.fsck(true);
    assert!(fsck.contains("clean"), "fsck: {fsck}");
}

#[test]
fn fcntl_across_mounts() {
    let t = two!("locks-fcntl");
    let pa = file(&t.a, "rec");
    std::fs::write(&pa, vec![0u8; 4096]).unwrap();
    let pb = file(&t.b, "rec");
    let mut ha = Helper::start();
    assert_eq!(ha.ask(&format!("open {}", pa.display())), "ok 0");
    assert_eq!(ha.ask(&format!("open {}", pa.display())), "ok 1");
    let b = open_rw(&pb);
    // Write locks: overlapping ranges conflict, neighbours do not.
    assert_eq!(ha.ask("lock 0 w 0 100"), "ok");
    assert_eq!(
        setlk(b, "w", 50, 100, false),
        Err(libc::EAGAIN),
        "{}",
        t.logs()
    );
    assert_eq!(setlk(b, "r", 99, 1, false), Err(libc::EAGAIN));
    setlk(b, "w", 100, 100, false).expect("adjacent range");
    assert_eq!(ha.ask("lock 0 w 150 10"), EAGAIN, "A into B's range");
    // Read locks share; a write lock on a read-locked range does not.
    assert_eq!(ha.ask("lock 0 r 1000 100"), "ok");
    setlk(b, "r", 1050, 100, false).expect("read locks share");
    assert_eq!(setlk(b, "w", 1020, 10, false), Err(libc::EAGAIN));
    assert_eq!(ha.ask("lock 0 w 1120 10"), EAGAIN);
    // F_GETLK on B reports A's lock: type, range, holder.
    let got = getlk(b, "w", 0, 10).expect("F_GETLK sees A's lock");
    assert_eq!(
        (got.0, got.1, got.2),
        (libc::F_WRLCK as i16, 0, 100),
        "F_GETLK answer {got:?}"
    );
    assert_eq!(got.3, ha.pid(), "F_GETLK pid");
    let got = getlk(b, "w", 500, 0).expect("lock to end of file");
    assert_eq!((got.0, got.1, got.2), (libc::F_RDLCK as i16, 1000, 100));
    assert_eq!(getlk(b, "r", 500, 400), None);
    // A unlocks the middle of its range: B gets the hole, not the rest.
    assert_eq!(ha.ask("lock 0 u 40 20"), "ok");
    setlk(b, "w", 40, 20, false).expect("the unlocked hole");
    assert_eq!(setlk(b, "w", 39, 1, false), Err(libc::EAGAIN));
    assert_eq!(setlk(b, "w", 60, 1, false), Err(libc::EAGAIN));
    // A blocking F_SETLKW on B waits for A.
    let got = spawn(move || setlk(b, "w", 0, 10, true));
    assert!(
        got.recv_timeout(STILL_BLOCKED).is_err(),
        "F_SETLKW did not wait"
    );
    // POSIX: closing ANY descriptor of the file drops the process's locks on it.
    assert_eq!(ha.ask("close 1"), "ok");
    got.recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("B's F_SETLKW still waits after A's close\n{}", t.logs()))
        .expect("F_SETLKW");
    setlk(b, "w", 1000, 100, false).expect("A's read lock went with the close too");
    assert_eq!(
        ha.ask("getlk 0 r 0 0"),
        format!("lck {} 0 10 {}", libc::F_WRLCK, std::process::id()),
        "A sees B's first lock"
    );
    close(b);
    assert_eq!(ha.ask("lock 0 w 0 0"), "ok", "B's close dropped its locks");
}

#[test]
fn kill9_of_a_mount_releases_its_locks_within_the_lease() {
    let mut t = two!("locks-kill9");
    // (flock and POSIX locks on one file would conflict here: see hi_command/src/locks.rs.)
    let pa = file(&t.a, "k");
    std::fs::write(&pa, b"k").unwrap();
    std::fs::write(file(&t.a, "kf"), b"k").unwrap();
    let pb = file(&t.b, "k");
    let mut ha = Helper::start();
    assert_eq!(ha.ask(&format!("open {}", pa.display())), "ok 0");
    assert_eq!(
        ha.ask(&format!("open {}", file(&t.a, "kf").display())),
        "ok 1"
    );
    assert_eq!(ha.ask("lock 0 w 0 0"), "ok");
    assert_eq!(ha.ask("flock 1 ex"), "ok");
    let b = open_rw(&pb);
    assert_eq!(setlk(b, "w", 0, 1, false), Err(libc::EAGAIN));
    // Hold the locks past a few keepalives: the lease is being renewed.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(setlk(b, "r", 7, 1, false), Err(libc::EAGAIN));
    let killed_at = Instant::now();
    t.a.kill9();
    // The helper still has its descriptors (on a dead mount): nothing told the hive.
    assert_eq!(
        setlk(b, "w", 0, 1, false),
        Err(libc::EAGAIN),
        "locks went before the lease ran out"
    );
    let deadline = killed_at + LEASE + SLACK;
    loop {
        match setlk(b, "w", 0, 0, false) {
            Ok(()) => break,
            Err(libc::EAGAIN) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(e) => panic!(
                "B still refused (errno {e}) {:?} after A's hi was killed\n{}",
                killed_at.elapsed(),
                t.logs()
            ),
        }
    }
    let took = killed_at.elapsed();
    assert!(
        took >= LEASE - Duration::from_secs(2),
        "released after only {took:?}"
    );
    // The flock lock went too (it is a whole-file lock of its own owner).
    let b2 = open_rw(&file(&t.b, "kf"));
    flock(b2, libc::LOCK_EX | libc::LOCK_NB).expect("A's flock lock is gone");
    drop(ha);
    close(b2);
    close(b);
}

#[test]
fn locks_within_one_mount() {
    let t = two!("locks-local");
    // fcntl locks on "l" (descriptors 0, 1), flock on "lf" (2, 3): flock and POSIX locks
    // of one file would conflict (see hi_command/src/locks.rs).
    let p = file(&t.a, "l");
    std::fs::write(&p, b"l").unwrap();
    std::fs::write(file(&t.a, "lf"), b"l").unwrap();
    let mut p1 = Helper::start();
    let mut p2 = Helper::start();
    let open = format!("open {}", p.display());
    let openf = format!("open {}", file(&t.a, "lf").display());
    for h in [&mut p1, &mut p2] {
        assert_eq!(h.ask(&open), "ok 0");
        assert_eq!(h.ask(&open), "ok 1");
        assert_eq!(h.ask(&openf), "ok 2");
        assert_eq!(h.ask(&openf), "ok 3");
    }
    // POSIX: two processes conflict; one process's own locks never do.
    assert_eq!(p1.ask("lock 0 w 0 10"), "ok");
    assert_eq!(
        p1.ask("lock 1 w 5 10"),
        "ok",
        "same process, other descriptor"
    );
    assert_eq!(p2.ask("lock 0 w 12 1"), EAGAIN);
    assert_eq!(p2.ask("lock 0 r 20 10"), "ok");
    assert_eq!(p1.ask("lock 0 r 25 10"), "ok", "read locks share");
    assert_eq!(
        p2.ask("getlk 0 w 0 1"),
        format!("lck {} 0 15 {}", libc::F_WRLCK, p1.pid()),
        "the merged range 0..15 of p1"
    );
    // flock: two opens conflict, even in one process; LOCK_NB gives EWOULDBLOCK.
    assert_eq!(p1.ask("flock 2 ex"), "ok");
    assert_eq!(p1.ask("flock 3 ex nb"), EAGAIN);
    assert_eq!(p2.ask("flock 3 sh nb"), EAGAIN);
    // A blocking request on the same mount waits, and the unlock that ends the wait comes
    // in through the same mount.
    p2.send("flock 3 ex");
    assert!(p2.answer(STILL_BLOCKED).is_err(), "p2's flock did not wait");
    assert_eq!(p1.ask("flock 2 un"), "ok");
    assert_eq!(p2.answer(Duration::from_secs(10)).as_deref(), Ok("ok"));
    // A process that exits drops its POSIX locks.
    p2.send("lock 1 w 0 1 w");
    assert!(
        p2.answer(STILL_BLOCKED).is_err(),
        "p2's F_SETLKW did not wait"
    );
    drop(p1);
    assert_eq!(p2.answer(Duration::from_secs(10)).as_deref(), Ok("ok"));
    // The other mount sees p2's locks.
    let b = open_rw(&file(&t.b, "l"));
    assert_eq!(setlk(b, "r", 0, 1, false), Err(libc::EAGAIN));
    setlk(b, "r", 20, 10, false).expect("read locks share across mounts");
    close(b);
    let bf = open_rw(&file(&t.b, "lf"));
    assert_eq!(
        flock(bf, libc::LOCK_SH | libc::LOCK_NB),
        Err(libc::EWOULDBLOCK)
    );
    close(bf);
}

#[test]
fn blocked_waiter_is_interrupted_by_a_signal() {
    let t = two!("locks-intr");
    let pa = file(&t.a, "s");
    std::fs::write(&pa, b"s").unwrap();
    let b = open_rw(&file(&t.b, "s"));
    setlk(b, "w", 0, 0, false).unwrap();
    let mut h = Helper::start();
    assert_eq!(h.ask(&format!("open {}", pa.display())), "ok 0");
    h.send("lock 0 w 0 0 w");
    assert!(h.answer(STILL_BLOCKED).is_err(), "F_SETLKW did not wait");
    // SIGKILL ends the wait: the helper exits although B still holds the lock.
    let started = Instant::now();
    // SAFETY: our own child.
    unsafe { libc::kill(h.pid(), libc::SIGKILL) };
    let st = h.child.wait().unwrap();
    assert!(st.code().is_none(), "killed: {st}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a killed waiter took {:?} to die\n{}",
        started.elapsed(),
        t.logs()
    );
    // Its wait left nothing behind: B unlocks, a new process locks at once.
    setlk(b, "u", 0, 0, false).unwrap();
    let mut h2 = Helper::start();
    assert_eq!(h2.ask(&format!("open {}", pa.display())), "ok 0");
    assert_eq!(h2.ask("lock 0 w 0 0"), "ok");
    close(b);
}

#[test]
fn node_restart_loses_locks_and_tells_their_owner() {
    let mut t = two!("locks-restart");
    let pa = file(&t.a, "r");
    std::fs::write(&pa, b"r").unwrap();
    let mut ha = Helper::start();
    assert_eq!(ha.ask(&format!("open {}", pa.display())), "ok 0");
    assert_eq!(ha.ask("lock 0 w 0 0"), "ok");
    let b = open_rw(&file(&t.b, "r"));
    assert_eq!(setlk(b, "w", 0, 1, false), Err(libc::EAGAIN));
    // The leader's lock table is memory only: a restart loses it. Until every lease it
    // may have granted has run out (its horizon on disk), it grants nothing.
    t.node.restart();
    let restarted = Instant::now();
    assert_eq!(
        setlk(b, "w", 0, 1, false),
        Err(libc::EAGAIN),
        "a lock granted right after the restart\n{}",
        t.logs()
    );
    // A learns on its next keepalive that its session is gone: the owner's next lock
    // call fails with EIO (once), then works again.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        ha.ask("lock 0 r 5 1"),
        "err 5",
        "the lost lock is reported\n{}",
        t.logs()
    );
    // After the grace (at most two leases), B gets the lock A lost.
    let deadline = restarted + 2 * LEASE + SLACK;
    while let Err(e) = setlk(b, "w", 0, 1, false) {
        assert!(
            e == libc::EAGAIN && Instant::now() < deadline,
            "B still refused (errno {e}) {:?} after the restart\n{}",
            restarted.elapsed(),
            t.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        ha.ask("lock 0 w 0 0"),
        EAGAIN,
        "A's new request sees B's lock"
    );
    close(b);
    assert_eq!(ha.ask("lock 0 w 0 0 w"), "ok");
}
