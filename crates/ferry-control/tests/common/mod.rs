//! Test doubles shared by the control-plane tests.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use ferry_core::{
    Error, FeatureHandle, FeatureSpec, Generation, JsonMap, Result, SampleId, SampleRef, StoreId, TensorBuf, TensorView,
};
use ferry_store::{DrainPolicy, DrainReport, FeatureStoreApi, GcReport, Health, StoreOptions, open_store};
use indexmap::IndexMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Called with each aborted id before the abort runs.
pub(crate) type AbortHook = Box<dyn Fn(&SampleId) + Send + Sync>;

/// Called with each disown call's ids before it runs.
pub(crate) type DisownHook = Box<dyn Fn(&[SampleId]) + Send + Sync>;

/// A `mem://` store that records adopt / abort / disown calls and can be told to fail aborts,
/// drains or disowns, or to run a hook inside each abort or disown.
pub(crate) struct RecordingStore {
    inner: ferry_store::FeatureStore,
    events: Mutex<Vec<String>>,
    pub(crate) fail_abort: bool,
    pub(crate) fail_drain: bool,
    pub(crate) fail_disown: bool,
    pub(crate) on_abort: Option<AbortHook>,
    pub(crate) on_disown: Option<DisownHook>,
}

impl RecordingStore {
    pub(crate) fn new(fail_abort: bool) -> Arc<RecordingStore> {
        Arc::new(RecordingStore::with(fail_abort, false, None))
    }

    pub(crate) fn with(fail_abort: bool, fail_drain: bool, on_abort: Option<AbortHook>) -> RecordingStore {
        RecordingStore {
            // Online consumers keep bytes until the durable ack deletes them.
            inner: open_store("mem://test", StoreOptions { retain_on_release: true, ..StoreOptions::default() })
                .unwrap(),
            events: Mutex::new(Vec::new()),
            fail_abort,
            fail_drain,
            fail_disown: false,
            on_abort,
            on_disown: None,
        }
    }

    pub(crate) fn events(&self) -> Vec<String> {
        self.events.lock().unwrap().clone()
    }

    /// Puts a small sample and returns its ref.
    pub(crate) fn sample(&self, id: &str) -> SampleRef {
        let data: Vec<i64> = (0..4).collect();
        self.put(id, &[("input_ids", TensorView::from_elements(&[4], &data).unwrap())], JsonMap::new()).unwrap()
    }
}

impl FeatureStoreApi for RecordingStore {
    fn store_id(&self) -> &StoreId {
        self.inner.store_id()
    }
    fn put(&self, sample_id: &str, tensors: &[(&str, TensorView<'_>)], metadata: JsonMap) -> Result<SampleRef> {
        self.inner.put(sample_id, tensors, metadata)
    }
    fn put_until(
        &self,
        sample_id: &str,
        tensors: &[(&str, TensorView<'_>)],
        metadata: JsonMap,
        deadline: Instant,
    ) -> Result<SampleRef> {
        self.inner.put_until(sample_id, tensors, metadata, deadline)
    }
    fn get(&self, r: &SampleRef, names: Option<&[&str]>) -> Result<(IndexMap<String, TensorBuf>, FeatureHandle)> {
        self.inner.get(r, names)
    }
    fn get_into(&self, r: &SampleRef, dsts: &mut [(&str, &mut [u8])]) -> Result<FeatureHandle> {
        self.inner.get_into(r, dsts)
    }
    fn get_prefix_into(&self, r: &SampleRef, dsts: &mut [(&str, &mut [u8])]) -> Result<FeatureHandle> {
        self.inner.get_prefix_into(r, dsts)
    }
    fn describe(&self, r: &SampleRef) -> Result<IndexMap<String, FeatureSpec>> {
        FeatureStoreApi::describe(&self.inner, r)
    }
    fn release(&self, handle: &FeatureHandle) -> Result<()> {
        self.inner.release(handle)
    }
    fn abort(&self, sample_id: &SampleId) -> Result<()> {
        if let Some(hook) = &self.on_abort {
            hook(sample_id);
        }
        self.events.lock().unwrap().push(format!("abort {sample_id}"));
        if self.fail_abort {
            return Err(Error::Backend {
                backend: "test".into(),
                operation: "abort".into(),
                key: sample_id.to_string(),
                message: "injected abort failure".into(),
            });
        }
        FeatureStoreApi::abort(&self.inner, sample_id)
    }
    fn abort_all(&self) -> Result<usize> {
        FeatureStoreApi::abort_all(&self.inner)
    }
    fn adopt(&self, r: &SampleRef) -> Result<()> {
        self.events.lock().unwrap().push(format!("adopt {}", r.sample_id));
        FeatureStoreApi::adopt(&self.inner, r)
    }
    fn track_external_attempt(&self, sample_id: &SampleId, generation: Generation, names: &[&str]) -> Result<()> {
        FeatureStoreApi::track_external_attempt(&self.inner, sample_id, generation, names)
    }
    fn discard_external_attempts(&self) -> Result<usize> {
        FeatureStoreApi::discard_external_attempts(&self.inner)
    }
    fn gc(&self) -> Result<GcReport> {
        FeatureStoreApi::gc(&self.inner)
    }
    fn drain(&self, policy: DrainPolicy) -> Result<DrainReport> {
        self.events.lock().unwrap().push("drain".into());
        if self.fail_drain {
            return Err(Error::Backend {
                backend: "test".into(),
                operation: "drain".into(),
                key: "store".into(),
                message: "injected drain failure".into(),
            });
        }
        FeatureStoreApi::drain(&self.inner, policy)
    }
    fn drain_samples(&self, sample_ids: &[SampleId], policy: DrainPolicy) -> Result<DrainReport> {
        if self.fail_drain {
            return Err(Error::Backend {
                backend: "test".into(),
                operation: "drain".into(),
                key: format!("{} samples", sample_ids.len()),
                message: "injected drain failure".into(),
            });
        }
        FeatureStoreApi::drain_samples(&self.inner, sample_ids, policy)
    }
    fn health(&self) -> Result<Health> {
        FeatureStoreApi::health(&self.inner)
    }
    /// Records `disown <id>` per id, in call order.
    fn disown(&self, sample_ids: &[SampleId]) -> Result<()> {
        if let Some(hook) = &self.on_disown {
            hook(sample_ids);
        }
        self.events.lock().unwrap().extend(sample_ids.iter().map(|sid| format!("disown {sid}")));
        if self.fail_disown {
            return Err(Error::Io {
                context: "ferry daemon (test)".into(),
                kind: std::io::ErrorKind::NotConnected,
                message: "injected disown failure".into(),
            });
        }
        FeatureStoreApi::disown(&self.inner, sample_ids)
    }
}
