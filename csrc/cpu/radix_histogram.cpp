// CPU kernel of sparse_ops::radix_histogram_cpu (schema in sparse_ops/ops/__init__.py; reference:
// sparse_ops.ops.reference.radix_histogram_ref).
//
// int64[257] histogram of the 8-bit digit `level` (0 = most significant) of the order keys of all
// tensors in xs (keys of |x| when absolute), counting only keys whose higher digits equal
// state[0] when level > 0; slot 256 counts NaN at level 0. Exact: per-thread int64 histograms
// merged at the end. The key transform and digit extraction are branch-free and vectorised
// (common.h radix_slots); only the counting is scalar.
#include <torch/library.h>

#include "common.h"

namespace sparse_ops {
namespace {

// Chunks of kChunk elements: slots computed by a vectorised, branch-free pass (radix_slots), then
// counted into the thread's private LocalHistogram; one merge per thread and tensor.
template <typename T, bool Absolute, bool Level0>
void histogram_chunks(const T* data, int64_t n, int shift, typename FloatBits<T>::U prefix,
                      HistogramMerger& merger) {
  at::parallel_for(0, n, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    LocalHistogram local;
    uint16_t slots[kChunk];
    run_vectorised([&] {
      for (int64_t i0 = begin; i0 < end; i0 += kChunk) {
        const int64_t len = std::min(kChunk, end - i0);
        radix_slots<T, Absolute, Level0>(data + i0, slots, len, shift, prefix);
        if (Level0) {
          local.add(slots, len);
        } else {
          local.add_skipping_discards(slots, len);
        }
      }
    });
    int64_t sum[kHistSlots];
    local.total(sum);
    if (!Level0) sum[kNanBin] = 0;  // the discard slot of keys outside the prefix
    merger.merge(sum);
  });
}

template <typename T>
void histogram_tensor(const T* data, int64_t n, int level, uint64_t prefix, bool absolute, HistogramMerger& merger) {
  using U = typename FloatBits<T>::U;
  constexpr int kBits = key_bits<T>();
  const int shift = kBits - kRadixBits * (level + 1);
  if (level > 0 && kBits - shift - kRadixBits < 64 && (prefix >> (kBits - shift - kRadixBits)) != 0) {
    return;  // the prefix has more bits than a key's higher digits: nothing matches
  }
  const U p = static_cast<U>(prefix);
  if (level == 0) {
    absolute ? histogram_chunks<T, true, true>(data, n, shift, p, merger)
             : histogram_chunks<T, false, true>(data, n, shift, p, merger);
  } else {
    absolute ? histogram_chunks<T, true, false>(data, n, shift, p, merger)
             : histogram_chunks<T, false, false>(data, n, shift, p, merger);
  }
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
