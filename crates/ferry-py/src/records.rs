//! The control-plane records as Python objects: `SampleRef`, `FeatureSpec`, `FeatureHandle`.
//!
//! Each wraps the `ferry_core` record and is immutable, like SpecForge's frozen dataclasses.
//! `to_json` writes SpecForge's bytes (`ferry_core::json`: Python's `json.dumps`, compact for
//! channel lines, spaced for manifests and the ledger); `to_dict` is `json.loads` of that, so a
//! dict is exactly what SpecForge's `ref_to_dict` gives after a JSON round trip (lists for
//! shapes). `from_dict` / `from_json` are strict as SpecForge's `ref_from_dict`: unknown keys are
//! an error, missing defaulted keys take their defaults.

use crate::errors::{IntoPyResult, invalid};
use crate::pyjson;
use ferry_core::{FeatureHandle, FeatureSpec, JsonStyle, SampleRef, TargetRepr};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple, PyType};

fn style(py: Python<'_>, name: &str) -> PyResult<JsonStyle> {
    match name {
        "compact" => Ok(JsonStyle::Compact),
        "spaced" => Ok(JsonStyle::Spaced),
        other => Err(invalid(py, format!("JSON style {other:?}: expected \"compact\" or \"spaced\""))),
    }
}

/// Parses a record from a dict through Python's `json.dumps`, then ferry's strict reader.
fn from_dict<T: serde::de::DeserializeOwned>(py: Python<'_>, d: &Bound<'_, PyAny>, what: &str) -> PyResult<T> {
    if !d.is_instance_of::<PyDict>() {
        return Err(invalid(py, format!("{what}.from_dict needs a dict")));
    }
    let text = pyjson::dumps(d)?;
    ferry_core::json::from_str(&text, &format!("{what} dict")).py_err(py)
}

fn to_json<T: serde::Serialize>(py: Python<'_>, value: &T, style_name: &str) -> PyResult<String> {
    ferry_core::json::to_string(value, style(py, style_name)?).py_err(py)
}

/// `(cls.from_json, (json,))`: pickling goes through SpecForge's JSON.
fn reduce<'py>(cls: Bound<'py, PyType>, json: String) -> PyResult<Bound<'py, PyTuple>> {
    let from_json = cls.getattr("from_json")?;
    (from_json, (json,)).into_pyobject(cls.py())
}

/// One sample's reference: where its features live, their names, shapes and dtypes, and
/// metadata. Tensor-free; SpecForge's `SampleRef`, byte for byte in JSON.
///
/// Build one with `SampleRef.from_dict(d)`, `SampleRef.from_json(text)` or
/// `SampleRef(**fields)` (the same strict rules); a store's `put` returns one.
#[pyclass(frozen, eq, module = "ferry", name = "SampleRef")]
#[derive(Clone, PartialEq)]
pub(crate) struct PySampleRef {
    pub(crate) inner: SampleRef,
}

#[pymethods]
impl PySampleRef {
    #[new]
    #[pyo3(signature = (**fields))]
    fn new(py: Python<'_>, fields: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let empty = PyDict::new(py);
        let fields = fields.unwrap_or(&empty);
        Ok(PySampleRef { inner: from_dict(py, fields.as_any(), "SampleRef")? })
    }

    /// A ref from a dict with SpecForge's keys (`ref_from_dict`): unknown keys are an error,
    /// missing defaulted keys take their defaults.
    #[staticmethod]
    fn from_dict(py: Python<'_>, d: &Bound<'_, PyAny>) -> PyResult<Self> {
        Ok(PySampleRef { inner: from_dict(py, d, "SampleRef")? })
    }

    /// A ref from JSON text (compact or spaced).
    #[staticmethod]
    fn from_json(py: Python<'_>, text: &str) -> PyResult<Self> {
        Ok(PySampleRef { inner: ferry_core::json::sample_ref_from_str(text).py_err(py)? })
    }

    /// The ref as a dict, in SpecForge's key order (`ref_to_dict`, shapes as lists).
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        pyjson::to_py(py, &self.inner)
    }

    /// The ref as SpecForge writes it: `style="compact"` is a channel line
    /// (`separators=(",", ":")`), `"spaced"` is `json.dumps`'s default (manifests, the ledger).
    #[pyo3(signature = (style = "compact"))]
    fn to_json(&self, py: Python<'_>, style: &str) -> PyResult<String> {
        to_json(py, &self.inner, style)
    }

    /// The sample id.
    #[getter]
    fn sample_id(&self) -> &str {
        self.inner.sample_id.as_str()
    }
    /// The run id.
    #[getter]
    fn run_id(&self) -> &str {
        &self.inner.run_id
    }
    /// The prompt task this sample came from, if any.
    #[getter]
    fn source_task_id(&self) -> Option<&str> {
        self.inner.source_task_id.as_deref()
    }
    /// The store URI of the sample (`mem://`, `disagg://`, `file://`, ...).
    #[getter]
    fn feature_store_uri(&self) -> &str {
        &self.inner.feature_store_uri
    }
    /// Logical feature name -> store key.
    #[getter]
    fn feature_keys<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in &self.inner.feature_keys {
            d.set_item(k, v)?;
        }
        Ok(d)
    }
    /// Feature name -> `FeatureSpec` (may be empty for lazy offline refs).
    #[getter]
    fn feature_specs<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in &self.inner.feature_specs {
            d.set_item(k, PyFeatureSpec { inner: v.clone() })?;
        }
        Ok(d)
    }
    /// The draft strategy (`eagle3`, `dflash`, ...).
    #[getter]
    fn strategy(&self) -> &str {
        &self.inner.strategy
    }
    /// The schema version (1).
    #[getter]
    fn schema_version(&self) -> i64 {
        self.inner.schema_version
    }
    /// The target model version.
    #[getter]
    fn target_model_version(&self) -> &str {
        &self.inner.target_model_version
    }
    /// The draft weight version, if any.
    #[getter]
    fn draft_weight_version(&self) -> Option<&str> {
        self.inner.draft_weight_version.as_deref()
    }
    /// The tokenizer version.
    #[getter]
    fn tokenizer_version(&self) -> &str {
        &self.inner.tokenizer_version
    }
    /// Number of tokens.
    #[getter]
    fn num_tokens(&self) -> i64 {
        self.inner.num_tokens
    }
    /// Estimated bytes of the features.
    #[getter]
    fn estimated_bytes(&self) -> i64 {
        self.inner.estimated_bytes
    }
    /// Free-form metadata (a fresh dict each time).
    #[getter]
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        pyjson::to_py(py, &self.inner.metadata)
    }
    /// The generation the ref names (`metadata["generation"]`), if any.
    #[getter]
    fn generation(&self) -> Option<u64> {
        self.inner.generation().map(ferry_core::Generation::get)
    }

    fn __repr__(&self) -> String {
        let generation = self.inner.generation().map_or_else(|| "None".to_owned(), |g| g.to_string());
        format!(
            "SampleRef(sample_id={:?}, generation={generation}, feature_store_uri={:?}, features={:?})",
            self.inner.sample_id.as_str(),
            self.inner.feature_store_uri,
            self.inner.feature_specs.keys().collect::<Vec<_>>()
        )
    }

    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyTuple>> {
        let json = to_json(slf.py(), &slf.get().inner, "compact")?;
        reduce(slf.get_type(), json)
    }
}

/// One named tensor's description: shape, dtype and target metadata (SpecForge's
/// `FeatureSpec`). The dtype is kept as written, so unknown dtypes round-trip.
#[pyclass(frozen, eq, module = "ferry", name = "FeatureSpec")]
#[derive(Clone, PartialEq)]
pub(crate) struct PyFeatureSpec {
    pub(crate) inner: FeatureSpec,
}

#[pymethods]
impl PyFeatureSpec {
    #[new]
    #[pyo3(signature = (name, shape, dtype, *, device_hint = None, required = true, target_repr = None, target_meta = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        name: String,
        shape: Vec<u64>,
        dtype: String,
        device_hint: Option<String>,
        required: bool,
        target_repr: Option<&str>,
        target_meta: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let target_repr = match target_repr {
            None => None,
            Some(s) => Some(TargetRepr::parse(s).ok_or_else(|| {
                invalid(py, format!("target_repr {s:?}: expected logits, pruned_logits or hidden_state"))
            })?),
        };
        let target_meta = pyjson::map_from_py(py, target_meta, "target_meta")?;
        Ok(PyFeatureSpec { inner: FeatureSpec { name, shape, dtype, device_hint, required, target_repr, target_meta } })
    }

    /// A spec from a dict with SpecForge's keys (strict).
    #[staticmethod]
    fn from_dict(py: Python<'_>, d: &Bound<'_, PyAny>) -> PyResult<Self> {
        Ok(PyFeatureSpec { inner: from_dict(py, d, "FeatureSpec")? })
    }

    /// A spec from JSON text.
    #[staticmethod]
    fn from_json(py: Python<'_>, text: &str) -> PyResult<Self> {
        Ok(PyFeatureSpec { inner: ferry_core::json::from_str(text, "FeatureSpec JSON").py_err(py)? })
    }

    /// The spec as a dict in SpecForge's key order.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        pyjson::to_py(py, &self.inner)
    }

    /// The spec as JSON (`style="compact"` or `"spaced"`).
    #[pyo3(signature = (style = "compact"))]
    fn to_json(&self, py: Python<'_>, style: &str) -> PyResult<String> {
        to_json(py, &self.inner, style)
    }

    /// The feature name.
    #[getter]
    fn name(&self) -> &str {
        &self.inner.name
    }
    /// The shape, row-major.
    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.inner.shape)
    }
    /// The dtype name as written (`bfloat16`, `int64`, ...).
    #[getter]
    fn dtype(&self) -> &str {
        &self.inner.dtype
    }
    /// The device hint, if any.
    #[getter]
    fn device_hint(&self) -> Option<&str> {
        self.inner.device_hint.as_deref()
    }
    /// Whether the feature is required.
    #[getter]
    fn required(&self) -> bool {
        self.inner.required
    }
    /// What a target feature holds (`logits`, `pruned_logits`, `hidden_state`), if set.
    #[getter]
    fn target_repr(&self) -> Option<&'static str> {
        self.inner.target_repr.map(TargetRepr::as_str)
    }
    /// Target metadata (a fresh dict each time).
    #[getter]
    fn target_meta<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        pyjson::to_py(py, &self.inner.target_meta)
    }
    /// Number of elements (1 for a 0-dim tensor).
    #[getter]
    fn numel(&self, py: Python<'_>) -> PyResult<u64> {
        self.inner.numel().ok_or_else(|| invalid(py, format!("shape {:?} overflows 64 bits", self.inner.shape)))
    }
    /// Exact bytes of the contiguous tensor (`UnknownDtypeError` for a dtype ferry cannot store).
    #[getter]
    fn nbytes(&self, py: Python<'_>) -> PyResult<u64> {
        self.inner.nbytes().py_err(py)
    }

    fn __repr__(&self) -> String {
        format!("FeatureSpec(name={:?}, shape={:?}, dtype={:?})", self.inner.name, self.inner.shape, self.inner.dtype)
    }

    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyTuple>> {
        let json = to_json(slf.py(), &slf.get().inner, "compact")?;
        reduce(slf.get_type(), json)
    }
}

/// A read lease's identity: sample id, generation and the opaque lease token a release takes
/// back (SpecForge's `FeatureHandle`). Hashable.
#[pyclass(frozen, eq, hash, module = "ferry", name = "FeatureHandle")]
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct PyFeatureHandle {
    pub(crate) inner: FeatureHandle,
}

#[pymethods]
impl PyFeatureHandle {
    /// A handle from a dict (`sample_id`, `generation`, `lease_token`).
    #[staticmethod]
    fn from_dict(py: Python<'_>, d: &Bound<'_, PyAny>) -> PyResult<Self> {
        Ok(PyFeatureHandle { inner: from_dict(py, d, "FeatureHandle")? })
    }

    /// The handle as a dict.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        pyjson::to_py(py, &self.inner)
    }

    /// The sample id.
    #[getter]
    fn sample_id(&self) -> &str {
        self.inner.sample_id.as_str()
    }
    /// The generation that was read (0 for untracked offline files).
    #[getter]
    fn generation(&self) -> u64 {
        self.inner.generation.get()
    }
    /// The opaque lease token.
    #[getter]
    fn lease_token(&self) -> &str {
        self.inner.lease_token.as_str()
    }

    fn __repr__(&self) -> String {
        format!(
            "FeatureHandle(sample_id={:?}, generation={}, lease_token={:?})",
            self.inner.sample_id.as_str(),
            self.inner.generation,
            self.inner.lease_token.as_str()
        )
    }
}
