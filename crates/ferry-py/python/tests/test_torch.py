"""torch tensors in and out. Skipped (visibly, with pytest -ra) when torch is not installed:
scripts/test-python never installs it."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import sid

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
