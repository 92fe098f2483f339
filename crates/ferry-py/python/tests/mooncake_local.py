"""A real Mooncake master on loopback, and clients of it, for the tests (``conftest.py``'s
fixtures) and the benchmark (``benches/bench_get.py`` puts this directory on ``sys.path``).

The master and the client come from the ``mooncake-transfer-engine-non-cuda`` wheel
(``scripts/test-python`` installs it). Every function answers why when something is missing
instead of raising: callers skip (tests) or print "skipped" (the benchmark) with that reason.
The master listens on free loopback ports only; readiness is polled with a deadline, never a
fixed sleep, and a start is retried when a probed port was taken before the master bound it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from typing import Any

#: How long a master may take to open its ports.
START_DEADLINE_S = 20.0


def master_binary() -> tuple[str | None, str]:
    """``(path of mooncake_master, "")``, or ``(None, why)`` when the Mooncake client is not
    importable (not installed, or its native library missing ``libibverbs.so.1``) or the wheel
    has no master binary."""
    try:
        import mooncake
        from mooncake.store import MooncakeDistributedStore  # noqa: F401 - loads the native library
    except Exception as e:  # ImportError, or OSError from the native library
        return None, f"mooncake not importable ({type(e).__name__}: {e}); scripts/test-python installs it"
    binary = os.path.join(os.path.dirname(mooncake.__file__), "mooncake_master")
    if not os.access(binary, os.X_OK):
        return None, f"no mooncake_master binary at {binary}"
    return binary, ""


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def _start_once(binary: str, log_path: str, lease_ttl_ms: int | None) -> tuple[Any, Any]:
    """One attempt: a master on three free loopback ports. ``(proc, info)`` once its RPC and
    HTTP metadata ports accept connections, or ``(None, why)`` if it exits or misses the
    deadline (polled every 20 ms)."""
    rpc, http, metrics = _free_loopback_port(), _free_loopback_port(), _free_loopback_port()
    args = [
        binary,
        "--rpc_address=127.0.0.1",
        f"--rpc_port={rpc}",
        "--enable_http_metadata_server=true",
        "--http_metadata_server_host=127.0.0.1",
        f"--http_metadata_server_port={http}",
        "--metrics_host=127.0.0.1",
        f"--metrics_port={metrics}",
        "--logtostderr=true",
    ]
    if lease_ttl_ms is not None:
        args.append(f"--default_kv_lease_ttl={lease_ttl_ms}")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + START_DEADLINE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None, f"mooncake_master exited with status {proc.returncode}"
        if _port_open(rpc) and _port_open(http):
            info = {
                "master_server_addr": f"127.0.0.1:{rpc}",
                "metadata_server": f"http://127.0.0.1:{http}/metadata",
                "rpc_port": rpc,
                "http_port": http,
                "lease_ttl_s": (lease_ttl_ms if lease_ttl_ms is not None else 10_000) / 1000,
                "pid": proc.pid,
                "log": log_path,
            }
            return proc, info
        time.sleep(0.02)
    stop_process(proc)
    return None, f"mooncake_master did not open its ports within {START_DEADLINE_S:g} s"


def start_master(log_path: str, lease_ttl_ms: int | None = None, attempts: int = 3) -> tuple[Any, Any]:
    """A master on loopback, logging to ``log_path``: ``(proc, info)`` (``info``: the
    ``master_server_addr`` and ``metadata_server`` a client needs, the ports, the read lease in
    seconds, the pid, the log), or ``(None, why)`` with the end of its log. ``lease_ttl_ms``
    sets Mooncake's read lease (``--default_kv_lease_ttl``; the master's default is 10 s)."""
    binary, why = master_binary()
    if binary is None:
        return None, why
    for _ in range(attempts):  # a free port can be taken between the probe and the master's bind
        proc, info = _start_once(binary, log_path, lease_ttl_ms)
        if proc is not None:
            return proc, info
        why = info
    try:
        with open(log_path, "rb") as f:
            tail = f.read()[-600:].decode(errors="replace").strip()
    except OSError:
        tail = "(no log)"
    return None, f"{why}; its log ends: {tail}"


def stop_process(proc) -> None:
    """Kills a master and reaps it."""
    proc.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - a kill that did not land
        pass


def setup_kwargs(master: dict, segment_bytes: int = 64 << 20) -> dict:
    """``MooncakeDistributedStore.setup`` arguments for a client of ``master`` over TCP on
    loopback (the keyword names SpecForge's ``MooncakeFeatureStore(setup_kwargs=...)`` passes
    through)."""
    return {
        "local_hostname": "127.0.0.1",
        "metadata_server": master["metadata_server"],
        "global_segment_size": segment_bytes,
        "local_buffer_size": 16 << 20,
        "protocol": "tcp",
        "rdma_devices": "",
        "master_server_addr": master["master_server_addr"],
    }


def connect_client(master: dict, segment_bytes: int = 64 << 20) -> tuple[Any, str]:
    """A ``MooncakeDistributedStore`` set up against ``master``, as ``(client, "")``, or
    ``(None, why)``. Close the client before stopping the master: a client outliving its
    master waits on RPC timeouts."""
    from mooncake.store import MooncakeDistributedStore

    client = MooncakeDistributedStore()
    rc = client.setup(**setup_kwargs(master, segment_bytes))
    if rc != 0:
        return None, f"MooncakeDistributedStore.setup against the loopback master returned {rc}"
    return client, ""
