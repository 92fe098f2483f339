//! The queue-mode acceptance suite (`SPECFORGE-RUNTIME.md` §12.5-§12.7): a loader over a
//! consume-once [`RefQueue`], synchronous and with the `loader-prefetch` thread. Queues are a
//! [`SampleRefQueue`] behind [`RecordingQueue`], which records every call (and, "stream-style",
//! behaves like SpecForge's `StreamingRefQueue`: close-retryable, with a consumed counter that
//! acks and terminal fails advance). Stores are `mem://`-style over the recording backend of
//! `common`, consume-once (online) unless a test needs re-readable bytes.
//!
//! No fixed sleeps: waits poll a condition with a deadline, or the backend gates a read until
//! the test opens it.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ferry_control::queue::RefQueue;
use ferry_control::ref_queue::SampleRefQueue;
use ferry_core::{Error, Result, SampleId, SampleRef, TrainBatch};
use ferry_loader::{FeatureLoader, FeatureLoaderBuilder, RefSource, Sample};
use ferry_store::FeatureStore;
use ferry_store::offline::{OfflineRefOptions, offline_refs};
use serde_json::json;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One `fail` call as the queue saw it.
#[derive(Debug, Clone, PartialEq)]
struct Failure {
    ids: Vec<String>,
    reason: String,
    retryable: bool,
}

#[derive(Default)]
struct Calls {
    gets: usize,
    acked: Vec<String>,
    failures: Vec<Failure>,
    /// What a stream queue's consumed counter would read: acked plus terminally failed refs.
    consumed: usize,
}

/// A [`SampleRefQueue`] that records every call, also into the backend's event log (so queue
/// calls and store removals can be checked in one order).
struct RecordingQueue {
    inner: SampleRefQueue,
    backend: Arc<TestBackend>,
    stream_style: bool,
    calls: Mutex<Calls>,
}

impl RecordingQueue {
    /// SpecForge's staging queue (not close-retryable), holding `refs`.
    fn staging(fixture: &Fixture, refs: &[SampleRef]) -> Arc<RecordingQueue> {
        RecordingQueue::new(fixture, refs, false)
    }

    /// A queue that behaves like SpecForge's stream queue for the loader: close-retryable, and
    /// its consumed counter advances on acks and terminal fails.
    fn stream(fixture: &Fixture, refs: &[SampleRef]) -> Arc<RecordingQueue> {
        RecordingQueue::new(fixture, refs, true)
    }

    fn new(fixture: &Fixture, refs: &[SampleRef], stream_style: bool) -> Arc<RecordingQueue> {
        let inner = SampleRefQueue::new();
        inner.put(refs.iter().cloned());
        Arc::new(RecordingQueue { inner, backend: Arc::clone(&fixture.backend), stream_style, calls: Mutex::default() })
    }

    fn gets(&self) -> usize {
        self.calls.lock().unwrap().gets
    }

    fn acked(&self) -> Vec<String> {
        self.calls.lock().unwrap().acked.clone()
    }

    fn failures(&self) -> Vec<Failure> {
        self.calls.lock().unwrap().failures.clone()
    }

    fn consumed(&self) -> usize {
        self.calls.lock().unwrap().consumed
    }

    fn in_flight(&self) -> Vec<String> {
        self.in_flight_ids().iter().map(ToString::to_string).collect()
    }

    fn pending(&self) -> Vec<String> {
        self.inner.pending_ids().iter().map(ToString::to_string).collect()
    }
}

impl RefQueue for RecordingQueue {
    fn get(&self, max: usize, timeout: Option<Duration>) -> Result<Vec<SampleRef>> {
        self.calls.lock().unwrap().gets += 1;
        self.inner.get(max, timeout)
    }

    fn ack_ids(&self, ids: &[SampleId]) -> Result<()> {
        let ids_text: Vec<String> = ids.iter().map(ToString::to_string).collect();
        self.backend.note(format!("ack [{}]", ids_text.join(", ")));
        let mut calls = self.calls.lock().unwrap();
        calls.consumed += ids.len();
        calls.acked.extend(ids_text);
        drop(calls);
        self.inner.ack_ids(ids)
    }

    fn fail(&self, refs: &[SampleRef], reason: &str, retryable: bool) -> Result<()> {
        let ids: Vec<String> = refs.iter().map(|r| r.sample_id.to_string()).collect();
        let kind = if retryable { "retryable" } else { "terminal" };
        self.backend.note(format!("fail [{}] {kind}", ids.join(", ")));
        let mut calls = self.calls.lock().unwrap();
        if !retryable {
            calls.consumed += refs.len();
        }
        calls.failures.push(Failure { ids, reason: reason.into(), retryable });
        drop(calls);
        self.inner.fail(refs, reason, retryable)
    }

    fn depth(&self) -> usize {
        self.inner.depth()
    }

    fn in_flight_ids(&self) -> Vec<SampleId> {
        self.inner.in_flight_ids()
    }

    fn loader_close_retryable(&self) -> bool {
        self.stream_style
    }
}

fn builder(store: &FeatureStore, queue: &Arc<RecordingQueue>, batch_size: usize) -> FeatureLoaderBuilder {
    let queue: Arc<dyn RefQueue> = Arc::clone(queue) as Arc<dyn RefQueue>;
    FeatureLoader::builder(store.clone(), RefSource::Queue(queue)).batch_size(batch_size)
}

fn id(i: usize) -> String {
    format!("run:{i:08}")
}

fn ids(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(id).collect()
}

fn batch_ids(batch: &TrainBatch) -> Vec<String> {
    batch.sample_ids.iter().map(ToString::to_string).collect()
}

fn collect(loader: &mut FeatureLoader) -> Vec<TrainBatch> {
    loader.iter().collect::<Result<Vec<_>>>().unwrap()
}

/// Events of the log that mention `sample`.
fn events_of(fixture: &Fixture, sample: &str) -> Vec<String> {
    fixture.backend.events().into_iter().filter(|e| e.contains(sample)).collect()
}

/// Polls `done` every millisecond until it holds, failing the test after [`DEADLINE`].
fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn four_samples_in_batches_of_two_give_two_batches_each_acked_when_the_consumer_comes_back() {
    for prefetch in [0, 2] {
        let fixture = Fixture::eagle3_consume_once(&[8; 4]);
        let queue = RecordingQueue::staging(&fixture, &fixture.refs);
        let mut loader = builder(&fixture.store, &queue, 2).prefetch_depth(prefetch).build().unwrap();
        let mut pass = loader.iter();
        let first = pass.next().unwrap().unwrap();
        assert_eq!(batch_ids(&first), ids(0..2));
        assert!(queue.acked().is_empty(), "prefetch {prefetch}: not acked while the consumer holds it");
        assert!(queue.in_flight().starts_with(&ids(0..2)));
        let second = pass.next().unwrap().unwrap();
        assert_eq!(batch_ids(&second), ids(2..4));
        assert_eq!(queue.acked(), ids(0..2), "prefetch {prefetch}: acked when the next batch was asked for");
        assert!(pass.next().is_none());
        assert_eq!(queue.acked(), ids(0..4), "prefetch {prefetch}: the last batch is acked by the call that ends");
        assert_eq!((queue.depth(), queue.in_flight().len()), (0, 0));
        assert!(queue.failures().is_empty());
        for batch in [&first, &second] {
            assert_eq!(batch.tensors["input_ids"].shape(), [2, 8]);
            assert_eq!(batch.tensors["target"].shape(), [2, 8, 4]);
            assert_eq!(batch.tensors["hidden_state"].shape(), [2, 8, 12]);
            assert_eq!(batch.metadata["target_repr"], json!("hidden_state"));
        }
        for (i, data) in fixture.samples.iter().enumerate() {
            let batch = if i < 2 { &first } else { &second };
            assert_eq!(row::<i64>(&batch.tensors["input_ids"], i % 2), data.input_ids);
        }
        assert_eq!(fixture.active_leases(), 0);
        assert_eq!(fixture.backend.resident_samples(fixture.store.store_id()), 0, "each sample freed at its release");
        assert!(!loader.has_active_pass());
    }
}

#[test]
fn offline_files_through_a_staging_queue_give_the_refs_mode_batches_all_acked() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/specforge-offline-eagle3");
    let root = ferry_store::offline::absolute_path(&root).unwrap();
    let refs = offline_refs(&root, &OfflineRefOptions::default(), false).unwrap();
    assert_eq!(refs.len(), 4);
    let fixture = Fixture::new();
    let mut fixed =
        FeatureLoader::builder(fixture.store.clone(), RefSource::Fixed(refs.clone())).batch_size(2).build().unwrap();
    let expected = collect(&mut fixed);
    for prefetch in [0, 2] {
        let queue = RecordingQueue::staging(&fixture, &refs);
        let batches = collect(&mut builder(&fixture.store, &queue, 2).prefetch_depth(prefetch).build().unwrap());
        assert_eq!(batches.len(), 2);
        for (got, want) in batches.iter().zip(&expected) {
            assert_eq!(got.sample_ids, want.sample_ids);
            assert_eq!(got.metadata["target_repr"], json!("hidden_state"));
            for (name, t) in &want.tensors {
                assert_eq!(got.tensors[name].shape(), t.shape(), "{name}");
                assert_eq!(got.tensors[name].bytes(), t.bytes(), "{name}");
            }
        }
        assert_eq!(queue.acked().len(), 4, "prefetch {prefetch}: all acked");
        assert_eq!((queue.depth(), queue.in_flight().len()), (0, 0));
    }
}

#[test]
fn a_short_stream_tail_is_failed_terminally_then_adopted_and_aborted() {
    for prefetch in [0, 2] {
        // The trainer's store is another view of the store the samples were written to, as when a
        // capture server writes them: only adopting the tail lets it free that sample directly.
        let fixture = Fixture::eagle3_consume_once(&[8; 3]);
        let trainer_store = fixture.other_view();
        let queue = RecordingQueue::stream(&fixture, &fixture.refs);
        let mut loader = builder(&trainer_store, &queue, 2).prefetch_depth(prefetch).build().unwrap();
        let batches = collect(&mut loader);
        assert_eq!(batches.len(), 1);
        assert_eq!(batch_ids(&batches[0]), ids(0..2));
        assert_eq!(queue.consumed(), 3, "prefetch {prefetch}: 2 acked + 1 dropped");
        let failures = queue.failures();
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert_eq!((failures[0].ids.clone(), failures[0].retryable), (vec![id(2)], false));
        assert!(failures[0].reason.contains("received 1 refs but batch_size=2"), "{}", failures[0].reason);
        // Cleanup of the tail, exactly: the terminal fail, then one removal. An abort of a sample
        // this store had not adopted would first look its generation up in the backend.
        assert_eq!(events_of(&fixture, &id(2)), [format!("fail [{}] terminal", id(2)), format!("remove {}", id(2))]);
        assert_eq!(fixture.backend.resident_samples(fixture.store.store_id()), 0);
        let health = trainer_store.health();
        assert_eq!((health.active_leases, health.release_pending, health.resident_samples), (0, 0, 0));
        assert_eq!((queue.depth(), queue.in_flight().len()), (0, 0));
        assert!(!loader.has_active_pass(), "prefetch {prefetch}: the pass's state is cleared");
    }
}

#[test]
fn without_drop_last_a_short_tail_is_yielded_and_acked() {
    for prefetch in [0, 2] {
        let fixture = Fixture::eagle3_consume_once(&[8; 3]);
        let queue = RecordingQueue::stream(&fixture, &fixture.refs);
        let mut loader = builder(&fixture.store, &queue, 2).prefetch_depth(prefetch).drop_last(false).build().unwrap();
        let batches = collect(&mut loader);
        assert_eq!(batches.iter().map(batch_ids).collect::<Vec<_>>(), [ids(0..2), ids(2..3)]);
        assert_eq!(batches[1].tensors["hidden_state"].shape(), [1, 8, 12]);
        assert_eq!((queue.acked(), queue.failures()), (ids(0..3), vec![]));
    }
}

#[test]
fn prefetch_materializes_on_the_loader_prefetch_thread() {
    let fixture = Fixture::eagle3_consume_once(&[8; 4]);
    let threads = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&threads);
    let queue = RecordingQueue::staging(&fixture, &fixture.refs);
    let mut loader = builder(&fixture.store, &queue, 2)
        .num_workers(3) // the default prefetch depth
        .per_sample_transform(move |_: &mut Sample| {
            seen.lock().unwrap().push(std::thread::current().name().unwrap_or("<unnamed>").to_owned());
            Ok(())
        })
        .build()
        .unwrap();
    assert_eq!(collect(&mut loader).len(), 2);
    assert_eq!(*threads.lock().unwrap(), ["loader-prefetch"; 4]);
}

#[test]
fn a_tail_whose_removal_fails_ends_the_pass_with_the_cleanup_errors() {
    for prefetch in [0, 2] {
        let fixture = Fixture::eagle3_consume_once(&[8; 3]);
        fixture.backend.fail_removes_of(&id(2));
        let trainer_store = fixture.other_view();
        let queue = RecordingQueue::stream(&fixture, &fixture.refs);
        let mut loader = builder(&trainer_store, &queue, 2).prefetch_depth(prefetch).build().unwrap();
        let results: Vec<_> = loader.iter().collect();
        assert_eq!(results.len(), 2, "prefetch {prefetch}: the batch, then the error");
        assert!(results[0].is_ok());
        let err = results[1].as_ref().unwrap_err().to_string();
        assert!(
            err.contains(
                "online stream ended with an incomplete batch: received 1 refs but batch_size=2; cleanup errors=["
            ),
            "{err}"
        );
        assert!(err.contains("injected remove fault"), "{err}");
        assert_eq!((queue.depth(), queue.in_flight().len(), queue.consumed()), (0, 0, 3));
        // The ref was dropped first; the removal was attempted (and retried once, forced) and
        // stays parked in the store for its gc/drain, never forgotten.
        let events = events_of(&fixture, &id(2));
        assert_eq!(events[0], format!("fail [{}] terminal", id(2)));
        assert!(events[1..].iter().all(|e| *e == format!("remove {}", id(2))), "{events:?}");
        assert_eq!(trainer_store.health().release_pending, 1);
        assert!(!loader.has_active_pass());
    }
}

#[test]
fn a_batch_with_mixed_target_repr_is_invalid_and_fails_its_refs_without_reading_them() {
    for prefetch in [0, 2] {
        let mut fixture = Fixture::consume_once();
        fixture.put_eagle3(eagle3_data(0, 8), eagle3_metadata());
        let mut logits = eagle3_metadata();
        logits.insert("target_repr".into(), json!("logits"));
        fixture.put_eagle3(eagle3_data(1, 8), logits);
        let queue = RecordingQueue::staging(&fixture, &fixture.refs);
        let mut loader = builder(&fixture.store, &queue, 2).prefetch_depth(prefetch).build().unwrap();
        let results: Vec<_> = loader.iter().collect();
        assert_eq!(results.len(), 1);
        let err = results[0].as_ref().unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        let failures = queue.failures();
        assert_eq!(failures.len(), 1);
        assert_eq!((failures[0].ids.clone(), failures[0].retryable), (ids(0..2), false));
        assert!(failures[0].reason.starts_with("materialize:"), "{}", failures[0].reason);
        assert_eq!((queue.depth(), queue.in_flight().len()), (0, 0), "no pending or leased ref left");
        assert!(fixture.backend.started().is_empty(), "nothing may be fetched");
        let health = fixture.store.health();
        assert_eq!((health.active_leases, health.release_pending), (0, 0));
    }
}

#[test]
fn seek_on_a_queue_loader_is_an_error_and_touches_nothing() {
    let fixture = Fixture::eagle3_consume_once(&[8; 4]);
    let queue = RecordingQueue::staging(&fixture, &fixture.refs);
    let mut loader = builder(&fixture.store, &queue, 2).build().unwrap();
    for k in [0, 1] {
        let err = loader.seek(k).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        assert!(err.to_string().contains("a queue stream is consume-once"), "{err}");
    }
    assert_eq!((queue.gets(), queue.depth()), (0, 4));
    assert_eq!(collect(&mut loader).len(), 2);
}

#[test]
fn a_failing_transform_with_prefetch_surfaces_and_leaks_nothing() {
    let fixture = Fixture::eagle3_consume_once(&[8; 4]);
    let queue = RecordingQueue::staging(&fixture, &fixture.refs);
    let bad = id(1);
    let mut loader = builder(&fixture.store, &queue, 2)
        .prefetch_depth(2)
        .per_sample_transform(move |s: &mut Sample| {
            if s.sample_id == bad.as_str() {
                return Err(Error::InvalidArgument("bad sample 1".into()));
            }
            Ok(())
        })
        .build()
        .unwrap();
    let mut pass = loader.iter();
    let err = pass.next().unwrap().unwrap_err();
    assert!(err.to_string().contains("bad sample 1"), "{err}");
    assert!(pass.next().is_none());
    assert!(!loader.has_active_pass(), "the worker exited with its error and the pass is shut down");
    pass.close().unwrap();
    pass.close().unwrap();
    loader.close().unwrap();
    loader.close().unwrap();
    assert!(queue.in_flight().is_empty());
    assert_eq!(queue.failures().len(), 1);
    assert!(!queue.failures()[0].retryable);
    assert_eq!(queue.depth(), 2, "the worker stopped at the error: the next batch was never leased");
    assert_eq!(fixture.active_leases(), 0);
    assert!(!loader.has_active_pass());
}

#[test]
fn a_panicking_transform_fails_its_batch_terminally_instead_of_leaving_it_leased() {
    for prefetch in [0, 1] {
        let fixture = Fixture::eagle3_consume_once(&[8; 2]);
        let queue = RecordingQueue::staging(&fixture, &fixture.refs);
        let mut loader = builder(&fixture.store, &queue, 2)
            .prefetch_depth(prefetch)
            .per_sample_transform(|_: &mut Sample| panic!("transform panics on purpose"))
            .build()
            .unwrap();
        let err = loader.iter().next().unwrap().unwrap_err();
        assert!(err.to_string().contains("panicked"), "{err}");
        assert_eq!(queue.failures().len(), 1);
        assert_eq!((queue.depth(), queue.in_flight().len()), (0, 0));
        assert_eq!(fixture.active_leases(), 0);
    }
}

/// Yields one batch of a 4-ref queue (batch 1, prefetch depth 3), waits until the other three
/// are prefetched, closes the pass, and returns the queue.
fn close_after_one_yield_with_three_prefetched(fixture: &Fixture, stream_style: bool) -> Arc<RecordingQueue> {
    let queue = RecordingQueue::new(fixture, &fixture.refs, stream_style);
    let mut loader = builder(&fixture.store, &queue, 1).prefetch_depth(3).build().unwrap();
    let mut pass = loader.iter();
    assert_eq!(batch_ids(&pass.next().unwrap().unwrap()), [id(0)]);
    wait_until("three prefetched batches", || pass.remaining() == 3);
    pass.close().unwrap();
    assert!(!loader.has_active_pass(), "the worker has stopped and been joined");
    assert_eq!(queue.acked(), [id(0)], "the yielded batch is the trainer's: acked, never failed");
    assert!(queue.in_flight().is_empty());
    assert_eq!(queue.failures().len(), 1, "{:?}", queue.failures());
    assert_eq!(queue.failures()[0].ids, ids(1..4));
    queue
}

#[test]
fn closing_after_one_yield_requeues_the_prefetched_refs_when_their_bytes_survive() {
    // A store that retains on release (offline data): the prefetched bytes can be read again.
    let fixture = Fixture::eagle3(&[8; 4]);
    let queue = close_after_one_yield_with_three_prefetched(&fixture, false);
    assert!(queue.failures()[0].retryable);
    assert_eq!(queue.depth(), 3);
    assert_eq!(queue.pending(), ids(1..4));
    // A stream queue may always put never-yielded refs back (its counter has not moved).
    let fixture = Fixture::eagle3_consume_once(&[8; 4]);
    let queue = close_after_one_yield_with_three_prefetched(&fixture, true);
    assert!(queue.failures()[0].retryable);
    assert_eq!(queue.pending(), ids(1..4));
}

#[test]
fn closing_after_one_yield_drops_prefetched_refs_whose_bytes_a_consume_once_store_freed() {
    let fixture = Fixture::eagle3_consume_once(&[8; 4]);
    let queue = close_after_one_yield_with_three_prefetched(&fixture, false);
    assert!(!queue.failures()[0].retryable, "read from a consume-once store: a retry could not read them");
    assert_eq!(queue.depth(), 0);
    assert_eq!(fixture.active_leases(), 0);
}

#[test]
fn a_close_during_a_blocked_read_reports_did_not_stop_then_completes_and_requeues_the_ref() {
    let fixture = Fixture::eagle3(&[8]);
    fixture.backend.gate(&id(0));
    let queue = RecordingQueue::staging(&fixture, &fixture.refs);
    let join_timeout = Duration::from_millis(200);
    let mut loader = builder(&fixture.store, &queue, 1).prefetch_depth(1).join_timeout(join_timeout).build().unwrap();
    let mut pass = loader.iter();
    fixture.backend.wait_started(&id(0));
    let closing = Instant::now();
    let err = pass.close().unwrap_err();
    let waited = closing.elapsed();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("did not stop within"), "{err}");
    assert!(err.to_string().contains(&format!("outstanding_refs=[{}]", id(0))), "{err}");
    assert!(waited >= join_timeout && waited < DEADLINE, "{waited:?}");
    assert_eq!(queue.in_flight(), [id(0)], "still the worker's: not failed while it reads");
    assert!(queue.failures().is_empty());
    assert!(loader.has_active_pass());
    assert!(matches!(loader.close(), Err(Error::Timeout { .. })), "the loader's close waits the same way");
    fixture.backend.open_gate(&id(0));
    pass.close_within(DEADLINE).unwrap();
    let failures = queue.failures();
    assert_eq!(failures.len(), 1);
    assert_eq!((failures[0].ids.clone(), failures[0].retryable), (vec![id(0)], true));
    assert_eq!((queue.depth(), queue.in_flight().len()), (1, 0), "requeued");
    assert!(!loader.has_active_pass());
    loader.close().unwrap();
    assert_eq!(fixture.active_leases(), 0);
}

#[test]
fn an_evicted_feature_fails_its_batch_terminally_with_a_not_available_error() {
    for prefetch in [0, 1] {
        let fixture = Fixture::eagle3_consume_once(&[8; 2]);
        // Another process evicts sample 1 before the loader reads it.
        fixture.other_view().abort(&SampleId::new(id(1))).unwrap();
        let queue = RecordingQueue::staging(&fixture, &fixture.refs);
        let mut loader = builder(&fixture.store, &queue, 2).prefetch_depth(prefetch).build().unwrap();
        let mut pass = loader.iter();
        let err = pass.next().unwrap().unwrap_err();
        assert!(err.is_not_available(), "prefetch {prefetch}: {err}");
        assert!(pass.next().is_none());
        drop(pass);
        let failures = queue.failures();
        assert_eq!(failures.len(), 1);
        assert_eq!((failures[0].ids.clone(), failures[0].retryable), (ids(0..2), false));
        assert!(failures[0].reason.starts_with("materialize:"), "{}", failures[0].reason);
        assert_eq!((queue.depth(), queue.in_flight().len()), (0, 0));
        assert_eq!(fixture.active_leases(), 0);
    }
}

#[test]
fn deferred_acks_leave_every_yielded_ref_in_flight_until_the_trainer_acks() {
    for prefetch in [0, 2] {
        let fixture = Fixture::eagle3_consume_once(&[8; 4]);
        let queue = RecordingQueue::staging(&fixture, &fixture.refs);
        let mut loader =
            builder(&fixture.store, &queue, 2).prefetch_depth(prefetch).defer_ack_until_durable(true).build().unwrap();
        let batches = collect(&mut loader);
        assert_eq!(batches.len(), 2);
        assert!(queue.acked().is_empty(), "prefetch {prefetch}: the loader never acks");
        assert_eq!(queue.in_flight(), ids(0..4));
        // The trainer's durable ack.
        for batch in &batches {
            queue.ack_ids(&batch.sample_ids).unwrap();
        }
        assert_eq!((queue.depth(), queue.in_flight().len()), (0, 0));
    }
}

#[test]
fn a_second_pass_while_one_is_live_is_an_error() {
    for prefetch in [0, 2] {
        let fixture = Fixture::eagle3_consume_once(&[8; 4]);
        let queue = RecordingQueue::staging(&fixture, &fixture.refs);
        let mut loader = builder(&fixture.store, &queue, 2).prefetch_depth(prefetch).build().unwrap();
        let mut first = loader.iter();
        assert_eq!(batch_ids(&first.next().unwrap().unwrap()), ids(0..2));
        let mut second = loader.iter();
        let err = second.next().unwrap().unwrap_err();
        assert!(matches!(err, Error::Protocol { .. }), "{err}");
        assert!(err.to_string().contains("already has an active iterator"), "{err}");
        assert!(second.next().is_none());
        drop(second);
        assert_eq!(batch_ids(&first.next().unwrap().unwrap()), ids(2..4), "the live pass is undisturbed");
        drop(first);
        assert!(!loader.has_active_pass());
        assert_eq!(queue.acked(), ids(0..4), "dropping a pass acks the batch its consumer took");
        assert!(loader.iter().next().is_none(), "a new pass may start once the first is gone");
    }
}

#[test]
fn a_closed_queue_loader_yields_nothing_and_a_live_pass_ends() {
    let fixture = Fixture::eagle3_consume_once(&[8; 4]);
    let queue = RecordingQueue::staging(&fixture, &fixture.refs);
    let mut loader = builder(&fixture.store, &queue, 2).build().unwrap();
    loader.close().unwrap();
    loader.close().unwrap();
    assert!(loader.iter().next().is_none());
    assert_eq!((queue.gets(), queue.depth()), (0, 4), "a closed loader touches nothing");

    for prefetch in [0, 2] {
        let fixture = Fixture::eagle3_consume_once(&[8; 6]);
        let queue = RecordingQueue::stream(&fixture, &fixture.refs);
        let mut loader = builder(&fixture.store, &queue, 2).prefetch_depth(prefetch).build().unwrap();
        let mut pass = loader.iter();
        assert_eq!(batch_ids(&pass.next().unwrap().unwrap()), ids(0..2));
        loader.close().unwrap();
        assert!(pass.next().is_none(), "prefetch {prefetch}: the live pass ends");
        assert_eq!(queue.acked(), ids(0..2));
        assert!(queue.in_flight().is_empty(), "prefetch {prefetch}: prefetched refs were put back");
        assert_eq!(queue.depth(), 4);
        assert!(!loader.has_active_pass());
    }
}

#[test]
fn a_pass_dropped_while_its_consumer_panics_leaves_the_taken_batch_in_flight() {
    let fixture = Fixture::eagle3_consume_once(&[8; 4]);
    let queue = RecordingQueue::staging(&fixture, &fixture.refs);
    let mut loader = builder(&fixture.store, &queue, 2).build().unwrap();
    let crashed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut pass = loader.iter();
        let _batch = pass.next().unwrap().unwrap();
        panic!("the training step failed on purpose");
    }));
    assert!(crashed.is_err());
    assert!(queue.acked().is_empty(), "a batch whose consumer crashed was not consumed");
    assert_eq!(queue.in_flight(), ids(0..2));
    assert!(!loader.has_active_pass());
}

#[test]
fn dp_sharding_of_a_queue_is_refused() {
    let fixture = Fixture::eagle3_consume_once(&[8; 2]);
    let queue = RecordingQueue::staging(&fixture, &fixture.refs);
    let err =
        builder(&fixture.store, &queue, 2).dp_sharding(ferry_loader::DpSharding::new(2, 0, 1)).build().unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
}

#[test]
fn a_queue_loader_and_its_pass_can_move_to_another_thread() {
    fn assert_send<T: Send>() {}
    assert_send::<FeatureLoader>();
    assert_send::<ferry_loader::Batches>();
}
