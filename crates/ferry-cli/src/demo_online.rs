//! `ferry demo` (the online topology, the default): an embedded node daemon, an online
//! producer capturing synthetic EAGLE3 (or DFlash) samples into it, and a 2-rank consumer
//! (rank 0 runs the distributor and the SQLite ledger) training optimizer steps with the durable ack, every
//! client talking to the daemon over its Unix socket and shared memory. It then checks what a
//! user would: every published sample trained exactly once, with the bytes a colocated run over
//! the same seed produces, and nothing left resident or pending in the daemon.

use crate::args::DemoArgs;
use crate::consume::{OnlineRank, Records};
use crate::measure::{self, CacheFlush, fmt_bytes, fmt_gbps};
use crate::online::{Synthetic, sample_index, synthetic_prompts};
use crate::sample::{Sample, SampleShape};
use anyhow::{Context, Result, bail};
use ferry_control::collective::LocalGroup;
use ferry_control::flow::FlowControlLimits;
use ferry_control::online::ConsumerConfig;
use ferry_control::producer::{ProducerConfig, run_producer};
use ferry_net::{Client, DaemonConfig};
use ferry_store::{FeatureStoreApi, StoreOptions};
use serde_json::json;
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Data-parallel ranks of the demo consumer.
const DP: usize = 2;
/// Samples per rank per micro-batch, and micro-batches per optimizer step.
const BATCH: usize = 2;
const ACCUM: usize = 1;
/// The producer's in-flight high watermark (refs).
const HIGH_WATERMARK: i64 = 8;
/// Prompts per capture call.
const LEASE: usize = 2;

/// Runs the online demo.
pub(crate) fn run(args: &DemoArgs, out: &mut dyn Write) -> Result<()> {
    let shape = SampleShape::new(args.strategy, args.seq_len, args.min_seq_len, args.hidden, args.layers)?;
    // The longest sample: what the arena must have room for.
    let sample_bytes = shape.max_bytes().context("the sample is too large for this machine")?;
    let samples = args.samples.unwrap_or(64);
    let quantum = (DP * BATCH * ACCUM) as u64;
    if samples < quantum {
        bail!("--samples {samples} is less than one optimizer window ({quantum}): nothing would train");
    }
    let tmp = tempfile::tempdir().context("creating the demo's directory")?;
    let socket = tmp.path().join("ferry.sock");
    let control = tmp.path().join("control");

    // The node daemon: an arena with room for what may be in flight.
    let in_flight_max = HIGH_WATERMARK as u64 + LEASE as u64 + 2;
    let capacity = sample_bytes.saturating_mul(in_flight_max).saturating_add(64 << 20);
    let options = StoreOptions { store_id: Some("demo".into()), retain_on_release: true, ..StoreOptions::default() };
    let (store, arena) = ferry_net::arena_store(capacity, options).context("creating the daemon's arena")?;
    let mut config = DaemonConfig::new(None, Some(socket.clone()));
    config.arena = Some(arena);
    let daemon = ferry_net::start(store, config).context("starting the embedded daemon")?;
    let uri = format!("ferry+unix://{}", socket.display());
    let connect = || -> Result<Arc<dyn FeatureStoreApi>> {
        Ok(Arc::new(Client::connect(&uri).with_context(|| format!("connecting to {uri}"))?))
    };

    if !args.json {
        writeln!(
            out,
            "ferry demo: online topology on this machine: a node daemon ({} arena), a producer capturing {samples} \
         synthetic {} samples ({}, {} at most each), a {DP}-rank consumer (batch {BATCH}, accumulation {ACCUM})",
            fmt_bytes(capacity),
            shape.strategy.name(),
            shape.describe(),
            fmt_bytes(sample_bytes)
        )?;
    }

    // The producer, on its own thread, a client of the daemon.
    // The producer owns its puts: what it captured but never published dies with it.
    let producer_store = crate::stores::connect(&uri, true)?;
    let capture = Arc::new(Synthetic::new(Arc::clone(&producer_store), shape, "demo", samples, args.seed)?);
    let producer_config = ProducerConfig {
        run_id: "demo".into(),
        channel: control.join("refs.jsonl"),
        prompts: synthetic_prompts(samples),
        prompt_epochs: 1,
        prompt_seed: args.seed,
        workers: 1,
        lease: LEASE,
        flow: FlowControlLimits { high_watermark_refs: HIGH_WATERMARK, ..FlowControlLimits::default() },
        max_resident_bytes: Some(capacity),
        max_prompt_attempts: 3,
        peer_timeout: Some(Duration::from_secs(120)),
        poll: Duration::from_millis(1),
    };
    let started = Instant::now();
    let producer = {
        let capture = Arc::clone(&capture);
        std::thread::Builder::new()
            .name("producer".into())
            .spawn(move || run_producer(&producer_config, producer_store, capture))?
    };
    let claim = control.join("refs.jsonl.producer_claim");
    while !claim.exists() {
        if producer.is_finished() || started.elapsed() > Duration::from_secs(60) {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }

    // The consumer: one thread per rank, each its own client of the daemon.
    let consumer_config = ConsumerConfig {
        run_id: "demo".into(),
        channel: control.join("refs.jsonl"),
        inbox_dir: tmp.path().join("consumer/inboxes"),
        ledger: tmp.path().join("consumer/consumer.sqlite"),
        dp_size: DP,
        batch_size: BATCH,
        accumulation: ACCUM,
        resume: false,
        checkpoint_step: 0,
        idle_timeout: Some(Duration::from_secs(60)),
        poll: Duration::from_millis(1),
    };
    let records = Arc::new(Records::default());
    let mut ranks = Vec::new();
    for group in LocalGroup::new(DP, Duration::from_secs(120)) {
        let (config, records) = (consumer_config.clone(), Arc::clone(&records));
        let store = connect()?;
        ranks.push(std::thread::spawn(move || {
            let rank = OnlineRank { strategy: shape.strategy.name(), checkpoint: None, fault: None, inbox: None };
            rank.run(&config, Arc::new(group), store, &records).map(|_| ())
        }));
    }

    // Live progress on stderr while the pipeline runs (hidden when stderr is not a terminal).
    let bar = indicatif::ProgressBar::new(samples);
    bar.set_style(
        indicatif::ProgressStyle::with_template("  {bar:30} {pos}/{len} samples trained  {per_sec}  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    while !ranks.iter().all(std::thread::JoinHandle::is_finished) {
        let trained = records.trained_count();
        bar.set_position(trained as u64);
        let health = daemon.store().health();
        let seconds = started.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!(
            "{}/s | in flight {} refs, {} resident ({} leased) | loader wait {:.0}%",
            fmt_bytes((capture.bytes() as f64 / seconds) as u64),
            capture.captured().saturating_sub(trained),
            fmt_bytes(health.resident_bytes),
            health.active_leases,
            100.0 * records.wait_seconds() / (seconds * DP as f64)
        ));
        std::thread::sleep(Duration::from_millis(50));
    }
    bar.finish_and_clear();
    let mut rank_errors = Vec::new();
    for rank in ranks {
        if let Err(e) = rank.join().map_err(|_| anyhow::anyhow!("a rank panicked"))? {
            rank_errors.push(e.to_string());
        }
    }
    let produced = producer.join().map_err(|_| anyhow::anyhow!("the producer panicked"))?;
    let elapsed = started.elapsed();
    if let Err(e) = &produced {
        bail!(
            "the producer failed: {e}{}",
            if rank_errors.is_empty() { String::new() } else { format!("; consumer: {}", rank_errors.join("; ")) }
        );
    }
    if !rank_errors.is_empty() {
        bail!("the consumer failed: {}", rank_errors.join("; "));
    }
    let report = produced.map_err(anyhow::Error::new)?;

    // The checks.
    let trained = records.trained.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (id, _) in &trained {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    let expected_trained = samples / quantum * quantum;
    let exactly_once = counts.values().all(|&n| n == 1) && trained.len() as u64 == expected_trained;
    // The colocated reference: regenerate each sample from the seed, in this process.
    let mut reference = Sample::new(shape)?;
    let mut mismatches = 0u64;
    let mut trained_bytes = 0u64;
    for (id, sum) in &trained {
        let index: u64 = id.rsplit('p').next().and_then(|n| n.parse().ok()).unwrap_or(u64::MAX);
        reference.fill(sample_index(args.seed, 0, samples, index));
        trained_bytes += reference.nbytes();
        if reference.checksum() != *sum {
            mismatches += 1;
        }
    }
    let health = daemon.store().health();
    let gbps = trained_bytes as f64 / elapsed.as_secs_f64() / 1e9;
    let memcpy = measure::memcpy_gbps(usize::try_from(sample_bytes).unwrap_or(usize::MAX), &mut CacheFlush::new());
    daemon.stop();
    let passed = exactly_once && mismatches == 0 && health.resident_bytes == 0 && health.release_pending == 0;
    if args.json {
        writeln!(
            out,
            "{}",
            json!({
                "topology": "online",
                "samples_published": report.published,
                "samples_trained": trained.len(),
                "samples_dropped_at_end": report.published.saturating_sub(trained.len() as u64),
                "trained_exactly_once": exactly_once,
                "checksums_match_colocated": mismatches == 0,
                "resident_bytes_after": health.resident_bytes,
                "pending_removals_after": health.release_pending,
                "seconds": elapsed.as_secs_f64(),
                "gbps": gbps,
                "memcpy_gbps": memcpy,
                "vs_memcpy": gbps / memcpy,
                "max_in_flight": report.max_in_flight,
                "loader_wait_s": records.wait_seconds(),
                "passed": passed,
            })
        )?;
    } else {
        let check = |ok: bool| if ok { "ok" } else { "FAILED" };
        writeln!(
            out,
            "  published {} samples, trained {} in {:.2} s",
            report.published,
            trained.len(),
            elapsed.as_secs_f64()
        )?;
        writeln!(
            out,
            "  throughput {} GB/s of features end to end ({:.2}x a memcpy of {} GB/s measured now; the producer \
             generates and the ranks checksum every byte on the same 2 cores)",
            fmt_gbps(gbps),
            gbps / memcpy,
            fmt_gbps(memcpy)
        )?;
        writeln!(
            out,
            "  most refs in flight {} (high watermark {HIGH_WATERMARK}); the ranks waited for data {:.0}% of the time",
            report.max_in_flight,
            100.0 * records.wait_seconds() / (elapsed.as_secs_f64().max(1e-9) * DP as f64)
        )?;
        writeln!(out, "  every sample trained exactly once ........ {}", check(exactly_once))?;
        writeln!(out, "  bytes equal a colocated run, same seed .... {}", check(mismatches == 0))?;
        writeln!(
            out,
            "  daemon empty at the end ................... {} ({} resident, {} pending removals)",
            check(health.resident_bytes == 0 && health.release_pending == 0),
            fmt_bytes(health.resident_bytes),
            health.release_pending
        )?;
    }
    if !passed {
        bail!("the online demo's checks failed");
    }
    Ok(())
}
