//! The refs-mode acceptance suite: every `SPECFORGE-RUNTIME.md` §12.7 behaviour that applies to
//! a fixed, re-iterable ref list, plus the collation rules (padding, masks, role swap) and the
//! §12.2 validation, over a retain-on-release store whose backend records every read.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ferry_core::{AlignedBuf, DType, Error, JsonMap, TensorBuf, TensorView, TrainBatch};
use ferry_loader::{FeatureLoader, RefSource, Sample};
use half::bf16;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

fn loader(fixture: &Fixture, batch_size: usize) -> FeatureLoader {
    FeatureLoader::builder(fixture.store.clone(), RefSource::Fixed(fixture.refs.clone()))
        .batch_size(batch_size)
        .build()
        .unwrap()
}

fn collect(loader: &mut FeatureLoader) -> Vec<TrainBatch> {
    loader.iter().collect::<Result<Vec<_>, _>>().unwrap()
}

fn ids(batches: &[TrainBatch]) -> Vec<Vec<String>> {
    batches.iter().map(|b| b.sample_ids.iter().map(|s| s.to_string()).collect()).collect()
}

fn shapes(batch: &TrainBatch) -> Vec<(&str, Vec<u64>)> {
    batch.tensors.iter().map(|(k, t)| (k.as_str(), t.shape().to_vec())).collect()
}

#[test]
fn four_samples_in_batches_of_two_give_two_eagle3_batches_with_swapped_roles() {
    let fixture = Fixture::eagle3(&[8, 8, 8, 8]);
    let batches = collect(&mut loader(&fixture, 2));
    assert_eq!(batches.len(), 2);
    assert_eq!(ids(&batches), [["run:00000000", "run:00000001"], ["run:00000002", "run:00000003"]]);
    for (b, batch) in batches.iter().enumerate() {
        assert_eq!(batch.strategy, "eagle3");
        assert_eq!(batch.tensors["input_ids"].shape(), [2, 8]);
        assert_eq!(batch.tensors["target"].shape(), [2, 8, 4]);
        assert_eq!(batch.tensors["hidden_state"].shape(), [2, 8, 12]);
        assert_eq!(batch.tensors["loss_mask"].shape(), [2, 8]);
        assert_eq!(batch.tensors["attention_mask"].shape(), [2, 8]);
        assert_eq!(batch.tensors["attention_mask"].dtype(), DType::Int64);
        assert!(elements::<i64>(&batch.tensors["attention_mask"]).iter().all(|v| *v == 1));
        assert_eq!(batch.metadata["target_repr"], json!("hidden_state"));
        assert_eq!(batch.metadata["ttt_length"], json!(7));
        for i in 0..2 {
            let data = &fixture.samples[b * 2 + i];
            assert_eq!(row::<i64>(&batch.tensors["input_ids"], i), data.input_ids);
            assert_eq!(row::<i64>(&batch.tensors["loss_mask"], i), specforge_loss_mask(&data.loss_mask));
            // The file's aux states feed the draft; its last hidden state is the target.
            assert_eq!(row::<bf16>(&batch.tensors["hidden_state"], i), data.aux_hidden_state);
            assert_eq!(row::<bf16>(&batch.tensors["target"], i), data.hidden_state);
        }
    }
    assert_eq!(fixture.active_leases(), 0);
}

#[test]
fn three_refs_in_batches_of_two_give_one_batch_with_drop_last_and_two_without() {
    let fixture = Fixture::eagle3(&[8, 8, 8]);
    assert_eq!(ids(&collect(&mut loader(&fixture, 2))), [["run:00000000", "run:00000001"]]);
    let mut keep_tail = FeatureLoader::builder(fixture.store.clone(), RefSource::Fixed(fixture.refs.clone()))
        .batch_size(2)
        .drop_last(false)
        .build()
        .unwrap();
    let batches = collect(&mut keep_tail);
    assert_eq!(ids(&batches)[1], ["run:00000002"]);
    assert_eq!(batches[1].tensors["hidden_state"].shape(), [1, 8, 12]);
}

#[test]
fn every_pass_yields_the_same_batches() {
    let fixture = Fixture::eagle3(&[8, 5, 7, 8, 3, 6]);
    let mut loader = loader(&fixture, 2);
    let first = collect(&mut loader);
    let second = collect(&mut loader);
    assert_eq!(ids(&first), ids(&second));
    for (a, b) in first.iter().zip(&second) {
        assert_eq!(shapes(a), shapes(b));
        for (name, t) in &a.tensors {
            assert_eq!(t.bytes(), b.tensors[name].bytes(), "{name}");
        }
    }
    assert_eq!(fixture.active_leases(), 0);
}

#[test]
fn seek_two_skips_exactly_the_first_two_batches_of_the_next_pass_only() {
    let fixture = Fixture::eagle3(&[8; 8]);
    let mut loader = loader(&fixture, 2);
    loader.seek(2).unwrap();
    let resumed = collect(&mut loader);
    assert_eq!(ids(&resumed), [["run:00000004", "run:00000005"], ["run:00000006", "run:00000007"]]);
    for skipped in 0..4 {
        assert_eq!(fixture.backend.reads_of(&format!("run:{skipped:08}")), 0, "skipped sample was fetched");
    }
    assert_eq!(collect(&mut loader).len(), 4, "the skip is one-shot");
}

#[test]
fn seek_past_the_end_fails_and_seek_to_the_end_gives_one_empty_pass() {
    let fixture = Fixture::eagle3(&[8; 6]);
    let mut loader = loader(&fixture, 2);
    assert_eq!(loader.batches_per_pass(), 3);
    let err = loader.seek(4).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)));
    assert!(err.to_string().contains("skips past the end of the data"), "{err}");
    loader.seek(3).unwrap();
    assert_eq!(collect(&mut loader).len(), 0);
    assert!(fixture.backend.started().is_empty());
    assert_eq!(collect(&mut loader).len(), 3);
}

#[test]
fn without_drop_last_five_refs_allow_seek_three_but_not_four() {
    let fixture = Fixture::eagle3(&[8; 5]);
    let mut loader = FeatureLoader::builder(fixture.store.clone(), RefSource::Fixed(fixture.refs.clone()))
        .batch_size(2)
        .drop_last(false)
        .build()
        .unwrap();
    assert!(loader.seek(4).unwrap_err().to_string().contains("skips past the end of the data"));
    loader.seek(3).unwrap();
    assert_eq!(collect(&mut loader).len(), 0);
    loader.seek(2).unwrap();
    assert_eq!(ids(&collect(&mut loader)), [["run:00000004"]]);
}

#[test]
fn skipped_refs_are_never_fetched_or_transformed() {
    let fixture = Fixture::eagle3(&[8; 4]);
    let transformed = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&transformed);
    let mut loader = FeatureLoader::builder(fixture.store.clone(), RefSource::Fixed(fixture.refs.clone()))
        .batch_size(2)
        .per_sample_transform(move |_: &mut Sample| {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .build()
        .unwrap();
    loader.seek(1).unwrap();
    assert_eq!(collect(&mut loader).len(), 1);
    assert_eq!(fixture.backend.started(), ["run:00000002", "run:00000003"], "2 gets");
    assert_eq!(transformed.load(Ordering::SeqCst), 2, "2 transforms");
}

#[test]
fn mixed_target_repr_is_refused_before_any_fetch_and_leaks_nothing() {
    let mut fixture = Fixture::new();
    fixture.put_eagle3(eagle3_data(0, 8), eagle3_metadata());
    let mut logits = eagle3_metadata();
    logits.insert("target_repr".into(), json!("logits"));
    fixture.put_eagle3(eagle3_data(1, 8), logits);
    let mut loader = loader(&fixture, 2);
    let results: Vec<_> = loader.iter().collect();
    assert_eq!(results.len(), 1, "the pass ends at its error");
    let err = results.into_iter().next().unwrap().unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert!(err.to_string().contains("\"logits\": [run:00000001]"), "{err}");
    assert!(fixture.backend.started().is_empty(), "nothing may be fetched");
    let health = fixture.store.health();
    assert_eq!((health.active_leases, health.release_pending), (0, 0));
}

#[test]
fn mixed_schema_versions_are_refused() {
    let mut fixture = Fixture::new();
    fixture.put_eagle3(eagle3_data(0, 8), eagle3_metadata());
    let mut v2 = eagle3_metadata();
    v2.insert("schema_version".into(), json!(2));
    fixture.put_eagle3(eagle3_data(1, 8), v2);
    let err = loader(&fixture, 2).iter().next().unwrap().unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)));
    assert!(err.to_string().contains("schema versions") && err.to_string().contains("2: [run:00000001]"), "{err}");
    assert!(fixture.backend.started().is_empty());
}

#[test]
fn refs_of_another_strategy_are_refused_naming_them() {
    let mut fixture = Fixture::eagle3(&[8]);
    let mut dflash = eagle3_metadata();
    dflash.insert("strategy".into(), json!("dflash"));
    fixture.put_eagle3(eagle3_data(1, 8), dflash);
    let err = loader(&fixture, 2).iter().next().unwrap().unwrap_err();
    assert!(err.to_string().contains("run:00000001 (\"dflash\")"), "{err}");
    assert!(fixture.backend.started().is_empty());
}

#[test]
fn bad_options_are_refused_at_build() {
    let fixture = Fixture::eagle3(&[8]);
    let build = |batch_size, strategy: &str| {
        FeatureLoader::builder(fixture.store.clone(), RefSource::Fixed(fixture.refs.clone()))
            .batch_size(batch_size)
            .strategy(strategy)
            .build()
    };
    assert!(build(0, "eagle3").unwrap_err().to_string().contains("batch_size must be >= 1"));
    let err = build(1, "eagle2").unwrap_err().to_string();
    assert!(err.contains("unknown strategy \"eagle2\"") && err.contains("eagle3, dflash, domino"), "{err}");
}

#[test]
fn a_failing_transform_releases_its_lease_and_ends_the_pass() {
    let fixture = Fixture::eagle3(&[8; 4]);
    let mut loader = FeatureLoader::builder(fixture.store.clone(), RefSource::Fixed(fixture.refs.clone()))
        .batch_size(2)
        .per_sample_transform(|s: &mut Sample| {
            if s.sample_id == "run:00000001" {
                return Err(Error::InvalidArgument("transform refused sample 1".into()));
            }
            Ok(())
        })
        .build()
        .unwrap();
    let mut pass = loader.iter();
    let err = pass.next().unwrap().unwrap_err();
    assert!(err.to_string().contains("transform refused sample 1"));
    assert!(pass.next().is_none());
    assert_eq!(fixture.active_leases(), 0);
    assert_eq!(fixture.store.health().resident_samples, 4, "retained data stays for the next pass");
}

#[test]
fn variable_lengths_pad_to_the_longest_with_a_correct_mask_and_zero_padding() {
    // Batch 1 reuses batch 0's pooled buffers (same sizes, batch 0 dropped first), which hold
    // nonzero bytes where batch 1 pads: the padding must be written, not inherited.
    let fixture = Fixture::eagle3(&[5, 5, 3, 5]);
    let mut loader = loader(&fixture, 2);
    let mut seen = 0;
    for (b, batch) in loader.iter().enumerate() {
        let batch = batch.unwrap();
        seen += 1;
        assert_eq!(batch.tensors["input_ids"].shape(), [2, 5]);
        assert_eq!(batch.tensors["hidden_state"].shape(), [2, 5, 12]);
        for i in 0..2 {
            let data = &fixture.samples[b * 2 + i];
            let len = data.len as usize;
            assert_eq!(row::<i64>(&batch.tensors["input_ids"], i), padded(&data.input_ids, 5));
            assert_eq!(row::<i64>(&batch.tensors["loss_mask"], i), padded(&specforge_loss_mask(&data.loss_mask), 5));
            assert_eq!(row::<bf16>(&batch.tensors["hidden_state"], i), padded(&data.aux_hidden_state, 5 * 12));
            assert_eq!(row::<bf16>(&batch.tensors["target"], i), padded(&data.hidden_state, 5 * 4));
            let mask: Vec<i64> = (0..5).map(|j| i64::from(j < len)).collect();
            assert_eq!(row::<i64>(&batch.tensors["attention_mask"], i), mask);
        }
    }
    assert_eq!(seen, 2);
}

#[test]
fn samples_missing_a_required_feature_fail_naming_it() {
    let mut fixture = Fixture::new();
    for i in 0..2 {
        let data = eagle3_data(i, 4);
        let (tokens, aux, last) = ([4u64], [1, 4, 3 * H], [1, 4, H]);
        fixture.put(
            &data.id,
            &[
                ("input_ids", TensorView::from_elements(&tokens, &data.input_ids).unwrap()),
                ("aux_hidden_state", TensorView::from_elements(&aux, &data.aux_hidden_state).unwrap()),
                ("hidden_state", TensorView::from_elements(&last, &data.hidden_state).unwrap()),
            ],
            eagle3_metadata(),
        );
    }
    let err = loader(&fixture, 2).iter().next().unwrap().unwrap_err();
    assert!(err.is_not_available(), "{err:?}");
    assert!(err.to_string().contains("\"loss_mask\"") && err.to_string().contains("run:00000000"), "{err}");
    assert!(fixture.backend.started().is_empty());
}

#[test]
fn a_feature_the_store_does_not_hold_fails_naming_it_and_leaks_no_lease() {
    let mut fixture = Fixture::eagle3(&[4, 4]);
    for r in &mut fixture.refs {
        let key = format!("{}/extra_scores", r.sample_id);
        r.feature_keys.insert("extra_scores".into(), key);
        r.feature_specs
            .insert("extra_scores".into(), ferry_core::FeatureSpec::new("extra_scores", vec![2], DType::Float32));
    }
    let err = loader(&fixture, 2).iter().next().unwrap().unwrap_err();
    assert!(err.is_not_available(), "{err:?}");
    assert!(err.to_string().contains("extra_scores"), "{err}");
    assert_eq!(fixture.active_leases(), 0);
}

#[test]
fn online_eagle3_refs_keep_their_names_and_pad_their_own_mask_with_zeros() {
    let mut fixture = Fixture::new();
    for (i, len) in [3u64, 4].into_iter().enumerate() {
        let data = eagle3_data(i, len);
        let ones = vec![1i64; len as usize];
        let (tokens, aux, last) = ([1, len], [1, len, 3 * H], [1, len, H]);
        fixture.put(
            &data.id,
            &[
                ("input_ids", TensorView::from_elements(&tokens, &data.input_ids).unwrap()),
                ("loss_mask", TensorView::from_elements(&tokens, &data.loss_mask).unwrap()),
                ("attention_mask", TensorView::from_elements(&tokens, &ones).unwrap()),
                ("hidden_state", TensorView::from_elements(&aux, &data.aux_hidden_state).unwrap()),
                ("target", TensorView::from_elements(&last, &data.hidden_state).unwrap()),
            ],
            eagle3_metadata(),
        );
    }
    let batches = collect(&mut loader(&fixture, 2));
    let batch = &batches[0];
    assert_eq!(
        shapes(batch),
        [
            ("input_ids", vec![2, 4]),
            ("loss_mask", vec![2, 4]),
            ("attention_mask", vec![2, 4]),
            ("hidden_state", vec![2, 4, 12]),
            ("target", vec![2, 4, 4])
        ]
    );
    assert_eq!(elements::<i64>(&batch.tensors["attention_mask"]), [1, 1, 1, 0, 1, 1, 1, 1]);
    let data = eagle3_data(0, 3);
    assert_eq!(row::<bf16>(&batch.tensors["hidden_state"], 0), padded(&data.aux_hidden_state, 4 * 12));
    assert_eq!(row::<bf16>(&batch.tensors["target"], 0), padded(&data.hidden_state, 4 * 4));
}

fn dflash_fixture(strategy: &str) -> Fixture {
    let mut fixture = Fixture::new();
    let mut meta = JsonMap::new();
    meta.insert("strategy".into(), json!(strategy));
    for (i, len) in [2u64, 3].into_iter().enumerate() {
        let ids: Vec<i64> = (0..len as i64).map(|j| 10 * i as i64 + j + 1).collect();
        let hidden: Vec<bf16> = (0..len * 10).map(|k| bf16::from_f32((k % 100 + 1) as f32)).collect();
        let (tokens, states) = ([1, len], [1, len, 10]);
        fixture.put(
            &format!("d:{i}"),
            &[
                ("input_ids", TensorView::from_elements(&tokens, &ids).unwrap()),
                ("loss_mask", TensorView::from_elements(&tokens, &ids).unwrap()),
                ("hidden_states", TensorView::from_elements(&states, &hidden).unwrap()),
            ],
            meta.clone(),
        );
    }
    fixture
}

#[test]
fn dflash_and_domino_collate_their_schema() {
    for strategy in ["dflash", "domino"] {
        let fixture = dflash_fixture(strategy);
        let mut loader = FeatureLoader::builder(fixture.store.clone(), RefSource::Fixed(fixture.refs.clone()))
            .batch_size(2)
            .strategy(strategy)
            .build()
            .unwrap();
        let batches = collect(&mut loader);
        let batch = &batches[0];
        assert_eq!(batch.strategy, strategy);
        assert_eq!(batch.tensors["hidden_states"].shape(), [2, 3, 10]);
        assert_eq!(elements::<i64>(&batch.tensors["input_ids"]), [1, 2, 0, 11, 12, 13]);
        assert_eq!(elements::<i64>(&batch.tensors["attention_mask"]), [1, 1, 0, 1, 1, 1]);
        assert_eq!(batch.metadata["target_repr"], json!(null), "absent metadata is null, as in Python");
    }
}

#[test]
fn the_transform_path_collates_like_the_zero_copy_path_and_sees_batch_names() {
    let fixture = Fixture::eagle3(&[6, 4, 5, 6]);
    let zero_copy = collect(&mut loader(&fixture, 2));
    let names = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&names);
    let mut with_transform = FeatureLoader::builder(fixture.store.clone(), RefSource::Fixed(fixture.refs.clone()))
        .batch_size(2)
        .per_sample_transform(move |s: &mut Sample| {
            seen.lock().unwrap().push(s.tensors.keys().cloned().collect::<Vec<_>>());
            Ok(())
        })
        .build()
        .unwrap();
    let transformed = collect(&mut with_transform);
    for (a, b) in zero_copy.iter().zip(&transformed) {
        assert_eq!(shapes(a), shapes(b));
        for (name, t) in &a.tensors {
            assert_eq!(t.bytes(), b.tensors[name].bytes(), "{name}");
        }
    }
    assert_eq!(names.lock().unwrap()[0], ["input_ids", "loss_mask", "hidden_state", "target"]);
}

#[test]
fn a_transform_may_reshape_samples_and_the_batch_follows() {
    // A max-length truncation: keep the first 2 tokens of every feature.
    let fixture = Fixture::eagle3(&[6, 4]);
    let mut loader = FeatureLoader::builder(fixture.store.clone(), RefSource::Fixed(fixture.refs.clone()))
        .batch_size(2)
        .per_sample_transform(|s: &mut Sample| {
            for tensor in s.tensors.values_mut() {
                let mut shape = tensor.shape().to_vec();
                let token_axis = if shape.len() == 1 { 0 } else { 1 };
                let per_token = tensor.bytes().len() / shape[token_axis] as usize;
                shape[token_axis] = 2;
                let kept = AlignedBuf::copy_from(&tensor.bytes()[..2 * per_token]);
                *tensor = TensorBuf::new(tensor.dtype(), shape, kept)?;
            }
            Ok(())
        })
        .build()
        .unwrap();
    let batches = collect(&mut loader);
    let batch = &batches[0];
    assert_eq!(batch.tensors["input_ids"].shape(), [2, 2]);
    assert_eq!(batch.tensors["hidden_state"].shape(), [2, 2, 12]);
    assert_eq!(batch.tensors["target"].shape(), [2, 2, 4]);
    assert_eq!(elements::<i64>(&batch.tensors["attention_mask"]), [1, 1, 1, 1]);
    assert_eq!(row::<i64>(&batch.tensors["input_ids"], 1), fixture.samples[1].input_ids[..2]);
    assert_eq!(fixture.active_leases(), 0);
}

#[test]
fn set_epoch_without_sharding_keeps_the_order() {
    let fixture = Fixture::eagle3(&[8; 4]);
    let mut loader = loader(&fixture, 2);
    let before = ids(&collect(&mut loader));
    loader.set_epoch(3);
    assert_eq!(loader.epoch(), 3);
    assert_eq!(ids(&collect(&mut loader)), before);
}

/// A store the loader can only reach through the trait: every call forwards to a
/// `FeatureStore` and is counted, as a daemon client's calls would cross the wire.
struct ForwardingStore {
    inner: ferry_store::FeatureStore,
    calls: AtomicUsize,
}

impl ForwardingStore {
    fn tick(&self) -> &ferry_store::FeatureStore {
        self.calls.fetch_add(1, Ordering::SeqCst);
        &self.inner
    }
}

impl ferry_store::FeatureStoreApi for ForwardingStore {
    fn store_id(&self) -> &ferry_core::StoreId {
        self.inner.store_id()
    }
    fn put(&self, id: &str, t: &[(&str, TensorView<'_>)], m: JsonMap) -> ferry_core::Result<ferry_core::SampleRef> {
        self.tick().put(id, t, m)
    }
    fn put_until(
        &self,
        id: &str,
        t: &[(&str, TensorView<'_>)],
        m: JsonMap,
        deadline: std::time::Instant,
    ) -> ferry_core::Result<ferry_core::SampleRef> {
        self.tick().put_until(id, t, m, deadline)
    }
    #[allow(clippy::type_complexity)]
    fn get(
        &self,
        r: &ferry_core::SampleRef,
        names: Option<&[&str]>,
    ) -> ferry_core::Result<(indexmap::IndexMap<String, TensorBuf>, ferry_core::FeatureHandle)> {
        self.tick().get(r, names)
    }
    fn get_into(
        &self,
        r: &ferry_core::SampleRef,
        d: &mut [(&str, &mut [u8])],
    ) -> ferry_core::Result<ferry_core::FeatureHandle> {
        self.tick().get_into(r, d)
    }
    fn get_prefix_into(
        &self,
        r: &ferry_core::SampleRef,
        d: &mut [(&str, &mut [u8])],
    ) -> ferry_core::Result<ferry_core::FeatureHandle> {
        self.tick().get_prefix_into(r, d)
    }
    fn describe(
        &self,
        r: &ferry_core::SampleRef,
    ) -> ferry_core::Result<indexmap::IndexMap<String, ferry_core::FeatureSpec>> {
        self.tick().describe(r)
    }
    fn release(&self, h: &ferry_core::FeatureHandle) -> ferry_core::Result<()> {
        self.tick().release(h)
    }
    fn abort(&self, id: &ferry_core::SampleId) -> ferry_core::Result<()> {
        self.tick().abort(id)
    }
    fn abort_all(&self) -> ferry_core::Result<usize> {
        self.tick().abort_all()
    }
    fn adopt(&self, r: &ferry_core::SampleRef) -> ferry_core::Result<()> {
        self.tick().adopt(r)
    }
    fn track_external_attempt(
        &self,
        id: &ferry_core::SampleId,
        g: ferry_core::Generation,
        names: &[&str],
    ) -> ferry_core::Result<()> {
        self.tick().track_external_attempt(id, g, names)
    }
    fn discard_external_attempts(&self) -> ferry_core::Result<usize> {
        self.tick().discard_external_attempts()
    }
    fn gc(&self) -> ferry_core::Result<ferry_store::GcReport> {
        Ok(self.tick().gc())
    }
    fn drain(&self, p: ferry_store::DrainPolicy) -> ferry_core::Result<ferry_store::DrainReport> {
        self.tick().drain(p)
    }
    fn drain_samples(
        &self,
        ids: &[ferry_core::SampleId],
        p: ferry_store::DrainPolicy,
    ) -> ferry_core::Result<ferry_store::DrainReport> {
        self.tick().drain_samples(ids, p)
    }
    fn health(&self) -> ferry_core::Result<ferry_store::Health> {
        Ok(self.tick().health())
    }
}

#[test]
fn any_store_behind_the_trait_serves_the_same_batches_and_load_batch_matches_a_pass() {
    let fixture = Fixture::eagle3(&[8, 5, 8, 3]);
    let expected = collect(&mut loader(&fixture, 2));
    let forwarding = Arc::new(ForwardingStore { inner: fixture.store.clone(), calls: AtomicUsize::new(0) });
    let shared: Arc<dyn ferry_store::FeatureStoreApi> = forwarding.clone();
    let mut through_trait =
        FeatureLoader::builder(shared, RefSource::Fixed(fixture.refs.clone())).batch_size(2).build().unwrap();
    let batches = collect(&mut through_trait);
    assert_eq!(ids(&batches), ids(&expected));
    for (a, b) in batches.iter().zip(&expected) {
        assert_eq!(shapes(a), shapes(b));
        for (name, t) in &a.tensors {
            assert_eq!(t.bytes(), b.tensors[name].bytes(), "{name}");
        }
    }
    assert!(forwarding.calls.load(Ordering::SeqCst) >= 8, "every read went through the trait");
    // One batch on demand, from refs the caller chose, equals the pass's batch of those refs.
    let on_demand = through_trait.load_batch(&fixture.refs[2..4]).unwrap();
    assert_eq!(on_demand.sample_ids, expected[1].sample_ids);
    for (name, t) in &on_demand.tensors {
        assert_eq!(t.bytes(), expected[1].tensors[name].bytes(), "{name}");
    }
    assert!(through_trait.load_batch(&[]).unwrap_err().to_string().contains("at least one ref"));
    assert_eq!(fixture.store.health().active_leases, 0);
}
