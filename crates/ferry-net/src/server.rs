//! The daemon side: accept connections on TCP and/or a Unix socket and serve one
//! [`FeatureStore`] to every client, so every process on the node sees one liveness index
//! (generations, leases, tombstones). An abort issued by one client refuses every other
//! client's reads at once, a producer may exit after publishing, and the leases of a client that
//! disconnects (or is killed) are released by the daemon.
//!
//! Threading: one thread per connection, blocking I/O. Cross-thread wakeups cost about 90 µs on
//! the development VM (`design/CRATES.md`), more than a small request's whole round trip, so
//! a connection's requests are served on the thread that reads them.
//!
//! A request whose metadata is wrong gets an `ERROR` reply (its payload is skipped, so the
//! stream stays framed) and the connection goes on; a malformed frame (bad magic, version, op,
//! flags or length) closes that connection only.

use crate::frame::{FrameHead, Header, Limits, Op, flags, read_head, write_head};
use crate::wire::{self, ErrorReply, GetReply, RefReply, WireTensor};
use ferry_core::{BufferPool, Error, FeatureHandle, Result, TensorView};
use ferry_store::FeatureStore;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Where and how a daemon listens.
#[derive(Debug, Clone, Default)]
pub struct DaemonConfig {
    /// TCP address (`127.0.0.1:0` picks a free port).
    pub tcp: Option<SocketAddr>,
    /// Unix socket path (replaced if a stale socket file is there).
    pub unix: Option<PathBuf>,
    /// Frame bounds; `max_payload` should not exceed the store's budget.
    pub limits: Limits,
}

/// State every connection thread shares.
struct Shared {
    store: FeatureStore,
    limits: Limits,
    /// Staging buffers for put payloads (reused, so steady-state puts touch warm pages).
    staging: BufferPool,
    stopping: AtomicBool,
    /// Open connections, to shut them down on stop.
    conns: Mutex<HashMap<u64, Box<dyn Fn() + Send>>>,
    next_conn: AtomicU64,
}

/// A running daemon. Dropping it stops it.
pub struct DaemonHandle {
    shared: Arc<Shared>,
    tcp_addr: Option<SocketAddr>,
    unix_path: Option<PathBuf>,
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
        staging: BufferPool::new(1 << 30),
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
    Ok(DaemonHandle { shared, tcp_addr, unix_path, threads })
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
        self.shared.conns.lock().map_or(0, |c| c.len())
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
        if let Some(t) = start_connection(shared, stream, peer, close) {
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
        let close = Box::new(move || {
            let _ = closer.shutdown(Shutdown::Both);
        });
        if let Some(t) = start_connection(shared, stream, "unix peer".to_owned(), close) {
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
    peer: String,
    close: Box<dyn Fn() + Send>,
) -> Option<JoinHandle<()>> {
    let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut conns) = shared.conns.lock() {
        conns.insert(id, close);
    }
    let shared = Arc::clone(shared);
    let name = format!("ferry-conn-{id}");
    let started = std::thread::Builder::new().name(name).spawn(move || {
        let mut conn = Connection { shared: &shared, stream, peer, leases: HashMap::new() };
        conn.serve();
        conn.release_all();
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

/// What a request handler tells the loop.
enum Next {
    Continue,
    Close,
}

struct Connection<'a, S> {
    shared: &'a Shared,
    stream: S,
    peer: String,
    /// Leases taken on this connection and not yet released, by token.
    leases: HashMap<String, FeatureHandle>,
}

impl<S: Read + Write> Connection<'_, S> {
    fn serve(&mut self) {
        let hello = wire::Hello {
            version: crate::frame::VERSION,
            store_id: self.shared.store.store_id().to_string(),
            max_payload: self.shared.limits.max_payload,
        };
        if let Err(e) = self.send(Op::Hello, 0, 0, &hello, &[]) {
            tracing::debug!(peer = %self.peer, error = %e, "could not greet the client");
            return;
        }
        loop {
            let head = match read_head(&mut self.stream, &self.shared.limits) {
                Ok(Some(head)) => head,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(peer = %self.peer, error = %e, "closing the connection");
                    return;
                }
            };
            match self.handle(&head) {
                Ok(Next::Continue) => {}
                Ok(Next::Close) => return,
                Err(e) => {
                    tracing::debug!(peer = %self.peer, error = %e, "connection lost");
                    return;
                }
            }
        }
    }

    /// Serves one request. `Err` only for a broken connection; store errors become `ERROR`
    /// replies.
    fn handle(&mut self, head: &FrameHead) -> Result<Next> {
        let h = &head.header;
        if h.has(flags::REPLY) {
            return Err(Error::InvalidArgument(format!("the client sent a reply ({:?})", h.op)));
        }
        let outcome = match h.op {
            Op::Put => return self.put(head),
            Op::Get => return self.get(head),
            Op::Release => self.release(head),
            Op::Abort => wire::decode::<wire::AbortRequest>(&head.meta, "Abort")
                .and_then(|req| self.shared.store.abort(&req.sample_id.into()))
                .and_then(|()| wire::encode(&serde_json::json!({}))),
            Op::AbortAll => {
                self.shared.store.abort_all().and_then(|count| wire::encode(&wire::CountReply { count: count as u64 }))
            }
            Op::Describe => wire::decode::<wire::GetRequest>(&head.meta, "Describe")
                .and_then(|req| self.shared.store.describe(&req.r#ref))
                .and_then(|specs| wire::encode(&specs)),
            Op::Health => wire::encode(&self.shared.store.health()),
            Op::Ping => Ok(b"{}".to_vec()),
            Op::Bye => {
                self.skip_payload(h)?;
                self.send_raw(Op::Bye, h.request_id, flags::REPLY, b"{}", &[])?;
                return Ok(Next::Close);
            }
            other => Err(Error::InvalidArgument(format!("op {other:?} is not served by this daemon"))),
        };
        self.skip_payload(h)?;
        match outcome {
            Ok(meta) => self.send_raw(h.op, h.request_id, flags::REPLY, &meta, &[])?,
            Err(e) => self.send_error(h, &e)?,
        }
        Ok(Next::Continue)
    }

    fn put(&mut self, head: &FrameHead) -> Result<Next> {
        let h = &head.header;
        let request = wire::decode::<wire::PutRequest>(&head.meta, "Put").and_then(|req| {
            let len = wire::payload_len(&req.tensors)?;
            if len != h.payload_len {
                return Err(Error::InvalidArgument(format!(
                    "Put of {}: the tensors need {len} payload bytes but the frame carries {}",
                    req.sample_id, h.payload_len
                )));
            }
            Ok(req)
        });
        let request = match request {
            Ok(r) => r,
            Err(e) => {
                self.skip_payload(h)?;
                self.send_error(h, &e)?;
                return Ok(Next::Continue);
            }
        };
        let len = usize::try_from(h.payload_len).map_err(|_| Error::InvalidArgument("payload too large".into()))?;
        let Some(mut buf) = self.shared.staging.try_take(len) else {
            self.skip_payload(h)?;
            let e = Error::InvalidArgument(format!("cannot stage a {len}-byte put: memory is exhausted"));
            self.send_error(h, &e)?;
            return Ok(Next::Continue);
        };
        // The payload goes from the socket straight into the staging buffer.
        self.read_payload(buf.as_mut_slice())?;
        let outcome = stage_views(&request.tensors, &buf).and_then(|views| {
            let wait = request.wait_ms.map(Duration::from_millis);
            match wait {
                Some(wait) => self.shared.store.put_until(
                    request.sample_id.as_str(),
                    &views,
                    request.metadata.clone(),
                    std::time::Instant::now() + wait,
                ),
                None => self.shared.store.put(request.sample_id.as_str(), &views, request.metadata.clone()),
            }
        });
        match outcome.and_then(|r| wire::encode(&RefReply { r#ref: r })) {
            Ok(meta) => self.send_raw(Op::Put, h.request_id, flags::REPLY, &meta, &[])?,
            Err(e) => self.send_error(h, &e)?,
        }
        Ok(Next::Continue)
    }

    fn get(&mut self, head: &FrameHead) -> Result<Next> {
        let h = &head.header;
        self.skip_payload(h)?;
        let outcome = wire::decode::<wire::GetRequest>(&head.meta, "Get").and_then(|req| {
            let names: Option<Vec<&str>> = req.names.as_ref().map(|n| n.iter().map(String::as_str).collect());
            self.shared.store.get(&req.r#ref, names.as_deref())
        });
        let (tensors, handle) = match outcome {
            Ok(ok) => ok,
            Err(e) => {
                self.send_error(h, &e)?;
                return Ok(Next::Continue);
            }
        };
        let reply = GetReply {
            handle: handle.clone(),
            tensors: tensors.iter().map(|(name, t)| WireTensor::of(name, &t.view())).collect(),
        };
        let meta = wire::encode(&reply)?;
        self.leases.insert(handle.lease_token.to_string(), handle.clone());
        let payload: Vec<&[u8]> = tensors.values().map(|t| t.bytes()).collect();
        if let Err(e) = self.send_raw(Op::Get, h.request_id, flags::REPLY, &meta, &payload) {
            // The client never got the lease: release it here.
            self.leases.remove(handle.lease_token.as_str());
            let _ = self.shared.store.release(&handle);
            return Err(e);
        }
        Ok(Next::Continue)
    }

    fn release(&mut self, head: &FrameHead) -> Result<Vec<u8>> {
        let req = wire::decode::<wire::ReleaseRequest>(&head.meta, "Release")?;
        self.shared.store.release(&req.handle)?;
        self.leases.remove(req.handle.lease_token.as_str());
        Ok(b"{}".to_vec())
    }

    /// Releases every lease this connection still holds (the client closed or died).
    fn release_all(&mut self) {
        for (_, handle) in self.leases.drain() {
            if let Err(e) = self.shared.store.release(&handle) {
                tracing::warn!(peer = %self.peer, error = %e, "releasing a disconnected client's lease");
            }
        }
    }

    fn read_payload(&mut self, dst: &mut [u8]) -> Result<()> {
        self.stream.read_exact(dst).map_err(|e| Error::io(format!("reading a payload from {}", self.peer), &e))
    }

    /// Reads and drops a payload the request did not use, keeping the stream framed.
    fn skip_payload(&mut self, h: &Header) -> Result<()> {
        if h.payload_len == 0 {
            return Ok(());
        }
        let copied = io::copy(&mut (&mut self.stream).take(h.payload_len), &mut io::sink())
            .map_err(|e| Error::io(format!("skipping a payload from {}", self.peer), &e))?;
        if copied != h.payload_len {
            return Err(Error::io(
                format!("skipping a payload from {}", self.peer),
                &io::Error::new(io::ErrorKind::UnexpectedEof, "the stream ended inside a payload"),
            ));
        }
        Ok(())
    }

    fn send<T: serde::Serialize>(
        &mut self,
        op: Op,
        request_id: u64,
        flags: u32,
        meta: &T,
        payload: &[&[u8]],
    ) -> Result<()> {
        let meta = wire::encode(meta)?;
        self.send_raw(op, request_id, flags, &meta, payload)
    }

    fn send_raw(&mut self, op: Op, request_id: u64, flags: u32, meta: &[u8], payload: &[&[u8]]) -> Result<()> {
        let meta_len =
            u32::try_from(meta.len()).map_err(|_| Error::InvalidArgument("reply metadata too large".into()))?;
        let payload_len = payload.iter().map(|p| p.len() as u64).sum();
        let header = Header { op, flags, request_id, meta_len, payload_len };
        write_head(&mut self.stream, &header, meta, payload)
    }

    fn send_error(&mut self, h: &Header, error: &Error) -> Result<()> {
        self.send(h.op, h.request_id, flags::REPLY | flags::ERROR, &ErrorReply::of(error), &[])
    }
}

/// Views over a staged payload, one per tensor in order.
fn stage_views<'b>(tensors: &'b [WireTensor], buf: &'b [u8]) -> Result<Vec<(&'b str, TensorView<'b>)>> {
    let mut offset = 0usize;
    let mut views = Vec::with_capacity(tensors.len());
    for t in tensors {
        let n = usize::try_from(t.nbytes()?).map_err(|_| Error::InvalidArgument("tensor too large".into()))?;
        let bytes = buf
            .get(offset..offset + n)
            .ok_or_else(|| Error::InvalidArgument(format!("tensor {:?} runs past the payload", t.name)))?;
        views.push((t.name.as_str(), TensorView::new(t.dtype()?, &t.shape, bytes)?));
        offset += n;
    }
    Ok(views)
}
