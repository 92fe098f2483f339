//! Fixtures shared by the loader tests: a `mem://`-style store over a backend that records every
//! read and removal and can hold, gate or fail the read (or fail the removal) of chosen samples
//! (every wait has a deadline), and EAGLE3/DFlash samples with known bytes.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)] // helpers: a failed setup step should panic

use ferry_core::{Error, Generation, JsonMap, Result, SampleId, SampleRef, StoreId, TensorView};
use ferry_store::backend::{BackendUsage, ByteBackend, ObjectData, ObjectKey, Removal, SampleKey};
use ferry_store::{FeatureStore, MemoryBackend, StoreOptions};
use half::bf16;
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long any test wait may take before the test fails instead of hanging.
pub const DEADLINE: Duration = Duration::from_secs(20);

#[derive(Default)]
struct Control {
    /// Sample ids whose read has begun, in order.
    started: Vec<String>,
    /// Sample ids whose read has completed, in order.
    completed: Vec<String>,
    /// Reads of these samples fail.
    failing: HashSet<String>,
    /// Reads of these samples wait until the gate is opened.
    gated: HashSet<String>,
    /// Reads of the key wait until the value's read has completed.
    after: HashMap<String, String>,
    /// Removals of these samples fail.
    failing_removes: HashSet<String>,
    /// Store-visible events in order: `remove <id>`, `lookup <id>` (the backend was asked for
    /// a sample's latest generation), and whatever a test notes.
    events: Vec<String>,
}

/// A memory backend that records reads and can hold, gate or fail them.
pub struct TestBackend {
    inner: MemoryBackend,
    control: Mutex<Control>,
    changed: Condvar,
}

impl TestBackend {
    pub fn new() -> Arc<Self> {
        Arc::new(TestBackend { inner: MemoryBackend::default(), control: Mutex::default(), changed: Condvar::new() })
    }

    /// Reads begun, per sample id order.
    pub fn started(&self) -> Vec<String> {
        self.control.lock().unwrap().started.clone()
    }

    /// Reads completed, in order.
    pub fn completed(&self) -> Vec<String> {
        self.control.lock().unwrap().completed.clone()
    }

    /// How many reads of `sample` began.
    pub fn reads_of(&self, sample: &str) -> usize {
        self.started().iter().filter(|s| *s == sample).count()
    }

    pub fn fail_reads_of(&self, sample: &str) {
        self.control.lock().unwrap().failing.insert(sample.into());
    }

    pub fn gate(&self, sample: &str) {
        self.control.lock().unwrap().gated.insert(sample.into());
    }

    pub fn open_gate(&self, sample: &str) {
        self.control.lock().unwrap().gated.remove(sample);
        self.changed.notify_all();
    }

    /// Makes the read of `sample` wait until `other` has been read.
    pub fn read_after(&self, sample: &str, other: &str) {
        self.control.lock().unwrap().after.insert(sample.into(), other.into());
    }

    pub fn fail_removes_of(&self, sample: &str) {
        self.control.lock().unwrap().failing_removes.insert(sample.into());
    }

    /// Appends `event` to the event log (tests record their own calls next to the backend's).
    pub fn note(&self, event: impl Into<String>) {
        self.control.lock().unwrap().events.push(event.into());
    }

    /// The event log, in order.
    pub fn events(&self) -> Vec<String> {
        self.control.lock().unwrap().events.clone()
    }

    /// Samples the backend holds for `store_id`.
    pub fn resident_samples(&self, store_id: &StoreId) -> u64 {
        self.inner.usage(store_id).unwrap().map_or(0, |u| u.samples)
    }

    /// Waits (with [`DEADLINE`]) until a read of `sample` has begun.
    pub fn wait_started(&self, sample: &str) {
        let deadline = Instant::now() + DEADLINE;
        let mut control = self.control.lock().unwrap();
        while !control.started.iter().any(|s| s == sample) {
            let left = deadline.checked_duration_since(Instant::now()).expect("read never started");
            control = self.changed.wait_timeout(control, left).unwrap().0;
        }
    }

    fn before_read(&self, sample: &str) -> Result<()> {
        let deadline = Instant::now() + DEADLINE;
        let mut control = self.control.lock().unwrap();
        control.started.push(sample.into());
        self.changed.notify_all();
        if control.failing.contains(sample) {
            return Err(Error::Backend {
                backend: "test".into(),
                operation: "read".into(),
                key: sample.into(),
                message: "injected read fault".into(),
            });
        }
        loop {
            let held = control.gated.contains(sample)
                || control.after.get(sample).is_some_and(|other| !control.completed.contains(other));
            let Some(left) = deadline.checked_duration_since(Instant::now()) else { break };
            if !held {
                break;
            }
            control = self.changed.wait_timeout(control, left).unwrap().0;
        }
        Ok(())
    }
}

impl ByteBackend for TestBackend {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn write(&self, sample: SampleKey<'_>, objects: &[ObjectData<'_>]) -> Result<()> {
        self.inner.write(sample, objects)
    }
    fn read_into(&self, object: ObjectKey<'_>, dst: &mut [u8]) -> Result<usize> {
        self.inner.read_into(object, dst)
    }
    fn read_many(&self, sample: SampleKey<'_>, reads: &mut [(&str, &mut [u8])]) -> Result<Vec<usize>> {
        self.before_read(sample.sample_id.as_str())?;
        let counts = self.inner.read_many(sample, reads)?;
        self.control.lock().unwrap().completed.push(sample.sample_id.to_string());
        self.changed.notify_all();
        Ok(counts)
    }
    fn remove(&self, sample: SampleKey<'_>, names: &[String], force: bool) -> Result<Removal> {
        let id = sample.sample_id.to_string();
        let fail = {
            let mut control = self.control.lock().unwrap();
            control.events.push(format!("remove {id}"));
            control.failing_removes.contains(&id)
        };
        if fail {
            return Err(Error::Backend {
                backend: "test".into(),
                operation: "remove".into(),
                key: id,
                message: "injected remove fault".into(),
            });
        }
        self.inner.remove(sample, names, force)
    }
    fn exists(&self, object: ObjectKey<'_>) -> Result<bool> {
        self.inner.exists(object)
    }
    fn size(&self, object: ObjectKey<'_>) -> Result<Option<u64>> {
        self.inner.size(object)
    }
    fn latest_generation(&self, store_id: &StoreId, sample_id: &SampleId) -> Result<Option<Generation>> {
        self.control.lock().unwrap().events.push(format!("lookup {sample_id}"));
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

/// Hidden size of the EAGLE3 fixtures (aux states are 3H wide).
pub const H: u64 = 4;

/// The bytes one fixture sample was put with, by raw key.
#[derive(Debug, Clone)]
pub struct SampleData {
    pub id: String,
    pub len: u64,
    pub input_ids: Vec<i64>,
    pub loss_mask: Vec<i64>,
    pub aux_hidden_state: Vec<bf16>,
    pub hidden_state: Vec<bf16>,
}

/// A re-iterable offline store (`retain_on_release`) with recorded reads.
pub struct Fixture {
    pub store: FeatureStore,
    pub backend: Arc<TestBackend>,
    pub refs: Vec<SampleRef>,
    pub samples: Vec<SampleData>,
}

/// SpecForge's offline EAGLE3 metadata.
pub fn eagle3_metadata() -> JsonMap {
    let json = json!({"strategy": "eagle3", "target_repr": "hidden_state", "ttt_length": 7});
    json.as_object().unwrap().clone()
}

/// Nonzero bf16 values that are exact integers (so padding zeros are distinguishable).
fn values(count: u64, seed: u64) -> Vec<bf16> {
    (0..count).map(|k| bf16::from_f32(((seed * 31 + k * 7) % 200 + 1) as f32)).collect()
}

/// The offline EAGLE3 sample `index` with `len` tokens.
pub fn eagle3_data(index: usize, len: u64) -> SampleData {
    let i = index as i64;
    SampleData {
        id: format!("run:{index:08}"),
        len,
        input_ids: (0..len as i64).map(|j| i * 1000 + j + 1).collect(),
        loss_mask: (0..len as i64).map(|j| (i + j) % 2).collect(),
        aux_hidden_state: values(len * 3 * H, index as u64 * 2),
        hidden_state: values(len * H, index as u64 * 2 + 1),
    }
}

impl Fixture {
    /// A re-iterable (retain-on-release) store: offline data.
    pub fn new() -> Fixture {
        Fixture::with_retain(true)
    }

    /// A consume-once store (online data: the last release frees a sample).
    pub fn consume_once() -> Fixture {
        Fixture::with_retain(false)
    }

    fn with_retain(retain_on_release: bool) -> Fixture {
        let backend = TestBackend::new();
        let options = StoreOptions { retain_on_release, store_id: Some(StoreId::new("x")), ..Default::default() };
        let store = FeatureStore::open(Arc::clone(&backend), options).unwrap();
        Fixture { store, backend, refs: Vec::new(), samples: Vec::new() }
    }

    /// Another process's view of the same store (same backend and store id, its own
    /// bookkeeping), as a trainer sees samples a capture server wrote.
    pub fn other_view(&self) -> FeatureStore {
        let options = StoreOptions {
            retain_on_release: self.store.retains_on_release(),
            store_id: Some(self.store.store_id().clone()),
            ..Default::default()
        };
        FeatureStore::open(Arc::clone(&self.backend), options).unwrap()
    }

    /// An online (consume-once) EAGLE3 fixture of samples with these token counts.
    pub fn eagle3_consume_once(lengths: &[u64]) -> Fixture {
        let mut fixture = Fixture::consume_once();
        for (i, len) in lengths.iter().enumerate() {
            fixture.put_eagle3(eagle3_data(i, *len), eagle3_metadata());
        }
        fixture
    }

    /// An offline EAGLE3 fixture of samples with these token counts.
    pub fn eagle3(lengths: &[u64]) -> Fixture {
        let mut fixture = Fixture::new();
        for (i, len) in lengths.iter().enumerate() {
            fixture.put_eagle3(eagle3_data(i, *len), eagle3_metadata());
        }
        fixture
    }

    /// Puts one offline EAGLE3 sample (raw keys `input_ids`, `loss_mask`, `aux_hidden_state`,
    /// `hidden_state`).
    pub fn put_eagle3(&mut self, data: SampleData, metadata: JsonMap) -> SampleRef {
        let (tokens, aux, last) = ([data.len], [1, data.len, 3 * H], [1, data.len, H]);
        let r = self
            .store
            .put(
                data.id.as_str(),
                &[
                    ("input_ids", TensorView::from_elements(&tokens, &data.input_ids).unwrap()),
                    ("loss_mask", TensorView::from_elements(&tokens, &data.loss_mask).unwrap()),
                    ("aux_hidden_state", TensorView::from_elements(&aux, &data.aux_hidden_state).unwrap()),
                    ("hidden_state", TensorView::from_elements(&last, &data.hidden_state).unwrap()),
                ],
                metadata,
            )
            .unwrap();
        self.refs.push(r.clone());
        self.samples.push(data);
        r
    }

    /// Puts a sample with arbitrary tensors.
    pub fn put(&mut self, id: &str, tensors: &[(&str, TensorView<'_>)], metadata: JsonMap) -> SampleRef {
        let r = self.store.put(id, tensors, metadata).unwrap();
        self.refs.push(r.clone());
        r
    }

    pub fn active_leases(&self) -> u64 {
        self.store.health().active_leases
    }
}

/// A tensor's elements (panics on a dtype mismatch).
pub fn elements<T: ferry_core::Element>(t: &ferry_core::TensorBuf) -> Vec<T> {
    t.as_elements::<T>().unwrap().to_vec()
}

/// Row `row` of a `(B, Lmax, ...)` tensor, as elements.
pub fn row<T: ferry_core::Element>(t: &ferry_core::TensorBuf, row: usize) -> Vec<T> {
    let all = t.as_elements::<T>().unwrap();
    let per_row = all.len() / t.shape()[0] as usize;
    all[row * per_row..(row + 1) * per_row].to_vec()
}

/// `data` followed by `pad` zeros of the same type.
pub fn padded<T: Copy + Default>(data: &[T], total: usize) -> Vec<T> {
    let mut out = data.to_vec();
    out.resize(total, T::default());
    out
}

/// A loss mask as SpecForge's offline EAGLE3 transform leaves it: the last token's value is 0
/// (it has no next token to predict).
pub fn specforge_loss_mask(mask: &[i64]) -> Vec<i64> {
    let mut out = mask.to_vec();
    if let Some(last) = out.last_mut() {
        *last = 0;
    }
    out
}
