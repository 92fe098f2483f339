//! ferry's feature loader: the one bridge from refs and a [`ferry_store::FeatureStore`] to
//! collated [`ferry_core::TrainBatch`]es (SpecForge's `FeatureDataLoader`,
//! `SPECFORGE-RUNTIME.md` §12), with strategy-driven padding, prefetch on worker threads and
//! DP sharding equal to torch's `DistributedSampler`.
//!
//! It owns no model logic and no topology branch. It must never hold a lease past the read that
//! took it, fetch a byte of a batch that failed validation, or name a concrete store backend.
//!
//! This issue implements the refs (offline) mode: a fixed, re-iterable ref list with epochs,
//! a one-shot seek and DP sharding. The consume-once queue mode (prefetch with exact-prefix
//! acks, retryable vs terminal failure on shutdown) will be another [`RefSource`] over the same
//! batch engine.
//!
//! # Data path
//!
//! ```text
//! refs ──chunk──▶ validate (§12.2, refs only) ──▶ describe every ref ──▶ plan: batch shapes
//!                                                                        │ (pad to the longest)
//!  TrainBatch ◀── wrap ◀── release at once ◀── get_into each sample ◀── allocate from pool
//!                                              straight into its row prefix (1 copy)
//! ```
//!
//! With a per-sample transform the path is get → release → transform → copy (2 copies).
//!
//! # Guarantees and where each is tested
//!
//! | guarantee | tests |
//! | --- | --- |
//! | A batch that fails §12.2 validation, description or planning reads nothing and takes no lease. | `tests/refs_mode.rs` (`mixed_target_repr_…`, `mixed_schema_versions_…`, `refs_of_another_strategy_…`, `samples_missing_a_required_feature_…`) |
//! | Every lease is released right after its read, whatever fails later (transform, panic, closed pass). | `refs_mode.rs` (`a_failing_transform_…`, `a_feature_the_store_does_not_hold_…`), `tests/prefetch.rs` (`a_failing_transform_on_a_worker_…`, `a_panicking_transform_…`, `closing_a_pass_with_a_blocked_read_…`, `dropping_a_pass_…`) |
//! | Batches come out in ref order whatever order workers finish in; an error surfaces at its batch and ends the pass. | `prefetch.rs` (`workers_keep_order_…`, `an_error_surfaces_at_its_batch_position_…`) |
//! | Every pass yields the same batches; a seek skips exactly k batches of the next pass only and never fetches or transforms them. | `refs_mode.rs` (`every_pass_yields_…`, `seek_…`, `skipped_refs_are_never_fetched_or_transformed`) |
//! | Padding goes to the longest sample, is written (never inherited from a pooled buffer), and the mask marks real tokens. | `refs_mode.rs` (`variable_lengths_pad_…`, `online_eagle3_refs_…`), `collate` unit tests |
//! | DP shards equal torch's `DistributedSampler`: torch-recorded `randperm` outputs, MT19937 check values, full coverage per epoch. | `sampler` unit tests, `tests/dp_sampler.rs`, `tests/torch_randperm.rs` (vectors from real torch when present) |
//!
//! # Layout
//! * [`loader`] — [`FeatureLoader`], its builder, [`RefSource`], the [`Batches`] pass iterator.
//! * [`strategies`] — [`Strategy`] entries (EAGLE3, DFlash, Domino) and the registry.
//! * [`sampler`] — torch-equal `randperm` (MT19937) and [`sampler::DistributedShard`].
//! * [`materialize`] — one batch: validate, describe, plan, read; [`Sample`] for transforms.
//! * `collate` — batch planning, row prefixes, padding, the attention mask.
//! * `validate` — the §12.2 checks.
//! * `prefetch` — the worker pool and its in-order window.
//!
//! # Example
//! ```
//! use ferry_core::{DType, JsonMap, TensorView};
//! use ferry_loader::{FeatureLoader, RefSource};
//! use ferry_store::{open_store, StoreOptions};
//! use half::bf16;
//!
//! // Offline data is re-read every epoch, so the store keeps bytes on release.
//! let store = open_store("mem://doc", StoreOptions { retain_on_release: true, ..Default::default() }).unwrap();
//! let mut refs = Vec::new();
//! for (i, len) in [3u64, 5].into_iter().enumerate() {
//!     let ids: Vec<i64> = (0..len as i64).collect();
//!     let aux = vec![bf16::ONE; len as usize * 6];
//!     let last = vec![bf16::ONE; len as usize * 2];
//!     let (l, a, h) = ([len], [1, len, 6], [1, len, 2]);
//!     let mut meta = JsonMap::new();
//!     meta.insert("target_repr".into(), "hidden_state".into());
//!     refs.push(store.put(format!("run:{i}"), &[
//!         ("input_ids", TensorView::from_elements(&l, &ids).unwrap()),
//!         ("loss_mask", TensorView::from_elements(&l, &ids).unwrap()),
//!         ("aux_hidden_state", TensorView::from_elements(&a, &aux).unwrap()),
//!         ("hidden_state", TensorView::from_elements(&h, &last).unwrap()),
//!     ], meta).unwrap());
//! }
//! let mut loader = FeatureLoader::builder(store.clone(), RefSource::Fixed(refs))
//!     .batch_size(2)
//!     .strategy("eagle3")
//!     .build()
//!     .unwrap();
//! for batch in loader.iter() {
//!     let batch = batch.unwrap();
//!     assert_eq!(batch.tensors["input_ids"].shape(), [2, 5]); // padded to the longest
//!     assert_eq!(batch.tensors["hidden_state"].shape(), [2, 5, 6]); // the file's aux states
//!     assert_eq!(batch.tensors["target"].shape(), [2, 5, 2]); // the file's last hidden state
//!     assert_eq!(batch.tensors["attention_mask"].as_elements::<i64>().unwrap()[..5], [1, 1, 1, 0, 0]);
//! }
//! assert_eq!(store.health().active_leases, 0);
//! ```
#![forbid(unsafe_code)]

mod collate;
pub mod loader;
pub mod materialize;
mod prefetch;
pub mod sampler;
pub mod strategies;
mod validate;

pub use loader::{Batches, DpSharding, FeatureLoader, FeatureLoaderBuilder, RefSource};
pub use materialize::{Sample, SampleTransform};
pub use strategies::{Strategy, StrategyRegistry};
