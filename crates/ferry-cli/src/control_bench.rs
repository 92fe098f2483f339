//! `ferry bench control`: the online control plane end to end on this machine. A producer
//! thread publishes refs into a channel; rank 0's distributor commits them through the SQLite
//! ledger and dispatches whole optimizer windows into per-rank inboxes; `--dp` rank threads read
//! their inboxes as queues and end every optimizer step with the durable DP acknowledgement
//! (one SQLite transaction on rank 0) and their inbox ack. The clock runs from the first
//! publish until every ref is acknowledged and the producer's consumed counter says so.
//! No feature bytes move: this measures the control plane only.

use crate::args::BenchControlArgs;
use anyhow::{Context, Result, bail, ensure};
use ferry_control::channel::{FileRefChannel, RefSink};
use ferry_control::collective::{Collective, LocalGroup};
use ferry_control::online::{ConsumerConfig, RankStream, setup_rank0};
use ferry_core::json::{JsonStyle, sample_ref_from_str, sample_ref_to_string};
use ferry_core::{SampleId, SampleRef};
use serde_json::json;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// SpecForge's Python runtime on this machine (channel, SQLite ledger, inboxes), refs/s.
const SPECFORGE_REFS_PER_S: f64 = 1_200.0;

/// The goal the issue sets.
const GOAL_REFS_PER_S: f64 = 50_000.0;

/// A realistic EAGLE3 streaming ref (four features, generation metadata), about 1.2 KB of JSON.
const TEMPLATE: &str = r#"{"sample_id":"run0:task0","run_id":"run0","source_task_id":"task0","feature_store_uri":"ferry+unix:///run/ferry.sock","feature_keys":{"input_ids":"run0:task0/input_ids","loss_mask":"run0:task0/loss_mask","hidden_state":"run0:task0/hidden_state","target":"run0:task0/target"},"feature_specs":{"input_ids":{"name":"input_ids","shape":[4096],"dtype":"int64","device_hint":null,"required":true,"target_repr":null,"target_meta":{}},"loss_mask":{"name":"loss_mask","shape":[4096],"dtype":"int64","device_hint":null,"required":true,"target_repr":null,"target_meta":{}},"hidden_state":{"name":"hidden_state","shape":[1,4096,12288],"dtype":"bfloat16","device_hint":null,"required":true,"target_repr":null,"target_meta":{}},"target":{"name":"target","shape":[1,4096,4096],"dtype":"bfloat16","device_hint":null,"required":true,"target_repr":null,"target_meta":{}}},"strategy":"eagle3","schema_version":1,"target_model_version":"unknown","draft_weight_version":null,"tokenizer_version":"unknown","num_tokens":4096,"estimated_bytes":134283264,"metadata":{"run_id":"run0","strategy":"eagle3","target_repr":"hidden_state","ttt_length":7,"generation":1}}"#;

/// Runs the benchmark and reports.
pub(crate) fn run(args: BenchControlArgs, out: &mut dyn Write) -> Result<()> {
    let (refs, dp) = (args.refs as usize, args.dp as usize);
    let (batch, accumulation) = (args.batch as usize, args.accumulation as usize);
    let tmp = match &args.dir {
        Some(dir) => tempfile::tempdir_in(dir),
        None => tempfile::tempdir(),
    }
    .context("creating the benchmark's control directory")?;
    let config = ConsumerConfig {
        run_id: "bench".into(),
        channel: tmp.path().join("refs.jsonl"),
        inbox_dir: tmp.path().join("inboxes"),
        ledger: tmp.path().join("state/consumer.sqlite"),
        dp_size: dp,
        batch_size: batch,
        accumulation,
        resume: false,
        checkpoint_step: 0,
        idle_timeout: Some(Duration::from_secs(60)),
        poll: Duration::from_millis(1),
    };
    let quantum = config.quantum();
    let trained = refs / quantum * quantum;
    ensure!(trained > 0, "--refs {refs} is less than one optimizer window ({quantum} = dp x batch x accumulation)");

    let template = sample_ref_from_str(TEMPLATE)?;
    let all: Vec<SampleRef> = (0..refs)
        .map(|i| {
            let mut r = template.clone();
            r.sample_id = SampleId::new(format!("bench:{i:08}"));
            r
        })
        .collect();
    let line_bytes = sample_ref_to_string(&all[0], JsonStyle::Compact)?.len() + 1;

    let rank0 = setup_rank0(&config, None).context("setting up consumer rank 0")?;
    let started = Instant::now();
    let producer = {
        let channel = FileRefChannel::open(&config.channel);
        let chunk = args.publish_batch as usize;
        std::thread::Builder::new().name("producer".into()).spawn(move || -> Result<Duration> {
            for part in all.chunks(chunk) {
                channel.publish_batch(part)?;
            }
            channel.close()?;
            Ok(started.elapsed())
        })?
    };
    let monitor = {
        let distributor = Arc::clone(&rank0.distributor);
        std::thread::spawn(move || {
            while distributor.stats().dispatched < trained as u64 && started.elapsed() < Duration::from_secs(300) {
                std::thread::sleep(Duration::from_millis(1));
            }
            started.elapsed()
        })
    };
    let distributor = rank0.distributor.start()?;
    let groups = LocalGroup::new(dp, Duration::from_secs(120));
    let mut ranks = Vec::with_capacity(dp);
    for (rank, group) in groups.into_iter().enumerate() {
        let controller = (rank == 0).then(|| Arc::clone(&rank0.controller));
        let mut stream = RankStream::new(&config, Arc::new(group) as Arc<dyn Collective>, controller, None)?;
        ranks.push(std::thread::Builder::new().name(format!("rank-{rank}")).spawn(
            move || -> Result<(usize, Duration, Duration)> {
                let (mut trained, mut waiting, mut acking) = (0, Duration::ZERO, Duration::ZERO);
                loop {
                    let t = Instant::now();
                    let Some(step) = stream.next_step()? else { break };
                    waiting += t.elapsed();
                    let ids: Vec<SampleId> = step.iter().flatten().map(|r| r.sample_id.clone()).collect();
                    trained += ids.len();
                    let t = Instant::now();
                    stream.commit_step(&ids)?;
                    acking += t.elapsed();
                }
                Ok((trained, waiting, acking))
            },
        )?);
    }
    let mut rank_trained = 0;
    let (mut rank0_waiting, mut rank0_acking) = (Duration::ZERO, Duration::ZERO);
    for (rank, thread) in ranks.into_iter().enumerate() {
        let (trained, waiting, acking) = thread.join().map_err(|_| anyhow::anyhow!("a rank thread panicked"))??;
        rank_trained += trained;
        if rank == 0 {
            (rank0_waiting, rank0_acking) = (waiting, acking);
        }
    }
    let published_at = producer.join().map_err(|_| anyhow::anyhow!("the producer thread panicked"))??;
    let dispatched_at = monitor.join().map_err(|_| anyhow::anyhow!("the monitor thread panicked"))?;
    // The last acks reach the producer's counter through the distributor.
    let source = FileRefChannel::open(&config.channel);
    let deadline = Instant::now() + Duration::from_secs(60);
    while source.consumed_remote()? < refs as u64 {
        if Instant::now() >= deadline {
            bail!("the producer's consumed counter stopped at {} of {refs}", source.consumed_remote()?);
        }
        rank0.distributor.pump()?;
        std::thread::sleep(Duration::from_micros(200));
    }
    let elapsed = started.elapsed();
    distributor.stop()?;
    let stats = rank0.distributor.stats();
    ensure!(rank_trained == trained, "the ranks trained {rank_trained} refs, expected {trained}");
    let marker = rank0.controller.ledger().durable_marker()?;
    ensure!(marker.acked.len() == trained, "the ledger acknowledged {} refs, expected {trained}", marker.acked.len());

    let refs_per_s = refs as f64 / elapsed.as_secs_f64();
    let steps = trained / quantum;
    let report = json!({
        "refs": refs,
        "dp": dp,
        "batch": batch,
        "accumulation": accumulation,
        "optimizer_steps": steps,
        "trained": trained,
        "dropped": stats.dropped,
        "seconds": elapsed.as_secs_f64(),
        "published_at_seconds": published_at.as_secs_f64(),
        "dispatched_at_seconds": dispatched_at.as_secs_f64(),
        "rank0_wait_seconds": rank0_waiting.as_secs_f64(),
        "rank0_ack_seconds": rank0_acking.as_secs_f64(),
        "refs_per_s": refs_per_s,
        "ref_line_bytes": line_bytes,
        "specforge_refs_per_s": SPECFORGE_REFS_PER_S,
        "vs_specforge": refs_per_s / SPECFORGE_REFS_PER_S,
        "goal_refs_per_s": GOAL_REFS_PER_S,
    });
    if args.json {
        writeln!(out, "{report}")?;
        return Ok(());
    }
    writeln!(
        out,
        "control plane: {refs} refs ({line_bytes}-byte lines), dp {dp}, batch {batch} x accumulation {accumulation} \
         ({quantum} refs per optimizer step)"
    )?;
    writeln!(out, "  control directory          {}", tmp.path().display())?;
    writeln!(out, "  optimizer steps acked      {steps} (one durable SQLite transaction each)")?;
    writeln!(out, "  end-of-stream tail dropped {}", stats.dropped)?;
    writeln!(
        out,
        "  timeline                   all published at {:.3} s, all dispatched at {:.3} s, all acked at {:.3} s",
        published_at.as_secs_f64(),
        dispatched_at.as_secs_f64(),
        elapsed.as_secs_f64()
    )?;
    writeln!(
        out,
        "  rank 0                     {:.3} s waiting for refs, {:.3} s in durable acks ({:.2} ms per step)",
        rank0_waiting.as_secs_f64(),
        rank0_acking.as_secs_f64(),
        rank0_acking.as_secs_f64() * 1e3 / steps.max(1) as f64
    )?;
    writeln!(
        out,
        "  refs/s                     {:.0}   {:.0}x SpecForge ({SPECFORGE_REFS_PER_S:.0} refs/s here)",
        refs_per_s,
        refs_per_s / SPECFORGE_REFS_PER_S
    )?;
    writeln!(
        out,
        "goal (>= {GOAL_REFS_PER_S:.0} refs/s): {}",
        if refs_per_s >= GOAL_REFS_PER_S { "met" } else { "NOT met" }
    )?;
    if cfg!(debug_assertions) {
        writeln!(out, "(debug build: throughput is not representative; use `cargo run --release`.)")?;
    }
    Ok(())
}
