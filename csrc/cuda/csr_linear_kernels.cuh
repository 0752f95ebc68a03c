// Kernels of csr_linear (interface and numerics: csr_linear.cuh) and the host logic that plans and
// launches them. Only CUDA headers, so that this file compiles with plain nvcc; the launches go
// through a Launcher callable, so that csrc/cuda/emulation/ can run the very same kernels and
// plans on the CPU (tests/test_cuda_build.py), one warp at a time.
//
// Design (W is N x K with nnz nonzeros, x has M tokens):
//  * Tokens come in tiles of MT in {1, 2, 4, 8, 16} (the smallest power of two >= M, 16 for more
//    tokens). For MT > 1, regroup_tokens_kernel first copies x into the workspace as
//    (tiles, K, MT) — zero-padded past M — so that the MT values x[tile, col] one nonzero
//    multiplies are contiguous: one 16-byte (or narrower) load per nonzero and tile instead of MT
//    scattered ones. One token (MT = 1) reads x directly.
//  * Row split: a group of G in {4, 8, 16, 32} lanes of one warp owns one output row and one
//    token tile (G from the average row length, so that one pass of the group covers a row).
//    Lanes stride over the row's nonzeros kChunk = 4 at a time: one 16-byte load of 4 column
//    indices and one load of 4 values (8 bytes for fp16/bf16, 16 for fp32), then 4 gathers of x;
//    a scalar prologue and epilogue (< 4 nonzeros each) cover the unaligned ends of the row. When
//    the col/values pointers themselves are not aligned for such loads the whole row is scalar.
//  * Every lane keeps MT float32 partial sums in registers; the group reduces them by recursive
//    halving (ReduceScatter): MT - 1 + log2(G / MT) shuffles for MT <= G, MT·(1 - 1/G) beyond,
//    instead of MT·log2(G); each lane is left the final sums of its own tokens and stores them.
//  * Work items (row block, token tile) are walked by a grid-stride loop; all lanes of a warp
//    stay in every loop that contains a shuffle. No shared memory, no atomics: deterministic.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "csr_linear.cuh"

namespace sparse_ops {
namespace cuda {
namespace csr {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kThreads = 128;          // threads per block of csr_linear_kernel
constexpr int kRegroupThreads = 256;   // threads per block of regroup_tokens_kernel
constexpr int kChunk = 4;              // nonzeros per vector load
constexpr int kMaxTile = 16;           // tokens per tile at most
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride loops beyond this

// ---------------------------------------------------------------------------------------------
// loads and conversions
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// float -> T, round to nearest even (as PyTorch's casts)
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T, int N>
struct Pack {
  T v[N];
};

// N consecutive elements at ptr through the read-only path, in words of up to 16 bytes. ptr must
// be aligned to min(N * sizeof(T), 16) bytes.
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* ptr) {
  constexpr int kBytes = N * static_cast<int>(sizeof(T));
  Pack<T, N> out;
  if constexpr (kBytes % 16 == 0) {
    uint4 words[kBytes / 16];
#pragma unroll
    for (int i = 0; i < kBytes / 16; ++i) words[i] = __ldg(reinterpret_cast<const uint4*>(ptr) + i);
    memcpy(&out, words, kBytes);
  } else if constexpr (kBytes == 8) {
    const uint2 word = __ldg(reinterpret_cast<const uint2*>(ptr));
    memcpy(&out, &word, kBytes);
  } else if constexpr (kBytes == 4) {
    const unsigned int word = __ldg(reinterpret_cast<const unsigned int*>(ptr));
    memcpy(&out, &word, kBytes);
  } else {
    static_assert(kBytes == 2, "load_pack: unsupported size");
    const unsigned short word = __ldg(reinterpret_cast<const unsigned short*>(ptr));
    memcpy(&out, &word, kBytes);
  }
  return out;
}

template <typename T>
__device__ __forceinline__ float load_float(const T* ptr) {
  return to_float(load_pack<T, 1>(ptr).v[0]);
}

// ---------------------------------------------------------------------------------------------
// regroup_tokens_kernel: xt[(tile*K + k)*MT + j] = x[(tile*MT + j)*K + k], 0 for tokens >= M
// ---------------------------------------------------------------------------------------------
template <typename T>
struct RegroupParams {
  const T* x;  // (M, K)
  T* xt;       // (tiles, K, MT)
  int64_t M, K, tiles;
};

template <typename T, int MT>
__global__ void __launch_bounds__(kRegroupThreads) regroup_tokens_kernel(const RegroupParams<T> p) {
  const int64_t total = p.tiles * p.K * MT;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t j = i % MT;
    const int64_t tile_k = i / MT;
    const int64_t tile = tile_k / p.K;
    const int64_t k = tile_k - tile * p.K;
    const int64_t m = tile * MT + j;
    p.xt[i] = m < p.M ? load_pack<T, 1>(p.x + m * p.K + k).v[0] : from_float<T>(0.0f);
  }
}

// ---------------------------------------------------------------------------------------------
// csr_linear_kernel
// ---------------------------------------------------------------------------------------------
template <typename T>
struct CsrKernelParams {
  const T* xt;  // (tiles, K, MT); x itself when MT == 1
  const int32_t* crow;
  const int32_t* col;
  const T* values;
  const T* bias;  // or nullptr
  T* out;         // (M, N)
  int64_t M, K, N, tiles;
  bool vector_loads;  // col is 16-byte and values kChunk-element aligned
};

// acc[m] += w * x[col, m] for the MT tokens of the tile
template <typename T, int MT>
__device__ __forceinline__ void fma_tokens(float (&acc)[MT], float w, const Pack<T, MT>& xs) {
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = fmaf(w, to_float(xs.v[m]), acc[m]);
}

// acc += the terms of nonzero i (scalar loads)
template <typename T, int MT>
__device__ __forceinline__ void fma_nonzero(const CsrKernelParams<T>& p, const T* xt, int64_t i, float (&acc)[MT]) {
  const int64_t c = __ldg(p.col + i);
  fma_tokens<T, MT>(acc, load_float(p.values + i), load_pack<T, MT>(xt + c * MT));
}

// acc += lane g's share of row `row`: its chunks g, g+G, ... of kChunk aligned nonzeros where
// vector loads are allowed, and its nonzeros g, g+G, ... of the rest.
template <typename T, int MT, int G>
__device__ __forceinline__ void accumulate_row(const CsrKernelParams<T>& p, const T* xt, int64_t row, int g,
                                               float (&acc)[MT]) {
  const int64_t begin = __ldg(p.crow + row);
  const int64_t end = __ldg(p.crow + row + 1);
  // [body_begin, body_end): whole chunks starting at multiples of kChunk; empty without vectors
  int64_t body_begin = begin, body_end = begin;
  if (p.vector_loads) {
    const int64_t aligned = (begin + kChunk - 1) / kChunk * kChunk;
    body_begin = aligned < end ? aligned : end;
    body_end = body_begin + (end - body_begin) / kChunk * kChunk;
#pragma unroll 2
    for (int64_t i = body_begin + static_cast<int64_t>(kChunk) * g; i < body_end; i += kChunk * G) {
      const int4 c = __ldg(reinterpret_cast<const int4*>(p.col + i));
      const Pack<T, kChunk> w = load_pack<T, kChunk>(p.values + i);
      const Pack<T, MT> x0 = load_pack<T, MT>(xt + static_cast<int64_t>(c.x) * MT);
      const Pack<T, MT> x1 = load_pack<T, MT>(xt + static_cast<int64_t>(c.y) * MT);
      const Pack<T, MT> x2 = load_pack<T, MT>(xt + static_cast<int64_t>(c.z) * MT);
      const Pack<T, MT> x3 = load_pack<T, MT>(xt + static_cast<int64_t>(c.w) * MT);
      fma_tokens<T, MT>(acc, to_float(w.v[0]), x0);
      fma_tokens<T, MT>(acc, to_float(w.v[1]), x1);
      fma_tokens<T, MT>(acc, to_float(w.v[2]), x2);
      fma_tokens<T, MT>(acc, to_float(w.v[3]), x3);
    }
  }
  // scalar prologue [begin, body_begin) and epilogue [body_end, end): the whole row without vectors
  for (int64_t i = begin + g; i < body_begin; i += G) fma_nonzero<T, MT>(p, xt, i, acc);
  for (int64_t i = body_end + g; i < end; i += G) fma_nonzero<T, MT>(p, xt, i, acc);
}

// Sum of acc over the G lanes of a row group (lanes with equal lane / G in a warp; g = lane % G).
// Recursive halving: in the step across lane bit Off, the lane with that bit set keeps the upper
// half of its Len sums, its partner the lower half, and each adds the half the other sends. Once
// one sum is left, the remaining steps are a butterfly. Afterwards lane g holds the group's full
// sums for tokens m0 .. m0 + max(MT / G, 1) - 1 (m0 from the high bits of g), in acc[0 ..].
template <int Len, int Off>
struct ReduceScatter {
  static __device__ __forceinline__ void run(float* acc, int g, int& m0) {
    if constexpr (Len > 1) {
      constexpr int kHalf = Len / 2;
      const bool upper = (g & Off) != 0;
#pragma unroll
      for (int i = 0; i < kHalf; ++i) {
        const float send = upper ? acc[i] : acc[i + kHalf];
        const float keep = upper ? acc[i + kHalf] : acc[i];
        acc[i] = keep + __shfl_xor_sync(kFullMask, send, Off);
      }
      if (upper) m0 += kHalf;
      ReduceScatter<kHalf, Off / 2>::run(acc, g, m0);
    } else {
      acc[0] += __shfl_xor_sync(kFullMask, acc[0], Off);
      ReduceScatter<1, Off / 2>::run(acc, g, m0);
    }
  }
};

template <int Len>
struct ReduceScatter<Len, 0> {
  static __device__ __forceinline__ void run(float*, int, int&) {}
};

template <typename T, int MT, int G>
__global__ void __launch_bounds__(kThreads) csr_linear_kernel(const CsrKernelParams<T> p) {
  static_assert(kWarp % G == 0 && kThreads % kWarp == 0, "a row group must not straddle warps");
  constexpr int kRowsPerBlock = kThreads / G;
  constexpr int kKept = MT > G ? MT / G : 1;      // sums per lane after the reduction
  constexpr int kReplicas = G > MT ? G / MT : 1;  // lanes holding the same sums
  const int g = static_cast<int>(threadIdx.x % G);
  const int64_t row_in_block = threadIdx.x / G;
  const int64_t row_blocks = (p.N + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t items = row_blocks * p.tiles;
  // item = tile * row_blocks + row block; uniform per block, so whole warps iterate together
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t tile = item / row_blocks;
    const int64_t row = (item - tile * row_blocks) * kRowsPerBlock + row_in_block;
    float acc[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] = 0.0f;
    if (row < p.N) accumulate_row<T, MT, G>(p, p.xt + tile * p.K * MT, row, g, acc);
    int m0 = 0;
    ReduceScatter<MT, G / 2>::run(acc, g, m0);  // every lane takes part, rows past N too
    if (row < p.N && g % kReplicas == 0) {
      const float b = p.bias != nullptr ? load_float(p.bias + row) : 0.0f;
#pragma unroll
      for (int i = 0; i < kKept; ++i) {
        const int64_t m = tile * MT + m0 + i;
        if (m < p.M) p.out[m * p.N + row] = from_float<T>(acc[i] + b);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// host side: plan and launch
// ---------------------------------------------------------------------------------------------
struct CsrLinearPlan {
  int tile = 1;              // MT, tokens per tile
  int group = 32;            // G, lanes per row
  int64_t tiles = 0;         // ceil(M / MT)
  bool vector_loads = false; // see CsrKernelParams
};

inline int token_tile(int64_t M) {
  int tile = 1;
  while (tile < kMaxTile && tile < M) tile *= 2;
  return tile;
}

inline size_t dtype_bytes(CsrDType dtype) { return dtype == CsrDType::kFloat32 ? 4 : 2; }

inline size_t workspace_bytes(CsrDType dtype, int64_t M, int64_t K) {
  const int tile = token_tile(M);
  if (tile == 1) return 0;
  const int64_t tiles = (M + tile - 1) / tile;
  return static_cast<size_t>(tiles) * static_cast<size_t>(K) * tile * dtype_bytes(dtype);
}

inline CsrLinearPlan make_plan(const CsrLinearArgs& a) {
  CsrLinearPlan plan;
  plan.tile = token_tile(a.M);
  plan.tiles = (a.M + plan.tile - 1) / plan.tile;
  // lanes per row: the smallest power of two in [4, 32] that covers the average row in one pass
  const int64_t chunks = (a.nnz + a.N * kChunk - 1) / (a.N * kChunk);
  plan.group = 4;
  while (plan.group < kWarp && plan.group < chunks) plan.group *= 2;
  const uintptr_t col = reinterpret_cast<uintptr_t>(a.col);
  const uintptr_t values = reinterpret_cast<uintptr_t>(a.values);
  plan.vector_loads = col % 16 == 0 && values % (kChunk * dtype_bytes(a.dtype)) == 0;
  return plan;
}

inline int64_t grid_blocks(int64_t items) { return items < kMaxBlocks ? items : kMaxBlocks; }

// launch(kernel, blocks, threads, params) enqueues one kernel and returns its launch status.
template <typename T, int MT, typename Launcher>
cudaError_t run_tile(const CsrLinearArgs& a, const CsrLinearPlan& plan, const Launcher& launch) {
  const T* xt = static_cast<const T*>(a.x);
  if constexpr (MT > 1) {
    const RegroupParams<T> regroup{static_cast<const T*>(a.x), static_cast<T*>(a.workspace), a.M, a.K, plan.tiles};
    const int64_t total = plan.tiles * a.K * MT;
    if (total > 0) {
      const cudaError_t err = launch(regroup_tokens_kernel<T, MT>,
                                     grid_blocks((total + kRegroupThreads - 1) / kRegroupThreads),
                                     kRegroupThreads, regroup);
      if (err != cudaSuccess) return err;
    }
    xt = static_cast<const T*>(a.workspace);
  }
  const CsrKernelParams<T> params{xt, a.crow, a.col, static_cast<const T*>(a.values),
                                  static_cast<const T*>(a.bias), static_cast<T*>(a.out),
                                  a.M, a.K, a.N, plan.tiles, plan.vector_loads};
  const int64_t rows_per_block = kThreads / plan.group;
  const int64_t blocks = grid_blocks((a.N + rows_per_block - 1) / rows_per_block * plan.tiles);
  switch (plan.group) {
    case 4: return launch(csr_linear_kernel<T, MT, 4>, blocks, kThreads, params);
    case 8: return launch(csr_linear_kernel<T, MT, 8>, blocks, kThreads, params);
    case 16: return launch(csr_linear_kernel<T, MT, 16>, blocks, kThreads, params);
    case 32: return launch(csr_linear_kernel<T, MT, 32>, blocks, kThreads, params);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T, typename Launcher>
cudaError_t run_typed(const CsrLinearArgs& a, const CsrLinearPlan& plan, const Launcher& launch) {
  switch (plan.tile) {
    case 1: return run_tile<T, 1>(a, plan, launch);
    case 2: return run_tile<T, 2>(a, plan, launch);
    case 4: return run_tile<T, 4>(a, plan, launch);
    case 8: return run_tile<T, 8>(a, plan, launch);
    case 16: return run_tile<T, 16>(a, plan, launch);
    default: return cudaErrorInvalidValue;
  }
}

// Runs csr_linear with `plan` (make_plan's, or one a test forces). M > 0 and N > 0.
template <typename Launcher>
cudaError_t run_csr_linear(const CsrLinearArgs& a, const CsrLinearPlan& plan, const Launcher& launch) {
  switch (a.dtype) {
    case CsrDType::kFloat32: return run_typed<float>(a, plan, launch);
    case CsrDType::kFloat16: return run_typed<__half>(a, plan, launch);
    case CsrDType::kBFloat16: return run_typed<__nv_bfloat16>(a, plan, launch);
  }
  return cudaErrorInvalidValue;
}

}  // namespace csr
}  // namespace cuda
}  // namespace sparse_ops
