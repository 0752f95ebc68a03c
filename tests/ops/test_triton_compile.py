"""Every Triton kernel of kernels/ compiles for sm_80 and sm_90 without a GPU (the quick grid of
scripts/check_triton.py, one specialisation per kernel; CI also runs the full grid under both Triton
versions through scripts/check_triton.sh), and the check covers every @triton.jit kernel there is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]


def jit_kernels() -> set[str]:
    """Names of the launchable kernels: `def _<name>_kernel` under @triton.jit in kernels/*.py."""
    names = set()
    for path in (ROOT / "kernels").glob("*.py"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith("def _") and "_kernel(" in line and lines[i - 1].startswith("@triton.jit"):
                names.add(line.split("(")[0][4:])
    return names


def test_every_kernel_compiles_for_sm80_and_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_triton.py"), "--quick", "--jobs", "1",
                          "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads((tmp_path / f"triton_{triton.__version__}_quick.json").read_text())["rows"]
    assert {r["kernel"] for r in rows} == jit_kernels()  # a new kernel must join the check
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    for r in rows:
        assert r["ok"] and r["registers"] > 0 and r["spill_stores"] == 0, r
