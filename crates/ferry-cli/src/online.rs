//! `ferry produce`: the online producer over a shared control directory and a feature store
//! (`dir://` shared directory, or a `ferry serve` daemon). Its capture is synthetic (EAGLE3- or
//! DFlash-shaped, deterministic per sample) until real capture servers are wired in; it records
//! each sample's checksum, so a consumer's (`crate::consume`) exactly-once delivery can be
//! checked against what was put.

use crate::args::ProduceArgs;
use crate::fault::{self, Fault, FaultyStore};
use crate::sample::{Sample, SampleShape};
use anyhow::{Context, Result, bail};
use ferry_control::flow::FlowControlLimits;
use ferry_control::producer::{Capture, ProducerConfig, run_producer};
use ferry_core::{Error, JsonMap, PromptTask, SampleRef};
use ferry_store::{FeatureStoreApi, StoreOptions, open_store};
use serde_json::{Value, json};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The store id both roles use for a `dir://` store (its refs name it).
const STORE_ID: &str = "online";

/// Opens a store URI for an online role: a daemon client, or a shared directory that keeps
/// bytes on release (features are deleted at the durable ack, not when a read ends).
pub(crate) fn open_any(uri: &str) -> Result<Arc<dyn FeatureStoreApi>> {
    open_online(uri, false)
}

/// [`open_any`]; with `owning`, a daemon client owns its puts (`Client::connect_owning`): the
/// producer's, so that what it captured but never published (the producer disowns each batch
/// just before publishing it) dies with it instead of staying in the daemon.
fn open_online(uri: &str, owning: bool) -> Result<Arc<dyn FeatureStoreApi>> {
    if crate::stores::is_daemon_uri(uri) {
        return crate::stores::connect(uri, owning);
    }
    let options = StoreOptions { store_id: Some(STORE_ID.into()), retain_on_release: true, ..StoreOptions::default() };
    Ok(Arc::new(open_store(uri, options).with_context(|| format!("opening store {uri}"))?))
}

/// The index `Sample::fill` takes for prompt `index` of pass `epoch`: what a colocated run
/// regenerates to check what a consumer trained.
pub(crate) fn sample_index(seed: u64, epoch: u64, samples_per_epoch: u64, index: u64) -> u64 {
    seed.wrapping_mul(1_000_003).wrapping_add(epoch * samples_per_epoch + index)
}

/// The synthetic prompts: `p<index>` with the index in the payload.
pub(crate) fn synthetic_prompts(samples: u64) -> Vec<JsonMap> {
    (0..samples)
        .map(|i| json!({"task_id": format!("p{i:08}"), "payload": {"index": i}}))
        .filter_map(|v| v.as_object().cloned())
        .collect()
}

/// Synthetic capture: the sample of a prompt is a deterministic function of its index (and
/// epoch), put into the store with SpecForge-style metadata.
pub(crate) struct Synthetic {
    store: Arc<dyn FeatureStoreApi>,
    run_id: String,
    samples_per_epoch: u64,
    seed: u64,
    buffers: Mutex<Sample>,
    checksums: Mutex<Vec<(String, u64)>>,
    /// Bytes of every sample put so far.
    bytes: AtomicU64,
    /// Fault injection (`--fault publish:N`): crash at the start of a capture call once this
    /// many samples were captured (with one worker, every one of them was published).
    crash_after_published: Option<u64>,
}

impl Synthetic {
    /// A capture into `store`.
    pub(crate) fn new(
        store: Arc<dyn FeatureStoreApi>,
        shape: SampleShape,
        run_id: &str,
        samples_per_epoch: u64,
        seed: u64,
    ) -> Result<Synthetic> {
        Ok(Synthetic {
            store,
            run_id: run_id.to_owned(),
            samples_per_epoch,
            seed,
            buffers: Mutex::new(Sample::new(shape)?),
            checksums: Mutex::new(Vec::new()),
            bytes: AtomicU64::new(0),
            crash_after_published: None,
        })
    }

    /// Crashes (`--fault publish:N`) at the start of the first capture call after `n` samples
    /// were captured: with one capture worker, capture call i+1 starts only after call i's
    /// refs were published, so exactly the samples of the whole calls up to `n` are published.
    pub(crate) fn crash_after_published(mut self, n: Option<u64>) -> Synthetic {
        self.crash_after_published = n;
        self
    }

    /// Bytes of every sample put so far (each its own length).
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Samples captured (put) so far.
    pub(crate) fn captured(&self) -> usize {
        self.checksums.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// `(sample id, checksum)` of everything captured so far ([`Sample::checksum`]).
    pub(crate) fn checksums(&self) -> Vec<(String, u64)> {
        self.checksums.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Capture for Synthetic {
    fn capture(&self, tasks: &[PromptTask]) -> ferry_core::Result<Vec<SampleRef>> {
        if let Some(n) = self.crash_after_published
            && self.captured() as u64 >= n
        {
            fault::fire(Fault::Publish(n));
        }
        let mut sample = self.buffers.lock().unwrap_or_else(|p| p.into_inner());
        let mut refs = Vec::with_capacity(tasks.len());
        for task in tasks {
            let index = task.payload.get("index").and_then(Value::as_u64).unwrap_or(0);
            let epoch = task.metadata.get("epoch").and_then(Value::as_u64).unwrap_or(0);
            sample.fill(sample_index(self.seed, epoch, self.samples_per_epoch, index));
            let views = sample.views().map_err(|e| Error::InvalidArgument(e.to_string()))?;
            let sample_id = format!("{}:{}", self.run_id, task.task_id);
            let mut r = self.store.put(&sample_id, &views, sample.metadata(&self.run_id))?;
            r.source_task_id = Some(task.task_id.clone());
            self.bytes.fetch_add(sample.nbytes(), Ordering::Relaxed);
            self.checksums.lock().unwrap_or_else(|p| p.into_inner()).push((sample_id, sample.checksum()));
            refs.push(r);
        }
        Ok(refs)
    }
}

pub(crate) fn write_checksums(path: &Path, checksums: &[(String, u64)]) -> Result<()> {
    let mut text = String::new();
    for (id, sum) in checksums {
        text.push_str(&json!({"sample_id": id, "checksum": sum}).to_string());
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// `ferry produce`.
pub(crate) fn produce(args: ProduceArgs, out: &mut dyn Write) -> Result<()> {
    let shape = SampleShape::new(args.strategy, args.seq_len, args.min_seq_len, args.hidden, args.layers)?;
    if let Some(fault) = args.fault {
        fault.check_role("produce")?;
        if matches!(fault, Fault::Publish(_)) && args.workers != 1 {
            bail!("--fault {fault} needs --workers 1: with more workers, captured is not published");
        }
    }
    let store = FaultyStore::wrap(open_online(&args.store, true)?, args.fault);
    let prompts = synthetic_prompts(args.samples);
    let config = ProducerConfig {
        run_id: "online".into(),
        channel: args.control.join("refs.jsonl"),
        prompts,
        prompt_epochs: args.epochs,
        prompt_seed: args.seed,
        workers: args.workers as usize,
        lease: args.lease as usize,
        flow: FlowControlLimits {
            high_watermark_refs: args.high_watermark,
            low_watermark_refs: args.low_watermark,
            ..FlowControlLimits::default()
        },
        max_resident_bytes: None,
        max_prompt_attempts: 5,
        peer_timeout: Some(crate::stores::seconds(args.peer_timeout, "--peer-timeout")?),
        poll: Duration::from_millis(2),
    };
    let crash_after_published = match args.fault {
        Some(Fault::Publish(n)) => Some(n),
        _ => None,
    };
    let capture = Arc::new(
        Synthetic::new(Arc::clone(&store), shape, "online", args.samples, args.seed)?
            .crash_after_published(crash_after_published),
    );
    let started = std::time::Instant::now();
    let report = run_producer(&config, store, capture.clone()).context("the online producer failed")?;
    let elapsed = started.elapsed().as_secs_f64();
    write_checksums(&args.control.join("produced-checksums.jsonl"), &capture.checksums())?;
    let bytes = capture.bytes();
    if args.json {
        writeln!(
            out,
            "{}",
            json!({
                "published": report.published, "prompts": report.prompts, "max_in_flight": report.max_in_flight,
                "paused_checks": report.paused_checks, "stopped_by_consumer": report.stopped_by_consumer,
                "seconds": elapsed, "gbps": bytes as f64 / elapsed / 1e9,
            })
        )?;
    } else {
        writeln!(
            out,
            "produced {} samples of {} in {elapsed:.2} s ({:.2} GB/s); most in flight {}; paused {} checks{}",
            report.published,
            shape.describe(),
            bytes as f64 / elapsed / 1e9,
            report.max_in_flight,
            report.paused_checks,
            if report.stopped_by_consumer { "; stopped by the consumer" } else { "" }
        )?;
    }
    Ok(())
}
