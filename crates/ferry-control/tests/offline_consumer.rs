//! The disaggregated offline consumer's lifecycle (§7.5, consumer side): it waits for `.done`
//! and fails on `.failed`, its ranks agree on the outcome, rank 0 alone writes `.consumed`, and
//! any rank's failure reaches `.consumer_failed` and every rank. Every wait has a deadline.
#![allow(clippy::unwrap_used)]

use ferry_control::collective::{Collective, LocalGroup};
use ferry_control::offline_consumer::{await_manifest, run_offline_rank};
use ferry_control::{OfflineControl, write_ref_manifest};
use ferry_core::{Error, Result, SampleRef};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const POLL: Duration = Duration::from_millis(2);

fn deadline() -> Option<Instant> {
    Some(Instant::now() + Duration::from_secs(20))
}

fn refs(n: usize) -> Vec<SampleRef> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/fixtures/specforge-control/manifest.json"
    ))
    .unwrap();
    let one: serde_json::Value = serde_json::from_str(&text).unwrap();
    let template = serde_json::to_string(&one["refs"][0]).unwrap();
    (0..n)
        .map(|i| {
            let mut r: SampleRef = ferry_core::json::sample_ref_from_str(&template).unwrap();
            r.sample_id = format!("run:{i:08}").into();
            r
        })
        .collect()
}

fn publish(control: &OfflineControl, n: usize) {
    write_ref_manifest(&refs(n), control.manifest()).unwrap();
    control.mark_done().unwrap();
}

/// Runs `dp` ranks as threads; `train(rank, refs)` is each rank's training.
fn run_ranks(
    dir: &Path,
    dp: usize,
    train: impl Fn(usize, Vec<SampleRef>) -> Result<usize> + Send + Sync + 'static,
) -> Vec<Result<usize>> {
    let train = Arc::new(train);
    let handles: Vec<_> = LocalGroup::new(dp, Duration::from_secs(20))
        .into_iter()
        .map(|group| {
            let (control, train) = (OfflineControl::new(dir.join("manifest.json")), Arc::clone(&train));
            std::thread::spawn(move || {
                let rank = group.rank();
                run_offline_rank(&control, &group, deadline(), POLL, |refs| train(rank, refs))
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn every_rank_reads_the_manifest_and_rank_0_alone_marks_it_consumed() {
    let dir = tempfile::tempdir().unwrap();
    let control = OfflineControl::new(dir.path().join("manifest.json"));
    // The producer publishes after the consumer started waiting.
    let publisher = {
        let control = control.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            publish(&control, 5);
        })
    };
    let outcomes = run_ranks(dir.path(), 2, |_, refs| Ok(refs.len()));
    publisher.join().unwrap();
    assert_eq!(outcomes.into_iter().map(Result::unwrap).collect::<Vec<_>>(), [5, 5]);
    assert!(control.consumed_path().exists());
    assert!(!control.consumer_failed_path().exists());
}

#[test]
fn one_failing_rank_fails_every_rank_and_records_which_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let control = OfflineControl::new(dir.path().join("manifest.json"));
    publish(&control, 4);
    let outcomes = run_ranks(dir.path(), 3, |rank, refs| {
        if rank == 1 {
            return Err(Error::InvalidArgument("batch 2 holds a NaN".into()));
        }
        Ok(refs.len())
    });
    assert!(outcomes[1].as_ref().unwrap_err().to_string().contains("NaN"), "the failing rank keeps its own error");
    for rank in [0, 2] {
        let e = outcomes[rank].as_ref().unwrap_err();
        assert!(matches!(e, Error::Collective { .. }), "{e}");
        assert!(e.to_string().contains("rank 1 failed") && e.to_string().contains("NaN"), "{e}");
    }
    let recorded = control.consumer_failure().unwrap();
    assert!(recorded.contains("rank 1") && recorded.contains("NaN"), "{recorded}");
    assert!(!control.consumed_path().exists(), "no rank vouches for an unfinished run");
}

#[test]
fn a_failed_producer_ends_the_wait_with_its_reason_and_never_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let control = OfflineControl::new(dir.path().join("manifest.json"));
    control.mark_failed("OSError: disk full while ingesting data_7.ckpt").unwrap();
    let outcomes = run_ranks(dir.path(), 2, |_, _| panic!("no rank trains without a manifest"));
    for outcome in &outcomes {
        let e = outcome.as_ref().unwrap_err().to_string();
        assert!(e.contains("disk full"), "{e}");
    }
    assert!(control.consumer_failure().unwrap().contains("disk full"));
    assert!(!control.consumed_path().exists());
}

#[test]
fn waiting_for_a_producer_that_never_finishes_times_out_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let control = OfflineControl::new(dir.path().join("manifest.json"));
    let e = await_manifest(&control, Some(Instant::now() + Duration::from_millis(30)), POLL).unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    assert!(e.to_string().contains("manifest.json.done"), "{e}");
}
