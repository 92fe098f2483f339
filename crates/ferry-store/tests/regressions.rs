//! Regression tests for bugs found in review of the lifecycle core and its backends.
#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

use ferry_core::{DType, Error, Generation, JsonMap, Result, SampleId, SampleRef, StoreId, TensorView};
use ferry_store::backend::{BackendUsage, ByteBackend, ObjectData, ObjectKey, Removal, SampleKey};
use ferry_store::{DrainPolicy, FeatureStore, MemoryBackend, SharedDirBackend, StoreOptions};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Hook = Box<dyn FnOnce() + Send>;

/// A memory backend that runs a hook right after the objects of a write became visible, before
/// `write` returns to the core (the window in which `put` holds no lock).
struct HookBackend {
    inner: Arc<MemoryBackend>,
    after_write: Mutex<Option<Hook>>,
}

impl HookBackend {
    fn set_after_write(&self, hook: impl FnOnce() + Send + 'static) {
        *self.after_write.lock().unwrap() = Some(Box::new(hook));
    }
}

impl ByteBackend for HookBackend {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn write(&self, sample: SampleKey<'_>, objects: &[ObjectData<'_>]) -> Result<()> {
        self.inner.write(sample, objects)?;
        let hook = self.after_write.lock().unwrap().take();
        if let Some(hook) = hook {
            hook();
        }
        Ok(())
    }
    fn read_into(&self, object: ObjectKey<'_>, dst: &mut [u8]) -> Result<usize> {
        self.inner.read_into(object, dst)
    }
    fn remove(&self, sample: SampleKey<'_>, names: &[String], force: bool) -> Result<Removal> {
        self.inner.remove(sample, names, force)
    }
    fn exists(&self, object: ObjectKey<'_>) -> Result<bool> {
        self.inner.exists(object)
    }
    fn size(&self, object: ObjectKey<'_>) -> Result<Option<u64>> {
        self.inner.size(object)
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

fn options() -> StoreOptions {
    StoreOptions { store_id: Some("run0".into()), ..StoreOptions::default() }
}

fn hooked_store() -> (FeatureStore, Arc<HookBackend>) {
    let backend = Arc::new(HookBackend { inner: Arc::new(MemoryBackend::default()), after_write: Mutex::new(None) });
    let store = FeatureStore::open(backend.clone(), options()).unwrap();
    (store, backend)
}

fn no_sleep_drain() -> DrainPolicy {
    DrainPolicy { max_attempts: 2, retry_interval: Duration::ZERO }
}

const DATA: [u8; 16] = [7; 16];

fn tensors() -> [(&'static str, TensorView<'static>); 1] {
    [("hidden_state", TensorView::new(DType::UInt8, &[16], &DATA).unwrap())]
}

/// A ref that names no generation (SpecForge-style): `get` resolves the backend's latest one.
fn without_generation(r: &SampleRef) -> SampleRef {
    let mut r = r.clone();
    r.metadata.remove("generation");
    r.feature_store_uri = r.feature_store_uri.split('?').next().unwrap().to_owned();
    assert!(r.generation().is_none());
    r
}

/// A `get` of the latest generation that lands while a re-put of the same sample is writing
/// observes the new generation; the put then "supersedes" its own generation, tombstones and
/// removes it, and the ref it returns is refused with use-after-free.
#[test]
fn get_of_latest_racing_a_reput_makes_the_put_free_its_own_generation() {
    let (store, backend) = hooked_store();
    let r1 = store.put("s", &tensors(), JsonMap::new()).unwrap();
    let latest = without_generation(&r1);
    let reader = store.clone();
    let handle = Arc::new(Mutex::new(None));
    let slot = handle.clone();
    backend.set_after_write(move || {
        // Reads the generation the put just wrote (the latest in the backend).
        let (got, h) = reader.get(&latest, None).unwrap();
        assert_eq!(got["hidden_state"].bytes(), &DATA[..]);
        *slot.lock().unwrap() = Some(h);
    });
    let r2 = store.put("s", &tensors(), JsonMap::new()).unwrap();
    let h = handle.lock().unwrap().take().unwrap();
    assert_eq!(h.generation, r2.generation().unwrap(), "the racing get read the new generation");
    // The put succeeded, so its ref must be readable and its bytes present.
    let (got, h2) = store.get(&r2, None).expect("the ref a successful put returned is readable");
    assert_eq!(got["hidden_state"].bytes(), &DATA[..]);
    store.release(&h).unwrap();
    store.release(&h2).unwrap();
    assert_eq!(store.health().resident_bytes, 0);
}

/// An `abort` of the sample that lands while its put is writing frees the new generation (it
/// looks the sample up in the backend); the put then records the tombstoned generation as live
/// and commits its bytes as resident. Nothing can ever read or release it, so without max-hold
/// GC the bytes stay counted forever (budget drift).
#[test]
fn abort_racing_a_put_leaves_unreadable_bytes_counted_as_resident() {
    let (store, backend) = hooked_store();
    let aborter = store.clone();
    backend.set_after_write(move || aborter.abort(&SampleId::from("s")).unwrap());
    let r = store.put("s", &tensors(), JsonMap::new()).unwrap();
    let err = store.get(&r, None).unwrap_err();
    assert!(matches!(err, Error::UseAfterFree { .. }), "{err}");
    store.gc();
    store.drain(no_sleep_drain()).unwrap();
    let health = store.health();
    assert_eq!(health.backend_usage.unwrap().bytes, 0, "the abort removed the objects");
    assert_eq!(health.resident_bytes, 0, "no bytes are physically present, none may be counted");
    assert_eq!(health.resident_samples, 0);
}

/// A ref whose spec describes an enormous (but u64-representable) tensor makes `get` allocate
/// its output buffer before anything else is checked; an allocation that cannot succeed aborts
/// the whole process instead of returning an error.
#[test]
fn get_of_a_ref_with_a_huge_spec_fails_instead_of_aborting() {
    let store = FeatureStore::open(MemoryBackend::default(), options()).unwrap();
    let mut r = store.put("s", &tensors(), JsonMap::new()).unwrap();
    r.feature_specs.get_mut("hidden_state").unwrap().shape = vec![1 << 30, 1 << 30]; // 2^60 bytes
    let err = store.get(&r, None).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_) | Error::ShortRead { .. }), "{err}");
    // Nothing was lost.
    r.feature_specs.get_mut("hidden_state").unwrap().shape = vec![16];
    let (got, h) = store.get(&r, None).unwrap();
    assert_eq!(got["hidden_state"].bytes(), &DATA[..]);
    store.release(&h).unwrap();
}

/// `adopt` counts a ref's `estimated_bytes` as resident with unchecked addition: refs with
/// huge estimates overflow the budget counter (a panic in debug builds, silent wrap-around in
/// release builds).
#[test]
fn adopting_refs_with_huge_estimated_bytes_does_not_overflow_the_budget() {
    let store = FeatureStore::open(MemoryBackend::default(), options()).unwrap();
    let template = store.put("s", &tensors(), JsonMap::new()).unwrap();
    for (i, sid) in ["x1", "x2", "x3"].into_iter().enumerate() {
        let mut r = template.clone();
        r.sample_id = sid.into();
        r.metadata.insert("generation".into(), Value::from(1000 + i as u64));
        r.estimated_bytes = i64::MAX;
        store.adopt(&r).unwrap();
    }
    let _ = store.put("t", &tensors(), JsonMap::new());
    let _ = store.health();
}

/// The debug dump tap joins the raw sample id onto `dump_dir`; a sample id with `..` writes the
/// dump outside the dump directory.
#[test]
fn dump_tap_does_not_write_outside_the_dump_dir() {
    let root = tempfile::tempdir().unwrap();
    let dump = root.path().join("dump");
    std::fs::create_dir(&dump).unwrap();
    let store =
        FeatureStore::open(MemoryBackend::default(), StoreOptions { dump_dir: Some(dump.clone()), ..options() })
            .unwrap();
    store.put("../escaped", &tensors(), JsonMap::new()).unwrap();
    assert!(!root.path().join("escaped.safetensors").exists(), "the dump escaped {}", dump.display());
}

/// A sample file in the shared directory whose generation is `u64::MAX` (a corrupt or foreign
/// writer's file) makes every later reservation overflow `high + 1`: a panic in debug builds;
/// in release builds the mark wraps to 0 and generations are reused.
#[test]
fn a_shared_dir_file_at_the_maximum_generation_does_not_panic_the_next_put() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("run0");
    std::fs::create_dir_all(&store_dir).unwrap();
    std::fs::write(store_dir.join(format!("other.g{}.safetensors", u64::MAX)), b"junk").unwrap();
    let store = FeatureStore::open(SharedDirBackend::new(dir.path()).unwrap(), options()).unwrap();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        store.put("s", &tensors(), json!({}).as_object().unwrap().clone())
    }));
    let result = outcome.expect("put must not panic");
    assert!(result.is_err(), "no generation above u64::MAX exists, so the put must fail");
}
