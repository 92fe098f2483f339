//! Test backends: [`FaultyBackend`] wraps any backend and injects the faults the lifecycle
//! core must survive (removes that fail, fail only when not forced, or are deferred; reads that
//! come back short; writes that fail). Public so every crate's fault tests can use it.

use crate::backend::{BackendUsage, ByteBackend, ObjectData, ObjectKey, Removal, SampleKey};
use ferry_core::{Error, Generation, Result, SampleId, StoreId};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// What removals do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveFault {
    /// Removals work.
    None,
    /// The next `n` removals fail, forced or not.
    FailTimes(u32),
    /// The next `n` non-forced removals fail (a lease-protected object); forced ones work.
    FailUnforcedTimes(u32),
    /// Every removal fails until the fault is changed.
    FailAlways,
    /// Removals are accepted but the bytes stay (lease-deferred removal).
    Defer,
}

/// Wraps a backend and injects faults.
pub struct FaultyBackend<B> {
    inner: B,
    remove_fault: Mutex<RemoveFault>,
    fail_writes: Mutex<u32>,
    /// Number of remove calls, forced or not.
    pub removes: AtomicU64,
    /// Number of forced remove calls.
    pub forced_removes: AtomicU64,
    /// Number of `exists` probes.
    pub probes: AtomicU64,
}

impl<B: ByteBackend> FaultyBackend<B> {
    /// Wraps `inner` with no faults.
    pub fn new(inner: B) -> Self {
        FaultyBackend {
            inner,
            remove_fault: Mutex::new(RemoveFault::None),
            fail_writes: Mutex::new(0),
            removes: AtomicU64::new(0),
            forced_removes: AtomicU64::new(0),
            probes: AtomicU64::new(0),
        }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// Sets what removals do from now on.
    pub fn set_remove_fault(&self, fault: RemoveFault) {
        if let Ok(mut f) = self.remove_fault.lock() {
            *f = fault;
        }
    }

    /// Makes the next `n` writes fail.
    pub fn fail_next_writes(&self, n: u32) {
        if let Ok(mut f) = self.fail_writes.lock() {
            *f = n;
        }
    }

    fn injected(op: &str, key: impl ToString) -> Error {
        Error::Backend {
            backend: "faulty".into(),
            operation: op.into(),
            key: key.to_string(),
            message: "injected fault".into(),
        }
    }
}

impl<B: ByteBackend> ByteBackend for FaultyBackend<B> {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn write(&self, sample: SampleKey<'_>, objects: &[ObjectData<'_>]) -> Result<()> {
        if let Ok(mut n) = self.fail_writes.lock()
            && *n > 0
        {
            *n -= 1;
            return Err(Self::injected("write", sample));
        }
        self.inner.write(sample, objects)
    }

    fn read_into(&self, object: ObjectKey<'_>, dst: &mut [u8]) -> Result<usize> {
        self.inner.read_into(object, dst)
    }

    fn read_many(&self, sample: SampleKey<'_>, reads: &mut [(&str, &mut [u8])]) -> Result<Vec<usize>> {
        self.inner.read_many(sample, reads)
    }

    fn remove(&self, sample: SampleKey<'_>, names: &[String], force: bool) -> Result<Removal> {
        self.removes.fetch_add(1, Ordering::SeqCst);
        if force {
            self.forced_removes.fetch_add(1, Ordering::SeqCst);
        }
        let mut fault = self.remove_fault.lock().map_err(|_| Self::injected("remove", sample))?;
        match *fault {
            RemoveFault::None => {}
            RemoveFault::FailAlways => return Err(Self::injected("remove", sample)),
            RemoveFault::FailTimes(n) => {
                *fault = if n > 1 { RemoveFault::FailTimes(n - 1) } else { RemoveFault::None };
                return Err(Self::injected("remove", sample));
            }
            RemoveFault::FailUnforcedTimes(n) if !force => {
                *fault = if n > 1 { RemoveFault::FailUnforcedTimes(n - 1) } else { RemoveFault::None };
                return Err(Self::injected("remove (object leased)", sample));
            }
            RemoveFault::FailUnforcedTimes(_) => {}
            RemoveFault::Defer => return Ok(Removal::Deferred),
        }
        drop(fault);
        self.inner.remove(sample, names, force)
    }

    fn exists(&self, object: ObjectKey<'_>) -> Result<bool> {
        self.probes.fetch_add(1, Ordering::SeqCst);
        self.inner.exists(object)
    }

    fn size(&self, object: ObjectKey<'_>) -> Result<Option<u64>> {
        self.inner.size(object)
    }

    fn reserve_generation(&self, store_id: &StoreId, sample_id: &SampleId, proposed: Generation) -> Result<Generation> {
        self.inner.reserve_generation(store_id, sample_id, proposed)
    }

    fn latest_generation(&self, store_id: &StoreId, sample_id: &SampleId) -> Result<Option<Generation>> {
        self.inner.latest_generation(store_id, sample_id)
    }

    fn object_names(&self, sample: SampleKey<'_>) -> Result<Option<Vec<String>>> {
        self.inner.object_names(sample)
    }

    fn ref_uri(&self, store_id: &StoreId, sample_id: &SampleId, generation: Generation) -> String {
        self.inner.ref_uri(store_id, sample_id, generation)
    }

    fn usage(&self, store_id: &StoreId) -> Result<Option<BackendUsage>> {
        self.inner.usage(store_id)
    }
}
