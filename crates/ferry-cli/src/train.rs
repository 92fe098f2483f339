//! The stand-in training step every consumer role runs: no model trains here, so a step reads
//! each collated batch the feature loader yields and records, per sample, a checksum of the
//! bytes the trainer would see. Every topology (colocated offline, disaggregated offline,
//! online) runs the same loader and this same step, so their records can be compared sample
//! by sample: the equivalence suite and `ferry demo` check exactly-once delivery and identical
//! bytes with it.
//!
//! A sample's real tokens are the ones its row of `attention_mask` marks (the loader generates
//! the mask where samples carry none, and pads it with 0); its checksum covers, for every other
//! batch feature in name order, the row's first `L` tokens: what a producer computes over the
//! sample it put ([`crate::sample::canonical_checksum`]).

use ferry_core::{DType, Error, Result, TrainBatch};

/// The batch feature that marks real tokens.
const MASK: &str = "attention_mask";

/// `(sample id, checksum)` for every sample of `batch`, in batch order.
pub(crate) fn batch_checksums(batch: &TrainBatch) -> Result<Vec<(String, u64)>> {
    let rows = batch.sample_ids.len();
    let lengths = real_lengths(batch)?;
    let mut sums = Vec::with_capacity(rows);
    for (row, id) in batch.sample_ids.iter().enumerate() {
        let mut features = Vec::with_capacity(batch.tensors.len());
        for (name, tensor) in &batch.tensors {
            if name == MASK {
                continue;
            }
            let shape = tensor.shape();
            let (Some(&b), Some(&padded)) = (shape.first(), shape.get(1)) else {
                return Err(Error::InvalidArgument(format!(
                    "batch feature {name} has shape {shape:?}: a per-token feature is (batch, tokens, ...)"
                )));
            };
            if b as usize != rows || padded == 0 {
                return Err(Error::InvalidArgument(format!(
                    "batch feature {name} has shape {shape:?} for {rows} samples"
                )));
            }
            let row_bytes = tensor.bytes().len() / rows;
            let token_bytes = row_bytes / padded as usize;
            let start = row * row_bytes;
            features.push((name.as_str(), &tensor.bytes()[start..start + lengths[row] * token_bytes]));
        }
        sums.push((id.to_string(), crate::sample::canonical_checksum(features)));
    }
    Ok(sums)
}

/// Each row's real token count: the 1s of its `attention_mask` row (an int64 `(B, Lmax)`).
fn real_lengths(batch: &TrainBatch) -> Result<Vec<usize>> {
    let mask = batch.tensors.get(MASK).ok_or_else(|| {
        Error::InvalidArgument(format!("batch of strategy {} has no {MASK}: cannot tell real tokens", batch.strategy))
    })?;
    if mask.dtype() != DType::Int64 {
        return Err(Error::InvalidArgument(format!("{MASK} is {}, expected int64", mask.dtype())));
    }
    let values = mask.as_elements::<i64>()?;
    let rows = batch.sample_ids.len().max(1);
    let padded = values.len() / rows;
    Ok(values.chunks(padded.max(1)).map(|row| row.iter().filter(|&&v| v != 0).count()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::{SampleId, TensorBuf};
    use indexmap::IndexMap;

    fn batch(mask: &[i64], ids: &[i64], padded: u64) -> TrainBatch {
        let rows = (mask.len() as u64) / padded;
        let mut tensors = IndexMap::new();
        tensors.insert("input_ids".to_owned(), TensorBuf::from_elements(vec![rows, padded], ids).unwrap());
        tensors.insert(MASK.to_owned(), TensorBuf::from_elements(vec![rows, padded], mask).unwrap());
        TrainBatch {
            sample_ids: (0..rows).map(|i| SampleId::from(format!("s:{i}"))).collect(),
            strategy: "eagle3".into(),
            tensors,
            metadata: Default::default(),
        }
    }

    #[test]
    fn padding_never_reaches_a_checksum() {
        // Row 0 has 2 real tokens, row 1 has 3; the pad value differs between the two batches.
        let a = batch(&[1, 1, 0, 1, 1, 1], &[7, 8, 0, 4, 5, 6], 3);
        let b = batch(&[1, 1, 0, 1, 1, 1], &[7, 8, 99, 4, 5, 6], 3);
        assert_eq!(batch_checksums(&a).unwrap(), batch_checksums(&b).unwrap());
        let alone = batch(&[1, 1], &[7, 8], 2);
        assert_eq!(batch_checksums(&alone).unwrap()[0], batch_checksums(&a).unwrap()[0]);
        let changed = batch(&[1, 1, 0, 1, 1, 1], &[7, 9, 0, 4, 5, 6], 3);
        assert_ne!(batch_checksums(&changed).unwrap()[0], batch_checksums(&a).unwrap()[0]);
    }

    #[test]
    fn a_batch_without_a_mask_is_refused_with_the_reason() {
        let mut b = batch(&[1, 1], &[7, 8], 2);
        b.tensors.shift_remove(MASK);
        assert!(batch_checksums(&b).unwrap_err().to_string().contains("no attention_mask"));
    }
}
