//! The metadata stores against `SPECFORGE-RUNTIME.md` §13.2, and the SQLite ledger against
//! SpecForge's own database: ferry reads and extends what SpecForge wrote, writes `ref_json`
//! byte for byte as SpecForge does, and Python's `sqlite3` reads what ferry wrote.
//!
//! The behaviours every retaining ledger shares run over both [`InMemoryLedger`] and
//! [`SqliteLedger`] through [`for_each_retaining_ledger`].
#![allow(clippy::unwrap_used, clippy::expect_used)]

use ferry_control::ledger::{DurableMarker, InMemoryLedger, Ledger, NoOpLedger, SqliteLedger};
use ferry_core::json::sample_ref_from_str;
use ferry_core::{Error, SampleId, SampleRef};
use indexmap::IndexMap;
use proptest::prelude::*;
use rusqlite::Connection;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------------
// helpers

fn fixtures() -> PathBuf {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures"));
    assert!(dir.is_dir(), "SpecForge fixtures not found at {}: put shared/ beside the repository", dir.display());
    dir.canonicalize().unwrap()
}

/// A copy of SpecForge's ledger in a fresh temporary directory. Never open the fixture in
/// place: WAL mode creates `-wal`/`-shm` files beside it, and the fixtures must stay untouched.
fn specforge_ledger_copy() -> (TempDir, PathBuf) {
    let source = fixtures().join("specforge-control/ledger.db");
    for companion in ["ledger.db-wal", "ledger.db-shm"] {
        assert!(
            !fixtures().join("specforge-control").join(companion).exists(),
            "{companion} beside the fixture: the fixture was opened in place"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("ledger.db");
    std::fs::copy(&source, &copy).unwrap();
    (dir, copy)
}

/// The complete records of SpecForge's `refs.jsonl`, first publication of each sample only
/// (the file holds a duplicate publication and a torn trailing record).
fn fixture_refs() -> Vec<SampleRef> {
    let text = std::fs::read_to_string(fixtures().join("specforge-control/refs.jsonl")).unwrap();
    let mut refs: IndexMap<SampleId, SampleRef> = IndexMap::new();
    for line in text.split_inclusive('\n').filter(|line| line.ends_with('\n')) {
        let r = sample_ref_from_str(line.trim_end()).unwrap();
        refs.entry(r.sample_id.clone()).or_insert(r);
    }
    let ids: Vec<&str> = refs.keys().map(SampleId::as_str).collect();
    assert_eq!(ids, ["run0:task0", "run0:task1", "run0:task2"]);
    refs.into_values().collect()
}

/// A ref whose JSON exercises Python's spelling: non-ASCII text, floats, nulls, nesting.
fn sample(id: &str) -> SampleRef {
    let json = format!(
        r#"{{"sample_id": "{id}", "run_id": "run-t", "source_task_id": "task-{id}",
            "feature_store_uri": "disagg://t/{id}",
            "feature_keys": {{"input_ids": "{id}/input_ids"}},
            "feature_specs": {{"input_ids": {{"name": "input_ids", "shape": [1, 7], "dtype": "int64",
                "device_hint": null, "required": true, "target_repr": null, "target_meta": {{}}}}}},
            "strategy": "eagle3", "num_tokens": 7, "estimated_bytes": 56,
            "metadata": {{"generation": 2, "note": "h\u00e9llo \u2713 \ud83d\ude80", "weight": 0.5,
                "tiny": 1e-05, "nested": {{"a": [1, null, 2.0]}}}}}}"#
    );
    sample_ref_from_str(&json).unwrap()
}

fn samples(ids: &[&str]) -> Vec<SampleRef> {
    ids.iter().map(|id| sample(id)).collect()
}

fn ids(ids: &[&str]) -> Vec<SampleId> {
    ids.iter().map(|id| SampleId::from(*id)).collect()
}

fn id_set(ids: &[&str]) -> BTreeSet<SampleId> {
    ids.iter().map(|id| SampleId::from(*id)).collect()
}

fn new_sqlite() -> (TempDir, SqliteLedger) {
    let dir = tempfile::tempdir().unwrap();
    let ledger = SqliteLedger::open_fresh(dir.path().join("ledger.db")).unwrap();
    (dir, ledger)
}

/// Runs `check` on a new, empty ledger of every kind that retains what it is given.
fn for_each_retaining_ledger(check: impl Fn(&str, &dyn Ledger)) {
    check("in-memory", &InMemoryLedger::new());
    let (_dir, sqlite) = new_sqlite();
    check("sqlite", &sqlite);
}

fn invalid_argument_message(result: Result<SqliteLedger, Error>) -> String {
    match result {
        Err(Error::InvalidArgument(message)) => message,
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

fn raw_rows(path: &Path, sql: &str) -> Vec<(String, Option<String>)> {
    let conn = Connection::open(path).unwrap();
    let mut select = conn.prepare(sql).unwrap();
    select.query_map([], |row| Ok((row.get(0)?, row.get(1)?))).unwrap().map(Result::unwrap).collect()
}

// ---------------------------------------------------------------------------------------------
// §13.2 behaviours shared by every retaining ledger

#[test]
fn duplicate_commit_is_not_fresh_and_counts_once() {
    for_each_retaining_ledger(|kind, ledger| {
        assert!(ledger.commit_sample(&sample("s0")).unwrap(), "{kind}");
        assert!(!ledger.commit_sample(&sample("s0")).unwrap(), "{kind}");
        assert_eq!(ledger.commit_samples(&samples(&["s0"])).unwrap(), [false], "{kind}");
        assert_eq!(ledger.committed_count().unwrap(), 1, "{kind}");
    });
}

#[test]
fn a_repeat_inside_one_batch_is_not_fresh() {
    for_each_retaining_ledger(|kind, ledger| {
        let flags = ledger.commit_samples(&samples(&["a", "b", "a", "c", "b"])).unwrap();
        assert_eq!(flags, [true, true, false, true, false], "{kind}");
        assert_eq!(ledger.committed_count().unwrap(), 3, "{kind}");
        assert_eq!(ledger.commit_samples(&[]).unwrap(), Vec::<bool>::new(), "{kind}");
    });
}

#[test]
fn committed_ids_keep_first_commit_order_and_refs_round_trip() {
    for_each_retaining_ledger(|kind, ledger| {
        ledger.commit_samples(&samples(&["c", "a"])).unwrap();
        ledger.commit_samples(&samples(&["b", "a", "d"])).unwrap();
        assert_eq!(ledger.all_committed_ids().unwrap(), ids(&["c", "a", "b", "d"]), "{kind}");
        for id in ["a", "b", "c", "d"] {
            assert!(ledger.is_committed(&id.into()).unwrap(), "{kind} {id}");
            assert_eq!(ledger.get_committed(&id.into()).unwrap(), Some(sample(id)), "{kind} {id}");
        }
        assert!(!ledger.is_committed(&"zz".into()).unwrap(), "{kind}");
        assert_eq!(ledger.get_committed(&"zz".into()).unwrap(), None, "{kind}");
    });
}

#[test]
fn marker_unions_ids_replaces_step_only_when_given_and_overwrites_durability() {
    for_each_retaining_ledger(|kind, ledger| {
        assert_eq!(ledger.durable_marker().unwrap(), DurableMarker::default(), "{kind}: starts empty");

        ledger.record_train_ack(&ids(&["b", "a"]), Some(3), true).unwrap();
        let expected = DurableMarker { acked: id_set(&["a", "b"]), global_step: Some(3), optimizer_durable: true };
        assert_eq!(ledger.durable_marker().unwrap(), expected, "{kind}");

        ledger.record_train_ack(&ids(&["b", "c"]), None, false).unwrap();
        let expected =
            DurableMarker { acked: id_set(&["a", "b", "c"]), global_step: Some(3), optimizer_durable: false };
        assert_eq!(ledger.durable_marker().unwrap(), expected, "{kind}: no step keeps 3, durability overwritten");

        ledger.record_train_ack(&[], Some(1), true).unwrap();
        let expected = DurableMarker { acked: id_set(&["a", "b", "c"]), global_step: Some(1), optimizer_durable: true };
        assert_eq!(ledger.durable_marker().unwrap(), expected, "{kind}: a given step replaces, even a smaller one");
    });
}

#[test]
fn ack_without_step_records_ids_with_step_none() {
    for_each_retaining_ledger(|kind, ledger| {
        ledger.record_train_ack(&ids(&["s0"]), None, true).unwrap();
        let expected = DurableMarker { acked: id_set(&["s0"]), global_step: None, optimizer_durable: true };
        assert_eq!(ledger.durable_marker().unwrap(), expected, "{kind}");
    });
}

#[test]
fn concurrent_overlapping_batches_commit_each_id_exactly_once() {
    const THREADS: usize = 4;
    const BATCH: usize = 5;
    for_each_retaining_ledger(|kind, ledger| {
        // Thread t commits ids 10t .. 10t+30 in batches, so every id is offered by up to three
        // threads at once; ids are 0..60 in all.
        let fresh_per_thread: Vec<Vec<SampleId>> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..THREADS)
                .map(|t| {
                    scope.spawn(move || {
                        let refs: Vec<SampleRef> =
                            (10 * t..10 * t + 30).map(|i| sample(&format!("id{i:02}"))).collect();
                        let mut fresh = Vec::new();
                        for batch in refs.chunks(BATCH) {
                            let flags = ledger.commit_samples(batch).unwrap();
                            assert_eq!(flags.len(), batch.len());
                            fresh.extend(batch.iter().zip(flags).filter(|(_, f)| *f).map(|(r, _)| r.sample_id.clone()));
                        }
                        fresh
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        let mut all_fresh: Vec<SampleId> = fresh_per_thread.into_iter().flatten().collect();
        all_fresh.sort();
        let expected: Vec<SampleId> = (0..60).map(|i| SampleId::from(format!("id{i:02}"))).collect();
        assert_eq!(all_fresh, expected, "{kind}: every id fresh for exactly one thread");
        let mut committed = ledger.all_committed_ids().unwrap();
        assert_eq!(committed.len(), 60, "{kind}: no id twice");
        committed.sort();
        assert_eq!(committed, expected, "{kind}");
        assert_eq!(ledger.committed_count().unwrap(), 60, "{kind}");
    });
}

#[test]
fn capability_flags_tell_the_ledgers_apart() {
    assert!(!NoOpLedger.retains() && !NoOpLedger.is_durable());
    let memory = InMemoryLedger::new();
    assert!(memory.retains() && !memory.is_durable());
    let (_dir, sqlite) = new_sqlite();
    assert!(sqlite.retains() && sqlite.is_durable());
}

#[test]
fn noop_accepts_anything_and_retains_nothing() {
    let ledger = NoOpLedger;
    assert_eq!(ledger.commit_samples(&samples(&["a", "a", "b"])).unwrap(), [true, true, true]);
    assert!(ledger.commit_sample(&sample("a")).unwrap(), "a repeat is still fresh: the caller enqueues it");
    assert!(!ledger.is_committed(&"a".into()).unwrap());
    assert_eq!(ledger.get_committed(&"a".into()).unwrap(), None);
    assert_eq!(ledger.committed_count().unwrap(), 0);
    assert!(ledger.all_committed_ids().unwrap().is_empty());
    ledger.record_train_ack(&ids(&["a"]), Some(9), true).unwrap();
    assert_eq!(ledger.durable_marker().unwrap(), DurableMarker::default(), "ack is harmless");
}

// ---------------------------------------------------------------------------------------------
// SQLite: transactions, reopening, freshness rules

/// Makes every insert into `table` that matches `condition` fail, from a second connection,
/// the way a real mid-batch failure (disk full, I/O error) would: `RAISE(ABORT)` fails only the
/// statement and leaves the transaction open, so what happens to the batch's earlier inserts
/// is up to the ledger.
fn poison_inserts(path: &Path, table: &str, condition: &str) {
    let conn = Connection::open(path).unwrap();
    conn.execute_batch(&format!(
        "CREATE TRIGGER poison_{table} BEFORE INSERT ON {table} WHEN {condition} \
         BEGIN SELECT RAISE(ABORT, 'injected failure'); END;"
    ))
    .unwrap();
}

fn cure_inserts(path: &Path, table: &str) {
    Connection::open(path).unwrap().execute_batch(&format!("DROP TRIGGER poison_{table};")).unwrap();
}

#[test]
fn sqlite_batch_commits_whole_or_not_at_all() {
    let (dir, ledger) = new_sqlite();
    let path = dir.path().join("ledger.db");
    poison_inserts(&path, "committed", "NEW.sample_id = 'poison'");

    let err = ledger.commit_samples(&samples(&["a", "b", "poison", "c"])).unwrap_err();
    match &err {
        Error::Backend { backend, operation, key, message } => {
            assert_eq!(backend, "sqlite");
            assert_eq!(operation, "commit samples");
            assert_eq!(key, &path.display().to_string());
            assert!(message.contains("injected failure"), "{message}");
        }
        other => panic!("expected a sqlite backend error, got {other:?}"),
    }
    // "a" and "b" were inserted before the failure; the rollback took them back out.
    assert_eq!(ledger.committed_count().unwrap(), 0);
    assert!(!ledger.is_committed(&"a".into()).unwrap());
    assert!(ledger.all_committed_ids().unwrap().is_empty());
    let seen_by_another_connection: i64 =
        Connection::open(&path).unwrap().query_row("SELECT COUNT(*) FROM committed", [], |r| r.get(0)).unwrap();
    assert_eq!(seen_by_another_connection, 0);

    // The connection was left usable, outside any transaction: the same batch now commits fresh.
    cure_inserts(&path, "committed");
    assert_eq!(ledger.commit_samples(&samples(&["a", "b", "c"])).unwrap(), [true, true, true]);
    drop(ledger);
    let reopened = SqliteLedger::open_existing(&path).unwrap();
    assert_eq!(reopened.all_committed_ids().unwrap(), ids(&["a", "b", "c"]));
}

#[test]
fn sqlite_ack_records_ids_and_marker_together_or_not_at_all() {
    let (dir, ledger) = new_sqlite();
    let path = dir.path().join("ledger.db");
    ledger.record_train_ack(&ids(&["s0"]), Some(1), true).unwrap();
    let before = ledger.durable_marker().unwrap();

    // Failing on an id after another id was inserted ...
    poison_inserts(&path, "acked", "NEW.sample_id = 'poison'");
    assert!(ledger.record_train_ack(&ids(&["s1", "poison"]), Some(2), false).is_err());
    assert_eq!(ledger.durable_marker().unwrap(), before, "s1 must not show");
    cure_inserts(&path, "acked");

    // ... and on the last marker row, after every id and the step were written.
    poison_inserts(&path, "marker", "NEW.k = 'optimizer_durable'");
    assert!(ledger.record_train_ack(&ids(&["s1", "s2"]), Some(2), false).is_err());
    assert_eq!(ledger.durable_marker().unwrap(), before, "neither the ids nor the new step may show");
    cure_inserts(&path, "marker");

    ledger.record_train_ack(&ids(&["s1"]), Some(2), false).unwrap();
    let expected = DurableMarker { acked: id_set(&["s0", "s1"]), global_step: Some(2), optimizer_durable: false };
    assert_eq!(ledger.durable_marker().unwrap(), expected);
}

#[test]
fn sqlite_second_connection_sees_committed_data_and_marker() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run/ledger.db");
    let writer = SqliteLedger::open_fresh(&path).unwrap();
    writer.commit_samples(&samples(&["s0", "s1", "s2"])).unwrap();
    writer.record_train_ack(&ids(&["s0", "s1"]), Some(7), true).unwrap();
    let expected = DurableMarker { acked: id_set(&["s0", "s1"]), global_step: Some(7), optimizer_durable: true };

    // While the writer is still open (WAL lets a reader in) ...
    let reader = SqliteLedger::open_existing(&path).unwrap();
    assert_eq!(reader.all_committed_ids().unwrap(), ids(&["s0", "s1", "s2"]));
    assert_eq!(reader.durable_marker().unwrap(), expected);
    drop(reader);

    // ... and after it is gone, as a restarted authority sees it.
    writer.close().unwrap();
    let restarted = SqliteLedger::open_existing(&path).unwrap();
    assert_eq!(restarted.all_committed_ids().unwrap(), ids(&["s0", "s1", "s2"]));
    assert_eq!(restarted.get_committed(&"s2".into()).unwrap(), Some(sample("s2")));
    assert_eq!(restarted.durable_marker().unwrap(), expected);
    assert!(!restarted.commit_sample(&sample("s1")).unwrap(), "commits survive the restart");
}

#[test]
fn sqlite_uses_specforges_pragmas() {
    let (dir, ledger) = new_sqlite();
    ledger.commit_sample(&sample("s0")).unwrap();
    let conn = Connection::open(dir.path().join("ledger.db")).unwrap();
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
    assert_eq!(mode, "wal", "journal_mode persists in the database file");
}

#[test]
fn open_fresh_refuses_a_ledger_with_committed_rows_and_names_the_count() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let earlier = SqliteLedger::open_fresh(&path).unwrap();
    earlier.commit_samples(&samples(&["s0", "s1"])).unwrap();
    earlier.close().unwrap();

    let message = invalid_argument_message(SqliteLedger::open_fresh(&path));
    assert!(message.contains("already holds 2 committed samples"), "{message}");
    assert!(message.contains("a fresh online attempt cannot reuse a ledger"), "{message}");
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("delete it") && message.contains("resume"), "says what to do: {message}");
    // Refusing changed nothing.
    assert_eq!(SqliteLedger::open_existing(&path).unwrap().committed_count().unwrap(), 2);
}

#[test]
fn open_fresh_refuses_any_existing_ledger_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    SqliteLedger::open(&path).unwrap().close().unwrap();
    let message = invalid_argument_message(SqliteLedger::open_fresh(&path));
    assert!(message.contains("already exists") && message.contains("cannot reuse a ledger"), "{message}");

    for companion in ["-wal", "-shm"] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let leftover = dir.path().join(format!("ledger.db{companion}"));
        std::fs::write(&leftover, b"").unwrap();
        let message = invalid_argument_message(SqliteLedger::open_fresh(&path));
        assert!(message.contains(&leftover.display().to_string()), "{message}");
        assert!(message.contains("delete it or choose a new ledger path"), "{message}");
        assert!(!path.exists(), "refusing must not create the database");
    }
}

#[test]
fn open_fresh_creates_the_parent_directory_and_an_empty_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/ledger.db");
    let ledger = SqliteLedger::open_fresh(&path).unwrap();
    assert_eq!(ledger.path(), path);
    assert_eq!(ledger.committed_count().unwrap(), 0);
    assert_eq!(ledger.durable_marker().unwrap(), DurableMarker::default());
    assert!(path.is_file());
}

#[test]
fn open_existing_refuses_a_missing_or_foreign_database() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.db");
    match SqliteLedger::open_existing(&missing) {
        Err(err @ Error::Io { kind: std::io::ErrorKind::NotFound, .. }) => {
            let message = err.to_string();
            assert!(message.contains(&missing.display().to_string()) && message.contains("resume"), "{message}");
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert!(!missing.exists(), "a refused resume must not create the database");

    let foreign = dir.path().join("foreign.db");
    Connection::open(&foreign).unwrap().execute_batch("CREATE TABLE other (x);").unwrap();
    match SqliteLedger::open_existing(&foreign) {
        Err(Error::Corrupt { message, .. }) => {
            assert!(message.contains("committed, acked, marker"), "{message}")
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }

    assert!(matches!(SqliteLedger::open_existing(dir.path()), Err(Error::InvalidArgument(_))));
}

// ---------------------------------------------------------------------------------------------
// Interop with SpecForge's own ledger

#[test]
fn reads_specforges_ledger() {
    let (_dir, path) = specforge_ledger_copy();
    let ledger = SqliteLedger::open_existing(&path).unwrap();
    let refs = fixture_refs();
    assert_eq!(ledger.committed_count().unwrap(), 3, "the duplicate commit was ignored");
    assert_eq!(ledger.all_committed_ids().unwrap(), ids(&["run0:task0", "run0:task1", "run0:task2"]));
    for r in &refs {
        assert_eq!(ledger.get_committed(&r.sample_id).unwrap().as_ref(), Some(r), "{}", r.sample_id);
    }
    let expected = DurableMarker { acked: id_set(&["run0:task0"]), global_step: Some(1), optimizer_durable: true };
    assert_eq!(ledger.durable_marker().unwrap(), expected);
}

#[test]
fn extends_specforges_ledger() {
    let (_dir, path) = specforge_ledger_copy();
    let ledger = SqliteLedger::open_existing(&path).unwrap();
    let mut task3 = fixture_refs()[2].clone();
    task3.sample_id = "run0:task3".into();
    task3.feature_store_uri = "disagg://fixture/run0:task3".into();
    let again = fixture_refs()[1].clone();
    assert_eq!(ledger.commit_samples(&[again, task3.clone()]).unwrap(), [false, true]);
    ledger.record_train_ack(&ids(&["run0:task1", "run0:task3"]), Some(2), true).unwrap();
    ledger.close().unwrap();

    let reopened = SqliteLedger::open_existing(&path).unwrap();
    assert_eq!(reopened.all_committed_ids().unwrap(), ids(&["run0:task0", "run0:task1", "run0:task2", "run0:task3"]));
    assert_eq!(reopened.get_committed(&"run0:task3".into()).unwrap(), Some(task3));
    let expected = DurableMarker {
        acked: id_set(&["run0:task0", "run0:task1", "run0:task3"]),
        global_step: Some(2),
        optimizer_durable: true,
    };
    assert_eq!(reopened.durable_marker().unwrap(), expected);
    drop(reopened);
    let marker = raw_rows(&path, "SELECT k, v FROM marker ORDER BY k");
    assert_eq!(marker, [("global_step".into(), Some("2".into())), ("optimizer_durable".into(), Some("true".into()))]);
}

#[test]
fn writes_the_same_bytes_as_specforge() {
    let (_fixture_dir, fixture) = specforge_ledger_copy();
    let (dir, ledger) = new_sqlite();
    let ours = dir.path().join("ledger.db");
    let refs = fixture_refs();
    // SpecForge's fixture: the three refs, a duplicate, then a durable ack of task0 at step 1.
    assert_eq!(ledger.commit_samples(&refs).unwrap(), [true, true, true]);
    assert!(!ledger.commit_sample(&refs[0]).unwrap());
    ledger.record_train_ack(&ids(&["run0:task0"]), Some(1), true).unwrap();
    ledger.close().unwrap();

    for (what, sql) in [
        ("schema", "SELECT name, sql FROM sqlite_master WHERE type = 'table' ORDER BY name"),
        ("committed rows", "SELECT sample_id, ref_json FROM committed ORDER BY rowid"),
        ("acked rows", "SELECT sample_id, NULL FROM acked ORDER BY rowid"),
        ("marker rows", "SELECT k, v FROM marker ORDER BY k"),
    ] {
        let theirs = raw_rows(&fixture, sql);
        assert!(!theirs.is_empty(), "{what}: the fixture has some");
        assert_eq!(raw_rows(&ours, sql), theirs, "{what} differ from SpecForge's");
    }
}

/// Python's `sqlite3` reads a ferry ledger as SpecForge would: the rows, the marker and
/// `ref_json` that `json.dumps(json.loads(text))` reproduces exactly (default spacing, ASCII
/// escapes, Python float spelling). Skipped when no `python3` with `sqlite3` is installed.
#[test]
fn python_reads_a_ferry_ledger() {
    let python_ok =
        Command::new("python3").args(["-c", "import sqlite3, json"]).output().is_ok_and(|o| o.status.success());
    if !python_ok {
        eprintln!("skipping python_reads_a_ferry_ledger: no python3 with sqlite3");
        return;
    }
    let (dir, ledger) = new_sqlite();
    let path = dir.path().join("ledger.db");
    ledger.commit_samples(&samples(&["s0", "s1"])).unwrap();
    ledger.commit_samples(&fixture_refs()).unwrap();
    ledger.record_train_ack(&ids(&["s1", "run0:task0"]), Some(12), true).unwrap();
    // Left open on purpose: Python must read through the WAL, as a live reader would.

    const SCRIPT: &str = r#"
import json, sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
ids = []
for sample_id, ref_json in conn.execute("SELECT sample_id, ref_json FROM committed ORDER BY rowid"):
    ref = json.loads(ref_json)
    assert ref["sample_id"] == sample_id, (ref["sample_id"], sample_id)
    assert json.dumps(ref) == ref_json, ref_json
    ids.append(sample_id)
acked = sorted(r[0] for r in conn.execute("SELECT sample_id FROM acked"))
marker = {k: json.loads(v) for k, v in conn.execute("SELECT k, v FROM marker")}
print(json.dumps({"ids": ids, "acked": acked, "global_step": marker.get("global_step"),
                  "optimizer_durable": marker.get("optimizer_durable", False)}))
"#;
    let output = Command::new("python3").arg("-c").arg(SCRIPT).arg(&path).output().unwrap();
    assert!(output.status.success(), "python failed: {}", String::from_utf8_lossy(&output.stderr));
    let seen: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        seen,
        serde_json::json!({
            "ids": ["s0", "s1", "run0:task0", "run0:task1", "run0:task2"],
            "acked": ["run0:task0", "s1"],
            "global_step": 12,
            "optimizer_durable": true,
        })
    );
    drop(ledger);
}

// ---------------------------------------------------------------------------------------------
// Random sequences against a model

#[derive(Debug, Clone)]
enum Op {
    Commit(Vec<u8>),
    Ack { ids: Vec<u8>, global_step: Option<i64>, optimizer_durable: bool },
}

fn op() -> impl Strategy<Value = Op> {
    // A pool of six ids, so repeats (inside and across batches) are frequent.
    let ids = prop::collection::vec(0u8..6, 0..5);
    prop_oneof![
        ids.clone().prop_map(Op::Commit),
        (ids, prop::option::of(0i64..50), any::<bool>()).prop_map(|(ids, global_step, optimizer_durable)| Op::Ack {
            ids,
            global_step,
            optimizer_durable
        }),
    ]
}

fn pool_id(i: u8) -> String {
    format!("s{i}")
}

/// The obvious model: a first-insertion-ordered set of commits and a marker.
#[derive(Default)]
struct Model {
    committed: Vec<String>,
    marker: DurableMarker,
}

fn check_against_model(ledger: &dyn Ledger, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut model = Model::default();
    for op in ops {
        match op {
            Op::Commit(batch) => {
                let refs: Vec<SampleRef> = batch.iter().map(|i| sample(&pool_id(*i))).collect();
                let expected: Vec<bool> = batch
                    .iter()
                    .map(|i| {
                        let id = pool_id(*i);
                        let fresh = !model.committed.contains(&id);
                        if fresh {
                            model.committed.push(id);
                        }
                        fresh
                    })
                    .collect();
                prop_assert_eq!(ledger.commit_samples(&refs).unwrap(), expected);
            }
            Op::Ack { ids, global_step, optimizer_durable } => {
                let ids: Vec<SampleId> = ids.iter().map(|i| pool_id(*i).into()).collect();
                ledger.record_train_ack(&ids, *global_step, *optimizer_durable).unwrap();
                model.marker.record(&ids, *global_step, *optimizer_durable);
            }
        }
    }
    let committed: Vec<SampleId> = model.committed.iter().map(|id| id.as_str().into()).collect();
    prop_assert_eq!(ledger.all_committed_ids().unwrap(), committed);
    prop_assert_eq!(ledger.committed_count().unwrap(), model.committed.len() as u64);
    for i in 0..6 {
        let id = SampleId::from(pool_id(i));
        prop_assert_eq!(ledger.is_committed(&id).unwrap(), model.committed.contains(&pool_id(i)));
    }
    prop_assert_eq!(ledger.durable_marker().unwrap(), model.marker);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn in_memory_agrees_with_the_model(ops in prop::collection::vec(op(), 0..12)) {
        check_against_model(&InMemoryLedger::new(), &ops)?;
    }
}

proptest! {
    // Each case creates a database and fsyncs every commit: fewer cases.
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn sqlite_agrees_with_the_model(ops in prop::collection::vec(op(), 0..12)) {
        let (_dir, ledger) = new_sqlite();
        check_against_model(&ledger, &ops)?;
    }
}
