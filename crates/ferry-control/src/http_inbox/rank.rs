//! One online consumer rank (other than 0) whose inbox is any [`RefSource`], typically a
//! [`super::RemoteInbox`]: [`crate::online::run_rank_from`] with that inbox, after checking the
//! rank is not rank 0 (rank 0 reads its inbox where its distributor writes it).

use crate::channel::RefSource;
use crate::collective::Collective;
use crate::online::{ConsumerConfig, RankReport, fail_rank, run_rank_from};
use ferry_core::{Error, Result, SampleRef};
use ferry_store::FeatureStoreApi;
use std::sync::Arc;

/// Runs rank `collective.rank()` (≥ 1) over `inbox` with [`crate::online::run_rank_with`]'s
/// hooks and lifecycle: `train` gets each optimizer step's micro-batches, `on_durable` the
/// global step after its durable acknowledgement; success ends in
/// [`crate::online::finish_rank`], failure in [`crate::online::fail_rank`]. Call it after
/// [`crate::online::agree_on_rank0_setup`], like `run_rank_with`.
pub fn run_rank_over(
    config: &ConsumerConfig,
    collective: Arc<dyn Collective>,
    inbox: Arc<dyn RefSource>,
    store: Option<Arc<dyn FeatureStoreApi>>,
    train: impl FnMut(&[Vec<SampleRef>]) -> Result<()>,
    on_durable: impl FnMut(i64) -> Result<()>,
) -> Result<RankReport> {
    let rank = collective.rank();
    if rank == 0 || collective.world_size() != config.dp_size || rank >= config.dp_size {
        let error = Error::InvalidArgument(format!(
            "online consumer over an inbox source: rank {rank} of a world of {} with dp_size {}; rank 0 reads its \
             inbox where the distributor writes it, and the world size must equal dp_size",
            collective.world_size(),
            config.dp_size
        ));
        fail_rank(config, collective.as_ref(), store.as_deref(), &error.python_reason(), false);
        return Err(error);
    }
    run_rank_from(config, collective, None, store, Some(inbox), train, on_durable)
}
