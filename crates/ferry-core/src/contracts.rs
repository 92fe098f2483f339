//! The records of SpecForge's runtime contract (`contracts.py`), field for field and in the same
//! declaration order, because that order is the JSON key order on the wire.
//!
//! Required fields are exactly SpecForge's dataclass fields without defaults; a JSON object
//! missing one of them, or carrying any key not declared here, is rejected with an error that
//! names the key. `source_task_id` is required but nullable, as in Python.

use crate::ids::{Generation, LeaseToken, SampleId};
use crate::tensor::TensorBuf;
use crate::{DType, Result};
use indexmap::IndexMap;
use serde::{Deserialize, Deserializer, Serialize};

/// A free-form JSON object whose key order is kept (metadata, payloads, target_meta).
pub type JsonMap = serde_json::Map<String, serde_json::Value>;

/// SpecForge's `SCHEMA_VERSION`: bumped when the on-wire feature schema changes incompatibly.
pub const SCHEMA_VERSION: i64 = 1;

/// What the `target` feature holds (SpecForge's `TargetRepr`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetRepr {
    /// Full `(seq, target_vocab)` logits; parity and debug only.
    Logits,
    /// `(seq, draft_vocab)` logits after the token-to-draft map.
    PrunedLogits,
    /// The target's last hidden state; the strategy re-runs lm_head and the map.
    HiddenState,
}

impl TargetRepr {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetRepr::Logits => "logits",
            TargetRepr::PrunedLogits => "pruned_logits",
            TargetRepr::HiddenState => "hidden_state",
        }
    }
    /// Parses the wire spelling.
    pub fn parse(s: &str) -> Option<TargetRepr> {
        [TargetRepr::Logits, TargetRepr::PrunedLogits, TargetRepr::HiddenState].into_iter().find(|t| t.as_str() == s)
    }
}

fn default_true() -> bool {
    true
}
fn default_unknown() -> String {
    "unknown".to_owned()
}
fn default_schema_version() -> i64 {
    SCHEMA_VERSION
}

/// A required key whose value may be `null` (serde would otherwise default a missing `Option`).
fn required_nullable<'de, D, T>(d: D) -> std::result::Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d)
}

/// One named tensor in the store: shape and dtype are metadata; the bytes never travel here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSpec {
    /// Logical feature name (`input_ids`, `hidden_state`, `target`, ...).
    pub name: String,
    /// Shape, row-major.
    pub shape: Vec<u64>,
    /// dtype string (`bfloat16`, `int64`, ...). Kept as written so unknown dtypes round-trip;
    /// [`FeatureSpec::dtype`] parses it.
    pub dtype: String,
    /// Optional device hint.
    #[serde(default)]
    pub device_hint: Option<String>,
    /// Whether the feature is required.
    #[serde(default = "default_true")]
    pub required: bool,
    /// What a `target` feature holds.
    #[serde(default)]
    pub target_repr: Option<TargetRepr>,
    /// Target metadata such as `vocab_map_version`.
    #[serde(default)]
    pub target_meta: JsonMap,
}

impl FeatureSpec {
    /// A spec with SpecForge's defaults for everything but name, shape and dtype.
    pub fn new(name: impl Into<String>, shape: Vec<u64>, dtype: DType) -> Self {
        FeatureSpec {
            name: name.into(),
            shape,
            dtype: dtype.name().to_owned(),
            device_hint: None,
            required: true,
            target_repr: None,
            target_meta: JsonMap::new(),
        }
    }

    /// The parsed dtype; [`crate::Error::UnknownDtype`] names an unsupported one.
    pub fn dtype(&self) -> Result<DType> {
        DType::parse(&self.dtype)
    }

    /// Number of elements (1 for a 0-dim scalar), or `None` if it overflows `u64` (a shape
    /// from an untrusted ref must never panic or wrap).
    pub fn numel(&self) -> Option<u64> {
        checked_numel(&self.shape)
    }

    /// Exact byte size of the contiguous tensor; fails for an unknown dtype or a shape whose
    /// size overflows.
    pub fn nbytes(&self) -> Result<u64> {
        let size = self.dtype()?.size() as u64;
        self.numel().and_then(|n| n.checked_mul(size)).ok_or_else(|| {
            crate::Error::InvalidArgument(format!(
                "feature {:?} has shape {:?}, whose byte size overflows 64 bits",
                self.name, self.shape
            ))
        })
    }

    /// SpecForge's `estimate_bytes` term: unknown dtypes count 4 bytes per element; saturates
    /// instead of overflowing.
    pub fn estimated_bytes(&self) -> u64 {
        self.numel().unwrap_or(u64::MAX).saturating_mul(DType::estimate_size(&self.dtype) as u64)
    }
}

/// The element count of `shape`, or `None` on overflow.
pub fn checked_numel(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |acc, d| acc.checked_mul(*d))
}

/// SpecForge's `FeatureStore.estimate_bytes(specs)`.
pub fn estimate_bytes<'a>(specs: impl IntoIterator<Item = &'a FeatureSpec>) -> u64 {
    specs.into_iter().map(FeatureSpec::estimated_bytes).fold(0, u64::saturating_add)
}

/// A pointer to one sample's features. Metadata only: no tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleRef {
    /// The sample.
    pub sample_id: SampleId,
    /// The run that produced it.
    pub run_id: String,
    /// The prompt task it came from, if any (required key, nullable).
    #[serde(deserialize_with = "required_nullable")]
    pub source_task_id: Option<String>,
    /// Which store holds the features (`mem://`, `disagg://`, `mooncake://`, `file://`, ...).
    pub feature_store_uri: String,
    /// Logical feature name to store key.
    pub feature_keys: IndexMap<String, String>,
    /// Logical feature name to spec; empty for lazy offline refs.
    pub feature_specs: IndexMap<String, FeatureSpec>,
    /// Draft strategy (`eagle3`, `dflash`, ...). Not validated, as in SpecForge.
    pub strategy: String,
    /// Feature schema version.
    #[serde(default = "default_schema_version")]
    pub schema_version: i64,
    /// Target model version.
    #[serde(default = "default_unknown")]
    pub target_model_version: String,
    /// Draft weight version the rollout used.
    #[serde(default)]
    pub draft_weight_version: Option<String>,
    /// Tokenizer version.
    #[serde(default = "default_unknown")]
    pub tokenizer_version: String,
    /// Token count.
    #[serde(default)]
    pub num_tokens: i64,
    /// Byte size of the features.
    #[serde(default)]
    pub estimated_bytes: i64,
    /// Free-form metadata (`generation`, `target_repr`, `ttt_length`, `format`, ...).
    #[serde(default)]
    pub metadata: JsonMap,
}

impl SampleRef {
    /// The generation this ref addresses: `metadata.generation` if present, else the
    /// `generation=` query parameter of the URI (SpecForge's `mem://` form), else `None`.
    pub fn generation(&self) -> Option<Generation> {
        if let Some(g) = self.metadata.get("generation").and_then(serde_json::Value::as_u64) {
            return Some(Generation::new(g));
        }
        let query = self.feature_store_uri.split_once('?')?.1;
        query.split('&').find_map(|kv| kv.strip_prefix("generation=")).and_then(|g| g.parse().ok()).map(Generation::new)
    }

    /// The URI scheme (`mem`, `disagg`, `file`, ...), if the URI has one.
    pub fn scheme(&self) -> Option<&str> {
        self.feature_store_uri.split_once("://").map(|(s, _)| s)
    }

    /// `metadata.target_repr`, parsed.
    pub fn target_repr(&self) -> Option<TargetRepr> {
        self.metadata.get("target_repr").and_then(|v| v.as_str()).and_then(TargetRepr::parse)
    }
}

/// The lifetime token a `get` returns; `release` takes it back. A stale handle (older
/// generation) releases nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureHandle {
    /// The sample.
    pub sample_id: SampleId,
    /// The generation that was read.
    pub generation: Generation,
    /// Opaque lease token.
    pub lease_token: LeaseToken,
}

/// A unit of work for a rollout worker. Metadata only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptTask {
    /// Task id.
    pub task_id: String,
    /// Run id.
    pub run_id: String,
    /// Where the prompt came from.
    pub source_id: String,
    /// Conversation, text or token ids.
    pub payload: JsonMap,
    /// Maximum sequence length.
    pub max_length: i64,
    /// Chat template name.
    #[serde(default)]
    pub chat_template: Option<String>,
    /// Loss mask policy.
    #[serde(default)]
    pub loss_mask_policy: JsonMap,
    /// Target model version.
    #[serde(default = "default_unknown")]
    pub target_model_version: String,
    /// Draft weight version.
    #[serde(default)]
    pub draft_weight_version: Option<String>,
    /// Attempt number (0 first).
    #[serde(default)]
    pub attempt: i64,
    /// Free-form metadata.
    #[serde(default)]
    pub metadata: JsonMap,
}

/// A materialized, collated batch: the only record that holds tensors, and deliberately not
/// serializable, so it can never enter the control plane.
#[derive(Debug)]
pub struct TrainBatch {
    /// Samples in the batch, in order.
    pub sample_ids: Vec<SampleId>,
    /// Draft strategy.
    pub strategy: String,
    /// Collated tensors by name.
    pub tensors: IndexMap<String, TensorBuf>,
    /// Batch metadata (`target_repr`, `ttt_length`).
    pub metadata: JsonMap,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimate_bytes_of_1x10_float32_is_40() {
        let spec = FeatureSpec::new("x", vec![1, 10], DType::Float32);
        assert_eq!(estimate_bytes([&spec]), 40);
        assert_eq!(spec.nbytes(), Ok(40));
    }

    #[test]
    fn scalar_spec_has_one_element() {
        let spec = FeatureSpec::new("s", vec![], DType::Int64);
        assert_eq!(spec.numel(), Some(1));
        assert_eq!(spec.nbytes(), Ok(8));
    }

    #[test]
    fn overflowing_shapes_are_errors_not_panics() {
        let huge = FeatureSpec::new("h", vec![1 << 40, 1 << 40], DType::BFloat16);
        assert_eq!(huge.numel(), None);
        assert!(huge.nbytes().unwrap_err().to_string().contains("overflows 64 bits"));
        assert_eq!(huge.estimated_bytes(), u64::MAX);
        let near = FeatureSpec::new("n", vec![1 << 62, 2], DType::BFloat16); // numel fits, bytes do not
        assert!(near.nbytes().is_err());
        assert_eq!(estimate_bytes([&huge, &near]), u64::MAX);
    }
}
