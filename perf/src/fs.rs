//! `hive-perf fs`: file-system benchmarks through a real FUSE mount, each against its
//! ceiling measured in the same run.
//!
//! # What runs where
//! With `--spawn`, this process creates everything under `--work-dir` (`/var/tmp`, the
//! real disk, never tmpfs) in `hive-perf-fs-<pid>/`: a one-node hive (`hive init` + `hive
//! run`, unpinned, its device a sparse file), a volume (`hi volume create`) and its mount
//! (`hi mount`, the binary next to this one or `--hi-bin`) on `mnt/`. With `--mount DIR`
//! it benchmarks whatever is mounted at DIR (a `hi` mount started elsewhere, or any other
//! filesystem for comparison) inside a fresh `DIR/hive-perf-fs-<pid>/`. Nothing is pinned:
//! the benchmark, `hi` and the node share the cores as they would on a host.
//!
//! Children run in their own process group (a terminal's Ctrl-C reaches only this
//! process, which stops them in order: `hi umount` and wait for `hi`, then SIGTERM the
//! node) and get `PR_SET_PDEATHSIG` (SIGTERM) in case this process is killed. Every guard
//! (mount, node, ext4 loop mount, directories) undoes its work on drop, so errors and
//! Ctrl-C clean up too; a directory is never removed while anything is still mounted
//! below it.
//!
//! # The benchmarks and their ceilings
//! Each run generates fresh unique incompressible data (`--bytes`, 2 GiB) in memory before
//! any clock starts (a new seed per run: the hive deduplicates, so reused data would not
//! be written again).
//! - `write`: the data written to one new file with `--io-bytes` (1 MiB) `write(2)` calls,
//!   then `fsync(2)`; the time runs from `open` to the end of `fsync`. Ceiling: the client
//!   pipeline (FastCDC + keyed BLAKE3 + LZ4 on every core, [`crate::pipeline::run`]) over
//!   the same buffer.
//! - `read` (cold): `hi` is stopped and started again (its chunk cache is empty) and the
//!   kernel's caches are dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`); then the
//!   file is read from `open` to EOF with 1 MiB `read(2)` calls (4 KiB of each checked
//!   against the data). Ceiling: the lower of fio's sequential read of a file on the same
//!   filesystem as the node's device (O_DIRECT, 1 MiB, depth 16) and the client's
//!   decompress + keyed-BLAKE3 verify rate ([`hivefs_net::chunk::verify`], what
//!   `HiveClient::get` does per chunk) for the same chunks (prepared untimed with the
//!   client pipeline), on every core. Then, from cold again, the same read with O_DIRECT
//!   (no page cache: `hi`'s read path like for like with fio's O_DIRECT reads), and a
//!   buffered cold read of fio's file on the node's filesystem: what filling fresh
//!   page-cache pages costs a local file on this machine, which a buffered read through
//!   the mount pays too (on a VM whose freed memory goes back to the host it is most of
//!   the cost: `ratio_fs_seq_read_cold_vs_local_buffered`).
//! - `random`: `--rand-threads` (16, fio's depth) threads each issue one 4 KiB `pread` at
//!   a time on one shared descriptor; every read is checked against the data.
//!   - cold: after the same remount + drop_caches, O_DIRECT (falls back to buffered reads
//!     with a note if the mount refuses it). The reads go to distinct slots of twice the
//!     largest chunk (512 KiB), each inside the slot's first 256 KiB, so no two reads can
//!     touch the same chunk: every read is a chunk fetch from the node, never a chunk
//!     cache hit. Their number is the slot count (4096 for 2 GiB), at most
//!     `--rand-cold-reads`. Ceiling: fio's 64 KiB random reads at depth 16 on the same
//!     filesystem, compared **in operations per second**: a cold 4 KiB read costs one
//!     chunk read (64 KiB on average) from the device, so IOPS vs fio's 64 KiB IOPS says
//!     how close a file read comes to the device's random chunk reads.
//!   - warm: the file is read once through the same (buffered) descriptor, so the page
//!     cache holds it, then random reads for `--rand-secs` (5 s): what an application sees
//!     on a re-read.
//!   - warm direct: O_DIRECT reads of the first `--warm-direct-bytes` (128 MiB, less than
//!     `hi`'s 256 MiB chunk cache) after one O_DIRECT pass over it: every read goes
//!     through FUSE to `hi` and is served from its chunk cache (the FUSE round trip and
//!     `hi`'s read path with no network).
//!
//!   Each reports IOPS, MB/s (4096-byte reads) and p50/p99/p99.9 latency (per read).
//! - `meta`: `--meta-files` (20,000) files in one new directory: create (`open(O_CREAT |
//!   O_EXCL)`, a write of `--meta-file-bytes` unless 0, `close`), `lstat` of each,
//!   `unlink` of each; ops/s per phase, and p50/p99/p99.9 of each create (open, write,
//!   close) and each unlink. Default: **empty files**, because the ceiling,
//!   ext4 with `-o dirsync`, makes the namespace durable at each create but not a file's
//!   data: empty files compare durable creates with durable creates. The ext4 is made
//!   once per invocation with `mkfs.ext4` on a sparse file in the work dir (same disk),
//!   mounted `-o loop,dirsync`; the same code runs on it in each run, right after the
//!   mount's turn. Stats follow creates with nothing dropped, on both sides: passes
//!   over all the files, at least [`STAT_PASSES`] and for at least [`STAT_SECS`], the
//!   median pass's rate reported (one pass of 20,000 cached `lstat`s takes ~60 ms, and
//!   one scheduling hiccup moved a single pass by 30% either way on the 2-core VM). Then
//!   `list_cold`: caches dropped (`drop_caches`, both sides), the directory listed as
//!   `ls -l` does (entries, then `statx`, `lgetxattr(security.selinux)` and
//!   `getxattr(system.posix_acl_access)` each); entries/s, reported, not gated.
//!
//! # Figures
//! Per run, each figure and each ratio (figure / its ceiling from the same run); the
//! printed value is the median over the runs. Machine-readable lines are `ratio NAME X`
//! and `figure NAME X`. GB/s and MB/s are decimal (1e9, 1e6 bytes per second).

use crate::limits::{self, FioJob};
use crate::node::{self, own_child, SpawnedNode};
use crate::util::{self, Lat, Rng};
use crate::{check_stop, pipeline, Opts, Results, STOP};
use anyhow::{bail, Context, Result};
use hivefs_client::pipeline::{ChunkerConfig, Pipeline};
use hivefs_net::chunk::{Codec, DedupeKey};
use std::ffi::{CString, OsString};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Reads and O_DIRECT buffers are aligned to this.
const BLOCK: usize = 4096;
/// How long `hi mount` may take until the mount is live.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `hi` may take to exit after `hi umount` or SIGTERM (it flushes first).
const UNMOUNT_TIMEOUT: Duration = Duration::from_secs(60);
/// Smallest `--bytes`.
const MIN_FILE_BYTES: u64 = 16 << 20;

/// Which benchmarks.
#[derive(clap::Subcommand, Clone, Copy, PartialEq, Eq, Debug)]
pub enum FsCmd {
    /// Sequential write + fsync vs the client pipeline.
    Write,
    /// Cold sequential read vs min(fio sequential read, client decompress+verify).
    Read,
    /// 4 KiB random reads: cold (vs fio 64 KiB random reads), warm, warm O_DIRECT.
    Random,
    /// Create, stat, unlink of many small files vs ext4 `-o dirsync` on the same disk.
    Meta,
    /// All of the above, each run.
    All,
    /// 4 KiB random writes with fdatasync after each, through a mount with a client disk:
    /// default mode vs `--writeback` vs ext4 on the same disk (steady state, past 3 x the
    /// journal).
    Sync,
}

#[derive(clap::Args, Clone, Debug)]
pub struct FsArgs {
    /// Benchmark the filesystem mounted at DIR (instead of --spawn). Cold reads then drop
    /// only the kernel's caches: the mount's own cache cannot be emptied from here.
    #[arg(long, global = true, value_name = "DIR")]
    mount: Option<PathBuf>,
    /// The `hi` binary for --spawn (default: next to this executable).
    #[arg(long, global = true)]
    hi_bin: Option<PathBuf>,
    /// Volume created and mounted with --spawn.
    #[arg(long, global = true, default_value = "perf")]
    volume: String,
    /// FUSE worker threads of the spawned `hi mount` (default: hi's own).
    #[arg(long, global = true)]
    hi_threads: Option<usize>,
    /// Bytes per write(2) / read(2) call of the sequential benchmarks.
    #[arg(long, global = true, default_value = "1M")]
    io_bytes: String,
    /// With --spawn: mount from a client disk (journal of --client-journal, every write
    /// journaled first) in this mode: `default` (fsync/close wait for the hive) or
    /// `writeback`. Without it, the mount has no client disk. (`fs sync` always has one.)
    #[arg(long, global = true, value_name = "MODE")]
    client_disk: Option<String>,
    /// The client disk's journal for --client-disk.
    #[arg(long, global = true, default_value = "256M")]
    client_journal: String,
    /// Threads of the random-read benchmarks (one synchronous pread each: the depth).
    #[arg(long, global = true, default_value_t = 16)]
    rand_threads: usize,
    /// Seconds of each warm random-read phase.
    #[arg(long, global = true, default_value_t = 5.0)]
    rand_secs: f64,
    /// At most this many cold random reads (one per 512 KiB slot of the file).
    #[arg(long, global = true, default_value_t = 4096)]
    rand_cold_reads: usize,
    /// Region of the file read by the warm O_DIRECT phase (below hi's chunk cache size).
    #[arg(long, global = true, default_value = "128M")]
    warm_direct_bytes: String,
    /// Files of the metadata benchmark.
    #[arg(long, global = true, default_value_t = 20_000)]
    meta_files: usize,
    /// Bytes written to each file of the metadata benchmark (0: create + close only).
    #[arg(long, global = true, default_value = "0")]
    meta_file_bytes: String,
    /// Size of the (sparse) ext4 image of the metadata ceiling.
    #[arg(long, global = true, default_value = "4G")]
    ext4_size: String,
    /// `sync`: the client disk's journal (the run writes at least 3 times this).
    #[arg(long, global = true, default_value = "16M")]
    sync_journal: String,
    /// `sync`: the region of the file the random writes land in.
    #[arg(long, global = true, default_value = "64M")]
    sync_file_bytes: String,
    /// `sync`: seconds a default-mode run lasts at most (each write waits for the hive).
    #[arg(long, global = true, default_value_t = 15.0)]
    sync_default_secs: f64,
}

#[derive(Clone, Copy, Default)]
struct Plan {
    write: bool,
    read: bool,
    random: bool,
    meta: bool,
}

impl Plan {
    fn file(&self) -> bool {
        self.write || self.read || self.random
    }
}

// ---------------------------------------------------------------------------------------
// Mounts: /proc/self/mountinfo, unmounting.

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
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// `(mountpoint, fstype)` of every mount, from `/proc/self/mountinfo`.
fn mounts() -> Vec<(PathBuf, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            let mnt = PathBuf::from(std::ffi::OsStr::from_bytes(&unescape_mountinfo(
                fields.get(4)?,
            )));
            Some((mnt, fields.get(sep + 1)?.to_string()))
        })
        .collect()
}

/// Is `path` (exactly) a FUSE mount right now? Reads nothing below `path`.
fn is_fuse_mount(path: &Path) -> bool {
    mounts()
        .iter()
        .any(|(m, t)| m == path && (t == "fuse" || t.starts_with("fuse.")))
}

fn is_mount(path: &Path) -> bool {
    mounts().iter().any(|(m, _)| m == path)
}

/// Mounts at or below `dir`.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    mounts()
        .into_iter()
        .map(|(m, _)| m)
        .filter(|m| m.starts_with(dir))
        .collect()
}

fn umount2(path: &Path, flags: libc::c_int) -> std::io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: plain syscall with a NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Detach whatever is mounted at `path` (lazy). True when nothing is left there.
fn lazy_unmount(path: &Path) -> bool {
    for _ in 0..8 {
        if !is_mount(path) {
            return true;
        }
        if umount2(path, libc::MNT_DETACH).is_err() {
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
    !is_mount(path)
}

/// The phases of `fs meta`, as figures and ratios name them (`meta_workload`'s order).
const META_OPS: [&str; 4] = ["create", "stat", "list_cold", "unlink"];

/// `sync`, then drop the page cache, dentries and inodes.
fn drop_caches() -> Result<()> {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3\n")
        .context("echo 3 > /proc/sys/vm/drop_caches (needs root)")
}

// ---------------------------------------------------------------------------------------
// Guards: directories, the hi mount, the ext4 loop mount.

/// A directory this process created: removed on drop (unless kept), but never while
/// anything is mounted below it.
struct OwnedDir {
    path: PathBuf,
    keep: bool,
}

impl OwnedDir {
    fn create(path: PathBuf, keep: bool) -> Result<OwnedDir> {
        if path.exists() {
            bail!("{} already exists", path.display());
        }
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        let path = path.canonicalize()?;
        Ok(OwnedDir { path, keep })
    }
}

impl Drop for OwnedDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("hive-perf: keeping {}", self.path.display());
            return;
        }
        let live = mounts_under(&self.path);
        if !live.is_empty() {
            eprintln!(
                "hive-perf: {} still has mounts below it ({live:?}): not removing it",
                self.path.display()
            );
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("hive-perf: removing {}: {e}", self.path.display());
        }
    }
}

/// The `hi` binary: `--hi-bin`, else next to this executable.
fn find_hi_bin(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let p = std::env::current_exe()?
        .parent()
        .context("own executable has no directory")?
        .join("hi");
    if !p.is_file() {
        bail!(
            "no hi binary at {} (build it: cargo build --release -p hivefs-hi, or pass --hi-bin)",
            p.display()
        );
    }
    Ok(p)
}

/// One `hi mount` child of this process on `mnt`, restartable (for cold reads).
struct HiMount {
    bin: PathBuf,
    /// `--hive ... --token-file ... --ca ...|--insecure`.
    hive_args: Vec<OsString>,
    volume: String,
    threads: Option<usize>,
    mnt: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    starts: u32,
    /// Mount from a client disk instead: (disk, secrets directory, write-back mode).
    disk: Option<(PathBuf, PathBuf, bool)>,
}

impl HiMount {
    fn log_tail(&self, n: usize) -> String {
        let s = String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Start `hi mount` and wait until it printed `mounted VOLUME at MNT` and the kernel
    /// lists the FUSE mount.
    fn start(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("hi mount already runs");
        }
        if is_mount(&self.mnt) {
            bail!("{} is already a mount point", self.mnt.display());
        }
        self.starts += 1;
        let mut out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        writeln!(out, "=== hive-perf: hi mount #{} ===", self.starts)?;
        let log_start = std::fs::metadata(&self.log).map_or(0, |m| m.len() as usize);
        let mut cmd = Command::new(&self.bin);
        cmd.arg("mount");
        match &self.disk {
            None => {
                cmd.args(&self.hive_args).arg("--volume").arg(&self.volume);
            }
            Some((disk, secrets, writeback)) => {
                cmd.arg("--secrets").arg(secrets);
                if *writeback {
                    cmd.arg("--writeback");
                }
                cmd.arg(disk);
            }
        }
        if let Some(t) = self.threads {
            cmd.arg("--threads").arg(t.to_string());
        }
        cmd.arg(&self.mnt)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .env("NO_COLOR", "1");
        own_child(&mut cmd, libc::SIGTERM);
        self.child = Some(
            cmd.spawn()
                .with_context(|| format!("starting {} mount", self.bin.display()))?,
        );
        let needle = format!("mounted {} at {}", self.volume, self.mnt.display());
        let t0 = Instant::now();
        loop {
            let log =
                String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned();
            let printed = log
                .get(log_start..)
                .unwrap_or("")
                .lines()
                .any(|l| l.trim_end() == needle);
            if printed && is_fuse_mount(&self.mnt) {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(st) = exited {
                self.child = None;
                lazy_unmount(&self.mnt);
                bail!(
                    "hi mount exited with {st} before mounting; log:\n{}",
                    self.log_tail(20)
                );
            }
            if t0.elapsed() > MOUNT_TIMEOUT || STOP.load(Ordering::SeqCst) {
                let why = if t0.elapsed() > MOUNT_TIMEOUT {
                    format!("not mounted after {MOUNT_TIMEOUT:?}")
                } else {
                    "interrupted".to_string()
                };
                let _ = self.stop();
                bail!("hi mount: {why}; log:\n{}", self.log_tail(20));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `hi umount MNT` (retried while busy), SIGTERM if that does not work, then wait for
    /// `hi` to exit; SIGKILL and a lazy unmount as the last resort.
    fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            lazy_unmount(&self.mnt);
            return Ok(());
        };
        let t0 = Instant::now();
        let mut asked = false;
        let mut umount_err = String::new();
        while t0.elapsed() < Duration::from_secs(10) {
            if child.try_wait()?.is_some() {
                break;
            }
            match Command::new(&self.bin)
                .arg("umount")
                .arg(&self.mnt)
                .env("NO_COLOR", "1")
                .output()
            {
                Ok(o) if o.status.success() => {
                    asked = true;
                    break;
                }
                Ok(o) => umount_err = String::from_utf8_lossy(&o.stderr).trim().to_string(),
                Err(e) => umount_err = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        if !asked {
            // SAFETY: kill on our own child's pid (not reaped yet, so not reused).
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        }
        let t1 = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break Some(st);
            }
            if t1.elapsed() > UNMOUNT_TIMEOUT {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let Some(st) = status else {
            let _ = child.kill();
            let _ = child.wait();
            lazy_unmount(&self.mnt);
            bail!(
                "hi did not exit within {UNMOUNT_TIMEOUT:?} of {}: killed; log:\n{}",
                if asked { "hi umount" } else { "SIGTERM" },
                self.log_tail(20)
            );
        };
        let left = is_mount(&self.mnt);
        if left {
            lazy_unmount(&self.mnt);
        }
        if !asked && !umount_err.is_empty() {
            eprintln!("hive-perf: hi umount failed ({umount_err}); used SIGTERM");
        }
        if left || !st.success() {
            bail!(
                "hi exited with {st}{}; log:\n{}",
                if left {
                    " and left the mount behind"
                } else {
                    ""
                },
                self.log_tail(20)
            );
        }
        Ok(())
    }
}

impl Drop for HiMount {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("hive-perf: stopping hi mount: {e:#}");
        }
    }
}

/// What this process spawned: the mount first (dropped first), then the node.
struct Spawned {
    hi: HiMount,
    node: SpawnedNode,
}

/// An ext4 file system on a sparse image, loop-mounted with `-o dirsync`.
struct Ext4 {
    img: PathBuf,
    mnt: PathBuf,
    mounted: bool,
}

impl Ext4 {
    fn create(dir: &Path, size: u64) -> Result<Ext4> {
        let img = dir.join("ext4.img");
        let mnt = dir.join("ext4");
        let mut e = Ext4 {
            img: img.clone(),
            mnt: mnt.clone(),
            mounted: false,
        };
        File::create(&img)?.set_len(size)?;
        std::fs::create_dir(&mnt)?;
        let run = |cmd: &mut Command| -> Result<()> {
            let o = cmd.output().with_context(|| format!("running {cmd:?}"))?;
            if !o.status.success() {
                bail!(
                    "{cmd:?} failed ({}): {}{}",
                    o.status,
                    String::from_utf8_lossy(&o.stdout).trim(),
                    String::from_utf8_lossy(&o.stderr).trim()
                );
            }
            Ok(())
        };
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img))?;
        run(Command::new("mount")
            .args(["-o", "loop,dirsync"])
            .arg(&img)
            .arg(&mnt))?;
        e.mounted = true;
        Ok(e)
    }

    /// Loop devices backed by the image.
    fn loops(&self) -> Vec<String> {
        Command::new("losetup")
            .arg("-j")
            .arg(&self.img)
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter_map(|l| l.split(':').next().map(str::to_string))
                    .filter(|d| d.starts_with("/dev/"))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        if self.mounted {
            let mut ok = false;
            for _ in 0..50 {
                if umount2(&self.mnt, 0).is_ok() || !is_mount(&self.mnt) {
                    ok = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if !ok && !lazy_unmount(&self.mnt) {
                eprintln!("hive-perf: could not unmount {}", self.mnt.display());
                return;
            }
        }
        // `mount -o loop` sets autoclear; detach anything still bound to the image.
        for dev in self.loops() {
            let _ = Command::new("losetup").arg("-d").arg(&dev).status();
        }
        let _ = std::fs::remove_dir(&self.mnt);
        let _ = std::fs::remove_file(&self.img);
    }
}

// ---------------------------------------------------------------------------------------
// Workloads.

/// A buffer whose start is aligned for O_DIRECT.
struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let raw = vec![0u8; len + BLOCK];
        let start = raw.as_ptr().align_offset(BLOCK);
        AlignedBuf { raw, start, len }
    }

    fn buf(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// Open for reading, O_DIRECT if `direct` (`Ok(None)` when the filesystem refuses it).
fn open_read(path: &Path, direct: bool) -> Result<Option<File>> {
    let mut oo = OpenOptions::new();
    oo.read(true);
    if direct {
        oo.custom_flags(libc::O_DIRECT);
    }
    match oo.open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("opening {}", path.display())),
    }
}

/// Sequential write of `data` to a new file in `io` byte calls, then fsync. Seconds from
/// open to the end of fsync.
fn seq_write(path: &Path, data: &[u8], io: usize) -> Result<f64> {
    let t0 = Instant::now();
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    for piece in data.chunks(io) {
        check_stop()?;
        f.write_all(piece).context("write")?;
    }
    f.sync_all().context("fsync")?;
    let secs = t0.elapsed().as_secs_f64();
    drop(f);
    Ok(secs)
}

/// Read `f` from the start to EOF in `buf.len()` byte `read(2)` calls, handing each
/// call's bytes and offset to `each`. Returns (bytes, seconds).
fn read_seq(
    f: &mut File,
    buf: &mut [u8],
    mut each: impl FnMut(usize, &[u8]) -> Result<()>,
) -> Result<(u64, f64)> {
    let t0 = Instant::now();
    let mut pos = 0usize;
    loop {
        check_stop()?;
        let n = f.read(buf).with_context(|| format!("read at {pos}"))?;
        if n == 0 {
            break;
        }
        each(pos, &buf[..n])?;
        pos += n;
    }
    Ok((pos as u64, t0.elapsed().as_secs_f64()))
}

/// [`read_seq`] of a file holding `data`, checking 4 KiB of each call against it.
fn read_to_end(f: &mut File, data: &[u8], buf: &mut [u8]) -> Result<(u64, f64)> {
    let (n, secs) = read_seq(f, buf, |pos, b| {
        if pos + b.len() > data.len() {
            bail!(
                "read past the written size ({} > {})",
                pos + b.len(),
                data.len()
            );
        }
        let k = b.len().min(BLOCK);
        if b[..k] != data[pos..pos + k] {
            bail!("data read at offset {pos} differs from what was written");
        }
        Ok(())
    })?;
    if n != data.len() as u64 {
        bail!("read {n} bytes, {} were written", data.len());
    }
    Ok((n, secs))
}

/// GB/s of a buffered sequential read of `path` (1 MiB calls) right after drop_caches:
/// what the kernel's page cache reading a local file cold costs on this machine (fresh
/// page-cache pages), the same cost a cold buffered read through the mount pays.
fn local_cold_read(path: &Path) -> Result<f64> {
    drop_caches()?;
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let (n, secs) = read_seq(&mut f, &mut vec![0u8; 1 << 20], |_, _| Ok(()))?;
    Ok(n as f64 / secs / 1e9)
}

/// Random 4 KiB reads.
struct RandRun {
    reads: u64,
    secs: f64,
    lat: Lat,
}

impl RandRun {
    fn iops(&self) -> f64 {
        self.reads as f64 / self.secs
    }

    fn mbps(&self) -> f64 {
        self.iops() * BLOCK as f64 / 1e6
    }
}

/// Which offsets a random-read phase reads.
enum Offsets<'a> {
    /// These, each once (threads take the next from a shared cursor).
    List(&'a [u64]),
    /// Uniform 4 KiB-aligned offsets below `region` for `secs`.
    Timed { region: u64, secs: f64, seed: u64 },
}

/// `threads` threads, each one `pread` of 4 KiB at a time on the shared `f`; each read
/// checked against `data`.
fn rand_reads(f: &File, data: &[u8], offsets: Offsets<'_>, threads: usize) -> Result<RandRun> {
    let next = AtomicUsize::new(0);
    let t0 = Instant::now();
    let results: Vec<Result<(u64, Lat)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads.max(1))
            .map(|t| {
                let next = &next;
                let offsets = &offsets;
                s.spawn(move || -> Result<(u64, Lat)> {
                    let mut buf = AlignedBuf::new(BLOCK);
                    let mut lat = Lat::new();
                    let mut n = 0u64;
                    let mut rng = match offsets {
                        Offsets::Timed { seed, .. } => Rng::new(seed ^ ((t as u64 + 1) * 0x9e37)),
                        Offsets::List(_) => Rng::new(0),
                    };
                    loop {
                        if STOP.load(Ordering::Relaxed) {
                            bail!("interrupted");
                        }
                        let off = match offsets {
                            Offsets::List(l) => match l.get(next.fetch_add(1, Ordering::Relaxed)) {
                                Some(&o) => o,
                                None => break,
                            },
                            Offsets::Timed { region, secs, .. } => {
                                if t0.elapsed().as_secs_f64() >= *secs {
                                    break;
                                }
                                rng.below(region / BLOCK as u64) * BLOCK as u64
                            }
                        };
                        let b = buf.buf();
                        let r0 = Instant::now();
                        let k = f
                            .read_at(b, off)
                            .with_context(|| format!("pread 4 KiB at {off}"))?;
                        lat.record(r0.elapsed());
                        let o = off as usize;
                        if k != BLOCK || b[..] != data[o..o + BLOCK] {
                            bail!("4 KiB read at {off} ({k} bytes) differs from what was written");
                        }
                        n += 1;
                    }
                    Ok((n, lat))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("reader panicked")))
            })
            .collect()
    });
    let secs = t0.elapsed().as_secs_f64();
    let mut run = RandRun {
        reads: 0,
        secs,
        lat: Lat::new(),
    };
    for r in results {
        let (n, lat) = r?;
        run.reads += n;
        run.lat.add(&lat);
    }
    if run.reads == 0 {
        bail!("no reads done");
    }
    Ok(run)
}

/// Offsets of the cold random reads: one per slot of twice the largest chunk, inside the
/// slot's first half, so that no chunk holds bytes of two reads (each read is a fetch).
fn cold_offsets(len: u64, max_reads: usize, seed: u64) -> Vec<u64> {
    let max_chunk = ChunkerConfig::default().max_bytes as u64;
    let slot = 2 * max_chunk;
    let mut rng = Rng::new(seed);
    let mut v: Vec<u64> = (0..len / slot)
        .map(|i| i * slot + rng.below((max_chunk - BLOCK as u64) / BLOCK as u64 + 1) * BLOCK as u64)
        .collect();
    rng.shuffle(&mut v);
    v.truncate(max_reads);
    v
}

/// Fewest `lstat` passes of the metadata benchmark (module doc).
const STAT_PASSES: usize = 5;
/// Shortest time the metadata benchmark's `lstat` passes take together, in seconds.
const STAT_SECS: f64 = 1.0;

/// What one side's metadata run measured.
struct MetaRun {
    /// Ops/s per phase: create, stat, list cold, unlink.
    ops: [f64; 4],
    /// Latency of each create (open + write + close) and each unlink.
    create: util::Lat,
    unlink: util::Lat,
}

/// Create, stat, list cold (as `ls -l`: [`list_like_ls_l`]) and unlink `n` files in a
/// new directory `dir`. Returns ops/s (entries/s for the listing; NaN when caches cannot
/// be dropped) per phase, and the latencies of creates and unlinks.
fn meta_workload(dir: &Path, n: usize, file_bytes: usize, seed: u64) -> Result<MetaRun> {
    std::fs::create_dir(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    let paths: Vec<PathBuf> = (0..n).map(|i| dir.join(format!("f{i:06}"))).collect();
    let mut payload = vec![0u8; file_bytes];
    Rng::new(seed).fill(&mut payload);
    let (mut create_lat, mut unlink_lat) = (util::Lat::new(), util::Lat::new());
    let t0 = Instant::now();
    for (i, p) in paths.iter().enumerate() {
        if i % 256 == 0 {
            check_stop()?;
        }
        let t = Instant::now();
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(p)
            .with_context(|| format!("creating {}", p.display()))?;
        if file_bytes > 0 {
            f.write_all(&payload)
                .with_context(|| format!("writing {}", p.display()))?;
        }
        drop(f);
        create_lat.record(t.elapsed());
    }
    let create = n as f64 / t0.elapsed().as_secs_f64();
    let began = Instant::now();
    let mut passes = Vec::new();
    while passes.len() < STAT_PASSES || began.elapsed().as_secs_f64() < STAT_SECS {
        let t0 = Instant::now();
        for (i, p) in paths.iter().enumerate() {
            if i % 1024 == 0 {
                check_stop()?;
            }
            let m =
                std::fs::symlink_metadata(p).with_context(|| format!("lstat {}", p.display()))?;
            if m.len() != file_bytes as u64 {
                bail!(
                    "{} has {} bytes, {file_bytes} were written",
                    p.display(),
                    m.len()
                );
            }
        }
        passes.push(n as f64 / t0.elapsed().as_secs_f64());
    }
    let stat = util::median(&passes);
    check_stop()?;
    // Cold only if caches can be dropped (root); else the phase is left out (NaN), and
    // the others stand.
    let list = match drop_caches() {
        Ok(()) => {
            let t0 = Instant::now();
            let listed = list_like_ls_l(dir)?;
            if listed != n {
                bail!("{} lists {listed} entries, {n} were created", dir.display());
            }
            listed as f64 / t0.elapsed().as_secs_f64()
        }
        Err(e) => {
            eprintln!("hive-perf: no cold listing of {}: {e:#}", dir.display());
            f64::NAN
        }
    };
    let t0 = Instant::now();
    for (i, p) in paths.iter().enumerate() {
        if i % 256 == 0 {
            check_stop()?;
        }
        let t = Instant::now();
        std::fs::remove_file(p).with_context(|| format!("unlink {}", p.display()))?;
        unlink_lat.record(t.elapsed());
    }
    let unlink = n as f64 / t0.elapsed().as_secs_f64();
    std::fs::remove_dir(dir).with_context(|| format!("rmdir {}", dir.display()))?;
    Ok(MetaRun {
        ops: [create, stat, list, unlink],
        create: create_lat,
        unlink: unlink_lat,
    })
}

/// What `ls -l` (GNU coreutils 9) asks of a directory: its entries, then per entry
/// `statx`, `lgetxattr("security.selinux")` and `getxattr("system.posix_acl_access")`
/// (absent xattrs are the normal case: ENODATA). Returns the number of entries.
fn list_like_ls_l(dir: &Path) -> Result<usize> {
    let mut n = 0;
    let mut buf = [0u8; 256];
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e.with_context(|| format!("listing {}", dir.display()))?;
        let p = e.path();
        std::fs::symlink_metadata(&p).with_context(|| format!("lstat {}", p.display()))?;
        let c = std::ffi::CString::new(p.as_os_str().as_bytes())?;
        for (name, follow) in [
            (c"security.selinux", false),
            (c"system.posix_acl_access", true),
        ] {
            let (path, name, b) = (c.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast());
            // SAFETY: NUL-terminated path and name; `buf` outlives the call and its length
            // is passed.
            let r = unsafe {
                if follow {
                    libc::getxattr(path, name, b, buf.len())
                } else {
                    libc::lgetxattr(path, name, b, buf.len())
                }
            };
            let err = std::io::Error::last_os_error();
            if r < 0 && err.raw_os_error() != Some(libc::ENODATA) {
                return Err(err).with_context(|| format!("getxattr {}", p.display()));
            }
        }
        n += 1;
    }
    Ok(n)
}

/// The client's decompress + verify rate (GB/s of plaintext) for `data`'s chunks, on
/// every core: the chunks are prepared (untimed) with the client pipeline as `hi` writes
/// them (FastCDC, keyed BLAKE3, LZ4 or raw when that does not pay), then each worker
/// verifies its share with [`hivefs_net::chunk::verify`].
fn verify_rate(data: &[u8]) -> Result<(f64, usize)> {
    let cpus = util::cpu_count();
    let key = DedupeKey([0x5a; 32]);
    let p = Pipeline::new(key, ChunkerConfig::default(), Codec::Lz4, cpus)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let chunks = p.prepare(data);
    let next = AtomicUsize::new(0);
    const BATCH: usize = 64;
    let t0 = Instant::now();
    let results: Vec<Result<u64>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..cpus)
            .map(|_| {
                let (next, chunks, key) = (&next, &chunks, &key);
                s.spawn(move || -> Result<u64> {
                    let mut bytes = 0u64;
                    loop {
                        let i = next.fetch_add(BATCH, Ordering::Relaxed);
                        if i >= chunks.len() {
                            return Ok(bytes);
                        }
                        for c in &chunks[i..(i + BATCH).min(chunks.len())] {
                            let plain = hivefs_net::chunk::verify(
                                key,
                                &c.id,
                                c.codec,
                                &c.stored,
                                c.raw_len as usize,
                            )
                            .map_err(|e| anyhow::anyhow!("verify: {e}"))?;
                            bytes += std::hint::black_box(plain).len() as u64;
                        }
                    }
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("verifier panicked")))
            })
            .collect()
    });
    let secs = t0.elapsed().as_secs_f64();
    let mut total = 0u64;
    for r in results {
        total += r?;
    }
    if total != data.len() as u64 {
        bail!("verified {total} bytes of {}", data.len());
    }
    Ok((total as f64 / secs / 1e9, chunks.len()))
}

// ---------------------------------------------------------------------------------------
// The run.

/// Where the files go and how to make reads cold.
struct Target<'a> {
    /// The benchmark's directory inside the mount.
    root: PathBuf,
    spawned: Option<&'a mut Spawned>,
}

impl Target<'_> {
    /// Empty every cache between the data and the reader: `hi`'s (stop it), the kernel's
    /// (drop_caches), then mount again. Attached mounts: the kernel's only.
    fn make_cold(&mut self, res: &mut Results, noted: &mut bool) -> Result<()> {
        if let Some(sp) = self.spawned.as_deref_mut() {
            sp.hi.stop().context("stopping hi for a cold read")?;
            let r = drop_caches();
            sp.hi.start().context("mounting again after stopping hi")?;
            r?;
        } else {
            drop_caches()?;
            if !*noted {
                *noted = true;
                res.note(
                    "attached mount (--mount): cold reads drop the kernel's caches only; \
                     the mount's own cache (hi's chunk cache) may still hold data"
                        .into(),
                );
            }
        }
        Ok(())
    }

    /// With --spawn, make sure `hi` runs (a phase that failed may have lost it).
    fn ensure_mounted(&mut self) -> Result<()> {
        if let Some(sp) = self.spawned.as_deref_mut() {
            let alive = sp
                .hi
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
            if !alive || !is_fuse_mount(&sp.hi.mnt) {
                eprintln!("hive-perf: hi mount is gone; mounting again");
                let _ = sp.hi.stop();
                sp.hi.start()?;
            }
            if !self.root.is_dir() {
                std::fs::create_dir_all(&self.root)?;
            }
        }
        Ok(())
    }
}

fn parse_overrides(o: &Opts) -> Result<Vec<(String, String)>> {
    o.node_set
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .with_context(|| format!("--node-set {kv}: want KEY=VALUE"))
        })
        .collect()
}

/// Init + run a node in `dir`, create the volume, mount it on `mnt`.
fn spawn_hive(
    o: &Opts,
    a: &FsArgs,
    dir: &Path,
    mnt: &Path,
    log: &Path,
    bytes: u64,
) -> Result<Spawned> {
    let hive_bin = node::find_hive_bin(o.hive_bin.as_deref())?;
    let hi_bin = find_hi_bin(a.hi_bin.as_deref())?;
    // Every run writes `bytes` of new chunks (no compaction yet): size the device for them.
    let need = bytes * o.runs as u64 + bytes / 2 + (4 << 30);
    let asked = util::parse_size(&o.node_size)?;
    let size = if asked < need {
        let g = need.div_ceil(1 << 30);
        println!(
            "node device: {} is too small for {} run(s) of {}: using {g}G",
            o.node_size,
            o.runs,
            util::fmt_size(bytes)
        );
        format!("{g}G")
    } else {
        o.node_size.clone()
    };
    let t0 = Instant::now();
    let node = SpawnedNode::spawn(
        &hive_bin,
        dir,
        &size,
        o.shards,
        o.insecure,
        None,
        o.keep,
        &parse_overrides(o)?,
    )?;
    let toml = std::fs::read_to_string(dir.join("hive.toml"))?;
    let meta_port = toml
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == "meta_port").then(|| v.trim().parse::<u16>().ok())?
        })
        .unwrap_or(node.info.base_port - 1);
    let mut hive_args: Vec<OsString> = vec![
        "--hive".into(),
        format!("{}:{meta_port}", node.info.host).into(),
        "--token-file".into(),
        dir.join("admin.token").into_os_string(),
    ];
    match &node.info.fingerprint {
        Some(fp) => hive_args.extend(["--ca".into(), fp.into()]),
        None => hive_args.push("--insecure".into()),
    }
    // The metadata service may listen a moment after the shards.
    let mut tries = 0;
    loop {
        let out = Command::new(&hi_bin)
            .args(["volume", "create"])
            .args(&hive_args)
            .arg(&a.volume)
            .env("NO_COLOR", "1")
            .output()
            .with_context(|| format!("running {} volume create", hi_bin.display()))?;
        if out.status.success() {
            break;
        }
        tries += 1;
        if tries > 100 {
            bail!(
                "hi volume create failed ({}): {}{}\nnode log:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                node.log_tail()
            );
        }
        check_stop()?;
        std::thread::sleep(Duration::from_millis(300));
    }
    std::fs::create_dir_all(mnt)?;
    let mut hi = HiMount {
        bin: hi_bin,
        hive_args,
        volume: a.volume.clone(),
        threads: a.hi_threads,
        mnt: mnt.to_path_buf(),
        log: log.to_path_buf(),
        child: None,
        starts: 0,
        disk: None,
    };
    hi.start()?;
    println!(
        "started {} and mounted volume {} on {} in {:.1}s (hi log: {})",
        node.info.label,
        a.volume,
        mnt.display(),
        t0.elapsed().as_secs_f64(),
        log.display()
    );
    Ok(Spawned { hi, node })
}

/// One run of 4 KiB random writes, each followed by `fdatasync`, in a file of
/// `file_bytes` under `dir`: until `bytes` are written or `max_secs` pass. Returns the
/// writes per second over the last two thirds (the steady state) and the latencies.
fn sync_writes(
    dir: &Path,
    file_bytes: u64,
    bytes: u64,
    max_secs: f64,
    seed: u64,
) -> Result<(f64, u64, Lat)> {
    let path = dir.join(format!("syncw-{seed:x}"));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.set_len(file_bytes)?;
    f.sync_all()?;
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; BLOCK];
    let slots = file_bytes / BLOCK as u64;
    let mut lat = Lat::new();
    let t0 = Instant::now();
    let (mut written, mut steady_from) = (0u64, None);
    let mut n = 0u64;
    while written < bytes && t0.elapsed().as_secs_f64() < max_secs {
        check_stop()?;
        rng.fill(&mut buf);
        let off = rng.below(slots) * BLOCK as u64;
        let t = Instant::now();
        f.write_all_at(&buf, off)?;
        f.sync_data()?;
        lat.record(t.elapsed());
        written += BLOCK as u64;
        n += 1;
        let past_third = written * 3 >= bytes || t0.elapsed().as_secs_f64() * 3.0 >= max_secs;
        if steady_from.is_none() && past_third {
            steady_from = Some((n, Instant::now()));
        }
    }
    let (n0, t1) = steady_from.unwrap_or((0, t0));
    let iops = (n - n0) as f64 / t1.elapsed().as_secs_f64().max(1e-9);
    drop(f);
    std::fs::remove_file(&path)?;
    Ok((iops, written, lat))
}

fn run_sync(a: &FsArgs, o: &Opts) -> Result<()> {
    if !o.spawn {
        bail!("fs sync needs --spawn (it formats a client disk next to an ext4 image)");
    }
    let journal = util::parse_size(&a.sync_journal)?;
    let file_bytes = util::parse_size(&a.sync_file_bytes)?;
    let bytes = 3 * journal + journal / 2;
    println!(
        "hive-perf fs sync: 4 KiB random writes + fdatasync in a {} file; journal {}, each \
         run writes {} (default mode: at most {}s); {} run(s), medians",
        util::fmt_size(file_bytes),
        util::fmt_size(journal),
        util::fmt_size(bytes),
        a.sync_default_secs,
        o.runs
    );
    println!("load average at start: {}", crate::loadavg());
    let work = OwnedDir::create(
        o.work_dir
            .join(format!("hive-perf-sync-{}", std::process::id())),
        o.keep,
    )?;
    let ext4 = Ext4::create(&work.path, 2 << 30)?;
    let mnt = work.path.join("mnt");
    let mut sp = spawn_hive(
        o,
        a,
        &work.path.join("node"),
        &mnt,
        &work.path.join("hi.log"),
        1 << 30,
    )?;
    sp.hi.stop()?;
    let (disk, secrets) = format_client_disk(&sp.hi, a, &work.path, &a.sync_journal)?;
    let names = ["default", "writeback", "ext4"];
    let mut iops: [Vec<f64>; 3] = Default::default();
    let mut lats: [Lat; 3] = Default::default();
    let mut written = [0u64; 3];
    for run in 0..o.runs {
        // Rotate the order: a noisy moment should not always hit the same target.
        for k in 0..3 {
            let t = (run + k) % 3;
            let seed = util::os_seed();
            let (dir, max_secs) = match t {
                2 => (ext4.mnt.clone(), 1e9),
                _ => {
                    sp.hi.disk = Some((disk.clone(), secrets.clone(), t == 1));
                    sp.hi.start()?;
                    let max = if t == 0 { a.sync_default_secs } else { 1e9 };
                    (mnt.clone(), max)
                }
            };
            let (r, w, l) = sync_writes(&dir, file_bytes, bytes, max_secs, seed)?;
            if t != 2 {
                sp.hi.stop()?;
            }
            let (p50, p99, _, _) = l.percentiles();
            println!(
                "run {run} {:<9}: {r:>8.0} writes/s steady, {} written, p50 {p50} us, p99 {p99} us",
                names[t],
                util::fmt_size(w)
            );
            iops[t].push(r);
            lats[t].add(&l);
            written[t] = written[t].max(w);
        }
    }
    let med: Vec<f64> = iops.iter().map(|v| util::median(v)).collect();
    for t in 0..3 {
        let (p50, p99, _, _) = lats[t].percentiles();
        println!(
            "{:<9}: median {:>8.0} writes/s (runs {:?}), p50 {p50} us, p99 {p99} us",
            names[t],
            med[t],
            iops[t].iter().map(|v| v.round()).collect::<Vec<_>>()
        );
    }
    if written[1] < 3 * journal {
        println!("note: write-back runs wrote less than 3 x the journal");
    }
    println!("ratio sync_writeback_vs_ext4 {:.3}", med[1] / med[2]);
    println!("ratio sync_default_vs_ext4 {:.3}", med[0] / med[2]);
    println!("ratio sync_writeback_vs_default {:.3}", med[1] / med[0]);
    drop(sp);
    drop(ext4);
    Ok(())
}

/// `hi format` a client disk (a file in `dir`) for the spawned mount's volume, with a
/// journal of `journal` and a 16 MiB cache. Returns (disk, secrets directory).
fn format_client_disk(
    hi: &HiMount,
    a: &FsArgs,
    dir: &Path,
    journal: &str,
) -> Result<(PathBuf, PathBuf)> {
    let disk = dir.join("client-disk.img");
    let secrets = dir.join("secrets");
    let out = Command::new(&hi.bin)
        .arg("format")
        .args(&hi.hive_args)
        .arg("--volume")
        .arg(&a.volume)
        .arg("--secrets")
        .arg(&secrets)
        .args(["--journal", journal, "--cache", "16M"])
        .arg(&disk)
        .env("NO_COLOR", "1")
        .output()?;
    if !out.status.success() {
        bail!("hi format: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((disk, secrets))
}

pub fn run(what: FsCmd, a: &FsArgs, o: &Opts) -> Result<()> {
    if what == FsCmd::Sync {
        return run_sync(a, o);
    }
    let plan = match what {
        FsCmd::Write => Plan {
            write: true,
            ..Plan::default()
        },
        FsCmd::Read => Plan {
            read: true,
            ..Plan::default()
        },
        FsCmd::Random => Plan {
            random: true,
            ..Plan::default()
        },
        FsCmd::Meta => Plan {
            meta: true,
            ..Plan::default()
        },
        FsCmd::Sync => unreachable!("handled above"),
        FsCmd::All => Plan {
            write: true,
            read: true,
            random: true,
            meta: true,
        },
    };
    if o.spawn == a.mount.is_some() {
        bail!("give exactly one of --spawn and --mount DIR");
    }
    let bytes = util::parse_size(o.bytes.as_deref().unwrap_or("2G"))? & !((1 << 20) - 1);
    if plan.file() && bytes < MIN_FILE_BYTES {
        bail!(
            "--bytes must be at least {}",
            util::fmt_size(MIN_FILE_BYTES)
        );
    }
    let io = util::parse_size(&a.io_bytes)? as usize;
    if io == 0 || !io.is_multiple_of(BLOCK) || io > 64 << 20 {
        bail!("--io-bytes must be a multiple of 4 KiB up to 64 MiB");
    }
    let warm_direct =
        (util::parse_size(&a.warm_direct_bytes)?.min(bytes) / BLOCK as u64) * BLOCK as u64;
    let meta_file_bytes = util::parse_size(&a.meta_file_bytes)? as usize;
    let cpus = util::cpu_count();
    let base_seed = util::os_seed();
    println!(
        "hive-perf fs {what:?}: {cpus} cores, nothing pinned; {} run(s), medians reported; file {}, {} calls",
        o.runs,
        util::fmt_size(bytes),
        util::fmt_size(io as u64)
    );
    println!("load average at start: {}", crate::loadavg());

    // Declared in this order so they drop in reverse: the mount and node first, then the
    // ext4, then the work directory.
    let work = OwnedDir::create(
        o.work_dir
            .join(format!("hive-perf-fs-{}", std::process::id())),
        o.keep,
    )?;
    let mut res = Results::default();
    let fio = if plan.read || plan.random {
        match limits::fio_bin() {
            Ok(p) => Some(p),
            Err(why) => {
                res.note(format!("fio figures missing: {why}"));
                None
            }
        }
    } else {
        None
    };
    let ext4 = if plan.meta {
        match Ext4::create(&work.path, util::parse_size(&a.ext4_size)?) {
            Ok(e) => {
                println!(
                    "ext4 ceiling: {} on a sparse {} image, mounted -o loop,dirsync",
                    e.mnt.display(),
                    a.ext4_size
                );
                Some(e)
            }
            Err(e) => {
                res.note(format!("ext4 -o dirsync ceiling missing: {e:#}"));
                None
            }
        }
    } else {
        None
    };
    let mut spawned = if o.spawn {
        Some(spawn_hive(
            o,
            a,
            &work.path.join("node"),
            &work.path.join("mnt"),
            &work.path.join("hi.log"),
            if plan.file() { bytes } else { 0 },
        )?)
    } else {
        None
    };
    if let (Some(sp), Some(mode)) = (spawned.as_mut(), a.client_disk.as_deref()) {
        let writeback = match mode {
            "default" => false,
            "writeback" => true,
            other => bail!("--client-disk {other}: default or writeback"),
        };
        sp.hi.stop()?;
        let (disk, secrets) = format_client_disk(&sp.hi, a, &work.path, &a.client_journal)?;
        sp.hi.disk = Some((disk, secrets, writeback));
        sp.hi.start()?;
        println!(
            "mounted from a client disk ({mode} mode, journal {})",
            a.client_journal
        );
    } else if a.client_disk.is_some() {
        bail!("--client-disk needs --spawn");
    }
    let attached_root;
    let root = match (&spawned, &a.mount) {
        (Some(sp), _) => sp.hi.mnt.join("hive-perf"),
        (None, Some(m)) => {
            let m = m
                .canonicalize()
                .with_context(|| format!("--mount {}", m.display()))?;
            if !m.is_dir() {
                bail!("--mount {}: not a directory", m.display());
            }
            attached_root = OwnedDir::create(
                m.join(format!("hive-perf-fs-{}", std::process::id())),
                o.keep,
            )?;
            println!(
                "attached to {} ({}); files in {}",
                m.display(),
                mounts()
                    .into_iter()
                    .filter(|(p, _)| m.starts_with(p))
                    .max_by_key(|(p, _)| p.as_os_str().len())
                    .map_or("?".into(), |(_, t)| t),
                attached_root.path.display()
            );
            attached_root.path.clone()
        }
        (None, None) => unreachable!("checked"),
    };
    let mut target = Target {
        root,
        spawned: spawned.as_mut(),
    };
    if target.spawned.is_some() {
        std::fs::create_dir_all(&target.root)?;
    }

    let mut data: Vec<u8> = if plan.file() {
        vec![0u8; bytes as usize]
    } else {
        Vec::new()
    };
    let fio_file = work.path.join("fio.dat");
    let fio_size = util::parse_size(&o.fio_size)?;
    let mut cold_noted = false;

    for r in 0..o.runs {
        check_stop()?;
        let run_seed = crate::seed_for(base_seed, r, "fs", "");
        println!("\n== run {}", r + 1);
        let file = target.root.join(format!("seq-{}.dat", r + 1));
        let mut have_file = false;
        // This run's ceilings and figures that ratios need.
        let (mut pipe, mut wrote, mut fio_seq, mut fio_iops, mut verify) =
            (None, None, None, None, None);
        if plan.file() {
            target.ensure_mounted()?;
            let t0 = Instant::now();
            Rng::new(run_seed).fill(&mut data);
            println!(
                "(generated {} of unique data in {:.1}s, untimed)",
                util::fmt_size(bytes),
                t0.elapsed().as_secs_f64()
            );
            if plan.write {
                check_stop()?;
                match pipeline::run(&data, cpus, Codec::Lz4) {
                    Ok(p) => {
                        println!(
                            "pipeline (ceiling)      {:.3} GB/s  ({} threads, {} chunks, same data)",
                            p.gbps(),
                            p.threads,
                            p.chunks
                        );
                        res.fig("fs_pipeline_gbps", p.gbps());
                        pipe = Some(p.gbps());
                    }
                    Err(e) => res.note(format!("pipeline run {} failed: {e:#}", r + 1)),
                }
            }
            check_stop()?;
            match seq_write(&file, &data, io) {
                Ok(secs) => {
                    have_file = true;
                    let g = bytes as f64 / secs / 1e9;
                    println!(
                        "seq write + fsync       {g:.3} GB/s  ({:.2}s{})",
                        secs,
                        if plan.write { "" } else { ", setup" }
                    );
                    if plan.write {
                        res.fig("fs_seq_write_gbps", g);
                        wrote = Some(g);
                    }
                }
                Err(e) => {
                    if STOP.load(Ordering::SeqCst) {
                        return Err(e);
                    }
                    res.note(format!("seq write run {} failed: {e:#}", r + 1));
                }
            }
            if let (Some(w), Some(p)) = (wrote, pipe) {
                res.fig("ratio_fs_seq_write_vs_pipeline", w / p);
            }
        }

        if (plan.read || plan.random) && have_file {
            if let Some(fio) = &fio {
                for (job, name) in [
                    (FioJob::SeqRead, "fio_seqread_gbps"),
                    (FioJob::RandRead, "fio_randread64k_gbps"),
                ] {
                    if (job == FioJob::SeqRead && !plan.read)
                        || (job == FioJob::RandRead && !plan.random)
                    {
                        continue;
                    }
                    check_stop()?;
                    match limits::fio_run(fio, job, &fio_file, fio_size, o.fio_secs, o.node_core) {
                        Ok(g) => {
                            println!(
                                "fio {:<19} {g:.3} GB/s  (O_DIRECT, depth 16, {} file in {}, {}s)",
                                if job == FioJob::SeqRead {
                                    "seq read 1M"
                                } else {
                                    "rand read 64K"
                                },
                                util::fmt_size(fio_size),
                                work.path.display(),
                                o.fio_secs
                            );
                            res.fig(name, g);
                            if job == FioJob::RandRead {
                                fio_iops = Some(g * 1e9 / 65536.0);
                                res.fig("fio_randread64k_iops", g * 1e9 / 65536.0);
                            } else {
                                fio_seq = Some(g);
                            }
                        }
                        Err(e) => res.note(format!("fio {job:?} run {} failed: {e:#}", r + 1)),
                    }
                }
            }
        }

        if plan.read && have_file {
            check_stop()?;
            match verify_rate(&data) {
                Ok((g, n)) => {
                    println!("decompress+verify       {g:.3} GB/s  ({cpus} threads, {n} chunks, prepared untimed)");
                    res.fig("fs_verify_gbps", g);
                    verify = Some(g);
                }
                Err(e) => res.note(format!("verify rate run {} failed: {e:#}", r + 1)),
            }
            // Buffered (what applications do), then O_DIRECT (no page cache: hi's read
            // path against fio's O_DIRECT reads, like for like), each from cold.
            let limit = fio_seq.zip(verify).map(|(a, b)| f64::min(a, b));
            if let Some(l) = limit {
                res.fig("fs_seq_read_limit_gbps", l);
            }
            let mut buffered = None;
            for (direct, what, name) in [
                (false, "seq read, cold         ", "fs_seq_read_cold"),
                (true, "seq read, cold, O_DIRECT", "fs_seq_read_cold_direct"),
            ] {
                let step = (|| -> Result<Option<f64>> {
                    target.make_cold(&mut res, &mut cold_noted)?;
                    let t0 = Instant::now();
                    let Some(mut f) = open_read(&file, direct)? else {
                        return Ok(None);
                    };
                    let mut buf = AlignedBuf::new(io);
                    let (n, _) = read_to_end(&mut f, &data, buf.buf())?;
                    Ok(Some(n as f64 / t0.elapsed().as_secs_f64() / 1e9))
                })();
                match step {
                    Ok(Some(g)) => {
                        println!("{what} {g:.3} GB/s");
                        res.fig(&format!("{name}_gbps"), g);
                        if !direct {
                            buffered = Some(g);
                        }
                        if let Some(l) = limit {
                            res.fig(&format!("ratio_{name}_vs_limit"), g / l);
                        }
                    }
                    Ok(None) => res.note("the mount refused O_DIRECT: no O_DIRECT seq read".into()),
                    Err(e) => {
                        if STOP.load(Ordering::SeqCst) {
                            return Err(e);
                        }
                        res.note(format!(
                            "cold seq read ({what}) run {} failed: {e:#}",
                            r + 1
                        ));
                    }
                }
            }
            // The page cache's own cold cost on this machine: a local file read the same
            // way (fio's, on the filesystem that holds the node's device).
            if fio_file.is_file() {
                match local_cold_read(&fio_file) {
                    Ok(g) => {
                        println!(
                            "local file, cold        {g:.3} GB/s  (buffered 1 MiB reads of fio's file after drop_caches)"
                        );
                        res.fig("local_seq_read_cold_gbps", g);
                        if let Some(m) = buffered {
                            res.fig("ratio_fs_seq_read_cold_vs_local_buffered", m / g);
                        }
                    }
                    Err(e) => res.note(format!("local cold read run {} failed: {e:#}", r + 1)),
                }
            }
        }

        if plan.random && have_file {
            check_stop()?;
            let threads = a.rand_threads.max(1);
            let report = |res: &mut Results, name: &str, what: &str, rr: &RandRun| {
                let (p50, p99, p999, max) = rr.lat.percentiles();
                println!(
                    "{what:<23} {:.0} IOPS, {:.1} MB/s  ({} reads, {threads} threads, {:.2}s; latency p50 {} p99 {} p99.9 {} max {})",
                    rr.iops(),
                    rr.mbps(),
                    rr.reads,
                    rr.secs,
                    util::fmt_us(p50),
                    util::fmt_us(p99),
                    util::fmt_us(p999),
                    util::fmt_us(max)
                );
                res.fig(&format!("{name}_iops"), rr.iops());
                res.fig(&format!("{name}_mbps"), rr.mbps());
                res.fig(&format!("{name}_p50_us"), p50 as f64);
                res.fig(&format!("{name}_p99_us"), p99 as f64);
                res.fig(&format!("{name}_p999_us"), p999 as f64);
            };
            // Cold.
            let offs = cold_offsets(bytes, a.rand_cold_reads, run_seed ^ 0xc01d);
            let step = (|| -> Result<(RandRun, bool)> {
                target.make_cold(&mut res, &mut cold_noted)?;
                let (f, direct) = match open_read(&file, true)? {
                    Some(f) => (f, true),
                    None => (open_read(&file, false)?.context("open")?, false),
                };
                Ok((
                    rand_reads(&f, &data, Offsets::List(&offs), threads)?,
                    direct,
                ))
            })();
            match step {
                Ok((rr, direct)) => {
                    if !direct {
                        res.note("the mount refused O_DIRECT: cold random reads are buffered (after drop_caches)".into());
                    }
                    report(&mut res, "fs_rand4k_cold", "rand 4K, cold", &rr);
                    if let Some(f) = fio_iops {
                        res.fig("ratio_fs_rand4k_cold_vs_fio64k", rr.iops() / f);
                    }
                }
                Err(e) => {
                    if STOP.load(Ordering::SeqCst) {
                        return Err(e);
                    }
                    res.note(format!("cold random reads run {} failed: {e:#}", r + 1));
                }
            }
            // Warm, page cache: one pass through the same descriptor first.
            check_stop()?;
            let step = (|| -> Result<RandRun> {
                let mut f = File::open(&file)?;
                let (_, secs) = read_to_end(&mut f, &data, &mut vec![0u8; io])?;
                println!(
                    "(warm-up read of the file: {:.3} GB/s, untimed)",
                    bytes as f64 / secs / 1e9
                );
                rand_reads(
                    &f,
                    &data,
                    Offsets::Timed {
                        region: bytes,
                        secs: a.rand_secs,
                        seed: run_seed ^ 0x3a43,
                    },
                    threads,
                )
            })();
            match step {
                Ok(rr) => report(&mut res, "fs_rand4k_warm", "rand 4K, warm", &rr),
                Err(e) => {
                    if STOP.load(Ordering::SeqCst) {
                        return Err(e);
                    }
                    res.note(format!("warm random reads run {} failed: {e:#}", r + 1));
                }
            }
            // Warm, O_DIRECT: served by the mount's own cache.
            check_stop()?;
            let step = (|| -> Result<Option<RandRun>> {
                let Some(f) = open_read(&file, true)? else {
                    return Ok(None);
                };
                let mut buf = AlignedBuf::new(io);
                let mut pos = 0u64;
                while pos < warm_direct {
                    check_stop()?;
                    let b = buf.buf();
                    let n = f.read_at(b, pos)?;
                    if n == 0 {
                        break;
                    }
                    pos += n as u64;
                }
                Ok(Some(rand_reads(
                    &f,
                    &data,
                    Offsets::Timed {
                        region: warm_direct,
                        secs: a.rand_secs,
                        seed: run_seed ^ 0xd1ec,
                    },
                    threads,
                )?))
            })();
            match step {
                Ok(Some(rr)) => report(
                    &mut res,
                    "fs_rand4k_warm_direct",
                    "rand 4K, warm O_DIRECT",
                    &rr,
                ),
                Ok(None) => {}
                Err(e) => {
                    if STOP.load(Ordering::SeqCst) {
                        return Err(e);
                    }
                    res.note(format!(
                        "warm O_DIRECT random reads run {} failed: {e:#}",
                        r + 1
                    ));
                }
            }
        }
        if have_file {
            if let Err(e) = std::fs::remove_file(&file) {
                res.note(format!("removing {}: {e}", file.display()));
            }
        }

        if plan.meta {
            check_stop()?;
            let n = a.meta_files;
            let mut sides: Vec<(&str, PathBuf)> = Vec::new();
            if target.ensure_mounted().is_ok() {
                sides.push(("fs", target.root.join(format!("meta-{}", r + 1))));
            }
            if let Some(e) = &ext4 {
                sides.push(("ext4_dirsync", e.mnt.join(format!("meta-{}", r + 1))));
            }
            let mut got: Vec<(&str, [f64; 4])> = Vec::new();
            for (side, dir) in sides {
                match meta_workload(&dir, n, meta_file_bytes, run_seed ^ 0x3e7a) {
                    Ok(run) => {
                        let [c, s, l, u] = run.ops;
                        got.push((side, [c, s, l, u]));
                        println!(
                            "meta {side:<18} create {c:.0}/s, stat {s:.0}/s, ls -l cold {l:.0}/s, unlink {u:.0}/s  ({n} files of {meta_file_bytes} bytes)"
                        );
                        println!(
                            "     {side:<18} create {}; unlink {}",
                            run.create.describe(),
                            run.unlink.describe()
                        );
                        for (op, lat) in [("create", &run.create), ("unlink", &run.unlink)] {
                            let (p50, p99, p999, _) = lat.percentiles();
                            res.fig(&format!("{side}_{op}_p50_us"), p50 as f64);
                            res.fig(&format!("{side}_{op}_p99_us"), p99 as f64);
                            res.fig(&format!("{side}_{op}_p999_us"), p999 as f64);
                        }
                        res.fig(&format!("{side}_create_ops"), c);
                        res.fig(&format!("{side}_stat_ops"), s);
                        if l.is_finite() {
                            res.fig(&format!("{side}_list_cold_ops"), l);
                        }
                        res.fig(&format!("{side}_unlink_ops"), u);
                    }
                    Err(e) => {
                        if STOP.load(Ordering::SeqCst) {
                            return Err(e);
                        }
                        res.note(format!("meta on {side} run {} failed: {e:#}", r + 1));
                        let _ = std::fs::remove_dir_all(&dir);
                    }
                }
            }
            if let [("fs", x), ("ext4_dirsync", y)] = got[..] {
                for (i, op) in META_OPS.iter().enumerate() {
                    if (x[i] / y[i]).is_finite() {
                        res.fig(&format!("ratio_fs_{op}_vs_ext4_dirsync"), x[i] / y[i]);
                    }
                }
            }
        }
    }

    // Stop everything before the summary (drop order: mount, node, ext4, directories).
    drop(target);
    if let Some(mut sp) = spawned.take() {
        if let Err(e) = sp.hi.stop() {
            res.note(format!("stopping hi: {e:#}"));
        }
        if let Err(e) = sp.node.stop() {
            res.note(format!("stopping the node: {e:#}"));
        }
    }
    drop(ext4);
    println!(
        "\nload average at end: {} (other processes on this machine compete for the same cores)",
        crate::loadavg()
    );
    summary(&res, &plan, o.runs);
    drop(work);
    Ok(())
}

fn summary(res: &Results, plan: &Plan, runs: usize) {
    println!("\n== summary (medians of {runs} run(s); GB/s, MB/s decimal; latency in us; ratio_* are per-run ratios)");
    println!("{:<40} {:>12}   per run", "figure", "median");
    let f = |v: f64| {
        if v.abs() >= 1000.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.4}")
        }
    };
    for (name, v) in &res.figs {
        let runs: Vec<String> = v.iter().map(|x| f(*x)).collect();
        println!(
            "{:<40} {:>12}   [{}]",
            name,
            f(util::median(v)),
            runs.join(", ")
        );
    }
    for n in &res.notes {
        println!("NOTE: {n}");
    }

    println!("\n== machine-readable (medians; a ratio is the median of the per-run ratios)");
    let g = |n: &str| res.med(n);
    let na = |v: Option<f64>| v.map_or("NA".to_string(), f);
    let mut lines: Vec<String> = Vec::new();
    let ratio = |lines: &mut Vec<String>, name: &str| {
        lines.push(format!("ratio {name} {}", na(g(&format!("ratio_{name}")))));
    };
    if plan.write {
        ratio(&mut lines, "fs_seq_write_vs_pipeline");
    }
    if plan.read {
        ratio(&mut lines, "fs_seq_read_cold_vs_limit");
    }
    if plan.random {
        ratio(&mut lines, "fs_rand4k_cold_vs_fio64k");
    }
    if plan.meta {
        for op in META_OPS {
            ratio(&mut lines, &format!("fs_{op}_vs_ext4_dirsync"));
        }
    }
    let mut figs: Vec<&str> = Vec::new();
    if plan.write {
        figs.extend(["fs_seq_write_gbps", "fs_pipeline_gbps"]);
    }
    if plan.read {
        figs.extend([
            "fs_seq_read_cold_gbps",
            "fio_seqread_gbps",
            "fs_verify_gbps",
            "fs_seq_read_limit_gbps",
        ]);
    }
    if plan.random {
        figs.extend([
            "fs_rand4k_warm_iops",
            "fs_rand4k_warm_mbps",
            "fs_rand4k_warm_p50_us",
            "fs_rand4k_warm_p99_us",
            "fs_rand4k_warm_p999_us",
            "fs_rand4k_warm_direct_iops",
            "fs_rand4k_warm_direct_p50_us",
            "fs_rand4k_warm_direct_p99_us",
            "fs_rand4k_cold_iops",
            "fs_rand4k_cold_mbps",
            "fs_rand4k_cold_p50_us",
            "fs_rand4k_cold_p99_us",
            "fs_rand4k_cold_p999_us",
            "fio_randread64k_iops",
            "fio_randread64k_gbps",
        ]);
    }
    if plan.meta {
        for side in ["fs", "ext4_dirsync"] {
            for op in META_OPS {
                lines.push(format!(
                    "figure {side}_{op}_ops_per_s {}",
                    na(g(&format!("{side}_{op}_ops")))
                ));
            }
        }
    }
    for name in figs {
        lines.push(format!("figure {name} {}", na(g(name))));
    }
    for l in &lines {
        println!("{l}");
    }

    println!("\n== acceptance (issue 3: medians of {runs}, same run)");
    let chk = |what: &str, v: Option<f64>, want: Option<f64>| match (v, want) {
        (Some(x), Some(w)) => println!(
            "{what:<44} {:>10} (want >= {w}) {}",
            f(x),
            if x >= w { "PASS" } else { "FAIL" }
        ),
        (Some(x), None) => println!("{what:<44} {:>10} (reported)", f(x)),
        (None, _) => println!("{what:<44} {:>10} (not measured)", "NA"),
    };
    if plan.write {
        chk(
            "seq write+fsync / pipeline",
            g("ratio_fs_seq_write_vs_pipeline"),
            Some(0.7),
        );
    }
    if plan.read {
        chk(
            "seq read cold / min(fio, verify)",
            g("ratio_fs_seq_read_cold_vs_limit"),
            Some(0.7),
        );
        chk(
            "seq read cold O_DIRECT / min(fio, verify)",
            g("ratio_fs_seq_read_cold_direct_vs_limit"),
            None,
        );
        chk(
            "seq read cold / local file cold (buffered)",
            g("ratio_fs_seq_read_cold_vs_local_buffered"),
            None,
        );
    }
    if plan.random {
        chk(
            "rand 4K cold IOPS / fio 64K IOPS",
            g("ratio_fs_rand4k_cold_vs_fio64k"),
            None,
        );
        chk("rand 4K warm IOPS", g("fs_rand4k_warm_iops"), None);
    }
    if plan.meta {
        chk(
            "creates / ext4 dirsync",
            g("ratio_fs_create_vs_ext4_dirsync"),
            Some(0.5),
        );
        chk(
            "stats / ext4 dirsync",
            g("ratio_fs_stat_vs_ext4_dirsync"),
            Some(1.0),
        );
        chk(
            "ls -l cold / ext4 dirsync",
            g("ratio_fs_list_cold_vs_ext4_dirsync"),
            None,
        );
        chk(
            "unlinks / ext4 dirsync",
            g("ratio_fs_unlink_vs_ext4_dirsync"),
            None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cold_reads_never_share_a_chunk() {
        let max = ChunkerConfig::default().max_bytes as u64;
        let len = 64 << 20;
        let mut v = cold_offsets(len, usize::MAX, 7);
        assert_eq!(v.len() as u64, len / (2 * max));
        v.sort_unstable();
        for w in v.windows(2) {
            // Bytes strictly between two reads: more than any chunk can span.
            assert!(w[1] - (w[0] + BLOCK as u64) >= max, "{w:?}");
        }
        assert!(v
            .iter()
            .all(|o| o % BLOCK as u64 == 0 && o + BLOCK as u64 <= len));
    }

    #[test]
    fn mountinfo() {
        assert_eq!(unescape_mountinfo("/tmp/a\\040b"), b"/tmp/a b");
        assert!(is_mount(Path::new("/proc")));
        assert!(!is_fuse_mount(Path::new("/")));
    }
}
