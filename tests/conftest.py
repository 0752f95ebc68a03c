"""Test setup: the Triton interpreter is switched on before any kernel module is imported, so the
Triton kernels also run (slowly, program by program) on CPU tensors. Keep their grids small.
Format choices of export(format="auto") are cached in a temporary folder, never in ~/.cache."""

import importlib
import os
import pkgutil
import subprocess
import sys
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("SPARSE_OPS_AUTOTUNE", "0")  # on CUDA: no timing of configurations (each is tested on its own)
os.environ["SPARSE_OPS_CACHE_DIR"] = tempfile.mkdtemp(prefix="sparse_ops_test_cache_")

import pytest
import torch

import sparse_ops  # noqa: F401  (registers the ops)
from sparse_ops.sparse.linear import FORMAT_CACHE

# tests/ mirrors sparse_ops/ by folder. Test modules import helpers by module name across folders
# (test_hf takes test_pruner's tiny BERT), so every test folder is on the path, here and in the fresh
# processes tests start.
_HERE = os.path.dirname(os.path.abspath(__file__))
TEST_DIRS = [_HERE] + sorted(entry.path for entry in os.scandir(_HERE)
                             if entry.is_dir() and not entry.name.startswith(("_", ".")))
sys.path.extend(d for d in TEST_DIRS if d not in sys.path)

MOVEMENT = ("movement", "soft_movement")


def op_flags(method: str) -> dict:
    """What sparse_ops/pruning/<method>.py passes fused_prune_step: keys from the scores (the movement
    methods) and a strict threshold (soft movement)."""
    return {"keys_from_scores": method in MOVEMENT, "strict_threshold": method == "soft_movement"}


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def triton_kernels():
    """sparse_ops.kernels with every kernel module imported, or skip when Triton itself is missing (a
    platform without wheels). A kernel module that fails to import fails the test."""
    pytest.importorskip("triton")
    import sparse_ops.kernels as kernels

    for module in pkgutil.iter_modules(kernels.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"sparse_ops.kernels.{module.name}")
    return kernels


def triton_device(device: str) -> str:
    """Triton launchers run on CUDA, or on CPU under the interpreter."""
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    return device


@pytest.fixture(autouse=True)
def private_format_cache(monkeypatch, tmp_path):
    """format="auto" decisions of one test neither leak into another nor reach ~/.cache."""
    monkeypatch.setenv("SPARSE_OPS_CACHE_DIR", str(tmp_path / "format_cache"))
    FORMAT_CACHE.clear()
    yield
    FORMAT_CACHE.clear()


def run_in_fresh_process(script: str, **env: str) -> None:
    """Run `script` in a fresh interpreter with `env` added to the environment (the C++ kernels read
    their ISA switches once per process) and the test folders on the path; it must print "ok"."""
    env = dict(os.environ, **env, PYTHONPATH=os.pathsep.join([*TEST_DIRS, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def run_with_cpu_baseline(script: str) -> None:
    """`script` with SPARSE_OPS_CPU_BASELINE=1: the C++ loops used on CPUs without AVX2/FMA."""
    run_in_fresh_process(script, SPARSE_OPS_CPU_BASELINE="1")
