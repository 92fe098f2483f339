//! The online consumer's assembly (SpecForge's `build_disagg_online_consumer`, §14.3-§14.4):
//! rank 0 opens the durable ledger (fresh, or the one being resumed), reconciles it, checks the
//! durable step against the trainer's checkpoint, builds the distributor and publishes the
//! dispatch quantum; every rank reads its inbox as a [`StreamingRefQueue`] and ends each
//! optimizer step with the data-parallel durable acknowledgement, then its inbox ack.
//!
//! [`run_rank`] / [`run_rank_with`] run a rank's whole loop. A trainer that drives its own loop
//! (`ferry.OnlineRank` in Python) uses the same pieces: [`RankStream`] for the steps
//! ([`RankStream::next_step_until`] when the wait must be interruptible, returning the refs
//! already leased so they can be put back), then [`finish_rank`] or [`fail_rank`], the success
//! and failure lifecycles `run_rank_with` ends with.
//!
//! Recovery (§14.4): a crash before the ack transaction replays the step's samples; a crash
//! after it skips them and deletes their features; the ledger's step must equal the
//! checkpoint's, and a resume may use a different DP size (the ref plane repartitions).

use crate::channel::{FileRefChannel, RefSink, RefSource};
use crate::collective::Collective;
use crate::controller::{ControllerOptions, DataFlowController, Reconciliation};
use crate::distributor::{DistributorOptions, RefDistributor, file_inboxes};
use crate::dp_ack::DpAckController;
use crate::ledger::{InMemoryLedger, Ledger, SqliteLedger};
use crate::queue::RefQueue;
use crate::signal::StopSignal;
use crate::stream_queue::{StreamQueueOptions, StreamingRefQueue};
use ferry_core::{Error, Result, SampleId, SampleRef};
use ferry_store::{DrainPolicy, FeatureStoreApi};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Where an online consumer keeps its state, and its shape.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// The run id.
    pub run_id: String,
    /// The producers' channel (`<control_dir>/refs.jsonl`).
    pub channel: PathBuf,
    /// The per-rank inboxes' directory.
    pub inbox_dir: PathBuf,
    /// Rank 0's durable ledger (`<consumer_state_dir>/consumer.sqlite`).
    pub ledger: PathBuf,
    /// Data-parallel ranks.
    pub dp_size: usize,
    /// Refs per rank per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub accumulation: usize,
    /// Resume the attempt whose ledger this is (else the ledger must not exist).
    pub resume: bool,
    /// The trainer checkpoint's global step, which a resumed ledger's step must equal.
    pub checkpoint_step: i64,
    /// Fail when no ref arrives for this long while the channel is open (`None`: wait).
    pub idle_timeout: Option<Duration>,
    /// Sleep between empty polls (distributor and inbox readers).
    pub poll: Duration,
}

impl ConsumerConfig {
    /// Refs one rank trains per optimizer step.
    pub fn refs_per_rank_step(&self) -> usize {
        self.batch_size * self.accumulation
    }

    /// Refs all ranks train per optimizer step: the dispatch quantum.
    pub fn quantum(&self) -> usize {
        self.dp_size * self.refs_per_rank_step()
    }
}

/// Rank 0's assembled state.
#[derive(Debug)]
pub struct Rank0 {
    /// The controller over the durable ledger.
    pub controller: Arc<DataFlowController>,
    /// The distributor (start it with [`RefDistributor::start`] once the trainer is built).
    pub distributor: Arc<RefDistributor>,
    /// What a resume reconciled (`None` for a fresh attempt).
    pub reconciliation: Option<Reconciliation>,
}

/// Rank 0's setup (§14.3 step 2). `store` is rank 0's store client: reconciliation deletes
/// the features of samples a previous attempt durably trained, and the distributor drops the
/// end-of-stream tail through it.
pub fn setup_rank0(config: &ConsumerConfig, store: Option<Arc<dyn FeatureStoreApi>>) -> Result<Rank0> {
    if config.dp_size < 1 || config.batch_size < 1 || config.accumulation < 1 {
        return Err(Error::InvalidArgument(format!(
            "online consumer: dp_size ({}), batch_size ({}) and accumulation ({}) must be at least 1",
            config.dp_size, config.batch_size, config.accumulation
        )));
    }
    if let Some(store) = &store {
        check_retains(store.as_ref())?;
    }
    // Every check comes before anything is created or deleted: a refused attempt leaves no
    // ledger behind and never touches another attempt's inboxes.
    let source = Arc::new(FileRefChannel::open(&config.channel));
    let quantum = config.quantum() as u64;
    match source.consumer_quantum()? {
        Some(_) if !config.resume => {
            return Err(Error::InvalidArgument(format!(
                "{} already holds a consumer quantum; every online attempt requires a fresh reference channel \
                 (or pass resume to continue the attempt that wrote it)",
                config.channel.display()
            )));
        }
        Some(q) if q != quantum => {
            return Err(Error::InvalidArgument(format!(
                "consumer quantum changed across resume for {}: the channel holds {q}, this attempt needs {quantum} \
                 (dp_size x batch_size x accumulation must stay the same to resume)",
                config.channel.display()
            )));
        }
        _ => {}
    }
    if config.resume && source.consumer_stopped()? && source.consumer_failure()?.is_none() {
        return Err(Error::InvalidArgument(format!(
            "the attempt on {} finished (.consumer_done); a finished attempt is never resumed (its dropped tail is \
             committed but unacknowledged): start a fresh attempt",
            config.channel.display()
        )));
    }
    let ledger: Arc<dyn Ledger> = Arc::new(if config.resume {
        SqliteLedger::open_existing(&config.ledger)?
    } else {
        SqliteLedger::open_fresh(&config.ledger)?
    });
    let controller = Arc::new(DataFlowController::new(ControllerOptions::new(config.run_id.clone()), ledger));
    let reconciliation = if config.resume {
        let rec = controller.reconcile_on_restart(store.as_deref())?;
        if let Some(store) = &store {
            store.drain(DrainPolicy::default())?;
        }
        check_resume_step(&rec, config.checkpoint_step, &config.ledger)?;
        Some(rec)
    } else {
        None
    };
    let (skip_ids, requeued_ids) = match &reconciliation {
        Some(rec) => (rec.released.iter().cloned().collect(), rec.requeued.iter().cloned().collect()),
        None => Default::default(),
    };
    let inboxes: Vec<Arc<dyn RefSink>> =
        file_inboxes(&config.inbox_dir, config.dp_size)?.into_iter().map(|i| i as Arc<dyn RefSink>).collect();
    let options = DistributorOptions {
        skip_ids,
        requeued_ids,
        poll: config.poll,
        idle_timeout: config.idle_timeout,
        ..DistributorOptions::new(config.dp_size, config.refs_per_rank_step()).with_batch(config.batch_size)
    };
    let distributor = Arc::new(RefDistributor::new(source.clone(), Arc::clone(&controller), inboxes, store, options)?);
    source.publish_consumer_quantum(quantum, config.resume)?;
    Ok(Rank0 { controller, distributor, reconciliation })
}

/// An online consumer's store must keep bytes until the durable ack deletes them.
fn check_retains(store: &dyn FeatureStoreApi) -> Result<()> {
    if store.health()?.retain_on_release {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "online consumer: store {} releases bytes when a read lease ends; open it with retain_on_release: features \
         are deleted only after an optimizer-boundary durable ack",
        store.store_id()
    )))
}

/// A resumed ledger must be at an optimizer-durable step equal to the checkpoint's (a ledger
/// with no step resumes only checkpoint 0).
fn check_resume_step(rec: &Reconciliation, checkpoint_step: i64, ledger: &std::path::Path) -> Result<()> {
    let context = format!("resuming from ledger {}", ledger.display());
    match rec.global_step {
        None if checkpoint_step == 0 => Ok(()),
        None => Err(Error::Protocol {
            context,
            message: format!("the ledger has no durable step but the checkpoint is at step {checkpoint_step}"),
        }),
        Some(_) if !rec.optimizer_durable => Err(Error::Protocol {
            context,
            message: "the ledger's last acknowledgement was not at an optimizer-durable boundary".into(),
        }),
        Some(step) if step > checkpoint_step => Err(Error::Protocol {
            context,
            message: format!(
                "the ledger's durable step {step} is ahead of checkpoint step {checkpoint_step}: acknowledgements after \
                 the latest checkpoint make this attempt non-resumable"
            ),
        }),
        Some(step) if step < checkpoint_step => Err(Error::Protocol {
            context,
            message: format!("the ledger's durable step {step} is behind checkpoint step {checkpoint_step}"),
        }),
        Some(_) => Ok(()),
    }
}

/// What [`RankStream::next_step_until`] read.
#[derive(Debug)]
pub enum StepRead {
    /// The micro-batches of the next optimizer step.
    Step(Vec<Vec<SampleRef>>),
    /// The stream ended (between steps).
    End,
    /// The stop signal was set: the refs of the step leased so far (to put back or settle).
    Interrupted(Vec<SampleRef>),
}

/// One rank's trainer-side stream: optimizer steps of refs from its inbox, each ended by the
/// durable acknowledgement.
#[derive(Debug)]
pub struct RankStream {
    queue: StreamingRefQueue,
    ack: DpAckController,
    batch_size: usize,
    accumulation: usize,
    trainer_id: String,
    global_step: i64,
}

impl RankStream {
    /// Rank `collective.rank()`'s stream from its inbox file under [`ConsumerConfig::inbox_dir`].
    /// Rank 0 passes its [`Rank0::controller`]; other ranks pass `None` (they keep a throwaway
    /// in-memory one). `store` is the rank's store client.
    pub fn new(
        config: &ConsumerConfig,
        collective: Arc<dyn Collective>,
        rank0_controller: Option<Arc<DataFlowController>>,
        store: Option<Arc<dyn FeatureStoreApi>>,
    ) -> Result<RankStream> {
        let inbox: Arc<dyn RefSource> = Arc::new(FileRefChannel::inbox(&config.inbox_dir, collective.rank()));
        RankStream::with_inbox(config, collective, rank0_controller, store, inbox)
    }

    /// [`RankStream::new`] over any inbox source: a rank on another node reads its inbox over
    /// HTTP ([`crate::http_inbox::RemoteInbox`]).
    pub fn with_inbox(
        config: &ConsumerConfig,
        collective: Arc<dyn Collective>,
        rank0_controller: Option<Arc<DataFlowController>>,
        store: Option<Arc<dyn FeatureStoreApi>>,
        inbox: Arc<dyn RefSource>,
    ) -> Result<RankStream> {
        let rank = collective.rank();
        if collective.world_size() != config.dp_size || rank >= config.dp_size {
            return Err(Error::InvalidArgument(format!(
                "online consumer: rank {rank} of a world of {} but dp_size is {}; every data-parallel rank reads one \
                 inbox, so the world size must equal dp_size",
                collective.world_size(),
                config.dp_size
            )));
        }
        if let Some(store) = &store {
            check_retains(store.as_ref())?;
        }
        let controller = match rank0_controller {
            Some(c) if rank == 0 => c,
            Some(_) => {
                return Err(Error::InvalidArgument(format!("rank {rank} was given rank 0's controller")));
            }
            None if rank == 0 => {
                return Err(Error::InvalidArgument("rank 0 needs the controller over the durable ledger".into()));
            }
            None => Arc::new(DataFlowController::new(
                ControllerOptions { enable_sample_queue: false, ..ControllerOptions::new(config.run_id.clone()) },
                Arc::new(InMemoryLedger::new()),
            )),
        };
        let queue = StreamingRefQueue::new(
            inbox,
            StreamQueueOptions {
                poll: config.poll,
                idle_timeout: config.idle_timeout,
                ..StreamQueueOptions::default()
            },
        );
        Ok(RankStream {
            queue,
            ack: DpAckController::new(controller, collective, store),
            batch_size: config.batch_size,
            accumulation: config.accumulation,
            trainer_id: format!("trainer-{rank}"),
            global_step: config.checkpoint_step,
        })
    }

    /// The rank's inbox queue (for a loader that materializes batches from it).
    pub fn queue(&self) -> &StreamingRefQueue {
        &self.queue
    }

    /// The last durable global step.
    pub fn global_step(&self) -> i64 {
        self.global_step
    }

    /// The micro-batches of the next optimizer step, or `None` at the end of the stream. A
    /// stream that ends inside a step is an error: no partial optimizer step is ever acked.
    pub fn next_step(&self) -> Result<Option<Vec<Vec<SampleRef>>>> {
        match self.read_step(None)? {
            StepRead::Step(micro) => Ok(Some(micro)),
            StepRead::End => Ok(None),
            StepRead::Interrupted(_) => unreachable!("no stop signal to interrupt the read"),
        }
    }

    /// [`RankStream::next_step`], interruptible: each micro-batch is read with
    /// [`RefQueue::get_interruptible`], so a set `stop` ends the wait at once with
    /// [`StepRead::Interrupted`] and the refs of the step already leased, which the caller puts
    /// back (`queue().fail(refs, reason, true)`) or settles.
    pub fn next_step_until(&self, stop: &StopSignal) -> Result<StepRead> {
        self.read_step(Some(stop))
    }

    fn read_step(&self, stop: Option<&StopSignal>) -> Result<StepRead> {
        let mut micro: Vec<Vec<SampleRef>> = Vec::with_capacity(self.accumulation);
        for i in 0..self.accumulation {
            let batch = match stop {
                Some(stop) => self.queue.get_interruptible(self.batch_size, stop)?,
                None => self.queue.get(self.batch_size, None)?,
            };
            if stop.is_some_and(StopSignal::is_set) {
                micro.push(batch);
                return Ok(StepRead::Interrupted(micro.into_iter().flatten().collect()));
            }
            if batch.is_empty() && i == 0 {
                return Ok(StepRead::End);
            }
            if batch.len() < self.batch_size {
                let got = i * self.batch_size + batch.len();
                return Err(Error::Protocol {
                    context: format!("{} stream", self.trainer_id),
                    message: format!(
                        "the stream ended inside an optimizer step ({got} of {} refs); no partial optimizer step or \
                         durable acknowledgement was committed",
                        self.batch_size * self.accumulation
                    ),
                });
            }
            micro.push(batch);
        }
        Ok(StepRead::Step(micro))
    }

    /// Ends a step trained on `ids`: the durable DP acknowledgement at the next global step,
    /// then the inbox acknowledgement. Every rank calls it at every step, in lockstep.
    pub fn commit_step(&mut self, ids: &[SampleId]) -> Result<()> {
        let step = self.global_step + 1;
        self.ack.ack_train_refs(&self.trainer_id, ids, Some(step), true)?;
        self.global_step = step;
        self.queue.ack_ids(ids)
    }
}

/// Rank 0's setup, agreed on by every rank (§14.3 steps 2-3): rank 0 runs [`setup_rank0`] and
/// broadcasts how it went; if it failed, every rank fails with the same error ("online consumer
/// rank-0 setup failed: ...") and `.consumer_failed` says why. A single rank has no one to tell:
/// its setup error is returned as it is (SpecForge re-raises the original there, so a caller's
/// `except ValueError` still catches a reused ledger). Returns rank 0's state on rank 0, `None`
/// elsewhere.
pub fn agree_on_rank0_setup(
    config: &ConsumerConfig,
    collective: &dyn Collective,
    store: Option<Arc<dyn FeatureStoreApi>>,
) -> Result<Option<Rank0>> {
    if collective.world_size() == 1 {
        return match setup_rank0(config, store) {
            Ok(rank0) => Ok(Some(rank0)),
            Err(e) => {
                publish_consumer_failure(config, &e);
                Err(e)
            }
        };
    }
    let (rank0, failure) = if collective.rank() == 0 {
        match setup_rank0(config, store) {
            Ok(rank0) => (Some(rank0), None),
            Err(e) => (None, Some(e.python_reason())),
        }
    } else {
        (None, None)
    };
    let part = serde_json::to_vec(&failure).map_err(|e| Error::InvalidArgument(format!("encoding: {e}")))?;
    let agreed: Option<String> = serde_json::from_slice(&collective.broadcast_from_rank0(part)?)
        .map_err(|e| Error::Corrupt { what: "rank 0's setup outcome".into(), message: e.to_string() })?;
    if let Some(reason) = agreed {
        let error = Error::Collective { message: format!("online consumer rank-0 setup failed: {reason}") };
        if collective.rank() == 0 {
            publish_consumer_failure(config, &error);
        }
        return Err(error);
    }
    Ok(rank0)
}

/// Writes `.consumer_failed` with `"<Type>: <message>"`; a failure to write it is logged (the
/// primary error is what the caller returns).
fn publish_consumer_failure(config: &ConsumerConfig, error: &Error) {
    publish_consumer_failure_text(config, &error.python_reason());
}

/// Writes `.consumer_failed` (`text` is `"<Type>: <message>"`) unless a failure is already
/// published: the first failure (the root cause) wins over the ones it causes on other ranks.
/// Setup that fails before a rank runs (rank 0's inbox relay not starting) publishes with it, so
/// the producer stops instead of waiting for its idle timeout.
pub fn publish_consumer_failure_text(config: &ConsumerConfig, text: &str) {
    let channel = FileRefChannel::open(&config.channel);
    match channel.consumer_failure() {
        Ok(Some(first)) => tracing::warn!(first = %first, later = %text, "a consumer failure is already published"),
        _ => {
            if let Err(e) = channel.mark_consumer_failed(text) {
                tracing::error!(channel = %config.channel.display(), error = %e, "could not publish the consumer failure");
            }
        }
    }
}

/// What one rank's run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankReport {
    /// Optimizer steps durably acknowledged.
    pub steps: u64,
    /// Refs trained.
    pub refs: u64,
    /// The last durable global step.
    pub global_step: i64,
}

/// One rank's whole online run with SpecForge's lifecycle hooks (§14.3 steps 6-7): train every
/// optimizer step the rank's inbox delivers (`train` gets the step's micro-batches), end each
/// with the durable acknowledgement; on success drain the rank's store, agree on every rank's
/// drain outcome, and (rank 0) publish `.consumer_done`; on failure publish `.consumer_failed`
/// with `"<Type>: <message>"` (with a failed drain's error alongside, never masking the
/// primary one), except when a peer rank's process is gone ([`Error::is_peer_loss`]): that is a
/// crash of the consumer, which `--resume` recovers, so nothing terminal is published. Call it on every rank; `rank0` is rank 0's [`agree_on_rank0_setup`] result,
/// whose distributor must be running.
pub fn run_rank(
    config: &ConsumerConfig,
    collective: Arc<dyn Collective>,
    rank0: Option<&Rank0>,
    store: Option<Arc<dyn FeatureStoreApi>>,
    train: impl FnMut(&[Vec<SampleRef>]) -> Result<()>,
) -> Result<RankReport> {
    run_rank_with(config, collective, rank0, store, train, |_| Ok(()))
}

/// [`run_rank`] with `on_durable(global_step)` called after each step's durable
/// acknowledgement (a trainer saves its checkpoint there: a resume needs the checkpoint's step
/// to equal the ledger's).
pub fn run_rank_with(
    config: &ConsumerConfig,
    collective: Arc<dyn Collective>,
    rank0: Option<&Rank0>,
    store: Option<Arc<dyn FeatureStoreApi>>,
    train: impl FnMut(&[Vec<SampleRef>]) -> Result<()>,
    on_durable: impl FnMut(i64) -> Result<()>,
) -> Result<RankReport> {
    run_rank_from(config, collective, rank0, store, None, train, on_durable)
}

/// [`run_rank_with`] reading the rank's inbox from `inbox` when given (a remote rank's
/// [`crate::http_inbox::RemoteInbox`]), else from its file under [`ConsumerConfig::inbox_dir`].
pub fn run_rank_from(
    config: &ConsumerConfig,
    collective: Arc<dyn Collective>,
    rank0: Option<&Rank0>,
    store: Option<Arc<dyn FeatureStoreApi>>,
    inbox: Option<Arc<dyn RefSource>>,
    mut train: impl FnMut(&[Vec<SampleRef>]) -> Result<()>,
    mut on_durable: impl FnMut(i64) -> Result<()>,
) -> Result<RankReport> {
    let result = (|| -> Result<RankReport> {
        let controller = rank0.map(|r| Arc::clone(&r.controller));
        let mut stream = match inbox {
            Some(inbox) => RankStream::with_inbox(config, Arc::clone(&collective), controller, store.clone(), inbox)?,
            None => RankStream::new(config, Arc::clone(&collective), controller, store.clone())?,
        };
        let mut report = RankReport { steps: 0, refs: 0, global_step: stream.global_step() };
        while let Some(step) = stream.next_step()? {
            train(&step)?;
            let ids: Vec<SampleId> = step.iter().flatten().map(|r| r.sample_id.clone()).collect();
            stream.commit_step(&ids)?;
            on_durable(stream.global_step())?;
            report.steps += 1;
            report.refs += ids.len() as u64;
            report.global_step = stream.global_step();
        }
        Ok(report)
    })();
    match result {
        Ok(report) => {
            finish_rank(config, collective.as_ref(), rank0, store.as_deref())?;
            Ok(report)
        }
        Err(primary) => {
            fail_rank(config, collective.as_ref(), store.as_deref(), &primary.python_reason(), primary.is_peer_loss());
            Err(primary)
        }
    }
}

/// [`run_rank_with`]'s success lifecycle, once a rank's stream ended (or to stop early): every
/// rank drains its store and the ranks agree on the outcome (any failure fails every rank, and
/// rank 0 publishes `.consumer_failed`); rank 0 forwards the last acknowledgements to the
/// producer's counter and publishes `.consumer_done`. Call it on every rank, in lockstep;
/// `rank0` is rank 0's state (`None` elsewhere). Stopping rank 0's distributor is the caller's.
pub fn finish_rank(
    config: &ConsumerConfig,
    collective: &dyn Collective,
    rank0: Option<&Rank0>,
    store: Option<&dyn FeatureStoreApi>,
) -> Result<()> {
    let rank = collective.rank();
    // Success: every rank drains its store; any failure fails every rank.
    let drained = store.map(|s| s.drain(DrainPolicy::default())).transpose();
    let failure = drained.err().map(|e| format!("rank {rank}: {e}"));
    let part = serde_json::to_vec(&failure).map_err(|e| Error::InvalidArgument(format!("encoding: {e}")))?;
    let mut failures = Vec::new();
    for (r, p) in collective.all_gather(part)?.iter().enumerate() {
        let f: Option<String> = serde_json::from_slice(p)
            .map_err(|e| Error::Corrupt { what: format!("rank {r}'s drain outcome"), message: e.to_string() })?;
        failures.extend(f);
    }
    if !failures.is_empty() {
        let error = Error::Collective {
            message: format!("online consumer finished but a store drain failed: {}", failures.join("; ")),
        };
        if rank == 0 {
            publish_consumer_failure(config, &error);
        }
        return Err(error);
    }
    if let Some(rank0) = rank0 {
        // The ranks' last acknowledgements reach the producer's counter before `done`.
        rank0.distributor.pump()?;
        FileRefChannel::open(&config.channel).mark_consumer_done()?;
    }
    Ok(())
}

/// [`run_rank_with`]'s failure lifecycle: this rank leaves the group (its peers fail at once
/// instead of waiting for it at a boundary); unless a peer's process is gone (`peer_loss`, see
/// [`Error::is_peer_loss`]: the consumer crashed as a whole and `--resume` recovers it, so
/// nothing terminal is published), `.consumer_failed` is published with `reason`
/// (`"<Type>: <message>"`) and a failed drain's error beside it; the first published failure
/// wins. Stopping rank 0's distributor is the caller's.
pub fn fail_rank(
    config: &ConsumerConfig,
    collective: &dyn Collective,
    store: Option<&dyn FeatureStoreApi>,
    reason: &str,
    peer_loss: bool,
) {
    let rank = collective.rank();
    // This rank will not reach another boundary: its peers must not wait for it.
    collective.abandon();
    if peer_loss {
        // A terminal `.consumer_failed` would make the producer stop and free every sample the
        // resumed attempt needs.
        tracing::warn!(rank, reason, "a peer rank is gone; this attempt can be resumed");
        return;
    }
    let mut text = reason.to_owned();
    if let Some(e) = store.and_then(|s| s.drain(DrainPolicy::default()).err()) {
        tracing::error!(rank, error = %e, "store drain failed after a consumer failure");
        text.push_str(&format!("; store drain also failed: {}", e.python_reason()));
    }
    publish_consumer_failure_text(config, &text);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::RefSink;

    fn rec(global_step: Option<i64>, optimizer_durable: bool) -> Reconciliation {
        Reconciliation { requeued: Vec::new(), released: Vec::new(), global_step, optimizer_durable }
    }

    #[test]
    fn a_resume_needs_the_ledgers_durable_step_to_equal_the_checkpoints() {
        let db = std::path::Path::new("/state/consumer.sqlite");
        assert!(check_resume_step(&rec(None, false), 0, db).is_ok());
        assert!(check_resume_step(&rec(Some(7), true), 7, db).is_ok());
        for (r, checkpoint, want) in [
            (rec(None, false), 3, "no durable step"),
            (rec(Some(7), false), 7, "not at an optimizer-durable boundary"),
            (rec(Some(8), true), 7, "ahead of checkpoint step 7"),
            (rec(Some(6), true), 7, "behind checkpoint step 7"),
        ] {
            let err = check_resume_step(&r, checkpoint, db).unwrap_err().to_string();
            assert!(err.contains(want) && err.contains("consumer.sqlite"), "{err}");
        }
    }

    fn config(dir: &std::path::Path, resume: bool) -> ConsumerConfig {
        ConsumerConfig {
            run_id: "run0".into(),
            channel: dir.join("control/refs.jsonl"),
            inbox_dir: dir.join("inboxes"),
            ledger: dir.join("state/consumer.sqlite"),
            dp_size: 2,
            batch_size: 2,
            accumulation: 3,
            resume,
            checkpoint_step: 0,
            idle_timeout: None,
            poll: Duration::from_millis(1),
        }
    }

    #[test]
    fn rank0_setup_publishes_the_quantum_and_refuses_a_reused_or_missing_ledger() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("control")).unwrap();
        let rank0 = setup_rank0(&config(dir.path(), false), None).unwrap();
        assert!(dir.path().join("state/consumer.sqlite").exists(), "the ledger's directory is created");
        let producer = FileRefChannel::open(dir.path().join("control/refs.jsonl"));
        assert_eq!(producer.consumer_quantum().unwrap(), Some(12), "dp 2 x batch 2 x accumulation 3");
        assert_eq!(rank0.distributor.dispatch_quantum(), 12);
        drop(rank0);
        // A fresh attempt never reuses a ledger; a resume needs one.
        let err = setup_rank0(&config(dir.path(), false), None).unwrap_err().to_string();
        assert!(err.contains("already exists") || err.contains("already holds"), "{err}");
        let other = tempfile::tempdir().unwrap();
        assert!(setup_rank0(&config(other.path(), true), None).is_err());
        // A resume keeps the quantum; a fresh attempt on a used channel is refused.
        assert!(setup_rank0(&config(dir.path(), true), None).is_ok());
        let bad = ConsumerConfig { batch_size: 0, ..config(other.path(), false) };
        assert!(matches!(setup_rank0(&bad, None), Err(Error::InvalidArgument(_))));
        // A store that frees on release would lose samples the trainer has not durably acked.
        let consume_once: Arc<dyn FeatureStoreApi> =
            Arc::new(ferry_store::open_store("mem://once", ferry_store::StoreOptions::default()).unwrap());
        let err = setup_rank0(&config(other.path(), false), Some(consume_once)).unwrap_err().to_string();
        assert!(err.contains("retain_on_release"), "{err}");
    }
}
