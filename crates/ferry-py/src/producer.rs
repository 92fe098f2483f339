//! `ferry.Producer`: the online producer's protocol for capture servers that produce samples
//! themselves (an SGLang hook, a custom inference loop): claim a fresh channel, wait for the
//! consumer's dispatch quantum, publish refs under the flow-control watermarks (in-flight refs
//! and resident bytes, with hysteresis, `ferry_control::ProducerFlowControl`), end the stream
//! (`close`, `.closed`) or fail it (`fail`, `.failed`), wait for the consumer, and clean up.
//!
//! It drives `ferry_control::producer::ProducerSession`, the same protocol `run_producer`
//! runs: refs are disowned (`FeatureStoreApi::disown`) just before they are published, so
//! through an owning daemon client what this process stored but never published dies with it,
//! while what it published outlives it for the consumer; a failed publish aborts the features
//! of the unpublished suffix; the hard byte cap (`max_resident_bytes`) refuses a publish past
//! it; the cleanup aborts every ref the channel holds, discards external attempts and drains
//! the store.
//!
//! Waits (the quantum, a pause, the consumer's end) run with the GIL released on a helper
//! thread while this one checks for signals every 100 ms (a signal sets the session's stop
//! signal); `peer_timeout_s` bounds each.

use crate::control::{exception_reason, interruptible, refs_from_py, seconds};
use crate::errors::{IntoPyResult, invalid, to_py};
use crate::records::PySampleRef;
use crate::store::Store;
use ferry_control::channel::RefSink;
use ferry_control::flow::FlowControlLimits;
use ferry_control::producer::{ProducerSession, Room, SessionOptions};
use ferry_control::signal::StopSignal;
use ferry_core::{Result, SampleRef};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use std::path::PathBuf;
use std::time::Duration;

/// The online producer for capture servers; see the module docs.
#[pyclass(frozen, module = "ferry", name = "Producer")]
pub(crate) struct Producer {
    path: PathBuf,
    session: ProducerSession,
    store: Py<Store>,
    peer_timeout: Option<Duration>,
}

/// Runs one of the session's waits interruptibly: `Ok(None)` from it (its stop signal set) can
/// only follow a signal, whose exception is raised.
fn wait<T: Send>(py: Python<'_>, f: impl FnOnce(&StopSignal) -> Result<Option<T>> + Send) -> PyResult<T> {
    match interruptible(py, f) {
        Ok(done) => done.py_err(py)?.ok_or_else(|| invalid(py, "producer wait: interrupted")),
        Err((interrupt, _)) => Err(interrupt),
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
        if !self.session.is_claimed() {
            return Err(invalid(py, format!("{what}: the channel is not claimed (call claim() first)")));
        }
        if self.session.is_closed() || self.session.is_failed() {
            return Err(invalid(py, format!("{what}: the producer already closed or failed the channel")));
        }
        Ok(())
    }

    /// The quantum, waiting for it (and checking the watermarks against it) the first time.
    fn quantum(&self, py: Python<'_>, timeout: Option<Duration>) -> PyResult<u64> {
        wait(py, |stop| self.session.wait_for_quantum(timeout, stop))
    }

    /// Waits while flow control says pause: the refs in flight when a publish may proceed,
    /// `None` once the consumer finished; its failure raises `PeerFailedError`.
    fn room(&self, py: Python<'_>, timeout: Option<Duration>) -> PyResult<Option<u64>> {
        self.check_open(py, "publish")?;
        self.quantum(py, timeout)?;
        let room = wait(py, |stop| self.session.wait_for_room(timeout, stop).map(Some))?;
        match room {
            Room::Open { in_flight } => Ok(Some(in_flight)),
            Room::ConsumerStopped => Ok(None),
            Room::ConsumerFailed(e) => Err(to_py(py, &e)),
            Room::Stopped => Err(invalid(py, "producer wait: interrupted")),
        }
    }

    /// Room, then publish; `false` (refs aborted) when the consumer already stopped.
    fn publish_refs(&self, py: Python<'_>, refs: Vec<SampleRef>, timeout: Option<Duration>) -> PyResult<bool> {
        match self.room(py, timeout)? {
            Some(in_flight) => {
                py.detach(|| self.session.hand_over_and_publish(refs, in_flight)).py_err(py)?;
                Ok(true)
            }
            None => {
                py.detach(|| {
                    for r in &refs {
                        if let Err(e) = self.session.store().abort(&r.sample_id) {
                            tracing::warn!(sample = %r.sample_id, error = %e, "could not abort a ref the consumer will not read");
                        }
                    }
                });
                Ok(false)
            }
        }
    }

    fn run_cleanup(&self, py: Python<'_>) -> Result<()> {
        py.detach(|| self.session.cleanup())
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
        let options = SessionOptions {
            flow: FlowControlLimits {
                high_watermark_refs: high_watermark,
                low_watermark_refs: low_watermark,
                high_watermark_bytes,
                low_watermark_bytes,
                ..FlowControlLimits::default()
            },
            max_resident_bytes,
            poll: seconds(py, "poll_s", poll_s)?,
        };
        let producer = Producer {
            session: ProducerSession::new(&channel, store.get().api(py)?, options).py_err(py)?,
            path: channel,
            store: store.clone().unbind(),
            peer_timeout: peer_timeout_s.map(|s| seconds(py, "peer_timeout_s", s)).transpose()?,
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
        py.detach(|| self.session.claim()).py_err(py)
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
        Ok(self.room(py, timeout)?.is_some())
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
        let Some(in_flight) = self.room(py, timeout)? else {
            return Ok(None);
        };
        let kwargs = PyDict::new(py);
        if let Some(dtypes) = dtypes {
            kwargs.set_item("dtypes", dtypes)?;
        }
        let put = self.store.bind(py).call_method("put", (sample_id, tensors, metadata), Some(&kwargs))?;
        let r = put.cast::<PySampleRef>()?.get().inner.clone();
        py.detach(|| self.session.hand_over_and_publish(vec![r.clone()], in_flight)).py_err(py)?;
        Ok(Some(PySampleRef { inner: r }))
    }

    /// Signals a clean end of stream (`.closed`). Idempotent.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.session.close()).py_err(py)
    }

    /// Waits until the consumer finished or failed (its failure raises `PeerFailedError`;
    /// `timeout` defaults to `peer_timeout_s`).
    #[pyo3(signature = (timeout = None))]
    fn wait_for_consumer(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        let timeout = self.timeout(py, timeout)?;
        wait(py, |stop| self.session.wait_for_consumer(timeout, stop).map(|done| done.then_some(())))
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
        if !py.detach(|| self.session.fail(&text)) {
            return Ok(());
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
        self.session.report().published
    }

    /// The consumer's consumed counter (refs it durably acknowledged, or settled).
    fn consumed(&self, py: Python<'_>) -> PyResult<u64> {
        py.detach(|| self.session.channel().consumed_remote()).py_err(py)
    }

    /// Refs published and not yet consumed, and their bytes, reconciled now.
    fn in_flight(&self, py: Python<'_>) -> PyResult<(u64, u64)> {
        py.detach(|| self.session.in_flight()).py_err(py)
    }

    /// Whether flow control paused the producer at its last check.
    #[getter]
    fn paused(&self) -> bool {
        self.session.flow().is_paused()
    }

    /// The consumer's quantum, once known.
    #[getter]
    fn quantum_known(&self) -> Option<u64> {
        self.session.quantum()
    }

    /// Whether a publish found the consumer already finished.
    #[getter]
    fn stopped_by_consumer(&self) -> bool {
        self.session.report().stopped_by_consumer
    }

    /// The report: `published`, `max_in_flight`, `paused_checks`, `stopped_by_consumer`,
    /// `pause_transitions`, `resume_transitions`, and the resolved watermarks.
    fn report<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let snapshot = crate::pyjson::to_py(py, &self.session.flow().snapshot())?;
        let d: Bound<'py, PyDict> = snapshot.cast_into()?;
        let report = self.session.report();
        d.set_item("published", report.published)?;
        d.set_item("max_in_flight", report.max_in_flight)?;
        d.set_item("paused_checks", report.paused_checks)?;
        d.set_item("stopped_by_consumer", report.stopped_by_consumer)?;
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
                if self.session.is_closed() {
                    // EOF is already out: the consumer's outcome is its own; just clean up.
                    if let Err(c) = self.run_cleanup(py) {
                        tracing::error!(error = %c, "producer cleanup failed after an exception");
                    }
                } else if let Err(f) = self.fail(py, &e) {
                    tracing::error!(error = %f, "producer failure handling failed");
                }
            }
            None => {
                if !self.session.is_failed() && !self.session.is_cleaned() {
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
