//! `Store.get(ref, borrow=True)`: numpy arrays straight over a daemon's shared-memory arena
//! (`Client::get_borrowed`), no copy at all.
//!
//! Lifetime: every array's base is a [`BorrowedBuffer`] holding an `Arc<Pinned>`; [`Pinned`]
//! owns the `BorrowedSample` (the daemon's read lease, which is also its pin on the bytes) and
//! an `Arc<Client>` (the connection and the arena mapping). The daemon's lease and its pin are
//! one thing, so they cannot be released separately: the lease is released when the last of
//! the `Lease` object (until its `release()`) and the arrays over it goes away. `Lease.release()`
//! drops the lease's own reference and empties the `Lease`; arrays taken out of it keep the
//! pin (and so the lease) until they are collected. An abort by anyone refuses later reads but
//! never reuses pinned bytes, and the mapping lives as long as the `Client` does, so a
//! borrowed array never shows unmapped or reused memory. `Store.release(handle)` with a
//! handle that is pinned here is refused (it would unpin bytes under live arrays).
//!
//! `unsafe` in this module: the `BorrowedSample<'c>` is stored next to the `Arc<Client>` it
//! borrows (a self-referential pair), with its lifetime erased.

use crate::arrays::{self, Bf16Mode};
use crate::errors::invalid;
use ferry_core::{DType, FeatureHandle, Result, SampleRef};
use ferry_net::{BorrowedSample, Client};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Live [`Pinned`] samples in this process (for tests).
static LIVE: AtomicU64 = AtomicU64::new(0);
/// Handles of the live [`Pinned`] samples: `Store.release(handle)` refuses them.
static PINNED: Mutex<Vec<FeatureHandle>> = Mutex::new(Vec::new());

/// One borrowed sample: the daemon's read lease (its pin on the bytes) and the client whose
/// mapping the bytes are in. Dropping it releases the lease.
pub(crate) struct Pinned {
    /// Declared before `_client`, so it is dropped (and the lease released) first. Its real
    /// lifetime is `_client`'s.
    sample: Mutex<Option<BorrowedSample<'static>>>,
    handle: FeatureHandle,
    _client: Arc<Client>,
}

/// One borrowed tensor: name, dtype, shape, address in the arena and size.
pub(crate) struct Part {
    pub(crate) name: String,
    pub(crate) dtype: DType,
    pub(crate) shape: Vec<u64>,
    pub(crate) addr: usize,
    pub(crate) nbytes: usize,
}

impl Pinned {
    /// Borrows `r`'s features (all, or `names`) from `client`'s arena. Blocking (no GIL).
    pub(crate) fn borrow(
        client: Arc<Client>,
        r: &SampleRef,
        names: Option<&[&str]>,
    ) -> Result<(Arc<Pinned>, Vec<Part>)> {
        let sample = client.get_borrowed(r, names)?;
        let parts: Vec<Part> = sample
            .views()
            .into_iter()
            .map(|(name, v)| Part {
                name: name.to_owned(),
                dtype: v.dtype(),
                shape: v.shape().to_vec(),
                addr: v.bytes().as_ptr() as usize,
                nbytes: v.bytes().len(),
            })
            .collect();
        let handle = sample.handle().cloned().ok_or_else(|| ferry_core::Error::Corrupt {
            what: "borrowed sample".into(),
            message: "no read lease".into(),
        })?;
        // SAFETY: the sample borrows `*client` (the `Client` inside the `Arc`, which never
        // moves) and the arena mapping that `Client` owns. `Pinned` keeps a clone of the `Arc`
        // in `_client` and drops `sample` first (field order, and `Drop` takes it out first),
        // so the erased lifetime never outlives the borrow. The views' bytes stay valid while
        // the sample holds its lease: the daemon pins them until the lease is released.
        let sample = unsafe { std::mem::transmute::<BorrowedSample<'_>, BorrowedSample<'static>>(sample) };
        if let Ok(mut pinned) = PINNED.lock() {
            pinned.push(handle.clone());
        }
        LIVE.fetch_add(1, Ordering::SeqCst);
        Ok((Arc::new(Pinned { sample: Mutex::new(Some(sample)), handle, _client: client }), parts))
    }

    /// The read lease.
    pub(crate) fn handle(&self) -> &FeatureHandle {
        &self.handle
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let sample = self.sample.get_mut().map_or_else(|e| e.into_inner().take(), Option::take);
        if let Some(sample) = sample
            && let Err(e) = sample.release()
        {
            tracing::warn!(error = %e, sample = %self.handle.sample_id.as_str(), "releasing a borrowed sample's lease");
        }
        if let Ok(mut pinned) = PINNED.lock()
            && let Some(i) = pinned.iter().position(|h| *h == self.handle)
        {
            pinned.swap_remove(i);
        }
        LIVE.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Whether `handle` belongs to a borrowed sample still pinned by arrays in this process.
pub(crate) fn is_pinned(handle: &FeatureHandle) -> bool {
    PINNED.lock().is_ok_and(|p| p.contains(handle))
}

/// The base of a borrowed array: a read-only `__array_interface__` over a tensor in the
/// daemon's arena, holding the sample's pin.
#[pyclass(frozen, weakref, module = "ferry", name = "_BorrowedBuffer")]
pub(crate) struct BorrowedBuffer {
    pinned: Arc<Pinned>,
    addr: usize,
    nbytes: usize,
    shape: Vec<u64>,
    typestr: &'static str,
}

#[pymethods]
impl BorrowedBuffer {
    /// numpy's array interface (version 3): the bytes as a read-only C-contiguous array.
    #[getter(__array_interface__)]
    fn array_interface<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        arrays::array_interface(py, &self.shape, self.typestr, self.addr, true)
    }

    /// Address of the first byte, inside the daemon's arena as mapped in this process.
    #[getter]
    fn address(&self) -> usize {
        self.addr
    }

    /// Size in bytes.
    #[getter]
    fn nbytes(&self) -> usize {
        self.nbytes
    }

    /// The read lease that pins the bytes.
    #[getter]
    fn handle(&self) -> crate::records::PyFeatureHandle {
        crate::records::PyFeatureHandle { inner: self.pinned.handle.clone() }
    }
}

/// The borrowed sample's arrays, as a dict of name -> read-only array, with the trace entries.
pub(crate) fn to_numpy<'py>(
    py: Python<'py>,
    pinned: &Arc<Pinned>,
    parts: Vec<Part>,
    bf16: Bf16Mode,
) -> PyResult<(Bound<'py, PyDict>, arrays::TraceEntries)> {
    let out = PyDict::new(py);
    let mut trace = Vec::with_capacity(parts.len());
    for p in parts {
        let owner = Bound::new(
            py,
            BorrowedBuffer {
                pinned: Arc::clone(pinned),
                addr: p.addr,
                nbytes: p.nbytes,
                shape: p.shape.clone(),
                typestr: arrays::typestr(p.dtype),
            },
        )?;
        let arr = arrays::borrowed_to_numpy(py, owner.into_any(), p.dtype, &p.shape, p.nbytes, bf16)?;
        trace.push((p.name.clone(), if p.nbytes == 0 { 0 } else { p.addr }, p.nbytes));
        out.set_item(p.name, arr)?;
    }
    Ok((out, trace))
}

/// `borrow=True` on a store that cannot borrow.
pub(crate) fn refused(py: Python<'_>, uri: &str) -> PyErr {
    invalid(
        py,
        format!(
            "borrow=True reads in place from a daemon's shared-memory arena (ferry+unix://, route \"shm\"); {uri} is not a daemon client: use borrow=False"
        ),
    )
}

/// Debugging aid for tests: `{"live_borrowed_samples": n}`, the borrowed samples whose
/// lease is still held in this process (by a `Lease` or by arrays over it).
#[pyfunction]
#[pyo3(name = "_debug_borrow")]
pub(crate) fn debug_borrow(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("live_borrowed_samples", LIVE.load(Ordering::SeqCst))?;
    Ok(d)
}
