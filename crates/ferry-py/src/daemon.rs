//! `ferry.start_daemon`: a `ferry serve` node daemon inside this Python process (its threads
//! are Rust threads and never take the GIL), for tests and single-process tools. Clients reach
//! it through `ferry.open_store(daemon.tcp_uri)` or `daemon.unix_uri`, in this process or any
//! other.

use crate::errors::{IntoPyResult, invalid};
use crate::pyjson;
use ferry_net::{DaemonConfig, DaemonHandle};
use ferry_store::{FeatureStore, MemoryBackend, Secret, StoreOptions};
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;

/// Starts a node daemon serving one store, and returns it.
///
/// `listen` is a TCP address (`"127.0.0.1:0"` picks a free port; `None` for none) and `socket`
/// a Unix socket path. With `capacity` (bytes) the store lives in a shared-memory arena of
/// that size, which clients on the Unix socket map (bytes move through shared memory, one copy
/// each way); without it, in the daemon's heap. `secret` is the shared secret every client
/// must prove it knows. `store_id`, `retain_on_release` and `max_hold_age_s` configure the
/// store as `ferry serve` does.
#[pyfunction]
#[pyo3(
    signature = (
        *, listen = Some("127.0.0.1:0"), socket = None, capacity = None, secret = None, store_id = None,
        retain_on_release = false, max_hold_age_s = None
    ),
    text_signature = "(*, listen='127.0.0.1:0', socket=None, capacity=None, secret=None, store_id=None, retain_on_release=False, max_hold_age_s=None)"
)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn start_daemon(
    py: Python<'_>,
    listen: Option<&str>,
    socket: Option<PathBuf>,
    capacity: Option<u64>,
    secret: Option<String>,
    store_id: Option<String>,
    retain_on_release: bool,
    max_hold_age_s: Option<f64>,
) -> PyResult<Daemon> {
    let tcp: Option<SocketAddr> = listen
        .map(|a| a.parse().map_err(|e| invalid(py, format!("listen={a:?} is not a socket address: {e}"))))
        .transpose()?;
    let max_hold_age = max_hold_age_s
        .map(|s| {
            std::time::Duration::try_from_secs_f64(s)
                .map_err(|_| invalid(py, format!("max_hold_age_s={s}: expected a finite number >= 0")))
        })
        .transpose()?;
    let options = StoreOptions {
        store_id: store_id.map(ferry_core::StoreId::new),
        retain_on_release,
        max_hold_age,
        ..StoreOptions::default()
    };
    let mut config = DaemonConfig::new(tcp, socket);
    config.secret = secret.map(Secret::new);
    let handle = py
        .detach(move || {
            let store = match capacity {
                Some(capacity) => {
                    let (store, arena) = ferry_net::arena_store(capacity, options)?;
                    config.arena = Some(arena);
                    store
                }
                None => FeatureStore::open(MemoryBackend::default(), options)?,
            };
            ferry_net::start(store, config)
        })
        .py_err(py)?;
    Ok(Daemon {
        tcp_uri: handle.tcp_addr().map(|a| format!("ferry://{a}")),
        unix_uri: handle.unix_path().map(|p| format!("ferry+unix://{}", p.display())),
        store_id: handle.store().store_id().as_str().to_owned(),
        handle: Mutex::new(Some(handle)),
    })
}

/// A running node daemon (`ferry.start_daemon`). A context manager that stops it; it also
/// stops when garbage collected.
#[pyclass(frozen, module = "ferry", name = "Daemon")]
pub(crate) struct Daemon {
    handle: Mutex<Option<DaemonHandle>>,
    tcp_uri: Option<String>,
    unix_uri: Option<String>,
    store_id: String,
}

#[pymethods]
impl Daemon {
    /// `ferry://host:port` when listening on TCP.
    #[getter]
    fn tcp_uri(&self) -> Option<&str> {
        self.tcp_uri.as_deref()
    }

    /// `ferry+unix:///path` when listening on a Unix socket.
    #[getter]
    fn unix_uri(&self) -> Option<&str> {
        self.unix_uri.as_deref()
    }

    /// The served store's id.
    #[getter]
    fn store_id(&self) -> &str {
        &self.store_id
    }

    /// The served store's health map.
    fn health<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let guard = self.handle.lock().map_err(|_| invalid(py, "daemon lock poisoned"))?;
        let handle = guard.as_ref().ok_or_else(|| invalid(py, "the daemon is stopped"))?;
        pyjson::to_py(py, &handle.store().health())
    }

    /// Open client connections.
    fn connections(&self, py: Python<'_>) -> PyResult<usize> {
        let guard = self.handle.lock().map_err(|_| invalid(py, "daemon lock poisoned"))?;
        Ok(guard.as_ref().map_or(0, DaemonHandle::connections))
    }

    /// Stops the daemon (idempotent): listeners close, connections end, its store is dropped.
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        let handle = self.handle.lock().map_err(|_| invalid(py, "daemon lock poisoned"))?.take();
        if let Some(handle) = handle {
            py.detach(move || handle.stop());
        }
        Ok(())
    }

    /// Whether the daemon is running.
    #[getter]
    fn running(&self) -> bool {
        self.handle.lock().is_ok_and(|h| h.is_some())
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) -> PyResult<bool> {
        self.stop(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!("Daemon(tcp_uri={:?}, unix_uri={:?}, running={})", self.tcp_uri, self.unix_uri, self.running())
    }
}
