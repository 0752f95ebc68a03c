// CUDA implementation of sparse_ops::csr_linear_cuda (schema in sparse_ops/ops/__init__.py; reference:
// sparse_ops.ops.reference.csr_linear_ref): y = x @ W^T + bias with W (out_features x K) in CSR by rows.
//
// x: 2-D contiguous (M, K) CUDA tensor, float32/float16/bfloat16. crow_indices: int32
// (out_features + 1,), col_indices: int32 (nnz,), values: (nnz,) of x's dtype, bias: (out_features,)
// of x's dtype or None, all contiguous and on x's device. Returns a new (M, out_features) tensor of
// x's dtype: float32 products and sums, bias added in float32, rounded once (csr_linear.cuh). The
// CSR contents (monotone crow, crow[-1] == nnz, 0 <= col < K) are the caller's to guarantee
// (SparseLinear validates them once, sparse_ops.sparse.formats.check_compressed): this function checks
// only what it can see without reading device memory, and bad indices would read out of bounds.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>

#include "csr_linear.cuh"

namespace sparse_ops {
namespace {

using cuda::CsrDType;

CsrDType csr_dtype(const at::Tensor& x) {
  const at::ScalarType s = x.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16,
              "x must have dtype float32, float16 or bfloat16, got ", s);
  return s == at::kFloat ? CsrDType::kFloat32 : s == at::kHalf ? CsrDType::kFloat16 : CsrDType::kBFloat16;
}

void check_operand(const at::Tensor& t, const char* name, const at::Tensor& x, at::ScalarType dtype, int64_t numel) {
  TORCH_CHECK(t.device() == x.device(), name, " must be on ", x.device(), " like x, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1, name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(numel < 0 || t.numel() == numel, name, " must have ", numel, " elements, got ", t.numel());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

at::Tensor csr_linear_cuda(const at::Tensor& x, const at::Tensor& crow_indices, const at::Tensor& col_indices,
                           const at::Tensor& values, const std::optional<at::Tensor>& bias, int64_t out_features) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got ", x.device());
  const CsrDType dtype = csr_dtype(x);
  TORCH_CHECK(x.dim() == 2, "x must be 2-D (tokens, in_features), got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
  TORCH_CHECK(out_features >= 0, "out_features must be >= 0, got ", out_features);
  TORCH_CHECK(x.size(1) <= std::numeric_limits<int32_t>::max(), "in_features must fit in int32, got ", x.size(1));
  check_operand(crow_indices, "crow_indices", x, at::kInt, out_features + 1);
  check_operand(col_indices, "col_indices", x, at::kInt, -1);
  TORCH_CHECK(col_indices.numel() <= std::numeric_limits<int32_t>::max(),
              "col_indices must have at most 2^31 - 1 elements (int32 crow_indices), got ", col_indices.numel());
  check_operand(values, "values", x, x.scalar_type(), col_indices.numel());
  if (bias.has_value()) check_operand(*bias, "bias", x, x.scalar_type(), out_features);

  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor out = at::empty({M, out_features}, x.options());
  if (M == 0 || out_features == 0) return out;
  const size_t workspace_bytes = cuda::csr_linear_workspace_bytes(dtype, M, K);
  // at::empty on CUDA is at least 256-byte aligned, as the kernels' 16-byte loads need
  const at::Tensor workspace =
      at::empty({static_cast<int64_t>(workspace_bytes)}, x.options().dtype(at::kByte));
  cuda::CsrLinearArgs args;
  args.dtype = dtype;
  args.x = x.const_data_ptr();
  args.crow = crow_indices.const_data_ptr<int32_t>();
  args.col = col_indices.const_data_ptr<int32_t>();
  args.values = values.const_data_ptr();
  args.bias = bias.has_value() ? bias->const_data_ptr() : nullptr;
  args.out = out.mutable_data_ptr();
  args.workspace = workspace_bytes > 0 ? workspace.mutable_data_ptr() : nullptr;
  args.M = M;
  args.K = K;
  args.N = out_features;
  args.nnz = col_indices.numel();
  C10_CUDA_CHECK(cuda::launch_csr_linear(args, c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_ops, CUDA, m) {
  m.impl("csr_linear_cuda", &csr_linear_cuda);
}

}  // namespace sparse_ops
