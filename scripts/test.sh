#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite. Triton kernels run under the
# interpreter on CPU; CUDA tests run where a GPU is present and skip elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TRITON_INTERPRET=1
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider tests "$@"
