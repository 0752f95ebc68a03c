// CPU kernel of sparse_ops::fused_prune_step_cpu (schema in sparse_ops/ops.py; reference:
// sparse_ops.reference.fused_prune_step_ref). One pass over memory per tensor:
//
//   keys   (at entry)  element: |w| (magnitude, mgpp) or scores (movement methods), in their dtype;
//                      block:   Σw² or Σscores per block, summed in float64, rounded once to float32;
//                      2:4:     element keys, groups of 4 along the last dim.
//   keep   element/block: key > threshold, or key == threshold and global index ≥ tie_cut
//                      (global index = index_offset + flat element index, or row-major block index;
//                      soft_movement keeps key > threshold only); threshold is rounded to the key's
//                      dtype first. 2:4: the 2 largest keys of each group (lower index pruned first
//                      among equal keys).
//   scores -= score_lr·grad·weight                 (when scores given and score_lr != 0; raw grad)
//   grad    = grad·keep (mask_grad) + prior_scale·∂[−log π](weight)   (prior when prior_scale != 0)
//   weight *= keep (mask_weight);  mask = keep
//   histogram += level-0 radix histogram of the next keys (keys of the updated scores)
//
// Math in float32 (float64 for float64 weight), results rounded to each tensor's dtype. Inputs
// may be non-contiguous: the kernel runs on contiguous copies and copies results back in place.
#include <torch/library.h>

#include <string>
#include <vector>

#include "common.h"

namespace sparse_ops {
namespace {

enum class Granularity { kElement, kBlock, kTwoFour };

struct Rule {
  bool movement;  // keys come from scores
  bool strict;    // soft_movement: key > threshold only
  double threshold;
  int64_t tie_cut;
  int64_t index_offset;

  template <typename K>
  double threshold_as() const {
    return static_cast<double>(to<K>(threshold));  // torch.tensor(threshold, dtype=key dtype)
  }
  // `key` and `thr` are exact images of values of the key dtype. Branch-free (bitwise ops): keep
  // decisions are data dependent and would be mispredicted.
  bool keep(double key, double thr, int64_t index) const {
    return (key > thr) | (!strict & (key == thr) & (index_offset + index >= tie_cut));
  }
};

// Everything after the mask decision, for one element (same operation order as the reference).
template <typename W, typename S>
struct ElementUpdate {
  using C = compute_t<W>;
  W* weight;
  W* grad;
  S* scores;  // nullptr when absent
  bool* mask;
  bool update_scores;
  C score_lr;
  bool mask_grad;
  bool has_prior;
  Prior<C> prior;
  bool mask_weight;

  inline void apply(int64_t i, bool keep) const {
    const C w = static_cast<C>(weight[i]);
    const C g = static_cast<C>(grad[i]);
    const C k = static_cast<C>(keep);
    if (update_scores) scores[i] = to<S>(static_cast<C>(scores[i]) - score_lr * g * w);
    C new_grad = mask_grad ? g * k : g;
    if (has_prior) new_grad = new_grad + prior_grad<C>(w, prior);
    grad[i] = to<W>(new_grad);
    if (mask_weight) weight[i] = to<W>(w * k);
    mask[i] = keep;
  }

  inline double element_key(int64_t i, bool movement) const {
    return movement ? static_cast<double>(scores[i]) : std::abs(static_cast<double>(weight[i]));
  }
};

template <typename W, typename S>
void run_element(const ElementUpdate<W, S>& up, int64_t n, const Rule& rule, HistogramMerger* merger) {
  const double thr = rule.movement ? rule.threshold_as<S>() : rule.threshold_as<W>();
  at::parallel_for(0, n, at::internal::GRAIN_SIZE / 4, [&](int64_t begin, int64_t end) {
    // local copies: the compiler need not reload them after every store through bool*/T*
    const ElementUpdate<W, S> u = up;
    const Rule r = rule;
    const bool hist = merger != nullptr;
    int64_t local[kHistSlots] = {};
    for (int64_t i = begin; i < end; ++i) {
      u.apply(i, r.keep(u.element_key(i, r.movement), thr, i));
      if (hist) histogram_add0<S>(u.scores[i], local);
    }
    if (merger != nullptr) merger->merge(local);
  });
}

template <typename W, typename S>
void run_two_four(const ElementUpdate<W, S>& up, int64_t n, const Rule& rule, HistogramMerger* merger) {
  at::parallel_for(0, n / 4, at::internal::GRAIN_SIZE / 16, [&](int64_t begin, int64_t end) {
    const ElementUpdate<W, S> u = up;
    const bool movement = rule.movement;
    int64_t local[kHistSlots] = {};
    for (int64_t group = begin; group < end; ++group) {
      const int64_t base = 4 * group;
      double key[4];
      for (int j = 0; j < 4; ++j) key[j] = u.element_key(base + j, movement);
      for (int i = 0; i < 4; ++i) {
        int before = 0;  // members ordered before i by (key, index)
        for (int j = 0; j < 4; ++j) before += (key[j] < key[i]) | ((key[j] == key[i]) & (j < i));
        u.apply(base + i, before >= 2);
      }
      if (merger != nullptr) {
        for (int j = 0; j < 4; ++j) histogram_add0<S>(u.scores[base + j], local);
      }
    }
    if (merger != nullptr) merger->merge(local);
  });
}

template <typename W, typename S>
void run_block(const ElementUpdate<W, S>& up, int64_t rows, int64_t cols, int64_t block_rows, int64_t block_cols,
               const Rule& rule, HistogramMerger* merger) {
  const int64_t n_block_rows = (rows + block_rows - 1) / block_rows;
  const int64_t n_block_cols = (cols + block_cols - 1) / block_cols;
  const double thr = rule.threshold_as<float>();
  at::parallel_for(0, n_block_rows, 1, [&](int64_t begin, int64_t end) {
    const ElementUpdate<W, S> u = up;
    std::vector<double> sums(n_block_cols);
    std::vector<char> keep(n_block_cols);
    int64_t local[kHistSlots] = {};
    for (int64_t br = begin; br < end; ++br) {
      const int64_t r0 = br * block_rows, r1 = std::min(rows, r0 + block_rows);
      // 1) block keys at entry: Σw² or Σscores in float64, rounded once to float32
      std::fill(sums.begin(), sums.end(), 0.0);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t row = r * cols;
        for (int64_t bc = 0; bc < n_block_cols; ++bc) {
          const int64_t c0 = bc * block_cols, c1 = std::min(cols, c0 + block_cols);
          double s = sums[bc];
          if (rule.movement) {
            for (int64_t c = c0; c < c1; ++c) s += static_cast<double>(u.scores[row + c]);
          } else {
            for (int64_t c = c0; c < c1; ++c) {
              const double w = static_cast<double>(u.weight[row + c]);
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
      // 2) the update, block row still in cache; block sums of the updated scores for the histogram
      std::fill(sums.begin(), sums.end(), 0.0);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t row = r * cols;
        for (int64_t bc = 0; bc < n_block_cols; ++bc) {
          const int64_t c0 = bc * block_cols, c1 = std::min(cols, c0 + block_cols);
          const bool k = keep[bc];
          for (int64_t c = c0; c < c1; ++c) u.apply(row + c, k);
          if (merger != nullptr) {
            double s = sums[bc];
            for (int64_t c = c0; c < c1; ++c) s += static_cast<double>(u.scores[row + c]);
            sums[bc] = s;
          }
        }
      }
      if (merger != nullptr) {
        for (int64_t bc = 0; bc < n_block_cols; ++bc) histogram_add0<float>(static_cast<float>(sums[bc]), local);
      }
    }
    if (merger != nullptr) merger->merge(local);
  });
}

void check_like(const at::Tensor& t, const at::Tensor& weight, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK(t.sizes() == weight.sizes(), name, " must have the shape of weight ", weight.sizes(), ", got ",
              t.sizes());
}

void fused_prune_step_cpu(const at::Tensor& weight, const at::Tensor& grad, const std::optional<at::Tensor>& scores,
                          const at::Tensor& mask, const std::optional<at::Tensor>& histogram, c10::string_view method,
                          c10::string_view granularity, int64_t block_rows, int64_t block_cols, double threshold,
                          int64_t tie_cut, int64_t index_offset, double prior_scale, double lam, double var0,
                          double var1, double score_lr, bool mask_grad, bool mask_weight) {
  const bool movement = method == "movement" || method == "soft_movement";
  TORCH_CHECK(movement || method == "magnitude" || method == "mgpp",
              "method must be one of magnitude, mgpp, movement, soft_movement, got '", std::string(method), "'");
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
  TORCH_CHECK(has_scores || !movement, "scores is required for method='", std::string(method), "'");
  TORCH_CHECK(has_scores || score_lr == 0.0, "score_lr is non-zero but scores is None");
  const bool has_hist = histogram.has_value() && histogram->defined();
  if (has_hist) {
    TORCH_CHECK(movement, "histogram is only emitted for the movement methods");
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
  const Rule rule{movement, method == "soft_movement", threshold, tie_cut, index_offset};
  HistogramMerger merger;
  HistogramMerger* merger_ptr = has_hist ? &merger : nullptr;
  const at::ScalarType score_dtype = has_scores ? s.scalar_type() : weight.scalar_type();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "fused_prune_step_cpu", [&] {
    using W = scalar_t;
    using C = compute_t<W>;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, score_dtype, "fused_prune_step_cpu_scores", [&] {
      using S = scalar_t;
      ElementUpdate<W, S> up{w.mutable_data_ptr<W>(),
                             g.mutable_data_ptr<W>(),
                             has_scores ? s.mutable_data_ptr<S>() : nullptr,
                             m.mutable_data_ptr<bool>(),
                             update_scores,
                             static_cast<C>(score_lr),
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
  if (has_hist) histogram->add_(at::from_blob(merger.total, {kHistSlots}, at::kLong));
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_ops, CPU, m) {
  m.impl("fused_prune_step_cpu", &fused_prune_step_cpu);
}

}  // namespace sparse_ops
