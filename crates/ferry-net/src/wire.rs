//! The metadata of each op: small JSON objects carried between the frame header and the raw
//! payload (see `docs/PROTOCOL.md`). Tensors never appear here; a message that has tensor bytes
//! lists their names, dtypes and shapes, and the bytes follow as the payload in that order.

use ferry_core::{DType, Error, FeatureHandle, JsonMap, Result, SampleRef, TensorView, ViewSpec};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One tensor whose bytes travel in the payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireTensor {
    /// Feature name.
    pub name: String,
    /// SpecForge dtype name (`bfloat16`, `int64`, ...).
    pub dtype: String,
    /// Shape, row-major.
    pub shape: Vec<u64>,
}

impl WireTensor {
    /// Describes a tensor view.
    pub fn of(name: &str, view: &TensorView<'_>) -> WireTensor {
        WireTensor { name: name.to_owned(), dtype: view.dtype().name().to_owned(), shape: view.shape().to_vec() }
    }

    /// The dtype, parsed.
    pub fn dtype(&self) -> Result<DType> {
        DType::parse(&self.dtype)
    }

    /// Bytes of the tensor; an overflowing shape is an error.
    pub fn nbytes(&self) -> Result<u64> {
        self.dtype()?.nbytes_of(&self.shape).ok_or_else(|| {
            Error::InvalidArgument(format!("tensor {:?} has shape {:?}, whose size overflows", self.name, self.shape))
        })
    }
}

/// Total payload bytes of a list of tensors.
pub fn payload_len(tensors: &[WireTensor]) -> Result<u64> {
    tensors.iter().try_fold(0u64, |acc, t| {
        acc.checked_add(t.nbytes()?).ok_or_else(|| Error::InvalidArgument("payload size overflows".into()))
    })
}

/// How a reply's bytes travelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    /// Through the daemon's shared-memory arena (same node): the client copied (or borrowed)
    /// the bytes straight from or into the arena; the socket carried only metadata.
    Shm,
    /// As the frame's payload over TCP.
    Tcp,
    /// As the frame's payload over a Unix socket (same node, no arena).
    Unix,
}

impl Route {
    /// Its name in replies and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Route::Shm => "shm",
            Route::Tcp => "tcp",
            Route::Unix => "unix",
        }
    }
}

/// Server → client on connect: the protocol, the store, and the authentication challenge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// The protocol version the server speaks.
    pub version: u16,
    /// The store the daemon serves.
    pub store_id: String,
    /// The largest payload the daemon accepts.
    pub max_payload: u64,
    /// A fresh random nonce (hex) the client's `Auth` must answer.
    pub challenge: String,
    /// Whether the daemon requires the shared secret.
    pub auth_required: bool,
    /// Whether this listener can hand out the shared-memory arena (Unix socket only).
    pub shm: bool,
}

/// Client → server, the first request: the challenge answered with the shared secret (which
/// never crosses the wire), and whether the client wants the shared-memory route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthRequest {
    /// HMAC-SHA256 over the challenge (see `docs/PROTOCOL.md`), hex; absent without a secret.
    #[serde(default)]
    pub response: Option<String>,
    /// The client's own nonce (hex), which the daemon's proof answers.
    pub client_nonce: String,
    /// Ask for the arena's descriptor.
    #[serde(default)]
    pub want_shm: bool,
    /// The session owns every sample it puts: when the connection ends, the daemon aborts the
    /// ones not disowned (`Disown`). Sent only when true, so a client that does not ask for it
    /// still attaches to a daemon that predates it (which refuses the field, so an owning
    /// client never runs unguarded).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub owned_puts: bool,
}

/// The reply to `Auth`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthReply {
    /// The daemon's proof that it knows the secret too (HMAC over the client's nonce), hex.
    #[serde(default)]
    pub proof: Option<String>,
    /// Present when the arena's descriptor follows (one byte sent with `SCM_RIGHTS`).
    #[serde(default)]
    pub arena: Option<ArenaGrant>,
}

/// The arena a client maps for the shared-memory route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArenaGrant {
    /// Its size in bytes.
    pub capacity: u64,
    /// Its name (as `/proc/<pid>/fd` shows it).
    pub name: String,
}

/// `Put`: a sample; its tensors' bytes are the payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutRequest {
    /// The sample.
    pub sample_id: String,
    /// Ref metadata.
    pub metadata: JsonMap,
    /// The tensors, in payload order.
    pub tensors: Vec<WireTensor>,
    /// Wait this long for room in the store's budget (`put_until`); none fails at once.
    #[serde(default)]
    pub wait_ms: Option<u64>,
}

/// A reply carrying a ref (`Put`, `PutCommit`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefReply {
    /// The ref.
    pub r#ref: SampleRef,
    /// How the bytes travelled.
    pub route: Route,
}

/// One object's place in the arena (shared-memory route).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// Byte offset in the arena.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
}

/// The reply to `PutAlloc`: where to write each tensor (in the request's order), and the id to
/// commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutAllocReply {
    /// Names this reservation in `PutCommit`.
    pub put_id: u64,
    /// One placement per tensor.
    pub placements: Vec<Placement>,
}

/// `PutCommit`: publish (or, with `cancel`, drop) a reservation the client wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutCommitRequest {
    /// From [`PutAllocReply`].
    pub put_id: u64,
    /// Drop the reservation instead of publishing it.
    #[serde(default)]
    pub cancel: bool,
}

/// `Get`: features of a sample (all of the ref's when `names` is absent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetRequest {
    /// The ref.
    pub r#ref: SampleRef,
    /// The features wanted.
    #[serde(default)]
    pub names: Option<Vec<String>>,
    /// Answer with arena placements instead of payload bytes (shared-memory route).
    #[serde(default)]
    pub shm: bool,
    /// Parts of features to read instead of the whole (feature name -> view): the daemon
    /// ships only the view's bytes, and the reply lists the view's shape. Over the
    /// shared-memory route the placements stay the whole feature's and the client copies the
    /// view's ranges out of its mapping. Absent (not `null`) when no view is asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub views: Option<BTreeMap<String, ViewSpec>>,
}

/// The reply to `Get`: the lease and the tensors whose bytes follow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetReply {
    /// The read lease; release it with `Release`.
    pub handle: FeatureHandle,
    /// The tensors, in payload order.
    pub tensors: Vec<WireTensor>,
    /// How the bytes travel.
    pub route: Route,
    /// With [`Route::Shm`], where each tensor lies in the arena (pinned until the lease is
    /// released); the frame has no payload.
    #[serde(default)]
    pub placements: Option<Vec<Placement>>,
}

/// `Release`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    /// The handle a `Get` returned.
    pub handle: FeatureHandle,
}

/// `Abort`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AbortRequest {
    /// The sample to free.
    pub sample_id: String,
}

/// `Adopt`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdoptRequest {
    /// The ref to adopt.
    pub r#ref: SampleRef,
}

/// `Drain`: every pending removal, or only those of `sample_ids`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    /// Restrict the drain to these samples.
    #[serde(default)]
    pub sample_ids: Option<Vec<String>>,
    /// Attempts.
    pub max_attempts: u32,
    /// Pause between attempts, milliseconds.
    pub retry_interval_ms: u64,
}

/// `TrackExternal`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrackExternalRequest {
    /// The sample.
    pub sample_id: String,
    /// The generation the external writer used.
    pub generation: u64,
    /// The objects it may have written.
    pub feature_names: Vec<String>,
}

/// `Disown`: samples the session hands over to the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisownRequest {
    /// The samples.
    pub sample_ids: Vec<String>,
}

/// `AbortAll`'s reply (and `DiscardExternal`'s, and `Disown`'s: how many the session owned).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountReply {
    /// How many samples were affected.
    pub count: u64,
}

/// An `ERROR` reply: the original error itself, plus its Python exception class and message
/// for peers that do not know the variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorReply {
    /// [`Error::python_exception`] of the error.
    pub exception: String,
    /// Its message.
    pub message: String,
    /// The error, as serialized by `ferry_core`.
    #[serde(default)]
    pub error: Option<Error>,
}

impl ErrorReply {
    /// The reply for an error.
    pub fn of(error: &Error) -> ErrorReply {
        ErrorReply {
            exception: error.python_exception().to_owned(),
            message: error.to_string(),
            error: Some(error.clone()),
        }
    }

    /// The error a client returns for this reply from `peer`: the daemon's own error when it
    /// sent one (a client matches the same variants as with a local store), else
    /// [`Error::Remote`].
    pub fn into_error(self, peer: &str) -> Error {
        match self.error {
            Some(e) => e,
            None => Error::Remote { peer: peer.to_owned(), exception: self.exception, message: self.message },
        }
    }
}

/// Encodes a message as metadata bytes.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(message)
        .map_err(|e| Error::Json { context: "encoding ferry frame metadata".into(), message: e.to_string() })
}

/// Decodes metadata bytes; unknown or missing fields are errors naming them.
pub fn decode<T: serde::de::DeserializeOwned>(meta: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(meta)
        .map_err(|e| Error::Json { context: format!("{what} metadata"), message: e.to_string() })
}
