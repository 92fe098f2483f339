//! Placement of a sample's objects inside one region (each object 64-byte aligned) and the
//! [`Reservation`] that owns such a region between `reserve` and `publish`/`cancel`.
//!
//! A reservation returns its region to the arena when dropped unpublished, so a daemon thread
//! that fails half-way (a client disconnects mid-upload) cannot leak arena space.

use crate::arena::{Arena, Region};
use ferry_core::{Error, Generation, Result, SampleId, StoreId};
use std::sync::Arc;

/// Alignment of every object's first byte inside a region (and so in the arena).
pub const OBJECT_ALIGN: u64 = 64;

/// An owned sample key: store, sample, generation.
pub type OwnedKey = (StoreId, SampleId, Generation);

/// Where one object lives in the arena.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedObject {
    /// Object (feature) name.
    pub name: String,
    /// Absolute byte offset in the arena (a multiple of [`OBJECT_ALIGN`]).
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Lays `objects` out back to back, each start aligned to [`OBJECT_ALIGN`]; returns the
/// placements relative to the region start and the region length. Refuses duplicate names.
pub(crate) fn layout(objects: &[(&str, u64)]) -> Result<(Vec<PlacedObject>, u64)> {
    let mut placed: Vec<PlacedObject> = Vec::with_capacity(objects.len());
    let mut end = 0u64;
    for &(name, len) in objects {
        if placed.iter().any(|p| p.name == name) {
            return Err(Error::InvalidArgument(format!("object {name:?} appears twice in one sample")));
        }
        end = end
            .checked_next_multiple_of(OBJECT_ALIGN)
            .and_then(|offset| offset.checked_add(len))
            .ok_or_else(|| Error::InvalidArgument(format!("object {name:?} of {len} bytes overflows the layout")))?;
        placed.push(PlacedObject { name: name.to_owned(), offset: end - len, len });
    }
    Ok((placed, end))
}

/// Frees its region on drop unless disarmed.
#[derive(Debug)]
pub(crate) struct RegionGuard {
    pub(crate) arena: Arc<Arena>,
    region: Option<Region>,
}

impl RegionGuard {
    pub(crate) fn new(arena: Arc<Arena>, region: Region) -> Self {
        RegionGuard { arena, region: Some(region) }
    }

    /// Hands the region over to the caller (publish or cancel); the guard no longer frees it.
    pub(crate) fn disarm(&mut self) -> Option<Region> {
        self.region.take()
    }
}

impl Drop for RegionGuard {
    fn drop(&mut self) {
        if let Some(region) = self.region.take() {
            // The region was allocated by this arena and never published, so the free cannot
            // be refused; there is nobody to report an error to in a destructor anyway.
            let _ = self.arena.free(region);
        }
    }
}

/// A region reserved for one sample generation, with its objects placed, not yet visible to
/// reads. Publish it with [`crate::ArenaBackend::publish`] after writing every object's bytes
/// (for example with [`Arena::write_at`] or by a client through its [`crate::ArenaMap`]), or
/// give it back with [`crate::ArenaBackend::cancel`]. Dropping it unpublished frees the region.
#[derive(Debug)]
pub struct Reservation {
    pub(crate) id: u64,
    pub(crate) region: Region,
    pub(crate) objects: Vec<PlacedObject>,
    pub(crate) key: OwnedKey,
    pub(crate) guard: RegionGuard,
}

impl Reservation {
    /// The backend-unique id (for the daemon to name the reservation on the wire).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The reserved region.
    pub fn region(&self) -> Region {
        self.region
    }

    /// The objects, in the order they were requested, with absolute arena offsets.
    pub fn objects(&self) -> &[PlacedObject] {
        &self.objects
    }

    /// The placement of one object.
    pub fn object(&self, name: &str) -> Option<&PlacedObject> {
        self.objects.iter().find(|o| o.name == name)
    }

    /// The sample generation it will be published under.
    pub fn key(&self) -> &OwnedKey {
        &self.key
    }

    /// Copies `src` into the object `name` at `at` bytes from its start, bounds-checked
    /// against that object (safer than [`Arena::write_at`], which checks only the arena).
    pub fn write_object(&self, name: &str, at: u64, src: &[u8]) -> Result<()> {
        let object = self
            .object(name)
            .ok_or_else(|| Error::InvalidArgument(format!("reservation {} has no object {name:?}", self.id)))?;
        let fits = at.checked_add(src.len() as u64).is_some_and(|end| end <= object.len);
        if !fits {
            return Err(Error::InvalidArgument(format!(
                "write of {} bytes at {at} runs past the end of object {name:?} ({} bytes)",
                src.len(),
                object.len
            )));
        }
        self.guard.arena.write_at(object.offset + at, src)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_aligns_every_object_to_64_bytes() {
        let (placed, total) = layout(&[("a", 3), ("b", 64), ("c", 0), ("d", 65)]).unwrap();
        let offsets: Vec<u64> = placed.iter().map(|p| p.offset).collect();
        assert_eq!(offsets, [0, 64, 128, 128]);
        assert_eq!(total, 193);
        assert!(layout(&[("a", 1), ("a", 2)]).is_err());
        assert!(layout(&[("a", u64::MAX), ("b", 1)]).is_err());
        assert_eq!(layout(&[]).unwrap().1, 0);
    }
}
