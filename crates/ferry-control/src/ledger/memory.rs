//! The two process-local ledgers: [`NoOpLedger`] (retains nothing) and [`InMemoryLedger`]
//! (maps under one lock, gone with the process).

use super::{DurableMarker, Ledger};
use ferry_core::{Error, Result, SampleId, SampleRef};
use indexmap::IndexMap;
use std::sync::{Mutex, MutexGuard};

/// SpecForge's `NoOpMetadataStore`: every commit is fresh (so the caller enqueues it), nothing
/// is retained and the marker is always empty. Used offline and by the online producer, whose
/// refs are tracked by the channel, not by a ledger.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoOpLedger;

impl Ledger for NoOpLedger {
    fn commit_samples(&self, refs: &[SampleRef]) -> Result<Vec<bool>> {
        Ok(vec![true; refs.len()])
    }

    fn commit_records(&self, records: &[(SampleId, String)]) -> Result<Vec<bool>> {
        Ok(vec![true; records.len()])
    }

    fn is_committed(&self, _id: &SampleId) -> Result<bool> {
        Ok(false)
    }

    fn get_committed(&self, _id: &SampleId) -> Result<Option<SampleRef>> {
        Ok(None)
    }

    fn committed_count(&self) -> Result<u64> {
        Ok(0)
    }

    fn all_committed_ids(&self) -> Result<Vec<SampleId>> {
        Ok(Vec::new())
    }

    fn record_train_ack(&self, _ids: &[SampleId], _global_step: Option<i64>, _optimizer_durable: bool) -> Result<()> {
        Ok(())
    }

    fn durable_marker(&self) -> Result<DurableMarker> {
        Ok(DurableMarker::default())
    }

    fn retains(&self) -> bool {
        false
    }
}

/// SpecForge's `InMemoryMetadataStore`: committed refs in commit order and the marker, under
/// one lock. Used by non-authority DP ranks (whose acknowledgements are throwaway) and for
/// local bookkeeping; not durable, so never valid for a resume.
#[derive(Debug, Default)]
pub struct InMemoryLedger {
    state: Mutex<InMemoryState>,
}

#[derive(Debug, Default)]
struct InMemoryState {
    /// Insertion order is the commit order that `all_committed_ids` reports.
    committed: IndexMap<SampleId, SampleRef>,
    marker: DurableMarker,
}

impl InMemoryLedger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> Result<MutexGuard<'_, InMemoryState>> {
        // A panic while the lock was held could only have come from inside an `IndexMap` or
        // `BTreeSet` insert, which may leave the maps inconsistent: refuse rather than guess.
        self.state.lock().map_err(|_| Error::Backend {
            backend: "memory".to_owned(),
            operation: "lock".to_owned(),
            key: "ledger".to_owned(),
            message: "the in-memory ledger's lock was poisoned by a panicking thread; its state is unknown".to_owned(),
        })
    }
}

impl Ledger for InMemoryLedger {
    fn commit_samples(&self, refs: &[SampleRef]) -> Result<Vec<bool>> {
        let mut state = self.state()?;
        let fresh = refs
            .iter()
            .map(|r| {
                if state.committed.contains_key(&r.sample_id) {
                    false
                } else {
                    state.committed.insert(r.sample_id.clone(), r.clone());
                    true
                }
            })
            .collect();
        Ok(fresh)
    }

    fn is_committed(&self, id: &SampleId) -> Result<bool> {
        Ok(self.state()?.committed.contains_key(id))
    }

    fn get_committed(&self, id: &SampleId) -> Result<Option<SampleRef>> {
        Ok(self.state()?.committed.get(id).cloned())
    }

    fn committed_count(&self) -> Result<u64> {
        Ok(self.state()?.committed.len() as u64)
    }

    fn all_committed_ids(&self) -> Result<Vec<SampleId>> {
        Ok(self.state()?.committed.keys().cloned().collect())
    }

    fn record_train_ack(&self, ids: &[SampleId], global_step: Option<i64>, optimizer_durable: bool) -> Result<()> {
        self.state()?.marker.record(ids, global_step, optimizer_durable);
        Ok(())
    }

    fn durable_marker(&self) -> Result<DurableMarker> {
        Ok(self.state()?.marker.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: &str) -> SampleRef {
        let json = format!(
            r#"{{"sample_id":"{id}","run_id":"r","source_task_id":null,"feature_store_uri":"mem://t/{id}","feature_keys":{{}},"feature_specs":{{}},"strategy":"eagle3"}}"#
        );
        ferry_core::json::sample_ref_from_str(&json).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn noop_is_always_fresh_and_never_retains() -> Result<()> {
        let ledger = NoOpLedger;
        assert_eq!(ledger.commit_samples(&[sample("a"), sample("a")])?, [true, true]);
        assert!(ledger.commit_sample(&sample("a"))?);
        assert!(!ledger.retains() && !ledger.is_durable());
        assert_eq!(ledger.committed_count()?, 0);
        Ok(())
    }

    #[test]
    fn in_memory_reports_repeats_as_stale() -> Result<()> {
        let ledger = InMemoryLedger::new();
        assert_eq!(ledger.commit_samples(&[sample("a"), sample("b"), sample("a")])?, [true, true, false]);
        assert!(!ledger.commit_sample(&sample("b"))?);
        assert_eq!(ledger.committed_count()?, 2);
        assert!(ledger.retains() && !ledger.is_durable());
        Ok(())
    }
}
