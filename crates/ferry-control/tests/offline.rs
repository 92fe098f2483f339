//! The offline control path against SpecForge's own artifacts: the manifest is byte-identical,
//! the sentinel protocol behaves as §7.5 says, and ingest publishes exactly what it put and
//! cleans up exactly that on failure.
#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

use ferry_control::manifest::manifest_bytes;
use ferry_control::sentinel::wait_for;
use ferry_control::{IngestOptions, OfflineControl, ingest_files, read_ref_manifest, run_offline_producer};
use ferry_core::{Error, SampleRef};
use ferry_store::offline::list_feature_files;
use ferry_store::testing::{FaultyBackend, RemoveFault};
use ferry_store::{FeatureStore, MemoryBackend, SharedDirBackend, StoreOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn fixtures() -> PathBuf {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures"));
    assert!(dir.is_dir(), "SpecForge fixtures not found at {}: put shared/ beside the repository", dir.display());
    dir.canonicalize().unwrap()
}

fn dir_store(root: &Path) -> FeatureStore {
    let options = StoreOptions { store_id: Some("ingest".into()), ..StoreOptions::default() };
    FeatureStore::open(SharedDirBackend::new(root).unwrap(), options).unwrap()
}

#[test]
fn manifest_is_byte_identical_to_specforges() {
    let path = fixtures().join("specforge-control/manifest.json");
    let refs = read_ref_manifest(&path).unwrap();
    assert_eq!(refs.len(), 3);
    assert_eq!(manifest_bytes(&refs).unwrap(), std::fs::read_to_string(&path).unwrap());
    let offline = fixtures().join("specforge-control/offline-manifest.json");
    let refs = read_ref_manifest(&offline).unwrap();
    assert_eq!(manifest_bytes(&refs).unwrap(), std::fs::read_to_string(&offline).unwrap());
}

#[test]
fn manifest_write_is_atomic_and_read_checks_the_version() {
    let dir = tempfile::tempdir().unwrap();
    let refs = read_ref_manifest(&fixtures().join("specforge-control/manifest.json")).unwrap();
    let path = dir.path().join("sub/manifest.json");
    ferry_control::write_ref_manifest(&refs, &path).unwrap();
    assert_eq!(read_ref_manifest(&path).unwrap(), refs);
    assert!(!dir.path().join("sub/manifest.json.tmp").exists());
    std::fs::write(&path, r#"{"schema_version": 2, "refs": []}"#).unwrap();
    assert!(read_ref_manifest(&path).unwrap_err().to_string().contains("schema_version 2 is not supported"));
    std::fs::write(&path, r#"{"schema_version": 1, "refs": [], "extra": 1}"#).unwrap();
    assert!(read_ref_manifest(&path).unwrap_err().to_string().contains("extra"));
}

#[test]
fn producer_claim_is_exclusive_and_refuses_old_artifacts() {
    let dir = tempfile::tempdir().unwrap();
    let control = OfflineControl::new(dir.path().join("manifest.json"));
    control.claim_producer().unwrap();
    let claim = std::fs::read_to_string(control.claim_path()).unwrap();
    assert_eq!(claim, format!("pid={}\n", std::process::id()));
    let err = control.claim_producer().unwrap_err().to_string();
    assert!(err.contains("artifacts from an existing attempt"), "{err}");
    for sidecar in [".done", ".failed", ".consumed", ".consumer_failed", ""] {
        let fresh = tempfile::tempdir().unwrap();
        let control = OfflineControl::new(fresh.path().join("m.json"));
        std::fs::write(format!("{}{sidecar}", control.manifest().display()), b"").unwrap();
        assert!(control.claim_producer().is_err(), "{sidecar}");
    }
}

#[test]
fn sentinel_reasons_round_trip_and_waits_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let control = OfflineControl::new(dir.path().join("manifest.json"));
    assert_eq!(control.failure(), None);
    control.mark_consumer_failed("").unwrap();
    assert_eq!(control.consumer_failure().as_deref(), Some("unknown remote failure"));
    let deadline = Some(Instant::now() + Duration::from_millis(30));
    let err = control.wait_for_done(deadline, Duration::from_millis(5)).unwrap_err();
    assert!(matches!(&err, Error::Timeout { what, .. } if what.ends_with("manifest.json.done")), "{err}");
    control.mark_failed("RuntimeError: capture died").unwrap();
    let err = control.wait_for_done(None, Duration::from_millis(5)).unwrap_err().to_string();
    assert!(err.contains("remote role failed while waiting: RuntimeError: capture died"), "{err}");
    control.mark_done().unwrap();
    wait_for(&control.done_path(), None, None, Duration::from_millis(1)).unwrap();
    assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| !e.unwrap().file_name().to_str().unwrap().contains(".tmp")));
}

#[test]
fn ingest_puts_every_fixture_file_byte_for_byte_in_order() {
    let root = tempfile::tempdir().unwrap();
    let store = dir_store(root.path());
    let files = list_feature_files(&fixtures().join("specforge-offline-eagle3")).unwrap();
    let options = IngestOptions { workers: 2, ..IngestOptions::default() };
    let seen = Mutex::new(Vec::new());
    let bytes = Mutex::new(0u64);
    let report = ingest_files(
        &store,
        &files,
        &options,
        &|r: &SampleRef| seen.lock().unwrap().push(r.sample_id.to_string()),
        &|b| *bytes.lock().unwrap() += b,
    )
    .unwrap();
    let ids: Vec<String> = report.refs.iter().map(|r| r.sample_id.to_string()).collect();
    assert_eq!(ids, ["disagg:00000000", "disagg:00000001", "disagg:00000002", "disagg:00000003"]);
    let mut seen = seen.into_inner().unwrap();
    seen.sort();
    assert_eq!(seen, ids);
    // Progress counts on-disk bytes; the report counts tensor bytes put.
    let on_disk: u64 = files.iter().map(|f| std::fs::metadata(f).unwrap().len()).sum();
    assert_eq!(*bytes.lock().unwrap(), on_disk);
    let put: u64 = report.refs.iter().flat_map(|r| r.feature_specs.values()).map(|s| s.nbytes().unwrap()).sum();
    assert_eq!(report.bytes, put);
    for (r, file) in report.refs.iter().zip(&files) {
        assert_eq!(r.metadata["format"], "offline_eagle3");
        assert_eq!(r.metadata["file_index"], serde_json::json!(r.sample_id.as_str()[7..].parse::<u64>().unwrap()));
        let original = ferry_format::TensorFile::open(file).unwrap();
        assert_eq!(r.num_tokens as u64, original.spec("input_ids").unwrap().numel().unwrap());
        let (tensors, handle) = store.get(r, None).unwrap();
        for (name, tensor) in &tensors {
            let want = original.tensor(name).unwrap();
            assert_eq!(tensor.bytes(), want.view().bytes(), "{} {name}", file.display());
            assert_eq!(tensor.shape(), want.shape());
        }
        store.release(&handle).unwrap();
    }
    assert_eq!(store.health().resident_bytes, 0);
}

/// A folder of 3 feature files whose second lacks `aux_hidden_state`.
fn broken_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let eagle = fixtures().join("specforge-offline-eagle3/rows_0-2");
    std::fs::copy(eagle.join("data_0.ckpt"), dir.path().join("a.ckpt")).unwrap();
    std::fs::copy(fixtures().join("specforge-offline-dflash/rows_0-2/data_0.ckpt"), dir.path().join("b.ckpt")).unwrap();
    std::fs::copy(eagle.join("data_1.ckpt"), dir.path().join("c.ckpt")).unwrap();
    dir
}

#[test]
fn partial_ingest_reports_exactly_what_it_put() {
    let input = broken_folder();
    let store = FeatureStore::open(MemoryBackend::default(), StoreOptions::default()).unwrap();
    let files = list_feature_files(input.path()).unwrap();
    let options = IngestOptions {
        workers: 1,
        refs: ferry_store::offline::OfflineRefOptions { run_id: "partial".into(), ..Default::default() },
        ..IngestOptions::default()
    };
    let seen = Mutex::new(Vec::new());
    let err = ingest_files(&store, &files, &options, &|r| seen.lock().unwrap().push(r.sample_id.to_string()), &|_| {})
        .unwrap_err();
    assert!(err.to_string().contains("missing required offline feature keys"), "{err}");
    assert!(err.to_string().contains("aux_hidden_state"), "{err}");
    assert_eq!(seen.into_inner().unwrap(), ["partial:00000000"]);
}

#[test]
fn failed_producer_writes_failed_first_and_cleans_up_exactly() {
    let input = broken_folder();
    let root = tempfile::tempdir().unwrap();
    let store = dir_store(root.path());
    let unrelated = store
        .put(
            "unrelated",
            &[("x", ferry_core::TensorView::from_elements(&[2], &[1i64, 2]).unwrap())],
            Default::default(),
        )
        .unwrap();
    let control = OfflineControl::new(root.path().join("control/manifest.json"));
    let options = IngestOptions { workers: 2, ..IngestOptions::default() };
    let err = run_offline_producer(&store, input.path(), &control, &options, &|_| {}).unwrap_err();
    assert!(err.to_string().contains("missing required offline feature keys"), "{err}");
    assert!(control.failure().unwrap().contains("missing required offline feature keys"));
    assert!(!control.manifest().exists() && !control.done_path().exists());
    let left: Vec<_> = list_feature_files(&root.path().join("ingest")).unwrap_or_default();
    assert_eq!(left.len(), 1, "only the unrelated sample is left: {left:?}");
    let (_, handle) = store.get(&unrelated, None).unwrap();
    store.release(&handle).unwrap();
}

#[test]
fn cleanup_failures_are_loud_and_land_in_failed() {
    let input = broken_folder();
    let faults = Arc::new(FaultyBackend::new(MemoryBackend::default()));
    let store = FeatureStore::open(faults.clone(), StoreOptions::default()).unwrap();
    faults.set_remove_fault(RemoveFault::FailAlways);
    let dir = tempfile::tempdir().unwrap();
    let control = OfflineControl::new(dir.path().join("manifest.json"));
    let options = IngestOptions { workers: 1, ..IngestOptions::default() };
    let err = run_offline_producer(&store, input.path(), &control, &options, &|_| {}).unwrap_err();
    assert!(err.failure_recorded, "{err}");
    let err = err.to_string();
    assert!(err.contains("missing required offline feature keys"), "{err}");
    assert!(err.contains("offline cleanup did not remove every ingested sample"), "{err}");
    let failed = control.failure().unwrap();
    assert!(failed.contains("could not drain"), "{failed}");
    assert_eq!(failed, format!("RuntimeError: {err}"));
    assert!(failed.starts_with("RuntimeError: KeyError: "), "{failed}");
}

#[test]
fn successful_producer_writes_manifest_then_done() {
    let root = tempfile::tempdir().unwrap();
    let store = dir_store(root.path());
    let control = OfflineControl::new(root.path().join("manifest.json"));
    let options = IngestOptions { workers: 2, ..IngestOptions::default() };
    let report = run_offline_producer(
        &store,
        &fixtures().join("specforge-offline-dflash"),
        &control,
        &options_dflash(options),
        &|_| {},
    )
    .unwrap();
    assert!(control.done_path().exists());
    assert_eq!(read_ref_manifest(control.manifest()).unwrap(), report.refs);
    assert_eq!(report.refs.len(), 2);
    assert!(
        run_offline_producer(
            &store,
            &fixtures().join("specforge-offline-dflash"),
            &control,
            &options_dflash(IngestOptions::default()),
            &|_| {}
        )
        .unwrap_err()
        .to_string()
        .contains("existing attempt")
    );
}

fn options_dflash(mut options: IngestOptions) -> IngestOptions {
    options.refs.strategy = "dflash".into();
    options.refs.feature_keys = ["input_ids", "loss_mask", "hidden_states"].map(String::from).to_vec();
    options
}

/// Makes every write of `<manifest>.failed` fail: its temp path is taken by a directory.
fn block_failed_writes(control: &OfflineControl) -> PathBuf {
    let tmp = PathBuf::from(format!("{}.tmp.{}", control.failed_path().display(), std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    tmp
}

/// Sample files left in a dir store's `ingest` namespace.
fn sample_files(root: &Path) -> Vec<PathBuf> {
    list_feature_files(&root.join("ingest")).unwrap_or_default()
}

#[test]
fn a_failed_sentinel_write_still_cleans_up_and_names_both_errors() {
    let input = broken_folder();
    let root = tempfile::tempdir().unwrap();
    let store = dir_store(root.path());
    let control = OfflineControl::new(root.path().join("control/manifest.json"));
    std::fs::create_dir_all(root.path().join("control")).unwrap();
    block_failed_writes(&control);
    let options = IngestOptions { workers: 1, ..IngestOptions::default() };
    let err = run_offline_producer(&store, input.path(), &control, &options, &|_| {}).unwrap_err();
    assert!(!err.failure_recorded, "{err}");
    assert!(matches!(err.error.primary(), Error::MissingFeatureKeys { .. }), "{err}");
    let err = err.to_string();
    assert!(err.contains("missing required offline feature keys"), "the primary error is kept: {err}");
    assert!(err.contains("manifest.json.failed"), "the sentinel write error is named: {err}");
    assert!(sample_files(root.path()).is_empty(), "abort + drain still ran: {:?}", sample_files(root.path()));
    assert!(!control.failed_path().exists() && !control.done_path().exists());
}

#[test]
fn failed_holds_the_python_exception_type_and_message() {
    let input = broken_folder();
    let root = tempfile::tempdir().unwrap();
    let store = dir_store(root.path());
    let control = OfflineControl::new(root.path().join("manifest.json"));
    let options = IngestOptions { workers: 1, ..IngestOptions::default() };
    let err = run_offline_producer(&store, input.path(), &control, &options, &|_| {}).unwrap_err();
    assert!(err.failure_recorded, "{err}");
    let failed = control.failure().unwrap();
    assert!(failed.starts_with("KeyError: "), "{failed}");
    assert_eq!(failed, format!("KeyError: {err}"));
}

#[test]
fn a_missing_key_reads_cleanly() {
    let input = broken_folder();
    let store = FeatureStore::open(MemoryBackend::default(), StoreOptions::default()).unwrap();
    let files = list_feature_files(input.path()).unwrap();
    let options = IngestOptions { workers: 1, ..IngestOptions::default() };
    let err = ingest_files(&store, &files, &options, &|_| {}, &|_| {}).unwrap_err().to_string();
    assert!(err.contains("b.ckpt missing required offline feature keys ['hidden_state', 'aux_hidden_state']"), "{err}");
    assert!(!err.contains("is not available"), "{err}");
    assert!(err.contains("hidden_states"), "the message says what the file holds: {err}");
}

#[test]
fn progress_counts_on_disk_bytes_like_the_total() {
    let root = tempfile::tempdir().unwrap();
    let store = dir_store(root.path());
    let files = list_feature_files(&fixtures().join("specforge-offline-eagle3")).unwrap();
    assert!(files.iter().any(|f| f.to_str().unwrap().ends_with(".ckpt.gz")));
    let on_disk: u64 = files.iter().map(|f| std::fs::metadata(f).unwrap().len()).sum();
    let progress = Mutex::new(0u64);
    let options = IngestOptions { workers: 2, ..IngestOptions::default() };
    ingest_files(&store, &files, &options, &|_| {}, &|b| *progress.lock().unwrap() += b).unwrap();
    assert_eq!(*progress.lock().unwrap(), on_disk);
}

#[test]
fn an_unreadable_or_non_utf8_failed_still_fails_the_wait() {
    let dir = tempfile::tempdir().unwrap();
    let control = OfflineControl::new(dir.path().join("manifest.json"));
    std::fs::write(control.failed_path(), b"RuntimeError: bad \xff byte").unwrap();
    assert_eq!(control.failure().as_deref(), Some("RuntimeError: bad \u{fffd} byte"));
    let deadline = Some(Instant::now() + Duration::from_secs(5));
    let err = control.wait_for_done(deadline, Duration::from_millis(5)).unwrap_err();
    assert!(!matches!(err, Error::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("bad \u{fffd} byte"), "{err}");

    let other = OfflineControl::new(dir.path().join("other.json"));
    std::fs::create_dir(other.failed_path()).unwrap(); // exists, but cannot be read as a file
    assert_eq!(other.failure().as_deref(), Some("unknown remote failure"));
    let err = other.wait_for_done(deadline, Duration::from_millis(5)).unwrap_err();
    assert!(err.to_string().contains("unknown remote failure"), "{err}");
}

#[test]
fn an_input_without_feature_files_is_refused_before_claiming() {
    let root = tempfile::tempdir().unwrap();
    let store = dir_store(root.path());
    let input = tempfile::tempdir().unwrap();
    std::fs::write(input.path().join("notes.txt"), b"x").unwrap();
    let control = OfflineControl::new(root.path().join("manifest.json"));
    let err = run_offline_producer(&store, input.path(), &control, &IngestOptions::default(), &|_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains(input.path().to_str().unwrap()), "{err}");
    assert!(err.contains(".ckpt") && err.contains(".ckpt.gz") && err.contains(".safetensors"), "{err}");
    for path in [control.claim_path(), control.done_path(), control.failed_path(), control.manifest().to_owned()] {
        assert!(!path.exists(), "{}", path.display());
    }
}

#[test]
fn unwritable_failed_and_failed_cleanup_are_both_reported() {
    let input = broken_folder();
    let faults = Arc::new(FaultyBackend::new(MemoryBackend::default()));
    let store = FeatureStore::open(faults.clone(), StoreOptions::default()).unwrap();
    faults.set_remove_fault(RemoveFault::FailAlways);
    let dir = tempfile::tempdir().unwrap();
    let control = OfflineControl::new(dir.path().join("manifest.json"));
    block_failed_writes(&control);
    let options = IngestOptions { workers: 1, ..IngestOptions::default() };
    let err = run_offline_producer(&store, input.path(), &control, &options, &|_| {}).unwrap_err();
    assert!(!err.failure_recorded);
    let text = err.to_string();
    assert!(text.starts_with("KeyError: ") && text.contains("missing required offline feature keys"), "{text}");
    assert!(text.contains("recording the failure failed: writing") && text.contains("manifest.json.failed"), "{text}");
    assert!(text.contains("offline cleanup did not remove every ingested sample"), "{text}");
    assert_eq!(err.error.python_exception(), "RuntimeError");
}
