//! ferry's network layer: `ferry serve`, the node daemon that owns the bytes and their
//! lifecycle for every process on a node, its client, and the wire protocol between them (see
//! `docs/PROTOCOL.md` for the byte layout).
//!
//! This crate sits between the store and the control plane
//! (`ferry-core` ← `ferry-format` ← `ferry-store` ← `ferry-net` ← `ferry-control` ...). The daemon
//! runs one [`ferry_store::FeatureStore`] (the lifecycle core) for all its clients, so an abort
//! by one client refuses every other client's reads, a producer may exit after publishing, and
//! a disconnected client's leases are released.
//!
//! No orphans after a producer crash: a client that owns its puts ([`Client::connect_owning`])
//! has every sample it put and did not hand over ([`Client::disown`], op `Disown`) aborted by
//! the daemon when its session (its one connection) ends, however it ends: drop, exit, crash,
//! SIGKILL, a broken connection. Other clients' samples, and disowned ones, live until deleted
//! (or freed by the max-hold GC).
//!
//! # Layout
//! * [`frame`] — the fixed 32-byte frame header, its opcodes and flags, the bounds every reader
//!   enforces, and reading a frame's header and metadata from a stream while leaving its raw
//!   payload in the stream, so the caller reads it straight into its final place.
//! * [`wire`] — each op's metadata (small JSON objects; tensors only as payload).
//! * [`auth`] — the challenge-response over the shared secret at connection attach.
//! * [`server`] — the daemon: listeners, one thread per connection, per-connection leases,
//!   pins and reservations, and its metrics.
//! * [`client`] — a connection to a daemon implementing [`ferry_store::FeatureStoreApi`]; on the
//!   same node it maps the daemon's arena and moves bytes through shared memory.
//!
//! Bytes never pass through a daemon buffer when the store runs over the arena
//! ([`arena_store`]): see `docs/ARCHITECTURE.md` for the copy count of each route.
#![forbid(unsafe_code)]

pub mod auth;
pub mod client;
pub mod frame;
pub mod server;
pub mod wire;

pub use client::{BorrowedSample, Client, ConnectOptions, GetInto, PIPELINE_WINDOW, RoutePreference};
pub use frame::{FrameHead, Header, Limits, Op, read_head, write_head};
pub use server::metrics::Metrics;
pub use server::{DaemonConfig, DaemonHandle, arena_store, start};
pub use wire::Route;
