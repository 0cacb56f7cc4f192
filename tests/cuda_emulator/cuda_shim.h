// Just enough of CUDA's device-side language to run csrc/cuda/kernels.cuh on the
// CPU. Every thread of a block is a std::thread; warps and blocks synchronise
// through barriers, so shuffles and __syncthreads behave as they do on a GPU.
// Blocks run one after another, so `__shared__` can be a function-local static.
// It checks the kernels' indexing (row splits, vector head/tail, thread-to-row
// mapping, cross-thread merges) -- not their speed or the GPU's memory model.
#pragma once

#define FUSED_CE_CUDA_EMULATION 1

#include <algorithm>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace emu {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

struct Block {
  explicit Block(unsigned threads) : barrier(threads), slots(threads) {
    for (unsigned first = 0; first < threads; first += 32) {
      warp_barriers.emplace_back(std::make_unique<std::barrier<>>(std::min(32u, threads - first)));
    }
  }
  std::barrier<> barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<uint64_t> slots;  // one shuffle slot per thread
};

inline thread_local Dim3 thread_idx, block_idx;
inline Dim3 block_dim, grid_dim;
inline Block* current_block = nullptr;

template <typename T>
T shfl_xor(T value, int offset) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  Block& b = *current_block;
  const unsigned t = thread_idx.x, warp = t / 32, lane = t % 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  b.slots[t] = bits;
  b.warp_barriers[warp]->arrive_and_wait();
  const uint64_t got = b.slots[warp * 32 + (lane ^ unsigned(offset))];
  b.warp_barriers[warp]->arrive_and_wait();
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}

// kernel<<<grid, threads>>>(args...), one block at a time.
template <typename Kernel, typename... Args>
void launch(int64_t grid, unsigned threads, Kernel kernel, const Args&... args) {
  block_dim = {threads, 1, 1};
  grid_dim = {static_cast<unsigned>(grid), 1, 1};
  for (int64_t b = 0; b < grid; ++b) {
    Block block(threads);
    current_block = &block;
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        thread_idx = {t, 0, 0};
        block_idx = {static_cast<unsigned>(b), 0, 0};
        kernel(args...);
        // A thread that has returned takes no further part in barriers.
        block.warp_barriers[t / 32]->arrive_and_drop();
        block.barrier.arrive_and_drop();
      });
    }
    for (auto& th : pool) th.join();
  }
  current_block = nullptr;
}

}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
#define gridDim emu::grid_dim

inline void __syncthreads() { emu::current_block->barrier.arrive_and_wait(); }

inline void __syncwarp(unsigned /*mask*/ = 0xffffffffu) {
  emu::current_block->warp_barriers[emu::thread_idx.x / 32]->arrive_and_wait();
}

template <typename T>
inline T __shfl_xor_sync(unsigned /*mask*/, T value, int offset) {
  return emu::shfl_xor(value, offset);
}

inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
