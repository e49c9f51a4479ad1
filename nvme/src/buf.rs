//! A heap buffer aligned to [`crate::BLOCK_SIZE`], as `O_DIRECT` requires.

use crate::BLOCK_SIZE;
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

/// An owned, zero-initialised, [`BLOCK_SIZE`]-aligned byte buffer whose length is a
/// multiple of [`BLOCK_SIZE`].
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// Bytes allocated (`len <= cap`): a buffer can be shortened for one I/O and grown
    /// back, so a shard reuses its commit buffers without copying or reallocating.
    cap: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only give out &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes rounded up to a whole number of blocks (at least one).
    pub fn new(len: usize) -> Self {
        let len = len.max(1).div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
        let layout = Layout::from_size_align(len, BLOCK_SIZE).expect("buffer layout");
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len, cap: len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Bytes allocated; [`AlignedBuf::set_len`] may grow the length up to this.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Change the visible length (a whole number of blocks, at most the capacity). Bytes
    /// beyond the old length keep whatever they held.
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.cap && len.is_multiple_of(BLOCK_SIZE),
            "set_len({len}) on a buffer of capacity {}",
            self.cap
        );
        self.len = len;
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes for the lifetime of self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.cap, BLOCK_SIZE).expect("buffer layout");
        // SAFETY: allocated in `new` with this exact layout (cap is the allocated size).
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_up_and_aligns() {
        let b = AlignedBuf::new(1);
        assert_eq!(b.len(), BLOCK_SIZE);
        assert_eq!(b.as_ptr() as usize % BLOCK_SIZE, 0);
        assert!(b.iter().all(|&x| x == 0));
        let mut b = AlignedBuf::new(BLOCK_SIZE * 3 + 5);
        assert_eq!(b.len(), BLOCK_SIZE * 4);
        b[BLOCK_SIZE * 3] = 7;
        b.set_len(BLOCK_SIZE);
        assert_eq!((b.len(), b.capacity()), (BLOCK_SIZE, BLOCK_SIZE * 4));
        b.set_len(BLOCK_SIZE * 4);
        assert_eq!(b[BLOCK_SIZE * 3], 7);
    }
}
