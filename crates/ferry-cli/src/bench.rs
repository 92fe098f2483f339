//! `ferry bench store`: does a store round trip cost at most one copy per direction?
//!
//! The same measurement as the self-contained part of `crates/ferry-store/benches/store.rs`:
//! a plain memcpy done twice per iteration (src -> staging for "in", staging -> dst for "out")
//! against `put` (from a borrowed view) + `get_into` (a pre-allocated caller buffer) +
//! `release` (consume-once) of one sample id, best of 5 runs. The ratio
//! `memcpy_time / store_time` is the figure of merit; the goal at 64 MiB is >= 0.8.

use crate::args::{BenchStoreArgs, StoreKind};
use crate::measure::{self, best_per_iter, fmt_gbps, gbps};
use anyhow::{Context, Result};
use ferry_store::bench::RoundTrip;
use ferry_store::{StoreOptions, open_store};
use std::io::Write;
use std::time::Duration;

/// The ratio the issue asks for at 64 MiB.
const GOAL_RATIO: f64 = 0.8;

/// What `ferry bench store` will do.
#[derive(Debug)]
pub(crate) struct Plan {
    size_mib: u64,
    size: usize,
    iters: u64,
    store: StoreKind,
}

impl Plan {
    /// Validates the arguments.
    pub(crate) fn from_args(args: BenchStoreArgs) -> Result<Plan> {
        let size = usize::try_from(args.size_mib << 20).context("--size-mib does not fit in memory addressing")?;
        Ok(Plan { size_mib: args.size_mib, size, iters: args.iters, store: args.store })
    }
}

/// Runs the measurement, writing a report to `out`.
pub(crate) fn run(plan: &Plan, out: &mut dyn Write) -> Result<()> {
    let tmp;
    let uri = match plan.store {
        StoreKind::Mem => "mem://bench".to_owned(),
        StoreKind::Dir => {
            tmp = tempfile::tempdir().context("creating a temporary directory for the dir:// store")?;
            let root = tmp.path().to_str().context("temporary directory path is not UTF-8")?;
            format!("dir://{root}")
        }
    };
    let store = open_store(&uri, StoreOptions::default()).with_context(|| format!("opening {uri}"))?;
    writeln!(
        out,
        "store round trip (put + get_into + release) vs memcpy x2: {} MiB sample, {} iterations, best of {}",
        plan.size_mib,
        plan.iters,
        measure::RUNS
    )?;
    let mut bufs = RoundTrip::new(plan.size);
    let memcpy = best_per_iter(plan.iters, || {
        bufs.memcpy_2x();
        Ok(())
    })?;
    let round_trip = best_per_iter(plan.iters, || bufs.round_trip(&store).context("store round trip"))?;
    let health = store.health();
    anyhow::ensure!(health.resident_bytes == 0, "consume-once left {} bytes resident", health.resident_bytes);

    let ratio = memcpy.as_secs_f64() / round_trip.as_secs_f64().max(1e-12);
    let line = |what: &str, d: Duration| {
        format!("  {what:<22} {:>7} GB/s  {:>9.3} ms/iteration", fmt_gbps(gbps(plan.size as u64, d)), ms(d))
    };
    writeln!(out, "{}", line("memcpy x2", memcpy))?;
    writeln!(out, "{}", line(&format!("store ({})", store.backend_kind()), round_trip))?;
    let verdict = if ratio >= GOAL_RATIO { "meets" } else { "below" };
    writeln!(
        out,
        "ratio memcpy_time/store_time for {} MiB: {ratio:.2} ({verdict} the >= {GOAL_RATIO} goal: at most one copy per direction)",
        plan.size_mib
    )?;
    if cfg!(debug_assertions) {
        writeln!(out, "(debug build: throughput is not representative; use `cargo run --release`.)")?;
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
