//! Consumer crashes (SpecForge §14.3-§14.4), with real processes and SIGKILL. A producer
//! publishes samples into a shared-directory store and the channel; a consumer process (its DP
//! ranks are threads, rank 0 runs the distributor and the SQLite ledger) trains optimizer steps
//! and is killed before, during (a write transaction open on the ledger) or after the durable
//! acknowledgement of a step; a new process resumes from the ledger and the trainer's checkpoint,
//! possibly with a different DP size. Every test ends with: every sample durably acknowledged
//! exactly once (never dispatched again after its acknowledgement), none lost, the producer's
//! consumed counter equal to what it published, and every feature deleted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use ferry_control::channel::{FileRefChannel, RefSink, RefSource};
use ferry_control::collective::{Collective, LocalGroup};
use ferry_control::ledger::{Ledger, SqliteLedger};
use ferry_control::online::{ConsumerConfig, RankStream, setup_rank0};
use ferry_core::{JsonMap, SampleId, TensorView};
use ferry_store::{FeatureStoreApi, StoreOptions, open_store};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(60);
const SAMPLES: usize = 24;

fn store_at(dir: &Path) -> Arc<dyn FeatureStoreApi> {
    let options = StoreOptions { store_id: Some("crash".into()), retain_on_release: true, ..StoreOptions::default() };
    Arc::new(open_store(&format!("dir://{}", dir.join("store").display()), options).unwrap())
}

fn config(dir: &Path, dp: usize, batch: usize, resume: bool, checkpoint_step: i64) -> ConsumerConfig {
    ConsumerConfig {
        run_id: "crash".into(),
        channel: dir.join("control/refs.jsonl"),
        inbox_dir: dir.join("state/inboxes"),
        ledger: dir.join("state/consumer.sqlite"),
        dp_size: dp,
        batch_size: batch,
        accumulation: 1,
        resume,
        checkpoint_step,
        idle_timeout: Some(DEADLINE),
        poll: Duration::from_millis(1),
    }
}

fn checkpoint_path(dir: &Path) -> PathBuf {
    dir.join("state/checkpoint")
}

fn read_checkpoint(dir: &Path) -> i64 {
    std::fs::read_to_string(checkpoint_path(dir)).map_or(0, |s| s.trim().parse().unwrap())
}

/// Child role: one consumer attempt in `FERRY_CRASH_DIR` with `FERRY_CRASH_DP` ranks, resuming
/// when a checkpoint exists. `FERRY_CRASH_AT=<point>:<step>` stops at that step (`before`,
/// `during`, `after` its durable ack, or `unsaved`: after the ack, before the checkpoint), prints
/// `@@stopped` and waits to be killed. Otherwise it trains to the end and prints `@@done`.
#[test]
fn child_consumer_attempt() {
    let Ok(dir) = std::env::var("FERRY_CRASH_DIR") else { return };
    let dir = PathBuf::from(dir);
    let dp: usize = std::env::var("FERRY_CRASH_DP").unwrap().parse().unwrap();
    let batch: usize = std::env::var("FERRY_CRASH_BATCH").unwrap().parse().unwrap();
    let crash = std::env::var("FERRY_CRASH_AT").ok().map(|spec| {
        let (point, step) = spec.split_once(':').unwrap();
        (point.to_owned(), step.parse::<i64>().unwrap())
    });
    let resume = dir.join("state/consumer.sqlite").exists();
    let checkpoint = read_checkpoint(&dir);
    let config = config(&dir, dp, batch, resume, checkpoint);
    let store = store_at(&dir);
    let rank0 = match setup_rank0(&config, Some(Arc::clone(&store))) {
        Ok(rank0) => rank0,
        Err(e) => {
            println!("@@refused {e}");
            return;
        }
    };
    let distributor = rank0.distributor.start().unwrap();
    let groups = LocalGroup::new(dp, DEADLINE);
    let threads: Vec<_> = groups
        .into_iter()
        .enumerate()
        .map(|(rank, group)| {
            let controller = (rank == 0).then(|| Arc::clone(&rank0.controller));
            let mut stream =
                RankStream::new(&config, Arc::new(group) as Arc<dyn Collective>, controller, Some(Arc::clone(&store)))
                    .unwrap();
            let (dir, crash, ledger) = (dir.clone(), crash.clone(), config.ledger.clone());
            std::thread::spawn(move || {
                while let Some(step) = stream.next_step().unwrap() {
                    let ids: Vec<SampleId> = step.iter().flatten().map(|r| r.sample_id.clone()).collect();
                    let next = stream.global_step() + 1;
                    let stop_here = |point: &str| crash.as_ref().is_some_and(|(p, s)| p == point && *s == next);
                    if rank == 0 && stop_here("before") {
                        stop();
                    }
                    if rank == 0 && stop_here("during") {
                        // The durable ack's transaction, half written, when the process dies.
                        let conn = rusqlite::Connection::open(&ledger).unwrap();
                        conn.busy_timeout(DEADLINE).unwrap();
                        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
                        for id in &ids {
                            conn.execute("INSERT OR IGNORE INTO acked (sample_id) VALUES (?1)", [id.as_str()]).unwrap();
                        }
                        conn.execute(
                            "INSERT OR REPLACE INTO marker (k, v) VALUES ('global_step', ?1)",
                            [next.to_string()],
                        )
                        .unwrap();
                        stop();
                    }
                    stream.commit_step(&ids).unwrap();
                    if rank == 0 {
                        if stop_here("unsaved") {
                            stop();
                        }
                        let tmp = dir.join("state/checkpoint.tmp");
                        std::fs::write(&tmp, stream.global_step().to_string()).unwrap();
                        std::fs::rename(&tmp, checkpoint_path(&dir)).unwrap();
                        if stop_here("after") {
                            stop();
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    distributor.stop().unwrap();
    rank0.distributor.pump().unwrap(); // the last acknowledgements reach the producer's counter
    FileRefChannel::open(&config.channel).mark_consumer_done().unwrap();
    println!("@@done");
}

/// Tells the parent and waits to be SIGKILLed.
fn stop() -> ! {
    println!("@@stopped");
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Runs one attempt with `dp` ranks of `batch` refs per step; returns the line it ended with
/// (`stopped`, `done`, `refused ...`), after killing it with SIGKILL when it stopped.
fn attempt(dir: &Path, (dp, batch): (usize, usize), crash: Option<&str>) -> String {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "child_consumer_attempt", "--nocapture", "--test-threads", "1"])
        .env("FERRY_CRASH_DIR", dir)
        .env("FERRY_CRASH_DP", dp.to_string())
        .env("FERRY_CRASH_BATCH", batch.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(crash) = crash {
        cmd.env("FERRY_CRASH_AT", crash);
    }
    let mut child: Child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if let Some((_, tagged)) = line.split_once("@@") {
                let _ = tx.send(tagged.to_owned());
            }
        }
    });
    let outcome = rx.recv_timeout(DEADLINE).unwrap_or_else(|_| {
        let _ = child.kill();
        panic!("attempt {crash:?} with dp {dp} neither stopped nor finished within the deadline");
    });
    if outcome == "stopped" {
        child.kill().unwrap(); // SIGKILL
    }
    let status = child.wait().unwrap();
    assert!(outcome == "stopped" || status.success(), "attempt {crash:?} failed: {status}");
    outcome
}

/// The producer: `SAMPLES` samples in the store and the channel, then a clean end of stream.
fn produce(dir: &Path) -> BTreeSet<String> {
    produce_with_duplicates(dir, 0)
}

/// [`produce`], publishing the first `duplicates` refs a second time (an at-least-once
/// producer's retries) right after the originals.
fn produce_with_duplicates(dir: &Path, duplicates: usize) -> BTreeSet<String> {
    let store = store_at(dir);
    let channel = FileRefChannel::open(dir.join("control/refs.jsonl"));
    std::fs::create_dir_all(dir.join("control")).unwrap();
    let mut ids = BTreeSet::new();
    for i in 0..SAMPLES {
        let data: Vec<i64> = (0..8).map(|v| v + i as i64).collect();
        let sid = format!("crash:{i:03}");
        let r =
            store.put(&sid, &[("input_ids", TensorView::from_elements(&[8], &data).unwrap())], JsonMap::new()).unwrap();
        channel.publish(&r).unwrap();
        if i < duplicates {
            channel.publish(&r).unwrap();
        }
        ids.insert(sid);
    }
    channel.close().unwrap();
    ids
}

/// The ledger's acknowledged ids.
fn acked(dir: &Path) -> BTreeSet<String> {
    let ledger = SqliteLedger::open_existing(dir.join("state/consumer.sqlite")).unwrap();
    ledger.durable_marker().unwrap().acked.iter().map(|id| id.to_string()).collect()
}

/// Every ref the attempt's distributor dispatched (the inboxes, read before the next attempt
/// deletes them).
fn dispatched(dir: &Path, dp: usize) -> BTreeSet<String> {
    (0..dp)
        .flat_map(|rank| FileRefChannel::inbox(&dir.join("state/inboxes"), rank).poll(None).unwrap())
        .map(|r| r.sample_id.to_string())
        .collect()
}

/// Runs the attempts (`((dp, batch), crash point)`, the last one without a crash), checks the
/// exactly-once outcome and returns how many samples each attempt dispatched and how many were
/// durably acknowledged after it.
fn crash_and_recover(attempts: &[((usize, usize), Option<&str>)]) -> Vec<(usize, usize)> {
    crash_and_recover_with_duplicates(attempts, 0)
}

/// [`crash_and_recover`] with the first `duplicates` refs published twice.
fn crash_and_recover_with_duplicates(
    attempts: &[((usize, usize), Option<&str>)],
    duplicates: usize,
) -> Vec<(usize, usize)> {
    let mut trace = Vec::new();
    let dir = tempfile::tempdir().unwrap();
    let published = produce_with_duplicates(dir.path(), duplicates);
    let mut durable_before = BTreeSet::new();
    for (i, (shape, crash)) in attempts.iter().enumerate() {
        let outcome = attempt(dir.path(), *shape, *crash);
        let expected = if crash.is_some() { "stopped" } else { "done" };
        assert_eq!(outcome, expected, "attempt {i}");
        let sent = dispatched(dir.path(), shape.0);
        let retrained: Vec<&String> = sent.intersection(&durable_before).collect();
        assert!(
            retrained.is_empty(),
            "attempt {i} dispatched samples an earlier attempt durably trained: {retrained:?}"
        );
        durable_before = acked(dir.path());
        trace.push((sent.len(), durable_before.len()));
    }
    assert_eq!(durable_before, published, "every sample durably acknowledged, none lost");
    let channel = FileRefChannel::open(dir.path().join("control/refs.jsonl"));
    assert_eq!(channel.consumed_remote().unwrap(), (SAMPLES + duplicates) as u64, "each record settled exactly once");
    assert!(channel.consumer_stopped().unwrap());
    let store = store_at(dir.path());
    // The store keeps a directory per store id and its generation counter; no sample file may
    // remain.
    let leftover: Vec<PathBuf> = walk(&dir.path().join("store"))
        .into_iter()
        .filter(|p| p.file_name().is_none_or(|n| n != ".ferry-generation"))
        .collect();
    assert_eq!(store.health().unwrap().resident_samples, 0);
    assert!(leftover.is_empty(), "every feature deleted, found {leftover:?}");
    let marker =
        SqliteLedger::open_existing(dir.path().join("state/consumer.sqlite")).unwrap().durable_marker().unwrap();
    assert_eq!(marker.global_step, Some(read_checkpoint(dir.path())), "the ledger's step is the checkpoint's");
    trace
}

/// Every file under `root`.
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(root).unwrap().filter_map(Result::ok) {
        let path = entry.path();
        if path.is_dir() { files.extend(walk(&path)) } else { files.push(path) }
    }
    files
}

#[test]
fn a_consumer_killed_before_a_durable_ack_replays_that_step() {
    // Steps 1-2 (8 samples) are durable; step 3 was dispatched but not acknowledged: replayed.
    assert_eq!(crash_and_recover(&[((2, 2), Some("before:3")), ((2, 2), None)]), [(24, 8), (16, 24)]);
}

#[test]
fn a_consumer_killed_inside_the_durable_ack_transaction_loses_nothing_of_it() {
    // The half-written transaction of step 2 never happened: only step 1 is durable.
    assert_eq!(crash_and_recover(&[((2, 2), Some("during:2")), ((2, 2), None)]), [(24, 4), (20, 24)]);
}

#[test]
fn a_consumer_killed_after_a_durable_ack_never_trains_those_samples_again() {
    assert_eq!(crash_and_recover(&[((2, 2), Some("after:3")), ((2, 2), None)]), [(24, 12), (12, 24)]);
}

#[test]
fn repeated_crashes_at_every_point_still_train_each_sample_once() {
    let dp2 = (2, 2);
    let trace = crash_and_recover(&[
        (dp2, Some("after:1")),
        (dp2, Some("before:2")),
        (dp2, Some("during:3")),
        (dp2, Some("after:4")),
        (dp2, None),
    ]);
    // Durable after each attempt: step 1, step 1 again, step 2 (step 3 was cut mid-transaction;
    // the checkpoint then stood at 2), step 3 of that attempt, then the rest.
    let durable: Vec<usize> = trace.iter().map(|(_, d)| *d).collect();
    assert_eq!(durable, [4, 4, 8, 16, 24]);
}

#[test]
fn a_crash_with_dp_2_resumes_as_dp_3_repartitioning_the_ref_plane() {
    // The global batch (the dispatch quantum, 6) stays; the ranks change: dp 2 x 3 refs, then
    // dp 3 x 2 refs. 2 steps trained with dp 2, the 12 left are 2 steps with dp 3.
    assert_eq!(crash_and_recover(&[((2, 3), Some("after:2")), ((3, 2), None)]), [(24, 12), (12, 24)]);
    assert_eq!(crash_and_recover(&[((2, 3), Some("before:3")), ((3, 2), None)]), [(24, 12), (12, 24)]);
    assert_eq!(crash_and_recover(&[((2, 3), Some("during:2")), ((3, 2), None)]), [(24, 6), (18, 24)]);
}

#[test]
fn a_durable_ack_newer_than_the_checkpoint_makes_the_attempt_refuse_to_resume() {
    let dir = tempfile::tempdir().unwrap();
    produce(dir.path());
    assert_eq!(attempt(dir.path(), (2, 2), Some("unsaved:2")), "stopped");
    let outcome = attempt(dir.path(), (2, 2), None);
    assert!(outcome.starts_with("refused") && outcome.contains("ahead of checkpoint step 1"), "{outcome}");
}

#[test]
fn duplicate_records_replayed_by_a_resume_never_push_the_counter_past_what_was_published() {
    // An at-least-once producer published 5 refs twice: the first attempt settles those
    // duplicates, and the resumed one reads them again.
    for crash in ["before:2", "after:2", "during:3"] {
        crash_and_recover_with_duplicates(&[((2, 2), Some(crash)), ((2, 2), None)], 5);
    }
}
