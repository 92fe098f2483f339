//! Collation: from each sample's feature shapes to one batch tensor per feature.
//!
//! The plan is made before any byte is read, from specs alone, so the loader can allocate the
//! batch tensors first and then read every sample straight into its row:
//!
//! ```text
//! batch tensor (B, Lmax, D), row-major          sample i holds (L_i, D) or (1, L_i, D)
//! row 0: [ sample 0: L_0 * D elems | pad ]      row i's first L_i * D elements are exactly
//! row 1: [ sample 1: L_1 * D elems     ]        sample i's bytes, so `get_into` reads into
//! row 2: [ sample 2 | pad               ]       that prefix; the tail is filled with the pad
//! ```
//!
//! Per-token features (`(L)` / `(1, L)`) are the same with `D = 1`; fixed-shape features are
//! stacked (every row is exactly one sample). Padding is always at the end of the token axis,
//! to the longest sample of the batch. Rows come from a buffer pool, so every byte of a row is
//! written (sample bytes or pad), never left from a previous batch.

use crate::strategies::{AttentionMask, Layout, PadValue, Strategy};
use ferry_core::{AlignedBuf, BufferPool, DType, Error, Result, SampleId, TensorBuf};
use half::{bf16, f16};
use indexmap::IndexMap;

/// One feature of one sample, as the plan sees it.
#[derive(Debug, Clone)]
pub(crate) struct FeatureEntry {
    /// Name in the batch (after offline renames).
    pub(crate) batch_name: String,
    /// Name in the store (what `get_into` is asked for).
    pub(crate) store_name: String,
    /// Element type.
    pub(crate) dtype: DType,
    /// Per-sample shape.
    pub(crate) shape: Vec<u64>,
}

/// One sample's features, in fetch order.
#[derive(Debug, Clone)]
pub(crate) struct SampleFeatures {
    pub(crate) sample_id: SampleId,
    pub(crate) features: Vec<FeatureEntry>,
}

/// One batch tensor: where each sample's bytes go and how its row is padded.
#[derive(Debug)]
pub(crate) struct Column {
    pub(crate) name: String,
    pub(crate) dtype: DType,
    pub(crate) pad: PadValue,
    /// Store name per sample.
    pub(crate) store_names: Vec<String>,
    /// Bytes of each sample's own data (the row prefix).
    pub(crate) sample_bytes: Vec<usize>,
    /// Bytes of one row (one sample's padded slot).
    pub(crate) row_bytes: usize,
    /// The batch tensor's shape.
    pub(crate) batch_shape: Vec<u64>,
}

/// Everything needed to allocate and fill one batch.
#[derive(Debug)]
pub(crate) struct BatchPlan {
    pub(crate) batch_size: usize,
    pub(crate) columns: Vec<Column>,
    /// Each sample's token count (from its sequence features); empty without any.
    pub(crate) lengths: Vec<u64>,
    /// The longest sample.
    pub(crate) max_len: u64,
    /// The attention mask to generate, if any.
    pub(crate) generated_mask: Option<String>,
}

fn too_large(what: &str) -> Error {
    Error::InvalidArgument(format!("{what} is too large to collate on this host"))
}

fn to_usize(v: u64, what: &str) -> Result<usize> {
    usize::try_from(v).map_err(|_| too_large(what))
}

/// A sample's token count and per-token width for a sequence feature of this shape.
fn token_geometry(layout: Layout, shape: &[u64]) -> Option<(u64, u64)> {
    match (layout, shape) {
        (Layout::Tokens, [len]) | (Layout::Tokens, [1, len]) => Some((*len, 1)),
        (Layout::TokenRows, [len, width]) | (Layout::TokenRows, [1, len, width]) => Some((*len, *width)),
        _ => None,
    }
}

fn expected_shapes(layout: Layout) -> &'static str {
    match layout {
        Layout::Tokens => "(L) or (1, L)",
        Layout::TokenRows => "(L, D) or (1, L, D)",
        Layout::Fixed => "one shape shared by every sample",
    }
}

/// Plans a batch: checks that the samples can be collated (same feature names, dtypes,
/// widths and fixed shapes; one token count per sample) and sizes every batch tensor.
pub(crate) fn plan_batch(strategy: &Strategy, samples: &[SampleFeatures]) -> Result<BatchPlan> {
    let Some(first) = samples.first() else {
        return Err(Error::InvalidArgument("cannot collate an empty batch".into()));
    };
    let names = |s: &SampleFeatures| s.features.iter().map(|f| f.batch_name.clone()).collect::<Vec<_>>();
    for s in &samples[1..] {
        let same = s.features.len() == first.features.len()
            && s.features.iter().all(|f| first.features.iter().any(|g| g.batch_name == f.batch_name));
        if !same {
            return Err(Error::InvalidArgument(format!(
                "batch cannot be collated: sample {} has features {:?} but sample {} has {:?}",
                first.sample_id,
                names(first),
                s.sample_id,
                names(s)
            )));
        }
    }
    let batch_size = samples.len();
    let mut lengths: Vec<Option<(u64, &str)>> = vec![None; batch_size];
    let mut geometry = Vec::with_capacity(first.features.len());
    for reference in &first.features {
        let name = reference.batch_name.as_str();
        let rule = strategy.rule(name);
        let layout = rule.map_or(Layout::Fixed, |r| r.layout);
        let pad = rule.map_or(PadValue::Zero, |r| r.pad);
        pad_element(reference.dtype, pad, name)?;
        let mut per_sample = Vec::with_capacity(batch_size);
        let mut width = None;
        for (i, s) in samples.iter().enumerate() {
            let Some(entry) = s.features.iter().find(|f| f.batch_name == name) else {
                return Err(Error::InvalidArgument(format!("sample {} lacks feature {name:?}", s.sample_id)));
            };
            if entry.dtype != reference.dtype {
                return Err(Error::InvalidArgument(format!(
                    "feature {name:?} is {} in sample {} but {} in sample {}",
                    reference.dtype, first.sample_id, entry.dtype, s.sample_id
                )));
            }
            if layout == Layout::Fixed {
                if entry.shape != reference.shape {
                    return Err(Error::InvalidArgument(format!(
                        "feature {name:?} has shape {:?} in sample {} but {:?} in sample {}; strategy {:?} has no rule that pads it (give it a Tokens or TokenRows FeatureRule)",
                        reference.shape, first.sample_id, entry.shape, s.sample_id, strategy.name
                    )));
                }
                per_sample.push(0);
                continue;
            }
            let Some((len, w)) = token_geometry(layout, &entry.shape) else {
                return Err(Error::InvalidArgument(format!(
                    "feature {name:?} of sample {} has shape {:?}; strategy {:?} expects {}",
                    s.sample_id,
                    entry.shape,
                    strategy.name,
                    expected_shapes(layout)
                )));
            };
            match width {
                None => width = Some(w),
                Some(w0) if w0 != w => {
                    return Err(Error::InvalidArgument(format!(
                        "feature {name:?} has width {w0} in sample {} but {w} in sample {}",
                        first.sample_id, s.sample_id
                    )));
                }
                Some(_) => {}
            }
            match lengths[i] {
                None => lengths[i] = Some((len, name)),
                Some((other, other_name)) if other != len => {
                    return Err(Error::InvalidArgument(format!(
                        "sample {} has {other} tokens in {other_name:?} but {len} in {name:?}",
                        s.sample_id
                    )));
                }
                Some(_) => {}
            }
            per_sample.push(len);
        }
        geometry.push((reference, layout, pad, width.unwrap_or(0), per_sample));
    }
    let has_sequence = lengths.iter().any(Option::is_some);
    let lengths: Vec<u64> = lengths.iter().map(|l| l.map_or(0, |(len, _)| len)).collect();
    let max_len = lengths.iter().copied().max().unwrap_or(0);

    let mut columns = Vec::with_capacity(geometry.len());
    for (reference, layout, pad, width, per_sample) in geometry {
        let name = reference.batch_name.as_str();
        let elem = reference.dtype.size() as u64;
        let (row_elems, sample_elems, batch_shape): (u64, Vec<u64>, Vec<u64>) = match layout {
            Layout::Fixed => {
                let numel = ferry_core::contracts::checked_numel(&reference.shape).ok_or_else(|| too_large(name))?;
                let mut shape = vec![batch_size as u64];
                shape.extend_from_slice(&reference.shape);
                (numel, vec![numel; batch_size], shape)
            }
            Layout::Tokens => (max_len, per_sample, vec![batch_size as u64, max_len]),
            Layout::TokenRows => {
                let row = max_len.checked_mul(width).ok_or_else(|| too_large(name))?;
                let elems = per_sample.iter().map(|l| l.checked_mul(width).ok_or_else(|| too_large(name)));
                (row, elems.collect::<Result<_>>()?, vec![batch_size as u64, max_len, width])
            }
        };
        let row_bytes = to_usize(row_elems.checked_mul(elem).ok_or_else(|| too_large(name))?, name)?;
        row_bytes.checked_mul(batch_size).ok_or_else(|| too_large(name))?;
        let sample_bytes = sample_elems
            .iter()
            .map(|e| e.checked_mul(elem).ok_or_else(|| too_large(name)).and_then(|b| to_usize(b, name)))
            .collect::<Result<Vec<_>>>()?;
        columns.push(Column {
            name: name.to_owned(),
            dtype: reference.dtype,
            pad,
            store_names: samples
                .iter()
                .map(|s| {
                    s.features.iter().find(|f| f.batch_name == name).map(|f| f.store_name.clone()).unwrap_or_default()
                })
                .collect(),
            sample_bytes,
            row_bytes,
            batch_shape,
        });
    }

    let generated_mask = match strategy.attention_mask {
        AttentionMask::Generate { name } if !columns.iter().any(|c| c.name == name) => {
            if !has_sequence {
                return Err(Error::InvalidArgument(format!(
                    "strategy {:?} generates {name:?} but the batch has no per-token feature to measure lengths from",
                    strategy.name
                )));
            }
            Some(name.to_owned())
        }
        _ => None,
    };
    Ok(BatchPlan {
        batch_size,
        columns,
        lengths: if has_sequence { lengths } else { Vec::new() },
        max_len,
        generated_mask,
    })
}

/// Batch buffers for a plan, one per column (the mask comes last), from the pool.
pub(crate) struct BatchBuffers {
    pub(crate) columns: Vec<AlignedBuf>,
    pub(crate) mask: Option<AlignedBuf>,
}

fn take(pool: &BufferPool, len: usize, what: &str) -> Result<AlignedBuf> {
    pool.try_take(len).ok_or_else(|| {
        Error::InvalidArgument(format!("cannot allocate {len} bytes for batch tensor {what:?}; memory is exhausted"))
    })
}

impl BatchPlan {
    /// Takes the batch buffers from the pool (their contents are stale until filled).
    pub(crate) fn allocate(&self, pool: &BufferPool) -> Result<BatchBuffers> {
        let columns = self
            .columns
            .iter()
            .map(|c| take(pool, c.row_bytes * self.batch_size, &c.name))
            .collect::<Result<Vec<_>>>()?;
        let mask = match &self.generated_mask {
            Some(name) => {
                let row =
                    to_usize(self.max_len, name)?.checked_mul(DType::Int64.size()).ok_or_else(|| too_large(name))?;
                let len = row.checked_mul(self.batch_size).ok_or_else(|| too_large(name))?;
                let mut buf = take(pool, len, name)?;
                fill_mask(&mut buf, &self.lengths, row);
                Some(buf)
            }
            None => None,
        };
        Ok(BatchBuffers { columns, mask })
    }

    /// Wraps the filled buffers as the batch's tensors, in plan order, mask last.
    pub(crate) fn into_tensors(self, buffers: BatchBuffers) -> Result<IndexMap<String, TensorBuf>> {
        let mut tensors = IndexMap::with_capacity(self.columns.len() + 1);
        for (column, buf) in self.columns.into_iter().zip(buffers.columns) {
            tensors.insert(column.name, TensorBuf::new(column.dtype, column.batch_shape, buf)?);
        }
        if let (Some(name), Some(buf)) = (self.generated_mask, buffers.mask) {
            let shape = vec![self.batch_size as u64, self.max_len];
            tensors.insert(name, TensorBuf::new(DType::Int64, shape, buf)?);
        }
        Ok(tensors)
    }
}

/// Splits a batch buffer into its rows (empty rows when a row holds no bytes).
pub(crate) fn rows(buf: &mut [u8], batch_size: usize, row_bytes: usize) -> Vec<&mut [u8]> {
    if row_bytes == 0 {
        return (0..batch_size).map(|_| <&mut [u8]>::default()).collect();
    }
    buf.chunks_exact_mut(row_bytes).collect()
}

/// Splits a row into the sample's prefix and the padding tail, and fills the tail.
pub(crate) fn split_and_pad<'a>(row: &'a mut [u8], column: &Column, sample: usize) -> Result<&'a mut [u8]> {
    let own = column.sample_bytes.get(sample).copied().unwrap_or(usize::MAX);
    let row_len = row.len();
    let (data, tail) = row.split_at_mut_checked(own).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "internal collation error: sample {sample} of {:?} needs {own} bytes in a {row_len}-byte row",
            column.name
        ))
    })?;
    fill_pad(tail, column.dtype, column.pad, &column.name)?;
    Ok(data)
}

/// One element's little-endian bytes for a pad value (at most 8).
pub(crate) fn pad_element(dtype: DType, pad: PadValue, feature: &str) -> Result<Vec<u8>> {
    let out_of_range =
        || Error::InvalidArgument(format!("pad value {pad:?} of feature {feature:?} does not fit its dtype {dtype}"));
    let int = |v: i64| -> Result<Vec<u8>> {
        Ok(match dtype {
            DType::Int64 => v.to_le_bytes().to_vec(),
            DType::Int32 => i32::try_from(v).map_err(|_| out_of_range())?.to_le_bytes().to_vec(),
            DType::Int16 => i16::try_from(v).map_err(|_| out_of_range())?.to_le_bytes().to_vec(),
            DType::Int8 => i8::try_from(v).map_err(|_| out_of_range())?.to_le_bytes().to_vec(),
            DType::UInt8 => vec![u8::try_from(v).map_err(|_| out_of_range())?],
            DType::Bool if v == 0 || v == 1 => vec![v as u8],
            DType::Bool => return Err(out_of_range()),
            DType::Float64 => (v as f64).to_le_bytes().to_vec(),
            DType::Float32 => (v as f32).to_le_bytes().to_vec(),
            DType::Float16 => f16::from_f64(v as f64).to_le_bytes().to_vec(),
            DType::BFloat16 => bf16::from_f64(v as f64).to_le_bytes().to_vec(),
        })
    };
    match pad {
        PadValue::Zero => Ok(vec![0; dtype.size()]),
        PadValue::Int(v) => int(v),
        PadValue::Float(v) => Ok(match dtype {
            DType::Float64 => v.to_le_bytes().to_vec(),
            DType::Float32 => (v as f32).to_le_bytes().to_vec(),
            DType::Float16 => f16::from_f64(v).to_le_bytes().to_vec(),
            DType::BFloat16 => bf16::from_f64(v).to_le_bytes().to_vec(),
            _ => return Err(out_of_range()),
        }),
    }
}

/// Fills padding bytes with the pad value.
pub(crate) fn fill_pad(tail: &mut [u8], dtype: DType, pad: PadValue, feature: &str) -> Result<()> {
    if pad == PadValue::Zero {
        tail.fill(0);
        return Ok(());
    }
    let element = pad_element(dtype, pad, feature)?;
    for slot in tail.chunks_exact_mut(element.len()) {
        slot.copy_from_slice(&element);
    }
    Ok(())
}

/// Writes an int64 attention mask: row i holds `lengths[i]` ones, then zeros.
fn fill_mask(buf: &mut [u8], lengths: &[u64], row_bytes: usize) {
    let one = 1i64.to_le_bytes();
    for (row, len) in rows(buf, lengths.len(), row_bytes).into_iter().zip(lengths) {
        let real = usize::try_from(*len).unwrap_or(usize::MAX).saturating_mul(one.len()).min(row.len());
        let (ones, zeros) = row.split_at_mut(real);
        for slot in ones.chunks_exact_mut(one.len()) {
            slot.copy_from_slice(&one);
        }
        zeros.fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategies::DFLASH;

    fn entry(name: &str, dtype: DType, shape: &[u64]) -> FeatureEntry {
        FeatureEntry { batch_name: name.into(), store_name: name.into(), dtype, shape: shape.to_vec() }
    }

    fn sample(id: &str, len: u64) -> SampleFeatures {
        SampleFeatures {
            sample_id: id.into(),
            features: vec![
                entry("input_ids", DType::Int64, &[1, len]),
                entry("loss_mask", DType::Int64, &[1, len]),
                entry("hidden_states", DType::BFloat16, &[1, len, 6]),
            ],
        }
    }

    #[test]
    fn plan_pads_to_the_longest_and_generates_a_mask() {
        let plan = plan_batch(&DFLASH, &[sample("a", 3), sample("b", 5)]).unwrap();
        assert_eq!(plan.max_len, 5);
        assert_eq!(plan.lengths, [3, 5]);
        let hidden = &plan.columns[2];
        assert_eq!(hidden.batch_shape, [2, 5, 6]);
        assert_eq!(hidden.sample_bytes, [3 * 6 * 2, 5 * 6 * 2]);
        assert_eq!(hidden.row_bytes, 5 * 6 * 2);
        assert_eq!(plan.generated_mask.as_deref(), Some("attention_mask"));
        let pool = BufferPool::new(1 << 20);
        let buffers = plan.allocate(&pool).unwrap();
        let mask: Vec<i64> =
            buffers.mask.as_ref().unwrap().chunks(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(mask, [1, 1, 1, 0, 0, 1, 1, 1, 1, 1]);
    }

    #[test]
    fn inconsistent_samples_are_refused_with_names() {
        let mut b = sample("b", 4);
        b.features[2].shape = vec![1, 4, 7];
        let err = plan_batch(&DFLASH, &[sample("a", 3), b]).unwrap_err().to_string();
        assert!(err.contains("width 6 in sample a but 7 in sample b"), "{err}");
        let mut c = sample("c", 4);
        c.features[1].shape = vec![1, 5];
        let err = plan_batch(&DFLASH, &[c]).unwrap_err().to_string();
        assert!(err.contains("4 tokens in \"input_ids\" but 5 in \"loss_mask\""), "{err}");
        let mut d = sample("d", 4);
        d.features[2].shape = vec![2, 4, 6];
        let err = plan_batch(&DFLASH, &[d]).unwrap_err().to_string();
        assert!(err.contains("expects (L, D) or (1, L, D)"), "{err}");
    }

    #[test]
    fn unknown_features_stack_when_shapes_match() {
        let mut a = sample("a", 2);
        a.features.push(entry("score", DType::Float32, &[3]));
        let mut b = sample("b", 2);
        b.features.push(entry("score", DType::Float32, &[3]));
        let plan = plan_batch(&DFLASH, &[a.clone(), b]).unwrap();
        assert_eq!(plan.columns[3].batch_shape, [2, 3]);
        let mut c = sample("c", 2);
        c.features.push(entry("score", DType::Float32, &[4]));
        let err = plan_batch(&DFLASH, &[a, c]).unwrap_err().to_string();
        assert!(err.contains("no rule that pads it"), "{err}");
    }

    #[test]
    fn pad_values_convert_per_dtype() {
        assert_eq!(pad_element(DType::Int32, PadValue::Int(-1), "x").unwrap(), (-1i32).to_le_bytes());
        assert_eq!(pad_element(DType::BFloat16, PadValue::Float(1.0), "x").unwrap(), [0x80, 0x3f]);
        assert!(pad_element(DType::Int8, PadValue::Int(300), "x").is_err());
        assert!(pad_element(DType::Int64, PadValue::Float(0.5), "x").is_err());
        let mut tail = [9u8; 8];
        fill_pad(&mut tail, DType::Int16, PadValue::Int(-100), "x").unwrap();
        assert_eq!(tail, [0x9c, 0xff, 0x9c, 0xff, 0x9c, 0xff, 0x9c, 0xff]);
    }
}
