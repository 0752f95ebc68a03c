"""Nothing in the repository hides a dependency for code run from its root (where `python -m` and
`python -c` put the current directory first on sys.path), and sparse_ops says so at import when
something else does. Each case runs in a fresh interpreter with the directory under test as cwd."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_python(code: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    """`python -c code` in cwd: sys.path[0] is cwd, as under `python -m`."""
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          check=False)


def test_transformers_models_import_from_the_repository_root():
    pytest.importorskip("transformers")
    code = """
import importlib.metadata, pathlib, sys
assert sys.path[0] == "", sys.path[0]
from transformers import BertModel, LlamaForCausalLM
from transformers.models.bert import modeling_bert
from transformers.models.llama import modeling_llama
try:
    importlib.metadata.distribution("kernels")
except importlib.metadata.PackageNotFoundError:
    print("kernels: not installed")
else:
    import kernels
    parts = pathlib.Path(kernels.__file__).resolve().parts
    assert "site-packages" in parts or "dist-packages" in parts, kernels.__file__
    print("kernels:", kernels.__file__)
print("ok")
"""
    done = run_python(code, ROOT)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_the_kernels_folder_is_no_top_level_package():
    """kernels/ has no __init__.py; where nothing else is named `kernels` it is at most an empty namespace
    package, and its modules refuse to load under that name."""
    done = run_python("import kernels._runtime", ROOT)
    assert done.returncode != 0
    hf_kernels_installed = "site-packages" in run_python("import kernels; print(kernels.__file__)", ROOT).stdout
    expected = "No module named 'kernels._runtime'" if hf_kernels_installed else "imported as sparse_ops.kernels"
    assert expected in done.stderr, done.stderr[-2000:]
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_sparse_ops_kernels_is_the_import_path():
    pytest.importorskip("triton")
    done = run_python("import sparse_ops.kernels.bsr_linear as m; print(m.__name__)", ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "sparse_ops.kernels.bsr_linear", done.stderr[-2000:]


def test_a_shadowed_dependency_is_named_with_both_places(tmp_path):
    (tmp_path / "safetensors").mkdir()
    (tmp_path / "safetensors" / "__init__.py").write_text("")
    done = run_python("import sparse_ops", tmp_path)
    assert done.returncode != 0
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("ImportError: sparse_ops cannot use its dependencies"), message
    assert str(tmp_path / "safetensors" / "__init__.py") in message
    import safetensors  # the real one, from this process

    assert pathlib.Path(safetensors.__file__).parent.name in message and "installed safetensors" in message


def test_a_folder_without_init_shadows_nothing(tmp_path):
    (tmp_path / "safetensors").mkdir()  # a namespace portion ranks below the installed package
    (tmp_path / "torch.txt").write_text("")
    done = run_python("import sparse_ops, safetensors; print(safetensors.__file__)", tmp_path)
    assert done.returncode == 0 and "site-packages" in done.stdout, done.stderr[-2000:]
