//! Queue mode: batches from a consume-once [`RefQueue`] (SpecForge's `FeatureDataLoader` with a
//! `queue`, `SPECFORGE-RUNTIME.md` §12.5-§12.6), over the same batch engine as refs mode
//! ([`crate::materialize`]).
//!
//! This module owns the queue side of a pass: leasing refs, acking what the consumer took,
//! failing what could not be (or was never) yielded, settling an incomplete tail, the
//! `loader-prefetch` thread and its bounded buffer, and the one-active-pass rule.
//!
//! # A pass, synchronous (`prefetch depth = 0`)
//! Each `next()`: ack the batch the consumer took last (if acks are on); lease
//! `queue.get(batch_size, 0 s)`; nothing → end; fewer than `batch_size` with `drop_last` →
//! settle the tail terminally and end; else materialize. A materialize failure fails the refs
//! terminally (`"materialize:<error>"`) and ends the pass with the error.
//!
//! # A pass with prefetch (`depth > 0`)
//! ```text
//! loader-prefetch thread                          consumer (Batches::next)
//! ----------------------                          ------------------------
//! get_interruptible(batch_size, stop)             ack the batch taken last
//! track refs as outstanding                       pop the oldest item (waits)
//! materialize (whole batch), mark materialized    batch: no longer outstanding, yield it
//! push (waits while `depth` items buffered)       end / error: join the worker, end the pass
//! ```
//! The worker ends by pushing end-of-stream or an error; if it dies any other way (a panic
//! outside the batch build) the consumer is told, never left waiting. Shutdown (pass closed or
//! dropped, loader closed, pass ended): raise stop, drop buffered batches, wait up to the join
//! timeout for the worker; if it is still inside a store read the close fails with
//! [`Error::Timeout`] naming the outstanding refs, and a later close completes it. Once the
//! worker has exited, every outstanding ref is failed: RETRYABLE when the queue allows it
//! ([`RefQueue::loader_close_retryable`]), the ref was never materialized, the store retains on
//! release, or the ref is a read-only `file://` ref; otherwise terminally (its bytes were read
//! from a consume-once store, so they are gone).
//!
//! The worker never abandons a batch half-read: a sample read from a consume-once store is
//! freed at its release, so a partly read batch could be neither retried (some bytes are gone)
//! nor dropped honestly (some are not). Stop is checked between batches; a close waits at most
//! the join timeout for the batch in progress.
//!
//! # Acks
//! With acks on (the default), a batch is acked once the consumer has taken it and come back:
//! at the next `next()` call (including the one that returns `None`), or when the pass is closed
//! or dropped, except while the thread unwinds from a panic (a consumer that crashed on a batch
//! has not consumed it). With [`crate::FeatureLoaderBuilder::defer_ack_until_durable`] the
//! loader never acks: the trainer acks after its durable DP ack, and yielded refs stay in
//! flight until it does.
//!
//! # Incomplete tail
//! Fail the refs terminally (a stream queue advances its consumed counter), then free each
//! one in the store: `adopt` (when the ref carries a generation) and `abort`, plus one forced
//! drain attempt, because the store parks a failed removal for its `gc` instead of failing
//! `abort`, and the tail's cleanup must say so. Read-only `file://` refs are never freed.
//! Errors are collected into one error.

use crate::materialize::{BatchContext, materialize_batch};
use ferry_control::queue::RefQueue;
use ferry_control::signal::StopSignal;
use ferry_core::{Error, Result, SampleId, SampleRef, TrainBatch};
use ferry_store::{DrainPolicy, FeatureStoreApi};
use std::collections::{HashSet, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Name of the prefetch thread (SpecForge's).
const PREFETCH_THREAD: &str = "loader-prefetch";

/// How a queue loader runs its passes (fixed at build time).
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueSettings {
    pub(crate) batch_size: usize,
    pub(crate) drop_last: bool,
    /// Ack what the consumer took (`false`: the trainer acks after its durable ack).
    pub(crate) ack: bool,
    /// Batches the prefetch thread may hold ready; 0 = synchronous.
    pub(crate) prefetch_depth: usize,
    pub(crate) join_timeout: Duration,
}

/// A loader's queue: the queue, whether the loader is closed, and its one live pass.
pub(crate) struct QueueSource {
    queue: Arc<dyn RefQueue>,
    settings: QueueSettings,
    /// The live pass, if any; cleared by the pass once it has fully shut down. `closed` lives
    /// under the same lock so a close and a new pass cannot interleave.
    active: Mutex<ActiveSlot>,
}

#[derive(Default)]
struct ActiveSlot {
    closed: bool,
    pass: Option<Arc<PassControl>>,
}

/// What the loader can reach of a live pass (to close it).
struct PassControl {
    /// Set by [`QueueSource::close`]: a synchronous pass ends at its next call.
    stop: AtomicBool,
    prefetch: Option<Arc<Prefetch>>,
}

impl QueueSource {
    pub(crate) fn new(queue: Arc<dyn RefQueue>, settings: QueueSettings) -> QueueSource {
        QueueSource { queue, settings, active: Mutex::new(ActiveSlot::default()) }
    }

    fn slot(&self) -> MutexGuard<'_, ActiveSlot> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a pass is live (started and not fully shut down).
    pub(crate) fn has_active_pass(&self) -> bool {
        self.slot().pass.is_some()
    }

    /// Whether [`QueueSource::close`] was called.
    pub(crate) fn is_closed(&self) -> bool {
        self.slot().closed
    }

    /// Starts a pass: empty once the loader is closed; an error pass if one is live.
    pub(crate) fn start_pass(self: &Arc<Self>, ctx: &Arc<BatchContext>) -> QueuePass {
        let mut slot = self.slot();
        if slot.closed {
            return QueuePass::ended(Arc::clone(self), Arc::clone(ctx), None);
        }
        if slot.pass.is_some() {
            let error = Error::Protocol {
                context: "feature loader (queue mode)".into(),
                message: "already has an active iterator: a queue stream is consume-once; finish, close or drop the live pass first".into(),
            };
            return QueuePass::ended(Arc::clone(self), Arc::clone(ctx), Some(error));
        }
        let prefetch = if self.settings.prefetch_depth == 0 {
            None
        } else {
            match Prefetch::start(ctx, &self.queue, self.settings) {
                Ok(prefetch) => Some(prefetch),
                Err(e) => return QueuePass::ended(Arc::clone(self), Arc::clone(ctx), Some(e)),
            }
        };
        let control = Arc::new(PassControl { stop: AtomicBool::new(false), prefetch });
        slot.pass = Some(Arc::clone(&control));
        QueuePass {
            source: Arc::clone(self),
            ctx: Arc::clone(ctx),
            control: Some(control),
            taken: None,
            finished: false,
            deferred_error: None,
        }
    }

    /// Marks the loader closed (no new pass) and shuts down the live pass's prefetch, waiting
    /// up to the join timeout. A synchronous pass ends at its next call. Idempotent; after a
    /// timeout a later call can complete the shutdown.
    pub(crate) fn close(&self) -> Result<()> {
        let live = {
            let mut slot = self.slot();
            slot.closed = true;
            slot.pass.clone()
        };
        let Some(control) = live else { return Ok(()) };
        control.stop.store(true, Ordering::SeqCst);
        if let Some(prefetch) = &control.prefetch {
            prefetch.shutdown(self.settings.join_timeout)?;
            self.release_slot(&control);
        }
        Ok(())
    }

    /// Frees the slot if `control` still holds it.
    fn release_slot(&self, control: &Arc<PassControl>) {
        let mut slot = self.slot();
        if slot.pass.as_ref().is_some_and(|live| Arc::ptr_eq(live, control)) {
            slot.pass = None;
        }
    }
}

/// One pass over a queue (the queue half of [`crate::Batches`]).
pub(crate) struct QueuePass {
    source: Arc<QueueSource>,
    ctx: Arc<BatchContext>,
    /// `None` for a pass that never started (closed loader, a live pass already, spawn error).
    control: Option<Arc<PassControl>>,
    /// Refs of the batch the consumer took last, to ack when it comes back (acks on only).
    taken: Option<Vec<SampleRef>>,
    finished: bool,
    deferred_error: Option<Error>,
}

impl QueuePass {
    fn ended(source: Arc<QueueSource>, ctx: Arc<BatchContext>, error: Option<Error>) -> QueuePass {
        QueuePass { source, ctx, control: None, taken: None, finished: error.is_none(), deferred_error: error }
    }

    fn queue(&self) -> &dyn RefQueue {
        self.source.queue.as_ref()
    }

    /// Batches already prefetched and waiting (0 for a synchronous or finished pass): a lower
    /// bound of what the pass will still yield.
    pub(crate) fn buffered(&self) -> usize {
        if self.finished {
            return 0;
        }
        self.control.as_ref().and_then(|c| c.prefetch.as_ref()).map_or(0, |p| p.buffered())
    }

    /// The loader's join timeout (how long a close waits for the prefetch thread).
    pub(crate) fn join_timeout(&self) -> Duration {
        self.source.settings.join_timeout
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.finished && self.deferred_error.is_none()
    }

    /// The next batch (see the module doc for the order of steps).
    pub(crate) fn next_batch(&mut self) -> Option<Result<TrainBatch>> {
        if let Some(error) = self.deferred_error.take() {
            self.finished = true;
            return Some(Err(error));
        }
        if self.finished {
            return None;
        }
        // The consumer came back for more: it is done with the batch it took.
        if let Err(e) = self.ack_taken() {
            return self.end_with_error(e);
        }
        let Some(control) = self.control.clone() else { return self.end(None) };
        if control.stop.load(Ordering::SeqCst) {
            return self.end(None);
        }
        match &control.prefetch {
            None => self.next_synchronous(),
            Some(prefetch) => self.next_prefetched(prefetch),
        }
    }

    fn next_synchronous(&mut self) -> Option<Result<TrainBatch>> {
        let settings = self.source.settings;
        let refs = match self.queue().get(settings.batch_size, Some(Duration::ZERO)) {
            Ok(refs) => refs,
            Err(e) => return self.end_with_error(e),
        };
        if refs.is_empty() {
            return self.end(None);
        }
        if refs.len() < settings.batch_size && settings.drop_last {
            let settled = settle_incomplete_tail(self.ctx.store.as_ref(), self.queue(), &refs, settings.batch_size);
            return match settled {
                Ok(()) => self.end(None),
                Err(e) => self.end_with_error(e),
            };
        }
        match materialize_whole_batch(&self.ctx, &refs) {
            Ok(batch) => {
                self.take(refs);
                Some(Ok(batch))
            }
            Err(e) => {
                let e = fail_after_materialize_error(self.queue(), &refs, e);
                self.end_with_error(e)
            }
        }
    }

    fn next_prefetched(&mut self, prefetch: &Arc<Prefetch>) -> Option<Result<TrainBatch>> {
        match prefetch.pop() {
            Item::Batch(batch, refs) => {
                self.take(refs);
                Some(Ok(batch))
            }
            Item::End => self.end(None),
            // The worker pushes an error as its last act: wait for it to exit, so the pass is
            // fully shut down (and the loader free for a new one) when the error surfaces.
            Item::Failed(e) => self.end_with_error_after(e, self.source.settings.join_timeout),
        }
    }

    /// Records that the consumer holds `refs` (to ack later, when acks are on).
    fn take(&mut self, refs: Vec<SampleRef>) {
        if self.source.settings.ack {
            self.taken = Some(refs);
        }
    }

    fn ack_taken(&mut self) -> Result<()> {
        match self.taken.take() {
            Some(refs) => self.queue().ack(&refs),
            None => Ok(()),
        }
    }

    /// Ends the pass at end of stream (or when the loader was closed): shuts the worker down
    /// (it has exited or is exiting) and yields `item`, or the shutdown's error.
    fn end(&mut self, item: Option<Result<TrainBatch>>) -> Option<Result<TrainBatch>> {
        self.finished = true;
        match self.shut_down(self.source.settings.join_timeout) {
            Ok(()) => item,
            Err(e) => Some(Err(e)),
        }
    }

    /// Ends the pass with `error`. The shutdown does not wait (a worker still inside a store
    /// read must not delay the error); `close` or the drop completes it.
    fn end_with_error(&mut self, error: Error) -> Option<Result<TrainBatch>> {
        self.end_with_error_after(error, Duration::ZERO)
    }

    /// Ends the pass with `error`, waiting up to `wait` for the worker to exit.
    fn end_with_error_after(&mut self, error: Error, wait: Duration) -> Option<Result<TrainBatch>> {
        self.finished = true;
        if let Err(e) = self.shut_down(wait) {
            tracing::debug!(error = %e, "queue pass ended with an error; its shutdown completes at close or drop");
        }
        Some(Err(error))
    }

    /// Stops the worker (if any), waits up to `timeout`, fails what it left outstanding, and
    /// frees the loader's active-pass slot once all of that is done.
    fn shut_down(&mut self, timeout: Duration) -> Result<()> {
        let Some(control) = self.control.clone() else { return Ok(()) };
        control.stop.store(true, Ordering::SeqCst);
        if let Some(prefetch) = &control.prefetch {
            prefetch.shutdown(timeout)?;
        }
        self.source.release_slot(&control);
        self.control = None;
        Ok(())
    }

    /// Ends the pass now: acks the batch the consumer took (when `ack_taken` and acks are
    /// on), then shuts down (see the module doc). Idempotent.
    pub(crate) fn close_within(&mut self, timeout: Duration, ack_taken: bool) -> Result<()> {
        self.finished = true;
        self.deferred_error = None;
        let acked = if ack_taken { self.ack_taken() } else { Ok(()) };
        let shut = self.shut_down(timeout);
        match (acked, shut) {
            (Err(ack_error), Err(shutdown_error)) => {
                tracing::warn!(error = %shutdown_error, "queue pass shutdown failed after its ack failed");
                Err(ack_error)
            }
            (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
            (Ok(()), Ok(())) => Ok(()),
        }
    }
}

impl Drop for QueuePass {
    fn drop(&mut self) {
        // A consumer unwinding from a panic did not finish with the batch it took: leave it in
        // flight rather than ack it.
        let ack_taken = !std::thread::panicking();
        let timeout = self.source.settings.join_timeout;
        if let Err(e) = self.close_within(timeout, ack_taken) {
            tracing::warn!(error = %e, "dropped a queue loader pass that could not shut down cleanly; closing the loader can complete it");
        }
    }
}

/// Materializes the whole batch (no stop between samples: see the module doc). A panic in a
/// transform becomes an error, so the refs are failed instead of staying leased forever.
fn materialize_whole_batch(ctx: &BatchContext, refs: &[SampleRef]) -> Result<TrainBatch> {
    let never_stop = AtomicBool::new(false);
    match catch_unwind(AssertUnwindSafe(|| materialize_batch(ctx, refs, &never_stop))) {
        Ok(Ok(Some(batch))) => Ok(batch),
        Ok(Ok(None)) => Err(loader_error("materialize", refs, "the batch build stopped without a stop request".into())),
        Ok(Err(e)) => Err(e),
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".into());
            Err(loader_error("materialize", refs, format!("panicked while building the batch: {message}")))
        }
    }
}

/// Fails `refs` terminally after `error` (SpecForge's `"materialize:<exc>"`); returns the
/// error to raise (with the failed `fail` attached, if it failed).
fn fail_after_materialize_error(queue: &dyn RefQueue, refs: &[SampleRef], error: Error) -> Error {
    match queue.fail(refs, &format!("materialize:{error}"), false) {
        Ok(()) => error,
        Err(fail_error) => Error::FailureHandling {
            primary: Box::new(error),
            record_error: Some(format!("failing the batch's refs on the queue: {fail_error}")),
            cleanup_errors: Vec::new(),
        },
    }
}

/// Settles a short final batch (see the module doc): fail terminally, then free each sample.
fn settle_incomplete_tail(
    store: &dyn FeatureStoreApi,
    queue: &dyn RefQueue,
    refs: &[SampleRef],
    batch_size: usize,
) -> Result<()> {
    let received = refs.len();
    let mut errors = Vec::new();
    let reason = format!("incomplete final batch: received {received} refs but batch_size={batch_size}");
    if let Err(e) = queue.fail(refs, &reason, false) {
        errors.push(format!("queue fail: {e}"));
    }
    for r in refs {
        if let Err(e) = free_tail_sample(store, r) {
            errors.push(format!("{}: {e}", r.sample_id));
        }
    }
    if errors.is_empty() {
        return Ok(());
    }
    Err(loader_error(
        "settle an incomplete batch",
        refs,
        format!(
            "online stream ended with an incomplete batch: received {received} refs but batch_size={batch_size}; cleanup errors=[{}]",
            errors.join("; ")
        ),
    ))
}

/// Frees one sample of an incomplete tail (nothing for a read-only `file://` ref).
fn free_tail_sample(store: &dyn FeatureStoreApi, r: &SampleRef) -> Result<()> {
    if is_file_ref(r) {
        return Ok(());
    }
    // Adopt first so this store can free a sample another process wrote. A ref without a
    // generation cannot be adopted (SpecForge adopts only where the store supports it).
    if r.generation().is_some() {
        store.adopt(r)?;
    }
    store.abort(&r.sample_id)?;
    // `abort` parks a removal that fails (gc retries it) instead of failing; one forced attempt
    // now is a no-op if nothing is parked and turns a removal that keeps failing into an error.
    let one_attempt = DrainPolicy { max_attempts: 1, retry_interval: Duration::ZERO };
    store.drain_samples(std::slice::from_ref(&r.sample_id), one_attempt)?;
    Ok(())
}

fn is_file_ref(r: &SampleRef) -> bool {
    r.scheme() == Some("file")
}

fn id_list(ids: impl IntoIterator<Item = SampleId>) -> String {
    ids.into_iter().map(|id| id.to_string()).collect::<Vec<_>>().join(", ")
}

fn loader_error(operation: &str, refs: &[SampleRef], message: String) -> Error {
    Error::Backend {
        backend: "feature-loader".into(),
        operation: operation.into(),
        key: format!("[{}]", id_list(refs.iter().map(|r| r.sample_id.clone()))),
        message,
    }
}

// ---------------------------------------------------------------------------------- prefetch

/// What the worker hands the consumer.
enum Item {
    Batch(TrainBatch, Vec<SampleRef>),
    End,
    Failed(Error),
}

/// A ref the worker leased and the consumer has not taken.
struct Outstanding {
    r: SampleRef,
    /// Its bytes were read (from a consume-once store they are gone).
    materialized: bool,
}

#[derive(Default)]
struct PrefetchState {
    /// Ready items, oldest first; at most `depth`.
    items: VecDeque<Item>,
    /// Shutdown has begun: the worker stops, pushes are refused, pops see the end.
    stopping: bool,
    /// The worker has exited (set by its exit guard, even on a panic).
    worker_done: bool,
    /// Refs leased by the worker and not yet taken by the consumer, in lease order.
    outstanding: Vec<Outstanding>,
    /// Outstanding refs have been failed (shutdown ran to completion).
    settled: bool,
}

/// The prefetch thread and what it shares with the consumer.
struct Prefetch {
    queue: Arc<dyn RefQueue>,
    store: Arc<dyn FeatureStoreApi>,
    depth: usize,
    state: Mutex<PrefetchState>,
    /// Signalled on every change of `state`.
    changed: Condvar,
    /// Interrupts the worker's queue wait.
    stop: StopSignal,
    worker: Mutex<Option<JoinHandle<()>>>,
}

/// Marks the worker done when its thread ends, normally or by panic.
struct WorkerExit(Arc<Prefetch>);

impl Drop for WorkerExit {
    fn drop(&mut self) {
        self.0.lock().worker_done = true;
        self.0.changed.notify_all();
    }
}

impl Prefetch {
    fn start(ctx: &Arc<BatchContext>, queue: &Arc<dyn RefQueue>, settings: QueueSettings) -> Result<Arc<Prefetch>> {
        let prefetch = Arc::new(Prefetch {
            queue: Arc::clone(queue),
            store: Arc::clone(&ctx.store),
            depth: settings.prefetch_depth.max(1),
            state: Mutex::new(PrefetchState::default()),
            changed: Condvar::new(),
            stop: StopSignal::new(),
            worker: Mutex::new(None),
        });
        let (worker_ctx, shared) = (Arc::clone(ctx), Arc::clone(&prefetch));
        let handle = std::thread::Builder::new()
            .name(PREFETCH_THREAD.into())
            .spawn(move || {
                let exit = WorkerExit(shared);
                prefetch_worker(&exit.0, &worker_ctx, settings);
            })
            .map_err(|e| Error::io(format!("spawning the {PREFETCH_THREAD} thread"), &e))?;
        *prefetch.worker.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(prefetch)
    }

    fn lock(&self) -> MutexGuard<'_, PrefetchState> {
        // Every update of the state is complete under the lock; a panic elsewhere cannot leave
        // it half-changed.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn buffered(&self) -> usize {
        self.lock().items.iter().filter(|item| matches!(item, Item::Batch(..))).count()
    }

    /// Worker: records leased refs as outstanding.
    fn track(&self, refs: &[SampleRef]) {
        let mut state = self.lock();
        state.outstanding.extend(refs.iter().map(|r| Outstanding { r: r.clone(), materialized: false }));
    }

    /// Worker: the refs are settled by the worker itself (failed, tail-settled).
    fn untrack(&self, refs: &[SampleRef]) {
        let ids: HashSet<&SampleId> = refs.iter().map(|r| &r.sample_id).collect();
        self.lock().outstanding.retain(|o| !ids.contains(&o.r.sample_id));
    }

    /// Worker: the refs' bytes have been read.
    fn mark_materialized(&self, refs: &[SampleRef]) {
        let ids: HashSet<&SampleId> = refs.iter().map(|r| &r.sample_id).collect();
        for o in self.lock().outstanding.iter_mut().filter(|o| ids.contains(&o.r.sample_id)) {
            o.materialized = true;
        }
    }

    fn is_stopping(&self) -> bool {
        self.lock().stopping
    }

    /// Worker: hands `item` over, waiting while the buffer is full. `false` (and the item is
    /// dropped) once shutdown has begun.
    fn push(&self, item: Item) -> bool {
        let mut state = self.lock();
        while state.items.len() >= self.depth && !state.stopping {
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        if state.stopping {
            drop(state);
            drop(item); // a dropped batch returns its buffers to the pool; its refs stay outstanding
            return false;
        }
        state.items.push_back(item);
        self.changed.notify_all();
        true
    }

    /// Consumer: the oldest item, waiting for the worker. A batch's refs stop being
    /// outstanding in the same step (the trainer owns them now), so a concurrent shutdown can
    /// never fail a batch that is being yielded.
    fn pop(&self) -> Item {
        let mut state = self.lock();
        loop {
            if let Some(item) = state.items.pop_front() {
                if let Item::Batch(_, refs) = &item {
                    let ids: HashSet<&SampleId> = refs.iter().map(|r| &r.sample_id).collect();
                    state.outstanding.retain(|o| !ids.contains(&o.r.sample_id));
                }
                self.changed.notify_all();
                return item;
            }
            if state.stopping {
                return Item::End;
            }
            if state.worker_done {
                // The worker always pushes End or an error before a normal exit.
                return Item::Failed(Error::Backend {
                    backend: "feature-loader".into(),
                    operation: "prefetch".into(),
                    key: PREFETCH_THREAD.into(),
                    message: "the prefetch thread exited without ending the stream (it panicked)".into(),
                });
            }
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Raises stop, drops buffered batches, waits up to `timeout` for the worker, then fails
    /// what it left outstanding. Idempotent; after a timeout a later call can complete it.
    fn shutdown(&self, timeout: Duration) -> Result<()> {
        self.stop.set();
        let started = Instant::now();
        let deadline = started + timeout;
        let dropped_items = {
            let mut state = self.lock();
            state.stopping = true;
            self.changed.notify_all();
            std::mem::take(&mut state.items)
        };
        drop(dropped_items); // outside the lock: returning buffers to the pool takes time
        let outstanding = {
            let mut state = self.lock();
            while !state.worker_done {
                let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else {
                    let ids = id_list(state.outstanding.iter().map(|o| o.r.sample_id.clone()));
                    return Err(Error::timeout(
                        format!(
                            "the {PREFETCH_THREAD} thread to stop (it did not stop within {timeout:?}, still inside a store read or a transform; outstanding_refs=[{ids}]); close again to complete the shutdown"
                        ),
                        started.elapsed(),
                    ));
                };
                state = self.changed.wait_timeout(state, left).unwrap_or_else(|p| p.into_inner()).0;
            }
            if state.settled {
                return Ok(());
            }
            state.settled = true;
            std::mem::take(&mut state.outstanding)
        };
        if let Some(handle) = self.worker.lock().unwrap_or_else(|p| p.into_inner()).take() {
            // The worker has marked itself done, the last thing it does; a panic was already
            // reported to the consumer.
            let _ = handle.join();
        }
        self.settle_outstanding(outstanding)
    }

    /// Fails refs the consumer never took: retryable where a retry can still read them.
    fn settle_outstanding(&self, outstanding: Vec<Outstanding>) -> Result<()> {
        if outstanding.is_empty() {
            return Ok(());
        }
        let queue_retryable = self.queue.loader_close_retryable();
        // A store that cannot say (a daemon gone away) counts as consume-once: a read that may
        // have freed the bytes is never offered for a retry that would then fail.
        let retains = self.store.retains_on_release().unwrap_or(false);
        let (retry, terminal): (Vec<Outstanding>, Vec<Outstanding>) =
            outstanding.into_iter().partition(|o| queue_retryable || !o.materialized || retains || is_file_ref(&o.r));
        let retry: Vec<SampleRef> = retry.into_iter().map(|o| o.r).collect();
        let terminal: Vec<SampleRef> = terminal.into_iter().map(|o| o.r).collect();
        let mut first_error = None;
        if !retry.is_empty() {
            let reason = "loader closed before the batch was yielded";
            if let Err(e) = self.queue.fail(&retry, reason, true) {
                first_error.get_or_insert(e);
            }
        }
        if !terminal.is_empty() {
            let reason = "loader closed after reading the batch from a consume-once store";
            if let Err(e) = self.queue.fail(&terminal, reason, false) {
                if let Some(first) = &first_error {
                    tracing::warn!(error = %e, earlier = %first, "failing prefetched refs terminally failed too");
                }
                first_error.get_or_insert(e);
            }
        }
        tracing::debug!(retryable = retry.len(), terminal = terminal.len(), "queue loader failed its outstanding refs");
        first_error.map_or(Ok(()), Err)
    }
}

/// The `loader-prefetch` thread: lease, materialize, hand over, until end of stream, an error
/// or stop.
fn prefetch_worker(shared: &Prefetch, ctx: &BatchContext, settings: QueueSettings) {
    loop {
        if shared.is_stopping() {
            return;
        }
        let refs = match shared.queue.get_interruptible(settings.batch_size, &shared.stop) {
            Ok(refs) => refs,
            Err(e) => {
                shared.push(Item::Failed(e));
                return;
            }
        };
        if refs.is_empty() {
            // Empty means end of stream, or that stop interrupted the wait.
            if !shared.is_stopping() {
                shared.push(Item::End);
            }
            return;
        }
        shared.track(&refs);
        if shared.is_stopping() {
            return; // never read: the shutdown fails them retryably
        }
        if refs.len() < settings.batch_size && settings.drop_last {
            shared.untrack(&refs);
            let item =
                match settle_incomplete_tail(ctx.store.as_ref(), shared.queue.as_ref(), &refs, settings.batch_size) {
                    Ok(()) => Item::End,
                    Err(e) => Item::Failed(e),
                };
            shared.push(item);
            return;
        }
        match materialize_whole_batch(ctx, &refs) {
            Ok(batch) => {
                shared.mark_materialized(&refs);
                if !shared.push(Item::Batch(batch, refs)) {
                    return;
                }
            }
            Err(e) => {
                shared.untrack(&refs);
                let e = fail_after_materialize_error(shared.queue.as_ref(), &refs, e);
                shared.push(Item::Failed(e));
                return;
            }
        }
    }
}
