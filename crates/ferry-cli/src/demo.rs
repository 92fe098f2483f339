//! `ferry demo`: synthetic EAGLE3 (or DFlash) samples through each store, the way a rollout
//! worker and a trainer use it, verified and timed.
//!
//! Per store and round: put every sample (from borrowed views of one reused source buffer
//! set), then for each ref `get_into` one reused set of caller buffers, compare the checksum of
//! what came back with the checksum of what was put, and `release` it (consume-once frees the
//! sample). After the last round the store must be empty: `health()` reporting any resident
//! byte, sample, lease or pending removal is an error. Put and get throughput are reported next
//! to a memcpy of the same sample measured in the same run.

use crate::args::{DemoArgs, DemoStores, StoreKind};
use crate::measure::{self, CacheFlush, fmt_bytes, fmt_gbps, gbps};
use crate::sample::{Sample, SampleShape};
use crate::table::Table;
use anyhow::{Context, Result, bail};
use ferry_core::{JsonStyle, SampleRef, json};
use ferry_store::{FeatureStore, Health, StoreOptions, open_store};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The run id of demo samples; sample ids are `demo:task<i>` as SpecForge names online samples.
const RUN_ID: &str = "demo";
/// How much of the example ref to print.
const REF_PREVIEW_CHARS: usize = 200;

/// What `ferry demo` will do (second stage of argument handling).
#[derive(Debug)]
pub(crate) struct Plan {
    stores: Vec<StoreKind>,
    samples: u64,
    rounds: u64,
    shape: SampleShape,
    /// Bytes of the longest sample.
    sample_bytes: u64,
    /// Shared-directory root; `None` means a temporary directory removed afterwards.
    dir: Option<PathBuf>,
}

impl Plan {
    /// Validates the arguments.
    pub(crate) fn from_args(args: DemoArgs) -> Result<Plan> {
        let shape = SampleShape::new(args.strategy, args.seq_len, args.min_seq_len, args.hidden, args.layers)?;
        let sample_bytes = shape.max_bytes().filter(|b| usize::try_from(*b).is_ok()).with_context(|| {
            format!("a sample of L={} H={} is too large for this machine", shape.max_len, shape.hidden)
        })?;
        let stores = match args.store {
            DemoStores::Mem => vec![StoreKind::Mem],
            DemoStores::Dir => vec![StoreKind::Dir],
            DemoStores::Both => vec![StoreKind::Mem, StoreKind::Dir],
        };
        if args.dir.is_some() && !stores.contains(&StoreKind::Dir) {
            bail!("--dir names the shared-directory root, but --store mem runs no shared-directory store");
        }
        Ok(Plan { stores, samples: args.samples.unwrap_or(8), rounds: args.rounds, shape, sample_bytes, dir: args.dir })
    }
}

/// Buffers every round of every store reuses, allocated (and faulted in) once.
struct Workspace {
    /// The sample being put, refilled per sample index.
    source: Sample,
    /// The caller's buffers `get_into` fills.
    dst: Sample,
    /// Checksum of each sample index's contents, computed on first fill.
    expected: Vec<Option<u64>>,
    caches: CacheFlush,
}

/// Time spent in one round through one store.
struct RoundStats {
    /// Bytes of the round's samples (each its own length).
    bytes: u64,
    put: Duration,
    get: Duration,
    release: Duration,
}

/// Runs the demo, writing a report to `out`.
pub(crate) fn run(plan: &Plan, out: &mut dyn Write) -> Result<()> {
    let n = plan.samples;
    writeln!(
        out,
        "ferry demo: {n} {} sample{} of {}{} per store (L={}, H={}), {} round{}",
        plan.shape.strategy.name(),
        plural(n),
        if plan.shape.min_len == plan.shape.max_len { "" } else { "up to " },
        fmt_bytes(plan.sample_bytes),
        if plan.shape.min_len == plan.shape.max_len {
            plan.shape.max_len.to_string()
        } else {
            format!("{}..={}", plan.shape.min_len, plan.shape.max_len)
        },
        plan.shape.hidden,
        plan.rounds,
        plural(plan.rounds),
    )?;
    writeln!(out, "  {}", plan.shape.describe())?;
    let mut ws = Workspace {
        source: Sample::new(plan.shape)?,
        dst: Sample::new(plan.shape)?,
        expected: vec![None; n as usize],
        caches: CacheFlush::new(),
    };
    let memcpy = measure::memcpy_gbps(plan.sample_bytes as usize, &mut ws.caches);
    writeln!(
        out,
        "  memcpy of one sample into a warm buffer: {} GB/s (best of {}, caches flushed)",
        fmt_gbps(memcpy),
        measure::RUNS
    )?;
    let tmp = match (&plan.dir, plan.stores.contains(&StoreKind::Dir)) {
        (None, true) => Some(tempfile::tempdir().context("creating a temporary directory for the dir:// store")?),
        _ => None,
    };
    let mut table = Table::new(
        &["store", "round", "samples", "MiB/sample", "put GB/s", "put/memcpy", "get GB/s", "get/memcpy", "release µs"],
        2,
    );

    for kind in &plan.stores {
        let uri = match kind {
            StoreKind::Mem => "mem://demo".to_owned(),
            StoreKind::Dir => {
                let root = plan.dir.as_deref().or(tmp.as_ref().map(|t| t.path())).context("no directory root")?;
                let root = root.to_str().with_context(|| format!("--dir {} is not valid UTF-8", root.display()))?;
                format!("dir://{root}")
            }
        };
        let options = StoreOptions { store_id: Some("demo".into()), ..StoreOptions::default() };
        let store = open_store(&uri, options).with_context(|| format!("opening {uri}"))?;
        writeln!(out, "\n{uri} ({} backend, store id {})", store.backend_kind(), store.store_id())?;
        for round in 1..=plan.rounds {
            let stats = run_round(&store, round, &mut ws, out).with_context(|| format!("{uri}: round {round}"))?;
            writeln!(out, "  round {round}: put {n}, read back {n} (checksums match), released {n}")?;
            let bytes = stats.bytes;
            let (put, get) = (gbps(bytes, stats.put), gbps(bytes, stats.get));
            table.row(vec![
                store.backend_kind().to_owned(),
                if round == 1 && plan.rounds > 1 { "1 (cold)".to_owned() } else { round.to_string() },
                n.to_string(),
                format!("{:.2}", bytes as f64 / n as f64 / (1 << 20) as f64),
                fmt_gbps(put),
                format!("{:.2}", put / memcpy),
                fmt_gbps(get),
                format!("{:.2}", get / memcpy),
                format!("{:.0}", stats.release.as_secs_f64() * 1e6 / n as f64),
            ]);
        }
        let health = store.health();
        writeln!(out, "  health: {}", health_line(&health))?;
        check_empty(&health).with_context(|| format!("{uri} is not empty after consume-once release"))?;
    }

    writeln!(out)?;
    table.write(out, "")?;
    writeln!(out, "\nput: borrowed tensors into the store; get: get_into reused caller buffers (checksums verified).")?;
    writeln!(out, "x/memcpy: throughput over one memcpy of the same bytes (1.00 = exactly one plain copy);")?;
    writeln!(out, "every timed copy, memcpy included, starts with the CPU caches flushed.")?;
    if plan.rounds > 1 {
        writeln!(out, "Round 1 also pays first-touch page faults for the store's buffers; later rounds reuse them.")?;
    }
    if cfg!(debug_assertions) {
        writeln!(out, "(debug build: throughput is not representative; use `cargo run --release`.)")?;
    }
    drop(tmp); // the temporary shared-directory root goes only after the stores are done
    Ok(())
}

fn run_round(store: &FeatureStore, round: u64, ws: &mut Workspace, out: &mut dyn Write) -> Result<RoundStats> {
    let mut stats = RoundStats { bytes: 0, put: Duration::ZERO, get: Duration::ZERO, release: Duration::ZERO };
    let mut refs: Vec<SampleRef> = Vec::with_capacity(ws.expected.len());
    for (i, sum) in ws.expected.iter_mut().enumerate() {
        ws.source.fill(i as u64);
        sum.get_or_insert_with(|| ws.source.checksum());
        stats.bytes += ws.source.nbytes();
        let sample_id = format!("{RUN_ID}:task{i}");
        let metadata = ws.source.metadata(RUN_ID);
        ws.caches.flush();
        let views = ws.source.views()?;
        let start = Instant::now();
        let r = store.put(sample_id.as_str(), &views, metadata).with_context(|| format!("put of {sample_id}"))?;
        stats.put += start.elapsed();
        if round == 1 && i == 0 {
            let text = json::sample_ref_to_string(&r, JsonStyle::Compact)?;
            writeln!(out, "  example ref ({} bytes): {}", text.len(), preview(&text, REF_PREVIEW_CHARS))?;
        }
        refs.push(r);
    }
    for (i, (r, sum)) in refs.iter().zip(&ws.expected).enumerate() {
        ws.dst.set_index(i as u64);
        ws.caches.flush();
        let mut dsts = ws.dst.dsts();
        let start = Instant::now();
        let handle = store.get_into(r, &mut dsts).with_context(|| format!("get_into of {}", r.sample_id))?;
        stats.get += start.elapsed();
        drop(dsts);
        let got = ws.dst.checksum();
        if Some(got) != *sum {
            bail!(
                "sample {} read back different bytes than were put (checksum {got:016x}, expected {:016x})",
                r.sample_id,
                sum.unwrap_or_default()
            );
        }
        let start = Instant::now();
        store.release(&handle).with_context(|| format!("release of {}", r.sample_id))?;
        stats.release += start.elapsed();
    }
    Ok(stats)
}

fn health_line(h: &Health) -> String {
    let usage = match &h.backend_usage {
        Some(u) => format!(" backend_usage={} in {} samples", fmt_bytes(u.bytes), u.samples),
        None => String::new(),
    };
    format!(
        "resident_samples={} resident_bytes={} active_leases={} release_pending={}{usage}",
        h.resident_samples, h.resident_bytes, h.active_leases, h.release_pending
    )
}

/// Consume-once must leave nothing behind.
fn check_empty(h: &Health) -> Result<()> {
    let mut left = Vec::new();
    for (what, n) in [
        ("resident_bytes", h.resident_bytes),
        ("resident_samples", h.resident_samples),
        ("active_leases", h.active_leases),
        ("release_pending", h.release_pending),
        ("backend bytes", h.backend_usage.map_or(0, |u| u.bytes)),
    ] {
        if n != 0 {
            left.push(format!("{what}={n}"));
        }
    }
    if !left.is_empty() {
        bail!("expected an empty store, found {}", left.join(", "));
    }
    Ok(())
}

/// The first `max` characters of `text`, with a marker when cut.
fn preview(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preview_cuts_on_characters() {
        assert_eq!(preview("abcdef", 3), "abc...");
        assert_eq!(preview("abc", 3), "abc");
        assert_eq!(preview("ééé", 2), "éé...");
    }
}
