"""Stores shared through a node daemon in another process: one client's abort is every
client's, and a daemon started from Python serves other processes."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import sid

import ferry


def test_clients_share_one_lifecycle(daemon):
    producer = ferry.open_store(daemon["unix"], secret=daemon["secret"])
    consumer = ferry.open_store(daemon["tcp"], secret=daemon["secret"])
    assert producer.store_id == consumer.store_id
    a = np.arange(10, dtype=np.float32)
    r = producer.put(sid(), {"a": a})
    held = consumer.get(r)
    producer.abort(r.sample_id)
    with pytest.raises(ferry.StaleRefError):
        consumer.get(r)
    assert np.array_equal(held["a"], a), "arrays read before the abort stay valid"
    held.release()
    producer.close()
    consumer.close()


def test_owning_client_puts_die_with_it(daemon):
    owner = ferry.open_store(daemon["unix"], secret=daemon["secret"], owning=True)
    other = ferry.open_store(daemon["tcp"], secret=daemon["secret"])
    r = owner.put(sid(), {"a": np.zeros(4, dtype=np.int8)})
    owner.close()
    for _ in range(100):  # the daemon aborts the session's puts when the connection ends
        try:
            other.get(r).release()
        except ferry.NotAvailableError:
            break
        time.sleep(0.02)
    else:
        pytest.fail("the owning client's sample outlived its session")
    other.close()


def test_in_process_daemon_routes():
    with ferry.start_daemon(listen="127.0.0.1:0", capacity=8 << 20, secret="x") as d:
        assert d.running and d.tcp_uri.startswith("ferry://127.0.0.1:")
        assert d.unix_uri is None
        with ferry.open_store(d.tcp_uri, secret="x", route="tcp") as s:
            r = s.put(sid(), {"a": np.ones((3, 3), dtype=np.float64)})
            with s.get(r) as lease:
                assert lease["a"].sum() == 9.0
        assert d.health()["store_id"] == d.store_id
    assert not d.running
    d.stop()  # idempotent
