//! Fault injection for the fault suite (`tests/faults.rs`): the hidden `--fault <point>` flag of
//! `ferry produce`, `ferry consume` and `ferry ingest`. A fault fires as a crash does:
//! `std::process::abort()`, with no cleanup and no sentinel, after one line on stderr saying
//! which point fired (so a test can tell the injected crash from a real one).
//!
//! | point | roles | fires |
//! | --- | --- | --- |
//! | `put:N` | produce, ingest | on the N-th `put` through the role's store, after the store took the sample and before its ref is published ([`FaultyStore`]) |
//! | `publish:N` | produce (`--workers 1`) | at the start of the first capture call after N samples were captured, hence published (`crate::online::Synthetic`) |
//! | `cleanup` | produce, ingest | on the first `abort` through the store: the producer's always-run cleanup (§14.2), ingest's hold or failure cleanup ([`FaultyStore`]) |
//! | `before-ack:K` | consume (online) | after training optimizer step K, before its durable ack |
//! | `after-ack:K` | consume (online) | after step K's durable ack, before the checkpoint is saved |
//! | `after-checkpoint:K` | consume (online) | after step K's checkpoint is saved |
//! | `train:N` | consume (offline) | after this rank trained its N-th batch |
//!
//! Consumer points fire on rank 0, or on this process's rank when `--rank` is given.

use ferry_core::{FeatureHandle, FeatureSpec, Generation, JsonMap, Result, SampleId, SampleRef, StoreId};
use ferry_core::{TensorBuf, TensorView};
use ferry_store::{DrainPolicy, DrainReport, FeatureStoreApi, GcReport, Health};
use indexmap::IndexMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Where an injected crash fires (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// On the N-th put, before it is published.
    Put(u64),
    /// Once N samples were published.
    Publish(u64),
    /// On the first abort through the store.
    Cleanup,
    /// After training step K, before its durable ack.
    BeforeAck(i64),
    /// After step K's durable ack, before its checkpoint.
    AfterAck(i64),
    /// After step K's checkpoint.
    AfterCheckpoint(i64),
    /// After an offline rank's N-th batch.
    Train(u64),
}

impl Fault {
    /// Parses `put:N`, `publish:N`, `cleanup`, `before-ack:K`, `after-ack:K`,
    /// `after-checkpoint:K`, `train:N` (N, K at least 1).
    pub(crate) fn parse(s: &str) -> Result<Fault, String> {
        let (name, arg) = match s.split_once(':') {
            Some((name, arg)) => (name, Some(arg)),
            None => (s, None),
        };
        let count = |what: &str| -> Result<u64, String> {
            let arg = arg.ok_or_else(|| format!("{name} needs a count: {name}:{what}"))?;
            arg.parse::<u64>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| format!("{name}:{arg}: {what} must be a positive integer"))
        };
        let step = |what: &str| count(what).and_then(|n| i64::try_from(n).map_err(|e| e.to_string()));
        match name {
            "put" => count("N").map(Fault::Put),
            "publish" => count("N").map(Fault::Publish),
            "cleanup" if arg.is_none() => Ok(Fault::Cleanup),
            "cleanup" => Err("cleanup takes no count".into()),
            "before-ack" => step("K").map(Fault::BeforeAck),
            "after-ack" => step("K").map(Fault::AfterAck),
            "after-checkpoint" => step("K").map(Fault::AfterCheckpoint),
            "train" => count("N").map(Fault::Train),
            _ => Err(format!(
                "unknown fault point {s:?}: expected put:N, publish:N, cleanup, before-ack:K, after-ack:K, \
                 after-checkpoint:K or train:N"
            )),
        }
    }

    /// Whether `role` (`produce`, `ingest`, `consume`) has this point; `Err` names the ones it has.
    pub(crate) fn check_role(self, role: &str) -> anyhow::Result<()> {
        let ok = match role {
            "produce" => matches!(self, Fault::Put(_) | Fault::Publish(_) | Fault::Cleanup),
            "ingest" => matches!(self, Fault::Put(_) | Fault::Cleanup),
            _ => matches!(self, Fault::BeforeAck(_) | Fault::AfterAck(_) | Fault::AfterCheckpoint(_) | Fault::Train(_)),
        };
        let points = match role {
            "produce" => "put:N, publish:N, cleanup",
            "ingest" => "put:N, cleanup",
            _ => "before-ack:K, after-ack:K, after-checkpoint:K (online), train:N (offline)",
        };
        if ok { Ok(()) } else { anyhow::bail!("--fault {self}: ferry {role} injects only {points}") }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Put(n) => write!(f, "put:{n}"),
            Fault::Publish(n) => write!(f, "publish:{n}"),
            Fault::Cleanup => write!(f, "cleanup"),
            Fault::BeforeAck(k) => write!(f, "before-ack:{k}"),
            Fault::AfterAck(k) => write!(f, "after-ack:{k}"),
            Fault::AfterCheckpoint(k) => write!(f, "after-checkpoint:{k}"),
            Fault::Train(n) => write!(f, "train:{n}"),
        }
    }
}

/// Crashes the process now, as the fault `fault` injects it: one line on stderr, then
/// `abort()` (no destructors, no cleanup, no sentinel).
pub(crate) fn fire(fault: Fault) -> ! {
    eprintln!("ferry: injected fault {fault} fired: aborting (a crash: no cleanup, no sentinel)");
    std::process::abort()
}

/// A store that forwards every call to `inner`, crashing at the store faults: `put:N` after
/// the N-th put (or put_until) succeeded, `cleanup` on the first abort.
pub(crate) struct FaultyStore {
    inner: Arc<dyn FeatureStoreApi>,
    fault: Fault,
    puts: AtomicU64,
}

impl FaultyStore {
    /// `inner` wrapped when `fault` is a store fault; otherwise `inner` itself.
    pub(crate) fn wrap(inner: Arc<dyn FeatureStoreApi>, fault: Option<Fault>) -> Arc<dyn FeatureStoreApi> {
        match fault {
            Some(fault @ (Fault::Put(_) | Fault::Cleanup)) => {
                Arc::new(FaultyStore { inner, fault, puts: AtomicU64::new(0) })
            }
            _ => inner,
        }
    }

    /// Counts a successful put; fires on the N-th.
    fn counted(&self, put: Result<SampleRef>) -> Result<SampleRef> {
        if put.is_ok()
            && let Fault::Put(n) = self.fault
            && self.puts.fetch_add(1, Ordering::SeqCst) + 1 == n
        {
            fire(self.fault);
        }
        put
    }
}

impl FeatureStoreApi for FaultyStore {
    fn store_id(&self) -> &StoreId {
        self.inner.store_id()
    }
    fn put(&self, sample_id: &str, tensors: &[(&str, TensorView<'_>)], metadata: JsonMap) -> Result<SampleRef> {
        self.counted(self.inner.put(sample_id, tensors, metadata))
    }
    fn put_until(
        &self,
        sample_id: &str,
        tensors: &[(&str, TensorView<'_>)],
        metadata: JsonMap,
        deadline: Instant,
    ) -> Result<SampleRef> {
        self.counted(self.inner.put_until(sample_id, tensors, metadata, deadline))
    }
    fn get(&self, r: &SampleRef, names: Option<&[&str]>) -> Result<(IndexMap<String, TensorBuf>, FeatureHandle)> {
        self.inner.get(r, names)
    }
    fn get_into(&self, r: &SampleRef, dsts: &mut [(&str, &mut [u8])]) -> Result<FeatureHandle> {
        self.inner.get_into(r, dsts)
    }
    fn get_prefix_into(&self, r: &SampleRef, dsts: &mut [(&str, &mut [u8])]) -> Result<FeatureHandle> {
        self.inner.get_prefix_into(r, dsts)
    }
    fn describe(&self, r: &SampleRef) -> Result<IndexMap<String, FeatureSpec>> {
        self.inner.describe(r)
    }
    fn release(&self, handle: &FeatureHandle) -> Result<()> {
        self.inner.release(handle)
    }
    fn abort(&self, sample_id: &SampleId) -> Result<()> {
        if self.fault == Fault::Cleanup {
            fire(self.fault);
        }
        self.inner.abort(sample_id)
    }
    fn abort_all(&self) -> Result<usize> {
        self.inner.abort_all()
    }
    fn adopt(&self, r: &SampleRef) -> Result<()> {
        self.inner.adopt(r)
    }
    fn track_external_attempt(
        &self,
        sample_id: &SampleId,
        generation: Generation,
        feature_names: &[&str],
    ) -> Result<()> {
        self.inner.track_external_attempt(sample_id, generation, feature_names)
    }
    fn discard_external_attempts(&self) -> Result<usize> {
        self.inner.discard_external_attempts()
    }
    fn gc(&self) -> Result<GcReport> {
        self.inner.gc()
    }
    fn drain(&self, policy: DrainPolicy) -> Result<DrainReport> {
        self.inner.drain(policy)
    }
    fn drain_samples(&self, sample_ids: &[SampleId], policy: DrainPolicy) -> Result<DrainReport> {
        self.inner.drain_samples(sample_ids, policy)
    }
    fn health(&self) -> Result<Health> {
        self.inner.health()
    }
    fn retains_on_release(&self) -> Result<bool> {
        self.inner.retains_on_release()
    }
    fn disown(&self, sample_ids: &[SampleId]) -> Result<()> {
        self.inner.disown(sample_ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_points_parse_and_print_back() {
        for (text, fault) in [
            ("put:3", Fault::Put(3)),
            ("publish:8", Fault::Publish(8)),
            ("cleanup", Fault::Cleanup),
            ("before-ack:2", Fault::BeforeAck(2)),
            ("after-ack:2", Fault::AfterAck(2)),
            ("after-checkpoint:3", Fault::AfterCheckpoint(3)),
            ("train:1", Fault::Train(1)),
        ] {
            assert_eq!(Fault::parse(text), Ok(fault));
            assert_eq!(fault.to_string(), text);
        }
        for bad in ["put", "put:0", "put:x", "cleanup:1", "crash", "before-ack:-1", ""] {
            assert!(Fault::parse(bad).is_err(), "{bad}");
        }
        assert!(Fault::Put(1).check_role("produce").is_ok());
        assert!(Fault::Publish(1).check_role("ingest").is_err());
        assert!(Fault::BeforeAck(1).check_role("produce").is_err());
        assert!(Fault::Cleanup.check_role("consume").is_err());
    }
}
