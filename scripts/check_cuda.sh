#!/usr/bin/env bash
# Compile check of the CUDA sources, for CI: needs nvcc (and, for the second step, a host C++
# compiler and an importable torch), never a GPU. Exits non-zero on the first failure.
#
#  1. every csrc/cuda/*.cu with plain nvcc for sm_80 and sm_90 (-O3, C++17): nvcc and host-compiler
#     warnings are errors, and so is any kernel that spills registers or uses local memory
#     (ptxas -warn-spills -warn-lmem-usage -Werror): a spill would be a performance bug;
#  2. the same sources to PTX with the flags torch's BuildExtension adds (no implicit half/bfloat16
#     conversions or operators, --expt-relaxed-constexpr), as setup.py compiles them;
#  3. every csrc/cuda/*.cpp (the torch bindings) syntax-checked by the host compiler against the
#     installed torch's headers and the CUDA headers, warnings as errors in our code. A CPU-only
#     torch wheel lacks the generated c10/cuda/impl/cuda_cmake_macros.h; it is then skipped with
#     C10_CUDA_NO_CMAKE_CONFIGURE_FILE (it only sets Windows export macros). Skipped with a message
#     when torch cannot be imported.
#
#   bash scripts/check_cuda.sh        NVCC, CXX, PYTHON override the tools; CUDA_ARCHS="80 90" the targets
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
CXX=${CXX:-g++}
PY=${PYTHON:-python3}
ARCHS=${CUDA_ARCHS:-"80 90"}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

gencode=()
for arch in $ARCHS; do gencode+=(-gencode "arch=compute_${arch},code=sm_${arch}"); done

shopt -s nullglob
cu_sources=(csrc/cuda/*.cu)
cpp_sources=(csrc/cuda/*.cpp)
if [ ${#cu_sources[@]} -eq 0 ]; then
    echo "check_cuda: no csrc/cuda/*.cu" >&2
    exit 1
fi

for src in "${cu_sources[@]}"; do
    echo "check_cuda: nvcc $src for sm_${ARCHS// /, sm_}"
    "$NVCC" -std=c++17 -O3 "${gencode[@]}" --threads 0 -Werror all-warnings \
        -Xcompiler -Wall,-Wextra,-Werror -Xptxas -warn-spills,-warn-lmem-usage,-Werror \
        -c "$src" -o "$tmp/$(basename "$src").o"
    echo "check_cuda: nvcc $src with torch extension flags"
    "$NVCC" -std=c++17 -O3 -arch=compute_90 -ptx -Werror all-warnings --expt-relaxed-constexpr \
        -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
        -D__CUDA_NO_HALF2_OPERATORS__ -Xcompiler -fPIC,-Wall,-Wextra,-Werror \
        "$src" -o "$tmp/$(basename "$src").ptx"
done

[ ${#cpp_sources[@]} -eq 0 ] && exit 0
if ! torch_includes=$("$PY" -c "import torch.utils.cpp_extension as c; print(*c.include_paths())" 2>/dev/null); then
    echo "check_cuda: torch cannot be imported by $PY; bindings not checked"
    exit 0
fi
# the CUDA headers nvcc itself uses
cuda_include=$("$NVCC" --dryrun -x cu -c /dev/null -o "$tmp/null.o" 2>&1 | sed -n 's/.*INCLUDES="-I\([^" ]*\).*/\1/p' | head -n 1)
if [ -z "$cuda_include" ] || [ ! -f "$cuda_include/cuda_runtime_api.h" ]; then
    echo "check_cuda: cannot locate the CUDA headers of $NVCC" >&2
    exit 1
fi
includes=(-isystem "$cuda_include")
macros=()
for dir in $torch_includes; do
    includes+=(-isystem "$dir")
    if [ -f "$dir/c10/cuda/CUDAMacros.h" ] && [ ! -f "$dir/c10/cuda/impl/cuda_cmake_macros.h" ]; then
        macros=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
    fi
done
for src in "${cpp_sources[@]}"; do
    echo "check_cuda: $CXX -fsyntax-only $src against torch $("$PY" -c 'import torch; print(torch.__version__)')"
    "$CXX" -std=c++17 -fsyntax-only -Wall -Wextra -Werror "${macros[@]}" "${includes[@]}" "$src"
done
echo "check_cuda: ok"
