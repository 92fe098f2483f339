//! The store's reference measurement, shared by `ferry bench store` and the Criterion bench
//! (`benches/store.rs`) so both report the same figure: a store round trip (`put` from a
//! borrowed view + `get_into` a caller buffer + consume-once `release`) against a plain memcpy
//! done twice (one copy "in", one "out"), since the store path is one copy per direction.

use crate::FeatureStore;
use ferry_core::{AlignedBuf, DType, JsonMap, Result, TensorView};
use std::hint::black_box;

/// The one sample id every iteration uses: consume-once frees it, so the next put reuses the
/// backend's pooled, already-faulted buffer.
pub const SAMPLE_ID: &str = "bench:0";

/// Source, staging and destination buffers of one size, all warm (every page written, non-zero
/// so no shared zero page). Staging is an [`AlignedBuf`], the memory the store's pool hands out
/// (an anonymous mapping advised for huge pages when large), so the baseline differs from the
/// store only in what the store adds.
pub struct RoundTrip {
    src: Vec<u8>,
    staging: AlignedBuf,
    dst: Vec<u8>,
    /// The sample is one `(1, size / 2)` bfloat16 tensor, like a hidden state.
    shape: [u64; 2],
}

impl RoundTrip {
    /// Buffers for samples of `size` bytes (`size` must be even: the tensor is bf16).
    pub fn new(size: usize) -> RoundTrip {
        let mut staging = AlignedBuf::zeroed(size);
        staging.fill(2);
        RoundTrip { src: vec![1; size], staging, dst: vec![3; size], shape: [1, size as u64 / 2] }
    }

    /// The floor: one copy in (src to staging) and one out (staging to dst).
    pub fn memcpy_2x(&mut self) {
        self.staging.copy_from_slice(black_box(&self.src));
        self.dst.copy_from_slice(black_box(&self.staging));
        black_box(&mut self.dst);
    }

    /// `put` + `get_into` + `release` of one sample through `store`.
    pub fn round_trip(&mut self, store: &FeatureStore) -> Result<()> {
        let view = TensorView::new(DType::BFloat16, &self.shape, &self.src)?;
        let r = store.put(SAMPLE_ID, &[("hidden_state", view)], JsonMap::new())?;
        let handle = store.get_into(&r, &mut [("hidden_state", &mut self.dst[..])])?;
        store.release(&handle)?;
        black_box(&mut self.dst);
        Ok(())
    }
}
