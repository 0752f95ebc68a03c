// Host interface of the CUDA CSR linear kernel (csr_linear.cu), free of torch headers so that
// csr_linear.cu compiles with plain nvcc; csr_linear_binding.cpp wraps it as
// sparse_ops::csr_linear_cuda.
//
//   out[m, n] = round_T( sum_{p in row n} float(values[p]) * float(x[m, col[p]]) + float(bias[n]) )
//
// W (N x K) is given in CSR by rows: crow (N + 1, int32), col (nnz, int32), values (nnz, T), T one of
// float32/float16/bfloat16 for x, values, bias and out alike. Products and sums are float32 (fused
// multiply-add), the bias is added in float32 and the result is rounded once to T (round to nearest
// even). Row sums are reduced in a fixed order: results are deterministic, run to run.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace sparse_ops {
namespace cuda {

enum class CsrDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct CsrLinearArgs {
  CsrDType dtype;
  const void* x;          // (M, K) row-major, T
  const int32_t* crow;    // (N + 1): row n holds nonzeros crow[n] .. crow[n+1]-1, 0 <= col < K
  const int32_t* col;     // (nnz)
  const void* values;     // (nnz), T
  const void* bias;       // (N), T, or nullptr
  void* out;              // (M, N) row-major, T; every element is written
  void* workspace;        // csr_linear_workspace_bytes(dtype, M, K) bytes, 16-byte aligned
  int64_t M, K, N, nnz;
};

// Bytes of device scratch launch_csr_linear needs (0 for one token): the tokens of x regrouped
// as (ceil(M / tile), K, tile) with tile <= 16 tokens, so that one gather fetches x[:, col] for a
// whole tile.
size_t csr_linear_workspace_bytes(CsrDType dtype, int64_t M, int64_t K);

// Enqueues the kernels on `stream` (nothing when M or N is 0) and returns the launch status.
// The caller guarantees the CSR invariants above and that all pointers are device memory.
cudaError_t launch_csr_linear(const CsrLinearArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace sparse_ops
