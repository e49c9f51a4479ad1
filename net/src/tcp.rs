//! Kernel TCP socket settings shared by clients and nodes.
//!
//! A peer whose host dies (power lost, process killed behind a userspace stack, cable
//! pulled) sends no reset: without these settings a blocked read on its connection waits
//! forever. [`detect_dead_peer`] makes the kernel give up on such a connection:
//! unacknowledged data for [`USER_TIMEOUT`] fails it (`TCP_USER_TIMEOUT`), and an idle
//! connection is probed from [`KEEPALIVE_IDLE`] on and fails when probes go unanswered.
//! A peer that is alive but slow to answer is not affected: its kernel (or userspace
//! stack) acknowledges the bytes at once.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Unacknowledged data older than this fails the connection.
pub const USER_TIMEOUT: Duration = Duration::from_secs(5);
/// An idle connection is probed after this long.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(3);
/// Between probes; [`KEEPALIVE_PROBES`] unanswered fail the connection.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
pub const KEEPALIVE_PROBES: u32 = 3;

fn set(fd: i32, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: `value` outlives the call and its size is passed; the kernel validates `fd`.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &value as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// See the module docs.
pub fn detect_dead_peer(s: &impl AsRawFd) -> io::Result<()> {
    let fd = s.as_raw_fd();
    set(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPIDLE,
        KEEPALIVE_IDLE.as_secs() as i32,
    )?;
    set(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPINTVL,
        KEEPALIVE_INTERVAL.as_secs() as i32,
    )?;
    set(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPCNT,
        KEEPALIVE_PROBES as i32,
    )?;
    set(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_USER_TIMEOUT,
        USER_TIMEOUT.as_millis() as i32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_taken() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        detect_dead_peer(&s).unwrap();
        let mut v: i32 = 0;
        let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
        // SAFETY: `v` and `len` are valid for the call.
        let r = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_USER_TIMEOUT,
                &mut v as *mut i32 as *mut libc::c_void,
                &mut len,
            )
        };
        assert_eq!(r, 0);
        assert_eq!(v, USER_TIMEOUT.as_millis() as i32);
    }
}
