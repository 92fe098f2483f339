//! The metadata of each op: small JSON objects carried between the frame header and the raw
//! payload (see `docs/PROTOCOL.md`). Tensors never appear here; a message that has tensor bytes
//! lists their names, dtypes and shapes, and the bytes follow as the payload in that order.

use ferry_core::{DType, Error, FeatureHandle, JsonMap, Result, SampleRef, TensorView};
use serde::{Deserialize, Serialize};

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

/// Server → client on connect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// The protocol version the server speaks.
    pub version: u16,
    /// The store the daemon serves.
    pub store_id: String,
    /// The largest payload the daemon accepts.
    pub max_payload: u64,
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

/// A reply carrying a ref (`Put`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefReply {
    /// The ref.
    pub r#ref: SampleRef,
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
}

/// The reply to `Get`: the lease and the tensors whose bytes follow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetReply {
    /// The read lease; release it with `Release`.
    pub handle: FeatureHandle,
    /// The tensors, in payload order.
    pub tensors: Vec<WireTensor>,
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

/// `AbortAll`'s reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountReply {
    /// How many samples were affected.
    pub count: u64,
}

/// An `ERROR` reply: the original error's Python exception class and message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorReply {
    /// [`Error::python_exception`] of the error.
    pub exception: String,
    /// Its message.
    pub message: String,
}

impl ErrorReply {
    /// The reply for an error.
    pub fn of(error: &Error) -> ErrorReply {
        ErrorReply { exception: error.python_exception().to_owned(), message: error.to_string() }
    }

    /// The error a client returns for this reply from `peer`.
    pub fn into_error(self, peer: &str) -> Error {
        Error::Remote { peer: peer.to_owned(), exception: self.exception, message: self.message }
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
