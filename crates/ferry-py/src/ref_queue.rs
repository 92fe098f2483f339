//! `ferry.SampleRefQueue`: the in-process staging queue
//! (`ferry_control::ref_queue::SampleRefQueue`) for the `FeatureLoader`'s queue mode, with an
//! end of stream the Rust queue does not have.
//!
//! The Rust staging queue reads "empty now" as the end of the stream and leases whatever is
//! pending, so a loader over it would end (or settle a short tail) whenever a producer is
//! slower than the trainer. Here a queue is open until `close()`: a loader's lease waits until
//! a whole batch is pending or the queue is closed, and an empty lease means closed and drained
//! (the stream-queue reading of the `RefQueue` protocol). Every change of what is pending goes
//! through [`Staging`], under its gate lock, which is what the waits sleep on.
//!
//! Each loader reads the queue through its own [`LoaderQueue`], which also ends the loader's
//! waits when the loader is closed, its pass is closed, or Ctrl-C interrupts the consumer.

use crate::control::refs_from_py;
use crate::errors::IntoPyResult;
use crate::loader::Batch;
use ferry_control::queue::RefQueue;
use ferry_control::ref_queue::SampleRefQueue;
use ferry_control::signal::StopSignal;
use ferry_core::{Error, Result, SampleId, SampleRef};
use pyo3::prelude::*;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// How often a waiting lease checks its loader's stop flags (wakes on a put are immediate).
const STOP_POLL: Duration = Duration::from_millis(10);

/// The staging queue and its end of stream.
#[derive(Debug, Default)]
pub(crate) struct Staging {
    queue: SampleRefQueue,
    /// Whether `close()` was called (under the gate lock every pending change takes).
    closed: Mutex<bool>,
    /// Signalled when refs become pending, when the queue closes, and by [`Staging::wake`].
    changed: Condvar,
}

impl Staging {
    fn gate(&self) -> MutexGuard<'_, bool> {
        self.closed.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn put(&self, refs: Vec<SampleRef>) -> Result<usize> {
        let closed = self.gate();
        if *closed {
            return Err(Error::InvalidArgument(format!(
                "SampleRefQueue.put of {} ref(s) after close(): a closed queue takes no more refs",
                refs.len()
            )));
        }
        let accepted = self.queue.put(refs);
        drop(closed);
        self.changed.notify_all();
        Ok(accepted)
    }

    fn close(&self) {
        *self.gate() = true;
        self.changed.notify_all();
    }

    fn is_closed(&self) -> bool {
        *self.gate()
    }

    /// Wakes every waiting lease (to look at its stop flags now).
    fn wake(&self) {
        let _gate = self.gate();
        self.changed.notify_all();
    }

    fn fail(&self, refs: &[SampleRef], reason: &str, retryable: bool) -> Result<()> {
        let gate = self.gate();
        let failed = self.queue.fail(refs, reason, retryable);
        drop(gate);
        self.changed.notify_all();
        failed
    }

    /// Leases `max` refs once that many are pending, or what is left once the queue is closed
    /// (`[]`: closed and drained); `[]` at once when `give_up` says so.
    fn lease(&self, max: usize, give_up: impl Fn() -> bool) -> Result<Vec<SampleRef>> {
        let mut closed = self.gate();
        loop {
            if give_up() {
                return Ok(Vec::new());
            }
            if *closed || self.queue.depth() >= max {
                return self.queue.get(max, None);
            }
            closed = self.changed.wait_timeout(closed, STOP_POLL).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

/// One loader's view of a [`Staging`] queue: its leases also end (empty, so the pass ends)
/// once the loader is closed or while its consumer is being interrupted.
#[derive(Debug)]
pub(crate) struct LoaderQueue {
    staging: Arc<Staging>,
    /// Set by the loader's `close()`: no lease waits any more.
    closed: AtomicBool,
    /// Non-zero while a Ctrl-C or a `Batches.close()` ends the pass's wait.
    interrupts: AtomicUsize,
}

impl LoaderQueue {
    pub(crate) fn new(staging: Arc<Staging>) -> LoaderQueue {
        LoaderQueue { staging, closed: AtomicBool::new(false), interrupts: AtomicUsize::new(0) }
    }

    fn gives_up(&self) -> bool {
        self.closed.load(Ordering::SeqCst) || self.interrupts.load(Ordering::SeqCst) > 0
    }

    /// The loader is closed: its waits end now and for good.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.staging.wake();
    }

    /// Ends the waits until the [`Interrupt`] is dropped.
    pub(crate) fn interrupt(&self) -> Interrupt<'_> {
        self.interrupts.fetch_add(1, Ordering::SeqCst);
        self.staging.wake();
        Interrupt(self)
    }
}

/// An interruption of a [`LoaderQueue`]'s waits, lifted on drop.
pub(crate) struct Interrupt<'a>(&'a LoaderQueue);

impl Drop for Interrupt<'_> {
    fn drop(&mut self) {
        self.0.interrupts.fetch_sub(1, Ordering::SeqCst);
    }
}

impl RefQueue for LoaderQueue {
    /// Waits (whatever `timeout`) until a whole batch is pending or the queue is closed; see
    /// the module doc.
    fn get(&self, max: usize, _timeout: Option<Duration>) -> Result<Vec<SampleRef>> {
        self.staging.lease(max, || self.gives_up())
    }

    fn get_interruptible(&self, max: usize, stop: &StopSignal) -> Result<Vec<SampleRef>> {
        self.staging.lease(max, || stop.is_set() || self.gives_up())
    }

    fn ack_ids(&self, ids: &[SampleId]) -> Result<()> {
        self.staging.queue.ack_ids(ids)
    }

    fn fail(&self, refs: &[SampleRef], reason: &str, retryable: bool) -> Result<()> {
        self.staging.fail(refs, reason, retryable)
    }

    fn depth(&self) -> usize {
        self.staging.queue.depth()
    }

    fn in_flight_ids(&self) -> Vec<SampleId> {
        self.staging.queue.in_flight_ids()
    }
}

/// The in-process staging queue of refs for a queue-mode `FeatureLoader` (SpecForge's
/// `SampleRefQueue`): metadata only, FIFO, consume-once with leases.
///
/// `put(refs)` appends refs whose ids are neither pending nor in flight (returns how many);
/// `close()` ends the stream: loaders drain what is pending, then their passes end. A loader
/// leases a batch once `batch_size` refs are pending (or the rest once closed), acks it when
/// the consumer comes back for the next one (or, with `defer_ack=True`, when the caller calls
/// `ack(ids)`), and fails refs it cannot yield. `fail(refs, reason, retryable)` gives leased
/// refs back (`retryable`: to the pending tail) or drops them.
#[pyclass(frozen, module = "ferry", name = "SampleRefQueue")]
pub(crate) struct PySampleRefQueue {
    pub(crate) inner: Arc<Staging>,
}

/// Sample ids from a `Batch`, or an iterable of `str` / `SampleRef`.
fn ids_from_py(obj: &Bound<'_, PyAny>) -> PyResult<Vec<SampleId>> {
    if let Ok(batch) = obj.cast::<Batch>() {
        return Ok(batch.get().ids().iter().map(SampleId::new).collect());
    }
    if let Ok(s) = obj.extract::<String>() {
        return Ok(vec![SampleId::new(s)]);
    }
    let mut out = Vec::new();
    for item in obj.try_iter()? {
        let item = item?;
        match item.cast::<crate::records::PySampleRef>() {
            Ok(r) => out.push(r.get().inner.sample_id.clone()),
            Err(_) => out.push(SampleId::new(item.extract::<String>().map_err(|_| {
                pyo3::exceptions::PyTypeError::new_err(
                    "ids must be a Batch, or sample ids (str) or SampleRef objects".to_owned(),
                )
            })?)),
        }
    }
    Ok(out)
}

#[pymethods]
impl PySampleRefQueue {
    #[new]
    fn new() -> Self {
        PySampleRefQueue { inner: Arc::new(Staging::default()) }
    }

    /// Appends refs (a `SampleRef` or an iterable of them) whose ids are neither pending nor in
    /// flight, in order, and wakes waiting loaders; returns how many were accepted. After
    /// `close()`, an `InvalidArgumentError`.
    fn put(&self, py: Python<'_>, refs: &Bound<'_, PyAny>) -> PyResult<usize> {
        let refs = refs_from_py(refs)?;
        py.detach(|| self.inner.put(refs)).py_err(py)
    }

    /// Ends the stream: no more puts; loaders yield what is pending (a short tail as their
    /// `drop_last` says), then their passes end. Idempotent.
    fn close(&self) {
        self.inner.close();
    }

    /// Whether `close()` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.inner.is_closed()
    }

    /// Refs waiting to be leased.
    #[getter]
    fn depth(&self) -> usize {
        self.inner.queue.depth()
    }

    /// Refs leased and not yet acked or failed.
    #[getter]
    fn in_flight(&self) -> usize {
        self.inner.queue.in_flight()
    }

    /// Ids waiting to be leased, oldest first.
    fn pending_ids(&self) -> Vec<String> {
        self.inner.queue.pending_ids().into_iter().map(|id| id.to_string()).collect()
    }

    /// Ids leased and not yet settled, oldest first.
    fn in_flight_ids(&self) -> Vec<String> {
        self.inner.queue.in_flight_ids().into_iter().map(|id| id.to_string()).collect()
    }

    /// Settles leased refs (a `Batch`, or sample ids / `SampleRef`s): what a trainer calls
    /// after its durable ack when the loader has `defer_ack=True`. Ids not leased are ignored.
    fn ack(&self, py: Python<'_>, ids: &Bound<'_, PyAny>) -> PyResult<()> {
        let ids = ids_from_py(ids)?;
        self.inner.queue.ack_ids(&ids).py_err(py)
    }

    /// Gives leased refs back: `retryable` puts them at the pending tail (also after `close()`,
    /// so a loader drains them), otherwise they are dropped. Refs not leased are ignored.
    #[pyo3(signature = (refs, reason, retryable = true))]
    fn fail(&self, py: Python<'_>, refs: &Bound<'_, PyAny>, reason: &str, retryable: bool) -> PyResult<()> {
        let refs = refs_from_py(refs)?;
        py.detach(|| self.inner.fail(&refs, reason, retryable)).py_err(py)
    }

    pub(crate) fn __repr__(&self) -> String {
        format!(
            "SampleRefQueue(depth={}, in_flight={}, closed={})",
            self.inner.queue.depth(),
            self.inner.queue.in_flight(),
            if self.inner.is_closed() { "True" } else { "False" }
        )
    }
}
