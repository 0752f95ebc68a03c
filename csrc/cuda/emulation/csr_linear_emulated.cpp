// The CSR linear kernels of csr_linear_kernels.cuh, run on the CPU by warp_emulator.h, behind a C
// interface that tests/test_cuda_build.py loads with ctypes. Host pointers replace device pointers;
// the plan is make_plan's unless the caller forces the lane-group size or scalar loads.
#include "warp_emulator.h"  // first: defines the CUDA built-ins the kernels use

#include "../csr_linear_kernels.cuh"

namespace csr = sparse_ops::cuda::csr;
using sparse_ops::cuda::CsrDType;
using sparse_ops::cuda::CsrLinearArgs;

extern "C" {

size_t sparse_ops_emulated_workspace_bytes(int dtype, int64_t M, int64_t K) {
  return csr::workspace_bytes(static_cast<CsrDType>(dtype), M, K);
}

// Fills plan[0..3] with make_plan's tile, group, tiles and vector_loads for these arguments.
void sparse_ops_emulated_plan(int dtype, const int32_t* col, const void* values, int64_t M, int64_t N,
                              int64_t nnz, int64_t* plan) {
  CsrLinearArgs args{};
  args.dtype = static_cast<CsrDType>(dtype);
  args.col = col;
  args.values = values;
  args.M = M;
  args.N = N;
  args.nnz = nnz;
  const csr::CsrLinearPlan p = csr::make_plan(args);
  plan[0] = p.tile;
  plan[1] = p.group;
  plan[2] = p.tiles;
  plan[3] = p.vector_loads ? 1 : 0;
}

// Runs csr_linear like launch_csr_linear (csr_linear.cuh) on host memory. group > 0 forces the
// lanes per row; scalar_loads != 0 forces the scalar path. Returns 0, or 1 with a message in
// `error` (emulator checks: shuffles, alignment, reads outside the inputs).
int sparse_ops_emulated_csr_linear(int dtype, const void* x, const int32_t* crow, const int32_t* col,
                                   const void* values, const void* bias, void* out, void* workspace, int64_t M,
                                   int64_t K, int64_t N, int64_t nnz, int group, int scalar_loads, char* error,
                                   size_t error_bytes) {
  CsrLinearArgs args{static_cast<CsrDType>(dtype), x, crow, col, values, bias, out, workspace, M, K, N, nnz};
  emu::Emulator& e = emu::Emulator::get();
  e.reset();
  const size_t item = csr::dtype_bytes(args.dtype);
  e.allow_reads(x, static_cast<size_t>(M * K) * item);
  e.allow_reads(crow, static_cast<size_t>(N + 1) * sizeof(int32_t));
  e.allow_reads(col, static_cast<size_t>(nnz) * sizeof(int32_t));
  e.allow_reads(values, static_cast<size_t>(nnz) * item);
  if (bias != nullptr) e.allow_reads(bias, static_cast<size_t>(N) * item);
  e.allow_reads(workspace, csr::workspace_bytes(args.dtype, M, K));
  if (M > 0 && N > 0) {
    csr::CsrLinearPlan plan = csr::make_plan(args);
    if (group > 0) plan.group = group;
    if (scalar_loads != 0) plan.vector_loads = false;
    if (csr::run_csr_linear(args, plan, emu::Launcher{}) != cudaSuccess && e.error().empty()) {
      e.fail("launch failed");
    }
  }
  if (e.error().empty()) return 0;
  std::snprintf(error, error_bytes, "%s", e.error().c_str());
  return 1;
}

}  // extern "C"
