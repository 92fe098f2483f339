//! Fault injection across the CLI roles, each a separate process on loopback: a role crashes
//! at a chosen point (`--fault <point>`, an `abort()`: no cleanup, no sentinel), or is killed
//! from the test, and the suite checks how the others end and what a resume does
//! (`SPECFORGE-RUNTIME.md` §7.5, §14.2-§14.4). The invariants, where a scenario allows them:
//!
//! * (i) no sample is trained again after its durable ack (the ledger's `acked` rows at the
//!   crash against what later attempts trained);
//! * (ii) none is skipped: every published sample is durably acknowledged in the end;
//! * (iii) the producer's in-flight count settles to zero (`refs.jsonl.consumed_count` equals
//!   what it published) and it exits 0;
//! * (iv) the daemon holds nothing (no sample, no byte, no pending removal), a `dir://` store
//!   no file;
//! * (v) a failure reaches the other side as a sentinel and as a nonzero exit whose stderr
//!   names the cause, within a bound far below every default timeout: never a hang.
//!
//! Every wait has a deadline; shapes are tiny (`--seq-len 32 --hidden 16`, a few dozen samples).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

/// The sample shape of every role here.
const SHAPE: [&str; 4] = ["--seq-len", "32", "--hidden", "16"];
/// The online consumer's shape: 2 ranks x batches of 2, one micro-batch per optimizer step, so
/// a window (the dispatch quantum) is 4 samples.
const CONSUMER: [&str; 6] = ["--dp", "2", "--batch", "2", "--accum", "1"];
/// How long a role may take to notice a dead peer and exit: far below the 600 s defaults of the
/// peer and group timeouts, so a role that waits for one of those fails here.
const PROMPT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Polls `done` every 2 ms until it holds, failing the test past `deadline`.
fn wait_until(what: &str, deadline: Duration, mut done: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !done() {
        assert!(Instant::now() < end, "{what}: not within {deadline:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The role crashed at the injected `fault` (SIGABRT, and its one line on stderr).
fn assert_crashed_at(out: &Output, what: &str, fault: &str) {
    let err = stderr(out);
    assert_eq!(out.status.signal(), Some(6), "{what} should have aborted at {fault}: {:?}\n{err}", out.status);
    assert!(err.contains(&format!("injected fault {fault} fired")), "{what}: {err}");
}

/// The role failed cleanly (exit 1, not a signal) and its stderr names every one of `causes`.
fn assert_failed_naming(out: &Output, what: &str, causes: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{what} should fail with exit 1: {:?}\n{err}", out.status);
    for cause in causes {
        assert!(err.contains(cause), "{what}: stderr does not name {cause:?}:\n{err}");
    }
}

/// `ferry produce` into `store` (one worker, leases of 3, high watermark 8, a 60 s peer
/// timeout), waiting until it claimed the channel so a consumer started next finds it.
fn produce(control: &Path, store: &str, samples: u32, extra: &[&str]) -> Guard {
    let mut cmd = ferry();
    cmd.args(["produce", "--control"]).arg(control).args(["--store", store, "--samples", &samples.to_string()]);
    cmd.args(SHAPE).args(["--workers", "1", "--lease", "3", "--high-watermark", "8", "--peer-timeout", "60", "--json"]);
    cmd.args(extra);
    let mut producer = spawn(cmd);
    wait_until("the producer claims the channel", ROLE_DEADLINE, || {
        assert!(!producer.exited(), "the producer exited before claiming the channel");
        control.join("refs.jsonl.producer_claim").exists()
    });
    producer
}

/// `ferry consume` of the online channel, all ranks in this process unless `extra` says
/// `--rank`, writing what it trained to `sums`.
fn consume(control: &Path, store: &str, sums: &Path, extra: &[&str]) -> Guard {
    let mut cmd = ferry();
    cmd.args(["consume", "--control"]).arg(control).args(["--store", store]).args(CONSUMER);
    cmd.arg("--checksums").arg(sums).args(extra);
    spawn(cmd)
}

/// The ids the consumer's SQLite ledger has durably acknowledged.
fn acked(control: &Path) -> BTreeSet<String> {
    let ledger = control.join("consumer/consumer.sqlite");
    let conn = rusqlite::Connection::open(&ledger).unwrap();
    let mut stmt = conn.prepare("SELECT sample_id FROM acked").unwrap();
    stmt.query_map([], |row| row.get::<_, String>(0)).unwrap().map(Result::unwrap).collect()
}

/// The ids the producer published on the channel, in order.
fn published(control: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(control.join("refs.jsonl")).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["sample_id"].as_str().unwrap().to_owned())
        .collect()
}

/// `refs.jsonl.consumed_count`: refs the consumer acknowledged to the producer.
fn consumed_count(control: &Path) -> u64 {
    std::fs::read_to_string(control.join("refs.jsonl.consumed_count")).map_or(0, |t| t.trim().parse().unwrap())
}

/// What a role wrote with `--checksums`, or nothing if it crashed before writing it.
fn trained(path: &Path) -> Vec<(String, u64)> {
    if path.exists() { checksums(path) } else { Vec::new() }
}

/// Asserts every sample in `sums` was trained once, with the bytes `expected` (by key) says.
fn assert_once_with_right_bytes(sums: &[(String, u64)], expected: &BTreeMap<String, u64>) {
    let mut seen = BTreeSet::new();
    for (id, sum) in sums {
        assert!(seen.insert(id.clone()), "{id} trained twice");
        assert_eq!(expected.get(&key(id)), Some(sum), "{id}: trained bytes differ from what was produced");
    }
}

/// The checksums `ferry produce --seed 0` puts for its (first epoch's) samples, by key, from a
/// `ferry synth` dump of the same seed and shape (a crashed producer writes no checksums).
fn synth(dump: &Path, samples: u32) -> BTreeMap<String, u64> {
    let mut cmd = ferry();
    cmd.arg("synth").arg(dump).args(["--samples", &samples.to_string(), "--seed", "0", "--workers", "1"]).args(SHAPE);
    run_ok(cmd, "ferry synth");
    generated(dump).into_iter().collect()
}

/// The sample ids a `dir://` store still holds files of (`<id>.g<generation>.<ext>`).
fn samples_in_dir_store(root: &Path) -> BTreeSet<String> {
    files_under(root)
        .iter()
        .map(|f| {
            let name = Path::new(f).file_name().unwrap().to_str().unwrap();
            name.rsplit_once(".g").map_or(name, |(id, _)| id).to_owned()
        })
        .collect()
}

/// Asserts that a daemon holds only the `published_unfreed` samples a dead producer published
/// and nobody freed (the producer never resumes, and a published ref outlives its producer):
/// `ferry produce` and `ferry ingest` own their puts on a daemon (`Client::connect_owning`), so
/// what the dead producer put but never handed over (not yet published, or held by ingest) died
/// with its session. Polls: the daemon frees a dead session's samples when it notices.
fn assert_dead_producer_left(daemon: &Daemon, published_unfreed: u64) {
    let end = Instant::now() + PROMPT;
    let (mut samples, mut pending) = (u64::MAX, u64::MAX);
    while Instant::now() < end {
        (samples, _, pending) = daemon.resident();
        if (samples, pending) == (published_unfreed, 0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        (samples, pending),
        (published_unfreed, 0),
        "the daemon should hold only the {published_unfreed} published samples nobody trained \
         (what the dead producer never handed over dies with its session): {}",
        daemon.health()
    );
}

/// An online store: a fresh `dir://` root, or a daemon retaining on release.
enum Store {
    Dir,
    Daemon,
}

/// The store's URI, and the daemon if there is one.
fn open(store: Store, dir: &Path) -> (String, Option<Daemon>) {
    match store {
        Store::Dir => (format!("dir://{}", dir.join("store").display()), None),
        Store::Daemon => {
            let daemon = Daemon::start(dir, &["--retain-on-release"]);
            (daemon.uri(), Some(daemon))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (a) The online consumer (every rank in one process) crashes; a resume continues the attempt.
// ---------------------------------------------------------------------------------------------

/// Where an online attempt keeps its features: the store's URI, the daemon if any, and the
/// directory a `dir://` store lives in.
struct Online {
    uri: String,
    daemon: Option<Daemon>,
    root: std::path::PathBuf,
}

impl Online {
    fn new(store: Store, dir: &Path) -> Online {
        let (uri, daemon) = open(store, dir);
        Online { uri, daemon, root: dir.join("store") }
    }

    /// (iv): nothing resident in the daemon, no feature file in the directory.
    fn assert_empty(&self) {
        match &self.daemon {
            Some(daemon) => daemon.assert_empty(),
            None => assert_eq!(files_under(&self.root), Vec::<String>::new(), "features left in the store"),
        }
    }
}

/// Runs a 32-sample online attempt whose consumer (every rank in one process) crashes at
/// `fault`, and checks the crash: `acked_at_crash` samples durable, the checkpoint at
/// `checkpoint`, no sentinel. Returns the store and the producer, still running.
fn crash_the_consumer(
    store: Store,
    dir: &Path,
    fault: &str,
    acked_at_crash: usize,
    checkpoint: &str,
) -> (Online, Guard) {
    let online = Online::new(store, dir);
    let control = dir.join("control");
    let producer = produce(&control, &online.uri, 32, &[]);
    let first = consume(&control, &online.uri, &dir.join("first.sums"), &["--idle-timeout", "30", "--fault", fault]);
    assert_crashed_at(&first.finish_within("the crashing consumer", PROMPT), "the consumer", fault);
    assert_eq!(acked(&control).len(), acked_at_crash, "durable at the crash");
    assert_eq!(std::fs::read_to_string(control.join("consumer/checkpoint")).unwrap(), checkpoint);
    assert!(!control.join("refs.jsonl.consumer_failed").exists(), "a crash writes no sentinel");
    (online, producer)
}

/// Crashes the consumer at `fault`, resumes it, and checks (i)-(iv), and that the resume
/// trained exactly the `32 - acked_at_crash` samples that were not durable.
fn crash_and_resume(store: Store, fault: &str, acked_at_crash: usize, checkpoint: &str) {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (online, producer) = crash_the_consumer(store, dir, fault, acked_at_crash, checkpoint);
    let control = dir.join("control");
    let durable = acked(&control);
    let second = consume(&control, &online.uri, &dir.join("second.sums"), &["--idle-timeout", "30", "--resume"]);
    succeed(second, "the resumed consumer");
    let out = succeed(producer, "the producer");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["published"], 32);

    let produced: BTreeMap<String, u64> =
        checksums(&control.join("produced-checksums.jsonl")).into_iter().map(|(id, sum)| (key(&id), sum)).collect();
    let second = checksums(&dir.join("second.sums"));
    assert_once_with_right_bytes(&second, &produced);
    for (id, _) in &second {
        assert!(!durable.contains(id), "(i) {id} was trained again after its durable ack");
    }
    assert_eq!(second.len(), 32 - acked_at_crash, "the resume trains exactly what was not durable");
    let all = acked(&control);
    assert_eq!(all, published(&control).into_iter().collect(), "(ii) every published sample durably acked");
    assert_eq!(all.len(), 32);
    assert_eq!(consumed_count(&control), 32, "(iii) the producer's in-flight count settled");
    assert!(control.join("refs.jsonl.consumer_done").exists() && control.join("refs.jsonl.closed").exists());
    assert!(!control.join("refs.jsonl.consumer_failed").exists() && !control.join("refs.jsonl.failed").exists());
    online.assert_empty(); // (iv)
}

/// The consumer crashes between step 3's durable ack and its checkpoint: the ledger is ahead
/// of the checkpoint, which makes the attempt non-resumable (§14.4). The resume must refuse,
/// naming both steps and the ledger, publish `.consumer_failed`, and the producer must stop.
fn crash_between_ack_and_checkpoint(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (online, producer) = crash_the_consumer(store, dir, "after-ack:3", 12, "2");
    let control = dir.join("control");
    let second = consume(&control, &online.uri, &dir.join("second.sums"), &["--idle-timeout", "30", "--resume"]);
    let out = second.finish_within("the refused resume", PROMPT);
    assert_failed_naming(&out, "the resume", &["durable step 3 is ahead of checkpoint step 2", "consumer.sqlite"]);
    let failed = std::fs::read_to_string(control.join("refs.jsonl.consumer_failed")).unwrap();
    assert!(failed.contains("ahead of checkpoint step 2") && failed.contains("consumer.sqlite"), "{failed}");
    assert!(trained(&dir.join("second.sums")).is_empty(), "(i) the refused resume trained nothing");
    assert_eq!(acked(&control).len(), 12, "the refused resume acknowledged nothing");
    // (v) The producer sees `.consumer_failed`, stops, cleans up and fails naming it.
    let out = producer.finish_within("the producer after the consumer's failure", PROMPT);
    assert_failed_naming(&out, "the producer", &["consumer failed", "ahead of checkpoint step 2"]);
    online.assert_empty(); // (iv): the producer's cleanup freed what the consumer never trained
}

// before-ack:3: step 3 was trained, not acknowledged: 2 steps of 4 durable, the checkpoint at
// 2; the resume replays step 3.
#[test]
fn a_consumer_crashed_before_its_ack_replays_the_step_on_resume_dir() {
    crash_and_resume(Store::Dir, "before-ack:3", 8, "2");
}

#[test]
fn a_consumer_crashed_before_its_ack_replays_the_step_on_resume_daemon() {
    crash_and_resume(Store::Daemon, "before-ack:3", 8, "2");
}

// after-checkpoint:3: 3 steps durable and checkpointed; the resume trains nothing twice.
#[test]
fn a_consumer_crashed_after_its_checkpoint_resumes_without_retraining_dir() {
    crash_and_resume(Store::Dir, "after-checkpoint:3", 12, "3");
}

#[test]
fn a_consumer_crashed_after_its_checkpoint_resumes_without_retraining_daemon() {
    crash_and_resume(Store::Daemon, "after-checkpoint:3", 12, "3");
}

#[test]
fn a_consumer_crashed_between_ack_and_checkpoint_refuses_to_resume_and_stops_the_producer_dir() {
    crash_between_ack_and_checkpoint(Store::Dir);
}

#[test]
fn a_consumer_crashed_between_ack_and_checkpoint_refuses_to_resume_and_stops_the_producer_daemon() {
    crash_between_ack_and_checkpoint(Store::Daemon);
}

// ---------------------------------------------------------------------------------------------
// (b) Consumer ranks as separate processes: one dies, the other fails at once.
// ---------------------------------------------------------------------------------------------

/// Whether `text` says a peer rank died: a collective round broke, or rank 0's link closed.
fn names_dead_peer(text: &str) -> bool {
    text.contains("collective all-gather") || text.contains("rank 0 (the ref distributor) is gone")
}

/// Kills consumer rank `victim` (of 2 processes, over a `dir://` store) after it trained step 3
/// and before the ack, then checks the survivor, the producer, and a resume. No rank has an
/// idle timeout: a survivor that waited for one would wait forever (and fail here at
/// [`PROMPT`]). One rank's death is a crash of the consumer, as torchrun makes it: the survivor
/// stops without a terminal `.consumer_failed` (which would make the producer free everything),
/// the producer waits under backpressure, and both ranks resume exactly once.
fn kill_a_consumer_rank(victim: u64) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let control = d.join("control");
    let (store, _) = open(Store::Dir, d);
    let producer = produce(&control, &store, 32, &[]);
    let group = format!("unix://{}", d.join("group.sock").display());
    let fault = "before-ack:3";
    let ranks: Vec<Guard> = (0..2u64)
        .map(|rank| {
            let mut extra = vec!["--rank", if rank == 0 { "0" } else { "1" }, "--group", group.as_str()];
            if rank == victim {
                extra.extend(["--fault", fault]);
            }
            consume(&control, &store, &d.join(format!("first{rank}.sums")), &extra)
        })
        .collect();
    let survivor = 1 - victim;
    let started = Instant::now();
    for (rank, guard) in (0..2u64).zip(ranks) {
        let out = guard.finish_within("a consumer rank", PROMPT);
        if rank == victim {
            assert_crashed_at(&out, "the killed rank", fault);
        } else {
            // (v) The survivor notices at once, not at its idle or group timeout: at its next
            // collective (the step's ack) the dead peer's connection is closed, or, waiting on
            // its inbox, its link to rank 0 closes (`crate::liveness`).
            assert_failed_naming(&out, "the surviving rank", &["online consumer failed"]);
            assert!(names_dead_peer(&stderr(&out)), "the surviving rank: {}", stderr(&out));
        }
    }
    assert!(started.elapsed() < PROMPT, "rank {survivor} took {:?} to notice", started.elapsed());
    assert!(
        !control.join("refs.jsonl.consumer_failed").exists(),
        "a lost rank is a crash to resume from, not a terminal failure"
    );
    let durable = acked(&control);
    assert_eq!(durable.len(), 8, "steps 1 and 2 durable, step 3 never acknowledged");
    let published_ids: BTreeSet<String> = published(&control).into_iter().collect();
    let first = trained(&d.join(format!("first{survivor}.sums")));
    assert!(first.iter().all(|(id, _)| published_ids.contains(id)), "trained only what was published");

    // Both ranks resume (rank 0 replaces the socket the first group left) and finish the run.
    let ranks: Vec<Guard> = (0..2u64)
        .map(|rank| {
            let rank_arg = if rank == 0 { "0" } else { "1" };
            let extra = ["--rank", rank_arg, "--group", group.as_str(), "--resume"];
            consume(&control, &store, &d.join(format!("second{rank}.sums")), &extra)
        })
        .collect();
    let mut second = Vec::new();
    for (rank, guard) in (0..2u64).zip(ranks) {
        succeed(guard, &format!("resumed rank {rank}"));
        second.extend(trained(&d.join(format!("second{rank}.sums"))));
    }
    let out = succeed(producer, "the producer");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["published"], 32);
    let produced: BTreeMap<String, u64> =
        checksums(&control.join("produced-checksums.jsonl")).into_iter().map(|(id, sum)| (key(&id), sum)).collect();
    assert_once_with_right_bytes(&second, &produced);
    for (id, _) in &second {
        assert!(!durable.contains(id), "(i) {id} was trained again after its durable ack");
    }
    assert_eq!(second.len(), 24, "the resume trains exactly what was not durable");
    assert_eq!(acked(&control).len(), 32, "(ii) every published sample durably acknowledged");
    assert_eq!(consumed_count(&control), 32, "(iii) the producer's in-flight count settled");
    assert!(control.join("refs.jsonl.consumer_done").exists());
    assert_eq!(files_under(&d.join("store")), Vec::<String>::new(), "(iv) every feature deleted");
}

#[test]
fn a_killed_consumer_rank_1_process_stops_rank_0_at_once_and_both_resume() {
    kill_a_consumer_rank(1);
}

#[test]
fn a_killed_consumer_rank_0_process_stops_rank_1_at_once_and_both_resume() {
    kill_a_consumer_rank(0);
}

/// The case the link to rank 0 exists for (`crate::liveness`), made deterministic: the producer
/// publishes 6 samples and crashes, so the ranks train one window of 4, acknowledge it, and then
/// wait on their inboxes (no idle timeout: forever) for a window only rank 0's distributor
/// could fill. Once the counter shows that ack (rank 1 is past every collective), rank 0 is
/// SIGKILLed; rank 1 must fail at once and say why, publishing nothing terminal (a lost rank
/// is a crash the consumer resumes from).
#[test]
fn a_consumer_rank_waiting_on_its_inbox_fails_at_once_when_rank_0_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let control = d.join("control");
    let (store, _) = open(Store::Dir, d);
    let producer = produce(&control, &store, 32, &["--fault", "publish:6"]);
    let group = format!("unix://{}", d.join("group.sock").display());
    let mut ranks: Vec<Guard> = ["0", "1"]
        .into_iter()
        .map(|rank| {
            let extra = ["--rank", rank, "--group", group.as_str()];
            consume(&control, &store, &d.join(format!("rank{rank}.sums")), &extra)
        })
        .collect();
    assert_crashed_at(&producer.finish_within("the producer", PROMPT), "the producer", "publish:6");
    wait_until("both ranks acknowledge the first window", ROLE_DEADLINE, || consumed_count(&control) >= 4);
    ranks[0].kill();
    let killed = Instant::now();
    let out = ranks.pop().unwrap().finish_within("rank 1 after rank 0 was killed", PROMPT);
    assert!(killed.elapsed() < Duration::from_secs(5), "rank 1 took {:?} to notice", killed.elapsed());
    assert_failed_naming(&out, "rank 1", &["online consumer failed", "rank 0 (the ref distributor) is gone"]);
    let published_failure = std::fs::read_to_string(control.join("refs.jsonl.consumer_failed")).ok();
    assert_eq!(published_failure, None, "a lost rank is resumable, not terminal");
    assert_eq!(acked(&control).len(), 4);
}

// ---------------------------------------------------------------------------------------------
// (c) The producer crashes: the consumer fails at its idle timeout, having trained a subset.
// ---------------------------------------------------------------------------------------------

/// The producer (32 samples, leases of 3) crashes at `fault`; `put` samples were put by then,
/// `expect_published` of them published. The consumer (idle timeout 2 s: enough that a loaded
/// machine does not time it out before the producer crashed) trains whole windows of 4 and then
/// fails naming the idle timeout.
fn crash_the_producer(store: Store, fault: &str, put: u64, expect_published: usize) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let expected = synth(&d.join("dump"), 32);
    let control = d.join("control");
    let (uri, daemon) = open(store, d);
    let producer = produce(&control, &uri, 32, &["--fault", fault]);
    let consumer = consume(&control, &uri, &d.join("trained.sums"), &["--idle-timeout", "2"]);
    assert_crashed_at(&producer.finish_within("the crashing producer", PROMPT), "the producer", fault);
    let out = consumer.finish_within("the consumer of a dead producer", PROMPT);
    // (v) The consumer says why, and tells the (dead) producer through `.consumer_failed`.
    // Its ranks' inbox queues and its distributor share the idle timeout: whichever times out
    // first is the error, and either says the source went quiet ("... dead?").
    assert_failed_naming(&out, "the consumer", &["online consumer failed", "timed out", "dead?"]);
    let failed = std::fs::read_to_string(control.join("refs.jsonl.consumer_failed")).unwrap();
    assert!(failed.contains("TimeoutError") && failed.contains("dead?"), "{failed}");
    assert!(!control.join("refs.jsonl.closed").exists() && !control.join("refs.jsonl.failed").exists());

    let published = published(&control);
    assert_eq!(published.len(), expect_published);
    let trained = checksums(&d.join("trained.sums"));
    assert_once_with_right_bytes(&trained, &expected);
    let trained_ids: BTreeSet<String> = trained.iter().map(|(id, _)| id.clone()).collect();
    assert!(trained_ids.iter().all(|id| published.contains(id)), "trained only what was published");
    // Whole windows of 4 were trained and durably acknowledged; the partial one never dispatched.
    assert_eq!(trained.len(), expect_published / 4 * 4);
    assert_eq!(acked(&control), trained_ids, "everything trained was durably acknowledged");
    assert_eq!(consumed_count(&control), trained.len() as u64);

    let leftover = (expect_published - trained.len()) as u64; // published, never trained
    let unpublished = put - expect_published as u64;
    match daemon {
        Some(daemon) => assert_dead_producer_left(&daemon, leftover),
        None => {
            // Nobody cleans a dead producer's store up: what it put and nobody trained stays.
            let held = samples_in_dir_store(&d.join("store"));
            assert_eq!(held.len() as u64, leftover + unpublished, "{held:?}");
            assert!(held.iter().all(|id| !trained_ids.contains(id)), "trained features were deleted at the ack");
        }
    }
}

/// The producer crashes in its always-run cleanup, after the consumer finished: nothing is
/// lost, since the consumer deleted every feature at its durable acks.
fn crash_the_producer_in_cleanup(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let control = d.join("control");
    let (uri, daemon) = open(store, d);
    let producer = produce(&control, &uri, 32, &["--fault", "cleanup"]);
    succeed(consume(&control, &uri, &d.join("trained.sums"), &["--idle-timeout", "30"]), "the consumer");
    assert_crashed_at(&producer.finish_within("the producer", PROMPT), "the producer", "cleanup");
    let trained = checksums(&d.join("trained.sums"));
    let expected = synth(&d.join("dump"), 32);
    assert_once_with_right_bytes(&trained, &expected);
    assert_eq!(trained.len(), 32);
    assert_eq!(acked(&control).len(), 32);
    assert_eq!(consumed_count(&control), 32);
    assert!(control.join("refs.jsonl.closed").exists() && control.join("refs.jsonl.consumer_done").exists());
    match daemon {
        Some(daemon) => daemon.assert_empty(),
        None => assert_eq!(files_under(&d.join("store")), Vec::<String>::new()),
    }
}

// put:11 with leases of 3: calls 1-3 put and published 9 samples, call 4 put 10 and 11 and
// crashed before publishing them. 2 windows of 4 train; the 9th sample waits for a window.
#[test]
fn a_producer_crashed_at_a_put_fails_the_consumer_at_its_idle_timeout_dir() {
    crash_the_producer(Store::Dir, "put:11", 11, 9);
}

#[test]
fn a_producer_crashed_at_a_put_fails_the_consumer_at_its_idle_timeout_daemon() {
    crash_the_producer(Store::Daemon, "put:11", 11, 9);
}

// publish:9: the 4th capture call starts after 9 samples were published, and crashes.
#[test]
fn a_producer_crashed_after_publishing_fails_the_consumer_at_its_idle_timeout_dir() {
    crash_the_producer(Store::Dir, "publish:9", 9, 9);
}

#[test]
fn a_producer_crashed_after_publishing_fails_the_consumer_at_its_idle_timeout_daemon() {
    crash_the_producer(Store::Daemon, "publish:9", 9, 9);
}

#[test]
fn a_producer_crashed_in_its_cleanup_loses_nothing_dir() {
    crash_the_producer_in_cleanup(Store::Dir);
}

#[test]
fn a_producer_crashed_in_its_cleanup_loses_nothing_daemon() {
    crash_the_producer_in_cleanup(Store::Daemon);
}

// ---------------------------------------------------------------------------------------------
// (d) The daemon dies mid-run.
// ---------------------------------------------------------------------------------------------

#[test]
fn a_killed_daemon_fails_producer_and_consumer_at_once_and_a_fresh_daemon_serves_a_fresh_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut daemon = Daemon::start(d, &["--retain-on-release"]);
    let control = d.join("control");
    // More samples than the run can get through before the kill: it is mid-run when it dies.
    let producer = produce(&control, &daemon.uri(), 20_000, &[]);
    let consumer = consume(&control, &daemon.uri(), &d.join("trained.sums"), &["--idle-timeout", "60"]);
    wait_until("the consumer acknowledges 8 samples", ROLE_DEADLINE, || consumed_count(&control) >= 8);
    daemon.kill();
    let killed = Instant::now();
    let consumer = consumer.finish_within("the consumer after the daemon died", PROMPT);
    let producer = producer.finish_within("the producer after the daemon died", PROMPT);
    assert!(killed.elapsed() < PROMPT);
    // Both fail (exit 1), and their stderr names the lost connection. Which one notices first
    // is a race, and the other's primary error is then the first one's failure, read from its
    // sentinel. The producer's own primary error names its last capture error.
    for (out, what) in [(&consumer, "the consumer"), (&producer, "the producer")] {
        assert_eq!(out.status.code(), Some(1), "{what}: {:?}\n{}", out.status, stderr(out));
        let err = stderr(out).to_lowercase();
        assert!(
            err.contains("connection") || err.contains("broken pipe"),
            "{what} does not name the lost daemon:\n{err}"
        );
    }
    assert_failed_naming(&producer, "the producer", &["online producer failed"]);
    assert_failed_naming(&consumer, "the consumer", &["online consumer failed"]);
    assert!(
        control.join("refs.jsonl.failed").exists() || control.join("refs.jsonl.consumer_failed").exists(),
        "(v) a sentinel says the attempt failed"
    );
    let published = published(&control);
    let trained = trained(&d.join("trained.sums"));
    let distinct: BTreeSet<&String> = trained.iter().map(|(id, _)| id).collect();
    assert_eq!(distinct.len(), trained.len(), "each sample trained once");
    assert!(distinct.iter().all(|id| published.contains(id)), "trained only what was published");

    // A fresh daemon on the same socket (the dead one's file replaced) serves a fresh attempt.
    let daemon = Daemon::start(d, &["--retain-on-release"]);
    daemon.assert_empty();
    let control = d.join("control2");
    let producer = produce(&control, &daemon.uri(), 16, &[]);
    succeed(consume(&control, &daemon.uri(), &d.join("fresh.sums"), &["--idle-timeout", "30"]), "the fresh consumer");
    succeed(producer, "the fresh producer");
    let fresh = checksums(&d.join("fresh.sums"));
    assert_eq!(fresh.len(), 16);
    assert_once_with_right_bytes(&fresh, &synth(&d.join("dump16"), 16));
    assert_eq!(consumed_count(&control), 16);
    daemon.assert_empty();
}

// ---------------------------------------------------------------------------------------------
// (e) Offline: ingest into a daemon, and offline consumer ranks.
// ---------------------------------------------------------------------------------------------

/// A 16-sample `ferry synth` dump, and its checksums by key.
fn offline_dump(dir: &Path) -> (std::path::PathBuf, BTreeMap<String, u64>) {
    let dump = dir.join("dump");
    let sums = synth(&dump, 16);
    (dump, sums)
}

/// `ferry ingest` of `dump` into `store` with one worker (puts in file order).
fn ingest(dump: &Path, store: &str, manifest: &Path, extra: &[&str]) -> Guard {
    let mut cmd = ferry();
    cmd.arg("ingest").arg(dump).args(["--store", store, "--manifest"]).arg(manifest);
    cmd.args(["--workers", "1"]).args(extra);
    spawn(cmd)
}

/// `ferry consume --manifest` (DP 2, batches of 2, 2 epochs) writing what it trained to `sums`.
fn consume_offline(store: &str, manifest: &Path, sums: &Path, extra: &[&str]) -> Guard {
    let mut cmd = ferry();
    cmd.args(["consume", "--store", store, "--manifest"]).arg(manifest);
    cmd.args(["--dp", "2", "--batch", "2", "--epochs", "2", "--checksums"]).arg(sums).args(extra);
    spawn(cmd)
}

fn sentinel(manifest: &Path, suffix: &str) -> std::path::PathBuf {
    format!("{}{suffix}", manifest.display()).into()
}

#[test]
fn an_ingest_crashed_at_a_put_fails_the_consumer_at_its_wait_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (dump, _) = offline_dump(d);
    let daemon = Daemon::start(d, &["--retain-on-release"]);
    let manifest = d.join("control/manifest.json");
    let consumer = consume_offline(&daemon.uri(), &manifest, &d.join("trained.sums"), &["--wait-timeout", "2"]);
    assert_crashed_at(
        &ingest(&dump, &daemon.uri(), &manifest, &["--fault", "put:5"]).finish("ingest"),
        "ingest",
        "put:5",
    );
    let out = consumer.finish_within("the consumer of a dead ingest", PROMPT);
    assert_failed_naming(&out, "the consumer", &["offline consumer failed", "timed out", "manifest.json.done"]);
    assert!(sentinel(&manifest, ".consumer_failed").exists(), "(v) the consumer's failure is published");
    assert!(!sentinel(&manifest, ".done").exists() && !sentinel(&manifest, ".failed").exists(), "a crash writes none");
    assert!(trained(&d.join("trained.sums")).is_empty());
    // The five samples the dead ingest put were never published: nobody but the daemon can free them.
    assert_dead_producer_left(&daemon, 0);
}

#[test]
fn an_ingest_killed_while_holding_never_hangs_the_consumer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (dump, expected) = offline_dump(d);
    let daemon = Daemon::start(d, &["--retain-on-release"]);
    let manifest = d.join("control/manifest.json");
    let mut holding = ingest(&dump, &daemon.uri(), &manifest, &["--hold-timeout", "60"]);
    wait_until("ingest writes .done", ROLE_DEADLINE, || {
        assert!(!holding.exited(), "ingest exited before .done");
        sentinel(&manifest, ".done").exists()
    });
    holding.kill(); // SIGKILL while holding: no `.failed`, no cleanup
    assert!(!sentinel(&manifest, ".failed").exists());
    // A holding ingest still owns its samples: the daemon frees them with its session, and the
    // consumer (which `.done` lets start) finds them gone: it fails at once, naming the freed
    // sample, and publishes `.consumer_failed`. No hang, no leak.
    assert_dead_producer_left(&daemon, 0);
    let out = consume_offline(&daemon.uri(), &manifest, &d.join("trained.sums"), &["--wait-timeout", "2"])
        .finish_within("the consumer of a killed holder", PROMPT);
    assert_failed_naming(&out, "the consumer", &["offline consumer failed", "was released/aborted"]);
    let failed = std::fs::read_to_string(sentinel(&manifest, ".consumer_failed")).unwrap();
    assert!(failed.contains("was released/aborted"), "{failed}");
    assert!(!sentinel(&manifest, ".consumed").exists());
    for (id, sum) in trained(&d.join("trained.sums")) {
        assert_eq!(expected.get(&key(&id)), Some(&sum), "{id}: trained bytes differ from the dump's");
    }
    daemon.assert_empty();
}

/// An offline consumer rank dies mid-epoch: its peer stops at once, nothing terminal is
/// published (the holding ingest keeps its samples for a rerun), and the consumer run again
/// trains every sample, writes `.consumed`, and the ingest frees everything.
#[test]
fn a_killed_offline_consumer_rank_stops_its_peer_and_a_rerun_completes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (dump, expected) = offline_dump(d);
    let daemon = Daemon::start(d, &["--retain-on-release"]);
    let manifest = d.join("control/manifest.json");
    let group = format!("unix://{}", d.join("group.sock").display());
    let start_ranks = |fault: Option<&str>, tag: &str| -> Vec<Guard> {
        ["0", "1"]
            .into_iter()
            .map(|rank| {
                let mut extra = vec!["--rank", rank, "--group", group.as_str(), "--wait-timeout", "60"];
                extra.extend(["--group-timeout", "60"]);
                if let (Some(fault), "1") = (fault, rank) {
                    extra.extend(["--fault", fault]);
                }
                consume_offline(&daemon.uri(), &manifest, &d.join(format!("{tag}{rank}.sums")), &extra)
            })
            .collect()
    };
    // The ranks meet first, then wait for `.done`; rank 1 crashes after its second batch.
    let ranks = start_ranks(Some("train:2"), "first");
    let holding = ingest(&dump, &daemon.uri(), &manifest, &["--hold-timeout", "60"]);
    let mut ranks = ranks.into_iter();
    let (rank0, rank1) = (ranks.next().unwrap(), ranks.next().unwrap());
    assert_crashed_at(&rank1.finish_within("rank 1", PROMPT), "rank 1", "train:2");
    let out = rank0.finish_within("rank 0 after rank 1 died", PROMPT);
    assert_failed_naming(&out, "rank 0", &["offline consumer failed", "collective all-gather"]);
    assert!(!sentinel(&manifest, ".consumer_failed").exists(), "a lost rank is not a terminal failure");
    assert!(!sentinel(&manifest, ".consumed").exists());
    // Run again: the holding ingest still has every sample.
    for (rank, guard) in start_ranks(None, "second").into_iter().enumerate() {
        succeed(guard, &format!("rerun rank {rank}"));
    }
    let mut sums = checksums_by_key(&d.join("second0.sums"));
    sums.extend(checksums_by_key(&d.join("second1.sums")));
    assert_eq!(sums, expected, "the rerun trained every sample with the generator's bytes");
    assert!(sentinel(&manifest, ".consumed").exists());
    succeed(holding, "the holding ingest");
    daemon.assert_empty();
}
