//! ferry's contracts: the tensor-free records that the control plane carries, the tensor
//! buffers that the data plane fills, and the one error type every ferry crate returns.
//!
//! This crate owns no I/O: it never opens a file or a socket. It defines
//!
//! * the records SpecForge's runtime exchanges ([`SampleRef`], [`FeatureSpec`],
//!   [`FeatureHandle`], [`PromptTask`]) with their exact JSON form ([`json`]), byte-compatible
//!   with Python's `json.dumps` as SpecForge uses it;
//! * [`DType`], the element types a feature may have, with their sizes;
//! * [`AlignedBuf`] (owned, 64-byte aligned, optionally recycled through a [`BufferPool`]),
//!   [`TensorBuf`] (an owned tensor) and [`TensorView`] (a borrowed one);
//! * [`TrainBatch`], the only record that holds tensors, which therefore cannot be serialized;
//! * [`Error`], whose variants name what was wrong and what to do.
//!
//! Records cannot hold tensors by construction: their free-form parts are JSON values, and no
//! tensor type implements `Serialize`. SpecForge checks this at run time (`assert_no_tensors`);
//! ferry checks it at compile time.
//!
//! # Layout
//! * [`error`] — the [`Error`] enum and [`Result`] alias.
//! * [`dtype`] — [`DType`].
//! * [`ids`] — newtype ids ([`SampleId`], [`StoreId`], [`Generation`], [`LeaseToken`]).
//! * [`contracts`] — the records.
//! * [`json`] — SpecForge-compatible JSON reading and writing.
//! * [`buffer`] — [`AlignedBuf`] and [`BufferPool`].
//! * [`tensor`] — [`TensorBuf`] and [`TensorView`].
//! * [`measure`] — timing arithmetic shared by benchmarks (GB/s, best of N runs).
//! * [`view`] — [`ViewSpec`] (part of a tensor: a narrow, a tensor-parallel shard) and its
//!   [`ViewPlan`] (the byte ranges that make it up).
//!
//! # Example
//! ```
//! use ferry_core::{json, JsonStyle, SampleRef};
//! let line = r#"{"sample_id":"s0","run_id":"r","source_task_id":null,"feature_store_uri":"mem://a/s0",
//!   "feature_keys":{},"feature_specs":{},"strategy":"eagle3"}"#;
//! let r: SampleRef = json::sample_ref_from_str(line).unwrap();
//! assert_eq!(r.schema_version, 1); // missing defaulted keys take SpecForge's defaults
//! let compact = json::to_string(&r, JsonStyle::Compact).unwrap();
//! assert!(compact.starts_with(r#"{"sample_id":"s0","run_id":"r","source_task_id":null,"#));
//! ```
#![forbid(unsafe_code)]

#[cfg(target_endian = "big")]
compile_error!(
    "ferry stores tensors as raw little-endian bytes (SpecForge's Mooncake layout); big-endian hosts are not supported"
);

pub mod buffer;
pub mod contracts;
pub mod dtype;
pub mod error;
pub mod ids;
pub mod json;
pub mod measure;
pub mod tensor;
pub mod view;

pub use buffer::{AlignedBuf, BUFFER_ALIGN, BufferPool};
pub use contracts::{
    FeatureHandle, FeatureSpec, JsonMap, PromptTask, SCHEMA_VERSION, SampleRef, TargetRepr, TrainBatch,
};
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use ids::{Generation, LeaseToken, SampleId, StoreId};
pub use json::JsonStyle;
pub use tensor::{TensorBuf, TensorView};
pub use view::{ViewPlan, ViewSpec};
