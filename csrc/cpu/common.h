// Helpers shared by the CPU kernels of sparse_ops (csrc/cpu/*.cpp).
//
// Numerics follow sparse_ops/reference.py bit for bit where the reference is exact:
//  * compute type: float32 for fp16/bf16/fp32 inputs, float64 for fp64 inputs (compute_t);
//  * every arithmetic step is rounded separately (setup.py compiles with -ffp-contract=off, so
//    a*b+c is never fused into an FMA that PyTorch's separate tensor ops would not perform);
//  * conversions to fp16/bf16 go through float, as c10::convert and Tensor.copy_ do.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <type_traits>

namespace sparse_ops {

constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;  // digit slots
constexpr int kNanBin = kRadixBins;          // slot counting NaN (level 0 only)
constexpr int kHistSlots = kRadixBins + 1;

// float32 math for fp16/bf16/fp32, float64 math for fp64.
template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Round `v` to T the way PyTorch does (fp16/bf16 via float: double -> float -> half).
template <typename T, typename From>
inline T to(From v) {
  if constexpr (std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>) {
    return T(static_cast<float>(v));
  } else {
    return static_cast<T>(v);
  }
}

// Raw bit pattern of a float type and the bits of +inf (anything above, sign cleared, is NaN).
template <typename T> struct FloatBits;
template <> struct FloatBits<float> {
  using U = uint32_t;
  static constexpr U kInf = 0x7F800000u;
};
template <> struct FloatBits<double> {
  using U = uint64_t;
  static constexpr U kInf = 0x7FF0000000000000ull;
};
template <> struct FloatBits<c10::Half> {
  using U = uint16_t;
  static constexpr U kInf = 0x7C00u;
};
template <> struct FloatBits<c10::BFloat16> {
  using U = uint16_t;
  static constexpr U kInf = 0x7F80u;
};

template <typename T>
constexpr int key_bits() {
  return 8 * static_cast<int>(sizeof(typename FloatBits<T>::U));
}

// One histogram update for value `v` (reference.order_keys + radix_histogram_ref):
// key = sign-flip transform of the bits (canonical +0; of |v| when absolute); NaN goes to slot 256
// at level 0 and nowhere at deeper levels; at level > 0 only keys whose higher digits equal
// `prefix` count.
template <typename T>
inline void histogram_add(T v, int level, uint64_t prefix, bool absolute, int64_t* hist) {
  using U = typename FloatBits<T>::U;
  constexpr int kBits = key_bits<T>();
  constexpr U kSign = static_cast<U>(U(1) << (kBits - 1));
  U u;
  std::memcpy(&u, &v, sizeof(U));
  if (absolute) u = static_cast<U>(u & ~kSign);
  const U magnitude = static_cast<U>(u & ~kSign);
  if (magnitude > FloatBits<T>::kInf) {  // NaN
    if (level == 0) ++hist[kNanBin];
    return;
  }
  if (magnitude == 0) u = 0;  // -0 -> +0
  // negative: flip every bit; positive: set the sign bit (branch-free: signs are unpredictable)
  const U flip = static_cast<U>(static_cast<U>(U(0) - static_cast<U>(u >> (kBits - 1))) | kSign);
  const U key = static_cast<U>(u ^ flip);
  const int shift = kBits - kRadixBits * (level + 1);
  if (level > 0 && static_cast<uint64_t>(key >> (shift + kRadixBits)) != prefix) return;
  ++hist[(key >> shift) & (kRadixBins - 1)];
}

// Level-0 histogram update (no prefix filter): the fused step emits these for the next keys.
template <typename T>
inline void histogram_add0(T v, int64_t* hist) {
  histogram_add<T>(v, 0, 0, false, hist);
}

// Per-thread histograms merged under a lock (at::parallel_for gives each thread one chunk).
struct HistogramMerger {
  int64_t total[kHistSlots] = {};
  std::mutex lock;
  void merge(const int64_t* local) {
    std::lock_guard<std::mutex> guard(lock);
    for (int i = 0; i < kHistSlots; ++i) total[i] += local[i];
  }
};

// Mixture Gaussian prior (sparse_ops/prior.py): constants computed in double on the host, then
// rounded to the compute type like Python scalars combined with a float tensor.
template <typename C>
struct Prior {
  C c1, c2, inv0, inv1, scale;
};

template <typename C>
inline Prior<C> make_prior(double lam, double var0, double var1, double scale) {
  const double c1 = std::log(lam / (1.0 - lam)) + 0.5 * std::log(var0 / var1);
  const double c2 = 0.5 / var0 - 0.5 / var1;
  return Prior<C>{static_cast<C>(c1), static_cast<C>(c2), static_cast<C>(1.0 / var0),
                  static_cast<C>(1.0 / var1), static_cast<C>(scale)};
}

// scale·θ·(p0/v0 + (1−p0)/v1) with p0 = 1/(1+exp(c2θ²+c1)): exp overflows to inf (p0 = 0) or
// underflows to 0 (p0 = 1), never NaN for finite θ and finite constants. Same operation order as
// mgp_prior_grad_ref.
template <typename C>
inline C prior_grad(C theta, const Prior<C>& p) {
  const C z = p.c2 * theta * theta + p.c1;
  const C p0 = C(1) / (C(1) + std::exp(z));
  return p.scale * theta * (p0 * p.inv0 + (C(1) - p0) * p.inv1);
}

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
}

inline bool is_float_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_float_dtype(t.scalar_type()), name,
              " must have dtype float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

}  // namespace sparse_ops
