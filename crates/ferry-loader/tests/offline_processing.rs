//! Offline samples are processed as SpecForge's offline datasets process them before collation
//! (`OfflineEagle3Dataset.process_data` and DFlash's offline processing): every per-token feature
//! is cut to `max_len` tokens, and for EAGLE3 the last kept token's loss mask is set to 0. Also
//! checked end to end on the real SpecForge dumps in `../shared/fixtures`, read lazily through
//! `file://` refs and compared with their safetensors twins.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ferry_core::{DType, JsonMap, TensorView, TrainBatch};
use ferry_loader::{FeatureLoader, RefSource, Sample};
use ferry_store::offline::{OfflineRefOptions, offline_refs};
use ferry_store::{StoreOptions, open_store};
use half::bf16;
use serde_json::json;
use std::path::{Path, PathBuf};

fn collect(loader: &mut FeatureLoader) -> Vec<TrainBatch> {
    loader.iter().collect::<Result<Vec<_>, _>>().unwrap()
}

fn metadata_with_max_len(max_len: u64) -> JsonMap {
    let mut meta = eagle3_metadata();
    meta.insert("format".into(), json!("offline_eagle3"));
    meta.insert("max_len".into(), json!(max_len));
    meta
}

/// The first `n` tokens of a sample, processed as SpecForge does.
fn cut(data: &SampleData, n: usize) -> (Vec<i64>, Vec<i64>, Vec<bf16>, Vec<bf16>) {
    let n = n.min(data.len as usize);
    let w = H as usize;
    (
        data.input_ids[..n].to_vec(),
        specforge_loss_mask(&data.loss_mask[..n]),
        data.aux_hidden_state[..n * 3 * w].to_vec(),
        data.hidden_state[..n * w].to_vec(),
    )
}

fn check_rows(batch: &TrainBatch, samples: &[&SampleData], keep: usize) {
    let width = batch.tensors["input_ids"].shape()[1] as usize;
    for (i, data) in samples.iter().enumerate() {
        let (ids, mask, aux, last) = cut(data, keep);
        let w = H as usize;
        assert_eq!(row::<i64>(&batch.tensors["input_ids"], i), padded(&ids, width), "input_ids row {i}");
        assert_eq!(row::<i64>(&batch.tensors["loss_mask"], i), padded(&mask, width), "loss_mask row {i}");
        assert_eq!(row::<bf16>(&batch.tensors["hidden_state"], i), padded(&aux, width * 3 * w));
        assert_eq!(row::<bf16>(&batch.tensors["target"], i), padded(&last, width * w));
        let attention: Vec<i64> = (0..width).map(|j| i64::from(j < ids.len())).collect();
        assert_eq!(row::<i64>(&batch.tensors["attention_mask"], i), attention);
    }
}

#[test]
fn offline_samples_are_cut_to_the_refs_max_len() {
    let mut fixture = Fixture::new();
    fixture.put_eagle3(eagle3_data(0, 6), metadata_with_max_len(4));
    fixture.put_eagle3(eagle3_data(1, 3), metadata_with_max_len(4));
    for workers in [0, 2] {
        let mut loader = FeatureLoader::builder(fixture.store.clone(), RefSource::Fixed(fixture.refs.clone()))
            .batch_size(2)
            .num_workers(workers)
            .build()
            .unwrap();
        let batches = collect(&mut loader);
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].tensors["input_ids"].shape(), [2, 4], "6 tokens cut to 4, 3 padded to 4");
        assert_eq!(batches[0].tensors["hidden_state"].shape(), [2, 4, 3 * H]);
        check_rows(&batches[0], &[&fixture.samples[0], &fixture.samples[1]], 4);
    }
    assert_eq!(fixture.active_leases(), 0);
}

#[test]
fn the_loaders_max_len_overrides_the_refs() {
    let mut fixture = Fixture::new();
    fixture.put_eagle3(eagle3_data(0, 6), metadata_with_max_len(4));
    fixture.put_eagle3(eagle3_data(1, 5), metadata_with_max_len(4));
    let mut loader = FeatureLoader::builder(fixture.store.clone(), RefSource::Fixed(fixture.refs.clone()))
        .batch_size(2)
        .max_len(2)
        .build()
        .unwrap();
    let batches = collect(&mut loader);
    assert_eq!(batches[0].tensors["target"].shape(), [2, 2, H]);
    check_rows(&batches[0], &[&fixture.samples[0], &fixture.samples[1]], 2);
}

#[test]
fn a_transform_sees_the_processed_sample() {
    let mut fixture = Fixture::new();
    fixture.put_eagle3(eagle3_data(0, 6), metadata_with_max_len(4));
    fixture.put_eagle3(eagle3_data(1, 3), metadata_with_max_len(4));
    let mut loader = FeatureLoader::builder(fixture.store.clone(), RefSource::Fixed(fixture.refs.clone()))
        .batch_size(2)
        .per_sample_transform(|s: &mut Sample| {
            let tokens = s.tensors["input_ids"].shape()[0];
            assert!(tokens <= 4, "{} reached the transform uncut: {tokens} tokens", s.sample_id);
            let mask = s.tensors["loss_mask"].as_elements::<i64>().unwrap();
            assert_eq!(mask.last(), Some(&0), "the last kept token is masked before the transform");
            assert!(s.tensors.contains_key("target") && !s.tensors.contains_key("aux_hidden_state"));
            Ok(())
        })
        .build()
        .unwrap();
    let batches = collect(&mut loader);
    check_rows(&batches[0], &[&fixture.samples[0], &fixture.samples[1]], 4);
    assert_eq!(fixture.active_leases(), 0);
}

#[test]
fn online_samples_are_neither_cut_nor_masked() {
    // Online capture refs already use the batch names and carry no offline format.
    let mut fixture = Fixture::new();
    let ids: Vec<i64> = (1..=6).collect();
    let ones = vec![1i64; 6];
    let hidden = vec![bf16::from_f32(1.0); 6 * 12];
    let target = vec![bf16::from_f32(2.0); 6 * 4];
    let mut meta = eagle3_metadata();
    meta.insert("max_len".into(), json!(4));
    fixture.put(
        "online:0",
        &[
            ("input_ids", TensorView::from_elements(&[1, 6], &ids).unwrap()),
            ("loss_mask", TensorView::from_elements(&[1, 6], &ones).unwrap()),
            ("hidden_state", TensorView::from_elements(&[1, 6, 12], &hidden).unwrap()),
            ("target", TensorView::from_elements(&[1, 6, 4], &target).unwrap()),
        ],
        meta,
    );
    let mut loader =
        FeatureLoader::builder(fixture.store.clone(), RefSource::Fixed(fixture.refs.clone())).build().unwrap();
    let batch = &collect(&mut loader)[0];
    assert_eq!(batch.tensors["input_ids"].shape(), [1, 6]);
    assert_eq!(row::<i64>(&batch.tensors["loss_mask"], 0), ones);
}

#[test]
fn dflash_offline_samples_are_cut_but_keep_their_loss_mask() {
    let mut fixture = Fixture::new();
    let ids: Vec<i64> = (1..=6).collect();
    let ones = vec![1i64; 6];
    let hidden: Vec<bf16> = (0..6 * 10).map(|v| bf16::from_f32(v as f32)).collect();
    let meta = json!({"strategy": "dflash", "target_repr": "hidden_state", "format": "offline_dflash", "max_len": 4});
    fixture.put(
        "d:0",
        &[
            ("input_ids", TensorView::from_elements(&[1, 6], &ids).unwrap()),
            ("loss_mask", TensorView::from_elements(&[1, 6], &ones).unwrap()),
            ("hidden_states", TensorView::from_elements(&[1, 6, 10], &hidden).unwrap()),
        ],
        meta.as_object().unwrap().clone(),
    );
    let mut r = fixture.refs[0].clone();
    r.strategy = "dflash".into();
    let mut loader =
        FeatureLoader::builder(fixture.store.clone(), RefSource::Fixed(vec![r])).strategy("dflash").build().unwrap();
    let batch = &collect(&mut loader)[0];
    assert_eq!(batch.tensors["hidden_states"].shape(), [1, 4, 10]);
    assert_eq!(row::<i64>(&batch.tensors["input_ids"], 0), ids[..4]);
    assert_eq!(row::<i64>(&batch.tensors["loss_mask"], 0), ones[..4], "DFlash keeps the last token's mask");
    assert_eq!(row::<bf16>(&batch.tensors["hidden_states"], 0), hidden[..40]);
}

fn fixtures() -> PathBuf {
    ferry_store::offline::absolute_path(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures"))
        .unwrap()
}

/// The safetensors twin of a fixture file.
fn twin(file: &Path) -> ferry_format::TensorFile {
    let rel = file.strip_prefix(fixtures()).unwrap();
    let mut name = rel.file_name().unwrap().to_os_string();
    name.push(".safetensors");
    ferry_format::TensorFile::open(&fixtures().join("expected").join(rel.with_file_name(name))).unwrap()
}

fn twin_elements<T: ferry_core::Element>(file: &ferry_format::TensorFile, name: &str) -> Vec<T> {
    file.tensor(name).unwrap().into_owned().unwrap().as_elements::<T>().unwrap().to_vec()
}

#[test]
fn specforge_eagle3_dumps_load_as_specforge_processes_them() {
    // Lazy file:// refs over the real dumps (.ckpt and .ckpt.gz), max_len 4 (the files hold 5+
    // tokens, so every sample is cut), batches of 2, rows compared with the twins.
    let root = fixtures().join("specforge-offline-eagle3");
    let options = OfflineRefOptions { max_len: 4, ..OfflineRefOptions::default() };
    let refs = offline_refs(&root, &options, false).unwrap();
    assert_eq!(refs.len(), 4);
    let store =
        open_store("mem://offline", StoreOptions { retain_on_release: true, ..StoreOptions::default() }).unwrap();
    let mut loader = FeatureLoader::builder(store, RefSource::Fixed(refs.clone())).batch_size(2).build().unwrap();
    let batches = collect(&mut loader);
    assert_eq!(batches.len(), 2);
    for (b, batch) in batches.iter().enumerate() {
        let width = batch.tensors["input_ids"].shape()[1] as usize;
        assert!(width <= 4);
        for i in 0..2 {
            let path = PathBuf::from(refs[b * 2 + i].feature_store_uri.strip_prefix("file://").unwrap());
            let twin = twin(&path);
            let ids: Vec<i64> = twin_elements(&twin, "input_ids");
            let n = ids.len().min(4);
            let aux: Vec<bf16> = twin_elements(&twin, "aux_hidden_state");
            let last: Vec<bf16> = twin_elements(&twin, "hidden_state");
            let (aux_w, last_w) = (aux.len() / ids.len(), last.len() / ids.len());
            let mask = specforge_loss_mask(&twin_elements::<i64>(&twin, "loss_mask")[..n]);
            assert_eq!(row::<i64>(&batch.tensors["input_ids"], i), padded(&ids[..n], width));
            assert_eq!(row::<i64>(&batch.tensors["loss_mask"], i), padded(&mask, width));
            assert_eq!(row::<bf16>(&batch.tensors["hidden_state"], i), padded(&aux[..n * aux_w], width * aux_w));
            assert_eq!(row::<bf16>(&batch.tensors["target"], i), padded(&last[..n * last_w], width * last_w));
            assert_eq!(batch.tensors["hidden_state"].dtype(), DType::BFloat16);
        }
    }
}

#[test]
fn specforge_dflash_dumps_load_cut_without_masking() {
    let root = fixtures().join("specforge-offline-dflash");
    let options = OfflineRefOptions {
        strategy: "dflash".into(),
        feature_keys: ["input_ids", "loss_mask", "hidden_states"].map(String::from).to_vec(),
        max_len: 3,
        ..OfflineRefOptions::default()
    };
    let refs = offline_refs(&root, &options, false).unwrap();
    let store =
        open_store("mem://offline", StoreOptions { retain_on_release: true, ..StoreOptions::default() }).unwrap();
    let mut loader =
        FeatureLoader::builder(store, RefSource::Fixed(refs.clone())).strategy("dflash").batch_size(2).build().unwrap();
    let batch = &collect(&mut loader)[0];
    assert_eq!(batch.tensors["input_ids"].shape(), [2, 3]);
    for (i, r) in refs.iter().enumerate() {
        let twin = twin(Path::new(r.feature_store_uri.strip_prefix("file://").unwrap()));
        let mask: Vec<i64> = twin_elements(&twin, "loss_mask");
        let hidden: Vec<bf16> = twin_elements(&twin, "hidden_states");
        let w = hidden.len() / mask.len();
        assert_eq!(row::<i64>(&batch.tensors["loss_mask"], i), mask[..3]);
        assert_eq!(row::<bf16>(&batch.tensors["hidden_states"], i), hidden[..3 * w]);
    }
}
