"""`ferry.open_store_with_backend`: a Python object with Mooncake's raw-buffer client API as the
byte backend under ferry's lifecycle core.

The fakes below model `mooncake.store.MooncakeDistributedStore` as SpecForge's
`MooncakeFeatureStore` uses it (SPECFORGE-RUNTIME.md §6.1): buffers cross as integer addresses
plus sizes, statuses are Mooncake's integers (`put_from`/`remove` 0, `get_into` the bytes read,
`is_exist` 1/0, negative codes on failure, -704 OBJECT_NOT_FOUND, -706 OBJECT_HAS_LEASE), and
a buffer smaller than the object is refused (-1) as the real client refuses it.
"""

from __future__ import annotations

import ctypes
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import sid

import ferry

OBJECT_NOT_FOUND = -704
OBJECT_HAS_LEASE = -706


def address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


class FakeMooncake:
    """A dict-backed stand-in for Mooncake's Python client (the single-key API of older
    builds: `remove(key)` without `force`, no batch calls)."""

    def __init__(self) -> None:
        self.objects: dict[str, np.ndarray] = {}
        self.calls: list[tuple] = []
        self.remove_status = 0  # set to a negative code to make removes fail
        self.lock = threading.Lock()

    def put_from(self, key, buffer_ptr, size, config=None):
        buf = np.empty(size, dtype=np.uint8)
        if size:
            ctypes.memmove(buf.ctypes.data, buffer_ptr, size)
        with self.lock:
            self.calls.append(("put_from", key, buffer_ptr, size, config))
            self.objects[key] = buf
        return 0

    def get_into(self, key, buffer_ptr, size):
        with self.lock:
            self.calls.append(("get_into", key, buffer_ptr, size))
            obj = self.objects.get(key)
        if obj is None:
            return OBJECT_NOT_FOUND
        if size < obj.nbytes:
            return -1  # Mooncake: "User buffer too small"
        if obj.nbytes:
            ctypes.memmove(buffer_ptr, obj.ctypes.data, obj.nbytes)
        return obj.nbytes

    def get_size(self, key):
        obj = self.objects.get(key)
        return OBJECT_NOT_FOUND if obj is None else obj.nbytes

    def remove(self, key):
        with self.lock:
            self.calls.append(("remove", key))
            if self.remove_status:
                return self.remove_status
            return 0 if self.objects.pop(key, None) is not None else OBJECT_NOT_FOUND

    def is_exist(self, key):
        return 1 if key in self.objects else 0

    def keys(self, store_id: str) -> list[str]:
        return sorted(k for k in self.objects if k.startswith(store_id + "/"))


class FakeBatchMooncake(FakeMooncake):
    """A newer build: batch calls, `remove(key, force=False)` (a non-forced remove of a key
    under a read lease is refused with -706), buffer registration."""

    def __init__(self) -> None:
        super().__init__()
        self.leased: set[str] = set()
        self.registered: dict[int, int] = {}

    def batch_put_from(self, keys, buffer_ptrs, sizes, config=None):
        return [self.put_from(k, p, s, config) for k, p, s in zip(keys, buffer_ptrs, sizes, strict=True)]

    def batch_get_into(self, keys, buffer_ptrs, sizes):
        self.calls.append(("batch_get_into", list(keys)))
        return [self.get_into(k, p, s) for k, p, s in zip(keys, buffer_ptrs, sizes, strict=True)]

    def remove(self, key, force=False):
        if key in self.leased and not force:
            self.calls.append(("remove", key))
            return OBJECT_HAS_LEASE
        return super().remove(key)

    def register_buffer(self, buffer_ptr, size):
        self.registered[buffer_ptr] = size
        return 0

    def unregister_buffer(self, buffer_ptr):
        self.registered.pop(buffer_ptr, None)
        return 0


@pytest.fixture(params=[FakeMooncake, FakeBatchMooncake], ids=["single", "batch"])
def fake(request):
    return request.param()


def open_(fake, **options) -> ferry.Store:
    return ferry.open_store_with_backend(fake, **options)


def sample(n: int = 4) -> dict[str, np.ndarray]:
    return {
        "hidden_state": np.arange(n * 8, dtype=np.float32).reshape(n, 8),
        "input_ids": np.arange(n, dtype=np.int64),
        "loss_mask": np.ones(n, dtype=np.bool_),
    }


def test_round_trip_uses_specforges_key_layout(fake):
    store = open_(fake, store_id="run0")
    tensors = sample()
    r = store.put("s0", tensors, {"run_id": "run0"})
    assert r.feature_store_uri == "mooncake://run0/s0" and r.generation == 1
    assert store.uri == "mooncake://run0"
    assert fake.keys("run0") == ["run0/s0/g1/hidden_state", "run0/s0/g1/input_ids", "run0/s0/g1/loss_mask"]
    # One raw object per tensor: 4x8 float32 is exactly 128 bytes, no header, no archive.
    assert fake.objects["run0/s0/g1/hidden_state"].tobytes() == tensors["hidden_state"].tobytes()
    with store.get(r) as lease:
        for name, a in tensors.items():
            assert lease[name].dtype == a.dtype and np.array_equal(lease[name], a)
    assert store.health()["backend"] == "python"


def test_put_and_get_hand_the_client_the_callers_memory(fake):
    """Zero-copy: put_from is given the address of the caller's array itself (no staging
    copy), get_into the address of the caller's destination array, and `get` the address of
    the buffer numpy's array wraps."""
    store = open_(fake, retain_on_release=True)
    a = np.arange(1 << 16, dtype=np.float32)
    r = store.put(sid(), {"a": a})
    puts = [c for c in fake.calls if c[0] == "put_from"]
    assert [(c[2], c[3]) for c in puts] == [(address(a), a.nbytes)]
    fake.calls.clear()

    out = np.zeros_like(a)
    with store.get_into(r, {"a": out}) as lease:
        assert lease["a"] is out and np.array_equal(out, a)
    assert [(c[2], c[3]) for c in fake.calls if c[0] == "get_into"] == [(address(out), out.nbytes)]
    fake.calls.clear()

    with store.get(r) as lease:
        got = lease["a"]
        assert [c[2] for c in fake.calls if c[0] == "get_into"] == [address(got)]
        assert np.array_equal(got, a)
    if isinstance(fake, FakeBatchMooncake):
        assert fake.registered == {}, "every registration is undone"


def test_consume_once_frees_on_release(fake):
    store = open_(fake)
    r = store.put(sid(), sample())
    with store.get(r):
        pass
    assert fake.keys(store.store_id) == []
    with pytest.raises(ferry.UseAfterFreeError):
        store.get(r)
    assert store.health()["resident_samples"] == 0


def test_two_leases_first_release_keeps(fake):
    store = open_(fake)
    r = store.put(sid(), sample())
    a, b = store.get(r), store.get(r)
    a.release()
    assert len(fake.keys(store.store_id)) == 3
    b.release()
    assert fake.keys(store.store_id) == []


def test_retain_on_release_keeps_the_bytes(fake):
    store = open_(fake, retain_on_release=True)
    r = store.put(sid(), sample())
    for _ in range(2):
        with store.get(r) as lease:
            assert lease["input_ids"].tolist() == [0, 1, 2, 3]
    assert len(fake.keys(store.store_id)) == 3
    store.abort(r.sample_id)  # abort is not blocked by retain_on_release
    assert fake.keys(store.store_id) == []


def test_abort_refuses_reads_and_removes_the_objects(fake):
    store = open_(fake)
    r = store.put(sid(), sample())
    held = store.get(r)
    store.abort(r.sample_id)
    with pytest.raises(ferry.StaleRefError):
        store.get(r)
    assert fake.keys(store.store_id) == []
    assert np.array_equal(held["input_ids"], np.arange(4)), "arrays read before the abort stay valid"
    held.release()


def test_reput_makes_the_old_ref_stale_and_removes_its_keys(fake):
    store = open_(fake, store_id="run0")
    old = store.put("s0", sample())
    new = store.put("s0", sample(6))
    assert (old.generation, new.generation) == (1, 2)
    with pytest.raises(ferry.StaleRefError):
        store.get(old)
    keys = fake.keys("run0")
    assert keys and all(k.startswith("run0/s0/g2/") for k in keys)
    with store.get(new) as lease:
        assert lease["input_ids"].shape == (6,)


def test_failing_remove_parks_a_pending_removal_that_drain_retries():
    fake = FakeMooncake()
    store = open_(fake)
    r = store.put(sid(), sample())
    fake.remove_status = -1
    store.get(r).release()
    h = store.health()
    assert h["release_pending"] == 1
    assert len(fake.keys(store.store_id)) == 3, "the bytes are still there"
    with pytest.raises(ferry.UseAfterFreeError):
        store.get(r)  # refused at once, although the client still holds the bytes
    assert store.gc()["release_pending"] == 1
    with pytest.raises(ferry.DrainIncompleteError):
        store.drain(max_attempts=2, retry_interval_s=0)
    fake.remove_status = 0
    report = store.drain(max_attempts=2, retry_interval_s=0)
    assert (report["removed"], report["release_pending"]) == (1, 0)
    assert fake.keys(store.store_id) == []
    assert store.health()["release_pending"] == 0


def test_drain_forces_removals_the_client_refused_under_a_read_lease():
    fake = FakeBatchMooncake()
    store = open_(fake)
    r = store.put(sid(), sample())
    fake.leased.update(fake.keys(store.store_id))
    store.get(r).release()
    assert store.health()["release_pending"] == 1  # non-forced removes were refused (-706)
    report = store.drain(max_attempts=1, retry_interval_s=0)
    assert (report["removed"], report["attempts"]) == (1, 1)
    assert fake.keys(store.store_id) == []


def test_abort_by_another_store_after_adopt(fake):
    """A restarted authority (a fresh store over the same client and store id, which never saw
    the sample) adopts a ref and aborts it: the objects go, and the writer's reads fail."""
    producer = open_(fake, store_id="run0")
    r = producer.put(sid(), sample())
    consumer = open_(fake, store_id="run0")
    with consumer.get(ferry.SampleRef.from_json(r.to_json())) as lease:  # cross-instance read
        assert lease["input_ids"].tolist() == [0, 1, 2, 3]
    # consume-once: the consumer's release deleted the objects, so the producer's get fails
    with pytest.raises(ferry.NotAvailableError):
        producer.get(r)

    r2 = producer.put(sid(), sample())
    authority = open_(fake, store_id="run0")
    authority.adopt(r2)
    authority.abort(r2.sample_id)
    assert fake.keys("run0") == []
    with pytest.raises(ferry.NotFoundError):
        producer.get(r2)


def test_client_exceptions_are_backend_errors_and_puts_are_all_or_nothing():
    class Exploding(FakeMooncake):
        def put_from(self, key, buffer_ptr, size, config=None):
            if key.endswith("/loss_mask"):
                raise RuntimeError("segment full on node 3")
            return super().put_from(key, buffer_ptr, size, config)

    fake = Exploding()
    store = open_(fake)
    with pytest.raises(ferry.BackendError) as e:
        store.put(sid(), sample())
    assert isinstance(e.value, RuntimeError)
    assert "segment full on node 3" in str(e.value) and "RuntimeError" in str(e.value)
    assert fake.keys(store.store_id) == [], "the objects already written were removed"
    assert store.health()["resident_bytes"] == 0


def test_negative_statuses_and_vanished_objects():
    class Failing(FakeMooncake):
        put_status = 0

        def put_from(self, key, buffer_ptr, size, config=None):
            return self.put_status or super().put_from(key, buffer_ptr, size, config)

    fake = Failing()
    store = open_(fake)
    fake.put_status = -600
    with pytest.raises(ferry.BackendError, match="status -600"):
        store.put(sid(), sample())
    fake.put_status = 0
    r = store.put(sid(), sample())
    fake.objects.clear()  # gone behind the store's back (another process freed it)
    with pytest.raises(ferry.NotFoundError):
        store.get(r)
    # a truncated object is a short read, never an uninitialised tail
    r = store.put(sid(), sample())
    key = f"{store.store_id}/{r.sample_id}/g{r.generation}/hidden_state"
    fake.objects[key] = fake.objects[key][:-4].copy()
    with pytest.raises(ferry.ShortReadError):
        store.get(r)


def test_a_client_without_the_raw_buffer_api_is_refused():
    class Old:
        def put(self, key, value): ...
        def get(self, key): ...
        def remove(self, key): ...
        def is_exist(self, key): ...

    with pytest.raises(ferry.BackendError) as e:
        ferry.open_store_with_backend(Old())
    message = str(e.value)
    assert isinstance(e.value, RuntimeError)
    for fragment in ("put_from", "get_into", "Upgrade", "The old serialized put/get transport is not supported"):
        assert fragment in message


def test_options_reach_the_core_and_the_client():
    fake = FakeMooncake()
    config = object()
    store = open_(fake, replicate_config=config, uri_scheme="mc", max_resident_bytes=100)
    r = store.put(sid(), {"a": np.zeros(4, dtype=np.int64)})
    assert r.feature_store_uri.startswith("mc://")
    assert [c[4] for c in fake.calls if c[0] == "put_from"] == [config]
    with pytest.raises(ferry.StoreFullError):
        store.put(sid(), {"a": np.zeros(16, dtype=np.int64)})
    with pytest.raises(ferry.AuthError):
        open_(fake, secret="s3cret", credential="wrong")
    assert open_(fake, secret="s3cret").health()["auth_required"] is True


def test_calls_from_many_threads(fake):
    """The GIL is taken only inside each client call: threads putting and reading through one
    store make progress together and see their own bytes."""
    store = open_(fake)

    def work(i: int) -> bool:
        for j in range(10):
            a = np.full(1024, i * 100 + j, dtype=np.int32)
            r = store.put(f"t{i}:{j}", {"a": a})
            with store.get(r) as lease:
                if not np.array_equal(lease["a"], a):
                    return False
        return True

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(8)))
    assert fake.keys(store.store_id) == []
