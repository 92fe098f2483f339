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
    /// Read and validate ferry / SpecForge control-plane files.
    Inspect {
        /// What to read.
        #[command(subcommand)]
        what: InspectCommand,
    },
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

/// `ferry inspect ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum InspectCommand {
    /// SampleRef JSON lines (a ref channel, an inbox) or a ref manifest.
    Ref(InspectRefArgs),
}

/// `ferry inspect ref`.
#[derive(Debug, Args)]
pub(crate) struct InspectRefArgs {
    /// JSONL file of SampleRefs or a manifest (`{"schema_version": .., "refs": [..]}`); `-` reads
    /// stdin.
    #[arg(value_name = "FILE|-")]
    pub(crate) file: PathBuf,
    /// Re-emit each ref as normalized JSON, one per line, instead of a summary.
    #[arg(long)]
    pub(crate) json: bool,
    /// With --json: Python's default spacing (manifests, the ledger) instead of compact (channels).
    #[arg(long, requires = "json")]
    pub(crate) spaced: bool,
}
