//! Bounds-checked byte access to a shared read-write mapping: the one place this crate
//! dereferences the mapping's raw pointer. Used by both sides, the daemon's [`crate::Arena`] and
//! the client's [`crate::ArenaMap`].
//!
//! # The memory model we rely on
//! The mapping is shared with other processes that may write any byte of it at any time (see
//! the trust model in [`crate::arena`]). Rust cannot express that, so this module treats the
//! mapping as memory outside the Rust abstract machine, as every shared-memory transport does:
//! it only copies bytes in and out (`ptr::copy_nonoverlapping`) and hands out `&[u8]` views
//! whose bytes may change under a misbehaving peer (the reader then sees unspecified byte
//! values, never reads outside the mapping). Within one process the callers keep the rule that
//! makes this sound in practice: a range is written only by the one holder of its reservation
//! and before it is published, and read only while it is published and pinned.

use ferry_core::{Error, Result};
use memmap2::{Advice, MmapRaw};
use std::io::{Read, Write};

/// A shared read-write mapping of `len` bytes.
pub(crate) struct SharedBytes {
    map: MmapRaw,
    len: u64,
}

impl SharedBytes {
    /// Wraps a mapping; its length is the bound of every access.
    pub(crate) fn new(map: MmapRaw) -> Self {
        let len = map.len() as u64;
        SharedBytes { map, len }
    }

    /// The mapping's length in bytes.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Checks `[offset, offset + len)` against the mapping; returns the start as `usize`.
    fn check(&self, what: &str, offset: u64, len: usize) -> Result<usize> {
        let end = offset.checked_add(len as u64);
        match end {
            Some(end) if end <= self.len => Ok(offset as usize),
            _ => Err(Error::InvalidArgument(format!(
                "{what} of {len} bytes at offset {offset} runs past the end of the {} byte arena mapping",
                self.len
            ))),
        }
    }

    /// Copies `src` into the mapping at `offset`.
    pub(crate) fn write_at(&self, offset: u64, src: &[u8]) -> Result<()> {
        let start = self.check("write", offset, src.len())?;
        // SAFETY: `check` proved `start + src.len() <= len`, so the destination lies inside the
        // live mapping (owned by `self`). `src` is ordinary process memory and cannot overlap a
        // shared mapping we created (it would be a `&[u8]` into the mapping only if the caller
        // took one from `slice`, and the mapping's ranges written here are reserved, not
        // published, so no view of them exists by the module's rule).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.map.as_mut_ptr().add(start), src.len()) };
        Ok(())
    }

    /// Copies `dst.len()` bytes from the mapping at `offset` into `dst`.
    pub(crate) fn read_at(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        let start = self.check("read", offset, dst.len())?;
        // SAFETY: the source range is inside the mapping (checked above); `dst` is a unique
        // `&mut [u8]`, so it cannot alias the source `&self` range for the copy's duration
        // unless a caller built it from a shared mapping view, which `slice` never gives out
        // mutably.
        unsafe { std::ptr::copy_nonoverlapping(self.map.as_ptr().add(start), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// A view of `len` bytes at `offset`, valid while `self` lives. Its bytes are shared memory:
    /// see the module doc for who may change them.
    pub(crate) fn slice(&self, offset: u64, len: usize) -> Result<&[u8]> {
        let start = self.check("view", offset, len)?;
        // SAFETY: the range is inside the mapping, which stays mapped for the lifetime of
        // `&self` (the returned borrow). The pointer is non-null and suitably aligned for `u8`.
        Ok(unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(start), len) })
    }

    /// Fills `[offset, offset + len)` straight from `reader` (`read_exact`), so bytes arriving
    /// on a socket land in their final place without a bounce buffer.
    pub(crate) fn fill_from(&self, offset: u64, len: u64, reader: &mut dyn Read) -> Result<()> {
        let len_usize = usize::try_from(len)
            .map_err(|_| Error::InvalidArgument(format!("fill of {len} bytes does not fit in memory")))?;
        let start = self.check("fill", offset, len_usize)?;
        // SAFETY: the range is inside the mapping (checked above) and lives as long as `&self`.
        // The `&mut [u8]` exists only for this call; by the module's rule the range belongs to
        // the caller's unpublished reservation, so no other view of it is alive.
        let dst = unsafe { std::slice::from_raw_parts_mut(self.map.as_mut_ptr().add(start), len_usize) };
        reader.read_exact(dst).map_err(|e| Error::io(format!("filling {len} arena bytes at offset {offset}"), &e))
    }

    /// Writes `[offset, offset + len)` straight to `writer` (`write_all`).
    pub(crate) fn drain_to(&self, offset: u64, len: u64, writer: &mut dyn Write) -> Result<()> {
        let len_usize = usize::try_from(len)
            .map_err(|_| Error::InvalidArgument(format!("send of {len} bytes does not fit in memory")))?;
        let src = self.slice(offset, len_usize)?;
        writer.write_all(src).map_err(|e| Error::io(format!("sending {len} arena bytes at offset {offset}"), &e))
    }

    /// Faults every page of a mapping that may already hold data in, writable, without changing
    /// a byte: `MADV_POPULATE_WRITE` (Linux 5.14+), else a read of one byte per 4 KiB page (a
    /// read fault on a shared shmem mapping maps the page writable, as shmem needs no
    /// write-notify).
    pub(crate) fn populate_shared(&self) {
        if self.map.advise(Advice::PopulateWrite).is_err() {
            self.populate_by_reading();
        }
    }

    /// The fallback of [`Self::populate_shared`] for kernels without `MADV_POPULATE_WRITE`.
    pub(crate) fn populate_by_reading(&self) {
        const PAGE: u64 = 4096;
        let mut at = 0u64;
        while at < self.len {
            // SAFETY: `at < len`, so the byte is inside the mapping; a volatile read of a mapped
            // byte has no effect beyond faulting the page in, and cannot be optimised away.
            let _ = unsafe { std::ptr::read_volatile(self.map.as_ptr().add(at as usize)) };
            at += PAGE;
        }
    }

    /// Touches one byte per 4 KiB page with a write so every page is resident and writable
    /// before the hot path needs it. Only for a freshly created, still private arena.
    pub(crate) fn prefault_zero(&self) {
        const PAGE: u64 = 4096;
        let mut at = 0u64;
        while at < self.len {
            // SAFETY: `at < len`, so the byte is inside the mapping. The arena is fresh (all
            // zeros, not yet shared with anyone), so writing a zero changes no data; the
            // volatile write keeps the compiler from dropping the store that faults the page in.
            unsafe { std::ptr::write_volatile(self.map.as_mut_ptr().add(at as usize), 0u8) };
            at += PAGE;
        }
    }
}
