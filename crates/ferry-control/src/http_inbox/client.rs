//! [`RemoteInbox`]: a rank's inbox read over the relay (§10.2), as a [`RefSource`].

use super::Origin;
use crate::channel::RefSource;
use base64::Engine as _;
use ferry_core::json::sample_ref_from_str;
use ferry_core::{Error, Result, SampleRef};
use serde_json::Value;
use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Attempts of one consumed acknowledgement (SpecForge's).
pub const ACK_ATTEMPTS: usize = 4;

/// The sleeps between acknowledgement attempts (SpecForge's 0.05 s, 0.10 s, 0.15 s).
const ACK_BACKOFF: [Duration; ACK_ATTEMPTS - 1] =
    [Duration::from_millis(50), Duration::from_millis(100), Duration::from_millis(150)];

/// The largest response body read (a SpecForge server answers with everything from the offset
/// to the end of the file, uncapped).
const MAX_RESPONSE: u64 = 256 << 20;

/// The least time between two network pulls of one inbox: a caller may poll every few
/// milliseconds (a local inbox file costs nothing to re-read), but each pull is an HTTP request
/// rank 0 answers while it trains, so polls and status probes in between are answered from what
/// the last pull brought (SpecForge's queue polls every 0.1 s).
pub(crate) const MIN_PULL_INTERVAL: Duration = Duration::from_millis(50);

/// Consecutive failed pulls after which each further one is logged as a warning (every
/// `FAILED_PULLS_WARN_EVERY`-th), naming the URL: a few are ordinary hiccups, a run of them is
/// rank 0 unreachable.
const FAILED_PULLS_WARN_EVERY: u64 = 20;

/// SpecForge's prefix of an inbox failure.
const DISTRIBUTOR_DIED: &str = "ref-distributor died:\n";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the pulls have read so far.
#[derive(Debug, Default)]
struct Pulled {
    /// The byte offset of the next read.
    offset: u64,
    /// The trailing fragment after the last newline received.
    partial: Vec<u8>,
    /// Complete, non-blank records not yet returned, with their byte offsets.
    lines: VecDeque<(u64, Vec<u8>)>,
    /// The last answer's `closed`.
    closed: bool,
    /// The last answer's `failure`.
    failure: Option<String>,
    /// The last answer's `consumed` (ferry's server only).
    server_consumed: Option<u64>,
    /// When the last network pull was sent (successful or not).
    last_pull: Option<Instant>,
    /// Pulls that failed in a row.
    failed_pulls: u64,
}

/// Why a request got no usable answer.
enum Failed {
    /// The network hiccuped (connection refused or reset, timeout): a later request may
    /// succeed.
    Transient(String, std::io::ErrorKind),
    /// The server answered `5xx`: a later request may succeed, but if none does, the server's
    /// own text says what is wrong (a full disk, a corrupt counter), not the network.
    Server(String),
    /// Retrying cannot help.
    Fatal(Error),
}

/// One rank's inbox on rank 0's [`super::InboxHttpServer`] (or SpecForge's `InboxHTTPServer`).
///
/// Each request uses a fresh connection (`Connection: close`, as SpecForge's client): a rank
/// polls every few milliseconds to every 100 ms, which a private network affords, and a server
/// that went away is then refused at once rather than through a pooled connection's timeout.
///
/// Pulls read by byte offset and advance only on a valid answer, so a retried read never skips
/// or repeats a byte; a torn trailing record stays buffered until its newline arrives. A
/// transport failure (refused, reset, timeout, a `5xx`) reads as "nothing new": the queue's
/// idle timeout decides whether rank 0 is gone (SpecForge's rule). A `4xx` answer (a rank the
/// server does not have, a bad offset) and an answer whose byte range does not match its data
/// are errors. Status probes ([`RefSource::is_closed`], [`RefSource::failure`]) pull too, but
/// keep what they pulled for the next [`RefSource::poll`].
///
/// [`RefSource::mark_consumed`] posts the absolute target (`confirmed + n`) up to
/// [`ACK_ATTEMPTS`] times, sleeping 0.05 s, 0.10 s, 0.15 s between transport failures; a `4xx`
/// answer (`400`, `404`, `409`) fails at once, and so does a confirmation of another value.
/// Four transport failures are [`Error::PeerLost`] (a `ConnectionError`): rank 0's relay is
/// unreachable, a crash of the consumer that `--resume` recovers, not a terminal failure.
///
/// Two deliberate differences from SpecForge's client, both about status codes: a `GET`
/// answered `4xx` is an error here (SpecForge's `urlopen` raises `HTTPError`, a `URLError`,
/// which its pull swallows, so a wrong rank waits for the idle timeout), and a `POST` answered
/// `5xx` is retried like a transport failure (SpecForge raises at once); the target is
/// absolute, so a retry is always safe.
///
/// [`RefSource::seed_consumed`] reads the server's current count from the extra `consumed`
/// field of ferry's `GET` answer (SpecForge's client ignores it), with a read that must succeed:
/// an unreachable server, or a SpecForge server (which does not report it), is an error rather
/// than a count of 0 that would rewind the acknowledgements (the server refuses a target below
/// its count with `409`).
///
/// The consumer-side signals of a producer channel (`.consumer_done`, `.consumer_failed`, the
/// dispatch quantum) do not exist for inboxes and are refused.
pub struct RemoteInbox {
    origin: Origin,
    rank: usize,
    url: String,
    agent: ureq::Agent,
    /// [`MIN_PULL_INTERVAL`] unless set otherwise ([`RemoteInbox::with_min_pull_interval`]).
    min_pull_interval: Duration,
    pulled: Mutex<Pulled>,
    /// The last target the server confirmed; held across a whole acknowledgement so
    /// concurrent callers post increasing targets.
    consumed: Mutex<u64>,
    /// A local failure ([`RemoteInbox::poison`]): rank 0's process is known to be gone.
    poisoned: Mutex<Option<String>>,
}

impl std::fmt::Debug for RemoteInbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteInbox").field("url", &self.url).finish()
    }
}

impl RemoteInbox {
    /// Rank `rank`'s inbox on the server at `origin` (`http://host:port`), each request
    /// bounded by `timeout` (SpecForge: 10 s). Nothing is requested yet.
    pub fn new(origin: &str, rank: usize, timeout: Duration) -> Result<RemoteInbox> {
        let origin = Origin::parse(origin)?;
        if origin.port() == 0 {
            return Err(Error::InvalidArgument(format!(
                "inbox HTTP origin {origin}: a client needs the server's real port, not 0"
            )));
        }
        if timeout.is_zero() {
            return Err(Error::InvalidArgument("inbox HTTP client: the request timeout must be positive".into()));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            // A private-network origin: an `http_proxy` set for the internet must not apply.
            .proxy(None)
            // Every request says `Connection: close` (as SpecForge's urllib client does): a
            // pooled connection to a server that stopped would hang until the timeout instead
            // of being refused at once.
            .max_idle_connections(0)
            .build()
            .into();
        Ok(RemoteInbox {
            url: origin.inbox_url(rank),
            origin,
            rank,
            agent,
            min_pull_interval: MIN_PULL_INTERVAL,
            pulled: Mutex::new(Pulled::default()),
            consumed: Mutex::new(0),
            poisoned: Mutex::new(None),
        })
    }

    /// The same inbox, pulling the network at most once per `interval` (tests use zero).
    pub fn with_min_pull_interval(mut self, interval: Duration) -> Self {
        self.min_pull_interval = interval;
        self
    }

    /// The server's origin.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// The rank whose inbox this is.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Marks the inbox failed locally with `reason` (the rank learned that rank 0's process is
    /// gone): from now on [`RefSource::failure`] reports it, so a rank waiting for refs stops.
    pub fn poison(&self, reason: &str) {
        let mut poisoned = lock(&self.poisoned);
        if poisoned.is_none() {
            *poisoned = Some(if reason.is_empty() { "ref-distributor failed".into() } else { reason.to_owned() });
        }
    }

    /// The byte offset the next read starts at.
    pub fn offset(&self) -> u64 {
        lock(&self.pulled).offset
    }

    fn transport(e: ureq::Error) -> Failed {
        let kind = match &e {
            ureq::Error::Io(io) => io.kind(),
            ureq::Error::Timeout(_) => std::io::ErrorKind::TimedOut,
            ureq::Error::ConnectionFailed => std::io::ErrorKind::ConnectionRefused,
            ureq::Error::HostNotFound => std::io::ErrorKind::NotFound,
            ureq::Error::BodyExceedsLimit(_) => {
                return Failed::Fatal(Error::Protocol {
                    context: "inbox HTTP client".into(),
                    message: format!("the answer is larger than {MAX_RESPONSE} bytes: {e}"),
                });
            }
            _ => std::io::ErrorKind::Other,
        };
        Failed::Transient(e.to_string(), kind)
    }

    /// Reads an answer: its status and JSON body. 5xx is transient, other non-200 fatal.
    fn answer(
        &self,
        url: &str,
        response: std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> std::result::Result<Value, Failed> {
        let mut response = response.map_err(Self::transport)?;
        let status = response.status().as_u16();
        let body = response.body_mut().with_config().limit(MAX_RESPONSE).read_to_vec().map_err(Self::transport)?;
        let text = || {
            serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect())
        };
        match status {
            200 => serde_json::from_slice(&body).map_err(|e| {
                Failed::Fatal(Error::Corrupt { what: format!("inbox HTTP answer from {url}"), message: e.to_string() })
            }),
            500..=599 => Err(Failed::Server(format!("HTTP {status}: {}", text()))),
            _ => Err(Failed::Fatal(Error::Protocol {
                context: url.to_owned(),
                message: format!("HTTP {status}: {}", text()),
            })),
        }
    }

    /// One `GET` from the current offset; on a valid answer, the offset advances and complete
    /// records join the pending ones.
    fn pull(&self, pulled: &mut Pulled) -> std::result::Result<(), Failed> {
        let url = format!("{}?offset={}", self.url, pulled.offset);
        let payload = self.answer(&url, self.agent.get(&url).header("Connection", "close").call())?;
        let corrupt =
            |message: String| Failed::Fatal(Error::Corrupt { what: format!("inbox HTTP answer from {url}"), message });
        let data = payload.get("data").and_then(Value::as_str).ok_or_else(|| corrupt("no \"data\" string".into()))?;
        let data = base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|e| corrupt(format!("\"data\" is not base64: {e}")))?;
        let next = payload.get("next_offset").and_then(Value::as_u64);
        let closed =
            payload.get("closed").and_then(Value::as_bool).ok_or_else(|| corrupt("no \"closed\" flag".into()))?;
        let failure = match payload.get("failure") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => return Err(corrupt(format!("\"failure\" is {other}, not text"))),
        };
        if next.and_then(|n| n.checked_sub(pulled.offset)) != Some(data.len() as u64) {
            return Err(Failed::Fatal(Error::Protocol {
                context: url.clone(),
                message: format!(
                    "inbox HTTP server returned an invalid byte range: offset {}, next_offset {}, {} bytes of data",
                    pulled.offset,
                    payload.get("next_offset").map_or_else(|| "missing".to_owned(), Value::to_string),
                    data.len()
                ),
            }));
        }
        let mut line_start = pulled.offset - pulled.partial.len() as u64;
        pulled.offset += data.len() as u64;
        pulled.closed = closed;
        pulled.failure = failure;
        pulled.server_consumed = payload.get("consumed").and_then(Value::as_u64);
        let mut rest = &data[..];
        while let Some(end) = memchr::memchr(b'\n', rest) {
            let mut line = std::mem::take(&mut pulled.partial);
            line.extend_from_slice(&rest[..end]);
            if !line.trim_ascii().is_empty() {
                pulled.lines.push_back((line_start, line));
            }
            line_start = pulled.offset - (rest.len() - end - 1) as u64;
            rest = &rest[end + 1..];
        }
        pulled.partial.extend_from_slice(rest);
        Ok(())
    }

    /// A pull whose transport and server failures read as "nothing new", at most once per
    /// [`MIN_PULL_INTERVAL`] (sooner calls answer from what the last pull brought).
    fn pull_lenient(&self, pulled: &mut Pulled) -> Result<()> {
        if pulled.last_pull.is_some_and(|t| t.elapsed() < self.min_pull_interval) {
            return Ok(());
        }
        pulled.last_pull = Some(Instant::now());
        match self.pull(pulled) {
            Ok(()) => {
                pulled.failed_pulls = 0;
                Ok(())
            }
            Err(Failed::Transient(message, _) | Failed::Server(message)) => {
                pulled.failed_pulls += 1;
                if pulled.failed_pulls.is_multiple_of(FAILED_PULLS_WARN_EVERY) {
                    tracing::warn!(url = %self.url, failed_in_a_row = pulled.failed_pulls, error = %message,
                        "inbox HTTP pulls keep failing; the queue's idle timeout decides whether rank 0 is gone");
                } else {
                    tracing::debug!(url = %self.url, error = %message, "inbox HTTP pull failed; nothing new this time");
                }
                Ok(())
            }
            Err(Failed::Fatal(e)) => Err(e),
        }
    }

    fn parse(&self, offset: u64, line: &[u8]) -> Result<SampleRef> {
        let corrupt =
            |message: String| Error::Corrupt { what: format!("inbox {} record at byte {offset}", self.url), message };
        let text = std::str::from_utf8(line).map_err(|e| corrupt(format!("not UTF-8: {e}")))?;
        sample_ref_from_str(text).map_err(|e| corrupt(e.to_string()))
    }

    fn refused(&self, what: &str) -> Error {
        Error::InvalidArgument(format!(
            "{what} is not carried by the HTTP inbox relay ({}): it relays refs and the consumed count only",
            self.url
        ))
    }
}

impl RefSource for RemoteInbox {
    fn describe(&self) -> String {
        self.url.clone()
    }

    fn upstream(&self) -> &'static str {
        "ref-distributor"
    }

    fn poll(&self, max: Option<usize>) -> Result<Vec<SampleRef>> {
        let mut pulled = lock(&self.pulled);
        self.pull_lenient(&mut pulled)?;
        let take = max.unwrap_or(usize::MAX).min(pulled.lines.len());
        let mut out = Vec::with_capacity(take);
        while out.len() < take {
            let Some((offset, line)) = pulled.lines.pop_front() else { break };
            match self.parse(offset, &line) {
                Ok(r) => out.push(r),
                Err(e) => {
                    // Bad input never loses data: the record stays first, the refs before it
                    // are returned now, the error on the next poll.
                    pulled.lines.push_front((offset, line));
                    if out.is_empty() {
                        return Err(e);
                    }
                    break;
                }
            }
        }
        Ok(out)
    }

    fn is_closed(&self) -> Result<bool> {
        if let Some(e) = self.failure_error()? {
            return Err(e);
        }
        Ok(lock(&self.pulled).closed)
    }

    fn failure(&self) -> Result<Option<String>> {
        if let Some(reason) = lock(&self.poisoned).clone() {
            return Ok(Some(format!("{DISTRIBUTOR_DIED}{reason}")));
        }
        let mut pulled = lock(&self.pulled);
        self.pull_lenient(&mut pulled)?;
        Ok(pulled.failure.as_ref().map(|t| format!("{DISTRIBUTOR_DIED}{t}")))
    }

    fn mark_consumed(&self, n: u64) -> Result<()> {
        if n < 1 {
            return Ok(());
        }
        let mut confirmed = lock(&self.consumed);
        let target = *confirmed + n;
        let url = format!("{}/consumed", self.url);
        let body = serde_json::json!({ "target": target }).to_string();
        let mut last = String::new();
        let mut last_was_server = false;
        for attempt in 0..ACK_ATTEMPTS {
            let response = self
                .agent
                .post(&url)
                .header("Content-Type", "application/json")
                .header("Connection", "close")
                .send(body.as_bytes());
            match self.answer(&url, response) {
                Ok(payload) => {
                    let got = payload.get("consumed").and_then(Value::as_u64);
                    if got != Some(target) {
                        return Err(Error::Protocol {
                            context: url,
                            message: format!(
                                "inbox HTTP server did not confirm consumed target {target} (it answered {})",
                                payload.get("consumed").map_or_else(|| "nothing".to_owned(), Value::to_string)
                            ),
                        });
                    }
                    *confirmed = target;
                    return Ok(());
                }
                Err(Failed::Fatal(e)) => return Err(e),
                Err(Failed::Server(message)) => (last, last_was_server) = (message, true),
                Err(Failed::Transient(message, _)) => (last, last_was_server) = (message, false),
            }
            tracing::debug!(url = %url, attempt, error = %last, "inbox HTTP acknowledgement failed");
            if let Some(pause) = ACK_BACKOFF.get(attempt) {
                std::thread::sleep(*pause);
            }
        }
        if last_was_server {
            // Rank 0's relay answers, but cannot record the acknowledgement: a fault on rank 0
            // (its text says which), not a lost peer.
            return Err(Error::Protocol {
                context: format!("inbox HTTP consumed acknowledgement to {url}"),
                message: format!(
                    "rank 0's inbox relay could not record consumed target {target} ({ACK_ATTEMPTS} attempts; last \
                     answer: {last})"
                ),
            });
        }
        // Rank 0's relay is unreachable: rank 0 is gone (or cut off). That is a crash of the
        // consumer, which a resume recovers, never a terminal failure to publish.
        Err(Error::PeerLost {
            context: format!("inbox HTTP consumed acknowledgement to {url}"),
            message: format!(
                "inbox HTTP consumed acknowledgement failed after retries ({ACK_ATTEMPTS} attempts; last: {last}): rank \
                 0's relay is unreachable"
            ),
        })
    }

    fn seed_consumed(&self) -> Result<u64> {
        let mut confirmed = lock(&self.consumed);
        let mut pulled = lock(&self.pulled);
        match self.pull(&mut pulled) {
            Ok(()) => {}
            Err(Failed::Fatal(e)) => return Err(e),
            Err(Failed::Transient(message, kind)) => {
                return Err(Error::Io {
                    context: format!("seeding the consumed count from {}", self.url),
                    kind,
                    message,
                });
            }
            Err(Failed::Server(message)) => {
                return Err(Error::Protocol {
                    context: format!("seeding the consumed count from {}", self.url),
                    message,
                });
            }
        }
        let count = pulled.server_consumed.ok_or_else(|| Error::Protocol {
            context: self.url.clone(),
            message: "the inbox server does not report its consumed count (a SpecForge server, or an unreadable \
                      counter), so the count cannot be seeded without risking a rewind"
                .into(),
        })?;
        *confirmed = count;
        Ok(count)
    }

    fn consumed(&self) -> u64 {
        *lock(&self.consumed)
    }

    fn mark_consumer_done(&self) -> Result<()> {
        Err(self.refused("the consumer's done signal"))
    }

    fn mark_consumer_failed(&self, _reason: &str) -> Result<()> {
        Err(self.refused("the consumer's failure signal"))
    }

    fn publish_consumer_quantum(&self, _quantum: u64, _allow_existing: bool) -> Result<()> {
        Err(self.refused("the consumer's dispatch quantum"))
    }
}
