"""The feature loader from Python: SpecForge's offline dumps through `offline_refs` and a
`mem://` store (shapes, padding, the attention mask, EAGLE3's role swap, cuts), DP sharding
equal to torch's `DistributedSampler` (torch-recorded vectors, checked in for the Rust
sampler) and to the Rust loader run by the `ferry` CLI, seek and epochs, zero-copy batches,
manifests, and errors."""

from __future__ import annotations

import gc
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

import ferry
from ferry._ferry import _debug_last_batch

TORCH_VECTORS = REPO / "crates" / "ferry-loader" / "tests" / "data" / "torch_randperm.json"
EAGLE3_KEYS = ["input_ids", "loss_mask", "hidden_state", "aux_hidden_state"]


# --- helpers --------------------------------------------------------------------------------


def mem_store(**options) -> ferry.Store:
    # Offline data is re-read every pass: the store keeps bytes on release.
    return ferry.open_store(f"mem://loader{uuid.uuid4().hex[:8]}", retain_on_release=True, **options)


def address(arr: np.ndarray) -> int:
    return arr.__array_interface__["data"][0]


def owned_base(arr: np.ndarray):
    """The `_OwnedBuffer` at the root of an array's base chain (a bfloat16 array from
    ml_dtypes is a view of the uint16 array over the buffer)."""
    base = arr.base
    while isinstance(base, np.ndarray):
        base = base.base
    return base


def bits(arr: np.ndarray) -> np.ndarray:
    """A bfloat16 array (ml_dtypes or uint16 bits) as its uint16 bit patterns."""
    return arr.view(np.uint16) if arr.dtype.itemsize == 2 else arr


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """A minimal safetensors reader (the fixtures' twins), bfloat16 as uint16 bit patterns."""
    kinds = {"I64": np.int64, "I32": np.int32, "F32": np.float32, "BF16": np.uint16, "F16": np.float16}
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, stop = info["data_offsets"]
        out[name] = np.frombuffer(data[start:stop], dtype=kinds[info["dtype"]]).reshape(info["shape"])
    return out


def twin(fixtures: Path, ref: ferry.SampleRef) -> dict[str, np.ndarray]:
    path = Path(ref.feature_store_uri.removeprefix("file://"))
    rel = path.relative_to(fixtures)
    return read_safetensors(fixtures / "expected" / rel.parent / (rel.name + ".safetensors"))


def put_tiny_eagle3(store: ferry.Store, n: int, prefix: str = "dp") -> list[ferry.SampleRef]:
    """`n` small offline-layout EAGLE3 samples, ids `<prefix>:<i:08>`, lengths 2..5."""
    refs = []
    for i in range(n):
        length = 2 + i % 4
        ids = np.arange(length, dtype=np.int64) + i
        tensors = {
            "input_ids": ids,
            "loss_mask": np.ones(length, dtype=np.int64),
            "aux_hidden_state": np.full((1, length, 6), i, dtype=np.uint16),
            "hidden_state": np.full((1, length, 2), i, dtype=np.uint16),
        }
        dtypes = {"aux_hidden_state": "bfloat16", "hidden_state": "bfloat16"}
        refs.append(store.put(f"{prefix}:{i:08}", tensors, {"target_repr": "hidden_state"}, dtypes=dtypes))
    return refs


def pass_ids(loader: ferry.FeatureLoader) -> list[str]:
    return [sid for batch in loader for sid in batch.sample_ids]


@pytest.fixture(scope="module")
def eagle3_dump(fixtures_dir) -> Path:
    return Path(os.path.abspath(fixtures_dir / "specforge-offline-eagle3"))


@pytest.fixture(scope="module")
def fixtures(fixtures_dir) -> Path:
    return Path(os.path.abspath(fixtures_dir))


# --- offline dumps --------------------------------------------------------------------------


def test_offline_refs_are_specforges(eagle3_dump):
    refs = ferry.offline_refs(eagle3_dump)
    assert [r.sample_id for r in refs] == [f"offline:{i:08}" for i in range(4)]
    assert [r.feature_store_uri.rsplit("/", 2)[-2:] for r in refs] == [
        ["rows_0-2", "data_0.ckpt"],
        ["rows_0-2", "data_1.ckpt"],
        ["rows_2-4", "data_2.ckpt.gz"],
        ["rows_2-4", "data_3.ckpt"],
    ]
    assert all(r.strategy == "eagle3" and list(r.feature_keys) == EAGLE3_KEYS for r in refs)
    assert refs[0].metadata["max_len"] == 2048 and refs[0].metadata["ttt_length"] == 7
    assert all(r.feature_specs == {} for r in refs), "lazy refs open no file"
    validated = ferry.offline_refs(eagle3_dump, run_id="r1", validate=True, max_len=16, ttt_length=3)
    assert validated[1].sample_id == "r1:00000001"
    assert validated[1].metadata["max_len"] == 16 and validated[1].metadata["ttt_length"] == 3
    assert set(validated[0].feature_specs) == set(EAGLE3_KEYS)
    assert validated[0].num_tokens > 0


def test_manifests_are_specforges_bytes(eagle3_dump, fixtures, tmp_path):
    expected = (fixtures / "specforge-control" / "offline-manifest.json").read_text()
    expected = expected.replace("file:///FIXTURES/", f"file://{fixtures}/")
    refs = ferry.offline_refs(eagle3_dump, validate=True)
    path = tmp_path / "control" / "manifest.json"
    ferry.write_manifest(refs, path)
    assert path.read_text() == expected
    assert not Path(f"{path}.tmp").exists()
    assert ferry.read_manifest(str(path)) == refs
    (tmp_path / "newer.json").write_text('{"schema_version": 2, "refs": []}')
    with pytest.raises(ferry.CorruptError, match="schema_version 2"):
        ferry.read_manifest(tmp_path / "newer.json")
    with pytest.raises(FileNotFoundError):
        ferry.read_manifest(tmp_path / "missing.json")


def test_eagle3_dump_batches_match_the_files(eagle3_dump, fixtures):
    # max_len 4 cuts every sample (the files hold 5+ tokens); rows compared with the twins:
    # EAGLE3's offline role swap (the file's aux states are the batch's hidden_state, its last
    # hidden state the target), the last kept token's loss mask zeroed, padding, the mask.
    refs = ferry.offline_refs(eagle3_dump)
    loader = ferry.FeatureLoader(mem_store(), refs, batch_size=2, max_len=4)
    assert len(loader) == 2 and loader.refs_per_pass == 4
    batches = list(loader)
    assert len(batches) == 2
    for b, batch in enumerate(batches):
        assert isinstance(batch, ferry.Batch)
        assert batch.strategy == "eagle3" and batch.batch_size == 2
        assert batch.sample_ids == [f"offline:{2 * b + i:08}" for i in range(2)]
        assert set(batch) == {"input_ids", "loss_mask", "hidden_state", "target", "attention_mask"}
        assert batch.metadata["target_repr"] == "hidden_state"
        assert batch.dtypes["hidden_state"] == "bfloat16" and batch.dtypes["input_ids"] == "int64"
        width = batch["input_ids"].shape[1]
        assert width <= 4
        for i in range(2):
            t = twin(fixtures, refs[2 * b + i])
            n = min(len(t["input_ids"]), 4)
            assert batch["input_ids"][i, :n].tolist() == t["input_ids"][:n].tolist()
            assert batch["input_ids"][i, n:].tolist() == [0] * (width - n)
            mask = t["loss_mask"][:n].copy()
            mask[-1] = 0
            assert batch["loss_mask"][i].tolist() == [*mask.tolist(), *[0] * (width - n)]
            assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
            aux, last = t["aux_hidden_state"], t["hidden_state"]
            assert batch["hidden_state"].shape == (2, width, aux.shape[-1])
            assert batch["target"].shape == (2, width, last.shape[-1])
            assert np.array_equal(bits(batch["hidden_state"][i, :n]), aux[0, :n])
            assert np.array_equal(bits(batch["target"][i, :n]), last[0, :n])
            assert not bits(batch["hidden_state"][i, n:]).any(), "padding is zero"


def test_uncut_batches_pad_to_the_longest_sample(eagle3_dump, fixtures):
    refs = ferry.offline_refs(eagle3_dump, validate=True)
    lengths = [r.num_tokens for r in refs]
    loader = ferry.FeatureLoader(mem_store(), refs, batch_size=4)
    (batch,) = list(loader)
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["attention_mask"].sum(axis=1).tolist() == lengths
    assert batch["hidden_state"].shape[:2] == (4, max(lengths))


def test_dflash_dump(fixtures):
    refs = ferry.offline_refs(fixtures / "specforge-offline-dflash", strategy="dflash")
    assert list(refs[0].feature_keys) == ["input_ids", "loss_mask", "hidden_states"]
    loader = ferry.FeatureLoader(mem_store(), refs, batch_size=2, strategy="dflash", max_len=3)
    (batch,) = list(loader)
    assert batch.strategy == "dflash"
    assert batch["input_ids"].shape == (2, 3)
    for i, r in enumerate(refs):
        t = twin(fixtures, r)
        assert batch["loss_mask"][i].tolist() == t["loss_mask"].reshape(-1)[:3].tolist(), "DFlash keeps the mask"
        w = t["hidden_states"].shape[-1]
        assert np.array_equal(bits(batch["hidden_states"][i]), t["hidden_states"].reshape(-1, w)[:3])


# --- DP sharding ----------------------------------------------------------------------------


def torch_sampler_cases():
    """Every recorded case up to 100 samples (450 cases: dp 2 and 3, every rank, three seeds,
    epochs 0 and 1, shuffled or not, padded or dropped). The 1001-sample cases are left to
    the Rust test, which checks the same sampler: here each costs ~0.1 s in a debug build."""
    cases = [c for c in json.loads(TORCH_VECTORS.read_text()) if "sampler" in c]
    assert len(cases) >= 500, f"{TORCH_VECTORS} lost its DistributedSampler cases"
    return [c for c in cases if c["n"] <= 100]


def test_dp_shards_equal_torch_distributed_sampler():
    # Vectors recorded from real torch (DistributedSampler after set_epoch) for the Rust
    # sampler's own test: the Python loader must yield exactly those indices, in order, for
    # every dp, rank, seed, epoch, shuffle and drop_last recorded.
    cases = torch_sampler_cases()
    assert {c["n"] for c in cases} == {1, 2, 7, 10, 100} and len(cases) == 450
    store = mem_store()
    refs_by_n = {}
    mismatches = []
    for case in cases:
        n, s = case["n"], case["sampler"]
        if n not in refs_by_n:
            refs_by_n[n] = put_tiny_eagle3(store, n, prefix=f"n{n}")
        loader = ferry.FeatureLoader(
            store,
            refs_by_n[n],
            batch_size=64,
            drop_last=False,
            dp=s["num_replicas"],
            rank=s["rank"],
            seed=case["seed"],
            shuffle=s["shuffle"],
            dp_drop_last=s["drop_last"],
        )
        loader.set_epoch(s["epoch"])
        assert loader.refs_per_pass == len(case["indices"])
        got = [int(sid.split(":")[1]) for sid in pass_ids(loader)]
        if got != case["indices"]:
            mismatches.append((n, case["seed"], s))
    assert not mismatches, f"{len(mismatches)} of {len(cases)} differ from torch: {mismatches[:5]}"


def ferry_cli() -> Path | None:
    for profile in ("debug", "release"):
        exe = REPO / "target" / profile / "ferry"
        if exe.is_file() and os.access(exe, os.X_OK):
            return exe
    return None


@pytest.mark.skipif(ferry_cli() is None, reason="target/debug/ferry is not built (cargo build -p ferry-cli)")
def test_dp_batches_equal_the_rust_loaders(tmp_path):
    # The Rust loader as `ferry consume --files` runs it (colocated offline, every rank a
    # thread): each rank's batches per epoch, against this process's loaders.
    exe = ferry_cli()
    dump = tmp_path / "dump"
    synth = [exe, "synth", dump, "--samples", "11", "--seed", "3", "--seq-len", "12", "--min-seq-len", "4"]
    subprocess.run(synth, check=True, capture_output=True)
    out = tmp_path / "batches.jsonl"
    consume = [exe, "consume", "--files", dump, "--dp", "2", "--batch", "2", "--epochs", "2", "--seed", "5"]
    subprocess.run([*consume, "--batches", out], check=True, capture_output=True)
    expected: dict[tuple[int, int], list[tuple[int, list[str]]]] = {}
    for line in out.read_text().splitlines():
        rec = json.loads(line)
        expected.setdefault((rec["epoch"], rec["rank"]), []).append((rec["step"], rec["sample_ids"]))
    refs = ferry.offline_refs(dump)
    store = mem_store()
    for rank in range(2):
        loader = ferry.FeatureLoader(store, refs, batch_size=2, drop_last=False, dp=2, rank=rank, seed=5)
        for epoch in range(2):
            loader.set_epoch(epoch)
            ours = [b.sample_ids for b in loader]
            theirs = [ids for _, ids in sorted(expected[(epoch, rank)])]
            assert ours == theirs, f"epoch {epoch} rank {rank}"


def test_dp_arguments_are_checked():
    store = mem_store()
    refs = put_tiny_eagle3(store, 7)
    with pytest.raises(ferry.InvalidArgumentError, match="rank 2 of dp 2"):
        ferry.FeatureLoader(store, refs, dp=2, rank=2)
    with pytest.raises(ValueError, match="dp needs rank"):
        ferry.FeatureLoader(store, refs, dp=2)
    with pytest.raises(ValueError, match="rank needs dp"):
        ferry.FeatureLoader(store, refs, rank=0)
    loader = ferry.FeatureLoader(store, refs, dp=3, rank=2, batch_size=2, drop_last=False)
    assert (loader.dp, loader.rank, loader.refs_per_pass, len(loader)) == (3, 2, 3, 2)


# --- seek, epochs, len, load_batch ----------------------------------------------------------


def test_len_seek_and_passes():
    store = mem_store()
    refs = put_tiny_eagle3(store, 7)
    loader = ferry.FeatureLoader(store, refs, batch_size=2)
    assert len(loader) == 3 and loader.batch_size == 2 and loader.drop_last
    full = [b.sample_ids for b in loader]
    assert full == [[f"dp:{i:08}", f"dp:{i + 1:08}"] for i in (0, 2, 4)], "drop_last drops the tail"
    assert [b.sample_ids for b in loader] == full, "every pass yields the same batches"
    loader.seek(2)
    it = iter(loader)
    assert it.remaining == 1 and it.__length_hint__() == 1
    assert [b.sample_ids for b in it] == full[2:]
    assert [b.sample_ids for b in loader] == full, "a seek applies to the next pass only"
    loader.seek(3)
    assert list(loader) == [], "seeking a whole pass leaves an empty pass"
    with pytest.raises(ferry.InvalidArgumentError, match="past the end"):
        loader.seek(4)
    tail = ferry.FeatureLoader(store, refs, batch_size=2, drop_last=False)
    assert len(tail) == 4 and [b.sample_ids for b in tail][-1] == ["dp:00000006"]


def test_set_epoch_reshuffles_dp_shards_only():
    store = mem_store()
    refs = put_tiny_eagle3(store, 10)
    plain = ferry.FeatureLoader(store, refs, batch_size=5)
    plain.set_epoch(3)
    assert plain.epoch == 3
    assert pass_ids(plain) == [f"dp:{i:08}" for i in range(10)], "without dp the order is the refs'"
    sharded = ferry.FeatureLoader(store, refs, batch_size=5, dp=2, rank=0, seed=9)
    assert sharded.epoch == 0
    e0 = pass_ids(sharded)
    assert pass_ids(sharded) == e0
    sharded.set_epoch(1)
    e1 = pass_ids(sharded)
    assert e1 != e0 and len(e1) == 5
    other = ferry.FeatureLoader(store, refs, batch_size=5, dp=2, rank=1, seed=9)
    other.set_epoch(1)
    assert sorted(e1 + pass_ids(other)) == [f"dp:{i:08}" for i in range(10)], "ranks split each epoch"
    unshuffled = ferry.FeatureLoader(store, refs, batch_size=5, dp=2, rank=1, shuffle=False)
    assert pass_ids(unshuffled) == [f"dp:{i:08}" for i in (1, 3, 5, 7, 9)]


def test_workers_yield_the_same_batches():
    store = mem_store()
    refs = put_tiny_eagle3(store, 13)
    inline = [b.sample_ids for b in ferry.FeatureLoader(store, refs, batch_size=3, drop_last=False)]
    loader = ferry.FeatureLoader(store, refs, batch_size=3, drop_last=False, num_workers=2)
    assert [b.sample_ids for b in loader] == inline
    with iter(loader) as it:  # closing a pass part-way stops its workers
        next(it)
    assert it.remaining == 0 and list(it) == []
    it = iter(loader)
    next(it)
    del it
    gc.collect()
    assert store.health()["active_leases"] == 0


def test_load_batch_and_close():
    store = mem_store()
    refs = put_tiny_eagle3(store, 4)
    with ferry.FeatureLoader(store, refs[:1]) as loader:
        batch = loader.load_batch([refs[3], refs[1]])
        assert batch.sample_ids == ["dp:00000003", "dp:00000001"]
        assert batch["input_ids"].shape == (2, 5)
        assert batch["input_ids"][1].tolist() == [1, 2, 3, 0, 0]
        with pytest.raises(ferry.InvalidArgumentError, match="at least one ref"):
            loader.load_batch([])
    loader.close()
    assert len(list(loader)) == 1, "a refs-mode loader stays usable after close"


def test_batches_iterate_without_the_gil():
    # Another Python thread runs while a batch is materialized (the GIL is released).
    store = mem_store()
    refs = put_tiny_eagle3(store, 40)
    loader = ferry.FeatureLoader(store, refs, batch_size=4)
    results = []

    def worker():
        results.append(sum(len(b.sample_ids) for b in loader))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [40, 40, 40]


# --- zero copy and lifetimes ----------------------------------------------------------------


def test_batch_tensors_are_ferrys_buffers_without_a_copy(eagle3_dump):
    loader = ferry.FeatureLoader(mem_store(), ferry.offline_refs(eagle3_dump), batch_size=2)
    batch = next(iter(loader))
    trace = {name: (addr, nbytes) for name, addr, nbytes in _debug_last_batch()}
    assert set(trace) == set(batch)
    for name, arr in batch.items():
        addr, nbytes = trace[name]
        assert arr.nbytes == nbytes
        # The array's memory is the batch buffer the loader collated into: same address, and
        # that buffer is the array's base.
        assert address(arr) == addr, name
        base = owned_base(arr)
        assert type(base).__name__ == "_OwnedBuffer" and base.address == addr
        assert address(arr) % 64 == 0, "ferry's buffers are 64-byte aligned"
        assert arr.flags.c_contiguous and arr.flags.writeable
    assert batch.tensors["input_ids"] is batch["input_ids"], "the same arrays every time"


def test_bfloat16_batches_follow_the_stores_mode(eagle3_dump):
    refs = ferry.offline_refs(eagle3_dump)
    raw = next(iter(ferry.FeatureLoader(mem_store(bfloat16="uint16"), refs, batch_size=2)))
    assert raw["hidden_state"].dtype == np.uint16 and raw.dtypes["hidden_state"] == "bfloat16"
    if ferry.bfloat16_dtype() is not None:
        typed = next(iter(ferry.FeatureLoader(mem_store(bfloat16="ml_dtypes"), refs, batch_size=2)))
        assert typed["hidden_state"].dtype == ferry.bfloat16_dtype()
        assert np.array_equal(typed["hidden_state"].view(np.uint16), raw["hidden_state"])


def test_batch_arrays_outlive_the_loader_and_the_store(eagle3_dump):
    store = mem_store()
    loader = ferry.FeatureLoader(store, ferry.offline_refs(eagle3_dump), batch_size=2, num_workers=2)
    batches = list(loader)
    expected = [b["input_ids"].copy() for b in batches]
    arrays = [b["hidden_state"] for b in batches]
    ids = [b["input_ids"] for b in batches]
    del loader, batches
    store.close()
    gc.collect()
    for want, got in zip(expected, ids):
        assert np.array_equal(got, want)
    for arr in arrays:
        arr[...] = 0  # owned and writable
        assert not bits(arr).any()


def test_mapping_protocol_and_repr(eagle3_dump):
    import collections.abc

    loader = ferry.FeatureLoader(mem_store(), ferry.offline_refs(eagle3_dump), batch_size=2)
    batch = next(iter(loader))
    assert isinstance(batch, collections.abc.Mapping)
    assert "input_ids" in batch and "nope" not in batch
    assert batch.get("nope") is None and batch.get("nope", 1) == 1
    assert list(batch.keys()) == list(batch.tensors)
    assert len(batch) == 5
    assert 'Batch(strategy="eagle3"' in repr(batch)
    assert "FeatureLoader(strategy=\"eagle3\"" in repr(loader) and "epoch=0" in repr(loader)
    assert loader.strategy == "eagle3" and loader.num_workers == 0 and loader.dp is None


# --- errors ---------------------------------------------------------------------------------


def test_errors():
    store = mem_store()
    refs = put_tiny_eagle3(store, 2)
    with pytest.raises(ValueError, match="unknown strategy \"medusa\".*eagle3, dflash, domino") as err:
        ferry.FeatureLoader(store, refs, strategy="medusa")
    assert isinstance(err.value, ferry.InvalidArgumentError)
    with pytest.raises(ferry.InvalidArgumentError, match="eagle3, dflash, domino"):
        ferry.offline_refs("/nonexistent", strategy="medusa")
    with pytest.raises(ferry.InvalidArgumentError, match="batch_size must be >= 1"):
        ferry.FeatureLoader(store, refs, batch_size=0)
    with pytest.raises(TypeError, match="SampleRef"):
        ferry.FeatureLoader(store, ["not a ref"])
    with pytest.raises(TypeError):
        ferry.FeatureLoader(object(), refs)
    # Refs of another strategy fail at their batch, which ends the pass.
    dflash = ferry.FeatureLoader(store, refs, strategy="dflash")
    it = iter(dflash)
    with pytest.raises(ferry.Error):
        next(it)
    assert list(it) == []
    closed = mem_store()
    closed.close()
    with pytest.raises(ferry.InvalidArgumentError, match="closed"):
        ferry.FeatureLoader(closed, refs)
    with pytest.raises(FileNotFoundError):
        ferry.offline_refs("/nonexistent/dump")


def test_a_missing_file_fails_its_batch(tmp_path, eagle3_dump):
    dump = tmp_path / "dump"
    shutil.copytree(eagle3_dump, dump)
    refs = ferry.offline_refs(dump)
    os.remove(refs[1].feature_store_uri.removeprefix("file://"))
    loader = ferry.FeatureLoader(mem_store(), refs, batch_size=1)
    it = iter(loader)
    assert next(it).sample_ids == ["offline:00000000"]
    with pytest.raises(ferry.Error) as err:
        next(it)
    assert "data_1.ckpt" in str(err.value)


def test_batch_to_torch_shares_memory(eagle3_dump):
    torch = pytest.importorskip("torch", reason="torch is not installed (optional): Batch.to_torch skipped")
    loader = ferry.FeatureLoader(mem_store(), ferry.offline_refs(eagle3_dump), batch_size=2)
    batch = next(iter(loader))
    tensors = batch.to_torch()
    assert set(tensors) == set(batch)
    assert tensors["hidden_state"].dtype == torch.bfloat16 and tensors["input_ids"].dtype == torch.int64
    for name, t in tensors.items():
        assert t.data_ptr() == address(batch[name]), name
    for mode in ("uint16", "ml_dtypes") if ferry.bfloat16_dtype() is not None else ("uint16",):
        store = ferry.open_store(f"mem://{uuid.uuid4().hex[:8]}", bfloat16=mode)
        b = next(iter(ferry.FeatureLoader(store, ferry.offline_refs(eagle3_dump), batch_size=2)))
        assert b.to_torch()["target"].dtype == torch.bfloat16, mode
        assert torch.equal(b.to_torch()["target"], tensors["target"])


# --- the example ----------------------------------------------------------------------------


def test_offline_train_example(eagle3_dump):
    pytest.importorskip("torch", reason="torch is not installed (optional): the training example is skipped")
    example = REPO / "examples" / "python" / "offline_train.py"
    proc = subprocess.run(
        [sys.executable, example, str(eagle3_dump), "--epochs", "2", "--batch-size", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "epoch 1" in proc.stdout
