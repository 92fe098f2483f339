//! The ref channel: an append-only, tensor-free stream of refs from a producer pool to a
//! consumer pool, with explicit end-of-stream and failure signals in both directions, a consumed
//! counter (the producer's backpressure signal) and the consumer's dispatch quantum
//! (SpecForge's `StreamingRefChannel`, `SPECFORGE-RUNTIME.md` §8).
//!
//! Users see two traits: [`RefSink`] (the producer's half) and [`RefSource`] (the consumer's
//! half). [`FileRefChannel`] implements both over a JSONL file and its sidecars on a shared
//! mount, byte-compatible with SpecForge, so a SpecForge producer can feed a ferry consumer and
//! the reverse. A networked backend (the daemon, Redis Streams) implements the same traits
//! without touching the queue, the distributor or the producer driver.
//!
//! # Layout
//! * [`mod@file`] — [`FileRefChannel`], the file backend; per-rank inboxes are the same type.
//! * [`sidecar`] — sidecar names, atomic writes, SpecForge's read rules.
//! * [`io`] — [`io::AppendFs`], the seam fault-injection tests use.
//! * [`stream`] — [`RefStream`], the blocking iterator over a source (idle timeout).

pub mod file;
pub mod io;
pub mod sidecar;
pub mod stream;

pub use file::{ChannelRole, FileRefChannel};
pub use stream::{RefStream, StreamOptions};

use crate::record::RefRecord;
use ferry_core::{Error, Result, SampleRef};

/// The producer's half of a channel.
pub trait RefSink: Send + Sync {
    /// The channel's path or URI, for messages.
    fn describe(&self) -> String;

    /// Appends one ref. It counts as published once the whole record reached the channel, even
    /// if making it durable (fsync) then fails (the error is still returned).
    fn publish(&self, r: &SampleRef) -> Result<()>;

    /// Appends refs in one write and one fsync. On failure, exactly the records written whole
    /// count as published ([`RefSink::published`] says how many).
    fn publish_batch(&self, refs: &[SampleRef]) -> Result<()>;

    /// Appends records that are already compact JSON refs, one per line, as
    /// [`RefSink::publish_batch`] does (the distributor forwards the producer's bytes this way
    /// instead of serializing each ref again). The default parses them and publishes the refs.
    fn publish_lines(&self, lines: &[&str]) -> Result<()> {
        let refs = lines.iter().map(|l| ferry_core::json::sample_ref_from_str(l)).collect::<Result<Vec<_>>>()?;
        self.publish_batch(&refs)
    }

    /// Refs this instance published (not read back from the channel).
    fn published(&self) -> u64;

    /// Signals a clean end of stream.
    fn close(&self) -> Result<()>;

    /// Signals that the producer failed (`reason` empty becomes "producer failed").
    fn fail(&self, reason: &str) -> Result<()>;

    /// The consumer's cumulative consumed count.
    fn consumed_remote(&self) -> Result<u64>;

    /// Published by this instance minus consumed by the consumer: the backpressure signal.
    fn in_flight_remote(&self) -> Result<i64> {
        Ok(self.published() as i64 - self.consumed_remote()? as i64)
    }

    /// The consumer's failure text, if it failed.
    fn consumer_failure(&self) -> Result<Option<String>>;

    /// Whether the consumer finished or failed.
    fn consumer_stopped(&self) -> Result<bool>;

    /// The dispatch quantum the consumer published, if it has.
    fn consumer_quantum(&self) -> Result<Option<u64>>;
}

/// The consumer's half of a channel.
pub trait RefSource: Send + Sync {
    /// The channel's path or URI, for messages.
    fn describe(&self) -> String;

    /// Who writes this channel, for error messages (`producer`, `ref-distributor`).
    fn upstream(&self) -> &'static str;

    /// Returns up to `max` new refs (all of them for `None`) without blocking. Refs already read
    /// but beyond `max` stay queued for the next call; a torn trailing record is never parsed.
    fn poll(&self, max: Option<usize>) -> Result<Vec<SampleRef>>;

    /// Up to `max` new records, read only as far as [`RefRecord`] needs (the distributor's
    /// path: it forwards records without building refs). The default builds the refs with
    /// [`RefSource::poll`] and serializes them.
    fn poll_records(&self, max: Option<usize>) -> Result<Vec<RefRecord>> {
        self.poll(max)?.iter().map(RefRecord::from_ref).collect()
    }

    /// Whether the writer signalled a clean end of stream. An inbox whose distributor failed
    /// returns that failure as the error instead.
    fn is_closed(&self) -> Result<bool>;

    /// The writer's failure text, if it failed.
    fn failure(&self) -> Result<Option<String>>;

    /// Adds `n` to this instance's consumed count and publishes the new absolute value.
    fn mark_consumed(&self, n: u64) -> Result<()>;

    /// Sets this instance's consumed count from the channel (a restart continues, never
    /// rewinds); returns it.
    fn seed_consumed(&self) -> Result<u64>;

    /// This instance's consumed count.
    fn consumed(&self) -> u64;

    /// Signals that the consumer finished.
    fn mark_consumer_done(&self) -> Result<()>;

    /// Signals that the consumer failed (`reason` empty becomes "consumer failed").
    fn mark_consumer_failed(&self, reason: &str) -> Result<()>;

    /// Publishes the consumer's dispatch quantum once per attempt. With `allow_existing` (a
    /// resume), an existing equal value is accepted; a different one never is.
    fn publish_consumer_quantum(&self, quantum: u64, allow_existing: bool) -> Result<()>;

    /// The writer's failure as an error, if it failed.
    fn failure_error(&self) -> Result<Option<Error>> {
        Ok(self.failure()?.map(|reason| Error::PeerFailed {
            channel: self.describe(),
            peer: self.upstream().to_owned(),
            reason,
        }))
    }
}

/// A publication of several refs that remembers exactly which prefix reached the channel, so a
/// producer that fails midway aborts only the features of the untouched suffix (SpecForge's
/// `RefPublishTransaction`).
#[derive(Debug)]
pub struct PublishTransaction<'a, S: RefSink + ?Sized> {
    sink: &'a S,
    refs: Vec<SampleRef>,
    published_count: usize,
}

impl<'a, S: RefSink + ?Sized> PublishTransaction<'a, S> {
    /// A transaction over `refs`; nothing is written yet.
    pub fn begin(sink: &'a S, refs: Vec<SampleRef>) -> Self {
        PublishTransaction { sink, refs, published_count: 0 }
    }

    /// Publishes the unpublished suffix, one ref at a time. On an error, the refs that reached
    /// the channel before it count as published (measured from the channel's counter, which
    /// may advance by at most one on a failed publish).
    pub fn commit(&mut self) -> Result<()> {
        while self.published_count < self.refs.len() {
            let before = self.sink.published();
            if let Err(e) = self.sink.publish(&self.refs[self.published_count]) {
                let delta = self.sink.published().wrapping_sub(before);
                if delta > 1 {
                    return Err(Error::Protocol {
                        context: self.sink.describe(),
                        message: format!(
                            "invalid publication progress: one failed publish advanced the counter by {delta}"
                        ),
                    });
                }
                self.published_count += delta as usize;
                return Err(e);
            }
            self.published_count += 1;
        }
        Ok(())
    }

    /// All refs of the transaction.
    pub fn refs(&self) -> &[SampleRef] {
        &self.refs
    }

    /// How many reached the channel.
    pub fn published_count(&self) -> usize {
        self.published_count
    }

    /// The published prefix.
    pub fn published_refs(&self) -> &[SampleRef] {
        &self.refs[..self.published_count]
    }

    /// The unpublished suffix (whose features a failed producer must abort).
    pub fn unpublished_refs(&self) -> &[SampleRef] {
        &self.refs[self.published_count..]
    }
}

/// Publishes `refs` as one transaction (begin + commit), returning it either way.
pub fn publish_many<S: RefSink + ?Sized>(sink: &S, refs: Vec<SampleRef>) -> (PublishTransaction<'_, S>, Result<()>) {
    let mut tx = PublishTransaction::begin(sink, refs);
    let result = tx.commit();
    (tx, result)
}
