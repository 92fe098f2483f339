//! ferry's control plane: the tensor-free records and files that coordinate producers and
//! consumers. Offline: SpecForge's ref manifest, the sentinel files of the offline
//! disaggregated protocol, and ingest. Online: the ref channel, the queues over it, the ledgers
//! and flow control.
//!
//! # Layout
//! * [`atomic`] — write-temp-then-rename helpers (every control file is replaced atomically).
//! * [`channel`] — the ref channel ([`channel::RefSink`], [`channel::RefSource`]) and its file
//!   backend, byte-compatible with SpecForge's `StreamingRefChannel` (JSONL plus sidecars).
//! * [`collective`] — [`collective::Collective`], the data-parallel all-gather: one rank, threads,
//!   or processes over TCP / a Unix socket.
//! * [`controller`] — [`controller::DataFlowController`]: prompts, commits, acks, restart
//!   reconciliation.
//! * [`distributor`] — [`distributor::RefDistributor`]: rank 0's dispatch of whole optimizer
//!   windows into per-rank inboxes, acks forwarded, the end-of-stream tail settled.
//! * [`http_inbox`] — SpecForge's HTTP inbox relay: [`http_inbox::InboxHttpServer`] serves
//!   rank 0's inbox files, [`http_inbox::RemoteInbox`] reads one as a [`channel::RefSource`] on
//!   a node without the shared control directory.
//! * [`dp_ack`] — [`dp_ack::DpAckController`]: the durable acknowledgement at optimizer
//!   boundaries, in SpecForge's exact order.
//! * [`online`] — the online consumer's assembly: rank 0's setup and resume checks, each rank's
//!   stream of optimizer steps ending in the durable acknowledgement.
//! * [`producer`] — the online producer: claim, quantum handshake, capture workers under
//!   backpressure, transactional publishing, failure sentinels, the always-run cleanup; its
//!   protocol as a reusable, interruptible [`producer::ProducerSession`].
//! * [`queue`] — [`queue::RefQueue`], the consume-once queue protocol the loader reads.
//! * [`record`] — [`record::RefRecord`], a ref as its channel record (id + text), for the
//!   distributor's path.
//! * [`ref_queue`] — [`ref_queue::SampleRefQueue`], the in-process staging queue.
//! * [`stream_queue`] — [`stream_queue::StreamingRefQueue`], a channel as a [`queue::RefQueue`].
//! * [`ledger`] — the metadata stores (no-op, in-memory, SQLite): commits, acks, the durable marker.
//! * [`flow`] — producer flow control (ref and byte watermarks with hysteresis).
//! * [`signal`] — [`signal::StopSignal`], a waitable stop flag.
//! * [`manifest`] — `{"schema_version": 1, "refs": [...]}`, byte-compatible with SpecForge.
//! * [`offline_consumer`] — the disaggregated offline consumer's lifecycle: wait for `.done`,
//!   read the manifest, agree across ranks, `.consumed` or `.consumer_failed`.
//! * [`sentinel`] — `.producer_claim`, `.done`, `.failed`, `.consumed`, `.consumer_failed`.
//! * [`ingest`] — offline files into any store, in parallel, with exact cleanup on failure and,
//!   for stores that keep bytes until freed, a hold until the consumer is done.
#![forbid(unsafe_code)]

pub mod atomic;
pub mod channel;
pub mod collective;
pub mod controller;
pub mod distributor;
pub mod dp_ack;
pub mod flow;
pub mod http_inbox;
pub mod ingest;
pub mod ledger;
pub mod manifest;
pub mod offline_consumer;
pub mod online;
pub mod producer;
pub mod queue;
pub mod record;
pub mod ref_queue;
pub mod sentinel;
pub mod signal;
pub mod stream_queue;

pub use flow::{FlowControlLimits, ProducerFlowControl};
pub use ingest::{
    Hold, IngestOptions, IngestReport, ProducerError, ProducerEvent, ingest_files, run_offline_producer,
    run_offline_producer_on,
};
pub use ledger::{DurableMarker, InMemoryLedger, Ledger, NoOpLedger, SqliteLedger};
pub use manifest::{read_ref_manifest, write_ref_manifest};
pub use sentinel::OfflineControl;
