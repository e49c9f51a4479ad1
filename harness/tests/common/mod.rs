//! Shared by the filesystem tests (`fs_posix`, `fs_model`): where the filesystem under test
//! lives ([`Fx`]: a FUSE mount of a fresh node's volume, or a plain local directory when
//! `HIVE_FS_TARGET_DIR` is set) and thin libc wrappers that answer `Err(errno)`.
#![allow(dead_code)]

use hivefs_harness::mount::{fuse_unavailable, skip, TestMount};
use hivefs_harness::{NodeOptions, TestNode};
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The volume every fixture mounts.
pub const VOLUME: &str = "fstest";

/// The filesystem under test. Field order matters: the mounts drop (unmount) before the
/// node does.
pub struct Fx {
    name: String,
    mounts: Vec<TestMount>,
    node: Option<TestNode>,
    /// Local mode (`HIVE_FS_TARGET_DIR`): the directory standing in for the mount.
    local: Option<PathBuf>,
}

impl Fx {
    /// A fresh node with volume [`VOLUME`] mounted, or with `HIVE_FS_TARGET_DIR=DIR` a
    /// fresh directory `DIR/<name>-<pid>` (no node, no `hi`). `None` (after printing
    /// `SKIP: ...`) when FUSE cannot work here.
    pub fn new(name: &str) -> Option<Fx> {
        if let Some(base) = std::env::var_os("HIVE_FS_TARGET_DIR") {
            let dir = PathBuf::from(base).join(format!("{name}-{}", std::process::id()));
            if dir.exists() {
                std::fs::remove_dir_all(&dir).expect("removing a stale local target");
            }
            std::fs::create_dir_all(&dir).expect("creating the local target");
            return Some(Fx {
                name: name.into(),
                mounts: Vec::new(),
                node: None,
                local: Some(dir),
            });
        }
        if let Some(why) = fuse_unavailable() {
            skip(&format!("{name}: {why}"));
            return None;
        }
        let node = TestNode::start(NodeOptions::default().name(name));
        let Some(m) = TestMount::start_or_skip(&node, VOLUME) else {
            skip(&format!("{name}: see the reason above"));
            return None;
        };
        Some(Fx {
            name: name.into(),
            mounts: vec![m],
            node: Some(node),
            local: None,
        })
    }

    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }

    /// Where the filesystem under test is (the first mount).
    pub fn root(&self) -> &Path {
        match &self.local {
            Some(d) => d,
            None => self.mounts[0].path(),
        }
    }

    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.root().join(rel)
    }

    /// Mount the same volume a second time (another `hi` process) and return its path. In
    /// local mode: the same directory.
    pub fn second_mount(&mut self) -> PathBuf {
        match &self.local {
            Some(d) => d.clone(),
            None => {
                let m = TestMount::start(self.node.as_ref().unwrap(), VOLUME);
                let p = m.path().to_path_buf();
                self.mounts.push(m);
                p
            }
        }
    }

    /// Unmount the first mount (drop its `TestMount`) and mount the volume afresh on a new
    /// directory, which becomes [`Fx::root`]. No-op in local mode.
    pub fn remount_fresh(&mut self) {
        if self.local.is_some() {
            return;
        }
        drop(self.mounts.remove(0));
        let m = TestMount::start(self.node.as_ref().unwrap(), VOLUME);
        self.mounts.insert(0, m);
    }

    /// `hi umount` the first mount (its `hi mount` must exit cleanly), then mount the
    /// volume again on the same directory. No-op in local mode.
    pub fn umount_and_remount(&mut self) {
        if self.local.is_some() {
            return;
        }
        let m = &mut self.mounts[0];
        let st = m.umount();
        assert!(st.success(), "hi mount exited with {st} after hi umount");
        assert!(!m.is_mounted());
        m.remount();
    }

    /// SIGKILL the first mount's `hi`, then mount again on the same directory. No-op in
    /// local mode.
    pub fn kill9_and_remount(&mut self) {
        if self.local.is_some() {
            return;
        }
        let m = &mut self.mounts[0];
        m.kill9();
        assert!(!m.is_mounted());
        m.remount();
    }

    /// The node behind the mounts (`None` in local mode).
    pub fn node(&mut self) -> Option<&mut TestNode> {
        self.node.as_mut()
    }

    /// The mounts' logs, for failure messages.
    pub fn logs(&self) -> String {
        self.mounts
            .iter()
            .map(|m| format!("--- {} ---\n{}", m.path().display(), m.log_tail(30)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Fx {
    fn drop(&mut self) {
        self.mounts.clear();
        if let Some(d) = &self.local {
            if std::env::var_os("HIVE_KEEP_DIRS").is_none() {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }
}

pub fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

pub fn cstr(s: &str) -> CString {
    CString::new(s).expect("string without NUL")
}

pub fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// `r == -1` → `Err(errno)`.
pub fn check(r: libc::c_int) -> Result<libc::c_int, i32> {
    if r == -1 {
        Err(errno())
    } else {
        Ok(r)
    }
}

/// The errno of an `io::Error` (panics on one without).
pub fn eno(e: &std::io::Error) -> i32 {
    e.raw_os_error()
        .unwrap_or_else(|| panic!("no errno in {e:?}"))
}

/// `std::io::Result` → `Result<T, errno>`.
pub fn ioe<T>(r: std::io::Result<T>) -> Result<T, i32> {
    r.map_err(|e| eno(&e))
}

pub fn errname(e: i32) -> String {
    let name = match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::EACCES => "EACCES",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EMLINK => "EMLINK",
        libc::ERANGE => "ERANGE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ESTALE => "ESTALE",
        libc::ENOTCONN => "ENOTCONN",
        libc::EBUSY => "EBUSY",
        libc::E2BIG => "E2BIG",
        _ => "E?",
    };
    format!("{name}({e})")
}

pub fn open(p: &Path, flags: libc::c_int, mode: libc::mode_t) -> Result<File, i32> {
    let c = cpath(p);
    // SAFETY: NUL-terminated path; the fd returned is owned by the File.
    let fd =
        check(unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) })?;
    // SAFETY: a fresh fd that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

pub fn mkdir(p: &Path, mode: libc::mode_t) -> Result<(), i32> {
    let c = cpath(p);
    // SAFETY: NUL-terminated path.
    check(unsafe { libc::mkdir(c.as_ptr(), mode) }).map(drop)
}

pub fn rmdir(p: &Path) -> Result<(), i32> {
    let c = cpath(p);
    // SAFETY: NUL-terminated path.
    check(unsafe { libc::rmdir(c.as_ptr()) }).map(drop)
}

pub fn unlink(p: &Path) -> Result<(), i32> {
    let c = cpath(p);
    // SAFETY: NUL-terminated path.
    check(unsafe { libc::unlink(c.as_ptr()) }).map(drop)
}

pub fn link(from: &Path, to: &Path) -> Result<(), i32> {
    let (a, b) = (cpath(from), cpath(to));
    // SAFETY: NUL-terminated paths.
    check(unsafe { libc::link(a.as_ptr(), b.as_ptr()) }).map(drop)
}

pub fn symlink(target: &[u8], at: &Path) -> Result<(), i32> {
    let t = CString::new(target).expect("target without NUL");
    let c = cpath(at);
    // SAFETY: NUL-terminated strings.
    check(unsafe { libc::symlink(t.as_ptr(), c.as_ptr()) }).map(drop)
}

pub fn readlink(p: &Path) -> Result<Vec<u8>, i32> {
    ioe(std::fs::read_link(p)).map(|t| t.as_os_str().as_bytes().to_vec())
}

/// renameat2(2) with `flags` (0, `RENAME_NOREPLACE`, `RENAME_EXCHANGE`).
pub fn rename2(from: &Path, to: &Path, flags: libc::c_uint) -> Result<(), i32> {
    let (a, b) = (cpath(from), cpath(to));
    // SAFETY: NUL-terminated paths; the syscall takes (int, char*, int, char*, unsigned).
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    if r == -1 {
        Err(errno())
    } else {
        Ok(())
    }
}

pub fn truncate(p: &Path, size: u64) -> Result<(), i32> {
    let c = cpath(p);
    // SAFETY: NUL-terminated path.
    check(unsafe { libc::truncate(c.as_ptr(), size as libc::off_t) }).map(drop)
}

pub fn chmod(p: &Path, mode: libc::mode_t) -> Result<(), i32> {
    let c = cpath(p);
    // SAFETY: NUL-terminated path.
    check(unsafe { libc::chmod(c.as_ptr(), mode) }).map(drop)
}

pub fn lchown(p: &Path, uid: u32, gid: u32) -> Result<(), i32> {
    let c = cpath(p);
    // SAFETY: NUL-terminated path.
    check(unsafe { libc::lchown(c.as_ptr(), uid, gid) }).map(drop)
}

pub fn mknod(p: &Path, mode: libc::mode_t, dev: libc::dev_t) -> Result<(), i32> {
    let c = cpath(p);
    // SAFETY: NUL-terminated path.
    check(unsafe { libc::mknod(c.as_ptr(), mode, dev) }).map(drop)
}

pub fn ts(sec: i64, nsec: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: sec as libc::time_t,
        tv_nsec: nsec as libc::c_long,
    }
}

/// utimensat(AT_FDCWD, p, [atime, mtime], flags).
pub fn utimens(
    p: &Path,
    atime: libc::timespec,
    mtime: libc::timespec,
    flags: i32,
) -> Result<(), i32> {
    let c = cpath(p);
    let t = [atime, mtime];
    // SAFETY: NUL-terminated path, two timespecs.
    check(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), t.as_ptr(), flags) }).map(drop)
}

pub fn setxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> Result<(), i32> {
    let (c, n) = (cpath(p), cstr(name));
    // SAFETY: NUL-terminated strings, value pointer and length from a slice.
    check(unsafe {
        libc::setxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

/// getxattr with a buffer of `cap` bytes.
pub fn getxattr_cap(p: &Path, name: &str, cap: usize) -> Result<Vec<u8>, i32> {
    let (c, n) = (cpath(p), cstr(name));
    let mut buf = vec![0u8; cap];
    // SAFETY: NUL-terminated strings, buffer pointer and length from a Vec.
    let r = unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(errno());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

pub fn getxattr(p: &Path, name: &str) -> Result<Vec<u8>, i32> {
    getxattr_cap(p, name, 65536)
}

/// The size getxattr reports for a zero-length buffer.
pub fn getxattr_size(p: &Path, name: &str) -> Result<usize, i32> {
    let (c, n) = (cpath(p), cstr(name));
    // SAFETY: NUL-terminated strings; a null buffer of length 0 asks for the size.
    let r = unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
    if r < 0 {
        Err(errno())
    } else {
        Ok(r as usize)
    }
}

/// listxattr, names sorted.
pub fn listxattr(p: &Path) -> Result<Vec<String>, i32> {
    let c = cpath(p);
    let mut buf = vec![0u8; 65536];
    // SAFETY: NUL-terminated path, buffer pointer and length from a Vec.
    let r = unsafe { libc::listxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(errno());
    }
    buf.truncate(r as usize);
    let mut names: Vec<String> = buf
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    names.sort();
    Ok(names)
}

pub fn removexattr(p: &Path, name: &str) -> Result<(), i32> {
    let (c, n) = (cpath(p), cstr(name));
    // SAFETY: NUL-terminated strings.
    check(unsafe { libc::removexattr(c.as_ptr(), n.as_ptr()) }).map(drop)
}

pub fn lstat(p: &Path) -> Result<libc::stat, i32> {
    let c = cpath(p);
    // SAFETY: zeroed stat is a valid out-buffer; NUL-terminated path.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    check(unsafe { libc::lstat(c.as_ptr(), &mut st) })?;
    Ok(st)
}

pub fn stat(p: &Path) -> Result<libc::stat, i32> {
    let c = cpath(p);
    // SAFETY: zeroed stat is a valid out-buffer; NUL-terminated path.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    check(unsafe { libc::stat(c.as_ptr(), &mut st) })?;
    Ok(st)
}

pub fn fstat(f: &File) -> Result<libc::stat, i32> {
    // SAFETY: zeroed stat is a valid out-buffer; a live fd.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    check(unsafe { libc::fstat(f.as_raw_fd(), &mut st) })?;
    Ok(st)
}

pub fn statvfs(p: &Path) -> Result<libc::statvfs, i32> {
    let c = cpath(p);
    // SAFETY: zeroed statvfs is a valid out-buffer; NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    check(unsafe { libc::statvfs(c.as_ptr(), &mut st) })?;
    Ok(st)
}

/// The whole file through a fresh descriptor.
pub fn read_all(p: &Path) -> Result<Vec<u8>, i32> {
    ioe(std::fs::read(p))
}
