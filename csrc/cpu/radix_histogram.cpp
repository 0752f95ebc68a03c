// CPU kernel of sparse_ops::radix_histogram_cpu (schema in sparse_ops/ops.py; reference:
// sparse_ops.reference.radix_histogram_ref).
//
// int64[257] histogram of the 8-bit digit `level` (0 = most significant) of the order keys of all
// tensors in xs (keys of |x| when absolute), counting only keys whose higher digits equal
// state[0] when level > 0; slot 256 counts NaN at level 0. Exact: per-thread int64 histograms
// merged at the end.
#include <torch/library.h>

#include "common.h"

namespace sparse_ops {
namespace {

template <typename T>
void histogram_tensor(const T* data, int64_t n, int level, uint64_t prefix, bool absolute,
                      HistogramMerger& merger) {
  at::parallel_for(0, n, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    // 4 interleaved copies: consecutive keys often share a digit, and one counter would serialise
    // the increments on store-to-load latency.
    int64_t local[4][kHistSlots] = {};
    int64_t i = begin;
    for (; i + 4 <= end; i += 4) {
      for (int j = 0; j < 4; ++j) histogram_add<T>(data[i + j], level, prefix, absolute, local[j]);
    }
    for (; i < end; ++i) histogram_add<T>(data[i], level, prefix, absolute, local[0]);
    for (int j = 1; j < 4; ++j) {
      for (int b = 0; b < kHistSlots; ++b) local[0][b] += local[j][b];
    }
    merger.merge(local[0]);
  });
}

at::Tensor radix_histogram_cpu(at::TensorList xs, const at::Tensor& state, int64_t level, bool absolute) {
  TORCH_CHECK(!xs.empty(), "xs must be a non-empty list of tensors");
  const at::ScalarType dtype = xs[0].scalar_type();
  for (size_t i = 0; i < xs.size(); ++i) {
    const std::string name = "xs[" + std::to_string(i) + "]";
    check_cpu(xs[i], name.c_str());
    check_float(xs[i], name.c_str());
    TORCH_CHECK(xs[i].scalar_type() == dtype, name, " has dtype ", xs[i].scalar_type(), " but xs[0] has ",
                dtype, "; all must match");
  }
  check_cpu(state, "state");
  TORCH_CHECK(state.scalar_type() == at::kLong && state.numel() == 2,
              "state must be an int64 tensor of 2 elements, got ", state.scalar_type(), " ", state.sizes());
  const int levels = static_cast<int>(c10::elementSize(dtype)) * 8 / kRadixBits;
  TORCH_CHECK(level >= 0 && level < levels, "level must lie in [0, ", levels, ") for ", dtype, ", got ", level);
  const uint64_t prefix = static_cast<uint64_t>(state.reshape(-1)[0].item<int64_t>());

  HistogramMerger merger;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "radix_histogram_cpu", [&] {
    for (const at::Tensor& x : xs) {
      const at::Tensor flat = x.contiguous();
      histogram_tensor<scalar_t>(flat.const_data_ptr<scalar_t>(), flat.numel(), static_cast<int>(level), prefix,
                                 absolute, merger);
    }
  });
  at::Tensor hist = at::empty({kHistSlots}, state.options());
  std::memcpy(hist.mutable_data_ptr<int64_t>(), merger.total, sizeof(merger.total));
  return hist;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_ops, CPU, m) {
  m.impl("radix_histogram_cpu", &radix_histogram_cpu);
}

}  // namespace sparse_ops
