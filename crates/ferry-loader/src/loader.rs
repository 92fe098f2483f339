//! [`FeatureLoader`]: refs + store → collated [`TrainBatch`]es (SpecForge's `FeatureDataLoader`,
//! `SPECFORGE-RUNTIME.md` §12): the builder, the two ref sources, and the pass iterator.
//!
//! The source of refs is a [`RefSource`]:
//! * [`RefSource::Fixed`] (refs mode, offline): a pass ([`FeatureLoader::iter`]) cuts the refs
//!   (or, with DP sharding, this rank's share of them for the current epoch) into chunks of
//!   `batch_size`, starting after a one-shot [`FeatureLoader::seek`] skip, dropping a short tail
//!   when `drop_last`. Each chunk is materialized by [`crate::materialize`] either inline
//!   (`num_workers = 0`) or on worker threads (the `prefetch` module). The loader is
//!   re-iterable: every pass yields the same batches (for the same epoch), and it never acks
//!   (the durable ack is the trainer's job).
//! * [`RefSource::Queue`] (queue mode, online): a consume-once [`RefQueue`]; the pass leases
//!   each batch's refs from the queue, acks what the consumer took and fails what it could not
//!   yield. The `queue_mode` module owns that protocol; the batch engine is the same.

use crate::materialize::{BatchContext, GcTimer, Sample, SampleTransform, materialize_batch};
use crate::prefetch::Prefetcher;
use crate::queue_mode::{QueuePass, QueueSettings, QueueSource};
use crate::sampler::DistributedShard;
use crate::strategies::{Strategy, StrategyRegistry};
use ferry_control::queue::RefQueue;
use ferry_core::{BufferPool, Error, Result, SampleRef, TrainBatch};
use ferry_store::FeatureStoreApi;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// Where a loader's refs come from.
#[derive(Clone)]
#[non_exhaustive]
pub enum RefSource {
    /// A fixed, re-iterable list (offline: a manifest's refs). Every pass reads it again; the
    /// store should retain on release (or serve read-only `file://` refs).
    Fixed(Vec<SampleRef>),
    /// A consume-once queue (online: the staging queue or a ref channel's queue). Each ref is
    /// leased once, acked once the consumer has taken its batch (unless acks are deferred to
    /// the trainer), and failed if it cannot be yielded; see the `queue_mode` module doc.
    Queue(Arc<dyn RefQueue>),
}

impl std::fmt::Debug for RefSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RefSource::Fixed(refs) => f.debug_tuple("Fixed").field(&format_args!("{} refs", refs.len())).finish(),
            RefSource::Queue(queue) => f
                .debug_struct("Queue")
                .field("depth", &queue.depth())
                .field("in_flight", &queue.in_flight_ids().len())
                .finish(),
        }
    }
}

/// DP sharding of a fixed ref list, applied per pass for the loader's current epoch; see
/// [`DistributedShard`] for the exact (torch-equal) order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DpSharding {
    /// Number of data-parallel ranks.
    pub dp: usize,
    /// This rank.
    pub rank: usize,
    /// Sampler seed, the same on every rank: any integer torch's `manual_seed` takes,
    /// `[-2**63, 2**64)` (negative seeds wrap modulo 2**64, as in torch).
    pub seed: i128,
    /// Shuffle per epoch (`true`) or keep ref order.
    pub shuffle: bool,
    /// Drop the tail instead of padding every rank to the same count.
    pub drop_last: bool,
}

impl DpSharding {
    /// torch's defaults: shuffled, padded (`drop_last=False`).
    pub fn new(dp: usize, rank: usize, seed: impl Into<i128>) -> Self {
        DpSharding { dp, rank, seed: seed.into(), shuffle: true, drop_last: false }
    }

    fn shard(&self, n: usize, epoch: u64) -> DistributedShard {
        DistributedShard {
            n,
            dp: self.dp,
            rank: self.rank,
            seed: self.seed,
            epoch,
            shuffle: self.shuffle,
            drop_last: self.drop_last,
        }
    }
}

/// Default wait for workers to stop when a pass is closed or dropped (SpecForge's
/// `SPECFORGE_LOADER_JOIN_TIMEOUT_S` default).
pub const DEFAULT_JOIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Default interval between `store.gc()` calls (SpecForge's `gc_interval_s`).
pub const DEFAULT_GC_INTERVAL: Duration = Duration::from_secs(15);
/// Default bytes of idle batch buffers kept for reuse.
pub const DEFAULT_BATCH_POOL_BYTES: u64 = 1 << 30;

/// Builds a [`FeatureLoader`]; every option has SpecForge's default.
pub struct FeatureLoaderBuilder {
    store: Arc<dyn FeatureStoreApi>,
    source: RefSource,
    batch_size: usize,
    drop_last: bool,
    strategy: String,
    num_workers: usize,
    transform: Option<Arc<SampleTransform>>,
    registry: StrategyRegistry,
    gc_interval: Option<Duration>,
    join_timeout: Duration,
    batch_pool_bytes: u64,
    sharding: Option<DpSharding>,
    max_len: Option<u64>,
    defer_ack: bool,
    prefetch_depth: Option<usize>,
}

impl std::fmt::Debug for FeatureLoaderBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeatureLoaderBuilder")
            .field("batch_size", &self.batch_size)
            .field("drop_last", &self.drop_last)
            .field("strategy", &self.strategy)
            .field("num_workers", &self.num_workers)
            .field("transform", &self.transform.is_some())
            .field("sharding", &self.sharding)
            .field("defer_ack", &self.defer_ack)
            .field("prefetch_depth", &self.prefetch_depth)
            .finish_non_exhaustive()
    }
}

impl FeatureLoaderBuilder {
    /// Samples per batch, at least 1 (default 1).
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }

    /// Drop a short final batch (default `true`).
    pub fn drop_last(mut self, drop_last: bool) -> Self {
        self.drop_last = drop_last;
        self
    }

    /// The strategy every ref must carry, looked up in the registry (default `eagle3`).
    pub fn strategy(mut self, name: impl Into<String>) -> Self {
        self.strategy = name.into();
        self
    }

    /// Worker threads, which is also the prefetch window in batches; 0 (the default)
    /// materializes each batch on the iterating thread when it is asked for. In queue mode
    /// this is the default prefetch depth (see [`FeatureLoaderBuilder::prefetch_depth`]).
    pub fn num_workers(mut self, num_workers: usize) -> Self {
        self.num_workers = num_workers;
        self
    }

    /// A per-sample transform, run after the sample's read and release, on the materializing
    /// thread. Costs one more copy per byte (see [`crate::materialize`]).
    pub fn per_sample_transform(
        mut self,
        transform: impl Fn(&mut Sample) -> Result<()> + Send + Sync + 'static,
    ) -> Self {
        self.transform = Some(Arc::new(transform));
        self
    }

    /// The registry the strategy name is looked up in (default [`StrategyRegistry::builtin`]).
    pub fn registry(mut self, registry: StrategyRegistry) -> Self {
        self.registry = registry;
        self
    }

    /// How often the loader runs `store.gc()` while reading; `None` never (default 15 s).
    pub fn gc_interval(mut self, interval: Option<Duration>) -> Self {
        self.gc_interval = interval;
        self
    }

    /// How long closing a pass waits for its workers (default 5 s).
    pub fn join_timeout(mut self, timeout: Duration) -> Self {
        self.join_timeout = timeout;
        self
    }

    /// Idle batch-buffer bytes kept for reuse (default 1 GiB). Batches dropped by the trainer
    /// return their buffers here, so steady-state batches cost no page faults.
    pub fn batch_pool_bytes(mut self, bytes: u64) -> Self {
        self.batch_pool_bytes = bytes;
        self
    }

    /// Shard the fixed refs across DP ranks, reshuffled per epoch.
    pub fn dp_sharding(mut self, sharding: DpSharding) -> Self {
        self.sharding = Some(sharding);
        self
    }

    /// Cuts offline samples to `max_len` tokens (strategies that cut, as SpecForge's offline
    /// datasets do: EAGLE3, DFlash, Domino). Without it each offline ref's `metadata.max_len`
    /// is used, which SpecForge's offline refs always carry. Only the kept tokens are read.
    pub fn max_len(mut self, max_len: u64) -> Self {
        self.max_len = Some(max_len);
        self
    }

    /// Queue mode: the loader never acks; the trainer acks each batch's refs itself after its
    /// durable DP ack (SpecForge's `ack=False`). Yielded refs stay in flight until then.
    /// Default `false`: the loader acks a batch once the consumer has taken it (see
    /// [`Batches`]). No effect in refs mode, which never acks.
    pub fn defer_ack_until_durable(mut self, defer: bool) -> Self {
        self.defer_ack = defer;
        self
    }

    /// Queue mode: batches the `loader-prefetch` thread may hold ready (SpecForge's
    /// `LOADER_PREFETCH`); 0 materializes each batch on the iterating thread. Default:
    /// `num_workers`. No effect in refs mode, whose window is `num_workers`.
    pub fn prefetch_depth(mut self, depth: usize) -> Self {
        self.prefetch_depth = Some(depth);
        self
    }

    /// Checks the options and builds the loader.
    pub fn build(self) -> Result<FeatureLoader> {
        if self.batch_size == 0 {
            return Err(Error::InvalidArgument("batch_size must be >= 1, got 0".into()));
        }
        let strategy = *self.registry.get(&self.strategy)?;
        let source = match self.source {
            RefSource::Fixed(refs) => {
                if let Some(sharding) = &self.sharding {
                    sharding.shard(refs.len(), 0).num_samples()?;
                }
                Source::Fixed(refs.into())
            }
            RefSource::Queue(queue) => {
                if self.sharding.is_some() {
                    return Err(Error::InvalidArgument(
                        "DP sharding applies to a fixed ref list; a queue already holds this rank's refs (the distributor shards the stream)".into(),
                    ));
                }
                let settings = QueueSettings {
                    batch_size: self.batch_size,
                    drop_last: self.drop_last,
                    ack: !self.defer_ack,
                    prefetch_depth: self.prefetch_depth.unwrap_or(self.num_workers),
                    join_timeout: self.join_timeout,
                };
                Source::Queue(Arc::new(QueueSource::new(queue, settings)))
            }
        };
        let ctx = BatchContext {
            store: self.store,
            strategy,
            transform: self.transform,
            pool: BufferPool::new(self.batch_pool_bytes),
            gc: self.gc_interval.map(GcTimer::new),
            max_len: self.max_len,
        };
        Ok(FeatureLoader {
            ctx: Arc::new(ctx),
            source,
            batch_size: self.batch_size,
            drop_last: self.drop_last,
            num_workers: self.num_workers,
            join_timeout: self.join_timeout,
            sharding: self.sharding,
            epoch: 0,
            pending_skip: 0,
        })
    }
}

/// Where a built loader's refs come from.
enum Source {
    Fixed(Arc<[SampleRef]>),
    Queue(Arc<QueueSource>),
}

/// The feature loader, over a fixed ref list or a queue. See the crate doc for an example.
pub struct FeatureLoader {
    ctx: Arc<BatchContext>,
    source: Source,
    batch_size: usize,
    drop_last: bool,
    num_workers: usize,
    join_timeout: Duration,
    sharding: Option<DpSharding>,
    epoch: u64,
    pending_skip: usize,
}

impl std::fmt::Debug for FeatureLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = f.debug_struct("FeatureLoader");
        match &self.source {
            Source::Fixed(refs) => s.field("refs", &refs.len()),
            Source::Queue(queue) => s.field("queue_closed", &queue.is_closed()),
        };
        s.field("strategy", &self.ctx.strategy.name)
            .field("batch_size", &self.batch_size)
            .field("drop_last", &self.drop_last)
            .field("num_workers", &self.num_workers)
            .field("epoch", &self.epoch)
            .field("pending_skip", &self.pending_skip)
            .finish_non_exhaustive()
    }
}

impl FeatureLoader {
    /// A builder reading `source` from `store`: any store, in this process (a
    /// [`ferry_store::FeatureStore`]) or behind a node daemon (`ferry_net::Client`), so every
    /// topology runs the same loader and only the ref source and the store change.
    pub fn builder(store: impl Into<Arc<dyn FeatureStoreApi>>, source: RefSource) -> FeatureLoaderBuilder {
        FeatureLoaderBuilder {
            store: store.into(),
            source,
            batch_size: 1,
            drop_last: true,
            strategy: "eagle3".into(),
            num_workers: 0,
            transform: None,
            registry: StrategyRegistry::builtin(),
            gc_interval: Some(DEFAULT_GC_INTERVAL),
            join_timeout: DEFAULT_JOIN_TIMEOUT,
            batch_pool_bytes: DEFAULT_BATCH_POOL_BYTES,
            sharding: None,
            max_len: None,
            defer_ack: false,
            prefetch_depth: None,
        }
    }

    /// The loader's strategy.
    pub fn strategy(&self) -> &Strategy {
        &self.ctx.strategy
    }

    /// Whether the refs come from a consume-once queue.
    pub fn is_queue(&self) -> bool {
        matches!(self.source, Source::Queue(_))
    }

    /// Refs one pass reads: all of them, or this rank's share (padding included). 0 for a
    /// queue, whose length is not known in advance.
    pub fn refs_per_pass(&self) -> usize {
        let Source::Fixed(refs) = &self.source else { return 0 };
        match &self.sharding {
            Some(sharding) => sharding.shard(refs.len(), self.epoch).num_samples().unwrap_or(0),
            None => refs.len(),
        }
    }

    /// Batches one full pass yields: `floor(refs / batch_size)` with `drop_last`, else `ceil`
    /// (0 for a queue, like [`FeatureLoader::refs_per_pass`]).
    pub fn batches_per_pass(&self) -> usize {
        let refs = self.refs_per_pass();
        batch_count(refs, self.batch_size, self.drop_last)
    }

    /// Skips the first `batches` batches of the next pass only (resume from a saved
    /// position); skipped refs are never fetched or transformed. Skipping exactly all batches
    /// is allowed (the next pass is empty); more is an error. A queue cannot seek.
    pub fn seek(&mut self, batches: usize) -> Result<()> {
        if self.is_queue() {
            return Err(Error::InvalidArgument(format!(
                "seek({batches}) on a queue loader: a queue stream is consume-once and cannot be repositioned"
            )));
        }
        let available = self.batches_per_pass();
        if batches > available {
            return Err(Error::InvalidArgument(format!(
                "seek({batches}) skips past the end of the data: a pass has {available} batch(es) ({} refs, batch_size {}, drop_last {})",
                self.refs_per_pass(),
                self.batch_size,
                self.drop_last
            )));
        }
        self.pending_skip = batches;
        Ok(())
    }

    /// Sets the epoch. Without DP sharding it is only stored (SpecForge's refs mode does not
    /// shuffle); with it, the next pass uses that epoch's shard.
    pub fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }

    /// The epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Materializes `refs` as one batch now, on the calling thread, exactly as a pass would
    /// (validation, offline processing, collation, leases released at once), whatever this
    /// loader's own ref source. For callers that receive refs another way: an online rank that
    /// takes each optimizer step's micro-batches from its inbox stream
    /// (`ferry_control::online::RankStream`) and acknowledges them at the durable ack.
    pub fn load_batch(&self, refs: &[SampleRef]) -> Result<TrainBatch> {
        if refs.is_empty() {
            return Err(Error::InvalidArgument("load_batch needs at least one ref".into()));
        }
        let never = AtomicBool::new(false);
        crate::materialize::materialize_batch(&self.ctx, refs, &never)?
            // Only a raised stop ends a materialization early, and this one is never raised.
            .ok_or_else(|| Error::Protocol {
                context: "feature loader".into(),
                message: "a batch materialization stopped with no stop raised".into(),
            })
    }

    /// Starts a pass, consuming any pending seek. The pass yields `Result<TrainBatch>` and ends
    /// at the first error.
    ///
    /// Queue mode: at most one pass is live at a time (another yields one error, "already has
    /// an active iterator"); after [`FeatureLoader::close`] a pass yields nothing.
    pub fn iter(&mut self) -> Batches {
        let refs = match &self.source {
            Source::Fixed(refs) => Arc::clone(refs),
            Source::Queue(queue) => return Batches { pass: Pass::Queue(queue.start_pass(&self.ctx)) },
        };
        let skip = std::mem::take(&mut self.pending_skip);
        let order = match &self.sharding {
            Some(sharding) => match sharding.shard(refs.len(), self.epoch).indices() {
                Ok(indices) => Some(indices),
                Err(e) => return Batches::failed(Arc::clone(&self.ctx), e, self.join_timeout),
            },
            None => None,
        };
        let plan = PassPlan::new(refs, order, self.batch_size, self.drop_last, skip);
        let engine = if self.num_workers == 0 { Engine::Inline } else { Engine::NotStarted(self.num_workers) };
        Batches {
            pass: Pass::Fixed(FixedPass {
                ctx: Arc::clone(&self.ctx),
                plan,
                engine,
                finished: false,
                deferred_error: None,
                join_timeout: self.join_timeout,
            }),
        }
    }

    /// Queue mode: marks the loader closed (later passes yield nothing) and shuts down the live
    /// pass's prefetch thread, failing the refs it leased but never yielded (see the
    /// `queue_mode` module doc for which are retryable). Fails with [`Error::Timeout`] if the
    /// thread is still inside a store read after the join timeout; calling it again later
    /// completes the shutdown. A live synchronous pass ends at its next call. Idempotent.
    ///
    /// Refs mode: nothing to do; the loader stays re-iterable.
    pub fn close(&self) -> Result<()> {
        match &self.source {
            Source::Fixed(_) => Ok(()),
            Source::Queue(queue) => queue.close(),
        }
    }

    /// Queue mode: whether a pass is live (started and not yet fully shut down, prefetch
    /// thread included). Always `false` in refs mode, whose passes share no state.
    pub fn has_active_pass(&self) -> bool {
        match &self.source {
            Source::Fixed(_) => false,
            Source::Queue(queue) => queue.has_active_pass(),
        }
    }
}

/// Which refs each batch of a pass holds.
struct PassPlan {
    refs: Arc<[SampleRef]>,
    /// Positions into `refs` (a DP shard), or `None` for `refs` in order.
    order: Option<Vec<usize>>,
    batch_size: usize,
    next: usize,
    end: usize,
}

/// Batches `refs` refs make: `floor(refs / batch_size)` with `drop_last`, else `ceil`.
fn batch_count(refs: usize, batch_size: usize, drop_last: bool) -> usize {
    if drop_last { refs / batch_size } else { refs.div_ceil(batch_size) }
}

impl PassPlan {
    fn new(refs: Arc<[SampleRef]>, order: Option<Vec<usize>>, batch_size: usize, drop_last: bool, skip: usize) -> Self {
        let len = order.as_ref().map_or(refs.len(), Vec::len);
        let end = batch_count(len, batch_size, drop_last);
        PassPlan { refs, order, batch_size, next: skip.min(end), end }
    }

    fn len(&self) -> usize {
        self.order.as_ref().map_or(self.refs.len(), Vec::len)
    }

    /// The next batch's index and refs.
    fn next_batch(&mut self) -> Option<(usize, Vec<SampleRef>)> {
        if self.next >= self.end {
            return None;
        }
        let index = self.next;
        self.next += 1;
        let start = index * self.batch_size;
        let stop = (start + self.batch_size).min(self.len());
        let refs = (start..stop)
            .filter_map(|p| {
                let at = self.order.as_ref().map_or(Some(p), |o| o.get(p).copied())?;
                self.refs.get(at).cloned()
            })
            .collect();
        Some((index, refs))
    }

    fn remaining(&self) -> usize {
        self.end - self.next
    }
}

enum Engine {
    Inline,
    NotStarted(usize),
    Prefetch(Prefetcher),
}

/// One pass over a [`FeatureLoader`]: an iterator of `Result<TrainBatch>`, in order. Ends after
/// the first error. Dropping it stops its workers (waiting up to the join timeout);
/// [`Batches::close`] does the same and reports a worker that would not stop.
///
/// Queue mode, when acks are on: the batch the consumer took last is acked when it asks for
/// the next item (also the call that returns `None`), or when the pass is closed or dropped,
/// but not when it is dropped while the thread unwinds from a panic (that batch stays in
/// flight). A failed ack ends the pass with that error.
pub struct Batches {
    pass: Pass,
}

enum Pass {
    Fixed(FixedPass),
    Queue(QueuePass),
}

/// A pass over a fixed ref list.
struct FixedPass {
    ctx: Arc<BatchContext>,
    plan: PassPlan,
    engine: Engine,
    finished: bool,
    deferred_error: Option<Error>,
    join_timeout: Duration,
}

impl std::fmt::Debug for Batches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.pass {
            Pass::Fixed(p) => f
                .debug_struct("Batches")
                .field("next_batch", &p.plan.next)
                .field("end_batch", &p.plan.end)
                .field("finished", &p.finished)
                .finish_non_exhaustive(),
            Pass::Queue(p) => f
                .debug_struct("Batches")
                .field("queue", &true)
                .field("buffered", &p.buffered())
                .field("finished", &p.is_finished())
                .finish_non_exhaustive(),
        }
    }
}

impl Batches {
    fn failed(ctx: Arc<BatchContext>, error: Error, join_timeout: Duration) -> Batches {
        Batches {
            pass: Pass::Fixed(FixedPass {
                ctx,
                plan: PassPlan::new(Arc::from(Vec::new()), None, 1, true, 0),
                engine: Engine::Inline,
                finished: false,
                deferred_error: Some(error),
                join_timeout,
            }),
        }
    }

    /// Items this pass has still to yield (batches, if none fails). A queue's length is not
    /// known: for a queue pass this is the batches already prefetched, a lower bound.
    pub fn remaining(&self) -> usize {
        match &self.pass {
            Pass::Fixed(p) => p.remaining(),
            Pass::Queue(p) => p.buffered(),
        }
    }

    /// Ends the pass now: stops the workers and waits up to the loader's join timeout for
    /// them. Fails with [`Error::Timeout`] if one is still inside a store read or transform;
    /// calling it again later can complete the close. Leases are never leaked either way.
    ///
    /// Queue mode: also acks the batch the consumer took last (acks on), and fails the refs
    /// the prefetch thread leased but the pass never yielded once the thread has stopped.
    pub fn close(&mut self) -> Result<()> {
        let timeout = match &self.pass {
            Pass::Fixed(p) => p.join_timeout,
            Pass::Queue(p) => p.join_timeout(),
        };
        self.close_within(timeout)
    }

    /// [`Batches::close`] with an explicit wait.
    pub fn close_within(&mut self, timeout: Duration) -> Result<()> {
        match &mut self.pass {
            Pass::Fixed(p) => p.close_within(timeout),
            Pass::Queue(p) => p.close_within(timeout, true),
        }
    }
}

impl FixedPass {
    fn remaining(&self) -> usize {
        if self.finished {
            return 0;
        }
        let in_flight = if let Engine::Prefetch(p) = &self.engine { p.in_flight() } else { 0 };
        self.plan.remaining() + in_flight + usize::from(self.deferred_error.is_some())
    }

    fn close_within(&mut self, timeout: Duration) -> Result<()> {
        self.finished = true;
        match &mut self.engine {
            Engine::Prefetch(p) => p.close_within(timeout),
            Engine::Inline | Engine::NotStarted(_) => Ok(()),
        }
    }

    /// Ends the pass with `item`: tells the workers to stop without waiting for them (a worker
    /// still inside a store read must not delay the error); `close` or the drop waits.
    fn end_with(&mut self, item: Option<Result<TrainBatch>>) -> Option<Result<TrainBatch>> {
        self.finished = true;
        if let Engine::Prefetch(p) = &mut self.engine {
            let _ = p.close_within(Duration::ZERO); // a Timeout here only means "not yet"
        }
        item
    }

    fn next_prefetched(&mut self) -> Option<Result<TrainBatch>> {
        if let Engine::NotStarted(workers) = self.engine {
            match Prefetcher::start(&self.ctx, workers) {
                Ok(p) => self.engine = Engine::Prefetch(p),
                Err(e) => return self.end_with(Some(Err(e))),
            }
        }
        let Engine::Prefetch(prefetcher) = &mut self.engine else { return None };
        while prefetcher.has_room() {
            let Some((index, refs)) = self.plan.next_batch() else { break };
            if let Err(e) = prefetcher.submit(index, refs) {
                return self.end_with(Some(Err(e)));
            }
        }
        match prefetcher.next_result() {
            None => self.end_with(None),
            Some(Ok(batch)) => Some(Ok(batch)),
            Some(Err(e)) => self.end_with(Some(Err(e))),
        }
    }
}

impl Iterator for Batches {
    type Item = Result<TrainBatch>;

    fn size_hint(&self) -> (usize, Option<usize>) {
        match &self.pass {
            Pass::Fixed(p) => (0, Some(p.remaining())),
            Pass::Queue(p) if p.is_finished() => (0, Some(0)),
            Pass::Queue(_) => (0, None),
        }
    }

    fn next(&mut self) -> Option<Result<TrainBatch>> {
        match &mut self.pass {
            Pass::Fixed(p) => p.next_batch(),
            Pass::Queue(p) => p.next_batch(),
        }
    }
}

impl FixedPass {
    fn next_batch(&mut self) -> Option<Result<TrainBatch>> {
        if self.finished {
            return None;
        }
        if let Some(e) = self.deferred_error.take() {
            return self.end_with(Some(Err(e)));
        }
        if !matches!(self.engine, Engine::Inline) {
            return self.next_prefetched();
        }
        let Some((_, refs)) = self.plan.next_batch() else { return self.end_with(None) };
        let never_stopped = AtomicBool::new(false);
        match materialize_batch(&self.ctx, &refs, &never_stopped) {
            Ok(Some(batch)) => Some(Ok(batch)),
            Ok(None) => self.end_with(None),
            Err(e) => self.end_with(Some(Err(e))),
        }
    }
}

impl Drop for FixedPass {
    fn drop(&mut self) {
        if let Err(e) = self.close_within(self.join_timeout) {
            tracing::warn!(error = %e, "dropped a feature loader pass whose worker is still busy; it will exit when its read returns");
        }
    }
}
