//! The client side: one connection to a `ferry serve` daemon (`ferry://host:port` over TCP, or
//! `ferry+unix:///path/to.sock` on the same node) with the store's calls. Every call is a request
//! and its reply; the daemon runs the lifecycle core, so every client of one daemon shares one
//! liveness index.
//!
//! Copies: `put` sends each tensor from the caller's buffer with vectored writes (no gathering);
//! `get_into` reads the payload straight from the socket into the caller's buffers.
//!
//! A call is one round trip under the connection's lock, so a `Client` may be shared between
//! threads (their calls take turns). A broken connection stays broken: every later call fails
//! with an error that says to reconnect, and the daemon has already released the leases this
//! connection held.

use crate::frame::{FrameHead, Header, Limits, Op, flags, read_head, write_head};
use crate::wire::{self, GetReply, Hello, RefReply, WireTensor};
use ferry_core::{
    AlignedBuf, Error, FeatureHandle, FeatureSpec, JsonMap, Result, SampleId, SampleRef, TensorBuf, TensorView,
};
use indexmap::IndexMap;
use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
    limits: Limits,
    conn: Mutex<Conn>,
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
    /// Connects and reads the daemon's greeting.
    pub fn connect(uri: &str) -> Result<Client> {
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
        Ok(Client { peer: uri.to_owned(), hello, limits, conn: Mutex::new(Conn { stream: Some(stream), next_id: 1 }) })
    }

    /// The store the daemon serves.
    pub fn store_id(&self) -> &str {
        &self.hello.store_id
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

    fn broken(&self) -> Error {
        Error::Io {
            context: format!("ferry daemon {}", self.peer),
            kind: io::ErrorKind::NotConnected,
            message: "the connection broke earlier; connect again (the daemon released its leases)".into(),
        }
    }

    /// Puts a sample; returns its ref.
    pub fn put(&self, sample_id: &str, tensors: &[(&str, TensorView<'_>)], metadata: JsonMap) -> Result<SampleRef> {
        self.put_inner(sample_id, tensors, metadata, None)
    }

    /// Puts a sample, waiting up to `wait` for room in the daemon's budget.
    pub fn put_until(
        &self,
        sample_id: &str,
        tensors: &[(&str, TensorView<'_>)],
        metadata: JsonMap,
        wait: Duration,
    ) -> Result<SampleRef> {
        self.put_inner(sample_id, tensors, metadata, Some(wait))
    }

    fn put_inner(
        &self,
        sample_id: &str,
        tensors: &[(&str, TensorView<'_>)],
        metadata: JsonMap,
        wait: Option<Duration>,
    ) -> Result<SampleRef> {
        let request = wire::PutRequest {
            sample_id: sample_id.to_owned(),
            metadata,
            tensors: tensors.iter().map(|(name, view)| WireTensor::of(name, view)).collect(),
            wait_ms: wait.map(|w| u64::try_from(w.as_millis()).unwrap_or(u64::MAX)),
        };
        let meta = wire::encode(&request)?;
        let payload: Vec<&[u8]> = tensors.iter().map(|(_, v)| v.bytes()).collect();
        let reply = self.call(Op::Put, &meta, &payload, |head, _| wire::decode::<RefReply>(&head.meta, "Put reply"))?;
        Ok(reply.r#ref)
    }

    /// Reads the named features straight from the socket into the caller's buffers and takes a
    /// read lease (release it with [`Client::release`]). Each buffer must be exactly the
    /// feature's size.
    pub fn get_into(&self, r: &SampleRef, dsts: &mut [(&str, &mut [u8])]) -> Result<FeatureHandle> {
        // Checked against the ref's specs before asking: a lease taken and handed back would
        // count as this client's consume-once release.
        for (name, dst) in dsts.iter() {
            if let Some(spec) = r.feature_specs.get(*name) {
                let need = spec.nbytes()?;
                if need != dst.len() as u64 {
                    return Err(Error::InvalidArgument(format!(
                        "get_into: buffer for feature {name:?} of sample {} is {} bytes; its spec needs {need}",
                        r.sample_id,
                        dst.len()
                    )));
                }
            }
        }
        let request =
            wire::GetRequest { r#ref: r.clone(), names: Some(dsts.iter().map(|(n, _)| (*n).to_owned()).collect()) };
        let meta = wire::encode(&request)?;
        let (reply, mismatch) = self.call(Op::Get, &meta, &[], |head, stream| {
            let reply: GetReply = wire::decode(&head.meta, "Get reply")?;
            let mismatch = check_destinations(&reply.tensors, dsts);
            if mismatch.is_none() {
                for (_, dst) in dsts.iter_mut() {
                    stream.read_exact(dst).map_err(|e| Error::io("reading a Get payload", &e))?;
                }
            }
            Ok((reply, mismatch))
        })?;
        if let Some(mismatch) = mismatch {
            // The lease was taken; give it back before reporting the caller's mistake.
            self.release(&reply.handle)?;
            return Err(mismatch);
        }
        Ok(reply.handle)
    }

    /// Reads a sample's features (all of the ref's, or `names`) into fresh aligned buffers and
    /// takes a read lease.
    pub fn get(&self, r: &SampleRef, names: Option<&[&str]>) -> Result<(IndexMap<String, TensorBuf>, FeatureHandle)> {
        let request =
            wire::GetRequest { r#ref: r.clone(), names: names.map(|n| n.iter().map(|s| (*s).to_owned()).collect()) };
        let meta = wire::encode(&request)?;
        self.call(Op::Get, &meta, &[], |head, stream| {
            let reply: GetReply = wire::decode(&head.meta, "Get reply")?;
            let mut out = IndexMap::with_capacity(reply.tensors.len());
            for t in &reply.tensors {
                let len =
                    usize::try_from(t.nbytes()?).map_err(|_| Error::InvalidArgument("tensor too large".into()))?;
                let mut buf = AlignedBuf::zeroed(len);
                stream.read_exact(buf.as_mut_slice()).map_err(|e| Error::io("reading a Get payload", &e))?;
                out.insert(t.name.clone(), TensorBuf::new(t.dtype()?, t.shape.clone(), buf)?);
            }
            Ok((out, reply.handle))
        })
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

    /// Frees every sample of the store; returns how many.
    pub fn abort_all(&self) -> Result<u64> {
        self.call(Op::AbortAll, b"{}", &[], |head, _| {
            Ok(wire::decode::<wire::CountReply>(&head.meta, "AbortAll reply")?.count)
        })
    }

    /// The specs of a sample's features.
    pub fn describe(&self, r: &SampleRef) -> Result<IndexMap<String, FeatureSpec>> {
        let meta = wire::encode(&wire::GetRequest { r#ref: r.clone(), names: None })?;
        self.call(Op::Describe, &meta, &[], |head, _| wire::decode(&head.meta, "Describe reply"))
    }

    /// The daemon store's health map (as JSON: the fields of `ferry_store::Health`).
    pub fn health(&self) -> Result<serde_json::Value> {
        self.call(Op::Health, b"{}", &[], |head, _| wire::decode(&head.meta, "Health reply"))
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
fn check_destinations(tensors: &[WireTensor], dsts: &[(&str, &mut [u8])]) -> Option<Error> {
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
        if t.name != *name || need != dst.len() as u64 {
            return Some(Error::InvalidArgument(format!(
                "get_into: buffer for feature {name:?} is {} bytes; the daemon's {:?} needs {need}",
                dst.len(),
                t.name
            )));
        }
    }
    None
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
    let meta_len =
        u32::try_from(meta.len()).map_err(|_| Error::InvalidArgument("request metadata too large".into()))?;
    let payload_len = payload.iter().map(|p| p.len() as u64).sum();
    write_head(stream, &Header { op, flags: 0, request_id, meta_len, payload_len }, meta, payload)?;
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
