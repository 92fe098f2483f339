//! `ferry.Producer`: the online producer's protocol for capture servers that produce samples
//! themselves (an SGLang hook, a custom inference loop): claim a fresh channel, wait for the
//! consumer's dispatch quantum, publish refs under the flow-control watermarks (in-flight refs
//! and resident bytes, with hysteresis, `ferry_control::ProducerFlowControl`), end the stream
//! (`close`, `.closed`) or fail it (`fail`, `.failed`), wait for the consumer, and clean up.
//!
//! It follows `ferry_control::producer` step for step: refs are disowned
//! (`FeatureStoreApi::disown`) just before they are published, so through an owning daemon
//! client what this process stored but never published dies with it, while what it published
//! outlives it for the consumer; a failed publish aborts the features of the unpublished
//! suffix; the hard byte cap (`max_resident_bytes`) refuses a publish past it; the cleanup
//! aborts every ref the channel holds, discards external attempts and drains the store.
//!
//! Waits (the quantum, a pause, the consumer's end) run with the GIL released and check for
//! signals every 100 ms; `peer_timeout_s` bounds each.

use crate::control::{exception_reason, poll_until, refs_from_py, seconds};
use crate::errors::{IntoPyResult, invalid, to_py};
use crate::records::PySampleRef;
use crate::store::Store;
use ferry_control::ProducerFlowControl;
use ferry_control::channel::{FileRefChannel, PublishTransaction, RefSink, RefSource};
use ferry_control::flow::FlowControlLimits;
use ferry_control::producer::claim_fresh_channel;
use ferry_core::{Error, Result, SampleId, SampleRef};
use ferry_store::{DrainPolicy, FeatureStoreApi};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Published-but-unconsumed refs and their bytes, reconciled against the consumed counter
/// (as `ferry_control::producer` keeps them).
#[derive(Debug, Default)]
struct Accounting {
    unconsumed: VecDeque<u64>,
    resident_bytes: u64,
    published: u64,
    consumed_seen: u64,
}

impl Accounting {
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

#[derive(Debug, Default)]
struct State {
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

/// What a room check found.
enum Room {
    Open { in_flight: u64 },
    ConsumerStopped,
}

/// The online producer for capture servers; see the module docs.
#[pyclass(frozen, module = "ferry", name = "Producer")]
pub(crate) struct Producer {
    path: PathBuf,
    channel: FileRefChannel,
    store: Py<Store>,
    api: Arc<dyn FeatureStoreApi>,
    flow: ProducerFlowControl,
    max_resident_bytes: Option<u64>,
    peer_timeout: Option<Duration>,
    poll: Duration,
    state: Mutex<State>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn peer_failed(channel: &Path, reason: String) -> Error {
    Error::PeerFailed { channel: channel.display().to_string(), peer: "consumer".into(), reason }
}

/// Always run at the end: abort every ref the channel holds (features the consumer already
/// deleted are no-ops), discard external attempts, drain the store.
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

fn abort_all(store: &dyn FeatureStoreApi, refs: &[SampleRef], why: &str) {
    for r in refs {
        if let Err(e) = store.abort(&r.sample_id) {
            tracing::warn!(sample = %r.sample_id, error = %e, why, "could not abort a ref");
        }
    }
}

impl Producer {
    fn timeout(&self, py: Python<'_>, timeout_s: Option<f64>) -> PyResult<Option<Duration>> {
        Ok(match timeout_s {
            Some(s) => Some(seconds(py, "timeout", s)?),
            None => self.peer_timeout,
        })
    }

    fn check_open(&self, py: Python<'_>, what: &str) -> PyResult<()> {
        let state = lock(&self.state);
        if !state.claimed {
            return Err(invalid(py, format!("{what}: the channel is not claimed (call claim() first)")));
        }
        if state.closed || state.failed {
            return Err(invalid(py, format!("{what}: the producer already closed or failed the channel")));
        }
        Ok(())
    }

    /// The quantum, waiting for it (and checking the watermarks against it) the first time.
    fn quantum(&self, py: Python<'_>, timeout: Option<Duration>) -> PyResult<u64> {
        if let Some(q) = lock(&self.state).quantum {
            return Ok(q);
        }
        let channel = &self.channel;
        let path = self.path.clone();
        let quantum = poll_until(
            py,
            self.poll,
            timeout,
            || {
                if let Some(reason) = channel.consumer_failure()? {
                    return Err(peer_failed(channel.path(), reason));
                }
                channel.consumer_quantum()
            },
            |limit| {
                Error::timeout(format!("the consumer's quantum on {} (is a consumer running?)", path.display()), limit)
            },
        )?;
        let limits = self.flow.limits();
        if limits.high_watermark_refs < quantum || limits.low_watermark_refs < quantum {
            return Err(invalid(
                py,
                format!(
                    "online producer: the in-flight watermarks (high {}, low {}) must each be at least the consumer's \
                     quantum ({quantum} = dp x batch x accumulation): a paused producer must resume while the consumer \
                     still needs up to one optimizer window",
                    limits.high_watermark_refs, limits.low_watermark_refs
                ),
            ));
        }
        lock(&self.state).quantum = Some(quantum);
        Ok(quantum)
    }

    /// Waits while flow control says pause; `ConsumerStopped` once the consumer finished.
    fn room(&self, py: Python<'_>, timeout: Option<Duration>) -> PyResult<Room> {
        self.check_open(py, "publish")?;
        let quantum = self.quantum(py, timeout)?;
        let (channel, flow, state) = (&self.channel, &self.flow, &self.state);
        let path = self.path.clone();
        let last = Mutex::new((0u64, 0u64));
        poll_until(
            py,
            self.poll,
            timeout,
            || {
                if let Some(reason) = channel.consumer_failure()? {
                    return Err(peer_failed(channel.path(), reason));
                }
                if channel.consumer_stopped()? {
                    return Ok(Some(Room::ConsumerStopped));
                }
                let mut st = lock(state);
                let consumed = channel.consumed_remote()?;
                let (in_flight, bytes) = st.acct.reconcile(consumed)?;
                *lock(&last) = (in_flight, bytes);
                let paused = in_flight >= quantum
                    && flow.should_pause(
                        i64::try_from(in_flight).unwrap_or(i64::MAX),
                        i64::try_from(bytes).unwrap_or(i64::MAX),
                    );
                if paused {
                    st.paused_checks += 1;
                    return Ok(None);
                }
                Ok(Some(Room::Open { in_flight }))
            },
            |limit| {
                let (in_flight, bytes) = *lock(&last);
                Error::timeout(
                    format!("the consumer to drain {} (in flight {in_flight}, {bytes} bytes)", path.display()),
                    limit,
                )
            },
        )
    }

    /// Disowns and publishes `refs` (room already granted): the hard byte cap, then a
    /// transaction whose unpublished suffix has its features aborted on failure.
    fn publish_now(&self, refs: Vec<SampleRef>, in_flight: u64) -> Result<()> {
        let store = self.api.as_ref();
        let ids: Vec<SampleId> = refs.iter().map(|r| r.sample_id.clone()).collect();
        if let Err(e) = store.disown(&ids) {
            abort_all(store, &refs, "not handed over");
            return Err(e);
        }
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

    /// Room, then publish; `false` (refs aborted) when the consumer already stopped.
    fn publish_refs(&self, py: Python<'_>, refs: Vec<SampleRef>, timeout: Option<Duration>) -> PyResult<bool> {
        match self.room(py, timeout) {
            Ok(Room::Open { in_flight }) => {
                py.detach(|| self.publish_now(refs, in_flight)).py_err(py)?;
                Ok(true)
            }
            Ok(Room::ConsumerStopped) => {
                lock(&self.state).stopped_by_consumer = true;
                py.detach(|| abort_all(self.api.as_ref(), &refs, "the consumer stopped"));
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn run_cleanup(&self, py: Python<'_>) -> Result<()> {
        if std::mem::replace(&mut lock(&self.state).cleaned, true) {
            return Ok(());
        }
        py.detach(|| cleanup(&self.path, self.api.as_ref()))
    }
}

#[pymethods]
impl Producer {
    /// A producer publishing into the channel `channel` (`<control_dir>/refs.jsonl`) refs of
    /// samples in `store` (a `ferry.Store`; through a daemon open it with `owning=True` so that
    /// what this process stored but never published dies with it).
    ///
    /// Flow control: pause when `high_watermark` refs are in flight (published, not yet
    /// acknowledged by the consumer's durable ack) or, with `high_watermark_bytes`, when their
    /// `estimated_bytes` reach it; resume at or below `low_watermark` (default: the high one)
    /// and `low_watermark_bytes`. Both ref watermarks must be at least the consumer's quantum.
    /// `max_resident_bytes` is a hard cap on in-flight bytes (a publish past it is refused with
    /// `StoreFullError`). `peer_timeout_s` bounds every wait on the consumer (`None`: wait);
    /// `poll_s` is the sleep between checks. With `claim` (default) the channel is claimed now.
    #[new]
    #[pyo3(signature = (
        channel, store, *, high_watermark = 256, low_watermark = None, high_watermark_bytes = None,
        low_watermark_bytes = None, max_resident_bytes = None, peer_timeout_s = None, poll_s = 0.05, claim = true
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        channel: PathBuf,
        store: &Bound<'_, Store>,
        high_watermark: i64,
        low_watermark: Option<i64>,
        high_watermark_bytes: Option<i64>,
        low_watermark_bytes: Option<i64>,
        max_resident_bytes: Option<u64>,
        peer_timeout_s: Option<f64>,
        poll_s: f64,
        claim: bool,
    ) -> PyResult<Self> {
        let flow = ProducerFlowControl::new(FlowControlLimits {
            high_watermark_refs: high_watermark,
            low_watermark_refs: low_watermark,
            high_watermark_bytes,
            low_watermark_bytes,
            ..FlowControlLimits::default()
        })
        .py_err(py)?;
        let producer = Producer {
            channel: FileRefChannel::open(&channel),
            path: channel,
            api: store.get().api(py)?,
            store: store.clone().unbind(),
            flow,
            max_resident_bytes,
            peer_timeout: peer_timeout_s.map(|s| seconds(py, "peer_timeout_s", s)).transpose()?,
            poll: seconds(py, "poll_s", poll_s)?,
            state: Mutex::new(State::default()),
        };
        if claim {
            producer.claim(py)?;
        }
        Ok(producer)
    }

    /// Claims the channel for a new attempt: nothing of an earlier attempt may exist there (the
    /// channel, a sidecar, a claim); `.producer_claim` is created exclusively. A producer
    /// never resumes.
    fn claim(&self, py: Python<'_>) -> PyResult<()> {
        if lock(&self.state).claimed {
            return Err(invalid(py, format!("{} is already claimed by this producer", self.path.display())));
        }
        py.detach(|| claim_fresh_channel(&self.path)).py_err(py)?;
        lock(&self.state).claimed = true;
        Ok(())
    }

    /// Waits for the consumer's dispatch quantum and returns it (a consumer failure raises
    /// `PeerFailedError`; `timeout` defaults to `peer_timeout_s`).
    #[pyo3(signature = (timeout = None))]
    fn wait_for_quantum(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<u64> {
        let timeout = self.timeout(py, timeout)?;
        self.quantum(py, timeout)
    }

    /// Blocks while flow control says pause (GIL released, Ctrl-C interrupts). Returns `True`
    /// when a publish may proceed, `False` when the consumer already finished (a cooperative
    /// stop). Raises `PeerFailedError` if the consumer failed, `TimeoutError` past `timeout`
    /// (default `peer_timeout_s`). Capture servers call it before generating.
    #[pyo3(signature = (timeout = None))]
    fn wait_for_room(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let timeout = self.timeout(py, timeout)?;
        match self.room(py, timeout)? {
            Room::Open { .. } => Ok(true),
            Room::ConsumerStopped => {
                lock(&self.state).stopped_by_consumer = true;
                Ok(false)
            }
        }
    }

    /// Publishes refs of samples already in the store (one or a sequence): waits for room,
    /// disowns them, appends them in one transaction. Returns `True`, or `False` when the
    /// consumer already finished (the refs are aborted: nobody will read them). On failure the
    /// features of the refs that did not reach the channel are aborted.
    #[pyo3(signature = (refs, *, timeout = None))]
    fn publish(&self, py: Python<'_>, refs: &Bound<'_, PyAny>, timeout: Option<f64>) -> PyResult<bool> {
        let refs = refs_from_py(refs)?;
        let timeout = self.timeout(py, timeout)?;
        self.publish_refs(py, refs, timeout)
    }

    /// Waits for room, stores one sample (`Store.put`'s arguments) and publishes its ref.
    /// Returns the ref, or `None` when the consumer already finished (nothing is stored).
    #[pyo3(signature = (sample_id, tensors, metadata = None, *, dtypes = None, timeout = None))]
    fn put_and_publish(
        &self,
        py: Python<'_>,
        sample_id: &str,
        tensors: &Bound<'_, PyAny>,
        metadata: Option<&Bound<'_, PyAny>>,
        dtypes: Option<&Bound<'_, PyAny>>,
        timeout: Option<f64>,
    ) -> PyResult<Option<PySampleRef>> {
        let timeout = self.timeout(py, timeout)?;
        let in_flight = match self.room(py, timeout)? {
            Room::Open { in_flight } => in_flight,
            Room::ConsumerStopped => {
                lock(&self.state).stopped_by_consumer = true;
                return Ok(None);
            }
        };
        let kwargs = PyDict::new(py);
        if let Some(dtypes) = dtypes {
            kwargs.set_item("dtypes", dtypes)?;
        }
        let put = self.store.bind(py).call_method("put", (sample_id, tensors, metadata), Some(&kwargs))?;
        let r = put.cast::<PySampleRef>()?.get().inner.clone();
        py.detach(|| self.publish_now(vec![r.clone()], in_flight)).py_err(py)?;
        Ok(Some(PySampleRef { inner: r }))
    }

    /// Signals a clean end of stream (`.closed`). Idempotent.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let mut state = lock(&self.state);
        if state.failed {
            return Err(invalid(py, "close: the producer already failed the channel"));
        }
        if !state.closed {
            py.detach(|| RefSink::close(&self.channel)).py_err(py)?;
            state.closed = true;
        }
        Ok(())
    }

    /// Waits until the consumer finished or failed (its failure raises `PeerFailedError`;
    /// `timeout` defaults to `peer_timeout_s`).
    #[pyo3(signature = (timeout = None))]
    fn wait_for_consumer(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        let timeout = self.timeout(py, timeout)?;
        let channel = &self.channel;
        let path = self.path.clone();
        poll_until(
            py,
            self.poll,
            timeout,
            || Ok(channel.consumer_stopped()?.then_some(())),
            |limit| Error::timeout(format!("the consumer to finish with {}", path.display()), limit),
        )?;
        match py.detach(|| channel.consumer_failure()).py_err(py)? {
            Some(reason) => Err(to_py(py, &peer_failed(&self.path, reason))),
            None => Ok(()),
        }
    }

    /// The always-run cleanup: aborts every ref the channel holds, discards external attempts,
    /// drains the store. Runs once.
    fn cleanup(&self, py: Python<'_>) -> PyResult<()> {
        self.run_cleanup(py).py_err(py)
    }

    /// The successful end: `close()`, `wait_for_consumer()`, `cleanup()` (always), as
    /// `run_producer` does. A consumer failure raises `PeerFailedError` (after the cleanup).
    /// Returns the report (`published`, `max_in_flight`, `paused_checks`,
    /// `stopped_by_consumer`, and the flow-control counters).
    #[pyo3(signature = (timeout = None))]
    fn finish<'py>(&self, py: Python<'py>, timeout: Option<f64>) -> PyResult<Bound<'py, PyDict>> {
        let outcome = self.close(py).and_then(|()| self.wait_for_consumer(py, timeout));
        let cleaned = self.run_cleanup(py);
        match (outcome, cleaned) {
            (Ok(()), Ok(())) => self.report(py),
            (Ok(()), Err(e)) => Err(to_py(py, &e)),
            (Err(primary), Ok(())) => Err(primary),
            (Err(primary), Err(e)) => {
                tracing::error!(error = %e, "producer cleanup failed after a failure");
                Err(primary)
            }
        }
    }

    /// The failed end: `.failed` with `reason` (a string, or an exception as
    /// `"<Type>: <message>"`), then the cleanup. Idempotent.
    fn fail(&self, py: Python<'_>, reason: &Bound<'_, PyAny>) -> PyResult<()> {
        let text = match reason.extract::<String>() {
            Ok(s) => s,
            Err(_) => exception_reason(py, reason),
        };
        {
            let mut state = lock(&self.state);
            if state.failed {
                return Ok(());
            }
            state.failed = true;
        }
        if let Err(e) = py.detach(|| RefSink::fail(&self.channel, &text)) {
            tracing::error!(error = %e, "could not publish the producer's failure");
        }
        self.run_cleanup(py).py_err(py)
    }

    /// The channel file.
    #[getter]
    fn channel(&self) -> PathBuf {
        self.path.clone()
    }

    /// Refs published.
    #[getter]
    fn published(&self) -> u64 {
        lock(&self.state).acct.published
    }

    /// The consumer's consumed counter (refs it durably acknowledged, or settled).
    fn consumed(&self, py: Python<'_>) -> PyResult<u64> {
        py.detach(|| self.channel.consumed_remote()).py_err(py)
    }

    /// Refs published and not yet consumed, and their bytes, reconciled now.
    fn in_flight(&self, py: Python<'_>) -> PyResult<(u64, u64)> {
        py.detach(|| {
            let consumed = self.channel.consumed_remote()?;
            lock(&self.state).acct.reconcile(consumed)
        })
        .py_err(py)
    }

    /// Whether flow control paused the producer at its last check.
    #[getter]
    fn paused(&self) -> bool {
        self.flow.is_paused()
    }

    /// The consumer's quantum, once known.
    #[getter]
    fn quantum_known(&self) -> Option<u64> {
        lock(&self.state).quantum
    }

    /// Whether a publish found the consumer already finished.
    #[getter]
    fn stopped_by_consumer(&self) -> bool {
        lock(&self.state).stopped_by_consumer
    }

    /// The report: `published`, `max_in_flight`, `paused_checks`, `stopped_by_consumer`,
    /// `pause_transitions`, `resume_transitions`, and the resolved watermarks.
    fn report<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let snapshot = crate::pyjson::to_py(py, &self.flow.snapshot())?;
        let d: Bound<'py, PyDict> = snapshot.cast_into()?;
        let state = lock(&self.state);
        d.set_item("published", state.acct.published)?;
        d.set_item("max_in_flight", state.max_in_flight)?;
        d.set_item("paused_checks", state.paused_checks)?;
        d.set_item("stopped_by_consumer", state.stopped_by_consumer)?;
        Ok(d)
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    /// On an exception: `fail()` with it. Without one: `finish()` unless the producer already
    /// closed or failed (a closed producer still gets its cleanup).
    #[pyo3(signature = (*exc))]
    fn __exit__(&self, py: Python<'_>, exc: &Bound<'_, PyTuple>) -> PyResult<bool> {
        let value = exc.get_item(1).ok().filter(|v| !v.is_none());
        match value {
            Some(e) => {
                let closed = lock(&self.state).closed;
                if closed {
                    // EOF is already out: the consumer's outcome is its own; just clean up.
                    if let Err(c) = self.run_cleanup(py) {
                        tracing::error!(error = %c, "producer cleanup failed after an exception");
                    }
                } else if let Err(f) = self.fail(py, &e) {
                    tracing::error!(error = %f, "producer failure handling failed");
                }
            }
            None => {
                let (failed, cleaned) = {
                    let s = lock(&self.state);
                    (s.failed, s.cleaned)
                };
                if !failed && !cleaned {
                    self.finish(py, None)?;
                }
            }
        }
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!("Producer(channel={:?}, published={})", self.path.display().to_string(), self.published())
    }
}
