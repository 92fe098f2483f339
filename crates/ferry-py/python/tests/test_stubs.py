"""The type stubs (`ferry/__init__.pyi`) say what the module really has: mypy's stubtest
compares every name, signature and `__all__` in the stub with the installed module (PyO3
classes and functions carry their runtime signatures). Skipped when mypy is not installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy", reason="mypy is not installed: the stub check is skipped")

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[3]


def test_stubs_match_the_runtime_module(tmp_path):
    config = tmp_path / "mypy.ini"
    # ferry._ferry (the native module) has no stub of its own: its public names are
    # re-exported and stubbed in ferry/__init__.pyi, which is what stubtest checks.
    # torch and numpy are only the stubs' argument types: not following into torch keeps the
    # check to seconds instead of analysing all of torch.
    config.write_text("[mypy]\nignore_missing_imports = True\n\n[mypy-torch.*]\nfollow_imports = skip\n")
    cache = REPO / "target" / "py-mypy-cache"
    proc = subprocess.run(
        [
            sys.executable, "-m", "mypy.stubtest", "ferry",
            "--mypy-config-file", str(config),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=dict(os.environ, MYPY_CACHE_DIR=str(cache)),
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "Success" in proc.stdout, proc.stdout
