//! `ferry produce` and `ferry consume` as separate processes over a shared control directory
//! and a shared-directory store: every produced sample is trained exactly once, with the bytes
//! the producer put (checksums), the sentinels say how it ended, and nothing is left in the
//! store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Starts `ferry produce` (configured by `configure`) and waits until it claimed the fresh
/// channel, so that a consumer started next never meets an unclaimed control directory.
fn start_producer(control: &Path, configure: impl FnOnce(&mut Command)) -> std::process::Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
    configure(&mut cmd);
    let child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !control.join("refs.jsonl.producer_claim").exists() {
        assert!(Instant::now() < deadline, "the producer never claimed the channel");
        std::thread::sleep(Duration::from_millis(2));
    }
    child
}

#[test]
fn a_producer_and_a_consumer_process_train_every_sample_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control");
    let store = format!("dir://{}", dir.path().join("store").display());
    let control_arg = control.display().to_string();
    let producer = start_producer(&control, |cmd| {
        cmd.args(["produce", "--control", &control_arg, "--store", &store, "--samples", "24", "--epochs", "2"])
            .args(["--seq-len", "32", "--hidden", "32", "--workers", "2", "--lease", "3"])
            .args(["--high-watermark", "8", "--peer-timeout", "60", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
    });
    let consumed_path = dir.path().join("consumed.jsonl");
    let consumer = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["consume", "--control", &control_arg, "--store", &store, "--dp", "2", "--batch", "2", "--accum", "2"])
        .args(["--idle-timeout", "60", "--json", "--checksums"])
        .arg(&consumed_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let consumer = finish(consumer, "the consumer");
    assert!(consumer.status.success(), "consumer: {}", String::from_utf8_lossy(&consumer.stderr));
    let producer = finish(producer, "the producer");
    assert!(producer.status.success(), "producer: {}", String::from_utf8_lossy(&producer.stderr));
    let report: serde_json::Value = serde_json::from_slice(&producer.stdout).unwrap();
    assert_eq!(report["published"], 48);
    assert!(report["max_in_flight"].as_u64().unwrap() <= 8 + 2 * 3, "{report}");

    let produced: BTreeMap<String, u64> = checksums(&control.join("produced-checksums.jsonl")).into_iter().collect();
    let consumed = checksums(&consumed_path);
    assert_eq!(produced.len(), 48);
    assert_eq!(consumed.len(), 48, "48 = 6 optimizer windows of 8: nothing dropped");
    let mut seen = BTreeMap::new();
    for (id, sum) in &consumed {
        *seen.entry(id.clone()).or_insert(0) += 1;
        assert_eq!(produced.get(id), Some(sum), "{id}: trained bytes differ from what was produced");
    }
    assert!(seen.values().all(|&n| n == 1), "each sample trained once");
    assert!(control.join("refs.jsonl.closed").exists() && control.join("refs.jsonl.consumer_done").exists());
    assert!(!control.join("refs.jsonl.failed").exists() && !control.join("refs.jsonl.consumer_failed").exists());
    assert_eq!(std::fs::read_to_string(control.join("refs.jsonl.consumed_count")).unwrap(), "48");
    assert_eq!(files_under(&dir.path().join("store")), Vec::<String>::new(), "every feature deleted");
}

#[test]
fn a_consumer_without_a_producer_fails_at_its_idle_timeout_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control");
    std::fs::create_dir_all(&control).unwrap();
    let store = format!("dir://{}", dir.path().join("store").display());
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["consume", "--control", &control.display().to_string(), "--store", &store, "--dp", "1"])
        .args(["--idle-timeout", "0.2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = finish(out, "the consumer");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("online consumer failed") && stderr.contains("timed out") && stderr.contains("dead?"),
        "{stderr}"
    );
    assert!(control.join("refs.jsonl.consumer_failed").exists());
}

#[test]
fn consumer_ranks_can_be_separate_processes() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control");
    let control_arg = control.display().to_string();
    let store = format!("dir://{}", dir.path().join("store").display());
    let producer = start_producer(&control, |cmd| {
        cmd.args(["produce", "--control", &control_arg, "--store", &store, "--samples", "16"])
            .args(["--seq-len", "16", "--hidden", "16", "--high-watermark", "8", "--peer-timeout", "60"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
    });
    let group = format!("unix://{}", dir.path().join("group.sock").display());
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            Command::new(env!("CARGO_BIN_EXE_ferry"))
                .args([
                    "consume",
                    "--control",
                    &control_arg,
                    "--store",
                    &store,
                    "--dp",
                    "2",
                    "--batch",
                    "2",
                    "--accum",
                    "1",
                ])
                .args(["--idle-timeout", "60", "--rank", &rank.to_string(), "--group", &group, "--checksums"])
                .arg(dir.path().join(format!("rank{rank}.jsonl")))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (rank, child) in ranks.into_iter().enumerate() {
        let out = finish(child, "a consumer rank");
        assert!(out.status.success(), "rank {rank}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let out = finish(producer, "the producer");
    assert!(out.status.success(), "producer: {}", String::from_utf8_lossy(&out.stderr));
    let produced: BTreeMap<String, u64> = checksums(&control.join("produced-checksums.jsonl")).into_iter().collect();
    let mut seen = BTreeMap::new();
    for rank in 0..2 {
        let mine = checksums(&dir.path().join(format!("rank{rank}.jsonl")));
        assert_eq!(mine.len(), 8, "each rank trains half");
        for (id, sum) in mine {
            assert_eq!(produced.get(&id), Some(&sum));
            assert!(seen.insert(id, rank).is_none(), "a sample trained twice");
        }
    }
    assert_eq!(seen.len(), 16);
}

/// The ids the consumer's SQLite ledger has durably acknowledged.
fn acked(ledger: &Path) -> std::collections::BTreeSet<String> {
    let conn = rusqlite::Connection::open(ledger).unwrap();
    let mut stmt = conn.prepare("SELECT sample_id FROM acked").unwrap();
    stmt.query_map([], |row| row.get::<_, String>(0)).unwrap().map(Result::unwrap).collect()
}

#[test]
fn a_crashed_consumer_resumes_and_never_trains_a_durably_acknowledged_sample_again() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control");
    let control_arg = control.display().to_string();
    let store = format!("dir://{}", dir.path().join("store").display());
    let producer = start_producer(&control, |cmd| {
        cmd.args(["produce", "--control", &control_arg, "--store", &store, "--samples", "32"])
            .args(["--seq-len", "16", "--hidden", "16", "--high-watermark", "8", "--peer-timeout", "60"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
    });
    let consume = |extra: &[&str], checksums: &Path| {
        let child = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args([
                "consume",
                "--control",
                &control_arg,
                "--store",
                &store,
                "--dp",
                "2",
                "--batch",
                "2",
                "--accum",
                "1",
            ])
            .args(["--idle-timeout", "60"])
            .args(extra)
            .arg("--checksums")
            .arg(checksums)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        finish(child, "a consumer attempt")
    };
    // The first attempt crashes right after the durable ack (and checkpoint) of step 3.
    let crashed = consume(&["--fault", "after-checkpoint:3"], &dir.path().join("first.jsonl"));
    assert!(!crashed.status.success(), "the injected crash");
    let durable = acked(&control.join("consumer/consumer.sqlite"));
    assert_eq!(durable.len(), 12, "3 steps of 4 samples were durable at the crash");
    let resumed = consume(&["--resume"], &dir.path().join("second.jsonl"));
    assert!(resumed.status.success(), "resume: {}", String::from_utf8_lossy(&resumed.stderr));
    let out = finish(producer, "the producer");
    assert!(out.status.success(), "producer: {}", String::from_utf8_lossy(&out.stderr));

    let produced: BTreeMap<String, u64> = checksums(&control.join("produced-checksums.jsonl")).into_iter().collect();
    let second = checksums(&dir.path().join("second.jsonl"));
    for (id, sum) in &second {
        assert!(!durable.contains(id), "{id} was trained again after its durable ack");
        assert_eq!(produced.get(id), Some(sum));
    }
    let all = acked(&control.join("consumer/consumer.sqlite"));
    assert_eq!(all.len(), 32, "every sample durably acknowledged");
    assert_eq!(second.len(), 20);
    assert_eq!(std::fs::read_to_string(control.join("refs.jsonl.consumed_count")).unwrap(), "32");
    assert!(control.join("refs.jsonl.consumer_done").exists());
    assert_eq!(files_under(&dir.path().join("store")), Vec::<String>::new(), "every feature deleted");
}

#[test]
fn producer_and_consumer_processes_share_a_ferry_serve_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &["--retain-on-release"]);
    let uri = daemon.uri();
    let control = dir.path().join("control");
    let control_arg = control.display().to_string();
    let producer = start_producer(&control, |cmd| {
        cmd.args(["produce", "--control", &control_arg, "--store", &uri, "--samples", "16"])
            .args(["--seq-len", "64", "--hidden", "64", "--high-watermark", "8", "--peer-timeout", "60"])
            .env_remove("FERRY_AUTH_TOKEN")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
    });
    let consumed_path = dir.path().join("consumed.jsonl");
    let consumer = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["consume", "--control", &control_arg, "--store", &uri, "--dp", "2", "--batch", "2", "--accum", "2"])
        .args(["--idle-timeout", "60", "--checksums"])
        .arg(&consumed_path)
        .env_remove("FERRY_AUTH_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let consumer = finish(consumer, "the consumer");
    assert!(consumer.status.success(), "consumer: {}", String::from_utf8_lossy(&consumer.stderr));
    let out = finish(producer, "the producer");
    assert!(out.status.success(), "producer: {}", String::from_utf8_lossy(&out.stderr));
    let produced: BTreeMap<String, u64> = checksums(&control.join("produced-checksums.jsonl")).into_iter().collect();
    let consumed = checksums(&consumed_path);
    assert_eq!(consumed.len(), 16);
    let distinct: std::collections::BTreeSet<&String> = consumed.iter().map(|(id, _)| id).collect();
    assert_eq!(distinct.len(), 16, "each sample trained once");
    assert!(consumed.iter().all(|(id, sum)| produced.get(id) == Some(sum)));
    daemon.assert_empty();
}
