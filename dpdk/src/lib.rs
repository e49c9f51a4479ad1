//! Kernel-bypass networking for hive nodes.
//!
//! - [`eal`]: the DPDK environment, once per process ([`Eal::init`]), and registering
//!   the threads that use it.
//! - [`mbuf`]: packet buffer pools ([`Mempool`]) and owned packet buffers ([`Mbuf`]).
//! - [`port`]: an Ethernet port with its receive and transmit queues and flow rules.
//! - [`device`] and [`stack`]: a userspace TCP/IP stack (smoltcp) per shard over mbufs,
//!   and the dispatch of packets from the queue that received them to the shard that owns
//!   their connection.
//!
//! Invariants: every DPDK object is used from one thread at a time (queues and stacks
//! belong to a shard; the types are `Send`, not `Sync`); a packet buffer has one owner
//! and returns to its pool when dropped; nothing here blocks.

pub mod device;
pub mod eal;
pub mod mbuf;
pub mod port;
pub mod stack;

pub use eal::Eal;
pub use mbuf::{Mbuf, Mempool};
pub use port::{Port, PortConfig, RxQueue, TxQueue};

/// A DPDK call failed.
#[derive(Debug, thiserror::Error)]
pub enum DpdkError {
    #[error("{call}: {msg} (errno {errno})")]
    Call {
        call: &'static str,
        errno: i32,
        msg: String,
    },
    #[error("{0}")]
    Other(String),
}

impl DpdkError {
    /// An error from `call` with a DPDK errno (negative return values are accepted).
    pub(crate) fn rte(call: &'static str, errno: i32) -> DpdkError {
        let errno = errno.abs();
        // SAFETY: rte_strerror returns a pointer to a static or thread-local string.
        let msg = unsafe {
            let p = hivefs_dpdk_sys::rte_strerror(errno);
            if p.is_null() {
                String::from("unknown error")
            } else {
                std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        DpdkError::Call { call, errno, msg }
    }

    /// An error from `call` whose reason is in `rte_errno`.
    pub(crate) fn last(call: &'static str) -> DpdkError {
        // SAFETY: reads the calling thread's rte_errno.
        DpdkError::rte(call, unsafe { hivefs_dpdk_sys::hv_errno() })
    }
}

pub type Result<T> = std::result::Result<T, DpdkError>;
