//! [`ArenaBackend`]: the [`ByteBackend`] over an [`Arena`]. One region per sample generation,
//! its objects packed inside (each 64-byte aligned); two-phase puts (`reserve` → bytes →
//! `publish`) so bytes land in their final place; pins for zero-copy views held by leases.
//!
//! # Concurrency rule
//! One mutex guards the bookkeeping (entries, regions, pins); it is never held during a byte
//! copy. What makes the lock-free copies safe:
//! 1. A region's bytes are written only while an unpublished [`Reservation`] owns it. Nobody
//!    else can find it: it is in no entry until `publish`.
//! 2. A published region is freed only under the lock, and only when it is neither *live*
//!    (held by an entry: some object of it not removed, not replaced) nor *pinned*.
//! 3. Every read of a published region (`read_into`, `read_many`) takes a temporary pin in the
//!    same critical section as its lookup and drops it after the copy; [`ArenaBackend::locate`]
//!    takes a pin that lasts until [`ArenaBackend::unpin`]. So a concurrent `remove` or
//!    re-publish can never free and reuse a region while someone copies out of or maps it:
//!    the free is deferred to the last unpin. A removal of a pinned region says
//!    [`Removal::Deferred`], even with `force`, since a client may be reading it.

use crate::arena::{Arena, ArenaStats, Region};
use crate::reservation::{OwnedKey, PlacedObject, RegionGuard, Reservation, layout};
use ferry_core::{Error, Generation, Result, SampleId, StoreId};
use ferry_store::backend::{BackendUsage, ByteBackend, ObjectData, ObjectKey, Removal, SampleKey};
use ferry_store::mem::quote_sample_id;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// A pin on a sample's region, taken by [`ArenaBackend::locate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PinId(pub u64);

/// Where a sample's objects are, with the region pinned until [`ArenaBackend::unpin`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// The pin to release.
    pub pin: PinId,
    /// The objects, in the order they were asked for.
    pub objects: Vec<PlacedObject>,
}

/// The backend's occupancy: the arena's, plus what the entries and pins hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BackendStats {
    /// The arena (its `used` includes unpublished reservations and pending regions).
    pub arena: ArenaStats,
    /// Published sample generations.
    pub entries: u64,
    /// Bytes of the objects they hold.
    pub object_bytes: u64,
    /// Outstanding pins (from `locate`, plus reads in flight).
    pub pins: u64,
    /// Regions no entry holds any more, kept until their last pin is released.
    pub pending_unpin_regions: u64,
    /// Bytes of those regions.
    pub pending_unpin_bytes: u64,
}

struct Entry {
    block: u64,
    objects: Vec<PlacedObject>,
}

struct Block {
    region: Region,
    pins: u64,
    /// Held by an entry.
    live: bool,
}

#[derive(Default)]
struct State {
    entries: HashMap<OwnedKey, Entry>,
    blocks: HashMap<u64, Block>,
    pins: HashMap<PinId, u64>,
    next_id: u64,
}

impl State {
    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Frees the block's region if nothing holds it any more; returns whether it did.
    fn release_if_idle(&mut self, arena: &Arena, block_id: u64) -> Result<bool> {
        let idle = self.blocks.get(&block_id).is_some_and(|b| !b.live && b.pins == 0);
        if !idle {
            return Ok(false);
        }
        if let Some(block) = self.blocks.remove(&block_id) {
            arena.free(block.region)?;
        }
        Ok(true)
    }

    fn unpin_block(&mut self, arena: &Arena, block_id: u64) -> Result<()> {
        if let Some(block) = self.blocks.get_mut(&block_id) {
            block.pins = block.pins.saturating_sub(1);
        }
        self.release_if_idle(arena, block_id).map(|_| ())
    }

    /// Looks up `names` of a sample (all must exist) and pins its region.
    fn pin_objects(
        &mut self,
        key: &OwnedKey,
        names: &[&str],
        sample: SampleKey<'_>,
    ) -> Result<(u64, Vec<PlacedObject>)> {
        let entry = self.entries.get(key).ok_or_else(|| Error::NotFound {
            what: match names.first() {
                Some(name) => format!("object {}", sample.object(name)),
                None => format!("sample {sample}"),
            },
        })?;
        let mut found = Vec::with_capacity(names.len());
        for name in names {
            let object = entry
                .objects
                .iter()
                .find(|o| o.name == *name)
                .ok_or_else(|| Error::NotFound { what: format!("object {}", sample.object(name)) })?;
            found.push(object.clone());
        }
        let block_id = entry.block;
        if let Some(block) = self.blocks.get_mut(&block_id) {
            block.pins += 1;
        }
        Ok((block_id, found))
    }
}

/// Objects in a shared-memory [`Arena`].
pub struct ArenaBackend {
    arena: Arc<Arena>,
    state: Mutex<State>,
}

fn owned(sample: SampleKey<'_>) -> OwnedKey {
    (sample.store_id.clone(), sample.sample_id.clone(), sample.generation)
}

impl ArenaBackend {
    /// A backend storing every sample in `arena`.
    pub fn new(arena: Arc<Arena>) -> Self {
        ArenaBackend { arena, state: Mutex::new(State::default()) }
    }

    /// The arena.
    pub fn arena(&self) -> &Arc<Arena> {
        &self.arena
    }

    /// Test seam: makes an object report only its first `keep` bytes (simulates a truncated
    /// object; the region itself is untouched and freed as usual).
    pub fn truncate_object(&self, object: ObjectKey<'_>, keep: u64) -> Result<()> {
        let mut state = self.lock("truncate")?;
        let entry = state
            .entries
            .get_mut(&owned(object.sample))
            .ok_or_else(|| Error::NotFound { what: format!("object {object}") })?;
        let placed = entry
            .objects
            .iter_mut()
            .find(|o| o.name == object.name)
            .ok_or_else(|| Error::NotFound { what: format!("object {object}") })?;
        placed.len = placed.len.min(keep);
        Ok(())
    }

    fn lock(&self, operation: &str) -> Result<MutexGuard<'_, State>> {
        self.state.lock().map_err(|_| Error::Backend {
            backend: "arena".into(),
            operation: operation.into(),
            key: self.arena.name().into(),
            message: "backend lock poisoned by a panic in another thread".into(),
        })
    }

    /// Occupancy, including regions waiting for their last unpin.
    pub fn stats(&self) -> BackendStats {
        let state = match self.state.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut stats = BackendStats {
            arena: self.arena.stats(),
            entries: state.entries.len() as u64,
            object_bytes: state.entries.values().flat_map(|e| e.objects.iter()).map(|o| o.len).sum(),
            pins: state.blocks.values().map(|b| b.pins).sum(),
            ..BackendStats::default()
        };
        for block in state.blocks.values().filter(|b| !b.live) {
            stats.pending_unpin_regions += 1;
            stats.pending_unpin_bytes += block.region.len;
        }
        stats
    }

    /// Reserves one region for a sample generation's objects (`(name, length)`), waiting for
    /// space until `deadline` if the arena is full. Nothing is visible to reads until
    /// [`ArenaBackend::publish`].
    pub fn reserve(
        &self,
        sample: SampleKey<'_>,
        objects: &[(&str, u64)],
        deadline: Option<Instant>,
    ) -> Result<Reservation> {
        let (mut placed, len) = layout(objects)?;
        let region = self.arena.allocate(len, deadline)?;
        let guard = RegionGuard::new(Arc::clone(&self.arena), region);
        for object in &mut placed {
            object.offset += region.offset;
        }
        let id = self.lock("reserve")?.next_id();
        Ok(Reservation { id, region, objects: placed, key: owned(sample), guard })
    }

    /// Makes a reservation's objects readable under its key, replacing (and freeing, once
    /// unpinned) an entry already published under the same key.
    pub fn publish(&self, mut reservation: Reservation) -> Result<()> {
        if !Arc::ptr_eq(&reservation.guard.arena, &self.arena) {
            return Err(Error::InvalidArgument(format!(
                "reservation {} belongs to arena {}, not {}",
                reservation.id,
                reservation.guard.arena.name(),
                self.arena.name()
            )));
        }
        let mut state = self.lock("publish")?;
        let Some(region) = reservation.guard.disarm() else {
            return Err(Error::InvalidArgument(format!("reservation {} was already used", reservation.id)));
        };
        let block_id = state.next_id();
        state.blocks.insert(block_id, Block { region, pins: 0, live: true });
        let objects = std::mem::take(&mut reservation.objects);
        let old = state.entries.insert(reservation.key.clone(), Entry { block: block_id, objects });
        if let Some(old) = old {
            if let Some(block) = state.blocks.get_mut(&old.block) {
                block.live = false;
            }
            state.release_if_idle(&self.arena, old.block)?;
        }
        Ok(())
    }

    /// Gives an unpublished reservation's region back to the arena.
    pub fn cancel(&self, mut reservation: Reservation) -> Result<()> {
        match reservation.guard.disarm() {
            Some(region) => reservation.guard.arena.free(region),
            None => Ok(()),
        }
    }

    /// Pins a sample's region and says where the named objects are (in the order of `names`),
    /// for zero-copy views; every name must exist. Release with [`ArenaBackend::unpin`].
    pub fn locate(&self, sample: SampleKey<'_>, names: &[&str]) -> Result<Located> {
        let mut state = self.lock("locate")?;
        let (block_id, objects) = state.pin_objects(&owned(sample), names, sample)?;
        let pin = PinId(state.next_id());
        state.pins.insert(pin, block_id);
        Ok(Located { pin, objects })
    }

    /// Releases a pin; the region is freed if it was removed meanwhile and this was its last
    /// pin. An unknown (or already released) pin is a no-op.
    pub fn unpin(&self, pin: PinId) -> Result<()> {
        let mut state = self.lock("unpin")?;
        match state.pins.remove(&pin) {
            Some(block_id) => state.unpin_block(&self.arena, block_id),
            None => Ok(()),
        }
    }

    /// Looks up and temporarily pins `names`, runs `copy` without the lock, then unpins.
    fn with_pinned<T>(
        &self,
        sample: SampleKey<'_>,
        names: &[&str],
        copy: impl FnOnce(&[PlacedObject]) -> Result<T>,
    ) -> Result<T> {
        let (block_id, objects) = self.lock("read")?.pin_objects(&owned(sample), names, sample)?;
        let result = copy(&objects);
        let unpinned = self.lock("read").and_then(|mut state| state.unpin_block(&self.arena, block_id));
        let value = result?;
        unpinned.map(|_| value)
    }

    fn copy_out(&self, object: &PlacedObject, dst: &mut [u8]) -> Result<usize> {
        let len = usize::try_from(object.len)
            .map_err(|_| Error::InvalidArgument(format!("object {} does not fit in memory", object.name)))?;
        let n = len.min(dst.len());
        self.arena.read_at(object.offset, &mut dst[..n])?;
        Ok(len)
    }
}

impl Drop for ArenaBackend {
    /// Returns every unpinned region to the arena (the arena may outlive the backend). A
    /// region still pinned stays allocated: a client may have it mapped.
    fn drop(&mut self) {
        let state = match self.state.get_mut() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        };
        for block in state.blocks.values().filter(|b| b.pins == 0) {
            let _ = self.arena.free(block.region);
        }
        state.blocks.clear();
    }
}

impl ByteBackend for ArenaBackend {
    fn kind(&self) -> &'static str {
        "arena"
    }

    fn write(&self, sample: SampleKey<'_>, objects: &[ObjectData<'_>]) -> Result<()> {
        let sizes: Vec<(&str, u64)> = objects.iter().map(|o| (o.name, o.tensor.nbytes())).collect();
        let reservation = self.reserve(sample, &sizes, None)?;
        for (object, placed) in objects.iter().zip(reservation.objects()) {
            self.arena.write_at(placed.offset, object.tensor.bytes())?;
        }
        self.publish(reservation)
    }

    fn read_into(&self, object: ObjectKey<'_>, dst: &mut [u8]) -> Result<usize> {
        self.with_pinned(object.sample, &[object.name], |placed| match placed {
            [one] => self.copy_out(one, dst),
            _ => Err(Error::NotFound { what: format!("object {object}") }),
        })
    }

    fn read_many(&self, sample: SampleKey<'_>, reads: &mut [(&str, &mut [u8])]) -> Result<Vec<usize>> {
        let names: Vec<&str> = reads.iter().map(|(name, _)| *name).collect();
        self.with_pinned(sample, &names, |placed| {
            placed.iter().zip(reads.iter_mut()).map(|(object, (_, dst))| self.copy_out(object, dst)).collect()
        })
    }

    fn remove(&self, sample: SampleKey<'_>, names: &[String], _force: bool) -> Result<Removal> {
        let mut state = self.lock("remove")?;
        let key = owned(sample);
        let Some(entry) = state.entries.get_mut(&key) else {
            return Ok(Removal::Removed);
        };
        entry.objects.retain(|o| !names.contains(&o.name));
        if !entry.objects.is_empty() {
            return Ok(Removal::Removed);
        }
        let block_id = entry.block;
        state.entries.remove(&key);
        if let Some(block) = state.blocks.get_mut(&block_id) {
            block.live = false;
        }
        // A pinned region may be mapped by a client: never reuse it under them, even on force.
        if state.release_if_idle(&self.arena, block_id)? { Ok(Removal::Removed) } else { Ok(Removal::Deferred) }
    }

    fn exists(&self, object: ObjectKey<'_>) -> Result<bool> {
        Ok(self.size(object)?.is_some())
    }

    fn size(&self, object: ObjectKey<'_>) -> Result<Option<u64>> {
        let state = self.lock("size")?;
        let entry = state.entries.get(&owned(object.sample));
        Ok(entry.and_then(|e| e.objects.iter().find(|o| o.name == object.name)).map(|o| o.len))
    }

    fn latest_generation(&self, store_id: &StoreId, sample_id: &SampleId) -> Result<Option<Generation>> {
        let state = self.lock("list")?;
        Ok(state.entries.keys().filter(|(s, id, _)| s == store_id && id == sample_id).map(|(_, _, g)| *g).max())
    }

    fn object_names(&self, sample: SampleKey<'_>) -> Result<Option<Vec<String>>> {
        let state = self.lock("list")?;
        Ok(state.entries.get(&owned(sample)).map(|e| e.objects.iter().map(|o| o.name.clone()).collect()))
    }

    fn ref_uri(&self, store_id: &StoreId, sample_id: &SampleId, generation: Generation) -> String {
        format!("arena://{store_id}/{}?generation={generation}", quote_sample_id(sample_id.as_str()))
    }

    fn usage(&self, store_id: &StoreId) -> Result<Option<BackendUsage>> {
        let state = self.lock("usage")?;
        let mut usage = BackendUsage::default();
        for ((s, _, _), entry) in &state.entries {
            if s == store_id {
                usage.samples += 1;
                usage.bytes += entry.objects.iter().map(|o| o.len).sum::<u64>();
            }
        }
        Ok(Some(usage))
    }
}
