//! The metadata stores (SpecForge's `MetadataStore`, `SPECFORGE-RUNTIME.md` §13.2): which
//! samples were committed (their refs, in commit order), which were acknowledged by the
//! trainer, and the durable marker (`global_step`, `optimizer_durable`) that restart
//! reconciliation reads.
//!
//! One trait, [`Ledger`], three implementations:
//!
//! * [`NoOpLedger`] — commits are always fresh and nothing is retained. For the offline path
//!   and the online producer, which never resume from a ledger.
//! * [`InMemoryLedger`] — maps under a lock. For non-authority DP ranks and local bookkeeping;
//!   gone with the process, so it can never back a resume.
//! * [`SqliteLedger`] — the canonical online consumer ledger (written by rank 0 only), with
//!   SpecForge's exact schema, pragmas and JSON spelling, so ferry and SpecForge read and extend
//!   each other's databases.
//!
//! [`Ledger::retains`] and [`Ledger::is_durable`] let callers enforce the spec's rules: a
//! consumer refuses a ledger that retains nothing, and a resume refuses one that is not durable.

mod memory;
mod sqlite;

pub use memory::{InMemoryLedger, NoOpLedger};
pub use sqlite::SqliteLedger;

use ferry_core::{Error, Result, SampleId, SampleRef};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// What the trainer has durably acknowledged, as restart reconciliation reads it.
///
/// `acked` is a [`BTreeSet`]: SpecForge's marker holds a set, which has no order, and a sorted
/// set makes the marker compare, print and serialize the same way every time. The commit order
/// lives in [`Ledger::all_committed_ids`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DurableMarker {
    /// Every id ever acknowledged (the union over all [`Ledger::record_train_ack`] calls).
    pub acked: BTreeSet<SampleId>,
    /// The last global step given to an acknowledgement; `None` until one is given.
    pub global_step: Option<i64>,
    /// Whether the last acknowledgement was made at an optimizer-durable boundary.
    pub optimizer_durable: bool,
}

impl DurableMarker {
    /// Folds one acknowledgement into the marker with SpecForge's semantics: ids are a
    /// cumulative union, `global_step` is replaced only when a value is given, and
    /// `optimizer_durable` is overwritten by every call.
    pub fn record(&mut self, ids: &[SampleId], global_step: Option<i64>, optimizer_durable: bool) {
        self.acked.extend(ids.iter().cloned());
        if global_step.is_some() {
            self.global_step = global_step;
        }
        self.optimizer_durable = optimizer_durable;
    }
}

/// A metadata store: the record of committed samples and durable acknowledgements.
///
/// Implementations are shared between threads (the controller's callers and the trainer's
/// acknowledgement path); every method takes `&self`.
pub trait Ledger: Send + Sync {
    /// Commits a batch of refs and says, per ref and in order, whether it was fresh (not
    /// committed before). A ref repeated inside the batch is fresh at most once. Durable
    /// ledgers commit the whole batch in one transaction and, on any failure, keep none of it.
    fn commit_samples(&self, refs: &[SampleRef]) -> Result<Vec<bool>>;

    /// Commits one ref; `true` when it was fresh.
    fn commit_sample(&self, r: &SampleRef) -> Result<bool> {
        match self.commit_samples(std::slice::from_ref(r))?.as_slice() {
            [fresh] => Ok(*fresh),
            flags => Err(Error::Protocol {
                context: "ledger commit_sample".to_owned(),
                message: format!("a batch of one ref returned {} freshness flags", flags.len()),
            }),
        }
    }

    /// [`Ledger::commit_samples`] for refs given as `(sample id, SpecForge's spaced ref JSON)`,
    /// the form the SQLite ledger stores: the distributor commits channel records this way
    /// without building the refs. The default parses each record and commits the refs.
    fn commit_records(&self, records: &[(SampleId, String)]) -> Result<Vec<bool>> {
        let refs =
            records.iter().map(|(_, json)| ferry_core::json::sample_ref_from_str(json)).collect::<Result<Vec<_>>>()?;
        self.commit_samples(&refs)
    }

    /// Whether `id` was committed.
    fn is_committed(&self, id: &SampleId) -> Result<bool>;

    /// The ref committed under `id`, if any.
    fn get_committed(&self, id: &SampleId) -> Result<Option<SampleRef>>;

    /// How many samples were committed.
    fn committed_count(&self) -> Result<u64>;

    /// Every committed id, in the order the ids were first committed.
    fn all_committed_ids(&self) -> Result<Vec<SampleId>>;

    /// Records a trainer acknowledgement: adds `ids` to the acked set and updates the marker
    /// (see [`DurableMarker::record`]), all at once: a durable ledger never shows the ids
    /// without the marker or the other way round.
    fn record_train_ack(&self, ids: &[SampleId], global_step: Option<i64>, optimizer_durable: bool) -> Result<()>;

    /// The current durable marker.
    fn durable_marker(&self) -> Result<DurableMarker>;

    /// Whether the ledger keeps what is committed (`false` only for [`NoOpLedger`]). A
    /// consumer needs one that does.
    fn retains(&self) -> bool {
        true
    }

    /// Whether what is committed survives the process (`true` only for [`SqliteLedger`]). A
    /// resume needs one that does.
    fn is_durable(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_record_unions_ids_keeps_step_without_value_and_overwrites_durability() {
        let mut marker = DurableMarker::default();
        marker.record(&["b".into(), "a".into()], Some(3), true);
        marker.record(&["a".into(), "c".into()], None, false);
        let acked: Vec<&str> = marker.acked.iter().map(SampleId::as_str).collect();
        assert_eq!(acked, ["a", "b", "c"]);
        assert_eq!(marker.global_step, Some(3));
        assert!(!marker.optimizer_durable);
        marker.record(&[], Some(1), true);
        assert_eq!(marker.global_step, Some(1), "a given step replaces the old one, even a larger one");
        assert!(marker.optimizer_durable);
    }
}
