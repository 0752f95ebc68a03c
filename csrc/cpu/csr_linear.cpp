// CPU kernel of sparse_ops::csr_linear_cpu (schema in sparse_ops/ops/__init__.py; reference:
// sparse_ops.ops.reference.csr_linear_ref).
//
//   y = act(x·Wᵀ + bias),  x (M, K) contiguous, W (N × K) in CSR by rows (int32 crow_indices (N + 1),
//   col_indices (nnz): int32, or uint16 when K ≤ 65,536 (2 bytes instead of 4 per stored weight),
//   values (nnz)), bias (N) or None, act "none" or "gelu" (erf GELU, fused into the write-back);
//   returns a new (M, N) tensor in x.dtype. check_indices=false skips the O(nnz) validation of the
//   index contents, for callers that validated these tensors already (SparseLinear does, once).
//
// Numerics: float32, float16 and bfloat16; products and sums in float32 (fused multiply-adds on the
// AVX2 path), the bias added in float32, GELU in float32 (gelu_f32 in common.h, or its FMA
// copy gelu_avx512 on AVX-512 CPUs; error ≤ 0.75e-7·|v| either way)
// and the result rounded once to x.dtype. fp16/bf16 values are read as stored and converted one by
// one: the weight is never converted as a whole. The order of the sums differs from PyTorch's dense
// F.linear, so results agree with it to rounding (the tests use flash-attention's rule: at most
// twice PyTorch's own error against a float64 reference).
//
// Algorithm (see common.h, "sparse linear layers"): rows are split between threads by stored
// entries (not by count), so uneven rows still balance.
//  * M = 1: one dot product per row over the gathered entries of x (AVX2 gathers for float32), the
//    sums in float32, then bias and activation over the whole part at once (vectorised); a second
//    thread from 16K stored entries (below that, one thread is faster).
//  * M ≥ 2: x is packed into float32 panels of up to 64 tokens (x transposed); each stored
//    w[n, k] is one broadcast multiply-add of panel row k into row n's accumulators, which stay in
//    registers for the whole row. For cache locality the columns are walked in chunks: each thread
//    passes over all its rows once per chunk of columns, so the chunk of the panel it reads (about
//    128 KB) stays in L2; per-row cursors remember where each row's next chunk starts (columns
//    sorted within a row keep every pass short; unsorted columns still give the right result).
//    Threads take whole token tiles when there are enough of them (each packs its tile's panel into
//    its own buffer, which stays in its L2, where packing every panel first would send them out to
//    memory and back), otherwise they split the rows.
// With AVX-512F (and SPARSE_OPS_CPU_ISA unset or not "avx2") the M ≥ 2 multiply-adds use 16-lane
// registers. Without AVX2/FMA (or with SPARSE_OPS_CPU_BASELINE=1) the same steps run as plain loops.
#include <torch/library.h>

#include <array>
#include <limits>

#include "common.h"

namespace sparse_ops {
namespace {

constexpr int64_t kMaxTileTokens = 64;            // 8 AVX registers of accumulators per row
constexpr int64_t kPanelChunkBytes = 128 * 1024;  // panel bytes one pass over the rows reads (in L2)
constexpr int64_t kStoreRows = 16;                // rows per write-back group
constexpr int64_t kMinGemvEntriesPerThread = int64_t{1} << 14;  // M = 1: a second thread pays from ~16K entries

// One pass over rows [0, rows) for the columns below `limit`: row r continues from cursor[r] up to
// its end row_end[r] or its first column ≥ limit, adding val·panel[col] into acc row r (which
// starts at zero when `first`). col: int32 or uint16 (I), val: float32, float16 or bfloat16 (VT),
// read as stored (converted entry by entry, never as a whole).
struct ChunkArgs {
  const void* col;
  const void* val;
  const int32_t* row_end;  // crow + first row + 1
  int64_t* cursor;
  int64_t rows;
  int32_t limit;
  const float* panel;
  float* acc;
  bool first;
};

using ChunkFn = void (*)(const ChunkArgs&);

template <typename VT>
inline float value_at(const VT* val, int64_t p) {
  return static_cast<float>(load_value(val + p));
}

#ifdef SPARSE_OPS_AVX2_FMA
#define UNROLL _Pragma("GCC unroll 16")  // fully unrolled loops keep the accumulator arrays in registers

template <int V, typename I, typename VT>
SPARSE_OPS_TARGET_AVX2_FMA void chunk_avx2(const ChunkArgs& a) {
  constexpr int64_t W = 8 * V;
  // independent accumulator sets, so that at least ~8 FMA chains hide the FMA latency
  constexpr int S = V >= 5 ? 1 : (V >= 3 ? 2 : 4);
  const I* __restrict__ col = static_cast<const I*>(a.col);
  const VT* __restrict__ val = static_cast<const VT*>(a.val);
  const float* __restrict__ panel = a.panel;
  const int64_t limit = a.limit;
  for (int64_t r = 0; r < a.rows; ++r) {
    float* __restrict__ out = a.acc + r * W;
    __m256 acc[S][V];
    UNROLL for (int v = 0; v < V; ++v) acc[0][v] = a.first ? _mm256_setzero_ps() : _mm256_loadu_ps(out + 8 * v);
    UNROLL for (int s = 1; s < S; ++s) {
      UNROLL for (int v = 0; v < V; ++v) acc[s][v] = _mm256_setzero_ps();
    }
    int64_t p = a.cursor[r];
    const int64_t end = a.row_end[r];
    for (; p + S <= end && static_cast<int64_t>(col[p + S - 1]) < limit; p += S) {
      UNROLL for (int s = 0; s < S; ++s) {
        const __m256 w = _mm256_set1_ps(value_at(val, p + s));
        const float* xk = panel + static_cast<int64_t>(col[p + s]) * W;
        UNROLL for (int v = 0; v < V; ++v) acc[s][v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xk + 8 * v), acc[s][v]);
      }
    }
    for (; p < end && static_cast<int64_t>(col[p]) < limit; ++p) {
      const __m256 w = _mm256_set1_ps(value_at(val, p));
      const float* xk = panel + static_cast<int64_t>(col[p]) * W;
      UNROLL for (int v = 0; v < V; ++v) acc[0][v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xk + 8 * v), acc[0][v]);
    }
    a.cursor[r] = p;
    UNROLL for (int s = 1; s < S; ++s) {
      UNROLL for (int v = 0; v < V; ++v) acc[0][v] = _mm256_add_ps(acc[0][v], acc[s][v]);
    }
    UNROLL for (int v = 0; v < V; ++v) _mm256_storeu_ps(out + 8 * v, acc[0][v]);
  }
}

// The same with 16-token zmm registers (W = 16·V tokens), for CPUs with AVX-512F: half the loads
// and multiply-adds per stored weight (benchmarks/ceiling/csr_tile_ceiling.cpp measures the gain).
template <int V, typename I, typename VT>
SPARSE_OPS_TARGET_AVX512 void chunk_avx512(const ChunkArgs& a) {
  constexpr int64_t W = 16 * V;
  constexpr int S = V >= 4 ? 1 : (V >= 2 ? 2 : 4);  // independent accumulator sets, as in chunk_avx2
  const I* __restrict__ col = static_cast<const I*>(a.col);
  const VT* __restrict__ val = static_cast<const VT*>(a.val);
  const float* __restrict__ panel = a.panel;
  const int64_t limit = a.limit;
  for (int64_t r = 0; r < a.rows; ++r) {
    float* __restrict__ out = a.acc + r * W;
    __m512 acc[S][V];
    UNROLL for (int v = 0; v < V; ++v) acc[0][v] = a.first ? _mm512_setzero_ps() : _mm512_loadu_ps(out + 16 * v);
    UNROLL for (int s = 1; s < S; ++s) {
      UNROLL for (int v = 0; v < V; ++v) acc[s][v] = _mm512_setzero_ps();
    }
    int64_t p = a.cursor[r];
    const int64_t end = a.row_end[r];
    for (; p + S <= end && static_cast<int64_t>(col[p + S - 1]) < limit; p += S) {
      UNROLL for (int s = 0; s < S; ++s) {
        const __m512 w = _mm512_set1_ps(value_at(val, p + s));
        const float* xk = panel + static_cast<int64_t>(col[p + s]) * W;
        UNROLL for (int v = 0; v < V; ++v) acc[s][v] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xk + 16 * v), acc[s][v]);
      }
    }
    for (; p < end && static_cast<int64_t>(col[p]) < limit; ++p) {
      const __m512 w = _mm512_set1_ps(value_at(val, p));
      const float* xk = panel + static_cast<int64_t>(col[p]) * W;
      UNROLL for (int v = 0; v < V; ++v) acc[0][v] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xk + 16 * v), acc[0][v]);
    }
    a.cursor[r] = p;
    UNROLL for (int s = 1; s < S; ++s) {
      UNROLL for (int v = 0; v < V; ++v) acc[0][v] = _mm512_add_ps(acc[0][v], acc[s][v]);
    }
    UNROLL for (int v = 0; v < V; ++v) _mm512_storeu_ps(out + 16 * v, acc[0][v]);
  }
}
#undef UNROLL

// 8 column indices as int32 lanes
template <typename I>
SPARSE_OPS_TARGET_AVX2_FMA inline __m256i load8_index(const I* p) {
  if constexpr (std::is_same_v<I, uint16_t>) {
    return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
}

// s[n] = Σ val·x[col] for rows [n0, n1), one token, float32 values: 8 entries per gather.
template <typename I>
SPARSE_OPS_TARGET_AVX2_FMA void gemv_avx2(const int32_t* crow, const I* col, const float* val, const float* x,
                                          float* s, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t p = crow[n];
    const int64_t end = crow[n + 1];
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (; p + 16 <= end; p += 16) {
      s0 = _mm256_fmadd_ps(_mm256_loadu_ps(val + p), _mm256_i32gather_ps(x, load8_index(col + p), 4), s0);
      s1 = _mm256_fmadd_ps(_mm256_loadu_ps(val + p + 8), _mm256_i32gather_ps(x, load8_index(col + p + 8), 4), s1);
    }
    if (p + 8 <= end) {
      s0 = _mm256_fmadd_ps(_mm256_loadu_ps(val + p), _mm256_i32gather_ps(x, load8_index(col + p), 4), s0);
      p += 8;
    }
    s0 = _mm256_add_ps(s0, s1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s0), _mm256_extractf128_ps(s0, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    float sum = _mm_cvtss_f32(h);
    for (; p < end; ++p) sum = std::fma(val[p], x[col[p]], sum);
    s[n - n0] = sum;
  }
}
#endif

template <int V, typename I, typename VT>
void chunk_plain(const ChunkArgs& a) {
  constexpr int64_t W = 8 * V;
  const I* col = static_cast<const I*>(a.col);
  const VT* val = static_cast<const VT*>(a.val);
  for (int64_t r = 0; r < a.rows; ++r) {
    float acc[W];
    for (int64_t t = 0; t < W; ++t) acc[t] = a.first ? 0.0f : a.acc[r * W + t];
    int64_t p = a.cursor[r];
    for (; p < a.row_end[r] && static_cast<int64_t>(col[p]) < a.limit; ++p) {
      const float w = value_at(val, p);
      const float* xk = a.panel + static_cast<int64_t>(col[p]) * W;
      for (int64_t t = 0; t < W; ++t) acc[t] += w * xk[t];
    }
    a.cursor[r] = p;
    for (int64_t t = 0; t < W; ++t) a.acc[r * W + t] = acc[t];
  }
}

// s[n] = Σ val·x[col] for rows [n0, n1), one token, values of type VT converted on the fly.
template <typename I, typename VT>
void gemv_plain(const int32_t* crow, const I* col, const VT* val, const float* x, float* s, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // 4 independent sums
    int64_t p = crow[n];
    const int64_t end = crow[n + 1];
    for (; p + 4 <= end; p += 4) {
      for (int i = 0; i < 4; ++i) part[i] += value_at(val, p + i) * x[col[p + i]];
    }
    for (; p < end; ++p) part[0] += value_at(val, p) * x[col[p]];
    s[n - n0] = (part[0] + part[1]) + (part[2] + part[3]);
  }
}

// The chunk kernel for each tile width W = 8, 16, ..., 64 tokens, indexed by W / 8: with AVX-512,
// the 16-lane loop for widths that are multiples of 16 and the AVX2 one for the others.
template <typename I, typename VT>
std::array<ChunkFn, 9> chunk_table() {
#ifdef SPARSE_OPS_AVX2_FMA
  if (use_avx512()) {
    return {nullptr, &chunk_avx2<1, I, VT>, &chunk_avx512<1, I, VT>, &chunk_avx2<3, I, VT>, &chunk_avx512<2, I, VT>,
            &chunk_avx2<5, I, VT>, &chunk_avx512<3, I, VT>, &chunk_avx2<7, I, VT>, &chunk_avx512<4, I, VT>};
  }
  if (use_avx2_fma()) {
    return {nullptr, &chunk_avx2<1, I, VT>, &chunk_avx2<2, I, VT>, &chunk_avx2<3, I, VT>, &chunk_avx2<4, I, VT>,
            &chunk_avx2<5, I, VT>, &chunk_avx2<6, I, VT>, &chunk_avx2<7, I, VT>, &chunk_avx2<8, I, VT>};
  }
#endif
  return {nullptr, &chunk_plain<1, I, VT>, &chunk_plain<2, I, VT>, &chunk_plain<3, I, VT>, &chunk_plain<4, I, VT>,
          &chunk_plain<5, I, VT>, &chunk_plain<6, I, VT>, &chunk_plain<7, I, VT>, &chunk_plain<8, I, VT>};
}

// Rows [n0, n1) of token tile j, whose panel is `panel`: the passes over the column chunks, the
// last one in groups of rows that are finished and written to y while their accumulators are in L1.
// acc: (n1 − n0) × tiles.width floats, cursor: n1 − n0 entries.
template <typename T, typename I>
void csr_tile_rows(const TokenTiles& tiles, int64_t j, int64_t n0, int64_t n1, const float* panel, int64_t K,
                   const int32_t* crow, const I* col, const T* val, const float* bias, Activation act, T* y, int64_t N,
                   float* acc, int64_t* cursor) {
  if (n0 == n1) return;
  const auto table = chunk_table<I, T>();
  const int64_t W = tiles.padded(j);
  // column chunks: about kPanelChunkBytes of panel each, all of about the same width
  const int64_t chunk_cols = std::max<int64_t>(8, kPanelChunkBytes / (4 * W));
  const int64_t chunks = (K + chunk_cols - 1) / chunk_cols;
  const int64_t cols_per_chunk = (K + chunks - 1) / chunks;
  ChunkArgs args{col, val, crow + n0 + 1, cursor, n1 - n0, 0, panel, acc, true};
  for (int64_t n = n0; n < n1; ++n) cursor[n - n0] = crow[n];
  for (int64_t c = 0; c + 1 < chunks; ++c) {
    args.limit = static_cast<int32_t>((c + 1) * cols_per_chunk);
    args.first = c == 0;
    table[W / 8](args);
  }
  args.limit = std::numeric_limits<int32_t>::max();
  args.first = chunks == 1;
  for (int64_t g = n0; g < n1; g += kStoreRows) {
    ChunkArgs group = args;
    group.row_end += g - n0;
    group.cursor += g - n0;
    group.rows = std::min(kStoreRows, n1 - g);
    group.acc += (g - n0) * W;
    table[W / 8](group);
    if (act == Activation::kNone) {
      store_tile<T>(group.acc, W, g, g + group.rows, tiles.begin(j), tiles.size(j), bias, y, N);
    } else {
      finish_rows(group.acc, W, group.rows, W, bias != nullptr ? bias + g : nullptr, act);
      store_tile<T>(group.acc, W, g, g + group.rows, tiles.begin(j), tiles.size(j), nullptr, y, N);
    }
  }
}

// M ≥ 2 (see the file comment). Where split_by_tiles says so each thread takes whole token tiles: it
// packs a tile's panel into its own buffer (which stays in its L2) and runs every row over it.
// Otherwise all panels are packed first and the rows are split between the threads.
template <typename T, typename I>
void csr_tiles(const T* x, int64_t M, int64_t K, const int32_t* crow, const I* col, const T* val, const float* bias,
               Activation act, T* y, int64_t N) {
  const TokenTiles tiles = make_token_tiles(M, kMaxTileTokens);
  const int64_t parts = worth_threads(M * static_cast<int64_t>(crow[N]));
  if (split_by_tiles(tiles, parts)) {
    at::Tensor panels = at::empty({parts, K * tiles.width}, at::kFloat);
    at::Tensor acc = at::empty({parts, N * tiles.width}, at::kFloat);
    at::Tensor cursors = at::empty({parts, N}, at::kLong);
    at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
      for (int64_t part = begin; part < end; ++part) {
        float* panel = panels.data_ptr<float>() + part * K * tiles.width;
        for (int64_t j = first_tile(tiles, part, parts); j < first_tile(tiles, part + 1, parts); ++j) {
          pack_tile<T>(x, K, tiles, j, panel);
          csr_tile_rows<T, I>(tiles, j, 0, N, panel, K, crow, col, val, bias, act, y, N,
                              acc.data_ptr<float>() + part * N * tiles.width, cursors.data_ptr<int64_t>() + part * N);
        }
      }
    });
    return;
  }
  at::Tensor panels = at::empty({tiles.panel_floats(K)}, at::kFloat);
  pack_panels<T>(x, K, tiles, panels.data_ptr<float>());
  at::Tensor acc = at::empty({N * tiles.width}, at::kFloat);
  at::Tensor cursors = at::empty({N}, at::kLong);
  const std::vector<int64_t> cut = split_rows_by_entries(crow, N, parts, 8);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      const int64_t n0 = cut[part], n1 = cut[part + 1];
      for (int64_t j = 0; j < tiles.count; ++j) {
        csr_tile_rows<T, I>(tiles, j, n0, n1, panels.data_ptr<float>() + tiles.begin(j) * K, K, crow, col, val, bias,
                            act, y, N, acc.data_ptr<float>() + n0 * tiles.width, cursors.data_ptr<int64_t>() + n0);
      }
    }
  });
}

// M = 1: the sums of each part of the rows land in float32 (in y itself for float32), then bias and
// activation, then the rounding to T.
template <typename T, typename I>
void csr_gemv(const T* x, int64_t K, const int32_t* crow, const I* col, const T* val, const float* bias,
              Activation act, T* y, int64_t N) {
  at::Tensor xf, sums;
  const float* xp;
  float* s;
  if constexpr (std::is_same_v<T, float>) {
    xp = x;
    s = y;
  } else {
    xf = at::empty({K}, at::kFloat);
    for (int64_t k = 0; k < K; ++k) xf.data_ptr<float>()[k] = load_value(x + k);
    xp = xf.data_ptr<float>();
    sums = at::empty({N}, at::kFloat);
    s = sums.data_ptr<float>();
  }
  const int64_t parts = worth_threads(crow[N], kMinGemvEntriesPerThread);
  const std::vector<int64_t> cut = split_rows_by_entries(crow, N, parts, 8);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      const int64_t n0 = cut[part], n1 = cut[part + 1];
      bool done = false;
#ifdef SPARSE_OPS_AVX2_FMA
      if constexpr (std::is_same_v<T, float>) {
        if (use_avx2_fma()) {
          gemv_avx2<I>(crow, col, val, xp, s + n0, n0, n1);
          done = true;
        }
      }
#endif
      if (!done) gemv_plain<I, T>(crow, col, val, xp, s + n0, n0, n1);
      finish_vector(s + n0, n1 - n0, bias != nullptr ? bias + n0 : nullptr, act);
      if constexpr (!std::is_same_v<T, float>) {
        for (int64_t n = n0; n < n1; ++n) store_value(y + n, s[n]);
      }
    }
  });
}

at::Tensor csr_linear_cpu(const at::Tensor& x, const at::Tensor& crow_indices, const at::Tensor& col_indices,
                          const at::Tensor& values, const std::optional<at::Tensor>& bias, int64_t out_features,
                          c10::string_view activation, bool check_indices) {
  check_sparse_linear(x, crow_indices, col_indices, values, bias, out_features, /*blocked=*/false, check_indices);
  const Activation act = parse_activation(std::string(activation));
  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  at::Tensor y = at::empty({M, N}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (M == 0) return y;
  const at::Tensor xc = x.contiguous(), crow = crow_indices.contiguous(), col = col_indices.contiguous();
  const at::Tensor vals = values.contiguous();
  const at::Tensor bias_f = bias.has_value() && bias->defined() ? contiguous_float(*bias) : at::Tensor();
  const float* b = bias_f.defined() ? bias_f.const_data_ptr<float>() : nullptr;
  const auto run = [&](auto value_tag, auto index_tag) {
    using T = decltype(value_tag);
    using I = decltype(index_tag);
    const int32_t* cr = crow.const_data_ptr<int32_t>();
    const I* cl = col.const_data_ptr<I>();
    if (M == 1) {
      csr_gemv<T, I>(xc.const_data_ptr<T>(), K, cr, cl, vals.const_data_ptr<T>(), b, act, y.mutable_data_ptr<T>(), N);
    } else {
      csr_tiles<T, I>(xc.const_data_ptr<T>(), M, K, cr, cl, vals.const_data_ptr<T>(), b, act, y.mutable_data_ptr<T>(),
                      N);
    }
  };
  const auto with_index = [&](auto value_tag) {
    col.scalar_type() == at::kUInt16 ? run(value_tag, uint16_t{}) : run(value_tag, int32_t{});
  };
  switch (x.scalar_type()) {
    case at::kFloat: with_index(float{}); break;
    case at::kHalf: with_index(c10::Half{}); break;
    default: with_index(c10::BFloat16{}); break;  // the only other dtype check_sparse_linear lets through
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_ops, CPU, m) {
  m.impl("csr_linear_cpu", &csr_linear_cpu);
}

}  // namespace sparse_ops
