//! The control plane from Python: `RefChannel` (SpecForge's `StreamingRefChannel` over a JSONL
//! file and its sidecars), the data-parallel collective (`SocketCollective`, and any Python
//! object with `rank`, `world_size` and `all_gather(bytes) -> list[bytes]`, such as the
//! `ferry.TorchCollective` adapter), and the interruptible waits the online consumer and the
//! producer share.
//!
//! Every call that touches the file system or a socket runs with the GIL released. Waits that
//! can last (an inbox with no refs yet, a paused producer) check for signals every
//! [`SIGNAL_CHECK`], so Ctrl-C raises `KeyboardInterrupt` promptly.

use crate::errors::{IntoPyResult, invalid};
use crate::records::PySampleRef;
use ferry_control::channel::{FileRefChannel, RefSink, RefSource, sidecar};
use ferry_control::collective::{Collective, GroupAddress, SocketGroup};
use ferry_control::signal::StopSignal;
use ferry_core::{Error, Result};
use pyo3::exceptions::{PyConnectionError, PyTimeoutError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{RecvTimeoutError, channel};
use std::time::Duration;

/// How often a blocking wait checks for signals (Ctrl-C).
pub(crate) const SIGNAL_CHECK: Duration = Duration::from_millis(100);

/// Runs `f` on a helper thread with the GIL released while this thread checks for signals
/// every [`SIGNAL_CHECK`]. On a signal (a Python exception from `check_signals`, normally
/// `KeyboardInterrupt`), `stop` is set, `f` is awaited (it must return soon once `stop` is set)
/// and `Err((exception, f's value))` is returned, so the caller can undo what `f` did.
pub(crate) fn interruptible<T: Send>(
    py: Python<'_>,
    f: impl FnOnce(&StopSignal) -> T + Send,
) -> std::result::Result<T, (PyErr, T)> {
    let stop = StopSignal::new();
    let (tx, rx) = channel();
    let outcome = py.detach(move || {
        std::thread::scope(|scope| {
            let stop = &stop;
            scope.spawn(move || {
                let _ = tx.send(f(stop));
            });
            let mut interrupted: Option<PyErr> = None;
            loop {
                match rx.recv_timeout(SIGNAL_CHECK) {
                    Ok(value) => {
                        return Some(match interrupted {
                            Some(e) => Err((e, value)),
                            None => Ok(value),
                        });
                    }
                    Err(RecvTimeoutError::Timeout) if interrupted.is_none() => {
                        if let Err(e) = Python::attach(|py| py.check_signals()) {
                            stop.set();
                            interrupted = Some(e);
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    // The helper panicked (the scope re-raises the panic on exit).
                    Err(RecvTimeoutError::Disconnected) => return None,
                }
            }
        })
    });
    outcome.unwrap_or_else(|| unreachable!("std::thread::scope propagates the helper's panic"))
}

/// A duration from seconds given in Python.
pub(crate) fn seconds(py: Python<'_>, what: &str, s: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(s).map_err(|_| invalid(py, format!("{what}={s}: expected a finite number >= 0")))
}

/// Refs from a `SampleRef` or an iterable of them.
pub(crate) fn refs_from_py(obj: &Bound<'_, PyAny>) -> PyResult<Vec<ferry_core::SampleRef>> {
    if let Ok(r) = obj.cast::<PySampleRef>() {
        return Ok(vec![r.get().inner.clone()]);
    }
    let mut out = Vec::new();
    for item in obj.try_iter()? {
        let item = item?;
        let r = item.cast::<PySampleRef>().map_err(|_| {
            pyo3::exceptions::PyTypeError::new_err(format!(
                "expected a SampleRef or an iterable of SampleRef, got an item of type {}",
                item.get_type().name().map_or_else(|_| "?".to_owned(), |n| n.to_string())
            ))
        })?;
        out.push(r.get().inner.clone());
    }
    Ok(out)
}

pub(crate) fn refs_to_py<'py>(py: Python<'py>, refs: Vec<ferry_core::SampleRef>) -> PyResult<Bound<'py, PyList>> {
    PyList::new(py, refs.into_iter().map(|inner| PySampleRef { inner }))
}

/// A ref channel file (SpecForge's `StreamingRefChannel`, byte-compatible): the producer's half
/// (`publish`, `close`, `mark_failed`, the consumer's counters) and the consumer's half
/// (`poll`, `mark_consumed`, `mark_consumer_done`, ...). One instance per process per role:
/// `published` and `consumed` count what this instance did.
#[pyclass(frozen, module = "ferry", name = "RefChannel")]
pub(crate) struct RefChannel {
    inner: Arc<FileRefChannel>,
}

#[pymethods]
impl RefChannel {
    /// The channel at `path` (`<control_dir>/refs.jsonl`); a missing file reads as empty and the
    /// first publish creates it.
    #[new]
    fn new(path: PathBuf) -> Self {
        RefChannel { inner: Arc::new(FileRefChannel::open(path)) }
    }

    /// Rank `rank`'s inbox in `inbox_dir` (`inbox-rank<rank>.jsonl`, written by the ref
    /// distributor; its failure reads as "ref-distributor died").
    #[staticmethod]
    fn inbox(inbox_dir: PathBuf, rank: usize) -> Self {
        RefChannel { inner: Arc::new(FileRefChannel::inbox(&inbox_dir, rank)) }
    }

    /// The channel file.
    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.path().to_path_buf()
    }

    /// Appends a ref, or a sequence of refs in one write and one fsync.
    fn publish(&self, py: Python<'_>, refs: &Bound<'_, PyAny>) -> PyResult<()> {
        let single = refs.is_instance_of::<PySampleRef>();
        let refs = refs_from_py(refs)?;
        let ch = &self.inner;
        py.detach(|| if single { ch.publish(&refs[0]) } else { ch.publish_batch(&refs) }).py_err(py)
    }

    /// Appends records that are already compact JSON refs (one per item, no newline).
    fn publish_lines(&self, py: Python<'_>, lines: Vec<String>) -> PyResult<()> {
        let ch = &self.inner;
        py.detach(|| ch.publish_lines(&lines.iter().map(String::as_str).collect::<Vec<_>>())).py_err(py)
    }

    /// Refs this instance published.
    #[getter]
    fn published(&self) -> u64 {
        self.inner.published()
    }

    /// Signals a clean end of stream (`<path>.closed`).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let ch = &self.inner;
        py.detach(|| RefSink::close(ch.as_ref())).py_err(py)
    }

    /// Signals that the producer failed (`<path>.failed`; empty: "producer failed").
    #[pyo3(signature = (reason = ""))]
    fn mark_failed(&self, py: Python<'_>, reason: &str) -> PyResult<()> {
        let ch = &self.inner;
        py.detach(|| RefSink::fail(ch.as_ref(), reason)).py_err(py)
    }

    /// Up to `max` new refs (all for `None`), without blocking; a torn trailing record is never
    /// returned. Each instance reads the file once, from the start.
    #[pyo3(signature = (max = None))]
    fn poll<'py>(&self, py: Python<'py>, max: Option<usize>) -> PyResult<Bound<'py, PyList>> {
        let ch = &self.inner;
        let refs = py.detach(|| ch.poll(max)).py_err(py)?;
        refs_to_py(py, refs)
    }

    /// Up to `max` new records as `(sample_id, line)`: the compact JSON line as written, read
    /// only as far as the id (the distributor's path; no ref is built).
    #[pyo3(signature = (max = None))]
    fn poll_records(&self, py: Python<'_>, max: Option<usize>) -> PyResult<Vec<(String, String)>> {
        let ch = &self.inner;
        let records = py.detach(|| ch.poll_records(max)).py_err(py)?;
        Ok(records.into_iter().map(|r| (r.sample_id.as_str().to_owned(), r.line.into_string())).collect())
    }

    /// Whether the writer closed the stream (an inbox whose distributor failed raises that
    /// failure instead).
    fn is_closed(&self, py: Python<'_>) -> PyResult<bool> {
        let ch = &self.inner;
        py.detach(|| ch.is_closed()).py_err(py)
    }

    /// The writer's failure text (`<path>.failed`), if any.
    fn failure(&self, py: Python<'_>) -> PyResult<Option<String>> {
        let ch = &self.inner;
        py.detach(|| ch.failure()).py_err(py)
    }

    /// Adds `n` to this instance's consumed count and writes the new absolute value.
    fn mark_consumed(&self, py: Python<'_>, n: u64) -> PyResult<()> {
        let ch = &self.inner;
        py.detach(|| ch.mark_consumed(n)).py_err(py)
    }

    /// Sets this instance's consumed count from `<path>.consumed_count`; returns it.
    fn seed_consumed(&self, py: Python<'_>) -> PyResult<u64> {
        let ch = &self.inner;
        py.detach(|| ch.seed_consumed()).py_err(py)
    }

    /// This instance's consumed count (the reader's side).
    #[getter]
    fn consumed(&self) -> u64 {
        RefSource::consumed(self.inner.as_ref())
    }

    /// The consumed counter as the consumer last wrote it (the producer's side; 0 if absent).
    fn consumed_remote(&self, py: Python<'_>) -> PyResult<u64> {
        let ch = &self.inner;
        py.detach(|| ch.consumed_remote()).py_err(py)
    }

    /// Published by this instance minus `consumed_remote()`: the backpressure signal.
    fn in_flight_remote(&self, py: Python<'_>) -> PyResult<i64> {
        let ch = &self.inner;
        py.detach(|| ch.in_flight_remote()).py_err(py)
    }

    /// Signals that the consumer finished (`<path>.consumer_done`).
    fn mark_consumer_done(&self, py: Python<'_>) -> PyResult<()> {
        let ch = &self.inner;
        py.detach(|| ch.mark_consumer_done()).py_err(py)
    }

    /// Signals that the consumer failed (`<path>.consumer_failed`; empty: "consumer failed").
    #[pyo3(signature = (reason = ""))]
    fn mark_consumer_failed(&self, py: Python<'_>, reason: &str) -> PyResult<()> {
        let ch = &self.inner;
        py.detach(|| ch.mark_consumer_failed(reason)).py_err(py)
    }

    /// The consumer's failure text, if it failed.
    fn consumer_failure(&self, py: Python<'_>) -> PyResult<Option<String>> {
        let ch = &self.inner;
        py.detach(|| ch.consumer_failure()).py_err(py)
    }

    /// Whether the consumer finished or failed.
    fn consumer_stopped(&self, py: Python<'_>) -> PyResult<bool> {
        let ch = &self.inner;
        py.detach(|| ch.consumer_stopped()).py_err(py)
    }

    /// The dispatch quantum the consumer published (`<path>.consumer_quantum`), if any.
    fn consumer_quantum(&self, py: Python<'_>) -> PyResult<Option<u64>> {
        let ch = &self.inner;
        py.detach(|| ch.consumer_quantum()).py_err(py)
    }

    /// Publishes the consumer's dispatch quantum once per attempt; with `allow_existing` (a
    /// resume) an equal existing value is accepted.
    #[pyo3(signature = (quantum, allow_existing = false))]
    fn publish_consumer_quantum(&self, py: Python<'_>, quantum: u64, allow_existing: bool) -> PyResult<()> {
        let ch = &self.inner;
        py.detach(|| ch.publish_consumer_quantum(quantum, allow_existing)).py_err(py)
    }

    /// The sidecars at a glance: `{"closed", "failed", "consumed_count", "consumer_done",
    /// "consumer_failed", "consumer_quantum"}` (`failed` / `consumer_failed` are the texts or
    /// `None`).
    fn state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let path = self.inner.path().to_path_buf();
        let (closed, failed, consumed, done, consumer_failed, quantum) = py
            .detach(|| -> Result<_> {
                Ok((
                    sidecar::exists(&path, sidecar::CLOSED),
                    sidecar::read_failure(&path, sidecar::FAILED)?,
                    sidecar::read_counter(&path)?,
                    sidecar::exists(&path, sidecar::CONSUMER_DONE),
                    sidecar::read_failure(&path, sidecar::CONSUMER_FAILED)?,
                    sidecar::read_quantum(&path)?,
                ))
            })
            .py_err(py)?;
        let d = PyDict::new(py);
        d.set_item("closed", closed)?;
        d.set_item("failed", failed)?;
        d.set_item("consumed_count", consumed)?;
        d.set_item("consumer_done", done)?;
        d.set_item("consumer_failed", consumer_failed)?;
        d.set_item("consumer_quantum", quantum)?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!("RefChannel({:?})", self.inner.path().display().to_string())
    }
}

/// One rank of a data-parallel group of processes joined through rank 0's socket (ferry's
/// `SocketGroup`): the collective an `OnlineRank` needs, without torch.
#[pyclass(frozen, module = "ferry", name = "SocketCollective")]
pub(crate) struct SocketCollective {
    pub(crate) inner: Arc<SocketGroup>,
}

#[pymethods]
impl SocketCollective {
    /// Forms the group: rank 0 listens at `address` (`unix:///path` or `tcp://host:port`) and
    /// waits for the other ranks; the others connect. Every rank names the same `group` and
    /// `world_size`. `timeout_s` bounds the rendezvous and every later round (a blocked round
    /// is not interruptible by Ctrl-C before it).
    #[new]
    #[pyo3(signature = (address, rank, world_size, timeout_s = 300.0, *, group = "ferry"))]
    fn new(
        py: Python<'_>,
        address: &str,
        rank: usize,
        world_size: usize,
        timeout_s: f64,
        group: &str,
    ) -> PyResult<Self> {
        let address = GroupAddress::parse(address).py_err(py)?;
        let timeout = seconds(py, "timeout_s", timeout_s)?;
        let group = py.detach(|| SocketGroup::rendezvous(&address, group, rank, world_size, timeout)).py_err(py)?;
        Ok(SocketCollective { inner: Arc::new(group) })
    }

    /// This process's rank.
    #[getter]
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    /// How many ranks there are.
    #[getter]
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }

    /// Contributes `part` and returns every rank's part, in rank order.
    fn all_gather<'py>(&self, py: Python<'py>, part: Vec<u8>) -> PyResult<Vec<Bound<'py, PyBytes>>> {
        let g = &self.inner;
        let parts = py.detach(|| g.all_gather(part)).py_err(py)?;
        Ok(parts.iter().map(|p| PyBytes::new(py, p)).collect())
    }

    /// Rank 0's `part`, on every rank.
    fn broadcast_from_rank0<'py>(&self, py: Python<'py>, part: Vec<u8>) -> PyResult<Bound<'py, PyBytes>> {
        let g = &self.inner;
        let out = py.detach(|| g.broadcast_from_rank0(part)).py_err(py)?;
        Ok(PyBytes::new(py, &out))
    }

    /// Leaves the group after a failure: every peer's current and later rounds fail at once.
    fn abandon(&self) {
        self.inner.abandon();
    }

    fn __repr__(&self) -> String {
        format!("SocketCollective(rank={}, world_size={})", self.inner.rank(), self.inner.world_size())
    }
}

/// A collective implemented in Python: an object with `rank`, `world_size` and
/// `all_gather(bytes) -> list[bytes]` (and optionally `abandon()`). The GIL is taken only for
/// those calls.
struct PyCollective {
    obj: Py<PyAny>,
    rank: usize,
    world: usize,
}

/// A Python exception raised by a collective as ferry's error: a `ConnectionError` is a lost
/// peer ([`Error::PeerLost`], which a consumer treats as a crash), anything else a collective
/// failure.
fn collective_error(py: Python<'_>, e: &PyErr) -> Error {
    let name = e.get_type(py).name().map_or_else(|_| "Exception".to_owned(), |n| n.to_string());
    let text = format!("{name}: {}", e.value(py));
    if e.is_instance_of::<PyConnectionError>(py) {
        Error::PeerLost { context: "Python collective all_gather".into(), message: text }
    } else if e.is_instance_of::<PyTimeoutError>(py) {
        Error::Collective { message: format!("the Python collective's all_gather timed out: {text}") }
    } else {
        Error::Collective { message: format!("the Python collective's all_gather raised {text}") }
    }
}

impl Collective for PyCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_gather(&self, part: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        Python::attach(|py| {
            let out = self
                .obj
                .bind(py)
                .call_method1("all_gather", (PyBytes::new(py, &part),))
                .map_err(|e| collective_error(py, &e))?;
            let parts: Vec<Vec<u8>> = out
                .try_iter()
                .and_then(|items| items.map(|item| item?.extract::<Vec<u8>>()).collect::<PyResult<Vec<_>>>())
                .map_err(|e| Error::Collective {
                    message: format!("the Python collective's all_gather must return a list of bytes: {e}"),
                })?;
            if parts.len() != self.world {
                return Err(Error::Collective {
                    message: format!(
                        "the Python collective's all_gather returned {} parts for a world of {}",
                        parts.len(),
                        self.world
                    ),
                });
            }
            Ok(parts)
        })
    }

    fn abandon(&self) {
        Python::attach(|py| {
            let obj = self.obj.bind(py);
            if obj.hasattr("abandon").unwrap_or(false)
                && let Err(e) = obj.call_method0("abandon")
            {
                tracing::warn!(error = %e, "the Python collective's abandon() failed");
            }
        });
    }
}

/// The collective behind a Python object: a `SocketCollective` as it is, anything else through
/// its `rank`, `world_size` and `all_gather`.
pub(crate) fn collective_from_py(obj: &Bound<'_, PyAny>) -> PyResult<Arc<dyn Collective>> {
    if let Ok(native) = obj.cast::<SocketCollective>() {
        return Ok(Arc::clone(&native.get().inner) as Arc<dyn Collective>);
    }
    if !obj.hasattr("all_gather")? {
        return Err(pyo3::exceptions::PyTypeError::new_err(
            "a collective needs rank, world_size and all_gather(bytes) -> list[bytes] (ferry.SocketCollective, \
             ferry.TorchCollective, or your own)",
        ));
    }
    let rank: usize = obj.getattr("rank")?.extract()?;
    let world: usize = obj.getattr("world_size")?.extract()?;
    if world == 0 || rank >= world {
        return Err(invalid(obj.py(), format!("collective rank {rank} of world {world}")));
    }
    Ok(Arc::new(PyCollective { obj: obj.clone().unbind(), rank, world }))
}

/// `"<Type>: <message>"` for a Python exception (SpecForge's failure text): a ferry error keeps
/// the exception name SpecForge raises for it.
pub(crate) fn exception_reason(py: Python<'_>, exc: &Bound<'_, PyAny>) -> String {
    let name = exc
        .getattr("python_exception")
        .ok()
        .and_then(|n| n.extract::<String>().ok())
        .or_else(|| exc.get_type().name().ok().map(|n| n.to_string()))
        .unwrap_or_else(|| "Exception".to_owned());
    let message = exc.str().map_or_else(|_| String::new(), |s| s.to_string());
    let _ = py;
    format!("{name}: {message}")
}
