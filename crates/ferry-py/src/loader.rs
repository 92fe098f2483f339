//! `ferry.FeatureLoader`, its passes and batches, and the offline helpers (`offline_refs`,
//! `read_manifest`, `write_manifest`): `ferry_loader::FeatureLoader` from Python.
//!
//! A `FeatureLoader` wraps one Rust loader over a fixed ref list (refs mode: offline data, DP
//! sharding equal to torch's `DistributedSampler`, `seek`, epochs). Iterating it starts a pass
//! (a `Batches` iterator); each `next` materializes one batch with the GIL released (inline, or
//! on the loader's worker threads when `num_workers > 0`), then hands every collated tensor to
//! numpy without a copy: each array's base is a ferry `_OwnedBuffer` over the batch buffer the
//! loader filled (`arrays::to_numpy`), so the arrays own their memory and outlive the loader,
//! the pass and the store.
//!
//! Queue mode (`FeatureLoader(store, queue=q)`, `RefSource::Queue`) reads a
//! `ferry.SampleRefQueue` (`crate::ref_queue`) through the loader's own `LoaderQueue`; the pass
//! follows `ferry_loader`'s queue-mode rules (acks, failed refs, the incomplete tail, the one
//! live pass). A queue pass's `next` runs on a helper thread while the calling thread, with the
//! GIL released, checks for signals: Ctrl-C ends the pass's wait for refs (nothing leased is
//! lost) and raises `KeyboardInterrupt`.

use crate::arrays::{self, Bf16Mode, TraceEntries};
use crate::control::SIGNAL_CHECK;
use crate::errors::{IntoPyResult, invalid};
use crate::pyjson;
use crate::records::PySampleRef;
use crate::ref_queue::{LoaderQueue, PySampleRefQueue};
use crate::store::{Store, TensorMapping, tensors_to_numpy};
use ferry_core::{JsonMap, SampleRef, TrainBatch};
use ferry_loader::strategies::StrategyRegistry;
use ferry_loader::{Batches, DpSharding, FeatureLoader, RefSource};
use ferry_store::offline::OfflineRefOptions;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyList, PyTuple};
use std::path::PathBuf;
use std::sync::mpsc::{RecvTimeoutError, channel};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

/// `(name, address, nbytes)` of each tensor of the last batch handed to Python.
static LAST_BATCH: Mutex<TraceEntries> = Mutex::new(Vec::new());

/// Debugging aid for tests: `(name, address, nbytes)` of the batch buffers the last batch
/// handed to numpy (its arrays' data pointers are these addresses when no copy was made).
#[pyfunction]
#[pyo3(name = "_debug_last_batch")]
pub(crate) fn debug_last_batch() -> TraceEntries {
    LAST_BATCH.lock().map(|t| t.clone()).unwrap_or_default()
}

/// Runs `f` on the value behind `m` (`what`, for the message) with the GIL released (the lock
/// is taken there too: `py.detach` must not return a guard); a poisoned lock raises.
fn detached<T: Send, R: Send>(
    py: Python<'_>,
    m: &Mutex<T>,
    what: &str,
    f: impl FnOnce(&mut T) -> R + Send,
) -> PyResult<R> {
    let done = py.detach(|| m.lock().ok().map(|mut guard| f(&mut guard)));
    done.ok_or_else(|| poisoned(py, what))
}

fn poisoned(py: Python<'_>, what: &str) -> PyErr {
    invalid(py, format!("{what} lock poisoned"))
}

fn lock<'a, T>(py: Python<'_>, m: &'a Mutex<T>, what: &str) -> PyResult<MutexGuard<'a, T>> {
    m.lock().map_err(|_| poisoned(py, what))
}

/// The refs of `refs`: an iterable of `SampleRef`.
fn extract_refs(refs: &Bound<'_, PyAny>) -> PyResult<Vec<SampleRef>> {
    let mut out = Vec::new();
    for item in refs.try_iter()? {
        let item = item?;
        let r = item.cast::<PySampleRef>().map_err(|_| {
            pyo3::exceptions::PyTypeError::new_err(format!(
                "refs must be SampleRef objects, not {}",
                arrays::describe(&item)
            ))
        })?;
        out.push(r.get().inner.clone());
    }
    Ok(out)
}

/// A Python `Batch` from a collated batch: its tensors as numpy arrays over ferry's buffers
/// (no copy). Also for other modules that hand `TrainBatch`es to Python.
pub(crate) fn to_py_batch(py: Python<'_>, batch: TrainBatch, bf16: Bf16Mode) -> PyResult<Py<Batch>> {
    let dtypes = batch.tensors.iter().map(|(name, t)| (name.clone(), t.dtype().name().to_owned())).collect();
    let (tensors, trace) = tensors_to_numpy(py, batch.tensors, bf16)?;
    if let Ok(mut last) = LAST_BATCH.lock() {
        *last = trace;
    }
    let batch = Batch {
        sample_ids: batch.sample_ids.iter().map(|s| s.as_str().to_owned()).collect(),
        strategy: batch.strategy,
        metadata: batch.metadata,
        dtypes,
    };
    Py::new(py, PyClassInitializer::from(TensorMapping::over(tensors)).add_subclass(batch))
}

/// A context manager whose exit calls the object's `close()`: the base class (Python's
/// `ferry._Closing`) of the loader's classes that hold something to close.
#[pyclass(subclass, frozen, module = "ferry", name = "_Closing")]
pub(crate) struct Closing;

#[pymethods]
impl Closing {
    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    /// Calls `close()`; an exception leaving the block is never suppressed.
    #[pyo3(signature = (*_exc))]
    fn __exit__(slf: &Bound<'_, Self>, _exc: &Bound<'_, PyTuple>) -> PyResult<bool> {
        slf.call_method0("close")?;
        Ok(false)
    }
}

/// The feature loader: refs and a store in, collated batches out (SpecForge's
/// `FeatureDataLoader`, refs mode and queue mode).
///
/// `FeatureLoader(store, refs=None, queue=None, *, batch_size=1, drop_last=True,
/// strategy="eagle3", num_workers=0, dp=None, rank=None, seed=0, shuffle=True,
/// dp_drop_last=False, max_len=None, prefetch_depth=None, defer_ack=False)`, with exactly one
/// of `refs` and `queue`.
///
/// Queue mode (`queue`, a `ferry.SampleRefQueue`; online, consume-once): `iter(loader)` leases
/// `batch_size` refs at a time as they arrive and yields batches until the queue is closed and
/// drained; a short tail is yielded (`drop_last=False`) or failed and freed from the store.
/// A batch is acked when the consumer comes back for the next one (or the pass is closed);
/// with `defer_ack=True` the caller acks (`queue.ack(batch)`). `prefetch_depth` batches
/// (default `num_workers`) are materialized ahead on a Rust thread. One live pass at a time;
/// `close()` ends it and fails the refs it leased but never yielded. `dp`/`rank` are refused
/// (the distributor shards a stream), as are `seek` and `len()`.
///
/// Refs mode:
/// `refs` is a list of `SampleRef`s (a manifest's, or `ferry.offline_refs(dump)`), read from
/// `store` (a `ferry.Store`; offline `file://` refs are read in place by any store in this
/// process). Every `iter(loader)` is one pass over them in batches of `batch_size`, a short
/// tail dropped when `drop_last`. `dp`/`rank` shard the refs across data-parallel ranks exactly
/// as `torch.utils.data.DistributedSampler(num_replicas=dp, rank=rank, shuffle=shuffle,
/// seed=seed, drop_last=dp_drop_last)` does, reshuffled per `set_epoch`. `num_workers > 0`
/// materializes that many batches ahead on Rust threads. `max_len` cuts offline samples (default:
/// each ref's `metadata.max_len`). `len(loader)` is the batches of one full pass.
#[pyclass(extends = Closing, frozen, module = "ferry", name = "FeatureLoader")]
pub(crate) struct PyFeatureLoader {
    inner: Mutex<FeatureLoader>,
    bf16: Bf16Mode,
    batch_size: usize,
    drop_last: bool,
    num_workers: usize,
    sharding: Option<DpSharding>,
    /// Queue mode: the Python queue and this loader's view of it.
    queue: Option<(Py<PySampleRefQueue>, Arc<LoaderQueue>)>,
    prefetch_depth: usize,
    defer_ack: bool,
}

/// A seed as `torch.Generator.manual_seed` takes it: any integer in `[-2**63, 2**64)` (the
/// sampler wraps a negative `seed + epoch` modulo 2**64, as torch's `DistributedSampler` does).
fn torch_seed(py: Python<'_>, seed: i128) -> PyResult<i128> {
    if seed < i128::from(i64::MIN) || seed > i128::from(u64::MAX) {
        return Err(invalid(
            py,
            format!("seed {seed} is outside [-2**63, 2**64), the range torch's manual_seed takes"),
        ));
    }
    Ok(seed)
}

#[pymethods]
impl PyFeatureLoader {
    #[new]
    #[pyo3(signature = (
        store, refs = None, queue = None, *, batch_size = 1, drop_last = true, strategy = "eagle3",
        num_workers = 0, dp = None, rank = None, seed = 0, shuffle = true, dp_drop_last = false,
        max_len = None, prefetch_depth = None, defer_ack = false
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        store: &Bound<'_, Store>,
        refs: Option<&Bound<'_, PyAny>>,
        queue: Option<&Bound<'_, PyAny>>,
        batch_size: usize,
        drop_last: bool,
        strategy: &str,
        num_workers: usize,
        dp: Option<usize>,
        rank: Option<usize>,
        seed: i128,
        shuffle: bool,
        dp_drop_last: bool,
        max_len: Option<u64>,
        prefetch_depth: Option<usize>,
        defer_ack: bool,
    ) -> PyResult<PyClassInitializer<Self>> {
        let (source, queue) = match (refs.filter(|r| !r.is_none()), queue.filter(|q| !q.is_none())) {
            (Some(refs), None) => {
                if prefetch_depth.is_some() || defer_ack {
                    return Err(invalid(py, "prefetch_depth and defer_ack apply to a queue loader (queue=...)"));
                }
                (RefSource::Fixed(extract_refs(refs)?), None)
            }
            (None, Some(queue)) => {
                let queue = queue.cast::<PySampleRefQueue>().map_err(|_| {
                    pyo3::exceptions::PyTypeError::new_err(format!(
                        "queue must be a ferry.SampleRefQueue, not {}",
                        arrays::describe(queue)
                    ))
                })?;
                let view = Arc::new(LoaderQueue::new(Arc::clone(&queue.get().inner)));
                (RefSource::Queue(view.clone()), Some((queue.clone().unbind(), view)))
            }
            _ => {
                return Err(invalid(
                    py,
                    "FeatureLoader takes exactly one of refs (a fixed ref list) and queue (a ferry.SampleRefQueue)",
                ));
            }
        };
        let seed = torch_seed(py, seed)?;
        let sharding = match (dp, rank) {
            (None, None) => None,
            (Some(dp), Some(rank)) => Some(DpSharding { dp, rank, seed, shuffle, drop_last: dp_drop_last }),
            (Some(_), None) => return Err(invalid(py, "dp needs rank (this process's data-parallel rank)")),
            (None, Some(_)) => return Err(invalid(py, "rank needs dp (the number of data-parallel ranks)")),
        };
        let store = store.get();
        let api = store.api(py)?;
        let mut builder = FeatureLoader::builder(api, source)
            .batch_size(batch_size)
            .drop_last(drop_last)
            .strategy(strategy)
            .num_workers(num_workers)
            .defer_ack_until_durable(defer_ack);
        if let Some(depth) = prefetch_depth {
            builder = builder.prefetch_depth(depth);
        }
        if let Some(sharding) = sharding {
            builder = builder.dp_sharding(sharding);
        }
        if let Some(max_len) = max_len {
            builder = builder.max_len(max_len);
        }
        let loader = builder.build().py_err(py)?;
        let loader = PyFeatureLoader {
            inner: Mutex::new(loader),
            bf16: store.bf16_mode(),
            batch_size,
            drop_last,
            num_workers,
            sharding,
            queue,
            prefetch_depth: prefetch_depth.unwrap_or(num_workers),
            defer_ack,
        };
        Ok(PyClassInitializer::from(Closing).add_subclass(loader))
    }

    /// Starts a pass (consuming a pending `seek`): a `Batches` iterator of `Batch`es. Queue
    /// mode: one live pass at a time (another raises `ProtocolError` at its first `next`).
    fn __iter__(&self, py: Python<'_>) -> PyResult<Py<PyBatches>> {
        let batches = detached(py, &self.inner, "loader", FeatureLoader::iter)?;
        let pass = PyBatches {
            pass: Mutex::new(Some(batches)),
            bf16: self.bf16,
            queue: self.queue.as_ref().map(|(_, view)| Arc::clone(view)),
            interrupted: Mutex::new(None),
        };
        Py::new(py, PyClassInitializer::from(Closing).add_subclass(pass))
    }

    /// Batches one full pass yields (this rank's share with `dp`); a `TypeError` in queue
    /// mode, whose length is not known.
    fn __len__(&self, py: Python<'_>) -> PyResult<usize> {
        if self.queue.is_some() {
            return Err(pyo3::exceptions::PyTypeError::new_err(
                "a queue FeatureLoader has no len(): the stream's length is not known",
            ));
        }
        Ok(lock(py, &self.inner, "loader")?.batches_per_pass())
    }

    /// The `SampleRefQueue` (queue mode), else `None`.
    #[getter]
    fn queue(&self, py: Python<'_>) -> Option<Py<PySampleRefQueue>> {
        self.queue.as_ref().map(|(q, _)| q.clone_ref(py))
    }

    /// Queue mode: batches materialized ahead on the prefetch thread (0: on the iterating
    /// thread).
    #[getter]
    fn prefetch_depth(&self) -> usize {
        self.prefetch_depth
    }

    /// Queue mode: whether the caller acks (`queue.ack(batch)`) instead of the loader.
    #[getter]
    fn defer_ack(&self) -> bool {
        self.defer_ack
    }

    /// Refs one full pass reads (this rank's share with `dp`, padding included).
    #[getter]
    fn refs_per_pass(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(lock(py, &self.inner, "loader")?.refs_per_pass())
    }

    /// Skips the first `batches` batches of the next pass only (resume mid-epoch); skipped refs
    /// are never read. Skipping exactly a whole pass is allowed; more is an
    /// `InvalidArgumentError`.
    fn seek(&self, py: Python<'_>, batches: usize) -> PyResult<()> {
        lock(py, &self.inner, "loader")?.seek(batches).py_err(py)
    }

    /// Sets the epoch: with `dp`, the next pass reads that epoch's shard (the permutation is
    /// seeded with `seed + epoch`, as `DistributedSampler.set_epoch`); without, it is only kept.
    fn set_epoch(&self, py: Python<'_>, epoch: u64) -> PyResult<()> {
        lock(py, &self.inner, "loader")?.set_epoch(epoch);
        Ok(())
    }

    /// The epoch (0 until `set_epoch`).
    #[getter]
    fn epoch(&self, py: Python<'_>) -> PyResult<u64> {
        Ok(lock(py, &self.inner, "loader")?.epoch())
    }

    /// The strategy name (`eagle3`, `dflash`, `domino`).
    #[getter]
    fn strategy(&self, py: Python<'_>) -> PyResult<&'static str> {
        Ok(lock(py, &self.inner, "loader")?.strategy().name)
    }

    /// Samples per batch.
    #[getter]
    fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Whether a short final batch is dropped.
    #[getter]
    fn drop_last(&self) -> bool {
        self.drop_last
    }

    /// Worker threads (also the prefetch window, in batches); 0 reads on the iterating thread.
    #[getter]
    fn num_workers(&self) -> usize {
        self.num_workers
    }

    /// Data-parallel ranks, or `None` without sharding.
    #[getter]
    fn dp(&self) -> Option<usize> {
        self.sharding.map(|s| s.dp)
    }

    /// This rank, or `None` without sharding.
    #[getter]
    fn rank(&self) -> Option<usize> {
        self.sharding.map(|s| s.rank)
    }

    /// Materializes `refs` as one batch now, on this thread (GIL released), exactly as a pass
    /// would, whatever the loader's own refs.
    fn load_batch(&self, py: Python<'_>, refs: &Bound<'_, PyAny>) -> PyResult<Py<Batch>> {
        let refs = extract_refs(refs)?;
        let batch = detached(py, &self.inner, "loader", |l| l.load_batch(&refs))?.py_err(py)?;
        to_py_batch(py, batch, self.bf16)
    }

    /// Closes the loader. Queue mode: the live pass ends (a pass waiting for refs at once;
    /// the batch the consumer holds is acked when its `Batches` is closed or collected), the
    /// refs it leased but never yielded are failed (retryably unless their bytes were read
    /// from a consume-once store), and later passes yield nothing; `TimeoutError` if the
    /// prefetch thread is still inside a store read (close again later). Refs mode holds
    /// nothing between passes, so this does nothing and the loader stays usable (passes are
    /// closed by `Batches.close()` or when collected). Idempotent.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        if let Some((_, view)) = &self.queue {
            view.close();
        }
        detached(py, &self.inner, "loader", |l| l.close())?.py_err(py)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let l = lock(py, &self.inner, "loader")?;
        if let Some((queue, _)) = &self.queue {
            return Ok(format!(
                "FeatureLoader(strategy={:?}, queue={}, batch_size={}, drop_last={}, prefetch_depth={}, defer_ack={})",
                l.strategy().name,
                queue.get().__repr__(),
                self.batch_size,
                if self.drop_last { "True" } else { "False" },
                self.prefetch_depth,
                if self.defer_ack { "True" } else { "False" },
            ));
        }
        let dp = self.sharding.map_or_else(String::new, |s| format!(", dp={}, rank={}, seed={}", s.dp, s.rank, s.seed));
        Ok(format!(
            "FeatureLoader(strategy={:?}, refs_per_pass={}, batch_size={}, drop_last={}, num_workers={}{dp}, epoch={})",
            l.strategy().name,
            l.refs_per_pass(),
            self.batch_size,
            if self.drop_last { "True" } else { "False" },
            self.num_workers,
            l.epoch()
        ))
    }
}

/// One pass over a `FeatureLoader`: an iterator of `Batch`es, in order, ending at the first
/// error (raised). `close()` stops its workers; collecting it does the same.
#[pyclass(extends = Closing, frozen, module = "ferry", name = "Batches")]
pub(crate) struct PyBatches {
    /// `None` once closed.
    pass: Mutex<Option<Batches>>,
    bf16: Bf16Mode,
    /// Queue mode: the loader's view of its queue (to end the pass's waits).
    queue: Option<Arc<LoaderQueue>>,
    /// A Ctrl-C caught while a batch was being yielded anyway: raised by the next `next`.
    interrupted: Mutex<Option<PyErr>>,
}

impl PyBatches {
    /// Queue mode's `next`: the pass's `next` on a helper thread while this thread, GIL
    /// released, checks for signals every [`SIGNAL_CHECK`]. On a signal the queue's waits end
    /// (the pass ends, leasing nothing more) and the signal's exception is raised; if a batch
    /// came anyway, it is returned and the exception kept for the next call.
    fn next_interruptible(&self, py: Python<'_>, queue: &LoaderQueue) -> PyResult<Option<Py<Batch>>> {
        if let Some(e) = lock(py, &self.interrupted, "pass")?.take() {
            return Err(e);
        }
        let pass = &self.pass;
        let (tx, rx) = channel();
        let outcome = py.detach(move || {
            std::thread::scope(|scope| {
                scope.spawn(move || {
                    let item = pass.lock().ok().map(|mut p| p.as_mut().and_then(Iterator::next));
                    let _ = tx.send(item);
                });
                let mut interrupt = None;
                loop {
                    match rx.recv_timeout(SIGNAL_CHECK) {
                        Ok(item) => return Some((item, interrupt.map(|(e, _guard)| e))),
                        Err(RecvTimeoutError::Timeout) if interrupt.is_none() => {
                            if let Err(e) = Python::attach(|py| py.check_signals()) {
                                interrupt = Some((e, queue.interrupt()));
                            }
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                        // The helper panicked (the scope re-raises the panic on exit).
                        Err(RecvTimeoutError::Disconnected) => return None,
                    }
                }
            })
        });
        let Some((item, interrupt)) = outcome else { unreachable!("std::thread::scope propagates the helper's panic") };
        let item = item.ok_or_else(|| poisoned(py, "pass"))?;
        match (item, interrupt) {
            (Some(batch), Some(e)) => match batch {
                Ok(batch) => {
                    *lock(py, &self.interrupted, "pass")? = Some(e);
                    to_py_batch(py, batch, self.bf16).map(Some)
                }
                Err(_) => Err(e),
            },
            (None, Some(e)) => Err(e),
            (None, None) => Ok(None),
            (Some(batch), None) => to_py_batch(py, batch.py_err(py)?, self.bf16).map(Some),
        }
    }
}

#[pymethods]
impl PyBatches {
    fn __iter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Py<Batch>>> {
        if let Some(queue) = &self.queue {
            return self.next_interruptible(py, queue);
        }
        match detached(py, &self.pass, "pass", |p| p.as_mut().and_then(Iterator::next))? {
            None => Ok(None),
            Some(batch) => to_py_batch(py, batch.py_err(py)?, self.bf16).map(Some),
        }
    }

    /// Batches this pass has still to yield (if none fails); in queue mode, the batches
    /// already prefetched (a lower bound).
    #[getter]
    fn remaining(&self, py: Python<'_>) -> PyResult<usize> {
        detached(py, &self.pass, "pass", |p| p.as_ref().map_or(0, Batches::remaining))
    }

    fn __length_hint__(&self, py: Python<'_>) -> PyResult<usize> {
        self.remaining(py)
    }

    /// Ends the pass now: stops its workers, waiting up to 5 s (`TimeoutError` if one is still
    /// inside a store read; calling again later completes the close). Idempotent. Queue
    /// mode: a `next` waiting for refs in another thread ends; the batch the consumer took
    /// last is acked (unless `defer_ack`), and refs leased but never yielded are failed.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let closed = py.detach(|| {
            let mut p = match self.pass.try_lock() {
                Ok(p) => p,
                // A `next` holds the pass (in queue mode, maybe waiting for refs): end its wait
                // until the pass is ours. Only this pass's own `next` is interrupted.
                Err(TryLockError::WouldBlock) => {
                    let _interrupt = self.queue.as_ref().map(|q| q.interrupt());
                    self.pass.lock().ok()?
                }
                Err(TryLockError::Poisoned(_)) => return None,
            };
            Some(match p.as_mut() {
                Some(pass) => pass.close().map(|()| *p = None),
                None => Ok(()),
            })
        });
        closed.ok_or_else(|| poisoned(py, "pass"))?.py_err(py)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        detached(py, &self.pass, "pass", |p| match p.as_ref() {
            Some(pass) => format!("Batches(remaining={})", pass.remaining()),
            None => "Batches(closed)".to_owned(),
        })
    }
}

impl Drop for PyBatches {
    fn drop(&mut self) {
        // Dropping a pass joins its workers (up to the join timeout): not while holding the GIL.
        if let Some(pass) = self.pass.get_mut().ok().and_then(Option::take) {
            Python::attach(|py| py.detach(move || drop(pass)));
        }
    }
}

/// One collated batch: `sample_ids`, `tensors` (name -> numpy array over ferry's batch buffer,
/// no copy; the arrays own their memory), `metadata` (`target_repr`, `ttt_length`, ...),
/// `strategy`. Also a read-only mapping of tensor name -> array, and `to_torch()`.
#[pyclass(extends = TensorMapping, frozen, mapping, module = "ferry", name = "Batch")]
pub(crate) struct Batch {
    sample_ids: Vec<String>,
    strategy: String,
    metadata: JsonMap,
    /// ferry dtype name of each tensor (bfloat16 arrays may be `uint16` bits).
    dtypes: Vec<(String, String)>,
}

impl Batch {
    /// The sample ids, in row order.
    pub(crate) fn ids(&self) -> &[String] {
        &self.sample_ids
    }
}

#[pymethods]
impl Batch {
    /// The samples, in row order.
    #[getter]
    fn sample_ids<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, &self.sample_ids)
    }

    /// Rows in the batch.
    #[getter]
    fn batch_size(&self) -> usize {
        self.sample_ids.len()
    }

    /// The strategy the batch was collated with.
    #[getter]
    fn strategy(&self) -> &str {
        &self.strategy
    }

    /// The batch metadata as a new dict.
    #[getter]
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        pyjson::to_py(py, &self.metadata)
    }

    /// ferry's dtype name of each tensor (`"bfloat16"` where the array holds bfloat16 bits).
    #[getter]
    fn dtypes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (name, dtype) in &self.dtypes {
            d.set_item(name, dtype)?;
        }
        Ok(d)
    }

    /// The tensors as a dict of torch tensors over the same memory (bfloat16 as
    /// `torch.bfloat16`). Needs torch.
    fn to_torch<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        static TO_TORCH: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
        let py = slf.py();
        let tensors = slf.as_super().get().dict(py);
        TO_TORCH.import(py, "ferry._arrays", "_to_torch_dict")?.call1((tensors, slf.get().dtypes(py)?))
    }

    fn __repr__(slf: &Bound<'_, Self>) -> String {
        let shapes: Vec<String> = slf
            .as_super()
            .get()
            .dict(slf.py())
            .iter()
            .map(|(k, v)| {
                let shape = v.getattr("shape").and_then(|s| s.repr()).map_or_else(|_| "?".into(), |s| s.to_string());
                format!("{k}: {shape}")
            })
            .collect();
        format!(
            "Batch(strategy={:?}, sample_ids={:?}, tensors={{{}}})",
            slf.get().strategy,
            slf.get().sample_ids,
            shapes.join(", ")
        )
    }
}

/// One lazy `file://` ref per feature file (`.ckpt`, `.ckpt.gz`, `.safetensors`) under `path`
/// (a file or a directory, searched recursively, in SpecForge's lexicographic order), as
/// SpecForge's `OfflineManifestReader` builds them: sample ids `<run_id>:<index:08>`, the
/// strategy's raw keys (EAGLE3: `input_ids`, `loss_mask`, `hidden_state`, `aux_hidden_state`),
/// `metadata.max_len` and `ttt_length`. `validate=True` opens every file once to fill specs,
/// `num_tokens` and `estimated_bytes` (and fails on a missing key); lazy refs open nothing.
#[pyfunction]
#[pyo3(signature = (path, *, run_id = "offline", strategy = "eagle3", validate = false, max_len = 2048, ttt_length = 7))]
pub(crate) fn offline_refs(
    py: Python<'_>,
    path: PathBuf,
    run_id: &str,
    strategy: &str,
    validate: bool,
    max_len: i64,
    ttt_length: i64,
) -> PyResult<Vec<PySampleRef>> {
    let registry = StrategyRegistry::builtin();
    let keys = registry.get(strategy).py_err(py)?.offline_raw_keys;
    let options = OfflineRefOptions {
        run_id: run_id.to_owned(),
        strategy: strategy.to_owned(),
        feature_keys: keys.iter().map(|k| (*k).to_owned()).collect(),
        ttt_length,
        max_len,
        ..OfflineRefOptions::default()
    };
    let refs = py.detach(|| ferry_store::offline::offline_refs(&path, &options, validate)).py_err(py)?;
    Ok(refs.into_iter().map(|inner| PySampleRef { inner }).collect())
}

/// The refs of an offline ref manifest (SpecForge's `read_ref_manifest`; a newer
/// `schema_version` is a `CorruptError`).
#[pyfunction]
pub(crate) fn read_manifest(py: Python<'_>, path: PathBuf) -> PyResult<Vec<PySampleRef>> {
    let refs = py.detach(|| ferry_control::manifest::read_ref_manifest(&path)).py_err(py)?;
    Ok(refs.into_iter().map(|inner| PySampleRef { inner }).collect())
}

/// Writes an offline ref manifest, SpecForge's bytes (`{"schema_version": 1, "refs": [...]}`),
/// atomically (`<path>.tmp`, then a rename), creating the parent directory.
#[pyfunction]
pub(crate) fn write_manifest(py: Python<'_>, refs: &Bound<'_, PyAny>, path: PathBuf) -> PyResult<()> {
    let refs = extract_refs(refs)?;
    py.detach(|| ferry_control::manifest::write_ref_manifest(&refs, &path)).py_err(py)
}
