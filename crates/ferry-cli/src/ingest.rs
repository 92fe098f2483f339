//! `ferry ingest`: copy offline feature files (`.ckpt`, `.ckpt.gz`, `.safetensors`) into a store
//! and publish SpecForge's manifest with its sentinel protocol (`ferry_control::ingest`), with a
//! progress bar (files, bytes, rate, ETA) on stderr when it is a terminal.

use crate::args::IngestArgs;
use anyhow::{Context, Result, bail};
use ferry_control::{IngestOptions, OfflineControl, ProducerError, run_offline_producer_on};
use ferry_store::offline::{OfflineRefOptions, list_feature_files};
use ferry_store::{StoreOptions, StoreUri, open_store};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

/// What `ferry ingest` will do.
#[derive(Debug)]
pub(crate) struct Plan {
    input: PathBuf,
    store_uri: String,
    store_id: Option<String>,
    control: OfflineControl,
    options: IngestOptions,
}

impl Plan {
    /// Validates the arguments: the store must outlive this process.
    pub(crate) fn from_args(args: IngestArgs) -> Result<Plan> {
        if let StoreUri::Memory { .. } = StoreUri::parse(&args.store)? {
            bail!("--store {}: a mem:// store vanishes when ingest exits; use dir://<root>", args.store);
        }
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
        let store_id = Some(args.store_id.unwrap_or_else(|| refs.run_id.clone()));
        Ok(Plan {
            input: args.input,
            store_uri: args.store,
            store_id,
            control: OfflineControl::new(args.manifest),
            options: IngestOptions { refs, limit: args.limit, workers },
        })
    }
}

/// Runs the ingest, writing a summary to `out`.
pub(crate) fn run(plan: &Plan, out: &mut dyn Write) -> Result<()> {
    let options = StoreOptions { store_id: plan.store_id.clone().map(Into::into), ..StoreOptions::default() };
    let store = open_store(&plan.store_uri, options).with_context(|| format!("opening {}", plan.store_uri))?;
    let files = list_feature_files(&plan.input).with_context(|| format!("listing {}", plan.input.display()))?;
    let count = plan.options.limit.map_or(files.len(), |l| l.min(files.len()));
    let total_bytes: u64 = files[..count].iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum();
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
    let on_progress = |bytes: u64| {
        let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        bar.set_message(format!("{n}/{count} files"));
        bar.inc(bytes);
    };
    let result = run_offline_producer_on(&store, &plan.input, &files, &plan.control, &plan.options, &on_progress);
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
