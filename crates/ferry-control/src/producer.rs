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
//!
//! The protocol itself is [`ProducerSession`]: claim, the quantum handshake, flow control over
//! the consumed counter ([`ProducerSession::wait_for_room`]), the disown-then-publish hand-over
//! with the hard byte cap ([`ProducerSession::hand_over_and_publish`]), `.closed` / `.failed`,
//! the wait for the consumer and the cleanup. [`run_producer`] drives one with capture workers;
//! a producer that captures samples itself (`ferry.Producer`, for an inference server's own
//! loop) drives one directly. Its waits take a [`StopSignal`] so they can be interrupted.

use crate::channel::{FileRefChannel, PublishTransaction, RefSink, RefSource, sidecar};
use crate::controller::{ControllerOptions, DataFlowController};
use crate::flow::{FlowControlLimits, ProducerFlowControl};
use crate::ledger::NoOpLedger;
use crate::signal::StopSignal;
use ferry_core::{Error, JsonMap, PromptTask, Result, SampleId, SampleRef};
use ferry_store::{DrainPolicy, FeatureStoreApi};
use serde_json::Value;
use std::cell::Cell;
use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
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

/// How a [`ProducerSession`] runs.
#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    /// Ref and byte watermarks.
    pub flow: FlowControlLimits,
    /// Refuse to publish past this many resident feature bytes (a hard cap, after the watermarks).
    pub max_resident_bytes: Option<u64>,
    /// Sleep between checks while waiting or paused.
    pub poll: Duration,
}

/// What [`ProducerSession::wait_for_room`] found.
#[derive(Debug)]
pub enum Room {
    /// Flow control lets a publish proceed; `in_flight` refs were published and not yet
    /// consumed at the check (pass it to [`ProducerSession::publish`]).
    Open {
        /// Refs in flight at the check.
        in_flight: u64,
    },
    /// The consumer finished (a cooperative stop): nobody will read another ref.
    ConsumerStopped,
    /// The consumer failed: nobody will read another ref; the error ([`Error::PeerFailed`])
    /// says why.
    ConsumerFailed(Error),
    /// The caller's stop signal was set.
    Stopped,
}

#[derive(Debug, Default)]
struct SessionState {
    claimed: bool,
    quantum: Option<u64>,
    acct: Accounting,
    paused_checks: u64,
    max_in_flight: u64,
    closed: bool,
    failed: bool,
    cleaned: bool,
    stopped_by_consumer: bool,
}

/// The online producer's protocol on one channel, the pieces [`run_producer`] is made of, for
/// producers that capture samples themselves (`ferry.Producer` in Python):
///
/// 1. [`claim`](ProducerSession::claim) a fresh channel ([`claim_fresh_channel`]);
/// 2. [`wait_for_quantum`](ProducerSession::wait_for_quantum): the consumer's dispatch quantum,
///    which both ref watermarks must reach;
/// 3. per batch of refs: [`wait_for_room`](ProducerSession::wait_for_room) (flow control over
///    the refs in flight, reconciled against the consumer's consumed counter, and their
///    `estimated_bytes`), then [`hand_over`](ProducerSession::hand_over) (disown) and
///    [`publish`](ProducerSession::publish) (the hard byte cap, then one publish transaction),
///    or both at once with [`hand_over_and_publish`](ProducerSession::hand_over_and_publish);
/// 4. [`close`](ProducerSession::close) (`.closed`) or [`fail`](ProducerSession::fail)
///    (`.failed`), [`wait_for_consumer`](ProducerSession::wait_for_consumer), and always
///    [`cleanup`](ProducerSession::cleanup).
///
/// Every wait takes a timeout (measured from the call) and a [`StopSignal`]: a set signal ends
/// the wait at once (it sleeps on the signal between checks), so a caller can interrupt it
/// (Python's Ctrl-C). The session is `Sync`: capture workers share one.
pub struct ProducerSession {
    channel: FileRefChannel,
    store: Arc<dyn FeatureStoreApi>,
    flow: ProducerFlowControl,
    max_resident_bytes: Option<u64>,
    poll: Duration,
    state: Mutex<SessionState>,
}

impl std::fmt::Debug for ProducerSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProducerSession").field("channel", &self.channel.path()).finish_non_exhaustive()
    }
}

fn abort_all(store: &dyn FeatureStoreApi, refs: &[SampleRef], why: &str) {
    for r in refs {
        if let Err(e) = store.abort(&r.sample_id) {
            tracing::warn!(sample = %r.sample_id, error = %e, why, "could not abort a ref");
        }
    }
}

impl ProducerSession {
    /// A session publishing into `channel` (`<control_dir>/refs.jsonl`) refs of samples in
    /// `store`. Checks the flow-control limits; claims nothing yet.
    pub fn new(channel: &Path, store: Arc<dyn FeatureStoreApi>, options: SessionOptions) -> Result<ProducerSession> {
        Ok(ProducerSession {
            channel: FileRefChannel::open(channel),
            store,
            flow: ProducerFlowControl::new(options.flow)?,
            max_resident_bytes: options.max_resident_bytes,
            poll: options.poll,
            state: Mutex::new(SessionState::default()),
        })
    }

    /// The channel.
    pub fn channel(&self) -> &FileRefChannel {
        &self.channel
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn FeatureStoreApi> {
        &self.store
    }

    /// The flow control (its state and counters).
    pub fn flow(&self) -> &ProducerFlowControl {
        &self.flow
    }

    fn peer_failed(&self, reason: String) -> Error {
        Error::PeerFailed { channel: self.channel.path().display().to_string(), peer: "consumer".into(), reason }
    }

    /// Claims the channel for a new attempt ([`claim_fresh_channel`]); a second claim is refused.
    pub fn claim(&self) -> Result<()> {
        if lock(&self.state).claimed {
            return Err(Error::InvalidArgument(format!(
                "{} is already claimed by this producer",
                self.channel.path().display()
            )));
        }
        claim_fresh_channel(self.channel.path())?;
        lock(&self.state).claimed = true;
        Ok(())
    }

    /// Whether [`claim`](ProducerSession::claim) succeeded.
    pub fn is_claimed(&self) -> bool {
        lock(&self.state).claimed
    }

    /// Whether the session closed the channel.
    pub fn is_closed(&self) -> bool {
        lock(&self.state).closed
    }

    /// Whether the session failed the channel.
    pub fn is_failed(&self) -> bool {
        lock(&self.state).failed
    }

    /// Whether the cleanup ran.
    pub fn is_cleaned(&self) -> bool {
        lock(&self.state).cleaned
    }

    /// The consumer's quantum, once [`wait_for_quantum`](ProducerSession::wait_for_quantum)
    /// found it.
    pub fn quantum(&self) -> Option<u64> {
        lock(&self.state).quantum
    }

    /// Waits for the consumer's dispatch quantum (at once if known) and checks that both ref
    /// watermarks reach it. `None` if `stop` was set first; a consumer failure
    /// ([`Error::PeerFailed`]) or `timeout` ends the wait with an error.
    pub fn wait_for_quantum(&self, timeout: Option<Duration>, stop: &StopSignal) -> Result<Option<u64>> {
        if let Some(q) = self.quantum() {
            return Ok(Some(q));
        }
        let found = self.poll_until(
            timeout,
            stop,
            || {
                if let Some(reason) = self.channel.consumer_failure()? {
                    return Err(self.peer_failed(reason));
                }
                self.channel.consumer_quantum()
            },
            |limit| {
                Error::timeout(
                    format!("the consumer's quantum on {} (is a consumer running?)", self.channel.path().display()),
                    limit,
                )
            },
        )?;
        let Some(quantum) = found else { return Ok(None) };
        let limits = self.flow.limits();
        if limits.high_watermark_refs < quantum || limits.low_watermark_refs < quantum {
            return Err(Error::InvalidArgument(format!(
                "online producer: the in-flight watermarks (high {}, low {}) must each be at least the consumer's \
                 quantum ({quantum} = dp x batch x accumulation): a paused producer must resume while the consumer \
                 still needs up to one optimizer window",
                limits.high_watermark_refs, limits.low_watermark_refs
            )));
        }
        lock(&self.state).quantum = Some(quantum);
        Ok(Some(quantum))
    }

    /// Refs published and not yet consumed, and their bytes, reconciled with the consumed
    /// counter now.
    pub fn in_flight(&self) -> Result<(u64, u64)> {
        // Read the counter under the lock: two threads reading it apart could reconcile an
        // older value after a newer one and see the counter move backwards.
        let mut state = lock(&self.state);
        let consumed = self.channel.consumed_remote()?;
        state.acct.reconcile(consumed)
    }

    /// Blocks while flow control says pause: the refs in flight (published, not yet consumed
    /// by the consumer's durable ack) reach the quantum and a watermark (refs or bytes, with
    /// hysteresis). Needs the quantum ([`wait_for_quantum`](ProducerSession::wait_for_quantum)
    /// first). Each paused check counts in the report. Ends with [`Room::ConsumerStopped`]
    /// once the consumer finished (recorded in the report as a stop by the consumer),
    /// [`Room::ConsumerFailed`] once it failed, or [`Room::Stopped`] once `stop` is set;
    /// `timeout` bounds the pause.
    pub fn wait_for_room(&self, timeout: Option<Duration>, stop: &StopSignal) -> Result<Room> {
        let Some(quantum) = self.quantum() else {
            return Err(Error::InvalidArgument("online producer: wait for the consumer's quantum first".into()));
        };
        let last = Cell::new((0u64, 0u64));
        let room = self.poll_until(
            timeout,
            stop,
            || {
                if self.channel.consumer_stopped()? {
                    if let Some(reason) = self.channel.consumer_failure()? {
                        return Ok(Some(Room::ConsumerFailed(self.peer_failed(reason))));
                    }
                    lock(&self.state).stopped_by_consumer = true;
                    return Ok(Some(Room::ConsumerStopped));
                }
                let (in_flight, bytes) = self.in_flight()?;
                let paused = in_flight >= quantum
                    && self.flow.should_pause(
                        i64::try_from(in_flight).unwrap_or(i64::MAX),
                        i64::try_from(bytes).unwrap_or(i64::MAX),
                    );
                if !paused {
                    return Ok(Some(Room::Open { in_flight }));
                }
                lock(&self.state).paused_checks += 1;
                last.set((in_flight, bytes));
                Ok(None)
            },
            |limit| {
                let (in_flight, bytes) = last.get();
                Error::timeout(
                    format!(
                        "the consumer to drain {} (in flight {in_flight}, {bytes} bytes)",
                        self.channel.path().display()
                    ),
                    limit,
                )
            },
        )?;
        Ok(room.unwrap_or(Room::Stopped))
    }

    /// Checks `check` every `poll` until it finds something (`Some`), sleeping on `stop`
    /// between checks: `None` once `stop` is set, `on_timeout`'s error past `timeout`.
    fn poll_until<T>(
        &self,
        timeout: Option<Duration>,
        stop: &StopSignal,
        mut check: impl FnMut() -> Result<Option<T>>,
        on_timeout: impl FnOnce(Duration) -> Error,
    ) -> Result<Option<T>> {
        let started = Instant::now();
        loop {
            if stop.is_set() {
                return Ok(None);
            }
            if let Some(found) = check()? {
                return Ok(Some(found));
            }
            if let Some(limit) = timeout
                && started.elapsed() >= limit
            {
                return Err(on_timeout(limit));
            }
            stop.wait_timeout(self.poll);
        }
    }

    /// Disowns refs ([`FeatureStoreApi::disown`]) so that they outlive this process once
    /// published (see the module docs); on failure they are aborted (best effort) and the
    /// error is returned, so they are never published.
    ///
    /// Disown, *then* publish: a crash between the two leaves samples no ref names (an orphan
    /// the store's max-hold GC reclaims), never a published ref whose bytes the daemon frees
    /// because their owner died. The other order could hand the consumer refs to freed samples.
    pub fn hand_over(&self, refs: Vec<SampleRef>) -> Result<Vec<SampleRef>> {
        let ids: Vec<SampleId> = refs.iter().map(|r| r.sample_id.clone()).collect();
        match self.store.disown(&ids) {
            Ok(()) => Ok(refs),
            Err(e) => {
                abort_all(self.store.as_ref(), &refs, "not handed over");
                Err(e)
            }
        }
    }

    /// Publishes handed-over refs (room granted with `in_flight` refs in flight): the hard byte
    /// cap (past it the refs are aborted and [`Error::OverBudget`] returned), then one
    /// [`PublishTransaction`] whose unpublished suffix has its features aborted on failure.
    pub fn publish(&self, refs: Vec<SampleRef>, in_flight: u64) -> Result<()> {
        let store = self.store.as_ref();
        let mut state = lock(&self.state);
        let bytes: Vec<u64> = refs.iter().map(|r| u64::try_from(r.estimated_bytes).unwrap_or(0)).collect();
        let projected = state.acct.resident_bytes + bytes.iter().sum::<u64>();
        if let Some(cap) = self.max_resident_bytes
            && projected > cap
        {
            abort_all(store, &refs, "over the producer's hard cap");
            return Err(Error::OverBudget {
                store_id: format!("{} (producer hard cap, producer-resident-byte-hard-cap)", store.store_id()),
                requested: bytes.iter().sum(),
                resident: state.acct.resident_bytes,
                budget: cap,
            });
        }
        let count = refs.len() as u64;
        let mut tx = PublishTransaction::begin(&self.channel, refs);
        let committed = tx.commit();
        for b in bytes.iter().take(tx.published_count()) {
            state.acct.unconsumed.push_back(*b);
            state.acct.resident_bytes += b;
            state.acct.published += 1;
        }
        if let Err(e) = committed {
            abort_all(store, tx.unpublished_refs(), "unpublished");
            return Err(e);
        }
        state.max_in_flight = state.max_in_flight.max(in_flight + count);
        Ok(())
    }

    /// [`hand_over`](ProducerSession::hand_over), then [`publish`](ProducerSession::publish).
    pub fn hand_over_and_publish(&self, refs: Vec<SampleRef>, in_flight: u64) -> Result<()> {
        let refs = self.hand_over(refs)?;
        self.publish(refs, in_flight)
    }

    /// Signals a clean end of stream (`.closed`). Idempotent; refused after
    /// [`fail`](ProducerSession::fail).
    pub fn close(&self) -> Result<()> {
        let mut state = lock(&self.state);
        if state.failed {
            return Err(Error::InvalidArgument("close: the producer already failed the channel".into()));
        }
        if !state.closed {
            RefSink::close(&self.channel)?;
            state.closed = true;
        }
        Ok(())
    }

    /// Fails the stream: `.failed` with `reason` (`"<Type>: <message>"`); a failure to write it
    /// is logged. Returns `false` if the session had already failed (nothing is written).
    pub fn fail(&self, reason: &str) -> bool {
        if std::mem::replace(&mut lock(&self.state).failed, true) {
            return false;
        }
        if let Err(e) = RefSink::fail(&self.channel, reason) {
            tracing::error!(error = %e, "could not publish the producer's failure");
        }
        true
    }

    /// Waits until the consumer says it is done or failed; its failure is the attempt's
    /// ([`Error::PeerFailed`]). `false` if `stop` was set first.
    pub fn wait_for_consumer(&self, timeout: Option<Duration>, stop: &StopSignal) -> Result<bool> {
        let stopped = self.poll_until(
            timeout,
            stop,
            || Ok(self.channel.consumer_stopped()?.then_some(())),
            |limit| Error::timeout(format!("the consumer to finish with {}", self.channel.path().display()), limit),
        )?;
        if stopped.is_none() {
            return Ok(false);
        }
        match self.channel.consumer_failure()? {
            Some(reason) => Err(self.peer_failed(reason)),
            None => Ok(true),
        }
    }

    /// Always run at the end, once (later calls do nothing): abort every ref the channel holds
    /// (a fresh reader re-reads the whole channel; features the consumer already deleted are
    /// no-ops), discard external attempts, drain the store.
    pub fn cleanup(&self) -> Result<()> {
        if std::mem::replace(&mut lock(&self.state).cleaned, true) {
            return Ok(());
        }
        cleanup(self.channel.path(), self.store.as_ref())
    }

    /// What the session did: refs published, the most in flight after a publish, paused
    /// checks, and whether the consumer stopped first (`prompts` is 0: the session leases none).
    pub fn report(&self) -> ProducerReport {
        let state = lock(&self.state);
        ProducerReport {
            published: state.acct.published,
            prompts: 0,
            max_in_flight: state.max_in_flight,
            paused_checks: state.paused_checks,
            stopped_by_consumer: state.stopped_by_consumer,
        }
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
    let options =
        SessionOptions { flow: config.flow, max_resident_bytes: config.max_resident_bytes, poll: config.poll };
    let session =
        check_config(config).and_then(|()| ProducerSession::new(&config.channel, Arc::clone(&store), options));
    let session = match session {
        Ok(session) => session,
        Err(e) => {
            // The channel is claimed: it carries the failure, and the cleanup runs, as after
            // any later failure.
            if let Err(fail) = RefSink::fail(&FileRefChannel::open(&config.channel), &e.python_reason()) {
                tracing::error!(error = %fail, "could not publish the producer's failure");
            }
            return settle(Err(e), cleanup(&config.channel, store.as_ref()));
        }
    };
    let produced = produce(config, &session, capture.as_ref());
    if let Err(e) = &produced {
        session.fail(&e.python_reason());
    }
    // After a success, the consumer's outcome decides the attempt's.
    let outcome =
        produced.and_then(|report| session.wait_for_consumer(config.peer_timeout, &StopSignal::new()).map(|_| report));
    settle(outcome, session.cleanup())
}

/// The attempt's outcome after its cleanup: the first failure, never masked by a cleanup error.
fn settle(outcome: Result<ProducerReport>, cleanup: Result<()>) -> Result<ProducerReport> {
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

fn check_config(config: &ProducerConfig) -> Result<()> {
    if config.workers < 1 || config.lease < 1 || config.prompt_epochs < 1 {
        return Err(Error::InvalidArgument(format!(
            "online producer: workers ({}), lease ({}) and prompt_epochs ({}) must be at least 1",
            config.workers, config.lease, config.prompt_epochs
        )));
    }
    Ok(())
}

fn produce(config: &ProducerConfig, session: &ProducerSession, capture: &dyn Capture) -> Result<ProducerReport> {
    let stop = StopSignal::new();
    if session.wait_for_quantum(config.peer_timeout, &stop)?.is_none() {
        unreachable!("nothing sets the stop signal before the workers start");
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
    let results: Vec<Result<Option<String>>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..config.workers)
            .map(|w| {
                let worker = format!("capture-{w}");
                let (controller, stop) = (&controller, &stop);
                scope.spawn(move || {
                    let _span = tracing::info_span!("capture worker", worker = %worker).entered();
                    let result = capture_loop(config, session, capture, controller, &worker, stop);
                    if result.is_err() {
                        stop.set();
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
    let mut report = ProducerReport { prompts: plan.len(), ..session.report() };
    if session.channel().consumer_stopped()? {
        // Cooperative stop: the consumer is done with this attempt; no partial-data check.
        report.stopped_by_consumer = true;
        session.close()?;
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
    session.close()?;
    Ok(report)
}

/// One capture worker; returns its last capture error if it gave up after consecutive
/// failures, `None` if it ran out of prompts or was stopped.
fn capture_loop(
    config: &ProducerConfig,
    session: &ProducerSession,
    capture: &dyn Capture,
    controller: &DataFlowController,
    worker: &str,
    stop: &StopSignal,
) -> Result<Option<String>> {
    let mut failures = 0u32;
    loop {
        let in_flight = match session.wait_for_room(config.peer_timeout, stop)? {
            Room::Open { in_flight } => in_flight,
            // The consumer's failure is the attempt's: `wait_for_consumer` returns it.
            Room::ConsumerStopped | Room::ConsumerFailed(_) | Room::Stopped => return Ok(None),
        };
        let tasks = controller.lease_prompt_tasks(worker, session.flow().prompt_lease(config.lease));
        if tasks.is_empty() {
            return Ok(None);
        }
        let ids: Vec<String> = tasks.iter().map(|t| t.task_id.clone()).collect();
        let captured = match capture.capture(&tasks) {
            Ok(refs) if refs.len() == tasks.len() => session.hand_over(refs),
            Ok(refs) => {
                for r in &refs {
                    let _ = session.store().abort(&r.sample_id);
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
        session.publish(refs, in_flight)?;
        controller.complete_prompt_tasks(worker, &ids);
    }
}

/// Abort every ref the channel holds (a fresh reader re-reads the whole channel; features the
/// consumer already deleted are no-ops), discard external attempts, drain the store.
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

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_store::{StoreOptions, open_store};

    #[test]
    fn a_sessions_waits_end_at_once_when_its_stop_signal_is_set() {
        let dir = tempfile::tempdir().unwrap();
        let channel = dir.path().join("control/refs.jsonl");
        let store: Arc<dyn FeatureStoreApi> = Arc::new(open_store("mem://session", StoreOptions::default()).unwrap());
        // A poll far longer than the test: only the stop signal can end a wait early.
        let options = SessionOptions { poll: Duration::from_secs(600), ..SessionOptions::default() };
        let session = ProducerSession::new(&channel, store, options).unwrap();
        session.claim().unwrap();
        assert!(session.claim().is_err(), "a session claims once");
        let never = StopSignal::new();
        assert!(session.wait_for_room(None, &never).is_err(), "room needs the quantum first");
        let stop = StopSignal::new();
        let started = Instant::now();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                std::thread::sleep(Duration::from_millis(20));
                stop.set();
            });
            assert_eq!(session.wait_for_quantum(None, &stop).unwrap(), None);
        });
        assert!(started.elapsed() < Duration::from_secs(60));
        let consumer = FileRefChannel::open(&channel);
        consumer.publish_consumer_quantum(4, false).unwrap();
        assert_eq!(session.wait_for_quantum(Some(Duration::ZERO), &never).unwrap(), Some(4));
        assert!(matches!(session.wait_for_room(None, &stop).unwrap(), Room::Stopped));
        assert!(matches!(session.wait_for_room(None, &never).unwrap(), Room::Open { in_flight: 0 }));
        assert!(!session.wait_for_consumer(None, &stop).unwrap());
        let err = session.wait_for_consumer(Some(Duration::ZERO), &never).unwrap_err();
        assert!(err.to_string().contains("the consumer to finish"), "{err}");
        session.close().unwrap();
        consumer.mark_consumer_done().unwrap();
        assert!(matches!(session.wait_for_room(None, &never).unwrap(), Room::ConsumerStopped));
        assert!(session.wait_for_consumer(None, &never).unwrap());
        session.cleanup().unwrap();
        assert!(session.is_cleaned() && session.report().stopped_by_consumer);
    }
}
