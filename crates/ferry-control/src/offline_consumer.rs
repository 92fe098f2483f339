//! The disaggregated offline consumer's lifecycle (SpecForge's consumer side of §7.5): wait for
//! the producer's `.done` (failing at once on `.failed`), read the manifest, train, then agree
//! across the data-parallel ranks on the outcome. All ranks succeeded: rank 0 writes
//! `.consumed`, which releases a producer that holds its samples until then. Any rank failed:
//! `.consumer_failed` says which and why (the first failure wins), and every rank returns an
//! error, so no rank reports success for a run another rank did not finish. A rank whose
//! process died publishes nothing; the survivors see a lost peer ([`Error::is_peer_loss`]) and
//! publish nothing either: the consumer crashed as a whole and is run again.
//!
//! What a rank trains on (its DP shard of the manifest's refs, per epoch) is the feature
//! loader's business (`ferry_loader::DpSharding`); this module owns only the sentinels and the
//! agreement.

use crate::collective::Collective;
use crate::manifest::read_ref_manifest;
use crate::sentinel::OfflineControl;
use ferry_core::{Error, Result, SampleRef};
use std::time::{Duration, Instant};

/// Waits for `.done` (failing on `.failed`, and at `deadline` when given) and reads the
/// manifest's refs.
pub fn await_manifest(control: &OfflineControl, deadline: Option<Instant>, poll: Duration) -> Result<Vec<SampleRef>> {
    control.wait_for_done(deadline, poll)?;
    read_ref_manifest(control.manifest())
}

/// One rank of an offline consumer: [`await_manifest`], then `train` over the refs, then the
/// agreement of the module doc. `train`'s own error is what a failing rank returns; the other
/// ranks return [`Error::Collective`] naming the failed rank.
pub fn run_offline_rank<T>(
    control: &OfflineControl,
    collective: &dyn Collective,
    deadline: Option<Instant>,
    poll: Duration,
    train: impl FnOnce(Vec<SampleRef>) -> Result<T>,
) -> Result<T> {
    let rank = collective.rank();
    let outcome = await_manifest(control, deadline, poll).and_then(train);
    let mine = outcome.as_ref().err().map(Error::python_reason);
    let part = serde_json::to_vec(&mine).map_err(|e| Error::InvalidArgument(format!("encoding: {e}")))?;
    let parts = match collective.all_gather(part) {
        Ok(parts) => parts,
        Err(e) => {
            // The group broke. A peer's process is gone: the consumer crashed as a whole and
            // is simply run again (nothing terminal is published, so a holding producer keeps
            // its samples for it). This rank's own failure is still recorded.
            if let Some(reason) = mine {
                publish_failure(control, &format!("offline consumer rank {rank}: {reason}"));
            } else if !e.is_peer_loss() {
                publish_failure(control, &format!("offline consumer rank {rank}: {}", e.python_reason()));
            }
            return Err(outcome.err().unwrap_or(e));
        }
    };
    let mut failures = Vec::new();
    for (peer, part) in parts.iter().enumerate() {
        let failure: Option<String> = serde_json::from_slice(part)
            .map_err(|e| Error::Corrupt { what: format!("rank {peer}'s outcome"), message: e.to_string() })?;
        if let Some(reason) = failure {
            failures.push((peer, reason));
        }
    }
    if let Some((peer, reason)) = failures.first() {
        if rank == 0 {
            publish_failure(control, &format!("offline consumer rank {peer}: {reason}"));
        }
        return Err(outcome.err().unwrap_or_else(|| Error::Collective {
            message: format!("offline consumer rank {peer} failed: {reason}"),
        }));
    }
    if rank == 0 {
        control.mark_consumed()?;
    }
    outcome
}

/// Writes `.consumer_failed` unless a failure is already recorded there (the root cause wins);
/// a write error is logged, since the caller returns the failure itself.
fn publish_failure(control: &OfflineControl, reason: &str) {
    if let Some(first) = control.consumer_failure() {
        tracing::warn!(%first, later = %reason, "an offline consumer failure is already recorded");
        return;
    }
    if let Err(e) = control.mark_consumer_failed(reason) {
        tracing::error!(path = %control.consumer_failed_path().display(), error = %e, "could not record the consumer failure");
    }
}
