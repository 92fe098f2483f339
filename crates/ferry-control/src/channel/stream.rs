//! [`RefStream`]: a source read as a blocking stream of ref batches that ends at a clean end of
//! stream, fails at the writer's failure (refs appended before it are yielded first), and gives
//! up after an optional idle timeout (SpecForge's `StreamingRefChannel.stream`).

use super::RefSource;
use ferry_core::{Error, Result, SampleRef};
use ferry_store::{Clock, SystemClock};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How a [`RefStream`] waits.
#[derive(Clone)]
pub struct StreamOptions {
    /// Sleep between empty polls.
    pub poll: Duration,
    /// Give up after this long without a ref while the channel is still open.
    pub idle_timeout: Option<Duration>,
    /// The clock (tests inject a manual one).
    pub clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for StreamOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamOptions").field("poll", &self.poll).field("idle_timeout", &self.idle_timeout).finish()
    }
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions { poll: Duration::from_millis(250), idle_timeout: None, clock: Arc::new(SystemClock) }
    }
}

/// The blocking iterator over a source: each item is the batch of refs one poll found.
pub struct RefStream<'a> {
    source: &'a dyn RefSource,
    options: StreamOptions,
    idle_since: Instant,
    done: bool,
}

impl<'a> RefStream<'a> {
    /// Streams `source`.
    pub fn new(source: &'a dyn RefSource, options: StreamOptions) -> Self {
        let idle_since = options.clock.now();
        RefStream { source, options, idle_since, done: false }
    }

    fn step(&mut self) -> Result<Option<Vec<SampleRef>>> {
        loop {
            let refs = self.source.poll(None)?;
            if !refs.is_empty() {
                self.idle_since = self.options.clock.now();
                return Ok(Some(refs));
            }
            if let Some(e) = self.source.failure_error()? {
                return Err(e);
            }
            if self.source.is_closed()? {
                // A last ref may land between the empty poll and the close.
                let last = self.source.poll(None)?;
                return Ok(if last.is_empty() { None } else { Some(last) });
            }
            let idle = self.options.clock.now().saturating_duration_since(self.idle_since);
            if let Some(limit) = self.options.idle_timeout
                && idle >= limit
            {
                return Err(Error::timeout(
                    format!(
                        "refs on {}: none for {:.1} s and the channel is not closed ({} dead?)",
                        self.source.describe(),
                        idle.as_secs_f64(),
                        self.source.upstream()
                    ),
                    idle,
                ));
            }
            self.options.clock.sleep(self.options.poll);
        }
    }
}

impl Iterator for RefStream<'_> {
    type Item = Result<Vec<SampleRef>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.step() {
            Ok(Some(refs)) => Some(Ok(refs)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}
