//! Prefetch on worker threads: order, thread names, errors at their position, and shutdown with
//! a read that blocks or fails. No sleeps: the backend holds or gates reads on conditions, and
//! every wait has a deadline.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ferry_core::{Error, TrainBatch};
use ferry_loader::{FeatureLoader, RefSource, Sample};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn builder(fixture: &Fixture, workers: usize) -> ferry_loader::FeatureLoaderBuilder {
    FeatureLoader::builder(fixture.store.clone(), RefSource::Fixed(fixture.refs.clone()))
        .batch_size(2)
        .num_workers(workers)
}

fn first_ids(batch: &TrainBatch) -> String {
    batch.sample_ids[0].to_string()
}

#[test]
fn workers_keep_order_and_run_transforms_on_feature_loader_threads() {
    let fixture = Fixture::eagle3(&[8, 7, 6, 5, 8, 8, 4, 8]);
    // Batch 0 cannot finish before batch 1 has: its first read waits for batch 1's last one.
    fixture.backend.read_after("run:00000000", "run:00000003");
    let threads = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&threads);
    let mut loader = builder(&fixture, 2)
        .per_sample_transform(move |_: &mut Sample| {
            seen.lock().unwrap().push(std::thread::current().name().unwrap_or("<unnamed>").to_owned());
            Ok(())
        })
        .build()
        .unwrap();
    let order: Vec<String> = loader.iter().map(|b| first_ids(&b.unwrap())).collect();
    assert_eq!(order, ["run:00000000", "run:00000002", "run:00000004", "run:00000006"]);
    let completed = fixture.backend.completed();
    let pos = |id: &str| completed.iter().position(|s| s == id).unwrap();
    assert!(pos("run:00000003") < pos("run:00000000"), "batch 1 finished first: {completed:?}");
    let threads = threads.lock().unwrap();
    assert_eq!(threads.len(), 8);
    assert!(threads.iter().all(|t| t.starts_with("feature-loader-")), "{threads:?}");
    assert_eq!(fixture.active_leases(), 0);
}

#[test]
fn workers_yield_the_same_batches_as_the_inline_loader() {
    let fixture = Fixture::eagle3(&[8, 3, 6, 5, 2, 8, 4]);
    let inline: Vec<TrainBatch> =
        builder(&fixture, 0).drop_last(false).build().unwrap().iter().map(Result::unwrap).collect();
    let mut loader = builder(&fixture, 3).drop_last(false).build().unwrap();
    let prefetched: Vec<TrainBatch> = loader.iter().map(Result::unwrap).collect();
    assert_eq!((inline.len(), prefetched.len()), (4, 4));
    for (a, b) in inline.iter().zip(&prefetched) {
        assert_eq!(a.sample_ids, b.sample_ids);
        for (name, t) in &a.tensors {
            assert_eq!(t.shape(), b.tensors[name].shape());
            assert_eq!(t.bytes(), b.tensors[name].bytes(), "{name}");
        }
    }
}

#[test]
fn an_error_surfaces_at_its_batch_position_and_ends_the_pass() {
    let fixture = Fixture::eagle3(&[8; 8]);
    fixture.backend.fail_reads_of("run:00000002");
    let mut loader = builder(&fixture, 2).build().unwrap();
    let mut pass = loader.iter();
    assert_eq!(first_ids(&pass.next().unwrap().unwrap()), "run:00000000");
    let err = pass.next().unwrap().unwrap_err();
    assert!(err.to_string().contains("injected read fault"), "{err}");
    assert!(pass.next().is_none());
    drop(pass);
    assert_eq!(fixture.active_leases(), 0);
}

#[test]
fn closing_a_pass_with_a_blocked_read_times_out_then_completes_without_leaking_a_lease() {
    let fixture = Fixture::eagle3(&[8; 8]);
    fixture.backend.gate("run:00000002");
    let mut loader = builder(&fixture, 2).build().unwrap();
    let mut pass = loader.iter();
    assert_eq!(first_ids(&pass.next().unwrap().unwrap()), "run:00000000");
    fixture.backend.wait_started("run:00000002");
    let started = Instant::now();
    let err = pass.close_within(Duration::from_millis(50)).unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("1 feature-loader worker(s) to stop"), "{err}");
    assert!(started.elapsed() < DEADLINE);
    assert!(pass.next().is_none(), "a closed pass yields nothing");
    fixture.backend.open_gate("run:00000002");
    pass.close_within(DEADLINE).unwrap();
    assert_eq!(fixture.active_leases(), 0, "the unblocked worker released its lease");
    assert_eq!(fixture.backend.reads_of("run:00000003"), 0, "a closed pass abandons its batch");
}

#[test]
fn dropping_a_pass_with_a_blocked_read_returns_after_the_join_timeout_and_the_lease_is_released_later() {
    let fixture = Fixture::eagle3(&[8; 8]);
    fixture.backend.gate("run:00000002");
    let (released_tx, released) = std::sync::mpsc::channel::<String>();
    let released_tx = Mutex::new(released_tx);
    // The transform runs after the sample's read and release, so its signal proves the release.
    let mut loader = builder(&fixture, 2)
        .join_timeout(Duration::from_millis(50))
        .per_sample_transform(move |s: &mut Sample| {
            let _ = released_tx.lock().unwrap().send(s.sample_id.to_string());
            Ok(())
        })
        .build()
        .unwrap();
    let mut pass = loader.iter();
    assert_eq!(first_ids(&pass.next().unwrap().unwrap()), "run:00000000");
    fixture.backend.wait_started("run:00000002");
    let dropping = Instant::now();
    drop(pass);
    assert!(dropping.elapsed() < DEADLINE, "drop waits for the join timeout, not for the blocked read");
    fixture.backend.open_gate("run:00000002");
    loop {
        let id = released.recv_timeout(DEADLINE).expect("the unblocked read finished and was released");
        if id == "run:00000002" {
            break;
        }
        assert!(id == "run:00000000" || id == "run:00000001", "{id}");
    }
    assert_eq!(fixture.active_leases(), 0, "the detached worker released its lease");
    assert_eq!(fixture.backend.reads_of("run:00000003"), 0, "the stopped worker fetched nothing more");
}

#[test]
fn dropping_a_pass_mid_epoch_stops_the_workers_and_leaks_nothing() {
    let fixture = Fixture::eagle3(&[8; 12]);
    let mut loader = builder(&fixture, 2).build().unwrap();
    let mut pass = loader.iter();
    pass.next().unwrap().unwrap();
    drop(pass); // joins the workers (none is blocked)
    assert_eq!(fixture.active_leases(), 0);
    let fetched = fixture.backend.started().len();
    // The first next() submitted batches 0 and 1 (the window); batch 2 was never submitted.
    assert!(fetched <= 4, "only the window's batches were fetched: {fetched}");
    let after = fixture.backend.started().len();
    assert_eq!(fetched, after, "no worker outlived the drop");
    assert_eq!(loader.iter().count(), 6, "the loader is re-iterable after a dropped pass");
}

#[test]
fn a_failing_transform_on_a_worker_releases_its_lease() {
    let fixture = Fixture::eagle3(&[8; 4]);
    let mut loader = builder(&fixture, 2)
        .per_sample_transform(|s: &mut Sample| {
            if s.sample_id == "run:00000003" {
                return Err(Error::InvalidArgument("bad sample 3".into()));
            }
            Ok(())
        })
        .build()
        .unwrap();
    let results: Vec<_> = loader.iter().collect();
    assert_eq!(results.len(), 2);
    assert!(results[0].is_ok());
    assert!(results[1].as_ref().unwrap_err().to_string().contains("bad sample 3"));
    assert_eq!(fixture.active_leases(), 0);
}

#[test]
fn a_panicking_transform_is_reported_at_its_batch_not_hung() {
    let fixture = Fixture::eagle3(&[8; 4]);
    let mut loader = builder(&fixture, 2)
        .per_sample_transform(|s: &mut Sample| {
            assert!(s.sample_id != "run:00000001", "transform panics on purpose for sample 1");
            Ok(())
        })
        .build()
        .unwrap();
    let mut pass = loader.iter();
    let err = pass.next().unwrap().unwrap_err();
    assert!(err.to_string().contains("panicked"), "{err}");
    assert!(pass.next().is_none());
    pass.close_within(DEADLINE).unwrap();
    assert_eq!(fixture.active_leases(), 0);
}
