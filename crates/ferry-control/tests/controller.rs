//! The controller (SpecForge §13.1): prompt leasing with retries and terminal failure, atomic
//! batch validation, commits de-duplicated by the ledger's answer, the staging queue, durable
//! acknowledgements, and restart reconciliation over a SQLite ledger reopened as a restarted
//! process would (crash before the ack replays everything; crash after it releases exactly the
//! acknowledged samples and deletes their features).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use ferry_control::controller::{ControllerOptions, DataFlowController};
use ferry_control::ledger::{InMemoryLedger, Ledger, NoOpLedger, SqliteLedger};
use ferry_control::queue::RefQueue;
use ferry_core::{Error, JsonMap, Result, SampleId, SampleRef, TensorView};
use ferry_store::{FeatureStoreApi, StoreOptions, open_store};
use serde_json::json;
use std::sync::Arc;

fn prompt(value: serde_json::Value) -> JsonMap {
    value.as_object().unwrap().clone()
}

fn controller(ledger: Arc<dyn Ledger>) -> DataFlowController {
    DataFlowController::new(ControllerOptions::new("run0"), ledger)
}

fn memory() -> DataFlowController {
    controller(Arc::new(InMemoryLedger::new()))
}

/// Puts a small sample into `store` (optionally tied to a prompt task) and returns its ref.
fn put(store: &dyn FeatureStoreApi, sid: &str, task: Option<&str>) -> SampleRef {
    let ids: Vec<i64> = (0..4).collect();
    let mut r =
        store.put(sid, &[("input_ids", TensorView::from_elements(&[4], &ids).unwrap())], JsonMap::new()).unwrap();
    r.source_task_id = task.map(str::to_owned);
    r
}

fn mem_store() -> Arc<dyn FeatureStoreApi> {
    Arc::new(open_store("mem://ctl", StoreOptions::default()).unwrap())
}

fn sid(s: &str) -> SampleId {
    SampleId::new(s)
}

#[test]
fn prompts_are_ingested_in_order_atomically_and_with_specforges_defaults() {
    let c = memory();
    let ids = c
        .ingest_prompts(&[
            prompt(json!({"task_id": "t0", "payload": {"text": "hi"}, "max_length": 512})),
            prompt(json!({"text": "whole map is the payload"})),
            prompt(json!({"task_id": "t2", "payload": {"ids": [1, 2]}, "source_id": "gsm8k", "attempt": 0})),
        ])
        .unwrap();
    assert_eq!(ids[0], "t0");
    assert!(ids[1].starts_with("task-") && ids[1].len() == "task-".len() + 12, "{}", ids[1]);
    assert_eq!(ids[2], "t2");
    let leased = c.lease_prompt_tasks("w0", 10);
    assert_eq!(leased.iter().map(|t| t.task_id.as_str()).collect::<Vec<_>>(), ids);
    assert_eq!((leased[0].max_length, leased[1].max_length), (512, 2048));
    assert_eq!(leased[1].payload["text"], "whole map is the payload");
    assert_eq!((leased[0].source_id.as_str(), leased[2].source_id.as_str()), ("prompt_source", "gsm8k"));
    assert_eq!(leased[0].run_id, "run0");

    // One bad prompt ingests nothing, and the error names it.
    let c = memory();
    for bad in [
        json!({"payload": "not a map"}),
        json!({"payload": {}, "max_length": "long"}),
        json!({"payload": {}, "max_lenght": 5}),
    ] {
        let err = c.ingest_prompts(&[prompt(json!({"task_id": "ok", "payload": {}})), prompt(bad)]).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)) && err.to_string().contains("prompt 1"), "{err}");
        assert_eq!(c.status().unwrap().prompts, 0);
    }
}

#[test]
fn prompt_failures_replay_until_attempts_run_out_and_terminal_ones_are_never_leased_again() {
    let options = ControllerOptions { max_prompt_attempts: Some(2), ..ControllerOptions::new("run0") };
    let c = DataFlowController::new(options, Arc::new(InMemoryLedger::new()));
    c.ingest_prompts(&[prompt(json!({"task_id": "a", "payload": {}})), prompt(json!({"task_id": "b", "payload": {}}))])
        .unwrap();
    let first = c.lease_prompt_tasks("w0", 2);
    assert_eq!(first.len(), 2);
    // Another worker cannot fail or complete w0's tasks.
    c.fail_prompt_tasks("w1", &["a".into()], "not mine", false);
    c.complete_prompt_tasks("w1", &["a".into()]);
    assert_eq!(c.status().unwrap().prompts_leased, 2);

    c.fail_prompt_tasks("w0", &["a".into()], "capture timeout", true);
    c.fail_prompt_tasks("w0", &["b".into()], "bad prompt", false);
    let status = c.status().unwrap();
    assert_eq!((status.prompts_pending, status.prompts_leased, status.prompts_failed), (1, 0, 1));
    let replay = c.lease_prompt_tasks("w0", 5);
    assert_eq!(replay.len(), 1, "the terminal failure is not leased again");
    assert_eq!((replay[0].task_id.as_str(), replay[0].attempt), ("a", 1));
    c.fail_prompt_tasks("w0", &["a".into()], "capture timeout", true);
    let failed = c.failed_prompt_tasks();
    assert_eq!(failed[0], ("b".to_owned(), "bad prompt".to_owned()));
    assert_eq!(failed[1], ("a".to_owned(), "capture timeout (attempts exhausted: 2)".to_owned()));
    assert!(c.lease_prompt_tasks("w0", 5).is_empty());
    c.fail_prompt_tasks("w0", &["unknown".into()], "x", true);
}

#[test]
fn a_commit_is_idempotent_clears_its_prompt_and_stages_the_ref_once() {
    let store = mem_store();
    let c = memory();
    c.ingest_prompts(&[prompt(json!({"task_id": "t0", "payload": {}}))]).unwrap();
    c.lease_prompt_tasks("w0", 1);
    let r = put(store.as_ref(), "run0:t0", Some("t0"));
    assert_eq!(c.commit_samples("w0", std::slice::from_ref(&r)).unwrap(), vec![r.clone()]);
    assert!(c.commit_samples("w0", std::slice::from_ref(&r)).unwrap().is_empty(), "a second commit is not fresh");
    let status = c.status().unwrap();
    assert_eq!((status.samples_committed, status.queue_depth), (1, 1));
    assert_eq!((status.prompts, status.prompts_leased), (0, 0), "the commit cleared the prompt lease");

    // Re-put of the same sample and a double commit: one committed, one staged, one resident.
    let again = put(store.as_ref(), "run0:t0", Some("t0"));
    assert!(c.commit_samples("w0", &[again.clone(), again]).unwrap().is_empty());
    assert_eq!(c.status().unwrap().queue_depth, 1);
    assert_eq!(store.health().unwrap().resident_samples, 1);
}

#[test]
fn a_producer_controller_completes_prompts_without_retaining_refs() {
    let store = mem_store();
    let options = ControllerOptions { enable_sample_queue: false, ..ControllerOptions::new("run0") };
    let c = DataFlowController::new(options, Arc::new(NoOpLedger));
    c.ingest_prompts(&[prompt(json!({"task_id": "t0", "payload": {}}))]).unwrap();
    c.lease_prompt_tasks("w0", 1);
    let r = put(store.as_ref(), "run0:t0", Some("t0"));
    assert_eq!(c.commit_samples("w0", std::slice::from_ref(&r)).unwrap().len(), 1);
    assert_eq!(c.commit_samples("w0", &[r]).unwrap().len(), 1, "the no-op ledger calls everything fresh");
    let status = c.status().unwrap();
    assert_eq!((status.prompts, status.samples_committed, status.queue_depth), (0, 0, 0));
    assert!(c.sample_queue().is_none());
    assert!(c.reconcile_on_restart(None).is_err(), "reconciliation needs a staging queue");
}

/// A ledger whose commit fails, to show a failed batch stages nothing.
struct FailingLedger(InMemoryLedger);

impl Ledger for FailingLedger {
    fn commit_samples(&self, _refs: &[SampleRef]) -> Result<Vec<bool>> {
        Err(Error::Backend {
            backend: "test".into(),
            operation: "commit".into(),
            key: "batch".into(),
            message: "injected".into(),
        })
    }
    fn is_committed(&self, id: &SampleId) -> Result<bool> {
        self.0.is_committed(id)
    }
    fn get_committed(&self, id: &SampleId) -> Result<Option<SampleRef>> {
        self.0.get_committed(id)
    }
    fn committed_count(&self) -> Result<u64> {
        self.0.committed_count()
    }
    fn all_committed_ids(&self) -> Result<Vec<SampleId>> {
        self.0.all_committed_ids()
    }
    fn record_train_ack(&self, ids: &[SampleId], step: Option<i64>, durable: bool) -> Result<()> {
        self.0.record_train_ack(ids, step, durable)
    }
    fn durable_marker(&self) -> Result<ferry_control::ledger::DurableMarker> {
        self.0.durable_marker()
    }
}

#[test]
fn a_failed_commit_stages_nothing() {
    let store = mem_store();
    let c = controller(Arc::new(FailingLedger(InMemoryLedger::new())));
    let refs = [put(store.as_ref(), "run0:a", None), put(store.as_ref(), "run0:b", None)];
    assert!(c.commit_samples("w0", &refs).is_err());
    assert_eq!(c.status().unwrap().queue_depth, 0);
}

#[test]
fn acks_record_the_marker_and_settle_the_staged_refs() {
    let store = mem_store();
    let c = memory();
    let refs = [put(store.as_ref(), "run0:a", None), put(store.as_ref(), "run0:b", None)];
    c.commit_samples("w0", &refs).unwrap();
    let queue = c.sample_queue().unwrap();
    assert_eq!(queue.get(2, None).unwrap().len(), 2);
    c.ack_train_refs("trainer-0", &[sid("run0:a"), sid("run0:b")], Some(7), true).unwrap();
    let status = c.status().unwrap();
    assert_eq!((status.durable_global_step, status.durable_acked), (Some(7), 2));
    assert_eq!((status.queue_depth, status.queue_in_flight, status.train_backlog), (0, 0, 0));

    // Without a step: the ids are recorded and the step stays unset.
    let c = memory();
    c.commit_samples("w0", &refs[..1]).unwrap();
    c.ack_train_refs("trainer-0", &[sid("run0:a")], None, false).unwrap();
    let marker = c.ledger().durable_marker().unwrap();
    assert_eq!(marker.global_step, None);
    assert!(marker.acked.contains(&sid("run0:a")) && !marker.optimizer_durable);
    assert!(c.register_trainer(None, JsonMap::new()).starts_with("trainer-"));
    assert_eq!(c.register_rollout_worker(Some("w7"), JsonMap::new()), "w7");
    let status = c.status().unwrap();
    assert_eq!((status.trainers, status.rollout_workers), (1, 1));
}

#[test]
fn a_crash_before_the_durable_ack_replays_every_committed_sample() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state/consumer.sqlite");
    let store = mem_store();
    let refs: Vec<SampleRef> = (0..3).map(|i| put(store.as_ref(), &format!("run0:s{i}"), None)).collect();
    {
        let c = controller(Arc::new(SqliteLedger::open_fresh(&db).unwrap()));
        c.commit_samples("distributor", &refs).unwrap();
        c.sample_queue().unwrap().get(3, None).unwrap(); // leased to the trainer, then the process dies
    }
    let c = controller(Arc::new(SqliteLedger::open_existing(&db).unwrap()));
    let rec = c.reconcile_on_restart(Some(store.as_ref())).unwrap();
    assert_eq!(rec.requeued, vec![sid("run0:s0"), sid("run0:s1"), sid("run0:s2")]);
    assert!(rec.released.is_empty() && !rec.optimizer_durable);
    assert_eq!(c.sample_queue().unwrap().pending_ids(), rec.requeued);
    assert_eq!(store.health().unwrap().resident_samples, 3, "nothing deleted");
    // Idempotent: a second reconciliation stages nothing twice.
    c.reconcile_on_restart(Some(store.as_ref())).unwrap();
    assert_eq!(c.sample_queue().unwrap().depth(), 3);
}

#[test]
fn a_crash_after_the_durable_ack_releases_exactly_the_acked_samples_and_deletes_their_features() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("consumer.sqlite");
    let store = mem_store();
    let refs: Vec<SampleRef> = (0..3).map(|i| put(store.as_ref(), &format!("run0:s{i}"), None)).collect();
    {
        let c = controller(Arc::new(SqliteLedger::open_fresh(&db).unwrap()));
        c.commit_samples("distributor", &refs).unwrap();
        c.sample_queue().unwrap().get(3, None).unwrap();
        c.ack_train_refs("trainer-0", &[sid("run0:s0"), sid("run0:s1")], Some(1), true).unwrap();
    }
    let c = controller(Arc::new(SqliteLedger::open_existing(&db).unwrap()));
    let rec = c.reconcile_on_restart(Some(store.as_ref())).unwrap();
    assert_eq!(rec.released, vec![sid("run0:s0"), sid("run0:s1")]);
    assert_eq!(rec.requeued, vec![sid("run0:s2")]);
    assert_eq!((rec.global_step, rec.optimizer_durable), (Some(1), true));
    assert_eq!(c.sample_queue().unwrap().pending_ids(), vec![sid("run0:s2")]);
    let health = store.health().unwrap();
    assert_eq!(health.resident_samples, 1, "the acknowledged samples' features are gone");
    assert!(store.get(&refs[0], None).unwrap_err().is_not_available());
    assert!(store.get(&refs[2], None).is_ok());
}

#[test]
fn a_marker_that_is_not_optimizer_durable_requeues_even_acked_samples() {
    let store = mem_store();
    let c = memory();
    let refs = [put(store.as_ref(), "run0:a", None)];
    c.commit_samples("d", &refs).unwrap();
    c.ack_train_refs("t", &[sid("run0:a")], Some(3), false).unwrap();
    let rec = c.reconcile_on_restart(Some(store.as_ref())).unwrap();
    assert_eq!((rec.requeued.len(), rec.released.len()), (1, 0));
}
