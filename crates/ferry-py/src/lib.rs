//! `ferry._ferry`, the native half of the `ferry` Python package (built with maturin; the
//! package itself is `python/ferry/`, which re-exports this module with pure-Python helpers,
//! the exception classes and type stubs).
//!
//! It exposes ferry's contracts and its store to Python: `SampleRef`, `FeatureSpec` and
//! `FeatureHandle` with SpecForge's JSON; `open_store` for every store URI, returning a
//! `Store` whose reads come back as `Lease`s of numpy arrays; `start_daemon`, a node daemon in
//! this process. Errors are `ferry.Error` subclasses with the standard bases SpecForge callers
//! catch (`KeyError`, `PermissionError`, `MemoryError`, ...).
//!
//! Built against the stable ABI of Python 3.10 (`abi3-py310`): one wheel serves 3.10 and later.
//!
//! # Layout
//! * `records` — `SampleRef`, `FeatureSpec`, `FeatureHandle`.
//! * `store` — `open_store`, `Store`, `Lease`; the GIL is released around every store call.
//! * `arrays` — numpy in and out without copies (`unsafe`: array pointers as slices).
//! * `dlpack` — DLPack export of ferry's buffers (`unsafe`: the capsule protocol's structs).
//! * `backend` — `open_store_with_backend`: a Python object (Mooncake's client API) as a byte backend.
//! * `daemon` — `start_daemon`, `Daemon`.
//! * `loader` — `FeatureLoader`, `Batches`, `Batch`; `offline_refs`, `read_manifest`, `write_manifest`.
//! * `ref_queue` — `SampleRefQueue`, the staging queue a queue-mode `FeatureLoader` reads.
//! * `errors` — ferry's `Error` as the Python exception tree of `ferry/_errors.py`.
//! * `pyjson` — JSON values through Python's `json` module.

mod arrays;
mod backend;
mod borrow;
mod control;
mod daemon;
mod dlpack;
mod errors;
mod loader;
mod online;
mod producer;
mod pyjson;
mod records;
mod ref_queue;
mod store;

use pyo3::prelude::*;

/// The native module `ferry._ferry`.
#[pymodule]
#[pyo3(name = "_ferry")]
fn ferry_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<records::PySampleRef>()?;
    m.add_class::<records::PyFeatureSpec>()?;
    m.add_class::<records::PyFeatureHandle>()?;
    m.add_class::<store::Store>()?;
    m.add_class::<store::Lease>()?;
    m.add_class::<daemon::Daemon>()?;
    m.add_class::<arrays::OwnedBuffer>()?;
    m.add_class::<borrow::BorrowedBuffer>()?;
    m.add_function(wrap_pyfunction!(borrow::debug_borrow, m)?)?;
    m.add_class::<dlpack::DLPackTensor>()?;
    m.add_function(wrap_pyfunction!(dlpack::dlpack_exporter, m)?)?;
    m.add_function(wrap_pyfunction!(dlpack::debug_dlpack, m)?)?;
    m.add_function(wrap_pyfunction!(store::open_store, m)?)?;
    m.add_function(wrap_pyfunction!(store::shard_view, m)?)?;
    m.add_function(wrap_pyfunction!(backend::open_store_with_backend, m)?)?;
    m.add_function(wrap_pyfunction!(daemon::start_daemon, m)?)?;
    m.add_function(wrap_pyfunction!(arrays::debug_stats, m)?)?;
    m.add_class::<loader::PyFeatureLoader>()?;
    m.add_class::<loader::PyBatches>()?;
    m.add_class::<loader::Batch>()?;
    m.add_class::<ref_queue::PySampleRefQueue>()?;
    m.add_function(wrap_pyfunction!(loader::offline_refs, m)?)?;
    m.add_function(wrap_pyfunction!(loader::read_manifest, m)?)?;
    m.add_function(wrap_pyfunction!(loader::write_manifest, m)?)?;
    m.add_function(wrap_pyfunction!(loader::debug_last_batch, m)?)?;
    m.add_class::<control::RefChannel>()?;
    m.add_class::<control::SocketCollective>()?;
    m.add_class::<online::PyConsumerConfig>()?;
    m.add_class::<online::OnlineRank>()?;
    m.add_class::<producer::Producer>()?;
    let dtypes: Vec<&str> = ferry_core::DType::ALL.iter().map(|d| d.name()).collect();
    m.add("DTYPES", dtypes)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
