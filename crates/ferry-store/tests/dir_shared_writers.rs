//! A `dir://` store shared with other writers: another ferry store over the same directory
//! (its own index, as another process has) and a writer that does not keep ferry's generation
//! mark (SpecForge's `SharedDirFeatureStore`, stood in for by writing its file name directly).
//! A generation another writer published is never reused or replaced (any mode); with
//! `supersede=scan` a re-put also removes every older generation file of the sample and numbers
//! itself above them, so other writers' stale refs are refused.
//! (The same behaviours against the real SpecForge code: `crates/ferry-py/python/tests/
//! test_specforge_interop.py`.)
#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

use ferry_core::{DType, Error, JsonMap, SampleRef, StoreId, TensorView};
use ferry_format::Publish;
use ferry_store::backend::ObjectData;
use ferry_store::dir::{DirFormat, write_sample_file, write_sample_file_as};
use ferry_store::{FeatureStore, StoreOptions, open_store};
use serde_json::json;
use std::path::Path;

fn open_dir(root: &Path, retain: bool) -> FeatureStore {
    open_dir_with(root, retain, "")
}

fn open_dir_with(root: &Path, retain: bool, query: &str) -> FeatureStore {
    let options =
        StoreOptions { store_id: Some(StoreId::new("st")), retain_on_release: retain, ..StoreOptions::default() };
    open_store(&format!("dir://{}{query}", root.display()), options).expect("open dir:// store")
}

/// Writes `b.g<generation>.ckpt` as a writer without the mark would (SpecForge's name).
fn foreign_put(root: &Path, sid: &str, generation: u64, value: f32) {
    let bytes: Vec<u8> = [value; 4].iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = TensorView::new(DType::Float32, &[4], &bytes).unwrap();
    write_sample_file(
        &root.join("st").join(format!("{sid}.g{generation}.ckpt")),
        DirFormat::TorchZip,
        &[ObjectData { name: "x", tensor: view }],
    )
    .unwrap();
}

fn put(store: &FeatureStore, sid: &str, value: f32) -> SampleRef {
    let bytes: Vec<u8> = [value; 4].iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = TensorView::new(DType::Float32, &[4], &bytes).unwrap();
    store.put(sid, &[("x", view)], JsonMap::new()).unwrap()
}

fn read(store: &FeatureStore, r: &SampleRef) -> Result<f32, Error> {
    let (tensors, handle) = store.get(r, None)?;
    let value = f32::from_le_bytes(tensors["x"].bytes()[..4].try_into().unwrap());
    store.release(&handle)?;
    Ok(value)
}

fn files(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root.join("st"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".ckpt"))
        .collect();
    names.sort();
    names
}

#[test]
fn with_supersede_scan_a_reput_by_another_writer_removes_the_older_generation_file() {
    let dir = tempfile::tempdir().unwrap();
    let (first, second) =
        (open_dir_with(dir.path(), true, "?supersede=scan"), open_dir_with(dir.path(), true, "?supersede=scan"));
    let old = put(&first, "c", 1.0);
    let new = put(&second, "c", 2.0);
    assert!(new.generation() > old.generation());
    assert_eq!(files(dir.path()), [format!("c.g{}.ckpt", new.generation().unwrap())]);
    let err = read(&first, &old).unwrap_err();
    assert!(matches!(err, Error::NotFound { .. } | Error::StaleRef { .. } | Error::UseAfterFree { .. }), "{err}");
    assert_eq!(read(&second, &new).unwrap(), 2.0);
    assert_eq!(read(&first, &new).unwrap(), 2.0, "the first writer reads the newer generation by its ref");
}

#[test]
fn by_default_a_reput_leaves_other_writers_files_to_them() {
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = (open_dir(dir.path(), true), open_dir(dir.path(), true));
    let old = put(&first, "c", 1.0);
    let new = put(&second, "c", 2.0);
    assert!(new.generation() > old.generation(), "the shared mark keeps generations apart");
    assert_eq!(files(dir.path()).len(), 2, "O(1) puts: no listing, so the first writer's file stays its own");
    assert_eq!((read(&first, &old).unwrap(), read(&second, &new).unwrap()), (1.0, 2.0));
}

#[test]
fn a_generation_a_foreign_writer_published_is_never_reused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_dir(dir.path(), true);
    let ours = put(&store, "b", 1.0);
    // A writer without the mark re-puts b at max-on-disk + 1, the generation ferry would take.
    let theirs = ours.generation().unwrap().get() + 1;
    foreign_put(dir.path(), "b", theirs, 9.0);
    let next = put(&store, "b", 7.0);
    assert!(next.generation().unwrap().get() > theirs, "{next:?} reused generation {theirs}");
    let foreign = dir.path().join("st").join(format!("b.g{theirs}.ckpt"));
    let bytes = std::fs::read(&foreign).unwrap();
    assert!(bytes.windows(16).any(|w| w == [0, 0, 16, 65].repeat(4)), "the foreign file still holds its 9.0s");
    assert_eq!(read(&store, &next).unwrap(), 7.0);
}

#[test]
fn with_supersede_scan_a_put_numbers_itself_above_foreign_files_and_removes_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_dir_with(dir.path(), true, "?supersede=scan");
    let ours = put(&store, "b", 1.0);
    // A writer without the mark re-put b twice (SpecForge removes the older file): generation 3
    // is on disk, the mark still says 1.
    let theirs = ours.generation().unwrap().get() + 2;
    foreign_put(dir.path(), "b", theirs, 9.0);
    std::fs::remove_file(dir.path().join("st").join(format!("b.g{}.ckpt", ours.generation().unwrap()))).unwrap();
    let next = put(&store, "b", 7.0);
    assert!(next.generation().unwrap().get() > theirs, "{next:?} went below generation {theirs}");
    assert_eq!(files(dir.path()), [format!("b.g{}.ckpt", next.generation().unwrap())]);
    assert_eq!(read(&store, &next).unwrap(), 7.0);
}

#[test]
fn publishing_under_a_taken_name_fails_and_replaces_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("st")).unwrap();
    foreign_put(dir.path(), "d", 1, 9.0);
    let path = dir.path().join("st").join("d.g1.ckpt");
    let before = std::fs::read(&path).unwrap();
    let bytes = [0u8; 16];
    let view = TensorView::new(DType::Float32, &[4], &bytes).unwrap();
    let err = write_sample_file_as(&path, DirFormat::TorchZip, &[ObjectData { name: "x", tensor: view }], Publish::New)
        .unwrap_err();
    assert!(matches!(err, Error::Io { kind: std::io::ErrorKind::AlreadyExists, .. }), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(std::fs::read_dir(dir.path().join("st")).unwrap().count(), 1, "no temporary file left behind");
}

#[test]
fn put_coerces_ref_fields_and_keeps_the_metadata_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_dir(dir.path(), true);
    let bytes = [0u8; 4];
    let view = TensorView::new(DType::Float32, &[1], &bytes).unwrap();
    let metadata: JsonMap =
        serde_json::from_value(json!({"run_id": 7, "num_tokens": "12", "a": 1, "b": 2, "schema_version": 1.0}))
            .unwrap();
    let r = store.put("m", &[("x", view)], metadata).unwrap();
    assert_eq!((r.run_id.as_str(), r.num_tokens, r.schema_version), ("7", 12, 1));
    assert_eq!(r.metadata.keys().collect::<Vec<_>>(), ["run_id", "a", "b", "schema_version", "generation"]);
    let bad: JsonMap = serde_json::from_value(json!({"num_tokens": "twelve"})).unwrap();
    let err = store.put("n", &[("x", view)], bad).unwrap_err().to_string();
    assert!(err.contains("num_tokens") && err.contains("twelve"), "{err}");
    assert!(files(dir.path()).iter().all(|f| !f.starts_with("n.")), "a refused put writes nothing");
}
