//! `ferry bench view`: a tensor-parallel rank fetching its shard of a weight from the node
//! daemon, with the view derived where the bytes are (`Client::get_views_into`: only the
//! shard's bytes move) against what a client without source-side views does (fetch the whole
//! weight, then cut its shard out locally), on the shared-memory route and over loopback TCP,
//! for a shard of dimension 0 (one contiguous range) and of dimension 1 (one range per row).
//! The reference is a memcpy of the shard's bytes measured in the same run.
//!
//! The daemon runs in this process on its own threads, the client on this thread: on 2 cores
//! they share the machine as a daemon and a trainer on one node do.

use crate::args::BenchViewArgs;
use crate::measure::{self, CacheFlush, best_per_iter, fmt_bytes, fmt_gbps, gbps};
use anyhow::{Context, Result, ensure};
use ferry_core::{AlignedBuf, DType, JsonMap, TensorView, ViewSpec};
use ferry_net::{Client, ConnectOptions, DaemonConfig, RoutePreference};
use ferry_store::StoreOptions;
use serde_json::{Value, json};
use std::io::Write;
use std::time::Duration;

/// Runs the benchmark and reports.
pub(crate) fn run(args: BenchViewArgs, out: &mut dyn Write) -> Result<()> {
    let shards = args.shards;
    // A bfloat16 weight [rows, cols] of about --size bytes, both dimensions divisible by the
    // shard count (rows x cols x 2 bytes, cols = 2 x rows as in an MLP projection).
    let elements = (args.size / 2).max(2 * shards * shards);
    let rows = (((elements / 2) as f64).sqrt() as u64 / shards).max(1) * shards;
    let cols = 2 * rows;
    let shape = [rows, cols];
    let nbytes = usize::try_from(rows * cols * 2).context("the weight does not fit in memory")?;
    let shard_bytes = nbytes / shards as usize;

    let tmp = tempfile::tempdir().context("creating a directory for the daemon's socket")?;
    let options = StoreOptions { store_id: Some("bench".into()), retain_on_release: true, ..StoreOptions::default() };
    let (store, arena) =
        ferry_net::arena_store(2 * nbytes as u64 + (16 << 20), options).context("creating the arena")?;
    let socket = tmp.path().join("ferry.sock");
    let mut config = DaemonConfig::new(Some("127.0.0.1:0".parse()?), Some(socket.clone()));
    config.arena = Some(arena);
    let daemon = ferry_net::start(store, config).context("starting the daemon")?;
    let shm = Client::connect_with(
        &format!("ferry+unix://{}", socket.display()),
        ConnectOptions { route: RoutePreference::Shm, ..ConnectOptions::default() },
    )
    .context("connecting over shared memory")?;
    let tcp = Client::connect(&format!("ferry://{}", daemon.tcp_addr().context("no TCP address")?))
        .context("connecting over TCP")?;

    let mut weight = AlignedBuf::zeroed(nbytes);
    for (i, b) in weight.as_mut_slice().iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let view = TensorView::new(DType::BFloat16, &shape, weight.as_slice())?;
    let r = shm.put("weight", &[("w", view)], JsonMap::new()).context("putting the weight")?;

    let mut caches = CacheFlush::new();
    let memcpy_shard = measure::memcpy_gbps(shard_bytes, &mut caches);
    let mut whole = AlignedBuf::zeroed(nbytes);
    let mut shard = AlignedBuf::zeroed(shard_bytes);
    let mut rows_out = Vec::new();
    for (route, client) in [("shm", &shm), ("tcp", &tcp)] {
        for dim in [0u32, 1] {
            let spec = ViewSpec::shard(dim, 1, shards, shape[dim as usize])?;
            let plan = spec.plan(DType::BFloat16, &shape)?;
            let source = best_per_iter(args.iters, || {
                let h = client.get_views_into(&r, &mut [("w", spec, shard.as_mut_slice())])?;
                client.release(&h)?;
                Ok(())
            })?;
            let expected = shard.as_slice().to_vec();
            let local = best_per_iter(args.iters, || {
                let h = client.get_into(&r, &mut [("w", whole.as_mut_slice())])?;
                client.release(&h)?;
                plan.gather(whole.as_slice(), shard.as_mut_slice())?;
                Ok(())
            })?;
            ensure!(shard.as_slice() == &expected[..], "the two ways gave different shard bytes ({route}, dim {dim})");
            let mut check = vec![0u8; shard_bytes];
            plan.gather(weight.as_slice(), &mut check)?;
            ensure!(check == expected, "the shard's bytes are not the weight's ({route}, dim {dim})");
            rows_out.push(row(route, dim, plan.runs, shard_bytes, source, local, memcpy_shard));
        }
    }
    shm.abort(&r.sample_id)?;
    daemon.stop();

    let report = json!({
        "weight_shape": shape,
        "dtype": "bfloat16",
        "weight_bytes": nbytes,
        "shards": shards,
        "shard_bytes": shard_bytes,
        "iters": args.iters,
        "memcpy_shard_gbps": memcpy_shard,
        "rows": rows_out,
    });
    if args.json {
        writeln!(out, "{report}")?;
        return Ok(());
    }
    writeln!(
        out,
        "tensor-parallel shard fetch: bfloat16 weight {rows}x{cols} ({}), shard 1 of {shards} ({}), best of {} \
         runs of {}",
        fmt_bytes(nbytes as u64),
        fmt_bytes(shard_bytes as u64),
        measure::RUNS,
        args.iters
    )?;
    writeln!(out, "memcpy of the shard's bytes: {} GB/s", fmt_gbps(memcpy_shard))?;
    writeln!(
        out,
        "{:<5} {:<4} {:>7}  {:>12} {:>12}  {:>8}  {:>16}",
        "route", "dim", "ranges", "view ms", "whole+cut ms", "speedup", "view vs memcpy"
    )?;
    for row in report["rows"].as_array().into_iter().flatten() {
        let f = |k: &str| row[k].as_f64().unwrap_or(f64::NAN);
        writeln!(
            out,
            "{:<5} {:<4} {:>7}  {:>12.3} {:>12.3}  {:>7.1}x  {:>16.2}",
            row["route"].as_str().unwrap_or("?"),
            row["dim"].as_u64().unwrap_or(0),
            row["ranges"].as_u64().unwrap_or(0),
            f("view_ms"),
            f("whole_then_cut_ms"),
            f("speedup"),
            f("view_vs_memcpy")
        )?;
    }
    if cfg!(debug_assertions) {
        writeln!(out, "(debug build: throughput is not representative; use `cargo run --release`.)")?;
    }
    Ok(())
}

fn row(route: &str, dim: u32, ranges: u64, shard_bytes: usize, view: Duration, local: Duration, memcpy: f64) -> Value {
    let view_gbps = gbps(shard_bytes as u64, view);
    json!({
        "route": route,
        "dim": dim,
        "ranges": ranges,
        "view_ms": view.as_secs_f64() * 1e3,
        "whole_then_cut_ms": local.as_secs_f64() * 1e3,
        "speedup": local.as_secs_f64() / view.as_secs_f64().max(1e-12),
        "view_gbps": view_gbps,
        "view_vs_memcpy": view_gbps / memcpy,
    })
}
