//! The data-parallel durable acknowledgement (SpecForge §13.3) over in-process ranks (threads)
//! and over real processes connected by the native collective (TCP and a Unix socket): the
//! gathered union committed once on rank 0 (rank 0's step wins), nothing recorded on other
//! ranks, each rank deleting only its own samples and only after the marker is durable, a
//! commit failure or any rank's cleanup failure raised identically on every rank, a dead peer
//! failing the round instead of hanging it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::RecordingStore;
use ferry_control::collective::{Collective, GroupAddress, LocalGroup, SingleRank, SocketGroup};
use ferry_control::controller::{ControllerOptions, DataFlowController};
use ferry_control::dp_ack::{DpAckController, gather_id_union};
use ferry_control::ledger::{DurableMarker, InMemoryLedger, Ledger, SqliteLedger};
use ferry_core::{Error, SampleId};
use ferry_store::FeatureStoreApi;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(30);

fn sids(names: &[&str]) -> Vec<SampleId> {
    names.iter().map(|s| SampleId::new(*s)).collect()
}

fn acked(marker: &DurableMarker) -> Vec<&str> {
    marker.acked.iter().map(SampleId::as_str).collect()
}

fn controller(ledger: Arc<dyn Ledger>) -> Arc<DataFlowController> {
    Arc::new(DataFlowController::new(ControllerOptions::new("run0"), ledger))
}

/// Runs `f(rank)` on `world` threads, one per rank, and returns their results in rank order.
fn on_ranks<T: Send + 'static>(
    world: usize,
    f: impl Fn(usize, Arc<dyn Collective>) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = Arc::new(f);
    let handles: Vec<_> = LocalGroup::new(world, TIMEOUT)
        .into_iter()
        .enumerate()
        .map(|(rank, group)| {
            let f = Arc::clone(&f);
            std::thread::spawn(move || f(rank, Arc::new(group)))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn one_rank_gathers_its_own_ids() {
    let ids = sids(&["a", "b"]);
    assert_eq!(gather_id_union(&SingleRank, &ids).unwrap(), ids);
}

#[test]
fn the_authority_commits_the_rank_ordered_union_once_with_its_own_step() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("consumer.sqlite");
    let ledger: Arc<dyn Ledger> = Arc::new(SqliteLedger::open_fresh(&db).unwrap());
    let rank1_ledger = Arc::new(InMemoryLedger::new());
    let (l0, l1) = (Arc::clone(&ledger), Arc::clone(&rank1_ledger));
    let stores =
        [Arc::new(RecordingStore::with(false, false, None)), Arc::new(RecordingStore::with(false, false, None))];
    for (rank, store) in stores.iter().enumerate() {
        for id in [format!("rank-{rank}"), "shared".to_owned()] {
            store.sample(&id);
        }
    }
    let stores2 = stores.clone();
    let results = on_ranks(2, move |rank, group| {
        let ledger: Arc<dyn Ledger> = if rank == 0 { Arc::clone(&l0) } else { l1.clone() };
        let store: Arc<dyn FeatureStoreApi> = stores2[rank].clone();
        let dp = DpAckController::new(controller(ledger), group, Some(store));
        let (ids, step) =
            if rank == 0 { (sids(&["rank-0", "shared", "rank-0"]), 17) } else { (sids(&["rank-1", "shared"]), 999) };
        dp.ack_train_refs(&format!("trainer-{rank}"), &ids, Some(step), true)
    });
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let marker = ledger.durable_marker().unwrap();
    assert_eq!(acked(&marker), ["rank-0", "rank-1", "shared"]);
    assert_eq!((marker.global_step, marker.optimizer_durable), (Some(17), true), "rank 0's step wins");
    assert_eq!(rank1_ledger.durable_marker().unwrap(), DurableMarker::default(), "rank 1 records nothing");
    assert_eq!(stores[0].events(), ["abort rank-0", "abort shared"], "rank 0 aborts only its own ids");
    assert_eq!(stores[1].events(), ["abort rank-1", "abort shared"]);
    assert_eq!(stores[0].health().unwrap().resident_samples, 0);
    // Reopened as after a restart: the union is durable.
    drop(ledger);
    assert_eq!(acked(&SqliteLedger::open_existing(&db).unwrap().durable_marker().unwrap()).len(), 3);
}

#[test]
fn features_are_aborted_only_after_the_marker_is_durable() {
    let ledger: Arc<dyn Ledger> = Arc::new(InMemoryLedger::new());
    let seen = Arc::new(Mutex::new(None));
    let (probe, record) = (Arc::clone(&ledger), Arc::clone(&seen));
    let store = Arc::new(RecordingStore::with(
        false,
        false,
        Some(Box::new(move |_id| {
            *record.lock().unwrap() = Some(probe.durable_marker().unwrap());
        })),
    ));
    store.sample("s0");
    let dp = DpAckController::new(controller(Arc::clone(&ledger)), Arc::new(SingleRank), Some(store.clone()));
    dp.ack_train_refs("t", &sids(&["s0"]), Some(3), true).unwrap();
    let marker = seen.lock().unwrap().clone().expect("the abort ran");
    assert_eq!((marker.global_step, marker.optimizer_durable, acked(&marker)), (Some(3), true, vec!["s0"]));
    // Not an optimizer-durable boundary: nothing is deleted.
    store.sample("s1");
    dp.ack_train_refs("t", &sids(&["s1"]), Some(4), false).unwrap();
    assert_eq!(store.events(), ["abort s0"]);
}

#[test]
fn a_failed_selective_drain_raises_after_the_ack_is_durable() {
    let ledger: Arc<dyn Ledger> = Arc::new(InMemoryLedger::new());
    let store = Arc::new(RecordingStore::with(false, true, None));
    store.sample("s0");
    let dp = DpAckController::new(controller(Arc::clone(&ledger)), Arc::new(SingleRank), Some(store));
    let err = dp.ack_train_refs("t", &sids(&["s0"]), Some(1), true).unwrap_err();
    assert!(matches!(err, Error::Collective { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("committed, but rank-local feature cleanup failed: rank 0: optimizer-boundary selective drain"),
        "{err}"
    );
    assert_eq!(acked(&ledger.durable_marker().unwrap()), ["s0"], "the ack stays committed");
}

#[test]
fn a_cleanup_failure_on_one_rank_fails_every_rank_identically() {
    let ledger: Arc<dyn Ledger> = Arc::new(InMemoryLedger::new());
    let l0 = Arc::clone(&ledger);
    let results = on_ranks(2, move |rank, group| {
        let store = Arc::new(RecordingStore::with(rank == 1, false, None));
        store.sample(&format!("s{rank}"));
        let ledger: Arc<dyn Ledger> = if rank == 0 { Arc::clone(&l0) } else { Arc::new(InMemoryLedger::new()) };
        let dp = DpAckController::new(controller(ledger), group, Some(store));
        dp.ack_train_refs("t", &[SampleId::new(format!("s{rank}"))], Some(5), true).map_err(|e| e.to_string())
    });
    let errors: Vec<String> = results.into_iter().map(Result::unwrap_err).collect();
    assert_eq!(errors[0], errors[1], "the same error on every rank");
    assert!(errors[0].contains("rank 1: abort s1") && !errors[0].contains("rank 0:"), "{}", errors[0]);
    assert_eq!(acked(&ledger.durable_marker().unwrap()), ["s0", "s1"], "the ack stays committed");
}

/// A ledger whose acknowledgement fails.
struct RefusingLedger(InMemoryLedger);

impl Ledger for RefusingLedger {
    fn commit_samples(&self, refs: &[ferry_core::SampleRef]) -> ferry_core::Result<Vec<bool>> {
        self.0.commit_samples(refs)
    }
    fn is_committed(&self, id: &SampleId) -> ferry_core::Result<bool> {
        self.0.is_committed(id)
    }
    fn get_committed(&self, id: &SampleId) -> ferry_core::Result<Option<ferry_core::SampleRef>> {
        self.0.get_committed(id)
    }
    fn committed_count(&self) -> ferry_core::Result<u64> {
        self.0.committed_count()
    }
    fn all_committed_ids(&self) -> ferry_core::Result<Vec<SampleId>> {
        self.0.all_committed_ids()
    }
    fn record_train_ack(&self, _: &[SampleId], _: Option<i64>, _: bool) -> ferry_core::Result<()> {
        Err(Error::Backend {
            backend: "sqlite".into(),
            operation: "ack".into(),
            key: "db".into(),
            message: "disk I/O error".into(),
        })
    }
    fn durable_marker(&self) -> ferry_core::Result<DurableMarker> {
        self.0.durable_marker()
    }
}

#[test]
fn a_failed_durable_commit_fails_every_rank_and_deletes_nothing() {
    let results = on_ranks(2, move |rank, group| {
        let store = Arc::new(RecordingStore::with(false, false, None));
        store.sample(&format!("s{rank}"));
        let ledger: Arc<dyn Ledger> =
            if rank == 0 { Arc::new(RefusingLedger(InMemoryLedger::new())) } else { Arc::new(InMemoryLedger::new()) };
        let dp = DpAckController::new(controller(ledger), group, Some(store.clone()));
        let result = dp.ack_train_refs("t", &[SampleId::new(format!("s{rank}"))], Some(1), true);
        (result.map_err(|e| e.to_string()), store.events())
    });
    for (result, events) in &results {
        let err = result.as_ref().unwrap_err();
        assert!(err.starts_with("durable DP acknowledgement failed: RuntimeError: sqlite backend"), "{err}");
        assert!(events.is_empty(), "nothing deleted: {events:?}");
    }
    assert_eq!(results[0].0, results[1].0);
}

#[test]
fn a_round_with_a_missing_rank_times_out_instead_of_hanging() {
    let mut group = LocalGroup::new(2, Duration::from_millis(50));
    let rank0 = group.remove(0);
    let err = rank0.all_gather(b"x".to_vec()).unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }) && err.to_string().contains("1 of 2 ranks"), "{err}");
}

/// Child role: rank 1 of a socket group at `FERRY_DP_ADDR`; acks `rank-1` and `shared` with
/// step 999 through an in-memory ledger and its own store, then prints its marker, its store's
/// events and the outcome as lines. With `FERRY_DP_FAIL_ABORT` its aborts fail; with
/// `FERRY_DP_EXIT_EARLY` it exits right after joining.
#[test]
fn child_dp_rank() {
    let Ok(addr) = std::env::var("FERRY_DP_ADDR") else { return };
    let group = SocketGroup::rendezvous(&GroupAddress::parse(&addr).unwrap(), "job", 1, 2, TIMEOUT).unwrap();
    if std::env::var("FERRY_DP_EXIT_EARLY").is_ok() {
        println!("@@joined");
        std::process::exit(0);
    }
    let store = Arc::new(RecordingStore::with(std::env::var("FERRY_DP_FAIL_ABORT").is_ok(), false, None));
    store.sample("rank-1");
    store.sample("shared");
    let ledger = Arc::new(InMemoryLedger::new());
    let dp = DpAckController::new(controller(ledger.clone()), Arc::new(group), Some(store.clone()));
    let outcome = dp.ack_train_refs("trainer-1", &sids(&["rank-1", "shared"]), Some(999), true);
    println!("@@marker {}", acked(&ledger.durable_marker().unwrap()).len());
    println!("@@events {}", store.events().join(","));
    println!("@@outcome {}", outcome.map_or_else(|e| e.to_string(), |()| "ok".into()));
}

fn spawn_rank1(addr: &str, extra_env: &[&str]) -> std::process::Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "child_dp_rank", "--nocapture", "--test-threads", "1"])
        .env("FERRY_DP_ADDR", addr)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for var in extra_env {
        cmd.env(var, "1");
    }
    cmd.spawn().unwrap()
}

/// The child's tagged `key value` lines (libtest may print its own text before a tag).
fn child_lines(child: std::process::Child) -> Vec<String> {
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    BufReader::new(&output.stdout[..])
        .lines()
        .map(Result::unwrap)
        .filter_map(|l| l.split_once("@@").map(|(_, tagged)| tagged.to_owned()))
        .collect()
}

fn rank0_ack(addr: &str, dir: &Path) -> (ferry_core::Result<()>, Arc<SqliteLedger>, Arc<RecordingStore>) {
    let group = SocketGroup::rendezvous(&GroupAddress::parse(addr).unwrap(), "job", 0, 2, TIMEOUT).unwrap();
    let ledger = Arc::new(SqliteLedger::open_fresh(dir.join("consumer.sqlite")).unwrap());
    let store = Arc::new(RecordingStore::with(false, false, None));
    store.sample("rank-0");
    store.sample("shared");
    let dp = DpAckController::new(controller(ledger.clone()), Arc::new(group), Some(store.clone()));
    (dp.ack_train_refs("trainer-0", &sids(&["rank-0", "shared"]), Some(17), true), ledger, store)
}

#[test]
fn two_processes_ack_through_the_native_collective_over_unix_and_tcp() {
    for transport in ["unix", "tcp"] {
        let dir = tempfile::tempdir().unwrap();
        let addr = match transport {
            "unix" => format!("unix://{}", dir.path().join("dp.sock").display()),
            _ => {
                let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
                format!("tcp://127.0.0.1:{port}")
            }
        };
        let child = spawn_rank1(&addr, &[]);
        let (result, ledger, store) = rank0_ack(&addr, dir.path());
        result.unwrap();
        let marker = ledger.durable_marker().unwrap();
        assert_eq!(acked(&marker), ["rank-0", "rank-1", "shared"], "{transport}");
        assert_eq!(marker.global_step, Some(17), "{transport}: rank 0's step wins over rank 1's 999");
        assert_eq!(store.events(), ["abort rank-0", "abort shared"]);
        assert_eq!(
            child_lines(child),
            ["marker 0", "events abort rank-1,abort shared", "outcome ok"],
            "{transport}: rank 1 records nothing and aborts only its own ids"
        );
    }
}

#[test]
fn a_cleanup_failure_in_another_process_fails_both_ranks_identically() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("unix://{}", dir.path().join("dp.sock").display());
    let child = spawn_rank1(&addr, &["FERRY_DP_FAIL_ABORT"]);
    let (result, ledger, _) = rank0_ack(&addr, dir.path());
    let err = result.unwrap_err().to_string();
    assert!(err.contains("rank 1: abort rank-1"), "{err}");
    let lines = child_lines(child);
    assert_eq!(lines[2], format!("outcome {err}"), "the same error on both ranks");
    assert_eq!(acked(&ledger.durable_marker().unwrap()).len(), 3, "the SQLite ack stays committed");
}

#[test]
fn a_dead_peer_process_fails_the_round_as_a_lost_peer() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("unix://{}", dir.path().join("dp.sock").display());
    let child = spawn_rank1(&addr, &["FERRY_DP_EXIT_EARLY"]);
    let group = SocketGroup::rendezvous(&GroupAddress::parse(&addr).unwrap(), "job", 0, 2, TIMEOUT).unwrap();
    assert_eq!(child_lines(child), ["joined"]);
    let err = group.all_gather(b"ids".to_vec()).unwrap_err();
    assert!(matches!(err, Error::PeerLost { .. }) && err.is_peer_loss(), "{err}");
    assert_eq!(err.python_exception(), "ConnectionError");
    let again = group.all_gather(b"ids".to_vec()).unwrap_err();
    assert!(again.to_string().contains("every rank must restart") && again.is_peer_loss(), "{again}");
}

#[test]
fn a_rank_of_another_group_is_refused_at_rendezvous() {
    let dir = tempfile::tempdir().unwrap();
    let addr = GroupAddress::parse(&format!("unix://{}", dir.path().join("dp.sock").display())).unwrap();
    let stranger = {
        let addr = addr.clone();
        std::thread::spawn(move || SocketGroup::rendezvous(&addr, "other-job", 1, 2, TIMEOUT))
    };
    let rank0 = {
        let addr = addr.clone();
        std::thread::spawn(move || SocketGroup::rendezvous(&addr, "job", 0, 2, Duration::from_millis(500)))
    };
    let err = stranger.join().unwrap().unwrap_err();
    assert!(err.to_string().contains("refused rank 1"), "{err}");
    let err = rank0.join().unwrap().unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "rank 0 keeps waiting for its own rank 1: {err}");
    assert!(GroupAddress::parse("http://x").is_err());
}

#[test]
fn a_stray_connection_does_not_break_the_rendezvous() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dp.sock");
    let addr = GroupAddress::parse(&format!("unix://{}", path.display())).unwrap();
    let rank0 = {
        let addr = addr.clone();
        std::thread::spawn(move || SocketGroup::rendezvous(&addr, "job", 0, 2, TIMEOUT))
    };
    // A port scanner: connects, sends garbage, and a huge announced length.
    let deadline = std::time::Instant::now() + TIMEOUT;
    let mut stray = loop {
        match std::os::unix::net::UnixStream::connect(&path) {
            Ok(s) => break s,
            Err(_) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => panic!("{e}"),
        }
    };
    stray.write_all(&u32::MAX.to_le_bytes()).unwrap();
    let rank1 = SocketGroup::rendezvous(&addr, "job", 1, 2, TIMEOUT).unwrap();
    let rank0 = rank0.join().unwrap().unwrap();
    let t = std::thread::spawn(move || rank1.all_gather(b"b".to_vec()).unwrap());
    assert_eq!(rank0.all_gather(b"a".to_vec()).unwrap(), vec![b"a".to_vec(), b"b".to_vec()]);
    assert_eq!(t.join().unwrap(), vec![b"a".to_vec(), b"b".to_vec()]);
}

#[test]
fn a_rank_that_abandons_the_group_fails_every_waiting_rank_at_once() {
    let mut group = LocalGroup::new(3, TIMEOUT);
    let (r2, r1, r0) = (group.pop().unwrap(), group.pop().unwrap(), group.pop().unwrap());
    let waiter = std::thread::spawn(move || r0.all_gather(b"a".to_vec()));
    std::thread::sleep(Duration::from_millis(10));
    r1.abandon();
    let started = std::time::Instant::now();
    let err = waiter.join().unwrap().unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5), "failed at once, not at the timeout");
    assert!(err.to_string().contains("rank 1 failed and left the group"), "{err}");
    assert!(r2.all_gather(b"c".to_vec()).is_err(), "and every later round fails too");
}
