#!/usr/bin/env bash
# Install the peers that `python benchmarks/bench_model.py --peers` times beside sparse_ops:
#  - onnx and onnxruntime into this environment (the ranges of pyproject.toml's [peers] extra);
#  - DeepSparse 1.8.0 into its own virtual environment (it needs Python <= 3.11 and numpy < 2; 1.9.0
#    is an empty stub), driven by the benchmark as a subprocess (benchmarks/_deepsparse_worker.py).
# Idempotent: what is already installed is left as it is.
#
#   SPARSE_OPS_DEEPSPARSE_VENV   where the DeepSparse environment lives
#                                (default ~/.cache/sparse_ops/deepsparse-venv; the benchmark reads it too)
#   DEEPSPARSE_PYTHON            the Python <= 3.11 to create it with (default: the first of
#                                python3.11, python3.10, python3.9 found)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${SPARSE_OPS_DEEPSPARSE_VENV:-$HOME/.cache/sparse_ops/deepsparse-venv}
export NM_DISABLE_ANALYTICS=1  # DeepSparse must not phone home, not even on import
pip_install() { local py=$1; shift; "$py" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import onnx, onnxruntime" 2>/dev/null; then
    pip_install "$PY" "onnx>=1.17,<2" "onnxruntime>=1.20,<2"  # keep in step with pyproject.toml [peers]
fi
"$PY" -c "import onnx, onnxruntime; print('ONNX Runtime ready:', onnxruntime.__version__, '| onnx', onnx.__version__)"

deepsparse_ready() {
    "$VENV/bin/python" -c "import deepsparse, numpy, sys; \
sys.exit(deepsparse.__version__ != '1.8.0' or int(numpy.__version__.split('.')[0]) >= 2)" 2>/dev/null
}
if ! deepsparse_ready; then
    BASE=${DEEPSPARSE_PYTHON:-}
    if [ -z "$BASE" ]; then
        for candidate in python3.11 python3.10 python3.9; do
            if command -v "$candidate" >/dev/null; then BASE=$candidate; break; fi
        done
    fi
    if [ -z "$BASE" ] || ! "$BASE" -c "import sys; sys.exit(sys.version_info[:2] > (3, 11))"; then
        echo "DeepSparse 1.8.0 needs Python <= 3.11, and none was found (set DEEPSPARSE_PYTHON);" \
             "bench_model.py --peers will report DeepSparse as skipped" >&2
        exit 1
    fi
    "$BASE" -m venv "$VENV"  # no --system-site-packages: this environment's numpy 2 must not leak in
    # deepsparse depends on neither torch nor CUDA; onnx here is what the worker reads input names with
    pip_install "$VENV/bin/python" "deepsparse==1.8.0" "numpy<2" onnx
fi
"$VENV/bin/python" -c "import deepsparse, numpy; \
print('DeepSparse ready:', deepsparse.__version__, '| numpy', numpy.__version__, '| in $VENV')"
