//! Materializing one batch: validate, describe, plan, then read every sample into the batch.
//!
//! Order of operations (nothing is fetched until every check has passed, so a bad batch takes
//! no lease):
//! 1. §12.2 validation of the refs (the `validate` module).
//! 2. Without a per-sample transform: `store.describe(ref)` for every ref (for lazy `file://`
//!    refs this reads the file header), the strategy maps store names to batch names, and the
//!    collation plan sizes the batch tensors (the `collate` module). Then, per ref in order,
//!    `get_into` reads straight into that sample's row prefix of every batch tensor (the one
//!    copy of the path), the padding tail is filled, and the handle is released at once.
//! 3. With a transform: per ref, describe it, read it into owned pooled buffers, release at
//!    once, run the transform; then plan from the transformed shapes and copy into the batch.
//!    This path costs one more copy per byte (store → owned sample → batch), the price of
//!    letting the transform see and change whole tensors.
//!
//! Offline samples are first processed as SpecForge's offline datasets process them (the
//! strategy says how): cut to `max_len` tokens (only the kept prefix is read, with
//! `get_prefix_into`), and for EAGLE3 the loss mask of the last kept token set to 0. The
//! transform, if any, sees the processed sample, as SpecForge's transform does.
//!
//! Leases: a handle is released right after its read, before any later step can fail, and a
//! failed `get_into`/`get` holds none (the store drops it). So a failure anywhere leaves no
//! lease behind.

use crate::collate::{self, BatchPlan, FeatureEntry, SampleFeatures};
use crate::strategies::{Layout, Strategy};
use crate::validate::validate_batch;
use ferry_core::{BufferPool, Error, JsonMap, Result, SampleId, SampleRef, TensorBuf, TrainBatch};
use ferry_store::FeatureStoreApi;
use indexmap::IndexMap;
use serde_json::Value;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One materialized sample, as a per-sample transform sees it: tensors under their batch names
/// (after the strategy's offline renames).
#[derive(Debug)]
pub struct Sample {
    /// The sample.
    pub sample_id: SampleId,
    /// The ref's metadata.
    pub metadata: JsonMap,
    /// The sample's tensors by batch feature name. A transform may replace, add or remove them;
    /// the batch is planned from what it leaves.
    pub tensors: IndexMap<String, TensorBuf>,
}

/// A per-sample transform; runs on the thread that materializes the batch (a
/// `feature-loader-<i>` worker when `num_workers > 0`).
pub type SampleTransform = dyn Fn(&mut Sample) -> Result<()> + Send + Sync;

/// Runs `store.gc()` at most once per interval, across every thread of a loader.
#[derive(Debug)]
pub(crate) struct GcTimer {
    interval: Duration,
    last: Mutex<Instant>,
}

impl GcTimer {
    pub(crate) fn new(interval: Duration) -> Self {
        GcTimer { interval, last: Mutex::new(Instant::now()) }
    }

    fn maybe_run(&self, store: &dyn FeatureStoreApi) {
        let due = {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            let due = last.elapsed() >= self.interval;
            if due {
                *last = Instant::now();
            }
            due
        };
        if due {
            match store.gc() {
                Ok(report) => tracing::debug!(?report, "feature loader ran store gc"),
                // GC is housekeeping: a failed sweep is retried at the next interval.
                Err(error) => tracing::warn!(%error, "feature loader's store gc failed"),
            }
        }
    }
}

/// What every batch of one loader shares.
pub(crate) struct BatchContext {
    pub(crate) store: Arc<dyn FeatureStoreApi>,
    pub(crate) strategy: Strategy,
    pub(crate) transform: Option<Arc<SampleTransform>>,
    pub(crate) pool: BufferPool,
    pub(crate) gc: Option<GcTimer>,
    /// Offline samples are cut to this many tokens (else to their ref's `metadata.max_len`).
    pub(crate) max_len: Option<u64>,
}

/// Materializes one batch; `Ok(None)` if `stop` was raised before it finished (the pass was
/// closed; nothing is leased).
pub(crate) fn materialize_batch(
    ctx: &BatchContext,
    refs: &[SampleRef],
    stop: &AtomicBool,
) -> Result<Option<TrainBatch>> {
    validate_batch(ctx.strategy.name, refs)?;
    let tensors = match &ctx.transform {
        None => read_into_batch(ctx, refs, stop)?,
        Some(transform) => read_transform_copy(ctx, refs, transform.as_ref(), stop)?,
    };
    let Some(tensors) = tensors else { return Ok(None) };
    let first_meta = refs.first().map(|r| &r.metadata);
    let mut metadata = JsonMap::new();
    for key in ["target_repr", "ttt_length"] {
        metadata.insert(key.into(), first_meta.and_then(|m| m.get(key)).cloned().unwrap_or(Value::Null));
    }
    Ok(Some(TrainBatch {
        sample_ids: refs.iter().map(|r| r.sample_id.clone()).collect(),
        strategy: ctx.strategy.name.to_owned(),
        tensors,
        metadata,
    }))
}

/// The names a ref asks the store for: its `feature_keys`, in order.
fn store_names(r: &SampleRef) -> Result<Vec<&str>> {
    if r.feature_keys.is_empty() {
        return Err(Error::InvalidArgument(format!("ref for sample {} names no features", r.sample_id)));
    }
    Ok(r.feature_keys.keys().map(String::as_str).collect())
}

/// One ref, described: its features under batch names with the shapes the batch will hold
/// (offline samples already cut to `max_len`), and the feature to zero at the last token.
struct Described {
    features: SampleFeatures,
    /// Batch name of the per-token feature whose last kept value is set to zero.
    zero_last: Option<&'static str>,
}

/// The token cut for a ref: the loader's `max_len`, else the ref's `metadata.max_len`.
fn cut_for(ctx: &BatchContext, r: &SampleRef) -> Result<Option<u64>> {
    if let Some(n) = ctx.max_len {
        return Ok(Some(n));
    }
    match r.metadata.get("max_len") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "sample {}: metadata.max_len is {v}, not a non-negative integer; fix the ref or set the loader's max_len",
                r.sample_id
            ))
        }),
    }
}

/// Cuts a per-token shape to `cut` tokens (`(L)`, `(1, L)`, `(L, D)` or `(1, L, D)`).
fn cut_shape(layout: Layout, shape: &mut [u64], cut: u64) {
    let axis = match (layout, shape.len()) {
        (Layout::Tokens, 1) | (Layout::TokenRows, 2) => Some(0),
        (Layout::Tokens, 2) | (Layout::TokenRows, 3) if shape[0] == 1 => Some(1),
        _ => None,
    };
    if let Some(axis) = axis {
        shape[axis] = shape[axis].min(cut);
    }
}

/// Describes one ref: its features under batch names with the store's specs, processed as the
/// strategy processes offline samples.
fn describe(ctx: &BatchContext, r: &SampleRef) -> Result<Described> {
    let specs = ctx.store.describe(r)?;
    let names = store_names(r)?;
    let strategy = &ctx.strategy;
    let mapped = strategy.map_features(r.sample_id.as_str(), &r.metadata, &names)?;
    let offline = strategy.is_offline_sample(&r.metadata, names.iter().copied());
    let cut = if offline && strategy.offline_cut_to_max_len { cut_for(ctx, r)? } else { None };
    let mut features = Vec::with_capacity(mapped.len());
    for (batch_name, store_name) in mapped {
        let spec = specs.get(store_name).ok_or_else(|| Error::NotFound {
            what: format!(
                "feature {store_name:?} of sample {} (the store describes only {:?})",
                r.sample_id,
                specs.keys().collect::<Vec<_>>()
            ),
        })?;
        let mut shape = spec.shape.clone();
        if let (Some(cut), Some(rule)) = (cut, strategy.rule(batch_name)) {
            cut_shape(rule.layout, &mut shape, cut);
        }
        features.push(FeatureEntry {
            batch_name: batch_name.to_owned(),
            store_name: store_name.to_owned(),
            dtype: spec.dtype()?,
            shape,
        });
    }
    let zero_last = if offline { strategy.offline_zero_last } else { None };
    Ok(Described { features: SampleFeatures { sample_id: r.sample_id.clone(), features }, zero_last })
}

/// Zeroes the last element of a sample's per-token feature (its bytes as read).
fn zero_last_element(data: &mut [u8], dtype: ferry_core::DType) {
    let elem = dtype.size();
    if data.len() >= elem {
        let start = data.len() - elem;
        data[start..].fill(0);
    }
}

/// The zero-copy path: plan from specs, then read each sample's (possibly cut) features
/// straight into its row prefixes.
fn read_into_batch(
    ctx: &BatchContext,
    refs: &[SampleRef],
    stop: &AtomicBool,
) -> Result<Option<IndexMap<String, TensorBuf>>> {
    let described = refs.iter().map(|r| describe(ctx, r)).collect::<Result<Vec<_>>>()?;
    let zero_last: Vec<Option<&'static str>> = described.iter().map(|d| d.zero_last).collect();
    let samples: Vec<SampleFeatures> = described.into_iter().map(|d| d.features).collect();
    let plan = collate::plan_batch(&ctx.strategy, &samples)?;
    let mut buffers = plan.allocate(&ctx.pool)?;
    {
        let mut column_rows: Vec<std::vec::IntoIter<&mut [u8]>> = buffers
            .columns
            .iter_mut()
            .zip(&plan.columns)
            .map(|(buf, column)| collate::rows(buf, plan.batch_size, column.row_bytes).into_iter())
            .collect();
        for (i, r) in refs.iter().enumerate() {
            if stop.load(Ordering::Relaxed) {
                return Ok(None);
            }
            let mut dsts: Vec<(&str, &mut [u8])> = Vec::with_capacity(plan.columns.len());
            for (column, rows) in plan.columns.iter().zip(column_rows.iter_mut()) {
                let row = rows.next().ok_or_else(|| missing_row(&column.name, i))?;
                let data = collate::split_and_pad(row, column, i)?;
                let name = column.store_names.get(i).map(String::as_str).unwrap_or_default();
                dsts.push((name, data));
            }
            let handle = ctx.store.get_prefix_into(r, &mut dsts)?;
            ctx.store.release(&handle)?;
            if let Some(name) = zero_last[i]
                && let Some(c) = plan.columns.iter().position(|c| c.name == name)
            {
                zero_last_element(dsts[c].1, plan.columns[c].dtype);
            }
            if let Some(gc) = &ctx.gc {
                gc.maybe_run(ctx.store.as_ref());
            }
        }
    }
    Ok(Some(plan.into_tensors(buffers)?))
}

fn missing_row(column: &str, sample: usize) -> Error {
    Error::InvalidArgument(format!("internal collation error: no row {sample} in batch tensor {column:?}"))
}

/// The transform path: owned samples, transformed, then copied into the batch.
fn read_transform_copy(
    ctx: &BatchContext,
    refs: &[SampleRef],
    transform: &SampleTransform,
    stop: &AtomicBool,
) -> Result<Option<IndexMap<String, TensorBuf>>> {
    let mut samples = Vec::with_capacity(refs.len());
    for r in refs {
        if stop.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let described = describe(ctx, r)?;
        let mut bufs = Vec::with_capacity(described.features.features.len());
        for f in &described.features.features {
            let len = f
                .dtype
                .nbytes_of(&f.shape)
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| Error::InvalidArgument(format!("feature {:?} is too large", f.batch_name)))?;
            let buf = ctx.pool.try_take(len).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "cannot allocate {len} bytes for feature {:?} of sample {}; memory is exhausted",
                    f.batch_name, r.sample_id
                ))
            })?;
            bufs.push(buf);
        }
        {
            let mut dsts: Vec<(&str, &mut [u8])> = described
                .features
                .features
                .iter()
                .zip(bufs.iter_mut())
                .map(|(f, b)| (f.store_name.as_str(), b.as_mut_slice()))
                .collect();
            let handle = ctx.store.get_prefix_into(r, &mut dsts)?;
            ctx.store.release(&handle)?;
        }
        if let Some(gc) = &ctx.gc {
            gc.maybe_run(ctx.store.as_ref());
        }
        let mut tensors = IndexMap::with_capacity(bufs.len());
        for (f, mut buf) in described.features.features.into_iter().zip(bufs) {
            if described.zero_last == Some(f.batch_name.as_str()) {
                zero_last_element(buf.as_mut_slice(), f.dtype);
            }
            tensors.insert(f.batch_name, TensorBuf::new(f.dtype, f.shape, buf)?);
        }
        let mut sample = Sample { sample_id: r.sample_id.clone(), metadata: r.metadata.clone(), tensors };
        transform(&mut sample)?;
        samples.push(sample);
    }
    let shapes: Vec<SampleFeatures> = samples
        .iter()
        .map(|s| SampleFeatures {
            sample_id: s.sample_id.clone(),
            features: s
                .tensors
                .iter()
                .map(|(name, t)| FeatureEntry {
                    batch_name: name.clone(),
                    store_name: name.clone(),
                    dtype: t.dtype(),
                    shape: t.shape().to_vec(),
                })
                .collect(),
        })
        .collect();
    let plan = collate::plan_batch(&ctx.strategy, &shapes)?;
    let mut buffers = plan.allocate(&ctx.pool)?;
    copy_samples(&plan, &mut buffers.columns, &samples)?;
    Ok(Some(plan.into_tensors(buffers)?))
}

fn copy_samples(plan: &BatchPlan, buffers: &mut [ferry_core::AlignedBuf], samples: &[Sample]) -> Result<()> {
    for (column, buf) in plan.columns.iter().zip(buffers.iter_mut()) {
        let rows = collate::rows(buf, plan.batch_size, column.row_bytes);
        for (i, (row, sample)) in rows.into_iter().zip(samples).enumerate() {
            let data = collate::split_and_pad(row, column, i)?;
            let tensor = sample.tensors.get(&column.name).ok_or_else(|| missing_row(&column.name, i))?;
            if data.len() != tensor.bytes().len() {
                return Err(Error::InvalidArgument(format!(
                    "internal collation error: sample {} of {:?} holds {} bytes, planned {}",
                    sample.sample_id,
                    column.name,
                    tensor.bytes().len(),
                    data.len()
                )));
            }
            data.copy_from_slice(tensor.bytes());
        }
    }
    Ok(())
}
