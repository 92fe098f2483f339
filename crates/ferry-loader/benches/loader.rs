//! Loader throughput against memcpy: does the loader collate a batch with one copy per byte?
//!
//! The data: [`SAMPLES`] offline EAGLE3 samples with `L` = 1024 tokens and `H` = 1024 (about
//! 8 MiB each: `aux_hidden_state` (1, L, 3H) and `hidden_state` (1, L, H) bf16, `input_ids` and
//! `loss_mask` (L) int64) in a `mem://` store that retains on release, read in batches of
//! [`BATCH`] (about 64 MiB of collated tensors per batch).
//!
//! * `memcpy/batch`: the floor. One plain copy of a batch's collated bytes into a warm buffer.
//! * `loader/workers=<W>`: one pass (all batches) through [`FeatureLoader`]; every batch is
//!   dropped at once, so its buffers go back to the loader's pool (warm, no page faults). The
//!   path per byte is one `get_into` copy from the store's buffer into the batch row.
//! * `loader-file/workers=<W>`: the offline path users run: the same samples written as
//!   `torch.save`-format `.ckpt` files, every other one 3/4 as long (so rows are padded), read
//!   through lazy `file://` refs (no specs: each file's header is parsed by `describe`, then its
//!   mapping is copied into the batch; one open per sample per pass). The files sit in the page
//!   cache after the warm-up pass, as a dataset that fits in memory does.
//!
//! With 2 workers two threads copy at once while the memcpy floor is one thread, so the
//! per-byte efficiency is the 0- and 1-worker ratios; the 2-worker ratio shows what the loader
//! delivers to a trainer on this 2-core machine.
//!
//! Throughput is collated bytes per second (every tensor of every batch, the generated
//! attention mask included). After the Criterion groups, the same run measures memcpy and the
//! loader again with plain [`Instant`]s (best of [`RUNS`]) and prints `ratio loader/memcpy`
//! per worker count; the goal is >= 0.5. Run with `cargo bench -p ferry-loader --bench loader`.
//! Under `cargo test --benches` every benchmark runs once and the ratio pass is a smoke run.

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use ferry_core::{AlignedBuf, JsonMap, TensorView};
use ferry_loader::{FeatureLoader, RefSource};
use ferry_store::{FeatureStore, StoreOptions, open_store};
use half::bf16;
use std::hint::black_box;
use std::time::Duration;

/// Tokens per sample.
const L: u64 = 1024;
/// Hidden size (aux states are 3H wide).
const H: u64 = 1024;
/// Samples per batch.
const BATCH: usize = 8;
/// Samples in the store: two batches per pass.
const SAMPLES: usize = 16;
/// Runs of the self-contained ratio measurement; the best (fastest) run counts.
const RUNS: usize = 5;
/// Worker counts measured (0 = inline on the iterating thread).
const WORKERS: [usize; 3] = [0, 1, 2];

/// The samples as offline `.ckpt` files (every other one 3/4 as long), and lazy refs to them.
fn offline_files() -> (tempfile::TempDir, FeatureStore, Vec<ferry_core::SampleRef>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let aux = vec![bf16::from_f32(1.5); (L * 3 * H) as usize];
    let last = vec![bf16::from_f32(2.5); (L * H) as usize];
    let ids: Vec<i64> = (0..L as i64).collect();
    for i in 0..SAMPLES {
        let len = if i % 2 == 0 { L } else { L * 3 / 4 };
        let n = len as usize;
        let group = i / 2 * 2;
        let path = dir.path().join(format!("rows_{group}-{}/data_{i}.ckpt", group + 2));
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        ferry_format::write_torch_zip(
            &path,
            &[
                ("input_ids", TensorView::from_elements(&[len], &ids[..n]).expect("view")),
                ("loss_mask", TensorView::from_elements(&[len], &ids[..n]).expect("view")),
                ("hidden_state", TensorView::from_elements(&[1, len, H], &last[..n * H as usize]).expect("view")),
                (
                    "aux_hidden_state",
                    TensorView::from_elements(&[1, len, 3 * H], &aux[..n * 3 * H as usize]).expect("view"),
                ),
            ],
        )
        .expect("write .ckpt");
    }
    let options = ferry_store::offline::OfflineRefOptions { max_len: L as i64, ..Default::default() };
    let refs = ferry_store::offline::offline_refs(dir.path(), &options, false).expect("offline refs");
    let store = open_store("mem://files", StoreOptions { retain_on_release: true, ..Default::default() })
        .expect("mem:// store opens");
    (dir, store, refs)
}

/// A `mem://` store holding the samples, and their refs.
fn offline_store() -> (FeatureStore, Vec<ferry_core::SampleRef>) {
    let store = open_store("mem://bench", StoreOptions { retain_on_release: true, ..Default::default() })
        .expect("mem:// store opens");
    let ids: Vec<i64> = (0..L as i64).collect();
    let aux = vec![bf16::from_f32(1.5); (L * 3 * H) as usize];
    let last = vec![bf16::from_f32(2.5); (L * H) as usize];
    let (tokens, aux_shape, last_shape) = ([L], [1, L, 3 * H], [1, L, H]);
    let mut metadata = JsonMap::new();
    metadata.insert("target_repr".into(), "hidden_state".into());
    metadata.insert("ttt_length".into(), 7.into());
    let refs = (0..SAMPLES)
        .map(|i| {
            store
                .put(
                    format!("bench:{i:08}"),
                    &[
                        ("input_ids", TensorView::from_elements(&tokens, &ids).expect("view")),
                        ("loss_mask", TensorView::from_elements(&tokens, &ids).expect("view")),
                        ("aux_hidden_state", TensorView::from_elements(&aux_shape, &aux).expect("view")),
                        ("hidden_state", TensorView::from_elements(&last_shape, &last).expect("view")),
                    ],
                    metadata.clone(),
                )
                .expect("put")
        })
        .collect();
    (store, refs)
}

fn loader(store: &FeatureStore, refs: &[ferry_core::SampleRef], workers: usize) -> FeatureLoader {
    FeatureLoader::builder(store.clone(), RefSource::Fixed(refs.to_vec()))
        .batch_size(BATCH)
        .num_workers(workers)
        .gc_interval(None)
        .build()
        .expect("loader builds")
}

/// One pass; returns the collated bytes it produced.
fn pass(loader: &mut FeatureLoader) -> usize {
    loader
        .iter()
        .map(|batch| {
            let batch = batch.expect("batch");
            black_box(batch.tensors.values().map(|t| t.bytes().len()).sum::<usize>())
        })
        .sum()
}

/// Source and destination of one batch's bytes, both warm and huge-page advised like the
/// loader's pooled buffers.
struct Memcpy {
    src: AlignedBuf,
    dst: AlignedBuf,
}

impl Memcpy {
    fn new(bytes: usize) -> Memcpy {
        let mut src = AlignedBuf::zeroed(bytes);
        src.fill(1);
        let mut dst = AlignedBuf::zeroed(bytes);
        dst.fill(2);
        Memcpy { src, dst }
    }

    fn copy(&mut self) {
        self.dst.copy_from_slice(black_box(&self.src));
        black_box(&mut self.dst);
    }
}

fn configure(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
}

fn best_per_iter(iters: usize, f: impl FnMut()) -> Duration {
    ferry_core::measure::best_per_iter(RUNS as u32, iters as u64, f)
}

fn gbps(bytes: usize, per_iter: Duration) -> f64 {
    ferry_core::measure::gbps(bytes as u64, per_iter)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not (Criterion's test mode).
    let smoke = !std::env::args().any(|a| a == "--bench");
    let (store, refs) = offline_store();
    let pass_bytes = pass(&mut loader(&store, &refs, 0));
    let batch_bytes = pass_bytes / (SAMPLES / BATCH);

    let mut c = Criterion::default().configure_from_args();
    {
        let mut group = c.benchmark_group("memcpy");
        configure(&mut group);
        group.throughput(Throughput::Bytes(batch_bytes as u64));
        let mut bufs = Memcpy::new(batch_bytes);
        group.bench_function("batch", |b| b.iter(|| bufs.copy()));
        group.finish();
    }
    {
        let mut group = c.benchmark_group("loader");
        configure(&mut group);
        group.throughput(Throughput::Bytes(pass_bytes as u64));
        for workers in WORKERS {
            let mut loader = loader(&store, &refs, workers);
            group.bench_function(BenchmarkId::new("workers", workers), |b| b.iter(|| pass(&mut loader)));
        }
        group.finish();
    }
    let (_files, file_store, file_refs) = offline_files();
    let file_pass_bytes = pass(&mut loader(&file_store, &file_refs, 0));
    {
        let mut group = c.benchmark_group("loader-file");
        configure(&mut group);
        group.throughput(Throughput::Bytes(file_pass_bytes as u64));
        for workers in WORKERS {
            let mut loader = loader(&file_store, &file_refs, workers);
            group.bench_function(BenchmarkId::new("workers", workers), |b| b.iter(|| pass(&mut loader)));
        }
        group.finish();
    }
    c.final_summary();

    let iters = if smoke { 1 } else { 8 };
    let mut bufs = Memcpy::new(batch_bytes);
    let memcpy = best_per_iter(iters * SAMPLES / BATCH, || bufs.copy());
    drop(bufs);
    println!(
        "collated bytes per batch: {batch_bytes} ({:.1} MiB, {BATCH} samples of L={L}, H={H}); memcpy {:.2} GB/s",
        batch_bytes as f64 / f64::from(1 << 20),
        gbps(batch_bytes, memcpy)
    );
    for (source, store, refs, bytes) in [
        ("mem:// refs, equal lengths", &store, &refs, pass_bytes),
        ("file:// .ckpt refs, mixed lengths", &file_store, &file_refs, file_pass_bytes),
    ] {
        for workers in WORKERS {
            let mut loader = loader(store, refs, workers);
            let per_pass = best_per_iter(iters, || {
                pass(&mut loader);
            });
            let loader_gbps = gbps(bytes, per_pass);
            println!(
                "ratio loader/memcpy, {source}, {workers} worker(s): {:.2} (loader {loader_gbps:.2} GB/s, memcpy {:.2} GB/s; best of {RUNS} x {iters} passes)",
                loader_gbps / gbps(batch_bytes, memcpy),
                gbps(batch_bytes, memcpy)
            );
        }
    }
    assert_eq!(store.health().active_leases, 0, "the loader left leases behind");
}
