//! The online producer (SpecForge's `build_disagg_online_producer` + `produce()`, §14.2): it
//! claims a fresh channel, waits for the consumer's dispatch quantum, leases prompts to capture
//! workers under ref and byte backpressure, publishes what they capture in transactions (the
//! features of an unpublished suffix are aborted), ends the stream cleanly or with a failure
//! sentinel, waits for the consumer to stop, and always cleans up: every ref it published is
//! aborted in the store (features the consumer has not deleted yet), external attempts are
//! discarded and the store is drained.
//!
//! Ownership: each capture call's refs are disowned ([`FeatureStoreApi::disown`]) just before
//! they are published. Through a daemon client that owns its puts, what this producer captured
//! but never published dies with it (the daemon frees a dead session's samples), while what it
//! published outlives it for the consumer. Other stores have nothing to disown.
//!
//! Capture is a trait ([`Capture`]): inference servers plug in; tests and `ferry demo` use a
//! deterministic synthetic one.

use crate::channel::{FileRefChannel, PublishTransaction, RefSink, RefSource, sidecar};
use crate::controller::{ControllerOptions, DataFlowController};
use crate::flow::{FlowControlLimits, ProducerFlowControl};
use crate::ledger::NoOpLedger;
use ferry_core::{Error, JsonMap, PromptTask, Result, SampleId, SampleRef};
use ferry_store::{DrainPolicy, FeatureStoreApi};
use serde_json::Value;
use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Runs the target model on prompts and stores their features; one ref per task, in order.
pub trait Capture: Send + Sync {
    /// Captures `tasks` (the features go into the producer's store).
    fn capture(&self, tasks: &[PromptTask]) -> Result<Vec<SampleRef>>;
}

/// Consecutive failed capture calls after which a worker gives up.
pub const MAX_CONSECUTIVE_CAPTURE_FAILURES: u32 = 3;

/// How a producer runs.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// The run id.
    pub run_id: String,
    /// The channel to claim and publish into (`<control_dir>/refs.jsonl`).
    pub channel: PathBuf,
    /// The prompts (SpecForge's prompt maps).
    pub prompts: Vec<JsonMap>,
    /// Passes over the prompts.
    pub prompt_epochs: u32,
    /// Pass `e` shuffles the prompts with seed `prompt_seed + e`.
    pub prompt_seed: u64,
    /// Capture workers (threads), one per capture server.
    pub workers: usize,
    /// Prompts per capture call.
    pub lease: usize,
    /// Ref and byte watermarks.
    pub flow: FlowControlLimits,
    /// Refuse to publish past this many resident feature bytes (a hard cap, after the watermarks).
    pub max_resident_bytes: Option<u64>,
    /// Attempts per prompt before a capture failure is terminal.
    pub max_prompt_attempts: u32,
    /// Give up waiting for the consumer's quantum, or its stop, after this long.
    pub peer_timeout: Option<Duration>,
    /// Sleep between checks while waiting or paused.
    pub poll: Duration,
}

/// What a producer did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProducerReport {
    /// Refs published.
    pub published: u64,
    /// Prompt tasks ingested (over every epoch).
    pub prompts: usize,
    /// The most refs in flight (published, not yet consumed) seen before a publish.
    pub max_in_flight: u64,
    /// Checks that found the producer paused by backpressure.
    pub paused_checks: u64,
    /// The consumer stopped before every prompt was captured (a cooperative stop).
    pub stopped_by_consumer: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Claims `channel` for a new attempt: nothing of an earlier attempt may exist there (the
/// channel, any sidecar, or a claim); the claim (`pid=<pid>`) is created exclusively.
pub fn claim_fresh_channel(channel: &Path) -> Result<()> {
    let mut leftovers = Vec::new();
    for suffix in [
        "",
        sidecar::CLOSED,
        sidecar::FAILED,
        sidecar::CONSUMED_COUNT,
        sidecar::CONSUMER_DONE,
        sidecar::CONSUMER_FAILED,
        sidecar::CONSUMER_QUANTUM,
        ".producer_claim",
    ] {
        let path = sidecar::sidecar(channel, suffix);
        if path.exists() {
            leftovers.push(path.display().to_string());
        }
    }
    if !leftovers.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{} belongs to an earlier attempt ({}); a producer never resumes: use a fresh control directory",
            channel.display(),
            leftovers.join(", ")
        )));
    }
    crate::atomic::ensure_parent(channel)?;
    let claim = sidecar::sidecar(channel, ".producer_claim");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&claim)
        .map_err(|e| Error::io(format!("claiming {}", claim.display()), &e))?;
    file.write_all(format!("pid={}", std::process::id()).as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io(format!("writing {}", claim.display()), &e))
}

/// SplitMix64: a small, seeded, portable generator for the epoch shuffles.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The prompt maps of every epoch: pass `e` is a Fisher-Yates shuffle seeded with `seed + e`;
/// with more than one epoch each task gets the id `epoch<eeee>-prompt<12-digit index>` and
/// metadata saying which prompt and pass it is, so ids are distinct per pass.
pub fn epoch_plan(prompts: &[JsonMap], epochs: u32, seed: u64) -> Vec<JsonMap> {
    let mut plan = Vec::with_capacity(prompts.len() * epochs as usize);
    for epoch in 0..epochs {
        let mut order: Vec<usize> = (0..prompts.len()).collect();
        let mut state = seed.wrapping_add(u64::from(epoch));
        for i in (1..order.len()).rev() {
            let j = (splitmix(&mut state) % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        for index in order {
            let mut prompt = prompts[index].clone();
            if epochs > 1 {
                let base = prompt.get("task_id").and_then(Value::as_str).map(str::to_owned);
                // A map without a payload is all payload (as the controller reads it).
                if !prompt.contains_key("payload") {
                    let whole = std::mem::take(&mut prompt);
                    prompt.insert("payload".into(), Value::Object(whole));
                }
                let mut meta = match prompt.remove("metadata") {
                    Some(Value::Object(m)) => m,
                    _ => JsonMap::new(),
                };
                meta.insert("base_task_id".into(), base.map_or(Value::Null, Value::from));
                meta.insert("prompt_index".into(), Value::from(index));
                meta.insert("epoch".into(), Value::from(epoch));
                meta.insert("prompt_epochs".into(), Value::from(epochs));
                prompt.insert("task_id".into(), Value::from(format!("epoch{epoch:04}-prompt{index:012}")));
                prompt.insert("metadata".into(), Value::Object(meta));
            }
            plan.push(prompt);
        }
    }
    plan
}

/// Published-but-unconsumed refs and their bytes, reconciled against the consumed counter.
#[derive(Debug, Default)]
struct Accounting {
    /// `estimated_bytes` of each published ref beyond the consumed prefix, in publish order.
    unconsumed: VecDeque<u64>,
    resident_bytes: u64,
    published: u64,
    consumed_seen: u64,
}

impl Accounting {
    /// Moves the consumed prefix to `consumed`; returns (in flight, resident bytes).
    fn reconcile(&mut self, consumed: u64) -> Result<(u64, u64)> {
        if consumed < self.consumed_seen || consumed > self.published {
            return Err(Error::Protocol {
                context: "online producer".into(),
                message: format!(
                    "producer byte accounting does not match the channel: the consumed counter reads {consumed}, \
                     after {} and with {} published",
                    self.consumed_seen, self.published
                ),
            });
        }
        for _ in self.consumed_seen..consumed {
            self.resident_bytes -= self.unconsumed.pop_front().unwrap_or(0);
        }
        self.consumed_seen = consumed;
        Ok((self.published - consumed, self.resident_bytes))
    }
}

/// Runs the producer: see the module docs. Returns the report, or the first failure (which
/// the channel's `.failed` also carries, and which cleanup errors never mask).
pub fn run_producer(
    config: &ProducerConfig,
    store: Arc<dyn FeatureStoreApi>,
    capture: Arc<dyn Capture>,
) -> Result<ProducerReport> {
    claim_fresh_channel(&config.channel)?;
    let channel = FileRefChannel::open(&config.channel);
    let produced = produce(config, &channel, store.as_ref(), capture.as_ref());
    if let Err(e) = &produced
        && let Err(fail) = RefSink::fail(&channel, &e.python_reason())
    {
        tracing::error!(error = %fail, "could not publish the producer's failure");
    }
    // After a success, the consumer's outcome decides the attempt's.
    let outcome = produced.and_then(|report| wait_for_consumer(config, &channel).map(|()| report));
    let cleanup = cleanup(&config.channel, store.as_ref());
    match (outcome, cleanup) {
        (Ok(report), Ok(())) => Ok(report),
        (Ok(_), Err(e)) => Err(e),
        (Err(primary), Ok(())) => Err(primary),
        (Err(primary), Err(e)) => Err(Error::FailureHandling {
            primary: Box::new(primary),
            record_error: None,
            cleanup_errors: vec![e.to_string()],
        }),
    }
}

fn produce(
    config: &ProducerConfig,
    channel: &FileRefChannel,
    store: &dyn FeatureStoreApi,
    capture: &dyn Capture,
) -> Result<ProducerReport> {
    if config.workers < 1 || config.lease < 1 || config.prompt_epochs < 1 {
        return Err(Error::InvalidArgument(format!(
            "online producer: workers ({}), lease ({}) and prompt_epochs ({}) must be at least 1",
            config.workers, config.lease, config.prompt_epochs
        )));
    }
    let quantum = wait_for_quantum(config, channel)?;
    let flow = ProducerFlowControl::new(config.flow)?;
    let limits = flow.limits();
    if limits.high_watermark_refs < quantum || limits.low_watermark_refs < quantum {
        return Err(Error::InvalidArgument(format!(
            "online producer: the in-flight watermarks (high {}, low {}) must each be at least the consumer's quantum \
             ({quantum} = dp x batch x accumulation): a paused producer must resume while the consumer still needs \
             up to one optimizer window",
            limits.high_watermark_refs, limits.low_watermark_refs
        )));
    }
    let controller = DataFlowController::new(
        ControllerOptions {
            max_prompt_attempts: Some(config.max_prompt_attempts),
            enable_sample_queue: false,
            ..ControllerOptions::new(config.run_id.clone())
        },
        Arc::new(NoOpLedger),
    );
    let plan = epoch_plan(&config.prompts, config.prompt_epochs, config.prompt_seed);
    for chunk in plan.chunks(4096) {
        controller.ingest_prompts(chunk)?;
    }
    let accounting = Mutex::new(Accounting::default());
    let report = Mutex::new(ProducerReport { prompts: plan.len(), ..ProducerReport::default() });
    let stop = AtomicBool::new(false);
    let results: Vec<Result<Option<String>>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..config.workers)
            .map(|w| {
                let worker = format!("capture-{w}");
                let (controller, accounting, report, stop, flow) = (&controller, &accounting, &report, &stop, &flow);
                scope.spawn(move || {
                    let result = capture_loop(
                        config, channel, store, capture, controller, &worker, accounting, report, stop, flow, quantum,
                    );
                    if result.is_err() {
                        stop.store(true, Ordering::SeqCst);
                    }
                    result
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join().unwrap_or_else(|_| {
                    Err(Error::Protocol { context: "online producer".into(), message: "a worker panicked".into() })
                })
            })
            .collect()
    });
    // Every worker gave up: the last capture error of each says why.
    let mut all_dead = true;
    let mut last_errors = Vec::new();
    for result in results {
        match result? {
            Some(last) => last_errors.push(last),
            None => all_dead = false,
        }
    }
    let mut report = lock(&report).clone();
    if channel.consumer_stopped()? {
        // Cooperative stop: the consumer is done with this attempt; no partial-data check.
        report.stopped_by_consumer = true;
        channel.close()?;
        return Ok(report);
    }
    let status = controller.status()?;
    if all_dead && status.prompts_pending > 0 {
        return Err(Error::Protocol {
            context: "online producer".into(),
            message: format!(
                "every capture worker failed {MAX_CONSECUTIVE_CAPTURE_FAILURES} times in a row with {} prompts left; \
                 last error: {}",
                status.prompts_pending,
                last_errors.first().map_or("none recorded", String::as_str)
            ),
        });
    }
    let failed = controller.failed_prompt_tasks();
    if !failed.is_empty() {
        let (task, reason) = &failed[0];
        return Err(Error::Protocol {
            context: "online producer".into(),
            message: format!(
                "{} prompts failed for good (first: {task}: {reason}); refusing to publish a successful EOF for \
                 partial data",
                failed.len()
            ),
        });
    }
    channel.close()?;
    Ok(report)
}

/// Waits for the consumer's dispatch quantum; a consumer failure or the peer timeout ends the
/// wait with an error.
fn wait_for_quantum(config: &ProducerConfig, channel: &FileRefChannel) -> Result<u64> {
    let started = Instant::now();
    loop {
        if let Some(reason) = channel.consumer_failure()? {
            return Err(Error::PeerFailed {
                channel: channel.path().display().to_string(),
                peer: "consumer".into(),
                reason,
            });
        }
        if let Some(quantum) = channel.consumer_quantum()? {
            return Ok(quantum);
        }
        if let Some(limit) = config.peer_timeout
            && started.elapsed() >= limit
        {
            return Err(Error::timeout(
                format!("the consumer's quantum on {} (is a consumer running?)", channel.path().display()),
                limit,
            ));
        }
        std::thread::sleep(config.poll);
    }
}

/// One capture worker; returns its last capture error if it gave up after consecutive
/// failures, `None` if it ran out of prompts or was stopped.
#[allow(clippy::too_many_arguments)]
fn capture_loop(
    config: &ProducerConfig,
    channel: &FileRefChannel,
    store: &dyn FeatureStoreApi,
    capture: &dyn Capture,
    controller: &DataFlowController,
    worker: &str,
    accounting: &Mutex<Accounting>,
    report: &Mutex<ProducerReport>,
    stop: &AtomicBool,
    flow: &ProducerFlowControl,
    quantum: u64,
) -> Result<Option<String>> {
    let mut failures = 0u32;
    let mut paused_since: Option<Instant> = None;
    loop {
        if stop.load(Ordering::SeqCst) || channel.consumer_stopped()? {
            return Ok(None);
        }
        // Read the counter under the lock: two workers reading it apart could reconcile an
        // older value after a newer one and see the counter move backwards.
        let (in_flight, bytes) = {
            let mut acct = lock(accounting);
            let consumed = channel.consumed_remote()?;
            acct.reconcile(consumed)?
        };
        let paused = in_flight >= quantum
            && flow
                .should_pause(i64::try_from(in_flight).unwrap_or(i64::MAX), i64::try_from(bytes).unwrap_or(i64::MAX));
        if paused {
            lock(report).paused_checks += 1;
            let since = *paused_since.get_or_insert_with(Instant::now);
            if let Some(limit) = config.peer_timeout
                && since.elapsed() >= limit
            {
                return Err(Error::timeout(
                    format!(
                        "the consumer to drain {} (in flight {in_flight}, {bytes} bytes)",
                        channel.path().display()
                    ),
                    limit,
                ));
            }
            std::thread::sleep(config.poll);
            continue;
        }
        paused_since = None;
        let tasks = controller.lease_prompt_tasks(worker, flow.prompt_lease(config.lease));
        if tasks.is_empty() {
            return Ok(None);
        }
        let ids: Vec<String> = tasks.iter().map(|t| t.task_id.clone()).collect();
        let captured = match capture.capture(&tasks) {
            Ok(refs) if refs.len() == tasks.len() => hand_over(store, refs, worker),
            Ok(refs) => {
                for r in &refs {
                    let _ = store.abort(&r.sample_id);
                }
                return Err(Error::Protocol {
                    context: format!("online producer worker {worker}"),
                    message: format!("capture returned {} refs for {} prompts", refs.len(), tasks.len()),
                });
            }
            Err(e) => Err(e),
        };
        let refs = match captured {
            Ok(refs) => refs,
            // A capture that failed, or whose refs could not be handed over (already aborted):
            // the prompts are retried, as after any capture failure.
            Err(e) => {
                controller.fail_prompt_tasks(worker, &ids, &e.python_reason(), true);
                failures += 1;
                tracing::warn!(worker, failures, error = %e, "capture failed");
                if failures >= MAX_CONSECUTIVE_CAPTURE_FAILURES {
                    return Ok(Some(e.python_reason()));
                }
                continue;
            }
        };
        failures = 0;
        publish(config, channel, store, accounting, report, &refs, worker, in_flight)?;
        controller.complete_prompt_tasks(worker, &ids);
    }
}

/// Disowns one capture call's refs so that they outlive this process once published (see the
/// module docs); on failure they are aborted (best effort) and the error is returned, so the
/// batch is never published and fails as a capture would.
///
/// Disown, *then* publish: a crash between the two leaves samples no ref names (an orphan the
/// store's max-hold GC reclaims), never a published ref whose bytes the daemon frees because
/// their owner died. The other order could hand the consumer refs to freed samples.
fn hand_over(store: &dyn FeatureStoreApi, refs: Vec<SampleRef>, worker: &str) -> Result<Vec<SampleRef>> {
    let ids: Vec<SampleId> = refs.iter().map(|r| r.sample_id.clone()).collect();
    match store.disown(&ids) {
        Ok(()) => Ok(refs),
        Err(e) => {
            for sid in &ids {
                if let Err(abort) = store.abort(sid) {
                    tracing::warn!(worker, sample = %sid, error = %abort, "could not abort a ref that was not handed over");
                }
            }
            Err(e)
        }
    }
}

/// Publishes one capture call's refs under the publish lock: the hard byte cap, then a
/// transaction whose unpublished suffix has its features aborted on failure.
#[allow(clippy::too_many_arguments)]
fn publish(
    config: &ProducerConfig,
    channel: &FileRefChannel,
    store: &dyn FeatureStoreApi,
    accounting: &Mutex<Accounting>,
    report: &Mutex<ProducerReport>,
    refs: &[SampleRef],
    worker: &str,
    in_flight: u64,
) -> Result<()> {
    let mut acct = lock(accounting);
    let bytes: Vec<u64> = refs.iter().map(|r| u64::try_from(r.estimated_bytes).unwrap_or(0)).collect();
    let projected = acct.resident_bytes + bytes.iter().sum::<u64>();
    if let Some(cap) = config.max_resident_bytes
        && projected > cap
    {
        for r in refs {
            let _ = store.abort(&r.sample_id);
        }
        return Err(Error::OverBudget {
            store_id: format!("{} (producer hard cap, producer-resident-byte-hard-cap)", store.store_id()),
            requested: bytes.iter().sum(),
            resident: acct.resident_bytes,
            budget: cap,
        });
    }
    let mut tx = PublishTransaction::begin(channel, refs.to_vec());
    let committed = tx.commit();
    for b in bytes.iter().take(tx.published_count()) {
        acct.unconsumed.push_back(*b);
        acct.resident_bytes += b;
        acct.published += 1;
    }
    if let Err(e) = committed {
        for r in tx.unpublished_refs() {
            if let Err(abort) = store.abort(&r.sample_id) {
                tracing::error!(worker, sample = %r.sample_id, error = %abort, "could not abort an unpublished ref");
            }
        }
        return Err(e);
    }
    let mut report = lock(report);
    report.published += refs.len() as u64;
    report.max_in_flight = report.max_in_flight.max(in_flight + refs.len() as u64);
    Ok(())
}

/// Waits until the consumer says it is done or failed; its failure is the attempt's.
fn wait_for_consumer(config: &ProducerConfig, channel: &FileRefChannel) -> Result<()> {
    let started = Instant::now();
    while !channel.consumer_stopped()? {
        if let Some(limit) = config.peer_timeout
            && started.elapsed() >= limit
        {
            return Err(Error::timeout(format!("the consumer to finish with {}", channel.path().display()), limit));
        }
        std::thread::sleep(config.poll);
    }
    match channel.consumer_failure()? {
        Some(reason) => {
            Err(Error::PeerFailed { channel: channel.path().display().to_string(), peer: "consumer".into(), reason })
        }
        None => Ok(()),
    }
}

/// Always run at the end: abort every ref this attempt published (a fresh reader re-reads the
/// whole channel; features the consumer already deleted are no-ops), discard external
/// attempts, drain the store.
fn cleanup(channel: &Path, store: &dyn FeatureStoreApi) -> Result<()> {
    let reader = FileRefChannel::open(channel);
    let mut errors = Vec::new();
    loop {
        match reader.poll(Some(1024)) {
            Ok(refs) if refs.is_empty() => break,
            Ok(refs) => {
                for r in refs {
                    if let Err(e) = store.abort(&r.sample_id) {
                        errors.push(format!("abort {}: {e}", r.sample_id));
                    }
                }
            }
            Err(e) => {
                errors.push(format!("re-reading the channel: {e}"));
                break;
            }
        }
    }
    if let Err(e) = store.discard_external_attempts() {
        errors.push(format!("discard external attempts: {e}"));
    }
    if let Err(e) = store.drain(DrainPolicy::default()) {
        errors.push(format!("drain: {e}"));
    }
    if errors.is_empty() {
        return Ok(());
    }
    Err(Error::Protocol {
        context: "online producer cleanup".into(),
        message: format!("online-attempt-finished cleanup failed: {}", errors.join("; ")),
    })
}
