#!/usr/bin/env bash
# Runs the CUDA csr_linear tests (tests/ops/test_csr_linear_cuda.py) under compute-sanitizer, on a
# machine with a GPU and the extension built with CUDA (bash scripts/setup.sh). Any out-of-bounds or
# misaligned device access, or a CUDA API error, fails the run (exit status 1).
#
#   bash scripts/sanitize_cuda.sh [pytest args]     SANITIZER_TOOL=memcheck (default), initcheck, ...
#
# PyTorch's caching allocator is switched off (PYTORCH_NO_CUDA_MEMORY_CACHING=1) so that every
# tensor is its own allocation and an access past a tensor's end is reported, not hidden inside a
# larger cached block. SPARSE_OPS_REQUIRE_EXT=1 makes the tests fail, not skip, without the kernel.
set -euo pipefail
cd "$(dirname "$0")/.."
sanitizer=$(command -v compute-sanitizer || true)
if [ -z "$sanitizer" ]; then
    for dir in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
        if [ -n "$dir" ] && [ -x "$dir/bin/compute-sanitizer" ]; then sanitizer="$dir/bin/compute-sanitizer"; break; fi
    done
fi
if [ -z "$sanitizer" ]; then
    echo "sanitize_cuda: compute-sanitizer not found (PATH, CUDA_HOME/bin, /usr/local/cuda/bin)" >&2
    exit 2
fi
export PYTORCH_NO_CUDA_MEMORY_CACHING=1 SPARSE_OPS_REQUIRE_EXT=1
exec "$sanitizer" --tool "${SANITIZER_TOOL:-memcheck}" --error-exitcode 1 --target-processes all \
    "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider tests/ops/test_csr_linear_cuda.py "$@"
