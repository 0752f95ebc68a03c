// CPU kernel of sparse_ops::fused_prune_step_cpu (schema in sparse_ops/ops/__init__.py; reference:
// sparse_ops.ops.reference.fused_prune_step_ref). One pass over memory per tensor:
//
//   keys   (at entry)  element: |w|, or the scores when keys_from_scores, in their dtype;
//                      block:   Σw² or Σscores per block, summed in float64, rounded once to float32;
//                      2:4:     element keys, groups of 4 along the last dim.
//   keep   element/block: key > threshold, or key == threshold and global index ≥ tie_cut
//                      (global index = index_offset + flat element index, or row-major block index;
//                      strict_threshold keeps key > threshold only); threshold is rounded to the key's
//                      dtype first. 2:4: the 2 largest keys of each group (lower index pruned first
//                      among equal keys).
//   G       = g·w + sigmoid_l1·σ(s)·(1−σ(s))   (raw grad and weight; the σ term only when
//                      sigmoid_l1 != 0). Scores learn only when given and score_lr != 0:
//   scores  = s − score_lr·G                  without moments (the first-order update), or, with
//                      score_exp_avg m and score_exp_avg_sq v, torch.optim.Adam's bias-corrected step
//                      number t = score_step (no weight decay), in the reference's order:
//                        m = m + (1−β1)·(G − m);   v = v·β2 + ((1−β2)·G)·G;
//                        s = s + (−step_size·m) / (√v / bias2_sqrt + eps),   m, v and s stored;
//                      step_size = score_lr/(1 − β1^t) and bias2_sqrt = (1 − β2^t)^0.5 in float64 on
//                      the host (pow(), as reference.adam_constants); every scalar (1−β1, β2, 1−β2,
//                      −step_size, bias2_sqrt, eps, score_lr, sigmoid_l1) is rounded once to the
//                      compute type, as torch rounds a Python float operand
//   grad    = grad.masked_fill(~keep, 0) (mask_grad) + prior_scale·∂[−log π](weight)
//                      (prior when prior_scale != 0; pruned entries become +0 even if NaN/inf)
//   weight.masked_fill_(~keep, 0) (mask_weight);  mask = keep
//   histogram += level-0 radix histogram of the next keys (keys of the updated scores)
//
// Math in float32 (float64 for float64 weight), results rounded to each tensor's dtype; the moments
// have the scores' dtype (float32 or float64) and are read and written in the same pass. Every
// operation is rounded separately (no FMA contraction) and √ and ÷ are IEEE (correctly rounded).
// With sigmoid_l1 == 0 the moments are bit-identical to the reference, and so are the scores with a
// correctly rounded √; torch's CPU sqrt (MKL VML) is only within 1 ulp, so the reference's Adam
// scores on CPU can differ from these in the last bits (about 0.3% of elements, a few ulps of
// max(|s|, |step|)). Inputs may be non-contiguous: the kernel runs on contiguous copies and copies
// results back in place.
//
// Speed: each thread walks its range in chunks of kChunk elements. Per chunk, the keep decision is
// written to the mask, then a few specialised loops (flags as template parameters, no branches in
// the loop bodies; see common.h) update scores, grad and weight while the chunk is in L1, and the
// level-0 histogram of the new scores goes into the thread's private histogram (merged once).
// exp() (the prior, sigmoid) is common.h's exp_fast, within about 1 ulp of expf: the prior and the
// σ term agree with the reference to a few ulps; with sigmoid_l1 == 0 scores are bit-identical.
// √ in the Adam step is the SSE2 square-root instruction on a chunk buffer (sqrt_in_place):
// std::sqrt keeps the libm errno path (a call under a branch), which would keep the loop scalar.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "common.h"

namespace sparse_ops {
namespace {

enum class Granularity { kElement, kBlock, kTwoFour };

struct Rule {
  bool keys_from_scores;
  bool strict;  // key > threshold only
  bool reuse;     // keep = the mask passed in (no keys, no threshold), for every granularity
  double threshold;
  int64_t tie_cut;
  int64_t index_offset;

  // torch.tensor(threshold, dtype=key dtype), in the key's compute type (exact)
  template <typename K>
  compute_t<K> threshold_as() const {
    return static_cast<compute_t<K>>(to<K>(threshold));
  }
  // Keys at global indices ≥ tie_cut tie-break as kept: among positions [i0, i0 + n), those from the
  // returned offset on keep key >= threshold, those before it key > threshold only.
  int64_t tie_split(int64_t i0, int64_t n) const {
    if (strict) return n;
    const int64_t first = tie_cut - index_offset - i0;  // no overflow: all three are ≥ 0
    return std::clamp<int64_t>(first, 0, n);
  }
  // One key's decision (block and 2:4 paths): `key` and `thr` are exact images of key-dtype values.
  bool keep(double key, double thr, int64_t index) const {
    return (key > thr) | (!strict & (key == thr) & (index_offset + index >= tie_cut));
  }
};

// ---------------------------------------------------------------------------------------------
// Vectorisable passes over one chunk (all pointers already offset to the chunk's start). Each
// pass has its runtime flags as template parameters, so its loop body has no branches.
// ---------------------------------------------------------------------------------------------

// keep[i] = key > thr for i < split, key >= thr from split on; key = |x| (Abs) or x. NaN: never.
template <typename K, bool Abs>
void keep_pass(const K* __restrict__ x, uint8_t* __restrict__ keep, int64_t n, int64_t split, compute_t<K> thr) {
  using C = compute_t<K>;
  for (int64_t i = 0; i < split; ++i) {
    const C k = Abs ? std::abs(load_value(x + i)) : load_value(x + i);
    keep[i] = k > thr;
  }
  for (int64_t i = split; i < n; ++i) {
    const C k = Abs ? std::abs(load_value(x + i)) : load_value(x + i);
    keep[i] = k >= thr;
  }
}

// scores = s − score_lr·(g·w [+ sigmoid_l1·σ(s)·(1−σ(s))]), raw grad (the reference's order)
template <typename W, typename S, bool Sigmoid>
void score_pass(const W* __restrict__ w, const W* __restrict__ g, S* __restrict__ s, int64_t n,
                compute_t<W> lr, compute_t<W> l1) {
  using C = compute_t<W>;
  for (int64_t i = 0; i < n; ++i) {
    const C sc = static_cast<C>(load_value(s + i));
    C score_grad = load_value(g + i) * load_value(w + i);
    if (Sigmoid) {
      const C sig = C(1) / (C(1) + exp_fast<C>(-sc));
      score_grad = score_grad + l1 * sig * (C(1) - sig);
    }
    store_value(s + i, sc - lr * score_grad);
  }
}

// The scalars of one Adam step, each rounded to the compute type C as torch rounds a Python float
// operand of a C tensor op (the reference's `(1.0 - beta1) * (...)`, `... * beta2`, and so on).
template <typename C>
struct AdamStep {
  C one_minus_beta1;  // 1 − β1
  C beta2;
  C one_minus_beta2;  // 1 − β2
  C neg_step_size;    // −score_lr/(1 − β1^t)
  C bias2_sqrt;       // (1 − β2^t)^0.5
  C eps;
};

// reference.adam_constants: float64 on the host; Python's float ** float (int exponents included)
// is C's pow(), so std::pow(x, 0.5) here, not std::sqrt (they may differ in the last bit)
template <typename C>
AdamStep<C> make_adam_step(double score_lr, int64_t step, double beta1, double beta2, double eps) {
  const double t = static_cast<double>(step);
  const double step_size = score_lr / (1.0 - std::pow(beta1, t));
  const double bias2_sqrt = std::pow(1.0 - std::pow(beta2, t), 0.5);
  return {static_cast<C>(1.0 - beta1), static_cast<C>(beta2),      static_cast<C>(1.0 - beta2),
          static_cast<C>(-step_size),  static_cast<C>(bias2_sqrt), static_cast<C>(eps)};
}

// x[i] = √x[i] (IEEE, as torch's sqrt) for i < n, with the SSE2 instructions: a std::sqrt loop stays
// scalar (libm's errno path for x < 0 is a call under a branch). Negative x give the default NaN
// either way.
inline void sqrt_in_place(float* __restrict__ x, int64_t n) {
  int64_t i = 0;
#if defined(__GNUC__) && defined(__x86_64__)  // common.h includes <immintrin.h>
  for (; i + 4 <= n; i += 4) _mm_storeu_ps(x + i, _mm_sqrt_ps(_mm_loadu_ps(x + i)));
  for (; i < n; ++i) _mm_store_ss(x + i, _mm_sqrt_ss(_mm_load_ss(x + i)));
#endif
  for (; i < n; ++i) x[i] = std::sqrt(x[i]);
}

inline void sqrt_in_place(double* __restrict__ x, int64_t n) {
  int64_t i = 0;
#if defined(__GNUC__) && defined(__x86_64__)  // common.h includes <immintrin.h>
  for (; i + 2 <= n; i += 2) _mm_storeu_pd(x + i, _mm_sqrt_pd(_mm_loadu_pd(x + i)));
#endif
  for (; i < n; ++i) x[i] = std::sqrt(x[i]);
}

// Adam on the scores over one chunk (n ≤ kChunk), in the reference's operation order:
//   G = g·w [+ sigmoid_l1·σ(s)·(1−σ(s))];  m = m + (1−β1)·(G − m);  v = v·β2 + ((1−β2)·G)·G;
//   s = s + (−step_size·m) / (√v / bias2_sqrt + eps).
// Three loops while the chunk is in L1: the moments (stored, and kept in the compute type for the
// score step, as the reference uses them before rounding to the moments' dtype), √v, the scores.
template <typename W, typename S, bool Sigmoid>
void adam_score_pass(const W* __restrict__ w, const W* __restrict__ g, S* __restrict__ s,
                     S* __restrict__ exp_avg, S* __restrict__ exp_avg_sq, int64_t n, compute_t<W> l1,
                     AdamStep<compute_t<W>> a) {
  using C = compute_t<W>;
  C m[kChunk];
  C root[kChunk];  // v, then √v
  for (int64_t i = 0; i < n; ++i) {
    C score_grad = load_value(g + i) * load_value(w + i);
    if (Sigmoid) {
      const C sc = static_cast<C>(load_value(s + i));
      const C sig = C(1) / (C(1) + exp_fast<C>(-sc));
      score_grad = score_grad + l1 * sig * (C(1) - sig);
    }
    const C m0 = static_cast<C>(load_value(exp_avg + i));
    const C m1 = m0 + a.one_minus_beta1 * (score_grad - m0);
    const C v1 = static_cast<C>(load_value(exp_avg_sq + i)) * a.beta2 + (a.one_minus_beta2 * score_grad) * score_grad;
    store_value(exp_avg + i, m1);
    store_value(exp_avg_sq + i, v1);
    m[i] = m1;
    root[i] = v1;
  }
  sqrt_in_place(root, n);
  for (int64_t i = 0; i < n; ++i) {
    const C sc = static_cast<C>(load_value(s + i));
    store_value(s + i, sc + (a.neg_step_size * m[i]) / (root[i] / a.bias2_sqrt + a.eps));
  }
}

// Adam needs float32 or float64 scores (and moments); no code for 16-bit ones
template <typename S>
constexpr bool kAdamScores = std::is_same_v<S, float> || std::is_same_v<S, double>;

// x = keep ? x : +0 on the raw bits (masked_fill: NaN and inf included; exact for every dtype)
template <typename T>
void zero_pruned(T* __restrict__ x, const uint8_t* __restrict__ keep, int64_t n) {
  using U = typename FloatBits<T>::U;
  for (int64_t i = 0; i < n; ++i) {
    U u;
    std::memcpy(&u, x + i, sizeof(U));
    u = keep[i] ? u : U(0);
    std::memcpy(x + i, &u, sizeof(U));
  }
}

// grad = (mask_grad ? (keep ? g : 0) : g) + prior(w)
template <typename W, bool MaskGrad>
void prior_pass(const W* __restrict__ w, W* __restrict__ g, const uint8_t* __restrict__ keep, int64_t n,
                Prior<compute_t<W>> prior) {
  using C = compute_t<W>;
  for (int64_t i = 0; i < n; ++i) {
    const C gi = load_value(g + i);
    const C masked = MaskGrad ? select_value<C>(keep[i] != 0, gi, C(0)) : gi;
    store_value(g + i, masked + prior_grad<C>(load_value(w + i), prior));
  }
}

// Everything after the mask decision, over elements [i0, i0 + n) whose keep flags are in mask
// (same operation order as the reference: scores from the raw grad and weight, then grad, then
// weight).
template <typename W, typename S>
struct Update {
  using C = compute_t<W>;
  W* weight;
  W* grad;
  S* scores;  // nullptr when absent
  uint8_t* mask;
  bool update_scores;
  bool sigmoid;  // sigmoid_l1 != 0
  C score_lr;
  C sigmoid_l1;
  bool adam;       // the scores learn by Adam with the moments below (else S − score_lr·G)
  S* exp_avg;      // score_exp_avg (nullptr without Adam)
  S* exp_avg_sq;   // score_exp_avg_sq
  AdamStep<C> adam_step;
  bool mask_grad;
  bool has_prior;
  Prior<C> prior;
  bool mask_weight;

  // n ≤ kChunk (the Adam pass keeps chunk buffers on the stack)
  void run(int64_t i0, int64_t n) const {
    W* w = weight + i0;
    W* g = grad + i0;
    const uint8_t* keep = mask + i0;
    if constexpr (kAdamScores<S>) {
      if (update_scores && adam) {
        if (sigmoid) {
          adam_score_pass<W, S, true>(w, g, scores + i0, exp_avg + i0, exp_avg_sq + i0, n, sigmoid_l1, adam_step);
        } else {
          adam_score_pass<W, S, false>(w, g, scores + i0, exp_avg + i0, exp_avg_sq + i0, n, sigmoid_l1, adam_step);
        }
      }
    }
    if (update_scores && !adam) {
      if (sigmoid) {
        score_pass<W, S, true>(w, g, scores + i0, n, score_lr, sigmoid_l1);
      } else {
        score_pass<W, S, false>(w, g, scores + i0, n, score_lr, sigmoid_l1);
      }
    }
    if (has_prior) {
      if (mask_grad) {
        prior_pass<W, true>(w, g, keep, n, prior);
      } else {
        prior_pass<W, false>(w, g, keep, n, prior);
      }
    } else if (mask_grad) {
      zero_pruned<W>(g, keep, n);
    }
    if (mask_weight) zero_pruned<W>(w, keep, n);
  }
};

template <typename W, typename S>
void run_element(const Update<W, S>& up, int64_t n, const Rule& rule, HistogramMerger* merger) {
  const compute_t<W> thr_w = rule.threshold_as<W>();
  const compute_t<S> thr_s = rule.threshold_as<S>();
  at::parallel_for(0, n, at::internal::GRAIN_SIZE / 4, [&](int64_t begin, int64_t end) {
    const Update<W, S> u = up;
    const Rule r = rule;
    LocalHistogram local;
    run_vectorised([&] {
      for (int64_t i0 = begin; i0 < end; i0 += kChunk) {
        const int64_t len = std::min(kChunk, end - i0);
        const int64_t split = r.tie_split(i0, len);
        if (r.reuse) {
          // keep flags are already in the mask
        } else if (r.keys_from_scores) {
          keep_pass<S, false>(u.scores + i0, u.mask + i0, len, split, thr_s);
        } else {
          keep_pass<W, true>(u.weight + i0, u.mask + i0, len, split, thr_w);
        }
        u.run(i0, len);
        if (merger != nullptr) local.add_level0<S>(u.scores + i0, len);
      }
    });
    if (merger != nullptr) merger->merge(local);
  });
}

template <typename W, typename S>
void run_two_four(const Update<W, S>& up, int64_t n, const Rule& rule, HistogramMerger* merger) {
  // chunks of whole groups of 4
  at::parallel_for(0, n / 4, at::internal::GRAIN_SIZE / 16, [&](int64_t begin, int64_t end) {
    const Update<W, S> u = up;
    const bool from_scores = rule.keys_from_scores;
    const bool reuse = rule.reuse;
    LocalHistogram local;
    constexpr int64_t kGroups = kChunk / 4;
    run_vectorised([&] {
      for (int64_t g0 = begin; g0 < end; g0 += kGroups) {
        const int64_t g1 = std::min(end, g0 + kGroups);
        for (int64_t group = g0; group < g1 && !reuse; ++group) {
          const int64_t base = 4 * group;
          double key[4];
          for (int j = 0; j < 4; ++j) {
            key[j] = from_scores ? static_cast<double>(load_value(u.scores + base + j))
                              : std::abs(static_cast<double>(load_value(u.weight + base + j)));
          }
          for (int i = 0; i < 4; ++i) {
            int before = 0;  // members ordered before i by (key, index)
            for (int j = 0; j < 4; ++j) before += (key[j] < key[i]) | ((key[j] == key[i]) & (j < i));
            u.mask[base + i] = before >= 2;
          }
        }
        const int64_t i0 = 4 * g0, len = 4 * (g1 - g0);
        u.run(i0, len);
        if (merger != nullptr) local.add_level0<S>(u.scores + i0, len);
      }
    });
    if (merger != nullptr) merger->merge(local);
  });
}

template <typename W, typename S>
void run_block(const Update<W, S>& up, int64_t rows, int64_t cols, int64_t block_rows, int64_t block_cols,
               const Rule& rule, HistogramMerger* merger) {
  const int64_t n_block_rows = (rows + block_rows - 1) / block_rows;
  const int64_t n_block_cols = (cols + block_cols - 1) / block_cols;
  const double thr = rule.threshold_as<float>();
  at::parallel_for(0, n_block_rows, 1, [&](int64_t begin, int64_t end) {
    const Update<W, S> u = up;
    std::vector<double> sums(n_block_cols);
    std::vector<uint8_t> keep(n_block_cols);
    int64_t local[kHistSlots] = {};
    run_vectorised([&] {
      for (int64_t br = begin; br < end; ++br) {
        const int64_t r0 = br * block_rows, r1 = std::min(rows, r0 + block_rows);
        // 1) block keys at entry: Σw² or Σscores in float64, rounded once to float32
        std::fill(sums.begin(), sums.end(), 0.0);
        for (int64_t r = r0; r < r1 && !rule.reuse; ++r) {
          const int64_t row = r * cols;
          for (int64_t bc = 0; bc < n_block_cols; ++bc) {
            const int64_t c0 = bc * block_cols, c1 = std::min(cols, c0 + block_cols);
            double s = sums[bc];
            if (rule.keys_from_scores) {
              for (int64_t c = c0; c < c1; ++c) s += static_cast<double>(load_value(u.scores + row + c));
            } else {
              for (int64_t c = c0; c < c1; ++c) {
                const double w = static_cast<double>(load_value(u.weight + row + c));
                s += w * w;
              }
            }
            sums[bc] = s;
          }
        }
        for (int64_t bc = 0; bc < n_block_cols; ++bc) {
          const double key = static_cast<double>(static_cast<float>(sums[bc]));
          keep[bc] = rule.keep(key, thr, br * n_block_cols + bc);
        }
        // 2) the update, row by row (block row still in cache); block sums of the updated scores
        std::fill(sums.begin(), sums.end(), 0.0);
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t row = r * cols;
          for (int64_t bc = 0; bc < n_block_cols && !rule.reuse; ++bc) {
            const int64_t c0 = bc * block_cols, c1 = std::min(cols, c0 + block_cols);
            std::memset(u.mask + row + c0, keep[bc], static_cast<size_t>(c1 - c0));
          }
          for (int64_t c0 = 0; c0 < cols; c0 += kChunk) u.run(row + c0, std::min(kChunk, cols - c0));
          if (merger != nullptr) {
            for (int64_t bc = 0; bc < n_block_cols; ++bc) {
              const int64_t c0 = bc * block_cols, c1 = std::min(cols, c0 + block_cols);
              double s = sums[bc];
              for (int64_t c = c0; c < c1; ++c) s += static_cast<double>(load_value(u.scores + row + c));
              sums[bc] = s;
            }
          }
        }
        if (merger != nullptr) {
          // level-0 histogram of the float32 block keys of the updated scores
          uint16_t slots[1];
          for (int64_t bc = 0; bc < n_block_cols; ++bc) {
            const float key = static_cast<float>(sums[bc]);
            radix_slots<float, false, true>(&key, slots, 1, 32 - kRadixBits, 0);
            ++local[slots[0]];
          }
        }
      }
    });
    if (merger != nullptr) merger->merge(local);
  });
}

void check_like(const at::Tensor& t, const at::Tensor& weight, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK(t.sizes() == weight.sizes(), name, " must have the shape of weight ", weight.sizes(), ", got ",
              t.sizes());
}

// The op as its schema (sparse_ops/ops/__init__.py) defines it; reuse_mask: keep = the mask passed in.
void fused_prune_step_cpu(const at::Tensor& weight, const at::Tensor& grad, const std::optional<at::Tensor>& scores,
                           const at::Tensor& mask, const std::optional<at::Tensor>& histogram,
                           const std::optional<at::Tensor>& score_exp_avg,
                           const std::optional<at::Tensor>& score_exp_avg_sq, bool keys_from_scores, bool strict_threshold,
                           c10::string_view granularity, int64_t block_rows, int64_t block_cols, double threshold,
                           int64_t tie_cut, int64_t index_offset, double prior_scale, double lam, double var0,
                           double var1, double score_lr, double sigmoid_l1, int64_t score_step, double score_beta1,
                           double score_beta2, double score_eps, bool mask_grad, bool mask_weight, bool reuse_mask) {
  Granularity gran;
  if (granularity == "element") {
    gran = Granularity::kElement;
  } else if (granularity == "block") {
    gran = Granularity::kBlock;
  } else if (granularity == "2:4") {
    gran = Granularity::kTwoFour;
  } else {
    TORCH_CHECK(false, "granularity must be one of element, block, 2:4, got '", std::string(granularity), "'");
  }
  check_cpu(weight, "weight");
  check_float(weight, "weight");
  check_like(grad, weight, "grad");
  TORCH_CHECK(grad.scalar_type() == weight.scalar_type(), "grad must have dtype ", weight.scalar_type(), ", got ",
              grad.scalar_type());
  check_like(mask, weight, "mask");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "mask must have dtype bool, got ", mask.scalar_type());
  const bool has_scores = scores.has_value() && scores->defined();
  if (has_scores) {
    check_like(*scores, weight, "scores");
    check_float(*scores, "scores");
  }
  TORCH_CHECK(has_scores || !keys_from_scores, "scores is required when keys_from_scores is true");
  TORCH_CHECK(has_scores || score_lr == 0.0, "score_lr is non-zero but scores is None");
  // Adam on the scores: both moments or neither, shaped like weight, in the scores' dtype
  const bool has_avg = score_exp_avg.has_value() && score_exp_avg->defined();
  const bool has_avg_sq = score_exp_avg_sq.has_value() && score_exp_avg_sq->defined();
  TORCH_CHECK(has_avg == has_avg_sq,
              "score_exp_avg and score_exp_avg_sq must be given together (Adam on the scores) or both be None, got ",
              has_avg ? "score_exp_avg without score_exp_avg_sq" : "score_exp_avg_sq without score_exp_avg");
  const bool adam = has_avg;
  if (adam) {
    TORCH_CHECK(has_scores, "score_exp_avg is given but scores is None");
    TORCH_CHECK(scores->scalar_type() == at::kFloat || scores->scalar_type() == at::kDouble,
                "scores must be float32 or float64 when they learn by Adam, got ", scores->scalar_type());
    const auto check_moment = [&](const at::Tensor& t, const char* name) {
      check_like(t, weight, name);
      TORCH_CHECK(t.scalar_type() == scores->scalar_type(), name, " must have dtype ", scores->scalar_type(),
                  " (the dtype of scores), got ", t.scalar_type());
      TORCH_CHECK(!t.is_same(*scores), name, " must not be the scores tensor itself");
    };
    check_moment(*score_exp_avg, "score_exp_avg");
    check_moment(*score_exp_avg_sq, "score_exp_avg_sq");
    TORCH_CHECK(!score_exp_avg->is_same(*score_exp_avg_sq),
                "score_exp_avg and score_exp_avg_sq must be different tensors");
    TORCH_CHECK(score_step >= 1, "score_step must be >= 1 (the 1-based Adam step) when moments are given, got ",
                score_step);
    TORCH_CHECK(score_beta1 >= 0.0 && score_beta1 < 1.0, "score_beta1 must lie in [0, 1), got ", score_beta1);
    TORCH_CHECK(score_beta2 >= 0.0 && score_beta2 < 1.0, "score_beta2 must lie in [0, 1), got ", score_beta2);
    TORCH_CHECK(std::isfinite(score_eps) && score_eps >= 0.0, "score_eps must be a finite number >= 0, got ",
                score_eps);
  }
  const bool has_hist = histogram.has_value() && histogram->defined();
  if (has_hist) {
    TORCH_CHECK(keys_from_scores, "histogram is only emitted when keys_from_scores is true");
    check_cpu(*histogram, "histogram");
    TORCH_CHECK(histogram->scalar_type() == at::kLong && histogram->dim() == 1 && histogram->numel() == kHistSlots,
                "histogram must be int64 of shape (", kHistSlots, ",), got ", histogram->scalar_type(), " ",
                histogram->sizes());
  }
  if (gran != Granularity::kElement) {
    TORCH_CHECK(weight.dim() == 2, "weight must be 2-D for granularity='", std::string(granularity), "', got shape ",
                weight.sizes());
  }
  if (gran == Granularity::kBlock) {
    TORCH_CHECK(block_rows > 0 && block_cols > 0, "block_rows and block_cols must be positive, got (", block_rows,
                ", ", block_cols, ")");
  }
  if (gran == Granularity::kTwoFour) {
    TORCH_CHECK(weight.size(-1) % 4 == 0, "weight.shape[-1] must be a multiple of 4 for granularity='2:4', got ",
                weight.size(-1));
  }
  TORCH_CHECK(!std::isnan(threshold), "threshold must not be NaN");
  TORCH_CHECK(std::isfinite(score_lr) && std::isfinite(sigmoid_l1) && std::isfinite(prior_scale),
              "score_lr, sigmoid_l1 and prior_scale must be finite, got ", score_lr, ", ", sigmoid_l1, ", ",
              prior_scale);
  TORCH_CHECK(tie_cut >= 0 && index_offset >= 0, "tie_cut and index_offset must be non-negative, got ", tie_cut,
              " and ", index_offset);
  const bool has_prior = prior_scale != 0.0;
  if (has_prior) {
    TORCH_CHECK(lam > 0.0 && lam < 1.0, "lam must lie in (0, 1), got ", lam);
    TORCH_CHECK(var0 > 0.0 && var1 > var0, "var0 and var1 must satisfy 0 < var0 < var1, got var0=", var0,
                ", var1=", var1);
  }
  const bool update_scores = has_scores && score_lr != 0.0;

  // Work on contiguous tensors; non-contiguous arguments are copied back at the end.
  const at::Tensor w = weight.contiguous();
  const at::Tensor g = grad.contiguous();
  const at::Tensor m = mask.contiguous();
  const at::Tensor s = has_scores ? scores->contiguous() : at::Tensor();
  const at::Tensor ea = adam ? score_exp_avg->contiguous() : at::Tensor();
  const at::Tensor ea_sq = adam ? score_exp_avg_sq->contiguous() : at::Tensor();
  const Rule rule{keys_from_scores, strict_threshold, reuse_mask, threshold, tie_cut, index_offset};
  HistogramMerger merger;
  HistogramMerger* merger_ptr = has_hist ? &merger : nullptr;
  const at::ScalarType score_dtype = has_scores ? s.scalar_type() : weight.scalar_type();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "fused_prune_step_cpu", [&] {
    using W = scalar_t;
    using C = compute_t<W>;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, score_dtype, "fused_prune_step_cpu_scores", [&] {
      using S = scalar_t;
      Update<W, S> up{w.mutable_data_ptr<W>(),
                      g.mutable_data_ptr<W>(),
                      has_scores ? s.mutable_data_ptr<S>() : nullptr,
                      reinterpret_cast<uint8_t*>(m.mutable_data_ptr<bool>()),
                      update_scores,
                      sigmoid_l1 != 0.0,
                      static_cast<C>(score_lr),
                      static_cast<C>(sigmoid_l1),
                      adam,
                      adam ? ea.mutable_data_ptr<S>() : nullptr,
                      adam ? ea_sq.mutable_data_ptr<S>() : nullptr,
                      adam ? make_adam_step<C>(score_lr, score_step, score_beta1, score_beta2, score_eps)
                           : AdamStep<C>{},
                      mask_grad,
                      has_prior,
                      has_prior ? make_prior<C>(lam, var0, var1, prior_scale) : Prior<C>{},
                      mask_weight};
      switch (gran) {
        case Granularity::kElement:
          run_element<W, S>(up, w.numel(), rule, merger_ptr);
          break;
        case Granularity::kTwoFour:
          run_two_four<W, S>(up, w.numel(), rule, merger_ptr);
          break;
        case Granularity::kBlock:
          run_block<W, S>(up, w.size(0), w.size(1), block_rows, block_cols, rule, merger_ptr);
          break;
      }
    });
  });

  if (!weight.is_contiguous() && mask_weight) weight.copy_(w);
  if (!grad.is_contiguous()) grad.copy_(g);
  if (!mask.is_contiguous()) mask.copy_(m);
  if (update_scores && !scores->is_contiguous()) scores->copy_(s);
  if (update_scores && adam && !score_exp_avg->is_contiguous()) score_exp_avg->copy_(ea);
  if (update_scores && adam && !score_exp_avg_sq->is_contiguous()) score_exp_avg_sq->copy_(ea_sq);
  if (has_hist) histogram->add_(at::from_blob(merger.total, {kHistSlots}, at::kLong));
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_ops, CPU, m) {
  m.impl("fused_prune_step_cpu", &fused_prune_step_cpu);
}

}  // namespace sparse_ops
