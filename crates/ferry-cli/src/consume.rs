//! `ferry consume`: one consumer role for the three ways refs reach a trainer
//! (`SPECFORGE-RUNTIME.md` §1), over one loader path where only the ref source and the store
//! change:
//!
//! | source | refs | store | iteration |
//! | --- | --- | --- | --- |
//! | `--files <dump>` (colocated offline) | lazy `file://` refs of the dump | none (files read in place) | epochs, DP shards |
//! | `--manifest <path>` (disaggregated offline) | the manifest, after `.done` | `--store` (shared dir or daemon) | epochs, DP shards; `.consumed` / `.consumer_failed` |
//! | `--control <dir>` (online) | rank 0's distributor → per-rank inboxes | `--store` | consume-once, durable ack per optimizer step, `--resume` |
//!
//! Online, ranks other than 0 can read their inbox over HTTP from rank 0 instead of the state
//! directory (SpecForge's inbox relay, `ferry_control::http_inbox`): rank 0 serves it with
//! `--inbox-serve` (or on `--inbox-url`'s port), the others read `--inbox-url`
//! (`DISAGG_INBOX_SERVER_URL`).
//!
//! Ranks are threads of this process, or separate processes (`--rank`, `--group`). The
//! "training step" is [`crate::train::batch_checksums`] over each batch the loader yields,
//! recorded per sample (`--checksums`), and offline the batches' composition (`--batches`), so
//! runs of different topologies over the same seed can be compared sample by sample.

use crate::args::ConsumeArgs;
use crate::fault::{self, Fault};
use crate::liveness;
use crate::online::{open_any, write_checksums};
use crate::stores::seconds;
use anyhow::{Context, Result, bail};
use ferry_control::OfflineControl;
use ferry_control::channel::{FileRefChannel, RefSink, sidecar};
use ferry_control::collective::{Collective, GroupAddress, LocalGroup, SocketGroup};
use ferry_control::http_inbox::{self, InboxHttpServer, RemoteInbox};
use ferry_control::offline_consumer::run_offline_rank;
use ferry_control::online::{ConsumerConfig, agree_on_rank0_setup, publish_consumer_failure_text, run_rank_with};
use ferry_core::{SampleRef, TrainBatch};
use ferry_loader::{DpSharding, FeatureLoader, RefSource};
use ferry_store::offline::{OfflineRefOptions, offline_refs};
use ferry_store::{FeatureStoreApi, StoreOptions, open_store};
use serde_json::{Value, json};
use std::cell::Cell;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Poll interval for control files.
const POLL: Duration = Duration::from_millis(5);

/// What every rank records: per-sample checksums, and (offline) each batch's composition.
#[derive(Default)]
pub(crate) struct Records {
    /// `(sample id, checksum)` of every sample trained, in training order per rank.
    pub(crate) trained: Mutex<Vec<(String, u64)>>,
    /// `{"epoch", "rank", "step", "sample_ids"}` per batch (offline topologies).
    batches: Mutex<Vec<Value>>,
    /// Bytes of the batches the loader built (padding included).
    batch_bytes: AtomicU64,
    /// Nanoseconds the ranks spent waiting for their next batch (online: for the next
    /// optimizer step's refs; offline: for the loader's next batch), summed over ranks.
    wait_ns: AtomicU64,
}

impl Records {
    /// Records one batch: its checksums, and where it sits in the offline order.
    fn record(&self, batch: &TrainBatch, position: Option<(u64, usize, usize)>) -> ferry_core::Result<usize> {
        let sums = crate::train::batch_checksums(batch)?;
        let n = sums.len();
        let bytes: usize = batch.tensors.values().map(|t| t.bytes().len()).sum();
        self.batch_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.trained.lock().unwrap_or_else(|p| p.into_inner()).extend(sums);
        if let Some((epoch, rank, step)) = position {
            let ids: Vec<String> = batch.sample_ids.iter().map(ToString::to_string).collect();
            let line = json!({"epoch": epoch, "rank": rank, "step": step, "sample_ids": ids});
            self.batches.lock().unwrap_or_else(|p| p.into_inner()).push(line);
        }
        Ok(n)
    }

    /// Samples recorded so far.
    pub(crate) fn trained_count(&self) -> usize {
        self.trained.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Adds time a rank waited for data.
    fn waited(&self, since: Instant) {
        let ns = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.wait_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Seconds the ranks have waited for data, summed over ranks.
    pub(crate) fn wait_seconds(&self) -> f64 {
        self.wait_ns.load(Ordering::Relaxed) as f64 / 1e9
    }
}

/// `ferry consume`.
pub(crate) fn consume(mut args: ConsumeArgs, out: &mut dyn Write) -> Result<()> {
    settle_inbox_url(&mut args);
    if let Some(fault) = args.fault {
        fault.check_role("consume")?;
        match (fault, args.control.is_some()) {
            (Fault::Train(_), true) => bail!("--fault {fault} applies to an offline consumer (--manifest, --files)"),
            (Fault::Train(_), false) | (_, true) => {}
            (_, false) => bail!("--fault {fault} applies to the online consumer (--control)"),
        }
    }
    if args.control.is_none() {
        let online_only = [
            ("--resume", args.resume),
            ("--idle-timeout", args.idle_timeout.is_some()),
            ("--state", args.state.is_some()),
            ("--inbox-serve", args.inbox_serve.is_some()),
            // From the environment it is SpecForge's launcher setting, which offline runs ignore.
            ("--inbox-url", args.inbox_url.is_some() && !inbox_url_from_env(&args)),
        ];
        if let Some((flag, _)) = online_only.iter().find(|(_, set)| *set) {
            bail!("{flag} applies to the online consumer (--control); offline runs re-read their refs every epoch");
        }
    }
    let started = Instant::now();
    let records = Arc::new(Records::default());
    let (summary, failure) = match (&args.control, &args.manifest, &args.files) {
        (Some(control), None, None) => online(&args, control, &records)?,
        (None, Some(manifest), None) => offline(&args, OfflineSource::Manifest(manifest.clone()), &records)?,
        (None, None, Some(files)) => offline(&args, OfflineSource::Files(files.clone()), &records)?,
        _ => bail!(
            "give exactly one of --control (online), --manifest (disaggregated offline), --files (colocated offline)"
        ),
    };
    let trained = records.trained.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if let Some(path) = &args.checksums {
        write_checksums(path, &trained)?;
    }
    if let Some(path) = &args.batches {
        let batches = records.batches.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let text: String = batches.iter().map(|b| format!("{b}\n")).collect();
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(e) = failure {
        return Err(e);
    }
    let seconds = started.elapsed().as_secs_f64();
    let bytes = records.batch_bytes.load(Ordering::Relaxed);
    let gbps = bytes as f64 / seconds.max(1e-9) / 1e9;
    let mut summary = summary;
    summary.insert("trained".into(), json!(trained.len()));
    summary.insert("dp".into(), json!(args.dp));
    summary.insert("seconds".into(), json!(seconds));
    summary.insert("batch_bytes".into(), json!(bytes));
    summary.insert("gbps".into(), json!(gbps));
    summary.insert("loader_wait_s".into(), json!(records.wait_seconds()));
    if args.json {
        writeln!(out, "{}", Value::Object(summary))?;
    } else {
        let steps = summary.get("optimizer_steps").or_else(|| summary.get("batches")).cloned().unwrap_or(json!(0));
        writeln!(
            out,
            "consumed {} samples ({steps} steps) over {} ranks in {seconds:.2} s ({gbps:.2} GB/s of batches); \
             the ranks waited {:.2} s for data",
            trained.len(),
            args.dp,
            records.wait_seconds()
        )?;
    }
    Ok(())
}

/// This process's ranks, and a rank's link to rank 0 when it runs in its own process.
type Ranks = (Vec<Arc<dyn Collective>>, Option<liveness::Link>);

/// The ranks this process runs: one joining a process group (with its link to rank 0 on the
/// other ranks, see [`crate::liveness`]), or all of them as threads.
fn groups(args: &ConsumeArgs) -> Result<Ranks> {
    let dp = args.dp as usize;
    let timeout = seconds(args.group_timeout, "--group-timeout")?;
    Ok(match (args.rank, &args.group) {
        (Some(rank), Some(address)) => {
            let address = GroupAddress::parse(address)?;
            if rank == 0
                && let GroupAddress::Unix(path) = &address
            {
                remove_stale_socket(path)?;
            }
            let group = SocketGroup::rendezvous(&address, "ferry-consume", rank as usize, dp, timeout)
                .with_context(|| format!("joining the consumer's process group as rank {rank}"))?;
            let link = liveness::establish(&group, &address)
                .with_context(|| format!("linking rank {rank} of the consumer's process group to rank 0"))?;
            (vec![Arc::new(group)], link)
        }
        _ => (LocalGroup::new(dp, timeout).into_iter().map(|g| Arc::new(g) as Arc<dyn Collective>).collect(), None),
    })
}

/// Removes the Unix socket file an earlier rank 0 left at `path` (a crash leaves it, and so
/// does a clean exit), so a restarted rank 0 can listen there again; a socket someone still
/// listens on is left alone (the rendezvous then fails: another group uses the address).
pub(crate) fn remove_stale_socket(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt as _;
    let Ok(meta) = std::fs::symlink_metadata(path) else { return Ok(()) };
    let refused = |e: std::io::Error| e.kind() == std::io::ErrorKind::ConnectionRefused;
    if meta.file_type().is_socket() && std::os::unix::net::UnixStream::connect(path).is_err_and(refused) {
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale group socket {} of an earlier rank 0", path.display()))?;
    }
    Ok(())
}

/// Runs `body` for every rank of this process on its own thread; returns each rank's result.
fn run_ranks<T: Send + 'static>(
    groups: Vec<Arc<dyn Collective>>,
    body: impl Fn(Arc<dyn Collective>) -> ferry_core::Result<T> + Send + Sync + 'static,
) -> Result<Vec<ferry_core::Result<T>>> {
    let body = Arc::new(body);
    let threads: Vec<_> = groups
        .into_iter()
        .map(|group| {
            let body = Arc::clone(&body);
            std::thread::Builder::new()
                .name(format!("ferry-rank-{}", group.rank()))
                .spawn(move || body(group))
                .context("starting a rank thread")
        })
        .collect::<Result<_>>()?;
    threads.into_iter().map(|t| t.join().map_err(|_| anyhow::anyhow!("a rank thread panicked"))).collect()
}

/// The first error of `results`, as the role's failure.
fn first_failure<T>(results: &mut Vec<ferry_core::Result<T>>, what: &str) -> Option<anyhow::Error> {
    let index = results.iter().position(Result::is_err)?;
    let e = results.remove(index).err()?;
    Some(anyhow::Error::new(e).context(format!("the {what} failed")))
}

type Summary = serde_json::Map<String, Value>;

/// Whether `--inbox-url` holds `DISAGG_INBOX_SERVER_URL` rather than a flag the user typed.
fn inbox_url_from_env(args: &ConsumeArgs) -> bool {
    let env = std::env::var_os(http_inbox::SERVER_URL_ENV);
    env.is_some() && env.as_deref() == args.inbox_url.as_deref().map(std::ffi::OsStr::new)
}

/// Drops an `--inbox-url` that came from SpecForge's launcher environment where SpecForge ignores
/// it too: empty, or a single rank (no rank reads remotely; rank 0 reads its own file). A flag
/// typed on the command line is kept, and refused later where it makes no sense.
fn settle_inbox_url(args: &mut ConsumeArgs) {
    if !inbox_url_from_env(args) {
        return;
    }
    if args.inbox_url.as_deref().is_some_and(|u| u.trim().is_empty()) || args.dp < 2 {
        tracing::debug!(dp = args.dp, "ignoring {} for this run", http_inbox::SERVER_URL_ENV);
        args.inbox_url = None;
    }
}

/// The online consumer (§14.3).
fn online(args: &ConsumeArgs, control: &Path, records: &Arc<Records>) -> Result<(Summary, Option<anyhow::Error>)> {
    let store_uri = args.store.clone().context("--control needs --store: the store the producer puts into")?;
    let state = args.state.clone().unwrap_or_else(|| control.join("consumer"));
    let checkpoint_path = state.join("checkpoint");
    let checkpoint_step: i64 = if args.resume {
        let text = std::fs::read_to_string(&checkpoint_path).unwrap_or_else(|_| "0".into());
        text.trim().parse().with_context(|| format!("reading the checkpoint {}", checkpoint_path.display()))?
    } else {
        0
    };
    let config = ConsumerConfig {
        run_id: "online".into(),
        channel: control.join("refs.jsonl"),
        inbox_dir: state.join("inboxes"),
        ledger: state.join("consumer.sqlite"),
        dp_size: args.dp as usize,
        batch_size: args.batch as usize,
        accumulation: args.accum as usize,
        resume: args.resume,
        checkpoint_step,
        idle_timeout: args.idle_timeout.map(|s| seconds(s, "--idle-timeout")).transpose()?,
        poll: Duration::from_millis(2),
    };
    // The relay starts before the group's rendezvous: a rank in another process may need its
    // printed port to start, and no rank reads its inbox before rank 0's setup is agreed.
    let relay = InboxRelay::start(args, &config)?;
    let (groups, link) = groups(args)?;
    let remote: Vec<Option<Arc<RemoteInbox>>> =
        groups.iter().map(|g| relay.inbox_for(g.rank())).collect::<Result<_>>()?;
    if let Some(link) = link {
        // A rank in its own process: if rank 0's process dies before the attempt is done, fail
        // this rank's inbox, so a rank waiting for its next step stops (see `crate::liveness`).
        let rank = groups.first().map_or(0, |g| g.rank());
        let (channel, inbox) = (config.channel.clone(), FileRefChannel::inbox(&config.inbox_dir, rank));
        let remote_inbox = remote.first().cloned().flatten();
        link.watch(move || {
            if !sidecar::exists(&channel, sidecar::CONSUMER_DONE) {
                let reason = format!(
                    "ConnectionError: consumer rank 0 (the ref distributor) is gone: its process ended while rank \
                     {rank} waited for its next step (see rank 0's error)"
                );
                if let Some(remote) = &remote_inbox {
                    remote.poison(&reason);
                } else if let Err(e) = RefSink::fail(&inbox, &reason) {
                    tracing::error!(error = %e, "could not fail the inbox after rank 0 was gone");
                }
            }
        })?;
    }
    let remote = Mutex::new(groups.iter().map(|g| g.rank()).zip(remote).collect::<Vec<_>>());
    // One store client per rank, opened here where a failure is the role's error.
    let stores = Mutex::new(groups.iter().map(|_| open_any(&store_uri)).collect::<Result<Vec<_>>>()?);
    let (strategy, records) = (args.strategy.clone(), Arc::clone(records));
    let fault = FaultOnRank::new(args);
    let mut results = run_ranks(groups, move |group| {
        let store = stores
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .ok_or_else(|| ferry_core::Error::InvalidArgument("more ranks than opened stores".into()))?;
        let fault = fault.on(group.rank());
        let inbox = remote
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(r, _)| *r == group.rank())
            .and_then(|(_, inbox)| inbox.clone())
            .map(|i| i as Arc<dyn ferry_control::channel::RefSource>);
        let rank = OnlineRank { strategy: &strategy, checkpoint: Some(&checkpoint_path), fault, inbox };
        rank.run(&config, group, store, &records)
    })?;
    relay.stop();
    let failure = first_failure(&mut results, "online consumer");
    let steps = results.iter().filter_map(|r| r.as_ref().ok()).map(|(s, _)| *s).max().unwrap_or(0);
    let mut summary = Summary::new();
    summary.insert("optimizer_steps".into(), json!(steps));
    Ok((summary, failure))
}

/// One online rank's options beyond the shared config.
pub(crate) struct OnlineRank<'a> {
    /// The loader's strategy.
    pub(crate) strategy: &'a str,
    /// Rank 0 saves the checkpoint step here after each durable ack.
    pub(crate) checkpoint: Option<&'a Path>,
    /// Fault injection (`--fault`): crash before a step's durable ack, after it, or after its
    /// checkpoint.
    pub(crate) fault: Option<Fault>,
    /// The rank's inbox when it is not the file under the state directory (a rank other than 0
    /// reading rank 0's HTTP relay).
    pub(crate) inbox: Option<Arc<dyn ferry_control::channel::RefSource>>,
}

impl OnlineRank<'_> {
    /// One consumer rank: setup agreement, the distributor on rank 0, optimizer steps whose
    /// micro-batches the feature loader materializes and [`Records`] checksums, and on rank 0
    /// the checkpoint after each durable ack. Returns `(optimizer steps, refs)`.
    pub(crate) fn run(
        &self,
        config: &ConsumerConfig,
        group: Arc<dyn Collective>,
        store: Arc<dyn FeatureStoreApi>,
        records: &Records,
    ) -> ferry_core::Result<(u64, u64)> {
        let rank = group.rank();
        let rank0 = agree_on_rank0_setup(config, group.as_ref(), Some(Arc::clone(&store)))?;
        let distributor = rank0.as_ref().map(|r| r.distributor.start()).transpose()?;
        // The loader's own source is unused: refs arrive per optimizer step from the inbox.
        let loader = FeatureLoader::builder(Arc::clone(&store), RefSource::Fixed(Vec::new()))
            .strategy(self.strategy)
            .gc_interval(None)
            .build()?;
        // Waiting for data: from the end of one step (its durable ack) to the next step's refs.
        let step_done = Cell::new(Instant::now());
        // The global step the next `train` call trains (a resume continues the checkpoint's).
        let training = Cell::new(config.checkpoint_step + 1);
        let train = |step: &[Vec<SampleRef>]| {
            records.waited(step_done.get());
            for micro_batch in step.iter().filter(|refs| !refs.is_empty()) {
                records.record(&loader.load_batch(micro_batch)?, None)?;
            }
            if let Some(fault @ Fault::BeforeAck(k)) = self.fault
                && k == training.get()
            {
                fault::fire(fault);
            }
            Ok(())
        };
        let on_durable = |step: i64| {
            step_done.set(Instant::now());
            training.set(step + 1);
            if let Some(fault @ Fault::AfterAck(k)) = self.fault
                && k == step
            {
                fault::fire(fault);
            }
            if rank == 0
                && let Some(path) = self.checkpoint
            {
                save_checkpoint(path, step)?;
            }
            if let Some(fault @ Fault::AfterCheckpoint(k)) = self.fault
                && k == step
            {
                fault::fire(fault);
            }
            Ok(())
        };
        let result = match &self.inbox {
            Some(inbox) if rank != 0 => ferry_control::http_inbox::rank::run_rank_over(
                config,
                group,
                Arc::clone(inbox),
                Some(store),
                train,
                on_durable,
            ),
            _ => run_rank_with(config, group, rank0.as_ref(), Some(store), train, on_durable),
        };
        if let Some(d) = distributor {
            let _ = d.stop();
        }
        result.map(|r| (r.steps, r.refs))
    }
}

/// The HTTP inbox relay of this process (`--inbox-serve`, `--inbox-url`): rank 0's server,
/// and where the ranks other than 0 read their inboxes.
struct InboxRelay {
    server: Option<InboxHttpServer>,
    read_from: Option<String>,
}

impl InboxRelay {
    /// Starts rank 0's server if this process runs rank 0 and a relay is asked for.
    fn start(args: &ConsumeArgs, config: &ConsumerConfig) -> Result<InboxRelay> {
        let runs_rank0 = args.rank.is_none_or(|r| r == 0);
        if !runs_rank0 && args.inbox_serve.is_some() {
            bail!(
                "--inbox-serve applies to the process running rank 0; rank {} reads with --inbox-url",
                args.rank.unwrap_or(0)
            );
        }
        let listen = match (&args.inbox_serve, &args.inbox_url) {
            (Some(serve), _) => {
                let origin = http_inbox::Origin::parse(serve)?;
                Some((serve.clone(), origin.host().to_owned()))
            }
            (None, Some(url)) => {
                let bind = std::env::var(http_inbox::BIND_HOST_ENV)
                    .ok()
                    .filter(|h| !h.is_empty())
                    .unwrap_or_else(|| http_inbox::DEFAULT_BIND_HOST.to_owned());
                Some((url.clone(), bind))
            }
            (None, None) => None,
        };
        let server = match listen {
            Some((origin, bind)) if runs_rank0 => {
                let server = InboxHttpServer::new(&config.inbox_dir, config.dp_size, &origin, &bind)
                    .context("--inbox-serve / --inbox-url: rank 0's inbox relay")?;
                let addr = match server.start() {
                    Ok(addr) => addr,
                    Err(e) => {
                        // The flags were right but the relay cannot listen (the port is taken):
                        // rank 0 never runs, so tell the producer (and the ranks polling for
                        // their inboxes) now instead of leaving them to their idle timeouts.
                        let e = anyhow::Error::new(e).context(format!("starting rank 0's inbox relay at {origin}"));
                        if !sidecar::exists(&config.channel, sidecar::CONSUMER_DONE) {
                            publish_consumer_failure_text(config, &format!("RuntimeError: {e:#}"));
                        }
                        return Err(e);
                    }
                };
                eprintln!(
                    "ferry consume: serving the rank inboxes of {} at {} (listening on {addr})",
                    config.inbox_dir.display(),
                    server.origin()
                );
                Some(server)
            }
            _ => None,
        };
        // Ranks in this process read the given origin, or (all ranks as threads) the server.
        let read_from = match (&args.inbox_url, &server) {
            (Some(url), _) => Some(url.clone()),
            (None, Some(server)) if args.rank.is_none() => {
                let origin = server.origin();
                let host = match origin.host() {
                    "0.0.0.0" => "127.0.0.1",
                    "::" => "::1",
                    other => other,
                };
                Some(http_inbox::Origin::new(host, origin.port())?.to_string())
            }
            _ => None,
        };
        Ok(InboxRelay { server, read_from })
    }

    /// Rank `rank`'s remote inbox, if it reads one (rank 0 always reads its file).
    fn inbox_for(&self, rank: usize) -> Result<Option<Arc<RemoteInbox>>> {
        match &self.read_from {
            Some(origin) if rank != 0 => {
                Ok(Some(Arc::new(RemoteInbox::new(origin, rank, INBOX_HTTP_TIMEOUT).context("--inbox-url")?)))
            }
            _ => Ok(None),
        }
    }

    /// Stops rank 0's server (after every rank of this process is done).
    fn stop(&self) {
        if let Some(server) = &self.server
            && let Err(e) = server.stop()
        {
            tracing::warn!(error = %e, "rank 0's inbox relay did not stop cleanly");
        }
    }
}

/// Each relay request's timeout (SpecForge's).
const INBOX_HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// A `--fault` and the rank it fires on: rank 0, or this process's `--rank`.
#[derive(Debug, Clone, Copy)]
struct FaultOnRank {
    fault: Option<Fault>,
    rank: usize,
}

impl FaultOnRank {
    fn new(args: &ConsumeArgs) -> FaultOnRank {
        FaultOnRank { fault: args.fault, rank: args.rank.map_or(0, |r| r as usize) }
    }

    /// The fault, on the rank it fires on.
    fn on(self, rank: usize) -> Option<Fault> {
        self.fault.filter(|_| rank == self.rank)
    }
}

/// Writes the trainer's checkpoint step atomically (a stand-in for saving model and optimizer).
fn save_checkpoint(path: &Path, step: i64) -> ferry_core::Result<()> {
    ferry_control::atomic::write_control_file(path, step.to_string().as_bytes())
}

/// Where an offline consumer's refs come from.
enum OfflineSource {
    /// A dump read in place (colocated).
    Files(PathBuf),
    /// A producer's manifest (disaggregated).
    Manifest(PathBuf),
}

/// What every offline rank shares.
struct OfflinePlan {
    dp: usize,
    batch: usize,
    epochs: u64,
    seed: u64,
    strategy: String,
    max_len: Option<u64>,
    workers: usize,
    /// Fault injection (`--fault train:N`).
    fault: FaultOnRank,
}

impl OfflinePlan {
    /// Trains `refs` for every epoch on `rank`'s shard; returns the batches run.
    fn train(
        &self,
        rank: usize,
        store: Arc<dyn FeatureStoreApi>,
        refs: Vec<SampleRef>,
        records: &Records,
    ) -> ferry_core::Result<u64> {
        let mut builder = FeatureLoader::builder(store, RefSource::Fixed(refs))
            .batch_size(self.batch)
            .drop_last(false)
            .strategy(self.strategy.clone())
            .num_workers(self.workers)
            .dp_sharding(DpSharding::new(self.dp, rank, self.seed));
        if let Some(max_len) = self.max_len {
            builder = builder.max_len(max_len);
        }
        let mut loader = builder.build()?;
        let crash_after = match self.fault.on(rank) {
            Some(Fault::Train(n)) => Some(n),
            _ => None,
        };
        let mut batches = 0;
        for epoch in 0..self.epochs {
            loader.set_epoch(epoch);
            let mut asked = Instant::now();
            for (step, batch) in loader.iter().enumerate() {
                records.waited(asked);
                records.record(&batch?, Some((epoch, rank, step)))?;
                batches += 1;
                if crash_after == Some(batches) {
                    fault::fire(Fault::Train(batches));
                }
                asked = Instant::now();
            }
        }
        Ok(batches)
    }
}

/// The store a manifest's refs name: a daemon, or a shared directory opened under the refs'
/// store id, keeping bytes on release (every epoch re-reads them).
fn open_manifest_store(uri: &str, refs: &[SampleRef]) -> ferry_core::Result<Arc<dyn FeatureStoreApi>> {
    if crate::stores::is_daemon_uri(uri) {
        return Ok(ferry_net::Client::connect(uri)?.into());
    }
    let store_id = refs
        .first()
        .and_then(|r| r.feature_store_uri.split_once("://"))
        .and_then(|(_, rest)| rest.split('/').next())
        .map(|id| ferry_core::StoreId::from(id.to_owned()));
    let options = StoreOptions { store_id, retain_on_release: true, ..StoreOptions::default() };
    Ok(open_store(uri, options)?.into())
}

/// The offline consumers: colocated over a dump, or disaggregated over a manifest.
fn offline(
    args: &ConsumeArgs,
    source: OfflineSource,
    records: &Arc<Records>,
) -> Result<(Summary, Option<anyhow::Error>)> {
    let plan = Arc::new(OfflinePlan {
        dp: args.dp as usize,
        batch: args.batch as usize,
        epochs: args.epochs,
        seed: args.seed,
        strategy: args.strategy.clone(),
        max_len: args.max_len,
        workers: args.workers as usize,
        fault: FaultOnRank::new(args),
    });
    // Offline ranks wait on no inbox: a dead peer fails them at the next collective.
    let (groups, _link) = groups(args)?;
    let records = Arc::clone(records);
    let mut results = match source {
        OfflineSource::Files(dump) => {
            let options = OfflineRefOptions {
                run_id: "offline".into(),
                strategy: args.strategy.clone(),
                feature_keys: crate::strategy::offline_raw_keys(&args.strategy)?,
                ..OfflineRefOptions::default()
            };
            let refs = offline_refs(&dump, &options, false).with_context(|| format!("listing {}", dump.display()))?;
            if refs.is_empty() {
                bail!("no feature files under {}", dump.display());
            }
            // `file://` refs are read in place by any store in this process.
            let store: Arc<dyn FeatureStoreApi> = open_store("mem://colocated", StoreOptions::default())?.into();
            run_ranks(groups, move |group| plan.train(group.rank(), Arc::clone(&store), refs.clone(), &records))?
        }
        OfflineSource::Manifest(manifest) => {
            let uri = args.store.clone().context("--manifest needs --store: the store the producer ingested into")?;
            let control = OfflineControl::new(manifest);
            let deadline =
                args.wait_timeout.map(|s| seconds(s, "--wait-timeout")).transpose()?.map(|d| Instant::now() + d);
            run_ranks(groups, move |group| {
                run_offline_rank(&control, group.as_ref(), deadline, POLL, |refs| {
                    let store = open_manifest_store(&uri, &refs)?;
                    plan.train(group.rank(), store, refs, &records)
                })
            })?
        }
    };
    let failure = first_failure(&mut results, "offline consumer");
    let batches: u64 = results.iter().filter_map(|r| r.as_ref().ok()).sum();
    let mut summary = Summary::new();
    summary.insert("batches".into(), json!(batches));
    summary.insert("epochs".into(), json!(args.epochs));
    Ok((summary, failure))
}
