//! DLPack export of ferry's buffers (issue 7): torch, numpy, JAX, CuPy... take the memory of a
//! feature ferry returned through the standard protocol, without a copy.
//!
//! An array from `Store.get` (or a loader `Batch`) is a numpy view of an
//! [`OwnedBuffer`](crate::arrays::OwnedBuffer), ferry's aligned buffer. [`dlpack_exporter`]
//! finds that buffer under an array and wraps it in a [`DLPackTensor`], which has
//! `__dlpack__` / `__dlpack_device__` (the Python array API's producer protocol):
//!
//! * `__dlpack__()` (or `max_version` below 1.0) returns a capsule named `"dltensor"` holding a
//!   legacy `DLManagedTensor`; `max_version >= (1, 0)` returns `"dltensor_versioned"` holding a
//!   `DLManagedTensorVersioned` (version 1.0, with the read-only and is-copied flags).
//! * The managed tensor's context holds a reference to the `OwnedBuffer` (or, for
//!   `copy=True`, its own copy), so the memory lives until the consumer calls the deleter, however
//!   long the lease, the exporter or the original array live. A capsule nobody consumed frees it
//!   in its destructor; a consumer renames the capsule `"used_dltensor[_versioned]"`, which makes
//!   the capsule destructor leave it alone and a second consumer refuse it.
//! * The deleter may run on any thread, with or without the GIL: dropping the `Py` reference
//!   without the GIL defers the decref to pyo3's reference pool (drained the next time ferry
//!   takes the GIL).
//! * Every ferry dtype has a DLPack type: bfloat16 is `kDLBfloat` (code 4) and bool `kDLBool`
//!   (code 6, 8 bits), so torch gets `torch.bfloat16` directly; numpy, which has no bfloat16,
//!   refuses that one capsule. ferry has no complex dtype. The device is always `kDLCPU`.
//!
//! The DLPack structs are written out from `dlpack.h` (v1.0; the legacy ones are unchanged since
//! v0.6), checked by size and field offsets at compile time and read back by the Python tests
//! (`python/tests/test_dlpack.py`, a ctypes reader).

use crate::arrays::OwnedBuffer;
use crate::errors::invalid;
use ferry_core::{AlignedBuf, DType};
use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyCapsule, PyDict, PyTuple};
use std::ffi::{CStr, c_void};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

// --- dlpack.h (v1.0) -------------------------------------------------------------------------

/// `DLPackVersion`.
#[repr(C)]
#[derive(Clone, Copy)]
struct DLPackVersion {
    major: u32,
    minor: u32,
}

/// `DLDevice` (`DLDeviceType` is a C enum, an `int`).
#[repr(C)]
#[derive(Clone, Copy)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

/// `DLDataType`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

/// `DLTensor`.
#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

/// `DLManagedTensor` (the legacy, unversioned ABI: capsule `"dltensor"`).
#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

/// `DLManagedTensorVersioned` (capsule `"dltensor_versioned"`).
#[repr(C)]
struct DLManagedTensorVersioned {
    version: DLPackVersion,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned)>,
    flags: u64,
    dl_tensor: DLTensor,
}

// The C layouts on 64-bit targets (what every consumer's dlpack.h compiles to).
#[cfg(target_pointer_width = "64")]
const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<DLDataType>() == 4);
    assert!(size_of::<DLDevice>() == 8);
    assert!(offset_of!(DLTensor, device) == 8);
    assert!(offset_of!(DLTensor, ndim) == 16);
    assert!(offset_of!(DLTensor, dtype) == 20);
    assert!(offset_of!(DLTensor, shape) == 24);
    assert!(offset_of!(DLTensor, strides) == 32);
    assert!(offset_of!(DLTensor, byte_offset) == 40);
    assert!(size_of::<DLTensor>() == 48);
    assert!(offset_of!(DLManagedTensor, manager_ctx) == 48);
    assert!(offset_of!(DLManagedTensor, deleter) == 56);
    assert!(size_of::<DLManagedTensor>() == 64);
    assert!(offset_of!(DLManagedTensorVersioned, manager_ctx) == 8);
    assert!(offset_of!(DLManagedTensorVersioned, deleter) == 16);
    assert!(offset_of!(DLManagedTensorVersioned, flags) == 24);
    assert!(offset_of!(DLManagedTensorVersioned, dl_tensor) == 32);
    assert!(size_of::<DLManagedTensorVersioned>() == 80);
};

/// `kDLCPU`.
const KDL_CPU: i32 = 1;
/// `DLPACK_FLAG_BITMASK_READ_ONLY`.
const FLAG_READ_ONLY: u64 = 1;
/// `DLPACK_FLAG_BITMASK_IS_COPIED`.
const FLAG_IS_COPIED: u64 = 1 << 1;
/// The DLPack version the versioned capsule declares.
const VERSION: DLPackVersion = DLPackVersion { major: 1, minor: 0 };

const DLTENSOR: &CStr = c"dltensor";
const DLTENSOR_VERSIONED: &CStr = c"dltensor_versioned";

/// The DLPack type of a ferry dtype (`DLDataTypeCode`: 0 int, 1 uint, 2 float, 4 bfloat, 6 bool).
fn dl_dtype(dtype: DType) -> DLDataType {
    let (code, bits) = match dtype {
        DType::Float32 => (2, 32),
        DType::Float64 => (2, 64),
        DType::Float16 => (2, 16),
        DType::BFloat16 => (4, 16),
        DType::Int64 => (0, 64),
        DType::Int32 => (0, 32),
        DType::Int16 => (0, 16),
        DType::Int8 => (0, 8),
        DType::UInt8 => (1, 8),
        DType::Bool => (6, 8),
    };
    DLDataType { code, bits, lanes: 1 }
}

// --- the managed tensor's context ------------------------------------------------------------

/// Capsules whose memory is still held (made and not yet deleted), and totals, for the tests.
static LIVE: AtomicU64 = AtomicU64::new(0);
static EXPORTED: AtomicU64 = AtomicU64::new(0);
static COPIED: AtomicU64 = AtomicU64::new(0);

/// What keeps the exported bytes alive.
enum Keep {
    /// ferry's buffer itself (zero copy).
    Shared(#[expect(dead_code, reason = "held, never read: the reference keeps the buffer alive")] Py<OwnedBuffer>),
    /// A copy (`copy=True`).
    Copied(AlignedBuf),
}

/// `manager_ctx`: the memory's owner and the shape and strides the `DLTensor` points into.
struct Ctx {
    keep: Keep,
    shape: Box<[i64]>,
    strides: Box<[i64]>,
}

impl Drop for Ctx {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The legacy tensor's deleter: frees the struct and its context (dropping the owner reference).
unsafe extern "C" fn delete_legacy(managed: *mut DLManagedTensor) {
    if managed.is_null() {
        return;
    }
    // SAFETY: every `DLManagedTensor` carrying this deleter was made by `export` with
    // `Box::into_raw`, its `manager_ctx` a `Box<Ctx>` from `Box::into_raw`; DLPack calls the
    // deleter exactly once (the consumer, or the capsule destructor for an unconsumed capsule,
    // never both: the consumer renames the capsule first), so both boxes are reclaimed once.
    // Dropping `Ctx` needs no GIL (pyo3 defers a `Py` decref made without it).
    unsafe {
        let managed = Box::from_raw(managed);
        drop(Box::from_raw(managed.manager_ctx.cast::<Ctx>()));
    }
}

/// The versioned tensor's deleter (as [`delete_legacy`]).
unsafe extern "C" fn delete_versioned(managed: *mut DLManagedTensorVersioned) {
    if managed.is_null() {
        return;
    }
    // SAFETY: as in `delete_legacy`: `managed` and its `manager_ctx` are boxes `export` leaked
    // for this one capsule, reclaimed exactly once.
    unsafe {
        let managed = Box::from_raw(managed);
        drop(Box::from_raw(managed.manager_ctx.cast::<Ctx>()));
    }
}

/// The `"dltensor"` capsule's destructor: deletes the tensor unless a consumer took it.
unsafe extern "C" fn capsule_destructor_legacy(capsule: *mut ffi::PyObject) {
    // SAFETY: Python calls this with the capsule being destroyed, the GIL held.
    // `PyCapsule_IsValid` sets no exception; once it says the name is still "dltensor" (no
    // consumer renamed it to "used_dltensor"), `PyCapsule_GetPointer` with that name succeeds
    // and returns the `DLManagedTensor` `export` stored, still owned by the capsule.
    unsafe {
        if ffi::PyCapsule_IsValid(capsule, DLTENSOR.as_ptr()) != 1 {
            return;
        }
        let managed = ffi::PyCapsule_GetPointer(capsule, DLTENSOR.as_ptr()).cast::<DLManagedTensor>();
        if let Some(deleter) = managed.as_ref().and_then(|m| m.deleter) {
            deleter(managed);
        }
    }
}

/// The `"dltensor_versioned"` capsule's destructor (as [`capsule_destructor_legacy`]).
unsafe extern "C" fn capsule_destructor_versioned(capsule: *mut ffi::PyObject) {
    // SAFETY: as in `capsule_destructor_legacy`, with the versioned name and struct.
    unsafe {
        if ffi::PyCapsule_IsValid(capsule, DLTENSOR_VERSIONED.as_ptr()) != 1 {
            return;
        }
        let managed =
            ffi::PyCapsule_GetPointer(capsule, DLTENSOR_VERSIONED.as_ptr()).cast::<DLManagedTensorVersioned>();
        if let Some(deleter) = managed.as_ref().and_then(|m| m.deleter) {
            deleter(managed);
        }
    }
}

// --- the exporter ----------------------------------------------------------------------------

/// A DLPack exporter over one of ferry's buffers (what `ferry.to_dlpack(array)` returns):
/// `torch.from_dlpack(t)`, `numpy.from_dlpack(t)`, `jax.dlpack.from_dlpack(t)` take the memory
/// without a copy and keep it alive until they free their tensor.
#[pyclass(frozen, weakref, module = "ferry", name = "DLPackTensor")]
pub(crate) struct DLPackTensor {
    owner: Py<OwnedBuffer>,
    addr: usize,
    nbytes: usize,
    shape: Vec<u64>,
    dtype: DType,
    readonly: bool,
}

#[pymethods]
impl DLPackTensor {
    /// The DLPack capsule (the array API's `__dlpack__`). `max_version >= (1, 0)` gives a
    /// `"dltensor_versioned"` capsule (DLPack 1.0), otherwise a legacy `"dltensor"` one;
    /// `copy=True` exports a copy; `stream` must be `None` (or -1) and `dl_device` the CPU.
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__<'py>(
        &self,
        py: Python<'py>,
        stream: Option<Bound<'py, PyAny>>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(i32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Bound<'py, PyCapsule>> {
        if let Some(stream) = stream
            && !stream.is_none()
            && !matches!(stream.extract::<i64>(), Ok(-1))
        {
            return Err(PyBufferError::new_err(format!(
                "ferry's buffers are CPU memory: __dlpack__ takes stream=None, not {}",
                stream.repr()?
            )));
        }
        if let Some(device) = dl_device
            && device != (KDL_CPU, 0)
        {
            return Err(PyBufferError::new_err(format!(
                "ferry's buffers are CPU memory (device (1, 0)); cannot export to device {device:?}"
            )));
        }
        let versioned = max_version.is_some_and(|(major, _)| major >= 1);
        let copy = copy == Some(true);
        if self.readonly && !versioned && !copy {
            return Err(PyBufferError::new_err(
                "the array is read-only and a legacy DLPack capsule cannot say so; ask for max_version=(1, 0) or copy=True",
            ));
        }
        self.export(py, versioned, copy)
    }

    /// `(kDLCPU, 0)`: `(1, 0)`.
    fn __dlpack_device__(&self) -> (i32, i32) {
        (KDL_CPU, 0)
    }

    /// Address of the first byte of ferry's buffer.
    #[getter]
    fn address(&self) -> usize {
        self.addr
    }

    /// Size in bytes.
    #[getter]
    fn nbytes(&self) -> usize {
        self.nbytes
    }

    /// The shape.
    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.shape)
    }

    /// The ferry dtype name (`"bfloat16"`, `"float32"`, ...).
    #[getter]
    fn dtype(&self) -> &'static str {
        self.dtype.name()
    }

    /// Whether the array it came from was read-only (versioned capsules carry the flag).
    #[getter]
    fn readonly(&self) -> bool {
        self.readonly
    }

    fn __repr__(&self) -> String {
        let dims: Vec<String> = self.shape.iter().map(u64::to_string).collect();
        let comma = if dims.len() == 1 { "," } else { "" };
        format!(
            "ferry.DLPackTensor(dtype={}, shape=({}{comma}), address={:#x})",
            self.dtype,
            dims.join(", "),
            self.addr
        )
    }
}

impl DLPackTensor {
    /// Builds the managed tensor and its capsule.
    fn export<'py>(&self, py: Python<'py>, versioned: bool, copy: bool) -> PyResult<Bound<'py, PyCapsule>> {
        let shape = self
            .shape
            .iter()
            .map(|&d| i64::try_from(d))
            .collect::<Result<Box<[i64]>, _>>()
            .map_err(|_| invalid(py, format!("shape {:?} does not fit DLPack's int64", self.shape)))?;
        // C-contiguous strides, in elements (DLPack 1.2 asks for them; older consumers accept them).
        let mut strides = vec![1i64; shape.len()].into_boxed_slice();
        for i in (0..shape.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1].saturating_mul(shape[i + 1].max(1));
        }
        let keep = if copy {
            let mut buf = AlignedBuf::zeroed(self.nbytes);
            if self.nbytes > 0 {
                // SAFETY: `addr`/`nbytes` are the start and length of the `OwnedBuffer`'s
                // allocation, which `self.owner` keeps alive; the slice is only read, with the GIL
                // held (the same rule as any numpy read of the array).
                let src = unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.nbytes) };
                buf.as_mut_slice().copy_from_slice(src);
            }
            COPIED.fetch_add(1, Ordering::Relaxed);
            Keep::Copied(buf)
        } else {
            Keep::Shared(self.owner.clone_ref(py))
        };
        LIVE.fetch_add(1, Ordering::Relaxed);
        EXPORTED.fetch_add(1, Ordering::Relaxed);
        let mut ctx = Box::new(Ctx { keep, shape, strides });
        let data = match &mut ctx.keep {
            Keep::Shared(_) => self.addr as *mut c_void,
            Keep::Copied(buf) => buf.as_mut_slice().as_mut_ptr().cast::<c_void>(),
        };
        let dl_tensor = DLTensor {
            data,
            device: DLDevice { device_type: KDL_CPU, device_id: 0 },
            ndim: i32::try_from(ctx.shape.len()).map_err(|_| invalid(py, "too many dimensions for DLPack"))?,
            dtype: dl_dtype(self.dtype),
            shape: ctx.shape.as_mut_ptr(),
            strides: ctx.strides.as_mut_ptr(),
            byte_offset: 0,
        };
        // The boxed slices' heap memory does not move when `ctx` is leaked below.
        let manager_ctx = Box::into_raw(ctx).cast::<c_void>();
        if versioned {
            let mut flags = 0;
            if self.readonly && !copy {
                flags |= FLAG_READ_ONLY;
            }
            if copy {
                flags |= FLAG_IS_COPIED;
            }
            let managed = Box::into_raw(Box::new(DLManagedTensorVersioned {
                version: VERSION,
                manager_ctx,
                deleter: Some(delete_versioned),
                flags,
                dl_tensor,
            }));
            // SAFETY: `managed` is a live, leaked box whose ownership passes to the capsule:
            // its destructor deletes it unless a consumer renamed it and took ownership.
            // `DLTENSOR_VERSIONED` is 'static, as PyCapsule_New requires of the name.
            let made = unsafe {
                PyCapsule::new_with_pointer_and_destructor(
                    py,
                    NonNull::new_unchecked(managed.cast::<c_void>()),
                    DLTENSOR_VERSIONED,
                    Some(capsule_destructor_versioned),
                )
            };
            // SAFETY: no capsule was made, so nothing else owns `managed`; delete it once.
            made.inspect_err(|_| unsafe { delete_versioned(managed) })
        } else {
            let managed =
                Box::into_raw(Box::new(DLManagedTensor { dl_tensor, manager_ctx, deleter: Some(delete_legacy) }));
            // SAFETY: as above, for the legacy struct and name.
            let made = unsafe {
                PyCapsule::new_with_pointer_and_destructor(
                    py,
                    NonNull::new_unchecked(managed.cast::<c_void>()),
                    DLTENSOR,
                    Some(capsule_destructor_legacy),
                )
            };
            // SAFETY: no capsule was made, so nothing else owns `managed`; delete it once.
            made.inspect_err(|_| unsafe { delete_legacy(managed) })
        }
    }
}

/// The ferry buffer under `array`, if `array` is one of ferry's arrays (or the buffer itself).
fn find_owner<'py>(array: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, OwnedBuffer>>> {
    let mut obj = array.clone();
    // numpy collapses view chains to the array over the foreign base, so two hops suffice
    // (an ml_dtypes bfloat16 view, the array over the buffer, the buffer); allow a few more.
    for _ in 0..8 {
        if let Ok(owner) = obj.cast::<OwnedBuffer>() {
            return Ok(Some(owner.clone()));
        }
        match obj.getattr_opt("base")? {
            Some(base) if !base.is_none() => obj = base,
            _ => return Ok(None),
        }
    }
    Ok(None)
}

/// A [`DLPackTensor`] over the ferry buffer under `array` (an array `Store.get` or a loader
/// `Batch` returned, whole, with its own dtype, or the `_OwnedBuffer` itself); `None` for any
/// other object (another array, a slice or reinterpreting view of a ferry array, an empty
/// feature, which has no buffer).
#[pyfunction]
#[pyo3(name = "_dlpack_exporter")]
pub(crate) fn dlpack_exporter(array: &Bound<'_, PyAny>) -> PyResult<Option<DLPackTensor>> {
    let Some(owner) = find_owner(array)? else {
        return Ok(None);
    };
    let (addr, nbytes, shape, dtype) = owner.get().parts();
    let Some(dtype) = dtype else {
        return Ok(None);
    };
    let shape = shape.to_vec();
    let mut readonly = false;
    if !array.is(&owner) {
        let interface = array.getattr("__array_interface__")?;
        let data = interface.get_item("data")?;
        let (a_addr, a_readonly): (usize, bool) = (data.get_item(0)?.extract()?, data.get_item(1)?.extract()?);
        let a_nbytes: usize = array.getattr("nbytes")?.extract()?;
        let a_shape: Vec<u64> = array.getattr("shape")?.extract()?;
        let contiguous: bool = array.getattr("flags")?.getattr("c_contiguous")?.extract()?;
        let dname: String = array.getattr("dtype")?.getattr("name")?.extract()?;
        let dtype_ok = dname == dtype.name() || (dtype == DType::BFloat16 && dname == "uint16");
        if a_addr != addr || a_nbytes != nbytes || a_shape != shape || !contiguous || !dtype_ok {
            return Ok(None);
        }
        readonly = a_readonly;
    }
    Ok(Some(DLPackTensor { owner: owner.unbind(), addr, nbytes, shape, dtype, readonly }))
}

/// Debugging aid for tests: `{"live", "exported", "copied"}`: DLPack tensors made and not yet
/// deleted, and process totals made and made as copies.
#[pyfunction]
#[pyo3(name = "_debug_dlpack")]
pub(crate) fn debug_dlpack(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("live", LIVE.load(Ordering::Relaxed))?;
    d.set_item("exported", EXPORTED.load(Ordering::Relaxed))?;
    d.set_item("copied", COPIED.load(Ordering::Relaxed))?;
    Ok(d)
}
