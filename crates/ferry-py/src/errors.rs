//! ferry's [`Error`] as Python exceptions.
//!
//! The exception classes live in Python (`ferry/_errors.py`), because a class with two bases
//! (`ferry.StoreFullError(ferry.Error, MemoryError)`) cannot be declared from Rust, and so the
//! tree has docstrings and stubs. Each error crosses as its variant name, the Python exception
//! name SpecForge raises for it ([`Error::python_exception`], the one place that mapping lives),
//! its message, and its fields (the error's serde form); `ferry._errors._from_native` picks the
//! class. A variant the Python side does not list (the enum is non-exhaustive) falls back to the
//! class of its SpecForge exception name.

use ferry_core::Error;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

/// `Result<T, ferry_core::Error>` into `PyResult<T>`.
pub(crate) trait IntoPyResult<T> {
    /// Converts the error (if any) into the matching `ferry` exception.
    fn py_err(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for ferry_core::Result<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_py(py, &e))
    }
}

/// The variant name of an error: the single key of its externally tagged serde form.
fn variant_and_details(err: &Error) -> (String, String) {
    let value = serde_json::to_value(err).unwrap_or(serde_json::Value::Null);
    match value {
        serde_json::Value::Object(map) => match map.into_iter().next() {
            Some((variant, details)) => (variant, details.to_string()),
            None => (String::new(), "null".to_owned()),
        },
        serde_json::Value::String(variant) => (variant, "null".to_owned()),
        _ => (String::new(), "null".to_owned()),
    }
}

/// The `ferry` exception for `err`. If building it fails (the `ferry` package is broken), the
/// failure itself is returned: it still says what went wrong.
pub(crate) fn to_py(py: Python<'_>, err: &Error) -> PyErr {
    from_native(py, err, err.to_string())
}

/// The `ferry` exception class for `err`, carrying `message` and `err`'s details.
fn from_native(py: Python<'_>, err: &Error, message: String) -> PyErr {
    static FROM_NATIVE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let (variant, details) = variant_and_details(err);
    let built = FROM_NATIVE
        .import(py, "ferry._errors", "_from_native")
        .and_then(|f| f.call1((variant, err.python_exception(), message, details)));
    match built {
        Ok(exc) => PyErr::from_value(exc),
        Err(e) => e,
    }
}

/// A `ferry.UnknownDtypeError` (an `InvalidArgumentError`, so a `ValueError`) for `dtype`,
/// with `message` (which names the feature, unlike the core error's own text).
pub(crate) fn unknown_dtype(py: Python<'_>, dtype: &str, message: impl Into<String>) -> PyErr {
    from_native(py, &Error::UnknownDtype { dtype: dtype.to_owned() }, message.into())
}

/// A `ferry.InvalidArgumentError` (a `ValueError`) with `message`.
pub(crate) fn invalid(py: Python<'_>, message: impl Into<String>) -> PyErr {
    to_py(py, &Error::InvalidArgument(message.into()))
}
