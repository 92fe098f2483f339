//! [`RefDistributor`]: consumer rank 0's only reader of the source channel (SpecForge's
//! `RefDistributor`, §9). Each [`RefDistributor::pump`] reads what the producers published,
//! drops samples a previous attempt already trained (`skip`), commits the rest through the
//! controller's ledger in one transaction (duplicates are settled at once and never reach an
//! inbox), and dispatches whole optimizer windows round-robin into one inbox per rank (one
//! append and one fsync per rank per pump), so every
//! rank gets exactly `batch` refs per round and `batch x accumulation` per window and the ranks
//! stay in lockstep. It forwards the ranks' acknowledgements to the source's consumed counter
//! (dispatch alone never counts as consumed). At end of stream, fewer than one window's worth of
//! refs is dropped: adopted and aborted in the store and settled, and the inboxes are closed.
//! Any failure poisons every inbox, so every rank fails with the distributor's reason.

use crate::channel::file::FileRefChannel;
use crate::channel::{RefSink, RefSource};
use crate::controller::DataFlowController;
use crate::queue::RefQueue;
use crate::record::RefRecord;
use crate::ref_queue::SampleRefQueue;
use crate::signal::StopSignal;
use ferry_core::{Error, Result, SampleId};
use ferry_store::{Clock, FeatureStoreApi, SystemClock};
use serde::Serialize;
use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Most refs one pump takes from the source: a backlog is committed and dispatched in
/// transactions of this size, so acknowledgements keep being forwarded and no pump builds a
/// transient batch of the whole backlog.
pub const MAX_REFS_PER_PUMP: usize = 8192;

/// How a distributor dispatches and waits.
#[derive(Clone)]
pub struct DistributorOptions {
    /// Data-parallel ranks (one inbox each).
    pub dp_size: usize,
    /// Refs one rank trains per optimizer step (`batch x accumulation`).
    pub refs_per_rank_step: usize,
    /// Refs one rank takes per micro-batch (`batch`); must divide the step.
    pub refs_per_rank_batch: usize,
    /// Samples a previous attempt durably trained: dropped wherever they appear.
    pub skip_ids: HashSet<SampleId>,
    /// Samples reconciliation already staged again: their replayed records are not settled.
    pub requeued_ids: HashSet<SampleId>,
    /// The worker id the distributor commits under.
    pub worker_id: String,
    /// Sleep between idle pumps.
    pub poll: Duration,
    /// Fail after this long without progress while the source is open (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// The clock for the idle timeout (tests inject a manual one).
    pub clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for DistributorOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DistributorOptions")
            .field("dp_size", &self.dp_size)
            .field("refs_per_rank_step", &self.refs_per_rank_step)
            .field("refs_per_rank_batch", &self.refs_per_rank_batch)
            .field("skip_ids", &self.skip_ids.len())
            .field("requeued_ids", &self.requeued_ids.len())
            .field("idle_timeout", &self.idle_timeout)
            .finish()
    }
}

impl DistributorOptions {
    /// `dp_size` ranks, `step` refs per rank per optimizer step, micro-batches of `step`.
    pub fn new(dp_size: usize, refs_per_rank_step: usize) -> Self {
        DistributorOptions {
            dp_size,
            refs_per_rank_step,
            refs_per_rank_batch: refs_per_rank_step,
            skip_ids: HashSet::new(),
            requeued_ids: HashSet::new(),
            worker_id: "ref-distributor".to_owned(),
            poll: Duration::from_millis(50),
            idle_timeout: None,
            clock: Arc::new(SystemClock),
        }
    }

    /// Micro-batches of `batch` refs per rank.
    pub fn with_batch(mut self, batch: usize) -> Self {
        self.refs_per_rank_batch = batch;
        self
    }
}

/// What a distributor has done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DistributorStats {
    /// Refs written to inboxes.
    pub dispatched: u64,
    /// Records of samples a previous attempt trained.
    pub skipped: u64,
    /// Records the ledger had already committed.
    pub duplicates: u64,
    /// Refs left at end of stream, fewer than one window: aborted and settled.
    pub dropped: u64,
}

#[derive(Debug, Default)]
struct State {
    /// The micro-batch round being filled.
    round: Vec<RefRecord>,
    /// Refs of the open window already dispatched (0: no window open).
    window_dispatched: usize,
    /// The sum of the inboxes' consumed counters already forwarded to the source.
    forwarded_acks: u64,
    requeued: HashSet<SampleId>,
    /// Records of the source settled as this attempt reads it from the start: skipped ones
    /// (trained by an earlier attempt), duplicates, the dropped tail, and acknowledged ones.
    settled: u64,
    /// The first error a pump returned: every later pump returns it too, because a pump that
    /// failed midway left rounds, windows and the staged refs in a state a retry cannot resume.
    failed: Option<Error>,
    finished: bool,
    stats: DistributorStats,
}

/// Consumer rank 0's dispatcher of refs into per-rank inboxes.
pub struct RefDistributor {
    source: Arc<dyn RefSource>,
    controller: Arc<DataFlowController>,
    queue: Arc<SampleRefQueue>,
    inboxes: Vec<Arc<dyn RefSink>>,
    store: Option<Arc<dyn FeatureStoreApi>>,
    options: DistributorOptions,
    dispatch_quantum: usize,
    round_quantum: usize,
    state: Mutex<State>,
}

impl std::fmt::Debug for RefDistributor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefDistributor")
            .field("source", &self.source.describe())
            .field("dispatch_quantum", &self.dispatch_quantum)
            .field("round_quantum", &self.round_quantum)
            .finish()
    }
}

/// Deletes any previous attempt's inbox files in `inbox_dir` (inboxes are ephemeral; the
/// ledger is durable) and opens one inbox writer per rank.
pub fn file_inboxes(inbox_dir: &Path, dp_size: usize) -> Result<Vec<Arc<FileRefChannel>>> {
    std::fs::create_dir_all(inbox_dir).map_err(|e| Error::io(format!("creating {}", inbox_dir.display()), &e))?;
    (0..dp_size)
        .map(|rank| {
            // Appends stay fsynced: the inboxes are rebuilt from the ledger after a crash, so
            // their durability buys nothing, but on a network filesystem a write error may
            // surface only at fsync, and a lost append would stall its rank.
            let inbox = FileRefChannel::inbox(inbox_dir, rank);
            inbox.remove_files()?;
            Ok(Arc::new(inbox))
        })
        .collect()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RefDistributor {
    /// A distributor from `source` through `controller` (which must have a staging queue and
    /// should have the durable ledger) into `inboxes` (one per rank). Seeds the source's
    /// consumed counter, repairing it when a previous attempt committed its acknowledgement but
    /// died before the counter moved.
    pub fn new(
        source: Arc<dyn RefSource>,
        controller: Arc<DataFlowController>,
        inboxes: Vec<Arc<dyn RefSink>>,
        store: Option<Arc<dyn FeatureStoreApi>>,
        options: DistributorOptions,
    ) -> Result<Self> {
        let o = &options;
        if o.dp_size < 1 || o.refs_per_rank_step < 1 || o.refs_per_rank_batch < 1 {
            return Err(Error::InvalidArgument(format!(
                "ref distributor: dp_size ({}), refs_per_rank_step ({}) and refs_per_rank_batch ({}) must be at least 1",
                o.dp_size, o.refs_per_rank_step, o.refs_per_rank_batch
            )));
        }
        if !o.refs_per_rank_step.is_multiple_of(o.refs_per_rank_batch) {
            return Err(Error::InvalidArgument(format!(
                "ref distributor: refs_per_rank_step ({}) must be a multiple of refs_per_rank_batch ({})",
                o.refs_per_rank_step, o.refs_per_rank_batch
            )));
        }
        if inboxes.len() != o.dp_size {
            return Err(Error::InvalidArgument(format!(
                "ref distributor: {} inboxes for dp_size {}",
                inboxes.len(),
                o.dp_size
            )));
        }
        let Some(queue) = controller.sample_queue().cloned() else {
            return Err(Error::InvalidArgument(
                "ref distributor: the controller has no staging queue (enable_sample_queue)".into(),
            ));
        };
        let dispatch_quantum = o.dp_size * o.refs_per_rank_step;
        let round_quantum = o.dp_size * o.refs_per_rank_batch;
        let consumed = source.seed_consumed()?;
        let skip = o.skip_ids.len() as u64;
        if skip > consumed {
            // The durable ack of a previous attempt committed, its counter update did not.
            tracing::warn!(consumed, skip, "repairing the source's consumed counter after a crash");
            source.mark_consumed(skip - consumed)?;
        }
        if !controller.ledger().retains() {
            return Err(Error::InvalidArgument(
                "ref distributor: the controller's ledger retains nothing (no-op), so duplicates cannot be told apart; \
                 use the SQLite ledger"
                    .into(),
            ));
        }
        let state = State { requeued: o.requeued_ids.clone(), ..State::default() };
        Ok(RefDistributor {
            source,
            controller,
            queue,
            inboxes,
            store,
            options,
            dispatch_quantum,
            round_quantum,
            state: Mutex::new(state),
        })
    }

    /// `dp_size x refs_per_rank_step`: one global optimizer window.
    pub fn dispatch_quantum(&self) -> usize {
        self.dispatch_quantum
    }

    /// What the distributor has done so far.
    pub fn stats(&self) -> DistributorStats {
        lock(&self.state).stats
    }

    /// Whether the stream ended and the inboxes were closed.
    pub fn finished(&self) -> bool {
        lock(&self.state).finished
    }

    /// One non-blocking cycle; returns whether it made progress. After the stream ended, a
    /// pump only forwards the ranks' last acknowledgements (SpecForge stops forwarding at the
    /// end, which leaves the last windows unsettled in the producer's counter).
    pub fn pump(&self) -> Result<bool> {
        let mut state = lock(&self.state);
        if let Some(e) = &state.failed {
            return Err(e.clone());
        }
        let result = self.pump_locked(&mut state);
        if let Err(e) = &result {
            state.failed = Some(e.clone());
        }
        result
    }

    fn pump_locked(&self, state: &mut State) -> Result<bool> {
        if state.finished {
            return self.forward_acks(state);
        }
        if let Some(reason) = self.source.failure()? {
            return Err(Error::PeerFailed { channel: self.source.describe(), peer: "source producer".into(), reason });
        }
        let mut raw = self.source.poll_records(Some(MAX_REFS_PER_PUMP))?;
        let mut drained = false;
        if raw.is_empty() && self.source.is_closed()? {
            // A final ref may land between the empty poll and the close check.
            raw = self.source.poll_records(Some(MAX_REFS_PER_PUMP))?;
            drained = raw.is_empty();
        }
        let mut progress = !raw.is_empty();
        self.commit(state, raw)?;
        progress |= self.dispatch(state)?;
        progress |= self.forward_acks(state)?;
        if drained {
            self.finish(state)?;
            progress = true;
        }
        Ok(progress)
    }

    /// Skips, commits (one ledger transaction) and settles duplicates at once. Records are
    /// committed and staged as records: no ref is built on this path.
    fn commit(&self, state: &mut State, raw: Vec<RefRecord>) -> Result<()> {
        if raw.is_empty() {
            return Ok(());
        }
        let mut candidates = Vec::with_capacity(raw.len());
        let mut skipped = 0u64;
        for r in raw {
            if self.options.skip_ids.contains(&r.sample_id) {
                // Trained by a previous attempt: settled (see `settle`), never dispatched.
                state.stats.skipped += 1;
                skipped += 1;
            } else {
                candidates.push(r);
            }
        }
        self.settle(state, skipped)?;
        if candidates.is_empty() {
            return Ok(());
        }
        let ids: Vec<SampleId> = candidates.iter().map(|r| r.sample_id.clone()).collect();
        let flags = self.controller.commit_records(&self.options.worker_id, candidates)?;
        let mut settle = 0u64;
        for (id, fresh) in ids.iter().zip(flags) {
            if !fresh {
                state.stats.duplicates += 1;
                // Reconciliation already staged it: its replayed record is not a new one.
                if !state.requeued.remove(id) {
                    settle += 1;
                }
            }
        }
        self.settle(state, settle)?;
        Ok(())
    }

    /// Dispatches whole rounds, opening a window only when all of it is staged. Every round
    /// this pump completes goes out in one append (one fsync) per rank: SpecForge appends once
    /// per rank per round, which on a real disk bounds dispatch at a few thousand refs per
    /// second; the guarantees are the same, since only whole rounds are ever written and the
    /// inboxes are written before the pump returns.
    fn dispatch(&self, state: &mut State) -> Result<bool> {
        let dp = self.options.dp_size;
        let mut per_rank: Vec<Vec<Box<str>>> = vec![Vec::new(); dp];
        let mut dispatched = 0usize;
        loop {
            if state.window_dispatched == 0 && state.round.len() + self.queue.depth() < self.dispatch_quantum {
                break;
            }
            let missing = self.round_quantum - state.round.len();
            if missing > 0 {
                state.round.extend(self.queue.get_records(missing)?);
            }
            if state.round.len() < self.round_quantum {
                break;
            }
            // The producer's own record goes to the inbox as written.
            for (i, r) in std::mem::take(&mut state.round).into_iter().enumerate() {
                per_rank[i % dp].push(r.line);
            }
            dispatched += self.round_quantum;
            state.window_dispatched += self.round_quantum;
            if state.window_dispatched == self.dispatch_quantum {
                state.window_dispatched = 0;
            }
        }
        if dispatched == 0 {
            return Ok(false);
        }
        for (inbox, lines) in self.inboxes.iter().zip(&per_rank) {
            let lines: Vec<&str> = lines.iter().map(AsRef::as_ref).collect();
            inbox.publish_lines(&lines)?;
        }
        state.stats.dispatched += dispatched as u64;
        Ok(true)
    }

    /// Forwards the ranks' acknowledgements to the source's counter.
    fn forward_acks(&self, state: &mut State) -> Result<bool> {
        let mut total = 0u64;
        for inbox in &self.inboxes {
            total += inbox.consumed_remote()?;
        }
        if total > state.forwarded_acks {
            let acks = total - state.forwarded_acks;
            state.forwarded_acks = total;
            self.settle(state, acks)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Settles `n` more records. The counter is derived, not accumulated: an attempt reads the
    /// channel from its start and counts every record settled so far (skipped, duplicate,
    /// dropped, acknowledged), and the source's counter is raised to that count, never lowered.
    /// A resumed attempt therefore neither counts again what an earlier attempt settled (its
    /// duplicates) nor loses what that attempt settled but did not publish (a crash between an
    /// ack and its forwarding), and the counter ends at exactly the records published.
    fn settle(&self, state: &mut State, n: u64) -> Result<()> {
        state.settled += n;
        let current = self.source.consumed();
        if state.settled > current {
            self.source.mark_consumed(state.settled - current)?;
        }
        Ok(())
    }

    /// End of stream: drops and settles the short tail, closes the inboxes.
    fn finish(&self, state: &mut State) -> Result<()> {
        if state.window_dispatched != 0 {
            return Err(Error::Protocol {
                context: "ref distributor".into(),
                message: format!(
                    "end of stream with a window half dispatched ({} of {} refs); windows open only when whole",
                    state.window_dispatched, self.dispatch_quantum
                ),
            });
        }
        let mut leftover = std::mem::take(&mut state.round);
        loop {
            let more = self.queue.get_records(self.dispatch_quantum)?;
            if more.is_empty() {
                break;
            }
            leftover.extend(more);
        }
        if !leftover.is_empty() {
            let o = &self.options;
            let reason = format!(
                "end-of-stream leaves {} refs, fewer than one optimizer window (required global quantum={}: \
                 dp_size={} * refs_per_rank_step={}); settled without dispatch",
                leftover.len(),
                self.dispatch_quantum,
                o.dp_size,
                o.refs_per_rank_step
            );
            state.stats.dropped += leftover.len() as u64;
            let ids: Vec<SampleId> = leftover.iter().map(|r| r.sample_id.clone()).collect();
            self.queue.fail_ids(&ids, &reason);
            let mut cleanup_errors = Vec::new();
            if let Some(store) = &self.store {
                for r in &leftover {
                    if let Err(e) = r.to_ref().and_then(|r| store.adopt(&r)).and_then(|()| store.abort(&r.sample_id)) {
                        cleanup_errors.push(format!("{}: {e}", r.sample_id));
                    }
                }
            }
            self.settle(state, leftover.len() as u64)?;
            if !cleanup_errors.is_empty() {
                return Err(Error::Protocol {
                    context: "ref distributor".into(),
                    message: format!("{reason}; cleanup errors=[{}]", cleanup_errors.join(", ")),
                });
            }
            tracing::warn!("{reason}");
        }
        for inbox in &self.inboxes {
            inbox.close()?;
        }
        state.finished = true;
        Ok(())
    }

    /// Pumps until the stream ends, `stop` is set, or the idle timeout passes.
    pub fn run(&self, stop: &StopSignal) -> Result<()> {
        let clock = &self.options.clock;
        let mut idle_since = clock.now();
        while !stop.is_set() && !self.finished() {
            if self.pump()? {
                idle_since = clock.now();
                continue;
            }
            let idle = clock.now().saturating_duration_since(idle_since);
            if let Some(limit) = self.options.idle_timeout
                && idle >= limit
            {
                return Err(Error::timeout(
                    format!(
                        "refs from {}: ref-distributor saw none for {:.1} s and the source channel is still open \
                         (producer dead?)",
                        self.source.describe(),
                        idle.as_secs_f64()
                    ),
                    idle,
                ));
            }
            if self.options.idle_timeout.is_some() {
                clock.sleep(self.options.poll);
            } else {
                stop.wait_timeout(self.options.poll);
            }
        }
        Ok(())
    }

    /// [`RefDistributor::run`], and on failure poison every inbox with the reason (so every
    /// rank's reader fails with it) before returning it. Inboxes are never closed on failure.
    pub fn run_guarded(&self, stop: &StopSignal) -> Result<()> {
        let result = self.run(stop);
        if let Err(e) = &result {
            self.poison(&e.python_reason());
        }
        result
    }

    /// Writes `reason` as every inbox's failure.
    pub fn poison(&self, reason: &str) {
        for (rank, inbox) in self.inboxes.iter().enumerate() {
            if let Err(e) = inbox.fail(reason) {
                tracing::error!(rank, error = %e, "could not poison an inbox");
            }
        }
    }

    /// Runs [`RefDistributor::run_guarded`] on a thread named `ref-distributor`.
    pub fn start(self: &Arc<Self>) -> Result<DistributorThread> {
        let stop = Arc::new(StopSignal::new());
        let (me, signal) = (Arc::clone(self), Arc::clone(&stop));
        let handle = std::thread::Builder::new()
            .name("ref-distributor".into())
            .spawn(move || me.run_guarded(&signal))
            .map_err(|e| Error::io("starting the ref-distributor thread", &e))?;
        Ok(DistributorThread { stop, handle: Some(handle) })
    }
}

/// A running distributor thread.
#[derive(Debug)]
pub struct DistributorThread {
    stop: Arc<StopSignal>,
    handle: Option<std::thread::JoinHandle<Result<()>>>,
}

impl DistributorThread {
    /// Whether the thread ended (finished or failed).
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(std::thread::JoinHandle::is_finished)
    }

    /// Stops the thread and returns how its run ended.
    pub fn stop(mut self) -> Result<()> {
        self.stop.set();
        match self.handle.take() {
            Some(handle) => handle.join().unwrap_or_else(|payload| {
                let why = payload
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| payload.downcast_ref::<&str>().copied())
                    .unwrap_or("no message");
                Err(Error::Protocol {
                    context: "ref distributor".into(),
                    message: format!("the thread panicked: {why}"),
                })
            }),
            None => Ok(()),
        }
    }
}

impl Drop for DistributorThread {
    fn drop(&mut self) {
        self.stop.set();
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}
