#!/usr/bin/env python3
"""Python get throughput of one sample against numpy's own memcpy of the same size, in one run.

    python crates/ferry-py/benches/bench_get.py                 # 64 MiB, 15 iterations, a table
    python crates/ferry-py/benches/bench_get.py --json          # the same as one JSON object
    python crates/ferry-py/benches/bench_get.py --size-mib 1 --iters 2   # the smoke test's size

Every row times one call on warm buffers and reports the median of `--iters` runs (after one
warm-up call), as GB/s and as a ratio to the memcpy baseline (`np.copyto(dst, src)` on warm
64-byte-aligned arrays of the same size), timed alternately with the row's call in the same
loop so both see the same machine load: ratio 1.0 means the call moves the bytes as fast as
numpy copies them.

Rows: `store.get` (ferry reads into its own pooled buffer, numpy wraps it) and `store.get_into`
(ferry reads into the caller's warm array) on `mem://` and on a node daemon in a child process
over its Unix socket (shared-memory route), and on `open_store_with_backend` over a dict-backed
client with Mooncake's raw-buffer API (`ctypes.memmove`) and over the real Mooncake client
(`mooncake.store.MooncakeDistributedStore`, TCP transport) against a `mooncake_master` this
script starts on loopback, when the `mooncake-transfer-engine-non-cuda` wheel is importable,
else a "skipped" line; then SpecForge's
`SharedDirFeatureStore` (put + get + release, and get alone) against ferry's `dir://` store in
the same temporary directory, when SpecForge (`pip install --no-deps specforge`) and torch are
importable, else a "skipped" line. Build the module optimized first
(`FERRY_PY_RELEASE=1 ./scripts/test-python`): a debug build measures the debug build.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

import ferry

# The tests' helper that starts a Mooncake master on loopback (one copy of that logic).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python", "tests"))
import mooncake_local  # noqa: E402

MIB = 1 << 20
OBJECT_NOT_FOUND = -704

DAEMON_MAIN = r"""
import json, sys
import ferry
d = ferry.start_daemon(listen=None, socket=sys.argv[1], capacity=int(sys.argv[2]), secret=sys.argv[3],
                       retain_on_release=True)
print(json.dumps({"unix": d.unix_uri}), flush=True)
sys.stdin.read()
d.stop()
"""

# Where SpecForge's SharedDirFeatureStore (disaggregated.py) may live, newest layout first.
SPECFORGE_MODULES = (
    "specforge.runtime.disaggregated",
    "specforge.runtime.data_plane.disaggregated",
    "specforge.data_plane.disaggregated",
    "specforge.disaggregated",
)


class DictMooncake:
    """A minimal client with Mooncake's raw-buffer API, bytes in numpy arrays in a dict."""

    def __init__(self) -> None:
        self.objects: dict[str, np.ndarray] = {}

    def put_from(self, key, buffer_ptr, size, config=None):
        buf = self.objects.get(key)
        if buf is None or buf.nbytes != size:
            buf = np.empty(size, dtype=np.uint8)
            buf.fill(0)
        ctypes.memmove(buf.ctypes.data, buffer_ptr, size)
        self.objects[key] = buf
        return 0

    def get_into(self, key, buffer_ptr, size):
        obj = self.objects.get(key)
        if obj is None:
            return OBJECT_NOT_FOUND
        if size < obj.nbytes:
            return -1
        ctypes.memmove(buffer_ptr, obj.ctypes.data, obj.nbytes)
        return obj.nbytes

    def remove(self, key):
        return 0 if self.objects.pop(key, None) is not None else OBJECT_NOT_FOUND

    def is_exist(self, key):
        return 1 if key in self.objects else 0


def aligned_empty(nbytes: int) -> np.ndarray:
    """A 64-byte-aligned, pre-faulted uint8 array (numpy's memcpy baseline buffers)."""
    raw = np.empty(nbytes + 64, dtype=np.uint8)
    off = (-raw.ctypes.data) % 64
    a = raw[off : off + nbytes]
    a.fill(0)
    return a


def median_s(fn: Callable[[], Any], iters: int, after: Callable[[Any], None] | None = None) -> float:
    """The median wall time of `fn()` over `iters` runs after one warm-up; `after(result)` runs
    untimed after each call (releasing a lease, dropping arrays)."""
    return paired(fn, iters, after)[0]


def paired(
    fn: Callable[[], Any],
    iters: int,
    after: Callable[[Any], None] | None = None,
    baseline: Callable[[], Any] | None = None,
) -> tuple[float, float]:
    """`(median of fn, median of baseline)`, the two timed alternately in the same loop, so a
    ratio compares runs under the same machine load (this VM's speed drifts by 15%)."""
    out = fn()
    if after:
        after(out)
    del out
    times, base = [], []
    for _ in range(iters):
        if baseline is not None:
            t0 = time.perf_counter()
            baseline()
            base.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        if after:
            after(out)
        del out
    return statistics.median(times), (statistics.median(base) if base else float("nan"))


def release(lease) -> None:
    lease.release()


def bench_store(
    store: ferry.Store, src: np.ndarray, iters: int, label: str, memcpy: Callable[[], Any]
) -> dict[str, tuple[float, float]]:
    ref = store.put(f"bench:{label}", {"x": src})
    out = aligned_empty(src.nbytes)

    def get():
        lease = store.get(ref)
        lease["x"]  # the array numpy wraps
        return lease

    def check_and_release(lease):
        lease.release()

    first = store.get(ref)
    assert np.array_equal(first["x"][:1024], src[:1024]) and first["x"].nbytes == src.nbytes, label
    first.release()
    del first
    get_s = paired(get, iters, check_and_release, memcpy)
    into_s = paired(lambda: store.get_into(ref, {"x": out}), iters, release, memcpy)
    assert np.array_equal(out[-1024:], src[-1024:]), label
    store.abort(ref.sample_id)
    return {"get_s": get_s, "get_into_s": into_s}


def bench_mooncake_raw(client, src: np.ndarray, iters: int, memcpy: Callable[[], Any]) -> tuple[float, float]:
    """The real Mooncake client's own `get_into` of the same bytes (one object, a buffer
    registered once): the transport's ceiling, which ferry's rows over that client sit under."""
    key = "ferry-bench-raw"
    dst = aligned_empty(src.nbytes)
    for buf in (src, dst):
        rc = client.register_buffer(buf.ctypes.data, buf.nbytes)
        assert rc == 0, f"register_buffer returned {rc}"
    try:
        rc = client.put_from(key, src.ctypes.data, src.nbytes)
        assert rc == 0, f"put_from returned {rc}"

        def get() -> None:
            n = client.get_into(key, dst.ctypes.data, dst.nbytes)
            assert n == dst.nbytes, f"get_into returned {n}"

        timed = paired(get, iters, None, memcpy)
        assert np.array_equal(dst[-1024:], src[-1024:])
        return timed
    finally:
        client.remove(key)
        for buf in (src, dst):
            client.unregister_buffer(buf.ctypes.data)


def start_daemon(capacity: int, secret: str):
    tmp = tempfile.mkdtemp(prefix="ferry-bench-")
    sock = os.path.join(tmp, "d.sock")
    proc = subprocess.Popen(
        [sys.executable, "-c", DAEMON_MAIN, sock, str(capacity), secret],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"the daemon process exited with {proc.wait()}")
    return proc, tmp, json.loads(line)["unix"]


def stop_daemon(proc, tmp) -> None:
    try:
        proc.stdin.close()
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    shutil.rmtree(tmp, ignore_errors=True)


def start_mooncake(segment_bytes: int):
    """A `mooncake_master` on free loopback ports and a real client of it (TCP transport), as
    `(proc, client, tmp)`, or a string saying why not (not installed, `libibverbs.so.1`
    missing, the master did not start). The tests' helper (`python/tests/mooncake_local.py`)
    starts it: free ports, readiness polled with a 20 s deadline."""
    tmp = tempfile.mkdtemp(prefix="ferry-bench-mooncake-")
    proc, info = mooncake_local.start_master(os.path.join(tmp, "master.log"))
    if proc is None:
        shutil.rmtree(tmp, ignore_errors=True)
        return info
    client, why = mooncake_local.connect_client(info, segment_bytes)
    if client is not None:
        return proc, client, tmp
    mooncake_local.stop_process(proc)
    shutil.rmtree(tmp, ignore_errors=True)
    return why


def stop_mooncake(proc, client, tmp) -> None:
    client.close()  # first: a client outliving its master waits on RPC timeouts
    mooncake_local.stop_process(proc)
    shutil.rmtree(tmp, ignore_errors=True)


def find_specforge_store():
    """SpecForge's SharedDirFeatureStore class and torch, or (None, why)."""
    try:
        import torch  # noqa: F401

        importlib.import_module("specforge")
    except Exception as e:  # ImportError, or a broken install
        return None, f"SpecForge/torch not importable ({type(e).__name__}: {e})"
    for name in SPECFORGE_MODULES:
        try:
            cls = getattr(importlib.import_module(name), "SharedDirFeatureStore", None)
        except ImportError:
            continue
        if cls is not None:
            return cls, name
    return None, "SpecForge is importable but SharedDirFeatureStore was not found in " + ", ".join(SPECFORGE_MODULES)


def bench_specforge(cls, src: np.ndarray, iters: int, memcpy: Callable[[], Any]) -> dict[str, Any]:
    """SpecForge's SharedDirFeatureStore against ferry's `dir://` store on the same file system
    (both under one temporary directory): the round trip (put, get, release: what a producer and
    a trainer pay per sample), then get alone (the trainer's side). Each is timed alternately
    with numpy's memcpy of the same bytes."""
    import torch

    t = torch.from_numpy(src)
    root = tempfile.mkdtemp(prefix="ferry-bench-specforge-")
    try:
        sf = cls(root=os.path.join(root, "specforge"), store_id="bench")
        sf_keep = cls(root=os.path.join(root, "specforge"), store_id="bench-keep", retain_on_release=True)
        meta = {"run_id": "bench"}

        def sf_round_trip():
            ref = sf.put({"x": t}, sample_id="bench-sf", metadata=meta)
            tensors, handle = sf.get(ref)
            sf.release(handle)
            return tensors

        kept = sf_keep.put({"x": t}, sample_id="bench-sf", metadata=meta)
        first, handle = sf_keep.get(kept)
        assert torch.equal(first["x"], t)
        sf_keep.release(handle)

        def sf_get():
            tensors, handle = sf_keep.get(kept)
            sf_keep.release(handle)
            return tensors

        out: dict[str, Any] = {
            "specforge_round_trip": paired(sf_round_trip, iters, None, memcpy),
            "specforge_get": paired(sf_get, iters, None, memcpy),
        }
        uri = "dir://" + os.path.join(root, "ferry")
        with ferry.open_store(uri + "/bench") as store, ferry.open_store(
            uri + "/bench-keep", retain_on_release=True
        ) as keep:

            def ferry_round_trip():
                ref = store.put("bench-ferry", {"x": src})
                lease = store.get(ref)
                lease["x"]
                lease.release()

            kref = keep.put("bench-ferry", {"x": src})
            with keep.get(kref) as lease:
                assert np.array_equal(lease["x"], src)

            def ferry_get():
                lease = keep.get(kref)
                lease["x"]
                return lease

            out["ferry_dir_round_trip"] = paired(ferry_round_trip, iters, None, memcpy)
            out["ferry_dir_get"] = paired(ferry_get, iters, release, memcpy)
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(size: int, iters: int, daemon: bool, mooncake: bool = True) -> dict[str, Any]:
    src = aligned_empty(size)
    src[:] = np.random.default_rng(7).integers(0, 256, size=size, dtype=np.uint8)
    dst = aligned_empty(size)
    memcpy_s = median_s(lambda: np.copyto(dst, src), iters)
    assert np.array_equal(dst, src)
    gbps = lambda s: size / s / 1e9  # noqa: E731
    result: dict[str, Any] = {
        "size_bytes": size,
        "iters": iters,
        "ferry_version": ferry.__version__,
        "memcpy": {"median_s": memcpy_s, "gb_per_s": gbps(memcpy_s)},
        "rows": [],
    }

    copy = lambda: np.copyto(dst, src)  # noqa: E731

    def add(name: str, timed: tuple[float, float]) -> None:
        seconds, memcpy_here = timed
        result["rows"].append(
            {
                "name": name,
                "median_s": seconds,
                "gb_per_s": gbps(seconds),
                "memcpy_median_s": memcpy_here,
                "vs_memcpy": memcpy_here / seconds,
            }
        )

    with ferry.open_store("mem://bench", retain_on_release=True) as store:
        r = bench_store(store, src, iters, "mem", copy)
        add("mem:// get", r["get_s"])
        add("mem:// get_into", r["get_into_s"])

    if daemon:
        secret = "bench-" + os.urandom(4).hex()
        proc, tmp, uri = start_daemon(4 * size + 16 * MIB, secret)
        try:
            with ferry.open_store(uri, secret=secret, route="shm") as store:
                r = bench_store(store, src, iters, "unix", copy)
                add("daemon (unix, shm) get", r["get_s"])
                add("daemon (unix, shm) get_into", r["get_into_s"])
        finally:
            stop_daemon(proc, tmp)
    else:
        result["daemon_skipped"] = "--no-daemon"

    with ferry.open_store_with_backend(DictMooncake(), retain_on_release=True) as store:
        r = bench_store(store, src, iters, "plugin", copy)
        add("python backend (memmove) get", r["get_s"])
        add("python backend (memmove) get_into", r["get_into_s"])

    mc = start_mooncake(4 * size + 16 * MIB) if mooncake else "--no-mooncake"
    if isinstance(mc, str):
        result["mooncake_skipped"] = mc
    else:
        try:
            with ferry.open_store_with_backend(mc[1], retain_on_release=True) as store:
                r = bench_store(store, src, iters, "mooncake", copy)
                add("mooncake (real client, tcp) get", r["get_s"])
                add("mooncake (real client, tcp) get_into", r["get_into_s"])
            # TCP needs no registered memory: without the per-call registration RDMA needs.
            with ferry.open_store_with_backend(mc[1], retain_on_release=True, register_buffers=False) as store:
                r = bench_store(store, src, iters, "mooncake-unregistered", copy)
                add("mooncake, register_buffers=False get", r["get_s"])
                add("mooncake, register_buffers=False get_into", r["get_into_s"])
            add("mooncake client's own get_into (no ferry)", bench_mooncake_raw(mc[1], src, iters, copy))
        finally:
            stop_mooncake(*mc)

    cls, where = find_specforge_store()
    if cls is None:
        result["specforge"] = {"skipped": where}
    else:
        sf = bench_specforge(cls, src, iters, copy)
        section: dict[str, Any] = {"module": where}
        for key, (seconds, memcpy_here) in sf.items():
            section[key] = {"median_s": seconds, "gb_per_s": gbps(seconds), "vs_memcpy": memcpy_here / seconds}
        section["ferry_round_trip_speedup"] = sf["specforge_round_trip"][0] / sf["ferry_dir_round_trip"][0]
        section["ferry_get_speedup"] = sf["specforge_get"][0] / sf["ferry_dir_get"][0]
        result["specforge"] = section
    return result


def print_table(result: dict[str, Any]) -> None:
    size = result["size_bytes"]
    m = result["memcpy"]
    print(f"get of one {size / MIB:g} MiB sample, median of {result['iters']} (ferry {result['ferry_version']})")
    print(f"{'path':42} {'ms':>9} {'GB/s':>8} {'vs memcpy':>10}  (memcpy timed alternately with each row)")
    print(f"{'numpy memcpy (np.copyto)':42} {m['median_s'] * 1e3:9.2f} {m['gb_per_s']:8.2f} {1.0:10.2f}")
    for row in result["rows"]:
        print(f"{row['name']:42} {row['median_s'] * 1e3:9.2f} {row['gb_per_s']:8.2f} {row['vs_memcpy']:10.2f}")
    if "daemon_skipped" in result:
        print(f"daemon: skipped ({result['daemon_skipped']})")
    if "mooncake_skipped" in result:
        print(f"mooncake (real client): skipped ({result['mooncake_skipped']})")
    sf = result["specforge"]
    if "skipped" in sf:
        print(f"SpecForge SharedDirFeatureStore round trip: skipped: {sf['skipped']}")
        return
    print(f"SpecForge SharedDirFeatureStore ({sf['module']}) against ferry dir://, same file system:")
    for key, label in (
        ("specforge_round_trip", "SpecForge round trip (put+get+release)"),
        ("ferry_dir_round_trip", "ferry dir:// round trip"),
        ("specforge_get", "SpecForge get"),
        ("ferry_dir_get", "ferry dir:// get"),
    ):
        row = sf[key]
        print(f"{label:42} {row['median_s'] * 1e3:9.2f} {row['gb_per_s']:8.2f} {row['vs_memcpy']:10.2f}")
    print(
        f"ferry is {sf['ferry_round_trip_speedup']:.1f}x faster per round trip, "
        f"{sf['ferry_get_speedup']:.1f}x per get"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=float, default=64, help="sample size in MiB (default 64)")
    p.add_argument("--iters", type=int, default=15, help="timed iterations per row (default 15)")
    p.add_argument("--no-daemon", action="store_true", help="skip the daemon rows")
    p.add_argument("--no-mooncake", action="store_true", help="skip the real Mooncake rows")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    size = int(args.size_mib * MIB)
    if size <= 0 or args.iters < 1:
        p.error("--size-mib and --iters must be positive")
    result = run(size, args.iters, daemon=not args.no_daemon, mooncake=not args.no_mooncake)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
