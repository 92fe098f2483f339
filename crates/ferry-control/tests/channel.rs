//! The ref channel (SpecForge §8): publish / poll across instances, publication accounting under
//! injected write and fsync failures, torn records, sidecars (closed, failed, consumed counter,
//! consumer done/failed, quantum), the blocking stream, the stream queue's leases and
//! exact-prefix acks, and interop with the channel SpecForge itself wrote.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use ferry_control::channel::io::{AppendFile, AppendFs};
use ferry_control::channel::{
    ChannelRole, FileRefChannel, PublishTransaction, RefSink, RefSource, RefStream, StreamOptions, publish_many,
};
use ferry_control::queue::RefQueue;
use ferry_control::signal::StopSignal;
use ferry_control::stream_queue::{StreamQueueOptions, StreamingRefQueue};
use ferry_core::json::{JsonStyle, sample_ref_from_str, sample_ref_to_string};
use ferry_core::{Error, SampleId, SampleRef};
use ferry_store::ManualClock;
use proptest::prelude::*;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn fixtures() -> PathBuf {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures"));
    assert!(dir.is_dir(), "SpecForge fixtures not found at {}: put shared/ beside the repository", dir.display());
    dir.to_path_buf()
}

/// The complete records of SpecForge's channel fixture, as bytes (without their newlines).
fn fixture_lines() -> Vec<String> {
    let text = std::fs::read_to_string(fixtures().join("specforge-control/refs.jsonl")).unwrap();
    let mut lines: Vec<String> = text.split('\n').map(str::to_owned).collect();
    lines.pop(); // the torn trailing record
    lines
}

/// A ref shaped like SpecForge's fixture refs, with its own id.
fn sref(id: &str) -> SampleRef {
    let mut r = sample_ref_from_str(&fixture_lines()[0]).unwrap();
    r.sample_id = SampleId::new(id);
    r
}

fn ids(refs: &[SampleRef]) -> Vec<String> {
    refs.iter().map(|r| r.sample_id.to_string()).collect()
}

fn channel_in(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("refs.jsonl")
}

/// An `AppendFs` that writes to the real file but stops after a byte budget (then errors), may
/// cut writes short, and may fail fsync.
#[derive(Debug, Default)]
struct FaultyFs {
    plan: Arc<Mutex<Plan>>,
}

#[derive(Debug, Default)]
struct Plan {
    /// Bytes still allowed before writes fail (`None`: unlimited).
    budget: Option<usize>,
    /// Largest single write.
    chunk: Option<usize>,
    fail_sync: bool,
    syncs: usize,
}

struct FaultyFile {
    file: std::fs::File,
    plan: Arc<Mutex<Plan>>,
}

impl AppendFs for FaultyFs {
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn AppendFile>> {
        let file = std::fs::OpenOptions::new().append(true).create(true).open(path)?;
        Ok(Box::new(FaultyFile { file, plan: Arc::clone(&self.plan) }))
    }
}

impl AppendFile for FaultyFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut plan = self.plan.lock().unwrap();
        let mut n = buf.len().min(plan.chunk.unwrap_or(usize::MAX));
        if let Some(budget) = plan.budget {
            if budget == 0 {
                return Err(io::Error::other("injected write failure"));
            }
            n = n.min(budget);
            plan.budget = Some(budget - n);
        }
        self.file.write(&buf[..n])
    }
    fn sync(&mut self) -> io::Result<()> {
        let mut plan = self.plan.lock().unwrap();
        plan.syncs += 1;
        if plan.fail_sync { Err(io::Error::other("injected fsync failure")) } else { Ok(()) }
    }
}

fn faulty(path: &Path, plan: Plan) -> (FileRefChannel, Arc<Mutex<Plan>>) {
    let fs = FaultyFs { plan: Arc::new(Mutex::new(plan)) };
    let plan = Arc::clone(&fs.plan);
    (FileRefChannel::with_fs(path, ChannelRole::Channel, Arc::new(fs)), plan)
}

fn record_len(r: &SampleRef) -> usize {
    sample_ref_to_string(r, JsonStyle::Compact).unwrap().len() + 1
}

#[test]
fn published_refs_reach_another_instance_with_specs_and_generation() {
    let dir = tempfile::tempdir().unwrap();
    let producer = FileRefChannel::open(channel_in(&dir));
    let consumer = FileRefChannel::open(channel_in(&dir));
    assert!(consumer.poll(None).unwrap().is_empty(), "a missing channel reads as empty");
    let mut r = sref("run0:task9");
    r.metadata.insert("generation".into(), 3.into());
    producer.publish(&r).unwrap();
    assert_eq!(producer.published(), 1);
    let got = consumer.poll(None).unwrap();
    assert_eq!(got, vec![r.clone()]);
    assert_eq!(got[0].feature_specs["hidden_state"].shape, vec![1, 4, 24]);
    assert_eq!(got[0].generation().map(|g| g.get()), Some(3));
    assert!(consumer.poll(None).unwrap().is_empty(), "nothing new reads as empty");
    // The line is SpecForge's compact JSON, newline-terminated.
    let text = std::fs::read_to_string(channel_in(&dir)).unwrap();
    assert_eq!(text, format!("{}\n", sample_ref_to_string(&r, JsonStyle::Compact).unwrap()));
}

#[test]
fn a_transaction_that_fails_before_its_first_write_publishes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (channel, _) = faulty(&channel_in(&dir), Plan { budget: Some(0), ..Plan::default() });
    let (tx, result) = publish_many(&channel, vec![sref("s0"), sref("s1")]);
    assert!(result.is_err());
    assert_eq!(tx.published_count(), 0);
    assert!(tx.published_refs().is_empty());
    assert_eq!(ids(tx.unpublished_refs()), ["s0", "s1"]);
}

#[test]
fn a_transaction_that_fails_after_its_first_record_exposes_exactly_that_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let refs = vec![sref("s0"), sref("s1"), sref("s2")];
    let (channel, _) = faulty(&channel_in(&dir), Plan { budget: Some(record_len(&refs[0])), ..Plan::default() });
    let mut tx = PublishTransaction::begin(&channel, refs);
    assert!(tx.commit().is_err());
    assert_eq!(ids(tx.published_refs()), ["s0"]);
    assert_eq!(ids(tx.unpublished_refs()), ["s1", "s2"]);
    assert_eq!(ids(&FileRefChannel::open(channel_in(&dir)).poll(None).unwrap()), ["s0"]);
}

#[test]
fn an_fsync_failure_after_a_whole_record_still_counts_it_published() {
    let dir = tempfile::tempdir().unwrap();
    let (channel, _) = faulty(&channel_in(&dir), Plan { fail_sync: true, ..Plan::default() });
    let (tx, result) = publish_many(&channel, vec![sref("s0"), sref("s1")]);
    assert!(matches!(result, Err(Error::Io { .. })), "{result:?}");
    assert_eq!(ids(tx.published_refs()), ["s0"], "the record reached the kernel before fsync failed");
    assert_eq!(ids(&FileRefChannel::open(channel_in(&dir)).poll(None).unwrap()), ["s0"]);
}

#[test]
fn a_batch_is_one_write_and_one_fsync_and_counts_whole_records_on_failure() {
    let dir = tempfile::tempdir().unwrap();
    // fsync fails: both records are published and visible.
    let (channel, plan) = faulty(&channel_in(&dir), Plan { fail_sync: true, ..Plan::default() });
    assert!(channel.publish_batch(&[sref("s0"), sref("s1")]).is_err());
    assert_eq!(channel.published(), 2);
    assert_eq!(plan.lock().unwrap().syncs, 1);
    assert_eq!(ids(&FileRefChannel::open(channel_in(&dir)).poll(None).unwrap()), ["s0", "s1"]);

    // One record, then the write fails at the next record boundary: published 1.
    let dir = tempfile::tempdir().unwrap();
    let refs = [sref("s0"), sref("s1"), sref("s2")];
    let (channel, _) = faulty(&channel_in(&dir), Plan { budget: Some(record_len(&refs[0])), ..Plan::default() });
    assert!(channel.publish_batch(&refs).is_err());
    assert_eq!(channel.published(), 1);
    assert_eq!(ids(&FileRefChannel::open(channel_in(&dir)).poll(None).unwrap()), ["s0"]);

    // Short writes (7 bytes at a time) still publish every record.
    let dir = tempfile::tempdir().unwrap();
    let (channel, _) = faulty(&channel_in(&dir), Plan { chunk: Some(7), ..Plan::default() });
    channel.publish_batch(&refs).unwrap();
    assert_eq!(channel.published(), 3);
    assert_eq!(ids(&FileRefChannel::open(channel_in(&dir)).poll(None).unwrap()), ["s0", "s1", "s2"]);
    channel.publish_batch(&[]).unwrap();
    assert_eq!(channel.published(), 3);
}

#[test]
fn a_torn_record_is_never_published_nor_parsed_and_the_writer_refuses_to_append_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let r = sref("s0");
    let (channel, plan) = faulty(&channel_in(&dir), Plan { budget: Some(record_len(&r) / 2), ..Plan::default() });
    assert!(channel.publish(&r).is_err());
    assert_eq!(channel.published(), 0);
    let reader = FileRefChannel::open(channel_in(&dir));
    assert!(reader.poll(None).unwrap().is_empty(), "half a record is never parsed");
    plan.lock().unwrap().budget = None;
    let err = channel.publish(&sref("s1")).unwrap_err();
    assert!(matches!(err, Error::Protocol { .. }) && err.to_string().contains("Fail the channel"), "{err}");
    assert!(reader.poll(None).unwrap().is_empty());
}

#[test]
fn polls_are_incremental_and_max_leaves_the_rest_queued() {
    let dir = tempfile::tempdir().unwrap();
    let producer = FileRefChannel::open(channel_in(&dir));
    let consumer = FileRefChannel::open(channel_in(&dir));
    producer.publish(&sref("s0")).unwrap();
    assert_eq!(ids(&consumer.poll(None).unwrap()), ["s0"]);
    producer.publish_batch(&[sref("s1"), sref("s2"), sref("s3"), sref("s4"), sref("s5")]).unwrap();
    assert_eq!(ids(&consumer.poll(Some(2)).unwrap()), ["s1", "s2"]);
    assert_eq!(ids(&consumer.poll(None).unwrap()), ["s3", "s4", "s5"], "queued lines need no new bytes");
    assert!(consumer.poll(None).unwrap().is_empty());
}

#[test]
fn a_record_split_across_appends_is_read_once_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = channel_in(&dir);
    let consumer = FileRefChannel::open(&path);
    let line = format!("{}\n\n", sample_ref_to_string(&sref("s0"), JsonStyle::Compact).unwrap());
    let (head, tail) = line.as_bytes().split_at(40);
    std::fs::write(&path, head).unwrap();
    assert!(consumer.poll(None).unwrap().is_empty());
    std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(tail).unwrap();
    assert_eq!(ids(&consumer.poll(None).unwrap()), ["s0"], "blank lines are skipped");
}

#[test]
fn a_corrupt_record_is_an_error_that_names_it_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = channel_in(&dir);
    let good = sample_ref_to_string(&sref("s0"), JsonStyle::Compact).unwrap();
    std::fs::write(&path, format!("{good}\n{{\"sample_id\": 1}}\n{good}\n")).unwrap();
    let consumer = FileRefChannel::open(&path);
    assert_eq!(ids(&consumer.poll(None).unwrap()), ["s0"], "refs before the bad record come first");
    for _ in 0..2 {
        let err = consumer.poll(None).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
        let offset = good.len() + 1;
        assert!(err.to_string().contains(&format!("record at byte {offset}")), "{err}");
    }
}

#[test]
fn consumed_counts_drive_the_producers_in_flight_and_survive_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let producer = FileRefChannel::open(channel_in(&dir));
    let consumer = FileRefChannel::open(channel_in(&dir));
    producer.publish_batch(&[sref("s0"), sref("s1"), sref("s2"), sref("s3")]).unwrap();
    assert_eq!(producer.in_flight_remote().unwrap(), 4);
    consumer.mark_consumed(4).unwrap();
    assert_eq!(producer.consumed_remote().unwrap(), 4);
    assert_eq!(producer.in_flight_remote().unwrap(), 0);

    // A restarted consumer continues from the sidecar, never rewinds.
    let dir = tempfile::tempdir().unwrap();
    FileRefChannel::open(channel_in(&dir)).mark_consumed(3).unwrap();
    let restarted = FileRefChannel::open(channel_in(&dir));
    assert_eq!(restarted.seed_consumed().unwrap(), 3);
    restarted.mark_consumed(2).unwrap();
    assert_eq!(FileRefChannel::open(channel_in(&dir)).consumed_remote().unwrap(), 5);

    // Missing, empty and unparsable counters read as 0.
    let dir = tempfile::tempdir().unwrap();
    let channel = FileRefChannel::open(channel_in(&dir));
    assert_eq!(channel.consumed_remote().unwrap(), 0);
    for text in ["", "  ", "abc"] {
        std::fs::write(dir.path().join("refs.jsonl.consumed_count"), text).unwrap();
        assert_eq!(channel.consumed_remote().unwrap(), 0);
    }
}

#[test]
fn concurrent_marks_from_four_threads_count_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let channel = Arc::new(FileRefChannel::open(channel_in(&dir)));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let channel = Arc::clone(&channel);
            std::thread::spawn(move || {
                for _ in 0..2000 {
                    channel.mark_consumed(1).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(channel.consumed(), 8000);
    assert_eq!(FileRefChannel::open(channel_in(&dir)).consumed_remote().unwrap(), 8000);
}

fn manual_stream(clock: &ManualClock, idle: Option<Duration>) -> StreamOptions {
    StreamOptions { poll: Duration::from_millis(250), idle_timeout: idle, clock: Arc::new(clock.clone()) }
}

#[test]
fn the_stream_drains_then_stops_at_close() {
    let dir = tempfile::tempdir().unwrap();
    let producer = FileRefChannel::open(channel_in(&dir));
    producer.publish_batch(&[sref("s0"), sref("s1"), sref("s2")]).unwrap();
    producer.close().unwrap();
    let consumer = FileRefChannel::open(channel_in(&dir));
    let clock = ManualClock::new();
    let got: Vec<SampleRef> = RefStream::new(&consumer, manual_stream(&clock, None)).flat_map(Result::unwrap).collect();
    assert_eq!(ids(&got), ["s0", "s1", "s2"]);
}

#[test]
fn the_stream_gives_up_after_its_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let consumer = FileRefChannel::open(channel_in(&dir));
    let clock = ManualClock::new();
    let mut stream = RefStream::new(&consumer, manual_stream(&clock, Some(Duration::from_secs(2))));
    let err = stream.next().unwrap().unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("producer dead?"), "{err}");
    assert_eq!(clock.sleeps().len(), 8, "2 s of 250 ms polls on the injected clock");
    assert!(stream.next().is_none());
}

#[test]
fn a_producer_failure_reaches_the_stream_after_the_refs_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let producer = FileRefChannel::open(channel_in(&dir));
    producer.publish(&sref("s0")).unwrap();
    producer.fail("CUDA error: device lost").unwrap();
    assert!(!dir.path().join("refs.jsonl.closed").exists());
    let consumer = FileRefChannel::open(channel_in(&dir));
    let clock = ManualClock::new();
    let mut stream = RefStream::new(&consumer, manual_stream(&clock, None));
    assert_eq!(ids(&stream.next().unwrap().unwrap()), ["s0"]);
    let err = stream.next().unwrap().unwrap_err();
    assert!(matches!(err, Error::PeerFailed { .. }), "{err}");
    assert!(err.to_string().contains("producer failed: CUDA error: device lost"), "{err}");
    assert_eq!(err.python_exception(), "RuntimeError");
    // An empty reason reads as SpecForge's default, an empty file as "unknown remote failure".
    FileRefChannel::open(dir.path().join("b.jsonl")).fail("").unwrap();
    assert_eq!(
        RefSource::failure(&FileRefChannel::open(dir.path().join("b.jsonl"))).unwrap().as_deref(),
        Some("producer failed")
    );
    std::fs::write(dir.path().join("c.jsonl.failed"), "").unwrap();
    assert_eq!(
        RefSource::failure(&FileRefChannel::open(dir.path().join("c.jsonl"))).unwrap().as_deref(),
        Some("unknown remote failure")
    );
}

#[test]
fn consumer_outcomes_round_trip_to_the_producer() {
    let dir = tempfile::tempdir().unwrap();
    let producer = FileRefChannel::open(channel_in(&dir));
    let consumer = FileRefChannel::open(channel_in(&dir));
    assert!(!producer.consumer_stopped().unwrap());
    consumer.mark_consumer_done().unwrap();
    assert!(producer.consumer_stopped().unwrap());
    assert_eq!(producer.consumer_failure().unwrap(), None);

    let dir = tempfile::tempdir().unwrap();
    let producer = FileRefChannel::open(channel_in(&dir));
    FileRefChannel::open(channel_in(&dir)).mark_consumer_failed("RuntimeError: optimizer failed").unwrap();
    assert!(producer.consumer_stopped().unwrap());
    assert_eq!(producer.consumer_failure().unwrap().as_deref(), Some("RuntimeError: optimizer failed"));
    FileRefChannel::open(dir.path().join("x.jsonl")).mark_consumer_failed("").unwrap();
    assert_eq!(
        FileRefChannel::open(dir.path().join("x.jsonl")).consumer_failure().unwrap().as_deref(),
        Some("consumer failed")
    );
}

#[test]
fn the_consumer_quantum_is_claimed_once_per_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let consumer = FileRefChannel::open(channel_in(&dir));
    let producer = FileRefChannel::open(channel_in(&dir));
    assert_eq!(producer.consumer_quantum().unwrap(), None);
    assert!(matches!(consumer.publish_consumer_quantum(0, false), Err(Error::InvalidArgument(_))));
    consumer.publish_consumer_quantum(8, false).unwrap();
    assert_eq!(producer.consumer_quantum().unwrap(), Some(8));
    let again = consumer.publish_consumer_quantum(8, false).unwrap_err();
    assert!(again.to_string().contains("fresh reference channel"), "{again}");
    consumer.publish_consumer_quantum(8, true).unwrap();
    let changed = consumer.publish_consumer_quantum(12, true).unwrap_err();
    assert!(changed.to_string().contains("changed across resume"), "{changed}");
    assert_eq!(producer.consumer_quantum().unwrap(), Some(8));
    // Created but not yet written (the writer's create-then-write): not published yet.
    std::fs::write(dir.path().join("refs.jsonl.consumer_quantum"), "").unwrap();
    assert_eq!(producer.consumer_quantum().unwrap(), None);
    for bad in ["x", "0", "-3"] {
        std::fs::write(dir.path().join("refs.jsonl.consumer_quantum"), bad).unwrap();
        let err = producer.consumer_quantum().unwrap_err();
        assert!(err.to_string().contains("invalid consumer quantum"), "{err}");
    }
}

#[test]
fn inboxes_report_a_dead_distributor_from_every_probe() {
    let dir = tempfile::tempdir().unwrap();
    let writer = FileRefChannel::inbox(dir.path(), 1);
    assert_eq!(writer.path(), dir.path().join("inbox-rank1.jsonl"));
    writer.publish(&sref("s0")).unwrap();
    RefSink::fail(&writer, "TimeoutError: no refs for 5s").unwrap();
    let reader = FileRefChannel::inbox(dir.path(), 1);
    let err = reader.is_closed().unwrap_err();
    assert!(err.to_string().contains("ref-distributor died:\nTimeoutError: no refs for 5s"), "{err}");
    assert_eq!(
        RefSource::failure(&reader).unwrap().as_deref(),
        Some("ref-distributor died:\nTimeoutError: no refs for 5s")
    );
    writer.remove_files().unwrap();
    assert!(!reader.path().exists() && !dir.path().join("inbox-rank1.jsonl.failed").exists());
    assert!(!reader.is_closed().unwrap());
}

/// A queue over the channel at `path`, on an injected clock.
fn queue_over(path: &Path, clock: &ManualClock, idle: Option<Duration>) -> StreamingRefQueue {
    StreamingRefQueue::new(
        Arc::new(FileRefChannel::open(path)),
        StreamQueueOptions {
            poll: Duration::from_millis(100),
            idle_timeout: idle,
            wait_log_interval: None,
            clock: Arc::new(clock.clone()),
        },
    )
}

#[test]
fn queue_leases_advance_the_counter_only_on_exact_prefix_acks() {
    let dir = tempfile::tempdir().unwrap();
    let producer = FileRefChannel::open(channel_in(&dir));
    producer.publish_batch(&[sref("s0"), sref("s1"), sref("s2"), sref("s3")]).unwrap();
    let clock = ManualClock::new();
    let queue = queue_over(&channel_in(&dir), &clock, None);
    let got = queue.get(2, None).unwrap();
    assert_eq!(ids(&got), ["s0", "s1"]);
    assert_eq!(queue.depth(), 2, "the poll buffered the rest");
    assert_eq!(producer.consumed_remote().unwrap(), 0, "get does not advance the counter");
    let err = queue.ack_ids(&[SampleId::new("s1")]).unwrap_err();
    assert!(err.to_string().contains("not the leased prefix: expected=[\"s0\"], got=[\"s1\"]"), "{err}");
    queue.ack(&got[..1]).unwrap();
    assert_eq!(producer.consumed_remote().unwrap(), 1);
    assert_eq!(queue.in_flight_ids(), [SampleId::new("s1")]);
    queue.ack_ids(&[]).unwrap();
    queue.ack_ids(&[SampleId::new("s1")]).unwrap();
    assert_eq!(producer.consumed_remote().unwrap(), 2);
    assert!(queue.loader_close_retryable());
}

#[test]
fn a_retryable_failure_puts_refs_back_first_and_a_terminal_one_settles_them() {
    let dir = tempfile::tempdir().unwrap();
    let producer = FileRefChannel::open(channel_in(&dir));
    producer.publish_batch(&[sref("s0"), sref("s1"), sref("s2")]).unwrap();
    producer.close().unwrap();
    let clock = ManualClock::new();
    let queue = queue_over(&channel_in(&dir), &clock, None);
    let first = queue.get(2, None).unwrap();
    queue.fail(&first, "loader stopped", true).unwrap();
    assert!(queue.in_flight_ids().is_empty());
    assert_eq!(producer.consumed_remote().unwrap(), 0, "a retryable failure settles nothing");
    assert_eq!(ids(&queue.get(2, None).unwrap()), ["s0", "s1"], "the same refs come back first");
    queue.fail(&[sref("s0"), sref("s1")], "materialize: KeyError", false).unwrap();
    assert_eq!(producer.consumed_remote().unwrap(), 2, "a terminal failure settles them");
    assert_eq!(ids(&queue.get(2, None).unwrap()), ["s2"], "the end of stream returns the short rest");
    assert!(queue.get(2, None).unwrap().is_empty());
}

#[test]
fn a_queue_get_blocks_until_refs_arrive_and_fails_on_idle_or_producer_failure() {
    // Idle timeout on the injected clock.
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new();
    let queue = queue_over(&channel_in(&dir), &clock, Some(Duration::from_secs(1)));
    let err = queue.get(1, None).unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }) && err.to_string().contains("idle"), "{err}");

    // Failure wins over close.
    let producer = FileRefChannel::open(channel_in(&dir));
    producer.close().unwrap();
    producer.fail("boom").unwrap();
    let err = queue_over(&channel_in(&dir), &clock, None).get(1, None).unwrap_err();
    assert!(err.to_string().contains("producer failed: boom"), "{err}");

    // A real producer thread: the get waits for the second ref.
    let dir = tempfile::tempdir().unwrap();
    let path = channel_in(&dir);
    let producer = FileRefChannel::open(&path);
    producer.publish(&sref("s0")).unwrap();
    let queue = StreamingRefQueue::new(
        Arc::new(FileRefChannel::open(&path)),
        StreamQueueOptions {
            poll: Duration::from_millis(2),
            idle_timeout: Some(Duration::from_secs(30)),
            ..Default::default()
        },
    );
    let late = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        producer.publish(&sref("s1")).unwrap();
    });
    assert_eq!(ids(&queue.get(2, None).unwrap()), ["s0", "s1"]);
    late.join().unwrap();
}

#[test]
fn an_interruptible_get_returns_nothing_once_stopped_and_keeps_buffered_refs() {
    let dir = tempfile::tempdir().unwrap();
    let producer = FileRefChannel::open(channel_in(&dir));
    producer.publish(&sref("s0")).unwrap();
    let queue = Arc::new(StreamingRefQueue::new(
        Arc::new(FileRefChannel::open(channel_in(&dir))),
        StreamQueueOptions { poll: Duration::from_millis(5), ..Default::default() },
    ));
    let stop = Arc::new(StopSignal::new());
    let waiter = {
        let (queue, stop) = (Arc::clone(&queue), Arc::clone(&stop));
        std::thread::spawn(move || queue.get_interruptible(4, &stop))
    };
    std::thread::sleep(Duration::from_millis(20));
    stop.set();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(waiter.join().unwrap()).unwrap());
    let got = rx.recv_timeout(Duration::from_secs(30)).expect("the stopped get returned").unwrap();
    assert!(got.is_empty());
    assert!(queue.in_flight_ids().is_empty());
    assert_eq!(queue.depth(), 1, "the buffered ref stays recoverable");
}

#[test]
fn specforges_own_channel_reads_with_its_sidecars_and_its_torn_record_is_never_parsed() {
    let source = fixtures().join("specforge-control");
    let dir = tempfile::tempdir().unwrap();
    for name in ["refs.jsonl", "refs.jsonl.closed", "refs.jsonl.consumed_count", "refs.jsonl.consumer_quantum"] {
        std::fs::copy(source.join(name), dir.path().join(name)).unwrap();
    }
    let channel = FileRefChannel::open(channel_in(&dir));
    let refs = channel.poll(None).unwrap();
    assert_eq!(ids(&refs), ["run0:task0", "run0:task1", "run0:task2", "run0:task0"]);
    // ferry writes each record byte for byte as SpecForge did.
    for (r, line) in refs.iter().zip(fixture_lines()) {
        assert_eq!(sample_ref_to_string(r, JsonStyle::Compact).unwrap(), line);
    }
    assert!(channel.is_closed().unwrap());
    assert_eq!(channel.consumed_remote().unwrap(), 2);
    assert_eq!(channel.seed_consumed().unwrap(), 2);
    assert_eq!(channel.consumer_quantum().unwrap(), Some(2));
    assert!(channel.poll(None).unwrap().is_empty(), "the torn trailing record stays unparsed");
    // The stream ends cleanly at the close without ever parsing the torn record.
    let fresh = FileRefChannel::open(channel_in(&dir));
    let clock = ManualClock::new();
    let all: Vec<SampleRef> = RefStream::new(&fresh, manual_stream(&clock, None)).flat_map(Result::unwrap).collect();
    assert_eq!(all.len(), 4);
}

/// Child role for the cross-process test: appends SpecForge's exact fixture bytes to the channel
/// given in `FERRY_CHANNEL_CHILD`, in small uneven pieces (records split across writes), then
/// writes `.closed`. Runs only when that variable is set.
#[test]
fn child_appends_specforge_bytes() {
    let Ok(path) = std::env::var("FERRY_CHANNEL_CHILD") else { return };
    let bytes: Vec<u8> = fixture_lines().iter().flat_map(|l| format!("{l}\n").into_bytes()).collect();
    let rounds: usize = std::env::var("FERRY_CHANNEL_ROUNDS").unwrap().parse().unwrap();
    let mut file = std::fs::OpenOptions::new().append(true).create(true).open(&path).unwrap();
    for round in 0..rounds {
        for (i, piece) in bytes.chunks(97 + round % 13).enumerate() {
            file.write_all(piece).unwrap();
            if i % 7 == 0 {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
    std::fs::write(format!("{path}.closed"), "").unwrap();
}

/// Starts [`child_appends_specforge_bytes`] in another process on the channel at `path`.
fn spawn_appender(path: &Path, rounds: usize) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_appends_specforge_bytes", "--nocapture"])
        .env("FERRY_CHANNEL_CHILD", path)
        .env("FERRY_CHANNEL_ROUNDS", rounds.to_string())
        .spawn()
        .unwrap()
}

#[test]
fn a_ferry_consumer_reads_specforge_bytes_another_process_is_appending() {
    let dir = tempfile::tempdir().unwrap();
    let path = channel_in(&dir);
    let rounds = 40;
    let mut child = spawn_appender(&path, rounds);
    let queue = StreamingRefQueue::new(
        Arc::new(FileRefChannel::open(&path)),
        StreamQueueOptions {
            poll: Duration::from_millis(1),
            idle_timeout: Some(Duration::from_secs(30)),
            ..Default::default()
        },
    );
    let want: Vec<SampleRef> = fixture_lines().iter().map(|l| sample_ref_from_str(l).unwrap()).collect();
    let mut got = Vec::new();
    loop {
        let batch = queue.get(3, None).unwrap();
        if batch.is_empty() {
            break;
        }
        queue.ack(&batch).unwrap();
        got.extend(batch);
    }
    assert!(child.wait().unwrap().success());
    assert_eq!(got.len(), want.len() * rounds);
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r, &want[i % want.len()], "record {i}");
    }
    assert_eq!(FileRefChannel::open(&path).consumed_remote().unwrap(), got.len() as u64);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// However the bytes of a channel arrive (any split points, with polls in between), a reader
    /// returns exactly the complete records, in order, once each.
    #[test]
    fn any_split_of_the_byte_stream_yields_exactly_the_complete_records(
        count in 1usize..12,
        cuts in proptest::collection::vec(0usize..4000, 0..20),
        torn_tail in 0usize..60,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = channel_in(&dir);
        let refs: Vec<SampleRef> = (0..count).map(|i| sref(&format!("run0:p{i}"))).collect();
        let mut bytes: Vec<u8> = refs
            .iter()
            .flat_map(|r| format!("{}\n", sample_ref_to_string(r, JsonStyle::Compact).unwrap()).into_bytes())
            .collect();
        let full = bytes.len();
        bytes.extend_from_slice(&b"{\"sample_id\":\"run0:torn\",\"run_id\":\"run0\",\"source_task_id\":null"[..torn_tail]);
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
        cuts.push(bytes.len());
        cuts.sort_unstable();
        let reader = FileRefChannel::open(&path);
        let mut file = std::fs::OpenOptions::new().append(true).create(true).open(&path).unwrap();
        let mut at = 0;
        let mut got = Vec::new();
        for cut in cuts {
            file.write_all(&bytes[at..cut]).unwrap();
            at = cut;
            got.extend(reader.poll(None).unwrap());
        }
        prop_assert_eq!(&got, &refs);
        prop_assert!(at >= full);
    }
}

#[test]
fn a_ferry_distributor_consumes_specforge_bytes_another_process_is_appending() {
    use ferry_control::controller::{ControllerOptions, DataFlowController};
    use ferry_control::distributor::{DistributorOptions, RefDistributor, file_inboxes};
    use ferry_control::ledger::SqliteLedger;

    let dir = tempfile::tempdir().unwrap();
    let path = channel_in(&dir);
    let rounds = 30;
    let mut child = spawn_appender(&path, rounds);
    let ledger = Arc::new(SqliteLedger::open_fresh(dir.path().join("consumer.sqlite")).unwrap());
    let controller = Arc::new(DataFlowController::new(ControllerOptions::new("run0"), ledger));
    let inboxes: Vec<Arc<dyn RefSink>> =
        file_inboxes(&dir.path().join("inboxes"), 1).unwrap().into_iter().map(|i| i as Arc<dyn RefSink>).collect();
    let options = DistributorOptions { poll: Duration::from_millis(1), ..DistributorOptions::new(1, 1) };
    let distributor =
        RefDistributor::new(Arc::new(FileRefChannel::open(&path)), controller, inboxes, None, options).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !distributor.finished() {
        assert!(std::time::Instant::now() < deadline, "the distributor did not reach the end of the stream");
        if !distributor.pump().unwrap() {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    assert!(child.wait().unwrap().success());
    // Three distinct samples, each dispatched once; every other record is a duplicate, settled
    // at once; the torn record SpecForge left is never parsed.
    let inbox = FileRefChannel::inbox(&dir.path().join("inboxes"), 0);
    let got = inbox.poll(None).unwrap();
    let want: Vec<SampleRef> = fixture_lines()[..3].iter().map(|l| sample_ref_from_str(l).unwrap()).collect();
    assert_eq!(got, want);
    let inbox_bytes = std::fs::read_to_string(dir.path().join("inboxes/inbox-rank0.jsonl")).unwrap();
    assert_eq!(inbox_bytes, format!("{}\n", fixture_lines()[..3].join("\n")), "SpecForge's records, byte for byte");
    let records = (fixture_lines().len() * rounds) as u64;
    assert_eq!(distributor.stats().duplicates, records - 3);
    let source = FileRefChannel::open(&path);
    assert_eq!(source.consumed_remote().unwrap(), records - 3);
    inbox.mark_consumed(3).unwrap();
    distributor.pump().unwrap();
    assert_eq!(source.consumed_remote().unwrap(), records, "every record settled exactly once");
    // The distributor commits records without building refs; the ledger's rows are still
    // SpecForge's own, byte for byte (compare with the ledger SpecForge wrote for these refs).
    let theirs = dir.path().join("specforge-ledger.db");
    std::fs::copy(fixtures().join("specforge-control/ledger.db"), &theirs).unwrap();
    let rows = |db: &Path| -> Vec<(String, String)> {
        let conn = rusqlite::Connection::open(db).unwrap();
        let mut stmt = conn.prepare("SELECT sample_id, ref_json FROM committed ORDER BY rowid").unwrap();
        stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?))).unwrap().map(Result::unwrap).collect()
    };
    assert_eq!(rows(&dir.path().join("consumer.sqlite")), rows(&theirs));
}

#[test]
fn a_record_that_is_not_a_valid_ref_stops_the_distributor_before_the_ledger() {
    use ferry_control::controller::{ControllerOptions, DataFlowController};
    use ferry_control::distributor::{DistributorOptions, RefDistributor, file_inboxes};
    use ferry_control::ledger::{Ledger, SqliteLedger};

    let good = fixture_lines()[0].clone();
    for (bad, names) in [
        (good.replacen("\"strategy\"", "\"strategee\"", 1), "strategee"),
        (good.replacen("\"num_tokens\":4", "\"num_tokens\":\"four\"", 1), "four"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(channel_in(&dir), format!("{good}\n{bad}\n")).unwrap();
        let ledger = Arc::new(SqliteLedger::open_fresh(dir.path().join("consumer.sqlite")).unwrap());
        let controller = Arc::new(DataFlowController::new(ControllerOptions::new("run0"), ledger.clone()));
        let inboxes: Vec<Arc<dyn RefSink>> =
            file_inboxes(&dir.path().join("inboxes"), 1).unwrap().into_iter().map(|i| i as Arc<dyn RefSink>).collect();
        let distributor = RefDistributor::new(
            Arc::new(FileRefChannel::open(channel_in(&dir))),
            controller,
            inboxes,
            None,
            DistributorOptions::new(1, 1),
        )
        .unwrap();
        // The good record before it is committed and dispatched; the bad one never reaches the
        // ledger, so a restart can always read the ledger back.
        distributor.pump().unwrap();
        let err = distributor.pump().unwrap_err().to_string();
        let offset = good.len() + 1;
        assert!(err.contains(names) && err.contains(&format!("at byte {offset}")), "{err}");
        assert_eq!(ledger.committed_count().unwrap(), 1);
        assert!(ledger.get_committed(&SampleId::new("run0:task0")).unwrap().is_some());
    }
}

#[test]
fn failing_refs_that_are_not_in_flight_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let producer = FileRefChannel::open(channel_in(&dir));
    producer.publish_batch(&[sref("s0"), sref("s1")]).unwrap();
    let clock = ManualClock::new();
    let queue = queue_over(&channel_in(&dir), &clock, None);
    let got = queue.get(1, None).unwrap();
    queue.fail(&got, "x", false).unwrap();
    assert_eq!(producer.consumed_remote().unwrap(), 1);
    // Twice, or a ref never leased: an error, and neither the counter nor the buffer moves.
    for bad in [got.clone(), vec![sref("never")]] {
        for retryable in [false, true] {
            let err = queue.fail(&bad, "x", retryable).unwrap_err();
            assert!(err.to_string().contains("not in flight"), "{err}");
        }
    }
    assert_eq!(producer.consumed_remote().unwrap(), 1);
    assert_eq!(queue.depth(), 1, "only s1 is buffered");
}

#[test]
fn a_reader_whose_channel_was_replaced_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = channel_in(&dir);
    let producer = FileRefChannel::open(&path);
    producer.publish(&sref("s0")).unwrap();
    let reader = FileRefChannel::open(&path);
    assert_eq!(reader.poll(None).unwrap().len(), 1);
    producer.remove_files().unwrap();
    let err = reader.poll(None).unwrap_err();
    assert!(err.to_string().contains("was deleted"), "{err}");
    let reader = FileRefChannel::open(&path);
    FileRefChannel::open(&path).publish(&sref("s1")).unwrap();
    assert_eq!(reader.poll(None).unwrap().len(), 1);
    std::fs::remove_file(&path).unwrap();
    FileRefChannel::open(&path).publish(&sref("s2")).unwrap();
    let err = reader.poll(None).unwrap_err();
    assert!(err.to_string().contains("was replaced"), "{err}");
}
