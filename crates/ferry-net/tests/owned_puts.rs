//! Owner-scoped samples: a client connected with `Client::connect_owning` owns what it puts,
//! and the daemon aborts every sample the session still owns when it ends (dropped, killed,
//! aborted). Disowned samples, and every sample of a client that does not own its puts, live
//! on. A session's end frees only the generation it put, never a newer put of the same id.
//!
//! The process tests re-execute this test binary as the producer (`child_role` runs only when
//! `FERRY_OWNED_CHILD` is set), which is SIGKILLed by the test or aborts itself. The daemon
//! notices the end of a session asynchronously, so every wait polls with a deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use ferry_core::{Error, JsonMap, SampleId, SampleRef, TensorView};
use ferry_net::{Client, ConnectOptions, DaemonConfig, DaemonHandle, Route, RoutePreference};
use ferry_store::StoreOptions;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(30);

/// The arena size of test daemons.
const ARENA: u64 = 16 << 20;

struct Daemon {
    handle: DaemonHandle,
    arena: Arc<ferry_shm::ArenaBackend>,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// A daemon over a shared-memory arena, as `ferry serve` runs, on TCP and a Unix socket.
    fn start() -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions { store_id: Some("owned".into()), ..StoreOptions::default() };
        let (store, arena) = ferry_net::arena_store(ARENA, options).unwrap();
        let mut config = DaemonConfig::new(Some("127.0.0.1:0".parse().unwrap()), Some(dir.path().join("ferry.sock")));
        config.arena = Some(Arc::clone(&arena));
        Daemon { handle: ferry_net::start(store, config).unwrap(), arena, _dir: dir }
    }

    fn tcp(&self) -> String {
        format!("ferry://{}", self.handle.tcp_addr().unwrap())
    }

    fn unix(&self) -> String {
        format!("ferry+unix://{}", self.handle.unix_path().unwrap().display())
    }

    fn live(&self, sid: &str) -> bool {
        self.handle.store().live_generation(&SampleId::new(sid)).is_some()
    }

    fn resident_samples(&self) -> u64 {
        self.handle.store().health().resident_samples
    }

    fn arena_used(&self) -> u64 {
        self.arena.arena().stats().used
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A 64-byte sample whose bytes encode `seed`.
fn bytes_of(seed: u8) -> Vec<i64> {
    (0..8).map(|i| i64::from(seed) * 100 + i).collect()
}

fn put(client: &Client, sid: &str, seed: u8) -> SampleRef {
    let data = bytes_of(seed);
    client.put(sid, &[("input_ids", TensorView::from_elements(&[8], &data).unwrap())], JsonMap::new()).unwrap()
}

fn ids(names: &[&str]) -> Vec<SampleId> {
    names.iter().map(|n| SampleId::new(*n)).collect()
}

fn connect(uri: &str, route: RoutePreference, owning: bool) -> Client {
    let options = ConnectOptions { route, ..ConnectOptions::default() };
    let client =
        if owning { Client::connect_owning_with(uri, options) } else { Client::connect_with(uri, options) }.unwrap();
    assert_eq!(client.owns_puts(), owning);
    client
}

/// Over each route: the owning session's undisowned puts go when it is dropped; its disowned
/// puts and a non-owning client's puts stay and read back intact.
#[test]
fn owned_puts_are_freed_when_the_session_ends_and_disowned_ones_survive() {
    let daemon = Daemon::start();
    for (uri, route, expect) in [
        (daemon.tcp(), RoutePreference::Stream, Route::Tcp),
        (daemon.unix(), RoutePreference::Stream, Route::Unix),
        (daemon.unix(), RoutePreference::Shm, Route::Shm),
    ] {
        let name = |s: &str| format!("{}-{s}", expect.name());
        let owner = connect(&uri, route, true);
        assert_eq!(owner.route(), expect);
        let plain = connect(&uri, route, false);
        for (i, s) in ["kept-0", "kept-1", "orphan-0", "orphan-1"].iter().enumerate() {
            put(&owner, &name(s), i as u8);
        }
        let plain_ref = put(&plain, &name("plain"), 9);
        let kept = ids(&[&name("kept-0"), &name("kept-1")]);
        assert_eq!(owner.disown(&kept).unwrap(), 2);
        assert_eq!(owner.disown(&kept).unwrap(), 0, "idempotent: already the daemon's");
        // A sample another client put exists: disowning it is no error, and changes nothing.
        assert_eq!(owner.disown(&ids(&[&name("plain")])).unwrap(), 0);
        // A client that does not own its puts has nothing to hand over (and asks nothing).
        assert_eq!(plain.disown(&ids(&[&name("plain"), "never-put"])).unwrap(), 0);
        drop(owner);
        wait_until("the ended session's samples to be freed", || {
            !daemon.live(&name("orphan-0")) && !daemon.live(&name("orphan-1"))
        });
        for s in ["kept-0", "kept-1", "plain"] {
            assert!(daemon.live(&name(s)), "{s} over {expect:?}");
        }
        let reader = connect(&uri, route, false);
        let mut got = vec![0u8; 64];
        let handle = reader.get_into(&plain_ref, &mut [("input_ids", &mut got[..])]).unwrap();
        assert_eq!(got, bytes_of(9).iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>());
        reader.release(&handle).unwrap();
        plain.abort_all().unwrap();
    }
    assert_eq!(daemon.handle.metrics().orphaned_samples_freed(), 6, "two per route");
    assert!(daemon.handle.render_metrics().contains("ferry_orphaned_samples_freed_total 6\n"));
    assert_eq!(daemon.resident_samples(), 0);
    assert_eq!(daemon.arena_used(), 0);
}

/// An id the store does not hold is `NotFound` (Python `KeyError`), after every other id of the
/// call (across several requests) was disowned; the session's own abort of a sample it owns is
/// no orphan.
#[test]
fn disowning_an_unknown_id_is_not_found_and_the_rest_still_go() {
    let daemon = Daemon::start();
    let owner = Client::connect_owning(&daemon.tcp()).unwrap();
    for i in 0..3 {
        put(&owner, &format!("s{i}"), i);
    }
    put(&owner, "aborted", 7);
    owner.abort(&SampleId::new("aborted")).unwrap();
    // Thousands of ids go as several pipelined requests; the unknown ones come first and last.
    let mut batch: Vec<SampleId> = (0..2000).map(|i| SampleId::new(format!("unknown-{i:06}"))).collect();
    batch.extend(ids(&["s0", "s1", "s2"]));
    batch.push(SampleId::new("unknown-last"));
    let err = owner.disown(&batch).unwrap_err();
    assert!(matches!(&err, Error::NotFound { what } if what.contains("unknown-000000")), "{err}");
    assert_eq!(err.python_exception(), "KeyError");
    let err = owner.disown(&ids(&["aborted"])).unwrap_err();
    assert!(matches!(&err, Error::NotFound { what } if what.contains("aborted")), "{err}");
    drop(owner);
    wait_until("the session to end", || daemon.handle.connections() == 0);
    assert!((0..3).all(|i| daemon.live(&format!("s{i}"))), "disowned despite the unknown ids");
    assert_eq!(daemon.handle.metrics().orphaned_samples_freed(), 0);
    assert_eq!(daemon.resident_samples(), 3);
}

/// The end of a session frees the generation it put, never a newer put of the same id by
/// another client (which superseded it).
#[test]
fn a_session_end_never_frees_a_newer_put_of_the_same_id() {
    let daemon = Daemon::start();
    let owner = Client::connect_owning(&daemon.unix()).unwrap();
    let other = Client::connect(&daemon.tcp()).unwrap();
    let first = put(&owner, "s0", 1);
    let newer = put(&other, "s0", 2);
    assert!(newer.generation() > first.generation());
    drop(owner);
    wait_until("the session to end", || daemon.handle.connections() == 1);
    assert_eq!(daemon.handle.store().live_generation(&SampleId::new("s0")), newer.generation());
    assert_eq!(daemon.handle.metrics().orphaned_samples_freed(), 0);
    let (tensors, handle) = other.get(&newer, None).unwrap();
    assert_eq!(tensors["input_ids"].bytes(), bytes_of(2).iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>());
    other.release(&handle).unwrap();
}

// ---------------------------------------------------------------------- processes

/// The child side of the process tests (a no-op in a normal test run): connects owning, puts
/// `FERRY_OWNED_N` samples `c-<i>`, disowns the first `FERRY_OWNED_KEEP`, prints `READY`, then
/// waits to be killed (`wait`) or aborts itself (`abort`). The `READY` line carries its route
/// and the refs it disowned.
#[test]
fn child_role() {
    let Ok(role) = std::env::var("FERRY_OWNED_CHILD") else { return };
    let uri = std::env::var("FERRY_OWNED_URI").unwrap();
    let n: u8 = std::env::var("FERRY_OWNED_N").unwrap().parse().unwrap();
    let keep: u8 = std::env::var("FERRY_OWNED_KEEP").unwrap().parse().unwrap();
    let client = Client::connect_owning(&uri).unwrap();
    let refs: Vec<SampleRef> = (0..n).map(|i| put(&client, &format!("c-{i}"), i)).collect();
    let kept = &refs[..usize::from(keep)];
    let kept_ids: Vec<SampleId> = kept.iter().map(|r| r.sample_id.clone()).collect();
    assert_eq!(client.disown(&kept_ids).unwrap(), u64::from(keep));
    println!("\nREADY {} {}", client.route().name(), serde_json::to_string(kept).unwrap());
    match role.as_str() {
        "wait" => {
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
            panic!("the child was meant to be killed");
        }
        "abort" => std::process::abort(),
        other => panic!("unknown child role {other}"),
    }
}

fn spawn_child(role: &str, uri: &str, n: u8, keep: u8) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_role", "--nocapture", "--test-threads=1"])
        .env("FERRY_OWNED_CHILD", role)
        .env("FERRY_OWNED_URI", uri)
        .env("FERRY_OWNED_N", n.to_string())
        .env("FERRY_OWNED_KEEP", keep.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Reads the child's stdout until a line containing `want`; returns the rest of that line.
fn expect_line(child: &mut Child, want: &str) -> String {
    let mut reader = BufReader::new(child.stdout.as_mut().unwrap());
    let mut line = String::new();
    let mut seen = String::new();
    loop {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "child ended before printing {want}; it printed: {seen}");
        seen.push_str(&line);
        if let Some(at) = line.find(want) {
            return line[at + want.len()..].trim().to_owned();
        }
    }
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(start.elapsed() < DEADLINE, "child did not exit");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A producer process dies (`role`) holding 6 samples, 2 of them disowned: the daemon ends up
/// holding exactly those 2, intact, and its arena holds nothing else.
fn a_dead_producer_leaves_exactly_its_disowned_samples(role: &str, uri: &str, route: &str) {
    let daemon = Daemon::start();
    let uri = if uri == "unix" { daemon.unix() } else { daemon.tcp() };
    let mut child = spawn_child(role, &uri, 6, 2);
    let ready = expect_line(&mut child, "READY");
    let (got_route, kept) = ready.split_once(' ').unwrap();
    assert_eq!(got_route, route);
    let kept: Vec<SampleRef> = serde_json::from_str(kept).unwrap();
    assert_eq!(daemon.resident_samples(), 6);
    if role == "wait" {
        child.kill().unwrap(); // SIGKILL: no goodbye, no destructor
    }
    let status = wait_exit(&mut child);
    assert!(!status.success(), "the child died: {status:?}");
    wait_until("the dead producer's owned samples to be freed", || daemon.resident_samples() == 2);
    let live: Vec<String> = (0..6).map(|i| format!("c-{i}")).filter(|s| daemon.live(s)).collect();
    assert_eq!(live, ["c-0", "c-1"], "exactly the disowned ones");
    assert_eq!(daemon.handle.metrics().orphaned_samples_freed(), 4);
    let reader = Client::connect(&daemon.tcp()).unwrap();
    for (seed, r) in kept.iter().enumerate() {
        let (tensors, handle) = reader.get(r, None).unwrap();
        let want: Vec<u8> = bytes_of(seed as u8).iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(tensors["input_ids"].bytes(), want, "{} intact", r.sample_id);
        reader.release(&handle).unwrap();
    }
    reader.abort_all().unwrap();
    assert_eq!(daemon.arena_used(), 0, "nothing of the dead producer is left in the arena");
}

#[test]
fn a_sigkilled_producer_leaves_exactly_its_disowned_samples_over_shared_memory() {
    a_dead_producer_leaves_exactly_its_disowned_samples("wait", "unix", "shm");
}

#[test]
fn an_aborting_producer_leaves_exactly_its_disowned_samples_over_tcp() {
    a_dead_producer_leaves_exactly_its_disowned_samples("abort", "tcp", "tcp");
}

/// Wire compatibility: a client that does not own its puts sends exactly the `Auth` an older
/// client sent (so it attaches to an older daemon), and a daemon reads an older client's `Auth`
/// as a session that owns nothing.
#[test]
fn auth_carries_owned_puts_only_when_asked() {
    use ferry_net::wire::{AuthRequest, decode, encode};
    let plain = AuthRequest { response: None, client_nonce: "00".into(), want_shm: true, owned_puts: false };
    assert_eq!(
        String::from_utf8(encode(&plain).unwrap()).unwrap(),
        r#"{"response":null,"client_nonce":"00","want_shm":true}"#
    );
    let owning = AuthRequest { owned_puts: true, ..plain.clone() };
    assert!(String::from_utf8(encode(&owning).unwrap()).unwrap().contains(r#""owned_puts":true"#));
    let older: AuthRequest = decode(br#"{"client_nonce":"00","want_shm":true}"#, "Auth").unwrap();
    assert_eq!(older, plain);
}
