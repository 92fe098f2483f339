"""Stores from Python, over every backend: round trips of every dtype, zero-copy put, get and
get_into, leases, and the lifecycle calls."""

from __future__ import annotations

import collections.abc
import gc

import numpy as np
import pytest
from conftest import sid

import ferry
from ferry._ferry import _debug_stats

ML_DTYPES = ferry.bfloat16_dtype()
needs_ml_dtypes = pytest.mark.skipif(ML_DTYPES is None, reason="ml_dtypes is not installed")

RNG = np.random.default_rng(7)

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


def sample_array(dtype: str, shape) -> np.ndarray:
    if dtype == "bool":
        return RNG.integers(0, 2, size=shape).astype(np.bool_)
    np_dtype = np.dtype(NUMPY_DTYPES[dtype])
    if np_dtype.kind == "f":
        return RNG.standard_normal(size=shape).astype(np_dtype)
    info = np.iinfo(np_dtype)
    return RNG.integers(info.min, info.max, size=shape, endpoint=True, dtype=np_dtype)


def bf16_bits(shape) -> np.ndarray:
    """bfloat16 bit patterns of random float32 values (the upper 16 bits)."""
    f32 = RNG.standard_normal(size=shape).astype(np.float32)
    return (f32.view(np.uint32) >> 16).astype(np.uint16)


def address(arr: np.ndarray) -> int:
    return arr.__array_interface__["data"][0]


def test_the_dtype_list_is_ferrys():
    assert sorted(ferry.DTYPES) == sorted([*NUMPY_DTYPES, "bfloat16"])


@pytest.mark.parametrize("shape", [(2, 3, 5), (), (0, 4)], ids=["3d", "scalar", "empty"])
def test_every_dtype_round_trips(store, shape):
    arrays = {name: sample_array(name, shape) for name in NUMPY_DTYPES}
    arrays["bfloat16"] = bf16_bits(shape)
    r = store.put(sid(), arrays, {"run_id": "py"}, dtypes={"bfloat16": "bfloat16"})
    assert {n: s.dtype for n, s in r.feature_specs.items()} == {n: n for n in arrays}
    assert all(s.shape == shape for s in r.feature_specs.values())
    assert r.run_id == "py"
    with store.get(r) as lease:
        assert set(lease) == set(arrays)
        for name, want in arrays.items():
            got = lease[name]
            assert got.shape == shape, name
            if name == "bfloat16":
                assert got.dtype == (ML_DTYPES if store.bfloat16 == "ml_dtypes" else np.uint16)
                assert np.array_equal(got.view(np.uint16), want)
            else:
                assert got.dtype == want.dtype, name
                assert np.array_equal(got, want), name


@pytest.mark.parametrize("mode", ["uint16", "ml_dtypes"])
def test_bfloat16_representations(open_store, mode):
    if mode == "ml_dtypes" and ML_DTYPES is None:
        pytest.skip("ml_dtypes is not installed")
    store = open_store(bfloat16=mode)
    bits = bf16_bits((3, 4))
    if mode == "ml_dtypes":
        values = bits.view(ML_DTYPES)
        r = store.put(sid(), {"h": values})  # an ml_dtypes array needs no dtypes=
        got = store.get(r)["h"]
        assert got.dtype == ML_DTYPES
        assert np.array_equal(got.astype(np.float32), values.astype(np.float32))
    else:
        with pytest.raises(ferry.InvalidArgumentError, match='dtypes=.*"h": "bfloat16"'):
            store.put(sid(), {"h": bits})
        r = store.put(sid(), {"h": bits}, dtypes={"h": "bfloat16"})
        got = store.get(r)["h"]
        assert got.dtype == np.uint16
    assert r.feature_specs["h"].dtype == "bfloat16"
    assert np.array_equal(got.view(np.uint16), bits)
    # Same bits as torch would store: bf16(1.5) is 0x3fc0, little-endian.
    if mode == "uint16":
        one_and_half = np.array([0x3FC0], dtype=np.uint16)
        r = store.put(sid(), {"h": one_and_half}, dtypes={"h": "bfloat16"})
        assert store.get(r)["h"].tobytes() == b"\xc0\x3f"


def test_put_reads_contiguous_arrays_in_place(store):
    a = sample_array("float32", (64, 33))
    b = sample_array("int64", (7,))
    before = _debug_stats()
    store.put(sid(), {"a": a, "b": b})
    after = _debug_stats()
    assert after["put_arrays_borrowed"] - before["put_arrays_borrowed"] == 2
    assert after["put_arrays_copied"] == before["put_arrays_copied"]
    # The memory the store copied from is the arrays' own.
    assert after["last_put"] == [("a", address(a), a.nbytes), ("b", address(b), b.nbytes)]


def test_put_copies_other_layouts_once(store):
    base = sample_array("float32", (6, 8))
    transposed = base.T  # F-order view
    strided = base[::2, 1::3]
    big_endian = sample_array("int32", (5,)).astype(">i4")
    before = _debug_stats()
    r = store.put(sid(), {"t": transposed, "s": strided, "be": big_endian})
    after = _debug_stats()
    assert after["put_arrays_copied"] - before["put_arrays_copied"] == 3
    assert after["put_arrays_borrowed"] == before["put_arrays_borrowed"]
    assert all(addr != address(base) for _, addr, _ in after["last_put"])
    with store.get(r) as got:
        assert np.array_equal(got["t"], transposed)
        assert np.array_equal(got["s"], strided)
        assert np.array_equal(got["be"], big_endian)
        assert got["be"].dtype == np.dtype("<i4")


def test_get_returns_ferry_buffers_without_a_copy(store):
    a = sample_array("float32", (128, 100))
    r = store.put(sid(), {"a": a})
    lease = store.get(r)
    got = lease["a"]
    name, ferry_addr, nbytes = _debug_stats()["last_get"][0]
    assert (name, nbytes) == ("a", a.nbytes)
    # The array's memory is the Rust buffer the store read into: same address, and that
    # buffer is the array's base (it keeps the memory alive).
    assert address(got) == ferry_addr
    assert type(got.base).__name__ == "_OwnedBuffer"
    assert got.base.address == ferry_addr
    assert address(got) % 64 == 0, "ferry's buffers are 64-byte aligned"
    assert got.flags.writeable and got.flags.c_contiguous
    lease.release()
    # Owned memory: still valid, and writable, after the lease ends.
    assert np.array_equal(got, a)
    got[0, 0] = 42.0
    assert got[0, 0] == 42.0


def test_get_into_writes_the_callers_arrays(store):
    a = sample_array("float64", (10, 3))
    bits = bf16_bits((4,))
    r = store.put(sid(), {"a": a, "h": bits}, dtypes={"h": "bfloat16"})
    out_a = np.zeros((10, 3), dtype=np.float64)
    out_h = np.zeros(4, dtype=np.uint16)
    with store.get_into(r, {"a": out_a, "h": out_h}) as lease:
        assert lease["a"] is out_a and lease["h"] is out_h
        assert _debug_stats()["last_get_into"] == [
            ("a", address(out_a), out_a.nbytes),
            ("h", address(out_h), out_h.nbytes),
        ]
        assert np.array_equal(out_a, a)
        assert np.array_equal(out_h, bits)
        assert lease.handle.sample_id == r.sample_id


@needs_ml_dtypes
def test_get_into_ml_dtypes_and_any_shape(store):
    bits = bf16_bits((2, 6))
    r = store.put(sid(), {"h": bits.view(ML_DTYPES)})
    out = np.zeros(12, dtype=ML_DTYPES)  # flat: only the byte size must match
    with store.get_into(r, {"h": out}):
        assert np.array_equal(out.view(np.uint16), bits.reshape(-1))


def test_get_into_refuses_bad_destinations(store):
    r = store.put(sid(), {"a": sample_array("float32", (4, 4)), "b": sample_array("int32", (4,))})
    good_b = np.zeros(4, dtype=np.int32)
    bad = {
        "dtype": np.zeros((4, 4), dtype=np.float64),
        "size": np.zeros((4, 5), dtype=np.float32),
        "layout": np.zeros((4, 8), dtype=np.float32)[:, ::2],
        "readonly": np.frombuffer(bytes(64), dtype=np.float32).reshape(4, 4),
    }
    for why, arr in bad.items():
        with pytest.raises(ferry.InvalidArgumentError) as e:
            store.get_into(r, {"a": arr, "b": good_b})
        assert isinstance(e.value, ValueError), why
    overlapping = np.zeros(16 + 4, dtype=np.float32)
    with pytest.raises(ferry.InvalidArgumentError, match="overlap"):
        store.get_into(r, {"a": overlapping[:16], "b": overlapping[12:16].view(np.int32)})
    with pytest.raises(TypeError):
        store.get_into(r, {"a": [0.0] * 16})
    with pytest.raises(ferry.NotAvailableError):
        store.get_into(r, {"nope": good_b})
    # None of the refused calls took a lease: the sample is still there, unleased.
    with store.get_into(r, {"b": good_b}):
        pass


def test_release_then_use_is_safe(open_store):
    store = open_store()
    assert not store.retains_on_release()
    a = sample_array("int64", (1000,))
    r = store.put(sid(), {"a": a})
    lease = store.get(r)
    arr = lease["a"]
    lease.release()
    lease.release()  # idempotent
    assert lease.released
    # The arrays own their memory: reading and writing them after release is fine.
    assert int(arr.sum()) == int(a.sum())
    arr[:] = 0
    # Consume-once: the last release freed the sample; a new read is refused.
    with pytest.raises(ferry.StaleRefError) as e:
        store.get(r)
    assert isinstance(e.value, KeyError)
    assert isinstance(e.value, ferry.NotAvailableError)
    assert e.value.python_exception == "KeyError"


def test_leases_release_on_exit_and_on_collection(store):
    r1 = store.put(sid(), {"a": sample_array("uint8", (10,))})
    with store.get(r1) as lease:
        assert not lease.released
        assert store.health()["active_leases"] >= 1
    assert lease.released
    r2 = store.put(sid(), {"a": sample_array("uint8", (10,))})
    arr = store.get(r2)["a"]  # the Lease itself is garbage at once
    gc.collect()
    with pytest.raises(ferry.NotAvailableError):
        store.get(r2)
    assert arr.shape == (10,)
    r3 = store.put(sid(), {"a": sample_array("uint8", (10,))})
    lease = store.get(r3)
    store.release(lease.handle)
    store.release(lease)  # the same lease again: nothing to do
    r4 = store.put(sid(), {"a": sample_array("uint8", (10,))})
    store.release(store.get(r4))
    with pytest.raises(TypeError):
        store.release("not a handle")


def test_retain_on_release_keeps_the_bytes(backend, open_store):
    if backend in ("tcp", "unix"):
        pytest.skip("retain_on_release is the daemon's setting (ferry serve --retain-on-release)")
    store = open_store(retain_on_release=True)
    r = store.put(sid(), {"a": sample_array("int32", (3,))})
    for _ in range(3):
        with store.get(r) as lease:
            assert lease["a"].shape == (3,)
    store.abort(r.sample_id)


def test_abort_makes_refs_stale(store):
    r = store.put(sid(), {"a": sample_array("float32", (2,))})
    held = store.get(r)
    store.abort(r.sample_id)
    store.abort(r.sample_id)  # idempotent
    with pytest.raises(ferry.StaleRefError) as e:
        store.get(r)
    assert isinstance(e.value, KeyError)
    assert e.value.details["sample_id"] == r.sample_id
    assert e.value.sample_id == r.sample_id
    assert r.sample_id in str(e.value), "the message is readable (not KeyError's repr)"
    held.release()  # releasing a lease on an aborted sample is harmless


def test_reput_makes_the_old_ref_stale(store):
    s = sid()
    old = store.put(s, {"a": sample_array("float32", (2,))})
    new = store.put(s, {"a": sample_array("float32", (2,))})
    assert new.generation > old.generation
    with pytest.raises(ferry.StaleRefError) as e:
        store.get(old)
    assert isinstance(e.value, KeyError)
    with store.get(new) as lease:
        assert lease["a"].shape == (2,)


def test_bad_inputs_are_value_errors(store):
    cases = {
        "complex": ({"a": np.zeros(3, dtype=np.complex64)}, None),
        "uint16 without dtypes": ({"a": np.zeros(3, dtype=np.uint16)}, None),
        "object": ({"a": np.array([object()])}, None),
        "unknown dtypes name": ({"a": np.zeros(3, dtype=np.int8)}, {"b": "int8"}),
        "size mismatch": ({"a": np.zeros(3, dtype=np.int32)}, {"a": "int16"}),
        "strings": ({"a": np.array(["x"])}, None),
    }
    for why, (tensors, dtypes) in cases.items():
        with pytest.raises(ferry.InvalidArgumentError) as e:
            store.put(sid(), tensors, dtypes=dtypes)
        assert isinstance(e.value, ValueError), why
    with pytest.raises(ferry.UnknownDtypeError):
        store.put(sid(), {"a": np.zeros(3, dtype=np.int8)}, dtypes={"a": "float128"})
    with pytest.raises(ferry.InvalidArgumentError, match="at least one tensor"):
        store.put(sid(), {})
    with pytest.raises(ferry.InvalidArgumentError):
        store.put(sid(), [np.zeros(3)])
    with pytest.raises(TypeError, match="JSON serializable"):
        store.put(sid(), {"a": np.zeros(3)}, {"oops": np.zeros(3)})
    # nested lists go through numpy.asarray (one copy)
    r = store.put(sid(), {"a": [[1, 2], [3, 4]]})
    assert r.feature_specs["a"].dtype == "int64"
    store.abort(r.sample_id)


def test_lifecycle_calls(store):
    r = store.put(sid(), {"a": sample_array("int64", (4,))}, {"num_tokens": 4, "strategy": "dflash"})
    assert r.num_tokens == 4 and r.strategy == "dflash"
    assert store.describe(r)["a"] == r.feature_specs["a"]
    health = store.health()
    assert health["store_id"] == store.store_id
    assert {"resident_samples", "active_leases", "resident_bytes", "release_pending"} <= set(health)
    assert set(store.gc()) == {"force_freed", "force_freed_bytes", "release_pending"}
    assert store.drain(max_attempts=1)["release_pending"] == 0
    assert store.drain(sample_ids=[r.sample_id], max_attempts=1)["release_pending"] == 0
    store.adopt(r)
    with store.get(r, names=["a"]) as lease:
        assert list(lease.keys()) == ["a"]
        assert lease.ref == r
        assert lease.get("missing") is None
        assert len(lease) == 1 and "a" in lease
        assert isinstance(lease, collections.abc.Mapping)
        assert dict(lease.items())["a"].shape == (4,)
    with pytest.raises(ValueError):
        store.drain(max_attempts=0)


def test_abort_all_and_close(backend, open_store):
    if backend in ("tcp", "unix"):
        pytest.skip("the daemon's store is shared by every test")
    store = open_store()
    for _ in range(3):
        store.put(sid(), {"a": sample_array("int8", (2,))})
    assert store.abort_all() == 3
    assert store.health()["resident_samples"] == 0
    r = store.put(sid(), {"a": sample_array("int8", (2,))})
    lease = store.get(r)
    store.close()
    with pytest.raises(ferry.InvalidArgumentError, match="closed"):
        store.health()
    lease.release()  # leases outlive their store object


def test_full_store_is_a_memory_error():
    store = ferry.open_store("mem://", max_resident_bytes=1024)
    store.put(sid(), {"a": np.zeros(512, dtype=np.uint8)})
    with pytest.raises(ferry.StoreFullError) as e:
        store.put(sid(), {"a": np.zeros(1024, dtype=np.uint8)})
    assert isinstance(e.value, MemoryError)
    assert e.value.budget == 1024
    assert "max_resident_bytes=1024" in str(e.value)
    assert store.health()["resident_bytes"] == 512


def test_full_daemon_is_a_memory_error():
    with ferry.start_daemon(capacity=1 << 20) as daemon:
        store = ferry.open_store(daemon.tcp_uri)
        with pytest.raises(ferry.StoreFullError) as e:
            store.put(sid(), {"a": np.zeros(2 << 20, dtype=np.uint8)})
        assert isinstance(e.value, MemoryError)
        store.close()


def test_wrong_secret_is_a_permission_error(daemon):
    for uri in (daemon["tcp"], daemon["unix"]):
        for secret in ("wrong", None):
            with pytest.raises(ferry.AuthError) as e:
                ferry.open_store(uri, secret=secret)
            assert isinstance(e.value, PermissionError)
    with pytest.raises(ferry.AuthError):
        ferry.open_store("mem://", secret="a", credential="b")
    assert ferry.open_store("mem://", secret="a").health()["auth_required"] is True


def test_unreachable_daemon_is_an_os_error(tmp_path):
    with pytest.raises(ferry.IoError) as e:
        ferry.open_store(f"ferry+unix://{tmp_path / 'nobody.sock'}")
    assert isinstance(e.value, OSError)
    assert isinstance(e.value, FileNotFoundError)
    with pytest.raises(ferry.InvalidArgumentError):
        ferry.open_store("s3://bucket")
    with pytest.raises(ferry.InvalidArgumentError, match="ferry serve"):
        ferry.open_store("ferry://127.0.0.1:1", max_resident_bytes=10)
