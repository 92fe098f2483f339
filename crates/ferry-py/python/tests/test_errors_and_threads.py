"""The exception tree mirrors ferry_core::Error; waits release the GIL and stop on Ctrl-C."""

from __future__ import annotations

import _thread
import builtins
import re
import threading
import time

import numpy as np
import pytest
from conftest import REPO, sid

import ferry
from ferry import _errors

EXPECTED_BASES = {
    "InvalidArgument": ValueError,
    "UnknownDtype": ValueError,
    "Json": ValueError,
    "Corrupt": ValueError,
    "NotFound": KeyError,
    "StaleRef": KeyError,
    "UseAfterFree": KeyError,
    "ShortRead": KeyError,
    "MissingFeatureKeys": KeyError,
    "OverBudget": MemoryError,
    "AuthFailed": PermissionError,
    "Timeout": builtins.TimeoutError,
    "Io": OSError,
    "PeerLost": ConnectionError,
}


def rust_error_variants() -> list[str]:
    """The variants of `pub enum Error` in crates/ferry-core/src/error.rs."""
    text = (REPO / "crates" / "ferry-core" / "src" / "error.rs").read_text()
    body = text[text.index("pub enum Error {") :]
    body = body[: body.index("\n}\n")]
    return re.findall(r"^    ([A-Z][A-Za-z0-9]*)\s*[({,]", body, flags=re.M)


def test_every_rust_variant_has_its_class():
    variants = rust_error_variants()
    assert len(variants) >= 20, variants
    missing = [v for v in variants if v not in _errors._BY_VARIANT]
    assert not missing, f"add these ferry_core::Error variants to ferry/_errors.py: {missing}"
    for variant, cls in _errors._BY_VARIANT.items():
        assert issubclass(cls, ferry.Error)
        assert getattr(ferry, cls.__name__) is cls, f"ferry.{cls.__name__} is exported"
        if variant in EXPECTED_BASES:
            assert issubclass(cls, EXPECTED_BASES[variant]), variant
        else:
            assert issubclass(cls, RuntimeError), variant


def test_error_classes_are_ferrys_and_pickle():
    import pickle

    err = _errors._from_native("StaleRef", "KeyError", "stale", '{"sample_id": "s", "ref_generation": 1, "current_generation": 2}')
    assert type(err).__module__ == "ferry" and repr(err).startswith("StaleRefError(")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is ferry.StaleRefError and str(back) == "stale" and back.current_generation == 2


def test_use_after_free_is_a_stale_ref():
    assert issubclass(ferry.UseAfterFreeError, ferry.StaleRefError)
    assert issubclass(ferry.StaleRefError, KeyError)
    assert issubclass(ferry.StoreFullError, MemoryError)
    assert issubclass(ferry.AuthError, PermissionError)
    assert issubclass(ferry.TimeoutError, builtins.TimeoutError)


def test_io_errors_take_the_os_class():
    err = _errors._from_native("Io", "FileNotFoundError", "reading /x: gone", '{"context": "reading /x", "kind": "NotFound", "message": "gone"}')
    assert isinstance(err, ferry.IoError) and isinstance(err, FileNotFoundError)
    assert err.kind == "Io" and err.details["kind"] == "NotFound" and err.context == "reading /x"
    remote = _errors._from_native("Remote", "MemoryError", "full (reported by d)", "{}")
    assert isinstance(remote, ferry.StoreFullError)
    unknown = _errors._from_native("SomethingNew", "RuntimeError", "x", "null")
    assert type(unknown) is ferry.RemoteError and isinstance(unknown, RuntimeError)


def test_a_budget_wait_releases_the_gil_and_times_out():
    store = ferry.open_store("mem://", max_resident_bytes=1024)
    store.put(sid(), {"a": np.zeros(1024, dtype=np.uint8)})
    outcome = {}

    def blocked_put():
        started = time.monotonic()
        try:
            store.put(sid(), {"a": np.zeros(512, dtype=np.uint8)}, timeout=0.8)
        except ferry.StoreFullError as e:
            outcome["error"] = e
        outcome["waited"] = time.monotonic() - started

    t = threading.Thread(target=blocked_put)
    t.start()
    spins = 0
    while t.is_alive():  # pure-Python work: only runs if the waiting thread let go of the GIL
        spins += 1
    t.join()
    assert isinstance(outcome["error"], MemoryError)
    assert outcome["waited"] >= 0.7
    assert spins > 1000


def test_a_budget_wait_ends_when_room_appears():
    store = ferry.open_store("mem://", max_resident_bytes=1024)
    first = store.put(sid(), {"a": np.zeros(1024, dtype=np.uint8)})
    threading.Timer(0.3, store.abort, args=(first.sample_id,)).start()
    started = time.monotonic()
    r = store.put(sid(), {"a": np.zeros(512, dtype=np.uint8)}, timeout=10)
    assert time.monotonic() - started < 5
    assert r.estimated_bytes == 512


@pytest.mark.usefixtures("ctrl_c")
def test_ctrl_c_interrupts_a_budget_wait():
    store = ferry.open_store("mem://", max_resident_bytes=1024)
    store.put(sid(), {"a": np.zeros(1024, dtype=np.uint8)})
    timer = threading.Timer(0.3, _thread.interrupt_main)  # what Ctrl-C does to the main thread
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        store.put(sid(), {"a": np.zeros(512, dtype=np.uint8)}, timeout=30)
    assert time.monotonic() - started < 5
    timer.join()
    assert store.health()["resident_bytes"] == 1024, "the interrupted put left nothing behind"
