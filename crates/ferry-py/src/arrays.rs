//! numpy arrays in and out of ferry, without copies where the layout allows.
//!
//! The module is built for the stable ABI of Python 3.10 (`abi3-py310`), where the buffer
//! protocol is not part of the limited API (it is from 3.11; pyo3 gates `PyBuffer` and
//! `__getbuffer__` accordingly). So arrays cross through numpy's array interface instead
//! (`__array_interface__`, version 3), which numpy reads and writes on every version:
//!
//! * **put** reads a C-contiguous little-endian array in place: the bytes the store copies from
//!   are the array's own memory (its `__array_interface__` data pointer), held alive by a
//!   reference for the call. Any other layout or byte order is copied once by numpy first.
//! * **get** returns arrays over ferry's own buffers: each buffer is an [`OwnedBuffer`] that
//!   exports `__array_interface__`, and `numpy.asarray` wraps it without a copy, keeping it
//!   as the array's base. The bytes belong to the array (they were read out of the store into
//!   that buffer), so they stay valid however long the array lives, lease or no lease.
//! * **get_into** writes straight into the caller's writable C-contiguous arrays.
//!
//! `unsafe` in this module: turning an array's data pointer into a slice (DLPack export's own
//! is in `dlpack`).

use crate::errors::{invalid, unknown_dtype};
use ferry_core::{AlignedBuf, DType, FeatureSpec, TensorBuf};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// How a bfloat16 feature comes back to Python (numpy has no bfloat16 of its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bf16Mode {
    /// Arrays of `ml_dtypes.bfloat16` (the dtype JAX and TensorFlow use with numpy).
    MlDtypes,
    /// `uint16` arrays holding the bfloat16 bit patterns (`torch.from_numpy(a.view("int16"))
    /// .view(torch.bfloat16)` recovers the values, sharing memory).
    UInt16,
}

impl Bf16Mode {
    /// `"auto"` (ml_dtypes when importable, else uint16), `"ml_dtypes"` (required) or `"uint16"`.
    pub(crate) fn parse(py: Python<'_>, name: &str) -> PyResult<Bf16Mode> {
        match name {
            "auto" => Ok(if ml_bfloat16(py).is_some() { Bf16Mode::MlDtypes } else { Bf16Mode::UInt16 }),
            "uint16" => Ok(Bf16Mode::UInt16),
            "ml_dtypes" if ml_bfloat16(py).is_some() => Ok(Bf16Mode::MlDtypes),
            "ml_dtypes" => Err(pyo3::exceptions::PyImportError::new_err(
                "bfloat16=\"ml_dtypes\" needs the ml_dtypes package (pip install ml_dtypes)",
            )),
            other => Err(invalid(py, format!("bfloat16={other:?}: expected \"auto\", \"ml_dtypes\" or \"uint16\""))),
        }
    }

    /// The name `parse` takes.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Bf16Mode::MlDtypes => "ml_dtypes",
            Bf16Mode::UInt16 => "uint16",
        }
    }
}

/// numpy's pieces this module calls, imported once.
struct Numpy {
    ndarray: Py<PyType>,
    asarray: Py<PyAny>,
    ascontiguousarray: Py<PyAny>,
    empty: Py<PyAny>,
}

fn numpy(py: Python<'_>) -> PyResult<&'static Numpy> {
    static NUMPY: PyOnceLock<Numpy> = PyOnceLock::new();
    NUMPY.get_or_try_init(py, || {
        let np = py.import("numpy")?;
        Ok(Numpy {
            ndarray: np.getattr("ndarray")?.cast_into::<PyType>()?.unbind(),
            asarray: np.getattr("asarray")?.unbind(),
            ascontiguousarray: np.getattr("ascontiguousarray")?.unbind(),
            empty: np.getattr("empty")?.unbind(),
        })
    })
}

/// `ml_dtypes.bfloat16`, when the package is importable.
fn ml_bfloat16(py: Python<'_>) -> Option<Bound<'_, PyAny>> {
    static BF16: PyOnceLock<Option<Py<PyAny>>> = PyOnceLock::new();
    BF16.get_or_init(py, || py.import("ml_dtypes").and_then(|m| m.getattr("bfloat16")).ok().map(Bound::unbind))
        .as_ref()
        .map(|t| t.bind(py).clone())
}

/// A function of the pure-Python helpers (`ferry/_arrays.py`).
fn helper<'py>(py: Python<'py>, cell: &'static PyOnceLock<Py<PyAny>>, name: &str) -> PyResult<&'py Bound<'py, PyAny>> {
    cell.import(py, "ferry._arrays", name)
}

/// The array-interface type string of a dtype (bfloat16 travels as its `uint16` bits).
pub(crate) fn typestr(dtype: DType) -> &'static str {
    match dtype {
        DType::Float32 => "<f4",
        DType::Float64 => "<f8",
        DType::Float16 => "<f2",
        DType::BFloat16 => "<u2",
        DType::Int64 => "<i8",
        DType::Int32 => "<i4",
        DType::Int16 => "<i2",
        DType::Int8 => "|i1",
        DType::UInt8 => "|u1",
        DType::Bool => "|b1",
    }
}

/// `(feature name, address, nbytes)` of each tensor of one call.
pub(crate) type TraceEntries = Vec<(String, usize, usize)>;

/// Counters and the last call's addresses, so tests can prove which bytes ferry read and wrote.
#[derive(Default)]
struct Trace {
    put: TraceEntries,
    get: TraceEntries,
    get_into: TraceEntries,
}

static TRACE: Mutex<Trace> = Mutex::new(Trace { put: Vec::new(), get: Vec::new(), get_into: Vec::new() });
static PUT_BORROWED: AtomicU64 = AtomicU64::new(0);
static PUT_COPIED: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Copy)]
pub(crate) enum TraceOp {
    Put,
    Get,
    GetInto,
}

/// Remembers the `(name, address, nbytes)` of each tensor of the last call of `op`.
pub(crate) fn trace(op: TraceOp, entries: TraceEntries) {
    if let Ok(mut t) = TRACE.lock() {
        match op {
            TraceOp::Put => t.put = entries,
            TraceOp::Get => t.get = entries,
            TraceOp::GetInto => t.get_into = entries,
        }
    }
}

/// Debugging aid for tests: how many put arrays were read in place or copied first (process
/// totals), and `(name, address, nbytes)` of the memory the last `put` read, the last `get`
/// returned and the last `get_into` wrote.
#[pyfunction]
#[pyo3(name = "_debug_stats")]
pub(crate) fn debug_stats(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("put_arrays_borrowed", PUT_BORROWED.load(Ordering::Relaxed))?;
    d.set_item("put_arrays_copied", PUT_COPIED.load(Ordering::Relaxed))?;
    if let Ok(t) = TRACE.lock() {
        d.set_item("last_put", t.put.clone())?;
        d.set_item("last_get", t.get.clone())?;
        d.set_item("last_get_into", t.get_into.clone())?;
    }
    Ok(d)
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map_or_else(|_| "?".to_owned(), |n| n.to_string())
}

/// The array's dtype as `(name, itemsize, has_object, byteorder)`.
fn dtype_info(arr: &Bound<'_, PyAny>) -> PyResult<(String, usize, bool, String)> {
    let dt = arr.getattr("dtype")?;
    Ok((
        dt.getattr("name")?.extract()?,
        dt.getattr("itemsize")?.extract()?,
        dt.getattr("hasobject")?.extract()?,
        dt.getattr("byteorder")?.extract()?,
    ))
}

fn data_address(arr: &Bound<'_, PyAny>) -> PyResult<usize> {
    arr.getattr("__array_interface__")?.get_item("data")?.get_item(0)?.extract()
}

fn flag(arr: &Bound<'_, PyAny>, name: &str) -> PyResult<bool> {
    arr.getattr("flags")?.getattr(name)?.extract()
}

/// The ferry dtype of a numpy dtype name (`float32`, `bool`, `bfloat16` from ml_dtypes, ...).
fn ferry_dtype(name: &str) -> Option<DType> {
    DType::ALL.into_iter().find(|d| d.name() == name)
}

/// A tensor about to be put: a C-contiguous little-endian ndarray kept alive for the call.
pub(crate) struct PutArray<'py> {
    /// Keeps the memory alive (and is the array read, or numpy's contiguous copy of it).
    _array: Bound<'py, PyAny>,
    pub(crate) dtype: DType,
    pub(crate) shape: Vec<u64>,
    addr: usize,
    len: usize,
}

impl PutArray<'_> {
    /// The array's bytes, in place.
    pub(crate) fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `addr` and `len` are the data pointer and `nbytes` of a C-contiguous ndarray
        // that `self._array` keeps alive for as long as this borrow of `self` lasts; numpy keeps
        // an array's memory (or its base's) valid while the array lives, and a C-contiguous
        // array's bytes are exactly `nbytes` bytes from its data pointer. The slice is only read.
        // The caller must not write the array from another thread while the put runs (the GIL
        // is released), as with any numpy operation that releases the GIL.
        unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.len) }
    }

    /// The address the bytes are read from.
    pub(crate) fn address(&self) -> usize {
        self.addr
    }
}

/// Turns `obj` (a numpy array, a torch tensor, or anything `numpy.asarray` takes) into a
/// [`PutArray`]. `override_dtype` stores the bits under another dtype of the same item size
/// (`uint16` arrays as `bfloat16`).
pub(crate) fn prepare_put<'py>(
    py: Python<'py>,
    name: &str,
    obj: &Bound<'py, PyAny>,
    override_dtype: Option<DType>,
) -> PyResult<PutArray<'py>> {
    static AS_NUMPY: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let np = numpy(py)?;
    let (mut arr, hint) = if obj.is_instance(np.ndarray.bind(py))? {
        (obj.clone(), None)
    } else {
        let converted = helper(py, &AS_NUMPY, "_as_numpy")?.call1((obj, name))?;
        let (arr, hint): (Bound<'py, PyAny>, Option<String>) = converted.extract()?;
        (arr, hint)
    };
    let (dname, itemsize, has_object, byteorder) = dtype_info(&arr)?;
    let hinted = hint.as_deref().and_then(ferry_dtype);
    let dtype = match override_dtype.or(hinted) {
        Some(_) if has_object => {
            return Err(invalid(py, format!("feature {name:?}: an object array cannot be stored")));
        }
        Some(d) if d.size() != itemsize => {
            return Err(invalid(
                py,
                format!(
                    "feature {name:?}: a {dname} array ({itemsize}-byte items) cannot be stored as {d} ({}-byte items)",
                    d.size()
                ),
            ));
        }
        Some(d) => d,
        None => match ferry_dtype(&dname) {
            Some(d) => d,
            None if dname == "uint16" => uint16_hint(py, name)?,
            None => {
                return Err(unknown_dtype(
                    py,
                    &dname,
                    format!(
                        "feature {name:?}: numpy dtype {dname} is not a ferry dtype (float32, float64, float16, bfloat16, int64, int32, int16, int8, uint8, bool)"
                    ),
                ));
            }
        },
    };
    let shape: Vec<u64> = arr.getattr("shape")?.extract()?;
    let mut copied = false;
    if byteorder == ">" {
        let little = arr.getattr("dtype")?.call_method1("newbyteorder", ("<",))?;
        arr = arr.call_method1("astype", (little,))?;
        copied = true;
    }
    if !flag(&arr, "c_contiguous")? {
        arr = np.ascontiguousarray.bind(py).call1((&arr,))?;
        copied = true;
    }
    let counter = if copied { &PUT_COPIED } else { &PUT_BORROWED };
    counter.fetch_add(1, Ordering::Relaxed);
    let len: usize = arr.getattr("nbytes")?.extract()?;
    let addr = if len == 0 { 0 } else { data_address(&arr)? };
    Ok(PutArray { _array: arr, dtype, shape, addr, len })
}

/// `uint16` is not a ferry dtype; a uint16 array is most likely bfloat16 bits, so the error
/// says how to store it.
fn uint16_hint(py: Python<'_>, name: &str) -> PyResult<DType> {
    Err(unknown_dtype(
        py,
        "uint16",
        format!(
            "feature {name:?}: numpy dtype uint16 is not a ferry dtype; to store bfloat16 bit patterns pass dtypes={{{name:?}: \"bfloat16\"}}"
        ),
    ))
}

/// A caller's array that `get_into` writes: writable, C-contiguous, the spec's dtype and size.
pub(crate) struct OutArray<'py> {
    /// Keeps the memory alive.
    _array: Bound<'py, PyAny>,
    addr: usize,
    len: usize,
}

impl OutArray<'_> {
    /// The address written.
    pub(crate) fn address(&self) -> usize {
        self.addr
    }

    /// The bytes written.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The array's bytes, writable, in place.
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: `addr` and `len` are the data pointer and `nbytes` of a writable C-contiguous
        // ndarray that `self._array` keeps alive for this borrow; `check_disjoint` has proven no
        // other `OutArray` of the same call overlaps it, so this is the only Rust reference to
        // these bytes. Python code must not touch the array while the read runs (the GIL is
        // released), as with any numpy operation that releases the GIL.
        unsafe { std::slice::from_raw_parts_mut(self.addr as *mut u8, self.len) }
    }
}

/// Checks that `obj` can receive `spec`'s bytes and returns it as an [`OutArray`].
pub(crate) fn prepare_out<'py>(
    py: Python<'py>,
    obj: &Bound<'py, PyAny>,
    spec: &FeatureSpec,
) -> PyResult<OutArray<'py>> {
    static AS_NUMPY_OUT: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let name = &spec.name;
    let np = numpy(py)?;
    let arr = if obj.is_instance(np.ndarray.bind(py))? {
        obj.clone()
    } else {
        helper(py, &AS_NUMPY_OUT, "_as_numpy_out")?.call1((obj, name))?
    };
    let want = spec.dtype().map_err(|e| crate::errors::to_py(py, &e))?;
    let (dname, _, _, byteorder) = dtype_info(&arr)?;
    let bits_ok = want == DType::BFloat16 && (dname == "uint16" || dname == "int16");
    if !(ferry_dtype(&dname) == Some(want) || bits_ok) || byteorder == ">" {
        return Err(invalid(
            py,
            format!(
                "get_into: feature {name:?} is {want}, the destination array is {dname}{}",
                if want == DType::BFloat16 {
                    " (bfloat16 takes ml_dtypes.bfloat16, uint16 or int16 arrays)"
                } else {
                    ""
                }
            ),
        ));
    }
    if !flag(&arr, "c_contiguous")? || !flag(&arr, "writeable")? {
        return Err(invalid(py, format!("get_into: the array for feature {name:?} must be writable and C-contiguous")));
    }
    let len: usize = arr.getattr("nbytes")?.extract()?;
    let want_len = spec.nbytes().map_err(|e| crate::errors::to_py(py, &e))?;
    if len as u64 != want_len {
        return Err(invalid(
            py,
            format!(
                "get_into: feature {name:?} is {want_len} bytes (shape {:?}), the destination array is {len} bytes (shape {})",
                spec.shape,
                arr.getattr("shape")?.repr()?
            ),
        ));
    }
    let addr = if len == 0 { 0 } else { data_address(&arr)? };
    Ok(OutArray { _array: arr, addr, len })
}

/// Refuses destinations that overlap (two `&mut` slices over the same bytes).
pub(crate) fn check_disjoint(py: Python<'_>, outs: &[(String, OutArray<'_>)]) -> PyResult<()> {
    let mut spans: Vec<(usize, usize, &str)> =
        outs.iter().filter(|(_, o)| o.len > 0).map(|(n, o)| (o.addr, o.addr + o.len, n.as_str())).collect();
    spans.sort_unstable();
    for pair in spans.windows(2) {
        if let [a, b] = pair
            && b.0 < a.1
        {
            return Err(invalid(py, format!("get_into: the arrays for features {:?} and {:?} overlap", a.2, b.2)));
        }
    }
    Ok(())
}

/// numpy's array interface (version 3) for `shape` elements of `typestr` at `addr`, C-contiguous:
/// what every ferry-owned or borrowed buffer hands numpy instead of its bytes.
pub(crate) fn array_interface<'py>(
    py: Python<'py>,
    shape: &[u64],
    typestr: &str,
    addr: usize,
    readonly: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("version", 3)?;
    d.set_item("shape", PyTuple::new(py, shape)?)?;
    d.set_item("typestr", typestr)?;
    d.set_item("data", (addr, readonly))?;
    d.set_item("strides", py.None())?;
    Ok(d)
}

/// A ferry buffer that numpy wraps without a copy (through `__array_interface__`); the array
/// keeps it as its `base`, so the memory lives exactly as long as the last array over it.
#[pyclass(frozen, weakref, module = "ferry", name = "_OwnedBuffer")]
pub(crate) struct OwnedBuffer {
    /// The memory. Never read or written from Rust after construction: only numpy touches
    /// the bytes, through `addr`. Dropping it returns the memory to the store's buffer pool.
    _buf: AlignedBuf,
    addr: usize,
    nbytes: usize,
    shape: Vec<u64>,
    typestr: &'static str,
}

#[pymethods]
impl OwnedBuffer {
    /// numpy's array interface (version 3): the buffer as a writable C-contiguous array.
    #[getter(__array_interface__)]
    fn array_interface<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        array_interface(py, &self.shape, self.typestr, self.addr, false)
    }

    /// Address of the first byte (what numpy's `__array_interface__["data"][0]` shows).
    #[getter]
    fn address(&self) -> usize {
        self.addr
    }

    /// Size in bytes.
    #[getter]
    fn nbytes(&self) -> usize {
        self.nbytes
    }
}

impl OwnedBuffer {
    /// For DLPack export (`crate::dlpack`, which reads the bytes only for `copy=True`, GIL
    /// held): address, size, shape and ferry dtype (`None` never happens: every buffer is made
    /// with `typestr(dtype)`).
    pub(crate) fn parts(&self) -> (usize, usize, &[u64], Option<DType>) {
        (self.addr, self.nbytes, &self.shape, DType::ALL.into_iter().find(|d| typestr(*d) == self.typestr))
    }
}

/// The numpy dtype ferry returns for `dtype`.
fn numpy_dtype<'py>(py: Python<'py>, dtype: DType, mode: Bf16Mode) -> PyResult<Bound<'py, PyAny>> {
    if dtype == DType::BFloat16
        && mode == Bf16Mode::MlDtypes
        && let Some(bf16) = ml_bfloat16(py)
    {
        return Ok(bf16);
    }
    py.import("numpy")?.getattr("dtype")?.call1((typestr(dtype),))
}

/// A numpy array over `tensor`'s buffer, without a copy.
pub(crate) fn to_numpy<'py>(
    py: Python<'py>,
    tensor: TensorBuf,
    mode: Bf16Mode,
) -> PyResult<(Bound<'py, PyAny>, usize)> {
    let np = numpy(py)?;
    let dtype = tensor.dtype();
    let shape = tensor.shape().to_vec();
    let mut buf = tensor.into_buffer();
    if buf.is_empty() {
        let arr = np.empty.bind(py).call1((PyTuple::new(py, &shape)?, numpy_dtype(py, dtype, mode)?))?;
        return Ok((arr, 0));
    }
    let addr = buf.as_mut_slice().as_mut_ptr() as usize;
    let nbytes = buf.len();
    let owner = Bound::new(py, OwnedBuffer { _buf: buf, addr, nbytes, shape, typestr: typestr(dtype) })?;
    let mut arr = np.asarray.bind(py).call1((owner,))?;
    if dtype == DType::BFloat16 && mode == Bf16Mode::MlDtypes {
        arr = arr.call_method1("view", (numpy_dtype(py, dtype, mode)?,))?;
    }
    Ok((arr, addr))
}

/// A read-only numpy array over memory ferry does not own (`owner` exports a read-only
/// `__array_interface__` and is kept as the array's base): `Store.get(..., borrow=True)`. An
/// empty tensor gets a fresh empty read-only array (no address to show).
pub(crate) fn borrowed_to_numpy<'py>(
    py: Python<'py>,
    owner: Bound<'py, PyAny>,
    dtype: DType,
    shape: &[u64],
    nbytes: usize,
    mode: Bf16Mode,
) -> PyResult<Bound<'py, PyAny>> {
    let np = numpy(py)?;
    if nbytes == 0 {
        let arr = np.empty.bind(py).call1((PyTuple::new(py, shape)?, numpy_dtype(py, dtype, mode)?))?;
        arr.getattr("flags")?.setattr("writeable", false)?;
        return Ok(arr);
    }
    let mut arr = np.asarray.bind(py).call1((owner,))?;
    if dtype == DType::BFloat16 && mode == Bf16Mode::MlDtypes {
        arr = arr.call_method1("view", (numpy_dtype(py, dtype, mode)?,))?;
    }
    Ok(arr)
}

/// Parses a `dtypes={name: "bfloat16"}` override.
pub(crate) fn parse_dtype(py: Python<'_>, name: &str) -> PyResult<DType> {
    DType::parse(name).map_err(|e| crate::errors::to_py(py, &e))
}

/// For error messages: the Python type of an object.
pub(crate) fn describe(obj: &Bound<'_, PyAny>) -> String {
    type_name(obj)
}
