//! Prefetch: `W` worker threads (`feature-loader-<i>`) and a window of at most `W` batches in
//! flight, handed back strictly in order.
//!
//! ```text
//! consumer (Batches::next)                      workers feature-loader-0..W-1
//! ------------------------                      -----------------------------
//! submit batches k..k+W-1 ──jobs (mpsc)──────▶  one takes a job, materializes the batch,
//! wait on batch k's own reply channel ◀────────  sends the result on that job's reply channel
//! yield it, submit batch k+W
//! ```
//!
//! Every batch has its own one-slot reply channel and the consumer waits on the oldest one, so
//! the output order is the submission order whatever order the workers finish in, and an error
//! surfaces at its batch's position. A worker that panics drops its reply sender; the consumer
//! sees the disconnect and reports it as that batch's error instead of hanging.
//!
//! Closing (explicitly, at the end of a pass, after an error, or when the iterator is dropped):
//! raise the stop flag (a worker checks it between samples and abandons its batch), drop the
//! job sender (idle workers wake and exit) and every pending reply receiver (finished batches
//! are dropped and their buffers go back to the pool), then wait, up to a deadline, for every
//! worker to report its exit. A worker stuck inside a store read cannot be interrupted: the
//! close then fails with [`Error::Timeout`] and can be retried. Leases cannot leak either way:
//! a worker releases each handle right after its read, before it looks at the stop flag.

use crate::materialize::{BatchContext, materialize_batch};
use ferry_core::{Error, Result, SampleRef, TrainBatch};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

type BatchResult = Result<Option<TrainBatch>>;

/// One batch for a worker.
struct Job {
    refs: Vec<SampleRef>,
    reply: SyncSender<BatchResult>,
}

/// Sends the worker's exit notice when the worker ends, normally or by panic.
struct ExitNotice(Sender<()>);

impl Drop for ExitNotice {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

/// The worker pool of one pass.
pub(crate) struct Prefetcher {
    jobs: Option<Sender<Job>>,
    in_flight: VecDeque<(usize, Receiver<BatchResult>)>,
    workers: Vec<JoinHandle<()>>,
    exits: Receiver<()>,
    running: usize,
    stop: Arc<AtomicBool>,
    window: usize,
}

fn worker_loop(ctx: &BatchContext, jobs: &Mutex<Receiver<Job>>, stop: &AtomicBool) {
    loop {
        // The lock is held only while waiting for the next job; a sender dropped by close wakes
        // the waiter with an error and each worker in turn exits.
        let job = jobs.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok(job) = job else { return };
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let result = materialize_batch(ctx, &job.refs, stop);
        let _ = job.reply.send(result); // the consumer may have closed the pass: drop the batch
    }
}

impl Prefetcher {
    /// Starts `workers` threads (at least one) named `feature-loader-<i>`.
    pub(crate) fn start(ctx: &Arc<BatchContext>, workers: usize) -> Result<Prefetcher> {
        let workers = workers.max(1);
        let (job_tx, job_rx) = mpsc::channel::<Job>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (exit_tx, exits) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let mut prefetcher = Prefetcher {
            jobs: Some(job_tx),
            in_flight: VecDeque::with_capacity(workers),
            workers: Vec::with_capacity(workers),
            exits,
            running: 0,
            stop: Arc::clone(&stop),
            window: workers,
        };
        for i in 0..workers {
            let (ctx, job_rx, stop, notice) =
                (Arc::clone(ctx), Arc::clone(&job_rx), Arc::clone(&stop), ExitNotice(exit_tx.clone()));
            let spawned = std::thread::Builder::new().name(format!("feature-loader-{i}")).spawn(move || {
                let _notice = notice;
                worker_loop(&ctx, &job_rx, &stop);
            });
            match spawned {
                Ok(handle) => {
                    prefetcher.workers.push(handle);
                    prefetcher.running += 1;
                }
                Err(e) => {
                    let err = Error::io(format!("spawning feature loader worker feature-loader-{i}"), &e);
                    let _ = prefetcher.close_within(Duration::from_secs(5));
                    return Err(err);
                }
            }
        }
        Ok(prefetcher)
    }

    /// Whether another batch may be submitted without exceeding the window.
    pub(crate) fn has_room(&self) -> bool {
        self.jobs.is_some() && self.in_flight.len() < self.window
    }

    /// Batches submitted and not yet handed back.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Queues batch `index` for the workers.
    pub(crate) fn submit(&mut self, index: usize, refs: Vec<SampleRef>) -> Result<()> {
        let (reply, result) = mpsc::sync_channel(1);
        let sent = self.jobs.as_ref().map(|jobs| jobs.send(Job { refs, reply }));
        match sent {
            Some(Ok(())) => {
                self.in_flight.push_back((index, result));
                Ok(())
            }
            _ => Err(worker_failure(index, "the worker pool is closed")),
        }
    }

    /// Waits for the oldest submitted batch; `None` when nothing is in flight.
    pub(crate) fn next_result(&mut self) -> Option<Result<TrainBatch>> {
        let (index, result) = self.in_flight.pop_front()?;
        Some(match result.recv() {
            Ok(Ok(Some(batch))) => Ok(batch),
            Ok(Ok(None)) => Err(worker_failure(index, "the pass was closed while the batch was materializing")),
            Ok(Err(e)) => Err(e),
            Err(mpsc::RecvError) => Err(worker_failure(index, "its feature-loader worker panicked")),
        })
    }

    /// Stops the workers and waits up to `timeout` for all of them to exit. Idempotent; after a
    /// timeout a later call can complete the close.
    pub(crate) fn close_within(&mut self, timeout: Duration) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        self.jobs = None;
        self.in_flight.clear();
        let start = Instant::now();
        let deadline = start + timeout;
        while self.running > 0 {
            match self.exits.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(()) => self.running -= 1,
                Err(RecvTimeoutError::Disconnected) => self.running = 0,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(Error::timeout(
                        format!(
                            "{} feature-loader worker(s) to stop (each is inside a store read or a transform)",
                            self.running
                        ),
                        start.elapsed(),
                    ));
                }
            }
        }
        for handle in self.workers.drain(..) {
            // Every worker has sent its exit notice, the last thing it does; a panic was
            // already reported as its batch's error.
            let _ = handle.join();
        }
        Ok(())
    }
}

fn worker_failure(index: usize, why: &str) -> Error {
    Error::Backend {
        backend: "feature-loader".into(),
        operation: "materialize".into(),
        key: format!("batch {index}"),
        message: why.into(),
    }
}
