//! `ferry.open_store_with_backend`: a Python object as the byte backend under ferry's lifecycle
//! core. This is how Mooncake's Python client (`mooncake.store.MooncakeDistributedStore`) plugs
//! in, unchanged: the protocol is its raw-buffer API, as SpecForge's `MooncakeFeatureStore`
//! uses it (`SPECFORGE-RUNTIME.md` §6.1):
//!
//! * `put_from(key, buffer_ptr, size[, config])` → `0` (or `None`); negative is a failure.
//! * `get_into(key, buffer_ptr, size)` → bytes read (the object's size); negative is a failure,
//!   `-704` (`OBJECT_NOT_FOUND`) a missing object. Mooncake refuses a buffer smaller than the
//!   object (a negative status: `-600`, INVALID_PARAMS, from the 0.3.13 client); a prefix read
//!   then asks `get_size(key)` and reads through a scratch buffer.
//! * `remove(key[, force=True])` → `0` (or `None`); `-704` means already gone, `-706`
//!   (`OBJECT_HAS_LEASE`) that a read lease (granted by every `get_into` and `is_exist`) holds it:
//!   a failure, parked and retried by `gc`/`drain` (a drain forces).
//! * `is_exist(key)` → `1` present, `0` absent, negative an error.
//! * optional: `batch_put_from(keys, ptrs, sizes[, config])` and `batch_get_into(keys, ptrs,
//!   sizes)` (lists of the single calls' codes), `get_size(key)`, `register_buffer(ptr, size)` /
//!   `unregister_buffer(ptr)` around each transfer (RDMA needs registered memory; their errors
//!   are ignored, as SpecForge ignores them).
//!
//! Keys are SpecForge's Mooncake layout, `{store_id}/{sample_id}/g{generation}/{name}`, one raw
//! little-endian object per tensor. An empty tensor (zero bytes) gets no object: the real
//! Mooncake stores none (`put_from` of 0 bytes returns 0 and stores nothing; `batch_put_from`
//! refuses it with `-600`, INVALID_PARAMS), so ferry never sends one and reads a zero-byte
//! feature without fetching anything (its spec says it is empty). Buffers cross as addresses:
//! `put_from` gets the address of the caller's array itself, `get_into` the address of the
//! destination (the caller's array for `Store.get_into`, ferry's pooled buffer for
//! `Store.get`): no copy besides the client's own.
//!
//! The GIL is taken only inside each backend call; the lifecycle core calls backends with no
//! lock held and the `Store` methods release the GIL before calling the core. A Python
//! exception becomes a `Backend` error carrying its text; a not-found code a `NotFound`.

use crate::arrays::Bf16Mode;
use crate::errors::{IntoPyResult, invalid, to_py};
use crate::store::Store;
use ferry_core::{Error, Generation, Result, SampleId, StoreId};
use ferry_store::backend::{ByteBackend, ObjectData, ObjectKey, Removal, SampleKey};
use ferry_store::{AuthPolicy, FeatureStore, Secret, StoreOptions};
use pyo3::call::PyCallArgs;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Mooncake's `ErrorCode::OBJECT_NOT_FOUND`.
pub(crate) const OBJECT_NOT_FOUND: i64 = -704;

/// The methods a client must have (SpecForge's validator checks exactly these).
const REQUIRED: [&str; 4] = ["is_exist", "remove", "put_from", "get_into"];

/// A Python object (a Mooncake client, or anything with its methods) as a [`ByteBackend`].
pub(crate) struct PyBackend {
    client: Py<PyAny>,
    /// Passed as `put_from`'s fourth argument when set (Mooncake's `ReplicateConfig`).
    replicate_config: Option<Py<PyAny>>,
    scheme: String,
    register: bool,
    unregister: bool,
    batch_put: bool,
    batch_get: bool,
    get_size: bool,
    /// Cleared the first time `remove(key, force=True)` is a `TypeError` (an older binding).
    force_kw: AtomicBool,
}

fn has_callable(obj: &Bound<'_, PyAny>, name: &str) -> bool {
    obj.getattr(name).is_ok_and(|a| a.is_callable())
}

impl PyBackend {
    /// Checks the client's methods and notes which optional ones it has.
    fn new(
        client: &Bound<'_, PyAny>,
        replicate_config: Option<Py<PyAny>>,
        scheme: String,
        register_buffers: bool,
    ) -> Result<PyBackend> {
        let missing: Vec<&str> = REQUIRED.into_iter().filter(|m| !has_callable(client, m)).collect();
        if !missing.is_empty() {
            return Err(Error::Backend {
                backend: "python".into(),
                operation: "open".into(),
                key: String::new(),
                message: format!(
                    "the backend client lacks {}: ferry needs the raw-buffer API put_from/get_into (plus is_exist, \
                     remove). Upgrade the Mooncake client. The old serialized put/get transport is not supported.",
                    missing.join(", ")
                ),
            });
        }
        Ok(PyBackend {
            client: client.clone().unbind(),
            replicate_config,
            scheme,
            register: register_buffers && has_callable(client, "register_buffer"),
            unregister: register_buffers && has_callable(client, "unregister_buffer"),
            batch_put: has_callable(client, "batch_put_from"),
            batch_get: has_callable(client, "batch_get_into"),
            get_size: has_callable(client, "get_size"),
            force_kw: AtomicBool::new(true),
        })
    }

    fn error(operation: &str, key: impl Into<String>, message: impl Into<String>) -> Error {
        Error::Backend {
            backend: "python".into(),
            operation: operation.into(),
            key: key.into(),
            message: message.into(),
        }
    }

    /// A Python exception raised by the client, as a `Backend` error with its text.
    fn raised(py: Python<'_>, operation: &str, key: &str, err: &PyErr) -> Error {
        let text = match err.value(py).str() {
            Ok(s) => format!("{}: {s}", err.get_type(py).name().map_or_else(|_| "?".into(), |n| n.to_string())),
            Err(_) => err.to_string(),
        };
        Self::error(operation, key, format!("the client raised {text}"))
    }

    /// An integer status (`None` counts as `0`, `True`/`False` as `1`/`0`).
    fn status(operation: &str, key: &str, value: &Bound<'_, PyAny>) -> Result<i64> {
        if value.is_none() {
            return Ok(0);
        }
        value.extract::<i64>().map_err(|_| {
            let shown = value.repr().map_or_else(|_| "?".into(), |r| r.to_string());
            Self::error(operation, key, format!("the client returned {shown}, expected an integer status"))
        })
    }

    fn call<'py>(&self, py: Python<'py>, operation: &str, key: &str, args: impl PyCallArgs<'py>) -> Result<i64> {
        let out =
            self.client.bind(py).call_method1(operation, args).map_err(|e| Self::raised(py, operation, key, &e))?;
        Self::status(operation, key, &out)
    }

    /// `register_buffer(ptr, size)` when the client has it; errors are ignored (some builds
    /// register automatically; TCP ignores registration).
    fn register(&self, py: Python<'_>, ptr: usize, size: usize) {
        if self.register && size > 0 {
            let _ = self.client.bind(py).call_method1("register_buffer", (ptr, size));
        }
    }

    fn unregister(&self, py: Python<'_>, ptr: usize, size: usize) {
        if self.unregister && size > 0 {
            let _ = self.client.bind(py).call_method1("unregister_buffer", (ptr,));
        }
    }

    /// The object's size from `get_size`, `None` if absent.
    fn size_of(&self, py: Python<'_>, key: &str) -> Result<Option<u64>> {
        if !self.get_size {
            return Err(Self::error("get_size", key, "the client has no get_size"));
        }
        match self.call(py, "get_size", key, (key,))? {
            OBJECT_NOT_FOUND => Ok(None),
            n if n < 0 => Err(Self::error("get_size", key, format!("get_size failed (status {n})"))),
            n => Ok(Some(n as u64)),
        }
    }

    /// What a `get_into` status means for a read of `key` into `dst`: the object's size, or a
    /// failure. A refused read into a buffer smaller than the object (a prefix read: Mooncake
    /// wants room for the whole object) is redone through a scratch buffer of its full size.
    fn settle_get(&self, py: Python<'_>, key: &str, status: i64, dst: &mut [u8]) -> Result<usize> {
        if status >= 0 {
            return Ok(status as usize);
        }
        if status == OBJECT_NOT_FOUND {
            return Err(Error::NotFound { what: format!("object {key}") });
        }
        if self.get_size
            && let Some(size) = self.size_of(py, key)?
            && size as usize > dst.len()
        {
            let mut scratch = vec![0u8; size as usize];
            let ptr = scratch.as_mut_ptr() as usize;
            self.register(py, ptr, scratch.len());
            let got = self.call(py, "get_into", key, (key, ptr, scratch.len()));
            self.unregister(py, ptr, scratch.len());
            let got = got?;
            if got < 0 {
                return self.settle_get(py, key, got, &mut []).map(|_| 0);
            }
            let n = (got as usize).min(dst.len());
            dst[..n].copy_from_slice(&scratch[..n]);
            return Ok(got as usize);
        }
        Err(Self::error("get_into", key, format!("get_into failed (status {status})")))
    }

    /// Removes `keys` (best effort), for a write that failed part way.
    fn remove_quietly(&self, py: Python<'_>, keys: &[String]) {
        for key in keys {
            let _ = self.client.bind(py).call_method1("remove", (key,));
        }
    }

    fn remove_one(&self, py: Python<'_>, key: &str, force: bool) -> Result<()> {
        let client = self.client.bind(py);
        let out = if force && self.force_kw.load(Ordering::Relaxed) {
            let kwargs = PyDict::new(py);
            kwargs.set_item("force", true).map_err(|e| Self::raised(py, "remove", key, &e))?;
            match client.call_method("remove", (key,), Some(&kwargs)) {
                Err(e) if e.is_instance_of::<PyTypeError>(py) => {
                    // A binding without the keyword: remember, and remove without it.
                    self.force_kw.store(false, Ordering::Relaxed);
                    client.call_method1("remove", (key,))
                }
                other => other,
            }
        } else {
            client.call_method1("remove", (key,))
        };
        let out = out.map_err(|e| Self::raised(py, "remove", key, &e))?;
        match Self::status("remove", key, &out)? {
            s if s >= 0 || s == OBJECT_NOT_FOUND => Ok(()),
            s => Err(Self::error("remove", key, format!("remove failed (status {s})"))),
        }
    }
}

impl ByteBackend for PyBackend {
    fn kind(&self) -> &'static str {
        "python"
    }

    fn write(&self, sample: SampleKey<'_>, objects: &[ObjectData<'_>]) -> Result<()> {
        // Empty tensors get no object (Mooncake holds none; see the module notes).
        let objects: Vec<&ObjectData<'_>> = objects.iter().filter(|o| !o.tensor.bytes().is_empty()).collect();
        if objects.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = objects.iter().map(|o| sample.object(o.name).to_string()).collect();
        let spans: Vec<(usize, usize)> =
            objects.iter().map(|o| (o.tensor.bytes().as_ptr() as usize, o.tensor.bytes().len())).collect();
        Python::attach(|py| {
            let config = self.replicate_config.as_ref().map(|c| c.bind(py).clone());
            for &(ptr, size) in &spans {
                self.register(py, ptr, size);
            }
            let result = if self.batch_put {
                let ptrs: Vec<usize> = spans.iter().map(|s| s.0).collect();
                let sizes: Vec<usize> = spans.iter().map(|s| s.1).collect();
                let out = match &config {
                    Some(c) => self.client.bind(py).call_method1("batch_put_from", (&keys, ptrs, sizes, c)),
                    None => self.client.bind(py).call_method1("batch_put_from", (&keys, ptrs, sizes)),
                };
                let first = keys.first().map_or("", String::as_str);
                out.map_err(|e| Self::raised(py, "batch_put_from", first, &e)).and_then(|out| {
                    let codes: Vec<Bound<'_, PyAny>> = out
                        .try_iter()
                        .and_then(|it| it.collect::<PyResult<Vec<_>>>())
                        .map_err(|e| Self::raised(py, "batch_put_from", first, &e))?;
                    if codes.len() != keys.len() {
                        return Err(Self::error(
                            "batch_put_from",
                            first,
                            format!("the client returned {} statuses for {} keys", codes.len(), keys.len()),
                        ));
                    }
                    for (key, code) in keys.iter().zip(&codes) {
                        let s = Self::status("batch_put_from", key, code)?;
                        if s < 0 {
                            return Err(Self::error("put_from", key, format!("put_from failed (status {s})")));
                        }
                    }
                    Ok(())
                })
            } else {
                keys.iter().zip(&spans).try_for_each(|(key, &(ptr, size))| {
                    let s = match &config {
                        Some(c) => self.call(py, "put_from", key, (key, ptr, size, c))?,
                        None => self.call(py, "put_from", key, (key, ptr, size))?,
                    };
                    if s < 0 {
                        return Err(Self::error("put_from", key, format!("put_from failed (status {s})")));
                    }
                    Ok(())
                })
            };
            for &(ptr, size) in &spans {
                self.unregister(py, ptr, size);
            }
            if result.is_err() {
                // All or nothing: no object of a failed generation stays behind.
                self.remove_quietly(py, &keys);
            }
            result
        })
    }

    fn read_into(&self, object: ObjectKey<'_>, dst: &mut [u8]) -> Result<usize> {
        let key = object.to_string();
        let (ptr, size) = (dst.as_mut_ptr() as usize, dst.len());
        if size == 0 {
            // An empty feature has no object (never written); a zero-byte prefix of a
            // non-empty one needs only its size. Either way there is nothing to copy.
            return Python::attach(|py| {
                if self.get_size { Ok(self.size_of(py, &key)?.map_or(0, |n| n as usize)) } else { Ok(0) }
            });
        }
        Python::attach(|py| {
            self.register(py, ptr, size);
            let status = self.call(py, "get_into", &key, (&key, ptr, size));
            self.unregister(py, ptr, size);
            self.settle_get(py, &key, status?, dst)
        })
    }

    fn read_many(&self, sample: SampleKey<'_>, reads: &mut [(&str, &mut [u8])]) -> Result<Vec<usize>> {
        if !self.batch_get || reads.len() < 2 || reads.iter().any(|(_, dst)| dst.is_empty()) {
            return reads.iter_mut().map(|(name, dst)| self.read_into(sample.object(name), dst)).collect();
        }
        let keys: Vec<String> = reads.iter().map(|(name, _)| sample.object(name).to_string()).collect();
        let ptrs: Vec<usize> = reads.iter_mut().map(|(_, dst)| dst.as_mut_ptr() as usize).collect();
        let sizes: Vec<usize> = reads.iter().map(|(_, dst)| dst.len()).collect();
        Python::attach(|py| {
            for (&ptr, &size) in ptrs.iter().zip(&sizes) {
                self.register(py, ptr, size);
            }
            let out = self.client.bind(py).call_method1("batch_get_into", (&keys, &ptrs, &sizes));
            for (&ptr, &size) in ptrs.iter().zip(&sizes) {
                self.unregister(py, ptr, size);
            }
            let out = out.map_err(|e| Self::raised(py, "batch_get_into", &keys[0], &e))?;
            let codes: Vec<Bound<'_, PyAny>> = out
                .try_iter()
                .and_then(|it| it.collect::<PyResult<Vec<_>>>())
                .map_err(|e| Self::raised(py, "batch_get_into", &keys[0], &e))?;
            if codes.len() != keys.len() {
                return Err(Self::error(
                    "batch_get_into",
                    keys[0].as_str(),
                    format!("the client returned {} statuses for {} keys", codes.len(), keys.len()),
                ));
            }
            keys.iter()
                .zip(&codes)
                .zip(reads.iter_mut())
                .map(|((key, code), (_, dst))| {
                    let status = Self::status("batch_get_into", key, code)?;
                    self.settle_get(py, key, status, dst)
                })
                .collect()
        })
    }

    fn remove(&self, sample: SampleKey<'_>, names: &[String], force: bool) -> Result<Removal> {
        Python::attach(|py| {
            // Try every object, so one refusal does not strand the others; report the first.
            let mut first_error = None;
            for name in names {
                let key = sample.object(name).to_string();
                if let Err(e) = self.remove_one(py, &key, force) {
                    first_error.get_or_insert(e);
                }
            }
            first_error.map_or(Ok(Removal::Removed), Err)
        })
    }

    fn exists(&self, object: ObjectKey<'_>) -> Result<bool> {
        let key = object.to_string();
        Python::attach(|py| match self.call(py, "is_exist", &key, (&key,))? {
            1 => Ok(true),
            0 => Ok(false),
            s => Err(Self::error("is_exist", key.as_str(), format!("is_exist failed (status {s})"))),
        })
    }

    fn size(&self, object: ObjectKey<'_>) -> Result<Option<u64>> {
        let key = object.to_string();
        Python::attach(|py| self.size_of(py, &key))
    }

    fn ref_uri(&self, store_id: &StoreId, sample_id: &SampleId, _generation: Generation) -> String {
        // SpecForge's Mooncake refs: `mooncake://<store_id>/<sample_id>`, the generation in
        // `metadata.generation` (the core adds it).
        format!("{}://{store_id}/{sample_id}", self.scheme)
    }
}

/// Opens a feature store whose bytes live in `backend`, a Python object with Mooncake's
/// raw-buffer client API (`put_from`, `get_into`, `remove`, `is_exist`; optionally
/// `batch_put_from`, `batch_get_into`, `get_size`, `register_buffer`, `unregister_buffer`).
/// Every lifecycle rule of `open_store`'s stores applies (generations, leases, consume-once
/// or retain, tombstones, pending removals, budget, auth). `replicate_config` is passed to
/// every `put_from` (Mooncake's `ReplicateConfig`, e.g. hard-pinned); `register_buffers`
/// registers each transfer's memory with the client around the call when it can;
/// `uri_scheme` names the refs' store (`mooncake://<store_id>/<sample_id>`).
#[pyfunction]
#[pyo3(signature = (
    backend, *, store_id = None, retain_on_release = false, max_resident_bytes = None,
    max_hold_age_s = None, max_release_attempts = 3, secret = None, credential = None,
    replicate_config = None, register_buffers = true, uri_scheme = "mooncake", bfloat16 = "auto"
))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn open_store_with_backend(
    py: Python<'_>,
    backend: &Bound<'_, PyAny>,
    store_id: Option<String>,
    retain_on_release: bool,
    max_resident_bytes: Option<u64>,
    max_hold_age_s: Option<f64>,
    max_release_attempts: u32,
    secret: Option<String>,
    credential: Option<String>,
    replicate_config: Option<Py<PyAny>>,
    register_buffers: bool,
    uri_scheme: &str,
    bfloat16: &str,
) -> PyResult<Store> {
    let bf16 = Bf16Mode::parse(py, bfloat16)?;
    if uri_scheme.is_empty() || !uri_scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) {
        return Err(invalid(py, format!("uri_scheme={uri_scheme:?}: expected a URI scheme such as \"mooncake\"")));
    }
    let max_hold_age = max_hold_age_s
        .map(|s| {
            std::time::Duration::try_from_secs_f64(s)
                .map_err(|_| invalid(py, format!("max_hold_age_s={s}: expected a finite number >= 0")))
        })
        .transpose()?;
    let py_backend = PyBackend::new(backend, replicate_config, uri_scheme.to_owned(), register_buffers)
        .map_err(|e| to_py(py, &e))?;
    let options = StoreOptions {
        store_id: store_id.map(StoreId::new),
        max_resident_bytes,
        max_hold_age,
        retain_on_release,
        max_release_attempts,
        auth: secret.clone().map_or_else(AuthPolicy::open, |s| AuthPolicy::require(Secret::new(s))),
        credential: credential.or(secret).map(Secret::new),
        ..StoreOptions::default()
    };
    let store = FeatureStore::open(py_backend, options).py_err(py)?;
    let uri = format!("{uri_scheme}://{}", store.store_id());
    Ok(Store::from_api(Arc::new(store), uri, bf16))
}
