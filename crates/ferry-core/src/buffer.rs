//! Owned, 64-byte aligned byte buffers, and a pool that recycles them.
//!
//! Why a pool: on this class of machine a 128 MiB sample costs ~8 ms to copy into a warm buffer
//! but 65-90 ms to copy into freshly allocated 4 KiB pages (first-touch page faults dominate;
//! see `design/CRATES.md`). Allocating per sample would make page faults, not copies, the
//! bottleneck. So buffers at or above [`LARGE_BUFFER`] are anonymous mappings advised for
//! transparent huge pages, and a [`BufferPool`] hands back already-faulted buffers of a fitting
//! size. A pooled buffer returns to its pool when dropped; the pool holds at most its byte cap
//! and frees the rest.
//!
//! Contents of a fresh buffer are zero; contents of a recycled one are whatever was there last
//! (callers overwrite every byte: a short read is an error, never an uninitialised tail).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};

/// Alignment of every [`AlignedBuf`], in bytes (a cache line; what torch's CPU allocator uses).
pub const BUFFER_ALIGN: usize = 64;

/// Buffers of at least this many bytes are page-aligned anonymous mappings with a huge-page
/// hint; smaller ones are heap allocations aligned to [`BUFFER_ALIGN`].
pub const LARGE_BUFFER: usize = 1 << 20;

#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(64))]
struct Line([u8; BUFFER_ALIGN]);

enum Storage {
    Small(Vec<Line>),
    Large(memmap2::MmapMut),
}

impl Storage {
    /// A zeroed buffer, or `None` if the memory cannot be had (never aborts the process: sizes
    /// can come from untrusted refs).
    fn allocate(capacity: usize) -> Option<Storage> {
        if capacity >= LARGE_BUFFER {
            let map = memmap2::MmapMut::map_anon(capacity).ok()?;
            // Best effort: THP is "madvise" for anonymous memory on common kernels; where it
            // is off this is a no-op.
            let _ = map.advise(memmap2::Advice::HugePage);
            return Some(Storage::Large(map));
        }
        Some(Storage::Small(bytemuck::allocation::zeroed_vec(capacity.div_ceil(BUFFER_ALIGN))))
    }

    fn capacity(&self) -> usize {
        match self {
            Storage::Small(lines) => lines.len() * BUFFER_ALIGN,
            Storage::Large(map) => map.len(),
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Small(lines) => bytemuck::cast_slice(lines),
            Storage::Large(map) => map,
        }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Storage::Small(lines) => bytemuck::cast_slice_mut(lines),
            Storage::Large(map) => map,
        }
    }
}

/// An owned byte buffer whose start is aligned to [`BUFFER_ALIGN`] bytes.
pub struct AlignedBuf {
    storage: Option<Storage>,
    len: usize,
    pool: Option<Weak<PoolShared>>,
}

impl AlignedBuf {
    /// A fresh zeroed buffer of `len` bytes (not pooled). Like `Vec`, it calls
    /// [`std::alloc::handle_alloc_error`] if the memory cannot be had; use
    /// [`AlignedBuf::try_zeroed`] for sizes from untrusted input.
    pub fn zeroed(len: usize) -> AlignedBuf {
        AlignedBuf::try_zeroed(len).unwrap_or_else(|| {
            std::alloc::handle_alloc_error(
                std::alloc::Layout::from_size_align(len, BUFFER_ALIGN).unwrap_or(std::alloc::Layout::new::<Line>()),
            )
        })
    }

    /// A fresh zeroed buffer of `len` bytes, or `None` if the memory cannot be had.
    pub fn try_zeroed(len: usize) -> Option<AlignedBuf> {
        Some(AlignedBuf { storage: Some(Storage::allocate(len)?), len, pool: None })
    }

    /// A buffer holding a copy of `data` (one copy).
    pub fn copy_from(data: &[u8]) -> AlignedBuf {
        let mut buf = AlignedBuf::zeroed(data.len());
        buf.as_mut_slice().copy_from_slice(data);
        buf
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes reserved, at least [`AlignedBuf::len`].
    pub fn capacity(&self) -> usize {
        self.storage.as_ref().map_or(0, Storage::capacity)
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match &self.storage {
            Some(s) => &s.bytes()[..self.len],
            None => &[],
        }
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.len;
        match &mut self.storage {
            Some(s) => &mut s.bytes_mut()[..len],
            None => &mut [],
        }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("capacity", &self.capacity())
            .field("pooled", &self.pool.is_some())
            .finish()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let (Some(storage), Some(pool)) = (self.storage.take(), self.pool.take())
            && let Some(pool) = pool.upgrade()
        {
            pool.give_back(storage);
        }
    }
}

/// Counters of a [`BufferPool`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PoolStats {
    /// Bytes held idle in the pool.
    pub pooled_bytes: u64,
    /// Buffers held idle in the pool.
    pub pooled_buffers: u64,
    /// Takes served from the pool (no page faults).
    pub hits: u64,
    /// Takes that allocated.
    pub misses: u64,
}

struct PoolState {
    /// Idle buffers by capacity.
    free: BTreeMap<usize, Vec<Storage>>,
    stats: PoolStats,
}

struct PoolShared {
    max_pooled_bytes: u64,
    state: Mutex<PoolState>,
}

impl PoolShared {
    fn give_back(&self, storage: Storage) {
        let cap = storage.capacity() as u64;
        let Ok(mut state) = self.state.lock() else { return };
        if state.stats.pooled_bytes + cap > self.max_pooled_bytes {
            return; // over the cap: free it
        }
        state.stats.pooled_bytes += cap;
        state.stats.pooled_buffers += 1;
        state.free.entry(storage.capacity()).or_default().push(storage);
    }
}

/// A pool of idle [`AlignedBuf`]s, bounded by bytes. Cloning shares the pool.
#[derive(Clone)]
pub struct BufferPool {
    shared: Arc<PoolShared>,
}

impl std::fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufferPool")
            .field("max_pooled_bytes", &self.shared.max_pooled_bytes)
            .field("stats", &self.stats())
            .finish()
    }
}

impl BufferPool {
    /// A pool that keeps at most `max_pooled_bytes` of idle buffers.
    pub fn new(max_pooled_bytes: u64) -> BufferPool {
        BufferPool {
            shared: Arc::new(PoolShared {
                max_pooled_bytes,
                state: Mutex::new(PoolState { free: BTreeMap::new(), stats: PoolStats::default() }),
            }),
        }
    }

    /// A buffer of exactly `len` bytes: an idle one whose capacity fits (at most 25% larger), or
    /// a fresh one. It returns to this pool when dropped. Aborts like `Vec` if memory cannot be
    /// had; see [`BufferPool::try_take`].
    pub fn take(&self, len: usize) -> AlignedBuf {
        self.try_take(len).unwrap_or_else(|| AlignedBuf::zeroed(len))
    }

    /// [`BufferPool::take`], or `None` if a fresh buffer is needed and the memory cannot be had.
    pub fn try_take(&self, len: usize) -> Option<AlignedBuf> {
        let recycled = self.shared.state.lock().ok().and_then(|mut state| {
            let limit = len + len / 4 + BUFFER_ALIGN;
            let cap = state.free.range(len..=limit).map(|(cap, _)| *cap).next();
            let found = cap.and_then(|cap| {
                let list = state.free.get_mut(&cap)?;
                let storage = list.pop();
                if list.is_empty() {
                    state.free.remove(&cap);
                }
                storage
            });
            match &found {
                Some(s) => {
                    state.stats.hits += 1;
                    state.stats.pooled_bytes -= s.capacity() as u64;
                    state.stats.pooled_buffers -= 1;
                }
                None => state.stats.misses += 1,
            }
            found
        });
        let storage = match recycled {
            Some(storage) => storage,
            None => Storage::allocate(len)?,
        };
        Some(AlignedBuf { storage: Some(storage), len, pool: Some(Arc::downgrade(&self.shared)) })
    }

    /// Counters.
    pub fn stats(&self) -> PoolStats {
        self.shared.state.lock().map(|s| s.stats).unwrap_or_default()
    }

    /// Frees every idle buffer.
    pub fn clear(&self) {
        if let Ok(mut state) = self.shared.state.lock() {
            state.free.clear();
            state.stats.pooled_bytes = 0;
            state.stats.pooled_buffers = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_small_and_large() {
        for len in [0, 1, 63, 64, 4096, LARGE_BUFFER, LARGE_BUFFER + 3] {
            let buf = AlignedBuf::zeroed(len);
            assert_eq!(buf.len(), len);
            assert_eq!(buf.as_ptr() as usize % BUFFER_ALIGN, 0, "len {len}");
            assert!(buf.iter().all(|b| *b == 0));
        }
    }

    #[test]
    fn pool_recycles_fitting_buffers_and_respects_its_cap() {
        let pool = BufferPool::new(3 << 20);
        let a = pool.take(2 << 20);
        let ptr = a.as_ptr();
        drop(a);
        assert_eq!(pool.stats().pooled_bytes, 2 << 20);
        let b = pool.take((2 << 20) - 100); // fits within 25%
        assert_eq!(b.as_ptr(), ptr);
        assert_eq!(pool.stats().hits, 1);
        let c = pool.take(2 << 20); // nothing idle: allocates
        assert_eq!(pool.stats().misses, 2);
        drop(b);
        drop(c); // second 2 MiB would exceed the 3 MiB cap: freed
        assert_eq!(pool.stats().pooled_buffers, 1);
        let tiny = pool.take(100); // far too small for the idle 2 MiB buffer
        assert_eq!(pool.stats().misses, 3);
        drop(tiny);
        pool.clear();
        assert_eq!(pool.stats().pooled_bytes, 0);
    }

    #[test]
    fn impossible_sizes_fail_without_aborting() {
        assert!(AlignedBuf::try_zeroed(usize::MAX / 2).is_none());
        assert!(BufferPool::new(0).try_take(usize::MAX / 2).is_none());
    }

    #[test]
    fn buffer_outliving_its_pool_is_simply_freed() {
        let pool = BufferPool::new(1 << 30);
        let buf = pool.take(10);
        drop(pool);
        drop(buf);
    }
}
