// Just enough of CUDA's device-side language to run the kernels of csrc/cuda on the
// CPU. Every thread of a block is a std::thread; warps and blocks synchronise
// through barriers, so shuffles and __syncthreads behave as they do on a GPU.
// Blocks run one after another -- so `__shared__` can be a function-local static --
// except the CTAs of a thread-block cluster, which run together: each with its own
// dynamic shared memory, which its peers reach through cluster_peer (distributed
// shared memory), and a barrier over the whole cluster (cluster.sync()). Asynchronous
// copies are plain copies (the kernels wait for them, then pass a barrier).
// It checks the kernels' indexing (row splits, vector head/tail, thread-to-row
// mapping, cross-thread and cross-CTA merges) -- not their speed or the GPU's memory model.
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
  Block(unsigned threads, size_t smem_bytes)
      : barrier(threads), slots(threads), smem(new unsigned char[smem_bytes + 16]()) {
    for (unsigned first = 0; first < threads; first += 32) {
      warp_barriers.emplace_back(std::make_unique<std::barrier<>>(std::min(32u, threads - first)));
    }
  }
  // Dynamic shared memory, 16-byte aligned as on a GPU.
  unsigned char* smem_base() const {
    const auto p = reinterpret_cast<uintptr_t>(smem.get());
    return smem.get() + (16 - p % 16) % 16;
  }
  std::barrier<> barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<uint64_t> slots;  // one shuffle slot per thread
  std::unique_ptr<unsigned char[]> smem;
};

struct Cluster {
  std::vector<std::unique_ptr<Block>> blocks;
  std::unique_ptr<std::barrier<>> barrier;  // every thread of every block
};

inline thread_local Dim3 thread_idx, block_idx;
inline Dim3 block_dim, grid_dim;
inline thread_local Block* current_block = nullptr;
inline thread_local Cluster* current_cluster = nullptr;
inline thread_local int current_rank = 0;

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

inline int cluster_rank() { return current_rank; }
inline void cluster_sync() { current_cluster->barrier->arrive_and_wait(); }
inline unsigned char* dynamic_smem() { return current_block->smem_base(); }

// *p (in this CTA's dynamic shared memory) in the shared memory of the cluster's CTA `rank`.
template <typename T>
const T* cluster_peer(const T* p, int rank) {
  const auto offset = reinterpret_cast<const unsigned char*>(p) - current_block->smem_base();
  return reinterpret_cast<const T*>(current_cluster->blocks[rank]->smem_base() + offset);
}

// kernel<<<grid, threads, smem_bytes>>>(args...) in clusters of `cluster` blocks (grid a
// multiple of it): one cluster at a time, its blocks together.
template <typename Kernel, typename... Args>
void launch(int64_t grid, unsigned threads, size_t smem_bytes, int cluster, Kernel kernel, const Args&... args) {
  block_dim = {threads, 1, 1};
  grid_dim = {static_cast<unsigned>(grid), 1, 1};
  for (int64_t first = 0; first < grid; first += cluster) {
    Cluster group;
    for (int r = 0; r < cluster; ++r) group.blocks.push_back(std::make_unique<Block>(threads, smem_bytes));
    group.barrier = std::make_unique<std::barrier<>>(std::ptrdiff_t(threads) * cluster);
    std::vector<std::thread> pool;
    pool.reserve(size_t(threads) * cluster);
    for (int r = 0; r < cluster; ++r) {
      for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, r, t] {
          Block& block = *group.blocks[r];
          current_block = &block;
          current_cluster = &group;
          current_rank = r;
          thread_idx = {t, 0, 0};
          block_idx = {static_cast<unsigned>(first + r), 0, 0};
          kernel(args...);
          // A thread that has returned takes no further part in barriers.
          block.warp_barriers[t / 32]->arrive_and_drop();
          block.barrier.arrive_and_drop();
          group.barrier->arrive_and_drop();
        });
      }
    }
    for (auto& th : pool) th.join();
  }
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

