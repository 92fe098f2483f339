//! [`DpAckController`]: the data-parallel durable acknowledgement (SpecForge's
//! `DPAckController`, §13.3). Every rank calls [`DpAckController::ack_train_refs`] at every
//! optimizer boundary, in lockstep, with the ids it trained since the last one. The order is
//! the protocol:
//!
//! 1. the ranks' ids are gathered into one rank-ordered union;
//! 2. rank 0 (the authority) commits the union and the marker in ONE durable ledger
//!    transaction;
//! 3. rank 0's commit error is broadcast: if it failed, every rank fails identically and
//!    nothing is deleted;
//! 4. at an optimizer-durable boundary each rank aborts the features of ITS OWN ids in its
//!    store and drains exactly those removals;
//! 5. the ranks' cleanup errors are gathered: any one fails every rank identically (the ack
//!    itself stays committed);
//! 6. only after this returns does the trainer acknowledge its inbox, so producer backpressure
//!    and restart accounting never run ahead of durable optimizer progress.

use crate::collective::Collective;
use crate::controller::DataFlowController;
use ferry_core::{Error, Result, SampleId};
use ferry_store::{DrainPolicy, FeatureStoreApi};
use std::collections::HashSet;
use std::sync::Arc;

/// The reason features are aborted at a durable boundary.
pub const DURABLE_ACK_ABORT_REASON: &str = "optimizer-boundary-durable-ack";

/// One rank's side of the durable acknowledgement.
pub struct DpAckController {
    controller: Arc<DataFlowController>,
    collective: Arc<dyn Collective>,
    store: Option<Arc<dyn FeatureStoreApi>>,
    drain: DrainPolicy,
}

impl std::fmt::Debug for DpAckController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpAckController")
            .field("rank", &self.collective.rank())
            .field("world", &self.collective.world_size())
            .finish()
    }
}

/// Ids in order, each once.
fn dedup(ids: &[SampleId]) -> Vec<SampleId> {
    let mut seen = HashSet::with_capacity(ids.len());
    ids.iter().filter(|id| seen.insert(*id)).cloned().collect()
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| Error::InvalidArgument(format!("encoding a collective part: {e}")))
}

fn decode<T: serde::de::DeserializeOwned>(part: &[u8], rank: usize) -> Result<T> {
    serde_json::from_slice(part)
        .map_err(|e| Error::Corrupt { what: format!("collective part from rank {rank}"), message: e.to_string() })
}

/// The rank-ordered union of every rank's `ids`, first occurrences kept (SpecForge's
/// `gather_id_union`). With one rank it is the identity.
pub fn gather_id_union(collective: &dyn Collective, ids: &[SampleId]) -> Result<Vec<SampleId>> {
    if collective.world_size() == 1 {
        return Ok(ids.to_vec());
    }
    let parts = collective.all_gather(encode(&ids)?)?;
    let mut seen = HashSet::new();
    let mut union = Vec::new();
    for (rank, part) in parts.iter().enumerate() {
        for id in decode::<Vec<SampleId>>(part, rank)? {
            if seen.insert(id.clone()) {
                union.push(id);
            }
        }
    }
    Ok(union)
}

impl DpAckController {
    /// One rank's controller. Rank 0 (`collective.rank() == 0`) is the authority and must hold
    /// the durable ledger; other ranks hold a throwaway one. `store` is the rank's own store
    /// client, whose features are deleted at durable boundaries.
    pub fn new(
        controller: Arc<DataFlowController>,
        collective: Arc<dyn Collective>,
        store: Option<Arc<dyn FeatureStoreApi>>,
    ) -> Self {
        DpAckController { controller, collective, store, drain: DrainPolicy::default() }
    }

    /// Whether this rank is the authority (rank 0).
    pub fn is_authority(&self) -> bool {
        self.collective.rank() == 0
    }

    /// The rank's controller.
    pub fn controller(&self) -> &Arc<DataFlowController> {
        &self.controller
    }

    /// The durable acknowledgement at an optimizer boundary; see the module docs for the order.
    /// Call it on every rank at every boundary, with the ids this rank trained since the last.
    pub fn ack_train_refs(
        &self,
        trainer: &str,
        ids: &[SampleId],
        global_step: Option<i64>,
        optimizer_durable: bool,
    ) -> Result<()> {
        let local = dedup(ids);
        let union = gather_id_union(self.collective.as_ref(), &local)?;
        let commit_error = if self.is_authority() {
            self.controller
                .ack_train_refs(trainer, &union, global_step, optimizer_durable)
                .err()
                .map(|e| e.python_reason())
        } else {
            None
        };
        let commit_error: Option<String> = decode(&self.collective.broadcast_from_rank0(encode(&commit_error)?)?, 0)?;
        if let Some(e) = commit_error {
            return Err(Error::Collective { message: format!("durable DP acknowledgement failed: {e}") });
        }
        let mut cleanup: Option<String> = None;
        if optimizer_durable && let Some(store) = &self.store {
            let mut failures = Vec::new();
            for id in &local {
                if let Err(e) = store.abort(id) {
                    failures.push(format!("abort {id} ({DURABLE_ACK_ABORT_REASON}): {e}"));
                }
            }
            if let Err(e) = store.drain_samples(&local, self.drain) {
                failures.push(format!("optimizer-boundary selective drain: {e}"));
            }
            if !failures.is_empty() {
                cleanup = Some(failures.join(", "));
            }
        }
        let parts = self.collective.all_gather(encode(&cleanup)?)?;
        let mut errors = Vec::new();
        for (rank, part) in parts.iter().enumerate() {
            if let Some(e) = decode::<Option<String>>(part, rank)? {
                errors.push(format!("rank {rank}: {e}"));
            }
        }
        if !errors.is_empty() {
            return Err(Error::Collective {
                message: format!(
                    "durable DP acknowledgement committed, but rank-local feature cleanup failed: {}",
                    errors.join("; ")
                ),
            });
        }
        Ok(())
    }
}
