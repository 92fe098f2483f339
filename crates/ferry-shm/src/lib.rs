//! ferry's node shared-memory arena: the daemon keeps every sample of a node in one sealed
//! memfd, hands the fd to authenticated local clients, and clients read and write tensors
//! in place, so a same-node put or get copies the bytes at most once.
//!
//! # Layout
//! * [`arena`] — [`Arena`]: the memfd, its mapping, allocation with deadlines; the trust model.
//! * [`allocator`] — [`allocator::BestFit`], the exact best-fit extent allocator (and why not
//!   `offset-allocator`).
//! * [`backend`] — [`ArenaBackend`], the `ferry_store::ByteBackend` over an arena: two-phase
//!   puts, pins for zero-copy views; its concurrency rule.
//! * [`reservation`] — [`Reservation`] and object placement (64-byte aligned).
//! * [`client_map`] — [`ArenaMap`], the client's mapping of a received arena fd.
//! * [`fdpass`] — sending and receiving the fd over a Unix stream.
//!
//! Unsafe code lives in `shared` (the mapping's copies and views) and [`fdpass`] (adopting a
//! received descriptor), each block with its `SAFETY` argument.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod allocator;
pub mod arena;
pub mod backend;
pub mod client_map;
pub mod fdpass;
#[cfg(test)]
mod fragmentation_tests;
pub mod reservation;
mod shared;

pub use arena::{Arena, ArenaOptions, ArenaStats, Region, shmem_huge_pages_available};
pub use backend::{ArenaBackend, BackendStats, Located, PinId};
pub use client_map::ArenaMap;
pub use fdpass::{recv_with_fd, send_with_fd};
pub use reservation::{OBJECT_ALIGN, OwnedKey, PlacedObject, Reservation};
