//! Store round trip against memcpy: does a `mem://` store move a sample with at most one copy per
//! direction?
//!
//! * `memcpy_2x/<size>`: the floor. Two plain copies into warm buffers (src -> staging for
//!   "in", staging -> dst for "out"), because a store round trip is one copy per direction.
//! * `store_round_trip/<size>`: `put` from a borrowed `TensorView`, `get_into` a pre-allocated
//!   caller buffer, `release` (consume-once frees the sample, so the next `put` of the same id
//!   reuses the backend's pooled, already-faulted buffer).
//!
//! After the Criterion groups the same bench run measures both again with plain
//! [`Instant`]s (best of [`RUNS`] runs) and prints the ratio `memcpy_time / store_time` per
//! size; the goal at 64 MiB is >= 0.8. Run with `cargo bench -p ferry-store --bench store`.
//! Under `cargo test --benches` every benchmark runs once and the ratio pass is a smoke run.

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use ferry_store::bench::RoundTrip;
use ferry_store::{FeatureStore, StoreOptions, open_store};
use std::time::Duration;

/// Sample sizes measured: a small control record-sized sample and an EAGLE3 Qwen3-8B-sized one.
const SIZES: [usize; 2] = [4 << 10, 64 << 20];
/// Runs of the self-contained ratio measurement; the best (fastest) run counts.
const RUNS: usize = 5;

fn label(size: usize) -> String {
    if size >= 1 << 20 { format!("{} MiB", size >> 20) } else { format!("{} KiB", size >> 10) }
}

fn bench_store() -> FeatureStore {
    open_store("mem://bench", StoreOptions::default()).expect("mem:// store opens")
}

/// Criterion settings per size: the 64 MiB case takes ~10 ms an iteration, so it gets the
/// minimum sample count and flat sampling to keep the whole run well under a minute.
fn configure(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>, size: usize) {
    if size >= 1 << 20 {
        group
            .sample_size(10)
            .sampling_mode(SamplingMode::Flat)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3));
    } else {
        group.sample_size(50).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    }
}

fn memcpy_group(c: &mut Criterion) {
    for size in SIZES {
        let mut group = c.benchmark_group("memcpy_2x");
        configure(&mut group, size);
        group.throughput(Throughput::Bytes(size as u64));
        let mut bufs = RoundTrip::new(size);
        group.bench_function(BenchmarkId::from_parameter(label(size)), |b| b.iter(|| bufs.memcpy_2x()));
        group.finish();
    }
}

fn store_group(c: &mut Criterion) {
    for size in SIZES {
        let mut group = c.benchmark_group("store_round_trip");
        configure(&mut group, size);
        group.throughput(Throughput::Bytes(size as u64));
        let store = bench_store();
        let mut bufs = RoundTrip::new(size);
        group.bench_function(BenchmarkId::from_parameter(label(size)), |b| {
            b.iter(|| bufs.round_trip(&store).expect("store round trip"))
        });
        group.finish();
        assert_eq!(store.health().resident_bytes, 0, "consume-once left bytes resident");
    }
}

fn best_per_iter(iters: usize, f: impl FnMut()) -> Duration {
    ferry_core::measure::best_per_iter(RUNS as u32, iters as u64, f)
}

fn gbps(bytes: usize, per_iter: Duration) -> f64 {
    ferry_core::measure::gbps(bytes as u64, per_iter)
}

/// The self-contained ratio pass: prints one line per size.
fn ratio_report(smoke: bool) {
    for size in SIZES {
        // About 2 s for the whole pass in a real bench run.
        let iters = if smoke { 1 } else { (1usize << 30).div_ceil(size).clamp(20, 20_000) };
        let mut bufs = RoundTrip::new(size);
        let memcpy = best_per_iter(iters, || bufs.memcpy_2x());
        let store = bench_store();
        let round_trip = best_per_iter(iters, || bufs.round_trip(&store).expect("store round trip"));
        assert_eq!(store.health().resident_bytes, 0, "consume-once left bytes resident");
        println!(
            "ratio memcpy_time/store_time for {}: {:.2} (memcpy 2x: {:.2} GB/s, store: {:.2} GB/s; best of {RUNS} x {iters} iterations)",
            label(size),
            memcpy.as_secs_f64() / round_trip.as_secs_f64().max(1e-12),
            gbps(size, memcpy),
            gbps(size, round_trip),
        );
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not (Criterion's test mode).
    let smoke = !std::env::args().any(|a| a == "--bench");
    let mut c = Criterion::default().configure_from_args();
    memcpy_group(&mut c);
    store_group(&mut c);
    c.final_summary();
    ratio_report(smoke);
}
