//! [`RefQueue`]: the consume-once queue protocol the loader's queue mode reads from. The
//! in-process staging queue ([`crate::ref_queue::SampleRefQueue`]) and the channel adapter
//! ([`crate::stream_queue::StreamingRefQueue`]) implement it.
//!
//! Leasing rules (SpecForge §8.4, §11): `get` leases refs (they become in flight); `ack` settles
//! them; `fail` gives them back (`retryable`) or settles them as lost (terminal). What "settled"
//! means is the implementation's: a stream queue advances the channel's consumed counter.

use crate::signal::StopSignal;
use ferry_core::{Result, SampleId, SampleRef};
use std::time::Duration;

/// A consume-once source of refs with leases.
pub trait RefQueue: Send + Sync {
    /// Leases up to `max` refs. What an empty result means is the implementation's: a stream
    /// queue blocks until it has `max` refs or the stream ended (empty = end of stream); the
    /// staging queue returns at once when `timeout` is `None`, else waits up to `timeout`.
    fn get(&self, max: usize, timeout: Option<Duration>) -> Result<Vec<SampleRef>>;

    /// Like [`RefQueue::get`], but returns `[]` as soon as `stop` is set; refs not yet returned
    /// stay in the queue. The default waits at most 100 ms (SpecForge's loader fallback for
    /// queues without an interruptible get, so an empty staging queue reads as end of stream).
    fn get_interruptible(&self, max: usize, stop: &StopSignal) -> Result<Vec<SampleRef>> {
        if stop.is_set() {
            return Ok(Vec::new());
        }
        self.get(max, Some(Duration::from_millis(100)))
    }

    /// Settles leased refs by id.
    fn ack_ids(&self, ids: &[SampleId]) -> Result<()>;

    /// Settles leased refs.
    fn ack(&self, refs: &[SampleRef]) -> Result<()> {
        let ids: Vec<SampleId> = refs.iter().map(|r| r.sample_id.clone()).collect();
        self.ack_ids(&ids)
    }

    /// Gives leased refs back: `retryable` puts them back to be returned again; otherwise they
    /// are settled as lost.
    fn fail(&self, refs: &[SampleRef], reason: &str, retryable: bool) -> Result<()>;

    /// Refs waiting to be leased.
    fn depth(&self) -> usize;

    /// Ids of the leased, unsettled refs, oldest first.
    fn in_flight_ids(&self) -> Vec<SampleId>;

    /// Whether a loader that stops after prefetching may put never-yielded refs back
    /// (retryably) without settling them. True for stream queues.
    fn loader_close_retryable(&self) -> bool {
        false
    }
}
