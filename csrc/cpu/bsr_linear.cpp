// CPU kernel of sparse_ops::bsr_linear_cpu (schema in sparse_ops/ops/__init__.py; reference:
// sparse_ops.ops.reference.bsr_linear_ref).
//
//   y = act(x·Wᵀ + bias),  x (M, K) contiguous, W (N × K) in BSR by block rows: int32 crow_indices
//   (ceil(N / br) + 1), int32 col_indices (nnz_blocks) of block columns, values (nnz_blocks, br, bc);
//   bias (N) or None; act "none" or "gelu" (erf GELU in the write-back, as in csr_linear.cpp);
//   check_indices=false skips the validation of the index contents (the caller did it once);
//   returns a new (M, N) tensor in x.dtype. W is zero-padded to whole blocks; the
//   kernel never reads x past column K nor writes y past row N, so the padding's contents (even NaN)
//   never matter.
//
// Numerics: float32, float16 and bfloat16; products and sums in float32 (fused multiply-adds on the
// AVX2 path), the bias added in float32 and the result rounded once to x.dtype; the order of the
// sums differs from PyTorch's dense F.linear (results agree to rounding). fp16/bf16 values are
// converted to float32 one block row at a time, into a per-thread buffer of that row's blocks, just
// before its products: the weight is never converted (nor copied) as a whole.
//
// Algorithm (see common.h, "sparse linear layers"): threads split the block rows by stored blocks,
// or (M ≥ 5, enough token tiles) take whole tiles.
//  * M ≤ 4: per output row, dot products of the block rows' values with x (8 columns per vector).
//  * M ≥ 5, float32, AVX-512F, blocks of 16 or 32 rows: token-major (see bsr_token_major): x read
//    in place, 12 tokens × one block row of y in registers, y written row-major.
//  * M ≥ 5 otherwise: x is packed into float32 panels of token tiles (x transposed). A block row is
//    done in strips of rows: for each column j of each block, one panel row is multiplied by the
//    strip's weights into register accumulators, a small dense GEMM whose operands stay in L1 (a
//    block's panel rows are contiguous). AVX2: tiles of 16 tokens (2 ymm), strips of 4 rows; AVX-512F
//    (SPARSE_OPS_CPU_ISA unset or not "avx2"): tiles of up to 64 tokens (4 zmm), strips of 4 rows
//    (8 below 48 tokens). With enough tiles each thread takes whole tiles and packs their panels
//    itself (see bsr_tiles).
// Without AVX2/FMA (or with SPARSE_OPS_CPU_BASELINE=1) the same steps run as plain loops.
#include <torch/library.h>

#include "common.h"

namespace sparse_ops {
namespace {

constexpr int64_t kTileTokens = 16;        // AVX2: 2 ymm registers per accumulator row
constexpr int64_t kTileTokensAvx512 = 64;  // AVX-512: 4 zmm registers per accumulator row
constexpr int kStripRows = 4;              // AVX2: rows of a block row per strip
constexpr int64_t kMaxDotTokens = 4;  // up to this many tokens: dot products, no panels

// One block row (`rows` valid rows, blocks [b0, b1)) against a panel of W = 8V tokens:
// acc[r][t] = Σ_blocks Σ_j values[b][r][j] · panel[col[b]·bc + j][t] (columns < K only).
struct BlockRow {
  const int32_t* col;
  const float* val;  // (nnz_blocks, br, bc)
  int64_t b0, b1, br, bc, K, rows;
  const float* panel;
  float* acc;  // rows × W
};

#ifdef SPARSE_OPS_AVX2_FMA
#define UNROLL _Pragma("GCC unroll 16")  // fully unrolled loops keep the accumulator arrays in registers

template <int R, int V>
SPARSE_OPS_TARGET_AVX2_FMA void strip_avx2(const BlockRow& a, int64_t r0) {
  constexpr int64_t W = 8 * V;
  __m256 acc[R][V];
  UNROLL for (int i = 0; i < R; ++i) {
    UNROLL for (int v = 0; v < V; ++v) acc[i][v] = _mm256_setzero_ps();
  }
  const int64_t bc = a.bc;
  for (int64_t b = a.b0; b < a.b1; ++b) {
    const int64_t k0 = static_cast<int64_t>(a.col[b]) * bc, cols = std::min(bc, a.K - k0);
    const float* __restrict__ w = a.val + (b * a.br + r0) * bc;
    const float* __restrict__ xk = a.panel + k0 * W;
    for (int64_t j = 0; j < cols; ++j) {
      __m256 xv[V];
      UNROLL for (int v = 0; v < V; ++v) xv[v] = _mm256_loadu_ps(xk + j * W + 8 * v);
      UNROLL for (int i = 0; i < R; ++i) {
        const __m256 wi = _mm256_broadcast_ss(w + i * bc + j);
        UNROLL for (int v = 0; v < V; ++v) acc[i][v] = _mm256_fmadd_ps(wi, xv[v], acc[i][v]);
      }
    }
  }
  UNROLL for (int i = 0; i < R; ++i) {
    UNROLL for (int v = 0; v < V; ++v) _mm256_storeu_ps(a.acc + (r0 + i) * W + 8 * v, acc[i][v]);
  }
}

template <int V>
SPARSE_OPS_TARGET_AVX2_FMA void block_row_avx2(const BlockRow& a) {
  int64_t r = 0;
  for (; r + kStripRows <= a.rows; r += kStripRows) strip_avx2<kStripRows, V>(a, r);
  switch (a.rows - r) {
    case 3: strip_avx2<3, V>(a, r); break;
    case 2: strip_avx2<2, V>(a, r); break;
    case 1: strip_avx2<1, V>(a, r); break;
    default: break;
  }
}

// The same with 16-lane zmm registers, W = 16·V tokens and strips of R rows (R·V accumulators: 16
// or 8, enough independent multiply-add chains; 4 + R loads per R·V multiply-adds for V = 4).
template <int R, int V>
SPARSE_OPS_TARGET_AVX512 void strip_avx512(const BlockRow& a, int64_t r0) {
  constexpr int64_t W = 16 * V;
  __m512 acc[R][V];
  UNROLL for (int i = 0; i < R; ++i) {
    UNROLL for (int v = 0; v < V; ++v) acc[i][v] = _mm512_setzero_ps();
  }
  const int64_t bc = a.bc;
  for (int64_t b = a.b0; b < a.b1; ++b) {
    const int64_t k0 = static_cast<int64_t>(a.col[b]) * bc, cols = std::min(bc, a.K - k0);
    const float* __restrict__ w = a.val + (b * a.br + r0) * bc;
    const float* __restrict__ xk = a.panel + k0 * W;
    for (int64_t j = 0; j < cols; ++j) {
      __m512 xv[V];
      UNROLL for (int v = 0; v < V; ++v) xv[v] = _mm512_loadu_ps(xk + j * W + 16 * v);
      UNROLL for (int i = 0; i < R; ++i) {
        const __m512 wi = _mm512_set1_ps(w[i * bc + j]);
        UNROLL for (int v = 0; v < V; ++v) acc[i][v] = _mm512_fmadd_ps(wi, xv[v], acc[i][v]);
      }
    }
  }
  UNROLL for (int i = 0; i < R; ++i) {
    UNROLL for (int v = 0; v < V; ++v) _mm512_storeu_ps(a.acc + (r0 + i) * W + 16 * v, acc[i][v]);
  }
}

// the last `left` (< R) rows of a block row, from r0: one strip of exactly that many rows
template <int R, int V>
SPARSE_OPS_TARGET_AVX512 void last_strip_avx512(const BlockRow& a, int64_t r0, int64_t left) {
  if constexpr (R > 0) {
    left == R ? strip_avx512<R, V>(a, r0) : last_strip_avx512<R - 1, V>(a, r0, left);
  }
}

template <int V>
SPARSE_OPS_TARGET_AVX512 void block_row_avx512(const BlockRow& a) {
  constexpr int R = V >= 3 ? 4 : 8;
  int64_t r = 0;
  for (; r + R <= a.rows; r += R) strip_avx512<R, V>(a, r);
  if (r < a.rows) last_strip_avx512<R - 1, V>(a, r, a.rows - r);
}

// Σ of the 8 lanes
SPARSE_OPS_TARGET_AVX2_FMA inline float lane_sum(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

// Dot products for one token xm (float32, K values) and rows [r0, r0 + R) of the block row:
// out[r] = Σ_blocks values[b][r][:] · xm[block's columns], 8 columns per vector.
template <int R>
SPARSE_OPS_TARGET_AVX2_FMA void dot_strip_avx2(const BlockRow& a, const float* xm, int64_t r0, float* out) {
  const int64_t bc = a.bc;
  __m256 acc[R];
  float tail[R];
  UNROLL for (int i = 0; i < R; ++i) {
    acc[i] = _mm256_setzero_ps();
    tail[i] = 0.0f;
  }
  for (int64_t b = a.b0; b < a.b1; ++b) {
    const int64_t k0 = static_cast<int64_t>(a.col[b]) * bc, cols = std::min(bc, a.K - k0), c8 = cols / 8 * 8;
    const float* __restrict__ w = a.val + (b * a.br + r0) * bc;
    for (int64_t j = 0; j < c8; j += 8) {
      const __m256 xv = _mm256_loadu_ps(xm + k0 + j);
      UNROLL for (int i = 0; i < R; ++i) acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(w + i * bc + j), xv, acc[i]);
    }
    for (int64_t j = c8; j < cols; ++j) {
      UNROLL for (int i = 0; i < R; ++i) tail[i] = std::fma(w[i * bc + j], xm[k0 + j], tail[i]);
    }
  }
  UNROLL for (int i = 0; i < R; ++i) out[r0 + i] = lane_sum(acc[i]) + tail[i];
}

SPARSE_OPS_TARGET_AVX2_FMA void dots_avx2(const BlockRow& a, const float* xm, float* out) {
  int64_t r = 0;
  for (; r + kStripRows <= a.rows; r += kStripRows) dot_strip_avx2<kStripRows>(a, xm, r, out);
  switch (a.rows - r) {
    case 3: dot_strip_avx2<3>(a, xm, r, out); break;
    case 2: dot_strip_avx2<2>(a, xm, r, out); break;
    case 1: dot_strip_avx2<1>(a, xm, r, out); break;
    default: break;
  }
}
#undef UNROLL
#endif

template <int V>
void block_row_plain(const BlockRow& a) {
  constexpr int64_t W = 8 * V;
  for (int64_t r = 0; r < a.rows; ++r) {
    float acc[W] = {};
    for (int64_t b = a.b0; b < a.b1; ++b) {
      const int64_t k0 = static_cast<int64_t>(a.col[b]) * a.bc, cols = std::min(a.bc, a.K - k0);
      const float* w = a.val + (b * a.br + r) * a.bc;
      for (int64_t j = 0; j < cols; ++j) {
        const float* xk = a.panel + (k0 + j) * W;
        for (int64_t t = 0; t < W; ++t) acc[t] += w[j] * xk[t];
      }
    }
    for (int64_t t = 0; t < W; ++t) a.acc[r * W + t] = acc[t];
  }
}

void dots_plain(const BlockRow& a, const float* xm, float* out) {
  for (int64_t r = 0; r < a.rows; ++r) {
    float s[8] = {};  // 8 partial sums, as the vector path
    for (int64_t b = a.b0; b < a.b1; ++b) {
      const int64_t k0 = static_cast<int64_t>(a.col[b]) * a.bc, cols = std::min(a.bc, a.K - k0);
      const float* w = a.val + (b * a.br + r) * a.bc;
      for (int64_t j = 0; j < cols; ++j) s[j % 8] += w[j] * xm[k0 + j];
    }
    out[r] = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  }
}

// W: the tile's padded width (tiles from bsr_token_tiles: a multiple of 16 up to 64 with AVX-512,
// 8 or 16 otherwise)
void block_row(const BlockRow& a, int64_t W) {
#ifdef SPARSE_OPS_AVX2_FMA
  if (use_avx512()) {
    switch (W / 16) {
      case 1: block_row_avx512<1>(a); break;
      case 2: block_row_avx512<2>(a); break;
      case 3: block_row_avx512<3>(a); break;
      default: block_row_avx512<4>(a); break;
    }
    return;
  }
  if (use_avx2_fma()) {
    W == 8 ? block_row_avx2<1>(a) : block_row_avx2<2>(a);
    return;
  }
#endif
  W == 8 ? block_row_plain<1>(a) : block_row_plain<2>(a);
}

void dots(const BlockRow& a, const float* xm, float* out) {
#ifdef SPARSE_OPS_AVX2_FMA
  if (use_avx2_fma()) {
    dots_avx2(a, xm, out);
    return;
  }
#endif
  dots_plain(a, xm, out);
}

template <typename T>
struct Bsr {
  const int32_t* crow;
  const int32_t* col;
  const T* val;  // as stored: float32, float16 or bfloat16
  int64_t br, bc, block_rows;
};

// Block row i of w as a BlockRow over float32 values: float32 values in place; fp16/bf16 ones
// converted into `scratch` (this row's blocks only), with the row's columns and blocks renumbered
// from 0.
template <typename T>
BlockRow block_row_at(const Bsr<T>& w, int64_t i, int64_t K, int64_t rows, std::vector<float>& scratch) {
  const int64_t b0 = w.crow[i], b1 = w.crow[i + 1];
  if constexpr (std::is_same_v<T, float>) {
    return BlockRow{w.col, w.val, b0, b1, w.br, w.bc, K, rows, nullptr, nullptr};
  } else {
    const int64_t n = (b1 - b0) * w.br * w.bc;
    if (static_cast<int64_t>(scratch.size()) < n) scratch.resize(n);
    const T* src = w.val + b0 * w.br * w.bc;
    for (int64_t e = 0; e < n; ++e) scratch[e] = static_cast<float>(load_value(src + e));
    return BlockRow{w.col + b0, scratch.data(), 0, b1 - b0, w.br, w.bc, K, rows, nullptr, nullptr};
  }
}

// Token tiles for block_row: up to 64 tokens in multiples of 16 with AVX-512, else 16 in multiples of 8.
inline TokenTiles bsr_token_tiles(int64_t M) {
  return use_avx512() ? make_token_tiles(M, kTileTokensAvx512, 16) : make_token_tiles(M, kTileTokens);
}

// Block row a (rows n0 .. n0 + rows of y) against token tile j, written to y.
template <typename T>
void block_row_tile(BlockRow& a, const TokenTiles& tiles, int64_t j, int64_t n0, const float* bias, Activation act,
                    T* y, int64_t N) {
  const int64_t W = tiles.padded(j), rows = a.rows;
  block_row(a, W);
  if (act == Activation::kNone) {
    store_tile<T>(a.acc, W, n0, n0 + rows, tiles.begin(j), tiles.size(j), bias, y, N);
  } else {
    finish_rows(a.acc, W, rows, W, bias != nullptr ? bias + n0 : nullptr, act);
    store_tile<T>(a.acc, W, n0, n0 + rows, tiles.begin(j), tiles.size(j), nullptr, y, N);
  }
}

// M ≥ kMaxDotTokens + 1: panels of token tiles. Where split_by_tiles says so each thread takes whole
// tiles, packs each one's panel itself (it stays in its L2) and runs every block row over it;
// otherwise all panels are packed first and each thread runs its share of the block rows over every
// tile.
template <typename T>
void bsr_tiles(const T* x, int64_t M, int64_t K, const Bsr<T>& w, const float* bias, Activation act, T* y,
               int64_t N) {
  const TokenTiles tiles = bsr_token_tiles(M);
  const int64_t parts = worth_threads(M * static_cast<int64_t>(w.crow[w.block_rows]) * w.br * w.bc);
  at::Tensor acc = at::empty({parts, w.br * tiles.width}, at::kFloat);
  if (split_by_tiles(tiles, parts)) {
    at::Tensor panels = at::empty({parts, K * tiles.width}, at::kFloat);
    at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch;  // fp16/bf16: the current block row's values as float32
      for (int64_t part = begin; part < end; ++part) {
        float* panel = panels.data_ptr<float>() + part * K * tiles.width;
        for (int64_t j = first_tile(tiles, part, parts); j < first_tile(tiles, part + 1, parts); ++j) {
          pack_tile<T>(x, K, tiles, j, panel);
          for (int64_t i = 0; i < w.block_rows; ++i) {
            const int64_t n0 = i * w.br;
            BlockRow a = block_row_at(w, i, K, std::min(w.br, N - n0), scratch);
            a.panel = panel;
            a.acc = acc.data_ptr<float>() + part * w.br * tiles.width;
            block_row_tile<T>(a, tiles, j, n0, bias, act, y, N);
          }
        }
      }
    });
    return;
  }
  at::Tensor panels = at::empty({tiles.panel_floats(K)}, at::kFloat);
  pack_panels<T>(x, K, tiles, panels.data_ptr<float>());
  const std::vector<int64_t> cut = split_rows_by_entries(w.crow, w.block_rows, parts, 1);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    for (int64_t part = begin; part < end; ++part) {
      for (int64_t i = cut[part]; i < cut[part + 1]; ++i) {
        const int64_t n0 = i * w.br;
        BlockRow a = block_row_at(w, i, K, std::min(w.br, N - n0), scratch);
        a.acc = acc.data_ptr<float>() + part * w.br * tiles.width;  // rows × W floats
        for (int64_t j = 0; j < tiles.count; ++j) {
          a.panel = panels.data_ptr<float>() + tiles.begin(j) * K;
          block_row_tile<T>(a, tiles, j, n0, bias, act, y, N);
        }
      }
    }
  });
}

// M ≤ kMaxDotTokens: dot products; xf is x as contiguous float32 (M, K).
template <typename T>
void bsr_dots(const at::Tensor& xf, const Bsr<T>& w, const float* bias, Activation act, T* y, int64_t N) {
  const int64_t M = xf.size(0), K = xf.size(1);
  const int64_t parts = worth_threads(M * static_cast<int64_t>(w.crow[w.block_rows]) * w.br * w.bc);
  const std::vector<int64_t> cut = split_rows_by_entries(w.crow, w.block_rows, parts, 1);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> out(w.br), scratch;
    for (int64_t part = begin; part < end; ++part) {
      for (int64_t i = cut[part]; i < cut[part + 1]; ++i) {
        const int64_t n0 = i * w.br, rows = std::min(w.br, N - n0);
        const BlockRow a = block_row_at(w, i, K, rows, scratch);
        for (int64_t m = 0; m < M; ++m) {
          dots(a, xf.const_data_ptr<float>() + m * K, out.data());
          for (int64_t r = 0; r < rows; ++r) {
            const float v = out[r] + (bias != nullptr ? bias[n0 + r] : 0.0f);
            store_value(y + m * N + n0 + r, act == Activation::kGelu ? gelu_f32(v) : v);
          }
        }
      }
    }
  });
}

#ifdef SPARSE_OPS_AVX2_FMA
// Token-major path: float32 with AVX-512F, blocks of 16 or 32 rows (V = br / 16 zmm registers per
// token). Each thread first transposes its block rows' blocks into a buffer (wt[b][j][r]: column j's
// rows contiguous); then for 12 tokens at a time, each column j is V loads of wt and one broadcast of
// x[t][k] per token into 12·V register accumulators, which are y[t][block row's rows] itself: x is
// read in place (no panel) and y is written row-major from the registers (no transpose). On
// MiniLM's shapes at 128 tokens, packing x and transposing y back took about as long as the
// multiply-adds of the panel path (Xeon, AVX-512: a layer with one stored block cost 37-105 us of
// the 52-227 us of its 90%-sparse version); this path halves that cost. The sums run in the same
// order as in the panel path (blocks, then columns, one multiply-add each): the same bits.
#define UNROLL _Pragma("GCC unroll 16")
constexpr int64_t kTokenMajorRows = 12;  // tokens per register tile

struct TokenMajor {
  const float* wt;  // blocks × bc × 16V: the block row's blocks transposed
  const int32_t* col;
  int64_t blocks, bc, K;
  const float* x;
  int64_t rows, n0;  // valid rows of the block row, its first row in y
  const float* bias;
  Activation act;
  float* y;
  int64_t N;
};

template <int T, int V>
SPARSE_OPS_TARGET_AVX512 void token_rows_avx512(const TokenMajor& a, int64_t m0) {
  __m512 acc[T][V];
  UNROLL for (int t = 0; t < T; ++t) {
    UNROLL for (int v = 0; v < V; ++v) acc[t][v] = _mm512_setzero_ps();
  }
  const int64_t K = a.K;
  for (int64_t b = 0; b < a.blocks; ++b) {
    const int64_t k0 = static_cast<int64_t>(a.col[b]) * a.bc, cols = std::min(a.bc, K - k0);
    const float* __restrict__ w = a.wt + b * a.bc * 16 * V;
    const float* __restrict__ xk = a.x + m0 * K + k0;
    for (int64_t j = 0; j < cols; ++j) {
      __m512 wv[V];
      UNROLL for (int v = 0; v < V; ++v) wv[v] = _mm512_loadu_ps(w + j * 16 * V + 16 * v);
      UNROLL for (int t = 0; t < T; ++t) {
        const __m512 xb = _mm512_set1_ps(xk[t * K + j]);
        UNROLL for (int v = 0; v < V; ++v) acc[t][v] = _mm512_fmadd_ps(wv[v], xb, acc[t][v]);
      }
    }
  }
  UNROLL for (int v = 0; v < V; ++v) {
    const int64_t lanes = std::min<int64_t>(16, a.rows - 16 * v);
    if (lanes <= 0) break;
    const __mmask16 m = lanes == 16 ? __mmask16{0xFFFF} : static_cast<__mmask16>((1u << lanes) - 1);
    const __m512 bias = a.bias != nullptr ? _mm512_maskz_loadu_ps(m, a.bias + a.n0 + 16 * v) : _mm512_setzero_ps();
    UNROLL for (int t = 0; t < T; ++t) {
      __m512 out = _mm512_add_ps(acc[t][v], bias);
      if (a.act == Activation::kGelu) out = gelu_avx512(out);
      _mm512_mask_storeu_ps(a.y + (m0 + t) * a.N + a.n0 + 16 * v, m, out);
    }
  }
}

// the last `left` (< T) tokens, from m0
template <int T, int V>
SPARSE_OPS_TARGET_AVX512 void last_token_rows_avx512(const TokenMajor& a, int64_t m0, int64_t left) {
  if constexpr (T > 0) {
    left == T ? token_rows_avx512<T, V>(a, m0) : last_token_rows_avx512<T - 1, V>(a, m0, left);
  }
}

// y = act(x·Wᵀ + bias) for float32 x (M, K) and blocks of 16V rows: threads split the block rows by
// stored blocks; each transposes its blocks once, then for each 12 tokens runs all its block rows, so
// that those y rows are written left to right (rows of y N floats apart, written one block row at a
// time for all tokens, cost as much as the multiply-adds: they share few cache sets and pages).
template <int V>
void bsr_token_major(const float* x, int64_t M, int64_t K, const Bsr<float>& w, const float* bias, Activation act,
                     float* y, int64_t N) {
  const int64_t br = w.br, bc = w.bc;
  const int64_t parts = worth_threads(M * static_cast<int64_t>(w.crow[w.block_rows]) * br * bc);
  const std::vector<int64_t> cut = split_rows_by_entries(w.crow, w.block_rows, parts, 1);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      const int64_t i0 = cut[part], i1 = cut[part + 1], first = w.crow[i0];
      std::vector<float> wt((w.crow[i1] - first) * br * bc);
      for (int64_t b = first; b < w.crow[i1]; ++b) {
        const float* src = w.val + b * br * bc;
        float* dst = wt.data() + (b - first) * br * bc;
        for (int64_t r = 0; r < br; ++r) {
          for (int64_t j = 0; j < bc; ++j) dst[j * br + r] = src[r * bc + j];
        }
      }
      for (int64_t m = 0; m < M; m += kTokenMajorRows) {
        const int64_t left = std::min(kTokenMajorRows, M - m);
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t b0 = w.crow[i];
          const TokenMajor a{wt.data() + (b0 - first) * br * bc, w.col + b0, w.crow[i + 1] - b0, bc, K, x,
                             std::min(br, N - i * br), i * br, bias, act, y, N};
          left == kTokenMajorRows ? token_rows_avx512<kTokenMajorRows, V>(a, m)
                                  : last_token_rows_avx512<kTokenMajorRows - 1, V>(a, m, left);
        }
      }
    }
  });
}
#undef UNROLL
#endif

// Whether bsr_token_major takes this call: float32 x, AVX-512F, blocks of 16 or 32 rows.
template <typename T>
bool token_major(const Bsr<T>& w) {
#ifdef SPARSE_OPS_AVX2_FMA
  return std::is_same_v<T, float> && use_avx512() && (w.br == 16 || w.br == 32);
#else
  return false;
#endif
}

at::Tensor bsr_linear_cpu(const at::Tensor& x, const at::Tensor& crow_indices, const at::Tensor& col_indices,
                          const at::Tensor& values, const std::optional<at::Tensor>& bias, int64_t out_features,
                          c10::string_view activation, bool check_indices) {
  check_sparse_linear(x, crow_indices, col_indices, values, bias, out_features, /*blocked=*/true, check_indices);
  const Activation act = parse_activation(std::string(activation));
  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  at::Tensor y = at::empty({M, N}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (M == 0) return y;
  const at::Tensor xc = x.contiguous(), crow = crow_indices.contiguous(), col = col_indices.contiguous();
  const at::Tensor vals = values.contiguous();  // as stored (x's dtype): converted per block row, in the loops
  const at::Tensor bias_f = bias.has_value() && bias->defined() ? contiguous_float(*bias) : at::Tensor();
  const float* b = bias_f.defined() ? bias_f.const_data_ptr<float>() : nullptr;
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    const Bsr<T> w{crow.const_data_ptr<int32_t>(), col.const_data_ptr<int32_t>(), vals.const_data_ptr<T>(),
                   values.size(1), values.size(2), crow.numel() - 1};
    if (M <= kMaxDotTokens) {
      bsr_dots<T>(contiguous_float(xc), w, b, act, y.mutable_data_ptr<T>(), N);
    } else if (token_major(w)) {
#ifdef SPARSE_OPS_AVX2_FMA
      if constexpr (std::is_same_v<T, float>) {
        const float* xf = xc.const_data_ptr<float>();
        float* yf = y.mutable_data_ptr<float>();
        w.br == 16 ? bsr_token_major<1>(xf, M, K, w, b, act, yf, N) : bsr_token_major<2>(xf, M, K, w, b, act, yf, N);
      }
#endif
    } else {
      bsr_tiles<T>(xc.const_data_ptr<T>(), M, K, w, b, act, y.mutable_data_ptr<T>(), N);
    }
  };
  switch (x.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kHalf: run(c10::Half{}); break;
    default: run(c10::BFloat16{}); break;  // the only other dtype check_sparse_linear lets through
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_ops, CPU, m) {
  m.impl("bsr_linear_cpu", &bsr_linear_cpu);
}

}  // namespace sparse_ops
