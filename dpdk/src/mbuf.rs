//! Packet buffers: pools ([`Mempool`]) and owned buffers ([`Mbuf`]).
//!
//! An [`Mbuf`] is one single-segment packet buffer with one owner; dropping it returns it
//! to its pool. Received multi-segment packets are refused by the receive path (our MTU
//! fits one buffer), so every `Mbuf` here is one contiguous slice of bytes.

use crate::{DpdkError, Result};
use hivefs_dpdk_sys as sys;
use std::ffi::CString;
use std::ptr::NonNull;

/// Data room of one buffer: headroom plus a 2048-byte frame (Ethernet MTU 1500 fits).
pub const BUF_SIZE: u16 = sys::RTE_MBUF_DEFAULT_BUF_SIZE as u16;

/// A pool of packet buffers. Lives as long as the process (DPDK frees pools only when no
/// buffer of theirs is anywhere, which a shared pool cannot promise).
pub struct Mempool {
    ptr: NonNull<sys::rte_mempool>,
    name: String,
}

// SAFETY: DPDK mempools are multi-producer/multi-consumer safe (the default ring ops);
// the per-lcore cache is keyed by the calling thread's lcore id.
unsafe impl Send for Mempool {}
unsafe impl Sync for Mempool {}

impl Mempool {
    /// A pool of `n` buffers of [`BUF_SIZE`] data room, with a per-thread cache of `cache`.
    ///
    /// Buffers are packed back to back where IOVA addresses are virtual (see
    /// [`Mempool::dense`]); DPDK's default keeps each buffer inside one page, which on
    /// 4 KiB pages wastes 40% of the memory and breaks net_af_xdp.
    pub fn new(name: &str, n: u32, cache: u32) -> Result<Mempool> {
        let cname =
            CString::new(name).map_err(|_| DpdkError::Other("pool name has a NUL".into()))?;
        // SAFETY: EAL is initialised (a `Port` or `Eal` exists before pools are made);
        // the name is a valid C string; SOCKET_ID_ANY lets DPDK choose the memory.
        let p = unsafe {
            sys::hv_pktmbuf_pool_create_packed(
                cname.as_ptr(),
                n,
                cache,
                BUF_SIZE,
                sys::SOCKET_ID_ANY,
            )
        };
        let ptr =
            NonNull::new(p).ok_or_else(|| DpdkError::last("rte_pktmbuf_pool_create (packed)"))?;
        Ok(Mempool {
            ptr,
            name: name.into(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Buffers free in the pool now (not counting per-thread caches).
    pub fn available(&self) -> u32 {
        // SAFETY: the pool is valid for the process's life.
        unsafe { sys::rte_mempool_avail_count(self.ptr.as_ptr()) }
    }

    /// Whether every buffer lies within (buffers x object size) bytes of the start of the
    /// pool's first memory chunk: what net_af_xdp needs to register the pool's memory
    /// as the kernel's UMEM (packed pools in IOVA-as-VA mode are).
    pub fn dense(&self) -> bool {
        // SAFETY: the pool is valid and populated.
        unsafe { sys::hv_mempool_dense(self.ptr.as_ptr()) == 1 }
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::rte_mempool {
        self.ptr.as_ptr()
    }

    /// One empty buffer, or `None` when the pool is exhausted.
    pub fn alloc(&self) -> Option<Mbuf> {
        // SAFETY: valid pool; the returned buffer (if any) is ours alone.
        let m = unsafe { sys::hv_pktmbuf_alloc(self.ptr.as_ptr()) };
        NonNull::new(m).map(|ptr| Mbuf { ptr })
    }

    /// One buffer holding a copy of `bytes`, or `None` (pool exhausted, or too long).
    pub fn copy_of(&self, bytes: &[u8]) -> Option<Mbuf> {
        let mut m = self.alloc()?;
        m.append(bytes.len())?.copy_from_slice(bytes);
        Some(m)
    }
}

/// One owned, single-segment packet buffer. See the module docs.
pub struct Mbuf {
    ptr: NonNull<sys::rte_mbuf>,
}

// SAFETY: an Mbuf is owned by one thread at a time; freeing from another thread returns it
// to its (thread-safe) pool.
unsafe impl Send for Mbuf {}

impl Mbuf {
    /// Take ownership of a buffer DPDK handed out.
    ///
    /// # Safety
    /// `ptr` must be a valid mbuf that nothing else owns or will free.
    pub(crate) unsafe fn from_raw(ptr: *mut sys::rte_mbuf) -> Option<Mbuf> {
        NonNull::new(ptr).map(|ptr| Mbuf { ptr })
    }

    /// The raw pointer, still owned by `self` (for a burst that takes the accepted ones
    /// with [`Mbuf::into_raw`]).
    pub(crate) fn raw(&self) -> *mut sys::rte_mbuf {
        self.ptr.as_ptr()
    }

    /// Give up ownership (to a transmit burst that takes it).
    pub(crate) fn into_raw(self) -> *mut sys::rte_mbuf {
        let p = self.ptr.as_ptr();
        std::mem::forget(self);
        p
    }

    /// Segments in the packet (1 for every buffer made here).
    pub fn segments(&self) -> u16 {
        // SAFETY: valid, owned mbuf.
        unsafe { sys::hv_mbuf_nb_segs(self.ptr.as_ptr()) }
    }

    /// Bytes of data (in the first segment).
    pub fn len(&self) -> usize {
        // SAFETY: valid, owned mbuf.
        unsafe { sys::hv_mbuf_data_len(self.ptr.as_ptr()) as usize }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The packet's bytes (first segment).
    pub fn data(&self) -> &[u8] {
        // SAFETY: the data pointer and length describe initialised bytes inside the
        // buffer, which we own for as long as the borrow lasts.
        unsafe { std::slice::from_raw_parts(sys::hv_mbuf_data(self.ptr.as_ptr()), self.len()) }
    }

    /// The packet's bytes, writable.
    pub fn data_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `data`, with exclusive access through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(sys::hv_mbuf_data(self.ptr.as_ptr()), self.len()) }
    }

    /// Extend the data by `n` bytes and return them (contents unspecified: write them all);
    /// `None` without room (the buffer is unchanged).
    pub fn append(&mut self, n: usize) -> Option<&mut [u8]> {
        let n16 = u16::try_from(n).ok()?;
        // SAFETY: valid, owned mbuf; append checks the tailroom and returns NULL without.
        let p = unsafe { sys::hv_mbuf_append(self.ptr.as_ptr(), n16) };
        if p.is_null() {
            return None;
        }
        // SAFETY: `n` bytes at `p` now belong to the packet and to this borrow.
        Some(unsafe { std::slice::from_raw_parts_mut(p, n) })
    }

    /// Keep only the first `n` bytes.
    pub fn truncate(&mut self, n: usize) {
        if n < self.len() {
            // SAFETY: valid, owned, single-segment mbuf; n is below the data length.
            unsafe { sys::hv_mbuf_trim_to(self.ptr.as_ptr(), n as u16) }
        }
    }
}

impl Drop for Mbuf {
    fn drop(&mut self) {
        // SAFETY: we own the buffer; it goes back to its pool.
        unsafe { sys::hv_pktmbuf_free(self.ptr.as_ptr()) }
    }
}

impl std::fmt::Debug for Mbuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mbuf({} bytes)", self.len())
    }
}
