//! Real two-process tests of the shared-directory backend (`dir://`).
//!
//! The test binary re-runs itself (`current_exe() --exact two_process_child ...`) with
//! `FERRY_TWO_PROCESS_CHILD=<role>` set, so [`two_process_child`] plays the other process; run
//! normally, that test returns at once. Parent and child talk over the child's stdin (refs as
//! compact JSON lines, commands) and stdout (lines tagged `FERRY:`; libtest's own output is
//! ignored). Every wait has a deadline: a child that has not exited after [`CHILD_DEADLINE`] is
//! killed and the test fails.
//!
//! Scenarios:
//! * process B consumes (get + release) a sample process A put: B sees every byte, the file
//!   is gone from disk, and A's get of the same ref fails with a not-available error;
//! * a long-lived consumer process consumes successive generations the producer re-puts;
//! * B releases a stale generation-1 handle after A re-put the sample (generation 2):
//!   generation 2 stays on disk and readable by A;
//! * B leases generation 1, then generation 2, and releases both: consume-once frees
//!   generation 2 (B's view moves to the newest generation it reads);
//! * B aborts a sample it never tracked: the file goes and A's get fails;
//! * two child processes and the parent put samples concurrently into one store: every
//!   generation is distinct (the flock'd counter is monotonic across processes) and each
//!   process's generations increase; the parent then consumes all of them and the directory
//!   ends empty.

use ferry_core::json::{sample_ref_from_str, sample_ref_to_string};
use ferry_core::{DType, FeatureHandle, JsonMap, JsonStyle, SampleRef, StoreId, TensorBuf, TensorView};
use ferry_store::backend::BackendUsage;
use ferry_store::dir::GENERATION_FILE;
use ferry_store::{FeatureStore, StoreOptions, open_store};
use indexmap::IndexMap;
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "FERRY_TWO_PROCESS_CHILD";
const ROOT_ENV: &str = "FERRY_TWO_PROCESS_ROOT";
const STORE_ENV: &str = "FERRY_TWO_PROCESS_STORE";
const PREFIX_ENV: &str = "FERRY_TWO_PROCESS_PREFIX";
const CHILD_TEST: &str = "two_process_child";
const TAG: &str = "FERRY:";
/// How long any child may live.
const CHILD_DEADLINE: Duration = Duration::from_secs(30);
const SEQ: usize = 16;
const HIDDEN: usize = 8;
const PRODUCED: usize = 20;

// ------------------------------------------------------------------ samples

/// bf16 bits of an f32 that bf16 represents exactly.
fn bf16_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    assert_eq!(bits & 0xffff, 0, "{v} is not exactly representable in bf16");
    (bits >> 16) as u16
}

fn bf16_value(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

fn hidden_value(seed: u64, i: usize) -> f32 {
    ((seed as usize * 7 + i) % 64) as f32 * 0.25 - 4.0
}

/// The tensors of the sample with `seed`: every byte depends on the seed.
struct Sample {
    ids: Vec<i64>,
    hidden: Vec<u8>,
    mask: Vec<u8>,
}

impl Sample {
    fn new(seed: u64) -> Sample {
        Sample {
            ids: (0..SEQ as i64).map(|j| seed as i64 * 1000 + j).collect(),
            hidden: (0..SEQ * HIDDEN).flat_map(|i| bf16_bits(hidden_value(seed, i)).to_le_bytes()).collect(),
            mask: (0..SEQ).map(|j| ((seed as usize + j) % 2) as u8).collect(),
        }
    }

    fn tensors(&self) -> Vec<(&'static str, TensorView<'_>)> {
        const IDS: [u64; 2] = [1, SEQ as u64];
        const HID: [u64; 2] = [SEQ as u64, HIDDEN as u64];
        const MASK: [u64; 1] = [SEQ as u64];
        vec![
            ("input_ids", TensorView::from_elements(&IDS, &self.ids).expect("ids")),
            ("hidden_state", TensorView::new(DType::BFloat16, &HID, &self.hidden).expect("hidden")),
            ("loss_mask", TensorView::new(DType::UInt8, &MASK, &self.mask).expect("mask")),
        ]
    }
}

fn metadata(seed: u64) -> JsonMap {
    let mut m = JsonMap::new();
    m.insert("run_id".into(), "run0".into());
    m.insert("num_tokens".into(), (SEQ as i64).into());
    m.insert("seed".into(), seed.into());
    m
}

fn seed_of(r: &SampleRef) -> u64 {
    r.metadata.get("seed").and_then(|v| v.as_u64()).expect("ref metadata carries the seed")
}

/// Checks every tensor of a get against the sample `seed` put; returns a description of the
/// first mismatch.
fn verify(tensors: &IndexMap<String, TensorBuf>, seed: u64) -> Result<(), String> {
    let want = Sample::new(seed);
    let names: Vec<&str> = tensors.keys().map(String::as_str).collect();
    if names != ["input_ids", "hidden_state", "loss_mask"] {
        return Err(format!("features {names:?}"));
    }
    let ids = &tensors["input_ids"];
    if ids.dtype() != DType::Int64 || ids.shape() != [1, SEQ as u64] {
        return Err(format!("input_ids is {} {:?}", ids.dtype(), ids.shape()));
    }
    if ids.as_elements::<i64>().map_err(|e| e.to_string())? != &want.ids[..] {
        return Err(format!("input_ids bytes differ from seed {seed}'s"));
    }
    let hidden = &tensors["hidden_state"];
    if hidden.dtype() != DType::BFloat16 || hidden.shape() != [SEQ as u64, HIDDEN as u64] {
        return Err(format!("hidden_state is {} {:?}", hidden.dtype(), hidden.shape()));
    }
    if hidden.bytes() != &want.hidden[..] {
        return Err(format!("hidden_state bytes differ from seed {seed}'s"));
    }
    for (i, pair) in hidden.bytes().chunks_exact(2).enumerate() {
        let v = bf16_value(u16::from_le_bytes([pair[0], pair[1]]));
        if v != hidden_value(seed, i) {
            return Err(format!("hidden_state[{i}] = {v}, want {}", hidden_value(seed, i)));
        }
    }
    let mask = &tensors["loss_mask"];
    if mask.dtype() != DType::UInt8 || mask.bytes() != &want.mask[..] {
        return Err(format!("loss_mask differs from seed {seed}'s"));
    }
    Ok(())
}

fn options(store_id: &str) -> StoreOptions {
    StoreOptions { store_id: Some(StoreId::new(store_id)), ..StoreOptions::default() }
}

fn open_dir(root: &Path, store_id: &str) -> FeatureStore {
    open_store(&format!("dir://{}", root.display()), options(store_id)).expect("open dir:// store")
}

fn sample_file(root: &Path, store_id: &str, r: &SampleRef) -> PathBuf {
    let generation = r.generation().expect("ref has a generation");
    root.join(store_id).join(format!("{}.g{generation}.ckpt", r.sample_id))
}

/// Files in the store directory other than the generation mark.
fn files_left(root: &Path, store_id: &str) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(root.join(store_id))
        .expect("store dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n != GENERATION_FILE)
        .collect();
    out.sort();
    out
}

fn to_line(r: &SampleRef) -> String {
    sample_ref_to_string(r, JsonStyle::Compact).expect("ref JSON")
}

fn assert_nothing_resident(store: &FeatureStore) {
    let h = store.health();
    assert_eq!((h.resident_bytes, h.resident_samples, h.active_leases, h.release_pending), (0, 0, 0, 0), "{h:?}");
    assert_eq!(h.backend_usage, Some(BackendUsage::default()), "bytes left on disk: {h:?}");
}

// ------------------------------------------------------------------ the child

fn child_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("child needs {name}"))
}

fn emit(tag: &str, payload: impl std::fmt::Display) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "\n{TAG}{tag} {payload}").expect("stdout");
    out.flush().expect("flush");
}

fn read_line() -> String {
    let mut line = String::new();
    let n = std::io::stdin().lock().read_line(&mut line).expect("stdin");
    assert!(n > 0, "parent closed stdin before sending what this child waits for");
    line.trim_end().to_owned()
}

fn read_ref() -> SampleRef {
    sample_ref_from_str(&read_line()).expect("parse the ref the parent sent")
}

fn get_verified(store: &FeatureStore, r: &SampleRef) -> FeatureHandle {
    let (tensors, handle) =
        store.get(r, None).unwrap_or_else(|e| panic!("child get of {} g{:?}: {e}", r.sample_id, r.generation()));
    if let Err(e) = verify(&tensors, seed_of(r)) {
        panic!("child read wrong bytes for {} g{:?}: {e}", r.sample_id, r.generation());
    }
    assert_eq!(Some(handle.generation), r.generation());
    handle
}

/// The child process's side; a no-op unless the parent started this binary as a child.
#[test]
fn two_process_child() {
    let Ok(role) = std::env::var(CHILD_ENV) else { return };
    let root = PathBuf::from(child_env(ROOT_ENV));
    let store_id = child_env(STORE_ENV);
    let store = open_dir(&root, &store_id);
    match role.as_str() {
        // Consume one sample: get, verify, release (consume-once frees it for everyone).
        "consume" => {
            let r = read_ref();
            let handle = get_verified(&store, &r);
            store.release(&handle).expect("release");
            assert!(!sample_file(&root, &store_id, &r).exists(), "the consumer's release left the file");
            let err = store.get(&r, None).expect_err("consumed");
            assert!(err.is_not_available(), "{err}");
            emit("CONSUMED", handle.generation);
        }
        // Consume every ref sent until stdin closes (one long-lived consumer, many generations).
        "consume_many" => {
            let mut line = String::new();
            while std::io::stdin().lock().read_line(&mut line).expect("stdin") > 0 {
                let r = sample_ref_from_str(line.trim_end()).expect("parse ref");
                line.clear();
                let handle = get_verified(&store, &r);
                store.release(&handle).expect("release");
                let err = store.get(&r, None).expect_err("consumed");
                assert!(err.is_not_available(), "{err}");
                let h = store.health();
                assert_eq!((h.active_leases, h.resident_samples, h.resident_bytes), (0, 0, 0), "consumer: {h:?}");
                emit("CONSUMED", handle.generation);
            }
        }
        // Lease a sample, wait for the parent's "release", then release the (by then stale) handle.
        "hold" => {
            let r = read_ref();
            let handle = get_verified(&store, &r);
            emit("LEASED", handle.generation);
            assert_eq!(read_line(), "release");
            store.release(&handle).expect("release of a stale handle");
            store.release(&handle).expect("double release");
            emit("RELEASED", handle.generation);
        }
        // Lease generation 1, then generation 2 of the same sample, then release both.
        "hold_two" => {
            let r1 = read_ref();
            let h1 = get_verified(&store, &r1);
            emit("LEASED", h1.generation);
            let r2 = read_ref();
            let h2 = get_verified(&store, &r2);
            emit("LEASED", h2.generation);
            assert_eq!(read_line(), "release");
            store.release(&h1).expect("release g1");
            store.release(&h2).expect("release g2");
            emit("RELEASED", h2.generation);
        }
        // Abort a sample this process never tracked.
        "abort" => {
            let r = read_ref();
            store.abort(&r.sample_id).expect("abort");
            assert!(!sample_file(&root, &store_id, &r).exists(), "abort left the file");
            emit("ABORTED", r.sample_id);
        }
        // Wait for "go", then put PRODUCED samples and print their refs.
        "produce" => {
            let prefix = child_env(PREFIX_ENV);
            assert_eq!(read_line(), "go");
            for i in 0..PRODUCED {
                let seed = 10_000 + if prefix == "p1" { 1000 } else { 0 } + i as u64;
                let r = store
                    .put(format!("{prefix}:task{i}"), &Sample::new(seed).tensors(), metadata(seed))
                    .expect("producer put");
                emit("REF", to_line(&r));
            }
        }
        other => panic!("unknown child role {other:?}"),
    }
}

// ------------------------------------------------------------------ the parent's side

/// A child process running one role, with a deadline on everything.
struct ChildProc {
    role: String,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    deadline: Instant,
}

impl ChildProc {
    fn spawn(role: &str, root: &Path, store_id: &str, prefix: &str) -> ChildProc {
        let exe = std::env::current_exe().expect("current_exe");
        let mut child = Command::new(exe)
            .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, role)
            .env(ROOT_ENV, root)
            .env(STORE_ENV, store_id)
            .env(PREFIX_ENV, prefix)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest may print "test two_process_child ... " just before our line.
                if let Some(at) = line.find(TAG)
                    && tx.send(line[at + TAG.len()..].to_owned()).is_err()
                {
                    break;
                }
            }
        });
        ChildProc {
            role: role.to_owned(),
            stdin: child.stdin.take(),
            child: Some(child),
            lines,
            deadline: Instant::now() + CHILD_DEADLINE,
        }
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").and_then(|()| stdin.flush()).expect("write to child stdin");
    }

    /// The next tagged line, which must carry `tag`; returns its payload.
    fn expect(&mut self, tag: &str) -> String {
        let left = self.deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(line) => {
                let (got, payload) = line.split_once(' ').unwrap_or((&line, ""));
                assert_eq!(got, tag, "child {} sent {line:?}", self.role);
                payload.to_owned()
            }
            Err(e) => {
                let out = self.kill_and_collect();
                panic!("child {} never sent {tag} ({e:?}); its output:\n{out}", self.role)
            }
        }
    }

    fn kill_and_collect(&mut self) -> String {
        let Some(mut child) = self.child.take() else { return String::new() };
        let _ = child.kill();
        child.wait_with_output().map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).unwrap_or_default()
    }

    /// Closes stdin, waits (with the deadline) for a successful exit, and returns the tagged
    /// lines the child printed after the last `expect`.
    fn finish(mut self) -> Vec<String> {
        drop(self.stdin.take());
        let child = self.child.take().expect("child running");
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let left = self.deadline.saturating_duration_since(Instant::now());
        let output = match rx.recv_timeout(left) {
            Ok(output) => output.expect("wait for child"),
            Err(_) => {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                panic!("child {} (pid {pid}) did not exit within {CHILD_DEADLINE:?}; killed", self.role);
            }
        };
        let mut rest = Vec::new();
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => rest.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => panic!("child {} stdout never closed", self.role),
            }
        }
        assert!(
            output.status.success(),
            "child {} failed ({}):\n{}",
            self.role,
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        rest
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        // Only reached with a live child when the test is already failing.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

const SID: &str = "run0:task0";

/// The scenario: A puts, B (another process over the same directory and store id) gets
/// every byte and releases; the file is gone and A's get of the same ref is a `KeyError`.
#[test]
fn consumer_process_release_frees_the_sample_for_the_producer() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store_id = "twoproc1";
    let a = open_dir(tmp.path(), store_id);
    let r = a.put(SID, &Sample::new(3).tensors(), metadata(3)).expect("put");
    let path = sample_file(tmp.path(), store_id, &r);
    assert!(path.exists(), "{} missing after put", path.display());

    let mut b = ChildProc::spawn("consume", tmp.path(), store_id, "");
    b.send(&to_line(&r));
    let consumed = b.expect("CONSUMED");
    assert_eq!(consumed, r.generation().expect("generation").to_string());
    b.finish();

    assert!(!path.exists(), "the sample file survived the consumer's release");
    let err = a.get(&r, None).expect_err("the producer's get after the consumer released must fail");
    assert!(err.is_not_available(), "expected a not-available (KeyError) error, got {err}");
    let mut buf = [0u8; SEQ * 8];
    let err = a.get_into(&r, &mut [("input_ids", &mut buf[..])]).expect_err("get_into too");
    assert!(err.is_not_available(), "{err}");
    // The failed get taught A that the sample is gone: nothing stays accounted or leased.
    assert_nothing_resident(&a);
    a.abort(&r.sample_id).expect("abort of a consumed sample is a no-op");
    assert_nothing_resident(&a);
    assert_eq!(files_left(tmp.path(), store_id), Vec::<String>::new());
}

/// One long-lived consumer process consumes successive generations of one sample (and another
/// sample) that the producer re-puts after each consumption: each generation is read exactly,
/// its file goes on release, and the producer ends with nothing resident.
#[test]
fn long_lived_consumer_consumes_successive_generations() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store_id = "twoproc6";
    let a = open_dir(tmp.path(), store_id);
    let mut b = ChildProc::spawn("consume_many", tmp.path(), store_id, "");
    let mut last = 0;
    for (round, sid) in [SID, SID, "run0:task1", SID].into_iter().enumerate() {
        let seed = 100 + round as u64;
        let r = a.put(sid, &Sample::new(seed).tensors(), metadata(seed)).expect("put");
        let generation = r.generation().expect("generation").get();
        assert!(generation > last, "generation {generation} after {last}");
        last = generation;
        b.send(&to_line(&r));
        assert_eq!(b.expect("CONSUMED"), generation.to_string());
        assert!(!sample_file(tmp.path(), store_id, &r).exists(), "round {round}: file survived");
        let err = a.get(&r, None).expect_err("consumed by the other process");
        assert!(err.is_not_available(), "{err}");
    }
    b.finish();
    assert_nothing_resident(&a);
    assert_eq!(files_left(tmp.path(), store_id), Vec::<String>::new());
}

/// B holds a lease on generation 1; A re-puts (generation 2); B then releases its stale
/// handle: generation 2 must survive, on disk and for A.
#[test]
fn stale_handle_released_in_another_process_spares_the_new_generation() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store_id = "twoproc2";
    let a = open_dir(tmp.path(), store_id);
    let r1 = a.put(SID, &Sample::new(1).tensors(), metadata(1)).expect("put g1");
    let mut b = ChildProc::spawn("hold", tmp.path(), store_id, "");
    b.send(&to_line(&r1));
    assert_eq!(b.expect("LEASED"), r1.generation().expect("gen").to_string());

    let r2 = a.put(SID, &Sample::new(2).tensors(), metadata(2)).expect("re-put g2");
    assert!(r2.generation() > r1.generation(), "{:?} vs {:?}", r2.generation(), r1.generation());
    let (path1, path2) = (sample_file(tmp.path(), store_id, &r1), sample_file(tmp.path(), store_id, &r2));
    assert!(!path1.exists(), "the re-put must remove generation 1's file");
    assert!(path2.exists());

    b.send("release");
    b.expect("RELEASED");
    b.finish();

    assert!(path2.exists(), "another process's stale release removed generation 2's file");
    let (tensors, handle) = a.get(&r2, None).expect("generation 2 must stay readable");
    verify(&tensors, 2).expect("generation 2's bytes");
    let err = a.get(&r1, None).expect_err("generation 1 is stale");
    assert!(err.is_not_available(), "{err}");
    a.release(&handle).expect("release");
    assert!(!path2.exists());
    assert_nothing_resident(&a);
    assert_eq!(files_left(tmp.path(), store_id), Vec::<String>::new());
}

/// B leases generation 1, A re-puts, B leases generation 2 too and releases both: B consumed
/// generation 2 (its last lease), so consume-once must free it, as it does when B releases
/// generation 1 before reading generation 2.
#[test]
fn consumer_holding_two_generations_frees_the_newest_on_release() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store_id = "twoproc3";
    let a = open_dir(tmp.path(), store_id);
    let r1 = a.put(SID, &Sample::new(1).tensors(), metadata(1)).expect("put g1");
    let mut b = ChildProc::spawn("hold_two", tmp.path(), store_id, "");
    b.send(&to_line(&r1));
    b.expect("LEASED");
    let r2 = a.put(SID, &Sample::new(2).tensors(), metadata(2)).expect("re-put g2");
    b.send(&to_line(&r2));
    b.expect("LEASED");
    b.send("release");
    b.expect("RELEASED");
    b.finish();
    let path2 = sample_file(tmp.path(), store_id, &r2);
    assert!(!path2.exists(), "the consumer released its only lease on generation 2 but the file is still there");
    let err = a.get(&r2, None).expect_err("consumed");
    assert!(err.is_not_available(), "{err}");
    assert_nothing_resident(&a);
}

/// B aborts a sample it never tracked (looked up on disk): the file goes, A's get fails.
#[test]
fn abort_in_another_process_frees_the_sample() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store_id = "twoproc4";
    let a = open_dir(tmp.path(), store_id);
    let r = a.put(SID, &Sample::new(4).tensors(), metadata(4)).expect("put");
    let mut b = ChildProc::spawn("abort", tmp.path(), store_id, "");
    b.send(&to_line(&r));
    assert_eq!(b.expect("ABORTED"), SID);
    b.finish();
    assert!(!sample_file(tmp.path(), store_id, &r).exists());
    let err = a.get(&r, None).expect_err("aborted elsewhere");
    assert!(err.is_not_available(), "{err}");
    assert_nothing_resident(&a);
}

/// Two producer processes and the parent put concurrently into one store: generations are all
/// distinct and increase within each process; the parent then consumes every sample (verifying
/// its bytes) and the directory ends empty.
#[test]
fn producers_in_two_processes_never_share_a_generation() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store_id = "twoproc5";
    let a = open_dir(tmp.path(), store_id);
    let mut producers: Vec<ChildProc> =
        ["p0", "p1"].iter().map(|p| ChildProc::spawn("produce", tmp.path(), store_id, p)).collect();
    for p in &mut producers {
        p.send("go");
    }
    let own: Vec<SampleRef> = (0..PRODUCED as u64)
        .map(|i| {
            let seed = 20_000 + i;
            a.put(format!("parent:task{i}"), &Sample::new(seed).tensors(), metadata(seed)).expect("parent put")
        })
        .collect();
    let mut per_process = vec![own];
    for p in producers {
        let refs: Vec<SampleRef> = p
            .finish()
            .iter()
            .map(|line| {
                let json = line.strip_prefix("REF ").unwrap_or_else(|| panic!("unexpected child line {line:?}"));
                sample_ref_from_str(json).expect("child ref")
            })
            .collect();
        assert_eq!(refs.len(), PRODUCED, "a producer printed {} refs", refs.len());
        per_process.push(refs);
    }

    let mut seen = HashSet::new();
    let mut max = 0;
    for (p, refs) in per_process.iter().enumerate() {
        let gens: Vec<u64> = refs.iter().map(|r| r.generation().expect("generation").get()).collect();
        assert!(gens.windows(2).all(|w| w[0] < w[1]), "process {p}'s generations do not increase: {gens:?}");
        for g in gens {
            assert!(seen.insert(g), "generation {g} was handed out twice across processes");
            max = max.max(g);
        }
    }
    assert_eq!(seen.len(), 3 * PRODUCED);
    let mark: u64 = std::fs::read_to_string(tmp.path().join(store_id).join(GENERATION_FILE))
        .expect("generation mark")
        .trim()
        .parse()
        .expect("generation mark is a number");
    assert!(mark >= max, "the generation mark {mark} is below a handed-out generation {max}");
    assert_eq!(files_left(tmp.path(), store_id).len(), 3 * PRODUCED, "one file per sample");

    // The parent consumes everything, including what the children wrote.
    for r in per_process.iter().flatten() {
        let (tensors, handle) = a.get(r, None).unwrap_or_else(|e| panic!("get {}: {e}", r.sample_id));
        verify(&tensors, seed_of(r)).unwrap_or_else(|e| panic!("{}: {e}", r.sample_id));
        a.release(&handle).expect("release");
        assert!(!sample_file(tmp.path(), store_id, r).exists(), "{} survived its release", r.sample_id);
    }
    assert_nothing_resident(&a);
    assert_eq!(files_left(tmp.path(), store_id), Vec::<String>::new());
}
