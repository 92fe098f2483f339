//! The daemon's shared-memory arena: one sealed memfd mapped read-write, carved into regions by
//! the best-fit [`crate::allocator`], with blocking allocation under a deadline.
//!
//! # Trust model
//! A client that receives the arena's fd maps the whole arena read-write, so it *can* write
//! anywhere in it, including regions that hold other samples. The daemon therefore hands the fd
//! only to authenticated local clients (same node, shared secret), and a well-behaved client
//! writes only into a region the daemon reserved to it, and only before it asks the daemon to
//! publish that region. The seals (no shrink, no grow, no further seals) stop a client from
//! resizing the memfd under the daemon, which would turn the daemon's reads into `SIGBUS`. The
//! arena itself does not track who owns which bytes: [`Arena::write_at`] and friends check only
//! the arena bounds; the ownership rules live in [`crate::backend`].
//!
//! # Page faults
//! A copy into a fresh memfd page costs a page fault (0.9 GB/s against 15 GB/s warm on the
//! reference box), so by default the arena populates every page at creation
//! ([`ArenaOptions::prefault`]). Huge pages are advised, and taken where the host's shmem THP
//! mode allows ([`shmem_huge_pages_available`]); many hosts ship it `never`, and `ferry serve`
//! says so at start.

use crate::allocator::BestFit;
use crate::shared::SharedBytes;
use ferry_core::{Error, Result};
use memfd::{FileSeal, MemfdOptions};
use memmap2::{Advice, MmapOptions};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

/// Where the kernel says whether shared memory (memfd, tmpfs) may use transparent huge pages.
pub const SHMEM_THP_SETTING: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

/// The selected mode in a `shmem_enabled` file's text (`always within_size [advise] never deny
/// force` gives `advise`), or `None` if nothing is selected.
pub fn selected_thp_mode(setting: &str) -> Option<&str> {
    let start = setting.find('[')? + 1;
    let len = setting[start..].find(']')?;
    Some(&setting[start..start + len])
}

/// Whether an arena that advises huge pages gets them on this host: `Some(false)` when shmem THP
/// is `never` or `deny` (every arena page is then 4 KiB, and a 64 MiB copy in or out of the
/// arena ran 15-25% slower than with `advise` on the reference box), `None` if the setting
/// cannot be read.
pub fn shmem_huge_pages_available() -> Option<bool> {
    let setting = std::fs::read_to_string(SHMEM_THP_SETTING).ok()?;
    selected_thp_mode(&setting).map(|mode| !matches!(mode, "never" | "deny"))
}

/// How an arena is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArenaOptions {
    /// Fault every page in at creation so the hot path never touches a fresh page.
    pub prefault: bool,
    /// Advise transparent huge pages (errors ignored: shmem THP is usually off).
    pub huge_pages: bool,
    /// Allocation granularity and region alignment in bytes: a power of two, at least 64.
    pub alignment: u64,
}

impl Default for ArenaOptions {
    fn default() -> Self {
        ArenaOptions { prefault: true, huge_pages: true, alignment: 4096 }
    }
}

/// A range of the arena handed out by [`Arena::allocate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Region {
    /// Byte offset from the start of the arena (a multiple of the arena's alignment).
    pub offset: u64,
    /// The requested length in bytes (the arena may reserve more, up to the alignment).
    pub len: u64,
}

/// A snapshot of the arena's occupancy, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ArenaStats {
    /// Total bytes.
    pub capacity: u64,
    /// Bytes reserved by live regions (rounded up to the alignment).
    pub used: u64,
    /// `capacity - used`.
    pub free: u64,
    /// The largest request that would succeed now.
    pub largest_free: u64,
    /// Live regions.
    pub regions: u64,
}

/// The shared-memory arena (daemon side). Shared across threads as `Arc<Arena>`.
pub struct Arena {
    name: String,
    alignment: u64,
    file: File,
    bytes: SharedBytes,
    alloc: Mutex<BestFit>,
    freed: Condvar,
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena").field("name", &self.name).field("stats", &self.stats()).finish()
    }
}

fn backend_error(operation: &str, key: &str, message: String) -> Error {
    Error::Backend { backend: "arena".into(), operation: operation.into(), key: key.into(), message }
}

impl Arena {
    /// Creates a sealed memfd of `capacity` bytes (rounded up to the alignment), maps it
    /// shared read-write, and prefaults it if asked.
    pub fn create(name: &str, capacity: u64, options: ArenaOptions) -> Result<Arc<Arena>> {
        let alignment = options.alignment;
        if !alignment.is_power_of_two() || alignment < 64 {
            return Err(Error::InvalidArgument(format!(
                "arena alignment must be a power of two of at least 64 bytes, got {alignment}"
            )));
        }
        if capacity == 0 {
            return Err(Error::InvalidArgument(format!("arena {name}: capacity must be positive")));
        }
        let capacity = capacity
            .checked_next_multiple_of(alignment)
            .filter(|c| usize::try_from(*c).is_ok())
            .ok_or_else(|| Error::InvalidArgument(format!("arena {name}: capacity {capacity} is too large")))?;
        let memfd = MemfdOptions::default()
            .close_on_exec(true)
            .allow_sealing(true)
            .create(name)
            .map_err(|e| backend_error("create", name, format!("memfd_create failed: {e}")))?;
        memfd.as_file().set_len(capacity).map_err(|e| Error::io(format!("sizing arena {name} memfd"), &e))?;
        memfd
            .add_seals(&[FileSeal::SealShrink, FileSeal::SealGrow, FileSeal::SealSeal])
            .map_err(|e| backend_error("create", name, format!("sealing the memfd failed: {e}")))?;
        let file = memfd.into_file();
        let mut map_options = MmapOptions::new();
        map_options.len(capacity as usize);
        if options.prefault && !options.huge_pages {
            // Without huge pages there is nothing to advise first: fault everything in now.
            map_options.populate();
        }
        let map = map_options.map_raw(&file).map_err(|e| Error::io(format!("mapping arena {name}"), &e))?;
        if options.huge_pages {
            // Advise before faulting so pages can come in huge; shmem THP is usually `never`.
            let _ = map.advise(Advice::HugePage);
        }
        let bytes = SharedBytes::new(map);
        if options.prefault {
            // A write per page: makes every page resident and its mapping writable (a populated
            // shared mapping is faulted for read only), after the huge-page advice.
            bytes.prefault_zero();
        }
        Ok(Arc::new(Arena {
            name: name.to_owned(),
            alignment,
            file,
            bytes,
            alloc: Mutex::new(BestFit::new(capacity / alignment)),
            freed: Condvar::new(),
        }))
    }

    /// The arena's name (also its memfd's name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Total bytes.
    pub fn capacity(&self) -> u64 {
        self.bytes.len()
    }

    /// The allocation granularity in bytes.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// The memfd, to pass to an authenticated client ([`crate::fdpass::send_with_fd`]).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    fn lock(&self) -> Result<MutexGuard<'_, BestFit>> {
        self.alloc.lock().map_err(|_| self.poisoned())
    }

    fn units(&self, len: u64) -> u64 {
        len.div_ceil(self.alignment).max(1)
    }

    fn stats_of(&self, alloc: &BestFit) -> ArenaStats {
        ArenaStats {
            capacity: self.capacity(),
            used: alloc.used() * self.alignment,
            free: alloc.free() * self.alignment,
            largest_free: alloc.largest_free() * self.alignment,
            regions: alloc.allocations(),
        }
    }

    /// The current occupancy.
    pub fn stats(&self) -> ArenaStats {
        match self.alloc.lock() {
            Ok(alloc) => self.stats_of(&alloc),
            Err(poisoned) => self.stats_of(&poisoned.into_inner()),
        }
    }

    /// Reserves a region of `len` bytes. When no free extent holds it, waits for frees until
    /// `deadline` (if any), then fails with a [`Error::Backend`] naming the arena's capacity,
    /// bytes in use, largest free extent and the request. A request above the capacity fails
    /// at once.
    pub fn allocate(&self, len: u64, deadline: Option<Instant>) -> Result<Region> {
        let units = self.units(len);
        let started = Instant::now();
        let mut alloc = self.lock()?;
        loop {
            if units <= alloc.capacity()
                && let Some(unit_offset) = alloc.allocate(units)
            {
                return Ok(Region { offset: unit_offset * self.alignment, len });
            }
            let now = Instant::now();
            let remaining = deadline.filter(|d| *d > now && units <= alloc.capacity()).map(|d| d - now);
            let Some(remaining) = remaining else {
                let stats = self.stats_of(&alloc);
                let waited = match deadline {
                    Some(_) => format!("; waited {} ms for frees", now.duration_since(started).as_millis()),
                    None => String::new(),
                };
                return Err(backend_error(
                    "allocate",
                    &self.name,
                    format!(
                        "no free extent holds a request of {len} bytes ({} with alignment): arena capacity {} bytes, {} bytes in use by {} regions, largest free extent {} bytes{waited}",
                        units.saturating_mul(self.alignment),
                        stats.capacity,
                        stats.used,
                        stats.regions,
                        stats.largest_free
                    ),
                ));
            };
            alloc = match self.freed.wait_timeout(alloc, remaining) {
                Ok((guard, _)) => guard,
                Err(_) => return Err(self.poisoned()),
            };
        }
    }

    fn poisoned(&self) -> Error {
        backend_error("allocate", &self.name, "allocator lock poisoned by a panic in another thread".into())
    }

    /// Returns a region to the arena and wakes allocations waiting for space. Anything but a
    /// region [`Arena::allocate`] returned and not yet freed (a double free, a changed length)
    /// is refused and changes nothing.
    pub fn free(&self, region: Region) -> Result<()> {
        if !region.offset.is_multiple_of(self.alignment) {
            return Err(backend_error(
                "free",
                &self.name,
                format!("region offset {} is not a multiple of the alignment {}", region.offset, self.alignment),
            ));
        }
        let units = self.units(region.len);
        let mut alloc = self.lock()?;
        alloc.free_range(region.offset / self.alignment, units).map_err(|_| {
            backend_error(
                "free",
                &self.name,
                format!("region of {} bytes at offset {} is not allocated (double free?)", region.len, region.offset),
            )
        })?;
        drop(alloc);
        self.freed.notify_all();
        Ok(())
    }

    /// Copies `src` into the arena at `offset` (bounds-checked against the capacity only).
    pub fn write_at(&self, offset: u64, src: &[u8]) -> Result<()> {
        self.bytes.write_at(offset, src)
    }

    /// Copies `dst.len()` bytes at `offset` into `dst` (bounds-checked against the capacity).
    pub fn read_at(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        self.bytes.read_at(offset, dst)
    }

    /// A borrowed view of `len` bytes at `offset`. Hold a pin on the region (see
    /// [`crate::backend::ArenaBackend::locate`]) while using it: the arena itself does not stop
    /// the region from being freed and reused, and clients mapping the arena can write it.
    pub fn slice(&self, offset: u64, len: usize) -> Result<&[u8]> {
        self.bytes.slice(offset, len)
    }

    /// Reads exactly `len` bytes from `reader` straight into the arena at `offset` (for the
    /// daemon filling a reserved region from a socket without a bounce buffer).
    pub fn fill_from(&self, offset: u64, len: u64, reader: &mut dyn Read) -> Result<()> {
        self.bytes.fill_from(offset, len, reader)
    }

    /// Writes `len` arena bytes at `offset` straight to `writer` (serving a pinned region).
    pub fn send_to(&self, offset: u64, len: u64, writer: &mut dyn Write) -> Result<()> {
        self.bytes.drain_to(offset, len, writer)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_selected_shmem_thp_mode_is_the_bracketed_word() {
        assert_eq!(selected_thp_mode("always within_size [advise] never deny force\n"), Some("advise"));
        assert_eq!(selected_thp_mode("always within_size advise [never] deny force"), Some("never"));
        assert_eq!(selected_thp_mode("[always] never"), Some("always"));
        assert_eq!(selected_thp_mode("always never"), None);
        assert_eq!(selected_thp_mode("always [never"), None);
        // Whatever this host says, reading it never panics.
        let _ = shmem_huge_pages_available();
    }

    use super::*;
    use std::time::Duration;

    const MIB: u64 = 1 << 20;

    fn small(capacity: u64) -> Arc<Arena> {
        Arena::create("test-arena", capacity, ArenaOptions::default()).unwrap()
    }

    #[test]
    fn create_rounds_capacity_and_seals() {
        let arena = Arena::create("a", 5000, ArenaOptions::default()).unwrap();
        assert_eq!(arena.capacity(), 8192);
        assert_eq!(arena.name(), "a");
        let file = File::from(arena.fd().try_clone_to_owned().unwrap());
        assert!(file.set_len(4096).is_err(), "shrink must be sealed");
        assert!(file.set_len(1 << 20).is_err(), "grow must be sealed");
        let seals = memfd::Memfd::try_from_file(file).unwrap().seals().unwrap();
        assert!(seals.contains(&FileSeal::SealSeal));
        for options in [
            ArenaOptions { alignment: 100, ..ArenaOptions::default() },
            ArenaOptions { alignment: 32, ..ArenaOptions::default() },
        ] {
            assert!(matches!(Arena::create("b", 4096, options), Err(Error::InvalidArgument(_))));
        }
        assert!(matches!(Arena::create("b", 0, ArenaOptions::default()), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn prefault_options_all_work() {
        for (prefault, huge_pages) in [(true, true), (true, false), (false, true), (false, false)] {
            let arena = Arena::create("p", 2 * MIB, ArenaOptions { prefault, huge_pages, alignment: 64 }).unwrap();
            arena.write_at(2 * MIB - 3, b"end").unwrap();
            let mut out = [0u8; 3];
            arena.read_at(2 * MIB - 3, &mut out).unwrap();
            assert_eq!(&out, b"end");
            assert_eq!(arena.slice(0, 4).unwrap(), &[0, 0, 0, 0]);
        }
    }

    #[test]
    fn byte_access_is_bounds_checked() {
        let arena = small(MIB);
        assert!(arena.write_at(MIB - 1, b"xy").is_err());
        assert!(arena.write_at(u64::MAX, b"x").is_err());
        assert!(arena.read_at(MIB, &mut [0u8; 1]).is_err());
        assert!(arena.slice(MIB - 1, 2).is_err());
        arena.write_at(MIB - 2, b"xy").unwrap();
        assert_eq!(arena.slice(MIB - 2, 2).unwrap(), b"xy");
        arena.write_at(MIB, b"").unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        arena.fill_from(4096, data.len() as u64, &mut &data[..]).unwrap();
        let mut sent = Vec::new();
        arena.send_to(4096, data.len() as u64, &mut sent).unwrap();
        assert_eq!(sent, data);
        assert!(arena.fill_from(4096, 20_000, &mut &data[..]).is_err(), "short reader");
        assert!(arena.send_to(MIB - 1, 2, &mut sent).is_err());
    }

    #[test]
    fn allocate_free_and_stats() {
        let arena = small(MIB);
        let a = arena.allocate(100, None).unwrap();
        let b = arena.allocate(5000, None).unwrap();
        assert_eq!(a, Region { offset: 0, len: 100 });
        assert_eq!(b, Region { offset: 4096, len: 5000 });
        let stats = arena.stats();
        assert_eq!(
            (stats.used, stats.regions, stats.free, stats.largest_free),
            (3 * 4096, 2, MIB - 3 * 4096, MIB - 3 * 4096)
        );
        arena.free(a).unwrap();
        assert!(arena.free(a).is_err(), "double free");
        assert!(arena.free(Region { offset: 10, len: 1 }).is_err());
        assert!(arena.free(Region { offset: b.offset, len: 100 }).is_err(), "a part of a region");
        arena.free(b).unwrap();
        assert_eq!(arena.stats().used, 0);
        assert_eq!(arena.allocate(MIB, None).unwrap().offset, 0);
    }

    #[test]
    fn too_large_fails_at_once_with_the_numbers() {
        let arena = small(MIB);
        let held = arena.allocate(MIB / 2, None).unwrap();
        let started = Instant::now();
        let err = arena.allocate(2 * MIB, Some(Instant::now() + Duration::from_secs(30))).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5), "a request above the capacity must not wait");
        let text = err.to_string();
        for needle in
            ["2097152 bytes", "capacity 1048576", "524288 bytes in use", "largest free extent 524288", "test-arena"]
        {
            assert!(text.contains(needle), "{needle:?} missing from {text}");
        }
        let err = arena.allocate(MIB, None).unwrap_err().to_string();
        assert!(err.contains("largest free extent 524288") && !err.contains("waited"), "{err}");
        arena.free(held).unwrap();
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        #[test]
        fn random_regions_never_overlap_and_stats_add_up(
            ops in proptest::collection::vec((0u64..20_000, proptest::prelude::any::<bool>()), 1..120)
        ) {
            let options = ArenaOptions { prefault: false, huge_pages: false, alignment: 64 };
            let arena = Arena::create("prop", 256 * 1024, options).unwrap();
            let mut live: Vec<Region> = Vec::new();
            for (i, (len, free)) in ops.into_iter().enumerate() {
                if free && !live.is_empty() {
                    let region = live.swap_remove(i % live.len());
                    proptest::prop_assert!(arena.free(region).is_ok());
                } else if let Ok(region) = arena.allocate(len, None) {
                    proptest::prop_assert_eq!(region.len, len);
                    proptest::prop_assert!(region.offset % 64 == 0 && region.offset + len <= arena.capacity());
                    for other in &live {
                        let (a, b) = (region.offset, other.offset);
                        proptest::prop_assert!(a + len.max(1) <= b || b + other.len.max(1) <= a, "{region:?} overlaps {other:?}");
                    }
                    // The first and last byte are ours: write a tag the overlap check above backs.
                    arena.write_at(region.offset, &[i as u8]).unwrap();
                    live.push(region);
                }
                let stats = arena.stats();
                let reserved: u64 = live.iter().map(|r| r.len.max(1).div_ceil(64) * 64).sum();
                proptest::prop_assert_eq!(stats.used, reserved);
                proptest::prop_assert_eq!(stats.regions, live.len() as u64);
                proptest::prop_assert_eq!(stats.used + stats.free, stats.capacity);
                proptest::prop_assert!(stats.largest_free <= stats.free);
            }
            for region in live.drain(..) {
                proptest::prop_assert!(arena.free(region).is_ok());
            }
            proptest::prop_assert_eq!(arena.allocate(arena.capacity(), None).map(|r| r.offset), Ok(0));
        }
    }

    #[test]
    fn allocate_waits_for_a_free_until_the_deadline() {
        let arena = small(MIB);
        let full = arena.allocate(MIB, None).unwrap();
        // Nobody frees: fails after the deadline, saying it waited.
        let started = Instant::now();
        let err = arena.allocate(4096, Some(Instant::now() + Duration::from_millis(50))).unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(50));
        let text = err.to_string();
        assert!(text.contains("waited") && text.contains("largest free extent 0 bytes"), "{text}");
        // Another thread frees in time: the waiter wakes and gets the space.
        let freer = {
            let arena = Arc::clone(&arena);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                arena.free(full).unwrap();
            })
        };
        let got = arena.allocate(MIB / 2, Some(Instant::now() + Duration::from_secs(30))).unwrap();
        assert_eq!(got.offset, 0);
        freer.join().unwrap();
    }
}
