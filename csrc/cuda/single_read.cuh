// The single-read variant of the forward kernels (sm_90): each row is read from global
// memory once, into shared memory, with asynchronous copies that put a CTA's whole share
// of the row in flight at once; the max, then the exp-sum (no online rescale: the max is
// known), then the gradient are computed from there. A row too long for one CTA's share
// of an SM's shared memory is split over a thread-block cluster of up to kMaxCluster
// CTAs, which merge their statistics through distributed shared memory.
//
//   CTA r of a row's cluster holds vectors [r * chunk, (r + 1) * chunk) of the row's
//   16-byte-aligned body; rank 0 also the scalar head, the last rank the scalar tail
//   (in registers, one element per thread).
//
// Results are bitwise reproducible (fixed-order reductions within a CTA and across the
// cluster's ranks) and equal to the streaming kernels' up to the rounding of the sums
// (another order). Where a launch cannot take it -- sm_80, backward, entropy, rows longer
// than kMaxCluster shares -- the streaming kernels run (run.cuh: resolve_variant).
#pragma once

#include "cuda/kernels.cuh"

#if !defined(FUSED_CE_CUDA_EMULATION) && defined(__CUDACC__)
#include <cooperative_groups.h>
#endif

namespace fused_ce::cuda {

constexpr int kSingleReadThreads = 512;
constexpr int kMaxCluster = 8;  // the portable cluster size
// CTAs an SM holds at once: while one computes from its copy, the other's copies are in
// flight. Each gets half an SM's shared memory and at most 64 registers a thread (not
// yet measured; see variants.h).
constexpr int kSingleReadCtasPerSm = 2;

// ---- Clusters, shared memory and asynchronous copies (or their emulation) ----------------

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define FUSED_CE_CLUSTERS 1
#endif

__device__ __forceinline__ int cluster_rank() {
#if defined(FUSED_CE_CUDA_EMULATION)
  return emu::cluster_rank();
#elif defined(FUSED_CE_CLUSTERS)
  return int(cooperative_groups::this_cluster().block_rank());
#else
  return 0;
#endif
}

// A barrier over every thread of the cluster that also orders their shared-memory
// accesses (cluster.sync: arrive.release / wait.acquire).
__device__ __forceinline__ void cluster_sync() {
#if defined(FUSED_CE_CUDA_EMULATION)
  emu::cluster_sync();
#elif defined(FUSED_CE_CLUSTERS)
  cooperative_groups::this_cluster().sync();
#else
  __syncthreads();
#endif
}

// The address of *p in the shared memory of the cluster's CTA `rank`.
template <typename T>
__device__ __forceinline__ const T* cluster_peer(const T* p, int rank) {
#if defined(FUSED_CE_CUDA_EMULATION)
  return emu::cluster_peer(p, rank);
#elif defined(FUSED_CE_CLUSTERS)
  return cooperative_groups::this_cluster().map_shared_rank(const_cast<T*>(p), unsigned(rank));
#else
  return p;
#endif
}

__device__ __forceinline__ unsigned char* dynamic_smem() {
#if defined(FUSED_CE_CUDA_EMULATION)
  return emu::dynamic_smem();
#else
  extern __shared__ __align__(16) unsigned char fused_ce_dynamic_smem[];
  return fused_ce_dynamic_smem;
#endif
}

// 16 bytes global -> shared without holding a register (cp.async.cg: through L2 only);
// complete after copy_async_wait_all() and a barrier.
__device__ __forceinline__ void copy_async_16(void* smem_dst, const void* gmem_src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
#else
  std::memcpy(smem_dst, gmem_src, 16);
#endif
}

__device__ __forceinline__ void copy_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
#endif
}

// ---- The launch shape ---------------------------------------------------------------------

// Shared memory of a CTA besides the row: the block reduction's scratch and the slots its
// cluster peers read.
struct SingleReadScratch {  // (double: exact for float, double and int alike)
  double warp_part[kSingleReadThreads / kWarp][3];
  double slot_max;     // this CTA's max, for its peers
  double slot_argmax;  // this CTA's argmax column (kNoColumn: none)
  double slot_sum[3];  // this CTA's sum, mass, gap (relative to the row's max)
};
constexpr size_t kScratchBytes = (sizeof(SingleReadScratch) + 15) / 16 * 16;

struct SingleReadShape {
  int cluster = 0;        // CTAs per row; 0: the row does not fit
  int chunk_vectors = 0;  // 16-byte vectors of the row per CTA
  size_t smem_bytes = 0;  // dynamic shared memory per CTA
};

// The smallest cluster whose CTAs each hold at most smem_per_cta bytes (scratch included).
inline SingleReadShape single_read_shape(int64_t num_classes, int element_size, size_t smem_per_cta,
                                         int max_cluster) {
  SingleReadShape shape;
  if (smem_per_cta <= kScratchBytes + 16) return shape;
  const int64_t vectors = num_classes * element_size / 16;  // at most, whatever the row's alignment
  const int64_t per_cta = int64_t((smem_per_cta - kScratchBytes) / 16);
  const int64_t cluster = vectors == 0 ? 1 : (vectors + per_cta - 1) / per_cta;
  if (cluster > max_cluster) return shape;
  shape.cluster = int(cluster);
  shape.chunk_vectors = int(vectors == 0 ? 0 : (vectors + cluster - 1) / cluster);
  shape.smem_bytes = kScratchBytes + size_t(shape.chunk_vectors) * 16;
  return shape;
}

// ---- Reductions over a CTA and its cluster ------------------------------------------------

// op(a, b) over the CTA's threads' values v, then over the cluster's CTAs in rank order,
// through scratch.*slot, which no other reduction of the kernel writes (a peer may still
// read it while this CTA goes on). Every thread of the cluster gets the same value.
template <typename T, typename Op>
__device__ __forceinline__ T cluster_reduce(T v, Op op, SingleReadScratch& scratch, double SingleReadScratch::*slot,
                                            int cluster) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  constexpr int kWarps = kSingleReadThreads / kWarp;
  if (threadIdx.x % kWarp == 0) scratch.warp_part[threadIdx.x / kWarp][0] = double(v);
  __syncthreads();
  T block = T(scratch.warp_part[0][0]);
#pragma unroll
  for (int w = 1; w < kWarps; ++w) block = op(block, T(scratch.warp_part[w][0]));
  if (threadIdx.x == 0) scratch.*slot = double(block);
  cluster_sync();  // the slots are written; also: every thread has read warp_part
  T row = T(cluster_peer(&(scratch.*slot), 0)[0]);
  for (int r = 1; r < cluster; ++r) row = op(row, T(cluster_peer(&(scratch.*slot), r)[0]));
  return row;
}

// The row's max.
template <typename acc_t>
__device__ __forceinline__ acc_t cluster_max(acc_t m, SingleReadScratch& scratch, int cluster) {
  return cluster_reduce(m, [](acc_t a, acc_t b) { return max_nan(a, b); }, scratch, &SingleReadScratch::slot_max,
                        cluster);
}

// The row's argmax from its threads' first columns of the row's max (kernels.cuh): the
// lowest; 0 where none has one, as torch.argmax.
__device__ __forceinline__ int cluster_argmax(int column, SingleReadScratch& scratch, int cluster) {
  column = cluster_reduce(column, [](int a, int b) { return a < b ? a : b; }, scratch,
                          &SingleReadScratch::slot_argmax, cluster);
  return column == kNoColumn ? 0 : column;
}

// Sums of (sum, mass, gap) over the CTA's threads, then over the cluster in rank order.
template <typename acc_t>
__device__ __forceinline__ void cluster_sums(acc_t (&v)[3], SingleReadScratch& scratch, int cluster) {
#pragma unroll
  for (int i = 0; i < 3; ++i) {
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) v[i] += __shfl_xor_sync(0xffffffffu, v[i], offset);
  }
  constexpr int kWarps = kSingleReadThreads / kWarp;
  if (threadIdx.x % kWarp == 0) {
#pragma unroll
    for (int i = 0; i < 3; ++i) scratch.warp_part[threadIdx.x / kWarp][i] = double(v[i]);
  }
  __syncthreads();
  acc_t block[3];
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    block[i] = acc_t(scratch.warp_part[0][i]);
    for (int w = 1; w < kWarps; ++w) block[i] += acc_t(scratch.warp_part[w][i]);
  }
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < 3; ++i) scratch.slot_sum[i] = double(block[i]);
  }
  cluster_sync();
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    v[i] = acc_t(cluster_peer(&scratch.slot_sum[i], 0)[0]);
    for (int r = 1; r < cluster; ++r) v[i] += acc_t(cluster_peer(&scratch.slot_sum[i], r)[0]);
  }
}

// ---- The kernel ---------------------------------------------------------------------------

// forward_kernel's results (and with O::grad its gradient), one row per cluster of
// shape.cluster CTAs (blockIdx.x / cluster is the row).
template <typename scalar_t, unsigned kOpts>
__global__ void __launch_bounds__(kSingleReadThreads, kSingleReadCtasPerSm)
    single_read_kernel(const RowProblem<scalar_t> p, const ForwardOutputs<acc_type<scalar_t>> out,
                       const GradInForward<scalar_t> with_grad, const SingleReadShape shape) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // launched on sm_90 only (run.cuh)
#else
  using O = Options<kOpts>;
  using acc_t = acc_type<scalar_t>;
  using PackT = Pack<scalar_t, kVecWidth<scalar_t>>;
  constexpr int W = kVecWidth<scalar_t>;
  const int cluster = shape.cluster;
  const int rank = cluster_rank();
  const int64_t row = int64_t(blockIdx.x) / cluster;  // the grid is num_rows * cluster CTAs
  const int tid = int(threadIdx.x);

  const RowMath<scalar_t, O> rm(p, row);
  const scalar_t* x = p.logits + row * p.logits_stride;
  const RowSplit split = split_row(x, int(p.num_classes));
  const int vectors = (split.body_end - split.head) / W;
  const int first = rank * shape.chunk_vectors;  // this CTA's vectors: [first, first + count)
  const int count = first >= vectors ? 0 : (vectors - first < shape.chunk_vectors ? vectors - first : shape.chunk_vectors);

  SingleReadScratch& scratch = *reinterpret_cast<SingleReadScratch*>(dynamic_smem());
  PackT* chunk = reinterpret_cast<PackT*>(dynamic_smem() + kScratchBytes);
  const PackT* body = reinterpret_cast<const PackT*>(x + split.head) + first;
  for (int i = tid; i < count; i += kSingleReadThreads) copy_async_16(chunk + i, body + i);

  // The scalar head (rank 0) and tail (last rank): an element in a thread's register.
  const int head_column = rank == 0 && tid < split.head ? tid : -1;
  const int tail_column =
      rank == cluster - 1 && tid < split.num_classes - split.body_end ? split.body_end + tid : -1;
  const acc_t head_x = head_column >= 0 ? static_cast<acc_t>(x[head_column]) : neg_inf<acc_t>();
  const acc_t tail_x = tail_column >= 0 ? static_cast<acc_t>(x[tail_column]) : neg_inf<acc_t>();
  const acc_t head_z = rm.logit(head_x), tail_z = rm.logit(tail_x);  // (-inf stays -inf)
  copy_async_wait_all();
  __syncthreads();

  // The CTA and the thread that own the target's column write the outputs and the target's
  // gradient; without a one-hot target here, rank 0's thread 0.
  int writer_rank = 0, writer_tid = 0;
  if (rm.index >= 0) {
    if (rm.index < split.head) {
      writer_tid = rm.index;
    } else if (rm.index >= split.body_end) {
      writer_rank = cluster - 1;
      writer_tid = rm.index - split.body_end;
    } else {
      const int vector = (rm.index - split.head) / W;
      writer_rank = vector / shape.chunk_vectors;
      writer_tid = (vector - writer_rank * shape.chunk_vectors) % kSingleReadThreads;
    }
  }
  const bool writer = rank == writer_rank && tid == writer_tid;
  // A column of this CTA's chunk: vector i, element k.
  auto column = [&](int i, int k) { return split.head + (first + i) * W + k; };
  auto unpack_chunk = [&](int i, acc_t(&v)[W]) {
    const PackT pack = chunk[i];  // one 16-byte load (unpack's memcpy would not be)
    unpack(pack, v);
  };

  // 1. The row's max.
  acc_t m = max_nan(head_z, tail_z);
#pragma unroll 4  // four 16-byte shared loads in flight (each pass alike, so bench/sass_stats.py pairs them)
  for (int i = tid; i < count; i += kSingleReadThreads) {
    acc_t v[W];
    unpack_chunk(i, v);
#pragma unroll
    for (int k = 0; k < W; ++k) m = max_nan(m, rm.logit(v[k]));
  }
  const acc_t row_max = cluster_max(m, scratch, cluster);

  // The row's argmax, where asked: the threads whose max is the row's look for its first
  // column in their copy (usually one thread, a few vectors); the others wait at the barrier.
  int argmax = 0;
  if (out.argmax) {  // (the same for the whole launch: every CTA reaches the cluster's barriers)
    int first_column = kNoColumn;
    if (is_row_max(m, row_max)) {
      auto holds_max = [&](acc_t z) { return z == row_max || z != z; };  // (a NaN only in a NaN row)
      if (head_column >= 0 && holds_max(head_z)) {
        first_column = head_column;
      } else {
        for (int i = tid; i < count && first_column == kNoColumn; i += kSingleReadThreads) {
          acc_t v[W];
          unpack_chunk(i, v);
#pragma unroll
          for (int k = W - 1; k >= 0; --k) {
            if (holds_max(rm.logit(v[k]))) first_column = column(i, k);
          }
        }
        if (first_column == kNoColumn && tail_column >= 0 && holds_max(tail_z)) first_column = tail_column;
      }
    }
    argmax = cluster_argmax(first_column, scratch, cluster);
  }

  // 2. sum_c exp(z_c - max), and with spread targets their mass and gap: the max is final.
  const acc_t bias = exp2_bias(row_max);
  acc_t part[3] = {0, 0, 0};  // sum, mass, gap
  auto add = [&](acc_t z, int c) {
    part[0] += exp2_approx(fma_(z, kLog2e<acc_t>, bias));
    if constexpr (O::spread) {
      const acc_t t = rm.spread_target(c);
      part[1] += t;
      part[2] += target_gap(t, row_max, z);
    }
  };
  if (head_column >= 0) add(head_z, head_column);
  if (tail_column >= 0) add(tail_z, tail_column);
#pragma unroll 4
  for (int i = tid; i < count; i += kSingleReadThreads) {
    acc_t v[W];
    unpack_chunk(i, v);
#pragma unroll
    for (int k = 0; k < W; ++k) add(rm.logit(v[k]), column(i, k));
  }
  cluster_sums(part, scratch, cluster);
  RowStats<acc_t> s{row_max, part[0], part[1], part[2]};

  // The target's logit, from this CTA's copy of the row.
  acc_t z_y = 0;
  if (writer && rm.index >= 0) {
    if (rm.index == head_column) {
      z_y = head_z;
    } else if (rm.index == tail_column) {
      z_y = tail_z;
    } else {
      z_y = rm.logit(static_cast<acc_t>(reinterpret_cast<const scalar_t*>(chunk)[rm.index - split.head - first * W]));
    }
  }
  if (rm.index >= 0) add_target(s, rm.one_hot_target(), z_y);  // s.gap: the writer's alone is right
  const acc_t lse = row_lse(s);
  acc_t reported = rm.ignored ? acc_t(0) : row_loss(s);

  if constexpr (O::grad) {
    const FusedRow<scalar_t> f(with_grad, row, s, lse);
    scalar_t* g = with_grad.grad + row * with_grad.grad_stride;
    // 3. The gradient from the copy: the same formulas as write_gradient.
    if (rm.bad_target || gradient_is_zero(f.p_coef, f.t_coef, rm.ignored, lse)) {
      const scalar_t fill = static_cast<scalar_t>(rm.bad_target ? quiet_nan<acc_t>() : acc_t(0));
      for (int i = tid; i < count; i += kSingleReadThreads) {
        acc_t v[W];
#pragma unroll
        for (int k = 0; k < W; ++k) v[k] = static_cast<acc_t>(fill);
        store_pack<false, scalar_t, acc_t, W>(g + column(i, 0), v);
      }
      if (head_column >= 0) g[head_column] = fill;
      if (tail_column >= 0) g[tail_column] = fill;
    } else {
      const SoftmaxTerm<acc_t> term = softmax_term(lse, f.p_coef);
      const bool aligned_out = reinterpret_cast<uintptr_t>(g) % 16 == reinterpret_cast<uintptr_t>(x) % 16;
      auto write_chunk = [&](auto folded, auto aligned) {
#pragma unroll 2  // (4 spilled at the 64 registers two CTAs an SM leave)
        for (int i = tid; i < count; i += kSingleReadThreads) {
          acc_t v[W];
          unpack_chunk(i, v);
#pragma unroll
          for (int k = 0; k < W; ++k) v[k] = gradient_at<decltype(folded)::value>(rm, term, f.t_coef, v[k], column(i, k));
          store_pack<decltype(aligned)::value, scalar_t, acc_t, W>(g + column(i, 0), v);
        }
      };
      with_folding<O>(term, [&](auto folded) {
        if (aligned_out) {
          write_chunk(folded, std::true_type{});
        } else {
          write_chunk(folded, std::false_type{});
        }
      });
      auto edge = [&](acc_t x_c, int c) { g[c] = static_cast<scalar_t>(gradient_at<false>(rm, term, f.t_coef, x_c, c)); };
      if (head_column >= 0) edge(head_x, head_column);
      if (tail_column >= 0) edge(tail_x, tail_column);
      if (writer && rm.index >= 0) g[rm.index] = static_cast<scalar_t>(target_gradient(rm, term, f.t_coef, z_y));
    }
    reported = objective(reported, lse, f.row_scale, f.z_scale);
  }
  if (writer) write_outputs(out, row, rm.bad_target, reported, lse, s.mass, argmax, row_max);
  cluster_sync();  // no CTA leaves while a peer may still read its slots
#endif
}

}  // namespace fused_ce::cuda
