//! The daemon side: accept connections on TCP and/or a Unix socket and serve one
//! [`FeatureStore`] to every client, so every process on the node sees one liveness index
//! (generations, leases, tombstones). An abort issued by one client refuses every other
//! client's reads at once, a producer may exit after publishing, and the leases of a client that
//! disconnects (or is killed) are released by the daemon, as are (aborted) the samples a session
//! that owns its puts put and did not disown.
//!
//! Threading: one thread per connection, blocking I/O. Cross-thread wakeups cost about 90 µs on
//! the development VM (`design/CRATES.md`), more than a small request's whole round trip, so
//! a connection's requests are served on the thread that reads them.
//!
//! A request whose metadata is wrong gets an `ERROR` reply (its payload is skipped, so the
//! stream stays framed) and the connection goes on; a malformed frame (bad magic, version, op,
//! flags or length) closes that connection only.

mod conn;
mod http;
pub mod metrics;

use crate::frame::Limits;
use crate::wire::Route;
use conn::Connection;
use ferry_core::{Error, Result};
use ferry_shm::ArenaBackend;
use ferry_store::{FeatureStore, Secret};
use metrics::{ArenaGauge, Metrics};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Where and how a daemon listens.
#[derive(Clone)]
pub struct DaemonConfig {
    /// TCP address (`127.0.0.1:0` picks a free port).
    pub tcp: Option<SocketAddr>,
    /// Unix socket path (replaced if a stale socket file is there).
    pub unix: Option<PathBuf>,
    /// Frame bounds; `max_payload` should not exceed the store's budget.
    pub limits: Limits,
    /// The shared secret every connection must prove it knows; `None` admits anyone.
    pub secret: Option<Secret>,
    /// The shared-memory arena the store runs over, when it does (see [`arena_store`]): puts
    /// and gets then go straight between sockets or clients' mappings and the arena, and Unix
    /// socket clients may map it.
    pub arena: Option<Arc<ArenaBackend>>,
    /// Most read leases one connection may hold at once.
    pub max_leases_per_connection: usize,
    /// Most shared-memory reservations one connection may hold uncommitted.
    pub max_pending_puts_per_connection: usize,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig::new(None, None)
    }
}

impl std::fmt::Debug for DaemonConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonConfig")
            .field("tcp", &self.tcp)
            .field("unix", &self.unix)
            .field("limits", &self.limits)
            .field("auth_required", &self.secret.is_some())
            .field("arena", &self.arena.as_ref().map(|a| a.arena().capacity()))
            .finish_non_exhaustive()
    }
}

impl DaemonConfig {
    /// Listens on `tcp` and/or `unix` with default bounds, no secret and no arena.
    pub fn new(tcp: Option<SocketAddr>, unix: Option<PathBuf>) -> DaemonConfig {
        DaemonConfig {
            tcp,
            unix,
            limits: Limits::default(),
            secret: None,
            arena: None,
            max_leases_per_connection: 1 << 16,
            max_pending_puts_per_connection: 256,
        }
    }
}

/// Opens a store over a new shared-memory arena of `capacity` bytes (pre-faulted), with the
/// budget set to the capacity: what `ferry serve` runs. Pass the backend as
/// [`DaemonConfig::arena`].
pub fn arena_store(capacity: u64, mut options: ferry_store::StoreOptions) -> Result<(FeatureStore, Arc<ArenaBackend>)> {
    let arena = ferry_shm::Arena::create("ferry-arena", capacity, ferry_shm::ArenaOptions::default())?;
    let backend = Arc::new(ArenaBackend::new(arena));
    options.max_resident_bytes = Some(options.max_resident_bytes.map_or(capacity, |b| b.min(capacity)));
    let store = FeatureStore::open(Arc::clone(&backend), options)?;
    Ok((store, backend))
}

/// State every connection thread shares.
struct Shared {
    store: FeatureStore,
    limits: Limits,
    secret: Option<Secret>,
    arena: Option<Arc<ArenaBackend>>,
    max_leases: usize,
    max_pending_puts: usize,
    /// Staging buffers for put payloads when there is no arena (reused, so steady-state puts
    /// touch warm pages).
    staging: ferry_core::BufferPool,
    metrics: Metrics,
    stopping: AtomicBool,
    /// Open connections, to shut them down on stop.
    conns: Mutex<HashMap<u64, Box<dyn Fn() + Send>>>,
    next_conn: AtomicU64,
}

impl Shared {
    fn connections(&self) -> usize {
        self.conns.lock().map_or(0, |c| c.len())
    }

    fn render_metrics(&self) -> String {
        let arena = self.arena.as_ref().map(|a| {
            let s = a.arena().stats();
            ArenaGauge { capacity: s.capacity, used: s.used, largest_free: s.largest_free }
        });
        self.metrics.render(&self.store.health(), self.connections(), arena)
    }
}

/// A running daemon. Dropping it stops it.
pub struct DaemonHandle {
    shared: Arc<Shared>,
    tcp_addr: Option<SocketAddr>,
    unix_path: Option<PathBuf>,
    metrics_addr: Option<SocketAddr>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for DaemonHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonHandle").field("tcp", &self.tcp_addr).field("unix", &self.unix_path).finish()
    }
}

/// Starts serving `store`.
pub fn start(store: FeatureStore, config: DaemonConfig) -> Result<DaemonHandle> {
    if config.tcp.is_none() && config.unix.is_none() {
        return Err(Error::InvalidArgument("a daemon needs a TCP address or a Unix socket path".into()));
    }
    let shared = Arc::new(Shared {
        store,
        limits: config.limits,
        secret: config.secret,
        arena: config.arena,
        max_leases: config.max_leases_per_connection.max(1),
        max_pending_puts: config.max_pending_puts_per_connection.max(1),
        staging: ferry_core::BufferPool::new(1 << 30),
        metrics: Metrics::default(),
        stopping: AtomicBool::new(false),
        conns: Mutex::new(HashMap::new()),
        next_conn: AtomicU64::new(0),
    });
    let mut threads = Vec::new();
    let mut tcp_addr = None;
    if let Some(addr) = config.tcp {
        let listener = TcpListener::bind(addr).map_err(|e| Error::io(format!("listening on {addr}"), &e))?;
        let local = listener.local_addr().map_err(|e| Error::io("reading the listening address", &e))?;
        tcp_addr = Some(local);
        let shared = Arc::clone(&shared);
        threads.push(spawn("ferry-accept-tcp", move || accept_tcp(&shared, &listener))?);
    }
    let mut unix_path = None;
    if let Some(path) = config.unix {
        remove_stale_socket(&path)?;
        let listener =
            UnixListener::bind(&path).map_err(|e| Error::io(format!("listening on {}", path.display()), &e))?;
        unix_path = Some(path);
        let shared = Arc::clone(&shared);
        threads.push(spawn("ferry-accept-unix", move || accept_unix(&shared, &listener))?);
    }
    Ok(DaemonHandle { shared, tcp_addr, unix_path, metrics_addr: None, threads })
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new().name(name.into()).spawn(f).map_err(|e| Error::io(format!("starting {name}"), &e))
}

/// A socket file left by a daemon that died is replaced; a live daemon's socket is not.
fn remove_stale_socket(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    if UnixStream::connect(path).is_ok() {
        return Err(Error::InvalidArgument(format!(
            "{} is in use by a running daemon; stop it or choose another --socket",
            path.display()
        )));
    }
    std::fs::remove_file(path).map_err(|e| Error::io(format!("removing stale socket {}", path.display()), &e))
}

impl DaemonHandle {
    /// The TCP address it listens on.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// The Unix socket it listens on.
    pub fn unix_path(&self) -> Option<&Path> {
        self.unix_path.as_deref()
    }

    /// The store it serves.
    pub fn store(&self) -> &FeatureStore {
        &self.shared.store
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.shared.connections()
    }

    /// The daemon's counters.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// The Prometheus text exposition of every metric now.
    pub fn render_metrics(&self) -> String {
        self.shared.render_metrics()
    }

    /// Serves `GET /metrics` (Prometheus text) on `addr` until the daemon stops; returns the
    /// bound address.
    pub fn serve_metrics(&mut self, addr: SocketAddr) -> Result<SocketAddr> {
        let shared = Arc::clone(&self.shared);
        let (bound, thread) = http::serve(addr, move || shared.render_metrics(), {
            let shared = Arc::clone(&self.shared);
            move || shared.stopping.load(Ordering::SeqCst)
        })?;
        self.metrics_addr = Some(bound);
        self.threads.push(thread);
        Ok(bound)
    }

    /// The address `/metrics` is served on, if it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Stops accepting, closes every connection (their leases are released) and waits for the
    /// threads.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wake the accept loops with a connection each.
        if let Some(addr) = self.tcp_addr {
            let _ = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
        }
        if let Some(path) = &self.unix_path {
            let _ = UnixStream::connect(path);
        }
        if let Ok(conns) = self.shared.conns.lock() {
            for shutdown in conns.values() {
                shutdown();
            }
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(path) = &self.unix_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Drop for DaemonHandle {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop_inner();
        }
    }
}

fn accept_tcp(shared: &Arc<Shared>, listener: &TcpListener) {
    let mut conn_threads = Vec::new();
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = stream else { continue };
        // Small requests must not wait for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        let Ok(closer) = stream.try_clone() else { continue };
        let peer = stream.peer_addr().map_or_else(|_| "tcp peer".to_owned(), |a| a.to_string());
        let close = Box::new(move || {
            let _ = closer.shutdown(Shutdown::Both);
        });
        if let Some(t) = start_connection(shared, stream, None, Route::Tcp, peer, close) {
            conn_threads.push(t);
        }
    }
    for t in conn_threads {
        let _ = t.join();
    }
}

fn accept_unix(shared: &Arc<Shared>, listener: &UnixListener) {
    let mut conn_threads = Vec::new();
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = stream else { continue };
        let Ok(closer) = stream.try_clone() else { continue };
        let Ok(fd_channel) = stream.try_clone() else { continue };
        let close = Box::new(move || {
            let _ = closer.shutdown(Shutdown::Both);
        });
        if let Some(t) = start_connection(shared, stream, Some(fd_channel), Route::Unix, "unix peer".to_owned(), close)
        {
            conn_threads.push(t);
        }
    }
    for t in conn_threads {
        let _ = t.join();
    }
}

fn start_connection<S: Read + Write + Send + 'static>(
    shared: &Arc<Shared>,
    stream: S,
    fd_channel: Option<UnixStream>,
    transport: Route,
    peer: String,
    close: Box<dyn Fn() + Send>,
) -> Option<JoinHandle<()>> {
    let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut conns) = shared.conns.lock() {
        conns.insert(id, close);
    }
    shared.metrics.connection();
    let shared = Arc::clone(shared);
    let name = format!("ferry-conn-{id}");
    let started = std::thread::Builder::new().name(name).spawn(move || {
        let mut conn = Connection::new(&shared, stream, fd_channel, transport, peer);
        conn.serve();
        conn.close();
        if let Ok(mut conns) = shared.conns.lock() {
            conns.remove(&id);
        }
    });
    match started {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!(error = %e, "could not start a connection thread");
            None
        }
    }
}
