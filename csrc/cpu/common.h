// Helpers shared by the CPU kernels of sparse_ops (csrc/cpu/*.cpp).
//
// Numerics follow sparse_ops/ops/reference.py bit for bit where the reference is exact:
//  * compute type: float32 for fp16/bf16/fp32 inputs, float64 for fp64 inputs (compute_t);
//  * every arithmetic step is rounded separately (setup.py compiles with -ffp-contract=off, so
//    a*b+c is never fused into an FMA that PyTorch's separate tensor ops would not perform);
//  * conversions to fp16/bf16 go through float, as c10::convert and Tensor.copy_ do.
//
// Speed: the hot loops are written so that GCC vectorises them for the baseline x86-64 ISA (SSE2;
// no -march flags, the binary runs on any x86-64): no calls, no data-dependent branches, runtime
// flags hoisted into template parameters, raw bit patterns moved through memcpy, __restrict__
// pointers. exp() is exp_fast below (a branch-free polynomial) because std::exp is a libm call
// that blocks vectorisation; at::vec::Vectorized<float>::exp() is no help here: extension builds do
// not define CPU_CAPABILITY, so it is the generic Vectorized that maps std::exp element by element.
// The kernels' loops run inside run_vectorised(), which on x86-64 CPUs with AVX2 runs a second
// copy of them compiled for AVX2 (256-bit vectors), chosen at run time (see there).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

namespace sparse_ops {

constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;  // digit slots
constexpr int kNanBin = kRadixBins;          // slot counting NaN (level 0 only)
constexpr int kHistSlots = kRadixBins + 1;

// Elements per inner chunk of the streaming kernels: every chunk's arrays stay in L1 between the
// (few, simple, vectorised) passes a kernel makes over it.
constexpr int64_t kChunk = 1024;

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

template <typename To, typename From>
inline To bit_cast(const From& v) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}

// c ? a : b through bit masks. Under GCC's default -ftrapping-math a conditional expression whose
// condition is a float comparison, or whose chosen value is computed by float arithmetic that only
// that arm uses, stays a branch (GCC will not if-convert or speculate a possibly trapping float
// operation), and a branch in a loop body blocks vectorisation. Masks keep both arms unconditional.
inline uint32_t select_u32(bool c, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return (a & m) | (b & ~m);
}

inline float select_f32(bool c, float a, float b) {
  return bit_cast<float>(select_u32(c, bit_cast<uint32_t>(a), bit_cast<uint32_t>(b)));
}

inline double select_f64(bool c, double a, double b) {
  const uint64_t m = uint64_t(0) - static_cast<uint64_t>(c);
  return bit_cast<double>((bit_cast<uint64_t>(a) & m) | (bit_cast<uint64_t>(b) & ~m));
}

template <typename C>
inline C select_value(bool c, C a, C b) {
  if constexpr (std::is_same_v<C, float>) {
    return select_f32(c, a, b);
  } else {
    return select_f64(c, a, b);
  }
}

// ---------------------------------------------------------------------------------------------
// loads and stores in the compute type
// ---------------------------------------------------------------------------------------------
// c10's fp16 conversions (without F16C) contain float operations under conditions, which GCC keeps
// as branches (-ftrapping-math): loops over c10::Half do not vectorise and run several times slower
// than float loops. These conversions are branch-free (mask selects) and give the same bits as
// c10 (fp16: IEEE round to nearest even, NaN -> sign|0x7E00; bf16: c10::detail::
// round_to_nearest_even, NaN -> 0x7FC0); tests/test_cpp_kernels.py checks them exhaustively.
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t magnitude = h & 0x7FFFu;
  const uint32_t exponent = magnitude >> 10;
  const uint32_t normal = (magnitude << 13) + (112u << 23);   // exponent 1..30: rebias 15 -> 127
  // exponent 31: inf, or NaN (payload kept, quieted like c10's conversion)
  const uint32_t special = (magnitude << 13) | 0x7F800000u | ((magnitude & 0x3FFu) != 0 ? 0x00400000u : 0u);
  // exponent 0: zero or subnormal, m·2^-24 (both steps exact)
  const uint32_t tiny = bit_cast<uint32_t>(static_cast<float>(static_cast<int32_t>(magnitude)) * 5.9604644775390625e-8f);
  uint32_t out = select_u32(exponent == 31, special, normal);
  out = select_u32(exponent == 0, tiny, out);
  return bit_cast<float>(out | sign);
}

inline uint16_t float_to_half_bits(float f) {
  const uint32_t x = bit_cast<uint32_t>(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t a = x & 0x7FFFFFFFu;
  // normal half range [2^-14, 65520): rebias, round to nearest even on the 13 dropped bits (a
  // carry out of the mantissa bumps the exponent, up to 0x7C00 = inf at 65520)
  const uint32_t normal = (a - (112u << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
  // below 2^-14: the float addition 0.5 + |f| rounds |f| to a multiple of 2^-24 (nearest even)
  const uint32_t subnormal = bit_cast<uint32_t>(bit_cast<float>(a) + 0.5f) - 0x3F000000u;
  uint32_t out = select_u32(a < 0x38800000u, subnormal, normal);
  out = select_u32(a >= 0x47800000u, 0x7C00u, out);  // ≥ 65536 and inf
  out = select_u32(a > 0x7F800000u, 0x7E00u, out);   // NaN
  return static_cast<uint16_t>(out | sign);
}

inline float bfloat16_bits_to_float(uint16_t b) {
  return bit_cast<float>(static_cast<uint32_t>(b) << 16);
}

inline uint16_t float_to_bfloat16_bits(float f) {
  const uint32_t x = bit_cast<uint32_t>(f);
  const uint32_t rounded = (x + 0x7FFFu + ((x >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((x & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
}

// *p in its compute type (exact)
template <typename T>
inline compute_t<T> load_value(const T* p) {
  if constexpr (std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>) {
    uint16_t b;
    std::memcpy(&b, p, sizeof(b));
    if constexpr (std::is_same_v<T, c10::Half>) {
      return half_bits_to_float(b);
    } else {
      return bfloat16_bits_to_float(b);
    }
  } else {
    return *p;
  }
}

// *p = v rounded to T as to<T>(v) does (fp16/bf16 through float)
template <typename T, typename From>
inline void store_value(T* p, From v) {
  if constexpr (std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>) {
    const float f = static_cast<float>(v);
    uint16_t b;
    if constexpr (std::is_same_v<T, c10::Half>) {
      b = float_to_half_bits(f);
    } else {
      b = float_to_bfloat16_bits(f);
    }
    std::memcpy(p, &b, sizeof(b));
  } else {
    *p = static_cast<T>(v);
  }
}

// ---------------------------------------------------------------------------------------------
// runtime ISA dispatch
// ---------------------------------------------------------------------------------------------
// run_vectorised(body) calls body(), compiled twice: for the baseline ISA, and with AVX2 enabled
// (target attribute + flatten, which inlines body's whole call tree into the AVX2 copy so that its
// loops are vectorised with 256-bit registers). The AVX2 copy runs only when the CPU and OS support
// AVX2 (__builtin_cpu_supports checks both), so the binary still runs on any x86-64. Results are
// bit-identical either way: "avx2" does not enable FMA (and setup.py passes -ffp-contract=off), so
// both copies perform the same IEEE operations in the same order; only the vector width differs.
// SPARSE_OPS_CPU_BASELINE=1 in the environment forces the baseline copy (tests compare the two).
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define SPARSE_OPS_AVX2_DISPATCH 1
template <typename F>
__attribute__((target("avx2"), flatten)) void run_avx2(const F& body) {
  body();
}

inline bool use_avx2() {
  static const bool yes = [] {
    const char* force = std::getenv("SPARSE_OPS_CPU_BASELINE");
    if (force != nullptr && force[0] != '\0' && std::strcmp(force, "0") != 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return yes;
}
#endif

template <typename F>
inline void run_vectorised(const F& body) {
#ifdef SPARSE_OPS_AVX2_DISPATCH
  if (use_avx2()) {
    run_avx2(body);
    return;
  }
#endif
  body();
}

// ---------------------------------------------------------------------------------------------
// exp
// ---------------------------------------------------------------------------------------------
// expf without calls or branches (so loops using it vectorise): Cody-Waite reduction x = n·ln2 + r,
// |r| ≤ ln2/2, Cephes' degree-6 polynomial for e^r (about 1 ulp), then ·2^n as two exact powers
// of two (each exponent in [-63, 64], so no step overflows or goes subnormal early).
// exp(x) = +inf for x > 88.7228 (past log(FLT_MAX)), 0 for x < -87.3365 (where e^x would be
// subnormal; the callers add it to 1, so flushing loses nothing), NaN for NaN.
// Cephes' polynomial for (e^r − 1 − r)/r², highest degree first (exp_f32 and the GELU copies below)
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
constexpr float kExpLo = -87.33654022216797f;       // ≈ log(FLT_MIN): e^x is flushed to 0 below
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;  // ln2 split in two (Cephes C1, C2)

inline float exp_f32(float x) {
  constexpr float kHi = 88.72283935546875f;   // > log(FLT_MAX): e^x overflows beyond
  constexpr float kShift = 12582912.0f;       // 1.5·2^23: adding it rounds to an integer
  const bool over = x > kHi, under = x < kExpLo;  // both false for NaN: it passes through
  float xc = select_f32(over, kHi, x);
  xc = select_f32(under, kExpLo, xc);
  const float t = xc * kLog2e + kShift;
  const float n = t - kShift;  // round(x·log2 e), in [-126, 128]
  const int32_t ni = bit_cast<int32_t>(t) - bit_cast<int32_t>(kShift);
  float r = xc - n * kLn2Hi;  // n·kLn2Hi is exact
  r = r - n * kLn2Lo;
  const float r2 = r * r;
  float p = kExpPoly[0];
#pragma GCC unroll 8
  for (int i = 1; i < 6; ++i) p = p * r + kExpPoly[i];
  p = p * r2 + r + 1.0f;
  const int32_t n1 = ni >> 1, n2 = ni - n1;  // unsigned shifts below: no UB when x is NaN
  const float scale1 = bit_cast<float>(static_cast<uint32_t>(n1 + 127) << 23);
  const float scale2 = bit_cast<float>(static_cast<uint32_t>(n2 + 127) << 23);
  float y = (p * scale1) * scale2;
  y = select_f32(over, INFINITY, y);
  y = select_f32(under, 0.0f, y);
  return y;
}

template <typename C>
inline C exp_fast(C x) {
  if constexpr (std::is_same_v<C, float>) {
    return exp_f32(x);
  } else {
    return std::exp(x);
  }
}

// ---------------------------------------------------------------------------------------------
// Mixture Gaussian prior (sparse_ops/ops/prior.py)
// ---------------------------------------------------------------------------------------------
// Constants computed in double on the host, then rounded to the compute type like Python scalars
// combined with a float tensor.
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
// mgp_prior_grad_ref. Pass the constants by value (a loop's locals), so stores cannot alias them.
template <typename C>
inline C prior_grad(C theta, Prior<C> p) {
  const C z = p.c2 * theta * theta + p.c1;
  const C p0 = C(1) / (C(1) + exp_fast<C>(z));
  return p.scale * theta * (p0 * p.inv0 + (C(1) - p0) * p.inv1);
}

// ---------------------------------------------------------------------------------------------
// radix histograms
// ---------------------------------------------------------------------------------------------
// Histogram slot of every element of x[0, n) (reference.order_keys + radix_histogram_ref): key =
// sign-flip transform of the bits (canonical +0; of |x| when Absolute); at Level0 the slot is the
// top digit, NaN -> kNanBin; deeper, the digit at `shift` when the key's higher digits equal
// `prefix`, else kNanBin as a discard slot (the caller clears it). Branch-free, vectorises.
template <typename T, bool Absolute, bool Level0>
inline void radix_slots(const T* __restrict__ x, uint16_t* __restrict__ slots, int64_t n, int shift,
                        typename FloatBits<T>::U prefix) {
  using U = typename FloatBits<T>::U;
  constexpr int kBits = key_bits<T>();
  constexpr U kSign = static_cast<U>(U(1) << (kBits - 1));
  constexpr U kInf = FloatBits<T>::kInf;
  for (int64_t i = 0; i < n; ++i) {
    U u;
    std::memcpy(&u, x + i, sizeof(U));
    if (Absolute) u = static_cast<U>(u & static_cast<U>(~kSign));
    const U magnitude = static_cast<U>(u & static_cast<U>(~kSign));
    const bool nan = magnitude > kInf;
    u = magnitude == 0 ? U(0) : u;  // -0 -> +0
    // negative: flip every bit; positive: set the sign bit
    const U flip = static_cast<U>(static_cast<U>(U(0) - static_cast<U>(u >> (kBits - 1))) | kSign);
    const U key = static_cast<U>(u ^ flip);
    const uint16_t digit = static_cast<uint16_t>((key >> shift) & U(kRadixBins - 1));
    if (Level0) {
      slots[i] = nan ? uint16_t(kNanBin) : digit;
    } else {
      const bool match = !nan & (static_cast<U>(key >> (shift + kRadixBits)) == prefix);
      slots[i] = match ? digit : uint16_t(kNanBin);
    }
  }
}

// One thread's histogram: 8 interleaved copies, because consecutive keys often share a digit and
// one counter would serialise the increments on store-to-load latency.
struct LocalHistogram {
  static constexpr int kCopies = 8;
  static constexpr int kStride = kHistSlots + 7;  // padding: copies start on different cache lines
  int64_t count[kCopies][kStride];

  LocalHistogram() { std::memset(count, 0, sizeof(count)); }

  void add(const uint16_t* __restrict__ slots, int64_t n) {
    int64_t i = 0;
    for (; i + kCopies <= n; i += kCopies) {
      for (int c = 0; c < kCopies; ++c) ++count[c][slots[i + c]];
    }
    for (; i < n; ++i) ++count[0][slots[i]];
  }

  // The same counts for slots where kNanBin is a discard slot (radix levels > 0). Deep levels
  // keep few keys (those matching the prefix), so runs of 64 discards are skipped instead of
  // counted; where more than 1 key in 32 is kept, nearly every run holds one, and all are counted.
  void add_skipping_discards(const uint16_t* __restrict__ slots, int64_t n) {

    uint32_t kept = 0;  // n ≤ kChunk
    for (int64_t i = 0; i < n; ++i) kept += slots[i] != kNanBin;
    if (kept == 0) return;
    if (32 * kept > n) {
      add(slots, n);
      return;
    }
    constexpr int64_t kRun = 64;
    int64_t i = 0;
    for (; i + kRun <= n; i += kRun) {
      uint16_t any = 0;
      for (int64_t j = 0; j < kRun; ++j) any |= static_cast<uint16_t>(slots[i + j] ^ kNanBin);
      if (any != 0) add(slots + i, kRun);
    }
    add(slots + i, n - i);
  }

  // Sum of the copies, kHistSlots values.
  void total(int64_t* out) const {
    for (int b = 0; b < kHistSlots; ++b) {
      int64_t s = 0;
      for (int c = 0; c < kCopies; ++c) s += count[c][b];
      out[b] = s;
    }
  }

  // Level-0 histogram of the order keys of x[0, n) (the fused step's histogram of the next keys).
  template <typename T>
  void add_level0(const T* x, int64_t n) {
    uint16_t slots[kChunk];
    for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
      const int64_t len = std::min(kChunk, n - i0);
      radix_slots<T, false, true>(x + i0, slots, len, key_bits<T>() - kRadixBits, 0);
      add(slots, len);
    }
  }
};

// Per-thread histograms merged under a lock (at::parallel_for gives each thread one chunk).
struct HistogramMerger {
  int64_t total[kHistSlots] = {};
  std::mutex lock;
  void merge(const int64_t* local) {
    std::lock_guard<std::mutex> guard(lock);
    for (int i = 0; i < kHistSlots; ++i) total[i] += local[i];
  }
  void merge(const LocalHistogram& local) {
    int64_t sum[kHistSlots];
    local.total(sum);
    merge(sum);
  }
};

// ---------------------------------------------------------------------------------------------
// argument checks
// ---------------------------------------------------------------------------------------------
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

// ---------------------------------------------------------------------------------------------
// sparse linear layers (csr_linear.cpp, bsr_linear.cpp)
// ---------------------------------------------------------------------------------------------
// y = x·Wᵀ + bias for x (M, K) row-major and W (N, K) stored by rows (CSR, or BSR by block rows).
// The kernels share this layout:
//  * token tiles: the M tokens are cut into tiles of `width` tokens (a multiple of 8); a tile's
//    panel is its slice of x transposed to float32, panel[k][t] = x[m0 + t][k], in rows of
//    padded(j) floats (tokens past M are +0). A stored weight w[n, k] then updates every token of
//    the tile with one multiply-add over panel row k, vectorised over the tokens.
//  * accumulators: float32, acc[n][t] in rows of padded(j) floats; store_tile writes them back
//    transposed, y[m0 + t][n] = round_T(acc[n][t] + bias[n]) (float32 addition, one rounding).
// The multiply-adds run as AVX2 FMA intrinsics when the CPU has AVX2 and FMA (use_avx2_fma), as
// plain loops otherwise; both accumulate in float32 (the results differ by rounding only).

#if defined(__GNUC__) && defined(__x86_64__)
#define SPARSE_OPS_AVX2_FMA 1
#define SPARSE_OPS_TARGET_AVX2_FMA __attribute__((target("avx2,fma")))
#endif

// AVX2 and FMA present (and SPARSE_OPS_CPU_BASELINE unset): the sparse linear kernels' fast path.
inline bool use_avx2_fma() {
#ifdef SPARSE_OPS_AVX2_FMA
  static const bool yes = [] {
    const char* force = std::getenv("SPARSE_OPS_CPU_BASELINE");
    if (force != nullptr && force[0] != '\0' && std::strcmp(force, "0") != 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0 && __builtin_cpu_supports("fma") != 0;
  }();
  return yes;
#else
  return false;
#endif
}

#ifdef SPARSE_OPS_AVX2_FMA
#define SPARSE_OPS_TARGET_AVX512 __attribute__((target("avx512f,avx2,fma")))
#endif

// AVX-512F present on top of use_avx2_fma(), unless SPARSE_OPS_CPU_ISA=avx2 (tests compare the two):
// the CSR tile kernel's 16-lane path.
inline bool use_avx512() {
#ifdef SPARSE_OPS_AVX2_FMA
  static const bool yes = [] {
    if (!use_avx2_fma()) return false;
    const char* isa = std::getenv("SPARSE_OPS_CPU_ISA");
    if (isa != nullptr && std::strcmp(isa, "avx2") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return yes;
#else
  return false;
#endif
}

// run_vectorised with a third copy of body compiled for AVX-512F (16-lane registers), for the
// sparse linear kernels' epilogues (bias, GELU): the same IEEE operations in the same order (FMA is
// not contracted: -ffp-contract=off), so the result is bit-identical to the other copies'.
#ifdef SPARSE_OPS_AVX2_DISPATCH
template <typename F>
__attribute__((target("avx512f,avx2"), flatten)) void run_avx512(const F& body) {
  body();
}
#endif

template <typename F>
inline void run_vectorised_wide(const F& body) {
#ifdef SPARSE_OPS_AVX2_DISPATCH
  if (use_avx512()) {
    run_avx512(body);
    return;
  }
#endif
  run_vectorised(body);
}

constexpr int64_t kTokenLanes = 8;  // float32 lanes of an AVX register: tiles are multiples of 8 tokens

struct TokenTiles {
  int64_t tokens;  // M
  int64_t width;   // tokens per tile (a multiple of lanes); the last tile may hold fewer
  int64_t count;
  int64_t lanes;   // panel and accumulator rows are padded to a multiple of this (8, or 16 for zmm kernels)

  int64_t begin(int64_t j) const { return j * width; }
  int64_t size(int64_t j) const { return std::min(width, tokens - j * width); }
  // floats per panel row (and accumulator row) of tile j
  int64_t padded(int64_t j) const { return (size(j) + lanes - 1) / lanes * lanes; }
  // tile j's panel starts at begin(j)·K floats; all panels together:
  int64_t panel_floats(int64_t K) const { return (begin(count - 1) + padded(count - 1)) * K; }
};

// Tiles of at most max_width tokens (a multiple of lanes, itself a multiple of 8), all of about the
// same size.
inline TokenTiles make_token_tiles(int64_t M, int64_t max_width, int64_t lanes = kTokenLanes) {
  const int64_t count = (M + max_width - 1) / max_width;
  const int64_t per_tile = (M + count - 1) / count;
  const int64_t width = (per_tile + lanes - 1) / lanes * lanes;
  return TokenTiles{M, width, (M + width - 1) / width, lanes};
}

// Split rows [0, rows) (CSR rows or BSR block rows, offsets `crow`) into `parts` ranges of about
// equal stored entries; inner cut points are multiples of `align` rows. Returns parts + 1 bounds.
inline std::vector<int64_t> split_rows_by_entries(const int32_t* crow, int64_t rows, int64_t parts, int64_t align) {
  std::vector<int64_t> cut(parts + 1, rows);
  cut[0] = 0;
  const int64_t total = crow[rows];
  for (int64_t i = 1; i < parts; ++i) {
    const int64_t target = total * i / parts;  // int32 entries: no overflow
    int64_t r = std::lower_bound(crow, crow + rows + 1, static_cast<int32_t>(target)) - crow;
    r = std::min(rows, r / align * align);
    cut[i] = std::max(cut[i - 1], r);
  }
  return cut;
}

// Whether `parts` threads should each take whole token tiles (each packing its own panels, which
// then stay in its L2) rather than split the rows: when every thread gets a tile and the tiles
// divide evenly, or there are at least 4 per thread.
inline bool split_by_tiles(const TokenTiles& tiles, int64_t parts) {
  return tiles.count >= parts && (tiles.count % parts == 0 || tiles.count >= 4 * parts);
}

// First tile of thread `part` of `parts` (its tiles end where part + 1's begin).
inline int64_t first_tile(const TokenTiles& tiles, int64_t part, int64_t parts) {
  return tiles.count * part / parts;
}

// Threads worth using for `work` multiply-adds: one per `min_work` (default ~64K: a thread's start-up
// costs microseconds).
inline int64_t worth_threads(int64_t work, int64_t min_work = int64_t{1} << 16) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work / min_work));
}

#ifdef SPARSE_OPS_AVX2_FMA
// 8 consecutive values of p as float32 (exact conversion)
template <typename T>
SPARSE_OPS_TARGET_AVX2_FMA inline __m256 load8_f32(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else {
    alignas(32) float tmp[8];
    for (int i = 0; i < 8; ++i) tmp[i] = load_value(p + i);
    return _mm256_load_ps(tmp);
  }
}

// p[0..8) = v rounded to T (as store_value does)
template <typename T>
SPARSE_OPS_TARGET_AVX2_FMA inline void store8_f32(T* p, __m256 v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm256_storeu_ps(p, v);
  } else {
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, v);
    for (int i = 0; i < 8; ++i) store_value(p + i, tmp[i]);
  }
}

// r[i][j] <- r[j][i] for an 8×8 block held in 8 registers
SPARSE_OPS_TARGET_AVX2_FMA inline void transpose8x8(__m256 r[8]) {
  __m256 t[8], s[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {
    s[4 * h + 0] = _mm256_shuffle_ps(t[4 * h + 0], t[4 * h + 2], _MM_SHUFFLE(1, 0, 1, 0));
    s[4 * h + 1] = _mm256_shuffle_ps(t[4 * h + 0], t[4 * h + 2], _MM_SHUFFLE(3, 2, 3, 2));
    s[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], _MM_SHUFFLE(1, 0, 1, 0));
    s[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x31);
  }
}

// Panel columns [0, cols) of 8 tokens (x rows, `rows` of them exist; the others are +0): 8×8 blocks
// transposed in registers, the last cols % 8 columns one by one.
template <typename T>
SPARSE_OPS_TARGET_AVX2_FMA void pack_tokens_avx2(const T* x, int64_t K, int64_t rows, int64_t cols, float* panel,
                                                 int64_t stride) {
  const int64_t c8 = cols / 8 * 8;
  for (int64_t k0 = 0; k0 < c8; k0 += 8) {
    __m256 r[8];
    for (int64_t i = 0; i < 8; ++i) r[i] = i < rows ? load8_f32(x + i * K + k0) : _mm256_setzero_ps();
    if (k0 % 16 == 0) {  // the same place of the next block of columns: x is read as `rows` streams
      for (int64_t i = 0; i < rows; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(x + i * K + k0 + cols), _MM_HINT_T0);
      }
    }
    transpose8x8(r);
    for (int64_t i = 0; i < 8; ++i) _mm256_storeu_ps(panel + (k0 + i) * stride, r[i]);
  }
  for (int64_t k = c8; k < cols; ++k) {
    for (int64_t i = 0; i < 8; ++i) {
      panel[k * stride + i] = i < rows ? static_cast<float>(load_value(x + i * K + k)) : 0.0f;
    }
  }
}

// store_tile's body for rows [n0, n1): 8×8 blocks transposed in registers, the rest one by one.
template <typename T>
SPARSE_OPS_TARGET_AVX2_FMA void store_tile_avx2(const float* acc, int64_t stride, int64_t n0, int64_t n1, int64_t m0,
                                                int64_t tokens, const float* bias, T* y, int64_t N) {
  const int64_t n8 = n0 + (n1 - n0) / 8 * 8, t8 = tokens / 8 * 8;
  for (int64_t n = n0; n < n8; n += 8) {
    const float* a = acc + (n - n0) * stride;
    const __m256 b = bias != nullptr ? _mm256_loadu_ps(bias + n) : _mm256_setzero_ps();
    for (int64_t t = 0; t < t8; t += 8) {
      __m256 r[8];
      for (int64_t i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(a + i * stride + t);
      transpose8x8(r);
      for (int64_t i = 0; i < 8; ++i) store8_f32(y + (m0 + t + i) * N + n, _mm256_add_ps(r[i], b));
    }
    for (int64_t t = t8; t < tokens; ++t) {
      for (int64_t i = 0; i < 8; ++i) {
        store_value(y + (m0 + t) * N + n + i, a[i * stride + t] + (bias != nullptr ? bias[n + i] : 0.0f));
      }
    }
  }
  for (int64_t n = n8; n < n1; ++n) {
    const float b = bias != nullptr ? bias[n] : 0.0f;
    for (int64_t t = 0; t < tokens; ++t) store_value(y + (m0 + t) * N + n, acc[(n - n0) * stride + t] + b);
  }
}
#endif

// Columns [k0, k0 + cols) of tile j's panel (panel_j = where tile j's panel starts).
template <typename T>
void pack_block(const T* x, int64_t K, const TokenTiles& tiles, int64_t j, int64_t k0, int64_t cols, float* panel_j) {
  const int64_t stride = tiles.padded(j);
  float* panel = panel_j + k0 * stride;
  for (int64_t t = 0; t < tiles.padded(j); t += kTokenLanes) {  // tokens past the tile's size: +0
    const int64_t rows = std::clamp<int64_t>(tiles.size(j) - t, 0, kTokenLanes);
    const T* xs = x + (tiles.begin(j) + t) * K + k0;
#ifdef SPARSE_OPS_AVX2_FMA
    if (use_avx2_fma()) {
      pack_tokens_avx2<T>(xs, K, rows, cols, panel + t, stride);
      continue;
    }
#endif
    for (int64_t k = 0; k < cols; ++k) {
      for (int64_t i = 0; i < kTokenLanes; ++i) {
        panel[k * stride + t + i] = i < rows ? static_cast<float>(load_value(xs + i * K + k)) : 0.0f;
      }
    }
  }
}

// The panels of all tiles of x (M, K): panels + tiles.begin(j)·K holds tile j (see above). Work
// items are (tile, 64 columns): the 64 panel rows being written stay in L1.
template <typename T>
void pack_panels(const T* x, int64_t K, const TokenTiles& tiles, float* panels) {
  constexpr int64_t kCols = 64;
  const int64_t col_blocks = (K + kCols - 1) / kCols;
  at::parallel_for(0, tiles.count * col_blocks, 8, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t j = item / col_blocks, k0 = item % col_blocks * kCols;
      pack_block<T>(x, K, tiles, j, k0, std::min(kCols, K - k0), panels + tiles.begin(j) * K);
    }
  });
}

// Tile j's panel alone, by the calling thread, into `panel` (K × padded(j) floats): blocks of 256
// columns, so that the x rows of a block are read as a few sequential streams.
template <typename T>
void pack_tile(const T* x, int64_t K, const TokenTiles& tiles, int64_t j, float* panel) {
  constexpr int64_t kCols = 256;
  for (int64_t k0 = 0; k0 < K; k0 += kCols) pack_block<T>(x, K, tiles, j, k0, std::min(kCols, K - k0), panel);
}

// y[m0 + t][n] = round_T(acc[n − n0][t] + bias[n]) for n in [n0, n1), t < tokens; acc rows have
// `stride` floats; bias is float32 or nullptr.
template <typename T>
void store_tile(const float* acc, int64_t stride, int64_t n0, int64_t n1, int64_t m0, int64_t tokens,
                const float* bias, T* y, int64_t N) {
#ifdef SPARSE_OPS_AVX2_FMA
  if (use_avx2_fma()) {
    store_tile_avx2<T>(acc, stride, n0, n1, m0, tokens, bias, y, N);
    return;
  }
#endif
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t n = n0; n < n1; ++n) {
      store_value(y + (m0 + t) * N + n, acc[(n - n0) * stride + t] + (bias != nullptr ? bias[n] : 0.0f));
    }
  }
}

// t as a contiguous float32 tensor (t itself when it already is one)
inline at::Tensor contiguous_float(const at::Tensor& t) {
  return t.to(at::kFloat).contiguous();
}

// Argument checks shared by csr_linear_cpu and bsr_linear_cpu (`blocked`: BSR). Index contents are
// checked too, in O(rows + stored entries): crow from 0 to the entry count, non-decreasing; columns
// (block columns for BSR) within [0, cols). Sorted columns are not required.
inline void check_sparse_linear(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                                const at::Tensor& values, const std::optional<at::Tensor>& bias, int64_t out_features,
                                bool blocked, bool check_indices) {
  check_cpu(x, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "x must have dtype float32, float16 or bfloat16 (float64 runs on the reference), got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.size(1) >= 1, "x must be 2-D (tokens, in_features) with in_features >= 1, got shape ",
              x.sizes());
  TORCH_CHECK(out_features >= 1, "out_features must be positive, got ", out_features);
  check_cpu(crow, "crow_indices");
  check_cpu(col, "col_indices");
  check_cpu(values, "values");
  TORCH_CHECK(crow.scalar_type() == at::kInt && crow.dim() == 1, "crow_indices must be a 1-D int32 tensor, got ",
              crow.scalar_type(), " of shape ", crow.sizes());
  const bool narrow = col.scalar_type() == at::kUInt16;  // CSR only: columns < 65,536 in 2 bytes
  TORCH_CHECK((col.scalar_type() == at::kInt || (narrow && !blocked)) && col.dim() == 1,
              "col_indices must be a 1-D int32 tensor", blocked ? "" : " (or uint16 when in_features <= 65536)",
              ", got ", col.scalar_type(), " of shape ", col.sizes());
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), "values must have the dtype of x (", x.scalar_type(), "), got ",
              values.scalar_type());
  int64_t rows = out_features, cols = x.size(1);
  if (blocked) {
    TORCH_CHECK(values.dim() == 3 && values.size(1) >= 1 && values.size(2) >= 1,
                "values must have shape (nnz_blocks, block_rows, block_cols), got ", values.sizes());
    rows = (out_features + values.size(1) - 1) / values.size(1);
    cols = (x.size(1) + values.size(2) - 1) / values.size(2);
  } else {
    TORCH_CHECK(values.dim() == 1, "values must be 1-D (nnz,), got shape ", values.sizes());
  }
  TORCH_CHECK(crow.numel() == rows + 1, "crow_indices must have ", rows + 1, " entries for out_features=",
              out_features, ", got ", crow.numel());
  TORCH_CHECK(col.numel() == values.size(0), "col_indices has ", col.numel(), " entries but values has ",
              values.size(0), "; they must match");
  if (bias.has_value() && bias->defined()) {
    check_cpu(*bias, "bias");
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->dim() == 1 && bias->size(0) == out_features,
                "bias must be None or of shape (", out_features, ",) and dtype ", x.scalar_type(), ", got ",
                bias->scalar_type(), " ", bias->sizes());
  }
  TORCH_CHECK(!narrow || x.size(1) <= 65536, "uint16 col_indices need in_features <= 65536, got ", x.size(1));
  if (!check_indices) return;  // the caller (SparseLinear) validated these very index tensors already
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous();
  const int32_t* c = crow_c.const_data_ptr<int32_t>();
  const int64_t entries = col.numel();
  TORCH_CHECK(c[0] == 0 && c[rows] == entries, "crow_indices must start at 0 and end at nnz=", entries, ", got ", c[0],
              " … ", c[rows]);
  bool ordered = true;
  for (int64_t r = 0; r < rows; ++r) ordered &= c[r] <= c[r + 1];
  TORCH_CHECK(ordered, "crow_indices must be non-decreasing");
  const auto check_columns = [&](auto tag) {
    using I = decltype(tag);
    const I* k = col_c.const_data_ptr<I>();
    uint32_t top = 0;  // largest column as unsigned: negative columns count as huge
    run_vectorised([&] {
      uint32_t m = 0;  // a local: the loop vectorises
      for (int64_t p = 0; p < entries; ++p) m = std::max(m, static_cast<uint32_t>(k[p]));
      top = m;
    });
    if (top >= static_cast<uint64_t>(cols)) {
      const auto [lo, hi] = std::minmax_element(k, k + entries);
      TORCH_CHECK(false, "col_indices must lie in [0, ", cols, "), got [", static_cast<int64_t>(*lo), ", ",
                  static_cast<int64_t>(*hi), "]");
    }
  };
  narrow ? check_columns(uint16_t{}) : check_columns(int32_t{});
}

// ---------------------------------------------------------------------------------------------
// the sparse linear epilogue: y = act(x·Wᵀ + bias)
// ---------------------------------------------------------------------------------------------
enum class Activation { kNone, kGelu };

inline Activation parse_activation(const std::string& name) {
  if (name == "none") return Activation::kNone;
  TORCH_CHECK(name == "gelu", "activation must be 'none' or 'gelu' (the exact, erf GELU), got '", name, "'");
  return Activation::kGelu;
}

// GELU(v) = v·Φ(v), Φ(v) = ½·erfc(−v/√2), branch-free (loops over it vectorise). erfc(z), z = |v|/√2,
// is Abramowitz & Stegun 7.1.26: t·(a1 + t·(a2 + t·(a3 + t·(a4 + t·a5))))·e^(−z²), t = 1/(1 + p·z),
// absolute error ≤ 1.5e-7, so |GELU error| ≤ 0.75e-7·|v| (about one float32 ulp of the result).
constexpr float kErfcPoly[5] = {1.061405429f, -1.453152027f, 1.421413741f, -0.284496736f, 0.254829592f};  // a5 … a1
constexpr float kErfcP = 0.3275911f, kInvSqrt2 = 0.70710678118654752f;

inline float gelu_f32(float v) {
  const float z = std::fabs(v) * kInvSqrt2;
  const float t = 1.0f / (1.0f + kErfcP * z);
  float q = kErfcPoly[0];
#pragma GCC unroll 8
  for (int i = 1; i < 5; ++i) q = q * t + kErfcPoly[i];
  const float erfc_z = q * t * exp_f32(-z * z);           // erfc(|v|/√2)
  const float phi = select_f32(v < 0.0f, 0.5f * erfc_z, 1.0f - 0.5f * erfc_z);
  return v * phi;
}

#ifdef SPARSE_OPS_AVX2_FMA
// gelu_f32 on 8 lanes with fused multiply-adds, for AVX2 CPUs without AVX-512: the same formulas,
// 1/(1 + p·z) as an exact division, ·2^n as one exponent add (n ≥ −126 here: x = −z² ≤ 0 is
// clamped at −87.3365, below which e^x is 0). Rounding differs from gelu_f32's (FMA), the bound not.
SPARSE_OPS_TARGET_AVX2_FMA inline __m256 gelu_avx2(__m256 v) {
  const __m256 abs_v = _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)));
  const __m256 z = _mm256_mul_ps(abs_v, _mm256_set1_ps(kInvSqrt2));
  const __m256 d = _mm256_fmadd_ps(_mm256_set1_ps(kErfcP), z, _mm256_set1_ps(1.0f));
  const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f), d);
  __m256 q = _mm256_set1_ps(kErfcPoly[0]);
#pragma GCC unroll 8
  for (int i = 1; i < 5; ++i) q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(kErfcPoly[i]));
  q = _mm256_mul_ps(q, t);
  const __m256 x0 = _mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), z), z);
  const __m256 lo = _mm256_set1_ps(kExpLo);
  const __m256 under = _mm256_cmp_ps(x0, lo, _CMP_LT_OQ);
  const __m256 x = _mm256_max_ps(lo, x0);  // x0 second: a NaN passes through
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
#pragma GCC unroll 8
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 e = _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
  const __m256 half_erfc = _mm256_mul_ps(_mm256_mul_ps(q, e), _mm256_set1_ps(0.5f));
  const __m256 negative = _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ);
  const __m256 phi = _mm256_blendv_ps(_mm256_sub_ps(_mm256_set1_ps(1.0f), half_erfc), half_erfc, negative);
  return _mm256_mul_ps(v, phi);
}

// a[i] = gelu(a[i] + b[i]) for i < n, as gelu_span_avx512 below; the last n % 8 through a copy.
SPARSE_OPS_TARGET_AVX2_FMA inline void gelu_span_avx2(float* a, int64_t n, const float* bias, int64_t bias_step) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(a + i);
    if (bias != nullptr) v = _mm256_add_ps(v, bias_step == 0 ? _mm256_set1_ps(bias[0]) : _mm256_loadu_ps(bias + i));
    _mm256_storeu_ps(a + i, gelu_avx2(v));
  }
  if (i < n) {
    alignas(32) float va[8] = {}, vb[8] = {};
    std::memcpy(va, a + i, sizeof(float) * (n - i));
    __m256 v = _mm256_load_ps(va);
    if (bias != nullptr) {
      if (bias_step != 0) std::memcpy(vb, bias + i, sizeof(float) * (n - i));
      v = _mm256_add_ps(v, bias_step == 0 ? _mm256_set1_ps(bias[0]) : _mm256_load_ps(vb));
    }
    _mm256_store_ps(va, gelu_avx2(v));
    std::memcpy(a + i, va, sizeof(float) * (n - i));
  }
}

// gelu_f32 on 16 lanes with fused multiply-adds: the same formulas (A&S 7.1.26 erfc, the Cody-Waite
// exp with Cephes' polynomial), with 1/(1 + p·z) as rcp14 plus one Newton step (relative error
// ~1e-8, far under the erfc formula's 1.5e-7) and ·2^n as one vscalefps. Rounding differs from
// gelu_f32's (FMA), the error bound is the same; the tails too: e^(−z²) is 0 below −87.3365.
SPARSE_OPS_TARGET_AVX512 inline __m512 gelu_avx512(__m512 v) {
  // (the maskz forms with all lanes set: GCC's unmasked ones read an undefined register and warn)
  constexpr __mmask16 all = 0xFFFF;
  const __m512 abs_v = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7FFFFFFF)));
  const __m512 z = _mm512_mul_ps(abs_v, _mm512_set1_ps(kInvSqrt2));
  const __m512 d = _mm512_fmadd_ps(_mm512_set1_ps(kErfcP), z, _mm512_set1_ps(1.0f));
  __m512 t = _mm512_maskz_rcp14_ps(all, d);
  t = _mm512_fmadd_ps(t, _mm512_fnmadd_ps(d, t, _mm512_set1_ps(1.0f)), t);
  __m512 q = _mm512_set1_ps(kErfcPoly[0]);
#pragma GCC unroll 8
  for (int i = 1; i < 5; ++i) q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(kErfcPoly[i]));
  q = _mm512_mul_ps(q, t);
  // e^x, x = −z² ≤ 0 (NaN passes through)
  const __m512 x = _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), z), z);
  const __mmask16 under = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpLo), _CMP_LT_OQ);
  const __m512 n = _mm512_maskz_roundscale_ps(all, _mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
#pragma GCC unroll 8
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  const __m512 e = _mm512_maskz_scalef_ps(static_cast<__mmask16>(~under), p, n);
  const __m512 half_erfc = _mm512_mul_ps(_mm512_mul_ps(q, e), _mm512_set1_ps(0.5f));  // ½·erfc(|v|/√2)
  const __mmask16 negative = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 phi = _mm512_mask_mov_ps(_mm512_sub_ps(_mm512_set1_ps(1.0f), half_erfc), negative, half_erfc);
  return _mm512_mul_ps(v, phi);
}

// a[i] = gelu(a[i] + b[i]) for i < n, b[i] = bias[i] (bias_step 1), bias[0] (bias_step 0) or 0 (null).
SPARSE_OPS_TARGET_AVX512 inline void gelu_span_avx512(float* a, int64_t n, const float* bias, int64_t bias_step) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
    __m512 v = _mm512_maskz_loadu_ps(m, a + i);
    if (bias != nullptr) {
      v = _mm512_add_ps(v, bias_step == 0 ? _mm512_set1_ps(bias[0]) : _mm512_maskz_loadu_ps(m, bias + i));
    }
    _mm512_mask_storeu_ps(a + i, m, gelu_avx512(v));
  }
}

// gelu_span_avx512, or gelu_span_avx2 on CPUs without AVX-512 (callers check use_avx2_fma()).
inline void gelu_span_fma(float* a, int64_t n, const float* bias, int64_t bias_step) {
  use_avx512() ? gelu_span_avx512(a, n, bias, bias_step) : gelu_span_avx2(a, n, bias, bias_step);
}
#endif

// acc[r·stride + t] = act(acc[r·stride + t] + bias[r]) for r < rows, t < width (bias may be null).
// GELU with FMA (gelu_span_fma): the compiler-vectorised gelu_f32 only on CPUs without AVX2/FMA (or
// SPARSE_OPS_CPU_BASELINE=1).
inline void finish_rows(float* acc, int64_t stride, int64_t rows, int64_t width, const float* bias, Activation act) {
#ifdef SPARSE_OPS_AVX2_FMA
  if (act == Activation::kGelu && use_avx2_fma()) {
    for (int64_t r = 0; r < rows; ++r) gelu_span_fma(acc + r * stride, width, bias != nullptr ? bias + r : nullptr, 0);
    return;
  }
#endif
  run_vectorised_wide([&] {
    for (int64_t r = 0; r < rows; ++r) {
      float* __restrict__ a = acc + r * stride;
      const float b = bias != nullptr ? bias[r] : 0.0f;
      if (act == Activation::kGelu) {
        for (int64_t t = 0; t < width; ++t) a[t] = gelu_f32(a[t] + b);
      } else {
        for (int64_t t = 0; t < width; ++t) a[t] = a[t] + b;
      }
    }
  });
}

// s[i] = act(s[i] + bias[i]) for i < n (bias may be null): one token's outputs.
inline void finish_vector(float* s, int64_t n, const float* bias, Activation act) {
#ifdef SPARSE_OPS_AVX2_FMA
  if (act == Activation::kGelu && use_avx2_fma()) {
    gelu_span_fma(s, n, bias, 1);
    return;
  }
#endif
  run_vectorised_wide([&] {
    float* __restrict__ a = s;
    if (act == Activation::kGelu) {
      if (bias != nullptr) {
        for (int64_t i = 0; i < n; ++i) a[i] = gelu_f32(a[i] + bias[i]);
      } else {
        for (int64_t i = 0; i < n; ++i) a[i] = gelu_f32(a[i]);
      }
    } else if (bias != nullptr) {
      for (int64_t i = 0; i < n; ++i) a[i] = a[i] + bias[i];
    }
  });
}

}  // namespace sparse_ops
