//! Model-based tests of the lifecycle core.
//!
//! A proptest drives random sequences of puts, gets (of any ref ever returned, stale ones
//! included), releases (of any handle ever returned, dead ones included), aborts, max-hold GC
//! sweeps with an injected clock, re-puts while leased and injected removal faults, against a
//! small reference model of what must be live. After every step it checks that:
//! * a successful get returns exactly the bytes put under the ref's generation (never wrong
//!   bytes), and a get of a released / aborted / superseded generation fails with a
//!   not-available (`KeyError`-class) error;
//! * a get of the live generation succeeds: a leased live generation is never freed by the
//!   release of other handles, by a stale handle, or by max-hold GC;
//! * health (leases, resident samples and bytes, pending removals, ages), the backend's own
//!   usage and, with faults, the exact number of backend removals match the model;
//! * at the end, after releasing every handle and consuming or aborting what is left (and a
//!   drain where removals were failing), nothing is resident, leased or left in the backend.
//!
//! Cases also vary the resident-byte budget (a refused put changes nothing), the tombstone
//! bound and `retain_on_release`. The property runs over the memory backend, the
//! shared-directory backend, and the memory backend behind a [`FaultyBackend`] that fails
//! removals. Deterministic multi-threaded tests check that concurrent gets never return another
//! generation's bytes, that a leased sample survives concurrent GC sweeps and releases of its
//! other leases, and that racing puts of one sample keep the newest generation.

use ferry_core::{DType, Error, FeatureHandle, JsonMap, Result, SampleId, SampleRef, StoreId, TensorView};
use ferry_store::backend::{BackendUsage, ByteBackend, ObjectData, ObjectKey, Removal, SampleKey};
use ferry_store::testing::{FaultyBackend, RemoveFault};
use ferry_store::{DrainPolicy, FeatureStore, ManualClock, MemoryBackend, SharedDirBackend, StoreOptions};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, mpsc};
use std::time::Duration;

/// Sample ids: plain, one needing URI quoting, and one that looks like a generation suffix in a
/// shared-directory file name (`r1.g7.g<gen>.safetensors`).
const SIDS: [&str; 3] = ["run0:task0", "run0:t 1%\u{e9}", "r1.g7"];
/// `input_ids` lengths; `hidden_state` has `2n + 1` bf16 elements.
const SIZES: [usize; 3] = [1, 7, 64];
/// Max-hold age when a case enables max-hold GC.
const MAX_HOLD_SECS: u64 = 10;
const STORE_ID: &str = "model";

// ------------------------------------------------------------------ payloads

/// The tensors of one put; every byte encodes (sample, put serial, position).
struct Payload {
    ids: Vec<i64>,
    ids_shape: [u64; 2],
    hidden: Vec<u8>,
    hidden_shape: [u64; 1],
}

impl Payload {
    fn new(sid: usize, serial: u64, n: usize) -> Payload {
        let ids = (0..n as i64).map(|j| ((sid as i64) << 48) | ((serial as i64) << 16) | j).collect();
        let hidden = (0..2 * n + 1)
            .flat_map(|j| {
                let v = (serial as u16).wrapping_mul(131).wrapping_add((sid as u16) << 12).wrapping_add(j as u16);
                v.to_le_bytes()
            })
            .collect();
        Payload { ids, ids_shape: [1, n as u64], hidden, hidden_shape: [2 * n as u64 + 1] }
    }

    fn tensors(&self) -> Vec<(&'static str, TensorView<'_>)> {
        vec![
            ("input_ids", TensorView::from_elements(&self.ids_shape, &self.ids).expect("ids view")),
            ("hidden_state", TensorView::new(DType::BFloat16, &self.hidden_shape, &self.hidden).expect("bf16 view")),
        ]
    }

    fn ids_bytes(&self) -> Vec<u8> {
        self.ids.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn nbytes(&self) -> u64 {
        (self.ids.len() * 8 + self.hidden.len()) as u64
    }
}

fn metadata() -> JsonMap {
    let mut m = JsonMap::new();
    m.insert("run_id".into(), "run0".into());
    m.insert("num_tokens".into(), 4.into());
    m
}

// ------------------------------------------------------------------ the system under test

enum Backend {
    Mem(Arc<MemoryBackend>),
    Dir(tempfile::TempDir),
    Faulty(Arc<FaultyBackend<MemoryBackend>>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Mem,
    Dir,
    Faulty,
}

#[derive(Debug, Clone)]
struct Cfg {
    max_hold: bool,
    cap: Option<u64>,
    max_tombstones: usize,
    /// At the end, abort (true) or consume (get + release) each sample still live.
    end_abort: [bool; 3],
    /// `retain_on_release`: release ends only the lease (offline data); abort still frees.
    retain: bool,
}

struct Sut {
    store: FeatureStore,
    clock: ManualClock,
    backend: Backend,
    kind: Kind,
}

impl Sut {
    fn new(kind: Kind, cfg: &Cfg) -> Sut {
        let clock = ManualClock::new();
        let options = StoreOptions {
            store_id: Some(StoreId::new(STORE_ID)),
            max_hold_age: cfg.max_hold.then_some(Duration::from_secs(MAX_HOLD_SECS)),
            max_resident_bytes: if kind == Kind::Faulty { None } else { cfg.cap },
            max_tombstones: cfg.max_tombstones,
            retain_on_release: cfg.retain,
            clock: Arc::new(clock.clone()),
            ..StoreOptions::default()
        };
        let (store, backend) = match kind {
            Kind::Mem => {
                let b = Arc::new(MemoryBackend::default());
                (FeatureStore::open(b.clone(), options).expect("open mem"), Backend::Mem(b))
            }
            Kind::Dir => {
                let dir = tempfile::tempdir().expect("tempdir");
                let b = SharedDirBackend::new(dir.path()).expect("dir backend");
                (FeatureStore::open(b, options).expect("open dir"), Backend::Dir(dir))
            }
            Kind::Faulty => {
                let b = Arc::new(FaultyBackend::new(MemoryBackend::default()));
                (FeatureStore::open(b.clone(), options).expect("open faulty"), Backend::Faulty(b))
            }
        };
        Sut { store, clock, backend, kind }
    }

    fn faulty(&self) -> Option<&FaultyBackend<MemoryBackend>> {
        match &self.backend {
            Backend::Faulty(f) => Some(f),
            _ => None,
        }
    }

    fn usage(&self) -> BackendUsage {
        let from_health = self.store.health().backend_usage.expect("backend reports usage");
        let direct = match &self.backend {
            Backend::Mem(m) => m.usage(self.store.store_id()).expect("usage"),
            Backend::Faulty(f) => f.usage(self.store.store_id()).expect("usage"),
            Backend::Dir(_) => Some(from_health),
        };
        assert_eq!(direct, Some(from_health), "health().backend_usage disagrees with the backend");
        from_health
    }

    /// Files left in the store directory other than the generation mark (dir backend only).
    fn stray_files(&self) -> Vec<String> {
        let Backend::Dir(dir) = &self.backend else { return Vec::new() };
        let Ok(entries) = std::fs::read_dir(dir.path().join(STORE_ID)) else { return Vec::new() };
        entries
            .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n != ferry_store::dir::GENERATION_FILE)
            .collect()
    }
}

// ------------------------------------------------------------------ the model

struct RefRec {
    r: SampleRef,
    sid: usize,
    generation: u64,
    serial: u64,
    n: usize,
}

struct HandleRec {
    h: FeatureHandle,
    sid: usize,
    generation: u64,
    alive: bool,
}

#[derive(Clone)]
struct LiveM {
    generation: u64,
    since: u64,
    nbytes: u64,
    ref_idx: usize,
}

#[derive(Default)]
struct Model {
    live: [Option<LiveM>; 3],
    refs: Vec<RefRec>,
    handles: Vec<HandleRec>,
    /// Seconds the clock has advanced.
    now: u64,
    /// Removals parked as pending (faulty backend).
    pending: u64,
    /// Removals the injected fault will still fail.
    fault: u64,
    /// Backend remove calls the core should have made.
    removes: u64,
    last_generation: u64,
    serial: u64,
}

impl Model {
    fn alive(&self) -> u64 {
        self.handles.iter().filter(|h| h.alive).count() as u64
    }
    fn live_count(&self) -> u64 {
        self.live.iter().flatten().count() as u64
    }
    fn live_bytes(&self) -> u64 {
        self.live.iter().flatten().map(|l| l.nbytes).sum()
    }
    fn leased(&self, sid: usize, generation: u64) -> bool {
        self.handles.iter().any(|h| h.alive && h.sid == sid && h.generation == generation)
    }
    /// One backend remove call; false when the injected fault fails it (it becomes pending).
    fn remove_call(&mut self) -> bool {
        self.removes += 1;
        if self.fault > 0 {
            self.fault -= 1;
            false
        } else {
            true
        }
    }
    /// The live generation of `sid` is tombstoned and its removal runs.
    fn free(&mut self, sid: usize) -> Option<(bool, u64)> {
        let live = self.live[sid].take()?;
        let ok = self.remove_call();
        if !ok {
            self.pending += 1;
        }
        Some((ok, live.nbytes))
    }
}

#[derive(Debug, Clone)]
enum Op {
    Put { sid: usize, size: usize },
    Get { r: Index, mode: u8 },
    Release { h: Index },
    Abort { sid: usize },
    Gc { secs: u64 },
    ReputWhileLeased { sid: usize, size: usize },
    InjectFault { k: u32 },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let sid = 0..SIDS.len();
    let size = 0..SIZES.len();
    prop_oneof![
        3 => (sid.clone(), size.clone()).prop_map(|(sid, size)| Op::Put { sid, size }),
        5 => (any::<Index>(), 0u8..4).prop_map(|(r, mode)| Op::Get { r, mode }),
        3 => any::<Index>().prop_map(|h| Op::Release { h }),
        1 => sid.clone().prop_map(|sid| Op::Abort { sid }),
        2 => (0u64..=12).prop_map(|secs| Op::Gc { secs }),
        1 => (sid, size).prop_map(|(sid, size)| Op::ReputWhileLeased { sid, size }),
        1 => (1u32..=5).prop_map(|k| Op::InjectFault { k }),
    ]
}

fn cfg_strategy() -> impl Strategy<Value = Cfg> {
    (
        any::<bool>(),
        prop_oneof![Just(None), Just(Some(900u64)), Just(Some(2000u64))],
        prop_oneof![2 => Just(1usize << 20), 1 => 0usize..=3],
        any::<[bool; 3]>(),
        prop::bool::weighted(0.2),
    )
        .prop_map(|(max_hold, cap, max_tombstones, end_abort, retain)| Cfg {
            max_hold,
            cap,
            max_tombstones,
            end_abort,
            retain,
        })
}

type TestResult = std::result::Result<(), TestCaseError>;

/// Reads `rec` with the given mode; on success checks every byte against what was put for the
/// ref's generation (property (a)) and returns the handle.
fn read(sut: &Sut, rec: &RefRec, mode: u8) -> std::result::Result<Result<FeatureHandle>, TestCaseError> {
    let want = Payload::new(rec.sid, rec.serial, rec.n);
    let ids_want = want.ids_bytes();
    let ctx = format!("sample {:?} generation {} (serial {})", SIDS[rec.sid], rec.generation, rec.serial);
    Ok(match mode {
        0 | 2 => {
            let names: Option<&[&str]> = if mode == 2 { Some(&["hidden_state"]) } else { None };
            match sut.store.get(&rec.r, names) {
                Ok((tensors, handle)) => {
                    let expect_names: &[&str] =
                        if mode == 2 { &["hidden_state"] } else { &["input_ids", "hidden_state"] };
                    prop_assert_eq!(tensors.keys().map(String::as_str).collect::<Vec<_>>(), expect_names.to_vec());
                    prop_assert!(
                        tensors["hidden_state"].bytes() == &want.hidden[..],
                        "WRONG BYTES (hidden) for {}",
                        ctx
                    );
                    prop_assert_eq!(tensors["hidden_state"].dtype(), DType::BFloat16);
                    prop_assert_eq!(tensors["hidden_state"].shape(), &want.hidden_shape[..]);
                    if mode == 0 {
                        prop_assert!(tensors["input_ids"].bytes() == &ids_want[..], "WRONG BYTES (ids) for {}", ctx);
                        prop_assert_eq!(tensors["input_ids"].shape(), &want.ids_shape[..]);
                    }
                    Ok(handle)
                }
                Err(e) => Err(e),
            }
        }
        _ => {
            let mut ids = vec![0xA5u8; ids_want.len()];
            let mut hidden = vec![0x5Au8; want.hidden.len()];
            let res = if mode == 1 {
                sut.store.get_into(&rec.r, &mut [("input_ids", &mut ids[..]), ("hidden_state", &mut hidden[..])])
            } else {
                sut.store.get_into(&rec.r, &mut [("input_ids", &mut ids[..])])
            };
            if res.is_ok() {
                prop_assert!(ids == ids_want, "WRONG BYTES (ids, get_into) for {}", ctx);
                if mode == 1 {
                    prop_assert!(hidden == want.hidden, "WRONG BYTES (hidden, get_into) for {}", ctx);
                }
            }
            res
        }
    })
}

struct Runner {
    sut: Sut,
    model: Model,
    cfg: Cfg,
}

impl Runner {
    fn put(&mut self, sid: usize, size: usize) -> TestResult {
        let n = SIZES[size];
        let serial = self.model.serial + 1;
        let payload = Payload::new(sid, serial, n);
        let nbytes = payload.nbytes();
        let resident = self.model.live_bytes();
        let cap = if self.sut.kind == Kind::Faulty { None } else { self.cfg.cap };
        let res = self.sut.store.put(SIDS[sid], &payload.tensors(), metadata());
        if cap.is_some_and(|c| resident + nbytes > c) {
            let err = match res {
                Ok(r) => return Err(TestCaseError::fail(format!("put over budget was admitted: {r:?}"))),
                Err(e) => e,
            };
            prop_assert!(matches!(err, Error::OverBudget { .. }), "expected OverBudget, got {err}");
            return Ok(()); // a refused put changes nothing: the state checks verify it
        }
        let r = res.map_err(|e| TestCaseError::fail(format!("put failed: {e}")))?;
        self.model.serial = serial;
        let generation = r.generation().map(|g| g.get());
        let Some(generation) = generation else { return Err(TestCaseError::fail("ref without generation")) };
        prop_assert!(
            generation > self.model.last_generation,
            "generation {} not above every earlier one ({})",
            generation,
            self.model.last_generation
        );
        prop_assert_eq!(r.sample_id.as_str(), SIDS[sid]);
        prop_assert_eq!(r.estimated_bytes as u64, nbytes);
        self.model.last_generation = generation;
        self.model.free(sid); // the superseded generation, leased or not
        self.model.refs.push(RefRec { r, sid, generation, serial, n });
        self.model.live[sid] =
            Some(LiveM { generation, since: self.model.now, nbytes, ref_idx: self.model.refs.len() - 1 });
        Ok(())
    }

    fn get(&mut self, idx: usize, mode: u8) -> TestResult {
        let rec = &self.model.refs[idx];
        let (sid, generation) = (rec.sid, rec.generation);
        let expect_ok = self.model.live[sid].as_ref().is_some_and(|l| l.generation == generation);
        match read(&self.sut, rec, mode)? {
            Ok(h) => {
                prop_assert!(
                    expect_ok,
                    "get of {:?} generation {} succeeded (with correct bytes) but the model says it is not live (live: {:?})",
                    SIDS[sid],
                    generation,
                    self.model.live[sid].as_ref().map(|l| l.generation)
                );
                prop_assert_eq!(h.generation.get(), generation);
                prop_assert_eq!(h.sample_id.as_str(), SIDS[sid]);
                self.model.handles.push(HandleRec { h, sid, generation, alive: true });
            }
            Err(e) => {
                prop_assert!(
                    !expect_ok,
                    "get of LIVE sample {:?} generation {} failed: {} (leases on it: {})",
                    SIDS[sid],
                    generation,
                    e,
                    self.model.leased(sid, generation)
                );
                prop_assert!(e.is_not_available(), "get of a dead generation failed with a non-KeyError error: {}", e);
            }
        }
        Ok(())
    }

    fn release(&mut self, idx: usize) -> TestResult {
        let res = self.sut.store.release(&self.model.handles[idx].h);
        prop_assert!(res.is_ok(), "release failed: {:?}", res);
        let rec = &mut self.model.handles[idx];
        if !rec.alive {
            return Ok(()); // double / stale release: a no-op
        }
        rec.alive = false;
        let (sid, generation) = (rec.sid, rec.generation);
        let is_live = self.model.live[sid].as_ref().is_some_and(|l| l.generation == generation);
        if is_live && !self.model.leased(sid, generation) && !self.cfg.retain {
            self.model.free(sid); // consume-once: the last lease frees
        }
        Ok(())
    }

    fn abort(&mut self, sid: usize) -> TestResult {
        let res = self.sut.store.abort(&SampleId::new(SIDS[sid]));
        prop_assert!(res.is_ok(), "abort failed: {:?}", res);
        for h in self.model.handles.iter_mut().filter(|h| h.sid == sid) {
            h.alive = false;
        }
        self.model.free(sid);
        Ok(())
    }

    fn gc(&mut self, secs: u64) -> TestResult {
        self.sut.clock.advance(Duration::from_secs(secs));
        self.model.now += secs;
        let report = self.sut.store.gc();
        let (mut freed, mut freed_bytes) = (0u64, 0u64);
        if self.cfg.max_hold {
            for sid in 0..SIDS.len() {
                let expired = self.model.live[sid]
                    .as_ref()
                    .is_some_and(|l| self.model.now - l.since > MAX_HOLD_SECS && !self.model.leased(sid, l.generation));
                if expired && let Some((true, bytes)) = self.model.free(sid) {
                    freed += 1;
                    freed_bytes += bytes;
                }
            }
        }
        for _ in 0..self.model.pending {
            if self.model.remove_call() {
                self.model.pending -= 1;
                freed += 1;
            }
        }
        prop_assert_eq!(report.force_freed, freed, "gc force_freed");
        prop_assert_eq!(report.release_pending, self.model.pending, "gc release_pending");
        if self.sut.kind != Kind::Faulty {
            prop_assert_eq!(report.force_freed_bytes, freed_bytes, "gc force_freed_bytes");
        }
        Ok(())
    }

    fn reput_while_leased(&mut self, sid: usize, size: usize) -> TestResult {
        let Some(live) = self.model.live[sid].clone() else { return self.put(sid, size) };
        self.get(live.ref_idx, 0)?;
        let handle_idx = self.model.handles.len() - 1;
        self.put(sid, size)?;
        // The handle on the superseded (or, if the put was refused, still live) generation.
        self.release(handle_idx)
    }

    fn inject(&mut self, k: u32) {
        if let Some(f) = self.sut.faulty() {
            f.set_remove_fault(RemoveFault::FailTimes(k));
            self.model.fault = u64::from(k);
        }
    }

    fn drain(&mut self) -> TestResult {
        let policy = DrainPolicy { max_attempts: 3, retry_interval: Duration::ZERO };
        let mut removed = 0;
        let mut attempts = 0;
        for attempt in 1..=policy.max_attempts {
            if self.model.pending == 0 {
                break;
            }
            attempts = attempt;
            for _ in 0..self.model.pending {
                if self.model.remove_call() {
                    self.model.pending -= 1;
                    removed += 1;
                }
            }
        }
        let res = self.sut.store.drain(policy);
        if self.model.pending == 0 {
            let report = res.map_err(|e| TestCaseError::fail(format!("drain failed: {e}")))?;
            prop_assert_eq!(report.removed, removed, "drain removed");
            prop_assert_eq!(report.attempts, attempts, "drain attempts");
        } else {
            match res {
                Err(Error::DrainIncomplete { pending, .. }) => prop_assert_eq!(pending as u64, self.model.pending),
                other => return Err(TestCaseError::fail(format!("expected DrainIncomplete, got {other:?}"))),
            }
            // Recover, then the drain must finish.
            if let Some(f) = self.sut.faulty() {
                f.set_remove_fault(RemoveFault::None);
            }
            self.model.fault = 0;
            let pending = self.model.pending;
            self.model.removes += pending;
            self.model.pending = 0;
            let report = self.sut.store.drain(policy).map_err(|e| TestCaseError::fail(format!("drain: {e}")))?;
            prop_assert_eq!(report.removed, pending);
        }
        Ok(())
    }

    fn step(&mut self, op: &Op) -> TestResult {
        match op {
            Op::Put { sid, size } => self.put(*sid, *size)?,
            Op::Get { r, mode } => {
                if !self.model.refs.is_empty() {
                    self.get(r.index(self.model.refs.len()), *mode)?;
                }
            }
            Op::Release { h } => {
                if !self.model.handles.is_empty() {
                    self.release(h.index(self.model.handles.len()))?;
                }
            }
            Op::Abort { sid } => self.abort(*sid)?,
            Op::Gc { secs } => self.gc(*secs)?,
            Op::ReputWhileLeased { sid, size } => self.reput_while_leased(*sid, *size)?,
            Op::InjectFault { k } => self.inject(*k),
        }
        Ok(())
    }

    /// Health, usage and remove counts against the model.
    fn check(&self, when: &str) -> TestResult {
        let h = self.sut.store.health();
        let m = &self.model;
        prop_assert_eq!(h.active_leases, m.alive(), "active_leases {}", when);
        prop_assert_eq!(h.release_pending, m.pending, "release_pending {}", when);
        prop_assert_eq!(h.resident_samples, m.live_count() + m.pending, "resident_samples {}", when);
        prop_assert_eq!(h.reserved_bytes, 0, "reserved_bytes {}", when);
        let oldest = m.live.iter().flatten().map(|l| m.now - l.since).max().unwrap_or(0);
        prop_assert!(
            (h.oldest_age_s - oldest as f64).abs() < 1e-6,
            "oldest_age_s {} != {} {}",
            h.oldest_age_s,
            oldest,
            when
        );
        let usage = self.sut.usage();
        match self.sut.kind {
            Kind::Mem => {
                prop_assert_eq!(h.resident_bytes, m.live_bytes(), "resident_bytes {}", when);
                prop_assert_eq!(
                    usage,
                    BackendUsage { samples: m.live_count(), bytes: m.live_bytes() },
                    "usage {}",
                    when
                );
            }
            Kind::Dir => {
                prop_assert_eq!(h.resident_bytes, m.live_bytes(), "resident_bytes {}", when);
                prop_assert_eq!(usage.samples, m.live_count(), "files on disk {}", when);
                prop_assert_eq!(usage.bytes == 0, m.live_count() == 0, "bytes on disk {}", when);
            }
            Kind::Faulty => {
                prop_assert!(h.resident_bytes >= m.live_bytes(), "resident_bytes {}", when);
                prop_assert_eq!(usage.samples, m.live_count() + m.pending, "backend samples {}", when);
                prop_assert_eq!(usage.bytes, h.resident_bytes, "backend bytes vs budget {}", when);
                let removes = self.sut.faulty().map_or(0, |f| f.removes.load(Ordering::SeqCst));
                prop_assert_eq!(removes, m.removes, "backend remove calls {}", when);
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> TestResult {
        // Release every handle still held.
        for idx in 0..self.model.handles.len() {
            if self.model.handles[idx].alive {
                self.release(idx)?;
            }
        }
        self.check("after releasing every handle")?;
        // What was never leased (or everything, when retaining) is not freed by releases:
        // consume it or abort it.
        for sid in 0..SIDS.len() {
            let Some(live) = self.model.live[sid].clone() else { continue };
            if self.cfg.end_abort[sid] || self.cfg.retain {
                self.abort(sid)?;
            } else {
                self.get(live.ref_idx, 0)?;
                self.release(self.model.handles.len() - 1)?;
            }
        }
        self.check("after consuming the rest")?;
        self.drain()?;
        self.check("after drain")?;
        let h = self.sut.store.health();
        prop_assert_eq!(h.resident_bytes, 0);
        prop_assert_eq!(h.resident_samples, 0);
        prop_assert_eq!(h.active_leases, 0);
        prop_assert_eq!(h.release_pending, 0);
        prop_assert_eq!(self.sut.usage(), BackendUsage::default(), "backend still holds bytes");
        let stray = self.sut.stray_files();
        prop_assert!(stray.is_empty(), "files left in the store directory: {:?}", stray);
        // Every ref ever returned is now dead, and refusing it leaks no lease.
        for idx in 0..self.model.refs.len() {
            match read(&self.sut, &self.model.refs[idx], (idx % 4) as u8)? {
                Ok(h) => return Err(TestCaseError::fail(format!("dead ref read after the end: {h:?}"))),
                Err(e) => prop_assert!(e.is_not_available(), "{}", e),
            }
        }
        prop_assert_eq!(self.sut.store.health().active_leases, 0);
        Ok(())
    }
}

fn run(kind: Kind, cfg: Cfg, ops: Vec<Op>) -> TestResult {
    let mut runner = Runner { sut: Sut::new(kind, &cfg), model: Model::default(), cfg };
    runner.check("at start")?;
    for (i, op) in ops.iter().enumerate() {
        runner.step(op)?;
        runner.check(&format!("after step {i} {op:?}"))?;
    }
    runner.finish()
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config(64))]
    #[test]
    fn model_memory_backend(cfg in cfg_strategy(), ops in prop::collection::vec(op_strategy(), 1..60)) {
        run(Kind::Mem, cfg, ops)?;
    }

    #[test]
    fn model_faulty_memory_backend(cfg in cfg_strategy(), ops in prop::collection::vec(op_strategy(), 1..60)) {
        run(Kind::Faulty, cfg, ops)?;
    }
}

proptest! {
    #![proptest_config(config(24))]
    #[test]
    fn model_shared_dir_backend(cfg in cfg_strategy(), ops in prop::collection::vec(op_strategy(), 1..60)) {
        run(Kind::Dir, cfg, ops)?;
    }
}

// ------------------------------------------------------------------ concurrency

const WORKERS: usize = 4;
const CYCLES: u64 = 200;
const REPUTS: u64 = 300;
const READERS: usize = 2;
const MIN_READS: u64 = 200;
const SHARED: &str = "shared:sample";

/// Flags a panic of any thread of a concurrent test, so the other threads' loops end instead of
/// waiting forever for a thread that is gone.
struct PanicFlag<'a>(&'a AtomicBool);

impl Drop for PanicFlag<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

fn open_plain(kind: Kind) -> (FeatureStore, Option<tempfile::TempDir>) {
    let options = StoreOptions { store_id: Some(StoreId::new("conc")), ..StoreOptions::default() };
    match kind {
        Kind::Dir => {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = FeatureStore::open(SharedDirBackend::new(dir.path()).expect("backend"), options).expect("open");
            (store, Some(dir))
        }
        _ => (FeatureStore::open(MemoryBackend::default(), options).expect("open"), None),
    }
}

fn assert_empty(store: &FeatureStore) {
    let h = store.health();
    assert_eq!(
        (h.resident_bytes, h.resident_samples, h.active_leases, h.release_pending),
        (0, 0, 0, 0),
        "residency after the run: {h:?}"
    );
    assert_eq!(h.backend_usage, Some(BackendUsage::default()), "backend still holds bytes");
}

/// 4 workers put / get_into / release their own samples while a writer keeps re-putting one
/// shared sample and 2 readers hammer it with current and stale refs: no read ever returns
/// bytes other than those of its ref's generation, and nothing stays resident.
fn concurrent_cycles(kind: Kind) {
    let (store, _dir) = open_plain(kind);
    // generation -> serial of every shared put, and every shared ref so far (newest last).
    let serials: RwLock<HashMap<u64, u64>> = RwLock::new(HashMap::new());
    let refs: RwLock<Vec<SampleRef>> = RwLock::new(Vec::new());
    let done = AtomicBool::new(false);
    let failed = AtomicBool::new(false);
    let ok_reads = AtomicU64::new(0);
    let attempts = AtomicU64::new(0);
    let shared_sid = SIDS.len(); // a sample index no worker uses
    std::thread::scope(|s| {
        for t in 0..WORKERS {
            let (store, failed) = (&store, &failed);
            s.spawn(move || {
                let _flag = PanicFlag(failed);
                for i in 0..CYCLES {
                    let sid = format!("worker{t}:{i}");
                    let payload = Payload::new(t, i, 1 + (i as usize % 3) * 16);
                    let r = store.put(sid.as_str(), &payload.tensors(), metadata()).expect("worker put");
                    let mut ids = vec![0u8; payload.ids.len() * 8];
                    let mut hidden = vec![0u8; payload.hidden.len()];
                    let h = store
                        .get_into(&r, &mut [("input_ids", &mut ids[..]), ("hidden_state", &mut hidden[..])])
                        .expect("worker get_into of its own live sample");
                    assert_eq!(ids, payload.ids_bytes(), "worker {t} cycle {i}: wrong ids bytes");
                    assert_eq!(hidden, payload.hidden, "worker {t} cycle {i}: wrong hidden bytes");
                    store.release(&h).expect("release");
                    let err = store.get_into(&r, &mut [("input_ids", &mut ids[..])]).expect_err("consumed");
                    assert!(err.is_not_available(), "{err}");
                }
            });
        }
        {
            let (store, serials, refs, done, attempts, failed) = (&store, &serials, &refs, &done, &attempts, &failed);
            s.spawn(move || {
                let _flag = PanicFlag(failed);
                let mut seen = 0;
                for k in 0..REPUTS {
                    // Interleave: let the readers finish two reads of the newest ref first.
                    while k > 0 && attempts.load(Ordering::SeqCst) < seen + 2 {
                        if failed.load(Ordering::SeqCst) {
                            return;
                        }
                        std::thread::yield_now();
                    }
                    let payload = Payload::new(shared_sid, k, 1 + (k as usize % 4) * 8);
                    let r = store.put(SHARED, &payload.tensors(), metadata()).expect("shared put");
                    let g = r.generation().expect("generation").get();
                    serials.write().expect("lock").insert(g, k);
                    refs.write().expect("lock").push(r);
                    seen = attempts.load(Ordering::SeqCst);
                }
                done.store(true, Ordering::SeqCst);
            });
        }
        for reader in 0..READERS {
            let (store, serials, refs, done, ok_reads, attempts, failed) =
                (&store, &serials, &refs, &done, &ok_reads, &attempts, &failed);
            s.spawn(move || {
                let _flag = PanicFlag(failed);
                let mut i = 0u64;
                let mut reads_after_done = 0;
                // Read until the writer is done, then at least once more: the newest ref is then
                // live unless a reader already consumed it, so some read must succeed.
                while (reads_after_done == 0 || i < MIN_READS) && !failed.load(Ordering::SeqCst) {
                    let after_done = done.load(Ordering::SeqCst);
                    if after_done {
                        reads_after_done += 1;
                    }
                    let (r, stale) = {
                        let refs = refs.read().expect("lock");
                        if refs.is_empty() {
                            std::thread::yield_now();
                            continue;
                        }
                        i += 1;
                        // Mostly the newest ref; sometimes an older (stale) one.
                        let stale = i.is_multiple_of(5) && !after_done;
                        let idx = if stale { (i as usize * 7) % refs.len() } else { refs.len() - 1 };
                        (refs[idx].clone(), stale)
                    };
                    let g = r.generation().expect("generation").get();
                    let serial = serials.read().expect("lock")[&g];
                    let n = r.feature_specs["input_ids"].shape[1] as usize;
                    let want = Payload::new(shared_sid, serial, n);
                    let res = if (i + reader as u64).is_multiple_of(2) {
                        store.get(&r, None).map(|(t, h)| {
                            assert_eq!(t["input_ids"].bytes(), &want.ids_bytes()[..], "WRONG BYTES g{g}");
                            assert_eq!(t["hidden_state"].bytes(), &want.hidden[..], "WRONG BYTES g{g}");
                            h
                        })
                    } else {
                        let mut ids = vec![0u8; n * 8];
                        let mut hidden = vec![0u8; want.hidden.len()];
                        let res =
                            store.get_into(&r, &mut [("hidden_state", &mut hidden[..]), ("input_ids", &mut ids[..])]);
                        if res.is_ok() {
                            assert_eq!(ids, want.ids_bytes(), "WRONG BYTES g{g}");
                            assert_eq!(hidden, want.hidden, "WRONG BYTES g{g}");
                        }
                        res
                    };
                    match res {
                        Ok(h) => {
                            assert_eq!(h.generation.get(), g);
                            ok_reads.fetch_add(1, Ordering::Relaxed);
                            store.release(&h).expect("release");
                        }
                        Err(e) => assert!(e.is_not_available(), "reader got a non-KeyError error: {e}"),
                    }
                    if !stale {
                        attempts.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    assert!(ok_reads.load(Ordering::Relaxed) > 0, "no shared read ever succeeded");
    let h = store.health();
    assert_eq!(h.active_leases, 0, "{h:?}");
    assert!(h.resident_samples <= 1, "only the shared sample may remain: {h:?}");
    store.abort(&SampleId::new(SHARED)).expect("abort shared");
    assert_empty(&store);
}

#[test]
fn concurrent_cycles_memory_backend() {
    concurrent_cycles(Kind::Mem);
}

#[test]
fn concurrent_cycles_shared_dir_backend() {
    concurrent_cycles(Kind::Dir);
}

/// A holder keeps a lease on one sample and re-reads it 300 times (releasing each extra lease
/// at once) while a GC thread sweeps with every sample expired (max-hold age 0, clock moving)
/// and 2 workers cycle their own samples: the leased sample is never freed, neither by GC nor
/// by the release of its other leases; every read returns its generation's bytes; and once
/// the last lease goes, everything is freed.
fn leased_sample_survives_concurrent_gc(kind: Kind) {
    const HELD: &str = "held:sample";
    let clock = ManualClock::new();
    let options = StoreOptions {
        store_id: Some(StoreId::new("gcconc")),
        max_hold_age: Some(Duration::ZERO),
        clock: Arc::new(clock.clone()),
        ..StoreOptions::default()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let store = match kind {
        Kind::Dir => FeatureStore::open(SharedDirBackend::new(dir.path()).expect("backend"), options),
        _ => FeatureStore::open(MemoryBackend::default(), options),
    }
    .expect("open");
    let done = AtomicBool::new(false);
    let failed = AtomicBool::new(false);
    let (leased_tx, leased_rx) = mpsc::channel();
    std::thread::scope(|s| {
        let (store, clock, done, failed) = (&store, &clock, &done, &failed);
        s.spawn(move || {
            let _flag = PanicFlag(failed);
            let payload = Payload::new(0, 1, 64);
            let r = store.put(HELD, &payload.tensors(), metadata()).expect("put held");
            let (t, h0) = store.get(&r, None).expect("first get");
            assert_eq!(t["input_ids"].bytes(), &payload.ids_bytes()[..]);
            leased_tx.send(()).expect("signal");
            for i in 0..300 {
                let (t, h) = store
                    .get(&r, None)
                    .unwrap_or_else(|e| panic!("read {i}: a leased sample was freed under its lease: {e}"));
                assert_eq!(t["input_ids"].bytes(), &payload.ids_bytes()[..], "WRONG BYTES");
                assert_eq!(t["hidden_state"].bytes(), &payload.hidden[..], "WRONG BYTES");
                store.release(&h).expect("release");
            }
            store.release(&h0).expect("release the first lease");
            let err = store.get(&r, None).expect_err("the last release frees the held sample");
            assert!(err.is_not_available(), "{err}");
            done.store(true, Ordering::SeqCst);
        });
        s.spawn(move || {
            let _flag = PanicFlag(failed);
            leased_rx.recv_timeout(Duration::from_secs(30)).expect("the holder never leased its sample");
            while !done.load(Ordering::SeqCst) && !failed.load(Ordering::SeqCst) {
                clock.advance(Duration::from_millis(1));
                store.gc();
            }
        });
        for t in 1..3 {
            s.spawn(move || {
                let _flag = PanicFlag(failed);
                for i in 0..150 {
                    let payload = Payload::new(t, i, 7);
                    let r = store.put(format!("gcworker{t}:{i}"), &payload.tensors(), metadata()).expect("put");
                    let mut ids = vec![0u8; payload.ids.len() * 8];
                    match store.get_into(&r, &mut [("input_ids", &mut ids[..])]) {
                        Ok(h) => {
                            assert_eq!(ids, payload.ids_bytes(), "WRONG BYTES");
                            store.release(&h).expect("release");
                        }
                        Err(e) => assert!(e.is_not_available(), "GC freed it first, so a KeyError: {e}"),
                    }
                    let err = store.get_into(&r, &mut [("input_ids", &mut ids[..])]).expect_err("consumed or GC'd");
                    assert!(err.is_not_available(), "{err}");
                }
            });
        }
    });
    clock.advance(Duration::from_secs(1));
    let report = store.gc();
    assert_eq!(report.release_pending, 0);
    assert_empty(&store);
}

#[test]
fn leased_sample_survives_concurrent_gc_memory_backend() {
    leased_sample_survives_concurrent_gc(Kind::Mem);
}

#[test]
fn leased_sample_survives_concurrent_gc_shared_dir_backend() {
    leased_sample_survives_concurrent_gc(Kind::Dir);
}

// ------------------------------------------------------------------ racing puts of one sample

/// A memory backend whose first `write` waits until the test lets it go, so two puts of one
/// sample can be made to commit in the opposite order of their generations.
struct GatedBackend {
    inner: MemoryBackend,
    gate: Mutex<Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>>,
}

impl ByteBackend for GatedBackend {
    fn kind(&self) -> &'static str {
        "gated"
    }
    fn write(&self, sample: SampleKey<'_>, objects: &[ObjectData<'_>]) -> Result<()> {
        let gate = self.gate.lock().expect("gate").take();
        if let Some((entered, proceed)) = gate {
            entered.send(()).expect("signal");
            proceed.recv_timeout(Duration::from_secs(30)).expect("the test never released the gate");
        }
        self.inner.write(sample, objects)
    }
    fn read_into(&self, object: ObjectKey<'_>, dst: &mut [u8]) -> Result<usize> {
        self.inner.read_into(object, dst)
    }
    fn remove(&self, sample: SampleKey<'_>, names: &[String], force: bool) -> Result<Removal> {
        self.inner.remove(sample, names, force)
    }
    fn exists(&self, object: ObjectKey<'_>) -> Result<bool> {
        self.inner.exists(object)
    }
    fn size(&self, object: ObjectKey<'_>) -> Result<Option<u64>> {
        self.inner.size(object)
    }
    fn latest_generation(&self, store_id: &StoreId, sample_id: &SampleId) -> Result<Option<ferry_core::Generation>> {
        self.inner.latest_generation(store_id, sample_id)
    }
    fn object_names(&self, sample: SampleKey<'_>) -> Result<Option<Vec<String>>> {
        self.inner.object_names(sample)
    }
    fn ref_uri(&self, store_id: &StoreId, sample_id: &SampleId, generation: ferry_core::Generation) -> String {
        self.inner.ref_uri(store_id, sample_id, generation)
    }
    fn usage(&self, store_id: &StoreId) -> Result<Option<BackendUsage>> {
        self.inner.usage(store_id)
    }
}

/// Two puts of one sample race: X reserves the lower generation but commits last. The newer
/// generation (Y's) must stay live and accounted; X's must be superseded at once, and after Y
/// is consumed nothing may stay resident.
#[test]
fn racing_puts_of_one_sample_keep_the_newer_generation() {
    let (entered_tx, entered_rx) = mpsc::channel();
    let (proceed_tx, proceed_rx) = mpsc::channel();
    let backend =
        Arc::new(GatedBackend { inner: MemoryBackend::default(), gate: Mutex::new(Some((entered_tx, proceed_rx))) });
    let options = StoreOptions { store_id: Some(StoreId::new("race")), ..StoreOptions::default() };
    let store = FeatureStore::open(backend.clone(), options).expect("open");
    let (px, py) = (Payload::new(0, 1, 7), Payload::new(0, 2, 64));
    let (rx, ry) = std::thread::scope(|s| {
        let x = s.spawn(|| store.put(SIDS[0], &px.tensors(), metadata()));
        entered_rx.recv_timeout(Duration::from_secs(30)).expect("put X never reached the backend write");
        let ry = store.put(SIDS[0], &py.tensors(), metadata()).expect("put Y");
        proceed_tx.send(()).expect("release the gate");
        (x.join().expect("put X panicked").expect("put X"), ry)
    });
    let (gx, gy) = (rx.generation().expect("gen"), ry.generation().expect("gen"));
    assert!(gx < gy, "X must hold the lower generation ({gx} vs {gy})");
    let h = store.health();
    assert_eq!(h.resident_samples, 1, "the newer generation must be live: {h:?}");
    assert_eq!(h.resident_bytes, py.nbytes(), "only Y's bytes are resident: {h:?}");
    assert_eq!(backend.usage(store.store_id()).expect("usage").map(|u| u.bytes), Some(py.nbytes()));
    let err = store.get(&rx, None).expect_err("X's generation was superseded");
    assert!(err.is_not_available(), "{err}");
    let (t, handle) = store.get(&ry, None).expect("Y is live");
    assert_eq!(t["input_ids"].bytes(), &py.ids_bytes()[..]);
    store.release(&handle).expect("release");
    assert_empty(&store);
}
