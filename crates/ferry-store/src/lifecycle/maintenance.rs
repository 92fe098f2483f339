//! Reclaiming what release could not: max-hold GC, retries of failed removals, and bounded
//! drains that fail loudly.
//!
//! Retry rule, one for every backend: `gc` retries a pending removal without forcing while its
//! attempts are below `max_release_attempts`, then forces one removal per sweep; an entry whose
//! forced removal also fails is kept (never dropped). `drain` forces every attempt and probes
//! `exists` only on its final attempt (a probe can renew a backend's read lease, so retry loops
//! never probe). This satisfies both SpecForge's local store (force-free at the bound) and its
//! Mooncake store (keep what cannot be removed; the drain owns the loud failure).

use super::index::{FreeJob, Origin};
use super::{DrainPolicy, DrainReport, FeatureStore, GcReport, lock};
use crate::backend::SampleKey;
use ferry_core::{Error, Generation, Result, SampleId};
use std::sync::atomic::Ordering;

impl FeatureStore {
    /// One GC sweep: frees samples held longer than `max_hold_age` (never one whose live
    /// generation is leased), then retries pending removals.
    pub fn gc(&self) -> GcReport {
        let mut report = GcReport::default();
        if let Some(max_hold) = self.inner.options.max_hold_age {
            let now = self.now();
            let mut jobs = Vec::new();
            self.inner.index.for_each_shard(|shard| {
                for (sid, entry) in shard.iter_mut() {
                    let expired = entry.live.as_ref().is_some_and(|l| {
                        l.origin != Origin::Observed
                            && now.saturating_duration_since(l.since) > max_hold
                            && !entry.leased(l.generation)
                    });
                    if expired {
                        jobs.extend(FreeJob::take_live(sid, entry));
                    }
                }
            });
            for job in jobs {
                let bytes = job.accounted;
                if self.run_free(job, false) {
                    report.force_freed += 1;
                    report.force_freed_bytes += bytes;
                }
            }
        }
        let keys: Vec<(SampleId, Generation)> = lock(&self.inner.pending).keys().cloned().collect();
        let bound = self.inner.options.max_release_attempts;
        for key in keys {
            let Some(entry) = lock(&self.inner.pending).get_mut(&key).map(|p| {
                p.attempts = (p.attempts + 1).min(bound);
                p.clone()
            }) else {
                continue;
            };
            let force = entry.attempts >= bound;
            if let Ok(bytes) = self.retry_pending(&key, &entry.names, force, false) {
                report.force_freed += 1;
                report.force_freed_bytes += bytes;
            }
        }
        report.release_pending = lock(&self.inner.pending).len() as u64;
        self.inner.stats.force_freed_total.fetch_add(report.force_freed, Ordering::Relaxed);
        report
    }

    /// One removal attempt of a pending entry; on success it is settled and its bytes returned.
    fn retry_pending(&self, key: &(SampleId, Generation), names: &[String], force: bool, confirm: bool) -> Result<u64> {
        let (sid, generation) = key;
        let sample = SampleKey { store_id: &self.inner.store_id, sample_id: sid, generation: *generation };
        let outcome = self.inner.backend.remove(sample, names, force).or_else(|e| {
            // Final drain attempt only: if every object is already absent, it is removed.
            let absent =
                confirm && names.iter().all(|n| matches!(self.inner.backend.exists(sample.object(n)), Ok(false)));
            if absent { Ok(crate::backend::Removal::Removed) } else { Err(e) }
        });
        match outcome {
            Ok(_) => {
                let accounted = lock(&self.inner.pending).shift_remove(key).map_or(0, |p| p.accounted);
                self.settle(sid, *generation, accounted);
                Ok(accounted)
            }
            Err(e) => {
                if let Some(p) = lock(&self.inner.pending).get_mut(key) {
                    p.last_error = e.to_string();
                }
                Err(e)
            }
        }
    }

    /// Retries every pending removal with forced removes, `policy.max_attempts` times, sleeping
    /// `policy.retry_interval` between attempts. Fails with [`Error::DrainIncomplete`] (naming
    /// the pending samples and the last errors) if any remain; their bookkeeping is kept.
    pub fn drain(&self, policy: DrainPolicy) -> Result<DrainReport> {
        self.drain_where(policy, |_| true)
    }

    /// [`FeatureStore::drain`] restricted to `sample_ids` (at an optimizer boundary only durably
    /// acknowledged samples may be force-removed; prefetched ones must survive for replay).
    pub fn drain_samples(&self, sample_ids: &[SampleId], policy: DrainPolicy) -> Result<DrainReport> {
        let wanted: std::collections::HashSet<&SampleId> = sample_ids.iter().collect();
        if wanted.is_empty() {
            policy.validate()?;
            return Ok(DrainReport::default());
        }
        self.drain_where(policy, |sid| wanted.contains(sid))
    }

    fn drain_where(&self, policy: DrainPolicy, select: impl Fn(&SampleId) -> bool) -> Result<DrainReport> {
        policy.validate()?;
        let mut report = DrainReport::default();
        let bound = self.inner.options.max_release_attempts;
        for attempt in 1..=policy.max_attempts {
            let targets: Vec<_> = lock(&self.inner.pending)
                .iter()
                .filter(|((sid, _), _)| select(sid))
                .map(|(k, p)| (k.clone(), p.names.clone()))
                .collect();
            if targets.is_empty() {
                report.attempts = attempt - 1;
                return Ok(report);
            }
            let last = attempt == policy.max_attempts;
            for (key, names) in &targets {
                match self.retry_pending(key, names, true, last) {
                    Ok(bytes) => {
                        report.removed += 1;
                        report.removed_bytes += bytes;
                        self.inner.stats.force_freed_total.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        if let Some(p) = lock(&self.inner.pending).get_mut(key) {
                            p.attempts = (p.attempts + 1).min(bound);
                        }
                    }
                }
            }
            report.attempts = attempt;
            let remaining = lock(&self.inner.pending).keys().filter(|(sid, _)| select(sid)).count();
            if remaining == 0 {
                return Ok(report);
            }
            if !last && !policy.retry_interval.is_zero() {
                self.inner.options.clock.sleep(policy.retry_interval);
            }
        }
        let pending = lock(&self.inner.pending);
        let stuck: Vec<_> = pending.iter().filter(|((sid, _), _)| select(sid)).collect();
        Err(Error::DrainIncomplete {
            store_id: self.inner.store_id.to_string(),
            pending: stuck.len(),
            attempts: policy.max_attempts,
            sample_ids: stuck.iter().take(16).map(|((sid, g), _)| format!("{sid}@g{g}")).collect(),
            last_errors: stuck.iter().take(4).map(|(_, p)| p.last_error.clone()).collect(),
        })
    }
}
