"""SampleRef / FeatureSpec / FeatureHandle: SpecForge's JSON byte for byte.

The ground truth is shared/fixtures/specforge-control/, written by SpecForge's own Python code:
refs.jsonl (compact channel lines), manifest.json and offline-manifest.json (spaced
manifests), and ledger.db (SQLite `ref_json`, spaced).
"""

from __future__ import annotations

import json
import pickle
import shutil
import sqlite3

import pytest

import ferry


def refs_jsonl(fixtures_dir):
    text = (fixtures_dir / "specforge-control" / "refs.jsonl").read_text()
    complete, _, torn = text.rpartition("\n")
    return complete.split("\n"), torn


def test_channel_lines_round_trip_byte_for_byte(fixtures_dir):
    lines, torn = refs_jsonl(fixtures_dir)
    assert len(lines) == 4, "3 refs, 1 duplicate publication"
    for line in lines:
        r = ferry.SampleRef.from_json(line)
        assert r.to_json() == line
        assert r.to_json("compact") == line
        d = r.to_dict()
        assert d == json.loads(line)
        assert list(d) == list(json.loads(line)), "key order is SpecForge's"
        assert ferry.SampleRef.from_dict(json.loads(line)).to_json() == line
        assert ferry.SampleRef(**json.loads(line)) == r
        # spaced == Python's default json.dumps of the same dict
        assert r.to_json("spaced") == json.dumps(json.loads(line))
    # The torn record a crash left: a JsonError, which is a ValueError.
    assert torn
    with pytest.raises(ferry.JsonError) as e:
        ferry.SampleRef.from_json(torn)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("name", ["manifest.json", "offline-manifest.json"])
def test_manifest_refs_round_trip_byte_for_byte(fixtures_dir, name):
    text = (fixtures_dir / "specforge-control" / name).read_text()
    doc = json.loads(text)
    refs = [ferry.SampleRef.from_dict(d) for d in doc["refs"]]
    assert refs
    for r, d in zip(refs, doc["refs"]):
        assert r.to_json("spaced") == json.dumps(d)
        assert r.to_dict() == d
    body = '{"schema_version": 1, "refs": [' + ", ".join(r.to_json("spaced") for r in refs) + "]}"
    assert body == text.rstrip("\n")


def test_ledger_ref_json_round_trips_byte_for_byte(fixtures_dir, tmp_path):
    # Copied first: opening the WAL database in place could write its index beside a fixture.
    src = fixtures_dir / "specforge-control"
    for name in ["ledger.db", "ledger.db-wal"]:
        if (src / name).exists():
            shutil.copy(src / name, tmp_path / name)
    conn = sqlite3.connect(f"file:{tmp_path / 'ledger.db'}?mode=ro", uri=True)
    rows = conn.execute("SELECT sample_id, ref_json FROM committed ORDER BY rowid").fetchall()
    conn.close()
    assert rows
    for sample_id, ref_json in rows:
        r = ferry.SampleRef.from_json(ref_json)
        assert r.sample_id == sample_id
        assert r.to_json("spaced") == ref_json


def test_properties_and_generation(fixtures_dir):
    lines, _ = refs_jsonl(fixtures_dir)
    r = ferry.SampleRef.from_json(lines[0])
    assert r.sample_id == "run0:task0"
    assert r.run_id == "run0"
    assert r.source_task_id is None
    assert r.feature_store_uri == "disagg://fixture/run0:task0"
    assert r.strategy == "eagle3"
    assert r.schema_version == 1
    assert r.generation == 1
    assert r.metadata["ttt_length"] == 7
    assert r.feature_keys["input_ids"] == "run0:task0/input_ids"
    spec = r.feature_specs["hidden_state"]
    assert isinstance(spec, ferry.FeatureSpec)
    assert spec.shape == (1, 4, 24)
    assert spec.dtype == "bfloat16"
    assert spec.numel == 96
    assert spec.nbytes == 192
    assert spec.required is True
    assert "run0:task0" in repr(r)


def test_python_json_spelling_of_unusual_values():
    d = {
        "sample_id": "s\u00e9\U0001f600",
        "run_id": "r",
        "source_task_id": None,
        "feature_store_uri": "mem://a/s",
        "feature_keys": {"x": "s/x"},
        "feature_specs": {
            "x": {
                "name": "x",
                "shape": [2, 3],
                "dtype": "float32",
                "device_hint": None,
                "required": True,
                "target_repr": "pruned_logits",
                "target_meta": {"vocab_map_version": "v1"},
            }
        },
        "strategy": "eagle3",
        "schema_version": 1,
        "target_model_version": "unknown",
        "draft_weight_version": None,
        "tokenizer_version": "unknown",
        "num_tokens": 12,
        "estimated_bytes": 24,
        "metadata": {"lr": 1e-05, "big": 2**70, "f": 1.5, "neg": -0.0, "list": [1, "a", None, True]},
    }
    r = ferry.SampleRef.from_dict(d)
    assert r.to_json("spaced") == json.dumps(d)
    assert r.to_json("compact") == json.dumps(d, separators=(",", ":"))
    assert r.to_dict() == d
    assert r.metadata["big"] == 2**70
    assert r.feature_specs["x"].target_repr == "pruned_logits"


def test_missing_defaults_and_unknown_keys():
    minimal = {
        "sample_id": "s0",
        "run_id": "r",
        "source_task_id": None,
        "feature_store_uri": "mem://a/s0",
        "feature_keys": {},
        "feature_specs": {},
        "strategy": "eagle3",
    }
    r = ferry.SampleRef.from_dict(minimal)
    assert r.schema_version == 1
    assert r.target_model_version == "unknown"
    assert r.num_tokens == 0
    with pytest.raises(ferry.JsonError, match="bogus"):
        ferry.SampleRef.from_dict({**minimal, "bogus": 1})
    with pytest.raises(ferry.JsonError):
        ferry.SampleRef.from_dict({"sample_id": "s0"})
    with pytest.raises(ValueError):
        ferry.SampleRef.from_dict([1, 2])
    with pytest.raises(ValueError):
        r.to_json("pretty")


def test_refs_pickle_and_compare(fixtures_dir):
    lines, _ = refs_jsonl(fixtures_dir)
    r0, r1 = ferry.SampleRef.from_json(lines[0]), ferry.SampleRef.from_json(lines[1])
    assert pickle.loads(pickle.dumps(r0)) == r0
    assert r0 != r1
    assert r0 == ferry.SampleRef.from_json(lines[3]), "the duplicate publication is the same ref"
    spec = r0.feature_specs["input_ids"]
    assert pickle.loads(pickle.dumps(spec)) == spec


def test_feature_spec_construction():
    spec = ferry.FeatureSpec("target", (1, 4, 8), "bfloat16", target_repr="hidden_state", target_meta={"v": 2})
    d = spec.to_dict()
    assert list(d) == ["name", "shape", "dtype", "device_hint", "required", "target_repr", "target_meta"]
    assert d["shape"] == [1, 4, 8]
    assert ferry.FeatureSpec.from_dict(d) == spec
    assert ferry.FeatureSpec.from_json(spec.to_json()) == spec
    assert spec.to_json("spaced") == json.dumps(d)
    with pytest.raises(ferry.InvalidArgumentError):
        ferry.FeatureSpec("t", (1,), "float32", target_repr="nonsense")
    odd = ferry.FeatureSpec("t", (2,), "complex64")
    assert odd.dtype == "complex64", "unknown dtypes are kept as written"
    with pytest.raises(ferry.UnknownDtypeError) as e:
        odd.nbytes
    assert isinstance(e.value, ValueError)


def test_feature_handle_dict_round_trip():
    h = ferry.FeatureHandle.from_dict({"sample_id": "s", "generation": 3, "lease_token": "s:3:1"})
    assert (h.sample_id, h.generation, h.lease_token) == ("s", 3, "s:3:1")
    assert h.to_dict() == {"sample_id": "s", "generation": 3, "lease_token": "s:3:1"}
    assert {h: 1}[ferry.FeatureHandle.from_dict(h.to_dict())] == 1


def read_safetensors(path) -> dict[str, tuple[str, list[int], bytes]]:
    """name -> (dtype, shape, bytes) of a safetensors file (the format is 8 + JSON + data)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    return {
        name: (meta["dtype"], meta["shape"], data[meta["data_offsets"][0] : meta["data_offsets"][1]])
        for name, meta in header.items()
        if name != "__metadata__"
    }


def offline_refs(fixtures_dir):
    text = (fixtures_dir / "specforge-control" / "offline-manifest.json").read_text()
    return [ferry.SampleRef.from_dict(d) for d in json.loads(text.replace("/FIXTURES", str(fixtures_dir)))["refs"]]


def test_offline_refs_read_specforge_files(fixtures_dir):
    """SpecForge's torch.save dumps, read through file:// refs: get (validated refs) and
    get_into with specs from describe (lazy refs) return the bytes torch wrote."""
    np = pytest.importorskip("numpy")
    store = ferry.open_store("mem://", bfloat16="uint16")
    refs = offline_refs(fixtures_dir)
    assert len(refs) == 4
    checked = 0
    for r in refs:
        path = r.feature_store_uri.removeprefix("file://")
        twin = fixtures_dir / "expected" / (path.removeprefix(str(fixtures_dir) + "/") + ".safetensors")
        with store.get(r) as lease:
            got = {name: lease[name] for name in r.feature_specs}
        assert got["hidden_state"].dtype == np.uint16  # bfloat16 bits
        lazy = ferry.SampleRef.from_dict({**r.to_dict(), "feature_specs": {}})
        specs = store.describe(lazy)
        out = {name: np.empty(spec.shape, dtype=np.uint16 if spec.dtype == "bfloat16" else spec.dtype) for name, spec in specs.items()}
        with store.get_into(lazy, out):
            pass
        for name, arr in got.items():
            assert specs[name] == r.feature_specs[name]
            assert out[name].tobytes() == arr.tobytes(), name
        if twin.exists():
            for name, (dtype, shape, data) in read_safetensors(twin).items():
                if name in got:
                    assert list(got[name].shape) == shape and got[name].tobytes() == data, (twin, name)
                    checked += 1
    assert checked > 0, "no safetensors twin was compared"
