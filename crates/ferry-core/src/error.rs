//! The one error type of ferry. Every variant says what was wrong and, where there is
//! something to do, what to do. Variants are grouped the way SpecForge's callers distinguish
//! Python exceptions (see `SPECFORGE-RUNTIME.md`): `KeyError`-class (not found, stale,
//! use-after-free, short read), `PermissionError` (auth), `MemoryError` (budget),
//! `ValueError` (invalid argument), `RuntimeError` (backend, drain), `TimeoutError`.

use std::fmt;

/// `Result` with ferry's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every error a ferry library call can return.
///
/// Errors serialize (serde, externally tagged by variant name), so the daemon sends the exact
/// error to its clients and a client returns the same variant a local store would.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum Error {
    /// The caller passed something that can never work (empty put, bad shape, bad option).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A dtype string that ferry does not know.
    #[error(
        "unsupported feature dtype {dtype:?}: expected one of float32, float64, float16, bfloat16, int64, int32, int16, int8, uint8, bool"
    )]
    UnknownDtype {
        /// The dtype string as found.
        dtype: String,
    },

    /// A JSON document that does not parse, or has unknown or missing fields.
    #[error("{context}: {message}")]
    Json {
        /// What was being read (e.g. "SampleRef JSON", "manifest /x/manifest.json").
        context: String,
        /// serde's description, which names the offending field and position.
        message: String,
    },

    /// The sample or object is not available: freed, stale, or never written.
    #[error("{what} is not available (freed, stale, or never written)")]
    NotFound {
        /// What was asked for, e.g. `sample "s0" generation 3` or an object key.
        what: String,
    },

    /// A ref names an older generation than the one the store now holds (the sample was
    /// re-put); its bytes are gone and must never alias the new ones.
    #[error(
        "stale ref for sample {sample_id:?}: ref generation {ref_generation}, store holds generation {current_generation}; fetch the newer ref"
    )]
    StaleRef {
        /// The sample.
        sample_id: String,
        /// Generation the ref asked for.
        ref_generation: u64,
        /// Generation the store holds.
        current_generation: u64,
    },

    /// The sample's generation was released or aborted; reading it again is refused even if a
    /// lazy backend still holds the bytes.
    #[error("sample {sample_id:?} generation {generation} was released/aborted; refusing use-after-free")]
    UseAfterFree {
        /// The sample.
        sample_id: String,
        /// The freed generation.
        generation: u64,
    },

    /// An object held fewer bytes than its spec says: never hand back an uninitialised tail.
    #[error("short read for {key}: got {got} of {expected} bytes (object truncated or corrupt)")]
    ShortRead {
        /// The object key.
        key: String,
        /// Bytes actually read.
        got: u64,
        /// Bytes the spec requires.
        expected: u64,
    },

    /// Admitting a put would exceed the store's resident-byte budget.
    #[error(
        "store {store_id} over budget: put of {requested} bytes with {resident} bytes resident exceeds max_resident_bytes={budget}; the consumer is behind (release or ack samples, or raise the budget)"
    )]
    OverBudget {
        /// The store.
        store_id: String,
        /// Bytes the put needs.
        requested: u64,
        /// Bytes resident (and reserved) when it was refused.
        resident: u64,
        /// The budget.
        budget: u64,
    },

    /// A missing or wrong shared secret.
    #[error("{context}: auth required and token missing/mismatched (check FERRY_AUTH_TOKEN / DISAGG_AUTH_TOKEN)")]
    AuthFailed {
        /// Where it was checked.
        context: String,
    },

    /// A backend operation failed (other than a clean not-found or short read).
    #[error("{backend} backend: {operation} {key}: {message}")]
    Backend {
        /// Backend name (`memory`, `shared_dir`, ...).
        backend: String,
        /// Operation (`write`, `read`, `remove`, ...).
        operation: String,
        /// Object or sample key.
        key: String,
        /// The cause.
        message: String,
    },

    /// An I/O error, with the path or action that caused it.
    #[error("{context}: {message} ({kind:?})")]
    Io {
        /// Path or action.
        context: String,
        /// The OS error kind.
        #[serde(with = "io_kind")]
        kind: std::io::ErrorKind,
        /// The OS message.
        message: String,
    },

    /// A file or frame that is malformed: truncated, bad header, wrong sizes.
    #[error("corrupt {what}: {message}")]
    Corrupt {
        /// What was being read.
        what: String,
        /// What is wrong with it.
        message: String,
    },

    /// A bounded drain gave up with removals still pending; their bookkeeping is kept.
    #[error("{}", DrainIncompleteDisplay(self))]
    DrainIncomplete {
        /// The store.
        store_id: String,
        /// Samples still pending removal.
        pending: usize,
        /// Attempts made.
        attempts: u32,
        /// Up to 16 of the pending sample ids.
        sample_ids: Vec<String>,
        /// The last removal errors seen.
        last_errors: Vec<String>,
    },

    /// A wait ran past its deadline.
    #[error("timed out after {waited_ms} ms waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long it waited.
        waited_ms: u64,
    },

    /// An offline feature file lacks raw keys its strategy needs (SpecForge's `KeyError`
    /// "... missing required offline feature keys [...]").
    #[error("{}", MissingFeatureKeysDisplay(self))]
    MissingFeatureKeys {
        /// The feature file.
        path: String,
        /// The sample it was read for, if known.
        sample_id: Option<String>,
        /// The raw keys that are missing, in the strategy's order.
        missing: Vec<String>,
        /// The keys the file does hold, in its order (to tell which strategy wrote it).
        present: Vec<String>,
    },

    /// An error a remote peer (the `ferry serve` daemon) reported. `exception` is the Python
    /// exception class of the original error ([`Error::python_exception`]), so the caller can
    /// still tell, for example, a freed sample (`KeyError`) from a full store (`MemoryError`).
    #[error("{message} (reported by {peer})")]
    Remote {
        /// Who reported it (the daemon's address).
        peer: String,
        /// The original error's Python exception class.
        exception: String,
        /// The original error's message.
        message: String,
    },

    /// A peer of the control plane failed and said why: the producer (`.failed` beside a ref
    /// channel), the consumer (`.consumer_failed`), or the ref distributor (`.failed` beside an
    /// inbox). Every reader of that channel sees the same reason.
    #[error("{channel}: {peer} failed: {reason}")]
    PeerFailed {
        /// The channel or inbox path (or URI) the failure was read from.
        channel: String,
        /// Who failed (`producer`, `consumer`, `ref-distributor`).
        peer: String,
        /// Their reason, as they wrote it.
        reason: String,
    },

    /// A peer of a data-parallel group is gone: its connection closed mid-round (its process
    /// died, or it failed and left the group). A crash of one rank is a crash of the consumer:
    /// the survivors stop without publishing a terminal failure, and the attempt resumes.
    #[error("{context}: {message}")]
    PeerLost {
        /// The group and rank that noticed.
        context: String,
        /// What was seen.
        message: String,
    },

    /// A control-plane protocol rule was broken: an acknowledgement that is not the leased
    /// prefix, a counter that moved backwards, a consumer quantum changed across a resume, a
    /// half-dispatched window at end of stream. Retrying the same call cannot succeed.
    #[error("{context}: {message}")]
    Protocol {
        /// The channel, queue or ledger involved.
        context: String,
        /// The rule and what was seen.
        message: String,
    },

    /// A failure every data-parallel rank raises identically, because the ranks agreed on it
    /// through a collective (rank 0's durable commit failed, or some rank's cleanup did).
    #[error("{message}")]
    Collective {
        /// What failed and where, the same text on every rank.
        message: String,
    },

    /// An operation failed, and handling that failure (recording it, cleaning up after it)
    /// failed too. `primary` is the original error; the rest say what else went wrong.
    #[error("{}", FailureHandlingDisplay(self))]
    FailureHandling {
        /// The original error.
        primary: Box<Error>,
        /// Why the failure could not be recorded (e.g. writing a `.failed` sentinel), if so.
        record_error: Option<String>,
        /// What cleanup could not undo.
        cleanup_errors: Vec<String>,
    },
}

/// `std::io::ErrorKind` by its `Debug` name; kinds this module does not list read back as
/// `Other` (the message still says what happened).
mod io_kind {
    use std::io::ErrorKind;

    const KINDS: [ErrorKind; 24] = [
        ErrorKind::NotFound,
        ErrorKind::PermissionDenied,
        ErrorKind::ConnectionRefused,
        ErrorKind::ConnectionReset,
        ErrorKind::ConnectionAborted,
        ErrorKind::NotConnected,
        ErrorKind::AddrInUse,
        ErrorKind::AddrNotAvailable,
        ErrorKind::BrokenPipe,
        ErrorKind::AlreadyExists,
        ErrorKind::WouldBlock,
        ErrorKind::InvalidInput,
        ErrorKind::InvalidData,
        ErrorKind::TimedOut,
        ErrorKind::WriteZero,
        ErrorKind::Interrupted,
        ErrorKind::Unsupported,
        ErrorKind::UnexpectedEof,
        ErrorKind::OutOfMemory,
        ErrorKind::IsADirectory,
        ErrorKind::NotADirectory,
        ErrorKind::StorageFull,
        ErrorKind::DirectoryNotEmpty,
        ErrorKind::Other,
    ];

    pub(super) fn serialize<S: serde::Serializer>(kind: &ErrorKind, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{kind:?}"))
    }

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ErrorKind, D::Error> {
        let name: String = serde::Deserialize::deserialize(d)?;
        Ok(KINDS.into_iter().find(|k| format!("{k:?}") == name).unwrap_or(ErrorKind::Other))
    }
}

/// A list of names the way Python's `repr` prints a list of strings: `['a', 'b']`.
fn python_list(names: &[String]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("'{n}'")).collect();
    format!("[{}]", quoted.join(", "))
}

struct MissingFeatureKeysDisplay<'a>(&'a Error);

impl fmt::Display for MissingFeatureKeysDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Error::MissingFeatureKeys { path, sample_id, missing, present } = self.0 {
            write!(f, "{path} missing required offline feature keys {}", python_list(missing))?;
            if let Some(sample_id) = sample_id {
                write!(f, " (sample {sample_id})")?;
            }
            if present.is_empty() {
                write!(f, "; the file holds no tensors")?;
            } else {
                write!(f, "; the file holds {}", python_list(present))?;
            }
        }
        Ok(())
    }
}

struct FailureHandlingDisplay<'a>(&'a Error);

impl fmt::Display for FailureHandlingDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Error::FailureHandling { primary, record_error, cleanup_errors } = self.0 {
            write!(f, "{}: {primary}", primary.python_exception())?;
            if let Some(record_error) = record_error {
                write!(f, "; recording the failure failed: {record_error}")?;
            }
            if !cleanup_errors.is_empty() {
                write!(
                    f,
                    "; cleanup did not remove every sample the attempt published: {}",
                    cleanup_errors.join("; ")
                )?;
            }
        }
        Ok(())
    }
}

struct DrainIncompleteDisplay<'a>(&'a Error);

impl fmt::Display for DrainIncompleteDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Error::DrainIncomplete { store_id, pending, attempts, sample_ids, last_errors } = self.0 {
            write!(
                f,
                "store {store_id} could not drain {pending} pending removal(s) after {attempts} attempts: {}",
                sample_ids.join(", ")
            )?;
            if !last_errors.is_empty() {
                write!(f, "; last errors=[{}]", last_errors.join("; "))?;
            }
        }
        Ok(())
    }
}

/// The exception names [`Error::python_exception`] can return, so a name carried over the wire
/// maps back to a `'static` one (an unknown name counts as `RuntimeError`).
const PYTHON_EXCEPTIONS: [&str; 13] = [
    "KeyError",
    "ValueError",
    "MemoryError",
    "PermissionError",
    "TimeoutError",
    "FileNotFoundError",
    "FileExistsError",
    "IsADirectoryError",
    "NotADirectoryError",
    "InterruptedError",
    "OSError",
    "RuntimeError",
    "ConnectionError",
];

fn known_exception(name: &str) -> &'static str {
    PYTHON_EXCEPTIONS.into_iter().find(|known| *known == name).unwrap_or("RuntimeError")
}

impl Error {
    /// An I/O error with the path or action that caused it.
    pub fn io(context: impl Into<String>, err: &std::io::Error) -> Self {
        Error::Io { context: context.into(), kind: err.kind(), message: err.to_string() }
    }

    /// A wait for `what` that ran `waited` past its deadline.
    pub fn timeout(what: impl Into<String>, waited: std::time::Duration) -> Self {
        Error::Timeout { what: what.into(), waited_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX) }
    }

    /// `true` for the errors SpecForge raises as `KeyError`: the sample or object is not there
    /// (not found, stale ref, use-after-free, short read).
    pub fn is_not_available(&self) -> bool {
        self.python_exception() == "KeyError"
    }

    /// The name of the Python exception SpecForge raises for this error (the `<ExcType>` of a
    /// `.failed` sentinel's `"<ExcType>: <message>"`). The one place this mapping lives.
    pub fn python_exception(&self) -> &'static str {
        match self {
            Error::NotFound { .. }
            | Error::StaleRef { .. }
            | Error::UseAfterFree { .. }
            | Error::ShortRead { .. }
            | Error::MissingFeatureKeys { .. } => "KeyError",
            Error::InvalidArgument(_) | Error::UnknownDtype { .. } | Error::Json { .. } | Error::Corrupt { .. } => {
                "ValueError"
            }
            Error::OverBudget { .. } => "MemoryError",
            Error::AuthFailed { .. } => "PermissionError",
            Error::Timeout { .. } => "TimeoutError",
            Error::Io { kind, .. } => match kind {
                std::io::ErrorKind::NotFound => "FileNotFoundError",
                std::io::ErrorKind::AlreadyExists => "FileExistsError",
                std::io::ErrorKind::PermissionDenied => "PermissionError",
                std::io::ErrorKind::IsADirectory => "IsADirectoryError",
                std::io::ErrorKind::NotADirectory => "NotADirectoryError",
                std::io::ErrorKind::Interrupted => "InterruptedError",
                std::io::ErrorKind::TimedOut => "TimeoutError",
                _ => "OSError",
            },
            Error::Backend { .. }
            | Error::DrainIncomplete { .. }
            | Error::FailureHandling { .. }
            | Error::PeerFailed { .. }
            | Error::Protocol { .. }
            | Error::Collective { .. } => "RuntimeError",
            Error::PeerLost { .. } => "ConnectionError",
            Error::Remote { exception, .. } => known_exception(exception),
        }
    }

    /// `true` when a peer's process is gone rather than something having failed: a lost group
    /// connection, or a peer's failure reported as a `ConnectionError` (a rank that saw rank 0's
    /// process end). Such an attempt is resumable, so no terminal failure is published for it.
    pub fn is_peer_loss(&self) -> bool {
        match self.primary() {
            Error::PeerLost { .. } => true,
            // A relayed reason keeps the original on its last line ("ref-distributor died:\n…").
            Error::PeerFailed { reason, .. } => {
                reason.rsplit('\n').next().is_some_and(|last| last.starts_with("ConnectionError:"))
            }
            _ => false,
        }
    }

    /// SpecForge's failure-reason text, `"<ExcType>: <message>"` (what `.failed` holds).
    pub fn python_reason(&self) -> String {
        format!("{}: {self}", self.python_exception())
    }

    /// The original error: the `primary` of [`Error::FailureHandling`], else `self`.
    pub fn primary(&self) -> &Error {
        match self {
            Error::FailureHandling { primary, .. } => primary.primary(),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_gone_peer_is_a_peer_loss() {
        let lost = Error::PeerLost { context: "collective all-gather on rank 0".into(), message: "EOF".into() };
        assert!(lost.is_peer_loss());
        assert_eq!(lost.python_exception(), "ConnectionError");
        let relayed = |reason: &str| Error::PeerFailed {
            channel: "inbox-rank1.jsonl".into(),
            peer: "ref-distributor".into(),
            reason: reason.into(),
        };
        assert!(relayed("ref-distributor died:\nConnectionError: rank 0 is gone").is_peer_loss());
        assert!(relayed("ConnectionError: rank 0 is gone").is_peer_loss());
        assert!(!relayed("ref-distributor died:\nRuntimeError: ledger locked").is_peer_loss());
        let wrapped = Error::FailureHandling { primary: Box::new(lost), record_error: None, cleanup_errors: vec![] };
        assert!(wrapped.is_peer_loss());
        assert!(!Error::Collective { message: "rank 1 failed".into() }.is_peer_loss());
        assert!(!Error::timeout("a collective round", std::time::Duration::from_secs(1)).is_peer_loss());
    }

    #[test]
    fn errors_survive_a_json_round_trip() {
        let errors = [
            Error::InvalidArgument("x".into()),
            Error::StaleRef { sample_id: "s".into(), ref_generation: 1, current_generation: 2 },
            Error::io("reading /x", &std::io::Error::from(std::io::ErrorKind::StorageFull)),
            Error::io("reading /x", &std::io::Error::other("odd")),
            Error::FailureHandling {
                primary: Box::new(Error::Timeout { what: "t".into(), waited_ms: 3 }),
                record_error: None,
                cleanup_errors: vec!["c".into()],
            },
        ];
        for e in errors {
            let json = serde_json::to_string(&e).unwrap_or_default();
            let back: Error = serde_json::from_str(&json).unwrap_or_else(|_| Error::InvalidArgument(json.clone()));
            assert_eq!(back, e, "{json}");
        }
    }

    #[test]
    fn python_exception_names_follow_specforge() {
        let missing = Error::MissingFeatureKeys {
            path: "/d/b.ckpt".into(),
            sample_id: Some("disagg:00000001".into()),
            missing: vec!["aux_hidden_state".into()],
            present: vec!["input_ids".into(), "hidden_states".into()],
        };
        assert_eq!(
            missing.to_string(),
            "/d/b.ckpt missing required offline feature keys ['aux_hidden_state'] (sample disagg:00000001); the file holds ['input_ids', 'hidden_states']"
        );
        assert_eq!(missing.python_exception(), "KeyError");
        assert!(missing.is_not_available());
        assert_eq!(Error::InvalidArgument("x".into()).python_reason(), "ValueError: invalid argument: x");
        assert_eq!(Error::Timeout { what: "p".into(), waited_ms: 1 }.python_exception(), "TimeoutError");
        let io = Error::io("writing /m.failed", &std::io::Error::from(std::io::ErrorKind::StorageFull));
        assert_eq!(io.python_exception(), "OSError");
        let combined = Error::FailureHandling {
            primary: Box::new(missing.clone()),
            record_error: Some(io.to_string()),
            cleanup_errors: vec!["remove failed".into()],
        };
        assert_eq!(combined.python_exception(), "RuntimeError");
        assert_eq!(combined.primary(), &missing);
        let text = combined.to_string();
        assert!(text.starts_with("KeyError: /d/b.ckpt missing required"), "{text}");
        assert!(text.contains("; recording the failure failed: writing /m.failed"), "{text}");
        assert!(text.ends_with("cleanup did not remove every sample the attempt published: remove failed"), "{text}");
    }
}
