//! The ref distributor (SpecForge §9.6): round-robin dispatch of whole optimizer windows, one
//! ledger transaction per poll and one fsync per rank per round, duplicates settled at once,
//! acknowledgements forwarded, the end-of-stream tail adopted + aborted + settled, resume with
//! skipped and requeued samples (including a different DP size), counter repair, and failures
//! that poison every inbox.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::RecordingStore;

use ferry_control::channel::{FileRefChannel, RefSink, RefSource};
use ferry_control::controller::{ControllerOptions, DataFlowController};
use ferry_control::distributor::{DistributorOptions, RefDistributor, file_inboxes};
use ferry_control::ledger::{DurableMarker, InMemoryLedger, Ledger, SqliteLedger};
use ferry_control::queue::RefQueue;
use ferry_control::signal::StopSignal;
use ferry_core::{Error, Result, SampleId, SampleRef};
use ferry_store::{FeatureStoreApi, ManualClock};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `(rank, ids)` of every `publish_batch`, in call order.
type BatchLog = Arc<Mutex<Vec<(usize, Vec<String>)>>>;

/// An inbox writer that records each `publish_batch` (one fsync each) before writing it.
struct RecordingInbox {
    rank: usize,
    inner: FileRefChannel,
    calls: BatchLog,
}

impl RefSink for RecordingInbox {
    fn describe(&self) -> String {
        RefSink::describe(&self.inner)
    }
    fn publish(&self, r: &SampleRef) -> Result<()> {
        self.inner.publish(r)
    }
    fn publish_batch(&self, refs: &[SampleRef]) -> Result<()> {
        self.calls.lock().unwrap().push((self.rank, ids(refs)));
        self.inner.publish_batch(refs)
    }
    fn published(&self) -> u64 {
        self.inner.published()
    }
    fn close(&self) -> Result<()> {
        self.inner.close()
    }
    fn fail(&self, reason: &str) -> Result<()> {
        RefSink::fail(&self.inner, reason)
    }
    fn consumed_remote(&self) -> Result<u64> {
        self.inner.consumed_remote()
    }
    fn consumer_failure(&self) -> Result<Option<String>> {
        self.inner.consumer_failure()
    }
    fn consumer_stopped(&self) -> Result<bool> {
        self.inner.consumer_stopped()
    }
    fn consumer_quantum(&self) -> Result<Option<u64>> {
        self.inner.consumer_quantum()
    }
}

fn ids(refs: &[SampleRef]) -> Vec<String> {
    refs.iter().map(|r| r.sample_id.to_string()).collect()
}

fn sids(names: &[&str]) -> Vec<SampleId> {
    names.iter().map(|s| SampleId::new(*s)).collect()
}

/// One consumer attempt's world: the source channel, the store, a ledger, inboxes.
struct World {
    dir: tempfile::TempDir,
    store: Arc<RecordingStore>,
    producer: FileRefChannel,
}

impl World {
    fn new(fail_abort: bool) -> World {
        let dir = tempfile::tempdir().unwrap();
        let producer = FileRefChannel::open(dir.path().join("refs.jsonl"));
        World { dir, store: RecordingStore::new(fail_abort), producer }
    }

    fn source(&self) -> Arc<FileRefChannel> {
        Arc::new(FileRefChannel::open(self.dir.path().join("refs.jsonl")))
    }

    fn inbox_dir(&self) -> PathBuf {
        self.dir.path().join("inboxes")
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("consumer.sqlite")
    }

    /// Puts sample `id` into the store and returns its ref.
    fn sample(&self, id: &str) -> SampleRef {
        self.store.sample(id)
    }

    fn publish(&self, names: &[&str]) -> Vec<SampleRef> {
        let refs: Vec<SampleRef> = names.iter().map(|n| self.sample(n)).collect();
        self.producer.publish_batch(&refs).unwrap();
        refs
    }

    fn distributor(
        &self,
        ledger: Arc<dyn Ledger>,
        options: DistributorOptions,
    ) -> (Arc<DataFlowController>, RefDistributor) {
        let controller = Arc::new(DataFlowController::new(ControllerOptions::new("run0"), ledger));
        self.distributor_with(controller, options)
    }

    fn distributor_with(
        &self,
        controller: Arc<DataFlowController>,
        options: DistributorOptions,
    ) -> (Arc<DataFlowController>, RefDistributor) {
        let inboxes: Vec<Arc<dyn RefSink>> = file_inboxes(&self.inbox_dir(), options.dp_size)
            .unwrap()
            .into_iter()
            .map(|i| i as Arc<dyn RefSink>)
            .collect();
        let store: Arc<dyn FeatureStoreApi> = self.store.clone();
        let d = RefDistributor::new(self.source(), Arc::clone(&controller), inboxes, Some(store), options).unwrap();
        (controller, d)
    }

    fn reader(&self, rank: usize) -> FileRefChannel {
        FileRefChannel::inbox(&self.inbox_dir(), rank)
    }

    fn read(&self, rank: usize) -> Vec<String> {
        ids(&self.reader(rank).poll(None).unwrap())
    }

    fn consumed(&self) -> u64 {
        self.producer.consumed_remote().unwrap()
    }
}

fn memory() -> Arc<dyn Ledger> {
    Arc::new(InMemoryLedger::new())
}

fn pump_until_quiet(d: &RefDistributor) {
    for _ in 0..100 {
        if !d.pump().unwrap() {
            return;
        }
    }
    panic!("the distributor kept making progress");
}

#[test]
fn two_ranks_get_alternate_refs_and_the_short_tail_is_dropped_at_the_end() {
    let w = World::new(false);
    let (_, d) = w.distributor(memory(), DistributorOptions::new(2, 1));
    let readers = [w.reader(0), w.reader(1)];
    w.publish(&["s0", "s1", "s2", "s3", "s4", "s5", "s6"]);
    pump_until_quiet(&d);
    assert_eq!(ids(&readers[0].poll(None).unwrap()), ["s0", "s2", "s4"]);
    assert_eq!(ids(&readers[1].poll(None).unwrap()), ["s1", "s3", "s5"]);
    assert!(!d.finished(), "s6 is held until the stream ends");
    w.producer.close().unwrap();
    d.pump().unwrap();
    assert!(d.finished());
    assert_eq!(d.stats().dropped, 1);
    assert_eq!(w.store.events(), ["adopt s6", "abort s6"]);
    assert_eq!(w.consumed(), 1, "the dropped tail is settled");
    for reader in &readers {
        assert!(reader.is_closed().unwrap());
        assert!(reader.poll(None).unwrap().is_empty(), "nothing after the close");
    }
}

#[test]
fn inbox_readers_get_disjoint_shards_that_cover_everything() {
    let w = World::new(false);
    let (_, d) = w.distributor(memory(), DistributorOptions::new(2, 1));
    let readers = [w.reader(0), w.reader(1)];
    w.publish(&["s0", "s1", "s2", "s3"]);
    w.producer.close().unwrap();
    pump_until_quiet(&d);
    let shards: Vec<Vec<String>> = readers.iter().map(|r| ids(&r.poll(None).unwrap())).collect();
    let all: HashSet<&String> = shards.iter().flatten().collect();
    assert_eq!(all.len(), 4);
    assert_eq!(shards[0].len() + shards[1].len(), 4);
    assert!(readers.iter().all(|r| r.poll(None).unwrap().is_empty() && r.is_closed().unwrap()));
}

#[test]
fn a_duplicate_publication_is_dispatched_once_and_settled_at_once() {
    let w = World::new(false);
    let (_, d) = w.distributor(memory(), DistributorOptions::new(1, 1));
    let refs = w.publish(&["s0", "s1"]);
    w.producer.publish(&refs[0]).unwrap();
    pump_until_quiet(&d);
    assert_eq!(w.read(0), ["s0", "s1"]);
    assert_eq!(d.stats().duplicates, 1);
    assert_eq!(w.consumed(), 1, "the duplicate is settled immediately");
    w.reader(0).mark_consumed(2).unwrap();
    d.pump().unwrap();
    assert_eq!(w.consumed(), 3);
    assert_eq!(w.producer.in_flight_remote().unwrap(), 0);
}

/// A ledger whose counting method fails: freshness must come from the commit result.
struct NoCountLedger(InMemoryLedger);

impl Ledger for NoCountLedger {
    fn commit_samples(&self, refs: &[SampleRef]) -> Result<Vec<bool>> {
        self.0.commit_samples(refs)
    }
    fn is_committed(&self, id: &SampleId) -> Result<bool> {
        self.0.is_committed(id)
    }
    fn get_committed(&self, id: &SampleId) -> Result<Option<SampleRef>> {
        self.0.get_committed(id)
    }
    fn committed_count(&self) -> Result<u64> {
        Err(Error::Backend { backend: "t".into(), operation: "count".into(), key: String::new(), message: "no".into() })
    }
    fn all_committed_ids(&self) -> Result<Vec<SampleId>> {
        self.0.all_committed_ids()
    }
    fn record_train_ack(&self, ids: &[SampleId], step: Option<i64>, durable: bool) -> Result<()> {
        self.0.record_train_ack(ids, step, durable)
    }
    fn durable_marker(&self) -> Result<DurableMarker> {
        self.0.durable_marker()
    }
}

#[test]
fn deduplication_uses_the_commit_result_never_a_count() {
    let w = World::new(false);
    let (_, d) = w.distributor(Arc::new(NoCountLedger(InMemoryLedger::new())), DistributorOptions::new(1, 1));
    let refs = w.publish(&["s0"]);
    w.producer.publish(&refs[0]).unwrap();
    pump_until_quiet(&d);
    assert_eq!(w.read(0), ["s0"]);
    assert_eq!(d.stats().duplicates, 1);
}

/// Counts ledger commit transactions.
struct CountingLedger {
    inner: SqliteLedger,
    commits: Mutex<usize>,
}

impl Ledger for CountingLedger {
    fn commit_samples(&self, refs: &[SampleRef]) -> Result<Vec<bool>> {
        *self.commits.lock().unwrap() += 1;
        self.inner.commit_samples(refs)
    }
    fn is_committed(&self, id: &SampleId) -> Result<bool> {
        self.inner.is_committed(id)
    }
    fn get_committed(&self, id: &SampleId) -> Result<Option<SampleRef>> {
        self.inner.get_committed(id)
    }
    fn committed_count(&self) -> Result<u64> {
        self.inner.committed_count()
    }
    fn all_committed_ids(&self) -> Result<Vec<SampleId>> {
        self.inner.all_committed_ids()
    }
    fn record_train_ack(&self, ids: &[SampleId], step: Option<i64>, durable: bool) -> Result<()> {
        self.inner.record_train_ack(ids, step, durable)
    }
    fn durable_marker(&self) -> Result<DurableMarker> {
        self.inner.durable_marker()
    }
}

#[test]
fn one_poll_is_one_ledger_transaction_and_one_fsync_per_rank() {
    let w = World::new(false);
    let ledger = Arc::new(CountingLedger { inner: SqliteLedger::open_fresh(w.db()).unwrap(), commits: Mutex::new(0) });
    let controller = Arc::new(DataFlowController::new(ControllerOptions::new("run0"), ledger.clone()));
    let calls = Arc::new(Mutex::new(Vec::new()));
    let inboxes: Vec<Arc<dyn RefSink>> = file_inboxes(&w.inbox_dir(), 2)
        .unwrap()
        .into_iter()
        .enumerate()
        .map(|(rank, _)| {
            Arc::new(RecordingInbox {
                rank,
                inner: FileRefChannel::inbox(&w.inbox_dir(), rank),
                calls: Arc::clone(&calls),
            }) as Arc<dyn RefSink>
        })
        .collect();
    let options = DistributorOptions::new(2, 2).with_batch(2);
    let d = RefDistributor::new(w.source(), controller, inboxes, None, options).unwrap();
    let refs = w.publish(&["s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7"]);
    w.producer.publish(&refs[0]).unwrap();
    d.pump().unwrap();
    assert_eq!(*ledger.commits.lock().unwrap(), 1, "one transaction for the whole poll");
    // SpecForge appends once per rank per round (4 fsyncs here); ferry appends every round a
    // pump completes at once: one publish_batch (one fsync) per rank per pump.
    let want: Vec<(usize, Vec<String>)> = vec![
        (0, vec!["s0".into(), "s2".into(), "s4".into(), "s6".into()]),
        (1, vec!["s1".into(), "s3".into(), "s5".into(), "s7".into()]),
    ];
    assert_eq!(*calls.lock().unwrap(), want, "one publish_batch (one fsync) per rank per pump");
}

#[test]
fn a_failed_ledger_transaction_commits_nothing_of_the_poll() {
    let w = World::new(false);
    let ledger = Arc::new(SqliteLedger::open_fresh(w.db()).unwrap());
    let (_, d) = w.distributor(ledger.clone(), DistributorOptions::new(1, 1));
    let poison = rusqlite::Connection::open(w.db()).unwrap();
    poison
        .execute_batch(
            "CREATE TRIGGER poison BEFORE INSERT ON committed WHEN NEW.sample_id = 's2' \
             BEGIN SELECT RAISE(ABORT, 'injected'); END;",
        )
        .unwrap();
    w.publish(&["s0", "s1", "s2", "s3"]);
    let err = d.pump().unwrap_err();
    assert_eq!(ledger.committed_count().unwrap(), 0, "the whole poll rolled back");
    assert!(w.read(0).is_empty());
    // The polled refs are neither committed nor dispatched: a later pump must not carry on as
    // if they never existed. It repeats the error instead.
    poison.execute_batch("DROP TRIGGER poison").unwrap();
    assert_eq!(d.pump().unwrap_err(), err);
    assert!(!d.finished());
}

/// A source that publishes one more ref and closes the channel the first time it is asked
/// whether it is closed: the race between the empty poll and the close check.
struct LateCloseSource {
    inner: FileRefChannel,
    producer: FileRefChannel,
    late: SampleRef,
    done: Mutex<bool>,
}

impl RefSource for LateCloseSource {
    fn describe(&self) -> String {
        RefSource::describe(&self.inner)
    }
    fn upstream(&self) -> &'static str {
        self.inner.upstream()
    }
    fn poll(&self, max: Option<usize>) -> Result<Vec<SampleRef>> {
        self.inner.poll(max)
    }
    fn is_closed(&self) -> Result<bool> {
        let mut done = self.done.lock().unwrap();
        if !*done {
            *done = true;
            self.producer.publish(&self.late)?;
            self.producer.close()?;
        }
        self.inner.is_closed()
    }
    fn failure(&self) -> Result<Option<String>> {
        RefSource::failure(&self.inner)
    }
    fn mark_consumed(&self, n: u64) -> Result<()> {
        self.inner.mark_consumed(n)
    }
    fn seed_consumed(&self) -> Result<u64> {
        self.inner.seed_consumed()
    }
    fn consumed(&self) -> u64 {
        self.inner.consumed()
    }
    fn mark_consumer_done(&self) -> Result<()> {
        self.inner.mark_consumer_done()
    }
    fn mark_consumer_failed(&self, reason: &str) -> Result<()> {
        self.inner.mark_consumer_failed(reason)
    }
    fn publish_consumer_quantum(&self, quantum: u64, allow_existing: bool) -> Result<()> {
        self.inner.publish_consumer_quantum(quantum, allow_existing)
    }
}

#[test]
fn a_ref_published_just_before_the_close_is_still_dispatched() {
    let w = World::new(false);
    let source = Arc::new(LateCloseSource {
        inner: FileRefChannel::open(w.dir.path().join("refs.jsonl")),
        producer: FileRefChannel::open(w.dir.path().join("refs.jsonl")),
        late: w.sample("s0"),
        done: Mutex::new(false),
    });
    let controller = Arc::new(DataFlowController::new(ControllerOptions::new("run0"), memory()));
    let inboxes: Vec<Arc<dyn RefSink>> =
        file_inboxes(&w.inbox_dir(), 1).unwrap().into_iter().map(|i| i as Arc<dyn RefSink>).collect();
    let d = RefDistributor::new(source, controller, inboxes, None, DistributorOptions::new(1, 1)).unwrap();
    d.pump().unwrap();
    assert!(!d.finished(), "the late ref was found, so the stream is not drained yet");
    assert_eq!(w.read(0), ["s0"]);
    d.pump().unwrap();
    assert!(d.finished());
    assert_eq!(d.stats().dropped, 0);
}

/// Attempt 1 over a SQLite ledger: commits and dispatches everything published, the trainer
/// durably acknowledges `acked` (and its inbox counter moves only if `counter_moved`), then the
/// process dies. Returns the reconciled controller of attempt 2 with its skip / requeue sets.
fn crash_after(
    w: &World,
    dp: usize,
    acked: &[&str],
    counter_moved: bool,
) -> (Arc<DataFlowController>, HashSet<SampleId>, HashSet<SampleId>) {
    {
        let (controller, d) =
            w.distributor(Arc::new(SqliteLedger::open_fresh(w.db()).unwrap()), DistributorOptions::new(dp, 1));
        pump_until_quiet(&d);
        if !acked.is_empty() {
            controller.ack_train_refs("trainer", &sids(acked), Some(1), true).unwrap();
            if counter_moved {
                w.reader(0).mark_consumed(acked.len() as u64).unwrap();
                pump_until_quiet(&d);
            }
        }
    }
    let controller = Arc::new(DataFlowController::new(
        ControllerOptions::new("run0"),
        Arc::new(SqliteLedger::open_existing(w.db()).unwrap()),
    ));
    let store: &dyn FeatureStoreApi = w.store.as_ref();
    let rec = controller.reconcile_on_restart(Some(store)).unwrap();
    (controller, rec.released.into_iter().collect(), rec.requeued.into_iter().collect())
}

fn resume_options(dp: usize, skip: HashSet<SampleId>, requeued: HashSet<SampleId>) -> DistributorOptions {
    DistributorOptions { skip_ids: skip, requeued_ids: requeued, ..DistributorOptions::new(dp, 1) }
}

#[test]
fn a_resume_skips_trained_samples_and_dispatches_only_the_requeued_ones() {
    let w = World::new(false);
    w.publish(&["s0", "s1"]);
    let (controller, skip, requeued) = crash_after(&w, 1, &["s0"], true);
    assert_eq!(w.consumed(), 1);
    let (_, d) = w.distributor_with(controller, resume_options(1, skip, requeued));
    pump_until_quiet(&d);
    assert_eq!(w.read(0), ["s1"]);
    assert_eq!((d.stats().skipped, d.stats().duplicates), (1, 1));
    assert_eq!(w.consumed(), 1, "a requeued replay is not settled again");
    w.reader(0).mark_consumed(1).unwrap();
    d.pump().unwrap();
    assert_eq!(w.consumed(), 2);
}

#[test]
fn every_record_of_a_trained_sample_is_skipped_and_never_settled_again() {
    let w = World::new(false);
    let refs = w.publish(&["s0"]);
    w.producer.publish(&refs[0]).unwrap();
    let (controller, skip, requeued) = crash_after(&w, 1, &["s0"], true);
    // Attempt 1 settled the duplicate at once and the ack through the inbox: 2.
    assert_eq!(w.consumed(), 2);
    let (_, d) = w.distributor_with(controller, resume_options(1, skip, requeued));
    pump_until_quiet(&d);
    assert_eq!(d.stats().skipped, 2);
    assert_eq!(d.stats().dispatched, 0);
    assert_eq!(w.consumed(), 2);
    assert_eq!(w.producer.in_flight_remote().unwrap(), 0);
}

#[test]
fn a_crash_between_the_durable_ack_and_the_counter_is_repaired_at_construction() {
    let w = World::new(false);
    w.publish(&["s0", "s1"]);
    let (controller, skip, requeued) = crash_after(&w, 1, &["s0"], false);
    assert_eq!(w.consumed(), 0, "the ack committed, the counter did not move");
    let (_, d) = w.distributor_with(controller, resume_options(1, skip, requeued));
    assert_eq!(w.consumed(), 1, "repaired");
    pump_until_quiet(&d);
    assert_eq!(w.read(0), ["s1"]);
}

#[test]
fn a_crash_before_any_ack_replays_everything_repartitioned_over_a_new_dp_size() {
    let w = World::new(false);
    w.publish(&["s0", "s1", "s2", "s3", "s4", "s5"]);
    let (controller, skip, requeued) = crash_after(&w, 2, &[], false);
    assert_eq!(requeued.len(), 6);
    assert!(skip.is_empty());
    let (_, d) = w.distributor_with(controller, resume_options(3, skip, requeued));
    pump_until_quiet(&d);
    assert_eq!(w.read(0), ["s0", "s3"]);
    assert_eq!(w.read(1), ["s1", "s4"]);
    assert_eq!(w.read(2), ["s2", "s5"]);
    assert_eq!((d.stats().dispatched, d.stats().duplicates), (6, 6));
    assert_eq!(w.consumed(), 0);
    for rank in 0..3 {
        w.reader(rank).mark_consumed(2).unwrap();
    }
    d.pump().unwrap();
    assert_eq!(w.consumed(), 6);
}

#[test]
fn acknowledgements_are_forwarded_and_dispatch_alone_never_counts() {
    let w = World::new(false);
    let (_, d) = w.distributor(memory(), DistributorOptions::new(2, 1));
    w.publish(&["s0", "s1", "s2", "s3"]);
    pump_until_quiet(&d);
    assert_eq!(w.consumed(), 0);
    w.reader(0).mark_consumed(2).unwrap();
    w.reader(1).mark_consumed(2).unwrap();
    d.pump().unwrap();
    assert_eq!(w.consumed(), 4);
}

#[test]
fn stale_inbox_files_of_a_previous_attempt_are_deleted() {
    let w = World::new(false);
    std::fs::create_dir_all(w.inbox_dir()).unwrap();
    let stale = w.sample("old");
    let old = FileRefChannel::inbox(&w.inbox_dir(), 0);
    old.publish(&stale).unwrap();
    old.close().unwrap();
    old.mark_consumed(5).unwrap();
    RefSink::fail(&old, "old failure").unwrap();
    let (_, d) = w.distributor(memory(), DistributorOptions::new(1, 1));
    assert!(w.read(0).is_empty());
    assert!(!w.reader(0).is_closed().unwrap());
    assert_eq!(w.reader(0).consumed_remote().unwrap(), 0);
    drop(d);
}

#[test]
fn a_partial_window_at_the_end_keeps_dispatched_refs_leased_and_settles_the_rest() {
    let w = World::new(false);
    let (controller, d) = w.distributor(memory(), DistributorOptions::new(2, 1));
    w.publish(&["s0", "s1", "s2"]);
    w.producer.close().unwrap();
    pump_until_quiet(&d);
    assert!(d.finished());
    let queue = controller.sample_queue().unwrap();
    assert_eq!((queue.in_flight(), queue.depth()), (2, 0), "dispatched refs stay leased until the trainer acks");
    assert_eq!(w.store.events(), ["adopt s2", "abort s2"]);
    assert_eq!(w.consumed(), 1);
    assert!(w.reader(0).is_closed().unwrap() && w.reader(1).is_closed().unwrap());
}

#[test]
fn whole_windows_only_dispatch_once_every_ref_of_them_is_committed() {
    // dp 2, step 4, batch 1: a window is 8 refs.
    let options = || DistributorOptions::new(2, 4).with_batch(1);
    let w = World::new(false);
    let (_, d) = w.distributor(memory(), options());
    w.publish(&["s0", "s1"]);
    pump_until_quiet(&d);
    assert!(w.read(0).is_empty(), "2 of 8: nothing dispatched");
    w.publish(&["s2", "s3", "s4", "s5", "s6", "s7"]);
    pump_until_quiet(&d);
    assert_eq!(w.read(0), ["s0", "s2", "s4", "s6"]);
    assert_eq!(w.read(1), ["s1", "s3", "s5", "s7"]);

    // 2 refs, then the end: a clean finish that drops both.
    let w = World::new(false);
    let (_, d) = w.distributor(memory(), options());
    w.publish(&["s0", "s1"]);
    w.producer.close().unwrap();
    pump_until_quiet(&d);
    assert!(d.finished());
    assert_eq!(d.stats().dropped, 2);
    assert_eq!(w.store.events(), ["adopt s0", "abort s0", "adopt s1", "abort s1"]);
    assert_eq!(w.consumed(), 2);
    assert!(w.reader(0).is_closed().unwrap() && w.read(0).is_empty() && w.read(1).is_empty());

    // 16 refs: two windows, nothing dropped.
    let w = World::new(false);
    let (_, d) = w.distributor(memory(), options());
    let names: Vec<String> = (0..16).map(|i| format!("s{i}")).collect();
    w.publish(&names.iter().map(String::as_str).collect::<Vec<_>>());
    w.producer.close().unwrap();
    pump_until_quiet(&d);
    assert_eq!((d.stats().dispatched, d.stats().dropped), (16, 0));

    // 10 refs, window 8: the aligned prefix goes out, s8 and s9 are adopted and aborted.
    let w = World::new(false);
    let (_, d) = w.distributor(memory(), options());
    let names: Vec<String> = (0..10).map(|i| format!("s{i}")).collect();
    w.publish(&names.iter().map(String::as_str).collect::<Vec<_>>());
    w.producer.close().unwrap();
    pump_until_quiet(&d);
    assert_eq!((d.stats().dispatched, d.stats().dropped), (8, 2));
    assert_eq!(w.store.events(), ["adopt s8", "abort s8", "adopt s9", "abort s9"]);
}

#[test]
fn counters_reconcile_published_with_consumed() {
    let w = World::new(false);
    let (_, d) = w.distributor(memory(), DistributorOptions::new(2, 2).with_batch(1));
    let refs = w.publish(&["s0", "s1", "s2", "s3", "s4", "s5", "s6"]);
    w.producer.publish(&refs[0]).unwrap();
    w.producer.close().unwrap();
    pump_until_quiet(&d);
    assert_eq!(
        d.stats(),
        ferry_control::distributor::DistributorStats { dispatched: 4, skipped: 0, duplicates: 1, dropped: 3 }
    );
    w.reader(0).mark_consumed(2).unwrap();
    w.reader(1).mark_consumed(2).unwrap();
    assert_eq!(w.consumed(), 4, "1 duplicate + 3 dropped settled by the distributor");
    assert!(d.pump().unwrap(), "a finished distributor still forwards the last acks");
    assert_eq!(w.consumed(), 8);
    assert_eq!(w.producer.published(), 8);
    assert!(!d.pump().unwrap());
}

#[test]
fn a_requeued_tail_below_one_window_settles_cleanly_on_resume() {
    let w = World::new(false);
    w.publish(&["s0"]);
    let (controller, skip, requeued) = crash_after(&w, 2, &[], false);
    w.producer.close().unwrap();
    let (_, d) = w.distributor_with(controller, resume_options(2, skip, requeued));
    pump_until_quiet(&d);
    assert!(d.finished());
    assert_eq!(d.stats().dropped, 1);
    assert_eq!(w.consumed(), 1);
}

#[test]
fn a_failed_tail_cleanup_poisons_every_inbox_with_the_cleanup_errors() {
    let w = World::new(true);
    let (_, d) = w.distributor(memory(), DistributorOptions::new(2, 1));
    w.publish(&["s0"]);
    w.producer.close().unwrap();
    let err = d.run_guarded(&StopSignal::new()).unwrap_err();
    assert!(err.to_string().contains("cleanup errors"), "{err}");
    assert_eq!(w.store.events(), ["adopt s0", "abort s0"]);
    for rank in 0..2 {
        let err = w.reader(rank).is_closed().unwrap_err();
        assert!(
            err.to_string().contains("ref-distributor died") && err.to_string().contains("injected abort failure"),
            "{err}"
        );
    }
}

#[test]
fn an_idle_timeout_or_a_producer_failure_kills_the_distributor_and_every_inbox_says_so() {
    let w = World::new(false);
    let clock = ManualClock::new();
    let options = DistributorOptions {
        idle_timeout: Some(Duration::from_secs(5)),
        clock: Arc::new(clock.clone()),
        ..DistributorOptions::new(2, 1)
    };
    let (_, d) = w.distributor(memory(), options);
    let err = d.run(&StopSignal::new()).unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }) && err.to_string().contains("producer dead?"), "{err}");
    d.run_guarded(&StopSignal::new()).unwrap_err();
    for rank in 0..2 {
        let err = w.reader(rank).is_closed().unwrap_err();
        assert!(err.to_string().contains("ref-distributor died:\nTimeoutError"), "{err}");
    }

    let w = World::new(false);
    let (_, d) = w.distributor(memory(), DistributorOptions::new(2, 1));
    w.producer.fail("RuntimeError: capture server crashed").unwrap();
    let thread = Arc::new(d).start().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !thread.is_finished() {
        assert!(Instant::now() < deadline, "the distributor thread did not stop");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(thread.stop().unwrap_err().to_string().contains("capture server crashed"));
    for rank in 0..2 {
        let err = w.reader(rank).is_closed().unwrap_err();
        assert!(err.to_string().contains("capture server crashed"), "{err}");
    }
}

#[test]
fn construction_rejects_bad_shapes() {
    let w = World::new(false);
    let controller = Arc::new(DataFlowController::new(ControllerOptions::new("run0"), memory()));
    let inboxes = |n: usize| -> Vec<Arc<dyn RefSink>> {
        file_inboxes(&w.inbox_dir(), n).unwrap().into_iter().map(|i| i as Arc<dyn RefSink>).collect()
    };
    let new = |inboxes, options| RefDistributor::new(w.source(), Arc::clone(&controller), inboxes, None, options);
    assert!(new(inboxes(0), DistributorOptions::new(0, 1)).is_err());
    assert!(new(inboxes(1), DistributorOptions::new(1, 0)).is_err());
    assert!(new(inboxes(1), DistributorOptions::new(1, 3).with_batch(2)).is_err());
    assert!(new(inboxes(1), DistributorOptions::new(2, 1)).is_err());
    let no_queue = Arc::new(DataFlowController::new(
        ControllerOptions { enable_sample_queue: false, ..ControllerOptions::new("run0") },
        memory(),
    ));
    let err = RefDistributor::new(w.source(), no_queue, inboxes(1), None, DistributorOptions::new(1, 1)).unwrap_err();
    assert!(err.to_string().contains("staging queue"), "{err}");
}

#[test]
fn a_no_op_ledger_is_refused_because_duplicates_could_not_be_told_apart() {
    let w = World::new(false);
    let controller =
        Arc::new(DataFlowController::new(ControllerOptions::new("run0"), Arc::new(ferry_control::ledger::NoOpLedger)));
    let inboxes: Vec<Arc<dyn RefSink>> =
        file_inboxes(&w.inbox_dir(), 1).unwrap().into_iter().map(|i| i as Arc<dyn RefSink>).collect();
    let err = RefDistributor::new(w.source(), controller, inboxes, None, DistributorOptions::new(1, 1)).unwrap_err();
    assert!(err.to_string().contains("retains nothing"), "{err}");
}
