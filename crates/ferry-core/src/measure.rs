//! Timing arithmetic shared by every benchmark and by `ferry bench` / `ferry demo`, so each
//! reports throughput and best-of-N times the same way. Throughputs are decimal GB/s
//! (10^9 bytes per second), as in `design/CRATES.md`.

use std::convert::Infallible;
use std::time::{Duration, Instant};

/// Bytes per elapsed time, in GB/s.
pub fn gbps(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64().max(1e-12) / 1e9
}

/// The shortest per-iteration time over `runs` runs of `iters` calls of `f`, after one untimed
/// warm-up call (which faults in pooled buffers and fills caches). The fastest run is the one
/// least disturbed by the rest of the machine. The first error ends the measurement.
pub fn try_best_per_iter<E>(runs: u32, iters: u64, mut f: impl FnMut() -> Result<(), E>) -> Result<Duration, E> {
    f()?;
    let mut best = Duration::MAX;
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        for _ in 0..iters.max(1) {
            f()?;
        }
        best = best.min(start.elapsed().div_f64(iters.max(1) as f64));
    }
    Ok(best)
}

/// [`try_best_per_iter`] for a measurement that cannot fail.
pub fn best_per_iter(runs: u32, iters: u64, mut f: impl FnMut()) -> Duration {
    let Ok(best) = try_best_per_iter(runs, iters, || {
        f();
        Ok::<(), Infallible>(())
    });
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gbps_is_decimal() {
        assert!((gbps(1_000_000_000, Duration::from_secs(2)) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn best_per_iter_warms_up_once_then_runs_every_iteration() {
        let mut calls = 0u64;
        best_per_iter(3, 4, || calls += 1);
        assert_eq!(calls, 1 + 3 * 4);
        let mut n = 0;
        let err = try_best_per_iter(3, 4, || {
            n += 1;
            if n == 2 { Err("boom") } else { Ok(()) }
        });
        assert_eq!(err, Err("boom"));
    }
}
