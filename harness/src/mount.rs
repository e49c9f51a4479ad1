//! FUSE mounts of a [`TestNode`]'s volumes for tests: real `hi mount` processes.
//!
//! [`TestMount`] creates the volume if it is missing, makes a fresh directory under
//! [`std::env::temp_dir`] (`hivefs-mount-<pid>-<n>-<volume>/`, holding the mountpoint `mnt/`
//! and the log `hi.log`), runs `hi mount --hive 127.0.0.1:META_PORT --token T --ca FP
//! --volume NAME <dir>/mnt` with stdout and stderr appended to `hi.log`, and returns once
//! `hi` printed `mounted NAME at MOUNTPOINT` and the mountpoint is a FUSE mount in
//! `/proc/self/mountinfo`.
//!
//! Dropping it sends SIGTERM (`hi` unmounts and exits), waits up to [`UNMOUNT_TIMEOUT`],
//! falls back to SIGKILL and a lazy unmount, and removes the directory (kept with
//! `HIVE_KEEP_DIRS=1`); when the drop happens during a panic, the tail of `hi.log` is
//! printed first. The mountpoint lives outside the node's directory so that dropping the
//! node first never deletes through a live mount.
//!
//! Where FUSE cannot work (no `/dev/fuse`, not permitted to mount), [`TestMount::try_start`]
//! returns [`MountError::Skip`]; tests report it with [`skip`] (`SKIP: <reason>` on the
//! real stderr, never captured) and return. [`TestMount::start_or_skip`] does both.
//!
//! The `hi` child gets `PR_SET_PDEATHSIG = SIGTERM` (so a test killed from outside still
//! gets its mounts unmounted by `hi`); as for [`TestNode`], start mounts on the thread that
//! owns the `TestMount`.

use crate::{hi_bin, spawn_logged, strip_ansi, TestNode};
use hivefs_client::meta::MetaClient;
use hivefs_net::meta::{Answer, Errno, Mutation, Query};
use std::ffi::{CString, OsString};
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long `hi mount` may take until the mount is live.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `hi` may take to unmount and exit after SIGTERM or `hi umount`.
pub const UNMOUNT_TIMEOUT: Duration = Duration::from_secs(10);

static MOUNT_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Why a mount could not be started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountError {
    /// FUSE is not usable here (no `/dev/fuse`, mounting not permitted): skip the test.
    Skip(String),
}

impl std::fmt::Display for MountError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MountError::Skip(why) => write!(f, "{why}"),
        }
    }
}

/// Report a skipped test: `SKIP: <reason>` written straight to the process's stderr (not
/// through the test harness's output capture, so it shows in every run).
pub fn skip(reason: &str) {
    let _ = writeln!(std::io::stderr(), "SKIP: {reason}");
}

/// Why FUSE mounts cannot work on this machine, if they cannot: `/dev/fuse` missing or not
/// openable, or not root and no `fusermount3`/`fusermount` to mount with.
pub fn fuse_unavailable() -> Option<String> {
    let dev = Path::new("/dev/fuse");
    if !dev.exists() {
        return Some("/dev/fuse does not exist (no FUSE in this kernel or container)".into());
    }
    if let Err(e) = OpenOptions::new().read(true).write(true).open(dev) {
        return Some(format!("cannot open /dev/fuse: {e}"));
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root && find_in_path("fusermount3").is_none() && find_in_path("fusermount").is_none() {
        return Some("not root and no fusermount3/fusermount in PATH: cannot mount".into());
    }
    None
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Undo the octal escapes of `/proc/self/mountinfo` (`\040` for a space, ...).
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// The filesystem type of the mount at exactly `path` (the last one, if stacked), from
/// `/proc/self/mountinfo`. Reads no file below `path` (safe on a hung FUSE mount).
pub fn mount_fstype(path: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.as_os_str().as_bytes();
    let mut found = None;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.len() < 5 || unescape_mountinfo(fields[4]) != want {
            continue;
        }
        if let Some(sep) = fields.iter().position(|f| *f == "-") {
            if let Some(fstype) = fields.get(sep + 1) {
                found = Some(fstype.to_string());
            }
        }
    }
    found
}

/// Is `path` (exactly) a FUSE mount point right now?
pub fn is_fuse_mount(path: &Path) -> bool {
    mount_fstype(path).is_some_and(|t| t == "fuse" || t.starts_with("fuse."))
}

/// Detach the mount at `path` (`umount2(MNT_DETACH)`, else `umount -l`, `fusermount3 -uz`,
/// `fusermount -uz`), until no FUSE mount is left there. True when none is left.
pub fn lazy_unmount(path: &Path) -> bool {
    for _ in 0..8 {
        if !is_fuse_mount(path) {
            return true;
        }
        let c = CString::new(path.as_os_str().as_bytes()).expect("mountpoint without NUL");
        // SAFETY: plain syscall with a NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
            continue;
        }
        let tries: [(&str, &[&str]); 3] = [
            ("umount", &["-l"]),
            ("fusermount3", &["-uz"]),
            ("fusermount", &["-uz"]),
        ];
        for (cmd, args) in tries {
            if find_in_path(cmd).is_none() {
                continue;
            }
            let ok = Command::new(cmd)
                .args(args)
                .arg(path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                break;
            }
        }
    }
    !is_fuse_mount(path)
}

/// The arguments `hi` needs to reach `node`: `--hive HOST:PORT --token T --ca FP` (or
/// `--insecure`).
pub fn hi_hive_args(node: &TestNode) -> Vec<OsString> {
    let opts = node.client_options();
    let mut args: Vec<OsString> = vec![
        "--hive".into(),
        format!("{}:{}", opts.host, node.meta_port()).into(),
        "--token".into(),
        opts.token.clone().into(),
    ];
    match &opts.ca_fingerprint {
        Some(fp) => args.extend(["--ca".into(), fp.into()]),
        None => args.push("--insecure".into()),
    }
    args
}

/// Create volume `name` (the default copies, 3: a hive of fewer nodes keeps one per node)
/// on `node` unless it exists; returns its id.
pub fn ensure_volume(node: &TestNode, name: &str) -> u32 {
    ensure_volume_with(node, name, hivefs_client::hive::DEFAULT_LEVEL)
}

/// [`ensure_volume`] with `copies`.
pub fn ensure_volume_with(node: &TestNode, name: &str, copies: u8) -> u32 {
    let m = MetaClient::connect(&node.client_options(), node.meta_port()).unwrap_or_else(|e| {
        panic!(
            "connecting to the metadata port {}: {e}\n--- node log tail ---\n{}",
            node.meta_port(),
            node.log_tail(40)
        )
    });
    let created = m.mutate(
        0,
        Mutation::CreateVolume {
            name: name.into(),
            copies,
        },
    );
    match created {
        Ok(Ok(Answer::Volume(v))) => return v.id,
        Ok(Err(e)) if e == Errno::EXIST => {}
        other => panic!("creating volume {name:?}: {other:?}"),
    }
    match m.query(0, Query::Volume { name: name.into() }) {
        Ok(Ok(Answer::Volume(v))) => v.id,
        other => panic!("looking up volume {name:?}: {other:?}"),
    }
}

/// A node and two mounts, A and B, of one of its volumes: two `hi` processes standing
/// for two hosts. Field order: the mounts drop (unmount) before the node stops.
pub struct TwoMounts {
    pub a: TestMount,
    pub b: TestMount,
    pub node: TestNode,
}

impl TwoMounts {
    /// Start a node named `name` and mount `volume` twice; `None` (after printing `SKIP:`
    /// and the reason) where FUSE cannot work.
    pub fn start(name: &str, volume: &str) -> Option<TwoMounts> {
        if let Some(why) = fuse_unavailable() {
            skip(&format!("{name}: {why}"));
            return None;
        }
        let node = TestNode::start(crate::NodeOptions::default().name(name));
        let a = TestMount::start_or_skip(&node, volume)?;
        let b = TestMount::start(&node, volume);
        Some(TwoMounts { a, b, node })
    }

    /// The tails of the three logs, for assertion messages.
    pub fn logs(&self) -> String {
        format!(
            "--- A ---\n{}\n--- B ---\n{}\n--- node ---\n{}",
            self.a.log_tail(40),
            self.b.log_tail(40),
            self.node.log_tail(40)
        )
    }
}

/// One `hi mount` of a volume. See the module docs.
pub struct TestMount {
    dir: PathBuf,
    mnt: PathBuf,
    volume: String,
    bin: PathBuf,
    /// `--hive ... --token ... --ca ...|--insecure`.
    hive_args: Vec<OsString>,
    child: Option<Child>,
    starts: u32,
    /// Mounted from a client disk (`hi format`, then `hi mount DISK`): with `--writeback`?
    disk: Option<bool>,
    /// More `hi mount` arguments (see [`TestMount::set_mount_args`]).
    extra: Vec<OsString>,
    /// More environment variables of every `hi mount` ([`TestMount::start_with_env`]).
    env: Vec<(OsString, OsString)>,
    /// The network namespace `hi mount` runs in ([`TestMount::start_on_disk_in_netns`]).
    netns: Option<String>,
}

impl TestMount {
    /// Mount volume `volume` of `node` (creating the volume if needed) on a fresh directory.
    /// `Err(Skip)` when FUSE cannot work here; panics (with the `hi` log) on any other
    /// failure.
    pub fn try_start(node: &TestNode, volume: &str) -> Result<TestMount, MountError> {
        TestMount::try_start_as(node, volume, None, Vec::new(), None)
    }

    /// [`TestMount::start`] with `hi mount` run under the variables `env` too (e.g.
    /// `HIVE_HI_NO_WATCH=1`: no pushed invalidations for this mount alone).
    pub fn start_with_env(node: &TestNode, volume: &str, env: &[(&str, &str)]) -> TestMount {
        let env = env
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect();
        match TestMount::try_start_as(node, volume, None, env, None) {
            Ok(m) => m,
            Err(e) => panic!("cannot mount {volume}: {e}"),
        }
    }

    /// Mount volume `volume` of `node` from a client disk made for it (`hi format` of a
    /// file `disk.img` in the mount's directory, token kept in its `secrets/`), in
    /// write-back mode or not; `None` (after `SKIP:`) where FUSE cannot work.
    pub fn start_on_disk(node: &TestNode, volume: &str, writeback: bool) -> Option<TestMount> {
        Self::on_disk_or_skip(node, volume, writeback, None)
    }

    /// [`TestMount::start_on_disk`] with `hi mount` in network namespace `netns` (entered
    /// with `nsenter --net`, so the FUSE mount is in this process's mount namespace):
    /// a host that a [`crate::netns::NetLab`] can cut off from the hive on its own.
    pub fn start_on_disk_in_netns(
        node: &TestNode,
        volume: &str,
        writeback: bool,
        netns: &str,
    ) -> Option<TestMount> {
        Self::on_disk_or_skip(node, volume, writeback, Some(netns.to_string()))
    }

    fn on_disk_or_skip(
        node: &TestNode,
        volume: &str,
        writeback: bool,
        netns: Option<String>,
    ) -> Option<TestMount> {
        match TestMount::try_start_as(node, volume, Some(writeback), Vec::new(), netns) {
            Ok(m) => Some(m),
            Err(MountError::Skip(why)) => {
                skip(&why);
                None
            }
        }
    }

    /// Arguments added to every later `hi mount` of this mount (e.g. fault injection).
    pub fn set_mount_args(&mut self, args: &[&str]) {
        self.extra = args.iter().map(OsString::from).collect();
    }

    /// The client disk's image (for mounts started with [`TestMount::start_on_disk`]).
    pub fn disk_path(&self) -> PathBuf {
        self.dir.join("disk.img")
    }

    /// `hi status` of this mount's client disk (stdout and stderr).
    pub fn disk_status(&self) -> String {
        let out = Command::new(&self.bin)
            .arg("status")
            .arg("--secrets")
            .arg(self.dir.join("secrets"))
            .arg(self.disk_path())
            .env("NO_COLOR", "1")
            .output()
            .expect("running hi status");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// `hi format` of this mount's disk with `extra` arguments (run while unmounted).
    pub fn format_disk(&self, extra: &[&str]) -> Output {
        Command::new(&self.bin)
            .arg("format")
            .args(&self.hive_args)
            .arg("--volume")
            .arg(&self.volume)
            .arg("--secrets")
            .arg(self.dir.join("secrets"))
            .args(extra)
            .arg(self.disk_path())
            .env("NO_COLOR", "1")
            .output()
            .expect("running hi format")
    }

    fn try_start_as(
        node: &TestNode,
        volume: &str,
        disk: Option<bool>,
        env: Vec<(OsString, OsString)>,
        netns: Option<String>,
    ) -> Result<TestMount, MountError> {
        if let Some(why) = fuse_unavailable() {
            return Err(MountError::Skip(why));
        }
        let bin = hi_bin();
        ensure_volume(node, volume);
        let k = MOUNT_COUNTER.fetch_add(1, Ordering::SeqCst);
        let safe: String = volume
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let tmp = std::env::temp_dir();
        let tmp = tmp.canonicalize().unwrap_or(tmp);
        let dir = tmp.join(format!("hivefs-mount-{}-{k}-{safe}", std::process::id()));
        if dir.exists() {
            lazy_unmount(&dir.join("mnt"));
            std::fs::remove_dir_all(&dir)
                .unwrap_or_else(|e| panic!("removing stale {}: {e}", dir.display()));
        }
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap_or_else(|e| panic!("creating {}: {e}", mnt.display()));
        let hive_args = hi_hive_args(node);
        // From here on Drop cleans up, whatever fails.
        let mut m = TestMount {
            dir,
            mnt,
            volume: volume.to_string(),
            bin,
            hive_args,
            child: None,
            starts: 0,
            disk,
            extra: Vec::new(),
            env,
            netns,
        };
        if disk.is_some() {
            let out = m.format_disk(&["--journal", "64M", "--cache", "16M"]);
            assert!(
                out.status.success(),
                "hi format failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        m.mount()?;
        Ok(m)
    }

    /// [`TestMount::try_start`], panicking if FUSE is not usable.
    pub fn start(node: &TestNode, volume: &str) -> TestMount {
        match TestMount::try_start(node, volume) {
            Ok(m) => m,
            Err(e) => panic!("cannot mount {volume}: {e}"),
        }
    }

    /// [`TestMount::try_start`]; when FUSE is not usable, prints `SKIP: <reason>` (see
    /// [`skip`]) and returns `None`.
    pub fn start_or_skip(node: &TestNode, volume: &str) -> Option<TestMount> {
        match TestMount::try_start(node, volume) {
            Ok(m) => Some(m),
            Err(MountError::Skip(why)) => {
                skip(&why);
                None
            }
        }
    }

    /// The mountpoint.
    pub fn path(&self) -> &Path {
        &self.mnt
    }

    /// `path().join(rel)`.
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn volume(&self) -> &str {
        &self.volume
    }

    /// The directory holding the mountpoint and the log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("hi.log")
    }

    /// Everything every `hi mount` of this mount has printed (ANSI colours removed).
    pub fn log(&self) -> String {
        strip_ansi(&String::from_utf8_lossy(
            &std::fs::read(self.log_path()).unwrap_or_default(),
        ))
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The `hi mount` process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// How many times `hi mount` has been started here.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// Is the mountpoint a FUSE mount right now?
    pub fn is_mounted(&self) -> bool {
        is_fuse_mount(&self.mnt)
    }

    /// Is `hi mount` still running? (Reaps it if it exited.)
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            None => false,
            Some(c) => matches!(c.try_wait(), Ok(None)),
        }
    }

    fn note(&self, what: &str) {
        let _ = OpenOptions::new()
            .append(true)
            .open(self.log_path())
            .and_then(|mut f| writeln!(f, "=== harness: {what} ==="));
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let banner = format!("=== harness: hi mount #{} ===", self.starts);
        let mut cmd = match &self.netns {
            None => Command::new(&self.bin),
            Some(ns) => {
                // nsenter execs `hi` in place: the child's pid is `hi`'s.
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}"))
                    .arg("--")
                    .arg(&self.bin);
                c
            }
        };
        cmd.arg("mount");
        match self.disk {
            None => {
                cmd.args(&self.hive_args).arg("--volume").arg(&self.volume);
            }
            Some(writeback) => {
                cmd.arg("--secrets").arg(self.dir.join("secrets"));
                if writeback {
                    cmd.arg("--writeback");
                }
                cmd.arg(self.disk_path());
            }
        }
        cmd.args(&self.extra).arg(&self.mnt);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        // SIGTERM, not SIGKILL: hi then unmounts itself.
        self.child = Some(spawn_logged(cmd, &self.log_path(), &banner, libc::SIGTERM));
    }

    /// Start `hi mount` and wait until the mount is live.
    fn mount(&mut self) -> Result<(), MountError> {
        assert!(self.child.is_none(), "hi mount already running");
        assert!(
            !self.is_mounted(),
            "{} is still mounted",
            self.mnt.display()
        );
        let log_start = std::fs::metadata(self.log_path())
            .map(|m| m.len() as usize)
            .unwrap_or(0);
        self.spawn();
        let needle = format!("mounted {} at {}", self.volume, self.mnt.display());
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        loop {
            let log = self.log();
            let this_run = log.get(log_start..).unwrap_or("");
            let printed = this_run.lines().any(|l| l.trim_end() == needle);
            if printed && self.is_mounted() {
                return Ok(());
            }
            let exited = match &mut self.child {
                Some(c) => c.try_wait().ok().flatten(),
                None => None,
            };
            if let Some(st) = exited {
                self.child = None;
                lazy_unmount(&self.mnt);
                let denied = ["Operation not permitted", "Permission denied", "fusermount"]
                    .iter()
                    .any(|s| this_run.contains(s));
                if denied {
                    return Err(MountError::Skip(format!(
                        "hi mount is not permitted to mount here ({st}): {}",
                        this_run.lines().last().unwrap_or("").trim()
                    )));
                }
                panic!(
                    "hi mount of {} on {} exited with {st} before mounting\n--- hi log ---\n{}",
                    self.volume,
                    self.mnt.display(),
                    self.log_tail(40)
                );
            }
            if Instant::now() > deadline {
                self.kill_quietly();
                lazy_unmount(&self.mnt);
                panic!(
                    "hi mount of {} on {} not live after {MOUNT_TIMEOUT:?} (printed the line: \
                     {printed}, in mountinfo: {})\n--- hi log ---\n{}",
                    self.volume,
                    self.mnt.display(),
                    self.is_mounted(),
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: libc::c_int) {
        if let Some(c) = &self.child {
            // SAFETY: plain syscall on our own child's pid (not yet reaped, so not reused).
            unsafe { libc::kill(c.id() as libc::pid_t, sig) };
        }
    }

    fn kill_quietly(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: as in `signal`.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGKILL) };
            let _ = c.wait();
        }
    }

    /// Wait for the child to exit, at most `timeout`.
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.child.as_mut()?;
            if let Some(st) = c.try_wait().ok().flatten() {
                self.child = None;
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL `hi mount`, reap it, and lazily unmount what it leaves behind (a mount whose
    /// daemon is gone). Panics if it was not running.
    pub fn kill9(&mut self) -> ExitStatus {
        assert!(self.child.is_some(), "kill9: hi mount not running");
        self.signal(libc::SIGKILL);
        let st = self
            .child
            .take()
            .unwrap()
            .wait()
            .expect("waiting for the killed hi");
        let gone = lazy_unmount(&self.mnt);
        self.note(&format!("SIGKILL ({st}), lazy unmount: {gone}"));
        assert!(gone, "{} is still mounted after kill9", self.mnt.display());
        st
    }

    /// SIGTERM `hi mount` and wait (at most [`UNMOUNT_TIMEOUT`]) for it to unmount and
    /// exit; returns its exit status (a clean stop is `success()`). On timeout: SIGKILL,
    /// lazy unmount, panic. Panics too if the mount is still there after a clean exit.
    pub fn stop(&mut self) -> ExitStatus {
        assert!(self.child.is_some(), "stop: hi mount not running");
        self.signal(libc::SIGTERM);
        self.finish("SIGTERM")
    }

    /// `hi umount MOUNTPOINT`, then wait for `hi mount` to exit as [`TestMount::stop`].
    pub fn umount(&mut self) -> ExitStatus {
        let out = Command::new(&self.bin)
            .arg("umount")
            .arg(&self.mnt)
            .env("NO_COLOR", "1")
            .output()
            .expect("running hi umount");
        assert!(
            out.status.success(),
            "hi umount {} failed ({}):\n{}{}",
            self.mnt.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        self.finish("hi umount")
    }

    fn finish(&mut self, how: &str) -> ExitStatus {
        match self.wait_exit(UNMOUNT_TIMEOUT) {
            Some(st) => {
                let still = self.is_mounted();
                if still {
                    lazy_unmount(&self.mnt);
                }
                assert!(
                    !still,
                    "hi exited ({st}) after {how} but left {} mounted\n{}",
                    self.mnt.display(),
                    self.log_tail(40)
                );
                st
            }
            None => {
                self.kill_quietly();
                lazy_unmount(&self.mnt);
                panic!(
                    "hi mount did not exit within {UNMOUNT_TIMEOUT:?} of {how}\n{}",
                    self.log_tail(40)
                );
            }
        }
    }

    /// Mount the same volume on the same directory again: stops `hi mount` first if it
    /// runs (asserting a clean exit), then starts a new one and waits until it is live.
    pub fn remount(&mut self) {
        if self.is_running() {
            let st = self.stop();
            assert!(st.success(), "hi mount exited with {st} on SIGTERM");
        } else {
            self.child = None;
            lazy_unmount(&self.mnt);
        }
        if let Err(e) = self.mount() {
            panic!("remounting {}: {e}", self.volume);
        }
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.signal(libc::SIGTERM);
            if self.wait_exit(UNMOUNT_TIMEOUT).is_none() {
                eprintln!(
                    "hi mount on {} did not exit within {UNMOUNT_TIMEOUT:?} of SIGTERM: SIGKILL",
                    self.mnt.display()
                );
                self.kill_quietly();
            }
        }
        let unmounted = lazy_unmount(&self.mnt);
        if std::thread::panicking() {
            eprintln!(
                "--- hi log ({}) tail ---\n{}\n--- end of hi log ---",
                self.log_path().display(),
                self.log_tail(40)
            );
        }
        if !unmounted {
            eprintln!(
                "{} is still mounted: keeping {}",
                self.mnt.display(),
                self.dir.display()
            );
        } else if std::env::var_os("HIVE_KEEP_DIRS").is_some() {
            eprintln!("keeping {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_unescapes() {
        assert_eq!(unescape_mountinfo("/tmp/a\\040b"), b"/tmp/a b");
        assert_eq!(unescape_mountinfo("/x\\134y\\0"), b"/x\\y\\0");
        assert_eq!(mount_fstype(Path::new("/proc")).as_deref(), Some("proc"));
        assert!(!is_fuse_mount(Path::new("/")));
    }
}
