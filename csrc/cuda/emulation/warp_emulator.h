// A CPU emulator for the CUDA kernels of csrc/cuda, so that machines without a GPU run them in tests
// (tests/test_cuda_build.py). It is no part of the extension (setup.py compiles csrc/cuda/*.cu and
// csrc/cuda/*.cpp, not this folder).
//
// Scope: kernels that use threadIdx/blockIdx/blockDim/gridDim (x only), __ldg and
// __shfl_xor_sync(0xffffffff, float, offset) and nothing else from CUDA (no shared memory,
// __syncthreads or atomics), so that warps are independent. Every block is run warp after warp;
// the 32 lanes of a warp run as cooperative fibers (ucontext) on this one thread, each until it
// reaches a shuffle or returns; once all 32 lanes wait at a shuffle they exchange values and go
// on. The emulator reports, instead of hanging or reading garbage:
//  * a shuffle that not all 32 lanes of a warp reach (undefined behaviour on a GPU), or lanes
//    that shuffle with different offsets;
//  * a __ldg of an address not aligned to the loaded size (a fault on a GPU), or of bytes outside
//    the buffers registered with allow_reads.
// Numerics: float arithmetic as written (compile with -ffp-contract=off; fmaf is a true fused
// multiply-add on both sides), fp16/bf16 conversions from cuda_fp16.h / cuda_bf16.h host code.
#pragma once

#include <ucontext.h>

#include <cuda_runtime_api.h>
#include <vector_types.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

namespace emu {

struct Index {
  unsigned x = 0, y = 0, z = 0;
};

class Emulator {
 public:
  static Emulator& get() {
    static Emulator instance;
    return instance;
  }

  Index thread_idx, block_idx, block_dim, grid_dim;

  void reset() {
    error_.clear();
    readable_.clear();
  }
  const std::string& error() const { return error_; }
  void fail(const std::string& message) {
    if (error_.empty()) error_ = message;
  }

  void allow_reads(const void* base, size_t bytes) {
    if (bytes > 0) readable_.push_back({reinterpret_cast<uintptr_t>(base), bytes});
  }

  // Whether a load of `bytes` at ptr is aligned and inside a registered buffer (else it fails).
  bool check_read(const void* ptr, size_t bytes) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(ptr);
    if (a % bytes != 0) {
      fail("misaligned " + std::to_string(bytes) + "-byte load at address " + std::to_string(a));
      return false;
    }
    for (const auto& range : readable_) {
      if (a >= range.first && a + bytes <= range.first + range.second) return true;
    }
    fail("load of " + std::to_string(bytes) + " bytes outside every input buffer");
    return false;
  }

  float shuffle_xor(float value, unsigned mask, int offset, int width) {
    if (mask != 0xffffffffu || width != 32 || offset <= 0 || offset >= 32) {
      fail("unsupported __shfl_xor_sync arguments");
    }
    sent_[lane_] = value;
    offsets_[lane_] = offset;
    waiting_[lane_] = true;
    swapcontext(&lanes_[lane_], &scheduler_);
    return received_[lane_];
  }

  // Runs body() as every thread of a grid of `blocks` x `threads` (threads a multiple of 32).
  cudaError_t launch(int64_t blocks, int threads, std::function<void()> body) {
    if (blocks <= 0 || threads <= 0 || threads % 32 != 0 || threads > 1024) {
      fail("invalid launch configuration");
      return cudaErrorInvalidConfiguration;
    }
    body_ = std::move(body);
    grid_dim = Index{static_cast<unsigned>(blocks), 1, 1};
    block_dim = Index{static_cast<unsigned>(threads), 1, 1};
    for (int64_t b = 0; b < blocks && error_.empty(); ++b) {
      block_idx = Index{static_cast<unsigned>(b), 0, 0};
      for (int w = 0; w < threads / 32 && error_.empty(); ++w) run_warp(32 * w);
    }
    return error_.empty() ? cudaSuccess : cudaErrorLaunchFailure;
  }

 private:
  static constexpr size_t kStackBytes = 256 * 1024;

  Emulator() : stacks_(32, std::vector<char>(kStackBytes)) {}

  static void lane_entry() {
    Emulator& e = get();
    e.body_();
    e.done_[e.lane_] = true;  // returning resumes the scheduler (uc_link)
  }

  void resume(int lane, unsigned first_thread) {
    lane_ = lane;
    thread_idx = Index{first_thread + static_cast<unsigned>(lane), 0, 0};
    swapcontext(&scheduler_, &lanes_[lane]);
  }

  void run_warp(unsigned first_thread) {
    for (int lane = 0; lane < 32; ++lane) {
      getcontext(&lanes_[lane]);
      lanes_[lane].uc_stack.ss_sp = stacks_[lane].data();
      lanes_[lane].uc_stack.ss_size = kStackBytes;
      lanes_[lane].uc_link = &scheduler_;
      makecontext(&lanes_[lane], &Emulator::lane_entry, 0);
      done_[lane] = false;
      waiting_[lane] = false;
    }
    while (true) {
      for (int lane = 0; lane < 32; ++lane) {
        if (!done_[lane]) resume(lane, first_thread);
      }
      int waiting = 0;
      for (int lane = 0; lane < 32; ++lane) waiting += waiting_[lane] ? 1 : 0;
      if (waiting == 0) return;  // every lane returned
      if (waiting != 32) {
        fail("__shfl_xor_sync reached by " + std::to_string(waiting) + " of 32 lanes (block " +
             std::to_string(block_idx.x) + ", first thread " + std::to_string(first_thread) + ")");
        return;
      }
      for (int lane = 0; lane < 32; ++lane) {
        if (offsets_[lane] != offsets_[0]) {
          fail("lanes of one warp shuffled with different offsets");
          return;
        }
        received_[lane] = sent_[lane ^ offsets_[lane]];
        waiting_[lane] = false;
      }
    }
  }

  std::vector<std::vector<char>> stacks_;
  ucontext_t scheduler_{};
  ucontext_t lanes_[32]{};
  bool done_[32]{};
  bool waiting_[32]{};
  float sent_[32]{};
  float received_[32]{};
  int offsets_[32]{};
  int lane_ = 0;
  std::function<void()> body_;
  std::string error_;
  std::vector<std::pair<uintptr_t, size_t>> readable_;
};

// Plays the role of a CUDA stream launcher (csr_linear.cu's StreamLauncher) for the kernel headers.
struct Launcher {
  template <typename Params>
  cudaError_t operator()(void (*kernel)(Params), int64_t blocks, int threads, const Params& params) const {
    return Emulator::get().launch(blocks, threads, [&] { kernel(params); });
  }
};

}  // namespace emu

// The CUDA built-ins the kernels use.
#define threadIdx (::emu::Emulator::get().thread_idx)
#define blockIdx (::emu::Emulator::get().block_idx)
#define blockDim (::emu::Emulator::get().block_dim)
#define gridDim (::emu::Emulator::get().grid_dim)
#define __launch_bounds__(...)

// a load that fails the checks reads zeros instead (the launch then reports the failure)
template <typename T>
inline T __ldg(const T* ptr) {
  T value;
  std::memset(static_cast<void*>(&value), 0, sizeof(T));
  if (::emu::Emulator::get().check_read(ptr, sizeof(T))) std::memcpy(static_cast<void*>(&value), ptr, sizeof(T));
  return value;
}

inline float __shfl_xor_sync(unsigned mask, float value, int offset, int width = 32) {
  return ::emu::Emulator::get().shuffle_xor(value, mask, offset, width);
}
