//! The store API as a trait: the lifecycle core ([`FeatureStore`]) implements it, and so does
//! a client of the node daemon (`ferry_net::Client`), so loaders, trainers and the acceptance
//! suite run unchanged against a store in this process or one that `ferry serve` owns.
//!
//! Errors cross the wire as the same [`ferry_core::Error`] variants a local store returns.

use crate::lifecycle::{DrainPolicy, DrainReport, FeatureStore, GcReport, Health};
use ferry_core::{FeatureHandle, FeatureSpec, Generation, JsonMap, Result, SampleId, SampleRef, StoreId};
use ferry_core::{TensorBuf, TensorView};
use indexmap::IndexMap;
use std::time::Instant;

/// Every call of a feature store. Object safe: hold stores as `Arc<dyn FeatureStoreApi>`.
pub trait FeatureStoreApi: Send + Sync {
    /// The store id (namespace of its refs).
    fn store_id(&self) -> &StoreId;

    /// Stores one sample; a full store refuses at once.
    fn put(&self, sample_id: &str, tensors: &[(&str, TensorView<'_>)], metadata: JsonMap) -> Result<SampleRef>;

    /// Stores one sample, waiting until `deadline` for room in the budget.
    fn put_until(
        &self,
        sample_id: &str,
        tensors: &[(&str, TensorView<'_>)],
        metadata: JsonMap,
        deadline: Instant,
    ) -> Result<SampleRef>;

    /// Reads features into fresh buffers and takes a read lease.
    #[allow(clippy::type_complexity)]
    fn get(&self, r: &SampleRef, names: Option<&[&str]>) -> Result<(IndexMap<String, TensorBuf>, FeatureHandle)>;

    /// Reads features into the caller's buffers (each exactly its size) and takes a read lease.
    fn get_into(&self, r: &SampleRef, dsts: &mut [(&str, &mut [u8])]) -> Result<FeatureHandle>;

    /// Reads each feature's first bytes into a buffer at most its size.
    fn get_prefix_into(&self, r: &SampleRef, dsts: &mut [(&str, &mut [u8])]) -> Result<FeatureHandle>;

    /// The specs of a sample's features.
    fn describe(&self, r: &SampleRef) -> Result<IndexMap<String, FeatureSpec>>;

    /// Drops a read lease (the last one frees the sample unless the store retains on release).
    fn release(&self, handle: &FeatureHandle) -> Result<()>;

    /// Frees a sample now, whoever holds leases.
    fn abort(&self, sample_id: &SampleId) -> Result<()>;

    /// Frees every sample; returns how many.
    fn abort_all(&self) -> Result<usize>;

    /// Takes ownership of a sample another writer published.
    fn adopt(&self, r: &SampleRef) -> Result<()>;

    /// Tracks a sample an external writer may have written, until adopted or discarded.
    fn track_external_attempt(
        &self,
        sample_id: &SampleId,
        generation: Generation,
        feature_names: &[&str],
    ) -> Result<()>;

    /// Frees every tracked external attempt not adopted; returns how many.
    fn discard_external_attempts(&self) -> Result<usize>;

    /// One max-hold GC sweep plus retries of pending removals.
    fn gc(&self) -> Result<GcReport>;

    /// Retries every pending removal, forced, under `policy`.
    fn drain(&self, policy: DrainPolicy) -> Result<DrainReport>;

    /// [`FeatureStoreApi::drain`] restricted to some samples.
    fn drain_samples(&self, sample_ids: &[SampleId], policy: DrainPolicy) -> Result<DrainReport>;

    /// The health map.
    fn health(&self) -> Result<Health>;
}

impl FeatureStoreApi for FeatureStore {
    fn store_id(&self) -> &StoreId {
        FeatureStore::store_id(self)
    }
    fn put(&self, sample_id: &str, tensors: &[(&str, TensorView<'_>)], metadata: JsonMap) -> Result<SampleRef> {
        FeatureStore::put(self, sample_id, tensors, metadata)
    }
    fn put_until(
        &self,
        sample_id: &str,
        tensors: &[(&str, TensorView<'_>)],
        metadata: JsonMap,
        deadline: Instant,
    ) -> Result<SampleRef> {
        FeatureStore::put_until(self, sample_id, tensors, metadata, deadline)
    }
    fn get(&self, r: &SampleRef, names: Option<&[&str]>) -> Result<(IndexMap<String, TensorBuf>, FeatureHandle)> {
        FeatureStore::get(self, r, names)
    }
    fn get_into(&self, r: &SampleRef, dsts: &mut [(&str, &mut [u8])]) -> Result<FeatureHandle> {
        FeatureStore::get_into(self, r, dsts)
    }
    fn get_prefix_into(&self, r: &SampleRef, dsts: &mut [(&str, &mut [u8])]) -> Result<FeatureHandle> {
        FeatureStore::get_prefix_into(self, r, dsts)
    }
    fn describe(&self, r: &SampleRef) -> Result<IndexMap<String, FeatureSpec>> {
        FeatureStore::describe(self, r)
    }
    fn release(&self, handle: &FeatureHandle) -> Result<()> {
        FeatureStore::release(self, handle)
    }
    fn abort(&self, sample_id: &SampleId) -> Result<()> {
        FeatureStore::abort(self, sample_id)
    }
    fn abort_all(&self) -> Result<usize> {
        FeatureStore::abort_all(self)
    }
    fn adopt(&self, r: &SampleRef) -> Result<()> {
        FeatureStore::adopt(self, r)
    }
    fn track_external_attempt(
        &self,
        sample_id: &SampleId,
        generation: Generation,
        feature_names: &[&str],
    ) -> Result<()> {
        FeatureStore::track_external_attempt(self, sample_id, generation, feature_names)
    }
    fn discard_external_attempts(&self) -> Result<usize> {
        FeatureStore::discard_external_attempts(self)
    }
    fn gc(&self) -> Result<GcReport> {
        Ok(FeatureStore::gc(self))
    }
    fn drain(&self, policy: DrainPolicy) -> Result<DrainReport> {
        FeatureStore::drain(self, policy)
    }
    fn drain_samples(&self, sample_ids: &[SampleId], policy: DrainPolicy) -> Result<DrainReport> {
        FeatureStore::drain_samples(self, sample_ids, policy)
    }
    fn health(&self) -> Result<Health> {
        Ok(FeatureStore::health(self))
    }
}
