//! What the lifecycle core reports: health, GC sweeps, drains, and the drain policy.

use crate::backend::BackendUsage;
use ferry_core::{Error, Result};
use std::time::Duration;

/// A snapshot of a store's lifecycle state (SpecForge's `health()` keys, plus ferry's).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Health {
    /// The store.
    pub store_id: String,
    /// Backend kind.
    pub backend: String,
    /// Live samples this store wrote or adopted, plus samples whose removal is pending.
    pub resident_samples: u64,
    /// Read leases held.
    pub active_leases: u64,
    /// Bytes this store holds (its budget's view).
    pub resident_bytes: u64,
    /// Bytes admitted for puts still writing.
    pub reserved_bytes: u64,
    /// The budget.
    pub max_resident_bytes: Option<u64>,
    /// Removals that failed and wait for `gc` or `drain`.
    pub release_pending: u64,
    /// Age of the oldest live sample, seconds (0.0 when empty).
    pub oldest_age_s: f64,
    /// Mean age of live samples, seconds (0.0 when empty).
    pub avg_age_s: f64,
    /// Samples freed by GC or drain over the store's life.
    pub force_freed_total: u64,
    /// Whether a credential is required.
    pub auth_required: bool,
    /// External capture attempts tracked but not adopted.
    pub provisional_external: u64,
    /// Whether release keeps the bytes (offline, re-iterable data).
    pub retain_on_release: bool,
    /// Residency as the backend itself sees it, where it can tell (disk truth).
    pub backend_usage: Option<BackendUsage>,
}

/// One GC sweep's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct GcReport {
    /// Samples freed by this sweep (max-hold or retried removals).
    pub force_freed: u64,
    /// Their bytes.
    pub force_freed_bytes: u64,
    /// Removals still pending after the sweep.
    pub release_pending: u64,
}

/// A successful drain's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct DrainReport {
    /// Samples removed.
    pub removed: u64,
    /// Their bytes.
    pub removed_bytes: u64,
    /// Always 0 on success.
    pub release_pending: u64,
    /// Attempts run.
    pub attempts: u32,
}

/// How hard a drain tries: SpecForge's defaults are 8 attempts, 0.25 s apart (1.75 s of sleeps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainPolicy {
    /// Attempts, at least 1.
    pub max_attempts: u32,
    /// Sleep between attempts (not after the last).
    pub retry_interval: Duration,
}

impl Default for DrainPolicy {
    fn default() -> Self {
        DrainPolicy { max_attempts: 8, retry_interval: Duration::from_millis(250) }
    }
}

impl DrainPolicy {
    pub(crate) fn validate(&self) -> Result<()> {
        if self.max_attempts < 1 {
            return Err(Error::InvalidArgument("drain needs max_attempts >= 1".into()));
        }
        Ok(())
    }
}
