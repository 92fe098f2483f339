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

    /// Whether release keeps the bytes (offline, re-iterable data) or frees them (consume-once
    /// online data). A remote store answers from its health map.
    fn retains_on_release(&self) -> Result<bool> {
        Ok(self.health()?.retain_on_release)
    }

    /// Hands samples this client put over to the store: from now on they live until deleted
    /// (aborted, released, GC'd) like any other sample, whatever happens to this client.
    ///
    /// Only a session-scoped store has anything to hand over: a daemon client that owns its
    /// puts (`ferry_net::Client::connect_owning`), whose daemon frees every sample the session
    /// still owns when the session ends (the client drops, crashes or is killed). There, an id
    /// the session does not own is not an error if the sample exists (idempotent), and an id
    /// the store does not hold is [`ferry_core::Error::NotFound`]. A store in this process has
    /// no sessions: its samples already belong to it, so the default (kept by
    /// [`FeatureStore`]) does nothing and checks nothing.
    ///
    /// A wrapper that forwards to an owning client must forward this call too: the default
    /// would leave the samples owned, and freed when the session ends.
    fn disown(&self, sample_ids: &[SampleId]) -> Result<()> {
        let _ = sample_ids;
        Ok(())
    }
}

/// A store in this process, shared as the trait object every store-generic API takes.
impl From<FeatureStore> for std::sync::Arc<dyn FeatureStoreApi> {
    fn from(store: FeatureStore) -> Self {
        std::sync::Arc::new(store)
    }
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
    fn retains_on_release(&self) -> Result<bool> {
        Ok(FeatureStore::retains_on_release(self))
    }
    fn health(&self) -> Result<Health> {
        Ok(FeatureStore::health(self))
    }
}
