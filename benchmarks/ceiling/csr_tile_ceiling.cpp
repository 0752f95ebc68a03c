// Where the CSR tile kernel's time goes (issue 11): a stand-alone model of the inner loop of
// csrc/cpu/csr_linear.cpp (one 64-token panel tile, one thread), timed
//   * with the real column spread of a random 90%-sparse weight, panel chunks of 16 KB .. all of K;
//   * with the columns confined to `range` distinct values (the panel rows it reads stay in L1):
//     the loop's ceiling when memory is not the limit;
//   * with AVX2 (8 ymm accumulators per row, as shipped) and AVX-512 (4 zmm, 1 or 2 sets; skipped on
//     CPUs without AVX-512F).
// Build and run (no torch needed):
//   g++ -O3 -o /tmp/csr_tile_ceiling benchmarks/ceiling/csr_tile_ceiling.cpp && /tmp/csr_tile_ceiling
// Prints GFLOP/s counting 2 flops per stored weight per token (64 tokens); compare with one thread
// of MKL on the dense layer: torch.set_num_threads(1); (x @ w.T) at 128 tokens.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

namespace {

struct Csr {
  int rows, cols;
  std::vector<int32_t> crow;
  std::vector<uint16_t> col;
  std::vector<float> val;
};

Csr random_csr(int rows, int cols, double density, int seed, int range) {
  Csr c{rows, cols, {0}, {}, {}};
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  for (int n = 0; n < rows; ++n) {
    const size_t first = c.col.size();
    for (int k = 0; k < cols; ++k) {
      if (u(gen) < density) {
        c.col.push_back(static_cast<uint16_t>(k % range));
        c.val.push_back(u(gen) - 0.5f);
      }
    }
    std::sort(c.col.begin() + first, c.col.end());
    c.crow.push_back(static_cast<int32_t>(c.col.size()));
  }
  return c;
}

// The shipped scheme: per row, 8 ymm accumulators over 64 tokens; columns walked in chunks.
__attribute__((target("avx2,fma"))) void tile_avx2(const Csr& c, const float* panel, float* acc, int chunk) {
  constexpr int W = 64;
  std::vector<int64_t> cursor(c.crow.begin(), c.crow.end() - 1);
  for (int lo = 0; lo < c.cols; lo += chunk) {
    const int limit = std::min(c.cols, lo + chunk);
    for (int r = 0; r < c.rows; ++r) {
      float* out = acc + static_cast<int64_t>(r) * W;
      __m256 a[8];
      for (int v = 0; v < 8; ++v) a[v] = lo == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(out + 8 * v);
      int64_t p = cursor[r];
      for (; p < c.crow[r + 1] && c.col[p] < limit; ++p) {
        const __m256 w = _mm256_set1_ps(c.val[p]);
        const float* xk = panel + static_cast<int64_t>(c.col[p]) * W;
        for (int v = 0; v < 8; ++v) a[v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xk + 8 * v), a[v]);
      }
      cursor[r] = p;
      for (int v = 0; v < 8; ++v) _mm256_storeu_ps(out + 8 * v, a[v]);
    }
  }
}

// The same with 4 zmm accumulators per row and S independent sets.
template <int S>
__attribute__((target("avx512f"))) void tile_avx512(const Csr& c, const float* panel, float* acc, int chunk) {
  constexpr int W = 64;
  std::vector<int64_t> cursor(c.crow.begin(), c.crow.end() - 1);
  for (int lo = 0; lo < c.cols; lo += chunk) {
    const int limit = std::min(c.cols, lo + chunk);
    for (int r = 0; r < c.rows; ++r) {
      float* out = acc + static_cast<int64_t>(r) * W;
      __m512 a[S][4];
      for (int v = 0; v < 4; ++v) a[0][v] = lo == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(out + 16 * v);
      for (int s = 1; s < S; ++s) {
        for (int v = 0; v < 4; ++v) a[s][v] = _mm512_setzero_ps();
      }
      int64_t p = cursor[r];
      const int64_t end = c.crow[r + 1];
      for (; p + S <= end && c.col[p + S - 1] < limit; p += S) {
        for (int s = 0; s < S; ++s) {
          const __m512 w = _mm512_set1_ps(c.val[p + s]);
          const float* xk = panel + static_cast<int64_t>(c.col[p + s]) * W;
          for (int v = 0; v < 4; ++v) a[s][v] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xk + 16 * v), a[s][v]);
        }
      }
      for (; p < end && c.col[p] < limit; ++p) {
        const __m512 w = _mm512_set1_ps(c.val[p]);
        const float* xk = panel + static_cast<int64_t>(c.col[p]) * W;
        for (int v = 0; v < 4; ++v) a[0][v] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xk + 16 * v), a[0][v]);
      }
      cursor[r] = p;
      for (int s = 1; s < S; ++s) {
        for (int v = 0; v < 4; ++v) a[0][v] = _mm512_add_ps(a[0][v], a[s][v]);
      }
      for (int v = 0; v < 4; ++v) _mm512_storeu_ps(out + 16 * v, a[0][v]);
    }
  }
}

template <class F>
double median_seconds(F f) {
  std::vector<double> t;
  for (int r = 0; r < 31; ++r) {
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < 10; ++i) f();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / 10);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

void report(const char* what, const Csr& c, int chunk) {
  std::vector<float> panel(static_cast<size_t>(c.cols) * 64, 0.5f), acc(static_cast<size_t>(c.rows) * 64);
  const double flops = 2.0 * 64 * static_cast<double>(c.col.size());
  const double a2 = median_seconds([&] { tile_avx2(c, panel.data(), acc.data(), chunk); });
  if (!__builtin_cpu_supports("avx512f")) {  // AVX2-only CPUs: the shipped AVX2 loop alone
    std::printf("%-34s avx2 %5.1f GFLOP/s   (no AVX-512 on this CPU)\n", what, flops / a2 / 1e9);
    return;
  }
  const double z1 = median_seconds([&] { tile_avx512<1>(c, panel.data(), acc.data(), chunk); });
  const double z2 = median_seconds([&] { tile_avx512<2>(c, panel.data(), acc.data(), chunk); });
  std::printf("%-34s avx2 %5.1f   avx512 x1 %5.1f   avx512 x2 %5.1f GFLOP/s\n", what, flops / a2 / 1e9,
              flops / z1 / 1e9, flops / z2 / 1e9);
}

}  // namespace

int main() {
  const int shapes[3][2] = {{768, 768}, {3072, 768}, {768, 3072}};
  char what[96];
  for (const auto& s : shapes) {
    const Csr c = random_csr(s[0], s[1], 0.1, 1, s[1]);
    std::printf("%dx%d at 90%%, %zu stored, 64 tokens, one thread\n", s[0], s[1], c.col.size());
    for (int kb : {16, 32, 64, 128, 0}) {
      const int chunk = kb == 0 ? c.cols : std::max(8, kb * 1024 / (4 * 64));
      std::snprintf(what, sizeof what, "  panel chunk %s", kb == 0 ? "all" : (std::to_string(kb) + " KB").c_str());
      report(what, c, chunk);
    }
  }
  std::printf("3072x768 at 90%%, columns confined to a range (panel rows in L1), no chunks\n");
  for (int range : {8, 64, 768}) {
    std::snprintf(what, sizeof what, "  %d distinct columns", range);
    report(what, random_csr(3072, 768, 0.1, 1, range), 768);
  }
}
