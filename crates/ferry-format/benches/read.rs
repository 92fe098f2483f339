//! Reading a torch file against reading its bytes plainly: does ferry make a tensor available to
//! the caller at least as fast as `read(2)` makes the file's bytes available?
//!
//! Setup: one 64 MiB bf16 tensor written with `write_torch_zip` into a temporary directory (so the
//! file is in the page cache: these are warm-cache numbers; cold reads are disk-bound for all).
//!
//! * `plain_read`: open the file and `read_exact` all of it into a pre-allocated, already
//!   faulted caller buffer: the baseline, one kernel copy.
//! * `ferry_zero_copy`: `TensorFile::open` + `tensor()` (borrowed from the mapping, no copy) +
//!   a pass that reads every byte (a wrapping sum of u64 lanes). The pass is what makes the
//!   comparison fair: it faults the mapping in, so afterwards every byte is in memory and has
//!   been read once, as after `plain_read`.
//! * `ferry_copy`: `TensorFile::open` + `read_into` a pre-allocated, faulted caller buffer: one
//!   user-space copy out of the mapping.
//!
//! After the Criterion groups the same three are measured again with plain `Instant`s (best of
//! [`RUNS`]) and the ratios `plain_read_time / ferry_time` are printed; the goal is >= 0.8.
//! Run with `cargo bench -p ferry-format --bench read`. Under `cargo test --benches` everything
//! runs once as a smoke test.

use criterion::{Criterion, SamplingMode, Throughput};
use ferry_core::{DType, TensorView};
use ferry_format::{TensorFile, write_torch_zip};
use std::hint::black_box;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Tensor size: an EAGLE3 sample's hidden states are of this order.
const SIZE: usize = 64 << 20;
/// Runs of the ratio pass; the best (fastest) counts.
const RUNS: usize = 7;

struct Setup {
    _dir: tempfile::TempDir,
    path: PathBuf,
    file_len: usize,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("bench.ckpt");
    let data: Vec<u8> = (0..SIZE).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let shape = [1u64, (SIZE / 2 / 4096) as u64, 4096];
    let view = TensorView::new(DType::BFloat16, &shape, &data).expect("view");
    write_torch_zip(&path, &[("hidden_state", view)]).expect("write bench file");
    let file_len = std::fs::metadata(&path).expect("stat").len() as usize;
    Setup { _dir: dir, path, file_len }
}

fn plain_read(path: &Path, buf: &mut [u8]) {
    let mut f = std::fs::File::open(path).expect("open");
    f.read_exact(buf).expect("read");
    black_box(&buf[..]);
}

/// Reads every byte: a wrapping sum of little-endian u64 lanes (vectorised by the compiler).
fn touch(bytes: &[u8]) -> u64 {
    let mut chunks = bytes.chunks_exact(8);
    let mut acc = [0u64; 4];
    for (i, c) in (&mut chunks).enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(c);
        acc[i & 3] = acc[i & 3].wrapping_add(u64::from_le_bytes(b));
    }
    chunks.remainder().iter().fold(acc.iter().fold(0u64, |a, &x| a.wrapping_add(x)), |a, &x| a.wrapping_add(x.into()))
}

fn ferry_zero_copy(path: &Path) -> u64 {
    let file = TensorFile::open(path).expect("open");
    let t = file.tensor("hidden_state").expect("tensor");
    assert!(t.is_borrowed());
    black_box(touch(t.bytes()))
}

fn ferry_copy(path: &Path, buf: &mut [u8]) {
    let file = TensorFile::open(path).expect("open");
    file.read_into("hidden_state", buf).expect("read_into");
    black_box(&buf[..]);
}

fn configure(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes(SIZE as u64));
}

fn best_per_iter(iters: usize, f: impl FnMut()) -> Duration {
    ferry_core::measure::best_per_iter(RUNS as u32, iters as u64, f)
}

fn gbps(per_iter: Duration) -> f64 {
    ferry_core::measure::gbps(SIZE as u64, per_iter)
}

fn main() {
    let smoke = !std::env::args().any(|a| a == "--bench");
    let s = setup();
    let mut file_buf = vec![1u8; s.file_len];
    let mut tensor_buf = vec![1u8; SIZE];

    let mut c = Criterion::default().configure_from_args();
    {
        let mut group = c.benchmark_group("read_64MiB");
        configure(&mut group);
        group.bench_function("plain_read", |b| b.iter(|| plain_read(&s.path, &mut file_buf)));
        group.bench_function("ferry_zero_copy", |b| b.iter(|| ferry_zero_copy(&s.path)));
        group.bench_function("ferry_copy", |b| b.iter(|| ferry_copy(&s.path, &mut tensor_buf)));
        group.finish();
    }
    c.final_summary();

    let iters = if smoke { 1 } else { 30 };
    let plain = best_per_iter(iters, || plain_read(&s.path, &mut file_buf));
    let zero = best_per_iter(iters, || {
        ferry_zero_copy(&s.path);
    });
    let copy = best_per_iter(iters, || ferry_copy(&s.path, &mut tensor_buf));
    println!(
        "plain read: {:.2} ms ({:.2} GB/s); best of {RUNS} x {iters} iterations, warm page cache",
        plain.as_secs_f64() * 1e3,
        gbps(plain)
    );
    for (name, t) in [("ferry zero-copy + touch", zero), ("ferry read_into", copy)] {
        println!(
            "ratio plain_read_time/ferry_time for {name}: {:.2} ({:.2} ms, {:.2} GB/s)",
            plain.as_secs_f64() / t.as_secs_f64().max(1e-12),
            t.as_secs_f64() * 1e3,
            gbps(t)
        );
    }
}
