//! The command line as the user typed it (first stage). Checks here are only the ones clap can
//! state declaratively (ranges, choices, which flags go together); each subcommand's `Plan`
//! does the rest.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// ferry: moves target-model hidden states to draft-model trainers.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, propagate_version = true)]
pub(crate) struct Cli {
    /// More log output on stderr (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub(crate) verbose: u8,
    /// What to do.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Put, read back (verified) and release synthetic EAGLE3 samples through each store, timed
    /// against memcpy.
    Demo(DemoArgs),
    /// Measure ferry against physical limits.
    Bench {
        /// What to measure.
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Show a tensor file's tensors (`.ckpt`, `.ckpt.gz`, `.safetensors`), or validate and
    /// summarise SampleRefs (a JSONL ref channel or a manifest).
    Inspect(InspectArgs),
    /// Copy offline feature files into a store and publish SpecForge's manifest and sentinels.
    Ingest(IngestArgs),
}

/// Which store backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum StoreKind {
    /// In-process memory (`mem://`).
    Mem,
    /// A shared directory (`dir://`).
    Dir,
}

/// Which stores the demo runs through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum DemoStores {
    /// In-process memory only.
    Mem,
    /// A shared directory only.
    Dir,
    /// Memory, then the shared directory.
    Both,
}

/// `ferry demo`.
#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Stores to run through.
    #[arg(long, value_enum, default_value_t = DemoStores::Both)]
    pub(crate) store: DemoStores,
    /// Samples per store (all are put before any is read back).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub(crate) samples: u64,
    /// Tokens per sample (L).
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub(crate) seq_len: u64,
    /// Target hidden size (H); hidden_state is (1, L, 3H), target (1, L, H).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1 << 16))]
    pub(crate) hidden: u64,
    /// Passes over the samples per store; the first pays first-touch page faults, later ones
    /// show the steady state with pooled buffers.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub(crate) rounds: u64,
    /// Root of the shared-directory store (default: a temporary directory, removed after).
    #[arg(long, value_name = "PATH")]
    pub(crate) dir: Option<PathBuf>,
}

/// `ferry bench ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// A store round trip (put + get_into + release) against two memcpys of the same bytes.
    Store(BenchStoreArgs),
}

/// `ferry bench store`.
#[derive(Debug, Args)]
pub(crate) struct BenchStoreArgs {
    /// Sample size in MiB (one bfloat16 tensor).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub(crate) size_mib: u64,
    /// Iterations per run (the best of 5 runs counts).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub(crate) iters: u64,
    /// Store backend.
    #[arg(long, value_enum, default_value_t = StoreKind::Mem)]
    pub(crate) store: StoreKind,
}

/// `ferry inspect`.
#[derive(Debug, Args)]
pub(crate) struct InspectArgs {
    /// A tensor file (`.ckpt`, `.ckpt.gz`, `.safetensors`), a JSONL file of SampleRefs or a
    /// manifest (`{"schema_version": .., "refs": [..]}`); `-` reads refs from stdin.
    #[arg(value_name = "PATH|-")]
    pub(crate) file: PathBuf,
    /// Machine-readable output. For a tensor file: one JSON object mapping each tensor name to
    /// `{"dtype", "shape", "nbytes", "sha256"}`. For refs: each ref re-serialized, one per line.
    #[arg(long)]
    pub(crate) json: bool,
    /// With --json on refs: Python's default spacing (manifests, the ledger) instead of compact.
    #[arg(long, requires = "json")]
    pub(crate) spaced: bool,
}

/// `ferry ingest`.
#[derive(Debug, Args)]
pub(crate) struct IngestArgs {
    /// A feature file or a directory of them (searched recursively, in lexicographic order).
    #[arg(value_name = "PATH")]
    pub(crate) input: PathBuf,
    /// The store to copy into, e.g. `dir:///mnt/shared/features` (append `?format=safetensors`
    /// to write safetensors instead of PyTorch zip).
    #[arg(long, value_name = "URI")]
    pub(crate) store: String,
    /// Where to write the manifest; its sentinels (`.producer_claim`, `.done`, `.failed`) go
    /// beside it.
    #[arg(long, value_name = "PATH")]
    pub(crate) manifest: PathBuf,
    /// Store id (namespace inside the store); default: the run id.
    #[arg(long)]
    pub(crate) store_id: Option<String>,
    /// Draft strategy; chooses the raw keys each file must hold.
    #[arg(long, default_value = "eagle3")]
    pub(crate) strategy: String,
    /// Run id; sample ids are `<run id>:<8-digit file index>`.
    #[arg(long, default_value = "disagg")]
    pub(crate) run_id: String,
    /// `metadata.ttt_length` of every ref.
    #[arg(long, default_value_t = 7)]
    pub(crate) ttt_length: i64,
    /// `metadata.max_len` of every ref.
    #[arg(long, default_value_t = 2048)]
    pub(crate) max_len: i64,
    /// Ingest only the first N files.
    #[arg(long)]
    pub(crate) limit: Option<usize>,
    /// Worker threads (default: one per core).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub(crate) workers: Option<u16>,
}
