"""Build of sparse_ops with its compiled extension sparse_ops._C (torch.utils.cpp_extension + ninja).

    pip install -e . --no-build-isolation      # development: the .so lands in sparse_ops/
    pip install . --no-build-isolation

--no-build-isolation: the extension compiles against the torch already installed (its headers and
ABI); an isolated build would download a different torch. Sources:

* csrc/cpu/*.cpp: always (-O3, OpenMP so at::parallel_for runs in parallel, no FMA contraction so
  float results match PyTorch's separately rounded ops). The sources are C++17; the -std flag is
  left to torch's BuildExtension, which adds the standard its own headers need (c++20 on torch
  2.13, whose headers warn under c++17);
* csrc/cuda/*.cu (kernels, plain CUDA C++) and csrc/cuda/*.cpp (their torch bindings): only when
  this torch was built with CUDA and nvcc exists under CUDA_HOME. The target architectures come
  from TORCH_CUDA_ARCH_LIST (default below), never from the GPU present.
  SPARSE_OPS_BUILD_CUDA=0 skips them. scripts/check_cuda.sh compile-checks them without torch/GPU.

Nothing here probes hardware or the network. The .so only registers kernels with the dispatcher
(TORCH_LIBRARY_IMPL); sparse_ops/ops/_extension.py loads it with torch.ops.load_library.
"""

from __future__ import annotations

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import (
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"  # A100, A10/3090, L4/4090, H100 (+PTX for newer)


def _sources(pattern: str) -> list[str]:
    # setuptools wants paths relative to setup.py
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _nvcc_available() -> bool:
    return CUDA_HOME is not None and os.path.isfile(os.path.join(CUDA_HOME, "bin", "nvcc"))


def _extension():
    cpu_sources = _sources("csrc/cpu/*.cpp")
    cuda_sources = _sources("csrc/cuda/*.cu")  # csrc/cuda/emulation/ is test-only: not globbed
    cuda_bindings = _sources("csrc/cuda/*.cpp")
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    link_flags = ["-fopenmp"]
    build_cuda = (
        bool(torch.version.cuda)
        and _nvcc_available()
        and bool(cuda_sources)
        and os.environ.get("SPARSE_OPS_BUILD_CUDA", "1") != "0"
    )
    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        return CUDAExtension(
            "sparse_ops._C",
            cpu_sources + cuda_sources + cuda_bindings,
            define_macros=[("SPARSE_OPS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags,
                                "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link_flags,
        )
    return CppExtension("sparse_ops._C", cpu_sources, extra_compile_args={"cxx": cxx_flags},
                        extra_link_args=link_flags)


def _packages() -> list[str]:
    """sparse_ops and its subpackages, plus the top-level kernels/ installed as sparse_ops.kernels."""
    packages = find_packages(ROOT, include=["sparse_ops", "sparse_ops.*"])
    packages.append("sparse_ops.kernels")
    if os.path.isdir(os.path.join(ROOT, "kernels")):
        packages += [f"sparse_ops.kernels.{p}" for p in find_packages(os.path.join(ROOT, "kernels"))]
    return packages


setup(
    packages=_packages(),
    package_dir={"sparse_ops.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
