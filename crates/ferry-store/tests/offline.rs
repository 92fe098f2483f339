//! The offline path against SpecForge's own files: `file://` refs built exactly as SpecForge's
//! `OfflineManifestReader` builds them, read through any store; and a shared-directory store
//! reading the `.ckpt` sample files SpecForge's `SharedDirFeatureStore` wrote.
#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

use ferry_core::json::{self, JsonStyle};
use ferry_core::{Error, SampleRef};
use ferry_store::offline::{OfflineRefOptions, lazy_offline_ref, list_feature_files, offline_refs};
use ferry_store::{FeatureStore, MemoryBackend, SharedDirBackend, StoreOptions};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures"));
    assert!(dir.is_dir(), "SpecForge fixtures not found at {}: put shared/ beside the repository", dir.display());
    ferry_store::offline::absolute_path(dir).unwrap()
}

/// The expected twin of a fixture file: same tensors, contiguous, as safetensors.
fn twin(file: &Path) -> ferry_format::TensorFile {
    let rel = file.strip_prefix(fixtures()).unwrap();
    let name = format!("{}.safetensors", rel.display());
    ferry_format::TensorFile::open(&fixtures().join("expected").join(name)).unwrap()
}

fn mem_store() -> FeatureStore {
    FeatureStore::open(MemoryBackend::default(), StoreOptions::default()).unwrap()
}

#[test]
fn validated_refs_equal_specforges_offline_manifest() {
    let refs = offline_refs(&fixtures().join("specforge-offline-eagle3"), &OfflineRefOptions::default(), true).unwrap();
    let expected = std::fs::read_to_string(fixtures().join("specforge-control/offline-manifest.json")).unwrap();
    let expected = expected.replace("file:///FIXTURES/", &format!("file://{}/", fixtures().display()));
    let ours: Vec<String> = refs.iter().map(|r| json::sample_ref_to_string(r, JsonStyle::Spaced).unwrap()).collect();
    assert_eq!(format!("{{\"schema_version\": 1, \"refs\": [{}]}}", ours.join(", ")), expected);
}

#[test]
fn lazy_assembly_opens_no_file() {
    // Files that are not tensor files at all: lazy assembly must not notice.
    let dir = tempfile::tempdir().unwrap();
    for name in ["a/data_0.ckpt", "a/data_1.ckpt.gz", "b/data_2.safetensors"] {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"not a tensor file").unwrap();
    }
    let refs = offline_refs(dir.path(), &OfflineRefOptions::default(), false).unwrap();
    assert_eq!(refs.len(), 3);
    assert!(refs.iter().all(|r| r.feature_specs.is_empty() && r.num_tokens == 0 && r.estimated_bytes == 0));
    assert_eq!(refs[2].sample_id, "offline:00000002");
    assert_eq!(refs[1].metadata["file_index"], 1);
    // Validation is where the bad files are found, each error naming the file.
    let err = offline_refs(dir.path(), &OfflineRefOptions::default(), true).unwrap_err().to_string();
    assert!(err.contains("data_0.ckpt"), "{err}");
}

#[test]
fn lazy_file_refs_read_every_raw_key_through_any_store() {
    let store = mem_store();
    for folder in ["specforge-offline-eagle3", "specforge-offline-dflash"] {
        let mut options = OfflineRefOptions::default();
        if folder.ends_with("dflash") {
            options.strategy = "dflash".into();
            options.feature_keys = ["input_ids", "loss_mask", "hidden_states"].map(String::from).to_vec();
        }
        let files = list_feature_files(&fixtures().join(folder)).unwrap();
        for (i, file) in files.iter().enumerate() {
            let r = lazy_offline_ref(file, i, &options);
            let specs = store.describe(&r).unwrap();
            let twin = twin(file);
            for key in &options.feature_keys {
                assert_eq!(specs[key].shape, twin.spec(key).unwrap().shape, "{} {key}", file.display());
            }
            let (tensors, handle) = store.get(&r, None).unwrap();
            for key in &options.feature_keys {
                let want = twin.tensor(key).unwrap();
                assert_eq!(tensors[key].bytes(), want.view().bytes(), "{} {key}", file.display());
                assert_eq!(tensors[key].dtype(), want.dtype());
            }
            store.release(&handle).unwrap(); // read-only data: nothing is freed
            store.release(&handle).unwrap();
            assert!(file.exists());
            let mut dst = vec![0u8; specs["input_ids"].nbytes().unwrap() as usize];
            let again = store.get_into(&r, &mut [("input_ids", &mut dst[..])]).unwrap();
            assert_eq!(dst, twin.tensor("input_ids").unwrap().view().bytes());
            store.release(&again).unwrap();
        }
    }
    assert_eq!(store.health().active_leases, 0);
}

#[test]
fn a_missing_key_surfaces_at_the_first_get_naming_it() {
    let file = fixtures().join("specforge-offline-dflash/rows_0-2/data_0.ckpt");
    let r = lazy_offline_ref(&file, 0, &OfflineRefOptions::default()); // EAGLE3 keys on a DFlash file
    let err = mem_store().get(&r, None).unwrap_err().to_string();
    assert!(err.contains("missing required offline feature keys"), "{err}");
    assert!(err.contains("aux_hidden_state") && err.contains("data_0.ckpt"), "{err}");
}

/// A copy of SpecForge's shared-directory store (releases delete files; the fixtures stay
/// read-only).
fn specforge_shared_dir() -> (tempfile::TempDir, FeatureStore) {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("specforge-control/shared_dir/fixture");
    std::fs::create_dir_all(dir.path().join("fixture")).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join("fixture").join(entry.file_name())).unwrap();
    }
    let options = StoreOptions { store_id: Some("fixture".into()), ..StoreOptions::default() };
    let store = FeatureStore::open(SharedDirBackend::new(dir.path()).unwrap(), options).unwrap();
    (dir, store)
}

fn manifest_refs() -> Vec<SampleRef> {
    let text = std::fs::read_to_string(fixtures().join("specforge-control/manifest.json")).unwrap();
    let value: serde_json::Value = json::from_str(&text, "manifest").unwrap();
    value["refs"].as_array().unwrap().iter().map(|r| serde_json::from_value(r.clone()).unwrap()).collect()
}

#[test]
fn shared_dir_store_reads_the_files_specforge_wrote() {
    let (dir, store) = specforge_shared_dir();
    let refs = manifest_refs();
    for r in &refs {
        let file = fixtures().join(format!("specforge-control/shared_dir/fixture/{}.g1.ckpt", r.sample_id));
        if r.sample_id == "run0:task1" {
            // Re-put by SpecForge to generation 2: the manifest's generation-1 ref is stale.
            let err = store.get(r, None).unwrap_err();
            assert!(err.is_not_available(), "{err}");
            continue;
        }
        let twin = twin(&file);
        let (tensors, handle) = store.get(r, None).unwrap();
        for (name, tensor) in &tensors {
            assert_eq!(tensor.bytes(), twin.tensor(name).unwrap().view().bytes(), "{} {name}", r.sample_id);
        }
        store.release(&handle).unwrap(); // consume-once: SpecForge's file is deleted
        assert!(!dir.path().join(format!("fixture/{}.g1.ckpt", r.sample_id)).exists());
        assert!(matches!(store.get(r, None), Err(Error::UseAfterFree { .. })));
    }
    assert!(dir.path().join("fixture/run0:task1.g2.ckpt").exists(), "the newer generation is untouched");
}

#[test]
fn shared_dir_store_writes_what_specforge_reads_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let store = FeatureStore::open(SharedDirBackend::new(dir.path()).unwrap(), StoreOptions::default()).unwrap();
    let ids: Vec<i64> = (0..6).collect();
    let r = store
        .put("s0", &[("input_ids", ferry_core::TensorView::from_elements(&[6], &ids).unwrap())], Default::default())
        .unwrap();
    let path = dir.path().join(store.store_id().as_str()).join("s0.g1.ckpt");
    let file = ferry_format::TensorFile::open(&path).unwrap();
    assert_eq!(file.format(), ferry_format::FileFormat::TorchZip);
    let want: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(file.tensor("input_ids").unwrap().view().bytes(), &want[..]);
    assert_eq!(r.estimated_bytes, 48);
}

#[cfg(unix)]
#[test]
fn listing_does_not_follow_directory_symlinks_like_os_walk() {
    let dir = tempfile::tempdir().unwrap();
    let rows = dir.path().join("loop/rows");
    std::fs::create_dir_all(&rows).unwrap();
    std::fs::write(rows.join("data_0.ckpt"), b"").unwrap();
    std::os::unix::fs::symlink("..", rows.join("up")).unwrap(); // a cycle
    std::os::unix::fs::symlink(&rows, dir.path().join("again")).unwrap(); // a second way in
    std::os::unix::fs::symlink(rows.join("data_0.ckpt"), dir.path().join("link.ckpt")).unwrap(); // a file link
    let files = list_feature_files(dir.path()).unwrap();
    let rel: Vec<_> = files.iter().map(|f| f.strip_prefix(dir.path()).unwrap().to_str().unwrap().to_owned()).collect();
    assert_eq!(rel, ["link.ckpt", "loop/rows/data_0.ckpt"]);
    // The root itself may be a link to a directory, as os.walk(top) walks it.
    let via_link = list_feature_files(&dir.path().join("again")).unwrap();
    assert_eq!(via_link, [dir.path().join("again/data_0.ckpt")]);
}
