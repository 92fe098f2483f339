//! `ferry serve`: the node daemon. It creates the shared-memory arena (pre-faulted), opens the
//! lifecycle core over it with the arena's size as the budget, serves clients on TCP and/or a
//! Unix socket (and `/metrics`), runs max-hold GC once a second, and on SIGTERM or SIGINT
//! stops accepting, closes every connection (releasing their leases and pins), drains pending
//! removals and reports what it still held. `ferry status` prints a daemon's health map.

use crate::args::{ServeArgs, StatusArgs};
use crate::measure::fmt_bytes;
use anyhow::{Context, Result, bail};
use ferry_net::{Client, ConnectOptions, DaemonConfig};
use ferry_store::{DrainPolicy, Secret, StoreOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Reads a secret file (one line; surrounding whitespace is not part of the secret).
pub(crate) fn read_secret(path: &Path) -> Result<Secret> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the secret file {}", path.display()))?;
    let secret = text.trim();
    if secret.is_empty() {
        bail!("the secret file {} is empty; put the shared secret on its first line", path.display());
    }
    Ok(Secret::new(secret))
}

/// The secret from `--secret-file`, else `FERRY_AUTH_TOKEN` / `DISAGG_AUTH_TOKEN`.
fn secret_from(file: Option<&Path>) -> Result<Option<Secret>> {
    match file {
        Some(path) => read_secret(path).map(Some),
        None => Ok(Secret::from_env("FERRY_AUTH_TOKEN").or_else(|| Secret::from_env("DISAGG_AUTH_TOKEN"))),
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub(crate) fn run(args: ServeArgs, out: &mut dyn Write) -> Result<()> {
    if args.listen.is_none() && args.socket.is_none() {
        bail!("ferry serve needs --listen HOST:PORT and/or --socket PATH");
    }
    let secret = secret_from(args.secret_file.as_deref())?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).context("installing the signal handler")?;
    }
    let options = StoreOptions {
        store_id: args.store_id.clone().map(Into::into),
        max_hold_age: args.max_hold.map(Duration::from_secs),
        retain_on_release: args.retain_on_release,
        ..StoreOptions::default()
    };
    let started = Instant::now();
    let (store, arena) = ferry_net::arena_store(args.capacity, options)
        .with_context(|| format!("creating a {}-byte shared-memory arena", args.capacity))?;
    let prefault = started.elapsed();
    let mut config = DaemonConfig::new(args.listen, args.socket.clone());
    config.secret = secret.clone();
    config.arena = Some(arena);
    let mut daemon = ferry_net::start(store, config).context("starting the daemon")?;
    let metrics = match args.metrics {
        Some(addr) => Some(daemon.serve_metrics(addr).context("serving /metrics")?),
        None => None,
    };
    writeln!(
        out,
        "ferry serve: store {} over a {} arena (pre-faulted in {:.2} s), auth {}",
        daemon.store().store_id(),
        fmt_bytes(args.capacity),
        prefault.as_secs_f64(),
        if secret.is_some() { "required" } else { "off (no secret)" }
    )?;
    if ferry_shm::shmem_huge_pages_available() == Some(false) {
        writeln!(
            out,
            "  note    shmem huge pages are off on this host ({}), so the arena uses 4 KiB pages; \
             `echo advise > {0}` (as root) made 64 MiB shm copies 15-25% faster on the reference box",
            ferry_shm::arena::SHMEM_THP_SETTING
        )?;
    }
    if let Some(addr) = daemon.tcp_addr() {
        writeln!(out, "  tcp     ferry://{addr}")?;
    }
    if let Some(path) = daemon.unix_path() {
        writeln!(out, "  unix    ferry+unix://{}  (shared memory)", path.display())?;
    }
    if let Some(addr) = metrics {
        writeln!(out, "  metrics http://{addr}/metrics")?;
    }
    writeln!(out, "ready; SIGTERM or Ctrl-C stops it")?;
    out.flush()?;

    let mut last_gc = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
        if args.max_hold.is_some() && last_gc.elapsed() >= Duration::from_secs(1) {
            let report = daemon.store().gc();
            if report.force_freed > 0 {
                tracing::warn!(
                    samples = report.force_freed,
                    bytes = report.force_freed_bytes,
                    "max-hold GC freed abandoned samples"
                );
            }
            last_gc = Instant::now();
        }
    }

    writeln!(out, "stopping: closing {} connection(s), releasing their leases", daemon.connections())?;
    let store = daemon.store().clone();
    daemon.stop();
    let drained = store.drain(DrainPolicy::default());
    let health = store.health();
    writeln!(
        out,
        "stopped: {} sample(s), {} still held (they go with the arena), {} pending removal(s)",
        health.resident_samples,
        fmt_bytes(health.resident_bytes),
        health.release_pending
    )?;
    if let Err(e) = drained {
        writeln!(out, "drain: {e}")?;
    }
    Ok(())
}

/// `ferry status URI`.
pub(crate) fn status(args: StatusArgs, out: &mut dyn Write) -> Result<()> {
    let options = ConnectOptions {
        secret: secret_from(args.secret_file.as_deref())?,
        route: ferry_net::RoutePreference::Stream,
        prefault: false,
    };
    let client = Client::connect_with(&args.uri, options).with_context(|| format!("connecting to {}", args.uri))?;
    let health = client.health().context("asking for the health map")?;
    if args.json {
        writeln!(out, "{}", serde_json::to_string(&health)?)?;
        return Ok(());
    }
    let value = serde_json::to_value(&health)?;
    writeln!(out, "ferry daemon {} (store {})", args.uri, client.store_id())?;
    if let Some(map) = value.as_object() {
        for (key, v) in map {
            writeln!(out, "  {key:<22} {v}")?;
        }
    }
    Ok(())
}
