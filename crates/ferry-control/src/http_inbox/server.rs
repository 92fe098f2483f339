//! [`InboxHttpServer`]: rank 0's side of the relay (§10.1).
//!
//! A `tiny_http` listener (its accept thread hands every connection to its own connection
//! pool at once, so dozens of ranks polling in lockstep are not refused the way Python's
//! five-slot `socketserver` backlog refused them) feeds a fixed pool of worker threads that
//! answer the requests. Each answer is compact JSON with `Content-Type: application/json` and
//! an explicit length.

use super::Origin;
use crate::channel::sidecar::{self, CLOSED, FAILED};
use crate::channel::{FileRefChannel, RefSource};
use base64::Engine as _;
use ferry_core::{Error, Result};
use serde_json::{Value, json};
use std::io::Read;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The most inbox bytes one `GET` returns (4 MiB, about 5.6 MB of base64): a rank that fell
/// far behind, or a huge inbox, is served in bounded chunks instead of one response holding the
/// whole file. A chunk ends at the last newline within the cap (or, for a single record longer
/// than the cap, at a UTF-8 character boundary), so a client that decodes each chunk as text
/// (SpecForge's) never sees a split character. Clients advance by `next_offset`, so a short
/// read only means another request; `closed` is reported only on a response that reached the
/// end of the file.
pub const DEFAULT_CHUNK_CAP: usize = 4 << 20;

/// Worker threads answering requests (requests are short: one file read or one counter write).
pub const DEFAULT_WORKERS: usize = 8;

/// How long [`InboxHttpServer::stop`] waits for the workers (SpecForge's join timeout).
pub const STOP_DEADLINE: Duration = Duration::from_secs(5);

/// The largest `POST` body accepted (SpecForge's).
const MAX_BODY: usize = 1024;

/// The `Server` header (SpecForge's version string).
const SERVER_NAME: &str = "SpecForgeInbox/1";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the workers share.
struct Shared {
    inbox_dir: PathBuf,
    dp_size: usize,
    chunk_cap: usize,
    /// One counter-writer channel per rank, its mutex the rank's ack lock: a target and its
    /// retry (after an ambiguous reset) are read, advanced and answered atomically.
    counters: Arc<Vec<Mutex<FileRefChannel>>>,
}

/// A started server.
struct Running {
    server: Arc<tiny_http::Server>,
    addr: SocketAddr,
    workers: Vec<JoinHandle<()>>,
    /// Each worker sends once as it exits.
    exited: mpsc::Receiver<()>,
    /// Set before the workers are unblocked.
    stopping: Arc<AtomicBool>,
}

/// Rank 0's HTTP server for the per-rank inboxes in one directory.
pub struct InboxHttpServer {
    origin: Origin,
    bind_host: String,
    inbox_dir: PathBuf,
    dp_size: usize,
    chunk_cap: usize,
    workers: usize,
    /// The per-rank counter writers and ack locks, kept across a stop and a new start.
    counters: Arc<Vec<Mutex<FileRefChannel>>>,
    running: Mutex<Option<Running>>,
}

impl std::fmt::Debug for InboxHttpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboxHttpServer")
            .field("inbox_dir", &self.inbox_dir)
            .field("dp_size", &self.dp_size)
            .field("origin", &self.origin.to_string())
            .field("bind_host", &self.bind_host)
            .field("local_addr", &self.local_addr())
            .finish()
    }
}

impl InboxHttpServer {
    /// A server for `dp_size` (≥ 2) inboxes in `inbox_dir`, to listen on `origin`'s port (0:
    /// an ephemeral one, see [`InboxHttpServer::local_addr`]) on `bind_host` (SpecForge's
    /// default is [`super::DEFAULT_BIND_HOST`], every interface). Nothing is bound until
    /// [`InboxHttpServer::start`].
    pub fn new(inbox_dir: impl Into<PathBuf>, dp_size: usize, origin: &str, bind_host: &str) -> Result<Self> {
        let origin = Origin::parse(origin)?;
        if dp_size < 2 {
            return Err(Error::InvalidArgument(format!(
                "inbox HTTP server requires dp_size >= 2 (got {dp_size}): rank 0 reads its own inbox locally"
            )));
        }
        if bind_host.is_empty() {
            return Err(Error::InvalidArgument("inbox HTTP server: empty bind host".into()));
        }
        let inbox_dir = inbox_dir.into();
        let counters = (0..dp_size).map(|rank| Mutex::new(FileRefChannel::inbox(&inbox_dir, rank))).collect();
        Ok(InboxHttpServer {
            origin,
            bind_host: bind_host.to_owned(),
            inbox_dir,
            dp_size,
            chunk_cap: DEFAULT_CHUNK_CAP,
            workers: DEFAULT_WORKERS,
            counters: Arc::new(counters),
            running: Mutex::new(None),
        })
    }

    /// Caps the inbox bytes of one `GET` response (at least 1; default [`DEFAULT_CHUNK_CAP`]).
    /// Applies from the next [`InboxHttpServer::start`].
    pub fn with_chunk_cap(mut self, bytes: usize) -> Self {
        self.chunk_cap = bytes.max(1);
        self
    }

    /// Sets the number of worker threads (at least 1; default [`DEFAULT_WORKERS`]).
    pub fn with_workers(mut self, workers: usize) -> Self {
        self.workers = workers.max(1);
        self
    }

    /// The inbox directory served.
    pub fn inbox_dir(&self) -> &Path {
        &self.inbox_dir
    }

    /// The address the server listens on, while it runs.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        lock(&self.running).as_ref().map(|r| r.addr)
    }

    /// The origin clients use: the configured one, with the bound port once started (so an
    /// origin with port 0 becomes the real one).
    pub fn origin(&self) -> Origin {
        match self.local_addr() {
            Some(addr) => self.origin.with_port(addr.port()),
            None => self.origin.clone(),
        }
    }

    /// Binds and starts serving; returns the bound address. Idempotent: a running server
    /// returns its address.
    pub fn start(&self) -> Result<SocketAddr> {
        let mut running = lock(&self.running);
        if let Some(r) = running.as_ref() {
            return Ok(r.addr);
        }
        let target = format!("{}:{}", self.bind_host, self.origin.port());
        let bind_error = |message: String| Error::Io {
            context: format!("binding the inbox HTTP server on {target}"),
            kind: std::io::ErrorKind::AddrNotAvailable,
            message,
        };
        let addrs: Vec<SocketAddr> = (self.bind_host.trim_start_matches('[').trim_end_matches(']'), self.origin.port())
            .to_socket_addrs()
            .map_err(|e| bind_error(e.to_string()))?
            .collect();
        let server = tiny_http::Server::http(&addrs[..]).map_err(|e| bind_error(e.to_string()))?;
        let addr = server.server_addr().to_ip().ok_or_else(|| bind_error("not an IP listener".into()))?;
        let server = Arc::new(server);
        let shared = Arc::new(Shared {
            inbox_dir: self.inbox_dir.clone(),
            dp_size: self.dp_size,
            chunk_cap: self.chunk_cap,
            counters: Arc::clone(&self.counters),
        });
        let (exit_tx, exited) = mpsc::channel();
        let stopping = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::with_capacity(self.workers);
        for i in 0..self.workers {
            let (listener, shared, exit_tx) = (Arc::clone(&server), Arc::clone(&shared), exit_tx.clone());
            let stop = Arc::clone(&stopping);
            let spawned = std::thread::Builder::new().name(format!("ferry-inbox-http-{i}")).spawn(move || {
                loop {
                    match listener.recv() {
                        Ok(request) => shared.answer(request),
                        // `unblock` (after `stopping` is set) ends this worker's `recv`.
                        Err(_) if stop.load(Ordering::Acquire) => break,
                        // An accept error (e.g. out of file descriptors): keep serving.
                        Err(e) => tracing::warn!(error = %e, "inbox HTTP server could not accept a connection"),
                    }
                }
                let _ = exit_tx.send(());
            });
            match spawned {
                Ok(handle) => workers.push(handle),
                Err(e) => {
                    // Stop the workers already started before failing.
                    let partial = Running { server, addr, workers, exited, stopping };
                    if let Err(stop_error) = partial.shut_down(STOP_DEADLINE) {
                        tracing::warn!(error = %stop_error, "inbox HTTP workers did not stop");
                    }
                    return Err(Error::io("starting an inbox HTTP worker", &e));
                }
            }
        }
        tracing::info!(%addr, inbox_dir = %self.inbox_dir.display(), "serving the rank inboxes over HTTP");
        *running = Some(Running { server, addr, workers, exited, stopping });
        Ok(addr)
    }

    /// Stops serving: no new request is answered, and the workers are joined within
    /// [`STOP_DEADLINE`]. Idempotent. A worker still busy at the deadline is left to finish on
    /// its own (the listener closes when it does), reported as [`Error::Timeout`].
    pub fn stop(&self) -> Result<()> {
        let Some(running) = lock(&self.running).take() else { return Ok(()) };
        running.shut_down(STOP_DEADLINE)
    }
}

impl Drop for InboxHttpServer {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(error = %e, "inbox HTTP server did not stop cleanly");
        }
    }
}

impl Running {
    fn shut_down(self, deadline: Duration) -> Result<()> {
        let Running { server, workers, exited, stopping, .. } = self;
        stopping.store(true, Ordering::Release);
        // One unblock per worker: each ends exactly one worker's `recv`.
        for _ in &workers {
            server.unblock();
        }
        drop(server);
        let until = Instant::now() + deadline;
        let mut done = 0;
        while done < workers.len() {
            let left = until.saturating_duration_since(Instant::now());
            match exited.recv_timeout(left) {
                Ok(()) => done += 1,
                Err(_) => break,
            }
        }
        let total = workers.len();
        for worker in workers.into_iter().filter(|w| w.is_finished()) {
            let _ = worker.join();
        }
        if done < total {
            return Err(Error::Timeout {
                what: format!("{} of {total} inbox HTTP workers to stop", total - done),
                waited_ms: deadline.as_millis() as u64,
            });
        }
        Ok(())
    }
}

/// An answer: status and JSON body.
type Answer = (u16, Value);

fn error_answer(status: u16, message: impl Into<String>) -> Answer {
    (status, json!({"error": message.into()}))
}

impl Shared {
    fn answer(&self, mut request: tiny_http::Request) {
        let (status, body) = self.route(&mut request);
        let bytes = serde_json::to_vec(&body).unwrap_or_else(|_| br#"{"error":"encoding the answer"}"#.to_vec());
        // An explicit `Content-Length` on every answer (tiny_http switches large bodies to
        // chunked transfer by default; SpecForge's server always sends the length).
        let mut response =
            tiny_http::Response::from_data(bytes).with_status_code(status).with_chunked_threshold(usize::MAX);
        for (name, value) in [("Content-Type", "application/json"), ("Server", SERVER_NAME)] {
            if let Ok(header) = tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()) {
                response.add_header(header);
            }
        }
        if let Err(e) = request.respond(response) {
            tracing::debug!(error = %e, "an inbox HTTP client went away before its answer");
        }
    }

    fn route(&self, request: &mut tiny_http::Request) -> Answer {
        let url = request.url().to_owned();
        let (path, query) = url.split_once('?').unwrap_or((&url, ""));
        let path = path.split_once('#').map_or(path, |(p, _)| p);
        match request.method() {
            tiny_http::Method::Get => match self.rank_of(path, false) {
                Some(rank) => self.get(rank, query),
                None => error_answer(404, "unknown inbox"),
            },
            tiny_http::Method::Post => match self.rank_of(path, true) {
                Some(rank) => match read_target(request) {
                    Ok(target) => self.consumed(rank, target),
                    Err(message) => error_answer(400, message),
                },
                None => error_answer(404, "unknown inbox"),
            },
            _ => error_answer(405, "method not allowed"),
        }
    }

    /// The rank of `/v1/inboxes/<rank>` (`/consumed` appended for a `POST`), if it is one.
    fn rank_of(&self, path: &str, consumed: bool) -> Option<usize> {
        let token = path.strip_prefix("/v1/inboxes/")?;
        let token = if consumed { token.strip_suffix("/consumed")? } else { token };
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        token.parse().ok().filter(|&rank| rank < self.dp_size)
    }

    fn get(&self, rank: usize, query: &str) -> Answer {
        let Some(offset) = parse_offset(query) else { return error_answer(400, "invalid offset") };
        let path = FileRefChannel::inbox_path(&self.inbox_dir, rank);
        match self.read_chunk(&path, offset) {
            Ok(body) => (200, body),
            Err(e) => {
                tracing::error!(rank, error = %e, "inbox HTTP server could not read an inbox");
                error_answer(500, e.to_string())
            }
        }
    }

    fn read_chunk(&self, path: &Path, offset: u64) -> Result<Value> {
        // `.closed` is checked before the read: the distributor closes an inbox only after its
        // last append, so a read that then reaches the end of the file holds every record.
        let closed = sidecar::exists(path, CLOSED);
        let (data, at_eof) = read_capped(path, offset, self.chunk_cap)?;
        let failure = sidecar::read_failure(path, FAILED)?;
        // `failure` is the text as ferry's local inbox readers see it (trimmed; an empty file
        // reads as "unknown remote failure"). `consumed` is an extra field SpecForge's client
        // ignores; ferry's seeds its consumed count from it (null if the counter is unreadable).
        let consumed = sidecar::read_counter_strict(path).ok();
        Ok(json!({
            "data": base64::engine::general_purpose::STANDARD.encode(&data),
            "next_offset": offset + data.len() as u64,
            "closed": closed && at_eof,
            "failure": failure,
            "consumed": consumed,
        }))
    }

    fn consumed(&self, rank: usize, target: u64) -> Answer {
        let Some(counter) = self.counters.get(rank) else { return error_answer(404, "unknown inbox") };
        let channel = lock(counter);
        let result = (|| -> Result<Answer> {
            // The counter file is the truth (a new distributor attempt resets it to nothing).
            let current = channel.seed_consumed()?;
            if target < current {
                return Ok((409, json!({"error": "consumed target moved backwards", "consumed": current})));
            }
            if target > current {
                channel.mark_consumed(target - current)?;
            }
            Ok((200, json!({"consumed": target})))
        })();
        result.unwrap_or_else(|e| {
            tracing::error!(rank, error = %e, "inbox HTTP server could not advance a consumed counter");
            error_answer(500, e.to_string())
        })
    }
}

/// The `offset` query parameter (missing or blank: 0, as Python's `parse_qs` reads it).
fn parse_offset(query: &str) -> Option<u64> {
    let value = query.split('&').find_map(|pair| match pair.split_once('=') {
        Some(("offset", v)) if !v.is_empty() => Some(v),
        _ => None,
    });
    match value {
        None => Some(0),
        Some(v) if v.bytes().all(|b| b.is_ascii_digit()) => v.parse().ok(),
        Some(_) => None,
    }
}

/// The `POST` body's target: a JSON object whose `target` is an integer ≥ 1, in a body of 1 to
/// 1024 bytes. The error text is the `400` answer's.
fn read_target(request: &mut tiny_http::Request) -> std::result::Result<u64, String> {
    let length = request.body_length().unwrap_or(0);
    if !(1..=MAX_BODY).contains(&length) {
        return Err("invalid body size".into());
    }
    let mut body = Vec::with_capacity(length);
    request
        .as_reader()
        .take(MAX_BODY as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| format!("reading the body: {e}"))?;
    parse_target(&body)
}

fn parse_target(body: &[u8]) -> std::result::Result<u64, String> {
    if body.is_empty() || body.len() > MAX_BODY {
        return Err("invalid body size".into());
    }
    let payload: Value = serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?;
    let target = payload.as_object().ok_or("the body must be a JSON object")?.get("target").ok_or("'target'")?;
    match target.as_u64() {
        Some(t) if t >= 1 => Ok(t),
        _ if target.is_i64() || target.is_u64() => Err("target must be positive".into()),
        _ => Err(format!("target must be an integer, got {target}")),
    }
}

/// Up to `cap` bytes of `path` from `offset`, cut at the last newline (or UTF-8 boundary)
/// when capped, and whether the read reached the end of the file. A missing file, or an
/// offset at or past its end, reads as nothing (as SpecForge's server answers).
fn read_capped(path: &Path, offset: u64, cap: usize) -> Result<(Vec<u8>, bool)> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), true)),
        Err(e) => return Err(Error::io(format!("opening {}", path.display()), &e)),
    };
    let io_error = |e: std::io::Error| Error::io(format!("reading {}", path.display()), &e);
    let len = file.metadata().map_err(io_error)?.len();
    let want = len.saturating_sub(offset).min(cap as u64 + 1) as usize;
    let mut data = vec![0u8; want];
    let mut filled = 0;
    while filled < want {
        match file.read_at(&mut data[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(e)),
        }
    }
    data.truncate(filled);
    if data.len() <= cap {
        // Everything up to the end as of the read (an append racing it shows next time).
        return Ok((data, true));
    }
    data.truncate(cut_point(&data[..cap]));
    Ok((data, false))
}

/// Where a capped chunk ends: after its last newline, else at a UTF-8 character boundary (a
/// record longer than the cap goes in pieces), never at 0 for a non-empty chunk.
fn cut_point(chunk: &[u8]) -> usize {
    if let Some(newline) = memchr::memrchr(b'\n', chunk) {
        return newline + 1;
    }
    // The start of the last character: back over at most 3 continuation bytes.
    let mut start = chunk.len();
    for _ in 0..4 {
        if start == 0 {
            break;
        }
        start -= 1;
        if chunk[start] & 0xC0 != 0x80 {
            break;
        }
    }
    let width = match chunk.get(start) {
        Some(&lead) if lead >= 0xF0 => 4,
        Some(&lead) if lead >= 0xE0 => 3,
        Some(&lead) if lead >= 0xC0 => 2,
        _ => 1,
    };
    if start + width <= chunk.len() || start == 0 { chunk.len() } else { start }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_parse_as_python_reads_them() {
        assert_eq!(parse_offset(""), Some(0));
        assert_eq!(parse_offset("offset="), Some(0));
        assert_eq!(parse_offset("offset=17"), Some(17));
        assert_eq!(parse_offset("x=1&offset=5&offset=9"), Some(5));
        for bad in ["offset=-1", "offset=abc", "offset=1.5", "offset=99999999999999999999999"] {
            assert_eq!(parse_offset(bad), None, "{bad}");
        }
    }

    #[test]
    fn targets_must_be_positive_integers_in_a_small_object() {
        assert_eq!(parse_target(br#"{"target":5}"#), Ok(5));
        assert_eq!(parse_target(br#"{"target": 1, "other": true}"#), Ok(1));
        for (body, want) in [
            (&br#"{"target":0}"#[..], "positive"),
            (br#"{"target":-3}"#, "positive"),
            (br#"{"target":"5"}"#, "integer"),
            (br#"{"target":1.5}"#, "integer"),
            (br#"{"other":1}"#, "'target'"),
            (br#"[1]"#, "object"),
            (br#"{"target":"#, "invalid JSON"),
            (b"", "invalid body size"),
        ] {
            let err = parse_target(body).unwrap_err();
            assert!(err.contains(want), "{}: {err}", String::from_utf8_lossy(body));
        }
        let big = format!(r#"{{"target":1,"pad":"{}"}}"#, "x".repeat(MAX_BODY));
        assert_eq!(parse_target(big.as_bytes()).unwrap_err(), "invalid body size");
    }

    #[test]
    fn chunks_end_after_a_newline_or_on_a_character_boundary() {
        assert_eq!(cut_point(b"ab\ncd\nef"), 6);
        assert_eq!(cut_point(b"abcdef"), 6);
        // "é" is C3 A9: a chunk ending after C3 backs off before it.
        assert_eq!(cut_point(b"ab\xC3"), 2);
        assert_eq!(cut_point(b"ab\xC3\xA9"), 4);
        // A 4-byte character cut after 3 of its bytes.
        assert_eq!(cut_point(b"a\xF0\x9F\x98"), 1);
        assert_eq!(cut_point(b"a"), 1);
    }

    #[test]
    fn ranks_are_routed_only_inside_the_data_parallel_world() {
        let shared =
            Shared { inbox_dir: PathBuf::from("/x"), dp_size: 2, chunk_cap: 1, counters: Arc::new(Vec::new()) };
        assert_eq!(shared.rank_of("/v1/inboxes/1", false), Some(1));
        assert_eq!(shared.rank_of("/v1/inboxes/0/consumed", true), Some(0));
        for (path, consumed) in [
            ("/v1/inboxes/2", false),
            ("/v1/inboxes/-1", false),
            ("/v1/inboxes/+1", false),
            ("/v1/inboxes/", false),
            ("/v1/inboxes/1/consumed", false),
            ("/v1/inboxes/1", true),
            ("/v2/inboxes/1", false),
        ] {
            assert_eq!(shared.rank_of(path, consumed), None, "{path}");
        }
    }
}
