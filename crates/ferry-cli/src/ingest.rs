//! `ferry ingest`: copy offline feature files (`.ckpt`, `.ckpt.gz`, `.safetensors`) into a store
//! and publish SpecForge's manifest with its sentinel protocol (`ferry_control::ingest`), with a
//! progress bar (files, bytes, rate, ETA) on stderr when it is a terminal.
//!
//! The store is a shared directory (`dir://`, opened in this process) or a `ferry serve` daemon
//! (`ferry://host:port`, `ferry+unix://path`). A daemon keeps the samples in its memory until
//! someone frees them, so by default (`--hold auto`) ingest into a daemon holds: after `.done`
//! it waits for the consumer's `<manifest>.consumed` (saying so on stderr), then frees every
//! sample it published. A shared directory's files persist for any later reader, so ingest
//! there exits after `.done`. Ctrl-C or SIGTERM stop the attempt cleanly (workers take no more
//! files, a hold ends): `.failed` is written and the published samples are freed; a second
//! signal exits at once. Its daemon session owns what it puts, so ingest never leaves orphans
//! behind: if it dies before `.done`, or while holding, the daemon frees its samples; without a
//! hold it hands them over right after `.done`.

use crate::args::{HoldMode, IngestArgs};
use crate::fault::{Fault, FaultyStore};
use anyhow::{Context, Result, bail};
use ferry_control::signal::StopSignal;
use ferry_control::{Hold, IngestOptions, OfflineControl, ProducerError, ProducerEvent, run_offline_producer_on};
use ferry_store::offline::{OfflineRefOptions, list_feature_files};
use ferry_store::{FeatureStoreApi, StoreOptions, StoreUri, open_store};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::stores::is_daemon_uri;

/// What `ferry ingest` will do.
#[derive(Debug)]
pub(crate) struct Plan {
    input: PathBuf,
    store_uri: String,
    /// The namespace of a `dir://` store; `None` for a daemon (its store id is its own).
    store_id: Option<String>,
    control: OfflineControl,
    options: IngestOptions,
    /// Fault injection for tests (`--fault`).
    fault: Option<Fault>,
}

impl Plan {
    /// Validates the arguments: the store must outlive this process, and a hold timeout is a
    /// positive number of seconds given only when ingest holds.
    pub(crate) fn from_args(args: IngestArgs) -> Result<Plan> {
        if let Some(fault) = args.fault {
            fault.check_role("ingest")?;
        }
        let daemon = is_daemon_uri(&args.store);
        if daemon {
            if let Some(id) = &args.store_id {
                bail!(
                    "--store-id {id}: a daemon's store id is its own (set with `ferry serve --store-id`); drop --store-id"
                );
            }
        } else if let StoreUri::Memory { .. } = StoreUri::parse(&args.store)? {
            bail!(
                "--store {}: a mem:// store vanishes when ingest exits; use dir://<root> or a ferry serve daemon",
                args.store
            );
        }
        let holds = match args.hold {
            HoldMode::Auto => daemon,
            HoldMode::Always => true,
            HoldMode::Never => false,
        };
        let timeout = args.hold_timeout.map(|s| hold_timeout(s, holds, &args.store)).transpose()?;
        let feature_keys = crate::strategy::offline_raw_keys(&args.strategy)?;
        let refs = OfflineRefOptions {
            run_id: args.run_id,
            strategy: args.strategy,
            feature_keys,
            ttt_length: args.ttt_length,
            max_len: args.max_len,
            ..OfflineRefOptions::default()
        };
        let workers = args.workers.map_or_else(|| IngestOptions::default().workers, usize::from);
        let store_id = (!daemon).then(|| args.store_id.unwrap_or_else(|| refs.run_id.clone()));
        let hold = if holds { Hold::until_consumed(timeout) } else { Hold::None };
        Ok(Plan {
            input: args.input,
            store_uri: args.store,
            store_id,
            control: OfflineControl::new(args.manifest),
            options: IngestOptions { refs, limit: args.limit, workers, hold, stop: None },
            fault: args.fault,
        })
    }
}

/// `--hold-timeout`: a positive number of seconds, for an ingest that holds.
fn hold_timeout(seconds: f64, holds: bool, store: &str) -> Result<Duration> {
    let timeout = crate::stores::seconds(seconds, "--hold-timeout")?;
    if !holds {
        bail!("--hold-timeout {seconds}: ingest into {store} does not hold (see --hold); add --hold always or drop it");
    }
    Ok(timeout)
}

/// Opens the store: a daemon's client, or a shared directory in this process (wrapped to crash
/// at a store `--fault`). A daemon client owns its puts (`Client::connect_owning`): if ingest
/// dies before handing its samples over (after `.done` without a hold; never while holding),
/// the daemon frees them.
fn open_any(plan: &Plan) -> Result<Arc<dyn FeatureStoreApi>> {
    let uri = &plan.store_uri;
    let store: Arc<dyn FeatureStoreApi> = if is_daemon_uri(uri) {
        crate::stores::connect(uri, true)?
    } else {
        let options = StoreOptions { store_id: plan.store_id.clone().map(Into::into), ..StoreOptions::default() };
        Arc::new(open_store(uri, options).with_context(|| format!("opening {uri}"))?)
    };
    Ok(FaultyStore::wrap(store, plan.fault))
}

/// The first SIGINT or SIGTERM sets the returned signal (the attempt stops and cleans up); a
/// second one exits at once.
fn stop_on_signals() -> Result<Arc<StopSignal>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let stop = Arc::new(StopSignal::new());
    let mut signals =
        signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).context("installing the signal handler")?;
    let flag = Arc::clone(&stop);
    std::thread::Builder::new()
        .name("ferry-ingest-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if flag.is_set() {
                    std::process::exit(128 + signal);
                }
                eprintln!("ferry ingest: stopping; freeing this attempt's samples (signal again to quit at once)");
                flag.set();
            }
        })
        .context("starting the signal thread")?;
    Ok(stop)
}

/// Runs the ingest, writing a summary to `out`.
pub(crate) fn run(plan: &Plan, out: &mut dyn Write) -> Result<()> {
    let store = open_any(plan)?;
    let files = list_feature_files(&plan.input).with_context(|| format!("listing {}", plan.input.display()))?;
    let count = plan.options.limit.map_or(files.len(), |l| l.min(files.len()));
    let total_bytes: u64 = files[..count].iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum();
    let options = IngestOptions { stop: Some(stop_on_signals()?), ..plan.options.clone() };
    let bar = ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} ({binary_bytes_per_sec}, ETA {eta}) {msg}",
        )
        .context("progress bar template")?,
    );
    let done = std::sync::atomic::AtomicUsize::new(0);
    let started = Instant::now();
    // Both the total and each step count on-disk file bytes (what the producer reports).
    let on_event = |event: ProducerEvent<'_>| match event {
        ProducerEvent::FileIngested { bytes } => {
            let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            bar.set_message(format!("{n}/{count} files"));
            bar.inc(bytes);
        }
        ProducerEvent::Holding { consumed } => {
            bar.finish_and_clear();
            eprintln!(
                "ferry ingest: {} is done; holding {count} samples in {} until the consumer writes {} (Ctrl-C frees them)",
                plan.control.manifest().display(),
                plan.store_uri,
                consumed.display()
            );
        }
        _ => {}
    };
    let result = run_offline_producer_on(store.as_ref(), &plan.input, &files, &plan.control, &options, &on_event);
    bar.finish_and_clear();
    let report = result.map_err(|failure| failure_report(plan, failure))?;
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    writeln!(
        out,
        "ingested {} files ({} tensor bytes) into {} (store id {}) in {:.2} s ({:.2} GB/s) with {} workers",
        report.refs.len(),
        report.bytes,
        plan.store_uri,
        store.store_id(),
        secs,
        report.bytes as f64 / secs / 1e9,
        plan.options.workers
    )?;
    writeln!(out, "manifest: {}", plan.control.manifest().display())?;
    writeln!(out, "done:     {}", plan.control.done_path().display())?;
    if plan.options.hold != Hold::None {
        writeln!(out, "freed:    {} samples after {}", report.cleaned_up, plan.control.consumed_path().display())?;
    }
    Ok(())
}

/// The error `ferry ingest` reports: "`<m>.failed` records the reason" only when this attempt
/// wrote it, and a `--strategy` hint when the files hold another strategy's keys.
fn failure_report(plan: &Plan, failure: ProducerError) -> anyhow::Error {
    let mut message = format!("ingest of {} failed", plan.input.display());
    if failure.failure_recorded {
        message.push_str(&format!("; {} records the reason", plan.control.failed_path().display()));
    }
    if let ferry_core::Error::MissingFeatureKeys { present, .. } = failure.error.primary() {
        let current = &plan.options.refs.strategy;
        let fits = crate::strategy::strategies_holding(present, current);
        if !fits.is_empty() {
            let options: Vec<String> = fits.iter().map(|name| format!("--strategy {name}")).collect();
            message.push_str(&format!(
                "; the files hold the offline keys of another strategy than {current}: try {}",
                options.join(" or ")
            ));
        }
    }
    anyhow::Error::new(failure.error).context(message)
}
