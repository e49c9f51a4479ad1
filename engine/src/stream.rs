//! The byte stream under a shard's framed connection: a kernel TCP socket (mio), or a
//! connection of the shard's userspace TCP stack (DPDK). Both are non-blocking
//! `Read + Write`; the framed connection and TLS above them do not know which it is.

use mio::net::TcpStream;
use std::io::{self, Read, Write};

pub(crate) enum Stream {
    Kernel(TcpStream),
    #[cfg(feature = "dpdk")]
    User(hivefs_dpdk::stack::UserStream),
}

impl Stream {
    /// The kernel socket, for the poll registry (userspace streams are not registered:
    /// the shard polls its stack).
    pub(crate) fn kernel(&mut self) -> Option<&mut TcpStream> {
        match self {
            Stream::Kernel(s) => Some(s),
            #[cfg(feature = "dpdk")]
            Stream::User(_) => None,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Kernel(s) => s.read(buf),
            #[cfg(feature = "dpdk")]
            Stream::User(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Kernel(s) => s.write(buf),
            #[cfg(feature = "dpdk")]
            Stream::User(s) => s.write(buf),
        }
    }

    /// One `writev` for many buffers: rustls hands its queued TLS records (16 KiB each)
    /// here together, and without this each record would be a `send` of its own (a
    /// 64 KiB chunk four syscalls and four trips down the TCP stack).
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Kernel(s) => s.write_vectored(bufs),
            #[cfg(feature = "dpdk")]
            Stream::User(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Kernel(s) => s.flush(),
            #[cfg(feature = "dpdk")]
            Stream::User(s) => s.flush(),
        }
    }
}
