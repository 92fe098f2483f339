//! The topology equivalence suite (`SPECFORGE-RUNTIME.md` §1): one seed, four topologies, each
//! role a separate process on loopback. A synthetic dump (`ferry synth`) is trained colocated
//! (`consume --files`), disaggregated through a shared directory and through a `ferry serve`
//! daemon (`ingest` + `consume --manifest`), and the same seed's online capture
//! (`produce` + `consume --control`) is trained once. Every topology must see every sample with
//! the bytes the generator made (per-sample checksums over what the loader collated), the
//! offline ones in the identical batches (same DP shards, same epoch shuffles), the online one
//! exactly once, and the daemon must end empty.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const SAMPLES: &str = "24";
const SEED: &str = "7";
/// Variable lengths: batches pad, and the checksums must see through the padding.
const SHAPE: [&str; 6] = ["--seq-len", "96", "--min-seq-len", "24", "--hidden", "32"];
/// Offline DP shape: 2 ranks, batches of 3, two epochs (the second reshuffled).
const OFFLINE: [&str; 8] = ["--dp", "2", "--batch", "3", "--epochs", "2", "--seed", "11"];

/// The batches an offline run trained, with sample ids reduced to their keys.
fn batches(path: &Path) -> Vec<(u64, u64, u64, Vec<String>)> {
    let mut out: Vec<_> = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let ids = v["sample_ids"].as_array().unwrap().iter().map(|s| key(s.as_str().unwrap())).collect();
            (v["epoch"].as_u64().unwrap(), v["rank"].as_u64().unwrap(), v["step"].as_u64().unwrap(), ids)
        })
        .collect();
    out.sort();
    out
}

/// `ferry consume` over an offline source, recording checksums and batches under `tag`.
fn consume_offline(dir: &Path, tag: &str, source: &[&str]) -> Guard {
    let mut cmd = ferry();
    cmd.arg("consume").args(source).args(OFFLINE).arg("--checksums").arg(dir.join(format!("{tag}.sums")));
    cmd.arg("--batches").arg(dir.join(format!("{tag}.batches"))).args(["--wait-timeout", "100"]);
    spawn(cmd)
}

/// `ferry ingest` of the dump; `extra` adds flags (a daemon store holds by default).
fn ingest(dump: &Path, store: &str, manifest: &Path, extra: &[&str]) -> Guard {
    let mut cmd = ferry();
    cmd.arg("ingest").arg(dump).args(["--store", store, "--manifest"]).arg(manifest);
    cmd.args(["--run-id", "disagg"]).args(extra);
    spawn(cmd)
}

#[test]
fn the_same_seed_trains_the_same_bytes_in_every_topology() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let dump = d.join("dump");
    let mut synth = ferry();
    synth.arg("synth").arg(&dump).args(["--samples", SAMPLES, "--seed", SEED]).args(SHAPE);
    run_ok(synth, "ferry synth");
    let expected: BTreeMap<String, u64> = generated(&dump).into_iter().collect();
    assert_eq!(expected.len(), 24);

    // Colocated offline: the dump read in place.
    succeed(consume_offline(d, "colocated", &["--files", dump.to_str().unwrap()]), "colocated consumer");

    // Disaggregated offline through a shared directory: the consumer starts first and waits
    // for the producer's `.done`.
    let shared = format!("dir://{}", d.join("shared").display());
    let manifest = d.join("control-dir/manifest.json");
    let consumer = consume_offline(d, "dir", &["--manifest", manifest.to_str().unwrap(), "--store", &shared]);
    succeed(ingest(&dump, &shared, &manifest, &[]), "ingest into a shared directory");
    succeed(consumer, "disaggregated consumer (dir)");
    assert!(Path::new(&format!("{}.consumed", manifest.display())).exists());

    // Disaggregated offline through a daemon: the producer holds its samples until the
    // consumer's `.consumed`, then frees them.
    let daemon = Daemon::start(d, &["--retain-on-release"]);
    let manifest = d.join("control-daemon/manifest.json");
    let consumer = consume_offline(d, "daemon", &["--manifest", manifest.to_str().unwrap(), "--store", &daemon.uri()]);
    let producer = ingest(&dump, &daemon.uri(), &manifest, &["--hold-timeout", "100"]);
    succeed(consumer, "disaggregated consumer (daemon)");
    succeed(producer, "ingest into the daemon (holding until consumed)");
    daemon.assert_empty();

    // Online through the same daemon: the same seed's capture, trained exactly once.
    let control = d.join("control-online");
    let mut produce = ferry();
    produce.args(["produce", "--control", control.to_str().unwrap(), "--store", &daemon.uri()]);
    produce.args(["--samples", SAMPLES, "--seed", SEED, "--high-watermark", "12", "--peer-timeout", "100"]).args(SHAPE);
    let producer = spawn(produce);
    wait_for_file(&control.join("refs.jsonl.producer_claim"), "the online producer's claim");
    let mut consume = ferry();
    consume.args(["consume", "--control", control.to_str().unwrap(), "--store", &daemon.uri()]);
    consume.args(["--dp", "2", "--batch", "3", "--accum", "1", "--idle-timeout", "100", "--checksums"]);
    consume.arg(d.join("online.sums"));
    succeed(spawn(consume), "online consumer");
    succeed(producer, "online producer");
    daemon.assert_empty();

    for tag in ["colocated", "dir", "daemon", "online"] {
        assert_eq!(
            checksums_by_key(&d.join(format!("{tag}.sums"))),
            expected,
            "{tag}: bytes differ from the generator's"
        );
    }
    let online = checksums(&d.join("online.sums"));
    let distinct: BTreeSet<String> = online.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!((online.len(), distinct.len()), (24, 24), "online: every sample exactly once");

    let colocated = batches(&d.join("colocated.batches"));
    assert_eq!(batches(&d.join("dir.batches")), colocated, "the shared-directory run batched differently");
    assert_eq!(batches(&d.join("daemon.batches")), colocated, "the daemon run batched differently");
    // 24 samples over 2 ranks in batches of 3: 4 batches per rank per epoch, every sample
    // once per epoch, and the second epoch reshuffled.
    for epoch in 0..2 {
        let of_epoch: Vec<_> = colocated.iter().filter(|b| b.0 == epoch).collect();
        assert_eq!(of_epoch.len(), 8);
        let seen: BTreeSet<&String> = of_epoch.iter().flat_map(|b| &b.3).collect();
        assert_eq!(seen.len(), 24, "epoch {epoch} covers every sample");
    }
    let order = |epoch| colocated.iter().filter(|b| b.0 == epoch).flat_map(|b| b.3.clone()).collect::<Vec<_>>();
    assert_ne!(order(0), order(1), "epochs reshuffle");
}
