//! `ferry synth`: synthetic samples written as an offline feature dump, one PyTorch zip `.ckpt`
//! per sample in SpecForge's layout (`rows_<g>-<g+1000>/data_<i>.ckpt`), plus
//! `checksums.jsonl` with each sample's canonical checksum ([`crate::sample::canonical_checksum`]).
//!
//! Sample `i` is `Sample::fill(sample_index(seed, 0, N, i))`: the bytes `ferry produce --seed
//! <seed> --samples N` puts for prompt `i` of epoch 0, so an online run and an offline run over
//! this dump can be checked against each other. Numbers in paths are zero-padded to 8 digits, so
//! the lexicographic order in which readers list files (`list_feature_files`) is index order, and
//! the file of sample `i` is offline sample `<run id>:<i as 8 digits>`.
//!
//! File keys follow SpecForge's offline layouts (`ferry_loader::strategies`):
//! * EAGLE3: `input_ids`, `loss_mask` (L) int64, `hidden_state` (1, L, H) bf16 (the sample's
//!   `target`), `aux_hidden_state` (1, L, 3H) bf16 (the sample's `hidden_state`); no
//!   `attention_mask` (a loader generates it).
//! * DFlash: `input_ids`, `loss_mask` (1, L) int64, `hidden_states` (1, L, K·H) bf16.

use crate::args::SynthArgs;
use crate::measure::{fmt_bytes, fmt_gbps};
use crate::online::sample_index;
use crate::sample::{Sample, SampleShape, Strategy};
use anyhow::{Context, Result, bail};
use ferry_core::{DType, TensorView};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Samples per `rows_<g>-<g+GROUP>` folder (SpecForge's `prepare_hidden_states.py`).
pub(crate) const GROUP: u64 = 1000;
/// The checksums file, in the output folder.
pub(crate) const CHECKSUMS_FILE: &str = "checksums.jsonl";
/// The most samples 8-digit names can number.
const MAX_SAMPLES: u64 = 100_000_000;

/// What `ferry synth` will do.
#[derive(Debug)]
pub(crate) struct Plan {
    out: PathBuf,
    samples: u64,
    seed: u64,
    shape: SampleShape,
    workers: usize,
}

impl Plan {
    /// Validates the arguments.
    pub(crate) fn from_args(args: SynthArgs) -> Result<Plan> {
        let shape = SampleShape::new(args.strategy, args.seq_len, args.min_seq_len, args.hidden, args.layers)?;
        if args.samples == 0 || args.samples > MAX_SAMPLES {
            bail!("--samples must be in 1..={MAX_SAMPLES} (file names have 8 digits), got {}", args.samples);
        }
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let workers = args.workers.map_or(cores, usize::from).min(usize::try_from(args.samples).unwrap_or(usize::MAX));
        Ok(Plan { out: args.out, samples: args.samples, seed: args.seed, shape, workers: workers.max(1) })
    }
}

/// Where sample `index`'s file goes, relative to the output folder:
/// `rows_<g>-<g+1000>/data_<index>.ckpt`, every number 8 digits.
pub(crate) fn file_path(index: u64) -> PathBuf {
    let g = index / GROUP * GROUP;
    PathBuf::from(format!("rows_{g:08}-{:08}", g + GROUP)).join(format!("data_{index:08}.ckpt"))
}

/// The current sample's features under its offline file's keys, in SpecForge's key order.
/// `tokens` is `[L]`, the shape of EAGLE3's 1-D `input_ids` and `loss_mask`.
pub(crate) fn offline_tensors<'a>(
    strategy: Strategy,
    views: &[(&str, TensorView<'a>)],
    tokens: &'a [u64],
) -> Result<Vec<(&'static str, TensorView<'a>)>> {
    let get = |name: &str| {
        views.iter().find(|(n, _)| *n == name).map(|(_, v)| *v).with_context(|| format!("the sample has no {name}"))
    };
    let flat =
        |name: &str| -> Result<TensorView<'a>> { Ok(TensorView::new(DType::Int64, tokens, get(name)?.bytes())?) };
    Ok(match strategy {
        Strategy::Eagle3 => vec![
            ("input_ids", flat("input_ids")?),
            ("loss_mask", flat("loss_mask")?),
            ("hidden_state", get("target")?),
            ("aux_hidden_state", get("hidden_state")?),
        ],
        Strategy::Dflash => vec![
            ("input_ids", get("input_ids")?),
            ("loss_mask", get("loss_mask")?),
            ("hidden_states", get("hidden_states")?),
        ],
    })
}

/// What one worker wrote: `(index, checksum)` per sample, tensor bytes, file bytes.
#[derive(Default)]
struct Written {
    checksums: Vec<(u64, u64)>,
    tensor_bytes: u64,
    file_bytes: u64,
}

/// Writes the samples `first, first + step, ...` below `plan.out`.
fn write_every(plan: &Plan, first: u64, step: u64, stop: &AtomicBool) -> Result<Written> {
    let mut sample = Sample::new(plan.shape)?;
    let mut written = Written::default();
    let mut i = first;
    while i < plan.samples && !stop.load(Ordering::Relaxed) {
        sample.fill(sample_index(plan.seed, 0, plan.samples, i));
        let tokens = [sample.seq_len()];
        let views = sample.views()?;
        let tensors = offline_tensors(plan.shape.strategy, &views, &tokens)?;
        let path = plan.out.join(file_path(i));
        ferry_format::write_torch_zip(&path, &tensors).with_context(|| format!("writing {}", path.display()))?;
        written.tensor_bytes += tensors.iter().map(|(_, v)| v.nbytes()).sum::<u64>();
        written.file_bytes += std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?.len();
        written.checksums.push((i, sample.checksum()));
        i += step;
    }
    Ok(written)
}

/// Refuses a folder that already holds anything: an older dump's files would be listed with
/// this one's.
fn prepare_out(out: &Path) -> Result<()> {
    if out.exists() {
        let mut entries = std::fs::read_dir(out).with_context(|| format!("listing {}", out.display()))?;
        if entries.next().is_some() {
            bail!(
                "{} is not empty: an earlier dump's files would be read with this one's; remove it or choose another folder",
                out.display()
            );
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))
}

/// Runs `ferry synth`.
pub(crate) fn run(plan: &Plan, out: &mut dyn Write) -> Result<()> {
    prepare_out(&plan.out)?;
    let started = Instant::now();
    for g in (0..plan.samples).step_by(GROUP as usize) {
        let dir = plan.out.join(file_path(g).parent().map(Path::to_path_buf).unwrap_or_default());
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let stop = AtomicBool::new(false);
    let step = plan.workers as u64;
    let results: Vec<Result<Written>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..step)
            .map(|w| {
                let stop = &stop;
                s.spawn(move || {
                    let r = write_every(plan, w, step, stop);
                    if r.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a writer thread panicked"))))
            .collect()
    });
    let mut all = Written::default();
    for r in results {
        let w = r?;
        all.checksums.extend(w.checksums);
        all.tensor_bytes += w.tensor_bytes;
        all.file_bytes += w.file_bytes;
    }
    all.checksums.sort_unstable();
    let mut text = String::with_capacity(all.checksums.len() * 48);
    for (i, sum) in &all.checksums {
        text.push_str(&json!({"key": format!("{i:08}"), "checksum": sum}).to_string());
        text.push('\n');
    }
    let checksums = plan.out.join(CHECKSUMS_FILE);
    std::fs::write(&checksums, text).with_context(|| format!("writing {}", checksums.display()))?;
    let elapsed = started.elapsed().as_secs_f64();
    writeln!(
        out,
        "wrote {} {} sample files to {} ({} of tensors, {} on disk) in {elapsed:.2} s ({} GB/s, {} writers); \
         checksums in {CHECKSUMS_FILE}",
        all.checksums.len(),
        plan.shape.strategy.name(),
        plan.out.display(),
        fmt_bytes(all.tensor_bytes),
        fmt_bytes(all.file_bytes),
        fmt_gbps(all.file_bytes as f64 / elapsed.max(1e-9) / 1e9),
        plan.workers,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn file_paths_sort_in_index_order() {
        assert_eq!(file_path(0), Path::new("rows_00000000-00001000/data_00000000.ckpt"));
        assert_eq!(file_path(12_345), Path::new("rows_00012000-00013000/data_00012345.ckpt"));
        let indices = [0, 1, 9, 10, 999, 1000, 1999, 2000, 9999, 10_000, 123_456, 99_999_999];
        let mut paths: Vec<PathBuf> = indices.iter().map(|&i| file_path(i)).collect();
        let in_order = paths.clone();
        paths.sort();
        assert_eq!(paths, in_order);
    }

    #[test]
    fn offline_keys_are_the_loader_strategies_raw_keys() {
        for (strategy, layers) in [(Strategy::Eagle3, None), (Strategy::Dflash, Some(2))] {
            let shape = SampleShape::new(strategy, 10, Some(3), 4, layers).unwrap();
            let mut sample = Sample::new(shape).unwrap();
            sample.fill(6);
            let l = sample.seq_len();
            let tokens = [l];
            let views = sample.views().unwrap();
            let tensors = offline_tensors(strategy, &views, &tokens).unwrap();
            let keys: Vec<String> = tensors.iter().map(|(k, _)| (*k).to_owned()).collect();
            assert_eq!(keys, crate::strategy::offline_raw_keys(strategy.name()).unwrap(), "{strategy:?}");
            let shape_of = |k: &str| tensors.iter().find(|(n, _)| *n == k).unwrap().1.shape().to_vec();
            match strategy {
                Strategy::Eagle3 => {
                    assert_eq!(shape_of("input_ids"), [l]);
                    assert_eq!(shape_of("loss_mask"), [l]);
                    assert_eq!(shape_of("hidden_state"), [1, l, 4]);
                    assert_eq!(shape_of("aux_hidden_state"), [1, l, 12]);
                }
                Strategy::Dflash => {
                    assert_eq!(shape_of("input_ids"), [1, l]);
                    assert_eq!(shape_of("hidden_states"), [1, l, 8]);
                }
            }
            // Under the batch's names (EAGLE3's offline renames), the file's bytes give the
            // sample's canonical checksum.
            let renamed = tensors.iter().map(|(k, v)| {
                let name = match (strategy, *k) {
                    (Strategy::Eagle3, "aux_hidden_state") => "hidden_state",
                    (Strategy::Eagle3, "hidden_state") => "target",
                    (_, k) => k,
                };
                (name, v.bytes())
            });
            assert_eq!(crate::sample::canonical_checksum(renamed), sample.checksum());
        }
    }
}
