"""The get benchmark (`benches/bench_get.py`) runs in a tiny mode so it cannot rot: every row is
measured, the JSON has its keys, and SpecForge is either measured or visibly skipped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benches" / "bench_get.py"


def test_bench_get_tiny_mode_runs_every_row():
    out = subprocess.run(
        [sys.executable, str(BENCH), "--size-mib", "1", "--iters", "2", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(out.stdout)
    assert result["size_bytes"] == 1 << 20 and result["iters"] == 2
    assert result["memcpy"]["gb_per_s"] > 0
    names = [row["name"] for row in result["rows"]]
    for path in ("mem://", "daemon (unix, shm)", "python backend (memmove)"):
        assert f"{path} get" in names and f"{path} get_into" in names, names
    for row in result["rows"]:
        assert row["median_s"] > 0 and row["vs_memcpy"] > 0, row
    # The real Mooncake client's rows, or the visible reason they are missing.
    mooncake = "mooncake (real client, tcp)"
    assert "mooncake_skipped" in result or (
        f"{mooncake} get" in names
        and f"{mooncake} get_into" in names
        and "mooncake client's own get_into (no ferry)" in names
    ), names
    specforge = result["specforge"]
    if "skipped" not in specforge:
        for key in ("specforge_round_trip", "ferry_dir_round_trip", "specforge_get", "ferry_dir_get"):
            assert specforge[key]["median_s"] > 0 and specforge[key]["vs_memcpy"] > 0, key
        assert specforge["ferry_round_trip_speedup"] > 0 and specforge["ferry_get_speedup"] > 0


def test_bench_get_table():
    out = subprocess.run(
        [sys.executable, str(BENCH), "--size-mib", "0.25", "--iters", "1", "--no-daemon"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "numpy memcpy" in out.stdout and "vs memcpy" in out.stdout
    assert "SharedDirFeatureStore" in out.stdout
