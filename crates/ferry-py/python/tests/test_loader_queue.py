"""The feature loader's queue mode from Python: `ferry.SampleRefQueue` fed by a producer thread
while a `FeatureLoader(store, queue=q)` iterates over a consume-once `mem://` store. Every sample
arrives once and in order, batches are acked (or left to the caller with `defer_ack`), a short
tail is failed and freed, `close()` leaves nothing leased, and Ctrl-C ends a wait for refs.
Every wait is bounded: a hung loader fails its test instead of hanging the suite."""

from __future__ import annotations

import _thread
import threading
import time
import uuid

import numpy as np
import pytest

import ferry

TIMEOUT_S = 30.0


# --- helpers --------------------------------------------------------------------------------


def consume_once_store() -> ferry.Store:
    # Online data is read once: the store frees a sample's bytes at its release.
    return ferry.open_store(f"mem://queue{uuid.uuid4().hex[:8]}", retain_on_release=False)


def put_samples(store: ferry.Store, n: int, prefix: str = "q") -> list[ferry.SampleRef]:
    """`n` small EAGLE3 samples, ids `<prefix>:<i:08>`; sample i's input_ids start at i."""
    refs = []
    for i in range(n):
        length = 2 + i % 3
        tensors = {
            "input_ids": np.arange(length, dtype=np.int64) + i,
            "loss_mask": np.ones(length, dtype=np.int64),
            "aux_hidden_state": np.full((1, length, 6), i, dtype=np.uint16),
            "hidden_state": np.full((1, length, 2), i, dtype=np.uint16),
        }
        dtypes = {"aux_hidden_state": "bfloat16", "hidden_state": "bfloat16"}
        refs.append(store.put(f"{prefix}:{i:08}", tensors, {"target_repr": "hidden_state"}, dtypes=dtypes))
    return refs


def bounded(fn, timeout: float = TIMEOUT_S):
    """Runs `fn` on a daemon thread; its result, or a test failure after `timeout`."""
    out: dict[str, object] = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised on the test's thread
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"still running after {timeout} s"
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out.get("value")


def producer(q: ferry.SampleRefQueue, refs: list[ferry.SampleRef], *, close: bool = True) -> threading.Thread:
    """A thread that puts `refs` one at a time, a little apart, then closes `q`."""

    def run():
        for r in refs:
            assert q.put(r) == 1
            time.sleep(0.002)
        if close:
            q.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def ids(refs: list[ferry.SampleRef]) -> list[str]:
    return [r.sample_id for r in refs]


# --- the queue ------------------------------------------------------------------------------


def test_the_queue_leases_fifo_and_skips_repeated_ids():
    store = consume_once_store()
    refs = put_samples(store, 3)
    q = ferry.SampleRefQueue()
    assert q.put(refs) == 3
    assert q.put(refs[0]) == 0, "already pending"
    assert (q.depth, q.in_flight, q.closed) == (3, 0, False)
    assert q.pending_ids() == ids(refs)
    q.close()
    assert q.closed
    with pytest.raises(ferry.InvalidArgumentError, match="after close"):
        q.put(refs)
    assert "depth=3" in repr(q)


# --- arguments ------------------------------------------------------------------------------


def test_refs_and_queue_together_or_neither_is_a_value_error():
    store = consume_once_store()
    refs = put_samples(store, 2)
    q = ferry.SampleRefQueue()
    with pytest.raises(ValueError, match="exactly one of refs"):
        ferry.FeatureLoader(store, refs, queue=q)
    with pytest.raises(ValueError, match="exactly one of refs"):
        ferry.FeatureLoader(store)
    with pytest.raises(TypeError, match="SampleRefQueue"):
        ferry.FeatureLoader(store, queue=refs)


def test_dp_sharding_seek_and_len_are_refused_with_a_queue():
    store = consume_once_store()
    q = ferry.SampleRefQueue()
    with pytest.raises(ferry.InvalidArgumentError, match="DP sharding"):
        ferry.FeatureLoader(store, queue=q, dp=2, rank=0)
    loader = ferry.FeatureLoader(store, queue=q, batch_size=2, prefetch_depth=1, defer_ack=True)
    assert loader.queue is q and (loader.prefetch_depth, loader.defer_ack) == (1, True)
    with pytest.raises(TypeError, match="no len"):
        len(loader)
    with pytest.raises(ferry.InvalidArgumentError, match="consume-once"):
        loader.seek(1)
    assert "queue=SampleRefQueue(" in repr(loader)
    with pytest.raises(ferry.InvalidArgumentError, match="queue loader"):
        ferry.FeatureLoader(store, put_samples(store, 1), defer_ack=True)


# --- streaming ------------------------------------------------------------------------------


@pytest.mark.parametrize("prefetch_depth", [0, 2])
def test_a_producer_thread_streams_every_sample_once_in_order_and_each_batch_is_acked(prefetch_depth):
    store = consume_once_store()
    refs = put_samples(store, 12)
    q = ferry.SampleRefQueue()
    loader = ferry.FeatureLoader(store, queue=q, batch_size=3, prefetch_depth=prefetch_depth)
    feeder = producer(q, refs)

    def consume():
        seen, in_flight = [], []
        for batch in loader:
            assert batch.batch_size == 3
            for row, sid in enumerate(batch.sample_ids):
                assert batch["input_ids"][row, 0] == int(sid.split(":")[1])
            seen += batch.sample_ids
            in_flight.append(q.in_flight)
        return seen, in_flight

    seen, in_flight = bounded(consume)
    feeder.join(TIMEOUT_S)
    assert seen == ids(refs), "every sample once, in order"
    # Only the batch the consumer holds (and, with prefetch, those read ahead) is in flight.
    assert all(n <= 3 * (1 + prefetch_depth) for n in in_flight), in_flight
    assert (q.depth, q.in_flight) == (0, 0), "every batch acked"
    health = store.health()
    assert (health["resident_samples"], health["active_leases"]) == (0, 0), "consume-once: freed at release"


@pytest.mark.parametrize("prefetch_depth", [0, 2])
def test_a_short_tail_with_drop_last_is_failed_and_freed(prefetch_depth):
    store = consume_once_store()
    refs = put_samples(store, 7)
    q = ferry.SampleRefQueue()
    loader = ferry.FeatureLoader(store, queue=q, batch_size=3, prefetch_depth=prefetch_depth)
    feeder = producer(q, refs)
    batches = bounded(lambda: [b.sample_ids for b in loader])
    feeder.join(TIMEOUT_S)
    assert batches == [ids(refs[0:3]), ids(refs[3:6])]
    assert (q.depth, q.in_flight) == (0, 0), "the tail is failed terminally, not left leased"
    with pytest.raises(KeyError):
        store.get(refs[6])
    assert store.health()["resident_samples"] == 0, "the tail's sample is freed from the store"


@pytest.mark.parametrize("prefetch_depth", [0, 2])
def test_without_drop_last_the_short_tail_is_yielded_and_acked(prefetch_depth):
    store = consume_once_store()
    refs = put_samples(store, 7)
    q = ferry.SampleRefQueue()
    q.put(refs)
    q.close()
    loader = ferry.FeatureLoader(store, queue=q, batch_size=3, drop_last=False, prefetch_depth=prefetch_depth)
    batches = bounded(lambda: [b.sample_ids for b in loader])
    assert batches == [ids(refs[0:3]), ids(refs[3:6]), ids(refs[6:7])]
    assert (q.depth, q.in_flight) == (0, 0)


@pytest.mark.parametrize("prefetch_depth", [0, 2])
def test_with_defer_ack_the_caller_acks(prefetch_depth):
    store = consume_once_store()
    refs = put_samples(store, 4)
    q = ferry.SampleRefQueue()
    q.put(refs)
    q.close()
    loader = ferry.FeatureLoader(store, queue=q, batch_size=2, defer_ack=True, prefetch_depth=prefetch_depth)
    batches = bounded(lambda: list(loader))
    assert [b.sample_ids for b in batches] == [ids(refs[0:2]), ids(refs[2:4])]
    assert q.in_flight_ids() == ids(refs), "the loader never acks"
    q.ack(batches[0])
    q.ack([refs[2], refs[3].sample_id])
    assert (q.depth, q.in_flight) == (0, 0)


def test_one_live_pass_at_a_time():
    store = consume_once_store()
    q = ferry.SampleRefQueue()
    q.put(put_samples(store, 2))
    q.close()
    loader = ferry.FeatureLoader(store, queue=q, batch_size=1)
    first = iter(loader)
    with pytest.raises(ferry.ProtocolError, match="already has an active iterator"):
        next(iter(loader))
    assert len(bounded(lambda: list(first))) == 2


# --- close ----------------------------------------------------------------------------------


@pytest.mark.parametrize("prefetch_depth", [0, 2])
def test_close_mid_stream_leaves_nothing_leased(prefetch_depth):
    store = consume_once_store()
    refs = put_samples(store, 8)
    q = ferry.SampleRefQueue()
    q.put(refs)  # left open: the stream is not over
    loader = ferry.FeatureLoader(store, queue=q, batch_size=2, prefetch_depth=prefetch_depth)
    it = iter(loader)
    first = bounded(lambda: next(it))
    assert first.sample_ids == ids(refs[0:2])
    if prefetch_depth:
        deadline = time.monotonic() + TIMEOUT_S
        while it.remaining < prefetch_depth and time.monotonic() < deadline:
            time.sleep(0.01)
    bounded(loader.close)
    bounded(it.close)  # acks the batch the consumer took
    assert q.in_flight == 0, q.in_flight_ids()
    assert store.health()["active_leases"] == 0
    pending = q.pending_ids()
    if prefetch_depth == 0:
        assert pending == ids(refs[2:]), "refs never leased stay pending for another consumer"
    else:
        # Batches read ahead from a consume-once store are failed terminally (their bytes are
        # gone); the rest stay (or go back to) pending.
        assert set(pending) <= set(ids(refs[2 + 2 * prefetch_depth :])) | set(ids(refs[2:])), pending
        assert len(pending) <= len(refs) - 2 - 2 * prefetch_depth, pending
    assert bounded(lambda: list(loader)) == [], "a closed loader yields nothing"


@pytest.mark.parametrize("prefetch_depth", [0, 2])
def test_close_ends_a_pass_waiting_for_refs(prefetch_depth):
    store = consume_once_store()
    q = ferry.SampleRefQueue()
    q.put(put_samples(store, 1))  # less than a batch: the pass waits
    loader = ferry.FeatureLoader(store, queue=q, batch_size=2, prefetch_depth=prefetch_depth)
    it = iter(loader)
    waiter = threading.Thread(target=lambda: list(it), daemon=True)
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive(), "the pass waits for a whole batch while the queue is open"
    bounded(loader.close)
    waiter.join(TIMEOUT_S)
    assert not waiter.is_alive()
    assert (q.depth, q.in_flight) == (1, 0), "nothing leased; the ref is still pending"


# --- Ctrl-C ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("ctrl_c")
@pytest.mark.parametrize("prefetch_depth", [0, 2])
def test_ctrl_c_ends_a_wait_for_refs_and_a_new_pass_goes_on(prefetch_depth):
    store = consume_once_store()
    refs = put_samples(store, 4)
    q = ferry.SampleRefQueue()
    q.put(refs[:1])
    loader = ferry.FeatureLoader(store, queue=q, batch_size=2, prefetch_depth=prefetch_depth)
    it = iter(loader)
    ctrl_c = threading.Timer(0.2, _thread.interrupt_main)
    # Should the interrupt be missed, the stream ends and the test fails instead of hanging.
    safety = threading.Timer(TIMEOUT_S, q.close)
    ctrl_c.start()
    safety.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            next(it)
    finally:
        ctrl_c.cancel()
        safety.cancel()
    assert (q.depth, q.in_flight) == (1, 0), "nothing leased is lost"
    assert bounded(lambda: list(it)) == [], "the interrupted pass has ended"
    q.put(refs[1:])
    q.close()
    assert bounded(lambda: [b.sample_ids for b in loader]) == [ids(refs[0:2]), ids(refs[2:4])]
    assert (q.depth, q.in_flight) == (0, 0)


@pytest.mark.parametrize("prefetch_depth", [0, 2])
def test_closing_the_pass_ends_its_wait_and_the_loader_goes_on(prefetch_depth):
    store = consume_once_store()
    refs = put_samples(store, 2)
    q = ferry.SampleRefQueue()
    loader = ferry.FeatureLoader(store, queue=q, batch_size=2, prefetch_depth=prefetch_depth)
    it = iter(loader)
    waiter = threading.Thread(target=lambda: list(it), daemon=True)
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive(), "an empty open queue: the pass waits"
    bounded(it.close)
    waiter.join(TIMEOUT_S)
    assert not waiter.is_alive()
    q.put(refs)
    q.close()
    assert bounded(lambda: [b.sample_ids for b in loader]) == [ids(refs)]
    assert (q.depth, q.in_flight) == (0, 0)
