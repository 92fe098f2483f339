//! The byte-backend trait: the only thing a storage technology must implement to get every
//! lifecycle guarantee of [`crate::FeatureStore`].
//!
//! A backend stores opaque byte objects keyed `{store_id}/{sample_id}/g{generation}/{name}`
//! (SpecForge's Mooncake key layout); it knows nothing of leases, budgets or tombstones. The
//! trait works on one sample generation's objects at a time for writes and removals, because
//! the shared-directory layout keeps one file per (sample, generation) and Mooncake has a batch
//! put; reads are per object so a reader can fetch a subset of features.
//!
//! Contracts every implementation keeps (tested for every backend by the shared suite):
//! * [`ByteBackend::write`] is all or nothing: on error no object of that generation is visible.
//! * [`ByteBackend::read_into`] copies the object's first `min(size, dst.len())` bytes into `dst`
//!   and returns the object's full size. The core compares that size with the ref's spec (fewer
//!   bytes is [`ferry_core::Error::ShortRead`], more is [`ferry_core::Error::Corrupt`]), so a
//!   reader may ask for a prefix; a missing object is [`ferry_core::Error::NotFound`].
//! * [`ByteBackend::remove`] may fail (the core retries it later) or be deferred (the bytes may
//!   linger; the core keeps refusing reads of that generation).

use ferry_core::{Generation, Result, SampleId, StoreId};
use std::fmt;

/// One generation of one sample in one store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleKey<'a> {
    /// The store namespace.
    pub store_id: &'a StoreId,
    /// The sample.
    pub sample_id: &'a SampleId,
    /// The generation.
    pub generation: Generation,
}

impl<'a> SampleKey<'a> {
    /// The key of one object (tensor) of this sample generation.
    pub fn object(self, name: &'a str) -> ObjectKey<'a> {
        ObjectKey { sample: self, name }
    }
}

impl fmt::Display for SampleKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/g{}", self.store_id, self.sample_id, self.generation)
    }
}

/// One object: `{store_id}/{sample_id}/g{generation}/{name}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectKey<'a> {
    /// The sample generation it belongs to.
    pub sample: SampleKey<'a>,
    /// The object (feature) name.
    pub name: &'a str,
}

impl fmt::Display for ObjectKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.sample, self.name)
    }
}

/// One object to write: its name, dtype and shape (for self-describing layouts), and bytes.
#[derive(Debug, Clone, Copy)]
pub struct ObjectData<'a> {
    /// Object (feature) name.
    pub name: &'a str,
    /// The tensor it holds.
    pub tensor: ferry_core::TensorView<'a>,
}

/// What a successful removal did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// The objects are gone (or were already gone).
    Removed,
    /// The backend accepted the removal but may keep the bytes for a while (Mooncake's
    /// lease-deferred remove). The core keeps a tombstone so reads stay refused.
    Deferred,
}

/// Residency as the backend itself sees it (disk truth for a shared directory).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct BackendUsage {
    /// Distinct samples with bytes present.
    pub samples: u64,
    /// Bytes present.
    pub bytes: u64,
}

/// A byte store under the lifecycle core. Object safe; implementations are shared across
/// threads and must not hold locks across their own I/O longer than needed.
pub trait ByteBackend: Send + Sync + 'static {
    /// Short name reported in health and errors (`memory`, `shared_dir`, ...).
    fn kind(&self) -> &'static str;

    /// Writes every object of one sample generation, all or nothing.
    fn write(&self, sample: SampleKey<'_>, objects: &[ObjectData<'_>]) -> Result<()>;

    /// Copies the object's first `min(size, dst.len())` bytes into `dst`; returns its full size.
    fn read_into(&self, object: ObjectKey<'_>, dst: &mut [u8]) -> Result<usize>;

    /// Reads several objects of one sample generation, each into its buffer; returns each
    /// object's full size as [`ByteBackend::read_into`] does. Backends that keep a sample in
    /// one file override it to open and parse that file once.
    fn read_many(&self, sample: SampleKey<'_>, reads: &mut [(&str, &mut [u8])]) -> Result<Vec<usize>> {
        reads.iter_mut().map(|(name, dst)| self.read_into(sample.object(name), dst)).collect()
    }

    /// Removes the named objects of one sample generation. `force` asks a backend with
    /// lease-protected objects to remove them anyway (used by drains).
    fn remove(&self, sample: SampleKey<'_>, names: &[String], force: bool) -> Result<Removal>;

    /// Whether the object exists.
    fn exists(&self, object: ObjectKey<'_>) -> Result<bool>;

    /// The object's size in bytes, if it exists.
    fn size(&self, object: ObjectKey<'_>) -> Result<Option<u64>>;

    /// The generation for a new put: at least `proposed`, and above every generation this
    /// backend has ever held for the store, so generations are never reused even across
    /// processes that share the backend. The default trusts the caller's counter.
    fn reserve_generation(
        &self,
        _store_id: &StoreId,
        _sample_id: &SampleId,
        proposed: Generation,
    ) -> Result<Generation> {
        Ok(proposed)
    }

    /// The newest generation the backend holds for a sample, if it can tell (used for refs
    /// without a generation and to abort samples this process never tracked).
    fn latest_generation(&self, _store_id: &StoreId, _sample_id: &SampleId) -> Result<Option<Generation>> {
        Ok(None)
    }

    /// The names of the objects a sample generation holds, if the backend can list them.
    fn object_names(&self, _sample: SampleKey<'_>) -> Result<Option<Vec<String>>> {
        Ok(None)
    }

    /// The `feature_store_uri` of refs this backend's samples get.
    fn ref_uri(&self, store_id: &StoreId, sample_id: &SampleId, generation: Generation) -> String;

    /// Residency as the backend sees it, if it can tell cheaply.
    fn usage(&self, _store_id: &StoreId) -> Result<Option<BackendUsage>> {
        Ok(None)
    }
}

/// A shared backend is a backend (tests keep an `Arc` to inject faults and inspect it).
impl<B: ByteBackend + ?Sized> ByteBackend for std::sync::Arc<B> {
    fn kind(&self) -> &'static str {
        (**self).kind()
    }
    fn write(&self, sample: SampleKey<'_>, objects: &[ObjectData<'_>]) -> Result<()> {
        (**self).write(sample, objects)
    }
    fn read_into(&self, object: ObjectKey<'_>, dst: &mut [u8]) -> Result<usize> {
        (**self).read_into(object, dst)
    }
    fn read_many(&self, sample: SampleKey<'_>, reads: &mut [(&str, &mut [u8])]) -> Result<Vec<usize>> {
        (**self).read_many(sample, reads)
    }
    fn remove(&self, sample: SampleKey<'_>, names: &[String], force: bool) -> Result<Removal> {
        (**self).remove(sample, names, force)
    }
    fn exists(&self, object: ObjectKey<'_>) -> Result<bool> {
        (**self).exists(object)
    }
    fn size(&self, object: ObjectKey<'_>) -> Result<Option<u64>> {
        (**self).size(object)
    }
    fn reserve_generation(&self, store_id: &StoreId, sample_id: &SampleId, proposed: Generation) -> Result<Generation> {
        (**self).reserve_generation(store_id, sample_id, proposed)
    }
    fn latest_generation(&self, store_id: &StoreId, sample_id: &SampleId) -> Result<Option<Generation>> {
        (**self).latest_generation(store_id, sample_id)
    }
    fn object_names(&self, sample: SampleKey<'_>) -> Result<Option<Vec<String>>> {
        (**self).object_names(sample)
    }
    fn ref_uri(&self, store_id: &StoreId, sample_id: &SampleId, generation: Generation) -> String {
        (**self).ref_uri(store_id, sample_id, generation)
    }
    fn usage(&self, store_id: &StoreId) -> Result<Option<BackendUsage>> {
        (**self).usage(store_id)
    }
}
