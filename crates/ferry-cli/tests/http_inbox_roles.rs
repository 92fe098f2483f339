//! `ferry consume` with SpecForge's HTTP inbox relay: rank 0 serves every rank's inbox
//! (`--inbox-serve`, port 0 reported on stderr) and a rank in another process, whose control
//! and state directories are its own (nothing shared with rank 0 but the store), trains its
//! share by reading its inbox over HTTP (`DISAGG_INBOX_SERVER_URL`). Every produced sample is
//! trained exactly once, with the bytes the producer put.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Starts `ferry produce` for `samples` samples and waits until it claimed the channel.
fn start_producer(dir: &Path, samples: u32, extra: &[&str]) -> Guard {
    let control = dir.join("control");
    let store = format!("dir://{}", dir.join("store").display());
    let mut cmd = ferry();
    cmd.args(["produce", "--control", &control.display().to_string(), "--store", &store])
        .args(["--samples", &samples.to_string(), "--seq-len", "16", "--hidden", "16"])
        .args(["--high-watermark", "8", "--peer-timeout", "60"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let producer = Guard::new(cmd.spawn().unwrap());
    wait_for_file(&control.join("refs.jsonl.producer_claim"), "the producer's claim");
    producer
}

/// The consumer's shape: 2 ranks x batches of 2, one micro-batch per step (windows of 4).
const SHAPE: [&str; 6] = ["--dp", "2", "--batch", "2", "--accum", "1"];

/// Rank 0 of a 2-process consumer over `dir`'s control directory, serving the inboxes on an
/// ephemeral port; returns it, the origin it printed, and (at its exit) the rest of its stderr.
fn start_rank0(dir: &Path, extra: &[&str]) -> (Guard, String, mpsc::Receiver<String>) {
    let mut cmd = ferry();
    cmd.args(["consume", "--control", &dir.join("control").display().to_string()])
        .args(["--store", &format!("dir://{}", dir.join("store").display())])
        .args(SHAPE)
        .args(["--rank", "0", "--group", &group(dir), "--inbox-serve", "http://127.0.0.1:0", "--checksums"])
        .arg(dir.join("rank0.jsonl"))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut rank0 = Guard::new(cmd.spawn().unwrap());
    let (origin, stderr) = relay_origin(&mut rank0);
    assert!(origin.starts_with("http://127.0.0.1:") && !origin.ends_with(":0"), "{origin}");
    (rank0, origin, stderr)
}

/// Rank 1, whose control and state directories (under `<dir>/node1`) are its own: its inbox
/// can only come over HTTP, from `origin` (given as SpecForge's launcher does, in the
/// environment).
fn start_rank1(dir: &Path, origin: &str, extra: &[&str]) -> Guard {
    let elsewhere = dir.join("node1");
    let mut cmd = ferry();
    cmd.args(["consume", "--control", &elsewhere.join("control").display().to_string()])
        .args(["--state", &elsewhere.join("state").display().to_string()])
        .args(["--store", &format!("dir://{}", dir.join("store").display())])
        .args(SHAPE)
        .args(["--rank", "1", "--group", &group(dir), "--checksums"])
        .arg(dir.join("rank1.jsonl"))
        .args(extra)
        .env("DISAGG_INBOX_SERVER_URL", origin)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    Guard::new(cmd.spawn().unwrap())
}

fn group(dir: &Path) -> String {
    format!("unix://{}", dir.join("group.sock").display())
}

/// The relay origin rank 0 prints on stderr; the rest of stderr arrives on the receiver.
fn relay_origin(child: &mut Guard) -> (String, mpsc::Receiver<String>) {
    let stderr = child.child().stderr.take().unwrap();
    let (origin_tx, origin_rx) = mpsc::channel();
    let (rest_tx, rest_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stderr);
        let mut seen = String::new();
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            if let Some(at) = line.find(" at http://") {
                let origin = line[at + 4..].split_whitespace().next().unwrap_or_default().to_owned();
                let _ = origin_tx.send(origin);
            }
            seen.push_str(&line);
            line.clear();
        }
        let mut rest = String::new();
        let _ = reader.read_to_string(&mut rest);
        let _ = rest_tx.send(seen + &rest);
    });
    let origin = origin_rx.recv_timeout(ROLE_DEADLINE).expect("rank 0 printed its relay origin");
    (origin, rest_rx)
}

#[test]
fn a_rank_without_the_shared_directories_trains_over_the_http_relay() {
    let dir = tempfile::tempdir().unwrap();
    let producer = start_producer(dir.path(), 16, &[]);
    let (rank0, origin, rank0_stderr) = start_rank0(dir.path(), &["--idle-timeout", "60"]);
    let rank1 = succeed(start_rank1(dir.path(), &origin, &["--idle-timeout", "60"]), "rank 1");
    let elsewhere = dir.path().join("node1");
    let rank0 = rank0.finish("rank 0");
    let stderr0 = rank0_stderr.recv_timeout(ROLE_DEADLINE).unwrap_or_default();
    assert!(rank0.status.success(), "rank 0: {stderr0}\nrank 1: {}", String::from_utf8_lossy(&rank1.stderr));
    succeed(producer, "the producer");

    let produced: BTreeMap<String, u64> =
        checksums(&dir.path().join("control/produced-checksums.jsonl")).into_iter().collect();
    let mut seen = BTreeMap::new();
    for rank in 0..2 {
        let mine = checksums(&dir.path().join(format!("rank{rank}.jsonl")));
        assert_eq!(mine.len(), 8, "rank {rank} trains half");
        for (id, sum) in mine {
            assert_eq!(produced.get(&id), Some(&sum), "{id}: trained bytes differ from what was produced");
            assert!(seen.insert(id, rank).is_none(), "a sample trained twice");
        }
    }
    assert_eq!(seen.len(), 16);
    // Rank 1 acknowledged through the relay: rank 1's counter sits beside rank 0's inbox files.
    let inboxes = dir.path().join("control/consumer/inboxes");
    assert_eq!(std::fs::read_to_string(inboxes.join("inbox-rank1.jsonl.consumed_count")).unwrap(), "8");
    assert!(!elsewhere.join("state/inboxes").exists(), "rank 1 never touched a local inbox");
    let control = dir.path().join("control");
    assert!(control.join("refs.jsonl.consumer_done").exists() && !control.join("refs.jsonl.consumer_failed").exists());
    assert_eq!(std::fs::read_to_string(control.join("refs.jsonl.consumed_count")).unwrap(), "16");
}

#[test]
fn ranks_as_threads_can_read_over_the_relay_and_flags_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let producer = start_producer(dir.path(), 8, &[]);
    let control = dir.path().join("control").display().to_string();
    let store = format!("dir://{}", dir.path().join("store").display());
    let mut cmd = ferry();
    cmd.args(["consume", "--control", &control, "--store", &store, "--dp", "2", "--batch", "2", "--accum", "1"])
        .args(["--idle-timeout", "60", "--inbox-serve", "http://127.0.0.1:0", "--json"]);
    let out = run_ok(cmd, "the consumer");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("serving the rank inboxes"), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["trained"], 8, "{report}");
    succeed(producer, "the producer");

    // Misuse is refused before anything starts.
    let started = Instant::now();
    for (args, want) in [
        (vec!["--inbox-serve", "https://127.0.0.1:0"], "http://host:port"),
        (vec!["--inbox-serve", "http://127.0.0.1:0", "--dp", "1"], "dp_size >= 2"),
        (vec!["--inbox-serve", "http://127.0.0.1:0", "--rank", "1", "--group", "unix:///nowhere"], "rank 0"),
    ] {
        let mut cmd = ferry();
        cmd.args(["consume", "--control", &control, "--store", &store]).args(&args);
        let out = spawn(cmd).finish("a refused consumer");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(want), "{args:?}: {stderr}");
    }
    let mut cmd = ferry();
    cmd.args(["consume", "--files", &dir.path().display().to_string(), "--inbox-serve", "http://127.0.0.1:0"]);
    let out = spawn(cmd).finish("an offline consumer");
    assert!(String::from_utf8_lossy(&out.stderr).contains("applies to the online consumer"));
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[test]
fn a_relay_that_cannot_listen_fails_rank_0_and_tells_the_producer() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control");
    std::fs::create_dir_all(&control).unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let origin = format!("http://127.0.0.1:{}", taken.local_addr().unwrap().port());
    let store = format!("dir://{}", dir.path().join("store").display());
    let mut cmd = ferry();
    cmd.args(["consume", "--control", &control.display().to_string(), "--store", &store, "--dp", "2"])
        .args(["--inbox-serve", &origin]);
    let out = spawn(cmd).finish("a consumer whose relay port is taken");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("starting rank 0's inbox relay"), "{stderr}");
    let published = std::fs::read_to_string(control.join("refs.jsonl.consumer_failed")).unwrap();
    assert!(published.starts_with("RuntimeError: ") && published.contains(&origin), "{published}");
    drop(taken);
}

/// Rank 1 waits on its remote inbox (no idle timeout: for ever) for a window only rank 0 could
/// fill: the producer published 6 samples and crashed, the ranks trained one window of 4. When
/// rank 0 is SIGKILLed, its relay is gone too (the pulls read as "nothing new"), and rank 1's
/// link to rank 0 fails the remote inbox, so rank 1 stops at once, names why, and publishes
/// nothing terminal (a lost rank is a crash to resume from).
#[test]
fn a_rank_waiting_on_its_remote_inbox_fails_at_once_when_rank_0_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    // One worker leasing 3 prompts at a time: exactly 6 samples are published.
    let producer = start_producer(dir.path(), 32, &["--workers", "1", "--lease", "3", "--fault", "publish:6"]);
    let (mut rank0, origin, _rank0_stderr) = start_rank0(dir.path(), &[]);
    let rank1 = start_rank1(dir.path(), &origin, &[]);
    let out = producer.finish("the producer");
    assert!(!out.status.success(), "the producer should have crashed at publish:6");
    let counter = dir.path().join("control/refs.jsonl.consumed_count");
    let end = Instant::now() + ROLE_DEADLINE;
    while std::fs::read_to_string(&counter).map_or(0, |t| t.trim().parse::<u64>().unwrap_or(0)) < 4 {
        assert!(Instant::now() < end, "the ranks never acknowledged the first window");
        std::thread::sleep(Duration::from_millis(2));
    }
    rank0.kill();
    let killed = Instant::now();
    let out = rank1.finish_within("rank 1 after rank 0 was killed", Duration::from_secs(30));
    assert!(killed.elapsed() < Duration::from_secs(5), "rank 1 took {:?} to notice", killed.elapsed());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("online consumer failed") && stderr.contains("rank 0 (the ref distributor) is gone"),
        "{stderr}"
    );
    assert!(!dir.path().join("control/refs.jsonl.consumer_failed").exists(), "a lost rank is resumable");
    assert_eq!(checksums(&dir.path().join("rank1.jsonl")).len(), 2, "rank 1 trained its half of the window");
}

/// SpecForge's launcher may export `DISAGG_INBOX_SERVER_URL` empty, or for a single-rank run;
/// SpecForge ignores it there, and so does ferry (a typed `--inbox-url` is still checked).
#[test]
fn the_launchers_url_is_ignored_when_empty_or_for_one_rank() {
    for (env, dp, samples) in [("", "2", 8), ("http://127.0.0.1:9", "1", 4)] {
        let dir = tempfile::tempdir().unwrap();
        let producer = start_producer(dir.path(), samples, &[]);
        let mut cmd = ferry();
        cmd.env("DISAGG_INBOX_SERVER_URL", env)
            .args(["consume", "--control", &dir.path().join("control").display().to_string()])
            .args(["--store", &format!("dir://{}", dir.path().join("store").display())])
            .args(["--dp", dp, "--batch", "2", "--accum", "1", "--idle-timeout", "60", "--json"]);
        let out = run_ok(cmd, "the consumer");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["trained"], samples, "{env:?}: {report}");
        assert!(!String::from_utf8_lossy(&out.stderr).contains("serving the rank inboxes"), "{env:?}");
        succeed(producer, "the producer");
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = ferry();
    cmd.args(["consume", "--control", &dir.path().display().to_string(), "--store", "mem://x", "--dp", "1"])
        .args(["--inbox-url", "http://127.0.0.1:9"]);
    let out = spawn(cmd).finish("a one-rank consumer given --inbox-url");
    assert!(String::from_utf8_lossy(&out.stderr).contains("dp_size >= 2"), "{}", String::from_utf8_lossy(&out.stderr));
}
