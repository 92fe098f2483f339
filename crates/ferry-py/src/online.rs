//! The online consumer from Python: `ConsumerConfig` and `OnlineRank`, one data-parallel rank
//! of a disaggregated online run (SpecForge's `build_disagg_online_consumer` plus the
//! trainer's loop, `SPECFORGE-RUNTIME.md` §14.3-§14.4) over `ferry_control::online`.
//!
//! `OnlineRank(config, collective, store)` agrees on rank 0's setup
//! ([`agree_on_rank0_setup`]), starts the ref distributor on rank 0 and reads the rank's inbox;
//! the trainer iterates optimizer steps (`next_step`, or `for step in rank`), trains, and ends
//! each with `commit_step()` (the durable DP acknowledgement, then the inbox ack). `finish()` /
//! `fail()` run `run_rank_with`'s success and failure lifecycles (drain, `.consumer_done` /
//! `.consumer_failed`; a lost peer publishes nothing terminal); the context manager calls the
//! right one.

use crate::control::{collective_from_py, exception_reason, interruptible, refs_to_py, seconds};
use crate::errors::{IntoPyResult, invalid, to_py};
use crate::store::Store;
use ferry_control::collective::Collective;
use ferry_control::distributor::DistributorThread;
use ferry_control::online::{
    ConsumerConfig, Rank0, RankStream, StepRead, agree_on_rank0_setup, fail_rank, finish_rank,
};
use ferry_control::queue::RefQueue;
use ferry_core::{Error, SampleId};
use ferry_store::FeatureStoreApi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Where an online consumer keeps its state, and its shape (`ferry_control`'s
/// `ConsumerConfig`).
#[pyclass(frozen, module = "ferry", name = "ConsumerConfig")]
pub(crate) struct PyConsumerConfig {
    pub(crate) inner: ConsumerConfig,
}

#[pymethods]
impl PyConsumerConfig {
    /// `channel` is the producers' `refs.jsonl`, `inbox_dir` the per-rank inboxes' directory,
    /// `ledger` rank 0's durable SQLite ledger (created fresh unless `resume`). Each rank trains
    /// `batch_size` refs per micro-batch and `accumulation` micro-batches per optimizer step;
    /// the dispatch quantum is `dp_size * batch_size * accumulation`. `checkpoint_step` is the
    /// trainer checkpoint's global step (a resumed ledger's must equal it). `idle_timeout_s`
    /// fails the run when no ref arrives that long while the channel is open (`None`: wait);
    /// `poll_s` is the sleep between empty polls.
    #[new]
    #[pyo3(signature = (
        run_id, channel, inbox_dir, ledger, *, dp_size = 1, batch_size = 1, accumulation = 1, resume = false,
        checkpoint_step = 0, idle_timeout_s = None, poll_s = 0.05
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        run_id: String,
        channel: PathBuf,
        inbox_dir: PathBuf,
        ledger: PathBuf,
        dp_size: usize,
        batch_size: usize,
        accumulation: usize,
        resume: bool,
        checkpoint_step: i64,
        idle_timeout_s: Option<f64>,
        poll_s: f64,
    ) -> PyResult<Self> {
        if dp_size < 1 || batch_size < 1 || accumulation < 1 {
            return Err(invalid(
                py,
                format!(
                    "ConsumerConfig: dp_size ({dp_size}), batch_size ({batch_size}) and accumulation ({accumulation}) \
                     must be at least 1"
                ),
            ));
        }
        Ok(PyConsumerConfig {
            inner: ConsumerConfig {
                run_id,
                channel,
                inbox_dir,
                ledger,
                dp_size,
                batch_size,
                accumulation,
                resume,
                checkpoint_step,
                idle_timeout: idle_timeout_s.map(|s| seconds(py, "idle_timeout_s", s)).transpose()?,
                poll: seconds(py, "poll_s", poll_s)?,
            },
        })
    }

    #[getter]
    fn run_id(&self) -> &str {
        &self.inner.run_id
    }
    #[getter]
    fn channel(&self) -> PathBuf {
        self.inner.channel.clone()
    }
    #[getter]
    fn inbox_dir(&self) -> PathBuf {
        self.inner.inbox_dir.clone()
    }
    #[getter]
    fn ledger(&self) -> PathBuf {
        self.inner.ledger.clone()
    }
    #[getter]
    fn dp_size(&self) -> usize {
        self.inner.dp_size
    }
    #[getter]
    fn batch_size(&self) -> usize {
        self.inner.batch_size
    }
    #[getter]
    fn accumulation(&self) -> usize {
        self.inner.accumulation
    }
    #[getter]
    fn resume(&self) -> bool {
        self.inner.resume
    }
    #[getter]
    fn checkpoint_step(&self) -> i64 {
        self.inner.checkpoint_step
    }
    #[getter]
    fn idle_timeout_s(&self) -> Option<f64> {
        self.inner.idle_timeout.map(|d| d.as_secs_f64())
    }
    #[getter]
    fn poll_s(&self) -> f64 {
        self.inner.poll.as_secs_f64()
    }
    /// Refs one rank trains per optimizer step (`batch_size * accumulation`).
    #[getter]
    fn refs_per_rank_step(&self) -> usize {
        self.inner.refs_per_rank_step()
    }
    /// Refs all ranks train per optimizer step: the dispatch quantum the producer waits for.
    #[getter]
    fn quantum(&self) -> usize {
        self.inner.quantum()
    }

    fn __repr__(&self) -> String {
        let c = &self.inner;
        format!(
            "ConsumerConfig(run_id={:?}, channel={:?}, dp_size={}, batch_size={}, accumulation={}, resume={})",
            c.run_id,
            c.channel.display().to_string(),
            c.dp_size,
            c.batch_size,
            c.accumulation,
            c.resume
        )
    }
}

/// Where a rank's lifecycle is.
enum Phase {
    /// Reading steps; `pending` holds the ids of a step handed out and not yet committed.
    Running { stream: Box<RankStream>, pending: Option<Vec<SampleId>>, ended: bool },
    /// `finish()` succeeded.
    Finished,
    /// The failure lifecycle ran (or the rank failed); the reason.
    Failed(String),
}

struct RankState {
    phase: Phase,
    steps: u64,
    refs: u64,
    global_step: i64,
}

/// One data-parallel rank of an online consumer. See the module docs.
#[pyclass(frozen, module = "ferry", name = "OnlineRank")]
pub(crate) struct OnlineRank {
    config: ConsumerConfig,
    collective: Arc<dyn Collective>,
    store: Option<Arc<dyn FeatureStoreApi>>,
    rank0: Option<Rank0>,
    distributor: Mutex<Option<DistributorThread>>,
    state: Mutex<RankState>,
}

impl OnlineRank {
    fn lock(&self, py: Python<'_>) -> PyResult<std::sync::MutexGuard<'_, RankState>> {
        self.state.try_lock().map_err(|e| match e {
            std::sync::TryLockError::WouldBlock => {
                invalid(py, "OnlineRank is in use by another thread (one trainer thread drives a rank)")
            }
            std::sync::TryLockError::Poisoned(p) => {
                drop(p);
                invalid(py, "OnlineRank lock poisoned")
            }
        })
    }

    fn stop_distributor(&self) {
        let thread = self.distributor.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread
            && let Err(e) = thread.stop()
        {
            tracing::warn!(error = %e, "the ref distributor ended with an error");
        }
    }

    /// `run_rank_with`'s failure lifecycle (`ferry_control::online::fail_rank`), then rank 0's
    /// distributor is stopped.
    fn failure_lifecycle(&self, reason: &str, peer_loss: bool) {
        fail_rank(&self.config, self.collective.as_ref(), self.store.as_deref(), reason, peer_loss);
        self.stop_distributor();
    }

    /// Runs the failure lifecycle for a Rust error from the stream and returns it as Python's.
    fn fail_with(&self, py: Python<'_>, state: &mut RankState, e: Error) -> PyErr {
        let reason = e.python_reason();
        py.detach(|| self.failure_lifecycle(&reason, e.is_peer_loss()));
        state.phase = Phase::Failed(reason);
        to_py(py, &e)
    }
}

#[pymethods]
impl OnlineRank {
    /// Joins the online consumer as rank `collective.rank`: rank 0 opens the ledger, checks a
    /// resume, builds the distributor and publishes the quantum, and every rank agrees on how
    /// that went (a failure fails every rank the same way and publishes `.consumer_failed`);
    /// rank 0 then starts the distributor thread. `collective` is a `SocketCollective` or any
    /// object with `rank`, `world_size` and `all_gather(bytes) -> list[bytes]`
    /// (`ferry.TorchCollective`); `store` is this rank's store client, which must retain on
    /// release (features are deleted only by the durable ack).
    #[new]
    #[pyo3(signature = (config, collective, store = None))]
    fn new(
        py: Python<'_>,
        config: &Bound<'_, PyConsumerConfig>,
        collective: &Bound<'_, PyAny>,
        store: Option<&Bound<'_, Store>>,
    ) -> PyResult<Self> {
        let config = config.get().inner.clone();
        let collective = collective_from_py(collective)?;
        let store = store.map(|s| s.get().api(py)).transpose()?;
        let rank0 = py.detach(|| agree_on_rank0_setup(&config, collective.as_ref(), store.clone())).py_err(py)?;
        let distributor = rank0.as_ref().map(|r| r.distributor.start()).transpose().py_err(py)?;
        let me = OnlineRank {
            config,
            collective,
            store,
            rank0,
            distributor: Mutex::new(distributor),
            state: Mutex::new(RankState {
                phase: Phase::Failed("not started".into()),
                steps: 0,
                refs: 0,
                global_step: 0,
            }),
        };
        let built = RankStream::new(
            &me.config,
            Arc::clone(&me.collective),
            me.rank0.as_ref().map(|r| Arc::clone(&r.controller)),
            me.store.clone(),
        );
        let mut state = me.state.lock().unwrap_or_else(|p| p.into_inner());
        match built {
            Ok(stream) => {
                state.global_step = stream.global_step();
                state.phase = Phase::Running { stream: Box::new(stream), pending: None, ended: false };
            }
            Err(e) => {
                let e = me.fail_with(py, &mut state, e);
                drop(state);
                return Err(e);
            }
        }
        drop(state);
        Ok(me)
    }

    /// This rank.
    #[getter]
    fn rank(&self) -> usize {
        self.collective.rank()
    }

    /// The data-parallel world size.
    #[getter]
    fn world_size(&self) -> usize {
        self.collective.world_size()
    }

    /// The config.
    #[getter]
    fn config(&self) -> PyConsumerConfig {
        PyConsumerConfig { inner: self.config.clone() }
    }

    /// The last durable global step.
    #[getter]
    fn global_step(&self, py: Python<'_>) -> PyResult<i64> {
        Ok(self.lock(py)?.global_step)
    }

    /// `"running"`, `"ended"` (the stream ended; call `finish()`), `"finished"` or `"failed"`.
    #[getter]
    fn status(&self, py: Python<'_>) -> PyResult<&'static str> {
        Ok(match &self.lock(py)?.phase {
            Phase::Running { ended: false, .. } => "running",
            Phase::Running { ended: true, .. } => "ended",
            Phase::Finished => "finished",
            Phase::Failed(_) => "failed",
        })
    }

    /// What rank 0's distributor did (`{"dispatched", "skipped", "duplicates", "dropped"}`), on
    /// rank 0; `None` elsewhere.
    fn distributor_stats<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        self.rank0.as_ref().map(|r| crate::pyjson::to_py(py, &r.distributor.stats())).transpose()
    }

    /// The micro-batches (lists of `SampleRef`) of the next optimizer step, or `None` at the
    /// end of the stream. Blocks with the GIL released until the step's refs arrive; Ctrl-C
    /// interrupts it (the refs already leased are put back, so it can be called again). The
    /// previous step must have been committed. A stream that ends inside a step, or a failed
    /// distributor, raises after the failure lifecycle ran.
    fn next_step<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyList>>> {
        let mut guard = self.lock(py)?;
        let state = &mut *guard;
        let Phase::Running { stream, pending, ended } = &mut state.phase else {
            return Err(invalid(py, "next_step: this rank already finished or failed"));
        };
        if *ended {
            return Ok(None);
        }
        if pending.is_some() {
            return Err(invalid(
                py,
                "next_step: the previous step is not committed; call commit_step() first (every rank acks every step)",
            ));
        }
        let read = interruptible(py, |stop| stream.next_step_until(stop));
        let read = match read {
            Ok(read) => read,
            Err((interrupt, read)) => {
                let leased = match read {
                    Ok(StepRead::Interrupted(refs)) => refs,
                    Ok(StepRead::Step(micro)) => micro.into_iter().flatten().collect(),
                    Ok(StepRead::End) | Err(_) => Vec::new(),
                };
                if !leased.is_empty()
                    && let Err(e) = py.detach(|| stream.queue().fail(&leased, "interrupted", true))
                {
                    tracing::error!(error = %e, "could not put back the refs of an interrupted step");
                }
                return Err(interrupt);
            }
        };
        match read {
            Ok(StepRead::Step(micro)) => {
                *pending = Some(micro.iter().flatten().map(|r| r.sample_id.clone()).collect());
                let out = PyList::empty(py);
                for batch in micro {
                    out.append(refs_to_py(py, batch)?)?;
                }
                Ok(Some(out))
            }
            Ok(StepRead::End) => {
                *ended = true;
                Ok(None)
            }
            Ok(StepRead::Interrupted(_)) => Err(invalid(py, "next_step: interrupted")),
            Err(e) => Err(self.fail_with(py, state, e)),
        }
    }

    /// Ends the step `next_step` handed out: the durable data-parallel acknowledgement at the
    /// next global step (rank 0 commits every rank's ids in one ledger transaction; each rank
    /// deletes its own features), then the inbox ack. Every rank calls it at every step, in
    /// lockstep. `ids` defaults to the step's ids (passing others is a protocol error). Returns
    /// the new global step. A failure runs the failure lifecycle and raises.
    #[pyo3(signature = (ids = None))]
    fn commit_step(&self, py: Python<'_>, ids: Option<Vec<String>>) -> PyResult<i64> {
        let mut guard = self.lock(py)?;
        let state = &mut *guard;
        let Phase::Running { stream, pending, .. } = &mut state.phase else {
            return Err(invalid(py, "commit_step: this rank already finished or failed"));
        };
        let Some(step_ids) = pending.take() else {
            return Err(invalid(py, "commit_step: no step to commit (call next_step() first)"));
        };
        let ids: Vec<SampleId> = ids.map_or(step_ids, |ids| ids.into_iter().map(SampleId::new).collect());
        match py.detach(|| stream.commit_step(&ids)) {
            Ok(()) => {
                state.global_step = stream.global_step();
                state.steps += 1;
                state.refs += ids.len() as u64;
                Ok(state.global_step)
            }
            Err(e) => Err(self.fail_with(py, state, e)),
        }
    }

    /// `run_rank_with`'s success lifecycle, once the stream ended (or to stop early): every
    /// rank drains its store and the ranks agree on the outcome (any failure fails every rank
    /// and publishes `.consumer_failed`); rank 0 forwards the last acks to the producer's
    /// counter and publishes `.consumer_done`, then stops the distributor. Call it on every
    /// rank. Returns `{"steps", "refs", "global_step"}`.
    fn finish<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let mut guard = self.lock(py)?;
        let state = &mut *guard;
        match &state.phase {
            Phase::Running { pending: Some(_), .. } => {
                return Err(invalid(py, "finish: a step is not committed; call commit_step() first"));
            }
            Phase::Running { .. } => {}
            Phase::Finished => return report(py, state),
            Phase::Failed(reason) => return Err(invalid(py, format!("finish: this rank failed ({reason})"))),
        }
        let outcome = py
            .detach(|| finish_rank(&self.config, self.collective.as_ref(), self.rank0.as_ref(), self.store.as_deref()));
        py.detach(|| self.stop_distributor());
        match outcome {
            Ok(()) => {
                state.phase = Phase::Finished;
                report(py, state)
            }
            Err(e) => {
                state.phase = Phase::Failed(e.python_reason());
                Err(to_py(py, &e))
            }
        }
    }

    /// `run_rank_with`'s failure lifecycle: leave the group (peers fail at once instead of
    /// timing out), and unless `peer_loss` publish `.consumer_failed` with `reason` (a string,
    /// or an exception as `"<Type>: <message>"`; the first published failure wins). A
    /// `ferry.PeerLostError` counts as a lost peer: the attempt crashed as a whole and is
    /// resumed, so nothing terminal is published. Idempotent once failed or finished.
    #[pyo3(signature = (reason, *, peer_loss = None))]
    fn fail(&self, py: Python<'_>, reason: &Bound<'_, PyAny>, peer_loss: Option<bool>) -> PyResult<()> {
        let mut guard = self.lock(py)?;
        if !matches!(guard.phase, Phase::Running { .. }) {
            return Ok(());
        }
        let (text, lost) = if let Ok(s) = reason.extract::<String>() {
            (s, false)
        } else {
            let peer_lost = py.import("ferry")?.getattr("PeerLostError")?;
            (exception_reason(py, reason), reason.is_instance(&peer_lost)?)
        };
        let lost = peer_loss.unwrap_or(lost);
        py.detach(|| self.failure_lifecycle(&text, lost));
        guard.phase = Phase::Failed(text);
        Ok(())
    }

    fn __iter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyList>>> {
        self.next_step(py)
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    /// On an exception: the failure lifecycle (unless it already ran). Without one: `finish()`
    /// unless it already ran.
    #[pyo3(signature = (*exc))]
    fn __exit__(&self, py: Python<'_>, exc: &Bound<'_, PyTuple>) -> PyResult<bool> {
        let value = exc.get_item(1).ok().filter(|v| !v.is_none());
        let running = matches!(self.lock(py)?.phase, Phase::Running { .. });
        if !running {
            return Ok(false);
        }
        match value {
            Some(exc) => self.fail(py, &exc, None)?,
            None => {
                self.finish(py)?;
            }
        }
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!("OnlineRank(rank={}, world_size={})", self.collective.rank(), self.collective.world_size())
    }
}

fn report<'py>(py: Python<'py>, state: &RankState) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("steps", state.steps)?;
    d.set_item("refs", state.refs)?;
    d.set_item("global_step", state.global_step)?;
    Ok(d)
}

impl Drop for OnlineRank {
    fn drop(&mut self) {
        // A rank dropped without finish() or fail(): stop the distributor thread (it never
        // outlives its rank); nothing terminal is published (a crash, resumable). The GIL is
        // released while it stops, in case its store calls into Python.
        Python::attach(|py| py.detach(|| self.stop_distributor()));
    }
}
