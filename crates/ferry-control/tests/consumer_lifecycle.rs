//! The online consumer's lifecycle hooks (SpecForge §14.3): rank 0's setup failure reaching
//! every rank identically, success draining every rank's store once before `.consumer_done`,
//! a failure published as `.consumer_failed` (with a failed drain beside it, never instead of
//! it), the idle timeout reaching the distributor and the queues, and an interrupted step read
//! (`RankStream::next_step_until`) handing back the refs it leased.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::RecordingStore;
use ferry_control::channel::{FileRefChannel, RefSink, RefSource};
use ferry_control::collective::{Collective, LocalGroup, SingleRank};
use ferry_control::ledger::{Ledger, SqliteLedger};
use ferry_control::online::{ConsumerConfig, RankReport, agree_on_rank0_setup, run_rank};
use ferry_core::{Error, Result, SampleRef};
use ferry_store::FeatureStoreApi;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

fn config(dir: &Path, dp: usize, idle_timeout: Option<Duration>) -> ConsumerConfig {
    ConsumerConfig {
        run_id: "life".into(),
        channel: dir.join("control/refs.jsonl"),
        inbox_dir: dir.join("state/inboxes"),
        ledger: dir.join("state/consumer.sqlite"),
        dp_size: dp,
        batch_size: 2,
        accumulation: 1,
        resume: false,
        checkpoint_step: 0,
        idle_timeout,
        poll: Duration::from_millis(1),
    }
}

fn sidecar(dir: &Path, suffix: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(format!("control/refs.jsonl{suffix}"))).ok()
}

/// Publishes `n` samples of `store` and closes the channel.
fn produce(dir: &Path, store: &RecordingStore, n: usize) {
    std::fs::create_dir_all(dir.join("control")).unwrap();
    let channel = FileRefChannel::open(dir.join("control/refs.jsonl"));
    for i in 0..n {
        channel.publish(&store.sample(&format!("life:{i}"))).unwrap();
    }
    channel.close().unwrap();
}

/// Runs every rank as a thread: setup agreement, the distributor on rank 0, `run_rank`.
fn run_ranks(
    config: &ConsumerConfig,
    stores: &[Arc<RecordingStore>],
    train: fn(usize, &[Vec<SampleRef>]) -> Result<()>,
) -> Vec<Result<RankReport>> {
    let threads: Vec<_> = LocalGroup::new(config.dp_size, Duration::from_secs(30))
        .into_iter()
        .enumerate()
        .map(|(rank, group)| {
            let (config, store) = (config.clone(), Arc::clone(&stores[rank]));
            std::thread::spawn(move || {
                let group: Arc<dyn Collective> = Arc::new(group);
                let store: Arc<dyn FeatureStoreApi> = store;
                let rank0 = agree_on_rank0_setup(&config, group.as_ref(), Some(Arc::clone(&store)))?;
                let distributor = rank0.as_ref().map(|r| r.distributor.start()).transpose()?;
                let result = run_rank(&config, group, rank0.as_ref(), Some(store), |step| train(rank, step));
                if let Some(d) = distributor {
                    let _ = d.stop();
                }
                result
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

fn ok_train(_rank: usize, _step: &[Vec<SampleRef>]) -> Result<()> {
    Ok(())
}

#[test]
fn a_successful_run_drains_every_rank_once_then_signals_done() {
    let dir = tempfile::tempdir().unwrap();
    // Both ranks are clients of one store (as of one node's daemon).
    let store = Arc::new(RecordingStore::with(false, false, None));
    let stores = [Arc::clone(&store), Arc::clone(&store)];
    produce(dir.path(), &store, 8);
    let reports = run_ranks(&config(dir.path(), 2, None), &stores, ok_train);
    for report in &reports {
        assert_eq!(report.as_ref().unwrap(), &RankReport { steps: 2, refs: 4, global_step: 2 });
    }
    assert_eq!(store.events().iter().filter(|e| *e == "drain").count(), 2, "one drain per rank");
    assert_eq!(sidecar(dir.path(), ".consumer_done").as_deref(), Some(""));
    assert!(sidecar(dir.path(), ".consumer_failed").is_none());
    assert_eq!(store.health().unwrap().resident_samples, 0, "every feature deleted at its durable ack");
    let counter = FileRefChannel::open(dir.path().join("control/refs.jsonl")).consumed_remote().unwrap();
    assert_eq!(counter, 8, "the last acknowledgements reached the producer before done");
}

#[test]
fn a_rank0_setup_failure_reaches_every_rank_identically() {
    let dir = tempfile::tempdir().unwrap();
    let stores =
        [Arc::new(RecordingStore::with(false, false, None)), Arc::new(RecordingStore::with(false, false, None))];
    produce(dir.path(), &stores[0], 4);
    // A ledger from an earlier attempt: a fresh attempt must not reuse it.
    let ledger = SqliteLedger::open(dir.path().join("state/consumer.sqlite")).unwrap();
    ledger.commit_samples(&[stores[0].sample("old:0")]).unwrap();
    drop(ledger);
    let errors: Vec<String> = run_ranks(&config(dir.path(), 2, None), &stores, ok_train)
        .into_iter()
        .map(|r| r.unwrap_err().to_string())
        .collect();
    assert_eq!(errors[0], errors[1]);
    assert!(
        errors[0].contains("online consumer rank-0 setup failed")
            && errors[0].contains("already holds 1 committed samples"),
        "{}",
        errors[0]
    );
    let published = sidecar(dir.path(), ".consumer_failed").unwrap();
    assert!(published.starts_with("RuntimeError: online consumer rank-0 setup failed"), "{published}");
}

fn failing_train(_rank: usize, _step: &[Vec<SampleRef>]) -> Result<()> {
    Err(Error::Protocol { context: "trainer".into(), message: "optimizer failed".into() })
}

#[test]
fn a_training_failure_is_published_and_a_failed_drain_joins_it_without_masking_it() {
    for fail_drain in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RecordingStore::with(false, fail_drain, None));
        produce(dir.path(), &store, 4);
        let err =
            run_ranks(&config(dir.path(), 1, None), std::slice::from_ref(&store), failing_train).remove(0).unwrap_err();
        assert_eq!(err.to_string(), "trainer: optimizer failed", "the primary error is what the caller gets");
        let published = sidecar(dir.path(), ".consumer_failed").unwrap();
        assert!(published.starts_with("RuntimeError: trainer: optimizer failed"), "{published}");
        assert_eq!(
            published.contains("store drain also failed: RuntimeError: test backend: drain"),
            fail_drain,
            "{published}"
        );
        assert!(sidecar(dir.path(), ".consumer_done").is_none());
    }
}

#[test]
fn a_failed_drain_after_success_fails_every_rank_and_is_published() {
    let dir = tempfile::tempdir().unwrap();
    let stores =
        [Arc::new(RecordingStore::with(false, false, None)), Arc::new(RecordingStore::with(false, true, None))];
    produce(dir.path(), &stores[0], 4);
    let errors: Vec<String> = run_ranks(&config(dir.path(), 2, None), &stores, ok_train)
        .into_iter()
        .map(|r| r.unwrap_err().to_string())
        .collect();
    assert_eq!(errors[0], errors[1]);
    assert!(errors[0].contains("rank 1:") && errors[0].contains("drain"), "{}", errors[0]);
    assert!(sidecar(dir.path(), ".consumer_failed").is_some() && sidecar(dir.path(), ".consumer_done").is_none());
}

#[test]
fn the_idle_timeout_reaches_the_distributor_and_the_queues() {
    // Unbounded by default: nothing to test but the default itself.
    assert_eq!(config(Path::new("/x"), 1, None).idle_timeout, None);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("control")).unwrap();
    let store = Arc::new(RecordingStore::with(false, false, None));
    // Never published, never closed: the producer is dead.
    let cfg = config(dir.path(), 1, Some(Duration::from_millis(100)));
    let err = run_ranks(&cfg, std::slice::from_ref(&store), ok_train).remove(0).unwrap_err().to_string();
    assert!(err.contains("timed out") || err.contains("ref-distributor died"), "{err}");
    assert!(sidecar(dir.path(), ".consumer_failed").is_some());
    let _ = SingleRank;
}

#[test]
fn a_rank_outside_dp_size_or_a_store_that_frees_on_release_is_refused() {
    use ferry_control::online::RankStream;
    let dir = tempfile::tempdir().unwrap();
    let groups = LocalGroup::new(3, Duration::from_secs(1));
    let err = RankStream::new(&config(dir.path(), 2, None), Arc::new(groups[2].clone()), None, None).unwrap_err();
    assert!(err.to_string().contains("world size must equal dp_size"), "{err}");
    let groups = LocalGroup::new(2, Duration::from_secs(1));
    let frees: Arc<dyn FeatureStoreApi> =
        Arc::new(ferry_store::open_store("mem://frees", ferry_store::StoreOptions::default()).unwrap());
    let err =
        RankStream::new(&config(dir.path(), 2, None), Arc::new(groups[1].clone()), None, Some(frees)).unwrap_err();
    assert!(err.to_string().contains("retain_on_release"), "{err}");
}

#[test]
fn a_finished_attempt_is_never_resumed_and_the_first_failure_stays_published() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RecordingStore::with(false, false, None));
    produce(dir.path(), &store, 2);
    run_ranks(&config(dir.path(), 1, None), std::slice::from_ref(&store), ok_train).remove(0).unwrap();
    let resume = ConsumerConfig { resume: true, checkpoint_step: 1, ..config(dir.path(), 1, None) };
    let err = ferry_control::online::setup_rank0(&resume, None).unwrap_err().to_string();
    assert!(err.contains("never resumed"), "{err}");

    // Two failures: the first one published stays.
    let dir = tempfile::tempdir().unwrap();
    produce(dir.path(), &store, 2);
    FileRefChannel::open(dir.path().join("control/refs.jsonl"))
        .mark_consumer_failed("RuntimeError: root cause")
        .unwrap();
    let _ = run_ranks(&config(dir.path(), 1, None), std::slice::from_ref(&store), failing_train);
    assert_eq!(sidecar(dir.path(), ".consumer_failed").as_deref(), Some("RuntimeError: root cause"));
}

#[test]
fn an_interrupted_step_read_hands_back_the_refs_it_leased_and_the_step_reads_again() {
    use ferry_control::online::{RankStream, StepRead};
    use ferry_control::queue::RefQueue;
    use ferry_control::signal::StopSignal;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("control")).unwrap();
    let config = ConsumerConfig { accumulation: 2, ..config(dir.path(), 1, None) };
    let store = RecordingStore::new(false);
    let rank0 = agree_on_rank0_setup(&config, &SingleRank, None).unwrap().unwrap();
    let stream = RankStream::new(&config, Arc::new(SingleRank), Some(Arc::clone(&rank0.controller)), None).unwrap();
    let inbox = FileRefChannel::inbox(&config.inbox_dir, 0);
    for i in 0..3 {
        inbox.publish(&store.sample(&format!("step:{i}"))).unwrap();
    }
    // Three of the step's four refs: the first micro-batch is leased, the second waits until
    // the stop signal ends the read.
    let stop = StopSignal::new();
    let leased = std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(30));
            stop.set();
        });
        match stream.next_step_until(&stop).unwrap() {
            StepRead::Interrupted(refs) => refs,
            other => panic!("expected an interrupted read, got {other:?}"),
        }
    });
    assert_eq!(leased.len(), 2, "the first micro-batch");
    stream.queue().fail(&leased, "interrupted", true).unwrap();
    inbox.publish(&store.sample("step:3")).unwrap();
    let StepRead::Step(micro) = stream.next_step_until(&StopSignal::new()).unwrap() else {
        panic!("expected a whole step");
    };
    let ids: Vec<&str> = micro.iter().flatten().map(|r| r.sample_id.as_str()).collect();
    assert_eq!(ids, ["step:0", "step:1", "step:2", "step:3"], "the refs put back come first, in order");
    inbox.close().unwrap();
}
