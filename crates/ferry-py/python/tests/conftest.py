"""Shared fixtures: the SpecForge fixtures folder, a node daemon in a child process, and a
`store` fixture that runs a test over every store URI (mem://, dir://, ferry://, ferry+unix://).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

import ferry

REPO = Path(__file__).resolve().parents[4]
SECRET = "test-secret-" + uuid.uuid4().hex[:8]
DAEMON_CAPACITY = 64 << 20

# The daemon's child process: start, print its URIs, serve until stdin closes.
DAEMON_MAIN = r"""
import json, os, sys
import ferry
d = ferry.start_daemon(listen="127.0.0.1:0", socket=sys.argv[1], capacity=int(sys.argv[2]),
                       secret=os.environ["FERRY_TEST_SECRET"])
print(json.dumps({"tcp": d.tcp_uri, "unix": d.unix_uri}), flush=True)
sys.stdin.read()
d.stop()
"""


@pytest.fixture
def ctrl_c():
    """Makes Ctrl-C (SIGINT, and ``_thread.interrupt_main``) raise ``KeyboardInterrupt`` in the
    main thread for the test, whoever started pytest: a shell starts a background job with SIGINT
    ignored, and Python then installs no handler, so a test of Ctrl-C would wait for ever."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """`<repo>/../shared/fixtures` (or $FERRY_FIXTURES). Missing fixtures fail, never skip."""
    path = Path(os.environ.get("FERRY_FIXTURES", REPO.parent / "shared" / "fixtures"))
    assert (path / "specforge-control").is_dir(), (
        f"SpecForge fixtures not found at {path}: shared/fixtures must sit beside the repository"
    )
    return path


@contextlib.contextmanager
def daemon_process(capacity: int, prefix: str = "ferry-py-"):
    """A node daemon in a child process (loopback TCP and a Unix socket, a `capacity`-byte
    shared-memory arena, the test secret), stopped when the block ends."""
    tmp = tempfile.mkdtemp(prefix=prefix)
    socket = os.path.join(tmp, "d.sock")
    env = dict(os.environ, FERRY_TEST_SECRET=SECRET)
    proc = subprocess.Popen(
        [sys.executable, "-c", DAEMON_MAIN, socket, str(capacity)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line, f"the daemon process exited with {proc.wait()}"
        uris = json.loads(line)
        yield {"tcp": uris["tcp"], "unix": uris["unix"], "secret": SECRET, "pid": proc.pid}
    finally:
        try:
            proc.stdin.close()
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def daemon():
    """The session's daemon (a 64 MiB arena), shared by every test that needs one."""
    with daemon_process(DAEMON_CAPACITY) as info:
        yield info


BACKENDS = ["mem", "dir", "tcp", "unix"]


def open_backend(kind: str, daemon_info, tmp_path: Path, **options) -> ferry.Store:
    if kind == "mem":
        return ferry.open_store(f"mem://t{uuid.uuid4().hex[:8]}", **options)
    if kind == "dir":
        return ferry.open_store(f"dir://{tmp_path / 'store'}", **options)
    return ferry.open_store(daemon_info[kind], secret=daemon_info["secret"], **options)


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def open_store(backend, request, tmp_path):
    """A function opening a store of the current backend (daemon backends need the daemon)."""
    daemon_info = request.getfixturevalue("daemon") if backend in ("tcp", "unix") else None
    opened = []

    def open_(**options) -> ferry.Store:
        store = open_backend(backend, daemon_info, tmp_path, **options)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store) -> ferry.Store:
    return open_store()


def sid(prefix: str = "s") -> str:
    """A sample id unique in the session (the daemon's store is shared by every test)."""
    return f"{prefix}:{uuid.uuid4().hex[:12]}"


# --- a real Mooncake master on loopback (test_mooncake_real.py) -------------------------------

#: Mooncake's read lease (`--default_kv_lease_ttl`, milliseconds): every get_into / is_exist
#: grants one and a non-forced remove is refused (-706) until it ends. Short (the master's default
#: is 10 s), so the tests that wait it out stay fast, long enough that a get then release always
#: meets it on a loaded machine.
MOONCAKE_LEASE_TTL_MS = 1000
MOONCAKE_START_DEADLINE_S = 20.0


def _free_loopback_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def _start_mooncake_master(binary: str, log_path: str, lease_ttl_ms: int):
    """One attempt: a master on three free loopback ports. Returns `(proc, info)` once its RPC
    and HTTP metadata ports accept connections, or `(None, why)` if it exits or misses the
    deadline (polled every 20 ms, never a fixed sleep)."""
    import time

    rpc, http, metrics = _free_loopback_port(), _free_loopback_port(), _free_loopback_port()
    log = open(log_path, "ab")
    proc = subprocess.Popen(
        [
            binary,
            "--rpc_address=127.0.0.1",
            f"--rpc_port={rpc}",
            "--enable_http_metadata_server=true",
            "--http_metadata_server_host=127.0.0.1",
            f"--http_metadata_server_port={http}",
            "--metrics_host=127.0.0.1",
            f"--metrics_port={metrics}",
            f"--default_kv_lease_ttl={lease_ttl_ms}",
            "--logtostderr=true",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    log.close()
    deadline = time.monotonic() + MOONCAKE_START_DEADLINE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None, f"mooncake_master exited with status {proc.returncode}"
        if _port_open(rpc) and _port_open(http):
            info = {
                "master_server_addr": f"127.0.0.1:{rpc}",
                "metadata_server": f"http://127.0.0.1:{http}/metadata",
                "rpc_port": rpc,
                "http_port": http,
                "lease_ttl_s": lease_ttl_ms / 1000,
                "pid": proc.pid,
            }
            return proc, info
        time.sleep(0.02)
    _stop_process(proc)
    return None, f"mooncake_master did not open its ports within {MOONCAKE_START_DEADLINE_S:g} s"


def _stop_process(proc) -> None:
    proc.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - a kill that did not land
        pass


@pytest.fixture(scope="session")
def mooncake_master():
    """A real `mooncake_master` (from the `mooncake-transfer-engine-non-cuda` wheel) on free
    loopback ports with a short read lease, for the session; killed at the end. Skips, with the
    reason, when Mooncake is not importable (not installed, or `libibverbs.so.1` missing) or
    the master does not start."""
    try:
        import mooncake
        from mooncake.store import MooncakeDistributedStore  # noqa: F401 - needs libibverbs
    except Exception as e:  # ImportError, OSError from the native library
        pytest.skip(f"mooncake not importable ({type(e).__name__}: {e}); scripts/test-python installs it")
    binary = os.path.join(os.path.dirname(mooncake.__file__), "mooncake_master")
    if not os.access(binary, os.X_OK):
        pytest.skip(f"no mooncake_master binary at {binary}")
    tmp = tempfile.mkdtemp(prefix="ferry-mooncake-")
    log_path = os.path.join(tmp, "master.log")
    why = "not started"
    try:
        for _ in range(3):  # a free port can be taken between the probe and the master's bind
            proc, info = _start_mooncake_master(binary, log_path, MOONCAKE_LEASE_TTL_MS)
            if proc is not None:
                break
            why = info
        else:
            with open(log_path, "rb") as f:
                tail = f.read()[-600:].decode(errors="replace").strip()
            pytest.skip(f"{why}; its log ends: {tail}")
        try:
            yield {**info, "log": log_path}
        finally:
            _stop_process(proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def mooncake_setup_kwargs(master: dict, segment_bytes: int = 64 << 20) -> dict:
    """`MooncakeDistributedStore.setup` arguments for a client of `master` over TCP on loopback
    (the keyword names SpecForge's `MooncakeFeatureStore(setup_kwargs=...)` passes through)."""
    return {
        "local_hostname": "127.0.0.1",
        "metadata_server": master["metadata_server"],
        "global_segment_size": segment_bytes,
        "local_buffer_size": 16 << 20,
        "protocol": "tcp",
        "rdma_devices": "",
        "master_server_addr": master["master_server_addr"],
    }


@pytest.fixture(scope="session")
def mooncake_client(mooncake_master):
    """A real `MooncakeDistributedStore` connected to the session's master; closed at the end
    (before the master stops: a client outliving its master waits on RPC timeouts)."""
    from mooncake.store import MooncakeDistributedStore

    client = MooncakeDistributedStore()
    rc = client.setup(**mooncake_setup_kwargs(mooncake_master))
    if rc != 0:
        pytest.skip(f"MooncakeDistributedStore.setup against the loopback master returned {rc}")
    yield client
    client.close()
