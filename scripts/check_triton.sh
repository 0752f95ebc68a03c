#!/usr/bin/env bash
# Compile every Triton kernel of kernels/ for sm_80 and sm_90 without a GPU (scripts/check_triton.py:
# registers, spills, shared memory; fails on a compile error, too much shared memory, or spills in
# an autotuner configuration), under the installed Triton and under Triton 3.6.0, the GPU image's,
# in a side virtual environment created once and cached (scripts/overlay_venv.sh: it sees this
# environment's torch and sparse_ops, whether this Python is a venv or not).
#
#   bash scripts/check_triton.sh [--quick] [--jobs N]
#   SPARSE_OPS_TRITON_VENV   where the Triton 3.6.0 environment lives
#                            (default ~/.cache/sparse_ops/triton-3.6.0-venv)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${SPARSE_OPS_TRITON_VENV:-$HOME/.cache/sparse_ops/triton-3.6.0-venv}

status=0
"$PY" scripts/check_triton.py "$@" || status=1
TRITON_36=$(PYTHON="$PY" bash scripts/overlay_venv.sh "$VENV" "triton==3.6.0")
"$TRITON_36" scripts/check_triton.py "$@" || status=1
exit $status
