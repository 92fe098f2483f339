//! The offline control path against SpecForge's own artifacts: the manifest is byte-identical,
//! the sentinel protocol behaves as §7.5 says, ingest publishes exactly what it put and cleans
//! up exactly that on failure, and a holding producer frees its samples once the consumer is
//! done (or failed, or never came).
#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

mod common;

use common::RecordingStore;
use ferry_control::manifest::manifest_bytes;
use ferry_control::sentinel::wait_for;
use ferry_control::signal::StopSignal;
use ferry_control::{
    Hold, IngestOptions, IngestReport, OfflineControl, ProducerError, ProducerEvent, ingest_files, read_ref_manifest,
    run_offline_producer,
};
use ferry_core::{Error, SampleRef};
use ferry_store::offline::list_feature_files;
use ferry_store::testing::{FaultyBackend, RemoveFault};
use ferry_store::{FeatureStore, FeatureStoreApi, MemoryBackend, SharedDirBackend, StoreOptions};
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
    assert!(err.contains("cleanup did not remove every sample the attempt published"), "{err}");
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
    let tmp = ferry_control::atomic::pid_temp(&control.failed_path());
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
    assert!(text.contains("cleanup did not remove every sample the attempt published"), "{text}");
    assert_eq!(err.error.python_exception(), "RuntimeError");
}

/// A hold that checks often and gives up after a minute (a lost consumer fails the test, never
/// hangs it).
fn holding(timeout: Duration) -> IngestOptions {
    IngestOptions {
        workers: 2,
        hold: Hold::UntilConsumed { timeout: Some(timeout), poll: Duration::from_millis(2) },
        ..IngestOptions::default()
    }
}

/// Runs the producer over the EAGLE3 fixtures on a thread; once `.done` appears (at most a
/// minute), `consumer` plays the consumer's part. Returns the producer's result and the
/// `Holding` events it reported.
fn run_with_consumer(
    store: &dyn FeatureStoreApi,
    control: &OfflineControl,
    options: &IngestOptions,
    consumer: impl FnOnce(&OfflineControl),
) -> (Result<IngestReport, ProducerError>, Vec<PathBuf>) {
    let holds = Mutex::new(Vec::new());
    let on_event = |event: ProducerEvent<'_>| {
        if let ProducerEvent::Holding { consumed } = event {
            holds.lock().unwrap().push(consumed.to_owned());
        }
    };
    let result = std::thread::scope(|scope| {
        let producer = scope.spawn(|| {
            run_offline_producer(store, &fixtures().join("specforge-offline-eagle3"), control, options, &on_event)
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        if control.wait_for_done(Some(deadline), Duration::from_millis(2)).is_ok() {
            consumer(control);
        }
        producer.join().unwrap()
    });
    (result, holds.into_inner().unwrap())
}

/// The recorded aborts (ids) and drains, in order.
fn aborts_and_drains(store: &RecordingStore) -> (Vec<String>, Vec<usize>) {
    let events = store.events();
    let aborts = events.iter().filter_map(|e| e.strip_prefix("abort ").map(str::to_owned)).collect();
    let drains = events.iter().enumerate().filter(|(_, e)| *e == "drain").map(|(i, _)| i).collect();
    (aborts, drains)
}

/// The recorded disowns (ids), sorted.
fn disowned(store: &RecordingStore) -> Vec<String> {
    let mut ids: Vec<String> =
        store.events().iter().filter_map(|e| e.strip_prefix("disown ").map(str::to_owned)).collect();
    ids.sort();
    ids
}

/// A store that records, at each abort, whether `<manifest>.failed` already existed.
fn store_watching_failed(control: &OfflineControl, fail_drain: bool) -> (RecordingStore, Arc<Mutex<Vec<bool>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (failed, record) = (control.failed_path(), Arc::clone(&seen));
    let hook = Box::new(move |_: &ferry_core::SampleId| record.lock().unwrap().push(failed.exists()));
    (RecordingStore::with(false, fail_drain, Some(hook)), seen)
}

fn resident_samples(store: &dyn FeatureStoreApi) -> u64 {
    store.health().unwrap().resident_samples
}

#[test]
fn a_held_attempt_frees_every_published_sample_once_consumed() {
    let dir = tempfile::tempdir().unwrap();
    let control = OfflineControl::new(dir.path().join("manifest.json"));
    let store = RecordingStore::with(false, false, None);
    let (result, holds) = run_with_consumer(&store, &control, &holding(Duration::from_secs(60)), |control| {
        // The samples are held, untouched, until the consumer says it is done.
        assert_eq!(resident_samples(&store), 4);
        assert_eq!(aborts_and_drains(&store), (vec![], vec![]));
        control.mark_consumed().unwrap();
    });
    let report = result.unwrap();
    assert_eq!(holds, [control.consumed_path()]);
    assert_eq!(report.cleaned_up, 4);
    assert_eq!(disowned(&store), Vec::<String>::new(), "a holding producer keeps its samples owned");
    let (mut aborts, drains) = aborts_and_drains(&store);
    aborts.sort();
    let ids: Vec<String> = report.refs.iter().map(|r| r.sample_id.to_string()).collect();
    assert_eq!(aborts, ids, "every published ref aborted, once");
    assert_eq!(drains, [store.events().len() - 1], "exactly one drain, after the aborts");
    assert!(!control.failed_path().exists());
    assert!(control.done_path().exists() && control.consumed_path().exists());
    assert_eq!(read_ref_manifest(control.manifest()).unwrap(), report.refs);
    let health = store.health().unwrap();
    assert_eq!((health.resident_samples, health.resident_bytes), (0, 0));
}

#[test]
fn a_consumer_failure_while_holding_fails_the_attempt_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let control = OfflineControl::new(dir.path().join("manifest.json"));
    let (store, failed_at_abort) = store_watching_failed(&control, false);
    let (result, _) = run_with_consumer(&store, &control, &holding(Duration::from_secs(60)), |control| {
        control.mark_consumer_failed("RuntimeError: loader crashed").unwrap();
    });
    let err = result.unwrap_err();
    assert!(err.failure_recorded, "{err}");
    let text = err.to_string();
    assert!(text.contains("RuntimeError: loader crashed"), "the consumer's reason: {text}");
    assert!(text.contains("manifest.json.consumer_failed"), "the failure file is named: {text}");
    assert_eq!(control.failure().unwrap(), format!("RuntimeError: {text}"));
    let seen = failed_at_abort.lock().unwrap().clone();
    assert_eq!(seen.len(), 4, "every published ref aborted");
    assert!(seen[0], ".failed is written before the first abort");
    assert_eq!(aborts_and_drains(&store).1.len(), 1, "one drain");
    assert_eq!(resident_samples(&store), 0);
}

#[test]
fn a_hold_timeout_fails_the_attempt_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let control = OfflineControl::new(dir.path().join("manifest.json"));
    let (store, failed_at_abort) = store_watching_failed(&control, false);
    // No consumer: the hold gives up after 50 ms.
    let (result, holds) = run_with_consumer(&store, &control, &holding(Duration::from_millis(50)), |_| {});
    let err = result.unwrap_err();
    assert_eq!(holds, [control.consumed_path()]);
    assert!(
        matches!(err.error.primary(), Error::Timeout { what, .. } if what.ends_with("manifest.json.consumed")),
        "{err}"
    );
    assert!(err.failure_recorded);
    assert!(control.failure().unwrap().starts_with("TimeoutError: "), "{:?}", control.failure());
    let seen = failed_at_abort.lock().unwrap().clone();
    assert_eq!(seen.len(), 4);
    assert!(seen[0], ".failed is written before the first abort");
    assert_eq!(aborts_and_drains(&store).1.len(), 1, "one drain");
    assert_eq!(resident_samples(&store), 0);
}

#[test]
fn a_drain_failure_after_a_consumed_hold_is_loud_and_lands_in_failed() {
    let dir = tempfile::tempdir().unwrap();
    let control = OfflineControl::new(dir.path().join("manifest.json"));
    let (store, failed_at_abort) = store_watching_failed(&control, true);
    let (result, _) =
        run_with_consumer(&store, &control, &holding(Duration::from_secs(60)), |c| c.mark_consumed().unwrap());
    let err = result.unwrap_err();
    assert!(err.failure_recorded, "{err}");
    let text = err.to_string();
    assert!(text.contains("offline cleanup did not remove every ingested sample"), "{text}");
    assert!(text.contains("injected drain failure"), "{text}");
    assert_eq!(control.failure().unwrap(), format!("RuntimeError: {text}"));
    assert_eq!(*failed_at_abort.lock().unwrap(), [false; 4], "a consumed attempt had not failed when it aborted");
    let (aborts, drains) = aborts_and_drains(&store);
    assert_eq!((aborts.len(), drains), (4, vec![4]), "the drain ran after all four aborts");
    assert!(control.done_path().exists() && control.consumed_path().exists());
}

#[test]
fn a_stop_request_ends_a_hold_as_a_failure_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let control = OfflineControl::new(dir.path().join("manifest.json"));
    let (store, failed_at_abort) = store_watching_failed(&control, false);
    let stop = Arc::new(StopSignal::new());
    let options = IngestOptions { stop: Some(Arc::clone(&stop)), ..holding(Duration::from_secs(60)) };
    let (result, _) = run_with_consumer(&store, &control, &options, |_| stop.set());
    let err = result.unwrap_err();
    assert_eq!(err.error.python_exception(), "InterruptedError", "{err}");
    assert!(err.to_string().contains("manifest.json.consumed"), "{err}");
    assert!(control.failure().unwrap().starts_with("InterruptedError: "));
    assert!(failed_at_abort.lock().unwrap()[0]);
    assert_eq!(resident_samples(&store), 0);
}

#[test]
fn a_stop_request_before_ingest_takes_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let control = OfflineControl::new(dir.path().join("manifest.json"));
    let store = RecordingStore::with(false, false, None);
    let stop = Arc::new(StopSignal::new());
    stop.set();
    let options = IngestOptions { stop: Some(stop), ..IngestOptions::default() };
    let err = run_offline_producer(&store, &fixtures().join("specforge-offline-eagle3"), &control, &options, &|_| {})
        .unwrap_err();
    assert_eq!(err.error.python_exception(), "InterruptedError", "{err}");
    assert!(!control.manifest().exists() && control.failed_path().exists());
    assert_eq!(resident_samples(&store), 0);
}

#[test]
fn without_a_hold_nothing_is_aborted_or_drained() {
    let dir = tempfile::tempdir().unwrap();
    let control = OfflineControl::new(dir.path().join("manifest.json"));
    let store = RecordingStore::with(false, false, None);
    let events = Mutex::new(Vec::new());
    let report = run_offline_producer(
        &store,
        &fixtures().join("specforge-offline-eagle3"),
        &control,
        &IngestOptions { workers: 2, ..IngestOptions::default() },
        &|event| events.lock().unwrap().push(format!("{event:?}")),
    )
    .unwrap();
    assert_eq!(report.cleaned_up, 0);
    assert_eq!(aborts_and_drains(&store), (vec![], vec![]));
    assert_eq!(resident_samples(&store), 4, "the samples stay for any later reader");
    let events = events.into_inner().unwrap();
    assert_eq!(events.len(), 4, "one event per file, no hold: {events:?}");
    assert!(events.iter().all(|e| e.starts_with("FileIngested")), "{events:?}");
    assert!(control.done_path().exists() && !control.failed_path().exists());
}

#[test]
fn without_a_hold_every_published_ref_is_disowned_after_done() {
    let dir = tempfile::tempdir().unwrap();
    let control = OfflineControl::new(dir.path().join("manifest.json"));
    let mut store = RecordingStore::with(false, false, None);
    let done_at_disown = Arc::new(Mutex::new(Vec::new()));
    let (done, seen) = (control.done_path(), Arc::clone(&done_at_disown));
    store.on_disown = Some(Box::new(move |_: &[ferry_core::SampleId]| seen.lock().unwrap().push(done.exists())));
    let options = IngestOptions { workers: 2, ..IngestOptions::default() };
    let report =
        run_offline_producer(&store, &fixtures().join("specforge-offline-eagle3"), &control, &options, &|_| {})
            .unwrap();
    let mut ids: Vec<String> = report.refs.iter().map(|r| r.sample_id.to_string()).collect();
    ids.sort();
    assert_eq!(disowned(&store), ids, "every published ref disowned, once");
    assert_eq!(*done_at_disown.lock().unwrap(), [true], "one call, after .done");
    assert_eq!(aborts_and_drains(&store), (vec![], vec![]));
    assert_eq!(resident_samples(&store), 4);
}

#[test]
fn a_failed_disown_without_a_hold_fails_the_attempt_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let control = OfflineControl::new(dir.path().join("manifest.json"));
    let mut store = RecordingStore::with(false, false, None);
    store.fail_disown = true;
    let options = IngestOptions { workers: 2, ..IngestOptions::default() };
    let err = run_offline_producer(&store, &fixtures().join("specforge-offline-eagle3"), &control, &options, &|_| {})
        .unwrap_err();
    assert!(err.failure_recorded, "{err}");
    assert!(err.to_string().contains("injected disown failure"), "{err}");
    assert!(control.done_path().exists(), "the disown comes after .done");
    assert!(control.failure().unwrap().contains("injected disown failure"));
    let (aborts, drains) = aborts_and_drains(&store);
    assert_eq!((aborts.len(), drains.len()), (4, 1), "every published ref aborted, then one drain");
    assert_eq!(resident_samples(&store), 0);
}
