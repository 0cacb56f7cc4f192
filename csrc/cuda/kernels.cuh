// CUDA kernels of fused_ce (device code only; launch.cuh launches them). The
// file also compiles as host C++ under tests/cuda_emulator, which runs the
// kernels thread by thread on the CPU to test their indexing without a GPU.
//
// A row is owned by a group of kThreads threads: a warp for small vocabularies
// (8 rows per block), a whole block for large ones. Each thread reads its share
// of the row in 16-byte vectors -- after a scalar head up to the first aligned
// address, so odd V and unaligned rows stay correct -- and keeps running
// statistics (common/ce_math.h) that merge across the group in a fixed order,
// so results are bitwise reproducible. All offsets are int64.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "common/ce_math.h"
#include "cuda/launch.h"

namespace fused_ce::cuda {

// Which parts of the target distribution T the element loop must handle.
enum class TargetMode {
  kOneHot,    // class index, no smoothing: T is one entry, added once per row
  kSmoothed,  // class index with label smoothing: T_c = smoothing * w_c plus the one-hot entry
  kProbs,     // probability targets: T_c = w_c * (on_target * q_c + smoothing)
};

template <typename scalar_t>
constexpr int kVecWidth = 16 / sizeof(scalar_t);

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Threads per row by vocabulary size (a launch heuristic, to be tuned on the GPU):
//   V <= 1024      32 (a warp per row, 8 rows per block)
//   V <= 8192     256 (a block per row)
//   larger        512 (a block per row)
// 1024 (a block per row, at most 64 registers a thread: one block per SM) is
// compiled too, for measuring: with one row per SM the rows the fused kernel reads
// twice may stay in L2 between the reads (launch.cuh: FUSED_CE_CUDA_THREADS_PER_ROW).
constexpr int kWarp = 32;
constexpr int kSmallRowBlock = 256;

inline int threads_per_row(int64_t num_classes) {
  if (num_classes <= 1024) return 32;
  if (num_classes <= 8192) return 256;
  return 512;
}

template <int kThreads>
constexpr int block_size() {
  return kThreads < kSmallRowBlock ? kSmallRowBlock : kThreads;
}

// This thread's row, and its place among the kThreads threads of the row.
template <int kThreads>
__device__ __forceinline__ int64_t row_of_thread() {
  constexpr int kRowsPerBlock = block_size<kThreads>() / kThreads;
  return int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreads;
}

template <int kThreads>
__device__ __forceinline__ int lane_in_row() {
  return threadIdx.x % kThreads;
}

// The row split around 16-byte alignment: scalars in [0, head), whole vectors in
// [head, body_end), scalars in [body_end, V).
struct RowSplit {
  int64_t head;
  int64_t body_end;
};

template <typename scalar_t>
__device__ __forceinline__ RowSplit split_row(const scalar_t* row, int64_t num_classes) {
  constexpr int W = kVecWidth<scalar_t>;
  const auto misalign = reinterpret_cast<uintptr_t>(row) % 16;
  int64_t head = misalign == 0 ? 0 : (16 - misalign) / sizeof(scalar_t);
  if (misalign % sizeof(scalar_t) != 0) head = num_classes;  // not element-aligned: all scalar
  head = head < num_classes ? head : num_classes;
  return {head, head + (num_classes - head) / W * W};
}

// Whole vectors a thread loads before it hands any to the caller in
// for_each_owned: several 16-byte loads in flight per thread, which the memory
// system needs to approach its bandwidth. The compiler cannot batch them itself
// where the caller stores into the row it reads (in place it may not move a
// load above an earlier store to the same buffer): with one vector at a time the
// writing kernels ran at 40-45% of copy speed on the H200 (bench/kernel_times.py).
// Reading passes batch 4, writing passes 2: with 4 in the write loop too, ptxas
// (sm_90) spilled in the fused one-hot kernel and gave the smoothed and
// probability ones 90+ registers (one block of 512 threads per SM); with these
// the bf16 fused one-hot kernel keeps 2 blocks per SM at 64 registers, no spills.
// ptxas still trades a few spilled bytes for occupancy elsewhere (bf16: backward
// one-hot at 40 registers, 3 blocks per SM; fused smoothed; at 1024 threads the
// fused smoothed and probability ones). Not yet timed on a GPU.
constexpr int kReadBatch = 4;
constexpr int kWriteBatch = 2;

// Visits the elements of row x that this thread owns: f_vec(pack, c0) for each
// whole vector pack = x[c0, c0 + W), f_scalar(x_c, c) for each element of the
// scalar head and tail. Vectors are loaded kLoadBatch at a time, all before the
// first f_vec of the batch, so f_vec may store over x[c0, c0 + W): no thread
// reads an element another thread owns.
template <typename scalar_t, int kThreads, int kLoadBatch = kReadBatch, typename VecFn, typename ScalarFn>
__device__ __forceinline__ void for_each_owned(const scalar_t* x, const RowSplit& split, int64_t num_classes,
                                               int lane, VecFn f_vec, ScalarFn f_scalar) {
  constexpr int W = kVecWidth<scalar_t>;
  constexpr int64_t kStride = int64_t(kThreads) * W;  // between a thread's consecutive vectors
  using PackT = Pack<scalar_t, W>;
  if (lane < split.head) f_scalar(x[lane], int64_t(lane));
  int64_t c0 = split.head + int64_t(lane) * W;
  for (; c0 + (kLoadBatch - 1) * kStride < split.body_end; c0 += kLoadBatch * kStride) {
    PackT pk[kLoadBatch];
#pragma unroll
    for (int u = 0; u < kLoadBatch; ++u) pk[u] = *reinterpret_cast<const PackT*>(x + c0 + u * kStride);
#pragma unroll
    for (int u = 0; u < kLoadBatch; ++u) f_vec(pk[u], c0 + u * kStride);
  }
  for (; c0 < split.body_end; c0 += kStride) f_vec(*reinterpret_cast<const PackT*>(x + c0), c0);
  const int64_t tail = split.body_end + lane;
  if (tail < num_classes) f_scalar(x[tail], tail);
}

// Writes value(x_c, c) to out[c] for each element c of the row x that this thread
// owns (for_each_owned's). out may be x itself (in place). out's rows may be
// aligned differently from x's (they are contiguous, x may not be); then vectors
// are stored element by element.
template <typename scalar_t, int kThreads, typename ValueFn>
__device__ __forceinline__ void write_row(const scalar_t* x, scalar_t* out, const RowSplit& split,
                                          int64_t num_classes, int lane, ValueFn value) {
  constexpr int W = kVecWidth<scalar_t>;
  using PackT = Pack<scalar_t, W>;
  const bool aligned_out = reinterpret_cast<uintptr_t>(out) % 16 == reinterpret_cast<uintptr_t>(x) % 16;
  for_each_owned<scalar_t, kThreads, kWriteBatch>(
      x, split, num_classes, lane,
      [&](const PackT& pk, int64_t c0) {
        PackT res;
#pragma unroll
        for (int k = 0; k < W; ++k) res.v[k] = static_cast<scalar_t>(value(pk.v[k], c0 + k));
        if (aligned_out) {
          *reinterpret_cast<PackT*>(out + c0) = res;
        } else {
#pragma unroll
          for (int k = 0; k < W; ++k) out[c0 + k] = res.v[k];
        }
      },
      [&](scalar_t xc, int64_t c) { out[c] = static_cast<scalar_t>(value(xc, c)); });
}

template <typename acc_t>
__device__ __forceinline__ acc_t fmax_(acc_t a, acc_t b) {
  return a > b ? a : b;  // a NaN b is dropped here; the exp-sum still turns NaN
}

template <typename acc_t>
__device__ __forceinline__ RowStats<acc_t> shfl_xor(const RowStats<acc_t>& s, int offset) {
  return {__shfl_xor_sync(0xffffffffu, s.max, offset), __shfl_xor_sync(0xffffffffu, s.sum, offset),
          __shfl_xor_sync(0xffffffffu, s.mass, offset), __shfl_xor_sync(0xffffffffu, s.gap, offset)};
}

template <typename acc_t>
__device__ __forceinline__ EntropyStats<acc_t> shfl_xor(const EntropyStats<acc_t>& s, int offset) {
  return {__shfl_xor_sync(0xffffffffu, s.max, offset), __shfl_xor_sync(0xffffffffu, s.sum, offset),
          __shfl_xor_sync(0xffffffffu, s.moment, offset)};
}

// Merges the statistics (RowStats or EntropyStats) of the kThreads threads of a
// row; every thread gets the same result (the merge order is fixed and symmetric).
template <int kThreads, typename Stats>
__device__ __forceinline__ Stats merge_row(Stats s) {
  constexpr int kWarpWidth = kThreads < kWarp ? kThreads : kWarp;
#pragma unroll
  for (int offset = kWarpWidth / 2; offset > 0; offset /= 2) s = merge(s, shfl_xor(s, offset));
  if constexpr (kThreads > kWarp) {
    constexpr int kWarps = kThreads / kWarp;
    __shared__ Stats partial[kWarps];
    const int warp = threadIdx.x / kWarp;
    if (threadIdx.x % kWarp == 0) partial[warp] = s;
    __syncthreads();
    s = partial[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) s = merge(s, partial[w]);
  }
  return s;
}

template <typename scalar_t>
struct RowContext {
  using acc_t = acc_type<scalar_t>;
  const RowProblem<scalar_t>& p;
  int64_t row;
  const scalar_t* logits;
  const scalar_t* probs;  // probability targets, or nullptr
  int64_t index;          // class-index target within this slice; -1 if ignored, out of range or elsewhere
  bool ignored;
  bool bad_target;  // class index out of range (not ignore_index): NaN results

  __device__ RowContext(const RowProblem<scalar_t>& problem, int64_t r)
      : p(problem),
        row(r),
        logits(problem.logits + r * problem.logits_stride),
        probs(nullptr),
        index(-1),
        ignored(false),
        bad_target(false) {
    if (problem.target_probs != nullptr) {
      probs = problem.target_probs + r * problem.target_stride;
    } else {
      const int64_t y = problem.target_index[r];
      ignored = y == problem.ignore_index;
      bad_target = !ignored && (y < 0 || y >= problem.vocab_total);
      const int64_t local = y - problem.vocab_start;
      index = !ignored && !bad_target && local >= 0 && local < problem.num_classes ? local : -1;
    }
  }

  __device__ __forceinline__ acc_t logit(scalar_t x) const {
    const acc_t v = static_cast<acc_t>(x);
    return p.cap > acc_t(0) ? softcap_value(v, p.cap, p.inv_cap) : v;
  }
  __device__ __forceinline__ acc_t weight(int64_t c) const { return p.weight ? p.weight[c] : acc_t(1); }

  // The spread part of T_c (everything but the one-hot entry).
  template <TargetMode kMode>
  __device__ __forceinline__ acc_t spread_target(int64_t c) const {
    if constexpr (kMode == TargetMode::kProbs) {
      return weight(c) * (p.on_target * static_cast<acc_t>(probs[c]) + p.smoothing);
    } else if constexpr (kMode == TargetMode::kSmoothed) {
      return ignored ? acc_t(0) : p.smoothing * weight(c);
    } else {
      return acc_t(0);
    }
  }

  // The whole T_c, one-hot entry included.
  template <TargetMode kMode>
  __device__ __forceinline__ acc_t target(int64_t c) const {
    acc_t t = spread_target<kMode>(c);
    if constexpr (kMode != TargetMode::kProbs) {
      if (c == index) t += p.on_target * weight(c);
    }
    return t;
  }
};

// Adds n logits z (and their spread targets) to a thread's running statistics.
template <TargetMode kMode, int n, typename acc_t>
__device__ __forceinline__ void accumulate(RowStats<acc_t>& s, const acc_t (&z)[n], const acc_t (&t)[n]) {
  acc_t m = s.max;
#pragma unroll
  for (int k = 0; k < n; ++k) m = fmax_(m, z[k]);
  s = rescale(s, m);
  if (m == neg_inf<acc_t>()) {  // only -inf so far: nothing to add to the sum
    if constexpr (kMode != TargetMode::kOneHot) {
#pragma unroll
      for (int k = 0; k < n; ++k) s.mass += t[k];
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < n; ++k) {
    s.sum += exp_(z[k] - m);
    if constexpr (kMode != TargetMode::kOneHot) {
      s.mass += t[k];
      s.gap += target_gap(t[k], m, z[k]);
    }
  }
}

// Writes the gradient of one row: p_coef * softmax - t_coef * T, times the
// soft-cap slope. g may be the logits row itself (in place): every element is
// read and then written by the same thread.
template <typename scalar_t, int kThreads, TargetMode kMode>
__device__ __forceinline__ void write_row_grad(const RowContext<scalar_t>& ctx, const RowSplit& split, int lane,
                                               acc_type<scalar_t> lse, acc_type<scalar_t> p_coef,
                                               acc_type<scalar_t> t_coef, scalar_t* g) {
  using acc_t = acc_type<scalar_t>;
  const RowProblem<scalar_t>& p = ctx.p;
  const bool zero_row = gradient_is_zero(p_coef, t_coef, ctx.ignored, lse);
  const acc_t nan = acc_t(__int_as_float(0x7fffffff));

  auto grad_at = [&](acc_t z, int64_t c) -> acc_t {
    if (zero_row) return acc_t(0);  // nothing flows into this row
    if (ctx.bad_target) return nan;
    acc_t v = grad_value(exp_(z - lse), ctx.template target<kMode>(c), p_coef, t_coef);
    if (p.cap > acc_t(0)) v *= softcap_slope(z, p.inv_cap);
    return v;
  };

  write_row<scalar_t, kThreads>(ctx.logits, g, split, p.num_classes, lane,
                                [&](scalar_t x, int64_t c) { return grad_at(ctx.logit(x), c); });
}

// Per-row statistics (loss, lse, mass) and, with kWithGrad, the gradient of the
// objective (see objective() in common/ce_math.h) in the same pass over the row.
template <typename scalar_t, int kThreads, TargetMode kMode, bool kWithGrad>
__global__ void __launch_bounds__(block_size<kThreads>())
    forward_kernel(const RowProblem<scalar_t> p, const ForwardOutputs<acc_type<scalar_t>> out,
                   const GradInForward<scalar_t> with_grad) {
  using acc_t = acc_type<scalar_t>;
  constexpr int W = kVecWidth<scalar_t>;
  const int lane = lane_in_row<kThreads>();
  const int64_t row = row_of_thread<kThreads>();
  // A whole block shares a row when kThreads > 32, so this exit is block-uniform then.
  if (row >= p.num_rows) return;

  const RowContext<scalar_t> ctx(p, row);
  // Read before any thread may overwrite the row with its gradient: merge_row's
  // __syncthreads orders it before the stores for a block per row; a warp per row
  // needs its own barrier (shuffles do not order memory).
  const acc_t zy = ctx.index >= 0 ? ctx.logit(ctx.logits[ctx.index]) : acc_t(0);
  if constexpr (kWithGrad && kThreads <= kWarp) __syncwarp();
  const RowSplit split = split_row(ctx.logits, p.num_classes);
  RowStats<acc_t> s = empty_row_stats<acc_t>();
  for_each_owned<scalar_t, kThreads>(
      ctx.logits, split, p.num_classes, lane,
      [&](const Pack<scalar_t, W>& pk, int64_t c0) {
        acc_t z[W], t[W];
#pragma unroll
        for (int k = 0; k < W; ++k) {
          z[k] = ctx.logit(pk.v[k]);
          t[k] = ctx.template spread_target<kMode>(c0 + k);
        }
        accumulate<kMode>(s, z, t);
      },
      [&](scalar_t xc, int64_t c) {
        const acc_t z[1] = {ctx.logit(xc)};
        const acc_t t[1] = {ctx.template spread_target<kMode>(c)};
        accumulate<kMode>(s, z, t);
      });
  s = merge_row<kThreads>(s);  // every thread of the row holds the row's statistics now
  if (ctx.index >= 0) add_target(s, acc_t(p.on_target * ctx.weight(ctx.index)), zy);
  const acc_t lse = row_lse(s);
  acc_t reported = ctx.ignored ? acc_t(0) : row_loss(s);
  if constexpr (kWithGrad) {
    const acc_t row_scale = with_grad.row_scale[row];
    const acc_t z_scale = with_grad.z_scale ? with_grad.z_scale[row] : acc_t(0);
    write_row_grad<scalar_t, kThreads, kMode>(ctx, split, lane, lse, row_scale * s.mass + 2 * z_scale * lse, row_scale,
                                              with_grad.grad + row * with_grad.grad_stride);
    reported = objective(reported, lse, row_scale, z_scale);
  }
  if (lane == 0) {
    // A bad class index never makes the kernel read out of bounds: the row's
    // results are NaN instead (see fused_ce.set_target_validation).
    const acc_t nan = acc_t(__int_as_float(0x7fffffff));
    out.loss[row] = ctx.bad_target ? nan : reported;
    out.lse[row] = ctx.bad_target ? nan : lse;
    if (out.mass) out.mass[row] = ctx.bad_target ? nan : s.mass;
  }
}

template <typename scalar_t, int kThreads, TargetMode kMode>
__global__ void __launch_bounds__(block_size<kThreads>())
    backward_kernel(const RowProblem<scalar_t> p, const BackwardInputs<acc_type<scalar_t>> in,
                    scalar_t* grad, int64_t grad_stride) {  // grad may be the logits (in place)
  const int lane = lane_in_row<kThreads>();
  const int64_t row = row_of_thread<kThreads>();
  if (row >= p.num_rows) return;
  if (in.keep_where_one && in.keep_where_one[row * in.keep_stride] == 1) return;  // holds its gradient already
  const RowContext<scalar_t> ctx(p, row);
  write_row_grad<scalar_t, kThreads, kMode>(ctx, split_row(ctx.logits, p.num_classes), lane, in.lse[row],
                                            in.p_coef[row], in.t_coef[row], grad + row * grad_stride);
}

// Entropy and lse of each row of softmax(logits) (EntropyStats in common/ce_math.h).
template <typename scalar_t, int kThreads>
__global__ void __launch_bounds__(block_size<kThreads>()) entropy_forward_kernel(const EntropyArgs<scalar_t> a) {
  using acc_t = acc_type<scalar_t>;
  constexpr int W = kVecWidth<scalar_t>;
  const int lane = lane_in_row<kThreads>();
  const int64_t row = row_of_thread<kThreads>();
  if (row >= a.num_rows) return;
  const scalar_t* x = a.logits + row * a.logits_stride;
  EntropyStats<acc_t> s = empty_entropy_stats<acc_t>();
  auto add = [&](const acc_t* z, int n) {
    acc_t m = s.max;
    for (int k = 0; k < n; ++k) m = fmax_(m, z[k]);
    s = rescale(s, m);
    if (m == neg_inf<acc_t>()) return;
    for (int k = 0; k < n; ++k) {
      const acc_t e = exp_(z[k] - m);
      s.sum += e;
      s.moment += entropy_moment(e, m, z[k]);
    }
  };
  for_each_owned<scalar_t, kThreads>(
      x, split_row(x, a.num_classes), a.num_classes, lane,
      [&](const Pack<scalar_t, W>& pk, int64_t c0) {
        acc_t z[W];
#pragma unroll
        for (int k = 0; k < W; ++k) z[k] = static_cast<acc_t>(pk.v[k]);
        add(z, W);
      },
      [&](scalar_t xc, int64_t) {
        const acc_t z = static_cast<acc_t>(xc);
        add(&z, 1);
      });
  s = merge_row<kThreads>(s);
  if (lane == 0) {
    a.entropy[row] = entropy_value(s);
    a.lse[row] = s.max + log_(s.sum);
  }
}

template <typename scalar_t, int kThreads>
__global__ void __launch_bounds__(block_size<kThreads>()) entropy_backward_kernel(const EntropyArgs<scalar_t> a) {
  using acc_t = acc_type<scalar_t>;
  const int lane = lane_in_row<kThreads>();
  const int64_t row = row_of_thread<kThreads>();
  if (row >= a.num_rows) return;
  const scalar_t* x = a.logits + row * a.logits_stride;
  scalar_t* g = a.grad + row * a.num_classes;
  const acc_t lse = a.lse[row], h = a.entropy[row], gh = a.grad_entropy[row * a.grad_entropy_stride];
  auto grad_at = [&](acc_t z) -> acc_t {
    if (gh == acc_t(0)) return acc_t(0);
    const acc_t p = exp_(z - lse);
    return p == acc_t(0) ? acc_t(0) : entropy_grad_value(p, z, lse, h, gh);  // p = 0: 0, not 0 * inf
  };
  write_row<scalar_t, kThreads>(x, g, split_row(x, a.num_classes), a.num_classes, lane,
                                [&](scalar_t v, int64_t) { return grad_at(static_cast<acc_t>(v)); });
}

// rows[i] *= scale[i], skipping rows whose scale is exactly 1 (a plain
// loss.backward()), so that case costs one read of scale per row. A block of
// kScaleThreads threads per row, in a grid-stride loop over rows.
constexpr int kScaleThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kScaleThreads)
    scale_rows_kernel(scalar_t* rows, int64_t num_rows, int64_t num_classes, int64_t stride,
                      const acc_type<scalar_t>* scale, int64_t scale_stride) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t row = blockIdx.x; row < num_rows; row += gridDim.x) {
    const acc_t factor = scale[row * scale_stride];
    if (factor == 1) continue;
    scalar_t* r = rows + row * stride;
    write_row<scalar_t, kScaleThreads>(r, r, split_row(r, num_classes), num_classes, int(threadIdx.x),
                                       [&](scalar_t x, int64_t) { return static_cast<acc_t>(x) * factor; });
  }
}

// Turns the runtime choices (threads per row: 32, 256, 512 or 1024; the target mode)
// into template arguments.
template <typename scalar_t, typename Fn>
void dispatch_row_kernel(const RowProblem<scalar_t>& p, int threads, Fn&& fn) {
  auto with_mode = [&](auto threads) {
    if (p.target_probs != nullptr) {
      fn(threads, std::integral_constant<TargetMode, TargetMode::kProbs>{});
    } else if (p.smoothing != 0) {
      fn(threads, std::integral_constant<TargetMode, TargetMode::kSmoothed>{});
    } else {
      fn(threads, std::integral_constant<TargetMode, TargetMode::kOneHot>{});
    }
  };
  switch (threads) {
    case 32: with_mode(std::integral_constant<int, 32>{}); break;
    case 256: with_mode(std::integral_constant<int, 256>{}); break;
    case 1024: with_mode(std::integral_constant<int, 1024>{}); break;
    default: with_mode(std::integral_constant<int, 512>{}); break;
  }
}

// The same for kernels without a target mode (entropy).
template <typename Fn>
void dispatch_threads(int threads, Fn&& fn) {
  switch (threads) {
    case 32: fn(std::integral_constant<int, 32>{}); break;
    case 256: fn(std::integral_constant<int, 256>{}); break;
    case 1024: fn(std::integral_constant<int, 1024>{}); break;
    default: fn(std::integral_constant<int, 512>{}); break;
  }
}

}  // namespace fused_ce::cuda
