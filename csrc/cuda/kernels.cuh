// CUDA kernels of fused_ce (device code only; launch.cuh launches them). The
// file also compiles as host C++ under tests/cuda_emulator, which runs the
// kernels thread by thread on the CPU to test their indexing without a GPU.
//
// The streaming kernels: a row is owned by a group of kThreads threads -- a warp
// for small vocabularies (8 rows per block), a whole block for large ones. Each
// thread reads its share of the row in 16-byte vectors -- after a scalar head up to
// the first aligned address, so odd V and unaligned rows stay correct -- and keeps
// running statistics that merge across the group in a fixed order, so results are
// bitwise reproducible. Row offsets are int64, column offsets within a row int32.
// single_read.cuh holds the variant that keeps a row in (cluster) shared memory.
//
// Instruction budget (bench/sass_stats.py measures it): the options that are the
// same for a whole launch are template bits (options.h); what is the same for a row
// (ignored, bad target, zero coefficients, the target's own entry) is decided
// outside the element loops; and exp(z - m) is exp2 of one FFMA, z * log2(e) +
// bias, with the row's constant in bias.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common/ce_math.h"
#include "cuda/launch.h"
#include "cuda/options.h"

namespace fused_ce::cuda {

template <typename scalar_t>
constexpr int kVecWidth = 16 / sizeof(scalar_t);

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

constexpr int kWarp = 32;
constexpr int kSmallRowBlock = 256;  // a warp per row: 8 rows per block

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

// ---- The per-element arithmetic of the loops -------------------------------------

template <typename acc_t>
constexpr acc_t kLog2e = acc_t(1.4426950408889634);

// 2^x. float: ex2.approx.ftz, one MUFU.EX2 (2 ulp; results below 2^-126 flush to 0, far
// under what a softmax entry or a bf16 gradient can tell); the non-ftz form, and so
// __expf, adds a denormal fix-up of 4 instructions an element. The emulator: exp2f.
__device__ __forceinline__ float exp2_approx(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return std::exp2(x);
#endif
}
__device__ __forceinline__ double exp2_approx(double x) { return exp2(x); }

// max that returns NaN if either is NaN (nan_max of ce_math.h): one FMNMX.NAN for float.
__device__ __forceinline__ float max_nan(float a, float b) {
#ifdef __CUDA_ARCH__
  float m;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(m) : "f"(a), "f"(b));
  return m;
#else
  return nan_max(a, b);
#endif
}
__device__ __forceinline__ double max_nan(double a, double b) { return nan_max(a, b); }

// Explicit FMAs (not affected by --fmad=false, so every path that uses one rounds alike).
__device__ __forceinline__ float fma_(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_(double a, double b, double c) { return fma(a, b, c); }

// The bias of exp2(z * log2(e) + bias) = exp(z - m): -m * log2(e), rounded once (so
// the result carries a relative error of about ulp(m), as lse itself). While m is
// -inf (nothing but -inf logits seen) 0, so that those give exp2(-inf) = 0, not NaN.
template <typename acc_t>
__device__ __forceinline__ acc_t exp2_bias(acc_t m) {
  return m == neg_inf<acc_t>() ? acc_t(0) : -m * kLog2e<acc_t>;
}

template <typename acc_t>
__device__ __forceinline__ acc_t quiet_nan() {
  return std::numeric_limits<acc_t>::quiet_NaN();
}

// ---- Rows in 16-byte vectors -------------------------------------------------------

// The row split around 16-byte alignment: scalars in [0, head), whole vectors in
// [head, body_end), scalars in [body_end, num_classes). Column offsets in 32 bits
// (launch.cuh refuses rows longer than kMaxRowLength).
struct RowSplit {
  int head;
  int body_end;
  int num_classes;
};

// row: element-aligned (launch.cuh checks), so the head is shorter than a vector -- one
// element for each of its first lanes.
template <typename scalar_t>
__device__ __forceinline__ RowSplit split_row(const scalar_t* row, int num_classes) {
  constexpr int W = kVecWidth<scalar_t>;
  const int misalign = int(reinterpret_cast<uintptr_t>(row) % 16);
  int head = misalign == 0 ? 0 : (16 - misalign) / int(sizeof(scalar_t));
  head = head < num_classes ? head : num_classes;
  return {head, head + (num_classes - head) / W * W, num_classes};
}

// The lane that for_each_owned hands column c to.
template <typename scalar_t, int kThreads>
__device__ __forceinline__ int owner_lane(const RowSplit& split, int c) {
  constexpr int W = kVecWidth<scalar_t>;
  if (c < split.head) return c;
  if (c < split.body_end) return ((c - split.head) / W) % kThreads;
  return c - split.body_end;
}

// Whole vectors a thread loads before it hands any to the caller in for_each_owned:
// several 16-byte loads in flight per thread, which the memory system needs to approach
// its bandwidth (~24 KB per SM on the H200: 512 threads x 4 x 16 B is 32 KB a block). The
// compiler cannot batch them itself where the caller stores into the row it reads (in
// place it may not move a load above an earlier store to the same buffer): with one
// vector at a time the writing kernels ran at 40-45% of copy speed on the H200. Registers
// and spills per instantiation: bench/results/cpu-2026-11-30/sass_stats_sm90.txt.
constexpr int kReadBatch = 4;
constexpr int kWriteBatch = 2;

// The output pointer of a pass that only reads.
struct NoOutput {};
__device__ __forceinline__ NoOutput operator+(NoOutput, int) { return {}; }

// The W elements of a 16-byte vector in the accumulation type. bf16 is the high half of
// a float: the two in a 32-bit word convert with one shift and one mask (the generic
// conversion spends a byte permute more on the high one).
template <typename scalar_t, int W>
__device__ __forceinline__ void unpack(const Pack<scalar_t, W>& pk, acc_type<scalar_t>* v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    uint32_t words[W / 2];
    std::memcpy(words, &pk, sizeof(words));
#pragma unroll
    for (int i = 0; i < W / 2; ++i) {
      const uint32_t lo = words[i] << 16, hi = words[i] & 0xffff0000u;
      std::memcpy(&v[2 * i], &lo, sizeof(float));
      std::memcpy(&v[2 * i + 1], &hi, sizeof(float));
    }
  } else {
#pragma unroll
    for (int k = 0; k < W; ++k) v[k] = static_cast<acc_type<scalar_t>>(pk.v[k]);
  }
}

// Visits the elements of row x that this thread owns, in the accumulation type:
// f_batch(v, c0, op) for whole vectors -- kLoadBatch of them at a time (then one at a
// time for the rest), all loaded before f_batch runs, so f_batch may store over them:
// v[u * W + k] = x[c0 + u * kThreads * W + k], and op = out + c0 (out: a row f_batch
// writes, or NoOutput{}) --; f_scalar(v, c) for each element of the scalar head and tail.
// No thread reads an element another thread owns.
template <typename scalar_t, int kThreads, int kLoadBatch, typename OutPtr, typename BatchFn, typename ScalarFn>
__device__ __forceinline__ void for_each_owned(const scalar_t* x, OutPtr out, const RowSplit& split, int lane,
                                               BatchFn f_batch, ScalarFn f_scalar) {
  using acc_t = acc_type<scalar_t>;
  constexpr int W = kVecWidth<scalar_t>;
  constexpr int kStride = kThreads * W;  // between a thread's consecutive vectors
  using PackT = Pack<scalar_t, W>;
  if (lane < split.head) f_scalar(static_cast<acc_t>(x[lane]), lane);
  int c0 = split.head + lane * W;
  // Walked as pointers: no 64-bit address arithmetic from c0 per vector.
  const scalar_t* xp = x + c0;
  OutPtr op = out + c0;
  for (; c0 + (kLoadBatch - 1) * kStride < split.body_end;
       c0 += kLoadBatch * kStride, xp += kLoadBatch * kStride, op = op + kLoadBatch * kStride) {
    PackT packs[kLoadBatch];
#pragma unroll
    for (int u = 0; u < kLoadBatch; ++u) packs[u] = *reinterpret_cast<const PackT*>(xp + u * kStride);
    acc_t v[kLoadBatch * W];
#pragma unroll
    for (int u = 0; u < kLoadBatch; ++u) unpack(packs[u], v + u * W);
    f_batch(v, c0, op);
  }
#pragma unroll 1  // the rest: fewer than kLoadBatch vectors a thread
  for (; c0 < split.body_end; c0 += kStride, xp += kStride, op = op + kStride) {
    const PackT pack = *reinterpret_cast<const PackT*>(xp);  // one 16-byte load (unpack's memcpy would not be)
    acc_t v[W];
    unpack(pack, v);
    f_batch(v, c0, op);
  }
  const int tail = split.body_end + lane;
  if (tail < split.num_classes) f_scalar(static_cast<acc_t>(x[tail]), tail);
}

// Stores W values at op: one 16-byte vector where the output row is aligned as the
// logits row (kAlignedOut), else element by element.
template <bool kAlignedOut, typename scalar_t, typename acc_t, int W>
__device__ __forceinline__ void store_pack(scalar_t* op, const acc_t* v) {
  Pack<scalar_t, W> res;
#pragma unroll
  for (int k = 0; k < W; ++k) res.v[k] = static_cast<scalar_t>(v[k]);
  if constexpr (kAlignedOut) {
    *reinterpret_cast<Pack<scalar_t, W>*>(op) = res;
  } else {
#pragma unroll
    for (int k = 0; k < W; ++k) op[k] = res.v[k];
  }
}

// out[c] = value(x_c, c) (x_c in the accumulation type) for each element c of row x
// that this thread owns (out may be x itself: each element is read, then written, by
// the same thread). kAlignedOut: out's row has x's alignment (see store_pack).
template <typename scalar_t, int kThreads, bool kAlignedOut, typename ValueFn>
__device__ __forceinline__ void write_owned(const scalar_t* x, scalar_t* out, const RowSplit& split, int lane,
                                            ValueFn value) {
  using acc_t = acc_type<scalar_t>;
  constexpr int W = kVecWidth<scalar_t>;
  constexpr int kStride = kThreads * W;
  for_each_owned<scalar_t, kThreads, kWriteBatch>(
      x, out, split, lane,
      [&](const auto& v, int c0, scalar_t* op) {
        constexpr int n = std::extent_v<std::remove_reference_t<decltype(v)>>;
        acc_t g[n];
#pragma unroll
        for (int k = 0; k < n; ++k) g[k] = value(v[k], c0 + k / W * kStride + k % W);
#pragma unroll
        for (int u = 0; u < n / W; ++u) store_pack<kAlignedOut, scalar_t, acc_t, W>(op + u * kStride, g + u * W);
      },
      [&](acc_t xc, int c) { out[c] = static_cast<scalar_t>(value(xc, c)); });
}

template <typename scalar_t, int kThreads, typename ValueFn>
__device__ __forceinline__ void write_owned(const scalar_t* x, scalar_t* out, const RowSplit& split, int lane,
                                            ValueFn value) {
  if (reinterpret_cast<uintptr_t>(out) % 16 == reinterpret_cast<uintptr_t>(x) % 16) {
    write_owned<scalar_t, kThreads, true>(x, out, split, lane, value);
  } else {
    write_owned<scalar_t, kThreads, false>(x, out, split, lane, value);
  }
}

// out[c] = value for the whole row (no loads). In place the split is the logits' own, so
// every element is still written by the thread that owns it.
template <typename scalar_t, int kThreads>
__device__ __forceinline__ void fill_row(scalar_t* out, int num_classes, int lane, scalar_t value) {
  constexpr int W = kVecWidth<scalar_t>;
  const RowSplit split = split_row(out, num_classes);
  Pack<scalar_t, W> pk;
#pragma unroll
  for (int k = 0; k < W; ++k) pk.v[k] = value;
  if (lane < split.head) out[lane] = value;
#pragma unroll 1
  for (int c0 = split.head + lane * W; c0 < split.body_end; c0 += kThreads * W) {
    *reinterpret_cast<Pack<scalar_t, W>*>(out + c0) = pk;
  }
  if (split.body_end + lane < num_classes) out[split.body_end + lane] = value;
}

// ---- Merging across the threads of a row ---------------------------------------------

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

template <int kWidth, typename Stats>
__device__ __forceinline__ Stats merge_warp(Stats s) {
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) s = merge(s, shfl_xor(s, offset));
  return s;
}

// Merges the statistics (RowStats or EntropyStats) of the kThreads threads of a
// row; every thread gets the same result (the merge order is fixed and symmetric).
template <int kThreads, typename Stats>
__device__ __forceinline__ Stats merge_row(Stats s) {
  s = merge_warp<kThreads < kWarp ? kThreads : kWarp>(s);
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

// ---- One row's target and options ----------------------------------------------------

// What the loops need of a row besides its logits, with the row-uniform facts of its
// target decided once.
template <typename scalar_t, class O>
struct RowMath {
  using acc_t = acc_type<scalar_t>;
  const RowProblem<scalar_t>& p;
  const scalar_t* probs = nullptr;  // probability targets' row
  int index = -1;                   // class-index target's column in this slice; -1: none here
  bool ignored = false;
  bool bad_target = false;  // class index out of range (not ignore_index): NaN results
  acc_t smoothing = 0;      // with O::smoothing: T_c = smoothing * w_c off the target (0 if ignored)

  __device__ RowMath(const RowProblem<scalar_t>& problem, int64_t row) : p(problem) {
    if constexpr (O::probs) {
      probs = problem.target_probs + row * problem.target_stride;
    } else {
      const int64_t y = problem.target_index[row];
      ignored = y == problem.ignore_index;
      bad_target = !ignored && (y < 0 || y >= problem.vocab_total);
      const int64_t local = y - problem.vocab_start;
      if (!ignored && !bad_target && local >= 0 && local < problem.num_classes) index = int(local);
      smoothing = ignored ? acc_t(0) : problem.smoothing;
    }
  }

  // z from a logit x (converted to acc_t).
  __device__ __forceinline__ acc_t logit(acc_t v) const {
    if constexpr (O::mapped) {
      return p.map.value(v);
    } else {
      return v;
    }
  }

  // T_c off the one-hot entry.
  __device__ __forceinline__ acc_t spread_target(int c) const {
    [[maybe_unused]] const acc_t w = O::weights ? p.weight[c] : acc_t(1);
    if constexpr (O::probs) {
      return w * (p.on_target * static_cast<acc_t>(probs[c]) + p.smoothing);
    } else if constexpr (O::smoothing) {
      return O::weights ? smoothing * w : smoothing;  // (no branch on `ignored` in the loops)
    } else {
      return acc_t(0);
    }
  }

  // The one-hot part of T at the target's column (weights read here at run time: the
  // canonical options leave them out of the one-hot loops).
  __device__ __forceinline__ acc_t one_hot_target() const {
    return p.on_target * (p.weight != nullptr ? p.weight[index] : acc_t(1));
  }

  // The writer of the row's outputs and of the gradient at the target's column: the
  // lane that owns that column (it alone reads the target's logit), else lane 0.
  template <int kThreads>
  __device__ __forceinline__ int writer_lane(const RowSplit& split) const {
    return index >= 0 ? owner_lane<scalar_t, kThreads>(split, index) : 0;
  }
};

// ---- The statistics pass ---------------------------------------------------------------

// No column: the argmax of a thread, CTA or row that has seen no finite or +inf logit.
constexpr int kNoColumn = std::numeric_limits<int>::max();

// A thread's running statistics in the loop's form: RowStats plus the exp2 bias of its max,
// and the batch that raised the max to its value (for the row's argmax, found after the
// loop: see thread_argmax).
template <typename acc_t>
struct LoopStats {
  acc_t max = neg_inf<acc_t>();
  acc_t bias = 0;  // exp2_bias(max)
  acc_t sum = 0;   // sum_c exp2(z_c log2(e) + bias) = sum_c exp(z_c - max)
  acc_t mass = 0;  // spread targets only
  acc_t gap = 0;
  int max_batch = kNoColumn;  // that batch's first column, as for_each_owned hands it

  __device__ __forceinline__ RowStats<acc_t> stats() const { return {max, sum, mass, gap}; }
};

// Adds n logits z -- the batch for_each_owned hands over at column c0 -- to a thread's
// statistics, with spread targets also their T_c = target_of(k) (computed only in the sum
// loop, so that a batch holds n logits in registers, not 2n values). The max of the batch
// comes first, so that the running sum is rescaled at most once a batch (rarely, after the
// first batches); that rare branch also notes the batch, so that the argmax costs the loop
// nothing.
template <class O, int n, typename acc_t, typename TargetFn>
__device__ __forceinline__ void add_batch(LoopStats<acc_t>& s, const acc_t (&z)[n], int c0, TargetFn target_of) {
  acc_t m = s.max;
#pragma unroll
  for (int k = 0; k < n; ++k) m = max_nan(m, z[k]);
  if (m != s.max) {  // (a NaN max never equals itself: the sum stays NaN)
    if (s.max == s.max) s.max_batch = c0;  // ties keep the earlier batch; a NaN max its first NaN's
    const acc_t bias = exp2_bias(m);
    s.sum *= exp2_approx(fma_(s.max, kLog2e<acc_t>, bias));  // 0 from an empty sum, or from max -inf
    if constexpr (O::spread) {
      if (s.mass != acc_t(0)) s.gap += s.mass * (m - s.max);  // +inf for mass on a -inf logit
    }
    s.max = m;
    s.bias = bias;
  }
  if constexpr (O::spread) {
    if (m == neg_inf<acc_t>()) {  // only -inf so far: their gap joins with the first finite max
#pragma unroll
      for (int k = 0; k < n; ++k) s.mass += target_of(k);
      return;
    }
  }
#pragma unroll
  for (int k = 0; k < n; ++k) {
    s.sum += exp2_approx(fma_(z[k], kLog2e<acc_t>, s.bias));
    if constexpr (O::spread) {
      const acc_t t = target_of(k);
      s.mass += t;
      s.gap += target_gap(t, m, z[k]);
    }
  }
}

// Column k of the batch that for_each_owned hands over at c0 (a scalar: k = 0).
template <typename scalar_t, int kThreads>
__device__ __forceinline__ int batch_column(int c0, int k) {
  constexpr int W = kVecWidth<scalar_t>;
  return c0 + k / W * kThreads * W + k % W;
}

// This thread's statistics of row x (the one-hot entry not included).
template <typename scalar_t, int kThreads, class O>
__device__ __forceinline__ LoopStats<acc_type<scalar_t>> thread_statistics(const RowMath<scalar_t, O>& rm,
                                                                           const scalar_t* x, const RowSplit& split,
                                                                           int lane) {
  using acc_t = acc_type<scalar_t>;
  LoopStats<acc_t> s;
  for_each_owned<scalar_t, kThreads, kReadBatch>(
      x, NoOutput{}, split, lane,
      [&](const auto& v, int c0, NoOutput) {
        constexpr int n = std::extent_v<std::remove_reference_t<decltype(v)>>;
        acc_t z[n];
#pragma unroll
        for (int k = 0; k < n; ++k) z[k] = rm.logit(v[k]);
        add_batch<O>(s, z, c0, [&](int k) { return rm.spread_target(batch_column<scalar_t, kThreads>(c0, k)); });
      },
      [&](acc_t xc, int c) {
        const acc_t z[1] = {rm.logit(xc)};
        add_batch<O>(s, z, c, [&](int) { return rm.spread_target(c); });
      });
  return s;
}

// ---- The row's argmax (the ops' .stats overloads) ----------------------------------------
//
// torch.argmax's: the lowest column among ties, a NaN the largest (its first NaN), of the
// logits the loss sees (z, after the logit map). Each thread knows its max and the batch
// that raised it; the threads whose max is the row's look in that batch again (a few
// vectors per row, read after the loop so that it carries nothing for the argmax), and the
// lowest column among them wins. Only where the launch asks for it (out.argmax).

// Whether a thread's (or CTA's) max m is the row's max: equal, or both NaN.
template <typename acc_t>
__device__ __forceinline__ bool is_row_max(acc_t m, acc_t row_max) {
  return m == row_max || (row_max != row_max && m != m);
}

// The elements of the batch for_each_owned hands over at c0 (in its statistics pass): a
// scalar of the head or tail, kReadBatch vectors while they fit, then single vectors. (So
// the loop state carries one column, not a size as well.)
template <typename scalar_t, int kThreads>
__device__ __forceinline__ int batch_size_at(const RowSplit& split, int c0) {
  constexpr int W = kVecWidth<scalar_t>;
  if (c0 < split.head || c0 >= split.body_end) return 1;
  return c0 + (kReadBatch - 1) * kThreads * W < split.body_end ? kReadBatch * W : W;
}

// The first column in this thread's batch noted by thread_statistics whose z is the row's
// max; kNoColumn if the thread's max is not the row's (or it saw only -inf). The thread
// owns the batch: in place, no other thread writes it, and this one has not yet.
template <typename scalar_t, int kThreads, class O>
__device__ __forceinline__ int thread_argmax(const RowMath<scalar_t, O>& rm, const scalar_t* x, const RowSplit& split,
                                             const LoopStats<acc_type<scalar_t>>& s, acc_type<scalar_t> row_max) {
  using acc_t = acc_type<scalar_t>;
  if (s.max_batch == kNoColumn || !is_row_max(s.max, row_max)) return kNoColumn;
  const int n = batch_size_at<scalar_t, kThreads>(split, s.max_batch);
  for (int k = 0; k < n; ++k) {
    const int c = batch_column<scalar_t, kThreads>(s.max_batch, k);
    const acc_t z = rm.logit(static_cast<acc_t>(x[c]));
    if (z == row_max || z != z) return c;  // (a NaN only where the row's max is NaN)
  }
  return kNoColumn;  // not reached: the batch holds the max
}

// The lowest of the kThreads threads' columns (every thread gets it); 0 where none has one
// (a row of -inf logits, or of none), as torch.argmax.
template <int kThreads>
__device__ __forceinline__ int merge_argmax(int column) {
#pragma unroll
  for (int offset = (kThreads < kWarp ? kThreads : kWarp) / 2; offset > 0; offset /= 2) {
    const int other = __shfl_xor_sync(0xffffffffu, column, offset);
    column = other < column ? other : column;
  }
  if constexpr (kThreads > kWarp) {
    constexpr int kWarps = kThreads / kWarp;
    __shared__ int partial[kWarps];
    if (threadIdx.x % kWarp == 0) partial[threadIdx.x / kWarp] = column;
    __syncthreads();
    column = partial[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) column = partial[w] < column ? partial[w] : column;
  }
  return column == kNoColumn ? 0 : column;
}

// ---- The gradient ------------------------------------------------------------------------

// p_coef * softmax_c = scale * exp2(z_c log2(e) + bias). With p_coef > 0 (every row of a
// plain mean or sum) the coefficient folds into the bias, log2(p_coef) - lse log2(e), and
// scale is 1: the loop has no multiply. One definition for every kernel that writes a
// gradient, so the fused and the recomputed gradients agree bit for bit.
template <typename acc_t>
struct SoftmaxTerm {
  acc_t bias;
  acc_t scale;
  bool folded;
};

template <typename acc_t>
__device__ __forceinline__ SoftmaxTerm<acc_t> softmax_term(acc_t lse, acc_t p_coef) {
  if (p_coef > acc_t(0) && p_coef < std::numeric_limits<acc_t>::infinity()) {
    return {fma_(-lse, kLog2e<acc_t>, std::log2(p_coef)), acc_t(1), true};
  }
  return {-lse * kLog2e<acc_t>, p_coef, false};
}

// The gradient at one element off the target's entry: scale * exp2(...) - t_coef * T_c,
// times the logit map's slope. kFolded: scale is 1 (only for lean options).
template <bool kFolded, typename scalar_t, class O>
__device__ __forceinline__ acc_type<scalar_t> gradient_at(const RowMath<scalar_t, O>& rm,
                                                          const SoftmaxTerm<acc_type<scalar_t>>& term,
                                                          acc_type<scalar_t> t_coef, acc_type<scalar_t> x, int c) {
  using acc_t = acc_type<scalar_t>;
  const acc_t z = rm.logit(x);
  acc_t v = exp2_approx(fma_(z, kLog2e<acc_t>, term.bias));
  if constexpr (!kFolded) v = term.scale * v;
  if constexpr (O::spread) v -= t_coef * rm.spread_target(c);
  if constexpr (O::mapped) v *= rm.p.map.slope(z);
  return v;
}

// write_loop(std::bool_constant<folded>) with the loop for the row's term: folded only
// with lean options (elsewhere that loop would never run).
template <class O, typename acc_t, typename WriteLoop>
__device__ __forceinline__ void with_folding(const SoftmaxTerm<acc_t>& term, WriteLoop write_loop) {
  if constexpr (O::lean) {
    if (term.folded) return write_loop(std::true_type{});
  }
  write_loop(std::false_type{});
}

// The gradient at the target's own column (z_y: its logit after the logit map).
template <typename scalar_t, class O>
__device__ __forceinline__ acc_type<scalar_t> target_gradient(const RowMath<scalar_t, O>& rm,
                                                              const SoftmaxTerm<acc_type<scalar_t>>& term,
                                                              acc_type<scalar_t> t_coef, acc_type<scalar_t> z_y) {
  using acc_t = acc_type<scalar_t>;
  acc_t v = term.scale * exp2_approx(fma_(z_y, kLog2e<acc_t>, term.bias)) -
            t_coef * (rm.spread_target(rm.index) + rm.one_hot_target());
  if constexpr (O::mapped) v *= rm.p.map.slope(z_y);
  return v;
}

// Writes the gradient of one row, p_coef * softmax - t_coef * T times the logit map's
// slope, into g (which may be x itself). The loop writes every element as if it were off
// the target; then the writer lane, which owns the target's column and read its logit
// z_y before storing anything, writes that entry.
template <typename scalar_t, int kThreads, class O>
__device__ __forceinline__ void write_gradient(const RowMath<scalar_t, O>& rm, const scalar_t* x, scalar_t* g,
                                               const RowSplit& split, int lane, acc_type<scalar_t> z_y,
                                               acc_type<scalar_t> lse, acc_type<scalar_t> p_coef,
                                               acc_type<scalar_t> t_coef) {
  using acc_t = acc_type<scalar_t>;
  if (rm.bad_target) return fill_row<scalar_t, kThreads>(g, split.num_classes, lane, quiet_nan<acc_t>());
  if (gradient_is_zero(p_coef, t_coef, rm.ignored, lse)) return fill_row<scalar_t, kThreads>(g, split.num_classes, lane, 0);
  const SoftmaxTerm<acc_t> term = softmax_term(lse, p_coef);
  with_folding<O>(term, [&](auto folded) {
    write_owned<scalar_t, kThreads>(x, g, split, lane, [&](acc_t xc, int c) {
      return gradient_at<decltype(folded)::value>(rm, term, t_coef, xc, c);
    });
  });
  if (rm.index >= 0 && lane == rm.template writer_lane<kThreads>(split)) {
    g[rm.index] = static_cast<scalar_t>(target_gradient(rm, term, t_coef, z_y));
  }
}

// The fused kernels' objective row_scale * loss + z_scale * lse^2 (objective() in
// common/ce_math.h) and its gradient's coefficients.
template <typename scalar_t>
struct FusedRow {
  using acc_t = acc_type<scalar_t>;
  acc_t row_scale, z_scale, p_coef, t_coef;

  __device__ FusedRow(const GradInForward<scalar_t>& g, int64_t row, const RowStats<acc_t>& s, acc_t lse)
      : row_scale(g.row_scale[row]), z_scale(g.z_scale ? g.z_scale[row] : acc_t(0)) {
    p_coef = row_scale * s.mass + 2 * z_scale * lse;  // as ops.py forms it for a recomputation (upstream 1)
    t_coef = row_scale;
  }
};

// The row's outputs, by its writer thread. A bad class index never makes a kernel read out
// of bounds: the row's results are NaN instead (see fused_ce.set_target_validation); its
// argmax, which does not depend on the target, is written as for any row.
template <typename acc_t>
__device__ __forceinline__ void write_outputs(const ForwardOutputs<acc_t>& out, int64_t row, bool bad_target,
                                              acc_t reported, acc_t lse, acc_t mass, int argmax, acc_t row_max) {
  out.loss[row] = bad_target ? quiet_nan<acc_t>() : reported;
  out.lse[row] = bad_target ? quiet_nan<acc_t>() : lse;
  if (out.mass) out.mass[row] = bad_target ? quiet_nan<acc_t>() : mass;
  if (out.argmax) {
    out.argmax[row] = argmax;
    out.max_logit[row] = row_max;
  }
}

// ---- Kernels -----------------------------------------------------------------------------

// Per-row statistics (loss, lse, mass) and, with O::grad, the gradient of the objective
// (see objective() in common/ce_math.h) in the same kernel: a second pass over the row.
template <typename scalar_t, int kThreads, unsigned kOpts>
__global__ void __launch_bounds__(block_size<kThreads>(), 1)
    forward_kernel(const RowProblem<scalar_t> p, const ForwardOutputs<acc_type<scalar_t>> out,
                   const GradInForward<scalar_t> with_grad) {
  using O = Options<kOpts>;
  using acc_t = acc_type<scalar_t>;
  const int lane = lane_in_row<kThreads>();
  const int64_t row = row_of_thread<kThreads>();
  // A whole block shares a row when kThreads > 32, so this exit is block-uniform then.
  if (row >= p.num_rows) return;

  const RowMath<scalar_t, O> rm(p, row);
  const scalar_t* x = p.logits + row * p.logits_stride;
  const RowSplit split = split_row(x, int(p.num_classes));
  const int writer = rm.template writer_lane<kThreads>(split);
  // The target's logit, read by the lane that owns it before any of its own stores (the
  // gradient may overwrite the row); only that lane computes the loss.
  const acc_t z_y = rm.index >= 0 && lane == writer ? rm.logit(static_cast<acc_t>(x[rm.index])) : acc_t(0);
  const LoopStats<acc_t> mine = thread_statistics<scalar_t, kThreads>(rm, x, split, lane);
  RowStats<acc_t> s = merge_row<kThreads>(mine.stats());
  const acc_t row_max = s.max;
  // (Before the gradient: in place it overwrites the batch thread_argmax reads. out.argmax is
  // the same for the whole launch, so merge_argmax's barrier is reached by every thread.)
  int argmax = 0;
  if (out.argmax) argmax = merge_argmax<kThreads>(thread_argmax<scalar_t, kThreads>(rm, x, split, mine, row_max));
  if (rm.index >= 0) add_target(s, rm.one_hot_target(), z_y);  // s.gap: the writer's alone is right
  const acc_t lse = row_lse(s);
  acc_t reported = rm.ignored ? acc_t(0) : row_loss(s);
  if constexpr (O::grad) {
    const FusedRow<scalar_t> f(with_grad, row, s, lse);
    write_gradient<scalar_t, kThreads>(rm, x, with_grad.grad + row * with_grad.grad_stride, split, lane, z_y, lse,
                                       f.p_coef, f.t_coef);
    reported = objective(reported, lse, f.row_scale, f.z_scale);
  }
  if (lane == writer) write_outputs(out, row, rm.bad_target, reported, lse, s.mass, argmax, row_max);
}

template <typename scalar_t, int kThreads, unsigned kOpts>
__global__ void __launch_bounds__(block_size<kThreads>(), 1)
    backward_kernel(const RowProblem<scalar_t> p, const BackwardInputs<acc_type<scalar_t>> in, scalar_t* grad,
                    int64_t grad_stride) {  // grad may be the logits (in place)
  using O = Options<kOpts>;
  using acc_t = acc_type<scalar_t>;
  const int lane = lane_in_row<kThreads>();
  const int64_t row = row_of_thread<kThreads>();
  if (row >= p.num_rows) return;
  if (in.keep_where_one && in.keep_where_one[row * in.keep_stride] == 1) return;  // holds its gradient already
  const RowMath<scalar_t, O> rm(p, row);
  const scalar_t* x = p.logits + row * p.logits_stride;
  const RowSplit split = split_row(x, int(p.num_classes));
  const acc_t z_y = rm.index >= 0 && lane == rm.template writer_lane<kThreads>(split) ? rm.logit(static_cast<acc_t>(x[rm.index])) : acc_t(0);
  write_gradient<scalar_t, kThreads>(rm, x, grad + row * grad_stride, split, lane, z_y, in.lse[row], in.p_coef[row],
                                     in.t_coef[row]);
}

// Entropy and lse of each row of softmax(logits / temperature) (EntropyStats in
// common/ce_math.h); a.post = 1 / temperature (exact for 1: x * 1 is x).
template <typename scalar_t, int kThreads>
__global__ void __launch_bounds__(block_size<kThreads>(), 1) entropy_forward_kernel(const EntropyArgs<scalar_t> a) {
  using acc_t = acc_type<scalar_t>;
  constexpr int W = kVecWidth<scalar_t>;
  const int lane = lane_in_row<kThreads>();
  const int64_t row = row_of_thread<kThreads>();
  if (row >= a.num_rows) return;
  const scalar_t* x = a.logits + row * a.logits_stride;
  EntropyStats<acc_t> s = empty_entropy_stats<acc_t>();
  auto add = [&](const acc_t* z, int n) {
    acc_t m = s.max;
    for (int k = 0; k < n; ++k) m = max_nan(m, z[k]);
    s = rescale(s, m);
    if (m == neg_inf<acc_t>()) return;
    for (int k = 0; k < n; ++k) {
      const acc_t e = exp_(z[k] - m);
      s.sum += e;
      s.moment += entropy_moment(e, m, z[k]);
    }
  };
  for_each_owned<scalar_t, kThreads, kReadBatch>(
      x, NoOutput{}, split_row(x, int(a.num_classes)), lane,
      [&](const auto& v, int, NoOutput) {
        constexpr int n = std::extent_v<std::remove_reference_t<decltype(v)>>;
        acc_t z[n];
#pragma unroll
        for (int k = 0; k < n; ++k) z[k] = v[k] * a.post;
#pragma unroll
        for (int u = 0; u < n / W; ++u) add(z + u * W, W);
      },
      [&](acc_t xc, int) {
        const acc_t z = xc * a.post;
        add(&z, 1);
      });
  s = merge_row<kThreads>(s);
  if (lane == 0) {
    a.entropy[row] = entropy_value(s);
    a.lse[row] = s.max + log_(s.sum);
  }
}

template <typename scalar_t, int kThreads>
__global__ void __launch_bounds__(block_size<kThreads>(), 1) entropy_backward_kernel(const EntropyArgs<scalar_t> a) {
  using acc_t = acc_type<scalar_t>;
  const int lane = lane_in_row<kThreads>();
  const int64_t row = row_of_thread<kThreads>();
  if (row >= a.num_rows) return;
  const scalar_t* x = a.logits + row * a.logits_stride;
  scalar_t* g = a.grad + row * a.num_classes;
  const acc_t lse = a.lse[row], h = a.entropy[row], gh = a.grad_entropy[row * a.grad_entropy_stride];
  const acc_t gz = gh * a.post;  // dz/dx = 1 / temperature
  auto grad_at = [&](acc_t v) -> acc_t {
    if (gz == acc_t(0)) return acc_t(0);
    const acc_t z = v * a.post;
    const acc_t p = exp_(z - lse);
    return p == acc_t(0) ? acc_t(0) : entropy_grad_value(p, z, lse, h, gz);  // p = 0: 0, not 0 * inf
  };
  write_owned<scalar_t, kThreads>(x, g, split_row(x, int(a.num_classes)), lane,
                                  [&](acc_t v, int) { return grad_at(v); });
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
    write_owned<scalar_t, kScaleThreads, true>(r, r, split_row(r, int(num_classes)), int(threadIdx.x),
                                               [&](acc_t x, int) { return x * factor; });
  }
}

}  // namespace fused_ce::cuda
