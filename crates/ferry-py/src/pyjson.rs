//! JSON between Python objects and ferry's records, through Python's own `json` module, so a
//! dict crosses exactly as `json.loads` / `json.dumps` see it (big integers, key order, floats).

use crate::errors::IntoPyResult;
use ferry_core::JsonMap;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyDict;

/// `json.loads(text)`.
pub(crate) fn loads<'py>(py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyAny>> {
    static LOADS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    LOADS.import(py, "json", "loads")?.call1((text,))
}

/// `json.dumps(obj)`: a `TypeError` names a value JSON cannot hold (a tensor, a set).
pub(crate) fn dumps(obj: &Bound<'_, PyAny>) -> PyResult<String> {
    static DUMPS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    DUMPS.import(obj.py(), "json", "dumps")?.call1((obj,))?.extract()
}

/// A serializable value as a fresh Python object (`dict`, `list`, `int`, ...).
pub(crate) fn to_py<'py, T: serde::Serialize + ?Sized>(py: Python<'py>, value: &T) -> PyResult<Bound<'py, PyAny>> {
    let text = ferry_core::json::to_string(value, ferry_core::JsonStyle::Compact).py_err(py)?;
    loads(py, &text)
}

/// A Python mapping as a JSON object (`None` is an empty one).
pub(crate) fn map_from_py(py: Python<'_>, obj: Option<&Bound<'_, PyAny>>, what: &str) -> PyResult<JsonMap> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else { return Ok(JsonMap::new()) };
    if !obj.is_instance_of::<PyDict>() {
        return Err(crate::errors::invalid(
            py,
            format!(
                "{what} must be a dict, not {}",
                obj.get_type().name().map_or_else(|_| "?".into(), |n| n.to_string())
            ),
        ));
    }
    let text = dumps(obj)?;
    ferry_core::json::from_str(&text, what).py_err(py)
}
