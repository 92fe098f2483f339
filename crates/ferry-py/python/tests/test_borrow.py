"""`Store.get(ref, borrow=True)`: read-only numpy views straight into a daemon's shared-memory
arena, zero copies, pinned (through the read lease) as long as any view is alive."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from conftest import daemon_process, sid

import ferry


@pytest.fixture(scope="module")
def own_daemon():
    """A daemon of this module's own, so its `active_leases` counts only this module's leases."""
    with daemon_process(16 << 20, prefix="ferry-borrow-") as info:
        yield info


@pytest.fixture
def shm(own_daemon):
    s = ferry.open_store(own_daemon["unix"], secret=own_daemon["secret"], route="shm")
    yield s
    s.close()


def address(arr: np.ndarray) -> int:
    return arr.__array_interface__["data"][0]


def live() -> int:
    return ferry._ferry._debug_borrow()["live_borrowed_samples"]


def wait_no_leases(store: ferry.Store) -> None:
    for _ in range(100):
        if store.health()["active_leases"] == 0:
            return
        time.sleep(0.01)
    pytest.fail(f"leases still held: {store.health()}")


def test_borrowed_arrays_are_views_of_the_arena(shm):
    base, length = shm._debug_shm_mapping()
    a = np.arange(64, dtype=np.float32).reshape(8, 8)
    b = np.arange(5, dtype=np.int64)
    r = shm.put(sid(), {"a": a, "b": b})
    with shm.get(r, borrow=True) as one, shm.get(r, borrow=True) as two:
        assert one.borrowed and two.borrowed
        for name, want in (("a", a), ("b", b)):
            x, y = one[name], two[name]
            assert np.array_equal(x, want) and x.dtype == want.dtype and x.shape == want.shape
            assert base <= address(x) and address(x) + x.nbytes <= base + length
            assert address(x) == address(y), "two borrows of one sample show the same bytes"
            assert not x.flags.writeable
            with pytest.raises(ValueError):
                x[0] = 1
            assert isinstance(x.base, ferry._ferry._BorrowedBuffer)
        traced = {n: (addr, nbytes) for n, addr, nbytes in ferry._ferry._debug_stats()["last_get"]}
        assert traced["a"] == (address(two["a"]), a.nbytes)
    assert shm.health()["active_leases"] == 2, "x and y (one per lease) still pin both leases"
    del x, y
    gc.collect()
    wait_no_leases(shm)


def test_names_subset_and_dtypes(shm):
    t = {"i8": np.arange(7, dtype=np.int8), "f64": np.linspace(0, 1, 9), "flag": np.array([True, False])}
    r = shm.put(sid(), t)
    with shm.get(r, ["f64", "flag"], borrow=True) as lease:
        assert list(lease) == ["f64", "flag"]
        assert np.array_equal(lease["f64"], t["f64"]) and np.array_equal(lease["flag"], t["flag"])


def test_release_is_deferred_until_the_last_view_dies(shm):
    r = shm.put(sid(), {"a": np.arange(16, dtype=np.int32)})
    before = live()
    lease = shm.get(r, borrow=True)
    view = lease["a"]
    lease.release()
    assert lease.released and len(lease) == 0, "a released borrowed Lease is empty"
    assert live() == before + 1 and shm.health()["active_leases"] == 1, "the view keeps the lease"
    with pytest.raises(ferry.InvalidArgumentError, match="borrowed"):
        shm.release(view.base.handle)
    assert np.array_equal(view, np.arange(16, dtype=np.int32))
    del view
    gc.collect()
    assert live() == before
    wait_no_leases(shm)


def test_lease_without_views_releases_at_once(shm):
    r = shm.put(sid(), {"a": np.ones(4)})
    with shm.get(r, borrow=True) as lease:
        assert lease["a"].sum() == 4.0
    gc.collect()
    wait_no_leases(shm)


def test_abort_never_reuses_bytes_under_a_live_view(shm, own_daemon):
    other = ferry.open_store(own_daemon["unix"], secret=own_daemon["secret"])
    old = np.full(4096, 7, dtype=np.uint8)
    r = shm.put(sid(), {"a": old})
    lease = shm.get(r, borrow=True)
    view = lease["a"]
    lease.release()
    other.abort(r.sample_id)
    with pytest.raises(ferry.StaleRefError):
        other.get(r)
    # Fill the arena with new data until it is full (big pieces, then ones the size of the
    # view's): none of it may land under the view.
    refs = []
    for size, most in ((256 << 10, 200), (4096, 200)):
        new = np.full(size, 9, dtype=np.uint8)
        with pytest.raises((ferry.StoreFullError, ferry.BackendError)):
            for _ in range(most):
                refs.append(other.put(sid(), {"a": new}))
    assert len(refs) > 10
    assert np.array_equal(view, old), "the pinned bytes still read the old sample"
    del view
    gc.collect()
    wait_no_leases(shm)
    # The full arena had no room left for 4096 bytes; the unpinned region has.
    refs.append(other.put(sid(), {"a": np.full(4096, 9, dtype=np.uint8)}))
    for nr in refs:
        other.abort(nr.sample_id)
    other.close()


def test_views_outlive_the_store(own_daemon):
    s = ferry.open_store(own_daemon["unix"], secret=own_daemon["secret"])
    want = np.arange(100, dtype=np.float64)
    r = s.put(sid(), {"a": want})
    view = s.get(r, borrow=True)["a"]  # the Lease is collected at once; the view pins
    s.close()
    assert np.array_equal(view, want), "the view keeps the connection and the mapping"
    del view
    gc.collect()
    probe = ferry.open_store(own_daemon["unix"], secret=own_daemon["secret"])
    wait_no_leases(probe)
    probe.close()


def test_borrow_refused_where_it_cannot_borrow(own_daemon, tmp_path):
    for s in (
        ferry.open_store("mem://borrow-refused"),
        ferry.open_store(f"dir://{tmp_path / 'store'}"),
        ferry.open_store(own_daemon["tcp"], secret=own_daemon["secret"]),
    ):
        r = s.put(sid(), {"a": np.zeros(3)})
        with pytest.raises(ferry.InvalidArgumentError, match="borrow=True"):
            s.get(r, borrow=True)
        with s.get(r) as lease:  # the plain get still works
            assert not lease.borrowed and lease["a"].flags.writeable
        s.close()
    assert ferry.open_store("mem://x")._debug_shm_mapping() is None
