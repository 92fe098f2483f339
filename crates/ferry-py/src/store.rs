//! `ferry.open_store` and the `Store` and `Lease` classes: the `FeatureStoreApi` from Python.
//!
//! A `Store` holds an `Arc<dyn FeatureStoreApi>`: a store in this process (`mem://`, `dir://`)
//! or a daemon client (`ferry://`, `ferry+unix://`), the same calls either way. Every call that
//! can block (I/O, a socket round trip, a budget wait) runs with the GIL released. A `Lease` is
//! the read lease a `get` or `get_into` took, as a context manager and an RAII guard: leaving
//! the `with` block, calling `release()`, or dropping the last reference releases it.

use crate::arrays::{self, Bf16Mode, OutArray, PutArray, TraceOp};
use crate::borrow;
use crate::errors::{IntoPyResult, invalid, to_py};
use crate::pyjson;
use crate::records::{PyFeatureHandle, PyFeatureSpec, PySampleRef};
use ferry_core::{AlignedBuf, Error, FeatureHandle, FeatureSpec, SampleId, TensorBuf, TensorView, ViewSpec};
use ferry_net::{Client, ConnectOptions, RoutePreference};
use ferry_store::{AuthPolicy, DrainPolicy, FeatureStoreApi, Secret, StoreOptions};
use indexmap::IndexMap;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyIterator, PyTuple};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Api = Arc<dyn FeatureStoreApi>;

/// How long one slice of a budget wait runs with the GIL released before checking for
/// Ctrl-C (`KeyboardInterrupt`) and other signals.
const WAIT_SLICE: Duration = Duration::from_millis(200);

fn seconds(py: Python<'_>, what: &str, s: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(s).map_err(|_| invalid(py, format!("{what}={s}: expected a finite number >= 0")))
}

/// Opens a feature store.
///
/// `uri` is `mem://[store_id]` (this process's memory), `dir://<root>[?format=ckpt|safetensors]`
/// (a shared directory, SpecForge's file naming), `ferry://host:port` or
/// `ferry+unix:///path.sock` (a `ferry serve` daemon; on its Unix socket, bytes move through
/// shared memory).
///
/// For a store in this process, `secret` is the shared secret the store requires and
/// `credential` what this process presents (default: `secret`); `store_id`,
/// `retain_on_release`, `max_resident_bytes` and `max_hold_age_s` configure it. For a daemon,
/// `secret` is what this client presents (default: `FERRY_AUTH_TOKEN`, else
/// `DISAGG_AUTH_TOKEN`), `route` picks `"auto"`, `"shm"` or `"tcp"`, and `owning=True` makes
/// the daemon abort this client's unshared puts when the connection ends; the store's own
/// settings belong to `ferry serve`. `bfloat16` picks how bfloat16 features come back:
/// `"auto"` (`ml_dtypes.bfloat16` arrays when ml_dtypes is importable, else `uint16` bit
/// patterns), `"ml_dtypes"` or `"uint16"`.
#[pyfunction]
#[pyo3(signature = (
    uri, *, secret = None, credential = None, store_id = None, retain_on_release = false,
    max_resident_bytes = None, max_hold_age_s = None, route = "auto", owning = false, bfloat16 = "auto"
))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn open_store(
    py: Python<'_>,
    uri: &str,
    secret: Option<String>,
    credential: Option<String>,
    store_id: Option<String>,
    retain_on_release: bool,
    max_resident_bytes: Option<u64>,
    max_hold_age_s: Option<f64>,
    route: &str,
    owning: bool,
    bfloat16: &str,
) -> PyResult<Store> {
    let bf16 = Bf16Mode::parse(py, bfloat16)?;
    let daemon = uri.starts_with("ferry://") || uri.starts_with("ferry+unix://");
    let mut daemon_client: Option<Arc<Client>> = None;
    let api: Api = if daemon {
        let store_side = [
            ("credential", credential.is_some()),
            ("store_id", store_id.is_some()),
            ("retain_on_release", retain_on_release),
            ("max_resident_bytes", max_resident_bytes.is_some()),
            ("max_hold_age_s", max_hold_age_s.is_some()),
        ];
        if let Some((name, _)) = store_side.iter().find(|(_, set)| *set) {
            return Err(invalid(
                py,
                format!("{name} configures the store, which the daemon at {uri} owns: set it on `ferry serve`"),
            ));
        }
        let mut options = ConnectOptions::from_env();
        if let Some(secret) = secret {
            options.secret = Some(Secret::new(secret));
        }
        options.route = RoutePreference::parse(route).py_err(py)?;
        let uri = uri.to_owned();
        let client = py
            .detach(move || {
                if owning { Client::connect_owning_with(&uri, options) } else { Client::connect_with(&uri, options) }
            })
            .py_err(py)?;
        let client = Arc::new(client);
        daemon_client = Some(Arc::clone(&client));
        client
    } else {
        if route != "auto" || owning {
            return Err(invalid(
                py,
                format!("route and owning apply to daemon URIs (ferry://, ferry+unix://), not {uri}"),
            ));
        }
        let options = StoreOptions {
            store_id: store_id.map(ferry_core::StoreId::new),
            max_resident_bytes,
            max_hold_age: max_hold_age_s.map(|s| seconds(py, "max_hold_age_s", s)).transpose()?,
            retain_on_release,
            auth: secret.clone().map_or_else(AuthPolicy::open, |s| AuthPolicy::require(Secret::new(s))),
            credential: credential.or(secret).map(Secret::new),
            ..StoreOptions::default()
        };
        let uri = uri.to_owned();
        let store = py.detach(move || ferry_store::open_store(&uri, options)).py_err(py)?;
        Arc::new(store)
    };
    Ok(Store {
        store_id: api.store_id().as_str().to_owned(),
        api: Mutex::new(Some(api)),
        client: Mutex::new(daemon_client),
        uri: uri.to_owned(),
        bf16,
    })
}

/// A feature store: put samples, read them under leases, free them. Opened by
/// `ferry.open_store`; a context manager that closes it.
#[pyclass(frozen, module = "ferry", name = "Store")]
pub(crate) struct Store {
    /// `None` once closed. Leases hold their own reference, so they can still be released.
    api: Mutex<Option<Api>>,
    /// The same store as a daemon client (`None` for other stores, and once closed): what
    /// `get(..., borrow=True)` borrows from. Borrowed arrays hold their own reference.
    client: Mutex<Option<Arc<Client>>>,
    uri: String,
    store_id: String,
    bf16: Bf16Mode,
}

impl Store {
    /// The store's API (an error once closed); also the loader's store.
    pub(crate) fn api(&self, py: Python<'_>) -> PyResult<Api> {
        let guard = self.api.lock().map_err(|_| invalid(py, "store lock poisoned"))?;
        guard.clone().ok_or_else(|| invalid(py, format!("store {} is closed", self.uri)))
    }

    /// A `Lease` over tensors read under `handle`, as numpy arrays over their own buffers; if
    /// they cannot be handed to numpy, the lease goes back.
    fn lease_of(
        &self,
        py: Python<'_>,
        api: Api,
        tensors: IndexMap<String, TensorBuf>,
        handle: FeatureHandle,
        r: &Bound<'_, PySampleRef>,
    ) -> PyResult<Py<Lease>> {
        match tensors_to_numpy(py, tensors, self.bf16) {
            Ok((out, trace)) => {
                arrays::trace(TraceOp::Get, trace);
                Lease::new(api, handle, out, r)
            }
            Err(e) => {
                let _ = py.detach(|| api.release(&handle));
                Err(e)
            }
        }
    }

    /// How bfloat16 features come back from this store (the loader's batches follow it).
    pub(crate) fn bf16_mode(&self) -> Bf16Mode {
        self.bf16
    }

    /// A `Store` over a store opened elsewhere (`open_store_with_backend`).
    pub(crate) fn from_api(api: Arc<dyn FeatureStoreApi>, uri: String, bf16: Bf16Mode) -> Store {
        Store {
            store_id: api.store_id().as_str().to_owned(),
            api: Mutex::new(Some(api)),
            client: Mutex::new(None),
            uri,
            bf16,
        }
    }
}

/// The specs of the features `names` of `r`: from the ref, or asked from the store when the
/// ref lacks one (lazy offline refs carry none).
fn specs_of(py: Python<'_>, api: &Api, r: &PySampleRef, names: &[String]) -> PyResult<IndexMap<String, FeatureSpec>> {
    if names.iter().all(|n| r.inner.feature_specs.contains_key(n)) {
        return Ok(names
            .iter()
            .filter_map(|n| r.inner.feature_specs.get_key_value(n))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect());
    }
    let r = r.inner.clone();
    py.detach(|| api.describe(&r)).py_err(py)
}

#[pymethods]
impl Store {
    /// The store id (the namespace of its refs).
    #[getter]
    fn store_id(&self) -> &str {
        &self.store_id
    }

    /// The URI the store was opened with.
    #[getter]
    fn uri(&self) -> &str {
        &self.uri
    }

    /// How bfloat16 features come back: `"ml_dtypes"` or `"uint16"`.
    #[getter]
    fn bfloat16(&self) -> &'static str {
        self.bf16.name()
    }

    /// Stores one sample and returns its ref.
    ///
    /// `tensors` maps feature names to numpy arrays or torch tensors. C-contiguous
    /// little-endian arrays are read in place (no copy before the store's own); other layouts
    /// are copied once first. `metadata` is a JSON-able dict (a tensor in it is a `TypeError`).
    /// `dtypes` stores an array's bits under another dtype of the same item size, e.g.
    /// `{"hidden_state": "bfloat16"}` for a `uint16` array of bfloat16 bit patterns (arrays of
    /// `ml_dtypes.bfloat16` and torch bfloat16 tensors need nothing). A full store raises
    /// `StoreFullError` at once, or, with `timeout` (seconds), waits that long for room.
    #[pyo3(signature = (sample_id, tensors, metadata = None, *, dtypes = None, timeout = None))]
    fn put(
        &self,
        py: Python<'_>,
        sample_id: &str,
        tensors: &Bound<'_, PyAny>,
        metadata: Option<&Bound<'_, PyAny>>,
        dtypes: Option<&Bound<'_, PyDict>>,
        timeout: Option<f64>,
    ) -> PyResult<PySampleRef> {
        let api = self.api(py)?;
        let metadata = pyjson::map_from_py(py, metadata, "metadata")?;
        if !tensors.is_instance_of::<PyDict>() && !tensors.hasattr("items")? {
            return Err(invalid(
                py,
                format!("put: tensors must be a dict of arrays, not {}", arrays::describe(tensors)),
            ));
        }
        let mut overrides: IndexMap<String, ferry_core::DType> = IndexMap::new();
        if let Some(dtypes) = dtypes {
            for (k, v) in dtypes.iter() {
                let name: String = k.extract()?;
                let dtype: String = v.extract()?;
                overrides.insert(name, arrays::parse_dtype(py, &dtype)?);
            }
        }
        let mut held: Vec<(String, PutArray<'_>)> = Vec::new();
        for item in tensors.call_method0("items")?.try_iter()? {
            let (name, obj): (String, Bound<'_, PyAny>) = item?.extract()?;
            let prepared = arrays::prepare_put(py, &name, &obj, overrides.get(&name).copied())?;
            held.push((name, prepared));
        }
        if let Some(unknown) = overrides.keys().find(|k| !held.iter().any(|(n, _)| n == *k)) {
            return Err(invalid(py, format!("put: dtypes names {unknown:?}, which is not one of the tensors")));
        }
        let views: Vec<(&str, TensorView<'_>)> = held
            .iter()
            .map(|(name, a)| TensorView::new(a.dtype, &a.shape, a.bytes()).map(|v| (name.as_str(), v)))
            .collect::<ferry_core::Result<_>>()
            .py_err(py)?;
        arrays::trace(TraceOp::Put, held.iter().map(|(n, a)| (n.clone(), a.address(), a.bytes().len())).collect());
        let r = match timeout {
            None => py.detach(|| api.put(sample_id, &views, metadata)),
            Some(t) => {
                let deadline = Instant::now() + seconds(py, "timeout", t)?;
                loop {
                    let slice = deadline.min(Instant::now() + WAIT_SLICE);
                    let meta = metadata.clone();
                    let r = py.detach(|| api.put_until(sample_id, &views, meta, slice));
                    match r {
                        Err(Error::OverBudget { .. }) if Instant::now() < deadline => py.check_signals()?,
                        other => break other,
                    }
                }
            }
        };
        Ok(PySampleRef { inner: r.py_err(py)? })
    }

    /// Reads a sample's features (all of them, or `names`) into new numpy arrays and takes a
    /// read lease. Returns a `Lease`: a mapping of feature name -> array, and a context manager
    /// that releases the lease on exit. The arrays own their memory (ferry's buffers, wrapped
    /// without a copy): they stay valid after the lease is released.
    ///
    /// `borrow=True` (a daemon client on the shared-memory route, `ferry+unix://`, only; other
    /// stores raise `InvalidArgumentError`) copies nothing at all: the arrays are read-only
    /// views of the daemon's arena as mapped in this process, and they pin the sample's bytes
    /// through its read lease. Releasing such a `Lease` (`release()`, the end of the `with`
    /// block) empties it, and the read lease itself is released once the last array taken out
    /// of it is collected too (at once when none is alive). An abort never reuses bytes an
    /// array still shows.
    #[pyo3(signature = (r#ref, names = None, *, borrow = false))]
    fn get(
        &self,
        py: Python<'_>,
        r#ref: &Bound<'_, PySampleRef>,
        names: Option<Vec<String>>,
        borrow: bool,
    ) -> PyResult<Py<Lease>> {
        let r = r#ref;
        let api = self.api(py)?;
        let wanted: Option<Vec<&str>> = names.as_ref().map(|n| n.iter().map(String::as_str).collect());
        let sample = r.get().inner.clone();
        if borrow {
            let client = self.client.lock().map_err(|_| invalid(py, "store lock poisoned"))?.clone();
            let client = client.ok_or_else(|| borrow::refused(py, &self.uri))?;
            let (pinned, parts) = py
                .detach(|| borrow::Pinned::borrow(client, &sample, wanted.as_deref()))
                .map_err(|e| match e {
                    Error::InvalidArgument(m) => Error::InvalidArgument(format!("borrow=True: {m}")),
                    e => e,
                })
                .py_err(py)?;
            let (out, trace) = borrow::to_numpy(py, &pinned, parts, self.bf16)?;
            arrays::trace(TraceOp::Get, trace);
            return Lease::new_borrowed(api, pinned, out, r);
        }
        let (tensors, handle) = py.detach(|| api.get(&sample, wanted.as_deref())).py_err(py)?;
        self.lease_of(py, api, tensors, handle, r)
    }

    /// Reads parts of features under a read lease: `views` maps a feature name to a narrow
    /// `(dim, start, length)` (torch's `tensor.narrow`; `ferry.shard_view` gives a
    /// tensor-parallel shard). A daemon client asks the daemon, which derives each view where
    /// the bytes are and sends only the view's bytes; other stores read the feature and cut
    /// the view out (one more copy of the view). Returns a `Lease` of view-shaped arrays.
    fn get_views(
        &self,
        py: Python<'_>,
        r#ref: &Bound<'_, PySampleRef>,
        views: &Bound<'_, PyDict>,
    ) -> PyResult<Py<Lease>> {
        let r = r#ref;
        let api = self.api(py)?;
        let mut wanted: Vec<(String, ViewSpec)> = Vec::with_capacity(views.len());
        for (name, view) in views.iter() {
            let name: String = name.extract()?;
            let (dim, start, length): (u32, u64, u64) = view.extract().map_err(|_| {
                invalid(
                    py,
                    format!("get_views: the view of {name:?} must be a (dim, start, length) tuple of ints >= 0"),
                )
            })?;
            wanted.push((name, ViewSpec::narrow(dim, start, length)));
        }
        if wanted.is_empty() {
            return Err(invalid(py, "get_views: views is empty; use get() to read whole features"));
        }
        let mut sample = r.get().inner.clone();
        let client = self.client.lock().map_err(|_| invalid(py, "store lock poisoned"))?.clone();
        let pairs: Vec<(&str, ViewSpec)> = wanted.iter().map(|(n, v)| (n.as_str(), *v)).collect();
        let (tensors, handle) = py
            .detach(|| {
                // A lazy offline ref carries no specs: the store describes the file (no lease),
                // and the views are planned on that.
                if pairs.iter().any(|(n, _)| !sample.feature_specs.contains_key(*n)) {
                    for (name, spec) in api.describe(&sample)? {
                        sample.feature_specs.entry(name).or_insert(spec);
                    }
                }
                match &client {
                    Some(client) => client.get_views(&sample, &pairs),
                    None => cut_views(&*api, &sample, &pairs),
                }
            })
            .py_err(py)?;
        self.lease_of(py, api, tensors, handle, r)
    }

    /// Reads a sample's features into the caller's arrays, `out` mapping feature name ->
    /// array (numpy, or a CPU torch tensor), each writable, C-contiguous, of the feature's
    /// dtype (bfloat16 takes `ml_dtypes.bfloat16`, `uint16` or `int16` arrays) and exactly its
    /// byte size (any shape). Takes a read lease and returns it as a `Lease` over `out`.
    fn get_into(&self, py: Python<'_>, r#ref: &Bound<'_, PySampleRef>, out: &Bound<'_, PyDict>) -> PyResult<Py<Lease>> {
        let r = r#ref;
        let api = self.api(py)?;
        let names: Vec<String> = out.keys().iter().map(|k| k.extract()).collect::<PyResult<_>>()?;
        let specs = specs_of(py, &api, r.get(), &names)?;
        let mut outs: Vec<(String, OutArray<'_>)> = Vec::with_capacity(names.len());
        for (k, v) in out.iter() {
            let name: String = k.extract()?;
            let spec = specs.get(&name).ok_or_else(|| {
                to_py(
                    py,
                    &Error::NotFound {
                        what: format!("feature {name:?} of sample {:?}", r.get().inner.sample_id.as_str()),
                    },
                )
            })?;
            outs.push((name, arrays::prepare_out(py, &v, spec)?));
        }
        arrays::check_disjoint(py, &outs)?;
        let trace: arrays::TraceEntries = outs.iter().map(|(n, o)| (n.clone(), o.address(), o.len())).collect();
        let sample = r.get().inner.clone();
        let mut dsts: Vec<(&str, &mut [u8])> = outs.iter_mut().map(|(n, o)| (n.as_str(), o.bytes_mut())).collect();
        let handle = py.detach(|| api.get_into(&sample, &mut dsts)).py_err(py)?;
        arrays::trace(TraceOp::GetInto, trace);
        Lease::new(api, handle, out.copy()?, r)
    }

    /// The specs of a sample's features, as the store holds them.
    fn describe<'py>(&self, py: Python<'py>, r#ref: &Bound<'py, PySampleRef>) -> PyResult<Bound<'py, PyDict>> {
        let r = r#ref;
        let api = self.api(py)?;
        let sample = r.get().inner.clone();
        let specs = py.detach(|| api.describe(&sample)).py_err(py)?;
        let d = PyDict::new(py);
        for (k, v) in specs {
            d.set_item(k, PyFeatureSpec { inner: v })?;
        }
        Ok(d)
    }

    /// Releases a read lease: a `Lease` (same as `lease.release()`) or a `FeatureHandle`.
    /// Idempotent; a stale handle releases nothing. The last lease frees the sample unless the
    /// store retains on release.
    fn release(&self, py: Python<'_>, handle: &Bound<'_, PyAny>) -> PyResult<()> {
        if let Ok(lease) = handle.cast::<Lease>() {
            return Lease::release(lease);
        }
        let Ok(h) = handle.cast::<PyFeatureHandle>() else {
            return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                "release takes a Lease or a FeatureHandle, not {}",
                arrays::describe(handle)
            )));
        };
        let api = self.api(py)?;
        let h = h.get().inner.clone();
        if borrow::is_pinned(&h) {
            return Err(invalid(
                py,
                format!(
                    "the lease on sample {:?} pins borrowed arrays (get(..., borrow=True)): release its Lease; the lease ends when the last array over it is collected",
                    h.sample_id.as_str()
                ),
            ));
        }
        py.detach(|| api.release(&h)).py_err(py)
    }

    /// Frees a sample now, whoever holds leases on it; their later reads are refused.
    /// Idempotent.
    fn abort(&self, py: Python<'_>, sample_id: &str) -> PyResult<()> {
        let api = self.api(py)?;
        let sid = SampleId::new(sample_id);
        py.detach(|| api.abort(&sid)).py_err(py)
    }

    /// Frees every sample; returns how many.
    fn abort_all(&self, py: Python<'_>) -> PyResult<usize> {
        let api = self.api(py)?;
        py.detach(|| api.abort_all()).py_err(py)
    }

    /// Takes ownership of a sample another writer published (so this store's abort, release
    /// and GC apply to it).
    fn adopt(&self, py: Python<'_>, r#ref: &Bound<'_, PySampleRef>) -> PyResult<()> {
        let r = r#ref;
        let api = self.api(py)?;
        let sample = r.get().inner.clone();
        py.detach(|| api.adopt(&sample)).py_err(py)
    }

    /// Tracks a sample an external writer (a capture server) may be writing as
    /// `sample_id` at `generation` with the features `names`, before this process sees its
    /// response: `adopt(ref)` takes it over, `discard_external_attempts()` frees every tracked
    /// attempt not adopted.
    fn track_external_attempt(
        &self,
        py: Python<'_>,
        sample_id: &str,
        generation: u64,
        names: Vec<String>,
    ) -> PyResult<()> {
        let api = self.api(py)?;
        let sid = SampleId::new(sample_id);
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        py.detach(|| api.track_external_attempt(&sid, ferry_core::Generation::new(generation), &names)).py_err(py)
    }

    /// Frees every tracked external attempt not adopted; returns how many.
    fn discard_external_attempts(&self, py: Python<'_>) -> PyResult<usize> {
        let api = self.api(py)?;
        py.detach(|| api.discard_external_attempts()).py_err(py)
    }

    /// Gives up this client's ownership of samples (an owning daemon client no longer aborts
    /// them when its connection ends); a producer disowns refs just before publishing them.
    /// Other stores have nothing to disown.
    fn disown(&self, py: Python<'_>, sample_ids: Vec<String>) -> PyResult<()> {
        let api = self.api(py)?;
        let ids: Vec<SampleId> = sample_ids.into_iter().map(SampleId::new).collect();
        py.detach(|| api.disown(&ids)).py_err(py)
    }

    /// One max-hold GC sweep plus retries of pending removals:
    /// `{"force_freed", "force_freed_bytes", "release_pending"}`.
    fn gc<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let api = self.api(py)?;
        let report = py.detach(|| api.gc()).py_err(py)?;
        pyjson::to_py(py, &report)
    }

    /// Retries every pending removal (or those of `sample_ids`), forced, up to `max_attempts`
    /// times `retry_interval_s` apart: `{"removed", "removed_bytes", "release_pending",
    /// "attempts"}`. `DrainIncompleteError` if removals are still pending at the end.
    #[pyo3(signature = (*, sample_ids = None, max_attempts = 8, retry_interval_s = 0.25))]
    fn drain<'py>(
        &self,
        py: Python<'py>,
        sample_ids: Option<Vec<String>>,
        max_attempts: u32,
        retry_interval_s: f64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let api = self.api(py)?;
        let policy = DrainPolicy { max_attempts, retry_interval: seconds(py, "retry_interval_s", retry_interval_s)? };
        let ids: Option<Vec<SampleId>> = sample_ids.map(|ids| ids.into_iter().map(SampleId::new).collect());
        let report = py
            .detach(|| match &ids {
                Some(ids) => api.drain_samples(ids, policy),
                None => api.drain(policy),
            })
            .py_err(py)?;
        pyjson::to_py(py, &report)
    }

    /// Debugging aid for tests: `(address, length)` of the daemon's shared-memory arena as
    /// mapped in this process (where `get(..., borrow=True)` arrays lie), or `None` (not a
    /// daemon client on the shared-memory route, or closed).
    fn _debug_shm_mapping(&self, py: Python<'_>) -> PyResult<Option<(usize, usize)>> {
        let client = self.client.lock().map_err(|_| invalid(py, "store lock poisoned"))?;
        Ok(client.as_ref().and_then(|c| c.shm_mapping()))
    }

    /// The health map (SpecForge's `health()` keys plus ferry's).
    fn health<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let api = self.api(py)?;
        let health = py.detach(|| api.health()).py_err(py)?;
        pyjson::to_py(py, &health)
    }

    /// Whether release keeps the bytes (offline data) or frees them (consume-once).
    fn retains_on_release(&self, py: Python<'_>) -> PyResult<bool> {
        let api = self.api(py)?;
        py.detach(|| api.retains_on_release()).py_err(py)
    }

    /// Closes the store (a daemon connection is closed). Leases still held can be released.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let api = self.api.lock().map_err(|_| invalid(py, "store lock poisoned"))?.take();
        let client = self.client.lock().map_err(|_| invalid(py, "store lock poisoned"))?.take();
        py.detach(move || drop((api, client)));
        Ok(())
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        let closed = self.api.lock().map_or(true, |a| a.is_none());
        format!("Store(uri={:?}, store_id={:?}{})", self.uri, self.store_id, if closed { ", closed" } else { "" })
    }
}

/// Views of a store that is not a daemon client (`r` carries the specs of the viewed features):
/// the features are read whole, and each view is cut out into a buffer of its own (a failure
/// gives the lease back).
fn cut_views(
    api: &dyn FeatureStoreApi,
    r: &ferry_core::SampleRef,
    views: &[(&str, ViewSpec)],
) -> ferry_core::Result<(IndexMap<String, TensorBuf>, FeatureHandle)> {
    // Every view is checked against the feature's spec before the read: a lease taken and given
    // back would free a consume-once sample, so a bad view must never get that far.
    let plans = views
        .iter()
        .map(|(name, view)| view.plan_feature(r, &r.feature_specs, name))
        .collect::<ferry_core::Result<Vec<_>>>()?;
    let names: Vec<&str> = views.iter().map(|(n, _)| *n).collect();
    let (tensors, handle) = api.get(r, Some(&names))?;
    let cut = || -> ferry_core::Result<IndexMap<String, TensorBuf>> {
        let mut out = IndexMap::with_capacity(views.len());
        for (name, plan) in names.iter().zip(plans) {
            let t = tensors
                .get(*name)
                .ok_or_else(|| Error::NotFound { what: format!("feature {name:?} of sample {}", r.sample_id) })?;
            let len = usize::try_from(plan.nbytes).map_err(|_| Error::InvalidArgument("view too large".into()))?;
            let mut buf = AlignedBuf::try_zeroed(len).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "cannot allocate {len} bytes for a view of {name:?}: memory is exhausted"
                ))
            })?;
            plan.gather(t.bytes(), buf.as_mut_slice())?;
            out.insert((*name).to_owned(), TensorBuf::new(t.dtype(), plan.shape, buf)?);
        }
        Ok(out)
    };
    match cut() {
        Ok(out) => Ok((out, handle)),
        Err(e) => {
            let _ = api.release(&handle);
            Err(e)
        }
    }
}

/// `(dim, start, length)` of shard `index` of `count` equal shards of a dimension of `size`
/// indices (a tensor-parallel slice), for `Store.get_views`; the dimension must split evenly.
#[pyfunction]
pub(crate) fn shard_view(py: Python<'_>, dim: i64, index: i64, count: i64, size: i64) -> PyResult<(u32, u64, u64)> {
    let non_negative =
        |what: &str, v: i64| u64::try_from(v).map_err(|_| invalid(py, format!("shard_view: {what}={v} must be >= 0")));
    let dim = u32::try_from(dim).map_err(|_| invalid(py, format!("shard_view: dim={dim} is not a dimension")))?;
    let (index, count, size) =
        (non_negative("index", index)?, non_negative("count", count)?, non_negative("size", size)?);
    match ViewSpec::shard(dim, index, count, size).py_err(py)? {
        ViewSpec::Narrow { dim, start, length } => Ok((dim, start, length)),
    }
}

/// Tensors as numpy arrays over their own buffers (no copy: the arrays own the memory), as a
/// dict of name -> array, with each array's address and size for the debug trace. `Store.get`
/// and the loader's `Batch` share it.
pub(crate) fn tensors_to_numpy<'py>(
    py: Python<'py>,
    tensors: IndexMap<String, TensorBuf>,
    bf16: Bf16Mode,
) -> PyResult<(Bound<'py, PyDict>, arrays::TraceEntries)> {
    let out = PyDict::new(py);
    let mut trace = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let nbytes = tensor.bytes().len();
        let (arr, addr) = arrays::to_numpy(py, tensor, bf16)?;
        trace.push((name.clone(), addr, nbytes));
        out.set_item(name, arr)?;
    }
    Ok((out, trace))
}

/// The read-only mapping of name -> array that `Lease` and the loader's `Batch` both are: their
/// base class (Python's `ferry._TensorMapping`), holding the dict.
#[pyclass(subclass, frozen, mapping, module = "ferry", name = "_TensorMapping")]
pub(crate) struct TensorMapping {
    tensors: Py<PyDict>,
}

impl TensorMapping {
    /// A mapping over `tensors`, to extend (`PyClassInitializer::add_subclass`).
    pub(crate) fn over(tensors: Bound<'_, PyDict>) -> TensorMapping {
        TensorMapping { tensors: tensors.unbind() }
    }

    /// The dict.
    pub(crate) fn dict<'py>(&self, py: Python<'py>) -> &Bound<'py, PyDict> {
        self.tensors.bind(py)
    }
}

#[pymethods]
impl TensorMapping {
    fn __getitem__<'py>(&self, py: Python<'py>, name: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        self.dict(py).as_any().get_item(name)
    }

    fn __len__(&self, py: Python<'_>) -> usize {
        self.dict(py).len()
    }

    fn __contains__(&self, py: Python<'_>, name: &Bound<'_, PyAny>) -> PyResult<bool> {
        self.dict(py).contains(name)
    }

    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyIterator>> {
        self.dict(py).as_any().try_iter()
    }

    /// The names.
    fn keys<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.dict(py).call_method0("keys")
    }

    /// The arrays.
    fn values<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.dict(py).call_method0("values")
    }

    /// `(name, array)` pairs.
    fn items<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.dict(py).call_method0("items")
    }

    /// The array of `name`, or `default`.
    #[pyo3(signature = (name, default = None))]
    fn get<'py>(
        &self,
        py: Python<'py>,
        name: &Bound<'py, PyAny>,
        default: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        match self.dict(py).get_item(name)? {
            Some(v) => Ok(v),
            None => Ok(default.unwrap_or_else(|| py.None().into_bound(py))),
        }
    }

    /// A new dict of name -> array (the same arrays every time).
    #[getter]
    fn tensors<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.dict(py).copy()
    }
}

/// A read lease on one sample and the tensors read under it: a mapping of feature name ->
/// array, and a context manager. The lease is released by `release()`, on leaving a `with`
/// block, or when the `Lease` is garbage collected, whichever comes first; keep the `Lease`
/// to keep the lease. Arrays from `get` own their memory, so they stay valid after release.
#[pyclass(extends = TensorMapping, frozen, mapping, module = "ferry", name = "Lease")]
pub(crate) struct Lease {
    api: Api,
    handle: FeatureHandle,
    released: AtomicBool,
    r: Py<PySampleRef>,
    /// A borrowed read (`get(..., borrow=True)`): the pin, which owns the read lease. Taken
    /// out on release; the arrays hold their own references.
    pinned: Mutex<Option<Arc<borrow::Pinned>>>,
    borrowed: bool,
}

#[pymethods]
impl Lease {
    /// The lease's `FeatureHandle` (for `Store.release`, or SpecForge-shaped code).
    #[getter]
    fn handle(&self) -> PyFeatureHandle {
        PyFeatureHandle { inner: self.handle.clone() }
    }

    /// The ref that was read.
    #[getter(r#ref)]
    fn sample_ref(&self, py: Python<'_>) -> Py<PySampleRef> {
        self.r.clone_ref(py)
    }

    /// The tensors as torch tensors over the same memory (bfloat16 features as
    /// `torch.bfloat16`). Needs torch. A borrowed lease's tensors are views of the daemon's
    /// shared memory that every reader sees: treat them as read-only (torch cannot mark a
    /// tensor read-only); write to a `.clone()`.
    fn to_torch<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        static TO_TORCH: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
        let py = slf.py();
        let dtypes = PyDict::new(py);
        for (name, spec) in &slf.get().r.get().inner.feature_specs {
            dtypes.set_item(name, &spec.dtype)?;
        }
        let tensors = slf.as_super().get().dict(py);
        TO_TORCH.import(py, "ferry._arrays", "_to_torch_dict")?.call1((tensors, dtypes))
    }

    /// Whether the lease has been released (for a borrowed `Lease`: given up by this
    /// object; the daemon's lease ends when the last array over it is collected too).
    #[getter]
    fn released(&self) -> bool {
        self.released.load(Ordering::SeqCst)
    }

    /// Whether the arrays are borrowed views of a daemon's shared memory
    /// (`get(..., borrow=True)`).
    #[getter]
    fn borrowed(&self) -> bool {
        self.borrowed
    }

    /// Releases the lease (idempotent). The last lease on a sample frees it unless the store
    /// retains on release. Arrays from `get` stay valid.
    ///
    /// A borrowed `Lease` is emptied, and its read lease is released once no array over it
    /// is alive: at once if none was taken out, else when the last one is collected (the
    /// arrays pin the bytes until then).
    fn release(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        if this.released.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        if this.borrowed {
            slf.as_super().get().dict(py).clear();
            let pinned = this.pinned.lock().map_err(|_| invalid(py, "lease lock poisoned"))?.take();
            py.detach(move || drop(pinned));
            return Ok(());
        }
        if let Err(e) = py.detach(|| this.api.release(&this.handle)) {
            this.released.store(false, Ordering::SeqCst);
            return Err(to_py(py, &e));
        }
        Ok(())
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    #[pyo3(signature = (exc_type, _exc_value, _traceback))]
    fn __exit__(
        slf: &Bound<'_, Self>,
        exc_type: &Bound<'_, PyAny>,
        _exc_value: &Bound<'_, PyAny>,
        _traceback: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        let released = Lease::release(slf);
        // An exception already leaving the block wins over a failed release.
        if exc_type.is_none() {
            released?;
        }
        Ok(false)
    }

    fn __repr__(slf: &Bound<'_, Self>) -> String {
        let names: Vec<String> = slf
            .as_super()
            .get()
            .dict(slf.py())
            .keys()
            .iter()
            .map(|k| k.str().map_or_else(|_| "?".into(), |s| s.to_string()))
            .collect();
        format!(
            "Lease(sample_id={:?}, generation={}, features={names:?}{})",
            slf.get().handle.sample_id.as_str(),
            slf.get().handle.generation,
            if slf.get().released() { ", released" } else { "" }
        )
    }
}

impl Lease {
    fn new(
        api: Api,
        handle: FeatureHandle,
        tensors: Bound<'_, PyDict>,
        r: &Bound<'_, PySampleRef>,
    ) -> PyResult<Py<Lease>> {
        let py = tensors.py();
        let lease = Lease {
            api,
            handle,
            released: AtomicBool::new(false),
            r: r.clone().unbind(),
            pinned: Mutex::new(None),
            borrowed: false,
        };
        Py::new(py, PyClassInitializer::from(TensorMapping::over(tensors)).add_subclass(lease))
    }

    /// A `Lease` over borrowed arrays: releasing it drops its reference to `pinned`.
    fn new_borrowed(
        api: Api,
        pinned: Arc<borrow::Pinned>,
        tensors: Bound<'_, PyDict>,
        r: &Bound<'_, PySampleRef>,
    ) -> PyResult<Py<Lease>> {
        let py = tensors.py();
        let lease = Lease {
            api,
            handle: pinned.handle().clone(),
            released: AtomicBool::new(false),
            r: r.clone().unbind(),
            pinned: Mutex::new(Some(pinned)),
            borrowed: true,
        };
        Py::new(py, PyClassInitializer::from(TensorMapping::over(tensors)).add_subclass(lease))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // A borrowed lease's pin (its `pinned` field) releases itself with its last holder.
        if !self.released.swap(true, Ordering::SeqCst)
            && !self.borrowed
            && let Err(e) = self.api.release(&self.handle)
        {
            tracing::warn!(error = %e, sample = %self.handle.sample_id.as_str(), "releasing a dropped lease");
        }
    }
}
