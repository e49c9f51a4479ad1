//! Model-based random operations: every operation runs on the mounted volume (`hi mount`
//! over a real node) AND on a plain local directory (the reference: the kernel's own
//! filesystem), and both must agree exactly.
//!
//! A seeded generator picks operations over a small name space (three levels of
//! directories, eight names per directory, biased towards names that exist): create,
//! pwrite at random offsets (sparse, sometimes past 4 GiB), read, truncate up and down,
//! rename (plain, `RENAME_NOREPLACE`, `RENAME_EXCHANGE`), link, unlink, mkdir, rmdir,
//! symlink, readlink, chmod, utimensat (nanoseconds, `UTIME_NOW`/`UTIME_OMIT`), user
//! xattrs, stat, readdir, and descriptors kept open across operations (`O_APPEND`,
//! `O_TRUNC`, `O_CREAT|O_EXCL`, write/pwrite/read, ftruncate, fsync, close and reopen; a
//! file may stay open after its last name is gone).
//!
//! Compared after every operation: its result (`Ok`, the bytes or names it returned, or
//! the errno, exactly); then for every path it touched (and the parents of names it
//! added or removed) the file type, permission bits, owner, link count, size (not for
//! directories) and content (sparse-aware), symlink targets and directory listings; for
//! descriptors the same through `fstat` and `/proc/self/fd`. Every `HIVE_FS_WALK_EVERY`
//! operations (and at the end) a full tree walk compares everything, xattrs included.
//! Times are not compared (two filesystems, two clocks): `fs_posix` checks them.
//!
//! A mismatch panics with the seed, the operation number, the operation, both results, the
//! operations before it, and the command that replays it.
//!
//! Knobs: `HIVE_FS_SEED` (first seed; default 1), `HIVE_FS_SEEDS` (how many seeds, from
//! the first on; default 5, or 1 when `HIVE_FS_SEED` is given), `HIVE_FS_OPS` (operations
//! per seed, default 20,000: 100,000 in all by default), `HIVE_FS_THREADS` (seeds run at
//! a time, each in its own directory of the same mount; default 2), `HIVE_FS_WALK_EVERY`
//! (default 500), `HIVE_FS_REF_DIR` (where the reference directories go, default
//! /var/tmp: it needs user xattrs, else xattr operations are off, with a note),
//! `HIVE_FS_TRACE=1` (print every operation), `HIVE_FS_TARGET_DIR` (run against a plain
//! directory instead of a mount: checks the test itself). A seed gives the same operations
//! whatever runs beside it.

mod common;

use common::*;
use hivefs_harness::{env_u64, Rng};
use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The names every directory draws from (some awkward on purpose).
const NAMES: [&str; 8] = ["a", "b", "c", "dd", "e f", "ünï", "g.txt", ".h"];
/// Xattr names the generator uses.
const XNAMES: [&str; 4] = ["user.a", "user.bb", "user.c3", "user.some.longer_name"];
/// Path components at most (directories nest `MAX_DEPTH - 1` deep).
const MAX_DEPTH: usize = 4;
/// Descriptors kept open at a time.
const SLOTS: usize = 4;
const GIB: u64 = 1 << 30;

/// Bytes with a short Debug (length, hash, first bytes).
#[derive(Clone, PartialEq, Eq)]
struct Data(Vec<u8>);

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl fmt::Debug for Data {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let head: String = self.0.iter().take(12).map(|b| format!("{b:02x}")).collect();
        write!(
            f,
            "<{} bytes, fnv {:016x}, {head}..>",
            self.0.len(),
            fnv(&self.0)
        )
    }
}

#[derive(Clone, Debug)]
enum Op {
    Create {
        p: String,
        mode: u32,
        excl: bool,
    },
    Mkdir {
        p: String,
        mode: u32,
    },
    Rmdir {
        p: String,
    },
    Unlink {
        p: String,
    },
    Write {
        p: String,
        off: u64,
        data: Data,
    },
    Read {
        p: String,
        off: u64,
        len: usize,
    },
    Truncate {
        p: String,
        size: u64,
    },
    Rename {
        from: String,
        to: String,
        flags: u32,
    },
    Link {
        from: String,
        to: String,
    },
    Symlink {
        target: String,
        p: String,
    },
    Readlink {
        p: String,
    },
    Chmod {
        p: String,
        mode: u32,
    },
    Utimens {
        p: String,
        atime: (i64, i64),
        mtime: (i64, i64),
        nofollow: bool,
    },
    SetXattr {
        p: String,
        name: &'static str,
        value: Data,
        flags: i32,
    },
    GetXattr {
        p: String,
        name: &'static str,
    },
    ListXattr {
        p: String,
    },
    RemoveXattr {
        p: String,
        name: &'static str,
    },
    Stat {
        p: String,
    },
    ReadDir {
        p: String,
    },
    Open {
        slot: usize,
        p: String,
        flags: i32,
        mode: u32,
    },
    /// `off: None` = write(2) at the descriptor's position.
    FdWrite {
        slot: usize,
        off: Option<u64>,
        data: Data,
    },
    FdRead {
        slot: usize,
        off: Option<u64>,
        len: usize,
    },
    FdTruncate {
        slot: usize,
        size: u64,
    },
    Fsync {
        slot: usize,
    },
    Close {
        slot: usize,
    },
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::Create { .. } => "create",
            Op::Mkdir { .. } => "mkdir",
            Op::Rmdir { .. } => "rmdir",
            Op::Unlink { .. } => "unlink",
            Op::Write { .. } => "write",
            Op::Read { .. } => "read",
            Op::Truncate { .. } => "truncate",
            Op::Rename { .. } => "rename",
            Op::Link { .. } => "link",
            Op::Symlink { .. } => "symlink",
            Op::Readlink { .. } => "readlink",
            Op::Chmod { .. } => "chmod",
            Op::Utimens { .. } => "utimens",
            Op::SetXattr { .. } => "setxattr",
            Op::GetXattr { .. } => "getxattr",
            Op::ListXattr { .. } => "listxattr",
            Op::RemoveXattr { .. } => "removexattr",
            Op::Stat { .. } => "stat",
            Op::ReadDir { .. } => "readdir",
            Op::Open { .. } => "open",
            Op::FdWrite { .. } => "fdwrite",
            Op::FdRead { .. } => "fdread",
            Op::FdTruncate { .. } => "ftruncate",
            Op::Fsync { .. } => "fsync",
            Op::Close { .. } => "close",
        }
    }
}

/// What an operation answered.
#[derive(Clone, PartialEq, Eq)]
enum Out {
    Ok,
    Len(usize),
    Bytes(Data),
    Names(Vec<String>),
    Attr(Summary),
    Err(i32),
}

impl fmt::Debug for Out {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Out::Ok => write!(f, "Ok"),
            Out::Len(n) => write!(f, "Ok({n})"),
            Out::Bytes(d) => write!(f, "Ok({d:?})"),
            Out::Names(n) => write!(f, "Ok({n:?})"),
            Out::Attr(s) => write!(f, "Ok({s:?})"),
            Out::Err(e) => write!(f, "Err({})", errname(*e)),
        }
    }
}

/// The attributes compared (not times, not inode numbers, not directory sizes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Summary {
    kind: char,
    mode: u32,
    nlink: u64,
    uid: u32,
    gid: u32,
    /// `None` for directories (their size is the filesystem's business).
    size: Option<u64>,
}

fn kind_of(mode: u32) -> char {
    match mode & libc::S_IFMT {
        libc::S_IFREG => 'f',
        libc::S_IFDIR => 'd',
        libc::S_IFLNK => 'l',
        libc::S_IFIFO => 'p',
        libc::S_IFSOCK => 's',
        libc::S_IFCHR => 'c',
        libc::S_IFBLK => 'b',
        _ => '?',
    }
}

fn summary(st: &libc::stat) -> Summary {
    let kind = kind_of(st.st_mode);
    Summary {
        kind,
        mode: st.st_mode & 0o7777,
        nlink: st.st_nlink,
        uid: st.st_uid,
        gid: st.st_gid,
        size: (kind != 'd').then_some(st.st_size as u64),
    }
}

fn res<T>(r: Result<T, i32>, f: impl FnOnce(T) -> Out) -> Out {
    match r {
        Ok(v) => f(v),
        Err(e) => Out::Err(e),
    }
}

fn ok(r: Result<(), i32>) -> Out {
    res(r, |_| Out::Ok)
}

/// One side: the filesystem under test or the reference.
struct Side {
    root: PathBuf,
    slots: Vec<Option<File>>,
}

fn pwrite(f: &File, data: &[u8], off: u64) -> Result<usize, i32> {
    // SAFETY: a live fd; pointer and length from a slice.
    let r = unsafe {
        libc::pwrite(
            f.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            off as libc::off_t,
        )
    };
    if r < 0 {
        Err(errno())
    } else {
        Ok(r as usize)
    }
}

fn pread(f: &File, len: usize, off: Option<u64>) -> Result<Vec<u8>, i32> {
    let mut buf = vec![0u8; len];
    // SAFETY: a live fd; pointer and length from a Vec.
    let r = unsafe {
        match off {
            Some(o) => libc::pread(
                f.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                len,
                o as libc::off_t,
            ),
            None => libc::read(f.as_raw_fd(), buf.as_mut_ptr().cast(), len),
        }
    };
    if r < 0 {
        return Err(errno());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

fn fd_write(f: &File, data: &[u8], off: Option<u64>) -> Result<usize, i32> {
    match off {
        Some(o) => pwrite(f, data, o),
        None => {
            // SAFETY: a live fd; pointer and length from a slice.
            let r = unsafe { libc::write(f.as_raw_fd(), data.as_ptr().cast(), data.len()) };
            if r < 0 {
                Err(errno())
            } else {
                Ok(r as usize)
            }
        }
    }
}

/// Names in a directory (sorted), each with its type letter: `name/f`.
fn list_dir(p: &Path) -> Result<Vec<String>, i32> {
    let mut out = Vec::new();
    for e in ioe(std::fs::read_dir(p))? {
        let e = ioe(e)?;
        let t = ioe(e.file_type())?;
        let k = if t.is_dir() {
            'd'
        } else if t.is_file() {
            'f'
        } else if t.is_symlink() {
            'l'
        } else {
            '?'
        };
        out.push(format!("{}/{k}", e.file_name().to_string_lossy()));
    }
    out.sort();
    Ok(out)
}

impl Side {
    fn new(root: PathBuf) -> Side {
        Side {
            root,
            slots: (0..SLOTS).map(|_| None).collect(),
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn slot(&self, i: usize) -> &File {
        self.slots[i]
            .as_ref()
            .expect("the generator only uses open slots")
    }

    fn apply(&mut self, op: &Op) -> Out {
        match op {
            Op::Create { p, mode, excl } => {
                let fl = libc::O_CREAT | libc::O_WRONLY | if *excl { libc::O_EXCL } else { 0 };
                res(open(&self.path(p), fl, *mode), |_| Out::Ok)
            }
            Op::Mkdir { p, mode } => ok(mkdir(&self.path(p), *mode)),
            Op::Rmdir { p } => ok(rmdir(&self.path(p))),
            Op::Unlink { p } => ok(unlink(&self.path(p))),
            Op::Write { p, off, data } => res(
                open(&self.path(p), libc::O_WRONLY, 0).and_then(|f| pwrite(&f, &data.0, *off)),
                Out::Len,
            ),
            Op::Read { p, off, len } => res(
                open(&self.path(p), libc::O_RDONLY, 0).and_then(|f| pread(&f, *len, Some(*off))),
                |b| Out::Bytes(Data(b)),
            ),
            Op::Truncate { p, size } => ok(truncate(&self.path(p), *size)),
            Op::Rename { from, to, flags } => ok(rename2(&self.path(from), &self.path(to), *flags)),
            Op::Link { from, to } => ok(link(&self.path(from), &self.path(to))),
            Op::Symlink { target, p } => ok(symlink(target.as_bytes(), &self.path(p))),
            Op::Readlink { p } => res(readlink(&self.path(p)), |t| Out::Bytes(Data(t))),
            Op::Chmod { p, mode } => ok(chmod(&self.path(p), *mode)),
            Op::Utimens {
                p,
                atime,
                mtime,
                nofollow,
            } => ok(utimens(
                &self.path(p),
                ts(atime.0, atime.1),
                ts(mtime.0, mtime.1),
                if *nofollow {
                    libc::AT_SYMLINK_NOFOLLOW
                } else {
                    0
                },
            )),
            Op::SetXattr {
                p,
                name,
                value,
                flags,
            } => ok(setxattr(&self.path(p), name, &value.0, *flags)),
            Op::GetXattr { p, name } => res(getxattr(&self.path(p), name), |v| Out::Bytes(Data(v))),
            Op::ListXattr { p } => res(listxattr(&self.path(p)), Out::Names),
            Op::RemoveXattr { p, name } => ok(removexattr(&self.path(p), name)),
            Op::Stat { p } => res(stat(&self.path(p)), |st| Out::Attr(summary(&st))),
            Op::ReadDir { p } => res(list_dir(&self.path(p)), Out::Names),
            Op::Open {
                slot,
                p,
                flags,
                mode,
            } => {
                self.slots[*slot] = None;
                match open(&self.path(p), *flags, *mode) {
                    Ok(f) => {
                        self.slots[*slot] = Some(f);
                        Out::Ok
                    }
                    Err(e) => Out::Err(e),
                }
            }
            Op::FdWrite { slot, off, data } => {
                res(fd_write(self.slot(*slot), &data.0, *off), Out::Len)
            }
            Op::FdRead { slot, off, len } => {
                res(pread(self.slot(*slot), *len, *off), |b| Out::Bytes(Data(b)))
            }
            Op::FdTruncate { slot, size } => ok(ioe(self.slot(*slot).set_len(*size))),
            Op::Fsync { slot } => ok(ioe(self.slot(*slot).sync_all())),
            Op::Close { slot } => {
                self.slots[*slot] = None;
                Out::Ok
            }
        }
    }
}

/// The generator: a seeded RNG and a view of the reference tree (to favour names that
/// exist).
struct Gen {
    rng: Rng,
    rename_noreplace: bool,
    rename_exchange: bool,
    xattrs: bool,
}

impl Gen {
    fn pct(&mut self, p: u64) -> bool {
        self.rng.below(100) < p
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.rng.below(items.len() as u64) as usize]
    }

    /// A path: a random walk from the root, taking an existing entry `existing`% of the
    /// time (else one of [`NAMES`]), descending into directories now and then.
    fn path(&mut self, reference: &Path, existing: u64) -> String {
        let mut rel = String::new();
        for depth in 1..=MAX_DEPTH {
            let mut names: Vec<String> = std::fs::read_dir(reference.join(&rel))
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            names.sort();
            let name = if !names.is_empty() && self.pct(existing) {
                names[self.rng.below(names.len() as u64) as usize].clone()
            } else {
                self.pick(&NAMES).to_string()
            };
            let child = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let is_dir =
                std::fs::symlink_metadata(reference.join(&child)).is_ok_and(|m| m.is_dir());
            if depth < MAX_DEPTH && is_dir && self.pct(55) {
                rel = child;
                continue;
            }
            return child;
        }
        unreachable!()
    }

    /// A directory to list or stat: sometimes the root itself.
    fn dir_path(&mut self, reference: &Path) -> String {
        if self.pct(15) {
            return String::new();
        }
        self.path(reference, 85)
    }

    fn offset(&mut self, size_hint: u64) -> u64 {
        match self.rng.below(100) {
            0..=59 => self.rng.below(64 * 1024),
            60..=84 => size_hint.saturating_sub(self.rng.below(4096)) + self.rng.below(2048),
            85..=96 => self.rng.below(16 << 20),
            _ => 4 * GIB - 4096 + self.rng.below(2 * GIB),
        }
    }

    fn len(&mut self) -> usize {
        match self.rng.below(100) {
            0..=79 => self.rng.range(1, 512) as usize,
            80..=95 => self.rng.range(512, 8192) as usize,
            _ => self.rng.range(8192, 65536) as usize,
        }
    }

    fn data(&mut self) -> Data {
        let n = self.len();
        Data(self.rng.bytes(n))
    }

    fn mode(&mut self) -> u32 {
        if self.pct(75) {
            self.pick(&[0o644, 0o600, 0o755, 0o700, 0o444, 0o000, 0o777, 0o640])
        } else {
            self.rng.below(0o10000) as u32
        }
    }

    fn time(&mut self) -> (i64, i64) {
        match self.rng.below(100) {
            0..=9 => (0, libc::UTIME_NOW),
            10..=19 => (0, libc::UTIME_OMIT),
            20..=21 => (5, 1_000_000_000),
            _ => (
                self.rng.below(1 << 32) as i64,
                self.rng.below(1_000_000_000) as i64,
            ),
        }
    }

    fn size_of(reference: &Path, rel: &str) -> u64 {
        std::fs::metadata(reference.join(rel))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    fn op(&mut self, reference: &Side) -> Op {
        let r = &reference.root;
        let open_slots: Vec<usize> = (0..SLOTS)
            .filter(|i| reference.slots[*i].is_some())
            .collect();
        loop {
            let k = self.rng.below(1000);
            let op = match k {
                0..=79 => Op::Create {
                    p: self.path(r, 40),
                    mode: self.mode(),
                    excl: self.pct(30),
                },
                80..=139 => Op::Mkdir {
                    p: self.path(r, 30),
                    mode: self.mode() | if self.pct(80) { 0o700 } else { 0 },
                },
                140..=169 => Op::Rmdir {
                    p: self.path(r, 80),
                },
                170..=209 => Op::Unlink {
                    p: self.path(r, 80),
                },
                210..=329 => {
                    let p = self.path(r, 85);
                    let off = self.offset(Self::size_of(r, &p));
                    Op::Write {
                        p,
                        off,
                        data: self.data(),
                    }
                }
                330..=389 => {
                    let p = self.path(r, 85);
                    let off = self.offset(Self::size_of(r, &p));
                    Op::Read {
                        p,
                        off,
                        len: self.len(),
                    }
                }
                390..=429 => {
                    let p = self.path(r, 85);
                    let size = match self.rng.below(10) {
                        0..=3 => Self::size_of(r, &p) / 2,
                        4..=6 => self.rng.below(128 * 1024),
                        7..=8 => Self::size_of(r, &p) + self.rng.below(256 * 1024),
                        _ => self.offset(0),
                    };
                    Op::Truncate { p, size }
                }
                430..=509 => {
                    let flags = match self.rng.below(10) {
                        0..=1 if self.rename_noreplace => libc::RENAME_NOREPLACE,
                        2 if self.rename_exchange => libc::RENAME_EXCHANGE,
                        _ => 0,
                    };
                    Op::Rename {
                        from: self.path(r, 85),
                        to: self.path(r, 50),
                        flags,
                    }
                }
                510..=539 => Op::Link {
                    from: self.path(r, 85),
                    to: self.path(r, 30),
                },
                540..=569 => {
                    let target = if self.pct(5) {
                        "x/".repeat(100)
                    } else {
                        let n = self.rng.range(1, 3);
                        (0..n)
                            .map(|_| self.pick(&NAMES))
                            .collect::<Vec<_>>()
                            .join("/")
                    };
                    Op::Symlink {
                        target,
                        p: self.path(r, 30),
                    }
                }
                570..=589 => Op::Readlink {
                    p: self.path(r, 85),
                },
                590..=619 => Op::Chmod {
                    p: self.path(r, 85),
                    mode: self.mode(),
                },
                620..=639 => Op::Utimens {
                    p: self.path(r, 85),
                    atime: self.time(),
                    mtime: self.time(),
                    nofollow: self.pct(20),
                },
                640..=719 if self.xattrs => {
                    let p = self.path(r, 85);
                    let name = self.pick(&XNAMES);
                    match k {
                        640..=679 => {
                            let n = self.rng.below(65) as usize;
                            Op::SetXattr {
                                p,
                                name,
                                value: Data(self.rng.bytes(n)),
                                flags: self.pick(&[0, 0, libc::XATTR_CREATE, libc::XATTR_REPLACE]),
                            }
                        }
                        680..=699 => Op::GetXattr { p, name },
                        700..=709 => Op::ListXattr { p },
                        _ => Op::RemoveXattr { p, name },
                    }
                }
                720..=749 => Op::Stat {
                    p: self.dir_path(r),
                },
                750..=779 => Op::ReadDir {
                    p: self.dir_path(r),
                },
                780..=849 => {
                    let acc =
                        self.pick(&[libc::O_RDONLY, libc::O_WRONLY, libc::O_RDWR, libc::O_RDWR]);
                    let mut flags = acc;
                    if self.pct(25) {
                        flags |= libc::O_APPEND;
                    }
                    if self.pct(15) {
                        flags |= libc::O_TRUNC;
                    }
                    if self.pct(40) {
                        flags |= libc::O_CREAT;
                        if self.pct(20) {
                            flags |= libc::O_EXCL;
                        }
                    }
                    if self.pct(4) {
                        flags |= libc::O_NOFOLLOW;
                    }
                    Op::Open {
                        slot: self.rng.below(SLOTS as u64) as usize,
                        p: self.path(r, 80),
                        flags,
                        mode: self.mode(),
                    }
                }
                _ if open_slots.is_empty() => continue,
                850..=929 => {
                    let slot = self.pick(&open_slots);
                    let size = reference
                        .slot(slot)
                        .metadata()
                        .map(|m| m.len())
                        .unwrap_or(0);
                    let off = if self.pct(40) {
                        None
                    } else {
                        Some(self.offset(size))
                    };
                    Op::FdWrite {
                        slot,
                        off,
                        data: self.data(),
                    }
                }
                930..=959 => {
                    let slot = self.pick(&open_slots);
                    let size = reference
                        .slot(slot)
                        .metadata()
                        .map(|m| m.len())
                        .unwrap_or(0);
                    let off = if self.pct(40) {
                        None
                    } else {
                        Some(self.offset(size))
                    };
                    Op::FdRead {
                        slot,
                        off,
                        len: self.len(),
                    }
                }
                960..=969 => {
                    let slot = self.pick(&open_slots);
                    let size = reference
                        .slot(slot)
                        .metadata()
                        .map(|m| m.len())
                        .unwrap_or(0);
                    let size = if self.pct(50) {
                        size / 2
                    } else {
                        size + self.rng.below(100_000)
                    };
                    Op::FdTruncate { slot, size }
                }
                970..=979 => Op::Fsync {
                    slot: self.pick(&open_slots),
                },
                _ => Op::Close {
                    slot: self.pick(&open_slots),
                },
            };
            return op;
        }
    }
}

/// Data regions of an open file: SEEK_DATA/SEEK_HOLE pairs (None if unsupported).
fn data_map(f: &File, size: u64) -> Option<Vec<(u64, u64)>> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut off = 0u64;
    while off < size {
        // SAFETY: lseek on a live fd.
        let d = unsafe { libc::lseek(fd, off as libc::off_t, libc::SEEK_DATA) };
        if d < 0 {
            return match errno() {
                libc::ENXIO => Some(out),
                _ => None,
            };
        }
        // SAFETY: as above.
        let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
        if h < 0 {
            return None;
        }
        let (d, h) = (d as u64, (h as u64).min(size));
        if h <= d {
            break;
        }
        out.push((d, h));
        off = h;
    }
    Some(out)
}

/// Ranges to compare for a file of `size` bytes: the data regions either side knows of,
/// the first and last 4 KiB, and samples inside the holes; merged and clipped.
fn ranges_to_compare(size: u64, maps: &[Vec<(u64, u64)>]) -> Vec<(u64, u64)> {
    let mut r: Vec<(u64, u64)> = maps.iter().flatten().copied().collect();
    r.push((0, 4096));
    r.push((size.saturating_sub(4096), size));
    r.sort();
    // Samples in the holes between regions (start, middle, end of each; at most 16 holes).
    let mut holes = Vec::new();
    let mut end = 0u64;
    for &(a, b) in &r {
        if a > end {
            holes.push((end, a));
        }
        end = end.max(b);
    }
    if end < size {
        holes.push((end, size));
    }
    for &(a, b) in holes.iter().take(16) {
        let mid = a + (b - a) / 2;
        r.push((a, (a + 512).min(b)));
        r.push((mid, (mid + 512).min(b)));
        r.push((b.saturating_sub(512).max(a), b));
    }
    r.sort();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (a, b) in r {
        let (a, b) = (a.min(size), b.min(size));
        if a >= b {
            continue;
        }
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    merged
}

/// Compare two open regular files' contents (both `size` bytes). `Err(description)`.
fn compare_contents(a: &File, b: &File, size: u64) -> Result<(), String> {
    let mut maps = Vec::new();
    if let Some(m) = data_map(b, size) {
        maps.push(m);
    }
    if let Some(m) = data_map(a, size) {
        // A filesystem without SEEK_DATA reports all of it as data (one region): use its
        // map when it shows holes, or when it is small.
        let data: u64 = m.iter().map(|(x, y)| y - x).sum();
        if data <= 1 << 20 || (data < size && data <= 64 << 20) {
            maps.push(m);
        }
    }
    if maps.is_empty() && size > 64 << 20 {
        return Err(format!("no data map for a {size}-byte file"));
    }
    if maps.is_empty() {
        maps.push(vec![(0, size)]);
    }
    for (start, end) in ranges_to_compare(size, &maps) {
        let mut off = start;
        while off < end {
            let n = ((end - off) as usize).min(1 << 20);
            let x = pread(a, n, Some(off)).map_err(|e| format!("read at {off}: {}", errname(e)))?;
            let y = pread(b, n, Some(off))
                .map_err(|e| format!("reference read at {off}: {}", errname(e)))?;
            if x != y {
                let i = x
                    .iter()
                    .zip(&y)
                    .position(|(p, q)| p != q)
                    .unwrap_or(x.len().min(y.len()));
                return Err(format!(
                    "contents differ at byte {} (read {} vs {} bytes at {off}): {:?} vs {:?}",
                    off + i as u64,
                    x.len(),
                    y.len(),
                    x.get(i..(i + 16).min(x.len())),
                    y.get(i..(i + 16).min(y.len())),
                ));
            }
            off += n as u64;
        }
    }
    Ok(())
}

/// Everything compared about one path (lstat, content, symlink target, listing, and
/// with `xattrs` the xattrs).
fn compare_path(sub: &Path, reference: &Path, xattrs: bool, user_only: bool) -> Result<(), String> {
    let (sa, sb) = (lstat(sub), lstat(reference));
    let (sa, sb) = match (sa, sb) {
        (Err(x), Err(y)) if x == y => return Ok(()),
        (Ok(a), Ok(b)) => (a, b),
        (a, b) => {
            return Err(format!(
                "lstat: {:?} vs reference {:?}",
                a.map(|s| summary(&s)).map_err(errname),
                b.map(|s| summary(&s)).map_err(errname)
            ))
        }
    };
    let (ma, mb) = (summary(&sa), summary(&sb));
    if ma != mb {
        return Err(format!("attributes {ma:?} vs reference {mb:?}"));
    }
    match ma.kind {
        'f' => {
            let fa = open(sub, libc::O_RDONLY | libc::O_NOFOLLOW, 0)
                .map_err(|e| format!("open: {}", errname(e)))?;
            let fb = open(reference, libc::O_RDONLY | libc::O_NOFOLLOW, 0)
                .map_err(|e| format!("reference open: {}", errname(e)))?;
            compare_contents(&fa, &fb, mb.size.unwrap_or(0))?;
        }
        'l' => {
            let (ta, tb) = (readlink(sub), readlink(reference));
            if ta != tb {
                return Err(format!(
                    "symlink target {:?} vs reference {:?}",
                    ta.map(|t| String::from_utf8_lossy(&t).into_owned()),
                    tb.map(|t| String::from_utf8_lossy(&t).into_owned())
                ));
            }
        }
        'd' => {
            let (la, lb) = (list_dir(sub), list_dir(reference));
            if la != lb {
                return Err(format!("listing {la:?} vs reference {lb:?}"));
            }
        }
        _ => {}
    }
    if xattrs && (ma.kind == 'f' || ma.kind == 'd') {
        let filt = |r: Result<Vec<String>, i32>| {
            r.map(|v| {
                v.into_iter()
                    .filter(|n| !user_only || n.starts_with("user."))
                    .collect::<Vec<_>>()
            })
        };
        let (xa, xb) = (filt(listxattr(sub)), filt(listxattr(reference)));
        if xa != xb {
            return Err(format!("xattr names {xa:?} vs reference {xb:?}"));
        }
        for name in xb.unwrap_or_default() {
            let (va, vb) = (getxattr(sub, &name), getxattr(reference, &name));
            if va != vb {
                return Err(format!(
                    "xattr {name}: {:?} vs reference {:?}",
                    va.map(Data),
                    vb.map(Data)
                ));
            }
        }
    }
    Ok(())
}

/// Compare an open descriptor pair: fstat, and the content through `/proc/self/fd`.
fn compare_fd(a: &File, b: &File) -> Result<(), String> {
    let (sa, sb) = (fstat(a), fstat(b));
    let (sa, sb) = match (sa, sb) {
        (Ok(x), Ok(y)) => (x, y),
        (x, y) => {
            return Err(format!(
                "fstat {:?} vs reference {:?}",
                x.map(|s| summary(&s)).map_err(errname),
                y.map(|s| summary(&s)).map_err(errname)
            ))
        }
    };
    let (ma, mb) = (summary(&sa), summary(&sb));
    if ma != mb {
        return Err(format!("fstat {ma:?} vs reference {mb:?}"));
    }
    if ma.kind == 'f' {
        let reopen = |f: &File| {
            open(
                Path::new(&format!("/proc/self/fd/{}", f.as_raw_fd())),
                libc::O_RDONLY,
                0,
            )
        };
        let ra =
            reopen(a).map_err(|e| format!("reopening through /proc/self/fd: {}", errname(e)))?;
        let rb = reopen(b).map_err(|e| format!("reference reopen: {}", errname(e)))?;
        compare_contents(&ra, &rb, mb.size.unwrap_or(0))?;
    }
    Ok(())
}

fn parent(rel: &str) -> String {
    match rel.rfind('/') {
        Some(i) => rel[..i].to_string(),
        None => String::new(),
    }
}

/// Paths to compare after `op`, and the descriptor slot it used.
fn touched(op: &Op) -> (Vec<String>, Option<usize>) {
    let with_parent = |p: &str| vec![p.to_string(), parent(p)];
    match op {
        Op::Create { p, .. } | Op::Mkdir { p, .. } | Op::Rmdir { p } | Op::Unlink { p } => {
            (with_parent(p), None)
        }
        Op::Symlink { p, .. } => (with_parent(p), None),
        Op::Rename { from, to, .. } | Op::Link { from, to } => {
            let mut v = with_parent(from);
            v.extend(with_parent(to));
            (v, None)
        }
        Op::Write { p, .. }
        | Op::Read { p, .. }
        | Op::Truncate { p, .. }
        | Op::Readlink { p }
        | Op::Chmod { p, .. }
        | Op::Utimens { p, .. }
        | Op::SetXattr { p, .. }
        | Op::GetXattr { p, .. }
        | Op::ListXattr { p }
        | Op::RemoveXattr { p, .. }
        | Op::Stat { p }
        | Op::ReadDir { p } => (vec![p.clone()], None),
        Op::Open { slot, p, .. } => (with_parent(p), Some(*slot)),
        Op::FdWrite { slot, .. }
        | Op::FdRead { slot, .. }
        | Op::FdTruncate { slot, .. }
        | Op::Fsync { slot }
        | Op::Close { slot } => (vec![], Some(*slot)),
    }
}

/// Walk the whole reference tree and compare everything (xattrs included).
fn walk(sub: &Side, reference: &Side, xattrs: bool, user_only: bool) -> Result<usize, String> {
    let mut stack = vec![String::new()];
    let mut n = 0;
    while let Some(rel) = stack.pop() {
        compare_path(&sub.path(&rel), &reference.path(&rel), xattrs, user_only)
            .map_err(|e| format!("{rel:?}: {e}"))?;
        n += 1;
        if let Ok(rd) = std::fs::read_dir(reference.path(&rel)) {
            let mut names: Vec<(String, bool)> = rd
                .filter_map(|e| e.ok())
                .map(|e| {
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        e.file_type().is_ok_and(|t| t.is_dir()),
                    )
                })
                .collect();
            names.sort();
            for (name, is_dir) in names {
                let child = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                if is_dir {
                    stack.push(child);
                } else {
                    compare_path(
                        &sub.path(&child),
                        &reference.path(&child),
                        xattrs,
                        user_only,
                    )
                    .map_err(|e| format!("{child:?}: {e}"))?;
                    n += 1;
                }
            }
        }
    }
    for i in 0..SLOTS {
        if let (Some(a), Some(b)) = (&sub.slots[i], &reference.slots[i]) {
            compare_fd(a, b).map_err(|e| format!("slot {i}: {e}"))?;
        }
    }
    Ok(n)
}

/// Does `flags` work for renameat2 in `dir`? (EINVAL/ENOSYS: not supported.)
fn rename_supported(dir: &Path, flags: u32) -> bool {
    let (a, b) = (dir.join("probe-a"), dir.join("probe-b"));
    std::fs::write(&a, b"a").unwrap();
    std::fs::write(&b, b"b").unwrap();
    let r = match flags {
        libc::RENAME_NOREPLACE => rename2(&a, &dir.join("probe-c"), flags),
        _ => rename2(&a, &b, flags),
    };
    for p in ["probe-a", "probe-b", "probe-c"] {
        let _ = std::fs::remove_file(dir.join(p));
    }
    !matches!(r, Err(libc::EINVAL) | Err(libc::ENOSYS))
}

/// Removes the reference directory when dropped (also on a panic), unless
/// `HIVE_KEEP_DIRS` is set.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if std::env::var_os("HIVE_KEEP_DIRS").is_some() {
            eprintln!("keeping {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Shared with the watchdog: what runs now, since when.
struct Progress {
    what: String,
    since: Instant,
    warned: bool,
}

/// Run `ops` operations of `seed` in `sub_root` (the filesystem under test) against a
/// fresh reference directory. Returns the operations per second.
fn run_seed(
    seed: u64,
    ops: u64,
    walk_every: u64,
    sub_root: &Path,
    progress: &Mutex<Progress>,
    abort: &AtomicBool,
) -> f64 {
    let ref_base = std::env::var_os("HIVE_FS_REF_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/tmp".into());
    let ref_root = ref_base.join(format!("hivefs-model-ref-{}-{seed}", std::process::id()));
    if ref_root.exists() {
        std::fs::remove_dir_all(&ref_root).unwrap();
    }
    std::fs::create_dir_all(&ref_root).unwrap();
    let _cleanup = RemoveOnDrop(ref_root.clone());
    let sub_dir = sub_root.join(format!("seed-{seed}"));
    if sub_dir.exists() {
        std::fs::remove_dir_all(&sub_dir).unwrap();
    }
    mkdir(&sub_dir, 0o755).unwrap();
    chmod(&ref_root, 0o755).unwrap();

    // What the reference supports.
    let probe = ref_root.join("probe-x");
    std::fs::write(&probe, b"").unwrap();
    let xattrs = match setxattr(&probe, "user.probe", b"1", 0) {
        Ok(()) => true,
        Err(e) => {
            println!(
                "NOTE: the reference directory {} has no user xattrs ({}): xattr operations are off",
                ref_root.display(),
                errname(e)
            );
            false
        }
    };
    let _ = removexattr(&probe, "user.probe");
    let user_only = listxattr(&probe).map(|v| !v.is_empty()).unwrap_or(true);
    std::fs::remove_file(&probe).unwrap();
    let mut gen = Gen {
        rng: Rng::new(seed),
        rename_noreplace: true,
        rename_exchange: true,
        xattrs,
    };
    for (flag, name) in [
        (libc::RENAME_NOREPLACE, "RENAME_NOREPLACE"),
        (libc::RENAME_EXCHANGE, "RENAME_EXCHANGE"),
    ] {
        let on = rename_supported(&sub_dir, flag) && rename_supported(&ref_root, flag);
        if !on {
            println!("NOTE: renameat2 {name} is not supported here: not generated");
        }
        if flag == libc::RENAME_NOREPLACE {
            gen.rename_noreplace = on;
        } else {
            gen.rename_exchange = on;
        }
    }

    let mut sub = Side::new(sub_dir.clone());
    let mut reference = Side::new(ref_root.clone());
    let mut history: VecDeque<String> = VecDeque::new();
    // Which operation opened each descriptor slot (for the failure report).
    let mut opened: Vec<Option<String>> = vec![None; SLOTS];
    let trace = std::env::var_os("HIVE_FS_TRACE").is_some();
    let fail = |n: u64,
                op: &str,
                detail: String,
                history: &VecDeque<String>,
                opened: &[Option<String>]|
     -> ! {
        let slots: Vec<String> = opened
            .iter()
            .enumerate()
            .filter_map(|(i, o)| o.as_ref().map(|o| format!("slot {i}: {o}")))
            .collect();
        panic!(
            "MISMATCH: seed {seed}, op #{n}: {op}\n  {detail}\n\
             open descriptors:\n    {}\n\
             previous ops (newest last):\n    {}\n\
             replay: HIVE_FS_SEED={seed} HIVE_FS_SEEDS=1 HIVE_FS_OPS={} cargo test -p hivefs-harness --test fs_model\n\
             (filesystem under test: {}, reference: {}; HIVE_KEEP_DIRS=1 keeps them)",
            slots.join("\n    "),
            history.iter().cloned().collect::<Vec<_>>().join("\n    "),
            n + 1,
            sub_dir.display(),
            ref_root.display()
        )
    };
    let t0 = Instant::now();
    let (mut t_apply, mut t_checks, mut t_walks) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let mut counts = std::collections::BTreeMap::<&'static str, (u64, u64)>::new();
    for n in 0..ops {
        if abort.load(Ordering::SeqCst) {
            println!("seed {seed}: stopped at op #{n} (another seed failed)");
            return 0.0;
        }
        let op = gen.op(&reference);
        let op_s = format!("{op:?}");
        {
            let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
            p.what = format!("seed {seed}, op #{n}: {op_s}");
            p.since = Instant::now();
            p.warned = false;
        }
        let t_op = Instant::now();
        let want = reference.apply(&op);
        let got = sub.apply(&op);
        t_apply += t_op.elapsed();
        let t_check = Instant::now();
        let name = op.name();
        let c = counts.entry(name).or_default();
        c.0 += 1;
        if !matches!(want, Out::Err(_)) {
            c.1 += 1;
        }
        if got != want {
            fail(
                n,
                &op_s,
                format!("result {got:?}\n  reference {want:?}"),
                &history,
                &opened,
            );
        }
        if trace {
            println!("#{n}: {op_s} -> {want:?}");
        }
        match &op {
            Op::Open { slot, .. } => {
                opened[*slot] = (want == Out::Ok).then(|| format!("#{n}: {op_s}"));
            }
            Op::Close { slot } => opened[*slot] = None,
            _ => {}
        }
        history.push_back(format!("#{n}: {op_s} -> {want:?}"));
        if history.len() > 12 {
            history.pop_front();
        }
        let (paths, slot) = touched(&op);
        let xattr_op = matches!(op, Op::SetXattr { .. } | Op::RemoveXattr { .. });
        for rel in paths {
            if let Err(e) =
                compare_path(&sub.path(&rel), &reference.path(&rel), xattr_op, user_only)
            {
                fail(
                    n,
                    &op_s,
                    format!("after it, {rel:?}: {e}"),
                    &history,
                    &opened,
                );
            }
        }
        if let Some(i) = slot {
            if let (Some(a), Some(b)) = (&sub.slots[i], &reference.slots[i]) {
                if let Err(e) = compare_fd(a, b) {
                    fail(
                        n,
                        &op_s,
                        format!("after it, descriptor slot {i}: {e}"),
                        &history,
                        &opened,
                    );
                }
            }
        }
        t_checks += t_check.elapsed();
        if (n + 1) % walk_every == 0 {
            let t_walk = Instant::now();
            if let Err(e) = walk(&sub, &reference, xattrs, user_only) {
                fail(
                    n,
                    &op_s,
                    format!("tree walk after it: {e}"),
                    &history,
                    &opened,
                );
            }
            t_walks += t_walk.elapsed();
        }
    }
    let entries = walk(&sub, &reference, xattrs, user_only)
        .unwrap_or_else(|e| fail(ops, "(final walk)", e, &history, &opened));
    let secs = t0.elapsed().as_secs_f64();
    let rate = ops as f64 / secs;
    let summary: Vec<String> = counts
        .iter()
        .map(|(k, (all, okn))| format!("{k} {okn}/{all}"))
        .collect();
    println!(
        "seed {seed}: {ops} ops in {secs:.1} s ({rate:.0} ops/s; operations {:.1} s, checks {:.1} s, \
         walks {:.1} s), {entries} entries at the end; succeeded/generated: {}",
        t_apply.as_secs_f64(),
        t_checks.as_secs_f64(),
        t_walks.as_secs_f64(),
        summary.join(", ")
    );
    // Clean up: close, remove both trees (the removal runs through the mount too).
    drop(sub);
    drop(reference);
    std::fs::remove_dir_all(&sub_dir)
        .unwrap_or_else(|e| panic!("removing {}: {e}", sub_dir.display()));
    assert_eq!(lstat(&sub_dir).err(), Some(libc::ENOENT));
    rate
}

/// Sets the flag when dropped during a panic (stops the other workers).
struct AbortOnPanic<'a>(&'a AtomicBool);

impl Drop for AbortOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

#[test]
fn random_ops_match_local_fs() {
    let Some(fx) = Fx::new("fs-model") else {
        return;
    };
    // Fixed umask: the created modes depend on it, on both sides alike.
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(0o022) };
    let first = env_u64("HIVE_FS_SEED", 1);
    // A seed given alone is a replay: just that seed.
    let seeds_default = if std::env::var_os("HIVE_FS_SEED").is_some() {
        1
    } else {
        5
    };
    let seeds = env_u64("HIVE_FS_SEEDS", seeds_default).max(1);
    let ops = env_u64("HIVE_FS_OPS", 20_000);
    let walk_every = env_u64("HIVE_FS_WALK_EVERY", 500).max(1);
    let threads = env_u64("HIVE_FS_THREADS", 2).clamp(1, seeds.max(1));
    println!(
        "model test on {} ({}): seeds {first}..={}, {ops} ops each, walk every {walk_every}, \
         {threads} seeds at a time",
        fx.root().display(),
        if fx.is_local() {
            "local directory"
        } else {
            "hi mount"
        },
        first + seeds - 1
    );
    let progress: Vec<Mutex<Progress>> = (0..threads)
        .map(|_| {
            Mutex::new(Progress {
                what: "starting".into(),
                since: Instant::now(),
                warned: false,
            })
        })
        .collect();
    let done = AtomicBool::new(false);
    let abort = AtomicBool::new(false);
    let t0 = Instant::now();
    let root = fx.root();
    std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(250));
                for p in &progress {
                    let mut p = p.lock().unwrap_or_else(|e| e.into_inner());
                    if !p.warned && p.since.elapsed() > Duration::from_secs(60) {
                        p.warned = true;
                        eprintln!("WATCHDOG: stuck for {:?} in {}", p.since.elapsed(), p.what);
                    }
                }
            }
        });
        let workers: Vec<_> = (0..threads)
            .map(|w| {
                let (progress, abort) = (&progress[w as usize], &abort);
                s.spawn(move || {
                    let _guard = AbortOnPanic(abort);
                    let mut seed = first + w;
                    while seed < first + seeds && !abort.load(Ordering::SeqCst) {
                        run_seed(seed, ops, walk_every, root, progress, abort);
                        seed += threads;
                    }
                })
            })
            .collect();
        let results: Vec<_> = workers.into_iter().map(|h| h.join()).collect();
        done.store(true, Ordering::SeqCst);
        for r in results {
            if let Err(p) = r {
                std::panic::resume_unwind(p);
            }
        }
    });
    let total = ops * seeds;
    println!(
        "{total} ops over {seeds} seeds in {:.1} s ({:.0} ops/s)",
        t0.elapsed().as_secs_f64(),
        total as f64 / t0.elapsed().as_secs_f64()
    );
}
