//! Timing helpers and the memcpy reference every store figure is compared with.
//!
//! Throughputs are decimal GB/s (10^9 bytes per second), as in `design/CRATES.md`. On the 2-core
//! development box a warm memcpy runs at about 12-15 GB/s; a copy into freshly allocated pages
//! at 1.4-2 GB/s, which is why stores recycle buffers.

use ferry_core::AlignedBuf;
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Runs per measurement; the fastest counts (the least disturbed by the rest of the machine).
pub(crate) const RUNS: u32 = 5;

pub(crate) use ferry_core::measure::gbps;

/// Bytes written to push earlier data out of the CPU caches (twice the 32 MiB last-level cache
/// of the development box).
const CACHE_FLUSH_BYTES: usize = 64 << 20;

/// Evicts the CPU caches by writing a scratch region larger than the last-level cache, so every
/// timed copy starts from memory, not cache: a sample that fits in cache is not flattered, and
/// a store operation and the memcpy it is compared with start from the same state.
pub(crate) struct CacheFlush {
    scratch: AlignedBuf,
    pass: u8,
}

impl CacheFlush {
    /// A flusher with its scratch region already faulted in.
    pub(crate) fn new() -> CacheFlush {
        let mut flush = CacheFlush { scratch: AlignedBuf::zeroed(CACHE_FLUSH_BYTES), pass: 0 };
        flush.flush();
        flush
    }

    /// Writes the whole scratch region.
    pub(crate) fn flush(&mut self) {
        self.pass = self.pass.wrapping_add(1);
        self.scratch.fill(self.pass);
        black_box(&mut self.scratch);
    }
}

/// The best of a few copies of `bytes` bytes into a warm buffer, in GB/s: the physical limit a
/// one-copy store operation is measured against. Both buffers are [`AlignedBuf`]s, the memory
/// ferry's buffer pools hand out; every page is written before the clock starts and the caches
/// are flushed before each copy.
pub(crate) fn memcpy_gbps(bytes: usize, caches: &mut CacheFlush) -> f64 {
    let mut src = AlignedBuf::zeroed(bytes);
    src.fill(0x5a);
    let mut dst = AlignedBuf::zeroed(bytes);
    dst.fill(0);
    let best = (0..RUNS)
        .map(|_| {
            caches.flush();
            let start = Instant::now();
            dst.copy_from_slice(black_box(&src));
            black_box(&mut dst);
            start.elapsed()
        })
        .min()
        .unwrap_or_default();
    gbps(bytes as u64, best)
}

/// Single-thread memcpy between a warm heap buffer and a pre-faulted shared-memory arena of the
/// kind the daemon uses (a memfd, huge pages only where the host's shmem THP mode allows), as
/// (into the arena, out of it) in GB/s. On a host whose shmem pages are 4 KiB this is the limit
/// a same-node put or get can reach, lower than [`memcpy_gbps`] between huge-page heap buffers.
pub(crate) fn memcpy_shm_gbps(bytes: usize, caches: &mut CacheFlush) -> anyhow::Result<(f64, f64)> {
    let arena = ferry_shm::Arena::create("memcpy-reference", bytes as u64, ferry_shm::ArenaOptions::default())?;
    let mut heap = AlignedBuf::zeroed(bytes);
    heap.fill(0x5a);
    let mut time = |into: bool| -> anyhow::Result<Duration> {
        let mut best = Duration::MAX;
        for _ in 0..RUNS {
            caches.flush();
            let start = Instant::now();
            if into {
                arena.write_at(0, black_box(&heap))?;
            } else {
                arena.read_at(0, black_box(&mut heap))?;
            }
            best = best.min(start.elapsed());
        }
        Ok(best)
    };
    let into = time(true)?;
    let out = time(false)?;
    Ok((gbps(bytes as u64, into), gbps(bytes as u64, out)))
}

/// The shortest per-iteration time over [`RUNS`] runs of `iters` calls of `f`, after one
/// untimed warm-up call.
pub(crate) fn best_per_iter(iters: u64, f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Duration> {
    ferry_core::measure::try_best_per_iter(RUNS, iters, f)
}

/// `12.3` GB/s with one decimal, or more digits for small values.
pub(crate) fn fmt_gbps(v: f64) -> String {
    if v >= 10.0 { format!("{v:.1}") } else { format!("{v:.2}") }
}

/// Bytes as `320 B`, `4.0 KiB`, `16.05 MiB`, `1.50 GiB`.
pub(crate) fn fmt_bytes(n: u64) -> String {
    const KIB: f64 = 1024.0;
    let x = n as f64;
    if x < KIB {
        format!("{n} B")
    } else if x < KIB * KIB {
        format!("{:.1} KiB", x / KIB)
    } else if x < KIB * KIB * KIB {
        format!("{:.2} MiB", x / (KIB * KIB))
    } else {
        format!("{:.2} GiB", x / (KIB * KIB * KIB))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(fmt_bytes(320), "320 B");
        assert_eq!(fmt_bytes(4096), "4.0 KiB");
        assert_eq!(fmt_bytes(16_826_368), "16.05 MiB");
        assert_eq!(fmt_gbps(12.34), "12.3");
        assert_eq!(fmt_gbps(1.234), "1.23");
        assert!(memcpy_gbps(1 << 16, &mut CacheFlush::new()) > 0.0);
    }
}
