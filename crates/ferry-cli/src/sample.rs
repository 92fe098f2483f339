//! Synthetic EAGLE3 online samples (`SPECFORGE-RUNTIME.md` §18): `hidden_state` (1, L, 3H)
//! bfloat16 (three capture layers concatenated; `aux_hidden_state` in offline files), `target`
//! (1, L, H) bfloat16 (`target_repr=hidden_state`), and `input_ids`, `loss_mask`,
//! `attention_mask` (1, L) int64: (8H + 24) bytes per token.
//!
//! A [`Sample`] owns one set of buffers and is refilled in place for each sample index, so a run
//! of many samples allocates (and page-faults) once. Contents are deterministic per index, so a
//! read-back can be checked against the checksum of what was put.

use ferry_core::{AlignedBuf, DType, JsonMap, TensorView};
use half::bf16;

/// Vocabulary size used for synthetic token ids (Qwen3's).
const VOCAB: u64 = 151_936;
/// Bytes of fresh pseudo-random data per float feature; the rest of the buffer repeats it
/// (copies are fast even in a debug build, generating every element is not).
const SEED_BLOCK: usize = 64 << 10;

/// The dimensions of an EAGLE3 sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Eagle3Shape {
    /// Tokens (L).
    pub(crate) seq_len: u64,
    /// Target hidden size (H).
    pub(crate) hidden: u64,
}

impl Eagle3Shape {
    /// (name, dtype, shape) of each feature, in put order.
    pub(crate) fn features(&self) -> [(&'static str, DType, Vec<u64>); 5] {
        let (l, h) = (self.seq_len, self.hidden);
        [
            ("hidden_state", DType::BFloat16, vec![1, l, 3 * h]),
            ("target", DType::BFloat16, vec![1, l, h]),
            ("input_ids", DType::Int64, vec![1, l]),
            ("loss_mask", DType::Int64, vec![1, l]),
            ("attention_mask", DType::Int64, vec![1, l]),
        ]
    }

    /// Bytes per sample, `(8H + 24) L`; `None` on overflow.
    pub(crate) fn bytes(&self) -> Option<u64> {
        self.hidden.checked_mul(8)?.checked_add(24)?.checked_mul(self.seq_len)
    }

    /// One line describing the layout.
    pub(crate) fn describe(&self) -> String {
        self.features()
            .iter()
            .map(|(name, dtype, shape)| format!("{name} {} {dtype}", shape_text(shape)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `(1, 2048, 3072)`, as Python prints a shape.
pub(crate) fn shape_text(shape: &[u64]) -> String {
    let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
    format!("({})", dims.join(", "))
}

/// One feature's buffer.
struct Feature {
    name: &'static str,
    dtype: DType,
    shape: Vec<u64>,
    buf: AlignedBuf,
}

/// A set of EAGLE3 feature buffers: a sample to put, or the caller's buffers to read into.
pub(crate) struct Sample {
    features: Vec<Feature>,
}

impl Sample {
    /// Buffers for `shape`, every page already written (so no timed copy pays first-touch
    /// faults). Fails if a feature does not fit in memory addressing.
    pub(crate) fn new(shape: Eagle3Shape) -> anyhow::Result<Sample> {
        let mut features = Vec::new();
        for (name, dtype, dims) in shape.features() {
            let len = dims.iter().try_fold(dtype.size() as u64, |acc, d| acc.checked_mul(*d));
            let len = len.and_then(|n| usize::try_from(n).ok()).ok_or_else(|| {
                anyhow::anyhow!("feature {name} of shape {} is too large for this machine", shape_text(&dims))
            })?;
            let mut buf = AlignedBuf::zeroed(len);
            buf.fill(0xa5);
            features.push(Feature { name, dtype, shape: dims, buf });
        }
        Ok(Sample { features })
    }

    /// Total bytes.
    pub(crate) fn nbytes(&self) -> u64 {
        self.features.iter().map(|f| f.buf.len() as u64).sum()
    }

    /// Overwrites every byte with sample `index`'s deterministic contents.
    pub(crate) fn fill(&mut self, index: u64) {
        for (k, f) in self.features.iter_mut().enumerate() {
            let mut rng = SplitMix64::new(index.wrapping_mul(0x9e37_79b9).wrapping_add(k as u64));
            match f.name {
                "hidden_state" | "target" => fill_bf16(&mut f.buf, &mut rng),
                "input_ids" => fill_i64(&mut f.buf, |_| (rng.next_u64() % VOCAB) as i64),
                // The first quarter is the prompt (no loss), the rest the response.
                "loss_mask" => {
                    let prompt = f.buf.len() / 8 / 4;
                    fill_i64(&mut f.buf, |t| i64::from(t >= prompt))
                }
                _ => fill_i64(&mut f.buf, |_| 1), // attention_mask: unpadded, all ones
            }
        }
    }

    /// Borrowed views of every feature, for `put`.
    pub(crate) fn views(&self) -> anyhow::Result<Vec<(&str, TensorView<'_>)>> {
        self.features.iter().map(|f| Ok((f.name, TensorView::new(f.dtype, &f.shape, &f.buf)?))).collect()
    }

    /// Every feature's buffer by name, for `get_into`.
    pub(crate) fn dsts(&mut self) -> Vec<(&str, &mut [u8])> {
        self.features.iter_mut().map(|f| (f.name, f.buf.as_mut_slice())).collect()
    }

    /// A checksum of every feature's name and bytes: CRC-32 (SIMD, many GB/s, so checking a
    /// sample costs little next to moving it) of the names and bytes, beside the total length.
    /// Not cryptographic, but any misplaced, stale or torn byte changes it.
    pub(crate) fn checksum(&self) -> u64 {
        checksum_of(self.features.iter().map(|f| (f.name, f.buf.as_slice())))
    }
}

/// [`Sample::checksum`] over `(name, bytes)` pairs, in order (what a reader computes over what
/// it read).
pub(crate) fn checksum_of<'a>(features: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> u64 {
    let mut crc = crc32fast::Hasher::new();
    let mut len = 0u64;
    for (name, bytes) in features {
        crc.update(name.as_bytes());
        crc.update(bytes);
        len += (name.len() + bytes.len()) as u64;
    }
    (len << 32) | u64::from(crc.finalize())
}

/// SpecForge-style put metadata for a demo sample.
pub(crate) fn metadata(run_id: &str, shape: Eagle3Shape) -> JsonMap {
    let mut m = JsonMap::new();
    m.insert("run_id".into(), run_id.into());
    m.insert("strategy".into(), "eagle3".into());
    m.insert("target_repr".into(), "hidden_state".into());
    m.insert("num_tokens".into(), shape.seq_len.into());
    m
}

/// Hidden-state-like values in [-2, 2): a fresh block, then copies of it.
fn fill_bf16(buf: &mut [u8], rng: &mut SplitMix64) {
    let block = buf.len().min(SEED_BLOCK);
    for pair in buf[..block].chunks_exact_mut(2) {
        let x = (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0;
        pair.copy_from_slice(&bf16::from_f32(x).to_le_bytes());
    }
    let mut done = block;
    while done < buf.len() {
        let n = done.min(buf.len() - done);
        buf.copy_within(0..n, done);
        done += n;
    }
}

fn fill_i64(buf: &mut [u8], mut value: impl FnMut(usize) -> i64) {
    for (t, word) in buf.chunks_exact_mut(8).enumerate() {
        word.copy_from_slice(&value(t).to_le_bytes());
    }
}

/// A tiny deterministic generator (Vigna's SplitMix64); quality is irrelevant here.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_specforge_bytes_per_token() {
        let shape = Eagle3Shape { seq_len: 2048, hidden: 4096 };
        assert_eq!(shape.bytes(), Some(67_158_016)); // §18: EAGLE3 Qwen3-8B, L = 2048
        let small = Eagle3Shape { seq_len: 16, hidden: 8 };
        let sample = Sample::new(small).unwrap();
        assert_eq!(sample.nbytes(), small.bytes().unwrap());
    }

    #[test]
    fn contents_are_deterministic_per_index() {
        let shape = Eagle3Shape { seq_len: 64, hidden: 32 };
        let mut a = Sample::new(shape).unwrap();
        let mut b = Sample::new(shape).unwrap();
        a.fill(3);
        b.fill(3);
        assert_eq!(a.checksum(), b.checksum());
        b.fill(4);
        assert_ne!(a.checksum(), b.checksum());
    }
}
