"""Loads the compiled extension sparse_ops._C if it was built; never fails at import."""

from __future__ import annotations

import functools
import glob
import os
import re
import warnings

import torch

# The op schemas' version (sparse_ops/ops/__init__.py defines the schemas): bump it together with
# csrc/cpu/schema_version.cpp whenever a schema changes, so a stale build is refused.
SCHEMA_VERSION = 7

_state = {"loaded": False, "error": None}


def built_schema_version(path: str) -> int | None:
    """The schema version stamped into a build (csrc/cpu/schema_version.cpp), read without loading it."""
    with open(path, "rb") as f:
        found = re.search(rb"sparse_ops_schema_version=(\d+);", f.read())
    return int(found.group(1)) if found else None


def load_extension() -> bool:
    """Load sparse_ops/_C*.so (it registers C++/CUDA kernels with the dispatcher). Warn once if it is
    absent or was built for other op schemas (a stale build: rerun scripts/setup.sh)."""
    if _state["loaded"] or _state["error"] is not None:
        return _state["loaded"]
    here = os.path.dirname(os.path.dirname(__file__))  # sparse_ops/, where the build puts _C*.so
    libs = sorted(glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "_C*.pyd")))
    try:
        if not libs:
            raise ImportError("sparse_ops._C was not built")
        version = built_schema_version(libs[0])
        if version != SCHEMA_VERSION:
            raise ImportError(f"{os.path.basename(libs[0])} implements schema version {version}, this "
                              f"sparse_ops defines {SCHEMA_VERSION}: rebuild it (bash scripts/setup.sh)")
        torch.ops.load_library(libs[0])
        _state["loaded"] = True
    except (ImportError, OSError, RuntimeError) as exc:
        _state["error"] = str(exc)
        if os.environ.get("SPARSE_OPS_QUIET") != "1":
            warnings.warn(f"sparse_ops: compiled kernels unavailable ({exc}); using the PyTorch reference on CPU",
                          RuntimeWarning, stacklevel=2)
    has_cpu_kernel.cache_clear()
    has_cuda_kernel.cache_clear()
    return _state["loaded"]


def extension_error() -> str | None:
    return _state["error"]


@functools.lru_cache(maxsize=None)
def has_cpu_kernel(qualname: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU")


@functools.lru_cache(maxsize=None)
def has_cuda_kernel(qualname: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA")
