//! The client side: one connection to a `ferry serve` daemon (`ferry://host:port` over TCP, or
//! `ferry+unix:///path/to.sock` on the same node) with the store's calls. Every call is a request
//! and its reply; the daemon runs the lifecycle core, so every client of one daemon shares one
//! liveness index.
//!
//! Copies: `put` sends each tensor from the caller's buffer with vectored writes (no gathering);
//! `get_into` reads the payload straight from the socket into the caller's buffers; `get` reads
//! it into buffers from the client's output pool ([`Client::output_pool`], a
//! [`BufferPool`] as the lifecycle core's `get` uses): a buffer dropped by its last owner goes
//! back to the pool, so a warm process reuses pages instead of faulting fresh memory per read.
//!
//! A call is one round trip under the connection's lock, so a `Client` may be shared between
//! threads (their calls take turns). Batches of small calls ([`Client::get_into_many`],
//! [`Client::release_many`]) are pipelined: many requests in flight on the one connection, the
//! replies read in order, so a batch costs about one round trip, not one per sample. A broken
//! connection stays broken: every later call fails with an error that says to reconnect, and the
//! daemon has already released the leases this connection held.
//!
//! # Owned puts
//!
//! A client connected with [`Client::connect_owning`] (or [`Client::connect_owning_with`])
//! *owns* every sample it puts: its session is its one connection (a `Client` never opens a
//! second socket and never reconnects; pipelined batches and the shared-memory route use that
//! same connection), and when the session ends without the sample having been handed over with
//! [`Client::disown`] (the client is dropped, its process exits, crashes or is SIGKILLed, or the
//! connection breaks) the daemon aborts it, exactly as an `abort` would. So a producer that dies
//! leaves no orphaned samples behind. Disown what you publish *before* publishing it: a ref
//! another process may read must not name a sample that dies with this one. A connection that
//! breaks is a session that ended, even if the process lives on: its owned samples are freed,
//! and a new `Client` is a new session that owns nothing yet.

use crate::auth;
use crate::frame::{FrameHead, Header, Limits, Op, flags, read_head, write_head};
use crate::wire::{self, GetReply, Hello, Placement, RefReply, Route, WireTensor};
use ferry_core::{
    BufferPool, DType, Error, FeatureHandle, FeatureSpec, Generation, JsonMap, Result, SampleId, SampleRef, StoreId,
    TensorBuf, TensorView, ViewPlan, ViewSpec,
};
use ferry_shm::ArenaMap;
use ferry_store::{DrainPolicy, DrainReport, FeatureStoreApi, GcReport, Health, Secret};
use indexmap::IndexMap;
use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Idle bytes a client's output pool keeps for reuse (as a store's own output pool keeps).
pub const OUTPUT_POOL_BYTES: u64 = 1 << 30;

/// Sample-id bytes per `Disown` request.
const DISOWN_CHUNK_BYTES: usize = 16 << 10;

/// Most requests a pipelined batch keeps in flight.
pub const PIPELINE_WINDOW: usize = 32;

/// Most request-metadata bytes a pipelined batch keeps in flight (one request is always allowed):
/// well under a socket's buffer, so the client never blocks writing a request while the daemon
/// blocks writing a reply the client has not read yet.
pub const PIPELINE_WINDOW_BYTES: usize = 64 << 10;

/// One entry of [`Client::get_into_many`]: a ref and the caller's buffers for its features
/// (each exactly the feature's size).
#[derive(Debug)]
pub struct GetInto<'a> {
    /// The sample to read.
    pub r: &'a SampleRef,
    /// `(feature name, buffer)` pairs.
    pub dsts: Vec<(&'a str, &'a mut [u8])>,
}

/// Which route a client's bytes take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RoutePreference {
    /// The shared-memory arena when the daemon offers it (Unix socket), else the socket.
    #[default]
    Auto,
    /// The shared-memory arena, or fail to connect.
    Shm,
    /// Bytes in the socket stream, even where the arena is offered.
    Stream,
}

impl RoutePreference {
    /// Parses `auto`, `shm`, `tcp` or `stream`.
    pub fn parse(s: &str) -> Result<RoutePreference> {
        match s {
            "auto" => Ok(RoutePreference::Auto),
            "shm" => Ok(RoutePreference::Shm),
            "tcp" | "stream" | "unix" => Ok(RoutePreference::Stream),
            other => Err(Error::InvalidArgument(format!("route {other:?}: expected auto, shm or tcp"))),
        }
    }
}

/// How a client connects.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// The shared secret, if the daemon requires one.
    pub secret: Option<Secret>,
    /// The route to use.
    pub route: RoutePreference,
    /// Pre-fault the whole arena mapping at connect (copies then never page-fault; costs about
    /// 0.1 s per GiB once).
    pub prefault: bool,
}

impl ConnectOptions {
    /// Defaults, with the secret from `FERRY_AUTH_TOKEN` (or SpecForge's `DISAGG_AUTH_TOKEN`).
    pub fn from_env() -> ConnectOptions {
        ConnectOptions {
            secret: Secret::from_env("FERRY_AUTH_TOKEN").or_else(|| Secret::from_env("DISAGG_AUTH_TOKEN")),
            route: RoutePreference::Auto,
            prefault: true,
        }
    }
}

/// A connected stream of either kind.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

struct Conn {
    stream: Option<Stream>,
    next_id: u64,
}

/// A connection to a daemon.
pub struct Client {
    peer: String,
    hello: Hello,
    store_id: StoreId,
    limits: Limits,
    conn: Mutex<Conn>,
    /// The daemon's arena, mapped, when the shared-memory route is in use.
    arena: Option<ArenaMap>,
    /// The route stream bytes take (TCP or Unix).
    stream_route: Route,
    /// Whether this session owns its puts ([`Client::connect_owning`]).
    owns_puts: bool,
    /// Where `get` takes its output buffers from.
    output_pool: BufferPool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("peer", &self.peer).field("store_id", &self.hello.store_id).finish()
    }
}

/// Parses a daemon URI into a connected stream.
fn connect_stream(uri: &str) -> Result<Stream> {
    if let Some(path) = uri.strip_prefix("ferry+unix://") {
        let stream = UnixStream::connect(path).map_err(|e| {
            Error::io(
                format!("connecting to the ferry daemon at {path} (is `ferry serve --socket {path}` running?)"),
                &e,
            )
        })?;
        return Ok(Stream::Unix(stream));
    }
    if let Some(addr) = uri.strip_prefix("ferry://") {
        let addr = addr.trim_end_matches('/');
        let stream = TcpStream::connect(addr).map_err(|e| {
            Error::io(
                format!("connecting to the ferry daemon at {addr} (is `ferry serve --listen {addr}` running?)"),
                &e,
            )
        })?;
        let _ = stream.set_nodelay(true);
        return Ok(Stream::Tcp(stream));
    }
    Err(Error::InvalidArgument(format!(
        "{uri:?} is not a daemon URI: use ferry://host:port or ferry+unix:///path/to.sock"
    )))
}

impl Client {
    /// Connects with [`ConnectOptions::from_env`].
    pub fn connect(uri: &str) -> Result<Client> {
        Client::connect_with(uri, ConnectOptions::from_env())
    }

    /// Connects, authenticates (proving the secret without sending it, and checking the
    /// daemon's proof in turn) and, on the shared-memory route, maps the daemon's arena.
    pub fn connect_with(uri: &str, options: ConnectOptions) -> Result<Client> {
        Client::attach(uri, options, false)
    }

    /// [`Client::connect`] for a session that owns its puts: every sample this client puts is
    /// aborted by the daemon when the session ends, unless [`Client::disown`]ed first (see the
    /// module docs). A daemon that predates owned puts refuses to attach.
    pub fn connect_owning(uri: &str) -> Result<Client> {
        Client::connect_owning_with(uri, ConnectOptions::from_env())
    }

    /// [`Client::connect_with`] for a session that owns its puts ([`Client::connect_owning`]).
    pub fn connect_owning_with(uri: &str, options: ConnectOptions) -> Result<Client> {
        Client::attach(uri, options, true)
    }

    fn attach(uri: &str, options: ConnectOptions, owned_puts: bool) -> Result<Client> {
        let mut stream = connect_stream(uri)?;
        let limits = Limits::default();
        let head = read_head(&mut stream, &limits)?
            .ok_or_else(|| Error::io(format!("greeting from {uri}"), &io::ErrorKind::UnexpectedEof.into()))?;
        if head.header.op != Op::Hello {
            return Err(Error::Corrupt {
                what: format!("greeting from {uri}"),
                message: format!("expected Hello, got {:?}", head.header.op),
            });
        }
        let hello: Hello = wire::decode(&head.meta, "Hello")?;
        if hello.auth_required && options.secret.is_none() {
            return Err(Error::AuthFailed {
                context: format!("ferry daemon {uri} requires a shared secret and none was given"),
            });
        }
        let want_shm = match options.route {
            RoutePreference::Stream => false,
            RoutePreference::Auto => hello.shm,
            RoutePreference::Shm if hello.shm => true,
            RoutePreference::Shm => {
                return Err(Error::InvalidArgument(format!(
                    "the shared-memory route was required but {uri} does not offer it (connect with ferry+unix:// to a daemon with an arena)"
                )));
            }
        };
        let client_nonce = auth::nonce()?;
        let response = match &options.secret {
            Some(secret) if hello.auth_required => {
                Some(auth::client_response(secret.expose(), &hello.challenge, &client_nonce)?)
            }
            _ => None,
        };
        let request = wire::AuthRequest { response, client_nonce: client_nonce.clone(), want_shm, owned_puts };
        let meta = wire::encode(&request)?;
        let reply: wire::AuthReply = exchange(&mut stream, uri, &limits, Op::Auth, 0, &meta, &[], |head, _| {
            wire::decode(&head.meta, "Auth reply")
        })?
        .map_err(|e| match e {
            // A daemon that predates owned puts refuses the field it does not know.
            Error::Json { message, .. } if owned_puts && message.contains("owned_puts") => Error::InvalidArgument(
                format!("ferry daemon {uri} does not support owned puts (it is older than this client): {message}"),
            ),
            e => e,
        })?;
        if let (Some(secret), true) = (&options.secret, hello.auth_required) {
            let proven = match &reply.proof {
                Some(proof) => auth::verify_daemon(secret.expose(), &hello.challenge, &client_nonce, proof)?,
                None => false,
            };
            if !proven {
                return Err(Error::AuthFailed {
                    context: format!("ferry daemon {uri} could not prove it knows the shared secret"),
                });
            }
        }
        let arena = match (&reply.arena, &stream) {
            (Some(grant), Stream::Unix(unix)) => {
                let mut byte = [0u8; 1];
                let (_, fd) = ferry_shm::fdpass::recv_with_fd(unix, &mut byte)?;
                let fd = fd.ok_or_else(|| Error::Corrupt {
                    what: format!("arena grant from {uri}"),
                    message: "no descriptor came with it".into(),
                })?;
                Some(ArenaMap::map(fd, grant.capacity, options.prefault)?)
            }
            _ => None,
        };
        if options.route == RoutePreference::Shm && arena.is_none() {
            return Err(Error::InvalidArgument(format!(
                "{uri} did not grant its arena; the shared-memory route is unavailable"
            )));
        }
        let stream_route = if matches!(stream, Stream::Unix(_)) { Route::Unix } else { Route::Tcp };
        Ok(Client {
            peer: uri.to_owned(),
            store_id: StoreId::new(hello.store_id.clone()),
            hello,
            limits,
            conn: Mutex::new(Conn { stream: Some(stream), next_id: 1 }),
            arena,
            stream_route,
            owns_puts: owned_puts,
            output_pool: BufferPool::new(OUTPUT_POOL_BYTES),
        })
    }

    /// This client with `get` taking its output buffers from `pool` (for example one pool
    /// shared by several clients) instead of its own, which keeps up to
    /// [`OUTPUT_POOL_BYTES`] idle.
    #[must_use]
    pub fn with_output_pool(mut self, pool: BufferPool) -> Client {
        self.output_pool = pool;
        self
    }

    /// The pool `get` takes its output buffers from (its counters say how many reads reused
    /// warm memory).
    pub fn output_pool(&self) -> &BufferPool {
        &self.output_pool
    }

    /// Whether this session owns its puts ([`Client::connect_owning`]).
    pub fn owns_puts(&self) -> bool {
        self.owns_puts
    }

    /// The route this client's puts and gets take.
    pub fn route(&self) -> Route {
        if self.arena.is_some() { Route::Shm } else { self.stream_route }
    }

    /// The store the daemon serves.
    pub fn store_id(&self) -> &StoreId {
        &self.store_id
    }

    /// The URI this client connected to.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// One request and its reply. `on_reply` reads the reply's payload (if any) while the
    /// connection is still held; a reply it leaves unread is skipped. An I/O error breaks the
    /// connection for good.
    fn call<R>(
        &self,
        op: Op,
        meta: &[u8],
        payload: &[&[u8]],
        on_reply: impl FnOnce(&FrameHead, &mut dyn Read) -> Result<R>,
    ) -> Result<R> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let request_id = conn.next_id;
        conn.next_id += 1;
        let Some(stream) = conn.stream.as_mut() else {
            return Err(self.broken());
        };
        let outcome = exchange(stream, &self.peer, &self.limits, op, request_id, meta, payload, on_reply);
        match outcome {
            Ok(result) => result,
            Err(e) => {
                conn.stream = None;
                Err(e)
            }
        }
    }

    /// Sends `metas.len()` requests of one `op` without waiting for each reply: up to
    /// [`PIPELINE_WINDOW`] requests (and [`PIPELINE_WINDOW_BYTES`] of request metadata) are in
    /// flight at once, and replies are read in order as they arrive. The daemon serves a
    /// connection's requests in order, so this saves a round trip per request, which is most of
    /// the cost of a small get. Each request's own outcome is returned; the outer error means the
    /// connection broke (every request not yet answered then failed with it).
    fn call_pipelined<R>(
        &self,
        op: Op,
        metas: &[Vec<u8>],
        mut on_reply: impl FnMut(usize, &FrameHead, &mut dyn Read) -> Result<R>,
    ) -> Result<Vec<Result<R>>> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let first_id = conn.next_id;
        conn.next_id += metas.len() as u64;
        let Some(stream) = conn.stream.as_mut() else {
            return Err(self.broken());
        };
        let mut outcomes = Vec::with_capacity(metas.len());
        let (mut sent, mut in_flight_bytes) = (0usize, 0usize);
        let mut pump = |stream: &mut Stream| -> Result<()> {
            while outcomes.len() < metas.len() {
                while sent < metas.len()
                    && sent - outcomes.len() < PIPELINE_WINDOW
                    && (sent == outcomes.len() || in_flight_bytes + metas[sent].len() <= PIPELINE_WINDOW_BYTES)
                {
                    send_request(stream, op, first_id + sent as u64, &metas[sent], &[])?;
                    in_flight_bytes += metas[sent].len();
                    sent += 1;
                }
                let i = outcomes.len();
                let outcome =
                    receive_reply(stream, &self.peer, &self.limits, op, first_id + i as u64, |head, body| {
                        on_reply(i, head, body)
                    })?;
                in_flight_bytes -= metas[i].len();
                outcomes.push(outcome);
            }
            Ok(())
        };
        match pump(stream) {
            Ok(()) => Ok(outcomes),
            Err(e) => {
                conn.stream = None;
                Err(e)
            }
        }
    }

    fn broken(&self) -> Error {
        Error::Io {
            context: format!("ferry daemon {}", self.peer),
            kind: io::ErrorKind::NotConnected,
            message: "the connection broke earlier; connect again (the daemon released its leases)".into(),
        }
    }

    /// Puts a sample; returns its ref. A full store refuses at once.
    pub fn put(&self, sample_id: &str, tensors: &[(&str, TensorView<'_>)], metadata: JsonMap) -> Result<SampleRef> {
        self.put_inner(sample_id, tensors, metadata, None)
    }

    /// Puts a sample, waiting until `deadline` for room in the daemon's store (nothing is
    /// evicted); then fails naming the capacity and the residency.
    pub fn put_until(
        &self,
        sample_id: &str,
        tensors: &[(&str, TensorView<'_>)],
        metadata: JsonMap,
        deadline: Instant,
    ) -> Result<SampleRef> {
        self.put_inner(sample_id, tensors, metadata, Some(deadline))
    }

    fn put_inner(
        &self,
        sample_id: &str,
        tensors: &[(&str, TensorView<'_>)],
        metadata: JsonMap,
        deadline: Option<Instant>,
    ) -> Result<SampleRef> {
        let request = wire::PutRequest {
            sample_id: sample_id.to_owned(),
            metadata,
            tensors: tensors.iter().map(|(name, view)| WireTensor::of(name, view)).collect(),
            wait_ms: deadline
                .map(|d| u64::try_from(d.saturating_duration_since(Instant::now()).as_millis()).unwrap_or(u64::MAX)),
        };
        let meta = wire::encode(&request)?;
        let Some(arena) = &self.arena else {
            let payload: Vec<&[u8]> = tensors.iter().map(|(_, v)| v.bytes()).collect();
            let reply =
                self.call(Op::Put, &meta, &payload, |head, _| wire::decode::<RefReply>(&head.meta, "Put reply"))?;
            return Ok(reply.r#ref);
        };
        // Shared memory: reserve, write each tensor straight into its region, commit.
        let alloc = self.call(Op::PutAlloc, &meta, &[], |head, _| {
            wire::decode::<wire::PutAllocReply>(&head.meta, "PutAlloc reply")
        })?;
        let written = (|| {
            if alloc.placements.len() != tensors.len() {
                return Err(Error::Corrupt {
                    what: "PutAlloc reply".into(),
                    message: format!("{} placements for {} tensors", alloc.placements.len(), tensors.len()),
                });
            }
            for ((_, view), place) in tensors.iter().zip(&alloc.placements) {
                if place.len != view.bytes().len() as u64 {
                    return Err(corrupt_placement(place, view.bytes().len() as u64));
                }
                arena.write_at(place.offset, view.bytes())?;
            }
            Ok(())
        })();
        let commit = wire::PutCommitRequest { put_id: alloc.put_id, cancel: written.is_err() };
        let meta = wire::encode(&commit)?;
        let reply = self.call(Op::PutCommit, &meta, &[], |head, _| {
            if commit.cancel { Ok(None) } else { wire::decode::<RefReply>(&head.meta, "PutCommit reply").map(Some) }
        });
        written?;
        reply?.map(|r| r.r#ref).ok_or_else(|| Error::InvalidArgument("put cancelled".into()))
    }

    /// Checks each buffer against the ref's spec before asking: a lease taken and handed back
    /// would count as this client's consume-once release.
    fn check_buffers(r: &SampleRef, dsts: &[(&str, &mut [u8])], prefix: bool) -> Result<()> {
        for (name, dst) in dsts {
            if let Some(spec) = r.feature_specs.get(*name) {
                let need = spec.nbytes()?;
                let len = dst.len() as u64;
                if len > need || (len < need && !prefix) {
                    return Err(Error::InvalidArgument(format!(
                        "get_into: buffer for feature {name:?} of sample {} is {len} bytes; its spec needs {}{need}",
                        r.sample_id,
                        if prefix { "at most " } else { "" }
                    )));
                }
            }
        }
        Ok(())
    }

    /// Reads the named features straight into the caller's buffers (from the arena, or from
    /// the socket) and takes a read lease (release it with [`Client::release`]). Each buffer
    /// must be exactly the feature's size.
    pub fn get_into(&self, r: &SampleRef, dsts: &mut [(&str, &mut [u8])]) -> Result<FeatureHandle> {
        self.get_into_impl(r, dsts, false)
    }

    /// Like [`Client::get_into`], but each buffer may be shorter than its feature and receives
    /// its first bytes.
    pub fn get_prefix_into(&self, r: &SampleRef, dsts: &mut [(&str, &mut [u8])]) -> Result<FeatureHandle> {
        self.get_into_impl(r, dsts, true)
    }

    /// [`Client::get_into`] for many samples at once, pipelined (see the module docs): each
    /// entry's buffers receive its sample and its result is its lease (or why not). Use it to
    /// fetch many small samples, where a round trip per sample would dominate. The outer error
    /// means the connection broke; the daemon then released every lease this batch took.
    pub fn get_into_many(&self, batch: &mut [GetInto<'_>]) -> Result<Vec<Result<FeatureHandle>>> {
        let shm = self.arena.is_some();
        // Entries that fail the local buffer check are not sent (no lease to hand back).
        let mut checked: Vec<Option<Error>> = Vec::with_capacity(batch.len());
        let mut sent_index = Vec::with_capacity(batch.len());
        let mut metas = Vec::with_capacity(batch.len());
        for (i, entry) in batch.iter().enumerate() {
            match Self::check_buffers(entry.r, &entry.dsts, false) {
                Ok(()) => {
                    let names = entry.dsts.iter().map(|(n, _)| (*n).to_owned()).collect();
                    metas.push(wire::encode(&wire::GetRequest {
                        r#ref: entry.r.clone(),
                        names: Some(names),
                        shm,
                        views: None,
                    })?);
                    sent_index.push(i);
                    checked.push(None);
                }
                Err(e) => checked.push(Some(e)),
            }
        }
        let replies = self.call_pipelined(Op::Get, &metas, |k, head, stream| {
            let dsts = &mut batch[sent_index[k]].dsts;
            self.receive_get_into(head, stream, dsts, false, None)
        })?;
        let mut replies = replies.into_iter();
        let mut out = Vec::with_capacity(batch.len());
        let mut to_release = Vec::new();
        for failed in checked {
            out.push(match failed {
                Some(e) => Err(e),
                None => match replies.next() {
                    Some(Ok((reply, None))) => Ok(reply.handle),
                    Some(Ok((reply, Some(mismatch)))) => {
                        to_release.push(reply.handle);
                        Err(mismatch)
                    }
                    Some(Err(e)) => Err(e),
                    None => Err(Error::InvalidArgument("get_into_many: a reply went missing".into())),
                },
            });
        }
        // Leases taken for buffers that did not fit go back before the caller hears why.
        for result in self.release_many(&to_release)? {
            result?;
        }
        Ok(out)
    }

    /// [`Client::release`] for many handles at once, pipelined. Each handle's own outcome is
    /// returned; the outer error means the connection broke.
    pub fn release_many(&self, handles: &[FeatureHandle]) -> Result<Vec<Result<()>>> {
        let metas = handles
            .iter()
            .map(|handle| wire::encode(&wire::ReleaseRequest { handle: handle.clone() }))
            .collect::<Result<Vec<_>>>()?;
        self.call_pipelined(Op::Release, &metas, |_, _, _| Ok(()))
    }

    /// Reads a `Get` reply's tensors into `dsts` (from the arena, or from the stream). Returns
    /// the reply and, if the buffers did not fit the daemon's tensors, why (nothing was read).
    fn receive_get_into(
        &self,
        head: &FrameHead,
        stream: &mut dyn Read,
        dsts: &mut [(&str, &mut [u8])],
        prefix: bool,
        views: Option<&[ViewPlan]>,
    ) -> Result<(GetReply, Option<Error>)> {
        let reply: GetReply = wire::decode(&head.meta, "Get reply")?;
        let mut mismatch = check_destinations(&reply.tensors, dsts, prefix);
        if mismatch.is_none() {
            match (&reply.placements, &self.arena) {
                // The lease is ours from here: a placement that does not fit is reported as a
                // mismatch, so the caller releases the lease instead of leaking it.
                (Some(places), Some(_)) if places.len() != dsts.len() => {
                    mismatch = Some(Error::Corrupt {
                        what: "daemon Get reply".into(),
                        message: format!("{} placements for {} features", places.len(), dsts.len()),
                    });
                }
                (Some(places), Some(arena)) => {
                    let copied = dsts.iter_mut().zip(places).enumerate().try_for_each(|(i, ((_, dst), place))| {
                        match views.and_then(|v| v.get(i)) {
                            // The placement is the whole feature: copy the view's ranges.
                            Some(plan) => {
                                if plan.canonical_extent() > place.len {
                                    return Err(corrupt_placement(place, plan.canonical_extent()));
                                }
                                let run = usize::try_from(plan.run).unwrap_or(usize::MAX).max(1);
                                plan.ranges()
                                    .zip(dst.chunks_exact_mut(run))
                                    .try_for_each(|((offset, _), out)| arena.read_at(place.offset + offset, out))
                            }
                            None => {
                                let n = dst.len() as u64;
                                if n > place.len {
                                    return Err(corrupt_placement(place, n));
                                }
                                arena.read_at(place.offset, dst)
                            }
                        }
                    });
                    mismatch = copied.err();
                }
                _ => {
                    for ((_, dst), t) in dsts.iter_mut().zip(&reply.tensors) {
                        stream.read_exact(dst).map_err(|e| Error::io("reading a Get payload", &e))?;
                        // A prefix read leaves the rest of the feature in the stream.
                        let rest = t.nbytes()?.saturating_sub(dst.len() as u64);
                        io::copy(&mut (&mut *stream).take(rest), &mut io::sink())
                            .map_err(|e| Error::io("reading a Get payload", &e))?;
                    }
                }
            }
        }
        Ok((reply, mismatch))
    }

    fn get_into_impl(&self, r: &SampleRef, dsts: &mut [(&str, &mut [u8])], prefix: bool) -> Result<FeatureHandle> {
        Self::check_buffers(r, dsts, prefix)?;
        let names: Vec<String> = dsts.iter().map(|(n, _)| (*n).to_owned()).collect();
        let shm = self.arena.is_some();
        let request = wire::GetRequest { r#ref: r.clone(), names: Some(names), shm, views: None };
        let meta = wire::encode(&request)?;
        let (reply, mismatch) =
            self.call(Op::Get, &meta, &[], |head, stream| self.receive_get_into(head, stream, dsts, prefix, None))?;
        if let Some(mismatch) = mismatch {
            // The lease was taken; give it back before reporting the caller's mistake.
            self.release(&reply.handle)?;
            return Err(mismatch);
        }
        Ok(reply.handle)
    }

    /// Reads parts of features straight into the caller's buffers and takes a read lease
    /// (release it with [`Client::release`]): for each `(name, view, buffer)`, the view's dense
    /// row-major bytes, the buffer exactly the view's size. The daemon derives each view where
    /// the bytes are and ships only the view's bytes (over the shared-memory route the client
    /// copies only the view's ranges out of its mapping): a tensor-parallel rank fetching its
    /// shard of a weight moves `1/N` of it. Views are checked against the ref's specs first.
    pub fn get_views_into(&self, r: &SampleRef, dsts: &mut [(&str, ViewSpec, &mut [u8])]) -> Result<FeatureHandle> {
        let plans = dsts
            .iter()
            .map(|(name, view, dst)| {
                let plan = view.plan_feature(r, &r.feature_specs, name)?;
                if dst.len() as u64 != plan.nbytes {
                    return Err(Error::InvalidArgument(format!(
                        "get_views_into: buffer for view {} of feature {name:?} of sample {} is {} bytes; the view \
                         (shape {:?}) needs {}",
                        view.view_id(),
                        r.sample_id,
                        dst.len(),
                        plan.shape,
                        plan.nbytes
                    )));
                }
                Ok(plan)
            })
            .collect::<Result<Vec<_>>>()?;
        let names: Vec<String> = dsts.iter().map(|(n, _, _)| (*n).to_owned()).collect();
        if let Some(twice) = names.iter().enumerate().find_map(|(i, n)| names[..i].contains(n).then_some(n)) {
            return Err(Error::InvalidArgument(format!(
                "get_views_into: feature {twice:?} of sample {} is named twice; ask for one view of a feature per \
                 call (two shards of it: two calls, or one wider view)",
                r.sample_id
            )));
        }
        let views = dsts.iter().map(|(n, v, _)| ((*n).to_owned(), *v)).collect();
        let shm = self.arena.is_some();
        let request = wire::GetRequest { r#ref: r.clone(), names: Some(names), shm, views: Some(views) };
        let meta = wire::encode(&request)?;
        let mut plain: Vec<(&str, &mut [u8])> = dsts.iter_mut().map(|(n, _, d)| (*n, &mut **d)).collect();
        let (reply, mismatch) = self.call(Op::Get, &meta, &[], |head, stream| {
            self.receive_get_into(head, stream, &mut plain, false, Some(&plans))
        })?;
        if let Some(mismatch) = mismatch {
            self.release(&reply.handle)?;
            return Err(mismatch);
        }
        Ok(reply.handle)
    }

    /// [`Client::get_views_into`] into aligned buffers from the client's output pool, as owned
    /// tensors of the views' shapes.
    pub fn get_views(
        &self,
        r: &SampleRef,
        views: &[(&str, ViewSpec)],
    ) -> Result<(IndexMap<String, TensorBuf>, FeatureHandle)> {
        let mut parts = Vec::with_capacity(views.len());
        for (name, view) in views {
            let plan = view.plan_feature(r, &r.feature_specs, name)?;
            let dtype = r.feature_specs.get(*name).map(FeatureSpec::dtype).transpose()?.unwrap_or(DType::UInt8);
            let len = usize::try_from(plan.nbytes).map_err(|_| Error::InvalidArgument("view too large".into()))?;
            let buf = self.output_pool.try_take(len).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "cannot allocate {len} bytes for view {} of feature {name:?}: memory is exhausted",
                    view.view_id()
                ))
            })?;
            parts.push((*name, *view, dtype, plan.shape, buf));
        }
        let mut dsts: Vec<(&str, ViewSpec, &mut [u8])> =
            parts.iter_mut().map(|(n, v, _, _, buf)| (*n, *v, buf.as_mut_slice())).collect();
        let handle = self.get_views_into(r, &mut dsts)?;
        drop(dsts);
        let tensors = parts
            .into_iter()
            .map(|(name, _, dtype, shape, buf)| Ok((name.to_owned(), TensorBuf::new(dtype, shape, buf)?)))
            .collect::<Result<IndexMap<_, _>>>();
        match tensors {
            Ok(out) => Ok((out, handle)),
            Err(e) => {
                self.release(&handle)?;
                Err(e)
            }
        }
    }

    /// Reads a sample's features (all of the ref's, or `names`) into aligned buffers from the
    /// client's output pool ([`Client::output_pool`]; recycled when their last owner drops
    /// them) and takes a read lease.
    pub fn get(&self, r: &SampleRef, names: Option<&[&str]>) -> Result<(IndexMap<String, TensorBuf>, FeatureHandle)> {
        let shm = self.arena.is_some();
        let names = names.map(|n| n.iter().map(|s| (*s).to_owned()).collect());
        let meta = wire::encode(&wire::GetRequest { r#ref: r.clone(), names, shm, views: None })?;
        self.call(Op::Get, &meta, &[], |head, stream| {
            let reply: GetReply = wire::decode(&head.meta, "Get reply")?;
            let mut out = IndexMap::with_capacity(reply.tensors.len());
            for (i, t) in reply.tensors.iter().enumerate() {
                let need = t.nbytes()?;
                let len = usize::try_from(need).map_err(|_| Error::InvalidArgument("tensor too large".into()))?;
                let mut buf = self.output_pool.try_take(len).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "cannot allocate {len} bytes for feature {:?} of sample {} (shape {:?}): memory is exhausted",
                        t.name, r.sample_id, t.shape
                    ))
                })?;
                match (&reply.placements, &self.arena) {
                    (Some(places), Some(arena)) => {
                        let place = places.get(i).copied().unwrap_or(Placement { offset: 0, len: 0 });
                        if place.len != need {
                            return Err(corrupt_placement(&place, need));
                        }
                        arena.read_at(place.offset, buf.as_mut_slice())?;
                    }
                    _ => stream.read_exact(buf.as_mut_slice()).map_err(|e| Error::io("reading a Get payload", &e))?,
                }
                out.insert(t.name.clone(), TensorBuf::new(t.dtype()?, t.shape.clone(), buf)?);
            }
            Ok((out, reply.handle))
        })
    }

    /// Borrows a sample's features in place, in the daemon's shared-memory arena: zero copies.
    /// The views live as long as the returned [`BorrowedSample`], which holds the read lease
    /// (and the daemon's pin on the bytes: an abort refuses later reads but never reuses
    /// memory a borrowed view still shows). Only on the shared-memory route.
    pub fn get_borrowed(&self, r: &SampleRef, names: Option<&[&str]>) -> Result<BorrowedSample<'_>> {
        let Some(arena) = &self.arena else {
            return Err(Error::InvalidArgument(format!(
                "borrowed reads need the shared-memory route; {} uses {}",
                self.peer,
                self.stream_route.name()
            )));
        };
        let names = names.map(|n| n.iter().map(|s| (*s).to_owned()).collect());
        let meta = wire::encode(&wire::GetRequest { r#ref: r.clone(), names, shm: true, views: None })?;
        let reply = self.call(Op::Get, &meta, &[], |head, _| wire::decode::<GetReply>(&head.meta, "Get reply"))?;
        let parts = (|| {
            let places = reply.placements.as_ref().ok_or_else(|| Error::Corrupt {
                what: "Get reply".into(),
                message: "a shared-memory get came back without placements".into(),
            })?;
            let mut parts = Vec::with_capacity(reply.tensors.len());
            for (t, place) in reply.tensors.iter().zip(places) {
                let need = t.nbytes()?;
                if place.len != need {
                    return Err(corrupt_placement(place, need));
                }
                let len = usize::try_from(place.len).map_err(|_| corrupt_placement(place, need))?;
                parts.push((t.dtype()?, arena.slice(place.offset, len)?));
            }
            Ok(parts)
        })();
        match parts {
            Ok(parts) => Ok(BorrowedSample { client: self, handle: Some(reply.handle), tensors: reply.tensors, parts }),
            Err(e) => {
                let _ = self.release(&reply.handle);
                Err(e)
            }
        }
    }

    /// The mapped shared-memory arena as `(address, length)` in this process, on the
    /// shared-memory route (`None` otherwise): the range every [`Client::get_borrowed`] view
    /// lies in. For diagnostics and tests.
    pub fn shm_mapping(&self) -> Option<(usize, usize)> {
        let arena = self.arena.as_ref()?;
        let len = usize::try_from(arena.capacity()).ok()?;
        arena.slice(0, len).ok().map(|s| (s.as_ptr() as usize, s.len()))
    }

    /// Releases a read lease.
    pub fn release(&self, handle: &FeatureHandle) -> Result<()> {
        let meta = wire::encode(&wire::ReleaseRequest { handle: handle.clone() })?;
        self.call(Op::Release, &meta, &[], |_, _| Ok(()))
    }

    /// Frees a sample now, whoever holds leases on it: their reads are refused from now on.
    pub fn abort(&self, sample_id: &SampleId) -> Result<()> {
        let meta = wire::encode(&wire::AbortRequest { sample_id: sample_id.to_string() })?;
        self.call(Op::Abort, &meta, &[], |_, _| Ok(()))
    }

    /// Hands samples this session put over to the daemon: they then live until deleted
    /// (aborted, released, GC'd) like any other sample, whatever becomes of this client. Returns
    /// how many of them this session owned.
    ///
    /// Idempotent: an id the session does not own (never put by it, or disowned already) is no
    /// error while the sample exists. An id the daemon's store does not hold live (freed, or
    /// never put) is [`Error::NotFound`], naming it, after every other id was handled. A client
    /// that does not own its puts has nothing to hand over: it returns 0 at once without asking
    /// the daemon, and checks nothing. Many ids go as several pipelined requests.
    pub fn disown(&self, sample_ids: &[SampleId]) -> Result<u64> {
        if !self.owns_puts || sample_ids.is_empty() {
            return Ok(0);
        }
        let mut metas = Vec::new();
        let mut chunk: Vec<String> = Vec::new();
        let mut chunk_bytes = 0usize;
        for sid in sample_ids {
            // Each request's metadata stays far below `Limits::max_meta` and the pipeline's
            // byte window.
            if !chunk.is_empty() && chunk_bytes + sid.as_str().len() > DISOWN_CHUNK_BYTES {
                metas.push(wire::encode(&wire::DisownRequest { sample_ids: std::mem::take(&mut chunk) })?);
                chunk_bytes = 0;
            }
            chunk_bytes += sid.as_str().len() + 4;
            chunk.push(sid.to_string());
        }
        metas.push(wire::encode(&wire::DisownRequest { sample_ids: chunk })?);
        let outcomes = self.call_pipelined(Op::Disown, &metas, |_, head, _| {
            Ok(wire::decode::<wire::CountReply>(&head.meta, "Disown reply")?.count)
        })?;
        let mut count = 0;
        let mut first_error = None;
        for outcome in outcomes {
            match outcome {
                Ok(n) => count += n,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(count),
        }
    }

    /// Frees every sample of the store; returns how many.
    pub fn abort_all(&self) -> Result<u64> {
        self.call(Op::AbortAll, b"{}", &[], |head, _| {
            Ok(wire::decode::<wire::CountReply>(&head.meta, "AbortAll reply")?.count)
        })
    }

    /// The specs of a sample's features.
    pub fn describe(&self, r: &SampleRef) -> Result<IndexMap<String, FeatureSpec>> {
        // A ref's own specs describe it (the store answers exactly this for them, and every
        // read checks the stored sizes), so only a spec-less ref costs a round trip: a
        // loader planning a batch of daemon refs asks nothing of the daemon until it reads.
        if !r.feature_specs.is_empty() && r.scheme() != Some("file") {
            return Ok(r.feature_specs.clone());
        }
        let meta = wire::encode(&wire::GetRequest { r#ref: r.clone(), names: None, shm: false, views: None })?;
        self.call(Op::Describe, &meta, &[], |head, _| wire::decode(&head.meta, "Describe reply"))
    }

    /// The daemon store's health map.
    pub fn health(&self) -> Result<Health> {
        self.call(Op::Health, b"{}", &[], |head, _| wire::decode(&head.meta, "Health reply"))
    }

    /// Takes ownership of a sample another client published (so this store frees it).
    pub fn adopt(&self, r: &SampleRef) -> Result<()> {
        let meta = wire::encode(&wire::AdoptRequest { r#ref: r.clone() })?;
        self.call(Op::Adopt, &meta, &[], |_, _| Ok(()))
    }

    /// One max-hold GC sweep in the daemon.
    pub fn gc(&self) -> Result<GcReport> {
        self.call(Op::Gc, b"{}", &[], |head, _| wire::decode(&head.meta, "Gc reply"))
    }

    /// Drains the daemon's pending removals (all, or only `sample_ids`).
    pub fn drain_where(&self, sample_ids: Option<&[SampleId]>, policy: DrainPolicy) -> Result<DrainReport> {
        let request = wire::DrainRequest {
            sample_ids: sample_ids.map(|ids| ids.iter().map(ToString::to_string).collect()),
            max_attempts: policy.max_attempts,
            retry_interval_ms: u64::try_from(policy.retry_interval.as_millis()).unwrap_or(u64::MAX),
        };
        let meta = wire::encode(&request)?;
        self.call(Op::Drain, &meta, &[], |head, _| wire::decode(&head.meta, "Drain reply"))
    }

    /// Tracks an external capture attempt in the daemon.
    pub fn track_external_attempt(
        &self,
        sample_id: &SampleId,
        generation: Generation,
        feature_names: &[&str],
    ) -> Result<()> {
        let request = wire::TrackExternalRequest {
            sample_id: sample_id.to_string(),
            generation: generation.get(),
            feature_names: feature_names.iter().map(|n| (*n).to_owned()).collect(),
        };
        let meta = wire::encode(&request)?;
        self.call(Op::TrackExternal, &meta, &[], |_, _| Ok(()))
    }

    /// Frees the daemon's tracked external attempts; returns how many.
    pub fn discard_external_attempts(&self) -> Result<u64> {
        self.call(Op::DiscardExternal, b"{}", &[], |head, _| {
            Ok(wire::decode::<wire::CountReply>(&head.meta, "DiscardExternal reply")?.count)
        })
    }

    /// One empty round trip; returns its time.
    pub fn ping(&self) -> Result<Duration> {
        let start = Instant::now();
        self.call(Op::Ping, b"{}", &[], |_, _| Ok(()))?;
        Ok(start.elapsed())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // A polite goodbye; the daemon releases this connection's leases either way.
        let conn = self.conn.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(stream) = conn.stream.as_mut() {
            let header = Header { op: Op::Bye, flags: 0, request_id: conn.next_id, meta_len: 2, payload_len: 0 };
            let _ = write_head(stream, &header, b"{}", &[]);
        }
    }
}

/// Checks the reply's tensors against the caller's buffers, in order.
fn check_destinations(tensors: &[WireTensor], dsts: &[(&str, &mut [u8])], prefix: bool) -> Option<Error> {
    if tensors.len() != dsts.len() {
        return Some(Error::InvalidArgument(format!(
            "get_into asked for {} features, the daemon returned {}",
            dsts.len(),
            tensors.len()
        )));
    }
    for (t, (name, dst)) in tensors.iter().zip(dsts) {
        let need = match t.nbytes() {
            Ok(n) => n,
            Err(e) => return Some(e),
        };
        let len = dst.len() as u64;
        if t.name != *name || len > need || (len < need && !prefix) {
            return Some(Error::InvalidArgument(format!(
                "get_into: buffer for feature {name:?} is {len} bytes; the daemon's {:?} needs {need}",
                t.name
            )));
        }
    }
    None
}

fn corrupt_placement(place: &Placement, need: u64) -> Error {
    Error::Corrupt {
        what: "daemon Get reply".into(),
        message: format!("placement {}+{} cannot hold a {need}-byte tensor", place.offset, place.len),
    }
}

/// Features borrowed in place from the daemon's arena ([`Client::get_borrowed`]). Dropping it
/// releases the lease (as does [`BorrowedSample::release`], which reports errors).
pub struct BorrowedSample<'c> {
    client: &'c Client,
    handle: Option<FeatureHandle>,
    tensors: Vec<WireTensor>,
    /// Each tensor's dtype and bytes in the mapped arena.
    parts: Vec<(ferry_core::DType, &'c [u8])>,
}

impl std::fmt::Debug for BorrowedSample<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BorrowedSample").field("handle", &self.handle).field("features", &self.tensors.len()).finish()
    }
}

impl BorrowedSample<'_> {
    /// The borrowed tensors in request order. A view cannot outlive this value, so it can
    /// never show bytes after the lease is released.
    pub fn views(&self) -> Vec<(&str, TensorView<'_>)> {
        self.tensors
            .iter()
            .zip(&self.parts)
            .filter_map(|(t, (dtype, bytes))| {
                TensorView::new(*dtype, &t.shape, bytes).ok().map(|v| (t.name.as_str(), v))
            })
            .collect()
    }

    /// One borrowed tensor by feature name.
    pub fn view(&self, name: &str) -> Option<TensorView<'_>> {
        let i = self.tensors.iter().position(|t| t.name == name)?;
        let (dtype, bytes) = self.parts.get(i)?;
        TensorView::new(*dtype, &self.tensors[i].shape, bytes).ok()
    }

    /// The read lease.
    pub fn handle(&self) -> Option<&FeatureHandle> {
        self.handle.as_ref()
    }

    /// Releases the lease now.
    pub fn release(mut self) -> Result<()> {
        match self.handle.take() {
            Some(h) => self.client.release(&h),
            None => Ok(()),
        }
    }
}

impl Drop for BorrowedSample<'_> {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take()
            && let Err(e) = self.client.release(&h)
        {
            tracing::warn!(error = %e, "releasing a borrowed sample's lease");
        }
    }
}

impl FeatureStoreApi for Client {
    fn store_id(&self) -> &StoreId {
        Client::store_id(self)
    }
    fn put(&self, sample_id: &str, tensors: &[(&str, TensorView<'_>)], metadata: JsonMap) -> Result<SampleRef> {
        Client::put(self, sample_id, tensors, metadata)
    }
    fn put_until(
        &self,
        sample_id: &str,
        tensors: &[(&str, TensorView<'_>)],
        metadata: JsonMap,
        deadline: Instant,
    ) -> Result<SampleRef> {
        Client::put_until(self, sample_id, tensors, metadata, deadline)
    }
    fn get(&self, r: &SampleRef, names: Option<&[&str]>) -> Result<(IndexMap<String, TensorBuf>, FeatureHandle)> {
        Client::get(self, r, names)
    }
    fn get_into(&self, r: &SampleRef, dsts: &mut [(&str, &mut [u8])]) -> Result<FeatureHandle> {
        Client::get_into(self, r, dsts)
    }
    fn get_prefix_into(&self, r: &SampleRef, dsts: &mut [(&str, &mut [u8])]) -> Result<FeatureHandle> {
        Client::get_prefix_into(self, r, dsts)
    }
    fn describe(&self, r: &SampleRef) -> Result<IndexMap<String, FeatureSpec>> {
        Client::describe(self, r)
    }
    fn release(&self, handle: &FeatureHandle) -> Result<()> {
        Client::release(self, handle)
    }
    fn abort(&self, sample_id: &SampleId) -> Result<()> {
        Client::abort(self, sample_id)
    }
    fn abort_all(&self) -> Result<usize> {
        Client::abort_all(self).map(|n| usize::try_from(n).unwrap_or(usize::MAX))
    }
    fn adopt(&self, r: &SampleRef) -> Result<()> {
        Client::adopt(self, r)
    }
    fn track_external_attempt(
        &self,
        sample_id: &SampleId,
        generation: Generation,
        feature_names: &[&str],
    ) -> Result<()> {
        Client::track_external_attempt(self, sample_id, generation, feature_names)
    }
    fn discard_external_attempts(&self) -> Result<usize> {
        Client::discard_external_attempts(self).map(|n| usize::try_from(n).unwrap_or(usize::MAX))
    }
    fn gc(&self) -> Result<GcReport> {
        Client::gc(self)
    }
    fn drain(&self, policy: DrainPolicy) -> Result<DrainReport> {
        self.drain_where(None, policy)
    }
    fn drain_samples(&self, sample_ids: &[SampleId], policy: DrainPolicy) -> Result<DrainReport> {
        self.drain_where(Some(sample_ids), policy)
    }
    fn health(&self) -> Result<Health> {
        Client::health(self)
    }
    fn disown(&self, sample_ids: &[SampleId]) -> Result<()> {
        Client::disown(self, sample_ids).map(|_| ())
    }
}

/// A daemon client, shared as the trait object every store-generic API takes (a feature loader
/// reads through it exactly as through a store in this process).
impl From<Client> for std::sync::Arc<dyn FeatureStoreApi> {
    fn from(client: Client) -> Self {
        std::sync::Arc::new(client)
    }
}

/// Sends a request and reads its reply on `stream`. The outer `Result` is the connection's
/// (an error there breaks it); the inner one is the call's.
#[allow(clippy::too_many_arguments)]
fn exchange<R>(
    stream: &mut Stream,
    peer: &str,
    limits: &Limits,
    op: Op,
    request_id: u64,
    meta: &[u8],
    payload: &[&[u8]],
    on_reply: impl FnOnce(&FrameHead, &mut dyn Read) -> Result<R>,
) -> Result<Result<R>> {
    send_request(stream, op, request_id, meta, payload)?;
    receive_reply(stream, peer, limits, op, request_id, on_reply)
}

/// Writes one request frame.
fn send_request(stream: &mut Stream, op: Op, request_id: u64, meta: &[u8], payload: &[&[u8]]) -> Result<()> {
    let meta_len =
        u32::try_from(meta.len()).map_err(|_| Error::InvalidArgument("request metadata too large".into()))?;
    let payload_len = payload.iter().map(|p| p.len() as u64).sum();
    write_head(stream, &Header { op, flags: 0, request_id, meta_len, payload_len }, meta, payload)
}

/// Reads the reply to request `request_id`: the outer `Result` is the connection's (a failure
/// breaks it), the inner one the request's (an `ERROR` reply or `on_reply`'s error).
fn receive_reply<R>(
    stream: &mut Stream,
    peer: &str,
    limits: &Limits,
    op: Op,
    request_id: u64,
    on_reply: impl FnOnce(&FrameHead, &mut dyn Read) -> Result<R>,
) -> Result<Result<R>> {
    let head = read_head(stream, limits)?.ok_or_else(|| {
        Error::io(
            "reading a daemon reply",
            &io::Error::new(io::ErrorKind::UnexpectedEof, "the daemon closed the connection"),
        )
    })?;
    let h = head.header;
    if !h.has(flags::REPLY) || h.request_id != request_id || h.op != op {
        return Err(Error::Corrupt {
            what: "daemon reply".into(),
            message: format!("expected the reply to {op:?} #{request_id}, got {:?} #{}", h.op, h.request_id),
        });
    }
    let mut body = (&mut *stream).take(h.payload_len);
    let result = if h.has(flags::ERROR) {
        wire::decode::<wire::ErrorReply>(&head.meta, "error reply").map(|e| Err(e.into_error(peer)))
    } else {
        Ok(on_reply(&head, &mut body))
    };
    // Whatever the handler left unread (or an error reply's payload) keeps the stream framed.
    io::copy(&mut body, &mut io::sink()).map_err(|e| Error::io("reading a daemon reply", &e))?;
    if body.limit() != 0 {
        return Err(Error::io(
            "reading a daemon reply",
            &io::Error::new(io::ErrorKind::UnexpectedEof, "the daemon closed the connection inside a reply"),
        ));
    }
    result
}
