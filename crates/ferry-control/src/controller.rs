//! [`DataFlowController`]: the control plane's bookkeeping (SpecForge's `DataFlowController`,
//! §13.1). It leases prompt tasks to rollout workers (with retries and terminal failure),
//! commits produced samples through a [`Ledger`] (de-duplicated by the ledger's answer, never by
//! counting), stages fresh refs for training in a [`SampleRefQueue`], records the trainer's
//! durable acknowledgements, and on restart reconciles the ledger: acknowledged samples are
//! released (their features deleted), the rest requeued.
//!
//! It has no run loop and calls nobody: the distributor, the producer driver and the trainer
//! call it. Every batch call validates everything before it changes anything.
//! Records cannot carry tensors (the types have no room for one), so SpecForge's run-time
//! `assert_no_tensors` guard is a compile-time guarantee here.

use crate::ledger::{DurableMarker, Ledger};
use crate::queue::RefQueue;
use crate::record::RefRecord;
use crate::ref_queue::SampleRefQueue;
use ferry_core::{Error, JsonMap, PromptTask, Result, SampleId, SampleRef};
use ferry_store::FeatureStoreApi;
use indexmap::{IndexMap, IndexSet};
use serde::Serialize;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// The default `max_length` of an ingested prompt.
pub const DEFAULT_PROMPT_MAX_LENGTH: i64 = 2048;

/// How a controller is built.
#[derive(Debug, Clone)]
pub struct ControllerOptions {
    /// The run the prompts and samples belong to.
    pub run_id: String,
    /// Attempts a prompt gets before a retryable failure becomes terminal (`None`: unbounded).
    pub max_prompt_attempts: Option<u32>,
    /// Stage fresh refs for training (consumers); a producer's controller does not.
    pub enable_sample_queue: bool,
}

impl ControllerOptions {
    /// Options for `run_id` with SpecForge's defaults (unbounded attempts, a staging queue).
    pub fn new(run_id: impl Into<String>) -> Self {
        ControllerOptions { run_id: run_id.into(), max_prompt_attempts: None, enable_sample_queue: true }
    }
}

/// The controller's counters (SpecForge's `status()`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ControllerStatus {
    /// The run.
    pub run_id: String,
    /// Prompt tasks known (pending, leased or failed).
    pub prompts: usize,
    /// Waiting for a worker.
    pub prompts_pending: usize,
    /// Leased to a worker.
    pub prompts_leased: usize,
    /// Failed for good.
    pub prompts_failed: usize,
    /// Samples the ledger committed.
    pub samples_committed: u64,
    /// Committed but not acknowledged by the trainer.
    pub train_backlog: u64,
    /// Staged refs waiting (0 without a staging queue).
    pub queue_depth: usize,
    /// Staged refs leased.
    pub queue_in_flight: usize,
    /// Registered rollout workers.
    pub rollout_workers: usize,
    /// Registered trainers.
    pub trainers: usize,
    /// The durable marker's global step.
    pub durable_global_step: Option<i64>,
    /// Samples the trainer acknowledged.
    pub durable_acked: usize,
}

/// What [`DataFlowController::reconcile_on_restart`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reconciliation {
    /// Committed, not durably acknowledged: staged again for training, in commit order.
    pub requeued: Vec<SampleId>,
    /// Durably acknowledged: their features were deleted (when a store was given) and they are
    /// never trained again.
    pub released: Vec<SampleId>,
    /// The marker's global step.
    pub global_step: Option<i64>,
    /// Whether the marker was written at an optimizer-durable boundary.
    pub optimizer_durable: bool,
}

#[derive(Debug, Default)]
struct Prompts {
    tasks: HashMap<String, PromptTask>,
    pending: IndexSet<String>,
    leased: HashMap<String, String>,
    failed: IndexMap<String, String>,
    rollout_workers: IndexMap<String, JsonMap>,
    trainers: IndexMap<String, JsonMap>,
}

/// The control plane's bookkeeping for one run.
pub struct DataFlowController {
    options: ControllerOptions,
    ledger: Arc<dyn Ledger>,
    queue: Option<Arc<SampleRefQueue>>,
    prompts: Mutex<Prompts>,
}

impl std::fmt::Debug for DataFlowController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataFlowController").field("options", &self.options).finish()
    }
}

/// `<prefix>-<n hex>` from a random v4 UUID.
fn random_id(prefix: &str, hex_digits: usize) -> String {
    let hex = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}", &hex[..hex_digits.min(hex.len())])
}

fn field_error(index: usize, key: &str, want: &str, got: &Value) -> Error {
    Error::InvalidArgument(format!("prompt {index}: field {key:?} must be {want}, got {got}"))
}

/// The fields of a prompt map besides `payload`, as [`PromptTask`] names them.
const PROMPT_FIELDS: [&str; 11] = [
    "task_id",
    "run_id",
    "source_id",
    "payload",
    "max_length",
    "chat_template",
    "loss_mask_policy",
    "target_model_version",
    "draft_weight_version",
    "attempt",
    "metadata",
];

impl DataFlowController {
    /// A controller over `ledger`.
    pub fn new(options: ControllerOptions, ledger: Arc<dyn Ledger>) -> Self {
        let queue = options.enable_sample_queue.then(|| Arc::new(SampleRefQueue::new()));
        DataFlowController { options, ledger, queue, prompts: Mutex::new(Prompts::default()) }
    }

    fn lock(&self) -> MutexGuard<'_, Prompts> {
        self.prompts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The run id.
    pub fn run_id(&self) -> &str {
        &self.options.run_id
    }

    /// The ledger.
    pub fn ledger(&self) -> &Arc<dyn Ledger> {
        &self.ledger
    }

    /// The staging queue (`None` for a producer's controller).
    pub fn sample_queue(&self) -> Option<&Arc<SampleRefQueue>> {
        self.queue.as_ref()
    }

    /// Registers a rollout worker; returns its id (`worker_id` or `rollout-<8 hex>`).
    pub fn register_rollout_worker(&self, worker_id: Option<&str>, info: JsonMap) -> String {
        let id = worker_id.map_or_else(|| random_id("rollout", 8), str::to_owned);
        self.lock().rollout_workers.insert(id.clone(), info);
        id
    }

    /// Registers a trainer; returns its id (`trainer_id` or `trainer-<8 hex>`).
    pub fn register_trainer(&self, trainer_id: Option<&str>, info: JsonMap) -> String {
        let id = trainer_id.map_or_else(|| random_id("trainer", 8), str::to_owned);
        self.lock().trainers.insert(id.clone(), info);
        id
    }

    /// Builds a task from a prompt map: `task_id` (or `task-<12 hex>`), `source_id` (default
    /// `prompt_source`), `payload` (the map's `payload`, else the whole map), `max_length`
    /// (default 2048), and the other [`PromptTask`] fields when given. With a `payload` key,
    /// any key that is not a task field is refused (a misspelt field never vanishes).
    fn build_task(&self, index: usize, prompt: &JsonMap) -> Result<PromptTask> {
        let string = |key: &str| -> Result<Option<String>> {
            match prompt.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(field_error(index, key, "a string", other)),
            }
        };
        let map = |key: &str| -> Result<JsonMap> {
            match prompt.get(key) {
                None | Some(Value::Null) => Ok(JsonMap::new()),
                Some(Value::Object(m)) => Ok(m.clone()),
                Some(other) => Err(field_error(index, key, "a JSON object", other)),
            }
        };
        let integer = |key: &str, default: i64| -> Result<i64> {
            match prompt.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v.as_i64().ok_or_else(|| field_error(index, key, "an integer", v)),
            }
        };
        let payload = match prompt.get("payload") {
            None => prompt.clone(),
            Some(Value::Object(m)) => {
                if let Some(unknown) = prompt.keys().find(|k| !PROMPT_FIELDS.contains(&k.as_str())) {
                    return Err(Error::InvalidArgument(format!(
                        "prompt {index}: unknown field {unknown:?}; a prompt with a \"payload\" may only carry {PROMPT_FIELDS:?}"
                    )));
                }
                m.clone()
            }
            Some(other) => return Err(field_error(index, "payload", "a JSON object", other)),
        };
        let with_payload = prompt.contains_key("payload");
        Ok(PromptTask {
            task_id: string("task_id")?.unwrap_or_else(|| random_id("task", 12)),
            run_id: self.options.run_id.clone(),
            source_id: string("source_id")?.unwrap_or_else(|| "prompt_source".to_owned()),
            payload,
            max_length: integer("max_length", DEFAULT_PROMPT_MAX_LENGTH)?,
            chat_template: if with_payload { string("chat_template")? } else { None },
            loss_mask_policy: if with_payload { map("loss_mask_policy")? } else { JsonMap::new() },
            target_model_version: if with_payload { string("target_model_version")? } else { None }
                .unwrap_or_else(|| "unknown".to_owned()),
            draft_weight_version: if with_payload { string("draft_weight_version")? } else { None },
            attempt: if with_payload { integer("attempt", 0)? } else { 0 },
            metadata: if with_payload { map("metadata")? } else { JsonMap::new() },
        })
    }

    /// Ingests prompts in order; returns their task ids. Every prompt is checked before any is
    /// ingested: one bad prompt ingests nothing.
    pub fn ingest_prompts(&self, prompts: &[JsonMap]) -> Result<Vec<String>> {
        let tasks = prompts.iter().enumerate().map(|(i, p)| self.build_task(i, p)).collect::<Result<Vec<_>>>()?;
        let mut state = self.lock();
        let mut ids = Vec::with_capacity(tasks.len());
        for task in tasks {
            ids.push(task.task_id.clone());
            state.pending.insert(task.task_id.clone());
            state.failed.shift_remove(&task.task_id);
            state.tasks.insert(task.task_id.clone(), task);
        }
        Ok(ids)
    }

    /// Leases up to `max` pending tasks to `worker`, oldest first.
    pub fn lease_prompt_tasks(&self, worker: &str, max: usize) -> Vec<PromptTask> {
        let mut state = self.lock();
        let mut out = Vec::new();
        while out.len() < max {
            let Some(id) = state.pending.shift_remove_index(0) else { break };
            if let Some(task) = state.tasks.get(&id).cloned() {
                state.leased.insert(id, worker.to_owned());
                out.push(task);
            }
        }
        out
    }

    /// Marks tasks done (forgotten). Ids leased by another worker are skipped.
    pub fn complete_prompt_tasks(&self, worker: &str, ids: &[String]) {
        let mut state = self.lock();
        for id in ids {
            if state.leased.get(id).is_some_and(|w| w != worker) {
                continue;
            }
            state.leased.remove(id);
            state.pending.shift_remove(id);
            state.tasks.remove(id);
        }
    }

    /// Fails tasks. A retryable failure with attempts left replays the task (attempt + 1) at
    /// the back of the queue; otherwise it fails for good with `reason` (noting exhausted
    /// attempts). Ids unknown or leased by another worker are skipped.
    pub fn fail_prompt_tasks(&self, worker: &str, ids: &[String], reason: &str, retryable: bool) {
        let mut state = self.lock();
        for id in ids {
            if state.leased.get(id).is_some_and(|w| w != worker) {
                continue;
            }
            let Some(attempt) = state.tasks.get(id).map(|t| t.attempt) else { continue };
            let attempts_left = self.options.max_prompt_attempts.is_none_or(|max| attempt + 1 < i64::from(max));
            state.leased.remove(id);
            if retryable && attempts_left {
                if let Some(task) = state.tasks.get_mut(id) {
                    task.attempt += 1;
                }
                state.pending.insert(id.clone());
            } else {
                let reason = if retryable {
                    format!("{reason} (attempts exhausted: {})", attempt + 1)
                } else {
                    reason.to_owned()
                };
                state.pending.shift_remove(id);
                state.failed.insert(id.clone(), reason);
            }
        }
    }

    /// Failed task ids with their reasons.
    pub fn failed_prompt_tasks(&self) -> Vec<(String, String)> {
        self.lock().failed.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Commits refs through the ledger (one transaction for a durable ledger) and returns the
    /// fresh ones: they clear their prompt task and, with a staging queue, are staged for
    /// training. Freshness comes from the ledger's answer only.
    pub fn commit_samples(&self, worker: &str, refs: &[SampleRef]) -> Result<Vec<SampleRef>> {
        if refs.is_empty() {
            return Ok(Vec::new());
        }
        let flags = self.ledger.commit_samples(refs)?;
        self.settle_commit(worker, &flags, refs.iter().map(|r| r.source_task_id.as_deref()))?;
        let fresh: Vec<SampleRef> =
            refs.iter().zip(&flags).filter(|(_, fresh)| **fresh).map(|(r, _)| r.clone()).collect();
        if let Some(queue) = &self.queue {
            queue.put(fresh.iter().cloned());
        }
        Ok(fresh)
    }

    /// [`DataFlowController::commit_samples`] for channel records: the ledger stores each
    /// record's spaced JSON and the fresh records are staged as they are, so no ref is built
    /// (the distributor's path). Returns one freshness flag per record.
    pub fn commit_records(&self, worker: &str, records: Vec<RefRecord>) -> Result<Vec<bool>> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let rows = records.iter().map(|r| Ok((r.sample_id.clone(), r.spaced_json()?))).collect::<Result<Vec<_>>>()?;
        let flags = self.ledger.commit_records(&rows)?;
        self.settle_commit(worker, &flags, records.iter().map(|r| r.source_task_id.as_deref()))?;
        if let Some(queue) = &self.queue {
            queue.put_records(records.into_iter().zip(&flags).filter(|(_, fresh)| **fresh).map(|(r, _)| r));
        }
        Ok(flags)
    }

    /// After a ledger commit: checks it answered once per ref and clears the prompt task of
    /// every fresh one (`tasks` gives each ref's task, in order).
    fn settle_commit<'a>(
        &self,
        worker: &str,
        flags: &[bool],
        tasks: impl ExactSizeIterator<Item = Option<&'a str>>,
    ) -> Result<()> {
        if flags.len() != tasks.len() {
            return Err(Error::Protocol {
                context: format!("controller {}", self.options.run_id),
                message: format!("the ledger returned {} freshness flags for {} refs", flags.len(), tasks.len()),
            });
        }
        let mut state = self.lock();
        let mut fresh = 0usize;
        for (task, _) in tasks.zip(flags).filter(|(_, f)| **f) {
            fresh += 1;
            if let Some(task) = task {
                state.leased.remove(task);
                state.pending.shift_remove(task);
                state.tasks.remove(task);
            }
        }
        tracing::debug!(worker, committed = flags.len(), fresh, "samples committed");
        Ok(())
    }

    /// Records the trainer's acknowledgement of `ids` in the ledger (with the marker), then
    /// settles them in the staging queue.
    pub fn ack_train_refs(
        &self,
        trainer: &str,
        ids: &[SampleId],
        global_step: Option<i64>,
        optimizer_durable: bool,
    ) -> Result<()> {
        self.ledger.record_train_ack(ids, global_step, optimizer_durable)?;
        if let Some(queue) = &self.queue {
            queue.ack_ids(ids)?;
        }
        tracing::debug!(trainer, acked = ids.len(), ?global_step, optimizer_durable, "train refs acknowledged");
        Ok(())
    }

    /// After a restart: every committed sample durably acknowledged (the marker is
    /// optimizer-durable and holds its id) is released, its features adopted and aborted in
    /// `store` when one is given; every other committed sample is staged again, in commit
    /// order. Without an optimizer-durable marker, everything committed is requeued. Idempotent
    /// (the staging queue skips what it already holds).
    pub fn reconcile_on_restart(&self, store: Option<&dyn FeatureStoreApi>) -> Result<Reconciliation> {
        let Some(queue) = &self.queue else {
            return Err(Error::InvalidArgument(
                "reconcile_on_restart needs the staging queue (build the controller with enable_sample_queue)".into(),
            ));
        };
        let DurableMarker { acked, global_step, optimizer_durable } = self.ledger.durable_marker()?;
        let mut out = Reconciliation { requeued: Vec::new(), released: Vec::new(), global_step, optimizer_durable };
        let mut requeue = Vec::new();
        for id in self.ledger.all_committed_ids()? {
            let Some(r) = self.ledger.get_committed(&id)? else {
                return Err(Error::Protocol {
                    context: format!("controller {}", self.options.run_id),
                    message: format!("ledger lists {id} as committed but holds no ref for it"),
                });
            };
            if optimizer_durable && acked.contains(&id) {
                if let Some(store) = store {
                    // The attempt that acknowledged it deleted it too, unless it crashed between
                    // the two: a sample already gone (not found, stale, freed) is released.
                    match store.adopt(&r) {
                        Ok(()) => {
                            store.abort(&id)?;
                            tracing::debug!(sample = %id, reason = "reconciled-released", "feature aborted");
                        }
                        Err(e)
                            if matches!(
                                e,
                                Error::NotFound { .. } | Error::StaleRef { .. } | Error::UseAfterFree { .. }
                            ) =>
                        {
                            tracing::debug!(sample = %id, reason = %e, "acknowledged feature already deleted");
                        }
                        Err(e) => return Err(e),
                    }
                }
                out.released.push(id);
            } else {
                out.requeued.push(id);
                requeue.push(r);
            }
        }
        queue.put(requeue);
        Ok(out)
    }

    /// The controller's counters.
    pub fn status(&self) -> Result<ControllerStatus> {
        let marker = self.ledger.durable_marker()?;
        let committed = self.ledger.committed_count()?;
        let state = self.lock();
        Ok(ControllerStatus {
            run_id: self.options.run_id.clone(),
            prompts: state.tasks.len(),
            prompts_pending: state.pending.len(),
            prompts_leased: state.leased.len(),
            prompts_failed: state.failed.len(),
            samples_committed: committed,
            train_backlog: committed.saturating_sub(marker.acked.len() as u64),
            queue_depth: self.queue.as_ref().map_or(0, |q| q.depth()),
            queue_in_flight: self.queue.as_ref().map_or(0, |q| q.in_flight()),
            rollout_workers: state.rollout_workers.len(),
            trainers: state.trainers.len(),
            durable_global_step: marker.global_step,
            durable_acked: marker.acked.len(),
        })
    }
}
