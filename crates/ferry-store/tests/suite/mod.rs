//! The store acceptance suite, written once and shared by every file that serves a store:
//! every behaviour SpecForge's test suite asks of LocalFeatureStore, SharedDirFeatureStore and
//! MooncakeFeatureStore (`SPECFORGE-RUNTIME.md` §4-§6.6) that is not Mooncake-specific. Every
//! backend is wrapped in [`FaultyBackend`], so the same tests also drive failing, forced-only and
//! deferred removals, failing writes and truncated objects.
//!
//! # How a file runs it
//! * `#[macro_use] mod suite;` (with `#[path = ...]` from another crate), then
//!   `suite_tests!(module, Kind)` once per [`Kind`] it runs: that defines `mod module` with one
//!   `#[test]` per behaviour.
//! * The including file defines, at its root, the hook for daemon kinds (the suite cannot name
//!   `ferry_net`, which depends on this crate):
//!   `fn serve_daemon(kind: Kind, options: StoreOptions, secret: Option<Secret>) -> suite::Stack`.
//!   It opens a `FeatureStore` with `options` over a [`FaultyBackend`] it builds for `kind`,
//!   serves it, and returns the wrapper and a [`Served`] that opens client views. A file that
//!   runs only the in-process kinds (mem, dir) defines it as unreachable.
//!
//! A test sees the store only as `dyn FeatureStoreApi` (`h.store`); "another process's view"
//! ([`Harness::second_instance`]) is another `FeatureStore` over the same backend for in-process
//! kinds and another client connection to the same daemon for daemon kinds. Where a behaviour's
//! semantics legitimately differ for a daemon, the test branches on the kind and says why.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

use ferry_core::{DType, Error, JsonMap, Result, SampleId, SampleRef, TensorView};
use ferry_store::backend::{ByteBackend, ObjectData, ObjectKey, SampleKey};
use ferry_store::testing::{FaultyBackend, RemoveFault};
use ferry_store::{
    AuthPolicy, DrainPolicy, FeatureStore, FeatureStoreApi, ManualClock, MemoryBackend, Secret, SharedDirBackend,
    StoreOptions,
};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How the store under test is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(dead_code)] // each including file constructs only the kinds it runs
pub(crate) enum Kind {
    /// In process, over the memory backend.
    Mem,
    /// In process, over a shared directory.
    Dir,
    /// A node daemon over the memory backend; the client on TCP.
    DaemonTcp,
    /// A node daemon over the memory backend; the client on the Unix socket, bytes in the stream.
    DaemonUnix,
    /// A node daemon over a shared-memory arena; the client on the Unix socket, bytes through
    /// the arena mapping.
    DaemonShm,
}

impl Kind {
    /// Whether a node daemon serves the store (the tests talk to it through a client).
    pub(crate) fn is_daemon(self) -> bool {
        matches!(self, Kind::DaemonTcp | Kind::DaemonUnix | Kind::DaemonShm)
    }

    /// The backend's name in `health().backend`.
    fn backend_name(self) -> &'static str {
        match self {
            Kind::Mem | Kind::DaemonTcp | Kind::DaemonUnix => "memory",
            Kind::Dir => "shared_dir",
            Kind::DaemonShm => "arena",
        }
    }
}

/// The fault-injecting wrapper every store under test runs over.
pub(crate) type Faults = Arc<FaultyBackend<Arc<dyn ByteBackend>>>;

/// A store being served: it opens views of the store and reaches seams of backends the suite
/// cannot name.
pub(crate) trait Served {
    /// Opens a view of the store presenting `secret` (another process's view): a
    /// `FeatureStore` over the same backend, or a client connection to the same daemon.
    fn connect(&self, secret: Option<Secret>) -> Result<Box<dyn FeatureStoreApi>>;

    /// Test seam: makes `object` report only its first `keep` bytes (not used for `Kind::Dir`,
    /// whose files the suite truncates itself).
    fn truncate_object(&self, object: ObjectKey<'_>, keep: u64);
}

/// What the including file's `serve_daemon` returns.
pub(crate) struct Stack {
    /// The wrapper the served store runs over.
    pub(crate) faults: Faults,
    /// The running daemon (stopped on drop).
    pub(crate) served: Box<dyn Served>,
}

/// An in-process store: views are further `FeatureStore`s over the same backend.
struct Local {
    faults: Faults,
    options: StoreOptions,
    mem: Option<Arc<MemoryBackend>>,
}

impl Served for Local {
    fn connect(&self, secret: Option<Secret>) -> Result<Box<dyn FeatureStoreApi>> {
        let options = StoreOptions { credential: secret, ..self.options.clone() };
        Ok(Box::new(FeatureStore::open(self.faults.clone(), options)?))
    }

    fn truncate_object(&self, object: ObjectKey<'_>, keep: u64) {
        self.mem
            .as_ref()
            .expect("truncate_object on a memory backend")
            .truncate_object(object, usize::try_from(keep).unwrap())
            .unwrap();
    }
}

/// One store under test, with handles on everything a test may poke.
pub(crate) struct Harness {
    kind: Kind,
    /// The store as the tests see it (dropped before what serves it).
    pub(crate) store: Box<dyn FeatureStoreApi>,
    served: Box<dyn Served>,
    faults: Faults,
    clock: ManualClock,
    /// The secret every view presents (`None`: the store or daemon admits anyone).
    secret: Option<Secret>,
    dir: Option<tempfile::TempDir>,
}

impl Harness {
    pub(crate) fn new(kind: Kind) -> Harness {
        Harness::with(kind, |_| {})
    }

    pub(crate) fn with(kind: Kind, configure: impl FnOnce(&mut StoreOptions)) -> Harness {
        Harness::build(kind, configure, None)
    }

    /// A store that admits only views presenting `secret`: in process, the store's own
    /// [`AuthPolicy`] gates `FeatureStore::open`; a daemon gates each connection with its own
    /// secret (`DaemonConfig::secret`) and its store has no policy of its own.
    fn secured(kind: Kind, secret: &str) -> Harness {
        Harness::build(kind, |_| {}, Some(Secret::new(secret)))
    }

    fn build(kind: Kind, configure: impl FnOnce(&mut StoreOptions), secret: Option<Secret>) -> Harness {
        let clock = ManualClock::new();
        let mut options =
            StoreOptions { store_id: Some("run0".into()), clock: Arc::new(clock.clone()), ..StoreOptions::default() };
        configure(&mut options);
        let (stack, dir) = match kind {
            Kind::Mem | Kind::Dir => {
                let (inner, mem, dir): (Arc<dyn ByteBackend>, _, _) = if kind == Kind::Mem {
                    let mem = Arc::new(MemoryBackend::default());
                    (mem.clone(), Some(mem), None)
                } else {
                    let dir = tempfile::tempdir().unwrap();
                    (Arc::new(SharedDirBackend::new(dir.path()).unwrap()), None, Some(dir))
                };
                if let Some(secret) = &secret {
                    options.auth = AuthPolicy::require(secret.clone());
                }
                let faults = Arc::new(FaultyBackend::new(inner));
                (Stack { faults: faults.clone(), served: Box::new(Local { faults, options, mem }) }, dir)
            }
            Kind::DaemonTcp | Kind::DaemonUnix | Kind::DaemonShm => {
                (crate::serve_daemon(kind, options, secret.clone()), None)
            }
        };
        let store = stack.served.connect(secret.clone()).unwrap_or_else(|e| panic!("opening the {kind:?} store: {e}"));
        Harness { kind, store, served: stack.served, faults: stack.faults, clock, secret, dir }
    }

    /// Another process's view of the same store (same backend and store id, or same daemon).
    pub(crate) fn second_instance(&self) -> Box<dyn FeatureStoreApi> {
        self.served.connect(self.secret.clone()).unwrap_or_else(|e| panic!("opening another view: {e}"))
    }

    /// The fault injector under the served store.
    pub(crate) fn faults(&self) -> &Faults {
        &self.faults
    }

    fn objects_present(&self, r: &SampleRef) -> Vec<String> {
        let sid = &r.sample_id;
        let key = SampleKey { store_id: self.store.store_id(), sample_id: sid, generation: r.generation().unwrap() };
        ["hidden_state", "target", "input_ids"]
            .into_iter()
            .filter(|n| self.faults.inner().exists(key.object(n)).unwrap())
            .map(str::to_owned)
            .collect()
    }

    /// Cuts the last 4 bytes off the sample's stored bytes.
    fn truncate(&self, r: &SampleRef) {
        let key =
            SampleKey { store_id: self.store.store_id(), sample_id: &r.sample_id, generation: r.generation().unwrap() };
        match self.kind {
            Kind::Dir => {
                let path = self.dir_path(r);
                let len = std::fs::metadata(&path).unwrap().len();
                std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 4).unwrap();
            }
            // The memory backend's and the arena's seams.
            _ => {
                let object = key.object("hidden_state");
                let len = self.faults.inner().size(object).unwrap().unwrap();
                self.served.truncate_object(object, len - 4);
            }
        }
    }

    fn dir_path(&self, r: &SampleRef) -> std::path::PathBuf {
        self.dir.as_ref().unwrap().path().join(self.store.store_id().as_str()).join(format!(
            "{}.g{}.ckpt",
            r.sample_id,
            r.generation().unwrap()
        ))
    }
}

/// A small EAGLE3-shaped sample whose bytes encode `seed`.
struct Sample {
    hidden: Vec<u8>,
    target: Vec<u8>,
    ids: Vec<i64>,
}

impl Sample {
    fn new(seed: u8) -> Sample {
        Sample {
            hidden: (0..4 * 8 * 2).map(|i| seed.wrapping_mul(31).wrapping_add(i as u8)).collect(),
            target: (0..4 * 4 * 2).map(|i| seed.wrapping_add(7).wrapping_mul(i as u8)).collect(),
            ids: (0..4).map(|i| i64::from(seed) * 100 + i).collect(),
        }
    }

    fn tensors(&self) -> Vec<(&'static str, TensorView<'_>)> {
        vec![
            ("hidden_state", TensorView::new(DType::BFloat16, &[1, 4, 8], &self.hidden).unwrap()),
            ("target", TensorView::new(DType::BFloat16, &[1, 4, 4], &self.target).unwrap()),
            ("input_ids", TensorView::from_elements(&[4], &self.ids).unwrap()),
        ]
    }

    fn nbytes(&self) -> u64 {
        (self.hidden.len() + self.target.len() + self.ids.len() * 8) as u64
    }
}

fn meta() -> JsonMap {
    json!({"run_id": "run0", "strategy": "eagle3", "target_repr": "hidden_state", "num_tokens": 4})
        .as_object()
        .unwrap()
        .clone()
}

/// Puts `Sample::new(seed)` as `sid` through the harness's view.
pub(crate) fn put(h: &Harness, sid: &str, seed: u8) -> SampleRef {
    h.store.put(sid, &Sample::new(seed).tensors(), meta()).unwrap()
}

/// Gets every feature and checks the bytes are `seed`'s.
pub(crate) fn get_ok(store: &dyn FeatureStoreApi, r: &SampleRef, seed: u8) -> ferry_core::FeatureHandle {
    let (tensors, handle) = store.get(r, None).unwrap();
    let want = Sample::new(seed);
    assert_eq!(tensors["hidden_state"].bytes(), &want.hidden[..]);
    assert_eq!(tensors["target"].bytes(), &want.target[..]);
    assert_eq!(tensors["input_ids"].as_elements::<i64>().unwrap(), &want.ids[..]);
    assert_eq!(tensors["hidden_state"].shape(), &[1, 4, 8]);
    handle
}

/// Asserts a get fails as not available (freed, stale, missing) and returns its error.
pub(crate) fn assert_unavailable(store: &dyn FeatureStoreApi, r: &SampleRef) -> Error {
    let err = store.get(r, None).unwrap_err();
    assert!(err.is_not_available(), "expected a not-available error, got {err}");
    err
}

fn no_sleep_drain(attempts: u32) -> DrainPolicy {
    DrainPolicy { max_attempts: attempts, retry_interval: Duration::ZERO }
}

/// Defines `mod $module` with one `#[test]` per behaviour, each run for `Kind::$kind`.
macro_rules! suite_tests {
    ($module:ident, $kind:ident) => {
        suite_tests!(@each $module, $kind, [
            put_returns_a_tensor_free_ref_with_specs_and_generation,
            get_returns_identical_tensors_and_a_handle,
            returned_tensors_are_independent_copies,
            get_into_fills_caller_buffers_and_checks_their_size,
            double_release_is_a_noop,
            stale_handle_after_reput_is_a_noop_and_new_generation_stays_readable,
            last_lease_frees_and_two_leases_need_two_releases,
            fifty_cycles_leave_nothing_resident,
            budget_admits_then_refuses_then_admits_after_consume,
            over_budget_put_is_atomic,
            sample_larger_than_budget_is_refused,
            put_until_waits_for_room_and_times_out_naming_the_budget,
            abort_frees_and_twenty_aborts_return_to_baseline,
            reput_makes_the_old_ref_stale_and_removes_its_objects,
            generations_are_never_reused_after_a_free,
            reput_while_leased_then_release_new_then_stale_leaks_nothing,
            stale_double_release_does_not_free_an_unleased_reput,
            max_hold_gc_frees_only_old_samples_and_spares_leased_ones,
            gc_without_max_hold_frees_nothing,
            pending_removal_is_force_freed_at_the_attempt_bound,
            failed_removal_is_kept_while_failing_and_freed_after_recovery,
            release_and_abort_of_freed_samples_are_idempotent,
            deferred_removal_still_refuses_reads,
            retain_on_release_keeps_data_but_abort_still_frees,
            drain_retries_with_the_injected_sleep,
            drain_forces_removals_that_release_could_not_do,
            drain_samples_removes_only_the_named_samples,
            drain_that_cannot_finish_fails_loudly_and_keeps_bookkeeping,
            drain_rejects_zero_attempts,
            short_read_is_refused_and_loses_nothing,
            failed_write_changes_nothing,
            put_validates_its_input,
            auth_gates_attach_and_reports_it,
            cross_instance_consume_once_and_abort,
            cross_instance_stale_ref_after_reput,
            consumer_stale_release_leaves_the_new_generation,
            restarted_authority_adopts_then_aborts,
            adopt_requires_a_generation,
            discarding_external_attempts_reclaims_their_objects,
            ref_from_another_store_is_rejected,
            abort_of_a_sample_this_process_never_saw_removes_it,
            health_reports_the_backend_and_its_usage,
            a_ref_naming_a_missing_object_does_not_make_the_store_forget_its_bytes,
            an_object_longer_than_its_spec_is_refused,
            objects_are_raw_bytes_under_generation_keys,
            every_backend_builds_the_same_ref_for_the_same_input,
            drain_never_probes_before_its_final_attempt,
            dump_tap_writes_each_put_and_a_failing_dump_does_not_undo_it,
            forged_huge_shapes_are_errors_not_panics_or_giant_allocations,
            get_prefix_into_reads_leading_bytes_and_still_checks_object_sizes,
        ]);
    };
    (@each $module:ident, $kind:ident, [$($name:ident),* $(,)?]) => {
        mod $module {
            $( #[test] fn $name() { crate::suite::$name(crate::suite::Kind::$kind) } )*
        }
    };
}

pub(crate) fn put_returns_a_tensor_free_ref_with_specs_and_generation(kind: Kind) {
    let h = Harness::new(kind);
    let r = put(&h, "run0:task0", 1);
    // The URI names the backend the (possibly remote) store runs over.
    match kind {
        Kind::Mem | Kind::DaemonTcp | Kind::DaemonUnix => {
            assert_eq!(r.feature_store_uri, "mem://run0/run0%3Atask0?generation=1")
        }
        Kind::Dir => assert_eq!(r.feature_store_uri, "disagg://run0/run0:task0"),
        Kind::DaemonShm => assert_eq!(r.feature_store_uri, "arena://run0/run0%3Atask0?generation=1"),
    }
    assert_eq!(r.metadata["generation"], json!(1));
    assert_eq!(r.generation(), Some(ferry_core::Generation::new(1)));
    assert!(!r.metadata.contains_key("num_tokens"), "num_tokens moves to the ref field");
    assert_eq!(r.num_tokens, 4);
    assert_eq!(r.estimated_bytes as u64, Sample::new(1).nbytes());
    assert_eq!(r.feature_keys["hidden_state"], "run0:task0/hidden_state");
    assert_eq!(r.feature_specs["hidden_state"].shape, vec![1, 4, 8]);
    assert_eq!(r.feature_specs["hidden_state"].dtype, "bfloat16");
    assert_eq!(r.feature_specs["target"].target_repr, Some(ferry_core::TargetRepr::HiddenState));
    assert_eq!(r.feature_specs["hidden_state"].target_repr, None);
    // Tensor-free by type: the ref serializes to a small JSON line.
    let line = ferry_core::json::sample_ref_to_string(&r, ferry_core::JsonStyle::Compact).unwrap();
    assert!(line.len() < 2048, "{line}");
    assert_eq!(ferry_core::json::sample_ref_from_str(&line).unwrap(), r);
}

pub(crate) fn get_returns_identical_tensors_and_a_handle(kind: Kind) {
    let h = Harness::new(kind);
    let r = put(&h, "s0", 3);
    let handle = get_ok(&*h.store, &r, 3);
    assert_eq!(handle.sample_id, "s0");
    assert_eq!(handle.generation, r.generation().unwrap());
    assert_eq!(h.store.health().unwrap().active_leases, 1);
    // A subset of features can be read.
    let (only, h2) = h.store.get(&r, Some(&["input_ids"])).unwrap();
    assert_eq!(only.len(), 1);
    h.store.release(&h2).unwrap();
    h.store.release(&handle).unwrap();
}

pub(crate) fn returned_tensors_are_independent_copies(kind: Kind) {
    let h = Harness::with(kind, |o| o.retain_on_release = true);
    let r = put(&h, "s0", 5);
    let (mut tensors, handle) = h.store.get(&r, None).unwrap();
    tensors.get_mut("hidden_state").unwrap().bytes_mut().fill(0xAB);
    h.store.release(&handle).unwrap();
    let again = get_ok(&*h.store, &r, 5);
    h.store.release(&again).unwrap();
}

pub(crate) fn get_into_fills_caller_buffers_and_checks_their_size(kind: Kind) {
    let h = Harness::new(kind);
    let r = put(&h, "s0", 9);
    let want = Sample::new(9);
    let mut hidden = vec![0u8; want.hidden.len()];
    let mut wrong = [0u8; 3];
    let err = h.store.get_into(&r, &mut [("hidden_state", &mut wrong[..])]).unwrap_err();
    assert!(err.to_string().contains("its spec needs 64"), "{err}");
    assert_eq!(h.store.health().unwrap().active_leases, 0, "a refused get_into holds no lease");
    let handle = h.store.get_into(&r, &mut [("hidden_state", &mut hidden[..])]).unwrap();
    assert_eq!(hidden, want.hidden);
    h.store.release(&handle).unwrap();
}

pub(crate) fn get_prefix_into_reads_leading_bytes_and_still_checks_object_sizes(kind: Kind) {
    // A loader cutting sequences to max_len reads only the first tokens of each feature.
    let h = Harness::new(kind);
    let r = put(&h, "s0", 5);
    let want = Sample::new(5);
    let mut hidden = vec![0u8; 2 * 8 * 2]; // 2 of 4 tokens of (1, 4, 8) bf16
    let mut ids = vec![0u8; 3 * 8]; // 3 of 4 ids
    let handle =
        h.store.get_prefix_into(&r, &mut [("hidden_state", &mut hidden[..]), ("input_ids", &mut ids[..])]).unwrap();
    assert_eq!(hidden, want.hidden[..32]);
    let expected_ids: Vec<u8> = want.ids[..3].iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(ids, expected_ids);
    h.store.release(&handle).unwrap();
    assert_eq!(h.store.health().unwrap().resident_samples, 0, "a prefix read consumes like any read");

    // A buffer larger than the feature is refused before any lease.
    let r = put(&h, "s1", 6);
    let mut big = vec![0u8; want.hidden.len() + 2];
    let err = h.store.get_prefix_into(&r, &mut [("hidden_state", &mut big[..])]).unwrap_err();
    assert!(err.to_string().contains("at most 64"), "{err}");
    assert_eq!(h.store.health().unwrap().active_leases, 0);

    // The object's full size is still checked: a ref that under-states it is refused.
    let mut lying = r.clone();
    lying.feature_specs.get_mut("hidden_state").unwrap().shape = vec![1, 2, 8];
    let mut two = [0u8; 2 * 8 * 2];
    let err = h.store.get_prefix_into(&lying, &mut [("hidden_state", &mut two[..])]).unwrap_err();
    assert!(err.to_string().contains("does not describe"), "{err}");
    assert_eq!(h.store.health().unwrap().active_leases, 0);
    assert_eq!(h.store.health().unwrap().resident_samples, 1, "a refused read frees nothing");
}

pub(crate) fn double_release_is_a_noop(kind: Kind) {
    let h = Harness::new(kind);
    let r = put(&h, "s0", 1);
    let a = get_ok(&*h.store, &r, 1);
    let b = get_ok(&*h.store, &r, 1);
    h.store.release(&a).unwrap();
    h.store.release(&a).unwrap(); // must not count as b's release
    assert_eq!(h.store.health().unwrap().resident_samples, 1);
    h.store.release(&b).unwrap();
    assert_eq!(h.store.health().unwrap().resident_samples, 0);
}

pub(crate) fn stale_handle_after_reput_is_a_noop_and_new_generation_stays_readable(kind: Kind) {
    let h = Harness::new(kind);
    let r1 = put(&h, "s0", 1);
    let old = get_ok(&*h.store, &r1, 1);
    let r2 = put(&h, "s0", 2);
    h.store.release(&old).unwrap();
    let new = get_ok(&*h.store, &r2, 2);
    h.store.release(&new).unwrap();
}

pub(crate) fn last_lease_frees_and_two_leases_need_two_releases(kind: Kind) {
    let h = Harness::new(kind);
    let r = put(&h, "s0", 1);
    let a = get_ok(&*h.store, &r, 1);
    let b = get_ok(&*h.store, &r, 1);
    h.store.release(&a).unwrap();
    assert_eq!(h.store.health().unwrap().resident_samples, 1);
    h.store.release(&b).unwrap();
    let health = h.store.health().unwrap();
    assert_eq!((health.resident_samples, health.resident_bytes, health.active_leases), (0, 0, 0));
    assert_eq!(h.objects_present(&r), Vec::<String>::new(), "bytes physically removed");
    assert!(matches!(assert_unavailable(&*h.store, &r), Error::UseAfterFree { .. }));
}

pub(crate) fn fifty_cycles_leave_nothing_resident(kind: Kind) {
    let h = Harness::new(kind);
    for i in 0..50u8 {
        let r = put(&h, &format!("s{i}"), i);
        let handle = get_ok(&*h.store, &r, i);
        h.store.release(&handle).unwrap();
    }
    let health = h.store.health().unwrap();
    assert_eq!((health.resident_samples, health.resident_bytes, health.active_leases), (0, 0, 0));
    assert_eq!(health.backend_usage.map(|u| u.bytes), Some(0));
}

fn one_tensor(data: &[u8]) -> [(&'static str, TensorView<'_>); 1] {
    [("x", TensorView::new(DType::UInt8, std::slice::from_ref(&LEN32), data).unwrap())]
}
const LEN32: u64 = 32;

pub(crate) fn budget_admits_then_refuses_then_admits_after_consume(kind: Kind) {
    let h = Harness::with(kind, |o| o.max_resident_bytes = Some(40));
    let data = [7u8; 32];
    let r = h.store.put("a", &one_tensor(&data), JsonMap::new()).unwrap();
    let err = h.store.put("b", &one_tensor(&data), JsonMap::new()).unwrap_err();
    assert!(matches!(err, Error::OverBudget { requested: 32, resident: 32, budget: 40, .. }), "{err}");
    assert!(err.to_string().contains("max_resident_bytes=40") && err.to_string().contains("consumer is behind"));
    let (_, handle) = h.store.get(&r, None).unwrap();
    h.store.release(&handle).unwrap();
    h.store.put("b", &one_tensor(&data), JsonMap::new()).unwrap();
}

pub(crate) fn over_budget_put_is_atomic(kind: Kind) {
    let h = Harness::with(kind, |o| o.max_resident_bytes = Some(40));
    let data = [7u8; 32];
    h.store.put("a", &one_tensor(&data), JsonMap::new()).unwrap();
    let before = h.store.health().unwrap();
    assert!(h.store.put("b", &one_tensor(&data), JsonMap::new()).is_err());
    let after = h.store.health().unwrap();
    assert_eq!((after.resident_samples, after.resident_bytes, after.reserved_bytes), (1, 32, 0));
    assert_eq!(before.backend_usage, after.backend_usage, "nothing was written");
}

pub(crate) fn sample_larger_than_budget_is_refused(kind: Kind) {
    let h = Harness::with(kind, |o| o.max_resident_bytes = Some(16));
    let data = [7u8; 32];
    let deadline = Instant::now() + Duration::from_secs(30);
    // It can never fit, so it fails at once even with a deadline.
    let err = h.store.put_until("a", &one_tensor(&data), JsonMap::new(), deadline).unwrap_err();
    assert!(matches!(err, Error::OverBudget { budget: 16, .. }), "{err}");
}

pub(crate) fn put_until_waits_for_room_and_times_out_naming_the_budget(kind: Kind) {
    let h = Harness::with(kind, |o| o.max_resident_bytes = Some(40));
    let data = [7u8; 32];
    let r = h.store.put("a", &one_tensor(&data), JsonMap::new()).unwrap();
    let short = Instant::now() + Duration::from_millis(20);
    let err = h.store.put_until("b", &one_tensor(&data), JsonMap::new(), short).unwrap_err();
    assert!(matches!(err, Error::OverBudget { budget: 40, .. }), "{err}");
    let (_, handle) = h.store.get(&r, None).unwrap();
    // A daemon connection serves its requests in order, one at a time: a release sent on the
    // connection a put_until is blocked on would queue behind it. So for a daemon the waiter is
    // another client (another process) and the lease holder releases on its own connection.
    let other;
    let waiter_store: &dyn FeatureStoreApi = if kind.is_daemon() {
        other = h.second_instance();
        &*other
    } else {
        &*h.store
    };
    std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            waiter_store.put_until("b", &one_tensor(&data), JsonMap::new(), Instant::now() + Duration::from_secs(30))
        });
        // The waiter is admitted only once the consumer releases.
        h.store.release(&handle).unwrap();
        assert!(waiter.join().unwrap().is_ok());
    });
    assert_eq!(h.store.health().unwrap().resident_bytes, 32);
}

pub(crate) fn abort_frees_and_twenty_aborts_return_to_baseline(kind: Kind) {
    let h = Harness::new(kind);
    let r = put(&h, "s0", 1);
    h.store.abort(&r.sample_id).unwrap();
    assert!(matches!(assert_unavailable(&*h.store, &r), Error::UseAfterFree { .. }));
    for i in 0..20u8 {
        put(&h, &format!("t{i}"), i);
    }
    h.clock.advance(Duration::from_secs(3));
    assert!(h.store.health().unwrap().oldest_age_s >= 3.0);
    for i in 0..20u8 {
        h.store.abort(&SampleId::new(format!("t{i}"))).unwrap();
    }
    let health = h.store.health().unwrap();
    assert_eq!((health.resident_samples, health.resident_bytes), (0, 0));
    assert_eq!((health.oldest_age_s, health.avg_age_s), (0.0, 0.0));
    assert_eq!(health.backend_usage.map(|u| u.bytes), Some(0));
}

pub(crate) fn reput_makes_the_old_ref_stale_and_removes_its_objects(kind: Kind) {
    let h = Harness::new(kind);
    let r1 = put(&h, "s0", 1);
    let r2 = put(&h, "s0", 2);
    assert!(r2.generation() > r1.generation());
    assert!(matches!(assert_unavailable(&*h.store, &r1), Error::StaleRef { .. } | Error::UseAfterFree { .. }));
    assert_eq!(h.objects_present(&r1), Vec::<String>::new(), "generation-1 objects are gone");
    assert_eq!(h.objects_present(&r2).len(), 3, "generation-2 objects are present");
    let handle = get_ok(&*h.store, &r2, 2);
    h.store.release(&handle).unwrap();
    assert_eq!(h.store.health().unwrap().resident_bytes, 0);
}

pub(crate) fn generations_are_never_reused_after_a_free(kind: Kind) {
    let h = Harness::new(kind);
    let r1 = put(&h, "s0", 1);
    let handle = get_ok(&*h.store, &r1, 1);
    h.store.release(&handle).unwrap(); // consumed: nothing of s0 is left anywhere
    let r2 = put(&h, "s0", 2);
    assert!(r2.generation() > r1.generation(), "{:?} then {:?}", r1.generation(), r2.generation());
    assert_unavailable(&*h.store, &r1);
    // A fresh instance (a restarted process) over the same backend continues upward too.
    let other = h.second_instance();
    let r3 = other.put("s1", &Sample::new(3).tensors(), meta()).unwrap();
    if let Kind::Dir = kind {
        assert!(r3.generation() > r2.generation(), "shared directory: monotonic across instances");
    }
}

pub(crate) fn reput_while_leased_then_release_new_then_stale_leaks_nothing(kind: Kind) {
    let h = Harness::new(kind);
    let r1 = put(&h, "s0", 1);
    let old = get_ok(&*h.store, &r1, 1);
    let r2 = put(&h, "s0", 2);
    let new = get_ok(&*h.store, &r2, 2);
    h.store.release(&new).unwrap();
    h.store.release(&old).unwrap();
    let health = h.store.health().unwrap();
    assert_eq!((health.resident_samples, health.resident_bytes, health.active_leases), (0, 0, 0));
    assert_eq!(health.backend_usage.map(|u| u.bytes), Some(0));
}

pub(crate) fn stale_double_release_does_not_free_an_unleased_reput(kind: Kind) {
    let h = Harness::new(kind);
    let r1 = put(&h, "s0", 1);
    let handle = get_ok(&*h.store, &r1, 1);
    h.store.release(&handle).unwrap();
    let r2 = put(&h, "s0", 2);
    h.store.release(&handle).unwrap();
    assert_eq!(h.store.health().unwrap().resident_samples, 1);
    let again = get_ok(&*h.store, &r2, 2);
    h.store.release(&again).unwrap();
}

pub(crate) fn max_hold_gc_frees_only_old_samples_and_spares_leased_ones(kind: Kind) {
    let h = Harness::with(kind, |o| o.max_hold_age = Some(Duration::from_secs(10)));
    let old = put(&h, "old", 1);
    h.clock.advance(Duration::from_secs(15));
    let young = put(&h, "young", 2);
    h.clock.advance(Duration::from_secs(5));
    let report = h.store.gc().unwrap();
    assert_eq!((report.force_freed, report.force_freed_bytes), (1, Sample::new(1).nbytes()));
    assert_unavailable(&*h.store, &old);
    let lease = get_ok(&*h.store, &young, 2);
    h.clock.advance(Duration::from_secs(60));
    assert_eq!(h.store.gc().unwrap().force_freed, 0, "a leased sample is never freed by GC");
    let second = get_ok(&*h.store, &young, 2);
    h.store.release(&second).unwrap(); // consume-once: frees; the first lease is on the same generation
    h.store.release(&lease).unwrap();
    assert_eq!(h.store.health().unwrap().resident_samples, 0);
    assert_eq!(h.store.health().unwrap().force_freed_total, 1);
}

pub(crate) fn gc_without_max_hold_frees_nothing(kind: Kind) {
    let h = Harness::new(kind);
    put(&h, "s0", 1);
    h.clock.advance(Duration::from_secs(3600));
    assert_eq!(h.store.gc().unwrap().force_freed, 0);
    assert_eq!(h.store.health().unwrap().resident_samples, 1);
}

pub(crate) fn pending_removal_is_force_freed_at_the_attempt_bound(kind: Kind) {
    // SpecForge's local store: a free that fails 5 times with max_release_attempts=3 stays
    // pending for two GC rounds and is force-freed on the third.
    let h = Harness::with(kind, |o| o.max_release_attempts = 3);
    let r = put(&h, "s0", 1);
    h.faults.set_remove_fault(RemoveFault::FailUnforcedTimes(5));
    let handle = get_ok(&*h.store, &r, 1);
    h.store.release(&handle).unwrap();
    assert_eq!(h.store.health().unwrap().release_pending, 1);
    assert!(
        matches!(assert_unavailable(&*h.store, &r), Error::UseAfterFree { .. }),
        "pending is still freed logically"
    );
    assert_eq!(h.store.gc().unwrap().release_pending, 1);
    assert_eq!(h.store.gc().unwrap().release_pending, 1);
    let third = h.store.gc().unwrap();
    assert_eq!((third.force_freed, third.release_pending), (1, 0));
    assert_eq!(h.faults.forced_removes.load(Ordering::SeqCst), 1);
    let health = h.store.health().unwrap();
    assert_eq!((health.resident_samples, health.resident_bytes), (0, 0));
    assert_eq!(h.objects_present(&r), Vec::<String>::new());
}

pub(crate) fn failed_removal_is_kept_while_failing_and_freed_after_recovery(kind: Kind) {
    let h = Harness::new(kind);
    let r = put(&h, "s0", 1);
    h.faults.set_remove_fault(RemoveFault::FailAlways);
    let handle = get_ok(&*h.store, &r, 1);
    h.store.release(&handle).unwrap();
    for _ in 0..5 {
        assert_eq!(h.store.gc().unwrap().release_pending, 1, "never dropped while failing");
    }
    assert_eq!(h.store.health().unwrap().resident_bytes, Sample::new(1).nbytes(), "bytes still counted while present");
    h.faults.set_remove_fault(RemoveFault::None);
    let report = h.store.gc().unwrap();
    assert_eq!((report.force_freed, report.release_pending), (1, 0));
    assert_eq!(h.store.health().unwrap().force_freed_total, 1);
    assert_eq!(h.store.health().unwrap().resident_bytes, 0);
}

pub(crate) fn release_and_abort_of_freed_samples_are_idempotent(kind: Kind) {
    let h = Harness::new(kind);
    let r = put(&h, "s0", 1);
    let handle = get_ok(&*h.store, &r, 1);
    h.store.release(&handle).unwrap();
    h.store.release(&handle).unwrap();
    h.store.abort(&r.sample_id).unwrap();
    h.store.abort(&r.sample_id).unwrap();
    h.store.abort(&SampleId::new("never-existed")).unwrap();
    assert_eq!(h.store.health().unwrap().resident_samples, 0);
}

pub(crate) fn deferred_removal_still_refuses_reads(kind: Kind) {
    // Mooncake's lease-deferred remove: "success", but the bytes stay. Reads must still fail.
    let h = Harness::new(kind);
    h.faults.set_remove_fault(RemoveFault::Defer);
    let r = put(&h, "s0", 1);
    let handle = get_ok(&*h.store, &r, 1);
    h.store.release(&handle).unwrap();
    assert_eq!(h.objects_present(&r).len(), 3, "the backend kept the bytes");
    assert!(matches!(assert_unavailable(&*h.store, &r), Error::UseAfterFree { .. }));
    let r2 = put(&h, "s1", 2);
    h.store.abort(&r2.sample_id).unwrap();
    assert!(matches!(assert_unavailable(&*h.store, &r2), Error::UseAfterFree { .. }));
    assert_eq!(h.store.health().unwrap().resident_bytes, 0);
}

pub(crate) fn retain_on_release_keeps_data_but_abort_still_frees(kind: Kind) {
    let h = Harness::with(kind, |o| o.retain_on_release = true);
    let r = put(&h, "s0", 1);
    for _ in 0..3 {
        let handle = get_ok(&*h.store, &r, 1);
        h.store.release(&handle).unwrap();
    }
    assert_eq!(h.store.health().unwrap().resident_samples, 1);
    h.store.abort(&r.sample_id).unwrap();
    assert_unavailable(&*h.store, &r);
    assert_eq!(h.store.health().unwrap().resident_bytes, 0);
}

pub(crate) fn drain_retries_with_the_injected_sleep(kind: Kind) {
    let h = Harness::new(kind);
    let r = put(&h, "s0", 1);
    h.faults.set_remove_fault(RemoveFault::FailTimes(2)); // release's removal + the first drain attempt
    let handle = get_ok(&*h.store, &r, 1);
    h.store.release(&handle).unwrap();
    let report = h.store.drain(DrainPolicy { max_attempts: 8, retry_interval: Duration::from_millis(125) }).unwrap();
    assert_eq!((report.attempts, report.removed, report.release_pending), (2, 1, 0));
    assert_eq!(h.clock.sleeps(), vec![Duration::from_millis(125)]);
    assert_eq!(h.store.health().unwrap().force_freed_total, 1);
    assert_eq!(h.objects_present(&r), Vec::<String>::new(), "no physical residue");
}

pub(crate) fn drain_forces_removals_that_release_could_not_do(kind: Kind) {
    let h = Harness::new(kind);
    let r = put(&h, "s0", 1);
    h.faults.set_remove_fault(RemoveFault::FailUnforcedTimes(1000)); // objects "leased" by readers
    let handle = get_ok(&*h.store, &r, 1);
    h.store.release(&handle).unwrap();
    assert_eq!(h.faults.forced_removes.load(Ordering::SeqCst), 0, "release never forces");
    let report = h.store.drain(no_sleep_drain(8)).unwrap();
    assert_eq!((report.attempts, report.removed), (1, 1));
    assert_eq!(h.objects_present(&r), Vec::<String>::new());
}

pub(crate) fn drain_samples_removes_only_the_named_samples(kind: Kind) {
    let h = Harness::new(kind);
    let durable = put(&h, "durable", 1);
    let prefetched = put(&h, "prefetched", 2);
    h.faults.set_remove_fault(RemoveFault::FailUnforcedTimes(1000));
    h.store.abort(&durable.sample_id).unwrap();
    h.store.abort(&prefetched.sample_id).unwrap();
    assert_eq!(h.store.health().unwrap().release_pending, 2);
    let report = h.store.drain_samples(std::slice::from_ref(&durable.sample_id), no_sleep_drain(3)).unwrap();
    assert_eq!(report.removed, 1);
    assert_eq!(h.store.health().unwrap().release_pending, 1);
    assert_eq!(h.objects_present(&durable), Vec::<String>::new());
    assert_eq!(h.objects_present(&prefetched).len(), 3, "the non-durable sample survives");
    assert_eq!(h.store.drain_samples(&[], no_sleep_drain(1)).unwrap().removed, 0);
}

pub(crate) fn drain_that_cannot_finish_fails_loudly_and_keeps_bookkeeping(kind: Kind) {
    let h = Harness::with(kind, |o| o.max_release_attempts = 1);
    let r = put(&h, "s0", 1);
    h.faults.set_remove_fault(RemoveFault::FailAlways);
    let handle = get_ok(&*h.store, &r, 1);
    h.store.release(&handle).unwrap();
    h.store.gc().unwrap();
    h.store.gc().unwrap();
    assert_eq!(h.store.health().unwrap().resident_samples, 1);
    let probes_before = h.faults.probes.load(Ordering::SeqCst);
    let err = h.store.drain(no_sleep_drain(2)).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("could not drain 1 pending removal(s) after 2 attempts"), "{text}");
    assert!(text.contains("s0@g1") && text.contains("injected fault"), "{text}");
    assert!(h.clock.sleeps().is_empty(), "zero interval: no sleep");
    assert!(h.faults.probes.load(Ordering::SeqCst) > probes_before, "the final attempt confirms by probing");
    assert_eq!(h.store.health().unwrap().release_pending, 1, "bookkeeping kept");
    assert_eq!(h.objects_present(&r).len(), 3, "bytes remain");
}

pub(crate) fn drain_rejects_zero_attempts(kind: Kind) {
    let h = Harness::new(kind);
    assert!(matches!(h.store.drain(no_sleep_drain(0)), Err(Error::InvalidArgument(_))));
    assert!(matches!(h.store.drain_samples(&[], no_sleep_drain(0)), Err(Error::InvalidArgument(_))));
    assert_eq!(h.store.drain(DrainPolicy::default()).unwrap().attempts, 0);
}

pub(crate) fn short_read_is_refused_and_loses_nothing(kind: Kind) {
    let h = Harness::new(kind);
    let r = put(&h, "s0", 1);
    h.truncate(&r);
    let err = h.store.get(&r, None).unwrap_err();
    match kind {
        // An object that lost its tail is a short read (SpecForge's KeyError), through a daemon
        // too (the arena's seam makes the object report fewer bytes than its spec).
        Kind::Mem | Kind::DaemonTcp | Kind::DaemonUnix | Kind::DaemonShm => {
            assert!(matches!(err, Error::ShortRead { .. }), "{err}");
            assert!(err.to_string().contains("short read"), "{err}");
        }
        // A sample file that lost its tail no longer parses: caught before any byte is served.
        Kind::Dir => assert!(matches!(&err, Error::Corrupt { message, .. } if message.contains("truncated")), "{err}"),
    }
    let health = h.store.health().unwrap();
    assert_eq!((health.active_leases, health.resident_samples), (0, 1), "no lease kept, nothing freed");
}

pub(crate) fn failed_write_changes_nothing(kind: Kind) {
    const BUDGET: u64 = 64 << 20;
    let h = Harness::with(kind, |o| o.max_resident_bytes = Some(BUDGET));
    let before = h.store.health().unwrap().backend_usage;
    if kind == Kind::DaemonShm {
        // Over the arena, the daemon writes through `ArenaBackend::reserve`/`publish`, bypassing
        // the FaultyBackend wrapper, so its write fault cannot fire. The put fails another way
        // that must change nothing: a sample within the budget but larger than the whole arena,
        // so the arena itself refuses it after the budget admitted it.
        let huge = vec![0u8; 17 << 20]; // the test daemon's arena is 16 MiB
        let shape = [huge.len() as u64];
        let tensor = TensorView::new(DType::UInt8, &shape, &huge).unwrap();
        let err = h.store.put("s0", &[("hidden_state", tensor)], meta()).unwrap_err();
        let by_the_arena = matches!(&err, Error::Backend { backend, .. } if backend == "arena");
        assert!(by_the_arena, "the arena, not the budget, must refuse it: {err}");
    } else {
        h.faults.fail_next_writes(1);
        assert!(h.store.put("s0", &Sample::new(1).tensors(), meta()).is_err());
    }
    let health = h.store.health().unwrap();
    assert_eq!((health.resident_samples, health.resident_bytes, health.reserved_bytes), (0, 0, 0));
    assert_eq!(health.backend_usage, before, "nothing was written");
    let r = put(&h, "s0", 1);
    let handle = get_ok(&*h.store, &r, 1);
    h.store.release(&handle).unwrap();
}

pub(crate) fn put_validates_its_input(kind: Kind) {
    let h = Harness::new(kind);
    let err = h.store.put("s0", &[], meta()).unwrap_err();
    assert!(err.to_string().contains("put requires at least one tensor"), "{err}");
    let s = Sample::new(1);
    let mut dup = s.tensors();
    dup.push(dup[0]);
    assert!(h.store.put("s0", &dup, meta()).unwrap_err().to_string().contains("appears twice"));
    let bad = [("a/b", s.tensors()[0].1)];
    assert!(h.store.put("s0", &bad, meta()).unwrap_err().to_string().contains("no '/'"));
    let mut m = meta();
    m.insert("target_repr".into(), json!("softmax"));
    assert!(h.store.put("s0", &s.tensors(), m).unwrap_err().to_string().contains("softmax"));
    assert_eq!(h.store.health().unwrap().resident_samples, 0);
}

pub(crate) fn auth_gates_attach_and_reports_it(kind: Kind) {
    // In process the store's own AuthPolicy gates FeatureStore::open; a daemon authenticates
    // each connection against its secret (DaemonConfig::secret) instead, and its store has no
    // policy. `Harness::secured` sets whichever gate the kind has; attaching is then opening a
    // store or connecting a client, and both must refuse a missing or wrong secret alike.
    let h = Harness::secured(kind, "s3cret");
    assert!(h.store.health().unwrap().auth_required);
    put(&h, "s0", 1);
    for credential in [None, Some(Secret::new("wrong"))] {
        let Err(err) = h.served.connect(credential.clone()) else {
            panic!("{kind:?}: attached presenting {:?}", credential.map(|_| "a wrong secret"))
        };
        assert!(matches!(err, Error::AuthFailed { .. }), "{err}");
        assert!(!err.to_string().contains("s3cret"));
    }
    assert!(h.second_instance().health().unwrap().auth_required, "the right secret attaches");
    assert!(!Harness::new(kind).store.health().unwrap().auth_required);
}

pub(crate) fn cross_instance_consume_once_and_abort(kind: Kind) {
    let h = Harness::new(kind);
    let consumer = h.second_instance();
    let r = put(&h, "s0", 1);
    let handle = get_ok(&*consumer, &r, 1);
    consumer.release(&handle).unwrap(); // consume-once deletes the objects
    assert_unavailable(&*h.store, &r);
    assert_eq!(h.store.health().unwrap().resident_bytes, 0, "the producer forgets bytes another process freed");
    let r2 = put(&h, "s1", 2);
    h.store.abort(&r2.sample_id).unwrap(); // the producer's abort physically removes
    assert_unavailable(&*consumer, &r2);
}

pub(crate) fn cross_instance_stale_ref_after_reput(kind: Kind) {
    let h = Harness::with(kind, |o| o.retain_on_release = true);
    let consumer = h.second_instance();
    let r1 = put(&h, "s0", 1);
    let first = get_ok(&*consumer, &r1, 1);
    consumer.release(&first).unwrap();
    let r2 = put(&h, "s0", 2);
    assert_unavailable(&*consumer, &r1);
    let handle = get_ok(&*consumer, &r2, 2);
    consumer.release(&handle).unwrap();
}

pub(crate) fn consumer_stale_release_leaves_the_new_generation(kind: Kind) {
    let h = Harness::new(kind);
    let consumer = h.second_instance();
    let r1 = put(&h, "s0", 1);
    let stale = get_ok(&*consumer, &r1, 1);
    let r2 = put(&h, "s0", 2);
    consumer.release(&stale).unwrap();
    let handle = get_ok(&*consumer, &r2, 2);
    consumer.release(&handle).unwrap();
    assert_unavailable(&*h.store, &r2);
}

pub(crate) fn restarted_authority_adopts_then_aborts(kind: Kind) {
    let h = Harness::new(kind);
    let r = put(&h, "s0", 1);
    let restarted = h.second_instance(); // never saw the sample
    restarted.adopt(&r).unwrap();
    assert_eq!(restarted.health().unwrap().resident_samples, 1);
    h.faults.set_remove_fault(RemoveFault::FailAlways);
    restarted.abort(&r.sample_id).unwrap();
    assert_eq!(restarted.health().unwrap().release_pending, 1);
    h.faults.set_remove_fault(RemoveFault::None);
    restarted.drain(no_sleep_drain(3)).unwrap();
    assert_eq!(h.objects_present(&r), Vec::<String>::new());
    assert_unavailable(&*restarted, &r);
}

pub(crate) fn adopt_requires_a_generation(kind: Kind) {
    let h = Harness::new(kind);
    let mut r = put(&h, "s0", 1);
    r.metadata.remove("generation");
    r.feature_store_uri = r.feature_store_uri.split('?').next().unwrap().to_owned();
    let err = h.second_instance().adopt(&r).unwrap_err();
    assert!(err.to_string().contains("needs metadata.generation"), "{err}");
}

pub(crate) fn discarding_external_attempts_reclaims_their_objects(kind: Kind) {
    let h = Harness::new(kind);
    // A capture server wrote generation 1 of "cap0" directly into the backend, and the
    // response carrying its ref was lost.
    let sid = SampleId::new("cap0");
    let gen1 = ferry_core::Generation::new(1);
    let s = Sample::new(4);
    let objects: Vec<ObjectData<'_>> =
        s.tensors().into_iter().map(|(name, tensor)| ObjectData { name, tensor }).collect();
    let key = SampleKey { store_id: h.store.store_id(), sample_id: &sid, generation: gen1 };
    h.faults.inner().write(key, &objects).unwrap();
    h.store.track_external_attempt(&sid, gen1, &["hidden_state", "target", "input_ids", "target"]).unwrap();
    assert_eq!(h.store.health().unwrap().provisional_external, 1);
    assert!(h.store.track_external_attempt(&sid, gen1, &[]).is_err());
    assert_eq!(h.store.discard_external_attempts().unwrap(), 1);
    assert_eq!(h.store.health().unwrap().provisional_external, 0);
    assert!(!h.faults.inner().exists(key.object("hidden_state")).unwrap());
}

pub(crate) fn ref_from_another_store_is_rejected(kind: Kind) {
    let h = Harness::new(kind);
    let mut r = put(&h, "s0", 1);
    r.feature_store_uri = r.feature_store_uri.replacen("run0", "other", 1);
    let err = h.store.get(&r, None).unwrap_err();
    assert!(err.to_string().contains("not at this store"), "{err}");
    assert_eq!(h.store.health().unwrap().active_leases, 0);
}

pub(crate) fn abort_of_a_sample_this_process_never_saw_removes_it(kind: Kind) {
    // SharedDirFeatureStore semantics, for every backend that can list: abort deletes what the
    // backend holds for the sample even in a process that never tracked it.
    let h = Harness::new(kind);
    let r = put(&h, "s0", 1);
    h.second_instance().abort(&r.sample_id).unwrap();
    assert_eq!(h.objects_present(&r), Vec::<String>::new());
    assert_unavailable(&*h.store, &r);
}

pub(crate) fn health_reports_the_backend_and_its_usage(kind: Kind) {
    let h = Harness::with(kind, |o| o.max_resident_bytes = Some(1 << 20));
    let r = put(&h, "s0", 1);
    let health = h.store.health().unwrap();
    // The backend is the one the (possibly remote) store runs over: "memory", "shared_dir" or
    // the daemon's "arena".
    assert_eq!(health.backend, kind.backend_name());
    assert_eq!(health.store_id, "run0");
    assert_eq!(health.max_resident_bytes, Some(1 << 20));
    assert_eq!(health.resident_bytes, Sample::new(1).nbytes());
    let usage = health.backend_usage.unwrap();
    assert_eq!(usage.samples, 1);
    assert!(usage.bytes >= Sample::new(1).nbytes());
    let json = serde_json::to_value(&health).unwrap();
    for key in ["resident_samples", "active_leases", "release_pending", "oldest_age_s", "force_freed_total"] {
        assert!(json.get(key).is_some(), "{key}");
    }
    h.store.abort(&r.sample_id).unwrap();
}

pub(crate) fn a_ref_naming_a_missing_object_does_not_make_the_store_forget_its_bytes(kind: Kind) {
    let h = Harness::new(kind);
    let r = put(&h, "s0", 1);
    let mut bogus = r.clone();
    bogus.feature_keys.insert("hidden_state".into(), "s0/no_such_object".into());
    let err = assert_unavailable(&*h.store, &bogus);
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    let health = h.store.health().unwrap();
    assert_eq!((health.resident_samples, health.resident_bytes), (1, Sample::new(1).nbytes()));
    let handle = get_ok(&*h.store, &r, 1);
    h.store.release(&handle).unwrap();
    assert_eq!(h.store.health().unwrap().resident_bytes, 0);
}

pub(crate) fn an_object_longer_than_its_spec_is_refused(kind: Kind) {
    let h = Harness::new(kind);
    let r = put(&h, "s0", 1);
    let mut narrow = r.clone();
    narrow.feature_specs.get_mut("hidden_state").unwrap().shape = vec![1, 4, 4];
    let err = h.store.get(&narrow, Some(&["hidden_state"])).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("does not describe"), "{err}");
    assert_eq!(h.store.health().unwrap().active_leases, 0);
    let handle = get_ok(&*h.store, &r, 1);
    h.store.release(&handle).unwrap();
}

pub(crate) fn objects_are_raw_bytes_under_generation_keys(kind: Kind) {
    // SpecForge's Mooncake layout: one object per tensor at {store_id}/{sid}/g{gen}/{name},
    // holding exactly the raw contiguous bytes (a 4x8 float32 tensor is 128 bytes, no archive).
    let h = Harness::new(kind);
    let values: Vec<f32> = (0..32).map(|i| i as f32 * 0.5).collect();
    let r = h.store.put("s0", &[("x", TensorView::from_elements(&[4, 8], &values).unwrap())], JsonMap::new()).unwrap();
    let sid = SampleId::new("s0");
    let key = SampleKey { store_id: h.store.store_id(), sample_id: &sid, generation: r.generation().unwrap() };
    assert_eq!(key.object("x").to_string(), "run0/s0/g1/x");
    assert_eq!(h.faults.inner().size(key.object("x")).unwrap(), Some(128));
    let mut raw = vec![0u8; 128];
    assert_eq!(h.faults.inner().read_into(key.object("x"), &mut raw).unwrap(), 128);
    assert_eq!(raw, bytemuck_bytes(&values));
    assert_eq!(h.faults.inner().object_names(key).unwrap(), Some(vec!["x".to_owned()]));
}

fn bytemuck_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub(crate) fn every_backend_builds_the_same_ref_for_the_same_input(kind: Kind) {
    let h = Harness::new(kind);
    let reference = Harness::new(Kind::Mem);
    let mut a = put(&h, "run0:task0", 1);
    let mut b = put(&reference, "run0:task0", 1);
    a.feature_store_uri.clear();
    b.feature_store_uri.clear();
    assert_eq!(a, b, "only the URI names the backend");
}

pub(crate) fn drain_never_probes_before_its_final_attempt(kind: Kind) {
    let h = Harness::new(kind);
    let r = put(&h, "s0", 1);
    h.faults.set_remove_fault(RemoveFault::FailTimes(5)); // release + 4 drain attempts fail
    let handle = get_ok(&*h.store, &r, 1);
    h.store.release(&handle).unwrap();
    let probes = h.faults.probes.load(Ordering::SeqCst);
    let report = h.store.drain(no_sleep_drain(8)).unwrap();
    assert_eq!(report.attempts, 5);
    assert_eq!(h.faults.probes.load(Ordering::SeqCst), probes, "probing would renew a backend read lease");
}

pub(crate) fn dump_tap_writes_each_put_and_a_failing_dump_does_not_undo_it(kind: Kind) {
    let dump = tempfile::tempdir().unwrap();
    let h = Harness::with(kind, |o| o.dump_dir = Some(dump.path().to_path_buf()));
    put(&h, "run0:task0", 1);
    let file = ferry_format::TensorFile::open(&dump.path().join("run0:task0.ckpt")).unwrap();
    assert_eq!(file.tensor("hidden_state").unwrap().view().bytes(), &Sample::new(1).hidden[..]);
    let broken = Harness::with(kind, |o| o.dump_dir = Some(dump.path().join("missing").join("dir")));
    let r = put(&broken, "s1", 2);
    let handle = get_ok(&*broken.store, &r, 2);
    broken.store.release(&handle).unwrap();
}

pub(crate) fn forged_huge_shapes_are_errors_not_panics_or_giant_allocations(kind: Kind) {
    let h = Harness::new(kind);
    let r = put(&h, "s0", 1);
    for shape in [vec![1u64 << 40, 1 << 40], vec![1 << 62, 4], vec![1 << 44]] {
        let mut forged = r.clone();
        forged.feature_specs.get_mut("hidden_state").unwrap().shape = shape.clone();
        let err = h.store.get(&forged, Some(&["hidden_state"])).unwrap_err();
        // A read into fresh buffers must allocate the claimed bytes first, so a store (and a
        // daemon streaming bytes) refuses a claim no allocation can satisfy as an invalid
        // argument. On the shared-memory route nothing is allocated: the daemon compares the
        // claim with the object's size under the lease and refuses a spec claiming more bytes
        // than the object holds as a short read, as it refuses any over-stated spec. A shape
        // whose size overflows is an invalid argument on every route.
        let refused = matches!(err, Error::InvalidArgument(_))
            || (kind == Kind::DaemonShm && matches!(err, Error::ShortRead { .. }));
        assert!(refused, "{shape:?}: {err}");
        let mut small = [0u8; 8];
        assert!(h.store.get_into(&forged, &mut [("hidden_state", &mut small[..])]).is_err());
    }
    assert_eq!(h.store.health().unwrap().active_leases, 0);
    let handle = get_ok(&*h.store, &r, 1);
    h.store.release(&handle).unwrap();
}
