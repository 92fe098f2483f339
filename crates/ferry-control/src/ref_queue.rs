//! [`SampleRefQueue`]: the in-process, metadata-only staging queue (SpecForge's
//! `SampleRefQueue`, `SPECFORGE-RUNTIME.md` §11): the controller's staging queue, the
//! distributor's hand-off, and the queue the loader's queue-mode tests read.
//!
//! It owns two insertion-ordered maps keyed by sample id, `pending` (waiting to be leased) and
//! `leased` (in flight), behind one mutex with one condition variable that `get` waits on.
//!
//! Rules:
//! * `put` skips an id already pending or leased (at-least-once producers may send a ref twice).
//! * `get` leases up to `max` refs FIFO. With no timeout it never waits (an empty queue reads as
//!   "nothing now"); with a timeout it waits up to it for the first ref.
//! * `ack` forgets leased ids; ids it does not hold are ignored.
//! * `fail` retryable puts a leased ref back at the pending tail; terminal forgets it.
//! * A forgotten id may be put again: durable de-duplication is the ledger's job, not this
//!   queue's.

use crate::queue::RefQueue;
use crate::record::RefRecord;
use ferry_core::{Error, Result, SampleId, SampleRef};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A staged ref: built, or still the channel record the distributor committed (it is read in
/// full only if someone asks for the ref).
#[derive(Debug)]
enum Staged {
    Ref(Box<SampleRef>),
    Record(RefRecord),
}

/// A staged item that could not be converted, with why.
type Unconverted = Box<(Error, Staged)>;

impl Staged {
    fn id(&self) -> &SampleId {
        match self {
            Staged::Ref(r) => &r.sample_id,
            Staged::Record(r) => &r.sample_id,
        }
    }

    /// As a ref (a record is parsed).
    fn into_ref(self) -> std::result::Result<SampleRef, Unconverted> {
        match self {
            Staged::Ref(r) => Ok(*r),
            Staged::Record(record) => record.to_ref().map_err(|e| Box::new((e, Staged::Record(record)))),
        }
    }

    /// As a record (a ref is serialized).
    fn into_record(self) -> std::result::Result<RefRecord, Unconverted> {
        match self {
            Staged::Record(record) => Ok(record),
            Staged::Ref(r) => RefRecord::from_ref(&r).map_err(|e| Box::new((e, Staged::Ref(r)))),
        }
    }
}

/// Pending refs in FIFO order, with their ids for the duplicate check.
#[derive(Debug, Default)]
struct Pending {
    refs: VecDeque<Staged>,
    ids: HashSet<SampleId>,
}

impl Pending {
    fn push_back(&mut self, r: Staged) {
        self.ids.insert(r.id().clone());
        self.refs.push_back(r);
    }

    fn push_front(&mut self, r: Staged) {
        self.ids.insert(r.id().clone());
        self.refs.push_front(r);
    }

    fn pop_front(&mut self) -> Option<Staged> {
        let r = self.refs.pop_front()?;
        self.ids.remove(r.id());
        Some(r)
    }
}

/// Leased ids in lease order. Only ids: a leased ref goes back to the queue only through
/// `fail`, whose caller hands the ref back, so the queue keeps no copy of what it leased.
#[derive(Debug, Default)]
struct Leased {
    by_seq: BTreeMap<u64, SampleId>,
    seq_of: HashMap<SampleId, u64>,
    next_seq: u64,
}

impl Leased {
    fn len(&self) -> usize {
        self.by_seq.len()
    }

    fn contains(&self, id: &SampleId) -> bool {
        self.seq_of.contains_key(id)
    }

    fn insert(&mut self, id: SampleId) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.seq_of.insert(id.clone(), seq);
        self.by_seq.insert(seq, id);
    }

    fn remove(&mut self, id: &SampleId) -> bool {
        match self.seq_of.remove(id) {
            Some(seq) => self.by_seq.remove(&seq).is_some(),
            None => false,
        }
    }

    fn ids(&self) -> Vec<SampleId> {
        self.by_seq.values().cloned().collect()
    }
}

#[derive(Debug, Default)]
struct QueueState {
    pending: Pending,
    leased: Leased,
}

impl QueueState {
    /// Leases up to `max` pending items, oldest first, as `convert` makes them. An item it
    /// cannot convert goes back to the front and ends the lease; its error is returned only
    /// when nothing was leased (the items before it are returned first).
    fn lease<T>(
        &mut self,
        max: usize,
        convert: impl Fn(Staged) -> std::result::Result<T, Unconverted>,
        id: impl Fn(&T) -> &SampleId,
    ) -> Result<Vec<T>> {
        let mut out = Vec::with_capacity(max.min(self.pending.refs.len()));
        while out.len() < max {
            let Some(item) = self.pending.pop_front() else { break };
            match convert(item) {
                Ok(item) => {
                    self.leased.insert(id(&item).clone());
                    out.push(item);
                }
                Err(failed) => {
                    let (e, item) = *failed;
                    self.pending.push_front(item);
                    return if out.is_empty() { Err(e) } else { Ok(out) };
                }
            }
        }
        Ok(out)
    }
}

/// The in-process staging queue. Thread-safe; share it as `Arc<SampleRefQueue>` (or as an
/// `Arc<dyn RefQueue>` for the loader).
#[derive(Debug, Default)]
pub struct SampleRefQueue {
    state: Mutex<QueueState>,
    /// Signalled whenever a ref becomes pending (put, retryable fail).
    refs_added: Condvar,
}

impl SampleRefQueue {
    /// An empty queue.
    pub fn new() -> SampleRefQueue {
        SampleRefQueue::default()
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // A panic elsewhere while holding the lock leaves the state consistent (every update is
        // a single insert or remove pair), so it is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends refs whose ids are neither pending nor leased, in order, and wakes waiting
    /// `get`s. Returns how many were accepted (a repeated id, also within `refs`, is skipped).
    /// SpecForge guards each ref against carrying tensors; a [`SampleRef`] cannot hold one.
    pub fn put(&self, refs: impl IntoIterator<Item = SampleRef>) -> usize {
        self.stage(refs.into_iter().map(|r| Staged::Ref(Box::new(r))))
    }

    /// [`SampleRefQueue::put`] for channel records (the distributor's path: the refs are not
    /// built unless [`RefQueue::get`] asks for them).
    pub fn put_records(&self, records: impl IntoIterator<Item = RefRecord>) -> usize {
        self.stage(records.into_iter().map(Staged::Record))
    }

    fn stage(&self, items: impl Iterator<Item = Staged>) -> usize {
        let mut state = self.lock();
        let mut accepted = 0;
        for item in items {
            if state.pending.ids.contains(item.id()) || state.leased.contains(item.id()) {
                tracing::debug!(sample = %item.id(), "staging queue skipped a ref already pending or leased");
                continue;
            }
            state.pending.push_back(item);
            accepted += 1;
        }
        if accepted > 0 {
            self.refs_added.notify_all();
        }
        accepted
    }

    /// Leases up to `max` pending refs as channel records, oldest first, without waiting (the
    /// distributor's path; refs staged as refs are serialized).
    pub fn get_records(&self, max: usize) -> Result<Vec<RefRecord>> {
        self.lock().lease(max, Staged::into_record, |r| &r.sample_id)
    }

    /// Settles leased ids terminally (the refs are gone); ids not leased are ignored.
    pub fn fail_ids(&self, ids: &[SampleId], reason: &str) {
        let mut state = self.lock();
        for id in ids {
            state.leased.remove(id);
        }
        tracing::debug!(refs = ids.len(), reason, "staging queue dropped refs");
    }

    /// Refs leased and not yet acked or failed (SpecForge's `in_flight()`).
    pub fn in_flight(&self) -> usize {
        self.lock().leased.len()
    }

    /// Ids waiting to be leased, oldest first.
    pub fn pending_ids(&self) -> Vec<SampleId> {
        self.lock().pending.refs.iter().map(|r| r.id().clone()).collect()
    }
}

impl RefQueue for SampleRefQueue {
    /// Leases up to `max` pending refs, oldest first. `timeout: None` never waits (an empty
    /// queue returns `[]` at once, as SpecForge's `timeout_s=None` does); `Some(t)` waits up to
    /// `t` for a first ref and returns `[]` if none came.
    fn get(&self, max: usize, timeout: Option<Duration>) -> Result<Vec<SampleRef>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut state = self.lock();
        while state.pending.refs.is_empty() {
            let Some(left) = deadline.and_then(|d| d.checked_duration_since(Instant::now())) else {
                return Ok(Vec::new());
            };
            if left.is_zero() {
                return Ok(Vec::new());
            }
            state = self.refs_added.wait_timeout(state, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        state.lease(max, Staged::into_ref, |r| &r.sample_id)
    }

    /// Forgets the leased ids; ids not leased are ignored.
    fn ack_ids(&self, ids: &[SampleId]) -> Result<()> {
        let mut state = self.lock();
        for id in ids {
            state.leased.remove(id);
        }
        Ok(())
    }

    /// Takes the refs out of the leased set; `retryable` puts each back at the pending tail
    /// (waking waiters), otherwise it is forgotten. Refs that are not leased are ignored.
    fn fail(&self, refs: &[SampleRef], reason: &str, retryable: bool) -> Result<()> {
        let mut state = self.lock();
        let mut requeued = 0usize;
        for r in refs {
            if state.leased.remove(&r.sample_id) && retryable {
                state.pending.push_back(Staged::Ref(Box::new(r.clone())));
                requeued += 1;
            }
        }
        tracing::debug!(refs = refs.len(), requeued, retryable, reason, "staging queue failed refs");
        if requeued > 0 {
            self.refs_added.notify_all();
        }
        Ok(())
    }

    fn depth(&self) -> usize {
        self.lock().pending.refs.len()
    }

    fn in_flight_ids(&self) -> Vec<SampleId> {
        self.lock().leased.ids()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::signal::StopSignal;
    use ferry_core::JsonMap;
    use std::sync::Arc;

    /// A ref built without a store (the queue never looks past the id).
    fn sample_ref(id: &str) -> SampleRef {
        SampleRef {
            sample_id: SampleId::new(id),
            run_id: "run".into(),
            source_task_id: None,
            feature_store_uri: format!("mem://q/{id}?generation=1"),
            feature_keys: Default::default(),
            feature_specs: Default::default(),
            strategy: "eagle3".into(),
            schema_version: 1,
            target_model_version: "unknown".into(),
            draft_weight_version: None,
            tokenizer_version: "unknown".into(),
            num_tokens: 0,
            estimated_bytes: 0,
            metadata: JsonMap::new(),
        }
    }

    fn refs(ids: &[&str]) -> Vec<SampleRef> {
        ids.iter().map(|id| sample_ref(id)).collect()
    }

    fn ids(refs: &[SampleRef]) -> Vec<String> {
        refs.iter().map(|r| r.sample_id.to_string()).collect()
    }

    fn strings(ids: Vec<SampleId>) -> Vec<String> {
        ids.into_iter().map(|id| id.to_string()).collect()
    }

    #[test]
    fn records_and_refs_share_one_fifo_and_convert_on_the_way_out() {
        let q = SampleRefQueue::new();
        q.put(refs(&["s0"]));
        let record = RefRecord::from_ref(&sample_ref("s1")).unwrap();
        assert_eq!(q.put_records([record.clone(), record.clone()]), 1, "a repeated record is skipped");
        q.put(refs(&["s1", "s2"]));
        assert_eq!(strings(q.pending_ids()), ["s0", "s1", "s2"]);
        // The distributor's path: records (a ref staged as a ref is serialized).
        let out = q.get_records(2).unwrap();
        assert_eq!(out[0], RefRecord::from_ref(&sample_ref("s0")).unwrap());
        assert_eq!(out[1], record);
        assert_eq!((q.depth(), q.in_flight()), (1, 2));
        q.fail_ids(&[SampleId::new("s0")], "dropped at the end");
        assert_eq!(strings(q.in_flight_ids()), ["s1"]);
        // The loader's path: refs (a record is parsed).
        q.put_records([RefRecord::from_ref(&sample_ref("s3")).unwrap()]);
        assert_eq!(ids(&q.get(5, None).unwrap()), ["s2", "s3"]);
        assert_eq!(q.get(5, None).unwrap()[..].len(), 0);
    }

    #[test]
    fn put_three_get_two_then_ack_leaves_one_pending_and_none_in_flight() {
        let q = SampleRefQueue::new();
        assert_eq!(q.put(refs(&["s0", "s1", "s2"])), 3);
        let got = q.get(2, None).unwrap();
        assert_eq!(ids(&got), ["s0", "s1"]);
        assert_eq!((q.depth(), q.in_flight()), (1, 2));
        assert_eq!(strings(q.in_flight_ids()), ["s0", "s1"]);
        q.ack(&got).unwrap();
        assert_eq!((q.depth(), q.in_flight()), (1, 0));
        assert_eq!(ids(&q.get(5, None).unwrap()), ["s2"]);
    }

    #[test]
    fn a_duplicate_put_is_ignored_while_pending_or_leased_and_accepted_after_ack() {
        let q = SampleRefQueue::new();
        assert_eq!(q.put(refs(&["s0", "s0", "s1"])), 2, "a repeat within one put is skipped");
        assert_eq!(q.put(refs(&["s0"])), 0, "already pending");
        let got = q.get(1, None).unwrap();
        assert_eq!(q.put(refs(&["s0"])), 0, "already leased");
        assert_eq!((q.depth(), q.in_flight()), (1, 1));
        q.ack(&got).unwrap();
        assert_eq!(q.put(refs(&["s0"])), 1, "a settled id is forgotten; the ledger de-duplicates durably");
        assert_eq!(strings(q.pending_ids()), ["s1", "s0"]);
    }

    #[test]
    fn a_retryable_fail_requeues_at_the_pending_tail() {
        let q = SampleRefQueue::new();
        q.put(refs(&["s0", "s1", "s2"]));
        let got = q.get(1, None).unwrap();
        q.fail(&got, "materialize:boom", true).unwrap();
        assert_eq!((q.depth(), q.in_flight()), (3, 0));
        assert_eq!(strings(q.pending_ids()), ["s1", "s2", "s0"]);
        assert_eq!(ids(&q.get(3, None).unwrap()), ["s1", "s2", "s0"]);
    }

    #[test]
    fn a_terminal_fail_drops_the_ref() {
        let q = SampleRefQueue::new();
        q.put(refs(&["s0"]));
        let got = q.get(1, None).unwrap();
        q.fail(&got, "materialize:gone", false).unwrap();
        assert_eq!((q.depth(), q.in_flight()), (0, 0));
        assert!(q.get(1, None).unwrap().is_empty());
        assert_eq!(q.put(refs(&["s0"])), 1, "a terminally failed id is forgotten");
    }

    #[test]
    fn failing_a_ref_that_is_not_leased_changes_nothing() {
        let q = SampleRefQueue::new();
        q.put(refs(&["s0"]));
        q.fail(&refs(&["s0", "zz"]), "not leased", true).unwrap();
        assert_eq!((q.depth(), q.in_flight()), (1, 0));
        assert_eq!(strings(q.pending_ids()), ["s0"]);
    }

    #[test]
    fn an_empty_get_with_a_zero_or_no_timeout_returns_at_once() {
        let q = SampleRefQueue::new();
        let start = Instant::now();
        assert!(q.get(2, Some(Duration::ZERO)).unwrap().is_empty());
        assert!(q.get(2, None).unwrap().is_empty());
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(q.get(0, None).unwrap().is_empty());
    }

    #[test]
    fn an_empty_get_with_a_timeout_waits_for_it_then_returns_empty() {
        let q = SampleRefQueue::new();
        let start = Instant::now();
        assert!(q.get(1, Some(Duration::from_millis(30))).unwrap().is_empty());
        assert!(start.elapsed() >= Duration::from_millis(30));
    }

    #[test]
    fn a_waiting_get_wakes_on_put_before_its_timeout() {
        let q = Arc::new(SampleRefQueue::new());
        let waiter = {
            let q = Arc::clone(&q);
            std::thread::spawn(move || q.get(2, Some(Duration::from_secs(20))).unwrap())
        };
        // Whether the put lands before or during the wait, the get returns the ref.
        q.put(refs(&["s0"]));
        let start = Instant::now();
        assert_eq!(ids(&waiter.join().unwrap()), ["s0"]);
        assert!(start.elapsed() < Duration::from_secs(20));
        assert_eq!(q.in_flight(), 1);
    }

    #[test]
    fn a_waiting_get_wakes_on_a_retryable_fail() {
        let q = Arc::new(SampleRefQueue::new());
        q.put(refs(&["s0"]));
        let got = q.get(1, None).unwrap();
        let waiter = {
            let q = Arc::clone(&q);
            std::thread::spawn(move || q.get(1, Some(Duration::from_secs(20))).unwrap())
        };
        q.fail(&got, "retry", true).unwrap();
        assert_eq!(ids(&waiter.join().unwrap()), ["s0"]);
    }

    #[test]
    fn ack_of_an_unknown_id_is_a_no_op() {
        let q = SampleRefQueue::new();
        q.put(refs(&["s0"]));
        let got = q.get(1, None).unwrap();
        q.ack_ids(&[SampleId::new("nope")]).unwrap();
        q.ack(&got).unwrap();
        q.ack(&got).unwrap();
        assert_eq!((q.depth(), q.in_flight()), (0, 0));
    }

    #[test]
    fn the_interruptible_get_reads_an_empty_staging_queue_as_end_of_stream() {
        let q = SampleRefQueue::new();
        let stop = StopSignal::new();
        assert!(q.get_interruptible(1, &stop).unwrap().is_empty());
        q.put(refs(&["s0"]));
        stop.set();
        assert!(q.get_interruptible(1, &stop).unwrap().is_empty(), "a set stop returns at once");
        assert_eq!(q.depth(), 1, "and leases nothing");
        assert!(!q.loader_close_retryable());
    }
}
