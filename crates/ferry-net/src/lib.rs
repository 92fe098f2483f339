//! ferry's network layer: the wire protocol between `ferry serve` (the node daemon that owns the
//! bytes and their lifecycle) and its clients. See `docs/PROTOCOL.md` for the byte layout.
//!
//! This crate sits between the store and the control plane
//! (`ferry-core` ← `ferry-format` ← `ferry-store` ← `ferry-net` ← `ferry-control` ...). Today it
//! holds the frame codec; the daemon, its shared-memory arena and the client backend build on it.
//!
//! # Layout
//! * [`frame`] — the fixed 32-byte frame header, its opcodes and flags, the bounds every reader
//!   enforces, and reading a frame's header and metadata from a stream while leaving its raw
//!   payload in the stream, so the caller reads it straight into its final place.
#![forbid(unsafe_code)]

pub mod frame;

pub use frame::{FrameHead, Header, Limits, Op, read_head, write_head};
