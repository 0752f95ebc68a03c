// CUDA launcher of csr_linear (interface: csr_linear.cuh; kernels and plan: csr_linear_kernels.cuh).
// Plain CUDA C++, no torch: scripts/check_cuda.sh compiles it with nvcc alone.
#include "csr_linear.cuh"
#include "csr_linear_kernels.cuh"

namespace sparse_ops {
namespace cuda {
namespace {

struct StreamLauncher {
  cudaStream_t stream;

  template <typename Params>
  cudaError_t operator()(void (*kernel)(Params), int64_t blocks, int threads, const Params& params) const {
    kernel<<<static_cast<unsigned>(blocks), static_cast<unsigned>(threads), 0, stream>>>(params);
    return cudaGetLastError();
  }
};

}  // namespace

size_t csr_linear_workspace_bytes(CsrDType dtype, int64_t M, int64_t K) {
  return csr::workspace_bytes(dtype, M, K);
}

cudaError_t launch_csr_linear(const CsrLinearArgs& args, cudaStream_t stream) {
  if (args.M <= 0 || args.N <= 0) return cudaSuccess;
  return csr::run_csr_linear(args, csr::make_plan(args), StreamLauncher{stream});
}

}  // namespace cuda
}  // namespace sparse_ops
