//! Synthetic online samples (`SPECFORGE-RUNTIME.md` §18), per draft strategy:
//!
//! * EAGLE3: `hidden_state` (1, L, 3H) bfloat16 (three capture layers concatenated;
//!   `aux_hidden_state` in offline files), `target` (1, L, H) bfloat16
//!   (`target_repr=hidden_state`), and `input_ids`, `loss_mask`, `attention_mask` (1, L) int64:
//!   (8H + 24) bytes per token.
//! * DFlash: `input_ids`, `loss_mask` (1, L) int64 and `hidden_states` (1, L, K·H) bfloat16 (K
//!   target capture layers): (2KH + 16) bytes per token.
//!
//! Sequences are unpadded, so L varies per sample: [`SampleShape::seq_len_of`] draws it
//! deterministically from the sample index, uniform in `[min_len, max_len]`.
//!
//! A [`Sample`] owns one set of buffers sized for the longest sample and is refilled in place
//! for each sample index, so a run of many samples allocates (and page-faults) once. Contents
//! are deterministic per index, so a read-back can be checked against the checksum of what was
//! put. The loss mask is 0 over the prompt (the first quarter) and at the last token, 1 between:
//! SpecForge's offline EAGLE3 processing zeroes the last kept token's loss mask, so synthetic
//! data that already has it reads back the same online and offline.

use ferry_core::{AlignedBuf, DType, JsonMap, TensorView};
use half::bf16;

/// Vocabulary size used for synthetic token ids (Qwen3's).
const VOCAB: u64 = 151_936;
/// Bytes of fresh pseudo-random data per float feature; the rest of the buffer repeats it
/// (copies are fast even in a debug build, generating every element is not).
const SEED_BLOCK: usize = 64 << 10;
/// EAGLE3's capture layers (concatenated in `hidden_state`).
const EAGLE3_LAYERS: u64 = 3;
/// DFlash's default number of target capture layers (Qwen3-8B's draft config).
pub(crate) const DFLASH_DEFAULT_LAYERS: u64 = 5;
/// The feature a loader derives (all ones for unpadded samples); not part of the checksum.
const ATTENTION_MASK: &str = "attention_mask";

/// The draft strategy whose online sample layout to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Strategy {
    /// Three capture layers (1, L, 3H) and the last hidden state (1, L, H) in bf16, token ids
    /// and loss mask in int64 (online also an all-ones attention mask).
    Eagle3,
    /// K capture layers (1, L, K·H) in bf16 (see --layers), token ids and loss mask in int64.
    Dflash,
}

impl Strategy {
    /// SpecForge's name (`metadata.strategy`).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Strategy::Eagle3 => "eagle3",
            Strategy::Dflash => "dflash",
        }
    }
}

/// The dimensions of a strategy's samples, with a sequence-length distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SampleShape {
    /// Which layout.
    pub(crate) strategy: Strategy,
    /// Shortest sequence (tokens).
    pub(crate) min_len: u64,
    /// Longest sequence (tokens); buffers are sized for it.
    pub(crate) max_len: u64,
    /// Target hidden size (H).
    pub(crate) hidden: u64,
    /// Capture layers concatenated in the hidden-state input (3 for EAGLE3, K for DFlash).
    pub(crate) layers: u64,
}

impl SampleShape {
    /// A shape from the command line's flags: `seq_len` is the longest sequence, `min_seq_len`
    /// the shortest (default: `seq_len`, i.e. fixed), `layers` DFlash's K (default 5; EAGLE3
    /// always has 3). Errors name the flag at fault.
    pub(crate) fn new(
        strategy: Strategy,
        seq_len: u64,
        min_seq_len: Option<u64>,
        hidden: u64,
        layers: Option<u64>,
    ) -> anyhow::Result<SampleShape> {
        let min_len = min_seq_len.unwrap_or(seq_len);
        if seq_len == 0 || min_len == 0 {
            anyhow::bail!("--seq-len and --min-seq-len must be at least 1 token (got {seq_len} and {min_len})");
        }
        if min_len > seq_len {
            anyhow::bail!("--min-seq-len {min_len} is more than --seq-len {seq_len} (the longest sequence)");
        }
        if hidden == 0 {
            anyhow::bail!("--hidden must be at least 1");
        }
        let layers = match (strategy, layers) {
            (Strategy::Eagle3, None) => EAGLE3_LAYERS,
            (Strategy::Eagle3, Some(k)) => {
                anyhow::bail!("--layers {k} applies to --strategy dflash only (EAGLE3 always captures 3 layers)")
            }
            (Strategy::Dflash, None) => DFLASH_DEFAULT_LAYERS,
            (Strategy::Dflash, Some(0)) => anyhow::bail!("--layers must be at least 1"),
            (Strategy::Dflash, Some(k)) => k,
        };
        let shape = SampleShape { strategy, min_len, max_len: seq_len, hidden, layers };
        let fits = shape.max_bytes().is_some_and(|b| usize::try_from(b).is_ok())
            && shape.features(seq_len).iter().all(|(_, dtype, dims)| feature_len(*dtype, dims).is_some());
        if !fits {
            anyhow::bail!(
                "a {} sample of L={seq_len} H={hidden}{} is too large for this machine",
                strategy.name(),
                if strategy == Strategy::Dflash { format!(" K={layers}") } else { String::new() }
            );
        }
        Ok(shape)
    }

    /// A fixed-length EAGLE3 shape.
    #[cfg(test)]
    pub(crate) fn eagle3(seq_len: u64, hidden: u64) -> SampleShape {
        SampleShape { strategy: Strategy::Eagle3, min_len: seq_len, max_len: seq_len, hidden, layers: EAGLE3_LAYERS }
    }

    /// The sequence length of sample `index`: uniform in `[min_len, max_len]`, a deterministic
    /// function of the index (so a regenerated sample has the same length).
    pub(crate) fn seq_len_of(&self, index: u64) -> u64 {
        if self.min_len >= self.max_len {
            return self.max_len;
        }
        let draw = SplitMix64::new(index.wrapping_mul(0x9e37_79b9).wrapping_add(0x6c65_6e67)).next_u64();
        match (self.max_len - self.min_len).checked_add(1) {
            Some(span) => self.min_len + draw % span,
            None => draw.max(self.min_len),
        }
    }

    /// (name, dtype, shape) of each feature of an `l`-token sample, in put order.
    pub(crate) fn features(&self, l: u64) -> Vec<(&'static str, DType, Vec<u64>)> {
        let h = self.hidden;
        match self.strategy {
            Strategy::Eagle3 => vec![
                ("hidden_state", DType::BFloat16, vec![1, l, EAGLE3_LAYERS.saturating_mul(h)]),
                ("target", DType::BFloat16, vec![1, l, h]),
                ("input_ids", DType::Int64, vec![1, l]),
                ("loss_mask", DType::Int64, vec![1, l]),
                (ATTENTION_MASK, DType::Int64, vec![1, l]),
            ],
            Strategy::Dflash => vec![
                ("input_ids", DType::Int64, vec![1, l]),
                ("loss_mask", DType::Int64, vec![1, l]),
                ("hidden_states", DType::BFloat16, vec![1, l, self.layers.saturating_mul(h)]),
            ],
        }
    }

    /// Bytes per token: `8H + 24` (EAGLE3), `2KH + 16` (DFlash); `None` on overflow.
    pub(crate) fn bytes_per_token(&self) -> Option<u64> {
        match self.strategy {
            Strategy::Eagle3 => self.hidden.checked_mul(8)?.checked_add(24),
            Strategy::Dflash => self.layers.checked_mul(self.hidden)?.checked_mul(2)?.checked_add(16),
        }
    }

    /// Bytes of an `l`-token sample; `None` on overflow.
    pub(crate) fn bytes(&self, l: u64) -> Option<u64> {
        self.bytes_per_token()?.checked_mul(l)
    }

    /// Bytes of the longest sample (what one set of buffers holds).
    pub(crate) fn max_bytes(&self) -> Option<u64> {
        self.bytes(self.max_len)
    }

    /// One line describing the layout; a variable length shows as `L` with its range.
    pub(crate) fn describe(&self) -> String {
        let fixed = self.min_len == self.max_len;
        let features = self
            .features(self.max_len)
            .iter()
            .map(|(name, dtype, shape)| {
                let dims: Vec<String> = shape
                    .iter()
                    .enumerate()
                    .map(|(axis, d)| if axis == 1 && !fixed { "L".to_owned() } else { d.to_string() })
                    .collect();
                format!("{name} ({}) {dtype}", dims.join(", "))
            })
            .collect::<Vec<_>>()
            .join(", ");
        if fixed { features } else { format!("{features}; L uniform in [{}, {}]", self.min_len, self.max_len) }
    }
}

/// `(1, 2048, 3072)`, as Python prints a shape.
pub(crate) fn shape_text(shape: &[u64]) -> String {
    let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
    format!("({})", dims.join(", "))
}

/// Byte length of a feature of `dims`, if it fits in memory addressing.
fn feature_len(dtype: DType, dims: &[u64]) -> Option<usize> {
    let len = dims.iter().try_fold(dtype.size() as u64, |acc, d| acc.checked_mul(*d))?;
    usize::try_from(len).ok()
}

/// One feature's buffer, sized for the longest sample.
struct Feature {
    name: &'static str,
    dtype: DType,
    /// The current sample's shape (token axis 1).
    shape: Vec<u64>,
    /// Bytes per token.
    row: usize,
    buf: AlignedBuf,
}

impl Feature {
    fn bytes(&self, len: usize) -> &[u8] {
        &self.buf[..self.row * len]
    }
}

/// A set of feature buffers: a sample to put, or the caller's buffers to read into. Holds one
/// sample at a time, of the current length (the last [`Sample::fill`] or [`Sample::set_index`]).
pub(crate) struct Sample {
    shape: SampleShape,
    /// Current length (tokens).
    len: u64,
    features: Vec<Feature>,
}

impl Sample {
    /// Buffers for `shape`'s longest sample, every page already written (so no timed copy pays
    /// first-touch faults); the current length is the longest. Fails if a feature does not fit
    /// in memory addressing.
    pub(crate) fn new(shape: SampleShape) -> anyhow::Result<Sample> {
        let mut features = Vec::new();
        for (name, dtype, dims) in shape.features(shape.max_len) {
            let len = feature_len(dtype, &dims).ok_or_else(|| {
                anyhow::anyhow!("feature {name} of shape {} is too large for this machine", shape_text(&dims))
            })?;
            let row = feature_len(dtype, &dims[2..]).unwrap_or(0);
            let mut buf = AlignedBuf::zeroed(len);
            buf.fill(0xa5);
            features.push(Feature { name, dtype, shape: dims, row, buf });
        }
        Ok(Sample { shape, len: shape.max_len, features })
    }

    /// The current sample's length (tokens).
    pub(crate) fn seq_len(&self) -> u64 {
        self.len
    }

    /// Sets the current length to sample `index`'s without writing any byte: what a reader
    /// does before [`Sample::dsts`] so the buffers are exactly that sample's size.
    pub(crate) fn set_index(&mut self, index: u64) {
        self.len = self.shape.seq_len_of(index);
        for f in &mut self.features {
            f.shape[1] = self.len;
        }
    }

    /// The current length as a buffer index (it fits: the longest sample's buffers exist).
    fn tokens(&self) -> usize {
        usize::try_from(self.len).unwrap_or(usize::MAX)
    }

    /// The current sample's bytes.
    pub(crate) fn nbytes(&self) -> u64 {
        let l = self.tokens();
        self.features.iter().map(|f| f.bytes(l).len() as u64).sum()
    }

    /// Makes this sample `index`: its length, and every byte of it its deterministic contents.
    pub(crate) fn fill(&mut self, index: u64) {
        self.set_index(index);
        let l = self.tokens();
        for (k, f) in self.features.iter_mut().enumerate() {
            let mut rng = SplitMix64::new(index.wrapping_mul(0x9e37_79b9).wrapping_add(k as u64));
            let buf = &mut f.buf[..f.row * l];
            match f.dtype {
                DType::BFloat16 => fill_bf16(buf, &mut rng),
                _ => match f.name {
                    "input_ids" => fill_i64(buf, |_| (rng.next_u64() % VOCAB) as i64),
                    // The first quarter is the prompt (no loss), the rest the response but for
                    // the last token (nothing follows it to predict).
                    "loss_mask" => {
                        let prompt = l / 4;
                        fill_i64(buf, |t| i64::from(t >= prompt && t + 1 < l))
                    }
                    _ => fill_i64(buf, |_| 1), // attention_mask: unpadded, all ones
                },
            }
        }
    }

    /// Borrowed views of the current sample's features, for `put`.
    pub(crate) fn views(&self) -> anyhow::Result<Vec<(&str, TensorView<'_>)>> {
        let l = self.tokens();
        self.features.iter().map(|f| Ok((f.name, TensorView::new(f.dtype, &f.shape, f.bytes(l))?))).collect()
    }

    /// The current sample's buffer of every feature by name, for `get_into`.
    pub(crate) fn dsts(&mut self) -> Vec<(&str, &mut [u8])> {
        let l = self.tokens();
        self.features.iter_mut().map(|f| (f.name, &mut f.buf[..f.row * l])).collect()
    }

    /// The canonical checksum of the current sample ([`canonical_checksum`] of its features).
    pub(crate) fn checksum(&self) -> u64 {
        let l = self.tokens();
        canonical_checksum(self.features.iter().map(|f| (f.name, f.bytes(l))))
    }

    /// SpecForge-style put metadata for the current sample.
    pub(crate) fn metadata(&self, run_id: &str) -> JsonMap {
        let mut m = JsonMap::new();
        m.insert("run_id".into(), run_id.into());
        m.insert("strategy".into(), self.shape.strategy.name().into());
        if self.shape.strategy == Strategy::Eagle3 {
            m.insert("target_repr".into(), "hidden_state".into());
        }
        m.insert("num_tokens".into(), self.len.into());
        m
    }
}

/// A checksum of `(name, bytes)` pairs, in the given order: CRC-32 (SIMD, many GB/s, so
/// checking a sample costs little next to moving it) of the names and bytes, beside the total
/// length. Not cryptographic, but any misplaced, stale or torn byte changes it.
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

/// The checksum [`Sample::checksum`] gives, from `(name, bytes)` pairs in any order: the
/// features sorted by name, `attention_mask` left out (a loader derives it, and DFlash samples
/// lack it), through [`checksum_of`]. Names are the batch's (`hidden_state`, `target`, ...),
/// and the bytes one sample's `L` tokens (an unpadded row of a collated batch), so a trainer can
/// check what it got against what the producer put or `ferry synth` wrote.
pub(crate) fn canonical_checksum<'a>(features: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> u64 {
    let mut kept: Vec<(&str, &[u8])> = features.into_iter().filter(|(name, _)| *name != ATTENTION_MASK).collect();
    kept.sort_by(|a, b| a.0.cmp(b.0));
    checksum_of(kept)
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
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn varying(strategy: Strategy, min: u64, max: u64, hidden: u64) -> SampleShape {
        SampleShape::new(strategy, max, Some(min), hidden, None).unwrap()
    }

    fn i64s(bytes: &[u8]) -> Vec<i64> {
        bytes.chunks_exact(8).map(|w| i64::from_le_bytes(w.try_into().unwrap())).collect()
    }

    fn view<'a>(views: &'a [(&str, TensorView<'a>)], name: &str) -> &'a TensorView<'a> {
        &views.iter().find(|(n, _)| *n == name).unwrap().1
    }

    #[test]
    fn layout_matches_specforge_bytes_per_token() {
        let shape = SampleShape::eagle3(2048, 4096);
        assert_eq!(shape.max_bytes(), Some(67_158_016)); // §18: EAGLE3 Qwen3-8B, L = 2048
        let small = SampleShape::eagle3(16, 8);
        let sample = Sample::new(small).unwrap();
        assert_eq!(sample.nbytes(), small.max_bytes().unwrap());
    }

    #[test]
    fn dflash_layout_matches_specforge_bytes() {
        // §18: DFlash Qwen3-8B at L = 3072 (K = 5) and a 1-layer auto draft.
        let shape = SampleShape::new(Strategy::Dflash, 3072, None, 4096, None).unwrap();
        assert_eq!((shape.layers, shape.max_bytes()), (5, Some(125_878_272)));
        let one = SampleShape::new(Strategy::Dflash, 3072, None, 4096, Some(1)).unwrap();
        assert_eq!(one.max_bytes(), Some(25_214_976));

        let small = SampleShape::new(Strategy::Dflash, 12, None, 4, Some(2)).unwrap();
        let mut sample = Sample::new(small).unwrap();
        sample.fill(5);
        let views = sample.views().unwrap();
        let names: Vec<&str> = views.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["input_ids", "loss_mask", "hidden_states"]);
        assert_eq!(view(&views, "hidden_states").shape(), &[1, 12, 8]);
        assert_eq!(view(&views, "hidden_states").dtype(), DType::BFloat16);
        assert_eq!(view(&views, "input_ids").shape(), &[1, 12]);
        assert_eq!(sample.nbytes(), (2 * 2 * 4 + 16) * 12);
        assert_eq!(sample.metadata("r")["strategy"], "dflash");
        assert!(sample.metadata("r").get("target_repr").is_none());
    }

    #[test]
    fn contents_are_deterministic_per_index() {
        let shape = SampleShape::eagle3(64, 32);
        let mut a = Sample::new(shape).unwrap();
        let mut b = Sample::new(shape).unwrap();
        a.fill(3);
        b.fill(3);
        assert_eq!(a.checksum(), b.checksum());
        b.fill(4);
        assert_ne!(a.checksum(), b.checksum());
    }

    #[test]
    fn lengths_are_deterministic_and_within_the_range() {
        let shape = varying(Strategy::Eagle3, 5, 17, 4);
        let lens: Vec<u64> = (0..500).map(|i| shape.seq_len_of(i)).collect();
        assert!(lens.iter().all(|l| (5..=17).contains(l)), "{lens:?}");
        assert_eq!(lens, (0..500).map(|i| shape.seq_len_of(i)).collect::<Vec<_>>());
        assert!(lens.contains(&5) && lens.contains(&17), "both ends are drawn: {lens:?}");
        let fixed = SampleShape::eagle3(9, 4);
        assert!((0..100).all(|i| fixed.seq_len_of(i) == 9));
        // A sample regenerated in another buffer set has the same length and bytes.
        let (mut a, mut b) = (Sample::new(shape).unwrap(), Sample::new(shape).unwrap());
        b.fill(1);
        for i in [7, 0, 7] {
            a.fill(i);
            b.fill(i);
            assert_eq!((a.seq_len(), a.checksum()), (shape.seq_len_of(i), b.checksum()));
        }
    }

    #[test]
    fn views_and_metadata_have_the_current_length() {
        let shape = varying(Strategy::Eagle3, 3, 40, 8);
        let mut sample = Sample::new(shape).unwrap();
        for i in 0..20 {
            sample.fill(i);
            let l = shape.seq_len_of(i);
            let views = sample.views().unwrap();
            assert_eq!(view(&views, "hidden_state").shape(), &[1, l, 24]);
            assert_eq!(view(&views, "target").shape(), &[1, l, 8]);
            for name in ["input_ids", "loss_mask", "attention_mask"] {
                assert_eq!(view(&views, name).shape(), &[1, l], "{name}");
            }
            let total: u64 = views.iter().map(|(_, v)| v.nbytes()).sum();
            assert_eq!((total, sample.nbytes()), (shape.bytes(l).unwrap(), shape.bytes(l).unwrap()));
            let meta = sample.metadata("run");
            assert_eq!((meta["num_tokens"].as_u64(), meta["strategy"].as_str()), (Some(l), Some("eagle3")));
            drop(views);
            let dst_total: usize = sample.dsts().iter().map(|(_, b)| b.len()).sum();
            assert_eq!(dst_total as u64, shape.bytes(l).unwrap());
        }
    }

    #[test]
    fn loss_mask_covers_the_response_but_not_the_last_token() {
        for strategy in [Strategy::Eagle3, Strategy::Dflash] {
            let shape = varying(strategy, 1, 13, 4);
            let mut sample = Sample::new(shape).unwrap();
            for i in 0..40 {
                sample.fill(i);
                let l = sample.seq_len() as usize;
                let views = sample.views().unwrap();
                let mask = i64s(view(&views, "loss_mask").bytes());
                let want: Vec<i64> = (0..l).map(|t| i64::from(t >= l / 4 && t + 1 < l)).collect();
                assert_eq!(mask, want, "{strategy:?} L={l}");
                assert_eq!(mask.last(), Some(&0));
                let ids = i64s(view(&views, "input_ids").bytes());
                assert!(ids.iter().all(|&id| (0..VOCAB as i64).contains(&id)));
            }
        }
    }

    #[test]
    fn canonical_checksum_ignores_attention_mask_and_order() {
        let (a, b, m) = (&[1u8, 2, 3][..], &[4u8, 5][..], &[1u8; 8][..]);
        let want = checksum_of([("a", a), ("b", b)]);
        assert_eq!(canonical_checksum([("b", b), ("a", a)]), want);
        assert_eq!(canonical_checksum([("attention_mask", m), ("b", b), ("a", a)]), want);
        assert_ne!(canonical_checksum([("a", b), ("b", a)]), want, "names count");

        let shape = varying(Strategy::Eagle3, 4, 12, 8);
        let mut sample = Sample::new(shape).unwrap();
        sample.fill(11);
        let views = sample.views().unwrap();
        let mut reversed: Vec<(&str, &[u8])> = views.iter().rev().map(|(n, v)| (*n, v.bytes())).collect();
        assert_eq!(canonical_checksum(reversed.iter().copied()), sample.checksum());
        reversed.retain(|(n, _)| *n != "attention_mask");
        assert_eq!(canonical_checksum(reversed.iter().copied()), sample.checksum());
        let mut sorted = reversed.clone();
        sorted.sort_by_key(|(n, _)| *n);
        assert_eq!(checksum_of(sorted), sample.checksum());
        assert_ne!(checksum_of(reversed.iter().copied()), sample.checksum(), "checksum_of keeps the given order");
    }

    #[test]
    fn reading_into_a_buffer_set_reproduces_the_checksum() {
        let shape = varying(Strategy::Dflash, 2, 30, 4);
        let mut src = Sample::new(shape).unwrap();
        let mut dst = Sample::new(shape).unwrap();
        for i in [3, 9, 1] {
            src.fill(i);
            dst.set_index(i);
            let views = src.views().unwrap();
            for (name, buf) in dst.dsts() {
                buf.copy_from_slice(view(&views, name).bytes());
            }
            assert_eq!(dst.checksum(), src.checksum());
        }
    }

    #[test]
    fn bad_shapes_are_refused_naming_the_flag() {
        let err = |r: anyhow::Result<SampleShape>| r.unwrap_err().to_string();
        assert!(err(SampleShape::new(Strategy::Eagle3, 8, Some(9), 4, None)).contains("--min-seq-len 9"));
        assert!(err(SampleShape::new(Strategy::Eagle3, 8, Some(0), 4, None)).contains("at least 1"));
        assert!(err(SampleShape::new(Strategy::Eagle3, 0, None, 4, None)).contains("at least 1"));
        assert!(err(SampleShape::new(Strategy::Eagle3, 8, None, 4, Some(5))).contains("dflash only"));
        assert!(err(SampleShape::new(Strategy::Dflash, 8, None, 4, Some(0))).contains("--layers"));
        assert!(err(SampleShape::new(Strategy::Dflash, u64::MAX / 2, None, 1 << 16, None)).contains("too large"));
    }

    #[test]
    fn describe_shows_a_variable_length_as_l() {
        assert!(SampleShape::eagle3(16, 8).describe().starts_with("hidden_state (1, 16, 24) bfloat16"));
        let d = varying(Strategy::Dflash, 2, 16, 8).describe();
        assert!(d.contains("hidden_states (1, L, 40) bfloat16") && d.ends_with("L uniform in [2, 16]"), "{d}");
    }
}
