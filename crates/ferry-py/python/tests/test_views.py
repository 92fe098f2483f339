"""Views from Python (`Store.get_views`, `ferry.shard_view`) over every store: a narrow of any
dimension equals numpy's slice of the feature, on daemon clients (the daemon derives it) and
in-process stores (cut after the read) alike; a bad view is an `InvalidArgumentError` that
takes no lease; a view read is a read (consume-once frees the sample)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import sid

import ferry

SHAPE = (8, 6, 4)


def weight() -> np.ndarray:
    return np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) * 1.5 - 7


def test_every_narrow_equals_numpys_slice(store):
    # Each read is of a fresh sample: the stores are consume-once (the daemon's too).
    w = weight()
    ids = np.arange(5, dtype=np.int64)
    for dim in range(3):
        for start, length in [(0, 1), (1, 2), (0, SHAPE[dim]), (SHAPE[dim] - 1, 1)]:
            r = store.put(sid("view"), {"w": w, "ids": ids})
            want = np.take(w, range(start, start + length), axis=dim)
            with store.get_views(r, {"w": (dim, start, length)}) as lease:
                got = lease["w"]
                assert got.dtype == np.float32 and got.shape == want.shape
                np.testing.assert_array_equal(got, want)
            with pytest.raises(KeyError):
                store.get(r)  # a view read is a read: consume-once freed the sample
    # Two features at once, one view each.
    r = store.put(sid("view"), {"w": w, "ids": ids})
    with store.get_views(r, {"w": ferry.shard_view(0, 3, 4, SHAPE[0]), "ids": (0, 1, 3)}) as lease:
        np.testing.assert_array_equal(lease["w"], w[6:8])
        np.testing.assert_array_equal(lease["ids"], ids[1:4])


def test_shard_view_splits_evenly_or_refuses():
    assert ferry.shard_view(1, 2, 4, 4096) == (1, 2048, 1024)
    for args in [(0, 4, 4, 4096), (0, 0, 3, 4096), (0, 0, 0, 8), (-1, 0, 2, 8), (0, -1, 2, 8)]:
        with pytest.raises(ferry.InvalidArgumentError):
            ferry.shard_view(*args)


def test_a_bad_view_is_refused_and_takes_no_lease(open_store):
    store = open_store()  # consume-once: a lease taken by mistake would free the sample
    r = store.put(sid("badview"), {"w": weight()})
    for views, match in [
        ({"w": (3, 0, 1)}, "has 3 dimensions"),
        ({"w": (1, 5, 2)}, "has 6 indices"),
        ({"w": (0, 0, 0)}, "at least one index"),
        ({"w": (0, 0)}, r"\(dim, start, length\)"),
        ({"w": (-1, 0, 1)}, r"\(dim, start, length\)"),
        ({}, "empty"),
    ]:
        with pytest.raises(ferry.InvalidArgumentError, match=match):
            store.get_views(r, views)
    with pytest.raises(KeyError):
        store.get_views(r, {"nope": (0, 0, 1)})
    # Still there: nothing above consumed it. A view read does.
    with store.get_views(r, {"w": (0, 0, 2)}) as lease:
        np.testing.assert_array_equal(lease["w"], weight()[:2])
    with pytest.raises(KeyError):
        store.get(r)


def test_bfloat16_views_keep_the_stores_representation(open_store):
    store = open_store(bfloat16="uint16")
    bits = np.arange(64, dtype=np.uint16).reshape(8, 8)
    r = store.put(sid("bf16view"), {"h": bits}, dtypes={"h": "bfloat16"})
    with store.get_views(r, {"h": (1, 2, 3)}) as lease:
        assert lease["h"].dtype == np.uint16
        np.testing.assert_array_equal(lease["h"], bits[:, 2:5])


def test_views_of_a_lazy_offline_ref_on_every_store(open_store, fixtures_dir):
    # offline_refs without validate carry no specs: the store (or the daemon) describes the file.
    import os

    dump = os.path.abspath(fixtures_dir / "specforge-offline-eagle3")
    lazy = ferry.offline_refs(dump)[0]
    store = open_store()
    whole = store.get(lazy)
    ids = np.array(whole["input_ids"])
    hidden = np.array(whole["hidden_state"])
    whole.release()
    assert not lazy.feature_specs
    dim = len(ids.shape) - 1
    with store.get_views(lazy, {"input_ids": (dim, 1, 2), "hidden_state": (0, 0, 1)}) as lease:
        np.testing.assert_array_equal(lease["input_ids"], np.take(ids, [1, 2], axis=dim))
        np.testing.assert_array_equal(lease["hidden_state"], hidden[:1])
