//! Small OS helpers shared by the file-backed devices.

use crate::BLOCK_SIZE;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::AsRawFd;

/// `BLKGETSIZE64` = `_IOR(0x12, 114, size_t)`. The kernel header really uses `size_t` for
/// the size field even though the ioctl stores a u64, so the value depends on the target's
/// pointer width and on its ioctl direction encoding.
const BLKGETSIZE64: libc::c_ulong = {
    #[cfg(any(
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "mips",
        target_arch = "mips64",
        target_arch = "sparc",
        target_arch = "sparc64"
    ))]
    const IOC_READ_SHIFTED: libc::c_ulong = 2 << 29;
    #[cfg(not(any(
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "mips",
        target_arch = "mips64",
        target_arch = "sparc",
        target_arch = "sparc64"
    )))]
    const IOC_READ_SHIFTED: libc::c_ulong = 2 << 30;
    IOC_READ_SHIFTED | ((std::mem::size_of::<usize>() as libc::c_ulong) << 16) | (0x12 << 8) | 114
};

/// Usable capacity of an open file: a regular file's length rounded down to [`BLOCK_SIZE`],
/// or a block device's size from `BLKGETSIZE64` (rounded down likewise).
pub(crate) fn capacity_of(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    let ft = meta.file_type();
    let bytes = if ft.is_file() {
        meta.len()
    } else if ft.is_block_device() {
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes exactly one u64 through the pointer, which points to a
        // live, properly aligned u64 on our stack; the fd is open for the whole call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        size
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file or block device",
        ));
    };
    Ok(bytes / BLOCK_SIZE as u64 * BLOCK_SIZE as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blkgetsize64_matches_linux_header_on_x86_64() {
        #[cfg(all(target_arch = "x86_64", target_pointer_width = "64"))]
        assert_eq!(BLKGETSIZE64, 0x8008_1272);
    }
}

#[cfg(test)]
mod block_device_tests {
    use super::*;

    /// Compare BLKGETSIZE64 with sysfs (`size` is in 512-byte units) for the block devices
    /// we can open read-only. Skips silently when there are none (containers).
    #[test]
    fn block_device_capacity_matches_sysfs() {
        let Ok(entries) = std::fs::read_dir("/sys/block") else {
            return;
        };
        let mut checked = 0;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(sz) = std::fs::read_to_string(e.path().join("size")) else {
                continue;
            };
            let Ok(sectors) = sz.trim().parse::<u64>() else {
                continue;
            };
            let Ok(f) = File::open(format!("/dev/{name}")) else {
                continue;
            };
            let cap = capacity_of(&f).expect("BLKGETSIZE64");
            assert_eq!(
                cap,
                sectors * 512 / BLOCK_SIZE as u64 * BLOCK_SIZE as u64,
                "/dev/{name}"
            );
            checked += 1;
        }
        eprintln!("checked {checked} block devices");
    }
}
