//! The liveness index: per sample, the live generation, the read leases and the tombstones of
//! freed generations. Sharded so operations on different samples rarely contend; every
//! decision about one sample (lease it, refuse it, free it) is made under its shard's lock, and
//! no shard lock is ever held across backend I/O.

use ferry_core::{Generation, LeaseToken, SampleId};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

const SHARDS: usize = 32;

/// How this store came to know a live generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// Written by this store's `put`.
    Put,
    /// Registered by `adopt` (written elsewhere; this store may free it).
    Adopted,
    /// Seen by a successful `get` of a sample another process wrote (consumer-side cache).
    Observed,
}

#[derive(Debug, Clone)]
pub(crate) struct Live {
    pub(crate) generation: Generation,
    /// Object names to remove when freeing.
    pub(crate) names: Vec<String>,
    /// Bytes counted in this store's budget (0 for observed samples).
    pub(crate) accounted: u64,
    pub(crate) since: Instant,
    pub(crate) origin: Origin,
}

/// Where a freed generation's removal stands. Reads of a tombstoned generation are refused
/// whatever the backend still holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tomb {
    /// Decided; the physical removal is running or pending retry.
    Removing,
    /// The backend removed it, or accepted a deferred removal.
    Settled,
}

#[derive(Debug, Default)]
pub(crate) struct Entry {
    pub(crate) live: Option<Live>,
    pub(crate) leases: HashMap<LeaseToken, Generation>,
    pub(crate) freed: BTreeMap<Generation, Tomb>,
}

impl Entry {
    pub(crate) fn is_empty(&self) -> bool {
        self.live.is_none() && self.leases.is_empty() && self.freed.is_empty()
    }

    pub(crate) fn leased(&self, generation: Generation) -> bool {
        self.leases.values().any(|g| *g == generation)
    }
}

/// One physical removal decided under a shard lock, to run after it is released.
#[derive(Debug, Clone)]
pub(crate) struct FreeJob {
    pub(crate) sample_id: SampleId,
    pub(crate) generation: Generation,
    pub(crate) names: Vec<String>,
    pub(crate) accounted: u64,
}

impl FreeJob {
    /// Takes the live generation out of `entry` and tombstones it.
    pub(crate) fn take_live(sample_id: &SampleId, entry: &mut Entry) -> Option<FreeJob> {
        let live = entry.live.take()?;
        entry.freed.insert(live.generation, Tomb::Removing);
        Some(FreeJob {
            sample_id: sample_id.clone(),
            generation: live.generation,
            names: live.names,
            accounted: live.accounted,
        })
    }
}

pub(crate) type Shard = HashMap<SampleId, Entry>;

pub(crate) struct Index {
    shards: Vec<Mutex<Shard>>,
    /// Settled tombstones, oldest first, so their memory stays bounded.
    settled: Mutex<VecDeque<(SampleId, Generation)>>,
    max_tombstones: usize,
}

impl Index {
    pub(crate) fn new(max_tombstones: usize) -> Self {
        Index {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            settled: Mutex::new(VecDeque::new()),
            max_tombstones,
        }
    }

    fn shard_of(sample_id: &SampleId) -> usize {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        (BuildHasherDefault::<DefaultHasher>::default().hash_one(sample_id.as_str()) as usize) % SHARDS
    }

    /// Locks the shard holding `sample_id`. Shard state is updated so that a panic cannot leave
    /// an entry half-changed in a way that breaks safety (at worst a lease is never released),
    /// so a poisoned lock is recovered rather than propagated.
    pub(crate) fn lock(&self, sample_id: &SampleId) -> MutexGuard<'_, Shard> {
        self.shards[Self::shard_of(sample_id)].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every shard, one at a time.
    pub(crate) fn for_each_shard(&self, mut f: impl FnMut(&mut Shard)) {
        for shard in &self.shards {
            f(&mut shard.lock().unwrap_or_else(|p| p.into_inner()));
        }
    }

    /// Marks a tombstone settled and forgets the oldest settled ones beyond the bound.
    pub(crate) fn settle(&self, sample_id: &SampleId, generation: Generation) {
        {
            let mut shard = self.lock(sample_id);
            let Some(entry) = shard.get_mut(sample_id) else { return };
            match entry.freed.get_mut(&generation) {
                // Only the first settlement enters the eviction queue (a gc and a drain may
                // retry the same removal concurrently).
                Some(t) if *t == Tomb::Removing => *t = Tomb::Settled,
                _ => return,
            }
        }
        let evicted: Vec<_> = {
            let mut settled = self.settled.lock().unwrap_or_else(|p| p.into_inner());
            settled.push_back((sample_id.clone(), generation));
            let excess = settled.len().saturating_sub(self.max_tombstones);
            settled.drain(..excess).collect()
        };
        for (sid, generation) in evicted {
            let mut shard = self.lock(&sid);
            if let Some(entry) = shard.get_mut(&sid) {
                entry.freed.remove(&generation);
                if entry.is_empty() {
                    shard.remove(&sid);
                }
            }
        }
    }
}
