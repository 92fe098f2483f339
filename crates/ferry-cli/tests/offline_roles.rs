//! `ferry ingest` into a `ferry serve` daemon, as separate processes: by default ingest holds
//! the samples it published until the consumer writes `<manifest>.consumed` (or
//! `.consumer_failed`), then frees them, so the daemon ends empty either way.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use ferry_control::OfflineControl;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Starts `ferry ingest` of the EAGLE3 fixture dump (4 files) into the daemon, holding (the
/// default for a daemon), and waits until it wrote `.done`. Returns it while it holds.
fn start_holding_ingest(uri: &str, control: &OfflineControl) -> Guard {
    let mut ingest = Guard::new(
        ferry()
            .arg("ingest")
            .arg(fixtures().join("specforge-offline-eagle3"))
            .args(["--store", uri, "--manifest"])
            .arg(control.manifest())
            .args(["--hold-timeout", "120"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + ROLE_DEADLINE;
    while !control.done_path().exists() {
        if ingest.exited() {
            let out = ingest.finish("ferry ingest");
            panic!("ferry ingest exited before .done: {}", String::from_utf8_lossy(&out.stderr));
        }
        assert!(Instant::now() < deadline, "ferry ingest wrote no .done within {ROLE_DEADLINE:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    ingest
}

#[test]
fn ingest_into_a_daemon_holds_until_consumed_then_frees_every_sample() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &[]);
    let uri = daemon.uri();
    let control = OfflineControl::new(dir.path().join("control/manifest.json"));
    let ingest = start_holding_ingest(&uri, &control);
    let (samples, bytes, _) = daemon.resident();
    assert_eq!(samples, 4, "the published samples are held in the daemon");
    assert!(bytes > 0);
    assert_eq!(ferry_control::read_ref_manifest(control.manifest()).unwrap().len(), 4);
    control.mark_consumed().unwrap();
    let out = ingest.finish("ferry ingest");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "ferry ingest: {stderr}");
    let consumed = control.consumed_path().display().to_string();
    let holding: Vec<&str> = stderr.lines().filter(|l| l.contains("holding")).collect();
    assert!(holding.len() == 1 && holding[0].contains(&consumed), "one line says what it waits for: {stderr}");
    assert!(stdout.contains("ingested 4 files") && stdout.contains("store id node0"), "{stdout}");
    assert!(stdout.contains("freed:    4 samples"), "{stdout}");
    assert!(!control.failed_path().exists());
    daemon.assert_empty();
}

#[test]
fn a_consumer_failure_fails_a_holding_ingest_and_empties_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &[]);
    let uri = daemon.uri();
    let control = OfflineControl::new(dir.path().join("control/manifest.json"));
    let ingest = start_holding_ingest(&uri, &control);
    assert_eq!(daemon.resident().0, 4);
    control.mark_consumer_failed("RuntimeError: the trainer ran out of memory").unwrap();
    let out = ingest.finish("ferry ingest");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("the trainer ran out of memory"), "{stderr}");
    assert!(stderr.contains("manifest.json.failed records the reason"), "{stderr}");
    let failed = control.failure().expect(".failed exists");
    assert!(failed.contains("the trainer ran out of memory") && failed.contains(".consumer_failed"), "{failed}");
    daemon.assert_empty();
}

#[test]
fn hold_timeout_must_be_positive_and_needs_a_hold() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("dir://{}", dir.path().join("store").display());
    let manifest = dir.path().join("manifest.json");
    let input = fixtures().join("specforge-offline-eagle3");
    for (extra, message) in [
        (&["--hold", "always", "--hold-timeout", "0"][..], "--hold-timeout must be a positive number of seconds"),
        (&["--hold", "always", "--hold-timeout=-3"][..], "--hold-timeout must be a positive number of seconds"),
        (&["--hold", "always", "--hold-timeout", "nan"][..], "--hold-timeout must be a positive number of seconds"),
        (&["--hold-timeout", "5"][..], "does not hold"),
        (&["--hold", "never", "--hold-timeout", "5"][..], "does not hold"),
    ] {
        let child = ferry()
            .arg("ingest")
            .arg(&input)
            .args(["--store", &store, "--manifest"])
            .arg(&manifest)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = Guard::new(child).finish("ferry ingest");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {stderr}");
        assert!(stderr.contains(message), "{extra:?}: {stderr}");
        assert!(!manifest.exists() && !dir.path().join("manifest.json.producer_claim").exists(), "{extra:?}");
    }
}
