// CPU kernel of sparse_ops::mgp_prior_grad_cpu (schema in sparse_ops/ops/__init__.py; reference:
// sparse_ops.ops.reference.mgp_prior_grad_ref).
//
// out = scale·θ·(p0/v0 + (1−p0)/v1), p0 = 1/(1+exp(c2θ²+c1)); constants in double on the host,
// per-element math in float32 (float64 for float64 input), stored in w.dtype. Returns a new
// contiguous tensor; w may have any shape and strides. The float32 loop vectorises (exp_fast in
// common.h: within about 1 ulp of expf, so results agree with the reference to a few ulps).
#include <torch/library.h>

#include "common.h"

namespace sparse_ops {
namespace {

template <typename T>
void prior_grad_pass(const T* __restrict__ x, T* __restrict__ y, int64_t n, Prior<compute_t<T>> prior) {
  for (int64_t i = 0; i < n; ++i) store_value(y + i, prior_grad<compute_t<T>>(load_value(x + i), prior));
}

template <typename T>
void mgp_prior_grad_kernel(const T* in, T* out, int64_t n, const Prior<compute_t<T>>& prior) {
  at::parallel_for(0, n, at::internal::GRAIN_SIZE / 8, [&](int64_t begin, int64_t end) {
    run_vectorised([&] { prior_grad_pass<T>(in + begin, out + begin, end - begin, prior); });
  });
}

at::Tensor mgp_prior_grad_cpu(const at::Tensor& w, double lam, double var0, double var1, double scale) {
  check_cpu(w, "w");
  check_float(w, "w");
  TORCH_CHECK(lam > 0.0 && lam < 1.0, "lam must lie in (0, 1), got ", lam);
  TORCH_CHECK(var0 > 0.0 && var1 > var0, "var0 and var1 must satisfy 0 < var0 < var1, got var0=", var0,
              ", var1=", var1);
  const at::Tensor input = w.contiguous();
  at::Tensor out = at::empty(w.sizes(), w.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "mgp_prior_grad_cpu", [&] {
    using C = compute_t<scalar_t>;
    mgp_prior_grad_kernel<scalar_t>(input.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                    input.numel(), make_prior<C>(lam, var0, var1, scale));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_ops, CPU, m) {
  m.impl("mgp_prior_grad_cpu", &mgp_prior_grad_cpu);
}

}  // namespace sparse_ops
