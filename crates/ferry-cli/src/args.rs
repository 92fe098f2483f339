//! The command line as the user typed it (first stage). Checks here are only the ones clap can
//! state declaratively (ranges, choices, which flags go together); each subcommand's `Plan`
//! does the rest.

use crate::fault::Fault;
use crate::sample::Strategy;
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
    /// The online pipeline on this machine (embedded daemon, producer, 2-rank consumer), verified
    /// and timed; `--topology stores` runs each store alone against memcpy.
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
    /// Run the node daemon: one shared-memory arena and one lifecycle core for every client
    /// on this node (Unix socket, shared memory) and across nodes (TCP).
    Serve(ServeArgs),
    /// The online producer: synthetic EAGLE3 or DFlash capture into a store, refs published on the
    /// control directory's channel under the consumer's backpressure.
    Produce(ProduceArgs),
    /// The online consumer: rank 0's distributor and SQLite ledger, `--dp` ranks (threads)
    /// training optimizer steps (a checksum per sample) with the durable ack.
    Consume(ConsumeArgs),
    /// Print a daemon's health map.
    Status(StatusArgs),
    /// Write synthetic samples as an offline feature dump (SpecForge's layout, one `.ckpt` per
    /// sample), the same bytes `ferry produce` puts for the same seed, with their checksums.
    Synth(SynthArgs),
}

/// `ferry serve`.
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// TCP address to listen on, e.g. `0.0.0.0:7420` (clients: `ferry://host:7420`).
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) listen: Option<std::net::SocketAddr>,
    /// Unix socket path (clients on this node: `ferry+unix://<path>`; shared memory).
    #[arg(long, value_name = "PATH")]
    pub(crate) socket: Option<PathBuf>,
    /// Arena size, the most bytes the daemon holds, e.g. `8GiB` (allocated and pre-faulted at
    /// start).
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    pub(crate) capacity: u64,
    /// Store id (namespace of the refs it hands out); default: random.
    #[arg(long)]
    pub(crate) store_id: Option<String>,
    /// File holding the shared secret clients must prove (default: `FERRY_AUTH_TOKEN` from the
    /// environment; neither: no authentication).
    #[arg(long, value_name = "PATH")]
    pub(crate) secret_file: Option<PathBuf>,
    /// Serve Prometheus metrics at `http://HOST:PORT/metrics`.
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) metrics: Option<std::net::SocketAddr>,
    /// Free samples no client released after this many seconds (max-hold GC, every second).
    #[arg(long, value_name = "SECONDS")]
    pub(crate) max_hold: Option<u64>,
    /// Keep a sample's bytes when its last read lease ends: online consumers delete features
    /// only at their durable ack (and refuse a store that frees on release); offline data is
    /// re-read every epoch. Without it, a release frees (consume-once).
    #[arg(long)]
    pub(crate) retain_on_release: bool,
}

/// `ferry status`.
#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// The daemon: `ferry://host:port` or `ferry+unix:///path`.
    pub(crate) uri: String,
    /// File holding the shared secret (default: `FERRY_AUTH_TOKEN`).
    #[arg(long, value_name = "PATH")]
    pub(crate) secret_file: Option<PathBuf>,
    /// Print the health map as one JSON object.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Parses `8GiB`, `64MiB`, `4096`, `1.5 GB`.
pub(crate) fn parse_bytes(s: &str) -> Result<u64, String> {
    parse_size::parse_size(s).map_err(|e| format!("{s:?} is not a size like 64MiB or 8GiB: {e}"))
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
    /// What to run: the online pipeline (daemon, producer, 2-rank consumer) or each store alone.
    #[arg(long, value_enum, default_value_t = DemoTopology::Online)]
    pub(crate) topology: DemoTopology,
    /// Stores to run through (`--topology stores`).
    #[arg(long, value_enum, default_value_t = DemoStores::Both)]
    pub(crate) store: DemoStores,
    /// Samples (default: 64 online; 8 per store, all put before any is read back).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub(crate) samples: Option<u64>,
    /// Seed of the synthetic samples (online).
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Print the summary as one JSON object (online).
    #[arg(long)]
    pub(crate) json: bool,
    /// Tokens per sample (L).
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub(crate) seq_len: u64,
    /// Shortest sequence: each sample's L is drawn from [min, --seq-len] by its index
    /// (default: --seq-len, every sample the same length).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub(crate) min_seq_len: Option<u64>,
    /// Target hidden size (H); EAGLE3's hidden_state is (1, L, 3H), target (1, L, H).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1 << 16))]
    pub(crate) hidden: u64,
    /// The draft strategy whose sample layout to generate.
    #[arg(long, value_enum, default_value_t = Strategy::Eagle3)]
    pub(crate) strategy: Strategy,
    /// DFlash's target capture layers K: hidden_states is (1, L, K·H) (default 5).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub(crate) layers: Option<u64>,
    /// Passes over the samples per store; the first pays first-touch page faults, later ones
    /// show the steady state with pooled buffers.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub(crate) rounds: u64,
    /// Root of the shared-directory store (default: a temporary directory, removed after).
    #[arg(long, value_name = "PATH")]
    pub(crate) dir: Option<PathBuf>,
}

/// What `ferry demo` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum DemoTopology {
    /// An embedded daemon, an online producer and a 2-rank consumer, verified end to end.
    Online,
    /// Each store alone: put, read back (verified) and release, timed against memcpy.
    Stores,
}

/// `ferry bench ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// A store round trip (put + get_into + release) against two memcpys of the same bytes.
    Store(BenchStoreArgs),
    /// Put and get_into between a daemon and a separate client process, against memcpy and raw
    /// loopback TCP measured in the same run.
    Transfer(BenchTransferArgs),
    /// The client process of `bench transfer` (internal).
    #[command(hide = true)]
    TransferClient(TransferClientArgs),
    /// The online control plane end to end: publish, distribute through the SQLite ledger,
    /// inboxes, queues and the durable DP ack, in refs per second.
    Control(BenchControlArgs),
    /// A tensor-parallel shard of a weight fetched from the daemon: the view derived where the
    /// bytes are (only the shard moves) against fetching the whole weight and cutting locally.
    View(BenchViewArgs),
}

/// `ferry bench view`.
#[derive(Debug, Args)]
pub(crate) struct BenchViewArgs {
    /// The weight's size, e.g. `64MiB` (a bfloat16 matrix of about that size).
    #[arg(long, default_value = "64MiB", value_parser = parse_bytes)]
    pub(crate) size: u64,
    /// Tensor-parallel shards; the benchmark fetches one.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub(crate) shards: u64,
    /// Iterations per run (the best of 5 runs counts).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub(crate) iters: u64,
    /// Print one JSON object (weight_shape, shard_bytes, memcpy_shard_gbps, rows: route, dim,
    /// ranges, view_ms, whole_then_cut_ms, speedup, view_vs_memcpy).
    #[arg(long)]
    pub(crate) json: bool,
}

/// `ferry bench control`.
#[derive(Debug, Args)]
pub(crate) struct BenchControlArgs {
    /// Refs to publish.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub(crate) refs: u64,
    /// Data-parallel ranks (threads of this process, one inbox each).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub(crate) dp: u64,
    /// Refs per rank per micro-batch.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub(crate) batch: u64,
    /// Micro-batches per optimizer step (one durable ack each).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub(crate) accumulation: u64,
    /// Refs per producer publish call.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub(crate) publish_batch: u64,
    /// Directory for the channel, inboxes and ledger (the control mount); default: a temporary
    /// directory under the system's.
    #[arg(long, value_name = "PATH")]
    pub(crate) dir: Option<PathBuf>,
    /// Print one JSON object (refs, dp, refs_per_s, ...).
    #[arg(long)]
    pub(crate) json: bool,
}

/// The route `bench transfer` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum BenchRoute {
    /// Shared memory over the Unix socket.
    Shm,
    /// Payload bytes over loopback TCP.
    Tcp,
}

/// `ferry bench transfer`.
#[derive(Debug, Args)]
pub(crate) struct BenchTransferArgs {
    /// Object size, e.g. `64MiB`.
    #[arg(long, default_value = "64MiB", value_parser = parse_bytes)]
    pub(crate) size: u64,
    /// Iterations per run (the best of 5 runs counts).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub(crate) iters: u64,
    /// Route.
    #[arg(long, value_enum, default_value_t = BenchRoute::Shm)]
    pub(crate) route: BenchRoute,
    /// A running daemon to measure (`ferry://...` for tcp, `ferry+unix://...` for shm);
    /// default: start one in this process.
    #[arg(long, value_name = "URI")]
    pub(crate) daemon: Option<String>,
    /// Print one JSON object (route, size, put_gbps, get_gbps, memcpy_gbps, tcp_raw_gbps, ...).
    #[arg(long)]
    pub(crate) json: bool,
}

/// `ferry bench transfer-client`.
#[derive(Debug, Args)]
pub(crate) struct TransferClientArgs {
    #[arg(long)]
    pub(crate) uri: String,
    #[arg(long)]
    pub(crate) size: u64,
    #[arg(long)]
    pub(crate) iters: u64,
    #[arg(long, value_enum)]
    pub(crate) route: BenchRoute,
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
    /// The store to copy into: a shared directory, e.g. `dir:///mnt/shared/features` (append
    /// `?format=safetensors` to write safetensors instead of PyTorch zip), or a `ferry serve`
    /// daemon (`ferry://host:port`, `ferry+unix:///path/to.sock`).
    #[arg(long, value_name = "URI")]
    pub(crate) store: String,
    /// Where to write the manifest; its sentinels (`.producer_claim`, `.done`, `.failed`) go
    /// beside it, and a holding ingest waits for the consumer's `.consumed` there.
    #[arg(long, value_name = "PATH")]
    pub(crate) manifest: PathBuf,
    /// Store id (namespace inside a `dir://` store); default: the run id. A daemon's store id
    /// is its own (`ferry serve --store-id`).
    #[arg(long)]
    pub(crate) store_id: Option<String>,
    /// After `.done`, keep running until the consumer writes `<manifest>.consumed`, then free
    /// every ingested sample (`.consumer_failed`, the timeout or Ctrl-C free them too, and
    /// fail). `auto`: hold for a daemon, whose memory keeps the samples until someone frees
    /// them; not for `dir://`, whose files persist.
    #[arg(long, value_enum, default_value_t = HoldMode::Auto)]
    pub(crate) hold: HoldMode,
    /// Stop holding after this many seconds (a positive number), failing the attempt; default:
    /// wait without bound.
    #[arg(long, value_name = "SECONDS")]
    pub(crate) hold_timeout: Option<f64>,
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
    /// Fault injection for tests (`crate::fault`): crash (abort, no cleanup, no sentinel) at
    /// `put:N` or `cleanup`.
    #[arg(long, hide = true, value_name = "POINT", value_parser = Fault::parse)]
    pub(crate) fault: Option<Fault>,
}

/// `ferry ingest --hold`: whether ingest waits for the consumer, then frees the samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum HoldMode {
    /// Hold for a daemon store, not for a shared directory.
    Auto,
    /// Always hold.
    Always,
    /// Never hold: exit after `.done`, leaving the samples in the store.
    Never,
}

/// `ferry produce`.
#[derive(Debug, Args)]
pub(crate) struct ProduceArgs {
    /// The control directory shared with the consumer (`<dir>/refs.jsonl` and its sidecars).
    #[arg(long, value_name = "DIR")]
    pub(crate) control: PathBuf,
    /// The feature store: `dir://<root>` (shared directory) or a daemon (`ferry://host:port`,
    /// `ferry+unix:///path`).
    #[arg(long, value_name = "URI")]
    pub(crate) store: String,
    /// Prompts to capture (per epoch).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub(crate) samples: u64,
    /// Passes over the prompts.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub(crate) epochs: u32,
    /// Seed of the prompt order and the synthetic features.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Tokens per sample (the longest, with --min-seq-len).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub(crate) seq_len: u64,
    /// Shortest sequence: each sample's L is drawn from [min, --seq-len] by its index
    /// (default: --seq-len, every sample the same length).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub(crate) min_seq_len: Option<u64>,
    /// Target hidden size.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub(crate) hidden: u64,
    /// The draft strategy whose sample layout to generate.
    #[arg(long, value_enum, default_value_t = Strategy::Eagle3)]
    pub(crate) strategy: Strategy,
    /// DFlash's target capture layers K: hidden_states is (1, L, K·H) (default 5).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub(crate) layers: Option<u64>,
    /// Capture workers.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub(crate) workers: u64,
    /// Prompts per capture call.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub(crate) lease: u64,
    /// Pause at this many refs in flight (at least the consumer's quantum).
    #[arg(long, default_value_t = 256)]
    pub(crate) high_watermark: i64,
    /// Resume at this many refs in flight (default: the high watermark).
    #[arg(long)]
    pub(crate) low_watermark: Option<i64>,
    /// Give up waiting for the consumer after this many seconds.
    #[arg(long, default_value_t = 600.0)]
    pub(crate) peer_timeout: f64,
    /// Fault injection for tests (`crate::fault`): crash (abort, no cleanup, no sentinel) at
    /// `put:N`, `publish:N` (with `--workers 1`) or `cleanup`.
    #[arg(long, hide = true, value_name = "POINT", value_parser = Fault::parse)]
    pub(crate) fault: Option<Fault>,
    /// Print one JSON object.
    #[arg(long)]
    pub(crate) json: bool,
}

/// `ferry consume`: exactly one of `--control` (online), `--manifest` (disaggregated offline),
/// `--files` (colocated offline).
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["control", "manifest", "files"])))]
pub(crate) struct ConsumeArgs {
    /// Online: the control directory shared with the producer.
    #[arg(long, value_name = "DIR")]
    pub(crate) control: Option<PathBuf>,
    /// Disaggregated offline: the manifest `ferry ingest` publishes (waits for its `.done`;
    /// writes `.consumed` when every rank is done, `.consumer_failed` if one fails).
    #[arg(long, value_name = "PATH")]
    pub(crate) manifest: Option<PathBuf>,
    /// Colocated offline: a dump of feature files (`.ckpt`, `.ckpt.gz`) read in place.
    #[arg(long, value_name = "DIR")]
    pub(crate) files: Option<PathBuf>,
    /// The consumer's own state (ledger, inboxes, checkpoint); default: `<control>/consumer`.
    #[arg(long, value_name = "DIR")]
    pub(crate) state: Option<PathBuf>,
    /// The feature store (as for `ferry produce`); for `--control` and `--manifest`.
    #[arg(long, value_name = "URI", conflicts_with = "files")]
    pub(crate) store: Option<String>,
    /// The draft strategy whose collation the loader applies.
    #[arg(long, default_value = "eagle3")]
    pub(crate) strategy: String,
    /// Offline: passes over the data (each DP shard reshuffled per epoch).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub(crate) epochs: u64,
    /// Offline: the DP sampler's seed (the same on every rank).
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Offline: cut samples to this many tokens (default: each ref's `max_len`).
    #[arg(long)]
    pub(crate) max_len: Option<u64>,
    /// Offline: loader prefetch workers per rank (0: read on the training thread).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=64))]
    pub(crate) workers: u64,
    /// `--manifest`: give up waiting for the producer's `.done` after this many seconds
    /// (default: wait, as SpecForge's consumer does).
    #[arg(long)]
    pub(crate) wait_timeout: Option<f64>,
    /// Offline: write each batch's composition (`{"epoch", "rank", "step", "sample_ids"}`
    /// lines) here.
    #[arg(long, value_name = "PATH")]
    pub(crate) batches: Option<PathBuf>,
    /// Data-parallel ranks (threads of this process).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub(crate) dp: u64,
    /// Samples per rank per micro-batch.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub(crate) batch: u64,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub(crate) accum: u64,
    /// Resume the attempt whose ledger and checkpoint are in the state directory.
    #[arg(long)]
    pub(crate) resume: bool,
    /// Fail when no ref arrives for this many seconds while the channel is open.
    #[arg(long)]
    pub(crate) idle_timeout: Option<f64>,
    /// Write each trained sample's checksum (`{"sample_id": checksum}` lines) here.
    #[arg(long, value_name = "PATH")]
    pub(crate) checksums: Option<PathBuf>,
    /// Run only this rank, in this process (the others run in their own processes and join the
    /// same `--group`); default: every rank as a thread of this process.
    #[arg(long, requires = "group")]
    pub(crate) rank: Option<u64>,
    /// Where the ranks' processes meet: `tcp://<rank 0 host>:<port>` or `unix:///path` (rank 0
    /// listens there).
    #[arg(long, value_name = "ADDRESS", requires = "rank")]
    pub(crate) group: Option<String>,
    /// How long the ranks wait for each other, at the rendezvous and at each collective (a
    /// durable ack, the end of the run), before failing. A rank that dies is noticed at once
    /// (its connection closes); this bounds the wait for one that hangs or never starts.
    #[arg(long, value_name = "SECONDS", default_value_t = 600.0)]
    pub(crate) group_timeout: f64,
    /// Fault injection for tests (`crate::fault`): crash (abort, no cleanup, no sentinel) at
    /// `before-ack:K`, `after-ack:K`, `after-checkpoint:K` (online) or `train:N` (offline), on
    /// rank 0 or on `--rank`.
    #[arg(long, hide = true, value_name = "POINT", value_parser = Fault::parse)]
    pub(crate) fault: Option<Fault>,
    /// Online, the process running rank 0: serve every rank's inbox over HTTP at
    /// `http://<bind host>:<port>` (port 0: an ephemeral one; the origin is printed on stderr),
    /// so ranks without the state directory read theirs with `--inbox-url` (SpecForge's HTTP
    /// inbox relay: no authentication, a private network only).
    #[arg(long, value_name = "ORIGIN")]
    pub(crate) inbox_serve: Option<String>,
    /// Online: ranks other than 0 read their inbox from rank 0's relay at `http://host:port`
    /// instead of the state directory. Rank 0 serves on that port, bound to
    /// `DISAGG_INBOX_SERVER_BIND_HOST` (default every interface), unless `--inbox-serve` says
    /// where.
    #[arg(long, value_name = "ORIGIN", env = "DISAGG_INBOX_SERVER_URL")]
    pub(crate) inbox_url: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    pub(crate) json: bool,
}

/// `ferry synth`.
#[derive(Debug, Args)]
pub(crate) struct SynthArgs {
    /// Where to write `rows_<g>-<g+1000>/data_<i>.ckpt` (8-digit numbers, so file order is
    /// sample order) and `checksums.jsonl`; created if missing, must be empty.
    #[arg(value_name = "DIR")]
    pub(crate) out: PathBuf,
    /// Samples (files) to write.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub(crate) samples: u64,
    /// Seed of the synthetic features (`ferry produce --seed`: the same bytes as its epoch 0).
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// The draft strategy whose offline layout to write.
    #[arg(long, value_enum, default_value_t = Strategy::Eagle3)]
    pub(crate) strategy: Strategy,
    /// Tokens per sample (the longest, with --min-seq-len).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub(crate) seq_len: u64,
    /// Shortest sequence: each sample's L is drawn from [min, --seq-len] by its index
    /// (default: --seq-len, every sample the same length).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub(crate) min_seq_len: Option<u64>,
    /// Target hidden size.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub(crate) hidden: u64,
    /// DFlash's target capture layers K: hidden_states is (1, L, K·H) (default 5).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub(crate) layers: Option<u64>,
    /// Writer threads (default: one per core).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub(crate) workers: Option<u16>,
}
