//! The HTTP inbox relay (SpecForge's `http_inbox.py`, `SPECFORGE-RUNTIME.md` §10): consumer
//! ranks on nodes without the shared control directory read their per-rank inbox, and
//! acknowledge it, over plain HTTP from rank 0.
//!
//! This module owns the relay and nothing else: the inbox files stay the distributor's
//! ([`crate::distributor`]), and their layout, sidecars and counter format stay
//! [`crate::channel`]'s. Only the tensor-free JSONL bytes of the inboxes travel; features stay
//! in the store. There is no authentication and no TLS: a private network only, as in
//! SpecForge.
//!
//! * [`InboxHttpServer`] (rank 0) serves `<inbox_dir>/inbox-rank<r>.jsonl`:
//!   `GET /v1/inboxes/<r>?offset=<n>` returns the bytes from `n` (at most
//!   [`DEFAULT_CHUNK_CAP`] per response), `POST /v1/inboxes/<r>/consumed` sets the rank's
//!   consumed counter to an absolute, never decreasing target.
//! * [`RemoteInbox`] (ranks ≥ 1) is a [`crate::channel::RefSource`] over that server, so a
//!   [`crate::stream_queue::StreamingRefQueue`] reads it as it reads a local inbox file.
//! * [`rank`] runs one online consumer rank over any inbox source (the remote one included).
//!
//! Both ends accept only an origin of the form `http://host:port` ([`Origin::parse`]).
//! The wire format is SpecForge's, so a SpecForge `RemoteInboxChannel` reads a ferry server and
//! a ferry [`RemoteInbox`] reads a SpecForge `InboxHTTPServer` (only
//! [`crate::channel::RefSource::seed_consumed`] needs ferry's server, see [`RemoteInbox`]).

mod client;
pub mod rank;
mod server;

pub use client::{ACK_ATTEMPTS, RemoteInbox};
pub use server::{DEFAULT_CHUNK_CAP, DEFAULT_WORKERS, InboxHttpServer, STOP_DEADLINE};

use ferry_core::{Error, Result};

/// The environment variable naming the relay's origin (SpecForge's): rank 0 serves on its
/// port, every other rank reads from it.
pub const SERVER_URL_ENV: &str = "DISAGG_INBOX_SERVER_URL";
/// The environment variable naming the host rank 0's server binds (default: all interfaces).
pub const BIND_HOST_ENV: &str = "DISAGG_INBOX_SERVER_BIND_HOST";
/// The bind host when [`BIND_HOST_ENV`] is unset.
pub const DEFAULT_BIND_HOST: &str = "0.0.0.0";

/// A validated relay origin: `http://host:port`, nothing else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    host: String,
    port: u16,
}

impl Origin {
    /// Parses `text` with SpecForge's rules: scheme `http`, a host, an explicit port, no user
    /// or password, a path that is empty or `/`, no parameters, query or fragment.
    pub fn parse(text: &str) -> Result<Origin> {
        let invalid = |why: &str| {
            Error::InvalidArgument(format!(
                "inbox HTTP origin must be http://host:port without credentials, path, query, or fragment; got \
                 {text:?} ({why})"
            ))
        };
        let (scheme, rest) = text.split_once("://").ok_or_else(|| invalid("no scheme"))?;
        if !scheme.eq_ignore_ascii_case("http") {
            return Err(invalid("the scheme is not http"));
        }
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        if !tail.is_empty() && tail != "/" {
            return Err(invalid("it has a path, query or fragment"));
        }
        if authority.contains('@') {
            return Err(invalid("it has credentials"));
        }
        if authority.contains(';') {
            return Err(invalid("it has parameters"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| invalid("an unterminated IPv6 host"))?;
            (host, after.strip_prefix(':').ok_or_else(|| invalid("no port"))?)
        } else {
            authority.rsplit_once(':').ok_or_else(|| invalid("no port"))?
        };
        if host.is_empty() {
            return Err(invalid("no host"));
        }
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid("no port"));
        }
        let port: u16 = port.parse().map_err(|_| invalid("the port is out of range"))?;
        Ok(Origin { host: host.to_owned(), port })
    }

    /// `http://host:port` from its parts (an IPv6 host without brackets).
    pub fn new(host: &str, port: u16) -> Result<Origin> {
        let text = if host.contains(':') { format!("http://[{host}]:{port}") } else { format!("http://{host}:{port}") };
        Origin::parse(&text)
    }

    /// The host, without IPv6 brackets.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port (0 only for a server that binds an ephemeral port).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The same host with another port.
    pub fn with_port(&self, port: u16) -> Origin {
        Origin { host: self.host.clone(), port }
    }

    /// The URL of `rank`'s inbox: `<origin>/v1/inboxes/<rank>`.
    pub fn inbox_url(&self, rank: usize) -> String {
        format!("{self}/v1/inboxes/{rank}")
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "http://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "http://{}:{}", self.host, self.port)
        }
    }
}

impl std::str::FromStr for Origin {
    type Err = Error;

    fn from_str(s: &str) -> Result<Origin> {
        Origin::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_http_host_port_only() {
        for (text, host, port) in [
            ("http://127.0.0.1:8080", "127.0.0.1", 8080),
            ("http://node-0:9", "node-0", 9),
            ("HTTP://Node:1/", "Node", 1),
            ("http://[::1]:65535", "::1", 65535),
            ("http://localhost:0", "localhost", 0),
        ] {
            let origin = Origin::parse(text).unwrap();
            assert_eq!((origin.host(), origin.port()), (host, port), "{text}");
        }
        assert_eq!(Origin::parse("http://[::1]:7/").unwrap().to_string(), "http://[::1]:7");
        assert_eq!(Origin::parse("http://h:7/").unwrap().inbox_url(3), "http://h:7/v1/inboxes/3");
        assert_eq!(Origin::new("::1", 8).unwrap().to_string(), "http://[::1]:8");
        assert_eq!(Origin::new("node", 8).unwrap().to_string(), "http://node:8");
        assert!(Origin::new("", 8).is_err() && Origin::new("a/b", 8).is_err());
    }

    #[test]
    fn everything_else_is_rejected_naming_the_form() {
        for text in [
            "https://h:1",
            "https://h:1/inbox",
            "http://h:1/inbox",
            "http://h",
            "http://h:",
            "http://:1",
            "http://u:p@h:1",
            "http://u@h:1",
            "http://h:1?x=1",
            "http://h:1#f",
            "http://h:1/;p",
            "http://h:1;p",
            "http://h:65536",
            "http://h:-1",
            "http://h:1x",
            "h:1",
            "",
            "ftp://h:1",
            "http://[::1:1",
        ] {
            let err = Origin::parse(text).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{text}: {err}");
            assert!(err.to_string().contains("http://host:port"), "{text}: {err}");
        }
    }
}
