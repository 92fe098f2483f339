//! ferry's feature loader: the one bridge from refs and a [`ferry_store::FeatureStore`] to
//! collated [`ferry_core::TrainBatch`]es (SpecForge's `FeatureDataLoader`,
//! `SPECFORGE-RUNTIME.md` §12), with strategy-driven padding, prefetch on worker threads and
//! DP sharding equal to torch's `DistributedSampler`.
//!
//! It owns no model logic and no topology branch. It must never hold a lease past the read that
//! took it, fetch a byte of a batch that failed validation, or name a concrete store backend.
//!
//! Two sources of refs ([`RefSource`]) feed one batch engine:
//! * refs mode (offline, [`RefSource::Fixed`]): a fixed, re-iterable ref list with epochs, a
//!   one-shot seek and DP sharding; it never acks.
//! * queue mode (online, [`RefSource::Queue`]): a consume-once [`ferry_control::queue::RefQueue`]
//!   (SpecForge §12.5-§12.6), read synchronously or by one `loader-prefetch` thread. The loader
//!   acks each batch once its consumer has come back for more (or leaves acks to the trainer,
//!   [`FeatureLoaderBuilder::defer_ack_until_durable`]), fails a batch it cannot build
//!   terminally, settles a short tail (fail, adopt, abort), and on shutdown fails the refs it
//!   leased but never yielded: retryably where a retry can still read them, else terminally.
//!
//! # Data path
//!
//! ```text
//! refs ──chunk──▶ validate (§12.2, refs only) ──▶ describe every ref ──▶ plan: batch shapes
//! (a fixed list's chunk, or one queue.get)
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
//! | Queue mode: every yielded batch is acked exactly when its consumer comes back (next call, end, close or drop; never while unwinding from a panic), or never with deferred acks. | `tests/queue_mode.rs` (`four_samples_in_batches_of_two_…`, `offline_files_through_a_staging_queue_…`, `deferred_acks_…`, `a_pass_dropped_while_its_consumer_panics_…`) |
//! | Queue mode: a batch that fails validation or materialization (a transform error or panic, an evicted feature) is failed terminally on the queue before the error surfaces: nothing stays leased in the queue or the store. | `queue_mode.rs` (`a_batch_with_mixed_target_repr_…`, `a_failing_transform_with_prefetch_…`, `a_panicking_transform_…`, `an_evicted_feature_…`) |
//! | Queue mode: a short tail with `drop_last` is failed terminally, then adopted and aborted in the store; a cleanup that fails ends the pass with `cleanup errors=[...]`. | `queue_mode.rs` (`a_short_stream_tail_…`, `a_tail_whose_removal_fails_…`, `without_drop_last_…`) |
//! | Queue mode shutdown: the prefetch thread stops within the join timeout or the close fails naming the outstanding refs (and a later close completes it); never-yielded refs go back to the queue when a retry can read them, else are dropped. | `queue_mode.rs` (`closing_after_one_yield_…`, `a_close_during_a_blocked_read_…`, `a_closed_queue_loader_…`) |
//! | Queue mode: one live pass at a time; no seek on a consume-once stream; a closed loader yields nothing. | `queue_mode.rs` (`a_second_pass_while_one_is_live_…`, `seek_on_a_queue_loader_…`, `a_closed_queue_loader_…`) |
//!
//! # Layout
//! * [`loader`] — [`FeatureLoader`], its builder, [`RefSource`], the [`Batches`] pass iterator.
//! * `queue_mode` — queue passes: leasing, acks, failures, tail settlement, the
//!   `loader-prefetch` thread and its shutdown.
//! * [`strategies`] — [`Strategy`] entries (EAGLE3, DFlash, Domino) and the registry.
//! * [`sampler`] — torch-equal `randperm` (MT19937) and [`sampler::DistributedShard`].
//! * [`materialize`] — one batch: validate, describe, plan, read; [`Sample`] for transforms.
//! * `collate` — batch planning, row prefixes, padding, the attention mask.
//! * `validate` — the §12.2 checks.
//! * `prefetch` — refs mode's worker pool and its in-order window.
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
mod queue_mode;
pub mod sampler;
pub mod strategies;
mod validate;

pub use loader::{Batches, DpSharding, FeatureLoader, FeatureLoaderBuilder, RefSource};
pub use materialize::{Sample, SampleTransform};
pub use strategies::{Strategy, StrategyRegistry};
