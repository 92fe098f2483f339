//! [`StreamingRefQueue`]: a ref channel (or a rank's inbox) as the loader's [`RefQueue`]
//! (SpecForge's `StreamingRefQueue`, §8.4).
//!
//! `get` blocks until it has the refs asked for or the stream ended; the refs it returns are in
//! flight until acknowledged. Acknowledgements must be exactly the oldest in-flight refs, in
//! order, and only they advance the channel's consumed counter (the producer's backpressure
//! signal and the restart accounting): a trainer that acknowledges at its optimizer boundary
//! never lets the counter run ahead of durable progress. A retryable failure puts refs back at
//! the front; a terminal one settles them (the counter advances: they are lost, not pending).

use crate::channel::RefSource;
use crate::queue::RefQueue;
use crate::signal::StopSignal;
use ferry_core::{Error, Result, SampleId, SampleRef};
use ferry_store::{Clock, SystemClock};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How a [`StreamingRefQueue`] waits.
#[derive(Clone)]
pub struct StreamQueueOptions {
    /// Sleep between empty polls (SpecForge: 0.1 s).
    pub poll: Duration,
    /// Fail a `get` that sees no ref for this long while the channel is open (`None`: wait
    /// for ever, SpecForge's default).
    pub idle_timeout: Option<Duration>,
    /// Log one progress line per interval while a `get` is blocked (`None`: never).
    pub wait_log_interval: Option<Duration>,
    /// The clock (tests inject a manual one).
    pub clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for StreamQueueOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamQueueOptions")
            .field("poll", &self.poll)
            .field("idle_timeout", &self.idle_timeout)
            .field("wait_log_interval", &self.wait_log_interval)
            .finish()
    }
}

impl Default for StreamQueueOptions {
    fn default() -> Self {
        StreamQueueOptions {
            poll: Duration::from_millis(100),
            idle_timeout: None,
            wait_log_interval: Some(Duration::from_secs(30)),
            clock: Arc::new(SystemClock),
        }
    }
}

/// A channel as a consume-once queue with exact-prefix acknowledgements.
pub struct StreamingRefQueue {
    source: Arc<dyn RefSource>,
    options: StreamQueueOptions,
    state: Mutex<State>,
    /// Serializes `get`s: each polls the source and appends to the buffer.
    getter: Mutex<()>,
}

#[derive(Default)]
struct State {
    buffer: VecDeque<SampleRef>,
    /// Ids only: a retryable failure hands its refs back.
    in_flight: VecDeque<SampleId>,
}

impl std::fmt::Debug for StreamingRefQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamingRefQueue").field("source", &self.source.describe()).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl StreamingRefQueue {
    /// A queue over `source`.
    pub fn new(source: Arc<dyn RefSource>, options: StreamQueueOptions) -> Self {
        StreamingRefQueue { source, options, state: Mutex::new(State::default()), getter: Mutex::new(()) }
    }

    /// The source.
    pub fn source(&self) -> &Arc<dyn RefSource> {
        &self.source
    }

    fn blocking_get(&self, max: usize, stop: Option<&StopSignal>) -> Result<Vec<SampleRef>> {
        let _getter = lock(&self.getter);
        let clock = &self.options.clock;
        let mut idle_since = clock.now();
        let started = Instant::now();
        let mut last_log = started;
        loop {
            if stop.is_some_and(StopSignal::is_set) {
                return Ok(Vec::new());
            }
            if lock(&self.state).buffer.len() >= max {
                break;
            }
            let fresh = self.source.poll(None)?;
            if !fresh.is_empty() {
                lock(&self.state).buffer.extend(fresh);
                idle_since = clock.now();
                continue;
            }
            if let Some(e) = self.source.failure_error()? {
                return Err(e);
            }
            if self.source.is_closed()? {
                let last = self.source.poll(None)?;
                lock(&self.state).buffer.extend(last);
                break;
            }
            let idle = clock.now().saturating_duration_since(idle_since);
            if let Some(limit) = self.options.idle_timeout
                && idle >= limit
            {
                return Err(Error::timeout(
                    format!(
                        "refs on StreamingRefQueue {}: idle {:.1} s with the channel still open ({} dead?)",
                        self.source.describe(),
                        idle.as_secs_f64(),
                        self.source.upstream()
                    ),
                    idle,
                ));
            }
            if let Some(interval) = self.options.wait_log_interval
                && last_log.elapsed() >= interval
            {
                tracing::info!(
                    channel = %self.source.describe(),
                    waited_s = started.elapsed().as_secs(),
                    buffered = lock(&self.state).buffer.len(),
                    wanted = max,
                    "waiting for refs"
                );
                last_log = Instant::now();
            }
            match stop {
                Some(stop) => {
                    stop.wait_timeout(self.options.poll);
                }
                None => clock.sleep(self.options.poll),
            }
        }
        let mut state = lock(&self.state);
        let take = max.min(state.buffer.len());
        let refs: Vec<SampleRef> = state.buffer.drain(..take).collect();
        state.in_flight.extend(refs.iter().map(|r| r.sample_id.clone()));
        Ok(refs)
    }
}

impl RefQueue for StreamingRefQueue {
    /// Blocks until `max` refs are buffered or the stream ended (fewer, or none, only at the
    /// end). `timeout` is ignored: the queue's idle timeout governs, as in SpecForge.
    fn get(&self, max: usize, _timeout: Option<Duration>) -> Result<Vec<SampleRef>> {
        self.blocking_get(max, None)
    }

    fn get_interruptible(&self, max: usize, stop: &StopSignal) -> Result<Vec<SampleRef>> {
        self.blocking_get(max, Some(stop))
    }

    fn ack_ids(&self, ids: &[SampleId]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        {
            let mut state = lock(&self.state);
            let is_prefix =
                ids.len() <= state.in_flight.len() && state.in_flight.iter().zip(ids).all(|(leased, id)| leased == id);
            if !is_prefix {
                let expected: Vec<&str> = state.in_flight.iter().take(ids.len()).map(SampleId::as_str).collect();
                let got: Vec<&str> = ids.iter().map(SampleId::as_str).collect();
                return Err(Error::Protocol {
                    context: format!("StreamingRefQueue {}", self.source.describe()),
                    message: format!(
                        "stream acknowledgement is not the leased prefix: expected={expected:?}, got={got:?}"
                    ),
                });
            }
            state.in_flight.drain(..ids.len());
        }
        self.source.mark_consumed(ids.len() as u64)
    }

    fn fail(&self, refs: &[SampleRef], reason: &str, retryable: bool) -> Result<()> {
        if refs.is_empty() {
            return Ok(());
        }
        {
            let mut state = lock(&self.state);
            // Only refs this queue leased: settling or re-buffering anything else would count a
            // record twice or train a sample twice.
            let leased: std::collections::HashSet<&SampleId> = state.in_flight.iter().collect();
            let unknown: Vec<&str> =
                refs.iter().filter(|r| !leased.contains(&r.sample_id)).map(|r| r.sample_id.as_str()).collect();
            if !unknown.is_empty() {
                return Err(Error::Protocol {
                    context: format!("StreamingRefQueue {}", self.source.describe()),
                    message: format!("fail of refs that are not in flight: {unknown:?}"),
                });
            }
            let failed: std::collections::HashSet<&SampleId> = refs.iter().map(|r| &r.sample_id).collect();
            state.in_flight.retain(|id| !failed.contains(id));
            if retryable {
                for r in refs.iter().rev() {
                    state.buffer.push_front(r.clone());
                }
                tracing::debug!(channel = %self.source.describe(), refs = refs.len(), reason, "refs put back");
                return Ok(());
            }
        }
        tracing::warn!(channel = %self.source.describe(), refs = refs.len(), reason, "refs failed terminally");
        self.source.mark_consumed(refs.len() as u64)
    }

    fn depth(&self) -> usize {
        lock(&self.state).buffer.len()
    }

    fn in_flight_ids(&self) -> Vec<SampleId> {
        lock(&self.state).in_flight.iter().cloned().collect()
    }

    fn loader_close_retryable(&self) -> bool {
        true
    }
}
