//! ferry's control plane: the tensor-free records and files that coordinate producers and
//! consumers. This part is the offline path: SpecForge's ref manifest, the sentinel
//! files of the offline disaggregated protocol, and ingest (copy offline feature files into any
//! store and publish their refs). Ref channels, ledgers and the distributor come next.
//!
//! # Layout
//! * [`atomic`] — write-temp-then-rename helpers (every control file is replaced atomically).
//! * [`manifest`] — `{"schema_version": 1, "refs": [...]}`, byte-compatible with SpecForge.
//! * [`sentinel`] — `.producer_claim`, `.done`, `.failed`, `.consumed`, `.consumer_failed`.
//! * [`ingest`] — offline files into a store, in parallel, with exact cleanup on failure.
#![forbid(unsafe_code)]

pub mod atomic;
pub mod ingest;
pub mod manifest;
pub mod sentinel;

pub use ingest::{
    IngestOptions, IngestReport, ProducerError, ingest_files, run_offline_producer, run_offline_producer_on,
};
pub use manifest::{read_ref_manifest, write_ref_manifest};
pub use sentinel::OfflineControl;
