//! Producer flow control (`SPECFORGE-RUNTIME.md` §13.4): when an online producer must stop
//! submitting capture work because the consumer is behind.
//!
//! Two watermarks with hysteresis, on the refs in flight (published, not yet consumed) and,
//! optionally, on the feature bytes they keep resident. The producer pauses once either
//! measure reaches its high watermark and resumes only once every measure is back at or below
//! its low watermark, so it does not flap around a single threshold. The pause is latched in
//! [`ProducerFlowControl`]; [`FlowControlLimits`] holds the configuration.

use ferry_core::{Error, Result};
use serde::{Deserialize, Serialize};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// SpecForge's default high watermark on refs in flight.
pub const DEFAULT_HIGH_WATERMARK_REFS: i64 = 256;
/// SpecForge's default cap on the prompts one worker leases at a time.
pub const DEFAULT_MAX_PROMPT_LEASE_PER_WORKER: i64 = 8;

/// Flow-control configuration as given (from config or environment), before validation.
///
/// Signed, like the values a user can type: [`FlowControlLimits::resolve`] rejects the
/// negative ones with a message that names the setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowControlLimits {
    /// Pause when this many refs are in flight (at least 1).
    pub high_watermark_refs: i64,
    /// Resume when at most this many refs are in flight; `None` means the high watermark.
    pub low_watermark_refs: Option<i64>,
    /// Pause when this many feature bytes are resident; `None` disables the byte watermarks.
    pub high_watermark_bytes: Option<i64>,
    /// Resume when at most this many bytes are resident; `None` means the high byte watermark.
    pub low_watermark_bytes: Option<i64>,
    /// The most prompts one worker may lease at a time (at least 1).
    pub max_prompt_lease_per_worker: i64,
}

impl Default for FlowControlLimits {
    fn default() -> Self {
        FlowControlLimits {
            high_watermark_refs: DEFAULT_HIGH_WATERMARK_REFS,
            low_watermark_refs: None,
            high_watermark_bytes: None,
            low_watermark_bytes: None,
            max_prompt_lease_per_worker: DEFAULT_MAX_PROMPT_LEASE_PER_WORKER,
        }
    }
}

/// Validated limits with every default filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedFlowLimits {
    /// Pause at this many refs in flight.
    pub high_watermark_refs: u64,
    /// Resume at or below this many refs in flight.
    pub low_watermark_refs: u64,
    /// The byte watermarks, when configured.
    pub bytes: Option<ByteWatermarks>,
    /// The most prompts one worker may lease at a time.
    pub max_prompt_lease_per_worker: usize,
}

/// The resident-byte watermarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteWatermarks {
    /// Pause at this many resident bytes.
    pub high: u64,
    /// Resume at or below this many resident bytes.
    pub low: u64,
}

fn invalid(message: String) -> Error {
    Error::InvalidArgument(format!("flow control: {message}"))
}

impl FlowControlLimits {
    /// Checks SpecForge's rules and fills in the defaults: high refs ≥ 1; 0 ≤ low refs ≤ high
    /// refs; no low byte watermark without a high one; high bytes ≥ 1 and 0 ≤ low bytes ≤ high
    /// bytes; lease ≥ 1.
    pub fn resolve(&self) -> Result<ResolvedFlowLimits> {
        let high_refs = self.high_watermark_refs;
        if high_refs < 1 {
            return Err(invalid(format!("high_watermark_refs must be at least 1, got {high_refs}")));
        }
        let low_refs = self.low_watermark_refs.unwrap_or(high_refs);
        if !(0..=high_refs).contains(&low_refs) {
            return Err(invalid(format!(
                "low_watermark_refs must be between 0 and high_watermark_refs ({high_refs}), got {low_refs}"
            )));
        }
        let bytes = match (self.high_watermark_bytes, self.low_watermark_bytes) {
            (None, None) => None,
            (None, Some(low)) => {
                return Err(invalid(format!(
                    "low_watermark_bytes ({low}) is set but high_watermark_bytes is not; set both or neither"
                )));
            }
            (Some(high), low) => {
                if high < 1 {
                    return Err(invalid(format!("high_watermark_bytes must be at least 1, got {high}")));
                }
                let low = low.unwrap_or(high);
                if !(0..=high).contains(&low) {
                    return Err(invalid(format!(
                        "low_watermark_bytes must be between 0 and high_watermark_bytes ({high}), got {low}"
                    )));
                }
                Some(ByteWatermarks { high: high.unsigned_abs(), low: low.unsigned_abs() })
            }
        };
        let lease = self.max_prompt_lease_per_worker;
        let lease = usize::try_from(lease)
            .ok()
            .filter(|lease| *lease >= 1)
            .ok_or_else(|| invalid(format!("max_prompt_lease_per_worker must be at least 1, got {lease}")))?;
        // Every value was checked non-negative above, so `unsigned_abs` is the value itself.
        Ok(ResolvedFlowLimits {
            high_watermark_refs: high_refs.unsigned_abs(),
            low_watermark_refs: low_refs.unsigned_abs(),
            bytes,
            max_prompt_lease_per_worker: lease,
        })
    }
}

/// The producer's latched pause decision, shared by its worker threads.
#[derive(Debug)]
pub struct ProducerFlowControl {
    limits: ResolvedFlowLimits,
    state: Mutex<FlowState>,
}

#[derive(Debug, Default, Clone, Copy)]
struct FlowState {
    paused: bool,
    pause_transitions: u64,
    resume_transitions: u64,
    wait_checks: u64,
}

/// What [`ProducerFlowControl::snapshot`] reports: the flag, the counters and the resolved
/// limits, flat, with SpecForge's field names (for status output and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowControlSnapshot {
    /// Whether the producer is paused now.
    pub paused: bool,
    /// How many times it went from running to paused.
    pub pause_transitions: u64,
    /// How many times it went from paused to running.
    pub resume_transitions: u64,
    /// How many [`ProducerFlowControl::should_pause`] checks answered "pause".
    pub wait_checks: u64,
    /// Resolved high watermark on refs in flight.
    pub high_watermark_refs: u64,
    /// Resolved low watermark on refs in flight.
    pub low_watermark_refs: u64,
    /// Resolved high byte watermark, if any.
    pub high_watermark_bytes: Option<u64>,
    /// Resolved low byte watermark, if any.
    pub low_watermark_bytes: Option<u64>,
    /// The lease cap per worker.
    pub max_prompt_lease_per_worker: usize,
}

impl ProducerFlowControl {
    /// Flow control with validated `limits`, starting unpaused.
    pub fn new(limits: FlowControlLimits) -> Result<Self> {
        Ok(ProducerFlowControl { limits: limits.resolve()?, state: Mutex::new(FlowState::default()) })
    }

    /// The resolved limits.
    pub fn limits(&self) -> &ResolvedFlowLimits {
        &self.limits
    }

    fn state(&self) -> MutexGuard<'_, FlowState> {
        // The state is four plain values updated together without any call that can panic, so
        // a poisoned lock still guards a consistent state.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the producer must hold back now, given the refs in flight and the feature
    /// bytes they keep resident (negative inputs, from counters read at different moments,
    /// count as 0).
    ///
    /// Running, it pauses once refs reach the high watermark or (when configured) bytes reach
    /// the high byte watermark. Paused, it resumes only once refs are at or below the low
    /// watermark and (when configured) bytes at or below the low byte watermark. Every check
    /// that answers "pause", the one that paused included, counts as a wait check.
    pub fn should_pause(&self, in_flight_refs: i64, resident_bytes: i64) -> bool {
        let refs = in_flight_refs.max(0).unsigned_abs();
        let bytes = resident_bytes.max(0).unsigned_abs();
        let limits = &self.limits;
        let over_high = refs >= limits.high_watermark_refs || limits.bytes.is_some_and(|b| bytes >= b.high);
        let under_low = refs <= limits.low_watermark_refs && limits.bytes.is_none_or(|b| bytes <= b.low);
        let mut state = self.state();
        if !state.paused && over_high {
            state.paused = true;
            state.pause_transitions += 1;
        } else if state.paused && under_low {
            state.paused = false;
            state.resume_transitions += 1;
        }
        if state.paused {
            state.wait_checks += 1;
        }
        state.paused
    }

    /// Whether the producer is paused, as of the last check.
    pub fn is_paused(&self) -> bool {
        self.state().paused
    }

    /// How many prompts a worker asking for `requested` may lease: at most the per-worker cap.
    pub fn prompt_lease(&self, requested: usize) -> usize {
        requested.min(self.limits.max_prompt_lease_per_worker)
    }

    /// The flag, the counters and the resolved limits.
    pub fn snapshot(&self) -> FlowControlSnapshot {
        let state = *self.state();
        FlowControlSnapshot {
            paused: state.paused,
            pause_transitions: state.pause_transitions,
            resume_transitions: state.resume_transitions,
            wait_checks: state.wait_checks,
            high_watermark_refs: self.limits.high_watermark_refs,
            low_watermark_refs: self.limits.low_watermark_refs,
            high_watermark_bytes: self.limits.bytes.map(|b| b.high),
            low_watermark_bytes: self.limits.bytes.map(|b| b.low),
            max_prompt_lease_per_worker: self.limits.max_prompt_lease_per_worker,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_resolve_to_specforges() -> Result<()> {
        let limits = FlowControlLimits::default().resolve()?;
        assert_eq!(limits.high_watermark_refs, 256);
        assert_eq!(limits.low_watermark_refs, 256, "low defaults to high");
        assert_eq!(limits.bytes, None);
        assert_eq!(limits.max_prompt_lease_per_worker, 8);
        Ok(())
    }

    #[test]
    fn low_byte_watermark_defaults_to_high() -> Result<()> {
        let limits = FlowControlLimits { high_watermark_bytes: Some(100), ..FlowControlLimits::default() };
        assert_eq!(limits.resolve()?.bytes, Some(ByteWatermarks { high: 100, low: 100 }));
        Ok(())
    }

    #[test]
    fn negative_inputs_count_as_zero() -> Result<()> {
        let flow = ProducerFlowControl::new(FlowControlLimits {
            high_watermark_refs: 1,
            low_watermark_refs: Some(0),
            ..FlowControlLimits::default()
        })?;
        assert!(!flow.should_pause(-5, -1));
        assert!(flow.should_pause(1, 0));
        assert!(!flow.should_pause(-3, 0), "-3 refs is 0, at the low watermark: resume");
        Ok(())
    }
}
