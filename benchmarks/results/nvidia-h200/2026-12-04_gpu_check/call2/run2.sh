#!/usr/bin/env bash
# second device call: build, find the crash, then the GPU tests untimed-autotune, memcheck without the crasher
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
L=$OUT/log.txt
s=$(date +%s); t() { echo "[$(( $(date +%s) - s )) s] $*" | tee -a $L; }
t build; TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 setup.py -q build_ext --inplace > $OUT/build.log 2>&1; t "build rc=$?"
i=0
while [ $i -lt 13 ]; do
  python3 .gpu_tmp/probe_errors.py $i > /tmp/p.log 2>&1; rc=$?
  grep -E "^CASE|DONE" /tmp/p.log | tee -a $L
  grep -q DONE /tmp/p.log && break
  last=$(grep -o "^CASE [0-9]*" /tmp/p.log | tail -1 | cut -d' ' -f2); t "crashed rc=$rc at case $last"
  grep -A3 "Fatal Python" /tmp/p.log | head -4 >> $L
  i=$(( ${last:-99} + 1 ))
done
t gpu_tests
timeout 150 env SPARSE_OPS_REQUIRE_EXT=1 TRITON_INTERPRET=0 python3 -X faulthandler -m pytest -q -p no:cacheprovider -k "cuda and not rejects_bad" --durations=15 tests/test_bsr_linear.py tests/test_csr_linear_cuda.py tests/test_fused_prune_step.py tests/test_kthvalue.py tests/test_mgp_prior_grad.py tests/test_two_four_format.py tests/test_sparse_linear_module.py tests/test_export.py > $OUT/gpu_tests.log 2>&1
t "gpu_tests rc=$?"; tail -25 $OUT/gpu_tests.log | tee -a $L
t memcheck
timeout 60 env SANITIZER_TOOL=memcheck bash scripts/sanitize_cuda.sh -x -k "not rejects_bad" > $OUT/memcheck.log 2>&1
t "memcheck rc=$?"; tail -4 $OUT/memcheck.log | tee -a $L
