//! The store acceptance suite (`ferry-store/tests/suite`) against a live node daemon, over each
//! route: the same behaviours `ferry-store`'s `lifecycle.rs` runs in process, here through a
//! [`Client`] of a daemon started in this process (a tempdir Unix socket and `127.0.0.1:0`),
//! one daemon per test, stopped on drop.
//!
//! * `daemon_tcp::*` — daemon over `FaultyBackend(MemoryBackend)`, client over TCP.
//! * `daemon_unix::*` — the same backend, client over the Unix socket, bytes in the stream.
//! * `daemon_shm::*` — daemon over `FaultyBackend(ArenaBackend)` with `DaemonConfig::arena`,
//!   client over the Unix socket moving bytes through its mapping of the arena (puts and gets
//!   then bypass the wrapper; removals, probes and sizes still go through it).
//!
//! No behaviour is excluded for any kind; those whose semantics legitimately differ for a
//! daemon branch inside the suite (search it for `is_daemon` and `DaemonShm`). Also here: the
//! daemon closes the known gap `lifecycle.rs` keeps visible (a deferred removal is refused to
//! every client, not only to the one that aborted).
#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

#[path = "../../ferry-store/tests/suite/mod.rs"]
#[macro_use]
mod suite;

use ferry_core::{Error, Result};
use ferry_net::{Client, ConnectOptions, DaemonConfig, DaemonHandle, Route, RoutePreference};
use ferry_shm::{Arena, ArenaBackend, ArenaOptions};
use ferry_store::backend::{ByteBackend, ObjectKey, SampleKey};
use ferry_store::testing::{FaultyBackend, RemoveFault};
use ferry_store::{FeatureStore, FeatureStoreApi, MemoryBackend, Secret, StoreOptions};
use std::sync::Arc;
use suite::{Harness, Kind, Served, Stack, assert_unavailable, get_ok, put};

suite_tests!(daemon_tcp, DaemonTcp);
suite_tests!(daemon_unix, DaemonUnix);
suite_tests!(daemon_shm, DaemonShm);

/// The arena of `daemon_shm` daemons.
const ARENA: u64 = 16 << 20;

/// A daemon serving one test's store, and what its views need.
struct Daemon {
    /// Held only to be dropped first: that stops the daemon (closing every connection) before
    /// its socket dir goes.
    _handle: DaemonHandle,
    uri: String,
    route: RoutePreference,
    /// The route every view must end up on.
    expect: Route,
    mem: Option<Arc<MemoryBackend>>,
    arena: Option<Arc<ArenaBackend>>,
    _socket_dir: tempfile::TempDir,
}

impl Served for Daemon {
    fn connect(&self, secret: Option<Secret>) -> Result<Box<dyn FeatureStoreApi>> {
        let client = Client::connect_with(&self.uri, ConnectOptions { secret, route: self.route, prefault: false })?;
        assert_eq!(client.route(), self.expect, "{}", self.uri);
        Ok(Box::new(client))
    }

    fn truncate_object(&self, object: ObjectKey<'_>, keep: u64) {
        match (&self.mem, &self.arena) {
            (Some(mem), _) => mem.truncate_object(object, usize::try_from(keep).unwrap()).unwrap(),
            (None, Some(arena)) => arena.truncate_object(object, keep).unwrap(),
            (None, None) => unreachable!("every daemon kind has a memory backend or an arena"),
        }
    }
}

/// The suite's hook: opens a store with `options` over a `FaultyBackend` for `kind`, starts a
/// daemon serving it (requiring `secret` on every connection, if any) and returns the wrapper and
/// the daemon.
fn serve_daemon(kind: Kind, options: StoreOptions, secret: Option<Secret>) -> Stack {
    let socket_dir = tempfile::tempdir().unwrap();
    let (inner, mem, arena): (Arc<dyn ByteBackend>, _, _) = match kind {
        Kind::DaemonTcp | Kind::DaemonUnix => {
            let mem = Arc::new(MemoryBackend::default());
            (mem.clone(), Some(mem), None)
        }
        Kind::DaemonShm => {
            let arena = Arc::new(ArenaBackend::new(Arena::create("test", ARENA, ArenaOptions::default()).unwrap()));
            (arena.clone(), None, Some(arena))
        }
        Kind::Mem | Kind::Dir => unreachable!("the suite serves {kind:?} itself"),
    };
    let faults = Arc::new(FaultyBackend::new(inner));
    let store = FeatureStore::open(faults.clone(), options).unwrap();
    let mut config =
        DaemonConfig::new(Some("127.0.0.1:0".parse().unwrap()), Some(socket_dir.path().join("ferry.sock")));
    config.secret = secret;
    config.arena = arena.clone();
    let handle = ferry_net::start(store, config).unwrap();
    let unix = format!("ferry+unix://{}", handle.unix_path().unwrap().display());
    let (uri, route, expect) = match kind {
        Kind::DaemonTcp => (format!("ferry://{}", handle.tcp_addr().unwrap()), RoutePreference::Auto, Route::Tcp),
        Kind::DaemonUnix => (unix, RoutePreference::Stream, Route::Unix),
        _ => (unix, RoutePreference::Shm, Route::Shm),
    };
    let daemon = Daemon { _handle: handle, uri, route, expect, mem, arena, _socket_dir: socket_dir };
    Stack { faults, served: Box::new(daemon) }
}

/// `lifecycle.rs`'s `known_gap_deferred_removal_is_process_local`, closed: the daemon owns the
/// one liveness index, so an abort whose removal the backend deferred refuses every client's
/// reads, though the bytes linger in the backend.
fn deferred_removal_is_refused_to_every_client(kind: Kind) {
    let h = Harness::new(kind);
    h.faults().set_remove_fault(RemoveFault::Defer);
    let r = put(&h, "s0", 1);
    let consumer = h.second_instance();
    h.store.abort(&r.sample_id).unwrap();
    assert_unavailable(&*h.store, &r);
    let err = assert_unavailable(&*consumer, &r);
    assert!(matches!(err, Error::UseAfterFree { .. }), "{err}");
    let key = SampleKey { store_id: h.store.store_id(), sample_id: &r.sample_id, generation: r.generation().unwrap() };
    assert!(h.faults().inner().exists(key.object("hidden_state")).unwrap(), "the backend kept the bytes");
    // Another sample still flows between the two clients.
    let r2 = put(&h, "s1", 2);
    let handle = get_ok(&*consumer, &r2, 2);
    consumer.release(&handle).unwrap();
    assert_unavailable(&*h.store, &r2);
}

#[test]
fn daemon_tcp_deferred_removal_is_refused_to_every_client() {
    deferred_removal_is_refused_to_every_client(Kind::DaemonTcp);
}

#[test]
fn daemon_unix_deferred_removal_is_refused_to_every_client() {
    deferred_removal_is_refused_to_every_client(Kind::DaemonUnix);
}

#[test]
fn daemon_shm_deferred_removal_is_refused_to_every_client() {
    deferred_removal_is_refused_to_every_client(Kind::DaemonShm);
}
