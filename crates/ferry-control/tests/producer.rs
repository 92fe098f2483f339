//! The online producer (SpecForge §14.2) against a live in-process consumer (its ranks as
//! threads): every prompt of every epoch trained exactly once, backpressure bounding what is in
//! flight, terminal capture failures refusing a successful end of stream (the consumer sees the
//! producer's failure), a consumer failure stopping the producer, a reused channel refused, and
//! the cleanup leaving the store empty; every ref disowned before it is published, and a batch
//! whose disown fails never published.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::RecordingStore;
use ferry_control::channel::{FileRefChannel, RefSink, RefSource};
use ferry_control::collective::{Collective, LocalGroup};
use ferry_control::flow::FlowControlLimits;
use ferry_control::online::{ConsumerConfig, agree_on_rank0_setup, run_rank};
use ferry_control::producer::{Capture, ProducerConfig, ProducerReport, epoch_plan, run_producer};
use ferry_core::{Error, JsonMap, PromptTask, Result, SampleId, SampleRef, TensorView};
use ferry_store::{FeatureStore, FeatureStoreApi, StoreOptions, open_store};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Deterministic capture: 8 int64 tokens per prompt into the store (the producer's too);
/// fails every call after `fail_after` calls.
struct Synthetic<S: FeatureStoreApi = FeatureStore> {
    store: Arc<S>,
    calls: AtomicUsize,
    fail_after: Option<usize>,
}

impl<S: FeatureStoreApi> Capture for Synthetic<S> {
    fn capture(&self, tasks: &[PromptTask]) -> Result<Vec<SampleRef>> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        if self.fail_after.is_some_and(|n| call >= n) {
            return Err(Error::Backend {
                backend: "capture".into(),
                operation: "generate".into(),
                key: "server-0".into(),
                message: "CUDA error: device lost".into(),
            });
        }
        tasks
            .iter()
            .map(|t| {
                let seed = t.task_id.bytes().fold(7i64, |h, b| h.wrapping_mul(31).wrapping_add(i64::from(b)));
                let ids: Vec<i64> = (0..8).map(|i| seed.wrapping_add(i)).collect();
                let mut r = FeatureStoreApi::put(
                    &*self.store,
                    format!("run0:{}", t.task_id).as_str(),
                    &[("input_ids", TensorView::from_elements(&[8], &ids).unwrap())],
                    JsonMap::new(),
                )?;
                r.source_task_id = Some(t.task_id.clone());
                Ok(r)
            })
            .collect()
    }
}

fn store() -> Arc<FeatureStore> {
    Arc::new(open_store("mem://produce", StoreOptions { retain_on_release: true, ..StoreOptions::default() }).unwrap())
}

fn prompts(n: usize) -> Vec<JsonMap> {
    (0..n).map(|i| json!({"task_id": format!("p{i}"), "payload": {"text": i}}).as_object().unwrap().clone()).collect()
}

fn producer_config(dir: &Path, prompts: Vec<JsonMap>, epochs: u32) -> ProducerConfig {
    ProducerConfig {
        run_id: "run0".into(),
        channel: dir.join("control/refs.jsonl"),
        prompts,
        prompt_epochs: epochs,
        prompt_seed: 42,
        workers: 2,
        lease: 2,
        flow: FlowControlLimits { high_watermark_refs: 8, low_watermark_refs: Some(8), ..FlowControlLimits::default() },
        max_resident_bytes: None,
        max_prompt_attempts: 2,
        peer_timeout: Some(Duration::from_secs(30)),
        poll: Duration::from_millis(1),
    }
}

fn consumer_config(dir: &Path) -> ConsumerConfig {
    ConsumerConfig {
        run_id: "run0".into(),
        channel: dir.join("control/refs.jsonl"),
        inbox_dir: dir.join("state/inboxes"),
        ledger: dir.join("state/consumer.sqlite"),
        dp_size: 2,
        batch_size: 2,
        accumulation: 2,
        resume: false,
        checkpoint_step: 0,
        idle_timeout: Some(Duration::from_secs(30)),
        poll: Duration::from_millis(1),
    }
}

/// Runs the producer and a 2-rank consumer (threads); returns the producer's result, each
/// rank's result and the ids every rank trained.
fn run_both<S: FeatureStoreApi + 'static>(
    dir: &Path,
    producer: ProducerConfig,
    capture: Arc<Synthetic<S>>,
    fail_training: bool,
) -> (Result<ProducerReport>, Vec<Result<u64>>, Vec<String>) {
    let trained = Arc::new(Mutex::new(Vec::new()));
    let store = Arc::clone(&capture.store);
    let producer_thread = std::thread::spawn(move || {
        let store: Arc<dyn FeatureStoreApi> = store;
        run_producer(&producer, store, capture)
    });
    // The consumer claims nothing; it waits for the producer's claim to exist so that the
    // producer's fresh-channel check never sees the consumer's quantum first.
    let claim = dir.join("control/refs.jsonl.producer_claim");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !claim.exists() {
        assert!(std::time::Instant::now() < deadline, "the producer never claimed the channel");
        std::thread::sleep(Duration::from_millis(1));
    }
    let config = consumer_config(dir);
    let ranks: Vec<_> = LocalGroup::new(2, Duration::from_secs(30))
        .into_iter()
        .map(|group| {
            let (config, trained) = (config.clone(), Arc::clone(&trained));
            let store: Arc<dyn FeatureStoreApi> = Arc::new(
                open_store(
                    "mem://consumer-side-unused",
                    StoreOptions { retain_on_release: true, ..StoreOptions::default() },
                )
                .unwrap(),
            );
            std::thread::spawn(move || -> Result<u64> {
                let group: Arc<dyn Collective> = Arc::new(group);
                let rank0 = agree_on_rank0_setup(&config, group.as_ref(), Some(Arc::clone(&store)))?;
                let distributor = rank0.as_ref().map(|r| r.distributor.start()).transpose()?;
                let result = run_rank(&config, group, rank0.as_ref(), Some(store), |step| {
                    if fail_training {
                        return Err(Error::Protocol { context: "trainer".into(), message: "loss is NaN".into() });
                    }
                    trained.lock().unwrap().extend(step.iter().flatten().map(|r| r.sample_id.to_string()));
                    Ok(())
                });
                if let Some(d) = distributor {
                    let _ = d.stop();
                }
                result.map(|r| r.refs)
            })
        })
        .collect();
    let ranks: Vec<Result<u64>> = ranks.into_iter().map(|t| t.join().unwrap()).collect();
    let produced = producer_thread.join().unwrap();
    let trained = trained.lock().unwrap().clone();
    (produced, ranks, trained)
}

#[test]
fn every_prompt_of_every_epoch_is_trained_exactly_once_and_the_store_ends_empty() {
    let dir = tempfile::tempdir().unwrap();
    let capture = Arc::new(Synthetic { store: store(), calls: AtomicUsize::new(0), fail_after: None });
    let (produced, ranks, trained) =
        run_both(dir.path(), producer_config(dir.path(), prompts(12), 2), capture.clone(), false);
    let report = produced.unwrap();
    assert_eq!((report.prompts, report.published), (24, 24));
    assert!(ranks.iter().all(Result::is_ok), "{ranks:?}");
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for id in &trained {
        *counts.entry(id.clone()).or_default() += 1;
    }
    assert_eq!(counts.len(), 24, "every prompt of both epochs (24 = 3 windows of 8)");
    assert!(counts.values().all(|&n| n == 1), "each trained once: {counts:?}");
    assert!(counts.keys().all(|id| id.starts_with("run0:epoch000")));
    // Backpressure: never more in flight than the high watermark plus one capture call per worker.
    assert!(report.max_in_flight <= 8 + 2 * 2, "{report:?}");
    let channel = FileRefChannel::open(dir.path().join("control/refs.jsonl"));
    assert!(channel.is_closed().unwrap());
    assert_eq!(channel.consumed_remote().unwrap(), 24);
    let health = capture.store.health();
    assert_eq!((health.resident_samples, health.release_pending), (0, 0), "cleanup left nothing");
}

#[test]
fn terminal_capture_failures_refuse_a_successful_end_and_the_consumer_sees_why() {
    let dir = tempfile::tempdir().unwrap();
    let capture = Arc::new(Synthetic { store: store(), calls: AtomicUsize::new(0), fail_after: Some(2) });
    let (produced, ranks, _) =
        run_both(dir.path(), producer_config(dir.path(), prompts(12), 1), capture.clone(), false);
    let err = produced.unwrap_err().to_string();
    assert!(err.contains("capture worker failed") || err.contains("partial data"), "{err}");
    let failed = FileRefChannel::open(dir.path().join("control/refs.jsonl")).failure().unwrap().unwrap();
    assert!(failed.starts_with("RuntimeError:"), "{failed}");
    for rank in &ranks {
        let e = rank.as_ref().unwrap_err().to_string();
        assert!(e.contains("failed") || e.contains("died"), "{e}");
    }
    assert_eq!(capture.store.health().resident_samples, 0, "cleanup aborted what was published");
}

#[test]
fn a_consumer_failure_stops_the_producer() {
    let dir = tempfile::tempdir().unwrap();
    let capture = Arc::new(Synthetic { store: store(), calls: AtomicUsize::new(0), fail_after: None });
    let (produced, ranks, _) = run_both(dir.path(), producer_config(dir.path(), prompts(40), 1), capture.clone(), true);
    assert!(ranks.iter().any(Result::is_err));
    let err = produced.unwrap_err().to_string();
    assert!(err.contains("consumer failed") && err.contains("loss is NaN"), "{err}");
    assert_eq!(capture.store.health().resident_samples, 0);
}

#[test]
fn a_used_channel_is_refused_and_the_watermarks_must_cover_a_window() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("control")).unwrap();
    std::fs::write(dir.path().join("control/refs.jsonl.closed"), "").unwrap();
    let capture = Arc::new(Synthetic { store: store(), calls: AtomicUsize::new(0), fail_after: None });
    let err = run_producer(&producer_config(dir.path(), prompts(2), 1), capture.store.clone(), capture.clone())
        .unwrap_err()
        .to_string();
    assert!(err.contains("earlier attempt") && err.contains(".closed"), "{err}");

    // A high watermark below the consumer's quantum (8) could pause the producer for ever.
    let dir = tempfile::tempdir().unwrap();
    let mut config = producer_config(dir.path(), prompts(2), 1);
    config.flow = FlowControlLimits { high_watermark_refs: 4, ..FlowControlLimits::default() };
    std::fs::create_dir_all(dir.path().join("control")).unwrap();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        let consumer = FileRefChannel::open(dir.path().join("control/refs.jsonl"));
        consumer.publish_consumer_quantum(8, false).unwrap();
        consumer.mark_consumer_done().unwrap();
        dir
    });
    let err = run_producer(&config, capture.store.clone(), capture.clone()).unwrap_err().to_string();
    let _dir = writer.join().unwrap();
    assert!(err.contains("watermarks") && err.contains("quantum"), "{err}");
}

#[test]
fn epochs_reshuffle_deterministically_with_distinct_task_ids() {
    let plan = epoch_plan(&prompts(5), 2, 7);
    assert_eq!(plan, epoch_plan(&prompts(5), 2, 7), "seeded");
    let ids: Vec<&str> = plan.iter().map(|p| p["task_id"].as_str().unwrap()).collect();
    assert_eq!(ids.iter().collect::<std::collections::BTreeSet<_>>().len(), 10);
    assert!(ids.iter().all(|id| id.starts_with("epoch000")));
    assert_eq!(plan[0]["metadata"]["prompt_epochs"], 2);
    let single = epoch_plan(&prompts(5), 1, 7);
    assert!(single.iter().all(|p| p["task_id"].as_str().unwrap().starts_with('p')), "one epoch keeps the ids");
}

/// The sample ids of every ref in the channel file now (a raw read: what any reader could see).
fn channel_ids(channel: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(channel).unwrap_or_default();
    text.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|record| record.get("sample_id").and_then(|v| v.as_str()).map(str::to_owned))
        .collect()
}

/// Every published ref was disowned first: at each disown, none of its ids is in the channel
/// yet, and every id the channel ends with was disowned exactly once.
#[test]
fn every_ref_is_disowned_before_it_is_published() {
    let dir = tempfile::tempdir().unwrap();
    let channel = dir.path().join("control/refs.jsonl");
    let early = Arc::new(Mutex::new(Vec::new()));
    let mut store = RecordingStore::with(false, false, None);
    let (path, seen) = (channel.clone(), Arc::clone(&early));
    store.on_disown = Some(Box::new(move |ids: &[SampleId]| {
        let published = channel_ids(&path);
        seen.lock().unwrap().extend(ids.iter().filter(|id| published.contains(&id.to_string())).cloned());
    }));
    let capture = Arc::new(Synthetic { store: Arc::new(store), calls: AtomicUsize::new(0), fail_after: None });
    let (produced, ranks, trained) =
        run_both(dir.path(), producer_config(dir.path(), prompts(16), 1), capture.clone(), false);
    assert_eq!(produced.unwrap().published, 16);
    assert!(ranks.iter().all(Result::is_ok), "{ranks:?}");
    assert_eq!(trained.len(), 16, "two whole windows");
    assert!(early.lock().unwrap().is_empty(), "disowned after being published: {:?}", early.lock().unwrap());
    let mut disowned: Vec<String> =
        capture.store.events().iter().filter_map(|e| e.strip_prefix("disown ").map(str::to_owned)).collect();
    disowned.sort();
    let mut published = channel_ids(&channel);
    published.sort();
    assert_eq!(published.len(), 16);
    assert_eq!(disowned, published, "every published ref disowned, once");
}

/// A batch whose disown fails is never published: its refs are aborted and the prompts fail as
/// after a capture failure, until the workers give up; the store ends empty.
#[test]
fn a_failed_disown_fails_the_batch_like_a_capture_failure() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = RecordingStore::with(false, false, None);
    store.fail_disown = true;
    let capture = Arc::new(Synthetic { store: Arc::new(store), calls: AtomicUsize::new(0), fail_after: None });
    let (produced, ranks, _) =
        run_both(dir.path(), producer_config(dir.path(), prompts(12), 1), capture.clone(), false);
    let err = produced.unwrap_err().to_string();
    assert!(err.contains("capture worker failed") || err.contains("partial data"), "{err}");
    assert!(ranks.iter().all(Result::is_err), "the consumer sees the producer's failure: {ranks:?}");
    assert!(channel_ids(&dir.path().join("control/refs.jsonl")).is_empty(), "nothing published");
    let events = capture.store.events();
    let disowned: Vec<&str> = events.iter().filter_map(|e| e.strip_prefix("disown ")).collect();
    let aborted: Vec<&str> = events.iter().filter_map(|e| e.strip_prefix("abort ")).collect();
    assert!(!disowned.is_empty(), "capture succeeded; the disown failed");
    assert!(disowned.iter().all(|id| aborted.contains(id)), "every batch not handed over was aborted");
    let health = capture.store.health().unwrap();
    assert_eq!((health.resident_samples, health.release_pending), (0, 0));
}
