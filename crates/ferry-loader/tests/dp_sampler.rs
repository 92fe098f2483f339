//! Deterministic DP sharding: every sample once per epoch across ranks (padding aside), the
//! same order on every run, a new order per epoch, and the loader reading its rank's shard.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ferry_loader::sampler::DistributedShard;
use ferry_loader::{DpSharding, FeatureLoader, RefSource};
use std::collections::BTreeMap;

fn all_ranks(n: usize, dp: usize, seed: u64, epoch: u64) -> Vec<Vec<usize>> {
    (0..dp).map(|rank| DistributedShard::new(n, dp, rank, seed, epoch).indices().unwrap()).collect()
}

#[test]
fn ranks_cover_every_sample_exactly_once_per_epoch_padding_aside() {
    for dp in [2, 3] {
        for n in [1, 2, 7, 10, 100, 1001] {
            for epoch in [0, 1] {
                let shards = all_ranks(n, dp, 42, epoch);
                let per_rank = n.div_ceil(dp);
                assert!(shards.iter().all(|s| s.len() == per_rank), "dp {dp} n {n}: equal shares");
                let mut counts = BTreeMap::new();
                for i in shards.iter().flatten() {
                    *counts.entry(*i).or_insert(0usize) += 1;
                }
                assert_eq!(counts.keys().copied().collect::<Vec<_>>(), (0..n).collect::<Vec<_>>(), "dp {dp} n {n}");
                let padding = per_rank * dp - n;
                let repeated: usize = counts.values().map(|c| c - 1).sum();
                assert_eq!(repeated, padding, "dp {dp} n {n}: only the padding repeats");
            }
        }
    }
}

#[test]
fn the_order_is_identical_across_runs_and_differs_across_epochs() {
    for dp in [2, 3] {
        assert_eq!(all_ranks(100, dp, 7, 0), all_ranks(100, dp, 7, 0));
        assert_ne!(all_ranks(100, dp, 7, 0), all_ranks(100, dp, 7, 1));
        assert_ne!(all_ranks(100, dp, 7, 0), all_ranks(100, dp, 8, 0), "the seed matters");
    }
    // The permutation is seeded with seed + epoch, as DistributedSampler does.
    assert_eq!(all_ranks(50, 2, 10, 1), all_ranks(50, 2, 11, 0));
}

#[test]
fn without_shuffle_ranks_stride_through_the_data_and_pad_from_the_start() {
    let shard = |rank| DistributedShard { shuffle: false, ..DistributedShard::new(10, 3, rank, 0, 0) };
    assert_eq!(shard(0).indices().unwrap(), [0, 3, 6, 9]);
    assert_eq!(shard(1).indices().unwrap(), [1, 4, 7, 0]);
    assert_eq!(shard(2).indices().unwrap(), [2, 5, 8, 1]);
    let dropped = DistributedShard { drop_last: true, ..shard(1) };
    assert_eq!(dropped.indices().unwrap(), [1, 4, 7]);
}

fn rank_ids(fixture: &Fixture, dp: usize, rank: usize, epoch: u64) -> Vec<String> {
    let mut loader = FeatureLoader::builder(fixture.store.clone(), RefSource::Fixed(fixture.refs.clone()))
        .batch_size(1)
        .drop_last(false)
        .dp_sharding(DpSharding::new(dp, rank, 1234))
        .build()
        .unwrap();
    loader.set_epoch(epoch);
    loader.iter().map(|b| b.unwrap().sample_ids[0].to_string()).collect()
}

#[test]
fn sharded_loaders_read_their_rank_share_of_each_epoch() {
    let fixture = Fixture::eagle3(&[4; 7]);
    for epoch in [0, 1] {
        let mut union: Vec<String> = Vec::new();
        for rank in 0..2 {
            let ids = rank_ids(&fixture, 2, rank, epoch);
            let expected: Vec<String> = DistributedShard::new(7, 2, rank, 1234, epoch)
                .indices()
                .unwrap()
                .into_iter()
                .map(|i| format!("run:{i:08}"))
                .collect();
            assert_eq!(ids, expected);
            union.extend(ids);
        }
        union.sort();
        union.dedup();
        assert_eq!(union.len(), 7, "epoch {epoch}: every sample is read by some rank");
    }
    assert_ne!(rank_ids(&fixture, 2, 0, 0), rank_ids(&fixture, 2, 0, 1));
}

#[test]
fn sharded_seek_counts_the_rank_share() {
    let fixture = Fixture::eagle3(&[4; 7]);
    let mut loader = FeatureLoader::builder(fixture.store.clone(), RefSource::Fixed(fixture.refs.clone()))
        .batch_size(2)
        .drop_last(false)
        .dp_sharding(DpSharding::new(3, 2, 0))
        .build()
        .unwrap();
    assert_eq!(loader.refs_per_pass(), 3);
    assert_eq!(loader.batches_per_pass(), 2);
    assert!(loader.seek(3).is_err());
    loader.seek(1).unwrap();
    assert_eq!(loader.iter().count(), 1);
    let bad = FeatureLoader::builder(fixture.store.clone(), RefSource::Fixed(fixture.refs.clone()))
        .dp_sharding(DpSharding::new(2, 2, 0))
        .build();
    assert!(bad.unwrap_err().to_string().contains("rank 2 of dp 2"));
}
