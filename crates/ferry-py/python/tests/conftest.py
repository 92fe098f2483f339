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
import mooncake_local

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

@pytest.fixture(scope="session")
def mooncake_master():
    """A real `mooncake_master` (from the `mooncake-transfer-engine-non-cuda` wheel) on free
    loopback ports with a short read lease, for the session; killed at the end. Skips, with the
    reason, when Mooncake is not importable (not installed, or `libibverbs.so.1` missing) or
    the master does not start."""
    tmp = tempfile.mkdtemp(prefix="ferry-mooncake-")
    try:
        proc, info = mooncake_local.start_master(os.path.join(tmp, "master.log"), MOONCAKE_LEASE_TTL_MS)
        if proc is None:
            pytest.skip(info)
        try:
            yield info
        finally:
            mooncake_local.stop_process(proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def mooncake_client(mooncake_master):
    """A real `MooncakeDistributedStore` connected to the session's master; closed at the end
    (before the master stops: a client outliving its master waits on RPC timeouts)."""
    client, why = mooncake_local.connect_client(mooncake_master)
    if client is None:
        pytest.skip(why)
    yield client
    client.close()
