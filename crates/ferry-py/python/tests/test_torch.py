"""torch tensors in and out: every dtype bit-exact through every store, zero-copy both ways
(pointer identity), tensors that outlive their lease, borrowed shared-memory views under torch,
and two trainer ranks agreeing through a real `torch.distributed` (gloo) group. Skipped
(visibly, with pytest -ra) when torch is not installed; scripts/test-python installs it."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, daemon_process, sid

import ferry

torch = pytest.importorskip("torch", reason="torch is not installed (optional): torch tests skipped")


def test_torch_tensors_round_trip(store):
    tensors = {
        "h": torch.randn(2, 3, 8).to(torch.bfloat16),
        "ids": torch.arange(6, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "t": torch.randn(4, 5).t(),  # non-contiguous: copied once
    }
    r = store.put(sid(), tensors)
    assert r.feature_specs["h"].dtype == "bfloat16"
    with store.get(r) as lease:
        back = lease.to_torch()
        assert back["h"].dtype == torch.bfloat16
        for name, t in tensors.items():
            assert torch.equal(back[name], t.contiguous()), name


def test_contiguous_torch_put_is_in_place(store):
    t = torch.randn(16, 16)
    store.put(sid(), {"t": t})
    assert ferry._ferry._debug_stats()["last_put"][0][1] == t.data_ptr()


def test_get_into_torch_tensors(store):
    src = torch.randn(3, 4).to(torch.bfloat16)
    r = store.put(sid(), {"h": src})
    out = torch.zeros(3, 4, dtype=torch.bfloat16)
    with store.get_into(r, {"h": out}):
        assert torch.equal(out, src)
        assert ferry._ferry._debug_stats()["last_get_into"][0][1] == out.data_ptr()


def test_to_torch_shares_memory():
    a = np.arange(4, dtype=np.float32)
    t = ferry.to_torch(a)
    t[0] = 7
    assert a[0] == 7
    bits = np.array([0x3FC0], dtype=np.uint16)
    assert ferry.to_torch(bits, "bfloat16").item() == 1.5


# Every dtype ferry stores, as torch names it (SpecForge's spec dtype is str(t.dtype) without
# the "torch." prefix).
TORCH_DTYPES = [
    "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
]


def sample_tensor(dtype: str, shape=(3, 5, 7)) -> "torch.Tensor":
    g = torch.Generator().manual_seed(len(dtype))
    t = getattr(torch, dtype)
    if t.is_floating_point:
        return (torch.randn(*shape, generator=g) * 100).to(t)
    if t == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    info = torch.iinfo(t)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(t)


def raw_bytes(t: "torch.Tensor") -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_every_dtype_round_trips_bit_exact(store, dtype):
    t = sample_tensor(dtype)
    r = store.put(sid(), {"x": t})
    assert r.feature_specs["x"].dtype == str(t.dtype).removeprefix("torch.")
    assert tuple(r.feature_specs["x"].shape) == tuple(t.shape)
    with store.get(r) as lease:
        back = lease.to_torch()["x"]
        assert back.dtype == t.dtype and back.shape == t.shape
        assert raw_bytes(back) == raw_bytes(t), "bytes differ"
    r = store.put(sid(), {"x": t})  # the get above consumed the first (consume-once stores)
    out = torch.empty_like(t)
    with store.get_into(r, {"x": out}):
        assert raw_bytes(out) == raw_bytes(t)


def test_unsupported_torch_dtypes_are_refused_by_name(store):
    for bad in (torch.complex64, torch.float8_e4m3fn, torch.uint16):
        with pytest.raises(ferry.UnknownDtypeError, match=str(bad).removeprefix("torch.")):
            store.put(sid(), {"x": torch.zeros(4, dtype=bad)})


def test_get_into_refuses_a_wrong_dtype_or_size(store):
    r = store.put(sid(), {"x": torch.zeros(4, 4)})
    with pytest.raises(ferry.InvalidArgumentError):
        store.get_into(r, {"x": torch.zeros(4, 4, dtype=torch.float64)})
    with pytest.raises(ferry.InvalidArgumentError):
        store.get_into(r, {"x": torch.zeros(4, 3)})


def test_to_torch_is_the_lease_buffer_and_outlives_the_lease(store):
    src = torch.randn(64, 32).to(torch.bfloat16)
    r = store.put(sid(), {"h": src})
    lease = store.get(r)
    array = lease["h"]
    tensor = lease.to_torch()["h"]
    assert tensor.data_ptr() == array.__array_interface__["data"][0], "to_torch copied"
    lease.release()
    del lease, array
    gc.collect()
    assert torch.equal(tensor, src), "the tensor owns ferry's buffer after the lease"
    tensor.add_(1)  # writable, and writing is safe: the buffer is the tensor's own


def test_torch_views_of_a_borrowed_lease_pin_the_arena():
    with daemon_process(8 << 20, prefix="ferry-torch-borrow-") as info:
        shm = ferry.open_store(info["unix"], secret=info["secret"], route="shm")
        other = ferry.open_store(info["unix"], secret=info["secret"])
        try:
            old = torch.full((4096,), 7, dtype=torch.uint8)
            r = shm.put(sid(), {"a": old})
            lease = shm.get(r, borrow=True)
            base, length = shm._debug_shm_mapping()
            tensor = lease.to_torch()["a"]
            assert base <= tensor.data_ptr() < base + length, "a borrowed tensor is a view of the arena"
            lease.release()
            other.abort(r.sample_id)
            new = torch.full((4096,), 9, dtype=torch.uint8)
            with pytest.raises((ferry.StoreFullError, ferry.BackendError)):
                for _ in range(4096):
                    other.put(sid(), {"a": new})
            assert torch.equal(tensor, old), "bytes under a live torch view were reused"
            del tensor
            gc.collect()
        finally:
            other.close()
            shm.close()


BORROWED_TO_TORCH_MAIN = """
import sys, warnings
import numpy as np, torch, ferry
shm = ferry.open_store(sys.argv[1], secret=sys.argv[2], route="shm")
ref = shm.put("w0", {"a": np.arange(16, dtype=np.float32)})
lease = shm.get(ref, borrow=True)
assert not lease.tensors["a"].flags.writeable
tensor = lease.to_torch()["a"]  # -W error: a warning here is an exception
assert torch.equal(tensor, torch.arange(16, dtype=torch.float32))
del tensor
lease.release()
shm.close()
mine = np.zeros(4)
mine.flags.writeable = False
try:
    torch.from_numpy(mine)
except UserWarning as e:
    print("user-warned:", e)
"""


def test_borrowed_to_torch_is_silent_and_leaves_the_callers_warnings_alone():
    # A fresh interpreter: torch warns about a read-only array once per process.
    with daemon_process(8 << 20, prefix="ferry-torch-warn-") as info:
        out = subprocess.run(
            [sys.executable, "-W", "error::UserWarning", "-c", BORROWED_TO_TORCH_MAIN, info["unix"], info["secret"]],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert out.returncode == 0, out.stderr
    assert "user-warned: The given NumPy array is not writable" in out.stdout, out.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_ranks_train_every_sample_once_over_torch_distributed(tmp_path):
    """The online example under torch's own launcher: two rank processes, a gloo group,
    `TorchCollective` for ferry's agreement, every sample acked once in the ledger."""
    example = REPO / "examples" / "python" / "online_consumer.py"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
            str(example), "--workdir", str(tmp_path), "--samples", "48",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "acked 48 samples" in proc.stdout, proc.stdout
