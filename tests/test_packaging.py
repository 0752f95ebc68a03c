"""A regular (non-editable) install carries the Triton kernels as sparse_ops.kernels: setup.py's
build_py (the step of `pip install .` that copies the Python files) is run into a temporary folder,
which is then imported from another directory, so neither the checkout nor an editable install can
stand in for it."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_a_regular_install_has_sparse_ops_kernels_and_no_top_level_kernels(tmp_path):
    pytest.importorskip("triton")
    lib = tmp_path / "lib"
    built = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300, check=False)
    assert built.returncode == 0, built.stderr[-3000:]
    kernels = lib / "sparse_ops" / "kernels"
    assert kernels.is_dir() and not kernels.is_symlink()
    assert {p.name for p in kernels.glob("*.py")} == {p.name for p in (ROOT / "kernels").glob("*.py")}
    assert not (lib / "kernels").exists()

    code = ("import sparse_ops.kernels.bsr_linear as m, sparse_ops; "
            "print(m.__file__); print(sparse_ops.__file__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(lib), "PATH": ""},
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [str(kernels / "bsr_linear.py"), str(lib / "sparse_ops" / "__init__.py")]
