"""`ferry.open_store_with_backend` over the REAL Mooncake client
(`mooncake.store.MooncakeDistributedStore`, from the `mooncake-transfer-engine-non-cuda` wheel)
and a real `mooncake_master` on loopback (the `mooncake_master` / `mooncake_client` fixtures in
conftest.py: free 127.0.0.1 ports, TCP transport, a 1 s read lease). `test_backend.py`
checks the same lifecycle against a dict-backed fake; this file checks that the real client
plugs in unchanged and that ferry reads its real return codes right, and that ferry and
SpecForge's own `MooncakeFeatureStore` share one master's objects.

Mooncake facts these tests rely on (observed with 0.3.13.post1): `put_from`/`batch_put_from`
return 0, `get_into` the bytes read, `is_exist` 1/0, `get_size` the size or -704; a missing
object is -704 (OBJECT_NOT_FOUND); every `get_into` and `is_exist` grants a read lease
(`--default_kv_lease_ttl`) during which a non-forced `remove` is refused with -706
(OBJECT_HAS_LEASE) and `remove(key, force=True)` succeeds; an empty object cannot be stored
(`put_from` of 0 bytes stores nothing, `batch_put_from` refuses it with -600).
Every test skips, with the reason, when Mooncake or its master is unavailable.
"""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
from mooncake_local import setup_kwargs as mooncake_setup_kwargs

import ferry

OBJECT_NOT_FOUND = -704
OBJECT_HAS_LEASE = -706
WAIT_S = 10.0  # deadline of every poll below (the read lease is 1 s)


class Spy:
    """The real client, unchanged, with every call recorded as `(method, args, kwargs,
    result)`: lets a test see the addresses and return codes ferry exchanges with Mooncake."""

    def __init__(self, client) -> None:
        self._client = client
        self.calls: list[tuple] = []

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            out = attr(*args, **kwargs)
            self.calls.append((name, args, kwargs, out))
            return out

        return call

    def named(self, *names: str) -> list[tuple]:
        return [c for c in self.calls if c[0] in names]


def new_store_id() -> str:
    return f"mc{uuid.uuid4().hex[:10]}"


def key(store: ferry.Store, ref: ferry.SampleRef, name: str) -> str:
    """Spec §6.2's object key, built independently of ferry."""
    return f"{store.store_id}/{ref.sample_id}/g{ref.generation}/{name}"


def address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def wait_until(predicate, what: str, deadline_s: float = WAIT_S, every_s: float = 0.05):
    """Polls `predicate()` until it returns a true value; fails after `deadline_s`."""
    end = time.monotonic() + deadline_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"timed out after {deadline_s:g} s waiting for {what}")
        time.sleep(every_s)


def drain_now(store: ferry.Store) -> dict:
    return store.drain(max_attempts=1, retry_interval_s=0)


def sample(n: int = 4) -> dict[str, np.ndarray]:
    return {
        "hidden_state": np.arange(n * 8, dtype=np.float32).reshape(n, 8),
        "input_ids": np.arange(n, dtype=np.int64),
        "loss_mask": np.ones(n, dtype=np.bool_),
    }


def every_dtype() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    out: dict[str, np.ndarray] = {}
    for dtype in ferry.DTYPES:
        if dtype == "bfloat16":
            continue  # numpy has none: stored below as uint16 bits with dtypes=
        if dtype == "bool":
            out[dtype] = rng.integers(0, 2, size=(3, 5)).astype(np.bool_)
        elif dtype.startswith("float"):
            out[dtype] = rng.standard_normal((3, 5)).astype(dtype)
        else:
            info = np.iinfo(dtype)
            out[dtype] = rng.integers(info.min, info.max, size=(3, 5), dtype=dtype, endpoint=True)
    return out


@pytest.fixture
def client(mooncake_client):
    return mooncake_client


@pytest.fixture(scope="module")
def second_client(mooncake_master):
    """Another real client of the same master (another node's view: reads cross the transfer
    engine's TCP transport instead of the client's own segment)."""
    from mooncake.store import MooncakeDistributedStore

    c = MooncakeDistributedStore()
    rc = c.setup(**mooncake_setup_kwargs(mooncake_master))
    if rc != 0:
        pytest.skip(f"a second MooncakeDistributedStore.setup returned {rc}")
    yield c
    c.close()


# ------------------------------------------------------------------------------ round trips


def test_every_dtype_round_trips_through_the_real_client(client):
    store = ferry.open_store_with_backend(client, store_id=new_store_id(), retain_on_release=True)
    tensors = every_dtype()
    bf16_bits = np.random.default_rng(3).integers(0, 1 << 16, size=(2, 7), dtype=np.uint16)
    tensors["bfloat16"] = bf16_bits
    tensors["scalar"] = np.array(2.5, dtype=np.float32)
    tensors["empty"] = np.zeros((0, 4), dtype=np.float32)
    r = store.put("s0", tensors, {"run_id": "real"}, dtypes={"bfloat16": "bfloat16"})
    assert set(ferry.DTYPES) <= set(r.feature_specs) and r.feature_specs["bfloat16"].dtype == "bfloat16"

    with store.get(r) as lease:
        for name, a in tensors.items():
            got = lease[name]
            assert got.shape == a.shape, name
            if name == "bfloat16":
                assert got.view(np.uint16).tobytes() == bf16_bits.tobytes()
            else:
                assert got.dtype == a.dtype and np.array_equal(got, a), name

    out = {name: np.empty_like(a) for name, a in tensors.items()}
    with store.get_into(r, out):
        for name, a in tensors.items():
            assert out[name].tobytes() == a.tobytes(), name

    # The objects are the raw bytes, nothing else (no header, no archive): read them back with
    # the client directly.
    for name, a in tensors.items():
        if a.nbytes == 0:
            continue
        assert client.get_size(key(store, r, name)) == a.nbytes, name
        raw = np.empty(a.nbytes, dtype=np.uint8)
        assert client.get_into(key(store, r, name), raw.ctypes.data, raw.nbytes) == a.nbytes
        assert raw.tobytes() == a.tobytes(), name
    store.abort(r.sample_id)
    drain_now(store)


def test_an_empty_feature_has_no_object_and_reads_back_empty(client):
    """Mooncake cannot hold an empty object (`batch_put_from` refuses 0 bytes with -600): ferry
    writes none for an empty tensor and serves it from its spec."""
    store = ferry.open_store_with_backend(client, store_id=new_store_id())
    r = store.put("s0", {"empty": np.zeros((0, 3), np.int64), "x": np.arange(5, dtype=np.int32)})
    assert client.is_exist(key(store, r, "empty")) == 0
    assert client.is_exist(key(store, r, "x")) == 1
    with store.get(r) as lease:
        assert lease["empty"].shape == (0, 3) and lease["empty"].dtype == np.int64
        assert lease["x"].tolist() == [0, 1, 2, 3, 4]
    drain_now(store)
    assert client.is_exist(key(store, r, "x")) == 0


def test_bfloat16_torch_tensors_round_trip(client):
    torch = pytest.importorskip("torch")
    store = ferry.open_store_with_backend(client, store_id=new_store_id(), retain_on_release=True)
    t = torch.randn(5, 6).to(torch.bfloat16)
    r = store.put("s0", {"h": t})
    assert r.feature_specs["h"].dtype == "bfloat16"
    with store.get(r) as lease:
        assert lease["h"].view(np.uint16).tobytes() == t.view(torch.int16).numpy().tobytes()
        assert torch.equal(ferry.to_torch(lease["h"], "bfloat16"), t)
    out = torch.empty_like(t)
    with store.get_into(r, {"h": out}):
        assert torch.equal(out, t)
    store.abort(r.sample_id)
    drain_now(store)


def test_key_layout_of_spec_6_2_is_what_the_real_store_holds(client):
    store = ferry.open_store_with_backend(client, store_id=new_store_id(), retain_on_release=True)
    tensors = sample()
    r = store.put("s0", tensors, {"run_id": "run0"})
    assert r.feature_store_uri == f"mooncake://{store.store_id}/s0" and r.generation == 1
    assert r.feature_keys == {name: f"s0/{name}" for name in tensors}
    assert r.to_dict()["metadata"]["generation"] == 1
    for name, a in tensors.items():
        k = f"{store.store_id}/s0/g1/{name}"
        assert client.is_exist(k) == 1, k
        assert client.get_size(k) == a.nbytes, k
    assert client.is_exist(f"{store.store_id}/s0") == 0, "no aggregate object per sample"
    assert client.get_size(f"{store.store_id}/s0/g2/input_ids") == OBJECT_NOT_FOUND
    store.abort("s0")
    drain_now(store)


def test_a_second_client_reads_what_the_first_wrote(client, second_client):
    """Producer and consumer on different clients of one master (each its own segment), one
    store id: the consumer's read crosses the transfer engine, and its consume-once release
    frees the producer's objects."""
    sid_ = new_store_id()
    producer = ferry.open_store_with_backend(client, store_id=sid_)
    consumer = ferry.open_store_with_backend(second_client, store_id=sid_)
    big = np.random.default_rng(5).standard_normal((256, 1024)).astype(np.float32)  # 1 MiB
    r = producer.put("s0", {"h": big, "ids": np.arange(256, dtype=np.int64)})
    with consumer.get(ferry.SampleRef.from_json(r.to_json())) as lease:
        assert np.array_equal(lease["h"], big) and lease["ids"][-1] == 255
    drain_now(consumer)
    assert client.is_exist(key(producer, r, "h")) == 0
    with pytest.raises(ferry.NotAvailableError):
        producer.get(r)


# ------------------------------------------------------------------------------ lifecycle


def test_consume_once_release_deletes_the_objects(client):
    """The release right after a get is refused by Mooncake's read lease (-706, parked as
    pending, the read already refused by ferry); gc completes it once the lease ends, with a
    plain (non-forced) remove."""
    spy = Spy(client)
    store = ferry.open_store_with_backend(spy, store_id=new_store_id(), max_release_attempts=1000)
    r = store.put("s0", sample())
    keys = [key(store, r, name) for name in r.feature_specs]
    with store.get(r) as lease:
        assert lease["input_ids"].tolist() == [0, 1, 2, 3]
    removes = spy.named("remove")
    assert [c[1][0] for c in removes] == keys
    assert {c[3] for c in removes} == {OBJECT_HAS_LEASE}, removes
    assert all(c[2].get("force", False) is False for c in removes), "release never forces"
    assert store.health()["release_pending"] == 1
    with pytest.raises(ferry.UseAfterFreeError):
        store.get(r)  # refused at once, although Mooncake still holds the bytes

    spy.calls.clear()
    wait_until(lambda: store.gc()["release_pending"] == 0, "gc to remove the objects after the lease")
    done = [c for c in spy.named("remove") if c[3] == 0]
    assert sorted(c[1][0] for c in done) == sorted(keys)
    assert all(not c[2].get("force", False) for c in spy.named("remove")), "gc below the bound never forces"
    assert [client.is_exist(k) for k in keys] == [0, 0, 0]
    h = store.health()
    assert (h["resident_samples"], h["release_pending"], h["active_leases"]) == (0, 0, 0)


def test_a_removal_refused_under_the_read_lease_is_forced_by_drain(client):
    spy = Spy(client)
    store = ferry.open_store_with_backend(spy, store_id=new_store_id())
    r = store.put("s0", sample())
    keys = [key(store, r, name) for name in r.feature_specs]
    store.get(r).release()
    assert store.health()["release_pending"] == 1
    assert [c[3] for c in spy.named("remove")] == [OBJECT_HAS_LEASE] * 3
    assert client.get_size(keys[0]) == 128, "the bytes are still in Mooncake"

    spy.calls.clear()
    report = drain_now(store)  # well inside the 1 s lease: only a forced remove can succeed
    assert (report["removed"], report["attempts"]) == (1, 1)
    assert [(c[1][0], c[2], c[3]) for c in spy.named("remove")] == [(k, {"force": True}, 0) for k in keys]
    assert [client.is_exist(k) for k in keys] == [0, 0, 0]
    assert store.health()["release_pending"] == 0


def test_gc_forces_the_removal_once_the_attempts_are_spent(client):
    """With Mooncake's production lease (10 s) a release is refused for a while; gc retries
    without force `max_release_attempts` times, then forces."""
    spy = Spy(client)
    store = ferry.open_store_with_backend(spy, store_id=new_store_id(), max_release_attempts=1)
    r = store.put("s0", sample())
    with store.get(r):
        pass
    spy.calls.clear()
    client.is_exist(key(store, r, "input_ids"))  # renews the lease on one object
    assert store.gc()["release_pending"] == 0
    assert {c[2].get("force") for c in spy.named("remove")} == {True}
    assert client.is_exist(key(store, r, "input_ids")) == 0


def test_retain_on_release_keeps_the_objects(client):
    store = ferry.open_store_with_backend(client, store_id=new_store_id(), retain_on_release=True)
    r = store.put("s0", sample())
    for _ in range(3):
        with store.get(r) as lease:
            assert lease["input_ids"].tolist() == [0, 1, 2, 3]
    assert store.health()["release_pending"] == 0 and store.health()["resident_samples"] == 1
    assert all(client.is_exist(key(store, r, n)) == 1 for n in r.feature_specs)
    store.abort("s0")  # abort is not blocked by retain_on_release
    drain_now(store)
    assert all(client.is_exist(key(store, r, n)) == 0 for n in r.feature_specs)


def test_abort_refuses_reads_and_removes_the_objects(client):
    store = ferry.open_store_with_backend(client, store_id=new_store_id())
    r = store.put("s0", sample())
    held = store.get(r)
    store.abort("s0")
    with pytest.raises(ferry.StaleRefError):
        store.get(r)
    assert np.array_equal(held["input_ids"], np.arange(4)), "arrays read before the abort stay valid"
    held.release()
    drain_now(store)  # the abort's own remove may meet the read lease of the get above
    assert all(client.is_exist(key(store, r, n)) == 0 for n in r.feature_specs)
    h = store.health()
    assert (h["resident_samples"], h["release_pending"], h["active_leases"]) == (0, 0, 0)


def test_a_stale_generation_is_refused(client):
    store = ferry.open_store_with_backend(client, store_id=new_store_id())
    old = store.put("s0", sample())
    new = store.put("s0", sample(6))
    assert (old.generation, new.generation) == (1, 2)
    with pytest.raises(ferry.StaleRefError) as e:
        store.get(old)
    assert isinstance(e.value, KeyError)
    # The old generation's objects were removed by the re-put (never read: no lease).
    assert all(client.is_exist(key(store, old, n)) == 0 for n in old.feature_specs)
    with store.get(new) as lease:
        assert lease["input_ids"].tolist() == list(range(6))
    drain_now(store)
    assert all(client.is_exist(key(store, new, n)) == 0 for n in new.feature_specs)


def test_a_sample_freed_in_mooncake_behind_ferrys_back_is_not_found(client):
    store = ferry.open_store_with_backend(client, store_id=new_store_id())
    r = store.put("s0", sample())
    for name in r.feature_specs:
        assert client.remove(key(store, r, name), force=True) == 0
    with pytest.raises(ferry.NotFoundError):
        store.get(r)  # the real -704 from get_into/batch_get_into


# ------------------------------------------------------------------------------ zero copy


def test_put_and_get_hand_the_real_client_the_callers_memory(client):
    """ferry passes the caller's array address to `batch_put_from` (no staging copy), the
    destination's to `batch_get_into`, and registers each buffer only for its call. With the
    real client the addresses are seen through a recording proxy; that the bytes arrive is
    checked on the results."""
    spy = Spy(client)
    store = ferry.open_store_with_backend(spy, store_id=new_store_id(), retain_on_release=True)
    a = np.arange(1 << 16, dtype=np.float32)
    b = np.arange(1 << 10, dtype=np.int64)
    r = store.put("s0", {"a": a, "b": b})
    (put,) = spy.named("batch_put_from", "put_from")
    assert put[0] == "batch_put_from" and put[3] == [0, 0]
    assert (put[1][1], put[1][2]) == ([address(a), address(b)], [a.nbytes, b.nbytes])
    regs = spy.named("register_buffer")
    assert sorted(c[1] for c in regs) == sorted([(address(a), a.nbytes), (address(b), b.nbytes)])
    assert sorted(c[1][0] for c in spy.named("unregister_buffer")) == sorted([address(a), address(b)])

    spy.calls.clear()
    out = {"a": np.zeros_like(a), "b": np.zeros_like(b)}
    with store.get_into(r, out) as lease:
        assert lease["a"] is out["a"] and np.array_equal(out["a"], a) and np.array_equal(out["b"], b)
    (get,) = spy.named("batch_get_into", "get_into")
    assert get[1][1] == [address(out["a"]), address(out["b"])] and get[3] == [a.nbytes, b.nbytes]

    spy.calls.clear()
    with store.get(r) as lease:
        got = {n: lease[n] for n in ("a", "b")}
        (get,) = spy.named("batch_get_into", "get_into")
        assert get[1][1] == [address(got["a"]), address(got["b"])]
        assert np.array_equal(got["a"], a) and np.array_equal(got["b"], b)
    regs = spy.named("register_buffer")
    assert len(regs) == 2 and len(spy.named("unregister_buffer")) == 2, "every registration is undone"
    store.abort("s0")
    drain_now(store)


# ------------------------------------------------------------------------------ SpecForge


@pytest.fixture(scope="module")
def specforge(mooncake_master):
    """SpecForge's real `MooncakeFeatureStore` (one for the module: a Mooncake client takes 2 s
    to close), connecting its OWN real client to the session's master through its
    `_connect_store` path (a real `ReplicateConfig`, hard pins). Its `_bind_transport_device`
    (Ascend NPU binding; a no-op on CPU hosts) imports `specforge.utils`, which needs
    transformers; SpecForge is installed without its dependencies here, so that step is
    stubbed out."""
    pytest.importorskip("torch")
    msm = pytest.importorskip("specforge.runtime.data_plane.mooncake_store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(msm, "_bind_transport_device", lambda: None)
        sf = msm.MooncakeFeatureStore(store_id=new_store_id(), setup_kwargs=mooncake_setup_kwargs(mooncake_master))
    yield sf
    sf._store.close()  # before the master stops (a client outliving it waits on RPC timeouts)


def specforge_refs():
    from specforge.runtime.data_plane.ref_serialization import ref_from_dict, ref_to_dict

    return ref_to_dict, ref_from_dict


def specforge_tensors():
    import torch

    g = torch.Generator().manual_seed(9)
    return {
        "hidden_state": torch.randn(4, 16, generator=g).to(torch.bfloat16),
        "target": torch.randn(4, 8, generator=g),
        "input_ids": torch.arange(4, dtype=torch.int64),
        "loss_mask": torch.tensor([True, False, True, True]),
        "half": torch.randn(3, generator=g).to(torch.float16),
    }


def test_specforge_puts_and_ferry_gets_the_same_bytes(client, specforge):
    import torch

    ref_to_dict, _ = specforge_refs()
    sf, store_id = specforge, specforge.store_id
    tensors = specforge_tensors()
    sref = sf.put(tensors, sample_id="s0", metadata={"run_id": "sf", "num_tokens": 4})
    r = ferry.SampleRef.from_dict(ref_to_dict(sref))
    assert r.generation == 1 and r.feature_store_uri == f"mooncake://{store_id}/s0"

    store = ferry.open_store_with_backend(client, store_id=store_id)
    with store.get(r) as lease:
        for name, t in tensors.items():
            want = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
            assert lease[name].tobytes() == want.numpy().tobytes(), name
            assert list(lease[name].shape) == list(t.shape)
    # ferry's consume-once release frees SpecForge's objects (drained: the read lease holds)
    drain_now(store)
    with pytest.raises(KeyError, match="not available"):
        sf.get(sref)


def test_ferry_puts_and_specforge_gets_equal_tensors(client, specforge):
    import torch

    ref_to_dict, ref_from_dict = specforge_refs()
    sf = specforge
    store = ferry.open_store_with_backend(client, store_id=sf.store_id)
    tensors = specforge_tensors()
    r = store.put("s1", tensors, {"run_id": "ferry", "num_tokens": 4})
    sref = ref_from_dict(r.to_dict())
    out, handle = sf.get(sref)
    for name, t in tensors.items():
        assert out[name].dtype == t.dtype and torch.equal(out[name], t), name
    # SpecForge's refs and ferry's are one format: the round trip through SpecForge's dict.
    assert ferry.SampleRef.from_dict(ref_to_dict(sref)) == r
    # SpecForge's consume-once release meets the read lease of its own get (-706): it parks
    # the removal; ferry, the producer, aborts and drains.
    sf.release(handle)
    assert sf.health()["release_pending"] == 1
    store.abort("s1")
    drain_now(store)
    with pytest.raises(KeyError):
        sf.get(sref)


# ------------------------------------------------------------------------------ loader, threads


def test_the_loader_cuts_samples_with_prefix_reads(client):
    """`FeatureLoader(max_len=...)` reads each feature's first bytes: the real client refuses a
    buffer smaller than the object (-600, where the fake returns -1), and ferry re-reads it
    whole through a scratch buffer sized by `get_size`."""
    spy = Spy(client)
    store = ferry.open_store_with_backend(spy, store_id=new_store_id(), retain_on_release=True)
    refs = []
    for i in range(4):
        n = 8
        tensors = {
            "input_ids": np.arange(n, dtype=np.int64) + i,
            "loss_mask": np.ones(n, dtype=np.int64),
            "aux_hidden_state": np.full((1, n, 6), i, dtype=np.uint16),
            "hidden_state": np.full((1, n, 2), i, dtype=np.uint16),
        }
        dtypes = {"aux_hidden_state": "bfloat16", "hidden_state": "bfloat16"}
        refs.append(store.put(f"s{i}", tensors, {"target_repr": "hidden_state"}, dtypes=dtypes))
    spy.calls.clear()
    loader = ferry.FeatureLoader(store, refs, batch_size=2, max_len=3, shuffle=False)
    batches = list(loader)
    assert [b.sample_ids for b in batches] == [["s0", "s1"], ["s2", "s3"]]
    for b, first in zip(batches, (0, 2)):
        ids = np.asarray(b["input_ids"])
        assert ids.tolist() == [[first, first + 1, first + 2], [first + 1, first + 2, first + 3]]
        assert np.asarray(b["hidden_state"]).shape == (2, 3, 6)
    codes = {code for c in spy.named("batch_get_into") for code in c[3]}
    assert codes == {-600}, "the real client's code for a buffer smaller than the object"
    assert spy.named("get_size") and all(c[3] > 0 for c in spy.named("get_into"))


def test_calls_from_many_threads(client):
    """Threads putting and reading through one store over the real client see their own bytes."""
    from concurrent.futures import ThreadPoolExecutor

    store = ferry.open_store_with_backend(client, store_id=new_store_id())

    def work(i: int) -> bool:
        for j in range(10):
            a = np.full(4096, i * 100 + j, dtype=np.int32)
            r = store.put(f"t{i}:{j}", {"a": a})
            with store.get(r) as lease:
                if not np.array_equal(lease["a"], a):
                    return False
        return True

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(8)))
    drain_now(store)  # the releases meet their gets' read leases
    h = store.health()
    assert (h["resident_samples"], h["release_pending"], h["active_leases"]) == (0, 0, 0)
