//! ferry's `randperm` and `DistributedShard` against vectors written by real torch
//! (`tests/gen_torch_randperm.py` writes `tests/data/torch_randperm.json`). torch is not
//! installed where ferry builds; the vectors are committed (torch 2.5.1, 572 cases) and the test
//! requires them.
#![allow(clippy::unwrap_used)]

use ferry_loader::sampler::{DistributedShard, Mt19937, torch_randperm};
use serde_json::Value;
use std::path::Path;

fn usize_list(v: &Value) -> Vec<usize> {
    v.as_array().unwrap().iter().map(|i| usize::try_from(i.as_u64().unwrap()).unwrap()).collect()
}

#[test]
fn torch_randperm_vectors() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/torch_randperm.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("{}: {e}; regenerate it with tests/gen_torch_randperm.py where torch is installed", path.display())
    });
    let cases: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert!(cases.len() >= 500, "{} holds only {} cases", path.display(), cases.len());
    let mut mismatches = Vec::new();
    let (mut perms, mut shards) = (0, 0);
    for case in &cases {
        let n = usize::try_from(case["n"].as_u64().unwrap()).unwrap();
        let seed = case["seed"].as_u64().unwrap();
        let torch = case.get("torch").and_then(Value::as_str).unwrap_or("?");
        if let Some(expected) = case.get("perm") {
            perms += 1;
            let ours = torch_randperm(n, &mut Mt19937::new(seed));
            if ours != usize_list(expected) {
                mismatches.push(format!("randperm n={n} seed={seed} (torch {torch})"));
            }
        }
        if let Some(sampler) = case.get("sampler") {
            shards += 1;
            let shard = DistributedShard {
                n,
                dp: usize::try_from(sampler["num_replicas"].as_u64().unwrap()).unwrap(),
                rank: usize::try_from(sampler["rank"].as_u64().unwrap()).unwrap(),
                seed: seed.into(),
                epoch: sampler["epoch"].as_u64().unwrap(),
                shuffle: sampler["shuffle"].as_bool().unwrap(),
                drop_last: sampler["drop_last"].as_bool().unwrap(),
            };
            if shard.indices().unwrap() != usize_list(&case["indices"]) {
                mismatches.push(format!("{shard:?} (torch {torch})"));
            }
        }
    }
    println!("compared {perms} randperm and {shards} DistributedSampler cases from {}", path.display());
    assert!(mismatches.is_empty(), "{} of {} cases differ from torch: {mismatches:#?}", mismatches.len(), cases.len());
}
