//! The offline producer over a `ferry serve` daemon, through a client that owns its puts
//! (`Client::connect_owning`), as a separate process: without a hold its samples outlive it
//! (disowned after `.done`); with a hold they stay owned, so a producer SIGKILLed while holding
//! leaves nothing behind (the consumer's reads then fail).
//!
//! The producer is this test binary re-executed (`child_role` runs only when
//! `FERRY_INGEST_CHILD` is set). Every wait has a deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use ferry_control::{Hold, IngestOptions, OfflineControl, ProducerEvent, read_ref_manifest, run_offline_producer};
use ferry_net::{Client, DaemonConfig, DaemonHandle};
use ferry_store::StoreOptions;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(60);

fn fixtures() -> PathBuf {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures"));
    assert!(dir.is_dir(), "SpecForge fixtures not found at {}: put shared/ beside the repository", dir.display());
    dir.canonicalize().unwrap()
}

/// A daemon over a shared-memory arena, as `ferry serve` runs, on a Unix socket.
fn daemon(dir: &Path) -> DaemonHandle {
    let options = StoreOptions { store_id: Some("ingest".into()), ..StoreOptions::default() };
    let (store, arena) = ferry_net::arena_store(64 << 20, options).unwrap();
    let mut config = DaemonConfig::new(None, Some(dir.join("ferry.sock")));
    config.arena = Some(arena);
    ferry_net::start(store, config).unwrap()
}

fn uri(daemon: &DaemonHandle) -> String {
    format!("ferry+unix://{}", daemon.unix_path().unwrap().display())
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The producer process: ingests the EAGLE3 fixtures through an owning client; `hold` waits
/// for `.consumed` (and is killed meanwhile), printing `HOLDING`; `none` returns after `.done`.
#[test]
fn child_role() {
    let Ok(role) = std::env::var("FERRY_INGEST_CHILD") else { return };
    let client = Client::connect_owning(&std::env::var("FERRY_INGEST_URI").unwrap()).unwrap();
    let control = OfflineControl::new(std::env::var("FERRY_INGEST_MANIFEST").unwrap());
    let hold = match role.as_str() {
        "hold" => Hold::until_consumed(None),
        "none" => Hold::None,
        other => panic!("unknown child role {other}"),
    };
    let options = IngestOptions { workers: 2, hold, ..IngestOptions::default() };
    let on_event = |event: ProducerEvent<'_>| {
        if let ProducerEvent::Holding { .. } = event {
            println!("\nHOLDING");
        }
    };
    let report =
        run_offline_producer(&client, &fixtures().join("specforge-offline-eagle3"), &control, &options, &on_event)
            .unwrap();
    println!("\nDONE {}", report.refs.len());
}

fn spawn_child(role: &str, uri: &str, manifest: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_role", "--nocapture", "--test-threads=1"])
        .env("FERRY_INGEST_CHILD", role)
        .env("FERRY_INGEST_URI", uri)
        .env("FERRY_INGEST_MANIFEST", manifest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Reads the child's stdout until a line containing `want`; returns the rest of that line.
fn expect_line(child: &mut Child, want: &str) -> String {
    let mut reader = BufReader::new(child.stdout.as_mut().unwrap());
    let mut line = String::new();
    let mut seen = String::new();
    loop {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "child ended before printing {want}; it printed: {seen}");
        seen.push_str(&line);
        if let Some(at) = line.find(want) {
            return line[at + want.len()..].trim().to_owned();
        }
    }
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(start.elapsed() < DEADLINE, "child did not exit");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn without_a_hold_the_samples_outlive_the_owning_producer() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = daemon(dir.path());
    let manifest = dir.path().join("manifest.json");
    let mut child = spawn_child("none", &uri(&daemon), &manifest);
    assert_eq!(expect_line(&mut child, "DONE"), "4");
    assert!(wait_exit(&mut child).success());
    wait_until("the producer's session to end", || daemon.connections() == 0);
    assert_eq!(daemon.metrics().orphaned_samples_freed(), 0);
    let consumer = Client::connect(&uri(&daemon)).unwrap();
    let refs = read_ref_manifest(&manifest).unwrap();
    assert_eq!(refs.len(), 4);
    for r in &refs {
        let (tensors, handle) = consumer.get(r, None).unwrap();
        assert!(!tensors.is_empty());
        consumer.release(&handle).unwrap();
    }
}

#[test]
fn a_producer_killed_while_holding_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = daemon(dir.path());
    let manifest = dir.path().join("manifest.json");
    let mut child = spawn_child("hold", &uri(&daemon), &manifest);
    expect_line(&mut child, "HOLDING");
    let control = OfflineControl::new(&manifest);
    assert!(control.done_path().exists());
    assert_eq!(daemon.store().health().resident_samples, 4, "held, and readable, until consumed");
    child.kill().unwrap(); // SIGKILL while holding: no `.consumed` will ever be waited for
    wait_exit(&mut child);
    wait_until("the dead producer's samples to be freed", || daemon.store().health().resident_samples == 0);
    assert_eq!(daemon.metrics().orphaned_samples_freed(), 4);
    let consumer = Client::connect(&uri(&daemon)).unwrap();
    for r in read_ref_manifest(&manifest).unwrap() {
        let err = consumer.get(&r, None).unwrap_err();
        assert_eq!(err.python_exception(), "KeyError", "{} is gone: {err}", r.sample_id);
    }
}
