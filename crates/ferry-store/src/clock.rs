//! Time, injectable: the lifecycle core reads the time for max-hold GC and ages, and sleeps
//! between drain attempts. Tests use [`ManualClock`] so nothing sleeps for real.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A monotonic clock that can also sleep.
pub trait Clock: Send + Sync + 'static {
    /// Now.
    fn now(&self) -> Instant;
    /// Waits `d`.
    fn sleep(&self, d: Duration);
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }
}

/// A clock that moves only when told to; `sleep` advances it and records the duration.
#[derive(Debug, Clone)]
pub struct ManualClock {
    inner: Arc<Mutex<(Instant, Vec<Duration>)>>,
}

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock { inner: Arc::new(Mutex::new((Instant::now(), Vec::new()))) }
    }
}

impl ManualClock {
    /// A clock starting now.
    pub fn new() -> Self {
        Self::default()
    }
    /// Moves time forward.
    pub fn advance(&self, d: Duration) {
        if let Ok(mut g) = self.inner.lock() {
            g.0 += d;
        }
    }
    /// Every sleep so far.
    pub fn sleeps(&self) -> Vec<Duration> {
        self.inner.lock().map(|g| g.1.clone()).unwrap_or_default()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.inner.lock().map(|g| g.0).unwrap_or_else(|_| Instant::now())
    }
    fn sleep(&self, d: Duration) {
        if let Ok(mut g) = self.inner.lock() {
            g.0 += d;
            g.1.push(d);
        }
    }
}
