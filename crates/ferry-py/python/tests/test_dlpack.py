"""DLPack export of ferry's buffers (``ferry.to_dlpack``, ``ferry.DLPackTensor``): zero copy by
address, every dtype (bfloat16 read back from the capsule with ctypes, since numpy cannot import
kDLBfloat), the legacy and versioned capsules, lifetimes past the lease, the exporter and the
array, the capsule protocol (consumed once; an unconsumed capsule frees its tensor), and the
refusals. numpy only; the torch test skips without torch."""

from __future__ import annotations

import ctypes
import gc
import weakref

import numpy as np
import pytest
from conftest import sid

import ferry
from ferry._ferry import _debug_dlpack, _debug_stats

ML_DTYPES = ferry.bfloat16_dtype()
RNG = np.random.default_rng(11)

NUMPY_DTYPES = {
    "float32": np.float32,
    "float64": np.float64,
    "float16": np.float16,
    "int64": np.int64,
    "int32": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "bool": np.bool_,
}
# dlpack.h's DLDataType of each ferry dtype: (code, bits); kDLInt 0, kDLUInt 1, kDLFloat 2,
# kDLBfloat 4, kDLBool 6.
DL_TYPES = {
    "float32": (2, 32),
    "float64": (2, 64),
    "float16": (2, 16),
    "bfloat16": (4, 16),
    "int64": (0, 64),
    "int32": (0, 32),
    "int16": (0, 16),
    "int8": (0, 8),
    "uint8": (1, 8),
    "bool": (6, 8),
}
FLAG_READ_ONLY = 1
FLAG_IS_COPIED = 2


# --- a ctypes reader of dlpack.h's structs ---------------------------------------------------


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


class DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [
        ("version", DLPackVersion),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
        ("flags", ctypes.c_uint64),
        ("dl_tensor", DLTensor),
    ]


_get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_get_pointer.restype = ctypes.c_void_p
_get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_get_name = ctypes.pythonapi.PyCapsule_GetName
_get_name.restype = ctypes.c_char_p
_get_name.argtypes = [ctypes.py_object]


def capsule_name(capsule) -> str:
    return _get_name(capsule).decode()


def read_capsule(capsule) -> dict:
    """The DLPack tensor a (not yet consumed) capsule holds, as plain values."""
    name = capsule_name(capsule)
    ptr = _get_pointer(capsule, name.encode())
    assert ptr
    out = {"name": name}
    if name == "dltensor_versioned":
        managed = DLManagedTensorVersioned.from_address(ptr)
        out["version"] = (managed.version.major, managed.version.minor)
        out["flags"] = managed.flags
    else:
        assert name == "dltensor"
        managed = DLManagedTensor.from_address(ptr)
    assert managed.deleter, "a producer's tensor has a deleter"
    t = managed.dl_tensor
    out.update(
        data=t.data or 0,
        device=(t.device.device_type, t.device.device_id),
        dtype=(t.dtype.code, t.dtype.bits, t.dtype.lanes),
        shape=tuple(t.shape[i] for i in range(t.ndim)),
        strides=tuple(t.strides[i] for i in range(t.ndim)) if t.strides else None,
        byte_offset=t.byte_offset,
    )
    return out


class Holder:
    """A DLPack producer over one existing capsule (to hand a capsule to a consumer twice)."""

    def __init__(self, capsule):
        self.capsule = capsule

    def __dlpack__(self, **kwargs):
        return self.capsule

    def __dlpack_device__(self):
        return (1, 0)


# --- helpers ---------------------------------------------------------------------------------


def sample_array(dtype: str, shape) -> np.ndarray:
    if dtype == "bool":
        return RNG.integers(0, 2, size=shape).astype(np.bool_)
    np_dtype = np.dtype(NUMPY_DTYPES[dtype])
    if np_dtype.kind == "f":
        return RNG.standard_normal(size=shape).astype(np_dtype)
    info = np.iinfo(np_dtype)
    return RNG.integers(info.min, info.max, size=shape, endpoint=True, dtype=np_dtype)


def bf16_bits(shape) -> np.ndarray:
    f32 = RNG.standard_normal(size=shape).astype(np.float32)
    return (f32.view(np.uint32) >> 16).astype(np.uint16)


def address(arr: np.ndarray) -> int:
    return arr.__array_interface__["data"][0]


def c_strides(shape) -> tuple:
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= max(dim, 1)
    return tuple(reversed(strides))


def live() -> int:
    gc.collect()
    return _debug_dlpack()["live"]


def get_one(store, name: str, array: np.ndarray, **put_options):
    """Puts one feature, gets it: (lease, array, the address of ferry's buffer)."""
    ref = store.put(sid(), {name: array}, **put_options)
    lease = store.get(ref)
    got = lease[name]
    (got_name, ferry_addr, nbytes), *_ = _debug_stats()["last_get"]
    assert (got_name, nbytes) == (name, array.nbytes)
    assert address(got) == ferry_addr
    return lease, got, ferry_addr


@pytest.fixture
def mem_store():
    store = ferry.open_store("mem://dlpack-" + sid("m").replace(":", "-"))
    yield store
    store.close()


# --- tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", sorted(NUMPY_DTYPES))
def test_every_numpy_dtype_crosses_without_a_copy(store, dtype):
    a = sample_array(dtype, (3, 4, 5))
    lease, got, ferry_addr = get_one(store, "x", a)
    exporter = ferry.to_dlpack(got)
    assert isinstance(exporter, ferry.DLPackTensor)
    assert (exporter.address, exporter.nbytes, exporter.shape, exporter.dtype) == (ferry_addr, a.nbytes, a.shape, dtype)
    assert exporter.__dlpack_device__() == (1, 0)
    out = np.from_dlpack(exporter)  # numpy 2.1+ asks for a versioned capsule
    assert address(out) == ferry_addr, "the consumer's array is ferry's buffer itself"
    assert out.dtype == a.dtype and out.shape == a.shape
    assert np.array_equal(out, a)
    # The legacy capsule, through a consumer too.
    legacy = exporter.__dlpack__()
    assert capsule_name(legacy) == "dltensor"
    info = read_capsule(legacy)
    assert info["data"] == ferry_addr and info["dtype"] == (*DL_TYPES[dtype], 1)
    out2 = np.from_dlpack(Holder(legacy))
    assert address(out2) == ferry_addr and np.array_equal(out2, a)
    # Writes through the consumer's array are writes to the same memory.
    if dtype != "bool":
        out[0, 0, 0] = 1
        assert got[0, 0, 0] == 1
    lease.release()


@pytest.mark.parametrize("versioned", [False, True], ids=["legacy", "versioned"])
@pytest.mark.parametrize("shape", [(2, 3, 5), (7,), ()], ids=["3d", "1d", "scalar"])
def test_the_capsule_holds_dlpacks_structs(mem_store, versioned, shape):
    a = sample_array("int32", shape)
    lease, got, ferry_addr = get_one(mem_store, "x", a)
    exporter = ferry.to_dlpack(got)
    capsule = exporter.__dlpack__(max_version=(1, 2)) if versioned else exporter.__dlpack__(max_version=(0, 8))
    info = read_capsule(capsule)
    assert info["name"] == ("dltensor_versioned" if versioned else "dltensor")
    assert info["data"] == ferry_addr
    assert info["device"] == (1, 0)
    assert info["dtype"] == (0, 32, 1)
    assert info["shape"] == shape
    assert info["strides"] == c_strides(shape)
    assert info["byte_offset"] == 0
    if versioned:
        assert info["version"] == (1, 0)
        assert info["flags"] == 0  # writable, not a copy
    lease.release()


@pytest.mark.parametrize("mode", ["uint16", "ml_dtypes"])
def test_bfloat16_exports_as_kdlbfloat(mode):
    if mode == "ml_dtypes" and ML_DTYPES is None:
        pytest.skip("ml_dtypes is not installed")
    store = ferry.open_store("mem://dlpack-bf16-" + mode, bfloat16=mode)
    bits = bf16_bits((4, 6))
    lease, got, ferry_addr = get_one(store, "h", bits, dtypes={"h": "bfloat16"})
    assert got.dtype.name == ("bfloat16" if mode == "ml_dtypes" else "uint16")
    base = live()
    exporter = ferry.to_dlpack(got)
    assert exporter.dtype == "bfloat16" and exporter.address == ferry_addr
    for capsule in (exporter.__dlpack__(), exporter.__dlpack__(max_version=(1, 0))):
        info = read_capsule(capsule)
        assert info["dtype"] == (4, 16, 1), "kDLBfloat, 16 bits, 1 lane"
        assert info["data"] == ferry_addr and info["shape"] == (4, 6) and info["strides"] == (6, 1)
        raw = ctypes.string_at(info["data"], bits.nbytes)
        assert np.array_equal(np.frombuffer(raw, dtype="<u2").reshape(4, 6), bits)
    del capsule
    assert live() == base, "unconsumed capsules deleted their tensors"
    # numpy has no bfloat16: it refuses the capsule, which still frees its tensor.
    with pytest.raises((BufferError, TypeError, ValueError, RuntimeError)):
        np.from_dlpack(exporter)
    assert live() == base
    lease.release()
    store.close()


def test_memory_outlives_the_lease_the_exporter_and_the_array(mem_store):
    a = sample_array("float64", (64, 8))
    base = live()
    lease, got, ferry_addr = get_one(mem_store, "x", a)
    owner = weakref.ref(got.base)
    assert type(got.base).__name__ == "_OwnedBuffer"
    exporter = ferry.to_dlpack(got)
    out = np.from_dlpack(exporter)
    assert live() == base + 1
    lease.release()
    del lease, got, exporter
    gc.collect()
    assert owner() is not None, "the consumer's tensor holds ferry's buffer"
    assert address(out) == ferry_addr
    assert np.array_equal(out, a)
    out[:] = 0.5  # still ferry's memory, still writable
    assert owner().address == ferry_addr
    del out
    gc.collect()
    assert live() == base, "the consumer's deleter ran"
    assert owner() is None, "and released ferry's buffer"


def test_an_unconsumed_capsule_releases_the_buffer(mem_store):
    base = live()
    lease, got, _ = get_one(mem_store, "x", sample_array("int64", (10,)))
    owner = weakref.ref(got.base)
    exporter = ferry.to_dlpack(got)
    capsules = [exporter.__dlpack__(), exporter.__dlpack__(max_version=(1, 0))]
    exported = _debug_dlpack()["exported"]
    assert live() == base + 2
    lease.release()
    del lease, got, exporter
    gc.collect()
    assert owner() is not None, "each capsule holds the buffer"
    del capsules
    assert live() == base
    assert owner() is None
    assert _debug_dlpack()["exported"] == exported


@pytest.mark.parametrize("max_version", [None, (1, 0)], ids=["legacy", "versioned"])
def test_a_capsule_is_consumed_once(mem_store, max_version):
    a = sample_array("float32", (5, 5))
    lease, got, ferry_addr = get_one(mem_store, "x", a)
    base = live()
    capsule = ferry.to_dlpack(got).__dlpack__(max_version=max_version)
    name = capsule_name(capsule)
    holder = Holder(capsule)
    out = np.from_dlpack(holder)
    assert address(out) == ferry_addr and np.array_equal(out, a)
    assert capsule_name(capsule) == "used_" + name, "the consumer took ownership"
    with pytest.raises((ValueError, RuntimeError, TypeError, BufferError)):
        np.from_dlpack(holder)
    del holder, capsule
    gc.collect()
    assert live() == base + 1, "the used capsule's destructor left the consumer's tensor alone"
    assert np.array_equal(out, a)
    del out
    assert live() == base
    lease.release()


@pytest.mark.parametrize("max_version", [None, (1, 0)], ids=["legacy", "versioned"])
def test_a_consumer_may_delete_on_another_thread_without_the_gil(mem_store, max_version):
    """A consumer like torch: takes the capsule (renames it), then calls the deleter from a
    thread that does not hold the GIL (ctypes releases it around a foreign call)."""
    import threading

    base = live()
    lease, got, ferry_addr = get_one(mem_store, "x", sample_array("float32", (32,)))
    owner = weakref.ref(got.base)
    capsule = ferry.to_dlpack(got).__dlpack__(max_version=max_version)
    name = capsule_name(capsule)
    ptr = _get_pointer(capsule, name.encode())
    struct = DLManagedTensorVersioned if name == "dltensor_versioned" else DLManagedTensor
    deleter = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(struct.from_address(ptr).deleter)
    set_name = ctypes.pythonapi.PyCapsule_SetName
    set_name.argtypes = [ctypes.py_object, ctypes.c_char_p]
    used = ctypes.c_char_p(b"used_" + name.encode())  # kept alive: the capsule keeps the pointer
    assert set_name(capsule, used) == 0
    del capsule
    lease.release()
    del lease, got
    gc.collect()
    assert owner() is not None and live() == base + 1, "the consumer owns the tensor now"
    thread = threading.Thread(target=deleter, args=(ptr,))
    thread.start()
    thread.join()
    assert _debug_dlpack()["live"] == base, "the deleter ran"
    gc.collect()
    assert owner() is None, "ferry's buffer went at the next call into ferry"


def test_copy_true_exports_a_copy(mem_store):
    a = sample_array("int16", (9, 3))
    lease, got, ferry_addr = get_one(mem_store, "x", a)
    exporter = ferry.to_dlpack(got)
    copied = _debug_dlpack()["copied"]
    info = read_capsule(exporter.__dlpack__(max_version=(1, 0), copy=True))
    assert info["flags"] == FLAG_IS_COPIED and info["data"] != ferry_addr
    out = np.from_dlpack(exporter, copy=True)
    assert address(out) != ferry_addr and np.array_equal(out, a)
    out[0, 0] = 7
    assert got[0, 0] == a[0, 0], "the copy is not ferry's buffer"
    assert _debug_dlpack()["copied"] == copied + 2
    assert address(np.from_dlpack(exporter, copy=False)) == ferry_addr
    lease.release()


def test_read_only_arrays_export_read_only(mem_store):
    a = sample_array("uint8", (16,))
    lease, got, ferry_addr = get_one(mem_store, "x", a)
    got.flags.writeable = False
    exporter = ferry.to_dlpack(got)
    assert exporter.readonly
    with pytest.raises(BufferError, match="read-only"):
        exporter.__dlpack__()
    assert read_capsule(exporter.__dlpack__(max_version=(1, 0)))["flags"] == FLAG_READ_ONLY
    out = np.from_dlpack(exporter)
    assert address(out) == ferry_addr and not out.flags.writeable
    lease.release()


def test_stream_and_device_are_the_cpus(mem_store):
    lease, got, _ = get_one(mem_store, "x", sample_array("float32", (4,)))
    exporter = ferry.to_dlpack(got)
    with pytest.raises(BufferError, match="stream"):
        exporter.__dlpack__(stream=1)
    with pytest.raises(BufferError, match="device"):
        exporter.__dlpack__(dl_device=(2, 0))  # kDLCUDA
    for ok in (exporter.__dlpack__(stream=None, dl_device=(1, 0)), exporter.__dlpack__(stream=-1)):
        assert read_capsule(ok)["device"] == (1, 0)
    with pytest.raises(TypeError):
        exporter.__dlpack__(None)  # keyword-only, as the array API has it
    lease.release()


def test_only_whole_ferry_arrays_export(mem_store):
    a = sample_array("float32", (6, 4))
    ref = mem_store.put(sid(), {"x": a, "empty": np.zeros((0, 3), np.float32)})
    lease = mem_store.get(ref)
    got = lease["x"]
    assert ferry.to_dlpack(got.base).address == address(got), "the buffer itself exports too"
    for other in (a, got[1:], got[:, :2], got.view(np.int32), got.T, lease["empty"], [1.0, 2.0]):
        with pytest.raises(ferry.InvalidArgumentError, match="not a whole array over a ferry buffer"):
            ferry.to_dlpack(other)
    lease.release()


def test_to_torch_takes_ferrys_buffer_through_dlpack(mem_store):
    torch = pytest.importorskip("torch")
    a = sample_array("float32", (8, 2))
    bits = bf16_bits((3,))
    ref = mem_store.put(sid(), {"x": a, "h": bits}, dtypes={"h": "bfloat16"})
    lease = mem_store.get(ref)
    addrs = {name: addr for name, addr, _ in _debug_stats()["last_get"]}
    base = live()
    tensors = lease.to_torch()
    assert tensors["x"].data_ptr() == addrs["x"] and tensors["h"].data_ptr() == addrs["h"]
    assert tensors["h"].dtype == torch.bfloat16
    assert live() == base + 2, "both went through DLPack"
    assert np.array_equal(tensors["x"].numpy(), a)
    assert np.array_equal(tensors["h"].view(torch.int16).numpy().view(np.uint16), bits)
    lease.release()
    del lease
    gc.collect()
    assert np.array_equal(tensors["x"].numpy(), a)
    del tensors
    assert live() == base
