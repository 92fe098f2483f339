//! `ferry produce` and `ferry consume`: the online roles over a shared control directory and a
//! feature store (`dir://` shared directory, or a `ferry serve` daemon). The producer's capture
//! is synthetic (EAGLE3-shaped, deterministic per sample) until real capture servers are wired
//! in; the consumer's "training step" is a checksum over each sample's bytes, recorded per
//! sample id, so exactly-once delivery can be checked against what the producer put.

use crate::args::{ConsumeArgs, ProduceArgs};
use crate::sample::{Eagle3Shape, Sample, metadata};
use anyhow::{Context, Result};
use ferry_control::collective::{Collective, GroupAddress, LocalGroup, SocketGroup};
use ferry_control::flow::FlowControlLimits;
use ferry_control::online::{ConsumerConfig, agree_on_rank0_setup, run_rank_with};
use ferry_control::producer::{Capture, ProducerConfig, run_producer};
use ferry_core::{Error, JsonMap, PromptTask, SampleRef};
use ferry_net::Client;
use ferry_store::{FeatureStoreApi, StoreOptions, open_store};
use serde_json::{Value, json};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The store id both roles use for a `dir://` store (its refs name it).
const STORE_ID: &str = "online";

/// Opens a store URI for an online role: a daemon client, or a shared directory that keeps
/// bytes on release (features are deleted at the durable ack, not when a read ends).
fn open_any(uri: &str) -> Result<Arc<dyn FeatureStoreApi>> {
    if uri.starts_with("ferry://") || uri.starts_with("ferry+unix://") {
        return Ok(Arc::new(Client::connect(uri).with_context(|| format!("connecting to {uri}"))?));
    }
    let options = StoreOptions { store_id: Some(STORE_ID.into()), retain_on_release: true, ..StoreOptions::default() };
    Ok(Arc::new(open_store(uri, options).with_context(|| format!("opening store {uri}"))?))
}

fn seconds(s: f64, what: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(s).map_err(|_| anyhow::anyhow!("{what} must be a positive number of seconds, got {s}"))
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
    shape: Eagle3Shape,
    run_id: String,
    samples_per_epoch: u64,
    seed: u64,
    buffers: Mutex<Sample>,
    checksums: Mutex<Vec<(String, u64)>>,
}

impl Synthetic {
    /// A capture into `store`.
    pub(crate) fn new(
        store: Arc<dyn FeatureStoreApi>,
        shape: Eagle3Shape,
        run_id: &str,
        samples_per_epoch: u64,
        seed: u64,
    ) -> Result<Synthetic> {
        Ok(Synthetic {
            store,
            shape,
            run_id: run_id.to_owned(),
            samples_per_epoch,
            seed,
            buffers: Mutex::new(Sample::new(shape)?),
            checksums: Mutex::new(Vec::new()),
        })
    }

    /// `(sample id, checksum)` of everything captured so far.
    pub(crate) fn checksums(&self) -> Vec<(String, u64)> {
        self.checksums.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Capture for Synthetic {
    fn capture(&self, tasks: &[PromptTask]) -> ferry_core::Result<Vec<SampleRef>> {
        let mut sample = self.buffers.lock().unwrap_or_else(|p| p.into_inner());
        let mut refs = Vec::with_capacity(tasks.len());
        for task in tasks {
            let index = task.payload.get("index").and_then(Value::as_u64).unwrap_or(0);
            let epoch = task.metadata.get("epoch").and_then(Value::as_u64).unwrap_or(0);
            sample.fill(sample_index(self.seed, epoch, self.samples_per_epoch, index));
            let views = sample.views().map_err(|e| Error::InvalidArgument(e.to_string()))?;
            let sample_id = format!("{}:{}", self.run_id, task.task_id);
            let mut r = self.store.put(&sample_id, &views, metadata(&self.run_id, self.shape))?;
            r.source_task_id = Some(task.task_id.clone());
            self.checksums.lock().unwrap_or_else(|p| p.into_inner()).push((sample_id, sample.checksum()));
            refs.push(r);
        }
        Ok(refs)
    }
}

fn write_checksums(path: &Path, checksums: &[(String, u64)]) -> Result<()> {
    let mut text = String::new();
    for (id, sum) in checksums {
        text.push_str(&json!({"sample_id": id, "checksum": sum}).to_string());
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// `ferry produce`.
pub(crate) fn produce(args: ProduceArgs, out: &mut dyn Write) -> Result<()> {
    let store = open_any(&args.store)?;
    let shape = Eagle3Shape { seq_len: args.seq_len, hidden: args.hidden };
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
        peer_timeout: Some(seconds(args.peer_timeout, "--peer-timeout")?),
        poll: Duration::from_millis(2),
    };
    let capture = Arc::new(Synthetic::new(Arc::clone(&store), shape, "online", args.samples, args.seed)?);
    let started = std::time::Instant::now();
    let report = run_producer(&config, store, capture.clone()).context("the online producer failed")?;
    let elapsed = started.elapsed().as_secs_f64();
    write_checksums(&args.control.join("produced-checksums.jsonl"), &capture.checksums())?;
    let bytes = shape.bytes().unwrap_or(0) * report.published;
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

/// Reads samples into buffers it reuses (so reads never pay first-touch page faults) and
/// checksums them as `Sample::checksum` does: a stand-in for a training step's reads.
#[derive(Default)]
pub(crate) struct Reader {
    buffers: Vec<(String, ferry_core::AlignedBuf)>,
}

impl Reader {
    /// Reads `r`'s features into the reused buffers, releases the lease, returns the checksum.
    pub(crate) fn read(&mut self, store: &dyn FeatureStoreApi, r: &SampleRef) -> ferry_core::Result<u64> {
        let mut sizes = Vec::with_capacity(r.feature_specs.len());
        for (name, spec) in &r.feature_specs {
            let n = usize::try_from(spec.nbytes()?)
                .map_err(|_| Error::InvalidArgument(format!("feature {name} does not fit in memory")))?;
            sizes.push((name.clone(), n));
        }
        if self.buffers.len() != sizes.len()
            || self.buffers.iter().zip(&sizes).any(|((a, buf), (b, n))| a != b || buf.len() != *n)
        {
            self.buffers = sizes.into_iter().map(|(name, n)| (name, ferry_core::AlignedBuf::zeroed(n))).collect();
        }
        let mut dsts: Vec<(&str, &mut [u8])> =
            self.buffers.iter_mut().map(|(name, buf)| (name.as_str(), buf.as_mut_slice())).collect();
        let handle = store.get_into(r, &mut dsts)?;
        let sum = crate::sample::checksum_of(self.buffers.iter().map(|(name, buf)| (name.as_str(), buf.as_slice())));
        store.release(&handle)?;
        Ok(sum)
    }
}

/// `ferry consume`.
pub(crate) fn consume(args: ConsumeArgs, out: &mut dyn Write) -> Result<()> {
    let state = args.state.clone().unwrap_or_else(|| args.control.join("consumer"));
    let checkpoint_path = state.join("checkpoint");
    let checkpoint_step: i64 = if args.resume {
        let text = std::fs::read_to_string(&checkpoint_path).unwrap_or_else(|_| "0".into());
        text.trim().parse().with_context(|| format!("reading the checkpoint {}", checkpoint_path.display()))?
    } else {
        0
    };
    let config = ConsumerConfig {
        run_id: "online".into(),
        channel: args.control.join("refs.jsonl"),
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
    let started = std::time::Instant::now();
    let trained: Arc<Mutex<Vec<(String, u64)>>> = Arc::new(Mutex::new(Vec::new()));
    let mut threads = Vec::new();
    let groups: Vec<Arc<dyn Collective>> = match (args.rank, &args.group) {
        (Some(rank), Some(address)) => {
            let address = GroupAddress::parse(address)?;
            let group = SocketGroup::rendezvous(
                &address,
                "ferry-consume",
                rank as usize,
                config.dp_size,
                Duration::from_secs(600),
            )
            .with_context(|| format!("joining the consumer's process group as rank {rank}"))?;
            vec![Arc::new(group)]
        }
        _ => LocalGroup::new(config.dp_size, Duration::from_secs(600))
            .into_iter()
            .map(|g| Arc::new(g) as Arc<dyn Collective>)
            .collect(),
    };
    for group in groups {
        let (config, trained, checkpoint_path) = (config.clone(), Arc::clone(&trained), checkpoint_path.clone());
        let store = open_any(&args.store)?;
        let crash_after = args.crash_after_step;
        threads.push(std::thread::spawn(move || {
            run_one_rank(&config, group, store, &trained, Some(&checkpoint_path), crash_after)
        }));
    }
    let mut steps = 0;
    let mut refs = 0;
    let mut first_error = None;
    for t in threads {
        match t.join().map_err(|_| anyhow::anyhow!("a rank thread panicked"))? {
            Ok((s, r)) => {
                steps = steps.max(s);
                refs += r;
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    let trained = trained.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if let Some(path) = &args.checksums {
        write_checksums(path, &trained)?;
    }
    if let Some(e) = first_error {
        return Err(anyhow::Error::new(e).context("the online consumer failed"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    if args.json {
        writeln!(out, "{}", json!({"trained": refs, "optimizer_steps": steps, "dp": args.dp, "seconds": elapsed}))?;
    } else {
        writeln!(out, "consumed {refs} samples in {steps} optimizer steps over {} ranks in {elapsed:.2} s", args.dp)?;
    }
    Ok(())
}

/// One consumer rank: setup agreement, the distributor on rank 0, optimizer steps that read
/// and checksum every sample (recorded in `trained`), and on rank 0 the checkpoint after each
/// durable ack (when a path is given).
pub(crate) fn run_one_rank(
    config: &ConsumerConfig,
    group: Arc<dyn Collective>,
    store: Arc<dyn FeatureStoreApi>,
    trained: &Mutex<Vec<(String, u64)>>,
    checkpoint_path: Option<&Path>,
    crash_after: Option<i64>,
) -> ferry_core::Result<(u64, u64)> {
    let rank = group.rank();
    let rank0 = agree_on_rank0_setup(config, group.as_ref(), Some(Arc::clone(&store)))?;
    let distributor = rank0.as_ref().map(|r| r.distributor.start()).transpose()?;
    let source = Arc::clone(&store);
    let mut reader = Reader::default();
    let result = run_rank_with(
        config,
        group,
        rank0.as_ref(),
        Some(store),
        |step| {
            for r in step.iter().flatten() {
                let sum = reader.read(source.as_ref(), r)?;
                trained.lock().unwrap_or_else(|p| p.into_inner()).push((r.sample_id.to_string(), sum));
            }
            Ok(())
        },
        |step| {
            if rank == 0
                && let Some(path) = checkpoint_path
            {
                save_checkpoint(path, step)?;
                if crash_after == Some(step) {
                    // A crash, as a test injects it: no cleanup, no sentinel.
                    std::process::abort();
                }
            }
            Ok(())
        },
    );
    if let Some(d) = distributor {
        let _ = d.stop();
    }
    result.map(|r| (r.steps, r.refs))
}

/// Writes the trainer's checkpoint step atomically (a stand-in for saving model and optimizer).
fn save_checkpoint(path: &Path, step: i64) -> ferry_core::Result<()> {
    ferry_control::atomic::write_control_file(path, step.to_string().as_bytes())
}
