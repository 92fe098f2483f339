//! [`StopSignal`]: a one-way, waitable stop flag shared between threads (Python's
//! `threading.Event` as SpecForge uses it): set once, observed by every waiter at once.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// A stop flag that waiters can sleep on. Cloning is by `Arc`.
#[derive(Debug, Default)]
pub struct StopSignal {
    set: Mutex<bool>,
    changed: Condvar,
}

impl StopSignal {
    /// A signal not yet set.
    pub fn new() -> StopSignal {
        StopSignal::default()
    }

    /// Sets the signal and wakes every waiter. Idempotent.
    pub fn set(&self) {
        let mut set = self.set.lock().unwrap_or_else(|p| p.into_inner());
        *set = true;
        self.changed.notify_all();
    }

    /// Whether the signal is set.
    pub fn is_set(&self) -> bool {
        *self.set.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sleeps until the signal is set or `timeout` passes; returns whether it is set.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut set = self.set.lock().unwrap_or_else(|p| p.into_inner());
        while !*set {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            set = self.changed.wait_timeout(set, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
        *set
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_set_signal_wakes_a_waiter_before_its_timeout() {
        let signal = Arc::new(StopSignal::new());
        assert!(!signal.wait_timeout(Duration::from_millis(1)));
        let waiter = {
            let signal = Arc::clone(&signal);
            std::thread::spawn(move || signal.wait_timeout(Duration::from_secs(30)))
        };
        signal.set();
        assert!(waiter.join().unwrap());
        assert!(signal.is_set());
        signal.set();
        assert!(signal.wait_timeout(Duration::ZERO));
    }
}
